#!/usr/bin/env bash
# Runs seeds 1..1,000,000 of `tessera-sim --nodes 4` in parts of 25,000,
# WORKERS parts at a time; a finished part leaves part-FIRST.done and is
# skipped when the script is started again.
set -u
cd "$(dirname "$0")"
BIN=${BIN:-./tessera-sim}
PART=25000
WORKERS=${WORKERS:-2}
run_part() {
    local first=$1
    [ -e "part-$first.done" ] && return
    "$BIN" --nodes 4 --first-seed "$first" --schedules "$PART" --threads 1 > "part-$first.log" 2>&1
    echo "rc=$?" >> "part-$first.log"
    grep -q ' 0 violations' "part-$first.log" && touch "part-$first.done"
}
firsts=()
for ((f = 1; f <= 1000000; f += PART)); do firsts+=("$f"); done
for f in "${firsts[@]}"; do
    while (( $(jobs -rp | wc -l) >= WORKERS )); do wait -n; done
    run_part "$f" &
done
wait
