//! Backend pools benchmark (issue 16 item 7, SPEC §6.3), loopback only.
//!
//! Two phases, each against baselines measured in the same run:
//!
//! - `conn`: the proxy's CPU per short L4 connection to a route of one
//!   backend (`single`) against routes of three backends (`rr`: round
//!   robin, `lc`: least connections). One mc-proxy with the three routes
//!   (no active checks) in front of one backend process listening on three
//!   addresses. Each connection: connect, a one-record ClientHello naming
//!   the variant's route, the backend answers `!` and closes, the client
//!   reads to EOF. `--rounds` rounds, each of `--conns / --rounds`
//!   connections per variant with `--workers` concurrent clients, the
//!   variants alternated within a round and their order rotated from round
//!   to round (A B C, B C A, C A B, ...) so drift cancels. The figure is
//!   the proxy's CPU over all rounds of a variant divided by its
//!   connections, and the ratio pool ÷ single.
//! - `health`: the proxy's CPU while idle with `--routes` routes of three
//!   backends each, with and without a TCP active check at
//!   `--health-interval`, as % of one core over `--secs` seconds after a
//!   warm-up (default: one interval). Topologies (`--topologies`):
//!   - `none`: the `distinct` table without `health_interval` (the
//!     baseline: a proxy with the same routes and no checks);
//!   - `shared`: every route names the same three backends, so identical
//!     checks are one check (3 probes per interval);
//!   - `distinct`: 3 × routes distinct backends, `127.1.X.Y:PORT`, each a
//!     listening socket (the loopback /8 needs no setup), spread over
//!     backend processes of at most 15,000 listeners each (RLIMIT_NOFILE);
//!     every probe is a full TCP handshake that the backend accepts, counts
//!     and closes;
//!   - `distinct-refused` (not in the default set): the same number of
//!     distinct addresses `127.2.X.Y:PORT` where nothing listens, so every
//!     probe is answered by an RST and every check goes down after
//!     `health_fall` failures; its warm-up is (fall + 1) intervals, so the
//!     30,000 down transitions (and their log lines) are not in the window.
//!
//!   Probes per second are counted two ways: the backends' accepts
//!   (`distinct`, `shared`) and the machine's `Tcp: ActiveOpens` from
//!   `/proc/net/snmp` (every connect(2) on the machine, so foreign
//!   connects count too). The per-probe cost is (CPU − baseline CPU) ÷
//!   probes.
//!
//! CPU is utime+stime from `/proc/PID/stat` (10 ms ticks) of the proxy,
//! the backends and this process (the client); the machine's busy time is
//! from `/proc/stat`, and "foreign" is what the machine did beyond those
//! (another build on a shared host shows up there). mc-proxy runs with
//! `[log] level = "warn"` (no line per connection) and its default worker
//! count.
//!
//! ```text
//! cargo build --release --bin mc-proxy
//! cargo run --release --example pool-bench -- --bin target/release/mc-proxy      # ~2.5 min
//! cargo run --release --example pool-bench -- --phases health --topologies none,distinct-refused
//! cargo run --release --example pool-bench -- --phases conn --conns 60000 --rounds 12
//! ```
//!
//! Children get SIGKILL if this process dies (PR_SET_PDEATHSIG) and are
//! stopped when a phase ends, fails or is interrupted.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wire::hello::build as hello;

/// Listeners per backend process in the `distinct` topology (the hard
/// RLIMIT_NOFILE here is 20,000).
const LISTENERS_PER_BACKEND: usize = 15_000;

