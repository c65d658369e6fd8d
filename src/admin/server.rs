//! Admin API transports: a unix socket, or TCP with TLS 1.3 (and mTLS when
//! `client_ca` is set).
//!
//! Owns: binding (errors come back before anything is spawned, so the server
//! can refuse to start), the socket file's life (stale file replaced, mode
//! 0660, removed on a clean stop), the TLS acceptor, and the gRPC server with
//! health and reflection beside the admin service.
//!
//! Unix-socket connections reach tonic through
//! [`AuthorityShim`], which makes every
//! client's `:authority` acceptable to the HTTP/2 layer.
//!
//! Never serves plaintext over TCP: the only TCP path hands tonic streams
//! that finished a TLS 1.3 handshake. A slow or garbage client only ever
//! holds its own handshake task, never the accept loop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Router;
use tonic::transport::Server;
use tracing::{debug, error, info, warn};

use super::authority::AuthorityShim;
use super::proto;
use super::proto::proxy_admin_service_server::ProxyAdminServiceServer;
use super::service::AdminService;
use crate::config::{AdminAddr, GrpcConfig, ServerTls};
use crate::net::next_accept_backoff;

/// Largest request message the server decodes.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Time a TCP client gets to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; connections beyond are dropped.
const MAX_PENDING_HANDSHAKES: usize = 64;
/// Longest any one admin call may run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const SOCKET_MODE: u32 = 0o660;
/// Time in-flight admin calls get to finish once shutdown starts.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the admin API could not start. Each message names the `[grpc]` field
/// at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error("grpc.addr: cannot bind {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("grpc.addr: {}: exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("grpc.addr: {}: another server is listening on this socket", path.display())]
    SocketInUse { path: PathBuf },
    #[error("grpc.addr: {}: {action}: {source}", path.display())]
    SocketFile {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("grpc.tls_cert: a TCP admin address requires tls_cert and tls_key")]
    TlsRequired,
    #[error("grpc.{field}: {}: {reason}", path.display())]
    TlsFile {
        field: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("grpc: TLS setup failed: {0}")]
    Tls(String),
    #[error("grpc: reflection setup failed: {0}")]
    Reflection(String),
}

pub use super::service::AdminState;

/// A running admin server. Awaiting it (or [`AdminServer::stopped`]) waits
/// until it has stopped.
#[derive(Debug)]
pub struct AdminServer {
    local_addr: AdminAddr,
    task: JoinHandle<()>,
    /// A copy of the listening socket, for a handoff.
    socket: Option<std::os::fd::OwnedFd>,
}

impl AdminServer {
    /// Where it listens (for TCP, the bound port even if `:0` was asked).
    pub fn local_addr(&self) -> &AdminAddr {
        &self.local_addr
    }

    /// The copy of the listening socket kept for a handoff (once).
    pub fn take_socket(&mut self) -> Option<std::os::fd::OwnedFd> {
        self.socket.take()
    }

    /// Waits until the server has stopped: `shutdown` resolved, in-flight
    /// calls finished, and the socket file (if any) removed.
    pub async fn stopped(self) {
        if let Err(err) = self.task.await {
            error!(error = %err, "admin server task failed");
        }
    }
}

