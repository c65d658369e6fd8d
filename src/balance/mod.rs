//! Backend pools' live state (SPEC §6.3): which backend a connection tries,
//! in what order, and what is known of each backend's health.
//!
//! - A [`Node`] is one backend address, shared by every route that names
//!   it: its passive health (a connect failure marks it down for a backoff
//!   of 1 s doubling to 30 s; a success marks it up) and its counters.
//! - A [`Member`] is one backend of one route: the node, the route's active
//!   check of it (if any), and the route's counters for it.
//! - A [`Pool`] is one route's members, its balance rule and its
//!   round-robin position. [`Pool::attempts`] gives the backends a
//!   connection tries, in order: healthy ones first (round robin, or fewest
//!   open connections), then, when none is left, the down ones (fail open),
//!   never more than `connect_attempts`.
//!
//! The hot path (picking, leasing, reporting a connect result) is atomics
//! only: no lock, no allocation. Locks are taken when a route table is
//! replaced (pools are rebuilt, members reused by backend so their state
//! survives), on a connect failure (the node's last error) and by reports.
//!
//! Active checks live in [`health`]: one schedule for the process, probes
//! on a bounded number of tasks.

pub mod checks;
pub mod health;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use wire::route::{Backend, Balance, Hostname, Target};

use self::health::{Check, CheckKey, Schedule};

/// The first passive backoff; it doubles per failure in a row.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// The longest passive backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Milliseconds since the process's first use of this module, never 0.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// The error text kept as a backend's last error (bounded).
fn error_text(error: &str) -> Arc<str> {
    const MAX: usize = 256;
    if error.len() <= MAX {
        return error.into();
    }
    let mut end = MAX;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    error[..end].into()
}

/// One backend address's shared state.
#[derive(Debug)]
pub struct Node {
    backend: Backend,
    /// When the passive backoff ends ([`now_ms`]); 0 = up.
    down_until: AtomicU64,
    /// The current backoff in ms; 0 = up.
    backoff: AtomicU64,
    last_error: Mutex<Option<Arc<str>>>,
    /// Active checks of this address that say down.
    checks_down: AtomicU32,
    open: AtomicI64,
    total: AtomicU64,
    failures: AtomicU64,
    went_down: AtomicU64,
    came_up: AtomicU64,
}

impl Node {
    fn new(backend: Backend) -> Self {
        Node {
            backend,
            down_until: AtomicU64::new(0),
            backoff: AtomicU64::new(0),
            last_error: Mutex::new(None),
            checks_down: AtomicU32::new(0),
            open: AtomicI64::new(0),
            total: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            went_down: AtomicU64::new(0),
            came_up: AtomicU64::new(0),
        }
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Not in a passive backoff (its end is a second chance: the next
    /// connection may try it).
    fn passive_up(&self) -> bool {
        let until = self.down_until.load(Ordering::Relaxed);
        until == 0 || now_ms() >= until
    }

    /// Up as far as the metrics say: no passive backoff running and no
    /// active check saying down.
    pub fn up(&self) -> bool {
        self.passive_up() && self.checks_down.load(Ordering::Relaxed) == 0
    }

    pub fn last_error(&self) -> Option<Arc<str>> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_last_error(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error_text(error));
    }

    /// A connect to it failed: down for the next backoff.
    pub fn connect_failed(&self, error: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.set_last_error(error);
        let first = BACKOFF_FIRST.as_millis() as u64;
        let max = BACKOFF_MAX.as_millis() as u64;
        let previous = self.backoff.load(Ordering::Relaxed);
        let next = if previous == 0 {
            first
        } else {
            (previous * 2).min(max)
        };
        self.backoff.store(next, Ordering::Relaxed);
        self.down_until.store(now_ms() + next, Ordering::Relaxed);
        if previous == 0 {
            self.went_down.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                target: "mc_proxy::backend",
                backend = %self.backend,
                error,
                retry_in_ms = next,
                "backend down: connect failed"
            );
        } else {
            tracing::debug!(
                target: "mc_proxy::backend",
                backend = %self.backend,
                error,
                retry_in_ms = next,
                "backend still down"
            );
        }
    }

