//! The backend connect: name resolution and Happy Eyeballs (RFC 8305), all
//! within one `connect_timeout`.
//!
//! Owns: resolving a backend name off the runtime's threads, ordering the
//! addresses (families interleaved, RFC 8305 §4), and racing connection
//! attempts (§5): the first address is tried at once, the next one
//! [`ATTEMPT_DELAY`] later if the earlier ones are still pending, or at
//! once when one fails; the first to connect wins and the others are
//! dropped (closed). So a blackholed first address costs 250 ms, not the
//! whole timeout.
//!
//! Never: blocks a runtime thread (`getaddrinfo` runs on tokio's blocking
//! pool, at most [`MAX_RESOLVING`] at once so a dead resolver cannot take
//! the whole pool), or lets resolution plus connecting run past the
//! deadline.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::balance::{Lease, Member, Pool};
use crate::routes::Backend;

/// How long an attempt has before the next address is tried alongside it
/// (RFC 8305 §5 recommends 250 ms).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Name lookups running at once, process-wide. A lookup that waits for a
/// turn waits within its connection's deadline.
pub const MAX_RESOLVING: usize = 64;

static RESOLVING: Semaphore = Semaphore::const_new(MAX_RESOLVING);

/// Connects to `backend` within `timeout`, resolution included.
pub async fn connect(backend: &Backend, timeout: Duration) -> io::Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    if let Some(addr) = backend.socket_addr() {
        return connect_one(addr, deadline, timeout).await;
    }
    let addrs = resolve_by(backend, deadline, timeout).await?;
    connect_any(&addrs, deadline, timeout).await
}

/// A connection to one of a pool's backends, and the count it holds open.
pub struct Pooled<'a> {
    pub stream: TcpStream,
    pub member: &'a Member,
    pub lease: Lease,
}

/// Every attempt failed: each backend tried and why, in order.
#[derive(Debug)]
pub struct PoolFailure {
    pub tried: Vec<(Backend, io::Error)>,
}

impl PoolFailure {
    /// The last backend tried.
    pub fn last(&self) -> Option<&Backend> {
        self.tried.last().map(|(backend, _)| backend)
    }
}

impl std::fmt::Display for PoolFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&tried_text(&self.tried))
    }
}

/// The backends a connection or request tried and why each failed: one
/// backend's error as is (as a single backend always read); several as
/// `a:1: error; b:2: error`, each backend named once (an IP backend's
/// connect error already starts with it). The L4 close line and the L7
/// request line both say it this way.
pub fn tried_text<E: std::fmt::Display>(tried: &[(Backend, E)]) -> String {
    if let [(_, error)] = tried {
        return error.to_string();
    }
    let mut text = String::new();
    for (i, (backend, error)) in tried.iter().enumerate() {
        if i > 0 {
            text.push_str("; ");
        }
        let error = error.to_string();
        if !error.starts_with(&format!("{backend}: ")) {
            text.push_str(&format!("{backend}: "));
        }
        text.push_str(&error);
    }
    text
}

/// Connects to one of a pool's backends: each in the order the pool picks
/// (healthy first, then fail-open), each within `timeout`, at most
/// `attempts` of them. Each result is reported to the backend's node (a
/// failure starts or extends its passive backoff, a success ends it).
pub async fn connect_pool(
    pool: &Pool,
    attempts: usize,
    timeout: Duration,
) -> Result<Pooled<'_>, PoolFailure> {
    let mut tried = Vec::new();
    for member in pool.attempts(attempts) {
        match connect(member.backend(), timeout).await {
            Ok(stream) => {
                member.node().connected();
                return Ok(Pooled {
                    stream,
                    member,
                    lease: member.lease(),
                });
            }
            Err(error) => {
                member.node().connect_failed(&error.to_string());
                tried.push((member.backend().clone(), error));
            }
        }
    }
    Err(PoolFailure { tried })
}

/// One address: one attempt against the deadline, without the race's
/// vectors, boxed attempts and second timer. This is every connection to a
/// backend written as `IP:port`, so it stays as cheap as a plain connect.
async fn connect_one(
    addr: SocketAddr,
    deadline: Instant,
    timeout: Duration,
) -> io::Result<TcpStream> {
    match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(io::Error::new(e.kind(), format!("{addr}: {e}"))),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?} (1 of 1 addresses tried)"),
        )),
    }
}

