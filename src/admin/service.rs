//! The `ProxyAdminService` handlers.
//!
//! Owns: turning wire messages into validated values (`Hostname`, `Backend`,
//! `Mode` with its `L7Route`, `Rule`) and store results into status codes.
//! An L7 route's certificate and key are read and checked
//! (`l7::certs::load`, on the blocking pool) before anything is written. Bad input is
//! `INVALID_ARGUMENT` naming the field; an unknown listener or removing
//! something absent is `NOT_FOUND`; a storage failure is `INTERNAL` (the
//! detail goes to the log, not the client). Never `ALREADY_EXISTS`.
//!
//! Never writes a table itself: every change goes through the store, which
//! commits to SQLite before it touches memory.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{error, info};
use wire::route::{
    parse_server_name, BackendProtocol, Balance, L7Route, L7Settings, Mode, ModeError, Pool,
    PoolError, PoolSettings, MAX_BACKENDS,
};
use wire::rule::{Rule, RuleKind};

use super::proto;
use super::proto::proxy_admin_service_server::ProxyAdminService;
use super::status::code_name;
use crate::firewall::Firewall;
use crate::l7::certs;
use crate::metrics::Stats;
use crate::routes::{Backend, Hostname, ListenerRoutes, Routes, Target};
use crate::store::{Store, StoreError};

/// Everything the admin service reads or changes.
#[derive(Clone)]
pub struct AdminState {
    pub routes: Arc<Routes>,
    pub store: Store,
    pub firewall: Arc<Firewall>,
    pub stats: Arc<Stats>,
    /// `mc-proxy X.Y.Z[ (git description)]`, as printed by `--version`.
    pub version: String,
}

/// The `mc_proxy.v1.ProxyAdminService` implementation.
#[derive(Clone)]
pub struct AdminService {
    state: AdminState,
}

impl AdminService {
    pub fn new(state: AdminState) -> Self {
        AdminService { state }
    }
}

/// Longest piece of client input echoed back in an error message or a log
/// line; a status message travels in an HTTP/2 header.
const MAX_ECHO_CHARS: usize = 80;

/// `text` quoted for a message, cut to [`MAX_ECHO_CHARS`].
fn quoted(text: &str) -> String {
    if text.chars().count() <= MAX_ECHO_CHARS {
        format!("{text:?}")
    } else {
        let cut: String = text.chars().take(MAX_ECHO_CHARS).collect();
        format!("{cut:?}...")
    }
}

fn invalid(field: &str, problem: impl fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {problem}"))
}

fn listener_not_found(addr: &str) -> Status {
    Status::not_found(format!("listener {} not found", quoted(addr)))
}

fn parse_listener(field: &str, addr: &str) -> Result<(), Status> {
    if addr.is_empty() {
        return Err(invalid(
            field,
            "required (a listener addr as written in the config, like \":443\")",
        ));
    }
    Ok(())
}

fn parse_hostname(field: &str, text: &str) -> Result<Hostname, Status> {
    Hostname::parse(text).map_err(|e| invalid(field, format_args!("{}: {e}", quoted(text))))
}

fn parse_backend(field: &str, text: &str) -> Result<Backend, Status> {
    Backend::parse(text).map_err(|e| invalid(field, format_args!("{}: {e}", quoted(text))))
}

