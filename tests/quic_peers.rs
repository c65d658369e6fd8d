//! QUIC passthrough routed by SNI (SPEC §6.5) through the real binary with
//! real peers on loopback: aioquic HTTP/3 servers as backends, the aioquic
//! HTTP/3 client (`tests/python/quic_h3.py`) and headless Chromium as
//! clients. Each test checks which backend answered (its name is in the
//! body), the bytes, what the backend saw (its ClientHello: SNI, size) and
//! the proxy's `flow closed` line (sni, backend, `transport=quic`). A
//! client whose SNI has no route gets not one datagram back.
//!
//! A missing tool skips a test with a printed reason; with
//! `MC_PROXY_TEST_STRICT=1` (`.ci/run`) it fails it.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::peers::*;
use common::*;

/// How long a `flow closed` line may take: the client's last datagram,
/// then `idle_timeout` (2 s here), then the sweep.
const FLOW_LIMIT: Duration = Duration::from_secs(20);

/// How long one page fetch may take (the client gives up after 30 s).
const GET_LIMIT: Duration = Duration::from_secs(40);

/// A temp dir with the backend CA (what clients trust) and its file.
struct Scene {
    dir: tempfile::TempDir,
    pki: Pki,
    ca: PathBuf,
}

impl Scene {
    fn new() -> Scene {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("quic backend CA");
        let ca = pki.write_ca(dir.path(), "backend-ca");
        Scene { dir, pki, ca }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn ca(&self) -> String {
        self.ca.display().to_string()
    }

    /// An aioquic HTTP/3 server named `name` with a certificate for
    /// `hosts` (chain `NAME.pem`, leaf first; key `NAME.key`); `None`
    /// (after [`skip`]) without python3 or aioquic.
    fn backend(&self, test: &str, name: &str, hosts: &[&str]) -> Option<Backend> {
        self.backend_on(test, name, hosts, 0)
    }

    /// [`Scene::backend`] on UDP port `port` (0: the kernel picks).
    fn backend_on(&self, test: &str, name: &str, hosts: &[&str], port: u16) -> Option<Backend> {
        let leaf = self.pki.leaf(hosts);
        let cert = self.path().join(format!("{name}.pem"));
        let key = self.path().join(format!("{name}.key"));
        std::fs::write(&cert, leaf.cert_pem.clone() + &self.pki.ca_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        let peer = PythonPeer::start(
            test,
            "quic_h3.py",
            &[
                "--cert",
                &cert.display().to_string(),
                "--key",
                &key.display().to_string(),
                "--name",
                name,
                "--port",
                &port.to_string(),
            ],
        )?;
        Some(Backend {
            peer,
            spki: spki_hash(&leaf.cert_pem),
        })
    }

    /// `mc-proxy server` with one `quic = true` listener on 127.0.0.1:0
    /// holding L4 `routes`, `idle_timeout = "2s"` (flow lines come soon
    /// after the last datagram), then `extra`.
    fn proxy(&self, routes: &[(&str, SocketAddr)], extra: &str) -> Proxy {
        let routes: String = routes.iter().map(|(h, b)| route(h, *b)).collect();
        let body = format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\nquic = true\n{routes}\n\
             [proxy]\nidle_timeout = \"2s\"\n\n{extra}"
        );
        Proxy::start(self.path(), &config(self.path(), &body))
    }
}

/// An aioquic HTTP/3 backend: its UDP address is `peer.addr`.
struct Backend {
    peer: PythonPeer,
    /// base64(sha256(SPKI)) of its leaf, for Chromium.
    spki: String,
}

impl Backend {
    fn addr(&self) -> SocketAddr {
        self.peer.addr
    }

