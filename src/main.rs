//! CLI parsing → one function per subcommand; nothing else.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use mc_proxy::admin::cli::{self as admin_cli, ClientOverrides, RouteSpec};
use mc_proxy::config::{Config, DEFAULT_CONFIG_PATH};
use mc_proxy::firewall::{GeoIp, RuleKind};
use mc_proxy::server::{self, App, ServerError};
use mc_proxy::shutdown::Signals;
use mc_proxy::{handoff, logging, store};

#[derive(Parser)]
#[command(
    name = "mc-proxy",
    about = "TLS SNI proxy and router (L4 relay, L7 TLS termination)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConfigArg {
    /// Config file [env: MC_PROXY_CONFIG] [default: /srv/mc-proxy/mc-proxy.toml]
    #[arg(
        short,
        long,
        value_name = "PATH",
        env = "MC_PROXY_CONFIG",
        hide_env = true
    )]
    config: Option<PathBuf>,
}

impl ConfigArg {
    fn path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
    }
}

/// Where the admin-API clients connect; overrides the config's [grpc].
#[derive(Args, Clone)]
struct AdminArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Admin API address: unix:PATH or IP:PORT
    #[arg(long, value_name = "ADDR")]
    addr: Option<String>,
    /// CA certificate that verifies the server (TCP)
    #[arg(long, value_name = "PATH")]
    ca_cert: Option<PathBuf>,
    /// Client certificate for mTLS (TCP)
    #[arg(long, value_name = "PATH")]
    client_cert: Option<PathBuf>,
    /// Client key for mTLS (TCP)
    #[arg(long, value_name = "PATH")]
    client_key: Option<PathBuf>,
}

/// `mc-proxy server`'s arguments.
#[derive(Args, Clone)]
struct ServerArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Once a newer process has taken the sockets over and this one has
    /// drained: exit 0, or wait for SIGTERM/SIGINT and then exit 0 (a
    /// container's PID 1, whose exit a restart policy would undo)
    /// [env: MC_PROXY_AFTER_HANDOFF] [default: wait when running as PID 1,
    /// else exit]
    #[arg(
        long,
        value_enum,
        value_name = "WHAT",
        env = "MC_PROXY_AFTER_HANDOFF",
        hide_env = true
    )]
    after_handoff: Option<AfterHandoff>,
}

/// What a server does once it has handed its sockets over and drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AfterHandoff {
    Exit,
    Wait,
}

impl AfterHandoff {
    /// `--after-handoff`, or its default for this process.
    fn resolve(arg: Option<AfterHandoff>) -> AfterHandoff {
        arg.unwrap_or(if std::process::id() == 1 {
            AfterHandoff::Wait
        } else {
            AfterHandoff::Exit
        })
    }

    fn waits(self) -> bool {
        self == AfterHandoff::Wait
    }
}

#[derive(Subcommand)]
enum Command {
    /// Start the proxy (foreground); takes over from a server already
    /// running on the same state directory
    Server(ServerArgs),
    /// Start a new server process of this binary that takes over from the
    /// running one (systemd's ExecReload); exits 0 once it has, 1 if it
    /// failed (the running server keeps serving)
    Upgrade(ConfigArg),
    /// Health of a running instance, via the admin API
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print JSON
        #[arg(long)]
        json: bool,
        /// Exit 1 unless the server answering on the admin Unix socket is
        /// this process ID as seen from here (a pod's readiness probe:
        /// `--expect-pid 1`, its own server, not a predecessor still
        /// answering on the shared socket)
        #[arg(long, value_name = "PID")]
        expect_pid: Option<u32>,
    },
    /// Consistent DB backup (VACUUM INTO); works while the server runs
    Snapshot {
        #[command(flatten)]
        config: ConfigArg,
        /// Output file [default: <db dir>/backups/mc-proxy-<UTC>.db]
        #[arg(short, long, value_name = "PATH")]
        output: Option<PathBuf>,
    },
    /// Validate the config (and open the GeoIP DB) and exit
    Check(ConfigArg),
    /// List, add or remove routes
    #[command(subcommand)]
    Routes(RoutesCommand),
    /// List, add or remove firewall rules
    #[command(subcommand)]
    Firewall(FirewallCommand),
    /// Backend health and counters
    #[command(subcommand)]
    Backends(BackendsCommand),
}

