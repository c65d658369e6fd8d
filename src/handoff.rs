//! Listening-socket handoff (SPEC §6.4): a starting `mc-proxy server` takes
//! the listening sockets of the one running on the same state directory, so
//! an upgrade never unbinds a port.
//!
//! The running server listens on `DIR/mc-proxy.handoff.sock` (`DIR` is the
//! database's directory; mode 0600) once it serves. The protocol, one
//! connection, all text lines:
//!
//! 1. new → old: `TAKE 1`
//! 2. old → new: one `sendmsg` carrying the descriptors (SCM_RIGHTS) and a
//!    text naming each in order (`listener ADDR-TEXT`, `admin ADDR`,
//!    `metrics ADDR`), then `server PID STARTED-UNIX-MS VERSION` (who is
//!    handing over: not a socket), ended by `END`.
//! 3. The new process builds its server on them (opens the DB, binds what
//!    its config adds), starts serving, and binds its own handoff socket
//!    under a staging name; then new → old: `SERVING`.
//! 4. The old process stops its admin API and metrics endpoint, waits for
//!    the admin calls in flight to be answered, then old → new: `BYE`.
//! 5. The new process moves its handoff socket over the old one's path
//!    (a third process finds it from then on: connections queue there
//!    until it answers), tells systemd it is the main process now
//!    (`MAINPID`), and closes the connection. The old process waits for
//!    that close (so that systemd hears of the new main process before the
//!    old one exits), stops accepting and drains as on SIGTERM.
//!
//! If the new process fails before `SERVING`, it exits and the connection
//! closes: the old process logs a warning and keeps serving (its own copies
//! of the sockets were never closed), and the new one's staging file is
//! removed. No socket answering (no file, or ECONNREFUSED): a normal start,
//! which replaces a stale file.
//!
//! SCM_RIGHTS goes through rustix's safe `sendmsg`/`recvmsg`; the received
//! descriptors arrive as `OwnedFd` (close-on-exec).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{AdminAddr, Config};
use crate::proxy::quic::{Carried, FlowLine};

/// The handoff socket's file name, beside the database.
pub const SOCKET_NAME: &str = "mc-proxy.handoff.sock";
const SOCKET_MODE: u32 = 0o600;
/// The most descriptors one handoff carries (the kernel's SCM_MAX_FD).
const MAX_FDS: usize = 253;
/// The longest text a handoff carries.
const MAX_TEXT: usize = 64 * 1024;
/// How long either side waits for a short answer (`TAKE`, the sockets,
/// `BYE`).
const ANSWER_LIMIT: Duration = Duration::from_secs(10);
/// How long the old process waits, after `BYE`, for the new one to close
/// the connection.
const FAREWELL_LIMIT: Duration = Duration::from_secs(5);
/// How long the old process waits for the new one to start serving (it
/// opens the DB, reads certificates...).
const START_LIMIT: Duration = Duration::from_secs(300);

/// The handoff socket of the server whose config is `config`.
pub fn socket_path(config: &Config) -> PathBuf {
    let dir = config
        .database
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    dir.join(SOCKET_NAME)
}

/// What a handed-over socket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A `[[listeners]]` entry, by its `addr` as written in the config.
    Listener(String),
    /// The admin API, by its configured address.
    Admin(AdminAddr),
    /// The metrics endpoint, by its configured address.
    Metrics(SocketAddr),
    /// A `quic = true` listener's UDP socket, by the listener's `addr`.
    Quic(String),
}

impl Kind {
    fn line(&self) -> String {
        match self {
            Kind::Listener(text) => format!("listener {text}"),
            Kind::Admin(addr) => format!("admin {addr}"),
            Kind::Metrics(addr) => format!("metrics {addr}"),
            Kind::Quic(text) => format!("quic {text}"),
        }
    }

    fn parse(line: &str) -> Option<Kind> {
        let (word, rest) = line.split_once(' ')?;
        match word {
            "listener" => Some(Kind::Listener(rest.to_string())),
            "admin" => AdminAddr::parse(rest).ok().map(Kind::Admin),
            "metrics" => rest.parse().ok().map(Kind::Metrics),
            "quic" => Some(Kind::Quic(rest.to_string())),
            _ => None,
        }
    }
}

/// Why a handoff failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandoffError {
    #[error("handoff socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("handoff socket {}: the running server closed the connection without handing over its sockets", path.display())]
    Refused { path: PathBuf },
    #[error("handoff socket {}: unexpected answer: {answer}", path.display())]
    Protocol { path: PathBuf, answer: String },
    #[error("handoff socket {}: no server answers there: nothing to take over from (start one with `mc-proxy server`)", path.display())]
    Nobody { path: PathBuf },
}

