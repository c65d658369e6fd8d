//! The SNI router end to end: the real binary on loopback, real TLS clients
//! (rustls, openssl s_client) and real backends.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream as StdStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hostnames_over_two_listeners_reach_their_backends() {
    let (dir, pki, a) = tls_scene("A", &["a.test"]).await;
    let b = tls_backend(&pki, "B", &["b.test"]).await;
    let c = tls_backend(&pki, "C", &["c.test"]).await;
    let toml = config(
        dir.path(),
        &format!(
            "{}{}",
            listener(
                "127.0.0.1:0",
                &[route("a.test", a.addr), route("b.test", b.addr)]
            ),
            listener(
                "127.0.0.2:0",
                &[route("c.test", c.addr), route("a.test", b.addr)]
            ),
        ),
    );
    let proxy = Proxy::start(dir.path(), &toml);
    let l1 = proxy.listener("127.0.0.1:0");
    let l2 = proxy.listener("127.0.0.2:0");
    assert_eq!(who(l1, "a.test", &pki).await.unwrap(), "A");
    assert_eq!(who(l1, "b.test", &pki).await.unwrap(), "B");
    assert_eq!(who(l2, "c.test", &pki).await.unwrap(), "C");
    // Per-listener tables: the same name goes elsewhere on the other listener
    // (the TLS handshake still succeeds because B's cert is checked for b.test
    // only when asked for b.test; here the client asks a.test → B's cert fails).
    assert!(who(l2, "a.test", &pki).await.is_err());
    assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    // c.test is not a route on listener 1.
    assert!(who(l1, "c.test", &pki).await.is_err());
    proxy.wait_log(&["sni=c.test", "outcome=no_route"], Duration::from_secs(5));
    let line = proxy.wait_log(&["sni=a.test", "outcome=relayed"], Duration::from_secs(5));
    for field in [
        "client=127.0.0.1:",
        "listener=127.0.0.1:",
        "backend=127.0.0.1:",
        "up=",
        "down=",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_through_tls_end_to_end() {
    let pki = Pki::new("test CA");
    let a = tls_backend(&pki, "A", &["a.test"]).await;
    let server = InProcess::routing(&[("a.test", a.addr)], "").await;
    let mut tls = tls_connect(server.addr(), "a.test", pki.client_config())
        .await
        .unwrap();
    assert_eq!(read_line(&mut tls).await.unwrap(), "backend=A");
    tls.write_all(b"ping over tls\n").await.unwrap();
    assert_eq!(read_line(&mut tls).await.unwrap(), "ping over tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_case_and_trailing_dot_are_normalised_and_bytes_pass_unchanged() {
    let mut backend = raw_backend(b"").await;
    let server = InProcess::routing(&[("a.test", backend.addr)], "").await;
    for sni in ["a.test", "A.TEST", "a.test.", "A.Test."] {
        let mut sent = client_hello(Some(sni));
        sent.extend_from_slice(b"\x17\x03\x03\x00\x05hello-after-the-hello");
        let _ = send_and_finish(server.addr(), &[&sent], false).await;
        assert_eq!(
            backend.next().await,
            sent,
            "backend bytes differ for SNI {sni:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_missing_sni_and_non_tls_get_zero_bytes() {
    let backend = raw_backend(b"should never be seen").await;
    let server = InProcess::routing(&[("a.test", backend.addr)], "").await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no_route", client_hello(Some("unknown.test"))),
        ("no_route", client_hello(None)),
        (
            "bad_hello",
            b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec(),
        ),
        ("bad_hello", b"\x16\x03\x01\x00\x00".to_vec()),
        ("bad_hello", vec![0x80, 0x2e, 0x01, 0x03, 0x01]),
    ];
    // Each connection's outcome, read from the closed-connection counters:
    // after case i, i + 1 connections have closed and the counter of this
    // case's outcome went up by one.
    let mut so_far: std::collections::BTreeMap<&str, f64> = Default::default();
    for (i, (outcome, bytes)) in cases.iter().enumerate() {
        let mut client = TcpStream::connect(server.addr()).await.unwrap();
        client.write_all(bytes).await.unwrap();
        let (got, _) = read_all(&mut client, Duration::from_secs(10)).await;
        assert!(
            got.is_empty(),
            "client got {} bytes for {outcome}",
            got.len()
        );
        *so_far.entry(outcome).or_default() += 1.0;
        // The client may see the close before the server has counted it.
        let closed = (i + 1) as f64;
        let metrics = server.wait_metrics(|m| closed_total(m) >= closed).await;
        assert_eq!(closed_total(&metrics), closed, "case {i}: {metrics:?}");
        for (outcome, n) in &so_far {
            assert_eq!(metrics.get(&closed_series(outcome)), Some(n), "case {i}");
        }
    }
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(closed_total(&server.metrics().await), cases.len() as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_one_byte_at_a_time_over_two_records_and_9k_all_routed() {
    let mut backend = raw_backend(b"").await;
    let server = InProcess::routing(&[("a.test", backend.addr)], "").await;
    let one_record = client_hello(Some("a.test"));
    let two_records = {
        let message = hello_message(Some("a.test"), 300);
        records(&message, message.len() / 2 + 1)
    };
    let nine_k = records(&hello_message(Some("a.test"), 9 * 1024), 16384);
    assert!(nine_k.len() > 9 * 1024);

    for (name, bytes, byte_at_a_time) in [
        ("one byte at a time", one_record.clone(), true),
        ("two records", two_records, false),
        (
            "two records, one byte at a time",
            records(&hello_message(Some("a.test"), 0), 40),
            true,
        ),
        ("9 KiB", nine_k, false),
    ] {
        let _ = send_and_finish(server.addr(), &[&bytes], byte_at_a_time).await;
        assert_eq!(backend.next().await, bytes, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_real_hellos_are_routed_unchanged() {
    let mut backend = raw_backend(b"").await;
    let fixtures = [
        ("chromium-156-pq.bin", "chrome.test"),
        ("curl-7.88.bin", "curl.test"),
        ("openssl-3.0-s_client.bin", "openssl.test"),
        ("python-3.11.bin", "python.test"),
        ("rustls-0.23-pq.bin", "rustls-pq.test"),
        ("node-20.bin", "node.test"),
    ];
    let routes: Vec<(&str, SocketAddr)> = fixtures
        .iter()
        .map(|(_, sni)| (*sni, backend.addr))
        .collect();
    let server = InProcess::routing(&routes, "").await;
    for (file, _) in fixtures {
        let bytes = std::fs::read(format!("tests/data/hellos/{file}")).unwrap();
        // Whole, and in two halves.
        for split in [bytes.len(), bytes.len() / 2] {
            let mut client = TcpStream::connect(server.addr()).await.unwrap();
            client.write_all(&bytes[..split]).await.unwrap();
            // The pause is the point: the second half arrives on its own.
            tokio::time::sleep(Duration::from_millis(5)).await;
            client.write_all(&bytes[split..]).await.unwrap();
            client.shutdown().await.unwrap();
            assert_eq!(backend.next().await, bytes, "{file} split at {split}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_arrive_intact() {
    let backend = raw_echo_backend().await;
    let server = InProcess::routing(&[("bulk.test", backend)], "").await;
    const TOTAL: usize = 64 * 1024 * 1024;
    let client = TcpStream::connect(server.addr()).await.unwrap();
    let (mut reader, mut writer) = client.into_split();
    writer
        .write_all(&client_hello(Some("bulk.test")))
        .await
        .unwrap();
    let send = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut state: u64 = 0x9e3779b97f4a7c15;
        let mut chunk = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < TOTAL {
            for b in chunk.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            hasher.update(&chunk);
            writer.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        writer.shutdown().await.unwrap();
        hasher.finalize()
    });
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), reader.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        received += n;
    }
    let sent_hash = send.await.unwrap();
    assert_eq!(received, TOTAL);
    assert_eq!(hasher.finalize(), sent_hash);
    // The relay's own count (bulk.test is the listener's only route).
    let metrics = server.wait_closed("relayed", 1.0).await;
    let down = one_listener("mc_proxy_relayed_bytes_total", "direction=\"down\"");
    assert_eq!(metrics.get(&down), Some(&(TOTAL as f64)), "{metrics:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_passes_fin_and_the_other_direction_keeps_flowing() {
    let mut backend = raw_backend(b"reply after your FIN").await;
    let server = InProcess::routing(&[("a.test", backend.addr)], "").await;
    let mut sent = client_hello(Some("a.test"));
    sent.extend_from_slice(b"request body");
    // Half close: the backend only replies once it has seen our FIN.
    let (reply, result) = send_and_finish(server.addr(), &[&sent], false).await;
    result.unwrap();
    assert_eq!(reply, b"reply after your FIN");
    assert_eq!(backend.next().await, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_idle_timeout() {
    let backend = raw_echo_backend().await;
    let server = InProcess::routing(
        &[("a.test", backend)],
        &proxy_section("idle_timeout = \"1s\""),
    )
    .await;
    let mut client = TcpStream::connect(server.addr()).await.unwrap();
    client
        .write_all(&client_hello(Some("a.test")))
        .await
        .unwrap();
    // Activity resets the timer: echo three times, 500 ms apart (the
    // pacing is the point: each gap is half the idle timeout).
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        client.read_exact(&mut one).await.unwrap();
    }
    let started = Instant::now();
    let (_, _) = read_all(&mut client, Duration::from_secs(10)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "closed too late: {waited:?}"
    );
    server.wait_closed("idle_timeout", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refusing_closes_the_client_at_once() {
    // Nothing listens on port 1.
    let nothing: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let server = InProcess::routing(&[("a.test", nothing)], "").await;
    let mut client = TcpStream::connect(server.addr()).await.unwrap();
    client
        .write_all(&client_hello(Some("a.test")))
        .await
        .unwrap();
    let (got, _) = read_all(&mut client, Duration::from_secs(5)).await;
    assert!(got.is_empty());
    server.wait_closed("backend_unreachable", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_not_answering_closes_the_client_within_connect_timeout() {
    // A listener whose accept queue is full drops SYNs: connect hangs.
    let blackhole =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    blackhole
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    blackhole.listen(0).unwrap();
    let hole: SocketAddr = blackhole.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = StdStream::connect_timeout(&hole, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    let proxy = Proxy::routing(
        &[("a.test", hole)],
        &proxy_section("connect_timeout = \"1s\""),
    );
    let port = proxy.addr().port();
    let started = Instant::now();
    let mut client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    client
        .write_all(&client_hello(Some("a.test")))
        .await
        .unwrap();
    let (got, _) = read_all(&mut client, Duration::from_secs(10)).await;
    let waited = started.elapsed();
    assert!(got.is_empty());
    assert!(
        waited >= Duration::from_millis(900),
        "gave up too early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "took {waited:?}");
    let line = proxy.wait_log(&["outcome=backend_unreachable"], Duration::from_secs(5));
    assert!(line.contains("timed out"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_delay_a_good_client_and_is_closed_after_handshake_timeout() {
    let pki = Pki::new("test CA");
    let a = tls_backend(&pki, "A", &["a.test"]).await;
    let proxy = Proxy::routing(
        &[("a.test", a.addr)],
        &proxy_section("handshake_timeout = \"2s\""),
    );
    let port = proxy.addr().port();
    let hello = client_hello(Some("a.test"));
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(&hello[..hello.len() / 2]).await.unwrap();
        stalled.push(s);
    }
    // One more trickles a byte every 200 ms: still closed at the deadline.
    let mut trickler = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let trickle = tokio::spawn(async move {
        for byte in hello.iter().take(40) {
            if trickler
                .write_all(std::slice::from_ref(byte))
                .await
                .is_err()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    });
    let started = Instant::now();
    assert_eq!(
        who(format!("127.0.0.1:{port}").parse().unwrap(), "a.test", &pki)
            .await
            .unwrap(),
        "A"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "good client waited {:?}",
        started.elapsed()
    );
    for mut s in stalled {
        let (got, _) = read_all(&mut s, Duration::from_secs(10)).await;
        assert!(got.is_empty());
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(trickle.await.unwrap(), "trickling client was not closed");
    let timeouts = proxy
        .conn_lines()
        .iter()
        .filter(|l| l.contains("outcome=hello_timeout"))
        .count();
    assert!(timeouts >= 300, "{timeouts} hello_timeout lines");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_on_ipv6_loopback() {
    let (dir, pki, a) = tls_scene("A", &["a.test"]).await;
    let server = InProcess::start(
        dir.path(),
        &config(dir.path(), &listener("[::1]:0", &[route("a.test", a.addr)])),
    )
    .await;
    let addr = server.addr();
    assert!(addr.is_ipv6(), "{addr}");
    assert_eq!(who(addr, "a.test", &pki).await.unwrap(), "A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_listener_accepts_ipv4_and_ipv6() {
    let (dir, pki, a) = tls_scene("A", &["a.test"]).await;
    let proxy = Proxy::start(
        dir.path(),
        &config(dir.path(), &listener(":0", &[route("a.test", a.addr)])),
    );
    let port = proxy.listener(":0").port();
    assert_eq!(
        who(format!("127.0.0.1:{port}").parse().unwrap(), "a.test", &pki)
            .await
            .unwrap(),
        "A"
    );
    assert_eq!(
        who(format!("[::1]:{port}").parse().unwrap(), "a.test", &pki)
            .await
            .unwrap(),
        "A"
    );
    // The IPv4 client is logged as IPv4, not as a mapped IPv6 address.
    proxy.wait_log(
        &["client=127.0.0.1:", "outcome=relayed"],
        Duration::from_secs(5),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_reaches_the_backend() {
    let (dir, pki, a) = tls_scene("A", &["openssl.test"]).await;
    let server = InProcess::routing(&[("openssl.test", a.addr)], "").await;
    let port = server.addr().port();
    let ca = pki.write_ca(dir.path(), "ca");
    let output = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "openssl.test",
                "-CAfile",
            ])
            .arg(&ca)
            .args(["-verify_return_error", "-quiet", "-no_ign_eof"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"echo me\n").unwrap();
        // s_client has no way to say it got the echo; stdin's EOF ends it
        // (-no_ign_eof), so give the reply time to arrive first.
        std::thread::sleep(Duration::from_millis(500));
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("backend=A"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("echo me"), "{stdout}");
}

/// The binary routing `a.test` to a raw echo backend (served by
/// `runtime`), with `shutdown_timeout`.
fn echo_proxy(runtime: &tokio::runtime::Runtime, shutdown_timeout: &str) -> Proxy {
    let backend = runtime.block_on(raw_echo_backend());
    let drain = format!("shutdown_timeout = \"{shutdown_timeout}\"");
    Proxy::routing(&[("a.test", backend)], &proxy_section(&drain))
}

/// A blocking connection through the proxy on `port` for `a.test`, `byte`
/// sent and its echo read.
fn echoing(port: u16, byte: u8) -> StdStream {
    let mut stream = StdStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(&client_hello(Some("a.test"))).unwrap();
    stream.write_all(&[byte]).unwrap();
    let mut one = [0u8; 1];
    stream.read_exact(&mut one).unwrap();
    stream
}

#[test]
fn sigterm_drains_established_connections_then_forces_and_exits_zero() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut proxy = echo_proxy(&runtime, "2s");
    let port = proxy.addr().port();
    let mut early = echoing(port, b'1');
    let mut late = echoing(port, b'2');
    let mut one = [0u8; 1];

    let signalled = Instant::now();
    proxy.signal("TERM");
    // New connections are refused at once.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        StdStream::connect(("127.0.0.1", port)).is_err(),
        "listener still open"
    );
    // Established ones keep flowing while draining...
    early.write_all(b"3").unwrap();
    early.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"3");
    // ...and one that finishes lets the drain continue.
    early.shutdown(Shutdown::Write).unwrap();
    let (_, result) = std_read_all(&mut early);
    result.unwrap();
    assert!(
        proxy.wait_exit(Duration::from_millis(1000)).is_none(),
        "exited before the drain time"
    );
    // The other is forced closed after shutdown_timeout, then exit 0.
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit");
    let waited = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(waited >= Duration::from_millis(1900), "{waited:?}");
    assert!(waited < Duration::from_secs(6), "{waited:?}");
    let (_, _) = std_read_all(&mut late);
    assert!(
        proxy.log_text().contains("outcome=shutdown"),
        "{}",
        proxy.log_text()
    );
}

#[test]
fn sigterm_with_no_connections_exits_at_once_and_second_signal_forces() {
    let mut proxy = Proxy::routing(&[("a.test", "127.0.0.1:9".parse().unwrap())], "");
    let started = Instant::now();
    proxy.signal("INT");
    let status = proxy
        .wait_exit(Duration::from_secs(5))
        .expect("did not exit");
    assert!(status.success());
    assert!(started.elapsed() < Duration::from_secs(2));

    // With a connection open and a long drain, a second signal exits at once.
    // (A fresh directory: the first run's database would keep its route.)
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut proxy = echo_proxy(&runtime, "60s");
    let _open = echoing(proxy.addr().port(), b'x');
    proxy.signal("TERM");
    proxy.wait_log(&["shutting down"], Duration::from_secs(10));
    assert!(proxy.wait_exit(Duration::from_millis(200)).is_none());
    let second = Instant::now();
    proxy.signal("TERM");
    proxy
        .wait_exit(Duration::from_secs(3))
        .expect("second signal did not exit");
    assert!(second.elapsed() < Duration::from_secs(2));
}

/// The EMFILE back-off is the safety net when the connection cap does not
/// keep the descriptors in budget: here `max_connections` is set far above
/// what 64 descriptors allow (the derived cap would never reach EMFILE; see
/// tests/limits.rs).
#[test]
fn accept_loop_survives_running_out_of_file_descriptors() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backend = runtime.block_on(raw_echo_backend());
    let toml = config(
        dir.path(),
        &format!(
            "{}[proxy]\nmax_connections = 1000\n",
            listener("127.0.0.1:0", &[route("a.test", backend)])
        ),
    );
    let mut proxy = Proxy::start_with_nofile(dir.path(), &toml, 64);
    let port = proxy.addr().port();
    // Hold far more connections than the proxy has descriptors.
    let mut held = Vec::new();
    for _ in 0..150 {
        if let Ok(s) = StdStream::connect(("127.0.0.1", port)) {
            held.push(s);
        }
    }
    proxy.wait_log(&["accept failed; backing off"], Duration::from_secs(10));
    let text = proxy.log_text();
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "proxy died:\n{text}"
    );
    // Free the descriptors: a new client is served again. The client
    // retries, as a real one would: the proxy first works through the
    // closed connections still queued, within its accept back-off.
    drop(held);
    let served = (0..55).any(|_| {
        let Ok(mut s) = StdStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_millis(100));
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(&client_hello(Some("a.test"))).unwrap();
        s.write_all(b"z").unwrap();
        let mut one = [0u8; 1];
        let ok = s.read_exact(&mut one).is_ok() && &one == b"z";
        if !ok {
            std::thread::sleep(Duration::from_millis(100));
        }
        ok
    });
    assert!(served, "{}", proxy.log_text());
}

#[test]
fn check_accepts_the_example_and_names_bad_keys_with_exit_2() {
    let (code, stdout, stderr) = run_cli(&["check", "-c", "mc-proxy.toml.example"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[database]\npath = \"x.db\"\n[[listeners]]\naddr = \":1\"\n[[listeners]]\naddr = \":2\"\n  [[listeners.routes]]\n  hostname = \"a.test\"\n  backend = \"nope\"\n",
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["check", "-c", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("listeners[1].routes[0].backend"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let (code, _, stderr) = run_cli(&[
        "check",
        "-c",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("missing.toml"), "{stderr}");
    // A corrupt GeoIP file is a configuration error at check.
    let geo = dir.path().join("geo.mmdb");
    std::fs::write(&geo, b"not an mmdb").unwrap();
    std::fs::write(
        &bad,
        format!("[database]\npath = \"x.db\"\n[firewall]\ngeoip_db = \"{}\"\nblocked_countries = [\"KP\"]\n", geo.display()),
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["check", "-c", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("firewall.geoip_db"), "{stderr}");
}

#[test]
fn check_names_bad_pool_keys_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.toml");
    let with = |route: &str, proxy: &str| {
        format!("[database]\npath = \"x.db\"\n[[listeners]]\naddr = \":1\"\n  [[listeners.routes]]\n  hostname = \"a.test\"\n  backend = \"127.0.0.1:1\"\n  [[listeners.routes]]\n  hostname = \"p.test\"\n{route}\n{proxy}")
    };
    // A good pool passes.
    std::fs::write(
        &path,
        with(
            "  backends = [\"127.0.0.1:2\", \"127.0.0.1:3\"]\n  balance = \"least_connections\"\n  health_interval = \"5s\"\n  health_fall = 2\n  health_rise = 2",
            "[proxy]\nconnect_attempts = 2\n",
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("2 routes"), "{stdout}");
    for (route, proxy, key, text) in [
        (
            "  backends = [\"127.0.0.1:2\", \"127.0.0.1:3\", \"nope\"]",
            "",
            "listeners[0].routes[1].backends[2]: ",
            "\"nope\"",
        ),
        (
            "  backend = \"127.0.0.1:2\"\n  backends = [\"127.0.0.1:2\"]",
            "",
            "listeners[0].routes[1].backend: ",
            "not both",
        ),
        (
            "  backend = \"127.0.0.1:2\"\n  balance = \"random\"",
            "",
            "listeners[0].routes[1].balance: ",
            "round_robin",
        ),
        (
            "  backend = \"127.0.0.1:2\"\n  health_interval = \"soon\"",
            "",
            "listeners[0].routes[1].health_interval: ",
            "\"soon\"",
        ),
        (
            "  backend = \"127.0.0.1:2\"\n  health_interval = \"1s\"\n  health_path = \"/healthz\"",
            "",
            "listeners[0].routes[1].health_path: ",
            "l7",
        ),
        (
            "  backend = \"127.0.0.1:2\"\n  health_rise = 2",
            "",
            "listeners[0].routes[1].health_rise: ",
            "needs health_interval",
        ),
        (
            "  backend = \"127.0.0.1:2\"",
            "[proxy]\nconnect_attempts = 0\n",
            "proxy.connect_attempts: ",
            "from 1 to 64",
        ),
    ] {
        std::fs::write(&path, with(route, proxy)).unwrap();
        let (code, _, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
        assert_eq!(code, 2, "{route}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(text),
            "{route}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn version_prints_name_and_crate_version() {
    let (code, stdout, _) = run_cli(&["--version"]);
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with(&format!("mc-proxy {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
}

#[test]
fn server_with_a_taken_port_exits_1_naming_the_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        config(dir.path(), &listener(&format!("127.0.0.1:{port}"), &[])),
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["server", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("listeners[0].addr"), "{stderr}");
}

/// One worker thread (the default on a 1–2 CPU host, or
/// `TOKIO_WORKER_THREADS=1`) still serves many TLS connections at once, and
/// the start line says how many workers run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_follow_the_environment_or_the_cpu_count() {
    let (dir, pki, a) = tls_scene("A", &["a.test"]).await;
    let toml = config(
        dir.path(),
        &listener("127.0.0.1:0", &[route("a.test", a.addr)]),
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let default = if cpus <= 2 { 1 } else { cpus };
    for (env, workers) in [(None, default), (Some("1"), 1), (Some("3"), 3)] {
        let proxy = match env {
            None => Proxy::start(dir.path(), &toml),
            Some(n) => Proxy::start_with_env(dir.path(), &toml, &[("TOKIO_WORKER_THREADS", n)]),
        };
        let log = proxy.log_text();
        assert!(
            log.contains(&format!("workers={workers}")),
            "{env:?}: {log}"
        );
        let addr = proxy.listener("127.0.0.1:0");
        let clients = (0..16).map(|i| {
            let client_config = pki.client_config();
            tokio::spawn(async move {
                let mut tls = tls_connect(addr, "a.test", client_config).await.unwrap();
                assert_eq!(read_line(&mut tls).await.unwrap(), "backend=A");
                let line = format!("client {i}\n");
                tls.write_all(line.as_bytes()).await.unwrap();
                assert_eq!(read_line(&mut tls).await.unwrap(), line.trim_end());
            })
        });
        for client in clients.collect::<Vec<_>>() {
            tokio::time::timeout(Duration::from_secs(20), client)
                .await
                .expect("every client served")
                .unwrap();
        }
        drop(proxy);
    }
}

#[test]
fn a_bad_worker_count_is_exit_2_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config(dir.path(), &listener("127.0.0.1:0", &[]))).unwrap();
    for bad in ["0", "many", "-2"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mc-proxy"))
            .args(["server", "-c", path.to_str().unwrap()])
            .env("TOKIO_WORKER_THREADS", bad)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("TOKIO_WORKER_THREADS"), "{bad}: {stderr}");
        // Refused before the store was created.
        assert!(
            !dir.path().join("mc-proxy.db").exists(),
            "{bad}: DB created"
        );
    }
}
