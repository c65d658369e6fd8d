//! Admin API call cost over the unix socket: starts `BIN server` on a temp
//! config, makes COUNT sequential GetStatus calls on one connection (after
//! 100 warm-up calls) and prints the wall time and the server's CPU time
//! per call. Compare binaries (e.g. with and without the authority shim):
//!
//!     cargo run --release --example admin-call-bench -- target/release/mc-proxy 1000

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mc_proxy::admin::proto::GetStatusRequest;
use mc_proxy::config::{AdminAddr, ClientTls};

/// CPU time of every thread of `pid`, in nanoseconds (schedstat's first
/// field), finer than /proc/PID/stat's clock ticks.
fn cpu(pid: u32) -> Duration {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let path = task.unwrap().path().join("schedstat");
        if let Ok(text) = std::fs::read_to_string(path) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(total)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = args
        .get(1)
        .map(String::as_str)
        .unwrap_or("target/release/mc-proxy");
    let count: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let config = dir.path().join("mc-proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\npath = \"{}\"\n\n[grpc]\naddr = \"unix:{}\"\n\n[[listeners]]\naddr = \"127.0.0.1:0\"\n",
            dir.path().join("mc-proxy.db").display(),
            socket.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin)
        .args(["server", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !Path::new(&socket).exists() {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client =
        mc_proxy::admin::client::connect(&AdminAddr::Unix(socket), &ClientTls::default())
            .await
            .unwrap();
    for _ in 0..100 {
        client.get_status(GetStatusRequest {}).await.unwrap();
    }
    let (cpu0, t0) = (cpu(child.id()), Instant::now());
    for _ in 0..count {
        client.get_status(GetStatusRequest {}).await.unwrap();
    }
    let (wall, server_cpu) = (t0.elapsed(), cpu(child.id()) - cpu0);
    println!(
        "{bin}: {count} GetStatus calls: wall {:.1} us/call, server CPU {:.1} us/call",
        wall.as_secs_f64() * 1e6 / f64::from(count),
        server_cpu.as_secs_f64() * 1e6 / f64::from(count)
    );
    let _ = child.kill();
    let _ = child.wait();
}
