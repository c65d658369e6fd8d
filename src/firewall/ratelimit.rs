//! Per-client rate limit on new connections.
//!
//! # Algorithm
//!
//! A fixed window per client: a client's window opens at its first
//! connection and lasts `window`; inside it at most `limit` connections are
//! admitted and the rest refused (refusals are not counted). The first
//! connection after the window has ended opens a new window. So a client
//! gets `limit` connections per window, and at most `2 * limit` in any span
//! of `window` that straddles two windows.
//!
//! # Clients
//!
//! An IPv4 client is its address (IPv4-mapped IPv6 counts as IPv4). An IPv6
//! client is its /64: one host, or one home, is normally given a whole /64
//! and can pick any address in it, so keying by the full address would let
//! it bypass the limit.
//!
//! # Memory
//!
//! Entries live in [`SHARDS`] shards, each a `Mutex<HashMap>` chosen by a
//! keyed (randomly seeded) hash of the client, so concurrent connections
//! rarely wait on each other and a flood cannot aim at one shard.
//!
//! - Stale entries (window over) are swept from a shard when a new client
//!   arrives and either the shard has grown to twice its size after the last
//!   sweep (at least `MIN_SWEEP_AT` entries) or its last sweep is a window
//!   ago or more: amortised O(1) per connection, and a quiet client's entry
//!   goes within about two windows of traffic to its shard.
//! - Total entries are capped ([`DEFAULT_MAX_ENTRIES`] = 917,504, about
//!   35 MB at worst): a shard holds at most `max_entries / SHARDS`. When a
//!   new client arrives at a full shard whose entries are all live, the
//!   oldest eighth of that shard (by window start) is evicted. An evicted
//!   client simply starts a fresh window next time: under a flood of more
//!   distinct clients than the cap within one window, the limit is enforced
//!   on the most recent ones, and memory stays bounded.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Number of independently locked shards.
pub const SHARDS: usize = 64;
/// Default cap on tracked clients: 64 shards × 14,336, which is 7/8 of
/// 16,384 so a full shard's table never grows past 16,384 buckets.
pub const DEFAULT_MAX_ENTRIES: usize = SHARDS * 14_336;
/// A shard is not swept before it holds this many entries.
const MIN_SWEEP_AT: usize = 64;

/// Who is rate limited (and whose open connections are counted, see
/// `concurrency`): an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Client {
    V4(u32),
    V6Net64(u64),
}

