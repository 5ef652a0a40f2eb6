#!/usr/bin/env bash
# Report intake throughput with storage on: wrk posts realistic CSP reports
# (bench/reports.lua) to the release sidecar, which validates, logs, and
# stores them in its SQLite file. Prints reports/s, latency, RSS over the run
# and what the database holds afterwards; the goal is >= 20,000 reports/s
# with memory flat.
#
#   bash bench/reports.sh
#
# Environment: BENCH_DURATION (default 10s), BENCH_CONNECTIONS (64),
# BENCH_THREADS (2), BENCH_SKIP_BUILD=1, BENCH_DISTINCT=1 (every report
# distinct, so every one is a new row instead of mostly counts).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/bench/out/reports"
DURATION=${BENCH_DURATION:-10s}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
GOAL=20000
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
ensure_tools wrk curl python3 sqlite3

build_binaries
rm -rf "$OUT" && mkdir -p "$OUT"

port=$(free_port)
closed=$(free_port)
# Limits raised: one load generator on one address is not the flood the
# per-client limit is for. Everything else is the default (logging at warn,
# query strings cut, dedup window 1h).
(cd "$OUT" && \
    DOCKERFLOW_LISTEN=127.0.0.1:$port \
    DOCKERFLOW_ADMIN__LISTEN=127.0.0.1:0 \
    DOCKERFLOW_REPORTS__RATE_PER_CLIENT=100000000 \
    DOCKERFLOW_REPORTS__BURST_PER_CLIENT=100000000 \
    DOCKERFLOW_REPORTS__GLOBAL_RATE=100000000 \
    DOCKERFLOW_SHUTDOWN__DRAIN=0s \
    exec "$SIDECAR" --upstream "http://127.0.0.1:$closed" >"$OUT/sidecar.log" 2>&1) &
PID=$!
PIDS+=("$PID")
end=$((SECONDS + 15))
until curl -fs -o /dev/null "http://127.0.0.1:$port/__lbheartbeat__"; do
    ((SECONDS < end)) || die "the sidecar did not start"
    sleep 0.05
done

rss() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }
log "warm-up (2s)"
wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s "$ROOT/bench/reports.lua" "http://127.0.0.1:$port" >/dev/null
rss_start=$(rss)
( while kill -0 "$PID" 2>/dev/null; do rss >>"$OUT/rss.txt"; sleep 0.5; done ) &
sampler=$!
log "measuring ($DURATION, $CONNECTIONS connections)"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/bench/reports.lua" \
    "http://127.0.0.1:$port" >"$OUT/wrk.txt"
rss_end=$(rss)
kill "$sampler" 2>/dev/null || true
rss_max=$(sort -n "$OUT/rss.txt" | tail -n 1)

kill -TERM "$PID"
wait "$PID" || true
PID=

result=$(grep '^{' "$OUT/wrk.txt" | tail -n 1)
read -r rows total < <(sqlite3 -separator ' ' "$OUT/dockerflow-sidecar.db" "SELECT count(*), sum(count) FROM reports")
lines=$(grep -c '"Type":"report"' "$OUT/sidecar.log" || true)
python3 - "$result" "$rss_start" "$rss_max" "$rss_end" "$rows" "$total" "$lines" "$GOAL" "$OUT/result.json" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
rss_start, rss_max, rss_end, rows, total, lines, goal = map(int, sys.argv[2:9])
rate = r["requests"] / (r["duration_us"] / 1e6)
out = {"reports_per_s": round(rate), "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "non_2xx": r["non_2xx"],
       "socket_errors": r["socket_errors"], "rss_kib": {"after_warmup": rss_start, "max": rss_max, "end": rss_end},
       "stored_rows": rows, "stored_reports": total, "report_lines": lines}
json.dump(out, open(sys.argv[9], "w"), indent=2)
print(f"reports/s        {rate:>10.0f}   (goal >= {goal}: {'MET' if rate >= goal else 'NOT MET'})")
print(f"latency p50/p99  {r['p50_ms']:>6.2f} / {r['p99_ms']:.2f} ms")
print(f"non-2xx answers  {r['non_2xx']:>10}   socket errors {r['socket_errors']}")
print(f"RSS KiB          after warm-up {rss_start}, max {rss_max}, end {rss_end} (growth {rss_max - rss_start})")
print(f"stored           {total} reports in {rows} rows; {lines} report log lines (warm-up included)")
PY
