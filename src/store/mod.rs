//! SQLite: migrations, seeding, write-through changes, snapshot. Owns the DB
//! file.
//!
//! Never runs SQLite on a tokio worker thread: [`open`] runs before the
//! runtime serves anything, and afterwards one dedicated OS thread owns the
//! read-write connection ([`Store`]); async callers send it commands over a
//! channel. Every change is committed to the DB before memory sees it, so a
//! failed write leaves memory as it was and an acknowledged one survives a
//! crash or power loss (`synchronous=FULL`).
//!
//! Layout: [`migrations`] (schema versions), `seed` (first run and later
//! runs), `writer` (the [`Store`] thread), [`snapshot`](mod@snapshot) (`VACUUM INTO`), and
//! below them all `db` (the [`StoreError`] type and the row readers and
//! writers they share). This file only opens the DB and hands it over.

use std::fs::{self, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use crate::config::Config;

mod db;
pub mod migrations;
mod seed;
pub mod snapshot;
mod writer;

pub use db::StoreError;
use db::{io_error, SqliteContext, BUSY_TIMEOUT, DB_FILE_MODE};
pub use seed::Loaded;
pub use snapshot::snapshot;
pub use writer::Store;

/// What [`open`] hands the server: the read-write connection (give it to
/// [`Store::start`]) and the tables to serve.
#[derive(Debug)]
pub struct Opened {
    pub conn: Connection,
    pub state: Loaded,
}

/// Opens (creating if needed) the DB at `config.database.path`, applies
/// pending migrations, then seeds it from the config (first run) or loads
/// it (later runs; differences from the config are logged at info). Sync:
/// call it before serving, or from a blocking thread.
pub fn open(config: &Config) -> Result<Opened, StoreError> {
    let path = config.database.path.as_path();
    create_db_file(path)?;
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .at(path)?;
    configure(&conn, path)?;
    migrations::migrate(&mut conn)?;
    let state = seed::seed_or_load(&mut conn, path, &config.listeners, &config.firewall.rules)?;
    // SQLite creates -wal and -shm with the main file's mode; make sure
    // anyway, since they hold the same data.
    for companion in [
        path.to_path_buf(),
        with_suffix(path, "-wal"),
        with_suffix(path, "-shm"),
    ] {
        restrict_mode(&companion, false)?;
    }
    Ok(Opened { conn, state })
}

/// Creates the parent directory and, if missing, the DB file with mode
/// 0600 before SQLite sees it (so it never exists with a wider mode);
/// tightens the mode of an existing file.
fn create_db_file(path: &Path) -> Result<(), StoreError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io_error(parent))?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(DB_FILE_MODE)
        .open(path)
        .map_err(io_error(path))?;
    restrict_mode(path, true)
}

/// Sets a file's permission bits to 0600 unless they already are.
fn restrict_mode(path: &Path, must_exist: bool) -> Result<(), StoreError> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !must_exist => return Ok(()),
        Err(e) => return Err(io_error(path)(e)),
    };
    if meta.mode() & 0o7777 != DB_FILE_MODE {
        fs::set_permissions(path, Permissions::from_mode(DB_FILE_MODE)).map_err(io_error(path))?;
    }
    Ok(())
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Connection settings for the read-write connection.
fn configure(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT).at(path)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .at(path)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NoWal {
            path: path.to_path_buf(),
            mode,
        });
    }
    // FULL: the WAL is fsynced at every commit, so an acknowledged change
    // survives power loss (NORMAL only guarantees consistency, and may lose
    // the last commits). Admin changes are rare; the fsync costs nothing.
    conn.pragma_update(None, "synchronous", "FULL").at(path)?;
    conn.pragma_update(None, "foreign_keys", "ON").at(path)?;
    Ok(())
}

#[cfg(test)]
mod tests;
