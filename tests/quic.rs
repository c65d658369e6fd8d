//! QUIC passthrough (SPEC §6.5) through the real binary on loopback, with
//! quinn — an implementation independent of the proxy's Initial reader —
//! as client and as backends: routing by SNI (exact, wildcard, default),
//! refused flows that get nothing back (unknown SNI, firewall, L7 routes),
//! 1,000 concurrent flows, NAT rebinding, the flow cap, a 256 MiB download
//! and hostile datagrams.
//!
//! The backends are quinn servers speaking a one-line protocol on raw
//! bidirectional streams (ALPN `echo`): `who` answers the backend's name,
//! `echo` sends back what follows, `bytes N` sends N bytes of a fixed
//! pattern. Where a test must show that *nothing* comes back, the client
//! is a plain UDP socket sending an Initial built with
//! `wire::quic::build` (a quinn client would only time out).
//!
//! [`quinn_peers_work_directly`] runs the same peers without the proxy, so
//! a failure of the others is the proxy's, not the harness's.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::net::UdpSocket;
use wire::quic::build::{long_packet, Client};
use wire::quic::{PacketKind, Version};

/// The ALPN of the test protocol.
const ALPN: &[u8] = b"echo";
/// The listener every test configures (its name in logs and metrics).
const LISTENER: &str = "127.0.0.1:0";
/// How long a raw client waits to be sure nothing comes back.
const SILENCE: Duration = Duration::from_secs(1);

// ---- quinn peers -------------------------------------------------------------

/// Windows large enough that a loopback download is not held back by flow
/// control.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u32(16 << 20))
        .receive_window(quinn::VarInt::from_u32(32 << 20))
        .send_window(32 << 20)
        .max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()));
    Arc::new(transport)
}

fn server_config(pki: &Pki, names: &[&str]) -> quinn::ServerConfig {
    let leaf = pki.leaf(names);
    let mut tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_no_client_auth()
        .with_single_cert(leaf.chain.clone(), leaf.key())
        .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    config
}

/// `alpn` offered after [`ALPN`]: extra protocols make the ClientHello as
/// large as wanted.
fn client_config(pki: &Pki, idle: Duration, alpn: &[Vec<u8>]) -> quinn::ClientConfig {
    let mut tls = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.alpn_protocols.extend_from_slice(alpn);
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u32(16 << 20))
        .receive_window(quinn::VarInt::from_u32(32 << 20))
        .send_window(32 << 20)
        .max_idle_timeout(Some(idle.try_into().unwrap()));
    config.transport_config(Arc::new(transport));
    config
}

/// A quinn client endpoint on `bind` (`127.0.0.1:0`, `127.0.0.2:0`…)
/// trusting `pki`, giving up on a silent peer after `idle`.
fn client(pki: &Pki, bind: &str, idle: Duration) -> quinn::Endpoint {
    let mut endpoint = quinn::Endpoint::client(bind.parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(pki, idle, &[]));
    endpoint
}

/// A quinn client whose ClientHello offers 40 made-up 100-byte ALPN
/// protocols besides [`ALPN`]: over 4 KB, so quinn sends it in several
/// Initials, one datagram each.
fn big_hello_client(pki: &Pki) -> quinn::Endpoint {
    let alpn: Vec<Vec<u8>> = (0..40u8)
        .map(|i| {
            let mut protocol = vec![b'x'; 100];
            protocol[0] = b'a' + i % 26;
            protocol[1] = b'0' + i / 26;
            protocol
        })
        .collect();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(pki, Duration::from_secs(10), &alpn));
    endpoint
}

/// SHA-256 and length of the last `bytes N` answer sent in full.
type Sent = Arc<Mutex<Option<([u8; 32], u64)>>>;

/// A quinn server speaking the test protocol, and what it saw.
struct QuicBackend {
    addr: SocketAddr,
    /// Initials that reached the endpoint as a new connection attempt.
    incoming: Arc<AtomicUsize>,
    /// Handshakes completed.
    accepted: Arc<AtomicUsize>,
    /// The client address of each stream served (the proxy's flow socket).
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    /// SHA-256 and length of the last `bytes N` answer sent in full.
    sent: Sent,
    endpoint: quinn::Endpoint,
}

impl Drop for QuicBackend {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"test over");
    }
}

async fn quic_backend(pki: &Pki, name: &'static str, names: &[&str]) -> QuicBackend {
    let endpoint =
        quinn::Endpoint::server(server_config(pki, names), "127.0.0.1:0".parse().unwrap()).unwrap();
    let backend = QuicBackend {
        addr: endpoint.local_addr().unwrap(),
        incoming: Arc::default(),
        accepted: Arc::default(),
        peers: Arc::default(),
        sent: Arc::default(),
        endpoint: endpoint.clone(),
    };
    let (incoming, accepted, peers, sent) = (
        backend.incoming.clone(),
        backend.accepted.clone(),
        backend.peers.clone(),
        backend.sent.clone(),
    );
    tokio::spawn(async move {
        while let Some(attempt) = endpoint.accept().await {
            incoming.fetch_add(1, Ordering::SeqCst);
            let (accepted, peers, sent) = (accepted.clone(), peers.clone(), sent.clone());
            tokio::spawn(async move {
                let Ok(conn) = attempt.await else { return };
                accepted.fetch_add(1, Ordering::SeqCst);
                while let Ok((send, recv)) = conn.accept_bi().await {
                    peers.lock().unwrap().push(conn.remote_address());
                    tokio::spawn(serve_stream(name, send, recv, sent.clone()));
                }
            });
        }
    });
    backend
}

/// One stream of the test protocol: a command line, then its answer.
async fn serve_stream(
    name: &'static str,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    sent: Sent,
) {
    let mut head = Vec::new();
    let rest = loop {
        let Ok(Some(chunk)) = recv.read_chunk(4096, true).await else {
            return;
        };
        head.extend_from_slice(&chunk.bytes);
        if let Some(at) = head.iter().position(|&b| b == b'\n') {
            break head.split_off(at + 1);
        }
        if head.len() > 100 {
            return;
        }
    };
    let command = String::from_utf8_lossy(&head).trim().to_string();
    if command == "who" {
        let _ = send.write_all(name.as_bytes()).await;
    } else if command == "echo" {
        if send.write_all(&rest).await.is_err() {
            return;
        }
        while let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await {
            if send.write_all(&chunk.bytes).await.is_err() {
                return;
            }
        }
    } else if let Some(n) = command.strip_prefix("bytes ") {
        let total: u64 = n.parse().unwrap();
        let pattern = pattern();
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut offset = 0u64;
        while offset < total {
            let at = (offset % pattern.len() as u64) as usize;
            let len = (total - offset).min((pattern.len() - at) as u64) as usize;
            let chunk = &pattern[at..at + len];
            hash.update(chunk);
            if send.write_all(chunk).await.is_err() {
                return;
            }
            offset += len as u64;
        }
        let digest = hash.finish().as_ref().try_into().unwrap();
        *sent.lock().unwrap() = Some((digest, total));
    }
    let _ = send.finish();
    // The stream's data is delivered as long as the connection lives; the
    // client closes it.
    let _ = send.stopped().await;
}

/// The download pattern, repeated: pseudo-random bytes over a prime length
/// (so that no power-of-two shift of the stream lines it up with itself).
fn pattern() -> Vec<u8> {
    let mut state = XorShift(0x9e37_79b9_7f4a_7c15);
    (0..1_048_583).map(|_| state.byte()).collect()
}