/// What `routes list` and `backends list` take.
#[derive(Args)]
struct ListArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Only this listener (its addr as written in the config)
    #[arg(long, value_name = "ADDR")]
    listener: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BackendsCommand {
    /// Every backend of every route: health and connection counters
    List(ListArgs),
}

#[derive(Subcommand)]
enum RoutesCommand {
    /// List routes, sorted by listener and hostname
    List(ListArgs),
    /// Add a route, or replace it if it exists (it may switch between l4 and l7)
    Add {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        route: Box<RouteAddArgs>,
    },
    /// Remove a route
    Remove {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_name = "ADDR")]
        listener: String,
        #[arg(long, value_name = "HOST")]
        hostname: String,
    },
}

#[derive(Args)]
struct RouteAddArgs {
    #[arg(long, value_name = "ADDR")]
    listener: String,
    #[arg(long, value_name = "HOST")]
    hostname: String,
    /// A backend; repeat for a pool (tried in the order given)
    #[arg(long, value_name = "HOST:PORT", required = true)]
    backend: Vec<String>,
    /// How a connection picks a backend of the pool [default: round_robin]
    #[arg(long, value_name = "BALANCE", value_parser = ["round_robin", "least_connections"])]
    balance: Option<String>,
    /// Check every backend this often, like 5s [default: no active check]
    #[arg(long, value_name = "DURATION")]
    health_interval: Option<String>,
    /// l7: the check is GET PATH expecting 2xx/3xx [default: a TCP connect]
    #[arg(long, value_name = "PATH")]
    health_path: Option<String>,
    /// Failed checks in a row that mark a backend down [default: 3]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    health_fall: Option<u32>,
    /// Passed checks in a row that mark it up again [default: 2]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    health_rise: Option<u32>,
    /// Send a PROXY protocol v2 header to the backend (l4 only)
    #[arg(long)]
    send_proxy_protocol: bool,
    /// l4: relay the TLS stream untouched; l7: terminate TLS and proxy HTTP
    #[arg(long, value_name = "MODE", value_parser = ["l4", "l7"], default_value = "l4")]
    mode: String,
    /// l7: PEM certificate chain, leaf first (relative = to the current directory)
    #[arg(long, value_name = "PATH")]
    tls_cert: Option<PathBuf>,
    /// l7: PEM private key
    #[arg(long, value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// l7: TLS to the backend, verified
    #[arg(long)]
    backend_tls: bool,
    /// l7 with --backend-tls: roots that verify the backend [default: the system roots]
    #[arg(long, value_name = "PATH")]
    backend_ca: Option<PathBuf>,
    /// l7 with --backend-tls: the name verified and sent as SNI [default: the backend's host]
    #[arg(long, value_name = "NAME")]
    backend_server_name: Option<String>,
    /// l7: what to speak to the backend [default: auto]
    #[arg(long, value_name = "PROTOCOL", value_parser = ["auto", "http1", "h2"])]
    backend_protocol: Option<String>,
}

impl From<RouteAddArgs> for RouteSpec {
    fn from(args: RouteAddArgs) -> Self {
        RouteSpec {
            listener: args.listener,
            hostname: args.hostname,
            backends: args.backend,
            balance: args.balance,
            health_interval: args.health_interval,
            health_path: args.health_path,
            health_fall: args.health_fall,
            health_rise: args.health_rise,
            send_proxy_protocol: args.send_proxy_protocol,
            l7: args.mode == "l7",
            tls_cert: args.tls_cert,
            tls_key: args.tls_key,
            backend_tls: args.backend_tls,
            backend_ca: args.backend_ca,
            backend_server_name: args.backend_server_name,
            backend_protocol: args.backend_protocol,
        }
    }
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct RuleArg {
    /// An IP address
    #[arg(long)]
    ip: Option<String>,
    /// A network, like 198.51.100.0/24
    #[arg(long)]
    cidr: Option<String>,
    /// An ISO 3166-1 alpha-2 country code
    #[arg(long)]
    country: Option<String>,
    /// A regular expression matched against the User-Agent of requests on l7 routes
    #[arg(long, value_name = "REGEX", allow_hyphen_values = true)]
    user_agent: Option<String>,
}

impl RuleArg {
    fn kind_value(self) -> (RuleKind, String) {
        match (self.ip, self.cidr, self.country, self.user_agent) {
            (Some(ip), _, _, _) => (RuleKind::Ip, ip),
            (_, Some(cidr), _, _) => (RuleKind::Cidr, cidr),
            (_, _, Some(country), _) => (RuleKind::Country, country),
            (_, _, _, Some(pattern)) => (RuleKind::UserAgent, pattern),
            // clap's group makes exactly one present.
            (None, None, None, None) => (RuleKind::Ip, String::new()),
        }
    }
}

#[derive(Subcommand)]
enum FirewallCommand {
    /// List the firewall rules
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        json: bool,
    },
    /// Add a blocking rule (idempotent)
    Add {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        rule: RuleArg,
    },
    /// Remove a blocking rule
    Remove {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        rule: RuleArg,
    },
}

