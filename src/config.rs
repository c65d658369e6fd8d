//! TOML → validated `Config`: the only place raw config strings are parsed.
//!
//! Every error names the TOML path of the bad field
//! (`listeners[1].routes[0].backend: ...`). Nothing downstream re-checks a
//! value or handles a raw string like `"5s"` or `":443"`.
//!
//! [`Config::parse`] reads nothing but the text; an L7 route's certificate
//! files are read and checked by [`Config::check_certificates`] (`server`
//! and `check` call it; the admin CLI, which may not be able to read them,
//! does not).

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use wire::route::{
    parse_server_name, Backend, BackendError, BackendProtocol, Balance, Hostname, HostnameError,
    L7Settings, Mode, ModeError, Pool, PoolError, PoolSettings, Target,
};
use wire::rule::{Rule, RuleError, RuleKind};

use crate::l7::certs::{self, CertError};

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
    /// Also bind UDP on the same address and route QUIC flows by the SNI
    /// of their Initial (SPEC §6.5). Never with `proxy_protocol`.
    pub quic: bool,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub hostname: Hostname,
    /// The route's backends (`backend` or `backends`), `balance` and
    /// active health check, checked by `wire::route::PoolSettings`.
    pub pool: Pool,
    /// Never true on an L7 route (refused at load).
    pub send_proxy_protocol: bool,
    /// L4 (the default), or L7 with its settings (paths resolved against
    /// the config's directory).
    pub mode: Mode,
}

impl RouteConfig {
    /// The route's target, as the route table holds it.
    pub fn target(&self) -> Target {
        Target {
            backends: self.pool.backends.clone(),
            balance: self.pool.balance,
            health: self.pool.health.clone(),
            send_proxy_protocol: self.send_proxy_protocol,
            mode: self.mode.clone(),
        }
    }
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
    pub fn parse(text: &str) -> Result<Self, ListenAddrError> {
        let bind = if let Some(port) = text.strip_prefix(':') {
            let port: u16 = port
                .parse()
                .map_err(|_| ListenAddrError::BadPort(text.to_string()))?;
            BindAddr::AllInterfaces(port)
        } else {
            let sa: SocketAddr = text
                .parse()
                .map_err(|_| ListenAddrError::NotAnAddress(text.to_string()))?;
            BindAddr::Socket(sa)
        };
        Ok(ListenAddr {
            text: text.to_string(),
            bind,
        })
    }
}

/// Why a listener address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ListenAddrError {
    /// `":PORT"` with a port that is not a number from 0 to 65535.
    #[error("{0:?} is not \":PORT\" with a port from 0 to 65535")]
    BadPort(String),
    /// Neither `":PORT"` nor a socket address.
    #[error("{0:?} is not \":PORT\", \"IPv4:PORT\" or \"[IPv6]:PORT\"")]
    NotAnAddress(String),
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
    pub fn parse(text: &str) -> Result<Self, AdminAddrError> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AdminAddrError::EmptyUnixPath);
            }
            return Ok(AdminAddr::Unix(PathBuf::from(path)));
        }
        text.parse::<SocketAddr>()
            .map(AdminAddr::Tcp)
            .map_err(|_| AdminAddrError::NotAnAddress(text.to_string()))
    }
}

/// Why an admin API address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminAddrError {
    /// `"unix:"` with nothing after it.
    #[error("\"unix:\" needs a socket path")]
    EmptyUnixPath,
    /// Neither `unix:PATH` nor `IP:PORT`.
    #[error("{0:?} is neither \"unix:PATH\" nor \"IP:PORT\"")]
    NotAnAddress(String),
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
    /// L7: how long a backend may take to begin its response headers
    /// (then 504); `None` = no limit (`response_timeout = "0s"`).
    pub response_timeout: Option<Duration>,
    /// Client connections open at once over all listeners; `None` = derived
    /// from RLIMIT_NOFILE at start (`max_connections = 0`).
    pub max_connections: Option<NonZeroU32>,
    /// At most this many backends of a route are tried per connection
    /// (SPEC §6.3 failover), 1 to [`MAX_CONNECT_ATTEMPTS`].
    pub connect_attempts: u32,
    /// QUIC flows (pending and established) held at once over all `quic`
    /// listeners, 1 to [`MAX_QUIC_FLOWS`].
    pub max_quic_flows: u32,
}

/// `proxy.max_quic_flows` when not set.
pub const DEFAULT_QUIC_FLOWS: u32 = 100_000;
/// The largest `proxy.max_quic_flows`: each flow holds a UDP socket.
pub const MAX_QUIC_FLOWS: u32 = 10_000_000;

/// `proxy.connect_attempts` when not set.
pub const DEFAULT_CONNECT_ATTEMPTS: u32 = 3;
/// The largest `proxy.connect_attempts` (a route has at most this many
/// backends).
pub const MAX_CONNECT_ATTEMPTS: u32 = wire::route::MAX_BACKENDS as u32;

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(30),
            response_timeout: Some(Duration::from_secs(60)),
            max_connections: None,
            connect_attempts: DEFAULT_CONNECT_ATTEMPTS,
            max_quic_flows: DEFAULT_QUIC_FLOWS,
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
/// is wrong with it ([`ConfigCause`]). Displayed as one line:
/// `FILE: KEY: CAUSE`, or `FILE: CAUSE` for a cause that concerns the whole
/// file. The fields are private: one is built only with a key or as a
/// whole-file error (reading it, or a TOML error the parser places at no
/// key).
#[derive(Debug)]
pub struct ConfigError {
    file: PathBuf,
    key: String,
    cause: ConfigCause,
}

impl ConfigError {
    /// An error in the value at TOML path `key`. The path is empty only for
    /// the TOML key `''` itself (legal TOML: `'' = 8` is an unknown field
    /// at the top level), which displays, as ever, as no path at all.
    fn at(file: &Path, key: impl Into<String>, cause: ConfigCause) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            key: key.into(),
            cause,
        }
    }

    /// An error about the whole file: it cannot be read, or the parser
    /// places its error at no key.
    fn whole_file(file: &Path, cause: ConfigCause) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            key: String::new(),
            cause,
        }
    }

    /// The config file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The TOML path of the bad field (`listeners[1].routes[0].backend`);
    /// empty for an error about the whole file.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What is wrong.
    pub fn cause(&self) -> &ConfigCause {
        &self.cause
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.cause)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.cause)
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.cause)
    }
}

