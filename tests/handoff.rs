//! The listening-socket handoff through the real binary (SPEC §6.4): a
//! second `mc-proxy server` on the same state directory takes the running
//! one's sockets, and the first drains and exits 0; nothing is refused or
//! cut on the way. Also: the admin API on TCP with mTLS moves on its port,
//! a new config that keeps, drops and adds listeners, and PROXY-protocol
//! and L7 traffic through the switch.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::http::*;
use common::*;

/// The config of every process here: the admin socket, a metrics endpoint,
/// one listener on `127.0.0.1:0` routing `a.test` to `backend`, and a
/// drain long enough for the long relays.
fn handoff_config(dir: &Path, backend: SocketAddr) -> String {
    handoff_config_with(dir, &listener("127.0.0.1:0", &[route("a.test", backend)]))
}

/// [`handoff_config`] with `listeners` (`[[listeners]]` blocks) instead.
fn handoff_config_with(dir: &Path, listeners: &str) -> String {
    let body = format!(
        "{listeners}{}{}",
        METRICS_ANY_PORT,
        proxy_section("shutdown_timeout = \"60s\""),
    );
    admin_config(dir, &body)
}

fn assert_exit_0(proxy: &mut Proxy, what: &str) {
    let status = proxy.wait_exit(Duration::from_secs(60));
    assert!(
        matches!(status, Some(s) if s.success()),
        "{what} did not exit 0: {status:?}\n{}",
        proxy.log_text()
    );
}

/// Starts `mc-proxy server -c CONFIG` in `dir` beside the running one (off
/// the runtime: the start blocks) and waits until it has taken over (the
/// previous server said BYE).
async fn take_over(dir: &Path, config: &Path) -> Proxy {
    let (dir, config) = (dir.to_path_buf(), config.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let new = Proxy::start_existing(&dir, &config);
        new.wait_log(
            &["handoff: the previous server stopped accepting"],
            Duration::from_secs(10),
        );
        new
    })
    .await
    .unwrap()
}

