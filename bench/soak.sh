#!/usr/bin/env bash
# Soak: 10,000 concurrent client connections of mixed traffic through the
# release sidecar with everything on (a mozlog line per request to a file,
# metrics and the admin listener, the heartbeat with four checks, report
# intake storing to its state file), for SOAK_DURATION, by
# examples/mixed_load.rs: proxied GET/POST/downloads, health routes, browser
# reports, and WebSocket-style tunnels echoing through to the app.
#
# Prints requests per kind (sent, ok, failed), tunnels and echoes, latency,
# the sidecar's RSS every 5 s (after warm-up vs at the end: memory flat means
# growth within max(SOAK_GROWTH_PCT % of the warm-up RSS, SOAK_GROWTH_KIB)),
# its peak fd count against its limit, request.summary lines against requests
# sent (exactly one per request), its exit after SIGTERM, and a verdict.
# Exits non-zero on any failed request, a missing or duplicated summary line,
# growth above the bound, or an unclean exit. Raw output: bench/out/soak/.
#
#   bash bench/soak.sh
#
# Environment:
#   SOAK_DURATION      the load                                  (default 60s)
#   SOAK_CONNECTIONS   concurrent client connections             (default 10000)
#   SOAK_RATE          HTTP requests per second, all connections
#                      together; 0 for closed-loop (unpaced)      (default 5000)
#   SOAK_MIX           connection/request mix (see mixed_load.rs)
#                                      (default proxied=70,health=10,reports=10,ws=10)
#   SOAK_WS_HOLD       how long each tunnel stays open           (default 5s)
#   SOAK_WARMUP        seconds into the load of the RSS baseline (default: half
#                      the duration; RSS follows the peak of concurrent
#                      upstream connections, which keeps rising while a
#                      starved app falls behind, so "flat" is judged once
#                      the pools have filled)
#   SOAK_GROWTH_PCT    allowed RSS growth, % of the baseline     (default 10)
#   SOAK_GROWTH_KIB    ... or this many KiB, whichever is larger (default 8192)
#   BENCH_SKIP_BUILD=1 use the existing release binaries
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/bench/out/soak"
DURATION=${SOAK_DURATION:-60s}
CONNECTIONS=${SOAK_CONNECTIONS:-10000}
RATE=${SOAK_RATE:-5000}
MIX=${SOAK_MIX:-proxied=70,health=10,reports=10,ws=10}
WS_HOLD=${SOAK_WS_HOLD:-5s}
WARMUP=${SOAK_WARMUP:-}
GROWTH_PCT=${SOAK_GROWTH_PCT:-10}
GROWTH_KIB=${SOAK_GROWTH_KIB:-8192}
PREFIX="soak$$"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

