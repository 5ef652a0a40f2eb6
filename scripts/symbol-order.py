#!/usr/bin/env python3
"""Writes build/symbols.order: the functions a sidecar runs, hottest first.

build.rs hands the file to the linker (lld's --symbol-ordering-file), which
lays those functions out together at the start of .text. Two things follow:
  - idle RSS: the kernel maps a binary's text in whole page-cache folios
    (64 KiB to 2 MiB). With the functions in LTO's order, start-up, idle
    and the proxy path touch folios all over the 9 MB of text, and ~7.4 MB
    of it is resident in an idle sidecar; laid out together they fit in a
    fraction of that;
  - the hot path shares fewer i-cache lines and iTLB entries.

How: the release binary (`cargo build --release`, which keeps its symbol
table: the names are hashed per profile, so they must come from this one)
runs under `valgrind --tool=callgrind` through start-up, each
Dockerflow route, /metrics, a CSP report, proxied GETs and POSTs, and a
graceful stop. Every function that ran is listed, by instructions spent in
it, descending. Functions not listed keep LTO's order after them.

  python3 scripts/symbol-order.py          # needs valgrind; about 3 minutes
  python3 scripts/symbol-order.py --check  # names the built binary lacks

Run it again after a dependency or toolchain upgrade: a name that no longer
exists is skipped by the linker (a stale file costs locality, not
correctness). `bench/footprint.sh` shows the idle RSS it buys.
"""
import collections
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
TARGET = TARGET if os.path.isabs(TARGET) else os.path.join(ROOT, TARGET)
OUT = os.path.join(ROOT, "build", "symbols.order")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port, path, deadline):
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"nothing answered 200 on 127.0.0.1:{port}{path}")


def request(conn, method, path, body=None, headers=None):
    """One exchange; once more on a new connection if the sidecar closed an
    idle one (under valgrind, a slow step can outlast its idle timeout)."""
    for attempt in (1, 2):
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except (http.client.RemoteDisconnected, ConnectionError):
            conn.close()
            if attempt == 2:
                raise


def self_costs(path):
    """Instructions spent in each function (self cost), from a callgrind
    file written with --compress-strings=no --demangle=no."""
    names, cost = {}, collections.Counter()
    current, after_call = None, False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("fn="):
                m = re.match(r"fn=(?:\((\d+)\))?\s*(.*)", line.rstrip("\n"))
                if m.group(1) and m.group(2):
                    names[m.group(1)] = m.group(2)
                current = m.group(2) or names.get(m.group(1))
            elif line.startswith("cfn="):
                m = re.match(r"cfn=\((\d+)\)\s*(.+)", line.rstrip("\n"))
                if m:
                    names[m.group(1)] = m.group(2)
            elif line.startswith("calls="):
                after_call = True  # the next cost line is the callee's
            elif line[:1].isdigit() or line[:1] in "+-*":
                if after_call:
                    after_call = False
                    continue
                parts = line.split()
                if current and len(parts) >= 2 and parts[1].isdigit():
                    cost[current] += int(parts[1])
    return cost


def defined_names(binary):
    out = subprocess.run(["nm", "--defined-only", "--format=posix", binary],
                         capture_output=True, text=True, check=True).stdout
    return {line.split(" ")[0] for line in out.split("\n") if line}


def check():
    """How much of the order file the release binary in target/ still has."""
    names = [n.strip() for n in open(OUT) if n.strip()]
    defined = defined_names(os.path.join(TARGET, "release", "dockerflow-sidecar"))
    missing = [n for n in names if n not in defined]
    print(f"{OUT}: {len(names) - len(missing)} of {len(names)} functions are in the "
          f"release binary; {len(missing)} are not (regenerate when that grows)")
    for name in missing[:20]:
        print("  missing:", name)


def main():
    if sys.argv[1:] == ["--check"]:
        return check()
    # Separately: an example in the same invocation would bring the
    # dev-dependencies' features into the sidecar, and other names with them.
    for target in (["--bin", "dockerflow-sidecar"], ["--example", "bench_upstream"]):
        subprocess.run(["cargo", "build", "--release", "--locked", *target], cwd=ROOT, check=True)
    sidecar = os.path.join(TARGET, "release", "dockerflow-sidecar")
    upstream_bin = os.path.join(TARGET, "release", "examples", "bench_upstream")
    defined = defined_names(sidecar)

    work = tempfile.mkdtemp(prefix="symbol-order-")
    up_port, port = free_port(), free_port()
    upstream = subprocess.Popen([upstream_bin, f"127.0.0.1:{up_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = os.path.join(work, "callgrind.out")
    # Only these settings: a DOCKERFLOW_CONFIG of the caller's would change
    # what runs.
    sidecar_env = dict(
        {k: v for k, v in os.environ.items() if not k.startswith("DOCKERFLOW_")},
        DOCKERFLOW_LISTEN=f"127.0.0.1:{port}",
        DOCKERFLOW_ADMIN__LISTEN=f"127.0.0.1:{free_port()}",
        DOCKERFLOW_STATE__PATH=os.path.join(work, "state.db"),
        DOCKERFLOW_SHUTDOWN__DRAIN="0s",
    )
    admin_port = int(sidecar_env["DOCKERFLOW_ADMIN__LISTEN"].rsplit(":", 1)[1])
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--demangle=no", "--compress-strings=no",
         f"--callgrind-out-file={profile}", sidecar, "--upstream",
         f"http://127.0.0.1:{up_port}"],
        env=sidecar_env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "valgrind.log"), "w"))
    try:
        wait_for(up_port, "/", time.monotonic() + 30)
        wait_for(port, "/__lbheartbeat__", time.monotonic() + 120)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for path in ("/__heartbeat__", "/__version__", "/__lbheartbeat__"):
            request(c, "GET", path)
        admin = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=60)
        request(admin, "GET", "/metrics")
        report = json.dumps({"csp-report": {
            "document-uri": "https://example.com/page", "violated-directive": "script-src",
            "effective-directive": "script-src", "blocked-uri": "https://evil.example/x.js",
            "original-policy": "script-src 'self'; report-uri /__cspreport__"}})
        request(c, "POST", "/__cspreport__", report, {"Content-Type": "application/csp-report"})
        for i in range(300):
            request(c, "GET", f"/page/{i}?q={i}", headers={"User-Agent": "symbol-order"})
        for i in range(50):
            request(c, "POST", "/form", b"x" * 2048, {"Content-Type": "text/plain"})
        for _ in range(20):  # new connections, as a load balancer opens them
            fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            request(fresh, "GET", "/")
            fresh.close()
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=300)
        finally:
            upstream.terminate()
            upstream.wait()

    cost = self_costs(profile)
    shutil.rmtree(work, ignore_errors=True)
    names = [n for n, _ in cost.most_common() if n in defined]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("".join(n + "\n" for n in names))
    print(f"{OUT}: {len(names)} functions ({len(cost) - len(names)} others ran "
          f"outside the binary)")


if __name__ == "__main__":
    main()
