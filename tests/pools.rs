//! Backend pools through the real binary (SPEC §6.3, issue 16 item 6):
//! round robin past a refusing backend, an active check marking a
//! blackholed backend down and up again, least connections, every
//! backend down (fail open, then `backend_unreachable`), L7 pools with a
//! `health_path` and with failover of a request body, the default route
//! `*`, a pool's list replaced under load, and the per-backend metrics.
//!
//! Backends are loopback listeners that answer a ClientHello with their
//! name (cheap: no TLS), or hyper servers for L7 routes. A refusing
//! backend is a socket bound but not listening (its port stays ours, so
//! nothing else can take it). Waits poll a condition with a deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

mod common;
use common::http::{pattern_byte, request, L7Client};
use common::*;

/// The listener every test configures (its name in the admin API).
const LISTENER: &str = "127.0.0.1:0";

/// The blackhole test bounds how long marking down and up takes; the
/// others (hundreds of connections through debug binaries) would take the
/// two cores it needs. It runs alone (write); the rest run together (read).
static TIMED: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

// ---- backends ----------------------------------------------------------------

/// A backend that reads a ClientHello record, answers `NAME\n`, then
/// holds the connection until the client's FIN. It can stop accepting
/// (its accept queue then fills and SYNs are dropped: a blackhole) and
/// start again.
struct Named {
    addr: SocketAddr,
    name: &'static str,
    /// Connections that sent a whole hello and got the name.
    served: Arc<AtomicUsize>,
    accepting: watch::Sender<bool>,
}

impl Named {
    async fn start(name: &'static str) -> Named {
        Named::with_backlog(name, 1024).await
    }

    /// With a tiny `backlog`, the accept queue fills at once when it stops
    /// accepting (too small for many clients at once: SYNs are dropped).
    async fn with_backlog(name: &'static str, backlog: u32) -> Named {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(backlog).unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let (accepting, mut on) = watch::channel(true);
        let counter = served.clone();
        tokio::spawn(async move {
            loop {
                if on.wait_for(|on| *on).await.is_err() {
                    return;
                }
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    // Stopped: leave the queue alone.
                    _ = on.wait_for(|on| !*on) => continue,
                };
                let counter = counter.clone();
                tokio::spawn(serve_name(stream, name, counter));
            }
        });
        Named {
            addr,
            name,
            served,
            accepting,
        }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Stops accepting and fills the accept queue until a connect's SYN
    /// goes unanswered; returns the connections that fill it (keep them).
    async fn blackhole(&self) -> Vec<TcpStream> {
        self.accepting.send_replace(false);
        let mut fillers = Vec::new();
        for _ in 0..64 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(self.addr))
                .await
            {
                Ok(Ok(stream)) => fillers.push(stream),
                Ok(Err(e)) => panic!("filling {}'s queue: {e}", self.name),
                Err(_) => return fillers,
            }
        }
        panic!("{}'s accept queue never filled", self.name)
    }

    fn accept_again(&self) {
        self.accepting.send_replace(true);
    }
}