fn main() -> ExitCode {
    let version = mc_proxy::version();
    let matches = Cli::command().version(version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Server(args) => cmd_server(&args),
        Command::Upgrade(config) => cmd_upgrade(&config),
        Command::Check(config) => cmd_check(&config),
        Command::Snapshot { config, output } => cmd_snapshot(&config, output),
        Command::Status {
            admin,
            json,
            expect_pid,
        } => with_admin(&admin, |t| admin_cli::status(t, json, expect_pid)),
        Command::Routes(RoutesCommand::List(ListArgs {
            admin,
            listener,
            json,
        })) => with_admin(&admin, |t| admin_cli::routes_list(t, listener, json)),
        Command::Routes(RoutesCommand::Add { admin, route }) => {
            with_admin(&admin, |t| admin_cli::routes_add(t, (*route).into()))
        }
        Command::Routes(RoutesCommand::Remove {
            admin,
            listener,
            hostname,
        }) => with_admin(&admin, |t| admin_cli::routes_remove(t, listener, hostname)),
        Command::Backends(BackendsCommand::List(ListArgs {
            admin,
            listener,
            json,
        })) => with_admin(&admin, |t| admin_cli::backends_list(t, listener, json)),
        Command::Firewall(FirewallCommand::List { admin, json }) => {
            with_admin(&admin, |t| admin_cli::firewall_list(t, json))
        }
        Command::Firewall(FirewallCommand::Add { admin, rule }) => {
            let (kind, value) = rule.kind_value();
            with_admin(&admin, |t| admin_cli::firewall_add(t, kind, value))
        }
        Command::Firewall(FirewallCommand::Remove { admin, rule }) => {
            let (kind, value) = rule.kind_value();
            with_admin(&admin, |t| admin_cli::firewall_remove(t, kind, value))
        }
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("mc-proxy: {message}");
    ExitCode::from(code)
}

fn load(config: &ConfigArg) -> Result<Config, ExitCode> {
    Config::load(&config.path()).map_err(|e| {
        let e = ServerError::from(e);
        fail(e.exit_code(), e)
    })
}

/// [`load`], then [`check_certificates`].
fn load_checked(config: &ConfigArg) -> Result<Config, ExitCode> {
    let config = load(config)?;
    check_certificates(&config)?;
    Ok(config)
}

fn cmd_server(args: &ServerArgs) -> ExitCode {
    let config = match load_checked(&args.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let sink = logging::init(&config.log.level);
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    let result = serve(config, AfterHandoff::resolve(args.after_handoff));
    if let Err(e) = &result {
        // One line on stderr per failure: the plain line below. Under
        // journald the structured record is logged as well.
        if sink == logging::Sink::Journald {
            tracing::error!(error = %e, "mc-proxy failed");
        }
    }
    // The log writer thread ends with the process: let it write what is
    // queued ("mc-proxy stopped", the last close lines) first.
    logging::flush(server::LOG_FLUSH_LIMIT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.exit_code(), e),
    }
}

/// `mc-proxy server`: the runtime, the signal handlers (first: from here
/// on a signal is queued for the code below, however early it comes —
/// SIGTERM during start-up lets the start complete, then the drain begins
/// at once; SIGHUP is a GeoIP reload once serving), the handoff (a server
/// already running on this state directory hands over its sockets:
/// [`mc_proxy::handoff`]), then [`App::build`] (the DB, every socket bound
/// or taken), READY=1, and [`App::run`] until SIGTERM, SIGINT or a handoff
/// to a newer process. A second signal exits at once with 128 + its number.
fn serve(config: Config, after_handoff: AfterHandoff) -> Result<(), ServerError> {
    let runtime = server::runtime()?;
    runtime.block_on(async move {
        let Signals {
            stop: mut stop_signals,
            hangup,
        } = Signals::install().map_err(ServerError::Signals)?;
        // Started by `mc-proxy upgrade`: told where to report the takeover,
        // and there must be a server to take over from.
        let upgrade = std::env::var_os(UPGRADE_NOTIFY_ENV).map(PathBuf::from);
        // A server already running here hands over its sockets (the
        // connection to it stays open until this one serves: if the start
        // fails, closing it tells the old one to carry on).
        let handoff_path = handoff::socket_path(&config);
        let taken = {
            let path = handoff_path.clone();
            tokio::task::spawn_blocking(move || handoff::take(&path))
                .await
                .map_err(|e| ServerError::Runtime(std::io::Error::other(e)))??
        };
        if upgrade.is_some() && taken.is_none() {
            return Err(handoff::HandoffError::Nobody { path: handoff_path }.into());
        }
        let mut inherited = server::Inherited::default();
        let (admin_begin, admin_began) = tokio::sync::oneshot::channel();
        let taken = match taken {
            Some(mut taken) => {
                let received = handoff::sort(&config, std::mem::take(&mut taken.sockets));
                for unused in &received.unused {
                    tracing::info!(socket = %unused, "handoff: a socket the config no longer names was closed");
                }
                tracing::info!(
                    listeners = received.listeners.len(),
                    admin = received.admin.is_some(),
                    metrics = received.metrics.is_some(),
                    quic = received.quic.len(),
                    "handoff: took the running server's sockets"
                );
                inherited.listeners = received.listeners;
                inherited.admin = received.admin;
                inherited.metrics = received.metrics;
                inherited.quic = received.quic;
                inherited.admin_begin = Some(admin_began);
                Some(taken)
            }
            None => None,
        };
        // Sockets passed by systemd (LISTEN_FDS), matched to the listeners
        // by address, for listeners the handoff did not cover; the rest
        // are bound by the build.
        let activated = mc_proxy::proxy::activation::from_env(&config.listeners);
        for ignored in &activated.ignored {
            tracing::warn!(socket = %ignored, "a socket passed by systemd was not used");
        }
        for (text, socket) in activated.matched {
            if !inherited.listeners.iter().any(|(t, _)| *t == text) {
                inherited.listeners.push((text, socket));
            }
        }
        let mut app = App::build_inherited(&config, inherited).await?;
        let offer = app.handoff_offer();
        let store = app.store();
        let stats = app.stats().clone();
        app.reload_on(hangup);
        let exit = app.exit_handle();
        let carriers = app.quic_carriers();
        // This process's handoff socket, bound under a staging name now so
        // that it takes the path the moment the previous server says BYE.
        let bound = match handoff::bind(&handoff_path) {
            Ok(bound) => Some(bound),
            Err(e) => {
                tracing::warn!(
                    path = %handoff_path.display(),
                    error = %e,
                    "cannot listen on the handoff socket; upgrades will not be seamless"
                );
                None
            }
        };
        if taken.is_none() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
        let handed_off = Arc::new(AtomicBool::new(false));
        let (stop_asked, mut stop_asked_rx) = tokio::sync::watch::channel(false);
        // First polled once the accept loops run (see `App::run`).
        let shutdown = {
            let handed_off = handed_off.clone();
            async move {
                let mut bound = bound;
                if let Some(taken) = taken {
                    let predecessor = taken.predecessor.clone();
                    let farewell = match tokio::task::spawn_blocking(move || taken.serving()).await {
                        Ok(Ok((farewell, flows))) => {
                            if !flows.is_empty() {
                                carriers.import(flows);
                            }
                            Some(farewell)
                        }
                        // The previous server went away or broke off after
                        // handing over: this one serves, alone or beside it.
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "handoff: no BYE from the previous server; serving anyway");
                            None
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "handoff: the exchange failed; serving anyway");
                            None
                        }
                    };
                    // Either way this process serves now: its handoff socket
                    // takes the path, and the takeover is recorded and told.
                    if let Some(bound) = bound.as_mut() {
                        if let Err(e) = bound.place() {
                            tracing::warn!(error = %e, "handoff: cannot place this process's handoff socket");
                        }
                    }
                    took_over(&stats, predecessor, upgrade.as_deref());
                    if let Some(farewell) = farewell {
                        // The previous server exits once this closes.
                        drop(farewell);
                        tracing::info!("handoff: the previous server stopped accepting");
                        // Admin calls it answered after this process loaded
                        // the tables are in the database now.
                        if let Err(e) = store.reload().await {
                            tracing::error!(error = %e, "handoff: cannot re-read the database; admin changes made during the handoff may be missing until a restart");
                        }
                    }
                }
                let _ = admin_begin.send(());
                let mut handoff_server = bound.and_then(|bound| {
                    handoff::serve(bound, offer)
                        .map_err(|e| {
                            tracing::warn!(
                                path = %handoff_path.display(),
                                error = %e,
                                "cannot listen on the handoff socket; upgrades will not be seamless"
                            )
                        })
                        .ok()
                });
                let newer = async {
                    match handoff_server.as_mut() {
                        Some(listening) => listening.handed_off().await,
                        None => std::future::pending().await,
                    }
                };
                let name = tokio::select! {
                    signal = stop_signals.next() => Some(signal),
                    () = newer => None,
                };
                if let Some(listening) = handoff_server {
                    listening.close().await;
                }
                let waits = name.is_none() && after_handoff.waits();
                handed_off.store(name.is_none(), Ordering::SeqCst);
                if !waits {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                }
                tokio::spawn(async move {
                    if waits {
                        // After a handoff the first signal only asks to
                        // exit once drained.
                        let first = stop_signals.next().await;
                        tracing::info!(signal = first.name(), "stop signal after the handoff: exiting once drained");
                        stop_asked.send_replace(true);
                    }
                    let second = stop_signals.next().await;
                    tracing::warn!(signal = second.name(), "second signal: exiting at once");
                    exit.now(second.exit_code()).await
                });
                name.map_or("handoff", |signal| signal.name())
            }
        };
        app.run(shutdown).await?;
        if handed_off.load(Ordering::SeqCst) && after_handoff.waits() {
            tracing::info!("handed off and drained; waiting for SIGTERM or SIGINT to exit (--after-handoff wait)");
            let _ = stop_asked_rx.wait_for(|asked| *asked).await;
        }
        Ok(())
    })
}

