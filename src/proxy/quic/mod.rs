//! QUIC passthrough routed by SNI (SPEC §6.5): a `quic = true` listener's
//! UDP socket, its flow table and the datagram relay. One task per
//! listener does everything; there is no task per flow.
//!
//! # A flow's life
//!
//! 1. A datagram from an address and with connection IDs no flow knows
//!    starts a flow only if it is a v1/v2 Initial of at least 1,200 bytes
//!    and the firewall admits the client (else it is dropped, counted, and
//!    nothing is sent back: there is no RST in UDP). The flow is *pending*.
//! 2. A pending flow's datagrams are kept and fed to its
//!    [`wire::quic::InitialReader`] until the ClientHello is whole (CRYPTO
//!    frames reassembled across packets and datagrams). Its SNI picks the
//!    route (exact, wildcard, default; none → `no_route`, an L7 route →
//!    `l7_route`) and the pool picks the backend (healthy first).
//! 3. The flow gets a UDP socket of its own, connected to the backend, and
//!    is *established*: the kept datagrams are sent, then every datagram
//!    from the client goes out on that socket, and every datagram the
//!    backend sends back goes to the client from the listening socket.
//!    Long-header packets from the backend teach the table the server's
//!    connection ID, so a client that comes back from another address and
//!    port (NAT rebinding) is found by it, and its replies follow.
//! 4. The flow ends: pending for `handshake_timeout`, no reply from the
//!    backend within `connect_timeout` of being established (the backend is
//!    then marked failed, and the client's next Initial starts a new flow to
//!    the next healthy backend), or `idle_timeout` without a datagram either
//!    way. One log line, `flow closed`, with `transport=quic`.
//!
//! # Readiness without a task per flow
//!
//! The flows' backend sockets are registered in an epoll set of this
//! task's own (level-triggered, the flow's id as data); the epoll
//! descriptor itself is what tokio watches. A ready set is drained in
//! batches, so one busy flow cannot starve the others or the client side.
//!
//! # Bounds
//!
//! Flows (pending and established, all listeners) are capped by `[proxy]
//! max_quic_flows`; a pending flow keeps at most [`PENDING_FLOW_BYTES`] of
//! datagrams, and all pending flows of a listener at most
//! [`PENDING_BYTES`]. The datagram path allocates nothing: one receive
//! buffer per listener, reused.

mod carry;
mod table;

pub use carry::{Carried, Carriers, FlowLine};

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::epoll;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use wire::quic::{self, InitialHello, InitialReader, PacketKind, Parse, Peek};

use crate::balance::{self, Lease};
use crate::config::{BindAddr, ListenAddr};
use crate::metrics::{QuicDrop, QuicMetrics};
use crate::outcome::Outcome;
use crate::routes::{Hostname, Mode};
use crate::shutdown::Shutdown;

use super::listener::Listener;
use carry::Control;
use table::{FlowId, Table};

/// Datagram bytes one pending flow may keep (its ClientHello's CRYPTO data
/// is at most 64 KiB; this leaves room for the packets around it).
pub const PENDING_FLOW_BYTES: usize = quic::MAX_CRYPTO_LEN + 16 * 1024;

/// Datagram bytes all of one listener's pending flows may keep at once
/// (about 13,000 one-datagram partial hellos). A flow whose hello is still
/// incomplete when they are over it ends (`pending_limit`); one whose first
/// datagram holds the whole hello never waits, so it is never refused by
/// this.
pub const PENDING_BYTES: usize = 16 * 1024 * 1024;

/// Refused flows one listener keeps to absorb their clients' retransmits
/// (`State::Refused`); beyond it a refused flow is forgotten at once (its
/// retransmits are then refused, and logged, again).
pub const MAX_REFUSED: usize = 4096;

/// How long a backend that refused QUIC (ICMP port unreachable) or gave
/// no answer within `connect_timeout` is picked after the others for new
/// flows. Kept by the listener's task, apart from the backend's TCP health:
/// a QUIC failure never marks a backend down for TCP (a TCP-only backend
/// behind a `quic` listener is normal, and a client could send QUIC to any
/// name on purpose).
const QUIC_BACKOFF: Duration = Duration::from_secs(10);

/// Datagrams read from one socket before the task looks at the others.
const BATCH: usize = 64;

/// Backend sockets served per epoll round.
const EVENTS: usize = 256;

/// The listening socket's receive buffer asked for (the kernel caps it at
/// `net.core.rmem_max`).
const RECEIVE_BUFFER: usize = 4 * 1024 * 1024;

/// A flow socket's receive buffer asked for (see [`backend_socket`]).
const FLOW_RECEIVE_BUFFER: usize = 1024 * 1024;

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// The flow cap shared by every QUIC listener (`[proxy] max_quic_flows`).
#[derive(Debug)]
pub struct FlowBudget {
    max: u32,
    held: AtomicU32,
}

