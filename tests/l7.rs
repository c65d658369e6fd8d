//! L7 routes in-process: TLS terminated with the route's certificate,
//! HTTP/1.1 and HTTP/2 proxied to real hyper backends, checked by what the
//! backend received and what the client got back.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use common::http::*;
use common::*;
use mc_proxy::routes::{
    Backend, BackendProtocol, Hostname, L7Route, Mode, RouteMap, Routes, Target,
};
use mc_proxy::server::App;

/// A running server with one listener whose table the test fills.
struct Scene {
    server: InProcess,
    routes: Arc<Routes>,
    dir: tempfile::TempDir,
    pki: Pki,
}

impl Scene {
    /// A server with one listener (its config has one L4 route to nowhere;
    /// the test replaces the table) and `extra` config.
    async fn start(extra: &str) -> Scene {
        let dir = tempfile::tempdir().unwrap();
        let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let toml = config(
            dir.path(),
            &format!(
                "{}{extra}\n{METRICS_ANY_PORT}",
                listener_toml(ONE_LISTENER, &[("unused.test", unused)])
            ),
        );
        let config = load_config(dir.path(), &toml);
        let app = App::build(&config).await.expect("App::build");
        let routes = app.routes().clone();
        Scene {
            server: InProcess::run(app),
            routes,
            dir,
            pki: Pki::new("route CA"),
        }
    }

    /// Writes a leaf of the scene's CA for `names` as `NAME.pem`/`NAME.key`
    /// (the chain: leaf, then the CA).
    fn cert(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let leaf = self.pki.leaf(names);
        let cert = self.dir.path().join(format!("{file}.pem"));
        let key = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert, leaf.cert_pem.clone() + &self.pki.ca_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        (cert, key)
    }

    /// Replaces the listener's table.
    fn set_routes(&self, routes: &[(&str, Target)]) {
        let mut map = RouteMap::new();
        for (host, target) in routes {
            map.insert(Hostname::parse(host).unwrap(), target.clone());
        }
        self.routes.listeners()[0].replace(map);
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
}

fn l7(backend: SocketAddr, files: &(PathBuf, PathBuf)) -> Target {
    l7_with(backend, files, |_| {})
}

fn l7_with(
    backend: SocketAddr,
    (cert, key): &(PathBuf, PathBuf),
    change: impl FnOnce(&mut L7Route),
) -> Target {
    let mut route = L7Route {
        tls_cert: cert.clone(),
        tls_key: key.clone(),
        backend_tls: false,
        backend_ca: None,
        backend_server_name: None,
        backend_protocol: BackendProtocol::Auto,
    };
    change(&mut route);
    Target {
        backends: wire::route::Backends::one(Backend::parse(&backend.to_string()).unwrap()),
        balance: Default::default(),
        health: None,
        send_proxy_protocol: false,
        mode: Mode::L7(Arc::new(route)),
    }
}

fn l4(backend: SocketAddr) -> Target {
    Target {
        backends: wire::route::Backends::one(Backend::parse(&backend.to_string()).unwrap()),
        balance: Default::default(),
        health: None,
        send_proxy_protocol: false,
        mode: Mode::L4,
    }
}

#[tokio::test]
async fn http1_and_http2_reach_the_backend_with_the_client_address_not_the_forged_one() {
    let scene = Scene::start("").await;
    let backend = http_backend("web").await;
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(backend, &files))]);

    for h2 in [false, true] {
        let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, h2).await;
        let mut req = request(
            "POST",
            "a.test",
            "/echo?q=1",
            client.is_h1(),
            Bytes::from_static(b"12345"),
        );
        let headers = req.headers_mut();
        headers.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        headers.insert("x-real-ip", "6.6.6.6".parse().unwrap());
        if !h2 {
            headers.insert("connection", "x-secret".parse().unwrap());
            headers.insert("x-secret", "1".parse().unwrap());
        }
        let answer = client.send(req).await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.field("backend"), "web");
        assert_eq!(answer.field("x-forwarded-for"), "127.0.0.1", "h2={h2}");
        assert_eq!(answer.field("x-real-ip"), "127.0.0.1");
        assert_eq!(answer.field("x-forwarded-proto"), "https");
        assert_eq!(answer.field("x-forwarded-host"), "a.test");
        assert_eq!(answer.field("host"), "a.test");
        assert_eq!(
            answer.field("x-secret"),
            "",
            "a header Connection names is hop-by-hop"
        );
        assert_eq!(answer.field("uri"), "/echo?q=1");
        assert_eq!(answer.field("body"), "5");
        // A plaintext backend in auto mode gets HTTP/1.1.
        assert_eq!(answer.field("version"), "HTTP/1.1");
    }
    let metrics = scene
        .server
        .wait_metrics(|m| {
            m.get(&one_listener(
                "mc_proxy_http_requests_total",
                "route=\"a.test\",class=\"2xx\"",
            ))
            .is_some_and(|v| *v >= 2.0)
        })
        .await;
    assert!(metrics.contains_key(&one_listener(
        "mc_proxy_http_request_duration_seconds_count",
        "route=\"a.test\""
    )));
}

