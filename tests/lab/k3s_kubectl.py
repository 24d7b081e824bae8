"""``k3s kubectl`` for the lab stand-in, served from the device's state files.

Supported requests (anything else fails with an error that names the request):

* ``version [--client]``
* ``get --raw PATH`` for /.well-known/openid-configuration, /openid/v1/jwks,
  /readyz, /livez, /healthz and /version
* ``get deployments|secretsyncs|namespaces|nodes [NAME...] [-n NS|-A] [-o json|yaml|name]``
* ``rollout restart deployment [NAME...] -n NS`` and
  ``rollout status deployment/NAME -n NS [--timeout=D]``
* ``create token SA -n NS [--audience AUD]... [--duration D]``

Like ``k3s kubectl``, it reads /etc/rancher/k3s/k3s.yaml: without that file
it talks to localhost:8080, and when the file is not readable it fails with
a permission error. The API answers only while k3s.service is active and the
``api_unavailable`` fault is not set.

A SecretSync is synced when the controller deployment it names was last
restarted while the node signed service account tokens with the Arc issuer of
its cluster (``arc_issuer`` in cluster.json). The controller's tokens change
only on ``rollout restart``: token refresh by the kubelet is not modelled.
"""

import base64
import calendar
import hashlib
import json
import os
import sys
import time
import uuid

import yaml

import k3s_model as model
import k3s_standin as standin

SECRET_STORE_NAMESPACE = "azure-secret-store"
SECRET_SYNC_CONTROLLER = "secret-sync-controller"
SECRET_SYNC_API_VERSION = "secret-sync.x-k8s.io/v1alpha1"
MIN_TOKEN_SECONDS = 600
DEFAULT_TOKEN_SECONDS = 3600

RESOURCE_ALIASES = {
    "deployment": "deployments", "deployments": "deployments", "deploy": "deployments",
    "deployments.apps": "deployments", "deployment.apps": "deployments",
    "secretsync": "secretsyncs", "secretsyncs": "secretsyncs",
    "secretsyncs.secret-sync.x-k8s.io": "secretsyncs", "secretsync.secret-sync.x-k8s.io": "secretsyncs",
    "namespace": "namespaces", "namespaces": "namespaces", "ns": "namespaces",
    "node": "nodes", "nodes": "nodes", "no": "nodes",
}
NAME_PREFIXES = {
    "deployments": "deployment.apps", "secretsyncs": "secretsync.secret-sync.x-k8s.io",
    "namespaces": "namespace", "nodes": "node",
}
VALUE_FLAGS = {
    "-n": "namespace", "--namespace": "namespace", "-o": "output", "--output": "output",
    "--raw": "raw", "--timeout": "timeout", "--audience": "audience", "--duration": "duration",
    "--kubeconfig": "kubeconfig", "--context": "context", "--request-timeout": "request-timeout",
    "-l": "selector", "--selector": "selector", "--field-selector": "field-selector",
}


class KubectlError(Exception):
    """A kubectl failure: the message goes to stderr and kubectl exits 1."""


def kubectl_main(device, args):
    try:
        return run(device, args)
    except KubectlError as error:
        print(str(error), file=sys.stderr)
        return 1


def parse_args(args):
    flags = {"audience": []}
    positional = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        name, has_value, value = arg.partition("=")
        if name.startswith("-o") and name not in VALUE_FLAGS and not name.startswith("--"):
            name, has_value, value = "-o", True, arg[2:].lstrip("=")
        if name in VALUE_FLAGS:
            if not has_value:
                if index >= len(args):
                    raise KubectlError(f"error: flag needs an argument: {name}")
                value = args[index]
                index += 1
            key = VALUE_FLAGS[name]
            if key == "audience":
                flags["audience"].append(value)
            else:
                flags[key] = value
        elif arg in ("-A", "--all-namespaces"):
            flags["all-namespaces"] = True
        elif arg == "--client":
            flags["client"] = True
        elif arg.startswith("-"):
            raise KubectlError(f"error: the lab stand-in does not support the kubectl flag {arg}")
        else:
            positional.append(arg)
    return flags, positional


