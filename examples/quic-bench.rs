//! QUIC passthrough benchmark (issue 18 item 4, SPEC §6.5), loopback only:
//! mc-proxy's UDP flow relay against the client talking to the backend
//! directly, in one run.
//!
//! One mc-proxy listener with `quic = true` (TCP and UDP on the same port)
//! and one L4 route, `bench.test`, to a backend that is this program started
//! again with `--serve-backend`: a UDP socket and a TCP socket on the same
//! port, so the one route serves both transports. A flow starts with a real
//! client Initial (QUIC v1, 8-byte DCID, the ClientHello naming
//! `bench.test` in one CRYPTO frame, padded to 1,200 bytes, built with
//! `wire::quic::build`), which the backend echoes; after that the proxy
//! relays without decrypting, so the benchmark's own datagrams look like
//! 1-RTT packets (first byte `0x41`, then the Initial's DCID) and carry a
//! small command header. Each figure is measured for `proxy` (client →
//! mc-proxy → backend) and `direct` (client → backend, the same sockets
//! and code otherwise) in the same run, alternating.
//!
//! Phases (`--phases`):
//!
//! - `throughput`: a windowed bulk transfer over one established flow, both
//!   ways: `down` (the backend sends, the client receives: a download) and
//!   `up`. The sender keeps at most `--windows` datagrams of `--size` bytes
//!   unacknowledged; the receiver acknowledges the highest sequence number
//!   seen every `--ack-every` datagrams. A sender that hears no
//!   acknowledgement for 20 ms counts a stall and writes everything in
//!   flight off (what was lost stays lost: nothing is retransmitted). At the
//!   end the sender reports how many it sent and the receiver how many it
//!   got: the difference is the loss, counted, never hidden. A window that
//!   fits every socket buffer on the path (64 × 1,200 B) measures the relay
//!   at its own pace; a larger one (256) overruns the default 208 KiB
//!   receive buffers whenever a hop falls behind and shows what the relay
//!   drops under overload. Where datagrams were dropped is read from the
//!   `drops` column of /proc/net/udp for the proxy's own sockets (its
//!   listening socket apart from its flows' backend sockets) beside the
//!   machine's `RcvbufErrors`. Goodput is received bytes ÷ the transfer's
//!   wall time; CPU per GiB is the proxy's CPU ÷ received GiB, next to the
//!   two endpoints' CPU per GiB in the direct run; the proxy's % of a core
//!   shows whether it was the bottleneck (client, proxy and backend share
//!   the machine's CPUs).
//! - `latency`: sequential ping-pong of `--lat-size`-byte messages on
//!   established paths, sample by sample across four targets: UDP direct,
//!   UDP through the proxy's flow, TCP direct and TCP through the proxy's
//!   L4 route (one kept-alive connection: ClientHello, then echo). p50/p99
//!   per repetition; *added* is proxy minus direct within the same
//!   repetition. The issue's target: QUIC added p50 ≤ TCP added p50.
//! - `latency-busy`: the same with a thread of this program spinning on
//!   one CPU throughout. On an idle machine every proxied round trip (TCP
//!   as much as UDP) also carries the wake-up of a process on an idle
//!   (virtual) CPU, tens of µs that the direct paths do not show; with one
//!   CPU busy the figures are the path's own work.
//! - `flows`: a fresh proxy; `--flows` client sockets (bound on distinct
//!   127.77.X.Y addresses so ports never run short), each sending one
//!   Initial with its own DCID and waiting for its echo (batches of
//!   `--flow-batch`, up to 3 tries). The proxy's VmRSS (`/proc/PID/status`)
//!   and descriptor count before and after, (after − before) ÷ flows. The
//!   per-flow kernel socket is not in RSS; the machine's slab growth is
//!   shown beside it (noisy: the whole machine). Every 100th flow is pinged
//!   again afterwards to show it is still relayed.
//!
//! CPU is utime+stime from `/proc/PID/stat` (10 ms ticks) of the proxy, the
//! backend and this process (the client); "foreign" is the machine's busy
//! time (`/proc/stat`) beyond those, as % of all CPUs. Before each
//! measurement the run waits (bounded) for the machine to be quiet. The
//! proxy logs at `info` (it must: the `listening` line gives the port it
//! bound); no line is written per datagram.
//!
//! ```text
//! cargo build --release --bin mc-proxy --example quic-bench
//! target/release/examples/quic-bench --out bench/results-quic-….md     # ~3 min
//! target/release/examples/quic-bench --direct-only --phases throughput,latency   # the baseline alone
//! ```
//!
//! `QUIC_BENCH_DEBUG=1` makes the backend log every command and download.
//! `--lat-targets udp-proxy` (or `tcp-proxy`) times one path alone, for a
//! profile of the proxy (e.g. `--bin` a wrapper that runs it under
//! `strace -f`).
//!
//! `--bin` defaults to `mc-proxy` next to this program's `examples/`
//! directory (the same target directory). Children get SIGKILL if this
//! process dies (PR_SET_PDEATHSIG) and are stopped when a phase ends or
//! fails.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use wire::hello::build as hello;
use wire::quic::build::Client as InitialBuilder;
use wire::quic::Version;

/// The route's hostname (the ClientHello's SNI, in TCP and in the Initial).
const HOST: &str = "bench.test";
const DCID_LEN: usize = 8;
/// The benchmark's header after the Initial: first byte, DCID, command,
/// two u64 fields.
const HDR: usize = 1 + DCID_LEN + 1 + 8 + 8;
/// A 1-RTT-looking first byte (fixed bit set, long-header bit clear).
const SHORT: u8 = 0x41;

/// Commands in byte `1 + DCID_LEN`.
mod cmd {
    /// Echo me (a latency probe).
    pub const ECHO: u8 = 1;
    /// Bulk data: field a = sequence number.
    pub const DATA: u8 = 2;
    /// Acknowledgement: a = highest sequence number received.
    pub const ACK: u8 = 3;
    /// Client → backend: send to me; a = milliseconds, b = window << 32 | size.
    pub const START_DOWN: u8 = 4;
    /// Client → backend: I will send; a = ack every. Echoed as the go.
    pub const START_UP: u8 = 5;
    /// Sender → receiver: done; a = datagrams sent.
    pub const END: u8 = 6;
    /// Receiver → sender: a = datagrams received, b = bytes received.
    pub const DONE: u8 = 7;
}

