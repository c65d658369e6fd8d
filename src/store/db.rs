//! What the store's parts share: its error type, the SQLite error context,
//! the file mode and busy timeout, and reading and writing route and rule
//! rows (every value re-validated on the way back).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use rusqlite::Connection;
use wire::route::{
    parse_server_name, BackendProtocol, Backends, Balance, L7Route, Mode, PoolSettings,
};
use wire::rule::{Rule, RuleKind};

use crate::routes::{Backend, Hostname, RouteMap, Target};

/// How long a statement waits for another connection's lock (a `snapshot`
/// run, an operator's `sqlite3` shell) before failing.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The DB file and its WAL companions: owner read/write only.
pub(super) const DB_FILE_MODE: u32 = 0o600;

/// The current UTC time as RFC 3339 (`2025-01-31T12:00:00Z`), computed by
/// SQLite so that every timestamp column has the same format.
pub(crate) const NOW_SQL: &str = "strftime('%Y-%m-%dT%H:%M:%SZ', 'now')";

/// Every way the store can fail. Messages name the DB file where one is
/// involved, so a log line or a CLI error is enough to find the problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Removing a route or rule that is not there. The text names it.
    #[error("{0} not found")]
    NotFound(String),
    /// A listener address that is not bound by this server (not in the
    /// config, or in the DB only).
    #[error("unknown listener {0:?}")]
    UnknownListener(String),
    /// The DB's schema is newer than this binary's; refusing to touch it.
    #[error("database {} was written by a newer mc-proxy (schema {found}, this binary knows {supported})", path.display())]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// SQLite refused a statement (I/O error, full disk, constraint, lock
    /// held too long, ...).
    #[error("database {}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// A row that does not hold a valid value (edited by hand, or corrupt).
    #[error("database {}: table {table}, row id {id}: {problem}", path.display())]
    BadRow {
        path: PathBuf,
        table: &'static str,
        id: i64,
        problem: String,
    },
    /// The file system refused (creating the directory or file, setting its
    /// mode, writing a snapshot).
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// SQLite would not switch the DB to WAL mode (e.g. a file system
    /// without shared memory support).
    #[error("database {}: cannot enable WAL journal mode (SQLite kept {mode:?})", path.display())]
    NoWal { path: PathBuf, mode: String },
    /// The DB file was deleted, renamed or replaced while the server ran. A
    /// write would go to a file nobody will read again, so it is refused.
    #[error("database {} was moved, replaced or deleted while the server was running; refusing to write (restart mc-proxy)", path.display())]
    Moved { path: PathBuf },
    /// An L7 route's file path that is not UTF-8 (the DB and the admin API
    /// hold paths as text).
    #[error("{}: an L7 route's path must be valid UTF-8 to be stored", .0.display())]
    PathNotUtf8(PathBuf),
    /// `snapshot` refuses to overwrite a file.
    #[error("{}: snapshot target already exists; not overwriting it", .0.display())]
    SnapshotExists(PathBuf),
    /// The writer thread has stopped ([`Store::close`](super::Store::close), or shutdown).
    #[error("the store is closed")]
    Closed,
}

/// Attaches the DB path to a rusqlite error.
pub(crate) trait SqliteContext<T> {
    fn at(self, path: &Path) -> Result<T, StoreError>;
}

impl<T> SqliteContext<T> for Result<T, rusqlite::Error> {
    fn at(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        })
    }
}

pub(super) fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The path SQLite opened, for error messages (empty for in-memory DBs).
pub(crate) fn conn_path(conn: &Connection) -> PathBuf {
    PathBuf::from(conn.path().unwrap_or_default())
}

// ---- route columns ----------------------------------------------------------

/// A route's columns after `listener_id` and `hostname`, in this order (the
/// SELECT, INSERT and upsert all use it).
pub(crate) const ROUTE_COLUMNS: &str = "backend, send_proxy_protocol, mode, tls_cert, tls_key, \
     backend_tls, backend_ca, backend_server_name, backend_protocol, backends, balance, \
     health_interval_ms, health_path, health_fall, health_rise";

/// `ROUTE_COLUMNS = excluded.ROUTE_COLUMNS`, for the upsert.
pub(crate) const ROUTE_COLUMNS_UPDATE: &str = "backend = excluded.backend, \
     send_proxy_protocol = excluded.send_proxy_protocol, mode = excluded.mode, \
     tls_cert = excluded.tls_cert, tls_key = excluded.tls_key, \
     backend_tls = excluded.backend_tls, backend_ca = excluded.backend_ca, \
     backend_server_name = excluded.backend_server_name, \
     backend_protocol = excluded.backend_protocol, backends = excluded.backends, \
     balance = excluded.balance, health_interval_ms = excluded.health_interval_ms, \
     health_path = excluded.health_path, health_fall = excluded.health_fall, \
     health_rise = excluded.health_rise";

