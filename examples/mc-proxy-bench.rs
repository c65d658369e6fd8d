//! End-to-end loopback benchmark through a real mc-proxy process.
//!
//! Starts its own plain-TCP backend (a child process, so its file
//! descriptors don't count against the client's), starts mc-proxy with a
//! generated config routing `bench.test` to it (or uses one already running:
//! `--proxy ADDR --pid PID`, routing `--sni` to `--backend-listen`), and
//! measures, client and backend on loopback:
//!
//! - `throughput`: one stream of `--mib` MiB backend → client after the
//!   hello; MiB/s and the proxy's CPU seconds per GiB.
//! - `rate`: `--workers` closed-loop clients for `--secs` s, each connection
//!   = connect, hello, one byte back, close; connections/s, the proxy's CPU
//!   µs per connection, and whole-connection latency percentiles.
//! - `latency`: sequential, unloaded; time to first byte of a new connection
//!   and round trip on an established one, through the proxy and direct to
//!   the backend (interleaved sample by sample), and the added time.
//! - `idle`: for each count in `--idle` (e.g. `100,1000,9900`), holds that
//!   many relayed connections open after one round trip; the proxy's RSS per
//!   connection, its CPU per connection set up, and a check that every
//!   connection still answers afterwards.
//! - `hello-pacing` (not in the default set): the slow-client case of issue
//!   13. A `--pacing-kib` KiB ClientHello (default 64) sent (a) as 1-byte
//!   TLS records, one record per write, and (b) as 16 KiB records whose
//!   byte stream is cut into as many writes as (a) has records; every write
//!   is its own segment (TCP_NODELAY, a `--pace-us` spin between writes).
//!   The syscalls and wakeups are then the same, and what differs is the
//!   hello reader's work. `--pacing-reps` repetitions of each, interleaved;
//!   the proxy's CPU per connection, median, and the ratio (a)/(b).
//!
//! The proxy's CPU is utime+stime of its process from `/proc/PID/stat`
//! (10 ms ticks), its memory is `Rss` from `/proc/PID/smaps_rollup`.
//! The backend protocol (after the client's hello, in however many records):
//! one op byte and a big-endian u64: `S n` streams n bytes and closes, `E _` echoes until EOF,
//! `C _` writes one byte and closes.
//!
//! ```text
//! cargo run --release --example mc-proxy-bench -- --bin target/release/mc-proxy
//! cargo run --release --example mc-proxy-bench -- --phases idle --idle 100,1000,9900
//! cargo run --release --example mc-proxy-bench -- --phases rate,latency --routes 100000
//! cargo run --release --example mc-proxy-bench -- --phases hello-pacing --pacing-reps 5
//! ```
//!
//! Not part of the shipped binary: examples are built only on request.

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
// The hello builder the integration tests use.
use wire::hello::build as hello;

#[derive(Parser, Debug)]
#[command(about = "Loopback benchmark through a running mc-proxy")]
struct Args {
    /// mc-proxy binary to start (ignored with --proxy).
    #[arg(long, default_value = "target/release/mc-proxy")]
    bin: PathBuf,
    /// Use an already running proxy at this address instead of starting one.
    #[arg(long, requires = "pid")]
    proxy: Option<SocketAddr>,
    /// PID of the running proxy (for CPU and RSS).
    #[arg(long)]
    pid: Option<u32>,
    /// Where the backend listens (with --proxy, the address your route names).
    #[arg(long, default_value = "127.0.0.1:18503")]
    backend_listen: SocketAddr,
    /// Where a started proxy listens.
    #[arg(long, default_value = "127.0.0.1:18510")]
    listen: SocketAddr,
    /// SNI the client sends.
    #[arg(long, default_value = "bench.test")]
    sni: String,
    /// Extra routes in the started proxy's table (to show lookups don't
    /// depend on table size).
    #[arg(long, default_value_t = 0)]
    routes: usize,
    /// Comma-separated phases: throughput, rate, latency, idle, hello-pacing.
    #[arg(long, default_value = "throughput,rate,latency,idle")]
    phases: String,
    /// MiB in the throughput phase.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Concurrent clients in the rate phase.
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// Seconds of the rate phase.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Samples per latency measurement.
    #[arg(long, default_value_t = 500)]
    lat_count: usize,
    /// Comma-separated counts of idle connections to hold.
    #[arg(long, default_value = "2000")]
    idle: String,
    /// ClientHello size (handshake message bytes, in KiB) in the hello-pacing phase.
    #[arg(long, default_value_t = 64)]
    pacing_kib: usize,
    /// Repetitions of each framing in the hello-pacing phase.
    #[arg(long, default_value_t = 5)]
    pacing_reps: usize,
    /// Spin between two writes in the hello-pacing phase, in microseconds.
    #[arg(long, default_value_t = 10)]
    pace_us: u64,
    /// Internal: run as the backend.
    #[arg(long, hide = true)]
    serve_backend: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.serve_backend {
        return runtime.block_on(backend(args.backend_listen));
    }
    runtime.block_on(run(args))
}