async fn serve_name(mut stream: TcpStream, name: &'static str, served: Arc<AtomicUsize>) {
    let mut header = [0u8; 5];
    // A health check connects and closes: no hello, no name.
    if stream.read_exact(&mut header).await.is_err() {
        return;
    }
    let len = u16::from_be_bytes([header[3], header[4]]) as usize;
    let mut hello = vec![0u8; len];
    if stream.read_exact(&mut hello).await.is_err() {
        return;
    }
    served.fetch_add(1, Ordering::SeqCst);
    if stream
        .write_all(format!("{name}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut sink = [0u8; 1024];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// A backend that refuses connections: a socket bound to a loopback port
/// and not listening (a SYN gets a RST). Keep it: its port stays taken.
fn refusing() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// Connects to the proxy, sends a ClientHello for `sni` (none: no SNI)
/// and reads the backend's name line; the connection is returned open.
async fn hello(proxy: SocketAddr, sni: Option<&str>) -> std::io::Result<(String, TcpStream)> {
    let exchange = async {
        let mut stream = TcpStream::connect(proxy).await?;
        stream.write_all(&client_hello(sni)).await?;
        let line = read_line(&mut stream).await?;
        Ok((line, stream))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no name in 10 s"))?
}

/// [`hello`], closed at once: the name of the backend that served it.
async fn who_is(proxy: SocketAddr, sni: Option<&str>) -> String {
    hello(proxy, sni)
        .await
        .unwrap_or_else(|e| panic!("connection for {sni:?}: {e}"))
        .0
}

// ---- the proxy -----------------------------------------------------------------

/// A `[[listeners.routes]]` entry with a list of backends and `extra`
/// lines (balance, health_*).
fn pool_route(host: &str, backends: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "  [[listeners.routes]]\n  hostname = \"{host}\"\n  backends = [{}]\n{extra}",
        list.join(", ")
    )
}

/// A server with the admin socket (for the CLI), metrics, one listener
/// `routes` and `[proxy]` `proxy_lines`.
fn start(dir: &std::path::Path, routes: &[String], proxy_lines: &str) -> Proxy {
    let body = format!(
        "{}{}{}",
        listener(LISTENER, routes),
        proxy_section(proxy_lines),
        METRICS_ANY_PORT
    );
    Proxy::start(dir, &admin_config(dir, &body))
}

/// `backends list --json`, as rows.
fn backends_list(proxy: &Proxy) -> Vec<Value> {
    let (code, out, err) = proxy.cli(&["backends", "list", "--json"]);
    assert_eq!(code, 0, "backends list: {err}");
    match serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}")) {
        Value::Array(rows) => rows,
        other => panic!("not a list: {other}"),
    }
}

/// The `backends list` row of `backend` on route `host`.
fn row(rows: &[Value], host: &str, backend: SocketAddr) -> Value {
    rows.iter()
        .find(|r| r["hostname"] == host && r["backend"] == backend.to_string().as_str())
        .unwrap_or_else(|| panic!("no row for {host} {backend}: {rows:?}"))
        .clone()
}

/// The metrics series `name{backend="ADDR"}` (`state` too when given).
fn series(name: &str, backend: SocketAddr, state: Option<&str>) -> String {
    match state {
        Some(state) => format!("mc_proxy_{name}{{backend=\"{backend}\",state=\"{state}\"}}"),
        None => format!("mc_proxy_{name}{{backend=\"{backend}\"}}"),
    }
}

fn value(metrics: &HashMap<String, f64>, series: &str) -> f64 {
    *metrics
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {metrics:?}"))
}

/// Waits for a `mc_proxy::backend` log line with `message` about `backend`.
fn wait_backend_log(proxy: &Proxy, message: &str, backend: SocketAddr, limit: Duration) -> String {
    proxy.wait_log(&[message, &format!("backend={backend} ")], limit)
}

/// How many log lines say `message` about `backend`.
fn count_backend_log(proxy: &Proxy, message: &str, backend: SocketAddr) -> usize {
    let needle = format!("backend={backend} ");
    proxy
        .log_text()
        .lines()
        .filter(|l| l.contains(message) && l.contains(&needle))
        .count()
}

// ---- 1. round robin past a refusing backend -------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_serves_every_connection_past_a_refusing_backend_evenly() {
    let _together = TIMED.read().await;
    let dir = tempfile::tempdir().unwrap();
    let (_dead, dead) = refusing();
    let b = Named::start("B").await;
    let c = Named::start("C").await;
    let proxy = start(
        dir.path(),
        &[pool_route("rr.test", &[dead, b.addr, c.addr], "")],
        "connect_timeout = \"1s\"",
    );
    let addr = proxy.addr();

    const CONNECTIONS: usize = 300;
    const CLIENTS: usize = 10;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let mut names = Vec::new();
            for _ in 0..CONNECTIONS / CLIENTS {
                names.push(hello(addr, Some("rr.test")).await.map(|(name, _)| name));
            }
            names
        }));
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for task in tasks {
        for name in task.await.unwrap() {
            let name = name.unwrap_or_else(|e| {
                let odd: Vec<String> = proxy
                    .conn_lines()
                    .into_iter()
                    .filter(|l| !l.contains("outcome=relayed"))
                    .collect();
                panic!("a connection failed: {e}; {odd:#?}")
            });
            *seen.entry(name).or_default() += 1;
        }
    }
    let (on_b, on_c) = (seen.get("B").copied(), seen.get("C").copied());
    assert_eq!(
        on_b.unwrap_or(0) + on_c.unwrap_or(0),
        CONNECTIONS,
        "every connection served by B or C: {seen:?}"
    );
    assert_eq!(b.served() + c.served(), CONNECTIONS);
    // Round robin over the two live ones: 150 each, within ±20 %.
    for (name, count) in [("B", on_b), ("C", on_c)] {
        let count = count.unwrap_or(0);
        assert!(
            (120..=180).contains(&count),
            "{name} got {count} of {CONNECTIONS}: {seen:?}"
        );
    }

    // The refusing one was found out (passive) and counted.
    wait_backend_log(
        &proxy,
        "backend down: connect failed",
        dead,
        Duration::from_secs(5),
    );
    let metrics = scrape(proxy.metrics_addr()).await;
    assert!(
        value(
            &metrics,
            &series("backend_connect_failures_total", dead, None)
        ) >= 1.0
    );
    assert!(
        value(
            &metrics,
            &series("backend_state_changes_total", dead, Some("down"))
        ) >= 1.0
    );
    assert_eq!(
        value(
            &metrics,
            &series("backend_connect_failures_total", b.addr, None)
        ),
        0.0
    );
    let total = value(&metrics, &series("backend_connections_total", b.addr, None))
        + value(&metrics, &series("backend_connections_total", c.addr, None));
    assert_eq!(total, CONNECTIONS as f64);
    // Every client saw a relayed connection, none a failure.
    assert_eq!(proxy.count_log("outcome=backend_unreachable"), 0);
}

