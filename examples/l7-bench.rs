//! L7 benchmark: mc-proxy's L7 routes side by side with nginx and HAProxy
//! (issue 15, item 8), on loopback, in one run.
//!
//! Three TLS-terminating HTTP reverse proxies stand in front of the same
//! plaintext HTTP/1.1 backend, each with the same certificate (ECDSA P-256,
//! self-signed for `bench.test`, made with rcgen at start):
//!
//! - `mc-proxy`: one L7 route (`mode = "l7"`, SPEC §6.2), log level `warn`
//!   (no per-request log line, like nginx's `access_log off`);
//! - `nginx`: `proxy_pass` to an upstream with `keepalive 64`,
//!   `listen ... ssl http2`, 2 workers, access log off;
//! - `haproxy`: `mode http`, `nbthread 2`, `alpn h2,http/1.1`,
//!   `http-reuse always`, no logging;
//!
//! plus `direct` (the client straight to the backend in plaintext: the
//! baseline for added latency). `mc-proxy-2w` (not in the default set) is
//! mc-proxy with 2 worker threads, as nginx and HAProxy use both CPUs. The backend is this program started again
//! with `--serve-backend` (a hyper HTTP/1.1 server answering `GET /tiny` with
//! a 14-byte body), so its CPU is not in the client's process.
//!
//! Phases (each repetition visits every target, the starting target rotates
//! from one repetition to the next, the report gives medians and min–max):
//!
//! - `h1`: `--conns` keep-alive HTTP/1.1 connections, closed loop (one
//!   request in flight each); requests/s and the proxy's CPU per request.
//! - `h2`: `--h2-conns` HTTP/2 connections × `--streams` concurrent streams,
//!   closed loop; the same figures (`direct` has no HTTP/2 and sits it out).
//! - `handshake`: `--hs-workers` closed-loop workers, each connection = TCP
//!   connect, full TLS handshake (the client never resumes), one `GET` with
//!   `Connection: close`, read to the server's close; connections/s and the
//!   proxy's CPU per connection.
//! - `latency`: sequential and unloaded, one warm keep-alive HTTP/1.1
//!   connection per target, sample by sample across the targets: time from
//!   writing the request to the first response byte; p50/p99, and the added
//!   time (target minus `direct` within the same repetition).
//! - `idle`: each proxy restarted fresh; `--idle` TLS connections opened,
//!   one request each, held idle; (RSS after − RSS before) / count, summed
//!   over the proxy's processes (nginx: master and workers). Every held
//!   connection is then used once more to show it was really up.
//!
//! CPU is utime+stime of a process and all its descendants from
//! `/proc/PID/stat` (10 ms ticks), memory `Rss`/`Pss` from
//! `/proc/PID/smaps_rollup`. Before each measurement the machine must be
//! quiet (the foreign load, sampled for 0.2 s while our processes idle,
//! under `--quiet-pct`; bounded waits), and every measurement records the
//! foreign CPU during it. The client (this process) uses a hand-written
//! HTTP/1.1 exchange over tokio-rustls (cheaper than a general client, and it
//! sees the first response byte) and hyper's HTTP/2 client; its CPU is
//! reported too.
//!
//! ```text
//! cargo build --release --locked
//! cargo run --release --example l7-bench -- --bin target/release/mc-proxy --out bench/l7.json  # ~5 min
//! cargo run --release --example l7-bench -- --bin target/release/mc-proxy --quick             # ~40 s
//! cargo run --release --example l7-bench -- --targets direct,mc-proxy --phases h1,latency
//! ```
//!
//! Children (backend and proxies) run in process groups of their own and
//! are stopped (SIGTERM, then SIGKILL to the group) when the run ends, fails,
//! panics or is interrupted; they also get SIGKILL if this process dies.
//!
//! Not part of the shipped binary: examples are built only on request.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

/// The one hostname: SNI, Host, certificate.
const HOST: &str = "bench.test";
/// What the backend answers to `GET /tiny`.
const BODY: &[u8] = b"l7-bench tiny\n";
const REQUEST: &[u8] =
    b"GET /tiny HTTP/1.1\r\nHost: bench.test\r\nUser-Agent: l7-bench\r\nAccept: */*\r\n\r\n";
const REQUEST_CLOSE: &[u8] = b"GET /tiny HTTP/1.1\r\nHost: bench.test\r\nUser-Agent: l7-bench\r\nAccept: */*\r\nConnection: close\r\n\r\n";
const H2_URI: &str = "https://bench.test/tiny";

#[derive(Parser, Debug, Clone)]
#[command(about = "L7 (TLS-terminating HTTP) benchmark: mc-proxy vs nginx vs HAProxy on loopback")]
struct Args {
    /// mc-proxy binary.
    #[arg(long, default_value = "target/release/mc-proxy")]
    bin: PathBuf,
    /// nginx binary.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    /// HAProxy binary.
    #[arg(long, default_value = "/usr/sbin/haproxy")]
    haproxy: PathBuf,
    /// Comma-separated targets: direct, mc-proxy, nginx, haproxy; also
    /// mc-proxy-2w (mc-proxy with 2 worker threads, on its own port).
    #[arg(long, default_value = "direct,mc-proxy,nginx,haproxy")]
    targets: String,
    /// Comma-separated phases: h1, h2, handshake, latency, idle.
    #[arg(long, default_value = "h1,h2,handshake,latency,idle")]
    phases: String,
    /// Repetitions of every phase.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seconds measured per load measurement (h1, h2, handshake).
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Seconds of warm-up before each load measurement.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Keep-alive HTTP/1.1 connections in the h1 phase.
    #[arg(long, default_value_t = 32)]
    conns: usize,
    /// HTTP/2 connections in the h2 phase.
    #[arg(long, default_value_t = 4)]
    h2_conns: usize,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Closed-loop workers in the handshake phase.
    #[arg(long, default_value_t = 32)]
    hs_workers: usize,
    /// Sequential samples per target and repetition in the latency phase.
    #[arg(long, default_value_t = 1000)]
    lat_count: usize,
    /// Idle TLS connections held in the idle phase.
    #[arg(long, default_value_t = 2000)]
    idle: usize,
    /// Idle phase: hold the connections after the TLS handshake only, with
    /// no request (splits the idle cost into TLS and HTTP state).
    #[arg(long)]
    idle_no_request: bool,
    /// Worker threads for the `mc-proxy` target (TOKIO_WORKER_THREADS);
    /// default: its own choice (one on a host with 1-2 CPUs).
    #[arg(long)]
    mc_workers: Option<usize>,
    /// mc-proxy's log level (`info` adds its per-request log line).
    #[arg(long, default_value = "warn")]
    mc_log_level: String,
    /// Worker threads of the client (this process).
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Ports: backend at BASE+1, mc-proxy +10, nginx +11, haproxy +12.
    #[arg(long, default_value_t = 18600)]
    port_base: u16,
    /// Wait before each measurement while foreign load is above this % of
    /// the machine (0 = never wait).
    #[arg(long, default_value_t = 15.0)]
    quiet_pct: f64,
    /// Longest wait for quiet per measurement, seconds.
    #[arg(long, default_value_t = 20.0)]
    quiet_wait: f64,
    /// Longest total wait for quiet in the run, seconds.
    #[arg(long, default_value_t = 60.0)]
    quiet_budget: f64,
    /// Write every repetition's values (and the summary) as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the work directory (configs, certificate, proxy logs).
    #[arg(long)]
    keep_workdir: bool,
    /// Smoke run (~1 minute): 1 repetition, 1 s windows, fewer samples and
    /// idle connections.
    #[arg(long)]
    quick: bool,
    /// Internal: run as the backend, listening here.
    #[arg(long, hide = true)]
    serve_backend: Option<SocketAddr>,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(addr) = args.serve_backend {
        return tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(backend(addr));
    }
    if args.quick {
        args.reps = 1;
        args.secs = 1.0;
        args.warmup = 0.3;
        args.lat_count = 200;
        args.idle = args.idle.min(300);
        args.quiet_budget = args.quiet_budget.min(10.0);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    // Children are spawned from this future only (it runs on the main
    // thread, which their PR_SET_PDEATHSIG is tied to). Dropping it, on an
    // error, a panic or a signal, stops them.
    runtime.block_on(async {
        tokio::select! {
            result = run(args) => result,
            signal = interrupted() => bail!("interrupted by {signal}; children stopped"),
        }
    })
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

// ---- backend ---------------------------------------------------------------

/// The plaintext HTTP/1.1 backend every target forwards to.
async fn backend(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("backend cannot listen on {addr}"))?;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
                if req.uri().path() != "/tiny" {
                    *response.status_mut() = StatusCode::NOT_FOUND;
                }
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain"),
                );
                Ok::<_, Infallible>(response)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

// ---- processes -------------------------------------------------------------

/// The two system calls that have no safe wrapper in our dependencies.
mod sys {
    use std::os::unix::process::CommandExt as _;
    use std::process::Command;

