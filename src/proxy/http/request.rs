//! One request on an L7 connection, in fixed phases, each a small function:
//! route by host → policy → upstream request headers → upstream → response
//! → log (the record rides in the response body and is written when it
//! ends).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, EXPECT, HOST, TE,
    TRANSFER_ENCODING, UPGRADE, USER_AGENT,
};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::{BodySlot, DownBody, UpBody};
use super::log::{RequestLog, RequestOutcome};
use super::upstream::UpstreamClient;
use super::Shared;
use crate::balance::{self, Member};
use crate::firewall::Firewall;
use crate::l7::registry::CertFiles;
use crate::metrics::RequestMetrics;
use crate::routes::{Backend, L7Route, ListenerRoutes};

/// What every request of one connection shares.
pub struct ConnContext {
    pub client: SocketAddr,
    /// The client's address as a header value (X-Forwarded-For, X-Real-IP),
    /// made once per connection.
    pub client_ip: HeaderValue,
    /// The certificate this connection was served with: only routes that
    /// name the same files may take its requests (coalescing included).
    pub files: CertFiles,
    pub routes: Arc<ListenerRoutes>,
    pub firewall: Arc<Firewall>,
    pub shared: Arc<Shared>,
    pub response_timeout: Option<Duration>,
    pub metrics: Arc<RequestMetrics>,
    pub requests: AtomicU64,
    /// Relays of upgraded (WebSocket) requests: the connection waits for them.
    pub relays: TaskTracker,
    /// The upstream client of this connection's last request (most
    /// connections send every request to one backend): the route
    /// settings and backend it was for, whether it was the gRPC one, and
    /// the client.
    pub last_upstream: std::sync::Mutex<Option<LastUpstream>>,
    /// Backends a request tries at most (`connect_attempts`).
    pub connect_attempts: usize,
    pub forced: CancellationToken,
    /// The connection's meter: requests in flight, the header deadline.
    pub meter: Arc<super::io::Meter>,
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// Serves one request; never fails (errors are responses).
pub async fn handle(mut req: Request<Incoming>, ctx: &ConnContext) -> Response<DownBody> {
    ctx.requests.fetch_add(1, Ordering::Relaxed);
    ctx.meter.request_started();
    let up = Arc::new(AtomicU64::new(0));
    let host = request_host(&req).map(str::to_owned);
    let mut log = RequestLog {
        started: Instant::now(),
        client: ctx.client,
        meter: ctx.meter.clone(),
        metrics: ctx.metrics.clone(),
        route: None,
        host: host.clone().unwrap_or_default(),
        method: req.method().clone(),
        version: req.version(),
        path: req.uri().path().to_owned(),
        status: 0,
        up: up.clone(),
        down: 0,
        backend: None,
        lease: None,
        outcome: RequestOutcome::Proxied,
        error: None,
    };
    let grpc = is_grpc(req.headers());

    // 1. Route by host.
    let Some(host) = host else {
        return reply(
            log,
            StatusCode::BAD_REQUEST,
            RequestOutcome::BadRequest,
            grpc,
        );
    };
    let Some(route) = route_for(&host, ctx) else {
        return reply(
            log,
            StatusCode::MISDIRECTED_REQUEST,
            RequestOutcome::NoRoute,
            grpc,
        );
    };
    log.route = Some(route.name.clone());
    let Some(l7) = route.target.mode.l7() else {
        return reply(
            log,
            StatusCode::MISDIRECTED_REQUEST,
            RequestOutcome::NoRoute,
            grpc,
        );
    };

    // 2. Policy.
    if let Some(agent) = req.headers().get(USER_AGENT) {
        if ctx.firewall.blocks_user_agent(agent.as_bytes()) {
            return reply(
                log,
                StatusCode::FORBIDDEN,
                RequestOutcome::BlockedUserAgent,
                grpc,
            );
        }
    }

    // 3. The upstream request.
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let upgrade_protocol = parts.headers.get(UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let (true, Some(protocol)) = (upgrade, upgrade_protocol) {
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(UPGRADE, protocol);
    }
    parts.headers.remove(EXPECT);
    forwarded_headers(&mut parts.headers, &ctx.client_ip, &host);
    let scheme = if l7.backend_tls { "https" } else { "http" };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = match Uri::builder()
        .scheme(scheme)
        .authority(host.as_str())
        .path_and_query(path)
        .build()
    {
        Ok(uri) => uri,
        Err(_) => {
            return reply(
                log,
                StatusCode::BAD_REQUEST,
                RequestOutcome::BadRequest,
                grpc,
            )
        }
    };
    parts.version = Version::HTTP_11;
    // The host travels in the URI: an HTTP/2 upstream sends it as
    // :authority, an HTTP/1.1 one writes Host from it. A Host header left
    // here would reach an HTTP/2 backend beside :authority (nginx answers
    // 400, "duplicate host header").
    parts.headers.remove(HOST);

    // 4. Upstream: a backend of the route's pool; on a connect failure
    // (nothing of the request sent) the next one, with the same request.
    let pool = &route.pool;
    let attempts = if pool.members().len() > 1 {
        ctx.connect_attempts
    } else {
        1
    };
    let slot: Option<BodySlot> = (attempts > 1).then(Default::default);
    let mut next = Some((parts, body));
    let mut tried: Vec<(Backend, String)> = Vec::new();
    let mut response = None;
    for member in pool.attempts(attempts) {
        let Some((parts, body)) = next.take() else {
            break;
        };
        log.backend = Some(member.backend().clone());
        let retry = slot.as_ref().map(|_| copy_parts(&parts));
        let body = match &slot {
            Some(slot) => UpBody::reclaimable(body, up.clone(), slot.clone()),
            None => UpBody::new(body, up.clone()),
        };
        let lease = member.lease();
        match send(
            ctx,
            member,
            l7,
            grpc && !upgrade,
            Request::from_parts(parts, body),
        )
        .await
        {
            Ok(answer) => {
                member.node().connected();
                log.lease = Some(lease);
                response = Some(answer);
                break;
            }
            Err(Sent::Timeout(limit)) => {
                log.error = Some(format!(
                    "no response headers within response_timeout ({limit:?})"
                ));
                return reply(
                    log,
                    StatusCode::GATEWAY_TIMEOUT,
                    RequestOutcome::BackendTimeout,
                    grpc,
                );
            }
            Err(Sent::Failed { error, connect }) => {
                if connect {
                    member.node().connect_failed(&error);
                }
                tried.push((member.backend().clone(), error));
                let reclaimed = slot
                    .as_ref()
                    .and_then(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).take());
                if let (true, Some(parts), Some(body)) = (connect, retry, reclaimed) {
                    next = Some((parts, body));
                }
            }
        }
    }
    let Some(mut response) = response else {
        log.error = Some(super::super::connect::tried_text(&tried));
        return reply(
            log,
            StatusCode::BAD_GATEWAY,
            RequestOutcome::BackendUnreachable,
            grpc,
        );
    };

    // 5. The response.
    log.status = response.status().as_u16();
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            let forced = ctx.forced.clone();
            // The backend's count stays open as long as the relay: a
            // WebSocket is a connection to it for least_connections and
            // ListBackends.
            let lease = log.lease.take();
            ctx.relays.spawn(async move {
                let _lease = lease;
                let (Ok(client), Ok(upstream)) = tokio::join!(client_upgrade, upstream_upgrade)
                else {
                    return;
                };
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    () = forced.cancelled() => {}
                }
            });
            let (parts, _) = response.into_parts();
            log.outcome = RequestOutcome::Upgraded;
            // The connection is a relay now: its bytes are no request's.
            ctx.meter.arm_on_read(false);
            return Response::from_parts(parts, DownBody::fixed(Bytes::new(), log));
        }
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, DownBody::upstream(body, log))
}