/// The running server's side: its own copies of the sockets to hand over
/// and what to do once handed over.
pub struct Offer {
    pub sockets: Vec<(Kind, OwnedFd)>,
    /// This process, as the new one is told of it.
    pub server: Predecessor,
    /// Set to `true` when the new process has taken over (the admin API
    /// and the metrics endpoint stop accepting, the admin socket file is
    /// left to the new process).
    pub moved: watch::Sender<bool>,
    /// `true` once the admin API has stopped with every call answered
    /// (`None`: no admin API): `BYE` waits for it, so that what those
    /// calls committed is in the database before the new process re-reads
    /// it.
    pub admin_stopped: Option<watch::Receiver<bool>>,
    /// The QUIC listener tasks, asked for their open flows when the new
    /// process asks for them after `BYE`.
    pub carriers: crate::proxy::quic::Carriers,
}

/// The process that handed its sockets over: what `mc-proxy status` shows
/// of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predecessor {
    pub pid: u32,
    /// When it started (Unix time, ms).
    pub started_unix_ms: u64,
    /// `mc-proxy X.Y.Z`.
    pub version: String,
}

impl Predecessor {
    /// This process.
    pub fn this(started: std::time::SystemTime) -> Predecessor {
        Predecessor {
            pid: std::process::id(),
            started_unix_ms: started
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            version: format!("mc-proxy {}", crate::version()),
        }
    }

    fn line(&self) -> String {
        format!(
            "server {} {} {}",
            self.pid, self.started_unix_ms, self.version
        )
    }

    /// The rest of a `server` line; `None` if it does not parse.
    fn parse(rest: &str) -> Option<Predecessor> {
        let mut parts = rest.splitn(3, ' ');
        let pid = parts.next()?.parse().ok()?;
        let started_unix_ms = parts.next()?.parse().ok()?;
        let version = parts.next().unwrap_or("").chars().take(128).collect();
        Some(Predecessor {
            pid,
            started_unix_ms,
            version,
        })
    }
}

/// How long `BYE` waits for the admin calls in flight to be answered.
const ADMIN_DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads one `\n`-ended line of at most `max` bytes (a byte at a time: the
/// lines are short and nothing else is on the wire until answered).
fn read_line(stream: &mut UnixStream, max: usize) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 if line.is_empty() => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ if byte[0] == b'\n' => return Ok(Some(String::from_utf8_lossy(&line).into_owned())),
            _ if line.len() >= max => return Err(io::ErrorKind::InvalidData.into()),
            _ => line.push(byte[0]),
        }
    }
}

// ---- the new process ------------------------------------------------------

/// The sockets taken from the running server, and the connection to it
/// (closing it before [`Taken::serving`] tells it the start failed).
pub struct Taken {
    path: PathBuf,
    conn: UnixStream,
    pub sockets: Vec<(Kind, OwnedFd)>,
    /// Who handed them over (`None` if it did not say).
    pub predecessor: Option<Predecessor>,
}

/// Asks the server listening on `path` for its sockets. `Ok(None)`: no
/// server answers there (no file, or nobody listening): start normally.
pub fn take(path: &Path) -> Result<Option<Taken>, HandoffError> {
    let io_error = |source| HandoffError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = match UnixStream::connect(path) {
        Ok(conn) => conn,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io_error(e)),
    };
    conn.set_read_timeout(Some(ANSWER_LIMIT))
        .and_then(|()| conn.write_all(b"TAKE 1\n"))
        .map_err(io_error)?;

    let mut text = vec![0u8; MAX_TEXT];
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        &conn,
        &mut [IoSliceMut::new(&mut text)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| io_error(e.into()))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    if received.bytes == 0 {
        return Err(HandoffError::Refused {
            path: path.to_path_buf(),
        });
    }
    if received.flags.contains(ReturnFlags::CTRUNC) {
        return Err(HandoffError::Protocol {
            path: path.to_path_buf(),
            answer: "too many descriptors (truncated)".into(),
        });
    }
    // The text may come in more than one read (a stream socket); the
    // descriptors came with its first byte.
    let mut text_len = received.bytes;
    while !text[..text_len].ends_with(b"END\n") {
        if text_len == text.len() {
            return Err(HandoffError::Protocol {
                path: path.to_path_buf(),
                answer: "the socket list is too long".into(),
            });
        }
        match conn.read(&mut text[text_len..]).map_err(io_error)? {
            0 => {
                return Err(HandoffError::Refused {
                    path: path.to_path_buf(),
                })
            }
            n => text_len += n,
        }
    }
    let text = String::from_utf8_lossy(&text[..text_len]).into_owned();
    let mut predecessor = None;
    let mut lines = Vec::new();
    for line in text.lines().filter(|l| *l != "END") {
        match line.strip_prefix("server ") {
            Some(rest) => predecessor = Predecessor::parse(rest),
            None => lines.push(line),
        }
    }
    if lines.len() != fds.len() {
        return Err(HandoffError::Protocol {
            path: path.to_path_buf(),
            answer: format!("{} sockets named, {} passed", lines.len(), fds.len()),
        });
    }
    let mut sockets = Vec::with_capacity(fds.len());
    for (line, fd) in lines.into_iter().zip(fds) {
        match Kind::parse(line) {
            Some(kind) => sockets.push((kind, fd)),
            None => tracing::warn!(socket = line, "handoff: an unknown socket was closed"),
        }
    }
    Ok(Some(Taken {
        path: path.to_path_buf(),
        conn,
        sockets,
        predecessor,
    }))
}

