//! Route values: normalised hostnames, backends, and the immutable
//! hostname → target map that a listener's live table (`mc_proxy::routes`)
//! swaps as a whole.
//!
//! Owns: the `Hostname` and `Backend` value types (the only place their text
//! forms are validated), and the lookup rule (exact match, then a one-label
//! wildcard). Never does I/O; a lookup never takes a lock or allocates.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

mod pool;

pub use pool::{
    Backends, Balance, HealthCheck, Pool, PoolError, PoolKey, PoolSettings, DEFAULT_HEALTH_FALL,
    DEFAULT_HEALTH_RISE, MAX_BACKENDS, MAX_HEALTH_COUNT,
};

/// The default route's hostname.
pub const DEFAULT_ROUTE: &str = "*";

/// Longest DNS name we accept, in bytes, without the trailing dot.
const MAX_HOSTNAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// A route hostname: ASCII lower case, no trailing dot, each label 1–63 bytes
/// of letters, digits, `-` or `_`. The first label may be `*`, which matches
/// exactly one label (`*.example.net` matches `a.example.net` only). `*`
/// alone is the listener's default route: it takes every ClientHello whose
/// SNI matches no other route, and those without SNI (SPEC §6.3).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hostname(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostnameError {
    #[error("hostname is empty")]
    Empty,
    #[error("hostname is longer than {MAX_HOSTNAME_LEN} bytes")]
    TooLong,
    #[error("hostname has an empty label")]
    EmptyLabel,
    #[error("hostname label longer than {MAX_LABEL_LEN} bytes")]
    LabelTooLong,
    #[error("hostname has an invalid character {0:?}")]
    InvalidChar(char),
    #[error("hostname label starts or ends with '-'")]
    Hyphen,
    #[error("a wildcard is only allowed as the whole first label of a name with at least two more labels (\"*.example.net\")")]
    BadWildcard,
}

impl Hostname {
    /// Normalises (lower case, one trailing dot removed) and validates.
    pub fn parse(input: &str) -> Result<Self, HostnameError> {
        if input == DEFAULT_ROUTE {
            return Ok(Hostname(DEFAULT_ROUTE.into()));
        }
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() {
            return Err(HostnameError::Empty);
        }
        if trimmed.len() > MAX_HOSTNAME_LEN {
            return Err(HostnameError::TooLong);
        }
        let lower = trimmed.to_ascii_lowercase();
        check_labels(&lower)?;
        Ok(Hostname(lower.into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `*.example.net`, or the default route `*`: not a name a client or a
    /// backend can have.
    pub fn is_wildcard(&self) -> bool {
        self.is_default() || self.0.starts_with("*.")
    }

    /// The listener's default route, `*`.
    pub fn is_default(&self) -> bool {
        &*self.0 == DEFAULT_ROUTE
    }
}

/// Validates the labels of a lower-cased name without a trailing dot.
fn check_labels(lower: &str) -> Result<(), HostnameError> {
    let label_count = lower.split('.').count();
    for (index, label) in lower.split('.').enumerate() {
        if label.is_empty() {
            return Err(HostnameError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(HostnameError::LabelTooLong);
        }
        if label == "*" {
            // Only "*.a.b": a wildcard over a bare TLD would route half the internet.
            if index != 0 || label_count < 3 {
                return Err(HostnameError::BadWildcard);
            }
            continue;
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(if bad == '*' {
                HostnameError::BadWildcard
            } else {
                HostnameError::InvalidChar(bad)
            });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HostnameError::Hyphen);
        }
    }
    Ok(())
}

/// Lets a map keyed by `Hostname` be searched with a `&str` (both hash as
/// the same string), so a lookup needs no `Hostname` built on the heap.
impl std::borrow::Borrow<str> for Hostname {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a route sends its traffic: `IP:port`, `[IPv6]:port` or `name:port`
/// (a DNS name, resolved at connect time).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    host: BackendHost,
    port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum BackendHost {
    Ip(IpAddr),
    Name(Box<str>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("backend must be host:port, [ipv6]:port or ip:port")]
    NotHostPort,
    #[error("backend port must be a number from 1 to 65535")]
    BadPort,
    #[error("backend host is not a valid IP address or DNS name: {0}")]
    BadHost(HostnameError),
}

impl Backend {
    pub fn parse(input: &str) -> Result<Self, BackendError> {
        if let Ok(sa) = input.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(BackendError::BadPort);
            }
            return Ok(Backend {
                host: BackendHost::Ip(sa.ip()),
                port: sa.port(),
            });
        }
        let (host, port) = input.rsplit_once(':').ok_or(BackendError::NotHostPort)?;
        if host.is_empty() || host.contains(':') || host.starts_with('[') {
            // Bare IPv6 without brackets, or a malformed bracketed one.
            return Err(BackendError::NotHostPort);
        }
        let port = parse_port(port)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Backend {
                host: BackendHost::Ip(ip),
                port,
            });
        }
        let name = Hostname::parse(host).map_err(BackendError::BadHost)?;
        if name.is_wildcard() {
            return Err(BackendError::BadHost(HostnameError::BadWildcard));
        }
        Ok(Backend {
            host: BackendHost::Name(name.0),
            port,
        })
    }

