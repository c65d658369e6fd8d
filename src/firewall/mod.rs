//! The global firewall: decides, before a byte is read, whether a new
//! connection may proceed.
//!
//! Owns: the compiled rule set (swapped whole, atomically), the GeoIP
//! database (reloaded on change or SIGHUP, a broken file never replacing a
//! good one), the per-client rate limiter and the per-client count of open
//! connections. A decision never does I/O and never takes a lock, except the
//! rate limiter's and the connection count's shard locks when those limits
//! are set.
//!
//! Order of a decision ([`Firewall::admit`]): the address is made canonical
//! (IPv4-mapped IPv6 → IPv4); exact IP rules; CIDR rules; country rules (the
//! GeoIP lookup only happens when there are country rules and a database);
//! then the rate limit, so only connections the rules allow use up a
//! client's budget; then the open-connection limit, so only connections
//! about to be served take a slot ([`Firewall::check`] is the same decision
//! without that last step). User-agent rules never take part in that
//! decision: an L4 connection has no User-Agent. They are for requests on
//! L7 routes ([`Firewall::blocks_user_agent`]).
//!
//! - [`rule`]: rule values and their text forms (the `wire` crate's,
//!   re-exported).
//! - `ipset`: IP and CIDR matching in logarithmic time.
//! - [`geoip`]: the MaxMind database.
//! - [`ratelimit`]: the per-client limiter.
//! - [`concurrency`]: the per-client count of open connections.

pub mod concurrency;
pub mod geoip;
mod ipset;
pub mod ratelimit;
pub use wire::rule;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::FirewallConfig;
pub use concurrency::{ConnLimiter, ConnSlot};
pub use geoip::{GeoIp, GeoIpError};
use ipset::{AddrMatch, AddrSet};
pub use ratelimit::RateLimiter;
pub use rule::{CountryCode, Rule, RuleError, RuleKind};

wire::labelled_enum! {
    /// Why a connection was refused. The label is the `rule` label of the
    /// blocked-connections metric (a rule's is its [`RuleKind`]'s); `Display`
    /// gives the log outcome suffix: `ip`, `cidr`, `country:XX`, `rate`,
    /// `conn_limit`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum BlockReason {
        Ip => RuleKind::Ip.label(),
        Cidr => RuleKind::Cidr.label(),
        Country(CountryCode) => RuleKind::Country.label(),
        Rate => "rate",
        /// The client already holds `max_connections_per_ip` open connections.
        ConnLimit => "conn_limit",
    }
}

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockReason::Country(cc) => write!(f, "{}:{cc}", self.label()),
            _ => f.write_str(self.label()),
        }
    }
}

/// The firewall's decision on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Block(BlockReason),
}

/// Most memory the user-agent rules compiled together may take (the
/// `regex` crate's `size_limit` for the one `RegexSet`). Beyond it each
/// pattern is matched on its own (each is within
/// [`rule::USER_AGENT_REGEX_SIZE_LIMIT`]).
const USER_AGENT_SET_SIZE_LIMIT: usize = 16 << 20;

/// The user-agent rules, compiled.
#[derive(Debug, Default)]
enum UserAgentMatcher {
    #[default]
    Empty,
    /// Every pattern in one set: one pass over the User-Agent.
    Set(regex::bytes::RegexSet),
    /// The set was too large: one regex per pattern.
    Each(Vec<regex::bytes::Regex>),
}

impl UserAgentMatcher {
    fn new(patterns: &[&str]) -> UserAgentMatcher {
        UserAgentMatcher::with_set_limit(patterns, USER_AGENT_SET_SIZE_LIMIT)
    }

