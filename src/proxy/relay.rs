//! The relay: full duplex, half-close aware, idle-timed, force-closable.
//!
//! Readiness-driven: a direction waits for its source to be readable and only
//! then takes what it needs to move the bytes, so an idle connection holds no
//! buffer and no pipe at all.
//!
//! Each direction starts by copying: one read into a stack buffer and its
//! writes. A read that comes back short emptied the socket, so the
//! direction's readiness is cleared then and there (no extra read to see
//! `EAGAIN`). Handshakes, requests and responses — most connections' whole
//! life — are moved that way, which costs less than splicing small messages
//! through a pipe. A read that fills the buffer means bulk is flowing: from
//! then on, on Linux, the direction moves its bytes socket → pipe → socket
//! with `splice(2)` (never entering user space) through a pipe borrowed from
//! a bounded process-wide pool (`zero_copy`), and goes back to copying
//! after a splice round that moved no more than one buffer. Where splicing
//! is refused or no pipe can be had, it keeps copying. Either way a direction
//! moves everything it read before reading more (no unbounded buffering: a
//! stalled peer stalls its source).
//!
//! A FIN from one side is passed on as a FIN (`shutdown(Write)`); the other
//! direction keeps flowing. A reset or write error on one side resets the
//! other.

use std::io;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use super::sys;

/// The copy buffer: large enough that bulk transfers copied (where splice
/// is off or refused) need few syscalls.
const CHUNK: usize = 64 * 1024;
/// The most one copy read takes while splicing is possible: a TLS record
/// (16 KiB of payload) fits, so handshakes and request/response traffic are
/// copied, and a read that fills it hands the direction over to splice.
const SMALL: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions finished (FIN both ways, or a reset).
    Closed,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// The server's drain time ran out.
    Shutdown,
}

#[derive(Debug)]
pub struct RelayResult {
    /// Client → backend bytes (after the hello).
    pub up: u64,
    /// Backend → client bytes.
    pub down: u64,
    pub end: RelayEnd,
    /// The error that ended the relay early, if one did.
    pub error: Option<RelayError>,
}

/// Which way bytes were moving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → backend.
    Up,
    /// Backend → client.
    Down,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Up => "client→backend",
            Direction::Down => "backend→client",
        })
    }
}

/// Why a relay ended before both sides closed: the first I/O error, on the
/// way it happened. (Its text, e.g. `client→backend: Connection reset by
/// peer`, is the connection log line's `error`.)
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading from the sending side failed (typically: it reset).
    #[error("{0}: {1}")]
    Read(Direction, #[source] io::Error),
    /// Writing to the receiving side failed (it reset or went away).
    #[error("{0}: {1}")]
    Write(Direction, #[source] io::Error),
}

/// Milliseconds since the relay started at the last byte moved.
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Why one direction stopped.
enum PumpEnd {
    /// Source sent FIN; it was passed on.
    Eof,
    /// Reading the source failed (reset).
    ReadError(io::Error),
    /// Writing the destination failed (reset or broken pipe).
    WriteError(io::Error),
}

pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    idle: Duration,
    forced: &CancellationToken,
) -> RelayResult {
    relay_with(client, backend, idle, forced, cfg!(target_os = "linux")).await
}

