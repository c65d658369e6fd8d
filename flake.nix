{
  description = "mc-proxy: TLS SNI proxy and router (static binary and distroless OCI image)";

  # No flake.lock is committed: nixpkgs cannot be fetched in this project's CI,
  # so a lock could not be produced or checked there. The first `nix build`
  # on a machine with network access writes one; commit it from there to pin.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          # pkgsStatic: musl, statically linked. SQLite is compiled in by
          # rusqlite's `bundled` feature, so there is nothing to link at run time.
          mc-proxy = pkgs.pkgsStatic.callPackage ./nix/package.nix { };
        in
        {
          default = mc-proxy;
          inherit mc-proxy;
          # `nix build .#image && podman load < result`
          image = pkgs.callPackage ./nix/image.nix { inherit mc-proxy; };
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            rust-analyzer
            pkg-config
            sqlite
            openssl
            grpcurl
          ];
        };
      });
    };
}
