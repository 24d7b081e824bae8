#!/usr/bin/env bash
# Runs arcfleet, ansible-core and pyinfra side by side on lab devices, as root: a first
# converge that changes every device, a second converge that changes nothing, and an
# audit, each repeated RUNS times on a fresh lab per tool. Prints Markdown tables of the
# medians (wall time, controller and device CPU, peak memory, ratios to arcfleet).
#
#   sudo bash scripts/bench/compare.sh [DEVICES [RUNS]]     # default 100 devices, 3 runs
#
# ansible-core and pyinfra come from PyPI into the virtualenv BENCH_VENV (default
# /tmp/arcfleet-bench-venv). The results stay in BENCH_WORK (default a new
# /tmp/arcfleet-compare.XXXXXX): results.md, results.json and every run's output.
# Everything runs on 127.0.0.1; arcfleet reads issuers from the lab's Azure emulator.
set -euo pipefail
cd "$(dirname "$0")/../.."
devices=${1:-100}
runs=${2:-3}
venv=${BENCH_VENV:-/tmp/arcfleet-bench-venv}
work=${BENCH_WORK:-$(mktemp -d /tmp/arcfleet-compare.XXXXXX)}

bash scripts/lab-deps.sh
cargo build --release --quiet
if [ ! -x "$venv/bin/ansible-playbook" ] || [ ! -x "$venv/bin/pyinfra" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet ansible-core pyinfra pyyaml
fi
"$venv/bin/ansible-playbook" --version | head -1
"$venv/bin/pyinfra" --version
echo "results in $work"
exec /usr/bin/python3 scripts/bench/bench.py compare --devices "$devices" --runs "$runs" \
  --venv "$venv" --work "$work"