#[tokio::test]
async fn the_client_sees_the_routes_certificate() {
    let scene = Scene::start("").await;
    let backend = http_backend("web").await;
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(backend, &files))]);
    let tls = tls_connect(scene.addr(), "a.test", alpn_client(&scene.pki, &[b"h2"]))
        .await
        .unwrap();
    let (_, session) = tls.get_ref();
    let leaf_pem = std::fs::read_to_string(&files.0).unwrap();
    let chain: Vec<_> = rustls::pki_types::pem::PemObject::pem_slice_iter(leaf_pem.as_bytes())
        .collect::<Result<Vec<rustls::pki_types::CertificateDer>, _>>()
        .unwrap();
    assert_eq!(session.peer_certificates().unwrap(), &chain[..]);
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
}

#[tokio::test]
async fn http2_coalesces_hosts_of_one_certificate_and_misdirects_the_rest() {
    let scene = Scene::start("").await;
    let (a, b, c) = (
        http_backend("a").await,
        http_backend("b").await,
        http_backend("c").await,
    );
    let shared = scene.cert("ab", &["a.test", "b.test"]);
    let other = scene.cert("c", &["c.test"]);
    scene.set_routes(&[
        ("a.test", l7(a, &shared)),
        ("b.test", l7(b, &shared)),
        ("c.test", l7(c, &other)),
        ("l4.test", l4(a)),
    ]);
    let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, true).await;
    assert_eq!(client.get("a.test", "/echo").await.field("backend"), "a");
    assert_eq!(
        client.get("b.test:443", "/echo").await.field("backend"),
        "b"
    );
    for host in ["c.test", "l4.test", "nowhere.test", "[::1]:443"] {
        let answer = client.get(host, "/echo").await;
        assert_eq!(answer.status, 421, "{host}: {answer:?}");
        assert!(answer.body.starts_with("misdirected request"), "{answer:?}");
    }
    // The connection is still good after the 421s.
    assert_eq!(client.get("b.test", "/echo").await.field("backend"), "b");
}

#[tokio::test]
async fn l4_and_l7_routes_share_a_listener() {
    let scene = Scene::start("").await;
    let web = http_backend("web").await;
    let tls = tls_backend(&scene.pki, "passthrough", &["l4.test"]).await;
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(web, &files)), ("l4.test", l4(tls.addr))]);
    assert_eq!(
        who(scene.addr(), "l4.test", &scene.pki).await.unwrap(),
        "passthrough"
    );
    let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, false).await;
    assert_eq!(client.get("a.test", "/echo").await.field("backend"), "web");
    scene.server.wait_closed("relayed", 1.0).await;
}

#[tokio::test]
async fn an_unreachable_backend_is_502_and_grpc_gets_unavailable() {
    let scene = Scene::start("").await;
    // A port with nothing behind it.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(closed, &files))]);
    let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, true).await;
    let answer = client.get("a.test", "/echo").await;
    assert_eq!(answer.status, 502);
    assert_eq!(
        answer.body,
        "bad gateway: the backend could not be reached\n"
    );
    let mut req = request("POST", "a.test", "/pkg.Svc/Call", false, Bytes::new());
    req.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    let answer = client.send(req).await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["grpc-status"], "14");
}

