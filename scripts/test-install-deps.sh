#!/usr/bin/env bash
# Tests the apt-source detection of scripts/install-test-deps.sh against
# fixture apt directories (every layout Debian ships) without touching the
# machine's own: `install-test-deps.sh --apt-plan` with APT_ETC pointing at
# each fixture must name the mirror bookworm-backports goes on, or say that
# backports are already there; a machine without a usable entry must fail
# saying so. Plain bash; nothing is installed. Exit status 0 when all pass.
set -euo pipefail
trap 'echo "test-install-deps: failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

SCRIPT="$(cd "$(dirname "$0")" && pwd)/install-test-deps.sh"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

failures=0
passes=0

# fixture NAME: a fresh apt directory (sources.list.d/ only) under $TMP.
fixture() {
    mkdir -p "$TMP/$1/sources.list.d"
    echo "$TMP/$1"
}

# expect NAME DIR EXPECTED_STATUS EXPECTED_OUTPUT [EXPECTED_STDERR_PART]
expect() {
    local name=$1 dir=$2 want_rc=$3 want_out=$4 want_err=${5:-}
    local out err rc=0
    out=$(APT_ETC=$dir bash "$SCRIPT" --apt-plan 2>"$TMP/stderr") || rc=$?
    err=$(cat "$TMP/stderr")
    if [ "$rc" != "$want_rc" ]; then
        echo "FAIL $name: exit $rc, want $want_rc (stdout: '$out', stderr: '$err')"
        failures=$((failures + 1))
    elif [ "$out" != "$want_out" ]; then
        printf 'FAIL %s: stdout\n%s\nwant\n%s\n' "$name" "$out" "$want_out"
        failures=$((failures + 1))
    elif [ -n "$want_err" ] && [[ $err != *"$want_err"* ]]; then
        echo "FAIL $name: stderr '$err' does not say '$want_err'"
        failures=$((failures + 1))
    elif [ -z "$want_err" ] && [ -n "$err" ]; then
        echo "FAIL $name: unexpected stderr '$err'"
        failures=$((failures + 1))
    else
        echo "ok   $name"
        passes=$((passes + 1))
    fi
}

ADD_DEB='mirror: http://deb.debian.org/debian
backports: add'

# 1. A fresh Debian 12: deb822 only, no sources.list (the reported bug: the
# script exited 2 printing nothing). Security first, to be skipped.
d=$(fixture deb822-only)
cat >"$d/sources.list.d/debian.sources" <<'EOF'
Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
echo 'deb https://packages.cloud.google.com/apt cloud-sdk main' \
    >"$d/sources.list.d/google-cloud-sdk.list.disabled-by-farm"
expect "deb822 only" "$d" 0 "$ADD_DEB"

# 1b. deb822, several URIs on one line (the first is the mirror), a folded
# Suites field, a disabled stanza, a third-party repository with suite
# bookworm but no main, and blank lines made of spaces.
d=$(fixture deb822-several-uris)
cat >"$d/sources.list.d/aa-disabled.sources" <<'EOF'
Enabled: no
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
EOF
cat >"$d/sources.list.d/docker.sources" <<'EOF'
Types: deb
URIs: https://download.docker.com/linux/debian
Suites: bookworm
Components: stable
EOF
printf '%s\n' \
    'Types: deb-src deb' \
    'URIs: http://mirror.example.org/debian/ http://deb.debian.org/debian' \
    'Suites: bookworm-updates' \
    ' bookworm' \
    'Components: main contrib' \
    '   ' \
    'Types: deb' \
    'URIs: https://deb.debian.org/debian-security' \
    'Suites: bookworm-security' \
    'Components: main' >"$d/sources.list.d/debian.sources"
expect "deb822, several URIs" "$d" 0 'mirror: http://mirror.example.org/debian
backports: add'

# 2. One-line sources.list only (an upgraded or hand-made machine), with
# options, comments and a security line first.
d=$(fixture one-line-only)
cat >"$d/sources.list" <<'EOF'
# deb cdrom:[Debian GNU/Linux 12.0.0 _Bookworm_]/ bookworm main
deb http://security.debian.org/debian-security bookworm-security main
deb-src http://ftp.example.net/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://ftp.de.debian.org/debian/ bookworm main non-free-firmware
deb http://ftp.de.debian.org/debian/ bookworm-updates main
EOF
expect "sources.list only" "$d" 0 'mirror: http://ftp.de.debian.org/debian
backports: add'

# 2b. Options with spaces inside the brackets.
d=$(fixture one-line-spaced-options)
echo 'deb [ arch=amd64 ] http://deb.debian.org/debian bookworm main' >"$d/sources.list"
expect "sources.list, [ options ]" "$d" 0 "$ADD_DEB"

# 3. Both forms: sources.list comes first, as apt reads it.
d=$(fixture both)
echo 'deb http://ftp.fr.debian.org/debian bookworm main' >"$d/sources.list"
cp "$TMP/deb822-only/sources.list.d/debian.sources" "$d/sources.list.d/"
expect "both forms" "$d" 0 'mirror: http://ftp.fr.debian.org/debian
backports: add'

# 3b. Both forms, sources.list holding only comments: the deb822 mirror.
d=$(fixture both-commented)
printf '# moved to sources.list.d/debian.sources\n#deb http://old.example/debian bookworm main\n' >"$d/sources.list"
cp "$TMP/deb822-only/sources.list.d/debian.sources" "$d/sources.list.d/"
expect "both forms, sources.list commented out" "$d" 0 "$ADD_DEB"

# 4. bookworm-backports already configured, in each form: add nothing.
d=$(fixture backports-deb822)
cp "$TMP/deb822-only/sources.list.d/debian.sources" "$d/sources.list.d/"
cat >"$d/sources.list.d/bookworm-backports.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
EOF
expect "backports already there (deb822)" "$d" 0 'backports: present'

d=$(fixture backports-one-line)
cat >"$d/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-backports main
EOF
expect "backports already there (sources.list)" "$d" 0 'backports: present'

d=$(fixture backports-in-list-d)
cp "$TMP/deb822-only/sources.list.d/debian.sources" "$d/sources.list.d/"
echo 'deb http://deb.debian.org/debian bookworm-backports main' \
    >"$d/sources.list.d/backports.list"
expect "backports already there (sources.list.d/*.list)" "$d" 0 'backports: present'

# 4b. Backports only mentioned in a comment, a disabled stanza or a file apt
# does not read: still to be added.
d=$(fixture backports-not-really)
cp "$TMP/deb822-only/sources.list.d/debian.sources" "$d/sources.list.d/"
echo '# deb http://deb.debian.org/debian bookworm-backports main' >"$d/sources.list"
printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nEnabled: no\n' \
    >"$d/sources.list.d/bpo.sources"
echo 'deb http://deb.debian.org/debian bookworm-backports main' \
    >"$d/sources.list.d/bpo.list.disabled"
expect "backports only commented or disabled" "$d" 0 "$ADD_DEB"

# 5. Failures say what failed.
d=$(fixture security-only)
cat >"$d/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
EOF
expect "no mirror for bookworm" "$d" 1 "" "no 'deb' entry for bookworm"

d=$(fixture empty)
expect "no apt sources at all" "$d" 1 "" "no 'deb' entry for bookworm"

expect "no apt directory" "$TMP/does-not-exist" 1 "" "no apt directory at $TMP/does-not-exist"

echo "test-install-deps: $passes passed, $failures failed"
[ "$failures" = 0 ]