/// A target as the [`ROUTE_COLUMNS`] values.
pub(crate) struct RouteRow {
    backend: String,
    send_proxy_protocol: bool,
    mode: &'static str,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    backend_tls: bool,
    backend_ca: Option<String>,
    backend_server_name: Option<String>,
    backend_protocol: &'static str,
    /// A JSON array of the backends' text forms.
    backends: String,
    balance: &'static str,
    health_interval_ms: Option<i64>,
    health_path: Option<String>,
    health_fall: Option<i64>,
    health_rise: Option<i64>,
}

fn path_text(path: &Path) -> Result<String, StoreError> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| StoreError::PathNotUtf8(path.to_path_buf()))
}

impl RouteRow {
    pub(crate) fn new(target: &Target) -> Result<RouteRow, StoreError> {
        let mut row = RouteRow {
            backend: target.backend().to_string(),
            send_proxy_protocol: target.send_proxy_protocol,
            mode: target.mode.label(),
            tls_cert: None,
            tls_key: None,
            backend_tls: false,
            backend_ca: None,
            backend_server_name: None,
            backend_protocol: BackendProtocol::default().label(),
            backends: backends_json(&target.backends),
            balance: target.balance.label(),
            health_interval_ms: None,
            health_path: None,
            health_fall: None,
            health_rise: None,
        };
        if let Some(health) = &target.health {
            // At most an hour (PoolSettings' rule): always fits.
            row.health_interval_ms =
                Some(i64::try_from(health.interval.as_millis()).unwrap_or(i64::MAX));
            row.health_path = health.path.as_deref().map(str::to_string);
            row.health_fall = Some(i64::from(health.fall));
            row.health_rise = Some(i64::from(health.rise));
        }
        if let Some(l7) = target.mode.l7() {
            row.tls_cert = Some(path_text(&l7.tls_cert)?);
            row.tls_key = Some(path_text(&l7.tls_key)?);
            row.backend_tls = l7.backend_tls;
            row.backend_ca = l7.backend_ca.as_deref().map(path_text).transpose()?;
            row.backend_server_name = l7.backend_server_name.clone();
            row.backend_protocol = l7.backend_protocol.label();
        }
        Ok(row)
    }

    /// The values after `listener_id` and `hostname`, as `?3` to `?17`.
    pub(crate) fn params<'a>(
        &'a self,
        listener_id: &'a i64,
        hostname: &'a &'a str,
    ) -> [&'a dyn rusqlite::ToSql; 17] {
        [
            listener_id,
            hostname,
            &self.backend,
            &self.send_proxy_protocol,
            &self.mode,
            &self.tls_cert,
            &self.tls_key,
            &self.backend_tls,
            &self.backend_ca,
            &self.backend_server_name,
            &self.backend_protocol,
            &self.backends,
            &self.balance,
            &self.health_interval_ms,
            &self.health_path,
            &self.health_fall,
            &self.health_rise,
        ]
    }
}

/// The `backends` column: a JSON array of the backends' text forms.
fn backends_json(backends: &Backends) -> String {
    let texts: Vec<String> = backends.iter().map(ToString::to_string).collect();
    // A list of strings: serialisation cannot fail.
    serde_json::to_string(&texts).unwrap_or_default()
}

/// The `?1, ?2, ..., ?17` placeholders for `listener_id, hostname,
/// ROUTE_COLUMNS`.
pub(crate) const ROUTE_PLACEHOLDERS: &str =
    "?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17";

/// A route row's [`ROUTE_COLUMNS`] as read, before validation.
struct StoredRoute {
    backend: String,
    send_proxy_protocol: i64,
    mode: String,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    backend_tls: i64,
    backend_ca: Option<String>,
    backend_server_name: Option<String>,
    backend_protocol: String,
    backends: String,
    balance: String,
    health_interval_ms: Option<i64>,
    health_path: Option<String>,
    health_fall: Option<i64>,
    health_rise: Option<i64>,
}

fn flag(name: &str, value: i64) -> Result<bool, String> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(format!("{name} is {other}, not 0 or 1")),
    }
}