/// Binds `config.addr` and serves the admin API (plus health and reflection)
/// in a spawned task until `shutdown` resolves. Binding and TLS setup errors
/// are returned before anything is spawned.
pub async fn serve(
    config: &GrpcConfig,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<AdminServer, AdminError> {
    serve_with(config, state, shutdown, Handoff::default()).await
}

/// An admin API listening socket handed over by a previous process (it
/// matches `config.addr`).
#[derive(Debug)]
pub enum AdminListener {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

impl AdminListener {
    /// The Unix socket, if that is what this is (a TCP one is closed).
    fn unix(self) -> Option<std::os::unix::net::UnixListener> {
        match self {
            AdminListener::Unix(listener) => Some(listener),
            AdminListener::Tcp(_) => None,
        }
    }

    /// The TCP socket, if that is what this is (a Unix one is closed).
    fn tcp(self) -> Option<std::net::TcpListener> {
        match self {
            AdminListener::Tcp(listener) => Some(listener),
            AdminListener::Unix(_) => None,
        }
    }
}

/// What the listening-socket handoff asks of the admin API.
#[derive(Default)]
pub struct Handoff {
    /// Serve on this socket instead of binding `config.addr`.
    pub inherited: Option<AdminListener>,
    /// Accept only once this resolves (the previous process stopped
    /// accepting on the shared socket); `None`: at once.
    pub begin: Option<oneshot::Receiver<()>>,
    /// When it holds `true` at stop, the socket file was handed to another
    /// process: leave it in place.
    pub moved: Option<tokio::sync::watch::Receiver<bool>>,
    /// Set to `true` once the server has stopped and every call in flight
    /// has been answered (its store writes committed): a handoff waits
    /// for it before the new process takes the admin API alone.
    pub stopped: Option<tokio::sync::watch::Sender<bool>>,
}

/// [`serve`], for the handoff: see [`Handoff`]. The returned server also
/// holds a copy of its listening socket ([`AdminServer::take_socket`]).
pub async fn serve_with(
    config: &GrpcConfig,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    handoff: Handoff,
) -> Result<AdminServer, AdminError> {
    // Build everything that can fail before binding, so a bad cert does not
    // leave a socket file behind.
    let tls = match (&config.addr, &config.tls) {
        (AdminAddr::Tcp(_), None) => return Err(AdminError::TlsRequired),
        (AdminAddr::Tcp(_), Some(tls)) => Some(tls_acceptor(tls)?),
        (AdminAddr::Unix(_), _) => None,
    };
    let (router, health) = router(state).await?;
    // Report NOT_SERVING as soon as shutdown starts, then let tonic drain.
    let shutdown = async move {
        shutdown.await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        health
            .set_not_serving::<ProxyAdminServiceServer<AdminService>>()
            .await;
    };

    match (&config.addr, tls) {
        (AdminAddr::Unix(path), _) => serve_unix(path, router, shutdown, handoff).await,
        (AdminAddr::Tcp(addr), Some(acceptor)) => {
            serve_tls(*addr, acceptor, router, shutdown, handoff).await
        }
        (AdminAddr::Tcp(_), None) => Err(AdminError::TlsRequired),
    }
}

/// Waits for `begin` (if any) before the first accept.
async fn begun(begin: Option<oneshot::Receiver<()>>) {
    if let Some(begin) = begin {
        let _ = begin.await;
    }
}

async fn router(
    state: AdminState,
) -> Result<(Router, tonic_health::server::HealthReporter), AdminError> {
    let admin = ProxyAdminServiceServer::new(AdminService::new(state))
        .max_decoding_message_size(MAX_REQUEST_BYTES);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    health
        .set_serving::<ProxyAdminServiceServer<AdminService>>()
        .await;

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| AdminError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| AdminError::Reflection(e.to_string()))?;

    let router = Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .concurrency_limit_per_connection(32)
        .max_concurrent_streams(64)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .http2_max_header_list_size(16 * 1024)
        .add_service(admin)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((router, health))
}

impl std::future::IntoFuture for AdminServer {
    type Output = ();
    type IntoFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.stopped())
    }
}

/// Serves until `shutdown` resolves, then lets in-flight calls finish for
/// at most [`DRAIN_TIMEOUT`] (a client holding a stream open, like a health
/// `Watch`, must not keep the server from stopping).
async fn serve_bounded<I, IO, IE>(
    router: Router,
    incoming: I,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (fired, shutdown_fired) = oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = fired.send(());
    };
    let serving = router.serve_with_incoming_shutdown(incoming, shutdown);
    let deadline = async move {
        if shutdown_fired.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        result = serving => {
            if let Err(err) = result {
                error!(error = %err, "admin API server failed");
            }
        }
        () = deadline => {
            warn!(
                timeout_ms = DRAIN_TIMEOUT.as_millis() as u64,
                "admin API: calls still open at shutdown; closing them"
            );
        }
    }
}

// ---- unix socket ----------------------------------------------------------

