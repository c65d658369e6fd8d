//! The writer thread: the only user of the read-write connection after
//! start. It takes one command at a time, so changes commit, and memory is
//! updated, in one order. Write-through: `BEGIN IMMEDIATE`, write, commit,
//! and only then update memory; any error rolls back, leaves memory as it
//! was and goes back to the caller.

use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::oneshot;
use wire::rule::Rule;

use super::db::{
    conn_path, file_identity, insert_rule, RouteRow, SqliteContext, StoreError, NOW_SQL,
    ROUTE_COLUMNS, ROUTE_COLUMNS_UPDATE, ROUTE_PLACEHOLDERS,
};
use crate::routes::{Hostname, ListenerRoutes, Routes, Target};

/// Called with every rule after each committed rule change.
pub type OnRules = Box<dyn Fn(&[Rule]) + Send>;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
    UpsertRoute {
        listener: String,
        hostname: Hostname,
        target: Target,
        reply: Reply<bool>,
    },
    RemoveRoute {
        listener: String,
        hostname: Hostname,
        reply: Reply<()>,
    },
    AddRule {
        rule: Rule,
        reply: Reply<bool>,
    },
    RemoveRule {
        rule: Rule,
        reply: Reply<()>,
    },
    Reload {
        reply: Reply<()>,
    },
    Close,
}