/// Connects `endpoint` to `to` for `sni` within `limit`.
async fn connect(
    endpoint: &quinn::Endpoint,
    to: SocketAddr,
    sni: &str,
    limit: Duration,
) -> Result<quinn::Connection, String> {
    let connecting = endpoint.connect(to, sni).map_err(|e| e.to_string())?;
    match tokio::time::timeout(limit, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no handshake within {limit:?}")),
    }
}

/// Sends `command` on a new stream of `conn` and reads the whole answer.
async fn ask(conn: &quinn::Connection, command: &str) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(format!("{command}\n").as_bytes())
        .await
        .unwrap();
    send.finish().unwrap();
    tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(1 << 20))
        .await
        .expect("answer within 30 s")
        .unwrap()
}

/// Connects for `sni`, asks `who`, closes: the name of the backend reached.
async fn who_quic(endpoint: &quinn::Endpoint, to: SocketAddr, sni: &str) -> Result<String, String> {
    let conn = connect(endpoint, to, sni, Duration::from_secs(10)).await?;
    let name = String::from_utf8(ask(&conn, "who").await).unwrap();
    conn.close(0u32.into(), b"done");
    Ok(name)
}

/// Closes `endpoint`'s connections and waits (bounded) until their
/// CONNECTION_CLOSE is out.
async fn shut(endpoint: &quinn::Endpoint) {
    endpoint.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
}

// ---- raw UDP peers -----------------------------------------------------------

/// A raw client with `dcid` and an SCID of its own derived from it (so
/// that flows never share a connection ID).
fn raw_client(dcid: &[u8]) -> Client {
    let mut scid = dcid.to_vec();
    scid[0] = 0x5c;
    Client::new(Version::V1, dcid, &scid)
}

/// A client's first datagram: one padded QUIC v1 Initial carrying a
/// ClientHello for `sni`, keyed by `dcid`.
fn initial(sni: &str, dcid: &[u8]) -> Vec<u8> {
    raw_client(dcid).datagram(&hello_message(Some(sni), 0))
}

/// One Initial (packet number `pn`) carrying `frames`, padded to a
/// 1,200-byte datagram.
fn padded(client: &Client, pn: u64, frames: &[u8]) -> Vec<u8> {
    let mut payload = frames.to_vec();
    let bare = client.initial(pn, &payload).len();
    payload.resize(payload.len() + 1200usize.saturating_sub(bare), 0);
    client.initial(pn, &payload)
}

/// An 8-byte connection ID, distinct for each `n`.
fn dcid(tag: u8, n: u32) -> Vec<u8> {
    let mut id = vec![0xd0, tag, 0x17, 0x42];
    id.extend_from_slice(&n.to_be_bytes());
    id
}

async fn udp(bind: &str) -> UdpSocket {
    UdpSocket::bind(bind).await.unwrap()
}

/// Asserts that nothing arrives on `socket` within [`SILENCE`].
async fn assert_silent(socket: &UdpSocket, what: &str) {
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(SILENCE, socket.recv_from(&mut buf)).await {
        Err(_) => {}
        Ok(Ok((n, from))) => panic!("{what}: got {n} bytes from {from}"),
        Ok(Err(e)) => panic!("{what}: recv failed: {e}"),
    }
}

/// A UDP backend that sends every datagram back where it came from, and
/// counts them and their sources.
struct UdpEcho {
    addr: SocketAddr,
    datagrams: Arc<AtomicUsize>,
    sources: Arc<Mutex<HashSet<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn udp_echo() -> UdpEcho {
    let socket = udp("127.0.0.1:0").await;
    let datagrams: Arc<AtomicUsize> = Arc::default();
    let sources: Arc<Mutex<HashSet<SocketAddr>>> = Arc::default();
    let (count, seen) = (datagrams.clone(), sources.clone());
    let addr = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            seen.lock().unwrap().insert(from);
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    UdpEcho {
        addr,
        datagrams,
        sources,
        task,
    }
}

/// Sends `datagram` from `socket` to `to`, again every 300 ms (as a client
/// retransmits its Initial), until the same bytes come back from `to`
/// through an echo backend; false if they never do within `limit`.
async fn echoed(socket: &UdpSocket, to: SocketAddr, datagram: &[u8], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        socket.send_to(datagram, to).await.unwrap();
        let wait = Duration::from_millis(300).min(deadline - Instant::now());
        let end = tokio::time::Instant::now() + wait;
        while let Ok(Ok((n, from))) = tokio::time::timeout_at(end, socket.recv_from(&mut buf)).await
        {
            if from == to && &buf[..n] == datagram {
                return true;
            }
        }
    }
    false
}

// ---- the proxy -----------------------------------------------------------------

/// A `quic = true` listener on [`LISTENER`] with `routes` (route entries),
/// `[proxy]` with `proxy_lines`, metrics on an ephemeral port, then
/// `extra` sections.
fn quic_config(routes: &[String], proxy_lines: &str, extra: &str) -> String {
    format!(
        "[[listeners]]\naddr = \"{LISTENER}\"\nquic = true\n{}\n{}{METRICS_ANY_PORT}{extra}",
        routes.concat(),
        proxy_section(proxy_lines)
    )
}

fn start(routes: &[String], proxy_lines: &str, extra: &str) -> (Proxy, SocketAddr) {
    let proxy = Proxy::in_temp_dir(|_| quic_config(routes, proxy_lines, extra));
    let line = proxy.wait_log(
        &[" listening ", &format!(" listener={LISTENER} ")],
        Duration::from_secs(20),
    );
    assert!(line.contains("quic=true"), "{line}");
    let addr = proxy.listener(LISTENER);
    (proxy, addr)
}