#[derive(Parser, Debug, Clone)]
#[command(about = "QUIC (UDP flow) passthrough benchmark: mc-proxy vs direct on loopback")]
struct Args {
    /// mc-proxy binary (default: `mc-proxy` in this program's target
    /// directory).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Comma-separated phases: throughput, latency, latency-busy (the same
    /// with one CPU kept busy), flows.
    #[arg(long, default_value = "throughput,latency,latency-busy,flows")]
    phases: String,
    /// Measure the direct baseline only (no proxy started).
    #[arg(long)]
    direct_only: bool,
    /// throughput: repetitions (each runs every window, direction and
    /// target once, the targets' order alternating).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// throughput: seconds per transfer.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// throughput: comma-separated windows (datagrams in flight).
    #[arg(long, default_value = "64,256")]
    windows: String,
    /// throughput: datagram size in bytes (UDP payload).
    #[arg(long, default_value_t = 1200)]
    size: usize,
    /// throughput: the receiver acknowledges every this many datagrams.
    #[arg(long, default_value_t = 8)]
    ack_every: u64,
    /// latency: repetitions.
    #[arg(long, default_value_t = 5)]
    lat_reps: usize,
    /// latency: samples per target and repetition.
    #[arg(long, default_value_t = 2000)]
    lat_samples: usize,
    /// latency: comma-separated targets (a subset, to profile one path).
    #[arg(long, default_value = "udp-direct,udp-proxy,tcp-direct,tcp-proxy")]
    lat_targets: String,
    /// latency: message size (UDP payload, TCP write).
    #[arg(long, default_value_t = 64)]
    lat_size: usize,
    /// flows: flows opened.
    #[arg(long, default_value_t = 10_000)]
    flows: usize,
    /// flows: Initials sent before waiting for their echoes.
    #[arg(long, default_value_t = 64)]
    flow_batch: usize,
    /// Before each measurement, wait (bounded) until the machine is under
    /// this % busy beyond our processes (0 = don't wait).
    #[arg(long, default_value_t = 15.0)]
    quiet_pct: f64,
    /// The most seconds spent waiting for quiet over the whole run.
    #[arg(long, default_value_t = 120.0)]
    quiet_budget: f64,
    /// Also write the report (Markdown) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Internal: run as the backend.
    #[arg(long, hide = true)]
    serve_backend: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.serve_backend {
        return serve_backend();
    }
    run(args)
}

// ---- datagrams ---------------------------------------------------------------

fn put(buf: &mut [u8], dcid: &[u8; DCID_LEN], command: u8, a: u64, b: u64) {
    buf[0] = SHORT;
    buf[1..1 + DCID_LEN].copy_from_slice(dcid);
    buf[1 + DCID_LEN] = command;
    buf[2 + DCID_LEN..10 + DCID_LEN].copy_from_slice(&a.to_be_bytes());
    buf[10 + DCID_LEN..HDR].copy_from_slice(&b.to_be_bytes());
}

/// (command, a, b) of one of the benchmark's datagrams; `None` for anything
/// else (an Initial, say).
fn parse(d: &[u8]) -> Option<(u8, u64, u64)> {
    if d.len() < HDR || d[0] & 0xc0 != 0x40 {
        return None;
    }
    let field = |at: usize| u64::from_be_bytes(d[at..at + 8].try_into().expect("8 bytes"));
    Some((d[1 + DCID_LEN], field(2 + DCID_LEN), field(10 + DCID_LEN)))
}

fn dcid_of(d: &[u8]) -> [u8; DCID_LEN] {
    let mut dcid = [0u8; DCID_LEN];
    if d.len() > DCID_LEN {
        dcid.copy_from_slice(&d[1..1 + DCID_LEN]);
    }
    dcid
}

fn flow_dcid(tag: u8, i: u64) -> [u8; DCID_LEN] {
    let mut dcid = [0u8; DCID_LEN];
    dcid[0] = tag;
    dcid[1] = 0x5a;
    dcid[2..].copy_from_slice(&i.to_be_bytes()[2..]);
    dcid
}

/// A client Initial for `bench.test` (1,200 bytes, QUIC v1).
fn initial(dcid: &[u8; DCID_LEN]) -> Vec<u8> {
    let scid = [0xc1, dcid[7], dcid[6], dcid[5], 1, 2, 3, 4];
    InitialBuilder::new(Version::V1, dcid, &scid).datagram(&hello::hello_message(Some(HOST), 0))
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Bigger socket buffers for the endpoints, so that what is lost is lost in
/// the relay (the proxy's sockets keep their defaults).
fn big_buffers(socket: &UdpSocket) {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
}

#[derive(Default, Debug)]
struct Sent {
    sent: u64,
    stalls: u64,
    /// The receiver's (datagrams, bytes), if its DONE arrived.
    done: Option<(u64, u64)>,
    /// A datagram other than DONE, ACK or DATA that arrived while waiting
    /// for DONE (the client's next command, faster direct than the DONE
    /// through the proxy): the caller's to handle.
    next: Option<(Vec<u8>, SocketAddr)>,
}

/// The windowed sender: DATA datagrams of `size` bytes for `dur`, at most
/// `window` unacknowledged; then END until the receiver's DONE (1 s at
/// most). `dest`: `None` on a connected socket.
fn send_windowed(
    sock: &UdpSocket,
    dest: Option<SocketAddr>,
    dcid: &[u8; DCID_LEN],
    size: usize,
    window: u64,
    dur: Duration,
) -> io::Result<Sent> {
    let mut pkt = vec![0u8; size.max(HDR)];
    let mut buf = vec![0u8; 65536];
    let send = |p: &[u8]| match dest {
        Some(d) => sock.send_to(p, d),
        None => sock.send(p),
    };
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let (mut next, mut acked, mut stalls) = (0u64, 0u64, 0u64);
    let end = Instant::now() + dur;
    while Instant::now() < end {
        while next - acked < window {
            put(&mut pkt, dcid, cmd::DATA, next, 0);
            send(&pkt)?;
            next += 1;
        }
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                if let Some((cmd::ACK, highest, _)) = parse(&buf[..n]) {
                    acked = acked.max(highest + 1).min(next);
                }
            }
            Err(e) if timed_out(&e) => {
                stalls += 1;
                acked = next;
            }
            Err(e) => return Err(e),
        }
    }
    let mut result = Sent {
        sent: next,
        stalls,
        ..Sent::default()
    };
    let mut end_pkt = [0u8; HDR];
    put(&mut end_pkt, dcid, cmd::END, next, 0);
    'tries: for _ in 0..50 {
        send(&end_pkt)?;
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, src)) => match parse(&buf[..n]) {
                    Some((cmd::DONE, got, bytes)) => {
                        result.done = Some((got, bytes));
                        break 'tries;
                    }
                    Some((cmd::ACK | cmd::DATA, _, _)) => {}
                    _ => {
                        result.next = Some((buf[..n].to_vec(), src));
                        break 'tries;
                    }
                },
                Err(e) if timed_out(&e) => break,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(result)
}

#[derive(Clone, Copy, Default, Debug)]
struct Received {
    got: u64,
    bytes: u64,
    /// What the sender says it sent (its END).
    sent: u64,
}

/// The client's receiver (download): ACK every `ack_every`, DONE on END.
/// Fails if nothing arrives for `idle`.
fn receive_windowed(sock: &UdpSocket, ack_every: u64, idle: Duration) -> io::Result<Received> {
    let mut buf = vec![0u8; 65536];
    let mut ack = [0u8; HDR];
    sock.set_read_timeout(Some(idle))?;
    let (mut got, mut bytes, mut highest, mut since) = (0u64, 0u64, 0u64, 0u64);
    loop {
        let n = sock.recv(&mut buf)?;
        match parse(&buf[..n]) {
            Some((cmd::DATA, seq, _)) => {
                got += 1;
                bytes += n as u64;
                highest = highest.max(seq);
                since += 1;
                if since >= ack_every {
                    put(&mut ack, &dcid_of(&buf[..n]), cmd::ACK, highest, 0);
                    sock.send(&ack)?;
                    since = 0;
                }
            }
            Some((cmd::END, sent, _)) => {
                put(&mut ack, &dcid_of(&buf[..n]), cmd::DONE, got, bytes);
                sock.send(&ack)?;
                return Ok(Received { got, bytes, sent });
            }
            _ => {}
        }
    }
}