// ---- 2 and 8. an active check against a blackhole; the metrics ---------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_active_check_marks_a_blackholed_backend_down_then_up_and_metrics_follow() {
    let _alone = TIMED.write().await;
    let dir = tempfile::tempdir().unwrap();
    let a = Named::with_backlog("A", 1).await;
    let b = Named::start("B").await;
    let proxy = start(
        dir.path(),
        &[pool_route(
            "hole.test",
            &[a.addr, b.addr],
            "  health_interval = \"1s\"\n  health_fall = 2\n  health_rise = 2\n",
        )],
        "connect_timeout = \"300ms\"",
    );
    let addr = proxy.addr();
    let metrics_addr = proxy.metrics_addr();

    // Both take connections to begin with.
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(who_is(addr, Some("hole.test")).await);
    }
    assert!(
        names.contains(&"A".into()) && names.contains(&"B".into()),
        "{names:?}"
    );

    // A stops accepting: its queue fills and SYNs to it go unanswered.
    let fillers = a.blackhole().await;
    let blackholed = Instant::now();
    wait_backend_log(
        &proxy,
        "backend down: health check failed",
        a.addr,
        Duration::from_secs(10),
    );
    let took = blackholed.elapsed();
    assert!(
        took <= Duration::from_secs(3),
        "marked down after {took:?}, more than interval × fall + 1 s"
    );
    let rows = backends_list(&proxy);
    let down = row(&rows, "hole.test", a.addr);
    assert_eq!(down["healthy"], false, "{rows:?}");
    assert!(
        down["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{rows:?}"
    );
    assert_eq!(row(&rows, "hole.test", b.addr)["healthy"], true, "{rows:?}");
    // 8. The metrics say so.
    let metrics = wait_metrics(metrics_addr, Duration::from_secs(5), |m| {
        m.get(&series("backend_up", a.addr, None)) == Some(&0.0)
    })
    .await;
    assert_eq!(value(&metrics, &series("backend_up", b.addr, None)), 1.0);
    assert_eq!(
        value(
            &metrics,
            &series("backend_state_changes_total", a.addr, Some("down"))
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            &series("backend_state_changes_total", b.addr, Some("down"))
        ),
        0.0
    );

    // No new connection goes to it, and none waits on it.
    let served_by_a = a.served();
    for _ in 0..20 {
        let started = Instant::now();
        let name = who_is(addr, Some("hole.test")).await;
        let took = started.elapsed();
        assert_eq!(name, "B");
        assert!(
            took < Duration::from_millis(300),
            "a connection took {took:?}: did it try the blackhole?"
        );
    }
    assert_eq!(
        count_backend_log(&proxy, "backend down: connect failed", a.addr),
        0,
        "no connection tried A"
    );

    // A accepts again: up after health_rise passes, and takes traffic.
    a.accept_again();
    drop(fillers);
    let accepting = Instant::now();
    wait_backend_log(
        &proxy,
        "backend up: health check passed",
        a.addr,
        Duration::from_secs(10),
    );
    let took = accepting.elapsed();
    assert!(
        took <= Duration::from_secs(4),
        "marked up after {took:?}, more than interval × rise + 2 s"
    );
    let mut names = Vec::new();
    for _ in 0..20 {
        names.push(who_is(addr, Some("hole.test")).await);
    }
    let on_a = names.iter().filter(|n| *n == "A").count();
    assert!((8..=12).contains(&on_a), "A got {on_a} of 20: {names:?}");
    assert_eq!(a.served(), served_by_a + on_a);
    let metrics = scrape(metrics_addr).await;
    assert_eq!(value(&metrics, &series("backend_up", a.addr, None)), 1.0);
    assert_eq!(
        value(
            &metrics,
            &series("backend_state_changes_total", a.addr, Some("up"))
        ),
        1.0
    );
    assert_eq!(
        row(&backends_list(&proxy), "hole.test", a.addr)["healthy"],
        true
    );
}

