//! mc-proxy's bottom layer: what the proxy reads off the wire and the value
//! types its tables are made of. Pure: no I/O, no async runtime, no global
//! state, and no dependency on the `mc-proxy` crate (the compiler holds this
//! layer: nothing here can reach up into the server).
//!
//! - [`proxy_protocol`]: the PROXY v1/v2 header read first on a
//!   `proxy_protocol` listener, and the v2 header written to backends.
//! - [`hello`]: the ClientHello reader: bytes in, need-more / done / reject
//!   out.
//! - [`quic`]: the QUIC Initial reader: a client's first datagrams in,
//!   need-more / done (the ClientHello's SNI and ALPN) / reject out.
//! - [`route`]: normalised hostnames, backends, and the immutable
//!   hostname → target map a lookup runs on.
//! - [`rule`]: firewall rule values (IP, CIDR, country code, user-agent
//!   pattern).
//! - [`authority`]: the admin Unix socket's HTTP/2 `:authority` rewriter
//!   (client → server frames in, the same frames with header blocks
//!   re-encoded out).
//! - [`labelled_enum!`]: an enum's metric labels and the index into them,
//!   derived from one list.
//!
//! With the `testing` feature: `hello::build` (hand-built ClientHellos),
//! `quic::build` (hand-built, encrypted client Initials), `hello::checks`,
//! `quic::checks` and `authority::checks` (the properties shared by the
//! fuzz targets and the corpus replay).
#![forbid(unsafe_code)]

mod labels;

pub mod authority;
pub mod hello;
pub mod proxy_protocol;
pub mod quic;
pub mod route;
pub mod rule;