/// `ip` as a header value (an IP address's text is always a valid one).
pub fn ip_header(ip: std::net::IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static(""))
}

/// The connection's last upstream client and what it was for.
pub struct LastUpstream {
    l7: Arc<L7Route>,
    backend: Backend,
    grpc: bool,
    client: UpstreamClient,
}

/// The upstream client for a route's backend, from the connection's
/// one-entry cache or the shared pools.
fn upstream_client(
    ctx: &ConnContext,
    l7: &Arc<L7Route>,
    backend: &Backend,
    grpc: bool,
) -> Result<UpstreamClient, super::upstream::UpstreamError> {
    let mut last = ctx.last_upstream.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cached) = last.as_ref() {
        if Arc::ptr_eq(&cached.l7, l7) && cached.grpc == grpc && cached.backend == *backend {
            return Ok(cached.client.clone());
        }
    }
    let client = ctx.shared.upstreams.client(backend, l7, grpc)?;
    *last = Some(LastUpstream {
        l7: l7.clone(),
        backend: backend.clone(),
        grpc,
        client: client.clone(),
    });
    Ok(client)
}

/// Why a request got no response from one backend.
enum Sent {
    /// No response headers within `response_timeout` (the request was
    /// sent: never retried).
    Timeout(Duration),
    /// `connect`: the connection failed, nothing was sent.
    Failed { error: String, connect: bool },
}

