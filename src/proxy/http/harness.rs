//! The HTTP request side without TLS, for the `http_request` fuzz target
//! and its corpus replay: bytes in as a client would send them after the
//! handshake, through the same hyper server settings and the same request
//! phases (routing, policy, headers, upstream connect) as a real L7
//! connection. The one route (`a.test`) points at a closed port, so a
//! request that gets that far ends in a 502 without leaving the machine.
//!
//! Not used by the server.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::io::Meter;
use super::request::ConnContext;
use super::{drive, Shared};
use crate::config::{FirewallConfig, ProxyConfig};
use crate::firewall::Firewall;
use crate::l7::registry::{CertFiles, CertRegistry};
use crate::metrics::Metrics;
use crate::routes::{
    Backend, BackendProtocol, Hostname, L7Route, ListenerRoutes, Mode, RouteMap, Target,
};

/// How long one input may take before it counts as a hang (a bug).
const HANG: Duration = Duration::from_secs(5);

/// A loopback port with nothing listening (bound, then closed).
fn closed_port() -> SocketAddr {
    static PORT: OnceLock<SocketAddr> = OnceLock::new();
    *PORT.get_or_init(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9)))
    })
}

/// Serves `data`: its first byte's low bit picks HTTP/2 (the client
/// preface is sent first) or HTTP/1.1; the rest is what the client sends,
/// in writes of up to 1 KiB, then the client closes its side. Returns what
/// the server wrote back. Panics if the server does not finish within 5 s.
pub fn exercise(data: &[u8]) -> Vec<u8> {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    runtime.block_on(async {
        tokio::time::timeout(HANG, run(data))
            .await
            .unwrap_or_else(|_| panic!("the HTTP server did not finish within {HANG:?}"))
    })
}

async fn run(data: &[u8]) -> Vec<u8> {
    let (h2, input) = match data.split_first() {
        Some((first, rest)) => (first & 1 == 1, rest.to_vec()),
        None => (false, Vec::new()),
    };
    let route = L7Route {
        tls_cert: "/nonexistent/a.pem".into(),
        tls_key: "/nonexistent/a.key".into(),
        backend_tls: false,
        backend_ca: None,
        backend_server_name: None,
        backend_protocol: BackendProtocol::Auto,
    };
    let files = CertFiles::of(&route);
    let mut map = RouteMap::new();
    if let (Ok(host), Ok(backend)) = (
        Hostname::parse("a.test"),
        Backend::parse(&closed_port().to_string()),
    ) {
        map.insert(
            host,
            Target {
                backends: wire::route::Backends::one(backend),
                balance: Default::default(),
                health: None,
                send_proxy_protocol: false,
                mode: Mode::L7(Arc::new(route)),
            },
        );
    }
    let proxy = ProxyConfig {
        connect_timeout: Duration::from_secs(1),
        ..ProxyConfig::default()
    };
    let metrics = Metrics::new(&["fuzz".to_string()], "fuzz");
    let Ok(certs) = CertRegistry::new() else {
        return Vec::new();
    };
    let firewall_config = FirewallConfig {
        geoip_db: None,
        rules: Vec::new(),
        rate_limit: 0,
        rate_window: Duration::from_secs(1),
        max_connections_per_ip: None,
    };
    let Ok(firewall) = Firewall::new(&firewall_config, &[]) else {
        return Vec::new();
    };
    let shared = Arc::new(Shared::new(
        Arc::new(certs),
        &proxy,
        metrics.upstream_open(),
    ));
    let meter = Arc::new(Meter::new());
    meter.arm_headers();
    meter.arm_on_read(!h2);
    let ctx = Arc::new(ConnContext {
        client: SocketAddr::from(([192, 0, 2, 1], 40000)),
        client_ip: super::request::ip_header([192, 0, 2, 1].into()),
        files,
        routes: Arc::new(ListenerRoutes::new("fuzz", map)),
        firewall: Arc::new(firewall),
        shared,
        response_timeout: Some(Duration::from_secs(1)),
        metrics: metrics.listeners()[0].requests.clone(),
        requests: AtomicU64::new(0),
        relays: TaskTracker::new(),
        last_upstream: std::sync::Mutex::new(None),
        connect_attempts: 3,
        forced: CancellationToken::new(),
        meter: meter.clone(),
    });
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let writer = tokio::spawn(async move {
        let (mut reader, mut writer) = tokio::io::split(&mut client);
        let send = async {
            if h2 {
                writer
                    .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                    .await?;
            }
            for chunk in input.chunks(1024) {
                writer.write_all(chunk).await?;
            }
            writer.shutdown().await
        };
        let mut output = Vec::new();
        let receive = reader.read_to_end(&mut output);
        let _ = tokio::join!(send, receive);
        output
    });
    let forced = CancellationToken::new();
    let draining = CancellationToken::new();
    let _ = drive(
        TokioIo::new(server),
        h2,
        ctx,
        &meter,
        super::Limits {
            idle: Duration::from_secs(3),
            headers: Duration::from_secs(2),
        },
        &forced,
        &draining,
    )
    .await;
    writer.await.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::exercise;

    #[test]
    fn a_request_is_routed_through_the_phases_and_junk_is_refused() {
        let answer = exercise(b"\x00GET / HTTP/1.1\r\nHost: a.test\r\n\r\n");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 502 "), "{text}");
        let answer = exercise(b"\x00GET / HTTP/1.1\r\nHost: b.test\r\n\r\n");
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 421 "));
        let answer = exercise(b"\x00GET / HTTP/1.1 junk\r\nHost: a.test\r\n\r\n");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        // HTTP/2: the server's SETTINGS come back (frame type 4 at byte 3).
        let answer = exercise(b"\x01");
        assert!(answer.len() >= 9 && answer[3] == 4, "{answer:?}");
    }
}
