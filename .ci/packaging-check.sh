#!/usr/bin/env bash
# Packaging checks for mc-proxy. Each check prints one line, PASS or FAIL
# (followed by the tail of its output when it fails); the script exits
# non-zero if any check failed.
#
#   .ci/packaging-check.sh                          lint/validate deploy/, nix/, Containerfile
#   .ci/packaging-check.sh image-check IMAGE [VERSION]
#                                                   check a built image (called by `make image-check`)
#
# Missing tools are installed when running as root: shellcheck, systemd
# (systemd-analyze), nix-bin (Debian apt) and kubernetes-validate (PyPI,
# pinned below). Nothing here needs the mc-proxy binary or a network beyond
# those package registries; nixpkgs is never fetched (see nix/README.md).
set -euo pipefail

repo=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

KUBERNETES_VALIDATE_VERSION=1.37.0
PODMAN=${PODMAN:-podman}

work=$(mktemp -d "${TMPDIR:-/tmp}/mc-proxy-packaging.XXXXXX")
cleanup() {
    # The image check chowns files to 65532; we own the tree, so this works.
    rm -rf "$work"
}
trap cleanup EXIT

passed=0
failed=0
failures=()

# check NAME COMMAND...: run COMMAND in a subshell with `set -e` in force
# (it would be off inside an `if`), output captured; one line out.
check() {
    local name=$1
    shift
    local log rc=0
    log="$work/log.$((passed + failed))"
    set +e
    (
        set -e
        "$@"
    ) >"$log" 2>&1
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        echo "PASS $name"
        # A check that passed another way than asked says so.
        grep -h '^FALLBACK' "$log" | sed -e 's/^/    | /' || true
    else
        failed=$((failed + 1))
        failures+=("$name")
        echo "FAIL $name"
        sed -e 's/^/    | /' "$log" | tail -n 40
    fi
}

note() { printf '  .. %s\n' "$*"; }

# ---------------------------------------------------------------- tools ----

apt_updated=false
apt_install() {
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        note "cannot install $* (not root or no apt-get)"
        return 1
    fi
    if ! $apt_updated; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
        apt_updated=true
    fi
    note "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1
}

ensure_cmd() { # ensure_cmd COMMAND APT-PACKAGE
    command -v "$1" >/dev/null 2>&1 || apt_install "$2" || true
}

have_kubernetes_validate() {
    python3 -c 'import kubernetes_validate, yaml' >/dev/null 2>&1
}

ensure_tools_static() {
    ensure_cmd shellcheck shellcheck
    ensure_cmd systemd-analyze systemd
    ensure_cmd nix nix-bin
    ensure_cmd nix-instantiate nix-bin
    if ! have_kubernetes_validate; then
        note "pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
        python3 -m pip install --quiet --disable-pip-version-check \
            "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >/dev/null 2>&1 || true
    fi
}

# ------------------------------------------------------------ shellcheck ----

check_shellcheck() {
    command -v shellcheck >/dev/null || { echo "shellcheck not installed"; return 1; }
    local files=()
    mapfile -t files < <(find deploy .ci -type f -name '*.sh' | LC_ALL=C sort)
    [ "${#files[@]}" -gt 0 ] || { echo "no *.sh files found"; return 1; }
    printf '%s\n' "${files[@]}"
    shellcheck --severity=style "${files[@]}"
}

# --------------------------------------------------------------- systemd ----

