//! How a connection ended: the `outcome=` field of its close log line and,
//! without a block's rule, the `outcome` label of the closed-connections
//! metric. Below both the proxy (which decides it) and the metrics (which
//! count it).

use std::fmt;

use crate::firewall::BlockReason;

wire::labelled_enum! {
    /// How a connection ended. The label is the `outcome` label of the
    /// closed-connections metric; `Display` gives the `outcome=` field of the
    /// log line (the label, and for a block its reason: `blocked:rate`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Outcome {
        Relayed => "relayed",
        Blocked(BlockReason) => "blocked",
        NoRoute => "no_route",
        BadHello => "bad_hello",
        /// A `proxy_protocol` listener got no valid PROXY header.
        BadProxyHeader => "bad_proxy_header",
        HelloTimeout => "hello_timeout",
        /// L7: a request's headers not complete within handshake_timeout
        /// of their first byte (or of the TLS handshake, for the first).
        HeaderTimeout => "header_timeout",
        BackendUnreachable => "backend_unreachable",
        /// An L7 route's TLS handshake failed (or its certificate is not
        /// loaded): the client got a TLS alert or a close.
        TlsFailed => "tls_failed",
        IdleTimeout => "idle_timeout",
        Shutdown => "shutdown",
        /// QUIC only: the SNI names an L7 route, which cannot take QUIC
        /// (SPEC §6.5); the flow's datagrams are dropped.
        L7Route => "l7_route",
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Blocked(reason) => write!(f, "{}:{reason}", self.label()),
            _ => f.write_str(self.label()),
        }
    }
}
