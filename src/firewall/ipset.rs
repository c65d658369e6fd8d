//! Address matching for IP and CIDR rules.
//!
//! Owns: compiling IP and CIDR rules into lookup tables whose cost grows with
//! the logarithm of the rule count, not linearly. Exact addresses are kept in
//! sorted arrays; networks become sorted, merged, non-overlapping,
//! non-adjacent inclusive `[start, end]` ranges (`u32` for IPv4, `u128` for
//! IPv6). Both are searched by binary search. Never allocates or locks on
//! lookup.
//!
//! A network is only ever matched against addresses of its own family:
//! `0.0.0.0/0` blocks every IPv4 client and no IPv6 client, `::/0` the
//! reverse. The one exception is an IPv6 network lying inside the
//! IPv4-mapped block `::ffff:0:0/96` (such as `::ffff:10.0.0.0/104`): clients
//! are judged by their canonical address, so an IPv4-mapped client is never
//! seen as IPv6, and such a rule is compiled as the IPv4 network it names
//! (`10.0.0.0/8`).

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// What matched an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddrMatch {
    /// An exact address rule.
    Ip,
    /// A network rule containing the address.
    Cidr,
}

/// Compiled IP and CIDR rules.
#[derive(Debug, Default)]
pub(crate) struct AddrSet {
    v4_ips: Vec<u32>,
    v6_ips: Vec<u128>,
    v4_nets: Ranges<u32>,
    v6_nets: Ranges<u128>,
}

impl AddrSet {
    /// Builds the set from exact addresses and networks (any order, duplicates
    /// and overlaps allowed). Addresses are canonicalised (IPv4-mapped IPv6 →
    /// IPv4) and networks truncated here too, so the set is correct whatever
    /// the caller passes.
    pub(crate) fn new(
        ips: impl IntoIterator<Item = IpAddr>,
        nets: impl IntoIterator<Item = IpNet>,
    ) -> AddrSet {
        let mut v4_ips = Vec::new();
        let mut v6_ips = Vec::new();
        for ip in ips {
            match ip.to_canonical() {
                IpAddr::V4(v4) => v4_ips.push(u32::from(v4)),
                IpAddr::V6(v6) => v6_ips.push(u128::from(v6)),
            }
        }
        v4_ips.sort_unstable();
        v4_ips.dedup();
        v6_ips.sort_unstable();
        v6_ips.dedup();

        let mut v4_ranges = Vec::new();
        let mut v6_ranges = Vec::new();
        for net in nets {
            match net.trunc() {
                IpNet::V4(net) => v4_ranges.push(v4_range(net)),
                IpNet::V6(net) => match ipv4_mapped_net(net) {
                    Some(v4) => v4_ranges.push(v4_range(v4)),
                    None => {
                        v6_ranges.push((u128::from(net.network()), u128::from(net.broadcast())))
                    }
                },
            }
        }

        AddrSet {
            v4_ips,
            v6_ips,
            v4_nets: Ranges::new(v4_ranges),
            v6_nets: Ranges::new(v6_ranges),
        }
    }

    /// The first rule kind matching `ip` (exact address before network), if
    /// any. `ip` is canonicalised here, so an IPv4-mapped address is judged
    /// as IPv4.
    pub(crate) fn lookup(&self, ip: IpAddr) -> Option<AddrMatch> {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let addr = u32::from(v4);
                if self.v4_ips.binary_search(&addr).is_ok() {
                    Some(AddrMatch::Ip)
                } else if self.v4_nets.contains(addr) {
                    Some(AddrMatch::Cidr)
                } else {
                    None
                }
            }
            IpAddr::V6(v6) => {
                let addr = u128::from(v6);
                if self.v6_ips.binary_search(&addr).is_ok() {
                    Some(AddrMatch::Ip)
                } else if self.v6_nets.contains(addr) {
                    Some(AddrMatch::Cidr)
                } else {
                    None
                }
            }
        }
    }

    /// Number of merged network ranges (IPv4 + IPv6); for tests and metrics.
    #[cfg(test)]
    pub(crate) fn range_count(&self) -> usize {
        self.v4_nets.starts.len() + self.v6_nets.starts.len()
    }
}

fn v4_range(net: Ipv4Net) -> (u32, u32) {
    (u32::from(net.network()), u32::from(net.broadcast()))
}

/// `::ffff:a.b.c.d/(96+n)` → `a.b.c.d/n`; `None` for any other IPv6 network.
fn ipv4_mapped_net(net: Ipv6Net) -> Option<Ipv4Net> {
    let prefix_len = net.prefix_len().checked_sub(96)?;
    let mapped: Ipv4Addr = net.network().to_ipv4_mapped()?;
    Ipv4Net::new(mapped, prefix_len).ok()
}

