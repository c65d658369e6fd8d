//! The global cap on client connections (`[proxy] max_connections`) and the
//! descriptor budget behind it.
//!
//! Owns: raising the soft `RLIMIT_NOFILE` to the hard limit at start, the
//! derived default cap, the share of descriptors left to splice pipes, and
//! the slots that every listener's accept loop takes *before* it accepts.
//! Never: accepts a connection and then drops it for want of a slot. At the
//! cap the accept loops simply stop calling `accept`, so new connections
//! wait in the kernel's listen backlog, and each closing connection lets
//! one more in.
//!
//! # The budget
//!
//! A relayed connection holds two descriptors (client and backend). At start
//! the server counts the descriptors it already holds (`in_use`: its
//! sockets, the database, the log) and derives
//! `max_connections = 90 % of (limit − in_use) / 2`. Of the 10 % left, half
//! may go to splice pipes (two descriptors each, see `relay.rs`), the rest
//! stays for everything else that opens a descriptor while serving: a
//! backend connect racing a second address, admin and metrics connections,
//! a GeoIP reload. So client connections never drive `accept` into EMFILE.
//! The budget is taken once, at start: a limit lowered later (`prlimit` on
//! the running process) is not followed, and then the accept loop's EMFILE
//! back-off is what keeps it from spinning.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::CapacityMetrics;

/// Descriptors one relayed connection holds: client and backend.
const FDS_PER_CONNECTION: u64 = 2;
/// Descriptors one splice pipe holds.
const FDS_PER_PIPE: u64 = 2;
/// Assumed in use when the process cannot list its own descriptors.
const FALLBACK_IN_USE: u64 = 64;
/// The pause warning is logged at most this often (the metric counts
/// every pause).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The descriptor limit and what the process already uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// The soft `RLIMIT_NOFILE` in force (after raising it).
    pub limit: u64,
    /// Descriptors open when measured.
    pub in_use: u64,
}

/// What the budget is spent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Client connections open at once over all listeners.
    pub max_connections: usize,
    /// Whether `max_connections` was derived (the config said 0).
    pub derived: bool,
    /// What the descriptor budget allows at two descriptors a connection
    /// (the derived value, whether or not it is the one used).
    pub affordable: usize,
    /// Splice pipes that may exist at once (at most `pipes_max`).
    pub pipes: usize,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as Go programs and
/// many servers do: the soft limit (often 1024) exists for programs that
/// use `select(2)`, which this one does not, and the hard limit is what the
/// operator allowed (systemd's `LimitNOFILE=`, docker's `--ulimit`).
/// Returns the soft limit before and after.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let (before, _) = rlimit::Resource::NOFILE.get()?;
    let after = rlimit::increase_nofile_limit(u64::MAX)?;
    Ok((before, after))
}

impl FdBudget {
    /// The soft `RLIMIT_NOFILE` now and the descriptors this process holds.
    pub fn measure() -> std::io::Result<FdBudget> {
        let (limit, _) = rlimit::Resource::NOFILE.get()?;
        Ok(FdBudget {
            limit,
            in_use: open_descriptors().unwrap_or(FALLBACK_IN_USE),
        })
    }

