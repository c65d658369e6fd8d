//! The balancer's properties, driven by arbitrary bytes: the `balance` fuzz
//! target and its corpus replay in `make test` (`tests/fuzz_corpus.rs`).
//!
//! The bytes are a script: a pool's shape, then operations (pick, open and
//! close connections, report connect failures and successes, replace the
//! route's backend list). After each, the properties every caller relies
//! on are checked, and a violation panics:
//!
//! - a connection's attempts name each member at most once, as many as
//!   `min(connect_attempts, members)`;
//! - healthy members come before down ones (fail open only after them);
//! - `least_connections` starts at a healthy member with the fewest open;
//! - a member's open count is the leases held on it, and it survives a
//!   route update for a backend still listed (a backend that leaves the
//!   list and comes back starts again from zero);
//! - every count is back to zero when every lease is gone.

use std::collections::HashMap;
use std::sync::Arc;

use wire::route::{Backend, Backends, Balance, Hostname, Mode, Target};

use super::{Balancer, Lease, Route};

/// The backends a script draws from.
const UNIVERSE: u16 = 16;

fn backend(i: u16) -> Backend {
    Backend::parse(&format!("192.0.2.1:{}", 1000 + i)).unwrap_or_else(|_| unreachable!())
}

/// A target over the backends whose bits are set in `mask` (at least one).
fn target(mask: u16, balance: Balance) -> Arc<Target> {
    let mask = if mask == 0 { 1 } else { mask };
    let list = (0..UNIVERSE)
        .filter(|i| mask & (1 << i) != 0)
        .map(backend)
        .collect();
    let backends = Backends::new(list).unwrap_or_else(|_| unreachable!());
    Arc::new(Target {
        backends,
        balance,
        health: None,
        send_proxy_protocol: false,
        mode: Mode::L4,
    })
}

fn balance_of(byte: u8) -> Balance {
    if byte & 1 == 0 {
        Balance::RoundRobin
    } else {
        Balance::LeastConnections
    }
}

/// Runs the script in `data`; panics when a property fails.
pub fn exercise(data: &[u8]) {
    let mut bytes = data.iter().copied();
    let (Some(a), Some(b), Some(c)) = (bytes.next(), bytes.next(), bytes.next()) else {
        return;
    };
    let balancer = Balancer::new();
    let name = Hostname::parse("fuzz.test").unwrap_or_else(|_| unreachable!());
    let mut route: Arc<Route> = balancer.route(
        &name,
        &target(u16::from_le_bytes([a, b]), balance_of(c)),
        None,
    );
    let max = usize::from(c >> 1) % 6 + 1;
    // Leases held, with the backend each is on; those on a backend that
    // left the list (the route counts them no more, even if it returns).
    let mut leases: Vec<(Backend, Lease)> = Vec::new();
    let mut orphans: Vec<Lease> = Vec::new();
    while let Some(op) = bytes.next() {
        let arg = bytes.next().unwrap_or(0);
        let members = route.pool.members();
        let member = &members[usize::from(arg) % members.len()];
        match op % 6 {
            0 => check_attempts(&route, max),
            1 if leases.len() < 256 => leases.push((member.backend().clone(), member.lease())),
            2 if !leases.is_empty() => {
                leases.swap_remove(usize::from(arg) % leases.len());
            }
            3 => member.node().connect_failed("scripted failure"),
            4 => member.node().connected(),
            5 => {
                let extra = bytes.next().unwrap_or(0);
                let before = open_counts(&route);
                let next = target(u16::from_le_bytes([arg, extra]), balance_of(extra >> 7));
                route = balancer.route(&name, &next, Some(&route));
                let (kept, gone): (Vec<_>, Vec<_>) = leases
                    .drain(..)
                    .partition(|(b, _)| next.backends.contains(b));
                leases = kept;
                orphans.extend(gone.into_iter().map(|(_, lease)| lease));
                for (backend, open) in open_counts(&route) {
                    if let Some(was) = before.get(&backend) {
                        assert_eq!(*was, open, "{backend}: open count lost in an update");
                    }
                }
            }
            _ => {}
        }
        check_counts(&route, &leases);
    }
    drop(leases);
    drop(orphans);
    for member in route.pool.members() {
        assert_eq!(
            member.active(),
            0,
            "{}: open after every lease",
            member.backend()
        );
        assert_eq!(member.node().counts().open, 0);
    }
}

fn open_counts(route: &Route) -> HashMap<Backend, i64> {
    route
        .pool
        .members()
        .iter()
        .map(|m| (m.backend().clone(), m.active()))
        .collect()
}

fn check_counts(route: &Route, leases: &[(Backend, Lease)]) {
    for member in route.pool.members() {
        let held = leases.iter().filter(|(b, _)| b == member.backend()).count();
        assert_eq!(
            member.active(),
            held as i64,
            "{}: open count is not the leases held",
            member.backend()
        );
    }
}

fn check_attempts(route: &Route, max: usize) {
    let members = route.pool.members();
    let healthy_before: Vec<bool> = members.iter().map(|m| m.healthy()).collect();
    let picked: Vec<usize> = route
        .pool
        .attempts(max)
        .map(|m| {
            members
                .iter()
                .position(|x| std::ptr::eq(x, m))
                .unwrap_or_else(|| unreachable!())
        })
        .collect();
    let healthy_after: Vec<bool> = members.iter().map(|m| m.healthy()).collect();
    assert_eq!(picked.len(), max.min(members.len()), "attempts: {picked:?}");
    let mut seen = picked.clone();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), picked.len(), "a member tried twice: {picked:?}");
    // A backoff that ended during the pick changes the answer; judge only
    // a stable picture.
    if healthy_before != healthy_after {
        return;
    }
    let health: Vec<bool> = picked.iter().map(|&i| healthy_before[i]).collect();
    let first_down = health.iter().position(|h| !h).unwrap_or(health.len());
    assert!(
        health[first_down..].iter().all(|h| !h),
        "a healthy member after a down one: {health:?}"
    );
    let healthy_total = healthy_before.iter().filter(|h| **h).count();
    assert_eq!(
        first_down,
        healthy_total.min(picked.len()),
        "down members tried while healthy ones were left"
    );
    if route.target.balance == Balance::LeastConnections && first_down > 0 {
        let fewest = members
            .iter()
            .zip(&healthy_before)
            .filter(|(_, h)| **h)
            .map(|(m, _)| m.active())
            .min()
            .unwrap_or(0);
        assert_eq!(
            members[picked[0]].active(),
            fewest,
            "least_connections did not start at the fewest open"
        );
    }
}
