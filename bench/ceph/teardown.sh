#!/usr/bin/env bash
# Stops the Ceph daemons bench/ceph/setup.sh started under DIR (by the pids
# in their pid files: SIGTERM, SIGKILL after 10 s) and removes DIR.
#
#   bash bench/ceph/teardown.sh DIR
set -uo pipefail

DIR=${1:?usage: teardown.sh DIR}
[ -d "$DIR" ] || exit 0
DIR=$(cd "$DIR" && pwd)
pids=()
for f in "$DIR"/run/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    # Only a Ceph daemon of ours (its command line names this DIR's config).
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$DIR/ceph.conf"; then
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    fi
done
for _ in $(seq 100); do
    alive=0
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null && alive=1
    done
    [ $alive -eq 0 ] && break
    sleep 0.1
done
for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
done
rm -rf "$DIR"
