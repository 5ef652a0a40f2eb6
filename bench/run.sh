#!/usr/bin/env bash
# Throughput and latency of the sidecar next to nginx and haproxy, measured in
# one run on this machine and reported as ratios (the machine is small, shared
# and noisy: only same-run ratios mean anything).
#
#   bash bench/run.sh
#
# Starts a bare upstream (examples/bench_upstream.rs: 200 + 1 KiB body), then
# nginx, haproxy and the sidecar in front of it, all on 127.0.0.1 with free
# ports, drives each with the same wrk load (keep-alive, 64 connections,
# 2 threads) after a short warm-up, prints a table and writes
# bench/out/results.json. Everything it starts is stopped on exit.
#
# Environment:
#   BENCH_DURATION     measured wrk run per target and round   (default 10s)
#   BENCH_WARMUP       unmeasured wrk run before each one       (default 2s)
#   BENCH_ROUNDS       rounds over all targets; medians are kept (default 3)
#   BENCH_CONNECTIONS  wrk connections                          (default 64)
#   BENCH_THREADS      wrk threads                              (default 2)
#   BENCH_SKIP_BUILD=1 use the existing release binaries as they are
#
# It also prints the CPU each proxy's process spent per request, user and
# system (/proc/PID/stat around each measured run): where the kernel's part
# is the same for all, it shows how much of the gap user space can close.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/bench/out"
DURATION=${BENCH_DURATION:-10s}
WARMUP=${BENCH_WARMUP:-2s}
ROUNDS=${BENCH_ROUNDS:-3}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

ensure_tools "$NGINX" "$HAPROXY" "$WRK" curl python3
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer, not '$ROUNDS'"

# --- build -------------------------------------------------------------------
build_binaries

rm -rf "$OUT"
mkdir -p "$OUT"

# wrk prints one JSON line with exact percentiles (microseconds) when done.
cat >"$OUT/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"rps":%.1f,' ..
    '"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"mean_us":%.1f,"max_us":%.0f,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, summary.duration,
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
LUA

# --- servers -------------------------------------------------------------------
start_upstream
start_nginx
start_haproxy
start_sidecar 1 "$OUT/sidecar.log"
SIDECAR1_PORT=$SIDECAR_PORT
SIDECAR1_PID=$SIDECAR_PID
log "sidecar (1 thread) on 127.0.0.1:$SIDECAR1_PORT (pid $SIDECAR_PID)"
start_sidecar 0 "$OUT/sidecar-2threads.log"
SIDECAR2_PORT=$SIDECAR_PORT
SIDECAR2_PID=$SIDECAR_PID
NGINX_WORKER=$(pgrep -P "$NGINX_PID" | head -n 1)
[[ -n $NGINX_WORKER ]] || die "nginx has no worker process"
log "sidecar (default threads = $(nproc) CPUs) on 127.0.0.1:$SIDECAR2_PORT (pid $SIDECAR_PID)"
# --- load --------------------------------------------------------------------
# Targets: key|label|url|pid (the process whose CPU time is read), in the
# order they are measured within a round: the sidecar right between nginx and
# haproxy, so that the runs whose ratios are the point are close in time (the
# machine's background load drifts).
TARGETS=(
    "upstream|upstream (direct)|http://$UPSTREAM_ADDR/|$UPSTREAM_PID"
    "nginx|nginx (1 worker)|http://127.0.0.1:$NGINX_PORT/|$NGINX_WORKER"
    "sidecar|sidecar (1 thread)|http://127.0.0.1:$SIDECAR1_PORT/|$SIDECAR1_PID"
    "haproxy|haproxy (1 thread)|http://127.0.0.1:$HAPROXY_PORT/|$HAPROXY_PID"
    "sidecar_2t|sidecar (2 threads)|http://127.0.0.1:$SIDECAR2_PORT/|$SIDECAR2_PID"
    "lbheartbeat|sidecar /__lbheartbeat__ (1 thread)|http://127.0.0.1:$SIDECAR1_PORT/__lbheartbeat__|$SIDECAR1_PID"
)

