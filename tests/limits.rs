//! Connection limits through the real binary on loopback:
//! `[firewall] max_connections_per_ip` (one count across listeners, the
//! PROXY-carried client counted on a `proxy_protocol` listener) and
//! `[proxy] max_connections` (the accept loop pauses at the cap instead of
//! running into EMFILE, and serves again as soon as connections close).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn config(dir: &std::path::Path, body: &str) -> String {
    format!(
        "[database]\npath = \"{}\"\n\n{body}",
        dir.join("mc-proxy.db").display()
    )
}

/// A TLS session through the proxy on `tcp` (after whatever was already
/// written on it), up to the backend's name line; the session stays open.
async fn relayed_on(tcp: TcpStream, pki: &Pki) -> std::io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from("ok.test").unwrap();
    let session = async {
        let mut tls = TlsConnector::from(pki.client_config())
            .connect(name, tcp)
            .await?;
        let line = read_line(&mut tls).await?;
        assert_eq!(line, "backend=B");
        Ok(tls)
    };
    tokio::time::timeout(Duration::from_secs(10), session)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "tls session"))?
}

/// An open relayed connection from the loopback address `source`.
async fn relayed_from(source: &str, addr: SocketAddr, pki: &Pki) -> TlsStream<TcpStream> {
    let tcp = connect_from(source, addr).await.unwrap();
    relayed_on(tcp, pki)
        .await
        .unwrap_or_else(|e| panic!("{source} → {addr} not relayed: {e}"))
}

/// A connection to a `proxy_protocol` listener whose PROXY v1 header says
/// it comes from `client`.
async fn proxied(client: &str, addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let header = format!("PROXY TCP4 {client} 127.0.0.1 40000 443\r\n");
    tcp.write_all(header.as_bytes()).await.unwrap();
    tcp
}

/// The value of one series on the metrics endpoint.
async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let (_, _, body) = http_get(addr, "/metrics").await;
    *parse_metrics(&body)
        .get(series)
        .unwrap_or_else(|| panic!("no series {series} in:\n{body}"))
}

/// Limit 3: a client (127.0.0.2) holding three open connections, over two
/// listeners, is refused a fourth on either with an RST and
/// `outcome=blocked:conn_limit`, while another client (127.0.0.3) is
/// served; once one of the three closes, the client is served again. On a
/// `proxy_protocol` listener the address the header carries is the client
/// counted, not the upstream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limit_refuses_the_fourth_open_connection_across_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("limits CA");
    let backend = tls_backend(&pki, "B", &["ok.test"]).await;
    let (a_port, b_port, pp_port, metrics_port) =
        (free_port(), free_port(), free_port(), free_port());
    let (a, b, pp) = (local(a_port), local(b_port), local(pp_port));
    let route = format!(
        "  [[listeners.routes]]\n  hostname = \"ok.test\"\n  backend = \"{}\"\n",
        backend.addr
    );
    let proxy = Proxy::start(
        dir.path(),
        &config(
            dir.path(),
            &format!(
                "[[listeners]]\naddr = \"{a}\"\n{route}\n\
                 [[listeners]]\naddr = \"{b}\"\n{route}\n\
                 [[listeners]]\naddr = \"{pp}\"\nproxy_protocol = true\n{route}\n\
                 [firewall]\nmax_connections_per_ip = 3\n\
                 [metrics]\naddr = \"127.0.0.1:{metrics_port}\"\n"
            ),
        ),
    );

    // Three open from 127.0.0.2: two on listener A, one on listener B.
    let mut held = vec![
        relayed_from("127.0.0.2", a, &pki).await,
        relayed_from("127.0.0.2", a, &pki).await,
        relayed_from("127.0.0.2", b, &pki).await,
    ];
    // The fourth is reset before a byte, on either listener.
    assert_reset("127.0.0.2", b).await;
    proxy.wait_blocked("127.0.0.2", "conn_limit");
    assert_reset("127.0.0.2", a).await;
    proxy.wait_count("outcome=blocked:conn_limit", 2, Duration::from_secs(5));
    // Another client is served meanwhile, on both listeners.
    assert_eq!(
        who_from("127.0.0.3", a, "ok.test", &pki).await.unwrap(),
        "B"
    );
    assert_eq!(
        who_from("127.0.0.3", b, "ok.test", &pki).await.unwrap(),
        "B"
    );

    // One of the three closes: once its log line is out, its slot is free.
    drop(held.pop());
    proxy.wait_log(
        &["client=127.0.0.2:", "outcome=relayed"],
        Duration::from_secs(10),
    );
    held.push(relayed_from("127.0.0.2", a, &pki).await);
    assert_reset("127.0.0.2", a).await;
    proxy.wait_count("outcome=blocked:conn_limit", 3, Duration::from_secs(5));

    // PROXY listener: the carried 198.51.100.7 is the client. Three open
    // (all from the upstream 127.0.0.1), the fourth is reset ...
    for _ in 0..3 {
        let tcp = proxied("198.51.100.7", pp).await;
        held.push(relayed_on(tcp, &pki).await.unwrap());
    }
    let mut fourth = proxied("198.51.100.7", pp).await;
    let (bytes, end) = read_all(&mut fourth, Duration::from_secs(10)).await;
    assert!(bytes.is_empty() && saw_reset(&end), "{end:?}");
    proxy.wait_blocked("198.51.100.7", "conn_limit");
    // ... while another carried client, and the upstream's own address on
    // a plain listener, are served.
    let other = proxied("198.51.100.8", pp).await;
    held.push(relayed_on(other, &pki).await.unwrap());
    assert_eq!(
        who_from("127.0.0.1", a, "ok.test", &pki).await.unwrap(),
        "B"
    );

    let metrics = local(metrics_port);
    for (listener, blocked) in [(a, 2.0), (b, 1.0), (pp, 1.0)] {
        assert_eq!(
            metric(
                metrics,
                &format!(
                    "mc_proxy_connections_blocked_total{{listener=\"{listener}\",rule=\"conn_limit\"}}"
                )
            )
            .await,
            blocked,
            "{listener}"
        );
    }
    let refused = proxy.count_log("outcome=blocked:conn_limit");
    assert_eq!(refused, 4, "{}", proxy.log_text());
    drop(held);
    proxy.stop();
}