ensure_tools curl python3
DURATION_S=$(python3 -c '
import re, sys
m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", sys.argv[1])
if not m: sys.exit(f"SOAK_DURATION: cannot read {sys.argv[1]!r}")
v, unit = float(m[1]), m[2] or "s"
print(int(v / 1000 if unit == "ms" else v * 60 if unit == "m" else v))' "$DURATION")
WARMUP=${WARMUP:-$((DURATION_S / 2))}
((WARMUP < DURATION_S)) || die "SOAK_WARMUP ($WARMUP s) must be shorter than SOAK_DURATION ($DURATION_S s)"

# --- descriptors: every process gets the hard limit ----------------------------------
ulimit -n "$(ulimit -Hn)"
FD_LIMIT=$(ulimit -n)
# The sidecar holds every client socket, one upstream socket per tunnel and
# per proxied request in flight (pool_max_idle = 256 more kept idle), its
# state file, listeners and log. In flight: about 10 % of the proxied
# connections when paced (SOAK_RATE well below capacity), all of them when
# closed-loop (SOAK_RATE=0).
read -r WS_SHARE PROXIED_SHARE < <(python3 -c '
import sys
w = {k: int(v) for k, v in (p.split("=") for p in sys.argv[1].split(","))}
total = sum(w.values())
print(w.get("ws", 0) / total, w.get("proxied", 0) / max(total - w.get("ws", 0), 1))' "$MIX")
NEED=$(python3 -c "
import math
c, t = $CONNECTIONS, math.ceil($CONNECTIONS * $WS_SHARE)
in_flight = (c - t) * $PROXIED_SHARE * (1.0 if '$RATE' == '0' else 0.1)
print(math.ceil(c + t + in_flight + 256 + 64))")
log "fd limit $FD_LIMIT (hard $(ulimit -Hn)); the sidecar needs about $NEED at $CONNECTIONS connections"
((FD_LIMIT >= NEED)) || die "ulimit -n is $FD_LIMIT; $NEED needed (raise the hard limit)"

build_binaries
build_mixed_load
rm -rf "$OUT"
mkdir -p "$OUT"

start_upstream

# --- the sidecar, everything on --------------------------------------------------------
SIDECAR_PORT=$(free_port)
ADMIN_PORT=$(free_port)
cat >"$OUT/version.json" <<'EOF'
{"source": "https://github.com/mozilla-services/dockerflow-sidecar", "version": "soak", "commit": "0000000", "build": "bench/soak.sh"}
EOF
cat >"$OUT/sidecar.toml" <<EOF
listen = "127.0.0.1:$SIDECAR_PORT"
hooks = []

[upstream]
url = "http://$UPSTREAM_ADDR"

[version]
files = ["$OUT/version.json"]

[logging]
format = "mozlog"
level = "info"

[heartbeat]
details = "full"
cache_ttl = "1s"

[[heartbeat.checks]]
name = "upstream"
kind = "upstream"
path = "/"

[[heartbeat.checks]]
name = "app-port"
kind = "tcp"
url = "tcp://$UPSTREAM_ADDR"

[[heartbeat.checks]]
name = "disk"
kind = "disk"
path = "$OUT"
min_free = "1%"

[[heartbeat.checks]]
name = "version-file"
kind = "file"
path = "$OUT/version.json"

[reports]
paths = ["/__cspreport__"]
# One load generator on one address is not the flood these limits are for.
rate_per_client = 100000000
burst_per_client = 100000000
global_rate = 100000000

[state]
path = "$OUT/state.db"

[admin]
enabled = true
listen = "127.0.0.1:$ADMIN_PORT"

[shutdown]
drain = "0s"
grace = "10s"
EOF
run_sidecar "$OUT/sidecar.toml" /__heartbeat__
log "sidecar on 127.0.0.1:$SIDECAR_PORT, admin on $ADMIN_PORT (pid $SIDECAR_PID, fd limit $(fd_limit "$SIDECAR_PID"))"

# --- load, with the sidecar sampled every second ------------------------------------------
# samples.txt: seconds since the load started, RSS KiB, open fds, and from
# /metrics: open connections, open tunnels, upstream connections.
metric() { awk -v m="$1" '$1 == m { print $2 }' <<<"$2"; }
sampler() {
    local start=$1 t metrics
    while kill -0 "$SIDECAR_PID" 2>/dev/null; do
        t=$(awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }')
        metrics=$(curl -s --max-time 2 "http://127.0.0.1:$ADMIN_PORT/metrics" || true)
        printf '%s %s %s %s %s %s\n' "$t" "$(rss_kib "$SIDECAR_PID" || echo 0)" "$(fd_count "$SIDECAR_PID")" \
            "$(metric dockerflow_sidecar_open_connections "$metrics")" \
            "$(metric dockerflow_sidecar_open_tunnels "$metrics")" \
            "$(metric dockerflow_sidecar_upstream_connections "$metrics")" >>"$OUT/samples.txt"
        sleep 1
    done
}
RATE_ARGS=()
[[ $RATE == 0 ]] || RATE_ARGS=(--rate "$RATE")
IDLE_RSS=$(rss_kib "$SIDECAR_PID")
CPU_BEFORE=$(cpu_ticks "$SIDECAR_PID")
LOADAVG_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
LOAD_START=$(date +%s.%N)
sampler "$LOAD_START" &
SAMPLER_PID=$!
PIDS+=("$SAMPLER_PID")
log "load: $CONNECTIONS connections, $MIX, rate ${RATE/#0/unpaced}, for $DURATION"
set +e
"$MIXED_LOAD_BIN" --target "127.0.0.1:$SIDECAR_PORT" --connections "$CONNECTIONS" --duration "$DURATION" \
    "${RATE_ARGS[@]}" --mix "$MIX" --ws-hold "$WS_HOLD" --rid-prefix "$PREFIX" \
    >"$OUT/load.json" 2>"$OUT/load.err"
LOAD_RC=$?
set -e
LOAD_END=$(date +%s.%N)
CPU_S=$(awk -v a="$CPU_BEFORE" -v b="$(cpu_ticks "$SIDECAR_PID")" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", (b - a) / hz }')
LOADAVG_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
sleep 3 # the connections close; one more sample at rest
kill "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true
[[ -s $OUT/load.json ]] || die "mixed_load printed no result (rc $LOAD_RC, see $OUT/load.err)"

# --- stop: SIGTERM, timed; the log is complete once it has exited ---------------------------
term_and_time "$SIDECAR_PID" 30
SIDECAR_RC=$EXIT_STATUS
EXIT_S=$EXIT_SECONDS

python3 - "$OUT" "$PREFIX" "$LOAD_RC" "$SIDECAR_RC" "$EXIT_S" "$IDLE_RSS" "$WARMUP" \
    "$GROWTH_PCT" "$GROWTH_KIB" "$FD_LIMIT" "$(awk -v a="$LOAD_START" -v b="$LOAD_END" 'BEGIN { print b - a }')" \
    "$CPU_S" "$(nproc)" "$LOADAVG_BEFORE" "$LOADAVG_AFTER" <<'PY'
import json, sqlite3, sys
out, prefix = sys.argv[1], sys.argv[2]
load_rc, sidecar_rc = int(sys.argv[3]), int(sys.argv[4])
exit_s, idle_rss, warmup = float(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
growth_pct, growth_kib, fd_limit, load_s = float(sys.argv[8]), int(sys.argv[9]), int(sys.argv[10]), float(sys.argv[11])
cpu_s, ncpu, loadavg_before, loadavg_after = float(sys.argv[12]), int(sys.argv[13]), sys.argv[14], sys.argv[15]
r = json.load(open(f"{out}/load.json"))
problems = []

print(f"\nsoak: {r['connections']} connections ({r['http_connections']} HTTP, {r['tunnel_connections']} tunnel loops), "
      f"mix {r['mix']}, rate cap {r['rate_cap'] or 'none (closed loop)'}, {r['duration_s']:.0f} s (ramp {r['ramp_s']:.0f} s)")
print(f"{'kind':<8} {'sent':>9} {'ok':>9} {'failed':>7}  {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
for kind, k in r["kinds"].items():
    lat = k["latency_ms"] or {}
    print(f"{kind:<8} {k['sent']:>9} {k['ok']:>9} {k['failed']:>7}  {lat.get('p50', 0):>8.2f} {lat.get('p90', 0):>8.2f} "
          f"{lat.get('p99', 0):>8.2f} {lat.get('max', 0):>8.2f}")
    if k["failed"]:
        problems.append(f"{k['failed']} {kind} requests failed {k['failed_by_class']}")
        for e in k["errors"]:
            print(f"         {e}")
t = r["tunnels"]
el = t["echo_latency_ms"] or {}
print(f"tunnels  opened {t['opened']}, closed clean {t['closed_clean']}, echoes {t['echoes_ok']}/{t['echoes_sent']} "
      f"(echo p50 {el.get('p50', 0):.2f} ms, p99 {el.get('p99', 0):.2f} ms)")
if t["echoes_ok"] != t["echoes_sent"]:
    problems.append(f"{t['echoes_sent'] - t['echoes_ok']} echoes failed")
a = r["achieved_rps"]
print(f"achieved {a['http']:.0f} HTTP req/s + {r['kinds']['ws']['ok'] / r['duration_s']:.0f} upgrades/s + {a['echoes']:.0f} echoes/s; "
      f"{r['connections_opened']} connections opened, peak {r['peak_open_connections']} open at once")
slow = r.get("per_second_max_ms", [])
if slow:
    windows = [max(slow[i:i + 5]) for i in range(0, len(slow), 5)]
    print("slowest answer per 5 s window (ms): " + " ".join(f"{w:.0f}" for w in windows))
print(f"sidecar CPU {cpu_s:.1f} s over the load ({cpu_s / load_s:.2f} of {ncpu} cores); "
      f"machine load average {loadavg_before} before, {loadavg_after} after (shared machine)")
if load_rc != 0:
    problems.append(f"mixed_load exited {load_rc}")

# RSS and fds, sampled every second; shown every 5 s.
samples = []
for line in open(f"{out}/samples.txt"):
    f = line.split()
    if len(f) >= 3 and f[1] != "0":
        samples.append((float(f[0]), int(f[1]), int(f[2]), *[int(float(x)) if x else -1 for x in (f[3:6] + ["", "", ""])[:3]]))
def at(s):  # the last sample at or before s seconds
    c = [x for x in samples if x[0] <= s + 0.5]
    return c[-1] if c else samples[0]
print(f"\nsidecar RSS idle before the load: {idle_rss / 1024:.1f} MiB")
print(f"{'t (s)':>6} {'RSS MiB':>8} {'fds':>6} {'conns':>6} {'tunnels':>7} {'upstream':>8}")
shown = set()
for s in list(range(0, int(load_s) + 1, 5)) + [int(load_s) + 3]:
    x = at(s)
    if x[0] in shown:
        continue
    shown.add(x[0])
    print(f"{x[0]:>6.1f} {x[1] / 1024:>8.1f} {x[2]:>6} {x[3]:>6} {x[4]:>7} {x[5]:>8}")
warm = at(warmup)
loaded = [x for x in samples if x[0] <= load_s]
end = loaded[-1]
peak_rss = max(x[1] for x in loaded)
growth = end[1] - warm[1]
bound = max(warm[1] * growth_pct / 100, growth_kib)
fd_peak = max(x[2] for x in samples)
print(f"RSS after warm-up ({warm[0]:.0f} s) {warm[1] / 1024:.1f} MiB, at the end of the load ({end[0]:.0f} s) {end[1] / 1024:.1f} MiB, "
      f"peak {peak_rss / 1024:.1f} MiB: growth {growth / 1024:+.1f} MiB (bound {bound / 1024:.1f} MiB = max({growth_pct:g} %, {growth_kib / 1024:.0f} MiB))")
half = at(load_s / 2)
print(f"  (over the second half of the load alone, {half[0]:.0f} s to {end[0]:.0f} s: {(end[1] - half[1]) / 1024:+.1f} MiB)")
if growth > bound:
    problems.append(f"RSS grew {growth / 1024:.1f} MiB during the load (bound {bound / 1024:.1f} MiB)")
up_peak = max(x[5] for x in samples)
print(f"sidecar fds: peak {fd_peak} of limit {fd_limit} ({100 * fd_peak / fd_limit:.0f} %); "
      f"peak client connections {max(x[3] for x in samples)}, tunnels {max(x[4] for x in samples)}, "
      f"upstream connections {up_peak} (in use + idle; one per proxied request in flight, one per tunnel)")
print(f"sidecar RSS at rest after the load (connections closed): {samples[-1][1] / 1024:.1f} MiB")
if fd_peak >= fd_limit - 16:
    problems.append(f"fd peak {fd_peak} at the limit {fd_limit}")

# request.summary lines: exactly one per request the sidecar received.
lines = rids = 0
seen, codes, other_lines, dropped_msgs, errors = set(), {}, 0, [], []
for raw in open(f"{out}/sidecar.log", errors="replace"):
    try:
        line = json.loads(raw)
    except ValueError:
        errors.append(raw.strip()[:200])
        continue
    kind = line.get("Type")
    f = line.get("Fields", {})
    if kind == "request.summary":
        if str(f.get("rid", "")).startswith(prefix + "-"):
            lines += 1
            seen.add(f["rid"])
            codes[f.get("code")] = codes.get(f.get("code"), 0) + 1
        else:
            other_lines += 1
    elif kind not in ("report",) and line.get("Severity", 6) <= 4:
        errors.append(f"{kind}: {json.dumps(f)[:200]}")
sent = r["totals"]["sent"]
print(f"\nrequest.summary lines {lines} for {sent} requests sent ({len(seen)} distinct request ids; "
      f"{other_lines} other lines from readiness probes); codes {dict(sorted(codes.items(), key=lambda kv: str(kv[0])))}")
if lines != sent or len(seen) != lines:
    problems.append(f"{lines} summary lines ({len(seen)} distinct) for {sent} requests")
if codes.get(101, 0) != t["opened"]:
    problems.append(f"{codes.get(101, 0)} summary lines with 101 for {t['opened']} tunnels")
print(f"sidecar warnings and errors in its log: {len(errors)}")
for e in errors[:10]:
    print(f"  {e}")
if errors:
    problems.append(f"{len(errors)} warnings/errors in the sidecar's log")
try:
    db = sqlite3.connect(f"file:{out}/state.db?mode=ro", uri=True)
    rows, total = db.execute("SELECT count(*), coalesce(sum(count), 0) FROM reports").fetchone()
    print(f"state file: {total} reports stored in {rows} rows ({r['kinds']['reports']['ok']} report requests answered)")
except Exception as e:  # informative only
    print(f"state file: not readable ({e})")
print(f"sidecar exit after SIGTERM: status {sidecar_rc} in {exit_s:.2f} s")
if sidecar_rc != 0:
    problems.append(f"the sidecar exited {sidecar_rc}")

json.dump({"load": r, "rss_kib": {"idle": idle_rss, "warm": warm[1], "end": end[1], "peak": peak_rss, "growth": growth,
                                   "bound": bound},
           "fd_peak": fd_peak, "fd_limit": fd_limit, "upstream_connections_peak": up_peak, "summary_lines": lines, "distinct_rids": len(seen),
           "sidecar_exit": {"status": sidecar_rc, "seconds": exit_s}, "problems": problems},
          open(f"{out}/soak.json", "w"), indent=2)
print()
if problems:
    print("verdict: FAIL: " + "; ".join(problems))
    sys.exit(1)
print(f"verdict: PASS: {sent} requests and {t['opened']} tunnels, none failed; one summary line each; "
      f"RSS growth {growth / 1024:+.1f} MiB within {bound / 1024:.1f} MiB; fd peak {fd_peak}/{fd_limit}; clean exit")
PY
