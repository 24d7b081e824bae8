"""Paths, the drop-in text and the reads shared by the pyinfra converge and audit deploys.

Each host's ``arc_issuer`` comes from the inventory that scripts/bench/bench.py writes
from the lab manifest, because these deploys do not read Azure Resource Manager.
"""

import json
import posixpath
import shlex

import yaml
from pyinfra import host
from pyinfra.facts.files import FileContents, FindFiles
from pyinfra.facts.server import Command

CONFIG_PATH = "/etc/rancher/k3s/config.yaml"
DROPIN_NAME = "zz-arcfleet-oidc-issuer.yaml"
DROPIN_PATH = f"{CONFIG_PATH}.d/{DROPIN_NAME}"
DISCOVERY_COMMAND = "k3s kubectl get --raw /.well-known/openid-configuration"


def dropin_text(issuer):
    """Return the drop-in arcfleet writes, byte for byte.

    ``kube-apiserver-arg+:`` appends to every other kube-apiserver-arg, and
    ``service-account-issuer-=`` puts the Arc issuer before the issuer the node used
    before, which stays accepted.
    """
    return (
        "# Written by arcfleet; the next converge replaces this file, so keep other settings\n"
        "# in other files. kube-apiserver signs service-account tokens with the first\n"
        "# service-account-issuer (the cluster's Azure Arc OIDC issuer) and accepts the rest.\n"
        "kube-apiserver-arg+:\n"
        f'  - "service-account-issuer-={issuer}"\n'
        '  - "service-account-max-token-expiration=24h"\n'
    )


def config_problem():
    """Read the K3s config file and its drop-ins; return why the drop-in cannot work, or None."""
    config = host.get_fact(FileContents, path=CONFIG_PATH)
    try:
        parsed = yaml.safe_load("\n".join(config or []))
    except yaml.YAMLError as error:
        return f"{CONFIG_PATH} is not valid YAML: {error}"
    if config is not None and not isinstance(parsed, dict):
        return f"{CONFIG_PATH} is not a YAML mapping"
    dropins = host.get_fact(FindFiles, path=f"{CONFIG_PATH}.d", maxdepth=1) or []
    later = sorted(
        name
        for name in map(posixpath.basename, dropins)
        if name.lower().endswith((".yaml", ".yml")) and name > DROPIN_NAME
    )
    if later:
        return f"drop-ins that sort after {DROPIN_NAME} can override it: {', '.join(later)}"
    return None


def wait_for_issuer_script(issuer, attempts=60):
    """Return a shell loop that succeeds once the API server publishes ``issuer``."""
    expected = shlex.quote(f'"issuer":"{issuer}"')
    return (
        f"for i in $(seq {attempts}); do "
        f"out=$({DISCOVERY_COMMAND} 2>/dev/null) && "
        f'case "$out" in *{expected}*) exit 0;; esac; sleep 1; done; '
        f"echo 'the API server does not publish {issuer}' >&2; exit 1"
    )


def published_issuer():
    """Return the issuer the API server publishes, or None when it does not respond."""
    output = host.get_fact(Command, command=f"{DISCOVERY_COMMAND} 2>/dev/null || true")
    try:
        return json.loads(output or "")["issuer"]
    except (ValueError, KeyError, TypeError):
        return None