/// Reads whatever is queued on a (blocking) socket without waiting.
fn drain(sock: &UdpSocket) {
    let mut buf = vec![0u8; 65536];
    let _ = sock.set_nonblocking(true);
    while sock.recv(&mut buf).is_ok() {}
    let _ = sock.set_nonblocking(false);
}

// ---- the backend -----------------------------------------------------------------

/// UDP and TCP on one port of 127.0.0.1; writes `PORT n` on stdout.
fn serve_backend() -> Result<()> {
    let (udp, tcp) = bind_pair()?;
    big_buffers(&udp);
    let port = udp.local_addr()?.port();
    println!("PORT {port}");
    io::stdout().flush()?;
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            std::thread::spawn(move || tcp_echo(stream));
        }
    });
    udp_backend(&udp)?;
    Ok(())
}

fn bind_pair() -> Result<(UdpSocket, TcpListener)> {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            return Ok((udp, tcp));
        }
    }
    bail!("no port free for both UDP and TCP on 127.0.0.1")
}

fn tcp_echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Echoes what it does not understand (the Initial, ECHO); receives uploads
/// (ACK every k, DONE on END); sends downloads (START_DOWN).
fn udp_backend(sock: &UdpSocket) -> io::Result<()> {
    let mut buf = vec![0u8; 65536];
    let mut reply = [0u8; HDR];
    let (mut got, mut bytes, mut highest, mut since, mut every) = (0u64, 0u64, 0u64, 0u64, 8u64);
    let debug = std::env::var_os("QUIC_BENCH_DEBUG").is_some();
    let mut next: Option<(Vec<u8>, SocketAddr)> = None;
    loop {
        let (n, src) = if let Some((d, src)) = next.take() {
            buf[..d.len()].copy_from_slice(&d);
            (d.len(), src)
        } else {
            sock.set_read_timeout(None)?;
            match sock.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            }
        };
        let d = &buf[..n];
        let dcid = dcid_of(d);
        if debug && !matches!(parse(d), Some((cmd::DATA, _, _))) {
            eprintln!("[backend] from {src}: {n} B {:?}", parse(d));
        }
        match parse(d) {
            Some((cmd::DATA, seq, _)) => {
                got += 1;
                bytes += n as u64;
                highest = highest.max(seq);
                since += 1;
                if since >= every {
                    put(&mut reply, &dcid, cmd::ACK, highest, 0);
                    let _ = sock.send_to(&reply, src);
                    since = 0;
                }
            }
            Some((cmd::START_UP, k, _)) => {
                (got, bytes, highest, since, every) = (0, 0, 0, 0, k.max(1));
                let _ = sock.send_to(d, src);
            }
            Some((cmd::END, _, _)) => {
                put(&mut reply, &dcid, cmd::DONE, got, bytes);
                let _ = sock.send_to(&reply, src);
            }
            Some((cmd::START_DOWN, ms, packed)) => {
                let (window, size) = (packed >> 32, (packed & 0xffff_ffff) as usize);
                let sent = send_windowed(
                    sock,
                    Some(src),
                    &dcid,
                    size,
                    window,
                    Duration::from_millis(ms),
                );
                if debug {
                    eprintln!("[backend] download to {src}: {sent:?}");
                }
                if let Ok(sent) = sent {
                    next = sent.next;
                }
            }
            Some((cmd::ACK | cmd::DONE, _, _)) => {}
            _ => {
                let _ = sock.send_to(d, src);
            }
        }
    }
}

// ---- processes -------------------------------------------------------------------

/// The one system call without a safe wrapper in our dependencies.
mod sys {
    use std::os::unix::process::CommandExt as _;
    use std::process::Command;

    /// The child gets SIGKILL when the thread that spawned it dies.
    pub fn die_with_parent(command: &mut Command) {
        // SAFETY: the closure runs in the forked child before exec and calls
        // only prctl(2), which is async-signal-safe; it allocates nothing
        // and takes no lock.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// A started child; killed and reaped when dropped.
struct Proc {
    child: Child,
    log: Option<PathBuf>,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let tail = self
                .log
                .as_ref()
                .and_then(|l| std::fs::read_to_string(l).ok())
                .map(|t| t[t.len().saturating_sub(2000)..].to_string())
                .unwrap_or_default();
            bail!("child {} exited early: {status}\n{tail}", self.pid());
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Backend {
    proc: Proc,
    port: u16,
}

fn start_backend() -> Result<Backend> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("--serve-backend")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    sys::die_with_parent(&mut command);
    let mut child = command.spawn().context("starting the backend")?;
    let stdout = child.stdout.take().context("backend stdout")?;
    let mut proc = Proc { child, log: None };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let Some(port) = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
    else {
        proc.check()?;
        bail!("backend said {line:?}");
    };
    Ok(Backend { proc, port })
}

struct Proxy {
    proc: Proc,
    /// TCP and UDP.
    addr: SocketAddr,
    quic: bool,
    /// The metrics endpoint.
    metrics: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

fn start_proxy(bin: &Path, backend_port: u16, max_flows: usize) -> Result<Proxy> {
    let dir = tempfile::tempdir()?;
    let config = format!(
        "[database]\npath = \"{db}\"\n\n[log]\nlevel = \"info\"\n\n\
         [proxy]\nconnect_timeout = \"2s\"\nhandshake_timeout = \"30s\"\nidle_timeout = \"600s\"\n\
         shutdown_timeout = \"1s\"\nmax_quic_flows = {max_flows}\n\n\
         [metrics]\naddr = \"127.0.0.1:0\"\n\n\
         [[listeners]]\naddr = \"127.0.0.1:0\"\nquic = true\n\
         \x20 [[listeners.routes]]\n  hostname = \"{HOST}\"\n  backend = \"127.0.0.1:{backend_port}\"\n",
        db = dir.path().join("mc-proxy.db").display()
    );
    let path = dir.path().join("mc-proxy.toml");
    std::fs::write(&path, config)?;
    let log = dir.path().join("mc-proxy.log");
    let mut command = Command::new(bin);
    command
        .arg("server")
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    sys::die_with_parent(&mut command);
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut proc = Proc {
        child,
        log: Some(log.clone()),
    };
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .map(strip_ansi)
            .find(|l| l.contains("listening") && l.contains(" listener=") && l.contains(" addr="))
        {
            let addr = field(&line, "addr")
                .and_then(|a| a.parse().ok())
                .with_context(|| format!("no addr= in {line:?}"))?;
            let quic = field(&line, "quic") == Some("true");
            let metrics = text
                .lines()
                .map(strip_ansi)
                .find(|l| l.contains("metrics endpoint listening"))
                .and_then(|l| field(&l, "addr")?.parse().ok());
            if metrics.is_none() && started.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            return Ok(Proxy {
                proc,
                addr,
                quic,
                metrics,
                _dir: dir,
            });
        }
        proc.check()?;
        if started.elapsed() > Duration::from_secs(30) {
            bail!("no listening line in 30 s:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `mc_proxy_quic_datagrams_dropped_total` by reason, from the metrics
/// endpoint (empty if there is none).
fn quic_drops(metrics: Option<SocketAddr>) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Some(addr) = metrics else {
        return out;
    };
    let text = (|| -> io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })()
    .unwrap_or_default();
    for line in text.lines() {
        if !line.starts_with("mc_proxy_quic_datagrams_dropped") {
            continue;
        }
        let reason = line
            .split("reason=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?");
        let value = line
            .split_whitespace()
            .last()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        *out.entry(reason.to_string()).or_default() += value as u64;
    }
    out
}

/// What grew between two [`quic_drops`] readings, as `reason=n` text.
fn drops_between(
    a: &std::collections::BTreeMap<String, u64>,
    b: &std::collections::BTreeMap<String, u64>,
) -> String {
    let grew: Vec<String> = b
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(a.get(k).copied().unwrap_or(0));
            (d > 0).then(|| format!("{k}={d}"))
        })
        .collect();
    if grew.is_empty() {
        "0".into()
    } else {
        grew.join(" ")
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()
}

// ---- /proc -------------------------------------------------------------------------

struct ProcFs {
    ticks: f64,
    ncpu: f64,
}

impl ProcFs {
    fn new() -> ProcFs {
        let ticks = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0);
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        ProcFs { ticks, ncpu }
    }

    /// utime+stime of a process (all its threads), in seconds.
    fn cpu_s(&self, pid: &str) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (tick(11) + tick(12)) / self.ticks
    }

    /// Non-idle CPU seconds of the whole machine.
    fn busy_s(&self) -> f64 {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let values: Vec<f64> = text
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let total: f64 = values.iter().take(8).sum();
        let idle = values.get(3).copied().unwrap_or(0.0) + values.get(4).copied().unwrap_or(0.0);
        (total - idle) / self.ticks
    }
}

/// A `kB` line of a /proc file, in bytes.
fn kb_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

fn vm_rss(pid: u32) -> u64 {
    kb_field(&format!("/proc/{pid}/status"), "VmRSS:").unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The socket inodes a process holds.
fn socket_inodes(pid: u32) -> std::collections::HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Default::default();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Datagrams dropped (receive buffer full) on the UDP sockets of `pid`,
/// from the `drops` column of /proc/net/udp and udp6: (on the socket bound
/// to `listen_port`, on the others — the flows' backend sockets).
fn udp_drops(pid: u32, listen_port: u16) -> (u64, u64) {
    let inodes = socket_inodes(pid);
    let mut drops = (0, 0);
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let inode = f.get(9).and_then(|v| v.parse::<u64>().ok());
            if inode.is_some_and(|i| inodes.contains(&i)) {
                let n = f.last().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                let port = f
                    .get(1)
                    .and_then(|a| a.rsplit_once(':'))
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
                if port == Some(listen_port) {
                    drops.0 += n;
                } else {
                    drops.1 += n;
                }
            }
        }
    }
    drops
}