async fn serve_unix(
    path: &Path,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    handoff: Handoff,
) -> Result<AdminServer, AdminError> {
    let socket_file = |action: &'static str| {
        let path = path.to_path_buf();
        move |source| AdminError::SocketFile {
            path,
            action,
            source,
        }
    };
    let inherited = handoff.inherited.and_then(AdminListener::unix);
    let handed = inherited.is_some();
    let listener = match inherited {
        // The socket file stays the previous process's, now ours.
        Some(listener) => listener
            .set_nonblocking(true)
            .and_then(|()| UnixListener::from_std(listener))
            .map_err(socket_file("cannot use the handed-over socket"))?,
        None => bind_unix(path).await?,
    };
    let socket = listener
        .as_fd()
        .try_clone_to_owned()
        .map_err(socket_file("cannot copy the socket"))?;
    // Remember which file is ours: on stop, remove it only if nobody replaced it.
    let identity = std::fs::symlink_metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(socket_file("cannot stat the socket"))?;
    info!(addr = %format!("unix:{}", path.display()), inherited = handed, "admin API listening");

    let path_owned = path.to_path_buf();
    // Our own accept loop, not `UnixListenerStream`: tonic skips an accept
    // error and polls again at once, so at the descriptor limit (EMFILE) it
    // would spin a core. This one backs off.
    let (stop_accepting, accepting_stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stop_accepting.send(());
    };
    let (streams, incoming) = mpsc::channel::<io::Result<AuthorityShim<UnixStream>>>(16);
    let begin = handoff.begin;
    let moved = handoff.moved;
    let stopped = handoff.stopped;
    let task = tokio::spawn(async move {
        let accept_loop = tokio::spawn(accept_unix(listener, streams, accepting_stopped, begin));
        serve_bounded(router, ReceiverStream::new(incoming), shutdown).await;
        if let Some(stopped) = &stopped {
            stopped.send_replace(true);
        }
        accept_loop.abort();
        let _ = accept_loop.await;
        let handed_over = moved.is_some_and(|moved| *moved.borrow());
        match std::fs::symlink_metadata(&path_owned) {
            _ if handed_over => {
                debug!(path = %path_owned.display(), "admin socket handed over; left in place")
            }
            Ok(m) if (m.dev(), m.ino()) == identity => {
                if let Err(err) = std::fs::remove_file(&path_owned) {
                    warn!(path = %path_owned.display(), error = %err, "cannot remove admin socket");
                }
            }
            _ => debug!(path = %path_owned.display(), "admin socket already gone or replaced"),
        }
        info!("admin API stopped");
    });
    Ok(AdminServer {
        local_addr: AdminAddr::Unix(path.to_path_buf()),
        task,
        socket: Some(socket),
    })
}

/// Binds the admin socket at `path`: its directory created, a stale socket
/// replaced (a live one refused), mode 0660 before it is reachable.
async fn bind_unix(path: &Path) -> Result<UnixListener, AdminError> {
    let socket_file = |action: &'static str| {
        let path = path.to_path_buf();
        move |source| AdminError::SocketFile {
            path,
            action,
            source,
        }
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(socket_file("cannot create its directory"))?;
    }
    check_stale_socket(path).await?;

    // Bind under a temporary name, set the mode, then rename into place: the
    // socket is never reachable with the umask's permissions, and a stale
    // socket is replaced in one step.
    // (When the staging name would not fit in a socket address, bind in
    // place: the socket exists with the umask's mode until the chmod.)
    let staging = staging_path(path).filter(|p| p.as_os_str().len() < MAX_SOCKET_PATH);
    let bind_path = staging.as_deref().unwrap_or(path);
    if staging.is_some() {
        let _ = std::fs::remove_file(bind_path);
    } else if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path).map_err(socket_file("cannot remove the stale socket"))?;
    }
    let listener = UnixListener::bind(bind_path).map_err(|source| AdminError::Bind {
        addr: format!("unix:{}", path.display()),
        source,
    })?;
    let placed = std::fs::set_permissions(bind_path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(socket_file("cannot set mode 0660"))
        .and_then(|()| match &staging {
            Some(staging) => std::fs::rename(staging, path)
                .map_err(socket_file("cannot move the socket into place")),
            None => Ok(()),
        });
    if let Err(err) = placed {
        let _ = std::fs::remove_file(bind_path);
        return Err(err);
    }
    Ok(listener)
}

/// Accepts unix-socket clients and hands them to the gRPC server, each
/// behind the [`AuthorityShim`] (any `:authority` accepted). On an
/// accept error (EMFILE, ENFILE, ENOMEM...) it waits, doubling the wait up to
/// one second, instead of retrying at once (as the proxy's listeners do).
async fn accept_unix(
    listener: UnixListener,
    streams: mpsc::Sender<io::Result<AuthorityShim<UnixStream>>>,
    mut stop: oneshot::Receiver<()>,
    begin: Option<oneshot::Receiver<()>>,
) {
    tokio::select! {
        () = begun(begin) => {}
        _ = &mut stop => return,
    }
    let mut backoff = Duration::ZERO;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff = Duration::ZERO;
                    if streams.send(Ok(AuthorityShim::new(stream))).await.is_err() {
                        return;
                    }
                }
                Err(err) => {
                    backoff = next_accept_backoff(backoff);
                    warn!(
                        error = %err,
                        backoff_ms = backoff.as_millis() as u64,
                        "admin API accept failed; backing off"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = streams.closed() => return,
                        _ = &mut stop => return,
                    }
                }
            },
            () = streams.closed() => return,
            _ = &mut stop => return,
        }
    }
}

/// `sun_path` is 108 bytes on Linux, with a terminating NUL.
const MAX_SOCKET_PATH: usize = 108;

/// A sibling name to bind before moving the socket into place.
fn staging_path(path: &Path) -> Option<PathBuf> {
    let mut name = path.file_name()?.to_os_string();
    name.push(format!(".{}.new", std::process::id()));
    Some(path.with_file_name(name))
}

