//! `mc-proxy server`: opens the store, builds the tables, binds the
//! listeners and the admin API, serves until a signal, then drains.
//!
//! Start order matters: the signal handlers come first, so a SIGHUP, SIGTERM
//! or SIGINT at any moment after start has its documented effect, never the
//! default action (which kills); the DB is opened (and seeded on first run)
//! before any socket is bound, so the first connection already sees the DB's
//! routes; the readiness notification goes out only when every listener is
//! bound.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::admin;
use crate::config::Config;
use crate::firewall::Firewall;
use crate::logging;
use crate::metrics::{self, Stats};
use crate::proxy::{self, capacity, Listener};
use crate::routes::{ListenerRoutes, Routes};
use crate::shutdown::{Shutdown, Signals};
use crate::store::{self, Store};
use crate::version;

/// How often the GeoIP file is checked for replacement.
const GEOIP_POLL: Duration = Duration::from_secs(1);

/// How long a second signal waits for the store to finish the change in
/// hand (one short transaction) and close the DB before the process exits.
const STORE_CLOSE_LIMIT: Duration = Duration::from_secs(2);

/// How long an exit waits for queued log lines to be written (more only
/// when the reader of stderr or journald is stalled; then they are lost).
pub const LOG_FLUSH_LIMIT: Duration = Duration::from_secs(1);

/// A startup failure: the message (one line) and the exit status.
#[derive(Debug)]
pub struct ServerError {
    pub exit_code: u8,
    pub message: String,
}

impl ServerError {
    fn config(message: String) -> Self {
        ServerError {
            exit_code: 2,
            message,
        }
    }

