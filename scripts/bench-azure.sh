#!/usr/bin/env bash
# Measures how many ARM requests and how much wall time `arcfleet issuers export` needs to
# resolve 20, 200 and 2000 connected clusters against the lab's Azure emulator (loopback
# only). It runs two layouts. "grouped" spreads the clusters over 2 subscriptions with 10
# clusters per resource group, so arcfleet lists them. "spread" puts each cluster in its
# own subscription, so arcfleet reads each with a GET, as it did before bulk reads.
# Needs root (the lab starts one sshd in a mount namespace) and a built binary:
#
#   cargo build && sudo bash scripts/bench-azure.sh [COUNTS...]   # ARCFLEET_BIN picks another binary
#
# Prints one Markdown table row per count and layout: clusters, layout, ARM requests,
# token requests and the wall time of the export (best of 3 runs).
set -euo pipefail
cd "$(dirname "$0")/.."
binary=${ARCFLEET_BIN:-target/debug/arcfleet}
[ -x "$binary" ] || { echo "build $binary first: cargo build (or set ARCFLEET_BIN)" >&2; exit 2; }
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(20 200 2000)
python=/usr/bin/python3
work=$(mktemp -d /tmp/arcfleet-bench.XXXXXX)
trap '$python tests/lab/lab.py down --dir "$work/lab" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

echo "| clusters | layout | ARM requests | token requests | wall time (best of 3) |"
echo "| ---: | --- | ---: | ---: | ---: |"
for count in "${counts[@]}"; do
  for layout in grouped spread; do
    $python - "$count" "$work" "$layout" <<'EOF'
import json, sys
count, work, layout = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def subscription(i):
    return "7d1e0c4a-0000-4b8e-9a51-%012d" % (i % 2 if layout == "grouped" else i)
clusters = [{"name": "line-%05d" % i, "subscription": subscription(i),
             "resource_group": "rg-site-%04d" % (i // 20), "location": "eastus"}
            for i in range(count)]
spec = {"clusters": clusters,
        "devices": [{"name": "edge-01", "cluster": clusters[0]["name"], "role": "server"}]}
json.dump(spec, open(f"{work}/spec.json", "w"))
with open(f"{work}/inventory.yaml", "w") as out:
    out.write("clusters:\n")
    for c in clusters:
        out.write(f"  {c['name']}: {{subscription: {c['subscription']}, resource_group: {c['resource_group']}}}\n")
    out.write("devices: []\n")
EOF
    $python tests/lab/lab.py up --dir "$work/lab" --spec "$work/spec.json" >/dev/null
    manifest="$work/lab/manifest.json"
    field() { $python -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$manifest" "$1"; }
    log=$(field emulator_log)
    best=""
    for attempt in 1 2 3; do
        : > "$log"
        start=$(date +%s.%N)
        env -i PATH=/usr/bin:/bin HOME="$work" \
            ARCFLEET_ARM_ENDPOINT="$(field arm_endpoint)" AZURE_AUTHORITY_HOST="$(field authority_host)" \
            AZURE_TENANT_ID="$(field tenant_id)" AZURE_CLIENT_ID="$(field client_id)" \
            AZURE_CLIENT_SECRET="$(field client_secret)" \
            "$binary" issuers export --inventory "$work/inventory.yaml" --out "$work/issuers.csv" >/dev/null 2>&1
        end=$(date +%s.%N)
        seconds=$($python -c "print(f'{$end - $start:.2f}')")
        if [ -z "$best" ] || $python -c "import sys; sys.exit(0 if $seconds < $best else 1)"; then best=$seconds; fi
        ready=$(grep -c ',ready,' "$work/issuers.csv" || true)
        [ "$ready" -eq "$count" ] || { echo "only $ready of $count clusters resolved" >&2; exit 1; }
    done
    arm=$(grep -c '"kind": "arm"' "$log" || true)
    tokens=$(grep -c '"kind": "token"' "$log" || true)
    echo "| $count | $layout | $arm | $tokens | ${best} s |"
    $python tests/lab/lab.py down --dir "$work/lab" >/dev/null
    rm -rf "$work/lab"
  done
done
