//! L7 routes (SPEC §6.2) through the real binary with real peers on
//! loopback: nginx backends (plaintext and TLS), curl, Python requests,
//! httpx, grpcio and websockets, headless Chromium. Each test checks what
//! the peers observed: bytes and hashes, statuses, the certificate the
//! client saw, which backend answered, and the proxy's log lines.
//!
//! A missing tool skips a test with a printed reason; with
//! `MC_PROXY_TEST_STRICT=1` (`.ci/run`) it fails it.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::peers::*;
use common::*;

const LIMIT: Duration = Duration::from_secs(10);

/// A temp dir with the route CA (what clients trust) and its file.
struct Scene {
    dir: tempfile::TempDir,
    route_pki: Pki,
    route_ca: PathBuf,
}

impl Scene {
    fn new() -> Scene {
        let dir = tempfile::tempdir().unwrap();
        let route_pki = Pki::new("route CA");
        let route_ca = route_pki.write_ca(dir.path(), "route-ca");
        Scene {
            dir,
            route_pki,
            route_ca,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A route certificate for `names`: `FILE.pem` (leaf then CA) and
    /// `FILE.key`.
    fn route_cert(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        chain_cert(&self.route_pki, self.path(), file, names)
    }

    /// An L7 route for `host` to `backend` with its own certificate.
    fn route(&self, host: &str, backend: SocketAddr, extra: &str) -> String {
        let (cert, key) = self.route_cert(host, &[host]);
        l7_route(host, backend, &cert, &key, extra)
    }

    /// `mc-proxy server` with one listener on 127.0.0.1:0 holding `routes`,
    /// then `extra` config; with the admin socket if `admin`.
    fn proxy(&self, routes: &[String], extra: &str, admin: bool) -> Proxy {
        let body = format!("{}{extra}", listener("127.0.0.1:0", routes));
        let toml = if admin {
            admin_config(self.path(), &body)
        } else {
            config(self.path(), &body)
        };
        Proxy::start(self.path(), &toml)
    }
}

/// A leaf of `pki` for `names` written as `FILE.pem` (leaf, then the CA)
/// and `FILE.key` in `dir`.
fn chain_cert(pki: &Pki, dir: &Path, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let leaf = pki.leaf(names);
    let cert = dir.join(format!("{file}.pem"));
    let key = dir.join(format!("{file}.key"));
    std::fs::write(&cert, leaf.cert_pem.clone() + &pki.ca_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    (cert, key)
}

/// nginx with a plaintext server `plain`, a TLS server `tls` whose
/// certificate (for `web.internal`) comes from the backend CA, and a TLS
/// server `foreign` with the same name from another CA; and the routes to
/// them: `plain.test`, `tls.test` and `foreign.test` (both TLS routes
/// verify against the backend CA for `web.internal`).
struct Web {
    nginx: Nginx,
    routes: Vec<String>,
}

fn web(scene: &Scene) -> Web {
    let backend_pki = Pki::new("backend CA");
    let other_pki = Pki::new("other CA");
    let backend_ca = backend_pki.write_ca(scene.path(), "backend-ca");
    let tls_cert = chain_cert(&backend_pki, scene.path(), "nginx-tls", &["web.internal"]);
    let foreign_cert = chain_cert(&other_pki, scene.path(), "nginx-foreign", &["web.internal"]);
    let nginx = Nginx::start(
        &scene.path().join("nginx"),
        &[
            NginxServer {
                name: "plain",
                tls: None,
            },
            NginxServer {
                name: "tls",
                tls: Some(tls_cert),
            },
            NginxServer {
                name: "foreign",
                tls: Some(foreign_cert),
            },
        ],
    );
    let verified = format!(
        "backend_tls = true\nbackend_ca = \"{}\"\nbackend_server_name = \"web.internal\"",
        backend_ca.display()
    );
    let routes = vec![
        scene.route("plain.test", nginx.ports[0], ""),
        scene.route("tls.test", nginx.ports[1], &verified),
        scene.route("foreign.test", nginx.ports[2], &verified),
    ];
    Web { nginx, routes }
}

/// The request log line of the `n`th request (1-based) for `host` and
/// `path`, once written.
fn request_line(proxy: &Proxy, host: &str, path: &str, n: usize) -> String {
    let needles = [
        " request ".to_string(),
        format!("host={host}"),
        format!("path={path} "),
    ];
    proxy
        .log
        .wait_for(LIMIT, |text, _| {
            text.lines()
                .filter(|l| needles.iter().all(|n| l.contains(n.as_str())))
                .nth(n - 1)
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            panic!(
                "no request line {n} for {host}{path}:\n{}",
                proxy.log_text()
            )
        })
}

#[test]
fn curl_http1_and_http2_to_nginx_plain_and_tls_and_a_backend_of_another_ca_is_502() {
    const TEST: &str = "curl_to_nginx";
    if !have("nginx", TEST) || !have("curl", TEST) {
        return;
    }
    let scene = Scene::new();
    let web = web(&scene);
    let proxy = scene.proxy(&web.routes, "", false);
    let addr = proxy.addr();
    for (round, (flag, version, logged_version)) in [
        ("--http1.1", "1.1", "HTTP/1.1"),
        ("--http2", "2", "HTTP/2.0"),
    ]
    .into_iter()
    .enumerate()
    {
        for (host, backend, upstream) in [
            ("plain.test", web.nginx.ports[0], "HTTP/1.1"),
            // Over TLS nginx's ALPN picks h2.
            ("tls.test", web.nginx.ports[1], "HTTP/2.0"),
        ] {
            let got = curl(addr, host, "/who", &scene.route_ca, &[flag]);
            assert_eq!(got.status, 200, "{host} {flag}: {got:?}");
            assert_eq!(got.version, version, "{host} {flag}");
            // The client saw the route's certificate ...
            assert_eq!(got.cert_field("subject"), format!("CN={host}"));
            assert_eq!(got.cert_field("issuer"), "CN=route CA");
            // ... and the backend answered, with what the proxy sent it.
            let line = got.body.trim();
            let name = if host == "plain.test" { "plain" } else { "tls" };
            assert_eq!(word(line, "backend"), name, "{line}");
            assert_eq!(word(line, "proto"), upstream, "{line}");
            assert_eq!(word(line, "host"), host, "{line}");
            assert_eq!(word(line, "xff"), "127.0.0.1", "{line}");
            assert_eq!(word(line, "xfp"), "https", "{line}");
            // What nginx saw as SNI: backend_server_name, verified.
            let sni = if host == "tls.test" {
                "web.internal"
            } else {
                ""
            };
            assert_eq!(word(line, "sni"), sni, "{line}");
            let logged = request_line(&proxy, host, "/who", round + 1);
            assert_eq!(log_field(&logged, "status"), Some("200"), "{logged}");
            assert_eq!(log_field(&logged, "outcome"), Some("proxied"), "{logged}");
            assert_eq!(
                log_field(&logged, "version"),
                Some(logged_version),
                "{logged}"
            );
            assert_eq!(
                log_field(&logged, "backend"),
                Some(backend.to_string().as_str()),
                "{logged}"
            );
        }
        // A backend whose certificate another CA signed: 502, and nginx
        // never got a request.
        let refused = curl(addr, "foreign.test", "/who", &scene.route_ca, &[flag]);
        assert_eq!(refused.status, 502, "{flag}: {refused:?}");
        assert_eq!(refused.version, version);
        assert_eq!(
            refused.body,
            "bad gateway: the backend could not be reached\n"
        );
        assert_eq!(refused.cert_field("subject"), "CN=foreign.test");
    }
    let logged = request_line(&proxy, "foreign.test", "/who", 2);
    assert_eq!(log_field(&logged, "status"), Some("502"), "{logged}");
    assert_eq!(
        log_field(&logged, "outcome"),
        Some("backend_unreachable"),
        "{logged}"
    );
    // Refused for its certificate: the verification failed.
    assert!(logged.contains("UnknownIssuer"), "{logged}");
    web.nginx.wait_access("\"GET /who HTTP/", 4);
    assert!(
        !web.nginx.access_log().contains("foreign "),
        "{}",
        web.nginx.access_log()
    );
    proxy.stop();
}

#[test]
fn python_requests_over_http1_and_httpx_over_http2() {
    const TEST: &str = "python_requests_httpx";
    if !have("nginx", TEST) {
        return;
    }
    let scene = Scene::new();
    let web = web(&scene);
    let proxy = scene.proxy(&web.routes, "", false);
    let port = proxy.addr().port();
    let ca = scene.route_ca.display().to_string();
    for (client, version) in [("requests", "HTTP/1.1"), ("httpx", "HTTP/2")] {
        for (host, backend) in [("plain.test", "plain"), ("tls.test", "tls")] {
            let url = format!("https://{host}:{port}/who");
            let Some(output) = run_python(TEST, "l7_http_clients.py", &[client, &url, &ca]) else {
                return;
            };
            let got = script_json(&output, &proxy.log_text());
            eprintln!("{client} {host}: {got}");
            assert_eq!(got["status"], 200, "{got}");
            assert_eq!(got["http_version"], version, "{got}");
            let body = got["body"].as_str().unwrap();
            assert_eq!(word(body, "backend"), backend, "{got}");
            assert_eq!(word(body, "host"), host, "{got}");
            assert_eq!(word(body, "xff"), "127.0.0.1", "{got}");
        }
        let url = format!("https://foreign.test:{port}/who");
        let Some(output) = run_python(TEST, "l7_http_clients.py", &[client, &url, &ca]) else {
            return;
        };
        let got = script_json(&output, &proxy.log_text());
        assert_eq!(got["status"], 502, "{got}");
    }
    proxy.stop();
}

#[test]
fn grpc_unary_streams_errors_and_deadlines_through_the_route() {
    const TEST: &str = "grpc_through_l7";
    let Some(server) = PythonPeer::start(TEST, "l7_grpc.py", &[]) else {
        return;
    };
    let scene = Scene::new();
    let proxy = scene.proxy(&[scene.route("grpc.test", server.addr, "")], "", false);
    let addr = proxy.addr().to_string();
    let ca = scene.route_ca.display().to_string();
    let Some(output) = run_python(TEST, "l7_grpc.py", &["call", &addr, "grpc.test", &ca]) else {
        return;
    };
    let got = script_json(&output, &proxy.log_text());
    eprintln!("grpcio through the route: {got}");
    assert_eq!(got["say"], "echo: hello");
    assert_eq!(got["count"], serde_json::json!(["0", "1", "2", "3", "4"]));
    assert_eq!(got["collect"], "a,b,c");
    assert_eq!(got["chat"], serde_json::json!(["re: x", "re: y"]));
    // The backend's error status, message and trailing metadata, intact.
    assert_eq!(got["missing"]["code"], "NOT_FOUND", "{got}");
    assert_eq!(got["missing"]["details"], "no such thing", "{got}");
    assert_eq!(got["missing"]["trailers"]["x-detail"], "kept", "{got}");
    assert_eq!(got["slow"]["code"], "DEADLINE_EXCEEDED", "{got}");
    let elapsed = got["slow"]["elapsed_ms"].as_u64().unwrap();
    assert!((400..5000).contains(&elapsed), "{got}");
    assert_eq!(got["after"], "echo: again");

    // The backend saw each call once, from the proxy with the client's
    // address, and the cancellation of the call past its deadline.
    let cancelled = server.wait_event(LIMIT, |e| e["event"] == "cancelled");
    assert!(cancelled.is_some(), "events: {:?}", server.events());
    let calls: Vec<String> = server
        .events()
        .iter()
        .filter(|e| e["event"] == "call")
        .map(|e| {
            assert_eq!(e["xff"], "127.0.0.1", "{e}");
            assert!(
                e["user_agent"]
                    .as_str()
                    .unwrap()
                    .starts_with("l7-peers-test "),
                "{e}"
            );
            e["method"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        calls,
        ["Say", "Count", "Collect", "Chat", "Missing", "Slow", "Say"]
    );
    let say = request_line(&proxy, "grpc.test", "/l7peers.Echo/Say", 1);
    assert_eq!(log_field(&say, "status"), Some("200"), "{say}");
    assert_eq!(log_field(&say, "method"), Some("POST"), "{say}");
    proxy.stop();
}

#[test]
fn a_websocket_echo_through_the_route() {
    const TEST: &str = "websocket_through_l7";
    let Some(server) = PythonPeer::start(TEST, "l7_websocket.py", &[]) else {
        return;
    };
    let scene = Scene::new();
    let proxy = scene.proxy(&[scene.route("ws.test", server.addr, "")], "", false);
    let port = proxy.addr().port();
    let url = format!("wss://ws.test:{port}/chat");
    let ca = scene.route_ca.display().to_string();
    let Some(output) = run_python(TEST, "l7_websocket.py", &["call", &url, &ca]) else {
        return;
    };
    let got = script_json(&output, &proxy.log_text());
    assert_eq!(got["text"], "hello", "{got}");
    assert_eq!(got["whoami"], "xff=127.0.0.1", "{got}");
    assert_eq!(got["binary_len"], 1 << 20, "{got}");
    assert_eq!(got["binary_back"], got["binary_sent"], "{got}");
    let open = server
        .wait_event(LIMIT, |e| e["event"] == "open")
        .expect("the backend saw the connection");
    assert_eq!(open["path"], "/chat");
    assert_eq!(open["host"], format!("ws.test:{port}"));
    let logged = request_line(&proxy, "ws.test", "/chat", 1);
    assert_eq!(log_field(&logged, "status"), Some("101"), "{logged}");
    assert_eq!(log_field(&logged, "outcome"), Some("upgraded"), "{logged}");
    let closed = proxy.wait_conns(&["sni=ws.test", "outcome=relayed"], 1, LIMIT);
    let up: u64 = log_field(&closed[0], "up").unwrap().parse().unwrap();
    assert!(up > 1 << 20, "{closed:?}");
    proxy.stop();
}

/// `BYTES` of a pseudo-random (xorshift) stream written to `path`.
fn write_noise(path: &Path, bytes: usize) {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..bytes / block.len() {
        for chunk in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&block).unwrap();
    }
    file.flush().unwrap();
}

/// `sha256sum` of what `input` gives (coreutils: far faster than a
/// debug-built hasher).
fn sha256sum(input: Stdio) -> std::process::Child {
    Command::new("sha256sum")
        .stdin(input)
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils)")
}

fn sha256_of_file(path: &Path) -> String {
    let file = std::fs::File::open(path).unwrap();
    hash_of(sha256sum(Stdio::from(file)))
}

fn hash_of(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Waits for `child`, sampling the proxy's RSS every 20 ms meanwhile;
/// returns the child's status and the highest RSS seen (KiB).
fn wait_sampling_rss(
    child: &mut std::process::Child,
    pid: u32,
    limit: Duration,
) -> (std::process::ExitStatus, u64) {
    let deadline = Instant::now() + limit;
    let mut peak = proc_rss_kib(pid);
    loop {
        peak = peak.max(proc_rss_kib(pid));
        if let Some(status) = child.try_wait().unwrap() {
            return (status, peak);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the transfer took over {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_256_mib_download_and_upload_arrive_intact_in_bounded_memory() {
    const TEST: &str = "big_transfers";
    const SIZE: usize = 256 << 20;
    const GROWTH_KIB: u64 = 64 << 10;
    if !have("nginx", TEST) || !have("curl", TEST) {
        return;
    }
    let scene = Scene::new();
    let nginx = Nginx::start(
        &scene.path().join("nginx"),
        &[NginxServer {
            name: "big",
            tls: None,
        }],
    );
    let source = nginx.www().join("big.bin");
    write_noise(&source, SIZE);
    let expected = sha256_of_file(&source);
    let proxy = scene.proxy(&[scene.route("big.test", nginx.ports[0], "")], "", false);
    let addr = proxy.addr();
    let url = format!("https://big.test:{}/", addr.port());
    let resolve = format!("big.test:{}:127.0.0.1", addr.port());
    let curl_base = |args: &[&str]| {
        let mut command = Command::new("curl");
        command
            .args(["-sS", "--fail", "--max-time", "120", "--resolve", &resolve])
            .arg("--cacert")
            .arg(&scene.route_ca)
            .args(args);
        command
    };
    // The baseline: after one request, so the TLS and HTTP machinery is up.
    let warm = curl(addr, "big.test", "/who", &scene.route_ca, &["--http2"]);
    assert_eq!(warm.status, 200);
    let baseline = proc_rss_kib(proxy.pid());

    let mut report = Vec::new();
    for (n, (flag, version)) in [("--http1.1", "h1"), ("--http2", "h2")]
        .into_iter()
        .enumerate()
    {
        // The download, hashed as it arrives.
        let started = Instant::now();
        let mut download = curl_base(&[flag, "-o", "-"])
            .arg(format!("{url}big.bin"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let hasher = sha256sum(Stdio::from(download.stdout.take().unwrap()));
        let (status, peak) =
            wait_sampling_rss(&mut download, proxy.pid(), Duration::from_secs(120));
        assert!(status.success(), "{version} download: curl {status}");
        assert_eq!(hash_of(hasher), expected, "the {version} download's sha256");
        report.push((format!("{version} download"), started.elapsed(), peak));
        let logged = request_line(&proxy, "big.test", "/big.bin", n + 1);
        assert_eq!(log_field(&logged, "down"), Some(SIZE.to_string().as_str()));

        // The upload, stored by nginx (WebDAV PUT), then hashed.
        let started = Instant::now();
        let path = format!("/up/{version}.bin");
        let mut upload = curl_base(&[flag, "-o", "/dev/null", "-w", "%{http_code}"])
            .arg("-T")
            .arg(&source)
            .arg(format!("{url}{}", &path[1..]))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (status, peak) = wait_sampling_rss(&mut upload, proxy.pid(), Duration::from_secs(120));
        let mut code = String::new();
        upload
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut code)
            .unwrap();
        assert!(status.success(), "{version} upload: curl {status}");
        assert_eq!(code, "201", "the {version} PUT created the file");
        report.push((format!("{version} upload"), started.elapsed(), peak));
        assert_eq!(
            sha256_of_file(&nginx.www().join(&path[1..])),
            expected,
            "the {version} upload's sha256"
        );
        let logged = request_line(&proxy, "big.test", &path, 1);
        assert_eq!(log_field(&logged, "up"), Some(SIZE.to_string().as_str()));
        assert_eq!(log_field(&logged, "status"), Some("201"));
    }
    eprintln!("256 MiB transfers, proxy RSS baseline {baseline} KiB:");
    for (what, took, peak) in &report {
        eprintln!(
            "  {what}: {took:?}, peak RSS +{} KiB",
            peak.saturating_sub(baseline)
        );
    }
    for (what, _, peak) in &report {
        assert!(
            *peak < baseline + GROWTH_KIB,
            "{what}: RSS grew from {baseline} KiB to {peak} KiB"
        );
    }
    proxy.stop();
}

#[test]
fn a_leaf_only_route_certificate_is_warned_about_at_start() {
    const TEST: &str = "leaf_only_warning";
    let scene = Scene::new();
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    // leaf.test's file holds only its leaf (the CA signed it); chain.test's
    // holds the leaf and the CA.
    let leaf = scene.route_pki.leaf(&["leaf.test"]);
    let (leaf_cert, leaf_key) = leaf.write(scene.path(), "leaf-only");
    let (chain_cert, chain_key) = scene.route_cert("full-chain", &["chain.test"]);
    let proxy = scene.proxy(
        &[
            l7_route("leaf.test", nowhere, &leaf_cert, &leaf_key, ""),
            l7_route("chain.test", nowhere, &chain_cert, &chain_key, ""),
        ],
        "",
        false,
    );
    let warning = proxy.wait_log(&["route certificate is a leaf only"], LIMIT);
    assert!(warning.contains(" WARN "), "{warning}");
    assert_eq!(
        log_field(&warning, "cert"),
        Some(leaf_cert.display().to_string().as_str()),
        "{warning}"
    );
    proxy.wait_log(&["route certificate loaded", "full-chain.pem"], LIMIT);
    assert_eq!(
        proxy.count_log("route certificate is a leaf only"),
        1,
        "{}",
        proxy.log_text()
    );
    // The leaf-only route still serves clients that hold the CA: the
    // handshake completes (and the backend, nowhere, is a 502).
    if have("curl", TEST) {
        let got = curl(proxy.addr(), "leaf.test", "/", &scene.route_ca, &[]);
        assert_eq!(got.cert_field("subject"), "CN=leaf.test");
        assert_eq!(got.status, 502);
    }
    proxy.stop();
}

#[test]
fn a_user_agent_rule_added_at_runtime_blocks_the_next_request() {
    const TEST: &str = "user_agent_rule";
    if !have("nginx", TEST) || !have("curl", TEST) {
        return;
    }
    let scene = Scene::new();
    let nginx = Nginx::start(
        &scene.path().join("nginx"),
        &[NginxServer {
            name: "web",
            tls: None,
        }],
    );
    let proxy = scene.proxy(
        &[scene.route("ua.test", nginx.ports[0], "")],
        "[firewall]\nblocked_user_agents = [\"^BadBot/\"]\n",
        true,
    );
    let addr = proxy.addr();
    let get = |agent: &str| curl(addr, "ua.test", "/who", &scene.route_ca, &["-A", agent]);

    // Before the rule: sqlmap passes; the config's rule blocks BadBot.
    assert_eq!(get("sqlmap/1.7").status, 200);
    let blocked = get("BadBot/2");
    assert_eq!(
        (blocked.status, blocked.body.as_str()),
        (403, "forbidden\n")
    );
    nginx.wait_access("\"sqlmap/1.7\"", 1);

    let (code, stdout, stderr) = proxy.cli(&["firewall", "add", "--user-agent", "(?i)sqlmap"]);
    assert_eq!(code, 0, "firewall add: {stdout}{stderr}");

    let blocked = get("SQLMap/1.8");
    assert_eq!(
        (blocked.status, blocked.body.as_str()),
        (403, "forbidden\n")
    );
    assert_eq!(get("curl-after/1").status, 200);
    // nginx logged the request after the blocked one, and never the
    // blocked ones.
    nginx.wait_access("\"curl-after/1\"", 1);
    let log = nginx.access_log();
    assert!(!log.contains("SQLMap") && !log.contains("BadBot"), "{log}");
    assert_eq!(log.matches("sqlmap/1.7").count(), 1, "{log}");
    let logged = request_line(&proxy, "ua.test", "/who", 3);
    assert_eq!(log_field(&logged, "status"), Some("403"), "{logged}");
    assert_eq!(
        log_field(&logged, "outcome"),
        Some("blocked:user_agent"),
        "{logged}"
    );
    proxy.stop();
}

#[test]
fn headless_chromium_loads_a_page_over_http2() {
    const TEST: &str = "chromium_page";
    if !have("nginx", TEST) || !have("chromium", TEST) {
        return;
    }
    let scene = Scene::new();
    let nginx = Nginx::start(
        &scene.path().join("nginx"),
        &[NginxServer {
            name: "page",
            tls: None,
        }],
    );
    let marker = "l7-peers-marker-7d1f";
    std::fs::write(
        nginx.www().join("page.html"),
        format!("<!doctype html><title>t</title><p id=m>{marker}</p>\n"),
    )
    .unwrap();
    let (cert, key) = scene.route_cert("a", &["a.test"]);
    let spki = spki_hash(&std::fs::read_to_string(&cert).unwrap());
    let proxy = scene.proxy(
        &[l7_route("a.test", nginx.ports[0], &cert, &key, "")],
        "",
        false,
    );
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
            "--host-resolver-rules=MAP a.test 127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--ignore-certificate-errors-spki-list={spki}"))
        .arg(format!("--log-net-log={}", netlog.display()))
        .arg("--dump-dom")
        .arg(format!("https://a.test:{port}/page.html"));
    let out = output_within(&mut chromium, Duration::from_secs(60)).expect("run chromium");
    let (status, dom) = (out.status, String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "chromium: {status}\n{stderr}");
    assert!(
        dom.contains(&format!("<p id=\"m\">{marker}</p>")),
        "DOM: {dom}\nchromium: {stderr}\nproxy:\n{}",
        proxy.log_text()
    );
    // The proxy served it over HTTP/2 ...
    let logged = request_line(&proxy, "a.test", "/page.html", 1);
    assert_eq!(log_field(&logged, "status"), Some("200"), "{logged}");
    assert_eq!(log_field(&logged, "version"), Some("HTTP/2.0"), "{logged}");
    // ... and Chromium says so too, in its NetLog: the ALPN result of
    // every TLS connection to the proxy's port, and an HTTP/2 session for
    // the origin.
    let (alpn, h2_sessions) = chromium_protocols(&netlog, port);
    assert!(
        !alpn.is_empty() && alpn.iter().all(|p| p == "h2"),
        "chromium negotiated {alpn:?} with the route"
    );
    assert!(h2_sessions >= 1, "no HTTP/2 session to a.test:{port}");
    proxy.stop();
}

/// From Chromium's NetLog: the ALPN protocol (`next_proto`) of each TLS
/// connection to 127.0.0.1:`port`, and how many HTTP/2 sessions were
/// opened to `a.test:PORT`.
fn chromium_protocols(netlog: &Path, port: u16) -> (Vec<String>, usize) {
    let text = std::fs::read_to_string(netlog).expect("chromium wrote its NetLog");
    let log: serde_json::Value = serde_json::from_str(&text).expect("the NetLog parses");
    let kinds = &log["constants"]["logEventTypes"];
    let kind = |name: &str| kinds[name].as_u64().unwrap_or_else(|| panic!("no {name}"));
    let (tcp, tls, h2) = (
        kind("TCP_CONNECT"),
        kind("SSL_CONNECT"),
        kind("HTTP2_SESSION"),
    );
    let events = log["events"].as_array().expect("NetLog events");
    let remote = format!("127.0.0.1:{port}");
    let sockets: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["type"] == tcp && e["params"]["remote_address"] == remote.as_str())
        .map(|e| &e["source"]["id"])
        .collect();
    let alpn = events
        .iter()
        .filter(|e| e["type"] == tls && sockets.contains(&&e["source"]["id"]))
        .filter_map(|e| e["params"]["next_proto"].as_str())
        .map(str::to_string)
        .collect();
    let host = format!("a.test:{port}");
    let sessions = events
        .iter()
        .filter(|e| e["type"] == h2 && e["params"]["host"] == host.as_str())
        .count();
    (alpn, sessions)
}
