#!/usr/bin/env bash
# Postern benchmark: direct vs Postern vs nginx reverse proxy, HTTP/1.1 and
# HTTP/2 cleartext (prior knowledge), all on loopback. See bench/README.md.
#
# Everything it starts (backend nginx, nginx proxy, Postern) runs from a
# scratch prefix under $OUT and is stopped at exit. Every load run is bounded
# in time. Results go to $OUT/results.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ---------------------------------------------------------------- settings --
OUT=${OUT:-$REPO/bench/out}
DURATION=${DURATION:-10s}          # each measured run (max-throughput and fixed-rate)
WARMUP=${WARMUP:-2s}               # unmeasured warm-up before each row
RATE=${RATE:-2000}                 # fixed request rate for the latency/CPU run (req/s)
RATE_CONNS=${RATE_CONNS:-20}       # connections sharing that rate (RATE/RATE_CONNS each)
CONNS=${CONNS:-32}                 # HTTP/1.1 max-throughput: wrk connections
H2_CONNS=${H2_CONNS:-8}            # HTTP/2 max-throughput: h2load connections ...
H2_STREAMS=${H2_STREAMS:-4}        # ... times concurrent streams each (= CONNS in flight)
SCENARIOS=${SCENARIOS:-"direct postern nginx"}
PROTOCOLS=${PROTOCOLS:-"h1 h2"}
PROXY_CPU=${PROXY_CPU:-0}          # core for the proxy under test
LOAD_CPU=${LOAD_CPU:-1}            # core for the load generator and the backend
POSTERN_BIN=${POSTERN_BIN:-}       # use this binary instead of building one
SKIP_BUILD=${SKIP_BUILD:-0}        # 1: use $REPO/target/release/postern as it is
POSTERN_UPSTREAM=${POSTERN_UPSTREAM:-http1}  # cluster protocol; nginx proxy always speaks http1 upstream
READY_TRIES=${READY_TRIES:-100}    # readiness polls, 0.1 s apart

BACKEND_H1_PORT=${BACKEND_H1_PORT:-18081}
BACKEND_H2_PORT=${BACKEND_H2_PORT:-18082}
POSTERN_PORT=${POSTERN_PORT:-18080}
POSTERN_ADMIN_PORT=${POSTERN_ADMIN_PORT:-18079}
NGINX_H1_PORT=${NGINX_H1_PORT:-18090}
NGINX_H2_PORT=${NGINX_H2_PORT:-18091}
HOST=127.0.0.1                     # loopback only, on purpose: not configurable

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

# Helpers shared with the other benchmark scripts.
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

DUR_S=$(to_seconds "$DURATION")
WARM_S=$(to_seconds "$WARMUP")
[[ $DUR_S =~ ^[0-9]+$ && $DUR_S -ge 1 ]] || die "DURATION must be whole seconds (e.g. 10s), got '$DURATION'"
[[ $WARM_S =~ ^[0-9]+$ ]] || die "WARMUP must be whole seconds (e.g. 2s), got '$WARMUP'"
[[ $RATE =~ ^[0-9]+$ && $RATE -ge 1 ]] || die "RATE must be a positive integer"
[[ $RATE_CONNS =~ ^[0-9]+$ && $RATE_CONNS -ge 1 ]] || die "RATE_CONNS must be a positive integer"
for s in $SCENARIOS; do [[ $s == direct || $s == postern || $s == nginx ]] || die "unknown scenario '$s'"; done
for p in $PROTOCOLS; do [[ $p == h1 || $p == h2 ]] || die "unknown protocol '$p'"; done