: >"$OUT/rows.jsonl"
# Other work on the machine skews everything: record how busy it was.
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "load: wrk -t$THREADS -c$CONNECTIONS, warm-up $WARMUP, measure $DURATION, $ROUNDS round(s), ${#TARGETS[@]} targets"
for ((round = 1; round <= ROUNDS; round++)); do
    for target in "${TARGETS[@]}"; do
        IFS='|' read -r key label url pid <<<"$target"
        log "round $round/$ROUNDS: $label"
        "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" -s "$OUT/report.lua" "$url" \
            >"$OUT/wrk-$key-r$round-warmup.txt" 2>&1
        # utime and stime, in clock ticks (fields 14 and 15; the name in
        # field 2 has no spaces here).
        read -r user0 sys0 < <(awk '{ print $14, $15 }' "/proc/$pid/stat")
        "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$OUT/report.lua" "$url" \
            >"$OUT/wrk-$key-r$round.txt" 2>&1
        read -r user1 sys1 < <(awk '{ print $14, $15 }' "/proc/$pid/stat")
        warm=$(sed -n 's/^BENCH_JSON //p' "$OUT/wrk-$key-r$round-warmup.txt")
        json=$(sed -n 's/^BENCH_JSON //p' "$OUT/wrk-$key-r$round.txt")
        [[ -n $warm && -n $json ]] || die "wrk printed no result for $label (see $OUT/wrk-$key-r$round*.txt)"
        printf '{"key":"%s","label":"%s","url":"%s","round":%d,"wrk":%s,"warmup":%s,"cpu_ticks":{"user":%d,"system":%d}}\n' \
            "$key" "$label" "$url" "$round" "$json" "$warm" $((user1 - user0)) $((sys1 - sys0)) \
            >>"$OUT/rows.jsonl"
    done
done

# Stop the servers now so their logs are complete (the sidecar flushes on exit).
for pid in "${PIDS[@]}"; do
    stop_pid "$pid"
done
PIDS=()

# --- report ------------------------------------------------------------------
LOADAVG_END=$(cut -d' ' -f1-3 /proc/loadavg)
LOADAVG_START=$LOADAVG_START LOADAVG_END=$LOADAVG_END \
    BENCH_OUT=$OUT BENCH_DURATION=$DURATION BENCH_WARMUP=$WARMUP BENCH_ROUNDS=$ROUNDS \
    BENCH_CONNECTIONS=$CONNECTIONS BENCH_THREADS=$THREADS CLK_TCK=$(getconf CLK_TCK) \
    NGINX_VERSION=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //') \
    HAPROXY_VERSION=$("$HAPROXY" -v | head -n 1) \
    WRK_VERSION=$("$WRK" -v 2>&1 | head -n 1 | cut -d' ' -f1-2) \
    python3 - <<'PY'
import datetime, json, os, platform, statistics, subprocess

out = os.environ["BENCH_OUT"]
rows = [json.loads(line) for line in open(os.path.join(out, "rows.jsonl"))]

# Display order (the measuring order differs, see TARGETS).
order = ["upstream", "nginx", "haproxy", "sidecar", "sidecar_2t", "lbheartbeat"]
labels, by_key, cpu_by_key = {}, {}, {}
tick_us = 1e6 / int(os.environ["CLK_TCK"])
for r in rows:
    labels[r["key"]] = r["label"]
    by_key.setdefault(r["key"], []).append(r["wrk"])
    n = max(r["wrk"]["requests"], 1)
    cpu_by_key.setdefault(r["key"], []).append({
        "user_us": r["cpu_ticks"]["user"] * tick_us / n,
        "system_us": r["cpu_ticks"]["system"] * tick_us / n,
    })
order = [k for k in order if k in by_key] + [k for k in by_key if k not in order]

def median(key, field):
    return statistics.median(w[field] for w in by_key[key])