    /// Signals the process group `pgid` (a child started in a group of its
    /// own, see [`super::Proc`]).
    pub fn signal_group(pgid: u32, signal: i32) {
        if let Ok(pgid) = i32::try_from(pgid) {
            // SAFETY: kill(2) takes plain integers and touches none of our
            // memory. The group is one this program created, and the caller
            // signals it only while the leader is not yet reaped, so the id
            // cannot have been reused.
            unsafe {
                libc::kill(-pgid, signal);
            }
        }
    }

    /// The child gets SIGKILL when the thread that spawned it dies (so a
    /// killed benchmark leaves no proxy behind).
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

/// A child process in a process group of its own; stopped when dropped.
/// A second child, the reaper, holds a pipe from us and kills the group
/// when the pipe closes: if this program is killed outright (SIGKILL), the
/// group still goes, nginx's workers included (PR_SET_PDEATHSIG reaches
/// only the leader).
struct Proc {
    name: String,
    child: Child,
    reaper: Option<Child>,
    log: PathBuf,
    stopped: bool,
}

impl Proc {
    fn spawn(name: &str, command: &mut Command, log: &Path) -> Result<Proc> {
        use std::os::unix::process::CommandExt as _;
        let file = std::fs::File::create(log)?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0);
        sys::die_with_parent(command);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        let reaper = Command::new("sh")
            .arg("-c")
            .arg(r#"read -r _; kill -9 "-$0" 2>/dev/null"#)
            .arg(child.id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok();
        Ok(Proc {
            name: name.to_string(),
            child,
            reaper,
            log: log.to_path_buf(),
            stopped: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the leader has exited (a zombie not yet reaped counts).
    fn exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid())) {
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_none_or(|state| state == "Z" || state == "X"),
            Err(_) => true,
        }
    }

    fn log_tail(&self) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(1500)..]).into_owned()
    }

    /// SIGTERM to the group, up to 3 s for the leader to exit, then SIGKILL
    /// to the group (workers included) before the leader is reaped.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // The reaper first (our child, not yet reaped, so its pid is ours):
        // the group is stopped here.
        if let Some(mut reaper) = self.reaper.take() {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
        let pgid = self.pid();
        if !self.exited() {
            sys::signal_group(pgid, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while !self.exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        sys::signal_group(pgid, libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads `/proc` for CPU and memory of process trees.
struct ProcFs {
    ticks_per_s: f64,
}

impl ProcFs {
    fn new() -> ProcFs {
        let ticks_per_s = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0);
        ProcFs { ticks_per_s }
    }

    /// The fields of `/proc/PID/stat` after the command name (index 0 =
    /// state, 1 = ppid, 11 = utime, 12 = stime).
    fn stat(pid: u32) -> Option<Vec<String>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        Some(rest.split_whitespace().map(str::to_string).collect())
    }

    /// `root` and all its descendants.
    fn tree(root: u32) -> Vec<u32> {
        let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                    continue;
                };
                if let Some(ppid) = Self::stat(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                    children.entry(ppid).or_default().push(pid);
                }
            }
        }
        let mut out = vec![root];
        let mut i = 0;
        while i < out.len() {
            if let Some(kids) = children.get(&out[i]) {
                out.extend(kids);
            }
            i += 1;
        }
        out
    }

    /// CPU seconds (user + system) of `pids`.
    fn cpu_s(&self, pids: &[u32]) -> f64 {
        let ticks: f64 = pids
            .iter()
            .filter_map(|&pid| {
                let f = Self::stat(pid)?;
                Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
            })
            .sum();
        ticks / self.ticks_per_s
    }

    /// (Rss, Pss) in KiB, summed over `pids`.
    fn mem_kib(pids: &[u32]) -> (f64, f64) {
        let (mut rss, mut pss) = (0.0, 0.0);
        for pid in pids {
            let text =
                std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            for line in text.lines() {
                let value = |rest: &str| -> f64 {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse()
                        .unwrap_or(0.0)
                };
                if let Some(rest) = line.strip_prefix("Rss:") {
                    rss += value(rest);
                } else if let Some(rest) = line.strip_prefix("Pss:") {
                    pss += value(rest);
                }
            }
        }
        (rss, pss)
    }

    fn fds(pids: &[u32]) -> usize {
        pids.iter()
            .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
            .map(|d| d.count())
            .sum()
    }

    /// Non-idle CPU seconds of the whole machine, from `/proc/stat`.
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
        (total - idle) / self.ticks_per_s
    }
}

// ---- TLS and HTTP client ----------------------------------------------------

/// Accepts exactly the benchmark's certificate (compared byte for byte,
/// which is cheaper than a chain check and just as strict), and checks the
/// handshake signatures for real.
#[derive(Debug)]
struct Pinned {
    leaf: CertificateDer<'static>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "not the benchmark's certificate".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client config that offers `alpn` and never resumes a session (every
/// handshake is a full one).
fn client_config(leaf: &CertificateDer<'static>, alpn: &[&[u8]]) -> Result<TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            leaf: leaf.clone(),
            algorithms,
        }))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

type Io = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

async fn dial(addr: SocketAddr, tls: Option<&TlsConnector>) -> io::Result<Io> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    match tls {
        None => Ok(Either::Left(tcp)),
        Some(connector) => {
            let name = ServerName::try_from(HOST).map_err(io::Error::other)?;
            Ok(Either::Right(connector.connect(name, tcp).await?))
        }
    }
}

/// One HTTP/1.1 connection, driven by hand: write a request, read one
/// response (status 200, `Content-Length` or chunked).
struct H1 {
    io: Io,
    buf: Vec<u8>,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// If `buf` holds a complete response: (start of body, end of response).
/// An error for anything but a 200 with a length we can find.
fn response_complete(buf: &[u8]) -> io::Result<Option<(usize, usize)>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = &buf[..head_end];
    if !(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200")) {
        let line = head.split(|&b| b == b'\r').next().unwrap_or(head);
        return Err(io::Error::other(format!(
            "response {:?}",
            String::from_utf8_lossy(line)
        )));
    }
    let body = head_end + 4;
    let mut chunked = false;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            let len: usize = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| io::Error::other("bad content-length"))?;
            return Ok((buf.len() >= body + len).then_some((body, body + len)));
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding") && value.eq_ignore_ascii_case(b"chunked")
        {
            chunked = true;
        }
    }
    if !chunked {
        return Err(io::Error::other("response without a length"));
    }
    // Small bodies only: the last chunk follows the headers or a chunk's CRLF.
    if buf[body..].starts_with(b"0\r\n\r\n") {
        return Ok(Some((body, body + 5)));
    }
    Ok(find(&buf[body..], b"\r\n0\r\n\r\n").map(|i| (body, body + i + 7)))
}