/// `flow closed` lines so far that contain every needle.
fn flow_lines(proxy: &Proxy, needles: &[&str]) -> Vec<String> {
    proxy
        .log_text()
        .lines()
        .filter(|l| l.contains("flow closed") && needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// Waits until at least `n` `flow closed` lines contain every needle.
fn wait_flows(proxy: &Proxy, needles: &[&str], n: usize, limit: Duration) -> Vec<String> {
    proxy
        .log
        .wait_for(limit, |text, _| {
            let lines: Vec<String> = text
                .lines()
                .filter(|l| l.contains("flow closed") && needles.iter().all(|n| l.contains(n)))
                .map(str::to_string)
                .collect();
            (lines.len() >= n).then_some(lines)
        })
        .unwrap_or_else(|| {
            panic!(
                "fewer than {n} flow lines with {needles:?}:\n{}",
                proxy.log_text()
            )
        })
}

fn field_u64(line: &str, key: &str) -> u64 {
    log_field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {line:?}"))
}

/// The sum of the series of metric `name` whose labels hold every
/// `(label, value)`; a value ending in `*` matches as a prefix.
fn metric(values: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    values
        .iter()
        .filter(|(series, _)| {
            let (series_name, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
            series_name == name
                && labels
                    .iter()
                    .all(|(label, value)| match value.strip_suffix('*') {
                        Some(prefix) => rest.contains(&format!("{label}=\"{prefix}")),
                        None => rest.contains(&format!("{label}=\"{value}\"")),
                    })
        })
        .map(|(_, v)| v)
        .sum()
}

fn on_listener(values: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut all = vec![("listener", LISTENER)];
    all.extend_from_slice(labels);
    metric(values, name, &all)
}

const ACTIVE: &str = "mc_proxy_quic_flows_active";
const CLOSED: &str = "mc_proxy_quic_flows_closed_total";
const BYTES: &str = "mc_proxy_quic_relayed_bytes_total";
const DROPPED: &str = "mc_proxy_quic_datagrams_dropped_total";

/// The QUIC series of the listener, for failure messages.
fn quic_series(values: &HashMap<String, f64>) -> Vec<(String, f64)> {
    let mut series: Vec<(String, f64)> = values
        .iter()
        .filter(|(k, _)| k.starts_with("mc_proxy_quic_"))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    series.sort_by(|a, b| a.0.cmp(&b.0));
    series
}

// ---- the harness itself --------------------------------------------------------

/// The peers without the proxy: routing by name is the backends' own, the
/// echo and the download are whole, and a client whose path changes under
/// it (the forwarder of the rebinding test) keeps its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quinn_peers_work_directly() {
    let pki = Pki::new("quic test CA");
    let a = quic_backend(&pki, "A", &["a.test"]).await;
    let endpoint = client(&pki, "127.0.0.1:0", Duration::from_secs(10));
    assert_eq!(who_quic(&endpoint, a.addr, "a.test").await.unwrap(), "A");
    // The certificate is checked: another name fails the handshake.
    assert!(who_quic(&endpoint, a.addr, "b.test").await.is_err());

    let conn = connect(&endpoint, a.addr, "a.test", Duration::from_secs(10))
        .await
        .unwrap();
    let (size, took) = download(&conn, &a, 64 << 20).await;
    eprintln!(
        "direct download: {size} bytes in {took:?}, {:.1} MB/s",
        size as f64 / took.as_secs_f64() / 1e6
    );
    conn.close(0u32.into(), b"done");

    let forwarder = Forwarder::start(a.addr).await;
    let (before, after, _, _) = rebinding_exchange(&endpoint, &forwarder, "a.test").await;
    assert!(before > 0 && after > 0);
    assert_eq!(a.accepted.load(Ordering::SeqCst), 3);
    // Straight to the backend, the path change is the backend's to see.
    let peers: HashSet<SocketAddr> = a.peers.lock().unwrap().iter().copied().collect();
    assert!(peers.len() >= 3, "{peers:?}");

    // A ClientHello over several Initials, straight to the backend.
    let big = big_hello_client(&pki);
    assert_eq!(who_quic(&big, a.addr, "a.test").await.as_deref(), Ok("A"));
    shut(&big).await;

    // A raw Initial reaches a quinn endpoint as a connection attempt (so
    // the count is a fair witness of a relayed raw client elsewhere).
    let before = a.incoming.load(Ordering::SeqCst);
    let raw = udp("127.0.0.1:0").await;
    raw.send_to(&initial("a.test", &dcid(0, 1)), a.addr)
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), || {
        a.incoming.load(Ordering::SeqCst) > before
    })
    .await;
    // And the echo backend echoes.
    let echo = udp_echo().await;
    assert!(
        echoed(
            &raw,
            echo.addr,
            &initial("x", &dcid(0, 2)),
            Duration::from_secs(5)
        )
        .await
    );
    shut(&endpoint).await;
}

async fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "condition not met in {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asks `bytes SIZE` on `conn`, hashing what arrives: asserts it is what
/// `backend` sent; (bytes, time taken).
async fn download(conn: &quinn::Connection, backend: &QuicBackend, size: u64) -> (u64, Duration) {
    *backend.sent.lock().unwrap() = None;
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(format!("bytes {size}\n").as_bytes())
        .await
        .unwrap();
    send.finish().unwrap();
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0u64;
    while let Some(chunk) = recv.read_chunk(1 << 20, true).await.unwrap() {
        hash.update(&chunk.bytes);
        got += chunk.bytes.len() as u64;
    }
    let took = started.elapsed();
    let digest: [u8; 32] = hash.finish().as_ref().try_into().unwrap();
    assert_eq!(got, size);
    let sent = *backend.sent.lock().unwrap();
    assert_eq!(
        sent,
        Some((digest, size)),
        "sha256 of what came vs what went"
    );
    (got, took)
}

// ---- a NAT that rebinds --------------------------------------------------------

/// A UDP forwarder standing for a NAT between a client and `to`: the
/// client sends to [`Forwarder::addr`]; the forwarder sends on from an
/// outbound socket of its own and passes replies back. [`Forwarder::rebind`]
/// replaces the outbound socket (a new source port, the old one closed),
/// as a NAT whose mapping expired does; the client cannot tell.
struct Forwarder {
    addr: SocketAddr,
    state: Arc<Mutex<ForwardState>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    front: Arc<UdpSocket>,
    to: SocketAddr,
}

struct ForwardState {
    outbound: Arc<UdpSocket>,
    client: Option<SocketAddr>,
    /// Datagrams passed back to the client, per outbound socket (in order).
    down: Vec<usize>,
    /// Datagrams sent on, per outbound socket.
    up: Vec<usize>,
}

impl Forwarder {
    async fn start(to: SocketAddr) -> Forwarder {
        let front = Arc::new(udp("127.0.0.1:0").await);
        let outbound = Arc::new(udp("127.0.0.1:0").await);
        let state = Arc::new(Mutex::new(ForwardState {
            outbound: outbound.clone(),
            client: None,
            down: vec![0],
            up: vec![0],
        }));
        let forwarder = Forwarder {
            addr: front.local_addr().unwrap(),
            state: state.clone(),
            tasks: Mutex::new(Vec::new()),
            front: front.clone(),
            to,
        };
        let up_state = state.clone();
        let up = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else {
                    continue;
                };
                let outbound = {
                    let mut state = up_state.lock().unwrap();
                    state.client = Some(from);
                    *state.up.last_mut().unwrap() += 1;
                    state.outbound.clone()
                };
                let _ = outbound.send_to(&buf[..n], to).await;
            }
        });
        forwarder.tasks.lock().unwrap().push(up);
        forwarder.spawn_down(outbound, 0);
        forwarder
    }

    /// Replies arriving on `outbound` (generation `generation`) go to the
    /// client.
    fn spawn_down(&self, outbound: Arc<UdpSocket>, generation: usize) {
        let (state, front, to) = (self.state.clone(), self.front.clone(), self.to);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = outbound.recv_from(&mut buf).await else {
                    continue;
                };
                if from != to {
                    continue;
                }
                let client = {
                    let mut state = state.lock().unwrap();
                    state.down[generation] += 1;
                    state.client
                };
                if let Some(client) = client {
                    let _ = front.send_to(&buf[..n], client).await;
                }
            }
        });
        self.tasks.lock().unwrap().push(task);
    }

    /// A new outbound socket; the old one is closed. Returns (old, new)
    /// source addresses.
    async fn rebind(&self) -> (SocketAddr, SocketAddr) {
        let fresh = Arc::new(udp("127.0.0.1:0").await);
        let generation;
        let old;
        {
            let mut state = self.state.lock().unwrap();
            old = state.outbound.local_addr().unwrap();
            state.outbound = fresh.clone();
            state.down.push(0);
            state.up.push(0);
            generation = state.down.len() - 1;
        }
        // The old socket's reader ends, so the socket closes: replies to
        // the old port are lost, as behind a NAT whose mapping is gone.
        if let Some(reader) = self.tasks.lock().unwrap().pop() {
            reader.abort();
        }
        let new = fresh.local_addr().unwrap();
        self.spawn_down(fresh, generation);
        (old, new)
    }

    fn counts(&self) -> (Vec<usize>, Vec<usize>) {
        let state = self.state.lock().unwrap();
        (state.up.clone(), state.down.clone())
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Through `forwarder`: a connection for `sni`, an echo stream half sent
/// and echoed, the forwarder rebound, the other half and a second stream
/// echoed, the connection closed. Returns the bytes echoed before and after
/// the rebinding, and the forwarder's source addresses before and after.
async fn rebinding_exchange(
    endpoint: &quinn::Endpoint,
    forwarder: &Forwarder,
    sni: &str,
) -> (usize, usize, SocketAddr, SocketAddr) {
    let conn = connect(endpoint, forwarder.addr, sni, Duration::from_secs(10))
        .await
        .unwrap();
    let first: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let second: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"echo\n").await.unwrap();
    send.write_all(&first).await.unwrap();
    let mut back = vec![0u8; first.len()];
    tokio::time::timeout(Duration::from_secs(20), recv.read_exact(&mut back))
        .await
        .expect("echo before the rebinding")
        .unwrap();
    assert!(back == first, "echo before the rebinding differs");

    let (old, new) = forwarder.rebind().await;
    eprintln!("forwarder rebound from {old} to {new}");
    send.write_all(&second).await.unwrap();
    send.finish().unwrap();
    let back = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(second.len() + 1))
        .await
        .expect("echo after the rebinding")
        .unwrap();
    assert!(back == second, "echo after the rebinding differs");
    // A new stream after the rebinding too.
    assert!(!ask(&conn, "who").await.is_empty());
    let (up, down) = forwarder.counts();
    assert!(
        up[1] > 0 && down[1] > 0,
        "datagrams after the rebinding, up {up:?} down {down:?}"
    );
    conn.close(0u32.into(), b"done");
    (first.len(), second.len(), old, new)
}