// ---- 3. least connections ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_connections_sends_new_connections_away_from_a_busy_backend() {
    let _together = TIMED.read().await;
    let dir = tempfile::tempdir().unwrap();
    let a = Named::start("A").await;
    let b = Named::start("B").await;
    let proxy = start(
        dir.path(),
        &[pool_route(
            "lc.test",
            &[a.addr, b.addr],
            "  balance = \"least_connections\"\n",
        )],
        "",
    );
    let addr = proxy.addr();
    let metrics_addr = proxy.metrics_addr();
    let open = |m: &HashMap<String, f64>, backend: SocketAddr| {
        m.get(&series("backend_connections_open", backend, None))
            .copied()
    };

    // Eight long connections: four each.
    let mut held: HashMap<String, Vec<TcpStream>> = HashMap::new();
    for _ in 0..8 {
        let (name, stream) = hello(addr, Some("lc.test")).await.unwrap();
        held.entry(name).or_default().push(stream);
    }
    assert_eq!(held["A"].len(), 4);
    assert_eq!(held["B"].len(), 4);

    // B's close; A keeps four open.
    held.remove("B");
    wait_metrics(metrics_addr, Duration::from_secs(10), |m| {
        open(m, b.addr) == Some(0.0) && open(m, a.addr) == Some(4.0)
    })
    .await;

    // The next four go to B, the one with fewer open.
    let mut more = Vec::new();
    for _ in 0..4 {
        let (name, stream) = hello(addr, Some("lc.test")).await.unwrap();
        assert_eq!(name, "B", "A holds 4, B {}", more.len());
        more.push(stream);
    }
    // Short ones while A holds one and B four: all to A.
    let mut on_a = held.remove("A").unwrap();
    on_a.truncate(1);
    for _ in 0..10 {
        wait_metrics(metrics_addr, Duration::from_secs(10), |m| {
            open(m, a.addr) == Some(1.0)
        })
        .await;
        assert_eq!(who_is(addr, Some("lc.test")).await, "A");
    }
    let rows = backends_list(&proxy);
    assert_eq!(
        row(&rows, "lc.test", b.addr)["active_connections"],
        4,
        "{rows:?}"
    );
}

// ---- 4. every backend down ---------------------------------------------------------

