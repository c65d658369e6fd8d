//! What the store's parts share: its error type, the SQLite error context,
//! the file mode and busy timeout, and reading and writing route and rule
//! rows (every value re-validated on the way back).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;
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
        .prepare_cached(
            "SELECT id, hostname, backend, send_proxy_protocol FROM routes \
             WHERE listener_id = ?1 ORDER BY id",
        )
        .at(path)?;
    let rows = stmt
        .query_map([listener_id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
            ))
        })
        .at(path)?;
    let mut map = RouteMap::new();
    for row in rows {
        let (id, hostname_text, backend_text, proxy_flag) = row.at(path)?;
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
        let backend = Backend::parse(&backend_text)
            .map_err(|e| bad(format!("backend {backend_text:?}: {e}")))?;
        let send_proxy_protocol = match proxy_flag {
            0 => false,
            1 => true,
            other => return Err(bad(format!("send_proxy_protocol is {other}, not 0 or 1"))),
        };
        map.insert(
            hostname,
            Target {
                backend,
                send_proxy_protocol,
                mode: crate::routes::Mode::L4,
            },
        );
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
            "INSERT INTO routes (listener_id, hostname, backend, send_proxy_protocol, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, {NOW_SQL}, {NOW_SQL})"
        ))
        .at(path)?;
    for (hostname, target) in routes {
        stmt.execute(rusqlite::params![
            id,
            hostname.as_str(),
            target.backend.to_string(),
            target.send_proxy_protocol,
        ])
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
