#!/usr/bin/env python3
"""A loopback stand-in for Azure Arc's OIDC issuer endpoints, over HTTPS.

Arc publishes, for each connected cluster with the OIDC issuer enabled, a discovery
document at ``<issuer>.well-known/openid-configuration`` and the cluster's
service-account signing keys at its ``jwks_uri``. Entra fetches both to validate a
workload's token. This server serves the same two documents for every lab cluster whose
issuer URL points at it (``https://127.0.0.1:PORT/<location>/<tenant>/<uuid>/``), with a
certificate from the lab's own CA, so that arcfleet fetches them with real TLS.

The state file maps each issuer path to the key IDs it publishes::

    {"issuers": {"eastus/<tenant>/<uuid>": {"kids": ["<kid>", ...]}}}

It is read on every request, so tests can drop a key to model a signing key that Arc
does not publish. Only key IDs matter to arcfleet; the RSA modulus is a fixed
placeholder.
"""

import argparse
import http.server
import json
import os
import ssl
import sys

PLACEHOLDER_MODULUS = "sXchh7cGX6ot3VtSAPxqR1Ps4IOH6nQ2Bg7Vun8ByHlhEwqHCanMMd6dGV9-RRp0tNBDm_xvgGPfCO7ofLcpqQ"


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "arcfleet-lab-oidc/1"

    def log_message(self, format, *args):  # noqa: A002 - the base class names it so
        sys.stderr.write("oidc_issuer: " + (format % args) + "\n")

    def send_json(self, status, document):
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0].strip("/")
        issuers = read_state(self.server.state_path).get("issuers", {})
        base = f"https://127.0.0.1:{self.server.server_port}"
        for suffix, kind in ((".well-known/openid-configuration", "discovery"), ("openid/v1/jwks", "jwks")):
            if not path.endswith(suffix):
                continue
            issuer_path = path[: -len(suffix)].strip("/")
            entry = issuers.get(issuer_path)
            if entry is None:
                break
            issuer = f"{base}/{issuer_path}/"
            if kind == "discovery":
                self.send_json(200, {
                    "issuer": issuer,
                    "jwks_uri": f"{issuer}openid/v1/jwks",
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                })
            else:
                keys = [{"use": "sig", "kty": "RSA", "kid": kid, "alg": "RS256", "n": PLACEHOLDER_MODULUS, "e": "AQAB"}
                        for kid in entry.get("kids", [])]
                self.send_json(200, {"keys": keys})
            return
        self.send_json(404, {"error": "not found", "path": self.path})


def read_state(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        sys.stderr.write(f"oidc_issuer: cannot read state {path}: {error}\n")
        return {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--state", required=True, help="JSON file with the issuers and their key IDs")
    parser.add_argument("--cert", required=True, help="PEM certificate for 127.0.0.1")
    parser.add_argument("--key", required=True, help="PEM private key of the certificate")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--port-file", help="write the port here once listening")
    args = parser.parse_args()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.state_path = args.state
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    if args.port_file:
        temporary = args.port_file + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(str(server.server_port))
        os.replace(temporary, args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
