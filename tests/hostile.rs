//! Hostile input, overload and faults on loopback: the descriptor limit,
//! connect/reset floods and stalled hellos, backends that reset or never
//! read, a GeoIP file that disappears (the real binary: its descriptors,
//! CPU, RSS, log and SIGHUP are what is measured), and a DB that stops
//! taking writes and abuse of the admin API (the server in-process: what
//! counts there is what the admin client and the DB file see). Each test
//! states what it measures and asserts what a client, a backend or the DB
//! file sees.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mc_proxy::admin::client;
use mc_proxy::admin::proto::proxy_admin_service_client::ProxyAdminServiceClient;
use mc_proxy::admin::proto::{self, FirewallRuleType};
use mc_proxy::config::{AdminAddr, ClientTls};
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tonic::transport::Channel;
use tonic::Code;

// ---- harness ----------------------------------------------------------------

/// The listener of [`Setup`]: port 0, the kernel picks (read back with
/// `Proxy::listener`).
const LISTENER: &str = "127.0.0.1:0";

/// A config with one listener on an ephemeral loopback port, the admin API on a
/// unix socket in `dir`, and `extra` appended (routes, [proxy], [firewall]).
struct Setup {
    socket: PathBuf,
    db: PathBuf,
}

impl Setup {
    fn new(dir: &Path) -> Setup {
        Setup {
            socket: dir.join("admin.sock"),
            db: dir.join("db").join("mc-proxy.db"),
        }
    }

    fn toml(&self, routes: &[(&str, SocketAddr)], extra: &str) -> String {
        let mut toml = format!(
            "[database]\npath = \"{}\"\n[grpc]\naddr = \"unix:{}\"\n[[listeners]]\naddr = \"{}\"\n",
            self.db.display(),
            self.socket.display(),
            LISTENER
        );
        for (host, backend) in routes {
            toml.push_str(&format!(
                "  [[listeners.routes]]\n  hostname = \"{host}\"\n  backend = \"{backend}\"\n"
            ));
        }
        toml.push_str(extra);
        toml
    }

    fn admin_addr(&self) -> AdminAddr {
        AdminAddr::Unix(self.socket.clone())
    }

    async fn admin(&self) -> ProxyAdminServiceClient<Channel> {
        client::connect(&self.admin_addr(), &ClientTls::default())
            .await
            .expect("admin API reachable")
    }

    /// (listener, hostname, backend) of every route row in the DB file.
    fn db_routes(&self) -> BTreeSet<(String, String, String)> {
        db_routes(&self.db).into_iter().collect()
    }
}

fn add(listener: &str, hostname: &str, backend: &str) -> proto::AddRouteRequest {
    add_route(listener, hostname, backend)
}

async fn routes_listed(
    admin: &mut ProxyAdminServiceClient<Channel>,
) -> BTreeSet<(String, String, String)> {
    list_routes(admin).await.into_iter().collect()
}

fn assert_alive(proxy: &mut Proxy) {
    if let Ok(Some(status)) = proxy.child.try_wait() {
        panic!("mc-proxy exited with {status}:\n{}", proxy.log_text());
    }
}

/// CPU time `pid` used over `window`.
fn cpu_over(pid: u32, window: Duration) -> Duration {
    let before = proc_cpu(pid);
    std::thread::sleep(window);
    proc_cpu(pid).saturating_sub(before)
}

/// Asserts that process `pid` uses under 600 ms of CPU in 3 s: at the
/// descriptor limit, `what` backs off instead of spinning a core.
async fn assert_no_spin(pid: u32, what: &str) {
    let window = Duration::from_secs(3);
    let used = tokio::task::spawn_blocking(move || cpu_over(pid, window))
        .await
        .unwrap();
    eprintln!("{what} at the fd limit: {used:?} CPU in {window:?}");
    assert!(
        used < Duration::from_millis(600),
        "{what} spins at the fd limit: {used:?} CPU in {window:?}"
    );
}

