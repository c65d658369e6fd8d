//! Live route tables: one per listener, swapped atomically by writers and
//! read without waiting.
//!
//! The values they hold (`Hostname`, `Backend`, `Target`, the immutable
//! `RouteMap` and its lookup rule) live in the `wire` crate and are
//! re-exported here. Beside each table's targets sits each route's live
//! backend pool ([`balance::Route`]), rebuilt when the table is replaced
//! (members of backends still listed keep their state).

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::balance::{self, BackendReport, Balancer};

pub use wire::route::{
    Backend, BackendError, BackendProtocol, Backends, Balance, Hostname, HostnameError, L7Route,
    Mode, RouteMap, Target,
};

/// A table's targets and their pools, swapped as one.
#[derive(Debug)]
struct Live {
    map: Arc<RouteMap>,
    routes: HashMap<Hostname, Arc<balance::Route>>,
}

/// A listener's live route table. Readers `load()` a snapshot without
/// waiting; writers build a new map and `store()` it.
#[derive(Debug)]
pub struct ListenerRoutes {
    addr: String,
    table: ArcSwap<Live>,
    balancer: Arc<Balancer>,
}

impl ListenerRoutes {
    /// A table with pools of its own (no active checks run unless its
    /// balancer's schedule is run).
    pub fn new(addr: impl Into<String>, map: RouteMap) -> Self {
        Self::with_balancer(addr, map, Balancer::new())
    }

    /// A table whose pools share `balancer`'s nodes and check schedule.
    pub fn with_balancer(addr: impl Into<String>, map: RouteMap, balancer: Arc<Balancer>) -> Self {
        let live = build(&balancer, map, None);
        ListenerRoutes {
            addr: addr.into(),
            table: ArcSwap::from_pointee(live),
            balancer,
        }
    }

    /// The listener's `addr` exactly as written in the config.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The route for an SNI name (exact, wildcard, then the default route).
    pub fn lookup(&self, sni: &str) -> Option<Arc<balance::Route>> {
        let live = self.table.load();
        let (hostname, _) = live.map.lookup_entry(sni)?;
        live.routes.get(hostname).cloned()
    }

    /// The default route (`*`), for a ClientHello without SNI.
    pub fn default_route(&self) -> Option<Arc<balance::Route>> {
        let live = self.table.load();
        let (hostname, _) = live.map.default_entry()?;
        live.routes.get(hostname).cloned()
    }

    /// The route with exactly this hostname.
    pub fn route(&self, hostname: &Hostname) -> Option<Arc<balance::Route>> {
        self.table.load().routes.get(hostname).cloned()
    }

    pub fn snapshot(&self) -> Arc<RouteMap> {
        self.table.load().map.clone()
    }

    /// Replaces the table. Callers serialise writers (the store does).
    pub fn replace(&self, map: RouteMap) {
        let old = self.table.load_full();
        self.table
            .store(Arc::new(build(&self.balancer, map, Some(&old))));
    }

    /// Every route's backends and their state, sorted by hostname, then
    /// in each route's backend order.
    pub fn backends(&self) -> Vec<BackendReport> {
        let live = self.table.load();
        let mut routes: Vec<_> = live.routes.iter().collect();
        routes.sort_by(|a, b| a.0.cmp(b.0));
        routes
            .into_iter()
            .flat_map(|(hostname, route)| route.report(hostname).collect::<Vec<_>>())
            .collect()
    }
}

fn build(balancer: &Balancer, map: RouteMap, old: Option<&Live>) -> Live {
    let routes = map
        .iter()
        .map(|(hostname, target)| {
            let prior = old.and_then(|o| o.routes.get(hostname));
            (hostname.clone(), balancer.route(hostname, target, prior))
        })
        .collect();
    Live {
        map: Arc::new(map),
        routes,
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