// ---- backend ---------------------------------------------------------------

async fn backend(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("backend cannot listen on {listen}"))?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = serve(stream).await;
        });
    }
}

async fn serve(stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    // Buffered: a hello in 1-byte records is two small reads a record.
    let mut stream = tokio::io::BufReader::new(stream);
    read_hello(&mut stream).await?;
    let mut op = [0u8; 9];
    stream.read_exact(&mut op).await?;
    let arg = u64::from_be_bytes(op[1..].try_into().unwrap_or_default());
    match op[0] {
        b'S' => {
            let chunk = vec![0x5au8; 256 * 1024];
            let mut left = arg;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                stream.write_all(&chunk[..n]).await?;
                left -= n as u64;
            }
        }
        b'E' => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                stream.write_all(&buf[..n]).await?;
            }
        }
        _ => stream.write_all(b"!").await?,
    }
    stream.shutdown().await
}

/// Reads TLS handshake records until the handshake message they carry (a
/// ClientHello ending at a record boundary, as every hello sent here does)
/// is complete.
async fn read_hello<R: tokio::io::AsyncRead + Unpin>(stream: &mut R) -> io::Result<()> {
    let mut message = Vec::new();
    loop {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).await?;
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        let start = message.len();
        message.resize(start + len, 0);
        stream.read_exact(&mut message[start..]).await?;
        if message.len() >= 4 {
            let body = u32::from_be_bytes([0, message[1], message[2], message[3]]) as usize;
            if message.len() >= 4 + body {
                return Ok(());
            }
        }
    }
}

// ---- client ----------------------------------------------------------------

/// A one-record TLS 1.3 ClientHello with `sni`, followed by the op.
fn opening(sni: &str, op: u8, arg: u64) -> Vec<u8> {
    let mut out = hello::client_hello(Some(sni));
    out.push(op);
    out.extend_from_slice(&arg.to_be_bytes());
    out
}

struct Proc {
    pid: u32,
    ticks_per_s: f64,
}

impl Proc {
    fn cpu_s(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // Fields after the ")" of the command name: utime is the 12th, stime the 13th.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (tick(11) + tick(12)) / self.ticks_per_s
    }