/// What is wrong with a config: the message after the TOML path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigCause {
    /// The file cannot be read (or is not UTF-8).
    #[error("cannot read config: {0}")]
    Read(#[source] io::Error),
    /// The TOML parser or the deserialiser refused the text (a syntax
    /// error, an unknown key, a value of the wrong type).
    #[error("{0}")]
    Toml(TomlError),
    /// A string field that does not parse as what it names.
    #[error("{error}{}", line_suffix(*.line))]
    Field {
        #[source]
        error: FieldError,
        /// The line of the value, when the parser knows it.
        line: Option<usize>,
    },
    /// No `[database]` section.
    #[error("missing section [database] (database.path is required)")]
    MissingDatabase,
    /// A required key is absent (or empty).
    #[error("required")]
    Required,
    /// A `[metrics]` section without `addr`.
    #[error("required in a [metrics] section (like \"127.0.0.1:9091\")")]
    MetricsAddrRequired,
    /// Two `[[listeners]]` bind the same address.
    #[error("duplicate listener address {0:?}")]
    DuplicateListener(String),
    /// Two routes of one listener have the same hostname.
    #[error("duplicate hostname {0:?} in this listener")]
    DuplicateHostname(Hostname),
    /// `grpc.tls_cert` without `grpc.tls_key`.
    #[error("required when grpc.tls_cert is set")]
    TlsKeyRequired,
    /// `grpc.tls_key` without `grpc.tls_cert`.
    #[error("required when grpc.tls_key is set")]
    TlsCertRequired,
    /// `grpc.client_ca` without the server's certificate and key.
    #[error("needs grpc.tls_cert and grpc.tls_key (mTLS is only for TCP)")]
    ClientCaWithoutTls,
    /// A TCP `grpc.addr` without TLS.
    #[error("required for a TCP grpc.addr: the admin API is never served as plaintext TCP")]
    PlaintextTcpAdmin,
    /// One of `grpc.client_cert` and `grpc.client_key` without the other.
    #[error("grpc.client_cert and grpc.client_key go together")]
    ClientCertKeyPair,
    /// `firewall.blocked_countries` without `firewall.geoip_db`.
    #[error("required when firewall.blocked_countries is set")]
    GeoIpDbRequired,
    /// `firewall.rate_window = "0s"` with a rate limit.
    #[error("must be longer than zero when firewall.rate_limit is set")]
    ZeroRateWindow,
    /// A timeout of zero.
    #[error("must be longer than zero")]
    ZeroTimeout,
    /// `proxy.connect_attempts` out of range.
    #[error("{0} is not from 1 to {MAX_CONNECT_ATTEMPTS}")]
    ConnectAttempts(u32),
    /// `proxy.max_quic_flows` out of range.
    #[error("{0} is not from 1 to {MAX_QUIC_FLOWS}")]
    QuicFlows(u32),
    /// `quic = true` on a `proxy_protocol` listener.
    #[error("not allowed with proxy_protocol = true: a PROXY header is TCP only, so QUIC datagrams could not carry the client's address")]
    QuicWithProxyProtocol,
    /// `backends = []`.
    #[error("must list at least one backend")]
    EmptyBackends,
    /// A route's pool settings break a rule between them
    /// (`wire::route::PoolSettings`); the key is the setting at fault.
    #[error("{0}")]
    Pool(#[source] PoolError),
    /// An L7-only key on an L4 route.
    #[error("only for mode = \"l7\" routes (this route is l4)")]
    L7Only,
    /// `tls_cert` or `tls_key` missing (or empty) on an L7 route.
    #[error("required for a mode = \"l7\" route")]
    RequiredForL7,
    /// `send_proxy_protocol = true` on an L7 route.
    #[error("not allowed on a mode = \"l7\" route: its backend connections are pooled, so a per-client PROXY header cannot be right (X-Forwarded-For carries the client)")]
    ProxyProtocolOnL7,
    /// `backend_ca` or `backend_server_name` without `backend_tls = true`.
    #[error("needs backend_tls = true")]
    NeedsBackendTls,
    /// An L7 route's certificate or key file was refused
    /// ([`Config::check_certificates`]).
    #[error("{0}")]
    Certificate(#[source] CertError),
}

/// The TOML parser's or deserialiser's message, on one line, and the line
/// number when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TomlError {
    pub message: String,
    pub line: Option<usize>,
}

impl TomlError {
    fn new(text: &str, error: &toml::de::Error) -> TomlError {
        TomlError {
            message: error.message().trim().replace('\n', " "),
            line: error_line(text, error),
        }
    }
}

impl fmt::Display for TomlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.message, line_suffix(self.line))
    }
}

fn line_suffix(line: Option<usize>) -> String {
    line.map_or_else(String::new, |line| format!(" (line {line})"))
}