impl Taken {
    /// Tells the old process this one is serving and waits for its `BYE`,
    /// then asks for its open QUIC flows (`FLOWS`; an old process that
    /// does not answer within a few seconds carries none). Dropping the
    /// [`Farewell`] closes the connection: the old process waits for that
    /// before it exits (step 5).
    pub fn serving(mut self) -> Result<(Farewell, Vec<Carried>), HandoffError> {
        let io_error = |source| HandoffError::Io {
            path: self.path.clone(),
            source,
        };
        self.conn.write_all(b"SERVING\n").map_err(io_error)?;
        match read_line(&mut self.conn, 64).map_err(io_error)? {
            Some(line) if line == "BYE" => {
                let flows = match self
                    .conn
                    .write_all(b"FLOWS\n")
                    .and_then(|()| receive_flows(&self.conn))
                {
                    Ok(flows) => flows,
                    Err(e) => {
                        tracing::warn!(error = %e, "handoff: no QUIC flows carried over");
                        Vec::new()
                    }
                };
                Ok((Farewell { _conn: self.conn }, flows))
            }
            Some(line) => Err(HandoffError::Protocol {
                path: self.path,
                answer: line,
            }),
            None => Err(HandoffError::Refused { path: self.path }),
        }
    }
}

/// The handoff connection after `BYE`: the old process exits once it is
/// dropped (or after a few seconds).
pub struct Farewell {
    _conn: UnixStream,
}

// ---- the running process --------------------------------------------------

/// The handoff socket, served: see [`serve`].
pub struct HandoffServer {
    path: PathBuf,
    identity: (u64, u64),
    handed_off: oneshot::Receiver<()>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// A handoff socket bound under a staging name beside `path` (mode 0600),
/// not yet where a new process looks: [`Bound::place`] moves it there,
/// and dropping it unplaced removes the file.
pub struct Bound {
    path: PathBuf,
    staging: Option<PathBuf>,
    /// `Some` until served.
    listener: Option<UnixListener>,
}

/// Binds the handoff socket for `path` under a staging name.
pub fn bind(path: &Path) -> io::Result<Bound> {
    let mut staging = path.as_os_str().to_os_string();
    staging.push(format!(".{}.new", std::process::id()));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)?;
    let bound = Bound {
        path: path.to_path_buf(),
        staging: Some(staging),
        listener: Some(listener),
    };
    if let Some(staging) = &bound.staging {
        std::fs::set_permissions(staging, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    }
    Ok(bound)
}

impl Bound {
    /// Moves the socket to its path, replacing whatever socket file is
    /// there (call it once nobody answered on it, or once the previous
    /// server said `BYE`). From here connections queue on it.
    pub fn place(&mut self) -> io::Result<()> {
        if let Some(staging) = &self.staging {
            std::fs::rename(staging, &self.path)?;
            self.staging = None;
        }
        Ok(())
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Some(staging) = self.staging.take() {
            let _ = std::fs::remove_file(staging);
        }
    }
}

/// Places `bound` (if not yet) and serves `offer` to whoever asks, one at
/// a time, until a handoff completes or [`HandoffServer::close`].
pub fn serve(mut bound: Bound, offer: Offer) -> io::Result<HandoffServer> {
    bound.place()?;
    let path = bound.path.clone();
    let identity = std::fs::symlink_metadata(&path).map(|m| (m.dev(), m.ino()))?;
    let listener = bound
        .listener
        .take()
        .ok_or_else(|| io::Error::other("the handoff socket is served already"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    tracing::info!(path = %path.display(), "handoff socket listening");

    let (done, handed_off) = oneshot::channel();
    let (stop, mut stopped) = oneshot::channel::<()>();
    let offer = Arc::new(Mutex::new(Some(offer)));
    let task = tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "handoff socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let offer = offer.clone();
            let give = tokio::task::spawn_blocking(move || {
                let stream = stream.into_std()?;
                stream.set_nonblocking(false)?;
                give(stream, &offer)
            });
            // The exchange runs while this waits: a stop meanwhile drops
            // the offer (the new process has its own copies by then).
            let outcome = tokio::select! {
                _ = &mut stopped => break,
                outcome = give => outcome,
            };
            match outcome {
                Ok(Ok(true)) => {
                    tracing::info!("handoff: the new process is serving; stopping");
                    let _ = done.send(());
                    break;
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(
                    error = %e,
                    "handoff: the new process did not take over; still serving"
                ),
                Err(e) => tracing::error!(error = %e, "handoff: the exchange failed"),
            }
        }
        // Our copies of the sockets close here (or once a running exchange
        // ends).
        offer.lock().unwrap_or_else(|e| e.into_inner()).take();
    });
    Ok(HandoffServer {
        path,
        identity,
        handed_off,
        stop: Some(stop),
        task,
    })
}

impl HandoffServer {
    /// Resolves once a new process has taken over (never, if none does).
    pub async fn handed_off(&mut self) {
        if (&mut self.handed_off).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Stops answering, drops this process's copies of the sockets, and
    /// removes the socket file unless another process replaced it.
    pub async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.identity => {
                let _ = std::fs::remove_file(&self.path);
            }
            _ => {}
        }
    }
}

