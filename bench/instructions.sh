#!/usr/bin/env bash
# Counts user-space instructions per proxied HTTP/1.1 request with callgrind,
# for Postern and for nginx as a reverse proxy. Instruction counts repeat to
# about 3% on this shared machine, where CPU time moves by 20%, so this is
# the figure to compare two builds by (run each a few times).
#
# Each proxy runs twice under valgrind, for N1 and N2 requests at a low fixed
# rate; the difference divided by N2-N1 cancels start-up and shutdown.
#
#   bench/instructions.sh                      # Postern (target/release/postern) and nginx
#   POSTERN_BIN=/tmp/other bench/instructions.sh
#   SCENARIOS=postern bench/instructions.sh
#
# TELEMETRY counts Postern with telemetry (issue #6): `off` (no Istio
# metrics, no sinks), or a comma list of sinks to turn on out of `istio`,
# `log` (JSON access log to a file), `als` (streamed to a collector) and
# `trace` (OTLP, sampled at TRACE_SAMPLING, default 0.01), as
# bench/telemetry.sh configures them. The collectors run in the telemetry
# benchmark's program (COLLECTORS_BIN, else built with cargo bench).
#
#   SCENARIOS=postern TELEMETRY=istio,log,als,trace bench/instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N1=${N1:-2000}
N2=${N2:-6000}
SCENARIOS=${SCENARIOS:-"postern nginx"}
POSTERN_BIN=${POSTERN_BIN:-target/release/postern}
OUT=${OUT:-bench/out/instructions}
BACKEND_PORT=${BACKEND_PORT:-18281}
PROXY_PORT=${PROXY_PORT:-18280}
ADMIN_PORT=${ADMIN_PORT:-18279}
TELEMETRY=${TELEMETRY:-}
TRACE_SAMPLING=${TRACE_SAMPLING:-0.01}
URL_PATH=/

need=()
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

cat > "$OUT/backend.conf" <<EOF
worker_processes 1;
daemon off;
pid $OUT/backend.pid;
error_log $OUT/backend.err;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND_PORT; location / { return 200 "hello\n"; } } }
EOF
nginx -p "$OUT" -c "$OUT/backend.conf" &
pids+=($!)

telemetry=
tracing=
if [ -n "$TELEMETRY" ]; then
  # The telemetry benchmark's request: a path with a query, as logged.
  URL_PATH="/items/1?page=2"
  has() { [[ ",$TELEMETRY," == *",$1,"* ]]; }
  istio=false; has istio && istio=true
  telemetry="telemetry:
  istio_metrics: $istio
  workload: { name: bench, namespace: shop, app: bench, version: v1 }"
  if has als || has trace; then
    COLLECTORS_BIN=${COLLECTORS_BIN:-$(cargo bench -p postern-tests --bench telemetry --no-run 2>&1 |
      sed -n 's/.*Executable.*(\(.*\)).*/\1/p' | tail -1)}
    PART=collectors "$COLLECTORS_BIN" >"$OUT/collectors.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 600); do grep -q "listening on" "$OUT/collectors.log" 2>/dev/null && break; sleep 0.1; done
    collectors=$(sed -n 's/.*listening on //p' "$OUT/collectors.log")
    [ -n "$collectors" ] || { cat "$OUT/collectors.log"; exit 1; }
  fi
  if has log; then
    telemetry="$telemetry
  access_log: { output: \"$OUT/access.log\", request_headers: [authorization] }"
  fi
  if has als; then
    telemetry="$telemetry
  access_log_service: { address: \"http://$collectors\", log_name: bench }"
  fi
  if has trace; then
    telemetry="$telemetry
  tracing: { collector: \"http://$collectors\" }"
    tracing="
    tracing: { sampling: $TRACE_SAMPLING }"
  fi
fi

cat > "$OUT/postern.yaml" <<EOF
admin:
  address: 127.0.0.1:$ADMIN_PORT
$telemetry
listeners:
  - name: bench
    address: 127.0.0.1:$PROXY_PORT
    kind: http$tracing
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: all
            match: { path: { prefix: "/" } }
            cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: 127.0.0.1:$BACKEND_PORT
EOF

cat > "$OUT/nginx-proxy.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $OUT/nginx-proxy.pid;
error_log $OUT/nginx-proxy.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream be { server 127.0.0.1:$BACKEND_PORT; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$PROXY_PORT;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF

# Runs one proxy under callgrind for $2 requests; prints its instruction total.
count() {
  local scenario=$1 requests=$2 ready_url
  rm -f "$OUT"/cg.out.*
  if [ "$scenario" = postern ]; then
    RUST_LOG=warn POSTERN_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out.%p" \
      "$POSTERN_BIN" run --config "$OUT/postern.yaml" >"$OUT/valgrind.log" 2>&1 &
    ready_url=http://127.0.0.1:$ADMIN_PORT/ready
  else
    valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out.%p" \
      nginx -p "$OUT" -c "$OUT/nginx-proxy.conf" >"$OUT/valgrind.log" 2>&1 &
    ready_url=http://127.0.0.1:$PROXY_PORT/
  fi
  local pid=$!
  for _ in $(seq 600); do curl -sf "$ready_url" >/dev/null && break; sleep 0.1; done
  h2load --h1 -t1 -c10 -m1 --rps 50 -n "$requests" "http://127.0.0.1:$PROXY_PORT$URL_PATH" >"$OUT/h2load.log"
  grep -q "$requests succeeded" "$OUT/h2load.log" || { cat "$OUT/h2load.log"; exit 1; }
  if [ "$scenario" = postern ]; then kill -INT "$pid"; else kill -QUIT "$pid"; fi
  wait "$pid" || true
  # Kept for callgrind_annotate: subtract the two runs' inclusive counts.
  cp "$(ls "$OUT"/cg.out.* | head -1)" "$OUT/cg.$scenario.$requests"
  awk '/^summary:/ {print $2}' "$OUT"/cg.out.* | head -1
}

[ -x "$POSTERN_BIN" ] || cargo build --release -p postern
for scenario in $SCENARIOS; do
  first=$(count "$scenario" "$N1")
  second=$(count "$scenario" "$N2")
  echo "$scenario: $(( (second - first) / (N2 - N1) )) instructions per request"
done