#[derive(Parser, Debug)]
#[command(about = "Backend pools benchmark: per-connection CPU and health-check CPU")]
struct Args {
    /// mc-proxy binary to start.
    #[arg(long, default_value = "target/release/mc-proxy")]
    bin: PathBuf,
    /// Comma-separated phases: conn, health.
    #[arg(long, default_value = "conn,health")]
    phases: String,
    /// Where the started proxies listen.
    #[arg(long, default_value = "127.0.0.1:18710")]
    listen: SocketAddr,
    /// The conn phase's backend listens on 127.0.0.1 at this port and the
    /// next two; backend processes answer their accept count on this port
    /// plus 10 and up.
    #[arg(long, default_value_t = 18701)]
    backend_port: u16,
    /// The port of every `distinct` backend address (127.1.X.Y) and of the
    /// `distinct-refused` ones (127.2.X.Y).
    #[arg(long, default_value_t = 18720)]
    distinct_port: u16,
    /// conn: connections per variant over all rounds.
    #[arg(long, default_value_t = 40_000)]
    conns: usize,
    /// conn: rounds (each runs every variant once).
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// conn: concurrent clients.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// conn: comma-separated variants: single, rr, lc.
    #[arg(long, default_value = "single,rr,lc")]
    variants: String,
    /// health: routes in the table.
    #[arg(long, default_value_t = 10_000)]
    routes: usize,
    /// health: the routes' health_interval, in seconds.
    #[arg(long, default_value_t = 5.0)]
    health_interval: f64,
    /// health: health_fall (the refused topology's warm-up depends on it).
    #[arg(long, default_value_t = 3)]
    health_fall: u32,
    /// health: seconds measured per topology.
    #[arg(long, default_value_t = 30.0)]
    secs: f64,
    /// health: warm-up seconds before measuring (default: one interval;
    /// `distinct-refused`: fall + 1 intervals).
    #[arg(long)]
    warmup: Option<f64>,
    /// health: comma-separated topologies: none, shared, distinct,
    /// distinct-refused.
    #[arg(long, default_value = "none,shared,distinct")]
    topologies: String,
    /// Before each measurement, wait (bounded) until the machine is under
    /// this % busy while our processes idle (0 = don't wait).
    #[arg(long, default_value_t = 15.0)]
    quiet_pct: f64,
    /// The most seconds spent waiting for quiet over the whole run.
    #[arg(long, default_value_t = 120.0)]
    quiet_budget: f64,
    /// Also write the report (Markdown) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Internal: run as a backend (`conn` or `accept`).
    #[arg(long, hide = true)]
    serve_backend: Option<String>,
    /// Internal: the backend's listening addresses (conn) or its index
    /// range `START..END` of distinct addresses (accept).
    #[arg(long, hide = true)]
    serve: Option<String>,
    /// Internal: where the backend answers its accept count.
    #[arg(long, hide = true)]
    control: Option<SocketAddr>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(kind) = args.serve_backend.clone() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(serve_backend(kind, args));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Children are spawned from this future, polled on the main thread
    // (their PR_SET_PDEATHSIG is tied to it).
    runtime.block_on(async {
        tokio::select! {
            result = run(args) => result,
            _ = tokio::signal::ctrl_c() => bail!("interrupted; children stopped"),
        }
    })
}

// ---- addresses ---------------------------------------------------------------

/// The `i`-th distinct backend address: 127.NET.X.Y:port.
fn distinct_addr(net: u8, i: usize, port: u16) -> SocketAddr {
    let ip = Ipv4Addr::new(127, net, (i / 256) as u8, (i % 256) as u8);
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

// ---- backends ----------------------------------------------------------------

async fn serve_backend(kind: String, args: Args) -> Result<()> {
    let serve = args.serve.context("--serve")?;
    let accepts = Arc::new(AtomicU64::new(0));
    if let Some(control) = args.control {
        let listener = TcpListener::bind(control).await?;
        let accepts = accepts.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let n = accepts.load(Ordering::Relaxed);
                let _ = stream.write_all(&n.to_be_bytes()).await;
            }
        });
    }
    let addrs: Vec<SocketAddr> = match kind.as_str() {
        "conn" => serve
            .split(',')
            .map(|a| a.parse().context("--serve"))
            .collect::<Result<_>>()?,
        "accept" => {
            let (start, end) = serve.split_once("..").context("--serve START..END")?;
            let (start, end): (usize, usize) = (start.parse()?, end.parse()?);
            (start..end)
                .map(|i| distinct_addr(1, i, args.distinct_port))
                .collect()
        }
        other => bail!("unknown backend kind {other}"),
    };
    let conn = kind == "conn";
    for addr in addrs {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket
            .bind(addr)
            .with_context(|| format!("backend cannot bind {addr}"))?;
        let listener = socket.listen(1024)?;
        let accepts = accepts.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                accepts.fetch_add(1, Ordering::Relaxed);
                if conn {
                    tokio::spawn(async move {
                        let _ = answer(stream).await;
                    });
                }
                // accept: dropped at once (a probe connects and closes).
            }
        });
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// Reads one ClientHello record, answers `!` and closes.
async fn answer(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let len = u16::from_be_bytes([header[3], header[4]]) as usize;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    stream.write_all(b"!").await?;
    stream.shutdown().await
}