/// A TLS connection to `addr` for `sni` that must reach backend `want`.
async fn reaches(addr: SocketAddr, sni: &str, pki: &Pki, want: &str) -> Result<(), String> {
    match who(addr, sni, pki).await {
        Ok(name) if name == want => Ok(()),
        Ok(other) => Err(format!("answered by {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A long relay: streams `chunks` pseudo-random chunks through the proxy
/// (one every `pause`), reading the echo at the same time; returns the
/// hashes of what was sent and what came back.
async fn long_relay(
    addr: SocketAddr,
    pki: &Pki,
    seed: u64,
    chunks: usize,
    pause: Duration,
) -> std::io::Result<(Vec<u8>, Vec<u8>, usize)> {
    let tls = tls_connect(addr, "a.test", pki.client_config()).await?;
    let (mut reader, mut writer) = tokio::io::split(tls);
    let hello = read_line(&mut reader).await?;
    assert_eq!(hello, "backend=A");
    let total = chunks * 16 * 1024;
    let echo = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        while got < total {
            let n = tokio::time::timeout(Duration::from_secs(30), reader.read(&mut buf))
                .await
                .map_err(|_| std::io::Error::other("echo stalled"))??;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            got += n;
        }
        Ok::<_, std::io::Error>((hash.finalize().to_vec(), got))
    });
    let mut sent = Sha256::new();
    let mut state = seed | 1;
    for _ in 0..chunks {
        let chunk: Vec<u8> = (0..16 * 1024)
            .map(|_| {
                // xorshift: cheap bytes that differ per relay.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        sent.update(&chunk);
        writer.write_all(&chunk).await?;
        tokio::time::sleep(pause).await;
    }
    let (received, got) = echo.await.unwrap()?;
    let _ = writer.shutdown().await;
    Ok((sent.finalize().to_vec(), received, got))
}

/// Asserts that a long relay of `chunks` chunks came back whole.
fn assert_relayed(relay: std::io::Result<(Vec<u8>, Vec<u8>, usize)>, chunks: usize) {
    let (sent, received, got) = relay.expect("a long relay failed");
    assert_eq!(got, chunks * 16 * 1024, "a long relay lost bytes");
    assert_eq!(sent, received, "a long relay's bytes differ");
}

/// New connections, one every `every`, each made by `attempt(n)` (`n`
/// counts from 0; `Err` says how it failed: a refused, reset or cut
/// connection, a wrong answer), until [`Churn::finish`].
struct Churn {
    task: tokio::task::JoinHandle<Vec<String>>,
    ok: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

fn churn<F, Fut>(every: Duration, attempt: F) -> Churn
where
    F: Fn(usize) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let ok = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok2, stop2) = (ok.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let mut tasks = Vec::new();
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0;
        while !stop2.load(Ordering::SeqCst) {
            ticker.tick().await;
            let attempt = attempt(n);
            n += 1;
            let ok = ok2.clone();
            tasks.push(tokio::spawn(async move {
                let result = attempt.await;
                if result.is_ok() {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
                result.err()
            }));
        }
        let mut errors = Vec::new();
        for task in tasks {
            if let Some(e) = task.await.unwrap() {
                errors.push(e);
            }
        }
        errors
    });
    Churn { task, ok, stop }
}

impl Churn {
    /// Connections served so far.
    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops making connections, waits for those under way; returns how
    /// many were served and the errors of those that failed.
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let errors = self.task.await.unwrap();
        (self.ok.load(Ordering::SeqCst), errors)
    }
}

/// Keeps the load on after a takeover: at least a second and until every
/// churn has served more than `served` connections in all (however slow
/// the machine), within a generous bound.
async fn keep_load_on(churns: &[&Churn], served: usize) {
    let after = tokio::time::Instant::now();
    while after.elapsed() < Duration::from_secs(1)
        || (churns.iter().any(|c| c.ok() <= served) && after.elapsed() < Duration::from_secs(60))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `text` and a newline through an echoing connection and reads it
/// back.
async fn echo_line<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    text: &str,
) {
    stream
        .write_all(format!("{text}\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_line(stream).await.unwrap(), text);
}

/// Connects to `addr` until the connection is refused (within 10 s): a
/// listening socket that nobody serves any more must be closed, not left
/// to queue connections nobody will accept.
async fn wait_refused(addr: SocketAddr, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            Ok(Err(e)) => panic!("{what}: connecting to {addr}: {e}"),
            // Accepted (by the old process, before it closed the socket),
            // or queued: ask again.
            Ok(Ok(stream)) => drop(stream),
            Err(_) => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {addr} still accepts connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (within 10 s) until `done` holds.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The under-load test's load, from `MC_PROXY_HANDOFF_LOAD=RATE,SECONDS,RELAYS`
/// (new TLS connections a second, how long in all, long relays streaming
/// throughout); by default `250,3,10`, what a debug build on two shared
/// cores keeps up with in `make test`. The bar is `500,10,20`, run
/// on a release build:
/// `MC_PROXY_HANDOFF_LOAD=500,10,20 cargo test --release --test handoff under_load -- --nocapture`.
struct Load {
    rate: u32,
    seconds: u64,
    relays: u64,
}

impl Load {
    fn from_env() -> Load {
        let text = std::env::var("MC_PROXY_HANDOFF_LOAD").unwrap_or_default();
        let parts: Vec<u64> = text
            .split(',')
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        match parts[..] {
            [rate, seconds, relays] if rate > 0 && seconds > 0 => Load {
                rate: rate as u32,
                seconds,
                relays,
            },
            _ if text.is_empty() => Load {
                rate: 250,
                seconds: 3,
                relays: 10,
            },
            _ => panic!("MC_PROXY_HANDOFF_LOAD={text:?}: want RATE,SECONDS,RELAYS"),
        }
    }

    /// Chunks per relay: one every 25 ms for the whole run, and a second more.
    fn chunks(&self) -> usize {
        (self.seconds as usize + 1) * 40
    }
}

/// `new` says it took one listener, the admin API and the metrics endpoint.
fn took_one_listener_admin_and_metrics(new: &Proxy) {
    new.wait_log(
        &[
            "handoff: took the running server's sockets",
            "listeners=1",
            "admin=true",
            "metrics=true",
        ],
        Duration::from_secs(10),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_process_takes_over_under_load_and_nothing_is_refused_or_cut() {
    let load = Load::from_env();
    let (dir, pki, backend) = tls_scene("A", &["a.test", "late.test"]).await;
    let pki = Arc::new(pki);
    let toml = handoff_config(dir.path(), backend.addr);
    let mut old = Proxy::start(dir.path(), &toml);
    let addr = old.addr();
    let metrics = old.metrics_addr();
    let handoff_sock = dir.path().join("mc-proxy.handoff.sock");
    old.wait_log(&["handoff socket listening"], Duration::from_secs(10));
    assert_eq!(file_mode(&handoff_sock) & 0o777, 0o600);

    let began = Instant::now();
    let churning = churn(Duration::from_secs(1) / load.rate, {
        let pki = pki.clone();
        move |_| {
            let pki = pki.clone();
            async move { reaches(addr, "a.test", &pki, "A").await }
        }
    });
    // Long relays, 16 KiB every 25 ms each, for the whole run.
    let chunks = load.chunks();
    let relays: Vec<_> = (0..load.relays)
        .map(|seed| {
            let pki = pki.clone();
            tokio::spawn(async move {
                long_relay(addr, &pki, seed + 1, chunks, Duration::from_millis(25)).await
            })
        })
        .collect();
    // The handoff halfway (at least 800 ms in).
    tokio::time::sleep(Duration::from_millis((load.seconds * 500).max(800))).await;

    let started = Instant::now();
    let new = take_over(dir.path(), &old.config).await;
    let took = started.elapsed();
    old.wait_log(
        &["handoff: the new process is serving; stopping"],
        Duration::from_secs(10),
    );
    took_one_listener_admin_and_metrics(&new);
    // The very same sockets.
    assert_eq!(new.addr(), addr);
    assert_eq!(new.metrics_addr(), metrics);
    let line = new.wait_log(
        &[" listening ", " listener=127.0.0.1:0 "],
        Duration::from_secs(5),
    );
    assert!(line.contains("inherited=true"), "{line}");
    // The old process stops its admin API at once and leaves the socket file.
    old.wait_log(&["admin API stopped"], Duration::from_secs(10));

    keep_load_on(&[&churning], 200).await;
    while began.elapsed() < Duration::from_secs(load.seconds) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let loaded = began.elapsed();
    let (ok, errors) = churning.finish().await;
    let relayed = relays.len();
    for relay in relays {
        assert_relayed(relay.await.unwrap(), chunks);
    }
    let failed = errors.len();
    eprintln!(
        "handoff under load: {ok} TLS connections in {:.1} s ({:.0}/s, asked {}/s), {failed} failed; {relayed} relays of {} KiB intact; the new process took over in {took:?}",
        loaded.as_secs_f64(),
        ok as f64 / loaded.as_secs_f64(),
        load.rate,
        chunks * 16,
    );
    assert!(errors.is_empty(), "{failed} failed connections: {errors:?}");
    assert!(ok > 200, "only {ok} connections in the run");

    assert_exit_0(&mut old, "the old process");
    let text = old.log_text();
    assert!(text.contains("signal=\"handoff\""), "{text}");
    // The admin socket is the new process's now: a change lands there.
    assert!(new.admin_socket().exists());
    let (code, out, err) = new.routes_add("127.0.0.1:0", "late.test", &backend.addr.to_string());
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(who(addr, "late.test", &pki).await.unwrap(), "A");
    // The metrics endpoint answers from the new process (the old is gone).
    assert!(!scrape(metrics).await.is_empty());
    assert!(handoff_sock.exists());
    new.stop();
    assert!(
        !handoff_sock.exists(),
        "the handoff socket outlived the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_fails_to_start_leaves_the_old_one_serving() {
    let (dir, pki, backend) = tls_scene("A", &["a.test"]).await;
    let toml = handoff_config(dir.path(), backend.addr);
    let mut old = Proxy::start(dir.path(), &toml);
    let addr = old.addr();
    old.wait_log(&["handoff socket listening"], Duration::from_secs(10));

    // Same state directory, but a database that cannot be opened (a
    // directory): the start fails after the sockets were handed over.
    let broken_db = dir.path().join("not-a-db");
    std::fs::create_dir(&broken_db).unwrap();
    let broken = toml.replace(
        &dir.path().join("mc-proxy.db").display().to_string(),
        &broken_db.display().to_string(),
    );
    let broken_path = dir.path().join("broken.toml");
    std::fs::write(&broken_path, &broken).unwrap();
    let (code, _, err) = run_cli(&["server", "-c", broken_path.to_str().unwrap()]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("database.path"), "{err}");
    old.wait_log(
        &["handoff: the new process did not take over; still serving"],
        Duration::from_secs(10),
    );
    // Untouched: it serves, its admin API answers.
    assert_eq!(who(addr, "a.test", &pki).await.unwrap(), "A");
    let (code, out, err) = old.cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(old.child.try_wait().unwrap().is_none());

    // And it can still hand over to a good one.
    let mut new = take_over(dir.path(), &old.config).await;
    assert_exit_0(&mut old, "the old process");
    assert_eq!(who(addr, "a.test", &pki).await.unwrap(), "A");
    new.signal("TERM");
    assert_exit_0(&mut new, "the new process");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handoffs_in_a_row() {
    let (dir, pki, backend) = tls_scene("A", &["a.test"]).await;
    let toml = handoff_config(dir.path(), backend.addr);
    let first = Proxy::start(dir.path(), &toml);
    let addr = first.addr();
    first.wait_log(&["handoff socket listening"], Duration::from_secs(10));
    let config = first.config.clone();

    let mut previous = first;
    for round in 0..2 {
        let mut next = take_over(dir.path(), &config).await;
        next.wait_log(&["handoff socket listening"], Duration::from_secs(10));
        assert_exit_0(&mut previous, &format!("process {round}"));
        assert_eq!(next.addr(), addr);
        assert_eq!(who(addr, "a.test", &pki).await.unwrap(), "A");
        std::mem::swap(&mut previous, &mut next);
        drop(next);
    }
    previous.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_on_tcp_with_mtls_is_handed_over_on_the_same_port() {
    let (dir, pki, backend) = tls_scene("A", &["a.test", "before.test", "late.test"]).await;
    let d = dir.path();
    let admin_pki = Pki::new("admin CA");
    let ca = admin_pki.write_ca(d, "admin-ca");
    let (server_cert, server_key) = admin_pki.leaf(&["127.0.0.1"]).write(d, "admin-server");
    let (client_cert, client_key) = admin_pki.leaf(&["admin-cli"]).write(d, "admin-client");
    // The admin API on an ephemeral loopback port, TLS 1.3 with client
    // certificates required.
    let grpc = format!(
        "[grpc]\naddr = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\n\n",
        server_cert.display(),
        server_key.display(),
        ca.display(),
    );
    let body = format!(
        "{grpc}{}{}",
        listener("127.0.0.1:0", &[route("a.test", backend.addr)]),
        proxy_section("shutdown_timeout = \"60s\""),
    );
    let mut old = Proxy::start(d, &config(d, &body));
    let addr = old.addr();
    let admin = old.admin_tcp_addr().to_string();
    old.wait_log(&["handoff socket listening"], Duration::from_secs(10));
    let tls_flags = [
        "--addr".to_string(),
        admin.clone(),
        "--ca-cert".into(),
        ca.display().to_string(),
        "--client-cert".into(),
        client_cert.display().to_string(),
        "--client-key".into(),
        client_key.display().to_string(),
    ];
    let backend_text = backend.addr.to_string();
    let add_route = |proxy: &Proxy, hostname: &str| {
        let mut args = routes_add_args("127.0.0.1:0", hostname, &backend_text);
        args.extend(tls_flags.iter().map(String::as_str));
        proxy.cli(&args)
    };

    // The old process answers over mTLS.
    let (code, out, err) = add_route(&old, "before.test");
    assert_eq!((code, out.as_str()), (0, "created\n"), "{err}");
    assert_eq!(who(addr, "before.test", &pki).await.unwrap(), "A");

    let new = take_over(d, &old.config).await;
    new.wait_log(
        &[
            "handoff: took the running server's sockets",
            "listeners=1",
            "admin=true",
        ],
        Duration::from_secs(10),
    );
    // The very same admin socket.
    let line = new.wait_log(&["admin API listening (TLS 1.3)"], Duration::from_secs(5));
    assert!(line.contains("inherited=true"), "{line}");
    assert_eq!(new.admin_tcp_addr().to_string(), admin);
    old.wait_log(&["admin API stopped"], Duration::from_secs(10));

    // After the handoff the same port and certificates reach the new
    // process: the change is applied (and logged) there.
    let (code, out, err) = add_route(&new, "late.test");
    assert_eq!((code, out.as_str()), (0, "created\n"), "{err}");
    new.wait_log(
        &["admin:", "method=\"AddRoute\"", "late.test"],
        Duration::from_secs(5),
    );
    assert_exit_0(&mut old, "the old process");
    let text = old.log_text();
    assert!(text.contains("signal=\"handoff\""), "{text}");
    assert!(!text.contains("late.test"), "{text}");
    assert_eq!(who(addr, "late.test", &pki).await.unwrap(), "A");
    assert_eq!(who(addr, "before.test", &pki).await.unwrap(), "A");
    let (code, out, err) = new.cli(
        &[
            &["status"][..],
            &tls_flags.iter().map(String::as_str).collect::<Vec<_>>(),
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}{err}");

    // A config that names the port the admin API was given (not `:0`)
    // takes the same socket: matched by its bound address.
    let pinned = d.join("pinned.toml");
    std::fs::write(
        &pinned,
        std::fs::read_to_string(&new.config).unwrap().replace(
            "addr = \"127.0.0.1:0\"\ntls_cert",
            &format!("addr = \"{admin}\"\ntls_cert"),
        ),
    )
    .unwrap();
    assert!(std::fs::read_to_string(&pinned).unwrap().contains(&admin));
    let mut new = new;
    let third = take_over(d, &pinned).await;
    third.wait_log(
        &["handoff: took the running server's sockets", "admin=true"],
        Duration::from_secs(10),
    );
    assert_exit_0(&mut new, "the second process");
    let (code, out, err) = third.cli(
        &[
            &["status"][..],
            &tls_flags.iter().map(String::as_str).collect::<Vec<_>>(),
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}{err}");
    third.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_config_keeps_one_listener_drops_one_and_adds_one() {
    let (dir, pki, backend) = tls_scene("A", &["a.test"]).await;
    let pki = Arc::new(pki);
    let d = dir.path();
    // Three ephemeral listeners, told apart by their loopback address.
    let (l1, l2, l3) = ("127.0.0.1:0", "127.0.0.2:0", "127.0.0.3:0");
    let routes = [route("a.test", backend.addr)];
    let two = |a: &str, b: &str| format!("{}{}", listener(a, &routes), listener(b, &routes));
    let mut old = Proxy::start(d, &handoff_config_with(d, &two(l1, l2)));
    let (addr1, addr2) = (old.listener(l1), old.listener(l2));
    old.wait_log(&["handoff socket listening"], Duration::from_secs(10));

    // On L2 before the handoff: a long relay (80 chunks over ~2 s) and a
    // connection held open by the test.
    let relay = tokio::spawn({
        let pki = pki.clone();
        async move { long_relay(addr2, &pki, 7, 80, Duration::from_millis(25)).await }
    });
    let mut held = tls_connect(addr2, "a.test", pki.client_config())
        .await
        .unwrap();
    assert_eq!(read_line(&mut held).await.unwrap(), "backend=A");
    echo_line(&mut held, "before the handoff").await;
    wait_until("both connections reach the backend", || {
        backend.accepted.load(Ordering::SeqCst) >= 2
    })
    .await;

    let new_config = d.join("new.toml");
    std::fs::write(&new_config, handoff_config_with(d, &two(l1, l3))).unwrap();
    let new = take_over(d, &new_config).await;
    took_one_listener_admin_and_metrics(&new);
    let closed = new.wait_log(
        &["handoff: a socket the config no longer names was closed"],
        Duration::from_secs(5),
    );
    assert!(closed.contains(&format!("listener {addr2}")), "{closed}");
    // L1: the very same socket; L3: bound fresh.
    let line = new.wait_log(
        &[" listening ", " listener=127.0.0.1:0 "],
        Duration::from_secs(5),
    );
    assert!(line.contains("inherited=true"), "{line}");
    assert_eq!(new.listener(l1), addr1);
    let line = new.wait_log(
        &[" listening ", " listener=127.0.0.3:0 "],
        Duration::from_secs(5),
    );
    assert!(line.contains("inherited=false"), "{line}");
    let addr3 = new.listener(l3);
    assert_eq!(who(addr1, "a.test", &pki).await.unwrap(), "A");
    assert_eq!(who(addr3, "a.test", &pki).await.unwrap(), "A");

    // L2: closed to new connections while the old process still drains
    // what it accepted there.
    old.wait_log(
        &[
            "shutting down: listeners closed, draining",
            "signal=\"handoff\"",
        ],
        Duration::from_secs(10),
    );
    wait_refused(addr2, "L2 after the handoff").await;
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old process exited with a connection open:\n{}",
        old.log_text()
    );
    echo_line(&mut held, "after the handoff").await;
    held.shutdown().await.unwrap();
    drop(held);
    assert_relayed(relay.await.unwrap(), 80);
    assert_exit_0(&mut old, "the old process");
    old.wait_conns(
        &["listener=127.0.0.2:0", "outcome=relayed"],
        2,
        Duration::from_secs(5),
    );
    let refused = TcpStream::connect(addr2).await.unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    assert_eq!(who(addr1, "a.test", &pki).await.unwrap(), "A");
    assert_eq!(who(addr3, "a.test", &pki).await.unwrap(), "A");
    new.stop();
}

/// A connection through a PROXY header from `client` (v1), TLS for
/// `a.test`: must reach backend A.
async fn l4_from(addr: SocketAddr, pki: &Pki, client: SocketAddr) -> Result<(), String> {
    let header = format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        client.ip(),
        addr.ip(),
        client.port(),
        addr.port()
    );
    let attempt = async {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(header.as_bytes()).await?;
        let mut tls = tls_over(tcp, "a.test", pki.client_config()).await?;
        read_line(&mut tls).await
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(line)) if line == "backend=A" => Ok(()),
        Ok(Ok(line)) => Err(format!("l4 from {client}: answered {line:?}")),
        Ok(Err(e)) => Err(format!("l4 from {client}: {e}")),
        Err(_) => Err(format!("l4 from {client}: timed out")),
    }
}

/// An L7 connection to the route `web.test` through a PROXY v2 header
/// from `client`: TLS done, no request sent yet.
async fn l7_connect(addr: SocketAddr, pki: &Pki, client: SocketAddr) -> Result<L7Client, String> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut header = Vec::new();
    wire::proxy_protocol::encode_v2(client, addr, &mut header);
    tcp.write_all(&header)
        .await
        .map_err(|e| format!("PROXY header: {e}"))?;
    L7Client::over(tcp, "web.test", pki, false).await
}

/// `GET /echo` on `l7` (made by [`l7_connect`] for `client`): must be a
/// 200 from backend W, which sees `client` in X-Forwarded-For.
async fn l7_echo(l7: &mut L7Client, client: SocketAddr) -> Result<(), String> {
    let answer = l7
        .send(request("GET", "web.test", "/echo", true, Bytes::new()))
        .await
        .map_err(|e| format!("request: {e}"))?;
    let field = |key: &str| {
        answer
            .body
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    let seen = (
        answer.status.as_u16(),
        field("backend"),
        field("x-forwarded-for"),
    );
    if seen == (200, Some("W".into()), Some(client.ip().to_string())) {
        Ok(())
    } else {
        Err(format!("answered {answer:?}"))
    }
}

/// [`l7_connect`] then [`l7_echo`], within 10 s.
async fn l7_from(addr: SocketAddr, pki: &Pki, client: SocketAddr) -> Result<(), String> {
    let attempt = async {
        let mut l7 = l7_connect(addr, pki, client).await?;
        l7_echo(&mut l7, client).await
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("l7 from {client}: {e}")),
        Err(_) => Err(format!("l7 from {client}: timed out")),
    }
}

/// The log lines of `proxies` about the clients that `errors` name (each
/// error starts `l4 from CLIENT:` or `l7 from CLIENT:`).
fn log_lines_about(errors: &[String], proxies: &[&Proxy]) -> Vec<String> {
    let mut lines = Vec::new();
    for error in errors {
        let Some(client) = error.split_whitespace().nth(2) else {
            continue;
        };
        let needle = format!("client={} ", client.trim_end_matches(':'));
        for proxy in proxies {
            let text = proxy.log_text();
            lines.extend(
                text.lines()
                    .filter(|l| l.contains(&needle))
                    .map(str::to_string),
            );
        }
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_under_traffic_on_a_proxy_protocol_listener_with_an_l7_route() {
    let (dir, pki, backend) = tls_scene("A", &["a.test"]).await;
    let pki = Arc::new(pki);
    let d = dir.path();
    let web = http_backend("W").await;
    let leaf = pki.leaf(&["web.test"]);
    let (cert, key) = (d.join("web.pem"), d.join("web.key"));
    std::fs::write(&cert, leaf.cert_pem.clone() + &pki.ca_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    // One listener behind an upstream proxy: an L4 route and an L7 route.
    let routes = [
        route("a.test", backend.addr),
        common::peers::l7_route("web.test", web, &cert, &key, ""),
    ];
    let toml = handoff_config_with(d, &proxy_protocol_listener("127.0.0.1:0", &routes));
    let mut old = Proxy::start(d, &toml);
    let addr = old.addr();
    old.wait_log(&["handoff socket listening"], Duration::from_secs(10));
    // Each connection from a client address of its own, carried in the
    // PROXY header: L4 ~100 a second (v1), L7 ~50 a second (v2).
    let l4 = churn(Duration::from_millis(10), {
        let pki = pki.clone();
        move |n| {
            let pki = pki.clone();
            let client = SocketAddr::from(([198, 51, 100, 1 + (n % 250) as u8], 20000 + n as u16));
            async move { l4_from(addr, &pki, client).await }
        }
    });
    let l7 = churn(Duration::from_millis(20), {
        let pki = pki.clone();
        move |n| {
            let pki = pki.clone();
            let client = SocketAddr::from(([203, 0, 113, 1 + (n % 250) as u8], 30000 + n as u16));
            async move { l7_from(addr, &pki, client).await }
        }
    });
    wait_until("traffic on both routes before the handoff", || {
        l4.ok() >= 20 && l7.ok() >= 10
    })
    .await;
    // An L7 connection the old process accepted, whose first request
    // comes only once that process drains.
    let held_client: SocketAddr = "192.0.2.99:4949".parse().unwrap();
    let mut held = l7_connect(addr, &pki, held_client).await.unwrap();

    let new = take_over(d, &old.config).await;
    new.wait_log(
        &["handoff: took the running server's sockets", "listeners=1"],
        Duration::from_secs(10),
    );
    let line = new.wait_log(
        &[" listening ", " listener=127.0.0.1:0 "],
        Duration::from_secs(5),
    );
    assert!(line.contains("inherited=true"), "{line}");
    assert_eq!(new.addr(), addr);
    old.wait_log(
        &[
            "shutting down: listeners closed, draining",
            "signal=\"handoff\"",
        ],
        Duration::from_secs(10),
    );
    let held = tokio::time::timeout(Duration::from_secs(10), l7_echo(&mut held, held_client))
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
        .map_err(|e| {
            format!(
                "l7 from {held_client}: {e} (its first request sent while the old process drains)"
            )
        });
    keep_load_on(&[&l4, &l7], 100).await;
    let (l4_ok, l4_errors) = l4.finish().await;
    let (l7_ok, l7_errors) = l7.finish().await;
    eprintln!("handoff with PROXY headers: l4 {l4_ok} served, l7 {l7_ok} served");
    assert_exit_0(&mut old, "the old process");
    let text = old.log_text();
    assert!(text.contains("signal=\"handoff\""), "{text}");

    // Only the new process serves now: it still takes the client from the
    // PROXY header (its close line names it) and its L7 route answers 200
    // with the header's client in X-Forwarded-For.
    let client: SocketAddr = "192.0.2.77:4242".parse().unwrap();
    l4_from(addr, &pki, client).await.unwrap();
    new.wait_conns(
        &["client=192.0.2.77:4242 ", "outcome=relayed", "sni=a.test"],
        1,
        Duration::from_secs(5),
    );
    l7_from(addr, &pki, "192.0.2.88:4343".parse().unwrap())
        .await
        .unwrap();

    // Nothing failed on the way: no connection of the churns, and not the
    // held one.
    let failures: Vec<String> = l4_errors
        .into_iter()
        .chain(l7_errors)
        .chain(held.err())
        .collect();
    let lines = log_lines_about(&failures, &[&old, &new]);
    assert!(
        failures.is_empty(),
        "{} connections failed ({l4_ok} L4 and {l7_ok} L7 served): {failures:#?}\nthe servers' lines about them:\n{}",
        failures.len(),
        lines.join("\n")
    );
    new.stop();
}

/// A UDP backend that answers each datagram with `name` and the
/// datagram's first 8 bytes (not a long header: the proxy learns no CID);
/// records where each came from.
async fn udp_echo(name: &'static str) -> (SocketAddr, Arc<std::sync::Mutex<Vec<SocketAddr>>>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let sources: Arc<std::sync::Mutex<Vec<SocketAddr>>> = Arc::default();
    let seen = sources.clone();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65_535];
        while let Ok((n, from)) = socket.recv_from(&mut buffer).await {
            seen.lock().unwrap().push(from);
            let mut reply = name.as_bytes().to_vec();
            reply.extend_from_slice(&buffer[..n.min(8)]);
            let _ = socket.send_to(&reply, from).await;
        }
    });
    (addr, sources)
}

/// A client Initial for `sni` with DCID `[dcid; 8]`.
fn initial(sni: &str, dcid: u8) -> Vec<u8> {
    wire::quic::build::Client::new(wire::quic::Version::V1, &[dcid; 8], &[7; 4])
        .datagram(&hello_message(Some(sni), 0))
}

/// Sends `datagram` from `client` to `addr` until a reply comes (at most
/// 20 tries, 250 ms apart): the first reply.
async fn exchange(
    client: &tokio::net::UdpSocket,
    addr: SocketAddr,
    datagram: &[u8],
) -> Result<Vec<u8>, String> {
    let mut reply = vec![0u8; 2048];
    for _ in 0..20 {
        client
            .send_to(datagram, addr)
            .await
            .map_err(|e| e.to_string())?;
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(250), client.recv(&mut reply)).await
        {
            reply.truncate(n);
            return Ok(reply);
        }
    }
    Err(format!("no reply from {addr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_listeners_socket_and_its_open_flows_are_carried_over() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, sources) = udp_echo("Q:").await;
    let toml = handoff_config_with(
        dir.path(),
        &format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\nquic = true\n{}\n",
            route("q.test", backend)
        ),
    )
    // Flows end 3 s after their last datagram (the drain waits for them).
    .replace(
        "shutdown_timeout = \"60s\"",
        "shutdown_timeout = \"60s\"\nidle_timeout = \"3s\"",
    );
    let mut old = Proxy::start(dir.path(), &toml);
    let addr = old.addr();
    old.wait_log(&["handoff socket listening"], Duration::from_secs(10));
    assert!(old.log_text().contains("quic=true"), "{}", old.log_text());
    // A flow through the old process.
    let carried = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let reply = exchange(&carried, addr, &initial("q.test", 1))
        .await
        .unwrap();
    assert_eq!(&reply[..2], b"Q:");
    let flow_source = sources.lock().unwrap()[0];

    let mut new = take_over(dir.path(), &old.config).await;
    new.wait_log(&["quic=1"], Duration::from_secs(10));
    new.wait_log(
        &["handoff: QUIC flows taken over", "flows=1", "closed=0"],
        Duration::from_secs(10),
    );
    assert_exit_0(&mut old, "the old process");
    assert!(
        old.log_text().contains("handoff: QUIC flows handed over"),
        "{}",
        old.log_text()
    );
    // The same flow goes on through the new process: a short-header
    // datagram reaches the backend from the flow's own socket (the same
    // source port as before) and the reply comes back.
    let short = [0x40u8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    let reply = exchange(&carried, addr, &short).await.unwrap();
    assert_eq!(reply, [&b"Q:"[..], &short[..8]].concat());
    assert_eq!(sources.lock().unwrap().last(), Some(&flow_source));

    // New flows: served by the new process on the same port.
    let fresh = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let reply = exchange(&fresh, addr, &initial("q.test", 2)).await.unwrap();
    assert_eq!(&reply[2..], &initial("q.test", 2)[..8]);
    let listening = new.wait_log(
        &["listening", "inherited=true", "quic=true"],
        Duration::from_secs(5),
    );
    assert!(listening.contains("inherited=true"), "{listening}");
    // The carried flow ends in the new process, with the bytes of its
    // whole life.
    new.signal("TERM");
    assert_exit_0(&mut new, "the new process");
    let line = new
        .log_text()
        .lines()
        .find(|l| {
            l.contains("flow closed")
                && l.contains(&format!("client={}", carried.local_addr().unwrap()))
        })
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no line for the carried flow:\n{}", new.log_text()));
    assert!(line.contains("up=1211"), "{line}");
    assert!(line.contains("sni=q.test"), "{line}");
}
