//! Signals and log output through the real binary (SPEC §4.5, §6.1): a
//! signal at any moment after start has its documented effect, a second
//! SIGTERM/SIGINT exits 143/130 after the store is flushed, and a stalled
//! stderr reader costs log lines, never traffic.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends a ClientHello for `sni` and `payload` through the proxy, half
/// closes, and returns what came back (the raw backend replies after EOF).
async fn relay_once(proxy: SocketAddr, sni: &str, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        let mut stream = TcpStream::connect(proxy).await?;
        stream.write_all(&client_hello(Some(sni))).await?;
        stream.write_all(payload).await?;
        stream.shutdown().await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        Ok(reply)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "relay_once"))?
}

/// Reads a server's stderr up to its start line; returns the bound listener
/// and metrics addresses from the `listening` lines before it.
fn bound_addrs_until_started(stderr: &mut impl BufRead) -> (SocketAddr, SocketAddr) {
    let (mut listener, mut metrics) = (None, None);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "mc-proxy exited before it started"
        );
        let addr = log_field(&line, "addr").and_then(|a| a.parse().ok());
        if line.contains(" listening ") && line.contains(" listener=") {
            listener = addr;
        } else if line.contains("metrics endpoint listening") {
            metrics = addr;
        } else if line.contains("mc-proxy started") {
            return (listener.unwrap(), metrics.unwrap());
        }
    }
}

fn describe(status: Option<ExitStatus>) -> String {
    match status {
        None => "still running".to_string(),
        Some(s) => match s.signal() {
            Some(signal) => format!("killed by signal {signal}"),
            None => format!("exit {:?}", s.code()),
        },
    }
}

const STARTS: usize = 50;

/// Start `run` of an early-signal test: a fresh DB and listener, the
/// server launched, and `signal` sent the moment its port is bound.
fn start_and_signal_when_bound(
    dir: &Path,
    name: &str,
    routes: &[(&str, SocketAddr)],
    signal: &str,
) -> (Proxy, SocketAddr) {
    let toml = format!(
        "[database]\npath = \"{}\"\n\n{}",
        dir.join(format!("{name}.db")).display(),
        listener_toml("127.0.0.1:0", routes)
    );
    let proxy = Proxy::launch(dir, name, &toml);
    // Its `listening` line: logged the moment the port is bound.
    let addr = proxy.listener("127.0.0.1:0");
    proxy.signal(signal);
    (proxy, addr)
}

