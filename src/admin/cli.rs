//! The `status`, `routes` and `firewall` subcommands: admin API clients.
//!
//! Owns: building the [`ClientTarget`] from the config's `[grpc]` section and
//! the command-line overrides, one call per command, and what is printed.
//! Human output is aligned columns; `--json` is one JSON document on stdout.
//! Every failure is one line on stderr and an exit status (README, "Command line"): 1 when
//! the server is unreachable or refused the call (`NOT_FOUND: ...`), 2 when
//! the client's own settings are unusable.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Code, Status};
use wire::rule::RuleKind;

pub use super::client::ClientTarget;
use super::client::{self, ClientError};
use super::proto;
use super::proto::proxy_admin_service_client::ProxyAdminServiceClient;
use super::status::code_name;
use crate::config::{AdminAddr, AdminAddrError, ClientTls, Config, GrpcConfig};

/// Command-line flags that override the config's `[grpc]` section.
#[derive(Debug, Clone, Default)]
pub struct ClientOverrides {
    /// `--addr`: `unix:PATH` or `IP:PORT`.
    pub addr: Option<String>,
    /// `--ca-cert`
    pub ca_cert: Option<PathBuf>,
    /// `--client-cert`
    pub client_cert: Option<PathBuf>,
    /// `--client-key`
    pub client_key: Option<PathBuf>,
}

/// Why no [`ClientTarget`] can be built: a usage or configuration error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// `--addr` is neither `unix:PATH` nor `IP:PORT`.
    #[error("--addr: {0}")]
    Addr(#[source] AdminAddrError),
    /// No `--addr` and no `[grpc]` section in the config.
    #[error("admin API not configured: no [grpc] section in {} (or pass --addr)", config_path.display())]
    NotConfigured { config_path: PathBuf },
}

impl TargetError {
    /// The process exit status: 2 (usage or configuration), for every cause.
    pub fn exit_code(&self) -> u8 {
        match self {
            TargetError::Addr(_) | TargetError::NotConfigured { .. } => 2,
        }
    }
}

/// Where the CLI finds the server: the config's `[grpc]` section with the
/// flags applied over it. `config` may be `None` only when `--addr` is
/// given (the file is then optional). Without a `[grpc]` section and
/// without `--addr`, the admin API is not configured. Every `Err` is a
/// usage or configuration error (exit status 2, [`TargetError::exit_code`]).
pub fn client_target(
    config: Option<&Config>,
    config_path: &Path,
    overrides: &ClientOverrides,
) -> Result<ClientTarget, TargetError> {
    let grpc: Option<&GrpcConfig> = config.and_then(|c| c.grpc.as_ref());
    let addr = match (&overrides.addr, grpc) {
        (Some(text), _) => AdminAddr::parse(text).map_err(TargetError::Addr)?,
        (None, Some(grpc)) => grpc.addr.clone(),
        (None, None) => {
            return Err(TargetError::NotConfigured {
                config_path: config_path.to_path_buf(),
            })
        }
    };
    let tls = grpc.map(|g| g.client.clone()).unwrap_or_default();
    Ok(ClientTarget {
        addr,
        tls: ClientTls {
            ca_cert: overrides.ca_cert.clone().or(tls.ca_cert),
            client_cert: overrides.client_cert.clone().or(tls.client_cert),
            client_key: overrides.client_key.clone().or(tls.client_key),
        },
    })
}

// ---- commands -------------------------------------------------------------

/// `mc-proxy status [--json] [--expect-pid PID]`
pub async fn status(target: ClientTarget, json: bool, expect_pid: Option<u32>) -> ExitCode {
    let mut client = match connect(&target).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    match client.get_status(proto::GetStatusRequest {}).await {
        Ok(response) => {
            let status = response.into_inner();
            if let Some(want) = expect_pid {
                if let Err(message) = answered_by(&status, want) {
                    eprintln!("mc-proxy: {message}");
                    return ExitCode::from(1);
                }
            }
            let text = if json {
                to_json(&StatusJson::from(&status))
            } else {
                render_status(&status, SystemTime::now())
            };
            emit(&text)
        }
        Err(status) => refused(&target, &status),
    }
}

/// Checks that the server that answered `status` is process `want` in
/// this process's PID namespace. In a pod, `--expect-pid 1` passes for the
/// container's own server only, not for a predecessor or successor in
/// another pod answering on the shared socket (its namespace differs).
fn answered_by(status: &proto::GetStatusResponse, want: u32) -> Result<(), String> {
    let ours = crate::metrics::pid_namespace();
    let same_namespace = status.pid_namespace == 0 || ours == 0 || status.pid_namespace == ours;
    if status.pid == want && same_namespace {
        return Ok(());
    }
    let theirs = if same_namespace {
        format!("pid {}", status.pid)
    } else {
        format!(
            "pid {} in another PID namespace ({} here, {} there)",
            status.pid, ours, status.pid_namespace
        )
    };
    Err(format!("the server answering is {theirs}, not pid {want}"))
}