/// A wire route's pool fields, each parsed (the rules between them are
/// checked later, by [`check_pool`], once the mode is known).
/// `route.backend` may be empty when `route.backends` is set; unset
/// fields (`""`, 0) are `None`.
fn parse_pool_fields(route: &proto::Route) -> Result<PoolSettings, Status> {
    let backend = if route.backend.is_empty() && !route.backends.is_empty() {
        None
    } else {
        Some(parse_backend("route.backend", &route.backend)?)
    };
    if route.backends.len() > MAX_BACKENDS {
        return Err(invalid(
            "route.backends",
            PoolError::TooManyBackends(route.backends.len()),
        ));
    }
    let backends = route
        .backends
        .iter()
        .enumerate()
        .map(|(i, text)| parse_backend(&format!("route.backends[{i}]"), text))
        .collect::<Result<Vec<_>, _>>()?;
    let balance = Balance::parse(&route.balance).ok_or_else(|| {
        invalid(
            "route.balance",
            format_args!(
                "{}: not one of \"round_robin\", \"least_connections\" (\"\" = round_robin)",
                quoted(&route.balance)
            ),
        )
    })?;
    let health_interval = match route.health_interval.as_str() {
        "" => None,
        text => Some(crate::config::parse_duration(text).map_err(|_| {
            invalid(
                "route.health_interval",
                format_args!(
                    "{}: not a duration like \"500ms\", \"5s\" or \"1m\"",
                    quoted(text)
                ),
            )
        })?),
    };
    let given = |n: u32| (n != 0).then_some(n);
    Ok(PoolSettings {
        backend,
        backends,
        balance: Some(balance),
        health_interval,
        health_path: (!route.health_path.is_empty()).then(|| route.health_path.clone()),
        health_fall: given(route.health_fall),
        health_rise: given(route.health_rise),
    })
}

/// The rules between the pool fields (`wire::route::PoolSettings`'s): a
/// refusal is `INVALID_ARGUMENT` naming `route.<the field at fault>`.
fn check_pool(settings: PoolSettings, l7: bool) -> Result<Pool, Status> {
    settings
        .into_pool(l7, true)
        .map_err(|e| invalid(&format!("route.{}", e.key().label()), e))
}