results = {}
for k in order:
    runs = by_key[k]
    errors = {e: sum(w["errors"][e] for w in runs) for e in runs[0]["errors"]}
    results[k] = {
        "label": labels[k],
        "rps": median(k, "rps"),
        "p50_ms": median(k, "p50_us") / 1000,
        "p90_ms": median(k, "p90_us") / 1000,
        "p99_ms": median(k, "p99_us") / 1000,
        "requests": sum(w["requests"] for w in runs),
        "errors": errors,
        # The CPU the process behind the target spent per request (for
        # "upstream (direct)", the upstream's own).
        "cpu_us_per_request": {
            part: statistics.median(c[f"{part}_us"] for c in cpu_by_key[k])
            for part in ("user", "system")
        },
        "rounds": runs,
    }

# Ratios are paired: a/b within each round (same minutes, same background
# load), then the median over rounds.
def ratio(a, b):
    pairs = list(zip(by_key[a], by_key[b]))
    def med(field):
        return statistics.median(x[field] / y[field] for x, y in pairs)
    return {
        "throughput": med("rps"),
        "p50": med("p50_us"),
        "p99": med("p99_us"),
        "throughput_per_round": [x["rps"] / y["rps"] for x, y in pairs],
    }

ratios = {
    "sidecar/nginx": ratio("sidecar", "nginx"),
    "sidecar/haproxy": ratio("sidecar", "haproxy"),
    "sidecar (2 threads)/nginx": ratio("sidecar_2t", "nginx"),
    "sidecar (2 threads)/haproxy": ratio("sidecar_2t", "haproxy"),
}
goal = ratios["sidecar/nginx"]["throughput"]
target = {
    "text": "sidecar throughput >= 0.8 x nginx (product goal 1.1 x)",
    "sidecar_over_nginx": goal,
    "met": goal >= 0.8,
    "product_goal_met": goal >= 1.1,
}

# Logging is part of the job: check that every request sent (warm-ups
# included) left a line, so a proxy that drops log lines under load is caught.
# A few more lines than requests are normal: readiness probes, and requests
# still in flight when a wrk run stops are answered and logged.
def count_lines(path, needle=None):
    cmd = ["grep", "-c", "-F", needle, path] if needle else ["wc", "-l", path]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
        return int(res.stdout.split()[0])
    except (OSError, ValueError, IndexError):
        return None

logs = {
    "sidecar.log": (["sidecar", "lbheartbeat"], '"Type":"request.summary"'),
    "sidecar-2threads.log": (["sidecar_2t"], '"Type":"request.summary"'),
    "nginx/access.log": (["nginx"], None),
}
log_check = {}
for name, (keys, needle) in logs.items():
    sent = sum(r["wrk"]["requests"] + r["warmup"]["requests"] for r in rows if r["key"] in keys)
    logged = count_lines(os.path.join(out, name), needle)
    log_check[name] = {"requests_sent": sent, "request_lines": logged,
                       "missing": None if logged is None else max(0, sent - logged)}

def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()

env = os.environ
meta = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "cpus": os.cpu_count(),
    "cpu_model": cpu_model(),
    "kernel": platform.release(),
    "load": {
        "tool": env["WRK_VERSION"],
        "connections": int(env["BENCH_CONNECTIONS"]),
        "threads": int(env["BENCH_THREADS"]),
        "duration": env["BENCH_DURATION"],
        "warmup": env["BENCH_WARMUP"],
        "rounds": int(env["BENCH_ROUNDS"]),
        "aggregate": "median over rounds; ratios: median of per-round ratios",
    },
    "loadavg_start": env["LOADAVG_START"],
    "loadavg_end": env["LOADAVG_END"],
    "nginx": env["NGINX_VERSION"],
    "haproxy": env["HAPROXY_VERSION"],
    "logs": log_check,
}

with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"meta": meta, "results": results, "ratios": ratios, "target": target}, f, indent=2)
    f.write("\n")

w = max(len(r["label"]) for r in results.values())
print()
print(f"{meta['cpus']} CPUs ({meta['cpu_model']}); wrk -t{meta['load']['threads']} -c{meta['load']['connections']} "
      f"-d{meta['load']['duration']} (warm-up {meta['load']['warmup']}), {meta['load']['rounds']} round(s), median kept")
