//! Active health checks (SPEC §6.3): a TCP connect, or on an L7 route with
//! `health_path` a `GET` expecting 2xx/3xx, every `health_interval`; down
//! after `health_fall` failures in a row, up after `health_rise` successes.
//!
//! One [`Schedule`] for the process: a heap of due times, served by one
//! task ([`run`]) that starts each due probe on a task of its own, at most
//! [`MAX_PROBES_IN_FLIGHT`] at once, so the number of tasks is bounded
//! whatever the number of routes. A check's first probe is at a point of
//! its interval derived from its key, so 30,000 checks of one interval are
//! spread over it instead of firing together. Identical checks (same
//! backend, settings and, for HTTP, route) are one check, shared.
//!
//! The schedule holds checks weakly: a check lives as long as a route's
//! member holds it, and a removed or changed route's check is dropped from
//! the heap the next time it comes due.
//!
//! How a probe is made is the proxy's ([`Prober`]); this module only keeps
//! time and state.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use wire::route::{Backend, HealthCheck, Hostname, L7Route, Target};

use super::{error_text, Node};

/// Probes running at once, process-wide.
pub const MAX_PROBES_IN_FLIGHT: usize = 64;

/// What a probe does.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Probe {
    /// Connect, then close.
    Tcp,
    /// `GET path` with `Host: host`, through the route's upstream settings.
    Http {
        path: Box<str>,
        host: Box<str>,
        l7: Arc<L7Route>,
    },
}

/// What identifies a check: identical keys share one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CheckKey {
    pub backend: Backend,
    pub probe: Probe,
    pub interval: Duration,
    pub fall: u32,
    pub rise: u32,
}

impl CheckKey {
    /// The check a route's settings ask for on one of its backends. An
    /// HTTP check's `Host` is the route's hostname, or the backend's host
    /// for a wildcard or default route.
    pub fn new(
        hostname: &Hostname,
        target: &Target,
        backend: &Backend,
        settings: &HealthCheck,
    ) -> Self {
        let probe = match (target.mode.l7(), &settings.path) {
            (Some(l7), Some(path)) => {
                let host = if hostname.is_wildcard() {
                    backend.host_port().0
                } else {
                    hostname.as_str().to_string()
                };
                Probe::Http {
                    path: path.clone(),
                    host: host.into(),
                    l7: l7.clone(),
                }
            }
            _ => Probe::Tcp,
        };
        CheckKey {
            backend: backend.clone(),
            probe,
            interval: settings.interval,
            fall: settings.fall,
            rise: settings.rise,
        }
    }
}

/// One active check's state.
#[derive(Debug)]
pub struct Check {
    key: CheckKey,
    node: Arc<Node>,
    up: AtomicBool,
    /// Failures (when up) or successes (when down) in a row.
    streak: AtomicU32,
    last_error: Mutex<Option<Arc<str>>>,
}

impl Check {
    pub fn key(&self) -> &CheckKey {
        &self.key
    }

    /// Up until `fall` probes in a row fail (a new check starts up).
    pub fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<Arc<str>> {
        if self.up() {
            return None;
        }
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A probe's result. Only the schedule calls this, one probe of a
    /// check at a time.
    fn record(&self, result: Result<(), String>) {
        let up = self.up();
        match (up, result) {
            (true, Ok(())) => self.streak.store(0, Ordering::Relaxed),
            (false, Ok(())) => {
                let streak = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
                if streak >= self.key.rise {
                    self.streak.store(0, Ordering::Relaxed);
                    self.up.store(true, Ordering::Relaxed);
                    self.node.checks_down.fetch_sub(1, Ordering::Relaxed);
                    self.node.came_up.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        target: "mc_proxy::backend",
                        backend = %self.key.backend,
                        check = self.describe(),
                        passes = streak,
                        "backend up: health check passed"
                    );
                }
            }
            (true, Err(error)) => {
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(error_text(&error));
                let streak = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
                if streak >= self.key.fall {
                    self.streak.store(0, Ordering::Relaxed);
                    self.up.store(false, Ordering::Relaxed);
                    self.node.checks_down.fetch_add(1, Ordering::Relaxed);
                    self.node.went_down.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        target: "mc_proxy::backend",
                        backend = %self.key.backend,
                        check = self.describe(),
                        failures = streak,
                        error,
                        "backend down: health check failed"
                    );
                }
            }
            (false, Err(error)) => {
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(error_text(&error));
                self.streak.store(0, Ordering::Relaxed);
            }
        }
    }

    fn describe(&self) -> String {
        match &self.key.probe {
            Probe::Tcp => "tcp".to_string(),
            Probe::Http { path, host, .. } => format!("GET {path} Host: {host}"),
        }
    }
}

