//! systemd socket activation through the real binary (SPEC §6.4): sockets
//! passed in `LISTEN_FDS` (by `tests/python/socket_activate.py`, which does
//! what systemd does for a `.socket` unit) are matched to the listeners by
//! address and served; a listener not passed is bound as usual; a passed
//! socket no listener names is closed with a warning.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::peers::python_script;
use common::*;

/// The launcher: `sockets` loopback sockets on free ports, the config
/// written from `template` with their ports, the ports to `ports`; the
/// command to exec follows (after `--`).
fn launcher(sockets: usize, template: &Path, config: &Path, ports: &Path) -> Command {
    let mut wrapper = Command::new("python3");
    wrapper.arg(python_script("socket_activate.py"));
    for _ in 0..sockets {
        wrapper.args(["--listen", "127.0.0.1:0"]);
    }
    wrapper
        .arg("--template")
        .arg(template)
        .arg("--config")
        .arg(config)
        .arg("--ports")
        .arg(ports)
        .arg("--");
    wrapper
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passed_sockets_are_served_by_address_and_the_rest_bound() {
    let pki = Pki::new("activation CA");
    let passed = tls_backend(&pki, "passed", &["a.test"]).await;
    let bound = tls_backend(&pki, "bound", &["b.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    // Listener 0 is passed by "systemd"; listener 1 is not (bound by
    // mc-proxy on a port of its own); the second passed socket
    // ({port1}) is no listener's.
    let body = format!(
        "{}{}",
        listener("127.0.0.1:{port0}", &[route("a.test", passed.addr)]),
        listener("127.0.0.1:0", &[route("b.test", bound.addr)]),
    );
    let template = dir.path().join("template.toml");
    std::fs::write(&template, config(dir.path(), &body)).unwrap();
    let config_path = dir.path().join("mc-proxy.toml");
    let ports_path = dir.path().join("ports");
    let wrapper = launcher(2, &template, &config_path, &ports_path);
    let proxy = Proxy::start_wrapped(wrapper, dir.path(), &config_path);
    let ports: Vec<u16> = std::fs::read_to_string(&ports_path)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let passed_addr: SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
    let stray_addr: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().unwrap();

    // The passed socket is listener 0's, served as is.
    let line = proxy.wait_log(
        &[" listening ", &format!(" addr={passed_addr} ")],
        Duration::from_secs(10),
    );
    assert!(line.contains("inherited=true"), "{line}");
    assert_eq!(who(passed_addr, "a.test", &pki).await.unwrap(), "passed");
    // Listener 1 was bound by mc-proxy.
    let bound_addr = proxy.listener("127.0.0.1:0");
    assert_ne!(bound_addr.port(), ports[0]);
    assert_ne!(bound_addr.port(), ports[1]);
    let line = proxy.wait_log(
        &[" listening ", &format!(" addr={bound_addr} ")],
        Duration::from_secs(10),
    );
    assert!(line.contains("inherited=false"), "{line}");
    assert_eq!(who(bound_addr, "b.test", &pki).await.unwrap(), "bound");
    // The stray socket was closed: nothing listens there any more.
    let warning = proxy.wait_log(&["was not used", "fd 4"], Duration::from_secs(10));
    assert!(warning.contains(&stray_addr.to_string()), "{warning}");
    let refused = tokio::net::TcpStream::connect(stray_addr).await;
    assert!(refused.is_err(), "the stray socket still accepts");
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_made_before_the_server_is_up_wait_in_the_passed_backlog() {
    let pki = Pki::new("activation CA");
    let backend = tls_backend(&pki, "early", &["a.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("template.toml");
    std::fs::write(
        &template,
        config(
            dir.path(),
            &listener("127.0.0.1:{port0}", &[route("a.test", backend.addr)]),
        ),
    )
    .unwrap();
    let config_path = dir.path().join("mc-proxy.toml");
    let ports_path = dir.path().join("ports");
    // The socket exists (and queues connections) from the moment the
    // launcher binds it, before mc-proxy has opened its database: the
    // client below connects as soon as the port is known, racing the
    // start, and is served, not refused.
    let mut wrapper = launcher(1, &template, &config_path, &ports_path);
    wrapper
        .arg(env!("CARGO_BIN_EXE_mc-proxy"))
        .args(["server", "-c"])
        .arg(&config_path);
    let mut child = wrapper
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let port = loop {
        if let Some(port) = std::fs::read_to_string(&ports_path)
            .ok()
            .and_then(|t| t.trim().parse::<u16>().ok())
        {
            break port;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no port from the launcher"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let answers = futures_join(addr, std::sync::Arc::new(pki)).await;
    assert_eq!(answers, vec!["early".to_string(); 5]);
    let _ = child.kill();
    let _ = child.wait();
}

/// Five clients at once, each through the proxy to the backend's name.
async fn futures_join(addr: SocketAddr, pki: std::sync::Arc<Pki>) -> Vec<String> {
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let pki = pki.clone();
        tasks.push(tokio::spawn(async move { who(addr, "a.test", &pki).await }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap().expect("served, not refused"));
    }
    answers
}