/// Connections that have been accepted and are now held by the proxy,
/// counted from the listener's side: GetStatus `active_connections`.
async fn active(admin: &mut ProxyAdminServiceClient<Channel>) -> i64 {
    admin
        .get_status(proto::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .active_connections
}

/// Opens `n` TCP connections to `addr` at once and keeps them open; the
/// kernel completes the handshake for the ones the proxy has not accepted.
async fn hold_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        tasks.spawn(async move {
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await
        });
    }
    let mut held = Vec::with_capacity(n);
    while let Some(result) = tasks.join_next().await {
        if let Ok(Ok(Ok(stream))) = result {
            held.push(stream);
        }
    }
    held
}

// ---- overload -----------------------------------------------------------------

/// 1,000 clients against a proxy limited to 256 descriptors: while at the
/// limit, its accept loop backs off (CPU stays low instead of a core
/// spinning on EMFILE), it never dies, and once the clients leave a new
/// client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_the_fd_limit_the_accept_loop_backs_off_and_serves_again_when_freed() {
    ensure_own_nofile(8192);
    let (dir, pki, backend) = tls_scene("B", &["ok.test"]).await;
    let setup = Setup::new(dir.path());
    let toml = setup.toml(
        &[("ok.test", backend.addr)],
        "[proxy]\nhandshake_timeout = \"60s\"\n",
    );
    let mut proxy = Proxy::start(dir.path(), &toml);
    let listen = proxy.listener(LISTENER);
    let pid = proxy.pid();
    assert_eq!(who(listen, "ok.test", &pki).await.unwrap(), "B");
    set_nofile(pid, 256);

    let held = hold_connections(listen, 1000).await;
    assert!(held.len() >= 990, "only {} of 1000 connected", held.len());
    // Wait until the proxy is at the limit: it logs the failed accept.
    proxy.wait_log(&["accept failed; backing off"], Duration::from_secs(20));
    let fds = proc_fds(pid);
    assert!(fds >= 250, "at the limit the proxy holds {fds} descriptors");

    // At the limit, with ~750 connections still queued: no busy spin.
    assert_no_spin(pid, &format!("accept loop ({fds} fds)")).await;
    assert_alive(&mut proxy);

    // Free the descriptors: every held client leaves. The good client
    // retries, as a real one would (the retries are the measurement: how
    // long until it is served); the proxy first works through the ~750
    // closed connections still queued.
    drop(held);
    let started = Instant::now();
    let served = loop {
        match who(listen, "ok.test", &pki).await {
            Ok(name) => break name,
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                eprintln!("not served yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!(
                "not served after the clients left: {e}\n{}",
                proxy.log_text()
            ),
        }
    };
    assert_eq!(served, "B");
    eprintln!(
        "served again {:?} after the clients left",
        started.elapsed()
    );
    assert_alive(&mut proxy);
}

