//! mc-proxy: a Layer 4 TLS SNI proxy and router.
//!
//! # Layout
//!
//! A reader following one connection walks the modules in this order:
//!
//! - [`config`]: TOML → validated [`config::Config`]; the only place raw
//!   strings from the config are parsed.
//! - [`proxy_protocol`]: on a `proxy_protocol` listener, the PROXY v1/v2
//!   header read first (the client address the rest judges and logs); the
//!   v2 header written to backends of `send_proxy_protocol` routes. No I/O.
//! - [`firewall`]: rule set (IP, CIDR, GeoIP country) and per-IP rate limit →
//!   allow or block, decided before a byte is read.
//! - [`hello`]: the ClientHello reader: bytes in, need-more / done / reject
//!   out; no I/O.
//! - [`routes`]: normalised hostnames, backends and per-listener tables that
//!   readers load without waiting.
//! - [`proxy`]: accept loops, one connection's pipeline, the relay.
//! - [`store`]: SQLite: migrations, seeding, write-through changes, snapshot.
//! - [`admin`]: the gRPC admin API server and the client the CLI uses.
//! - [`metrics`]: Prometheus metrics (per-listener handles resolved at
//!   start) and the optional `/metrics` endpoint.
//! - [`shutdown`]: signals, drain, force-close.
#![deny(unsafe_code)]

pub mod admin;
pub mod config;
pub mod firewall;
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
