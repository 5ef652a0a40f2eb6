# Shared by the bench/ scripts: process bookkeeping (everything started is
# stopped on exit), readiness polling, and the servers measured side by side:
# the bare upstream (examples/bench_upstream.rs), nginx and haproxy (one
# worker each, keep-alive to the upstream, access logging on) and the sidecar.
#
# The sourcing script sets ROOT and OUT (its output directory) first.

READY_TIMEOUT=15 # seconds a server gets to start answering
STOP_TIMEOUT=10  # seconds a server gets to exit after SIGTERM

NGINX=${NGINX:-/usr/sbin/nginx}
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
WRK=${WRK:-/usr/bin/wrk}
# Binaries come from cargo's target directory: CARGO_TARGET_DIR when set
# (relative to the repository, as cargo resolves it from there), else target/.
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
SIDECAR="$TARGET_DIR/release/dockerflow-sidecar"
UPSTREAM_BIN="$TARGET_DIR/release/examples/bench_upstream"
MIXED_LOAD_BIN="$TARGET_DIR/release/examples/mixed_load"

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- processes we start, stopped on exit -----------------------------------
PIDS=()

stop_pid() {
    local pid=$1 deadline
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid did not stop after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers -----------------------------------------------------------------

# A port that was free a moment ago (bound to port 0, then released).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_http NAME PID URL: poll URL until it answers 200, with a deadline.
wait_http() {
    local name=$1 pid=$2 url=$3 deadline code
    deadline=$((SECONDS + READY_TIMEOUT))
    while ((SECONDS < deadline)); do
        kill -0 "$pid" 2>/dev/null || die "$name exited before it was ready (see $OUT)"
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)
        [[ $code == 200 ]] && return 0
        sleep 0.05
    done
    die "$name did not answer 200 on $url within ${READY_TIMEOUT}s (see $OUT)"
}

# first_line NAME PID FILE: the first line of FILE once it is complete.
first_line() {
    local name=$1 pid=$2 file=$3 deadline line
    deadline=$((SECONDS + READY_TIMEOUT))
    while ((SECONDS < deadline)); do
        # Only a complete line (newline written) counts.
        if [[ -s $file ]] && (($(wc -l <"$file") >= 1)); then
            line=$(head -n 1 "$file")
            printf '%s\n' "$line"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "$name exited before it printed its address"
        sleep 0.05
    done
    die "$name printed nothing within ${READY_TIMEOUT}s"
}

# build_binaries: the release sidecar and bench upstream, unless
# BENCH_SKIP_BUILD=1.
build_binaries() {
    if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
        log "building release binaries"
        # Two invocations: one with an example also resolves the
        # dev-dependencies' features (tokio's "full" and "test-util") into the
        # sidecar, which would then not be the binary users build.
        (cd "$ROOT" && cargo build --release --quiet --bin dockerflow-sidecar \
            && cargo build --release --quiet --example bench_upstream)
    fi
    [[ -x $SIDECAR ]] || die "$SIDECAR is missing"
    [[ -x $UPSTREAM_BIN ]] || die "$UPSTREAM_BIN is missing"
}

# build_mixed_load: the release load generator (examples/mixed_load.rs),
# unless BENCH_SKIP_BUILD=1.
build_mixed_load() {
    if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
        log "building the load generator"
        (cd "$ROOT" && cargo build --release --quiet --example mixed_load)
    fi
    [[ -x $MIXED_LOAD_BIN ]] || die "$MIXED_LOAD_BIN is missing"
}

# start_upstream: sets UPSTREAM_ADDR, UPSTREAM_PORT and UPSTREAM_PID.
start_upstream() {
    "$UPSTREAM_BIN" 127.0.0.1:0 >"$OUT/upstream.out" 2>"$OUT/upstream.err" &
    UPSTREAM_PID=$!
    PIDS+=("$UPSTREAM_PID")
    UPSTREAM_ADDR=$(first_line upstream "$UPSTREAM_PID" "$OUT/upstream.out")
    [[ $UPSTREAM_ADDR =~ ^127\.0\.0\.1:([0-9]+)$ ]] || die "upstream printed '$UPSTREAM_ADDR', not an address"
    UPSTREAM_PORT=${BASH_REMATCH[1]}
    wait_http upstream "$UPSTREAM_PID" "http://$UPSTREAM_ADDR/"
    log "upstream on $UPSTREAM_ADDR (pid $UPSTREAM_PID)"
}

