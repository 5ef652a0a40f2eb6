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
SIDECAR="$ROOT/target/release/dockerflow-sidecar"
UPSTREAM_BIN="$ROOT/target/release/examples/bench_upstream"
OUT="$ROOT/bench/out/footprint"
[ "${BENCH_SKIP_BUILD:-}" = 1 ] || (cd "$ROOT" && cargo build --release --bin dockerflow-sidecar --example bench_upstream)
mkdir -p "$OUT"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
row() { printf '%-44s %14s   goal %s\n' "$1" "$2" "$3"; }

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

size=$(stat -c %s "$SIDECAR")
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
for s in socks:
    data = b""
    while b"\r\n\r\n" not in data or len(data) < 1024:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
time.sleep(0.5)  # let the allocator settle; the connections stay open
rss = [l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:")][0].split()[1]
print(rss)
PY
conns=$(cat "$OUT/connections.txt")

echo "dockerflow-sidecar footprint ($(nproc) CPUs, $(date -u +%F))"
row "release binary (stripped)" "$(awk -v s="$size" 'BEGIN { printf "%.1f MB", s / 1e6 }')" "<= 15 MB"
row "start-up to first 200 on /__lbheartbeat__" "${first_200_ms} ms" "<= 50 ms"
row "RSS idle" "$(awk -v k="$idle" 'BEGIN { printf "%.1f MB", k * 1024 / 1e6 }')" "<= 10 MB"
row "RSS with 1,000 idle keep-alive connections" "$(awk -v k="$conns" 'BEGIN { printf "%.1f MB", k * 1024 / 1e6 }')" "<= 50 MB"
