//! The server in-process: `App::build` on a config written to a temp dir
//! (listeners on port 0), the bound addresses read back, `App::run` until
//! [`InProcess::stop`].

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mc_proxy::config::Config;
use mc_proxy::server::{App, BoundAddrs, ServerError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running in-process server.
pub struct InProcess {
    pub addrs: BoundAddrs,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

/// Writes `toml` to `DIR/mc-proxy.toml` and loads it as the binary would.
pub fn load_config(dir: &Path, toml: &str) -> Config {
    let path = dir.join("mc-proxy.toml");
    std::fs::write(&path, toml).unwrap();
    Config::load(&path).unwrap()
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
        }
    }

    /// [`load_config`], `App::build`, [`InProcess::run`].
    pub async fn start(dir: &Path, toml: &str) -> InProcess {
        let config = load_config(dir, toml);
        let app = App::build(&config).await.expect("App::build");
        InProcess::run(app)
    }

    /// The `index`th listener's bound address.
    pub fn listener(&self, index: usize) -> SocketAddr {
        self.addrs.listeners[index].1
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