    /// The literal socket address when the host is an IP (no resolution needed).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match &self.host {
            BackendHost::Ip(ip) => Some(SocketAddr::new(*ip, self.port)),
            BackendHost::Name(_) => None,
        }
    }

    /// Host and port for resolution.
    pub fn host_port(&self) -> (String, u16) {
        match &self.host {
            BackendHost::Ip(ip) => (ip.to_string(), self.port),
            BackendHost::Name(name) => (name.to_string(), self.port),
        }
    }
}

fn parse_port(text: &str) -> Result<u16, BackendError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BackendError::BadPort);
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(BackendError::BadPort),
        Ok(port) => Ok(port),
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            BackendHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            BackendHost::Ip(ip) => write!(f, "{ip}:{}", self.port),
            BackendHost::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

/// One routing decision's worth of data: cheap to clone (an `Arc`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Never empty; a connection tries them in the order `balance` picks.
    pub backends: Backends,
    pub balance: Balance,
    /// The active health check, if the route has one.
    pub health: Option<HealthCheck>,
    /// Send a PROXY v2 header to the backend before the client's bytes.
    pub send_proxy_protocol: bool,
    /// Relayed untouched (L4), or TLS terminated here and HTTP proxied (L7).
    pub mode: Mode,
}

crate::labelled_enum! {
    /// A route's mode (SPEC §6.2). Its label (`"l4"`, `"l7"`) is the TOML
    /// value, the store's `mode` column and the CLI's `--mode`.
    #[derive(Clone, Debug, PartialEq, Eq, Default)]
    pub enum Mode {
        /// The TLS stream is relayed to the backend untouched.
        #[default]
        L4 => "l4",
        /// mc-proxy terminates TLS with the route's certificate and
        /// reverse-proxies HTTP/1.1 and HTTP/2 to the backend.
        L7(Arc<L7Route>) => "l7",
    }
}

impl Target {
    /// An L4 route to one backend, no health check.
    pub fn l4(backend: Backend) -> Self {
        Target {
            backends: Backends::one(backend),
            balance: Balance::default(),
            health: None,
            send_proxy_protocol: false,
            mode: Mode::L4,
        }
    }

    /// The route's first backend (what a single `backend` field shows).
    pub fn backend(&self) -> &Backend {
        self.backends.first()
    }
}

impl Mode {
    pub fn l7(&self) -> Option<&Arc<L7Route>> {
        match self {
            Mode::L4 => None,
            Mode::L7(l7) => Some(l7),
        }
    }
}

crate::labelled_enum! {
    /// What an L7 route speaks to its backend.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub enum BackendProtocol {
        /// Over TLS the backend's ALPN decides; in plaintext HTTP/1.1, and
        /// gRPC requests over HTTP/2 with prior knowledge (h2c).
        #[default]
        Auto => "auto",
        Http1 => "http1",
        H2 => "h2",
    }
}

impl BackendProtocol {
    /// `"auto"`, `"http1"` or `"h2"`; the empty string is `auto` (the
    /// admin API's default).
    pub fn parse(text: &str) -> Option<Self> {
        if text.is_empty() {
            return Some(BackendProtocol::Auto);
        }
        [Self::Auto, Self::Http1, Self::H2]
            .into_iter()
            .find(|protocol| protocol.label() == text)
    }
}

/// Validates and normalises an L7 route's `backend_server_name`: a DNS
/// name by [`Hostname`]'s rules without a wildcard (lower case, no trailing
/// dot), or an IP address (its canonical text). The result is what
/// [`L7Route::backend_server_name`] holds.
pub fn parse_server_name(text: &str) -> Result<String, HostnameError> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let name = Hostname::parse(text)?;
    if name.is_wildcard() {
        return Err(HostnameError::BadWildcard);
    }
    Ok(name.0.into_string())
}

