//! TOML → validated `Config`: the only place raw config strings are parsed.
//!
//! Every error names the TOML path of the bad field
//! (`listeners[1].routes[0].backend: ...`). Nothing downstream re-checks a
//! value or handles a raw string like `"5s"` or `":443"`.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use wire::route::{Backend, Hostname};
use wire::rule::{Rule, RuleKind};

/// Where the config is read from when `-c` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/srv/mc-proxy/mc-proxy.toml";

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from; relative paths inside are resolved
    /// against its directory.
    pub source: PathBuf,
    pub database: DatabaseConfig,
    pub listeners: Vec<ListenerConfig>,
    pub grpc: Option<GrpcConfig>,
    pub firewall: FirewallConfig,
    pub proxy: ProxyConfig,
    pub log: LogConfig,
    pub metrics: Option<MetricsConfig>,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub addr: ListenAddr,
    /// Expect a PROXY v1/v2 header before the ClientHello.
    pub proxy_protocol: bool,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub hostname: Hostname,
    pub backend: Backend,
    pub send_proxy_protocol: bool,
}

/// A listener address: its text exactly as written (the listener's name in
/// the store and the admin API) and what to bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    pub text: String,
    pub bind: BindAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BindAddr {
    /// `":443"`: every interface, IPv4 and IPv6 (a dual-stack `[::]` socket).
    AllInterfaces(u16),
    Socket(SocketAddr),
}

impl BindAddr {
    pub fn socket_addr(self) -> SocketAddr {
        match self {
            BindAddr::AllInterfaces(port) => {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
            }
            BindAddr::Socket(sa) => sa,
        }
    }
}

impl ListenAddr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bind = if let Some(port) = text.strip_prefix(':') {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("{text:?} is not \":PORT\" with a port from 0 to 65535"))?;
            BindAddr::AllInterfaces(port)
        } else {
            let sa: SocketAddr = text.parse().map_err(|_| {
                format!("{text:?} is not \":PORT\", \"IPv4:PORT\" or \"[IPv6]:PORT\"")
            })?;
            BindAddr::Socket(sa)
        };
        Ok(ListenAddr {
            text: text.to_string(),
            bind,
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[derive(Debug, Clone)]
pub struct GrpcConfig {
    pub addr: AdminAddr,
    /// Server identity; always present for TCP (enforced here).
    pub tls: Option<ServerTls>,
    /// What the CLI clients use to reach the server over TCP.
    pub client: ClientTls,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl AdminAddr {
    /// `unix:PATH` or `IP:PORT`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("\"unix:\" needs a socket path".into());
            }
            return Ok(AdminAddr::Unix(PathBuf::from(path)));
        }
        text.parse::<SocketAddr>()
            .map(AdminAddr::Tcp)
            .map_err(|_| format!("{text:?} is neither \"unix:PATH\" nor \"IP:PORT\""))
    }
}

impl fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            AdminAddr::Tcp(sa) => write!(f, "{sa}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set = mTLS: clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct FirewallConfig {
    pub geoip_db: Option<PathBuf>,
    /// The TOML's rules: IPs, then CIDRs, then countries, duplicates removed.
    pub rules: Vec<Rule>,
    /// New connections per client IP per `rate_window`; 0 = off.
    pub rate_limit: u32,
    pub rate_window: Duration,
    /// Open connections one client (an IPv4 address or an IPv6 /64) may
    /// hold at once; `None` = no limit (`max_connections_per_ip = 0`).
    pub max_connections_per_ip: Option<NonZeroU32>,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Client connections open at once over all listeners; `None` = derived
    /// from RLIMIT_NOFILE at start (`max_connections = 0`).
    pub max_connections: Option<NonZeroU32>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(30),
            max_connections: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `error|warn|info|debug|trace`; `RUST_LOG` overrides.
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub addr: SocketAddr,
}

/// A configuration error: the file, the TOML path of the bad field, and what
/// is wrong with it. Displayed as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

