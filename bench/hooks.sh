#!/usr/bin/env bash
# Hook delivery throughput through the durable outbox (synchronous=FULL):
# wrk posts realistic CSP reports (bench/reports.lua), each a
# `report.received` event; a hook sends every one to a local receiver
# (examples/bench_upstream, answering 200). Prints the rate at which rows
# were written to the outbox and delivered; the goal is >= 2,000 events/s.
#
#   bash bench/hooks.sh
#
# Environment: BENCH_DURATION (default 10s), BENCH_CONNECTIONS (16),
# BENCH_SKIP_BUILD=1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/bench/out/hooks"
DURATION=${BENCH_DURATION:-10s}
CONNECTIONS=${BENCH_CONNECTIONS:-16}
GOAL=2000
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
RECEIVER=$UPSTREAM_BIN
ensure_tools wrk curl python3 sqlite3
build_binaries
rm -rf "$OUT" && mkdir -p "$OUT"

"$RECEIVER" 127.0.0.1:0 >"$OUT/receiver.txt" &
PIDS+=($!)
end=$((SECONDS + 10))
until [ -s "$OUT/receiver.txt" ]; do ((SECONDS < end)) || die "receiver did not start"; sleep 0.05; done
receiver=$(head -n 1 "$OUT/receiver.txt")

port=$(free_port)
cat >"$OUT/sidecar.toml" <<TOML
listen = "127.0.0.1:$port"
[admin]
listen = "127.0.0.1:0"
[upstream]
url = "http://$receiver"
[reports]
rate_per_client = 100000000
burst_per_client = 100000000
global_rate = 100000000
[delivery]
concurrency = 16
[[hooks]]
name = "bench"
events = ["report.received"]
url = "http://$receiver/hook"
secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
TOML
(cd "$OUT" && exec "$SIDECAR" --config "$OUT/sidecar.toml" >"$OUT/sidecar.log" 2>&1) &
PIDS+=($!)
end=$((SECONDS + 15))
until curl -fs -o /dev/null "http://127.0.0.1:$port/__lbheartbeat__"; do
    ((SECONDS < end)) || die "the sidecar did not start"
    sleep 0.05
done

log "posting reports for $DURATION ($CONNECTIONS connections)"
wrk -t2 -c"$CONNECTIONS" -d"$DURATION" -s "$ROOT/bench/reports.lua" "http://127.0.0.1:$port" >"$OUT/wrk.txt"
db="$OUT/dockerflow-sidecar.db"
log "waiting for the outbox to drain"
end=$((SECONDS + 120))
while [ "$(sqlite3 "$db" "SELECT count(*) FROM hook_outbox WHERE status <> 'sent'")" != 0 ]; do
    ((SECONDS < end)) || { log "outbox not drained after 120s"; break; }
    sleep 0.5
done
read -r rows sent first_created last_created last_sent < <(sqlite3 -separator ' ' "$db" \
    "SELECT count(*), sum(status = 'sent'), min(created), max(created), max(CASE WHEN status = 'sent' THEN updated END) FROM hook_outbox")
accepted=$(grep -a -c '"Type":"report"' "$OUT/sidecar.log" || true)
python3 - "$rows" "$sent" "$first_created" "$last_created" "$last_sent" "$accepted" "$GOAL" <<'PY'
import sys
rows, sent, first, last_created, last_sent, accepted, goal = map(int, sys.argv[1:8])
written = rows / max((last_created - first) / 1000, 1e-3)
delivered = sent / max((last_sent - first) / 1000, 1e-3)
print(f"events (reports accepted)   {accepted}")
print(f"outbox rows written         {rows}  ({written:.0f}/s)")
print(f"delivered (2xx)             {sent}  ({delivered:.0f}/s end to end; goal >= {goal}: {'MET' if delivered >= goal else 'NOT MET'})")
PY