crate::labelled_enum! {
    /// An L7-only route setting. Its label is the TOML key and, after
    /// `route.`, the admin API field.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum L7Key {
        TlsCert => "tls_cert",
        TlsKey => "tls_key",
        BackendTls => "backend_tls",
        BackendCa => "backend_ca",
        BackendServerName => "backend_server_name",
        BackendProtocol => "backend_protocol",
    }
}

/// Why a route's mode and L7 settings do not make a [`Mode`]; the key at
/// fault is named. The config and the admin API word each their own way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeError {
    /// Set on an L4 route.
    L7Only(L7Key),
    /// `tls_cert` or `tls_key` missing on an L7 route.
    RequiredForL7(L7Key),
    /// `backend_ca` or `backend_server_name` without `backend_tls`.
    NeedsBackendTls(L7Key),
}

/// A route's L7 settings as given (each `None` when not set), already
/// parsed one by one: the one place the rules between them are checked,
/// for the config and the admin API alike.
#[derive(Clone, Debug, Default)]
pub struct L7Settings {
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub backend_tls: Option<bool>,
    pub backend_ca: Option<PathBuf>,
    pub backend_server_name: Option<String>,
    pub backend_protocol: Option<BackendProtocol>,
}

impl L7Settings {
    /// The route's [`Mode`]: L4 takes none of the settings; L7 needs a
    /// certificate and key, and `backend_ca`/`backend_server_name` only
    /// go with `backend_tls`.
    pub fn into_mode(self, l7: bool) -> Result<Mode, ModeError> {
        if !l7 {
            let set = [
                (L7Key::TlsCert, self.tls_cert.is_some()),
                (L7Key::TlsKey, self.tls_key.is_some()),
                (L7Key::BackendTls, self.backend_tls.is_some()),
                (L7Key::BackendCa, self.backend_ca.is_some()),
                (L7Key::BackendServerName, self.backend_server_name.is_some()),
                (L7Key::BackendProtocol, self.backend_protocol.is_some()),
            ];
            return match set.into_iter().find(|(_, set)| *set) {
                Some((key, _)) => Err(ModeError::L7Only(key)),
                None => Ok(Mode::L4),
            };
        }
        let tls_cert = self
            .tls_cert
            .ok_or(ModeError::RequiredForL7(L7Key::TlsCert))?;
        let tls_key = self
            .tls_key
            .ok_or(ModeError::RequiredForL7(L7Key::TlsKey))?;
        let backend_tls = self.backend_tls.unwrap_or(false);
        if !backend_tls {
            if self.backend_ca.is_some() {
                return Err(ModeError::NeedsBackendTls(L7Key::BackendCa));
            }
            if self.backend_server_name.is_some() {
                return Err(ModeError::NeedsBackendTls(L7Key::BackendServerName));
            }
        }
        Ok(Mode::L7(Arc::new(L7Route {
            tls_cert,
            tls_key,
            backend_tls,
            backend_ca: self.backend_ca,
            backend_server_name: self.backend_server_name,
            backend_protocol: self.backend_protocol.unwrap_or_default(),
        })))
    }
}

/// An L7 route's settings, as configured (paths are not read here).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct L7Route {
    /// PEM chain, leaf first.
    pub tls_cert: PathBuf,
    /// PEM private key.
    pub tls_key: PathBuf,
    /// TLS to the backend, verified.
    pub backend_tls: bool,
    /// Roots that verify the backend (`None`: the system roots).
    pub backend_ca: Option<PathBuf>,
    /// The name verified and sent as SNI (`None`: the backend's host);
    /// normalised by [`parse_server_name`].
    pub backend_server_name: Option<String>,
    pub backend_protocol: BackendProtocol,
}

/// An immutable hostname → target map: the unit that writers swap.
#[derive(Clone, Debug, Default)]
pub struct RouteMap {
    entries: HashMap<Hostname, Arc<Target>>,
}