impl FlowBudget {
    pub fn new(max: u32) -> FlowBudget {
        FlowBudget {
            max,
            held: AtomicU32::new(0),
        }
    }

    fn take(&self) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < self.max).then_some(held + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
    }

    /// Flows held now over all listeners.
    pub fn held(&self) -> u32 {
        self.held.load(Ordering::Acquire)
    }
}

/// Binds the UDP socket of a `quic = true` listener: the listener's
/// address, on `port` (the TCP socket's, so `:0` gets the same port on
/// both).
pub fn bind(addr: &ListenAddr, port: u16) -> io::Result<StdUdpSocket> {
    let mut sockaddr = addr.bind.socket_addr();
    sockaddr.set_port(port);
    let socket = Socket::new(
        Domain::for_address(sockaddr),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    match addr.bind {
        BindAddr::AllInterfaces(_) => socket.set_only_v6(false)?,
        BindAddr::Socket(SocketAddr::V6(_)) => socket.set_only_v6(true)?,
        BindAddr::Socket(SocketAddr::V4(_)) => {}
    }
    // Best effort: a bigger buffer rides out bursts; the kernel may cap it.
    let _ = socket.set_recv_buffer_size(RECEIVE_BUFFER);
    socket.bind(&sockaddr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Binds a `quic = true` listener's TCP and UDP sockets together: for a
/// fixed port, both on it; for port 0, TCP on a port the kernel picks and
/// UDP on the same number, picked again (at most 32 times) while that
/// number is taken on UDP.
pub fn bind_pair(addr: &ListenAddr) -> io::Result<(std::net::TcpListener, StdUdpSocket)> {
    let mut tries = 0;
    loop {
        let tcp = super::bind(addr)?;
        let port = tcp.local_addr()?.port();
        match bind(addr, port) {
            Ok(udp) => return Ok((tcp, udp)),
            Err(e)
                if e.kind() == io::ErrorKind::AddrInUse
                    && addr.bind.socket_addr().port() == 0
                    && tries < 32 =>
            {
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A flow's state.
enum State {
    /// The ClientHello is not whole yet, or its backend's name is being
    /// resolved.
    Pending(Box<Pending>),
    /// Relaying through the flow's own socket, connected to the backend.
    Open(StdUdpSocket),
    /// Refused (no route, an L7 route, a bad hello) and logged: kept until
    /// `handshake_timeout` after it started, so that the client's
    /// retransmitted Initials are dropped without a line each.
    Refused,
}

struct Pending {
    reader: InitialReader,
    /// The flow's datagrams so far, end to end, and where each ends.
    datagrams: Vec<u8>,
    ends: Vec<u32>,
    /// Set once routed, while the backend's name resolves.
    resolving: bool,
}

struct Flow {
    state: State,
    /// When the flow started.
    started: Instant,
    /// Milliseconds (since the task's epoch) the state began: the start of
    /// the pending flow, or the time it was established.
    since: u64,
    /// Milliseconds (since the task's epoch) of the last datagram either way.
    last: u64,
    up: u64,
    down: u64,
    /// The route and the member of its pool the flow goes to.
    route: Option<Arc<balance::Route>>,
    member: u8,
    lease: Option<Lease>,
    sni: Option<Box<str>>,
    /// The client the firewall counted this flow against (when it keeps a
    /// per-client count).
    counted: Option<IpAddr>,
    /// The backend has sent a datagram.
    replied: bool,
}

impl Flow {
    fn backend(&self) -> Option<&balance::Member> {
        self.route
            .as_ref()
            .and_then(|route| route.pool.members().get(usize::from(self.member)))
    }
}

/// What ends a flow, with the detail for its log line.
struct End {
    outcome: Outcome,
    error: Option<String>,
}

impl End {
    fn new(outcome: Outcome) -> End {
        End {
            outcome,
            error: None,
        }
    }

    fn because(outcome: Outcome, error: impl Into<String>) -> End {
        End {
            outcome,
            error: Some(error.into()),
        }
    }
}

/// The task's state but the sockets (which the `select!` borrows).
struct Engine {
    listener: Arc<Listener>,
    budget: Arc<FlowBudget>,
    metrics: QuicMetrics,
    table: Table<Flow>,
    epoch: Instant,
    now: u64,
    pending_bytes: usize,
    scratch: Vec<u8>,
    resolved: mpsc::UnboundedSender<(FlowId, io::Result<SocketAddr>)>,
    /// The server drains: no new flows; the open ones run to their end.
    draining: bool,
    /// Flows in [`State::Refused`].
    refused: usize,
    /// Backends that failed QUIC, until when (ms since the epoch): see
    /// [`QUIC_BACKOFF`].
    failing: std::collections::HashMap<SocketAddr, u64>,
    /// Client addresses the firewall refused lately, until when: their
    /// retransmitted Initials are dropped without asking it again or a line
    /// each (at most [`MAX_REFUSED`], for `handshake_timeout`).
    blocked: std::collections::HashMap<SocketAddr, u64>,
}

/// Serves a `quic = true` listener's UDP socket. See the module docs.
///
/// Ends: when a handoff asks for the flows ([`Carriers::export`]: the open
/// ones are handed over, the rest end); or, once the server drains, at once
/// if a new process has taken over (`moved`: it reads the socket now),
/// else when the last flow has ended or the drain is forced.
///
/// The task is registered with `carriers` when this is called (not when
/// first polled), so that flows handed over right after the start find it.
pub fn serve(
    socket: UdpSocket,
    listener: Arc<Listener>,
    budget: Arc<FlowBudget>,
    carriers: &Carriers,
    moved: watch::Receiver<bool>,
    shutdown: Shutdown,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let control = carriers.register(listener.routes.addr());
    run(socket, listener, budget, control, moved, shutdown)
}

async fn run(
    socket: UdpSocket,
    listener: Arc<Listener>,
    budget: Arc<FlowBudget>,
    mut control: mpsc::UnboundedReceiver<Control>,
    moved: watch::Receiver<bool>,
    shutdown: Shutdown,
) {
    let addr = listener.routes.addr().to_string();
    let poller = match epoll::create(epoll::CreateFlags::CLOEXEC)
        .map_err(io::Error::from)
        .and_then(watch)
    {
        Ok(poller) => poller,
        Err(e) => {
            tracing::error!(listener = %addr, error = %e, "QUIC: cannot create the epoll set; UDP not served");
            return;
        }
    };
    let (resolved, mut resolved_rx) = mpsc::unbounded_channel();
    let timeouts = &listener.timeouts;
    let shortest = timeouts
        .idle_timeout
        .min(timeouts.handshake_timeout)
        .min(timeouts.connect_timeout);
    let mut tick = tokio::time::interval(
        (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut engine = Engine {
        metrics: listener.listener_stats.metrics.quic.clone(),
        listener: listener.clone(),
        budget,
        table: Table::default(),
        epoch: Instant::now(),
        now: 0,
        pending_bytes: 0,
        scratch: Vec::new(),
        resolved,
        draining: false,
        refused: 0,
        failing: std::collections::HashMap::new(),
        blocked: std::collections::HashMap::new(),
    };
    let mut buffer = vec![0u8; MAX_DATAGRAM].into_boxed_slice();
    let draining = shutdown.draining().cancelled();
    let forced = shutdown.forced().cancelled();
    tokio::pin!(draining, forced);
    loop {
        if engine.draining && engine.table.len() == 0 {
            break;
        }
        tokio::select! {
            biased;
            () = &mut forced => break,
            () = &mut draining, if !engine.draining => {
                if *moved.borrow() {
                    break;
                }
                engine.draining = true;
            }
            Some(asked) = control.recv() => match asked {
                Control::Export(answer) => {
                    engine.clock();
                    let flows = engine.export(poller.get_ref());
                    let _ = answer.send(flows);
                    break;
                }
                Control::Import(flows) => {
                    engine.clock();
                    engine.import(flows, poller.get_ref());
                }
            },
            ready = socket.readable() => {
                if let Err(e) = ready {
                    tracing::error!(listener = %addr, error = %e, "QUIC: listening socket failed");
                    break;
                }
                engine.clock();
                engine.read_clients(&socket, poller.get_ref(), &mut buffer);
            }
            ready = poller.readable() => {
                let Ok(mut guard) = ready else { break };
                engine.clock();
                if engine.read_backends(&socket, poller.get_ref(), &mut buffer) {
                    guard.clear_ready();
                }
            }
            Some((id, result)) = resolved_rx.recv() => {
                engine.clock();
                engine.resolved(id, result, poller.get_ref());
            }
            _ = tick.tick() => {
                engine.clock();
                engine.sweep();
            }
        }
    }
    for id in engine.table.ids() {
        engine.close(id, End::new(Outcome::Shutdown));
    }
    tracing::debug!(listener = %addr, "QUIC socket closed");
}

impl Engine {
    fn clock(&mut self) {
        self.now = self.epoch.elapsed().as_millis() as u64;
    }

    /// Reads the listening socket: at most [`BATCH`] datagrams, then the
    /// loop looks at the other sources (the socket is still readable).
    fn read_clients(&mut self, socket: &UdpSocket, poller: &OwnedFd, buffer: &mut [u8]) {
        for _ in 0..BATCH {
            match socket.try_recv_from(buffer) {
                Ok((n, from)) => self.client_datagram(&buffer[..n], from, poller),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // ICMP errors for earlier replies, and the like: not a
                    // reason to stop reading.
                    tracing::debug!(listener = %self.listener.routes.addr(), error = %e, "QUIC recv");
                }
            }
        }
    }

    /// A client's datagram: its flow by connection ID first (one client
    /// address and port may carry several connections: a QUIC endpoint
    /// reuses its socket), else a new flow if it is an Initial, else the
    /// flow of its address.
    fn client_datagram(&mut self, datagram: &[u8], from: SocketAddr, poller: &OwnedFd) {
        if let Some(id) = self.table.by_datagram(datagram) {
            if self.table.addr(id) != Some(from) {
                // A known connection ID from another address: NAT
                // rebinding. Only an established flow follows (a pending
                // one has nothing to follow yet); replies go to the new
                // address unless another flow has it.
                let open = self
                    .table
                    .get(id)
                    .is_some_and(|flow| matches!(flow.state, State::Open(_)));
                if !open {
                    return self.metrics.dropped(QuicDrop::NoFlow);
                }
                self.table.move_addr(id, from);
            }
            return self.forward(id, datagram, poller);
        }
        if let Peek::Long(header) = quic::peek(datagram) {
            if header.kind == PacketKind::Initial {
                return self.start(datagram, header.dcid, from, poller);
            }
        }
        match self.table.by_addr(&from) {
            Some(id) => self.forward(id, datagram, poller),
            None => self.metrics.dropped(QuicDrop::NoFlow),
        }
    }

    /// A client Initial (DCID `dcid`) that no flow knows: a new flow, if
    /// the client is admitted.
    fn start(
        &mut self,
        datagram: &[u8],
        dcid: quic::ConnectionId,
        from: SocketAddr,
        poller: &OwnedFd,
    ) {
        if self.draining {
            return self.metrics.dropped(QuicDrop::NoFlow);
        }
        if datagram.len() < quic::MIN_INITIAL_DATAGRAM_LEN {
            return self.metrics.dropped(QuicDrop::ShortInitial);
        }
        if self
            .blocked
            .get(&from)
            .is_some_and(|&until| until > self.now)
        {
            return;
        }
        let client = SocketAddr::new(from.ip().to_canonical(), from.port());
        let counted = match self.listener.firewall.admit_flow(client.ip()) {
            Ok(counted) => counted.then_some(client.ip()),
            Err(reason) => {
                if self.blocked.len() < MAX_REFUSED {
                    let until =
                        self.now + self.listener.timeouts.handshake_timeout.as_millis() as u64;
                    self.blocked.insert(from, until);
                }
                self.metrics.blocked(reason);
                log_line(
                    &self.listener,
                    client,
                    None,
                    None,
                    0,
                    0,
                    Duration::ZERO,
                    Outcome::Blocked(reason),
                    None,
                );
                return;
            }
        };
        let release = |engine: &Engine| {
            if let Some(ip) = counted {
                engine.listener.firewall.release_flow(ip);
            }
        };
        if !self.budget.take() {
            release(self);
            return self.metrics.dropped(QuicDrop::FlowLimit);
        }
        self.metrics.opened();
        let flow = Flow {
            state: State::Pending(Box::new(Pending {
                reader: InitialReader::new(),
                datagrams: Vec::new(),
                ends: Vec::new(),
                resolving: false,
            })),
            started: Instant::now(),
            since: self.now,
            last: self.now,
            up: 0,
            down: 0,
            route: None,
            member: 0,
            lease: None,
            sni: None,
            counted,
            replied: false,
        };
        let id = self.table.insert(from, Some(dcid), flow);
        self.forward(id, datagram, poller);
    }

    /// A datagram of a known flow: kept and read while pending, else sent
    /// to the backend.
    fn forward(&mut self, id: FlowId, datagram: &[u8], poller: &OwnedFd) {
        let now = self.now;
        let Some(flow) = self.table.get_mut(id) else {
            return;
        };
        flow.last = now;
        let pending = match &mut flow.state {
            State::Open(socket) => {
                if let Err(e) = send_up(socket, datagram, &mut flow.up, &self.metrics) {
                    self.backend_failed(id, e);
                }
                return;
            }
            State::Refused => return,
            State::Pending(pending) => pending,
        };
        if pending.datagrams.len() + datagram.len() > PENDING_FLOW_BYTES {
            return self.refuse(
                id,
                End::because(
                    Outcome::BadHello,
                    format!("more than {PENDING_FLOW_BYTES} bytes of datagrams before a whole ClientHello"),
                ),
            );
        }
        pending.datagrams.extend_from_slice(datagram);
        pending.ends.push(pending.datagrams.len() as u32);
        self.pending_bytes += datagram.len();
        if pending.resolving {
            return;
        }
        match pending.reader.read(datagram, &mut self.scratch) {
            Ok(Parse::NeedMore | Parse::Skipped(_)) if self.pending_bytes > PENDING_BYTES => {
                self.metrics.dropped(QuicDrop::PendingLimit);
                self.close(
                    id,
                    End::because(
                        Outcome::HelloTimeout,
                        "pending flows over their byte budget with this hello incomplete",
                    ),
                );
            }
            Ok(Parse::NeedMore | Parse::Skipped(_)) => {}
            Ok(Parse::Done(hello)) => self.route(id, hello, poller),
            // Not kept: a datagram that does not decrypt or parse is
            // cheap to send, and its sender is no client to wait for.
            Err(reject) => self.close(id, End::because(Outcome::BadHello, reject.to_string())),
        }
    }

    /// The ClientHello is whole: the route, the backend, then the socket.
    fn route(&mut self, id: FlowId, hello: InitialHello, poller: &OwnedFd) {
        let routes = &self.listener.routes;
        let route = match &hello.sni {
            Some(sni) => routes.lookup(sni),
            None => routes.default_route(),
        };
        let attempts = self.listener.timeouts.connect_attempts as usize;
        let Some(flow) = self.table.get_mut(id) else {
            return;
        };
        flow.sni = hello.sni.map(String::into_boxed_str);
        let Some(route) = route else {
            return self.refuse(id, End::new(Outcome::NoRoute));
        };
        if matches!(route.target.mode, Mode::L7(_)) {
            return self.refuse(
                id,
                End::because(Outcome::L7Route, "an L7 route does not take QUIC"),
            );
        }
        let members = route.pool.members();
        // The balance rule's order, members that failed QUIC lately last.
        let now = self.now;
        let failing = &self.failing;
        let failed = |m: &balance::Member| {
            m.backend()
                .socket_addr()
                .and_then(|addr| failing.get(&addr))
                .is_some_and(|&until| until > now)
        };
        let mut order = route.pool.attempts(attempts);
        let Some(first) = order.next() else {
            return self.close(id, End::new(Outcome::NoRoute));
        };
        let member = if failed(first) {
            order.find(|m| !failed(m)).unwrap_or(first)
        } else {
            first
        };
        let index = members
            .iter()
            .position(|m| std::ptr::eq(m, member))
            .unwrap_or(0);
        flow.member = index as u8;
        flow.lease = Some(member.lease());
        let backend = member.backend().clone();
        flow.route = Some(route.clone());
        match backend.socket_addr() {
            Some(addr) => self.open(id, addr, poller),
            None => {
                if let Some(State::Pending(pending)) =
                    self.table.get_mut(id).map(|flow| &mut flow.state)
                {
                    pending.resolving = true;
                }
                let resolved = self.resolved.clone();
                let timeout = self.listener.timeouts.connect_timeout;
                tokio::spawn(async move {
                    let result = super::connect::resolve_one(&backend, timeout).await;
                    let _ = resolved.send((id, result));
                });
            }
        }
    }

    fn resolved(&mut self, id: FlowId, result: io::Result<SocketAddr>, poller: &OwnedFd) {
        match result {
            Ok(addr) => self.open(id, addr, poller),
            Err(e) => self.close(id, End::because(Outcome::BackendUnreachable, e.to_string())),
        }
    }

    /// Establishes a routed flow: its socket, connected to `addr` and
    /// watched, then the datagrams kept so far, in order.
    fn open(&mut self, id: FlowId, addr: SocketAddr, poller: &OwnedFd) {
        let socket = match backend_socket(addr, id, poller) {
            Ok(socket) => socket,
            Err(e) => {
                return self.close(
                    id,
                    End::because(Outcome::BackendUnreachable, format!("{addr}: {e}")),
                )
            }
        };
        let now = self.now;
        let Some(flow) = self.table.get_mut(id) else {
            return;
        };
        let State::Pending(pending) = std::mem::replace(&mut flow.state, State::Open(socket))
        else {
            return;
        };
        flow.since = now;
        self.pending_bytes -= pending.datagrams.len();
        let State::Open(socket) = &flow.state else {
            return;
        };
        let mut start = 0;
        let mut failed = None;
        for &end in &pending.ends {
            let datagram = &pending.datagrams[start..end as usize];
            start = end as usize;
            if let Err(e) = send_up(socket, datagram, &mut flow.up, &self.metrics) {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            self.backend_failed(id, e);
        }
    }

    /// Reads the backend sockets epoll says are ready, at most [`BATCH`]
    /// datagrams each. Returns whether every ready socket was read dry
    /// (fewer than [`EVENTS`] were ready, and none was left with
    /// datagrams): the caller then clears the epoll descriptor's readiness
    /// without another `epoll_wait` to find it empty. (Safe: a datagram
    /// arriving on any flow socket after this wakes tokio's registration of
    /// the epoll descriptor again, and a readiness seen after the guard was
    /// taken is not cleared.)
    fn read_backends(&mut self, socket: &UdpSocket, poller: &OwnedFd, buffer: &mut [u8]) -> bool {
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // On the stack: an epoll event holds a pointer-sized union, which
        // would make the task's future not Send if kept in it.
        let mut events = [std::mem::MaybeUninit::<epoll::Event>::uninit(); EVENTS];
        let ready = match epoll::wait(poller, &mut events[..], Some(&zero)) {
            Ok((ready, _)) => ready,
            Err(rustix::io::Errno::INTR) => return false,
            Err(e) => {
                tracing::warn!(error = %e, "QUIC: epoll_wait failed");
                return true;
            }
        };
        let mut ids = [0u64; EVENTS];
        for (id, event) in ids.iter_mut().zip(ready.iter()) {
            *id = event.data.u64();
        }
        let count = ready.len();
        let mut dry = count < EVENTS;
        for &id in &ids[..count] {
            dry &= self.backend_datagrams(FlowId::unpack(id), socket, buffer);
        }
        dry
    }

    /// Relays a flow's datagrams from its backend, at most [`BATCH`].
    /// Returns whether its socket was read dry (or the flow is gone).
    fn backend_datagrams(&mut self, id: FlowId, socket: &UdpSocket, buffer: &mut [u8]) -> bool {
        for _ in 0..BATCH {
            let Some(client) = self.table.addr(id) else {
                return true;
            };
            let Some(flow) = self.table.get_mut(id) else {
                return true;
            };
            let State::Open(backend) = &flow.state else {
                return true;
            };
            let n = match backend.recv(buffer) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    self.backend_failed(id, e);
                    return true;
                }
            };
            let datagram = &buffer[..n];
            flow.last = self.now;
            flow.down += n as u64;
            let first_reply = !flow.replied;
            flow.replied = true;
            if first_reply && !self.failing.is_empty() {
                if let Ok(backend) = backend.peer_addr() {
                    if self.failing.remove(&backend).is_some() {
                        tracing::info!(listener = %self.listener.routes.addr(), backend = %backend, "QUIC: backend answers again");
                    }
                }
            }
            self.metrics.down(n);
            if let Err(e) = socket.try_send_to(datagram, client) {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.metrics.dropped(QuicDrop::SendFailed);
                } else {
                    tracing::debug!(client = %client, error = %e, "QUIC send to client");
                }
            }
            // The server's connection ID, from its long headers (Initial,
            // Handshake, Retry): what the client sends to from now on.
            if datagram.first().is_some_and(|b| b & 0x80 != 0) {
                if let Peek::Long(header) = quic::peek(datagram) {
                    self.table.set_server_cid(id, header.scid);
                }
            }
        }
        // BATCH datagrams read: there may be more.
        false
    }

    /// A send or receive on the flow's backend socket failed (an ICMP
    /// port unreachable shows as ECONNREFUSED): the flow ends, and a
    /// backend that never answered is marked failed.
    fn backend_failed(&mut self, id: FlowId, e: io::Error) {
        let Some(flow) = self.table.get(id) else {
            return;
        };
        let outcome = if flow.replied {
            Outcome::Relayed
        } else {
            self.quic_failed(id, &e.to_string());
            Outcome::BackendUnreachable
        };
        self.close(id, End::because(outcome, e.to_string()));
    }

    /// The flow's backend refused QUIC or did not answer: new flows try the
    /// route's other backends first for [`QUIC_BACKOFF`].
    fn quic_failed(&mut self, id: FlowId, why: &str) {
        let Some(State::Open(socket)) = self.table.get(id).map(|flow| &flow.state) else {
            return;
        };
        let Ok(backend) = socket.peer_addr() else {
            return;
        };
        let until = self.now + QUIC_BACKOFF.as_millis() as u64;
        if self
            .failing
            .insert(backend, until)
            .is_none_or(|was| was <= self.now)
        {
            tracing::warn!(
                listener = %self.listener.routes.addr(),
                backend = %backend,
                error = why,
                backoff_ms = QUIC_BACKOFF.as_millis() as u64,
                "QUIC: backend gave no answer; other backends first for new flows"
            );
        }
    }

    /// Hands the open flows over (a handoff): each leaves the table with
    /// its socket; pending and refused ones end here (`shutdown`).
    fn export(&mut self, poller: &OwnedFd) -> Vec<Carried> {
        let listener = self.listener.routes.addr().to_string();
        let mut carried = Vec::new();
        for id in self.table.ids() {
            let open = self
                .table
                .get(id)
                .is_some_and(|flow| matches!(flow.state, State::Open(_)));
            if !open {
                self.close(id, End::new(Outcome::Shutdown));
                continue;
            }
            let [client_cid, server_cid] = self.table.cids(id);
            let Some((client, flow)) = self.table.remove(id) else {
                continue;
            };
            if let Some(ip) = flow.counted {
                self.listener.firewall.release_flow(ip);
            }
            self.budget.give_back();
            self.metrics.handed_over();
            let (Some(route), Some(backend)) = (
                flow.route.as_ref().map(|route| route.name.to_string()),
                flow.backend().map(|member| member.backend().to_string()),
            ) else {
                continue;
            };
            let State::Open(socket) = flow.state else {
                continue;
            };
            let _ = epoll::delete(poller, &socket);
            carried.push(Carried {
                flow: FlowLine {
                    listener: listener.clone(),
                    client,
                    client_cid,
                    server_cid,
                    sni: flow.sni.as_deref().map(str::to_string),
                    route,
                    backend,
                    up: flow.up,
                    down: flow.down,
                    age: flow.started.elapsed(),
                    replied: flow.replied,
                },
                socket: OwnedFd::from(socket),
            });
        }
        tracing::info!(listener = %listener, flows = carried.len(), "handoff: QUIC flows handed over");
        carried
    }

    /// Takes in flows a previous process handed over: each back in the
    /// table with its socket, its route and backend found again by name (a
    /// flow whose route or backend is gone is closed).
    fn import(&mut self, flows: Vec<Carried>, poller: &OwnedFd) {
        let count = flows.len();
        let mut taken = 0;
        for Carried {
            flow: carried,
            socket,
        } in flows
        {
            let route = Hostname::parse(&carried.route)
                .ok()
                .and_then(|hostname| self.listener.routes.route(&hostname))
                .filter(|route| !matches!(route.target.mode, Mode::L7(_)));
            let Some(route) = route else { continue };
            let Some(member) = route
                .pool
                .members()
                .iter()
                .position(|m| m.backend().to_string() == carried.backend)
            else {
                continue;
            };
            if !self.budget.take() {
                continue;
            }
            let socket = StdUdpSocket::from(socket);
            let lease = route.pool.members()[member].lease();
            let flow = Flow {
                state: State::Open(socket),
                started: Instant::now()
                    .checked_sub(carried.age)
                    .unwrap_or_else(Instant::now),
                since: self.now,
                last: self.now,
                up: carried.up,
                down: carried.down,
                route: Some(route.clone()),
                member: member as u8,
                lease: Some(lease),
                sni: carried.sni.map(String::into_boxed_str),
                counted: None,
                replied: carried.replied,
            };
            let id = self.table.insert(carried.client, carried.client_cid, flow);
            if let Some(cid) = carried.server_cid {
                self.table.set_server_cid(id, cid);
            }
            let watched = match self.table.get(id).map(|flow| &flow.state) {
                Some(State::Open(socket)) => epoll::add(
                    poller,
                    socket,
                    epoll::EventData::new_u64(id.pack()),
                    epoll::EventFlags::IN,
                )
                .is_ok(),
                _ => false,
            };
            if !watched {
                self.table.remove(id);
                self.budget.give_back();
                continue;
            }
            self.metrics.taken_over();
            taken += 1;
        }
        tracing::info!(
            listener = %self.listener.routes.addr(),
            flows = taken,
            closed = count - taken,
            "handoff: QUIC flows taken over"
        );
    }

    /// Ends the flows whose time is up.
    fn sweep(&mut self) {
        let timeouts = &self.listener.timeouts;
        let ms = |d: Duration| d.as_millis() as u64;
        let (hello, connect, idle) = (
            ms(timeouts.handshake_timeout),
            ms(timeouts.connect_timeout),
            ms(timeouts.idle_timeout),
        );
        let now = self.now;
        let mut ended = Vec::new();
        let mut refused = Vec::new();
        self.table.each(|id, flow| {
            let end = match &flow.state {
                State::Pending(_) if now.saturating_sub(flow.since) >= hello => Some(End::because(
                    Outcome::HelloTimeout,
                    "no whole ClientHello (or backend address) within handshake_timeout",
                )),
                State::Open(_) if !flow.replied && now.saturating_sub(flow.since) >= connect => {
                    Some(End::because(
                        Outcome::BackendUnreachable,
                        "no datagram from the backend within connect_timeout",
                    ))
                }
                State::Open(_) if now.saturating_sub(flow.last) >= idle => {
                    Some(End::new(Outcome::Relayed))
                }
                State::Refused if now.saturating_sub(flow.since) >= hello => {
                    refused.push(id);
                    None
                }
                _ => None,
            };
            if let Some(end) = end {
                ended.push((id, end));
            }
        });
        for (id, end) in ended {
            if end.outcome == Outcome::BackendUnreachable {
                self.quic_failed(id, "no reply within connect_timeout");
            }
            self.close(id, end);
        }
        self.failing.retain(|_, until| *until > now);
        self.blocked.retain(|_, until| *until > now);
        for id in refused {
            self.release(id);
        }
    }

    /// Ends the flow: its line and count now, and out of the table.
    fn close(&mut self, id: FlowId, end: End) {
        if let Some(State::Refused) = self.table.get(id).map(|flow| &flow.state) {
            // Counted and logged when refused.
            return self.release(id);
        }
        self.report(id, &end);
        self.release(id);
    }

    /// Ends a pending flow that cannot go anywhere: its line and count now,
    /// its datagrams dropped; it stays in the table ([`State::Refused`])
    /// until `handshake_timeout` after its start, unless [`MAX_REFUSED`]
    /// are kept already.
    fn refuse(&mut self, id: FlowId, end: End) {
        if self.refused >= MAX_REFUSED {
            return self.close(id, end);
        }
        self.report(id, &end);
        let Some(flow) = self.table.get_mut(id) else {
            return;
        };
        if let State::Pending(pending) = std::mem::replace(&mut flow.state, State::Refused) {
            self.pending_bytes -= pending.datagrams.len();
        }
        flow.lease = None;
        self.refused += 1;
    }

    /// Takes the flow out of the table and gives back what it held.
    fn release(&mut self, id: FlowId) {
        let Some((_, flow)) = self.table.remove(id) else {
            return;
        };
        match &flow.state {
            State::Pending(pending) => self.pending_bytes -= pending.datagrams.len(),
            State::Refused => self.refused -= 1,
            State::Open(_) => {}
        }
        if let Some(ip) = flow.counted {
            self.listener.firewall.release_flow(ip);
        }
        self.budget.give_back();
    }

    /// Counts the flow's end and writes its line.
    fn report(&self, id: FlowId, end: &End) {
        let (Some(addr), Some(flow)) = (self.table.addr(id), self.table.get(id)) else {
            return;
        };
        self.metrics.closed(end.outcome);
        let client = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let backend = flow.backend().map(|m| m.backend().to_string());
        log_line(
            &self.listener,
            client,
            flow.sni.as_deref(),
            backend.as_deref(),
            flow.up,
            flow.down,
            flow.started.elapsed(),
            end.outcome,
            end.error.as_deref(),
        );
    }
}

/// The epoll set, watched by tokio. `with_interest` is deprecated because
/// a `T` that does not own its descriptor could close it under tokio's
/// registration; an `OwnedFd` owns it for as long as the `AsyncFd` lives,
/// which is the soundness condition of its replacement (an `unsafe fn`,
/// which this crate forbids).
#[allow(deprecated)]
fn watch(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)
}

/// Sends one client datagram on a flow's socket, counted in `up`; a full
/// send buffer drops it (counted, as on a congested path: QUIC resends).
/// An error is the socket's failure (ECONNREFUSED after an ICMP port
/// unreachable, and the like).
fn send_up(
    socket: &StdUdpSocket,
    datagram: &[u8],
    up: &mut u64,
    metrics: &QuicMetrics,
) -> io::Result<()> {
    match socket.send(datagram) {
        Ok(n) => {
            *up += n as u64;
            metrics.up(n);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            metrics.dropped(QuicDrop::SendFailed);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// A flow's own socket: unbound (the kernel picks the port), connected to
/// the backend, non-blocking, and in the task's epoll set under the flow's
/// id.
fn backend_socket(addr: SocketAddr, id: FlowId, poller: &OwnedFd) -> io::Result<StdUdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    // Room for a backend's burst (the kernel's default, 208 KiB, is about
    // 90 datagrams): charged only for what is queued; capped by
    // net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(FLOW_RECEIVE_BUFFER);
    socket.connect(&addr.into())?;
    epoll::add(
        poller,
        &socket,
        epoll::EventData::new_u64(id.pack()),
        epoll::EventFlags::IN,
    )?;
    Ok(socket.into())
}

/// The flow's line: as a TCP connection's (§4.1.7), with `transport=quic`.
#[allow(clippy::too_many_arguments)]
fn log_line(
    listener: &Listener,
    client: SocketAddr,
    sni: Option<&str>,
    backend: Option<&str>,
    up: u64,
    down: u64,
    duration: Duration,
    outcome: Outcome,
    error: Option<&str>,
) {
    tracing::info!(
        target: "mc_proxy::conn",
        client = %client,
        listener = %listener.routes.addr(),
        transport = %"quic",
        sni = sni.map(tracing::field::display),
        backend = backend.map(tracing::field::display),
        up,
        down,
        duration_ms = duration.as_millis() as u64,
        outcome = %outcome,
        error = error.map(tracing::field::display),
        "flow closed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an established flow holds in the table (its slot; the map
    /// entries and the kernel's socket come on top): kept small, since
    /// `max_quic_flows` of them may be held (SPEC §6.5: a few hundred
    /// bytes a flow).
    #[test]
    fn a_flow_slot_stays_small() {
        let flow = std::mem::size_of::<Flow>();
        eprintln!("Flow: {flow} bytes");
        assert!(flow <= 160, "Flow is {flow} bytes");
    }

    /// Port 0: TCP and UDP on the same number even when the number TCP got
    /// is taken on UDP (500 UDP ports held: about 7 of 400 binds meet one).
    #[tokio::test]
    async fn a_port_0_quic_listener_gets_one_port_for_tcp_and_udp() {
        let held: Vec<_> = (0..500)
            .map(|_| StdUdpSocket::bind("127.0.0.1:0").expect("udp"))
            .collect();
        let addr = ListenAddr::parse("127.0.0.1:0").expect("address");
        for _ in 0..400 {
            let (tcp, udp) = bind_pair(&addr).expect("bind_pair");
            let port = tcp.local_addr().expect("tcp").port();
            assert_eq!(udp.local_addr().expect("udp").port(), port);
        }
        drop(held);
    }
}
