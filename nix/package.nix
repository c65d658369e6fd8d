# The mc-proxy binary. Called from flake.nix with pkgsStatic.callPackage, so
# `rustPlatform` here is pkgsStatic.rustPlatform: target *-unknown-linux-musl,
# statically linked.
{ lib, rustPlatform }:

let
  cargoToml = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = cargoToml.package.name;
  inherit (cargoToml.package) version;

  # Only what the build reads: no target/, no .git, no deploy files. The
  # workspace members (crates/) are part of the build.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../build.rs
      ../src
      ../crates
      ../proto
    ];
  };

  # Vendors every crate from the lock file; no git dependencies, so no
  # outputHashes are needed.
  cargoLock.lockFile = ../Cargo.lock;

  # build.rs compiles proto/ with protox (pure Rust): no protoc needed.
  # rusqlite's `bundled` feature and ring build their C code with the
  # stdenv's (musl) C compiler.

  # The test suite starts the proxy, backends and the admin API on loopback
  # sockets and needs tests/ data; the Nix build sandbox has no usable
  # network, so the tests run in CI (`cargo test`), not here.
  doCheck = false;

  meta = {
    description = cargoToml.package.description;
    license = with lib.licenses; [
      mit
      asl20
    ];
    mainProgram = "mc-proxy";
    platforms = lib.platforms.linux;
  };
}
