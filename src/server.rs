//! `mc-proxy server` as a value: [`App::build`] opens the store, builds the
//! tables and binds every socket (listeners, admin API, metrics endpoint),
//! returning the bound addresses; [`App::run`] serves until the shutdown
//! future resolves, then drains. `main` owns the process-wide parts around
//! them: the runtime ([`runtime`]), the signal handlers (installed before
//! `build`), readiness (`sd_notify`) and the second-signal exit
//! ([`Exit::now`]). Tests build an `App` on port 0 in-process and read the
//! real ports back.
//!
//! Start order inside `build` matters: the DB is opened (and seeded on
//! first run) before any socket is bound, so the first connection already
//! sees the DB's routes; the connection cap is measured once the server's
//! own descriptors are open.

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::os::fd::{AsFd, OwnedFd};
use tokio::net::TcpListener;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, AdminError, AdminServer};
use crate::balance::Balancer;
use crate::config::{AdminAddr, Config, ConfigError};
use crate::firewall::{Firewall, GeoIpError};
use crate::handoff;
use crate::l7::registry::{CertRegistry, RegistryError};
use crate::logging;
use crate::metrics::{self, ListenerStats, Stats};
use crate::proxy::{self, capacity, Listener};
use crate::routes::{ListenerRoutes, Routes};
use crate::shutdown::Shutdown;
use crate::store::{self, Store, StoreError};
use crate::version;

/// How often the GeoIP file is checked for replacement.
const GEOIP_POLL: Duration = Duration::from_secs(1);
/// How often route certificate files are checked for changes (SPEC §6.2:
/// a replaced file is served within 5 s).
const CERT_POLL: Duration = Duration::from_secs(2);
/// How often the upstream pools of backends no route names any more are
/// dropped.
const UPSTREAM_PRUNE: Duration = Duration::from_secs(30);

/// How long a second signal waits for the store to finish the change in
/// hand (one short transaction) and close the DB before the process exits.
const STORE_CLOSE_LIMIT: Duration = Duration::from_secs(2);

/// How long an exit waits for queued log lines to be written (more only
/// when the reader of stderr or journald is stalled; then they are lost).
pub const LOG_FLUSH_LIMIT: Duration = Duration::from_secs(1);