/// UDP `RcvbufErrors` and `SndbufErrors` of the machine (/proc/net/snmp).
fn udp_errors() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return (0, 0);
    };
    let get = |key: &str| {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    (get("RcvbufErrors"), get("SndbufErrors"))
}

#[derive(Clone, Copy)]
struct Snap {
    at: Instant,
    proxy: f64,
    backend: f64,
    client: f64,
    busy: f64,
    udp_errors: (u64, u64),
    proxy_drops: (u64, u64),
}

struct Meter<'a> {
    procfs: &'a ProcFs,
    /// pid, listening port.
    proxy: Option<(u32, u16)>,
    backend: u32,
}

impl Meter<'_> {
    fn snap(&self) -> Snap {
        Snap {
            at: Instant::now(),
            proxy: self
                .proxy
                .map_or(0.0, |(p, _)| self.procfs.cpu_s(&p.to_string())),
            backend: self.procfs.cpu_s(&self.backend.to_string()),
            client: self.procfs.cpu_s("self"),
            busy: self.procfs.busy_s(),
            udp_errors: udp_errors(),
            proxy_drops: self
                .proxy
                .map_or((0, 0), |(pid, port)| udp_drops(pid, port)),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Span {
    secs: f64,
    proxy: f64,
    backend: f64,
    client: f64,
    foreign_pct: f64,
    rcvbuf_errors: u64,
    proxy_drops: (u64, u64),
}

impl Span {
    fn between(a: Snap, b: Snap, ncpu: f64) -> Span {
        let secs = b.at.duration_since(a.at).as_secs_f64();
        let (proxy, backend, client) = (
            b.proxy - a.proxy,
            b.backend - a.backend,
            b.client - a.client,
        );
        let foreign = (b.busy - a.busy - proxy - backend - client).max(0.0);
        Span {
            secs,
            proxy,
            backend,
            client,
            foreign_pct: 100.0 * foreign / secs / ncpu,
            rcvbuf_errors: b.udp_errors.0.saturating_sub(a.udp_errors.0),
            proxy_drops: (
                b.proxy_drops.0.saturating_sub(a.proxy_drops.0),
                b.proxy_drops.1.saturating_sub(a.proxy_drops.1),
            ),
        }
    }
}

/// Waits (bounded by the run's budget) until the machine's load beyond our
/// own processes, sampled for 0.3 s, is under `--quiet-pct`.
struct Quiet<'a> {
    max_pct: f64,
    budget: f64,
    procfs: &'a ProcFs,
    gave_up: usize,
}

impl Quiet<'_> {
    fn wait(&mut self, label: &str, ours: &[u32]) {
        if self.max_pct <= 0.0 {
            return;
        }
        let own = || -> f64 {
            ours.iter()
                .map(|pid| self.procfs.cpu_s(&pid.to_string()))
                .sum::<f64>()
                + self.procfs.cpu_s("self")
        };
        let start = Instant::now();
        loop {
            let (b0, o0, t0) = (self.procfs.busy_s(), own(), Instant::now());
            std::thread::sleep(Duration::from_millis(300));
            let foreign = (self.procfs.busy_s() - b0) - (own() - o0);
            let busy = 100.0 * foreign / t0.elapsed().as_secs_f64() / self.procfs.ncpu;
            if busy <= self.max_pct {
                break;
            }
            if start.elapsed().as_secs_f64() >= self.budget {
                self.gave_up += 1;
                eprintln!("[quic-bench] {label}: machine {busy:.0}% busy (not us), quiet budget spent; measuring anyway");
                break;
            }
            std::thread::sleep(Duration::from_millis(700));
        }
        let spent = start.elapsed().as_secs_f64();
        self.budget = (self.budget - spent).max(0.0);
        if spent > 1.5 {
            eprintln!("[quic-bench] {label}: waited {spent:.1} s for the machine to be quiet");
        }
    }
}

// ---- the report --------------------------------------------------------------------

#[derive(Default)]
struct Report {
    text: String,
}