# systemd-analyze verify needs every Exec*= binary to exist, and this machine
# runs no systemd as PID 1. So verify copies of the units whose installed
# paths (/usr/local/...) point at stand-in executables in a temp dir. verify
# only warns (exit 0) on unknown keys or bad values, so any output fails too.
check_systemd_units() {
    command -v systemd-analyze >/dev/null || { echo "systemd-analyze not installed"; return 1; }
    local dir=$work/systemd
    mkdir -p "$dir/units" "$dir/bin"
    cp /bin/true "$dir/bin/mc-proxy"
    cp deploy/scripts/prune-backups.sh "$dir/bin/prune-backups.sh"
    local unit
    for unit in deploy/systemd/*; do
        sed -e "s#/usr/local/bin/mc-proxy#$dir/bin/mc-proxy#g" \
            -e "s#/usr/local/lib/mc-proxy/prune-backups.sh#$dir/bin/prune-backups.sh#g" \
            "$unit" >"$dir/units/${unit##*/}"
    done
    local out
    out=$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify "$dir"/units/* 2>&1) || {
        echo "$out"
        return 1
    }
    if [ -n "$out" ]; then
        echo "$out"
        return 1
    fi
}

# What the contract asks of the units, beyond their syntax.
check_systemd_policy() {
    local svc=deploy/systemd/mc-proxy.service
    local bak=deploy/systemd/mc-proxy-backup.service
    local tmr=deploy/systemd/mc-proxy-backup.timer
    local rc=0 line
    # NotifyAccess=all: the process `systemctl reload` starts (ExecReload,
    # `mc-proxy upgrade`) takes over and sends MAINPID= itself.
    for line in \
        "Type=notify" "NotifyAccess=all" \
        "ExecStart=/usr/local/bin/mc-proxy server -c /srv/mc-proxy/mc-proxy.toml" \
        "ExecReload=/usr/local/bin/mc-proxy upgrade -c /srv/mc-proxy/mc-proxy.toml" \
        "User=mc-proxy" "Group=mc-proxy" \
        "AmbientCapabilities=CAP_NET_BIND_SERVICE" "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" \
        "NoNewPrivileges=true" "ProtectSystem=strict" "ReadWritePaths=/srv/mc-proxy" \
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" "SystemCallFilter=@system-service" \
        "MemoryDenyWriteExecute=true" "UMask=0077" "LimitNOFILE=65536" \
        "Restart=on-failure" "KillSignal=SIGTERM"; do
        grep -qxF -- "$line" "$svc" || { echo "$svc: missing '$line'"; rc=1; }
    done
    # Must stay above the default [proxy] shutdown_timeout (30s).
    local stop
    stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)$/\1/p' "$svc")
    if [ -z "$stop" ] || [ "$stop" -le 30 ]; then
        echo "$svc: TimeoutStopSec must be > 30 (shutdown_timeout), got '${stop}'"
        rc=1
    fi
    for line in "Type=oneshot" "User=mc-proxy" \
        "ExecStart=/usr/local/bin/mc-proxy snapshot -c /srv/mc-proxy/mc-proxy.toml" \
        "ExecStartPost=/usr/local/lib/mc-proxy/prune-backups.sh /srv/mc-proxy/backups 14"; do
        grep -qxF -- "$line" "$bak" || { echo "$bak: missing '$line'"; rc=1; }
    done
    for line in "OnCalendar=daily" "Persistent=true" "RandomizedDelaySec=15m"; do
        grep -qxF -- "$line" "$tmr" || { echo "$tmr: missing '$line'"; rc=1; }
    done
    # Socket activation: the example config's ":443" as one dual-stack
    # socket, for the service.
    local sock=deploy/systemd/mc-proxy.socket
    for line in "ListenStream=443" "BindIPv6Only=both" "Service=mc-proxy.service"; do
        grep -qxF -- "$line" "$sock" || { echo "$sock: missing '$line'"; rc=1; }
    done
    return "$rc"
}

# ----------------------------------------------------------- kubernetes ----

check_kubernetes() {
    have_kubernetes_validate || { echo "kubernetes-validate not installed"; return 1; }
    local files=()
    mapfile -t files < <(find deploy/kubernetes -type f \( -name '*.yaml' -o -name '*.yml' \) | LC_ALL=C sort)
    [ "${#files[@]}" -gt 0 ] || { echo "no manifests in deploy/kubernetes"; return 1; }
    python3 -m kubernetes_validate --strict "${files[@]}"
}

# Contract points of the DaemonSet that schema validation cannot see.
check_kubernetes_policy() {
    python3 - deploy/kubernetes/daemonset.yaml <<'PY'
import sys, tomllib, yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = {d["kind"]: d for d in docs}
errs = []
ds = kinds.get("DaemonSet")
cm = kinds.get("ConfigMap")
if not ds or not cm:
    sys.exit("need a DaemonSet and a ConfigMap")
spec = ds["spec"]["template"]["spec"]
c = [x for x in spec["containers"] if x["name"] == "mc-proxy"][0]
sc = c["securityContext"]
want = {
    "hostNetwork": spec.get("hostNetwork") is True,
    "dnsPolicy ClusterFirstWithHostNet": spec.get("dnsPolicy") == "ClusterFirstWithHostNet",
    "runAsNonRoot": sc.get("runAsNonRoot") is True,
    "runAsUser 65532": sc.get("runAsUser") == 65532,
    "readOnlyRootFilesystem": sc.get("readOnlyRootFilesystem") is True,
    "allowPrivilegeEscalation false": sc.get("allowPrivilegeEscalation") is False,
    "drop ALL": sc["capabilities"].get("drop") == ["ALL"],
    "add NET_BIND_SERVICE only": sc["capabilities"].get("add") == ["NET_BIND_SERVICE"],
    "terminationGracePeriodSeconds > 30": spec.get("terminationGracePeriodSeconds", 30) > 30,
    # A surge rollout: the new pod takes the old one's sockets over (SPEC 6.4).
    "RollingUpdate maxSurge 1": ds["spec"]["updateStrategy"]["rollingUpdate"].get("maxSurge") == 1,
    "RollingUpdate maxUnavailable 0": ds["spec"]["updateStrategy"]["rollingUpdate"].get("maxUnavailable") == 0,
    # Declared ports on hostNetwork are host ports: the surge pod would not fit.
    "no container ports (surge)": not c.get("ports"),
    "readiness via mc-proxy status --expect-pid 1": c["readinessProbe"]["exec"]["command"][:4] == ["mc-proxy", "status", "--expect-pid", "1"],
    "startup via mc-proxy status --expect-pid 1": c["startupProbe"]["exec"]["command"][:4] == ["mc-proxy", "status", "--expect-pid", "1"],
    # Liveness asks whoever answers: an old pod waiting after its handoff
    # must not be restarted (it would take the sockets back).
    "liveness via mc-proxy status (any server)": c["livenessProbe"]["exec"]["command"][:2] == ["mc-proxy", "status"]
        and "--expect-pid" not in c["livenessProbe"]["exec"]["command"],
    "resources": "requests" in c["resources"] and "limits" in c["resources"],
    "hostPath /srv/mc-proxy DirectoryOrCreate": any(
        v.get("hostPath", {}).get("path") == "/srv/mc-proxy"
        and v["hostPath"].get("type") == "DirectoryOrCreate"
        for v in spec["volumes"]
    ),
}
errs += [k for k, ok in want.items() if not ok]
# The embedded config must be valid TOML with the contract's shape.
cfg = tomllib.loads(cm["data"]["mc-proxy.toml"])
if cfg["database"]["path"] != "/srv/mc-proxy/mc-proxy.db":
    errs.append("ConfigMap: database.path must be on the hostPath")
if cfg["grpc"]["addr"] != "unix:/srv/mc-proxy/mc-proxy.sock":
    errs.append("ConfigMap: grpc.addr must be the unix socket in /srv/mc-proxy")
if not cfg["listeners"][0].get("routes"):
    errs.append("ConfigMap: the example listener needs a route")
if errs:
    sys.exit("missing: " + ", ".join(errs))
print("ok")
PY
}

# --------------------------------------------------------------- compose ----

check_compose() {
    python3 - deploy/docker/compose.yaml <<'PY'
import sys, yaml

doc = yaml.safe_load(open(sys.argv[1]))
s = doc["services"]["mc-proxy"]
hc = s.get("healthcheck", {}).get("test", [])
want = {
    "image mc-proxy:<version>": str(s.get("image", "")).startswith("mc-proxy:"),
    "network_mode host": s.get("network_mode") == "host",
    "volume /srv/mc-proxy": "/srv/mc-proxy:/srv/mc-proxy" in s.get("volumes", []),
    "restart unless-stopped": s.get("restart") == "unless-stopped",
    "cap_add NET_BIND_SERVICE": s.get("cap_add") == ["NET_BIND_SERVICE"],
    "read_only": s.get("read_only") is True,
    "user 65532:65532": s.get("user") == "65532:65532",
    "ulimits nofile": "nofile" in s.get("ulimits", {}),
    # FROM scratch has no shell: exec form only.
    "healthcheck exec mc-proxy status": hc[:3] == ["CMD", "mc-proxy", "status"],
    "stop_grace_period 45s": s.get("stop_grace_period") == "45s",
}
bad = [k for k, ok in want.items() if not ok]
if bad:
    sys.exit("compose.yaml: " + ", ".join(bad))
print("ok")
PY
}

# ----------------------------------------------------------- Containerfile --

check_containerfile() {
    local f=Containerfile rc=0 line
    # Only FROM scratch: no registry can be reached, and nothing is needed.
    local froms
    froms=$(grep -iE '^FROM ' "$f" || true)
    if [ -z "$froms" ] || grep -vixq 'FROM scratch' <<<"$froms"; then
        echo "$f: only 'FROM scratch' is allowed"
        rc=1
    fi
    if grep -qiE '^RUN ' "$f"; then
        echo "$f: RUN needs a shell; the image has none"
        rc=1
    fi
    for line in 'USER 65532:65532' 'ENTRYPOINT ["mc-proxy"]' \
        'CMD ["server", "-c", "/srv/mc-proxy/mc-proxy.toml"]' \
        'VOLUME /srv/mc-proxy' 'WORKDIR /srv/mc-proxy' 'ARG VERSION=0.1.0'; do
        grep -qxF -- "$line" "$f" || { echo "$f: missing '$line'"; rc=1; }
    done
    return "$rc"
}

# ------------------------------------------------------------------- nix ----

nix_flags=(--extra-experimental-features 'nix-command flakes')

# Evaluation only, in a local store. Default /nix as root; a private chroot
# store under $work when /nix cannot be written.
nix_setup() {
    # No build users on this machine, and nothing is built.
    export NIX_CONFIG=$'build-users-group =\nsandbox = false\nwarn-dirty = false'
    if ! { [ -w /nix ] || { [ ! -e /nix ] && [ -w / ]; }; }; then
        nix_flags+=(--store "$work/nixstore")
        note "nix: /nix not writable, using --store $work/nixstore"
    fi
}

check_nix_parse() {
    command -v nix-instantiate >/dev/null || { echo "nix-instantiate not installed"; return 1; }
    local files=() f
    mapfile -t files < <(find . \( -path ./target -o -path ./.git \) -prune -o -type f -name '*.nix' -print | LC_ALL=C sort)
    [ "${#files[@]}" -gt 0 ] || { echo "no .nix files"; return 1; }
    for f in "${files[@]}"; do
        echo "$f"
        nix-instantiate --parse "$f" >/dev/null
    done
}

# The flake is evaluated from a copy holding only the files it reads. A git
# checkout flake ("." ) sees only files git tracks (so uncommitted work would
# be invisible), and a "path:." flake would copy target/ (gigabytes) into the
# store. No flake.lock is committed and --no-write-lock-file keeps it so;
# nixpkgs is replaced by the stub, so nothing is fetched.
nix_src=""
nix_prepare_src() {
    [ -n "$nix_src" ] && return 0
    nix_src=$work/flake
    mkdir -p "$nix_src"
    local p
    for p in flake.nix flake.lock nix Cargo.toml Cargo.lock build.rs src crates proto; do
        [ -e "$p" ] && cp -R "$p" "$nix_src/"
    done
}

# Flags for `nix flake show` / `nix eval` on the copy at $1.
stub_flags() {
    printf '%s\n' --offline --no-write-lock-file --override-input nixpkgs "path:$1/nix/ci-stub"
}

check_nix_flake_show() {
    command -v nix >/dev/null || { echo "nix not installed"; return 1; }
    nix_prepare_src
    local flags=()
    mapfile -t flags < <(stub_flags "$nix_src")
    nix "${nix_flags[@]}" flake show "${flags[@]}" "path:$nix_src"
}

check_nix_eval() { # check_nix_eval ATTR
    command -v nix >/dev/null || { echo "nix not installed"; return 1; }
    nix_prepare_src
    local out flags=()
    mapfile -t flags < <(stub_flags "$nix_src")
    out=$(nix "${nix_flags[@]}" eval "${flags[@]}" --raw "path:$nix_src#$1.drvPath")
    echo "$out"
    case $out in
        /nix/store/*.drv) ;;
        *) echo "not a derivation path: $out"; return 1 ;;
    esac
}

# The stub must actually reject mistakes, or the eval checks prove nothing.
# Evaluate mutated copies and expect each to fail with the stub's message.
check_nix_stub_rejects() {
    command -v nix >/dev/null || { echo "nix not installed"; return 1; }
    nix_prepare_src
    local bad=$work/flake-bad rc=0 out
    # Fields: name|file|sed expression|expected stub message|attribute.
    # shellcheck disable=SC2016 # ${...} below is Nix, not shell
    local -a cases=(
        'root User|nix/image.nix|s/User = "${uid}:${gid}";/User = "0:0";/|config.User must not be root|image'
        'non-static build|flake.nix|s/pkgs.pkgsStatic.callPackage/pkgs.callPackage/|must come from pkgsStatic|default'
        'tests enabled|nix/package.nix|s/doCheck = false;/doCheck = true;/|doCheck must be false|default'
        'workspace member left out|nix/package.nix|\#^      ../crates$#d|must hold every workspace member|default'
        'string Entrypoint|nix/image.nix|s#Entrypoint = \[ "${mc-proxy}/bin/mc-proxy" \];#Entrypoint = "${mc-proxy}/bin/mc-proxy";#|Entrypoint must be a non-empty list|image'
    )
    local c name file expr msg attr
    for c in "${cases[@]}"; do
        IFS='|' read -r name file expr msg attr <<<"$c"
        rm -rf "$bad"
        cp -R "$nix_src" "$bad"
        sed -i -e "$expr" "$bad/$file"
        if cmp -s "$nix_src/$file" "$bad/$file"; then
            echo "mutation '$name' did not apply to $file"
            rc=1
            continue
        fi
        local flags=()
        mapfile -t flags < <(stub_flags "$bad")
        if out=$(nix "${nix_flags[@]}" eval "${flags[@]}" \
            --raw "path:$bad#packages.x86_64-linux.$attr.drvPath" 2>&1); then
            echo "stub accepted: $name"
            rc=1
        elif ! grep -qF -- "$msg" <<<"$out"; then
            echo "stub failed for another reason on '$name':"
            echo "$out"
            rc=1
        else
            echo "rejected as expected: $name"
        fi
    done
    return "$rc"
}

# ---------------------------------------------------------------- deploy ----

# Manifest of a tree: path, type, mode, size, mtime, content hash.
tree_manifest() {
    (cd "$1" && find . -printf '%p %y %m %s %T@\n' | LC_ALL=C sort)
    (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
}

check_install_idempotent() {
    local root=$work/install-root bin=$work/fake-mc-proxy
    printf '#!/bin/sh\necho "mc-proxy 0.0.0-fake"\n' >"$bin"
    chmod 0755 "$bin"

    MC_PROXY_ROOT=$root bash deploy/scripts/install.sh "$bin"
    tree_manifest "$root" >"$work/manifest.1"
    # Second run: nothing may change, not even an mtime.
    MC_PROXY_ROOT=$root bash deploy/scripts/install.sh "$bin"
    tree_manifest "$root" >"$work/manifest.2"
    diff -u "$work/manifest.1" "$work/manifest.2"

    local rc=0 f
    for f in usr/local/bin/mc-proxy usr/local/lib/mc-proxy/prune-backups.sh \
        etc/systemd/system/mc-proxy.service etc/systemd/system/mc-proxy.socket \
        etc/systemd/system/mc-proxy-backup.service \
        etc/systemd/system/mc-proxy-backup.timer; do
        [ -f "$root/$f" ] || { echo "not installed: /$f"; rc=1; }
    done
    [ "$(stat -c %a "$root/srv/mc-proxy")" = 700 ] || { echo "/srv/mc-proxy is not 0700"; rc=1; }
    [ "$(stat -c %a "$root/usr/local/bin/mc-proxy")" = 755 ] || { echo "binary is not 0755"; rc=1; }
    if [ -f mc-proxy.toml.example ]; then
        cmp -s mc-proxy.toml.example "$root/srv/mc-proxy/mc-proxy.toml" ||
            { echo "example config not installed"; rc=1; }
        [ "$(stat -c %a "$root/srv/mc-proxy/mc-proxy.toml")" = 600 ] || { echo "config is not 0600"; rc=1; }
    else
        echo "note: no mc-proxy.toml.example in the repo yet; config seeding not exercised"
    fi

    # An operator's config and database survive an upgrade run untouched.
    echo '# operator config' >"$root/srv/mc-proxy/mc-proxy.toml"
    echo 'not really sqlite' >"$root/srv/mc-proxy/mc-proxy.db"
    local before after
    before=$(sha256sum "$root/srv/mc-proxy/mc-proxy.toml" "$root/srv/mc-proxy/mc-proxy.db")
    printf '#!/bin/sh\necho "mc-proxy 0.0.1-fake"\n' >"$bin"
    MC_PROXY_ROOT=$root bash deploy/scripts/install.sh "$bin"
    after=$(sha256sum "$root/srv/mc-proxy/mc-proxy.toml" "$root/srv/mc-proxy/mc-proxy.db")
    [ "$before" = "$after" ] || { echo "install.sh modified an existing config or DB"; rc=1; }
    grep -q '0.0.1-fake' "$root/usr/local/bin/mc-proxy" || { echo "binary not upgraded"; rc=1; }
    return "$rc"
}

check_prune_backups() {
    local dir=$work/backups i rc=0
    mkdir -p "$dir"
    for i in $(seq -w 1 20); do
        : >"$dir/mc-proxy-202501${i}T030000Z.db"
    done
    : >"$dir/unrelated.txt"
    sh deploy/scripts/prune-backups.sh "$dir" 14
    local left
    left=$(find "$dir" -name 'mc-proxy-*.db' | wc -l)
    [ "$left" -eq 14 ] || { echo "expected 14 snapshots left, found $left"; rc=1; }
    [ -e "$dir/mc-proxy-20250120T030000Z.db" ] || { echo "newest snapshot was removed"; rc=1; }
    [ -e "$dir/mc-proxy-20250107T030000Z.db" ] || { echo "14th newest snapshot was removed"; rc=1; }
    [ ! -e "$dir/mc-proxy-20250106T030000Z.db" ] || { echo "15th newest snapshot was kept"; rc=1; }
    [ -e "$dir/unrelated.txt" ] || { echo "a non-snapshot file was removed"; rc=1; }
    sh deploy/scripts/prune-backups.sh "$dir" 14 # again: nothing to do
    sh deploy/scripts/prune-backups.sh "$work/does-not-exist" 14
    if sh deploy/scripts/prune-backups.sh "$dir" abc; then
        echo "a non-numeric KEEP was accepted"
        rc=1
    fi
    return "$rc"
}

# ------------------------------------------------------------ image-check ----

# podman exits 125/126/127 for its own failures (engine, runtime, exec);
# anything else is the container's exit status.
podman_cannot_run() { [ "$1" -ge 125 ] && [ "$1" -le 127 ]; }

run_args=(run --rm --runtime runc --network host
    --ulimit nofile=20000:20000 --ulimit nproc=4096:4096)

image_inspect_config() {
    local image=$1 version=$2 rc=0 got
    got=$($PODMAN image inspect --format '{{json .Config.Entrypoint}}' "$image")
    [ "$got" = '["mc-proxy"]' ] || { echo "Entrypoint: $got"; rc=1; }
    got=$($PODMAN image inspect --format '{{json .Config.Cmd}}' "$image")
    [ "$got" = '["server","-c","/srv/mc-proxy/mc-proxy.toml"]' ] || { echo "Cmd: $got"; rc=1; }
    got=$($PODMAN image inspect --format '{{.Config.User}}' "$image")
    [ "$got" = '65532:65532' ] || { echo "User: $got"; rc=1; }
    got=$($PODMAN image inspect --format '{{json .Config.Volumes}}' "$image")
    [ "$got" = '{"/srv/mc-proxy":{}}' ] || { echo "Volumes: $got"; rc=1; }
    got=$($PODMAN image inspect --format '{{.Config.WorkingDir}}' "$image")
    [ "$got" = '/srv/mc-proxy' ] || { echo "WorkingDir: $got"; rc=1; }
    got=$($PODMAN image inspect --format '{{index .Config.Labels "org.opencontainers.image.version"}}' "$image")
    [ "$got" = "$version" ] || { echo "label version: $got (want $version)"; rc=1; }
    got=$($PODMAN image inspect --format '{{.Created}}' "$image")
    case $got in 1970-01-01*) ;; *) echo "Created: $got (want the epoch)"; rc=1 ;; esac
    return "$rc"
}

# Export the image's file system (no container is started) to $work/rootfs.
image_export() {
    local image=$1 cid
    [ -d "$work/rootfs" ] && return 0
    cid=$($PODMAN create "$image")
    $PODMAN export -o "$work/rootfs.tar" "$cid"
    $PODMAN rm "$cid" >/dev/null
    mkdir -p "$work/rootfs"
    tar -xf "$work/rootfs.tar" -C "$work/rootfs" --no-same-owner
}

image_files() {
    local image=$1 rc=0
    image_export "$image"
    tar --numeric-owner -tvf "$work/rootfs.tar" | LC_ALL=C sort -k6 >"$work/rootfs.list"
    cat "$work/rootfs.list"
    local f
    for f in usr/local/bin/mc-proxy etc/passwd etc/group etc/ssl/certs/ca-certificates.crt; do
        [ -f "$work/rootfs/$f" ] || { echo "missing /$f"; rc=1; }
    done
    [ -d "$work/rootfs/srv/mc-proxy" ] || { echo "missing /srv/mc-proxy"; rc=1; }
    grep -qE '^drwx------ 65532/65532 .* srv/mc-proxy/?$' "$work/rootfs.list" ||
        { echo "/srv/mc-proxy is not 0700 65532:65532"; rc=1; }
    grep -q '^mcproxy:x:65532:65532:' "$work/rootfs/etc/passwd" || { echo "no mcproxy in /etc/passwd"; rc=1; }
    for f in bin/sh usr/bin/sh bin/busybox; do
        [ ! -e "$work/rootfs/$f" ] || { echo "the image has a shell: /$f"; rc=1; }
    done
    [[ $(file -b "$work/rootfs/usr/local/bin/mc-proxy") == *'statically linked'* ]] ||
        { echo "the binary is not statically linked"; rc=1; }
    return "$rc"
}

image_version() {
    local image=$1 version=$2 out rc=0
    out=$($PODMAN "${run_args[@]}" "$image" --version 2>&1) || rc=$?
    if [ "$rc" -ne 0 ] && podman_cannot_run "$rc"; then
        echo "podman run failed ($rc): $out"
        echo "FALLBACK: containers cannot run here; running the image's binary from its exported file system"
        image_export "$image"
        out=$("$work/rootfs/usr/local/bin/mc-proxy" --version 2>&1) || { echo "$out"; return 1; }
    elif [ "$rc" -ne 0 ]; then
        echo "$out"
        return 1
    fi
    echo "$out"
    case $out in
        "mc-proxy $version"*) ;;
        *) echo "want 'mc-proxy $version...'"; return 1 ;;
    esac
}

image_config_check() {
    local image=$1 out rc=0
    [ -f mc-proxy.toml.example ] || { echo "mc-proxy.toml.example is missing"; return 1; }
    local state=$work/state
    mkdir -p "$state"
    cp mc-proxy.toml.example "$state/mc-proxy.toml"
    chmod 0700 "$state"
    chmod 0600 "$state/mc-proxy.toml"
    chown -R 65532:65532 "$state" 2>/dev/null || chmod -R a+rwX "$state"
    out=$($PODMAN "${run_args[@]}" -v "$state:/srv/mc-proxy" "$image" \
        check -c /srv/mc-proxy/mc-proxy.toml 2>&1) || rc=$?
    if [ "$rc" -ne 0 ] && podman_cannot_run "$rc"; then
        echo "podman run failed ($rc): $out"
        echo "FALLBACK: containers cannot run here; checking the config with the image's binary on the host"
        image_export "$image"
        local cfg=$work/check.toml
        # The example names /srv/mc-proxy paths; point them at the copy.
        sed "s#/srv/mc-proxy#$state#g" mc-proxy.toml.example >"$cfg"
        rc=0
        out=$("$work/rootfs/usr/local/bin/mc-proxy" check -c "$cfg" 2>&1) || rc=$?
    fi
    echo "$out"
    return "$rc"
}

# Two containers of the image on one state volume (SPEC 6.4): the second
# takes the first one's sockets over; the first, PID 1 of its container,
# drains and waits (no exit for a restart policy to undo) until stopped,
# then exits 0; only the serving container's `status --expect-pid 1` passes.
image_handoff() {
    local image=$1 rc=0 out
    local state=$work/handoff-state port=18553
    mkdir -p "$state"
    cat >"$state/mc-proxy.toml" <<TOML
[database]
path = "/srv/mc-proxy/mc-proxy.db"

[[listeners]]
addr = "127.0.0.1:$port"

  [[listeners.routes]]
  hostname = "a.test"
  backend = "127.0.0.1:9"

[grpc]
addr = "unix:/srv/mc-proxy/mc-proxy.sock"
TOML
    chmod 0700 "$state"
    chmod 0600 "$state/mc-proxy.toml"
    chown -R 65532:65532 "$state" 2>/dev/null || chmod -R a+rwX "$state"
    local args=(run -d --runtime runc --network host
        --ulimit nofile=20000:20000 --ulimit nproc=4096:4096
        -v "$state:/srv/mc-proxy" "$image")
    local old new
    old=$($PODMAN "${args[@]}" 2>&1) || {
        local code=$?
        if podman_cannot_run "$code"; then
            echo "podman run failed ($code): $old"
            echo "FALLBACK unavailable: the handoff between containers needs containers"
        fi
        echo "$old"
        return 1
    }
    # shellcheck disable=SC2317 # called through trap
    cleanup_handoff() { $PODMAN rm -f "$old" "${new:-}" >/dev/null 2>&1 || true; }
    trap cleanup_handoff RETURN
    wait_log() { # CONTAINER TEXT: up to 20 s
        local i
        for i in $(seq 1 100); do
            $PODMAN logs "$1" 2>&1 | grep -qF -- "$2" && return 0
            sleep 0.2
        done
        echo "no '$2' in the log of $1:"
        $PODMAN logs "$1" 2>&1 | tail -n 20
        return 1
    }
    wait_log "$old" "handoff socket listening" || return 1
    $PODMAN exec "$old" mc-proxy status --expect-pid 1 >/dev/null ||
        { echo "the first container's probe failed before the handoff"; rc=1; }
    new=$($PODMAN "${args[@]}" 2>&1) || { echo "$new"; return 1; }
    wait_log "$new" "handoff: took over" || rc=1
    wait_log "$old" "handed off and drained; waiting for SIGTERM" || rc=1
    sleep 1
    [ "$($PODMAN inspect --format '{{.State.Running}}' "$old")" = true ] ||
        { echo "the old container exited after the handoff"; rc=1; }
    out=$($PODMAN exec "$old" mc-proxy status --expect-pid 1 2>&1) &&
        { echo "the old container's probe passed after the handoff: $out"; rc=1; }
    echo "old container's probe: $out"
    $PODMAN exec "$new" mc-proxy status --expect-pid 1 ||
        { echo "the new container's probe failed"; rc=1; }
    $PODMAN stop -t 20 "$old" >/dev/null
    out=$($PODMAN inspect --format '{{.State.ExitCode}}' "$old")
    [ "$out" = 0 ] || { echo "the old container exited $out"; rc=1; }
    # The listener is still there, served by the new container.
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "127.0.0.1:$port refused after the old container stopped"
        rc=1
    fi
    [ "$($PODMAN inspect --format '{{.State.Running}}' "$new")" = true ] ||
        { echo "the new container is not running"; rc=1; }
    $PODMAN stop -t 20 "$new" >/dev/null
    out=$($PODMAN inspect --format '{{.State.ExitCode}}' "$new")
    [ "$out" = 0 ] || { echo "the new container exited $out"; rc=1; }
    return "$rc"
}

image_check_main() {
    local image=${1:?usage: packaging-check.sh image-check IMAGE [VERSION]}
    local version=${2:-$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)}
    command -v "$PODMAN" >/dev/null || apt_install podman || true
    command -v runc >/dev/null || apt_install runc || true
    check "image config (Entrypoint, Cmd, User, Volumes, WorkingDir, labels, created)" \
        image_inspect_config "$image" "$version"
    check "image files (static binary, passwd/group, CA bundle, /srv/mc-proxy 0700 65532, no shell)" \
        image_files "$image"
    check "image runs: mc-proxy --version" image_version "$image" "$version"
    check "image runs: mc-proxy check on mc-proxy.toml.example" image_config_check "$image"
    check "image: a second container takes over from the first (handoff); the first waits, then exits 0" \
        image_handoff "$image"
}

# ------------------------------------------------------------------ main ----

main_static() {
    ensure_tools_static
    nix_setup
    nix_prepare_src
    check "shellcheck deploy/**/*.sh .ci/**/*.sh" check_shellcheck
    check "systemd-analyze verify deploy/systemd/*" check_systemd_units
    check "systemd units: contract settings" check_systemd_policy
    check "kubernetes-validate --strict deploy/kubernetes/*.yaml" check_kubernetes
    check "kubernetes: DaemonSet contract settings and ConfigMap TOML" check_kubernetes_policy
    check "compose.yaml: contract settings" check_compose
    check "Containerfile: scratch, non-root, entrypoint/cmd/volume" check_containerfile
    check "install.sh: twice into a temp root, idempotent, keeps config and DB" check_install_idempotent
    check "prune-backups.sh: keeps the newest 14" check_prune_backups
    check "nix-instantiate --parse **/*.nix" check_nix_parse
    check "nix flake show (nixpkgs = nix/ci-stub)" check_nix_flake_show
    check "nix eval packages.x86_64-linux.default.drvPath" check_nix_eval packages.x86_64-linux.default
    check "nix eval packages.x86_64-linux.image.drvPath" check_nix_eval packages.x86_64-linux.image
    check "nix eval devShells.x86_64-linux.default.drvPath" check_nix_eval devShells.x86_64-linux.default
    check "nix ci-stub rejects a root user, a dynamic build, doCheck, a string Entrypoint, a source without crates/" check_nix_stub_rejects
}

case ${1:-} in
    "") main_static ;;
    image-check)
        shift
        image_check_main "$@"
        ;;
    -h | --help)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0 [image-check IMAGE [VERSION]]" >&2
        exit 2
        ;;
esac

echo "$passed passed, $failed failed"
if [ "$failed" -gt 0 ]; then
    printf 'failed: %s\n' "${failures[@]}"
    exit 1
fi