impl StoredRoute {
    /// The row's target, every column re-validated; the problem otherwise.
    fn target(self) -> Result<Target, String> {
        let backend = Backend::parse(&self.backend)
            .map_err(|e| format!("backend {:?}: {e}", self.backend))?;
        let texts: Vec<String> = serde_json::from_str(&self.backends).map_err(|e| {
            format!(
                "backends {:?}: not a JSON array of strings: {e}",
                self.backends
            )
        })?;
        let backends = texts
            .iter()
            .map(|text| Backend::parse(text).map_err(|e| format!("backends entry {text:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if backends.first() != Some(&backend) {
            return Err(format!(
                "backend {:?} is not the first of backends {:?}",
                self.backend, self.backends
            ));
        }
        let balance = Balance::parse(&self.balance)
            .filter(|_| !self.balance.is_empty())
            .ok_or_else(|| {
                format!(
                    "balance {:?} is not round_robin or least_connections",
                    self.balance
                )
            })?;
        let health_interval = match self.health_interval_ms {
            None => None,
            Some(ms) => {
                Some(Duration::from_millis(u64::try_from(ms).map_err(|_| {
                    format!("health_interval_ms {ms} is negative")
                })?))
            }
        };
        let count = |column: &str, value: Option<i64>| {
            value
                .map(|n| u32::try_from(n).map_err(|_| format!("{column} {n} is out of range")))
                .transpose()
        };
        let health_fall = count("health_fall", self.health_fall)?;
        let health_rise = count("health_rise", self.health_rise)?;
        // Without a check, fall and rise are NULL (the config's and the
        // API's defaults are filled in only with an interval).
        let pool_settings = PoolSettings {
            backend: None,
            backends,
            balance: Some(balance),
            health_interval,
            health_path: self.health_path,
            health_fall,
            health_rise,
        };
        let send_proxy_protocol = flag("send_proxy_protocol", self.send_proxy_protocol)?;
        let backend_tls = flag("backend_tls", self.backend_tls)?;
        let backend_protocol = BackendProtocol::parse(&self.backend_protocol)
            .filter(|_| !self.backend_protocol.is_empty())
            .ok_or_else(|| {
                format!(
                    "backend_protocol {:?} is not auto, http1 or h2",
                    self.backend_protocol
                )
            })?;
        let mode = match self.mode.as_str() {
            "l4" => {
                let l7_only = [
                    ("tls_cert", self.tls_cert.is_some()),
                    ("tls_key", self.tls_key.is_some()),
                    ("backend_tls", backend_tls),
                    ("backend_ca", self.backend_ca.is_some()),
                    ("backend_server_name", self.backend_server_name.is_some()),
                    (
                        "backend_protocol",
                        backend_protocol != BackendProtocol::default(),
                    ),
                ];
                if let Some((column, _)) = l7_only.into_iter().find(|(_, set)| *set) {
                    return Err(format!("{column} is set on an l4 route"));
                }
                Mode::L4
            }
            "l7" => {
                if send_proxy_protocol {
                    return Err("send_proxy_protocol is set on an l7 route".to_string());
                }
                let path = |column: &str, value: Option<String>| match value {
                    Some(text) if Path::new(&text).is_absolute() => Ok(PathBuf::from(text)),
                    Some(text) => Err(format!("{column} {text:?} is not an absolute path")),
                    None => Err(format!("{column} is missing on an l7 route")),
                };
                let tls_cert = path("tls_cert", self.tls_cert)?;
                let tls_key = path("tls_key", self.tls_key)?;
                if !backend_tls && (self.backend_ca.is_some() || self.backend_server_name.is_some())
                {
                    return Err(
                        "backend_ca or backend_server_name set without backend_tls".to_string()
                    );
                }
                let backend_ca = self
                    .backend_ca
                    .map(|ca| path("backend_ca", Some(ca)))
                    .transpose()?;
                let backend_server_name = match self.backend_server_name {
                    None => None,
                    Some(name) => match parse_server_name(&name) {
                        Ok(normal) if normal == name => Some(normal),
                        Ok(normal) => {
                            return Err(format!(
                                "backend_server_name {name:?} is not in normal form (expected {normal:?})"
                            ))
                        }
                        Err(e) => return Err(format!("backend_server_name {name:?}: {e}")),
                    },
                };
                Mode::L7(Arc::new(L7Route {
                    tls_cert,
                    tls_key,
                    backend_tls,
                    backend_ca,
                    backend_server_name,
                    backend_protocol,
                }))
            }
            other => return Err(format!("mode {other:?} is not l4 or l7")),
        };
        let pool = pool_settings
            .into_pool(mode.l7().is_some(), false)
            .map_err(|e| format!("{}: {e}", e.key().label()))?;
        Ok(Target {
            backends: pool.backends,
            balance: pool.balance,
            health: pool.health,
            send_proxy_protocol,
            mode,
        })
    }
}

// ---- reading rows back (every value re-validated) -------------------------

/// A listener's routes as stored. A row that does not parse, or whose
/// hostname is not in normal form (it could never be matched or removed),
/// is an error naming the row.
pub(crate) fn load_routes(
    conn: &Connection,
    path: &Path,
    listener_id: i64,
) -> Result<RouteMap, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT id, hostname, {ROUTE_COLUMNS} FROM routes \
             WHERE listener_id = ?1 ORDER BY id"
        ))
        .at(path)?;
    let rows = stmt
        .query_map([listener_id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                StoredRoute {
                    backend: row.get(2)?,
                    send_proxy_protocol: row.get(3)?,
                    mode: row.get(4)?,
                    tls_cert: row.get(5)?,
                    tls_key: row.get(6)?,
                    backend_tls: row.get(7)?,
                    backend_ca: row.get(8)?,
                    backend_server_name: row.get(9)?,
                    backend_protocol: row.get(10)?,
                    backends: row.get(11)?,
                    balance: row.get(12)?,
                    health_interval_ms: row.get(13)?,
                    health_path: row.get(14)?,
                    health_fall: row.get(15)?,
                    health_rise: row.get(16)?,
                },
            ))
        })
        .at(path)?;
    let mut map = RouteMap::new();
    for row in rows {
        let (id, hostname_text, stored) = row.at(path)?;
        let bad = |problem: String| StoreError::BadRow {
            path: path.to_path_buf(),
            table: "routes",
            id,
            problem,
        };
        let hostname = Hostname::parse(&hostname_text)
            .map_err(|e| bad(format!("hostname {hostname_text:?}: {e}")))?;
        if hostname.as_str() != hostname_text {
            return Err(bad(format!(
                "hostname {hostname_text:?} is not in normal form (expected {:?})",
                hostname.as_str()
            )));
        }
        let target = stored.target().map_err(bad)?;
        map.insert(hostname, target);
    }
    Ok(map)
}

