#!/usr/bin/env bash
# Policy cost: throughput and p99 through one Postern process, on a route
# with RBAC (by header and path) and a local rate limit (a bucket too big
# to refuse anything) on every request, against a listener with no policy.
# Both listeners run in the same process, measured one after the other in
# one run. JWT is not built yet, so it is not in the chain.
#
#   bench/policy.sh                 # builds the release binary first
#   SKIP_BUILD=1 DURATION=10s bench/policy.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/bench/out/policy}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
SKIP_BUILD=${SKIP_BUILD:-0}
POSTERN_BIN=${POSTERN_BIN:-$REPO/target/release/postern}
HOST=127.0.0.1
BACKEND_PORT=${BACKEND_PORT:-18481}
PLAIN_PORT=${PLAIN_PORT:-18482}
POLICY_PORT=${POLICY_PORT:-18483}
ADMIN_PORT=${ADMIN_PORT:-18484}

log() { printf '[policy %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[policy] ERROR: %s\n' "$*" >&2; exit 1; }
for tool in wrk nginx curl taskset; do command -v "$tool" >/dev/null || die "needs $tool"; done

rm -rf "$OUT" && mkdir -p "$OUT/backend"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

if [[ $SKIP_BUILD != 1 ]]; then
    log "building postern (release)"
    (cd "$REPO" && cargo build --release -p postern >&2)
fi
[[ -x $POSTERN_BIN ]] || die "no binary at $POSTERN_BIN"

cat > "$OUT/backend/nginx.conf" <<CONF
worker_processes 1;
pid $OUT/backend/nginx.pid;
error_log $OUT/backend/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $OUT/backend; proxy_temp_path $OUT/backend;
    fastcgi_temp_path $OUT/backend; uwsgi_temp_path $OUT/backend; scgi_temp_path $OUT/backend;
    keepalive_requests 1000000;
    server { listen $HOST:$BACKEND_PORT; location / { return 200 "ok\n"; } }
}
CONF
taskset -c 1 nginx -p "$OUT/backend" -c "$OUT/backend/nginx.conf" -g 'daemon off;' &
pids+=($!)

cat > "$OUT/postern.yaml" <<CONF
admin: { address: "$HOST:$ADMIN_PORT" }
listeners:
  - name: plain
    address: $HOST:$PLAIN_PORT
    kind: http
    virtual_hosts: [{ name: all, domains: ["*"], routes: [{ match: {}, cluster: app }] }]
  - name: policy
    address: $HOST:$POLICY_PORT
    kind: http
    http:
      rbac:
        rules:
          action: allow
          policies:
            - name: readers
              permissions:
                - and: [{ method: GET }, { path: { prefix: / } }, { not: { header: { name: x-debug, present: true } } }]
              principals: [{ or: [{ source_ip: 127.0.0.0/8 }, { authenticated: true }] }]
        shadow:
          action: deny
          policies:
            - name: no-admin
              permissions: [{ path: { prefix: /admin/ } }]
              principals: [{ any: true }]
      local_rate_limit: { max_tokens: 100000000, fill_interval: 1s, key: { remote_address: true } }
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {}
            cluster: app
            local_rate_limit: { max_tokens: 100000000, fill_interval: 1s }
clusters:
  - name: app
    endpoints: [{ address: "$HOST:$BACKEND_PORT" }]
CONF
"$POSTERN_BIN" validate --config "$OUT/postern.yaml" >&2
POSTERN_WORKER_THREADS=1 RUST_LOG=warn taskset -c 0 "$POSTERN_BIN" run --config "$OUT/postern.yaml" 2>"$OUT/postern.log" &
pids+=($!)
for _ in $(seq 100); do
    curl -fsS "http://$HOST:$ADMIN_PORT/ready" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS "http://$HOST:$ADMIN_PORT/ready" >/dev/null || die "postern not ready: $(tail -5 "$OUT/postern.log")"
curl -fsS "http://$HOST:$POLICY_PORT/x" >/dev/null || die "policy listener refused a plain call"

measure() {
    local name=$1 port=$2
    taskset -c 1 wrk -t1 -c "$CONNS" -d 2s "http://$HOST:$port/items/1" >/dev/null
    taskset -c 1 wrk -t1 -c "$CONNS" -d "$DURATION" --latency "http://$HOST:$port/items/1" > "$OUT/$name.txt"
    local rps p99
    rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/$name.txt")
    p99=$(awk '$1=="99%" {print $2}' "$OUT/$name.txt")
    printf '| %s | %s | %s |\n' "$name" "$rps" "$p99"
    echo "$rps" > "$OUT/$name.rps"
}

{
    echo "# Policy cost ($(date -u +%FT%TZ), wrk -c $CONNS for $DURATION, Postern on one core)"
    echo
    echo "| listener | req/s | p99 |"
    echo "|---|---:|---:|"
    measure plain "$PLAIN_PORT"
    measure policy "$POLICY_PORT"
    measure plain-again "$PLAIN_PORT"
    echo
    awk -v p="$(cat "$OUT/policy.rps")" -v a="$(cat "$OUT/plain.rps")" -v b="$(cat "$OUT/plain-again.rps")" \
        'BEGIN { base=(a+b)/2; printf "policy throughput = %.3f x the mean of the two plain runs (cost %.1f%%)\n", p/base, (1-p/base)*100 }'
} | tee "$OUT/results.md"
