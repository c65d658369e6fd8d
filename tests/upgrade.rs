//! `mc-proxy upgrade` (systemd's ExecReload), `mc-proxy status` after a
//! takeover, and `--after-handoff wait` (a container's PID 1), through the
//! real binary (SPEC §6.4).

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The admin socket and one listener on `127.0.0.1:0` routing `a.test` to
/// `backend`.
fn upgrade_config(dir: &Path, backend: std::net::SocketAddr) -> String {
    admin_config(dir, &listener("127.0.0.1:0", &[route("a.test", backend)]))
}

/// A stand-in for systemd's notify socket: the datagrams servers send to
/// `NOTIFY_SOCKET`.
struct Notify {
    path: PathBuf,
    socket: UnixDatagram,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Notify { path, socket }
    }

    fn env(&self) -> (&'static str, String) {
        ("NOTIFY_SOCKET", self.path.display().to_string())
    }

    /// The next datagram containing `needle`, within `limit`.
    fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if text.contains(needle) {
                    return text;
                }
                seen.push(text);
            }
        }
        panic!("no notify message with {needle:?} within {limit:?}; got {seen:?}")
    }
}

/// What `mc-proxy upgrade` printed and how it exited; the server it
/// started writes its log to `stderr` (a file, so that nothing waits for
/// that server to close a pipe).
struct Upgrade {
    code: i32,
    stdout: String,
    stderr: PathBuf,
}

fn upgrade(dir: &Path, config: &Path, env: &[(&str, String)]) -> Upgrade {
    let stdout = dir.join("upgrade.out");
    let stderr = dir.join("upgrade.err");
    let status = Command::new(BIN)
        .args(["upgrade", "-c"])
        .arg(config)
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .status()
        .unwrap();
    Upgrade {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&stdout).unwrap(),
        stderr,
    }
}

impl Upgrade {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The new server's pid, from `upgrade`'s report.
    fn pid(&self) -> u32 {
        let rest = self
            .stdout
            .split("(pid ")
            .nth(1)
            .unwrap_or_else(|| panic!("no pid in {:?}", self.stdout));
        rest.split(')').next().unwrap().parse().unwrap()
    }
}

/// Whether `pid` is still a running process (not gone, not a zombie).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A second server on `old`'s config (started through `wrapper`, if any)
/// once it has taken over.
async fn successor(old: &Proxy, wrapper: Option<fn() -> Command>) -> Proxy {
    let (dir, config) = (old.dir.clone(), old.config.clone());
    let new = tokio::task::spawn_blocking(move || match wrapper {
        Some(wrapper) => Proxy::start_wrapped(wrapper(), &dir, &config),
        None => Proxy::start_existing(&dir, &config),
    })
    .await
    .unwrap();
    new.wait_log(
        &["handoff: the previous server stopped accepting"],
        Duration::from_secs(10),
    );
    new
}

/// `old` handed over, drained (nothing was open) and waits rather than
/// exits: a container's restart policy has nothing to restart.
fn assert_waiting(old: &mut Proxy) {
    old.wait_log(
        &["handed off and drained; waiting for SIGTERM"],
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "{}",
        old.log_text()
    );
}

fn assert_exit_0(proxy: &mut Proxy) {
    let status = proxy.wait_exit(Duration::from_secs(30));
    assert!(
        matches!(status, Some(s) if s.success()),
        "{status:?}\n{}",
        proxy.log_text()
    );
}

