#!/usr/bin/env bash
# Every row of issue 9's table, each with its goal: throughput next to nginx
# and haproxy (bench/run.sh), footprint (bench/footprint.sh), latency, CPU and
# memory at a fixed rate and 1 GiB transfers (bench/load.sh). About 12
# minutes with the defaults; each script's environment knobs apply.
#
#   bash bench/all.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/bench/run.sh"
BENCH_SKIP_BUILD=1 bash "$ROOT/bench/footprint.sh"
BENCH_SKIP_BUILD=1 bash "$ROOT/bench/load.sh"
echo
echo "dockerflow-sidecar against issue 9's goals ($(nproc) CPUs, $(date -u +%F), load average $(cut -d' ' -f1-3 /proc/loadavg))"
cat "$ROOT/bench/out/goals.txt"
