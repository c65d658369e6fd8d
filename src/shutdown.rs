//! Signals, drain, force-close.
//!
//! Owns the server's lifecycle state. Accept loops stop at `Draining`;
//! established connections keep running until `Forced`, when they close at
//! once. Every connection task holds a [`DrainGuard`]; the server knows the
//! last one is gone when [`Shutdown::wait_drained`] returns.

use std::io;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
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

/// The signals the server acts on, registered with the runtime in one go
/// by [`Signals::install`]. From then on none of them has its default
/// action (SIGHUP's and SIGTERM's kill the process): each is queued for the
/// stream below until someone waits on it, so one that arrives while the
/// server is still starting takes effect as soon as it is served.
pub struct Signals {
    /// SIGTERM and SIGINT: stop (drain), and a second one exits at once.
    pub stop: StopSignals,
    /// SIGHUP: reload the GeoIP database.
    pub hangup: Signal,
}

/// SIGTERM and SIGINT.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

/// Which stop signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Term,
    Int,
}

impl Signals {
    /// Registers the handlers. Call it inside the runtime, before the
    /// first socket is bound. Fails only if the runtime has no signal
    /// driver or the handler cannot be installed.
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            stop: StopSignals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            },
            hangup: signal(SignalKind::hangup())?,
        })
    }
}

impl StopSignals {
    /// Waits for the next SIGTERM or SIGINT (one that came since the
    /// previous call, or since [`Signals::install`], returns at once).
    pub async fn next(&mut self) -> Stop {
        tokio::select! {
            Some(()) = self.term.recv() => Stop::Term,
            Some(()) = self.int.recv() => Stop::Int,
            // Both streams end only when the runtime shuts down.
            else => std::future::pending().await,
        }
    }
}

impl Stop {
    pub fn name(self) -> &'static str {
        match self {
            Stop::Term => "SIGTERM",
            Stop::Int => "SIGINT",
        }
    }

    /// The status of an exit on a second signal: 128 + the signal number,
    /// what a shell reports for a process the signal killed.
    pub fn exit_code(self) -> i32 {
        128 + match self {
            Stop::Term => libc::SIGTERM,
            Stop::Int => libc::SIGINT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Stop;

    #[test]
    fn second_signal_exit_codes_are_128_plus_the_signal_number() {
        assert_eq!(Stop::Term.exit_code(), 143);
        assert_eq!(Stop::Int.exit_code(), 130);
        assert_eq!(Stop::Term.name(), "SIGTERM");
        assert_eq!(Stop::Int.name(), "SIGINT");
    }
}
