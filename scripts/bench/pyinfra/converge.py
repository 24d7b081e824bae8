"""The benchmark's converge job in pyinfra: read the K3s configuration, write the issuer
drop-in, restart K3s only when the drop-in changed, and wait until the API server
publishes the Arc issuer. Run from this directory, so that k3s_issuer imports."""

from io import StringIO

import shlex

from pyinfra import host
from pyinfra.operations import files, server

import k3s_issuer

issuer = host.data.arc_issuer
problem = k3s_issuer.config_problem()
if problem:
    server.shell(name="Report the configuration problem", commands=[f"echo {shlex.quote(problem)} >&2; exit 1"])
else:
    dropin = files.put(
        name="Write the issuer drop-in",
        src=StringIO(k3s_issuer.dropin_text(issuer)),
        dest=k3s_issuer.DROPIN_PATH,
        user="root",
        group="root",
        mode="600",
    )
    server.shell(
        name="Restart K3s",
        commands=["systemctl restart k3s.service"],
        _if=dropin.did_change,
    )
    server.shell(
        name="Wait until the API server publishes the Arc issuer",
        commands=[k3s_issuer.wait_for_issuer_script(issuer)],
    )