/// The environment variable `mc-proxy upgrade` sets for the server it
/// starts: the datagram socket to report the takeover on.
const UPGRADE_NOTIFY_ENV: &str = "MC_PROXY_UPGRADE_NOTIFY";

/// The previous server said BYE: this process is the one serving. Records
/// it for `mc-proxy status`, tells systemd this is the main process now
/// (`MAINPID`, with `NotifyAccess=all`), and tells `mc-proxy upgrade`.
fn took_over(
    stats: &mc_proxy::metrics::Stats,
    predecessor: Option<handoff::Predecessor>,
    upgrade: Option<&std::path::Path>,
) {
    let at = std::time::SystemTime::now();
    let record = match predecessor {
        Some(p) => mc_proxy::metrics::TookOver {
            at,
            pid: p.pid,
            started_at: std::time::UNIX_EPOCH
                .checked_add(std::time::Duration::from_millis(p.started_unix_ms)),
            version: p.version,
        },
        None => mc_proxy::metrics::TookOver {
            at,
            pid: 0,
            started_at: None,
            version: String::new(),
        },
    };
    tracing::info!(
        predecessor_pid = record.pid,
        predecessor_version = %record.version,
        "handoff: took over"
    );
    let _ = stats.took_over.set(record);
    let pid = std::process::id();
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::MainPid(pid),
        sd_notify::NotifyState::Ready,
    ]);
    if let Some(path) = upgrade {
        let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|socket| {
            socket.send_to(format!("TOOK_OVER=1\nMAINPID={pid}\n").as_bytes(), path)
        });
        if let Err(e) = sent {
            tracing::warn!(path = %path.display(), error = %e, "cannot tell mc-proxy upgrade that the takeover is done");
        }
    }
}

