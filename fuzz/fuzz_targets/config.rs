//! Fuzzes the config loader: arbitrary bytes → `Config::parse` → an error or
//! a validated `Config`, never a panic. Beyond that it checks what the loader
//! promises: an error is one non-empty line naming the file; a `Config` has
//! a database path resolved against the config's directory, unique listener
//! addresses, unique hostnames per listener, hostnames and backends that
//! parse back to themselves from their display form, and L7 routes with
//! absolute certificate paths and no PROXY header.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mc_proxy::config::Config;
use wire::route::{Backend, Hostname};

const SOURCE: &str = "/etc/mc-proxy/mc-proxy.toml";

fuzz_target!(|data: &[u8]| {
    // The loader reads the file as UTF-8 text; invalid UTF-8 is an error
    // before parsing, so feed it the lossy text to reach the parser anyway.
    let text = String::from_utf8_lossy(data);
    let source = Path::new(SOURCE);
    match Config::parse(&text, source) {
        Err(err) => {
            let line = err.to_string();
            assert!(
                line.starts_with(SOURCE),
                "error does not name the file: {line}"
            );
            assert!(!err.cause().to_string().is_empty(), "empty error message");
            assert!(!line.contains('\n'), "error is not one line: {line:?}");
        }
        Ok(config) => {
            assert_eq!(config.source, source);
            assert!(
                config.database.path.is_absolute(),
                "{:?}",
                config.database.path
            );
            if let Some(tls) = config.grpc.as_ref().and_then(|g| g.tls.as_ref()) {
                assert!(tls.cert.is_absolute() && tls.key.is_absolute());
            }
            let mut binds = HashSet::new();
            for listener in &config.listeners {
                assert!(binds.insert(listener.addr.bind), "duplicate listener");
                let mut names = HashSet::new();
                for route in &listener.routes {
                    assert!(names.insert(route.hostname.clone()), "duplicate hostname");
                    let shown = route.hostname.to_string();
                    assert_eq!(Hostname::parse(&shown).ok().as_ref(), Some(&route.hostname));
                    assert!(!route.pool.backends.is_empty(), "a route with no backend");
                    for backend in route.pool.backends.iter() {
                        let shown = backend.to_string();
                        assert_eq!(Backend::parse(&shown).ok().as_ref(), Some(backend));
                    }
                    // An L7 route: its files resolved, no PROXY header
                    // (its backend connections are pooled).
                    if let Some(l7) = route.mode.l7() {
                        assert!(l7.tls_cert.is_absolute() && l7.tls_key.is_absolute());
                        assert!(l7.backend_ca.as_ref().is_none_or(|ca| ca.is_absolute()));
                        assert!(
                            l7.backend_tls
                                || (l7.backend_ca.is_none() && l7.backend_server_name.is_none())
                        );
                        assert!(!route.send_proxy_protocol, "PROXY header on an L7 route");
                    }
                }
            }
            // Same text, same answer.
            let again = Config::parse(&text, source).expect("second parse failed");
            assert_eq!(format!("{config:?}"), format!("{again:?}"));
        }
    }
});