#[tokio::test]
async fn trailers_reach_the_client() {
    let scene = Scene::start("").await;
    let backend = http_backend("web").await;
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[(
        "a.test",
        l7_with(backend, &files, |r| {
            r.backend_protocol = BackendProtocol::H2
        }),
    )]);
    let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, true).await;
    let mut req = request("GET", "a.test", "/trailers", false, Bytes::new());
    req.headers_mut().insert("te", "trailers".parse().unwrap());
    let answer = client.send(req).await.unwrap();
    assert_eq!(answer.body, "body\n");
    let trailers = answer.trailers.expect("trailers");
    assert_eq!(trailers["x-trailer"], "done");
}

#[tokio::test]
async fn a_tls_backend_is_verified_against_backend_ca() {
    let scene = Scene::start("").await;
    let backend_pki = Pki::new("backend CA");
    let backend = https_backend(&backend_pki, "secure", &["web.internal"]).await;
    let ca = backend_pki.write_ca(scene.dir.path(), "backend-ca");
    let other_ca = Pki::new("another CA").write_ca(scene.dir.path(), "other-ca");
    let files = scene.cert("a", &["a.test", "b.test"]);
    let tls = |ca: &PathBuf| {
        let ca = ca.clone();
        l7_with(backend, &files, move |r| {
            r.backend_tls = true;
            r.backend_ca = Some(ca);
            r.backend_server_name = Some("web.internal".into());
        })
    };
    scene.set_routes(&[("a.test", tls(&ca)), ("b.test", tls(&other_ca))]);
    for h2 in [false, true] {
        let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, h2).await;
        let answer = client.get("a.test", "/echo").await;
        assert_eq!(answer.field("backend"), "secure");
        // Over TLS the backend's ALPN decides: h2.
        assert_eq!(answer.field("version"), "HTTP/2.0");
        let refused = client.get("b.test", "/echo").await;
        assert_eq!(
            refused.status, 502,
            "a backend from another CA: {refused:?}"
        );
    }
}

/// A TLS stream to the L7 route `sni` speaking HTTP/1.1 by hand.
async fn raw_h1(
    scene: &Scene,
    sni: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_connect(scene.addr(), sni, alpn_client(&scene.pki, &[b"http/1.1"]))
        .await
        .unwrap()
}

/// Reads until `needle` has been seen (or EOF / 10 s); returns all read.
async fn read_until<R: tokio::io::AsyncRead + Unpin>(reader: &mut R, needle: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !String::from_utf8_lossy(&got).contains(needle) {
        match tokio::time::timeout_at(deadline, reader.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_websocket_upgrade_becomes_a_relay() {
    use tokio::io::AsyncWriteExt;
    let scene = Scene::start("").await;
    let backend = http_backend("ws-echo").await;
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(backend, &files))]);
    let mut tls = raw_h1(&scene, "a.test").await;
    tls.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_until(&mut tls, "ws-echo\n").await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head:?}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head:?}"
    );
    for message in ["first frame", "second frame"] {
        tls.write_all(message.as_bytes()).await.unwrap();
        let echoed = read_until(&mut tls, message).await;
        assert_eq!(echoed, message);
    }
    // The relay counts as a connection to its backend while it is open
    // (least_connections, ListBackends), and no longer once it ends.
    let open = || scene.routes.listeners()[0].backends()[0].active_connections;
    assert_eq!(open(), 1);
    drop(tls);
    scene.server.wait_closed("relayed", 1.0).await;
    assert_eq!(open(), 0);
}

#[tokio::test]
async fn expect_100_continue_gets_its_100_before_the_body_is_sent() {
    use tokio::io::AsyncWriteExt;
    let scene = Scene::start("").await;
    let backend = http_backend("web").await;
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(backend, &files))]);
    let mut tls = raw_h1(&scene, "a.test").await;
    tls.write_all(
        b"POST /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let interim = read_until(&mut tls, "\r\n\r\n").await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim:?}");
    tls.write_all(b"hello world").await.unwrap();
    let answer = read_until(&mut tls, "body=").await + &read_until(&mut tls, "\n").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer:?}");
    assert!(answer.contains("\nbody=11\n"), "{answer:?}");
    assert!(
        answer.contains("\nexpect=\n"),
        "Expect is not sent upstream: {answer:?}"
    );
}