/// One exchange, in a blocking thread: `Ok(true)` when the new process
/// took over and was told `BYE`; `Ok(false)` when it went away quietly.
fn give(mut stream: UnixStream, offer: &Mutex<Option<Offer>>) -> io::Result<bool> {
    stream.set_read_timeout(Some(ANSWER_LIMIT))?;
    match read_line(&mut stream, 64)? {
        Some(line) if line == "TAKE 1" => {}
        Some(line) => {
            tracing::warn!(request = %line, "handoff socket: unknown request");
            return Ok(false);
        }
        None => return Ok(false),
    }
    let moved = {
        let guard = offer.lock().unwrap_or_else(|e| e.into_inner());
        let Some(offer) = guard.as_ref() else {
            return Ok(false);
        };
        let mut text = String::new();
        for (kind, _) in &offer.sockets {
            text.push_str(&kind.line());
            text.push('\n');
        }
        text.push_str(&offer.server.line());
        text.push_str("\nEND\n");
        let fds: Vec<BorrowedFd<'_>> = offer.sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other(
                "the descriptors do not fit the control buffer",
            ));
        }
        let bytes = text.as_bytes();
        let sent = rustix::net::sendmsg(
            &stream,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        // The descriptors went with the first byte; the rest is text.
        stream.write_all(&bytes[sent..])?;
        tracing::info!(
            sockets = offer.sockets.len(),
            "handoff: sockets sent; waiting for the new process to serve"
        );
        (
            offer.moved.clone(),
            offer.admin_stopped.clone(),
            offer.carriers.clone(),
        )
    };
    let (moved, admin_stopped, carriers) = moved;
    stream.set_read_timeout(Some(START_LIMIT))?;
    match read_line(&mut stream, 64) {
        Ok(Some(line)) if line == "SERVING" => {}
        Ok(Some(line)) => {
            return Err(io::Error::other(format!(
                "unexpected answer {line:?} instead of SERVING"
            )))
        }
        Ok(None) | Err(_) => {
            return Err(io::Error::other(
                "the new process closed the connection before serving (its start failed)",
            ))
        }
    }
    // Admin API and metrics stop accepting before the new process is told
    // to take them alone.
    moved.send_replace(true);
    if let Some(mut admin_stopped) = admin_stopped {
        let answered = tokio::runtime::Handle::current().block_on(async {
            tokio::time::timeout(ADMIN_DRAIN_LIMIT, admin_stopped.wait_for(|s| *s))
                .await
                .is_ok()
        });
        if !answered {
            tracing::warn!(
                limit_ms = ADMIN_DRAIN_LIMIT.as_millis() as u64,
                "handoff: admin calls still running; saying BYE anyway"
            );
        }
    }
    if let Err(e) = stream.write_all(b"BYE\n") {
        tracing::warn!(error = %e, "handoff: cannot say BYE (the new process serves anyway)");
        return Ok(true);
    }
    // Step 5: a new process that carries QUIC flows asks for them
    // (`FLOWS`); then it closes the connection once it has told systemd it
    // is the main process. (Whatever else comes is read and dropped, for
    // at most FAREWELL_LIMIT in all.)
    stream.set_read_timeout(Some(FAREWELL_LIMIT))?;
    if let Ok(Some(line)) = read_line(&mut stream, 64) {
        if line == "FLOWS" {
            let flows =
                tokio::runtime::Handle::current().block_on(async { carriers.export().await });
            if let Err(e) = send_flows(&stream, flows) {
                tracing::warn!(error = %e, "handoff: cannot hand over the QUIC flows");
            }
        }
    }
    let deadline = std::time::Instant::now() + FAREWELL_LIMIT;
    let mut rest = [0u8; 64];
    while std::time::Instant::now() < deadline && matches!(stream.read(&mut rest), Ok(n) if n > 0) {
    }
    Ok(true)
}