/// Handle used by the admin API. Cheap to clone; every clone talks to the
/// same writer thread.
#[derive(Clone)]
pub struct Store {
    commands: mpsc::Sender<Command>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Store {
    /// Starts the writer thread, which owns `conn` from now on. After every
    /// committed change it updates memory: the listener's table in
    /// `routes`, or `on_rules` with the full rule list.
    pub fn start(
        conn: Connection,
        routes: Arc<Routes>,
        rules: Vec<Rule>,
        on_rules: OnRules,
    ) -> Store {
        let (commands, inbox) = mpsc::channel();
        let path = conn_path(&conn);
        let writer = Writer {
            identity: file_identity(&path).ok(),
            conn,
            path,
            routes,
            rules,
            on_rules,
        };
        let thread = std::thread::Builder::new()
            .name("mc-proxy-store".into())
            .spawn(move || writer.run(inbox));
        let thread = match thread {
            Ok(handle) => Some(handle),
            Err(e) => {
                // The inbox went down with the closure: every call returns
                // `Closed`, which the admin API reports as INTERNAL.
                tracing::error!(error = %e, "cannot start the store thread; admin changes will fail");
                None
            }
        };
        Store {
            commands,
            thread: Arc::new(Mutex::new(thread)),
        }
    }

    /// Re-reads every listener's routes and the firewall rules from the
    /// database and replaces the live tables with them: after a handoff,
    /// what the previous process committed after this one loaded them.
    pub async fn reload(&self) -> Result<(), StoreError> {
        self.call(|reply| Command::Reload { reply }).await
    }

    /// Adds or replaces the route for (`listener`, `hostname`). `Ok(true)`:
    /// created; `Ok(false)`: an existing route was updated.
    pub async fn upsert_route(
        &self,
        listener: &str,
        hostname: Hostname,
        target: Target,
    ) -> Result<bool, StoreError> {
        self.call(|reply| Command::UpsertRoute {
            listener: listener.to_string(),
            hostname,
            target,
            reply,
        })
        .await
    }

    /// Removes a route; [`StoreError::NotFound`] if there is none.
    pub async fn remove_route(&self, listener: &str, hostname: Hostname) -> Result<(), StoreError> {
        self.call(|reply| Command::RemoveRoute {
            listener: listener.to_string(),
            hostname,
            reply,
        })
        .await
    }

    /// Adds a firewall rule; `Ok(false)` if it was already there.
    pub async fn add_rule(&self, rule: Rule) -> Result<bool, StoreError> {
        self.call(|reply| Command::AddRule { rule, reply }).await
    }

    /// Removes a firewall rule; [`StoreError::NotFound`] if there is none.
    pub async fn remove_rule(&self, rule: Rule) -> Result<(), StoreError> {
        self.call(|reply| Command::RemoveRule { rule, reply }).await
    }

    /// Stops the writer thread once the commands queued before this call
    /// are done, and waits for it (a few milliseconds at most: each command
    /// is one short transaction). Later calls get [`StoreError::Closed`].
    /// Idempotent.
    pub fn close(&self) {
        // Fails only if the thread is already gone.
        let _ = self.commands.send(Command::Close);
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // (Joining from the store thread itself would wait forever.)
        if let Some(handle) = handle.filter(|h| h.thread().id() != std::thread::current().id()) {
            if handle.join().is_err() {
                tracing::error!("the store thread panicked");
            }
        }
    }

    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .map_err(|_| StoreError::Closed)?;
        // A dropped reply means the thread stopped before reaching us.
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

struct Writer {
    conn: Connection,
    path: PathBuf,
    /// (device, inode) of the DB file at start.
    identity: Option<(u64, u64)>,
    routes: Arc<Routes>,
    rules: Vec<Rule>,
    on_rules: OnRules,
}

impl Writer {
    fn run(mut self, inbox: mpsc::Receiver<Command>) {
        // Ends on `Close`, or when every `Store` handle is dropped.
        while let Ok(command) = inbox.recv() {
            // A caller that gave up (dropped its future) does not undo a
            // change: it is committed or not, as for any other caller.
            match command {
                Command::UpsertRoute {
                    listener,
                    hostname,
                    target,
                    reply,
                } => {
                    let _ = reply.send(self.upsert_route(&listener, hostname, target));
                }
                Command::RemoveRoute {
                    listener,
                    hostname,
                    reply,
                } => {
                    let _ = reply.send(self.remove_route(&listener, hostname));
                }
                Command::AddRule { rule, reply } => {
                    let _ = reply.send(self.add_rule(rule));
                }
                Command::RemoveRule { rule, reply } => {
                    let _ = reply.send(self.remove_rule(rule));
                }
                Command::Reload { reply } => {
                    let _ = reply.send(self.reload());
                }
                Command::Close => break,
            }
        }
        tracing::debug!(db = %self.path.display(), "store closed");
    }

    /// Opens the write transaction, after checking the file is still the
    /// one we opened: in WAL mode SQLite would keep writing to a deleted
    /// or renamed file without an error, and those changes would be lost.
    fn begin(&mut self) -> Result<Transaction<'_>, StoreError> {
        if let Some(identity) = self.identity {
            if file_identity(&self.path).ok() != Some(identity) {
                return Err(StoreError::Moved {
                    path: self.path.clone(),
                });
            }
        }
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(&self.path)
    }

    fn listener(&self, addr: &str) -> Result<Arc<ListenerRoutes>, StoreError> {
        self.routes
            .listener(addr)
            .cloned()
            .ok_or_else(|| StoreError::UnknownListener(addr.to_string()))
    }

    fn upsert_route(
        &mut self,
        addr: &str,
        hostname: Hostname,
        target: Target,
    ) -> Result<bool, StoreError> {
        let table = self.listener(addr)?;
        let path = self.path.clone();
        let row = RouteRow::new(&target)?;
        let tx = self.begin()?;
        let listener_id = listener_id(&tx, &path, addr)?;
        let existed = tx
            .query_row(
                "SELECT 1 FROM routes WHERE listener_id = ?1 AND hostname = ?2",
                rusqlite::params![listener_id, hostname.as_str()],
                |_| Ok(()),
            )
            .optional()
            .at(&path)?
            .is_some();
        tx.execute(
            &format!(
                "INSERT INTO routes (listener_id, hostname, {ROUTE_COLUMNS}, created_at, updated_at) \
                 VALUES ({ROUTE_PLACEHOLDERS}, {NOW_SQL}, {NOW_SQL}) \
                 ON CONFLICT (listener_id, hostname) DO UPDATE SET \
                 {ROUTE_COLUMNS_UPDATE}, updated_at = excluded.updated_at"
            ),
            row.params(&listener_id, &hostname.as_str()).as_slice(),
        )
        .at(&path)?;
        tx.commit().at(&path)?;

        tracing::info!(
            listener = %addr, hostname = %hostname, backend = %target.backends,
            balance = target.balance.label(),
            health_interval = target.health.as_ref().map(|h| tracing::field::display(humantime::format_duration(h.interval))),
            send_proxy_protocol = target.send_proxy_protocol, mode = target.mode.label(),
            "{}", if existed { "route updated" } else { "route added" }
        );
        let mut map = (*table.snapshot()).clone();
        map.insert(hostname, target);
        table.replace(map);
        Ok(!existed)
    }

    fn remove_route(&mut self, addr: &str, hostname: Hostname) -> Result<(), StoreError> {
        let table = self.listener(addr)?;
        let path = self.path.clone();
        let tx = self.begin()?;
        let listener_id = listener_id(&tx, &path, addr)?;
        let removed = tx
            .execute(
                "DELETE FROM routes WHERE listener_id = ?1 AND hostname = ?2",
                rusqlite::params![listener_id, hostname.as_str()],
            )
            .at(&path)?;
        if removed == 0 {
            return Err(StoreError::NotFound(format!(
                "route {hostname} on listener {addr:?}"
            )));
        }
        tx.commit().at(&path)?;

        tracing::info!(listener = %addr, hostname = %hostname, "route removed");
        let mut map = (*table.snapshot()).clone();
        map.remove(&hostname);
        table.replace(map);
        Ok(())
    }

    fn add_rule(&mut self, rule: Rule) -> Result<bool, StoreError> {
        let path = self.path.clone();
        let tx = self.begin()?;
        let inserted = insert_rule(&tx, &path, &rule)?;
        tx.commit().at(&path)?;
        if inserted {
            tracing::info!(rule = %rule, "firewall rule added");
            self.rules.push(rule.clone());
            (self.on_rules)(&self.rules);
        }
        Ok(inserted)
    }

    /// Every bound listener's routes and the rules, read in one
    /// transaction, then swapped in (nothing changes if a read fails).
    fn reload(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let routes = self.routes.clone();
        let tx = self.begin()?;
        let mut maps = Vec::new();
        for listener in routes.listeners() {
            let id = listener_id(&tx, &path, listener.addr())?;
            maps.push((listener.clone(), super::db::load_routes(&tx, &path, id)?));
        }
        let rules = super::db::load_rules(&tx, &path)?;
        drop(tx);
        for (listener, map) in maps {
            listener.replace(map);
        }
        self.rules = rules;
        (self.on_rules)(&self.rules);
        tracing::info!("routes and rules re-read from the database");
        Ok(())
    }

    fn remove_rule(&mut self, rule: Rule) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self.begin()?;
        let removed = tx
            .execute(
                "DELETE FROM firewall_rules WHERE type = ?1 AND value = ?2",
                [rule.kind().as_str(), rule.value().as_str()],
            )
            .at(&path)?;
        if removed == 0 {
            return Err(StoreError::NotFound(format!("firewall rule {rule}")));
        }
        tx.commit().at(&path)?;
        tracing::info!(rule = %rule, "firewall rule removed");
        self.rules.retain(|r| *r != rule);
        (self.on_rules)(&self.rules);
        Ok(())
    }
}

/// The DB id of a bound listener. Every bound listener is in the DB after
/// `open`; if one is not (deleted by hand), it is unknown.
fn listener_id(
    tx: &Transaction<'_>,
    path: &std::path::Path,
    addr: &str,
) -> Result<i64, StoreError> {
    tx.query_row("SELECT id FROM listeners WHERE addr = ?1", [addr], |row| {
        row.get(0)
    })
    .optional()
    .at(path)?
    .ok_or_else(|| StoreError::UnknownListener(addr.to_string()))
}
