#!/usr/bin/env python3
"""User-space instructions the sidecar spends per request, from callgrind.

Runs the release binary twice under `valgrind --tool=callgrind`, one worker
thread, in front of examples/bench_upstream: once with 200 warm-up requests,
once with the same warm-up and N more sequential keep-alive GETs on one
connection. (difference of the two totals) / N is the figure: it repeats
within about 100 instructions whatever the machine's load, so it compares
builds where req/s on this shared machine cannot.

  python3 bench/instructions.py [BINARY] [-n 2000] [--path /some/path?x=1]
  python3 bench/instructions.py --path /__lbheartbeat__   # the sidecar's own route
  python3 bench/instructions.py --nginx   # nginx (one process, access log on), same load

BINARY defaults to target/release/dockerflow-sidecar. `--keep DIR` keeps the
two callgrind files (callgrind_annotate shows where the instructions go).
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARM_UP = 200


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(port, deadline):
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def one(sock, request):
    buf = b""
    sock.sendall(request)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the sidecar closed the connection")
        buf += chunk
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            continue
        length = re.search(rb"content-length: *(\d+)", buf[:end], re.I)
        if length is None:
            raise RuntimeError("a response without Content-Length: %r" % buf[:end])
        if len(buf) >= end + 4 + int(length.group(1)):
            return


def nginx_command(work, port, upstream_port):
    """nginx as bench/lib.sh runs it (keep-alive both sides, access log
    buffered), but as one process, so that callgrind sees the worker."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""daemon off; master_process off; worker_processes 1;
pid {work}/nginx.pid; error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {work}/access.log combined buffer=64k flush=1s;
    client_body_temp_path {work}/client_body; proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
    keepalive_timeout 60s; keepalive_requests 1000000;
    upstream app {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
}}
""")
    return ["nginx", "-c", conf, "-p", work], signal.SIGQUIT


def total(binary, upstream_port, requests, path, out):
    port = free_port()
    env = dict(
        os.environ,
        DOCKERFLOW_LISTEN=f"127.0.0.1:{port}",
        DOCKERFLOW_ADMIN__LISTEN="127.0.0.1:0",
        DOCKERFLOW_SERVER__WORKER_THREADS="1",
        DOCKERFLOW_SHUTDOWN__DRAIN="0s",
    )
    if binary == "nginx":
        command, stop = nginx_command(os.path.dirname(out), port, upstream_port)
    else:
        command, stop = [binary, "--upstream", f"http://127.0.0.1:{upstream_port}"], signal.SIGTERM
    sidecar = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=os.path.dirname(out),
    )
    request = (f"GET {path} HTTP/1.1\r\nHost: example.com\r\n"
               "User-Agent: instructions/1\r\nAccept: */*\r\n\r\n").encode()
    sock = connect(port, time.monotonic() + 120)
    for _ in range(WARM_UP + requests):
        one(sock, request)
    sock.close()
    sidecar.send_signal(stop)
    sidecar.wait(timeout=120)
    with open(out) as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binary", nargs="?", default=os.path.join(ROOT, "target/release/dockerflow-sidecar"))
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--path", default="/some/path?x=1")
    parser.add_argument("--keep")
    parser.add_argument("--nginx", action="store_true", help="measure nginx instead")
    args = parser.parse_args()
    if args.nginx:
        args.binary = "nginx"
    upstream_bin = os.path.join(ROOT, "target/release/examples/bench_upstream")
    if not os.access(upstream_bin, os.X_OK):
        subprocess.run(["cargo", "build", "--release", "--example", "bench_upstream"], cwd=ROOT, check=True)
    work = args.keep or tempfile.mkdtemp(prefix="instructions-")
    os.makedirs(work, exist_ok=True)
    upstream_port = free_port()
    upstream = subprocess.Popen([upstream_bin, f"127.0.0.1:{upstream_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = total(args.binary, upstream_port, 0, args.path, os.path.join(work, "callgrind.0"))
        full = total(args.binary, upstream_port, args.n, args.path, os.path.join(work, "callgrind.n"))
    finally:
        upstream.kill()
    print(f"{(full - base) / args.n:.0f} instructions per request "
          f"({args.path}, {args.n} requests; totals {base} and {full})")


if __name__ == "__main__":
    sys.exit(main())