/// Validates a wire `FirewallRule`; `field` is the message's name (`rule`).
fn parse_rule(field: &str, rule: Option<proto::FirewallRule>) -> Result<Rule, Status> {
    let rule = rule.ok_or_else(|| invalid(field, "required"))?;
    let kind = match proto::FirewallRuleType::try_from(rule.r#type) {
        Ok(proto::FirewallRuleType::Ip) => RuleKind::Ip,
        Ok(proto::FirewallRuleType::Cidr) => RuleKind::Cidr,
        Ok(proto::FirewallRuleType::Country) => RuleKind::Country,
        Ok(proto::FirewallRuleType::UserAgent) => RuleKind::UserAgent,
        Ok(proto::FirewallRuleType::Unspecified) => {
            return Err(invalid(
                &format!("{field}.type"),
                "required: FIREWALL_RULE_TYPE_IP, _CIDR, _COUNTRY or _USER_AGENT",
            ))
        }
        Err(_) => {
            return Err(invalid(
                &format!("{field}.type"),
                format_args!("unknown value {}", rule.r#type),
            ))
        }
    };
    // A user-agent pattern is parsed whole (its parser caps the length and
    // its errors don't echo it); the other values are short when valid.
    let value = match kind {
        RuleKind::UserAgent => rule.value.as_str(),
        _ => truncate_for_parse(&rule.value),
    };
    Rule::parse(kind, value).map_err(|e| invalid(&format!("{field}.value"), e))
}

/// Rule errors echo the value; a valid rule value is never this long.
fn truncate_for_parse(text: &str) -> &str {
    match text.char_indices().nth(MAX_ECHO_CHARS) {
        Some((cut, _)) => &text[..cut],
        None => text,
    }
}

fn rule_type(kind: RuleKind) -> proto::FirewallRuleType {
    match kind {
        RuleKind::Ip => proto::FirewallRuleType::Ip,
        RuleKind::Cidr => proto::FirewallRuleType::Cidr,
        RuleKind::Country => proto::FirewallRuleType::Country,
        RuleKind::UserAgent => proto::FirewallRuleType::UserAgent,
    }
}

/// An L7 route's file path: absolute (the server's working directory is
/// nobody's business; the CLI makes relative paths absolute before sending).
fn parse_path(field: &str, text: &str) -> Result<PathBuf, Status> {
    let path = PathBuf::from(text);
    if !path.is_absolute() {
        return Err(invalid(
            field,
            format_args!(
                "{}: must be an absolute path on the server's filesystem",
                quoted(text)
            ),
        ));
    }
    Ok(path)
}

/// A wire route's [`Mode`], every field checked (none of the files is read
/// here; the rules between the fields are `wire::route::L7Settings`'s).
/// L7-only fields on an L4 route are refused by name, as is
/// `send_proxy_protocol` on an L7 route.
fn parse_mode(route: &proto::Route) -> Result<Mode, Status> {
    let mode = proto::RouteMode::try_from(route.mode)
        .map_err(|_| invalid("route.mode", format_args!("unknown value {}", route.mode)))?;
    let l7 = mode == proto::RouteMode::L7;
    if l7 && route.send_proxy_protocol {
        return Err(invalid(
            "route.send_proxy_protocol",
            "not allowed on a ROUTE_MODE_L7 route: its backend connections are pooled, so a per-client PROXY header cannot be right (X-Forwarded-For carries the client)",
        ));
    }
    let given = |text: &str| (!text.is_empty()).then(|| text.to_string());
    // Each field parsed only where it can be used: on an L4 route, or
    // without backend_tls, being set is the error.
    let path = |field: &str, text: &str, used: bool| -> Result<Option<PathBuf>, Status> {
        match given(text) {
            Some(text) if used => parse_path(field, &text).map(Some),
            other => Ok(other.map(PathBuf::from)),
        }
    };
    let with_tls = l7 && route.backend_tls;
    let settings = L7Settings {
        tls_cert: path("route.tls_cert", &route.tls_cert, l7)?,
        tls_key: path("route.tls_key", &route.tls_key, l7)?,
        backend_tls: route.backend_tls.then_some(true),
        backend_ca: path("route.backend_ca", &route.backend_ca, with_tls)?,
        backend_server_name: match given(&route.backend_server_name) {
            Some(text) if with_tls => Some(parse_server_name(&text).map_err(|e| {
                invalid(
                    "route.backend_server_name",
                    format_args!("{}: not an IP address or DNS name: {e}", quoted(&text)),
                )
            })?),
            other => other,
        },
        // On an L4 route only whether it is set matters.
        backend_protocol: if l7 {
            Some(
                BackendProtocol::parse(&route.backend_protocol).ok_or_else(|| {
                    invalid(
                        "route.backend_protocol",
                        format_args!(
                            "{}: not one of \"auto\", \"http1\", \"h2\" (\"\" = auto)",
                            quoted(&route.backend_protocol)
                        ),
                    )
                })?,
            )
        } else {
            given(&route.backend_protocol).map(|_| BackendProtocol::Auto)
        },
    };
    settings.into_mode(l7).map_err(|e| {
        let (key, why) = match e {
            ModeError::L7Only(key) => (key, "only for ROUTE_MODE_L7 routes (this route is L4)"),
            ModeError::RequiredForL7(key) => (key, "required for a ROUTE_MODE_L7 route"),
            ModeError::NeedsBackendTls(key) => (key, "needs backend_tls"),
        };
        invalid(&format!("route.{}", key.label()), why)
    })
}

/// Reads and checks an L7 route's certificate and key on the blocking
/// pool; a refused file is `INVALID_ARGUMENT` naming `route.tls_cert` or
/// `route.tls_key`.
async fn check_certificate(l7: &L7Route) -> Result<(), Status> {
    let (cert, key) = (l7.tls_cert.clone(), l7.tls_key.clone());
    let loaded = tokio::task::spawn_blocking(move || certs::load(&cert, &key))
        .await
        .map_err(|err| {
            error!(error = %err, "certificate check task failed");
            Status::internal("the certificate check failed (details in the server log)")
        })?;
    match loaded {
        Ok(loaded) => {
            if loaded.leaf_only {
                tracing::warn!(
                    tls_cert = %l7.tls_cert.display(),
                    "route certificate chain is only a leaf not signed by itself: clients that need the intermediate will fail"
                );
            }
            Ok(())
        }
        Err(err) => Err(invalid(&format!("route.{}", err.file().field()), err)),
    }
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A route as the wire shows it: every field.
fn wire_route(listener: &str, hostname: &str, target: &Target) -> proto::Route {
    let mut route = proto::Route {
        listener_addr: listener.to_string(),
        hostname: hostname.to_string(),
        backend: target.backend().to_string(),
        send_proxy_protocol: target.send_proxy_protocol,
        mode: proto::RouteMode::L4.into(),
        backends: target.backends.iter().map(ToString::to_string).collect(),
        balance: target.balance.label().to_string(),
        ..proto::Route::default()
    };
    if let Some(health) = &target.health {
        route.health_interval = humantime::format_duration(health.interval).to_string();
        route.health_path = health.path.as_deref().unwrap_or_default().to_string();
        route.health_fall = health.fall;
        route.health_rise = health.rise;
    }
    if let Some(l7) = target.mode.l7() {
        route.mode = proto::RouteMode::L7.into();
        route.tls_cert = path_text(&l7.tls_cert);
        route.tls_key = path_text(&l7.tls_key);
        route.backend_tls = l7.backend_tls;
        route.backend_ca = l7.backend_ca.as_deref().map(path_text).unwrap_or_default();
        route.backend_server_name = l7.backend_server_name.clone().unwrap_or_default();
        route.backend_protocol = l7.backend_protocol.label().to_string();
    }
    route
}

/// Maps a store failure that is not a plain "not found" to `INTERNAL`,
/// logging the detail the client does not get.
fn storage_failure(method: &'static str, err: StoreError) -> Status {
    error!(method, error = %err, "admin change failed in storage; nothing was applied");
    Status::internal("storage failure: the change was not applied (details in the server log)")
}

/// Logs a mutating call's outcome at info, with its code if it failed.
fn log_result<T>(
    method: &'static str,
    fields: fmt::Arguments<'_>,
    result: &Result<T, Status>,
    ok: &str,
) {
    match result {
        Ok(_) => info!(method, result = ok, "admin: {fields}"),
        Err(status) => info!(
            method,
            result = code_name(status.code()),
            error = status.message(),
            "admin: {fields}"
        ),
    }
}

fn saturating_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

impl AdminService {
    /// Counts a finished call in the `admin_calls` metric and passes it on.
    fn counted<T>(&self, method: &'static str, result: Result<T, Status>) -> Result<T, Status> {
        let code = match &result {
            Ok(_) => "OK",
            Err(status) => code_name(status.code()),
        };
        self.state.stats.metrics.admin_call(method, code);
        result
    }

    /// One listener (its addr as written in the config), or every one
    /// (`""`), sorted by addr; NOT_FOUND for an unknown one.
    fn listeners_of(&self, listener_addr: &str) -> Result<Vec<&Arc<ListenerRoutes>>, Status> {
        let mut listeners: Vec<_> = if listener_addr.is_empty() {
            self.state.routes.listeners().iter().collect()
        } else {
            vec![self
                .state
                .routes
                .listener(listener_addr)
                .ok_or_else(|| listener_not_found(listener_addr))?]
        };
        listeners.sort_by(|a, b| a.addr().cmp(b.addr()));
        Ok(listeners)
    }

    fn routes_of(&self, listener_addr: &str) -> Result<Vec<proto::Route>, Status> {
        let listeners = self.listeners_of(listener_addr)?;
        let mut out = Vec::new();
        for listener in listeners {
            for (hostname, target) in listener.snapshot().sorted() {
                out.push(wire_route(listener.addr(), hostname.as_str(), &target));
            }
        }
        Ok(out)
    }

    /// Every backend of one listener's routes, or of every listener's;
    /// sorted by listener, then as the runtime reports them (hostname,
    /// then the route's backend order).
    fn backends_of(&self, listener_addr: &str) -> Result<Vec<proto::BackendStatus>, Status> {
        let listeners = self.listeners_of(listener_addr)?;
        let mut out = Vec::new();
        for listener in listeners {
            for report in listener.backends() {
                out.push(proto::BackendStatus {
                    listener_addr: listener.addr().to_string(),
                    hostname: report.hostname.to_string(),
                    backend: report.backend.to_string(),
                    healthy: report.healthy,
                    active_connections: report.active_connections,
                    total_connections: i64::try_from(report.total_connections).unwrap_or(i64::MAX),
                    last_error: report.last_error.unwrap_or_default(),
                });
            }
        }
        Ok(out)
    }

    async fn add_route_inner(&self, route: Option<proto::Route>) -> Result<bool, Status> {
        let route = route.ok_or_else(|| invalid("route", "required"))?;
        parse_listener("route.listener_addr", &route.listener_addr)?;
        let hostname = parse_hostname("route.hostname", &route.hostname)?;
        let pool = parse_pool_fields(&route)?;
        let mode = parse_mode(&route)?;
        let pool = check_pool(pool, mode.l7().is_some())?;
        if self.state.routes.listener(&route.listener_addr).is_none() {
            return Err(listener_not_found(&route.listener_addr));
        }
        if let Some(l7) = mode.l7() {
            check_certificate(l7).await?;
        }
        let target = Target {
            backends: pool.backends,
            balance: pool.balance,
            health: pool.health,
            send_proxy_protocol: route.send_proxy_protocol,
            mode,
        };
        match self
            .state
            .store
            .upsert_route(&route.listener_addr, hostname, target)
            .await
        {
            Ok(created) => Ok(created),
            Err(StoreError::UnknownListener(_)) => Err(listener_not_found(&route.listener_addr)),
            Err(err) => Err(storage_failure("AddRoute", err)),
        }
    }

    async fn remove_route_inner(&self, listener_addr: &str, hostname: &str) -> Result<(), Status> {
        parse_listener("listener_addr", listener_addr)?;
        let hostname = parse_hostname("hostname", hostname)?;
        if self.state.routes.listener(listener_addr).is_none() {
            return Err(listener_not_found(listener_addr));
        }
        let shown = hostname.to_string();
        match self.state.store.remove_route(listener_addr, hostname).await {
            Ok(()) => Ok(()),
            Err(StoreError::UnknownListener(_)) => Err(listener_not_found(listener_addr)),
            Err(StoreError::NotFound(_)) => Err(Status::not_found(format!(
                "route {shown:?} not found on listener {}",
                quoted(listener_addr)
            ))),
            Err(err) => Err(storage_failure("RemoveRoute", err)),
        }
    }

    async fn add_rule_inner(&self, rule: Option<proto::FirewallRule>) -> Result<bool, Status> {
        let rule = parse_rule("rule", rule)?;
        self.state
            .store
            .add_rule(rule)
            .await
            .map_err(|err| storage_failure("AddFirewallRule", err))
    }

    async fn remove_rule_inner(&self, rule: Option<proto::FirewallRule>) -> Result<(), Status> {
        let rule = parse_rule("rule", rule)?;
        match self.state.store.remove_rule(rule.clone()).await {
            Ok(()) => Ok(()),
            Err(StoreError::NotFound(_)) => {
                Err(Status::not_found(format!("firewall rule {rule} not found")))
            }
            Err(err) => Err(storage_failure("RemoveFirewallRule", err)),
        }
    }
}

/// An AddRoute call's L7 fields for its log line (those set), valid or not.
fn l7_fields_for_log(route: &proto::Route) -> String {
    let mut out = String::new();
    for (name, value) in [
        ("tls_cert", &route.tls_cert),
        ("tls_key", &route.tls_key),
        ("backend_ca", &route.backend_ca),
        ("backend_server_name", &route.backend_server_name),
        ("backend_protocol", &route.backend_protocol),
    ] {
        if !value.is_empty() {
            out.push_str(&format!(" {name}={}", quoted(value)));
        }
    }
    if route.backend_tls {
        out.push_str(" backend_tls=true");
    }
    out
}

/// An AddRoute call's pool fields for its log line (those set), valid or
/// not; at most a few backends are shown.
fn pool_fields_for_log(route: &proto::Route) -> String {
    const SHOWN: usize = 8;
    let mut out = String::new();
    if !route.backends.is_empty() {
        let mut list: Vec<String> = route
            .backends
            .iter()
            .take(SHOWN)
            .map(|b| quoted(b))
            .collect();
        if route.backends.len() > SHOWN {
            list.push(format!("... ({} in all)", route.backends.len()));
        }
        out.push_str(&format!(" backends=[{}]", list.join(",")));
    }
    for (name, value) in [
        ("balance", &route.balance),
        ("health_interval", &route.health_interval),
        ("health_path", &route.health_path),
    ] {
        if !value.is_empty() {
            out.push_str(&format!(" {name}={}", quoted(value)));
        }
    }
    for (name, value) in [
        ("health_fall", route.health_fall),
        ("health_rise", route.health_rise),
    ] {
        if value != 0 {
            out.push_str(&format!(" {name}={value}"));
        }
    }
    out
}

/// How a wire rule is shown in a log line, valid or not.
fn rule_for_log(rule: &Option<proto::FirewallRule>) -> String {
    match rule {
        None => "(none)".to_string(),
        Some(rule) => format!(
            "type={} value={}",
            proto::FirewallRuleType::try_from(rule.r#type)
                .map(|t| t.as_str_name())
                .unwrap_or("?"),
            quoted(&rule.value)
        ),
    }
}

#[tonic::async_trait]
impl ProxyAdminService for AdminService {
    async fn get_status(
        &self,
        _request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::GetStatusResponse>, Status> {
        let stats = &self.state.stats;
        let listeners = self
            .state
            .routes
            .listeners()
            .iter()
            .map(|listener| {
                let counters = stats.listener(listener.addr());
                proto::ListenerStatus {
                    addr: listener.addr().to_string(),
                    route_count: saturating_i32(listener.snapshot().len()),
                    active_connections: counters.map_or(0, |c| c.metrics.active()),
                    total_connections: counters.map_or(0, |c| c.metrics.total()),
                }
            })
            .collect();
        self.counted(
            "GetStatus",
            Ok(Response::new(proto::GetStatusResponse {
                version: self.state.version.clone(),
                started_at: Some(prost_types::Timestamp::from(stats.started_at)),
                listeners,
                total_connections: stats.total_connections(),
                active_connections: stats.active_connections(),
                blocked_connections: stats.blocked_connections(),
                pid: std::process::id(),
                pid_namespace: crate::metrics::pid_namespace(),
                took_over: stats.took_over.get().map(|t| proto::Takeover {
                    at: Some(prost_types::Timestamp::from(t.at)),
                    predecessor_pid: t.pid,
                    predecessor_started_at: t.started_at.map(prost_types::Timestamp::from),
                    predecessor_version: t.version.clone(),
                }),
            })),
        )
    }

    async fn list_routes(
        &self,
        request: Request<proto::ListRoutesRequest>,
    ) -> Result<Response<proto::ListRoutesResponse>, Status> {
        let result = self
            .routes_of(&request.get_ref().listener_addr)
            .map(|routes| Response::new(proto::ListRoutesResponse { routes }));
        self.counted("ListRoutes", result)
    }

    async fn add_route(
        &self,
        request: Request<proto::AddRouteRequest>,
    ) -> Result<Response<proto::AddRouteResponse>, Status> {
        let route = request.into_inner().route;
        let result = self.add_route_inner(route.clone()).await;
        let outcome = match &result {
            Ok(true) => "created",
            _ => "updated",
        };
        let shown = route.unwrap_or_default();
        log_result(
            "AddRoute",
            format_args!(
                "listener={} hostname={} backend={}{} send_proxy_protocol={} mode={}{}",
                quoted(&shown.listener_addr),
                quoted(&shown.hostname),
                quoted(&shown.backend),
                pool_fields_for_log(&shown),
                shown.send_proxy_protocol,
                proto::RouteMode::try_from(shown.mode)
                    .map(|m| m.as_str_name())
                    .unwrap_or("?"),
                l7_fields_for_log(&shown),
            ),
            &result,
            outcome,
        );
        self.counted(
            "AddRoute",
            result.map(|created| Response::new(proto::AddRouteResponse { created })),
        )
    }

    async fn remove_route(
        &self,
        request: Request<proto::RemoveRouteRequest>,
    ) -> Result<Response<proto::RemoveRouteResponse>, Status> {
        let request = request.into_inner();
        let result = self
            .remove_route_inner(&request.listener_addr, &request.hostname)
            .await;
        log_result(
            "RemoveRoute",
            format_args!(
                "listener={} hostname={}",
                quoted(&request.listener_addr),
                quoted(&request.hostname)
            ),
            &result,
            "removed",
        );
        self.counted(
            "RemoveRoute",
            result.map(|()| Response::new(proto::RemoveRouteResponse {})),
        )
    }

    async fn list_backends(
        &self,
        request: Request<proto::ListBackendsRequest>,
    ) -> Result<Response<proto::ListBackendsResponse>, Status> {
        let result = self
            .backends_of(&request.get_ref().listener_addr)
            .map(|backends| Response::new(proto::ListBackendsResponse { backends }));
        self.counted("ListBackends", result)
    }

    async fn list_firewall_rules(
        &self,
        _request: Request<proto::ListFirewallRulesRequest>,
    ) -> Result<Response<proto::ListFirewallRulesResponse>, Status> {
        let set = self.state.firewall.rules();
        let mut rules = set.rules().to_vec();
        // IPs, then CIDRs, then countries, each in value order.
        rules.sort();
        let rules = rules
            .iter()
            .map(|rule| proto::FirewallRule {
                r#type: rule_type(rule.kind()).into(),
                value: rule.value(),
            })
            .collect();
        self.counted(
            "ListFirewallRules",
            Ok(Response::new(proto::ListFirewallRulesResponse { rules })),
        )
    }

    async fn add_firewall_rule(
        &self,
        request: Request<proto::AddFirewallRuleRequest>,
    ) -> Result<Response<proto::AddFirewallRuleResponse>, Status> {
        let rule = request.into_inner().rule;
        let result = self.add_rule_inner(rule.clone()).await;
        let outcome = match &result {
            Ok(true) => "added",
            _ => "already_present",
        };
        log_result(
            "AddFirewallRule",
            format_args!("{}", rule_for_log(&rule)),
            &result,
            outcome,
        );
        self.counted(
            "AddFirewallRule",
            result.map(|_| Response::new(proto::AddFirewallRuleResponse {})),
        )
    }

    async fn remove_firewall_rule(
        &self,
        request: Request<proto::RemoveFirewallRuleRequest>,
    ) -> Result<Response<proto::RemoveFirewallRuleResponse>, Status> {
        let rule = request.into_inner().rule;
        let result = self.remove_rule_inner(rule.clone()).await;
        log_result(
            "RemoveFirewallRule",
            format_args!("{}", rule_for_log(&rule)),
            &result,
            "removed",
        );
        self.counted(
            "RemoveFirewallRule",
            result.map(|()| Response::new(proto::RemoveFirewallRuleResponse {})),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_input_is_cut_in_messages() {
        let long = "a".repeat(500);
        assert!(quoted(&long).len() < 100);
        assert_eq!(quoted("x"), "\"x\"");
        assert_eq!(truncate_for_parse(&long).len(), MAX_ECHO_CHARS);
        assert_eq!(truncate_for_parse("é"), "é");
    }

    #[test]
    fn unspecified_and_unknown_rule_types_name_the_field() {
        for r#type in [0, 99] {
            let err = parse_rule(
                "rule",
                Some(proto::FirewallRule {
                    r#type,
                    value: "1.2.3.4".into(),
                }),
            )
            .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(
                err.message().starts_with("rule.type: "),
                "{}",
                err.message()
            );
        }
        let err = parse_rule("rule", None).unwrap_err();
        assert_eq!(err.message(), "rule: required");
    }
}
