#!/usr/bin/env bash
# A/B of two sidecar binaries on this machine: same upstream, alternating
# wrk runs, and the CPU time each process spent per request (from
# /proc/<pid>/stat), which moves much less with the machine's load than
# req/s does. Where perf can read the CPU's counters (`perf stat -e
# instructions true` prints a count), it also prints the instructions each
# process retired per request, in user space and in the kernel: those barely
# move with the machine's load, so they are the figure to compare.
#
#   bash bench/ab.sh OLD_BINARY NEW_BINARY
#
# Environment: AB_ROUNDS (4), AB_DURATION (4s), AB_CONNECTIONS (64), AB_WORKERS
# (1: the sidecars' server.worker_threads), AB_PERF
# (1; 0 leaves the counters alone: perf attached costs the process time).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
A=${1:?usage: bench/ab.sh OLD_BINARY NEW_BINARY}
B=${2:?usage: bench/ab.sh OLD_BINARY NEW_BINARY}
ROUNDS=${AB_ROUNDS:-4}
DURATION=${AB_DURATION:-4s}
CONNECTIONS=${AB_CONNECTIONS:-64}
WORKERS=${AB_WORKERS:-1}
UPSTREAM_BIN="$ROOT/target/release/examples/bench_upstream"
[ -x "$UPSTREAM_BIN" ] || (cd "$ROOT" && cargo build --release --example bench_upstream)
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT

up=$(free_port)
"$UPSTREAM_BIN" "127.0.0.1:$up" >/dev/null 2>&1 &
PIDS+=($!)

start() { # BINARY -> prints "pid port"
    local port admin=()
    port=$(free_port)
    # Builds from before the admin listener refuse its (unknown) key.
    if "$1" check-config --upstream http://127.0.0.1:1 2>/dev/null | grep -q '^\[admin\]'; then
        admin=(env DOCKERFLOW_ADMIN__LISTEN=127.0.0.1:0)
    fi
    "${admin[@]}" env DOCKERFLOW_LISTEN=127.0.0.1:$port \
        DOCKERFLOW_SERVER__WORKER_THREADS=$WORKERS DOCKERFLOW_SHUTDOWN__DRAIN=0s \
        "$1" --upstream "http://127.0.0.1:$up" >/dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$port/__lbheartbeat__" >/dev/null && break
        sleep 0.05
    done
    echo "$pid $port"
}
read -r PID_A PORT_A < <(start "$A")
read -r PID_B PORT_B < <(start "$B")
PIDS+=("$PID_A" "$PID_B")
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
PERF=""
if [[ ${AB_PERF:-1} != 0 ]] && command -v perf >/dev/null && perf stat -x, -e instructions:u true 2>&1 | grep -q '^[0-9]'; then
    PERF=perf
fi

printf '%-4s %-5s %10s %14s %12s %12s\n' round bin req/s "CPU µs/req" "user ins/req" "kern ins/req"
for ((r = 1; r <= ROUNDS; r++)); do
    for side in A B; do
        pid_var=PID_$side; port_var=PORT_$side
        pid=${!pid_var}; port=${!port_var}
        before=$(ticks "$pid")
        stat=/dev/null
        if [[ -n $PERF ]]; then
            stat=$(mktemp)
            perf stat -x, -e instructions:u,instructions:k -p "$pid" -o "$stat" &
            perf_pid=$!
        fi
        out=$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$port/" 2>&1)
        after=$(ticks "$pid")
        if [[ -n $PERF ]]; then
            kill -INT "$perf_pid"
            wait "$perf_pid" || true
        fi
        requests=$(awk '/requests in/ { print $1 }' <<<"$out")
        rps=$(awk '/Requests\/sec/ { print $2 }' <<<"$out")
        user=$(awk -F, '/instructions:u/ { print $1 }' "$stat")
        kern=$(awk -F, '/instructions:k/ { print $1 }' "$stat")
        [[ $stat == /dev/null ]] || rm -f "$stat"
        awk -v r="$r" -v s="$side" -v rps="$rps" -v t=$((after - before)) -v n="$requests" -v hz="$hz" \
            -v u="${user:-0}" -v k="${kern:-0}" \
            'BEGIN { printf "%-4s %-5s %10.0f %14.1f %12.0f %12.0f\n", r, s, rps, t / hz * 1e6 / n, u / n, k / n }'
    done
done