/// `mc-proxy routes list [--listener ADDR] [--json]`
pub async fn routes_list(target: ClientTarget, listener: Option<String>, json: bool) -> ExitCode {
    let mut client = match connect(&target).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let request = proto::ListRoutesRequest {
        listener_addr: listener.unwrap_or_default(),
    };
    match client.list_routes(request).await {
        Ok(response) => {
            let routes = response.into_inner().routes;
            let text = if json {
                to_json(&routes.iter().map(RouteJson::from).collect::<Vec<_>>())
            } else {
                render_routes(&routes)
            };
            emit(&text)
        }
        Err(status) => refused(&target, &status),
    }
}

/// `mc-proxy backends list [--listener ADDR] [--json]`
pub async fn backends_list(target: ClientTarget, listener: Option<String>, json: bool) -> ExitCode {
    let mut client = match connect(&target).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let request = proto::ListBackendsRequest {
        listener_addr: listener.unwrap_or_default(),
    };
    match client.list_backends(request).await {
        Ok(response) => {
            let backends = response.into_inner().backends;
            let text = if json {
                to_json(&backends.iter().map(BackendJson::from).collect::<Vec<_>>())
            } else {
                render_backends(&backends)
            };
            emit(&text)
        }
        Err(status) => refused(&target, &status),
    }
}

/// What `routes add` asks for: the flags as given (the server validates
/// them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSpec {
    pub listener: String,
    pub hostname: String,
    /// `--backend`, repeated: one is sent as `backend`, several as
    /// `backends` (with `backend` = the first).
    pub backends: Vec<String>,
    /// `round_robin` or `least_connections`.
    pub balance: Option<String>,
    /// A duration like `5s`.
    pub health_interval: Option<String>,
    pub health_path: Option<String>,
    pub health_fall: Option<u32>,
    pub health_rise: Option<u32>,
    pub send_proxy_protocol: bool,
    /// `--mode l7` (`--mode l4`, or no `--mode`, is false).
    pub l7: bool,
    /// `--tls-cert`; a relative path is made absolute against the current
    /// directory before sending (the server's is another).
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`, made absolute likewise.
    pub tls_key: Option<PathBuf>,
    pub backend_tls: bool,
    /// `--backend-ca`, made absolute likewise.
    pub backend_ca: Option<PathBuf>,
    pub backend_server_name: Option<String>,
    /// `auto`, `http1` or `h2`.
    pub backend_protocol: Option<String>,
}

/// A path flag that cannot be sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PathFlagError {
    /// The current directory is unknown (deleted, or not readable).
    #[error("{flag}: cannot make {} absolute: {source}", path.display())]
    Absolute {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The admin API carries paths as UTF-8 text.
    #[error("{flag}: {} is not valid UTF-8", path.display())]
    NotUtf8 { flag: &'static str, path: PathBuf },
}

/// A path flag as sent: absolute (against the CLI's current directory),
/// as UTF-8 text; empty when not given.
fn path_flag(flag: &'static str, path: Option<&Path>) -> Result<String, PathFlagError> {
    let Some(path) = path else {
        return Ok(String::new());
    };
    let absolute = std::path::absolute(path).map_err(|source| PathFlagError::Absolute {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    absolute
        .into_os_string()
        .into_string()
        .map_err(|_| PathFlagError::NotUtf8 {
            flag,
            path: path.to_path_buf(),
        })
}

impl RouteSpec {
    /// The wire route `routes add` sends.
    pub fn to_wire(&self) -> Result<proto::Route, PathFlagError> {
        Ok(proto::Route {
            listener_addr: self.listener.clone(),
            hostname: self.hostname.clone(),
            backend: self.backends.first().cloned().unwrap_or_default(),
            backends: if self.backends.len() > 1 {
                self.backends.clone()
            } else {
                Vec::new()
            },
            balance: self.balance.clone().unwrap_or_default(),
            health_interval: self.health_interval.clone().unwrap_or_default(),
            health_path: self.health_path.clone().unwrap_or_default(),
            health_fall: self.health_fall.unwrap_or(0),
            health_rise: self.health_rise.unwrap_or(0),
            send_proxy_protocol: self.send_proxy_protocol,
            mode: if self.l7 {
                proto::RouteMode::L7
            } else {
                proto::RouteMode::L4
            }
            .into(),
            tls_cert: path_flag("--tls-cert", self.tls_cert.as_deref())?,
            tls_key: path_flag("--tls-key", self.tls_key.as_deref())?,
            backend_tls: self.backend_tls,
            backend_ca: path_flag("--backend-ca", self.backend_ca.as_deref())?,
            backend_server_name: self.backend_server_name.clone().unwrap_or_default(),
            backend_protocol: self.backend_protocol.clone().unwrap_or_default(),
        })
    }
}

/// `mc-proxy routes add --listener ADDR --hostname HOST --backend HOST:PORT
/// [--mode l4|l7] [L7 flags]`; prints `created` or `updated`.
pub async fn routes_add(target: ClientTarget, spec: RouteSpec) -> ExitCode {
    // Before connecting: a flag that can't be sent is a usage error.
    let route = match spec.to_wire() {
        Ok(route) => route,
        Err(err) => return fail(2, &err.to_string()),
    };
    let mut client = match connect(&target).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let request = proto::AddRouteRequest { route: Some(route) };
    match client.add_route(request).await {
        Ok(response) => emit(if response.into_inner().created {
            "created\n"
        } else {
            "updated\n"
        }),
        Err(status) => refused(&target, &status),
    }
}

