//! QUIC flows through the real binary with hand-built client Initials
//! (`wire::quic::build`) and plain UDP backends: the parts of the flow life
//! that need exact control of the datagrams — a hello over two Initials in
//! either order, retransmitted refusals logged once, failover from a
//! refusing and from a silent backend, a backend by name, the pending
//! flow's byte cap and its timeout, QUIC v2. The real QUIC peers (quinn,
//! aioquic, Chromium) are in tests/quic.rs and tests/quic_peers.rs.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use wire::quic::build::{crypto, Client, PADDING};
use wire::quic::Version;

use common::*;

/// What a UDP backend received, in order.
type Received = Arc<Mutex<Vec<Vec<u8>>>>;

/// A UDP backend answering each datagram with `name` and the datagram's
/// length; records what it got.
async fn udp_backend(name: &'static str) -> (SocketAddr, Received) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let received: Received = Arc::default();
    let log = received.clone();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65_535];
        while let Ok((n, from)) = socket.recv_from(&mut buffer).await {
            log.lock().unwrap().push(buffer[..n].to_vec());
            let reply = format!("{name}:{n}");
            let _ = socket.send_to(reply.as_bytes(), from).await;
        }
    });
    (addr, received)
}

/// A UDP socket bound and never read: a blackholed backend.
fn silent_backend() -> (SocketAddr, std::net::UdpSocket) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    (socket.local_addr().unwrap(), socket)
}

/// A port with nothing listening on UDP: sends there get ICMP port
/// unreachable.
fn refusing_backend() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

fn quic_config(dir: &Path, routes: &str, proxy: &str) -> String {
    admin_config(
        dir,
        &format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\nquic = true\n{routes}\n{}{METRICS_ANY_PORT}",
            proxy_section(proxy)
        ),
    )
}

/// One Initial datagram carrying `frames`, padded to 1,200 bytes.
fn padded(client: &Client, packet_number: u64, frames: &[u8]) -> Vec<u8> {
    let mut payload = frames.to_vec();
    let bare = client.initial(packet_number, &payload).len();
    payload.resize(payload.len() + 1200usize.saturating_sub(bare), PADDING);
    client.initial(packet_number, &payload)
}

async fn client_socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// The next datagram on `socket` within `limit`, if any.
async fn reply_within(socket: &UdpSocket, limit: Duration) -> Option<Vec<u8>> {
    let mut buffer = vec![0u8; 65_535];
    match tokio::time::timeout(limit, socket.recv(&mut buffer)).await {
        Ok(Ok(n)) => Some(buffer[..n].to_vec()),
        _ => None,
    }
}