def run(device, args):
    flags, positional = parse_args(args)
    if not positional:
        raise KubectlError("error: the lab stand-in needs a kubectl command, for example: k3s kubectl get --raw /readyz")
    client_only = positional[0] == "version" and flags.get("client")
    if not client_only:
        check_kubeconfig(device)
    with device.locked():
        state = device.load_state()
        standin.refresh(device, state)
        device.save_state(state)
    command = positional[0]
    if command == "version":
        return kubectl_version(device, state, flags)
    require_api(device, state)
    context = Context(device, state, flags)
    if command == "get":
        return context.get(positional[1:])
    if command == "rollout" and len(positional) >= 2 and positional[1] == "restart":
        return context.rollout_restart(positional[2:])
    if command == "rollout" and len(positional) >= 2 and positional[1] == "status":
        return context.rollout_status(positional[2:])
    if command == "create" and len(positional) >= 3 and positional[1] == "token":
        return context.create_token(positional[2])
    raise KubectlError(f"error: the lab stand-in does not support 'kubectl {' '.join(positional)}'")


def check_kubeconfig(device):
    """Fail the way k3s kubectl does when the kubeconfig is missing or unreadable."""
    path = device.path(standin.KUBECONFIG)
    if not os.path.exists(path):
        raise KubectlError("The connection to the server localhost:8080 was refused - did you specify the right host or port?")
    if not os.access(path, os.R_OK):
        raise KubectlError(
            f"WARN[0000] Unable to read {standin.KUBECONFIG}, please start server with --write-kubeconfig-mode "
            "or --write-kubeconfig-group to modify kube config permissions\n"
            f"error: error loading config file \"{standin.KUBECONFIG}\": open {standin.KUBECONFIG}: permission denied"
        )


def require_api(device, state):
    if not standin.api_is_up(device, state):
        raise KubectlError("The connection to the server 127.0.0.1:6443 was refused - did you specify the right host or port?")


def kubectl_version(device, state, flags):
    print(f"Client Version: {model.K3S_VERSION}")
    print("Kustomize Version: v5.4.2")
    if flags.get("client"):
        return 0
    require_api(device, state)
    print(f"Server Version: {model.K3S_VERSION}")
    return 0