/// The address a QUIC flow to `backend` uses: its IP, or the first of its
/// name's addresses (the resolver's preference), within `timeout`. (UDP has
/// no handshake to race addresses with.)
pub async fn resolve_one(backend: &Backend, timeout: Duration) -> io::Result<SocketAddr> {
    if let Some(addr) = backend.socket_addr() {
        return Ok(addr);
    }
    let addrs = resolve_by(backend, Instant::now() + timeout, timeout).await?;
    addrs.first().copied().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "backend name resolved to no address",
        )
    })
}

/// [`resolve`] by `deadline`; `timeout` (what the deadline came from) is
/// for the error text.
async fn resolve_by(
    backend: &Backend,
    deadline: Instant,
    timeout: Duration,
) -> io::Result<Vec<SocketAddr>> {
    match tokio::time::timeout_at(deadline, resolve(backend)).await {
        Ok(resolved) => resolved,
        Err(_) => {
            let (host, _) = backend.host_port();
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("resolving {host} did not finish within connect_timeout ({timeout:?})"),
            ))
        }
    }
}

/// Resolves a backend name with the system resolver (`getaddrinfo`: hosts
/// file, DNS, whatever nsswitch says) on the blocking pool. The turn is held
/// by the lookup itself, so lookups stuck on a dead resolver keep counting
/// after their connections gave up.
async fn resolve(backend: &Backend) -> io::Result<Vec<SocketAddr>> {
    let (host, port) = backend.host_port();
    let turn = RESOLVING
        .acquire()
        .await
        .map_err(|_| io::Error::other("resolver closed"))?;
    let lookup = tokio::task::spawn_blocking(move || {
        let result = (host.as_str(), port)
            .to_socket_addrs()
            .map(Iterator::collect::<Vec<_>>)
            .map_err(|e| io::Error::new(e.kind(), format!("resolving {host}: {e}")));
        drop(turn);
        result
    });
    lookup
        .await
        .map_err(|e| io::Error::other(format!("resolver task failed: {e}")))?
}

/// The order to try `addrs` in (RFC 8305 §4): the resolver's order (which
/// already sorts by RFC 6724 preference) with the families interleaved,
/// starting with the family of the first address: v6, v4, v6, v4, ... and
/// the rest of the longer family at the end.
pub fn interleave(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return Vec::new();
    };
    let preferred_v6 = first.is_ipv6();
    let mut preferred = addrs.iter().filter(|a| a.is_ipv6() == preferred_v6);
    let mut other = addrs.iter().filter(|a| a.is_ipv6() != preferred_v6);
    let mut order = Vec::with_capacity(addrs.len());
    loop {
        let (a, b) = (preferred.next(), other.next());
        if a.is_none() && b.is_none() {
            return order;
        }
        order.extend(a.into_iter().chain(b).copied());
    }
}

