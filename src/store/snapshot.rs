//! `mc-proxy snapshot`: a consistent copy of the DB while the server runs
//! and writes (`VACUUM INTO` reads one WAL snapshot, so the copy holds
//! every change committed before it started and none half-done).
//!
//! Never creates or writes the source DB: it is opened read-only (VACUUM
//! INTO works on a read-only connection; SQLite opens the output read-write
//! by itself). Never overwrites a file.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rusqlite::{Connection, OpenFlags};

use super::db::{SqliteContext, StoreError, BUSY_TIMEOUT, DB_FILE_MODE};

/// The default directory's mode: backups are as secret as the DB.
const BACKUP_DIR_MODE: u32 = 0o700;

/// Copies the DB at `db_path` to `output`, or by default to
/// `<dir of db>/backups/mc-proxy-<UTC YYYYMMDDTHHMMSSZ>.db` (creating
/// `backups/` with mode 0700). The copy has mode 0600. An existing target
/// is refused ([`StoreError::SnapshotExists`]) and left alone; a failed
/// copy is removed. Returns the path written.
pub fn snapshot(db_path: &Path, output: Option<&Path>) -> Result<PathBuf, StoreError> {
    // Read-only opening would fail on a missing file anyway; this gives the
    // plain "No such file or directory" with the path.
    fs::metadata(db_path).map_err(|source| StoreError::Io {
        path: db_path.to_path_buf(),
        source,
    })?;
    let output = match output {
        Some(path) => path.to_path_buf(),
        None => default_output(db_path, SystemTime::now())?,
    };
    let output_text = output.to_str().ok_or_else(|| StoreError::Io {
        path: output.clone(),
        source: io::Error::new(
            io::ErrorKind::InvalidInput,
            "snapshot path is not valid UTF-8",
        ),
    })?;

    // O_CREAT|O_EXCL: an existing file (or a symlink to one) is refused
    // atomically; SQLite accepts an empty file as VACUUM INTO's target.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(DB_FILE_MODE)
        .open(&output)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                StoreError::SnapshotExists(output.clone())
            } else {
                StoreError::Io {
                    path: output.clone(),
                    source,
                }
            }
        })?;
    let written = (|| {
        // The umask may have taken bits away; never leave more than 0600.
        file.set_permissions(Permissions::from_mode(DB_FILE_MODE))
            .map_err(|source| StoreError::Io {
                path: output.clone(),
                source,
            })?;
        vacuum_into(db_path, output_text)?;
        sync(&output)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&output);
        return Err(e);
    }
    Ok(output)
}

fn vacuum_into(db_path: &Path, output: &str) -> Result<(), StoreError> {
    let conn = Connection::open_with_flags(
        db_path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .at(db_path)?;
    conn.busy_timeout(BUSY_TIMEOUT).at(db_path)?;
    // VACUUM INTO syncs the output at the source connection's level.
    conn.pragma_update(None, "synchronous", "FULL")
        .at(db_path)?;
    conn.execute("VACUUM INTO ?1", [output]).at(db_path)?;
    Ok(())
}

/// Flushes the copy and its directory entry, so a returned path survives
/// power loss.
fn sync(output: &Path) -> Result<(), StoreError> {
    let io_at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    File::open(output)
        .and_then(|f| f.sync_all())
        .map_err(io_at(output))?;
    if let Some(dir) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_at(dir))?;
    }
    Ok(())
}

/// `<dir of db>/backups/mc-proxy-<UTC YYYYMMDDTHHMMSSZ>.db`; creates
/// `backups/` (0700) if missing.
fn default_output(db_path: &Path, now: SystemTime) -> Result<PathBuf, StoreError> {
    let dir = db_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("backups");
    match DirBuilder::new().mode(BACKUP_DIR_MODE).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(source) => return Err(StoreError::Io { path: dir, source }),
    }
    Ok(dir.join(format!("mc-proxy-{}.db", compact_utc(now))))
}

/// `2025-01-31T12:00:00Z` → `20250131T120000Z`.
fn compact_utc(now: SystemTime) -> String {
    humantime::format_rfc3339_seconds(now)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamp_is_compact_utc() {
        let t = UNIX_EPOCH + Duration::from_secs(1_738_324_800 + 3_723);
        assert_eq!(compact_utc(t), "20250131T130203Z");
    }
}