/// How long `mc-proxy upgrade` waits for the new server to take over
/// before it kills it (below the unit's TimeoutStartSec=120, which bounds
/// ExecReload).
const UPGRADE_LIMIT: Duration = Duration::from_secs(100);

/// `mc-proxy upgrade`: checks the config, starts `THIS-BINARY server
/// --config PATH` with a datagram socket to report on, and waits until that
/// process has taken over (exit 0; it goes on serving) or has exited
/// (exit 1; the running server was left untouched). Under systemd the new
/// process tells systemd it is the main process (`NotifyAccess=all`).
fn cmd_upgrade(config_arg: &ConfigArg) -> ExitCode {
    let config = match load_checked(config_arg) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let handoff_path = handoff::socket_path(&config);
    let dir = handoff_path
        .parent()
        .map_or_else(|| PathBuf::from("."), |d| d.to_path_buf());
    let report = dir.join(format!("mc-proxy.upgrade.{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&report);
    let socket = match std::os::unix::net::UnixDatagram::bind(&report) {
        Ok(socket) => socket,
        Err(e) => return fail(1, format!("{}: {e}", report.display())),
    };
    let outcome = upgrade_with(config_arg, &socket, &report);
    let _ = std::fs::remove_file(&report);
    match outcome {
        Ok(pid) => {
            println!(
                "mc-proxy: the new server (pid {pid}) took over; the previous one drains and exits"
            );
            ExitCode::SUCCESS
        }
        Err(message) => fail(1, message),
    }
}

/// Starts the new server and waits for its report (its pid) or its exit.
fn upgrade_with(
    config_arg: &ConfigArg,
    socket: &std::os::unix::net::UnixDatagram,
    report: &std::path::Path,
) -> Result<u32, String> {
    let exe = std::env::current_exe().map_err(|e| format!("this binary's path: {e}"))?;
    let mut child = std::process::Command::new(&exe)
        .arg("server")
        .arg("--config")
        .arg(config_arg.path())
        .env(UPGRADE_NOTIFY_ENV, report)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {} server: {e}", exe.display()))?;
    let pid = child.id();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + UPGRADE_LIMIT;
    let mut buf = [0u8; 512];
    loop {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            if text.lines().any(|l| l == "TOOK_OVER=1") {
                return Ok(pid);
            }
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                return Err(format!(
                    "the new server exited ({status}) before taking over; the running server was left serving"
                ))
            }
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for the new server: {e}")),
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the new server did not take over within {}s; it was killed and the running server was left serving",
                UPGRADE_LIMIT.as_secs()
            ));
        }
    }
}