/// A string field that does not parse: the field's type's own error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FieldError {
    /// `listeners[].addr`.
    #[error(transparent)]
    ListenAddr(#[from] ListenAddrError),
    /// `routes[].hostname` (shown after the text as written).
    #[error("{text:?}: {source}")]
    Hostname { text: String, source: HostnameError },
    /// `routes[].backend` (shown after the text as written).
    #[error("{text:?}: {source}")]
    Backend { text: String, source: BackendError },
    /// `grpc.addr`.
    #[error(transparent)]
    AdminAddr(#[from] AdminAddrError),
    /// `firewall.blocked_ips`, `blocked_cidrs`, `blocked_countries`.
    #[error(transparent)]
    Rule(#[from] RuleError),
    /// A duration (`proxy.*_timeout`, `firewall.rate_window`).
    #[error(transparent)]
    Duration(#[from] DurationError),
    /// `log.level`.
    #[error("{0:?} is not one of error, warn, info, debug, trace")]
    LogLevel(String),
    /// `metrics.addr`.
    #[error("{0:?} is not IP:PORT")]
    SocketAddr(String),
    /// `routes[].mode`.
    #[error("{0:?} is not \"l4\" or \"l7\"")]
    Mode(String),
    /// `routes[].backend_protocol`.
    #[error("{0:?} is not one of auto, http1, h2")]
    BackendProtocol(String),
    /// `routes[].backend_server_name` (shown after the text as written).
    #[error("{text:?}: not an IP address or DNS name: {source}")]
    ServerName { text: String, source: HostnameError },
    /// `routes[].balance`.
    #[error("{0:?} is not one of round_robin, least_connections")]
    Balance(String),
}

/// A duration that [`parse_duration`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// Empty, padded with whitespace, or not a humantime duration.
    #[error("{0:?} is not a duration like \"250ms\", \"5s\", \"2m\" or \"1h\"")]
    Invalid(String),
}

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
    quic: bool,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    hostname: Parsed<Hostname>,
    // One of `backend` and `backends`.
    backend: Option<Parsed<Backend>>,
    backends: Option<Vec<Parsed<Backend>>>,
    balance: Option<Parsed<Balance>>,
    health_interval: Option<Parsed<ConfigDuration>>,
    health_path: Option<String>,
    health_fall: Option<u32>,
    health_rise: Option<u32>,
    #[serde(default)]
    send_proxy_protocol: bool,
    mode: Option<Parsed<RouteModeKind>>,
    // L7 only: set on an L4 route, each is an error naming it.
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    backend_tls: Option<bool>,
    backend_ca: Option<PathBuf>,
    backend_server_name: Option<Parsed<ServerName>>,
    backend_protocol: Option<Parsed<BackendProtocol>>,
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
    blocked_user_agents: Vec<Parsed<UserAgentRule>>,
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
    response_timeout: Option<Parsed<ConfigDuration>>,
    #[serde(default)]
    max_connections: u32,
    connect_attempts: Option<u32>,
    max_quic_flows: Option<u32>,
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
    fn parse_field(text: &str) -> Result<Self, FieldError>;
}

thread_local! {
    /// The typed error of the field that stopped the deserialiser. serde's
    /// error type carries only text, so [`Parsed`] leaves the typed error
    /// here for [`Config::parse`], which takes it back when the
    /// deserialiser's message is that error's text.
    static FIELD_ERROR: RefCell<Option<FieldError>> = const { RefCell::new(None) };
}

impl<'de, T: ParseField> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        T::parse_field(&text).map(Parsed).map_err(|error| {
            let shown = de::Error::custom(&error);
            FIELD_ERROR.with(|slot| *slot.borrow_mut() = Some(error));
            shown
        })
    }
}

impl ParseField for ListenAddr {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        Ok(ListenAddr::parse(text)?)
    }
}

impl ParseField for Hostname {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        Hostname::parse(text).map_err(|source| FieldError::Hostname {
            text: text.to_string(),
            source,
        })
    }
}

impl ParseField for Backend {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        Backend::parse(text).map_err(|source| FieldError::Backend {
            text: text.to_string(),
            source,
        })
    }
}

impl ParseField for AdminAddr {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        Ok(AdminAddr::parse(text)?)
    }
}

/// A route's `mode`: `"l4"` or `"l7"` (the L7 settings come from the other
/// keys).
#[derive(Clone, Copy, PartialEq, Eq)]
enum RouteModeKind {
    L4,
    L7,
}

impl ParseField for RouteModeKind {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        match text {
            "l4" => Ok(RouteModeKind::L4),
            "l7" => Ok(RouteModeKind::L7),
            _ => Err(FieldError::Mode(text.to_string())),
        }
    }
}

impl ParseField for BackendProtocol {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        // The empty string is the admin API's default, not a TOML value.
        match BackendProtocol::parse(text) {
            Some(protocol) if !text.is_empty() => Ok(protocol),
            _ => Err(FieldError::BackendProtocol(text.to_string())),
        }
    }
}

impl ParseField for Balance {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        // The empty string is the admin API's default, not a TOML value.
        match Balance::parse(text) {
            Some(balance) if !text.is_empty() => Ok(balance),
            _ => Err(FieldError::Balance(text.to_string())),
        }
    }
}

/// `backend_server_name`, normalised.
struct ServerName(String);

impl ParseField for ServerName {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        parse_server_name(text)
            .map(ServerName)
            .map_err(|source| FieldError::ServerName {
                text: text.to_string(),
                source,
            })
    }
}

struct IpRule(Rule);
struct CidrRule(Rule);
struct CountryRule(Rule);
struct UserAgentRule(Rule);

impl ParseField for UserAgentRule {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        Rule::parse(RuleKind::UserAgent, text)
            .map(UserAgentRule)
            .map_err(FieldError::Rule)
    }
}

impl ParseField for IpRule {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        Rule::parse(RuleKind::Ip, text)
            .map(IpRule)
            .map_err(FieldError::Rule)
    }
}

impl ParseField for CidrRule {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        Rule::parse(RuleKind::Cidr, text)
            .map(CidrRule)
            .map_err(FieldError::Rule)
    }
}

impl ParseField for CountryRule {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        Rule::parse(RuleKind::Country, text)
            .map(CountryRule)
            .map_err(FieldError::Rule)
    }
}

struct ConfigDuration(Duration);

impl ParseField for ConfigDuration {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        Ok(parse_duration(text).map(ConfigDuration)?)
    }
}

/// `"250ms"`, `"5s"`, `"2m"`, `"1h"` (and combinations like `"1m30s"`).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    if text.trim() != text || text.is_empty() {
        return Err(DurationError::Invalid(text.to_string()));
    }
    humantime::parse_duration(text).map_err(|_| DurationError::Invalid(text.to_string()))
}

struct LogLevel(String);

impl ParseField for LogLevel {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        match text {
            "error" | "warn" | "info" | "debug" | "trace" => Ok(LogLevel(text.to_string())),
            _ => Err(FieldError::LogLevel(text.to_string())),
        }
    }
}

struct SocketAddrValue(SocketAddr);

impl ParseField for SocketAddrValue {
    fn parse_field(text: &str) -> Result<Self, FieldError> {
        text.parse()
            .map(SocketAddrValue)
            .map_err(|_| FieldError::SocketAddr(text.to_string()))
    }
}

// ---- loading -------------------------------------------------------------

