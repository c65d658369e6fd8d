//! The real `mc-proxy` binary: started on a config in a temp dir, its
//! stderr read line by line by a background thread into a [`Log`] that
//! tests wait on (no sleep-and-grep), its bound addresses read from its
//! `listening` lines, signalled with kill(2), its CLI run.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mc-proxy");

/// How long a start may take before the test fails.
const START_LIMIT: Duration = Duration::from_secs(20);

/// A process's stderr as it arrives: one thread reads it to EOF, waiters
/// are woken on every line.
pub struct Log {
    state: Mutex<LogState>,
    grew: Condvar,
}

#[derive(Default)]
struct LogState {
    text: String,
    /// EOF: the process closed stderr (it exited).
    closed: bool,
}

impl Log {
    /// Starts the reader thread on `stderr`.
    pub fn read(stderr: impl std::io::Read + Send + 'static) -> Arc<Log> {
        let log = Arc::new(Log {
            state: Mutex::new(LogState::default()),
            grew: Condvar::new(),
        });
        let writer = log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line).unwrap_or(0);
                let mut state = writer.state.lock().unwrap();
                if n == 0 {
                    state.closed = true;
                } else {
                    state.text.push_str(&String::from_utf8_lossy(&line));
                }
                let closed = state.closed;
                drop(state);
                writer.grew.notify_all();
                if closed {
                    break;
                }
            }
        });
        log
    }

    /// Everything read so far.
    pub fn text(&self) -> String {
        self.state.lock().unwrap().text.clone()
    }

    /// Whether the process has closed its stderr.
    pub fn closed(&self) -> bool {
        self.state.lock().unwrap().closed
    }

    /// Calls `check` on the text so far, and again after every line, until
    /// it answers `Some` or `limit` passes (`None`). `check` also sees
    /// whether stderr is closed, so a wait for a line that will never come
    /// can end early.
    pub fn wait_for<T>(
        &self,
        limit: Duration,
        mut check: impl FnMut(&str, bool) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + limit;
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(found) = check(&state.text, state.closed) {
                return Some(found);
            }
            let now = Instant::now();
            if now >= deadline || state.closed {
                return None;
            }
            state = self.grew.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}

/// The value of `key=` in a log line (up to the next space).
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()
}

pub struct Proxy {
    pub child: Child,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: Arc<Log>,
    /// The temp dir of [`Proxy::routing`], removed after the process.
    temp: Option<tempfile::TempDir>,
}

impl Proxy {
    /// `mc-proxy server` in a temp dir of its own: one listener on
    /// `127.0.0.1:0` with `routes`, then `extra` (a `[proxy]` section, say).
    /// [`Proxy::addr`] is where it listens.
    pub fn routing(routes: &[(&str, SocketAddr)], extra: &str) -> Proxy {
        let listener = super::fixtures::listener_toml("127.0.0.1:0", routes);
        Proxy::in_temp_dir(|_| format!("{listener}{extra}"))
    }

