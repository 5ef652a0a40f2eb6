#!/usr/bin/env bash
# Fuzzes the parsers of untrusted input with cargo-fuzz (libFuzzer), one
# target at a time, each for a bounded time, and fails when one crashes.
#
#   scripts/fuzz.sh                      # all four targets, FUZZ_SECONDS each
#   FUZZ_SECONDS=300 scripts/fuzz.sh report_parser config_loader
#
# Targets (fuzz/fuzz_targets/): report_parser, config_loader,
# template_renderer, request_classifier.
#
# Environment:
#   FUZZ_SECONDS    time per target (libFuzzer -max_total_time), default 60
#   FUZZ_SANITIZER  address (default) or none
#   FUZZ_TIMEOUT    seconds one input may take before it is a finding, default 10
#   FUZZ_RSS_MB     memory one run may use before it is a finding, default 2048
#   CARGO_TARGET_DIR  where everything below goes (default ./target)
#
# Nothing in the repository changes: the committed seeds (fuzz/seeds/<target>/,
# small and hand-made) are copied into a working corpus under
# $CARGO_TARGET_DIR/fuzz/corpus/<target>/, which grows from run to run, and
# crashes go to $CARGO_TARGET_DIR/fuzz/artifacts/<target>/.
#
# Toolchain: only stable Rust is on the project's machines and no nightly can
# be fetched. cargo-fuzz's coverage instrumentation (-Cpasses=sancov-module,
# -Cllvm-args=-sanitizer-coverage-*) is stable, but AddressSanitizer is asked
# for with -Zsanitizer=address, which stable rustc takes only with
# RUSTC_BOOTSTRAP=1; the stable toolchain ships the ASan runtime, so that is
# what the script does (ASan finds out-of-bounds and use-after-free in the C
# code linked in, bundled SQLite included, and in unsafe Rust). With
# FUZZ_SANITIZER=none no -Z flag is passed and plain stable is enough; panics,
# overflow checks and debug assertions (on in both modes) still fail a run.
# libFuzzer comes with the libfuzzer-sys crate (compiled by its build script),
# so nothing but crates is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

all=(report_parser config_loader template_renderer request_classifier)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi
for t in "${targets[@]}"; do
  if [ ! -f "fuzz/fuzz_targets/$t.rs" ]; then
    echo "fuzz.sh: no target \`$t\`; targets: ${all[*]}" >&2
    exit 2
  fi
done

seconds=${FUZZ_SECONDS:-60}
sanitizer=${FUZZ_SANITIZER:-address}
timeout=${FUZZ_TIMEOUT:-10}
rss_mb=${FUZZ_RSS_MB:-2048}
target_dir=$(mkdir -p "${CARGO_TARGET_DIR:-target}" && cd "${CARGO_TARGET_DIR:-target}" && pwd)
work=$target_dir/fuzz

# cargo-fuzz, installed next to the build output when missing.
if ! command -v cargo-fuzz >/dev/null; then
  export PATH="$target_dir/fuzz-tools/bin:$PATH"
  if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz.sh: installing cargo-fuzz into $target_dir/fuzz-tools" >&2
    cargo install cargo-fuzz --locked --root "$target_dir/fuzz-tools"
  fi
fi

if [ "$sanitizer" != none ]; then
  export RUSTC_BOOTSTRAP=1
fi
# The config loader layers DOCKERFLOW_* and PORT over the fuzzed file: none
# may leak in from this shell.
unset PORT DOCKERFLOW_CONFIG
while IFS= read -r var; do unset "$var"; done < <(compgen -e | grep '^DOCKERFLOW_' || true)

fuzz_args=(--fuzz-dir fuzz --target-dir "$work" --sanitizer "$sanitizer")

echo "== building ${targets[*]} (sanitizer: $sanitizer)"
for t in "${targets[@]}"; do
  cargo fuzz build "${fuzz_args[@]}" "$t"
done

failed=0
summary=()
for t in "${targets[@]}"; do
  corpus=$work/corpus/$t
  artifacts=$work/artifacts/$t
  log=$work/logs/$t.log
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  cp fuzz/seeds/"$t"/* "$corpus"/
  echo "== $t: ${seconds}s, corpus $corpus (log $log)"
  status=0
  # One process (libFuzzer's default; -jobs/-workers would fork more): the
  # machine is shared.
  cargo fuzz run "${fuzz_args[@]}" "$t" "$corpus" -- \
    -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb="$rss_mb" \
    -artifact_prefix="$artifacts/" -print_final_stats=1 \
    >"$log" 2>&1 || status=$?

  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' <<<"$last")
  files=$(find "$corpus" -type f | wc -l)
  crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
  if [ "$status" -eq 0 ]; then
    result=ok
  else
    failed=1
    result="FAILED (exit $status)${crash:+: $crash}"
    echo "-- $t failed; the end of its log:"
    tail -40 "$log"
  fi
  line="$t: runs ${runs:-?} (${speed:-?}/s), cov ${cov:-?}, ft ${ft:-?}, corpus in use ${corp:-?}, $files files on disk, $result"
  echo "-- $line"
  summary+=("$line")
done

echo "== summary (${seconds}s per target, sanitizer $sanitizer)"
printf '%s\n' "${summary[@]}"
exit "$failed"