/// A startup failure. Its text (the `Display`) is the one line `main`
/// prints; the variant decides the exit status ([`ServerError::exit_code`]):
/// 2 when the configuration (or the environment that configures) is wrong,
/// 1 when the config is fine but the start failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The config file does not load: exit 2.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `TOKIO_WORKER_THREADS` is not a worker count: exit 2.
    #[error(transparent)]
    Workers(#[from] WorkersError),
    /// `firewall.geoip_db` cannot be opened or is not a MaxMind DB: exit 2.
    #[error("{}: firewall.geoip_db: {source}", config_file.display())]
    GeoIp {
        config_file: PathBuf,
        /// Boxed: the reader's error is large, and this is a cold path.
        source: Box<GeoIpError>,
    },
    /// The tokio runtime cannot be built: exit 1.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] io::Error),
    /// The signal handlers cannot be installed: exit 1.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] io::Error),
    /// The task that opens the store panicked or was cancelled: exit 1.
    #[error("store: {0}")]
    StoreTask(#[source] tokio::task::JoinError),
    /// The store cannot be opened, created, migrated or seeded: exit 1.
    #[error("database.path {}: {source}", path.display())]
    Store { path: PathBuf, source: StoreError },
    /// A `[[listeners]]` address cannot be bound (or the handed-in socket
    /// used): exit 1. `key` is the TOML path (`listeners[0].addr`).
    #[error("{}: {key}: cannot listen on {addr:?}: {source}", config_file.display())]
    Listen {
        config_file: PathBuf,
        key: String,
        addr: String,
        source: io::Error,
    },
    /// A listener without a route table or stats: a bug, reported rather
    /// than panicking: exit 1.
    #[error("{}: {key}: {addr:?} has no route table", config_file.display())]
    NoRouteTable {
        config_file: PathBuf,
        key: String,
        addr: String,
    },
    /// The metrics endpoint cannot be bound: exit 1.
    #[error("{}: metrics.addr: cannot listen on {addr}: {source}", config_file.display())]
    Metrics {
        config_file: PathBuf,
        addr: SocketAddr,
        source: io::Error,
    },
    /// The admin API could not start (`config_file` names the config): exit 1.
    #[error("{}: {error}", config_file.display())]
    Admin {
        config_file: PathBuf,
        error: AdminError,
    },
    /// The TLS machinery for L7 routes could not be set up: exit 1.
    #[error("L7 TLS: {0}")]
    L7Tls(#[source] RegistryError),
    /// A running server answered on the handoff socket but the handoff
    /// failed: exit 1 (its sockets are still its own).
    #[error(transparent)]
    Handoff(#[from] handoff::HandoffError),
}

impl ServerError {
    /// The process exit status for this failure: 2 for a configuration
    /// cause, 1 for a runtime one.
    pub fn exit_code(&self) -> u8 {
        match self {
            ServerError::Config(_) | ServerError::Workers(_) | ServerError::GeoIp { .. } => 2,
            ServerError::Runtime(_)
            | ServerError::Signals(_)
            | ServerError::StoreTask(_)
            | ServerError::Store { .. }
            | ServerError::Listen { .. }
            | ServerError::NoRouteTable { .. }
            | ServerError::Metrics { .. }
            | ServerError::Admin { .. }
            | ServerError::L7Tls(_)
            | ServerError::Handoff(_) => 1,
        }
    }
}

/// Why [`WORKERS_ENV`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WorkersError {
    /// The value is not UTF-8.
    #[error("{WORKERS_ENV}={0:?} is not valid UTF-8")]
    NotUtf8(OsString),
    /// Not a whole number from 1 to 1024.
    #[error("{WORKERS_ENV}={0:?} is not a number of worker threads from 1 to 1024")]
    OutOfRange(String),
}

/// The environment variable that sets the number of worker threads.
pub const WORKERS_ENV: &str = "TOKIO_WORKER_THREADS";

/// How many worker threads the server runs: `setting` (the value of
/// [`WORKERS_ENV`]) when given, else one per CPU — except on a host with one
/// or two CPUs, which gets one.
///
/// Why one on two CPUs: there the proxy shares its cores with the backends
/// it fronts (and with the kernel's network work), and a second worker costs
/// more than it brings. Each thread falls asleep in `epoll_wait` and is woken
/// for its share of the events, so two threads sleep and wake about twice as
/// often for the same traffic: on a 2-CPU host one worker spent less CPU per
/// new connection at the same throughput (the figures are in
/// `bench/RESULTS.md`, "One worker"). Hosts with more CPUs keep one worker
/// per CPU.
pub fn worker_threads(setting: Option<&str>, cpus: usize) -> Result<usize, WorkersError> {
    match setting {
        Some(text) => match text.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(n),
            _ => Err(WorkersError::OutOfRange(text.to_string())),
        },
        None if cpus <= 2 => Ok(1),
        None => Ok(cpus),
    }
}

/// The runtime the server runs on: [`worker_threads`] workers (from
/// [`WORKERS_ENV`] or the CPU count). One worker is a current-thread
/// runtime: the same event loop without the multi-threaded scheduler's
/// work-stealing bookkeeping.
pub fn runtime() -> Result<tokio::runtime::Runtime, ServerError> {
    let setting = match std::env::var_os(WORKERS_ENV) {
        None => None,
        Some(value) => Some(value.into_string().map_err(WorkersError::NotUtf8)?),
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = worker_threads(setting.as_deref(), cpus)?;
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    builder
        .enable_all()
        .thread_name("mc-proxy")
        .build()
        .map_err(ServerError::Runtime)
}

/// One `[[listeners]]` entry, bound: its socket and everything its
/// connections share.
struct BoundListener {
    socket: TcpListener,
    /// The bound address (the real port when the config asked for `:0`).
    local_addr: SocketAddr,
    routes: Arc<ListenerRoutes>,
    stats: Arc<ListenerStats>,
    proxy_protocol: bool,
    /// The UDP socket of a `quic = true` listener (same address and port).
    quic: Option<tokio::net::UdpSocket>,
}

/// The addresses an [`App`] listens on, as bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundAddrs {
    /// One per `[[listeners]]` entry, in config order: (the `addr` as
    /// written in the config, the bound address).
    pub listeners: Vec<(String, SocketAddr)>,
    /// The admin API (`[grpc]`), if configured.
    pub admin: Option<AdminAddr>,
    /// The metrics endpoint (`[metrics]`), if configured.
    pub metrics: Option<SocketAddr>,
}

/// A server, built and bound but not yet serving. See the module docs.
pub struct App {
    config: Config,
    firewall: Arc<Firewall>,
    routes: Arc<Routes>,
    stats: Arc<Stats>,
    store: Store,
    listeners: Vec<BoundListener>,
    admin: Option<AdminServer>,
    admin_addr: Option<AdminAddr>,
    metrics: Option<(SocketAddr, JoinHandle<()>)>,
    /// Tells the admin API, the metrics endpoint and the GeoIP watcher to stop.
    stop: watch::Sender<bool>,
    capacity: Arc<capacity::Capacity>,
    fd_limit: Option<u64>,
    certs: Arc<CertRegistry>,
    /// Backend nodes and the active-check schedule, shared by every table.
    balancer: Arc<Balancer>,
    /// Copies of every listening socket, for a handoff to a new process
    /// ([`App::handoff_offer`]); closed when [`App::run`] starts if not taken.
    handoff: Vec<(handoff::Kind, OwnedFd)>,
    /// Turns `true` once a new process took over: the admin API and the
    /// metrics endpoint stop accepting at once.
    moved: watch::Sender<bool>,
    /// The admin API stopped with every call answered (for a handoff).
    admin_stopped: Option<watch::Receiver<bool>>,
    /// The way to the QUIC listener tasks, for carrying flows over a
    /// handoff.
    carriers: proxy::quic::Carriers,
}

/// Sockets handed in to [`App::build_inherited`] instead of bound.
#[derive(Default)]
pub struct Inherited {
    /// Listener `addr` text → its socket (already bound and listening).
    pub listeners: Vec<(String, std::net::TcpListener)>,
    /// The admin API's socket (for the configured `[grpc] addr`).
    pub admin: Option<admin::server::AdminListener>,
    /// When set, the admin API accepts only once this resolves (the
    /// previous process stopped accepting on the shared socket).
    pub admin_begin: Option<oneshot::Receiver<()>>,
    /// The metrics endpoint's socket (for the configured `[metrics] addr`).
    pub metrics: Option<std::net::TcpListener>,
    /// Listener `addr` text → its UDP socket (a `quic = true` listener's).
    pub quic: Vec<(String, std::net::UdpSocket)>,
}

impl App {
    /// Opens the store (seeding it on first run), builds the route tables
    /// and the firewall, binds every `[[listeners]]` address, the admin API
    /// and the metrics endpoint, and starts the store's writer thread, the
    /// admin API and the metrics endpoint (nothing is proxied before
    /// [`App::run`]; connections wait in the backlog). Call it inside the
    /// runtime, after the signal handlers are installed.
    pub async fn build(config: &Config) -> Result<App, ServerError> {
        App::build_with(config, Vec::new()).await
    }

    /// [`App::build`], with listening sockets handed in instead of bound:
    /// a listener whose config `addr` text equals an entry's name takes
    /// that socket (already bound and listening; made non-blocking here).
    pub async fn build_with(
        config: &Config,
        listeners: Vec<(String, std::net::TcpListener)>,
    ) -> Result<App, ServerError> {
        App::build_inherited(
            config,
            Inherited {
                listeners,
                ..Inherited::default()
            },
        )
        .await
    }

    /// [`App::build_with`], with the admin API's and the metrics endpoint's
    /// sockets too (a handoff from a previous process).
    pub async fn build_inherited(
        config: &Config,
        inherited: Inherited,
    ) -> Result<App, ServerError> {
        let Inherited {
            listeners: mut inherited,
            admin: inherited_admin,
            admin_begin,
            metrics: inherited_metrics,
            quic: mut inherited_quic,
        } = inherited;
        let source = &config.source;
        let mut handoff = Vec::new();
        // The soft descriptor limit up to the hard one, before anything opens.
        let nofile = capacity::raise_nofile_limit();

        // 0. The GeoIP file first: a config error must stop the start before
        // the store is created or seeded from this config. The rules come
        // from the store below.
        let firewall =
            Firewall::new(&config.firewall, &[]).map_err(|source| ServerError::GeoIp {
                config_file: config.source.clone(),
                source: Box::new(source),
            })?;

        // 1. The store: the truth for routes and rules (seeded on first run).
        let db_path = config.database.path.clone();
        let opened = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || store::open(&config))
                .await
                .map_err(ServerError::StoreTask)?
                .map_err(|source| ServerError::Store {
                    path: db_path,
                    source,
                })?
        };
        let loaded = opened.state;

        // 2. The in-memory tables.
        firewall.replace_rules(&loaded.rules);
        let firewall = Arc::new(firewall);
        let balancer = Balancer::new();
        let routes = Arc::new(Routes::new(
            loaded
                .listeners
                .into_iter()
                .map(|(addr, map)| {
                    Arc::new(ListenerRoutes::with_balancer(addr, map, balancer.clone()))
                })
                .collect(),
        ));
        let stats = Arc::new(Stats::new(
            config.listeners.iter().map(|l| l.addr.text.clone()),
        ));
        stats.metrics.watch_backends(balancer.clone());
        // L7 routes' certificates, loaded now so that a broken one is in
        // the log at start (its route's handshakes fail until it is fixed).
        let certs = Arc::new(CertRegistry::new().map_err(ServerError::L7Tls)?);
        certs.load_routes(&routes);

        // 3. Listening sockets: all bound before anything is served.
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for (index, listener) in config.listeners.iter().enumerate() {
            let text = &listener.addr.text;
            let key = || format!("listeners[{index}].addr");
            let cannot_listen = |e: std::io::Error| ServerError::Listen {
                config_file: source.clone(),
                key: key(),
                addr: text.clone(),
                source: e,
            };
            let handed = inherited.iter().position(|(name, _)| name == text);
            let handed_quic = inherited_quic.iter().position(|(name, _)| name == text);
            // A quic listener on port 0 binds TCP and UDP together (the
            // port TCP got may be taken on UDP: both are tried again).
            let mut fresh_quic = None;
            let socket = match handed {
                Some(i) => {
                    let (_, socket) = inherited.swap_remove(i);
                    socket.set_nonblocking(true).map(|()| socket)
                }
                None if listener.quic && handed_quic.is_none() => {
                    proxy::quic::bind_pair(&listener.addr).map(|(tcp, udp)| {
                        fresh_quic = Some(udp);
                        tcp
                    })
                }
                None => proxy::bind(&listener.addr),
            }
            .and_then(TcpListener::from_std)
            .map_err(cannot_listen)?;
            let local_addr = socket.local_addr().map_err(cannot_listen)?;
            let copy = socket.as_fd().try_clone_to_owned().map_err(cannot_listen)?;
            handoff.push((handoff::Kind::Listener(text.clone()), copy));
            // Both tables are built from the config's listeners above; a
            // miss would be a bug here, reported rather than panicking.
            let missing = || ServerError::NoRouteTable {
                config_file: source.clone(),
                key: key(),
                addr: text.clone(),
            };
            let routes = routes.listener(text).cloned().ok_or_else(missing)?;
            let stats = stats.listener(text).cloned().ok_or_else(missing)?;
            // A quic listener's UDP socket: same address, the port TCP got.
            let quic = if listener.quic {
                let socket = match (handed_quic, fresh_quic) {
                    (Some(i), _) => {
                        let (_, socket) = inherited_quic.swap_remove(i);
                        socket.set_nonblocking(true).map(|()| socket)
                    }
                    (None, Some(socket)) => Ok(socket),
                    (None, None) => proxy::quic::bind(&listener.addr, local_addr.port()),
                }
                .and_then(tokio::net::UdpSocket::from_std)
                .map_err(cannot_listen)?;
                let copy = socket.as_fd().try_clone_to_owned().map_err(cannot_listen)?;
                handoff.push((handoff::Kind::Quic(text.clone()), copy));
                Some(socket)
            } else {
                None
            };
            tracing::info!(
                listener = %text,
                addr = %local_addr,
                inherited = handed.is_some(),
                quic = listener.quic,
                "listening"
            );
            listeners.push(BoundListener {
                socket,
                local_addr,
                routes,
                stats,
                proxy_protocol: listener.proxy_protocol,
                quic,
            });
        }

        // 4. Writers: the store thread applies admin changes to the tables.
        let store = Store::start(
            opened.conn,
            routes.clone(),
            loaded.rules.clone(),
            Box::new({
                let firewall = firewall.clone();
                move |rules| firewall.replace_rules(rules)
            }),
        );

        let (stop, stop_rx) = watch::channel(false);
        let (moved, moved_rx) = watch::channel(false);
        let (admin_stopped, admin_stopped_rx) = watch::channel(false);
        // Stop accepting: at the end of the drain, or at once when a new
        // process has taken over.
        let stopped_or_moved = || {
            let mut stop = stop_rx.clone();
            let mut moved = moved_rx.clone();
            async move {
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => {}
                    _ = moved.wait_for(|moved| *moved) => {}
                }
            }
        };

        // 5. The admin API.
        let admin = match &config.grpc {
            Some(grpc) => {
                let state = admin::AdminState {
                    routes: routes.clone(),
                    store: store.clone(),
                    firewall: firewall.clone(),
                    stats: stats.clone(),
                    version: format!("mc-proxy {}", version()),
                };
                let handoff_admin = admin::server::Handoff {
                    inherited: inherited_admin,
                    begin: admin_begin,
                    moved: Some(moved_rx.clone()),
                    stopped: Some(admin_stopped),
                };
                let mut handle =
                    admin::server::serve_with(grpc, state, stopped_or_moved(), handoff_admin)
                        .await
                        .map_err(|error| ServerError::Admin {
                            config_file: source.clone(),
                            error,
                        })?;
                if let Some(copy) = handle.take_socket() {
                    handoff.push((handoff::Kind::Admin(grpc.addr.clone()), copy));
                }
                Some(handle)
            }
            None => None,
        };
        let admin_addr = admin.as_ref().map(|a| a.local_addr().clone());

        // 5b. The metrics endpoint.
        let metrics = match &config.metrics {
            Some(metrics) => {
                let scrape = metrics::Scrape {
                    metrics: stats.metrics.clone(),
                    routes: routes.clone(),
                    firewall: firewall.clone(),
                };
                let cannot = |e| ServerError::Metrics {
                    config_file: source.clone(),
                    addr: metrics.addr,
                    source: e,
                };
                let handed = inherited_metrics.is_some();
                let socket = match inherited_metrics {
                    Some(socket) => socket
                        .set_nonblocking(true)
                        .and_then(|()| TcpListener::from_std(socket)),
                    None => TcpListener::bind(metrics.addr).await,
                }
                .map_err(cannot)?;
                let copy = socket.as_fd().try_clone_to_owned().map_err(cannot)?;
                handoff.push((handoff::Kind::Metrics(metrics.addr), copy));
                let (local, task) =
                    metrics::serve_on(socket, scrape, stopped_or_moved()).map_err(cannot)?;
                tracing::info!(addr = %local, inherited = handed, "metrics endpoint listening on /metrics");
                Some((local, task))
            }
            None => None,
        };

        // 6. The descriptor budget, measured now that the server's own
        // descriptors are open.
        let (capacity, fd_limit) = connection_capacity(config, &stats, nofile);

        Ok(App {
            config: config.clone(),
            firewall,
            routes,
            stats,
            store,
            listeners,
            admin,
            admin_addr,
            metrics,
            stop,
            capacity,
            fd_limit,
            certs,
            balancer,
            handoff,
            moved,
            admin_stopped: config.grpc.as_ref().map(|_| admin_stopped_rx),
            carriers: proxy::quic::Carriers::default(),
        })
    }

    /// This server's copies of its listening sockets, and the switch that
    /// stops its admin API and metrics endpoint, for
    /// [`handoff::serve`] (once: later calls offer nothing).
    pub fn handoff_offer(&mut self) -> handoff::Offer {
        handoff::Offer {
            sockets: std::mem::take(&mut self.handoff),
            server: handoff::Predecessor::this(self.stats.started_at),
            moved: self.moved.clone(),
            admin_stopped: self.admin_stopped.clone(),
            carriers: self.carriers.clone(),
        }
    }

    /// The way to this server's QUIC listener tasks (they register as
    /// [`App::run`] starts them): where flows a previous process handed
    /// over are taken in.
    pub fn quic_carriers(&self) -> proxy::quic::Carriers {
        self.carriers.clone()
    }

    /// A handle on the store (after a handoff, [`Store::reload`] picks up
    /// what the previous process committed after this one loaded).
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// Every bound address at once.
    pub fn addrs(&self) -> BoundAddrs {
        BoundAddrs {
            listeners: self
                .listeners
                .iter()
                .map(|l| (l.routes.addr().to_string(), l.local_addr))
                .collect(),
            admin: self.admin_addr.clone(),
            metrics: self.metrics_addr(),
        }
    }

    /// Where the admin API listens (for TCP, the bound port).
    pub fn admin_addr(&self) -> Option<&AdminAddr> {
        self.admin_addr.as_ref()
    }

    /// Where the metrics endpoint listens.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(addr, _)| *addr)
    }

    /// The live route tables (what the admin API changes).
    pub fn routes(&self) -> &Arc<Routes> {
        &self.routes
    }

    /// The firewall (rules, GeoIP, rate limit).
    pub fn firewall(&self) -> &Arc<Firewall> {
        &self.firewall
    }

    /// The connection counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// What a second signal needs to exit at once: see [`Exit::now`].
    pub fn exit_handle(&self) -> Exit {
        Exit {
            store: self.store.clone(),
        }
    }

    /// On every SIGHUP (or whatever `hangup` delivers), in a task of its
    /// own: reloads the GeoIP database and re-reads every route
    /// certificate.
    pub fn reload_on(&self, mut hangup: tokio::signal::unix::Signal) {
        let firewall = self.firewall.clone();
        let certs = self.certs.clone();
        let routes = self.routes.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let firewall = firewall.clone();
                let result = tokio::task::spawn_blocking(move || firewall.reload_geoip()).await;
                if let Ok(Ok(true)) = result {
                    tracing::info!("SIGHUP: GeoIP database reloaded");
                }
                let certs = certs.clone();
                let routes = routes.clone();
                let reloaded =
                    tokio::task::spawn_blocking(move || certs.refresh(&routes, true)).await;
                if let Ok(count) = reloaded {
                    tracing::info!(certificates = count, "SIGHUP: route certificates re-read");
                }
            }
        });
    }

    /// Serves until `shutdown` resolves (to the name of what stopped it,
    /// logged as `signal=`), then closes the listeners at once, drains the
    /// connections within `proxy.shutdown_timeout` (forcing the rest),
    /// stops the admin API and the metrics endpoint, and closes the store.
    /// `shutdown` is first polled once every accept loop is spawned: from
    /// there on this process serves (`main` tells a predecessor so there).
    pub async fn run(
        self,
        shutdown: impl Future<Output = &'static str>,
    ) -> Result<(), ServerError> {
        let App {
            config,
            firewall,
            routes,
            stats,
            store,
            listeners,
            admin,
            admin_addr: _,
            metrics,
            stop,
            capacity,
            fd_limit,
            certs,
            balancer,
            handoff: unused_copies,
            moved,
            admin_stopped: _,
            carriers,
        } = self;
        // Copies not offered for a handoff would keep the listening
        // sockets open past their accept loops: close them now.
        drop(unused_copies);
        let source = config.source.display().to_string();
        let drain = Shutdown::new();
        let flows = Arc::new(proxy::quic::FlowBudget::new(config.proxy.max_quic_flows));
        let http = Arc::new(proxy::http::Shared::new(
            certs.clone(),
            &config.proxy,
            stats.metrics.upstream_open(),
        ));
        for bound in listeners {
            let listener = Arc::new(Listener {
                http: proxy::http::ListenerHttp {
                    shared: http.clone(),
                    routes: bound.routes.clone(),
                    firewall: firewall.clone(),
                    metrics: bound.stats.metrics.requests.clone(),
                    idle_timeout: config.proxy.idle_timeout,
                    header_timeout: config.proxy.handshake_timeout,
                    response_timeout: config.proxy.response_timeout,
                    connect_attempts: config.proxy.connect_attempts as usize,
                },
                routes: bound.routes,
                firewall: firewall.clone(),
                listener_stats: bound.stats,
                timeouts: config.proxy.clone(),
                proxy_protocol: bound.proxy_protocol,
                capacity: capacity.clone(),
            });
            if let Some(udp) = bound.quic {
                drain.spawn(proxy::quic::serve(
                    udp,
                    listener.clone(),
                    flows.clone(),
                    &carriers,
                    moved.subscribe(),
                    drain.clone(),
                ));
            }
            drain.spawn(proxy::accept_loop(bound.socket, listener, drain.clone()));
        }
        firewall.spawn_geoip_watcher(GEOIP_POLL, stop.subscribe());
        certs.spawn_watcher(routes.clone(), CERT_POLL, stop.subscribe());
        http.spawn_pool_pruner(routes.clone(), UPSTREAM_PRUNE, stop.subscribe());
        proxy::probe::Probes::new(http.clone(), config.proxy.connect_timeout)
            .spawn(balancer.schedule().clone(), stop.subscribe());

        tracing::info!(
            version = %version(),
            config = %source,
            listeners = config.listeners.len(),
            routes = routes.listeners().iter().map(|l| l.snapshot().len()).sum::<usize>(),
            firewall_rules = firewall.rules().len(),
            admin = config.grpc.as_ref().map(|g| g.addr.to_string()).as_deref(),
            metrics = config.metrics.as_ref().map(|m| m.addr.to_string()).as_deref(),
            workers = tokio::runtime::Handle::current().metrics().num_workers(),
            max_connections = capacity.max(),
            fd_limit,
            "mc-proxy started"
        );

        // Stop: close listeners at once, drain, force, exit.
        let signal = shutdown.await;
        tracing::info!(
            signal,
            active_connections = stats.active_connections(),
            quic_flows = flows.held(),
            shutdown_timeout_ms = config.proxy.shutdown_timeout.as_millis() as u64,
            "shutting down: listeners closed, draining"
        );
        let forced = drain.drain(config.proxy.shutdown_timeout).await;
        let _ = stop.send(true);
        if let Some(handle) = admin {
            // The admin server bounds its own drain (open calls, a health
            // Watch stream) by DRAIN_TIMEOUT and then removes its socket
            // file; waiting a little longer lets it finish that, where an
            // equal wait raced it and could leave the file behind.
            let limit = admin::server::DRAIN_TIMEOUT + Duration::from_secs(1);
            let _ = tokio::time::timeout(limit, handle).await;
        }
        if let Some((_, task)) = metrics {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        store.close();
        tracing::info!(forced, "mc-proxy stopped");
        Ok(())
    }
}

