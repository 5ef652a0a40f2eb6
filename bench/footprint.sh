#!/usr/bin/env bash
# The sidecar's footprint, each figure printed with the product goal next to
# it (issue 9's table): the stripped release binary, start-up to the first
# 200 on /__lbheartbeat__, resident memory idle, and with 1,000 idle
# keep-alive connections open. Everything on: mozlog lines, metrics and the
# admin listener, the heartbeat, report intake.
#
#   bash bench/footprint.sh
#
# Throughput, latency and CPU per request are bench/run.sh and bench/ab.sh.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/bench/out/footprint"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
build_binaries
mkdir -p "$OUT"

up=$(free_port)
"$UPSTREAM_BIN" "127.0.0.1:$up" >/dev/null 2>&1 &
PIDS+=($!)

# Start-up: from exec to the first 200. The poller starts the sidecar
# itself, so its own start-up is not counted.
port=$(free_port)
python3 - "$SIDECAR" "$port" "$up" "$OUT" >"$OUT/startup.txt" <<'PY' &
import http.client, os, subprocess, sys, time
sidecar, port, up, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
env = dict(os.environ, DOCKERFLOW_LISTEN=f"127.0.0.1:{port}",
           DOCKERFLOW_ADMIN__LISTEN="127.0.0.1:0", DOCKERFLOW_STATE__PATH=f"{out}/state.db",
           DOCKERFLOW_SHUTDOWN__DRAIN="0s")
log = open(f"{out}/sidecar.log", "w")
start = time.monotonic_ns()
proc = subprocess.Popen([sidecar, "--upstream", f"http://127.0.0.1:{up}"], env=env,
                        stdout=log, stderr=log)
ms = None
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        c.request("GET", "/__lbheartbeat__")
        if c.getresponse().status == 200:
            ms = (time.monotonic_ns() - start) / 1e6
            break
    except OSError:
        pass
print(proc.pid, f"{ms:.1f}" if ms is not None else "none", flush=True)
proc.wait()
PY
PIDS+=($!)
for _ in $(seq 200); do
    [ -s "$OUT/startup.txt" ] && break
    sleep 0.05
done
read -r pid first_200_ms <"$OUT/startup.txt"
PIDS+=("$pid")

# The release build keeps its symbol table (Cargo.toml; the image ships it
# too, for perf); the goal is for the stripped binary, both are printed.
strip -o "$OUT/stripped" "$SIDECAR"
size=$(stat -c %s "$OUT/stripped")
built_size=$(stat -c %s "$SIDECAR")
# Idle: after one request of each kind has warmed the paths.
curl -sf "http://127.0.0.1:$port/" >/dev/null
curl -sf "http://127.0.0.1:$port/__heartbeat__" >/dev/null || true
idle=$(rss_kib "$pid")

# 1,000 idle keep-alive connections, each after one proxied request.
python3 - "$port" "$pid" >"$OUT/connections.txt" <<'PY'
import socket, sys, time
port, pid = int(sys.argv[1]), sys.argv[2]
socks = []
for _ in range(1000):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    socks.append(s)
# Each response read to its end (Content-Length), whatever its status: a
# 502 is shorter than the app's 1 KiB, and waiting for 1 KiB of it would
# wait for the sidecar's idle timeout.
not_ok = 0
for s in socks:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    if not head.startswith(b"HTTP/1.1 200 "):
        not_ok += 1
def rss():
    return [l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:")][0].split()[1]
# Two readings, the connections open all along: 0.5 s after the last
# response (what the burst left), and 4 s after it, once the trim
# (src/trim.rs) has had its quiet second and its follow-up: what the
# sidecar holds while those connections sit idle.
time.sleep(0.5)
first = rss()
time.sleep(3.5)
settled = rss()
# A reading only means something with every connection still open.
still_open = 0
for s in socks:
    try:
        if s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK):
            still_open += 1
    except BlockingIOError:
        still_open += 1
    except OSError:
        pass
print(first, settled, still_open, not_ok)
PY
read -r conns conns_settled conns_open conns_not_ok <"$OUT/connections.txt"

echo "dockerflow-sidecar footprint ($(nproc) CPUs, $(date -u +%F))"
# meets VALUE LIMIT: yes when VALUE <= LIMIT.
meets() { awk -v v="$1" -v l="$2" 'BEGIN { print (v + 0 <= l + 0) ? "yes" : "no" }'; }
size_mb=$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1e6 }')
idle_mb=$(awk -v k="$idle" 'BEGIN { printf "%.1f", k * 1024 / 1e6 }')
conns_mb=$(awk -v k="$conns" 'BEGIN { printf "%.1f", k * 1024 / 1e6 }')
conns_settled_mb=$(awk -v k="$conns_settled" 'BEGIN { printf "%.1f", k * 1024 / 1e6 }')
built_mb=$(awk -v s="$built_size" 'BEGIN { printf "%.1f", s / 1e6 }')
goal_row "release binary (stripped)" "$size_mb MB ($built_mb MB with symbols)" "<= 15 MB" "$(meets "$size_mb" 15)"
goal_row "start-up to first 200 on /__lbheartbeat__" "${first_200_ms} ms" "<= 50 ms" "$(meets "$first_200_ms" 50)"
goal_row "RSS idle (fresh, one request of each kind)" "$idle_mb MB" "<= 10 MB" "$(meets "$idle_mb" 10)"
if [[ $conns_not_ok != 0 ]]; then
    goal_row "RSS with 1,000 idle keep-alive connections" "$conns_not_ok of 1,000 first requests not answered 200" "<= 50 MB" no
elif [[ $conns_open == 1000 ]]; then
    goal_row "RSS with 1,000 idle keep-alive connections" "$conns_mb MB (4 s later $conns_settled_mb)" "<= 50 MB" "$(meets "$conns_mb" 50)"
else
    goal_row "RSS with 1,000 idle keep-alive connections" "only $conns_open of 1,000 stayed open" "<= 50 MB" no
fi