/// Regression: the admin API's unix-socket accept loop handed accept
/// errors to tonic, which retries at once, so at the descriptor limit
/// (EMFILE) it spun a core. Now it backs off like the proxy listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_unix_accept_loop_backs_off_at_the_fd_limit() {
    ensure_own_nofile(8192);
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path());
    let mut proxy = Proxy::start(
        dir.path(),
        &setup.toml(&[], "[proxy]\nhandshake_timeout = \"60s\"\n"),
    );
    let listen = proxy.listener(LISTENER);
    let pid = proxy.pid();
    set_nofile(pid, 128);
    // Use up the descriptors with proxy clients, then knock on the admin
    // socket: its accept fails with EMFILE while the client waits queued.
    let held = hold_connections(listen, 300).await;
    proxy.wait_log(&["accept failed; backing off"], Duration::from_secs(20));
    let mut knocking = Vec::new();
    for _ in 0..5 {
        knocking.push(UnixStream::connect(&setup.socket).await.unwrap());
    }
    // Measure without waiting for a log line: before the fix the failed
    // accept was only logged at trace level while a core spun.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_no_spin(pid, "admin accept loop").await;
    assert!(
        proxy
            .log_text()
            .contains("admin API accept failed; backing off"),
        "the admin accept never hit the limit:\n{}",
        proxy.log_text()
    );
    assert_alive(&mut proxy);

    drop(held);
    drop(knocking);
    // An admin client retries until served, as the CLI's user would: the
    // server first works through what is queued, in its accept back-off.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(5), async {
            let mut admin = client::connect(&setup.admin_addr(), &ClientTls::default())
                .await
                .map_err(|e| e.to_string())?;
            admin
                .get_status(proto::GetStatusRequest {})
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        match attempt {
            Ok(Ok(_)) => break,
            other if Instant::now() > deadline => {
                panic!(
                    "admin API not serving after the limit: {other:?}\n{}",
                    proxy.log_text()
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    assert_alive(&mut proxy);
}

/// 5,000 connections that connect and reset at once, and 2,000 that send
/// part of a hello and stall: a good client is still served within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_reset_flood_and_stalled_hellos_leave_a_good_client_served_within_1s() {
    ensure_own_nofile(8192);
    let (dir, pki, backend) = tls_scene("B", &["ok.test"]).await;
    let setup = Setup::new(dir.path());
    let mut proxy = Proxy::start(
        dir.path(),
        &setup.toml(
            &[("ok.test", backend.addr)],
            "[proxy]\nhandshake_timeout = \"60s\"\n",
        ),
    );
    let listen = proxy.listener(LISTENER);
    // Room for the 2,000 stalls (the packaged systemd unit allows 65536).
    raise_nofile(proxy.pid(), 8192);

    // 2,000 stalls: a record header and half a hello, then nothing.
    let partial = client_hello(Some("ok.test"));
    let partial = Arc::new(partial[..partial.len() / 2].to_vec());
    let mut stalls = tokio::task::JoinSet::new();
    for _ in 0..2000 {
        let partial = partial.clone();
        stalls.spawn(async move {
            let mut stream = TcpStream::connect(listen).await?;
            stream.write_all(&partial).await?;
            Ok::<_, std::io::Error>(stream)
        });
    }
    let mut stalled = Vec::new();
    while let Some(result) = stalls.join_next().await {
        stalled.push(result.unwrap().expect("stalled client connects"));
    }

    // 5,000 connect-and-reset, 500 at a time in flight.
    let resets = Arc::new(AtomicUsize::new(0));
    let flood = {
        let resets = resets.clone();
        tokio::spawn(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(500));
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..5000 {
                let permit = sem.clone().acquire_owned().await.unwrap();
                let resets = resets.clone();
                tasks.spawn(async move {
                    if let Ok(stream) = TcpStream::connect(listen).await {
                        let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        drop(stream);
                        resets.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(permit);
                });
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    // A good client in the middle of the flood, and one right after it
    // (the pause is the point: it puts the first one mid-flood).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let name = who(listen, "ok.test", &pki).await.unwrap();
    let during = started.elapsed();
    flood.await.unwrap();
    let started = Instant::now();
    let name_after = who(listen, "ok.test", &pki).await.unwrap();
    let after = started.elapsed();
    eprintln!(
        "good client with {} stalls held: {during:?} during the reset flood, {after:?} after {} resets",
        stalled.len(),
        resets.load(Ordering::Relaxed)
    );
    assert_eq!((name.as_str(), name_after.as_str()), ("B", "B"));
    assert_eq!(resets.load(Ordering::Relaxed), 5000);
    assert!(
        during < Duration::from_secs(1),
        "good client took {during:?} during the flood"
    );
    assert!(
        after < Duration::from_secs(1),
        "good client took {after:?} after the flood"
    );

    // The stalls are still held by the proxy (not dropped to make room),
    // and it is alive.
    let mut admin = setup.admin().await;
    let held = active(&mut admin).await;
    assert!(
        held >= 2000,
        "proxy holds {held} connections, expected the 2000 stalls"
    );
    assert_alive(&mut proxy);
    drop(stalled);
}

// ---- faults -------------------------------------------------------------------

/// A backend that sends 100 kB and then resets: the client receives those
/// bytes, then a reset (not a clean FIN), and the counters say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_mid_stream_resets_the_client_and_counts_the_bytes() {
    const SENT: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let hello = client_hello(Some("reset.test"));
    let hello_len = hello.len();
    let backend = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut got = vec![0u8; hello_len];
        stream.read_exact(&mut got).await.unwrap();
        stream.write_all(&vec![7u8; SENT]).await.unwrap();
        // Let the bytes reach the proxy before the reset (nothing tells a
        // backend that the proxy has read them; the pause is the point).
        tokio::time::sleep(Duration::from_millis(300)).await;
        SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(stream);
        got
    });
    let setup = Setup::new(dir.path());
    let proxy = Proxy::start(dir.path(), &setup.toml(&[("reset.test", backend_addr)], ""));
    let listen = proxy.listener(LISTENER);
    let mut admin = setup.admin().await;
    let total_before = admin
        .get_status(proto::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .total_connections;

    let mut client = TcpStream::connect(listen).await.unwrap();
    client.write_all(&hello).await.unwrap();
    let (bytes, end) = read_all(&mut client, Duration::from_secs(10)).await;
    assert_eq!(
        backend.await.unwrap(),
        hello,
        "backend got the hello intact"
    );
    assert_eq!(bytes.len(), SENT);
    assert!(saw_reset(&end), "client saw {end:?}, not a reset");

    let line = proxy.wait_log(
        &["connection closed", "reset.test"],
        Duration::from_secs(10),
    );
    eprintln!("{line}");
    assert!(line.contains(&format!("down={SENT}")), "{line}");
    assert!(line.contains(&format!("up={hello_len}")), "{line}");
    assert!(line.contains("backend→client"), "{line}");
    let status = admin
        .get_status(proto::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.total_connections, total_before + 1);
    assert_eq!(status.active_connections, 0);
    assert_eq!(status.blocked_connections, 0);
}

/// A backend that accepts but never reads: the proxy stops reading the
/// client once the socket buffers are full, so pushing 100 MiB does not
/// grow its memory; the client's writes simply stop making progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_never_reads_stalls_the_client_and_rss_stays_flat() {
    // What the kernel may hold in flight: the client's send buffer, the
    // proxy's receive and send buffers and the backend's receive buffer,
    // each up to its sysctl maximum (autotuning reaches it sooner when the
    // relay splices), plus one pipe or chunk inside the proxy. Anything the
    // client gets in beyond that was read and kept by the proxy.
    let kernel_max = 2 * (tcp_mem_max("tcp_rmem") + tcp_mem_max("tcp_wmem")) + 1024 * 1024;
    let push: u64 = (100 * 1024 * 1024).max(2 * kernel_max);
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let (hold_tx, mut hold_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // Never read; keep it open.
            let _ = hold_tx.send(stream);
        }
    });
    let setup = Setup::new(dir.path());
    let proxy = Proxy::start(dir.path(), &setup.toml(&[("sink.test", backend_addr)], ""));
    let listen = proxy.listener(LISTENER);
    let pid = proxy.pid();
    let rss_before = proc_rss_kib(pid);

    let mut client = TcpStream::connect(listen).await.unwrap();
    client
        .write_all(&client_hello(Some("sink.test")))
        .await
        .unwrap();
    let _backend_side = hold_rx.recv().await.unwrap();
    let pushed = Arc::new(AtomicU64::new(0));
    let writer = {
        let pushed = pushed.clone();
        tokio::spawn(async move {
            let chunk = vec![0x5au8; 64 * 1024];
            while pushed.load(Ordering::Relaxed) < push {
                if client.write_all(&chunk).await.is_err() {
                    break;
                }
                pushed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            client
        })
    };
    // Sample RSS while the client pushes, until its writes stop progressing.
    let mut peak = rss_before;
    let mut last = 0;
    let mut still = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while still < 10 && Instant::now() < deadline {
        // The sampling interval: RSS has no push channel.
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(proc_rss_kib(pid));
        let now = pushed.load(Ordering::Relaxed);
        if now == last {
            still += 1;
        } else {
            still = 0;
            last = now;
        }
    }
    let accepted = pushed.load(Ordering::Relaxed);
    eprintln!(
        "backend never reads: client got {accepted} of {push} bytes into the pipe \
         (kernel buffers may hold {kernel_max}); proxy RSS {rss_before} KiB before, peak {peak} KiB"
    );
    assert!(
        accepted <= kernel_max,
        "proxy kept reading the client: {accepted} bytes accepted, kernel buffers hold at most {kernel_max}"
    );
    assert!(
        peak < rss_before + 8 * 1024,
        "proxy RSS grew from {rss_before} KiB to {peak} KiB"
    );
    writer.abort();
}