impl RouteMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, hostname: Hostname, target: Target) -> Option<Arc<Target>> {
        self.entries.insert(hostname, Arc::new(target))
    }

    pub fn remove(&mut self, hostname: &Hostname) -> Option<Arc<Target>> {
        self.entries.remove(hostname)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, hostname: &Hostname) -> Option<&Arc<Target>> {
        self.entries.get(hostname)
    }

    /// Entries, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (&Hostname, &Arc<Target>)> {
        self.entries.iter()
    }

    /// Entries sorted by hostname.
    pub fn sorted(&self) -> Vec<(Hostname, Arc<Target>)> {
        let mut all: Vec<_> = self
            .entries
            .iter()
            .map(|(h, t)| (h.clone(), t.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Looks up an SNI name exactly as the client sent it: normalised here,
    /// exact match first, then `*.` + the name without its first label,
    /// then the default route `*` (which also takes names that are not
    /// valid hostnames).
    /// Cost is one normalisation into a stack buffer plus at most two hash
    /// lookups: O(length of the name), whatever the table size, and no
    /// allocation.
    pub fn lookup(&self, sni: &str) -> Option<Arc<Target>> {
        self.lookup_entry(sni).map(|(_, target)| target.clone())
    }

    /// [`RouteMap::lookup`], with the route's own hostname (the exact name,
    /// the wildcard that matched, or `*`).
    pub fn lookup_entry(&self, sni: &str) -> Option<(&Hostname, &Arc<Target>)> {
        self.lookup_named(sni).or_else(|| self.default_entry())
    }

    /// The default route (`*`), which takes what no other route matches
    /// and ClientHellos without SNI.
    pub fn default_entry(&self) -> Option<(&Hostname, &Arc<Target>)> {
        self.entries.get_key_value(DEFAULT_ROUTE)
    }

    /// Exact match, then the one-label wildcard; never the default route.
    fn lookup_named(&self, sni: &str) -> Option<(&Hostname, &Arc<Target>)> {
        let trimmed = sni.strip_suffix('.').unwrap_or(sni);
        let len = trimmed.len();
        if len == 0 || len > MAX_HOSTNAME_LEN || trimmed.contains('*') {
            return None;
        }
        // The name sits at [2..2 + len]; the wildcard key is written in
        // place over the end of the first label: "a.b.c" → "*.b.c".
        let mut buffer = [0u8; MAX_HOSTNAME_LEN + 2];
        buffer[2..2 + len].copy_from_slice(trimmed.as_bytes());
        buffer[2..2 + len].make_ascii_lowercase();
        let name = std::str::from_utf8(&buffer[2..2 + len]).ok()?;
        check_labels(name).ok()?;
        if let Some(entry) = self.entries.get_key_value(name) {
            return Some(entry);
        }
        let first_dot = name.find('.')?;
        let start = 1 + first_dot;
        buffer[start] = b'*';
        let wildcard = std::str::from_utf8(&buffer[start..2 + len]).ok()?;
        self.entries.get_key_value(wildcard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(b: &str) -> Target {
        Target {
            backends: Backends::one(Backend::parse(b).unwrap()),
            balance: Default::default(),
            health: None,
            send_proxy_protocol: false,
            mode: Mode::L4,
        }
    }

    #[test]
    fn hostnames_are_normalised() {
        assert_eq!(
            Hostname::parse("A.Example.NET.").unwrap().as_str(),
            "a.example.net"
        );
        assert_eq!(Hostname::parse("a.test").unwrap().as_str(), "a.test");
        assert_eq!(Hostname::parse("localhost").unwrap().as_str(), "localhost");
    }

    #[test]
    fn bad_hostnames_are_rejected() {
        for bad in [
            "", ".", "a..b", "a b", "-a.test", "a-.test", "a.test..", "*.", "**", "*.test", "a*.x",
            "*.*.x", "a.*.x", "é.test", "a/b", "a:443",
        ] {
            assert!(Hostname::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Hostname::parse(&"a".repeat(64)).is_err());
        assert!(Hostname::parse(&format!("{}.x", "a.".repeat(126))).is_err());
        assert!(Hostname::parse("*.example.net").is_ok());
    }

    #[test]
    fn backends_parse_and_print() {
        for (input, shown) in [
            ("127.0.0.1:80", "127.0.0.1:80"),
            ("[::1]:8443", "[::1]:8443"),
            ("Backend.Internal:443", "backend.internal:443"),
        ] {
            assert_eq!(Backend::parse(input).unwrap().to_string(), shown);
        }
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            ":80",
            "::1:80",
            "[::1]",
            "a:b",
            "a:+80",
            "host name:80",
            "*.x.y:80",
            "[zz]:80",
        ] {
            assert!(Backend::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// The lookup as first written (allocating, via `Hostname::parse`): the
    /// in-place one must answer exactly the same.
    fn reference_lookup(map: &RouteMap, sni: &str) -> Option<Arc<Target>> {
        let name = Hostname::parse(sni).ok()?;
        if name.is_wildcard() {
            return None;
        }
        if let Some(target) = map.entries.get(&name) {
            return Some(target.clone());
        }
        let (_, parent) = name.as_str().split_once('.')?;
        map.entries
            .get(&Hostname(format!("*.{parent}").into_boxed_str()))
            .cloned()
    }

    #[test]
    fn in_place_lookup_agrees_with_the_allocating_one() {
        let mut map = RouteMap::new();
        let long_label = "a".repeat(63);
        let longest = format!("{long_label}.{long_label}.{long_label}.{}", "b".repeat(61));
        assert_eq!(longest.len(), MAX_HOSTNAME_LEN);
        for (i, host) in [
            "*.example.net",
            "exact.example.net",
            "localhost",
            "*.b.c",
            "x_y.b.c",
            longest.as_str(),
            &format!("*.{long_label}.{long_label}.{}", "b".repeat(61)),
        ]
        .iter()
        .enumerate()
        {
            map.insert(
                Hostname::parse(host).unwrap(),
                target(&format!("127.0.0.1:{}", i + 1)),
            );
        }
        let wildcard_of_longest = format!("z.{long_label}.{long_label}.{}", "b".repeat(61));
        for sni in [
            "a.example.net",
            "A.EXAMPLE.NET.",
            "exact.example.net",
            "a.b.example.net",
            "example.net",
            "*.example.net",
            "a*.example.net",
            "localhost",
            "LOCALHOST.",
            "localhost..",
            "x",
            "",
            ".",
            "..",
            "a..example.net",
            ".example.net",
            "-a.example.net",
            "a-.example.net",
            "é.example.net",
            "a b.example.net",
            "a.b.c",
            "x_y.b.c",
            "X_Y.B.C",
            "_.b.c",
            longest.as_str(),
            &longest.to_uppercase(),
            &format!("{longest}."),
            &format!("{longest}x"),
            &format!("a{longest}"),
            wildcard_of_longest.as_str(),
            &format!("{}.b.c", "q".repeat(64)),
        ] {
            assert_eq!(map.lookup(sni), reference_lookup(&map, sni), "{sni:?}");
        }
        assert!(map.lookup(&wildcard_of_longest).is_some());
    }

    #[test]
    fn lookup_exact_then_one_label_wildcard() {
        let mut map = RouteMap::new();
        map.insert(
            Hostname::parse("*.example.net").unwrap(),
            target("127.0.0.1:1"),
        );
        map.insert(
            Hostname::parse("exact.example.net").unwrap(),
            target("127.0.0.1:2"),
        );
        let port = |sni: &str| map.lookup(sni).map(|t| t.backend().to_string());
        assert_eq!(port("EXACT.example.net."), Some("127.0.0.1:2".into()));
        assert_eq!(port("a.example.net"), Some("127.0.0.1:1".into()));
        assert_eq!(port("a.b.example.net"), None);
        assert_eq!(port("example.net"), None);
        assert_eq!(port("*.example.net"), None);
        assert_eq!(port(""), None);
    }

    #[test]
    fn the_default_route_takes_what_nothing_else_matches() {
        let star = Hostname::parse("*").unwrap();
        assert!(star.is_default() && star.is_wildcard());
        assert_eq!(star.as_str(), "*");
        assert!(!Hostname::parse("*.example.net").unwrap().is_default());
        for bad in ["*:80", "*.:80"] {
            assert!(Backend::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_server_name("*").is_err());

        let mut map = RouteMap::new();
        map.insert(
            Hostname::parse("exact.example.net").unwrap(),
            target("127.0.0.1:1"),
        );
        map.insert(
            Hostname::parse("*.example.net").unwrap(),
            target("127.0.0.1:2"),
        );
        assert!(map.default_entry().is_none());
        assert_eq!(map.lookup("other.test"), None);
        map.insert(star.clone(), target("127.0.0.1:3"));
        let port = |sni: &str| map.lookup(sni).map(|t| t.backend().to_string());
        assert_eq!(port("exact.example.net"), Some("127.0.0.1:1".into()));
        assert_eq!(port("a.example.net"), Some("127.0.0.1:2".into()));
        for other in [
            "other.test",
            "example.net",
            "a.b.example.net",
            "x",
            "",
            "*",
            "bad name",
            "é",
        ] {
            assert_eq!(port(other), Some("127.0.0.1:3".into()), "{other:?}");
        }
        let (name, _) = map.lookup_entry("other.test").unwrap();
        assert!(name.is_default());
        assert_eq!(map.default_entry().map(|(n, _)| n.as_str()), Some("*"));
    }

    #[test]
    fn l7_settings_follow_the_rules_between_them() {
        let l7 = || L7Settings {
            tls_cert: Some("/c.pem".into()),
            tls_key: Some("/c.key".into()),
            ..L7Settings::default()
        };
        assert_eq!(L7Settings::default().into_mode(false), Ok(Mode::L4));
        assert_eq!(
            l7().into_mode(false),
            Err(ModeError::L7Only(L7Key::TlsCert))
        );
        let only_protocol = L7Settings {
            backend_protocol: Some(BackendProtocol::H2),
            ..L7Settings::default()
        };
        assert_eq!(
            only_protocol.into_mode(false),
            Err(ModeError::L7Only(L7Key::BackendProtocol))
        );
        assert_eq!(
            L7Settings::default().into_mode(true),
            Err(ModeError::RequiredForL7(L7Key::TlsCert))
        );
        let no_key = L7Settings {
            tls_key: None,
            ..l7()
        };
        assert_eq!(
            no_key.into_mode(true),
            Err(ModeError::RequiredForL7(L7Key::TlsKey))
        );
        for (settings, key) in [
            (
                L7Settings {
                    backend_ca: Some("/ca.pem".into()),
                    ..l7()
                },
                L7Key::BackendCa,
            ),
            (
                L7Settings {
                    backend_server_name: Some("a.test".into()),
                    backend_tls: Some(false),
                    ..l7()
                },
                L7Key::BackendServerName,
            ),
        ] {
            assert_eq!(
                settings.into_mode(true),
                Err(ModeError::NeedsBackendTls(key))
            );
        }
        let full = L7Settings {
            backend_tls: Some(true),
            backend_ca: Some("/ca.pem".into()),
            backend_server_name: Some("a.test".into()),
            ..l7()
        }
        .into_mode(true)
        .unwrap();
        let route = full.l7().unwrap();
        assert!(route.backend_tls);
        assert_eq!(route.backend_protocol, BackendProtocol::Auto);
        assert_eq!(L7Key::LABELS[3], "backend_ca");
    }

    #[test]
    fn modes_and_backend_protocols_have_their_spec_labels() {
        assert_eq!(Mode::default(), Mode::L4);
        assert_eq!(Mode::LABELS, ["l4", "l7"]);
        assert_eq!(Mode::L4.label(), "l4");
        assert!(Mode::L4.l7().is_none());
        let l7 = Arc::new(L7Route {
            tls_cert: "/srv/mc-proxy/certs/git.pem".into(),
            tls_key: "/srv/mc-proxy/certs/git.key".into(),
            backend_tls: false,
            backend_ca: None,
            backend_server_name: None,
            backend_protocol: BackendProtocol::default(),
        });
        let mode = Mode::L7(l7.clone());
        assert_eq!(mode.label(), "l7");
        assert_eq!(mode.l7(), Some(&l7));
        assert_eq!(BackendProtocol::LABELS, ["auto", "http1", "h2"]);
        for (text, parsed) in [
            ("", BackendProtocol::Auto),
            ("auto", BackendProtocol::Auto),
            ("http1", BackendProtocol::Http1),
            ("h2", BackendProtocol::H2),
        ] {
            assert_eq!(BackendProtocol::parse(text), Some(parsed), "{text:?}");
        }
        for bad in ["AUTO", "h2c", "http/1.1", " h2", "http2"] {
            assert_eq!(BackendProtocol::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn server_names_are_names_or_ips() {
        for (input, shown) in [
            ("Git.SVC.internal.", "git.svc.internal"),
            ("localhost", "localhost"),
            ("192.0.2.7", "192.0.2.7"),
            ("2001:DB8::1", "2001:db8::1"),
        ] {
            assert_eq!(parse_server_name(input).as_deref(), Ok(shown), "{input:?}");
        }
        for bad in ["", "*.example.net", "a b", "[::1]", "host:443", "-a.test"] {
            assert!(parse_server_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
