#!/usr/bin/env bash
# Install mc-proxy on a systemd host. Idempotent: run it again to upgrade.
#
#   sudo deploy/scripts/install.sh [--root DIR] [BINARY]
#
# BINARY defaults to target/x86_64-unknown-linux-musl/release/mc-proxy (the
# output of `make static`) in the checkout this script belongs to.
#
# What it does:
#   - system group and user `mc-proxy` (no home, no login shell)
#   - /srv/mc-proxy (0700) and /srv/mc-proxy/backups (0700), owned by mc-proxy
#   - the binary to /usr/local/bin/mc-proxy (replaced only if it changed)
#   - prune-backups.sh to /usr/local/lib/mc-proxy/
#   - units to /etc/systemd/system/: mc-proxy.service, mc-proxy.socket
#     (installed, not enabled: socket activation is opt-in, see the unit),
#     mc-proxy-backup.service, mc-proxy-backup.timer
#   - /srv/mc-proxy/mc-proxy.toml from mc-proxy.toml.example, ONLY if no
#     config exists. An existing config or database is never touched.
#   - systemctl daemon-reload, enable mc-proxy.service and
#     mc-proxy-backup.timer, only when systemd is the running init.
#   - the upgrade: if mc-proxy is running and the binary or its unit
#     changed, `systemctl reload mc-proxy`, whose ExecReload is
#     `mc-proxy upgrade`: a new process of the new binary takes the
#     listening sockets over (a handoff) and the old one drains and exits;
#     no connection is refused. A failed new process leaves the old one
#     serving and the reload fails (this script then exits non-zero).
#     A stopped service is not started: do that yourself.
#
# Testing: with --root DIR (or MC_PROXY_ROOT=DIR) every path is put under DIR
# and the user creation, chown and systemctl steps are skipped, so it runs
# unprivileged in CI.
set -euo pipefail

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd -- "$script_dir/../.." && pwd)

root=${MC_PROXY_ROOT:-}
binary=""

usage() {
    sed -n '2,4p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case $1 in
        --root)
            [ $# -ge 2 ] || { echo "install.sh: --root needs a directory" >&2; exit 2; }
            root=$2
            shift 2
            ;;
        --root=*)
            root=${1#--root=}
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*)
            echo "install.sh: unknown option $1" >&2
            usage >&2
            exit 2
            ;;
        *)
            [ -z "$binary" ] || { echo "install.sh: only one BINARY argument" >&2; exit 2; }
            binary=$1
            shift
            ;;
    esac
done

binary=${binary:-$repo_dir/target/x86_64-unknown-linux-musl/release/mc-proxy}
root=${root%/}

user=mc-proxy
group=mc-proxy
srv_dir=$root/srv/mc-proxy
bin_dir=$root/usr/local/bin
lib_dir=$root/usr/local/lib/mc-proxy
unit_dir=$root/etc/systemd/system
config=$srv_dir/mc-proxy.toml
example=$repo_dir/mc-proxy.toml.example
units=(mc-proxy.service mc-proxy.socket mc-proxy-backup.service mc-proxy-backup.timer)

log() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

# Test mode (a root prefix): no accounts, no ownership changes, no systemctl.
test_mode=false
[ -n "$root" ] && test_mode=true

if ! $test_mode && [ "$(id -u)" -ne 0 ]; then
    die "must run as root (or pass --root DIR to install into a staging tree)"
fi

[ -f "$binary" ] || die "binary not found: $binary (run 'make static' or pass its path)"
[ -x "$binary" ] || die "binary is not executable: $binary"

# install_file MODE SRC DST: copy only when the content or mode differs, so a
# second run changes nothing (not even mtimes). Sets changed=true when it
# copied.
changed=false
install_file() {
    local mode=$1 src=$2 dst=$3
    if [ -f "$dst" ] && cmp -s "$src" "$dst" && [ "$(stat -c %a "$dst")" = "${mode#0}" ]; then
        log "unchanged  $dst"
        return 0
    fi
    changed=true
    install -D -m "$mode" "$src" "$dst"
    log "installed  $dst"
}

# ensure_dir MODE DIR: create if missing and (re)set the mode and, outside
# test mode, the owner.
ensure_dir() {
    local mode=$1 dir=$2
    if [ -d "$dir" ]; then
        log "exists     $dir"
    else
        log "created    $dir"
    fi
    install -d -m "$mode" "$dir"
    chmod "$mode" "$dir"
    if ! $test_mode; then
        chown "$user:$group" "$dir"
    fi
}

# 1. Account.
if $test_mode; then
    log "test mode (root $root): skipping user/group creation"
else
    nologin=/usr/sbin/nologin
    [ -x "$nologin" ] || nologin=/sbin/nologin
    if getent group "$group" >/dev/null; then
        log "exists     group $group"
    else
        groupadd --system "$group"
        log "created    group $group"
    fi
    if getent passwd "$user" >/dev/null; then
        log "exists     user $user"
    else
        useradd --system --no-create-home --home-dir /srv/mc-proxy \
            --gid "$group" --shell "$nologin" --comment "mc-proxy SNI proxy" "$user"
        log "created    user $user"
    fi
fi

# 2. State directory. The database and snapshots live here; never removed.
ensure_dir 0700 "$srv_dir"
ensure_dir 0700 "$srv_dir/backups"

# 3. Binary and helper. (`install` replaces the file, so a running binary
# is not written over: the running process keeps its own copy.)
install_file 0755 "$binary" "$bin_dir/mc-proxy"
upgrade=$changed
install_file 0755 "$script_dir/prune-backups.sh" "$lib_dir/prune-backups.sh"

# 4. Units.
changed=false
install_file 0644 "$repo_dir/deploy/systemd/mc-proxy.service" "$unit_dir/mc-proxy.service"
$changed && upgrade=true
for unit in "${units[@]}"; do
    [ "$unit" = mc-proxy.service ] && continue
    install_file 0644 "$repo_dir/deploy/systemd/$unit" "$unit_dir/$unit"
done

# 5. Example config, only if there is no config at all.
if [ -e "$config" ]; then
    log "kept       $config (existing config is never overwritten)"
elif [ -f "$example" ]; then
    install -m 0600 "$example" "$config"
    $test_mode || chown "$user:$group" "$config"
    log "installed  $config (from mc-proxy.toml.example: edit it before starting)"
else
    log "warning: no $config and no $example to seed it from; write one before starting"
fi

# 6. systemd.
if $test_mode; then
    log "test mode: skipping systemctl"
elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload
    systemctl enable mc-proxy.service mc-proxy-backup.timer
    log "enabled    mc-proxy.service mc-proxy-backup.timer"
    if systemctl is-active --quiet mc-proxy.service; then
        if $upgrade; then
            # ExecReload= is `mc-proxy upgrade`: a handoff to the new binary.
            log "upgrading  mc-proxy.service (systemctl reload: the new binary takes the sockets over)"
            systemctl reload mc-proxy.service ||
                die "the new binary did not take over; the running one still serves (journalctl -u mc-proxy)"
            log "upgraded   mc-proxy.service"
        else
            log "unchanged  mc-proxy.service (running; nothing to upgrade)"
        fi
    else
        log "next: edit $config, then 'systemctl start mc-proxy mc-proxy-backup.timer'"
    fi
else
    log "systemd is not running here: skipped daemon-reload/enable"
fi

log "done"