    fn runtime(message: String) -> Self {
        ServerError {
            exit_code: 1,
            message,
        }
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
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
/// often for the same traffic. Measured on a 2-CPU host (`bench/RESULTS.md`):
/// with one worker, proxy CPU per new TLS connection fell 11–32 % in four
/// runs; bulk MiB/s and added first-byte time stayed within the run-to-run
/// spread (each setting ahead in two runs). Hosts with more CPUs keep one
/// worker per CPU (not measured here).
pub fn worker_threads(setting: Option<&str>, cpus: usize) -> Result<usize, String> {
    match setting {
        Some(text) => match text.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(n),
            _ => Err(format!(
                "{WORKERS_ENV}={text:?} is not a number of worker threads from 1 to 1024"
            )),
        },
        None if cpus <= 2 => Ok(1),
        None => Ok(cpus),
    }
}

/// Runs the server to completion on its own runtime.
pub fn run(config: Config) -> Result<(), ServerError> {
    let setting = match std::env::var_os(WORKERS_ENV) {
        None => None,
        Some(value) => Some(value.into_string().map_err(|value| {
            ServerError::config(format!("{WORKERS_ENV}={value:?} is not valid UTF-8"))
        })?),
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = worker_threads(setting.as_deref(), cpus).map_err(ServerError::config)?;
    // One worker is a current-thread runtime: the same event loop without
    // the multi-threaded scheduler's work-stealing bookkeeping.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    let runtime = builder
        .enable_all()
        .thread_name("mc-proxy")
        .build()
        .map_err(|e| ServerError::runtime(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(serve(config, workers))
}

async fn serve(config: Config, workers: usize) -> Result<(), ServerError> {
    let source = config.source.display().to_string();
    // The soft descriptor limit up to the hard one, before anything opens.
    let nofile = capacity::raise_nofile_limit();

    // Signal handlers before anything else: from here on a signal is queued
    // for the code below, however early it comes (SIGTERM during start-up:
    // the start completes, then the drain begins at once; SIGHUP: a GeoIP
    // reload once serving).
    let Signals {
        stop: mut stop_signals,
        hangup,
    } = Signals::install()
        .map_err(|e| ServerError::runtime(format!("cannot install signal handlers: {e}")))?;

    // 0. The GeoIP file first: a config error must stop the start before
    // the store is created or seeded from this config. The rules come from
    // the store below.
    let firewall = Firewall::new(&config.firewall, &[])
        .map_err(|e| ServerError::config(format!("{source}: firewall.geoip_db: {e}")))?;

    // 1. The store: the truth for routes and rules (seeded on first run).
    let db_path = config.database.path.clone();
    let opened = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || store::open(&config))
            .await
            .map_err(|e| ServerError::runtime(format!("store: {e}")))?
            .map_err(|e| {
                ServerError::runtime(format!("database.path {}: {e}", db_path.display()))
            })?
    };
    let loaded = opened.state;

    // 2. The in-memory tables.
    firewall.replace_rules(&loaded.rules);
    let firewall = Arc::new(firewall);
    let routes = Arc::new(Routes::new(
        loaded
            .listeners
            .into_iter()
            .map(|(addr, map)| Arc::new(ListenerRoutes::new(addr, map)))
            .collect(),
    ));
    let stats = Arc::new(Stats::new(
        config.listeners.iter().map(|l| l.addr.text.clone()),
    ));

    // 3. Listening sockets: all bound before anything is served.
    let mut sockets = Vec::with_capacity(config.listeners.len());
    for (index, listener) in config.listeners.iter().enumerate() {
        let socket = proxy::bind(&listener.addr)
            .and_then(TcpListener::from_std)
            .map_err(|e| {
                ServerError::runtime(format!(
                    "{source}: listeners[{index}].addr: cannot listen on {:?}: {e}",
                    listener.addr.text
                ))
            })?;
        sockets.push(socket);
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

    let mut shutdown = Shutdown::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // 5. The admin API.
    let admin = match &config.grpc {
        Some(grpc) => {
            let state = admin::server::AdminState {
                routes: routes.clone(),
                store: store.clone(),
                firewall: firewall.clone(),
                stats: stats.clone(),
                version: format!("mc-proxy {}", version()),
            };
            let mut stop = stop_rx.clone();
            let handle = admin::server::serve(grpc, state, async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            })
            .await
            .map_err(|e| ServerError::runtime(format!("{source}: {e}")))?;
            Some(handle)
        }
        None => None,
    };

    // 5b. The metrics endpoint.
    let metrics = match &config.metrics {
        Some(metrics) => {
            let scrape = metrics::Scrape {
                metrics: stats.metrics.clone(),
                routes: routes.clone(),
                firewall: firewall.clone(),
            };
            let (local, task) = metrics::serve(metrics.addr, scrape, stop_rx.clone())
                .await
                .map_err(|e| {
                    ServerError::runtime(format!(
                        "{source}: metrics.addr: cannot listen on {}: {e}",
                        metrics.addr
                    ))
                })?;
            tracing::info!(addr = %local, "metrics endpoint listening on /metrics");
            Some(task)
        }
        None => None,
    };

    // 6. Serve, within the descriptor budget measured now that the server's
    // own descriptors are open.
    let (capacity, fd_limit) = connection_capacity(&config, &stats, nofile);
    for (((socket, listener), listener_stats), listener_config) in sockets
        .into_iter()
        .zip(routes.listeners())
        .zip(stats.listeners.iter())
        .zip(&config.listeners)
    {
        let listener = Arc::new(Listener {
            routes: listener.clone(),
            firewall: firewall.clone(),
            listener_stats: listener_stats.clone(),
            timeouts: config.proxy.clone(),
            proxy_protocol: listener_config.proxy_protocol,
            capacity: capacity.clone(),
        });
        tokio::spawn(proxy::accept_loop(
            socket,
            listener,
            shutdown.watcher(),
            shutdown.guard(),
        ));
    }
    firewall.spawn_geoip_watcher(GEOIP_POLL, stop_rx.clone());
    tokio::spawn(reload_on_hangup(firewall.clone(), hangup));

    tracing::info!(
        version = %version(),
        config = %source,
        listeners = config.listeners.len(),
        routes = routes.listeners().iter().map(|l| l.snapshot().len()).sum::<usize>(),
        firewall_rules = firewall.rules().len(),
        admin = config.grpc.as_ref().map(|g| g.addr.to_string()).as_deref(),
        metrics = config.metrics.as_ref().map(|m| m.addr.to_string()).as_deref(),
        workers,
        max_connections = capacity.max(),
        fd_limit,
        "mc-proxy started"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    // 7. Stop: close listeners at once, drain, force, exit.
    let signal = stop_signals.next().await;
    let active = stats.active_connections();
    tracing::info!(
        signal = signal.name(),
        active_connections = active,
        shutdown_timeout_ms = config.proxy.shutdown_timeout.as_millis() as u64,
        "shutting down: listeners closed, draining"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tokio::spawn({
        let store = store.clone();
        async move {
            let second = stop_signals.next().await;
            tracing::warn!(signal = second.name(), "second signal: exiting at once");
            exit_now(store, second.exit_code()).await
        }
    });
    let forced = shutdown.drain(config.proxy.shutdown_timeout).await;
    let _ = stop_tx.send(true);
    if let Some(handle) = admin {
        let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
    }
    if let Some(task) = metrics {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    store.close();
    tracing::info!(forced, "mc-proxy stopped");
    Ok(())
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

/// Exits with `code` without waiting for connections, but not before the
/// store has finished the commands queued before this (each commits or
/// fails as usual; whether its caller still hears back is a race with the
/// exit, and a change that was acknowledged is committed) and closed the DB
/// (which checkpoints the WAL), within [`STORE_CLOSE_LIMIT`]; later
/// commands are refused. Then the log lines queued so far are written,
/// within [`LOG_FLUSH_LIMIT`].
async fn exit_now(store: Store, code: i32) -> ! {
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

async fn reload_on_hangup(firewall: Arc<Firewall>, mut hangup: tokio::signal::unix::Signal) {
    while hangup.recv().await.is_some() {
        let firewall = firewall.clone();
        let result = tokio::task::spawn_blocking(move || firewall.reload_geoip()).await;
        if let Ok(Ok(true)) = result {
            tracing::info!("SIGHUP: GeoIP database reloaded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

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
            assert!(error.contains("TOKIO_WORKER_THREADS"), "{error}");
        }
    }
}