/// [`relay`], with splicing allowed or not (tests pin the copy path with it;
/// off everywhere but Linux).
async fn relay_with(
    client: TcpStream,
    backend: TcpStream,
    idle: Duration,
    forced: &CancellationToken,
    splice: bool,
) -> RelayResult {
    let activity = Activity {
        origin: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    let up = pump(&client, &backend, &activity, &up_bytes, splice);
    let down = pump(&backend, &client, &activity, &down_bytes, splice);
    tokio::pin!(up, down);
    let mut up_done = false;
    let mut down_done = false;
    let mut end = RelayEnd::Closed;
    let mut error = None;
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    // Made once: a fresh wait every round would register with (and leave)
    // the process-wide token each time bytes move.
    let forced = forced.cancelled();
    tokio::pin!(forced);

    while !(up_done && down_done) {
        tokio::select! {
            result = &mut up, if !up_done => {
                up_done = true;
                if let Some(e) = finish(result, Direction::Up, &client, &backend) {
                    error = Some(e);
                    break;
                }
            }
            result = &mut down, if !down_done => {
                down_done = true;
                if let Some(e) = finish(result, Direction::Down, &backend, &client) {
                    error = Some(e);
                    break;
                }
            }
            () = &mut idle_timer => {
                let deadline = activity.last() + idle;
                if deadline <= Instant::now() {
                    end = RelayEnd::Idle;
                    break;
                }
                idle_timer.as_mut().reset(deadline);
            }
            () = &mut forced => {
                end = RelayEnd::Shutdown;
                break;
            }
        }
    }
    RelayResult {
        up: up_bytes.load(Ordering::Relaxed),
        down: down_bytes.load(Ordering::Relaxed),
        end,
        error,
    }
}

/// Settles one finished direction. On an error, resets the side that did not
/// fail (a reset on one side resets the other) and returns the error.
fn finish(
    result: PumpEnd,
    direction: Direction,
    source: &TcpStream,
    destination: &TcpStream,
) -> Option<RelayError> {
    match result {
        PumpEnd::Eof => None,
        PumpEnd::ReadError(e) => {
            sys::set_reset_on_close(destination);
            Some(RelayError::Read(direction, e))
        }
        PumpEnd::WriteError(e) => {
            sys::set_reset_on_close(source);
            Some(RelayError::Write(direction, e))
        }
    }
}

/// Passes a FIN on (half close); the other direction keeps flowing.
fn pass_fin(to: &TcpStream) -> PumpEnd {
    match sys::shutdown_write(to) {
        Ok(()) => PumpEnd::Eof,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => PumpEnd::Eof,
        Err(e) => PumpEnd::WriteError(e),
    }
}

/// One direction: waits until `from` is readable, then moves what it has to
/// `to` — copied through a stack buffer while the traffic is small, through
/// a pooled pipe with `splice(2)` on Linux while it is bulk.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    counter: &AtomicU64,
    splice: bool,
) -> PumpEnd {
    // Whether this direction is moving bulk: its last copy filled the
    // buffer, or its last splice round moved more than a copy would have.
    let mut bulk = false;
    loop {
        if let Err(e) = from.readable().await {
            return PumpEnd::ReadError(e);
        }
        #[allow(unused_mut)] // only Linux changes it
        let mut limit = if splice { SMALL } else { CHUNK };
        // The splice rounds are boxed: their state (a pipe lease, a pending
        // write) exists only while bytes move, so an idle connection's future
        // holds just the readiness wait, not room for them.
        #[cfg(target_os = "linux")]
        if splice && bulk {
            match Box::pin(zero_copy::round(from, to, activity, counter)).await {
                zero_copy::Round::Idle(moved) => {
                    bulk = moved > SMALL;
                    continue;
                }
                zero_copy::Round::End(end) => return end,
                // Bulk that can't be spliced right now: copy it in big reads.
                zero_copy::Round::Copy => limit = CHUNK,
            }
        }
        match copy_once(from, to, activity, counter, limit) {
            Copied::Drained | Copied::Nothing => {}
            Copied::Full => bulk = true,
            Copied::Unwritten(rest) => {
                if let Err(e) = Box::pin(write_all(to, &rest, activity)).await {
                    return PumpEnd::WriteError(e);
                }
            }
            Copied::End(end) => return end,
        }
    }
}

/// What one [`copy_once`] did.
enum Copied {
    /// A short read: the source is empty for now and its readiness was
    /// cleared; everything read was written.
    Drained,
    /// The read filled the buffer (more is probably waiting); everything
    /// read was written.
    Full,
    /// The source had nothing after all (readiness cleared by the read).
    Nothing,
    /// The destination took only part: the rest, to write before reading on.
    Unwritten(Vec<u8>),
    /// This direction is finished.
    End(PumpEnd),
}

