#!/usr/bin/env bash
# Runs Tessera's whole test suite on this machine: installs what the
# real-guest tests need, builds the `tessera` binary the integration tests
# start as real processes, then runs every test (real guests included).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# QEMU, a Debian kernel and busybox for the real-guest tests (a no-op when present).
bash scripts/install-test-deps.sh

cargo build --release --bin tessera --bin faultcampaign
status=0
if cargo nextest --version >/dev/null 2>&1; then
    # Integration tests start several processes each: two at a time on two cores.
    cargo nextest run --release --workspace --no-fail-fast --test-threads 2 || status=$?
else
    cargo test --release --workspace --no-fail-fast -- --test-threads 2 || status=$?
fi

# The real-process fault campaign, bounded: schedules for 4 minutes (plus
# the one running then), every fault kind.
echo "== fault campaign (real processes, 4 minutes)"
target/release/faultcampaign --duration "${TESSERA_CAMPAIGN_SECONDS:-240}" \
    --out target/faultcampaign-ci.md || status=$?
exit "$status"
