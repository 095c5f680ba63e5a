#!/usr/bin/env bash
# Policy cost (issue #5): throughput, p99 and Postern's CPU per request
# through one Postern process, on a listener with the whole chain on every
# request (path normalisation, JWT verification of an RS256 token, RBAC by
# method, path, header, address and JWT claim plus shadow rules, a
# per-caller and a per-route local rate limit with buckets too big to
# refuse anything), against a listener with no policy. wrk sends the same
# token to both. Both listeners run in the same process, measured
# alternately (plain, policy, plain, ...) in one run.
#
#   bench/policy.sh                 # builds the release binary first
#   SKIP_BUILD=1 DURATION=10s ROUNDS=3 bench/policy.sh
#   JWT_CACHE=0 bench/policy.sh     # every token verified again (no cache)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/bench/out/policy}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
ROUNDS=${ROUNDS:-2}
JWT_CACHE=${JWT_CACHE:-100}
SKIP_BUILD=${SKIP_BUILD:-0}
POSTERN_BIN=${POSTERN_BIN:-$REPO/target/release/postern}
HOST=127.0.0.1
BACKEND_PORT=${BACKEND_PORT:-18481}
PLAIN_PORT=${PLAIN_PORT:-18482}
POLICY_PORT=${POLICY_PORT:-18483}
ADMIN_PORT=${ADMIN_PORT:-18484}

log() { printf '[policy %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[policy] ERROR: %s\n' "$*" >&2; exit 1; }
for tool in wrk nginx curl taskset openssl python3; do command -v "$tool" >/dev/null || die "needs $tool"; done

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

# An RS256 key pair, its JWKS and a token valid for an hour, made here so
# nothing secret is committed.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$OUT/jwt.key" 2>/dev/null
JWKS=$(python3 - "$OUT/jwt.key" <<'PY'
import base64, json, subprocess, sys
text = subprocess.run(["openssl", "rsa", "-in", sys.argv[1], "-noout", "-modulus"],
                      capture_output=True, text=True, check=True).stdout
n = bytes.fromhex(text.strip().split("=", 1)[1])
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
print(json.dumps({"keys": [{"kty": "RSA", "kid": "bench", "alg": "RS256", "n": b64(n), "e": "AQAB"}]}))
PY
)
TOKEN=$(python3 - "$OUT/jwt.key" <<'PY'
import base64, json, subprocess, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
header = b64(json.dumps({"alg": "RS256", "kid": "bench", "typ": "JWT"}).encode())
claims = b64(json.dumps({"iss": "https://idp.bench", "aud": "orders", "sub": "alice",
                         "roles": ["reader"], "exp": int(time.time()) + 3600}).encode())
signing_input = f"{header}.{claims}".encode()
signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", sys.argv[1]],
                           input=signing_input, capture_output=True, check=True).stdout
print(f"{header}.{claims}.{b64(signature)}")
PY
)

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
      jwt:
        providers:
          idp:
            issuer: https://idp.bench
            audiences: [orders]
            jwks: { inline: '$JWKS' }
            claim_to_headers: [{ claim: sub, header: x-user }]
            cache_size: $JWT_CACHE
        rules:
          - match: { path: { prefix: / } }
            requires: { provider: idp }
      rbac:
        rules:
          action: allow
          policies:
            - name: readers
              permissions:
                - and: [{ method: GET }, { path: { prefix: / } }, { not: { header: { name: x-debug, present: true } } }]
              principals:
                - and:
                    - { or: [{ source_ip: 127.0.0.0/8 }, { authenticated: true }] }
                    - { jwt_claim: { name: roles, exact: reader } }
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
AUTH="Authorization: Bearer $TOKEN"
status=$(curl -s -o /dev/null -w '%{http_code}' -H "$AUTH" "http://$HOST:$POLICY_PORT/x")
[[ $status == 200 ]] || die "policy listener answered $status to a call with a valid token"
status=$(curl -s -o /dev/null -w '%{http_code}' "http://$HOST:$POLICY_PORT/x")
[[ $status == 401 ]] || die "policy listener answered $status to a call without a token"
POSTERN_PID=${pids[-1]}

# Postern's user+system CPU seconds so far, from /proc.
cpu_seconds() {
    awk -v tck="$(getconf CLK_TCK)" '{ print ($14 + $15) / tck }' "/proc/$POSTERN_PID/stat"
}

# One wrk run: appends "name rps p99_ms cpu_us_per_request" to rows.
measure() {
    local name=$1 port=$2 before after
    before=$(cpu_seconds)
    taskset -c 1 wrk -t1 -c "$CONNS" -d "$DURATION" --latency -H "$AUTH" "http://$HOST:$port/items/1" > "$OUT/$name.txt"
    after=$(cpu_seconds)
    awk -v name="$name" -v before="$before" -v after="$after" '
        /Requests\/sec/ { rps = $2 }
        /requests in/ { requests = $1 }
        $1 == "99%" { p99 = $2; if (p99 ~ /us$/) p99 = p99 / 1000; else if (p99 ~ /ms$/) p99 = p99 + 0; else if (p99 ~ /s$/) p99 = p99 * 1000 }
        / Non-2xx/ { bad = $NF }
        END { if (bad > 0) { print name ": " bad " answers were not 2xx" > "/dev/stderr"; exit 1 }
              printf "%s %s %.3f %.2f\n", name, rps, p99, (after - before) * 1e6 / requests }' "$OUT/$name.txt" >> "$OUT/rows"
}

: > "$OUT/rows"
for port in "$PLAIN_PORT" "$POLICY_PORT"; do
    taskset -c 1 wrk -t1 -c "$CONNS" -d 2s -H "$AUTH" "http://$HOST:$port/items/1" >/dev/null
done
for round in $(seq "$ROUNDS"); do
    measure "plain-$round" "$PLAIN_PORT"
    measure "policy-$round" "$POLICY_PORT"
done
measure "plain-$((ROUNDS + 1))" "$PLAIN_PORT"

{
    echo "# Policy cost ($(date -u +%FT%TZ), wrk -c $CONNS for $DURATION per row, Postern on one core, JWT cache_size $JWT_CACHE)"
    echo
    echo "| row | req/s | p99 (ms) | Postern CPU per request (µs) |"
    echo "|---|---:|---:|---:|"
    awk '{ printf "| %s | %s | %.2f | %.1f |\n", $1, $2, $3, $4 }' "$OUT/rows"
    echo
    # Each policy row against the mean of the plain rows either side of it.
    awk '
        { name[NR] = $1; rps[NR] = $2; cpu[NR] = $4 }
        END {
            for (i = 2; i < NR; i += 2) {
                base_rps = (rps[i-1] + rps[i+1]) / 2; base_cpu = (cpu[i-1] + cpu[i+1]) / 2
                r += rps[i] / base_rps; c += cpu[i] / base_cpu; n++
            }
            printf "policy vs the plain rows either side (mean of %d): throughput %.3fx (cost %.1f%%), CPU per request %.3fx (cost %.1f%%)\n", n, r/n, (1 - r/n) * 100, c/n, (c/n - 1) * 100
        }' "$OUT/rows"
} | tee "$OUT/results.md"
