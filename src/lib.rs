//! mc-proxy: a TLS SNI proxy and router (L4 relay, L7 TLS termination and HTTP proxying).
//!
//! # Layout
//!
//! Two crates. The bottom layer is the `wire` crate (`crates/wire`), pure
//! and without I/O, which cannot depend on this one:
//!
//! - `wire::proxy_protocol` (re-exported as [`proxy_protocol`]): on a
//!   `proxy_protocol` listener, the PROXY v1/v2 header read first (the
//!   client address the rest judges and logs); the v2 header written to
//!   backends of `send_proxy_protocol` routes.
//! - `wire::hello` (re-exported as [`hello`]): the ClientHello reader: bytes
//!   in, need-more / done / reject out.
//! - `wire::route`: normalised hostnames, backends, and the immutable
//!   hostname → target map with its lookup.
//! - `wire::rule`: firewall rule values and their text forms.
//! - `wire::labelled_enum!`: an enum's metric labels and index from one list.
//!
//! This crate, from the bottom up (a module imports only from modules listed
//! before it; ARCHITECTURE.md draws the graph). A reader following one
//! connection can start at [`proxy`]:
//!
//! - [`balance`]: backend pools' live state: which backend a connection
//!   tries and in what order, passive health, and the active-check
//!   schedule (`balance::health`; probes are the proxy's).
//! - [`routes`]: per-listener live tables that readers load without waiting
//!   (the `wire::route` values re-exported).
//! - [`l7`]: L7 route certificates: read and checked (`l7::certs`), and
//!   the ones in service, re-read on change and SIGHUP (`l7::registry`).
//! - [`config`]: TOML → validated [`config::Config`]; the only place raw
//!   strings from the config are parsed.
//! - [`logging`]: log output to stderr or journald through a bounded queue
//!   and one writer thread; the dropped-lines count.
//! - [`shutdown`]: signals, drain, force-close.
//! - [`net`]: the accept back-off both accept loops share.
//! - [`version`]: the version string.
//! - [`firewall`]: rule set (IP, CIDR, GeoIP country), per-IP rate limit
//!   and open-connection limit → allow or block, decided before a byte is
//!   read; and the user-agent rules that requests on L7 routes are checked
//!   against (`Firewall::blocks_user_agent`).
//! - [`store`]: SQLite: migrations, seeding, write-through changes, snapshot.
//! - [`outcome`]: how a connection ended (log field and metric label).
//! - [`metrics`]: Prometheus metrics (per-listener handles resolved at
//!   start), the live counters `GetStatus` reads ([`metrics::Stats`]), and
//!   the optional `/metrics` endpoint.
//! - [`proxy`]: accept loops, one connection's pipeline, the relay; for
//!   L7 routes, `proxy::http` (TLS termination, the HTTP server, the
//!   per-request phases and the upstream pools).
//! - [`admin`]: the gRPC admin API server and the client the CLI uses.
//! - [`handoff`]: the listening-socket handoff between an old and a new
//!   `mc-proxy server` (SCM_RIGHTS over a Unix socket beside the DB).
//! - [`server`]: `mc-proxy server`: wires the above together and serves
//!   until shutdown.
#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod config;
pub mod firewall;
pub mod handoff;
pub mod l7;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod outcome;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod shutdown;
pub mod store;

pub use wire::{hello, proxy_protocol};

/// The version: the crate version, plus `git describe` when built from a
/// checkout. `--version` and `GetStatus.version` print it as `mc-proxy VERSION`.
pub fn version() -> String {
    match option_env!("MC_PROXY_GIT_DESCRIBE") {
        Some(describe) if !describe.is_empty() => {
            format!("{} ({describe})", env!("CARGO_PKG_VERSION"))
        }
        _ => env!("CARGO_PKG_VERSION").to_string(),
    }
}
