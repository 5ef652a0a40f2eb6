#!/usr/bin/env bash
# The test command: make sure PostgreSQL and Redis are up, then cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-services.sh
exec cargo test "$@"