# start_nginx: sets NGINX_PORT and NGINX_PID.
start_nginx() {
    mkdir -p "$OUT/nginx"
    NGINX_PORT=$(free_port)
    NGINX_USER=""
    if [[ $(id -u) == 0 ]]; then
        NGINX_USER="user root;"
    fi
    cat >"$OUT/nginx/nginx.conf" <<EOF
$NGINX_USER
daemon off;
master_process on;
worker_processes 1;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn;

events {
    worker_connections 4096;
}

http {
    # Logging on, as the sidecar logs every request (buffered, as the
    # sidecar's own log writer batches its lines).
    access_log $OUT/nginx/access.log combined buffer=64k flush=1s;
    client_body_temp_path $OUT/nginx/client_body;
    proxy_temp_path $OUT/nginx/proxy;
    fastcgi_temp_path $OUT/nginx/fastcgi;
    uwsgi_temp_path $OUT/nginx/uwsgi;
    scgi_temp_path $OUT/nginx/scgi;
    keepalive_timeout 60s;
    keepalive_requests 1000000;

    upstream app {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }

    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    "$NGINX" -p "$OUT/nginx/" -e "$OUT/nginx/error.log" -c "$OUT/nginx/nginx.conf" \
        >"$OUT/nginx/stdout.log" 2>&1 &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    wait_http nginx "$NGINX_PID" "http://127.0.0.1:$NGINX_PORT/"
    log "nginx on 127.0.0.1:$NGINX_PORT (pid $NGINX_PID)"
}

# start_haproxy: sets HAPROXY_PORT and HAPROXY_PID.
start_haproxy() {
    mkdir -p "$OUT/haproxy"
    HAPROXY_PORT=$(free_port)
    cat >"$OUT/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend bench
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend app

backend app
    http-reuse always
    server app 127.0.0.1:$UPSTREAM_PORT
EOF
    "$HAPROXY" -db -f "$OUT/haproxy/haproxy.cfg" >"$OUT/haproxy/stdout.log" 2>&1 &
    HAPROXY_PID=$!
    PIDS+=("$HAPROXY_PID")
    wait_http haproxy "$HAPROXY_PID" "http://127.0.0.1:$HAPROXY_PORT/"
    log "haproxy on 127.0.0.1:$HAPROXY_PORT (pid $HAPROXY_PID)"
}

# start_sidecar WORKER_THREADS LOGFILE: sets SIDECAR_PORT and SIDECAR_PID.
start_sidecar() {
    local threads=$1 logfile=$2
    SIDECAR_PORT=$(free_port)
    PORT=$SIDECAR_PORT \
        DOCKERFLOW_LISTEN=127.0.0.1:$SIDECAR_PORT \
        DOCKERFLOW_ADMIN__LISTEN=127.0.0.1:$(free_port) \
        DOCKERFLOW_SERVER__WORKER_THREADS=$threads \
        DOCKERFLOW_SHUTDOWN__DRAIN=0s \
        DOCKERFLOW_SHUTDOWN__GRACE=1s \
        "$SIDECAR" --upstream "http://127.0.0.1:$UPSTREAM_PORT" >"$logfile" 2>&1 &
    SIDECAR_PID=$!
    PIDS+=("$SIDECAR_PID")
    wait_http "sidecar ($threads threads)" "$SIDECAR_PID" "http://127.0.0.1:$SIDECAR_PORT/__lbheartbeat__"
    # Log lines reach the file in batches (within 100 ms): wait for it.
    local deadline=$((SECONDS + READY_TIMEOUT))
    until grep -q '"msg":"listening"' "$logfile"; do
        ((SECONDS < deadline)) || die "sidecar answered but never logged 'listening'"
        sleep 0.02
    done
}

# run_sidecar CONFIG READY_PATH: starts the sidecar on its own config file
# (stdout to sidecar.log, stderr to sidecar.err beside it) and waits until
# READY_PATH answers on SIDECAR_PORT; sets SIDECAR_PID.
run_sidecar() {
    local config=$1 ready=$2 dir
    dir=$(dirname "$config")
    "$SIDECAR" --config "$config" >"$dir/sidecar.log" 2>"$dir/sidecar.err" &
    SIDECAR_PID=$!
    PIDS+=("$SIDECAR_PID")
    wait_http sidecar "$SIDECAR_PID" "http://127.0.0.1:$SIDECAR_PORT$ready"
}

# goal_row LABEL VALUE GOAL MET: prints one row of issue 9's table and adds it
# to bench/out/goals.txt (bench/all.sh prints them all at the end). MET is
# yes, no or "-" (not judged).
goal_row() {
    local line
    line=$(printf '%-46s %-34s goal %-24s %s' "$1" "$2" "$3" "$([[ $4 == yes ]] && echo met || { [[ $4 == no ]] && echo 'NOT MET' || echo ''; })")
    printf '%s\n' "$line"
    mkdir -p "$ROOT/bench/out"
    printf '%s\n' "$line" >>"$ROOT/bench/out/goals.txt"
}

# ensure_tools TOOL...: each tool (a command name or path) is installed, from
# its Debian package with apt-get when it is missing and we are root (nginx is
# Debian's nginx-light); otherwise the script stops naming the package.
ensure_tools() {
    local tool pkg missing=()
    for tool in "$@"; do
        command -v "$tool" >/dev/null && continue
        case ${tool##*/} in
            nginx) pkg=nginx-light ;;
            nstat) pkg=iproute2 ;;
            *) pkg=${tool##*/} ;;
        esac
        missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "installing ${missing[*]} with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        die "missing ${missing[*]}: apt-get install ${missing[*]}"
    fi
}

