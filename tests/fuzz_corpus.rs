//! Replays every file of the committed fuzz corpora (`fuzz/corpus/TARGET/`)
//! through the parser its fuzz target feeds, on stable, deterministically:
//! whatever the fuzzers once found interesting must still parse or be
//! refused cleanly, never panic. A failing file is named in the message.
//!
//! Adding a target is one line in the `replay!` list at the bottom.

use std::path::{Path, PathBuf};

use mc_proxy::config::Config;
use mc_proxy::proxy_protocol;

/// The files of `fuzz/corpus/NAME`, sorted (the corpus must exist and be
/// non-empty: a missing corpus is a failure, not a pass).
fn corpus(name: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    files
}

/// Runs `check` on every file of the corpus; reports every file that
/// panicked, by name.
fn replay(name: &str, check: fn(&[u8])) {
    let files = corpus(name);
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} {name} corpus files panicked:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

/// The hello reader: the `hello` fuzz target's own checks
/// (`wire::hello::checks`: chunked feeding gives the answer of one call,
/// prefixes need more, re-framing changes nothing).
fn check_hello(data: &[u8]) {
    wire::hello::checks::check(data);
}

/// The QUIC Initial reader: the `quic_initial` fuzz target's own checks
/// (`wire::quic::checks`: the datagrams as they are and as encrypted
/// plaintext frames; answers repeated, skipped datagrams inert, any order
/// the same, v1 and v2 alike, a re-encrypted hello the same).
fn check_quic_initial(data: &[u8]) {
    wire::quic::checks::check(data);
}

/// The admin socket's `:authority` rewriter: the `authority` fuzz target's
/// own checks (`wire::authority::checks`: chunked feeding gives the answer
/// of one call, its output is accepted and unchanged by a second pass).
fn check_authority(data: &[u8]) {
    wire::authority::checks::check(data);
}

/// The config loader: a validated config or a one-line error naming the
/// file, never a panic.
fn check_config(data: &[u8]) {
    let source = Path::new("/etc/mc-proxy/mc-proxy.toml");
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text, source) {
        Ok(config) => assert!(config.database.path.is_absolute()),
        Err(err) => {
            let line = err.to_string();
            assert!(line.starts_with("/etc/mc-proxy/mc-proxy.toml"), "{line}");
            assert!(!line.contains('\n'), "{line:?}");
        }
    }
}

/// The PROXY protocol reader: a finished header's answer does not depend on
/// what follows it and every strict prefix needs more; a rejection stays a
/// rejection whatever follows.
fn check_proxy_protocol(data: &[u8]) {
    match proxy_protocol::parse(data) {
        Ok(proxy_protocol::Parse::Done(header)) => {
            assert!(header.len <= data.len());
            let exact = &data[..header.len];
            assert_eq!(
                proxy_protocol::parse(exact),
                Ok(proxy_protocol::Parse::Done(header))
            );
            assert_eq!(
                proxy_protocol::parse(&exact[..exact.len() - 1]),
                Ok(proxy_protocol::Parse::NeedMore)
            );
        }
        Ok(proxy_protocol::Parse::NeedMore) => {
            assert_eq!(
                proxy_protocol::parse(&data[..data.len() / 2]),
                Ok(proxy_protocol::Parse::NeedMore)
            );
        }
        Err(reject) => {
            let mut longer = data.to_vec();
            longer.extend_from_slice(b" 1\r\n\x16\x03\x01");
            assert_eq!(proxy_protocol::parse(&longer), Err(reject));
        }
    }
}

/// The L7 request side: the `http_request` fuzz target's call (the hyper
/// server and the request phases over an in-memory connection; it panics
/// on a hang).
fn check_http_request(data: &[u8]) {
    let _ = mc_proxy::proxy::http::harness::exercise(data);
}

/// The balancer: the `balance` fuzz target's own checks
/// (`mc_proxy::balance::checks`: attempts without repeats, healthy first,
/// least connections first at the fewest, counts kept across updates and
/// back to zero).
fn check_balance(data: &[u8]) {
    mc_proxy::balance::checks::exercise(data);
}

/// The handoff's line parsers: the `handoff_lines` fuzz target's own checks
/// (`mc_proxy::handoff::check_lines`: what parses writes a line that parses
/// back to the same).
fn check_handoff_lines(data: &[u8]) {
    mc_proxy::handoff::check_lines(data);
}

macro_rules! replay {
    ($($target:ident => $check:expr;)*) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target), $check);
            }
        )*
    };
}

replay! {
    hello => check_hello;
    quic_initial => check_quic_initial;
    config => check_config;
    proxy_protocol => check_proxy_protocol;
    authority => check_authority;
    http_request => check_http_request;
    balance => check_balance;
    handoff_lines => check_handoff_lines;
}