#[tokio::test]
async fn a_certificate_replaced_on_disk_is_served_to_the_next_connection() {
    let scene = Scene::start("").await;
    let backend = http_backend("web").await;
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(backend, &files))]);
    let leaf_of = |tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let first = tls_connect(scene.addr(), "a.test", alpn_client(&scene.pki, &[b"h2"]))
        .await
        .unwrap();
    let old_leaf = leaf_of(&first);

    // A new chain written beside it and renamed over it (how cert managers do it).
    let replacement = scene.cert("a-new", &["a.test"]);
    std::fs::rename(&replacement.1, &files.1).unwrap();
    std::fs::rename(&replacement.0, &files.0).unwrap();
    let new_leaf = {
        let pem = std::fs::read(&files.0).unwrap();
        rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
            .next()
            .unwrap()
            .map(|c: rustls::pki_types::CertificateDer| c.into_owned())
            .unwrap()
    };
    assert_ne!(old_leaf, new_leaf);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let tls = tls_connect(scene.addr(), "a.test", alpn_client(&scene.pki, &[b"h2"]))
            .await
            .unwrap();
        if leaf_of(&tls) == new_leaf {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not served within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // A broken file is refused and the certificate in service stays.
    std::fs::write(&files.0, "not a certificate").unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let tls = tls_connect(scene.addr(), "a.test", alpn_client(&scene.pki, &[b"h2"]))
        .await
        .unwrap();
    assert_eq!(leaf_of(&tls), new_leaf);
    // The first connection still works with its session.
    drop(first);
}

#[tokio::test]
async fn a_slowloris_does_not_delay_a_good_request_and_is_cut_at_handshake_timeout() {
    use tokio::io::AsyncWriteExt;
    let scene = Scene::start(&proxy_section("handshake_timeout = \"2s\"")).await;
    let backend = http_backend("web").await;
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(backend, &files))]);
    let header =
        b"GET /echo HTTP/1.1\r\nHost: a.test\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let mut slow = Vec::new();
    for _ in 0..300 {
        slow.push(raw_h1(&scene, "a.test").await);
    }
    let started = std::time::Instant::now();
    let mut cut = 0;
    let writer = tokio::spawn(async move {
        // One byte per connection per round, 50 ms apart: never completes.
        for byte in header.iter().cycle().take(header.len() * 4) {
            let mut open = 0;
            for tls in slow.iter_mut() {
                if tls.write_all(&[*byte]).await.is_ok() && tls.flush().await.is_ok() {
                    open += 1;
                }
            }
            if open == 0 {
                return slow.len();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        0
    });
    // A good request meanwhile.
    let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, false).await;
    let answer = client.get("a.test", "/echo").await;
    assert_eq!(answer.status, 200);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    cut += writer.await.unwrap();
    assert_eq!(cut, 300, "every slow connection was closed");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    scene.server.wait_closed("header_timeout", 300.0).await;
}

#[tokio::test]
async fn oversized_headers_get_431_and_a_malformed_request_400() {
    use tokio::io::AsyncWriteExt;
    let scene = Scene::start("").await;
    let backend = http_backend("web").await;
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(backend, &files))]);

    let mut tls = raw_h1(&scene, "a.test").await;
    let big = format!(
        "GET /echo HTTP/1.1\r\nHost: a.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let _ = tls.write_all(big.as_bytes()).await;
    let answer = read_until(&mut tls, "\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

    let mut tls = raw_h1(&scene, "a.test").await;
    tls.write_all(b"GET /echo HTTP/1.1 junk\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut tls, "\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");

    // HTTP/2: a header block over 64 KiB.
    let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, true).await;
    let mut req = request("GET", "a.test", "/echo", false, Bytes::new());
    req.headers_mut()
        .insert("x-big", "b".repeat(70 * 1024).parse().unwrap());
    match client.send(req).await {
        Ok(answer) => assert_eq!(answer.status, 431),
        Err(e) => panic!("expected a 431, got {e}"),
    }
}

mod h2_frames {
    pub use wire::authority::build::frame;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// A GET for https://a.test/echo: indexed :method GET, :scheme https,
    /// :path / and a literal :authority (HPACK, no Huffman).
    pub fn get_block() -> Vec<u8> {
        let mut block = vec![0x82, 0x87, 0x84, 0x01, 6];
        block.extend_from_slice(b"a.test");
        block
    }

    /// A literal header field without indexing, new name.
    pub fn literal(name: &str, value: &str) -> Vec<u8> {
        assert!(name.len() < 127 && value.len() < 127);
        let mut out = vec![0x00, name.len() as u8];
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
        out
    }

    /// Reads frames until a GOAWAY (its error code) or the end of the stream.
    pub async fn goaway<R: tokio::io::AsyncRead + Unpin>(reader: &mut R) -> Option<u32> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let mut head = [0u8; 9];
            match tokio::time::timeout_at(deadline, reader.read_exact(&mut head)).await {
                Ok(Ok(_)) => {}
                _ => return None,
            }
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            match tokio::time::timeout_at(deadline, reader.read_exact(&mut payload)).await {
                Ok(Ok(_)) => {}
                _ => return None,
            }
            if head[3] == GOAWAY && payload.len() >= 8 {
                return Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
        }
    }
}

