#!/bin/sh
# Keep the newest KEEP mc-proxy snapshots in DIR and delete the rest.
#
#   prune-backups.sh [DIR] [KEEP]     defaults: /srv/mc-proxy/backups 14
#
# Snapshot names are mc-proxy-<UTC YYYYMMDDTHHMMSSZ>.db, so the lexical order
# is the chronological order. Only files matching that pattern are touched.
set -eu

dir=${1:-/srv/mc-proxy/backups}
keep=${2:-14}

case $keep in
    '' | *[!0-9]*)
        echo "prune-backups: KEEP must be a non-negative integer, got '$keep'" >&2
        exit 2
        ;;
esac

if [ ! -d "$dir" ]; then
    echo "prune-backups: $dir does not exist; nothing to prune"
    exit 0
fi

# Count the snapshots, newest last (the glob expands sorted).
total=0
for f in "$dir"/mc-proxy-*.db; do
    [ -f "$f" ] || continue
    total=$((total + 1))
done

remove=$((total - keep))
if [ "$remove" -le 0 ]; then
    echo "prune-backups: $total snapshot(s) in $dir, keeping all (limit $keep)"
    exit 0
fi

n=0
for f in "$dir"/mc-proxy-*.db; do
    [ -f "$f" ] || continue
    [ "$n" -lt "$remove" ] || break
    rm -f -- "$f"
    echo "prune-backups: removed $f"
    n=$((n + 1))
done
echo "prune-backups: kept the newest $keep of $total snapshot(s) in $dir"