async fn accept_count(control: SocketAddr) -> Result<u64> {
    let mut stream = TcpStream::connect(control).await?;
    let mut n = [0u8; 8];
    stream.read_exact(&mut n).await?;
    Ok(u64::from_be_bytes(n))
}

// ---- processes ---------------------------------------------------------------

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

/// Started children; killed and reaped when dropped.
#[derive(Default)]
struct Children(Vec<Child>);

impl Children {
    fn spawn(&mut self, command: &mut Command, name: &str) -> Result<u32> {
        command.stdin(Stdio::null()).stdout(Stdio::null());
        sys::die_with_parent(command);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        self.0.push(child);
        Ok(pid)
    }

    fn exited(&mut self) -> Result<()> {
        for child in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                bail!("child {} exited early: {status}", child.id());
            }
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn ticks_per_s() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime+stime of a process, in seconds.
fn cpu_s(pid: &str, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / ticks
}

fn rss_mib(pid: u32) -> f64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Non-idle CPU seconds of the whole machine.
fn busy_s(ticks: f64) -> f64 {
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
    (total - idle) / ticks
}

/// `Tcp: ActiveOpens` from /proc/net/snmp (connects made on the machine).
fn active_opens() -> u64 {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ActiveOpens")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// A CPU snapshot of the processes measured.
#[derive(Clone, Copy)]
struct Snap {
    at: Instant,
    proxy: f64,
    backends: f64,
    client: f64,
    busy: f64,
    opens: u64,
}

struct Meter {
    ticks: f64,
    proxy: u32,
    backends: Vec<u32>,
}

impl Meter {
    fn snap(&self) -> Snap {
        Snap {
            at: Instant::now(),
            proxy: cpu_s(&self.proxy.to_string(), self.ticks),
            backends: self
                .backends
                .iter()
                .map(|pid| cpu_s(&pid.to_string(), self.ticks))
                .sum(),
            client: cpu_s("self", self.ticks),
            busy: busy_s(self.ticks),
            opens: active_opens(),
        }
    }
}

/// What happened between two snapshots.
#[derive(Clone, Copy, Default)]
struct Span {
    secs: f64,
    proxy: f64,
    backends: f64,
    client: f64,
    /// % of the whole machine.
    foreign_pct: f64,
    opens: u64,
}

impl Span {
    fn between(a: Snap, b: Snap, ncpu: f64) -> Span {
        let secs = b.at.duration_since(a.at).as_secs_f64();
        let (proxy, backends, client) = (
            b.proxy - a.proxy,
            b.backends - a.backends,
            b.client - a.client,
        );
        let foreign = (b.busy - a.busy - proxy - backends - client).max(0.0);
        Span {
            secs,
            proxy,
            backends,
            client,
            foreign_pct: 100.0 * foreign / secs / ncpu,
            opens: b.opens.saturating_sub(a.opens),
        }
    }
}

/// Waits (bounded by the run's budget) until the machine's load beyond our
/// own processes, sampled for 0.3 s, is under `--quiet-pct`.
struct Quiet {
    max_pct: f64,
    budget: f64,
    ticks: f64,
    ncpu: f64,
}

impl Quiet {
    async fn wait(&mut self, label: &str, ours: &[u32]) {
        if self.max_pct <= 0.0 {
            return;
        }
        let own = |ticks| -> f64 {
            ours.iter()
                .map(|pid| cpu_s(&pid.to_string(), ticks))
                .sum::<f64>()
                + cpu_s("self", ticks)
        };
        let start = Instant::now();
        loop {
            let (b0, o0, t0) = (busy_s(self.ticks), own(self.ticks), Instant::now());
            tokio::time::sleep(Duration::from_millis(300)).await;
            let foreign = (busy_s(self.ticks) - b0) - (own(self.ticks) - o0);
            let busy = 100.0 * foreign / t0.elapsed().as_secs_f64() / self.ncpu;
            let spent = start.elapsed().as_secs_f64();
            if busy <= self.max_pct {
                break;
            }
            if spent >= self.budget {
                println!("{label}: machine {busy:.0}% busy (not us), quiet budget spent; measuring anyway");
                break;
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        let spent = start.elapsed().as_secs_f64();
        self.budget = (self.budget - spent).max(0.0);
        if spent > 1.5 {
            println!("{label}: waited {spent:.1} s for the machine to be quiet");
        }
    }
}

async fn wait_listening(addr: SocketAddr, children: &mut Children) -> Result<f64> {
    let started = Instant::now();
    for _ in 0..1200 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(started.elapsed().as_secs_f64());
        }
        children.exited()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on {addr} after 60 s")
}

async fn ensure_free(addr: SocketAddr, what: &str) -> Result<()> {
    if TcpStream::connect(addr).await.is_ok() {
        bail!("something already listens on {addr}; pick another {what}");
    }
    Ok(())
}

// ---- the proxy's configuration ---------------------------------------------------

fn config_head(dir: &Path, listen: SocketAddr) -> String {
    format!(
        "[database]\npath = \"{}\"\n\n[log]\nlevel = \"warn\"\n\n\
         [proxy]\nconnect_timeout = \"2s\"\nhandshake_timeout = \"30s\"\nidle_timeout = \"60s\"\nshutdown_timeout = \"1s\"\n\n\
         [[listeners]]\naddr = \"{listen}\"\n",
        dir.join("mc-proxy.db").display()
    )
}

fn route(config: &mut String, hostname: &str, backends: &[SocketAddr], extra: &str) {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    let _ = write!(
        config,
        "  [[listeners.routes]]\n  hostname = \"{hostname}\"\n  backends = [{}]\n{extra}",
        list.join(", ")
    );
}

fn start_proxy(bin: &Path, dir: &Path, config: &str, children: &mut Children) -> Result<u32> {
    let path = dir.join("mc-proxy.toml");
    std::fs::write(&path, config)?;
    let log = std::fs::File::create(dir.join("mc-proxy.log"))?;
    children.spawn(
        Command::new(bin)
            .arg("server")
            .arg("-c")
            .arg(&path)
            .stderr(log),
        "mc-proxy",
    )
}

fn backend_command(
    kind: &str,
    serve: &str,
    control: SocketAddr,
    distinct_port: u16,
) -> Result<Command> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("--serve-backend")
        .arg(kind)
        .arg("--serve")
        .arg(serve)
        .arg("--control")
        .arg(control.to_string())
        .arg("--distinct-port")
        .arg(distinct_port.to_string())
        .stderr(Stdio::inherit());
    Ok(command)
}

// ---- the report ----------------------------------------------------------------

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
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

// ---- run -------------------------------------------------------------------------

async fn run(args: Args) -> Result<()> {
    let ticks = ticks_per_s();
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut report = Report {
        text: String::new(),
    };
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
    report.line(format!(
        "# pool-bench {date}\n\nbinary `{}`, HEAD {commit}, {ncpu} CPUs, args: `{}`\n",
        args.bin.display(),
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    ));
    if !args.bin.exists() {
        bail!(
            "{} not found (cargo build --release --bin mc-proxy)",
            args.bin.display()
        );
    }
    let mut quiet = Quiet {
        max_pct: args.quiet_pct,
        budget: args.quiet_budget,
        ticks,
        ncpu,
    };
    for phase in args.phases.split(',').map(str::trim) {
        match phase {
            "conn" => conn_phase(&args, ticks, ncpu, &mut quiet, &mut report).await?,
            "health" => health_phase(&args, ticks, ncpu, &mut quiet, &mut report).await?,
            other => bail!("unknown phase {other:?}"),
        }
    }
    if let Some(out) = &args.out {
        std::fs::write(out, &report.text).with_context(|| format!("writing {}", out.display()))?;
        println!("report written to {}", out.display());
    }
    Ok(())
}

// ---- conn phase ----------------------------------------------------------------------

async fn conn_phase(
    args: &Args,
    ticks: f64,
    ncpu: f64,
    quiet: &mut Quiet,
    report: &mut Report,
) -> Result<()> {
    let variants: Vec<&str> = args.variants.split(',').map(str::trim).collect();
    for v in &variants {
        if !["single", "rr", "lc"].contains(v) {
            bail!("unknown variant {v:?}");
        }
    }
    let backends: Vec<SocketAddr> = (0..3)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], args.backend_port + i)))
        .collect();
    for b in &backends {
        ensure_free(*b, "--backend-port").await?;
    }
    ensure_free(args.listen, "--listen").await?;
    let control = SocketAddr::from(([127, 0, 0, 1], args.backend_port + 10));
    let mut children = Children::default();
    let serve = backends
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let backend_pid = children.spawn(
        &mut backend_command("conn", &serve, control, args.distinct_port)?,
        "backend",
    )?;
    for b in &backends {
        wait_listening(*b, &mut children).await?;
    }
    let dir = tempfile::tempdir()?;
    let mut config = config_head(dir.path(), args.listen);
    route(&mut config, "single.pool.test", &backends[..1], "");
    route(
        &mut config,
        "rr.pool.test",
        &backends,
        "  balance = \"round_robin\"\n",
    );
    route(
        &mut config,
        "lc.pool.test",
        &backends,
        "  balance = \"least_connections\"\n",
    );
    let proxy_pid = start_proxy(&args.bin, dir.path(), &config, &mut children)?;
    wait_listening(args.listen, &mut children).await?;
    let meter = Meter {
        ticks,
        proxy: proxy_pid,
        backends: vec![backend_pid],
    };
    let per_round = (args.conns / args.rounds.max(1)).max(1);
    report.line(format!(
        "## conn: proxy CPU per short L4 connection, pool of 3 vs one backend\n\n\
         {} rounds × {per_round} connections per variant, {} concurrent clients; each connection: \
         ClientHello (one record, {} B) → backend answers 1 byte and closes. Variants: single = \
         `backends = [{}]`; rr = 3 backends, round_robin; lc = 3 backends, least_connections.\n",
        args.rounds,
        args.workers,
        hello::client_hello(Some("rr.pool.test")).len(),
        backends[0]
    ));
    // Warm-up: every variant once, unmeasured.
    for v in &variants {
        let hello = Arc::new(hello::client_hello(Some(&format!("{v}.pool.test"))));
        let (ok, errors) = connections(args.listen, hello, 2000, args.workers).await;
        if errors > 0 || ok != 2000 {
            bail!("warm-up of {v}: {ok} ok, {errors} errors");
        }
    }
    let mut spans: Vec<Vec<Span>> = vec![Vec::new(); variants.len()];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut errors_total = vec![0u64; variants.len()];
    report.line("| round | variant | conns | conn/s | proxy µs/conn | backend µs/conn | client µs/conn | foreign % |");
    report.line("|---|---|---|---|---|---|---|---|");
    for round in 0..args.rounds {
        for k in 0..variants.len() {
            let index = (round + k) % variants.len();
            let v = variants[index];
            let hello = Arc::new(hello::client_hello(Some(&format!("{v}.pool.test"))));
            quiet
                .wait(
                    &format!("round {} {v}", round + 1),
                    &[proxy_pid, backend_pid],
                )
                .await;
            let a = meter.snap();
            let (ok, errors) = connections(args.listen, hello, per_round, args.workers).await;
            let ran = a.at.elapsed().as_secs_f64();
            // Let the proxy finish closing before reading its CPU.
            tokio::time::sleep(Duration::from_millis(150)).await;
            let b = meter.snap();
            let span = Span::between(a, b, ncpu);
            errors_total[index] += errors;
            let n = ok as f64;
            report.line(format!(
                "| {} | {v} | {ok} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
                round + 1,
                n / ran,
                span.proxy * 1e6 / n,
                span.backends * 1e6 / n,
                span.client * 1e6 / n,
                span.foreign_pct
            ));
            spans[index].push(Span {
                opens: ok as u64,
                ..span
            });
            rates[index].push(n / ran);
        }
    }
    children.exited()?;
    drop(children);
    report.line("");
    report.line("| variant | conns | errors | conn/s (median) | proxy CPU µs/conn (total ÷ conns) | per-round median (min–max) | ÷ single |");
    report.line("|---|---|---|---|---|---|---|");
    let per_conn = |s: &[Span]| {
        let cpu: f64 = s.iter().map(|x| x.proxy).sum();
        let n: u64 = s.iter().map(|x| x.opens).sum();
        (cpu * 1e6 / n as f64, n)
    };
    let single = variants
        .iter()
        .position(|v| *v == "single")
        .map(|i| per_conn(&spans[i]).0);
    for (i, v) in variants.iter().enumerate() {
        let (us, n) = per_conn(&spans[i]);
        let rounds: Vec<f64> = spans[i]
            .iter()
            .map(|s| s.proxy * 1e6 / s.opens as f64)
            .collect();
        let (lo, hi) = range(&rounds);
        report.line(format!(
            "| {v} | {n} | {} | {:.0} | {us:.2} | {:.2} ({lo:.2}–{hi:.2}) | {} |",
            errors_total[i],
            median(&rates[i]),
            median(&rounds),
            single.map_or("".into(), |s| format!("{:.3}", us / s))
        ));
    }
    // Paired per-round ratios: each pool round against the single round of
    // the same round.
    if let Some(si) = variants.iter().position(|v| *v == "single") {
        for (i, v) in variants.iter().enumerate() {
            if i == si {
                continue;
            }
            let ratios: Vec<f64> = spans[i]
                .iter()
                .zip(&spans[si])
                .map(|(p, s)| (p.proxy / p.opens as f64) / (s.proxy / s.opens as f64))
                .collect();
            let (lo, hi) = range(&ratios);
            report.line(format!(
                "\n{v} ÷ single, per round (paired): median {:.3} (min {lo:.3}, max {hi:.3})",
                median(&ratios)
            ));
        }
    }
    let foreign: Vec<f64> = spans.iter().flatten().map(|s| s.foreign_pct).collect();
    let (lo, hi) = range(&foreign);
    report.line(format!(
        "\nforeign CPU during the rounds: median {:.1} % (min {lo:.1}, max {hi:.1}) of the machine\n",
        median(&foreign)
    ));
    if errors_total.iter().any(|e| *e > 0) {
        bail!("connections failed: {errors_total:?}");
    }
    Ok(())
}

