#!/usr/bin/env bash
# Runs arcfleet's main job on a bundled local example, as root: starts four K3s server
# devices in two clusters and one agent (real sshd processes with the K3s stand-in) and
# the Azure emulator, converges them, shows the CSV report, runs converge again to show
# that nothing changes, and stops the lab.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lab-deps.sh
cargo build --release --quiet

work=$(mktemp -d /tmp/arcfleet-demo.XXXXXX)
lab="$work/lab"
python=/usr/bin/python3
trap '"$python" tests/lab/lab.py down --dir "$lab" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

"$python" tests/lab/lab.py spec --devices 5 --clusters 2 --agents 1 > "$work/spec.json"
"$python" tests/lab/lab.py up --dir "$lab" --spec "$work/spec.json"

# The emulator's endpoints and credentials, and the lab CA that signs the certificate of
# the lab's OIDC issuer server; against real Azure these are your own.
eval "$("$python" - "$lab/manifest.json" <<'PY'
import json, shlex, sys
m = json.load(open(sys.argv[1]))
for name, key in [("ARCFLEET_ARM_ENDPOINT", "arm_endpoint"), ("AZURE_AUTHORITY_HOST", "authority_host"),
                  ("AZURE_TENANT_ID", "tenant_id"), ("AZURE_CLIENT_ID", "client_id"),
                  ("AZURE_CLIENT_SECRET", "client_secret"), ("LAB_IDENTITY", "identity_file"),
                  ("LAB_KNOWN_HOSTS", "known_hosts"), ("LAB_INVENTORY", "inventory_yaml"),
                  ("SSL_CERT_FILE", "ca_file")]:
    print(f"export {name}={shlex.quote(str(m[key]))}")
PY
)"

# A short stability window keeps the demo quick; the default playbook waits 15s.
cat > "$work/playbook.yaml" <<'YAML'
name: demo
steps:
  - probe
  - configure-apiserver
  - restart-k3s: {deadline: 60s, stability_window: 2s}
  - verify-token
  - restart-secret-sync
YAML

run() {
  target/release/arcfleet "$@" --inventory "$LAB_INVENTORY" --identity "$LAB_IDENTITY" \
    --known-hosts "$LAB_KNOWN_HOSTS" --playbook "$work/playbook.yaml" \
    --run-dir "$work/runs" --failed-list "$work/failed.txt"
}

echo; echo "== arcfleet audit (read-only)"
run audit || true
echo; echo "== arcfleet converge"
run converge --report-csv "$work/report.csv"
echo; echo "== CSV compliance report"
cat "$work/report.csv"
echo; echo "== arcfleet converge again: nothing changes, nothing restarts"
run converge --report-csv "$work/report-second.csv"