/// The properties of the handoff's line parsers, for the `handoff_lines`
/// fuzz target and the replay of its corpus: any bytes, taken as lines;
/// each line read as a socket line, a `server` line and a `flow` line never
/// panics, and whatever parses writes a line that parses back to the same.
pub fn check_lines(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        if let Some(kind) = Kind::parse(line) {
            let again = kind.line();
            assert_eq!(Kind::parse(&again), Some(kind), "{line:?} -> {again:?}");
        }
        if let Some(server) = line.strip_prefix("server ").and_then(Predecessor::parse) {
            let again = server.line();
            let back = again.strip_prefix("server ").and_then(Predecessor::parse);
            assert_eq!(back, Some(server), "{line:?} -> {again:?}");
        }
        if let Some(flow) = FlowLine::parse(line) {
            let again = flow.line();
            assert_eq!(
                again.as_deref().and_then(FlowLine::parse),
                Some(flow),
                "{line:?} -> {again:?}"
            );
        }
    }
}

/// Flows per `sendmsg` (their descriptors go with the first byte).
const FLOWS_PER_MESSAGE: usize = 64;

/// How long the new process waits for each part of the flows' answer.
const FLOWS_LIMIT: Duration = Duration::from_secs(2);

/// The old process's answer to `FLOWS`: a `flow` line per flow, in
/// messages of at most [`FLOWS_PER_MESSAGE`] lines that carry their
/// descriptors in order, then `END`. A flow that cannot be written on one
/// line is closed.
fn send_flows(mut stream: &UnixStream, flows: Vec<Carried>) -> io::Result<()> {
    let flows: Vec<(String, Carried)> = flows
        .into_iter()
        .filter_map(|flow| flow.line().map(|line| (line, flow)))
        .collect();
    for batch in flows.chunks(FLOWS_PER_MESSAGE) {
        let mut text = String::new();
        for (line, _) in batch {
            text.push_str(line);
            text.push('\n');
        }
        let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, f)| f.socket.as_fd()).collect();
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other(
                "the descriptors do not fit the control buffer",
            ));
        }
        let bytes = text.as_bytes();
        let sent = rustix::net::sendmsg(
            stream,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        stream.write_all(&bytes[sent..])?;
    }
    stream.write_all(b"END\n")?;
    Ok(())
}

/// Reads the answer to `FLOWS` (see [`send_flows`]): the flows, each with
/// its descriptor. A line that does not parse closes its descriptor.
fn receive_flows(stream: &UnixStream) -> io::Result<Vec<Carried>> {
    stream.set_read_timeout(Some(FLOWS_LIMIT))?;
    let mut flows = Vec::new();
    let mut fds = std::collections::VecDeque::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = vec![0u8; MAX_TEXT];
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    loop {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut buffer)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds.extend(rights);
            }
        }
        if received.flags.contains(ReturnFlags::CTRUNC) {
            return Err(io::Error::other("too many descriptors (truncated)"));
        }
        if received.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        pending.extend_from_slice(&buffer[..received.bytes]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..=end);
            if line == "END" {
                return Ok(flows);
            }
            // Each line came with its descriptor, in order.
            let Some(fd) = fds.pop_front() else {
                return Err(io::Error::other("a flow line without its descriptor"));
            };
            match Carried::parse(&line, fd) {
                Some(flow) => flows.push(flow),
                None => {
                    tracing::warn!(line = %line, "handoff: a QUIC flow line that does not parse; closed")
                }
            }
        }
        if pending.len() > MAX_TEXT {
            return Err(io::ErrorKind::InvalidData.into());
        }
    }
}