    /// `mc-proxy server` in a temp dir of its own, on [`config`](super::fixtures::config)
    /// of what `body` writes for that dir.
    pub fn in_temp_dir(body: impl FnOnce(&Path) -> String) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let toml = super::fixtures::config(dir.path(), &body(dir.path()));
        let mut proxy = Proxy::start(dir.path(), &toml);
        proxy.temp = Some(dir);
        proxy
    }

    /// `mc-proxy server` in `dir` on [`admin_config`](super::fixtures::admin_config):
    /// the admin socket and one listener on `addr` with `routes`.
    pub fn with_admin(dir: &Path, addr: &str, routes: &[(&str, SocketAddr)]) -> Proxy {
        let body = super::fixtures::listener_toml(addr, routes);
        Proxy::start(dir, &super::fixtures::admin_config(dir, &body))
    }

    /// The bound address of the listener written `127.0.0.1:0`.
    pub fn addr(&self) -> SocketAddr {
        self.listener("127.0.0.1:0")
    }

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

    /// Starts `mc-proxy server -c CONFIG` through `wrapper` (a command that
    /// execs its last arguments: the binary and `server -c CONFIG` are
    /// appended) and waits until it logs that it started.
    pub fn start_wrapped(wrapper: Command, dir: &Path, config: &Path) -> Proxy {
        let mut command = wrapper;
        command.arg(BIN);
        Proxy::spawn(command, dir, config, &[])
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
        let started = proxy.log.wait_for(START_LIMIT, |text, closed| {
            if text.contains("mc-proxy started") {
                Some(true)
            } else {
                closed.then_some(false)
            }
        });
        match started {
            Some(true) => proxy,
            Some(false) => {
                let status = proxy.wait_exit(Duration::from_secs(5));
                panic!(
                    "mc-proxy exited with {status:?} at start:\n{}",
                    proxy.log_text()
                )
            }
            None => panic!("mc-proxy did not start:\n{}", proxy.log_text()),
        }
    }

    /// Runs `command` with `server -c CONFIG`, stderr to the [`Log`].
    fn launch_command(
        mut command: Command,
        dir: &Path,
        config: &Path,
        env: &[(&str, &str)],
    ) -> Proxy {
        let mut child = command
            .args(["server", "-c"])
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mc-proxy (or prlimit, from util-linux)");
        let stderr: ChildStderr = child.stderr.take().unwrap();
        Proxy {
            child,
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            log: Log::read(stderr),
            temp: None,
        }
    }

    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// Log lines of closed connections.
    pub fn conn_lines(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("connection closed"))
            .map(str::to_string)
            .collect()
    }

    /// Waits until a log line containing every needle appears; returns it.
    pub fn wait_log(&self, needles: &[&str], limit: Duration) -> String {
        self.log
            .wait_for(limit, |text, _| {
                text.lines()
                    .find(|l| needles.iter().all(|n| l.contains(n)))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("no log line with {needles:?}:\n{}", self.log_text()))
    }

    /// Waits until at least `n` "connection closed" lines contain every
    /// needle; returns those lines.
    pub fn wait_conns(&self, needles: &[&str], n: usize, limit: Duration) -> Vec<String> {
        self.log
            .wait_for(limit, |text, _| {
                let lines: Vec<String> = text
                    .lines()
                    .filter(|l| l.contains("connection closed"))
                    .filter(|l| needles.iter().all(|n| l.contains(n)))
                    .map(str::to_string)
                    .collect();
                (lines.len() >= n).then_some(lines)
            })
            .unwrap_or_else(|| {
                panic!(
                    "fewer than {n} connection lines with {needles:?}:\n{}",
                    self.log_text()
                )
            })
    }

    /// How many log lines contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        count(&self.log_text(), needle)
    }

    /// Waits until at least `n` log lines contain `needle`.
    pub fn wait_count(&self, needle: &str, n: usize, limit: Duration) {
        self.log
            .wait_for(limit, |text, _| (count(text, needle) >= n).then_some(()))
            .unwrap_or_else(|| {
                panic!(
                    "fewer than {n} log lines with {needle:?}:\n{}",
                    self.log_text()
                )
            })
    }

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

    /// The address the listener written as `addr` in the config is bound
    /// to (its `listening` line: the real port for `:0`).
    pub fn listener(&self, addr: &str) -> SocketAddr {
        let line = self.wait_log(&[" listening ", &format!(" listener={addr} ")], START_LIMIT);
        bound(&line)
    }

    /// Where the metrics endpoint listens (the real port for `:0`).
    pub fn metrics_addr(&self) -> SocketAddr {
        bound(&self.wait_log(&["metrics endpoint listening"], START_LIMIT))
    }

    /// Where the TCP admin API listens (the real port for `:0`).
    pub fn admin_tcp_addr(&self) -> SocketAddr {
        bound(&self.wait_log(&["admin API listening (TLS 1.3)"], START_LIMIT))
    }

    /// Sends the signal `name` (`"TERM"`, `"INT"`, `"HUP"`) to the server.
    pub fn signal(&self, name: &str) {
        send_signal(self.child.id(), name);
    }

    /// Waits up to `limit` for the process to exit: for its stderr to close,
    /// then for its status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        self.log.wait_for(limit, |_, closed| closed.then_some(()));
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            // Only between stderr's close and the exit itself.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs a CLI subcommand against this server's config: `args` then
    /// `-c CONFIG`.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let config = self.config.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-c", config.as_str()]);
        run_cli(&all)
    }

    /// `routes add --listener LISTENER --hostname HOSTNAME --backend BACKEND`
    /// through [`Proxy::cli`].
    pub fn routes_add(
        &self,
        listener: &str,
        hostname: &str,
        backend: &str,
    ) -> (i32, String, String) {
        self.cli(&routes_add_args(listener, hostname, backend))
    }

    /// `routes remove --listener LISTENER --hostname HOSTNAME` through
    /// [`Proxy::cli`].
    pub fn routes_remove(&self, listener: &str, hostname: &str) -> (i32, String, String) {
        self.cli(&[
            "routes",
            "remove",
            "--listener",
            listener,
            "--hostname",
            hostname,
        ])
    }

    /// The database file named by the config (`DIR/mc-proxy.db`).
    pub fn db(&self) -> PathBuf {
        self.dir.join("mc-proxy.db")
    }

    /// The admin socket of `admin_config`.
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
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// The `addr=` of a `listening` line.
fn bound(line: &str) -> SocketAddr {
    log_field(line, "addr")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no bound address in {line:?}"))
}

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

/// `routes add --listener LISTENER --hostname HOSTNAME --backend BACKEND`.
pub fn routes_add_args<'a>(listener: &'a str, hostname: &'a str, backend: &'a str) -> Vec<&'a str> {
    vec![
        "routes",
        "add",
        "--listener",
        listener,
        "--hostname",
        hostname,
        "--backend",
        backend,
    ]
}

/// Runs the binary with `args`; returns (exit code, stdout, stderr).
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