print(f"load average before: {meta['loadavg_start']}, after: {meta['loadavg_end']}")
print()
print(f"{'target':<{w}}  {'req/s':>10}  {'p50 ms':>8}  {'p99 ms':>8}  {'errors':>6}")
print(f"{'-' * w}  {'-' * 10}  {'-' * 8}  {'-' * 8}  {'-' * 6}")
for r in results.values():
    print(f"{r['label']:<{w}}  {r['rps']:>10.0f}  {r['p50_ms']:>8.3f}  {r['p99_ms']:>8.3f}  {sum(r['errors'].values()):>6}")
print()
rw = max(len(k) for k in ratios)
print(f"{'ratio':<{rw}}  {'req/s':>6}  {'p50':>6}  {'p99':>6}  req/s per round")
print(f"{'-' * rw}  {'-' * 6}  {'-' * 6}  {'-' * 6}  {'-' * 15}")
for name, r in ratios.items():
    per_round = " ".join(f"{x:.2f}" for x in r["throughput_per_round"])
    print(f"{name:<{rw}}  {r['throughput']:>6.2f}  {r['p50']:>6.2f}  {r['p99']:>6.2f}  {per_round}")
print("(req/s ratio: higher is better for the sidecar; p50/p99 ratios: lower is better)")
print()
print("CPU per request of the process behind each target (/proc/PID/stat, median over rounds)")
print(f"{'target':<{w}}  {'user µs':>8}  {'system µs':>9}  {'total µs':>8}")
print(f"{'-' * w}  {'-' * 8}  {'-' * 9}  {'-' * 8}")
for r in results.values():
    c = r["cpu_us_per_request"]
    print(f"{r['label']:<{w}}  {c['user']:>8.2f}  {c['system']:>9.2f}  {c['user'] + c['system']:>8.2f}")
print()
verdict = "MET" if target["met"] else "NOT MET"
product = "met" if target["product_goal_met"] else "not met"
print(f"target: {target['text']}: sidecar/nginx = {goal:.2f} x -> {verdict} (product goal: {product})")
for name, c in log_check.items():
    if c["request_lines"] is None:
        print(f"WARNING: {name}: cannot count its lines")
    elif c["missing"]:
        print(f"WARNING: {name}: {c['request_lines']} request lines for {c['requests_sent']} requests sent: "
              f"{c['missing']} lines missing (dropped under load?)")
    else:
        print(f"log {name}: {c['request_lines']} request lines for {c['requests_sent']} requests sent")
bad = [r["label"] for r in results.values() if sum(r["errors"].values())]
if bad:
    print("WARNING: wrk counted errors (non-2xx/3xx, timeouts, socket errors) for: " + ", ".join(bad))
print(f"results: {os.path.join(out, 'results.json')}")
PY

# Issue 9's rows, with their goals (also in bench/out/goals.txt).
python3 - "$OUT/results.json" >"$OUT/goal-rows.txt" <<'PY'
import json, statistics, sys
r = json.load(open(sys.argv[1]))
ra, res = r["ratios"], r["results"]
n, h = ra["sidecar/nginx"]["throughput"], ra["sidecar/haproxy"]["throughput"]
lb = res["lbheartbeat"]["rps"] / res["sidecar"]["rps"]
print(f"proxied throughput, keep-alive, 1 KiB, 64 conns\t{n:.2f} x nginx, {h:.2f} x haproxy\t>= 1.1 x both\t{'yes' if min(n, h) >= 1.1 else 'no'}")
print(f"/__lbheartbeat__ throughput\t{lb:.1f} x proxied ({res['lbheartbeat']['rps']:.0f} req/s)\t>= 2 x proxied\t{'yes' if lb >= 2 else 'no'}")
# Not a goal: what bounds the first row (the kernel's part is the same for all).
cpu = {k: res[k]["cpu_us_per_request"] for k in ("sidecar", "nginx", "haproxy")}
split = "; ".join(f"{k} {c['user']:.1f} + {c['system']:.1f}" for k, c in cpu.items())
print(f"CPU per request at saturation, user + system\t{split} µs\t(bounds the first row)\t-")
PY
echo
while IFS=$'\t' read -r label value goal met; do
    goal_row "$label" "$value" "$goal" "$met"
done <"$OUT/goal-rows.txt"