/// Every firewall rule, oldest first, re-validated like routes.
pub(crate) fn load_rules(conn: &Connection, path: &Path) -> Result<Vec<Rule>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT id, type, value FROM firewall_rules ORDER BY id")
        .at(path)?;
    let rows = stmt
        .query_map([], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
            ))
        })
        .at(path)?;
    let mut rules = Vec::new();
    for row in rows {
        let (id, kind_text, value) = row.at(path)?;
        let bad = |problem: String| StoreError::BadRow {
            path: path.to_path_buf(),
            table: "firewall_rules",
            id,
            problem,
        };
        let kind: RuleKind = kind_text.parse().map_err(|e| bad(format!("{e}")))?;
        let rule = Rule::parse(kind, &value).map_err(|e| bad(format!("{e}")))?;
        if rule.value() != value {
            return Err(bad(format!(
                "{kind_text} value {value:?} is not in normal form (expected {:?})",
                rule.value()
            )));
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// Inserts a listener and its routes; returns its id.
pub(crate) fn insert_listener(
    conn: &Connection,
    path: &Path,
    addr: &str,
    routes: &[(Hostname, Target)],
) -> Result<i64, StoreError> {
    conn.execute("INSERT INTO listeners (addr) VALUES (?1)", [addr])
        .at(path)?;
    let id = conn.last_insert_rowid();
    let mut stmt = conn
        .prepare_cached(&format!(
            "INSERT INTO routes (listener_id, hostname, {ROUTE_COLUMNS}, created_at, updated_at) \
             VALUES ({ROUTE_PLACEHOLDERS}, {NOW_SQL}, {NOW_SQL})"
        ))
        .at(path)?;
    for (hostname, target) in routes {
        let row = RouteRow::new(target)?;
        stmt.execute(row.params(&id, &hostname.as_str()).as_slice())
            .at(path)?;
    }
    Ok(id)
}

/// Inserts a rule unless present; true if it was inserted.
pub(crate) fn insert_rule(conn: &Connection, path: &Path, rule: &Rule) -> Result<bool, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "INSERT INTO firewall_rules (type, value, created_at, updated_at) \
             VALUES (?1, ?2, {NOW_SQL}, {NOW_SQL}) ON CONFLICT (type, value) DO NOTHING"
        ))
        .at(path)?;
    let inserted = stmt
        .execute([rule.kind().as_str(), rule.value().as_str()])
        .at(path)?;
    Ok(inserted == 1)
}

/// The file's identity, to notice it being replaced or deleted later.
pub(crate) fn file_identity(path: &Path) -> io::Result<(u64, u64)> {
    let meta = fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}