// ---- through the proxy -----------------------------------------------------------

/// Exact names, a wildcard and the default route, each on a quinn backend
/// of its own: every client reaches its backend, and each flow's line
/// names its SNI and backend with bytes both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hostname_reaches_its_own_quinn_backend() {
    let pki = Pki::new("quic test CA");
    let a = quic_backend(&pki, "A", &["a.test"]).await;
    let b = quic_backend(&pki, "B", &["b.test"]).await;
    let w = quic_backend(&pki, "W", &["*.wild.test"]).await;
    let d = quic_backend(&pki, "D", &["other.test"]).await;
    let (proxy, to) = start(
        &[
            route("a.test", a.addr),
            route("b.test", b.addr),
            route("*.wild.test", w.addr),
            route("*", d.addr),
        ],
        "idle_timeout = \"2s\"",
        "",
    );
    let cases = [
        ("a.test", "A", &a),
        ("b.test", "B", &b),
        ("x.wild.test", "W", &w),
        ("other.test", "D", &d),
    ];
    for (sni, name, _) in cases {
        let endpoint = client(&pki, "127.0.0.1:0", Duration::from_secs(10));
        let got = who_quic(&endpoint, to, sni).await;
        assert_eq!(got.as_deref(), Ok(name), "{sni}:\n{}", proxy.log_text());
        shut(&endpoint).await;
    }
    for (sni, _, backend) in cases {
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 1, "{sni}");
    }

    let lines = wait_flows(&proxy, &["transport=quic"], 4, Duration::from_secs(20));
    let (mut up, mut down) = (0, 0);
    for (sni, _, backend) in cases {
        let line = lines
            .iter()
            .find(|l| log_field(l, "sni") == Some(sni))
            .unwrap_or_else(|| panic!("no flow line for {sni}: {lines:#?}"));
        assert_eq!(
            log_field(line, "backend"),
            Some(&*backend.addr.to_string()),
            "{line}"
        );
        assert_eq!(log_field(line, "listener"), Some(LISTENER), "{line}");
        assert_eq!(log_field(line, "outcome"), Some("relayed"), "{line}");
        assert!(
            log_field(line, "client").unwrap().starts_with("127.0.0.1:"),
            "{line}"
        );
        assert!(
            field_u64(line, "up") > 0 && field_u64(line, "down") > 0,
            "{line}"
        );
        field_u64(line, "duration_ms");
        up += field_u64(line, "up");
        down += field_u64(line, "down");
    }
    assert_eq!(lines.len(), 4, "{lines:#?}");

    let values = wait_metrics(proxy.metrics_addr(), Duration::from_secs(10), |v| {
        on_listener(v, ACTIVE, &[]) == 0.0
    })
    .await;
    let quic = quic_series(&values);
    assert_eq!(
        on_listener(&values, CLOSED, &[("outcome", "relayed")]),
        4.0,
        "{quic:#?}"
    );
    assert_eq!(
        on_listener(&values, BYTES, &[("direction", "up")]),
        up as f64,
        "{quic:#?}"
    );
    assert_eq!(
        on_listener(&values, BYTES, &[("direction", "down")]),
        down as f64,
        "{quic:#?}"
    );
}

/// A ClientHello too large for one Initial (a long ALPN list, as a
/// post-quantum key share would be) arrives over several datagrams: the
/// proxy reassembles it and routes by its SNI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_over_several_initials_is_routed_by_its_sni() {
    let pki = Pki::new("quic test CA");
    let a = quic_backend(&pki, "A", &["a.test"]).await;
    let b = quic_backend(&pki, "B", &["b.test"]).await;
    let (proxy, to) = start(
        &[route("a.test", a.addr), route("b.test", b.addr)],
        "idle_timeout = \"2s\"",
        "",
    );
    for (sni, name) in [("b.test", "B"), ("a.test", "A")] {
        let endpoint = big_hello_client(&pki);
        let got = who_quic(&endpoint, to, sni).await;
        assert_eq!(got.as_deref(), Ok(name), "{sni}:\n{}", proxy.log_text());
        shut(&endpoint).await;
    }
    let lines = wait_flows(
        &proxy,
        &["transport=quic", "outcome=relayed"],
        2,
        Duration::from_secs(20),
    );
    for (sni, backend) in [("a.test", a.addr), ("b.test", b.addr)] {
        assert!(
            lines.iter().any(|l| log_field(l, "sni") == Some(sni)
                && log_field(l, "backend") == Some(&*backend.to_string())),
            "{sni}: {lines:#?}"
        );
    }
}

/// Two connections from one client socket (one address and port, two
/// DCIDs) to two hostnames: each reaches its own backend, at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_from_one_client_port_are_two_flows() {
    let pki = Pki::new("quic test CA");
    let a = quic_backend(&pki, "A", &["a.test"]).await;
    let b = quic_backend(&pki, "B", &["b.test"]).await;
    let (proxy, to) = start(
        &[route("a.test", a.addr), route("b.test", b.addr)],
        "idle_timeout = \"2s\"",
        "",
    );
    let endpoint = client(&pki, "127.0.0.1:0", Duration::from_secs(10));
    let port = endpoint.local_addr().unwrap();
    let first = connect(&endpoint, to, "a.test", Duration::from_secs(10))
        .await
        .unwrap();
    let second = connect(&endpoint, to, "b.test", Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("b.test from the same port: {e}\n{}", proxy.log_text()));
    // Both alive: each keeps answering from its own backend.
    for _ in 0..3 {
        assert_eq!(ask(&first, "who").await, b"A");
        assert_eq!(ask(&second, "who").await, b"B");
    }
    shut(&endpoint).await;
    assert_eq!(a.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    let lines = wait_flows(&proxy, &["transport=quic"], 2, Duration::from_secs(20));
    for sni in ["a.test", "b.test"] {
        let line = lines
            .iter()
            .find(|l| log_field(l, "sni") == Some(sni))
            .unwrap_or_else(|| panic!("no flow for {sni}: {lines:#?}"));
        assert_eq!(
            log_field(line, "client"),
            Some(&*port.to_string()),
            "{line}"
        );
        assert_eq!(log_field(line, "outcome"), Some("relayed"), "{line}");
    }
}