// ---- the raw TOML model -------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database: Option<RawDatabase>,
    #[serde(default)]
    listeners: Vec<RawListener>,
    grpc: Option<RawGrpc>,
    #[serde(default)]
    firewall: RawFirewall,
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    log: RawLog,
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    path: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    addr: Option<Parsed<ListenAddr>>,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    hostname: Parsed<Hostname>,
    backend: Parsed<Backend>,
    #[serde(default)]
    send_proxy_protocol: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpc {
    addr: Parsed<AdminAddr>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFirewall {
    geoip_db: Option<PathBuf>,
    #[serde(default)]
    blocked_ips: Vec<Parsed<IpRule>>,
    #[serde(default)]
    blocked_cidrs: Vec<Parsed<CidrRule>>,
    #[serde(default)]
    blocked_countries: Vec<Parsed<CountryRule>>,
    #[serde(default)]
    rate_limit: u32,
    rate_window: Option<Parsed<ConfigDuration>>,
    #[serde(default)]
    max_connections_per_ip: u32,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    connect_timeout: Option<Parsed<ConfigDuration>>,
    handshake_timeout: Option<Parsed<ConfigDuration>>,
    idle_timeout: Option<Parsed<ConfigDuration>>,
    shutdown_timeout: Option<Parsed<ConfigDuration>>,
    #[serde(default)]
    max_connections: u32,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<Parsed<LogLevel>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    addr: Option<Parsed<SocketAddrValue>>,
}

/// A string field parsed by `T::parse_field` during deserialisation, so that
/// the error carries the field's TOML path.
struct Parsed<T>(T);

trait ParseField: Sized {
    fn parse_field(text: &str) -> Result<Self, String>;
}

impl<'de, T: ParseField> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        T::parse_field(&text).map(Parsed).map_err(de::Error::custom)
    }
}

impl ParseField for ListenAddr {
    fn parse_field(text: &str) -> Result<Self, String> {
        ListenAddr::parse(text)
    }
}

impl ParseField for Hostname {
    fn parse_field(text: &str) -> Result<Self, String> {
        Hostname::parse(text).map_err(|e| format!("{text:?}: {e}"))
    }
}

impl ParseField for Backend {
    fn parse_field(text: &str) -> Result<Self, String> {
        Backend::parse(text).map_err(|e| format!("{text:?}: {e}"))
    }
}

impl ParseField for AdminAddr {
    fn parse_field(text: &str) -> Result<Self, String> {
        AdminAddr::parse(text)
    }
}

struct IpRule(Rule);
struct CidrRule(Rule);
struct CountryRule(Rule);

impl ParseField for IpRule {
    fn parse_field(text: &str) -> Result<Self, String> {
        Rule::parse(RuleKind::Ip, text)
            .map(IpRule)
            .map_err(|e| e.to_string())
    }
}

impl ParseField for CidrRule {
    fn parse_field(text: &str) -> Result<Self, String> {
        Rule::parse(RuleKind::Cidr, text)
            .map(CidrRule)
            .map_err(|e| e.to_string())
    }
}

impl ParseField for CountryRule {
    fn parse_field(text: &str) -> Result<Self, String> {
        Rule::parse(RuleKind::Country, text)
            .map(CountryRule)
            .map_err(|e| e.to_string())
    }
}

struct ConfigDuration(Duration);

impl ParseField for ConfigDuration {
    fn parse_field(text: &str) -> Result<Self, String> {
        parse_duration(text).map(ConfigDuration)
    }
}

/// `"250ms"`, `"5s"`, `"2m"`, `"1h"` (and combinations like `"1m30s"`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.trim() != text || text.is_empty() {
        return Err(format!(
            "{text:?} is not a duration like \"250ms\", \"5s\", \"2m\" or \"1h\""
        ));
    }
    humantime::parse_duration(text)
        .map_err(|_| format!("{text:?} is not a duration like \"250ms\", \"5s\", \"2m\" or \"1h\""))
}

struct LogLevel(String);

impl ParseField for LogLevel {
    fn parse_field(text: &str) -> Result<Self, String> {
        match text {
            "error" | "warn" | "info" | "debug" | "trace" => Ok(LogLevel(text.to_string())),
            _ => Err(format!(
                "{text:?} is not one of error, warn, info, debug, trace"
            )),
        }
    }
}

struct SocketAddrValue(SocketAddr);

