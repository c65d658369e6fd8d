//! Prometheus metrics: the registry, the per-listener handles a connection
//! bumps, and the optional `/metrics` HTTP endpoint (`[metrics] addr`).
//!
//! Owns: every metric's name, help and labels (the table in RUNBOOK.md), and
//! the endpoint. Labels are bounded: listener addresses (fixed at start),
//! outcomes, rule types, admin methods and status codes, and for L7
//! requests the route's configured hostname and a status class. Never a
//! hostname a client sent, never a client address.
//!
//! The hot path never looks a metric up: each listener's handles
//! ([`ListenerMetrics`]) are resolved once at start and a connection only
//! does a few relaxed atomic adds (and one short lock per latency
//! histogram observation). Route and rule counts are read from the live
//! tables when scraped, so they cannot drift from them; so is the count of
//! log lines dropped, from [`crate::logging`].
//!
//! [`Stats`] is the live connection counters read by `GetStatus` and the
//! metrics endpoint. Each count lives once, in a listener's metric handles;
//! the process-wide figures are their sums.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use wire::rule::RuleKind;

use crate::balance::Balancer;
use crate::firewall::{BlockReason, Firewall};
use crate::outcome::Outcome;
use crate::routes::Routes;

/// Upper bounds (seconds) of the latency histograms: from a local backend's
/// sub-millisecond connect to a slow client's multi-second hello.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The media type of what [`Metrics::render`] writes.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrape connections served at once; more are closed at accept.
const MAX_SCRAPERS: usize = 16;
/// Time a scraper gets to send its request headers (also the keep-alive idle limit).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one scrape connection.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    listener: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BlockedLabels {
    listener: String,
    rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    listener: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    listener: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdminCallLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: String,
    route: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    listener: String,
    route: String,
}

/// Upper bounds (seconds) of the request duration histogram: from a local
/// backend's sub-millisecond answer to a long download or stream.
const REQUEST_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}

/// One listener's L7 request metrics. The `route` label is the route's
/// configured hostname (bounded by the route table, never the client's
/// Host), or empty for a request no route took.
///
/// A route's handles are resolved on its first request and kept (one
/// read-locked map lookup per request after that, no allocation); a route
/// removed from the table keeps its series, as Prometheus expects.
#[derive(Debug)]
pub struct RequestMetrics {
    listener: String,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram, fn() -> Histogram>,
    routes: std::sync::RwLock<std::collections::HashMap<Arc<str>, Arc<RouteHandles>>>,
}

/// One route's request handles.
#[derive(Debug)]
struct RouteHandles {
    /// By status class: 1xx … 5xx.
    classes: [Counter; 5],
    duration: Histogram,
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl RequestMetrics {
    fn new(
        listener: String,
        requests: Family<RequestLabels, Counter>,
        durations: Family<RouteLabels, Histogram, fn() -> Histogram>,
    ) -> RequestMetrics {
        RequestMetrics {
            listener,
            requests,
            durations,
            routes: std::sync::RwLock::new(std::collections::HashMap::new()),
        }
    }

    pub fn listener(&self) -> &str {
        &self.listener
    }

    fn handles(&self, route: &str) -> Arc<RouteHandles> {
        if let Some(found) = self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(route)
        {
            return found.clone();
        }
        let handles = Arc::new(RouteHandles {
            classes: STATUS_CLASSES.map(|class| {
                self.requests.get_or_create_owned(&RequestLabels {
                    listener: self.listener.clone(),
                    route: route.to_string(),
                    class,
                })
            }),
            duration: self.durations.get_or_create_owned(&RouteLabels {
                listener: self.listener.clone(),
                route: route.to_string(),
            }),
        });
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Arc::from(route), handles.clone());
        handles
    }

    /// Counts a finished request by status class and records its duration.
    pub fn observe(&self, route: Option<&str>, status: u16, took: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        let handles = self.handles(route.unwrap_or_default());
        handles.classes[class].inc();
        handles.duration.observe(took.as_secs_f64());
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// Every metric mc-proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The balancer whose nodes the backend metrics read.
    backends: Arc<std::sync::OnceLock<Arc<Balancer>>>,
    listeners: Vec<ListenerMetrics>,
    routes: Family<ListenerLabel, Gauge>,
    firewall_rules: Family<RuleLabel, Gauge>,
    admin_calls: Family<AdminCallLabels, Counter>,
    capacity: CapacityMetrics,
    upstream_open: Gauge,
}

/// The global connection cap's handles (`[proxy] max_connections`).
#[derive(Clone, Debug, Default)]
pub struct CapacityMetrics {
    max: Gauge,
    paused: Counter,
}

impl CapacityMetrics {
    /// The cap in force.
    pub fn set_max(&self, max: usize) {
        self.max.set(i64::try_from(max).unwrap_or(i64::MAX));
    }

