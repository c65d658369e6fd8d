//! The L7 branch of a connection: TLS terminated with the route's
//! certificate, then HTTP/1.1 or HTTP/2 (by ALPN) served by hyper, each
//! request reverse-proxied to its route's backend ([`request`]).
//!
//! A connection arrives here from `conn.rs` step 4 when the SNI's route is
//! L7, with the ClientHello bytes already read: they are handed to the TLS
//! server first ([`io::ClientIo`]), so nothing is read twice.
//!
//! Owns: the TLS handshake (within what is left of `handshake_timeout`),
//! the HTTP server settings (header limits, slowloris and rapid-reset
//! protections), idle_timeout, graceful close on drain and forced close on
//! shutdown, and the connection's byte and request counts.
//!
//! - [`io`]: the hello bytes, then the socket; bytes counted both ways.
//! - [`request`]: one request's phases.
//! - [`upstream`]: pooled backend connections (HTTP/1.1, h2, h2c, TLS).
//! - [`body`]: bodies streamed through and counted.
//! - [`log`]: one request's log line and metrics.

pub mod body;
pub mod harness;
pub mod io;
pub mod log;
pub mod request;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ProxyConfig;
use crate::l7::registry::{CertFiles, CertRegistry};
use crate::outcome::Outcome;
use crate::routes::L7Route;

use self::io::{ClientIo, Meter};
use self::request::ConnContext;
use self::upstream::Upstreams;

/// The most a request's header block may hold (SPEC §6.2): beyond it, 431.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// HTTP/2 streams a client may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 256;
/// HTTP/2 streams a client may reset before the server has accepted them
/// (CVE-2023-44487, rapid reset): beyond it the connection is closed.
const MAX_PENDING_RESETS: usize = 20;

/// What every L7 connection of the process shares.
pub struct Shared {
    pub certs: Arc<CertRegistry>,
    pub upstreams: Upstreams,
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
}

impl Shared {
    pub fn new(
        certs: Arc<CertRegistry>,
        proxy: &ProxyConfig,
        upstream_open: prometheus_client::metrics::gauge::Gauge,
    ) -> Shared {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // The request-header deadline is ours (`io::Meter`): hyper's
            // also runs while a keep-alive connection waits for its next
            // request, which would cut it at handshake_timeout.
            .header_read_timeout(None)
            .max_buf_size(MAX_HEADER_BLOCK)
            // A client that half-closes after its request still gets the
            // response.
            .half_close(true)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BLOCK as u32)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(MAX_PENDING_RESETS);
        Shared {
            certs,
            upstreams: Upstreams::new(proxy.connect_timeout, upstream_open),
            http1: builder.clone().http1_only(),
            http2: builder.http2_only(),
        }
    }
}

impl Shared {
    /// Every `every`, drops the upstream pools whose backend no route of
    /// `routes` names (their idle connections close), until `stop`.
    pub fn spawn_pool_pruner(
        self: &Arc<Self>,
        routes: Arc<crate::routes::Routes>,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let shared = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => break,
                    () = tokio::time::sleep(every) => {}
                }
                let named: std::collections::HashSet<crate::routes::Backend> = routes
                    .listeners()
                    .iter()
                    .flat_map(|l| l.snapshot().sorted())
                    .filter(|(_, target)| target.mode.l7().is_some())
                    .flat_map(|(_, target)| target.backends.to_vec())
                    .collect();
                shared.upstreams.retain(|backend| named.contains(backend));
            }
        });
    }
}

/// What one listener's L7 connections share: built once per listener
/// (the listener holds it), so this branch needs nothing else from the
/// listener.
pub struct ListenerHttp {
    pub shared: Arc<Shared>,
    pub routes: Arc<crate::routes::ListenerRoutes>,
    pub firewall: Arc<crate::firewall::Firewall>,
    pub metrics: Arc<crate::metrics::RequestMetrics>,
    pub idle_timeout: Duration,
    /// How long a request's headers may take (slowloris).
    pub header_timeout: Duration,
    /// How long a backend has to begin its response (`None`: forever).
    pub response_timeout: Option<Duration>,
    /// Backends a request tries at most (`connect_attempts`).
    pub connect_attempts: usize,
}

/// How an L7 connection went, for its close line.
pub struct Served {
    pub outcome: Outcome,
    pub up: u64,
    pub down: u64,
    pub requests: u64,
    pub detail: Option<String>,
}

