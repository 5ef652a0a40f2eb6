#!/usr/bin/env bash
# SIGTERM under steady load: examples/mixed_load.rs sends DRAIN_RATE req/s
# over DRAIN_CONNECTIONS keep-alive connections (proxied requests and browser
# reports, plus a few WebSocket-style tunnel loops) for DRAIN_LOAD seconds
# through the release sidecar; DRAIN_SIGTERM_AT seconds in, the sidecar gets
# SIGTERM.
#
# Default: [shutdown] drain = "12s" outlasts the load, so every request must
# succeed (health routes are left out of the mix: they answer 503 while
# draining, by design); the sidecar must then exit 0 once the drain is over,
# and every request must have its request.summary line.
#
# DRAIN_SHORT=1: drain = "2s" ends while the client still sends. After the
# listener closes, new connections are refused (taking the pod out is the
# load balancer's job): those are counted apart from failures of requests on
# established connections. A request that the server accepted must not fail;
# a request hyper had not yet written when the server closed an idle
# keep-alive connection comes back unsent and is retried once on a new
# connection (as any client does); one written at the instant the server
# closes its keep-alive connection can still race (counted as in-flight). A
# connect reset during the handshake (connect_other) wrote no request either.
# With DRAIN_SHORT=1 the sidecar logs at debug, so a failed request's client
# port can be looked up among the connections it closed with an error.
#
#   bash bench/drain.sh
#   DRAIN_SHORT=1 bash bench/drain.sh
#
# Environment: DRAIN_RATE (2000), DRAIN_CONNECTIONS (64), DRAIN_LOAD (10,
# seconds), DRAIN_SIGTERM_AT (3, seconds), DRAIN (12s, or 2s with
# DRAIN_SHORT=1), GRACE (5s), DRAIN_LOG_LEVEL (info, or debug with
# DRAIN_SHORT=1), BENCH_SKIP_BUILD=1. Raw output:
# bench/out/drain/ (or drain-short/).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHORT=${DRAIN_SHORT:-0}
if [[ $SHORT == 1 ]]; then
    OUT="$ROOT/bench/out/drain-short"
    DRAIN=${DRAIN:-2s}
    # Debug: the sidecar logs each connection it accepted and then closed
    # with an error (with the client's port), to match failed requests.
    LOG_LEVEL=${DRAIN_LOG_LEVEL:-debug}
else
    OUT="$ROOT/bench/out/drain"
    DRAIN=${DRAIN:-12s}
    LOG_LEVEL=${DRAIN_LOG_LEVEL:-info}
fi
GRACE=${GRACE:-5s}
RATE=${DRAIN_RATE:-2000}
CONNECTIONS=${DRAIN_CONNECTIONS:-64}
LOAD=${DRAIN_LOAD:-10}
SIGTERM_AT=${DRAIN_SIGTERM_AT:-3}
MIX=proxied=85,reports=10,ws=5
PREFIX="drain$$"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

ensure_tools curl python3
build_binaries
build_mixed_load
rm -rf "$OUT"
mkdir -p "$OUT"

start_upstream
SIDECAR_PORT=$(free_port)
cat >"$OUT/sidecar.toml" <<EOF
listen = "127.0.0.1:$SIDECAR_PORT"
hooks = []

[upstream]
url = "http://$UPSTREAM_ADDR"

[logging]
level = "$LOG_LEVEL"

[reports]
rate_per_client = 100000000
burst_per_client = 100000000
global_rate = 100000000

[state]
path = "$OUT/state.db"

[admin]
listen = "127.0.0.1:$(free_port)"

[shutdown]
drain = "$DRAIN"
grace = "$GRACE"
EOF
run_sidecar "$OUT/sidecar.toml" /__lbheartbeat__
log "sidecar on 127.0.0.1:$SIDECAR_PORT (pid $SIDECAR_PID), drain $DRAIN, grace $GRACE"

log "load: $RATE req/s over $CONNECTIONS connections ($MIX) for ${LOAD}s; SIGTERM at ${SIGTERM_AT}s"
"$MIXED_LOAD_BIN" --target "127.0.0.1:$SIDECAR_PORT" --connections "$CONNECTIONS" --duration "${LOAD}s" \
    --rate "$RATE" --mix "$MIX" --ramp 0.5s --ws-hold 2s --ws-echoes 4 --timeout 5s --rid-prefix "$PREFIX" \
    >"$OUT/load.json" 2>"$OUT/load.err" &