/// Reads and checks the L7 routes' certificates (exit 2 naming the TOML
/// key of a refused file); a leaf-only chain is a warning on stderr.
fn check_certificates(config: &Config) -> Result<(), ExitCode> {
    match config.check_certificates() {
        Ok(leaf_only) => {
            for cert in leaf_only {
                eprintln!(
                    "mc-proxy: warning: {}: {}: {}: the chain is only a leaf not signed by itself; clients that need the intermediate will fail",
                    config.source.display(),
                    cert.key,
                    cert.path.display()
                );
            }
            Ok(())
        }
        Err(e) => {
            let e = ServerError::from(e);
            Err(fail(e.exit_code(), e))
        }
    }
}

fn cmd_check(config: &ConfigArg) -> ExitCode {
    let config = match load_checked(config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Some(path) = &config.firewall.geoip_db {
        if let Err(source) = GeoIp::open(path) {
            let e = ServerError::GeoIp {
                config_file: config.source.clone(),
                source: Box::new(source),
            };
            return fail(e.exit_code(), e);
        }
    }
    let routes: usize = config.listeners.iter().map(|l| l.routes.len()).sum();
    println!(
        "{}: OK ({} listeners, {} routes, {} firewall rules)",
        config.source.display(),
        config.listeners.len(),
        routes,
        config.firewall.rules.len()
    );
    ExitCode::SUCCESS
}

fn cmd_snapshot(config: &ConfigArg, output: Option<PathBuf>) -> ExitCode {
    let config = match load(config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match store::snapshot(&config.database.path, output.as_deref()) {
        Ok(path) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

/// Runs an admin-API client command: builds the target from the config's
/// [grpc] and the flags (exit 2 if that fails), then runs `f` on a runtime.
fn with_admin<F, Fut>(args: &AdminArgs, f: F) -> ExitCode
where
    F: FnOnce(admin_cli::ClientTarget) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    let overrides = ClientOverrides {
        addr: args.addr.clone(),
        ca_cert: args.ca_cert.clone(),
        client_cert: args.client_cert.clone(),
        client_key: args.client_key.clone(),
    };
    // The config is only needed when a flag does not say where to connect.
    let config = if args.addr.is_some() {
        Config::load(&args.config.path()).ok()
    } else {
        match load(&args.config) {
            Ok(config) => Some(config),
            Err(code) => return code,
        }
    };
    let target = match admin_cli::client_target(config.as_ref(), &args.config.path(), &overrides) {
        Ok(target) => target,
        Err(e) => return fail(e.exit_code(), e),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(f(target))
}
