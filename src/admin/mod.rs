//! The gRPC admin API (`mc_proxy.v1.ProxyAdminService`, `proto/`): the
//! service, its transports, and the client the CLI uses.
//!
//! - [`service`]: the handlers. Every input is validated here (errors name the
//!   field); every change goes through the [`Store`](crate::store::Store),
//!   which writes SQLite before the in-memory tables.
//! - [`server`]: transports. `unix:PATH` (mode 0660, stale socket replaced) or
//!   TCP with TLS 1.3 and optional mTLS. There is no plaintext TCP path.
//!   Health and reflection are served beside the admin service.
//! - [`authority`]: on the unix socket only, the shim between the socket and
//!   the HTTP/2 layer that accepts any `:authority` a gRPC client sends
//!   (C-core's percent-encoded socket path, grpc-java's raw path).
//! - [`client`]: connects the CLI to a running server over either transport.
//! - [`cli`]: the `status`, `routes` and `firewall` subcommands: call, print,
//!   return an exit status.
//! - [`status`]: gRPC status code names, shared by the service and the CLI.
//!
//! Never touches a connection in flight: route and rule changes affect the
//! next connection only.

pub mod authority;
pub mod cli;
pub mod client;
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto;
pub mod server;
pub mod service;
pub mod status;

pub use server::{serve, AdminError, AdminServer};
pub use service::AdminState;
