//! Upstream connections of L7 routes: pooled, kept alive, HTTP/1.1 or
//! HTTP/2, plaintext or TLS verified against `backend_ca` or the system
//! roots.
//!
//! Owns: one hyper client (and so one pool) per distinct upstream — the
//! backend, its TLS settings and the protocol — shared by every route and
//! connection that names it; the connector, which dials the route's backend
//! (Happy Eyeballs, `connect_timeout`, as L4 routes do) whatever the
//! request's host, then does TLS; the gauge of upstream connections open.
//!
//! Never: skips certificate verification (there is no option to), or
//! sends a request over HTTP/2 to a plaintext backend that was not asked
//! for it (`auto` sends only gRPC over h2c).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::body::UpBody;
use crate::proxy::connect;
use crate::routes::{Backend, BackendProtocol, L7Route};

/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream (HTTP/1.1; HTTP/2 shares one).
const POOL_MAX_IDLE: usize = 64;

/// A hyper client for one upstream.
pub type UpstreamClient = Client<Connector, UpBody>;

/// What distinguishes one pool from another.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct UpstreamKey {
    backend: Backend,
    tls: Option<TlsKey>,
    /// HTTP/2 with prior knowledge (h2c), or forced `h2` over TLS.
    h2_only: bool,
    /// ALPN offered over TLS.
    protocol: BackendProtocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TlsKey {
    ca: Option<PathBuf>,
    server_name: String,
}

/// Why no client could be made for an upstream (a route's TLS settings).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("backend_ca {}: {reason}", path.display())]
    Ca { path: PathBuf, reason: String },
    #[error("no system root certificates could be loaded")]
    NoSystemRoots,
    #[error("backend_server_name {0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// Every upstream client, made on first use.
pub struct Upstreams {
    clients: Mutex<HashMap<UpstreamKey, UpstreamClient>>,
    /// Health-check clients: a new connection per probe.
    probes: Mutex<HashMap<UpstreamKey, UpstreamClient>>,
    connect_timeout: Duration,
    system_roots: OnceLock<Option<Arc<RootCertStore>>>,
    open: Gauge,
}

impl fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

impl Upstreams {
    /// `open` counts upstream connections open.
    pub fn new(connect_timeout: Duration, open: Gauge) -> Upstreams {
        Upstreams {
            clients: Mutex::new(HashMap::new()),
            probes: Mutex::new(HashMap::new()),
            connect_timeout,
            system_roots: OnceLock::new(),
            open,
        }
    }

    /// The client for `route`'s backend; `grpc` requests to a plaintext
    /// `auto` backend use the h2c one.
    pub fn client(
        &self,
        backend: &Backend,
        route: &L7Route,
        grpc: bool,
    ) -> Result<UpstreamClient, UpstreamError> {
        self.client_in(&self.clients, backend, route, grpc, true)
    }

    /// The health-check client for `route`'s backend: the route's TLS
    /// settings and protocol, no idle connections kept (each probe
    /// connects, as a new client would).
    pub fn probe_client(
        &self,
        backend: &Backend,
        route: &L7Route,
    ) -> Result<UpstreamClient, UpstreamError> {
        self.client_in(&self.probes, backend, route, false, false)
    }

