//! Connection limits through the real binary on loopback:
//! `[firewall] max_connections_per_ip` (one count across listeners, the
//! PROXY-carried client counted on a `proxy_protocol` listener) and
//! `[proxy] max_connections` (the accept loop pauses at the cap instead of
//! running into EMFILE, and serves again as soon as connections close).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A TLS session through the proxy on `tcp` (after whatever was already
/// written on it), up to the backend's name line; the session stays open.
async fn relayed_on(tcp: TcpStream, pki: &Pki) -> std::io::Result<TlsStream<TcpStream>> {
    let session = async {
        let mut tls = tls_over(tcp, "ok.test", pki.client_config()).await?;
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
    let values = scrape(addr).await;
    *values
        .get(series)
        .unwrap_or_else(|| panic!("no series {series} in:\n{values:?}"))
}

/// Limit 3: a client (127.0.0.2) holding three open connections, over two
/// listeners, is refused a fourth on either with an RST and
/// `outcome=blocked:conn_limit`, while another client (127.0.0.3) is
/// served; once one of the three closes, the client is served again. On a
/// `proxy_protocol` listener the address the header carries is the client
/// counted, not the upstream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limit_refuses_the_fourth_open_connection_across_listeners() {
    let (dir, pki, backend) = tls_scene("B", &["ok.test"]).await;
    let route = [route("ok.test", backend.addr)];
    let proxy = Proxy::start(
        dir.path(),
        &config(
            dir.path(),
            &format!(
                "{}{}{}[firewall]\nmax_connections_per_ip = 3\n{METRICS_ANY_PORT}",
                listener("127.0.0.1:0", &route),
                listener("127.0.0.2:0", &route),
                proxy_protocol_listener("127.0.0.3:0", &route),
            ),
        ),
    );
    let (a, b, pp) = (
        proxy.listener("127.0.0.1:0"),
        proxy.listener("127.0.0.2:0"),
        proxy.listener("127.0.0.3:0"),
    );
    let metrics_port = proxy.metrics_addr().port();

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
    // Labelled with the listener as written in the config.
    for (listener, blocked) in [
        ("127.0.0.1:0", 2.0),
        ("127.0.0.2:0", 1.0),
        ("127.0.0.3:0", 1.0),
    ] {
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

/// The `key=VALUE` number in the start line.
fn start_field(proxy: &Proxy, key: &str) -> u64 {
    let log = proxy.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("mc-proxy started"))
        .expect("start line");
    let needle = format!("{key}=");
    let at = line
        .find(&needle)
        .unwrap_or_else(|| panic!("no {key}= in {line}"));
    line[at + needle.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{key}= is not a number in {line}"))
}

/// Started under a 128-descriptor limit, the server derives its cap from
/// it (90 % of what is left at two descriptors a connection) and logs it.
/// With that many relayed connections open, 30 more clients connect (the
/// kernel queues them; without the cap they would take the proxy past its
/// descriptors) but are neither accepted nor reset: their handshakes wait.
/// 30 of the open ones close and the 30 waiting are served at once. The log
/// has one pause warning and never an EMFILE or a failed accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_the_accept_loop_waits_instead_of_running_out_of_descriptors() {
    const EXTRA: usize = 30;
    ensure_own_nofile(4096);
    let (dir, pki, backend) = tls_scene("B", &["ok.test"]).await;
    let proxy = Proxy::start_with_nofile(
        dir.path(),
        &config(
            dir.path(),
            &format!(
                "{}{}{METRICS_ANY_PORT}",
                listener("127.0.0.1:0", &[route("ok.test", backend.addr)]),
                proxy_section("handshake_timeout = \"60s\""),
            ),
        ),
        128,
    );
    let addr = proxy.listener("127.0.0.1:0");
    let metrics_port = proxy.metrics_addr().port();
    assert_eq!(nofile_limits(proxy.pid()), (128, 128));
    assert_eq!(start_field(&proxy, "fd_limit"), 128);
    let cap = start_field(&proxy, "max_connections") as usize;
    // 90 % of (128 − what the server holds) / 2; it holds at least a dozen
    // (and, as measured, about 16).
    assert!((EXTRA..=51).contains(&cap), "max_connections={cap}");
    let metrics = local(metrics_port);
    assert_eq!(
        metric(metrics, "mc_proxy_connections_max").await,
        cap as f64
    );

    let mut held = Vec::with_capacity(cap);
    for _ in 0..cap {
        let tcp = TcpStream::connect(addr).await.unwrap();
        held.push(relayed_on(tcp, &pki).await.expect("served below the cap"));
    }
    // Past the cap: connected by the kernel, not accepted, not reset.
    let mut waiting = tokio::task::JoinSet::new();
    for _ in 0..EXTRA {
        let pki_config = pki.client_config();
        waiting.spawn(async move {
            let mut tls = tls_connect(addr, "ok.test", pki_config).await?;
            let line = read_line(&mut tls).await?;
            Ok::<_, std::io::Error>((line, tls))
        });
    }
    // The wait is the point: for 2 s nothing may answer them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        waiting.try_join_next().is_none(),
        "a client past the cap was answered (or reset) before a slot freed"
    );
    proxy.wait_count("max_connections reached", 1, Duration::from_secs(10));
    let fds = proc_fds(proxy.pid());
    assert!(fds < 128, "the proxy holds {fds} of its 128 descriptors");
    assert_eq!(
        backend.accepted.load(std::sync::atomic::Ordering::SeqCst),
        cap,
        "the backend saw a connection past the cap"
    );

    // As many close: the waiting are served.
    held.truncate(cap - EXTRA);
    let closed = std::time::Instant::now();
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        let mut served = Vec::new();
        while let Some(result) = waiting.join_next().await {
            let (line, tls) = result.unwrap().expect("a waiting client is served");
            assert_eq!(line, "backend=B");
            served.push(tls);
        }
        served
    })
    .await
    .expect("the waiting clients were not served after as many closed");
    eprintln!(
        "cap {cap}: {EXTRA} waiting clients served {:?} after {EXTRA} closed",
        closed.elapsed()
    );
    assert_eq!(served.len(), EXTRA);
    assert!(metric(metrics, "mc_proxy_accept_paused_total").await >= 1.0);

    let log = proxy.log_text();
    for bad in [
        "accept failed",
        "Too many open files",
        "EMFILE",
        "os error 24",
    ] {
        assert!(!log.contains(bad), "{bad:?} in the log:\n{log}");
    }
    assert_eq!(proxy.count_log("max_connections reached"), 1, "{log}");
    drop(served);
    drop(held);
    proxy.stop();
}