# ------------------------------------------------------------------- tools --
ensure_tools() {
    local need=()
    command -v wrk     >/dev/null || need+=(wrk)
    command -v h2load  >/dev/null || need+=(nghttp2-client)
    command -v nginx   >/dev/null || need+=(nginx)
    command -v curl    >/dev/null || need+=(curl)
    command -v taskset >/dev/null || need+=(util-linux)
    command -v pgrep   >/dev/null || need+=(procps)
    command -v getconf >/dev/null || need+=(libc-bin)
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

# others_ticks BEFORE AFTER: ticks used between two snapshots. A process gone
# by AFTER has had its total added to its parent when reaped; take its time
# from before the window back out.
others_ticks() {
    awk 'NR == FNR { b[$1] = $2; next } { a[$1] = $2 }
         END {
             for (p in a) t += a[p] - ((p in b) ? b[p] : 0)
             for (p in b) if (!(p in a)) t -= b[p]
             print t + 0
         }' <(printf '%s\n' "$1") <(printf '%s\n' "$2")
}
vm_hwm_kib() { awk '/^VmHWM:/{print $2}' "/proc/$1/status"; }
threads_of() { awk '/^Threads:/{print $2}' "/proc/$1/status"; }
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)

COMMANDS=()   # exact commands run, for results.md
# run_logged OUTFILE cmd...: record the command, run it, keep its output.
# Run in the background and waited for, so that a signal stops the script
# (and, through cleanup, the tool) at once instead of after the run.
run_logged() {
    local outf=$1 pid rc=0
    shift
    COMMANDS+=("$(printf '%q ' "$@")")
    "$@" >"$outf" 2>&1 &
    pid=$!
    STARTED+=("$pid")
    wait "$pid" || rc=$?
    forget_pid "$pid"
    return "$rc"
}

# ------------------------------------------------------------------- nginx --
nginx_common() {   # nginx_common DIR: main-context lines shared by both nginx instances
    local dir=$1
    cat <<EOF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
EOF
}

# HTTP/2 cleartext listen syntax: "listen P http2;" before 1.25.1, "http2 on;" after.
NGINX_VERSION=
nginx_h2_listen() {   # nginx_h2_listen PORT
    if printf '%s\n%s\n' "1.25.1" "$NGINX_VERSION" | sort -V -C; then
        printf 'listen %s:%s; http2 on;' "$HOST" "$1"
    else
        printf 'listen %s:%s http2;' "$HOST" "$1"
    fi
}

# start_nginx NAME CPU: config already at $OUT/NAME/nginx.conf; sets LAST_PID
# to the master's pid. Not to be called in $(...): the pid must stay ours.
LAST_PID=
start_nginx() {
    local name=$1 cpu=$2 dir=$OUT/$1
    mkdir -p "$dir/tmp"
    nginx -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" || die "nginx config for $name is invalid (see $dir/error.log)"
    COMMANDS+=("$(printf '%q ' taskset -c "$cpu" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;')")
    taskset -c "$cpu" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;' \
        >"$dir/stdout.log" 2>&1 &
    LAST_PID=$!
    STARTED+=("$LAST_PID")
}

BACKEND_BODY='postern bench backend: ok'
write_backend_conf() {
    local dir=$OUT/backend
    mkdir -p "$dir"
    {
        nginx_common "$dir"
        echo "http {"
        nginx_http_common "$dir"
        cat <<EOF
    default_type text/plain;
    server {
        listen $HOST:$BACKEND_H1_PORT;
        location / { return 200 "$BACKEND_BODY\n"; }
    }
    server {
        $(nginx_h2_listen "$BACKEND_H2_PORT")
        location / { return 200 "$BACKEND_BODY\n"; }
    }
}
EOF
    } >"$dir/nginx.conf"
}