LOAD_PID=$!
PIDS+=("$LOAD_PID")
LOAD_START_NS=$(date +%s%N)
# The load generator's own clock starts a moment after its exec: its
# t0_unix_ms (in load.json) is what the timeline below is measured against.
# TcpExtTCPAbortOnClose counts sockets closed with unread data (a server
# closing a connection whose request it has not read); a reset of a
# connection still in a closing listener's backlog is not counted there.
abort_on_close() { if command -v nstat >/dev/null; then nstat -az TcpExtTCPAbortOnClose | awk '/AbortOnClose/ { print $2 }'; else echo -1; fi; }
ABORTS_BEFORE=$(abort_on_close)
sleep "$SIGTERM_AT"
TERM_NS=$(date +%s%N)
kill -TERM "$SIDECAR_PID"
# The sidecar's exit, timed from the signal (10 ms steps), while the load
# generator carries on.
until exited "$SIDECAR_PID"; do
    if (($(date +%s%N) - TERM_NS > 60000000000)); then
        die "the sidecar has not exited 60 s after SIGTERM"
    fi
    sleep 0.01
done
EXIT_NS=$(date +%s%N)
SIDECAR_RC=0
wait "$SIDECAR_PID" || SIDECAR_RC=$?
LOAD_RC=0
wait "$LOAD_PID" || LOAD_RC=$?
ABORTS=$(($(abort_on_close) - ABORTS_BEFORE))
[[ -s $OUT/load.json ]] || die "mixed_load printed no result (rc $LOAD_RC, see $OUT/load.err)"

python3 - "$OUT" "$PREFIX" "$SHORT" "$DRAIN" "$GRACE" "$TERM_NS" "$EXIT_NS" "$SIDECAR_RC" "$LOAD_RC" "$LOAD_START_NS" "$ABORTS" <<'PY'
import json, sys
out, prefix, short, drain, grace = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5]
term_ns, exit_ns, sidecar_rc, load_rc, load_start_ns, aborts = (int(x) for x in sys.argv[6:12])
r = json.load(open(f"{out}/load.json"))
t0_ns = r["t0_unix_ms"] * 1_000_000
rel = lambda ns: (ns - term_ns) / 1e9  # seconds after SIGTERM
problems = []

# The sidecar's own messages: drain start, listener closed, end.
events = {}
summary_lines, rids, codes = 0, set(), {}
closed_with_error = {}  # client port -> the sidecar's debug message
for raw in open(f"{out}/sidecar.log", errors="replace"):
    try:
        line = json.loads(raw)
    except ValueError:
        continue
    f = line.get("Fields", {})
    if line.get("Type") == "request.summary":
        if str(f.get("rid", "")).startswith(prefix + "-"):
            summary_lines += 1
            rids.add(f["rid"])
            codes[f.get("code")] = codes.get(f.get("code"), 0) + 1
        continue
    msg = str(f.get("msg", ""))
    if msg.startswith("connection ended with an error") and ":" in str(f.get("peer", "")):
        closed_with_error[int(str(f["peer"]).rsplit(":", 1)[1])] = (line["Timestamp"], str(f.get("error", "")))
    for key, needle in (("drain_start", "draining"), ("listener_closed", "listener closed"),
                        ("finished", "all connections finished"), ("grace_over", "grace period over")):
        if msg.startswith(needle) and key not in events:
            events[key] = (line["Timestamp"], f)

k = r["kinds"]
tot = r["totals"]
by_class = {c: sum(v["failed_by_class"][c] for v in k.values()) for c in ("connect_refused", "connect_other", "unsent", "in_flight")}
retried = sum(v["unsent_retried"] for v in k.values())
print(f"\ndrain {'(short) ' if short else ''}under load: {r['rate_cap']:.0f} req/s over {r['connections']} connections "
      f"({r['tunnel_connections']} tunnel loops) for {r['duration_s']:.0f} s; drain {drain}, grace {grace}")
print(f"SIGTERM at {(term_ns - t0_ns) / 1e9:.2f} s into the load")
for key, label in (("drain_start", "drain started"), ("listener_closed", "listener closed"),
                   ("finished", "all connections finished"), ("grace_over", "grace over, connections abandoned")):
    if key in events:
        ts, f = events[key]
        extra = {k2: v for k2, v in f.items() if k2 != "msg"}
        print(f"  {label:<34} SIGTERM + {rel(ts):6.3f} s  {json.dumps(extra) if extra else ''}")
print(f"  {'sidecar exited':<34} SIGTERM + {rel(exit_ns):6.3f} s  status {sidecar_rc}")
print(f"  {'load ended':<34} SIGTERM + {rel(t0_ns + r['elapsed_s'] * 1e9):6.3f} s")
print(f"{'kind':<8} {'attempted':>9} {'sent':>7} {'ok':>7} {'failed':>7}  p50 / p99 / max ms")
for name, v in k.items():
    lat = v["latency_ms"] or {}
    print(f"{name:<8} {v['attempted']:>9} {v['sent']:>7} {v['ok']:>7} {v['failed']:>7}  "
          f"{lat.get('p50', 0):.2f} / {lat.get('p99', 0):.2f} / {lat.get('max', 0):.2f}")