/// `mc-proxy routes remove --listener ADDR --hostname HOST`
pub async fn routes_remove(target: ClientTarget, listener: String, hostname: String) -> ExitCode {
    let mut client = match connect(&target).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let request = proto::RemoveRouteRequest {
        listener_addr: listener,
        hostname,
    };
    match client.remove_route(request).await {
        Ok(_) => emit("removed\n"),
        Err(status) => refused(&target, &status),
    }
}

/// `mc-proxy firewall list [--json]`
pub async fn firewall_list(target: ClientTarget, json: bool) -> ExitCode {
    let mut client = match connect(&target).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    match client
        .list_firewall_rules(proto::ListFirewallRulesRequest {})
        .await
    {
        Ok(response) => {
            let rules = response.into_inner().rules;
            let text = if json {
                to_json(&rules.iter().map(RuleJson::from).collect::<Vec<_>>())
            } else {
                render_rules(&rules)
            };
            emit(&text)
        }
        Err(status) => refused(&target, &status),
    }
}

/// `mc-proxy firewall add (--ip IP | --cidr CIDR | --country CC | --user-agent REGEX)`
pub async fn firewall_add(target: ClientTarget, kind: RuleKind, value: String) -> ExitCode {
    let mut client = match connect(&target).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let request = proto::AddFirewallRuleRequest {
        rule: Some(wire_rule(kind, value)),
    };
    match client.add_firewall_rule(request).await {
        Ok(_) => emit("added\n"),
        Err(status) => refused(&target, &status),
    }
}

/// `mc-proxy firewall remove (--ip IP | --cidr CIDR | --country CC | --user-agent REGEX)`
pub async fn firewall_remove(target: ClientTarget, kind: RuleKind, value: String) -> ExitCode {
    let mut client = match connect(&target).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let request = proto::RemoveFirewallRuleRequest {
        rule: Some(wire_rule(kind, value)),
    };
    match client.remove_firewall_rule(request).await {
        Ok(_) => emit("removed\n"),
        Err(status) => refused(&target, &status),
    }
}

// ---- plumbing -------------------------------------------------------------

async fn connect(target: &ClientTarget) -> Result<ProxyAdminServiceClient<Channel>, ExitCode> {
    client::connect(&target.addr, &target.tls)
        .await
        .map_err(|err: ClientError| fail(err.exit_code(), &err.to_string()))
}

/// A call that failed: the server's refusal as `CODE: message`, or, when
/// the connection itself failed (a refused client certificate shows up
/// here with TLS 1.3), an unreachable server. `CANCELLED` is the client's
/// own transport giving up on a connection the server closed (hyper's
/// "operation was canceled"); the server never answers with it.
fn refused(target: &ClientTarget, status: &Status) -> ExitCode {
    let transport_failed = std::error::Error::source(status).is_some()
        && matches!(status.code(), Code::Unavailable | Code::Unknown);
    if transport_failed || matches!(status.code(), Code::Unavailable | Code::Cancelled) {
        let mut reason = match std::error::Error::source(status) {
            Some(source) => client::error_chain(source),
            None => one_line(status.message()),
        };
        if status.code() == Code::Cancelled {
            reason = format!(
                "the server closed the connection during the call ({reason}); \
                 over mTLS, check the client certificate"
            );
        }
        return fail(
            1,
            &format!("cannot reach admin API at {}: {reason}", target.addr),
        );
    }
    fail(
        1,
        &format!(
            "{}: {}",
            code_name(status.code()),
            one_line(status.message())
        ),
    )
}

fn fail(code: u8, line: &str) -> ExitCode {
    let _ = writeln!(io::stderr().lock(), "mc-proxy: {}", one_line(line));
    ExitCode::from(code)
}

/// Writes `text` to stdout; a closed stdout is a runtime failure, not a panic.
fn emit(text: &str) -> ExitCode {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => ExitCode::from(1),
        Err(err) => fail(1, &format!("cannot write to stdout: {err}")),
    }
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

fn wire_rule(kind: RuleKind, value: String) -> proto::FirewallRule {
    let r#type = match kind {
        RuleKind::Ip => proto::FirewallRuleType::Ip,
        RuleKind::Cidr => proto::FirewallRuleType::Cidr,
        RuleKind::Country => proto::FirewallRuleType::Country,
        RuleKind::UserAgent => proto::FirewallRuleType::UserAgent,
    };
    proto::FirewallRule {
        r#type: r#type.into(),
        value,
    }
}

fn rule_type_name(r#type: i32) -> &'static str {
    match proto::FirewallRuleType::try_from(r#type) {
        Ok(proto::FirewallRuleType::Ip) => "ip",
        Ok(proto::FirewallRuleType::Cidr) => "cidr",
        Ok(proto::FirewallRuleType::Country) => "country",
        Ok(proto::FirewallRuleType::UserAgent) => "user_agent",
        _ => "unspecified",
    }
}

fn rfc3339(timestamp: Option<&prost_types::Timestamp>) -> Option<(SystemTime, String)> {
    let time = SystemTime::try_from(*timestamp?).ok()?;
    Some((time, humantime::format_rfc3339_seconds(time).to_string()))
}

// ---- JSON -----------------------------------------------------------------