type Attempt = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// Happy Eyeballs over `addrs` (in [`interleave`] order) until `deadline`:
/// the first connection made wins. `timeout` is only for the error text.
/// The error is the last failure, or `TimedOut` naming it when the deadline
/// came first.
pub async fn connect_any(
    addrs: &[SocketAddr],
    deadline: Instant,
    timeout: Duration,
) -> io::Result<TcpStream> {
    if let [addr] = addrs {
        return connect_one(*addr, deadline, timeout).await;
    }
    let order = interleave(addrs);
    let mut next = order.iter().copied();
    let mut pending: Vec<(SocketAddr, Attempt)> = Vec::with_capacity(order.len().min(4));
    let mut last_error: Option<io::Error> = None;
    let stagger = tokio::time::sleep(Duration::ZERO);
    let expiry = tokio::time::sleep_until(deadline);
    tokio::pin!(stagger, expiry);

    // Every round but the last starts the next address: the first at once,
    // then each when the stagger timer fires or an attempt fails.
    loop {
        if let Some(addr) = next.next() {
            pending.push((addr, Box::pin(TcpStream::connect(addr))));
            stagger.as_mut().reset(Instant::now() + ATTEMPT_DELAY);
        }
        if pending.is_empty() {
            return Err(last_error.unwrap_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "backend name resolved to no address",
                )
            }));
        }
        let more = next.len() > 0;
        let event = std::future::poll_fn(|cx| {
            for (index, (_, attempt)) in pending.iter_mut().enumerate() {
                if let Poll::Ready(result) = attempt.as_mut().poll(cx) {
                    return Poll::Ready(Event::Finished(index, result));
                }
            }
            if more && stagger.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::NextDue);
            }
            if expiry.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Deadline);
            }
            Poll::Pending
        })
        .await;
        match event {
            // The others drop with `pending`: their sockets close.
            Event::Finished(_, Ok(stream)) => return Ok(stream),
            Event::Finished(index, Err(e)) => {
                let (addr, _) = pending.swap_remove(index);
                last_error = Some(io::Error::new(e.kind(), format!("{addr}: {e}")));
            }
            Event::NextDue => {}
            Event::Deadline => {
                let last = last_error.map_or(String::new(), |e| format!("; last error: {e}"));
                let tried = order.len() - next.len();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connect timed out after {timeout:?} ({tried} of {} addresses tried{last})",
                        order.len()
                    ),
                ));
            }
        }
    }
}