/// An unknown SNI (no default route) and clients the firewall blocks (by
/// IP and by CIDR) get nothing back, and their Initial reaches no backend;
/// a good client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_and_blocked_clients_get_nothing_back() {
    let pki = Pki::new("quic test CA");
    let a = quic_backend(&pki, "A", &["a.test"]).await;
    let (proxy, to) = start(
        &[route("a.test", a.addr)],
        "idle_timeout = \"2s\"",
        "[firewall]\nblocked_ips = [\"127.0.0.2\"]\nblocked_cidrs = [\"127.0.3.0/24\"]\n",
    );

    let unknown = udp("127.0.0.1:0").await;
    unknown
        .send_to(&initial("unknown.test", &dcid(2, 1)), to)
        .await
        .unwrap();
    let by_ip = udp("127.0.0.2:0").await;
    by_ip
        .send_to(&initial("a.test", &dcid(2, 2)), to)
        .await
        .unwrap();
    let by_cidr = udp("127.0.3.7:0").await;
    by_cidr
        .send_to(&initial("a.test", &dcid(2, 3)), to)
        .await
        .unwrap();
    assert_silent(&unknown, "unknown SNI").await;
    assert_silent(&by_ip, "blocked by IP").await;
    assert_silent(&by_cidr, "blocked by CIDR").await;
    // A real client from a blocked address gives up on silence.
    let blocked = client(&pki, "127.0.0.2:0", Duration::from_secs(2));
    let refused = who_quic(&blocked, to, "a.test").await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        a.incoming.load(Ordering::SeqCst),
        0,
        "the backend saw a refused client"
    );

    // The route works: the silence above is the refusal.
    let good = client(&pki, "127.0.0.1:0", Duration::from_secs(10));
    assert_eq!(who_quic(&good, to, "a.test").await.as_deref(), Ok("A"));
    shut(&good).await;
    assert_eq!(a.incoming.load(Ordering::SeqCst), 1);

    let unknown_addr = unknown.local_addr().unwrap().to_string();
    let line = wait_flows(
        &proxy,
        &[&format!("client={unknown_addr} "), "transport=quic"],
        1,
        Duration::from_secs(20),
    )
    .remove(0);
    assert_eq!(log_field(&line, "outcome"), Some("no_route"), "{line}");
    assert_eq!(log_field(&line, "sni"), Some("unknown.test"), "{line}");
    for (socket, rule) in [(&by_ip, "ip"), (&by_cidr, "cidr")] {
        let client = socket.local_addr().unwrap().to_string();
        let line = wait_flows(
            &proxy,
            &[&format!("client={client} "), "transport=quic"],
            1,
            Duration::from_secs(20),
        )
        .remove(0);
        assert_eq!(
            log_field(&line, "outcome"),
            Some(&*format!("blocked:{rule}")),
            "{line}"
        );
    }
    let values = wait_metrics(proxy.metrics_addr(), Duration::from_secs(10), |v| {
        on_listener(v, CLOSED, &[("outcome", "relayed")]) == 1.0
    })
    .await;
    let quic = quic_series(&values);
    eprintln!("{:#?}\n{quic:#?}", flow_lines(&proxy, &[]));
    assert_eq!(
        on_listener(&values, CLOSED, &[("outcome", "no_route")]),
        1.0,
        "{quic:#?}"
    );
    let blocked = "mc_proxy_quic_flows_blocked_total";
    assert_eq!(
        on_listener(&values, blocked, &[("rule", "cidr")]),
        1.0,
        "{quic:#?}"
    );
    assert!(
        on_listener(&values, blocked, &[("rule", "ip")]) >= 2.0,
        "{quic:#?}"
    );
    // The quinn client from 127.0.0.2 is blocked too (one flow or more).
    assert!(
        on_listener(&values, CLOSED, &[("outcome", "blocked*")]) >= 3.0,
        "{quic:#?}"
    );
}

/// An L7 route cannot take QUIC: its flow is dropped, nothing comes back,
/// and the drop is logged and counted as `l7_route`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_flow_for_an_l7_route_is_dropped_and_counted() {
    let pki = Pki::new("quic test CA");
    let a = quic_backend(&pki, "A", &["a.test"]).await;
    let l7_backend = udp_echo().await;
    let proxy = Proxy::in_temp_dir(|dir| {
        let (cert, key) = pki.leaf(&["web.test"]).write(dir, "web");
        quic_config(
            &[
                route("a.test", a.addr),
                common::peers::l7_route("web.test", l7_backend.addr, &cert, &key, ""),
            ],
            "idle_timeout = \"2s\"",
            "",
        )
    });
    let to = proxy.listener(LISTENER);
    let raw = udp("127.0.0.1:0").await;
    raw.send_to(&initial("web.test", &dcid(3, 1)), to)
        .await
        .unwrap();
    assert_silent(&raw, "QUIC to an L7 route").await;
    assert_eq!(l7_backend.datagrams.load(Ordering::SeqCst), 0);
    let line = wait_flows(
        &proxy,
        &["sni=web.test", "transport=quic"],
        1,
        Duration::from_secs(20),
    )
    .remove(0);
    assert_eq!(log_field(&line, "outcome"), Some("l7_route"), "{line}");

    // The listener's L4 route still carries QUIC.
    let endpoint = client(&pki, "127.0.0.1:0", Duration::from_secs(10));
    assert_eq!(who_quic(&endpoint, to, "a.test").await.as_deref(), Ok("A"));
    shut(&endpoint).await;
    let values = wait_metrics(proxy.metrics_addr(), Duration::from_secs(10), |v| {
        on_listener(v, CLOSED, &[("outcome", "relayed")]) == 1.0
    })
    .await;
    assert_eq!(
        on_listener(&values, CLOSED, &[("outcome", "l7_route")]),
        1.0,
        "{:#?}",
        quic_series(&values)
    );
}

/// 1,000 clients, each from a port of its own with an Initial of its own,
/// all relayed to a UDP echo backend at once (each through a flow socket
/// of its own); the active gauge counts 1,000, then every flow idles out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_flows_are_all_served_then_idle_out() {
    const FLOWS: u32 = 1000;
    let echo = udp_echo().await;
    let (proxy, to) = start(
        &[route("flows.test", echo.addr)],
        "idle_timeout = \"10s\"",
        "",
    );
    let fds_before = proc_fds(proxy.pid());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..FLOWS {
        tasks.spawn(async move {
            let socket = udp("127.0.0.1:0").await;
            let served = echoed(
                &socket,
                to,
                &initial("flows.test", &dcid(4, i)),
                Duration::from_secs(30),
            )
            .await;
            (served, socket)
        });
    }
    let mut sockets = Vec::new();
    let mut served = 0;
    while let Some(done) = tasks.join_next().await {
        let (ok, socket) = done.unwrap();
        served += usize::from(ok);
        sockets.push(socket);
    }
    eprintln!("{served} flows served in {:?}", started.elapsed());
    assert_eq!(served, FLOWS as usize);
    assert_eq!(echo.sources.lock().unwrap().len(), FLOWS as usize);
    // A socket per flow.
    let fds_open = proc_fds(proxy.pid());
    assert!(
        fds_open >= fds_before + FLOWS as usize,
        "{fds_before} -> {fds_open}"
    );
    let metrics = proxy.metrics_addr();
    let values = scrape(metrics).await;
    assert_eq!(
        on_listener(&values, ACTIVE, &[]),
        f64::from(FLOWS),
        "{:#?}",
        quic_series(&values)
    );
    drop(sockets);

    let values = wait_metrics(metrics, Duration::from_secs(40), |v| {
        on_listener(v, ACTIVE, &[]) == 0.0
    })
    .await;
    eprintln!("all idle out {:?} after the start", started.elapsed());
    assert_eq!(
        on_listener(&values, CLOSED, &[("outcome", "relayed")]),
        f64::from(FLOWS)
    );
    let lines = wait_flows(
        &proxy,
        &["sni=flows.test", "outcome=relayed", "transport=quic"],
        FLOWS as usize,
        Duration::from_secs(10),
    );
    assert_eq!(lines.len(), FLOWS as usize);
    // Every flow's socket is closed again.
    let fds_after = proc_fds(proxy.pid());
    eprintln!("proxy descriptors: {fds_before} -> {fds_open} -> {fds_after}");
    assert!(
        fds_after <= fds_before + 2,
        "{fds_before} -> {fds_open} -> {fds_after}"
    );
}