def rfc3339(timestamp):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def human_age(seconds):
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3 * 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def stable_uuid(*parts):
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(str(part) for part in parts)))


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Context:
    """One kubectl request against the device's cluster model."""

    def __init__(self, device, state, flags):
        self.device = device
        self.state = state
        self.flags = flags
        self.cluster = device.cluster()
        self.evaluation = state["units"][model.SERVER_UNIT]["evaluation"]
        self.now = time.time()
        self.created = state.get("created_at") or self.evaluation["started_at"]

    @property
    def namespace(self):
        return self.flags.get("namespace", "default")

    @property
    def signing_issuer(self):
        return self.evaluation["signing_issuer"]

    @property
    def key_id(self):
        return b64url(hashlib.sha256(self.cluster.get("hostname", "node").encode()).digest())

    # -- get ---------------------------------------------------------------

    def get(self, args):
        if "raw" in self.flags:
            return self.get_raw(self.flags["raw"])
        if not args:
            raise KubectlError("error: You must specify the type of resource to get. Use \"kubectl api-resources\" for a complete list of supported resources.")
        kind_text, names = args[0], args[1:]
        if "/" in kind_text:
            kind_text, name = kind_text.split("/", 1)
            names = [name] + names
        kind = RESOURCE_ALIASES.get(kind_text)
        if kind is None:
            raise KubectlError(f'error: the server doesn\'t have a resource type "{kind_text}"')
        if kind == "secretsyncs" and not self.cluster.get("secret_store", True):
            raise KubectlError(f'error: the server doesn\'t have a resource type "{kind_text}"')
        objects = self.list_objects(kind)
        namespaced = kind in ("deployments", "secretsyncs")
        all_namespaces = self.flags.get("all-namespaces")
        if namespaced and not all_namespaces:
            objects = [item for item in objects if item["metadata"]["namespace"] == self.namespace]
        if names:
            by_name = {item["metadata"]["name"]: item for item in objects}
            missing = [name for name in names if name not in by_name]
            if missing:
                group = {"deployments": "deployments.apps", "secretsyncs": "secretsyncs.secret-sync.x-k8s.io"}.get(kind, kind)
                raise KubectlError(f'Error from server (NotFound): {group} "{missing[0]}" not found')
            objects = [by_name[name] for name in names]
        return self.print_objects(kind, objects, single=len(names) == 1)

    def get_raw(self, path):
        if path in ("/readyz", "/livez", "/healthz"):
            sys.stdout.write("ok")
            return 0
        if path == "/version":
            print(json.dumps({"major": "1", "minor": "31", "gitVersion": model.K3S_VERSION, "platform": "linux/amd64"}, indent=2))
            return 0
        issuer = self.signing_issuer or ""
        if not issuer.startswith("https://"):
            # kube-apiserver serves OIDC discovery only for https issuers.
            raise KubectlError("Error from server (NotFound): the server could not find the requested resource")
        if path == "/.well-known/openid-configuration":
            document = {
                "issuer": issuer,
                "jwks_uri": self.jwks_uri(),
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
            sys.stdout.write(json.dumps(document, separators=(",", ":")))
            return 0
        if path == "/openid/v1/jwks":
            modulus = b64url(hashlib.sha512(self.key_id.encode()).digest() * 4)
            keys = {"keys": [{"use": "sig", "kty": "RSA", "kid": self.key_id, "alg": "RS256", "n": modulus, "e": "AQAB"}]}
            sys.stdout.write(json.dumps(keys, separators=(",", ":")))
            return 0
        raise KubectlError("Error from server (NotFound): the server could not find the requested resource")

    def jwks_uri(self):
        for arg in self.evaluation["apiserver_args"]:
            if arg.startswith("--service-account-jwks-uri="):
                return arg.split("=", 1)[1]
        return f"https://{self.cluster.get('node_ip', '127.0.0.1')}:6443/openid/v1/jwks"

    def list_objects(self, kind):
        if kind == "deployments":
            return [self.deployment_object(item) for item in self.cluster.get("deployments", [])]
        if kind == "secretsyncs":
            return [self.secretsync_object(item) for item in self.cluster.get("secretsyncs", [])]
        if kind == "namespaces":
            return [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "uid": stable_uuid("ns", name),
                 "creationTimestamp": rfc3339(self.created)}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}
                for name in self.cluster.get("namespaces", ["default"])
            ]
        hostname = self.cluster.get("hostname", "node")
        labels = {"node-role.kubernetes.io/control-plane": "true", "node-role.kubernetes.io/master": "true"}
        conditions = [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]
        if self.embedded_etcd():
            labels["node-role.kubernetes.io/etcd"] = "true"
            conditions.append(self.etcd_voter_condition())
        return [{
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": hostname, "uid": stable_uuid("node", hostname), "creationTimestamp": rfc3339(self.created),
                         "labels": labels},
            "status": {"conditions": conditions, "nodeInfo": {"kubeletVersion": model.K3S_VERSION}},
        }]

    def embedded_etcd(self):
        """Return whether the server runs embedded etcd: started with cluster-init or joining a server."""
        return any(arg == "--cluster-init" or arg.startswith(("--cluster-init=", "--server="))
                   for arg in self.evaluation.get("k3s_args", []))

    def etcd_voter_condition(self):
        """EtcdIsVoter as K3s sets it; the fault etcd_voter_after_seconds delays it after a start."""
        delay = float(self.device.faults().get("etcd_voter_after_seconds") or 0)
        voting = self.now - self.evaluation["started_at"] >= delay
        return {"type": "EtcdIsVoter", "status": "True" if voting else "False",
                "reason": "MemberIsVoter" if voting else "MemberIsLearner",
                "message": "Node is a voting member of the etcd cluster" if voting
                else "Node is a learner member of the etcd cluster"}

    def deployment_object(self, item):
        key = f"{item['namespace']}/{item['name']}"
        record = self.state["deployments"].get(key, {})
        restarted = record.get("restarted_at")
        generation = 1 + int(record.get("restart_count", 0))
        template_annotations = {"kubectl.kubernetes.io/restartedAt": rfc3339(restarted)} if restarted else {}
        replicas = int(item.get("replicas", 1))
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": item["name"], "namespace": item["namespace"], "uid": stable_uuid("deployment", key),
                "generation": generation, "creationTimestamp": rfc3339(record.get("created_at") or self.created),
                "labels": {"app.kubernetes.io/name": item["name"]},
            },
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app.kubernetes.io/name": item["name"]}},
                "template": {
                    "metadata": {"annotations": template_annotations, "labels": {"app.kubernetes.io/name": item["name"]}},
                    "spec": {"serviceAccountName": item.get("service_account", item["name"]),
                             "containers": [{"name": "manager", "image": item.get("image", "registry.example/lab/" + item["name"] + ":1.0")}]},
                },
            },
            "status": {"observedGeneration": generation, "replicas": replicas, "readyReplicas": replicas,
                       "updatedReplicas": replicas, "availableReplicas": replicas},
        }

    def secretsync_object(self, item):
        key = f"{item['namespace']}/{item['name']}"
        controller = item.get("controller", f"{SECRET_STORE_NAMESPACE}/{SECRET_SYNC_CONTROLLER}")
        record = self.state["deployments"].get(controller, {})
        token_issuer = record.get("token_issuer")
        arc_issuer = self.cluster.get("arc_issuer")
        synced = bool(token_issuer and arc_issuer and token_issuer == arc_issuer)
        changed = rfc3339(record.get("restarted_at") or record.get("created_at") or self.created)

        status = {"conditions": self.secretsync_conditions(item, token_issuer, synced, synced or record.get("synced_once", False), changed)}
        if synced:
            status["lastSuccessfulSyncTime"] = changed
            status["syncHash"] = hashlib.sha256(f"{key}/{token_issuer}".encode()).hexdigest()[:32]
        return {
            "apiVersion": SECRET_SYNC_API_VERSION,
            "kind": "SecretSync",
            "metadata": {"name": item["name"], "namespace": item["namespace"], "uid": stable_uuid("secretsync", key),
                         "generation": 1, "creationTimestamp": rfc3339(self.created)},
            "spec": {
                "secretProviderClassName": item.get("secret_provider_class", item["name"]),
                "serviceAccountName": item.get("service_account", "default"),
                "secretObject": {"type": "Opaque", "data": [{"sourcePath": item.get("source_path", "app-secret"),
                                                             "targetKey": item.get("target_key", "value")}]},
            },
            "status": status,
        }

    def secretsync_conditions(self, item, token_issuer, synced, ever_synced, changed):
        """Return the Create and Update conditions (secrets-store-sync-controller condition types)."""
        conditions = []
        if ever_synced:
            conditions.append({"type": "Create", "status": "True", "reason": "CreateSucceeded",
                               "message": "Secret created successfully.", "lastTransitionTime": changed, "observedGeneration": 1})
        if synced:
            conditions.append({"type": "Update", "status": "True", "reason": "UpdateValueChangeOrForceUpdateSucceeded",
                               "message": "The secret was updated successfully: a value change or a force update was detected.",
                               "lastTransitionTime": changed, "observedGeneration": 1})
            return conditions
        # Until the first success the secret was never created, so Create carries the failure.
        conditions.append({"type": "Update" if ever_synced else "Create", "status": "False", "reason": "ControllerSyncFailed",
                           "message": self.sync_failure_message(item, token_issuer),
                           "lastTransitionTime": changed, "observedGeneration": 1})
        return conditions

    def sync_failure_message(self, item, token_issuer):
        trace = stable_uuid("trace", item["namespace"], item["name"], token_issuer)
        correlation = stable_uuid("correlation", item["namespace"], item["name"], token_issuer)
        return (
            "Secret update failed due to an error in the secret sync controller: failed to get an access token for "
            f"service account {item['namespace']}/{item.get('service_account', 'default')}: "
            "AADSTS700211: No matching federated identity record found for presented assertion issuer "
            f"'{token_issuer}'. Please check your federated identity credential Subject, Audience and Issuer "
            "against the presented assertion. https://learn.microsoft.com/entra/workload-id/workload-identity-federation "
            f"Trace ID: {trace} Correlation ID: {correlation}"
        )

    def print_objects(self, kind, objects, single):
        output = self.flags.get("output", "")
        if output == "json":
            document = objects[0] if single else {"apiVersion": "v1", "items": objects, "kind": "List", "metadata": {"resourceVersion": ""}}
            print(json.dumps(document, indent=4))
            return 0
        if output == "yaml":
            document = objects[0] if single else {"apiVersion": "v1", "items": objects, "kind": "List", "metadata": {"resourceVersion": ""}}
            sys.stdout.write(yaml.safe_dump(document, sort_keys=True))
            return 0
        if output == "name":
            for item in objects:
                print(f"{NAME_PREFIXES[kind]}/{item['metadata']['name']}")
            return 0
        if output:
            raise KubectlError(f'error: unable to match a printer suitable for the output format "{output}", allowed formats are: json,name,yaml')
        if not objects:
            where = "" if kind in ("namespaces", "nodes") or self.flags.get("all-namespaces") else f" in {self.namespace} namespace"
            print(f"No resources found{where}.", file=sys.stderr)
            return 0
        print_table(self.table_rows(kind, objects))
        return 0

    def table_rows(self, kind, objects):
        with_namespace = self.flags.get("all-namespaces") and kind in ("deployments", "secretsyncs")
        rows = []
        for item in objects:
            meta = item["metadata"]
            age = human_age(self.now - calendar.timegm(time.strptime(meta["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")))
            if kind == "deployments":
                replicas = item["spec"]["replicas"]
                row = {"NAME": meta["name"], "READY": f"{replicas}/{replicas}", "UP-TO-DATE": str(replicas),
                       "AVAILABLE": str(replicas), "AGE": age}
            elif kind == "secretsyncs":
                row = {"NAME": meta["name"], "AGE": age}
            elif kind == "namespaces":
                row = {"NAME": meta["name"], "STATUS": "Active", "AGE": age}
            else:
                row = {"NAME": meta["name"], "STATUS": "Ready", "ROLES": "control-plane,master", "AGE": age,
                       "VERSION": model.K3S_VERSION}
            if with_namespace:
                row = {"NAMESPACE": meta["namespace"], **row}
            rows.append(row)
        return rows

    # -- rollout -----------------------------------------------------------

    def deployment_names(self, args):
        """Return the names in 'deployment NAME...' or 'deployment/NAME...' arguments."""
        names = []
        for index, arg in enumerate(args):
            kind, slash, name = arg.partition("/")
            if slash or index == 0:
                if RESOURCE_ALIASES.get(kind) != "deployments":
                    raise KubectlError(f"error: the lab stand-in supports rollout only for deployments, not {arg!r}")
                if name:
                    names.append(name)
            else:
                names.append(arg)
        if not args:
            raise KubectlError("error: required resource not specified")
        return names

    def rollout_restart(self, args):
        if not self.device.is_root:
            raise KubectlError("error: the lab stand-in records rollouts only when kubectl runs as root")
        names = self.deployment_names(args)
        existing = {item["name"] for item in self.cluster.get("deployments", []) if item["namespace"] == self.namespace}
        if not names:
            names = sorted(existing)
            if not names:
                raise KubectlError("error: no objects passed to restart")
        for name in names:
            if name not in existing:
                raise KubectlError(f'Error from server (NotFound): deployments.apps "{name}" not found')
        with self.device.locked():
            state = self.device.load_state()
            for name in names:
                key = f"{self.namespace}/{name}"
                record = state["deployments"].setdefault(key, {"created_at": self.now})
                record["restarted_at"] = self.now
                record["restart_count"] = int(record.get("restart_count", 0)) + 1
                record["token_issuer"] = self.signing_issuer
                if self.signing_issuer and self.signing_issuer == self.cluster.get("arc_issuer"):
                    record["synced_once"] = True
                standin.append_line(self.device.standin("rollouts.log"), {
                    "time": self.now, "namespace": self.namespace, "deployment": name, "token_issuer": self.signing_issuer,
                })
            self.device.save_state(state)
        for name in names:
            print(f"deployment.apps/{name} restarted")
        return 0

    def rollout_status(self, args):
        names = self.deployment_names(args)
        if len(names) != 1:
            raise KubectlError("error: rollout status needs exactly one deployment, for example deployment/NAME")
        if "timeout" in self.flags:
            try:
                model.parse_go_duration(self.flags["timeout"])
            except ValueError as error:
                raise KubectlError(f'error: invalid argument "{self.flags["timeout"]}" for "--timeout" flag: {error}') from None
        existing = {item["name"] for item in self.cluster.get("deployments", []) if item["namespace"] == self.namespace}
        if names[0] not in existing:
            raise KubectlError(f'Error from server (NotFound): deployments.apps "{names[0]}" not found')
        print(f'deployment "{names[0]}" successfully rolled out')
        return 0

    # -- create token --------------------------------------------------------

    def create_token(self, service_account):
        known = {f"{namespace}/default" for namespace in self.cluster.get("namespaces", ["default"])}
        known.update(self.cluster.get("service_accounts", []))
        if f"{self.namespace}/{service_account}" not in known:
            raise KubectlError(f'error: failed to create token: serviceaccounts "{service_account}" not found')

        seconds = DEFAULT_TOKEN_SECONDS
        if "duration" in self.flags:
            try:
                seconds = int(model.parse_go_duration(self.flags["duration"])) or DEFAULT_TOKEN_SECONDS
            except ValueError as error:
                raise KubectlError(f'error: invalid argument "{self.flags["duration"]}" for "--duration" flag: {error}') from None
        if seconds < MIN_TOKEN_SECONDS:
            raise KubectlError(
                f'error: failed to create token: TokenRequest.authentication.k8s.io "{service_account}" is invalid: '
                f"spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration less than 10 minutes"
            )
        # kube-apiserver caps token requests at --service-account-max-token-expiration.
        maximum = self.evaluation.get("max_token_expiration_seconds") or 0
        if maximum and seconds > maximum:
            seconds = int(maximum)

        audiences = self.flags["audience"] or self.evaluation.get("api_audiences") or []
        now = int(self.now)
        header = {"alg": "RS256", "kid": self.key_id}
        payload = {
            "aud": audiences,
            "exp": now + seconds,
            "iat": now,
            # The fault token_issuer models a kubeconfig that reaches another API server (an
            # HA peer behind a load balancer) that signs with a different issuer.
            "iss": self.device.faults().get("token_issuer") or self.signing_issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {"namespace": self.namespace,
                              "serviceaccount": {"name": service_account, "uid": stable_uuid("sa", self.namespace, service_account)}},
            "nbf": now,
            "sub": f"system:serviceaccount:{self.namespace}:{service_account}",
        }
        # The signature is random-looking bytes: nothing in the lab verifies it.
        signature = hashlib.sha512(json.dumps(payload, sort_keys=True).encode()).digest() * 4
        token = ".".join(b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, payload))
        print(token + "." + b64url(signature))
        return 0


def print_table(rows):
    columns = list(rows[0])
    widths = {column: max(len(column), *(len(row[column]) for row in rows)) for column in columns}
    print("   ".join(column.ljust(widths[column]) for column in columns).rstrip())
    for row in rows:
        print("   ".join(row[column].ljust(widths[column]) for column in columns).rstrip())
