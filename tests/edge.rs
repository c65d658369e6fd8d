//! Edge features end to end, with the real binary on loopback: PROXY
//! protocol in (v1 and v2 from real header bytes) and out (two chained
//! instances), wildcard routes through the config, the admin API and the
//! CLI, and `/metrics` scraped after known traffic.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const GEOIP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/geoip/GeoLite2-Country-Test.mmdb"
);

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY v2 header, byte by byte as the spec lays it out.
fn v2_header(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x20 | command);
    out.push(family);
    out.extend_from_slice(&(block.len() as u16).to_be_bytes());
    out.extend_from_slice(block);
    out
}

/// A v2 PROXY TCP header from `source` to `destination` (both IPv4: TCP4,
/// both IPv6: TCP6), then `tlvs`.
fn v2_tcp(source: SocketAddr, destination: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let (mut block, family) = match (source.ip(), destination.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => ([src.octets(), dst.octets()].concat(), 0x11),
        (IpAddr::V6(src), IpAddr::V6(dst)) => ([src.octets(), dst.octets()].concat(), 0x21),
        _ => panic!("mixed families"),
    };
    block.extend_from_slice(&source.port().to_be_bytes());
    block.extend_from_slice(&destination.port().to_be_bytes());
    block.extend_from_slice(tlvs);
    v2_header(0x1, family, &block)
}

/// TLVs a real upstream sends: NOOP padding, ALPN, an SSL block with a
/// sub-TLV, a unique ID.
const SAMPLE_TLVS: &[u8] = &[
    0x04, 0x00, 0x03, 0, 0, 0, // PP2_TYPE_NOOP
    0x01, 0x00, 0x02, b'h', b'2', // PP2_TYPE_ALPN
    0x20, 0x00, 0x0c, 0x01, 0, 0, 0, 0, // PP2_TYPE_SSL: client, verify
    0x21, 0x00, 0x04, b'T', b'L', b'S', b'3', // PP2_SUBTYPE_SSL_VERSION
    0x05, 0x00, 0x04, 1, 2, 3, 4, // PP2_TYPE_UNIQUE_ID
];

