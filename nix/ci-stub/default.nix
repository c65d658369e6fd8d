# Stand-in nixpkgs package set: only what mc-proxy's flake.nix and nix/*.nix
# use. Each function checks its arguments against the real nixpkgs API and
# what mc-proxy needs, and throws with a clear message otherwise. Results are
# derivations whose builder fails: evaluating drvPath works, building does not.
{
  system ? builtins.currentSystem,
}:

let
  fail = msg: throw "ci-stub: ${msg}";
  check = cond: msg: if cond then true else fail msg;

  hasSuffix =
    suffix: s:
    let
      ls = builtins.stringLength s;
      lx = builtins.stringLength suffix;
    in
    lx <= ls && builtins.substring (ls - lx) lx s == suffix;
  hasPrefix = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
  hasInfix = infix: s: builtins.match ".*${infix}.*" (builtins.replaceStrings [ "\n" ] [ " " ] s) != null;
  all = builtins.all;
  any = builtins.any;
  attrNames = builtins.attrNames;
  subsetOf = allowed: names: all (n: builtins.elem n allowed) names;
  unknown = allowed: names: builtins.filter (n: !(builtins.elem n allowed)) names;

  # A derivation that cannot be built, plus passthru attributes.
  stubDrv =
    name: passthru:
    derivation {
      inherit name system;
      builder = "/bin/sh";
      args = [
        "-c"
        "echo 'ci-stub: this is a stand-in for nixpkgs; nothing can be built' >&2; exit 1"
      ];
    }
    // passthru;

  simplePkg = name: stubDrv name { pname = name; };

  lib = rec {
    inherit hasSuffix hasPrefix;
    genAttrs =
      names: f:
      builtins.listToAttrs (
        map (n: {
          name = n;
          value = f n;
        }) names
      );
    assertMsg = check;
    importTOML = path: builtins.fromTOML (builtins.readFile path);
    getExe = drv: "${drv}/bin/${drv.meta.mainProgram or drv.pname}";
    licenses = {
      mit = {
        spdxId = "MIT";
      };
      asl20 = {
        spdxId = "Apache-2.0";
      };
    };
    platforms.linux = [
      "x86_64-linux"
      "aarch64-linux"
    ];
    fileset = {
      # A "fileset" here is a list of paths; the real one is an opaque value
      # built the same way.
      unions =
        paths:
        assert check (builtins.isList paths) "lib.fileset.unions takes a list";
        assert check (all (p: builtins.isPath p && builtins.pathExists p) paths)
          "lib.fileset.unions: every element must be an existing path";
        paths;
      toSource =
        { root, fileset }:
        let
          rootStr = toString root;
          wanted = map toString fileset;
          keep =
            path: _type:
            any (w: path == w || hasPrefix "${w}/" path || hasPrefix "${path}/" w) wanted;
        in
        assert check (builtins.isPath root) "lib.fileset.toSource: root must be a path";
        assert check (all (w: w == rootStr || hasPrefix "${rootStr}/" w) wanted)
          "lib.fileset.toSource: every file must be under root";
        builtins.path {
          path = root;
          name = "source";
          filter = keep;
        };
    };
  };

  callPackageWith =
    scope: fn: overrides:
    let
      f = if builtins.isFunction fn then fn else import fn;
      wanted = builtins.functionArgs f;
      missing = builtins.filter (n: !(wanted.${n}) && !(scope ? ${n}) && !(overrides ? ${n})) (
        attrNames wanted
      );
    in
    assert check (missing == [ ]) "callPackage: no package for argument(s) ${toString missing}";
    f (builtins.intersectAttrs wanted scope // overrides);

  # rustPlatform.buildRustPackage, checked for what a static mc-proxy needs.
  buildRustPackage =
    isStatic: args:
    let
      src = args.src or (fail "buildRustPackage: src is required");
      cargoToml = builtins.fromTOML (builtins.readFile "${src}/Cargo.toml");
      lockFile = args.cargoLock.lockFile or null;
    in
    assert check isStatic
      "buildRustPackage must come from pkgsStatic (static musl binary), not the default pkgs";
    assert check (builtins.isFunction args == false)
      "buildRustPackage: pass an attribute set";
    assert check ((args.pname or null) == "mc-proxy") "buildRustPackage: pname must be \"mc-proxy\"";
    assert check (builtins.pathExists "${src}/Cargo.toml") "buildRustPackage: src has no Cargo.toml";
    assert check (builtins.pathExists "${src}/Cargo.lock") "buildRustPackage: src has no Cargo.lock";
    assert check (builtins.pathExists "${src}/build.rs" && builtins.pathExists "${src}/proto")
      "buildRustPackage: src must hold build.rs and proto/ (the admin API is generated at build time)";
    assert check (builtins.pathExists "${src}/src/main.rs") "buildRustPackage: src has no src/main.rs";
    assert check (all (m: builtins.pathExists "${src}/${m}/Cargo.toml") (cargoToml.workspace.members or [ ]))
      "buildRustPackage: src must hold every workspace member (crates/)";
    assert check (!(builtins.pathExists "${src}/target"))
      "buildRustPackage: src must not include target/";
    assert check (cargoToml.package.name == args.pname)
      "buildRustPackage: pname ${args.pname} != Cargo.toml name ${cargoToml.package.name}";
    assert check ((args.version or null) == cargoToml.package.version)
      "buildRustPackage: version ${toString (args.version or "<unset>")} != Cargo.toml version ${cargoToml.package.version}";
    assert check (lockFile != null) "buildRustPackage: cargoLock.lockFile is required (offline vendoring)";
    assert check (builtins.pathExists lockFile) "buildRustPackage: cargoLock.lockFile ${toString lockFile} does not exist";
    assert check (hasSuffix "Cargo.lock" (toString lockFile))
      "buildRustPackage: cargoLock.lockFile must be a Cargo.lock";
    assert check (!(args ? cargoHash) && !(args ? cargoSha256))
      "buildRustPackage: use cargoLock.lockFile or cargoHash, not both";
    assert check ((args.doCheck or true) == false)
      "buildRustPackage: doCheck must be false (the tests need loopback networking)";
    assert check ((args.meta.mainProgram or null) == "mc-proxy") "buildRustPackage: meta.mainProgram must be \"mc-proxy\"";
    stubDrv "${args.pname}-${args.version}" {
      inherit (args) pname version meta;
      isStaticMusl = true;
    };

  # dockerTools.buildLayeredImage arguments, as documented in nixpkgs
  # (doc/build-helpers/images/dockertools.section.md, streamLayeredImage).
  layeredImageArgs = [
    "name"
    "tag"
    "fromImage"
    "contents"
    "config"
    "architecture"
    "created"
    "mtime"
    "uid"
    "gid"
    "uname"
    "gname"
    "maxLayers"
    "extraCommands"
    "fakeRootCommands"
    "enableFakechroot"
    "includeStorePaths"
    "includeNixDB"
    "passthru"
    "meta"
    "compressor"
  ];
  # OCI image config keys (image-spec config.md, "config" object).
  ociConfigKeys = [
    "User"
    "ExposedPorts"
    "Env"
    "Entrypoint"
    "Cmd"
    "Volumes"
    "WorkingDir"
    "Labels"
    "StopSignal"
    "ArgsEscaped"
    "Memory"
    "MemorySwap"
    "CpuShares"
    "Healthcheck"
  ];
  shells = [
    "bash"
    "bash-interactive"
    "busybox"
    "coreutils"
    "dash"
    "zsh"
  ];

  buildLayeredImage =
    args:
    let
      cfg = args.config or { };
      contents = args.contents or [ ];
      user = cfg.User or "";
      userPart = builtins.head (builtins.split ":" user);
      entry = cfg.Entrypoint or null;
      app = builtins.filter (p: (p.pname or "") == "mc-proxy") contents;
      names = map (p: p.pname or p.name or "") contents;
    in
    assert check (unknown layeredImageArgs (attrNames args) == [ ])
      "buildLayeredImage: unknown argument(s) ${toString (unknown layeredImageArgs (attrNames args))}";
    assert check ((args.name or null) == "mc-proxy") "buildLayeredImage: name must be \"mc-proxy\"";
    assert check (builtins.isString (args.tag or null)) "buildLayeredImage: tag must be a string";
    assert check (builtins.isList contents) "buildLayeredImage: contents must be a list";
    assert check (builtins.length app == 1) "buildLayeredImage: contents must hold the mc-proxy package once";
    assert check ((builtins.head app).isStaticMusl or false)
      "buildLayeredImage: the mc-proxy in contents must be the static (pkgsStatic) build";
    assert check (args.tag == (builtins.head app).version) "buildLayeredImage: tag must be the package version";
    assert check (builtins.elem "cacert" names) "buildLayeredImage: contents must include cacert";
    assert check (!(any (n: builtins.elem n shells) names))
      "buildLayeredImage: no shell in the image (found one of ${toString shells} in contents)";
    assert check (unknown ociConfigKeys (attrNames cfg) == [ ])
      "buildLayeredImage: unknown config key(s) ${toString (unknown ociConfigKeys (attrNames cfg))}";
    assert check (builtins.isList entry && entry != [ ] && all builtins.isString entry)
      "buildLayeredImage: config.Entrypoint must be a non-empty list of strings";
    assert check (hasSuffix "/bin/mc-proxy" (builtins.head entry))
      "buildLayeredImage: config.Entrypoint must start with the mc-proxy binary";
    assert check (
      cfg.Cmd or null == [
        "server"
        "-c"
        "/srv/mc-proxy/mc-proxy.toml"
      ]
    ) "buildLayeredImage: config.Cmd must be [ \"server\" \"-c\" \"/srv/mc-proxy/mc-proxy.toml\" ]";
    assert check (builtins.isString user && user != "") "buildLayeredImage: config.User must be set";
    assert check (
      !(builtins.elem userPart [
        "0"
        "root"
      ])
    ) "buildLayeredImage: config.User must not be root (got \"${user}\")";
    assert check ((cfg.Volumes or { }) ? "/srv/mc-proxy") "buildLayeredImage: config.Volumes must hold /srv/mc-proxy";
    assert check ((cfg.WorkingDir or null) == "/srv/mc-proxy") "buildLayeredImage: config.WorkingDir must be /srv/mc-proxy";
    assert check ((args.created or "1970-01-01T00:00:01Z") != "now")
      "buildLayeredImage: created = \"now\" makes the image non-reproducible";
    assert check (hasInfix "chown ${userPart}" (args.fakeRootCommands or "") && hasInfix "srv/mc-proxy" (args.fakeRootCommands or ""))
      "buildLayeredImage: fakeRootCommands must create /srv/mc-proxy owned by the runtime user";
    stubDrv "${args.name}.tar.gz" {
      imageName = args.name;
      imageTag = args.tag;
    };

  writeTextDir =
    path: text:
    assert check (builtins.isString path && builtins.isString text) "writeTextDir: path and text must be strings";
    stubDrv (baseNameOf path) { pname = baseNameOf path; };

  mkShell =
    args:
    assert check (builtins.isList (args.packages or [ ])) "mkShell: packages must be a list";
    assert check (all (p: p ? outPath) (args.packages or [ ])) "mkShell: packages must be derivations";
    stubDrv (args.name or "nix-shell") { };

  common = {
    inherit
      lib
      system
      writeTextDir
      mkShell
      ;
    dockerTools = {
      inherit buildLayeredImage;
      streamLayeredImage = _: fail "use buildLayeredImage (a tarball in the store), not streamLayeredImage";
    };
    cacert = simplePkg "cacert";
    cargo = simplePkg "cargo";
    rustc = simplePkg "rustc";
    clippy = simplePkg "clippy";
    rustfmt = simplePkg "rustfmt";
    rust-analyzer = simplePkg "rust-analyzer";
    pkg-config = simplePkg "pkg-config";
    sqlite = simplePkg "sqlite";
    openssl = simplePkg "openssl";
    grpcurl = simplePkg "grpcurl";
  };

  pkgsStatic = common // {
    stdenv.hostPlatform = {
      isStatic = true;
      isMusl = true;
    };
    rustPlatform.buildRustPackage = buildRustPackage true;
    callPackage = callPackageWith pkgsStatic;
  };

  pkgs = common // {
    inherit pkgsStatic;
    stdenv.hostPlatform = {
      isStatic = false;
      isMusl = false;
    };
    rustPlatform.buildRustPackage = buildRustPackage false;
    callPackage = callPackageWith pkgs;
  };
in
pkgs
