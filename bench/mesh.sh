#!/usr/bin/env bash
# Postern mesh benchmark: the two-hop sidecar path
#
#   client --HTTP/1.1--> sidecar A --mTLS--> sidecar B --HTTP/1.1--> backend
#
# for an nginx pair and a Postern pair, plus the direct client -> backend path
# as the baseline, all on loopback; and a handshake storm (new mTLS
# handshakes per second against sidecar B's listener, openssl s_time).
# Modelled on bench/run.sh; see the settings below.
#
#   bench/mesh.sh                                  # everything (builds Postern first)
#   DURATION=3s bench/mesh.sh                      # shorter runs
#   SCENARIOS="direct nginx" bench/mesh.sh         # without Postern (no build)
#   SKIP_BUILD=1 bench/mesh.sh                     # use target/release/postern as it is
#   POSTERN_BIN=/path/to/postern bench/mesh.sh     # use another binary
#   STORM=0 bench/mesh.sh                          # no handshake storm
#
# Everything it starts (backend nginx, the nginx pair, the Postern pair) runs
# from a scratch prefix under $OUT/mesh and is stopped at exit. Every load run
# is bounded in time. Certificates are generated fresh into $OUT/mesh/certs.
# Results go to $OUT/mesh-results.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ---------------------------------------------------------------- settings --
OUT=${OUT:-$REPO/bench/out}
DURATION=${DURATION:-10s}          # each measured run (max-throughput, fixed-rate)
WARMUP=${WARMUP:-2s}               # unmeasured warm-up before each row (opens A->B connections)
RATE=${RATE:-2000}                 # fixed request rate for the latency/CPU run (req/s)
RATE_CONNS=${RATE_CONNS:-20}       # connections sharing that rate (RATE/RATE_CONNS each)
CONNS=${CONNS:-32}                 # max-throughput: wrk connections to sidecar A
SCENARIOS=${SCENARIOS:-"direct postern nginx"}
STORM=${STORM:-1}                  # 1: handshake storm against sidecar B of each proxy scenario
STORM_TIME=${STORM_TIME:-$DURATION}  # length of the storm
STORM_PROCS=${STORM_PROCS:-2}      # parallel openssl s_time processes in the storm
PROXY_CPU=${PROXY_CPU:-0}          # core for both sidecars (A and B)
LOAD_CPU=${LOAD_CPU:-1}            # core for the load generator and the backend
POSTERN_BIN=${POSTERN_BIN:-}       # use this binary instead of building one
SKIP_BUILD=${SKIP_BUILD:-0}        # 1: use $REPO/target/release/postern as it is
POSTERN_MESH_PROTOCOL=${POSTERN_MESH_PROTOCOL:-}  # set: "protocol:" of A's cluster to B (unset: ALPN decides)
READY_TRIES=${READY_TRIES:-100}    # readiness polls, 0.1 s apart

BACKEND_PORT=${BACKEND_PORT:-18381}
POSTERN_A_PORT=${POSTERN_A_PORT:-18380}
POSTERN_B_PORT=${POSTERN_B_PORT:-18382}
POSTERN_A_ADMIN_PORT=${POSTERN_A_ADMIN_PORT:-18378}
POSTERN_B_ADMIN_PORT=${POSTERN_B_ADMIN_PORT:-18379}
NGINX_A_PORT=${NGINX_A_PORT:-18390}
NGINX_B_PORT=${NGINX_B_PORT:-18391}
HOST=127.0.0.1                     # loopback only, on purpose: not configurable

TRUST_DOMAIN=cluster.local
ID_A=spiffe://$TRUST_DOMAIN/ns/bench/sa/a
ID_B=spiffe://$TRUST_DOMAIN/ns/bench/sa/b
B_NAME=sidecar-b.bench             # DNS SAN on B's cert; nginx A verifies it (proxy_ssl_name)

MESH=$OUT/mesh                     # scratch prefix of this script
CERTS=$MESH/certs

log() { printf '[mesh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[mesh] ERROR: %s\n' "$*" >&2; exit 1; }

# Helpers shared with the other benchmark scripts.
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

DUR_S=$(to_seconds "$DURATION")
WARM_S=$(to_seconds "$WARMUP")
STORM_S=$(to_seconds "$STORM_TIME")
[[ $DUR_S =~ ^[0-9]+$ && $DUR_S -ge 1 ]] || die "DURATION must be whole seconds (e.g. 10s), got '$DURATION'"
[[ $WARM_S =~ ^[0-9]+$ ]] || die "WARMUP must be whole seconds (e.g. 2s), got '$WARMUP'"
[[ $STORM_S =~ ^[0-9]+$ && $STORM_S -ge 1 ]] || die "STORM_TIME must be whole seconds (e.g. 10s), got '$STORM_TIME'"
[[ $RATE =~ ^[0-9]+$ && $RATE -ge 1 ]] || die "RATE must be a positive integer"
[[ $RATE_CONNS =~ ^[0-9]+$ && $RATE_CONNS -ge 1 ]] || die "RATE_CONNS must be a positive integer"
[[ $CONNS =~ ^[0-9]+$ && $CONNS -ge 1 ]] || die "CONNS must be a positive integer"
[[ $STORM_PROCS =~ ^[0-9]+$ && $STORM_PROCS -ge 1 ]] || die "STORM_PROCS must be a positive integer"
[[ $STORM == 0 || $STORM == 1 ]] || die "STORM must be 0 or 1"
[[ -z $POSTERN_MESH_PROTOCOL || $POSTERN_MESH_PROTOCOL == http1 || $POSTERN_MESH_PROTOCOL == http2 ]] \
    || die "POSTERN_MESH_PROTOCOL must be empty, http1 or http2"
