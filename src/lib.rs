//! mc-proxy: a Layer 4 TLS SNI proxy and router.
//!
//! # Layout
//!
//! A reader following one connection walks the modules in this order:
//!
//! - [`config`]: TOML → validated [`config::Config`]; the only place raw
//!   strings from the config are parsed.
//! - [`firewall`]: rule set (IP, CIDR, GeoIP country) and per-IP rate limit →
//!   allow or block, decided before a byte is read.
//! - [`hello`]: the ClientHello reader: bytes in, need-more / done / reject
//!   out; no I/O.
//! - [`routes`]: normalised hostnames, backends and per-listener tables that
//!   readers load without waiting.
//! - [`proxy`]: accept loops, one connection's pipeline, the relay.
//! - [`store`]: SQLite: migrations, seeding, write-through changes, snapshot.
//! - [`admin`]: the gRPC admin API server and the client the CLI uses.
//! - [`shutdown`]: signals, drain, force-close.
#![deny(unsafe_code)]

pub mod admin;
pub mod config;
pub mod firewall;
pub mod hello;
pub mod logging;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod shutdown;
pub mod store;
