//! Established QUIC flows carried over a handoff (SPEC §6.4 for QUIC): the
//! old process's listener tasks hand over their open flows — each its
//! backend socket (the descriptor, passed with SCM_RIGHTS by the handoff)
//! and what the table knew of it — and the new process's tasks take them
//! in, so that a QUIC connection through the proxy survives an upgrade.
//!
//! [`Carriers`] is the way to every QUIC listener task of a process, for
//! the handoff code: [`Carriers::export`] on the old side (each task stops
//! reading its socket and hands its open flows; pending ones end), and
//! [`Carriers::import`] on the new side. [`Carried`] is one flow, with its
//! one-line text form for the handoff connection.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use wire::quic::ConnectionId;

/// One established flow, as handed over: its line and its socket.
#[derive(Debug)]
pub struct Carried {
    pub flow: FlowLine,
    /// The flow's own socket, connected to the backend.
    pub socket: OwnedFd,
}

/// What a `flow` line says of a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowLine {
    /// The listener's `addr` as written in the config.
    pub listener: String,
    /// Where the client's datagrams come from and replies go.
    pub client: SocketAddr,
    pub client_cid: Option<ConnectionId>,
    pub server_cid: Option<ConnectionId>,
    pub sni: Option<String>,
    /// The route's hostname (exact, wildcard or `*`).
    pub route: String,
    /// The backend the flow goes to, as the route names it.
    pub backend: String,
    pub up: u64,
    pub down: u64,
    /// How long the flow has existed.
    pub age: Duration,
    pub replied: bool,
}

fn cid_text(cid: Option<&ConnectionId>) -> String {
    cid.map_or_else(|| "-".to_string(), ToString::to_string)
}