for s in $SCENARIOS; do [[ $s == direct || $s == postern || $s == nginx ]] || die "unknown scenario '$s'"; done
# Bound for every load run: the tool's own duration plus generous slack.
RUN_LIMIT=$((DUR_S * 3 + 30))

# ------------------------------------------------------------------- tools --
ensure_tools() {
    local need=()
    command -v wrk     >/dev/null || need+=(wrk)
    command -v h2load  >/dev/null || need+=(nghttp2-client)
    command -v nginx   >/dev/null || need+=(nginx)
    command -v curl    >/dev/null || need+=(curl)
    command -v openssl >/dev/null || need+=(openssl)
    command -v taskset >/dev/null || need+=(util-linux)
    command -v pgrep   >/dev/null || need+=(procps)
    command -v getconf >/dev/null || need+=(libc-bin)
    command -v timeout >/dev/null || need+=(coreutils)
    ((${#need[@]} == 0)) && return 0
    log "installing: ${need[*]}"
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "need root or sudo to install: ${need[*]}"
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# ------------------------------------------------------------ process care --
STARTED=()   # pids this script started; stopped at exit
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_http URL [curl args...]: poll until 200, bounded. With WAIT_PID set,
# give up as soon as that process has exited.
WAIT_PID=

others_ticks() {   # others_ticks BEFORE AFTER
    awk 'NR == FNR { b[$1] = $2; next } { a[$1] = $2 }
         END {
             for (p in a) t += a[p] - ((p in b) ? b[p] : 0)
             for (p in b) if (!(p in a)) t -= b[p]
             print t + 0
         }' <(printf '%s\n' "$1") <(printf '%s\n' "$2")
}
status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }   # status_kib PID VmRSS|VmHWM
mib() { awk -v k="${1:-}" 'BEGIN{ if (k == "") print ""; else printf "%.1f", k / 1024 }'; }
threads_of() { awk '/^Threads:/{print $2}' "/proc/$1/status"; }
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)

COMMANDS=()   # exact commands run, for mesh-results.md
# run_logged OUTFILE cmd...: record the command, run it bounded by RUN_LIMIT
# seconds, keep its output. Run in the background and waited for, so that a
# signal stops the script (and, through cleanup, the tool) at once.
run_logged() {
    local outf=$1 pid rc=0
    shift
    COMMANDS+=("$(printf '%q ' "$@")")
    timeout -k 5 "$RUN_LIMIT" "$@" >"$outf" 2>&1 &
    pid=$!
    STARTED+=("$pid")
    wait "$pid" || rc=$?
    forget_pid "$pid"
    ((rc == 124)) && log "timed out after ${RUN_LIMIT}s: $*"
    return "$rc"
}

now() { date +%s.%N; }

# ------------------------------------------------------------- certificates --
# Leaves for A and B (B also DNS:$B_NAME for nginx A's proxy_ssl_name
# check); gen_ca and gen_leaf are in lib.sh.
gen_certs() {
    gen_ca
    gen_leaf a "URI:$ID_A"
    gen_leaf b "URI:$ID_B, DNS:$B_NAME"
    grep -q 'BEGIN PRIVATE KEY' "$CERTS/a-key.pem" || die "key is not PKCS#8 PEM: $CERTS/a-key.pem"
    log "certificates in $CERTS (CA, a-chain.pem/a-key.pem for $ID_A, b-chain.pem/b-key.pem for $ID_B + DNS:$B_NAME)"
}

# ------------------------------------------------------------------- nginx --
nginx_common() {   # nginx_common DIR: main-context lines shared by every nginx instance
    local dir=$1
    cat <<EOF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
EOF
}

# start_nginx NAME CPU: config already at $MESH/NAME/nginx.conf; sets LAST_PID
# to the master's pid. Not to be called in $(...): the pid must stay ours.
LAST_PID=
start_nginx() {
    local name=$1 cpu=$2 dir=$MESH/$1
    mkdir -p "$dir/tmp"
    nginx -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" || die "nginx config for $name is invalid (see $dir/error.log)"
    COMMANDS+=("$(printf '%q ' taskset -c "$cpu" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;')")
    taskset -c "$cpu" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;' \
        >"$dir/stdout.log" 2>&1 &
    LAST_PID=$!
    STARTED+=("$LAST_PID")
}

BACKEND_BODY='postern bench backend: ok'   # same backend as bench/run.sh
write_backend_conf() {
    local dir=$MESH/backend
    mkdir -p "$dir"
    {
        nginx_common "$dir"
        echo "http {"
        nginx_http_common "$dir"
        cat <<EOF
    default_type text/plain;
    server {
        listen $HOST:$BACKEND_PORT;
        location / { return 200 "$BACKEND_BODY\n"; }
    }
}
EOF
    } >"$dir/nginx.conf"
}

# nginx A: plain HTTP/1.1 listener, proxy_pass https:// to nginx B with a
# client certificate, B's certificate verified against the CA and the name
# $B_NAME, TLS sessions reused, 64 kept-alive upstream connections.
# nginx has no HTTP/2 upstream for proxy_pass, so the hop is HTTP/1.1 over TLS.
write_nginx_a_conf() {
    local dir=$MESH/nginx-a
    mkdir -p "$dir"
    {
        nginx_common "$dir"
        echo "http {"
        nginx_http_common "$dir"
        cat <<EOF
    upstream sidecar_b {
        server $HOST:$NGINX_B_PORT;
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    server {
        listen $HOST:$NGINX_A_PORT;
        location / {
            proxy_pass https://sidecar_b;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_certificate     $CERTS/a-chain.pem;
            proxy_ssl_certificate_key $CERTS/a-key.pem;
            proxy_ssl_trusted_certificate $CERTS/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name $B_NAME;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
        }
    }
}
EOF
    } >"$dir/nginx.conf"
}

# nginx B: TLS listener that requires a client certificate issued by the CA,
# proxying to the backend over kept-alive HTTP/1.1.
write_nginx_b_conf() {
    local dir=$MESH/nginx-b
    mkdir -p "$dir"
    {
        nginx_common "$dir"
        echo "http {"
        nginx_http_common "$dir"
        cat <<EOF
    upstream app {
        server $HOST:$BACKEND_PORT;
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    server {
        listen $HOST:$NGINX_B_PORT ssl;
        ssl_certificate     $CERTS/b-chain.pem;
        ssl_certificate_key $CERTS/b-key.pem;
        ssl_client_certificate $CERTS/ca.pem;
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:mesh:4m;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    } >"$dir/nginx.conf"
}

# ----------------------------------------------------------------- postern --
# postern_binary: sets POSTERN_PATH (builds first unless told not to).
POSTERN_PATH=
postern_binary() {
    if [[ -n $POSTERN_BIN ]]; then
        [[ -x $POSTERN_BIN ]] || die "POSTERN_BIN=$POSTERN_BIN is not an executable file"
        POSTERN_PATH=$(realpath "$POSTERN_BIN")
        return
    fi
    if [[ $SKIP_BUILD != 1 ]]; then
        log "building Postern: cargo build --release -p postern (in $REPO)"
        COMMANDS+=("(cd $(printf '%q' "$REPO") && cargo build --release -p postern)")
        if ! (cd "$REPO" && cargo build --release -p postern) >"$MESH/postern-build.log" 2>&1; then
            tail -n 30 "$MESH/postern-build.log" >&2
            die "Postern build failed (full log: $MESH/postern-build.log). Fix the build, or run with SCENARIOS=\"direct nginx\" to skip Postern."
        fi
    fi
    [[ -x $REPO/target/release/postern ]] || die "no Postern binary at $REPO/target/release/postern"
    POSTERN_PATH=$REPO/target/release/postern
}

# Sidecar A: plain HTTP listener, cluster "b" to sidecar B over mesh mTLS
# (B's SPIFFE ID required; HTTP/2 via ALPN unless POSTERN_MESH_PROTOCOL is set).
write_postern_a_conf() {
    local dir=$MESH/postern-a
    mkdir -p "$dir"
    {
        cat <<EOF
admin:
  address: $HOST:$POSTERN_A_ADMIN_PORT
drain_timeout: 1s
EOF
        postern_identity "$ID_A" a
        cat <<EOF
listeners:
  - name: outbound
    address: $HOST:$POSTERN_A_PORT
    kind: http
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: all
            match: { path: { prefix: "/" } }
            cluster: b
clusters:
  - name: b
EOF
        if [[ -n $POSTERN_MESH_PROTOCOL ]]; then echo "    protocol: $POSTERN_MESH_PROTOCOL"; fi
        cat <<EOF
    endpoints:
      - address: $HOST:$POSTERN_B_PORT
    tls:
      mode: mesh
      identities: ["$ID_B"]
EOF
    } >"$dir/postern.yaml"
}

# Sidecar B: HTTP listener with strict mTLS, cluster "app" plain to the backend.
write_postern_b_conf() {
    local dir=$MESH/postern-b
    mkdir -p "$dir"
    {
        cat <<EOF
admin:
  address: $HOST:$POSTERN_B_ADMIN_PORT
drain_timeout: 1s
EOF
        postern_identity "$ID_B" b
        cat <<EOF
listeners:
  - name: inbound
    address: $HOST:$POSTERN_B_PORT
    kind: http
    mtls:
      mode: strict
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: all
            match: { path: { prefix: "/" } }
            cluster: app
clusters:
  - name: app
    endpoints:
      - address: $HOST:$BACKEND_PORT
EOF
    } >"$dir/postern.yaml"
}

POSTERN_HINT="the Postern binary may not support the mesh config yet (identity, listener mtls, cluster tls); run with SCENARIOS=\"direct nginx\" to skip Postern"

postern_validate() {   # postern_validate BIN SIDE
    local bin=$1 side=$2 f=$MESH/postern-$2/postern.yaml
    if ! "$bin" validate --config "$f" >"$MESH/postern-$side/validate.log" 2>&1; then
        sed 's/^/    /' "$MESH/postern-$side/validate.log" >&2
        die "Postern rejects the config for sidecar ${side^^} ($f): $POSTERN_HINT"
    fi
}

start_postern() {   # start_postern BIN SIDE; sets LAST_PID
    local bin=$1 side=$2 dir=$MESH/postern-$2
    COMMANDS+=("$(printf '%q ' env POSTERN_WORKER_THREADS=1 RUST_LOG=warn taskset -c "$PROXY_CPU" "$bin" run --config "$dir/postern.yaml")")
    echo "=== $(date -u +%H:%M:%S) starting: $bin run --config $dir/postern.yaml" >>"$dir/postern.log"
    POSTERN_WORKER_THREADS=1 RUST_LOG=warn taskset -c "$PROXY_CPU" "$bin" run --config "$dir/postern.yaml" \
        >>"$dir/postern.log" 2>&1 &
    LAST_PID=$!
    STARTED+=("$LAST_PID")
}

# start_postern_ready BIN SIDE ADMIN_PORT: start it and wait for /ready; sets LAST_PID or dies.
start_postern_ready() {
    local bin=$1 side=$2 admin=$3 pid dir=$MESH/postern-$2
    start_postern "$bin" "$side"
    pid=$LAST_PID
    if ! WAIT_PID=$pid wait_http "http://$HOST:$admin/ready"; then
        if kill -0 "$pid" 2>/dev/null; then
            log "Postern ${side^^} (pid $pid) is running but /ready did not answer 200 within $READY_TRIES tries"
        else
            local rc=0
            wait "$pid" 2>/dev/null || rc=$?
            forget_pid "$pid"
            log "Postern ${side^^} exited with status $rc"
        fi
        log "last lines of $dir/postern.log:"
        tail -n 20 "$dir/postern.log" >&2 || true
        die "Postern sidecar ${side^^} did not become ready on http://$HOST:$admin/ready: $POSTERN_HINT"
    fi
    LAST_PID=$pid
}

# --------------------------------------------------------- pair lifecycle --
# start_pair SCENARIO: start sidecar B then A (fresh), check the path; sets
# A_PIDS, B_PIDS (CPU accounting), A_RSS_PID, B_RSS_PID, A_MAIN, B_MAIN.
A_PIDS=() B_PIDS=() A_RSS_PID='' B_RSS_PID='' A_MAIN='' B_MAIN=''
start_b() {   # start_b SCENARIO: sets B_PIDS, B_RSS_PID, B_MAIN
    local sc=$1 w
    case $sc in
        nginx)
            write_nginx_b_conf
            start_nginx nginx-b "$PROXY_CPU"
            B_MAIN=$LAST_PID
            w=$(nginx_worker "$B_MAIN") || die "nginx B has no worker (see $MESH/nginx-b/error.log)"
            B_PIDS=("$B_MAIN" "$w")
            B_RSS_PID=$w
            ;;
        postern)
            write_postern_b_conf
            start_postern_ready "$POSTERN_PATH" b "$POSTERN_B_ADMIN_PORT"
            B_MAIN=$LAST_PID
            B_PIDS=("$B_MAIN")
            B_RSS_PID=$B_MAIN
            ;;
    esac
    check_b "$sc"
}
start_a() {   # start_a SCENARIO: sets A_PIDS, A_RSS_PID, A_MAIN
    local sc=$1 w
    case $sc in
        nginx)
            write_nginx_a_conf
            start_nginx nginx-a "$PROXY_CPU"
            A_MAIN=$LAST_PID
            w=$(nginx_worker "$A_MAIN") || die "nginx A has no worker (see $MESH/nginx-a/error.log)"
            A_PIDS=("$A_MAIN" "$w")
            A_RSS_PID=$w
            ;;
        postern)
            write_postern_a_conf
            start_postern_ready "$POSTERN_PATH" a "$POSTERN_A_ADMIN_PORT"
            A_MAIN=$LAST_PID
            A_PIDS=("$A_MAIN")
            A_RSS_PID=$A_MAIN
            ;;
    esac
}
b_port() { [[ $1 == nginx ]] && echo "$NGINX_B_PORT" || echo "$POSTERN_B_PORT"; }
a_port() { [[ $1 == nginx ]] && echo "$NGINX_A_PORT" || echo "$POSTERN_A_PORT"; }
b_log() { [[ $1 == nginx ]] && echo "$MESH/nginx-b/error.log" || echo "$MESH/postern-b/postern.log"; }
a_log() { [[ $1 == nginx ]] && echo "$MESH/nginx-a/error.log" || echo "$MESH/postern-a/postern.log"; }

