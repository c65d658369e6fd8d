//! Real peers for L7 routes through the real binary: nginx started as a
//! child on a generated config, curl, Python scripts (requests, httpx,
//! grpcio, websockets) and headless Chromium.
//!
//! A missing tool skips the test with a printed reason, or fails it when
//! `MC_PROXY_TEST_STRICT` is set (as `.ci/run` does).

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a peer may take to start.
const START_LIMIT: Duration = Duration::from_secs(20);

/// Whether a missing tool fails the test instead of skipping it.
pub fn strict() -> bool {
    std::env::var_os("MC_PROXY_TEST_STRICT").is_some()
}

/// Whether `tool` is on `PATH`; if not, fails (strict) or prints why `test`
/// is skipped and answers false.
pub fn have(tool: &str, test: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    if !found {
        skip(
            test,
            &format!("{tool} is not installed (.ci/run installs it)"),
        );
    }
    found
}

/// A tool is missing: fails when strict, else prints the reason.
pub fn skip(test: &str, why: &str) {
    assert!(!strict(), "{test}: {why}");
    eprintln!("SKIPPED {test}: {why}");
}

/// A loopback port nothing listens on right now (bound to port 0 and
/// released: the peer about to bind it races only other tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts on `addr`: `Err` if `child` exits first
/// (with its status), a panic after [`START_LIMIT`].
fn wait_listening(addr: SocketAddr, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status} before listening on {addr}"));
        }
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The tests' scripts: `tests/python/NAME`.
pub fn python_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Runs `command` to its end, its output collected, killing it after
/// `limit` (a panic: a peer that hangs fails the test instead of CI).
/// `Err` if it cannot be started.
pub fn output_within(command: &mut Command, limit: Duration) -> std::io::Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
            panic!("{command:?} did not finish within {limit:?}: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    })
}

/// How long a client script may run.
const SCRIPT_LIMIT: Duration = Duration::from_secs(90);

/// Runs `python3 tests/python/SCRIPT ARGS` (within [`SCRIPT_LIMIT`]).
/// `None` (after [`skip`]) when python3 is missing or the script exits 3
/// (a module is missing).
pub fn run_python(test: &str, script: &str, args: &[&str]) -> Option<Output> {
    run_python_within(test, script, args, SCRIPT_LIMIT)
}

/// The one JSON object a script printed on stdout; panics with its stderr
/// if it failed.
pub fn script_json(output: &Output, context: &str) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "script failed ({}): {stderr}\nstdout: {stdout}\n{context}",
        output.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout}\nstderr: {stderr}\n{context}"))
}

/// A long-running Python peer (a server): started with `serve ARGS`, it
/// prints `port N` first, then one JSON event per line.
pub struct PythonPeer {
    child: Child,
    pub addr: SocketAddr,
    events: std::sync::Arc<super::process::Log>,
}

impl PythonPeer {
    /// `None` (after [`skip`]) when python3 or a module is missing.
    pub fn start(test: &str, script: &str, args: &[&str]) -> Option<PythonPeer> {
        let mut child = match Command::new("python3")
            .arg(python_script(script))
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(err) => {
                skip(test, &format!("cannot run python3: {err}"));
                return None;
            }
        };
        let events = super::process::Log::read(child.stdout.take().unwrap());
        let stderr = super::process::Log::read(child.stderr.take().unwrap());
        let port = events.wait_for(START_LIMIT, |text, closed| {
            let port = text
                .lines()
                .find_map(|l| l.strip_prefix("port ")?.trim().parse::<u16>().ok());
            port.map(Some).or(closed.then_some(None))
        });
        let Some(Some(port)) = port else {
            let _ = child.kill();
            let status = child.wait().unwrap();
            // stderr is read to its end once the process is gone.
            stderr.wait_for(Duration::from_secs(5), |_, closed| closed.then_some(()));
            if status.code() == Some(3) {
                skip(
                    test,
                    &format!("a Python module is missing: {}", stderr.text()),
                );
                return None;
            }
            panic!(
                "{script} serve did not print its port ({status}): {}{}",
                events.text(),
                stderr.text()
            );
        };
        Some(PythonPeer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            events,
        })
    }

    /// The events printed so far, one JSON object each.
    pub fn events(&self) -> Vec<serde_json::Value> {
        parse_events(&self.events.text())
    }

    /// Waits until an event satisfies `check`; returns it.
    pub fn wait_event(
        &self,
        limit: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        self.events
            .wait_for(limit, |text, _| parse_events(text).into_iter().find(&check))
    }
}

