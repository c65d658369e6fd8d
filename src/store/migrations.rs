//! Schema versions. Each migration runs once, recorded in
//! `schema_migrations`; all pending ones are applied in one transaction at
//! start, so a DB is never left half-migrated. A DB from a newer binary is
//! refused rather than guessed at.
//!
//! Never edit a migration that has shipped: add a new one.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::db::{conn_path, SqliteContext, StoreError, NOW_SQL};

/// The schema version this binary writes.
pub const LATEST: i64 = 4;

/// `(version, SQL)`, in order. Version N is at index N - 1.
const MIGRATIONS: [(i64, &str); 4] = [
    (
        1,
        "CREATE TABLE listeners (
             id   INTEGER PRIMARY KEY,
             addr TEXT NOT NULL UNIQUE
         );
         CREATE TABLE routes (
             id          INTEGER PRIMARY KEY,
             listener_id INTEGER NOT NULL REFERENCES listeners(id) ON DELETE CASCADE,
             hostname    TEXT NOT NULL,
             backend     TEXT NOT NULL,
             UNIQUE (listener_id, hostname)
         );
         CREATE TABLE firewall_rules (
             id    INTEGER PRIMARY KEY,
             type  TEXT NOT NULL CHECK (type IN ('ip', 'cidr', 'country')),
             value TEXT NOT NULL,
             UNIQUE (type, value)
         );",
    ),
    (
        // ALTER TABLE ADD COLUMN only takes constant defaults, so rows that
        // predate this migration get its time in a second step.
        2,
        "ALTER TABLE routes ADD COLUMN send_proxy_protocol INTEGER NOT NULL DEFAULT 0
             CHECK (send_proxy_protocol IN (0, 1));
         ALTER TABLE routes ADD COLUMN created_at TEXT NOT NULL DEFAULT '1970-01-01T00:00:00Z';
         ALTER TABLE routes ADD COLUMN updated_at TEXT NOT NULL DEFAULT '1970-01-01T00:00:00Z';
         ALTER TABLE firewall_rules ADD COLUMN created_at TEXT NOT NULL DEFAULT '1970-01-01T00:00:00Z';
         ALTER TABLE firewall_rules ADD COLUMN updated_at TEXT NOT NULL DEFAULT '1970-01-01T00:00:00Z';
         UPDATE routes SET created_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now'),
                           updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now');
         UPDATE firewall_rules SET created_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now'),
                                   updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now');",
    ),
    (
        // L7 routes (SPEC §6.2): the defaults make every existing route L4.
        // The L7-only path and name columns are NULL on L4 routes. The rule
        // type CHECK can't be altered in place, so firewall_rules is rebuilt
        // (ids kept: rules load oldest first).
        3,
        "ALTER TABLE routes ADD COLUMN mode TEXT NOT NULL DEFAULT 'l4'
             CHECK (mode IN ('l4', 'l7'));
         ALTER TABLE routes ADD COLUMN tls_cert TEXT;
         ALTER TABLE routes ADD COLUMN tls_key TEXT;
         ALTER TABLE routes ADD COLUMN backend_tls INTEGER NOT NULL DEFAULT 0
             CHECK (backend_tls IN (0, 1));
         ALTER TABLE routes ADD COLUMN backend_ca TEXT;
         ALTER TABLE routes ADD COLUMN backend_server_name TEXT;
         ALTER TABLE routes ADD COLUMN backend_protocol TEXT NOT NULL DEFAULT 'auto'
             CHECK (backend_protocol IN ('auto', 'http1', 'h2'));
         CREATE TABLE firewall_rules_v3 (
             id         INTEGER PRIMARY KEY,
             type       TEXT NOT NULL CHECK (type IN ('ip', 'cidr', 'country', 'user_agent')),
             value      TEXT NOT NULL,
             created_at TEXT NOT NULL DEFAULT '1970-01-01T00:00:00Z',
             updated_at TEXT NOT NULL DEFAULT '1970-01-01T00:00:00Z',
             UNIQUE (type, value)
         );
         INSERT INTO firewall_rules_v3 (id, type, value, created_at, updated_at)
             SELECT id, type, value, created_at, updated_at FROM firewall_rules;
         DROP TABLE firewall_rules;
         ALTER TABLE firewall_rules_v3 RENAME TO firewall_rules;",
    ),
    (
        // Backend pools (SPEC §6.3): `backends` is the whole list as a JSON
        // array of strings, in order; `backend` stays its first entry.
        // Existing routes become pools of one, round robin, no active
        // check (health_interval_ms NULL; the other health columns are
        // NULL with it).
        4,
        "ALTER TABLE routes ADD COLUMN backends TEXT NOT NULL DEFAULT '[]';
         UPDATE routes SET backends = json_array(backend);
         ALTER TABLE routes ADD COLUMN balance TEXT NOT NULL DEFAULT 'round_robin'
             CHECK (balance IN ('round_robin', 'least_connections'));
         ALTER TABLE routes ADD COLUMN health_interval_ms INTEGER;
         ALTER TABLE routes ADD COLUMN health_path TEXT;
         ALTER TABLE routes ADD COLUMN health_fall INTEGER;
         ALTER TABLE routes ADD COLUMN health_rise INTEGER;",
    ),
];

/// Brings the DB to [`LATEST`].
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    migrate_to(conn, LATEST)
}

/// Applies every migration up to and including `target` that the DB has not
/// recorded, in one `BEGIN IMMEDIATE` transaction. Tests use a lower
/// `target` to build an old DB.
pub(crate) fn migrate_to(conn: &mut Connection, target: i64) -> Result<(), StoreError> {
    let path = conn_path(conn);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(&path)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             applied_at TEXT NOT NULL
         );",
    )
    .at(&path)?;
    let current: i64 = tx
        .query_row("SELECT max(version) FROM schema_migrations", [], |row| {
            row.get::<_, Option<i64>>(0)
        })
        .at(&path)?
        .unwrap_or(0);
    if current > LATEST {
        return Err(StoreError::NewerSchema {
            path,
            found: current,
            supported: LATEST,
        });
    }
    for (version, sql) in MIGRATIONS {
        if version > target {
            break;
        }
        let applied = tx
            .query_row(
                "SELECT 1 FROM schema_migrations WHERE version = ?1",
                [version],
                |_| Ok(()),
            )
            .optional()
            .at(&path)?
            .is_some();
        if applied {
            continue;
        }
        tx.execute_batch(sql).at(&path)?;
        tx.execute(
            &format!("INSERT INTO schema_migrations (version, applied_at) VALUES (?1, {NOW_SQL})"),
            [version],
        )
        .at(&path)?;
        tracing::info!(db = %path.display(), version, "applied schema migration");
    }
    tx.commit().at(&path)
}

/// The highest recorded schema version (0 for an empty DB).
#[cfg(test)]
pub(crate) fn current_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT coalesce(max(version), 0) FROM schema_migrations",
        [],
        |row| row.get(0),
    )
}