impl H1 {
    async fn connect(addr: SocketAddr, tls: Option<&TlsConnector>) -> io::Result<H1> {
        Ok(H1 {
            io: dial(addr, tls).await?,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request`, reads one whole response; returns the time from the
    /// write to the first response byte, and the body's range in `self.buf`.
    async fn exchange(&mut self, request: &[u8]) -> io::Result<(Duration, (usize, usize))> {
        let start = Instant::now();
        self.io.write_all(request).await?;
        self.io.flush().await?;
        self.buf.clear();
        let mut first_byte = None;
        loop {
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let first = *first_byte.get_or_insert_with(|| start.elapsed());
            if let Some((body, end)) = response_complete(&self.buf)? {
                if end != self.buf.len() {
                    return Err(io::Error::other("bytes after the response"));
                }
                return Ok((first, (body, end)));
            }
        }
    }

    /// Reads until the server closes (a TLS EOF without close_notify and a
    /// reset count as closed: the response was complete).
    async fn until_closed(&mut self) -> io::Result<()> {
        let mut scrap = [0u8; 512];
        match self.io.read(&mut scrap).await {
            Ok(0) => Ok(()),
            Ok(_) => Err(io::Error::other("bytes after a Connection: close response")),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn tls_summary(&self) -> Value {
        match &self.io {
            Either::Left(_) => json!("plaintext"),
            Either::Right(tls) => {
                let session = tls.get_ref().1;
                let show = |v: Option<String>| v.unwrap_or_else(|| "?".into());
                json!(format!(
                    "{} {} {}",
                    show(session.protocol_version().map(|v| format!("{v:?}"))),
                    show(
                        session
                            .negotiated_cipher_suite()
                            .map(|s| format!("{:?}", s.suite()))
                    ),
                    show(
                        session
                            .negotiated_key_exchange_group()
                            .map(|g| format!("{:?}", g.name()))
                    ),
                ))
            }
        }
    }
}

type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// An HTTP/2 connection (ALPN must pick h2); the connection task runs
/// until every sender is dropped.
async fn h2_connect(addr: SocketAddr, tls: &TlsConnector) -> Result<H2Sender> {
    let io = dial(addr, Some(tls)).await?;
    if let Either::Right(tls) = &io {
        let alpn = tls.get_ref().1.alpn_protocol();
        if alpn != Some(b"h2") {
            bail!("ALPN chose {:?}, not h2", alpn.map(String::from_utf8_lossy));
        }
    }
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// One HTTP/2 `GET /tiny`; the body is read whole.
async fn h2_get(send: &mut H2Sender) -> Result<Bytes> {
    send.ready().await?;
    let request = Request::get(H2_URI)
        .header(hyper::header::USER_AGENT, "l7-bench")
        .body(Empty::new())?;
    let response = send.send_request(request).await?;
    if response.status() != StatusCode::OK {
        bail!("status {}", response.status());
    }
    Ok(response.into_body().collect().await?.to_bytes())
}

// ---- targets ---------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Direct,
    McProxy,
    Nginx,
    Haproxy,
}

struct Target {
    name: &'static str,
    kind: Kind,
    /// mc-proxy's worker threads (`TOKIO_WORKER_THREADS`; None = its default).
    workers: Option<usize>,
    addr: SocketAddr,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Target {
    fn tls(&self) -> bool {
        self.kind != Kind::Direct
    }

    fn pids(&self) -> Vec<u32> {
        self.proc
            .as_ref()
            .map(|p| ProcFs::tree(p.pid()))
            .unwrap_or_default()
    }
}

/// Where the certificate and key were written.
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    /// Certificate then key, for HAProxy's `crt`.
    combined: PathBuf,
    der: CertificateDer<'static>,
}

fn make_cert(dir: &Path) -> Result<CertFiles> {
    let key = rcgen::KeyPair::generate()?; // ECDSA P-256
    let mut params = rcgen::CertificateParams::new(vec![HOST.to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, HOST);
    let cert = params.self_signed(&key)?;
    let files = CertFiles {
        cert: dir.join("bench.pem"),
        key: dir.join("bench.key"),
        combined: dir.join("bench-haproxy.pem"),
        der: cert.der().clone(),
    };
    std::fs::write(&files.cert, cert.pem())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    std::fs::write(&files.combined, cert.pem() + &key.serialize_pem())?;
    Ok(files)
}

/// An mc-proxy config for target `name` (its files under `DIR/NAME/`).
fn write_mc_config(
    dir: &Path,
    name: &str,
    listen: SocketAddr,
    args: &Args,
    certs: &CertFiles,
    backend: SocketAddr,
) -> Result<()> {
    let d = dir.display();
    std::fs::create_dir_all(dir.join(name))?;
    std::fs::write(
        dir.join(format!("{name}.toml")),
        format!(
            r#"[database]
path = "{d}/{name}/mc-proxy.db"

[[listeners]]
addr = "{listen}"
  [[listeners.routes]]
  hostname = "{HOST}"
  backend  = "{backend}"
  mode     = "l7"
  tls_cert = "{cert}"
  tls_key  = "{key}"

[proxy]
connect_timeout = "5s"
handshake_timeout = "30s"
idle_timeout = "300s"
shutdown_timeout = "1s"

[log]
level = "{level}"
"#,
            cert = certs.cert.display(),
            key = certs.key.display(),
            level = args.mc_log_level,
        ),
    )?;
    Ok(())
}

/// The nginx and HAProxy configs.
fn write_configs(dir: &Path, args: &Args, certs: &CertFiles, backend: SocketAddr) -> Result<()> {
    let d = dir.display();
    let (ng, hp) = (port(args, "nginx"), port(args, "haproxy"));
    std::fs::create_dir_all(dir.join("nginx/tmp"))?;
    std::fs::write(
        dir.join("nginx/nginx.conf"),
        format!(
            r#"worker_processes 2;
worker_rlimit_nofile 19000;
pid {d}/nginx/nginx.pid;
error_log {d}/nginx/error.log warn;
events {{ worker_connections 9000; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx/tmp/client_body;
    proxy_temp_path {d}/nginx/tmp/proxy;
    fastcgi_temp_path {d}/nginx/tmp/fastcgi;
    uwsgi_temp_path {d}/nginx/tmp/uwsgi;
    scgi_temp_path {d}/nginx/tmp/scgi;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    upstream backend {{
        server {backend};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{ng} ssl http2;
        server_name {HOST};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
            cert = certs.cert.display(),
            key = certs.key.display(),
        ),
    )?;
    std::fs::create_dir_all(dir.join("haproxy"))?;
    std::fs::write(
        dir.join("haproxy/haproxy.cfg"),
        format!(
            r#"global
    nbthread 2
    maxconn 7000

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-request 300s
    timeout http-keep-alive 300s

frontend l7bench
    bind 127.0.0.1:{hp} ssl crt {combined} alpn h2,http/1.1
    default_backend backend

backend backend
    http-reuse always
    server backend {backend}
"#,
            combined = certs.combined.display(),
        ),
    )?;
    Ok(())
}

/// Where `name` listens: the backend (`direct`) at BASE+1, the proxies
/// from BASE+10.
fn port(args: &Args, name: &str) -> u16 {
    args.port_base
        + match name {
            "mc-proxy" => 10,
            "nginx" => 11,
            "haproxy" => 12,
            "mc-proxy-2w" => 13,
            _ => 1,
        }
}

fn start_target(t: &mut Target, args: &Args) -> Result<()> {
    let d = &t.dir;
    let proc = match t.kind {
        Kind::Direct => return Ok(()),
        Kind::McProxy => {
            // A fresh database each start: the config seeds it.
            let name = t.name;
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(d.join(format!("{name}/mc-proxy.db{suffix}")));
            }
            let mut command = Command::new(&args.bin);
            command
                .arg("server")
                .arg("-c")
                .arg(d.join(format!("{name}.toml")))
                .env_remove("RUST_LOG");
            match t.workers {
                Some(n) => command.env("TOKIO_WORKER_THREADS", n.to_string()),
                None => command.env_remove("TOKIO_WORKER_THREADS"),
            };
            Proc::spawn(name, &mut command, &d.join(format!("{name}/log")))?
        }
        Kind::Nginx => Proc::spawn(
            "nginx",
            Command::new(&args.nginx)
                .arg("-p")
                .arg(d.join("nginx"))
                .arg("-c")
                .arg(d.join("nginx/nginx.conf"))
                .arg("-e")
                .arg(d.join("nginx/error.log"))
                .arg("-g")
                .arg("daemon off;"),
            &d.join("nginx/stdout.log"),
        )?,
        Kind::Haproxy => Proc::spawn(
            "haproxy",
            Command::new(&args.haproxy)
                .arg("-db")
                .arg("-f")
                .arg(d.join("haproxy/haproxy.cfg")),
            &d.join("haproxy/log"),
        )?,
    };
    t.proc = Some(proc);
    Ok(())
}

async fn wait_listening(addr: SocketAddr, proc: Option<&Proc>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Some(proc) = proc {
            if proc.exited() {
                bail!("{} exited at start; log:\n{}", proc.name, proc.log_tail());
            }
        }
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on {addr} after 15 s")
}

fn port_free(addr: SocketAddr) -> bool {
    std::net::TcpListener::bind(addr).is_ok()
}

// ---- measurement -------------------------------------------------------------

/// CPU of the parties at one instant.
struct Snapshot {
    at: Instant,
    proxy: f64,
    backend: f64,
    client: f64,
    busy: f64,
}

/// One load measurement's totals.
struct Window {
    units: u64,
    errors: u64,
    secs: f64,
    proxy: f64,
    backend: f64,
    client: f64,
    foreign_pct: f64,
}

#[derive(Default)]
struct Counters {
    done: AtomicU64,
    errors: AtomicU64,
    ready: AtomicU64,
    stop: AtomicBool,
}

impl Counters {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Copy)]
enum Load {
    H1 { conns: usize },
    H2 { conns: usize, streams: usize },
    Handshake { workers: usize },
}

async fn h1_worker(addr: SocketAddr, tls: Option<TlsConnector>, c: Arc<Counters>) {
    let mut counted = false;
    while !c.stopped() {
        let Ok(mut conn) = H1::connect(addr, tls.as_ref()).await else {
            c.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if !counted {
            c.ready.fetch_add(1, Ordering::Relaxed);
            counted = true;
        }
        while !c.stopped() {
            if conn.exchange(REQUEST).await.is_err() {
                c.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            c.done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn h2_stream(mut send: H2Sender, c: Arc<Counters>) {
    c.ready.fetch_add(1, Ordering::Relaxed);
    while !c.stopped() {
        if h2_get(&mut send).await.is_ok() {
            c.done.fetch_add(1, Ordering::Relaxed);
        } else {
            c.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A new connection, a full handshake, one request, the server's close.
async fn one_connection(addr: SocketAddr, tls: Option<&TlsConnector>) -> io::Result<()> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut conn = H1::connect(addr, tls).await?;
        conn.exchange(REQUEST_CLOSE).await?;
        conn.until_closed().await
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

async fn handshake_worker(addr: SocketAddr, tls: Option<TlsConnector>, c: Arc<Counters>) {
    c.ready.fetch_add(1, Ordering::Relaxed);
    while !c.stopped() {
        if one_connection(addr, tls.as_ref()).await.is_ok() {
            c.done.fetch_add(1, Ordering::Relaxed);
        } else {
            c.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn rotated<T>(items: &[T], k: usize) -> Vec<&T> {
    let n = items.len().max(1);
    (0..items.len()).map(|i| &items[(i + k) % n]).collect()
}

fn log(line: impl AsRef<str>) {
    eprintln!("[l7-bench] {}", line.as_ref());
}

/// Waits (bounded) until the machine's foreign load drops below a limit.
struct Quiet {
    max_pct: f64,
    per_wait: f64,
    budget: f64,
    used: f64,
    gave_up: u32,
}

impl Quiet {
    async fn busy_pct(procfs: &ProcFs, ncpu: f64) -> f64 {
        let (b0, t0) = (procfs.busy_s(), Instant::now());
        tokio::time::sleep(Duration::from_millis(200)).await;
        100.0 * (procfs.busy_s() - b0) / t0.elapsed().as_secs_f64() / ncpu
    }

    async fn wait(&mut self, procfs: &ProcFs, ncpu: f64, label: &str) {
        if self.max_pct <= 0.0 {
            return;
        }
        let start = Instant::now();
        let mut busy = Self::busy_pct(procfs, ncpu).await;
        while busy > self.max_pct {
            let spent = start.elapsed().as_secs_f64();
            if spent > self.per_wait || self.used + spent > self.budget {
                self.gave_up += 1;
                log(format!(
                    "{label}: machine {busy:.0}% busy (not us); measuring anyway"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(800)).await;
            busy = Self::busy_pct(procfs, ncpu).await;
        }
        let waited = start.elapsed().as_secs_f64();
        self.used += waited;
        if waited > 1.5 {
            log(format!(
                "{label}: waited {waited:.1} s for foreign load to drop (now {busy:.0}%)"
            ));
        }
    }
}

/// Every value of every repetition, by phase, metric and target.
#[derive(Default)]
struct Results {
    values: BTreeMap<(String, String), BTreeMap<String, Vec<f64>>>,
    records: Vec<Value>,
    errors: BTreeMap<String, u64>,
}

impl Results {
    fn add(&mut self, phase: &str, metric: &str, target: &str, value: f64) {
        if value.is_finite() {
            self.values
                .entry((phase.to_string(), metric.to_string()))
                .or_default()
                .entry(target.to_string())
                .or_default()
                .push(value);
        }
    }

    fn get(&self, phase: &str, metric: &str, target: &str) -> Option<&Vec<f64>> {
        self.values
            .get(&(phase.to_string(), metric.to_string()))?
            .get(target)
    }

    fn error(&mut self, phase: &str, target: &str, n: u64) {
        *self.errors.entry(format!("{phase}/{target}")).or_default() += n;
    }
}

struct Bench {
    args: Args,
    procfs: ProcFs,
    ncpu: f64,
    backend: Proc,
    tls_h1: TlsConnector,
    tls_h2: TlsConnector,
    tls_any: TlsConnector,
    quiet: Quiet,
    results: Results,
}

impl Bench {
    fn snapshot(&self, proxy: &[u32]) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            proxy: self.procfs.cpu_s(proxy),
            backend: self.procfs.cpu_s(&[self.backend.pid()]),
            client: self.procfs.cpu_s(&[std::process::id()]),
            busy: self.procfs.busy_s(),
        }
    }

    fn tls_for(&self, t: &Target, alpn_h2: bool) -> Option<TlsConnector> {
        t.tls().then(|| {
            if alpn_h2 {
                self.tls_h2.clone()
            } else {
                self.tls_h1.clone()
            }
        })
    }

    /// Runs `load` against `t`: connections up, warm-up, then a window of
    /// `--secs` in which completions and CPU are counted.
    async fn closed_loop(&self, t: &Target, load: Load) -> Result<Window> {
        let c = Arc::new(Counters::default());
        let mut tasks = JoinSet::new();
        let expected = match load {
            Load::H1 { conns } => {
                for _ in 0..conns {
                    tasks.spawn(h1_worker(t.addr, self.tls_for(t, false), c.clone()));
                }
                conns
            }
            Load::H2 { conns, streams } => {
                let tls = self.tls_for(t, true).context("HTTP/2 needs TLS here")?;
                for _ in 0..conns {
                    let send = h2_connect(t.addr, &tls).await?;
                    for _ in 0..streams {
                        tasks.spawn(h2_stream(send.clone(), c.clone()));
                    }
                }
                conns * streams
            }
            Load::Handshake { workers } => {
                for _ in 0..workers {
                    tasks.spawn(handshake_worker(t.addr, self.tls_for(t, false), c.clone()));
                }
                workers
            }
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while c.ready.load(Ordering::Relaxed) < expected as u64 {
            if Instant::now() > deadline {
                c.stop.store(true, Ordering::Relaxed);
                bail!(
                    "only {} of {expected} connections up after 15 s",
                    c.ready.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs_f64(self.args.warmup)).await;
        let pids = t.pids();
        let s0 = self.snapshot(&pids);
        let (d0, e0) = (
            c.done.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
        );
        tokio::time::sleep(Duration::from_secs_f64(self.args.secs)).await;
        let s1 = self.snapshot(&pids);
        let (d1, e1) = (
            c.done.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
        );
        c.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.abort_all();
        let secs = s1.at.duration_since(s0.at).as_secs_f64();
        let (proxy, backend, client) = (
            s1.proxy - s0.proxy,
            s1.backend - s0.backend,
            s1.client - s0.client,
        );
        let foreign = (s1.busy - s0.busy - proxy - backend - client).max(0.0);
        Ok(Window {
            units: d1 - d0,
            errors: e1 - e0,
            secs,
            proxy,
            backend,
            client,
            foreign_pct: 100.0 * foreign / secs / self.ncpu,
        })
    }

    /// The h1, h2 and handshake phases.
    async fn phase_load(&mut self, targets: &[Target], phase: &str) -> Result<()> {
        let unit = if phase == "handshake" { "conn" } else { "req" };
        for rep in 0..self.args.reps {
            for (position, t) in rotated(targets, rep).into_iter().enumerate() {
                let load = match phase {
                    "h1" => Load::H1 {
                        conns: self.args.conns,
                    },
                    "h2" if t.kind == Kind::Direct => continue,
                    "h2" => Load::H2 {
                        conns: self.args.h2_conns,
                        streams: self.args.streams,
                    },
                    _ => Load::Handshake {
                        workers: self.args.hs_workers,
                    },
                };
                let label = format!("{phase} rep{rep} {}", t.name);
                self.quiet.wait(&self.procfs, self.ncpu, &label).await;
                let w = match self.closed_loop(t, load).await {
                    Ok(w) => w,
                    Err(e) => {
                        log(format!("{label}: {e:#}"));
                        self.results.error(phase, t.name, 1);
                        continue;
                    }
                };
                let n = w.units.max(1) as f64;
                let r = &mut self.results;
                r.add(
                    phase,
                    &format!("{unit}_per_s"),
                    t.name,
                    w.units as f64 / w.secs,
                );
                if t.tls() {
                    r.add(
                        phase,
                        &format!("proxy_cpu_us_per_{unit}"),
                        t.name,
                        w.proxy / n * 1e6,
                    );
                    if w.backend > 0.0 {
                        r.add(phase, "proxy_cpu_rel_backend", t.name, w.proxy / w.backend);
                    }
                }
                r.add(
                    phase,
                    &format!("backend_cpu_us_per_{unit}"),
                    t.name,
                    w.backend / n * 1e6,
                );
                r.add(
                    phase,
                    &format!("client_cpu_us_per_{unit}"),
                    t.name,
                    w.client / n * 1e6,
                );
                r.add(phase, "foreign_cpu_pct", t.name, w.foreign_pct);
                if w.errors > 0 {
                    r.error(phase, t.name, w.errors);
                }
                r.records.push(json!({
                    "phase": phase, "rep": rep, "target": t.name, "position": position,
                    "units": w.units, "unit": unit, "errors": w.errors, "secs": w.secs,
                    "proxy_cpu_s": w.proxy, "backend_cpu_s": w.backend, "client_cpu_s": w.client,
                    "foreign_cpu_pct": w.foreign_pct,
                }));
                log(format!(
                    "{label:<22} {:>8.0} {unit}/s  CPU/{unit}: proxy {:>6.1} µs  backend {:>5.1} µs  client {:>5.1} µs  errors {}  foreign {:.0}%",
                    w.units as f64 / w.secs,
                    w.proxy / n * 1e6,
                    w.backend / n * 1e6,
                    w.client / n * 1e6,
                    w.errors,
                    w.foreign_pct
                ));
                // Let the proxy finish closing before the next target.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        Ok(())
    }

    /// Sequential first-byte latency on warm keep-alive connections, sample
    /// by sample across the targets.
    async fn phase_latency(&mut self, targets: &[Target]) -> Result<()> {
        for rep in 0..self.args.reps {
            if let Err(e) = self.latency_rep(targets, rep).await {
                log(format!("latency rep{rep}: {e:#}"));
                self.results.error("latency", "all", 1);
            }
        }
        Ok(())
    }

    async fn latency_rep(&mut self, targets: &[Target], rep: usize) -> Result<()> {
        {
            let order = rotated(targets, rep);
            self.quiet
                .wait(&self.procfs, self.ncpu, &format!("latency rep{rep}"))
                .await;
            let mut conns = Vec::new();
            for t in &order {
                let mut conn = H1::connect(t.addr, self.tls_for(t, false).as_ref())
                    .await
                    .with_context(|| format!("latency: connecting to {}", t.name))?;
                for _ in 0..50 {
                    conn.exchange(REQUEST).await?;
                }
                conns.push(conn);
            }
            let n = order.len();
            let mut samples = vec![Vec::with_capacity(self.args.lat_count); n];
            let mut errors = vec![0u64; n];
            for i in 0..self.args.lat_count {
                for k in 0..n {
                    let j = (k + i) % n;
                    match tokio::time::timeout(Duration::from_secs(5), conns[j].exchange(REQUEST))
                        .await
                    {
                        Ok(Ok((first, _))) => samples[j].push(first.as_secs_f64() * 1e6),
                        _ => {
                            errors[j] += 1;
                            // Replace a broken connection.
                            conns[j] =
                                H1::connect(order[j].addr, self.tls_for(order[j], false).as_ref())
                                    .await?;
                        }
                    }
                }
            }
            drop(conns);
            let stats: Vec<(f64, f64)> = samples
                .iter_mut()
                .map(|s| {
                    s.sort_by(f64::total_cmp);
                    (percentile(s, 0.5), percentile(s, 0.99))
                })
                .collect();
            let direct = order.iter().position(|t| t.kind == Kind::Direct);
            let mut line = format!("latency rep{rep}");
            for (j, t) in order.iter().enumerate() {
                let (p50, p99) = stats[j];
                let r = &mut self.results;
                r.add("latency", "p50_us", t.name, p50);
                r.add("latency", "p99_us", t.name, p99);
                let added = direct
                    .filter(|&d| d != j)
                    .map(|d| (p50 - stats[d].0, p99 - stats[d].1));
                if let Some((a50, a99)) = added {
                    r.add("latency", "added_p50_us", t.name, a50);
                    r.add("latency", "added_p99_us", t.name, a99);
                }
                if errors[j] > 0 {
                    r.error("latency", t.name, errors[j]);
                }
                r.records.push(json!({
                    "phase": "latency", "rep": rep, "target": t.name, "position": j,
                    "samples": samples[j].len(), "errors": errors[j],
                    "p50_us": p50, "p99_us": p99,
                    "mean_us": samples[j].iter().sum::<f64>() / samples[j].len().max(1) as f64,
                    "added_p50_us": added.map(|a| a.0), "added_p99_us": added.map(|a| a.1),
                }));
                let _ = write!(line, "  {} p50 {p50:.0} µs p99 {p99:.0} µs", t.name);
            }
            log(line);
        }
        Ok(())
    }

    /// RSS per idle L7 connection, each proxy restarted fresh.
    async fn phase_idle(&mut self, targets: &mut [Target]) -> Result<()> {
        for rep in 0..self.args.reps {
            let indices: Vec<usize> = (0..targets.len()).filter(|&i| targets[i].tls()).collect();
            for &i in rotated(&indices, rep) {
                let t = &mut targets[i];
                if let Err(e) = self.idle_one(t, rep).await {
                    log(format!("idle rep{rep} {}: {e:#}", t.name));
                    self.results.error("idle", t.name, 1);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        Ok(())
    }

    async fn idle_one(&mut self, t: &mut Target, rep: usize) -> Result<()> {
        let count = self.args.idle;
        let label = format!("idle rep{rep} {}", t.name);
        if let Some(mut proc) = t.proc.take() {
            proc.stop();
        }
        start_target(t, &self.args)?;
        wait_listening(t.addr, t.proc.as_ref()).await?;
        self.quiet.wait(&self.procfs, self.ncpu, &label).await;
        let tls = self.tls_for(t, false);
        // One request first, so lazily built state (the upstream pool, the
        // TLS config) is in the baseline.
        let mut first = H1::connect(t.addr, tls.as_ref()).await?;
        first.exchange(REQUEST).await?;
        drop(first);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pids = t.pids();
        let (rss0, pss0) = ProcFs::mem_kib(&pids);
        let cpu0 = self.procfs.cpu_s(&pids);
        let started = Instant::now();
        let conns = open_idle(t.addr, tls.clone(), count, 32, !self.args.idle_no_request).await;
        let setup = started.elapsed().as_secs_f64();
        let opened = conns.len();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pids = t.pids();
        let (rss1, pss1) = ProcFs::mem_kib(&pids);
        let cpu1 = self.procfs.cpu_s(&pids);
        let fds = ProcFs::fds(&pids);
        let alive = use_again(conns).await;
        let n = opened.max(1) as f64;
        let r = &mut self.results;
        r.add("idle", "rss_kib_per_conn", t.name, (rss1 - rss0) / n);
        r.add("idle", "pss_kib_per_conn", t.name, (pss1 - pss0) / n);
        r.add("idle", "rss_before_mib", t.name, rss0 / 1024.0);
        r.add("idle", "rss_after_mib", t.name, rss1 / 1024.0);
        r.add(
            "idle",
            "setup_cpu_us_per_conn",
            t.name,
            (cpu1 - cpu0) / n * 1e6,
        );
        if alive < count {
            r.error("idle", t.name, (count - alive) as u64);
        }
        r.records.push(json!({
            "phase": "idle", "rep": rep, "target": t.name, "wanted": count,
            "opened": opened, "alive_after": alive, "setup_secs": setup,
            "rss_before_kib": rss0, "rss_after_kib": rss1,
            "pss_before_kib": pss0, "pss_after_kib": pss1, "fds": fds,
            "processes": pids.len(), "setup_cpu_s": cpu1 - cpu0,
        }));
        log(format!(
            "{label:<22} {opened}/{count} open ({alive} alive after), RSS {:.1} -> {:.1} MiB = {:.2} KiB/conn, PSS {:.2} KiB/conn, {} processes, {fds} fds",
            rss0 / 1024.0,
            rss1 / 1024.0,
            (rss1 - rss0) / n,
            (pss1 - pss0) / n,
            pids.len()
        ));
        Ok(())
    }

    /// A target must answer `GET /tiny` with the body over HTTP/1.1, pick h2
    /// when offered (proxies) and answer over it, and close after
    /// `Connection: close`.
    async fn sanity(&self, t: &Target) -> Result<Value> {
        let tls = self.tls_for(t, false);
        let mut conn = H1::connect(t.addr, tls.as_ref()).await?;
        let (_, (body, end)) = conn.exchange(REQUEST).await?;
        if &conn.buf[body..end] != BODY {
            bail!(
                "HTTP/1.1 body {:?}",
                String::from_utf8_lossy(&conn.buf[body..end])
            );
        }
        let session = conn.tls_summary();
        one_connection(t.addr, tls.as_ref())
            .await
            .context("Connection: close")?;
        if t.tls() {
            let mut send = h2_connect(t.addr, &self.tls_any).await?;
            let got = h2_get(&mut send).await.context("HTTP/2")?;
            if got != BODY {
                bail!("HTTP/2 body {got:?}");
            }
        }
        Ok(session)
    }
}

/// Opens `count` connections (`concurrency` at a time), one request each,
/// and returns those that worked.
async fn open_idle(
    addr: SocketAddr,
    tls: Option<TlsConnector>,
    count: usize,
    concurrency: usize,
    request: bool,
) -> Vec<H1> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (next, tls) = (next.clone(), tls.clone());
        tasks.spawn(async move {
            let mut mine = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count as u64 {
                let opened = tokio::time::timeout(Duration::from_secs(10), async {
                    let mut conn = H1::connect(addr, tls.as_ref()).await?;
                    if request {
                        conn.exchange(REQUEST).await?;
                    }
                    Ok::<_, io::Error>(conn)
                })
                .await;
                if let Ok(Ok(conn)) = opened {
                    mine.push(conn);
                }
            }
            mine
        });
    }
    let mut all = Vec::with_capacity(count);
    while let Some(done) = tasks.join_next().await {
        all.extend(done.unwrap_or_default());
    }
    all
}

/// Uses every held connection once more; how many answered.
async fn use_again(conns: Vec<H1>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut alive = 0;
    for mut conn in conns {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Ok(_)) =
            tokio::time::timeout(left.min(Duration::from_secs(2)), conn.exchange(REQUEST)).await
        {
            alive += 1;
        }
    }
    alive
}

// ---- report ----------------------------------------------------------------

struct Metric {
    phase: &'static str,
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    /// Ratios against nginx and HAProxy make sense.
    ratios: bool,
}

const fn m(
    phase: &'static str,
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    ratios: bool,
) -> Metric {
    Metric {
        phase,
        key,
        label,
        unit,
        ratios,
    }
}

const METRICS: &[Metric] = &[
    m("h1", "req_per_s", "requests/s", "req/s", true),
    m(
        "h1",
        "proxy_cpu_us_per_req",
        "proxy CPU per request",
        "µs",
        true,
    ),
    m(
        "h1",
        "proxy_cpu_rel_backend",
        "proxy CPU ÷ backend CPU",
        "",
        true,
    ),
    m(
        "h1",
        "backend_cpu_us_per_req",
        "backend CPU per request",
        "µs",
        false,
    ),
    m(
        "h1",
        "client_cpu_us_per_req",
        "client CPU per request",
        "µs",
        false,
    ),
    m(
        "h1",
        "foreign_cpu_pct",
        "foreign CPU",
        "% of machine",
        false,
    ),
    m("h2", "req_per_s", "requests/s", "req/s", true),
    m(
        "h2",
        "proxy_cpu_us_per_req",
        "proxy CPU per request",
        "µs",
        true,
    ),
    m(
        "h2",
        "proxy_cpu_rel_backend",
        "proxy CPU ÷ backend CPU",
        "",
        true,
    ),
    m(
        "h2",
        "backend_cpu_us_per_req",
        "backend CPU per request",
        "µs",
        false,
    ),
    m(
        "h2",
        "client_cpu_us_per_req",
        "client CPU per request",
        "µs",
        false,
    ),
    m(
        "h2",
        "foreign_cpu_pct",
        "foreign CPU",
        "% of machine",
        false,
    ),
    m("handshake", "conn_per_s", "connections/s", "conn/s", true),
    m(
        "handshake",
        "proxy_cpu_us_per_conn",
        "proxy CPU per connection",
        "µs",
        true,
    ),
    m(
        "handshake",
        "proxy_cpu_rel_backend",
        "proxy CPU ÷ backend CPU",
        "",
        true,
    ),
    m(
        "handshake",
        "backend_cpu_us_per_conn",
        "backend CPU per connection",
        "µs",
        false,
    ),
    m(
        "handshake",
        "client_cpu_us_per_conn",
        "client CPU per connection",
        "µs",
        false,
    ),
    m(
        "handshake",
        "foreign_cpu_pct",
        "foreign CPU",
        "% of machine",
        false,
    ),
    m("latency", "p50_us", "first byte p50", "µs", true),
    m("latency", "p99_us", "first byte p99", "µs", true),
    m(
        "latency",
        "added_p50_us",
        "added vs direct, p50",
        "µs",
        true,
    ),
    m(
        "latency",
        "added_p99_us",
        "added vs direct, p99",
        "µs",
        true,
    ),
    m(
        "idle",
        "rss_kib_per_conn",
        "RSS per idle connection",
        "KiB",
        true,
    ),
    m(
        "idle",
        "pss_kib_per_conn",
        "PSS per idle connection",
        "KiB",
        true,
    ),
    m(
        "idle",
        "rss_before_mib",
        "RSS before (fresh, one request)",
        "MiB",
        true,
    ),
    m(
        "idle",
        "rss_after_mib",
        "RSS with the connections held",
        "MiB",
        true,
    ),
    m(
        "idle",
        "setup_cpu_us_per_conn",
        "proxy CPU per connection set up",
        "µs",
        true,
    ),
];

/// The issue's targets: mc-proxy's `metric` at most `reference`'s.
struct Goal {
    what: &'static str,
    phase: &'static str,
    metric: &'static str,
    reference: &'static str,
}

const GOALS: &[Goal] = &[
    Goal {
        what: "proxy CPU per request, HTTP/1.1 keep-alive ≤ nginx",
        phase: "h1",
        metric: "proxy_cpu_us_per_req",
        reference: "nginx",
    },
    Goal {
        what: "proxy CPU per request, HTTP/1.1 keep-alive ≤ HAProxy",
        phase: "h1",
        metric: "proxy_cpu_us_per_req",
        reference: "haproxy",
    },
    Goal {
        what: "proxy CPU per request, HTTP/2 ≤ nginx",
        phase: "h2",
        metric: "proxy_cpu_us_per_req",
        reference: "nginx",
    },
    Goal {
        what: "proxy CPU per request, HTTP/2 ≤ HAProxy",
        phase: "h2",
        metric: "proxy_cpu_us_per_req",
        reference: "haproxy",
    },
    Goal {
        what: "added first-byte latency p50 ≤ nginx",
        phase: "latency",
        metric: "added_p50_us",
        reference: "nginx",
    },
    Goal {
        what: "RSS per idle L7 connection ≤ nginx",
        phase: "idle",
        metric: "rss_kib_per_conn",
        reference: "nginx",
    },
];

fn fmt(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    match x.abs() {
        a if a >= 1000.0 => format!("{x:.0}"),
        a if a >= 100.0 => format!("{x:.1}"),
        a if a >= 10.0 => format!("{x:.2}"),
        _ => format!("{x:.3}"),
    }
}

fn phase_title(phase: &str, a: &Args) -> String {
    match phase {
        "h1" => format!(
            "HTTP/1.1 keep-alive: {} connections, closed loop, {} s after {} s warm-up",
            a.conns, a.secs, a.warmup
        ),
        "h2" => format!(
            "HTTP/2: {} connections × {} streams, closed loop, {} s after {} s warm-up",
            a.h2_conns, a.streams, a.secs, a.warmup
        ),
        "handshake" => format!(
            "New TLS connection per request (full handshake, one GET, Connection: close): {} workers, {} s",
            a.hs_workers, a.secs
        ),
        "latency" => format!(
            "First-byte latency, sequential, warm keep-alive HTTP/1.1: {} samples per target and repetition (p50/p99 per repetition, then the median over repetitions)",
            a.lat_count
        ),
        "idle" => format!(
            "Idle L7 connections: {} TLS connections, one request each, held; fresh proxy each repetition",
            a.idle
        ),
        other => other.to_string(),
    }
}

fn summary(results: &Results) -> Value {
    let mut out: BTreeMap<&str, BTreeMap<&str, BTreeMap<&str, Value>>> = BTreeMap::new();
    for ((phase, metric), targets) in &results.values {
        for (target, values) in targets {
            let (min, max) = spread(values);
            out.entry(phase)
                .or_default()
                .entry(metric)
                .or_default()
                .insert(
                    target,
                    json!({"median": median(values), "min": min, "max": max, "values": values}),
                );
        }
    }
    json!(out)
}

fn spread(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

fn markdown(
    results: &Results,
    args: &Args,
    names: &[&str],
    phases: &[&str],
    meta: &Value,
) -> (String, Vec<Value>) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# L7 benchmark {}\n",
        meta["started"].as_str().unwrap_or("")
    );
    for (key, value) in meta.as_object().into_iter().flatten() {
        if key != "started" {
            let _ = writeln!(out, "- {key}: {}", plain(value));
        }
    }
    for &phase in phases {
        let _ = writeln!(out, "\n## {}\n", phase_title(phase, args));
        let _ = writeln!(
            out,
            "| metric | target | median | min–max | ÷ nginx | ÷ haproxy |\n|---|---|---|---|---|---|"
        );
        for metric in METRICS.iter().filter(|m| m.phase == phase) {
            let reference = |name: &str| {
                results
                    .get(phase, metric.key, name)
                    .map(|v| median(v))
                    .filter(|&x| metric.ratios && x.is_finite() && x != 0.0)
            };
            let (ng, hp) = (reference("nginx"), reference("haproxy"));
            for &name in names {
                let Some(v) = results.get(phase, metric.key, name) else {
                    continue;
                };
                let med = median(v);
                let (lo, hi) = spread(v);
                let ratio =
                    |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{:.2}", med / r));
                let unit = if metric.unit.is_empty() {
                    String::new()
                } else {
                    format!(" {}", metric.unit)
                };
                let _ = writeln!(
                    out,
                    "| {} | {name} | {}{unit} | {}–{} | {} | {} |",
                    metric.label,
                    fmt(med),
                    fmt(lo),
                    fmt(hi),
                    ratio(ng),
                    ratio(hp)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\n## Targets (issue 15, item 8): mc-proxy against nginx and HAProxy, medians\n"
    );
    let _ = writeln!(
        out,
        "| target | mc-proxy | reference | mc-proxy ÷ reference | spreads | result |\n|---|---|---|---|---|---|"
    );
    let mut goals = Vec::new();
    for goal in GOALS {
        let mc = results.get(goal.phase, goal.metric, "mc-proxy");
        let reference = results.get(goal.phase, goal.metric, goal.reference);
        let (cells, verdict) = match (mc, reference) {
            (Some(mc), Some(rf)) => {
                let (a, b) = (median(mc), median(rf));
                let ((mlo, mhi), (rlo, rhi)) = (spread(mc), spread(rf));
                let spreads = if mc.len() < 2 || rf.len() < 2 {
                    "one repetition"
                } else if mlo <= rhi && rlo <= mhi {
                    "overlap"
                } else {
                    "apart"
                };
                let unit = METRICS
                    .iter()
                    .find(|m| m.phase == goal.phase && m.key == goal.metric)
                    .map_or("", |m| m.unit);
                let verdict = if a <= b { "PASS" } else { "MISS" };
                (
                    format!(
                        "{} {unit} | {} {unit} ({}) | {} | {spreads} |",
                        fmt(a),
                        fmt(b),
                        goal.reference,
                        if b > 0.0 {
                            format!("{:.2}", a / b)
                        } else {
                            "-".into()
                        },
                    ),
                    verdict,
                )
            }
            _ => ("- | - | - | - |".to_string(), "n/a"),
        };
        let _ = writeln!(out, "| {} | {cells} {verdict} |", goal.what);
        goals.push(json!({
            "target": goal.what, "phase": goal.phase, "metric": goal.metric,
            "reference": goal.reference, "result": verdict,
            "mc_proxy": mc.map(|v| median(v)), "reference_value": reference.map(|v| median(v)),
        }));
    }
    let _ = writeln!(
        out,
        "\nspreads: whether the min–max ranges of mc-proxy and the reference overlap (overlap = the verdict is within this run's noise)."
    );
    let _ = writeln!(out, "\n## Checks\n");
    if results.errors.is_empty() {
        let _ = writeln!(out, "- errors: none");
    } else {
        let list: Vec<String> = results
            .errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            out,
            "- errors (failed requests/connections, by phase/target): {}",
            list.join(", ")
        );
    }
    (out, goals)
}

/// A JSON value as prose: strings unquoted, objects as `key: value; ...`.
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.trim().replace('\n', " / "),
        Value::Array(items) => items.iter().map(plain).collect::<Vec<_>>().join(", "),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}: {}", plain(v)))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

fn first_line(command: &Path, arg: &str) -> String {
    Command::new(command)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "?".to_string())
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

// ---- run -------------------------------------------------------------------

async fn run(args: Args) -> Result<()> {
    // Children inherit the raised limit (2000 idle connections are ~4000
    // descriptors in a proxy).
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let names: Vec<&str> = args
        .targets
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let phases: Vec<&str> = args
        .phases
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for phase in &phases {
        if !["h1", "h2", "handshake", "latency", "idle"].contains(phase) {
            bail!("unknown phase {phase:?}");
        }
    }
    let procfs = ProcFs::new();
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let started = utc_now();
    let busy_before = Quiet::busy_pct(&procfs, ncpu).await;
    if busy_before > 10.0 {
        log(format!(
            "WARNING: the machine is {busy_before:.0}% busy before the run; results will be noisy"
        ));
    }

    let workdir = tempfile::Builder::new().prefix("l7-bench-").tempdir()?;
    let dir = workdir.path().to_path_buf();
    // nginx workers (user nobody when run as root) may need the temp paths.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let certs = make_cert(&dir)?;
    let backend_addr = SocketAddr::from(([127, 0, 0, 1], port(&args, "direct")));
    write_configs(&dir, &args, &certs, backend_addr)?;

    let mut targets = Vec::new();
    for name in &names {
        let (name, kind, workers) = match *name {
            "direct" => ("direct", Kind::Direct, None),
            "mc-proxy" => ("mc-proxy", Kind::McProxy, args.mc_workers),
            "mc-proxy-2w" => ("mc-proxy-2w", Kind::McProxy, Some(2)),
            "nginx" => ("nginx", Kind::Nginx, None),
            "haproxy" => ("haproxy", Kind::Haproxy, None),
            other => {
                bail!("unknown target {other:?} (direct, mc-proxy, nginx, haproxy, mc-proxy-2w)")
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port(&args, name)));
        if kind == Kind::McProxy {
            write_mc_config(&dir, name, addr, &args, &certs, backend_addr)?;
        }
        targets.push(Target {
            name,
            kind,
            workers,
            addr,
            dir: dir.clone(),
            proc: None,
        });
    }
    for addr in
        std::iter::once(backend_addr).chain(targets.iter().filter(|t| t.tls()).map(|t| t.addr))
    {
        if !port_free(addr) {
            bail!("{addr} is in use; pick another --port-base");
        }
    }

    let backend = Proc::spawn(
        "backend",
        Command::new(std::env::current_exe()?)
            .arg("--serve-backend")
            .arg(backend_addr.to_string()),
        &dir.join("backend.log"),
    )?;
    wait_listening(backend_addr, Some(&backend)).await?;

    let mut versions = serde_json::Map::new();
    let mut sanity = serde_json::Map::new();
    let mut bench = Bench {
        tls_h1: client_config(&certs.der, &[b"http/1.1"])?,
        tls_h2: client_config(&certs.der, &[b"h2"])?,
        tls_any: client_config(&certs.der, &[b"h2", b"http/1.1"])?,
        args: args.clone(),
        procfs,
        ncpu,
        backend,
        quiet: Quiet {
            max_pct: args.quiet_pct,
            per_wait: args.quiet_wait,
            budget: args.quiet_budget,
            used: 0.0,
            gave_up: 0,
        },
        results: Results::default(),
    };
    let mut live = Vec::new();
    for mut t in targets {
        let version = match t.kind {
            Kind::Direct => "hyper HTTP/1.1 backend (this program)".to_string(),
            Kind::McProxy => first_line(&args.bin, "--version"),
            Kind::Nginx => first_line(&args.nginx, "-v"),
            Kind::Haproxy => first_line(&args.haproxy, "-v"),
        };
        versions.insert(t.name.to_string(), json!(version));
        let started = match start_target(&mut t, &args) {
            Ok(()) => wait_listening(t.addr, t.proc.as_ref()).await,
            Err(e) => Err(e),
        };
        let checked = match started {
            Ok(()) => bench.sanity(&t).await,
            Err(e) => Err(e),
        };
        match checked {
            Ok(session) => {
                log(format!("sanity {}: ok, {session}", t.name));
                sanity.insert(t.name.to_string(), session);
                live.push(t);
            }
            Err(e) => {
                log(format!(
                    "sanity {}: FAILED, dropped from the run: {e:#}",
                    t.name
                ));
                sanity.insert(t.name.to_string(), json!(format!("failed: {e:#}")));
                if let Some(mut proc) = t.proc.take() {
                    proc.stop();
                }
            }
        }
    }
    if live.is_empty() {
        bail!("no target passed the sanity check");
    }

    let run_started = Instant::now();
    let mut phase_secs = serde_json::Map::new();
    for &phase in &phases {
        let t0 = Instant::now();
        match phase {
            "latency" => bench.phase_latency(&live).await?,
            "idle" => bench.phase_idle(&mut live).await?,
            _ => bench.phase_load(&live, phase).await?,
        }
        phase_secs.insert(
            phase.to_string(),
            json!((t0.elapsed().as_secs_f64() * 10.0).round() / 10.0),
        );
    }
    let total_secs = run_started.elapsed().as_secs_f64();
    for t in &mut live {
        if let Some(mut proc) = t.proc.take() {
            proc.stop();
        }
    }
    bench.backend.stop();
    let busy_after = Quiet::busy_pct(&bench.procfs, ncpu).await;

    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut warnings = Vec::new();
    if cfg!(debug_assertions) {
        warnings.push("the client (this example) is a debug build: run with --release for numbers");
    }
    if args.bin.to_string_lossy().contains("/debug/") {
        warnings.push("mc-proxy is a debug build: use target/release/mc-proxy for numbers");
    }
    let meta = json!({
        "started": started,
        "host": format!("{cpu_model} ×{ncpu}, kernel {}", kernel.trim()),
        "machine busy before / after (%)": [busy_before.round(), busy_after.round()],
        "quiet gate": format!(
            "waited {:.1} s in all, measured while busy {}×",
            bench.quiet.used, bench.quiet.gave_up
        ),
        "versions": versions,
        "tls (sanity check)": sanity,
        "mc-proxy workers": args.mc_workers.map_or("default (TOKIO_WORKER_THREADS unset; 1 on a 1-2 CPU host)".to_string(), |n| n.to_string()) + "; mc-proxy-2w: 2",
        "params": {
            "reps": args.reps, "secs": args.secs, "warmup": args.warmup, "conns": args.conns,
            "h2_conns": args.h2_conns, "streams": args.streams, "hs_workers": args.hs_workers,
            "lat_count": args.lat_count, "idle": args.idle, "client_threads": args.client_threads,
            "mc_log_level": args.mc_log_level, "quick": args.quick,
        },
        "phase seconds": phase_secs,
        "total seconds": (total_secs * 10.0).round() / 10.0,
        "warnings": if warnings.is_empty() { json!("none") } else { json!(warnings) },
    });
    let names_live: Vec<&str> = live.iter().map(|t| t.name).collect();
    let (md, goals) = markdown(&bench.results, &args, &names_live, &phases, &meta);
    println!("{md}");
    if let Some(out) = &args.out {
        let document = json!({
            "meta": meta,
            "records": bench.results.records,
            "summary": summary(&bench.results),
            "errors": bench.results.errors,
            "targets": goals,
            "markdown": md,
        });
        std::fs::write(out, serde_json::to_string_pretty(&document)?)
            .with_context(|| format!("writing {}", out.display()))?;
        log(format!("wrote {}", out.display()));
    }
    if args.keep_workdir {
        let kept = workdir.keep();
        log(format!("work directory kept: {}", kept.display()));
    }
    Ok(())
}
