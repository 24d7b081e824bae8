#!/usr/bin/env bash
# Runs arcfleet's tests on a fresh Debian or Ubuntu machine, as root: installs what the
# lab needs, then runs every unit and end-to-end test. The end-to-end tests start real
# sshd processes in mount namespaces, which is why they need root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lab-deps.sh
cargo test --all-targets "$@"