    fn with_set_limit(patterns: &[&str], set_limit: usize) -> UserAgentMatcher {
        if patterns.is_empty() {
            return UserAgentMatcher::Empty;
        }
        let set = regex::bytes::RegexSetBuilder::new(patterns)
            .size_limit(set_limit)
            .dfa_size_limit(set_limit)
            .build();
        match set {
            Ok(set) => UserAgentMatcher::Set(set),
            Err(err) => {
                tracing::warn!(
                    patterns = patterns.len(),
                    error = %err,
                    "user-agent rules too large to match as one set; matching them one by one"
                );
                let each = patterns
                    .iter()
                    .filter_map(|pattern| {
                        // Each pattern compiled within this limit when it
                        // became a rule (`UserAgentPattern::parse`).
                        regex::bytes::RegexBuilder::new(pattern)
                            .size_limit(rule::USER_AGENT_REGEX_SIZE_LIMIT)
                            .dfa_size_limit(rule::USER_AGENT_REGEX_SIZE_LIMIT)
                            .build()
                            .inspect_err(|err| {
                                tracing::error!(pattern, error = %err, "user-agent rule does not compile; ignored");
                            })
                            .ok()
                    })
                    .collect();
                UserAgentMatcher::Each(each)
            }
        }
    }

    fn is_match(&self, ua: &[u8]) -> bool {
        match self {
            UserAgentMatcher::Empty => false,
            UserAgentMatcher::Set(set) => set.is_match(ua),
            UserAgentMatcher::Each(each) => each.iter().any(|re| re.is_match(ua)),
        }
    }
}

/// An immutable, compiled set of rules.
#[derive(Debug, Default)]
pub struct RuleSet {
    /// Deduplicated, sorted by kind then value (numerically for addresses).
    rules: Vec<Rule>,
    addrs: AddrSet,
    /// Sorted.
    countries: Vec<CountryCode>,
    user_agents: UserAgentMatcher,
}

impl RuleSet {
    pub fn new(rules: &[Rule]) -> RuleSet {
        let mut rules = rules.to_vec();
        rules.sort_unstable();
        rules.dedup();
        let mut ips = Vec::new();
        let mut nets = Vec::new();
        let mut countries = Vec::new();
        let mut patterns = Vec::new();
        for rule in &rules {
            match rule {
                Rule::Ip(ip) => ips.push(*ip),
                Rule::Cidr(net) => nets.push(*net),
                Rule::Country(cc) => countries.push(*cc),
                Rule::UserAgent(pattern) => patterns.push(pattern.as_str()),
            }
        }
        let user_agents = UserAgentMatcher::new(&patterns);
        RuleSet {
            addrs: AddrSet::new(ips, nets),
            countries,
            user_agents,
            rules,
        }
    }

    /// The rules, sorted by kind then value.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// IP and CIDR rules only. `ip` should be canonical (IPv4-mapped IPv6 →
    /// IPv4); it is made so here as well.
    pub fn match_addr(&self, ip: IpAddr) -> Option<BlockReason> {
        self.addrs.lookup(ip).map(|m| match m {
            AddrMatch::Ip => BlockReason::Ip,
            AddrMatch::Cidr => BlockReason::Cidr,
        })
    }

    pub fn blocks_country(&self, cc: CountryCode) -> bool {
        self.countries.binary_search(&cc).is_ok()
    }

    pub fn has_country_rules(&self) -> bool {
        !self.countries.is_empty()
    }

    /// True when a user-agent rule matches `ua` (a request's User-Agent
    /// header value, as sent).
    pub fn blocks_user_agent(&self, ua: &[u8]) -> bool {
        self.user_agents.is_match(ua)
    }
}

/// The configured GeoIP file and the database last read from it.
struct GeoIpSource {
    path: PathBuf,
    db: ArcSwap<GeoIp>,
}

/// The firewall: rules, GeoIP, rate limit and open-connection limit.
/// Shared as `Arc<Firewall>` by every listener.
pub struct Firewall {
    rules: ArcSwap<RuleSet>,
    geoip: Option<GeoIpSource>,
    /// `None` when `rate_limit` is 0.
    rate: Option<RateLimiter>,
    /// `None` when `max_connections_per_ip` is 0.
    conns: Option<ConnLimiter>,
}

impl fmt::Debug for Firewall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Firewall")
            .field("rules", &self.rules.load().len())
            .field("geoip_db", &self.geoip.as_ref().map(|g| &g.path))
            .field("rate", &self.rate)
            .field(
                "max_connections_per_ip",
                &self.conns.as_ref().map(ConnLimiter::limit),
            )
            .finish()
    }
}