declare -A R   # results: R[scenario/metric]

# check_b SCENARIO: B must serve a client with A's certificate and refuse one
# without a certificate. Also records the TLS version and ALPN B negotiates.
check_b() {
    local sc=$1 port url code body tls
    port=$(b_port "$sc")
    url="https://$B_NAME:$port/"
    local curl_tls=(--resolve "$B_NAME:$port:$HOST" --cacert "$CERTS/ca.pem")
    if ! wait_http "$url" "${curl_tls[@]}" --cert "$CERTS/a-chain.pem" --key "$CERTS/a-key.pem"; then
        curl -sS -m 2 -o /dev/null "${curl_tls[@]}" --cert "$CERTS/a-chain.pem" --key "$CERTS/a-key.pem" "$url" 2>&1 | sed 's/^/    /' >&2 || true
        die "$sc: sidecar B ($url) does not answer 200 to a client with A's certificate (log: $(b_log "$sc"))"
    fi
    body=$(curl -s -m 2 "${curl_tls[@]}" --cert "$CERTS/a-chain.pem" --key "$CERTS/a-key.pem" "$url")
    [[ $body == "$BACKEND_BODY" ]] || die "$sc: unexpected body from sidecar B ($url): '$body'"
    code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' "${curl_tls[@]}" "$url" || true)
    if [[ $code == 200 ]]; then
        die "$sc: sidecar B ($url) answered 200 to a client without a certificate; mTLS is not enforced"
    fi
    R[$sc/nocert]="refused (HTTP code ${code:-000}; 000 = TLS handshake or connection failed)"
    log "$sc: sidecar B serves A's certificate and refuses a client without one (HTTP code $code)"
    tls=$(timeout 5 openssl s_client -connect "$HOST:$port" -servername "$B_NAME" -brief -alpn h2,http/1.1 \
              -cert "$CERTS/a-chain.pem" -key "$CERTS/a-key.pem" -CAfile "$CERTS/ca.pem" </dev/null 2>&1 || true)
    R[$sc/tls]="$(awk -F': ' '/^Protocol version/{p=$2} /^Ciphersuite/{c=$2} /^(Peer|Server) Temp Key/{k=$2} END{printf "%s, %s, key exchange %s", p, c, k}' <<<"$tls")"
    R[$sc/alpn]=$(awk -F': ' '/^ALPN protocol/{print $2}' <<<"$tls")
    R[$sc/alpn]=${R[$sc/alpn]:-none}
}

