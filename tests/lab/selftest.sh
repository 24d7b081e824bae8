#!/bin/bash
# Self-check of the arcfleet lab. It brings up a 3-device lab and a second
# 1-device lab at the same time and checks the devices over real ssh and the
# Azure emulator with curl. Then it checks a 2-device bastion lab, and it
# tears every lab down. Run as root:
#   sudo tests/lab/selftest.sh
# Exits 0 when every check passes; prints one line per check.
set -euo pipefail

LAB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LAB="/usr/bin/python3 $LAB_DIR/lab.py"
WORK="$(mktemp -d /tmp/arcfleet-selftest.XXXXXX)"
MAIN="$WORK/main"
SECOND="$WORK/second"
BASTION="$WORK/bastion"
FAILURES=0

cleanup() {
    $LAB down --dir "$MAIN" >/dev/null 2>&1 || true
    $LAB down --dir "$SECOND" >/dev/null 2>&1 || true
    $LAB down --dir "$BASTION" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

pass() { echo "PASS $1"; }
fail() { echo "FAIL $1${2:+: $2}"; FAILURES=$((FAILURES + 1)); }
check() {
    # check LABEL CONDITION-COMMAND...: passes when the command succeeds.
    local label="$1"
    shift
    if "$@"; then pass "$label"; else fail "$label"; fi
}

# manifest FILE PYTHON-EXPRESSION: print a value from a manifest (variable m).
manifest() {
    /usr/bin/python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# on_device MANIFEST NAME COMMAND: run COMMAND on a device over ssh as its login user.
on_device() {
    local file="$1" name="$2" command="$3" port user
    port="$(manifest "$file" "[d['port'] for d in m['devices'] if d['name'] == '$name'][0]")"
    user="$(manifest "$file" "[d['user'] for d in m['devices'] if d['name'] == '$name'][0]")"
    ssh -n -i "$(manifest "$file" "m['identity_file']")" \
        -o UserKnownHostsFile="$(manifest "$file" "m['known_hosts']")" \
        -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=10 \
        -p "$port" "$user@127.0.0.1" "$command"
}

contains() { [[ "$1" == *"$2"* ]]; }

# --- bring up two labs at the same time ------------------------------------
$LAB spec --devices 3 --clusters 2 --agents 1 --user-devices 1 > "$WORK/main.json"
$LAB spec --devices 1 > "$WORK/second.json"
$LAB up --dir "$MAIN" --spec "$WORK/main.json" &
MAIN_UP=$!
$LAB up --dir "$SECOND" --spec "$WORK/second.json" &
SECOND_UP=$!
check "main lab up" wait "$MAIN_UP"
check "second lab up at the same time" wait "$SECOND_UP"

M="$MAIN/manifest.json"
DEFAULT_ISSUER="$(manifest "$M" "m['default_issuer']")"
# Device layout from 'lab.py spec': edge-01 server (labuser), edge-02 server, edge-03 agent.
ARC_ISSUER="$(manifest "$M" "[c['issuer_url'] for c in m['clusters'] if c['name'] == [d['cluster'] for d in m['devices'] if d['name'] == 'edge-02'][0]][0]")"

# --- devices over ssh ------------------------------------------------------
out="$(on_device "$M" edge-02 'k3s kubectl get --raw /.well-known/openid-configuration')"
check "root device publishes the default issuer" contains "$out" "\"issuer\":\"$DEFAULT_ISSUER\""
out="$(on_device "$M" edge-01 'sudo -n k3s kubectl get --raw /.well-known/openid-configuration')"
check "labuser device publishes the default issuer with sudo" contains "$out" "\"issuer\":\"$DEFAULT_ISSUER\""
out="$(on_device "$M" edge-01 'k3s kubectl version 2>&1 || true')"
check "labuser without sudo gets a kubeconfig permission error" contains "$out" "permission denied"
out="$(on_device "$M" edge-03 'systemctl is-active k3s-agent')"
check "agent unit is active" [ "$out" = active ]

on_device "$M" edge-02 "mkdir -p /etc/rancher/k3s/config.yaml.d && cat > /etc/rancher/k3s/config.yaml.d/90-arc-issuer.yaml <<'EOF'
kube-apiserver-arg+:
  - service-account-issuer=$ARC_ISSUER
  - service-account-issuer=$DEFAULT_ISSUER
  - service-account-max-token-expiration=24h
EOF"
check "restart with the Arc issuer drop-in succeeds" on_device "$M" edge-02 'systemctl restart k3s'
out="$(on_device "$M" edge-02 'k3s kubectl get --raw /.well-known/openid-configuration')"
check "device publishes the Arc issuer after restart" contains "$out" "\"issuer\":\"$ARC_ISSUER\""

out="$(on_device "$M" edge-02 'k3s kubectl get secretsyncs -A -o json')"
check "SecretSync fails before the controller restart" contains "$out" "AADSTS700211"
on_device "$M" edge-02 'k3s kubectl rollout restart deployment secret-sync-controller -n azure-secret-store' >/dev/null
out="$(on_device "$M" edge-02 'k3s kubectl get secretsyncs -A -o json')"
check "SecretSync succeeds after the controller restart" contains "$out" "UpdateValueChangeOrForceUpdateSucceeded"

on_device "$M" edge-02 "cat > /etc/rancher/k3s/config.yaml.d/90-arc-issuer.yaml <<'EOF'
kube-apiserver-arg+:
  - service-account-issuer=$ARC_ISSUER
  - service-account-issuer=$ARC_ISSUER
EOF"
if on_device "$M" edge-02 'systemctl restart k3s' 2>/dev/null; then
    fail "restart with a duplicated issuer fails" "systemctl restart exited 0"
else
    pass "restart with a duplicated issuer fails"
fi
out="$(on_device "$M" edge-02 'k3s kubectl get --raw /readyz 2>&1 || true')"
check "API stops answering after the failed restart" contains "$out" "127.0.0.1:6443 was refused"
out="$(on_device "$M" edge-02 'systemctl show -p ActiveState,SubState k3s')"
check "unit is activating (auto-restart)" [ "$out" = $'ActiveState=activating\nSubState=auto-restart' ]
out="$(on_device "$M" edge-02 'journalctl -u k3s -n 20 --no-pager -o cat')"
check "journal shows the kube-apiserver error" contains "$out" "is already specified"

on_device "$M" edge-03 "mkdir -p /etc/rancher/k3s/config.yaml.d && printf 'kube-apiserver-arg:\n  - service-account-issuer=$ARC_ISSUER\n' > /etc/rancher/k3s/config.yaml.d/90-arc-issuer.yaml"
out="$(on_device "$M" edge-03 'systemctl restart k3s-agent 2>&1; journalctl -u k3s-agent -n 5 -o cat' || true)"
check "agent rejects kube-apiserver-arg" contains "$out" "flag provided but not defined: -kube-apiserver-arg"

ROOT_02="$(manifest "$M" "[d['standin_dir'] for d in m['devices'] if d['name'] == 'edge-02'][0]")"
count="$(grep -c '"initial": false' "$ROOT_02/restarts.log")"
check "restarts.log has the two restarts of edge-02" [ "$count" = 2 ]

# --- Azure emulator --------------------------------------------------------
BASE="$(manifest "$M" "m['arm_endpoint']")"
TENANT="$(manifest "$M" "m['tenant_id']")"
CLIENT="$(manifest "$M" "m['client_id']")"
SECRET="$(manifest "$M" "m['client_secret']")"
SUB="$(manifest "$M" "m['clusters'][0]['subscription']")"
RG="$(manifest "$M" "m['clusters'][0]['resource_group']")"
NAME="$(manifest "$M" "m['clusters'][0]['name']")"
ISSUER_0="$(manifest "$M" "m['clusters'][0]['issuer_url']")"
token_json="$(curl -sS -X POST "${BASE}${TENANT}/oauth2/v2.0/token" \
    --data-urlencode grant_type=client_credentials --data-urlencode "client_id=$CLIENT" \
    --data-urlencode "client_secret=$SECRET" --data-urlencode "scope=${BASE}.default")"
TOKEN="$(/usr/bin/python3 -c 'import json, sys; print(json.loads(sys.argv[1])["access_token"])' "$token_json")"
check "emulator issues a token" [ -n "$TOKEN" ]
status="$(curl -sS -o /dev/null -w '%{http_code}' -X POST "${BASE}${TENANT}/oauth2/v2.0/token" \
    -d grant_type=client_credentials -d "client_id=$CLIENT" -d client_secret=wrong -d "scope=${BASE}.default")"
check "emulator rejects a wrong client secret with 401" [ "$status" = 401 ]
cluster="$(curl -sS -H "Authorization: Bearer $TOKEN" \
    "${BASE}subscriptions/$SUB/resourcegroups/$RG/providers/Microsoft.Kubernetes/connectedClusters/$NAME?api-version=2024-07-15-preview")"
check "emulator returns the cluster with its issuer" contains "$cluster" "\"issuerUrl\": \"$ISSUER_0\""
status="$(curl -sS -o /dev/null -w '%{http_code}' \
    "${BASE}subscriptions/$SUB/resourcegroups/$RG/providers/Microsoft.Kubernetes/connectedClusters/$NAME?api-version=2024-07-15-preview")"
check "emulator requires a bearer token" [ "$status" = 401 ]

curl -sS -X POST "${BASE}_emulator/state" -d '{"page_size": 1}' >/dev/null
page1="$(curl -sS -H "Authorization: Bearer $TOKEN" "${BASE}subscriptions/$SUB/providers/Microsoft.Kubernetes/connectedClusters?api-version=2024-07-15-preview")"
next="$(/usr/bin/python3 -c 'import json, sys; print(json.loads(sys.argv[1]).get("nextLink", ""))' "$page1")"
check "first page has a nextLink" contains "$next" '$skiptoken='
page2="$(curl -sS -H "Authorization: Bearer $TOKEN" "$next")"
names="$(/usr/bin/python3 -c 'import json, sys; print(" ".join(sorted(v["name"] for p in sys.argv[1:] for v in json.loads(p)["value"])))' "$page1" "$page2")"
check "two pages list both clusters" [ "$names" = "plant-a-line1 plant-b-line1" ]
last_next="$(/usr/bin/python3 -c 'import json, sys; print(json.loads(sys.argv[1]).get("nextLink", ""))' "$page2")"
check "last page has no nextLink" [ -z "$last_next" ]
if grep -q -F -e "$SECRET" -e "$TOKEN" "$(manifest "$M" "m['emulator_log']")"; then
    fail "emulator log contains no secret or token"
else
    pass "emulator log contains no secret or token"
fi

# --- the second lab responds too, then tear down ---------------------------
out="$(on_device "$SECOND/manifest.json" edge-01 'k3s kubectl get --raw /.well-known/openid-configuration')"
check "second lab device responds" contains "$out" "\"issuer\":\"$DEFAULT_ISSUER\""
MAIN_SSHD="$(manifest "$M" "' '.join(str(d['sshd_pid']) for d in m['devices'])")"
$LAB down --dir "$MAIN" >/dev/null
left=0
for pid in $MAIN_SSHD; do
    if [ -e "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status"; then left=$((left + 1)); fi
done
check "down stops every sshd of the lab" [ "$left" = 0 ]
check "down twice is fine" $LAB down --dir "$MAIN"
out="$(on_device "$SECOND/manifest.json" edge-01 'systemctl is-active k3s')"
check "second lab still runs after the first is down" [ "$out" = active ]
$LAB down --dir "$SECOND" >/dev/null

# --- a bastion lab ----------------------------------------------------------
$LAB spec --devices 2 --bastion > "$WORK/bastion.json"
check "bastion lab up" $LAB up --dir "$BASTION" --spec "$WORK/bastion.json"
B="$BASTION/manifest.json"
HOST_01="$(manifest "$B" "[d['host'] for d in m['devices'] if d['name'] == 'edge-01'][0]")"
NETNS="$(manifest "$B" "m['bastion']['netns']")"
out="$(ssh -n -F "$(manifest "$B" "m['ssh_config']")" "root@$HOST_01" hostname)"
check "device answers through the bastion" [ "$out" = edge-01 ]
route="$(ip -o route get "$HOST_01")"
check "the host's route to a device ends at the lab's veth" contains "$route" "dev ${NETNS%b}h"
if ip netns exec "$NETNS" ssh -n -o BatchMode=yes -o ConnectTimeout=3 -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="$(manifest "$B" "m['known_hosts']")" -i "$(manifest "$B" "m['identity_file']")" \
    "root@$HOST_01" true 2>/dev/null; then
    pass "the bastion's namespace reaches the device"
else
    fail "the bastion's namespace reaches the device"
fi
$LAB down --dir "$BASTION" >/dev/null
check "down removes the lab's network namespaces" [ -z "$(ip netns list | grep -w -e "$NETNS" -e "${NETNS%b}d")" ]

if [ "$FAILURES" -ne 0 ]; then
    echo "selftest: $FAILURES checks failed"
    exit 1
fi
echo "selftest: all checks passed"
