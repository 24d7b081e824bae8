#!/usr/bin/python3
"""Emulator of the Microsoft Entra token endpoint and the ARM connectedClusters and
federated identity credential APIs.

    azure_emulator.py --state STATE.json [--port 0] [--port-file F] [--log REQUESTS.jsonl]

It listens on 127.0.0.1 only and speaks the wire format the Azure SDKs use,
so a client only needs its authority host and ARM endpoint pointed here:

* ``POST /{tenant}/oauth2/v2.0/token``: client credentials with a client
  secret, or with a federated ``client_assertion`` (workload identity).
  Errors carry the AADSTS codes and the JSON body shape of Entra.
* ``GET /subscriptions/{sub}[/resourceGroups/{rg}]/providers/Microsoft.Kubernetes/connectedClusters[/{name}]``
  with ``Authorization: Bearer <token from this emulator>`` and a supported
  ``api-version``. Responses follow the Microsoft.Kubernetes REST spec
  (azure-rest-api-specs specification/hybridkubernetes, 2024-01-01 and
  2024-07-15-preview examples); lists are paged with ``nextLink``.
* ``GET /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}[/federatedIdentityCredentials[/{fic}]]``:
  user-assigned identities and their federated identity credentials, in the shape
  of azure-rest-api-specs specification/msi (2023-01-31 examples), paged with
  ``nextLink``, ``$top`` and ``$skiptoken``.
* ``GET /oidc/{tenant}/{id}/.well-known/openid-configuration`` and
  ``.../openid/v1/jwks``: OIDC discovery for each cluster issuer.
* Control API: ``GET /_emulator/health``, ``GET|POST /_emulator/state``
  (POST takes a JSON merge patch; ``clusters`` may be an object keyed by
  cluster name to patch single clusters), ``GET|DELETE /_emulator/requests``.

The state file is re-read whenever its modification time changes. Every
request is logged as one JSON line without the Authorization header, client
secret or client assertion.
"""

