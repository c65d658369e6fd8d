//! The live route certificates: one entry per (certificate, key) pair of
//! files that an L7 route names, each with its own TLS server config.
//!
//! Owns: loading an entry the first time a route needs it (a leaf-only
//! chain is warned about then), re-reading its files when they change on
//! disk (rename included; polled) or on SIGHUP, and dropping entries no
//! route names any more. A broken new file is logged and refused: the entry
//! keeps serving the certificate it had. Connections already established
//! keep their session; the next handshake gets the new certificate.
//!
//! Never: blocks a handshake on disk I/O once an entry is loaded (the
//! handshake reads the current certificate through an `ArcSwap`), or takes
//! a lock on the lookup path (the map is swapped whole on change).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::sync::watch;

use super::certs::{self, CertError};
use crate::routes::{L7Route, Routes};

/// ALPN protocols an L7 route offers, in preference order.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The files an entry is read from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    pub fn of(route: &L7Route) -> CertFiles {
        CertFiles {
            cert: route.tls_cert.clone(),
            key: route.tls_key.clone(),
        }
    }

    /// Whether `route` names these files.
    pub fn named_by(&self, route: &L7Route) -> bool {
        self.cert == route.tls_cert && self.key == route.tls_key
    }
}

impl fmt::Display for CertFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} + {}", self.cert.display(), self.key.display())
    }
}

/// What identifies one version of a file on disk: a change to any of
/// these (a rename over it changes the inode) means it is read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        mtime: meta.mtime(),
        mtime_nsec: meta.mtime_nsec(),
    })
}

fn stamps(files: &CertFiles) -> (Option<Stamp>, Option<Stamp>) {
    (stamp(&files.cert), stamp(&files.key))
}

/// One certificate in service.
pub struct CertEntry {
    files: CertFiles,
    current: Arc<ArcSwap<CertifiedKey>>,
    config: Arc<ServerConfig>,
    /// The files' stamps when last read (successfully or not), so that a
    /// broken file is reported once, not at every poll.
    seen: Mutex<(Option<Stamp>, Option<Stamp>)>,
}

impl fmt::Debug for CertEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertEntry")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl CertEntry {
    pub fn files(&self) -> &CertFiles {
        &self.files
    }

    /// The TLS server config: this certificate, TLS 1.2 and 1.3, ALPN h2
    /// and http/1.1, the registry's session ticketer.
    pub fn server_config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// The certificate the next handshake gets.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

#[derive(Debug)]
struct Current(Arc<ArcSwap<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Every route certificate in service.
pub struct CertRegistry {
    entries: ArcSwap<HashMap<CertFiles, Arc<CertEntry>>>,
    /// Serialises loads and the map's replacement.
    writer: Mutex<()>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
}

impl fmt::Debug for CertRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertRegistry")
            .field("entries", &self.entries.load().len())
            .finish_non_exhaustive()
    }
}

/// Why the registry could not build a TLS config.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

impl CertRegistry {
    pub fn new() -> Result<CertRegistry, RegistryError> {
        Ok(CertRegistry {
            entries: ArcSwap::from_pointee(HashMap::new()),
            writer: Mutex::new(()),
            ticketer: rustls::crypto::ring::Ticketer::new()?,
        })
    }

    /// Entries in service.
    pub fn len(&self) -> usize {
        self.entries.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry for `route`'s files, loaded now if no route used them yet.
    pub fn get(&self, route: &L7Route) -> Result<Arc<CertEntry>, RegistryError> {
        let files = CertFiles::of(route);
        if let Some(entry) = self.entries.load().get(&files) {
            return Ok(entry.clone());
        }
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = self.entries.load().get(&files) {
            return Ok(entry.clone());
        }
        let seen = stamps(&files);
        let loaded = certs::load(&files.cert, &files.key)?;
        if loaded.leaf_only {
            tracing::warn!(
                cert = %files.cert.display(),
                "route certificate is a leaf only, not signed by itself: clients that lack its intermediate will fail; put the chain (leaf first) in the file"
            );
        }
        let current = Arc::new(ArcSwap::new(loaded.certified));
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Current(current.clone())));
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        config.ticketer = self.ticketer.clone();
        let entry = Arc::new(CertEntry {
            files: files.clone(),
            current,
            config: Arc::new(config),
            seen: Mutex::new(seen),
        });
        let mut map = HashMap::clone(&self.entries.load());
        map.insert(files.clone(), entry.clone());
        self.entries.store(Arc::new(map));
        tracing::info!(cert = %files.cert.display(), key = %files.key.display(), "route certificate loaded");
        Ok(entry)
    }

    /// Loads the certificate of every L7 route in `routes`; a failure is
    /// logged (that route's handshakes fail until its files are fixed).
    pub fn load_routes(&self, routes: &Routes) {
        for listener in routes.listeners() {
            for (hostname, target) in listener.snapshot().sorted() {
                if let Some(l7) = target.mode.l7() {
                    if let Err(e) = self.get(l7) {
                        tracing::error!(listener = %listener.addr(), %hostname, error = %e, "route certificate not loaded");
                    }
                }
            }
        }
    }

    /// Re-reads every entry whose files changed on disk (`force`: every
    /// entry), and drops entries no route of `routes` names. Returns how
    /// many entries took a new certificate.
    pub fn refresh(&self, routes: &Routes, force: bool) -> usize {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let named: HashSet<CertFiles> = routes
            .listeners()
            .iter()
            .flat_map(|l| l.snapshot().sorted())
            .filter_map(|(_, target)| target.mode.l7().map(|l7| CertFiles::of(l7)))
            .collect();
        let map = self.entries.load_full();
        if map.keys().any(|files| !named.contains(files)) {
            let kept: HashMap<_, _> = map
                .iter()
                .filter(|(files, _)| named.contains(*files))
                .map(|(f, e)| (f.clone(), e.clone()))
                .collect();
            self.entries.store(Arc::new(kept));
        }
        let mut reloaded = 0;
        for entry in self.entries.load().values() {
            let now = stamps(&entry.files);
            let mut seen = entry.seen.lock().unwrap_or_else(|e| e.into_inner());
            if !force && *seen == now {
                continue;
            }
            *seen = now;
            drop(seen);
            match certs::load(&entry.files.cert, &entry.files.key) {
                Ok(loaded) => {
                    if loaded.leaf_only {
                        tracing::warn!(cert = %entry.files.cert.display(), "route certificate is a leaf only, not signed by itself: clients that lack its intermediate will fail");
                    }
                    entry.current.store(loaded.certified);
                    reloaded += 1;
                    tracing::info!(cert = %entry.files.cert.display(), key = %entry.files.key.display(), "route certificate reloaded");
                }
                Err(e) => {
                    tracing::error!(cert = %entry.files.cert.display(), error = %e, "route certificate not reloaded; the previous one stays in service");
                }
            }
        }
        reloaded
    }

    /// Polls the files every `every` until `stop` turns true.
    pub fn spawn_watcher(
        self: &Arc<Self>,
        routes: Arc<Routes>,
        every: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let registry = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => break,
                    () = tokio::time::sleep(every) => {}
                }
                let registry = registry.clone();
                let routes = routes.clone();
                let _ = tokio::task::spawn_blocking(move || registry.refresh(&routes, false)).await;
            }
        });
    }
}
