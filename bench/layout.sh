#!/usr/bin/env bash
# Regenerates proxy/layout/hot-text.ld: the functions a running Postern
# executes, placed together at the start of the binary's code.
#
# Why: the kernel maps a binary's code in 64 KiB windows around each page
# touched (fault-around), so the few thousand functions a proxy runs,
# scattered over 11 MB of code, kept about 7 MiB of it resident: half the
# process's RSS. Grouped, they take under 2 MiB. proxy/build.rs passes the
# script to the linker for release builds of the `postern` binary.
#
# The list is every function callgrind sees run while Postern starts, serves
# HTTP/1.1 and h2c through a cluster, answers the admin endpoints and drains,
# and while two sidecars carry HTTP/1.1 between them over mesh mTLS.
# Symbol names change from build to build: LLVM's numeric suffixes (".1234")
# with any change to the code, legacy hashes ("17h0123456789abcdefE") when
# the crate's dependencies, build script or toolchain do. So each function is
# listed twice: by its exact name, minus the suffix, first; then by its path
# with the hash as a wildcard, which also takes in every other instantiation
# of that generic (2 MB more), placed after the exact ones where, while the
# exact names hold, nothing runs. Rerun this script after such changes; a
# stale script costs only memory.
#
#   bench/layout.sh               # builds target/release/postern first
#   SKIP_BUILD=1 bench/layout.sh  # profiles target/release/postern as it is
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[layout %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[layout] ERROR: %s\n' "$*" >&2; exit 1; }
# shellcheck source=bench/lib.sh
source bench/lib.sh

POSTERN_BIN=${POSTERN_BIN:-target/release/postern}
SKIP_BUILD=${SKIP_BUILD:-0}
OUT=bench/out/layout
SCRIPT=proxy/layout/hot-text.ld
BACKEND_PORT=${BACKEND_PORT:-18781}
PROXY_PORT=${PROXY_PORT:-18780}
ADMIN_PORT=${ADMIN_PORT:-18779}
A_PORT=${A_PORT:-18782}
A_ADMIN_PORT=${A_ADMIN_PORT:-18783}
B_PORT=${B_PORT:-18784}
B_ADMIN_PORT=${B_ADMIN_PORT:-18785}

need=()
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
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

[ "$SKIP_BUILD" = 1 ] || cargo build --release -p postern --bin postern

cat > "$OUT/backend.conf" <<CONF
worker_processes 1;
daemon off;
pid $OUT/backend.pid;
error_log $OUT/backend.err;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND_PORT; location / { return 200 "hello\n"; } } }
CONF
nginx -p "$OUT" -c "$OUT/backend.conf" &
pids+=($!)

# Mesh certificates: a CA and two SPIFFE identities, made as bench/mesh.sh
# makes them (bench/lib.sh).
CERTS=$OUT/certs
gen_ca
for side in a b; do gen_leaf "$side" "URI:spiffe://cluster.local/ns/layout/sa/$side"; done
identity() { postern_identity "spiffe://cluster.local/ns/layout/sa/$1" "$1"; }
# proxy_config ADMIN_PORT PORT UPSTREAM_PORT [IDENTITY [LISTENER_EXTRA [CLUSTER_EXTRA]]]:
# one HTTP listener routing everything to one cluster.
proxy_config() {
  printf 'admin:\n  address: 127.0.0.1:%s\n' "$1"
  [ -z "${4:-}" ] || identity "$4"
  cat <<CONF
listeners:
  - name: layout
    address: 127.0.0.1:$2
    kind: http${5:-}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: all
            match: { path: { prefix: "/" } }
            cluster: upstream
clusters:
  - name: upstream
    endpoints:
      - address: 127.0.0.1:$3${6:-}
CONF
}
proxy_config "$ADMIN_PORT" "$PROXY_PORT" "$BACKEND_PORT" >"$OUT/postern.yaml"
proxy_config "$A_ADMIN_PORT" "$A_PORT" "$B_PORT" a "" '
    tls:
      mode: mesh
      identities: ["spiffe://cluster.local/ns/layout/sa/b"]' >"$OUT/sidecar-a.yaml"
