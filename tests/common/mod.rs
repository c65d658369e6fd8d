//! Shared parts for the integration tests: a test PKI (rcgen), real TLS and
//! raw TCP backends on loopback, the real `mc-proxy` binary started on a
//! config in a temp dir, and hand-built ClientHellos.
#![allow(dead_code)]

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub const BIN: &str = env!("CARGO_BIN_EXE_mc-proxy");

pub fn install_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

// ---- PKI -----------------------------------------------------------------

pub struct Pki {
    pub ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Writes `NAME.pem` and `NAME.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        install_crypto();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Pki {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain: vec![cert.der().clone()],
            key_der: key.serialize_der(),
        }
    }

    pub fn write_ca(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }

    pub fn server_config(&self, names: &[&str]) -> Arc<ServerConfig> {
        let leaf = self.leaf(names);
        Arc::new(
            ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(leaf.chain.clone(), leaf.key())
                .unwrap(),
        )
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        roots
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        Arc::new(
            ClientConfig::builder()
                .with_root_certificates(self.roots())
                .with_no_client_auth(),
        )
    }
}

// ---- backends --------------------------------------------------------------

/// A TLS backend that says who it is: after the handshake it writes
/// `backend=NAME\n`, then echoes everything it reads until EOF.
pub struct TlsBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub accepted: Arc<AtomicUsize>,
}

pub async fn tls_backend(pki: &Pki, name: &str, hostnames: &[&str]) -> TlsBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(pki.server_config(hostnames));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let label = name.to_string();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            // Without it, small echoes wait ~40 ms for delayed ACKs (Nagle).
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let label = label.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                if tls
                    .write_all(format!("backend={label}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tls.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    TlsBackend {
        addr,
        name: name.to_string(),
        accepted,
    }
}

/// A raw TCP backend that records every byte of each connection until the
/// client's FIN, then optionally replies and closes.
pub struct RawBackend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub received: mpsc::UnboundedReceiver<Vec<u8>>,
}

pub async fn raw_backend(reply: &'static [u8]) -> RawBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let (tx, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let _ = stream.read_to_end(&mut all).await;
                let _ = stream.write_all(reply).await;
                let _ = stream.shutdown().await;
                let _ = tx.send(all);
            });
        }
    });
    RawBackend {
        addr,
        accepted,
        received,
    }
}

// ---- clients ---------------------------------------------------------------

pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    TlsConnector::from(config).connect(name, tcp).await
}

/// Connects through the proxy with TLS and returns the backend's name line.
pub async fn who(addr: SocketAddr, sni: &str, pki: &Pki) -> io::Result<String> {
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        tls_connect(addr, sni, pki.client_config()),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "tls connect"))??;
    let line = read_line(&mut tls).await?;
    Ok(line.trim_start_matches("backend=").to_string())
}

pub async fn read_line<R: tokio::io::AsyncRead + Unpin>(reader: &mut R) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), reader.read(&mut byte))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "read_line"))??;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "eof before newline",
            ));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
}

/// Reads until EOF (or error) within `limit`; returns what was read and how
/// the read ended.
pub async fn read_all(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, io::Result<()>) {
    let mut all = Vec::new();
    let result = match tokio::time::timeout(limit, stream.read_to_end(&mut all)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no EOF in time")),
    };
    (all, result)
}

// ---- the binary ------------------------------------------------------------

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Proxy {
    pub child: Child,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Proxy {
    /// Writes `toml` to `DIR/mc-proxy.toml`, starts `mc-proxy server` on it
    /// and waits until it logs that it started.
    pub fn start(dir: &Path, toml: &str) -> Proxy {
        let config = dir.join("mc-proxy.toml");
        std::fs::write(&config, toml).unwrap();
        Proxy::start_existing(dir, &config)
    }

    pub fn start_existing(dir: &Path, config: &Path) -> Proxy {
        Proxy::start_existing_with_env(dir, config, &[])
    }

    /// [`Proxy::start`] with extra environment variables.
    pub fn start_with_env(dir: &Path, toml: &str, env: &[(&str, &str)]) -> Proxy {
        let config = dir.join("mc-proxy.toml");
        std::fs::write(&config, toml).unwrap();
        Proxy::start_existing_with_env(dir, &config, env)
    }

    pub fn start_existing_with_env(dir: &Path, config: &Path, env: &[(&str, &str)]) -> Proxy {
        Proxy::spawn(Command::new(BIN), dir, config, env)
    }

    /// [`Proxy::start`] under `prlimit --nofile=LIMIT:LIMIT`, so the server
    /// starts with (and derives its connection cap from) that descriptor
    /// limit, soft and hard alike.
    pub fn start_with_nofile(dir: &Path, toml: &str, limit: u64) -> Proxy {
        let config = dir.join("mc-proxy.toml");
        std::fs::write(&config, toml).unwrap();
        let mut prlimit = Command::new("prlimit");
        prlimit
            .arg(format!("--nofile={limit}:{limit}"))
            .arg("--")
            .arg(BIN);
        Proxy::spawn(prlimit, dir, &config, &[])
    }

    /// Writes `toml` to `DIR/NAME.toml` and starts `mc-proxy server` on it
    /// without waiting for it to say it started: for tests that race the
    /// start itself.
    pub fn launch(dir: &Path, name: &str, toml: &str) -> Proxy {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        Proxy::launch_command(Command::new(BIN), dir, &config, &[])
    }

    /// Runs `command` (the binary, or a wrapper that execs it) with
    /// `server -c CONFIG` and waits until it logs that it started.
    fn spawn(command: Command, dir: &Path, config: &Path, env: &[(&str, &str)]) -> Proxy {
        let mut proxy = Proxy::launch_command(command, dir, config, env);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if proxy.log_text().contains("mc-proxy started") {
                return proxy;
            }
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!(
                    "mc-proxy exited with {status} at start:\n{}",
                    proxy.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!("mc-proxy did not start:\n{}", proxy.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `command` with `server -c CONFIG`, stderr to a log file.
    fn launch_command(
        mut command: Command,
        dir: &Path,
        config: &Path,
        env: &[(&str, &str)],
    ) -> Proxy {
        let log = dir.join(format!("proxy-{}.log", unique()));
        let child = command
            .args(["server", "-c"])
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn mc-proxy (or prlimit, from util-linux)");
        Proxy {
            child,
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines of closed connections.
    pub fn conn_lines(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("connection closed"))
            .map(str::to_string)
            .collect()
    }

    /// Waits until a connection log line containing every needle appears.
    pub fn wait_log(&self, needles: &[&str], limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self
                .log_text()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return line.to_string();
            }
            if Instant::now() > deadline {
                panic!("no log line with {needles:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends the signal `name` (`"TERM"`, `"INT"`, `"HUP"`) to the server.
    pub fn signal(&self, name: &str) {
        send_signal(self.child.id(), name);
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unique() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// Runs the binary with `args`; returns (exit code, stdout, stderr).
/// Sends the signal `name` (`"TERM"`, `"INT"`, `"HUP"`) to process `pid`
/// at once, with kill(2) rather than a `kill` child process (tests race the
/// first milliseconds after a port is bound).
pub fn send_signal(pid: u32, name: &str) {
    let signal = match name {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "HUP" => libc::SIGHUP,
        other => panic!("no signal {other:?} in the tests' table"),
    };
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, SIG{name}): {}",
        std::io::Error::last_os_error()
    );
}

pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("MC_PROXY_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---- hand-built ClientHellos: the wire crate's `hello::build` (shared with
// benches/ and examples/)

#[allow(unused_imports)] // not every test file uses all three
pub use wire::hello::build::{client_hello, hello_message, records};

/// Whether a blocking read on `stream` sees a reset (as opposed to a FIN).
pub fn saw_reset(result: &io::Result<()>) -> bool {
    matches!(result, Err(e) if e.kind() == io::ErrorKind::ConnectionReset)
}

/// Reads from a std stream until EOF; for tests on blocking sockets.
pub fn std_read_all(stream: &mut std::net::TcpStream) -> (Vec<u8>, io::Result<()>) {
    let mut all = Vec::new();
    let result = stream.read_to_end(&mut all).map(|_| ());
    (all, result)
}

// ---- end-to-end helpers: sources, admin API, DB on disk -------------------

/// A TCP connection to `addr` from the loopback address `source`
/// (127.0.0.2, ...), so firewall rules can tell test clients apart.
pub async fn connect_from(source: &str, addr: SocketAddr) -> io::Result<TcpStream> {
    let source: std::net::IpAddr = source
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let socket = if source.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// Like [`who`], from the loopback address `source`.
pub async fn who_from(source: &str, addr: SocketAddr, sni: &str, pki: &Pki) -> io::Result<String> {
    let name = ServerName::try_from(sni.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let handshake = async {
        let tcp = connect_from(source, addr).await?;
        TlsConnector::from(pki.client_config())
            .connect(name, tcp)
            .await
    };
    let mut tls = tokio::time::timeout(Duration::from_secs(10), handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "tls connect"))??;
    let line = read_line(&mut tls).await?;
    Ok(line.trim_start_matches("backend=").to_string())
}

/// Connects from `source` and, without sending anything, reads until the
/// connection ends: what a client the firewall refuses sees (zero bytes, a
/// reset).
pub async fn refused_from(source: &str, addr: SocketAddr) -> (Vec<u8>, io::Result<()>) {
    match connect_from(source, addr).await {
        Ok(mut stream) => read_all(&mut stream, Duration::from_secs(10)).await,
        Err(e) => (Vec::new(), Err(e)),
    }
}

/// Asserts that a connection from `source` is reset before a byte arrives.
pub async fn assert_reset(source: &str, addr: SocketAddr) {
    let (bytes, result) = refused_from(source, addr).await;
    assert!(bytes.is_empty(), "{source} got {} bytes", bytes.len());
    assert!(
        saw_reset(&result),
        "{source}: expected a connection reset, got {result:?}"
    );
}

/// `[database]` in `dir` and a unix-socket `[grpc]` section, then `body`.
pub fn admin_config(dir: &Path, body: &str) -> String {
    format!(
        "[database]\npath = \"{}\"\n\n[grpc]\naddr = \"unix:{}\"\n\n{body}",
        dir.join("mc-proxy.db").display(),
        dir.join("admin.sock").display()
    )
}

/// A `[[listeners]]` block with `(hostname, backend)` routes.
pub fn listener_toml(addr: &str, routes: &[(&str, SocketAddr)]) -> String {
    let mut out = format!("[[listeners]]\naddr = \"{addr}\"\n");
    for (host, backend) in routes {
        out.push_str(&format!(
            "  [[listeners.routes]]\n  hostname = \"{host}\"\n  backend = \"{backend}\"\n"
        ));
    }
    out.push('\n');
    out
}

impl Proxy {
    /// Runs a CLI subcommand against this server's config: `args` then
    /// `-c CONFIG`.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let config = self.config.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-c", config.as_str()]);
        run_cli(&all)
    }

    /// The database file named by the config (`DIR/mc-proxy.db`).
    pub fn db(&self) -> PathBuf {
        self.dir.join("mc-proxy.db")
    }

    /// The admin socket of [`admin_config`].
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// SIGTERM, then waits for exit 0.
    pub fn stop(mut self) {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(20));
        assert!(
            matches!(status, Some(s) if s.success()),
            "mc-proxy did not exit 0 on SIGTERM: {status:?}\n{}",
            self.log_text()
        );
    }

    /// How many log lines contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until at least `n` log lines contain `needle`.
    pub fn wait_count(&self, needle: &str, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.count_log(needle) < n {
            if Instant::now() > deadline {
                panic!(
                    "fewer than {n} log lines with {needle:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `(listener, hostname, backend)` rows of the routes table, read straight
/// from the DB file (read-only, so a running server is not disturbed).
pub fn db_routes(db: &Path) -> Vec<(String, String, String)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT l.addr, r.hostname, r.backend FROM routes r \
             JOIN listeners l ON l.id = r.listener_id ORDER BY l.addr, r.hostname",
        )
        .unwrap();
    let rows = stmt
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// `(type, value)` rows of the firewall_rules table, read-only.
pub fn db_rules(db: &Path) -> Vec<(String, String)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare("SELECT type, value FROM firewall_rules ORDER BY type, value")
        .unwrap();
    let rows = stmt
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// The admin API of a server started on [`admin_config`].
pub async fn admin_client(
    socket: &Path,
) -> mc_proxy::admin::proto::proxy_admin_service_client::ProxyAdminServiceClient<
    tonic::transport::Channel,
> {
    mc_proxy::admin::client::connect(
        &mc_proxy::config::AdminAddr::Unix(socket.to_path_buf()),
        &mc_proxy::config::ClientTls::default(),
    )
    .await
    .unwrap()
}

/// `mode & 0o777` of a file.
pub fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// ---- process figures and limits (hardening, soak) ---------------------------

/// A process's figures from /proc: CPU time (user + system), resident set,
/// open descriptors.
#[derive(Debug, Clone, Copy)]
pub struct ProcFigures {
    pub cpu: Duration,
    pub rss_kib: u64,
    pub fds: usize,
}

/// Clock ticks per second for /proc/PID/stat (`getconf CLK_TCK`, 100 if
/// that fails).
pub fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// User + system CPU time of process `pid` so far (/proc/PID/stat fields
/// 14 and 15, after the parenthesised command name).
pub fn proc_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): utime is field 14, stime field 15.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 1000 / clock_ticks())
}

/// VmRSS of process `pid` in KiB.
pub fn proc_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Open descriptors of process `pid`.
pub fn proc_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

pub fn proc_figures(pid: u32) -> ProcFigures {
    ProcFigures {
        cpu: proc_cpu(pid),
        rss_kib: proc_rss_kib(pid),
        fds: proc_fds(pid),
    }
}

/// Sets process `pid`'s descriptor limit (soft and hard) with `prlimit`.
pub fn set_nofile(pid: u32, limit: u64) {
    let status = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit (util-linux) is needed");
    assert!(
        status.success(),
        "prlimit --pid {pid} --nofile={limit} failed"
    );
}

/// Process `pid`'s descriptor limits (soft, hard) from /proc/PID/limits.
pub fn nofile_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let mut values = line.split_whitespace().skip(3).map(|v| {
        if v == "unlimited" {
            u64::MAX
        } else {
            v.parse().unwrap()
        }
    });
    (values.next().unwrap(), values.next().unwrap())
}

/// Raises process `pid`'s soft descriptor limit to at least `want` when it
/// is lower (never above its hard limit: raising that needs
/// CAP_SYS_RESOURCE). Panics if the hard limit is below `want`.
pub fn raise_nofile(pid: u32, want: u64) {
    let (soft, hard) = nofile_limits(pid);
    assert!(
        hard >= want,
        "this test needs {want} descriptors; the hard limit is {hard}"
    );
    if soft < want {
        let status = Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg(format!("--nofile={want}:{hard}"))
            .status()
            .expect("prlimit (util-linux) is needed");
        assert!(
            status.success(),
            "prlimit --pid {pid} --nofile={want}:{hard} failed"
        );
    }
}

/// Raises this test process's soft descriptor limit to at least `want`.
pub fn ensure_own_nofile(want: u64) {
    raise_nofile(std::process::id(), want);
}

// ---- /metrics ------------------------------------------------------------------

/// `GET path` over plain HTTP/1.1; returns (status line, headers, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(all).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

/// Series → value from Prometheus text (`name{labels} value`).
pub fn parse_metrics(body: &str) -> std::collections::HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// A GeoIP (Country-shaped) database mapping each network to its ISO code.
pub fn geoip_db(entries: &[(&str, &str)]) -> Vec<u8> {
    use mmdb_writer::{Value, Writer};
    let mut writer = Writer::new("GeoLite2-Country");
    for (net, iso) in entries {
        let country = Value::map([
            ("geoname_id", Value::from(1_u32)),
            ("iso_code", Value::from(*iso)),
            ("names", Value::map([("en", Value::from(*iso))])),
        ]);
        writer
            .insert_value(
                net.parse::<ipnet::IpNet>().unwrap(),
                Value::map([("country", country)]),
            )
            .unwrap();
    }
    writer.to_bytes().unwrap()
}

/// Connects from a chosen loopback source address (127.0.0.0/8).
pub async fn connect_from_ip(source: std::net::IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// Connects from `source`, sends a ClientHello for `sni` and reads to the
/// end: the bytes received and how it ended. A reset seen by the connect or
/// by the write is that end too (the kernel reports a reset once, to
/// whichever call comes first; later reads just see EOF).
pub async fn hello_from(
    source: std::net::IpAddr,
    to: SocketAddr,
    sni: &str,
) -> (Vec<u8>, io::Result<()>) {
    let mut stream = match connect_from_ip(source, to).await {
        Ok(stream) => stream,
        Err(e) => return (Vec::new(), Err(e)),
    };
    if let Err(e) = stream.write_all(&client_hello(Some(sni))).await {
        return (Vec::new(), Err(e));
    }
    read_all(&mut stream, Duration::from_secs(10)).await
}

impl Proxy {
    /// Waits for the log line of a connection from `client` (an IP, or
    /// `[v6]`) refused by the firewall with `rule` (`ip`, `cidr`,
    /// `country:KP`, `rate`).
    pub fn wait_blocked(&self, client: &str, rule: &str) -> String {
        self.wait_log(
            &[
                &format!("client={client}:"),
                &format!("outcome=blocked:{rule}"),
            ],
            Duration::from_secs(5),
        )
    }
}