/// The store's handle for an exit that does not wait for connections.
pub struct Exit {
    store: Store,
}

impl Exit {
    /// Exits with `code` without waiting for connections, but not before
    /// the store has finished the commands queued before this (each commits
    /// or fails as usual; whether its caller still hears back is a race
    /// with the exit, and a change that was acknowledged is committed) and
    /// closed the DB (which checkpoints the WAL), within
    /// `STORE_CLOSE_LIMIT` (2 s); later commands are refused. Then the log
    /// lines queued so far are written, within [`LOG_FLUSH_LIMIT`].
    pub async fn now(self, code: i32) -> ! {
        let store = self.store;
        let closing = tokio::task::spawn_blocking(move || store.close());
        if tokio::time::timeout(STORE_CLOSE_LIMIT, closing)
            .await
            .is_err()
        {
            tracing::error!(
                limit_ms = STORE_CLOSE_LIMIT.as_millis() as u64,
                "the store did not close in time; exiting anyway"
            );
        }
        logging::flush(LOG_FLUSH_LIMIT);
        std::process::exit(code)
    }
}

/// The connection cap (`[proxy] max_connections`, else derived from the
/// descriptor limit) and the splice pipes that fit beside it; returns the
/// cap and the soft descriptor limit. See `proxy::capacity`.
fn connection_capacity(
    config: &Config,
    stats: &Stats,
    raised: std::io::Result<(u64, u64)>,
) -> (Arc<capacity::Capacity>, Option<u64>) {
    match raised {
        Ok((before, after)) if after > before => {
            tracing::info!(
                from = before,
                to = after,
                "raised the soft RLIMIT_NOFILE to the hard limit"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the soft RLIMIT_NOFILE"),
    }
    let configured = config.proxy.max_connections;
    let (max, pipes, fd_limit) = match capacity::FdBudget::measure() {
        Ok(budget) => {
            let plan = budget.plan(configured, proxy::relay::PIPES_MAX);
            if !plan.derived && plan.max_connections > plan.affordable {
                tracing::warn!(
                    max_connections = plan.max_connections,
                    fd_limit = budget.limit,
                    fds_in_use = budget.in_use,
                    affordable = plan.affordable,
                    "proxy.max_connections is more than RLIMIT_NOFILE allows at two descriptors a connection: \
                     near it accepts fail with EMFILE (and back off); raise LimitNOFILE or lower max_connections"
                );
            }
            // QUIC flows hold a descriptor each, beside the TCP budget.
            let tcp = 2 * plan.max_connections as u64 + plan.pipes as u64 * 2;
            let left = budget.limit.saturating_sub(budget.in_use + tcp);
            let quic = u64::from(config.proxy.max_quic_flows);
            if config.listeners.iter().any(|l| l.quic) && quic > left {
                tracing::warn!(
                    max_quic_flows = quic,
                    max_connections = plan.max_connections,
                    fd_limit = budget.limit,
                    fds_left_for_quic = left,
                    "proxy.max_quic_flows is more than RLIMIT_NOFILE leaves beside the TCP connections \
                     (one descriptor a flow): near it new QUIC flows fail (backend_unreachable, \
                     \"Too many open files\") and accepts back off; raise LimitNOFILE or lower \
                     max_quic_flows (or max_connections)"
                );
            }
            tracing::debug!(
                ?plan,
                fd_limit = budget.limit,
                fds_in_use = budget.in_use,
                "descriptor budget"
            );
            (plan.max_connections, plan.pipes, Some(budget.limit))
        }
        Err(e) => {
            let max = configured.map_or(usize::MAX, |n| n.get() as usize);
            tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE; max_connections is not derived from it");
            (max, proxy::relay::PIPES_MAX, None)
        }
    };
    proxy::relay::set_pipe_limit(pipes);
    let capacity = capacity::Capacity::new(max, stats.metrics.capacity().clone());
    (Arc::new(capacity), fd_limit)
}

#[cfg(test)]
mod tests {
    use super::{worker_threads, ServerError, WorkersError};
    use crate::config::Config;
    use std::path::{Path, PathBuf};

    #[test]
    fn the_exit_code_follows_the_cause() {
        let config_error = Config::parse("", Path::new("/etc/mc.toml")).unwrap_err();
        let config = ServerError::from(config_error);
        assert_eq!(config.exit_code(), 2);
        assert_eq!(
            config.to_string(),
            "/etc/mc.toml: database: missing section [database] (database.path is required)"
        );
        let workers = ServerError::from(WorkersError::OutOfRange("0".into()));
        assert_eq!(workers.exit_code(), 2);
        let listen = ServerError::Listen {
            config_file: PathBuf::from("/etc/mc.toml"),
            key: "listeners[1].addr".into(),
            addr: ":443".into(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        assert_eq!(listen.exit_code(), 1);
        assert!(
            listen
                .to_string()
                .starts_with("/etc/mc.toml: listeners[1].addr: cannot listen on \":443\": "),
            "{listen}"
        );
        let signals = ServerError::Signals(std::io::Error::from(std::io::ErrorKind::Other));
        assert_eq!(signals.exit_code(), 1);
    }

    #[test]
    fn one_worker_on_one_or_two_cpus_else_one_per_cpu() {
        assert_eq!(worker_threads(None, 1), Ok(1));
        assert_eq!(worker_threads(None, 2), Ok(1));
        assert_eq!(worker_threads(None, 3), Ok(3));
        assert_eq!(worker_threads(None, 64), Ok(64));
    }

    #[test]
    fn the_environment_setting_wins_and_bad_values_are_refused() {
        assert_eq!(worker_threads(Some("4"), 2), Ok(4));
        assert_eq!(worker_threads(Some(" 2 "), 16), Ok(2));
        assert_eq!(worker_threads(Some("1"), 64), Ok(1));
        for bad in [
            "",
            "0",
            "-1",
            "two",
            "1.5",
            "1025",
            "99999999999999999999999",
        ] {
            let error = worker_threads(Some(bad), 2).expect_err(bad);
            assert_eq!(error, WorkersError::OutOfRange(bad.to_string()));
            assert_eq!(
                error.to_string(),
                format!(
                    "TOKIO_WORKER_THREADS={bad:?} is not a number of worker threads from 1 to 1024"
                )
            );
        }
    }
}