fn parse_events(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

impl Drop for PythonPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One nginx `server` block of [`Nginx::start`].
pub struct NginxServer {
    /// What `/who` answers as `backend=`.
    pub name: &'static str,
    /// Certificate chain and key: a TLS server (ALPN h2 and http/1.1).
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// nginx in the foreground (`daemon off`) on a config generated in its own
/// directory: pid, logs and temp paths inside it, one `server` per
/// [`NginxServer`] on a loopback port. Every server has the same root
/// (`DIR/www`, see [`Nginx::www`]) and answers:
/// - `/who`: `backend=NAME proto=$server_protocol host= sni= xff= xfp= xfh=`;
/// - `/up/NAME` PUT: the body stored as `www/up/NAME` (no size limit);
/// - anything else: the file under `www`.
///
/// The access log (`DIR/access.log`) has one line per request:
/// `NAME $server_protocol "$request" $status $body_bytes_sent
/// $request_length "$http_user_agent"`.
pub struct Nginx {
    child: Child,
    pub dir: PathBuf,
    pub ports: Vec<SocketAddr>,
}

impl Nginx {
    /// Starts nginx in `dir` (created) with `servers`; waits until every
    /// port accepts.
    pub fn start(dir: &Path, servers: &[NginxServer]) -> Nginx {
        std::fs::create_dir_all(dir.join("www/up")).unwrap();
        // A port picked by [`free_port`] may be taken by another test
        // before nginx binds it: then nginx exits, and another try picks
        // other ports.
        let mut tries = 0;
        loop {
            tries += 1;
            match Nginx::try_start(dir, servers) {
                Ok(nginx) => return nginx,
                Err(why) if tries < 3 && why.contains("Address already in use") => continue,
                Err(why) => panic!("nginx did not start: {why}"),
            }
        }
    }

    fn try_start(dir: &Path, servers: &[NginxServer]) -> Result<Nginx, String> {
        let ports: Vec<SocketAddr> = servers
            .iter()
            .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
            .collect();
        let d = dir.display();
        // As root the workers would run as `nobody` and could not read the
        // temp dir.
        // SAFETY: geteuid takes nothing and cannot fail.
        #[allow(unsafe_code)]
        let root = unsafe { libc::geteuid() } == 0;
        let mut conf = format!(
            "{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n\
             \x20 default_type application/octet-stream;\n\
             \x20 types {{ text/html html; }}\n\
             \x20 log_format peers '$server_name $server_protocol \"$request\" $status \
             $body_bytes_sent $request_length \"$http_user_agent\"';\n\
             \x20 access_log {d}/access.log peers;\n\
             \x20 client_body_temp_path {d}/client_body;\n\
             \x20 proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n\
             \x20 uwsgi_temp_path {d}/uwsgi;\n\
             \x20 scgi_temp_path {d}/scgi;\n\
             \x20 client_max_body_size 0;\n",
            user = if root { "user root;\n" } else { "" },
        );
        for (server, addr) in servers.iter().zip(&ports) {
            let listen = match &server.tls {
                Some((cert, key)) => format!(
                    "listen {addr} ssl http2;\n    ssl_certificate {};\n    ssl_certificate_key {};",
                    cert.display(),
                    key.display()
                ),
                None => format!("listen {addr};"),
            };
            conf.push_str(&format!(
                "  server {{\n    {listen}\n    server_name {name};\n    root {d}/www;\n\
                 \x20   location = /who {{ return 200 \"backend={name} proto=$server_protocol \
                 host=$host sni=$ssl_server_name xff=$http_x_forwarded_for \
                 xfp=$http_x_forwarded_proto xfh=$http_x_forwarded_host\\n\"; }}\n\
                 \x20   location /up/ {{ dav_methods PUT; create_full_put_path on; }}\n\
                 \x20 }}\n",
                name = server.name,
            ));
        }
        conf.push_str("}\n");
        let config = dir.join("nginx.conf");
        std::fs::write(&config, &conf).unwrap();
        let error_log = dir.join("error.log");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(&error_log)
            .arg("-c")
            .arg(&config)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Nginx {
            child,
            dir: dir.to_path_buf(),
            ports,
        };
        for addr in nginx.ports.clone() {
            if let Err(why) = wait_listening(addr, &mut nginx.child) {
                let log = std::fs::read_to_string(&error_log).unwrap_or_default();
                return Err(format!("{why}\n{conf}\nerror.log:\n{log}"));
            }
        }
        Ok(nginx)
    }

    /// The directory nginx serves.
    pub fn www(&self) -> PathBuf {
        self.dir.join("www")
    }

    /// The access log so far.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Waits until at least `n` access-log lines contain `needle`; returns
    /// them (nginx writes a line once the response is sent).
    pub fn wait_access(&self, needle: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines: Vec<String> = self
                .access_log()
                .lines()
                .filter(|l| l.contains(needle))
                .map(str::to_string)
                .collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {n} access-log lines with {needle:?}:\n{}",
                self.access_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM (fast shutdown) lets the master take its worker down.
        super::process::send_signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An L7 `[[listeners.routes]]` entry (SPEC §6.2); `extra` holds more
/// `key = value` lines (`backend_tls = true`, ...).
pub fn l7_route(host: &str, backend: SocketAddr, cert: &Path, key: &Path, extra: &str) -> String {
    let mut route = format!(
        "  [[listeners.routes]]\n  hostname = \"{host}\"\n  backend = \"{backend}\"\n  \
         mode = \"l7\"\n  tls_cert = \"{}\"\n  tls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        route.push_str(&format!("  {}\n", line.trim()));
    }
    route
}

/// What one curl run saw.
#[derive(Debug)]
pub struct Curl {
    pub status: u16,
    /// `%{http_version}`: `1.1` or `2`.
    pub version: String,
    pub body: String,
    /// `-v` output: the certificate curl saw is in it.
    pub verbose: String,
}

impl Curl {
    /// The certificate's `subject:` / `issuer:` line of the `-v` output.
    pub fn cert_field(&self, field: &str) -> String {
        let needle = format!("*  {field}: ");
        self.verbose
            .lines()
            .find_map(|l| l.strip_prefix(&needle))
            .unwrap_or_else(|| panic!("no {field} in curl -v:\n{}", self.verbose))
            .to_string()
    }
}

/// `curl -v https://HOST:PORT/PATH` through the proxy at `proxy` (`--resolve`
/// HOST to it), trusting `ca`, with `args` (`--http2`, `-A UA`, ...).
pub fn curl(proxy: SocketAddr, host: &str, path: &str, ca: &Path, args: &[&str]) -> Curl {
    let port = proxy.port();
    let out = Command::new("curl")
        .args(["-sS", "-v", "--max-time", "60"])
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(ca)
        .args(args)
        .args(["-w", "\n%{http_code} %{http_version}"])
        .arg(format!("https://{host}:{port}{path}"))
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let verbose = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "curl {host}{path} {args:?} failed ({}):\n{verbose}",
        out.status
    );
    let (body, last) = stdout.rsplit_once('\n').unwrap();
    let (status, version) = last.split_once(' ').unwrap();
    Curl {
        status: status.parse().unwrap(),
        version: version.to_string(),
        body: body.to_string(),
        verbose,
    }
}

/// `key=value` of a space-separated line (the nginx `/who` answer).
pub fn word<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// base64(sha256(SubjectPublicKeyInfo)) of the first certificate in
/// `pem`: what Chromium's `--ignore-certificate-errors-spki-list` takes.
pub fn spki_hash(pem: &str) -> String {
    use sha2::Digest;
    let der = rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate")
        .map(|c: rustls::pki_types::CertificateDer| c.into_owned())
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    base64(&sha2::Sha256::digest(cert.tbs_certificate.subject_pki.raw))
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// [`run_python`] with its own time limit (a long transfer).
pub fn run_python_within(
    test: &str,
    script: &str,
    args: &[&str],
    limit: Duration,
) -> Option<Output> {
    let mut command = Command::new("python3");
    command.arg(python_script(script)).args(args);
    let output = match output_within(&mut command, limit) {
        Ok(output) => output,
        Err(err) => {
            skip(test, &format!("cannot run python3: {err}"));
            return None;
        }
    };
    if output.status.code() == Some(3) {
        skip(
            test,
            &format!(
                "a Python module is missing (.ci/run installs it): {}",
                String::from_utf8_lossy(&output.stderr)
            ),
        );
        return None;
    }
    Some(output)
}
