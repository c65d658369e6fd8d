//! The server in-process: `App::build` on a config written to a temp dir
//! (listeners on port 0), the bound addresses read back, `App::run` until
//! [`InProcess::stop`]. What happened to a connection is read from the
//! server's `/metrics` (the outcome counters), not from log lines.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mc_proxy::config::Config;
use mc_proxy::server::{App, BoundAddrs, ServerError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::clients::{scrape, wait_metrics};
use super::fixtures::{config, listener_toml, METRICS_ANY_PORT};

/// The listener address [`InProcess::routing`] configures (port 0: the
/// kernel picks; it is also the `listener=` label of its metrics).
pub const ONE_LISTENER: &str = "127.0.0.1:0";

/// A running in-process server.
pub struct InProcess {
    pub addrs: BoundAddrs,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
    /// The temp dir of [`InProcess::routing`], removed after the server.
    temp: Option<tempfile::TempDir>,
}

/// Writes `toml` to `DIR/mc-proxy.toml` and loads it as the binary would.
pub fn load_config(dir: &Path, toml: &str) -> Config {
    let path = dir.join("mc-proxy.toml");
    std::fs::write(&path, toml).unwrap();
    Config::load(&path).unwrap()
}

/// `series{listener="127.0.0.1:0",outcome="OUTCOME"}` of the closed
/// connections counter, for [`ONE_LISTENER`].
pub fn closed_series(outcome: &str) -> String {
    one_listener(
        "mc_proxy_connections_closed_total",
        &format!("outcome=\"{outcome}\""),
    )
}

impl InProcess {
    /// Builds and runs `app` until [`InProcess::stop`].
    pub fn run(app: App) -> InProcess {
        super::install_crypto();
        let addrs = app.addrs();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async move {
            let _ = stopped.await;
            "test stop"
        }));
        InProcess {
            addrs,
            stop: Some(stop),
            task: Some(task),
            temp: None,
        }
    }

    /// [`load_config`], `App::build`, [`InProcess::run`].
    pub async fn start(dir: &Path, toml: &str) -> InProcess {
        let config = load_config(dir, toml);
        let app = App::build(&config).await.expect("App::build");
        InProcess::run(app)
    }

    /// A server in a temp dir of its own: one listener on [`ONE_LISTENER`]
    /// with `routes`, then `extra` (a `[proxy]` section, say), and
    /// `/metrics` on port 0.
    pub async fn routing(routes: &[(&str, SocketAddr)], extra: &str) -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        let toml = config(
            dir.path(),
            &format!(
                "{}{extra}\n{METRICS_ANY_PORT}",
                listener_toml(ONE_LISTENER, routes)
            ),
        );
        let mut server = InProcess::start(dir.path(), &toml).await;
        server.temp = Some(dir);
        server
    }

    /// [`InProcess::start`] on [`admin_config`](super::fixtures::admin_config):
    /// the admin socket `DIR/admin.sock` and one listener on `addr` with
    /// `routes`.
    pub async fn with_admin(dir: &Path, addr: &str, routes: &[(&str, SocketAddr)]) -> InProcess {
        let body = listener_toml(addr, routes);
        InProcess::start(dir, &super::fixtures::admin_config(dir, &body)).await
    }

    /// The `index`th listener's bound address.
    pub fn listener(&self, index: usize) -> SocketAddr {
        self.addrs.listeners[index].1
    }

    /// The first listener's bound address.
    pub fn addr(&self) -> SocketAddr {
        self.listener(0)
    }

    /// The metrics endpoint (configured by [`InProcess::routing`]).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.addrs.metrics.expect("[metrics] configured")
    }

    /// One scrape of `/metrics`: series → value.
    pub async fn metrics(&self) -> HashMap<String, f64> {
        scrape(self.metrics_addr()).await
    }

    /// Waits until `/metrics` satisfies `check`; returns that scrape.
    pub async fn wait_metrics(
        &self,
        check: impl FnMut(&HashMap<String, f64>) -> bool,
    ) -> HashMap<String, f64> {
        wait_metrics(self.metrics_addr(), Duration::from_secs(10), check).await
    }

    /// Waits until at least `n` connections of [`ONE_LISTENER`] closed with
    /// `outcome`; returns that scrape.
    pub async fn wait_closed(&self, outcome: &str, n: f64) -> HashMap<String, f64> {
        let series = closed_series(outcome);
        self.wait_metrics(|m| m.get(&series).is_some_and(|v| *v >= n))
            .await
    }

    /// Whether `App::run` is still running (it has not returned or panicked).
    pub fn alive(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Starts the drain and waits for `App::run` to return `Ok`.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("App::run did not return")
            .expect("App::run panicked")
            .expect("App::run failed");
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // Stops serving (the runtime ending would too); the temp dir goes
        // after.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// All connections of [`ONE_LISTENER`] closed so far, whatever the outcome.
pub fn closed_total(metrics: &HashMap<String, f64>) -> f64 {
    let prefix = format!("mc_proxy_connections_closed_total{{listener=\"{ONE_LISTENER}\",");
    metrics
        .iter()
        .filter(|(series, _)| series.starts_with(&prefix))
        .map(|(_, value)| value)
        .sum()
}

/// `series` of [`ONE_LISTENER`] with one more label: `NAME{listener="127.0.0.1:0",LABEL}`
/// (or just the listener label when `label` is empty).
pub fn one_listener(name: &str, label: &str) -> String {
    if label.is_empty() {
        format!("{name}{{listener=\"{ONE_LISTENER}\"}}")
    } else {
        format!("{name}{{listener=\"{ONE_LISTENER}\",{label}}}")
    }
}