enum Event {
    /// Attempt `index` of the pending ones finished.
    Finished(usize, io::Result<TcpStream>),
    /// [`ATTEMPT_DELAY`] passed with attempts still pending.
    NextDue,
    Deadline,
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener as StdListener, TcpStream as StdStream};

    use socket2::{Domain, Socket, Type};

    use super::*;

    fn v4(last: u8, port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(192, 0, 2, last), port))
    }

    fn v6(last: u16, port: u16) -> SocketAddr {
        SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last), port))
    }

    #[test]
    fn families_interleave_starting_with_the_first_address_family() {
        let (a6, b6, c6) = (v6(1, 443), v6(2, 443), v6(3, 443));
        let (a4, b4) = (v4(1, 443), v4(2, 443));
        assert_eq!(
            interleave(&[a6, b6, c6, a4, b4]),
            [a6, a4, b6, b4, c6],
            "v6 first"
        );
        assert_eq!(interleave(&[a4, b4, a6]), [a4, a6, b4], "v4 first");
        assert_eq!(interleave(&[a4, a6, b4, b6]), [a4, a6, b4, b6]);
        assert_eq!(interleave(&[a6, b6]), [a6, b6], "one family: as given");
        assert_eq!(interleave(&[a4]), [a4]);
        assert!(interleave(&[]).is_empty());
        // Order within a family is the resolver's.
        assert_eq!(interleave(&[b4, a4, a6]), [b4, a6, a4]);
    }

    /// A loopback listener that never completes a handshake: its accept
    /// queue (backlog 0) is filled with connections nobody accepts, so the
    /// kernel drops further SYNs and a connect to it hangs.
    struct Blackhole {
        addr: SocketAddr,
        _socket: Socket,
        _fillers: Vec<StdStream>,
    }

    fn blackhole() -> Blackhole {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .unwrap();
        socket.listen(0).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(stream) = StdStream::connect_timeout(&addr, Duration::from_millis(200)) {
                fillers.push(stream);
            }
        }
        assert!(!fillers.is_empty(), "could not fill the accept queue");
        // It really is a blackhole now.
        assert!(StdStream::connect_timeout(&addr, Duration::from_millis(300)).is_err());
        Blackhole {
            addr,
            _socket: socket,
            _fillers: fillers,
        }
    }

    /// A port nothing listens on: connecting is refused at once.
    fn refused() -> SocketAddr {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }

    fn deadline(timeout: Duration) -> Instant {
        Instant::now() + timeout
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_blackholed_first_address_does_not_eat_the_timeout() {
        let hole = blackhole();
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let started = std::time::Instant::now();
        let stream = connect_any(&[hole.addr, live_addr], deadline(TIMEOUT), TIMEOUT)
            .await
            .expect("connects to the live address");
        let took = started.elapsed();
        eprintln!("blackhole then live: connected in {took:?}");
        assert_eq!(stream.peer_addr().unwrap(), live_addr);
        // The live one starts 250 ms in; generous for a loaded machine.
        assert!(took >= ATTEMPT_DELAY, "{took:?}: not staggered");
        assert!(took < TIMEOUT / 2, "took {took:?} of a {TIMEOUT:?} timeout");
        let (_, from) = live.accept().await.unwrap();
        assert_eq!(from, stream.local_addr().unwrap());
    }

    #[tokio::test]
    async fn a_refused_address_starts_the_next_at_once_and_all_refused_fails_fast() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let (a, b) = (refused(), refused());
        let started = std::time::Instant::now();
        let stream = connect_any(&[a, b, live_addr], deadline(TIMEOUT), TIMEOUT)
            .await
            .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), live_addr);
        // Two refusals, no 250 ms waits between them.
        assert!(started.elapsed() < ATTEMPT_DELAY, "{:?}", started.elapsed());

        let started = std::time::Instant::now();
        let error = connect_any(&[a, b], deadline(TIMEOUT), TIMEOUT)
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
        assert!(error.to_string().contains(&b.to_string()), "{error}");
    }

    #[tokio::test]
    async fn all_blackholed_times_out_at_the_deadline_naming_the_tries() {
        let (one, two) = (blackhole(), blackhole());
        let timeout = Duration::from_millis(800);
        let started = std::time::Instant::now();
        let error = connect_any(&[one.addr, two.addr], deadline(timeout), timeout)
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        assert!(took >= timeout, "{took:?}");
        assert!(took < timeout + Duration::from_secs(2), "{took:?}");
        assert!(
            error.to_string().contains("2 of 2 addresses tried"),
            "{error}"
        );
    }

    /// The single-address path (every `IP:port` backend) keeps the same
    /// deadline and error texts as the race.
    #[tokio::test]
    async fn one_address_is_connected_refused_or_timed_out_like_the_race() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let backend = Backend::parse(&live_addr.to_string()).unwrap();
        let stream = connect(&backend, TIMEOUT).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), live_addr);

        let gone = refused();
        let error = connect_any(&[gone], deadline(TIMEOUT), TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
        assert!(error.to_string().contains(&gone.to_string()), "{error}");

        let hole = blackhole();
        let timeout = Duration::from_millis(500);
        let started = std::time::Instant::now();
        let error = connect_any(&[hole.addr], deadline(timeout), timeout)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
        assert!(
            error.to_string().contains("1 of 1 addresses tried"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn no_address_is_an_error_not_a_hang() {
        let error = connect_any(&[], deadline(TIMEOUT), TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }

    /// One test, so that nothing else uses the process-wide lookup turns
    /// meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn names_resolve_off_the_runtime_within_the_timeout() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = live.local_addr().unwrap().port();
        // /etc/hosts maps localhost to 127.0.0.1 (and maybe ::1).
        let backend = Backend::parse(&format!("localhost:{port}")).unwrap();
        let stream = connect(&backend, TIMEOUT).await.expect("connects");
        assert_eq!(stream.peer_addr().unwrap().port(), port);
        assert_eq!(RESOLVING.available_permits(), MAX_RESOLVING);

        let unknown = Backend::parse("no-such-host.invalid:443").unwrap();
        let error = connect(&unknown, TIMEOUT).await.unwrap_err();
        assert!(
            error.to_string().contains("no-such-host.invalid"),
            "{error}"
        );
        assert_eq!(RESOLVING.available_permits(), MAX_RESOLVING);

        // A dead resolver: every lookup turn taken (as by lookups stuck in
        // getaddrinfo). A name then fails at the deadline, and an IP
        // backend is not held up at all.
        let taken = RESOLVING.acquire_many(MAX_RESOLVING as u32).await.unwrap();
        let backend = Backend::parse("localhost:1").unwrap();
        let timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let error = connect(&backend, timeout).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        assert!(error.to_string().contains("resolving localhost"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ip = Backend::parse(&live.local_addr().unwrap().to_string()).unwrap();
        connect(&ip, timeout)
            .await
            .expect("an IP backend needs no lookup");
        drop(taken);
    }
}
