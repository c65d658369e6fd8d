//! Live connection counters, read by `GetStatus` and the metrics endpoint.
//! Each count lives once, in a listener's metric handles (plain atomics:
//! the hot path does a few relaxed increments, never a lock); the
//! process-wide figures are their sums.

use std::sync::Arc;
use std::time::SystemTime;

use crate::metrics::{ListenerMetrics, Metrics};

#[derive(Debug)]
pub struct Stats {
    pub started_at: SystemTime,
    /// One entry per bound listener, in config order.
    pub listeners: Vec<Arc<ListenerStats>>,
    /// The Prometheus metrics (kept whether or not `[metrics]` serves them).
    pub metrics: Arc<Metrics>,
}

#[derive(Debug)]
pub struct ListenerStats {
    /// The listener's `addr` exactly as written in the config.
    pub addr: String,
    /// This listener's metric handles, resolved at start. They hold the
    /// listener's total and active counts too (`metrics.total()`,
    /// `metrics.active()`): one counter each, read by both `GetStatus` and
    /// `/metrics`.
    pub metrics: ListenerMetrics,
}

impl Stats {
    pub fn new(listener_addrs: impl IntoIterator<Item = String>) -> Stats {
        let addrs: Vec<String> = listener_addrs.into_iter().collect();
        let metrics = Arc::new(Metrics::new(&addrs, &crate::server::version()));
        Stats {
            started_at: SystemTime::now(),
            listeners: addrs
                .into_iter()
                .zip(metrics.listeners().iter().cloned())
                .map(|(addr, metrics)| Arc::new(ListenerStats { addr, metrics }))
                .collect(),
            metrics,
        }
    }

    pub fn listener(&self, addr: &str) -> Option<&Arc<ListenerStats>> {
        self.listeners.iter().find(|l| l.addr == addr)
    }

    /// Every accepted connection, blocked ones included.
    pub fn total_connections(&self) -> i64 {
        self.sum(ListenerMetrics::total)
    }

    /// Connections accepted and not yet closed.
    pub fn active_connections(&self) -> i64 {
        self.sum(ListenerMetrics::active)
    }

    /// Connections the firewall refused.
    pub fn blocked_connections(&self) -> i64 {
        self.sum(ListenerMetrics::blocked)
    }

    fn sum(&self, count: fn(&ListenerMetrics) -> i64) -> i64 {
        self.listeners
            .iter()
            .map(|l| count(&l.metrics))
            .fold(0, i64::saturating_add)
    }
}

/// Counts one connection as active for as long as it lives.
pub struct ActiveGuard {
    listener: Arc<ListenerStats>,
}

impl ActiveGuard {
    /// Counts an accepted connection (total and active) on its listener.
    pub fn accept(listener: &Arc<ListenerStats>) -> ActiveGuard {
        listener.metrics.accepted();
        ActiveGuard {
            listener: listener.clone(),
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.listener.metrics.released();
    }
}
