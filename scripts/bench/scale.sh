#!/usr/bin/env bash
# Measures arcfleet alone on growing lab fleets, as root: audit, converge, converge again
# and audit, on a fresh lab per device count and repetition. Prints a Markdown table of
# the medians (wall time, controller and device CPU, peak memory per count).
#
#   sudo bash scripts/bench/scale.sh [COUNTS [RUNS]]       # default 100,300,1000 and 3 runs
#
# BENCH_CONCURRENCY sets arcfleet's --concurrency (default 50). The results stay in
# BENCH_WORK (default a new /tmp/arcfleet-scale.XXXXXX). A lab of 1000 devices takes about
# 22 s to start and 1000 sshd processes; check `ulimit -u` and memory before going higher.
set -euo pipefail
cd "$(dirname "$0")/../.."
counts=${1:-100,300,1000}
runs=${2:-3}
work=${BENCH_WORK:-$(mktemp -d /tmp/arcfleet-scale.XXXXXX)}

bash scripts/lab-deps.sh
cargo build --release --quiet
echo "results in $work"
exec /usr/bin/python3 scripts/bench/bench.py scale --devices "$counts" --runs "$runs" \
  --concurrency "${BENCH_CONCURRENCY:-50}" --work "$work"