/// Sends a hello to a route whose backends all refuse: the client gets
/// nothing and a clean close; returns the connection's close line.
async fn unreachable(proxy: &Proxy, sni: &str, nth: usize) -> String {
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let started = Instant::now();
    stream.write_all(&client_hello(Some(sni))).await.unwrap();
    let (bytes, end) = read_all(&mut stream, Duration::from_secs(10)).await;
    assert!(bytes.is_empty(), "the client got {} bytes", bytes.len());
    assert!(end.is_ok(), "not a clean close: {end:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let lines = proxy.wait_conns(
        &[&format!("sni={sni}"), "outcome=backend_unreachable"],
        nth,
        Duration::from_secs(5),
    );
    lines[nth - 1].clone()
}

/// The backends among `all` that the close line's `error=` names.
fn named_in_error(line: &str, all: &[SocketAddr]) -> Vec<SocketAddr> {
    let error = &line[line
        .find(" error=")
        .unwrap_or_else(|| panic!("no error= in {line}"))..];
    all.iter()
        .filter(|b| error.contains(&format!("{b}: ")))
        .copied()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_backend_down_each_connection_tries_connect_attempts_then_closes_cleanly() {
    let _together = TIMED.read().await;
    let refusing: Vec<_> = (0..4).map(|_| refusing()).collect();
    let all: Vec<SocketAddr> = refusing.iter().map(|(_, a)| *a).collect();

    // The default connect_attempts, 3, against four backends.
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(dir.path(), &[pool_route("down.test", &all, "")], "");
    for nth in 1..=6 {
        let line = unreachable(&proxy, "down.test", nth).await;
        let named = named_in_error(&line, &all);
        assert_eq!(named.len(), 3, "three tried: {line}");
        let backend = log_field(&line, "backend").unwrap();
        assert!(
            named.iter().any(|b| b.to_string() == backend),
            "backend= is one tried: {line}"
        );
    }
    // All down (passive backoff) and still tried: fail open.
    let rows = backends_list(&proxy);
    assert!(rows.iter().all(|r| r["healthy"] == false), "{rows:?}");
    assert!(
        rows.iter().all(|r| r["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("refused"))),
        "{rows:?}"
    );
    proxy.stop();

    // `[proxy] connect_attempts = 2`: two of the four.
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(
        dir.path(),
        &[pool_route("down.test", &all, "")],
        "connect_attempts = 2",
    );
    for nth in 1..=3 {
        let line = unreachable(&proxy, "down.test", nth).await;
        assert_eq!(named_in_error(&line, &all).len(), 2, "two tried: {line}");
    }
}

// ---- 5. L7 pools ---------------------------------------------------------------------

/// An HTTP backend (HTTP/1.1 and h2c): `GET /health` answers `health`
/// (changeable), anything else `backend=NAME`, `len=N` and `sha=HEX` of
/// the request body, which it also keeps.
struct Web {
    addr: SocketAddr,
    health: Arc<AtomicU16>,
    /// Requests other than health checks.
    requests: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

async fn web(name: &'static str, health: u16) -> Web {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use sha2::{Digest, Sha256};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web = Web {
        addr: listener.local_addr().unwrap(),
        health: Arc::new(AtomicU16::new(health)),
        requests: Arc::new(AtomicUsize::new(0)),
        bodies: Arc::default(),
    };
    let (health, requests, bodies) = (web.health.clone(), web.requests.clone(), web.bodies.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (health, requests, bodies) = (health.clone(), requests.clone(), bodies.clone());
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (health, requests, bodies) =
                        (health.clone(), requests.clone(), bodies.clone());
                    async move {
                        let mut response = hyper::Response::new(Full::new(bytes::Bytes::new()));
                        if req.uri().path() == "/health" {
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(health.load(Ordering::SeqCst)).unwrap();
                            return Ok::<_, hyper::Error>(response);
                        }
                        requests.fetch_add(1, Ordering::SeqCst);
                        let body = req.into_body().collect().await?.to_bytes().to_vec();
                        let text = format!(
                            "backend={name}\nlen={}\nsha={:x}\n",
                            body.len(),
                            Sha256::digest(&body)
                        );
                        bodies.lock().unwrap().push(body);
                        *response.body_mut() = Full::new(text.into());
                        Ok(response)
                    }
                });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    web
}

/// The L7 lines of a route: TLS with a leaf of `pki` for `host`.
fn l7_lines(dir: &std::path::Path, pki: &Pki, host: &str) -> String {
    let (cert, key) = pki.leaf(&[host]).write(dir, host);
    format!(
        "  mode = \"l7\"\n  tls_cert = \"{}\"\n  tls_key = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_l7_health_path_answering_500_takes_its_backend_out() {
    let _together = TIMED.read().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("pools CA");
    let good = web("good", 200).await;
    let bad = web("bad", 500).await;
    let route = pool_route(
        "app.test",
        &[good.addr, bad.addr],
        &format!(
            "{}  health_interval = \"1s\"\n  health_path = \"/health\"\n  health_fall = 2\n",
            l7_lines(dir.path(), &pki, "app.test")
        ),
    );
    let proxy = start(dir.path(), &[route], "connect_timeout = \"1s\"");
    wait_backend_log(
        &proxy,
        "backend down: health check failed",
        bad.addr,
        Duration::from_secs(10),
    );
    let rows = backends_list(&proxy);
    let down = row(&rows, "app.test", bad.addr);
    assert_eq!(down["healthy"], false, "{rows:?}");
    assert!(
        down["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("500")),
        "{rows:?}"
    );
    assert_eq!(
        row(&rows, "app.test", good.addr)["healthy"],
        true,
        "{rows:?}"
    );

    // Every request to the good one, over HTTP/1.1 and HTTP/2.
    for h2 in [false, true] {
        let mut client = L7Client::connect(proxy.addr(), "app.test", &pki, h2).await;
        for _ in 0..10 {
            let answer = client.get("app.test", "/echo").await;
            assert_eq!(answer.status, 200);
            assert_eq!(answer.field("backend"), "good");
        }
    }
    assert_eq!(bad.requests.load(Ordering::SeqCst), 0);
    assert_eq!(good.requests.load(Ordering::SeqCst), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_l7_request_fails_over_past_a_refusing_backend_body_and_all() {
    let _together = TIMED.read().await;
    use sha2::{Digest, Sha256};

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("pools CA");
    let live = web("live", 200).await;
    // One refusing backend per route, first in its list: each route's
    // first request (round robin from the start) tries it first.
    let (_dead1, dead1) = refusing();
    let (_dead2, dead2) = refusing();
    let routes = [
        pool_route(
            "h1.test",
            &[dead1, live.addr],
            &l7_lines(dir.path(), &pki, "h1.test"),
        ),
        pool_route(
            "h2.test",
            &[dead2, live.addr],
            &l7_lines(dir.path(), &pki, "h2.test"),
        ),
    ];
    let proxy = start(dir.path(), &routes, "connect_timeout = \"1s\"");

    let body: Vec<u8> = (0..300 * 1024_u64).map(pattern_byte).collect();
    let sha = format!("{:x}", Sha256::digest(&body));
    for (host, dead, h2) in [("h1.test", dead1, false), ("h2.test", dead2, true)] {
        let mut client = L7Client::connect(proxy.addr(), host, &pki, h2).await;
        let before = live.bodies.lock().unwrap().len();
        let post = request("POST", host, "/upload", !h2, body.clone().into());
        let answer = client.send(post).await.expect("POST");
        assert_eq!(answer.status, 200, "{host}: {answer:?}");
        assert_eq!(answer.field("backend"), "live");
        assert_eq!(answer.field("len"), body.len().to_string(), "{host}");
        assert_eq!(answer.field("sha"), sha, "{host}");
        {
            let bodies = live.bodies.lock().unwrap();
            assert_eq!(bodies.len(), before + 1);
            assert!(
                bodies[before] == body,
                "{host}: the live backend's copy differs"
            );
        }
        // The POST did try the refusing one first.
        wait_backend_log(
            &proxy,
            "backend down: connect failed",
            dead,
            Duration::from_secs(5),
        );
        for _ in 0..10 {
            let answer = client.get(host, "/echo").await;
            assert_eq!(answer.status, 200, "{host}: {answer:?}");
            assert_eq!(answer.field("backend"), "live");
        }
    }
    assert_eq!(live.requests.load(Ordering::SeqCst), 22);
}

// ---- 6. the default route ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_route_catches_unknown_names_and_no_sni_below_exact_and_wildcard() {
    let _together = TIMED.read().await;
    let dir = tempfile::tempdir().unwrap();
    let exact = Named::start("exact").await;
    let wild = Named::start("wild").await;
    let default = Named::start("default").await;
    let proxy = start(
        dir.path(),
        &[
            route("a.test", exact.addr),
            route("*.wild.test", wild.addr),
            route("*", default.addr),
        ],
        "",
    );
    let addr = proxy.addr();
    assert_eq!(who_is(addr, Some("a.test")).await, "exact");
    assert_eq!(who_is(addr, Some("x.wild.test")).await, "wild");
    assert_eq!(who_is(addr, Some("unknown.test")).await, "default");
    assert_eq!(who_is(addr, Some("y.x.wild.test")).await, "default");
    assert_eq!(who_is(addr, None).await, "default");
    assert_eq!(proxy.count_log("outcome=no_route"), 0);
}

// ---- 7. a pool's list replaced under load ------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replacing_a_pools_list_under_load_fails_no_connection() {
    let _together = TIMED.read().await;
    let dir = tempfile::tempdir().unwrap();
    let backends = [
        Named::start("A").await,
        Named::start("B").await,
        Named::start("C").await,
    ];
    let [a, b, c] = &backends;
    let proxy = start(
        dir.path(),
        &[pool_route("swap.test", &[a.addr, b.addr], "")],
        "",
    );
    let addr = proxy.addr();
    let mut admin = admin_client(&proxy.admin_socket()).await;

    // Clients connecting without pause until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, done) = (stop.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match hello(addr, Some("swap.test")).await {
                    Ok(_) => {}
                    Err(e) => failures.push(e.to_string()),
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            failures
        }));
    }

    let lists = [
        [b, c],
        [c, a],
        [a, b],
        [b, c],
        [c, a],
        [a, b],
        [b, c],
        [c, a],
    ];
    for list in lists {
        let backends: Vec<String> = list.iter().map(|n| n.addr.to_string()).collect();
        let mut add = add_route(LISTENER, "swap.test", "");
        add.route.as_mut().unwrap().backends = backends;
        let updated = admin.add_route(add).await.unwrap().into_inner();
        assert!(!updated.created);
        // A new connection after the answer goes to the new list.
        let names: Vec<&str> = list.iter().map(|n| n.name).collect();
        for _ in 0..6 {
            let name = who_is(addr, Some("swap.test")).await;
            assert!(names.contains(&name.as_str()), "{name} not in {names:?}");
        }
        // Let the load run on this list for a while.
        let until = done.load(Ordering::SeqCst) + 50;
        let deadline = Instant::now() + Duration::from_secs(10);
        while done.load(Ordering::SeqCst) < until {
            assert!(Instant::now() < deadline, "the clients stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(client.await.unwrap());
    }
    assert!(failures.is_empty(), "failed connections: {failures:?}");
    assert!(done.load(Ordering::SeqCst) >= 400);
    assert_eq!(proxy.count_log("outcome=backend_unreachable"), 0);

    // Afterwards only the last list, [C, A], takes traffic, both of it.
    let served_by_b = b.served();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..20 {
        *seen
            .entry(who_is(addr, Some("swap.test")).await)
            .or_default() += 1;
    }
    assert_eq!(seen.get("C"), Some(&10), "{seen:?}");
    assert_eq!(seen.get("A"), Some(&10), "{seen:?}");
    assert_eq!(b.served(), served_by_b);
    let rows = backends_list(&proxy);
    let listed: Vec<&str> = rows
        .iter()
        .filter(|r| r["hostname"] == "swap.test")
        .map(|r| r["backend"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [c.addr.to_string(), a.addr.to_string()]);
}