/// Sends the request to one backend, within `response_timeout`.
async fn send(
    ctx: &ConnContext,
    member: &Member,
    l7: &Arc<L7Route>,
    grpc: bool,
    req: Request<UpBody>,
) -> Result<Response<Incoming>, Sent> {
    let client = upstream_client(ctx, l7, member.backend(), grpc).map_err(|e| Sent::Failed {
        error: e.to_string(),
        connect: false,
    })?;
    let sent = client.request(req);
    let answered = match ctx.response_timeout {
        Some(limit) => tokio::time::timeout(limit, sent)
            .await
            .map_err(|_| Sent::Timeout(limit))?,
        None => sent.await,
    };
    answered.map_err(|e| Sent::Failed {
        error: error_chain(&e),
        connect: e.is_connect(),
    })
}

/// A request's head, for another try.
fn copy_parts(parts: &hyper::http::request::Parts) -> hyper::http::request::Parts {
    let mut copy = Request::new(()).into_parts().0;
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}

/// The request's host: `:authority` (HTTP/2, or an absolute-form URI),
/// else the Host header.
fn request_host(req: &Request<Incoming>) -> Option<&str> {
    if let Some(authority) = req.uri().authority() {
        return Some(authority.as_str());
    }
    req.headers().get(HOST)?.to_str().ok()
}