/// An unsigned address type.
trait Addr: Copy + Ord {
    /// The next address, `None` after the last one.
    fn next(self) -> Option<Self>;
}

impl Addr for u32 {
    fn next(self) -> Option<u32> {
        self.checked_add(1)
    }
}

impl Addr for u128 {
    fn next(self) -> Option<u128> {
        self.checked_add(1)
    }
}

/// Sorted, disjoint, non-adjacent inclusive ranges: `starts[i] <= ends[i]`
/// and `ends[i] + 1 < starts[i + 1]`. Two parallel arrays so the binary
/// search touches only the starts.
#[derive(Debug)]
struct Ranges<T> {
    starts: Vec<T>,
    ends: Vec<T>,
}

impl<T> Default for Ranges<T> {
    fn default() -> Self {
        Ranges {
            starts: Vec::new(),
            ends: Vec::new(),
        }
    }
}

impl<T: Addr> Ranges<T> {
    /// Sorts and merges overlapping, nested and adjacent ranges.
    fn new(mut ranges: Vec<(T, T)>) -> Ranges<T> {
        ranges.sort_unstable();
        let mut starts: Vec<T> = Vec::with_capacity(ranges.len());
        let mut ends: Vec<T> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            if let Some(last_end) = ends.last_mut() {
                // Merge when `start` is inside or right after the last range.
                // A last range that already ends at the maximum address
                // absorbs everything after it (`next()` is `None`).
                let touches = last_end.next().is_none_or(|after| start <= after);
                if touches {
                    if end > *last_end {
                        *last_end = end;
                    }
                    continue;
                }
            }
            starts.push(start);
            ends.push(end);
        }
        starts.shrink_to_fit();
        ends.shrink_to_fit();
        Ranges { starts, ends }
    }

    fn contains(&self, addr: T) -> bool {
        // Index of the first range starting after `addr`; the one before it is
        // the only candidate.
        let after = self.starts.partition_point(|&start| start <= addr);
        match after.checked_sub(1) {
            Some(i) => self.ends.get(i).is_some_and(|&end| addr <= end),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn v6(text: &str) -> IpAddr {
        IpAddr::V6(text.parse::<Ipv6Addr>().unwrap())
    }

    fn set(ips: &[&str], nets: &[&str]) -> AddrSet {
        AddrSet::new(
            ips.iter().map(|s| s.parse::<IpAddr>().unwrap()),
            nets.iter().map(|s| s.parse::<IpNet>().unwrap()),
        )
    }

    fn look(set: &AddrSet, ip: &str) -> Option<AddrMatch> {
        set.lookup(ip.parse().unwrap())
    }

    #[test]
    fn exact_addresses_v4_and_v6() {
        let s = set(&["192.0.2.7", "2001:db8::7"], &[]);
        assert_eq!(look(&s, "192.0.2.7"), Some(AddrMatch::Ip));
        assert_eq!(look(&s, "192.0.2.8"), None);
        assert_eq!(look(&s, "192.0.2.6"), None);
        assert_eq!(look(&s, "2001:db8::7"), Some(AddrMatch::Ip));
        assert_eq!(look(&s, "2001:db8::8"), None);
        // Same bits, other family.
        assert_eq!(look(&s, "::c000:207"), None);
    }

    #[test]
    fn ipv4_mapped_addresses_are_judged_as_ipv4() {
        let s = set(&["127.0.0.2", "::ffff:192.0.2.1"], &["10.0.0.0/8"]);
        assert_eq!(look(&s, "::ffff:127.0.0.2"), Some(AddrMatch::Ip));
        assert_eq!(look(&s, "192.0.2.1"), Some(AddrMatch::Ip));
        assert_eq!(look(&s, "::ffff:10.1.2.3"), Some(AddrMatch::Cidr));
        assert_eq!(look(&s, "::ffff:11.1.2.3"), None);
    }

    #[test]
    fn ipv4_mapped_networks_are_compiled_as_ipv4() {
        let s = set(&[], &["::ffff:10.0.0.0/104", "::/80"]);
        assert_eq!(look(&s, "10.200.0.1"), Some(AddrMatch::Cidr));
        assert_eq!(look(&s, "11.0.0.1"), None);
        // ::/80 contains the whole mapped block but is wider than it: it stays
        // an IPv6 network and blocks no IPv4 client.
        assert_eq!(look(&s, "::1"), Some(AddrMatch::Cidr));
        assert_eq!(look(&s, "12.0.0.1"), None);
    }

    #[test]
    fn cidr_contains_only_its_addresses() {
        let s = set(&[], &["127.0.0.0/30"]);
        for ip in ["127.0.0.0", "127.0.0.1", "127.0.0.2", "127.0.0.3"] {
            assert_eq!(look(&s, ip), Some(AddrMatch::Cidr), "{ip}");
        }
        for ip in ["127.0.0.4", "127.0.0.9", "126.255.255.255", "0.0.0.0"] {
            assert_eq!(look(&s, ip), None, "{ip}");
        }
    }

    #[test]
    fn exact_rule_wins_over_network() {
        let s = set(&["10.0.0.1"], &["10.0.0.0/8"]);
        assert_eq!(look(&s, "10.0.0.1"), Some(AddrMatch::Ip));
        assert_eq!(look(&s, "10.0.0.2"), Some(AddrMatch::Cidr));
    }

    #[test]
    fn host_bits_are_ignored() {
        // Written as /24 with host bits: must still cover the whole /24.
        let s = set(&[], &["198.51.100.77/24"]);
        assert_eq!(look(&s, "198.51.100.0"), Some(AddrMatch::Cidr));
        assert_eq!(look(&s, "198.51.100.255"), Some(AddrMatch::Cidr));
        assert_eq!(look(&s, "198.51.101.0"), None);
    }

    #[test]
    fn nested_overlapping_and_adjacent_networks_merge() {
        let s = set(
            &[],
            &[
                "10.0.0.0/8",
                "10.1.0.0/16", // nested
                "10.255.255.255/32",
                "11.0.0.0/8", // adjacent to 10/8
                "12.0.0.0/15",
                "12.1.0.0/16", // nested at the end
                "20.0.0.0/24",
                "20.0.0.128/25", // nested
                "20.0.1.0/24",   // adjacent
                "20.0.3.0/24",   // gap of one /24 before it
            ],
        );
        // 10/8 + 11/8 + 12/15 merge into one range; 20.0.0/24 + 20.0.1/24 into
        // one; 20.0.3/24 stays apart.
        assert_eq!(s.range_count(), 3);
        for ip in ["10.0.0.0", "10.255.255.255", "11.0.0.0", "12.1.255.255"] {
            assert_eq!(look(&s, ip), Some(AddrMatch::Cidr), "{ip}");
        }
        for ip in ["9.255.255.255", "12.2.0.0", "20.0.2.0", "20.0.2.255"] {
            assert_eq!(look(&s, ip), None, "{ip}");
        }
        for ip in ["20.0.0.0", "20.0.1.255", "20.0.3.0", "20.0.3.255"] {
            assert_eq!(look(&s, ip), Some(AddrMatch::Cidr), "{ip}");
        }
        assert_eq!(look(&s, "20.0.4.0"), None);
    }

    #[test]
    fn a_smaller_network_after_a_wider_one_does_not_shrink_it() {
        // Sorted by start, the /32 comes after the /8 with the same start.
        let s = set(&[], &["10.0.0.0/32", "10.0.0.0/8"]);
        assert_eq!(look(&s, "10.9.9.9"), Some(AddrMatch::Cidr));
        assert_eq!(s.range_count(), 1);
    }

    #[test]
    fn slash_zero_blocks_its_family_only() {
        let s4 = set(&[], &["0.0.0.0/0"]);
        for ip in ["0.0.0.0", "1.2.3.4", "255.255.255.255", "::ffff:1.2.3.4"] {
            assert_eq!(look(&s4, ip), Some(AddrMatch::Cidr), "{ip}");
        }
        for ip in [
            "::",
            "::1",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            assert_eq!(look(&s4, ip), None, "{ip}");
        }
        let s6 = set(&[], &["::/0"]);
        for ip in [
            "::",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            assert_eq!(look(&s6, ip), Some(AddrMatch::Cidr), "{ip}");
        }
        for ip in ["0.0.0.0", "1.2.3.4", "255.255.255.255", "::ffff:1.2.3.4"] {
            assert_eq!(look(&s6, ip), None, "{ip}");
        }
    }

    #[test]
    fn ranges_ending_at_the_maximum_address() {
        let s = set(
            &[],
            &[
                "255.255.255.255/32",
                "255.255.255.0/24",
                "255.255.255.254/31",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
                "ffff::/16",
            ],
        );
        assert_eq!(s.range_count(), 2);
        assert_eq!(look(&s, "255.255.255.255"), Some(AddrMatch::Cidr));
        assert_eq!(look(&s, "255.255.255.0"), Some(AddrMatch::Cidr));
        assert_eq!(look(&s, "255.255.254.255"), None);
        assert_eq!(
            s.lookup(v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            Some(AddrMatch::Cidr)
        );
        assert_eq!(s.lookup(v6("ffff::")), Some(AddrMatch::Cidr));
        assert_eq!(
            s.lookup(v6("fffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            None
        );
    }

    #[test]
    fn host_networks_slash_32_and_128() {
        let s = set(&[], &["192.0.2.1/32", "2001:db8::1/128", "0.0.0.0/32"]);
        assert_eq!(look(&s, "192.0.2.1"), Some(AddrMatch::Cidr));
        assert_eq!(look(&s, "192.0.2.0"), None);
        assert_eq!(look(&s, "192.0.2.2"), None);
        assert_eq!(look(&s, "0.0.0.0"), Some(AddrMatch::Cidr));
        assert_eq!(look(&s, "0.0.0.1"), None);
        assert_eq!(look(&s, "2001:db8::1"), Some(AddrMatch::Cidr));
        assert_eq!(look(&s, "2001:db8::"), None);
        assert_eq!(look(&s, "2001:db8::2"), None);
    }

    #[test]
    fn empty_set_matches_nothing() {
        let s = set(&[], &[]);
        assert_eq!(look(&s, "0.0.0.0"), None);
        assert_eq!(look(&s, "255.255.255.255"), None);
        assert_eq!(look(&s, "::"), None);
    }

    /// SplitMix64: a tiny deterministic generator so failures reproduce.
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

    fn random_v4(rng: &mut Rng) -> Ipv4Addr {
        Ipv4Addr::from(rng.next() as u32)
    }

    fn random_v6(rng: &mut Rng) -> Ipv6Addr {
        Ipv6Addr::from((u128::from(rng.next()) << 64) | u128::from(rng.next()))
    }

    /// Every prefix of `ip` that a network of its family could have, as the
    /// (truncated) networks themselves: an oracle independent of the ranges.
    fn prefixes(ip: IpAddr) -> Vec<IpNet> {
        match ip {
            IpAddr::V4(a) => (0..=32)
                .map(|len| IpNet::V4(Ipv4Net::new(a, len).unwrap().trunc()))
                .collect(),
            IpAddr::V6(a) => (0..=128)
                .map(|len| IpNet::V6(Ipv6Net::new(a, len).unwrap().trunc()))
                .collect(),
        }
    }

    #[test]
    fn random_networks_agree_with_naive_matching() {
        let mut rng = Rng(0x5eed_f00d);
        let mut nets = Vec::new();
        for _ in 0..100_000 {
            let net = if rng.below(10) < 9 {
                let len = 16 + rng.below(17) as u8;
                IpNet::V4(Ipv4Net::new(random_v4(&mut rng), len).unwrap()).trunc()
            } else {
                let len = 16 + rng.below(113) as u8;
                IpNet::V6(Ipv6Net::new(random_v6(&mut rng), len).unwrap()).trunc()
            };
            nets.push(net);
        }
        let s = AddrSet::new([], nets.iter().copied());

        // Random probes, plus each of some networks' first and last address
        // and the addresses just outside it, where off-by-one errors live.
        let mut probes: Vec<IpAddr> = Vec::new();
        for _ in 0..100_000 {
            probes.push(if rng.below(2) == 0 {
                IpAddr::V4(random_v4(&mut rng))
            } else {
                // Random IPv6 addresses almost never fall inside a network:
                // aim them at the neighbourhood of one.
                let base = match nets[rng.below(nets.len() as u64) as usize] {
                    IpNet::V6(n) => u128::from(n.network()),
                    IpNet::V4(_) => u128::from(random_v6(&mut rng)),
                };
                IpAddr::V6(Ipv6Addr::from(base ^ u128::from(rng.below(1 << 20))))
            });
        }
        for net in nets.iter().step_by(20) {
            let (first, last) = match net {
                IpNet::V4(n) => (
                    u128::from(u32::from(n.network())),
                    u128::from(u32::from(n.broadcast())),
                ),
                IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
            };
            for addr in [first.wrapping_sub(1), first, last, last.wrapping_add(1)] {
                probes.push(match net {
                    IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(addr as u32)),
                    IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(addr)),
                });
            }
        }

        // Every probe against a hash set of the networks, one lookup per
        // possible prefix length.
        let by_network: std::collections::HashSet<IpNet> = nets.iter().copied().collect();
        let mut hits = 0;
        for &ip in &probes {
            let expected = prefixes(ip).iter().any(|p| by_network.contains(p));
            assert_eq!(s.lookup(ip) == Some(AddrMatch::Cidr), expected, "{ip}");
            hits += usize::from(expected);
        }
        // The probes exercise both answers.
        assert!(hits > 20_000, "only {hits} hits of {}", probes.len());

        // A plain linear scan over all 100,000 networks, for every 50th probe
        // (all of them would take minutes in a debug build).
        for &ip in probes.iter().step_by(50) {
            let expected = nets.iter().any(|n| n.contains(&ip));
            assert_eq!(s.lookup(ip) == Some(AddrMatch::Cidr), expected, "{ip}");
        }
    }
}