fn to_json<T: Serialize>(value: &T) -> String {
    // Plain structs of strings and numbers: serialisation cannot fail.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

#[derive(Debug, Serialize)]
struct StatusJson {
    version: String,
    pid: u32,
    pid_namespace: u64,
    started_at: Option<String>,
    total_connections: i64,
    active_connections: i64,
    blocked_connections: i64,
    listeners: Vec<ListenerJson>,
    /// `null` after a plain start.
    took_over: Option<TakeoverJson>,
}

#[derive(Debug, Serialize)]
struct TakeoverJson {
    at: Option<String>,
    predecessor_pid: u32,
    predecessor_started_at: Option<String>,
    predecessor_version: String,
}

#[derive(Debug, Serialize)]
struct ListenerJson {
    addr: String,
    route_count: i32,
    active_connections: i64,
    total_connections: i64,
}

impl From<&proto::GetStatusResponse> for StatusJson {
    fn from(status: &proto::GetStatusResponse) -> Self {
        StatusJson {
            version: status.version.clone(),
            pid: status.pid,
            pid_namespace: status.pid_namespace,
            started_at: rfc3339(status.started_at.as_ref()).map(|(_, text)| text),
            total_connections: status.total_connections,
            active_connections: status.active_connections,
            blocked_connections: status.blocked_connections,
            listeners: status
                .listeners
                .iter()
                .map(|l| ListenerJson {
                    addr: l.addr.clone(),
                    route_count: l.route_count,
                    active_connections: l.active_connections,
                    total_connections: l.total_connections,
                })
                .collect(),
            took_over: status.took_over.as_ref().map(|t| TakeoverJson {
                at: rfc3339(t.at.as_ref()).map(|(_, text)| text),
                predecessor_pid: t.predecessor_pid,
                predecessor_started_at: rfc3339(t.predecessor_started_at.as_ref())
                    .map(|(_, text)| text),
                predecessor_version: t.predecessor_version.clone(),
            }),
        }
    }
}

/// A route in `routes list --json`: the L7 keys only on L7 routes, the
/// health keys only on routes with an active check.
#[derive(Debug, Serialize)]
struct RouteJson {
    listener_addr: String,
    hostname: String,
    /// The first of `backends`.
    backend: String,
    backends: Vec<String>,
    balance: String,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    health: Option<HealthJson>,
    send_proxy_protocol: bool,
    mode: &'static str,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    l7: Option<L7Json>,
}

#[derive(Debug, Serialize)]
struct HealthJson {
    health_interval: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    health_path: Option<String>,
    health_fall: u32,
    health_rise: u32,
}

/// A backend in `backends list --json`: `BackendStatus`'s fields.
#[derive(Debug, Serialize)]
struct BackendJson {
    listener_addr: String,
    hostname: String,
    backend: String,
    healthy: bool,
    active_connections: i64,
    total_connections: i64,
    last_error: String,
}

impl From<&proto::BackendStatus> for BackendJson {
    fn from(b: &proto::BackendStatus) -> Self {
        BackendJson {
            listener_addr: b.listener_addr.clone(),
            hostname: b.hostname.clone(),
            backend: b.backend.clone(),
            healthy: b.healthy,
            active_connections: b.active_connections,
            total_connections: b.total_connections,
            last_error: b.last_error.clone(),
        }
    }
}

/// A route's backends: `backends`, or the one in `backend` when the list
/// is empty (a server that predates pools).
fn route_backends(route: &proto::Route) -> Vec<String> {
    if route.backends.is_empty() {
        vec![route.backend.clone()]
    } else {
        route.backends.clone()
    }
}

/// The balance as shown: `""` is `round_robin`.
fn balance_name(route: &proto::Route) -> String {
    non_empty(&route.balance).unwrap_or_else(|| "round_robin".to_string())
}

#[derive(Debug, Serialize)]
struct L7Json {
    tls_cert: String,
    tls_key: String,
    backend_tls: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend_ca: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend_server_name: Option<String>,
    backend_protocol: String,
}

fn is_l7(route: &proto::Route) -> bool {
    route.mode == i32::from(proto::RouteMode::L7)
}

/// `""` is "the default": not shown.
fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_string())
}

/// The backend protocol as shown: `""` is `auto`.
fn backend_protocol_name(route: &proto::Route) -> String {
    non_empty(&route.backend_protocol).unwrap_or_else(|| "auto".to_string())
}

impl From<&proto::Route> for RouteJson {
    fn from(route: &proto::Route) -> Self {
        RouteJson {
            listener_addr: route.listener_addr.clone(),
            hostname: route.hostname.clone(),
            backend: route.backend.clone(),
            backends: route_backends(route),
            balance: balance_name(route),
            health: non_empty(&route.health_interval).map(|interval| HealthJson {
                health_interval: interval,
                health_path: non_empty(&route.health_path),
                health_fall: route.health_fall,
                health_rise: route.health_rise,
            }),
            send_proxy_protocol: route.send_proxy_protocol,
            mode: if is_l7(route) { "l7" } else { "l4" },
            l7: is_l7(route).then(|| L7Json {
                tls_cert: route.tls_cert.clone(),
                tls_key: route.tls_key.clone(),
                backend_tls: route.backend_tls,
                backend_ca: non_empty(&route.backend_ca),
                backend_server_name: non_empty(&route.backend_server_name),
                backend_protocol: backend_protocol_name(route),
            }),
        }
    }
}

