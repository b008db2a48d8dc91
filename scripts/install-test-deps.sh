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
# and busybox come from bookworm itself. A fresh machine does not list
# bookworm-backports: it is added on the mirror the machine uses for bookworm.
#
# The apt sources may be in either of the forms Debian ships, or both:
# deb822 files (/etc/apt/sources.list.d/*.sources: `Types:`, `URIs:`,
# `Suites:`, `Components:` stanzas; a fresh Debian 12 has only these) and
# one-line entries (/etc/apt/sources.list, sources.list.d/*.list).
#
#   install-test-deps.sh              install what is missing
#   install-test-deps.sh --apt-plan   only print what the apt sources say:
#                                     `mirror: URI` and `backports: present|add`
#
# APT_ETC (default /etc/apt) is the apt directory read and written; the tests
# (scripts/test-install-deps.sh) point it at fixture directories.
set -euo pipefail
set -E # the ERR trap also fires inside functions and command substitutions

trap 'echo "install-test-deps: failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

APT_ETC=${APT_ETC:-/etc/apt}
RELEASE=bookworm

die() {
    echo "install-test-deps: $*" >&2
    exit 1
}

# Prints one line per (type, URI, suite) that the one-line entries of file $1
# enable: "TYPE URI SUITE [COMPONENT...]". Comments and options ([arch=...],
# [ signed-by=... ]) are skipped.
one_line_entries() {
    local line type uri suite
    local -a words
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%%#*}
        read -r -a words <<<"$line" || true
        [ "${#words[@]}" -ge 3 ] || continue
        type=${words[0]}
        case $type in
        deb | deb-src) ;;
        *) continue ;;
        esac
        words=("${words[@]:1}")
        if [[ ${words[0]} == \[* ]]; then
            # Options: up to the word that ends with ']'.
            while [ "${#words[@]}" -gt 0 ] && [[ ${words[0]} != *\] ]]; do
                words=("${words[@]:1}")
            done
            [ "${#words[@]}" -gt 0 ] || continue
            words=("${words[@]:1}")
        fi
        [ "${#words[@]}" -ge 2 ] || continue
        uri=${words[0]}
        suite=${words[1]}
        echo "$type $uri $suite ${words[*]:2}"
    done <"$1"
}

# Prints the entries of the deb822 stanzas of file $1 that are enabled, in
# the same form as one_line_entries: one line per type x URI x suite (a stanza
# may list several of each on one line, or fold them over continuation lines).
deb822_entries() {
    local line field value last=""
    local types="" uris="" suites="" comps="" enabled=yes

    emit_stanza() {
        local t u s
        case ${enabled,,} in
        no | false | 0) ;;
        *)
            for t in $types; do
                for u in $uris; do
                    for s in $suites; do
                        echo "$t $u $s $comps"
                    done
                done
            done
            ;;
        esac
        types="" uris="" suites="" comps="" enabled=yes last=""
    }

    while IFS= read -r line || [ -n "$line" ]; do
        case $line in
        '#'*) continue ;;
        '' | *[![:space:]]*) ;;
        *) line="" ;; # whitespace only: a stanza separator
        esac
        if [ -z "$line" ]; then
            emit_stanza
            continue
        fi
        if [[ $line == [[:space:]]* ]]; then
            # Continuation of the previous field.
            value=$line
            field=$last
        else
            field=${line%%:*}
            value=${line#*:}
            [ "$field" != "$line" ] || continue # not a field: ignore
            field=${field,,}
            last=$field
        fi
        case $field in
        types) types="$types $value" ;;
        uris) uris="$uris $value" ;;
        suites) suites="$suites $value" ;;
        components) comps="$comps $value" ;;
        enabled) read -r enabled <<<"$value" || true ;;
        esac
    done <"$1"
    emit_stanza
}

