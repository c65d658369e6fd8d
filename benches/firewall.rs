//! Firewall decision cost as the rule set grows: `RuleSet::match_addr` and
//! `Firewall::check` with 10, 10,000 and 100,000 CIDR rules (random IPv4
//! /16–/32 plus one in ten IPv6 /32–/64, from a fixed seed), for addresses
//! that hit and addresses that miss; and the rate limiter's admit path.
//!
//! `cargo bench --bench firewall`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use mc_proxy::config::FirewallConfig;
use mc_proxy::firewall::{Firewall, RateLimiter, Rule, RuleSet};

/// SplitMix64: deterministic, so every run measures the same rule sets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_rules(rng: &mut Rng, count: usize) -> Vec<Rule> {
    (0..count)
        .map(|_| {
            let net = if rng.below(10) == 0 {
                let addr = Ipv6Addr::from(0x2000_u128 << 112 | u128::from(rng.next()) << 64);
                IpNet::V6(Ipv6Net::new(addr, 32 + rng.below(33) as u8).unwrap_or_default())
            } else {
                let addr = Ipv4Addr::from(rng.next() as u32);
                IpNet::V4(Ipv4Net::new(addr, 16 + rng.below(17) as u8).unwrap_or_default())
            };
            Rule::Cidr(net.trunc())
        })
        .collect()
}

/// 1,024 addresses that hit the rule set and 1,024 that miss it.
fn probes(rng: &mut Rng, rules: &[Rule], set: &RuleSet) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let mut hits = Vec::new();
    let mut misses = Vec::new();
    while hits.len() < 1024 {
        if let Rule::Cidr(net) = rules[rng.below(rules.len() as u64) as usize] {
            hits.push(net.network());
        }
    }
    while misses.len() < 1024 {
        let ip = if rng.below(10) == 0 {
            IpAddr::V6(Ipv6Addr::from(0x2000_u128 << 112 | u128::from(rng.next())))
        } else {
            IpAddr::V4(Ipv4Addr::from(rng.next() as u32))
        };
        if set.match_addr(ip).is_none() {
            misses.push(ip);
        }
    }
    (hits, misses)
}

fn rules(c: &mut Criterion) {
    let mut group = c.benchmark_group("firewall");
    for count in [10, 10_000, 100_000] {
        let mut rng = Rng(0xf12e_3a11_u64 + count as u64);
        let rules = random_rules(&mut rng, count);
        let set = RuleSet::new(&rules);
        let (hits, misses) = probes(&mut rng, &rules, &set);
        let config = FirewallConfig {
            geoip_db: None,
            rules: Vec::new(),
            rate_limit: 0,
            rate_window: Duration::from_secs(10),
            max_connections_per_ip: None,
        };
        let firewall = match Firewall::new(&config, &rules) {
            Ok(firewall) => firewall,
            Err(err) => panic!("{err}"),
        };

        for (case, addrs) in [("hit", &hits), ("miss", &misses)] {
            let mut i = 0;
            group.bench_function(BenchmarkId::new(format!("match_addr/{case}"), count), |b| {
                b.iter(|| {
                    i = (i + 1) % addrs.len();
                    black_box(set.match_addr(black_box(addrs[i])))
                })
            });
            let mut i = 0;
            group.bench_function(BenchmarkId::new(format!("check/{case}"), count), |b| {
                b.iter(|| {
                    i = (i + 1) % addrs.len();
                    black_box(firewall.check(black_box(addrs[i])))
                })
            });
        }
    }
    group.finish();
}

fn rate_limiter(c: &mut Criterion) {
    let mut group = c.benchmark_group("rate_limiter");
    let now = Instant::now();
    // One busy client: always the same entry.
    let limiter = RateLimiter::new(u32::MAX, Duration::from_secs(3600));
    let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    group.bench_function("admit/same_client", |b| {
        b.iter(|| black_box(limiter.admit(black_box(ip), now)))
    });
    // 65,536 clients in turn: existing entries in a table of realistic size.
    let limiter = RateLimiter::new(u32::MAX, Duration::from_secs(3600));
    let mut n: u32 = 0;
    group.bench_function("admit/65536_clients", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (n & 0xffff)));
            black_box(limiter.admit(ip, now))
        })
    });
    // Every connection a new client: inserts, sweeps and evictions at the cap.
    let limiter = RateLimiter::new(10, Duration::from_secs(3600));
    let mut n: u32 = 0;
    group.bench_function("admit/new_client_at_cap", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            black_box(limiter.admit(IpAddr::V4(Ipv4Addr::from(n)), now))
        })
    });
    group.finish();
}

criterion_group!(benches, rules, rate_limiter);
criterion_main!(benches);
