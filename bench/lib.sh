# shellcheck shell=bash
# Shell helpers shared by the benchmark scripts (run.sh, mesh.sh,
# layout.sh). Sourced, not run: each script defines log, die, HOST, PIDS and
# its settings first; these functions read them when called.

cleanup() {
    local pid i
    for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${STARTED[@]}"; do
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    STARTED=()
}

# Share of all CPUs busy over 1 s (from /proc/stat), as a whole percent.
# Anything else running on a 2-core box skews every number here.
cpu_busy_pct() {
    local a b
    a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
    sleep 1
    b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN{split(a, x, " "); split(b, y, " ");
        busy = y[1] - x[1]; idle = y[2] - x[2];
        printf "%d", (busy + idle) ? 100 * busy / (busy + idle) : 0}'
}

# CPU ticks (utime+stime) of the given pids, summed. Field 14/15 of
# /proc/PID/stat, counted after the ")" that ends the command name.
cpu_ticks() {
    local pid total=0 rest
    for pid in "$@"; do
        rest=$(<"/proc/$pid/stat")
        rest=${rest##*) }
        # shellcheck disable=SC2086
        set -- $rest
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

forget_pid() {
    local i keep=()
    for i in "${STARTED[@]}"; do [[ $i == "$1" ]] || keep+=("$i"); done
    STARTED=("${keep[@]}")
}

# Percentiles (µs) from an h2load --log-file (start_us, status, latency_us).
latency_percentiles() {   # prints "p50 p99 p999 count"
    awk -F'\t' '$2 >= 200 && $2 < 300 {print $3}' "$1" | sort -n | awk '
        { v[NR] = $1 }
        END {
            if (NR == 0) { print "NA NA NA 0"; exit }
            split("0.50 0.99 0.999", q, " ")
            for (i = 1; i <= 3; i++) {
                k = int(q[i] * NR); if (k < q[i] * NR) k++; if (k < 1) k = 1
                printf "%d ", v[k]
            }
            print NR
        }'
}

nginx_http_common() {
    local dir=$1
    cat <<EOF
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path       $dir/tmp/proxy;
    fastcgi_temp_path     $dir/tmp/fastcgi;
    uwsgi_temp_path       $dir/tmp/uwsgi;
    scgi_temp_path        $dir/tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
EOF
}

nginx_worker() {   # nginx_worker MASTER_PID: the (single) worker's pid, bounded wait
    local i w
    for ((i = 0; i < 50; i++)); do
        w=$(pgrep -P "$1" | head -n1 || true)
        [[ -n $w ]] && { echo "$w"; return 0; }
        sleep 0.1
    done
    return 1
}

# Snapshot "pid ticks" of every user-space process except this script (whose
# own children, the load generators, are in its cutime) and the pids given:
# utime+stime+cutime+cstime, so that short-lived processes (rustc, test
# binaries) show up in their parent once reaped. Kernel threads are left out:
# their work here is mostly the loopback traffic's own softirq load.
others_snapshot() {   # others_snapshot EXCLUDED_PID...
    cat /proc/[0-9]*/stat 2>/dev/null | awk -v self="$$" -v excl=" $* " '
        {
            pid = $1
            sub(/^.*\) /, "")   # drop "pid (comm) "; $1 is now the state
            ppid = $2
            if (pid == self || pid == 2 || ppid == 2 || index(excl, " " pid " ")) next
            print pid, $12 + $13 + $14 + $15
        }'
}

port_free() { ! (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

# Seconds from "10s", "10", "2m", "500ms" (the units wrk and h2load share).
to_seconds() {
    local v=$1
    case $v in
        *ms) awk -v x="${v%ms}" 'BEGIN{printf "%g", x/1000}' ;;
        *s)  printf '%s' "${v%s}" ;;
        *m)  awk -v x="${v%m}" 'BEGIN{printf "%g", x*60}' ;;
        *)   printf '%s' "$v" ;;
    esac
}

wait_http() {
    local url=$1 i code
    shift
    for ((i = 0; i < READY_TRIES; i++)); do
        code=$(curl -s -o /dev/null -m 1 -w '%{http_code}' "$@" "$url" || true)
        [[ $code == 200 ]] && return 0
        if [[ -n $WAIT_PID ]] && ! kill -0 "$WAIT_PID" 2>/dev/null; then
            return 1
        fi
        sleep 0.1
    done
    return 1
}

# Mesh certificates under $CERTS: an EC P-256 CA and leaves with the SANs
# given, EKU serverAuth+clientAuth, keys in PKCS#8 PEM. *-chain.pem holds
# the leaf only (the CA signs the leaves directly, so there is no
# intermediate to send).
gen_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
gen_ca() {   # gen_ca: a fresh $CERTS with ca.pem and ca-key.pem
    rm -rf "$CERTS"
    mkdir -p "$CERTS"
    chmod 700 "$CERTS"
    gen_key "$CERTS/ca-key.pem"
    openssl req -x509 -new -key "$CERTS/ca-key.pem" -subj "/O=Postern bench/CN=Postern bench CA" \
        -days 30 -sha256 \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" \
        -out "$CERTS/ca.pem" 2>/dev/null
}
gen_leaf() {   # gen_leaf NAME SAN
    local name=$1 san=$2
    gen_key "$CERTS/$name-key.pem"
    cat >"$CERTS/$name.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
    openssl req -new -key "$CERTS/$name-key.pem" -subj "/O=Postern bench/CN=sidecar-$name" \
        -out "$CERTS/$name.csr" 2>/dev/null
    openssl x509 -req -in "$CERTS/$name.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca-key.pem" \
        -set_serial "0x$(openssl rand -hex 16)" -days 30 -sha256 \
        -extfile "$CERTS/$name.ext" -out "$CERTS/$name-chain.pem" 2>/dev/null
    openssl verify -CAfile "$CERTS/ca.pem" -purpose sslclient "$CERTS/$name-chain.pem" >/dev/null \
        || die "generated certificate $name-chain.pem does not verify as a client cert"
    openssl verify -CAfile "$CERTS/ca.pem" -purpose sslserver "$CERTS/$name-chain.pem" >/dev/null \
        || die "generated certificate $name-chain.pem does not verify as a server cert"
}

postern_identity() {   # postern_identity SPIFFE_ID NAME: the identity section for gen_leaf NAME
    cat <<EOF
identity:
  spiffe_id: $1
  source:
    files:
      cert: $CERTS/$2-chain.pem
      key: $CERTS/$2-key.pem
      bundle: $CERTS/ca.pem
EOF
}
