//! One connection's life: firewall, ClientHello, route, backend, relay, log.
//!
//! The firewall decision is the first thing that happens, before a byte is
//! read. Nothing is ever sent to a client that is refused: a blocked client
//! gets an RST, everything else that fails gets a plain close.
//!
//! On a `proxy_protocol` listener the PROXY header comes first: it is read
//! (and nothing after it), its client address replaces the socket's peer,
//! and only then does the firewall judge, before a ClientHello byte is read.
//! A route with `send_proxy_protocol` gets a PROXY v2 header in the same
//! write as the ClientHello bytes.
//!
//! An L7 route branches off at step 4 into [`super::http`]: TLS is
//! terminated there and HTTP proxied; the close line is still written here,
//! with the TLS bytes both ways and `requests=`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use wire::hello::{self, Parse};
use wire::proxy_protocol::{self, Addresses};

use crate::outcome::Outcome;

use super::connect;
use super::http;
use super::listener::Listener;
use super::relay::{self, RelayEnd};
use super::sys;

/// What the close log line reports.
struct Record {
    /// The client: the socket's peer, or the address a PROXY header carried.
    client: SocketAddr,
    /// On a `proxy_protocol` listener, the socket's peer (the upstream proxy).
    upstream: Option<SocketAddr>,
    sni: Option<String>,
    backend: Option<String>,
    up: Option<u64>,
    down: Option<u64>,
    /// Requests served on an L7 connection.
    requests: Option<u64>,
    detail: Option<String>,
}

/// Initial capacity of the hello buffer: holds a typical (even a
/// post-quantum) ClientHello without growing.
const HELLO_BUFFER: usize = 2048;

pub(super) async fn handle(
    stream: TcpStream,
    client: SocketAddr,
    listener: Arc<Listener>,
    forced: CancellationToken,
    draining: CancellationToken,
) {
    let started = Instant::now();
    let mut record = Record {
        client,
        upstream: None,
        sni: None,
        backend: None,
        up: None,
        down: None,
        requests: None,
        detail: None,
    };
    let outcome = run(stream, &listener, &mut record, &forced, &draining).await;
    listener
        .listener_stats
        .metrics
        .closed(outcome, record.up, record.down);
    tracing::info!(
        target: "mc_proxy::conn",
        client = %record.client,
        upstream = record.upstream.map(tracing::field::display),
        listener = %listener.routes.addr(),
        sni = record.sni.as_deref().map(tracing::field::display),
        backend = record.backend.as_deref().map(tracing::field::display),
        up = record.up,
        down = record.down,
        requests = record.requests,
        duration_ms = started.elapsed().as_millis() as u64,
        outcome = %outcome,
        error = record.detail.as_deref().map(tracing::field::display),
        "connection closed"
    );
}