// ---- PROXY protocol in -------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v1_and_v2_headers_name_the_client_and_only_the_hello_reaches_the_backend() {
    let mut backend = raw_backend(b"pong").await;
    let proxy = Proxy::in_temp_dir(|_| {
        proxy_protocol_listener("127.0.0.1:0", &[route("a.test", backend.addr)])
    });
    let port = proxy.addr().port();
    let hello = client_hello(Some("a.test"));
    let multi_record_hello = records(&hello_message(Some("a.test"), 600), 100);
    let to = local(port);
    let v1_tcp4 = b"PROXY TCP4 198.51.100.20 127.0.0.1 5555 443\r\n".to_vec();
    let v1_tcp6 = b"PROXY TCP6 2001:db8::20 ::1 6666 443\r\n".to_vec();
    let v2_with_tlvs = v2_tcp("203.0.113.30:7777".parse().unwrap(), to, SAMPLE_TLVS);
    let v2_ipv6 = v2_tcp(
        "[2001:db8::40]:8888".parse().unwrap(),
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 443),
        &[],
    );
    // (header, hello, byte at a time, header and hello in one write, client= in the log)
    type Case<'a> = (Vec<u8>, &'a Vec<u8>, bool, bool, &'static str);
    let cases: Vec<Case> = vec![
        (v1_tcp4, &hello, false, true, "client=198.51.100.20:5555 "),
        (
            v1_tcp6,
            &multi_record_hello,
            true,
            false,
            "client=[2001:db8::20]:6666 ",
        ),
        (
            v2_with_tlvs.clone(),
            &hello,
            false,
            true,
            "client=203.0.113.30:7777 ",
        ),
        (
            v2_with_tlvs,
            &multi_record_hello,
            true,
            false,
            "client=203.0.113.30:7777 ",
        ),
        (v2_ipv6, &hello, false, false, "client=[2001:db8::40]:8888 "),
    ];
    for (header, hello, byte_at_a_time, one_write, client) in &cases {
        let mut stream = TcpStream::connect(to).await.unwrap();
        let together = [header.as_slice(), hello.as_slice()].concat();
        let parts: Vec<&[u8]> = if *one_write {
            vec![together.as_slice()]
        } else {
            vec![header.as_slice(), hello.as_slice()]
        };
        let (reply, _) = exchange(&mut stream, &parts, *byte_at_a_time).await;
        assert_eq!(reply, b"pong", "case {client}");
        assert_eq!(
            &backend.next().await,
            *hello,
            "the backend must get the hello without the header ({client})"
        );
        let line = proxy.wait_log(&[client, "outcome=relayed"], Duration::from_secs(5));
        assert!(line.contains("upstream=127.0.0.1:"), "{line}");
    }

    // LOCAL (an upstream's health check) and UNKNOWN: the socket's peer.
    for header in [v2_header(0x0, 0x00, &[]), b"PROXY UNKNOWN\r\n".to_vec()] {
        let mut stream = connect_from("127.0.0.3", to).await.unwrap();
        let (reply, _) = exchange(&mut stream, &[&header, &hello], false).await;
        assert_eq!(reply, b"pong");
        assert_eq!(backend.next().await, hello);
    }
    proxy.wait_conns(
        &["client=127.0.0.3:", "outcome=relayed"],
        2,
        Duration::from_secs(10),
    );
    assert_eq!(backend.accepted.load(Ordering::SeqCst), cases.len() + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geoip_judges_the_address_in_the_v2_header_not_the_socket_peer() {
    let mut backend = raw_backend(b"pong").await;
    let proxy = Proxy::in_temp_dir(|_| {
        format!(
            "{}[firewall]\ngeoip_db = \"{GEOIP}\"\nblocked_countries = [\"GB\"]\n",
            proxy_protocol_listener("127.0.0.1:0", &[route("a.test", backend.addr)]),
        )
    });
    let port = proxy.addr().port();
    let to = local(port);
    let hello = client_hello(Some("a.test"));

    // 81.2.69.142 is GB in the test database: reset, nothing read or sent.
    let mut stream = TcpStream::connect(to).await.unwrap();
    let header = v2_tcp("81.2.69.142:40000".parse().unwrap(), to, &[]);
    stream
        .write_all(&[header, hello.clone()].concat())
        .await
        .unwrap();
    let (got, result) = read_all(&mut stream, Duration::from_secs(10)).await;
    assert!(got.is_empty());
    assert!(saw_reset(&result), "a refusal is a reset: {result:?}");
    let line = proxy.wait_log(
        &["client=81.2.69.142:40000 ", "outcome=blocked:country:GB"],
        Duration::from_secs(5),
    );
    assert!(line.contains("upstream=127.0.0.1:"), "{line}");
    assert!(!line.contains("sni="), "judged before the hello: {line}");

    // 216.160.83.56 is US: routed.
    let mut stream = TcpStream::connect(to).await.unwrap();
    let header = v2_tcp("216.160.83.56:40001".parse().unwrap(), to, SAMPLE_TLVS);
    let (reply, _) = exchange(&mut stream, &[&header, &hello], false).await;
    assert_eq!(reply, b"pong");
    assert_eq!(backend.next().await, hello);
    proxy.wait_log(
        &[
            "client=216.160.83.56:40001 ",
            "outcome=relayed",
            "sni=a.test",
        ],
        Duration::from_secs(5),
    );
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_garbled_proxy_headers_are_closed_without_a_byte() {
    let backend = raw_backend(b"should never be seen").await;
    let proxy = Proxy::in_temp_dir(|_| {
        format!(
            "{}{}",
            proxy_protocol_listener("127.0.0.1:0", &[route("a.test", backend.addr)]),
            "[proxy]\nhandshake_timeout = \"1s\"\n"
        )
    });
    let port = proxy.addr().port();
    let to = local(port);
    let hello = client_hello(Some("a.test"));
    let mut long_v1 = b"PROXY UNKNOWN ".to_vec();
    long_v1.resize(200, b'x');
    let mut bad_version = V2_SIGNATURE.to_vec();
    bad_version.extend_from_slice(&[0x11, 0x11, 0x00, 0x0c]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no header, just the hello", hello.clone()),
        (
            "bad v1 address",
            [&b"PROXY TCP4 1.2.3 127.0.0.1 1 2\r\n"[..], &hello].concat(),
        ),
        (
            "v1 family mismatch",
            [&b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n"[..], &hello].concat(),
        ),
        ("v1 without CRLF in 107 bytes", long_v1),
        ("v2 version 1", [bad_version, hello.clone()].concat()),
        ("v2 over UDP", v2_header(0x1, 0x12, &[0u8; 12])),
        (
            "v2 TLVs overrunning the header",
            v2_tcp(
                "192.0.2.1:1".parse().unwrap(),
                to,
                &[0x01, 0x00, 0x09, b'x'],
            ),
        ),
        ("HTTP", b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec()),
        ("half a header, then FIN", b"PROXY TCP4 192.0.2.".to_vec()),
    ];
    for (case, bytes) in &cases {
        let mut stream = TcpStream::connect(to).await.unwrap();
        let (got, _) = exchange(&mut stream, &[bytes], false).await;
        assert!(got.is_empty(), "{case}: client got {} bytes", got.len());
    }
    proxy.wait_conns(
        &["outcome=bad_proxy_header"],
        cases.len(),
        Duration::from_secs(10),
    );

    // A header that never completes: closed at handshake_timeout, silently.
    let mut stream = TcpStream::connect(to).await.unwrap();
    stream.write_all(b"PROXY TCP4 192.0.2.").await.unwrap();
    let started = Instant::now();
    let (got, _) = read_all(&mut stream, Duration::from_secs(10)).await;
    assert!(got.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));
    proxy.wait_log(&["outcome=hello_timeout"], Duration::from_secs(5));
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(proxy.conn_lines().len(), cases.len() + 1);
}

// ---- PROXY protocol out ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_protocol_prepends_a_v2_header_with_client_and_listener_addresses() {
    let mut backend = raw_backend(b"pong").await;
    let proxy = Proxy::in_temp_dir(|_| {
        listener(
            "127.0.0.1:0",
            &[
                proxied_route("p.test", backend.addr),
                route("plain.test", backend.addr),
            ],
        )
    });
    let port = proxy.addr().port();
    let to = local(port);
    let hello = client_hello(Some("p.test"));
    let mut stream = connect_from("127.0.0.4", to).await.unwrap();
    let client = stream.local_addr().unwrap();
    let (reply, _) = exchange(&mut stream, &[&hello], false).await;
    assert_eq!(reply, b"pong");
    let mut expected = v2_tcp(client, to, &[]);
    expected.extend_from_slice(&hello);
    assert_eq!(backend.next().await, expected);
    // up= counts the client's bytes, not the header.
    proxy.wait_log(
        &[
            &format!("client={client} "),
            &format!("up={} ", hello.len()),
            "outcome=relayed",
        ],
        Duration::from_secs(5),
    );

    // A route without the flag sends the hello alone.
    let hello = client_hello(Some("plain.test"));
    let mut stream = TcpStream::connect(to).await.unwrap();
    let (reply, _) = exchange(&mut stream, &[&hello], false).await;
    assert_eq!(reply, b"pong");
    assert_eq!(backend.next().await, hello);
}

/// An edge instance forwards to an origin instance with a PROXY v2 header;
/// the origin firewalls and logs the original client, not the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_to_origin_chain_shows_the_original_client_at_the_origin() {
    let pki = Pki::new("chain CA");
    let a = tls_backend(&pki, "A", &["a.test"]).await;
    let b = tls_backend(&pki, "B", &["b.test"]).await;
    let origin = Proxy::in_temp_dir(|_| {
        format!(
            "{}[firewall]\nblocked_ips = [\"127.0.0.5\"]\n",
            proxy_protocol_listener(
                "127.0.0.1:0",
                &[route("a.test", a.addr), route("b.test", b.addr)]
            ),
        )
    });
    let origin_addr = origin.addr();
    let edge = Proxy::in_temp_dir(|dir| {
        format!(
            "{}{}",
            listener("127.0.0.1:0", &[proxied_route("a.test", origin_addr)]),
            admin_socket(dir),
        )
    });
    let edge_addr = edge.listener("127.0.0.1:0");
    // The second route goes in through the CLI, flag and all.
    let edge_config = edge.config.to_str().unwrap().to_string();
    let (code, stdout, stderr) = run_cli(&[
        "routes",
        "add",
        "-c",
        &edge_config,
        "--listener",
        "127.0.0.1:0",
        "--hostname",
        "B.test.",
        "--backend",
        &origin_addr.to_string(),
        "--send-proxy-protocol",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (code, stdout, _) = run_cli(&["routes", "list", "-c", &edge_config, "--json"]);
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let b_route = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["hostname"] == "b.test")
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(b_route["send_proxy_protocol"], true, "{stdout}");

    let through_chain = |from: &'static str, sni: &'static str| {
        let config = pki.client_config();
        async move {
            let tcp = connect_from(from, edge_addr).await.unwrap();
            let port = tcp.local_addr().unwrap().port();
            let result = tokio::time::timeout(Duration::from_secs(10), tls_over(tcp, sni, config))
                .await
                .expect("TLS through the chain timed out");
            let who = match result {
                Ok(mut tls) => {
                    let line = read_line(&mut tls).await.ok();
                    if line.is_some() {
                        tls.write_all(b"through two proxies\n").await.unwrap();
                        assert_eq!(read_line(&mut tls).await.unwrap(), "through two proxies");
                    }
                    line
                }
                Err(_) => None,
            };
            (port, who)
        }
    };

    let (port, who) = through_chain("127.0.0.6", "a.test").await;
    assert_eq!(who.as_deref(), Some("backend=A"));
    let client = format!("client=127.0.0.6:{port} ");
    edge.wait_log(&[&client, "outcome=relayed"], Duration::from_secs(10));
    let line = origin.wait_log(
        &[&client, "outcome=relayed", "sni=a.test"],
        Duration::from_secs(10),
    );
    assert!(line.contains("upstream=127.0.0.1:"), "{line}");

    let (port, who) = through_chain("127.0.0.7", "b.test").await;
    assert_eq!(who.as_deref(), Some("backend=B"));
    origin.wait_log(
        &[
            &format!("client=127.0.0.7:{port} "),
            "outcome=relayed",
            "sni=b.test",
        ],
        Duration::from_secs(10),
    );

    // The origin's firewall blocks 127.0.0.5 although every connection it
    // accepts comes from the edge at 127.0.0.1.
    let (port, who) = through_chain("127.0.0.5", "a.test").await;
    assert_eq!(who, None, "a blocked client must not reach A");
    origin.wait_log(
        &[&format!("client=127.0.0.5:{port} "), "outcome=blocked:ip"],
        Duration::from_secs(10),
    );
    assert_eq!(a.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
}

// ---- wildcard routes ----------------------------------------------------------

async fn routed_to(addr: SocketAddr, sni: &str, backends: &mut [&mut RawBackend]) -> Option<usize> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let hello = client_hello(Some(sni));
    let (reply, _) = exchange(&mut stream, &[&hello], false).await;
    if reply.is_empty() {
        return None;
    }
    // The backend records the connection just after it replies: wait for
    // whichever backend it was.
    let first = std::future::poll_fn(|cx| {
        for (index, backend) in backends.iter_mut().enumerate() {
            if let std::task::Poll::Ready(bytes) = backend.received.poll_recv(cx) {
                return std::task::Poll::Ready((index, bytes));
            }
        }
        std::task::Poll::Pending
    });
    let (index, bytes) = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .unwrap_or_else(|_| panic!("reply {reply:?} but no backend recorded the connection"));
    assert_eq!(bytes, Some(hello));
    Some(index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_match_one_label_below_exact_routes_via_config_admin_and_cli() {
    let dir = tempfile::tempdir().unwrap();
    let mut wild = raw_backend(b"wild").await;
    let mut exact = raw_backend(b"exact").await;
    let mut other = raw_backend(b"other").await;
    let listener_addr = "127.0.0.1:0".to_string();
    let mut proxy = Proxy::start(
        dir.path(),
        &config(
            dir.path(),
            &format!(
                "{}{}",
                listener(
                    &listener_addr,
                    &[
                        route("*.W.test.", wild.addr),
                        route("exact.w.test", exact.addr)
                    ]
                ),
                admin_socket(dir.path())
            ),
        ),
    );
    let port = proxy.listener("127.0.0.1:0").port();
    let to = local(port);
    for (sni, expected) in [
        ("a.w.test", Some(0)),
        ("A.W.TEST.", Some(0)),
        ("exact.w.test", Some(1)),
        ("a.b.w.test", None),
        ("w.test", None),
        ("exact.w.test.x", None),
    ] {
        let got = routed_to(to, sni, &mut [&mut wild, &mut exact, &mut other]).await;
        assert_eq!(got, expected, "{sni}");
    }

    // Through the CLI (admin API, store): add a wildcard, drop the exact.
    let config_path = proxy.config.to_str().unwrap().to_string();
    let cli = |args: &[&str]| {
        let mut all = vec![args[0], args[1], "-c", &config_path];
        all.extend_from_slice(&args[2..]);
        run_cli(&all)
    };
    let (code, stdout, stderr) = cli(&[
        "routes",
        "add",
        "--listener",
        &listener_addr,
        "--hostname",
        "*.Other.test",
        "--backend",
        &other.addr.to_string(),
    ]);
    assert_eq!((code, stdout.as_str()), (0, "created\n"), "{stderr}");
    let (code, _, stderr) = cli(&[
        "routes",
        "remove",
        "--listener",
        &listener_addr,
        "--hostname",
        "EXACT.w.test",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        routed_to(to, "x.other.test", &mut [&mut wild, &mut exact, &mut other]).await,
        Some(2)
    );
    assert_eq!(
        routed_to(to, "exact.w.test", &mut [&mut wild, &mut exact, &mut other]).await,
        Some(0),
        "with the exact route gone the wildcard takes it"
    );

    // Bad wildcard forms: INVALID_ARGUMENT naming the field, nothing stored.
    for bad in [
        "a*.w.test",
        "*.*.w.test",
        // (`*` alone is the default route, tests/default_route.rs.)
        "*.",
        "*.test",
        "a.*.w.test",
        "**.w.test",
    ] {
        let (code, _, stderr) = cli(&[
            "routes",
            "add",
            "--listener",
            &listener_addr,
            "--hostname",
            bad,
            "--backend",
            &other.addr.to_string(),
        ]);
        assert_eq!(code, 1, "{bad}: {stderr}");
        assert!(
            stderr.contains("INVALID_ARGUMENT") && stderr.contains("route.hostname"),
            "{bad}: {stderr}"
        );
    }
    let (code, stdout, _) = cli(&["routes", "list", "--json"]);
    assert_eq!(code, 0);
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["hostname"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["*.other.test", "*.w.test"]);

    // The store kept the wildcard: after a restart it still routes.
    proxy.signal("TERM");
    assert!(proxy.wait_exit(Duration::from_secs(10)).is_some());
    let restarted = Proxy::start_existing(dir.path(), &proxy.config.clone());
    let to = restarted.listener(&listener_addr);
    assert_eq!(
        routed_to(to, "y.other.test", &mut [&mut wild, &mut exact, &mut other]).await,
        Some(2)
    );
}

#[test]
fn check_rejects_bad_wildcards_and_bad_edge_keys_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let check = |body: &str| {
        std::fs::write(&path, format!("[database]\npath = \"x.db\"\n{body}")).unwrap();
        run_cli(&["check", "-c", path.to_str().unwrap()])
    };
    // (`*` alone is the default route, tests/default_route.rs.)
    for bad in ["a*.x.test", "*.*.x.test", "*.", "*.test", "x.*.test"] {
        let (code, _, stderr) = check(&format!(
            "[[listeners]]\naddr = \":1\"\n  [[listeners.routes]]\n  hostname = \"{bad}\"\n  backend = \"127.0.0.1:1\"\n"
        ));
        assert_eq!(code, 2, "{bad}: {stderr}");
        assert!(
            stderr.contains("listeners[0].routes[0].hostname"),
            "{bad}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    for (body, key) in [
        (
            "[[listeners]]\naddr = \":1\"\nproxy_protocol = \"yes\"\n",
            "listeners[0].proxy_protocol",
        ),
        (
            "[[listeners]]\naddr = \":1\"\n  [[listeners.routes]]\n  hostname = \"a.test\"\n  backend = \"127.0.0.1:1\"\n  send_proxy_protocol = 1\n",
            "listeners[0].routes[0].send_proxy_protocol",
        ),
        ("[metrics]\naddr = \"localhost\"\n", "metrics.addr"),
        ("[metrics]\n", "metrics.addr"),
        ("[metrics]\naddr = \"127.0.0.1:9091\"\npath = \"/m\"\n", "metrics.path"),
    ] {
        let (code, _, stderr) = check(body);
        assert_eq!(code, 2, "{body}: {stderr}");
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
    let (code, _, stderr) = check(
        "[[listeners]]\naddr = \":1\"\nproxy_protocol = true\n  [[listeners.routes]]\n  hostname = \"*.x.test\"\n  backend = \"127.0.0.1:1\"\n  send_proxy_protocol = true\n[metrics]\naddr = \"127.0.0.1:9091\"\n",
    );
    assert_eq!(code, 0, "{stderr}");
}

// ---- metrics ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_known_traffic_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut backend = raw_backend(b"pong").await;
    let plain = "127.0.0.1:0".to_string();
    let pp = "127.0.0.2:0".to_string();
    let proxy = Proxy::start(
        dir.path(),
        &config(
            dir.path(),
            &format!(
                "{}{}{}[firewall]\nblocked_ips = [\"127.0.0.9\"]\nblocked_cidrs = [\"192.0.2.0/24\"]\n{METRICS_ANY_PORT}",
                listener(&plain, &[route("a.test", backend.addr), route("*.w.test", backend.addr)]),
                proxy_protocol_listener(&pp, &[route("a.test", backend.addr)]),
                admin_socket(dir.path()),
            ),
        ),
    );
    let (plain_addr, pp_addr) = (proxy.listener(&plain), proxy.listener(&pp));
    let hello = client_hello(Some("a.test"));

    // Plain listener: 2 relayed, 1 no route, 1 blocked by IP.
    for _ in 0..2 {
        let mut stream = TcpStream::connect(plain_addr).await.unwrap();
        let (reply, _) = exchange(&mut stream, &[&hello], false).await;
        assert_eq!(reply, b"pong");
        backend.next().await;
    }
    let mut stream = TcpStream::connect(plain_addr).await.unwrap();
    let (got, _) = exchange(&mut stream, &[&client_hello(Some("nowhere.test"))], false).await;
    assert!(got.is_empty());
    // The reset can beat connect() itself to the finish line.
    if let Ok(mut stream) = connect_from("127.0.0.9", plain_addr).await {
        let (got, _) = exchange(&mut stream, &[&hello], false).await;
        assert!(got.is_empty());
    }
    // PROXY listener: 1 bad header, 1 blocked by CIDR (the carried address).
    let mut stream = TcpStream::connect(pp_addr).await.unwrap();
    let (got, _) = exchange(&mut stream, &[&hello], false).await;
    assert!(got.is_empty());
    let mut stream = TcpStream::connect(pp_addr).await.unwrap();
    let (got, _) = exchange(
        &mut stream,
        &[b"PROXY TCP4 192.0.2.77 127.0.0.1 1000 443\r\n", &hello],
        false,
    )
    .await;
    assert!(got.is_empty());
    proxy.wait_conns(&[], 6, Duration::from_secs(10));

    // Admin calls: one good, one refused.
    assert_eq!(proxy.cli(&["routes", "list"]).0, 0);
    let (code, _, stderr) = proxy.routes_add(&plain, "a*.test", "127.0.0.1:1");
    assert_eq!(code, 1, "{stderr}");

    let metrics_addr = proxy.metrics_addr();
    // The active gauge drops just after the log line; wait for it. Then
    // nothing moves any more: one more scrape is the one checked.
    let active = |listener: &str| format!("mc_proxy_connections_active{{listener=\"{listener}\"}}");
    wait_metrics(metrics_addr, Duration::from_secs(10), |values| {
        values.get(&active(&plain)) == Some(&0.0) && values.get(&active(&pp)) == Some(&0.0)
    })
    .await;
    let (status, headers, body) = http_get(metrics_addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{headers}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let values = parse_metrics(&body);
    let hello_len = hello.len() as f64;
    let version = mc_proxy_version();
    for (series, expected) in [
        (format!("mc_proxy_connections_accepted_total{{listener=\"{plain}\"}}"), 4.0),
        (format!("mc_proxy_connections_accepted_total{{listener=\"{pp}\"}}"), 2.0),
        (format!("mc_proxy_connections_closed_total{{listener=\"{plain}\",outcome=\"relayed\"}}"), 2.0),
        (format!("mc_proxy_connections_closed_total{{listener=\"{plain}\",outcome=\"no_route\"}}"), 1.0),
        (format!("mc_proxy_connections_closed_total{{listener=\"{plain}\",outcome=\"blocked\"}}"), 1.0),
        (format!("mc_proxy_connections_closed_total{{listener=\"{plain}\",outcome=\"bad_hello\"}}"), 0.0),
        (format!("mc_proxy_connections_closed_total{{listener=\"{pp}\",outcome=\"bad_proxy_header\"}}"), 1.0),
        (format!("mc_proxy_connections_closed_total{{listener=\"{pp}\",outcome=\"blocked\"}}"), 1.0),
        (format!("mc_proxy_connections_closed_total{{listener=\"{pp}\",outcome=\"relayed\"}}"), 0.0),
        (format!("mc_proxy_connections_blocked_total{{listener=\"{plain}\",rule=\"ip\"}}"), 1.0),
        (format!("mc_proxy_connections_blocked_total{{listener=\"{plain}\",rule=\"cidr\"}}"), 0.0),
        (format!("mc_proxy_connections_blocked_total{{listener=\"{pp}\",rule=\"cidr\"}}"), 1.0),
        (format!("mc_proxy_relayed_bytes_total{{listener=\"{plain}\",direction=\"up\"}}"), 2.0 * hello_len),
        (format!("mc_proxy_relayed_bytes_total{{listener=\"{plain}\",direction=\"down\"}}"), 8.0),
        (format!("mc_proxy_relayed_bytes_total{{listener=\"{pp}\",direction=\"up\"}}"), 0.0),
        (format!("mc_proxy_hello_duration_seconds_count{{listener=\"{plain}\"}}"), 3.0),
        (format!("mc_proxy_hello_duration_seconds_bucket{{le=\"+Inf\",listener=\"{plain}\"}}"), 3.0),
        (format!("mc_proxy_hello_duration_seconds_count{{listener=\"{pp}\"}}"), 0.0),
        (format!("mc_proxy_backend_connect_duration_seconds_count{{listener=\"{plain}\"}}"), 2.0),
        (format!("mc_proxy_routes{{listener=\"{plain}\"}}"), 2.0),
        (format!("mc_proxy_routes{{listener=\"{pp}\"}}"), 1.0),
        ("mc_proxy_firewall_rules{rule=\"ip\"}".to_string(), 1.0),
        ("mc_proxy_firewall_rules{rule=\"cidr\"}".to_string(), 1.0),
        ("mc_proxy_firewall_rules{rule=\"country\"}".to_string(), 0.0),
        ("mc_proxy_admin_calls_total{method=\"ListRoutes\",code=\"OK\"}".to_string(), 1.0),
        ("mc_proxy_admin_calls_total{method=\"AddRoute\",code=\"INVALID_ARGUMENT\"}".to_string(), 1.0),
        (format!("mc_proxy_build_info{{version=\"{version}\"}}"), 1.0),
    ] {
        assert_eq!(values.get(&series), Some(&expected), "{series} in:\n{body}");
    }
    // No hostname ever becomes a label.
    assert!(
        !body.contains("a.test") && !body.contains("nowhere"),
        "{body}"
    );

    // Route counts follow the live table.
    let (code, _, stderr) = proxy.routes_add(&pp, "b.test", "127.0.0.1:1");
    assert_eq!(code, 0, "{stderr}");
    let values = parse_metrics(&http_get(metrics_addr, "/metrics").await.2);
    assert_eq!(
        values.get(&format!("mc_proxy_routes{{listener=\"{pp}\"}}")),
        Some(&2.0)
    );
    assert_eq!(
        values.get("mc_proxy_admin_calls_total{method=\"AddRoute\",code=\"OK\"}"),
        Some(&1.0)
    );

    let (status, _, _) = http_get(metrics_addr, "/").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

/// The version as `--version` prints it, without the `mc-proxy ` prefix.
fn mc_proxy_version() -> String {
    let (_, stdout, _) = run_cli(&["--version"]);
    stdout.trim().trim_start_matches("mc-proxy ").to_string()
}

#[test]
fn metrics_addr_in_use_exits_1_naming_metrics_addr() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("c.toml");
    std::fs::write(
        &path,
        config(
            dir.path(),
            &format!(
                "{}[metrics]\naddr = \"{}\"\n",
                listener("127.0.0.1:0", &[]),
                taken.local_addr().unwrap()
            ),
        ),
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["server", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("metrics.addr"), "{stderr}");
}