import argparse
import base64
import contextlib
import copy
import datetime
import hashlib
import json
import os
import secrets
import signal
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GA_API_VERSIONS = ("2024-01-01",)
PREVIEW_API_VERSIONS = ("2024-07-15-preview", "2024-12-01-preview", "2025-08-01-preview")
SUPPORTED_API_VERSIONS = GA_API_VERSIONS + PREVIEW_API_VERSIONS
# api-versions of Microsoft.ManagedIdentity that have federatedIdentityCredentials
# (2018-11-30 predates them).
MSI_API_VERSIONS = ("2022-01-31-preview", "2023-01-31", "2023-07-31-preview", "2024-11-30")
MSI_LEGACY_API_VERSIONS = ("2018-11-30",)
FIC_TYPE = "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials"
ARM_RESOURCES = ("https://management.azure.com/", "https://management.core.windows.net/")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
RATE_LIMIT_READS = 11999
FEDERATION_DOCS = "https://learn.microsoft.com/entra/workload-id/workload-identity-federation"


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def rfc3339(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def merge_patch(target, patch):
    """Apply a JSON merge patch (RFC 7386) and return the result."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class Emulator:
    """State, issued tokens and the request log, shared by all handler threads."""

    def __init__(self, state_path, log_path):
        self.state_path = state_path
        self.log_path = log_path
        self.lock = threading.RLock()
        self.state = {}
        self.state_mtime = None
        self.tokens = {}
        self.rate_limits = {}
        self.requests = []
        self.reload()

    def reload(self):
        """Re-read the state file when it changed on disk."""
        with self.lock:
            try:
                mtime = os.stat(self.state_path).st_mtime_ns
            except FileNotFoundError:
                return
            if mtime == self.state_mtime:
                return
            try:
                with open(self.state_path, encoding="utf-8") as handle:
                    state = json.load(handle)
            except json.JSONDecodeError as error:
                print(f"azure_emulator: keeping the old state, because {self.state_path} is invalid JSON: {error}", file=sys.stderr)
                return
            state.setdefault("faults", {})
            state.setdefault("clusters", [])
            self.state = state
            self.state_mtime = mtime

    def save(self):
        with self.lock:
            temporary = f"{self.state_path}.tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(self.state, handle, indent=2)
            os.replace(temporary, self.state_path)
            self.state_mtime = os.stat(self.state_path).st_mtime_ns

    def patch(self, patch):
        with self.lock:
            self.reload()
            clusters_patch = patch.get("clusters") if isinstance(patch, dict) else None
            if isinstance(clusters_patch, dict):
                patch = {key: value for key, value in patch.items() if key != "clusters"}
                by_name = {cluster["name"].lower(): cluster for cluster in self.state["clusters"]}
                for name, cluster_patch in clusters_patch.items():
                    if name.lower() not in by_name:
                        raise KeyError(name)
                    merged = merge_patch(by_name[name.lower()], cluster_patch)
                    by_name[name.lower()].clear()
                    by_name[name.lower()].update(merged)
            self.state = merge_patch(self.state, patch)
            self.save()
            return copy.deepcopy(self.state)

    def log(self, record):
        with self.lock:
            self.requests.append(record)
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record, sort_keys=True) + "\n")

    def take_throttle(self):
        """Return True when this ARM request is throttled, consuming one of throttle_next."""
        with self.lock:
            faults = self.state["faults"]
            if faults.get("throttle_forever"):
                return True
            remaining = int(faults.get("throttle_next") or 0)
            if remaining > 0:
                faults["throttle_next"] = remaining - 1
                self.save()
                return True
            return False

    def remaining_reads(self, subscription):
        with self.lock:
            value = self.rate_limits.get(subscription, RATE_LIMIT_READS + 1) - 1
            self.rate_limits[subscription] = max(value, 0)
            return self.rate_limits[subscription]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "arcfleet-lab-azure-emulator"

    def version_string(self):
        return self.server_version

    @property
    def emulator(self):
        return self.server.emulator

    def log_message(self, format, *args):  # noqa: A002 - signature fixed by BaseHTTPRequestHandler
        """Silence the default stderr access log, because requests go to the JSON log."""

    # -- plumbing --------------------------------------------------------

    def handle_request(self, method):
        started = time.monotonic()
        self.emulator.reload()
        self.request_id = str(uuid.uuid4())
        self.log_fields = {"kind": "unknown"}
        parsed = urllib.parse.urlsplit(self.path)
        self.query = {key.lower(): values[-1] for key, values in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items()}
        self.segments = [urllib.parse.unquote(part) for part in parsed.path.split("/") if part]
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        status = 500
        try:
            status = self.route(method)
        except BrokenPipeError:
            status = 499
        except Exception as error:  # noqa: BLE001 - report any handler bug as a 500 and keep serving
            print(f"azure_emulator: request {self.request_id} {method} {parsed.path} failed: {error!r}\n"
                  f"{traceback.format_exc()}", file=sys.stderr, flush=True)
            self.log_fields["error"] = repr(error)
            with contextlib.suppress(OSError):
                self.send_json(500, {"error": {"code": "InternalServerError", "message": f"The Azure emulator failed: {error!r}"}})
        finally:
            self.emulator.log({
                "time": rfc3339(utc_now()), "ts": time.time(), "method": method, "path": parsed.path,
                "query": {key: value for key, value in urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)},
                "status": status, "duration_ms": round((time.monotonic() - started) * 1000, 3),
                "request_id": self.request_id, **self.log_fields,
            })

    def do_GET(self):  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self.handle_request("GET")

    def do_POST(self):  # noqa: N802
        self.handle_request("POST")

    def do_PUT(self):  # noqa: N802
        self.handle_request("PUT")

    def do_PATCH(self):  # noqa: N802
        self.handle_request("PATCH")

    def do_DELETE(self):  # noqa: N802
        self.handle_request("DELETE")

    def send_json(self, status, document, headers=None):
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        return status

    def base_url(self):
        return f"http://{self.headers.get('Host') or '127.0.0.1:%d' % self.server.server_port}/"

    def route(self, method):
        segments = self.segments
        if segments[:1] == ["_emulator"]:
            self.log_fields["kind"] = "control"
            return self.control(method, segments[1:])
        if len(segments) == 4 and segments[1:] == ["oauth2", "v2.0", "token"]:
            self.log_fields["kind"] = "token"
            if method != "POST":
                return self.send_json(405, {"error": "invalid_request", "error_description": "The token endpoint accepts only POST."})
            return self.token(segments[0])
        if segments[:1] == ["oidc"]:
            self.log_fields["kind"] = "oidc"
            return self.oidc(segments[1:])
        if segments and segments[0].lower() == "subscriptions":
            self.log_fields["kind"] = "arm"
            return self.arm(method, segments)
        return self.send_json(404, {"error": {"code": "NotFound", "message": f"The Azure emulator does not serve {self.path}."}})

    # -- control API -----------------------------------------------------

    def control(self, method, segments):
        if segments == ["health"]:
            return self.send_json(200, {"status": "ok"})
        if segments == ["state"] and method == "GET":
            with self.emulator.lock:
                return self.send_json(200, self.emulator.state)
        if segments == ["state"] and method == "POST":
            try:
                patch = json.loads(self.body or b"{}")
                return self.send_json(200, self.emulator.patch(patch))
            except json.JSONDecodeError as error:
                return self.send_json(400, {"error": {"code": "InvalidJson", "message": f"The state patch is not valid JSON: {error}"}})
            except KeyError as error:
                return self.send_json(404, {"error": {"code": "ClusterNotFound", "message": f"No cluster named {error.args[0]!r} in the state."}})
        if segments == ["requests"] and method == "GET":
            with self.emulator.lock:
                return self.send_json(200, {"requests": list(self.emulator.requests)})
        if segments == ["requests"] and method == "DELETE":
            with self.emulator.lock:
                self.emulator.requests.clear()
            return self.send_json(200, {"requests": []})
        return self.send_json(404, {"error": {"code": "NotFound", "message": f"Unknown control endpoint {method} {self.path}."}})

    # -- Entra token endpoint --------------------------------------------

    def entra_error(self, status, error, code, description):
        trace_id = str(uuid.uuid4())
        correlation_id = self.headers.get("client-request-id") or str(uuid.uuid4())
        timestamp = utc_now().strftime("%Y-%m-%d %H:%M:%SZ")
        self.log_fields["error_code"] = code
        return self.send_json(status, {
            "error": error,
            "error_description": f"AADSTS{code}: {description}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}",
            "error_codes": [code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"https://login.microsoftonline.com/error?code={code}",
        })

    def token_form(self):
        """Return the form fields of a token request, with HTTP Basic client credentials merged in."""
        form = {key: values[-1] for key, values in urllib.parse.parse_qs(self.body.decode(errors="replace")).items()}
        basic = self.headers.get("Authorization", "")
        if basic.lower().startswith("basic "):
            # oauth2 clients may send the client id and secret with HTTP Basic authentication.
            user, _, password = base64.b64decode(basic[6:]).decode(errors="replace").partition(":")
            form.setdefault("client_id", urllib.parse.unquote(user))
            form.setdefault("client_secret", urllib.parse.unquote(password))
        return form

    def token(self, tenant):
        form = self.token_form()
        client_id = form.get("client_id", "")
        self.log_fields.update({"tenant": tenant, "client_id": client_id, "grant_type": form.get("grant_type"),
                                "scope": form.get("scope"), "client_assertion_type": form.get("client_assertion_type")})
        state = self.emulator.state
        if tenant.lower() != state.get("tenant_id", "").lower():
            return self.entra_error(400, "invalid_request", 90002,
                                    f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the "
                                    "correct cloud. Check with your subscription administrator, this may happen if there are no active "
                                    "subscriptions for the tenant.")
        if form.get("grant_type") != "client_credentials":
            return self.entra_error(400, "unsupported_grant_type", 70003,
                                    f"The app requested an unsupported grant type '{form.get('grant_type', '')}'.")
        client = next((item for item in state.get("clients", []) if item["client_id"].lower() == client_id.lower()), None)
        if client is None:
            return self.entra_error(400, "unauthorized_client", 700016,
                                    f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen "
                                    "if the application has not been installed by the administrator of the tenant or consented to by any "
                                    "user in the tenant. You may have sent your authentication request to the wrong tenant.")
        rejected = self.check_scope(form.get("scope", ""), tenant) or self.check_credential(client, form)
        if rejected:
            return rejected

        lifetime = int(state.get("token_lifetime_seconds", 3599))
        access_token = secrets.token_urlsafe(48)
        with self.emulator.lock:
            self.emulator.tokens[access_token] = {
                "client_id": client["client_id"], "object_id": client.get("object_id", ""),
                "tenant": tenant, "expires_at": time.time() + lifetime,
            }
        return self.send_json(200, {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": access_token})

    def check_credential(self, client, form):
        """Check the client secret or federated assertion; return the error status, or None when valid."""
        if form.get("client_assertion") or form.get("client_assertion_type"):
            return self.check_assertion(client, form)
        if "client_secret" not in form:
            return self.entra_error(401, "invalid_client", 7000218,
                                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
        if not secrets.compare_digest(form["client_secret"], client.get("client_secret", "")):
            return self.entra_error(401, "invalid_client", 7000215,
                                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret "
                                    f"value, not the client secret ID, for a secret added to app '{client['client_id']}'.")
        return None


    def check_scope(self, scope, tenant):
        scopes = scope.split()
        resources = set(ARM_RESOURCES) | {self.base_url()}
        for item in scopes or [""]:
            if not item.endswith("/.default"):
                return self.entra_error(400, "invalid_scope", 1002012,
                                        f"The provided value for scope {item} is not valid. Client credential flows must have a scope value "
                                        "with /.default suffixed to the resource identifier (application ID URI).")
            resource = item[: -len(".default")]
            if resource not in resources:
                return self.entra_error(400, "invalid_resource", 500011,
                                        f"The resource principal named {resource} was not found in the tenant named {tenant}. This can "
                                        "happen if the application has not been installed by the administrator of the tenant or consented "
                                        "to by any user in the tenant. You might have sent your authentication request to the wrong tenant.")
        return None

    def check_assertion(self, client, form):
        """Check a federated client assertion against the client's federated credentials.

        The signature is not verified: the issuer, subject, audience and
        validity time decide, with the AADSTS codes Entra uses for each.
        """
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            return self.entra_error(400, "invalid_request", 50027, "JWT token is invalid or malformed.")
        try:
            payload_part = form.get("client_assertion", "").split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload_part + "=" * (-len(payload_part) % 4)))
        except (IndexError, ValueError):
            return self.entra_error(400, "invalid_request", 50027, "JWT token is invalid or malformed.")
        now = time.time()
        if not claims.get("exp") or now > claims["exp"] or now < claims.get("nbf", 0):
            return self.entra_error(400, "invalid_client", 700024,
                                    f"Client assertion is not within its valid time range. Current time: {utc_now().isoformat()}, "
                                    f"expiry time of assertion {claims.get('exp')}.")

        credentials = [item for item in self.emulator.state.get("federated_credentials", [])
                       if item["client_id"].lower() == client["client_id"].lower()]
        issuer, subject = claims.get("iss"), claims.get("sub")
        audiences = claims.get("aud") if isinstance(claims.get("aud"), list) else [claims.get("aud")]
        hint = f"Please check your federated identity credential Subject, Audience and Issuer against the presented assertion. {FEDERATION_DOCS}"
        matching = [item for item in credentials if item["issuer"] == issuer]
        if not matching:
            return self.entra_error(400, "invalid_client", 700211,
                                    f"No matching federated identity record found for presented assertion issuer '{issuer}'. {hint}")
        matching = [item for item in matching if item["subject"] == subject]
        if not matching:
            return self.entra_error(400, "invalid_client", 700213,
                                    f"No matching federated identity record found for presented assertion subject '{subject}'. {hint}")
        if not any(set(audiences) & set(item.get("audiences", [])) for item in matching):
            return self.entra_error(400, "invalid_client", 700212,
                                    f"No matching federated identity record found for presented assertion audience '{audiences[0]}'. {hint}")
        return None


    # -- OIDC discovery for cluster issuers --------------------------------

    def oidc(self, segments):
        suffix = "/".join(segments)
        for cluster in self.emulator.state["clusters"]:
            path = urllib.parse.urlsplit(cluster.get("issuer_url", "")).path.strip("/")
            if not cluster.get("oidc_enabled", True) or not path or not suffix.startswith(path + "/"):
                continue
            rest = suffix[len(path) + 1:]
            issuer = cluster["issuer_url"]
            if rest == ".well-known/openid-configuration":
                return self.send_json(200, {"issuer": issuer, "jwks_uri": issuer.rstrip("/") + "/openid/v1/jwks",
                                            "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                                            "id_token_signing_alg_values_supported": ["RS256"]})
            if rest == "openid/v1/jwks":
                kid = base64.urlsafe_b64encode(hashlib.sha256(issuer.encode()).digest()).rstrip(b"=").decode()
                modulus = base64.urlsafe_b64encode(hashlib.sha512(issuer.encode()).digest() * 4).rstrip(b"=").decode()
                return self.send_json(200, {"keys": [{"use": "sig", "kty": "RSA", "kid": kid, "alg": "RS256", "n": modulus, "e": "AQAB"}]})
        return self.send_json(404, {"error": {"code": "NotFound", "message": f"No OIDC issuer is served at {self.path}."}})

    # -- ARM ---------------------------------------------------------------

    def arm_error(self, status, code, message, headers=None):
        self.log_fields["error_code"] = code
        return self.send_json(status, {"error": {"code": code, "message": message}}, {**self.arm_headers(), **(headers or {})})

    def arm_headers(self, subscription=None):
        headers = {
            "x-ms-request-id": self.request_id,
            "x-ms-correlation-request-id": self.headers.get("x-ms-correlation-request-id") or self.request_id,
            "x-ms-routing-request-id": f"EASTUS:{utc_now().strftime('%Y%m%dT%H%M%SZ')}:{self.request_id}",
            "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
            "Expires": "-1",
            "Pragma": "no-cache",
        }
        if self.headers.get("x-ms-client-request-id"):
            headers["x-ms-client-request-id"] = self.headers["x-ms-client-request-id"]
        if subscription:
            headers["x-ms-ratelimit-remaining-subscription-reads"] = str(self.emulator.remaining_reads(subscription.lower()))
        return headers

    def authenticate(self):
        """Return the issued-token record of the request, or None after sending a 401."""
        header = self.headers.get("Authorization")
        if not header:
            self.arm_error(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.",
                           {"WWW-Authenticate": 'Bearer authorization_uri="https://login.microsoftonline.com/", error="invalid_token", '
                                                'error_description="The authentication failed because of missing \'Authorization\' header."'})
            return None
        scheme, _, token = header.partition(" ")
        with self.emulator.lock:
            record = self.emulator.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if record is None:
            self.arm_error(401, "InvalidAuthenticationToken", "The access token is invalid.",
                           {"WWW-Authenticate": 'Bearer authorization_uri="https://login.microsoftonline.com/", error="invalid_token", '
                                                'error_description="The access token is invalid."'})
            return None
        if time.time() > record["expires_at"]:
            expiry = datetime.datetime.fromtimestamp(record["expires_at"], datetime.timezone.utc)
            self.arm_error(401, "ExpiredAuthenticationToken",
                           f"The access token expiry UTC time '{expiry.strftime('%m/%d/%Y %I:%M:%S %p')}' is earlier than current UTC "
                           f"time '{utc_now().strftime('%m/%d/%Y %I:%M:%S %p')}'.")
            return None
        self.log_fields["client_id"] = record["client_id"]
        return record

    def arm(self, method, segments):
        caller = self.authenticate()
        if caller is None:
            return 401
        api_version = self.query.get("api-version")
        self.log_fields["api_version"] = api_version
        if not api_version:
            return self.arm_error(400, "MissingApiVersionParameter", "The api-version query parameter (?api-version=) is required for all requests.")
        lowered = [segment.lower() for segment in segments]
        subscription = segments[1] if len(segments) > 1 else ""
        self.log_fields["subscription"] = subscription
        managed_identity = len(lowered) >= 8 and lowered[2] == "resourcegroups" and lowered[4:7] == [
            "providers", "microsoft.managedidentity", "userassignedidentities"]
        supported = MSI_API_VERSIONS + MSI_LEGACY_API_VERSIONS if managed_identity else SUPPORTED_API_VERSIONS
        if api_version not in supported:
            return self.arm_error(400, "InvalidApiVersionParameter",
                                  f"The api-version '{api_version}' is invalid. The supported versions are '{','.join(reversed(supported))}'.")
        if self.emulator.take_throttle():
            retry_after = str(int(self.emulator.state["faults"].get("retry_after_seconds", 1)))
            return self.arm_error(429, "TooManyRequests",
                                  "The request is being throttled as the limit has been reached for operation type - Read. "
                                  "For more information, refer to - https://aka.ms/srpthrottlinglimits",
                                  {"Retry-After": retry_after, "x-ms-ratelimit-remaining-subscription-reads": "0"})
        if managed_identity:
            return self.managed_identity(method, api_version, segments, lowered, caller)
        provider = ["providers", "microsoft.kubernetes", "connectedclusters"]
        if len(lowered) == 5 and lowered[2:] == provider:
            return self.list_clusters(method, api_version, subscription, None, caller)
        if len(lowered) == 7 and lowered[2] == "resourcegroups" and lowered[4:] == provider:
            return self.list_clusters(method, api_version, subscription, segments[3], caller)
        if len(lowered) == 8 and lowered[2] == "resourcegroups" and lowered[4:7] == provider:
            return self.get_cluster(method, api_version, subscription, segments[3], segments[7], caller)
        return self.invalid_resource_type(api_version, subscription)

    def invalid_resource_type(self, api_version, subscription):
        return self.arm_error(404, "InvalidResourceType",
                              f"The resource type could not be found for path '{self.path.split('?')[0]}' and api version '{api_version}'.",
                              self.arm_headers(subscription))

    def authorization_failed(self, caller, action, scope, subscription):
        return self.arm_error(403, "AuthorizationFailed",
                              f"The client '{caller['client_id']}' with object id '{caller['object_id']}' does not have authorization to "
                              f"perform action '{action}' over scope '{scope}' or the scope is invalid. "
                              "If access was recently granted, please refresh your credentials.", self.arm_headers(subscription))

    def check_scope_exists(self, subscription, resource_group):
        clusters = self.emulator.state["clusters"]
        subscriptions = {cluster["subscription"].lower() for cluster in clusters}
        subscriptions.update(item.lower() for item in self.emulator.state.get("subscriptions", []))
        subscriptions.update(item["subscription"].lower() for item in self.emulator.state.get("identities", []))
        if subscription.lower() not in subscriptions:
            return self.arm_error(404, "SubscriptionNotFound", f"The subscription '{subscription}' could not be found.", self.arm_headers())
        if resource_group is not None:
            groups = {(c["subscription"].lower(), c["resource_group"].lower()) for c in clusters}
            groups.update((item["subscription"].lower(), item["resource_group"].lower())
                          for item in self.emulator.state.get("identities", []))
            groups.update((item["subscription"].lower(), item["name"].lower()) for item in self.emulator.state.get("resource_groups", []))
            if (subscription.lower(), resource_group.lower()) not in groups:
                return self.arm_error(404, "ResourceGroupNotFound", f"Resource group '{resource_group}' could not be found.",
                                      self.arm_headers(subscription))
        return None

    def get_cluster(self, method, api_version, subscription, resource_group, name, caller):
        if method != "GET":
            return self.method_not_allowed(method, subscription)
        missing = self.check_scope_exists(subscription, resource_group)
        if missing:
            return missing
        self.log_fields["cluster"] = name
        scope = f"/subscriptions/{subscription}/resourcegroups/{resource_group}/providers/Microsoft.Kubernetes/connectedClusters/{name}"
        cluster = next((c for c in self.emulator.state["clusters"]
                        if c["subscription"].lower() == subscription.lower() and c["resource_group"].lower() == resource_group.lower()
                        and c["name"].lower() == name.lower()), None)
        if cluster is not None and cluster.get("forbidden"):
            return self.authorization_failed(caller, "Microsoft.Kubernetes/connectedClusters/read", scope, subscription)
        if cluster is None or not cluster.get("exists", True):
            return self.arm_error(404, "ResourceNotFound",
                                  f"The Resource 'Microsoft.Kubernetes/connectedClusters/{name}' under resource group '{resource_group}' was "
                                  "not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix", self.arm_headers(subscription))
        if cluster.get("fail_status"):
            return self.server_error(int(cluster["fail_status"]), subscription)
        return self.send_json(200, self.cluster_document(cluster, api_version), self.arm_headers(subscription))

    def list_clusters(self, method, api_version, subscription, resource_group, caller):
        if method != "GET":
            return self.method_not_allowed(method, subscription)
        missing = self.check_scope_exists(subscription, resource_group)
        if missing:
            return missing
        in_scope = [c for c in self.emulator.state["clusters"]
                    if c["subscription"].lower() == subscription.lower()
                    and (resource_group is None or c["resource_group"].lower() == resource_group.lower())]
        if any(c.get("forbidden") for c in in_scope):
            # Without deny assignments a role on the scope would be inherited by every
            # cluster in it, so a forbidden cluster means the caller cannot read the scope.
            scope = f"/subscriptions/{subscription}" + (f"/resourcegroups/{resource_group}" if resource_group else "")
            return self.authorization_failed(caller, "Microsoft.Kubernetes/connectedClusters/read", scope, subscription)
        clusters = [c for c in in_scope if c.get("exists", True)]
        clusters.sort(key=lambda c: (c["resource_group"].lower(), c["name"].lower()))
        page_size = max(1, int(self.emulator.state.get("page_size", 100)))
        return self.send_page(api_version, subscription, clusters, page_size,
                              lambda cluster: self.cluster_document(cluster, api_version))

    def page_offset(self, subscription):
        """Return the offset encoded in $skiptoken (0 without one), or None after sending a 400."""
        if "$skiptoken" not in self.query:
            return 0
        try:
            return int(json.loads(base64.urlsafe_b64decode(self.query["$skiptoken"] + "==="))["offset"])
        except (ValueError, KeyError, TypeError):
            self.arm_error(400, "InvalidSkipToken", f"The skip token '{self.query['$skiptoken']}' is invalid.", self.arm_headers(subscription))
            return None

    def send_page(self, api_version, subscription, items, page_size, render):
        """Send one page of ``items`` with an absolute nextLink when more follow."""
        offset = self.page_offset(subscription)
        if offset is None:
            return 400
        page = items[offset:offset + page_size]
        self.log_fields["page_offset"] = offset
        body = {"value": [render(item) for item in page]}
        if offset + page_size < len(items):
            token = base64.urlsafe_b64encode(json.dumps({"offset": offset + page_size}).encode()).decode().rstrip("=")
            path = urllib.parse.urlsplit(self.path).path.lstrip("/")
            extra = f"&$top={self.query['$top']}" if "$top" in self.query else ""
            body["nextLink"] = f"{self.base_url()}{path}?api-version={api_version}{extra}&$skiptoken={token}"
        return self.send_json(200, body, self.arm_headers(subscription))

    # -- Microsoft.ManagedIdentity -------------------------------------------

    def managed_identity(self, method, api_version, segments, lowered, caller):
        subscription, resource_group, name = segments[1], segments[3], segments[7]
        if method != "GET":
            return self.method_not_allowed(method, subscription)
        if len(lowered) > 8 and lowered[8] != "federatedidentitycredentials" or len(lowered) > 10:
            return self.invalid_resource_type(api_version, subscription)
        if len(lowered) > 8 and api_version in MSI_LEGACY_API_VERSIONS:
            return self.arm_error(400, "NoRegisteredProviderFound",
                                  f"No registered resource provider found for location 'eastus' and API version '{api_version}' for type "
                                  f"'userAssignedIdentities/federatedIdentityCredentials'. The supported api-versions are "
                                  f"'{', '.join(MSI_API_VERSIONS)}'.", self.arm_headers(subscription))
        missing = self.check_scope_exists(subscription, resource_group)
        if missing:
            return missing
        self.log_fields["identity"] = name
        identity = next((item for item in self.emulator.state.get("identities", [])
                         if item["subscription"].lower() == subscription.lower()
                         and item["resource_group"].lower() == resource_group.lower()
                         and item["name"].lower() == name.lower()), None)
        identity_id = (f"/subscriptions/{subscription}/resourcegroups/{resource_group}"
                       f"/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}")
        if identity is not None and identity.get("forbidden"):
            action = FIC_TYPE + "/read" if len(lowered) > 8 else "Microsoft.ManagedIdentity/userAssignedIdentities/read"
            return self.authorization_failed(caller, action, identity_id, subscription)
        if identity is None or not identity.get("exists", True):
            return self.arm_error(404, "ResourceNotFound",
                                  f"The Resource 'Microsoft.ManagedIdentity/userAssignedIdentities/{name}' under resource group "
                                  f"'{resource_group}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
                                  self.arm_headers(subscription))
        if len(lowered) == 8:
            return self.send_json(200, self.identity_document(identity), self.arm_headers(subscription))
        credentials = sorted(identity.get("federated_credentials", []), key=lambda item: item["name"].lower())
        if len(lowered) == 10:
            credential = next((item for item in credentials if item["name"].lower() == lowered[9]), None)
            if credential is None:
                return self.arm_error(404, "NotFound", f"Federated Identity Credential '{segments[9]}' not found.",
                                      self.arm_headers(subscription))
            return self.send_json(200, self.fic_document(identity, credential), self.arm_headers(subscription))
        try:
            page_size = int(self.query.get("$top") or self.emulator.state.get("page_size", 100))
        except ValueError:
            return self.arm_error(400, "InvalidParameter", f"The value '{self.query['$top']}' of $top is not an integer.",
                                  self.arm_headers(subscription))
        return self.send_page(api_version, subscription, credentials, max(1, page_size),
                              lambda credential: self.fic_document(identity, credential))

    def identity_document(self, identity):
        seed = hashlib.sha256(f"{identity['subscription']}/{identity['resource_group']}/{identity['name']}".lower().encode()).digest()
        return {
            "id": (f"/subscriptions/{identity['subscription']}/resourcegroups/{identity['resource_group']}"
                   f"/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{identity['name']}"),
            "name": identity["name"],
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
            "location": identity.get("location", "eastus"),
            "tags": identity.get("tags", {}),
            "properties": {
                "tenantId": self.emulator.state.get("tenant_id"),
                "principalId": identity.get("principal_id") or str(uuid.UUID(bytes=seed[:16], version=4)),
                "clientId": identity.get("client_id") or str(uuid.UUID(bytes=seed[16:32], version=4)),
                "isolationScope": "None",
            },
        }

    def fic_document(self, identity, credential):
        return {
            "id": (f"/subscriptions/{identity['subscription']}/resourcegroups/{identity['resource_group']}"
                   f"/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{identity['name']}"
                   f"/federatedIdentityCredentials/{credential['name']}"),
            "name": credential["name"],
            "type": FIC_TYPE,
            "properties": {
                "issuer": credential["issuer"],
                "subject": credential["subject"],
                "audiences": list(credential.get("audiences", ["api://AzureADTokenExchange"])),
            },
        }

    def method_not_allowed(self, method, subscription):
        return self.arm_error(405, "MethodNotAllowed", f"The Azure emulator serves ARM read-only; {method} is not supported.",
                              self.arm_headers(subscription))

    def server_error(self, status, subscription):
        code = {500: "InternalServerError", 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}.get(status, "InternalServerError")
        return self.arm_error(status, code, "Encountered internal server error. Diagnostic information: timestamp "
                              f"'{utc_now().strftime('%Y%m%dT%H%M%SZ')}', subscription id '{subscription}', tracking id '{self.request_id}'.",
                              self.arm_headers(subscription))

    def cluster_document(self, cluster, api_version):
        """Return the ConnectedCluster resource in the shape of the requested api-version."""
        name = cluster["name"]
        resource_id = (f"/subscriptions/{cluster['subscription']}/resourceGroups/{cluster['resource_group']}"
                       f"/providers/Microsoft.Kubernetes/connectedClusters/{name}")
        seed = hashlib.sha256(resource_id.lower().encode()).digest()
        now = utc_now()
        node_count = int(cluster.get("total_node_count") or self.emulator.state.get("node_counts", {}).get(name, 1))
        created = now - datetime.timedelta(days=30)
        properties = {
            "agentPublicKeyCertificate": base64.b64encode(b"0\x82\x02\n\x02\x82\x02\x01\x00" + seed * 16).decode(),
            "kubernetesVersion": cluster.get("kubernetes_version", "1.31.4+k3s1"),
            "totalNodeCount": node_count,
            "totalCoreCount": node_count * 4,
            "agentVersion": cluster.get("agent_version", "1.21.10"),
            "provisioningState": cluster.get("provisioning_state", "Succeeded"),
            "distribution": "k3s",
            "distributionVersion": cluster.get("kubernetes_version", "1.31.4+k3s1"),
            "infrastructure": "generic",
            "offering": None,
            "managedIdentityCertificateExpirationTime": rfc3339(now + datetime.timedelta(days=60)),
            "lastConnectivityTime": rfc3339(now - datetime.timedelta(minutes=1)),
            "connectivityStatus": cluster.get("connectivity_status", "Connected"),
            "privateLinkState": "Disabled",
            "azureHybridBenefit": "NotApplicable",
            "miscellaneousProperties": {"createCorrelationId": str(uuid.UUID(bytes=seed[:16], version=4))},
        }
        if api_version in PREVIEW_API_VERSIONS:
            properties.update(self.preview_properties(cluster, properties["agentVersion"]))

        document = {
            "id": resource_id,
            "name": name,
            "type": "microsoft.kubernetes/connectedclusters",
            "location": cluster.get("location", "eastus"),
            "tags": cluster.get("tags", {}),
            "identity": {"type": "SystemAssigned", "principalId": str(uuid.UUID(bytes=seed[16:32], version=4)),
                         "tenantId": self.emulator.state.get("tenant_id")},
            "properties": properties,
            "systemData": {
                "createdBy": "arc-onboarding@example.com", "createdByType": "User", "createdAt": rfc3339(created),
                "lastModifiedBy": "arc-onboarding@example.com", "lastModifiedByType": "User", "lastModifiedAt": rfc3339(created),
            },
        }
        if cluster.get("kind"):
            document["kind"] = cluster["kind"]
        return document

    def preview_properties(self, cluster, agent_version):
        """Return the properties that only the preview api-versions have, such as oidcIssuerProfile."""
        oidc = {"enabled": bool(cluster.get("oidc_enabled", True))}
        if oidc["enabled"]:
            oidc["issuerUrl"] = cluster["issuer_url"]
        if cluster.get("self_hosted_issuer_url"):
            oidc["selfHostedIssuerUrl"] = cluster["self_hosted_issuer_url"]
        return {
            "aadProfile": {"enableAzureRBAC": False, "adminGroupObjectIDs": [], "tenantID": self.emulator.state.get("tenant_id")},
            "arcAgentProfile": {"desiredAgentVersion": agent_version, "agentAutoUpgrade": "Enabled",
                                "agentState": "Succeeded", "systemComponents": [], "agentErrors": []},
            "securityProfile": {"workloadIdentity": {"enabled": bool(cluster.get("workload_identity_enabled", True))}},
            "oidcIssuerProfile": oidc,
            "gateway": {"enabled": False},
        }


def main(argv=None):
    parser = argparse.ArgumentParser(description="Entra token endpoint and ARM emulator (connected clusters, managed identities) for the arcfleet lab")
    parser.add_argument("--state", required=True, help="state JSON file (re-read when it changes)")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1, or 0 to pick a free port (default 0)")
    parser.add_argument("--port-file", help="write the chosen port to this file once listening")
    parser.add_argument("--log", help="append one JSON line per request to this file")
    args = parser.parse_args(argv)
    emulator = Emulator(args.state, args.log)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.emulator = emulator
    port = server.server_address[1]
    if args.port_file:
        temporary = args.port_file + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(f"{port}\n")
        os.replace(temporary, args.port_file)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"azure_emulator: listening on http://127.0.0.1:{port}/ with state {args.state}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        print("azure_emulator: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