    fn rss_kib(&self) -> f64 {
        let rollup =
            std::fs::read_to_string(format!("/proc/{}/smaps_rollup", self.pid)).unwrap_or_default();
        rollup
            .lines()
            .find_map(|l| l.strip_prefix("Rss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0)
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

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_listening(addr: SocketAddr) -> Result<()> {
    for _ in 0..600 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on {addr} after 30 s")
}

fn start_proxy(args: &Args, dir: &std::path::Path) -> Result<Child> {
    let mut config = format!(
        "[database]\npath = \"{}\"\n\n[[listeners]]\naddr = \"{}\"\n",
        dir.join("mc-proxy.db").display(),
        args.listen
    );
    let route = |config: &mut String, host: &str| {
        config.push_str(&format!(
            "  [[listeners.routes]]\n  hostname = \"{host}\"\n  backend = \"{}\"\n",
            args.backend_listen
        ));
    };
    route(&mut config, &args.sni);
    for i in 0..args.routes {
        route(&mut config, &format!("r{i}.routes.test"));
    }
    config.push_str(
        "\n[proxy]\nconnect_timeout = \"5s\"\nhandshake_timeout = \"120s\"\nidle_timeout = \"300s\"\nshutdown_timeout = \"1s\"\n",
    );
    let path = dir.join("mc-proxy.toml");
    std::fs::write(&path, config)?;
    Command::new(&args.bin)
        .arg("server")
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", args.bin.display()))
}

async fn run(args: Args) -> Result<()> {
    let mut children = Children(Vec::new());
    if TcpStream::connect(args.backend_listen).await.is_ok() {
        bail!(
            "something already listens on {}; pick another --backend-listen",
            args.backend_listen
        );
    }
    children.0.push(
        Command::new(std::env::current_exe()?)
            .arg("--serve-backend")
            .arg("--backend-listen")
            .arg(args.backend_listen.to_string())
            .stdin(Stdio::null())
            .spawn()
            .context("starting the backend")?,
    );
    wait_listening(args.backend_listen).await?;
    let dir = tempfile::tempdir()?;
    let (proxy, pid) = match (args.proxy, args.pid) {
        (Some(addr), Some(pid)) => (addr, pid),
        _ => {
            // Else the proxy started here fails to bind and the run would
            // silently measure whatever already listens there.
            if TcpStream::connect(args.listen).await.is_ok() {
                bail!(
                    "something already listens on {}; pick another --listen",
                    args.listen
                );
            }
            let child = start_proxy(&args, dir.path())?;
            let pid = child.id();
            children.0.push(child);
            let started = Instant::now();
            wait_listening(args.listen).await?;
            if let Some(child) = children.0.last_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("{} exited at start: {status}", args.bin.display());
                }
            }
            println!(
                "proxy: {} pid {pid}, {} routes, listening after {:.2} s",
                args.bin.display(),
                args.routes + 1,
                started.elapsed().as_secs_f64()
            );
            (args.listen, pid)
        }
    };
    let proc = Proc {
        pid,
        ticks_per_s: ticks_per_s(),
    };
    let bench = Bench {
        proxy,
        direct: args.backend_listen,
        sni: args.sni.clone(),
        proc,
    };
    for phase in args.phases.split(',').map(str::trim) {
        match phase {
            "throughput" => bench.throughput(args.mib).await?,
            "rate" => bench.rate(args.workers, args.secs).await?,
            "latency" => bench.latency(args.lat_count).await?,
            "idle" => {
                for count in args.idle.split(',') {
                    let count: usize = count.trim().parse().context("--idle")?;
                    bench.idle(count).await?;
                }
            }
            "hello-pacing" => {
                bench
                    .hello_pacing(args.pacing_kib, args.pacing_reps, args.pace_us)
                    .await?
            }
            other => bail!("unknown phase {other:?}"),
        }
        io::stdout().flush()?;
    }
    Ok(())
}

struct Bench {
    proxy: SocketAddr,
    direct: SocketAddr,
    sni: String,
    proc: Proc,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl Bench {
    async fn connect(&self, addr: SocketAddr, op: u8, arg: u64) -> io::Result<TcpStream> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&opening(&self.sni, op, arg)).await?;
        Ok(stream)
    }

    async fn throughput(&self, mib: u64) -> Result<()> {
        let bytes = mib * 1024 * 1024;
        let cpu = self.proc.cpu_s();
        let started = Instant::now();
        let mut stream = self.connect(self.proxy, b'S', bytes).await?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = self.proc.cpu_s() - cpu;
        if got != bytes {
            bail!("throughput: received {got} of {bytes} bytes");
        }
        let gib = bytes as f64 / (1u64 << 30) as f64;
        println!(
            "throughput: {mib} MiB in {secs:.2} s = {:.0} MiB/s; proxy CPU {cpu:.2} s = {:.3} s/GiB",
            mib as f64 / secs,
            cpu / gib
        );
        Ok(())
    }

    async fn rate(&self, workers: usize, secs: f64) -> Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let cpu = self.proc.cpu_s();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let stop = stop.clone();
            let errors = errors.clone();
            let proxy = self.proxy;
            let hello = opening(&self.sni, b'C', 0);
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = async {
                        let mut stream = TcpStream::connect(proxy).await?;
                        stream.set_nodelay(true)?;
                        stream.write_all(&hello).await?;
                        let mut got = Vec::new();
                        stream.read_to_end(&mut got).await?;
                        Ok::<_, io::Error>(got == b"!")
                    }
                    .await;
                    match ok {
                        Ok(true) => latencies.push(t.elapsed().as_secs_f64() * 1e3),
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await?);
        }
        let elapsed = started.elapsed().as_secs_f64();
        // Let the proxy finish closing before reading its CPU.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cpu = self.proc.cpu_s() - cpu;
        all.sort_by(f64::total_cmp);
        println!(
            "rate: {} conns in {elapsed:.2} s = {:.0} conn/s, {} errors; proxy CPU {:.1} us/conn; conn latency p50 {:.2} ms p99 {:.2} ms",
            all.len(),
            all.len() as f64 / elapsed,
            errors.load(Ordering::Relaxed),
            cpu * 1e6 / all.len().max(1) as f64,
            percentile(&all, 0.5),
            percentile(&all, 0.99)
        );
        Ok(())
    }

    async fn latency(&self, count: usize) -> Result<()> {
        // New connection: connect start → first byte back.
        let mut new_proxy = Vec::with_capacity(count);
        let mut new_direct = Vec::with_capacity(count);
        for _ in 0..count {
            for (addr, out) in [(self.proxy, &mut new_proxy), (self.direct, &mut new_direct)] {
                let t = Instant::now();
                let mut stream = self.connect(addr, b'C', 0).await?;
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await?;
                out.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        // Established connection: 64-byte round trips.
        let mut ka_proxy = Vec::with_capacity(count);
        let mut ka_direct = Vec::with_capacity(count);
        let mut via_proxy = self.connect(self.proxy, b'E', 0).await?;
        let mut via_direct = self.connect(self.direct, b'E', 0).await?;
        let ping = [0x42u8; 64];
        let mut pong = [0u8; 64];
        for _ in 0..count {
            for (stream, out) in [
                (&mut via_proxy, &mut ka_proxy),
                (&mut via_direct, &mut ka_direct),
            ] {
                let t = Instant::now();
                stream.write_all(&ping).await?;
                stream.read_exact(&mut pong).await?;
                out.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        let report = |name: &str, proxy: &mut Vec<f64>, direct: &mut Vec<f64>| {
            let mut added: Vec<f64> = proxy
                .iter()
                .zip(direct.iter())
                .map(|(p, d)| p - d)
                .collect();
            proxy.sort_by(f64::total_cmp);
            direct.sort_by(f64::total_cmp);
            added.sort_by(f64::total_cmp);
            println!(
                "latency {name}: proxy p50 {:.1} us p99 {:.1} us; direct p50 {:.1} us p99 {:.1} us; added p50 {:.1} us (median of paired differences {:.1} us)",
                percentile(proxy, 0.5),
                percentile(proxy, 0.99),
                percentile(direct, 0.5),
                percentile(direct, 0.99),
                percentile(proxy, 0.5) - percentile(direct, 0.5),
                percentile(&added, 0.5)
            );
        };
        report(
            "new connection, first byte",
            &mut new_proxy,
            &mut new_direct,
        );
        report("keep-alive round trip", &mut ka_proxy, &mut ka_direct);
        Ok(())
    }

    async fn idle(&self, count: usize) -> Result<()> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = self.proc.rss_kib();
        let cpu = self.proc.cpu_s();
        let started = Instant::now();
        let mut streams = Vec::with_capacity(count);
        let mut byte = [0x42u8; 1];
        for _ in 0..count {
            let mut stream = self.connect(self.proxy, b'E', 0).await?;
            stream.write_all(&byte).await?;
            stream.read_exact(&mut byte).await?;
            streams.push(stream);
        }
        let setup = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu = self.proc.cpu_s() - cpu;
        let loaded = self.proc.rss_kib();
        let mut alive = 0usize;
        for stream in &mut streams {
            if stream.write_all(&byte).await.is_ok() && stream.read_exact(&mut byte).await.is_ok() {
                alive += 1;
            }
        }
        drop(streams);
        println!(
            "idle {count}: set up in {setup:.2} s ({:.0} conn/s); proxy RSS {:.1} -> {:.1} MiB = {:.2} KiB/conn; proxy CPU {:.1} us/conn; {alive}/{count} alive after",
            count as f64 / setup,
            rss / 1024.0,
            loaded / 1024.0,
            (loaded - rss) / count as f64,
            cpu * 1e6 / count as f64
        );
        // Give the proxy time to see every close before the next count.
        tokio::time::sleep(Duration::from_millis(500 + count as u64 / 10)).await;
        if alive != count {
            bail!("only {alive} of {count} idle connections survived");
        }
        Ok(())
    }

    /// The hello-pacing phase: see the module documentation.
    async fn hello_pacing(&self, kib: usize, reps: usize, pace_us: u64) -> Result<()> {
        let len = kib * 1024;
        let base = hello::hello_message(Some(&self.sni), 0).len();
        if len < base + 4 || len > 4 + 65536 {
            bail!("--pacing-kib {kib}: a ClientHello is {base}..=65540 bytes here");
        }
        // The padding extension adds its 4-byte header and `padding` bytes.
        let message = hello::hello_message(Some(&self.sni), len - base - 4);
        let one_byte = hello::records(&message, 1);
        let full = hello::records(&message, 16384);
        let writes = message.len();
        // (a) one 1-byte record a write; (b) the 16 KiB records' bytes cut
        // into as many writes, as equal as can be (1 or 2 bytes each).
        let a: Vec<Vec<u8>> = one_byte.chunks(6).map(<[u8]>::to_vec).collect();
        let b: Vec<Vec<u8>> = (0..writes)
            .map(|i| full[i * full.len() / writes..(i + 1) * full.len() / writes].to_vec())
            .collect();
        assert_eq!(a.len(), writes);
        assert_eq!(b.concat(), full);
        let pace = Duration::from_micros(pace_us);
        let (mut cpu_a, mut cpu_b, mut wall_a, mut wall_b) = (vec![], vec![], vec![], vec![]);
        for _ in 0..reps {
            for (chunks, cpu, wall) in
                [(&a, &mut cpu_a, &mut wall_a), (&b, &mut cpu_b, &mut wall_b)]
            {
                let (c, w) = self.paced_hello(chunks.clone(), pace).await?;
                cpu.push(c);
                wall.push(w);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            percentile(v, 0.5)
        };
        let show = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{:.3}", x))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "hello-pacing: {} B ClientHello, {writes} paced writes each ({pace_us} us spin), {reps} reps",
            message.len()
        );
        println!(
            "  (a) 1-byte records ({} B sent): proxy CPU s/conn {}; wall s {}",
            one_byte.len(),
            show(&cpu_a),
            show(&wall_a)
        );
        println!(
            "  (b) 16 KiB records ({} B sent): proxy CPU s/conn {}; wall s {}",
            full.len(),
            show(&cpu_b),
            show(&wall_b)
        );
        let (ma, mb) = (median(&mut cpu_a), median(&mut cpu_b));
        println!(
            "  median proxy CPU (a) {ma:.3} s, (b) {mb:.3} s, (a)/(b) = {:.2}; median wall (a) {:.2} s, (b) {:.2} s",
            ma / mb,
            median(&mut wall_a),
            median(&mut wall_b)
        );
        Ok(())
    }

    /// Sends `chunks` to the proxy, one write each with a `pace` spin
    /// between, then the `C` op, and waits for the backend's byte and the
    /// close. Returns the proxy's CPU seconds and the wall seconds.
    async fn paced_hello(&self, chunks: Vec<Vec<u8>>, pace: Duration) -> Result<(f64, f64)> {
        let proxy = self.proxy;
        // Let the proxy settle (the previous connection's close).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cpu = self.proc.cpu_s();
        let started = Instant::now();
        // Blocking writes on a thread of their own: a spin is more exact
        // than a timer, and one write is one send(2).
        let got = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
            use std::io::{Read as _, Write as _};
            let mut stream = std::net::TcpStream::connect(proxy)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(120)))?;
            for chunk in &chunks {
                stream.write_all(chunk)?;
                let next = Instant::now() + pace;
                while Instant::now() < next {
                    std::hint::spin_loop();
                }
            }
            let mut op = vec![b'C'];
            op.extend_from_slice(&0u64.to_be_bytes());
            stream.write_all(&op)?;
            let mut got = Vec::new();
            stream.read_to_end(&mut got)?;
            Ok(got)
        })
        .await??;
        let wall = started.elapsed().as_secs_f64();
        if got != b"!" {
            bail!("hello-pacing: the backend's reply did not come back (got {got:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok((self.proc.cpu_s() - cpu, wall))
    }
}