/// Serves one L7 connection whose ClientHello (`hello`, every byte read so
/// far) named `route`.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    stream: TcpStream,
    hello: Vec<u8>,
    client: SocketAddr,
    route: &L7Route,
    listener: &ListenerHttp,
    deadline: tokio::time::Instant,
    forced: &CancellationToken,
    draining: &CancellationToken,
) -> Served {
    let meter = Arc::new(Meter::new());
    let served = |outcome, requests, detail: Option<String>| Served {
        outcome,
        up: meter.up.load(Ordering::Relaxed),
        down: meter.down.load(Ordering::Relaxed),
        requests,
        detail,
    };
    let shared = &listener.shared;
    let entry = match shared.certs.get(route) {
        Ok(entry) => entry,
        Err(e) => {
            let hello_len = hello.len() as u64;
            let mut result = served(
                Outcome::TlsFailed,
                0,
                Some(format!("route certificate: {e}")),
            );
            result.up = hello_len;
            return result;
        }
    };

    // The handshake, within what is left of handshake_timeout.
    let io = ClientIo::new(hello, stream, meter.clone());
    let acceptor = tokio_rustls::TlsAcceptor::from(entry.server_config().clone());
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(io)).await {
        Err(_) => return served(Outcome::HelloTimeout, 0, None),
        Ok(Err(e)) => return served(Outcome::TlsFailed, 0, Some(e.to_string())),
        Ok(Ok(tls)) => tls,
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    meter.arm_headers();
    meter.arm_on_read(!h2);

    let ctx = Arc::new(ConnContext {
        client,
        client_ip: request::ip_header(client.ip()),
        files: CertFiles::of(route),
        routes: listener.routes.clone(),
        firewall: listener.firewall.clone(),
        shared: shared.clone(),
        response_timeout: listener.response_timeout,
        metrics: listener.metrics.clone(),
        requests: AtomicU64::new(0),
        relays: TaskTracker::new(),
        last_upstream: std::sync::Mutex::new(None),
        connect_attempts: listener.connect_attempts,
        forced: forced.clone(),
        meter: meter.clone(),
    });
    let limits = Limits {
        idle: listener.idle_timeout,
        headers: listener.header_timeout,
    };
    let (outcome, detail) = drive(
        TokioIo::new(tls),
        h2,
        ctx.clone(),
        &meter,
        limits,
        forced,
        draining,
    )
    .await;
    let requests = ctx.requests.load(Ordering::Relaxed);
    served(outcome, requests, detail)
}

/// The connection's time limits.
#[derive(Clone, Copy)]
pub struct Limits {
    /// No byte either way for this long closes the connection.
    pub idle: Duration,
    /// A request's headers must be complete this long after they began.
    pub headers: Duration,
}

/// Serves HTTP on `io` (HTTP/2 if `h2`, else HTTP/1.1) until the client
/// is done, the connection has been idle for `limits.idle` (no byte either
/// way, by `meter`), a request's headers took longer than
/// `limits.headers`, the drain asks it to finish (graceful: the request under
/// way completes, HTTP/2 gets a GOAWAY) or the shutdown forces it closed;
/// then waits for the relays of upgraded requests.
async fn drive<I>(
    io: I,
    h2: bool,
    ctx: Arc<ConnContext>,
    meter: &Meter,
    limits: Limits,
    forced: &CancellationToken,
    draining: &CancellationToken,
) -> (Outcome, Option<String>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let shared = ctx.shared.clone();
    let service = {
        let ctx = ctx.clone();
        service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(request::handle(req, &ctx).await) }
        })
    };
    let builder = if h2 { &shared.http2 } else { &shared.http1 };
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);

    let mut drained = false;
    // A drain that came before the connection's first request: the graceful
    // shutdown waits for that request (or `limits.headers`), since closing
    // now would fail a client that connected before the drain and has not
    // sent yet (hyper would drop it unanswered). Then it is served, with
    // `Connection: close` (HTTP/1.1) or a GOAWAY (HTTP/2).
    let mut drain_deferred: Option<tokio::time::Instant> = None;
    let mut outcome = Outcome::Relayed;
    let mut detail = None;
    let idle = limits.idle;
    loop {
        let idle_at = tokio::time::Instant::from_std(meter.last_activity() + idle);
        let headers_at = meter
            .headers_since()
            .map(|since| tokio::time::Instant::from_std(since + limits.headers));
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    detail = Some(e.to_string());
                }
                break;
            }
            () = forced.cancelled() => {
                outcome = Outcome::Shutdown;
                break;
            }
            () = draining.cancelled(), if !drained => {
                drained = true;
                if meter.seen_request() {
                    connection.as_mut().graceful_shutdown();
                } else {
                    drain_deferred = Some(tokio::time::Instant::now() + limits.headers);
                }
            }
            () = meter.first_request(), if drain_deferred.is_some() => {
                drain_deferred = None;
                connection.as_mut().graceful_shutdown();
            }
            () = sleep_until_some(drain_deferred) => {
                drain_deferred = None;
                connection.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(idle_at) => {
                if is_idle(meter, idle) {
                    outcome = Outcome::IdleTimeout;
                    break;
                }
            }
            () = sleep_until_some(headers_at) => {
                if meter.headers_since().is_some_and(|since| since.elapsed() >= limits.headers) {
                    outcome = Outcome::HeaderTimeout;
                    break;
                }
            }
        }
    }
    // Upgraded requests (WebSocket) go on as relays after hyper lets go.
    ctx.relays.close();
    if outcome == Outcome::Relayed && !ctx.relays.is_empty() {
        loop {
            let idle_at = tokio::time::Instant::from_std(meter.last_activity() + idle);
            tokio::select! {
                () = ctx.relays.wait() => break,
                () = forced.cancelled() => {
                    outcome = Outcome::Shutdown;
                    break;
                }
                () = tokio::time::sleep_until(idle_at) => {
                    if is_idle(meter, idle) {
                        outcome = Outcome::IdleTimeout;
                        break;
                    }
                }
            }
        }
    }
    (outcome, detail)
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn is_idle(meter: &Meter, idle: Duration) -> bool {
    meter.last_activity().elapsed() >= idle
}