    /// The ClientHellos this backend read, as `(sni, hello_bytes,
    /// alpn_count)`.
    fn hellos(&self) -> Vec<(String, u64, u64)> {
        self.peer
            .events()
            .iter()
            .filter(|e| e["event"] == "hello")
            .map(|e| {
                (
                    e["sni"].as_str().unwrap_or("").to_string(),
                    e["hello_bytes"].as_u64().unwrap(),
                    e["alpn_count"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// Waits for the backend's event of a request for `path`.
    fn request(&self, path: &str) -> serde_json::Value {
        self.peer
            .wait_event(Duration::from_secs(10), |e| {
                e["event"] == "request" && e["path"] == path
            })
            .unwrap_or_else(|| panic!("no request for {path}: {:?}", self.peer.events()))
    }
}

/// `quic_h3.py get URL --ca CA ARGS` through the proxy at 127.0.0.1,
/// killed after `limit`; its JSON, or `None` (after [`skip`]) without
/// python3 or aioquic.
fn h3_get(
    test: &str,
    proxy: &Proxy,
    url: &str,
    ca: &str,
    args: &[&str],
    limit: Duration,
) -> Option<serde_json::Value> {
    let mut all = vec!["get", url, "--ca", ca];
    all.extend_from_slice(args);
    let output = run_python_within(test, "quic_h3.py", &all, limit)?;
    Some(script_json(
        &output,
        &format!("quic_h3.py {all:?}\nproxy:\n{}", proxy.log_text()),
    ))
}

/// Waits for the `flow closed` line of a QUIC flow for `sni`; checks the
/// fields every relayed flow has and returns it.
fn relayed_flow(proxy: &Proxy, sni: &str, backend: SocketAddr) -> String {
    let line = proxy
        .log
        .wait_for(FLOW_LIMIT, |text, _| {
            text.lines()
                .find(|l| l.contains("flow closed") && l.contains(&format!(" sni={sni} ")))
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no `flow closed` line for sni={sni}:\n{}", proxy.log_text()));
    assert!(line.contains("mc_proxy::conn"), "{line}");
    assert_eq!(log_field(&line, "transport"), Some("quic"), "{line}");
    assert_eq!(log_field(&line, "outcome"), Some("relayed"), "{line}");
    assert_eq!(
        log_field(&line, "backend"),
        Some(backend.to_string().as_str()),
        "{line}"
    );
    assert_eq!(log_field(&line, "listener"), Some("127.0.0.1:0"), "{line}");
    for field in ["up", "down"] {
        let n: u64 = log_field(&line, field)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {field}= in {line}"));
        // At least the client's Initial (padded to 1,200 bytes) up, and
        // the server's handshake down.
        assert!(n >= 1200, "{field}={n}: {line}");
    }
    eprintln!("{line}");
    line
}

/// The `<p id=who>` text of the page a backend serves at `/`.
fn who(body: &str) -> &str {
    let start = body
        .find("<p id=who>")
        .unwrap_or_else(|| panic!("no <p id=who> in {body:?}"))
        + "<p id=who>".len();
    let end = body[start..].find("</p>").unwrap() + start;
    &body[start..end]
}

#[test]
fn two_hostnames_reach_their_own_aioquic_backends_through_one_quic_listener() {
    const TEST: &str = "quic_two_hostnames";
    let scene = Scene::new();
    let Some(a) = scene.backend(TEST, "backend-a", &["a.test"]) else {
        return;
    };
    let Some(b) = scene.backend(TEST, "backend-b", &["b.test"]) else {
        return;
    };
    let proxy = scene.proxy(&[("a.test", a.addr()), ("b.test", b.addr())], "");
    let listen = proxy.wait_log(&[" listening ", " listener=127.0.0.1:0 "], FLOW_LIMIT);
    assert_eq!(log_field(&listen, "quic"), Some("true"), "{listen}");
    let port = proxy.addr().port();
    let mut clients = Vec::new();
    for (host, backend, name) in [("a.test", &a, "backend-a"), ("b.test", &b, "backend-b")] {
        let url = format!("https://{host}:{port}/");
        let Some(got) = h3_get(TEST, &proxy, &url, &scene.ca(), &["--trace"], GET_LIMIT) else {
            return;
        };
        eprintln!("{host}: {got}");
        assert_eq!(got["status"], 200, "{got}");
        assert_eq!(got["alpn"], "h3", "{got}");
        assert_eq!(
            who(got["body"].as_str().unwrap()),
            format!("backend={name} authority={host}:{port}"),
            "{got}"
        );
        // The backend read the client's own hello: its SNI, its size.
        let seen = backend.request("/");
        assert_eq!(seen["authority"], format!("{host}:{port}"), "{seen}");
        let hello_bytes = got["hello_bytes"].as_u64().unwrap();
        assert!(
            backend
                .hellos()
                .contains(&(host.to_string(), hello_bytes, 1)),
            "{name} read {:?}, the client sent {hello_bytes} bytes for {host}",
            backend.hellos()
        );
        clients.push((host, backend.addr(), got["local_port"].clone()));
    }
    // The flows' lines (both flows idle out meanwhile).
    for (host, backend, client_port) in clients {
        let line = relayed_flow(&proxy, host, backend);
        assert_eq!(
            log_field(&line, "client"),
            Some(format!("127.0.0.1:{client_port}").as_str()),
            "{line}"
        );
    }
    // Each backend saw its own name only.
    for (backend, host) in [(&a, "a.test"), (&b, "b.test")] {
        let hellos = backend.hellos();
        assert!(hellos.iter().all(|h| h.0 == host), "{hellos:?}");
    }
    proxy.stop();
}

#[test]
fn a_client_hello_spanning_two_initials_is_still_routed() {
    const TEST: &str = "quic_two_initials";
    let scene = Scene::new();
    let Some(a) = scene.backend(TEST, "backend-a", &["a.test"]) else {
        return;
    };
    // A second backend the default route would pick, if the hello were
    // misread as having no SNI.
    let Some(other) = scene.backend(TEST, "backend-other", &["a.test"]) else {
        return;
    };
    let proxy = scene.proxy(&[("a.test", a.addr()), ("*", other.addr())], "");
    let port = proxy.addr().port();
    let url = format!("https://a.test:{port}/");
    let Some(got) = h3_get(
        TEST,
        &proxy,
        &url,
        &scene.ca(),
        &["--inflate", "--trace"],
        GET_LIMIT,
    ) else {
        return;
    };
    eprintln!("inflated hello: {got}");
    let hello_bytes = got["hello_bytes"].as_u64().unwrap();
    assert!(hello_bytes > 1300, "{got}");
    assert!(
        got["initial_crypto_packets"].as_u64().unwrap() >= 2,
        "{got}"
    );
    assert_eq!(got["status"], 200, "{got}");
    assert_eq!(
        who(got["body"].as_str().unwrap()),
        format!("backend=backend-a authority=a.test:{port}"),
        "{got}"
    );
    // The backend read the whole hello: its size, its nine ALPN names.
    a.request("/");
    assert!(
        a.hellos().contains(&("a.test".to_string(), hello_bytes, 9)),
        "backend-a read {:?}; the client sent {hello_bytes} bytes",
        a.hellos()
    );
    assert!(other.hellos().is_empty(), "{:?}", other.hellos());
    relayed_flow(&proxy, "a.test", a.addr());
    proxy.stop();
}

#[test]
fn an_aioquic_client_with_an_unknown_sni_gets_nothing_back() {
    const TEST: &str = "quic_unknown_sni";
    let scene = Scene::new();
    let Some(a) = scene.backend(TEST, "backend-a", &["a.test", "unknown.test"]) else {
        return;
    };
    let proxy = scene.proxy(&[("a.test", a.addr())], "");
    let port = proxy.addr().port();
    let url = format!("https://unknown.test:{port}/");
    let ca = scene.ca();
    let args = ["get", &url, "--ca", &ca, "--timeout", "4"];
    let Some(output) = run_python_within(TEST, "quic_h3.py", &args, GET_LIMIT) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let got: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&output.stderr)));
    // The client retransmitted its Initial until it gave up; not one
    // datagram came back.
    assert!(!output.status.success(), "{got}");
    assert_eq!(got["error"], "timeout after 4.0s", "{got}");
    assert_eq!(got["datagrams_received"], 0, "{got}");
    let line = proxy.wait_log(
        &["flow closed", " sni=unknown.test ", "transport=quic"],
        FLOW_LIMIT,
    );
    eprintln!("{line}");
    assert_eq!(log_field(&line, "outcome"), Some("no_route"), "{line}");
    assert_eq!(log_field(&line, "down"), Some("0"), "{line}");
    assert_eq!(log_field(&line, "backend"), None, "{line}");
    assert!(a.hellos().is_empty(), "{:?}", a.hellos());
    proxy.stop();
}

/// The sha256 of the first `len` bytes of `quic_h3.py`'s counter pattern
/// (the big-endian u32 sequence 0, 1, 2, ...), by `sha256sum` (coreutils:
/// far faster than a debug-built hasher).
fn counter_pattern_sha256(len: u64) -> String {
    let mut hasher = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils)");
    let mut stdin = hasher.stdin.take().unwrap();
    let mut block = vec![0u8; 1 << 20];
    let mut word = 0u32;
    let mut left = len;
    while left > 0 {
        for chunk in block.chunks_exact_mut(4) {
            chunk.copy_from_slice(&word.to_be_bytes());
            word = word.wrapping_add(1);
        }
        let n = left.min(block.len() as u64) as usize;
        stdin.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    drop(stdin);
    let out = hasher.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// How long the 256 MiB download may take. aioquic is pure Python: on an
/// idle 2-core machine it moves about 20 MiB/s each way through loopback
/// (CPU-bound, about 30 CPU-seconds for 256 MiB over client and server);
/// on a machine shared with builds it has been seen at 3 MiB/s.
const DOWNLOAD_LIMIT: Duration = Duration::from_secs(170);

#[test]
fn a_256_mib_http3_download_arrives_intact() {
    const TEST: &str = "quic_256_mib";
    const SIZE: u64 = 256 << 20;
    let scene = Scene::new();
    let Some(big) = scene.backend(TEST, "backend-big", &["big.test"]) else {
        return;
    };
    let expected = std::thread::spawn(|| counter_pattern_sha256(SIZE));
    let proxy = scene.proxy(&[("big.test", big.addr())], METRICS_ANY_PORT);
    let port = proxy.addr().port();
    let url = format!("https://big.test:{port}/download?bytes={SIZE}");
    let cpu_before = proc_cpu(proxy.pid());
    let started = Instant::now();
    let Some(got) = h3_get(
        TEST,
        &proxy,
        &url,
        &scene.ca(),
        &["--timeout", &DOWNLOAD_LIMIT.as_secs().to_string()],
        DOWNLOAD_LIMIT + Duration::from_secs(10),
    ) else {
        return;
    };
    let took = started.elapsed();
    eprintln!(
        "256 MiB over HTTP/3 through the proxy: {took:?} ({} MiB/s by the client), \
         proxy CPU {:?}",
        got["mib_per_s"],
        proc_cpu(proxy.pid()) - cpu_before
    );
    assert_eq!(got["status"], 200, "{got}");
    assert_eq!(got["length"], SIZE, "{got}");
    assert_eq!(got["first_bytes"], "00000000000000010000000200000003");
    assert_eq!(
        got["sha256"].as_str().unwrap(),
        expected.join().unwrap(),
        "the download's sha256"
    );
    let line = relayed_flow(&proxy, "big.test", big.addr());
    let down: u64 = log_field(&line, "down").unwrap().parse().unwrap();
    assert!(
        down > SIZE,
        "down={down} (the body alone is {SIZE}): {line}"
    );
    // The relayed-bytes counter agrees with the line (its direction
    // labels summed: the upstream ACKs are a small part).
    let metrics = proxy.metrics_addr();
    let values = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(scrape(metrics));
    let relayed: f64 = values
        .iter()
        .filter(|(k, _)| k.starts_with("mc_proxy_quic_relayed_bytes_total{"))
        .map(|(_, v)| v)
        .sum();
    let up: u64 = log_field(&line, "up").unwrap().parse().unwrap();
    assert_eq!(relayed, (up + down) as f64, "{values:?}\n{line}");
    proxy.stop();
}

#[test]
fn headless_chromium_loads_a_page_over_http3_through_the_proxy() {
    const TEST: &str = "quic_chromium";
    if !have("chromium", TEST) {
        return;
    }
    let scene = Scene::new();
    // A TCP fallback would be seen: the route's backend port, on TCP, is
    // held by this listener, which must never see a connection. (Bound
    // first; the backend then takes the same number on UDP, free or not
    // is checked just before.)
    let tcp_trap = TcpListener::bind("127.0.0.1:0").unwrap();
    tcp_trap.set_nonblocking(true).unwrap();
    let trap_port = tcp_trap.local_addr().unwrap().port();
    drop(std::net::UdpSocket::bind(("127.0.0.1", trap_port)).expect("the same port on UDP"));
    let Some(h3) = scene.backend_on(TEST, "backend-h3", &["h3.test"], trap_port) else {
        return;
    };
    assert_eq!(h3.addr().port(), trap_port);
    let proxy = scene.proxy(&[("h3.test", h3.addr())], "");
    let port = proxy.addr().port();
    let profile = scene.path().join("chromium-profile");
    let netlog = scene.path().join("netlog.json");
    let mut chromium = Command::new("chromium");
    chromium
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--origin-to-force-quic-on=h3.test:443",
        ])
        .arg(format!(
            "--host-resolver-rules=MAP h3.test 127.0.0.1:{port}"
        ))
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--ignore-certificate-errors-spki-list={}", h3.spki))
        .arg(format!("--log-net-log={}", netlog.display()))
        .arg("--dump-dom")
        .arg("https://h3.test/");
    let out = output_within(&mut chromium, Duration::from_secs(60)).expect("run chromium");
    let (status, dom) = (out.status, String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "chromium: {status}\n{stderr}");
    assert!(
        dom.contains("<p id=\"who\">backend=backend-h3 authority=h3.test</p>"),
        "DOM: {dom}\nchromium: {stderr}\nproxy:\n{}\nbackend: {:?}",
        proxy.log_text(),
        h3.peer.events()
    );
    // The backend read Chromium's hello, which is larger than one Initial
    // can carry (a post-quantum key share).
    let seen = h3.request("/");
    assert_eq!(seen["authority"], "h3.test", "{seen}");
    let hellos = h3.hellos();
    assert!(
        hellos
            .iter()
            .any(|(sni, bytes, _)| sni == "h3.test" && *bytes > 1200),
        "{hellos:?}"
    );
    // It was QUIC through the proxy: a flow line, no TCP connection for
    // the name, nothing at the backend's port on TCP.
    relayed_flow(&proxy, "h3.test", h3.addr());
    let tcp_lines: Vec<String> = proxy
        .conn_lines()
        .into_iter()
        .filter(|l| l.contains("sni=h3.test"))
        .collect();
    assert!(tcp_lines.is_empty(), "{tcp_lines:?}");
    match tcp_trap.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a TCP connection reached the backend's port: {other:?}"),
    }
    // Chromium says so too: a QUIC session to h3.test whose packets came
    // from the proxy's port, its hello in two Initials or more, the
    // backend's response headers.
    let quic = chromium_quic(&netlog, port);
    eprintln!("chromium: {quic:?}");
    assert!(quic.sessions >= 1, "{quic:?}");
    assert!(quic.initials_sent >= 2, "{quic:?}");
    assert!(quic.packets_from_proxy >= 1, "{quic:?}");
    assert!(
        quic.servers.iter().any(|s| s.ends_with(" backend-h3")),
        "{quic:?}"
    );
    proxy.stop();
}

/// What Chromium's NetLog says about its QUIC traffic.
#[derive(Debug)]
struct ChromiumQuic {
    /// QUIC sessions to h3.test.
    sessions: usize,
    /// Initial packets it sent before the first packet came back (its
    /// hello), over all sessions.
    initials_sent: usize,
    /// QUIC packets received from 127.0.0.1:PORT.
    packets_from_proxy: usize,
    /// `server:` response headers of its HTTP/3 streams.
    servers: Vec<String>,
}

fn chromium_quic(netlog: &Path, port: u16) -> ChromiumQuic {
    let text = std::fs::read_to_string(netlog).expect("chromium wrote its NetLog");
    let log: serde_json::Value = serde_json::from_str(&text).expect("the NetLog parses");
    let kinds = &log["constants"]["logEventTypes"];
    let kind = |name: &str| kinds[name].as_u64().unwrap_or_else(|| panic!("no {name}"));
    let (session, packet_sent, received, headers) = (
        kind("QUIC_SESSION"),
        kind("QUIC_SESSION_PACKET_SENT"),
        kind("QUIC_SESSION_PACKET_RECEIVED"),
        kind("QUIC_CHROMIUM_CLIENT_STREAM_READ_RESPONSE_HEADERS"),
    );
    let events = log["events"].as_array().expect("NetLog events");
    let sources: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["type"] == session && e["params"]["host"] == "h3.test")
        .map(|e| &e["source"]["id"])
        .collect();
    let ours = |e: &&serde_json::Value| sources.contains(&&e["source"]["id"]);
    // Its first flight: the Initial packets sent before the first packet
    // received (all of them carry the hello).
    let initials_sent = events
        .iter()
        .filter(ours)
        .take_while(|e| e["type"] != received)
        .filter(|e| {
            e["type"] == packet_sent && e["params"]["encryption_level"] == "ENCRYPTION_INITIAL"
        })
        .count();
    let proxy = format!("127.0.0.1:{port}");
    let packets_from_proxy = events
        .iter()
        .filter(ours)
        .filter(|e| e["type"] == received && e["params"]["peer_address"] == proxy.as_str())
        .count();
    let servers = events
        .iter()
        .filter(|e| e["type"] == headers)
        .filter_map(|e| e["params"]["headers"].as_array())
        .flatten()
        .filter_map(|h| h.as_str()?.strip_prefix("server: "))
        .map(str::to_string)
        .collect();
    ChromiumQuic {
        sessions: sources.len(),
        initials_sent,
        packets_from_proxy,
        servers,
    }
}