/// HTTP/2 over TLS to the scene's a.test, the preface and SETTINGS sent.
async fn raw_h2(scene: &Scene) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut tls = tls_connect(scene.addr(), "a.test", alpn_client(&scene.pki, &[b"h2"]))
        .await
        .unwrap();
    tls.write_all(h2_frames::PREFACE).await.unwrap();
    tls.write_all(&h2_frames::frame(h2_frames::SETTINGS, 0, 0, &[]))
        .await
        .unwrap();
    tls
}

#[tokio::test]
async fn an_http2_rapid_reset_flood_is_cut_with_enhance_your_calm() {
    use h2_frames::*;
    use tokio::io::AsyncWriteExt;
    let scene = Scene::start("").await;
    // A backend that never answers: every stream stays pending until reset.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(silent.local_addr().unwrap(), &files))]);
    let mut tls = raw_h2(&scene).await;
    let mut burst = Vec::new();
    for i in 0..2000u32 {
        let stream = 2 * i + 1;
        burst.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            stream,
            &get_block(),
        ));
        burst.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
    }
    let _ = tls.write_all(&burst).await;
    // ENHANCE_YOUR_CALM (0xb), and the connection ends.
    assert_eq!(goaway(&mut tls).await, Some(0xb));
    // The server is fine for everyone else.
    let web = http_backend("web").await;
    scene.set_routes(&[("a.test", l7(web, &files))]);
    let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, true).await;
    assert_eq!(client.get("a.test", "/echo").await.status, 200);
}

#[tokio::test]
async fn an_http2_continuation_flood_is_cut_before_it_is_buffered() {
    use h2_frames::*;
    use tokio::io::AsyncWriteExt;
    let scene = Scene::start("").await;
    let web = http_backend("web").await;
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(web, &files))]);
    let mut tls = raw_h2(&scene).await;
    tls.write_all(&frame(HEADERS, 0, 1, &get_block()))
        .await
        .unwrap();
    // 1 MiB of CONTINUATION frames that never end the header block.
    let field = literal("x-flood", &"f".repeat(100));
    let mut sent = 0usize;
    let mut write_failed = false;
    while sent < 1 << 20 {
        let chunk: Vec<u8> = field
            .iter()
            .copied()
            .cycle()
            .take(field.len() * 100)
            .collect();
        if tls
            .write_all(&frame(CONTINUATION, 0, 1, &chunk))
            .await
            .is_err()
        {
            write_failed = true;
            break;
        }
        sent += chunk.len();
    }
    // Either the server already closed on us, or it answers with a GOAWAY.
    if !write_failed {
        let code = goaway(&mut tls).await;
        assert!(code.is_some(), "no GOAWAY after 1 MiB of CONTINUATION");
    }
    let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, true).await;
    assert_eq!(client.get("a.test", "/echo").await.status, 200);
}