/// One read of at most `limit` bytes into a stack buffer, and its writes,
/// without waiting. The buffer lives only in this call, never across an
/// await, so an idle connection's future holds none; it is not zeroed first
/// (the kernel fills what is read, and only that is looked at).
fn copy_once(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    counter: &AtomicU64,
    limit: usize,
) -> Copied {
    let mut buffer = [MaybeUninit::<u8>::uninit(); CHUNK];
    let limit = limit.min(CHUNK);
    let (read, drained) = match read_clearing(from, &mut buffer[..limit]) {
        // FIN: pass it on; the other direction keeps flowing.
        Ok(([], _)) => return Copied::End(pass_fin(to)),
        Ok(read) => read,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Copied::Nothing,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Copied::Nothing,
        Err(e) => return Copied::End(PumpEnd::ReadError(e)),
    };
    activity.touch();
    counter.fetch_add(read.len() as u64, Ordering::Relaxed);
    let mut written = 0;
    while written < read.len() {
        match to.try_write(&read[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Copied::Unwritten(read[written..].to_vec())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Copied::End(PumpEnd::WriteError(e)),
        }
    }
    if drained {
        Copied::Drained
    } else {
        Copied::Full
    }
}

/// Reads once from `from` without waiting. Returns the bytes read and
/// whether the read came back short, in which case the socket's readiness
/// has been cleared: a short read from a TCP socket took everything it held,
/// so the next round waits for new bytes instead of spending a read on
/// `EAGAIN` (what tokio's own `poll_read` does). Bytes or a FIN that arrive
/// after the read raise a fresh readiness event, which the clearing cannot
/// erase.
fn read_clearing<'a>(
    from: &TcpStream,
    buffer: &'a mut [MaybeUninit<u8>],
) -> io::Result<(&'a [u8], bool)> {
    let capacity = buffer.len();
    let mut short = None;
    let result = from.try_io(Interest::READABLE, || {
        let read = sys::recv(from, buffer)?;
        if !read.is_empty() && read.len() < capacity {
            // Reported as WouldBlock so that try_io clears the readiness.
            short = Some(read);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(read)
    });
    match (short, result) {
        (Some(read), _) => Ok((read, true)),
        (None, Ok(read)) => Ok((read, false)),
        (None, Err(e)) => Err(e),
    }
}

/// Pipes that may exist at once for splicing, at most 1,024 (the default);
/// past it bulk is copied. Set at start from the descriptor budget
/// (`capacity.rs`). Does nothing where splice is off.
pub fn set_pipe_limit(limit: usize) {
    #[cfg(target_os = "linux")]
    zero_copy::set_pipe_limit(limit);
    #[cfg(not(target_os = "linux"))]
    let _ = limit;
}

/// The most pipes [`set_pipe_limit`] allows: a cap on what bulk transfers
/// can take from the file-descriptor budget (two descriptors a pipe).
pub const PIPES_MAX: usize = 1024;

/// The Linux fast path: socket → pipe → socket with `splice(2)`, so relayed
/// bytes never enter user space.
///
/// A direction takes a pipe from a process-wide pool when its source becomes
/// readable and gives it back as soon as the source has nothing more and the
/// pipe is empty again, so an idle connection holds no pipe (and no file
/// descriptors beyond its two sockets). At most [`PIPES_MAX`] pipes exist at
/// once; when none can be had (the cap, or `EMFILE`), that round is copied
/// instead. If the kernel refuses splice on these sockets (`EINVAL`,
/// `ENOSYS`, `EPERM` from a seccomp filter, ...), the process switches to the
/// copy path for good.
#[cfg(target_os = "linux")]
mod zero_copy {
    use std::io;
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::sync::Mutex;

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{pass_fin, sys, Activity, PumpEnd, PIPES_MAX};

    /// Capacity asked for each new pipe, and so the most one splice moves:
    /// four times the default 64 KiB halves the splices per GiB and lets a
    /// fast source run further ahead of its destination. If the kernel
    /// refuses (the per-user pipe-memory limit), the pipe keeps its default
    /// capacity and splices simply move less at a time.
    const PIPE_SIZE: usize = 256 * 1024;
    /// Pipes that may exist at once (two descriptors each): a cap on what
    /// bulk transfers can take from the file-descriptor budget. The server
    /// lowers it at start to what its descriptor budget leaves beside
    /// `max_connections` ([`super::set_pipe_limit`]); at most
    /// [`PIPES_MAX`].
    static PIPE_LIMIT: AtomicUsize = AtomicUsize::new(PIPES_MAX);

    pub fn set_pipe_limit(limit: usize) {
        PIPE_LIMIT.store(limit.min(PIPES_MAX), Ordering::Relaxed);
    }

    /// Empty pipes kept for reuse; more than this are closed when returned.
    const POOL_MAX: usize = 64;

    static IDLE: Mutex<Vec<sys::Pipe>> = Mutex::new(Vec::new());
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
    /// Test-only tally (a process-wide atomic would be one more contended
    /// write per splice in production).
    #[cfg(test)]
    static SPLICED: AtomicU64 = AtomicU64::new(0);

    /// Bytes moved by splice since the process started.
    #[cfg(test)]
    pub fn spliced_bytes() -> u64 {
        SPLICED.load(Ordering::Relaxed)
    }

    /// A pipe borrowed from the pool, with the bytes it holds. Dropped empty,
    /// it goes back to the pool; dropped holding bytes (the relay ended
    /// mid-transfer), it is closed, so no connection's bytes can reach
    /// another.
    struct Lease {
        pipe: Option<sys::Pipe>,
        held: usize,
    }

    impl Lease {
        fn take() -> Option<Lease> {
            let pooled = IDLE.lock().ok().and_then(|mut idle| idle.pop());
            let pipe = match pooled {
                Some(pipe) => pipe,
                None => {
                    if LIVE.fetch_add(1, Ordering::Relaxed) >= PIPE_LIMIT.load(Ordering::Relaxed) {
                        LIVE.fetch_sub(1, Ordering::Relaxed);
                        return None;
                    }
                    match sys::pipe() {
                        Ok(pipe) => {
                            let _ = sys::set_pipe_size(&pipe, PIPE_SIZE);
                            pipe
                        }
                        Err(e) => {
                            LIVE.fetch_sub(1, Ordering::Relaxed);
                            tracing::debug!(error = %e, "no pipe for splice; copying");
                            return None;
                        }
                    }
                }
            };
            Some(Lease {
                pipe: Some(pipe),
                held: 0,
            })
        }
    }

    impl Drop for Lease {
        fn drop(&mut self) {
            let Some(pipe) = self.pipe.take() else { return };
            if self.held == 0 {
                if let Ok(mut idle) = IDLE.lock() {
                    if idle.len() < POOL_MAX {
                        idle.push(pipe);
                        return;
                    }
                }
            }
            drop(pipe);
            LIVE.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub enum Round {
        /// The source has nothing more for now; the pipe went back. Carries
        /// the bytes this round moved.
        Idle(usize),
        /// This direction is finished.
        End(PumpEnd),
        /// Splicing is not possible right now: copy this round.
        Copy,
    }

    fn refused(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP)
        )
    }

    /// Splices until the source would block, ends, or fails.
    pub async fn round(
        from: &TcpStream,
        to: &TcpStream,
        activity: &Activity,
        counter: &AtomicU64,
    ) -> Round {
        if UNSUPPORTED.load(Ordering::Relaxed) {
            return Round::Copy;
        }
        let Some(mut lease) = Lease::take() else {
            return Round::Copy;
        };
        let mut moved = 0;
        loop {
            // Fill: the pipe is empty here, so 0 means end of stream.
            let filled = {
                let Some(pipe) = lease.pipe.as_ref() else {
                    return Round::Copy;
                };
                from.try_io(Interest::READABLE, || {
                    sys::splice(from.as_fd(), pipe.write.as_fd(), PIPE_SIZE)
                })
            };
            let n = match filled {
                Ok(0) => return Round::End(pass_fin(to)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Round::Idle(moved),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if refused(&e) => {
                    if !UNSUPPORTED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "splice refused; relaying by copy from now on");
                    }
                    return Round::Copy;
                }
                Err(e) => return Round::End(PumpEnd::ReadError(e)),
            };
            lease.held = n;
            moved += n;
            activity.touch();
            counter.fetch_add(n as u64, Ordering::Relaxed);
            // Drain: everything in the pipe goes out before more is read, so
            // a stalled destination stalls its source.
            while lease.held > 0 {
                let drained = {
                    let Some(pipe) = lease.pipe.as_ref() else {
                        return Round::Copy;
                    };
                    to.try_io(Interest::WRITABLE, || {
                        sys::splice(pipe.read.as_fd(), to.as_fd(), lease.held)
                    })
                };
                match drained {
                    Ok(m) => {
                        lease.held -= m.min(lease.held);
                        #[cfg(test)]
                        SPLICED.fetch_add(m as u64, Ordering::Relaxed);
                        activity.touch();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Err(e) = to.writable().await {
                            return Round::End(PumpEnd::WriteError(e));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Round::End(PumpEnd::WriteError(e)),
                }
            }
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8], activity: &Activity) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => {
                data = &data[n..];
                activity.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    use super::{relay_with, RelayEnd};
    use crate::shutdown::Shutdown;

    /// A connected loopback pair: (our end, the relay's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (ours, theirs) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (ours.expect("connect"), theirs.expect("accept").0)
    }

    /// A relay between two loopback pairs: (client end, backend end, the
    /// relay task, its shutdown controller).
    async fn start_relay(
        idle: Duration,
        splice: bool,
    ) -> (
        TcpStream,
        TcpStream,
        JoinHandle<super::RelayResult>,
        Shutdown,
    ) {
        let (client, client_side) = pair().await;
        let (backend, backend_side) = pair().await;
        let shutdown = Shutdown::new();
        let forced = shutdown.forced().clone();
        let relay = tokio::spawn(async move {
            relay_with(client_side, backend_side, idle, &forced, splice).await
        });
        (client, backend, relay, shutdown)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// One end of a relayed connection: writes `bytes` and a FIN while
    /// reading everything the other end sends until its FIN.
    async fn send_then_fin_while_reading(
        mut stream: TcpStream,
        bytes: Vec<u8>,
        who: &'static str,
    ) -> Vec<u8> {
        let (mut read, mut write) = stream.split();
        let send = async {
            write.write_all(&bytes).await.expect(who);
            write.shutdown().await.expect(who);
        };
        let mut got = Vec::new();
        let receive = read.read_to_end(&mut got);
        let ((), received) = tokio::join!(send, receive);
        received.expect(who);
        got
    }

    /// Sends `up` from the client and `down` from the backend at the same
    /// time through a relay, half-closing each side after its bytes, and
    /// returns what each side received and the relay's result.
    async fn relay_both_ways(up: Vec<u8>, down: Vec<u8>, splice: bool) -> super::RelayResult {
        let (client, backend, relay, _shutdown) =
            start_relay(Duration::from_secs(30), splice).await;
        let (up_len, down_len) = (up.len(), down.len());
        let client_task = tokio::spawn(send_then_fin_while_reading(client, up, "client"));
        let backend_task = tokio::spawn(send_then_fin_while_reading(backend, down, "backend"));
        let at_client = client_task.await.expect("client task");
        let at_backend = backend_task.await.expect("backend task");
        let result = relay.await.expect("relay task");
        assert_eq!(at_backend.len(), up_len, "bytes at the backend");
        assert_eq!(at_client.len(), down_len, "bytes at the client");
        assert!(at_backend == pattern(up_len, 1), "backend got other bytes");
        assert!(at_client == pattern(down_len, 2), "client got other bytes");
        result
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn splice_relay_moves_eight_mib_each_way_intact_through_pipes() {
        let before = super::zero_copy::spliced_bytes();
        let size = 8 << 20;
        let result = relay_both_ways(pattern(size, 1), pattern(size, 2), true).await;
        assert_eq!((result.up, result.down), (size as u64, size as u64));
        assert_eq!(result.end, RelayEnd::Closed);
        assert!(result.error.is_none(), "{:?}", result.error);
        // Other tests may splice at the same time, but never subtract. Each
        // burst's first read is copied; the bulk of it must be spliced.
        let spliced = super::zero_copy::spliced_bytes() - before;
        assert!(
            spliced >= size as u64,
            "only {spliced} of {} bytes went through splice",
            2 * size
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_payload_and_its_fin_in_one_burst_both_arrive() {
        // A short read clears the readiness; the FIN that came with the
        // bytes must still be seen and passed on (else this hangs).
        for size in [1, 100, 5000] {
            let result = tokio::time::timeout(
                Duration::from_secs(10),
                relay_both_ways(pattern(size, 1), pattern(size, 2), true),
            )
            .await
            .expect("the relay passed both FINs on");
            assert_eq!((result.up, result.down), (size as u64, size as u64));
            assert_eq!(result.end, RelayEnd::Closed);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_requests_and_responses_ping_pong_in_order() {
        // Request/response traffic (the copied path, readiness cleared on
        // every short read): no message is lost, stuck or reordered.
        let (mut client, mut backend, relay, _shutdown) =
            start_relay(Duration::from_secs(30), true).await;
        let rounds = 500;
        let echo = tokio::spawn(async move {
            let mut total = 0u64;
            for round in 0..rounds {
                let size = 1 + (round * 37) % 3000;
                let mut request = vec![0u8; size];
                backend.read_exact(&mut request).await.expect("request");
                assert!(request == pattern(size, round as u8), "request {round}");
                backend
                    .write_all(&pattern(size + 7, !(round as u8)))
                    .await
                    .expect("response");
                total += size as u64;
            }
            total
        });
        let exchange = async {
            for round in 0..rounds {
                let size = 1 + (round * 37) % 3000;
                client
                    .write_all(&pattern(size, round as u8))
                    .await
                    .expect("send");
                let mut response = vec![0u8; size + 7];
                client.read_exact(&mut response).await.expect("response");
                assert!(
                    response == pattern(size + 7, !(round as u8)),
                    "response {round}"
                );
            }
        };
        tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .expect("500 round trips within 30 s");
        let sent = echo.await.expect("backend task");
        drop(client);
        let result = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("relay ends")
            .expect("relay task");
        assert_eq!(result.up, sent);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copy_fallback_moves_eight_mib_each_way_intact() {
        let size = 8 << 20;
        let result = relay_both_ways(pattern(size, 1), pattern(size, 2), false).await;
        assert_eq!((result.up, result.down), (size as u64, size as u64));
        assert_eq!(result.end, RelayEnd::Closed);
        assert!(result.error.is_none(), "{:?}", result.error);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pipe_left_holding_bytes_is_closed_not_reused() {
        // The backend never reads, so bytes pile up in the kernel's socket
        // buffers and in the pipe, and the relay ends on its idle timeout
        // with the pipe still holding bytes.
        let (mut client, _backend, relay, _shutdown) =
            start_relay(Duration::from_secs(1), true).await;
        let flood = pattern(4 << 20, 7);
        let _ = tokio::time::timeout(Duration::from_secs(5), client.write_all(&flood)).await;
        let result = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("relay ends on its idle timeout")
            .expect("relay task");
        assert_eq!(result.end, RelayEnd::Idle);
        assert!(result.up > 0, "some bytes were relayed before the stall");
        // Relays after it get exactly their own bytes: the stale ones were
        // not handed on with a pooled pipe.
        for _ in 0..4 {
            let result = relay_both_ways(pattern(256 << 10, 1), pattern(256 << 10, 2), true).await;
            assert_eq!(result.end, RelayEnd::Closed);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backend_reset_ends_the_relay_with_a_read_error_on_the_way_down() {
        for splice in [false, true] {
            let (mut client, backend, relay, _shutdown) =
                start_relay(Duration::from_secs(30), splice).await;
            // The backend closes with an RST (SO_LINGER 0).
            super::sys::reset(backend);
            let result = tokio::time::timeout(Duration::from_secs(10), relay)
                .await
                .expect("relay ends on the reset")
                .expect("relay task");
            assert_eq!(result.end, RelayEnd::Closed);
            match &result.error {
                Some(super::RelayError::Read(super::Direction::Down, e)) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                }
                other => panic!("splice={splice}: {other:?}"),
            }
            let text = result.error.as_ref().map(ToString::to_string);
            assert!(
                text.as_deref()
                    .is_some_and(|t| t.starts_with("backend→client: ")),
                "{text:?}"
            );
            // The reset is passed on: the client's read fails or ends.
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut byte))
                .await
                .expect("client sees the close");
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        }
    }
}
