//! How active health checks probe a backend (`balance::health` keeps the
//! time and the state): a TCP connect through the same connect as
//! connections (resolution, Happy Eyeballs), or, on an L7 route with
//! `health_path`, `GET path` through the route's upstream settings (TLS,
//! verification, protocol) on a connection of its own, 2xx or 3xx passing.

use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderValue, USER_AGENT};
use hyper::{Method, Request, Uri};
use tokio_util::sync::CancellationToken;

use crate::balance::health::{self, CheckKey, Probe, ProbeFuture, Prober, Schedule};

use super::connect;
use super::http::body::UpBody;
use super::http::Shared;

/// The User-Agent of an HTTP probe.
pub const PROBE_USER_AGENT: &str = "mc-proxy-health-check";

/// The proxy's probes.
pub struct Probes {
    http: Arc<Shared>,
    connect_timeout: Duration,
}

impl Probes {
    pub fn new(http: Arc<Shared>, connect_timeout: Duration) -> Self {
        Probes {
            http,
            connect_timeout,
        }
    }

    /// Runs `schedule` with these probes until `stop`.
    pub fn spawn(self, schedule: Arc<Schedule>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let cancel = CancellationToken::new();
        let guard = cancel.clone();
        tokio::spawn(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
            guard.cancel();
        });
        tokio::spawn(health::run(schedule, Arc::new(self), cancel));
    }
}

impl Prober for Probes {
    fn probe(&self, key: &CheckKey, deadline: Duration) -> ProbeFuture {
        let backend = key.backend.clone();
        let connect_timeout = self.connect_timeout.min(deadline);
        match &key.probe {
            Probe::Tcp => Box::pin(async move {
                connect::connect(&backend, connect_timeout)
                    .await
                    .map(drop)
                    .map_err(|e| format!("connect: {e}"))
            }),
            Probe::Http { path, host, l7 } => {
                let client = self.http.upstreams.probe_client(&backend, l7);
                let scheme = if l7.backend_tls { "https" } else { "http" };
                let uri = format!("{scheme}://{host}{path}");
                Box::pin(async move {
                    let client = client.map_err(|e| e.to_string())?;
                    let uri: Uri = uri.parse().map_err(|e| format!("GET {uri}: {e}"))?;
                    let mut req = Request::new(UpBody::empty());
                    *req.method_mut() = Method::GET;
                    *req.uri_mut() = uri;
                    req.headers_mut()
                        .insert(USER_AGENT, HeaderValue::from_static(PROBE_USER_AGENT));
                    let response = client
                        .request(req)
                        .await
                        .map_err(|e| super::http::request::error_chain(&e))?;
                    let status = response.status();
                    if status.is_success() || status.is_redirection() {
                        Ok(())
                    } else {
                        Err(format!("GET answered {}", status.as_u16()))
                    }
                })
            }
        }
    }
}