async fn run(
    mut client: TcpStream,
    listener: &Listener,
    record: &mut Record,
    forced: &CancellationToken,
    draining: &CancellationToken,
) -> Outcome {
    let timeouts = &listener.timeouts;
    let deadline = tokio::time::Instant::now() + timeouts.handshake_timeout;
    let metrics = &listener.listener_stats.metrics;

    // 0. On a proxy_protocol listener, the PROXY header names the client.
    // (None = the socket's own local address, looked up only if needed.)
    let mut destination = None;
    if listener.proxy_protocol {
        record.upstream = Some(record.client);
        match read_proxy_header(&mut client, deadline).await {
            Ok(Addresses::Tcp {
                source,
                destination: carried,
            }) => {
                record.client = SocketAddr::new(source.ip().to_canonical(), source.port());
                destination = Some(carried);
            }
            // LOCAL / UNKNOWN: the upstream's own connection.
            Ok(Addresses::Local) => {}
            Err(failure) => {
                record.detail = Some(failure.to_string());
                return match failure {
                    HeaderFailure::Timeout => Outcome::HelloTimeout,
                    HeaderFailure::Reject(_) | HeaderFailure::Closed | HeaderFailure::Io(_) => {
                        Outcome::BadProxyHeader
                    }
                };
            }
        }
    }

    // 1. Firewall, before a ClientHello byte is read. An admitted client's
    // open-connection count (max_connections_per_ip) holds this connection
    // until `run` returns.
    let _slot = match listener.firewall.admit(record.client.ip()) {
        Ok(slot) => slot,
        Err(reason) => {
            sys::reset(client);
            return Outcome::Blocked(reason);
        }
    };

    // 2. The whole ClientHello, within handshake_timeout. The reader resumes
    // where it stopped on each read, so the work is linear in the bytes
    // however they are framed. The buffer keeps every byte for the backend
    // and doubles as needed, never beyond the longest records a hello can
    // take (hello::MAX_RECORDS_LEN), at which the reader has answered.
    let hello_started = Instant::now();
    let mut buffer = Vec::with_capacity(HELLO_BUFFER);
    let mut reader = hello::HelloReader::new();
    let hello = loop {
        match reader.advance(&buffer) {
            Ok(Parse::Done(hello)) => break hello,
            Ok(Parse::NeedMore) => {}
            Err(reject) => {
                record.detail = Some(reject.to_string());
                return Outcome::BadHello;
            }
        }
        if buffer.len() == buffer.capacity() {
            let grown = (buffer.len() * 2).min(hello::MAX_RECORDS_LEN);
            buffer.reserve_exact(grown.saturating_sub(buffer.len()));
        }
        if buffer.len() == buffer.capacity() {
            // Not reached: a buffer of MAX_RECORDS_LEN bytes has an answer.
            record.detail = Some("hello records longer than any ClientHello".into());
            return Outcome::BadHello;
        }
        match tokio::time::timeout_at(deadline, client.read_buf(&mut buffer)).await {
            Err(_) => return Outcome::HelloTimeout,
            Ok(Ok(0)) => {
                record.detail = Some("client closed before the hello was complete".into());
                return Outcome::BadHello;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                record.detail = Some(e.to_string());
                return Outcome::BadHello;
            }
        }
    };
    metrics.hello_took(hello_started.elapsed());

    // 3. Route: by SNI (exact, wildcard, then the default route `*`); a
    // hello without SNI goes to the default route if there is one.
    let target = match hello.sni {
        Some(sni) => {
            let target = listener.routes.lookup(&sni);
            record.sni = Some(sni);
            target
        }
        None => {
            let target = listener.routes.default_route();
            if target.is_none() {
                record.detail = Some("no SNI".into());
            }
            target
        }
    };
    let Some(route) = target else {
        return Outcome::NoRoute;
    };
    let target = &route.target;

    // 4. An L7 route: TLS ends here and HTTP is proxied per request
    // (`http`), the hello bytes read so far going to the TLS server. Its
    // close line names the route's first backend (each request line names
    // the one it went to).
    if let Some(l7) = target.mode.l7() {
        record.backend = Some(target.backend().to_string());
        // Boxed: the L7 state (TLS session, HTTP server) lives on the heap
        // only for L7 connections. Inline, it made every connection's task
        // as large as an L7 one, and an idle L4 connection 2.5x heavier.
        let served = Box::pin(http::serve(
            client,
            buffer,
            record.client,
            l7,
            &listener.http,
            deadline,
            forced,
            draining,
        ))
        .await;
        record.up = Some(served.up);
        record.down = Some(served.down);
        record.requests = Some(served.requests);
        record.detail = served.detail;
        return served.outcome;
    }

    // 4. Backend (an L4 route).
    let connect_started = Instant::now();
    let connected = connect::connect_pool(
        &route.pool,
        timeouts.connect_attempts as usize,
        timeouts.connect_timeout,
    )
    .await;
    let (mut backend, _lease) = match connected {
        Ok(pooled) => {
            metrics.connect_took(connect_started.elapsed());
            record.backend = Some(pooled.member.backend().to_string());
            (pooled.stream, pooled.lease)
        }
        Err(failure) => {
            if let Some(last) = failure.last() {
                record.backend = Some(last.to_string());
            }
            record.detail = Some(failure.to_string());
            return Outcome::BackendUnreachable;
        }
    };
    let _ = backend.set_nodelay(true);
    // On Linux the accepted socket inherited TCP_NODELAY from the listener.
    #[cfg(not(target_os = "linux"))]
    let _ = client.set_nodelay(true);
    let hello_bytes = buffer.len() as u64;
    if target.send_proxy_protocol {
        // Header and hello in one write: the backend sees both at once.
        let destination = match destination {
            Some(carried) => carried,
            None => match client.local_addr() {
                Ok(local) => local,
                Err(e) => {
                    record.detail = Some(format!("reading the listener address: {e}"));
                    return Outcome::BackendUnreachable;
                }
            },
        };
        let mut framed = Vec::with_capacity(proxy_protocol::V2_HEADER_LEN + 36 + buffer.len());
        proxy_protocol::encode_v2(record.client, destination, &mut framed);
        framed.extend_from_slice(&buffer);
        buffer = framed;
    }
    if let Err(e) = backend.write_all(&buffer).await {
        record.detail = Some(format!("writing the hello to the backend: {e}"));
        return Outcome::BackendUnreachable;
    }
    drop(buffer);

    // 5. Relay.
    let result = relay::relay(client, backend, timeouts.idle_timeout, forced).await;
    record.up = Some(hello_bytes + result.up);
    record.down = Some(result.down);
    if let Some(error) = result.error {
        record.detail = Some(error.to_string());
    }
    match result.end {
        RelayEnd::Closed => Outcome::Relayed,
        RelayEnd::Idle => Outcome::IdleTimeout,
        RelayEnd::Shutdown => Outcome::Shutdown,
    }
}

