//! How a connection ended: the `outcome=` field of its close log line and,
//! without a block's rule, the `outcome` label of the closed-connections
//! metric. Below both the proxy (which decides it) and the metrics (which
//! count it).

use std::fmt;

use crate::firewall::BlockReason;

/// How a connection ended; the `outcome=` field of its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Relayed,
    Blocked(BlockReason),
    NoRoute,
    BadHello,
    /// A `proxy_protocol` listener got no valid PROXY header.
    BadProxyHeader,
    HelloTimeout,
    BackendUnreachable,
    IdleTimeout,
    Shutdown,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Relayed => f.write_str("relayed"),
            Outcome::Blocked(reason) => write!(f, "blocked:{reason}"),
            Outcome::NoRoute => f.write_str("no_route"),
            Outcome::BadHello => f.write_str("bad_hello"),
            Outcome::BadProxyHeader => f.write_str("bad_proxy_header"),
            Outcome::HelloTimeout => f.write_str("hello_timeout"),
            Outcome::BackendUnreachable => f.write_str("backend_unreachable"),
            Outcome::IdleTimeout => f.write_str("idle_timeout"),
            Outcome::Shutdown => f.write_str("shutdown"),
        }
    }
}

impl Outcome {
    /// The outcome without a block's rule: the `outcome` label of the
    /// closed-connections metric, indexed by [`Outcome::index`].
    pub const LABELS: [&'static str; 9] = [
        "relayed",
        "blocked",
        "no_route",
        "bad_hello",
        "bad_proxy_header",
        "hello_timeout",
        "backend_unreachable",
        "idle_timeout",
        "shutdown",
    ];

    pub fn index(self) -> usize {
        match self {
            Outcome::Relayed => 0,
            Outcome::Blocked(_) => 1,
            Outcome::NoRoute => 2,
            Outcome::BadHello => 3,
            Outcome::BadProxyHeader => 4,
            Outcome::HelloTimeout => 5,
            Outcome::BackendUnreachable => 6,
            Outcome::IdleTimeout => 7,
            Outcome::Shutdown => 8,
        }
    }
}