/// Sorts the taken sockets for the new process's config: listeners by
/// their config text (else by bound address), the admin API's and the
/// metrics endpoint's if the config still names the same address. What no
/// part of the config names is closed (logged).
pub fn sort(config: &Config, sockets: Vec<(Kind, OwnedFd)>) -> Received {
    let mut received = Received::default();
    let mut listeners: Vec<(String, TcpListener)> = Vec::new();
    let mut by_addr: Vec<TcpListener> = Vec::new();
    let mut quic_by_addr: Vec<UdpSocket> = Vec::new();
    for (kind, fd) in sockets {
        match kind {
            Kind::Listener(text) => {
                let socket = TcpListener::from(fd);
                if config.listeners.iter().any(|l| l.addr.text == text)
                    && !listeners.iter().any(|(t, _)| *t == text)
                {
                    listeners.push((text, socket));
                } else {
                    by_addr.push(socket);
                }
            }
            // The admin API's and the metrics endpoint's sockets: by the
            // configured address, or (TCP) by the address they are bound to
            // (the old config said `127.0.0.1:0`, the new one the port it got).
            Kind::Admin(AdminAddr::Unix(path)) => match &config.grpc {
                Some(grpc) if grpc.addr == AdminAddr::Unix(path.clone()) => {
                    received.admin = Some(crate::admin::server::AdminListener::Unix(
                        UnixListener::from(fd),
                    ));
                }
                _ => received
                    .unused
                    .push(format!("admin unix:{}", path.display())),
            },
            Kind::Admin(AdminAddr::Tcp(addr)) => {
                let socket = TcpListener::from(fd);
                match &config.grpc {
                    Some(grpc) if names_tcp(&grpc.addr, addr, &socket) => {
                        received.admin = Some(crate::admin::server::AdminListener::Tcp(socket));
                    }
                    _ => received.unused.push(format!("admin {addr}")),
                }
            }
            Kind::Quic(text) => {
                let socket = UdpSocket::from(fd);
                if config
                    .listeners
                    .iter()
                    .any(|l| l.quic && l.addr.text == text)
                    && !received.quic.iter().any(|(t, _)| *t == text)
                {
                    received.quic.push((text, socket));
                } else {
                    quic_by_addr.push(socket);
                }
            }
            Kind::Metrics(addr) => {
                let socket = TcpListener::from(fd);
                match &config.metrics {
                    Some(metrics) if names_tcp(&AdminAddr::Tcp(metrics.addr), addr, &socket) => {
                        received.metrics = Some(socket);
                    }
                    _ => received.unused.push(format!("metrics {addr}")),
                }
            }
        }
    }
    place_by_addr(
        config,
        by_addr,
        |s| s.local_addr().ok(),
        |_| true,
        &mut listeners,
        &mut received.unused,
        "listener",
    );
    place_by_addr(
        config,
        quic_by_addr,
        |s| s.local_addr().ok(),
        |l| l.quic,
        &mut received.quic,
        &mut received.unused,
        "quic",
    );
    received.listeners = listeners;
    received
}

/// Places sockets handed over under a name no listener of the config has,
/// by the address they are bound to: each goes to the first listener that
/// `wants` it, names that address and has no socket in `placed` yet; the
/// rest are closed and listed in `unused` as `WORD ADDR`.
fn place_by_addr<S>(
    config: &Config,
    sockets: Vec<S>,
    local: impl Fn(&S) -> Option<SocketAddr>,
    wants: impl Fn(&crate::config::ListenerConfig) -> bool,
    placed: &mut Vec<(String, S)>,
    unused: &mut Vec<String>,
    word: &str,
) {
    for socket in sockets {
        let local = local(&socket);
        let named = local.and_then(|local| {
            config
                .listeners
                .iter()
                .find(|l| {
                    wants(l)
                        && crate::proxy::activation::names(l, local)
                        && !placed.iter().any(|(t, _)| *t == l.addr.text)
                })
                .map(|l| l.addr.text.clone())
        });
        match named {
            Some(text) => placed.push((text, socket)),
            None => unused.push(format!(
                "{word} {}",
                local.map_or_else(|| "?".to_string(), |a| a.to_string())
            )),
        }
    }
}

/// Whether the configured TCP address `wanted` names a socket handed over
/// as configured at `was` and bound at `socket`'s address.
fn names_tcp(wanted: &AdminAddr, was: SocketAddr, socket: &TcpListener) -> bool {
    let AdminAddr::Tcp(wanted) = wanted else {
        return false;
    };
    *wanted == was || socket.local_addr().is_ok_and(|bound| bound == *wanted)
}