/// Why no PROXY header was read. The text is the close line's `error=`.
#[derive(Debug, thiserror::Error)]
enum HeaderFailure {
    /// Not complete by the handshake deadline (outcome `hello_timeout`).
    #[error("PROXY header not complete within handshake_timeout")]
    Timeout,
    /// Not a valid header (outcome `bad_proxy_header`, as are the rest).
    #[error("{0}")]
    Reject(proxy_protocol::Reject),
    /// The upstream closed before the header was complete.
    #[error("upstream closed before the PROXY header was complete")]
    Closed,
    /// Reading from the upstream failed.
    #[error("{0}")]
    Io(#[source] io::Error),
}

/// Bytes peeked at a time while reading a PROXY header: a v1 line (107
/// bytes) or a v2 header with addresses and a few TLVs fits at once.
const PROXY_PEEK: usize = 256;

/// Reads a PROXY header and nothing after it, by `deadline`.
///
/// Peeks first, then reads only bytes known to be header: a buffer the
/// parser says needs more is all header, and a finished header says its
/// length. So a ClientHello that arrives in the same segment stays in the
/// socket for the hello reader, unread until the firewall has judged.
async fn read_proxy_header(
    client: &mut TcpStream,
    deadline: tokio::time::Instant,
) -> Result<Addresses, HeaderFailure> {
    let mut header = Vec::new();
    let mut peeked = [0u8; PROXY_PEEK];
    loop {
        let n = match tokio::time::timeout_at(deadline, client.peek(&mut peeked)).await {
            Err(_) => return Err(HeaderFailure::Timeout),
            Ok(Ok(0)) => return Err(HeaderFailure::Closed),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(HeaderFailure::Io(e)),
        };
        let seen = header.len();
        header.extend_from_slice(&peeked[..n]);
        let (consume, result) = match proxy_protocol::parse(&header) {
            Ok(proxy_protocol::Parse::NeedMore) => (n, None),
            Ok(proxy_protocol::Parse::Done(found)) => {
                (found.len.saturating_sub(seen), Some(Ok(found.addresses)))
            }
            // Take what was peeked, so that the close is a FIN, not an RST
            // for unread data.
            Err(reject) => (n, Some(Err(HeaderFailure::Reject(reject)))),
        };
        header.truncate(seen + consume);
        // These bytes are already in the socket: this read does not wait.
        match tokio::time::timeout_at(deadline, client.read_exact(&mut peeked[..consume])).await {
            Err(_) => return Err(HeaderFailure::Timeout),
            Ok(Err(e)) => return Err(HeaderFailure::Io(e)),
            Ok(Ok(_)) => {}
        }
        if let Some(result) = result {
            return result;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};
    use wire::proxy_protocol::{Addresses, Reject};

    use super::{read_proxy_header, HeaderFailure};

    /// What `read_proxy_header` makes of `sent` from a real loopback peer
    /// (which then closes its write side, unless `hold`).
    async fn header_from(sent: &[u8], hold: bool) -> Result<Addresses, HeaderFailure> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut upstream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        upstream.write_all(sent).await.unwrap();
        if !hold {
            upstream.shutdown().await.unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        let result = read_proxy_header(&mut accepted, deadline).await;
        drop(upstream);
        result
    }

    #[tokio::test]
    async fn header_failures_are_typed_and_keep_their_log_text() {
        let failure = header_from(b"GET / HTTP/1.1\r\n\r\n", false)
            .await
            .unwrap_err();
        assert!(
            matches!(failure, HeaderFailure::Reject(Reject::NotProxy)),
            "{failure:?}"
        );
        assert_eq!(failure.to_string(), "not a PROXY protocol header");

        let failure = header_from(b"PROXY TCP4 192.0.2.1", false)
            .await
            .unwrap_err();
        assert!(matches!(failure, HeaderFailure::Closed), "{failure:?}");
        assert_eq!(
            failure.to_string(),
            "upstream closed before the PROXY header was complete"
        );

        let failure = header_from(b"PROXY TCP4 192.0.2.1", true)
            .await
            .unwrap_err();
        assert!(matches!(failure, HeaderFailure::Timeout), "{failure:?}");
        assert_eq!(
            failure.to_string(),
            "PROXY header not complete within handshake_timeout"
        );

        let found = header_from(b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n", false)
            .await
            .unwrap();
        assert!(matches!(found, Addresses::Tcp { .. }), "{found:?}");
    }
}