write_nginx_proxy_conf() {
    local dir=$OUT/nginx-proxy
    mkdir -p "$dir"
    {
        nginx_common "$dir"
        echo "http {"
        nginx_http_common "$dir"
        cat <<EOF
    upstream backend {
        server $HOST:$BACKEND_H1_PORT;
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    server {
        listen $HOST:$NGINX_H1_PORT;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    server {
        $(nginx_h2_listen "$NGINX_H2_PORT")
        location / {
            proxy_pass http://backend;
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
        if ! (cd "$REPO" && cargo build --release -p postern) >"$OUT/postern-build.log" 2>&1; then
            tail -n 30 "$OUT/postern-build.log" >&2
            die "Postern build failed (full log: $OUT/postern-build.log). Fix the build, or run with SCENARIOS=\"direct nginx\" to skip Postern."
        fi
    fi
    [[ -x $REPO/target/release/postern ]] || die "no Postern binary at $REPO/target/release/postern"
    POSTERN_PATH=$REPO/target/release/postern
}

write_postern_conf() {
    local f=$OUT/postern/postern.yaml
    mkdir -p "$OUT/postern"
    cat >"$f" <<EOF
admin:
  address: $HOST:$POSTERN_ADMIN_PORT
drain_timeout: 1s
listeners:
  - name: bench
    address: $HOST:$POSTERN_PORT
    kind: http
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: all
            match: { path: { prefix: "/" } }
            cluster: backend
clusters:
  - name: backend
    protocol: $POSTERN_UPSTREAM
    endpoints:
      - address: $HOST:$(if [[ $POSTERN_UPSTREAM == http2 ]]; then echo "$BACKEND_H2_PORT"; else echo "$BACKEND_H1_PORT"; fi)
EOF
}

# start_postern_ready BIN: start it and wait for /ready; sets LAST_PID or dies.
start_postern_ready() {
    local pid
    write_postern_conf
    start_postern "$1"
    pid=$LAST_PID
    if ! WAIT_PID=$pid wait_http "http://$HOST:$POSTERN_ADMIN_PORT/ready"; then
        if kill -0 "$pid" 2>/dev/null; then
            log "Postern (pid $pid) is running but /ready did not answer 200 within $READY_TRIES tries"
        else
            local rc=0
            wait "$pid" 2>/dev/null || rc=$?
            log "Postern exited with status $rc"
        fi
        log "last lines of $OUT/postern/postern.log:"
        tail -n 20 "$OUT/postern/postern.log" >&2 || true
        die "Postern did not become ready on http://$HOST:$POSTERN_ADMIN_PORT/ready"
    fi
    LAST_PID=$pid
}

start_postern() {   # sets LAST_PID
    local bin=$1
    COMMANDS+=("$(printf '%q ' env POSTERN_WORKER_THREADS=1 RUST_LOG=warn taskset -c "$PROXY_CPU" "$bin" run --config "$OUT/postern/postern.yaml")")
    echo "=== $(date -u +%H:%M:%S) starting: $bin run --config $OUT/postern/postern.yaml" >>"$OUT/postern/postern.log"
    POSTERN_WORKER_THREADS=1 RUST_LOG=warn taskset -c "$PROXY_CPU" "$bin" run --config "$OUT/postern/postern.yaml" \
        >>"$OUT/postern/postern.log" 2>&1 &
    LAST_PID=$!
    STARTED+=("$LAST_PID")
}

# -------------------------------------------------------------------- load --
# URL and curl flag of a scenario/protocol
target_port() {   # target_port SCENARIO PROTO
    case $1/$2 in
        direct/h1) echo "$BACKEND_H1_PORT" ;;
        direct/h2) echo "$BACKEND_H2_PORT" ;;
        postern/*) echo "$POSTERN_PORT" ;;
        nginx/h1) echo "$NGINX_H1_PORT" ;;
        nginx/h2) echo "$NGINX_H2_PORT" ;;
    esac
}
curl_proto_flag() { [[ $1 == h2 ]] && echo --http2-prior-knowledge || echo --http1.1; }

QUIET_NOTE=
declare -A R   # results: R[scenario/proto/metric]

# measure SCENARIO PROTO "PROXY_PIDS" RSS_PID
measure() {
    local sc=$1 pr=$2 proxy_pids=$3 rss_pid=$4
    local port url tag dir
    port=$(target_port "$sc" "$pr")
    url="http://$HOST:$port/"
    tag="$sc-$pr"
    dir=$OUT/runs
    mkdir -p "$dir"

    wait_http "$url" "$(curl_proto_flag "$pr")" || die "$tag: $url did not answer 200"
    local body
    body=$(curl -s -m 2 "$(curl_proto_flag "$pr")" "$url")
    [[ $body == "$BACKEND_BODY" ]] || die "$tag: unexpected body from $url: '$body'"

    local h1flag=()
    [[ $pr == h1 ]] && h1flag=(--h1)

    # 1. warm-up (not measured)
    if ((WARM_S > 0)); then
        log "$tag: warm-up ${WARM_S}s"
        run_logged "$dir/$tag-warmup.txt" taskset -c "$LOAD_CPU" h2load "${h1flag[@]}" -t1 -c "$RATE_CONNS" -m1 -D "${WARM_S}s" "$url"
    fi

    # 2. fixed rate: RATE req/s spread over RATE_CONNS connections, each at
    #    RATE/RATE_CONNS req/s; connections are opened 1 ms apart (-r1
    #    --rate-period 1ms) so their send timers are not in phase, and the run
    #    is RATE*DURATION requests long.
    local per_conn nreq before_p before_b after_p after_b
    local w_others w_start
    per_conn=$(awk -v r="$RATE" -v c="$RATE_CONNS" 'BEGIN{printf "%g", r/c}')
    nreq=$((RATE * DUR_S))
    rm -f "$dir/$tag-rate.tsv"
    log "$tag: fixed rate $RATE req/s for ${DUR_S}s ($nreq requests)"
    # window for the "someone else is using the CPU" check: both measured runs
    w_start=$SECONDS
    # shellcheck disable=SC2086
    w_others=$(others_snapshot "${BACKEND_PIDS[@]}" $proxy_pids)
    before_b=$(cpu_ticks "${BACKEND_PIDS[@]}")
    # shellcheck disable=SC2086
    [[ -n $proxy_pids ]] && before_p=$(cpu_ticks $proxy_pids)
    run_logged "$dir/$tag-rate.txt" taskset -c "$LOAD_CPU" h2load "${h1flag[@]}" -t1 -c "$RATE_CONNS" -m1 \
        --rps "$per_conn" -r1 --rate-period 1ms -n "$nreq" --log-file "$dir/$tag-rate.tsv" "$url" \
        || die "$tag: h2load fixed-rate run failed, see $dir/$tag-rate.txt"
    after_b=$(cpu_ticks "${BACKEND_PIDS[@]}")
    # shellcheck disable=SC2086
    [[ -n $proxy_pids ]] && after_p=$(cpu_ticks $proxy_pids)

    local done_n ok_n held p50 p99 p999
    done_n=$(awk '/^requests:/{print $6}' "$dir/$tag-rate.txt")
    ok_n=$(awk '/^status codes:/{print $3}' "$dir/$tag-rate.txt")
    held=$(awk '/^finished in/{print $4}' "$dir/$tag-rate.txt" | tr -d ',')
    [[ ${done_n:-0} =~ ^[0-9]+$ && ${done_n:-0} -gt 0 ]] || die "$tag: no request completed in the fixed-rate run, see $dir/$tag-rate.txt"
    read -r p50 p99 p999 _ < <(latency_percentiles "$dir/$tag-rate.tsv")
    R[$sc/$pr/held]=$held
    R[$sc/$pr/p50]=$p50
    R[$sc/$pr/p99]=$p99
    R[$sc/$pr/p999]=$p999
    R[$sc/$pr/ok]="$ok_n/$nreq"
    if [[ ${ok_n:-0} -lt $nreq ]]; then
        log "WARNING $tag: only $ok_n of $nreq requests got a 2xx in the fixed-rate run"
        R[$sc/$pr/warn]+=" fixed-rate: $ok_n/$nreq 2xx;"
    fi
    if awk -v h="$held" -v r="$RATE" 'BEGIN{exit !(h < 0.97 * r)}'; then
        log "WARNING $tag: achieved only $held req/s of the $RATE target"
        R[$sc/$pr/warn]+=" rate not held ($held req/s);"
    fi
    # µs of CPU per completed request: ticks / CLK_TCK * 1e6 / done
    R[$sc/$pr/bcpu]=$(awk -v t=$((after_b - before_b)) -v hz="$CLK_TCK" -v n="$done_n" 'BEGIN{printf "%.1f", t / hz * 1e6 / n}')
    if [[ -n $proxy_pids ]]; then
        R[$sc/$pr/cpu]=$(awk -v t=$((after_p - before_p)) -v hz="$CLK_TCK" -v n="$done_n" 'BEGIN{printf "%.1f", t / hz * 1e6 / n}')
    fi

    # 3. max throughput at fixed concurrency
    local rps
    if [[ $pr == h1 ]]; then
        log "$tag: max throughput, wrk -c $CONNS for ${DUR_S}s"
        run_logged "$dir/$tag-max.txt" taskset -c "$LOAD_CPU" wrk -t1 -c "$CONNS" -d "${DUR_S}s" --latency "$url" \
            || die "$tag: wrk failed, see $dir/$tag-max.txt"
        rps=$(awk '/^Requests\/sec:/{print $2}' "$dir/$tag-max.txt")
        if grep -q 'Non-2xx or 3xx responses' "$dir/$tag-max.txt" || grep -q '^  Socket errors' "$dir/$tag-max.txt"; then
            R[$sc/$pr/warn]+=" max: errors (see runs/$tag-max.txt);"
        fi
    else
        log "$tag: max throughput, h2load -c $H2_CONNS -m $H2_STREAMS for ${DUR_S}s"
        run_logged "$dir/$tag-max.txt" taskset -c "$LOAD_CPU" h2load -t1 -c "$H2_CONNS" -m "$H2_STREAMS" -D "${DUR_S}s" "$url" \
            || die "$tag: h2load failed, see $dir/$tag-max.txt"
        rps=$(awk '/^finished in/{print $4}' "$dir/$tag-max.txt" | tr -d ',')
        local failed
        failed=$(awk '/^requests:/{print $10 + $12 + $14}' "$dir/$tag-max.txt")
        [[ ${failed:-0} -gt 0 ]] && R[$sc/$pr/warn]+=" max: $failed failed/errored;"
    fi
    R[$sc/$pr/max]=$(awk -v x="$rps" 'BEGIN{printf "%.0f", x}')

    # CPU used during both runs by anything but the proxy, the backend and
    # this script with its children (the load generators) means a noisy machine.
    local other_ticks elapsed other_pct
    # shellcheck disable=SC2086
    other_ticks=$(others_ticks "$w_others" "$(others_snapshot "${BACKEND_PIDS[@]}" $proxy_pids)")
    elapsed=$((SECONDS - w_start))
    other_pct=$(awk -v t="$other_ticks" -v hz="$CLK_TCK" -v s="$elapsed" 'BEGIN{printf "%d", (s > 0 ? 100 * t / hz / s : 0)}')
    R[$sc/$pr/other]=$other_pct
    if ((other_pct > 5)); then
        log "WARNING $tag: other processes used ${other_pct}% of a core during the runs; numbers are skewed"
        R[$sc/$pr/warn]+=" other processes used ${other_pct}% of a core during the runs (noisy machine);"
    fi

    # 4. peak RSS of the proxy over both runs
    if [[ -n $rss_pid ]]; then
        R[$sc/$pr/rss]=$(awk -v k="$(vm_hwm_kib "$rss_pid")" 'BEGIN{printf "%.1f", k / 1024}')
    fi
}

# ------------------------------------------------------------------ report --
ratio() {   # ratio A B -> A/B with 2 decimals, or n/a
    awk -v a="${1:-}" -v b="${2:-}" 'BEGIN{ if (a == "" || b == "" || a == "NA" || b == "NA" || b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'
}
v() { local x=${R[$1]:-}; echo "${x:-—}"; }

report() {
    local sc pr name proto
    echo "| scenario | protocol | max req/s (fixed conns) | held req/s @${RATE} | p50 µs | p99 µs | p99.9 µs | proxy CPU µs/req | backend CPU µs/req | proxy peak RSS MiB |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for sc in $SCENARIOS; do
        for pr in $PROTOCOLS; do
            case $sc in direct) name=direct ;; postern) name=Postern ;; nginx) name="nginx proxy" ;; esac
            case $pr in h1) proto="HTTP/1.1" ;; h2) proto="h2c" ;; esac
            echo "| $name | $proto | $(v "$sc/$pr/max") | $(v "$sc/$pr/held") | $(v "$sc/$pr/p50") | $(v "$sc/$pr/p99") | $(v "$sc/$pr/p999") | $(v "$sc/$pr/cpu") | $(v "$sc/$pr/bcpu") | $(v "$sc/$pr/rss") |"
        done
    done
    echo
    if [[ " $SCENARIOS " == *" postern "* ]]; then
        echo "Ratios (Postern ÷ other; below 1.00 means Postern is lower):"
        echo
        echo "| protocol | p50 Postern/nginx | p50 Postern/direct | CPU/req Postern/nginx | CPU/req Postern/direct-backend |"
        echo "|---|---:|---:|---:|---:|"
        for pr in $PROTOCOLS; do
            case $pr in h1) proto="HTTP/1.1" ;; h2) proto="h2c" ;; esac
            echo "| $proto | $(ratio "${R[postern/$pr/p50]:-}" "${R[nginx/$pr/p50]:-}") | $(ratio "${R[postern/$pr/p50]:-}" "${R[direct/$pr/p50]:-}") | $(ratio "${R[postern/$pr/cpu]:-}" "${R[nginx/$pr/cpu]:-}") | $(ratio "${R[postern/$pr/cpu]:-}" "${R[direct/$pr/bcpu]:-}") |"
        done
        echo
        echo "\"CPU/req Postern/direct-backend\" divides Postern's CPU per request by the backend nginx's CPU per request in the direct run (the direct path has no proxy to measure)."
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
    NGINX_VERSION=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
    [[ -n $NGINX_VERSION ]] || die "cannot read the nginx version from 'nginx -v'"

    local p busy
    for p in "$BACKEND_H1_PORT" "$BACKEND_H2_PORT" "$POSTERN_PORT" "$POSTERN_ADMIN_PORT" "$NGINX_H1_PORT" "$NGINX_H2_PORT"; do
        port_free "$p" || die "port $HOST:$p is already in use"
    done

    local postern_bin=
    if [[ " $SCENARIOS " == *" postern "* ]]; then
        postern_binary
        postern_bin=$POSTERN_PATH
        log "Postern binary: $postern_bin"
    fi

    # (after the build: a build in progress is exactly what this catches)
    busy=$(cpu_busy_pct)
    QUIET_NOTE="CPU busy before the run: ${busy}% of all cores (load average $(cut -d' ' -f1-3 /proc/loadavg))."
    if ((busy > 10)); then
        log "WARNING: the machine is already ${busy}% busy; other load (a cargo build?) will skew the numbers"
        QUIET_NOTE+=" WARNING: not a quiet machine, numbers are skewed."
    fi

    rm -rf "$OUT/runs" "$OUT/backend" "$OUT/nginx-proxy" "$OUT/postern"
    mkdir -p "$OUT/runs"

    # backend, shared by every row, on the load generator's core
    write_backend_conf
    local backend_master pid
    start_nginx backend "$LOAD_CPU"
    backend_master=$LAST_PID
    wait_http "http://$HOST:$BACKEND_H1_PORT/" || die "backend nginx did not start (see $OUT/backend/error.log)"
    wait_http "http://$HOST:$BACKEND_H2_PORT/" --http2-prior-knowledge || die "backend nginx h2c port did not answer"
    BACKEND_PIDS=("$backend_master" "$(nginx_worker "$backend_master")")
    log "backend nginx $NGINX_VERSION up (pids ${BACKEND_PIDS[*]})"

    # Pre-flight: fail before any measurement if Postern cannot serve.
    if [[ -n $postern_bin ]]; then
        start_postern_ready "$postern_bin"
        pid=$LAST_PID
        wait_http "http://$HOST:$POSTERN_PORT/" || die "Postern is ready but http://$HOST:$POSTERN_PORT/ does not answer 200 (log: $OUT/postern/postern.log)"
        stop_pid "$pid"
        log "Postern pre-flight OK"
    fi

    local sc pr worker
    for sc in $SCENARIOS; do
        for pr in $PROTOCOLS; do
            case $sc in
                direct)
                    measure direct "$pr" "" ""
                    ;;
                nginx)
                    # a fresh proxy per row, so peak RSS belongs to that row
                    write_nginx_proxy_conf
                    start_nginx nginx-proxy "$PROXY_CPU"
                    pid=$LAST_PID
                    worker=$(nginx_worker "$pid") || die "nginx proxy has no worker (see $OUT/nginx-proxy/error.log)"
                    measure nginx "$pr" "$pid $worker" "$worker"
                    stop_pid "$pid"
                    ;;
                postern)
                    start_postern_ready "$postern_bin"
                    pid=$LAST_PID
                    R[postern/$pr/threads]=$(threads_of "$pid")
                    measure postern "$pr" "$pid" "$pid"
                    stop_pid "$pid"
                    ;;
            esac
        done
    done

    local table
    table=$(report)
    printf '\n%s\n' "$table"

    {
        echo "# Postern benchmark results"
        echo
        echo "Run at $(date -u '+%Y-%m-%d %H:%M:%SZ') on $(uname -srm), $(nproc) CPUs ($(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo))."
        echo "Git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no commit')$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' (work tree differs)')."
        echo "Tools: nginx $NGINX_VERSION, $(wrk --version 2>&1 | head -n1 | awk '{print $1, $2}'), $(h2load --version 2>&1 | head -n1)."
        echo
        echo "Settings: DURATION=$DURATION WARMUP=$WARMUP RATE=$RATE RATE_CONNS=$RATE_CONNS CONNS=$CONNS H2_CONNS=$H2_CONNS H2_STREAMS=$H2_STREAMS POSTERN_UPSTREAM=$POSTERN_UPSTREAM; proxy on CPU $PROXY_CPU, load generator and backend on CPU $LOAD_CPU; CLK_TCK=$CLK_TCK."
        echo "$QUIET_NOTE Load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)."
        for pr in $PROTOCOLS; do
            [[ -n ${R[postern/$pr/threads]:-} ]] && echo "Postern ($pr row) had ${R[postern/$pr/threads]} threads after start-up."
        done
        echo
        echo "$table"
        echo
        local others=() sc2 pr2
        for sc2 in $SCENARIOS; do for pr2 in $PROTOCOLS; do others+=("$sc2/$pr2 ${R[$sc2/$pr2/other]:-?}%"); done; done
        echo "CPU used by other processes during each row's measured runs (share of one core; should be near 0): $(printf '%s; ' "${others[@]}")"
        echo
        echo "Columns: *max req/s* is the throughput at a fixed concurrency (HTTP/1.1: wrk, $CONNS connections; h2c: h2load, $H2_CONNS connections x $H2_STREAMS streams). The latency, CPU and *held req/s* columns come from a separate run at a fixed $RATE req/s (h2load --rps, $RATE_CONNS connections, $((RATE * DUR_S)) requests); latency is per request from h2load's --log-file. CPU is utime+stime from /proc/PID/stat over that run divided by the responses received (nginx proxy: master+worker; backend: master+worker). Peak RSS is VmHWM of the Postern process or the nginx proxy worker after both runs; each proxy row uses a freshly started proxy."
        echo
        echo "## Configs"
        echo
        echo "Files under bench/out/: backend/nginx.conf, nginx-proxy/nginx.conf, postern/postern.yaml; raw tool output in runs/."
        echo
        echo "## Commands"
        echo
        echo '```'
        printf '%s\n' "${COMMANDS[@]}"
        echo '```'
    } >"$OUT/results.md"
    log "wrote $OUT/results.md"
}

main "$@"
