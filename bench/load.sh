#!/usr/bin/env bash
# The sidecar at a fixed rate, next to nginx and haproxy in the same run:
# - added latency under open-loop load well below saturation (oha -q with
#   latency correction, so a slow answer delays no later request's clock);
# - CPU and resident memory at 1,000 req/s (nginx's worker alongside);
# - RSS growth while 1 GiB is uploaded and 1 GiB downloaded through it.
# Each figure is printed with its goal (issue 9) and added to
# bench/out/goals.txt; raw oha output is in bench/out/load/.
#
#   bash bench/load.sh
#
# Environment:
#   BENCH_RATE            open-loop rate for the latency rows   (default 5000 req/s)
#   BENCH_LOAD_DURATION   each latency run                      (default 10s)
#   BENCH_LOAD_ROUNDS     rounds over nginx, sidecar, haproxy   (default 3)
#   BENCH_CPU_DURATION    the 1,000 req/s run                   (default 20s)
#   BENCH_TRANSFER_BYTES  the upload and the download           (default 1 GiB)
#   BENCH_SKIP_BUILD=1    use the existing release binaries
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/bench/out/load"
RATE=${BENCH_RATE:-5000}
DURATION=${BENCH_LOAD_DURATION:-10s}
ROUNDS=${BENCH_LOAD_ROUNDS:-3}
CPU_DURATION=${BENCH_CPU_DURATION:-20}
TRANSFER=${BENCH_TRANSFER_BYTES:-1073741824}
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

ensure_tools "$NGINX" "$HAPROXY" curl python3
build_binaries
ensure_oha
rm -rf "$OUT"
mkdir -p "$OUT"

start_upstream
start_nginx
start_haproxy
start_sidecar 1 "$OUT/sidecar.log"
NGINX_WORKER=$(pgrep -P "$NGINX_PID" | head -n 1)

# oha_run NAME URL RATE DURATION CONNECTIONS: JSON result in $OUT/NAME.json.
oha_run() {
    "$OHA" --no-tui --output-format json -q "$3" --latency-correction -z "$4" -c "$5" "$2" \
        >"$OUT/$1.json" 2>"$OUT/$1.err" || die "oha failed on $2 (see $OUT/$1.err)"
}

# --- open-loop latency ----------------------------------------------------------
TARGETS=(
    "nginx|http://127.0.0.1:$NGINX_PORT/"
    "sidecar|http://127.0.0.1:$SIDECAR_PORT/"
    "haproxy|http://127.0.0.1:$HAPROXY_PORT/"
)
log "open-loop latency: $RATE req/s, 32 connections, $DURATION per run, $ROUNDS round(s)"
for ((round = 1; round <= ROUNDS; round++)); do
    for target in "${TARGETS[@]}"; do
        IFS='|' read -r key url <<<"$target"
        oha_run "warmup-$key-r$round" "$url" "$RATE" 2s 32
        oha_run "latency-$key-r$round" "$url" "$RATE" "$DURATION" 32
    done
done

# --- CPU and memory at 1,000 req/s --------------------------------------------------
# measure_fixed NAME PID URL: cores used (user + system, user, system) and
# peak RSS (KiB) at 1,000 req/s. The split shows how much of a request's CPU
# is the kernel's (loopback TCP, wake-ups), which no user-space work removes.
measure_fixed() {
    local name=$1 pid=$2 url=$3 u0 s0 u1 s1 start end
    : >"$OUT/rss-$name.txt"
    sample_rss "$pid" "$OUT/rss-$name.txt"
    read -r u0 s0 < <(cpu_ticks_split "$pid")
    start=$(date +%s.%N)
    oha_run "fixed-$name" "$url" 1000 "${CPU_DURATION}s" 16
    end=$(date +%s.%N)
    read -r u1 s1 < <(cpu_ticks_split "$pid")
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    python3 -c "
hz, secs = $(getconf CLK_TCK), $end - $start
u, s = ($u1 - $u0) / hz / secs, ($s1 - $s0) / hz / secs
print(f'{u + s:.4f} {u:.4f} {s:.4f}')" >"$OUT/cpu-$name.txt"
}
log "CPU and memory at 1,000 req/s for ${CPU_DURATION}s each"
IDLE_RSS=$(rss_kib "$SIDECAR_PID")
measure_fixed sidecar "$SIDECAR_PID" "http://127.0.0.1:$SIDECAR_PORT/"
measure_fixed nginx "$NGINX_WORKER" "http://127.0.0.1:$NGINX_PORT/"

