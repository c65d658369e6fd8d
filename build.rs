//! Build-time inputs:
//! - the admin API proto, compiled with protox (pure Rust, no system
//!   `protoc`), plus the encoded descriptor set that server reflection serves;
//! - `MC_PROXY_GIT_DESCRIBE` for `--version`: taken from the environment if
//!   set (packaging), else from `git describe` when building from a checkout,
//!   else left unset.

use std::path::{Path, PathBuf};
use std::process::Command;

use protox::prost::Message;

const PROTO: &str = "mc_proxy/v1/admin.proto";
const PROTO_ROOT: &str = "proto";
const GIT_DESCRIBE: &str = "MC_PROXY_GIT_DESCRIBE";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");

    // With its imports (google/protobuf/timestamp.proto), so that reflection
    // clients can resolve every type without the proto files.
    let fds = protox::compile([PROTO], [PROTO_ROOT])?;
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    std::fs::write(out_dir.join("admin_descriptor.bin"), fds.encode_to_vec())?;

    // Well-known types map to prost-types; the generator still needs their
    // descriptors in the set.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    git_describe();
    Ok(())
}

fn git_describe() {
    println!("cargo:rerun-if-env-changed={GIT_DESCRIBE}");
    if std::env::var_os(GIT_DESCRIBE).is_some() {
        return; // already in rustc's environment
    }
    if !Path::new(".git").exists() {
        return;
    }
    // New commits and checkouts; not every `git add`, to spare rebuilds. In
    // a linked worktree `.git` is a file: HEAD lives in the worktree's git
    // dir, branches in the common one.
    let rev_parse = |arg: &str| {
        Command::new("git")
            .args(["rev-parse", arg])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|text| PathBuf::from(text.trim()))
    };
    let git_dir = rev_parse("--absolute-git-dir");
    let common_dir = rev_parse("--git-common-dir").map(|dir| {
        if dir.is_absolute() {
            dir
        } else {
            Path::new(".").join(dir)
        }
    });
    let watched = [
        git_dir.as_ref().map(|dir| dir.join("HEAD")),
        common_dir.as_ref().map(|dir| dir.join("refs/heads")),
        common_dir.as_ref().map(|dir| dir.join("refs/tags")),
        common_dir.as_ref().map(|dir| dir.join("packed-refs")),
    ];
    for path in watched.into_iter().flatten() {
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    let describe = Command::new("git")
        .args(["describe", "--tags", "--always"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty() && !text.contains(char::is_whitespace));
    if let Some(describe) = describe {
        println!("cargo:rustc-env={GIT_DESCRIBE}={describe}");
    }
}
