//! The soak: mixed traffic for SOAK_SECS (default 600) against the real
//! binary while routes and firewall rules churn through the admin API every
//! 100 ms. Not part of `make test`: `make soak` runs it (release build).
//!
//! Traffic: short TLS handshakes, long echo streams (every byte checked),
//! slowloris clients (one hello byte every 500 ms, cut by the handshake
//! timeout), and clients from a blocked source address (reset). The
//! figures compared are taken at rest (no client connected) after a warm-up
//! and after the run: open descriptors must not grow, RSS must grow less
//! than 10%, good clients must see zero errors, and every acknowledged
//! route change must be in the DB file.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mc_proxy::admin::client;
use mc_proxy::admin::proto::{self, FirewallRuleType};
use mc_proxy::config::{AdminAddr, ClientTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
struct Counts {
    handshakes: AtomicU64,
    handshake_failures: AtomicU64,
    streams: AtomicU64,
    stream_failures: AtomicU64,
    stream_bytes: AtomicU64,
    slowloris_cut: AtomicU64,
    slowloris_failures: AtomicU64,
    blocked_reset: AtomicU64,
    blocked_failures: AtomicU64,
    admin_changes: AtomicU64,
    admin_failures: AtomicU64,
}

impl Counts {
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

const BLOCKED_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 66);

/// Runs every kind of client until `stop` is set.
fn start_traffic(
    listen: SocketAddr,
    pki: Arc<Pki>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    // Short TLS handshakes: connect, read the backend's name line, close.
    for _ in 0..3 {
        let (pki, counts, stop) = (pki.clone(), counts.clone(), stop.clone());
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match handshake(listen, &pki).await {
                    Ok(name) if name == "backend=HS" => {
                        counts.handshakes.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!("handshake failure: {other:?}");
                        counts.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    // Long streams: 10 s of 16 KiB echoes each, every byte compared.
    for n in 0..4u8 {
        let (pki, counts, stop) = (pki.clone(), counts.clone(), stop.clone());
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match long_stream(listen, &pki, n, &stop).await {
                    Ok(bytes) => {
                        counts.streams.fetch_add(1, Ordering::Relaxed);
                        counts.stream_bytes.fetch_add(bytes, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("stream failure: {e}");
                        counts.stream_failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    // Slowloris: one hello byte every 500 ms; the proxy must cut it.
    for _ in 0..20 {
        let (counts, stop) = (counts.clone(), stop.clone());
        tasks.spawn(async move {
            let hello = client_hello(Some("hs.test"));
            while !stop.load(Ordering::Relaxed) {
                match slowloris(listen, &hello).await {
                    Ok(()) => counts.slowloris_cut.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("slowloris not cut: {e}");
                        counts.slowloris_failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
    }
    // Blocked sources: must be reset before anything is read.
    for _ in 0..2 {
        let (counts, stop) = (counts.clone(), stop.clone());
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = hello_from(IpAddr::V4(BLOCKED_SOURCE), listen, "hs.test").await;
                match result {
                    (bytes, end) if bytes.is_empty() && saw_reset(&end) => {
                        counts.blocked_reset.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!("blocked client not reset: {other:?}");
                        counts.blocked_failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    tasks
}

/// A TLS connection through the proxy for `sni`, and the backend's name
/// line.
async fn connect_named(
    listen: SocketAddr,
    sni: &str,
    pki: &Pki,
) -> Result<
    (
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        String,
    ),
    String,
> {
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        tls_connect(listen, sni, pki.client_config()),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| format!("connect: {e}"))?;
    let line = read_line(&mut tls)
        .await
        .map_err(|e| format!("name line: {e}"))?;
    Ok((tls, line))
}

async fn long_stream(
    listen: SocketAddr,
    pki: &Pki,
    n: u8,
    stop: &AtomicBool,
) -> Result<u64, String> {
    let (mut tls, line) = connect_named(listen, "stream.test", pki).await?;
    if line != "backend=STREAM" {
        return Err(format!("wrong backend: {line}"));
    }
    let started = Instant::now();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut echoed = vec![0u8; chunk.len()];
    let mut bytes = 0u64;
    let mut round = 0u32;
    while started.elapsed() < Duration::from_secs(10) && !stop.load(Ordering::Relaxed) {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (i as u32)
                .wrapping_mul(31)
                .wrapping_add(round)
                .wrapping_add(n as u32) as u8;
        }
        tls.write_all(&chunk)
            .await
            .map_err(|e| format!("write: {e}"))?;
        tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut echoed))
            .await
            .map_err(|_| "echo timed out".to_string())?
            .map_err(|e| format!("read: {e}"))?;
        if echoed != chunk {
            return Err("echo differs".into());
        }
        bytes += chunk.len() as u64;
        round += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    close(&mut tls).await?;
    Ok(bytes)
}

/// A short connection: TLS handshake through the proxy, the backend's name
/// line, then a clean close both ways.
async fn handshake(listen: SocketAddr, pki: &Pki) -> Result<String, String> {
    let (mut tls, line) = connect_named(listen, "hs.test", pki).await?;
    close(&mut tls).await?;
    Ok(line)
}

/// Sends close_notify and FIN, then reads until the backend's close: a
/// well-behaved client, so any reset the proxy logs is its own doing.
async fn close(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> Result<(), String> {
    tls.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest))
        .await
        .map_err(|_| "no close from the backend".to_string())?
        .map_err(|e| format!("reading to the close: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} unexpected bytes before the close", rest.len()));
    }
    Ok(())
}

/// Ok when the proxy closes the connection before the hello is complete.
async fn slowloris(listen: SocketAddr, hello: &[u8]) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(listen)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    for byte in &hello[..hello.len() - 1] {
        if stream.write_all(std::slice::from_ref(byte)).await.is_err() {
            return Ok(());
        }
        let mut probe = [0u8; 1];
        // A closed connection shows as EOF or reset while we wait.
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut probe)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
            Ok(Ok(_)) => return Err("proxy sent bytes to a slowloris client".into()),
        }
    }
    Err("whole hello trickled in without being cut".into())
}

/// Every 100 ms one change through the admin API: add a route, remove an
/// old one, add or remove a firewall rule (on TEST-NET addresses, never
/// the loopback clients). Returns the routes the acknowledged changes
/// leave (hostname → backend on `listener`) and the churned rules that
/// they leave.
async fn churn(
    admin_addr: AdminAddr,
    listener: String,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    mut routes: BTreeMap<String, String>,
) -> (BTreeMap<String, String>, BTreeSet<String>) {
    let mut rules = BTreeSet::new();
    let mut admin = client::connect(&admin_addr, &ClientTls::default())
        .await
        .unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let result = match n % 4 {
            0 | 1 => {
                let hostname = format!("churn{n}.test");
                let backend = format!("127.0.0.{}:{}", 1 + n % 250, 1024 + n % 60000);
                let reply = admin
                    .add_route(proto::AddRouteRequest {
                        route: Some(proto::Route {
                            listener_addr: listener.clone(),
                            hostname: hostname.clone(),
                            backend: backend.clone(),
                            send_proxy_protocol: false,
                            ..Default::default()
                        }),
                    })
                    .await;
                reply.map(|_| {
                    routes.insert(hostname, backend);
                })
            }
            2 => {
                // Remove the oldest churn route, keeping the table ~bounded.
                let oldest = routes.keys().find(|h| h.starts_with("churn")).cloned();
                match oldest {
                    Some(hostname) if routes.len() > 20 => admin
                        .remove_route(proto::RemoveRouteRequest {
                            listener_addr: listener.clone(),
                            hostname: hostname.clone(),
                        })
                        .await
                        .map(|_| {
                            routes.remove(&hostname);
                        }),
                    _ => Ok(()),
                }
            }
            _ => {
                // Add one rule, and four ticks later remove it again.
                let adding = n % 8 == 3;
                let value = format!("198.51.100.{}", if adding { n } else { n - 4 } % 200);
                let rule = Some(proto::FirewallRule {
                    r#type: FirewallRuleType::Ip.into(),
                    value: value.clone(),
                });
                if adding {
                    admin
                        .add_firewall_rule(proto::AddFirewallRuleRequest { rule })
                        .await
                        .map(|_| {
                            rules.insert(value);
                        })
                } else {
                    admin
                        .remove_firewall_rule(proto::RemoveFirewallRuleRequest { rule })
                        .await
                        .map(|_| {
                            rules.remove(&value);
                        })
                }
            }
        };
        match result {
            Ok(()) => counts.admin_changes.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                eprintln!("admin change failed: {e:?}");
                counts.admin_failures.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
    (routes, rules)
}

/// Waits until the proxy holds no client connection (GetStatus), then a
/// little more for the descriptors to be closed.
async fn wait_at_rest(admin_addr: &AdminAddr) {
    let mut admin = client::connect(admin_addr, &ClientTls::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = admin
            .get_status(proto::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if status.active_connections == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} connections still active",
            status.active_connections
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(admin);
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// hostname → backend of `listener`'s routes in the DB file.
fn listener_routes(db: &std::path::Path, listener: &str) -> BTreeMap<String, String> {
    db_routes(db)
        .into_iter()
        .filter(|(l, _, _)| l == listener)
        .map(|(_, hostname, backend)| (hostname, backend))
        .collect()
}

/// The churned firewall rules (IPs in 198.51.100.0/24) in the DB file.
fn db_churned_rules(db: &std::path::Path) -> BTreeSet<String> {
    db_rules(db)
        .into_iter()
        .filter(|(kind, value)| kind == "ip" && value.starts_with("198.51.100."))
        .map(|(_, value)| value)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "10-minute soak: make soak"]
async fn soak_mixed_traffic_with_admin_churn() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    ensure_own_nofile(8192);
    let dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(Pki::new("soak CA"));
    let hs = tls_backend(&pki, "HS", &["hs.test"]).await;
    let stream = tls_backend(&pki, "STREAM", &["stream.test"]).await;
    let socket = dir.path().join("admin.sock");
    let db = dir.path().join("mc-proxy.db");
    let toml = format!(
        "[database]\npath = \"{}\"\n[grpc]\naddr = \"unix:{}\"\n\
         [[listeners]]\naddr = \"127.0.0.1:0\"\n\
           [[listeners.routes]]\n  hostname = \"hs.test\"\n  backend = \"{}\"\n\
           [[listeners.routes]]\n  hostname = \"stream.test\"\n  backend = \"{}\"\n\
         [firewall]\nblocked_ips = [\"{BLOCKED_SOURCE}\"]\n\
         [proxy]\nhandshake_timeout = \"3s\"\n[log]\nlevel = \"info\"\n",
        db.display(),
        socket.display(),
        hs.addr,
        stream.addr
    );
    let mut proxy = Proxy::start(dir.path(), &toml);
    let listen = proxy.listener("127.0.0.1:0");
    let pid = proxy.pid();
    let admin_addr = AdminAddr::Unix(socket.clone());
    let listener = "127.0.0.1:0".to_string();
    let counts = Arc::new(Counts::default());

    // Warm-up: a short taste of every kind of traffic, then measure at rest.
    let warm = (secs / 10).clamp(5, 30);
    let stop = Arc::new(AtomicBool::new(false));
    let mut traffic = start_traffic(listen, pki.clone(), counts.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(warm)).await;
    stop.store(true, Ordering::Relaxed);
    while traffic.join_next().await.is_some() {}
    wait_at_rest(&admin_addr).await;
    let before = proc_figures(pid);
    eprintln!("at rest after {warm} s warm-up: {before:?}");

    // The soak.
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut traffic = start_traffic(listen, pki.clone(), counts.clone(), stop.clone());
    let initial = listener_routes(&db, &listener);
    let churner = tokio::spawn(churn(
        admin_addr.clone(),
        listener.clone(),
        counts.clone(),
        stop.clone(),
        initial,
    ));
    let mut peak_rss = 0;
    let mut peak_fds = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_alive(&mut proxy);
        let now = proc_figures(pid);
        peak_rss = peak_rss.max(now.rss_kib);
        peak_fds = peak_fds.max(now.fds);
    }
    stop.store(true, Ordering::Relaxed);
    let (expected_routes, expected_rules) = churner.await.unwrap();
    while traffic.join_next().await.is_some() {}
    let ran = started.elapsed();
    wait_at_rest(&admin_addr).await;
    let after = proc_figures(pid);
    let on_disk = listener_routes(&db, &listener);
    let rules_on_disk = db_churned_rules(&db);

    // Good clients: the proxy's own log must show no relay error for them.
    let log = proxy.log_text();
    let good_lines = log
        .lines()
        .filter(|l| l.contains("connection closed"))
        .filter(|l| l.contains("sni=hs.test") || l.contains("sni=stream.test"));
    let (mut good_relayed, mut good_errors) = (0u64, Vec::new());
    for line in good_lines {
        if line.contains("outcome=relayed") && !line.contains("error=") {
            good_relayed += 1;
        } else {
            good_errors.push(line.to_string());
        }
    }

    let c = &counts;
    let rss_growth = (after.rss_kib as f64 / before.rss_kib as f64 - 1.0) * 100.0;
    let report = format!(
        "SOAK {ran:.0?} (SOAK_SECS={secs}):\n\
         fds at rest: before {} after {} (peak under load {peak_fds})\n\
         RSS at rest: before {} KiB after {} KiB ({rss_growth:+.1}%) (peak under load {peak_rss} KiB)\n\
         proxy CPU: {:?} over the whole run\n\
         short TLS handshakes: {} ok, {} failed\n\
         long streams: {} ok, {} failed, {} bytes echoed\n\
         slowloris: {} cut by the handshake timeout, {} not cut\n\
         blocked sources: {} reset, {} not reset\n\
         admin changes: {} acknowledged, {} failed; routes in DB {} = expected {}; churned rules in DB {} = expected {}\n\
         proxy log: {good_relayed} good connections relayed, {} with an error",
        before.fds,
        after.fds,
        before.rss_kib,
        after.rss_kib,
        after.cpu,
        Counts::get(&c.handshakes),
        Counts::get(&c.handshake_failures),
        Counts::get(&c.streams),
        Counts::get(&c.stream_failures),
        Counts::get(&c.stream_bytes),
        Counts::get(&c.slowloris_cut),
        Counts::get(&c.slowloris_failures),
        Counts::get(&c.blocked_reset),
        Counts::get(&c.blocked_failures),
        Counts::get(&c.admin_changes),
        Counts::get(&c.admin_failures),
        on_disk.len(),
        expected_routes.len(),
        rules_on_disk.len(),
        expected_rules.len(),
        good_errors.len(),
    );
    eprintln!("{report}");
    for line in good_errors.iter().take(10) {
        eprintln!("good connection with an error: {line}");
    }

    assert!(after.fds <= before.fds, "descriptors grew: {report}");
    assert!(rss_growth < 10.0, "RSS grew {rss_growth:.1}%: {report}");
    assert_eq!(Counts::get(&c.handshake_failures), 0, "{report}");
    assert_eq!(Counts::get(&c.stream_failures), 0, "{report}");
    assert_eq!(Counts::get(&c.slowloris_failures), 0, "{report}");
    assert_eq!(Counts::get(&c.blocked_failures), 0, "{report}");
    assert_eq!(Counts::get(&c.admin_failures), 0, "{report}");
    assert!(good_errors.is_empty(), "{report}");
    assert!(
        Counts::get(&c.handshakes) > 0 && Counts::get(&c.streams) > 0,
        "{report}"
    );
    assert!(
        Counts::get(&c.slowloris_cut) > 0 && Counts::get(&c.blocked_reset) > 0,
        "{report}"
    );
    assert_eq!(
        rules_on_disk, expected_rules,
        "acknowledged rule changes missing: {report}"
    );
    assert_eq!(
        on_disk, expected_routes,
        "acknowledged route changes missing: {report}"
    );
}

fn assert_alive(proxy: &mut Proxy) {
    if let Ok(Some(status)) = proxy.child.try_wait() {
        panic!("mc-proxy exited with {status}:\n{}", proxy.log_text());
    }
}