    /// An accept loop found every slot taken and waits for one.
    pub fn paused(&self) {
        self.paused.inc();
    }
}

/// `log_lines_dropped_total`: read from [`crate::logging::dropped_lines`]
/// at each scrape (the log writer counts; nothing here can drift from it).
#[derive(Debug)]
struct LogLinesDropped;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendStateLabels {
    backend: String,
    state: &'static str,
}

/// A per-backend metric: name, help, and its value from a node's counts.
type NodeMetric<T> = (
    &'static str,
    &'static str,
    fn(&crate::balance::NodeCounts) -> T,
);

/// Per-backend-address metrics, read from the balancer's nodes at scrape
/// time (nothing on the connection path; an address no route names any
/// more disappears).
#[derive(Debug, Default)]
struct BackendMetrics(Arc<std::sync::OnceLock<Arc<Balancer>>>);

impl Collector for BackendMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(balancer) = self.0.get() else {
            return Ok(());
        };
        let nodes: Vec<_> = balancer
            .nodes()
            .into_iter()
            .map(|node| (node.backend().to_string(), node.counts()))
            .collect();
        let gauges: [NodeMetric<i64>; 2] = [
            (
                "backend_up",
                "1 if the backend takes new connections (no passive backoff, no active check failing), else 0",
                |c| i64::from(c.up),
            ),
            (
                "backend_connections_open",
                "Connections (L4) and requests (L7) open to the backend now, over all routes",
                |c| c.open,
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (backend, counts) in &nodes {
                let label = BackendLabel {
                    backend: backend.clone(),
                };
                prometheus_client::metrics::gauge::ConstGauge::new(value(counts))
                    .encode(family.encode_family(&label)?)?;
            }
        }
        let counters: [NodeMetric<u64>; 2] = [
            (
                "backend_connections",
                "Connections (L4) and requests (L7) sent to the backend, over all routes",
                |c| c.total,
            ),
            (
                "backend_connect_failures",
                "Connects to the backend that failed",
                |c| c.failures,
            ),
        ];
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (backend, counts) in &nodes {
                let label = BackendLabel {
                    backend: backend.clone(),
                };
                ConstCounter::new(value(counts)).encode(family.encode_family(&label)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "backend_state_changes",
            "Times the backend was marked down or up (passive or active)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (backend, counts) in &nodes {
            for (state, count) in [("down", counts.went_down), ("up", counts.came_up)] {
                let labels = BackendStateLabels {
                    backend: backend.clone(),
                    state,
                };
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Collector for LogLinesDropped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(crate::logging::dropped_lines());
        let metric = encoder.encode_descriptor(
            "log_lines_dropped",
            "Log lines lost because stderr or journald did not take them in time (queue full or write failed)",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

/// One listener's handles, resolved at start: a connection bumps these
/// without a lookup.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    accepted: Counter,
    active: Gauge,
    /// Indexed by [`Outcome::index`].
    closed: [Counter; Outcome::LABELS.len()],
    /// Indexed by [`BlockReason::index`].
    blocked: [Counter; BlockReason::LABELS.len()],
    bytes_up: Counter,
    bytes_down: Counter,
    hello_seconds: Histogram,
    connect_seconds: Histogram,
    /// L7 requests on this listener.
    pub requests: Arc<RequestMetrics>,
    /// QUIC flows on this listener's UDP socket.
    pub quic: QuicMetrics,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl Metrics {
    /// Registers every metric and resolves each listener's handles, in the
    /// order of `listener_addrs` (the config's).
    pub fn new(listener_addrs: &[String], version: &str) -> Metrics {
        let mut registry = Registry::with_prefix("mc_proxy");

        let accepted = Family::<ListenerLabel, Counter>::default();
        registry.register(
            "connections_accepted",
            "Connections accepted, blocked ones included",
            accepted.clone(),
        );
        let active = Family::<ListenerLabel, Gauge>::default();
        registry.register(
            "connections_active",
            "Connections accepted and not yet closed",
            active.clone(),
        );
        let closed = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "connections_closed",
            "Connections closed, by outcome (the outcome= of the log line; blocked without its rule)",
            closed.clone(),
        );
        let blocked = Family::<BlockedLabels, Counter>::default();
        registry.register(
            "connections_blocked",
            "Connections the firewall refused, by the type of rule or limit that refused them",
            blocked.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register_with_unit(
            "relayed",
            "Bytes relayed, counted when a connection closes (up = client to backend, down = backend to client)",
            Unit::Bytes,
            bytes.clone(),
        );
        let hello = Family::<ListenerLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register_with_unit(
            "hello_duration",
            "Time from the firewall's allow to a complete ClientHello",
            Unit::Seconds,
            hello.clone(),
        );
        let connect = Family::<ListenerLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register_with_unit(
            "backend_connect_duration",
            "Time to connect to the backend (successful connects)",
            Unit::Seconds,
            connect.clone(),
        );
        let routes = Family::<ListenerLabel, Gauge>::default();
        registry.register("routes", "Routes in each listener's table", routes.clone());
        let firewall_rules = Family::<RuleLabel, Gauge>::default();
        registry.register(
            "firewall_rules",
            "Firewall rules, by type",
            firewall_rules.clone(),
        );
        let admin_calls = Family::<AdminCallLabels, Counter>::default();
        registry.register(
            "admin_calls",
            "Admin API calls, by method and gRPC status code",
            admin_calls.clone(),
        );
        let capacity = CapacityMetrics::default();
        registry.register(
            "connections_max",
            "Client connections open at once over all listeners before the accept loops pause ([proxy] max_connections, or derived)",
            capacity.max.clone(),
        );
        registry.register(
            "accept_paused",
            "Times an accept loop found max_connections open and waited for one to close before accepting",
            capacity.paused.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Requests on L7 routes, by listener, route (its configured hostname; empty when no route took it) and status class",
            requests.clone(),
        );
        let durations = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            request_histogram,
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time from a request's headers to the end of its response body, by listener and route",
            Unit::Seconds,
            durations.clone(),
        );
        let upstream_open = Gauge::default();
        registry.register(
            "upstream_connections_open",
            "Connections to L7 backends open now (pooled ones included)",
            upstream_open.clone(),
        );
        let quic = QuicFamilies::register(&mut registry);
        registry.register_collector(Box::new(LogLinesDropped));
        let backends = BackendMetrics::default();
        let balancer_slot = backends.0.clone();
        registry.register_collector(Box::new(backends));
        registry.register(
            "build",
            "The running mc-proxy version",
            Info::new(BuildLabels {
                version: version.to_string(),
            }),
        );

        let listeners = listener_addrs
            .iter()
            .map(|addr| {
                let listener = ListenerLabel {
                    listener: addr.clone(),
                };
                // Routes and every outcome exist from the start, so a rate()
                // over them never starts from a missing series.
                routes.get_or_create(&listener).set(0);
                ListenerMetrics {
                    accepted: accepted.get_or_create_owned(&listener),
                    active: active.get_or_create_owned(&listener),
                    closed: Outcome::LABELS.map(|outcome| {
                        closed.get_or_create_owned(&OutcomeLabels {
                            listener: addr.clone(),
                            outcome,
                        })
                    }),
                    blocked: BlockReason::LABELS.map(|rule| {
                        blocked.get_or_create_owned(&BlockedLabels {
                            listener: addr.clone(),
                            rule,
                        })
                    }),
                    bytes_up: bytes.get_or_create_owned(&BytesLabels {
                        listener: addr.clone(),
                        direction: "up",
                    }),
                    bytes_down: bytes.get_or_create_owned(&BytesLabels {
                        listener: addr.clone(),
                        direction: "down",
                    }),
                    hello_seconds: hello.get_or_create_owned(&listener),
                    connect_seconds: connect.get_or_create_owned(&listener),
                    requests: Arc::new(RequestMetrics::new(
                        addr.clone(),
                        requests.clone(),
                        durations.clone(),
                    )),
                    quic: quic.listener(addr),
                }
            })
            .collect();
        for rule in RuleKind::LABELS {
            firewall_rules.get_or_create(&RuleLabel { rule }).set(0);
        }
        Metrics {
            registry,
            listeners,
            routes,
            firewall_rules,
            admin_calls,
            capacity,
            upstream_open,
            backends: balancer_slot,
        }
    }

    /// Reports the backend nodes of `balancer` (the first one given).
    pub fn watch_backends(&self, balancer: Arc<Balancer>) {
        let _ = self.backends.set(balancer);
    }

    /// The gauge of connections to L7 backends open now.
    pub fn upstream_open(&self) -> Gauge {
        self.upstream_open.clone()
    }

    /// The global connection cap's handles.
    pub fn capacity(&self) -> &CapacityMetrics {
        &self.capacity
    }

    /// Each listener's handles, in the order given to [`Metrics::new`].
    pub fn listeners(&self) -> &[ListenerMetrics] {
        &self.listeners
    }

    /// Counts one admin API call.
    pub fn admin_call(&self, method: &'static str, code: &'static str) {
        self.admin_calls
            .get_or_create(&AdminCallLabels { method, code })
            .inc();
    }

    /// The OpenMetrics text of every metric, with route and rule counts read
    /// from the live tables now.
    pub fn render(&self, routes: &Routes, firewall: &Firewall) -> String {
        for listener in routes.listeners() {
            self.routes
                .get_or_create(&ListenerLabel {
                    listener: listener.addr().to_string(),
                })
                .set(i64::try_from(listener.snapshot().len()).unwrap_or(i64::MAX));
        }
        let mut counts = [0i64; RuleKind::LABELS.len()];
        for rule in firewall.rules().rules() {
            counts[rule.kind().index()] += 1;
        }
        for (rule, count) in RuleKind::LABELS.into_iter().zip(counts) {
            self.firewall_rules
                .get_or_create(&RuleLabel { rule })
                .set(count);
        }
        let mut text = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl ListenerMetrics {
    /// A connection was accepted (and is active until [`released`](Self::released)).
    pub fn accepted(&self) {
        self.accepted.inc();
        self.active.inc();
    }

    /// An accepted connection's task is gone.
    pub fn released(&self) {
        self.active.dec();
    }

    /// Connections accepted since start.
    pub fn total(&self) -> i64 {
        i64::try_from(self.accepted.get()).unwrap_or(i64::MAX)
    }

    /// Connections accepted and not yet released.
    pub fn active(&self) -> i64 {
        self.active.get()
    }

    /// Connections the firewall refused, over all rules.
    pub fn blocked(&self) -> i64 {
        let blocked: u64 = self.blocked.iter().map(Counter::get).sum();
        i64::try_from(blocked).unwrap_or(i64::MAX)
    }

    /// A connection ended with `outcome` after relaying these bytes.
    pub fn closed(&self, outcome: Outcome, up: Option<u64>, down: Option<u64>) {
        self.closed[outcome.index()].inc();
        if let Outcome::Blocked(reason) = outcome {
            self.blocked[reason.index()].inc();
        }
        if let Some(up) = up.filter(|&n| n > 0) {
            self.bytes_up.inc_by(up);
        }
        if let Some(down) = down.filter(|&n| n > 0) {
            self.bytes_down.inc_by(down);
        }
    }

    pub fn hello_took(&self, took: Duration) {
        self.hello_seconds.observe(took.as_secs_f64());
    }

    pub fn connect_took(&self, took: Duration) {
        self.connect_seconds.observe(took.as_secs_f64());
    }
}

/// Why a QUIC datagram was dropped without a flow to count it against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicDrop {
    /// Not a v1/v2 Initial, from an address and with connection IDs no
    /// flow knows.
    NoFlow,
    /// A new flow's first datagram under 1,200 bytes (RFC 9000 §14.1).
    ShortInitial,
    /// `[proxy] max_quic_flows` flows were open.
    FlowLimit,
    /// The bytes buffered by pending flows were at their budget.
    PendingLimit,
    /// The socket's send buffer was full (the datagram is lost, as on a
    /// congested path; QUIC resends).
    SendFailed,
}

impl QuicDrop {
    pub const LABELS: [&'static str; 5] = [
        "no_flow",
        "short_initial",
        "flow_limit",
        "pending_limit",
        "send_failed",
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// The QUIC metric families (SPEC §6.5: per listener, like TCP's).
struct QuicFamilies {
    opened: Family<ListenerLabel, Counter>,
    active: Family<ListenerLabel, Gauge>,
    closed: Family<OutcomeLabels, Counter>,
    blocked: Family<BlockedLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    dropped: Family<DropLabels, Counter>,
}

impl QuicFamilies {
    fn register(registry: &mut Registry) -> QuicFamilies {
        let families = QuicFamilies {
            opened: Family::default(),
            active: Family::default(),
            closed: Family::default(),
            blocked: Family::default(),
            bytes: Family::default(),
            dropped: Family::default(),
        };
        registry.register(
            "quic_flows_opened",
            "QUIC flows started (a first Initial from a client the firewall admitted)",
            families.opened.clone(),
        );
        registry.register(
            "quic_flows_active",
            "QUIC flows held now, pending (hello incomplete) and established",
            families.active.clone(),
        );
        registry.register(
            "quic_flows_closed",
            "QUIC flows ended, by outcome (the outcome= of the flow's log line; blocked without its rule)",
            families.closed.clone(),
        );
        registry.register(
            "quic_flows_blocked",
            "QUIC flows the firewall refused (their datagrams dropped), by the type of rule or limit",
            families.blocked.clone(),
        );
        registry.register_with_unit(
            "quic_relayed",
            "QUIC datagram bytes relayed, counted as they pass (up = client to backend, down = backend to client)",
            Unit::Bytes,
            families.bytes.clone(),
        );
        registry.register(
            "quic_datagrams_dropped",
            "QUIC datagrams dropped outside any flow's accounting, by reason",
            families.dropped.clone(),
        );
        families
    }

    fn listener(&self, addr: &str) -> QuicMetrics {
        let listener = ListenerLabel {
            listener: addr.to_string(),
        };
        QuicMetrics {
            opened: self.opened.get_or_create_owned(&listener),
            active: self.active.get_or_create_owned(&listener),
            closed: Outcome::LABELS.map(|outcome| {
                self.closed.get_or_create_owned(&OutcomeLabels {
                    listener: addr.to_string(),
                    outcome,
                })
            }),
            blocked: BlockReason::LABELS.map(|rule| {
                self.blocked.get_or_create_owned(&BlockedLabels {
                    listener: addr.to_string(),
                    rule,
                })
            }),
            bytes_up: self.bytes.get_or_create_owned(&BytesLabels {
                listener: addr.to_string(),
                direction: "up",
            }),
            bytes_down: self.bytes.get_or_create_owned(&BytesLabels {
                listener: addr.to_string(),
                direction: "down",
            }),
            dropped: QuicDrop::LABELS.map(|reason| {
                self.dropped.get_or_create_owned(&DropLabels {
                    listener: addr.to_string(),
                    reason,
                })
            }),
        }
    }
}

/// One listener's QUIC handles, resolved at start: the datagram path does
/// relaxed atomic adds only.
#[derive(Debug, Clone)]
pub struct QuicMetrics {
    opened: Counter,
    active: Gauge,
    /// Indexed by [`Outcome::index`].
    closed: [Counter; Outcome::LABELS.len()],
    /// Indexed by [`BlockReason::index`].
    blocked: [Counter; BlockReason::LABELS.len()],
    bytes_up: Counter,
    bytes_down: Counter,
    /// Indexed by [`QuicDrop`].
    dropped: [Counter; QuicDrop::LABELS.len()],
}

impl QuicMetrics {
    /// A flow was admitted (active until [`closed`](Self::closed)).
    pub fn opened(&self) {
        self.opened.inc();
        self.active.inc();
    }

    /// An admitted flow ended.
    pub fn closed(&self, outcome: Outcome) {
        self.active.dec();
        self.closed[outcome.index()].inc();
    }

    /// An open flow handed to a new process (no longer held here).
    pub fn handed_over(&self) {
        self.active.dec();
    }

    /// An open flow taken from the previous process.
    pub fn taken_over(&self) {
        self.active.inc();
    }

    /// A client the firewall refused (no flow was made).
    pub fn blocked(&self, reason: BlockReason) {
        self.closed[Outcome::Blocked(reason).index()].inc();
        self.blocked[reason.index()].inc();
    }

    pub fn up(&self, bytes: usize) {
        self.bytes_up.inc_by(bytes as u64);
    }

    pub fn down(&self, bytes: usize) {
        self.bytes_down.inc_by(bytes as u64);
    }

    pub fn dropped(&self, why: QuicDrop) {
        self.dropped[why.index()].inc();
    }

    /// Flows held now.
    pub fn active(&self) -> i64 {
        self.active.get()
    }
}

#[derive(Debug)]
pub struct Stats {
    pub started_at: SystemTime,
    /// Set once this process has taken over from a predecessor (a
    /// handoff, SPEC §6.4): when, and from whom.
    pub took_over: std::sync::OnceLock<TookOver>,
    /// One entry per bound listener, in config order.
    pub listeners: Vec<Arc<ListenerStats>>,
    /// The Prometheus metrics (kept whether or not `[metrics]` serves them).
    pub metrics: Arc<Metrics>,
}

/// The inode of this process's PID namespace (`/proc/self/ns/pid` reads
/// `pid:[N]`), 0 if unreadable: with the pid, what tells this server from
/// one in another container.
pub fn pid_namespace() -> u64 {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|link| {
            let text = link.to_string_lossy().into_owned();
            text.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
        })
        .unwrap_or(0)
}

/// A completed takeover: the predecessor stopped accepting at `at`.
#[derive(Debug, Clone)]
pub struct TookOver {
    pub at: SystemTime,
    pub pid: u32,
    /// When the predecessor started.
    pub started_at: Option<SystemTime>,
    pub version: String,
}

#[derive(Debug)]
pub struct ListenerStats {
    /// The listener's `addr` exactly as written in the config.
    pub addr: String,
    /// This listener's metric handles, resolved at start. They hold the
    /// listener's total and active counts too (`metrics.total()`,
    /// `metrics.active()`): one counter each, read by both `GetStatus` and
    /// `/metrics`.
    pub metrics: ListenerMetrics,
}

impl Stats {
    pub fn new(listener_addrs: impl IntoIterator<Item = String>) -> Stats {
        let addrs: Vec<String> = listener_addrs.into_iter().collect();
        let metrics = Arc::new(Metrics::new(&addrs, &crate::version()));
        Stats {
            started_at: SystemTime::now(),
            took_over: std::sync::OnceLock::new(),
            listeners: addrs
                .into_iter()
                .zip(metrics.listeners().iter().cloned())
                .map(|(addr, metrics)| Arc::new(ListenerStats { addr, metrics }))
                .collect(),
            metrics,
        }
    }

    pub fn listener(&self, addr: &str) -> Option<&Arc<ListenerStats>> {
        self.listeners.iter().find(|l| l.addr == addr)
    }

    /// Every accepted connection, blocked ones included.
    pub fn total_connections(&self) -> i64 {
        self.sum(ListenerMetrics::total)
    }

    /// Connections accepted and not yet closed.
    pub fn active_connections(&self) -> i64 {
        self.sum(ListenerMetrics::active)
    }

    /// Connections the firewall refused.
    pub fn blocked_connections(&self) -> i64 {
        self.sum(ListenerMetrics::blocked)
    }

    fn sum(&self, count: fn(&ListenerMetrics) -> i64) -> i64 {
        self.listeners
            .iter()
            .map(|l| count(&l.metrics))
            .fold(0, i64::saturating_add)
    }
}

/// Counts one connection as active for as long as it lives.
pub struct ActiveGuard {
    listener: Arc<ListenerStats>,
}

impl ActiveGuard {
    /// Counts an accepted connection (total and active) on its listener.
    pub fn accept(listener: &Arc<ListenerStats>) -> ActiveGuard {
        listener.metrics.accepted();
        ActiveGuard {
            listener: listener.clone(),
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.listener.metrics.released();
    }
}

/// What a scrape reads.
#[derive(Clone)]
pub struct Scrape {
    pub metrics: Arc<Metrics>,
    pub routes: Arc<Routes>,
    pub firewall: Arc<Firewall>,
}

/// Binds `addr` and serves `GET /metrics` over HTTP/1.1 in a spawned task
/// until `stop` turns true. A bind error comes back before anything is
/// spawned, so the server can refuse to start.
pub async fn serve(
    addr: SocketAddr,
    scrape: Scrape,
    mut stop: watch::Receiver<bool>,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    serve_on(listener, scrape, async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    })
}

/// [`serve`] on a socket already bound (one handed over by a previous
/// process, say), until `stopped` resolves.
pub fn serve_on(
    listener: TcpListener,
    scrape: Scrape,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(MAX_SCRAPERS));
        tokio::pin!(stopped);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut stopped => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "metrics endpoint: too many scrapers; closing");
                continue;
            };
            let scrape = scrape.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = respond(&scrape, &request);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                    tracing::debug!(%peer, error = %e, "metrics endpoint: connection failed");
                }
                drop(permit);
            });
        }
        tracing::debug!("metrics endpoint stopped");
    });
    Ok((local, task))
}