fn wait_gone(pid: u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    while running(pid) {
        assert!(Instant::now() < deadline, "pid {pid} still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_starts_a_process_that_takes_over_and_tells_systemd_its_pid() {
    let (dir, pki, backend) = tls_scene("A", &["a.test", "late.test"]).await;
    let notify = Notify::bind(dir.path());
    let toml = upgrade_config(dir.path(), backend.addr);
    let mut old = Proxy::start_with_env(dir.path(), &toml, &[(notify.env().0, &notify.env().1)]);
    let addr = old.addr();
    notify.wait_for("READY=1", Duration::from_secs(10));
    old.wait_log(&["handoff socket listening"], Duration::from_secs(10));
    // A plain start: status says it took over from nobody.
    let (code, out, err) = old.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("took over    no"), "{out}");

    let run = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        let config = old.config.clone();
        let env = vec![notify.env()];
        move || upgrade(&dir, &config, &env)
    })
    .await
    .unwrap();
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr());
    let new_pid = run.pid();
    assert_ne!(new_pid, old.pid());
    assert!(running(new_pid), "{}", run.stderr());
    // systemd hears of the new main process from the new process itself.
    let message = notify.wait_for(&format!("MAINPID={new_pid}"), Duration::from_secs(10));
    assert!(message.contains("READY=1"), "{message}");
    // The old one drains and exits 0.
    assert_exit_0(&mut old);
    assert!(old.log_text().contains("signal=\"handoff\""));

    // The new one serves the same port, answers the admin API, says when
    // and from whom it took over.
    assert_eq!(who(addr, "a.test", &pki).await.unwrap(), "A");
    let (code, out, err) = old.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("from pid {}, mc-proxy ", old.pid())),
        "{out}"
    );
    let (code, out, err) = old.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["took_over"]["predecessor_pid"], old.pid());
    assert!(json["took_over"]["at"].as_str().is_some(), "{out}");
    assert!(
        json["took_over"]["predecessor_started_at"]
            .as_str()
            .is_some(),
        "{out}"
    );
    let (code, out, err) = old.routes_add("127.0.0.1:0", "late.test", &backend.addr.to_string());
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(who(addr, "late.test", &pki).await.unwrap(), "A");
    // `upgrade` left nothing behind but the new server's own sockets.
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("mc-proxy.upgrade") || name.ends_with(".new"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    send_signal(new_pid, "TERM");
    wait_gone(new_pid, Duration::from_secs(20));
    assert!(
        run.stderr().contains("mc-proxy stopped"),
        "{}",
        run.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_refuses_when_no_server_runs_and_when_the_new_process_fails() {
    let (dir, pki, backend) = tls_scene("A", &["a.test"]).await;
    let toml = upgrade_config(dir.path(), backend.addr);
    let config = dir.path().join("mc-proxy.toml");
    std::fs::write(&config, &toml).unwrap();

    // Nothing runs here: nothing is started, no database is created.
    let run = upgrade(dir.path(), &config, &[]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr());
    assert!(
        run.stderr().contains("nothing to take over from"),
        "{}",
        run.stderr()
    );
    assert!(!dir.path().join("mc-proxy.db").exists());

    let old = Proxy::start_existing(dir.path(), &config);
    let addr = old.addr();
    old.wait_log(&["handoff socket listening"], Duration::from_secs(10));

    // A config that does not load: exit 2 naming the key; nothing started.
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        toml.replace(
            "[[listeners]]",
            "[proxy]\nconnect_timeout = \"soon\"\n\n[[listeners]]",
        ),
    )
    .unwrap();
    let run = upgrade(dir.path(), &broken, &[]);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr());
    assert!(run.stderr().contains("connect_timeout"), "{}", run.stderr());

    // A new process that cannot open its database: exit 1, and the old
    // one serves on, untouched.
    let db_dir = dir.path().join("not-a-db");
    std::fs::create_dir(&db_dir).unwrap();
    std::fs::write(
        &broken,
        toml.replace(
            &dir.path().join("mc-proxy.db").display().to_string(),
            &db_dir.display().to_string(),
        ),
    )
    .unwrap();
    let run = upgrade(dir.path(), &broken, &[]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr());
    assert!(
        run.stderr()
            .contains("exited (exit status: 1) before taking over"),
        "{}",
        run.stderr()
    );
    old.wait_log(
        &["handoff: the new process did not take over; still serving"],
        Duration::from_secs(10),
    );
    assert_eq!(who(addr, "a.test", &pki).await.unwrap(), "A");
    old.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_handoff_wait_keeps_the_old_process_until_a_signal_then_exits_0() {
    let (dir, pki, backend) = tls_scene("A", &["a.test"]).await;
    let toml = upgrade_config(dir.path(), backend.addr);
    let mut old = Proxy::start_with_env(dir.path(), &toml, &[("MC_PROXY_AFTER_HANDOFF", "wait")]);
    let addr = old.addr();
    old.wait_log(&["handoff socket listening"], Duration::from_secs(10));
    // A readiness probe's question: is it this server that answers?
    let old_pid = old.pid().to_string();
    let (code, _, err) = old.cli(&["status", "--expect-pid", &old_pid]);
    assert_eq!(code, 0, "{err}");
    let new = successor(&old, None).await;
    assert_waiting(&mut old);
    // The new process serves everything meanwhile.
    for _ in 0..5 {
        assert_eq!(who(addr, "a.test", &pki).await.unwrap(), "A");
    }
    let served_by_old = old.conn_lines().len();
    assert_eq!(served_by_old, 0, "{}", old.log_text());
    // The admin socket answers from the new process now: a probe of the
    // old one's fails, the new one's passes.
    let (code, _, err) = old.cli(&["status", "--expect-pid", &old_pid]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("is pid {}, not pid {old_pid}", new.pid())),
        "{err}"
    );
    let (code, _, err) = old.cli(&["status", "--expect-pid", &new.pid().to_string()]);
    assert_eq!(code, 0, "{err}");
    old.signal("TERM");
    assert_exit_0(&mut old);
    new.stop();
}

