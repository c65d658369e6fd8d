//! Signals, drain, force-close.
//!
//! Owns the connections' lifecycle: [`Shutdown`] is two cancellation tokens
//! (`draining`: accept loops stop and drop their sockets; `forced`: relays
//! close what is still open) and the tracker of every accept-loop and
//! connection task, so [`Shutdown::drain`] knows when the last one is gone.
//! Also owns the signal streams ([`Signals`]), installed before anything is
//! bound. Never decides when to stop: the server does.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long forced connections get to close after `forced` is cancelled
/// (they close on their next poll).
const FORCED_GRACE: Duration = Duration::from_secs(5);

/// The lifecycle shared by the server, its accept loops and every
/// connection task; clones are handles to the same state.
#[derive(Clone, Default)]
pub struct Shutdown {
    draining: CancellationToken,
    forced: CancellationToken,
    tasks: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Cancelled when the server starts draining: listening sockets close,
    /// established connections may finish.
    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    /// Cancelled when the drain runs out of time: everything still open is
    /// closed now.
    pub fn forced(&self) -> &CancellationToken {
        &self.forced
    }

    /// Spawns a task that [`Shutdown::drain`] waits for.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Starts draining, waits up to `timeout` for every tracked task to
    /// end, then forces the rest closed and waits (at most
    /// `FORCED_GRACE`, 5 s) for them to go. Returns whether it had to force.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.draining.cancel();
        self.tasks.close();
        if tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_ok()
        {
            return false;
        }
        self.forced.cancel();
        let _ = tokio::time::timeout(FORCED_GRACE, self.tasks.wait()).await;
        true
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
    use std::time::Duration;

    use super::{Shutdown, Stop};

    #[tokio::test]
    async fn drain_waits_for_tracked_tasks_and_forces_the_rest() {
        // A task that ends on its own once draining starts: no force.
        let shutdown = Shutdown::new();
        let draining = shutdown.draining().clone();
        let polite = shutdown.spawn(async move { draining.cancelled().await });
        assert!(!shutdown.drain(Duration::from_secs(10)).await);
        assert!(polite.is_finished());
        assert!(!shutdown.forced().is_cancelled());

        // A task that only ends when forced: drain forces, then it is gone.
        let shutdown = Shutdown::new();
        let forced = shutdown.forced().clone();
        let stubborn = shutdown.spawn(async move { forced.cancelled().await });
        assert!(shutdown.drain(Duration::from_millis(50)).await);
        assert!(shutdown.draining().is_cancelled());
        assert!(stubborn.is_finished());
    }

    #[tokio::test]
    async fn drain_with_nothing_open_returns_at_once_unforced() {
        let shutdown = Shutdown::new();
        assert!(!shutdown.drain(Duration::from_secs(3600)).await);
    }

    #[test]
    fn second_signal_exit_codes_are_128_plus_the_signal_number() {
        assert_eq!(Stop::Term.exit_code(), 143);
        assert_eq!(Stop::Int.exit_code(), 130);
        assert_eq!(Stop::Term.name(), "SIGTERM");
        assert_eq!(Stop::Int.name(), "SIGINT");
    }
}