#[tokio::test]
async fn a_blocked_user_agent_gets_403_and_the_backend_never_sees_it() {
    use std::sync::atomic::Ordering;
    let scene = Scene::start("[firewall]\nblocked_user_agents = [\"(?i)sqlmap\"]\n").await;
    let web = plain_backend("web", false).await;
    let (backend, seen) = (web.addr, web.requests);
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(backend, &files))]);
    for h2 in [false, true] {
        let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, h2).await;
        let mut req = request("GET", "a.test", "/echo", client.is_h1(), Bytes::new());
        req.headers_mut().insert(
            "user-agent",
            "SQLMap/1.7 (https://sqlmap.org)".parse().unwrap(),
        );
        let answer = client.send(req).await.unwrap();
        assert_eq!(answer.status, 403);
        assert_eq!(answer.body, "forbidden\n");
        assert_eq!(
            seen.load(Ordering::SeqCst),
            0,
            "the backend saw a blocked request"
        );
        let mut req = request("GET", "a.test", "/echo", client.is_h1(), Bytes::new());
        req.headers_mut()
            .insert("user-agent", "curl/8.5.0".parse().unwrap());
        assert_eq!(client.send(req).await.unwrap().status, 200);
        assert_eq!(seen.swap(0, Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn a_backend_that_does_not_answer_in_response_timeout_is_504() {
    let scene = Scene::start(&proxy_section("response_timeout = \"1s\"")).await;
    let backend = http_backend("web").await;
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(backend, &files))]);
    let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, true).await;
    assert_eq!(client.get("a.test", "/slow?ms=100").await.status, 200);
    let answer = client.get("a.test", "/slow?ms=5000").await;
    assert_eq!(answer.status, 504);
    assert_eq!(
        answer.body,
        "gateway timeout: the backend did not answer in time\n"
    );
    let mut req = request("POST", "a.test", "/slow?ms=5000", false, Bytes::new());
    req.headers_mut()
        .insert("content-type", "application/grpc+proto".parse().unwrap());
    let answer = client.send(req).await.unwrap();
    assert_eq!(answer.headers["grpc-status"], "4");
}

#[tokio::test]
async fn an_http1_only_backend_works_in_auto_and_its_connections_are_pooled() {
    use std::sync::atomic::Ordering;
    let scene = Scene::start("").await;
    let forge = plain_backend("forge", true).await;
    let (backend, connections) = (forge.addr, forge.connections);
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(backend, &files))]);
    // Sequential requests from two client connections, HTTP/1.1 and HTTP/2.
    for h2 in [false, true] {
        let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, h2).await;
        for _ in 0..10 {
            let answer = client.get("a.test", "/echo").await;
            assert_eq!(answer.field("backend"), "forge");
            assert_eq!(answer.field("version"), "HTTP/1.1");
        }
    }
    // 20 requests, one at a time: one kept-alive upstream connection.
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "upstream connections"
    );
    let metrics = scene.server.metrics().await;
    assert_eq!(
        metrics.get("mc_proxy_upstream_connections_open"),
        Some(&1.0)
    );
}

#[tokio::test]
async fn tls_1_2_works_and_sessions_resume_with_tickets() {
    let scene = Scene::start("").await;
    let backend = http_backend("web").await;
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(backend, &files))]);
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let config = std::sync::Arc::new(
            rustls::ClientConfig::builder_with_protocol_versions(&[version])
                .with_root_certificates(scene.pki.roots())
                .with_no_client_auth(),
        );
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let mut tls = tls_connect(scene.addr(), "a.test", config.clone())
                .await
                .unwrap();
            assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
            // A request, so that TLS 1.3's tickets (sent after the
            // handshake) reach the client before it goes.
            use tokio::io::AsyncWriteExt;
            tls.write_all(b"GET /echo HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let answer = read_until(&mut tls, "body=").await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
            kinds.push(tls.get_ref().1.handshake_kind());
        }
        assert_eq!(
            kinds,
            [
                Some(rustls::HandshakeKind::Full),
                Some(rustls::HandshakeKind::Resumed)
            ],
            "{version:?}"
        );
    }
}