proxy_config "$B_ADMIN_PORT" "$B_PORT" "$BACKEND_PORT" b '
    mtls:
      mode: strict' >"$OUT/sidecar-b.yaml"

rm -f "$OUT"/cg.out*
profiled=()
for name in postern sidecar-a sidecar-b; do
  RUST_LOG=warn POSTERN_WORKER_THREADS=1 valgrind --tool=callgrind --demangle=no \
    --callgrind-out-file="$OUT/cg.out.$name" \
    "$POSTERN_BIN" run --config "$OUT/$name.yaml" >"$OUT/valgrind-$name.log" 2>&1 &
  profiled+=($!)
  pids+=($!)
done
for port in "$ADMIN_PORT" "$A_ADMIN_PORT" "$B_ADMIN_PORT"; do
  # Under valgrind start-up takes seconds; a minute means it failed.
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null ||
    { echo "layout: the Postern with admin port $port is not ready; see $OUT/valgrind-*.log" >&2; exit 1; }
done
h2load --h1 -t1 -c10 -n 3000 --rps 100 "http://127.0.0.1:$PROXY_PORT/" | grep -q '3000 succeeded'
h2load -t1 -c4 -m4 -n 3000 "http://127.0.0.1:$PROXY_PORT/" | grep -q '3000 succeeded'
h2load --h1 -t1 -c10 -n 2000 --rps 100 "http://127.0.0.1:$A_PORT/" | grep -q '2000 succeeded'
for port in "$ADMIN_PORT" "$A_ADMIN_PORT" "$B_ADMIN_PORT"; do
  for path in metrics config_dump healthz ready certs; do
    curl -sf "http://127.0.0.1:$port/$path" >/dev/null || true
  done
done
curl -sf "http://127.0.0.1:$PROXY_PORT/missing-is-fine" >/dev/null || true
for pid in "${profiled[@]}"; do kill -INT "$pid"; done
for pid in "${profiled[@]}"; do wait "$pid" || true; done

python3 - "$POSTERN_BIN" "$SCRIPT" "$OUT"/cg.out.* <<'PY'
import re, subprocess, sys

binary, script, *profiles = sys.argv[1:]
ran = set()
for profile in profiles:
    for line in open(profile):
        m = re.match(r'^c?fn=\(\d+\) (\S+)$', line.rstrip('\n'))
        if m:
            ran.add(m.group(1))
text = {}
for line in subprocess.run(['nm', '-S', '--defined-only', binary],
                           capture_output=True, text=True, check=True).stdout.splitlines():
    parts = line.split()
    if len(parts) == 4 and parts[2] in 'tT':
        text[parts[3]] = int(parts[1], 16)

def pattern(name):
    return re.sub(r'\.\d+$', '', name)


def fallback(name):
    return re.sub(r'17h[0-9a-f]{16}E$', '17h*E', pattern(name))

hot = sorted(ran & text.keys(), key=lambda n: -text[n])
size = sum(text[n] for n in hot)
patterns, seen = [], set()
for p in [pattern(n) for n in hot] + [fallback(n) for n in hot]:
    if p not in seen:
        seen.add(p)
        patterns.append(p)
with open(script, 'w') as out:
    out.write('/* Generated by bench/layout.sh: the functions Postern runs, grouped so\n'
              '   that their pages are few (see that script). Do not edit by hand. */\n')
    out.write('SECTIONS\n{\n  .text.hot :\n  {\n')
    for p in patterns:
        # Cold or startup-only functions come in .text.unlikely.* and
        # .text.startup.* sections; both are wanted here.
        out.write(f'    *(.text.{p} .text.{p}.* .text.*.{p} .text.*.{p}.*)\n')
    out.write('  }\n}\nINSERT BEFORE .text;\n')
print(f'{len(patterns)} patterns for {len(hot)} functions, {size // 1024} KiB of code: {script}')
PY