fn respond(scrape: &Scrape, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = status;
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let text = scrape.metrics.render(&scrape.routes, &scrape.firewall);
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::BlockReason;

    #[test]
    fn every_outcome_has_its_label() {
        for (outcome, label) in [
            (Outcome::Relayed, "relayed"),
            (Outcome::Blocked(BlockReason::Rate), "blocked"),
            (Outcome::NoRoute, "no_route"),
            (Outcome::BadHello, "bad_hello"),
            (Outcome::BadProxyHeader, "bad_proxy_header"),
            (Outcome::HelloTimeout, "hello_timeout"),
            (Outcome::BackendUnreachable, "backend_unreachable"),
            (Outcome::IdleTimeout, "idle_timeout"),
            (Outcome::Shutdown, "shutdown"),
        ] {
            assert_eq!(Outcome::LABELS[outcome.index()], label);
            assert!(outcome.to_string().starts_with(label));
        }
    }

    #[test]
    fn listener_handles_feed_the_rendered_text() {
        let metrics = Metrics::new(&[":443".to_string(), "127.0.0.1:8443".to_string()], "9.9.9");
        let first = &metrics.listeners()[0];
        first.accepted();
        first.accepted();
        first.released();
        first.released();
        first.closed(Outcome::Relayed, Some(100), Some(2000));
        first.closed(Outcome::Blocked(BlockReason::Cidr), None, None);
        first.closed(Outcome::Blocked(BlockReason::ConnLimit), None, None);
        first.hello_took(Duration::from_millis(3));
        metrics.admin_call("AddRoute", "INVALID_ARGUMENT");
        metrics.admin_call("AddRoute", "INVALID_ARGUMENT");
        metrics.capacity().set_max(451);
        metrics.capacity().paused();
        assert_eq!(metrics.listeners().len(), 2);

        let routes = Routes::new(Vec::new());
        let firewall = Firewall::new(
            &crate::config::FirewallConfig {
                geoip_db: None,
                rules: Vec::new(),
                rate_limit: 0,
                rate_window: Duration::from_secs(10),
                max_connections_per_ip: None,
            },
            &[],
        )
        .unwrap();
        let text = metrics.render(&routes, &firewall);
        for line in [
            "mc_proxy_connections_accepted_total{listener=\":443\"} 2",
            "mc_proxy_connections_active{listener=\":443\"} 0",
            "mc_proxy_connections_closed_total{listener=\":443\",outcome=\"relayed\"} 1",
            "mc_proxy_connections_closed_total{listener=\":443\",outcome=\"blocked\"} 2",
            "mc_proxy_connections_closed_total{listener=\"127.0.0.1:8443\",outcome=\"bad_proxy_header\"} 0",
            "mc_proxy_connections_blocked_total{listener=\":443\",rule=\"cidr\"} 1",
            "mc_proxy_connections_blocked_total{listener=\":443\",rule=\"conn_limit\"} 1",
            "mc_proxy_connections_blocked_total{listener=\"127.0.0.1:8443\",rule=\"conn_limit\"} 0",
            "mc_proxy_relayed_bytes_total{listener=\":443\",direction=\"up\"} 100",
            "mc_proxy_relayed_bytes_total{listener=\":443\",direction=\"down\"} 2000",
            "mc_proxy_hello_duration_seconds_count{listener=\":443\"} 1",
            "mc_proxy_hello_duration_seconds_bucket{le=\"0.005\",listener=\":443\"} 1",
            "mc_proxy_admin_calls_total{method=\"AddRoute\",code=\"INVALID_ARGUMENT\"} 2",
            "mc_proxy_firewall_rules{rule=\"country\"} 0",
            "mc_proxy_build_info{version=\"9.9.9\"} 1",
            "mc_proxy_connections_max 451",
            "mc_proxy_accept_paused_total 1",
            "# TYPE mc_proxy_log_lines_dropped counter",
            "mc_proxy_log_lines_dropped_total 0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
    }
}
