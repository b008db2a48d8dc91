#!/usr/bin/env bash
# Installs what Tessera's real-guest tests need (tests/src/guest.rs):
#   qemu-system-x86_64 (TCG guests), qemu-storage-daemon (the reference
#   vhost-user-blk server), a Debian kernel with its modules, busybox-static.
# Idempotent: does nothing (not even `apt-get update`) when all is present.
# Run as root (or with sudo available).
#
# Version pinning: the machines ship qemu-utils 10.x from bookworm-backports,
# which Breaks qemu-system-common (<< 1:8.0) -- i.e. bookworm's own 7.2
# qemu-system packages cannot be installed beside it. So the qemu packages come
# from bookworm-backports (same source version as qemu-utils), while the kernel
# and busybox come from bookworm itself.
set -euo pipefail

SUDO=
if [ "$(id -u)" != 0 ]; then
    SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive

have_kernel() {
    local v
    for d in /lib/modules/*/; do
        [ -d "$d" ] || continue
        v=$(basename "$d")
        [ -e "/boot/vmlinuz-$v" ] && return 0
    done
    return 1
}

all_present() {
    command -v qemu-system-x86_64 >/dev/null &&
        command -v qemu-storage-daemon >/dev/null &&
        [ -x /bin/busybox ] && dpkg -s busybox-static >/dev/null 2>&1 &&
        command -v xz >/dev/null && command -v zstd >/dev/null &&
        have_kernel
}

if all_present; then
    echo "install-test-deps: everything is already installed"
    exit 0
fi

# Is the installed qemu-utils a backport? Then qemu-system-* must be too.
QEMU_FROM=""
if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q 'bpo12'; then
    QEMU_FROM=bookworm-backports
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # Use the mirror the machine already uses for bookworm itself.
        MIRROR=$(
            {
                grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
                grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}'
            } | grep -v -- '-security' | head -n 1
        )
        if [ -z "$MIRROR" ]; then
            echo "install-test-deps: cannot find the Debian mirror in the apt sources" >&2
            exit 1
        fi
        $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
fi

$SUDO apt-get update

# qemu-storage-daemon: in qemu-utils since QEMU 8.0 (before: qemu-system-common).
QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-utils)
if [ -n "$QEMU_FROM" ]; then
    # -t: qemu and whatever it needs at matching versions (qemu-system-data,
    # seabios, ...) from backports. The kernel and busybox stay on bookworm.
    $SUDO apt-get install -y --no-install-recommends -t "$QEMU_FROM" "${QEMU_PKGS[@]}"
else
    $SUDO apt-get install -y --no-install-recommends "${QEMU_PKGS[@]}"
fi
$SUDO apt-get install -y --no-install-recommends \
    linux-image-amd64 \
    busybox-static \
    xz-utils \
    zstd

if ! all_present; then
    echo "install-test-deps: something is still missing after apt-get install" >&2
    exit 1
fi
echo "install-test-deps: done"