# Every entry the apt sources under directory $1 enable, in apt's order
# (sources.list, then sources.list.d/ by name).
apt_entries() {
    local dir=$1 f
    if [ -f "$dir/sources.list" ]; then
        one_line_entries "$dir/sources.list"
    fi
    for f in "$dir"/sources.list.d/*; do
        [ -f "$f" ] || continue
        case $f in
        *.list) one_line_entries "$f" ;;
        *.sources) deb822_entries "$f" ;;
        esac
    done
}

# Prints the Debian mirror the sources under $1 use for $RELEASE itself (a
# `deb` entry of suite $RELEASE with component main; security archives
# skipped). Fails, saying why, when there is none.
debian_mirror() {
    local dir=$1 entries type uri suite comps
    if [ ! -d "$dir" ]; then
        echo "install-test-deps: no apt directory at $dir" >&2
        return 1
    fi
    entries=$(apt_entries "$dir")
    while read -r type uri suite comps; do
        [ "$type" = deb ] && [ "$suite" = "$RELEASE" ] || continue
        [[ " $comps " == *" main "* ]] || continue
        case $uri in
        *-security*) continue ;;
        esac
        echo "${uri%/}"
        return 0
    done <<<"$entries"
    echo "install-test-deps: no 'deb' entry for $RELEASE (component main) in" \
        "$dir/sources.list or $dir/sources.list.d/*.{list,sources}:" \
        "cannot tell which Debian mirror to add $RELEASE-backports on" >&2
    return 1
}

# Succeeds when the sources under $1 already enable $RELEASE-backports.
backports_configured() {
    local dir=$1 entries type uri suite comps
    entries=$(apt_entries "$dir")
    while read -r type uri suite comps; do
        if [ "$type" = deb ] && [ "$suite" = "$RELEASE-backports" ]; then
            return 0
        fi
    done <<<"$entries"
    return 1
}

# Prints what this script would do to the apt sources under $1:
# "backports: present", or "mirror: URI" and "backports: add".
apt_plan() {
    local dir=$1 mirror
    if backports_configured "$dir"; then
        echo "backports: present"
    else
        # debian_mirror says why it failed.
        mirror=$(debian_mirror "$dir") || exit 1
        echo "mirror: $mirror"
        echo "backports: add"
    fi
}

# Adds $RELEASE-backports on the machine's mirror unless it is configured.
ensure_backports() {
    local mirror
    if backports_configured "$APT_ETC"; then
        echo "install-test-deps: $RELEASE-backports is already in the apt sources"
        return 0
    fi
    mirror=$(debian_mirror "$APT_ETC") || exit 1
    echo "install-test-deps: adding $RELEASE-backports on $mirror"
    $SUDO tee "$APT_ETC/sources.list.d/$RELEASE-backports.sources" >/dev/null <<EOF
Types: deb
URIs: $mirror
Suites: $RELEASE-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

have_kernel() {
    local v d
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

# What is missing, for the log.
missing() {
    local m=()
    command -v qemu-system-x86_64 >/dev/null || m+=(qemu-system-x86_64)
    command -v qemu-storage-daemon >/dev/null || m+=(qemu-storage-daemon)
    { [ -x /bin/busybox ] && dpkg -s busybox-static >/dev/null 2>&1; } || m+=(busybox-static)
    command -v xz >/dev/null || m+=(xz)
    command -v zstd >/dev/null || m+=(zstd)
    have_kernel || m+=("a kernel (/boot/vmlinuz-V with /lib/modules/V)")
    echo "${m[*]}"
}

main() {
    if [ "${1:-}" = --apt-plan ]; then
        apt_plan "$APT_ETC"
        return 0
    fi
    if [ $# -gt 0 ]; then
        die "unknown argument '$1' (usage: install-test-deps.sh [--apt-plan])"
    fi

    SUDO=
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || die "not root and sudo is missing: run it as root"
        SUDO=sudo
    fi
    export DEBIAN_FRONTEND=noninteractive

    if all_present; then
        echo "install-test-deps: everything is already installed"
        return 0
    fi
    echo "install-test-deps: missing: $(missing)"

    # Is the installed qemu-utils a backport? Then qemu-system-* must be too.
    local qemu_from="" qemu_utils
    qemu_utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    case $qemu_utils in
    *bpo12*)
        qemu_from=$RELEASE-backports
        ensure_backports
        ;;
    esac

    $SUDO apt-get update

    # qemu-storage-daemon: in qemu-utils since QEMU 8.0 (before: qemu-system-common).
    local qemu_pkgs=(qemu-system-x86 qemu-system-common qemu-utils)
    if [ -n "$qemu_from" ]; then
        # -t: qemu and whatever it needs at matching versions (qemu-system-data,
        # seabios, ...) from backports. The kernel and busybox stay on bookworm.
        $SUDO apt-get install -y --no-install-recommends -t "$qemu_from" "${qemu_pkgs[@]}"
    else
        $SUDO apt-get install -y --no-install-recommends "${qemu_pkgs[@]}"
    fi
    $SUDO apt-get install -y --no-install-recommends \
        linux-image-amd64 \
        busybox-static \
        xz-utils \
        zstd

    if ! all_present; then
        die "still missing after apt-get install: $(missing)"
    fi
    echo "install-test-deps: done"
}

main "$@"
