//! One connection's life: firewall, ClientHello, route, backend, relay, log.
//!
//! The firewall decision is the first thing that happens, before a byte is
//! read. Nothing is ever sent to a client that is refused: a blocked client
//! gets an RST, everything else that fails gets a plain close.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::firewall::{BlockReason, Verdict};
use crate::hello::{self, Parse};
use crate::routes::{Backend, Target};
use crate::shutdown::Watcher;

use super::relay::{self, RelayEnd};
use super::{sys, Listener};

/// How a connection ended; the `outcome=` field of its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Relayed,
    Blocked(BlockReason),
    NoRoute,
    BadHello,
    HelloTimeout,
    BackendUnreachable,
    IdleTimeout,
    Shutdown,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Relayed => f.write_str("relayed"),
            Outcome::Blocked(reason) => write!(f, "blocked:{reason}"),
            Outcome::NoRoute => f.write_str("no_route"),
            Outcome::BadHello => f.write_str("bad_hello"),
            Outcome::HelloTimeout => f.write_str("hello_timeout"),
            Outcome::BackendUnreachable => f.write_str("backend_unreachable"),
            Outcome::IdleTimeout => f.write_str("idle_timeout"),
            Outcome::Shutdown => f.write_str("shutdown"),
        }
    }
}

/// What the close log line reports.
struct Record {
    client: SocketAddr,
    sni: Option<String>,
    backend: Option<String>,
    up: Option<u64>,
    down: Option<u64>,
    detail: Option<String>,
}

/// Initial capacity of the hello buffer: holds a typical (even a
/// post-quantum) ClientHello without growing.
const HELLO_BUFFER: usize = 2048;

pub(super) async fn handle(
    stream: TcpStream,
    client: SocketAddr,
    listener: Arc<Listener>,
    shutdown: Watcher,
) {
    let started = Instant::now();
    let mut record = Record {
        client,
        sni: None,
        backend: None,
        up: None,
        down: None,
        detail: None,
    };
    let outcome = run(stream, &listener, &mut record, shutdown).await;
    tracing::info!(
        target: "mc_proxy::conn",
        client = %record.client,
        listener = %listener.routes.addr(),
        sni = record.sni.as_deref().map(tracing::field::display),
        backend = record.backend.as_deref().map(tracing::field::display),
        up = record.up,
        down = record.down,
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
    shutdown: Watcher,
) -> Outcome {
    // 1. Firewall, before a byte is read.
    if let Verdict::Block(reason) = listener.firewall.check(record.client.ip()) {
        listener
            .stats
            .blocked_connections
            .fetch_add(1, Ordering::Relaxed);
        sys::reset(client);
        return Outcome::Blocked(reason);
    }

    // 2. The whole ClientHello, within handshake_timeout.
    let timeouts = &listener.timeouts;
    let deadline = tokio::time::Instant::now() + timeouts.handshake_timeout;
    let mut buffer = Vec::with_capacity(HELLO_BUFFER);
    let hello = loop {
        match hello::parse(&buffer) {
            Ok(Parse::Done(hello)) => break hello,
            Ok(Parse::NeedMore) => {}
            Err(reject) => {
                record.detail = Some(reject.to_string());
                return Outcome::BadHello;
            }
        }
        if buffer.len() == buffer.capacity() {
            buffer.reserve(buffer.len());
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

    // 3. Route.
    let Some(sni) = hello.sni else {
        record.detail = Some("no SNI".into());
        return Outcome::NoRoute;
    };
    let target = listener.routes.lookup(&sni);
    record.sni = Some(sni);
    let Some(target) = target else {
        return Outcome::NoRoute;
    };
    record.backend = Some(target.backend.to_string());

    // 4. Backend.
    let mut backend = match connect(&target, timeouts.connect_timeout).await {
        Ok(stream) => stream,
        Err(e) => {
            record.detail = Some(e.to_string());
            return Outcome::BackendUnreachable;
        }
    };
    let _ = backend.set_nodelay(true);
    let _ = client.set_nodelay(true);
    if let Err(e) = backend.write_all(&buffer).await {
        record.detail = Some(format!("writing the hello to the backend: {e}"));
        return Outcome::BackendUnreachable;
    }
    let hello_bytes = buffer.len() as u64;
    drop(buffer);

    // 5. Relay.
    let result = relay::relay(client, backend, timeouts.idle_timeout, shutdown).await;
    record.up = Some(hello_bytes + result.up);
    record.down = Some(result.down);
    if let Some(error) = result.error {
        record.detail = Some(error);
    }
    match result.end {
        RelayEnd::Closed => Outcome::Relayed,
        RelayEnd::Idle => Outcome::IdleTimeout,
        RelayEnd::Shutdown => Outcome::Shutdown,
    }
}

/// Connects within `timeout` overall, trying every resolved address in order.
async fn connect(target: &Target, timeout: Duration) -> io::Result<TcpStream> {
    let attempt = async {
        let addrs: Vec<SocketAddr> = match target.backend.socket_addr() {
            Some(addr) => vec![addr],
            None => resolve(&target.backend).await?,
        };
        let mut last = io::Error::new(
            io::ErrorKind::NotFound,
            "backend name resolved to no address",
        );
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = io::Error::new(e.kind(), format!("{addr}: {e}")),
            }
        }
        Err(last)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

async fn resolve(backend: &Backend) -> io::Result<Vec<SocketAddr>> {
    let (host, port) = backend.host_port();
    let addrs = tokio::net::lookup_host((host.as_str(), port)).await?;
    Ok(addrs.collect())
}