/// Waits until at least `n` `flow closed` lines contain every needle.
fn wait_flows(proxy: &Proxy, needles: &[&str], n: usize) -> Vec<String> {
    for _ in 0..200 {
        let lines: Vec<String> = flow_lines(proxy)
            .into_iter()
            .filter(|l| needles.iter().all(|needle| l.contains(needle)))
            .collect();
        if lines.len() >= n {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "fewer than {n} flow lines with {needles:?}:\n{}",
        proxy.log_text()
    );
}

fn flow_lines(proxy: &Proxy) -> Vec<String> {
    proxy
        .log_text()
        .lines()
        .filter(|l| l.contains("flow closed"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_over_two_initials_in_either_order_is_routed_and_both_reach_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, received) = udp_backend("A").await;
    let proxy = Proxy::start(
        dir.path(),
        &quic_config(
            dir.path(),
            &route("two.test", backend),
            "idle_timeout = \"1s\"",
        ),
    );
    let addr = proxy.addr();
    // A hello of about 2,000 bytes: two Initials, as a post-quantum hello.
    let hello = hello_message(Some("two.test"), 2000);
    let (first, second) = hello.split_at(1000);
    for (round, order) in [[0usize, 1], [1, 0]].into_iter().enumerate() {
        let client = Client::new(Version::V1, &[round as u8 + 1; 8], &[9; 4]);
        let datagrams = [
            padded(&client, 0, &crypto(0, first)),
            padded(&client, 1, &crypto(first.len() as u64, second)),
        ];
        let socket = client_socket().await;
        received.lock().unwrap().clear();
        for &i in &order {
            socket.send_to(&datagrams[i], addr).await.unwrap();
        }
        let reply = reply_within(&socket, Duration::from_secs(5)).await;
        assert!(reply.is_some_and(|r| r.starts_with(b"A:")), "round {round}");
        // Both datagrams, byte for byte, in the order they came.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while received.lock().unwrap().len() < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = received.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![datagrams[order[0]].clone(), datagrams[order[1]].clone()]
        );
    }
    let lines = wait_flows(
        &proxy,
        &["transport=quic", "sni=two.test", "outcome=relayed"],
        2,
    );
    assert!(
        lines
            .iter()
            .all(|l| l.contains(&format!("backend={backend}"))),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmitted_initials_of_a_refused_flow_get_nothing_and_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, received) = udp_backend("A").await;
    let proxy = Proxy::start(
        dir.path(),
        &quic_config(dir.path(), &route("known.test", backend), ""),
    );
    let addr = proxy.addr();
    let client = Client::new(Version::V1, &[3; 8], &[9; 4]);
    let initial = client.datagram(&hello_message(Some("unknown.test"), 0));
    let socket = client_socket().await;
    for _ in 0..5 {
        socket.send_to(&initial, addr).await.unwrap();
        assert_eq!(
            reply_within(&socket, Duration::from_millis(200)).await,
            None
        );
    }
    proxy.wait_log(
        &["flow closed", "sni=unknown.test", "outcome=no_route"],
        Duration::from_secs(5),
    );
    let lines: Vec<_> = flow_lines(&proxy)
        .into_iter()
        .filter(|l| l.contains("unknown.test"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(received.lock().unwrap().is_empty());
}

/// Sends `sni`'s Initial as a client does on each PTO, until an answer
/// comes (at most 10 s).
async fn answer_after_retransmits(addr: SocketAddr, sni: &str, dcid: u8) -> Vec<u8> {
    let client = Client::new(Version::V1, &[dcid; 8], &[9; 4]);
    let initial = client.datagram(&hello_message(Some(sni), 0));
    let socket = client_socket().await;
    for _ in 0..40 {
        socket.send_to(&initial, addr).await.unwrap();
        if let Some(reply) = reply_within(&socket, Duration::from_millis(250)).await {
            return reply;
        }
    }
    panic!("no answer for {sni}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_refusing_or_silent_to_quic_is_picked_last_for_quic_only() {
    let dir = tempfile::tempdir().unwrap();
    let refusing = refusing_backend();
    let (silent, _silent_socket) = silent_backend();
    let (live, received) = udp_backend("L").await;
    // Round robin starts each pool at its first backend.
    let routes = format!(
        "  [[listeners.routes]]\n  hostname = \"refuse.test\"\n  backends = [\"{refusing}\", \"{live}\"]\n\
         \x20 [[listeners.routes]]\n  hostname = \"silent.test\"\n  backends = [\"{silent}\", \"{live}\"]\n"
    );
    let proxy = Proxy::start(
        dir.path(),
        &quic_config(dir.path(), &routes, "connect_timeout = \"500ms\""),
    );
    let addr = proxy.addr();

    // ICMP port unreachable: the flow ends at once, the backend is picked
    // last for QUIC, and the client's next Initial is a new flow to the
    // live one.
    let answer = answer_after_retransmits(addr, "refuse.test", 1).await;
    assert!(answer.starts_with(b"L:"), "{answer:?}");
    let line = wait_flows(
        &proxy,
        &[
            &format!("backend={refusing}"),
            "outcome=backend_unreachable",
        ],
        1,
    );
    assert!(line[0].contains("refused"), "{line:?}");

    // Silence: the flow ends after connect_timeout, the backend is picked
    // last for QUIC, and the retransmit goes to the live one.
    let answer = answer_after_retransmits(addr, "silent.test", 2).await;
    assert!(answer.starts_with(b"L:"), "{answer:?}");
    let line = wait_flows(
        &proxy,
        &[&format!("backend={silent}"), "outcome=backend_unreachable"],
        1,
    );
    assert!(line[0].contains("connect_timeout"), "{line:?}");
    assert!(received.lock().unwrap().len() >= 2);

    // Both are picked after the others for new flows now: four new flows
    // in a row are answered by the live backend at their first Initial
    // (round robin alone would give every other one to the failed one).
    for backend in [refusing, silent] {
        proxy.wait_log(
            &[
                "QUIC: backend gave no answer",
                &format!("backend={backend}"),
            ],
            Duration::from_secs(5),
        );
    }
    for (i, sni) in ["refuse.test", "silent.test", "refuse.test", "silent.test"]
        .into_iter()
        .enumerate()
    {
        let client = Client::new(Version::V1, &[20 + i as u8; 8], &[9; 4]);
        let socket = client_socket().await;
        socket
            .send_to(&client.datagram(&hello_message(Some(sni), 0)), addr)
            .await
            .unwrap();
        let reply = reply_within(&socket, Duration::from_secs(2)).await;
        assert!(
            reply.as_deref().is_some_and(|r| r.starts_with(b"L:")),
            "{sni}: {reply:?}"
        );
    }
    // A QUIC failure is not a TCP failure: the backends' health (what TCP
    // connections are balanced by) is untouched.
    assert!(
        !proxy.log_text().contains("backend down"),
        "{}",
        proxy.log_text()
    );
    let (code, out, err) = proxy.cli(&["backends", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let backends: serde_json::Value = serde_json::from_str(&out).unwrap();
    for row in backends.as_array().unwrap() {
        assert_eq!(row["healthy"], true, "{out}");
        assert_eq!(row["last_error"], "", "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_by_name_and_a_v2_flow_and_the_default_route() {
    let dir = tempfile::tempdir().unwrap();
    let (named, _) = udp_backend("N").await;
    let (fallback, _) = udp_backend("D").await;
    let routes = format!(
        "  [[listeners.routes]]\n  hostname = \"name.test\"\n  backend = \"localhost:{}\"\n{}",
        named.port(),
        route("*", fallback)
    );
    let proxy = Proxy::start(dir.path(), &quic_config(dir.path(), &routes, ""));
    let addr = proxy.addr();
    for (i, (version, sni, want)) in [
        (Version::V1, Some("name.test"), "N:"),
        (Version::V2, Some("name.test"), "N:"),
        (Version::V1, Some("other.test"), "D:"),
        (Version::V2, None, "D:"),
    ]
    .into_iter()
    .enumerate()
    {
        // Each flow its own DCID: a known DCID from a new address is the
        // same connection, come back from elsewhere.
        let client = Client::new(version, &[10 + i as u8; 10], &[9; 4]);
        let initial = client.datagram(&hello_message(sni, 0));
        let socket = client_socket().await;
        let mut reply = None;
        for _ in 0..20 {
            socket.send_to(&initial, addr).await.unwrap();
            reply = reply_within(&socket, Duration::from_millis(250)).await;
            if reply.is_some() {
                break;
            }
        }
        let reply = reply.unwrap_or_else(|| panic!("{version:?} {sni:?}: no reply"));
        assert!(
            reply.starts_with(want.as_bytes()),
            "{version:?} {sni:?}: {reply:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_flow_is_capped_in_bytes_and_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, received) = udp_backend("A").await;
    let proxy = Proxy::start(
        dir.path(),
        &quic_config(
            dir.path(),
            &route("a.test", backend),
            "handshake_timeout = \"1s\"",
        ),
    );
    let addr = proxy.addr();
    // A hello whose first bytes never come: CRYPTO data from offset 1 on,
    // in distinct 1,100-byte pieces, past the 80 KiB a pending flow keeps.
    let hello = hello_message(Some("a.test"), 60_000);
    let client = Client::new(Version::V1, &[6; 8], &[9; 4]);
    let socket = client_socket().await;
    for (i, piece) in hello[1..].chunks(1100).enumerate() {
        let offset = 1 + i as u64 * 1100;
        socket
            .send_to(&padded(&client, i as u64, &crypto(offset, piece)), addr)
            .await
            .unwrap();
    }
    // Past the cap: the flow is refused as a bad hello.
    let more = Client::new(Version::V1, &[6; 8], &[9; 4]);
    for i in 0..30u64 {
        socket
            .send_to(&padded(&more, 100 + i, &[0x01]), addr)
            .await
            .unwrap();
    }
    let line = proxy.wait_log(
        &["flow closed", "outcome=bad_hello"],
        Duration::from_secs(10),
    );
    assert!(line.contains("bytes of datagrams"), "{line}");
    assert_eq!(
        reply_within(&socket, Duration::from_millis(300)).await,
        None
    );

    // A hello that stops half way: hello_timeout after handshake_timeout.
    let client = Client::new(Version::V1, &[7; 8], &[9; 4]);
    let hello = hello_message(Some("a.test"), 2000);
    let socket = client_socket().await;
    socket
        .send_to(&padded(&client, 0, &crypto(0, &hello[..1000])), addr)
        .await
        .unwrap();
    let line = proxy.wait_log(
        &["flow closed", "outcome=hello_timeout"],
        Duration::from_secs(10),
    );
    assert!(
        line.contains(&format!("client={}", socket.local_addr().unwrap())),
        "{line}"
    );
    assert!(
        received.lock().unwrap().is_empty(),
        "nothing reached the backend"
    );
    let metrics = scrape(proxy.metrics_addr()).await;
    let series = |name: &str| metrics.get(name).copied();
    assert_eq!(
        series(
            "mc_proxy_quic_flows_closed_total{listener=\"127.0.0.1:0\",outcome=\"hello_timeout\"}"
        ),
        Some(1.0),
        "{metrics:?}"
    );
    assert_eq!(
        series("mc_proxy_quic_flows_closed_total{listener=\"127.0.0.1:0\",outcome=\"bad_hello\"}"),
        Some(1.0),
        "{metrics:?}"
    );
    assert_eq!(
        series("mc_proxy_quic_flows_active{listener=\"127.0.0.1:0\"}"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_clients_retransmits_get_nothing_and_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, received) = udp_backend("A").await;
    let toml = quic_config(dir.path(), &route("a.test", backend), "")
        + "[firewall]\nblocked_ips = [\"127.0.0.2\"]\n";
    let proxy = Proxy::start(dir.path(), &toml);
    let addr = proxy.addr();
    let client = Client::new(Version::V1, &[8; 8], &[9; 4]);
    let initial = client.datagram(&hello_message(Some("a.test"), 0));
    let socket = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    for _ in 0..5 {
        socket.send_to(&initial, addr).await.unwrap();
        assert_eq!(
            reply_within(&socket, Duration::from_millis(200)).await,
            None
        );
    }
    let lines: Vec<_> = flow_lines(&proxy)
        .into_iter()
        .filter(|l| l.contains("outcome=blocked:ip"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(received.lock().unwrap().is_empty());
    // Another client is served.
    let reply = answer_after_retransmits(addr, "a.test", 9).await;
    assert!(reply.starts_with(b"A:"), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descriptor_limit_too_low_for_max_quic_flows_is_said_at_start() {
    let (backend, _) = udp_backend("A").await;
    let warning = "proxy.max_quic_flows is more than RLIMIT_NOFILE leaves";
    // 1,024 descriptors, about 900 of them for TCP: 100,000 flows (the
    // default) cannot fit; 20 can.
    for (flows, warned) in [(None, true), (Some(20), false)] {
        let dir = tempfile::tempdir().unwrap();
        let proxy_lines = flows.map_or(String::new(), |n| format!("max_quic_flows = {n}"));
        let toml = quic_config(dir.path(), &route("a.test", backend), &proxy_lines);
        let proxy = Proxy::start_with_nofile(dir.path(), &toml, 1024);
        proxy.wait_log(&["mc-proxy started"], Duration::from_secs(10));
        assert_eq!(
            proxy.log_text().contains(warning),
            warned,
            "{flows:?}:\n{}",
            proxy.log_text()
        );
        // Served either way.
        let reply = answer_after_retransmits(proxy.addr(), "a.test", 30).await;
        assert!(reply.starts_with(b"A:"), "{reply:?}");
    }
}