impl Drop for Check {
    fn drop(&mut self) {
        if !self.up() {
            self.node.checks_down.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A heap entry: a check and when it is due.
struct Due {
    at: Instant,
    seq: u64,
    check: Weak<Check>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Heap {
    due: BinaryHeap<Reverse<Due>>,
    seq: u64,
    /// Dead checks popped since the registry was last swept.
    dead: usize,
}

impl Heap {
    fn push(&mut self, at: Instant, check: Weak<Check>) {
        self.seq += 1;
        self.due.push(Reverse(Due {
            at,
            seq: self.seq,
            check,
        }));
    }
}

/// The process's active checks and when each is next due.
#[derive(Default)]
pub struct Schedule {
    heap: Mutex<Heap>,
    checks: Mutex<HashMap<CheckKey, Weak<Check>>>,
    wake: Notify,
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule")
            .field("checks", &self.len())
            .finish()
    }
}

impl Schedule {
    /// The check for a key: the existing one, or a new one scheduled at its
    /// spread offset within the interval.
    pub fn check(&self, key: CheckKey, node: &Arc<Node>) -> Arc<Check> {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(check) = checks.get(&key).and_then(Weak::upgrade) {
            return check;
        }
        let first = Instant::now() + spread(&key);
        let check = Arc::new(Check {
            key: key.clone(),
            node: node.clone(),
            up: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            last_error: Mutex::new(None),
        });
        checks.insert(key, Arc::downgrade(&check));
        drop(checks);
        self.heap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(first, Arc::downgrade(&check));
        self.wake.notify_one();
        check
    }

    /// Checks alive (held by some route).
    pub fn len(&self) -> usize {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        checks.values().filter(|c| c.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next due check, or when to look again (`None`: nothing queued).
    fn pop_due(&self, now: Instant) -> Result<(Instant, Arc<Check>), Option<Instant>> {
        let mut heap = self.heap.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let Some(Reverse(next)) = heap.due.peek() else {
                return Err(None);
            };
            if next.at > now {
                return Err(Some(next.at));
            }
            let Some(Reverse(due)) = heap.due.pop() else {
                return Err(None);
            };
            match due.check.upgrade() {
                Some(check) => return Ok((due.at, check)),
                None => {
                    heap.dead += 1;
                    self.forget_dead(&mut heap.dead);
                }
            }
        }
    }

    /// Drops registry entries of checks no route holds, once the dead
    /// checks popped since the last sweep are half the registry: a sweep
    /// is O(registry), so sweeping on every dead pop made replacing a
    /// table of n checks O(n²). Until then a dead entry only takes room
    /// ([`Schedule::check`] and [`Schedule::len`] skip it).
    fn forget_dead(&self, dead: &mut usize) {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        if *dead * 2 >= checks.len() {
            checks.retain(|_, c| c.strong_count() > 0);
            *dead = 0;
        }
    }

    fn requeue(&self, at: Instant, check: &Arc<Check>) {
        self.heap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(at, Arc::downgrade(check));
        self.wake.notify_one();
    }
}

/// The first probe's offset within the interval: a function of the key,
/// so checks are spread evenly and a restart keeps their phase.
fn spread(key: &CheckKey) -> Duration {
    let hash =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(key);
    let millis = key.interval.as_millis().max(1) as u64;
    Duration::from_millis(hash % millis)
}

/// A boxed probe future.
pub type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// How probes are made (the proxy's connect and HTTP client).
pub trait Prober: Send + Sync + 'static {
    /// Probes once; `Err` says why it failed. Bounded by `deadline`.
    fn probe(&self, key: &CheckKey, deadline: Duration) -> ProbeFuture;
}

/// Runs the schedule until `cancel`: each due check is probed on a task
/// of its own (at most [`MAX_PROBES_IN_FLIGHT`] at once) and queued again
/// one interval after it was due (or at once, if that has passed), so a
/// check's probes never overlap. A probe takes at most its interval.
pub async fn run(schedule: Arc<Schedule>, prober: Arc<dyn Prober>, cancel: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_PROBES_IN_FLIGHT));
    loop {
        let now = Instant::now();
        match schedule.pop_due(now) {
            Ok((due, check)) => {
                let permit = tokio::select! {
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                    _ = cancel.cancelled() => return,
                };
                let schedule = schedule.clone();
                let prober = prober.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    let interval = check.key.interval;
                    let probe = prober.probe(&check.key, interval);
                    let result = tokio::select! {
                        result = tokio::time::timeout(interval, probe) => match result {
                            Ok(result) => result,
                            Err(_) => Err(format!("no answer within {}", humantime::format_duration(interval))),
                        },
                        _ = cancel.cancelled() => return,
                    };
                    check.record(result);
                    drop(permit);
                    let next = (due + interval).max(Instant::now());
                    schedule.requeue(next, &check);
                });
            }
            Err(next) => {
                let sleep = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = sleep => {}
                    _ = schedule.wake.notified() => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
    }
}