# check_path SCENARIO: one request through A reaches the backend.
check_path() {
    local sc=$1 url body
    url="http://$HOST:$(a_port "$sc")/"
    if ! WAIT_PID=$A_MAIN wait_http "$url"; then
        curl -sS -m 2 -i "$url" 2>&1 | head -n 5 | sed 's/^/    /' >&2 || true
        log "last lines of $(a_log "$sc"):"; tail -n 10 "$(a_log "$sc")" >&2 || true
        log "last lines of $(b_log "$sc"):"; tail -n 10 "$(b_log "$sc")" >&2 || true
        local hint=
        [[ $sc == postern ]] && hint=": $POSTERN_HINT"
        die "$sc: a request through sidecar A ($url) did not get 200 from the backend$hint"
    fi
    body=$(curl -s -m 2 "$url")
    [[ $body == "$BACKEND_BODY" ]] || die "$sc: unexpected body through sidecar A ($url): '$body'"
}

stop_pair() {
    if [[ -n $A_MAIN ]]; then stop_pid "$A_MAIN"; fi
    if [[ -n $B_MAIN ]]; then stop_pid "$B_MAIN"; fi
    A_MAIN='' B_MAIN='' A_PIDS=() B_PIDS=() A_RSS_PID='' B_RSS_PID=''
}

