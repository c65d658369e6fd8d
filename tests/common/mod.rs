//! Shared parts for the integration tests, one module per concern; the
//! tests `use common::*`.
//!
//! - [`pki`]: an rcgen CA, leaves, rustls client and server configs.
//! - [`backends`]: TLS and raw TCP backends on loopback.
//! - [`clients`]: TLS connect, reads with deadlines, chosen source
//!   addresses, `/metrics` GETs.
//! - [`process`]: the real binary (start, log channel, signals, CLI).
//! - [`fixtures`]: config text, GeoIP files, the DB on disk, the admin client.
//! - [`sys`]: /proc figures and descriptor limits.
//! - [`peers`]: nginx, curl, Python peers and Chromium for the binary's L7 routes.
//! - [`inproc`]: the server in-process (`App::build` on port 0).
//! - hand-built ClientHellos: `wire::hello::build` (the `testing` feature).
#![allow(dead_code, unused_imports)] // each test file uses a different part

pub mod backends;
pub mod clients;
pub mod fixtures;
pub mod http;
pub mod inproc;
pub mod peers;
pub mod pki;
pub mod process;
pub mod sys;

pub use backends::*;
pub use clients::*;
pub use fixtures::*;
pub use inproc::*;
pub use pki::*;
pub use process::*;
pub use sys::*;
pub use wire::hello::build::{client_hello, hello_message, records};
