//! First run and later runs (README, "Configuration"). First run (no listeners in the DB):
//! everything in the config is written in one transaction. Later runs: the
//! DB wins; the config's routes and rules are only compared, and each
//! difference is logged at info so an operator who edited the TOML learns
//! why it had no effect. A config listener the DB lacks is added with its
//! routes. The set of listeners returned (bound) is always the config's.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};
use wire::rule::Rule;

use super::db::{insert_listener, insert_rule, load_routes, load_rules, SqliteContext, StoreError};
use crate::config::ListenerConfig;
use crate::routes::{Hostname, RouteMap, Target};

/// The tables the server starts with, as they are in the DB after seeding.
#[derive(Debug)]
pub struct Loaded {
    /// One entry per config listener (the set that is bound), in config
    /// order: its `addr` text and its routes as stored.
    pub listeners: Vec<(String, RouteMap)>,
    /// Firewall rules from the DB, oldest first.
    pub rules: Vec<Rule>,
    /// True when this run seeded an empty DB from the config.
    pub seeded: bool,
}

pub(super) fn seed_or_load(
    conn: &mut Connection,
    path: &Path,
    listeners: &[ListenerConfig],
    rules: &[Rule],
) -> Result<Loaded, StoreError> {
    // IMMEDIATE: what we read is what we decide on, with no writer between.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let mut known: HashMap<String, i64> = HashMap::new();
    {
        let mut stmt = tx.prepare("SELECT id, addr FROM listeners").at(path)?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })
            .at(path)?;
        for row in rows {
            let (id, addr) = row.at(path)?;
            known.insert(addr, id);
        }
    }
    let seeded = known.is_empty();

    let mut listener_ids = Vec::with_capacity(listeners.len());
    let mut added = Vec::new();
    for listener in listeners {
        let addr = listener.addr.text.as_str();
        let id = match known.get(addr) {
            Some(&id) => id,
            None => {
                let id = insert_listener(&tx, path, addr, &config_routes(listener))?;
                added.push(addr);
                id
            }
        };
        listener_ids.push(id);
    }
    if seeded {
        for rule in rules {
            insert_rule(&tx, path, rule)?;
        }
    }

    let mut loaded = Vec::with_capacity(listeners.len());
    for (listener, id) in listeners.iter().zip(listener_ids) {
        let map = load_routes(&tx, path, id)?;
        loaded.push((listener.addr.text.clone(), map));
    }
    let stored_rules = load_rules(&tx, path)?;
    tx.commit().at(path)?;

    let db = path.display();
    if seeded {
        tracing::info!(
            db = %db,
            listeners = listeners.len(),
            routes = listeners.iter().map(|l| l.routes.len()).sum::<usize>(),
            rules = rules.len(),
            "seeded the database from the config (first run)"
        );
        return Ok(Loaded {
            listeners: loaded,
            rules: stored_rules,
            seeded,
        });
    }

    for addr in &added {
        tracing::info!(db = %db, listener = %addr, "listener in the config but not in the database: added with its routes");
    }
    for addr in known.keys() {
        if !listeners.iter().any(|l| &l.addr.text == addr) {
            tracing::info!(db = %db, listener = %addr, "listener in the database but not in the config: kept in the database, not bound");
        }
    }
    for (listener, (addr, stored)) in listeners.iter().zip(&loaded) {
        if !added.contains(&addr.as_str()) {
            log_route_differences(addr, &config_routes(listener), stored);
        }
    }
    log_rule_differences(rules, &stored_rules);
    Ok(Loaded {
        listeners: loaded,
        rules: stored_rules,
        seeded,
    })
}

fn config_routes(listener: &ListenerConfig) -> Vec<(Hostname, Target)> {
    listener
        .routes
        .iter()
        .map(|r| (r.hostname.clone(), r.target()))
        .collect()
}

const DB_WINS: &str = "the database wins; change routes with `mc-proxy routes`";

fn log_route_differences(addr: &str, config: &[(Hostname, Target)], stored: &RouteMap) {
    for (hostname, target) in config {
        match stored.get(hostname) {
            None => tracing::info!(
                listener = %addr, hostname = %hostname, config_backend = %target.backends,
                "route in the config but not in the database; {DB_WINS}"
            ),
            Some(current) if **current != *target => tracing::info!(
                listener = %addr, hostname = %hostname,
                config_backend = %target.backends, config_send_proxy_protocol = target.send_proxy_protocol,
                config_mode = target.mode.label(),
                db_backend = %current.backends, db_send_proxy_protocol = current.send_proxy_protocol,
                db_mode = current.mode.label(),
                "route differs between the config and the database; {DB_WINS}"
            ),
            Some(_) => {}
        }
    }
    for (hostname, current) in stored.sorted() {
        if !config.iter().any(|(h, _)| *h == hostname) {
            tracing::info!(
                listener = %addr, hostname = %hostname, db_backend = %current.backends,
                "route in the database but not in the config; {DB_WINS}"
            );
        }
    }
}

fn log_rule_differences(config: &[Rule], stored: &[Rule]) {
    let config: BTreeSet<&Rule> = config.iter().collect();
    let stored: BTreeSet<&Rule> = stored.iter().collect();
    for rule in config.difference(&stored) {
        tracing::info!(rule = %rule, "firewall rule in the config but not in the database; the database wins; change rules with `mc-proxy firewall`");
    }
    for rule in stored.difference(&config) {
        tracing::info!(rule = %rule, "firewall rule in the database but not in the config; the database wins; change rules with `mc-proxy firewall`");
    }
}