    /// Splits the budget: the cap on connections (`configured`, else
    /// derived) and the pipes that fit beside it, at most `pipes_max`.
    pub fn plan(self, configured: Option<NonZeroU32>, pipes_max: usize) -> Plan {
        let spare = self.limit.saturating_sub(self.in_use);
        let affordable = to_usize(spare.saturating_mul(9) / 10 / FDS_PER_CONNECTION).max(1);
        let max_connections = configured
            .map_or(affordable, |n| to_usize(u64::from(n.get())))
            .min(Semaphore::MAX_PERMITS);
        let promised = u64::try_from(max_connections)
            .unwrap_or(u64::MAX)
            .saturating_mul(FDS_PER_CONNECTION);
        let headroom = spare.saturating_sub(promised);
        Plan {
            max_connections,
            derived: configured.is_none(),
            affordable,
            pipes: to_usize(headroom / 2 / FDS_PER_PIPE).min(pipes_max),
        }
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Descriptors this process holds (the directory listing's own excluded).
fn open_descriptors() -> Option<u64> {
    ["/proc/self/fd", "/dev/fd"].iter().find_map(|dir| {
        let entries = std::fs::read_dir(dir).ok()?;
        Some((entries.count() as u64).saturating_sub(1))
    })
}

/// The slots all listeners share: one per client connection, taken before
/// `accept` and held by the connection's task until it ends.
#[derive(Debug)]
pub struct Capacity {
    slots: Arc<Semaphore>,
    max: usize,
    /// When the pause warning was last logged: milliseconds after `epoch`,
    /// plus one (0 = never). At the cap every accept pauses; the warning
    /// goes out once per [`WARN_EVERY`], not once per connection.
    warned_at: AtomicU64,
    /// Pauses since the last warning.
    pauses: AtomicU64,
    epoch: Instant,
    metrics: CapacityMetrics,
}

impl Capacity {
    /// `max` connections at once (at least one).
    pub fn new(max: usize, metrics: CapacityMetrics) -> Capacity {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        metrics.set_max(max);
        Capacity {
            slots: Arc::new(Semaphore::new(max)),
            max,
            warned_at: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }

    /// A slot for the next connection `listener` accepts, waiting for a
    /// connection to close when all are taken. `None` only if the slots were
    /// closed, which nothing does.
    pub async fn slot(&self, listener: &str) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        self.paused(listener);
        self.slots.clone().acquire_owned().await.ok()
    }

    /// Counts a pause, and warns unless a warning went out less than
    /// [`WARN_EVERY`] ago.
    fn paused(&self, listener: &str) {
        self.metrics.paused();
        let pauses = self.pauses.fetch_add(1, Ordering::Relaxed) + 1;
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let last = self.warned_at.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64;
        if due
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.pauses.fetch_sub(pauses, Ordering::Relaxed);
            tracing::warn!(
                listener,
                max_connections = self.max,
                pauses,
                "max_connections reached: accepting paused until connections close \
                 (new clients wait in the listen backlog; logged at most once a minute)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn budget(limit: u64, in_use: u64) -> FdBudget {
        FdBudget { limit, in_use }
    }

    #[test]
    fn derived_cap_is_ninety_percent_of_the_spare_descriptors_at_two_each() {
        // The packaged unit's LimitNOFILE=65536, 20 in use.
        let plan = budget(65_536, 20).plan(None, 1024);
        assert_eq!(plan.max_connections, 29_482);
        assert!(plan.derived);
        assert_eq!(plan.affordable, plan.max_connections);
        assert_eq!(plan.pipes, 1024);
        // A 1024 soft limit: 451 connections, 25 pipes (100 descriptors
        // left over for pipes and the rest).
        let plan = budget(1024, 20).plan(None, 1024);
        assert_eq!(plan.max_connections, 451);
        assert_eq!(plan.pipes, 25);
        // Connections, pipes and a margin fit in the limit.
        for (limit, in_use) in [(64, 15), (128, 15), (1024, 20), (20_000, 30), (1 << 20, 40)] {
            let plan = budget(limit, in_use).plan(None, 1024);
            let spent = in_use + 2 * plan.max_connections as u64 + 2 * plan.pipes as u64;
            assert!(
                spent + (limit - in_use) / 20 <= limit,
                "{limit}/{in_use}: {plan:?}"
            );
        }
    }

    #[test]
    fn a_configured_cap_wins_and_pipes_get_what_it_leaves() {
        let plan = budget(1024, 20).plan(NonZeroU32::new(100), 1024);
        assert_eq!(plan.max_connections, 100);
        assert!(!plan.derived);
        assert_eq!(plan.affordable, 451);
        assert_eq!(plan.pipes, (1004 - 200) / 4);
        // Over what the descriptors allow: no room for pipes at all.
        let plan = budget(1024, 20).plan(NonZeroU32::new(5000), 1024);
        assert_eq!(plan.max_connections, 5000);
        assert_eq!(plan.pipes, 0);
    }

    #[test]
    fn a_limit_at_or_below_what_is_in_use_still_allows_one() {
        assert_eq!(budget(10, 10).plan(None, 1024).max_connections, 1);
        assert_eq!(budget(10, 50).plan(None, 1024).max_connections, 1);
        assert_eq!(budget(10, 50).plan(None, 1024).pipes, 0);
    }

    #[test]
    fn this_process_can_count_its_descriptors() {
        let before = open_descriptors().expect("count");
        let files: Vec<_> = (0..100)
            .map(|_| std::fs::File::open("Cargo.toml").unwrap())
            .collect();
        // Other tests open and close a few sockets meanwhile.
        let after = open_descriptors().expect("count");
        assert!(
            (before + 90..=before + 110).contains(&after),
            "{before} then {after}"
        );
        drop(files);
        let measured = FdBudget::measure().unwrap();
        assert!(measured.limit >= measured.in_use, "{measured:?}");
    }

    #[tokio::test]
    async fn at_the_cap_a_slot_waits_for_a_close_and_the_pause_is_counted() {
        let metrics = CapacityMetrics::default();
        let capacity = Arc::new(Capacity::new(2, metrics.clone()));
        let first = capacity.slot("l").await.unwrap();
        let _second = capacity.slot("l").await.unwrap();
        assert_eq!(capacity.available(), 0);
        let waiting = tokio::spawn({
            let capacity = capacity.clone();
            async move { capacity.slot("l").await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "got a slot past the cap");
        assert_eq!(capacity.pauses.load(Ordering::Relaxed), 0, "warned");
        assert_ne!(capacity.warned_at.load(Ordering::Relaxed), 0);
        drop(first);
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a close lets the waiting accept go on")
            .unwrap();
        assert!(got);
        assert_eq!(capacity.max(), 2);
    }
}
