//! systemd socket activation (SPEC §6.4): listening sockets passed with
//! `LISTEN_FDS` (a `.socket` unit, `systemd-socket-activate`) are matched to
//! the config's `[[listeners]]` by address, and the server serves on them
//! instead of binding. Listeners not passed are bound as usual; a passed
//! socket that no listener names is logged and closed.
//!
//! The descriptors are taken with the `listenfd` crate (it checks each is a
//! socket of the expected type; `LISTEN_PID`, when set, must be ours).
//! Because systemd keeps the sockets open across a restart of the service,
//! connections that arrive while the process is down wait in the backlog
//! instead of being refused.

use std::net::{SocketAddr, TcpListener};

use crate::config::{BindAddr, ListenerConfig};

/// What the environment passed, sorted out.
#[derive(Debug, Default)]
pub struct Activated {
    /// Listener `addr` text → its socket, for `App::build_with`.
    pub matched: Vec<(String, TcpListener)>,
    /// Passed sockets no listener names (already closed), or descriptors
    /// that are not TCP listening sockets: what to say about each.
    pub ignored: Vec<String>,
}

/// The address a listener's socket has once bound.
fn local_addr_of(listener: &ListenerConfig) -> SocketAddr {
    listener.addr.bind.socket_addr()
}

/// Whether a passed socket bound to `local` is the one `listener` names:
/// the same address, or for `":PORT"` (every interface) a socket on
/// `[::]:PORT` or `0.0.0.0:PORT`.
pub(crate) fn names(listener: &ListenerConfig, local: SocketAddr) -> bool {
    match listener.addr.bind {
        BindAddr::AllInterfaces(port) => local.port() == port && local.ip().is_unspecified(),
        BindAddr::Socket(_) => local_addr_of(listener) == local,
    }
}

/// Takes the sockets passed in `LISTEN_FDS` and matches them to
/// `listeners` (none passed: nothing matched, nothing ignored).
pub fn from_env(listeners: &[ListenerConfig]) -> Activated {
    let mut fds = listenfd::ListenFd::from_env();
    let mut activated = Activated::default();
    for index in 0..fds.len() {
        let fd = 3 + index;
        let socket = match fds.take_tcp_listener(index) {
            Ok(Some(socket)) => socket,
            Ok(None) => continue,
            Err(e) => {
                activated
                    .ignored
                    .push(format!("fd {fd}: not a TCP listening socket ({e})"));
                continue;
            }
        };
        let local = match socket.local_addr() {
            Ok(local) => local,
            Err(e) => {
                activated.ignored.push(format!("fd {fd}: {e}"));
                continue;
            }
        };
        let taken = |text: &str| activated.matched.iter().any(|(t, _)| t == text);
        match listeners
            .iter()
            .find(|l| names(l, local) && !taken(&l.addr.text))
        {
            Some(listener) => activated.matched.push((listener.addr.text.clone(), socket)),
            None => activated.ignored.push(format!(
                "fd {fd}: {local} is no [[listeners]] addr of the config: closed"
            )),
        }
    }
    activated
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ListenAddr;

    fn listener(text: &str) -> ListenerConfig {
        ListenerConfig {
            addr: ListenAddr::parse(text).unwrap(),
            proxy_protocol: false,
            quic: false,
            routes: Vec::new(),
        }
    }

    #[test]
    fn a_socket_matches_the_listener_of_its_address() {
        let any = listener(":443");
        assert!(names(&any, "[::]:443".parse().unwrap()));
        assert!(names(&any, "0.0.0.0:443".parse().unwrap()));
        assert!(!names(&any, "127.0.0.1:443".parse().unwrap()));
        assert!(!names(&any, "[::]:444".parse().unwrap()));
        let one = listener("127.0.0.1:8443");
        assert!(names(&one, "127.0.0.1:8443".parse().unwrap()));
        assert!(!names(&one, "0.0.0.0:8443".parse().unwrap()));
        let v6 = listener("[::1]:8443");
        assert!(names(&v6, "[::1]:8443".parse().unwrap()));
    }
}