fn parse_cid(text: &str) -> Option<Option<ConnectionId>> {
    if text == "-" {
        return Some(None);
    }
    if text.len() % 2 != 0 || text.len() > 2 * wire::quic::MAX_CID_LEN {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    ConnectionId::new(&bytes?).map(Some)
}

/// A field that must not be empty or hold a space (the line's separator).
fn word(text: &str) -> Option<&str> {
    (!text.is_empty() && !text.contains(char::is_whitespace)).then_some(text)
}

impl Carried {
    /// The flow's line (see [`FlowLine::line`]).
    pub fn line(&self) -> Option<String> {
        self.flow.line()
    }

    /// A `flow` line and the descriptor that came with it. `None` (the
    /// descriptor closed) if the line does not parse.
    pub fn parse(line: &str, socket: OwnedFd) -> Option<Carried> {
        FlowLine::parse(line).map(|flow| Carried { flow, socket })
    }
}

impl FlowLine {
    /// `flow LISTENER CLIENT CLIENT_CID SERVER_CID SNI ROUTE BACKEND UP DOWN AGE_MS REPLIED`
    /// (`-` for an absent CID or SNI). `None` if a field cannot be written
    /// on one line (a listener text with a space).
    pub fn line(&self) -> Option<String> {
        let listener = word(&self.listener)?;
        let sni = self.sni.as_deref().and_then(word).unwrap_or("-");
        Some(format!(
            "flow {listener} {} {} {} {sni} {} {} {} {} {} {}",
            self.client,
            cid_text(self.client_cid.as_ref()),
            cid_text(self.server_cid.as_ref()),
            word(&self.route)?,
            word(&self.backend)?,
            self.up,
            self.down,
            self.age.as_millis(),
            u8::from(self.replied),
        ))
    }

    /// A `flow` line; `None` if it does not parse (a field missing, extra,
    /// empty or out of range).
    pub fn parse(line: &str) -> Option<FlowLine> {
        let mut fields = line.strip_prefix("flow ")?.split(' ');
        let mut next = || fields.next().and_then(word);
        let listener = next()?.to_string();
        let client = next()?.parse().ok()?;
        let client_cid = parse_cid(next()?)?;
        let server_cid = parse_cid(next()?)?;
        let sni = match next()? {
            "-" => None,
            sni => Some(sni.to_string()),
        };
        let route = next()?.to_string();
        let backend = next()?.to_string();
        let up = next()?.parse().ok()?;
        let down = next()?.parse().ok()?;
        let age = Duration::from_millis(next()?.parse().ok()?);
        let replied = match next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        if next().is_some() {
            return None;
        }
        Some(FlowLine {
            listener,
            client,
            client_cid,
            server_cid,
            sni,
            route,
            backend,
            up,
            down,
            age,
            replied,
        })
    }
}

/// What the handoff asks of a listener task.
pub(super) enum Control {
    /// Stop reading and hand over the open flows.
    Export(oneshot::Sender<Vec<Carried>>),
    /// Take these flows in.
    Import(Vec<Carried>),
}

/// A listener task's `addr` text and its control channel.
type Task = (String, mpsc::UnboundedSender<Control>);

/// The way to this process's QUIC listener tasks (filled as they start).
#[derive(Clone, Default)]
pub struct Carriers {
    tasks: Arc<Mutex<Vec<Task>>>,
}

impl Carriers {
    /// A task for the listener `addr` text: its end of the control channel.
    pub(super) fn register(&self, listener: &str) -> mpsc::UnboundedReceiver<Control> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().push((listener.to_string(), tx));
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Task>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every task stops reading its socket and hands over its open flows
    /// (a task that has ended hands none).
    pub async fn export(&self) -> Vec<Carried> {
        let asked: Vec<_> = self
            .lock()
            .iter()
            .filter_map(|(_, tx)| {
                let (answer, answered) = oneshot::channel();
                tx.send(Control::Export(answer)).ok().map(|()| answered)
            })
            .collect();
        let mut flows = Vec::new();
        for answered in asked {
            if let Ok(more) = answered.await {
                flows.extend(more);
            }
        }
        flows
    }

    /// Hands each flow to its listener's task; returns how many were
    /// handed (the rest, for listeners this process does not serve with
    /// QUIC, are closed).
    pub fn import(&self, flows: Vec<Carried>) -> usize {
        let tasks = self.lock();
        let mut by_listener: Vec<(usize, Vec<Carried>)> = Vec::new();
        let mut dropped = 0;
        for flow in flows {
            match tasks
                .iter()
                .position(|(text, _)| *text == flow.flow.listener)
            {
                Some(i) => match by_listener.iter_mut().find(|(j, _)| *j == i) {
                    Some((_, list)) => list.push(flow),
                    None => by_listener.push((i, vec![flow])),
                },
                None => dropped += 1,
            }
        }
        let mut handed = 0;
        for (i, list) in by_listener {
            let count = list.len();
            if tasks[i].1.send(Control::Import(list)).is_ok() {
                handed += count;
            }
        }
        if dropped > 0 {
            tracing::info!(
                flows = dropped,
                "handoff: QUIC flows of listeners without quic here were closed"
            );
        }
        handed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
    }

    #[test]
    fn a_flow_line_round_trips() {
        let flow = FlowLine {
            listener: "[::1]:443".into(),
            client: "[2001:db8::1]:5000".parse().unwrap(),
            client_cid: ConnectionId::new(&[1, 2, 3, 4, 5, 6, 7, 8]),
            server_cid: None,
            sni: Some("a.example".into()),
            route: "*.example".into(),
            backend: "backend.internal:443".into(),
            up: 12,
            down: 3_000_000_000,
            age: Duration::from_millis(1234),
            replied: true,
        };
        let line = flow.line().unwrap();
        assert_eq!(
            line,
            "flow [::1]:443 [2001:db8::1]:5000 0102030405060708 - a.example *.example backend.internal:443 12 3000000000 1234 1"
        );
        let back = Carried::parse(&line, fd()).unwrap();
        assert_eq!(back.flow, flow);
        assert_eq!(back.line().unwrap(), line);
    }

    #[test]
    fn malformed_flow_lines_are_refused() {
        let good = "flow :443 127.0.0.1:5 0102030405060708 - - * 10.0.0.1:443 0 0 0 0";
        assert!(Carried::parse(good, fd()).is_some());
        for bad in [
            "",
            "flow",
            "flow :443",
            "flow :443 127.0.0.1:5 0102030405060708 - - * 10.0.0.1:443 0 0 0",
            "flow :443 127.0.0.1:5 0102030405060708 - - * 10.0.0.1:443 0 0 0 0 extra",
            "flow :443 127.0.0.1:5 0102030405060708 - - * 10.0.0.1:443 0 0 0 2",
            "flow :443 nowhere 0102030405060708 - - * 10.0.0.1:443 0 0 0 0",
            "flow :443 127.0.0.1:5 010 - - * 10.0.0.1:443 0 0 0 0",
            "flow :443 127.0.0.1:5 zz - - * 10.0.0.1:443 0 0 0 0",
            &format!(
                "flow :443 127.0.0.1:5 {} - - * 10.0.0.1:443 0 0 0 0",
                "00".repeat(21)
            ),
            "flow :443 127.0.0.1:5 0102030405060708 - - * 10.0.0.1:443 -1 0 0 0",
            "flow :443  127.0.0.1:5 0102030405060708 - - * 10.0.0.1:443 0 0 0 0",
            "listener :443",
        ] {
            assert!(Carried::parse(bad, fd()).is_none(), "{bad:?}");
        }
    }
}
