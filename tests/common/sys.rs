//! Process figures from /proc and descriptor limits (prlimit).

use std::process::Command;
use std::time::Duration;

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
    prlimit_nofile(pid, limit, limit);
}

/// `prlimit --pid=PID --nofile=SOFT:HARD`, which must succeed.
fn prlimit_nofile(pid: u32, soft: u64, hard: u64) {
    let status = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:{hard}"))
        .status()
        .expect("prlimit (util-linux) is needed");
    assert!(
        status.success(),
        "prlimit --pid {pid} --nofile={soft}:{hard} failed"
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
        prlimit_nofile(pid, want, hard);
    }
}

/// Raises this test process's soft descriptor limit to at least `want`.
pub fn ensure_own_nofile(want: u64) {
    raise_nofile(std::process::id(), want);
}