print(f"total    {tot['attempted']:>9} {tot['sent']:>7} {tot['ok']:>7} {tot['failed']:>7}")
print(f"failures by class: {by_class}; unsent requests retried on a new connection: {retried}; "
      f"keep-alive connections the server closed (reconnected): {r['reconnects_after_server_close']}")
t = r["tunnels"]
print(f"tunnels: opened {t['opened']}, closed clean {t['closed_clean']}, echoes {t['echoes_ok']}/{t['echoes_sent']}")
for cls, w in r["failure_window_ms"].items():
    print(f"  {cls:<16} first at SIGTERM + {rel(t0_ns + w['first'] * 1e6):6.3f} s, last at SIGTERM + {rel(t0_ns + w['last'] * 1e6):6.3f} s")
import re
for name, v in k.items():
    for e in v["errors"][:4]:
        print(f"  {name}: {e}")
        m = re.search(r"local port (\d+), request (\d+)", e)
        if m:
            port = int(m[1])
            seen = closed_with_error.get(port)
            where = (f"the sidecar had accepted it and closed it at SIGTERM + {rel(seen[0]):.3f} s: {seen[1]!r}" if seen
                     else "no trace of it in the sidecar's log")
            print(f"    -> {where}")
print(f"in-flight failures on the first request of a new connection: {r['in_flight_failures_on_new_connections']}; "
      f"connections the sidecar closed with an error (debug log): {len(closed_with_error)}; "
      f"TcpExtTCPAbortOnClose during the run (whole machine): {aborts}")
print(f"last success at SIGTERM + {rel(t0_ns + r['last_ok_ms'] * 1e6):.3f} s")
if "listener_closed" in events:
    closed_ns = events["listener_closed"][0]
    after = [0, 0, 0, 0, 0]
    for sec, row in enumerate(r["per_second"]):
        if t0_ns + (sec + 1) * 1e9 > closed_ns:
            after = [a + b for a, b in zip(after, row)]
    print(f"from the second the listener closed on (per-second buckets): ok {after[0]}, refused {after[1]}, "
          f"other connect {after[2]}, unsent {after[3]}, in-flight {after[4]}")

print(f"request.summary lines {summary_lines} ({len(rids)} distinct) for {tot['sent']} requests sent; codes {codes}")
accepted_failures = by_class["in_flight"] + by_class["unsent"]
if short:
    if accepted_failures:
        problems.append(f"{accepted_failures} requests failed on established connections ({by_class['in_flight']} in flight, "
                        f"{by_class['unsent']} unsent twice)")
    # connect_other (e.g. a reset during the handshake as the listener
    # closes) wrote no request either: reported, like refused connects.
    # Every request written may or may not have been read by the server when
    # it closed: lines must cover every success, and at most every request sent.
    if not (tot["ok"] <= summary_lines <= tot["sent"]) or len(rids) != summary_lines:
        problems.append(f"{summary_lines} summary lines ({len(rids)} distinct) for {tot['ok']} ok / {tot['sent']} sent")
else:
    if tot["failed"]:
        problems.append(f"{tot['failed']} requests failed during the drain {by_class}")
    if summary_lines != tot["sent"] or len(rids) != summary_lines:
        problems.append(f"{summary_lines} summary lines ({len(rids)} distinct) for {tot['sent']} requests sent")
    expected = float(drain.rstrip("s"))
    if not (expected - 0.1 <= rel(exit_ns) <= expected + 1.0):
        problems.append(f"the sidecar exited {rel(exit_ns):.2f} s after SIGTERM, not about {expected:.0f} s (the drain)")
if t["echoes_ok"] != t["echoes_sent"]:
    problems.append(f"{t['echoes_sent'] - t['echoes_ok']} echoes failed")
if sidecar_rc != 0:
    problems.append(f"the sidecar exited with status {sidecar_rc}")
json.dump({"load": r, "sigterm_at_s": (term_ns - t0_ns) / 1e9, "exit_after_sigterm_s": rel(exit_ns),
           "events_after_sigterm_s": {k2: rel(v[0]) for k2, v in events.items()}, "sidecar_status": sidecar_rc,
           "summary_lines": summary_lines, "failures_by_class": by_class, "problems": problems},
          open(f"{out}/drain.json", "w"), indent=2)
print()
if problems:
    print("verdict: FAIL: " + "; ".join(problems))
    sys.exit(1)
if short:
    print(f"verdict: PASS: {by_class['connect_refused']} connects refused after the listener closed, "
          f"0 accepted requests failed, {retried} unsent requests retried; exit {sidecar_rc} after {rel(exit_ns):.2f} s")
else:
    print(f"verdict: PASS: {tot['sent']} requests through SIGTERM, none failed; one summary line each; "
          f"exit {sidecar_rc} {rel(exit_ns):.2f} s after SIGTERM")
PY
