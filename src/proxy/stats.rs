//! Live connection counters, read by `GetStatus` and the metrics endpoint.
//! Plain atomics: the hot path does a few relaxed increments, never a lock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use crate::metrics::{ListenerMetrics, Metrics};

#[derive(Debug)]
pub struct Stats {
    pub started_at: SystemTime,
    /// Every accepted connection, blocked ones included.
    pub total_connections: AtomicI64,
    /// Connections accepted and not yet closed.
    pub active_connections: AtomicI64,
    /// Connections the firewall refused.
    pub blocked_connections: AtomicI64,
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
    /// listener's total and active counts too ([`ListenerStats::total`],
    /// [`ListenerStats::active`]): one counter each, read by both
    /// `GetStatus` and `/metrics`.
    pub metrics: ListenerMetrics,
}

impl ListenerStats {
    /// Connections accepted on this listener since start.
    pub fn total(&self) -> i64 {
        self.metrics.total()
    }

    /// Connections on this listener whose task is still alive.
    pub fn active(&self) -> i64 {
        self.metrics.active()
    }
}

impl Stats {
    pub fn new(listener_addrs: impl IntoIterator<Item = String>) -> Stats {
        let addrs: Vec<String> = listener_addrs.into_iter().collect();
        let metrics = Arc::new(Metrics::new(&addrs, &crate::server::version()));
        Stats {
            started_at: SystemTime::now(),
            total_connections: AtomicI64::new(0),
            active_connections: AtomicI64::new(0),
            blocked_connections: AtomicI64::new(0),
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
}

/// Counts one connection as active for as long as it lives.
pub struct ActiveGuard {
    stats: Arc<Stats>,
    listener: Arc<ListenerStats>,
}

impl ActiveGuard {
    /// Counts an accepted connection (total and active, global and per listener).
    pub fn accept(stats: &Arc<Stats>, listener: &Arc<ListenerStats>) -> ActiveGuard {
        stats.total_connections.fetch_add(1, Ordering::Relaxed);
        stats.active_connections.fetch_add(1, Ordering::Relaxed);
        listener.metrics.accepted();
        ActiveGuard {
            stats: stats.clone(),
            listener: listener.clone(),
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.stats
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
        self.listener.metrics.released();
    }
}
