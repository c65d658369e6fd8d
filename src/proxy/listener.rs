//! What one listener's connections share: handed by the accept loop to
//! every connection's task.

use std::sync::Arc;

use crate::config::ProxyConfig;
use crate::firewall::Firewall;
use crate::metrics::ListenerStats;
use crate::routes::ListenerRoutes;

use super::capacity::Capacity;
use super::http;

/// Everything one listener's connections share.
pub struct Listener {
    pub routes: Arc<ListenerRoutes>,
    pub firewall: Arc<Firewall>,
    pub listener_stats: Arc<ListenerStats>,
    pub timeouts: ProxyConfig,
    /// Every connection starts with a PROXY v1/v2 header (trusted upstreams only).
    pub proxy_protocol: bool,
    /// The connection cap shared by every listener.
    pub capacity: Arc<Capacity>,
    /// What this listener's L7 connections share (route certificates,
    /// upstream pools, request metrics, timeouts).
    pub http: http::ListenerHttp,
}
