//! Per-client limit on open connections (`[firewall] max_connections_per_ip`).
//!
//! # Clients
//!
//! Keyed like the rate limiter keys them: an IPv4 address (IPv4-mapped IPv6
//! counts as IPv4), an IPv6 /64. One count is shared by every listener.
//!
//! # Counting
//!
//! A connection the firewall admits holds a [`ConnSlot`] for as long as it
//! is open; dropping the slot gives it back. A new connection from a client
//! that already holds `limit` slots is refused (and takes none).
//!
//! # Memory and cost
//!
//! Counts live in [`SHARDS`] shards, each a `Mutex<HashMap>` chosen by a
//! keyed (randomly seeded) hash of the client, so concurrent connections
//! rarely wait on each other and a flood cannot aim at one shard. A
//! connection takes its shard's lock twice, at open and at close, each time
//! for one hash-map update. A client's entry is removed when its count falls
//! to zero, so entries never outnumber the open connections (themselves
//! capped by `[proxy] max_connections`); a shard's table is shrunk when it
//! is mostly empty, so a flood's peak does not stay allocated.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::ratelimit::Client;

/// Number of independently locked shards.
pub const SHARDS: usize = 64;
/// A shard's table is not shrunk below four times this many entries' room,
/// nor to less than this.
const MIN_CAPACITY: usize = 64;

/// Counts each client's open connections; cheap to share (`&self`).
#[derive(Debug)]
pub struct ConnLimiter {
    limit: u32,
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<Client, u32>>]>,
}

/// One open connection's place in its client's count; given back on drop.
#[derive(Debug)]
#[must_use = "the slot is given back as soon as it is dropped"]
pub struct ConnSlot<'a> {
    limiter: &'a ConnLimiter,
    client: Client,
    shard: usize,
}

impl ConnLimiter {
    /// At most `limit` open connections per client.
    pub fn new(limit: NonZeroU32) -> ConnLimiter {
        ConnLimiter {
            limit: limit.get(),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// The configured limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Counts a new connection from `ip`, or `None` when its client already
    /// holds `limit` open connections (the connection must be refused).
    pub fn try_acquire(&self, ip: IpAddr) -> Option<ConnSlot<'_>> {
        let client = Client::of(ip);
        let shard = self.shard_of(client);
        let mut counts = lock(&self.shards[shard]);
        match counts.entry(client) {
            Entry::Occupied(mut open) => {
                if *open.get() >= self.limit {
                    return None;
                }
                *open.get_mut() += 1;
            }
            Entry::Vacant(vacant) => {
                vacant.insert(1);
            }
        }
        Some(ConnSlot {
            limiter: self,
            client,
            shard,
        })
    }

    /// Gives back a count whose [`ConnSlot`] was forgotten (the QUIC flow
    /// table holds many counts without a guard each).
    pub fn uncount(&self, ip: IpAddr) {
        let client = Client::of(ip);
        self.release(client, self.shard_of(client));
    }

    /// Open connections counted for the client of `ip`.
    pub fn open(&self, ip: IpAddr) -> u32 {
        let client = Client::of(ip);
        lock(&self.shards[self.shard_of(client)])
            .get(&client)
            .copied()
            .unwrap_or(0)
    }

    /// Clients with at least one open connection.
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    fn shard_of(&self, client: Client) -> usize {
        // High bits: the map inside the shard hashes with its own seed.
        (self.hasher.hash_one(client) >> 32) as usize % SHARDS
    }

    fn release(&self, client: Client, shard: usize) {
        let mut counts = lock(&self.shards[shard]);
        if let Entry::Occupied(mut open) = counts.entry(client) {
            if *open.get() <= 1 {
                open.remove();
            } else {
                *open.get_mut() -= 1;
            }
        }
        // Amortised O(1): a shrink to twice the entries only happens after
        // the table has emptied to a quarter.
        if counts.capacity() > 4 * MIN_CAPACITY && counts.len() * 4 < counts.capacity() {
            let keep = (counts.len() * 2).max(MIN_CAPACITY);
            counts.shrink_to(keep);
        }
    }
}

impl Drop for ConnSlot<'_> {
    fn drop(&mut self) {
        self.limiter.release(self.client, self.shard);
    }
}

fn lock(shard: &Mutex<HashMap<Client, u32>>) -> MutexGuard<'_, HashMap<Client, u32>> {
    // Nothing panics while holding the lock; if something ever did, the
    // counts are still usable.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn limiter(limit: u32) -> ConnLimiter {
        ConnLimiter::new(NonZeroU32::new(limit).unwrap())
    }

    #[test]
    fn refuses_past_the_limit_while_open_and_admits_again_after_a_close() {
        let conns = limiter(3);
        let a = ip("192.0.2.1");
        let mut held: Vec<_> = (0..3).map(|_| conns.try_acquire(a).unwrap()).collect();
        assert!(conns.try_acquire(a).is_none());
        assert!(conns.try_acquire(a).is_none());
        assert_eq!(conns.open(a), 3);
        // Another client is unaffected.
        let b = conns.try_acquire(ip("192.0.2.2")).unwrap();
        held.pop();
        assert_eq!(conns.open(a), 2);
        held.push(conns.try_acquire(a).unwrap());
        assert!(conns.try_acquire(a).is_none());
        drop(held);
        drop(b);
        assert_eq!(conns.open(a), 0);
        assert_eq!(conns.tracked(), 0);
    }

    #[test]
    fn ipv6_clients_are_their_slash_64() {
        let conns = limiter(2);
        let _one = conns.try_acquire(ip("2001:db8:0:1::1")).unwrap();
        let _two = conns
            .try_acquire(ip("2001:db8:0:1:ffff:ffff:ffff:ffff"))
            .unwrap();
        assert!(conns.try_acquire(ip("2001:db8:0:1::3")).is_none());
        // The neighbouring /64 is another client.
        let _other = conns.try_acquire(ip("2001:db8:0:2::1")).unwrap();
        assert_eq!(conns.open(ip("2001:db8:0:1::42")), 2);
        assert_eq!(conns.tracked(), 2);
    }

    #[test]
    fn ipv4_mapped_is_the_same_client_as_ipv4() {
        let conns = limiter(1);
        let _held = conns.try_acquire(ip("192.0.2.1")).unwrap();
        assert!(conns.try_acquire(ip("::ffff:192.0.2.1")).is_none());
        // Not the same as an IPv6 /64 with the same low bits.
        assert!(conns.try_acquire(ip("::c000:201")).is_some());
    }

    #[test]
    fn entries_go_when_their_last_connection_closes() {
        let conns = limiter(1);
        let held: Vec<_> = (0..200_000u32)
            .map(|i| conns.try_acquire(IpAddr::V4(Ipv4Addr::from(i))).unwrap())
            .collect();
        assert_eq!(conns.tracked(), 200_000);
        let grown: usize = conns.shards.iter().map(|s| lock(s).capacity()).sum();
        drop(held);
        assert_eq!(conns.tracked(), 0);
        let shrunk: usize = conns.shards.iter().map(|s| lock(s).capacity()).sum();
        assert!(
            shrunk <= SHARDS * 4 * MIN_CAPACITY && shrunk * 10 < grown,
            "tables hold {shrunk} buckets after closing, {grown} at the peak"
        );
    }
}