/// SIGHUP's default action kills. A config-management tool that reloads
/// right after a start must find the handler already installed: it is,
/// before the first socket is bound.
#[test]
fn sighup_the_moment_the_port_is_bound_never_kills_the_process() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let backend = runtime.block_on(raw_backend(b"pong"));
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut failures = Vec::new();
    for run in 0..STARTS {
        let (mut proxy, addr) = start_and_signal_when_bound(
            dir.path(),
            &format!("hup-{run}"),
            &[("a.test", backend.addr)],
            "HUP",
        );
        // Alive, and serving: a connection is relayed end to end.
        let relayed = runtime.block_on(relay_once(addr, "a.test", b"ping"));
        if let Some(status) = proxy.child.try_wait().unwrap() {
            failures.push(format!(
                "run {run}: {}\n{}",
                describe(Some(status)),
                proxy.log_text()
            ));
            continue;
        }
        match relayed {
            Ok(reply) if reply == b"pong" => {}
            other => failures.push(format!(
                "run {run}: relay gave {other:?}\n{}",
                proxy.log_text()
            )),
        }
        proxy.signal("TERM");
        if let Some(failure) = exit_failure(&mut proxy) {
            failures.push(format!("run {run}: on SIGTERM: {failure}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {STARTS} starts went wrong after an early SIGHUP:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "{STARTS} starts with an early SIGHUP in {:?}",
        started.elapsed()
    );
}

/// Waits up to 20 s for the exit; unless it is 0, what happened and the
/// log.
fn exit_failure(proxy: &mut Proxy) -> Option<String> {
    let status = proxy.wait_exit(Duration::from_secs(20));
    if matches!(status, Some(s) if s.success()) {
        return None;
    }
    Some(format!("{}\n{}", describe(status), proxy.log_text()))
}

/// SIGTERM at the same moment: the handler is there, so the process
/// finishes starting, drains nothing and exits 0 — never the default
/// action (death by signal 15).
#[test]
fn sigterm_the_moment_the_port_is_bound_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut failures = Vec::new();
    for run in 0..STARTS {
        let (mut proxy, _) =
            start_and_signal_when_bound(dir.path(), &format!("term-{run}"), &[], "TERM");
        if let Some(failure) = exit_failure(&mut proxy) {
            failures.push(format!("run {run}: {failure}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {STARTS} starts did not exit 0 on an early SIGTERM:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "{STARTS} starts with an early SIGTERM in {:?}",
        started.elapsed()
    );
}

/// First signal: drain (a relayed connection holds it open for up to 60 s).
/// Second signal: exit at once with 128 + the signal number, after the
/// store has committed what it acknowledged and closed the DB cleanly (the
/// WAL is checkpointed into the main file and removed), and after the log
/// lines written so far reached stderr.
fn second_signal_exits_with(signal: &str, code: i32) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let backend = runtime.block_on(raw_backend(b"pong"));
    let dir = tempfile::tempdir().unwrap();
    let toml = admin_config(
        dir.path(),
        &format!(
            "{}{}",
            listener_toml("127.0.0.1:0", &[("a.test", backend.addr)]),
            proxy_section("shutdown_timeout = \"60s\"")
        ),
    );
    let mut proxy = Proxy::start(dir.path(), &toml);
    let addr = proxy.listener("127.0.0.1:0");

    // Acknowledged changes: one through the CLI, more through the API
    // while the signals arrive.
    let listener = "127.0.0.1:0".to_string();
    let (status, _, stderr) = proxy.routes_add(&listener, "cli.test", "127.0.0.1:1");
    assert_eq!(status, 0, "{stderr}");

    // A relayed connection, open: the first signal waits for it.
    let held = runtime.block_on(async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(&client_hello(Some("a.test")))
            .await
            .unwrap();
        stream
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.accepted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the backend never saw the connection"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // Admin writes keep going until the store refuses them.
    let socket = proxy.admin_socket();
    let writer = runtime.spawn(async move {
        let mut client = admin_client(&socket).await;
        let mut acked = Vec::new();
        for i in 0..100_000 {
            let hostname = format!("r{i}.test");
            let request = mc_proxy::admin::proto::AddRouteRequest {
                route: Some(mc_proxy::admin::proto::Route {
                    listener_addr: listener.clone(),
                    hostname: hostname.clone(),
                    backend: "127.0.0.1:1".to_string(),
                    send_proxy_protocol: false,
                    ..Default::default()
                }),
            };
            match client.add_route(request).await {
                Ok(_) => acked.push(hostname),
                Err(_) => break,
            }
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(300));

    proxy.signal(signal);
    proxy.wait_log(&["shutting down"], Duration::from_secs(10));
    assert!(
        proxy.wait_exit(Duration::from_millis(500)).is_none(),
        "exited on the first signal with a connection open"
    );
    let second = Instant::now();
    proxy.signal(signal);
    let status = proxy.wait_exit(Duration::from_secs(10));
    let took = second.elapsed();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(code),
        "after a second SIG{signal}: {}\n{}",
        describe(status),
        proxy.log_text()
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    drop(held);

    let acked = runtime.block_on(writer).unwrap();
    let rows: Vec<String> = db_routes(&proxy.db()).into_iter().map(|r| r.1).collect();
    assert!(rows.contains(&"cli.test".to_string()), "{rows:?}");
    let missing: Vec<&String> = acked.iter().filter(|h| !rows.contains(h)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged routes are not in the DB: {missing:?}",
        missing.len()
    );
    // Closed cleanly: SQLite checkpoints and removes the WAL on close.
    let wal = dir.path().join("mc-proxy.db-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(
        wal_len,
        0,
        "{} left behind: the DB was not closed",
        wal.display()
    );
    // The last lines reached stderr before the exit.
    assert!(
        proxy.log_text().contains("second signal: exiting at once"),
        "{}",
        proxy.log_text()
    );
    eprintln!(
        "second SIG{signal}: exit {code} in {took:?}; {} routes acknowledged, all on disk",
        acked.len() + 1
    );
}

#[test]
fn second_sigterm_exits_143_after_the_store_is_flushed() {
    second_signal_exits_with("TERM", 143);
}

#[test]
fn second_sigint_exits_130_after_the_store_is_flushed() {
    second_signal_exits_with("INT", 130);
}

/// Relayed connections made while nobody reads the proxy's stderr pipe:
/// more close lines than the pipe and the log queue hold together.
const STALLED_CONNECTIONS: usize = 6_000;
/// Connections in flight at once.
const STALLED_CONCURRENCY: usize = 8;

/// The proxy's stderr is a pipe that nobody reads. A blocking log write
/// would stall the relay after the pipe's 64 KiB (a few hundred close
/// lines); instead every connection is relayed, the lines that do not fit
/// are dropped and counted in `mc_proxy_log_lines_dropped_total`, and a
/// SIGTERM still exits 0 promptly.
#[test]
fn a_stalled_stderr_reader_costs_log_lines_never_traffic() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut backend = runtime.block_on(raw_backend(b"pong"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mc-proxy.toml");
    std::fs::write(
        &config,
        self::config(
            dir.path(),
            &format!(
                "{}{METRICS_ANY_PORT}\n[log]\nlevel = \"info\"\n",
                listener_toml("127.0.0.1:0", &[("a.test", backend.addr)])
            ),
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["server", "-c"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read up to the start line (for the bound addresses), then held open
    // and never read again.
    let mut stalled = BufReader::new(child.stderr.take().unwrap());
    let (addr, metrics) = bound_addrs_until_started(&mut stalled);

    let started = Instant::now();
    let relayed = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..STALLED_CONCURRENCY {
            tasks.spawn(async move {
                let mut done = 0;
                for i in (worker..STALLED_CONNECTIONS).step_by(STALLED_CONCURRENCY) {
                    let payload = format!("c{i}");
                    match relay_once(addr, "a.test", payload.as_bytes()).await {
                        Ok(reply) if reply == b"pong" => done += 1,
                        other => return Err(format!("connection {i}: {other:?}")),
                    }
                }
                Ok(done)
            });
        }
        let mut total = 0;
        while let Some(result) = tasks.join_next().await {
            total += result.unwrap()?;
        }
        Ok::<usize, String>(total)
    });
    let took = started.elapsed();
    let relayed = match relayed {
        Ok(n) => n,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("relaying stopped with stderr stalled: {e}");
        }
    };
    assert_eq!(relayed, STALLED_CONNECTIONS);
    // The backend got every connection's bytes: the hello, then `cN`.
    let hello = client_hello(Some("a.test"));
    let mut seen = 0;
    while let Ok(bytes) = backend.received.try_recv() {
        assert!(bytes.starts_with(&hello), "{} bytes", bytes.len());
        seen += 1;
    }
    assert_eq!(seen, STALLED_CONNECTIONS);

    let dropped = parse_metrics(&runtime.block_on(http_get(metrics, "/metrics")).2)
        .get("mc_proxy_log_lines_dropped_total")
        .copied();
    assert!(
        dropped.is_some_and(|n| n > 0.0),
        "mc_proxy_log_lines_dropped_total = {dropped:?} after {STALLED_CONNECTIONS} connections"
    );

    // Stopping does not wait forever on the stalled pipe either.
    let stop = Instant::now();
    send_signal(child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        matches!(status, Some(s) if s.success()),
        "on SIGTERM with stderr stalled: {}",
        describe(status)
    );
    drop(stalled);
    eprintln!(
        "{STALLED_CONNECTIONS} connections relayed in {took:?} with stderr stalled; \
         {dropped:?} log lines dropped; exit after SIGTERM in {:?}",
        stop.elapsed()
    );
}

/// The leaf certificate an L7 route at `addr` serves for `sni`.
async fn served_leaf(addr: SocketAddr, sni: &str, pki: &Pki) -> Vec<u8> {
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tls_connect(addr, sni, pki.client_config()),
    )
    .await
    .expect("TLS connect timed out")
    .expect("TLS connect");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

/// SIGHUP re-reads route certificates even when nothing the file watcher
/// looks at changed: a replacement of the same length written in place,
/// its mtime set back, is invisible to the poll and served after SIGHUP.
#[tokio::test]
async fn sighup_rereads_route_certificates_the_watcher_cannot_see_change() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("route CA");
    let (cert, key) = (dir.path().join("r.pem"), dir.path().join("r.key"));
    let first = pki.leaf(&["r.test"]);
    std::fs::write(&cert, &first.cert_pem).unwrap();
    std::fs::write(&key, &first.key_pem).unwrap();
    // A second leaf whose PEM files have exactly the first one's lengths.
    let second = (0..200)
        .map(|_| pki.leaf(&["r.test"]))
        .find(|l| {
            l.cert_pem.len() == first.cert_pem.len() && l.key_pem.len() == first.key_pem.len()
        })
        .expect("a same-length certificate in 200 tries");
    let toml = config(
        dir.path(),
        &format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\n  [[listeners.routes]]\n  hostname = \"r.test\"\n  \
             backend = \"127.0.0.1:9\"\n  mode = \"l7\"\n  tls_cert = \"{}\"\n  tls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let proxy = Proxy::start(dir.path(), &toml);
    let addr = proxy.addr();
    let der = |pem: &str| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    };
    assert_eq!(
        served_leaf(addr, "r.test", &pki).await,
        der(&first.cert_pem)
    );

    // Rewrite both files in place (same inode, same length), mtime restored.
    for (path, text) in [(&key, &second.key_pem), (&cert, &second.cert_pem)] {
        let modified = std::fs::metadata(path).unwrap().modified().unwrap();
        std::fs::write(path, text).unwrap();
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(modified)
            .unwrap();
    }
    // Two polls later the watcher has seen nothing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        served_leaf(addr, "r.test", &pki).await,
        der(&first.cert_pem)
    );

    proxy.signal("HUP");
    proxy.wait_log(
        &["SIGHUP: route certificates re-read"],
        Duration::from_secs(10),
    );
    assert_eq!(
        served_leaf(addr, "r.test", &pki).await,
        der(&second.cert_pem)
    );
    proxy.stop();
}