impl ParseField for SocketAddrValue {
    fn parse_field(text: &str) -> Result<Self, String> {
        text.parse()
            .map(SocketAddrValue)
            .map_err(|_| format!("{text:?} is not IP:PORT"))
    }
}

// ---- loading -------------------------------------------------------------

impl Config {
    /// Reads and validates a config file. Does no other I/O.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            key: String::new(),
            message: format!("cannot read config: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses config text as if read from `source`.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let fail = |key: &str, message: String| ConfigError {
            file: source.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let deserializer =
            toml::Deserializer::parse(text).map_err(|e| fail("", toml_message(text, &e)))?;
        let raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            fail(&key, toml_message(text, e.inner()))
        })?;

        let base = source.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

        let database = raw.database.ok_or_else(|| {
            fail(
                "database",
                "missing section [database] (database.path is required)".into(),
            )
        })?;
        let db_path = database
            .path
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| fail("database.path", "required".into()))?;

        let mut listeners = Vec::with_capacity(raw.listeners.len());
        let mut seen_binds = HashSet::new();
        for (i, listener) in raw.listeners.into_iter().enumerate() {
            let addr = listener
                .addr
                .ok_or_else(|| fail(&format!("listeners[{i}].addr"), "required".into()))?
                .0;
            if !seen_binds.insert(addr.bind) {
                return Err(fail(
                    &format!("listeners[{i}].addr"),
                    format!("duplicate listener address {:?}", addr.text),
                ));
            }
            let mut hostnames = HashSet::new();
            let mut routes = Vec::with_capacity(listener.routes.len());
            for (j, route) in listener.routes.into_iter().enumerate() {
                let hostname = route.hostname.0;
                if !hostnames.insert(hostname.clone()) {
                    return Err(fail(
                        &format!("listeners[{i}].routes[{j}].hostname"),
                        format!("duplicate hostname {hostname:?} in this listener"),
                    ));
                }
                routes.push(RouteConfig {
                    hostname,
                    backend: route.backend.0,
                    send_proxy_protocol: route.send_proxy_protocol,
                });
            }
            listeners.push(ListenerConfig {
                addr,
                proxy_protocol: listener.proxy_protocol,
                routes,
            });
        }

        let grpc = raw
            .grpc
            .map(|g| -> Result<GrpcConfig, ConfigError> {
                let tls = match (g.tls_cert, g.tls_key) {
                    (Some(cert), Some(key)) => Some(ServerTls {
                        cert: resolve(cert),
                        key: resolve(key),
                        client_ca: g.client_ca.map(resolve),
                    }),
                    (Some(_), None) => {
                        return Err(fail("grpc.tls_key", "required when grpc.tls_cert is set".into()))
                    }
                    (None, Some(_)) => {
                        return Err(fail("grpc.tls_cert", "required when grpc.tls_key is set".into()))
                    }
                    (None, None) => {
                        if g.client_ca.is_some() {
                            return Err(fail(
                                "grpc.client_ca",
                                "needs grpc.tls_cert and grpc.tls_key (mTLS is only for TCP)".into(),
                            ));
                        }
                        None
                    }
                };
                let addr = match g.addr.0 {
                    AdminAddr::Unix(p) => AdminAddr::Unix(resolve(p)),
                    tcp => tcp,
                };
                if matches!(addr, AdminAddr::Tcp(_)) && tls.is_none() {
                    return Err(fail(
                        "grpc.tls_cert",
                        "required for a TCP grpc.addr: the admin API is never served as plaintext TCP".into(),
                    ));
                }
                if g.client_cert.is_some() != g.client_key.is_some() {
                    return Err(fail(
                        if g.client_cert.is_some() { "grpc.client_key" } else { "grpc.client_cert" },
                        "grpc.client_cert and grpc.client_key go together".into(),
                    ));
                }
                Ok(GrpcConfig {
                    addr,
                    tls,
                    client: ClientTls {
                        ca_cert: g.ca_cert.map(resolve),
                        client_cert: g.client_cert.map(resolve),
                        client_key: g.client_key.map(resolve),
                    },
                })
            })
            .transpose()?;

        let fw = raw.firewall;
        let geoip_db = fw
            .geoip_db
            .filter(|p| !p.as_os_str().is_empty())
            .map(resolve);
        if !fw.blocked_countries.is_empty() && geoip_db.is_none() {
            return Err(fail(
                "firewall.geoip_db",
                "required when firewall.blocked_countries is set".into(),
            ));
        }
        let mut rules: Vec<Rule> = Vec::new();
        let mut seen_rules = HashSet::new();
        let all = fw
            .blocked_ips
            .into_iter()
            .map(|r| r.0 .0)
            .chain(fw.blocked_cidrs.into_iter().map(|r| r.0 .0))
            .chain(fw.blocked_countries.into_iter().map(|r| r.0 .0));
        for rule in all {
            if seen_rules.insert(rule) {
                rules.push(rule);
            }
        }
        let rate_window = fw
            .rate_window
            .map(|d| d.0 .0)
            .unwrap_or(Duration::from_secs(10));
        if fw.rate_limit > 0 && rate_window.is_zero() {
            return Err(fail(
                "firewall.rate_window",
                "must be longer than zero when firewall.rate_limit is set".into(),
            ));
        }

        let defaults = ProxyConfig::default();
        let mut proxy = ProxyConfig {
            connect_timeout: raw
                .proxy
                .connect_timeout
                .map_or(defaults.connect_timeout, |d| d.0 .0),
            handshake_timeout: raw
                .proxy
                .handshake_timeout
                .map_or(defaults.handshake_timeout, |d| d.0 .0),
            idle_timeout: raw
                .proxy
                .idle_timeout
                .map_or(defaults.idle_timeout, |d| d.0 .0),
            shutdown_timeout: raw
                .proxy
                .shutdown_timeout
                .map_or(defaults.shutdown_timeout, |d| d.0 .0),
            max_connections: NonZeroU32::new(raw.proxy.max_connections),
        };
        for (key, value) in [
            ("proxy.connect_timeout", &mut proxy.connect_timeout),
            ("proxy.handshake_timeout", &mut proxy.handshake_timeout),
            ("proxy.idle_timeout", &mut proxy.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(fail(key, "must be longer than zero".into()));
            }
        }

        Ok(Config {
            source: source.to_path_buf(),
            database: DatabaseConfig {
                path: resolve(db_path),
            },
            listeners,
            grpc,
            firewall: FirewallConfig {
                geoip_db,
                rules,
                rate_limit: fw.rate_limit,
                rate_window,
                max_connections_per_ip: NonZeroU32::new(fw.max_connections_per_ip),
            },
            proxy,
            log: LogConfig {
                level: raw.log.level.map_or_else(|| "info".to_string(), |l| l.0 .0),
            },
            metrics: raw
                .metrics
                .map(|m| match m.addr {
                    Some(addr) => Ok(MetricsConfig { addr: addr.0 .0 }),
                    None => Err(fail(
                        "metrics.addr",
                        "required in a [metrics] section (like \"127.0.0.1:9091\")".into(),
                    )),
                })
                .transpose()?,
        })
    }
}