impl Config {
    /// Reads and validates a config file. Does no other I/O.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::whole_file(path, ConfigCause::Read(e)))?;
        Config::parse(&text, path)
    }

    /// Parses config text as if read from `source`.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let fail = |key: &str, cause: ConfigCause| ConfigError::at(source, key, cause);
        let deserializer = toml::Deserializer::parse(text).map_err(|e| {
            ConfigError::whole_file(source, ConfigCause::Toml(TomlError::new(text, &e)))
        })?;
        FIELD_ERROR.with(|slot| slot.borrow_mut().take());
        let raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let toml = TomlError::new(text, e.inner());
            // The field's typed error, if a field stopped the deserialiser
            // (its message is then that error's text, on one line).
            let cause = match FIELD_ERROR.with(|slot| slot.borrow_mut().take()) {
                Some(error) if error.to_string().trim().replace('\n', " ") == toml.message => {
                    ConfigCause::Field {
                        error,
                        line: toml.line,
                    }
                }
                _ => ConfigCause::Toml(toml),
            };
            if key == "." {
                ConfigError::whole_file(source, cause)
            } else {
                ConfigError::at(source, key, cause)
            }
        })?;

        // Relative paths resolve against the config's directory, made
        // absolute even when the config was named by a relative path
        // (`-c ./srv/x.toml`): an L7 route's files are stored with the
        // route and read by the server whatever its working directory.
        let dir = source.parent().unwrap_or(Path::new("."));
        let base = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

        let database = raw
            .database
            .ok_or_else(|| fail("database", ConfigCause::MissingDatabase))?;
        let db_path = database
            .path
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| fail("database.path", ConfigCause::Required))?;

        let mut listeners = Vec::with_capacity(raw.listeners.len());
        let mut seen_binds = HashSet::new();
        for (i, listener) in raw.listeners.into_iter().enumerate() {
            let addr = listener
                .addr
                .ok_or_else(|| fail(&format!("listeners[{i}].addr"), ConfigCause::Required))?
                .0;
            if !seen_binds.insert(addr.bind) {
                return Err(fail(
                    &format!("listeners[{i}].addr"),
                    ConfigCause::DuplicateListener(addr.text.clone()),
                ));
            }
            if listener.quic && listener.proxy_protocol {
                return Err(fail(
                    &format!("listeners[{i}].quic"),
                    ConfigCause::QuicWithProxyProtocol,
                ));
            }
            let mut hostnames = HashSet::new();
            let mut routes = Vec::with_capacity(listener.routes.len());
            for (j, route) in listener.routes.into_iter().enumerate() {
                let key = |name: &str| format!("listeners[{i}].routes[{j}].{name}");
                let l7 = route.l7(&resolve);
                let empty_ca = route
                    .backend_ca
                    .as_ref()
                    .is_some_and(|p| p.as_os_str().is_empty());
                // Checked now (the fields are moved below), reported after
                // the mode's errors.
                let pool = route.pool(route.mode.as_ref().map(|m| m.0) == Some(RouteModeKind::L7));
                let hostname = route.hostname.0;
                if !hostnames.insert(hostname.clone()) {
                    return Err(fail(
                        &key("hostname"),
                        ConfigCause::DuplicateHostname(hostname),
                    ));
                }
                let mode = route_mode(route.mode.map(|m| m.0), l7, empty_ca)
                    .map_err(|(name, cause)| fail(&key(name), cause))?;
                if route.send_proxy_protocol && matches!(mode, Mode::L7(_)) {
                    return Err(fail(
                        &key("send_proxy_protocol"),
                        ConfigCause::ProxyProtocolOnL7,
                    ));
                }
                let pool = pool.map_err(|(name, cause)| fail(&key(name), cause))?;
                routes.push(RouteConfig {
                    hostname,
                    pool,
                    send_proxy_protocol: route.send_proxy_protocol,
                    mode,
                });
            }
            listeners.push(ListenerConfig {
                addr,
                proxy_protocol: listener.proxy_protocol,
                quic: listener.quic,
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
                        return Err(fail("grpc.tls_key", ConfigCause::TlsKeyRequired))
                    }
                    (None, Some(_)) => {
                        return Err(fail("grpc.tls_cert", ConfigCause::TlsCertRequired))
                    }
                    (None, None) => {
                        if g.client_ca.is_some() {
                            return Err(fail("grpc.client_ca", ConfigCause::ClientCaWithoutTls));
                        }
                        None
                    }
                };
                let addr = match g.addr.0 {
                    AdminAddr::Unix(p) => AdminAddr::Unix(resolve(p)),
                    tcp => tcp,
                };
                if matches!(addr, AdminAddr::Tcp(_)) && tls.is_none() {
                    return Err(fail("grpc.tls_cert", ConfigCause::PlaintextTcpAdmin));
                }
                if g.client_cert.is_some() != g.client_key.is_some() {
                    return Err(fail(
                        if g.client_cert.is_some() {
                            "grpc.client_key"
                        } else {
                            "grpc.client_cert"
                        },
                        ConfigCause::ClientCertKeyPair,
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
            return Err(fail("firewall.geoip_db", ConfigCause::GeoIpDbRequired));
        }
        let mut rules: Vec<Rule> = Vec::new();
        let mut seen_rules = HashSet::new();
        let all = fw
            .blocked_ips
            .into_iter()
            .map(|r| r.0 .0)
            .chain(fw.blocked_cidrs.into_iter().map(|r| r.0 .0))
            .chain(fw.blocked_countries.into_iter().map(|r| r.0 .0));
        let all = all.chain(fw.blocked_user_agents.into_iter().map(|r| r.0 .0));
        for rule in all {
            if seen_rules.insert(rule.clone()) {
                rules.push(rule);
            }
        }
        let rate_window = fw
            .rate_window
            .map(|d| d.0 .0)
            .unwrap_or(Duration::from_secs(10));
        if fw.rate_limit > 0 && rate_window.is_zero() {
            return Err(fail("firewall.rate_window", ConfigCause::ZeroRateWindow));
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
            response_timeout: match raw.proxy.response_timeout {
                None => defaults.response_timeout,
                Some(d) if d.0 .0.is_zero() => None,
                Some(d) => Some(d.0 .0),
            },
            max_connections: NonZeroU32::new(raw.proxy.max_connections),
            connect_attempts: raw
                .proxy
                .connect_attempts
                .unwrap_or(defaults.connect_attempts),
            max_quic_flows: raw.proxy.max_quic_flows.unwrap_or(defaults.max_quic_flows),
        };
        if !(1..=MAX_QUIC_FLOWS).contains(&proxy.max_quic_flows) {
            return Err(fail(
                "proxy.max_quic_flows",
                ConfigCause::QuicFlows(proxy.max_quic_flows),
            ));
        }
        if !(1..=MAX_CONNECT_ATTEMPTS).contains(&proxy.connect_attempts) {
            return Err(fail(
                "proxy.connect_attempts",
                ConfigCause::ConnectAttempts(proxy.connect_attempts),
            ));
        }
        for (key, value) in [
            ("proxy.connect_timeout", &mut proxy.connect_timeout),
            ("proxy.handshake_timeout", &mut proxy.handshake_timeout),
            ("proxy.idle_timeout", &mut proxy.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(fail(key, ConfigCause::ZeroTimeout));
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
                    None => Err(fail("metrics.addr", ConfigCause::MetricsAddrRequired)),
                })
                .transpose()?,
        })
    }
}

