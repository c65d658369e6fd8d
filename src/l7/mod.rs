//! L7 routes (SPEC §6.2): TLS terminated here with the route's certificate,
//! HTTP/1.1 and HTTP/2 (gRPC included) reverse-proxied to the backend.
//!
//! - [`certs`]: a route's certificate chain and key, read and checked.

//! - [`registry`]: the certificates in service, reloaded on change.
//!
//! The HTTP side (the TLS handshake, the server, the upstream pools) is
//! `proxy::http`, a branch of one connection's pipeline.

pub mod certs;
pub mod registry;