impl Firewall {
    /// Opens the GeoIP database if one is configured (an unreadable or
    /// invalid file is an error). `rules` come from the store, not
    /// necessarily from `config`.
    pub fn new(config: &FirewallConfig, rules: &[Rule]) -> Result<Firewall, GeoIpError> {
        let geoip = match &config.geoip_db {
            Some(path) => {
                let db = GeoIp::open(path)?;
                tracing::info!(
                    path = %path.display(),
                    database_type = db.database_type(),
                    build_epoch = db.build_epoch(),
                    "GeoIP database loaded"
                );
                Some(GeoIpSource {
                    path: path.clone(),
                    db: ArcSwap::from_pointee(db),
                })
            }
            None => None,
        };
        let rate = (config.rate_limit > 0)
            .then(|| RateLimiter::new(config.rate_limit, config.rate_window));
        let firewall = Firewall {
            rules: ArcSwap::from_pointee(RuleSet::default()),
            geoip,
            rate,
            conns: config.max_connections_per_ip.map(ConnLimiter::new),
        };
        firewall.replace_rules(rules);
        Ok(firewall)
    }

    /// The decision on a new connection from `ip`, made before any byte is
    /// read, counting it as open when allowed: the connection holds the
    /// returned slot (`None` when there is no per-client limit) until it
    /// closes. See the module documentation for the order.
    pub fn admit(&self, ip: IpAddr) -> Result<Option<ConnSlot<'_>>, BlockReason> {
        if let Verdict::Block(reason) = self.check(ip) {
            return Err(reason);
        }
        match &self.conns {
            None => Ok(None),
            Some(conns) => conns
                .try_acquire(ip)
                .map(Some)
                .ok_or(BlockReason::ConnLimit),
        }
    }

    /// [`admit`](Self::admit) for a QUIC flow, whose table holds the count
    /// itself: `Ok(true)` when a per-client count was taken, to be given
    /// back with [`release_flow`](Self::release_flow) when the flow ends.
    pub fn admit_flow(&self, ip: IpAddr) -> Result<bool, BlockReason> {
        // The count stays taken: the slot is forgotten, not dropped.
        self.admit(ip)
            .map(|slot| slot.map(std::mem::forget).is_some())
    }

    /// Gives back the per-client count of a flow [`admit_flow`](Self::admit_flow) counted.
    pub fn release_flow(&self, ip: IpAddr) {
        if let Some(conns) = &self.conns {
            conns.uncount(ip);
        }
    }

    /// The decision on `ip` by the rules and the rate limit (a rate-limit
    /// admission is counted), without the open-connection limit.
    pub fn check(&self, ip: IpAddr) -> Verdict {
        let ip = ip.to_canonical();
        let rules = self.rules.load();
        if let Some(reason) = rules.match_addr(ip) {
            return Verdict::Block(reason);
        }
        if rules.has_country_rules() {
            if let Some(cc) = self.country_of(ip) {
                if rules.blocks_country(cc) {
                    return Verdict::Block(BlockReason::Country(cc));
                }
            }
        }
        if let Some(rate) = &self.rate {
            if !rate.admit(ip, Instant::now()) {
                return Verdict::Block(BlockReason::Rate);
            }
        }
        Verdict::Allow
    }

    /// True when a user-agent rule in force now matches `ua`, the
    /// User-Agent of a request on an L7 route (that request gets 403).
    /// Lock-free, like [`check`](Self::check); never part of a connection's
    /// decision.
    pub fn blocks_user_agent(&self, ua: &[u8]) -> bool {
        self.rules.load().blocks_user_agent(ua)
    }

    /// The rule set in force now.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.load_full()
    }

    /// Replaces the whole rule set at once; the next `check` sees it.
    pub fn replace_rules(&self, rules: &[Rule]) {
        let set = RuleSet::new(rules);
        if set.has_country_rules() && self.geoip.is_none() {
            tracing::warn!(
                "country rules are set but no firewall.geoip_db is configured; they match nothing"
            );
        }
        self.rules.store(Arc::new(set));
    }

    /// The country of `ip` per the GeoIP database; `None` without one.
    pub fn country_of(&self, ip: IpAddr) -> Option<CountryCode> {
        self.geoip.as_ref()?.db.load().country(ip.to_canonical())
    }

    /// The configured GeoIP file, if any.
    pub fn geoip_path(&self) -> Option<&Path> {
        self.geoip.as_ref().map(|g| g.path.as_path())
    }

    /// The rate limiter, if `rate_limit` is set (for metrics).
    pub fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.rate.as_ref()
    }

    /// The per-client open-connection count, if `max_connections_per_ip`
    /// is set.
    pub fn conn_limiter(&self) -> Option<&ConnLimiter> {
        self.conns.as_ref()
    }

    /// Re-reads the GeoIP file now. A missing or broken file is refused: the
    /// error is logged, the database in use is kept, and `Err` returned.
    /// `Ok(false)` when no database is configured. Blocking file I/O.
    pub fn reload_geoip(&self) -> Result<bool, GeoIpError> {
        let Some(source) = &self.geoip else {
            return Ok(false);
        };
        match GeoIp::open(&source.path) {
            Ok(db) => {
                let db = Arc::new(db);
                // In use before it is announced: a reader of the log line
                // may connect at once and must be judged by the new data.
                source.db.store(db.clone());
                tracing::info!(
                    path = %source.path.display(),
                    database_type = db.database_type(),
                    build_epoch = db.build_epoch(),
                    "GeoIP database reloaded"
                );
                Ok(true)
            }
            Err(err) => {
                tracing::error!(
                    path = %source.path.display(),
                    error = %err,
                    "GeoIP database reload refused; keeping the one in use"
                );
                Err(err)
            }
        }
    }

    /// Watches the GeoIP file: every `interval` its metadata (device, inode,
    /// size, times) at the path is compared with that of the file last read,
    /// so both rewriting in place and replacement by rename (as
    /// `geoipupdate` does) are seen, and on a change it is reloaded. A file
    /// that fails to load is not retried until it changes again; a missing
    /// file is logged once per disappearance and the loaded data kept. The
    /// task ends when `stop` becomes true or its sender is dropped. `None`
    /// when no database is configured.
    pub fn spawn_geoip_watcher(
        self: &Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let path = self.geoip.as_ref()?.path.clone();
        let firewall = Arc::clone(self);
        Some(tokio::spawn(async move {
            let mut refused = None;
            let mut unreadable = false;
            loop {
                if *stop.borrow_and_update() {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    changed = stop.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                }

                let stamp = match geoip::FileStamp::at(&path) {
                    Ok(stamp) => {
                        unreadable = false;
                        stamp
                    }
                    Err(err) => {
                        if !unreadable {
                            tracing::error!(
                                path = %path.display(),
                                error = %err,
                                "GeoIP database file is gone or unreadable; keeping the one in use"
                            );
                            unreadable = true;
                        }
                        continue;
                    }
                };
                let loaded = firewall.geoip.as_ref().map(|g| g.db.load().stamp());
                if Some(stamp) == loaded || Some(stamp) == refused {
                    continue;
                }
                let reloader = Arc::clone(&firewall);
                match tokio::task::spawn_blocking(move || reloader.reload_geoip()).await {
                    Ok(Ok(_)) => refused = None,
                    // Logged by reload_geoip.
                    Ok(Err(_)) => refused = Some(stamp),
                    Err(err) => {
                        tracing::error!(error = %err, "GeoIP reload task failed");
                        refused = Some(stamp);
                    }
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::geoip::tests::{city_db, corrupt_variants, GEOIP2, GEOLITE2};
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn cc(text: &str) -> CountryCode {
        CountryCode::parse(text).unwrap()
    }

    fn rule(kind: RuleKind, value: &str) -> Rule {
        Rule::parse(kind, value).unwrap()
    }

    fn config(geoip_db: Option<&Path>, rate_limit: u32) -> FirewallConfig {
        FirewallConfig {
            geoip_db: geoip_db.map(Path::to_path_buf),
            rules: Vec::new(),
            rate_limit,
            rate_window: Duration::from_secs(10),
            max_connections_per_ip: None,
        }
    }

    fn firewall(rules: &[Rule]) -> Firewall {
        Firewall::new(&config(None, 0), rules).unwrap()
    }

    const BLOCK_IP: Verdict = Verdict::Block(BlockReason::Ip);
    const BLOCK_CIDR: Verdict = Verdict::Block(BlockReason::Cidr);

    #[test]
    fn block_reasons_display_as_log_outcomes() {
        assert_eq!(BlockReason::Ip.to_string(), "ip");
        assert_eq!(BlockReason::Cidr.to_string(), "cidr");
        assert_eq!(BlockReason::Country(cc("kp")).to_string(), "country:KP");
        assert_eq!(BlockReason::Rate.to_string(), "rate");
        assert_eq!(BlockReason::ConnLimit.to_string(), "conn_limit");
    }

    #[test]
    fn exact_ips_v4_and_v6() {
        let fw = firewall(&[
            rule(RuleKind::Ip, "192.0.2.7"),
            rule(RuleKind::Ip, "2001:db8::7"),
        ]);
        assert_eq!(fw.check(ip("192.0.2.7")), BLOCK_IP);
        assert_eq!(fw.check(ip("192.0.2.8")), Verdict::Allow);
        assert_eq!(fw.check(ip("2001:db8::7")), BLOCK_IP);
        assert_eq!(fw.check(ip("2001:db8::8")), Verdict::Allow);
    }

    #[test]
    fn ipv4_mapped_client_is_judged_as_ipv4() {
        let fw = firewall(&[
            rule(RuleKind::Ip, "127.0.0.2"),
            rule(RuleKind::Cidr, "10.0.0.0/8"),
        ]);
        assert_eq!(fw.check(ip("::ffff:127.0.0.2")), BLOCK_IP);
        assert_eq!(fw.check(ip("::ffff:127.0.0.3")), Verdict::Allow);
        assert_eq!(fw.check(ip("::ffff:10.9.8.7")), BLOCK_CIDR);
    }

    #[test]
    fn cidr_slash_30() {
        let fw = firewall(&[rule(RuleKind::Cidr, "127.0.0.0/30")]);
        assert_eq!(fw.check(ip("127.0.0.3")), BLOCK_CIDR);
        assert_eq!(fw.check(ip("127.0.0.0")), BLOCK_CIDR);
        assert_eq!(fw.check(ip("127.0.0.4")), Verdict::Allow);
        assert_eq!(fw.check(ip("127.0.0.9")), Verdict::Allow);
    }

    #[test]
    fn slash_zero_blocks_one_family() {
        let fw = firewall(&[rule(RuleKind::Cidr, "0.0.0.0/0")]);
        assert_eq!(fw.check(ip("203.0.113.1")), BLOCK_CIDR);
        assert_eq!(fw.check(ip("::ffff:203.0.113.1")), BLOCK_CIDR);
        assert_eq!(fw.check(ip("2001:db8::1")), Verdict::Allow);
        fw.replace_rules(&[rule(RuleKind::Cidr, "::/0")]);
        assert_eq!(fw.check(ip("2001:db8::1")), BLOCK_CIDR);
        assert_eq!(fw.check(ip("203.0.113.1")), Verdict::Allow);
    }

    #[test]
    fn rule_set_dedups_and_sorts() {
        let set = RuleSet::new(&[
            rule(RuleKind::Country, "kp"),
            rule(RuleKind::Cidr, "10.0.0.0/8"),
            rule(RuleKind::Ip, "192.0.2.10"),
            rule(RuleKind::Ip, "192.0.2.9"),
            rule(RuleKind::Ip, "::ffff:192.0.2.9"),
            rule(RuleKind::Cidr, "10.1.2.3/8"),
            rule(RuleKind::Ip, "2001:db8::1"),
        ]);
        let listed: Vec<String> = set.rules().iter().map(ToString::to_string).collect();
        assert_eq!(
            listed,
            [
                "ip 192.0.2.9",
                "ip 192.0.2.10",
                "ip 2001:db8::1",
                "cidr 10.0.0.0/8",
                "country KP"
            ]
        );
        assert_eq!(set.len(), 5);
        assert!(!set.is_empty());
        assert!(set.has_country_rules());
        assert!(set.blocks_country(cc("KP")));
        assert!(!set.blocks_country(cc("GB")));
        assert!(RuleSet::new(&[]).is_empty());
    }

    #[test]
    fn user_agent_rules_block_user_agents_and_never_connections() {
        let fw = firewall(&[
            rule(RuleKind::UserAgent, "(?i)sqlmap"),
            rule(RuleKind::UserAgent, "^curl/7\\."),
            rule(RuleKind::Ip, "192.0.2.1"),
        ]);
        assert!(fw.blocks_user_agent(b"sqlmap/1.7 (https://sqlmap.org)"));
        assert!(fw.blocks_user_agent(b"Mozilla/5.0 SQLMap"));
        assert!(fw.blocks_user_agent(b"curl/7.88.1"));
        assert!(!fw.blocks_user_agent(b"curl/8.5.0"));
        assert!(!fw.blocks_user_agent(b"xcurl/7.1"));
        assert!(!fw.blocks_user_agent(b""));
        // Not UTF-8: still matched as bytes, never a panic.
        assert!(fw.blocks_user_agent(b"\xff\xfesqlmap"));
        assert!(!fw.blocks_user_agent(b"\xff\xfe"));
        // A connection is never judged by a user-agent rule.
        assert_eq!(fw.check(ip("192.0.2.2")), Verdict::Allow);
        assert_eq!(fw.check(ip("192.0.2.1")), BLOCK_IP);
        assert_eq!(fw.rules().len(), 3);
        // Replaced with the rest: the next request sees it.
        fw.replace_rules(&[rule(RuleKind::Ip, "192.0.2.1")]);
        assert!(!fw.blocks_user_agent(b"sqlmap/1.7"));
        assert!(!RuleSet::new(&[]).blocks_user_agent(b"sqlmap"));
    }

    #[test]
    fn user_agent_rules_too_large_together_are_matched_one_by_one() {
        // Each pattern compiles within its own limit; together they exceed
        // the set's (small here), so they are matched one at a time.
        let patterns: Vec<String> = (0..40).map(|i| format!("(?i)agent{i}x{{30}}")).collect();
        let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let one_by_one = UserAgentMatcher::with_set_limit(&patterns, 4096);
        assert!(
            matches!(one_by_one, UserAgentMatcher::Each(ref each) if each.len() == 40),
            "{one_by_one:?}"
        );
        let together = UserAgentMatcher::new(&patterns);
        assert!(matches!(together, UserAgentMatcher::Set(_)), "{together:?}");
        for matcher in [&one_by_one, &together] {
            let ua = format!("AGENT39{}", "x".repeat(30));
            assert!(matcher.is_match(ua.as_bytes()));
            assert!(!matcher.is_match(b"agent39 short"));
        }
    }

    #[test]
    fn replaced_rules_apply_to_the_next_check() {
        let fw = firewall(&[rule(RuleKind::Ip, "192.0.2.1")]);
        let before = fw.rules();
        assert_eq!(fw.check(ip("192.0.2.1")), BLOCK_IP);
        fw.replace_rules(&[rule(RuleKind::Ip, "192.0.2.2")]);
        assert_eq!(fw.check(ip("192.0.2.1")), Verdict::Allow);
        assert_eq!(fw.check(ip("192.0.2.2")), BLOCK_IP);
        // A snapshot taken earlier is unchanged.
        assert_eq!(before.match_addr(ip("192.0.2.1")), Some(BlockReason::Ip));
        assert_eq!(fw.rules().len(), 1);
    }

    #[test]
    fn country_blocking() {
        let fw = Firewall::new(
            &config(Some(Path::new(GEOLITE2)), 0),
            &[rule(RuleKind::Country, "gb")],
        )
        .unwrap();
        assert_eq!(
            fw.check(ip("81.2.69.142")),
            Verdict::Block(BlockReason::Country(cc("GB")))
        );
        assert_eq!(
            fw.check(ip("::ffff:81.2.69.142")),
            Verdict::Block(BlockReason::Country(cc("GB")))
        );
        assert_eq!(fw.check(ip("216.160.83.56")), Verdict::Allow);
        // Not in the database: no country, allowed.
        assert_eq!(fw.check(ip("10.0.0.1")), Verdict::Allow);
        assert_eq!(fw.country_of(ip("2001:218::1")), Some(cc("JP")));
    }

    #[test]
    fn country_rules_without_a_database_match_nothing() {
        let fw = firewall(&[rule(RuleKind::Country, "GB")]);
        assert_eq!(fw.check(ip("81.2.69.142")), Verdict::Allow);
        assert_eq!(fw.country_of(ip("81.2.69.142")), None);
        assert!(!fw.reload_geoip().unwrap());
    }

    #[test]
    fn address_rules_come_before_the_rate_limit() {
        let mut cfg = config(None, 1);
        cfg.rate_window = Duration::from_secs(3600);
        let fw = Firewall::new(&cfg, &[rule(RuleKind::Ip, "192.0.2.1")]).unwrap();
        // Blocked connections do not use up the budget...
        for _ in 0..3 {
            assert_eq!(fw.check(ip("192.0.2.1")), BLOCK_IP);
        }
        fw.replace_rules(&[]);
        // ... so the first allowed one is admitted, the next refused.
        assert_eq!(fw.check(ip("192.0.2.1")), Verdict::Allow);
        assert_eq!(fw.check(ip("192.0.2.1")), Verdict::Block(BlockReason::Rate));
        assert_eq!(
            fw.check(ip("::ffff:192.0.2.1")),
            Verdict::Block(BlockReason::Rate)
        );
        assert_eq!(fw.check(ip("192.0.2.2")), Verdict::Allow);
        assert_eq!(fw.rate_limiter().map(RateLimiter::tracked), Some(2));
    }

    #[test]
    fn the_connection_limit_comes_after_the_rules_and_the_rate_limit() {
        let mut cfg = config(None, 3);
        cfg.rate_window = Duration::from_secs(3600);
        cfg.max_connections_per_ip = std::num::NonZeroU32::new(1);
        let fw = Firewall::new(&cfg, &[rule(RuleKind::Ip, "192.0.2.1")]).unwrap();
        let conns = fw.conn_limiter().unwrap();
        // A client blocked by a rule takes no slot.
        assert_eq!(fw.admit(ip("192.0.2.1")).err(), Some(BlockReason::Ip));
        assert_eq!(conns.tracked(), 0);

        let a = ip("192.0.2.2");
        let held = fw.admit(a).unwrap();
        assert!(held.is_some());
        // Refused while the first is open (this uses up rate budget: the
        // rate limit comes first) ...
        assert_eq!(fw.admit(a).err(), Some(BlockReason::ConnLimit));
        assert_eq!(
            fw.admit(ip("::ffff:192.0.2.2")).err(),
            Some(BlockReason::ConnLimit)
        );
        // ... a rate refusal takes no slot either ...
        assert_eq!(fw.admit(a).err(), Some(BlockReason::Rate));
        assert_eq!(conns.open(a), 1);
        drop(held);
        assert_eq!(conns.open(a), 0);
        // ... and without a limit configured there is no slot at all.
        let plain = firewall(&[]);
        assert!(plain.conn_limiter().is_none());
        assert!(matches!(plain.admit(a), Ok(None)));
    }

    /// Puts `bytes` at `path` the way geoipupdate does: write a temporary
    /// file beside it, then rename it over.
    fn replace_by_rename(path: &Path, bytes: &[u8]) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// A firewall on a private copy of GeoLite2-Country-Test, blocking CN.
    fn firewall_on_copy() -> (tempfile::TempDir, PathBuf, Arc<Firewall>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("GeoLite2-Country.mmdb");
        std::fs::copy(GEOLITE2, &path).unwrap();
        let fw = Firewall::new(&config(Some(&path), 0), &[rule(RuleKind::Country, "CN")]).unwrap();
        (dir, path, Arc::new(fw))
    }

    // 175.16.199.1 is only in GeoIP2-Country-Test (CN).
    const CN_IN_GEOIP2_ONLY: &str = "175.16.199.1";

    #[test]
    fn reload_after_rename_changes_answers() {
        let (_dir, path, fw) = firewall_on_copy();
        assert_eq!(fw.country_of(ip(CN_IN_GEOIP2_ONLY)), None);
        assert_eq!(fw.check(ip(CN_IN_GEOIP2_ONLY)), Verdict::Allow);
        replace_by_rename(&path, &std::fs::read(GEOIP2).unwrap());
        // Not before a reload.
        assert_eq!(fw.country_of(ip(CN_IN_GEOIP2_ONLY)), None);
        assert!(fw.reload_geoip().unwrap());
        assert_eq!(fw.country_of(ip(CN_IN_GEOIP2_ONLY)), Some(cc("CN")));
        assert_eq!(
            fw.check(ip(CN_IN_GEOIP2_ONLY)),
            Verdict::Block(BlockReason::Country(cc("CN")))
        );
        // A City database works the same way.
        replace_by_rename(&path, &city_db());
        assert!(fw.reload_geoip().unwrap());
        assert_eq!(fw.country_of(ip("192.0.2.1")), Some(cc("DE")));
        assert_eq!(fw.country_of(ip("198.51.100.1")), Some(cc("FR")));
    }

    #[test]
    fn corrupt_file_is_refused_at_start_and_on_reload() {
        let (dir, path, fw) = firewall_on_copy();
        for (what, bytes) in corrupt_variants() {
            let bad = dir.path().join("bad.mmdb");
            std::fs::write(&bad, &bytes).unwrap();
            let err = Firewall::new(&config(Some(&bad), 0), &[]).unwrap_err();
            assert!(err.to_string().contains("bad.mmdb"), "{what}: {err}");

            replace_by_rename(&path, &bytes);
            assert!(fw.reload_geoip().is_err(), "{what}");
            assert_eq!(fw.country_of(ip("81.2.69.142")), Some(cc("GB")), "{what}");
        }
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(fw.reload_geoip(), Err(GeoIpError::Read { .. })));
        assert_eq!(fw.country_of(ip("81.2.69.142")), Some(cc("GB")));
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "not within 5 s: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn watcher_picks_up_a_replacement_and_survives_deletion() {
        let (_dir, path, fw) = firewall_on_copy();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = fw
            .spawn_geoip_watcher(Duration::from_millis(100), stop_rx)
            .unwrap();

        replace_by_rename(&path, &std::fs::read(GEOIP2).unwrap());
        wait_for("GeoIP2 picked up", || {
            fw.country_of(ip(CN_IN_GEOIP2_ONLY)) == Some(cc("CN"))
        })
        .await;

        // Deleted: the loaded data stays.
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(fw.country_of(ip(CN_IN_GEOIP2_ONLY)), Some(cc("CN")));

        // A broken file appears: refused, data kept.
        std::fs::write(&path, b"not an mmdb").unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(fw.country_of(ip(CN_IN_GEOIP2_ONLY)), Some(cc("CN")));

        // A good file again: picked up.
        replace_by_rename(&path, &std::fs::read(GEOLITE2).unwrap());
        wait_for("GeoLite2 picked up", || {
            fw.country_of(ip(CN_IN_GEOIP2_ONLY)).is_none()
        })
        .await;
        assert_eq!(fw.country_of(ip("81.2.69.142")), Some(cc("GB")));

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn no_watcher_without_a_database() {
        let fw = Arc::new(firewall(&[]));
        let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        assert!(fw
            .spawn_geoip_watcher(Duration::from_millis(100), stop_rx)
            .is_none());
    }
}