    /// A connect to it succeeded: up, the backoff reset.
    pub fn connected(&self) {
        // One load when nothing changes (the common case).
        if self.backoff.load(Ordering::Relaxed) != 0 && self.backoff.swap(0, Ordering::Relaxed) != 0
        {
            self.down_until.store(0, Ordering::Relaxed);
            self.came_up.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                target: "mc_proxy::backend",
                backend = %self.backend,
                "backend up: connect succeeded"
            );
        }
    }

    /// Counters for the metrics.
    pub fn counts(&self) -> NodeCounts {
        NodeCounts {
            up: self.up(),
            open: self.open.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            went_down: self.went_down.load(Ordering::Relaxed),
            came_up: self.came_up.load(Ordering::Relaxed),
        }
    }
}

/// A node's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCounts {
    pub up: bool,
    pub open: i64,
    pub total: u64,
    pub failures: u64,
    /// Transitions to down and back up (passive and active).
    pub went_down: u64,
    pub came_up: u64,
}

/// A route's counters for one of its backends; shared by the member's
/// successive versions, so they survive route updates.
#[derive(Debug, Default)]
struct Counts {
    active: AtomicI64,
    total: AtomicU64,
}

/// One backend of one route.
#[derive(Debug)]
pub struct Member {
    node: Arc<Node>,
    check: Option<Arc<Check>>,
    counts: Arc<Counts>,
}

impl Member {
    pub fn backend(&self) -> &Backend {
        &self.node.backend
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Takes new connections: no passive backoff, and the active check
    /// (if any) says up.
    pub fn healthy(&self) -> bool {
        self.node.passive_up() && self.check.as_ref().is_none_or(|c| c.up())
    }

    /// Connections open through this route to it.
    pub fn active(&self) -> i64 {
        self.counts.active.load(Ordering::Relaxed)
    }

    /// Counts a connection to it (open until the lease drops).
    pub fn lease(&self) -> Lease {
        self.counts.active.fetch_add(1, Ordering::Relaxed);
        self.counts.total.fetch_add(1, Ordering::Relaxed);
        self.node.open.fetch_add(1, Ordering::Relaxed);
        self.node.total.fetch_add(1, Ordering::Relaxed);
        Lease {
            counts: self.counts.clone(),
            node: self.node.clone(),
        }
    }

    /// The error behind its being down: the active check's, else the
    /// last connect failure's.
    fn last_error(&self) -> Option<Arc<str>> {
        self.check
            .as_ref()
            .and_then(|c| c.last_error())
            .or_else(|| self.node.last_error())
    }
}

/// An open connection to a member; dropping it closes the count.
#[derive(Debug)]
pub struct Lease {
    counts: Arc<Counts>,
    node: Arc<Node>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.counts.active.fetch_sub(1, Ordering::Relaxed);
        self.node.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One route's live pool.
#[derive(Debug)]
pub struct Pool {
    members: Box<[Member]>,
    balance: Balance,
    next: Arc<AtomicUsize>,
}

impl Pool {
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The members a connection tries, in order, at most `max`.
    pub fn attempts(&self, max: usize) -> Attempts<'_> {
        let start = if self.members.len() > 1 {
            self.start(self.next.fetch_add(1, Ordering::Relaxed))
        } else {
            0
        };
        Attempts {
            pool: self,
            start,
            tried: 0,
            left: max.max(1),
        }
    }

    /// Where a connection's search starts, for its round-robin `ticket`:
    /// the ticket-th healthy member, counted among the healthy ones only
    /// when some are down. (Counting over all members would hand a down
    /// member's turns to the healthy member after it: with one of three
    /// down, one live backend got two thirds of the connections.)
    fn start(&self, ticket: usize) -> usize {
        let n = self.members.len();
        let healthy = self.members.iter().filter(|m| m.healthy()).count();
        if healthy == 0 || healthy == n {
            return ticket % n;
        }
        let nth = ticket % healthy;
        self.members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.healthy())
            .nth(nth)
            .map_or(ticket % n, |(i, _)| i)
    }
}

/// The order a connection tries a pool's members in: each [`Iterator::next`]
/// picks among the untried ones by the balance rule, healthy ones first.
/// Constant space (a bitmask: a pool has at most 64 members), O(members)
/// per pick.
#[derive(Debug)]
pub struct Attempts<'a> {
    pool: &'a Pool,
    start: usize,
    tried: u64,
    left: usize,
}