impl Report {
    fn line(&mut self, line: impl AsRef<str>) {
        println!("{}", line.as_ref());
        let _ = io::stdout().flush();
        self.text.push_str(line.as_ref());
        self.text.push('\n');
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// "median (min–max)".
fn spread(values: &[f64], digits: usize) -> String {
    let (lo, hi) = range(values);
    if values.len() < 2 {
        return format!("{:.*}", digits, median(values));
    }
    format!(
        "{:.*} ({lo:.*}–{hi:.*})",
        digits,
        median(values),
        digits,
        digits
    )
}

// ---- run ---------------------------------------------------------------------------

/// What the summary table needs from the phases.
#[derive(Default)]
struct Summary {
    rows: Vec<String>,
}

fn run(args: Args) -> Result<()> {
    let procfs = ProcFs::new();
    let mut report = Report::default();
    // Children inherit the raised limit (the proxy holds a socket per flow).
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => {
            let exe = std::env::current_exe()?;
            let dir = exe.parent().and_then(Path::parent).context("exe path")?;
            dir.join("mc-proxy")
        }
    };
    if !args.direct_only && !bin.exists() {
        bail!(
            "{} not found (cargo build --release --bin mc-proxy, or --bin)",
            bin.display()
        );
    }
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let sysctl = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    report.line(format!(
        "# quic-bench {date}\n\nbinary `{}`, HEAD {commit}, {} CPUs, RLIMIT_NOFILE {nofile}, \
         load average at start {}, net.core.rmem_default {} (a socket's receive buffer unless \
         it sets one: the proxy's flow sockets), rmem_max {} (the proxy's listening socket and \
         the benchmark's endpoints ask for 4 MiB), args: `{}`\n",
        bin.display(),
        procfs.ncpu,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        sysctl("rmem_default"),
        sysctl("rmem_max"),
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    ));
    let mut quiet = Quiet {
        max_pct: args.quiet_pct,
        budget: args.quiet_budget,
        procfs: &procfs,
        gave_up: 0,
    };
    let mut summary = Summary::default();
    for phase in args.phases.split(',').map(str::trim) {
        match phase {
            "throughput" => {
                throughput_phase(&args, &bin, &procfs, &mut quiet, &mut report, &mut summary)?
            }
            "latency" | "latency-busy" => latency_phase(
                &args,
                &bin,
                phase == "latency-busy",
                &mut quiet,
                &mut report,
                &mut summary,
            )?,
            "flows" => {
                if args.direct_only {
                    report.line("(flows: skipped, --direct-only)\n");
                } else {
                    flows_phase(&args, &bin, &mut quiet, &mut report, &mut summary)?
                }
            }
            other => bail!("unknown phase {other:?}"),
        }
    }
    report.line("## Summary\n");
    report.line("| figure | proxy | direct | proxy ÷ direct | target |");
    report.line("|---|---|---|---|---|");
    for row in &summary.rows {
        report.line(row);
    }
    if quiet.gave_up > 0 {
        report.line(format!(
            "\n{} measurement(s) started on a busy machine (quiet budget spent).",
            quiet.gave_up
        ));
    }
    report.line("");
    if let Some(out) = &args.out {
        std::fs::write(out, &report.text).with_context(|| format!("writing {}", out.display()))?;
        println!("report written to {}", out.display());
    }
    Ok(())
}

/// A client socket with an established path to `target`: the Initial sent
/// (up to 3 times) and its echo received.
fn open_flow(bind: IpAddr, target: SocketAddr, dcid: &[u8; DCID_LEN]) -> Result<UdpSocket> {
    let sock = UdpSocket::bind((bind, 0))?;
    big_buffers(&sock);
    sock.connect(target)?;
    let first = initial(dcid);
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = vec![0u8; 65536];
    for _ in 0..6 {
        sock.send(&first)?;
        match sock.recv(&mut buf) {
            Ok(n) if buf[..n] == first[..] => return Ok(sock),
            Ok(_) => {}
            Err(e) if timed_out(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("flow to {target}")),
        }
    }
    bail!("no echo of the Initial from {target} in 3 s")
}

struct Path2 {
    name: &'static str,
    sock: UdpSocket,
    dcid: [u8; DCID_LEN],
}

// ---- throughput phase ------------------------------------------------------------------

fn throughput_phase(
    args: &Args,
    bin: &Path,
    procfs: &ProcFs,
    quiet: &mut Quiet,
    report: &mut Report,
    summary: &mut Summary,
) -> Result<()> {
    let windows: Vec<u64> = args
        .windows
        .split(',')
        .map(|w| w.trim().parse().context("--windows"))
        .collect::<Result<_>>()?;
    if windows.iter().any(|&w| w < 2 * args.ack_every) {
        bail!("every window must be at least 2 × --ack-every");
    }
    let mut backend = start_backend()?;
    let backend_addr = SocketAddr::from(([127, 0, 0, 1], backend.port));
    let mut proxy = if args.direct_only {
        None
    } else {
        Some(start_proxy(bin, backend.port, 1000)?)
    };
    if let Some(p) = &proxy {
        if !p.quic {
            eprintln!("[quic-bench] the listening line has no quic=true; trying anyway");
        }
    }
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut paths = vec![Path2 {
        name: "direct",
        sock: open_flow(local, backend_addr, &flow_dcid(0xd1, 1))?,
        dcid: flow_dcid(0xd1, 1),
    }];
    if let Some(p) = &proxy {
        paths.push(Path2 {
            name: "proxy",
            sock: open_flow(local, p.addr, &flow_dcid(0xd2, 1))
                .context("a flow through the proxy")?,
            dcid: flow_dcid(0xd2, 1),
        });
    }
    let meter = Meter {
        procfs,
        proxy: proxy.as_ref().map(|p| (p.proc.pid(), p.addr.port())),
        backend: backend.proc.pid(),
    };
    let mut ours = vec![backend.proc.pid()];
    ours.extend(meter.proxy.map(|(pid, _)| pid));
    report.line(format!(
        "## throughput: windowed bulk transfer over one flow\n\n\
         {} repetitions × {} s per transfer; datagrams of {} B (UDP payload); the receiver \
         acknowledges every {} datagrams; windows {:?} datagrams in flight; a sender that hears \
         nothing for 20 ms writes its window off (a stall). down = backend → client, up = client → \
         backend. Goodput counts received bytes; loss = sent − received. CPU in seconds per GiB \
         received; `ends` = client + backend.\n",
        args.reps, args.secs, args.size, args.ack_every, windows
    ));
    report.line("| rep | window | dir | path | sent | received | loss % | stalls | MiB/s | datagrams/s | proxy CPU s/GiB | ends CPU s/GiB | proxy µs/datagram | proxy % of a core | machine rcvbuf errors | proxy drops: listening socket | proxy drops: flow sockets | proxy's own drop counters | foreign % |");
    report.line("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // (window, dir, path) → per-rep (MiB/s, loss %, proxy s/GiB, ends s/GiB, proxy µs/dg)
    let mut results: std::collections::BTreeMap<(u64, &str, &str), Vec<[f64; 8]>> =
        Default::default();
    let dur = Duration::from_secs_f64(args.secs);
    for rep in 0..args.reps {
        for &window in &windows {
            for dir in ["down", "up"] {
                let n = paths.len();
                for k in 0..n {
                    let path = &paths[(k + rep) % n];
                    if let Some(p) = proxy.as_mut() {
                        p.proc.check()?;
                    }
                    backend.proc.check()?;
                    quiet.wait(
                        &format!("rep {} {window} {dir} {}", rep + 1, path.name),
                        &ours,
                    );
                    drain(&path.sock);
                    let metrics = proxy.as_ref().and_then(|p| p.metrics);
                    let counted0 = quic_drops(metrics);
                    let a = meter.snap();
                    let (sent, got, bytes, stalls) = match dir {
                        "down" => {
                            let mut start = [0u8; HDR];
                            put(
                                &mut start,
                                &path.dcid,
                                cmd::START_DOWN,
                                dur.as_millis() as u64,
                                window << 32 | args.size as u64,
                            );
                            path.sock.send(&start)?;
                            let r = receive_windowed(
                                &path.sock,
                                args.ack_every,
                                Duration::from_secs(3),
                            )
                            .with_context(|| format!("download over {}", path.name))?;
                            (r.sent, r.got, r.bytes, None)
                        }
                        _ => {
                            let mut start = [0u8; HDR];
                            put(&mut start, &path.dcid, cmd::START_UP, args.ack_every, 0);
                            path.sock.set_read_timeout(Some(Duration::from_secs(2)))?;
                            path.sock.send(&start)?;
                            let mut buf = [0u8; 2048];
                            loop {
                                let n = path
                                    .sock
                                    .recv(&mut buf)
                                    .with_context(|| format!("START_UP over {}", path.name))?;
                                if matches!(parse(&buf[..n]), Some((cmd::START_UP, _, _))) {
                                    break;
                                }
                            }
                            let s = send_windowed(
                                &path.sock, None, &path.dcid, args.size, window, dur,
                            )?;
                            let (got, bytes) = s.done.with_context(|| {
                                format!("upload over {}: no DONE from the backend", path.name)
                            })?;
                            (s.sent, got, bytes, Some(s.stalls))
                        }
                    };
                    let b = meter.snap();
                    let counted = if path.name == "proxy" {
                        drops_between(&counted0, &quic_drops(metrics))
                    } else {
                        "–".into()
                    };
                    let span = Span::between(a, b, procfs.ncpu);
                    let gib = bytes as f64 / (1u64 << 30) as f64;
                    let mibs = bytes as f64 / (1u64 << 20) as f64 / span.secs;
                    let loss = 100.0 * (sent.saturating_sub(got)) as f64 / sent.max(1) as f64;
                    let proxy_per_gib = span.proxy / gib;
                    let ends_per_gib = (span.client + span.backend) / gib;
                    let proxy_us = span.proxy * 1e6 / got.max(1) as f64;
                    report.line(format!(
                        "| {} | {window} | {dir} | {} | {sent} | {got} | {loss:.3} | {} | {mibs:.1} | {:.0} | {} | {ends_per_gib:.2} | {} | {:.0} | {} | {} | {} | {counted} | {:.1} |",
                        rep + 1,
                        path.name,
                        stalls.map_or("(backend)".into(), |s| s.to_string()),
                        got as f64 / span.secs,
                        if path.name == "direct" { format!("({proxy_per_gib:.2} idle)") } else { format!("{proxy_per_gib:.2}") },
                        if path.name == "direct" { "–".into() } else { format!("{proxy_us:.2}") },
                        100.0 * span.proxy / span.secs,
                        span.rcvbuf_errors,
                        span.proxy_drops.0,
                        span.proxy_drops.1,
                        span.foreign_pct
                    ));
                    results.entry((window, dir, path.name)).or_default().push([
                        mibs,
                        loss,
                        proxy_per_gib,
                        ends_per_gib,
                        proxy_us,
                        span.proxy_drops.0 as f64,
                        sent.saturating_sub(got) as f64,
                        span.proxy_drops.1 as f64,
                    ]);
                }
            }
        }
    }
    report.line("");
    report.line("| window | dir | path | MiB/s | loss % | proxy CPU s/GiB | ends CPU s/GiB | proxy µs/datagram | MiB/s ÷ direct | proxy CPU ÷ direct ends CPU |");
    report.line("|---|---|---|---|---|---|---|---|---|---|");
    for &window in &windows {
        for dir in ["down", "up"] {
            let col = |name: &str, i: usize| -> Vec<f64> {
                results
                    .get(&(window, dir, name))
                    .map(|v| v.iter().map(|r| r[i]).collect())
                    .unwrap_or_default()
            };
            let direct_mibs = median(&col("direct", 0));
            let direct_ends = median(&col("direct", 3));
            for path in &paths {
                let name = path.name;
                let is_proxy = name == "proxy";
                let ratio_tp = median(&col(name, 0)) / direct_mibs;
                let ratio_cpu = median(&col(name, 2)) / direct_ends;
                report.line(format!(
                    "| {window} | {dir} | {name} | {} | {} | {} | {} | {} | {} | {} |",
                    spread(&col(name, 0), 1),
                    spread(&col(name, 1), 3),
                    if is_proxy {
                        spread(&col(name, 2), 2)
                    } else {
                        "–".into()
                    },
                    spread(&col(name, 3), 2),
                    if is_proxy {
                        spread(&col(name, 4), 2)
                    } else {
                        "–".into()
                    },
                    if is_proxy {
                        format!("{ratio_tp:.3}")
                    } else {
                        "".into()
                    },
                    if is_proxy {
                        format!("{ratio_cpu:.3}")
                    } else {
                        "".into()
                    },
                ));
                if is_proxy {
                    summary.rows.push(format!(
                        "| goodput {dir}, window {window} (MiB/s) | {:.1} | {direct_mibs:.1} | {ratio_tp:.3} | |",
                        median(&col(name, 0))
                    ));
                    let lost: f64 = col(name, 6).iter().sum();
                    let at_listen: f64 = col(name, 5).iter().sum();
                    let at_flow: f64 = col(name, 7).iter().sum();
                    summary.rows.push(format!(
                        "| loss {dir}, window {window} (%) | {:.3} ({lost:.0} datagrams lost over {} runs; dropped on the proxy's listening socket: {at_listen:.0}, on its flow socket: {at_flow:.0}) | {:.3} | | counted |",
                        median(&col(name, 1)),
                        col(name, 1).len(),
                        median(&col("direct", 1))
                    ));
                    summary.rows.push(format!(
                        "| proxy CPU per GiB {dir}, window {window} (s) | {:.2} | ends: {direct_ends:.2} | {ratio_cpu:.3} (÷ direct ends' CPU) | |",
                        median(&col(name, 2))
                    ));
                }
            }
        }
    }
    report.line("");
    if let Some(p) = proxy.as_mut() {
        p.proc.check()?;
    }
    drop(paths);
    drop(proxy);
    Ok(())
}

// ---- latency phase ---------------------------------------------------------------------

enum Pinger {
    Udp(UdpSocket, [u8; DCID_LEN]),
    Tcp(TcpStream),
}

impl Pinger {
    fn tcp(addr: SocketAddr) -> Result<Pinger> {
        let mut s = TcpStream::connect(addr).with_context(|| format!("TCP to {addr}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let h = hello::client_hello(Some(HOST));
        s.write_all(&h)?;
        let mut back = vec![0u8; h.len()];
        s.read_exact(&mut back)
            .with_context(|| format!("the echoed ClientHello from {addr}"))?;
        if back != h {
            bail!("{addr} echoed something else than the ClientHello");
        }
        Ok(Pinger::Tcp(s))
    }

    /// One round trip of `msg`, in µs.
    fn ping(&mut self, msg: &mut [u8], seq: u64, buf: &mut [u8]) -> io::Result<f64> {
        match self {
            Pinger::Udp(sock, dcid) => {
                put(msg, dcid, cmd::ECHO, seq, 0);
                let t0 = Instant::now();
                sock.send(msg)?;
                loop {
                    let n = sock.recv(buf)?;
                    if matches!(parse(&buf[..n]), Some((cmd::ECHO, s, _)) if s == seq) {
                        return Ok(t0.elapsed().as_secs_f64() * 1e6);
                    }
                }
            }
            Pinger::Tcp(s) => {
                msg[..8].copy_from_slice(&seq.to_be_bytes());
                let t0 = Instant::now();
                s.write_all(msg)?;
                s.read_exact(&mut buf[..msg.len()])?;
                let us = t0.elapsed().as_secs_f64() * 1e6;
                if buf[..msg.len()] != msg[..] {
                    return Err(io::Error::other("TCP echo differs"));
                }
                Ok(us)
            }
        }
    }
}

/// A thread of this process spinning on one CPU while it lives.
struct Spinner {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    fn start() -> Spinner {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        Spinner {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `spin`: one CPU kept busy by a spinning thread of this process during
/// the samples (on an idle machine, every hop's wake-up of an idle
/// virtual CPU is in the figures; with one CPU busy the three processes
/// mostly share the other, and the figures are the path's own work).
fn latency_phase(
    args: &Args,
    bin: &Path,
    spin: bool,
    quiet: &mut Quiet,
    report: &mut Report,
    summary: &mut Summary,
) -> Result<()> {
    let cond = if spin {
        ", one CPU busy"
    } else {
        ", idle machine"
    };
    let mut backend = start_backend()?;
    let backend_addr = SocketAddr::from(([127, 0, 0, 1], backend.port));
    let mut proxy = if args.direct_only {
        None
    } else {
        Some(start_proxy(bin, backend.port, 1000)?)
    };
    let mut ours = vec![backend.proc.pid()];
    ours.extend(proxy.as_ref().map(|p| p.proc.pid()));
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let size = args.lat_size.max(HDR);
    report.line(format!(
        "## latency{cond}: sequential ping-pong of {size}-byte messages on established paths\n\n\
         {}{} repetitions × {} samples per target, sample by sample across the targets (their \
         order rotated each repetition); UDP: one datagram each way over an established flow; \
         TCP: one kept-alive connection (ClientHello first, through the proxy's L4 route). \
         µs; added = proxy − direct in the same repetition.\n",
        if spin {
            "A thread of the benchmark spins on one CPU throughout (no idle CPU to wake). "
        } else {
            "Nothing else runs: each hop may wake an idle CPU. "
        },
        args.lat_reps,
        args.lat_samples
    ));
    let names: Vec<&str> = args
        .lat_targets
        .split(',')
        .map(str::trim)
        .filter(|n| proxy.is_some() || n.ends_with("-direct"))
        .collect();
    for name in &names {
        if !["udp-direct", "udp-proxy", "tcp-direct", "tcp-proxy"].contains(name) {
            bail!("unknown latency target {name:?}");
        }
    }
    report.line("| rep | target | p50 | p99 | mean | added p50 | added p99 | errors |");
    report.line("|---|---|---|---|---|---|---|---|");
    let mut p50s: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut p99s: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut added50: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut added99: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut errors_total = 0u64;
    for rep in 0..args.lat_reps {
        if let Some(p) = proxy.as_mut() {
            p.proc.check()?;
        }
        backend.proc.check()?;
        let mut pingers = Vec::new();
        for (k, name) in names.iter().enumerate() {
            let dcid = flow_dcid(0xe0 + k as u8, rep as u64);
            let target = if name.ends_with("direct") {
                backend_addr
            } else {
                proxy.as_ref().expect("proxy").addr
            };
            let p = if name.starts_with("udp") {
                let sock = open_flow(local, target, &dcid)?;
                sock.set_read_timeout(Some(Duration::from_secs(1)))?;
                Pinger::Udp(sock, dcid)
            } else {
                Pinger::tcp(target)?
            };
            pingers.push(p);
        }
        let mut msg = vec![0u8; size];
        let mut buf = vec![0u8; 65536];
        // Warm-up.
        for p in pingers.iter_mut() {
            for s in 0..200 {
                p.ping(&mut msg, s, &mut buf)?;
            }
        }
        quiet.wait(&format!("latency rep {}", rep + 1), &ours);
        let spinner = spin.then(Spinner::start);
        let n = names.len();
        let mut samples = vec![Vec::with_capacity(args.lat_samples); n];
        let mut errors = vec![0u64; n];
        for i in 0..args.lat_samples {
            for k in 0..n {
                let j = (k + i + rep) % n;
                match pingers[j].ping(&mut msg, 1000 + i as u64, &mut buf) {
                    Ok(us) => samples[j].push(us),
                    Err(_) => errors[j] += 1,
                }
            }
        }
        drop(spinner);
        let stats: Vec<(f64, f64, f64)> = samples
            .iter_mut()
            .map(|s| {
                s.sort_by(f64::total_cmp);
                let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
                (percentile(s, 0.5), percentile(s, 0.99), mean)
            })
            .collect();
        for (j, name) in names.iter().enumerate() {
            let (p50, p99, mean) = stats[j];
            p50s.entry(name).or_default().push(p50);
            p99s.entry(name).or_default().push(p99);
            let direct = names
                .iter()
                .position(|m| *m == format!("{}-direct", &name[..3]))
                .filter(|&d| d != j);
            let added = direct.map(|d| (p50 - stats[d].0, p99 - stats[d].1));
            if let Some((a50, a99)) = added {
                added50.entry(name).or_default().push(a50);
                added99.entry(name).or_default().push(a99);
            }
            errors_total += errors[j];
            report.line(format!(
                "| {} | {name} | {p50:.1} | {p99:.1} | {mean:.1} | {} | {} | {} |",
                rep + 1,
                added.map_or("".into(), |a| format!("{:.1}", a.0)),
                added.map_or("".into(), |a| format!("{:.1}", a.1)),
                errors[j]
            ));
        }
    }
    report.line("");
    report.line("| target | p50 µs | p99 µs | added p50 µs | added p99 µs |");
    report.line("|---|---|---|---|---|");
    let get = |m: &std::collections::BTreeMap<&str, Vec<f64>>, k: &str| -> Vec<f64> {
        m.get(k).cloned().unwrap_or_default()
    };
    for name in &names {
        report.line(format!(
            "| {name} | {} | {} | {} | {} |",
            spread(&get(&p50s, name), 1),
            spread(&get(&p99s, name), 1),
            spread(&get(&added50, name), 1),
            spread(&get(&added99, name), 1),
        ));
    }
    report.line(format!("\nerrors (timeouts): {errors_total}\n"));
    for t in ["udp", "tcp"] {
        let (d50, d99) = (
            median(&get(&p50s, &format!("{t}-direct"))),
            median(&get(&p99s, &format!("{t}-direct"))),
        );
        let (x50, x99) = (
            median(&get(&p50s, &format!("{t}-proxy"))),
            median(&get(&p99s, &format!("{t}-proxy"))),
        );
        let label = if t == "udp" { "QUIC (UDP)" } else { "TCP L4" };
        // Added: the median over repetitions of (proxy − direct) within a
        // repetition; the ratio: of the medians.
        let (a50, a99) = (
            median(&get(&added50, &format!("{t}-proxy"))),
            median(&get(&added99, &format!("{t}-proxy"))),
        );
        summary.rows.push(format!(
            "| {label} round trip p50{cond} (µs) | {x50:.1} | {d50:.1} | {:.3} (added {a50:.1} µs) | |",
            x50 / d50,
        ));
        summary.rows.push(format!(
            "| {label} round trip p99{cond} (µs) | {x99:.1} | {d99:.1} | {:.3} (added {a99:.1} µs) | |",
            x99 / d99,
        ));
    }
    let (q, t) = (
        median(&get(&added50, "udp-proxy")),
        median(&get(&added50, "tcp-proxy")),
    );
    if q.is_finite() && t.is_finite() {
        // Per repetition too: the same repetition's two added figures.
        let paired: Vec<f64> = get(&added50, "udp-proxy")
            .iter()
            .zip(get(&added50, "tcp-proxy"))
            .map(|(q, t)| q - t)
            .collect();
        let met = q <= t;
        summary.rows.push(format!(
            "| added p50{cond}: QUIC − TCP L4 (µs) | {:.1} | | | QUIC added p50 ≤ TCP added p50 ({q:.1} vs {t:.1} µs; per repetition QUIC − TCP: {}): **{}** |",
            q - t,
            spread(&paired, 1),
            if met { "met" } else { "missed" }
        ));
    }
    drop(proxy);
    Ok(())
}

// ---- flows phase -----------------------------------------------------------------------

fn flows_phase(
    args: &Args,
    bin: &Path,
    quiet: &mut Quiet,
    report: &mut Report,
    summary: &mut Summary,
) -> Result<()> {
    let n = args.flows;
    let mut backend = start_backend()?;
    let mut proxy = start_proxy(bin, backend.port, n + 1000)?;
    let pid = proxy.proc.pid();
    let warm = (n / 100).clamp(10, 200);
    report.line(format!(
        "## flows: memory per established flow\n\n\
         A fresh proxy (`max_quic_flows = {}`, `idle_timeout = 600s`); {warm} flows opened first \
         (warm-up), then RSS and descriptors read; {n} more flows opened, each from its own client \
         socket (127.77.X.Y), one Initial (1,200 B, its own DCID) and its echo; 1 s later RSS \
         and descriptors read again.\n",
        n + 1000
    ));
    let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(127, 77, (i / 200) as u8, (i % 200 + 1) as u8));
    // Sockets first (their kernel memory is not the proxy's), then Initials.
    let mut socks = Vec::with_capacity(warm + n);
    for i in 0..warm + n {
        let s = UdpSocket::bind((ip(i), 0)).with_context(|| format!("client socket {i}"))?;
        s.connect(proxy.addr)?;
        s.set_nonblocking(true)?;
        socks.push(s);
    }
    let initials: Vec<Vec<u8>> = (0..warm + n)
        .map(|i| initial(&flow_dcid(0xf1, i as u64)))
        .collect();
    let open = |range: std::ops::Range<usize>, proxy: &mut Proxy| -> Result<(usize, usize)> {
        let mut ok = 0;
        let mut retried = 0;
        let mut buf = vec![0u8; 2048];
        let ids: Vec<usize> = range.collect();
        for batch in ids.chunks(args.flow_batch.max(1)) {
            let mut pending: Vec<usize> = batch.to_vec();
            for attempt in 0..3 {
                if attempt > 0 {
                    retried += pending.len();
                }
                for &i in &pending {
                    let _ = socks[i].send(&initials[i]);
                }
                let deadline = Instant::now() + Duration::from_millis(1000);
                while !pending.is_empty() && Instant::now() < deadline {
                    pending.retain(|&i| match socks[i].recv(&mut buf) {
                        Ok(_) => {
                            ok += 1;
                            false
                        }
                        Err(_) => true,
                    });
                    if !pending.is_empty() {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                if pending.is_empty() {
                    break;
                }
            }
            if !pending.is_empty() {
                proxy.proc.check()?;
            }
        }
        Ok((ok, retried))
    };
    let (warm_ok, _) = open(0..warm, &mut proxy)?;
    if warm_ok == 0 {
        bail!("no flow through the proxy answered during the warm-up");
    }
    std::thread::sleep(Duration::from_secs(1));
    quiet.wait("flows", &[pid, backend.proc.pid()]);
    let slab = || kb_field("/proc/meminfo", "Slab:").unwrap_or(0) as f64;
    let (rss0, fds0, slab0) = (vm_rss(pid), fds(pid), slab());
    // Five slices, RSS read after each (the flow table grows by doubling,
    // so the figure per flow depends on where N falls).
    let (mut ok, mut retried, mut took) = (0, 0, 0.0);
    let mut checkpoints = Vec::new();
    let slices = 5;
    for k in 0..slices {
        let range = warm + n * k / slices..warm + n * (k + 1) / slices;
        let started = Instant::now();
        let (o, r) = open(range, &mut proxy)?;
        took += started.elapsed().as_secs_f64();
        (ok, retried) = (ok + o, retried + r);
        std::thread::sleep(Duration::from_millis(300));
        checkpoints.push((ok, vm_rss(pid)));
    }
    std::thread::sleep(Duration::from_secs(1));
    let (rss1, fds1, slab1) = (vm_rss(pid), fds(pid), slab());
    proxy.proc.check()?;
    backend.proc.check()?;
    // Still relayed? Every 100th flow pings once more.
    let mut alive = 0;
    let mut sampled = 0;
    let mut msg = [0u8; HDR];
    let mut buf = vec![0u8; 2048];
    for i in (warm..warm + n).step_by(100) {
        sampled += 1;
        let s = &socks[i];
        put(&mut msg, &flow_dcid(0xf1, i as u64), cmd::ECHO, i as u64, 0);
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let _ = s.send(&msg);
        if let Ok(m) = s.recv(&mut buf) {
            if matches!(parse(&buf[..m]), Some((cmd::ECHO, x, _)) if x == i as u64) {
                alive += 1;
            }
        }
    }
    let per_flow = (rss1 as f64 - rss0 as f64) / ok.max(1) as f64;
    let fd_per_flow = (fds1 as f64 - fds0 as f64) / ok.max(1) as f64;
    let slab_per_flow = (slab1 - slab0) / ok.max(1) as f64;
    report.line(
        "| flows asked | established (echo back) | Initials resent | open time s | proxy VmRSS before | after | per flow | proxy fds before | after | fds per flow | machine slab per flow | alive after (every 100th) |",
    );
    report.line("|---|---|---|---|---|---|---|---|---|---|---|---|");
    report.line(format!(
        "| {n} | {ok} | {retried} | {took:.2} | {:.2} MiB | {:.2} MiB | **{per_flow:.0} B** | {fds0} | {fds1} | {fd_per_flow:.3} | {slab_per_flow:.0} B | {alive}/{sampled} |\n",
        rss0 as f64 / 1048576.0,
        rss1 as f64 / 1048576.0,
    ));
    let mut line =
        String::from("RSS growth per flow at each checkpoint (cumulative since before):");
    for (flows, rss) in &checkpoints {
        line.push_str(&format!(
            " {flows} flows: {:.0} B;",
            (*rss as f64 - rss0 as f64) / (*flows).max(1) as f64
        ));
    }
    report.line(format!("{}\n", line.trim_end_matches(';')));
    summary.rows.push(format!(
        "| proxy RSS per established flow (B) | {per_flow:.0} | | | < 512: **{}** |",
        if per_flow < 512.0 && ok == n {
            "met"
        } else if ok < n {
            "not all flows established"
        } else {
            "missed"
        }
    ));
    summary.rows.push(format!(
        "| proxy fds per flow | {fd_per_flow:.3} ({fds1} fds at {} flows) | | | |",
        ok + warm_ok
    ));
    summary.rows.push(format!(
        "| machine slab per flow (kernel: socket etc., noisy) (B) | {slab_per_flow:.0} | | | |"
    ));
    if ok < n {
        let tail = std::fs::read_to_string(proxy._dir.path().join("mc-proxy.log"))
            .unwrap_or_default()
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n");
        report.line(format!(
            "only {ok} of {n} flows answered; the proxy's last log lines:\n\n```text\n{tail}\n```\n"
        ));
    }
    drop(socks);
    drop(proxy);
    Ok(())
}