/// `count` connections through the proxy, `workers` at a time. Returns
/// (succeeded, failed).
async fn connections(
    proxy: SocketAddr,
    hello: Arc<Vec<u8>>,
    count: usize,
    workers: usize,
) -> (usize, u64) {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers.max(1) {
        let (next, errors, ok, hello) = (next.clone(), errors.clone(), ok.clone(), hello.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(8);
            while next.fetch_add(1, Ordering::Relaxed) < count {
                got.clear();
                let result = async {
                    let mut stream = TcpStream::connect(proxy).await?;
                    stream.set_nodelay(true)?;
                    stream.write_all(&hello).await?;
                    stream.read_to_end(&mut got).await?;
                    Ok::<_, io::Error>(got == b"!")
                }
                .await;
                if let Ok(true) = result {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    (ok.load(Ordering::Relaxed), errors.load(Ordering::Relaxed))
}

// ---- health phase ----------------------------------------------------------------------

async fn health_phase(
    args: &Args,
    ticks: f64,
    ncpu: f64,
    quiet: &mut Quiet,
    report: &mut Report,
) -> Result<()> {
    let interval = args.health_interval;
    report.line(format!(
        "## health: proxy CPU with {} routes × 3 backends, TCP active checks every {interval} s\n\n\
         {} s measured per topology (one 1/{ticks} s tick = {:.3} % of a core); warm-up {}; \
         CPU as % of one core.\n",
        args.routes,
        args.secs,
        100.0 / ticks / args.secs,
        args.warmup.map_or_else(
            || format!("one interval ({interval} s), distinct-refused (fall + 1) intervals"),
            |w| format!("{w} s")
        )
    ));
    report.line("| topology | checks (expected probes/s) | proxy CPU % of a core | − baseline | backend accepts/s | machine connects/s | proxy µs/probe | backends CPU % | proxy RSS MiB | start s | foreign % |");
    report.line("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut baseline: Option<f64> = None;
    let mut floors = Vec::new();
    for topology in args.topologies.split(',').map(str::trim) {
        let row = health_topology(args, topology, ticks, ncpu, quiet).await?;
        let pct = 100.0 * row.span.proxy / row.span.secs;
        if topology == "none" {
            baseline = Some(pct);
        }
        let over = baseline.map(|b| pct - b);
        let accepts = row.accepts.map(|a| a as f64 / row.span.secs);
        let opens = row.span.opens as f64 / row.span.secs;
        // Probes: counted accepts where there is a listener, else connects.
        let probes = accepts.unwrap_or(opens);
        // Below 3 ticks of difference the figure is the tick, not the probes.
        let resolution = 100.0 / ticks / row.span.secs;
        let per_probe = match (over, row.checks) {
            (Some(over), c) if c > 0 && probes > 0.0 && over >= 3.0 * resolution => {
                format!("{:.1}", over / 100.0 * 1e6 / probes)
            }
            (Some(_), c) if c > 0 => "(within 3 ticks)".into(),
            _ => "–".into(),
        };
        report.line(format!(
            "| {topology} | {} ({:.1}) | {pct:.3} | {} | {} | {opens:.1} | {per_probe} | {:.2} | {:.1} | {:.1} | {:.1} |",
            row.checks,
            row.checks as f64 / interval,
            over.map_or("".into(), |o| format!("{o:+.3}")),
            accepts.map_or("–".into(), |a| format!("{a:.1}")),
            100.0 * row.span.backends / row.span.secs,
            row.rss,
            row.start,
            row.span.foreign_pct
        ));
        floors.extend(row.floor);
    }
    for (made, us) in floors {
        report.line(format!(
            "\nconnect floor: {made} bare blocking connect(2) + close(2) from this process to the \
             `distinct` listening addresses cost it {us:.1} µs CPU each"
        ));
    }
    report.line("");
    Ok(())
}

struct HealthRow {
    checks: usize,
    span: Span,
    accepts: Option<u64>,
    rss: f64,
    start: f64,
    /// Bare connects made and this process's CPU µs per connect.
    floor: Option<(usize, f64)>,
}

async fn health_topology(
    args: &Args,
    topology: &str,
    ticks: f64,
    ncpu: f64,
    quiet: &mut Quiet,
) -> Result<HealthRow> {
    let n = args.routes;
    let port = args.distinct_port;
    let interval = args.health_interval;
    let health = format!(
        "  health_interval = \"{}ms\"\n  health_fall = {}\n",
        (interval * 1000.0).round() as u64,
        args.health_fall
    );
    ensure_free(args.listen, "--listen").await?;
    let mut children = Children::default();
    let mut controls = Vec::new();
    let mut backend_pids = Vec::new();
    // Which backend indexes (127.1.X.Y) listen.
    let listening = match topology {
        "none" | "distinct-refused" => 0,
        "shared" => 3,
        "distinct" => 3 * n,
        other => bail!("unknown topology {other:?}"),
    };
    if 3 * n > 65_536 {
        bail!("--routes {n}: at most 21,845 (3 × routes addresses in 127.X.0.0/16)");
    }
    let mut start = 0;
    while start < listening {
        let end = (start + LISTENERS_PER_BACKEND).min(listening);
        let control = SocketAddr::from((
            [127, 0, 0, 1],
            args.backend_port + 10 + controls.len() as u16,
        ));
        ensure_free(control, "--backend-port").await?;
        let pid = children.spawn(
            &mut backend_command("accept", &format!("{start}..{end}"), control, port)?,
            "backend",
        )?;
        wait_listening(control, &mut children).await?;
        wait_listening(distinct_addr(1, end - 1, port), &mut children).await?;
        controls.push(control);
        backend_pids.push(pid);
        start = end;
    }
    let dir = tempfile::tempdir()?;
    let mut config = config_head(dir.path(), args.listen);
    let shared: Vec<SocketAddr> = (0..3).map(|i| distinct_addr(1, i, port)).collect();
    for r in 0..n {
        let hostname = format!("r{r}.pool.test");
        let three: Vec<SocketAddr> = (0..3).map(|k| distinct_addr(1, 3 * r + k, port)).collect();
        match topology {
            "none" => route(&mut config, &hostname, &three, ""),
            "shared" => route(&mut config, &hostname, &shared, &health),
            "distinct" => route(&mut config, &hostname, &three, &health),
            _ => {
                let refused: Vec<SocketAddr> =
                    (0..3).map(|k| distinct_addr(2, 3 * r + k, port)).collect();
                route(&mut config, &hostname, &refused, &health)
            }
        }
    }
    let checks = match topology {
        "none" => 0,
        "shared" => 3,
        _ => 3 * n,
    };
    let started = Instant::now();
    let proxy = start_proxy(&args.bin, dir.path(), &config, &mut children)?;
    wait_listening(args.listen, &mut children).await?;
    let start_s = started.elapsed().as_secs_f64();
    let warmup = args.warmup.unwrap_or(if topology == "distinct-refused" {
        interval * (args.health_fall as f64 + 1.0)
    } else {
        interval
    });
    println!(
        "health {topology}: proxy pid {proxy} up after {start_s:.1} s, {} backend processes; warm-up {warmup} s, then {} s",
        backend_pids.len(),
        args.secs
    );
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let mut ours = backend_pids.clone();
    ours.push(proxy);
    quiet.wait(&format!("health {topology}"), &ours).await;
    let meter = Meter {
        ticks,
        proxy,
        backends: backend_pids,
    };
    let mut accepts0 = 0;
    for c in &controls {
        accepts0 += accept_count(*c).await?;
    }
    let a = meter.snap();
    tokio::time::sleep(Duration::from_secs_f64(args.secs)).await;
    let b = meter.snap();
    let mut accepts1 = 0;
    for c in &controls {
        accepts1 += accept_count(*c).await?;
    }
    let rss = rss_mib(proxy);
    // The floor: what a bare blocking connect(2) + close(2) to the same
    // listening addresses costs this process (the handshake's kernel work
    // on loopback lands mostly on the connecting side, as for a probe).
    let floor = if topology == "distinct" {
        let count = 20_000;
        let before = cpu_s("self", ticks);
        let made = tokio::task::spawn_blocking(move || {
            (0..count)
                .filter(|i| {
                    std::net::TcpStream::connect(distinct_addr(1, i % listening, port)).is_ok()
                })
                .count()
        })
        .await?;
        let used = cpu_s("self", ticks) - before;
        Some((made, used * 1e6 / made.max(1) as f64))
    } else {
        None
    };
    children.exited()?;
    drop(children);
    Ok(HealthRow {
        checks,
        span: Span::between(a, b, ncpu),
        accepts: (!controls.is_empty()).then(|| accepts1 - accepts0),
        rss,
        start: start_s,
        floor,
    })
}
