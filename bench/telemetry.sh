#!/usr/bin/env bash
# Telemetry cost and label memory (issue #6): throughput and p99 with every
# sink on (Istio metrics, access log, ALS stream, traces at 100%) against
# all off, alternating in one run; then Postern's RSS and series count as
# distinct mTLS callers grow past 10,000. The work is in
# tests/benches/telemetry.rs; this script builds and pins it: Postern on
# core 0 with one worker thread, wrk, the backend and the collectors on core 1.
#
#   bench/telemetry.sh
#   SKIP_BUILD=1 DURATION=5 ROUNDS=1 CALLERS=3000 bench/telemetry.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/bench/out/telemetry}
SKIP_BUILD=${SKIP_BUILD:-0}
export POSTERN_BIN=${POSTERN_BIN:-$REPO/target/release/postern}

log() { printf '[telemetry %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[telemetry] ERROR: %s\n' "$*" >&2; exit 1; }
for tool in wrk taskset; do command -v "$tool" >/dev/null || die "needs $tool"; done
[[ $(nproc) -ge 2 ]] || die "needs two cores to keep Postern and the load apart"

mkdir -p "$OUT"
if [[ $SKIP_BUILD != 1 ]]; then
    log "building postern and the benchmark (release)"
    (cd "$REPO" && cargo build --release -p postern >&2)
fi
bench=$(cd "$REPO" && cargo bench -p postern-tests --bench telemetry --no-run 2>&1 |
    sed -n 's/.*Executable.*(\(.*\)).*/\1/p' | tail -1)
[[ -n $bench ]] || die "cannot build the benchmark"
[[ -x $POSTERN_BIN ]] || die "no binary at $POSTERN_BIN"
log "running $bench"
(cd "$REPO" && taskset -c 1 "$REPO/$bench") | tee "$OUT/results.md"