/// The taken sockets, sorted for the config by [`sort`].
#[derive(Default)]
pub struct Received {
    pub listeners: Vec<(String, TcpListener)>,
    pub admin: Option<crate::admin::server::AdminListener>,
    pub metrics: Option<TcpListener>,
    /// `quic = true` listeners' UDP sockets, by listener `addr`.
    pub quic: Vec<(String, UdpSocket)>,
    /// What no part of the config names (already closed).
    pub unused: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("/srv/x/mc-proxy.toml")).unwrap()
    }

    #[test]
    fn socket_lines_round_trip_and_malformed_ones_are_refused() {
        for kind in [
            Kind::Listener(":443".into()),
            Kind::Listener("127.0.0.1:0".into()),
            Kind::Admin(AdminAddr::parse("unix:/srv/x/admin.sock").unwrap()),
            Kind::Admin(AdminAddr::parse("127.0.0.1:9090").unwrap()),
            Kind::Metrics("127.0.0.1:9100".parse().unwrap()),
            Kind::Quic(":443".into()),
        ] {
            assert_eq!(Kind::parse(&kind.line()), Some(kind));
        }
        for bad in [
            "",
            "listener",
            "admin nonsense",
            "metrics :x",
            "metrics 1.2.3.4",
            "socket 1.2.3.4:5",
            "\u{0}\u{0}",
        ] {
            assert_eq!(Kind::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_server_line_round_trips_and_bounds_the_version() {
        let me = Predecessor {
            pid: 42,
            started_unix_ms: 1_700_000_000_123,
            version: "mc-proxy 0.1.0 (abc)".into(),
        };
        let line = me.line();
        let rest = line.strip_prefix("server ").unwrap();
        assert_eq!(Predecessor::parse(rest), Some(me));
        assert_eq!(Predecessor::parse("x 1 v"), None);
        assert_eq!(Predecessor::parse("1 y v"), None);
        assert_eq!(Predecessor::parse(""), None);
        let long = format!("1 2 {}", "v".repeat(10_000));
        assert_eq!(Predecessor::parse(&long).unwrap().version.len(), 128);
    }

    #[test]
    fn a_line_is_bounded_and_a_cut_one_is_an_error() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"TAKE 1\nrest").unwrap();
        drop(b);
        assert_eq!(read_line(&mut a, 64).unwrap().as_deref(), Some("TAKE 1"));
        assert_eq!(
            read_line(&mut a, 64).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[b'x'; 100]).unwrap();
        assert_eq!(
            read_line(&mut a, 64).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let (mut a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert_eq!(read_line(&mut a, 64).unwrap(), None);
    }

    /// A fake running server at `path` that answers a `TAKE` with `answer`
    /// (no descriptors) and then closes.
    fn answering(path: &Path, answer: Vec<u8>) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let _ = read_line(&mut stream, 64);
            let _ = stream.write_all(&answer);
        })
    }

    #[test]
    fn taking_from_a_broken_or_hostile_server_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        // Nobody there: a normal start.
        assert!(take(&path).unwrap().is_none());
        // A stale file nobody listens on: a normal start too.
        drop(UnixListener::bind(&path).unwrap());
        assert!(take(&path).unwrap().is_none());
        std::fs::remove_file(&path).unwrap();

        let cases: Vec<(Vec<u8>, &str)> = vec![
            // Closes without a word.
            (Vec::new(), "closed the connection"),
            // Names a socket but passes none.
            (
                b"listener :443\nEND\n".to_vec(),
                "1 sockets named, 0 passed",
            ),
            // Never says END.
            (b"listener :443\n".to_vec(), "closed the connection"),
            // An endless list.
            (vec![b'x'; MAX_TEXT + 10], "too long"),
        ];
        for (answer, want) in cases {
            let _ = std::fs::remove_file(&path);
            let server = answering(&path, answer);
            let err = match take(&path) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("took from a server that answered badly ({want})"),
            };
            assert!(err.contains(want), "{err} (want {want})");
            server.join().unwrap();
        }
        // No sockets, only who it is: nothing taken, the predecessor known.
        let _ = std::fs::remove_file(&path);
        let server = answering(&path, b"server 7 8 mc-proxy 9\nEND\n".to_vec());
        let taken = take(&path).unwrap().unwrap();
        assert!(taken.sockets.is_empty());
        assert_eq!(taken.predecessor.as_ref().map(|p| p.pid), Some(7));
        server.join().unwrap();
        // ... and its start failing (the connection closed before
        // SERVING) is what the old process sees as "did not take over".
        drop(taken);
    }

    fn offer() -> (Mutex<Option<Offer>>, watch::Receiver<bool>) {
        let (moved, moved_rx) = watch::channel(false);
        let offer = Offer {
            sockets: Vec::new(),
            server: Predecessor::this(std::time::SystemTime::now()),
            moved,
            admin_stopped: None,
            carriers: Default::default(),
        };
        (Mutex::new(Some(offer)), moved_rx)
    }

    #[test]
    fn the_running_server_ignores_a_wrong_request_and_survives_a_new_one_that_leaves() {
        let (offer, moved) = offer();
        // An unknown request: nothing sent, still offering.
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"GIVE ME EVERYTHING\n").unwrap();
        assert!(!give(a, &offer).unwrap());
        assert!(offer.lock().unwrap().is_some());
        // A new process that takes and then goes away before SERVING.
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"TAKE 1\n").unwrap();
        let new = std::thread::spawn(move || {
            let mut text = vec![0u8; 4096];
            let n = b.read(&mut text).unwrap();
            String::from_utf8_lossy(&text[..n]).into_owned()
        });
        assert!(give(a, &offer).is_err());
        let sent = new.join().unwrap();
        assert!(sent.starts_with("server "), "{sent}");
        assert!(!*moved.borrow(), "the admin API stopped for a failed start");
        assert!(offer.lock().unwrap().is_some());
    }

    #[test]
    fn received_sockets_are_sorted_by_text_then_by_bound_address() {
        let one = TcpListener::bind("127.0.0.1:0").unwrap();
        let two = TcpListener::bind("127.0.0.1:0").unwrap();
        let stray = TcpListener::bind("127.0.0.1:0").unwrap();
        let two_addr = two.local_addr().unwrap();
        let cfg = config(&format!(
            "[database]\npath = \"/srv/x/mc-proxy.db\"\n\n\
             [[listeners]]\naddr = \"127.0.0.1:0\"\n\n\
             [[listeners]]\naddr = \"{two_addr}\"\n"
        ));
        let received = sort(
            &cfg,
            vec![
                (Kind::Listener("127.0.0.1:0".into()), OwnedFd::from(one)),
                // Configured as :0 before, named by its port now.
                (Kind::Listener("127.0.0.2:0".into()), OwnedFd::from(two)),
                (Kind::Listener("127.0.0.3:0".into()), OwnedFd::from(stray)),
                (
                    Kind::Metrics("127.0.0.1:9100".parse().unwrap()),
                    OwnedFd::from(TcpListener::bind("127.0.0.1:0").unwrap()),
                ),
            ],
        );
        let texts: Vec<&str> = received.listeners.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(texts, ["127.0.0.1:0", two_addr.to_string().as_str()]);
        assert_eq!(received.unused.len(), 2, "{:?}", received.unused);
        assert!(received.metrics.is_none());
    }

    #[test]
    fn quic_sockets_are_sorted_by_text_then_by_bound_address_to_quic_listeners_only() {
        let udp = || UdpSocket::bind("127.0.0.1:0").unwrap();
        let (one, two, plain, stray) = (udp(), udp(), udp(), udp());
        let two_addr = two.local_addr().unwrap();
        let plain_addr = plain.local_addr().unwrap();
        let cfg = config(&format!(
            "[database]\npath = \"/srv/x/mc-proxy.db\"\n\n\
             [[listeners]]\naddr = \"127.0.0.1:0\"\nquic = true\n\n\
             [[listeners]]\naddr = \"{two_addr}\"\nquic = true\n\n\
             [[listeners]]\naddr = \"{plain_addr}\"\n"
        ));
        let received = sort(
            &cfg,
            vec![
                (Kind::Quic("127.0.0.1:0".into()), OwnedFd::from(one)),
                // Configured as :0 before, named by its port now.
                (Kind::Quic("127.0.0.2:0".into()), OwnedFd::from(two)),
                // Its listener no longer has quic = true.
                (Kind::Quic("127.0.0.4:0".into()), OwnedFd::from(plain)),
                (Kind::Quic("127.0.0.3:0".into()), OwnedFd::from(stray)),
            ],
        );
        let texts: Vec<&str> = received.quic.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(texts, ["127.0.0.1:0", two_addr.to_string().as_str()]);
        assert!(received.listeners.is_empty());
        assert_eq!(received.unused.len(), 2, "{:?}", received.unused);
        assert!(received.unused.iter().all(|u| u.starts_with("quic ")));
    }
}