/// One line: the parser's message and, when known, the line number.
fn toml_message(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{message} (line {line})")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/mc/mc-proxy.toml"))
    }

    fn key_of(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.key,
        }
    }

    const MINIMAL: &str = "[database]\npath = \"db/mc.db\"\n";

    #[test]
    fn minimal_config_gets_defaults_and_resolves_paths() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.database.path, PathBuf::from("/etc/mc/db/mc.db"));
        assert_eq!(config.proxy.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.proxy.handshake_timeout, Duration::from_secs(10));
        assert_eq!(config.proxy.idle_timeout, Duration::from_secs(300));
        assert_eq!(config.proxy.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(config.firewall.rate_window, Duration::from_secs(10));
        assert_eq!(config.log.level, "info");
        assert!(config.grpc.is_none());
    }

    #[test]
    fn full_config_parses() {
        let text = r#"
[database]
path = "/srv/mc-proxy/mc-proxy.db"
[[listeners]]
addr = ":443"
  [[listeners.routes]]
  hostname = "Metacrypt.Example.NET."
  backend = "127.0.0.1:18443"
[[listeners]]
addr = "[::1]:8443"
  [[listeners.routes]]
  hostname = "b.test"
  backend = "backend.internal:443"
[grpc]
addr = "127.0.0.1:9443"
tls_cert = "certs/admin.pem"
tls_key = "certs/admin.key"
client_ca = "certs/ca.pem"
[firewall]
blocked_ips = ["192.0.2.7"]
blocked_cidrs = ["198.51.100.0/24", "2001:db8::/32"]
blocked_countries = ["kp"]
geoip_db = "/srv/mc-proxy/GeoLite2-Country.mmdb"
rate_limit = 20
rate_window = "10s"
[proxy]
connect_timeout = "250ms"
idle_timeout = "2m"
shutdown_timeout = "1h"
[log]
level = "debug"
"#;
        let config = parse(text).unwrap();
        assert_eq!(config.listeners[0].addr.bind, BindAddr::AllInterfaces(443));
        assert_eq!(
            config.listeners[0].routes[0].hostname.as_str(),
            "metacrypt.example.net"
        );
        assert_eq!(config.listeners[1].addr.text, "[::1]:8443");
        assert_eq!(config.proxy.connect_timeout, Duration::from_millis(250));
        assert_eq!(config.proxy.idle_timeout, Duration::from_secs(120));
        assert_eq!(config.firewall.rules.len(), 4);
        assert_eq!(config.firewall.rules[3].value(), "KP");
        let grpc = config.grpc.unwrap();
        assert_eq!(
            grpc.tls.unwrap().client_ca,
            Some(PathBuf::from("/etc/mc/certs/ca.pem"))
        );
    }

    #[test]
    fn errors_name_the_toml_path() {
        let listener = |route: &str| {
            format!("{MINIMAL}[[listeners]]\naddr = \":1\"\n[[listeners]]\naddr = \":2\"\n  [[listeners.routes]]\n  hostname = \"ok.test\"\n  backend = \"127.0.0.1:1\"\n  [[listeners.routes]]\n{route}\n")
        };
        assert_eq!(
            key_of(&listener("  hostname = \"x.test\"\n  backend = \"nope\"")),
            "listeners[1].routes[1].backend"
        );
        assert_eq!(
            key_of(&listener(
                "  hostname = \"bad host\"\n  backend = \"127.0.0.1:1\""
            )),
            "listeners[1].routes[1].hostname"
        );
        assert_eq!(
            key_of(&listener(
                "  hostname = \"OK.test.\"\n  backend = \"127.0.0.1:1\""
            )),
            "listeners[1].routes[1].hostname"
        );
        assert_eq!(
            key_of(&listener(
                "  hostname = \"x.test\"\n  backend = \"127.0.0.1:1\"\n  colour = 1"
            )),
            "listeners[1].routes[1].colour"
        );
        assert_eq!(key_of("[database]\n"), "database.path");
        assert_eq!(key_of(""), "database");
        assert_eq!(key_of(&format!("{MINIMAL}bogus = 1\n")), "database.bogus");
        assert_eq!(key_of(&format!("bogus = 1\n{MINIMAL}")), "bogus");
        assert_eq!(
            key_of(&format!("{MINIMAL}[[listeners]]\n")),
            "listeners[0].addr"
        );
        assert_eq!(
            key_of(&format!(
                "{MINIMAL}[[listeners]]\naddr = \":1\"\n[[listeners]]\naddr = \":1\"\n"
            )),
            "listeners[1].addr"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}[[listeners]]\naddr = \"localhost:1\"\n")),
            "listeners[0].addr"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}[proxy]\nidle_timeout = \"5 parsecs\"\n")),
            "proxy.idle_timeout"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}[proxy]\nidle_timeout = \"0s\"\n")),
            "proxy.idle_timeout"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}[proxy]\nconnect_timeout = 5\n")),
            "proxy.connect_timeout"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}[firewall]\nblocked_ips = [\"1.2.3\"]\n")),
            "firewall.blocked_ips[0]"
        );
        assert_eq!(
            key_of(&format!(
                "{MINIMAL}[firewall]\nblocked_cidrs = [\"10.0.0.0/8\", \"10.0.0.0/40\"]\n"
            )),
            "firewall.blocked_cidrs[1]"
        );
        assert_eq!(
            key_of(&format!(
                "{MINIMAL}[firewall]\nblocked_countries = [\"GBR\"]\ngeoip_db = \"x\"\n"
            )),
            "firewall.blocked_countries[0]"
        );
        assert_eq!(
            key_of(&format!(
                "{MINIMAL}[firewall]\nblocked_countries = [\"GB\"]\n"
            )),
            "firewall.geoip_db"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}[firewall]\nrate_limit = -1\n")),
            "firewall.rate_limit"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}[grpc]\naddr = \"127.0.0.1:9443\"\n")),
            "grpc.tls_cert"
        );
        assert_eq!(
            key_of(&format!(
                "{MINIMAL}[grpc]\naddr = \"127.0.0.1:9443\"\ntls_cert = \"a\"\n"
            )),
            "grpc.tls_key"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}[grpc]\naddr = \"tcp://x\"\n")),
            "grpc.addr"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}[log]\nlevel = \"loud\"\n")),
            "log.level"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}[metrics]\naddr = \"x\"\n")),
            "metrics.addr"
        );
        // Regression: a [metrics] section without addr named only "metrics".
        assert_eq!(key_of(&format!("{MINIMAL}[metrics]\n")), "metrics.addr");
        assert_eq!(
            key_of(&format!(
                "{MINIMAL}[[listeners]]\naddr = \":1\"\nproxy_protocol = 1\n"
            )),
            "listeners[0].proxy_protocol"
        );
    }

    #[test]
    fn connection_limits_default_to_off_and_derived() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.firewall.max_connections_per_ip, None);
        assert_eq!(config.proxy.max_connections, None);
        let config = parse(&format!(
            "{MINIMAL}[firewall]\nmax_connections_per_ip = 0\n[proxy]\nmax_connections = 0\n"
        ))
        .unwrap();
        assert_eq!(config.firewall.max_connections_per_ip, None);
        assert_eq!(config.proxy.max_connections, None);
        let config = parse(&format!(
            "{MINIMAL}[firewall]\nmax_connections_per_ip = 3\n[proxy]\nmax_connections = 4294967295\n"
        ))
        .unwrap();
        assert_eq!(config.firewall.max_connections_per_ip, NonZeroU32::new(3));
        assert_eq!(config.proxy.max_connections, NonZeroU32::new(u32::MAX));
    }

    #[test]
    fn bad_connection_limits_name_their_toml_path() {
        for (section, key) in [
            ("firewall", "max_connections_per_ip"),
            ("proxy", "max_connections"),
        ] {
            for bad in ["-1", "1.5", "\"10\"", "4294967296", "true", "[]"] {
                let text = format!("{MINIMAL}[{section}]\n{key} = {bad}\n");
                let err = parse(&text).expect_err(&text);
                assert_eq!(err.key, format!("{section}.{key}"), "{bad}: {err}");
                let shown = err.to_string();
                assert!(
                    shown.contains(&format!("{section}.{key}: ")) && !shown.contains('\n'),
                    "{shown}"
                );
            }
        }
        // A misspelling is an unknown key, not a silent default.
        assert_eq!(
            key_of(&format!("{MINIMAL}[proxy]\nmax_connection = 5\n")),
            "proxy.max_connection"
        );
        assert_eq!(
            key_of(&format!("{MINIMAL}[firewall]\nmax_connections = 5\n")),
            "firewall.max_connections"
        );
    }

    #[test]
    fn error_display_is_one_line() {
        let err = parse("[database\npath=").unwrap_err();
        let shown = err.to_string();
        assert!(!shown.contains('\n'), "{shown}");
        assert!(shown.starts_with("/etc/mc/mc-proxy.toml: "), "{shown}");
    }

    #[test]
    fn unix_admin_socket_needs_no_tls() {
        let config = parse(&format!("{MINIMAL}[grpc]\naddr = \"unix:run/mc.sock\"\n")).unwrap();
        assert_eq!(
            config.grpc.unwrap().addr,
            AdminAddr::Unix(PathBuf::from("/etc/mc/run/mc.sock"))
        );
    }
}
