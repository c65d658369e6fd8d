# A stand-in for nixpkgs, for CI only (see nix/README.md). It builds nothing:
# every function asserts the arguments mc-proxy's flake passes and returns an
# unbuildable derivation, so `nix eval .#packages.<system>.image.drvPath` with
#   --override-input nixpkgs path:./nix/ci-stub
# proves the flake's wiring without fetching nixpkgs.
{
  description = "CI stand-in for nixpkgs (argument checks only, nothing builds)";

  outputs =
    { self }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      pkgsFor = system: import ./default.nix { inherit system; };
    in
    {
      lib = (pkgsFor "x86_64-linux").lib;
      legacyPackages = builtins.listToAttrs (
        map (system: {
          name = system;
          value = pkgsFor system;
        }) systems
      );
    };
}
