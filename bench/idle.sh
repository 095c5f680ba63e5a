#!/usr/bin/env bash
# Idle-connection memory (issue #8 item 7): RSS and descriptors per idle
# downstream connection of a release Postern, for 20,000 HTTP/1.1
# connections (one request each, then kept alive), 5,000 HTTP/2 ones,
# 20,000 that connected and sent nothing, and the first two over mesh mTLS
# (phases mtls-h1, mtls-h2). The work is in
# tests/benches/idle.rs; this script builds it and raises the descriptor
# limit (each connection costs Postern one descriptor and the client one;
# raising the hard limit needs CAP_SYS_RESOURCE, which some containers lack:
# then lower H1_CONNS under the hard limit).
#
#   bench/idle.sh
#   SKIP_BUILD=1 H1_CONNS=5000 H2_CONNS=1000 PHASES=http1,http2 bench/idle.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/bench/out/idle}
SKIP_BUILD=${SKIP_BUILD:-0}
export POSTERN_BIN=${POSTERN_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/postern}

log() { printf '[idle %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[idle] ERROR: %s\n' "$*" >&2; exit 1; }

ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
log "descriptor limit $(ulimit -n)"
[[ $(ulimit -n) -gt ${H1_CONNS:-20000} ]] || log "WARNING: only $(ulimit -n) descriptors: lower H1_CONNS"

mkdir -p "$OUT"
if [[ $SKIP_BUILD != 1 ]]; then
    log "building postern and the benchmark (release)"
    (cd "$REPO" && cargo build --release -p postern >&2)
fi
bench=$(cd "$REPO" && cargo bench -p postern-tests --bench idle --no-run 2>&1 |
    sed -n 's/.*Executable.*(\(.*\)).*/\1/p' | tail -1)
[[ -n $bench ]] || die "cannot build the benchmark"
[[ $bench == /* ]] || bench=$REPO/$bench
[[ -x $POSTERN_BIN ]] || die "no binary at $POSTERN_BIN"
log "running $bench"
(cd "$REPO" && "$bench") | tee "$OUT/results.md"