/// A route certificate that passed [`Config::check_certificates`] but is
/// only a leaf not signed by itself: clients that don't already hold its
/// intermediate will fail (worth a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafOnlyCert {
    /// The TOML path of the route's `tls_cert`
    /// (`listeners[0].routes[1].tls_cert`).
    pub key: String,
    pub path: PathBuf,
}

impl Config {
    /// Reads and checks every L7 route's certificate chain and key
    /// (`l7::certs::load`: readable PEM, the chain parses, the key matches
    /// the leaf). A refused file is an error naming
    /// `listeners[i].routes[j].tls_cert` or `...tls_key`; chains that are
    /// only a leaf are returned, to be warned about. Blocking file I/O.
    pub fn check_certificates(&self) -> Result<Vec<LeafOnlyCert>, ConfigError> {
        let mut leaf_only = Vec::new();
        for (i, listener) in self.listeners.iter().enumerate() {
            for (j, route) in listener.routes.iter().enumerate() {
                let Some(l7) = route.mode.l7() else {
                    continue;
                };
                let key = |name: &str| format!("listeners[{i}].routes[{j}].{name}");
                match certs::load(&l7.tls_cert, &l7.tls_key) {
                    Ok(loaded) => {
                        if loaded.leaf_only {
                            leaf_only.push(LeafOnlyCert {
                                key: key("tls_cert"),
                                path: l7.tls_cert.clone(),
                            });
                        }
                    }
                    Err(err) => {
                        return Err(ConfigError::at(
                            &self.source,
                            key(err.file().field()),
                            ConfigCause::Certificate(err),
                        ))
                    }
                }
            }
        }
        Ok(leaf_only)
    }
}

impl RawRoute {
    /// The route's pool (the rules are `wire::route::PoolSettings`'s); an
    /// error names the key at fault (its last path component) and why.
    fn pool(&self, l7: bool) -> Result<Pool, (&'static str, ConfigCause)> {
        if self.backends.as_ref().is_some_and(Vec::is_empty) {
            return Err(("backends", ConfigCause::EmptyBackends));
        }
        let settings = PoolSettings {
            backend: self.backend.as_ref().map(|b| b.0.clone()),
            backends: self
                .backends
                .iter()
                .flatten()
                .map(|b| b.0.clone())
                .collect(),
            balance: self.balance.as_ref().map(|b| b.0),
            health_interval: self.health_interval.as_ref().map(|d| d.0 .0),
            health_path: self.health_path.clone(),
            health_fall: self.health_fall,
            health_rise: self.health_rise,
        };
        settings
            .into_pool(l7, false)
            .map_err(|e| (e.key().label(), ConfigCause::Pool(e)))
    }

    /// The route's L7 keys as written, paths resolved (an empty
    /// `tls_cert`/`tls_key` counts as missing).
    fn l7(&self, resolve: &dyn Fn(PathBuf) -> PathBuf) -> L7Settings {
        let path =
            |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty()).map(resolve);
        L7Settings {
            tls_cert: path(&self.tls_cert),
            tls_key: path(&self.tls_key),
            backend_tls: self.backend_tls,
            backend_ca: self.backend_ca.clone().map(resolve),
            backend_server_name: self.backend_server_name.as_ref().map(|n| n.0 .0.clone()),
            backend_protocol: self.backend_protocol.as_ref().map(|p| p.0),
        }
    }
}

/// A route's [`Mode`] from its `mode` and L7 keys (the rules are
/// `wire::route::L7Settings`'s); an error names the key at fault (its last
/// path component) and why. `empty_ca`: `backend_ca = ""` was written.
fn route_mode(
    mode: Option<RouteModeKind>,
    l7: L7Settings,
    empty_ca: bool,
) -> Result<Mode, (&'static str, ConfigCause)> {
    let built = l7
        .into_mode(mode == Some(RouteModeKind::L7))
        .map_err(|e| match e {
            ModeError::L7Only(key) => (key.label(), ConfigCause::L7Only),
            ModeError::RequiredForL7(key) => (key.label(), ConfigCause::RequiredForL7),
            ModeError::NeedsBackendTls(key) => (key.label(), ConfigCause::NeedsBackendTls),
        })?;
    // An empty `backend_ca` would resolve to the config's directory.
    if empty_ca && built.l7().is_some() {
        return Err(("backend_ca", ConfigCause::Required));
    }
    Ok(built)
}