/// Makes a directory and the files in it immutable (`chattr +i`), and
/// undoes it on drop. Unlike `chmod`, this blocks writes through
/// descriptors that are already open, and binds root too (the tests run as
/// root in CI, where a read-only mode changes nothing, and even for other
/// users a mode change does not affect descriptors already open).
///
/// The `-shm` file is left alone: it is SQLite's WAL index, shared memory
/// mapped into the process, and a store into a mapped page of an immutable
/// file is answered by the kernel with SIGBUS, not with an error SQLite
/// could report (see RUNBOOK: a read-only remount has the same effect).
struct Immutable {
    paths: Vec<PathBuf>,
}

impl Immutable {
    fn set(dir: &Path) -> Result<Immutable, String> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.to_string_lossy().ends_with("-shm"))
            .collect();
        paths.push(dir.to_path_buf());
        let mut set = Immutable { paths: Vec::new() };
        for path in paths {
            let out = Command::new("chattr")
                .arg("+i")
                .arg(&path)
                .output()
                .map_err(|e| format!("chattr: {e}"))?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            set.paths.push(path);
        }
        Ok(set)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for path in &self.paths {
            let _ = Command::new("chattr").arg("-i").arg(path).status();
        }
    }
}

/// The DB's directory (and the DB, WAL and SHM files in it) stop taking
/// writes at runtime: admin changes fail with INTERNAL and leave the table
/// as it was, traffic keeps flowing on the routes in memory, and once the
/// directory is writable again changes succeed and reach the DB file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_directory_made_read_only_fails_admin_writes_with_internal_then_recovers() {
    let (dir, pki, backend) = tls_scene("B", &["ok.test", "before.test", "later.test"]).await;
    let setup = Setup::new(dir.path());
    let listener = LISTENER.to_string();
    let server = InProcess::start(dir.path(), &setup.toml(&[("ok.test", backend.addr)], "")).await;
    let listen = server.addr();
    let mut admin = setup.admin().await;
    admin
        .add_route(add(&listener, "before.test", &backend.addr.to_string()))
        .await
        .unwrap();

    let db_dir = setup.db.parent().unwrap();
    let frozen = match Immutable::set(db_dir) {
        Ok(frozen) => frozen,
        Err(e) => {
            // Without CAP_LINUX_IMMUTABLE nothing can make an open file
            // read-only for this process; say so rather than pass quietly.
            // CI (which installs chattr and runs as root) sets
            // MC_PROXY_TEST_STRICT=1, where a skip is a failure.
            assert!(
                std::env::var_os("MC_PROXY_TEST_STRICT").is_none(),
                "cannot make the DB directory immutable: {e}"
            );
            eprintln!("SKIPPED: cannot make the DB directory immutable: {e}");
            return;
        }
    };
    let err = admin
        .add_route(add(&listener, "later.test", &backend.addr.to_string()))
        .await
        .unwrap_err();
    assert!(server.alive(), "App::run ended");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    let err = admin
        .add_firewall_rule(proto::AddFirewallRuleRequest {
            rule: Some(proto::FirewallRule {
                r#type: FirewallRuleType::Ip.into(),
                value: "192.0.2.9".into(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    let err = admin
        .remove_route(proto::RemoveRouteRequest {
            listener_addr: listener.clone(),
            hostname: "before.test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    // Traffic keeps flowing on the routes in memory; the failed change is
    // not half-applied.
    assert_eq!(who(listen, "ok.test", &pki).await.unwrap(), "B");
    assert_eq!(who(listen, "before.test", &pki).await.unwrap(), "B");
    assert!(who(listen, "later.test", &pki).await.is_err());
    let listed = routes_listed(&mut admin).await;
    assert!(listed.iter().any(|r| r.1 == "before.test"));
    assert!(!listed.iter().any(|r| r.1 == "later.test"));

    drop(frozen);
    admin
        .add_route(add(&listener, "later.test", &backend.addr.to_string()))
        .await
        .expect("admin writes work again once the directory is writable");
    assert_eq!(who(listen, "later.test", &pki).await.unwrap(), "B");
    let on_disk = setup.db_routes();
    assert!(on_disk.contains(&(
        listener.clone(),
        "later.test".into(),
        backend.addr.to_string()
    )));
    assert_eq!(on_disk, routes_listed(&mut admin).await);
}

/// The GeoIP file is deleted at runtime: the error is logged, and the
/// country rules keep using the data already loaded (a blocked country's
/// client is still refused, others still served), on SIGHUP too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geoip_file_deleted_at_runtime_keeps_the_old_data_and_logs_an_error() {
    let (dir, pki, backend) = tls_scene("B", &["ok.test"]).await;
    let geo = dir.path().join("GeoLite2-Country.mmdb");
    std::fs::write(
        &geo,
        geoip_db(&[("127.0.0.2/32", "KP"), ("127.0.0.3/32", "SE")]),
    )
    .unwrap();
    let setup = Setup::new(dir.path());
    let proxy = Proxy::start(
        dir.path(),
        &setup.toml(
            &[("ok.test", backend.addr)],
            &format!(
                "[firewall]\ngeoip_db = \"{}\"\nblocked_countries = [\"KP\"]\n",
                geo.display()
            ),
        ),
    );
    let listen = proxy.listener(LISTENER);
    let blocked: IpAddr = "127.0.0.2".parse().unwrap();
    let allowed: IpAddr = "127.0.0.3".parse().unwrap();

    let check = |label: &'static str| {
        let config = pki.client_config();
        async move {
            let (_, end) = hello_from(blocked, listen, "ok.test").await;
            assert!(saw_reset(&end), "{label}: KP client not reset: {end:?}");
            // The SE client completes a TLS handshake with the backend.
            let stream = connect_from_ip(allowed, listen).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("ok.test").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .unwrap_or_else(|e| panic!("{label}: SE client: {e}"));
            assert_eq!(read_line(&mut tls).await.unwrap(), "backend=B", "{label}");
        }
    };
    check("before").await;

    std::fs::remove_file(&geo).unwrap();
    proxy.wait_log(
        &[
            "GeoIP database file is gone or unreadable",
            "keeping the one in use",
        ],
        Duration::from_secs(10),
    );
    check("after delete").await;
    proxy.signal("HUP");
    proxy.wait_log(&["GeoIP database reload refused"], Duration::from_secs(10));
    check("after SIGHUP").await;
}

// ---- admin API abuse -------------------------------------------------------------

/// A request larger than the decoder's limit (1 MiB) is refused with
/// OUT_OF_RANGE or RESOURCE_EXHAUSTED before it is applied; the server
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_admin_message_is_refused_by_the_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path());
    let server = InProcess::start(dir.path(), &setup.toml(&[], "")).await;
    let listener = LISTENER.to_string();
    let mut admin = setup.admin().await.max_encoding_message_size(usize::MAX);
    let huge = format!("{}.test", "a".repeat(2 * 1024 * 1024));
    let err = admin
        .add_route(add(&listener, &huge, "127.0.0.1:1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    let mut admin = setup.admin().await;
    admin
        .add_route(add(&listener, "small.test", "127.0.0.1:1"))
        .await
        .unwrap();
    assert_eq!(
        setup.db_routes(),
        BTreeSet::from([(listener, "small.test".into(), "127.0.0.1:1".into())])
    );
    assert!(server.alive(), "App::run ended");
}

/// 1,000 AddRoute calls at once over 8 connections: every one is
/// acknowledged, every acknowledged route is in the DB file, and the table
/// the API lists is exactly the DB's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_concurrent_add_routes_are_all_acknowledged_and_in_the_db() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path());
    let _server = InProcess::start(dir.path(), &setup.toml(&[], "")).await;
    let listener = LISTENER.to_string();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut admin = setup.admin().await;
        // One call first, so the client has the server's SETTINGS
        // (MAX_CONCURRENT_STREAMS 64) before it opens 125 streams: streams
        // opened past the limit before that are refused (REFUSED_STREAM,
        // RFC 9113 §5.1.2), which is the protocol working, not a lost call.
        admin
            .get_status(mc_proxy::admin::proto::GetStatusRequest {})
            .await
            .expect("GetStatus before the flood");
        clients.push(admin);
    }
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let mut admin = clients[i as usize % clients.len()].clone();
        let listener = listener.clone();
        calls.spawn(async move {
            let backend = format!("127.0.0.{}:{}", 1 + i % 200, 1000 + i);
            let reply = admin
                .add_route(add(&listener, &format!("h{i}.test"), &backend))
                .await;
            (i, backend, reply.map(|r| r.into_inner().created))
        });
    }
    let mut acknowledged = BTreeSet::new();
    while let Some(result) = calls.join_next().await {
        let (i, backend, reply) = result.unwrap();
        match reply {
            Ok(created) => assert!(created, "AddRoute h{i}.test: not created"),
            Err(e) => panic!("AddRoute h{i}.test: {e:?}"),
        }
        acknowledged.insert((listener.clone(), format!("h{i}.test"), backend));
    }
    eprintln!(
        "1,000 concurrent AddRoute calls acknowledged in {:?}",
        started.elapsed()
    );
    assert_eq!(acknowledged.len(), 1000);
    let on_disk = setup.db_routes();
    assert_eq!(on_disk, acknowledged);
    assert_eq!(routes_listed(&mut clients[0]).await, on_disk);
}

/// Clients that open the admin socket and send garbage (random bytes, an
/// HTTP/1 request, an HTTP/2 preface followed by junk frames) or nothing at
/// all do not hurt the server: a well-behaved call succeeds meanwhile and
/// the garbage connections are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_admin_socket_does_not_hurt_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path());
    let server = InProcess::start(dir.path(), &setup.toml(&[], "")).await;
    let listener = LISTENER.to_string();

    let mut noise: u64 = 0x2545_f491_4f6c_dd1d;
    let mut random = vec![0u8; 64 * 1024];
    for byte in random.iter_mut() {
        noise ^= noise << 13;
        noise ^= noise >> 7;
        noise ^= noise << 17;
        *byte = noise as u8;
    }
    let mut h2_junk = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_junk.extend_from_slice(&[0x00, 0x40, 0x00, 0x01, 0xff, 0x00, 0x00, 0x00, 0x07]);
    h2_junk.extend_from_slice(&random[..16 * 1024]);
    let payloads: Vec<Vec<u8>> = vec![
        random.clone(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        h2_junk,
        vec![0u8; 100_000],
    ];
    let mut garbage = Vec::new();
    for payload in &payloads {
        let mut stream = UnixStream::connect(&setup.socket).await.unwrap();
        // The server may close before taking it all; that is fine.
        let _ = stream.write_all(payload).await;
        garbage.push(stream);
    }
    let _silent = UnixStream::connect(&setup.socket).await.unwrap();

    let mut admin = setup.admin().await;
    let started = Instant::now();
    admin
        .add_route(add(&listener, "fine.test", "127.0.0.1:1"))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(setup.db_routes().iter().any(|r| r.1 == "fine.test"));

    // Every garbage connection is closed by the server.
    for (i, stream) in garbage.iter_mut().enumerate() {
        let mut sink = vec![0u8; 64 * 1024];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "garbage connection {i} still open");
    }
    assert!(server.alive(), "App::run ended");
}

/// The maximum of a `net.ipv4.tcp_rmem`/`tcp_wmem` triple, in bytes
/// (the kernel's defaults if the file can't be read).
fn tcp_mem_max(name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(6 * 1024 * 1024)
}