impl Client {
    pub(super) fn of(ip: IpAddr) -> Client {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Client::V4(u32::from(v4)),
            IpAddr::V6(v6) => Client::V6Net64((u128::from(v6) >> 64) as u64),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    /// Nanoseconds since the limiter's `epoch` (8 bytes instead of an
    /// `Instant`'s 16).
    start: u64,
    admitted: u32,
}

#[derive(Debug)]
struct Shard {
    clients: HashMap<Client, Window>,
    /// Sweep stale entries when a new client arrives and `clients` has this
    /// many ...
    sweep_at: usize,
    /// ... or the last sweep (nanoseconds since `epoch`) is a window ago.
    swept: u64,
}

/// The per-client connection rate limiter. Cheap to share (`&self`).
#[derive(Debug)]
pub struct RateLimiter {
    limit: u32,
    window: u64,
    epoch: Instant,
    max_per_shard: usize,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl RateLimiter {
    /// At most `limit` new connections per client per `window`. A `limit`
    /// of 0 is taken as 1 (use no limiter at all to turn limiting off).
    pub fn new(limit: u32, window: Duration) -> RateLimiter {
        RateLimiter::with_capacity(limit, window, DEFAULT_MAX_ENTRIES)
    }

    /// As [`RateLimiter::new`], tracking at most `max_entries` clients
    /// (rounded down to a multiple of [`SHARDS`], and at least one per
    /// shard).
    pub fn with_capacity(limit: u32, window: Duration, max_entries: usize) -> RateLimiter {
        let max_per_shard = (max_entries / SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    clients: HashMap::new(),
                    sweep_at: MIN_SWEEP_AT.min(max_per_shard),
                    swept: 0,
                })
            })
            .collect();
        RateLimiter {
            limit: limit.max(1),
            window: duration_nanos(window),
            epoch: Instant::now(),
            max_per_shard,
            hasher: RandomState::new(),
            shards,
        }
    }

    /// Counts one new connection from `ip` at `now`; `false` means the
    /// client is over its limit and the connection must be refused.
    /// Instants before the limiter was created count as its creation.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> bool {
        let client = Client::of(ip);
        let now = duration_nanos(now.saturating_duration_since(self.epoch));
        let mut shard = self.shard(client);
        if let Some(window) = shard.clients.get_mut(&client) {
            if self.expired(window, now) {
                *window = Window {
                    start: now,
                    admitted: 1,
                };
                return true;
            }
            if window.admitted < self.limit {
                window.admitted += 1;
                return true;
            }
            return false;
        }
        self.make_room(&mut shard, now);
        shard.clients.insert(
            client,
            Window {
                start: now,
                admitted: 1,
            },
        );
        true
    }

    /// Clients currently tracked (stale ones included until swept).
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| lock(s).clients.len()).sum()
    }

    /// The most clients this limiter will track.
    pub fn max_entries(&self) -> usize {
        self.max_per_shard * SHARDS
    }

    fn shard(&self, client: Client) -> MutexGuard<'_, Shard> {
        // High bits: the map inside the shard hashes with its own seed.
        let index = (self.hasher.hash_one(client) >> 32) as usize % SHARDS;
        lock(&self.shards[index])
    }

    fn expired(&self, window: &Window, now: u64) -> bool {
        now.saturating_sub(window.start) >= self.window
    }

    /// Before a new client is inserted: sweep if due, evict if full.
    fn make_room(&self, shard: &mut Shard, now: u64) {
        let len = shard.clients.len();
        let due = now.saturating_sub(shard.swept) >= self.window;
        if due || len >= shard.sweep_at || len >= self.max_per_shard {
            shard.clients.retain(|_, w| !self.expired(w, now));
            shard.swept = now;
            shard.sweep_at = (shard.clients.len() * 2)
                .max(MIN_SWEEP_AT)
                .min(self.max_per_shard);
        }
        let len = shard.clients.len();
        if len >= self.max_per_shard {
            // All live: evict the oldest eighth (at least one).
            let evict = (len / 8).max(1);
            let mut starts: Vec<u64> = shard.clients.values().map(|w| w.start).collect();
            let (_, &mut cutoff, _) = starts.select_nth_unstable(evict - 1);
            let mut left = evict;
            shard.clients.retain(|_, w| {
                if left > 0 && w.start <= cutoff {
                    left -= 1;
                    false
                } else {
                    true
                }
            });
        }
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // Nothing panics while holding the lock; if something ever did, the
    // counts are still usable.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn admits_limit_then_refuses_until_the_window_ends() {
        let rl = RateLimiter::new(3, 10 * SEC);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        assert!(rl.admit(a, t0));
        assert!(rl.admit(a, t0 + SEC));
        assert!(rl.admit(a, t0 + 2 * SEC));
        assert!(!rl.admit(a, t0 + 3 * SEC));
        assert!(!rl.admit(a, t0 + 9 * SEC));
        // Another client is unaffected.
        assert!(rl.admit(ip("192.0.2.2"), t0 + 9 * SEC));
        // The window started at t0: a new one opens at t0 + 10 s.
        assert!(rl.admit(a, t0 + 10 * SEC));
        assert!(rl.admit(a, t0 + 11 * SEC));
        assert!(rl.admit(a, t0 + 12 * SEC));
        assert!(!rl.admit(a, t0 + 12 * SEC));
        assert!(rl.admit(a, t0 + 20 * SEC));
    }

    #[test]
    fn refusals_do_not_extend_the_window() {
        let rl = RateLimiter::new(1, 10 * SEC);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        assert!(rl.admit(a, t0));
        for s in 1..10 {
            assert!(!rl.admit(a, t0 + s * SEC));
        }
        assert!(rl.admit(a, t0 + 10 * SEC));
    }

    #[test]
    fn ipv6_clients_are_their_slash_64() {
        let rl = RateLimiter::new(2, 10 * SEC);
        let t0 = Instant::now();
        assert!(rl.admit(ip("2001:db8:0:1::1"), t0));
        assert!(rl.admit(ip("2001:db8:0:1:ffff::2"), t0));
        assert!(!rl.admit(ip("2001:db8:0:1::3"), t0));
        // The neighbouring /64 is another client.
        assert!(rl.admit(ip("2001:db8:0:2::1"), t0));
        assert_eq!(rl.tracked(), 2);
    }

    #[test]
    fn ipv4_mapped_is_the_same_client_as_ipv4() {
        let rl = RateLimiter::new(1, 10 * SEC);
        let t0 = Instant::now();
        assert!(rl.admit(ip("192.0.2.1"), t0));
        assert!(!rl.admit(ip("::ffff:192.0.2.1"), t0));
        // And not the same as an IPv6 /64 with the same low bits.
        assert!(rl.admit(ip("::c000:201"), t0));
    }

    #[test]
    fn memory_stays_bounded_and_stale_entries_are_evicted() {
        let cap = 1024;
        let rl = RateLimiter::with_capacity(5, 10 * SEC, cap);
        assert_eq!(rl.max_entries(), cap);
        let t0 = Instant::now();
        // 100,000 distinct clients inside one window.
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i));
            assert!(rl.admit(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), now));
            if i % 1000 == 0 {
                assert!(rl.tracked() <= cap, "{} at {i}", rl.tracked());
            }
        }
        let full = rl.tracked();
        assert!(full <= cap && full > cap / 2, "{full}");

        // The most recent clients are still limited.
        let recent = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + 99_999));
        let t1 = t0 + SEC;
        for _ in 0..4 {
            assert!(rl.admit(recent, t1));
        }
        assert!(!rl.admit(recent, t1));

        // After the window, new traffic sweeps the stale entries out.
        let later = t0 + 30 * SEC;
        for i in 0..2 * SHARDS as u128 {
            let addr = Ipv6Addr::from((0x2001_0db8_u128 << 96) | (i << 64));
            assert!(rl.admit(IpAddr::V6(addr), later));
        }
        let after = rl.tracked();
        assert!(after < full / 2, "tracked {after}, was {full}");
        assert!(after <= cap);
    }

    #[test]
    fn stale_entries_are_swept_below_the_cap() {
        // Default cap; the threshold sweep, not the cap, clears them.
        let rl = RateLimiter::new(1, SEC);
        let t0 = Instant::now();
        for i in 0..20_000u32 {
            rl.admit(IpAddr::V4(Ipv4Addr::from(i)), t0);
        }
        assert_eq!(rl.tracked(), 20_000);
        let t1 = t0 + 2 * SEC;
        for i in 0..2_000u32 {
            rl.admit(IpAddr::V4(Ipv4Addr::from(1_000_000 + i)), t1);
        }
        let after = rl.tracked();
        assert!(after < 10_000, "{after}");
    }

    #[test]
    fn zero_limit_is_one() {
        let rl = RateLimiter::new(0, SEC);
        let t0 = Instant::now();
        assert!(rl.admit(ip("192.0.2.1"), t0));
        assert!(!rl.admit(ip("192.0.2.1"), t0));
    }
}
