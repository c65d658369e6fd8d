//! Signals, drain, force-close.
//!
//! Owns the server's lifecycle state. Accept loops stop at `Draining`;
//! established connections keep running until `Forced`, when they close at
//! once. Every connection task holds a [`DrainGuard`]; the server knows the
//! last one is gone when [`Shutdown::wait_drained`] returns.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Listening sockets closed; established connections may finish.
    Draining,
    /// Everything still open is closed now.
    Forced,
}

/// The controller, owned by the server.
pub struct Shutdown {
    phase: watch::Sender<Phase>,
    drain_tx: Option<mpsc::Sender<()>>,
    drain_rx: mpsc::Receiver<()>,
}

/// A cheap handle that tasks use to learn the phase.
#[derive(Clone)]
pub struct Watcher {
    phase: watch::Receiver<Phase>,
}

/// Held by each connection task; the drain completes when all are dropped.
#[derive(Clone)]
pub struct DrainGuard {
    _tx: mpsc::Sender<()>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let (phase, _) = watch::channel(Phase::Running);
        let (drain_tx, drain_rx) = mpsc::channel(1);
        Shutdown {
            phase,
            drain_tx: Some(drain_tx),
            drain_rx,
        }
    }

    pub fn watcher(&self) -> Watcher {
        Watcher {
            phase: self.phase.subscribe(),
        }
    }

    pub fn guard(&self) -> DrainGuard {
        DrainGuard {
            _tx: self.drain_tx.clone().unwrap_or_else(|| mpsc::channel(1).0),
        }
    }

    pub fn set(&self, phase: Phase) {
        self.phase.send_if_modified(|current| {
            if phase > *current {
                *current = phase;
                true
            } else {
                false
            }
        });
    }

    /// Starts draining, waits up to `timeout` for every guard to drop, then
    /// forces the rest closed and waits (briefly) for them to go.
    /// Returns the number of seconds spent and whether it had to force.
    pub async fn drain(&mut self, timeout: Duration) -> bool {
        self.set(Phase::Draining);
        self.drain_tx = None;
        if tokio::time::timeout(timeout, self.drain_rx.recv())
            .await
            .is_ok()
        {
            return false;
        }
        self.set(Phase::Forced);
        // Forced connections close on their next poll; give them a moment.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.drain_rx.recv()).await;
        true
    }
}

impl Watcher {
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Resolves once the phase is at least `phase`.
    pub async fn reached(&mut self, phase: Phase) {
        // An error means the controller is gone: treat as reached.
        let _ = self.phase.wait_for(|p| *p >= phase).await;
    }
}

/// Waits for SIGTERM or SIGINT. Returns the signal's name.
pub async fn terminate_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            // Signal registration only fails if the runtime lacks a signal
            // driver; Ctrl-C is the portable fallback.
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