/// A NAT between client and proxy changes the client's source port
/// mid-connection: the proxy finds the flow by its connection ID, sends the
/// replies to the new port, and the connection goes on; one flow, one
/// backend connection, one path seen by the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_rebinding_keeps_the_flow() {
    let pki = Pki::new("quic test CA");
    let a = quic_backend(&pki, "A", &["a.test"]).await;
    let (proxy, to) = start(&[route("a.test", a.addr)], "idle_timeout = \"3s\"", "");
    let forwarder = Forwarder::start(to).await;
    let endpoint = client(&pki, "127.0.0.1:0", Duration::from_secs(10));
    let (before, after, old, new) = rebinding_exchange(&endpoint, &forwarder, "a.test").await;
    shut(&endpoint).await;

    assert_eq!(a.incoming.load(Ordering::SeqCst), 1);
    assert_eq!(a.accepted.load(Ordering::SeqCst), 1);
    let peers: HashSet<SocketAddr> = a.peers.lock().unwrap().iter().copied().collect();
    assert_eq!(peers.len(), 1, "the backend saw the path change: {peers:?}");

    let line = wait_flows(&proxy, &["transport=quic"], 1, Duration::from_secs(20)).remove(0);
    // Long enough for a second flow, had there been one, to idle out too.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let lines = flow_lines(&proxy, &["transport=quic"]);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    eprintln!("{line}");
    assert_eq!(log_field(&line, "outcome"), Some("relayed"), "{line}");
    assert_eq!(log_field(&line, "sni"), Some("a.test"), "{line}");
    // The flow followed the client to its new address.
    assert_eq!(
        log_field(&line, "client"),
        Some(&*new.to_string()),
        "{line} (was {old})"
    );
    let echoed = (before + after) as u64;
    assert!(field_u64(&line, "up") > echoed, "{line}");
    assert!(field_u64(&line, "down") > echoed, "{line}");
    let values = scrape(proxy.metrics_addr()).await;
    assert_eq!(
        on_listener(&values, CLOSED, &[("outcome", "relayed")]),
        1.0,
        "{:#?}",
        quic_series(&values)
    );
}

