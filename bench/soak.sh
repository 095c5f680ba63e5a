#!/usr/bin/env bash
# Soak (issue #8, item 8): the mixed load of the CI integrity suite
# (tests/src/load: HTTP/1.1 sized and chunked, HTTP/2 with trailers, gRPC
# streams, raw TCP; route and endpoint pushes every 100 ms; proxy and
# upstream certificates living 4 s) against a release build, for 30 minutes
# by default. Samples Postern's RSS and open FDs every SAMPLE_EVERY seconds
# and reports, after the warm-up, the RSS slope (target < 1 %/h), the FD
# slope (target flat) and the p99 drift between the first and the last
# window; then checks every request id end to end, as the CI suite does,
# with 1 GiB bodies. Not run in CI.
#
#   bench/soak.sh
#   DURATION=300 bench/soak.sh                 # a shortened run
#   SKIP_BUILD=1 DURATION=600 WARMUP=120 BIG_MIB=64 bench/soak.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
OUT=${OUT:-$REPO/bench/out/soak}
DURATION=${DURATION:-1800}
WARMUP=${WARMUP:-}
WINDOW=${WINDOW:-60}
SAMPLE_EVERY=${SAMPLE_EVERY:-10}
BIG_MIB=${BIG_MIB:-1024}
SKIP_BUILD=${SKIP_BUILD:-0}
POSTERN_BIN=${POSTERN_BIN:-$TARGET/release/postern}

log() { printf '[soak %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[soak] ERROR: %s\n' "$*" >&2; exit 1; }
command -v kill >/dev/null || die "needs kill (procps)"

mkdir -p "$OUT"
if [[ $SKIP_BUILD != 1 ]]; then
    log "building postern and the soak load generator (release)"
    (cd "$REPO" && cargo build --release -p postern --bin postern -p postern-tests --example soak >&2)
fi
soak=$TARGET/release/examples/soak
[[ -x $soak ]] || die "no $soak: build it with cargo build --release -p postern-tests --example soak"
[[ -x $POSTERN_BIN ]] || die "no postern binary at $POSTERN_BIN"

stamp=$(date -u +%Y%m%dT%H%M%SZ)
report=$OUT/soak-$stamp.txt
args=(--duration "$DURATION" --window "$WINDOW" --sample-every "$SAMPLE_EVERY"
      --big-mib "$BIG_MIB" --postern "$POSTERN_BIN" --log "$OUT/postern-$stamp.log")
[[ -n $WARMUP ]] && args+=(--warmup "$WARMUP")
log "running for ${DURATION}s; report in $report"
{
    echo "# soak $stamp: DURATION=$DURATION WARMUP=${WARMUP:-auto} WINDOW=$WINDOW SAMPLE_EVERY=$SAMPLE_EVERY BIG_MIB=$BIG_MIB"
    echo "# $(uname -sr), $(nproc) cores, postern $("$POSTERN_BIN" --version 2>/dev/null || echo '?')"
} >"$report"
status=0
"$soak" "${args[@]}" | tee -a "$report" || status=$?
log "done (exit $status): $report"
exit "$status"