impl<'a> Attempts<'a> {
    fn pick(&self, healthy: bool) -> Option<usize> {
        let members = &self.pool.members;
        let n = members.len();
        let mut best: Option<(usize, i64)> = None;
        for offset in 0..n {
            let i = (self.start + offset) % n;
            if self.tried & (1 << i) != 0 || members[i].healthy() != healthy {
                continue;
            }
            match self.pool.balance {
                Balance::RoundRobin => return Some(i),
                Balance::LeastConnections => {
                    let active = members[i].active();
                    if best.is_none_or(|(_, fewest)| active < fewest) {
                        best = Some((i, active));
                    }
                }
            }
        }
        best.map(|(i, _)| i)
    }
}

impl<'a> Iterator for Attempts<'a> {
    type Item = &'a Member;

    fn next(&mut self) -> Option<&'a Member> {
        if self.left == 0 {
            return None;
        }
        let i = self.pick(true).or_else(|| self.pick(false))?;
        self.tried |= 1 << i;
        self.left -= 1;
        Some(&self.pool.members[i])
    }
}

/// A route as the live table holds it: its target and its pool.
#[derive(Debug)]
pub struct Route {
    /// The route's hostname (the exact name, the wildcard, or `*`).
    pub name: Arc<str>,
    pub target: Arc<Target>,
    pub pool: Pool,
}

/// One backend of one route, as `ListBackends` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendReport {
    pub hostname: Hostname,
    pub backend: Backend,
    pub healthy: bool,
    pub active_connections: i64,
    pub total_connections: u64,
    pub last_error: Option<String>,
}

impl Route {
    /// Its members' state, in the route's backend order.
    pub fn report(&self, hostname: &Hostname) -> impl Iterator<Item = BackendReport> + '_ {
        let hostname = hostname.clone();
        self.pool.members.iter().map(move |m| BackendReport {
            hostname: hostname.clone(),
            backend: m.backend().clone(),
            healthy: m.healthy(),
            active_connections: m.active(),
            total_connections: m.counts.total.load(Ordering::Relaxed),
            last_error: m.last_error().map(|e| e.to_string()),
        })
    }
}

/// The process's pools: the backend nodes and the active-check schedule.
#[derive(Debug, Default)]
pub struct Balancer {
    nodes: Mutex<HashMap<Backend, Weak<Node>>>,
    schedule: Arc<Schedule>,
}

impl Balancer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The active-check schedule (run by [`health::run`]).
    pub fn schedule(&self) -> &Arc<Schedule> {
        &self.schedule
    }

    /// The node for an address, shared while any route names it.
    fn node(&self, backend: &Backend) -> Arc<Node> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(node) = nodes.get(backend).and_then(Weak::upgrade) {
            return node;
        }
        // Forget the addresses no route names any more, now and then.
        if nodes.len() >= 64 && nodes.len().is_power_of_two() {
            nodes.retain(|_, node| node.strong_count() > 0);
        }
        let node = Arc::new(Node::new(backend.clone()));
        nodes.insert(backend.clone(), Arc::downgrade(&node));
        node
    }

    /// Every backend address some route names.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let mut live: Vec<_> = nodes.values().filter_map(Weak::upgrade).collect();
        live.sort_by_key(|n| n.backend.to_string());
        live
    }

    /// The live route for a target. `old` is the route the hostname had:
    /// unchanged, it is kept whole; changed, the members of backends still
    /// listed keep their node, counters and (same settings) active check.
    pub fn route(
        &self,
        hostname: &Hostname,
        target: &Arc<Target>,
        old: Option<&Arc<Route>>,
    ) -> Arc<Route> {
        if let Some(old) = old.filter(|old| Arc::ptr_eq(&old.target, target)) {
            return old.clone();
        }
        let members = target
            .backends
            .iter()
            .map(|backend| {
                let prior =
                    old.and_then(|o| o.pool.members.iter().find(|m| m.backend() == backend));
                let node = match prior {
                    Some(m) => m.node.clone(),
                    None => self.node(backend),
                };
                let check = target.health.as_ref().map(|settings| {
                    let key = CheckKey::new(hostname, target, backend, settings);
                    self.schedule.check(key, &node)
                });
                Member {
                    node,
                    check,
                    counts: prior.map(|m| m.counts.clone()).unwrap_or_default(),
                }
            })
            .collect();
        Arc::new(Route {
            name: hostname.as_str().into(),
            target: target.clone(),
            pool: Pool {
                members,
                balance: target.balance,
                next: old.map(|o| o.pool.next.clone()).unwrap_or_default(),
            },
        })
    }
}

#[cfg(test)]
mod tests;