# --- 1 GiB up and down ---------------------------------------------------------------
# transfer NAME CMD...: runs CMD while sampling the sidecar's RSS; prints the
# growth over the RSS before (KiB).
transfer() {
    local name=$1 before
    shift
    before=$(rss_kib "$SIDECAR_PID")
    echo "$before" >"$OUT/rss-$name.txt"
    sample_rss "$SIDECAR_PID" "$OUT/rss-$name.txt"
    "$@" >"$OUT/$name.out" 2>"$OUT/$name.err" || die "$name failed (see $OUT/$name.err)"
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    echo $(($(max_of "$OUT/rss-$name.txt") - before)) >"$OUT/growth-$name.txt"
}
log "uploading and downloading $TRANSFER bytes through the sidecar"
upload() {
    head -c "$TRANSFER" /dev/zero |
        curl -sS --fail -T - -X POST -H 'Content-Type: application/octet-stream' \
            "http://127.0.0.1:$SIDECAR_PORT/upload"
}
transfer upload upload
grep -q "\"bytes\":$TRANSFER}" "$OUT/upload.out" || die "the app got $(cat "$OUT/upload.out"), not $TRANSFER bytes"
transfer download curl -sS --fail -o /dev/null -w '%{size_download}' \
    "http://127.0.0.1:$SIDECAR_PORT/download/$TRANSFER"
[[ $(cat "$OUT/download.out") == "$TRANSFER" ]] || die "downloaded $(cat "$OUT/download.out") bytes, not $TRANSFER"

# --- report --------------------------------------------------------------------------
python3 - "$OUT" "$ROUNDS" "$IDLE_RSS" >"$OUT/rows.txt" <<'PY'
import json, statistics, sys
out, rounds, idle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def load(name):
    return json.load(open(f"{out}/{name}.json"))
lat = {}
for key in ("nginx", "sidecar", "haproxy"):
    runs = [load(f"latency-{key}-r{r}") for r in range(1, rounds + 1)]
    for run in runs:
        if run["summary"]["successRate"] < 1.0:
            sys.exit(f"{key}: failed requests in the latency run: {run['errorDistribution']}")
    lat[key] = {p: statistics.median(r["latencyPercentiles"][p] * 1000 for r in runs) for p in ("p50", "p99")}
    lat[key]["rps"] = statistics.median(r["summary"]["requestsPerSec"] for r in runs)
def cpus(name):
    return [float(x) for x in open(f"{out}/cpu-{name}.txt").read().split()]
def cpu(name):
    return cpus(name)[0]
def split(name):
    total, user, system = cpus(name)
    return f"{total:.3f} (user {user:.3f} + system {system:.3f})"
def peak(name):
    return max(int(x) for x in open(f"{out}/rss-{name}.txt").read().split())
def growth(name):
    return int(open(f"{out}/growth-{name}.txt").read())
s, n, h = lat["sidecar"], lat["nginx"], lat["haproxy"]
mb = lambda kib: kib * 1024 / 1e6
rows = [
    ("added latency p50 (open loop)", f"{s['p50']:.3f} ms (nginx {n['p50']:.3f}, haproxy {h['p50']:.3f})", "<= nginx", s["p50"] <= n["p50"]),
    ("added latency p99 (open loop)", f"{s['p99']:.3f} ms (nginx {n['p99']:.3f}, haproxy {h['p99']:.3f})", "<= nginx", s["p99"] <= n["p99"]),
    ("CPU at 1,000 req/s", f"{split('sidecar')} core; nginx {split('nginx')}", "<= 0.05 core", cpu("sidecar") <= 0.05),
    ("RSS idle (after warm-up)", f"{mb(idle):.1f} MB", "<= 10 MB", mb(idle) <= 10),
    ("RSS at 1,000 req/s (peak)", f"{mb(peak('sidecar')):.1f} MB (nginx worker {mb(peak('nginx')):.1f})", "<= 20 MB", mb(peak("sidecar")) <= 20),
    ("RSS growth, 1 GiB upload", f"{mb(growth('upload')):.1f} MB", "<= 8 MB", mb(growth("upload")) <= 8),
    ("RSS growth, 1 GiB download", f"{mb(growth('download')):.1f} MB", "<= 8 MB", mb(growth("download")) <= 8),
]
for label, value, goal, met in rows:
    print(f"{label}\t{value}\t{goal}\t{'yes' if met else 'no'}")
json.dump({"latency_ms": lat, "cpu_cores": {k: dict(zip(("total", "user", "system"), cpus(k))) for k in ("sidecar", "nginx")},
           "rss_kib": {"idle": idle, "at_1000_rps": peak("sidecar"), "nginx_worker_at_1000_rps": peak("nginx")},
           "growth_kib": {"upload": growth("upload"), "download": growth("download")}},
          open(f"{out}/load.json", "w"), indent=2)
PY
echo
echo "dockerflow-sidecar at a fixed rate ($(nproc) CPUs, $(date -u +%F)); open loop at $RATE req/s"
while IFS=$'\t' read -r label value goal met; do
    goal_row "$label" "$value" "$goal" "$met"
done <"$OUT/rows.txt"
