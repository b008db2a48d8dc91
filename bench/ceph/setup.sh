#!/usr/bin/env bash
# A 3-replica Ceph RBD image on this machine, for blkbench's `ceph` system
# (shared/notes/ceph-peer.md): one monitor, one manager, three BlueStore OSDs
# on files, all on 127.0.0.1, everything under DIR.
#
#   bash bench/ceph/setup.sh DIR SIZE_BYTES
#
# Installs Debian's ceph-mon, ceph-mgr, ceph-osd, ceph-common and QEMU's rbd
# block module (qemu-block-extra, same version as the installed QEMU) when
# missing. Progress goes to stderr; stdout gets key=value lines for blkbench:
# conf=, pool=, image=, and daemon=NAME:PID for each daemon. Stop it with
# bench/ceph/teardown.sh DIR.
#
# Environment: CEPH_OSD_BLOCK_GIB (default 10, less when the file system
# would keep under 20 GiB free): size of each OSD's zero-filled block file.
set -euo pipefail

DIR=${1:?usage: setup.sh DIR SIZE_BYTES}
SIZE=${2:?usage: setup.sh DIR SIZE_BYTES}
BLOCK_GIB=${CEPH_OSD_BLOCK_GIB:-10}
POOL=bench
IMAGE=bench
log() { echo "ceph: $*" >&2; }

# --- packages
need=()
for p in ceph-mon ceph-mgr ceph-osd ceph-common; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
qemu_ver=$(dpkg-query -W -f='${Version}' qemu-system-common 2>/dev/null || true)
if ! dpkg -s qemu-block-extra >/dev/null 2>&1 && [ -n "$qemu_ver" ]; then
    need+=("qemu-block-extra=$qemu_ver")
fi
mkdir -p "$DIR"
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]} (log: $DIR/apt.log)"
    apt-get update -qq >"$DIR/apt.log" 2>&1 || true
    # "Failed to connect to bus" from the packages' scripts is harmless here.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >>"$DIR/apt.log" 2>&1; then
        tail -n 20 "$DIR/apt.log" >&2
        exit 1
    fi
fi
# The packages' own units (if systemd runs) must not hold our ports.
for u in ceph-mon.target ceph-mgr.target ceph-osd.target ceph.target; do
    systemctl stop "$u" >/dev/null 2>&1 || true
done

# --- configuration (must exist before the monitor is created)
mkdir -p "$DIR"/{run,log}
DIR=$(cd "$DIR" && pwd)
avail_gib=$(df --output=avail -BG "$DIR" | tail -n 1 | tr -dc 0-9)
if [ -z "${CEPH_OSD_BLOCK_GIB:-}" ] && [ $((3 * BLOCK_GIB + 20)) -gt "${avail_gib:-0}" ]; then
    BLOCK_GIB=$(((avail_gib - 20) / 3))
    [ "$BLOCK_GIB" -ge 3 ] || { log "only ${avail_gib} GiB free: not enough for 3 OSDs"; exit 1; }
    log "only ${avail_gib} GiB free: ${BLOCK_GIB} GiB block files"
fi
CONF=$DIR/ceph.conf
FSID=$(cat /proc/sys/kernel/random/uuid)
export CEPH_CONF=$CONF
cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon initial members = a
mon host = [v2:127.0.0.1:3300,v1:127.0.0.1:6789]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
osd crush chooseleaf type = 0
osd pool default size = 3
osd pool default min size = 2
osd pool default pg autoscale mode = off
osd memory target = 1610612736
bluestore debug enforce settings = ssd
mon data avail warn = 5
auth allow insecure global id reclaim = false
mon allow pool delete = true
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
keyring = $DIR/\$name.keyring
mon data = $DIR/mon.\$id
mgr data = $DIR/mgr.\$id
osd data = $DIR/osd.\$id
EOF

# --- monitor
log "monitor"
ceph-authtool --create-keyring "$DIR/mon.a.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$DIR/client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$DIR/mon.a.keyring" --import-keyring "$DIR/client.admin.keyring" >/dev/null
monmaptool --create --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' --fsid "$FSID" "$DIR/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.a.keyring"
ceph-mon -c "$CONF" -i a
for _ in $(seq 60); do
    ceph -c "$CONF" --connect-timeout 5 mon stat >/dev/null 2>&1 && break
    sleep 1
done
ceph -c "$CONF" mon enable-msgr2 >/dev/null 2>&1 || true

# --- manager
log "manager"
ceph -c "$CONF" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$DIR/mgr.x.keyring"
mkdir -p "$DIR/mgr.x"
ceph-mgr -c "$CONF" -i x

# --- three OSDs on zero-filled block files
for _ in 0 1 2; do
    uuid=$(cat /proc/sys/kernel/random/uuid)
    secret=$(ceph-authtool --gen-print-key)
    id=$(echo "{\"cephx_secret\": \"$secret\"}" | ceph -c "$CONF" osd new "$uuid" -i -)
    log "osd.$id: zero-filling a $BLOCK_GIB GiB block file"
    mkdir -p "$DIR/osd.$id"
    dd if=/dev/zero of="$DIR/osd.$id/block" bs=4M count=$((BLOCK_GIB * 256)) status=none
    ceph-authtool --create-keyring "$DIR/osd.$id.keyring" --name "osd.$id" --add-key "$secret" >/dev/null
    ceph-osd -c "$CONF" -i "$id" --mkfs --osd-uuid "$uuid" 2>&1 | tail -n 3 >&2
    ceph-osd -c "$CONF" -i "$id"
done
log "waiting for 3 OSDs up"
for _ in $(seq 120); do
    up=$(ceph -c "$CONF" osd stat -f json 2>/dev/null | sed -n 's/.*"num_up_osds":\([0-9]*\).*/\1/p')
    [ "${up:-0}" -ge 3 ] && break
    sleep 1
done
[ "${up:-0}" -ge 3 ] || { log "only ${up:-0} OSDs up"; exit 1; }

# --- pool and image
log "pool $POOL (64 PGs, size 3, min_size 2), image $IMAGE ($SIZE bytes)"
ceph -c "$CONF" osd pool create "$POOL" 64 64 replicated --autoscale-mode=off >&2
ceph -c "$CONF" osd pool set "$POOL" size 3 --yes-i-really-mean-it >&2
ceph -c "$CONF" osd pool set "$POOL" min_size 2 >&2
rbd -c "$CONF" pool init "$POOL"
rbd -c "$CONF" create "$POOL/$IMAGE" --size "$((SIZE / 1048576))M"
log "waiting for every PG active+clean"
for _ in $(seq 120); do
    st=$(ceph -c "$CONF" pg stat 2>/dev/null || true)
    if echo "$st" | grep -q "active+clean" &&
        ! echo "$st" | grep -qE "peering|creating|activating|unknown|undersized|degraded|inactive"; then
        break
    fi
    sleep 1
done
log "$st"
log "$(ceph -c "$CONF" health 2>&1)"

echo "conf=$CONF"
echo "pool=$POOL"
echo "image=$IMAGE"
for f in "$DIR"/run/*.pid; do
    name=$(basename "$f" .pid)
    echo "daemon=$name:$(cat "$f")"
done