# ensure_oha: sets OHA to an oha binary (open-loop load with latency
# correction), installing it from crates.io into target/bench-tools once.
ensure_oha() {
    OHA=${OHA:-$(command -v oha || true)}
    if [[ -z $OHA ]]; then
        OHA="$ROOT/target/bench-tools/bin/oha"
        if [[ ! -x $OHA ]]; then
            log "installing oha 1.16.0 from crates.io into target/bench-tools (once, a few minutes)"
            cargo install oha --locked --version 1.16.0 --root "$ROOT/target/bench-tools" --quiet
        fi
    fi
}

# rss_kib PID: resident memory now.
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# cpu_ticks_split PID: user and system clock ticks used so far.
cpu_ticks_split() { awk '{ print $14, $15 }' "/proc/$1/stat"; }

# cpu_ticks PID: user + system clock ticks used so far.
cpu_ticks() { cpu_ticks_split "$1" | awk '{ print $1 + $2 }'; }

# sample_rss PID FILE: appends PID's RSS (KiB) to FILE every 50 ms until the
# process exits or the sampler is killed; sets SAMPLER_PID.
sample_rss() {
    local pid=$1 file=$2
    (while kill -0 "$pid" 2>/dev/null; do rss_kib "$pid" >>"$file" 2>/dev/null || true; sleep 0.05; done) &
    SAMPLER_PID=$!
}

# max_of FILE: the largest number in FILE.
max_of() { sort -n "$1" | tail -n 1; }

# fd_count PID: open file descriptors now.
fd_count() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

# exited PID: true once PID has exited (gone, or a zombie not yet reaped;
# kill -0 still succeeds on a zombie).
exited() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 0
    [[ -z $state || $state == Z ]]
}

# term_and_time PID TIMEOUT: SIGTERM, then waits up to TIMEOUT seconds (10 ms
# steps) for PID, a child of this shell, to exit; sets EXIT_STATUS (143 after
# a SIGKILL at the deadline) and EXIT_SECONDS (from the signal to the exit).
term_and_time() {
    local pid=$1 timeout=$2 t0 deadline
    t0=$(date +%s%N)
    deadline=$((t0 + timeout * 1000000000))
    kill -TERM "$pid"
    until exited "$pid"; do
        if (($(date +%s%N) > deadline)); then
            log "pid $pid still running ${timeout}s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.01
    done
    EXIT_SECONDS=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
    EXIT_STATUS=0
    wait "$pid" || EXIT_STATUS=$?
}

# fd_limit PID: the process's soft limit on open files.
fd_limit() { awk '/^Max open files/ { print $4 }' "/proc/$1/limits"; }
