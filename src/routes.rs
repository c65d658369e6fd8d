//! Live route tables: one per listener, swapped atomically by writers and
//! read without waiting.
//!
//! The values they hold (`Hostname`, `Backend`, `Target`, the immutable
//! `RouteMap` and its lookup rule) live in the `wire` crate and are
//! re-exported here.

use std::sync::Arc;

use arc_swap::ArcSwap;

pub use wire::route::{
    Backend, BackendError, BackendProtocol, Hostname, HostnameError, L7Route, Mode, RouteMap,
    Target,
};

/// A listener's live route table. Readers `load()` a snapshot without
/// waiting; writers build a new map and `store()` it.
#[derive(Debug)]
pub struct ListenerRoutes {
    addr: String,
    table: ArcSwap<RouteMap>,
}

impl ListenerRoutes {
    pub fn new(addr: impl Into<String>, map: RouteMap) -> Self {
        ListenerRoutes {
            addr: addr.into(),
            table: ArcSwap::from_pointee(map),
        }
    }

    /// The listener's `addr` exactly as written in the config.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn lookup(&self, sni: &str) -> Option<Arc<Target>> {
        self.table.load().lookup(sni)
    }

    /// The default route (`*`), for a ClientHello without SNI.
    pub fn default_route(&self) -> Option<Arc<Target>> {
        self.table.load().default_entry().map(|(_, t)| t.clone())
    }

    pub fn snapshot(&self) -> Arc<RouteMap> {
        self.table.load_full()
    }

    /// Replaces the table. Callers serialise writers (the store does).
    pub fn replace(&self, map: RouteMap) {
        self.table.store(Arc::new(map));
    }
}

/// Every bound listener's table, keyed by the listener's config `addr`.
/// The set of listeners is fixed at start; their tables change.
#[derive(Debug, Default)]
pub struct Routes {
    listeners: Vec<Arc<ListenerRoutes>>,
}

impl Routes {
    pub fn new(listeners: Vec<Arc<ListenerRoutes>>) -> Self {
        Routes { listeners }
    }

    pub fn listener(&self, addr: &str) -> Option<&Arc<ListenerRoutes>> {
        self.listeners.iter().find(|l| l.addr == addr)
    }

    pub fn listeners(&self) -> &[Arc<ListenerRoutes>] {
        &self.listeners
    }
}