#[derive(Debug, Serialize)]
struct RuleJson {
    #[serde(rename = "type")]
    kind: &'static str,
    value: String,
}

impl From<&proto::FirewallRule> for RuleJson {
    fn from(rule: &proto::FirewallRule) -> Self {
        RuleJson {
            kind: rule_type_name(rule.r#type),
            value: rule.value.clone(),
        }
    }
}

// ---- human output ---------------------------------------------------------

/// Rows under a header, each column padded to its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        // An empty last cell leaves no padding behind.
        out.push_str(line.trim_end_matches(' '));
        out.push('\n');
    }
    out
}

fn render_status(status: &proto::GetStatusResponse, now: SystemTime) -> String {
    let mut out = format!("version      {}\n", status.version);
    out.push_str(&format!("pid          {}\n", status.pid));
    if let Some((started, text)) = rfc3339(status.started_at.as_ref()) {
        let up = now.duration_since(started).unwrap_or_default();
        let up = humantime::format_duration(Duration::from_secs(up.as_secs()));
        out.push_str(&format!("started      {text} (up {up})\n"));
    }
    match &status.took_over {
        Some(t) => {
            let at = rfc3339(t.at.as_ref()).map_or_else(|| "?".to_string(), |(_, text)| text);
            let version = match t.predecessor_version.as_str() {
                "" => String::new(),
                v => format!(", {v}"),
            };
            out.push_str(&format!(
                "took over    at {at} from pid {}{version}\n",
                t.predecessor_pid
            ));
        }
        None => out.push_str("took over    no (bound its own sockets)\n"),
    }
    out.push_str(&format!(
        "connections  total {}, active {}, blocked {}\n",
        status.total_connections, status.active_connections, status.blocked_connections
    ));
    if !status.listeners.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = status
            .listeners
            .iter()
            .map(|l| {
                vec![
                    l.addr.clone(),
                    l.route_count.to_string(),
                    l.active_connections.to_string(),
                    l.total_connections.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(&["LISTENER", "ROUTES", "ACTIVE", "TOTAL"], &rows));
    }
    out
}

/// An L7 route's settings on one line (`cert=... key=... protocol=auto
/// backend_tls ca=... server_name=...`, the defaults left out where they
/// say nothing).
fn l7_details(route: &proto::Route) -> String {
    let mut out = format!(
        "cert={} key={} protocol={}",
        route.tls_cert,
        route.tls_key,
        backend_protocol_name(route)
    );
    if route.backend_tls {
        out.push_str(" backend_tls");
    }
    if let Some(ca) = non_empty(&route.backend_ca) {
        out.push_str(&format!(" ca={ca}"));
    }
    if let Some(name) = non_empty(&route.backend_server_name) {
        out.push_str(&format!(" server_name={name}"));
    }
    out
}

/// A route's balance and active check on one line (`balance=... health=5s
/// path=/healthz fall=3 rise=2`), empty when both are the defaults.
fn pool_details(route: &proto::Route) -> String {
    let mut parts = Vec::new();
    let balance = balance_name(route);
    if balance != "round_robin" {
        parts.push(format!("balance={balance}"));
    }
    if let Some(interval) = non_empty(&route.health_interval) {
        parts.push(format!("health={interval}"));
        if let Some(path) = non_empty(&route.health_path) {
            parts.push(format!("path={path}"));
        }
        parts.push(format!(
            "fall={} rise={}",
            route.health_fall, route.health_rise
        ));
    }
    parts.join(" ")
}

fn render_routes(routes: &[proto::Route]) -> String {
    // The PROXY-protocol column appears only when some route uses it; the
    // MODE and L7 columns only when some route is L7; the POOL column only
    // when some route balances by least connections or has a check.
    let proxy_column = routes.iter().any(|r| r.send_proxy_protocol);
    let l7_columns = routes.iter().any(is_l7);
    let pool_column = routes.iter().any(|r| !pool_details(r).is_empty());
    let rows: Vec<Vec<String>> = routes
        .iter()
        .map(|r| {
            let mut row = vec![
                r.listener_addr.clone(),
                r.hostname.clone(),
                route_backends(r).join(","),
            ];
            if pool_column {
                row.push(pool_details(r));
            }
            if l7_columns {
                row.push(if is_l7(r) { "l7" } else { "l4" }.into());
            }
            if proxy_column {
                row.push(if r.send_proxy_protocol { "yes" } else { "no" }.into());
            }
            if l7_columns {
                row.push(if is_l7(r) {
                    l7_details(r)
                } else {
                    String::new()
                });
            }
            row
        })
        .collect();
    let mut header = vec!["LISTENER", "HOSTNAME", "BACKEND"];
    if pool_column {
        header.push("POOL");
    }
    if l7_columns {
        header.push("MODE");
    }
    if proxy_column {
        header.push("SEND_PROXY_PROTOCOL");
    }
    if l7_columns {
        header.push("L7");
    }
    table(&header, &rows)
}

fn render_backends(backends: &[proto::BackendStatus]) -> String {
    let rows: Vec<Vec<String>> = backends
        .iter()
        .map(|b| {
            vec![
                b.listener_addr.clone(),
                b.hostname.clone(),
                b.backend.clone(),
                if b.healthy { "up" } else { "down" }.to_string(),
                b.active_connections.to_string(),
                b.total_connections.to_string(),
                one_line(&b.last_error),
            ]
        })
        .collect();
    table(
        &[
            "LISTENER",
            "HOSTNAME",
            "BACKEND",
            "STATE",
            "ACTIVE",
            "TOTAL",
            "LAST_ERROR",
        ],
        &rows,
    )
}

fn render_rules(rules: &[proto::FirewallRule]) -> String {
    let rows: Vec<Vec<String>> = rules
        .iter()
        .map(|r| vec![rule_type_name(r.r#type).to_string(), r.value.clone()])
        .collect();
    table(&["TYPE", "VALUE"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(listener: &str, host: &str, backend: &str, pp: bool) -> proto::Route {
        proto::Route {
            listener_addr: listener.into(),
            hostname: host.into(),
            backend: backend.into(),
            send_proxy_protocol: pp,
            ..proto::Route::default()
        }
    }

    #[test]
    fn routes_table_is_aligned() {
        let text = render_routes(&[
            route(":443", "a.example.net", "127.0.0.1:1", false),
            route("127.0.0.1:8443", "b.test", "backend.internal:443", false),
        ]);
        assert_eq!(
            text,
            "LISTENER        HOSTNAME       BACKEND\n\
             :443            a.example.net  127.0.0.1:1\n\
             127.0.0.1:8443  b.test         backend.internal:443\n"
        );
        assert!(render_routes(&[route(":443", "a.test", "1.2.3.4:5", true)])
            .contains("SEND_PROXY_PROTOCOL"));
    }

    fn l7_route(listener: &str, host: &str, backend: &str) -> proto::Route {
        proto::Route {
            mode: proto::RouteMode::L7.into(),
            tls_cert: "/srv/certs/git.pem".into(),
            tls_key: "/srv/certs/git.key".into(),
            ..route(listener, host, backend, false)
        }
    }

    #[test]
    fn l7_routes_show_their_mode_and_settings() {
        let mut tls = l7_route(":443", "git.test", "git.internal:3443");
        tls.backend_tls = true;
        tls.backend_ca = "/srv/certs/ca.pem".into();
        tls.backend_server_name = "git.svc".into();
        tls.backend_protocol = "h2".into();
        let text = render_routes(&[
            route(":443", "a.test", "127.0.0.1:1", false),
            l7_route(":443", "b.test", "127.0.0.1:2"),
            tls.clone(),
        ]);
        assert_eq!(
            text,
            "LISTENER  HOSTNAME  BACKEND            MODE  L7\n\
             :443      a.test    127.0.0.1:1        l4\n\
             :443      b.test    127.0.0.1:2        l7    cert=/srv/certs/git.pem key=/srv/certs/git.key protocol=auto\n\
             :443      git.test  git.internal:3443  l7    cert=/srv/certs/git.pem key=/srv/certs/git.key protocol=h2 backend_tls ca=/srv/certs/ca.pem server_name=git.svc\n"
        );
        let json: serde_json::Value = serde_json::from_str(&to_json(&vec![
            RouteJson::from(&route(":443", "a.test", "127.0.0.1:1", false)),
            RouteJson::from(&l7_route(":443", "b.test", "127.0.0.1:2")),
            RouteJson::from(&tls),
        ]))
        .unwrap();
        assert_eq!(json[0]["mode"], "l4");
        assert!(json[0].get("tls_cert").is_none(), "{json}");
        assert_eq!(json[1]["mode"], "l7");
        assert_eq!(json[1]["tls_cert"], "/srv/certs/git.pem");
        assert_eq!(json[1]["backend_protocol"], "auto");
        assert_eq!(json[1]["backend_tls"], false);
        assert!(json[1].get("backend_ca").is_none(), "{json}");
        assert_eq!(json[2]["backend_ca"], "/srv/certs/ca.pem");
        assert_eq!(json[2]["backend_server_name"], "git.svc");
        assert_eq!(json[2]["backend_protocol"], "h2");
    }

    #[test]
    fn route_spec_paths_are_made_absolute_against_the_cwd() {
        let cwd = std::env::current_dir().unwrap();
        let spec = RouteSpec {
            listener: ":443".into(),
            hostname: "git.test".into(),
            backends: vec!["127.0.0.1:3000".into()],
            l7: true,
            tls_cert: Some("certs/git.pem".into()),
            tls_key: Some("/abs/git.key".into()),
            backend_tls: true,
            backend_ca: Some("ca.pem".into()),
            backend_server_name: Some("git.svc".into()),
            backend_protocol: Some("http1".into()),
            ..RouteSpec::default()
        };
        let wire = spec.to_wire().unwrap();
        assert_eq!(wire.mode, i32::from(proto::RouteMode::L7));
        assert_eq!(
            wire.tls_cert,
            cwd.join("certs/git.pem").to_str().unwrap().to_string()
        );
        assert_eq!(wire.tls_key, "/abs/git.key");
        assert_eq!(wire.backend_ca, cwd.join("ca.pem").to_str().unwrap());
        assert_eq!(wire.backend_server_name, "git.svc");
        assert_eq!(wire.backend_protocol, "http1");
        assert!(wire.backend_tls);
        let l4 = RouteSpec {
            listener: ":443".into(),
            hostname: "a.test".into(),
            backends: vec!["127.0.0.1:1".into()],
            ..RouteSpec::default()
        }
        .to_wire()
        .unwrap();
        assert_eq!(l4.mode, i32::from(proto::RouteMode::L4));
        assert_eq!(
            (l4.tls_cert, l4.tls_key, l4.backend_ca),
            (String::new(), String::new(), String::new())
        );
        let user_agent = wire_rule(RuleKind::UserAgent, "(?i)sqlmap".into());
        assert_eq!(rule_type_name(user_agent.r#type), "user_agent");
        assert_eq!(
            render_rules(&[user_agent]),
            "TYPE        VALUE\nuser_agent  (?i)sqlmap\n"
        );
    }

    #[test]
    fn route_spec_sends_one_backend_as_backend_and_several_as_backends() {
        let spec = |backends: &[&str]| RouteSpec {
            listener: ":443".into(),
            hostname: "a.test".into(),
            backends: backends.iter().map(|b| b.to_string()).collect(),
            ..RouteSpec::default()
        };
        let one = spec(&["127.0.0.1:1"]).to_wire().unwrap();
        assert_eq!(one.backend, "127.0.0.1:1");
        assert!(one.backends.is_empty());
        assert_eq!(
            (
                one.balance.as_str(),
                one.health_interval.as_str(),
                one.health_fall
            ),
            ("", "", 0)
        );
        let two = RouteSpec {
            balance: Some("least_connections".into()),
            health_interval: Some("5s".into()),
            health_path: Some("/healthz".into()),
            health_fall: Some(4),
            health_rise: Some(1),
            ..spec(&["127.0.0.1:1", "127.0.0.1:2"])
        }
        .to_wire()
        .unwrap();
        assert_eq!(two.backend, "127.0.0.1:1");
        assert_eq!(two.backends, ["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(two.balance, "least_connections");
        assert_eq!(two.health_interval, "5s");
        assert_eq!(two.health_path, "/healthz");
        assert_eq!((two.health_fall, two.health_rise), (4, 1));
    }

    #[test]
    fn pools_show_every_backend_and_their_settings() {
        let mut pool = route(":443", "p.test", "10.0.0.1:443", false);
        pool.backends = vec!["10.0.0.1:443".into(), "10.0.0.2:443".into()];
        pool.balance = "least_connections".into();
        pool.health_interval = "5s".into();
        pool.health_fall = 3;
        pool.health_rise = 2;
        let mut plain = route(":443", "a.test", "127.0.0.1:1", false);
        plain.backends = vec!["127.0.0.1:1".into()];
        plain.balance = "round_robin".into();
        let text = render_routes(&[plain.clone(), pool.clone()]);
        assert_eq!(
            text,
            "LISTENER  HOSTNAME  BACKEND                    POOL\n\
             :443      a.test    127.0.0.1:1\n\
             :443      p.test    10.0.0.1:443,10.0.0.2:443  balance=least_connections health=5s fall=3 rise=2\n"
        );
        // Without a pool setting, no POOL column.
        assert!(!render_routes(&[plain.clone()]).contains("POOL"));
        let json: serde_json::Value = serde_json::from_str(&to_json(&vec![
            RouteJson::from(&plain),
            RouteJson::from(&pool),
        ]))
        .unwrap();
        assert_eq!(json[0]["backends"], serde_json::json!(["127.0.0.1:1"]));
        assert_eq!(json[0]["balance"], "round_robin");
        assert!(json[0].get("health_interval").is_none(), "{json}");
        assert_eq!(
            json[1]["backends"],
            serde_json::json!(["10.0.0.1:443", "10.0.0.2:443"])
        );
        assert_eq!(json[1]["backend"], "10.0.0.1:443");
        assert_eq!(json[1]["balance"], "least_connections");
        assert_eq!(json[1]["health_interval"], "5s");
        assert_eq!(json[1]["health_fall"], 3);
        assert_eq!(json[1]["health_rise"], 2);
        assert!(json[1].get("health_path").is_none(), "{json}");
    }

    #[test]
    fn backends_table_and_json() {
        let backends = [
            proto::BackendStatus {
                listener_addr: ":443".into(),
                hostname: "p.test".into(),
                backend: "10.0.0.1:443".into(),
                healthy: true,
                active_connections: 2,
                total_connections: 40,
                last_error: String::new(),
            },
            proto::BackendStatus {
                listener_addr: ":443".into(),
                hostname: "p.test".into(),
                backend: "10.0.0.2:443".into(),
                healthy: false,
                active_connections: 0,
                total_connections: 7,
                last_error: "connection refused\nagain".into(),
            },
        ];
        assert_eq!(
            render_backends(&backends),
            "LISTENER  HOSTNAME  BACKEND       STATE  ACTIVE  TOTAL  LAST_ERROR\n\
             :443      p.test    10.0.0.1:443  up     2       40\n\
             :443      p.test    10.0.0.2:443  down   0       7      connection refused again\n"
        );
        let json: serde_json::Value = serde_json::from_str(&to_json(
            &backends.iter().map(BackendJson::from).collect::<Vec<_>>(),
        ))
        .unwrap();
        assert_eq!(
            json[1],
            serde_json::json!({
                "listener_addr": ":443",
                "hostname": "p.test",
                "backend": "10.0.0.2:443",
                "healthy": false,
                "active_connections": 0,
                "total_connections": 7,
                "last_error": "connection refused\nagain",
            })
        );
    }

    #[test]
    fn status_json_has_the_documented_keys() {
        let status = proto::GetStatusResponse {
            version: "mc-proxy 0.1.0".into(),
            started_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            listeners: vec![proto::ListenerStatus {
                addr: ":443".into(),
                route_count: 2,
                active_connections: 1,
                total_connections: 9,
            }],
            total_connections: 9,
            active_connections: 1,
            blocked_connections: 3,
            took_over: None,
            pid: 77,
            pid_namespace: 4026531836,
        };
        let value: serde_json::Value =
            serde_json::from_str(&to_json(&StatusJson::from(&status))).unwrap();
        assert_eq!(value["started_at"], "2023-11-14T22:13:20Z");
        assert_eq!(value["pid"], 77);
        assert_eq!(value["pid_namespace"], 4026531836u64);
        assert_eq!(value["blocked_connections"], 3);
        assert_eq!(value["listeners"][0]["route_count"], 2);
        assert_eq!(value["listeners"][0]["addr"], ":443");
        let human = render_status(
            &status,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_003_662),
        );
        assert!(human.contains("(up 1h 1m 1s)"), "{human}");
        assert!(human.contains(":443      2       1       9"), "{human}");
        assert!(human.contains("took over    no"), "{human}");
        assert_eq!(value["took_over"], serde_json::Value::Null);

        let status = proto::GetStatusResponse {
            took_over: Some(proto::Takeover {
                at: Some(prost_types::Timestamp {
                    seconds: 1_700_000_100,
                    nanos: 0,
                }),
                predecessor_pid: 4242,
                predecessor_started_at: Some(prost_types::Timestamp {
                    seconds: 1_600_000_000,
                    nanos: 0,
                }),
                predecessor_version: "mc-proxy 0.0.9".into(),
            }),
            ..status
        };
        let value: serde_json::Value =
            serde_json::from_str(&to_json(&StatusJson::from(&status))).unwrap();
        assert_eq!(value["took_over"]["at"], "2023-11-14T22:15:00Z");
        assert_eq!(value["took_over"]["predecessor_pid"], 4242);
        assert_eq!(
            value["took_over"]["predecessor_started_at"],
            "2020-09-13T12:26:40Z"
        );
        assert_eq!(value["took_over"]["predecessor_version"], "mc-proxy 0.0.9");
        let human = render_status(
            &status,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_003_662),
        );
        assert!(
            human.contains("took over    at 2023-11-14T22:15:00Z from pid 4242, mc-proxy 0.0.9"),
            "{human}"
        );
    }

    #[test]
    fn rule_json_uses_lower_case_types() {
        let rule = wire_rule(RuleKind::Country, "KP".into());
        assert_eq!(
            to_json(&vec![RuleJson::from(&rule)]),
            "[\n  {\n    \"type\": \"country\",\n    \"value\": \"KP\"\n  }\n]\n"
        );
    }

    #[test]
    fn client_target_from_config_and_flags() {
        let path = Path::new("/etc/x.toml");
        let parse = |text: &str| Config::parse(text, path).unwrap();
        let none = ClientOverrides::default();

        let bare = parse("[database]\npath = \"/x.db\"\n");
        let err = client_target(Some(&bare), path, &none).unwrap_err();
        assert_eq!(
            err,
            TargetError::NotConfigured {
                config_path: path.to_path_buf()
            }
        );
        assert_eq!(
            err.to_string(),
            "admin API not configured: no [grpc] section in /etc/x.toml (or pass --addr)"
        );
        assert_eq!(err.exit_code(), 2);
        // --addr alone is enough, with or without a config.
        let flags = ClientOverrides {
            addr: Some("unix:/run/a.sock".into()),
            ..ClientOverrides::default()
        };
        assert!(client_target(Some(&bare), path, &flags).is_ok());
        assert!(client_target(None, path, &flags).is_ok());
        let bad = ClientOverrides {
            addr: Some("nowhere".into()),
            ..ClientOverrides::default()
        };
        let err = client_target(None, path, &bad).unwrap_err();
        assert_eq!(
            err,
            TargetError::Addr(AdminAddrError::NotAnAddress("nowhere".into()))
        );
        assert_eq!(
            err.to_string(),
            "--addr: \"nowhere\" is neither \"unix:PATH\" nor \"IP:PORT\""
        );

        let with_grpc = parse(
            "[database]\npath = \"/x.db\"\n[grpc]\naddr = \"unix:/run/a.sock\"\nca_cert = \"/ca.pem\"\n",
        );
        let target = client_target(Some(&with_grpc), path, &none).unwrap();
        assert_eq!(target.addr.to_string(), "unix:/run/a.sock");
        let flags = ClientOverrides {
            addr: Some("127.0.0.1:9443".into()),
            client_cert: Some("/cli.pem".into()),
            ..ClientOverrides::default()
        };
        let target = client_target(Some(&with_grpc), path, &flags).unwrap();
        assert_eq!(target.addr.to_string(), "127.0.0.1:9443");
        assert_eq!(target.tls.ca_cert.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(
            target.tls.client_cert.as_deref(),
            Some(Path::new("/cli.pem"))
        );
    }
}