/// `max_quic_flows = 3`: a fourth client gets nothing back and is counted
/// as `flow_limit`; once one flow idles out, a new client is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_over_max_quic_flows_are_dropped_until_one_ends() {
    let echo = udp_echo().await;
    let (proxy, to) = start(
        &[route("flows.test", echo.addr)],
        "idle_timeout = \"2s\"\nmax_quic_flows = 3",
        "",
    );
    let mut held = Vec::new();
    for i in 0..3 {
        let socket = udp("127.0.0.1:0").await;
        let hello = initial("flows.test", &dcid(6, i));
        assert!(
            echoed(&socket, to, &hello, Duration::from_secs(10)).await,
            "flow {i}"
        );
        held.push((socket, hello));
    }
    let over = udp("127.0.0.1:0").await;
    over.send_to(&initial("flows.test", &dcid(6, 3)), to)
        .await
        .unwrap();
    assert_silent(&over, "the flow over the cap").await;
    assert_eq!(echo.sources.lock().unwrap().len(), 3);
    let metrics = proxy.metrics_addr();
    let values = wait_metrics(metrics, Duration::from_secs(5), |v| {
        on_listener(v, DROPPED, &[("reason", "flow_limit")]) >= 1.0
    })
    .await;
    assert_eq!(on_listener(&values, ACTIVE, &[]), 3.0);

    // Flows 1 and 2 stay busy; flow 0 idles out.
    let first = held.remove(0).0.local_addr().unwrap();
    let busy = Arc::new(held);
    let keep = {
        let busy = busy.clone();
        tokio::spawn(async move {
            loop {
                for (socket, hello) in busy.iter() {
                    let _ = socket.send_to(hello, to).await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let line = wait_flows(
        &proxy,
        &[&format!("client={first} "), "transport=quic"],
        1,
        Duration::from_secs(15),
    )
    .remove(0);
    assert_eq!(log_field(&line, "outcome"), Some("relayed"), "{line}");
    let late = udp("127.0.0.1:0").await;
    let admitted = echoed(
        &late,
        to,
        &initial("flows.test", &dcid(6, 4)),
        Duration::from_secs(5),
    )
    .await;
    let values = scrape(metrics).await;
    keep.abort();
    assert!(
        admitted,
        "no room after a flow ended:\n{}",
        proxy.log_text()
    );
    assert_eq!(echo.sources.lock().unwrap().len(), 4);
    assert_eq!(
        on_listener(&values, ACTIVE, &[]),
        3.0,
        "{:#?}",
        quic_series(&values)
    );
    assert_eq!(
        flow_lines(&proxy, &["transport=quic"]).len(),
        1,
        "only flow 0 has ended"
    );
}

/// 256 MiB downloaded over one quinn stream through the proxy, hashed on
/// both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_download_through_the_proxy_is_whole() {
    const SIZE: u64 = 256 << 20;
    let pki = Pki::new("quic test CA");
    let a = quic_backend(&pki, "A", &["a.test"]).await;
    let (proxy, to) = start(&[route("a.test", a.addr)], "idle_timeout = \"5s\"", "");
    let endpoint = client(&pki, "127.0.0.1:0", Duration::from_secs(30));
    let conn = connect(&endpoint, to, "a.test", Duration::from_secs(10))
        .await
        .unwrap();
    let (got, took) = tokio::time::timeout(Duration::from_secs(400), download(&conn, &a, SIZE))
        .await
        .expect("256 MiB within 400 s");
    eprintln!(
        "256 MiB through the proxy: {got} bytes in {took:?}, {:.1} MB/s",
        got as f64 / took.as_secs_f64() / 1e6
    );
    shut(&endpoint).await;
    let line = wait_flows(&proxy, &["transport=quic"], 1, Duration::from_secs(20)).remove(0);
    assert!(field_u64(&line, "down") > SIZE, "{line}");
    let values = scrape(proxy.metrics_addr()).await;
    assert!(on_listener(&values, BYTES, &[("direction", "down")]) > SIZE as f64);
}

/// Datagrams no client would send, or none the proxy may act on: nothing
/// comes back to any of them, nothing reaches the backend, an incomplete
/// hello expires as `hello_timeout`, and a good client is served after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_datagrams_get_nothing_back_and_a_good_client_is_served_after() {
    let pki = Pki::new("quic test CA");
    let a = quic_backend(&pki, "A", &["a.test"]).await;
    let (mut proxy, to) = start(
        &[route("a.test", a.addr)],
        "idle_timeout = \"2s\"\nhandshake_timeout = \"2s\"",
        "",
    );
    let mut junk_source = XorShift(0x2545_f491_4f6c_dd1d);
    let mut junk = |len: usize| -> Vec<u8> { (0..len).map(|_| junk_source.byte()).collect() };
    let hello = hello_message(Some("a.test"), 0);
    let good = initial("a.test", &dcid(8, 0));
    let first_client = raw_client(&dcid(8, 0));
    let mut flipped = good.clone();
    let last = flipped.len() - 20;
    flipped[last] ^= 0x01;
    let mut stream_frame = vec![0x0a, 0x00, 0x04];
    stream_frame.extend_from_slice(b"GET ");
    let mut crypto_and_stream = wire::quic::build::crypto(0, &hello);
    crypto_and_stream.extend_from_slice(&stream_frame);
    let mut unknown_version = good.clone();
    unknown_version[1..5].copy_from_slice(&0x1a2a_3a4a_u32.to_be_bytes());
    let mut vn = good.clone();
    vn[1..5].copy_from_slice(&[0, 0, 0, 0]);
    let short_dcid = Client::new(Version::V1, &[1, 2, 3, 4], &[5; 8]);
    let mut not_a_hello = hello.clone();
    not_a_hello[0] = 0x02; // a ServerHello

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("one byte", vec![0x40]),
        ("short header, 40 bytes", {
            let mut d = junk(40);
            d[0] = 0x40;
            d
        }),
        ("short header, 1200 bytes", {
            let mut d = junk(1200);
            d[0] = 0x43;
            d
        }),
        ("twenty zeros", vec![0; 20]),
        ("long header byte alone", vec![0xc0]),
        ("1200 junk bytes", junk(1200)),
        (
            "v1 Handshake packet",
            long_packet(
                Version::V1,
                PacketKind::Handshake,
                &dcid(8, 1),
                &[9; 8],
                &junk(1150),
            ),
        ),
        (
            "v1 0-RTT packet",
            long_packet(
                Version::V1,
                PacketKind::ZeroRtt,
                &dcid(8, 2),
                &[9; 8],
                &junk(1150),
            ),
        ),
        (
            "v2 Handshake packet",
            long_packet(
                Version::V2,
                PacketKind::Handshake,
                &dcid(8, 3),
                &[9; 8],
                &junk(1150),
            ),
        ),
        ("unknown version", unknown_version),
        ("version 0", vn),
        ("Initial cut to 50 bytes", good[..50].to_vec()),
        ("Initial cut to 600 bytes", good[..600].to_vec()),
        ("Initial cut to 1199 bytes", good[..good.len() - 1].to_vec()),
        (
            "unpadded Initial",
            first_client.initial(0, &wire::quic::build::crypto(0, &hello)),
        ),
        ("Initial with a flipped bit", flipped),
        (
            "Initial with a 4-byte DCID",
            padded(&short_dcid, 0, &wire::quic::build::crypto(0, &hello)),
        ),
        (
            "Initial with a STREAM frame",
            padded(&raw_client(&dcid(8, 4)), 0, &crypto_and_stream),
        ),
        (
            "Initial with a ServerHello",
            padded(
                &raw_client(&dcid(8, 5)),
                0,
                &wire::quic::build::crypto(0, &not_a_hello),
            ),
        ),
        (
            "Initial with a CONNECTION_CLOSE",
            padded(&raw_client(&dcid(8, 6)), 0, &[0x1c, 0x00, 0x00, 0x00]),
        ),
    ];
    let mut sockets = Vec::new();
    for (what, datagram) in &cases {
        let socket = udp("127.0.0.1:0").await;
        socket.send_to(datagram, to).await.unwrap();
        sockets.push((*what, socket));
    }
    // Half a hello that never gets its second half.
    let half = udp("127.0.0.1:0").await;
    half.send_to(
        &padded(
            &raw_client(&dcid(8, 7)),
            0,
            &wire::quic::build::crypto(0, &hello[..hello.len() / 2]),
        ),
        to,
    )
    .await
    .unwrap();
    // A flood of 1,200-byte junk from one address.
    let flood = udp("127.0.0.1:0").await;
    for i in 0..FLOOD {
        flood.send_to(&junk(1200), to).await.unwrap();
        if i % 200 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert_silent(&flood, "the flood").await;
    // The others had that second (and more) too.
    for (what, socket) in &sockets {
        assert_nothing_came(socket, what);
    }
    assert_nothing_came(&half, "half a hello");
    assert_eq!(
        a.incoming.load(Ordering::SeqCst),
        0,
        "junk reached the backend"
    );

    let half_addr = half.local_addr().unwrap();
    let line = wait_flows(
        &proxy,
        &[&format!("client={half_addr} "), "transport=quic"],
        1,
        Duration::from_secs(20),
    )
    .remove(0);
    assert_eq!(log_field(&line, "outcome"), Some("hello_timeout"), "{line}");

    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the proxy exited"
    );
    let endpoint = client(&pki, "127.0.0.1:0", Duration::from_secs(10));
    assert_eq!(who_quic(&endpoint, to, "a.test").await.as_deref(), Ok("A"));
    shut(&endpoint).await;
    assert_eq!(a.accepted.load(Ordering::SeqCst), 1);
    let values = scrape(proxy.metrics_addr()).await;
    let quic = quic_series(&values);
    eprintln!("{quic:#?}");
    assert!(
        on_listener(&values, DROPPED, &[("reason", "short_initial")]) >= 1.0,
        "{quic:#?}"
    );
    assert!(
        on_listener(&values, DROPPED, &[("reason", "no_flow")]) >= 1.0,
        "{quic:#?}"
    );
    // Every hostile datagram is counted once: dropped, or the start of a
    // flow refused (the flood may lose some in the kernel's buffer).
    let counted = metric(&values, DROPPED, &[("listener", LISTENER)])
        + [("outcome", "bad_hello"), ("outcome", "hello_timeout")]
            .iter()
            .map(|label| on_listener(&values, CLOSED, &[*label]))
            .sum::<f64>();
    let sent = (cases.len() + 1 + FLOOD) as f64;
    assert!(
        counted <= sent && counted >= sent - FLOOD as f64 / 5.0,
        "{counted} counted of {sent}: {quic:#?}"
    );
    assert_eq!(
        on_listener(&values, CLOSED, &[("outcome", "relayed")]),
        0.0,
        "{quic:#?}"
    );
}

/// A pool whose first member is a closed UDP port: the first flow to it
/// fails (ICMP port unreachable) as `backend_unreachable`, the member is
/// marked down, and the client's retransmitted Initial starts a flow to the
/// live member; every client gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_member_that_is_down_is_skipped_by_the_retransmitted_initial() {
    let pki = Pki::new("quic test CA");
    let a = quic_backend(&pki, "A", &["pool.test"]).await;
    let dead = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let pool = format!(
        "  [[listeners.routes]]\n  hostname = \"pool.test\"\n  backends = [\"{dead}\", \"{}\"]\n",
        a.addr
    );
    let (proxy, to) = start(&[pool], "idle_timeout = \"2s\"", "");
    for i in 0..3 {
        let endpoint = client(&pki, "127.0.0.1:0", Duration::from_secs(10));
        let got = who_quic(&endpoint, to, "pool.test").await;
        assert_eq!(got.as_deref(), Ok("A"), "client {i}:\n{}", proxy.log_text());
        shut(&endpoint).await;
    }
    let line = wait_flows(
        &proxy,
        &[&format!("backend={dead} "), "transport=quic"],
        1,
        Duration::from_secs(20),
    )
    .remove(0);
    assert_eq!(
        log_field(&line, "outcome"),
        Some("backend_unreachable"),
        "{line}"
    );
    let relayed = wait_flows(
        &proxy,
        &["outcome=relayed", "transport=quic"],
        3,
        Duration::from_secs(20),
    );
    let a_addr = a.addr.to_string();
    assert!(
        relayed
            .iter()
            .all(|l| log_field(l, "backend") == Some(&*a_addr)),
        "{relayed:#?}"
    );
    assert_eq!(a.accepted.load(Ordering::SeqCst), 3);
}