/// Refuses to replace anything but a socket nobody listens on.
async fn check_stale_socket(path: &Path) -> Result<(), AdminError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(AdminError::SocketFile {
                path: path.to_path_buf(),
                action: "cannot inspect",
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(AdminError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    // A socket someone answers on (or that hangs) belongs to a live server.
    match tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::UnixStream::connect(path),
    )
    .await
    {
        Ok(Err(_)) => {
            info!(path = %path.display(), "replacing stale admin socket");
            Ok(())
        }
        Ok(Ok(_)) | Err(_) => Err(AdminError::SocketInUse {
            path: path.to_path_buf(),
        }),
    }
}

// ---- TCP + TLS ------------------------------------------------------------

/// A TLS 1.3-only acceptor offering ALPN `h2`; with `client_ca`, a client
/// certificate signed by it is required.
pub fn tls_acceptor(tls: &ServerTls) -> Result<TlsAcceptor, AdminError> {
    let tls_file = |field: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |reason: String| AdminError::TlsFile {
            field,
            path,
            reason,
        }
    };
    let certs = load_certs(&tls.cert).map_err(tls_file("tls_cert", &tls.cert))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| tls_file("tls_key", &tls.key)(pem_reason(e)))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| AdminError::Tls(e.to_string()))?;
    let builder = match &tls.client_ca {
        Some(ca_path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(ca_path).map_err(tls_file("client_ca", ca_path))? {
                roots
                    .add(cert)
                    .map_err(|e| tls_file("client_ca", ca_path)(e.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| tls_file("client_ca", ca_path)(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| tls_file("tls_key", &tls.key)(format!("does not match tls_cert: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_reason)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_reason)?;
    if certs.is_empty() {
        return Err("no PEM certificate in the file".into());
    }
    Ok(certs)
}

fn pem_reason(err: rustls::pki_types::pem::Error) -> String {
    match err {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key in the file".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}

async fn serve_tls(
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    handoff: Handoff,
) -> Result<AdminServer, AdminError> {
    let bind_error = |source| AdminError::Bind {
        addr: addr.to_string(),
        source,
    };
    let inherited = handoff.inherited.and_then(AdminListener::tcp);
    let handed = inherited.is_some();
    let listener = match inherited {
        Some(listener) => listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener))
            .map_err(bind_error)?,
        None => TcpListener::bind(addr).await.map_err(bind_error)?,
    };
    let local = listener.local_addr().map_err(bind_error)?;
    let socket = listener.as_fd().try_clone_to_owned().map_err(bind_error)?;
    info!(addr = %local, inherited = handed, "admin API listening (TLS 1.3)");

    // Stop accepting (and close the listening socket) as soon as shutdown
    // starts, while tonic drains the connections it has.
    let (stop_accepting, accepting_stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stop_accepting.send(());
    };
    let (streams, incoming) = mpsc::channel::<io::Result<TlsStream<TcpStream>>>(16);
    let begin = handoff.begin;
    let stopped = handoff.stopped;
    let task = tokio::spawn(async move {
        let accept_loop = tokio::spawn(accept_tls(
            listener,
            acceptor,
            streams,
            accepting_stopped,
            begin,
        ));
        serve_bounded(router, ReceiverStream::new(incoming), shutdown).await;
        if let Some(stopped) = &stopped {
            stopped.send_replace(true);
        }
        accept_loop.abort();
        info!("admin API stopped");
    });
    Ok(AdminServer {
        local_addr: AdminAddr::Tcp(local),
        task,
        socket: Some(socket),
    })
}

/// Accepts TCP connections and hands each one that completes a TLS
/// handshake within [`TLS_HANDSHAKE_TIMEOUT`] to the gRPC server.
async fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    streams: mpsc::Sender<io::Result<TlsStream<TcpStream>>>,
    mut stop: oneshot::Receiver<()>,
    begin: Option<oneshot::Receiver<()>>,
) {
    tokio::select! {
        () = begun(begin) => {}
        _ = &mut stop => return,
    }
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let mut backoff = Duration::ZERO;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    backoff = next_accept_backoff(backoff);
                    warn!(
                        error = %err,
                        backoff_ms = backoff.as_millis() as u64,
                        "admin API accept failed; backing off"
                    );
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            },
            () = streams.closed() => return,
            _ = &mut stop => return,
        };
        backoff = Duration::ZERO;
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            debug!(%peer, "admin API: too many TLS handshakes in progress; dropping connection");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let streams = streams.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop(permit);
            match handshake {
                Ok(Ok(tls)) => {
                    let _ = streams.send(Ok(tls)).await;
                }
                Ok(Err(err)) => info!(%peer, error = %err, "admin API: TLS handshake failed"),
                Err(_) => info!(%peer, "admin API: TLS handshake timed out"),
            }
        });
    }
}