/// The line of the parser's error, when it knows the span.
fn error_line(text: &str, error: &toml::de::Error) -> Option<usize> {
    error
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::route::L7Route;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/mc/mc-proxy.toml"))
    }

    fn key_of(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.key().to_string(),
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
                "{MINIMAL}[[listeners]]\naddr = \":1\"\nproxy_protocol = true\nquic = true\n"
            )),
            "listeners[0].quic"
        );
        assert_eq!(
            key_of(&format!(
                "{MINIMAL}[[listeners]]\naddr = \":1\"\nquic = 1\n"
            )),
            "listeners[0].quic"
        );
        for bad in ["0", "10000001"] {
            assert_eq!(
                key_of(&format!("{MINIMAL}[proxy]\nmax_quic_flows = {bad}\n")),
                "proxy.max_quic_flows"
            );
        }
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
                assert_eq!(err.key(), format!("{section}.{key}"), "{bad}: {err}");
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
    fn causes_are_typed_and_display_as_before() {
        let cause = |text: &str| parse(text).expect_err(text).cause;
        let route = |backend: &str| {
            format!("{MINIMAL}[[listeners]]\naddr = \":1\"\n  [[listeners.routes]]\n  hostname = \"x.test\"\n  backend = \"{backend}\"\n")
        };
        let err = parse(&route("b:0")).unwrap_err();
        assert!(
            matches!(
                err.cause(),
                ConfigCause::Field {
                    error: FieldError::Backend {
                        source: BackendError::BadPort,
                        ..
                    },
                    line: Some(7),
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "/etc/mc/mc-proxy.toml: listeners[0].routes[0].backend: \"b:0\": backend port must be a number from 1 to 65535 (line 7)"
        );
        assert!(matches!(
            cause(&format!("{MINIMAL}[proxy]\nidle_timeout = \"5 parsecs\"\n")),
            ConfigCause::Field {
                error: FieldError::Duration(DurationError::Invalid(_)),
                ..
            }
        ));
        assert!(matches!(
            cause(&format!("{MINIMAL}[firewall]\nblocked_ips = [\"1.2.3\"]\n")),
            ConfigCause::Field {
                error: FieldError::Rule(RuleError::Ip(_)),
                ..
            }
        ));
        assert!(matches!(
            cause(&format!("{MINIMAL}[grpc]\naddr = \"unix:\"\n")),
            ConfigCause::Field {
                error: FieldError::AdminAddr(AdminAddrError::EmptyUnixPath),
                ..
            }
        ));
        assert!(matches!(
            cause(&format!("{MINIMAL}[[listeners]]\naddr = \":99999\"\n")),
            ConfigCause::Field {
                error: FieldError::ListenAddr(ListenAddrError::BadPort(_)),
                ..
            }
        ));
        assert!(matches!(
            cause(&format!("{MINIMAL}[proxy]\nconnect_timeout = 5\n")),
            ConfigCause::Toml(TomlError { line: Some(4), .. })
        ));
        assert!(matches!(cause(""), ConfigCause::MissingDatabase));
        assert!(matches!(
            cause(&format!("{MINIMAL}[proxy]\nidle_timeout = \"0s\"\n")),
            ConfigCause::ZeroTimeout
        ));
        // Regression (fuzz corpus): the empty key `''` is a key, not a panic.
        let err = parse("'' = 8\n").unwrap_err();
        assert_eq!(err.key(), "");
        assert!(matches!(err.cause(), ConfigCause::Toml(_)), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("/etc/mc/mc-proxy.toml: unknown field ``, expected one of "),
            "{err}"
        );
        let err = Config::load(Path::new("/nonexistent/mc-proxy.toml")).unwrap_err();
        assert!(matches!(err.cause(), ConfigCause::Read(_)), "{err:?}");
        assert_eq!(err.key(), "");
        assert!(err
            .to_string()
            .starts_with("/nonexistent/mc-proxy.toml: cannot read config: "));
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

    /// One listener with one route whose body (after hostname and
    /// backend) is `extra`.
    fn one_route(extra: &str) -> String {
        format!("{MINIMAL}[[listeners]]\naddr = \":1\"\n  [[listeners.routes]]\n  hostname = \"ok.test\"\n  backend = \"127.0.0.1:1\"\n  [[listeners.routes]]\n  hostname = \"git.test\"\n  backend = \"127.0.0.1:3000\"\n{extra}\n")
    }

    const L7: &str =
        "  mode = \"l7\"\n  tls_cert = \"certs/git.pem\"\n  tls_key = \"/srv/certs/git.key\"\n";

    #[test]
    fn l7_routes_parse_with_defaults_and_resolved_paths() {
        let config = parse(&one_route(L7)).unwrap();
        let routes = &config.listeners[0].routes;
        assert_eq!(routes[0].mode, Mode::L4);
        assert_eq!(routes[0].target().mode, Mode::L4);
        let l7 = routes[1].mode.l7().expect("an l7 route");
        assert_eq!(l7.tls_cert, PathBuf::from("/etc/mc/certs/git.pem"));
        assert_eq!(l7.tls_key, PathBuf::from("/srv/certs/git.key"));
        assert!(!l7.backend_tls);
        assert_eq!(l7.backend_ca, None);
        assert_eq!(l7.backend_server_name, None);
        assert_eq!(l7.backend_protocol, BackendProtocol::Auto);
        assert_eq!(routes[1].target().mode, routes[1].mode);

        let config = parse(&one_route(&format!(
            "{L7}  backend_tls = true\n  backend_ca = \"ca.pem\"\n  backend_server_name = \"Git.SVC.internal.\"\n  backend_protocol = \"h2\"\n  send_proxy_protocol = false\n"
        )))
        .unwrap();
        let l7 = config.listeners[0].routes[1].mode.l7().unwrap().clone();
        assert_eq!(
            *l7,
            L7Route {
                tls_cert: "/etc/mc/certs/git.pem".into(),
                tls_key: "/srv/certs/git.key".into(),
                backend_tls: true,
                backend_ca: Some("/etc/mc/ca.pem".into()),
                backend_server_name: Some("git.svc.internal".into()),
                backend_protocol: BackendProtocol::H2,
            }
        );
        // "l4" said out loud is the default.
        let config = parse(&one_route("  mode = \"l4\"\n  send_proxy_protocol = true")).unwrap();
        assert_eq!(config.listeners[0].routes[1].mode, Mode::L4);
        let config = parse(&one_route(&format!(
            "{L7}  backend_tls = true\n  backend_server_name = \"2001:DB8::1\"\n"
        )))
        .unwrap();
        assert_eq!(
            config.listeners[0].routes[1]
                .mode
                .l7()
                .unwrap()
                .backend_server_name
                .as_deref(),
            Some("2001:db8::1")
        );
    }

    #[test]
    fn l7_route_errors_name_the_key() {
        let at = |name: &str| format!("listeners[0].routes[1].{name}");
        // L7-only keys on an L4 route (mode absent or "l4").
        for (line, name) in [
            ("tls_cert = \"a.pem\"", "tls_cert"),
            ("tls_key = \"a.key\"", "tls_key"),
            ("backend_tls = false", "backend_tls"),
            ("backend_ca = \"ca.pem\"", "backend_ca"),
            ("backend_server_name = \"a.test\"", "backend_server_name"),
            ("backend_protocol = \"auto\"", "backend_protocol"),
        ] {
            for mode in ["", "  mode = \"l4\"\n"] {
                let err = parse(&one_route(&format!("{mode}  {line}"))).unwrap_err();
                assert_eq!(err.key(), at(name), "{line}: {err}");
                assert!(matches!(err.cause(), ConfigCause::L7Only), "{err:?}");
                assert!(
                    err.to_string()
                        .ends_with("only for mode = \"l7\" routes (this route is l4)"),
                    "{err}"
                );
            }
        }
        let cases = [
            (
                "  mode = \"l7\"\n  tls_key = \"k\"",
                "tls_cert",
                "required for a mode = \"l7\" route",
            ),
            (
                "  mode = \"l7\"\n  tls_cert = \"c\"",
                "tls_key",
                "required for a mode = \"l7\" route",
            ),
            (
                "  mode = \"l7\"\n  tls_cert = \"\"\n  tls_key = \"k\"",
                "tls_cert",
                "required",
            ),
            (
                &format!("{L7}  send_proxy_protocol = true"),
                "send_proxy_protocol",
                "pooled",
            ),
            (
                &format!("{L7}  backend_ca = \"ca.pem\""),
                "backend_ca",
                "needs backend_tls = true",
            ),
            (
                &format!("{L7}  backend_tls = false\n  backend_server_name = \"a.test\""),
                "backend_server_name",
                "needs backend_tls = true",
            ),
            (
                &format!("{L7}  backend_tls = true\n  backend_server_name = \"*.a.test\""),
                "backend_server_name",
                "not an IP address or DNS name",
            ),
            (
                &format!("{L7}  backend_tls = true\n  backend_server_name = \"a b\""),
                "backend_server_name",
                "\"a b\"",
            ),
            (
                &format!("{L7}  backend_protocol = \"http2\""),
                "backend_protocol",
                "\"http2\" is not one of auto, http1, h2",
            ),
            (
                &format!("{L7}  backend_protocol = \"\""),
                "backend_protocol",
                "is not one of",
            ),
            (
                &format!("{L7}  backend_tls = \"yes\""),
                "backend_tls",
                "invalid type",
            ),
            ("  mode = \"L7\"", "mode", "\"L7\" is not \"l4\" or \"l7\""),
            ("  mode = \"http\"", "mode", "is not \"l4\" or \"l7\""),
            (
                &format!("{L7}  tls_chain = \"x\""),
                "tls_chain",
                "unknown field",
            ),
        ];
        for (extra, name, text) in cases {
            let err = parse(&one_route(extra)).unwrap_err();
            assert_eq!(err.key(), at(name), "{extra}: {err}");
            let shown = err.to_string();
            assert!(
                shown.contains(text) && !shown.contains('\n'),
                "{extra}: {shown}"
            );
        }
        assert!(matches!(
            parse(&one_route("  mode = \"x\"")).unwrap_err().cause(),
            ConfigCause::Field {
                error: FieldError::Mode(_),
                ..
            }
        ));
        assert!(matches!(
            parse(&one_route(&format!("{L7}  send_proxy_protocol = true")))
                .unwrap_err()
                .cause(),
            ConfigCause::ProxyProtocolOnL7
        ));
    }

    /// One listener whose second route is `body` (after its hostname).
    fn pool_route(body: &str) -> String {
        format!("{MINIMAL}[[listeners]]\naddr = \":1\"\n  [[listeners.routes]]\n  hostname = \"ok.test\"\n  backend = \"127.0.0.1:1\"\n  [[listeners.routes]]\n  hostname = \"pool.test\"\n{body}\n")
    }

    #[test]
    fn backend_pools_parse_into_the_target() {
        use wire::route::HealthCheck;
        let config = parse(&pool_route(
            "  backends = [\"10.0.0.1:443\", \"[2001:db8::1]:443\", \"b.internal:8443\"]\n  balance = \"least_connections\"\n  health_interval = \"5s\"\n  health_fall = 4\n  health_rise = 1\n",
        ))
        .unwrap();
        let routes = &config.listeners[0].routes;
        // A single backend is a pool of one, round robin, no check.
        let one = routes[0].target();
        assert_eq!(one.backends.to_string(), "127.0.0.1:1");
        assert_eq!(one.balance, Balance::RoundRobin);
        assert_eq!(one.health, None);
        let target = routes[1].target();
        assert_eq!(
            target.backends.to_string(),
            "10.0.0.1:443,[2001:db8::1]:443,b.internal:8443"
        );
        assert_eq!(target.backend().to_string(), "10.0.0.1:443");
        assert_eq!(target.balance, Balance::LeastConnections);
        assert_eq!(
            target.health,
            Some(HealthCheck {
                interval: Duration::from_secs(5),
                path: None,
                fall: 4,
                rise: 1,
            })
        );
        assert_eq!(routes[1].pool.backends, target.backends);
        // Defaults: fall 3, rise 2; an l7 route may GET a path.
        let config = parse(&pool_route(&format!(
            "  backends = [\"127.0.0.1:2\"]\n  balance = \"round_robin\"\n  health_interval = \"250ms\"\n  health_path = \"/healthz?deep=1\"\n{L7}"
        )))
        .unwrap();
        let target = config.listeners[0].routes[1].target();
        assert_eq!(target.balance, Balance::RoundRobin);
        assert_eq!(
            target.health,
            Some(HealthCheck {
                interval: Duration::from_millis(250),
                path: Some("/healthz?deep=1".into()),
                fall: 3,
                rise: 2,
            })
        );
        assert!(target.mode.l7().is_some());
    }

    #[test]
    fn backend_pool_errors_name_the_key() {
        let at = |name: &str| format!("listeners[0].routes[1].{name}");
        let cases: &[(&str, &str, &str)] = &[
            (
                "  backend = \"127.0.0.1:1\"\n  backends = [\"127.0.0.1:1\"]",
                "backend",
                "set backend or backends, not both",
            ),
            ("", "backend", "a route needs a backend (backend or backends)"),
            ("  backends = []", "backends", "must list at least one backend"),
            (
                "  backends = [\"127.0.0.1:1\", \"127.0.0.1:2\", \"nope\"]",
                "backends[2]",
                "\"nope\"",
            ),
            (
                "  backends = [\"127.0.0.1:1\", \"127.0.0.1:1\"]",
                "backends",
                "127.0.0.1:1 is listed twice",
            ),
            ("  backends = \"127.0.0.1:1\"", "backends", "invalid type"),
            (
                "  backend = \"127.0.0.1:1\"\n  balance = \"random\"",
                "balance",
                "\"random\" is not one of round_robin, least_connections",
            ),
            (
                "  backend = \"127.0.0.1:1\"\n  balance = \"\"",
                "balance",
                "is not one of",
            ),
            (
                "  backend = \"127.0.0.1:1\"\n  health_interval = \"often\"",
                "health_interval",
                "is not a duration",
            ),
            (
                "  backend = \"127.0.0.1:1\"\n  health_interval = \"10ms\"",
                "health_interval",
                "from 100ms to 1h",
            ),
            (
                "  backend = \"127.0.0.1:1\"\n  health_interval = 5",
                "health_interval",
                "invalid type",
            ),
            (
                "  backend = \"127.0.0.1:1\"\n  health_fall = 2",
                "health_fall",
                "health_fall needs health_interval",
            ),
            (
                "  backend = \"127.0.0.1:1\"\n  health_rise = 2",
                "health_rise",
                "health_rise needs health_interval",
            ),
            (
                "  backend = \"127.0.0.1:1\"\n  health_interval = \"1s\"\n  health_fall = 0",
                "health_fall",
                "from 1 to 100",
            ),
            (
                "  backend = \"127.0.0.1:1\"\n  health_interval = \"1s\"\n  health_rise = 101",
                "health_rise",
                "from 1 to 100",
            ),
            (
                "  backend = \"127.0.0.1:1\"\n  health_interval = \"1s\"\n  health_fall = -1",
                "health_fall",
                "invalid value",
            ),
            (
                "  backend = \"127.0.0.1:1\"\n  health_interval = \"1s\"\n  health_path = \"/healthz\"",
                "health_path",
                "health_path is for l7 routes",
            ),
            (
                &format!("  backend = \"127.0.0.1:1\"\n  health_interval = \"1s\"\n  health_path = \"healthz\"\n{L7}"),
                "health_path",
                "must start with '/'",
            ),
            (
                &format!("  backend = \"127.0.0.1:1\"\n  health_path = \"/healthz\"\n{L7}"),
                "health_path",
                "health_path needs health_interval",
            ),
        ];
        for (body, name, text) in cases {
            let err = parse(&pool_route(body)).unwrap_err();
            assert_eq!(err.key(), at(name), "{body}: {err}");
            let shown = err.to_string();
            assert!(
                shown.contains(&format!("{}: ", at(name)))
                    && shown.contains(text)
                    && !shown.contains('\n'),
                "{body}: {shown}"
            );
        }
        assert!(matches!(
            parse(&pool_route(
                "  backend = \"127.0.0.1:1\"\n  health_fall = 2"
            ))
            .unwrap_err()
            .cause(),
            ConfigCause::Pool(PoolError::NeedsInterval(_))
        ));
        assert!(matches!(
            parse(&pool_route("  backends = [\"127.0.0.1:1\", \"x\"]"))
                .unwrap_err()
                .cause(),
            ConfigCause::Field {
                error: FieldError::Backend { .. },
                ..
            }
        ));
        let many: Vec<String> = (1..=65).map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        let err = parse(&pool_route(&format!("  backends = [{}]", many.join(", ")))).unwrap_err();
        assert_eq!(err.key(), at("backends"));
        assert!(err.to_string().contains("65 backends; at most 64"), "{err}");
    }

    #[test]
    fn connect_attempts_default_to_three_and_are_checked() {
        assert_eq!(parse(MINIMAL).unwrap().proxy.connect_attempts, 3);
        let with = |value: &str| {
            parse(&format!("{MINIMAL}[proxy]\nconnect_attempts = {value}\n"))
                .map(|c| c.proxy.connect_attempts)
        };
        assert_eq!(with("1").unwrap(), 1);
        assert_eq!(with("64").unwrap(), 64);
        for bad in ["0", "65", "-1", "\"3\"", "1.5"] {
            let err = with(bad).unwrap_err();
            assert_eq!(err.key(), "proxy.connect_attempts", "{bad}: {err}");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
        assert_eq!(
            with("0").unwrap_err().to_string(),
            "/etc/mc/mc-proxy.toml: proxy.connect_attempts: 0 is not from 1 to 64"
        );
    }

    #[test]
    fn response_timeout_defaults_to_a_minute_and_zero_is_none() {
        assert_eq!(
            parse(MINIMAL).unwrap().proxy.response_timeout,
            Some(Duration::from_secs(60))
        );
        let with = |value: &str| {
            parse(&format!(
                "{MINIMAL}[proxy]\nresponse_timeout = \"{value}\"\n"
            ))
            .map(|c| c.proxy.response_timeout)
        };
        assert_eq!(with("0s").unwrap(), None);
        assert_eq!(with("2m").unwrap(), Some(Duration::from_secs(120)));
        assert_eq!(with("soon").unwrap_err().key(), "proxy.response_timeout");
    }

    #[test]
    fn blocked_user_agents_are_rules_and_bad_ones_name_their_index() {
        let config = parse(&format!(
            "{MINIMAL}[firewall]\nblocked_ips = [\"192.0.2.7\"]\nblocked_user_agents = [\"(?i)sqlmap\", \"^curl/\", \"(?i)sqlmap\"]\n"
        ))
        .unwrap();
        let shown: Vec<String> = config
            .firewall
            .rules
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            shown,
            ["ip 192.0.2.7", "user_agent (?i)sqlmap", "user_agent ^curl/"]
        );
        let err = parse(&format!(
            "{MINIMAL}[firewall]\nblocked_user_agents = [\"ok\", \"(?i)sqlmap(\"]\n"
        ))
        .unwrap_err();
        assert_eq!(err.key(), "firewall.blocked_user_agents[1]");
        assert!(
            matches!(
                err.cause(),
                ConfigCause::Field {
                    error: FieldError::Rule(RuleError::UserAgent(_)),
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "/etc/mc/mc-proxy.toml: firewall.blocked_user_agents[1]: not a valid regular expression: unclosed group (line 4)"
        );
        assert_eq!(
            key_of(&format!(
                "{MINIMAL}[firewall]\nblocked_user_agents = [\"\"]\n"
            )),
            "firewall.blocked_user_agents[0]"
        );
    }

    #[test]
    fn certificates_are_checked_on_request_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["git.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("git.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("git.key"), key.serialize_pem()).unwrap();
        std::fs::write(
            dir.path().join("other.key"),
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let source = dir.path().join("mc-proxy.toml");
        let with = |cert: &str, key: &str| {
            let text = one_route(&format!(
                "  mode = \"l7\"\n  tls_cert = \"{cert}\"\n  tls_key = \"{key}\"\n"
            ));
            Config::parse(&text, &source).unwrap()
        };
        assert_eq!(with("git.pem", "git.key").check_certificates().unwrap(), []);
        for (cert, key, name, text) in [
            ("missing.pem", "git.key", "tls_cert", "reading"),
            ("git.key", "git.key", "tls_cert", "no PEM certificate"),
            ("git.pem", "missing.key", "tls_key", "reading"),
            ("git.pem", "other.key", "tls_key", "does not match"),
        ] {
            let err = with(cert, key).check_certificates().unwrap_err();
            assert_eq!(err.key(), format!("listeners[0].routes[1].{name}"), "{err}");
            assert!(
                matches!(err.cause(), ConfigCause::Certificate(_)),
                "{err:?}"
            );
            let shown = err.to_string();
            assert!(shown.contains(text) && !shown.contains('\n'), "{shown}");
        }
        // Parsing alone reads no file.
        assert!(Config::parse(&one_route("  mode = \"l7\"\n  tls_cert = \"/nonexistent/c\"\n  tls_key = \"/nonexistent/k\"\n"), &source).is_ok());
    }
}