/// `rate_limit` and `max_connections_per_ip` apply to QUIC flows: the flow
/// over either gets nothing back and is logged `blocked:rate` /
/// `blocked:conn_limit`; other addresses are served; a per-IP slot comes
/// back when the flow idles out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_and_per_ip_limit_drop_quic_flows_silently() {
    let echo = udp_echo().await;
    let routes = [route("flows.test", echo.addr)];

    let (proxy, to) = start(
        &routes,
        "idle_timeout = \"2s\"",
        "[firewall]\nrate_limit = 2\nrate_window = \"60s\"\n",
    );
    for i in 0..2 {
        let socket = udp("127.0.0.5:0").await;
        let hello = initial("flows.test", &dcid(9, i));
        assert!(
            echoed(&socket, to, &hello, Duration::from_secs(10)).await,
            "flow {i}"
        );
    }
    let third = udp("127.0.0.5:0").await;
    third
        .send_to(&initial("flows.test", &dcid(9, 2)), to)
        .await
        .unwrap();
    assert_silent(&third, "over the rate limit").await;
    let other = udp("127.0.0.6:0").await;
    let hello = initial("flows.test", &dcid(9, 3));
    assert!(echoed(&other, to, &hello, Duration::from_secs(10)).await);
    let third_addr = third.local_addr().unwrap();
    let line = wait_flows(
        &proxy,
        &[&format!("client={third_addr} ")],
        1,
        Duration::from_secs(10),
    )
    .remove(0);
    assert_eq!(log_field(&line, "outcome"), Some("blocked:rate"), "{line}");
    assert_eq!(echo.sources.lock().unwrap().len(), 3);
    drop(proxy);

    let echo = udp_echo().await;
    let (proxy, to) = start(
        &[route("flows.test", echo.addr)],
        "idle_timeout = \"2s\"",
        "[firewall]\nmax_connections_per_ip = 1\n",
    );
    let first = udp("127.0.0.7:0").await;
    let hello = initial("flows.test", &dcid(9, 4));
    assert!(echoed(&first, to, &hello, Duration::from_secs(10)).await);
    let second = udp("127.0.0.7:0").await;
    second
        .send_to(&initial("flows.test", &dcid(9, 5)), to)
        .await
        .unwrap();
    assert_silent(&second, "over the per-IP limit").await;
    let second_addr = second.local_addr().unwrap();
    let line = wait_flows(
        &proxy,
        &[&format!("client={second_addr} ")],
        1,
        Duration::from_secs(10),
    )
    .remove(0);
    assert_eq!(
        log_field(&line, "outcome"),
        Some("blocked:conn_limit"),
        "{line}"
    );
    let other = udp("127.0.0.8:0").await;
    let hello = initial("flows.test", &dcid(9, 6));
    assert!(echoed(&other, to, &hello, Duration::from_secs(10)).await);
    // The first flow idles out; its address may start another.
    let first_addr = first.local_addr().unwrap();
    wait_flows(
        &proxy,
        &[&format!("client={first_addr} "), "outcome=relayed"],
        1,
        Duration::from_secs(15),
    );
    let again = udp("127.0.0.7:0").await;
    let hello = initial("flows.test", &dcid(9, 7));
    assert!(
        echoed(&again, to, &hello, Duration::from_secs(5)).await,
        "{}",
        proxy.log_text()
    );
}

/// SIGTERM drains: an open flow keeps relaying, a new client gets
/// nothing back, and at `shutdown_timeout` the flow still open is ended as
/// `shutdown`; the server exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_open_flows_until_shutdown_timeout_then_ends_them() {
    let pki = Pki::new("quic test CA");
    let a = quic_backend(&pki, "A", &["a.test"]).await;
    let (mut proxy, to) = start(
        &[route("a.test", a.addr)],
        "idle_timeout = \"60s\"\nshutdown_timeout = \"3s\"",
        "",
    );
    let endpoint = client(&pki, "127.0.0.1:0", Duration::from_secs(10));
    let conn = connect(&endpoint, to, "a.test", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(ask(&conn, "who").await, b"A");
    let log = proxy.log.clone();
    let signalled = Instant::now();
    // Once: a second signal makes the server exit at once.
    proxy.signal("TERM");
    proxy.wait_log(&["draining"], Duration::from_secs(5));
    // The open flow still relays.
    assert_eq!(ask(&conn, "who").await, b"A");
    // A new flow is not admitted.
    let late = udp("127.0.0.1:0").await;
    late.send_to(&initial("a.test", &dcid(10, 1)), to)
        .await
        .unwrap();
    assert_silent(&late, "a new client while draining").await;
    assert_eq!(a.incoming.load(Ordering::SeqCst), 1);
    let status = proxy.wait_exit(Duration::from_secs(20));
    let waited = signalled.elapsed();
    let text = log.text();
    assert!(
        matches!(status, Some(s) if s.success()),
        "{status:?}\n{text}"
    );
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("flow closed") && l.contains("transport=quic"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line = lines[0];
    assert_eq!(log_field(line, "outcome"), Some("shutdown"), "{line}");
    assert_eq!(log_field(line, "sni"), Some("a.test"), "{line}");
    assert!(field_u64(line, "down") > 0, "{line}");
    assert!(waited >= Duration::from_secs(3), "exited after {waited:?}");
    shut(&endpoint).await;
}

/// SIGTERM with a flow whose client has gone: the flow idles out as usual
/// (`relayed`) and the server exits then, well before `shutdown_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_once_the_open_flows_idle_out() {
    let pki = Pki::new("quic test CA");
    let a = quic_backend(&pki, "A", &["a.test"]).await;
    let (mut proxy, to) = start(
        &[route("a.test", a.addr)],
        "idle_timeout = \"2s\"\nshutdown_timeout = \"60s\"",
        "",
    );
    let endpoint = client(&pki, "127.0.0.1:0", Duration::from_secs(10));
    assert_eq!(who_quic(&endpoint, to, "a.test").await.as_deref(), Ok("A"));
    shut(&endpoint).await;
    let signalled = Instant::now();
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(20));
    let waited = signalled.elapsed();
    assert!(
        matches!(status, Some(s) if s.success()),
        "{status:?}\n{}",
        proxy.log_text()
    );
    assert!(waited < Duration::from_secs(10), "exited after {waited:?}");
    let lines = flow_lines(&proxy, &["transport=quic"]);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(
        log_field(&lines[0], "outcome"),
        Some("relayed"),
        "{}",
        lines[0]
    );
}

/// Junk datagrams sent from one address in the hostile test.
const FLOOD: usize = 5000;

/// Asserts that nothing is waiting on `socket` (after a wait elsewhere).
fn assert_nothing_came(socket: &UdpSocket, what: &str) {
    let mut buf = vec![0u8; 65536];
    match socket.try_recv_from(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((n, from)) => panic!("{what}: got {n} bytes from {from}"),
        Err(e) => panic!("{what}: recv failed: {e}"),
    }
}

/// A small deterministic byte source for junk.
struct XorShift(u64);

impl XorShift {
    fn byte(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 24) as u8
    }
}
