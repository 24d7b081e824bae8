"""The benchmark's audit in pyinfra: read the K3s configuration, the issuer drop-in and
the issuer the API server publishes, all as facts, and fail each server that differs.
Changes nothing. Run from this directory, so that k3s_issuer imports."""

import shlex

from pyinfra import host
from pyinfra.facts.files import FileContents
from pyinfra.operations import server

import k3s_issuer

issuer = host.data.arc_issuer
findings = []
problem = k3s_issuer.config_problem()
if problem:
    findings.append(problem)
current = host.get_fact(FileContents, path=k3s_issuer.DROPIN_PATH)
expected = k3s_issuer.dropin_text(issuer).rstrip("\n").split("\n")
if current != expected:
    findings.append(f"{k3s_issuer.DROPIN_PATH} differs from the expected drop-in")
published = k3s_issuer.published_issuer()
if published != issuer:
    findings.append(f"the API server publishes {published}, not {issuer}")
if findings:
    server.shell(name="Report non-compliance", commands=[f"echo {shlex.quote('; '.join(findings))} >&2; exit 1"])