/// `unshare --pid --fork --mount-proc`: the server it starts is PID 1 of a
/// PID namespace of its own, as in a container.
fn in_pid_namespace() -> Command {
    let mut unshare = Command::new("unshare");
    unshare.args(["--pid", "--fork", "--mount-proc"]);
    unshare
}

/// The server `unshare` (process `wrapper`) started, by its pid here.
fn server_pid(wrapper: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{wrapper}/task/{wrapper}/children"))
        .unwrap_or_default();
    children
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("unshare ({wrapper}) has no child"))
}

/// `mc-proxy status --expect-pid 1 -c CONFIG` inside the PID namespace of
/// process `pid` (a probe run in that container).
fn probe_in_namespace_of(pid: u32, config: &Path) -> (i32, String) {
    let out = Command::new("nsenter")
        .args(["--target", &pid.to_string(), "--pid", "--"])
        .arg(BIN)
        .args(["status", "--expect-pid", "1", "-c"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_in_containers_the_old_server_waits_and_only_the_new_ones_probe_passes() {
    let (dir, pki, backend) = tls_scene("A", &["a.test"]).await;
    let config = dir.path().join("mc-proxy.toml");
    std::fs::write(&config, upgrade_config(dir.path(), backend.addr)).unwrap();
    let mut old = Proxy::start_wrapped(in_pid_namespace(), dir.path(), &config);
    let addr = old.addr();
    let old_server = server_pid(old.pid());
    old.wait_log(&["handoff socket listening"], Duration::from_secs(10));
    let (code, err) = probe_in_namespace_of(old_server, &config);
    assert_eq!(code, 0, "{err}");

    let new = successor(&old, Some(in_pid_namespace)).await;
    let new_server = server_pid(new.pid());
    // PID 1 waits after the handoff by default: its exit would be the
    // container's, which a restart policy undoes.
    assert_waiting(&mut old);
    assert_eq!(who(addr, "a.test", &pki).await.unwrap(), "A");
    // Both are PID 1; only the new container's probe passes.
    let (code, err) = probe_in_namespace_of(old_server, &config);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in another PID namespace"), "{err}");
    let (code, err) = probe_in_namespace_of(new_server, &config);
    assert_eq!(code, 0, "{err}");

    send_signal(old_server, "TERM");
    assert_exit_0(&mut old);
    assert_eq!(who(addr, "a.test", &pki).await.unwrap(), "A");
    send_signal(new_server, "TERM");
    wait_gone(new_server, Duration::from_secs(20));
}
