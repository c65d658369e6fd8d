//! Listening sockets, accept loops and the per-connection pipeline.
//!
//! Owns: binding (dual stack for `":PORT"`), the accept loop (which never dies
//! and never spins on EMFILE and friends), and spawning one task per
//! connection ([`conn`]), whose backend connect lives in [`connect`] and
//! relay in [`relay`].
//!
//! The accept loop takes a slot of the global connection cap
//! ([`capacity`], `[proxy] max_connections`) before each `accept`, and the
//! connection's task holds it to the end: at the cap the loop waits instead
//! of accepting, so the kernel's backlog holds new clients and nothing is
//! accepted only to be dropped. While it waits, the slot it will use is
//! reserved for it, so with N listeners up to N slots are held by loops
//! waiting for a client.

pub mod activation;
pub mod capacity;
pub mod conn;
pub mod connect;
pub mod http;
mod listener;
pub mod probe;
pub mod quic;
pub mod relay;
mod sys;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use crate::config::{BindAddr, ListenAddr};
use crate::metrics::ActiveGuard;
use crate::net::next_accept_backoff;
use crate::shutdown::Shutdown;
pub use listener::Listener;

/// Pending connections the kernel queues for us.
const BACKLOG: i32 = 4096;

/// Binds a listening socket. `":PORT"` is one dual-stack IPv6 socket that
/// also accepts IPv4 (as mapped addresses, judged as IPv4 by the firewall).
pub fn bind(addr: &ListenAddr) -> io::Result<std::net::TcpListener> {
    let sockaddr = addr.bind.socket_addr();
    let socket = Socket::new(
        Domain::for_address(sockaddr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    match addr.bind {
        BindAddr::AllInterfaces(_) => socket.set_only_v6(false)?,
        BindAddr::Socket(SocketAddr::V6(_)) => socket.set_only_v6(true)?,
        BindAddr::Socket(SocketAddr::V4(_)) => {}
    }
    // Linux hands TCP_NODELAY down to every accepted socket: one setsockopt
    // here instead of one per connection (conn.rs sets it elsewhere).
    socket.set_tcp_nodelay(true)?;
    socket.bind(&sockaddr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Accepts until the server starts draining, then drops the listening socket
/// (new connections are refused at once).
pub async fn accept_loop(socket: TcpListener, listener: Arc<Listener>, shutdown: Shutdown) {
    let mut backoff = Duration::ZERO;
    // The wait for draining is made once, not per accept.
    let draining = shutdown.draining().cancelled();
    tokio::pin!(draining);
    let addr = listener.routes.addr().to_string();
    loop {
        // A slot first: at the cap, wait here (clients queue in the
        // backlog) rather than accept and drop.
        let slot = tokio::select! {
            biased;
            () = &mut draining => break,
            slot = listener.capacity.slot(&addr) => slot,
        };
        let Some(slot) = slot else {
            tracing::error!(listener = %addr, "connection slots closed; accept loop ends");
            break;
        };
        let accepted = tokio::select! {
            biased;
            () = &mut draining => break,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::ZERO;
                // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d;
                // they are IPv4 clients everywhere (firewall, logs).
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                let active = ActiveGuard::accept(&listener.listener_stats);
                let listener = listener.clone();
                let forced = shutdown.forced().clone();
                let draining = shutdown.draining().clone();
                shutdown.spawn(async move {
                    conn::handle(stream, peer, listener, forced, draining).await;
                    drop(active);
                    drop(slot);
                });
            }
            Err(e) if is_per_connection(&e) => {
                // The peer gave up between SYN and accept: nothing to do.
                tracing::debug!(listener = %listener.routes.addr(), error = %e, "accept");
            }
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM: the pending connection stays
                // queued; wait for resources instead of spinning.
                backoff = next_accept_backoff(backoff);
                tracing::warn!(
                    listener = %listener.routes.addr(),
                    error = %e,
                    backoff_ms = backoff.as_millis() as u64,
                    "accept failed; backing off"
                );
                tokio::select! {
                    () = &mut draining => break,
                    () = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
    tracing::debug!(listener = %listener.routes.addr(), "listening socket closed");
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || matches!(e.raw_os_error(), Some(libc::EPROTO) | Some(libc::EPERM))
}

#[cfg(test)]
mod tests {
    use socket2::SockRef;

    use super::bind;
    use crate::config::ListenAddr;

    /// The relay relies on this: accepted client sockets get TCP_NODELAY
    /// from the listener (on Linux), not from a setsockopt per connection.
    #[cfg(target_os = "linux")]
    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let addr = ListenAddr::parse("127.0.0.1:0").expect("address");
        let listener = bind(&addr).expect("bind");
        listener.set_nonblocking(false).expect("blocking");
        let local = listener.local_addr().expect("local address");
        let _client = std::net::TcpStream::connect(local).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        assert!(
            SockRef::from(&accepted).tcp_nodelay().expect("getsockopt"),
            "the accepted socket has Nagle's algorithm on"
        );
    }
}
