//! One request's record: the log line at info and the request metrics,
//! written once when the record is dropped (the response body ended, or
//! the client went away).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::balance::Lease;
use crate::metrics::RequestMetrics;
use crate::routes::Backend;

wire::labelled_enum! {
    /// How a request ended: the `outcome=` of its log line.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RequestOutcome {
        /// The backend answered (whatever its status).
        Proxied => "proxied",
        /// The connection became a relay after a 101 (WebSocket).
        Upgraded => "upgraded",
        /// 421: no L7 route for the host on this listener and certificate.
        NoRoute => "no_route",
        /// 403: a `blocked_user_agents` rule matched.
        BlockedUserAgent => "blocked:user_agent",
        /// 400: no usable host.
        BadRequest => "bad_request",
        /// 502: the backend could not be reached or failed before answering.
        BackendUnreachable => "backend_unreachable",
        /// 504: no response headers within `response_timeout`.
        BackendTimeout => "backend_timeout",
    }
}

pub struct RequestLog {
    pub started: Instant,
    pub client: SocketAddr,
    /// The connection's meter (this request is in flight until dropped).
    pub meter: Arc<super::io::Meter>,
    pub metrics: Arc<RequestMetrics>,
    /// The route's configured hostname (the metrics' `route` label), if any.
    pub route: Option<Arc<str>>,
    pub host: String,
    pub method: hyper::Method,
    /// The client's HTTP version.
    pub version: hyper::Version,
    pub path: String,
    pub status: u16,
    pub up: Arc<AtomicU64>,
    pub down: u64,
    /// The backend the request went to (or the last one tried).
    pub backend: Option<Backend>,
    /// The request's count on its backend, open until the log is written.
    pub lease: Option<Lease>,
    pub outcome: RequestOutcome,
    pub error: Option<String>,
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        self.meter.request_ended();
        let up = self.up.load(Ordering::Relaxed);
        self.metrics
            .observe(self.route.as_deref(), self.status, took);
        tracing::info!(
            target: "mc_proxy::request",
            client = %self.client,
            listener = %self.metrics.listener(),
            host = %self.host,
            method = %self.method,
            version = ?self.version,
            path = %self.path,
            status = self.status,
            up,
            down = self.down,
            duration_ms = took.as_millis() as u64,
            backend = self.backend.as_ref().map(tracing::field::display),
            outcome = %self.outcome.label(),
            error = self.error.as_deref().map(tracing::field::display),
            "request"
        );
    }
}