/// `host[:port]` → the name to route by (the port removed). An IP literal
/// or anything that is not a host gives `None`.
fn route_name(host: &str) -> Option<&str> {
    if host.starts_with('[') {
        return None;
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    (!name.is_empty()).then_some(name)
}

/// The listener's L7 route for `host`, if it names this connection's
/// certificate files.
fn route_for(host: &str, ctx: &ConnContext) -> Option<Arc<balance::Route>> {
    // A host that is no name (an IP literal) can still reach the default
    // route `*`.
    let route = match route_name(host) {
        Some(name) => ctx.routes.lookup(name)?,
        None => ctx.routes.default_route()?,
    };
    let l7 = route.target.mode.l7()?;
    ctx.files.named_by(l7).then_some(route)
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// An HTTP/1.1 `Connection: upgrade` request with an `Upgrade` header.
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && req
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): Connection and the
/// headers it names, Keep-Alive, Proxy-Connection, Transfer-Encoding,
/// Upgrade, and TE unless it is `trailers`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if name != TE {
            headers.remove(name);
        }
    }
    headers.remove(CONNECTION);
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(TRANSFER_ENCODING);
    headers.remove(UPGRADE);
    let te_trailers = headers
        .get_all(TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    headers.remove(TE);
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// X-Forwarded-For and X-Real-IP are the client (whatever it sent),
/// X-Forwarded-Proto `https`, X-Forwarded-Host the request's host.
fn forwarded_headers(headers: &mut HeaderMap, client_ip: &HeaderValue, host: &str) {
    // `insert` replaces every value the client sent.
    headers.insert(X_FORWARDED_FOR.clone(), client_ip.clone());
    headers.insert(X_REAL_IP.clone(), client_ip.clone());
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    headers.remove(&X_FORWARDED_HOST);
    if let Ok(host) = HeaderValue::from_str(host) {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
}

/// An answer made here: one short plain-text line, or for a gRPC request
/// a trailers-only response with the matching gRPC status.
fn reply(
    mut log: RequestLog,
    status: StatusCode,
    outcome: RequestOutcome,
    grpc: bool,
) -> Response<DownBody> {
    log.status = status.as_u16();
    log.outcome = outcome;
    if grpc {
        if let Some((code, message)) = grpc_status(status) {
            let mut response = Response::new(DownBody::fixed(Bytes::new(), log));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert(GRPC_STATUS.clone(), HeaderValue::from_static(code));
            headers.insert(GRPC_MESSAGE.clone(), HeaderValue::from_static(message));
            return response;
        }
    }
    let text = match status {
        StatusCode::BAD_REQUEST => "bad request\n",
        StatusCode::FORBIDDEN => "forbidden\n",
        StatusCode::MISDIRECTED_REQUEST => "misdirected request: no route for this host here\n",
        StatusCode::BAD_GATEWAY => "bad gateway: the backend could not be reached\n",
        StatusCode::GATEWAY_TIMEOUT => "gateway timeout: the backend did not answer in time\n",
        _ => "error\n",
    };
    let mut response = Response::new(DownBody::fixed(Bytes::from_static(text.as_bytes()), log));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The gRPC status a gRPC client gets instead of these HTTP statuses.
fn grpc_status(status: StatusCode) -> Option<(&'static str, &'static str)> {
    match status {
        StatusCode::BAD_GATEWAY => Some(("14", "backend unavailable")),
        StatusCode::GATEWAY_TIMEOUT => Some(("4", "backend did not answer in time")),
        _ => None,
    }
}

/// An error and its causes, on one line.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_and_te_trailers_kept() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("x-kept", "yes"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<_> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        assert_eq!(left, ["te", "x-kept"]);

        let mut headers = HeaderMap::new();
        headers.insert(TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn forwarded_headers_replace_what_the_client_sent() {
        let mut headers = HeaderMap::new();
        headers.append(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        headers.append(&X_FORWARDED_FOR, HeaderValue::from_static("7.7.7.7"));
        headers.insert(&X_REAL_IP, HeaderValue::from_static("6.6.6.6"));
        forwarded_headers(
            &mut headers,
            &ip_header("192.0.2.9".parse().unwrap()),
            "a.test:8443",
        );
        let all: Vec<_> = headers.get_all(&X_FORWARDED_FOR).iter().collect();
        assert_eq!(all, ["192.0.2.9"]);
        assert_eq!(headers[&X_REAL_IP], "192.0.2.9");
        assert_eq!(headers[&X_FORWARDED_PROTO], "https");
        assert_eq!(headers[&X_FORWARDED_HOST], "a.test:8443");
    }

    #[test]
    fn the_route_name_is_the_host_without_its_port() {
        for (host, name) in [
            ("a.test", Some("a.test")),
            ("a.test:443", Some("a.test")),
            ("A.Test.", Some("A.Test.")),
            ("[::1]:443", None),
            ("a.test:", None),
            ("a.test:x", None),
            (":443", None),
            ("", None),
        ] {
            assert_eq!(route_name(host), name, "{host:?}");
        }
    }
}