#[tokio::test]
async fn an_l7_route_added_through_the_admin_api_terminates_tls_from_the_next_connection() {
    use mc_proxy::admin::proto;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("route CA");
    let leaf = pki.leaf(&["git.test"]);
    let (cert, key) = (dir.path().join("git.pem"), dir.path().join("git.key"));
    std::fs::write(&cert, leaf.cert_pem.clone() + &pki.ca_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    let passthrough = tls_backend(&pki, "passthrough", &["git.test"]).await;
    let web = http_backend("forge").await;
    let server =
        InProcess::with_admin(dir.path(), ONE_LISTENER, &[("git.test", passthrough.addr)]).await;
    assert_eq!(
        who(server.addr(), "git.test", &pki).await.unwrap(),
        "passthrough"
    );

    // The control plane switches the route to L7 with the same call it
    // always makes, plus the mode and the certificate.
    let mut admin = admin_client(&dir.path().join("admin.sock")).await;
    let route = proto::Route {
        listener_addr: ONE_LISTENER.into(),
        hostname: "git.test".into(),
        backend: web.to_string(),
        mode: proto::RouteMode::L7 as i32,
        tls_cert: cert.display().to_string(),
        tls_key: key.display().to_string(),
        ..Default::default()
    };
    admin
        .add_route(proto::AddRouteRequest {
            route: Some(route.clone()),
        })
        .await
        .unwrap();
    let mut client = L7Client::connect(server.addr(), "git.test", &pki, true).await;
    let answer = client.get("git.test", "/echo").await;
    assert_eq!(answer.field("backend"), "forge");
    assert_eq!(answer.field("x-forwarded-for"), "127.0.0.1");
    // ListRoutes gives the mode back: it was not dropped on the way.
    let listed = admin
        .list_routes(proto::ListRoutesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .routes;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].mode, proto::RouteMode::L7 as i32);
    assert_eq!(listed[0].tls_cert, route.tls_cert);
}

#[tokio::test]
async fn keep_alive_connections_live_until_idle_timeout_not_handshake_timeout() {
    let scene = Scene::start(&proxy_section(
        "handshake_timeout = \"1s\"\nidle_timeout = \"4s\"",
    ))
    .await;
    let backend = http_backend("web").await;
    let files = scene.cert("a", &["a.test"]);
    scene.set_routes(&[("a.test", l7(backend, &files))]);
    for h2 in [false, true] {
        let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, h2).await;
        assert_eq!(client.get("a.test", "/echo").await.status, 200);
        // Idle past handshake_timeout: still open.
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        assert_eq!(client.get("a.test", "/echo").await.status, 200, "h2={h2}");
    }
    // Idle past idle_timeout: closed by the server (outcome idle_timeout).
    let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, false).await;
    assert_eq!(client.get("a.test", "/echo").await.status, 200);
    scene.server.wait_closed("idle_timeout", 1.0).await;
}

#[tokio::test]
async fn an_l7_default_route_takes_unknown_hosts_and_clients_without_sni() {
    let scene = Scene::start("").await;
    let (named, fallback) = (http_backend("named").await, http_backend("default").await);
    let named_files = scene.cert("a", &["a.test"]);
    let default_files = scene.cert("default", &["other.test", "127.0.0.1"]);
    scene.set_routes(&[
        ("a.test", l7(named, &named_files)),
        ("*", l7(fallback, &default_files)),
    ]);
    // An unknown SNI gets the default route's certificate and backend; so
    // does an unknown Host on that connection, and an IP literal.
    let mut client = L7Client::connect(scene.addr(), "other.test", &scene.pki, true).await;
    assert_eq!(
        client.get("other.test", "/echo").await.field("backend"),
        "default"
    );
    assert_eq!(
        client.get("unknown.test", "/echo").await.field("backend"),
        "default"
    );
    assert_eq!(
        client.get("127.0.0.1:443", "/echo").await.field("backend"),
        "default"
    );
    // a.test has its own certificate: not on this connection.
    assert_eq!(client.get("a.test", "/echo").await.status, 421);
    // No SNI at all (rustls sends none to an IP address).
    let mut client = L7Client::connect(scene.addr(), "127.0.0.1", &scene.pki, false).await;
    assert_eq!(
        client.get("127.0.0.1", "/echo").await.field("backend"),
        "default"
    );
    // The named route still wins for its own name.
    let mut client = L7Client::connect(scene.addr(), "a.test", &scene.pki, true).await;
    assert_eq!(
        client.get("a.test", "/echo").await.field("backend"),
        "named"
    );
}