# -------------------------------------------------------------------- load --
per_req() {   # per_req TICKS N: µs of CPU per request
    awk -v t="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN{printf "%.1f", t / hz * 1e6 / n}'
}

# measure SCENARIO: warm-up, fixed-rate run (latency, CPU), max-throughput run
# (wrk), RSS. For direct, the client talks to the backend; otherwise to A.
measure() {
    local sc=$1 url tag=$1 dir=$MESH/runs
    if [[ $sc == direct ]]; then url="http://$HOST:$BACKEND_PORT/"; else url="http://$HOST:$(a_port "$sc")/"; fi
    wait_http "$url" || die "$tag: $url did not answer 200"

    # 1. warm-up (not measured); for the pairs this also opens the A->B connections
    if ((WARM_S > 0)); then
        log "$tag: warm-up ${WARM_S}s"
        run_logged "$dir/$tag-warmup.txt" taskset -c "$LOAD_CPU" h2load --h1 -t1 -c "$RATE_CONNS" -m1 -D "${WARM_S}s" "$url" \
            || die "$tag: warm-up failed, see $dir/$tag-warmup.txt"
    fi

    # 2. fixed rate, as in bench/run.sh: RATE req/s over RATE_CONNS
    #    connections (h2load --rps per connection), connections opened 1 ms
    #    apart so their send timers are not in phase, RATE*DURATION requests.
    local per_conn nreq w_others w_start
    local a0=0 a1=0 b0=0 b1=0
    per_conn=$(awk -v r="$RATE" -v c="$RATE_CONNS" 'BEGIN{printf "%g", r/c}')
    nreq=$((RATE * DUR_S))
    rm -f "$dir/$tag-rate.tsv"
    log "$tag: fixed rate $RATE req/s for ${DUR_S}s ($nreq requests)"
    w_start=$SECONDS
    w_others=$(others_snapshot "${BACKEND_PIDS[@]}" "${A_PIDS[@]}" "${B_PIDS[@]}")
    if ((${#A_PIDS[@]})); then a0=$(cpu_ticks "${A_PIDS[@]}"); b0=$(cpu_ticks "${B_PIDS[@]}"); fi
    run_logged "$dir/$tag-rate.txt" taskset -c "$LOAD_CPU" h2load --h1 -t1 -c "$RATE_CONNS" -m1 \
        --rps "$per_conn" -r1 --rate-period 1ms -n "$nreq" --log-file "$dir/$tag-rate.tsv" "$url" \
        || die "$tag: h2load fixed-rate run failed, see $dir/$tag-rate.txt"
    if ((${#A_PIDS[@]})); then a1=$(cpu_ticks "${A_PIDS[@]}"); b1=$(cpu_ticks "${B_PIDS[@]}"); fi

    local done_n ok_n held p50 p99 p999
    done_n=$(awk '/^requests:/{print $6}' "$dir/$tag-rate.txt")
    ok_n=$(awk '/^status codes:/{print $3}' "$dir/$tag-rate.txt")
    held=$(awk '/^finished in/{print $4}' "$dir/$tag-rate.txt" | tr -d ',')
    [[ ${done_n:-0} =~ ^[0-9]+$ && ${done_n:-0} -gt 0 ]] || die "$tag: no request completed in the fixed-rate run, see $dir/$tag-rate.txt"
    read -r p50 p99 p999 _ < <(latency_percentiles "$dir/$tag-rate.tsv")
    R[$sc/held]=$held R[$sc/p50]=$p50 R[$sc/p99]=$p99 R[$sc/p999]=$p999
    if [[ ${ok_n:-0} -lt $nreq ]]; then
        log "WARNING $tag: only $ok_n of $nreq requests got a 2xx in the fixed-rate run"
        R[$sc/warn]+=" fixed-rate: $ok_n/$nreq 2xx;"
    fi
    if awk -v h="$held" -v r="$RATE" 'BEGIN{exit !(h < 0.97 * r)}'; then
        log "WARNING $tag: achieved only $held req/s of the $RATE target"
        R[$sc/warn]+=" rate not held ($held req/s);"
    fi
    if ((${#A_PIDS[@]})); then
        R[$sc/cpu_a]=$(per_req $((a1 - a0)) "$done_n")
        R[$sc/cpu_b]=$(per_req $((b1 - b0)) "$done_n")
        R[$sc/cpu]=$(per_req $((a1 - a0 + b1 - b0)) "$done_n")
    fi

    # 3. max throughput at fixed concurrency (wrk, HTTP/1.1)
    local rps
    log "$tag: max throughput, wrk -c $CONNS for ${DUR_S}s"
    run_logged "$dir/$tag-max.txt" taskset -c "$LOAD_CPU" wrk -t1 -c "$CONNS" -d "${DUR_S}s" --latency "$url" \
        || die "$tag: wrk failed, see $dir/$tag-max.txt"
    rps=$(awk '/^Requests\/sec:/{print $2}' "$dir/$tag-max.txt")
    if grep -q 'Non-2xx or 3xx responses' "$dir/$tag-max.txt" || grep -q '^  Socket errors' "$dir/$tag-max.txt"; then
        R[$sc/warn]+=" max: errors (see mesh/runs/$tag-max.txt);"
    fi
    R[$sc/max]=$(awk -v x="$rps" 'BEGIN{printf "%.0f", x}')

    # 4. memory: VmRSS right after the max-throughput run, peak VmHWM over the row
    if [[ -n $A_RSS_PID ]]; then
        R[$sc/rss_a]=$(mib "$(status_kib "$A_RSS_PID" VmRSS)")
        R[$sc/hwm_a]=$(mib "$(status_kib "$A_RSS_PID" VmHWM)")
        R[$sc/rss_b]=$(mib "$(status_kib "$B_RSS_PID" VmRSS)")
        R[$sc/hwm_b]=$(mib "$(status_kib "$B_RSS_PID" VmHWM)")
    fi

    # noisy-machine check over both measured runs, as in bench/run.sh
    local other_ticks elapsed other_pct
    other_ticks=$(others_ticks "$w_others" "$(others_snapshot "${BACKEND_PIDS[@]}" "${A_PIDS[@]}" "${B_PIDS[@]}")")
    elapsed=$((SECONDS - w_start))
    other_pct=$(awk -v t="$other_ticks" -v hz="$CLK_TCK" -v s="$elapsed" 'BEGIN{printf "%d", (s > 0 ? 100 * t / hz / s : 0)}')
    R[$sc/other]=$other_pct
    if ((other_pct > 5)); then
        log "WARNING $tag: other processes used ${other_pct}% of a core during the runs; numbers are skewed"
        R[$sc/warn]+=" other processes used ${other_pct}% of a core during the runs (noisy machine);"
    fi
}

# storm SCENARIO: STORM_PROCS parallel `openssl s_time -new` against a fresh
# sidecar B for STORM_TIME; each connection is a full mTLS handshake (A's
# certificate, no session resumption, no request). B's CPU per handshake is
# from /proc/PID/stat over the storm.
storm() {
    local sc=$1 port dir=$MESH/runs i pids=() rc t0 t1 c0 c1 total=0 n tag="$1-storm"
    port=$(b_port "$sc")
    start_b "$sc"
    log "$tag: $STORM_PROCS x openssl s_time -new for ${STORM_S}s against sidecar B ($HOST:$port)"
    local cmd=(taskset -c "$LOAD_CPU" openssl s_time -connect "$HOST:$port" -new -time "$STORM_S"
               -cert "$CERTS/a-chain.pem" -key "$CERTS/a-key.pem" -CAfile "$CERTS/ca.pem")
    COMMANDS+=("$STORM_PROCS x: $(printf '%q ' "${cmd[@]}")")
    local w_others
    w_others=$(others_snapshot "${BACKEND_PIDS[@]}" "${B_PIDS[@]}")
    c0=$(cpu_ticks "${B_PIDS[@]}")
    t0=$(now)
    for ((i = 0; i < STORM_PROCS; i++)); do
        timeout -k 5 $((STORM_S + 30)) "${cmd[@]}" >"$dir/$tag-$i.txt" 2>&1 &
        pids+=("$!")
        STARTED+=("$!")
    done
    for i in "${!pids[@]}"; do
        rc=0
        wait "${pids[$i]}" || rc=$?
        forget_pid "${pids[$i]}"
        ((rc == 0)) || die "$tag: openssl s_time failed (status $rc), see $dir/$tag-$i.txt"
        # "N connections in T real seconds, B bytes read per connection"
        n=$(awk '/connections in .* real seconds/{print $1; exit}' "$dir/$tag-$i.txt")
        [[ $n =~ ^[0-9]+$ ]] || die "$tag: cannot read the connection count from $dir/$tag-$i.txt"
        total=$((total + n))
    done
    t1=$(now)
    c1=$(cpu_ticks "${B_PIDS[@]}")
    local secs other_ticks other_pct
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b - a}')
    ((total > 0)) || die "$tag: no handshake completed, see $dir/$tag-*.txt and $(b_log "$sc")"
    R[$sc/hs_n]=$total
    R[$sc/hs_rate]=$(awk -v n="$total" -v s="$secs" 'BEGIN{printf "%.0f", n / s}')
    R[$sc/hs_cpu]=$(per_req $((c1 - c0)) "$total")
    R[$sc/hs_busy]=$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v s="$secs" 'BEGIN{printf "%.0f", 100 * t / hz / s}')
    R[$sc/hs_hwm]=$(mib "$(status_kib "$B_RSS_PID" VmHWM)")
    other_ticks=$(others_ticks "$w_others" "$(others_snapshot "${BACKEND_PIDS[@]}" "${B_PIDS[@]}")")
    other_pct=$(awk -v t="$other_ticks" -v hz="$CLK_TCK" -v s="$secs" 'BEGIN{printf "%d", 100 * t / hz / s}')
    R[$sc/hs_other]=$other_pct
    if ((other_pct > 5)); then
        log "WARNING $tag: other processes used ${other_pct}% of a core during the storm; numbers are skewed"
        R[$sc/warn]+=" storm: other processes used ${other_pct}% of a core (noisy machine);"
    fi
    log "$tag: $total handshakes in ${secs}s (${R[$sc/hs_rate]}/s), B ${R[$sc/hs_cpu]} µs CPU per handshake"
    stop_pid "$B_MAIN"
    B_MAIN='' B_PIDS=() B_RSS_PID=''
}

# ------------------------------------------------------------------ report --
v() { local x=${R[$1]:-}; echo "${x:-—}"; }
added() {   # added SC: p50(SC) - p50(direct)
    awk -v a="${R[$1/p50]:-}" -v b="${R[direct/p50]:-}" 'BEGIN{ if (a == "" || b == "" || a == "NA" || b == "NA") print "—"; else printf "%+d", a - b }'
}
sc_name() { case $1 in direct) echo direct ;; postern) echo "Postern pair" ;; nginx) echo "nginx pair" ;; esac; }
hop() { case $1 in direct) echo "—" ;; postern) echo "mTLS, ALPN ${R[postern/alpn]:-?}${POSTERN_MESH_PROTOCOL:+ (protocol: $POSTERN_MESH_PROTOCOL)}" ;; nginx) echo "mTLS, HTTP/1.1 (keepalive 64)" ;; esac; }
cpu_cell() {
    [[ -n ${R[$1/cpu]:-} ]] || { echo "—"; return; }
    echo "${R[$1/cpu]} (A ${R[$1/cpu_a]} + B ${R[$1/cpu_b]})"
}

report() {
    local sc
    echo "| path | A→B hop | max req/s (wrk -c $CONNS) | held req/s @${RATE} | p50 µs | p99 µs | p99.9 µs | added p50 µs vs direct | sidecars CPU µs/req (A+B) | A RSS after max MiB | A peak RSS MiB | B RSS after max MiB | B peak RSS MiB |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    for sc in $SCENARIOS; do
        echo "| $(sc_name "$sc") | $(hop "$sc") | $(v "$sc/max") | $(v "$sc/held") | $(v "$sc/p50") | $(v "$sc/p99") | $(v "$sc/p999") | $(added "$sc") | $(cpu_cell "$sc") | $(v "$sc/rss_a") | $(v "$sc/hwm_a") | $(v "$sc/rss_b") | $(v "$sc/hwm_b") |"
    done
    echo
    if ((STORM)) && [[ " $SCENARIOS " == *" nginx "* || " $SCENARIOS " == *" postern "* ]]; then
        echo "Handshake storm: new mTLS handshakes against sidecar B's listener, $STORM_PROCS × \`openssl s_time -new\` for ${STORM_S}s (client cert A, no resumption, no request):"
        echo
        echo "| sidecar B | TLS | handshakes | handshakes/s | B CPU µs/handshake | B CPU (% of a core) | B peak RSS MiB |"
        echo "|---|---|---:|---:|---:|---:|---:|"
        for sc in $SCENARIOS; do
            [[ $sc == direct ]] && continue
            echo "| $(sc_name "$sc" | sed 's/ pair//') B | $(v "$sc/tls") | $(v "$sc/hs_n") | $(v "$sc/hs_rate") | $(v "$sc/hs_cpu") | $(v "$sc/hs_busy") | $(v "$sc/hs_hwm") |"
        done
        echo
    fi
    local warned=0 key
    for key in "${!R[@]}"; do
        if [[ $key == */warn ]]; then
            ((warned == 0)) && { echo "Warnings:"; echo; }
            warned=1
            echo "- ${key%/warn}:${R[$key]}"
        fi
    done
    ((warned)) && echo
    return 0
}

# -------------------------------------------------------------------- main --
main() {
    mkdir -p "$OUT"
    ensure_tools
    (($(nproc) >= 2)) || log "WARNING: fewer than 2 CPUs; pinning to $PROXY_CPU and $LOAD_CPU will fail"
    local nginx_version
    nginx_version=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
    [[ -n $nginx_version ]] || die "cannot read the nginx version from 'nginx -v'"
    nginx -V 2>&1 | grep -q -- '--with-http_ssl_module' || die "this nginx has no http_ssl_module (nginx -V)"

    local p busy
    for p in "$BACKEND_PORT" "$POSTERN_A_PORT" "$POSTERN_B_PORT" "$POSTERN_A_ADMIN_PORT" "$POSTERN_B_ADMIN_PORT" "$NGINX_A_PORT" "$NGINX_B_PORT"; do
        port_free "$p" || die "port $HOST:$p is already in use"
    done

    rm -rf "$MESH"
    mkdir -p "$MESH/runs"

    if [[ " $SCENARIOS " == *" postern "* ]]; then
        postern_binary
        log "Postern binary: $POSTERN_PATH"
    fi

    # (after the build: a build in progress is exactly what this catches)
    busy=$(cpu_busy_pct)
    local quiet_note
    quiet_note="CPU busy before the run: ${busy}% of all cores (load average $(cut -d' ' -f1-3 /proc/loadavg))."
    if ((busy > 10)); then
        log "WARNING: the machine is already ${busy}% busy; other load (a cargo build?) will skew the numbers"
        quiet_note+=" WARNING: not a quiet machine, numbers are skewed."
    fi

    gen_certs

    # backend, shared by every row, on the load generator's core
    write_backend_conf
    local backend_master
    start_nginx backend "$LOAD_CPU"
    backend_master=$LAST_PID
    wait_http "http://$HOST:$BACKEND_PORT/" || die "backend nginx did not start (see $MESH/backend/error.log)"
    BACKEND_PIDS=("$backend_master" "$(nginx_worker "$backend_master")")
    log "backend nginx $nginx_version up (pids ${BACKEND_PIDS[*]})"

    # Pre-flight: fail before any measurement if the Postern pair cannot serve.
    if [[ -n $POSTERN_PATH ]]; then
        write_postern_a_conf
        write_postern_b_conf
        postern_validate "$POSTERN_PATH" b
        postern_validate "$POSTERN_PATH" a
        start_b postern
        start_a postern
        check_path postern
        stop_pair
        log "Postern pre-flight OK"
    fi

    local sc
    for sc in $SCENARIOS; do
        case $sc in
            direct)
                A_PIDS=() B_PIDS=() A_RSS_PID='' B_RSS_PID=''
                measure direct
                ;;
            nginx | postern)
                # a fresh pair per row, so peak RSS belongs to that row
                start_b "$sc"
                start_a "$sc"
                check_path "$sc"
                if [[ $sc == postern ]]; then R[postern/threads]="A $(threads_of "$A_MAIN"), B $(threads_of "$B_MAIN")"; fi
                measure "$sc"
                stop_pair
                # and a fresh B for the handshake storm
                if ((STORM)); then storm "$sc"; fi
                ;;
        esac
    done

    local table
    table=$(report)
    printf '\n%s\n' "$table"

    {
        echo "# Postern mesh benchmark results"
        echo
        echo "Path: client → sidecar A (plain HTTP/1.1) → mTLS → sidecar B (requires a client certificate) → backend; the direct row is client → backend."
        echo
        echo "Run at $(date -u '+%Y-%m-%d %H:%M:%SZ') on $(uname -srm), $(nproc) CPUs ($(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo))."
        echo "Git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no commit')$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' (work tree differs)')."
        echo "Tools: nginx $nginx_version ($(nginx -V 2>&1 | sed -n 's/^built with //p' | head -n1)), $(wrk --version 2>&1 | head -n1 | awk '{print $1, $2}'), $(h2load --version 2>&1 | head -n1), $(openssl version)."
        echo
        echo "Settings: DURATION=$DURATION WARMUP=$WARMUP RATE=$RATE RATE_CONNS=$RATE_CONNS CONNS=$CONNS STORM=$STORM STORM_TIME=$STORM_TIME STORM_PROCS=$STORM_PROCS POSTERN_MESH_PROTOCOL=${POSTERN_MESH_PROTOCOL:-unset}; both sidecars on CPU $PROXY_CPU, load generator and backend on CPU $LOAD_CPU; CLK_TCK=$CLK_TCK."
        echo "$quiet_note Load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)."
        if [[ -n ${R[postern/threads]:-} ]]; then echo "Postern threads after start-up: ${R[postern/threads]}."; fi
        echo
        echo "$table"
        echo
        local others=() s
        for s in $SCENARIOS; do others+=("$s ${R[$s/other]:-?}%"); [[ -n ${R[$s/hs_other]:-} ]] && others+=("$s storm ${R[$s/hs_other]}%"); done
        echo "CPU used by other processes during each row's measured runs (share of one core; should be near 0): $(printf '%s; ' "${others[@]}")"
        echo
        echo "Checks before each proxy row: sidecar B answers the backend's body to a client with A's certificate and refuses a client without a certificate (nginx: ${R[nginx/nocert]:-—}; Postern: ${R[postern/nocert]:-—}); a request through A returns the backend's body."
        echo
        echo "## Notes"
        echo
        echo "- *max req/s* is wrk (HTTP/1.1, $CONNS connections) against sidecar A (or the backend for *direct*). Latency, CPU and *held req/s* come from a separate run at a fixed $RATE req/s (h2load --h1 --rps, $RATE_CONNS connections, $((RATE * DUR_S)) requests, as in bench/run.sh); latency is per request from h2load's --log-file. *added p50* is the row's p50 minus the direct row's p50 in the same run."
        echo "- Sidecars CPU is utime+stime from /proc/PID/stat over the fixed-rate run, divided by the responses received: nginx counts master+worker of both A and B, Postern both processes (all threads). RSS is VmRSS right after the max-throughput run and VmHWM (peak) over the row, of the nginx worker or the Postern process; each proxy row starts a fresh pair, and the storm a fresh B."
        echo "- Both sidecars of a pair share CPU $PROXY_CPU: nginx with worker_processes 1 each, Postern with POSTERN_WORKER_THREADS=1 each."
        echo "- A→B hop: nginx $nginx_version has no HTTP/2 to upstreams for proxy_pass (proxy_http_version takes 1.0 or 1.1 only), so nginx A speaks HTTP/1.1 over TLS to B, one request per connection at a time, up to 64 kept-alive connections (upstream keepalive 64, proxy_ssl_session_reuse on). Postern A's cluster uses mesh mTLS with ALPN choosing the protocol. To an offer of h2,http/1.1 the B listeners answered ALPN: nginx B '${R[nginx/alpn]:-not run}' (no http2 on B's listener: nginx A could not use it), Postern B '${R[postern/alpn]:-not run}'."
        echo "- nginx A verifies B's certificate against the CA and the name $B_NAME (proxy_ssl_verify on, proxy_ssl_name); Postern A requires B's SPIFFE ID $ID_B. Both B's require a client certificate from the CA (nginx: ssl_verify_client on)."
        echo "- Certificates: EC P-256 CA; leaves for A ($ID_A) and B ($ID_B, DNS:$B_NAME), EKU serverAuth+clientAuth, PKCS#8 keys; *-chain.pem holds the leaf only. Generated fresh per run in mesh/certs/."
        echo "- Handshake storm: each s_time connection is a full handshake with A's client certificate and then a close (no request, no resumption); s_time runs on CPU $LOAD_CPU, B on CPU $PROXY_CPU. *handshakes/s* is the sum over the s_time processes divided by the wall time of the storm; the client side does about as much crypto as B, so *B CPU µs/handshake* is the figure to compare."
        echo
        echo "## Configs"
        echo
        echo "Files under bench/out/mesh/: backend/nginx.conf, nginx-a/nginx.conf, nginx-b/nginx.conf, postern-a/postern.yaml, postern-b/postern.yaml, certs/; raw tool output in runs/."
        echo
        echo "## Commands"
        echo
        echo '```'
        printf '%s\n' "${COMMANDS[@]}"
        echo '```'
    } >"$OUT/mesh-results.md"
    log "wrote $OUT/mesh-results.md"
}

main "$@"