    fn client_in(
        &self,
        map: &Mutex<HashMap<UpstreamKey, UpstreamClient>>,
        backend: &Backend,
        route: &L7Route,
        grpc: bool,
        pooled: bool,
    ) -> Result<UpstreamClient, UpstreamError> {
        let h2_only = match route.backend_protocol {
            BackendProtocol::H2 => true,
            BackendProtocol::Http1 => false,
            BackendProtocol::Auto => grpc && !route.backend_tls,
        };
        let tls = route.backend_tls.then(|| TlsKey {
            ca: route.backend_ca.clone(),
            server_name: route
                .backend_server_name
                .clone()
                .unwrap_or_else(|| backend.host_port().0),
        });
        let key = UpstreamKey {
            backend: backend.clone(),
            tls,
            h2_only,
            protocol: route.backend_protocol,
        };
        let mut clients = map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let client = self.build(&key, pooled)?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Upstream clients (pools) held now.
    pub fn len(&self) -> usize {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the clients no route uses any more (their idle connections
    /// close); `in_use` says whether a backend is still named.
    pub fn retain(&self, in_use: impl Fn(&Backend) -> bool) {
        for map in [&self.clients, &self.probes] {
            let mut clients = map.lock().unwrap_or_else(|e| e.into_inner());
            clients.retain(|key, _| in_use(&key.backend));
        }
    }

    fn roots(&self, ca: Option<&PathBuf>) -> Result<Arc<RootCertStore>, UpstreamError> {
        if let Some(path) = ca {
            let fail = |reason: String| UpstreamError::Ca {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
            let mut roots = RootCertStore::empty();
            use rustls::pki_types::pem::PemObject;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| fail(e.to_string()))?;
                roots.add(cert).map_err(|e| fail(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(fail("no PEM certificate in the file".into()));
            }
            return Ok(Arc::new(roots));
        }
        self.system_roots
            .get_or_init(|| {
                let found = rustls_native_certs::load_native_certs();
                for error in &found.errors {
                    tracing::warn!(error = %error, "loading system root certificates");
                }
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                (added > 0).then(|| Arc::new(roots))
            })
            .clone()
            .ok_or(UpstreamError::NoSystemRoots)
    }

    fn build(&self, key: &UpstreamKey, pooled: bool) -> Result<UpstreamClient, UpstreamError> {
        let tls = match &key.tls {
            None => None,
            Some(tls) => {
                let roots = self.roots(tls.ca.as_ref())?;
                let mut config = ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|_| UpstreamError::NoSystemRoots)?
                .with_root_certificates(roots)
                .with_no_client_auth();
                config.alpn_protocols = match key.protocol {
                    BackendProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                    BackendProtocol::Http1 => vec![b"http/1.1".to_vec()],
                    BackendProtocol::H2 => vec![b"h2".to_vec()],
                };
                let name = ServerName::try_from(tls.server_name.clone())
                    .map_err(|_| UpstreamError::ServerName(tls.server_name.clone()))?;
                Some((TlsConnector::from(Arc::new(config)), name))
            }
        };
        let connector = Connector {
            inner: Arc::new(ConnectorInner {
                backend: key.backend.clone(),
                connect_timeout: self.connect_timeout,
                tls,
                open: self.open.clone(),
            }),
        };
        Ok(Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(if pooled { POOL_MAX_IDLE } else { 0 })
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(key.h2_only)
            .build(connector))
    }
}

/// Dials one upstream's backend, whatever the request's URI says.
#[derive(Clone)]
pub struct Connector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    backend: Backend,
    connect_timeout: Duration,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    open: Gauge,
}

impl tower::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<UpstreamIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + inner.connect_timeout;
            let tcp = connect::connect(&inner.backend, inner.connect_timeout).await?;
            let _ = tcp.set_nodelay(true);
            let stream = match &inner.tls {
                None => Stream::Plain(TokioIo::new(tcp)),
                Some((connector, name)) => {
                    let tls =
                        tokio::time::timeout_at(deadline, connector.connect(name.clone(), tcp))
                            .await
                            .map_err(|_| {
                                io::Error::new(
                            io::ErrorKind::TimedOut,
                            "TLS handshake with the backend did not finish within connect_timeout",
                        )
                            })??;
                    Stream::Tls(Box::new(TokioIo::new(tls)))
                }
            };
            inner.open.inc();
            Ok(UpstreamIo {
                stream,
                open: inner.open.clone(),
            })
        })
    }
}

enum Stream {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

/// One upstream connection; counted open until dropped.
pub struct UpstreamIo {
    stream: Stream,
    open: Gauge,
}

impl Drop for UpstreamIo {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match &self.stream {
            Stream::Plain(_) => Connected::new(),
            Stream::Tls(tls) => {
                if tls.inner().get_ref().1.alpn_protocol() == Some(b"h2") {
                    Connected::new().negotiated_h2()
                } else {
                    Connected::new()
                }
            }
        }
    }
}

impl Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(tls: bool, protocol: BackendProtocol) -> L7Route {
        L7Route {
            tls_cert: "/c.pem".into(),
            tls_key: "/c.key".into(),
            backend_tls: tls,
            backend_ca: None,
            backend_server_name: None,
            backend_protocol: protocol,
        }
    }

    #[tokio::test]
    async fn one_pool_per_upstream_and_pools_of_unnamed_backends_are_dropped() {
        let upstreams = Upstreams::new(Duration::from_secs(1), Gauge::default());
        let (a, b) = (
            Backend::parse("127.0.0.1:1").unwrap(),
            Backend::parse("127.0.0.1:2").unwrap(),
        );
        let plain = route(false, BackendProtocol::Auto);
        upstreams.client(&a, &plain, false).unwrap();
        upstreams.client(&a, &plain, false).unwrap();
        assert_eq!(upstreams.len(), 1, "the same upstream shares its pool");
        // gRPC in auto over plaintext is the h2c client: a pool of its own.
        upstreams.client(&a, &plain, true).unwrap();
        upstreams
            .client(&b, &route(false, BackendProtocol::Http1), false)
            .unwrap();
        assert_eq!(upstreams.len(), 3);
        upstreams.retain(|backend| backend == &a);
        assert_eq!(upstreams.len(), 2);
        upstreams.retain(|_| false);
        assert!(upstreams.is_empty());
    }
}
