"""Model of how K3s turns a systemd unit and its config files into flags.

The functions here only read files under a device root and return the
effective K3s flags, the kube-apiserver arguments and the validation result.
``k3s_standin`` uses them on every start attempt. The behaviour follows the
K3s and Kubernetes sources:

* systemd unit files: ``ExecStart=`` with backslash continuations, drop-ins
  in ``<unit>.d/*.conf``, ``Environment=`` and ``EnvironmentFile=`` (a leading
  ``-`` makes the file optional), specifiers ``%N``, ``%n`` and ``%%``.
* config files (k3s pkg/configfilearg/parser.go and defaultparser.go): the
  config path comes from ``$K3S_CONFIG_FILE`` first, then ``--config``/``-c``,
  then ``/etc/rancher/k3s/config.yaml``. Drop-ins are the regular files in
  ``<config>.d/`` ending in ``.yaml``/``.yml`` (case-insensitive), in byte
  order of their names, loaded after the main file. A ``key+`` appends to an
  earlier value of ``key``, anything else replaces it. The resulting
  ``--key=value`` arguments go right after the ``server``/``agent``
  subcommand, so ExecStart flags come later. ``k3s server`` drops keys it does
  not know with a warning, ``k3s agent`` does not and fails on them.
* kube-apiserver arguments (k3s pkg/util/args.go ``GetArgs``): defaults, then
  each ``kube-apiserver-arg`` item, with ``key+=`` appending to and ``key-=``
  prepending to the default, output sorted by key.
* kube-apiserver validation (kubernetes pkg/kubeapiserver/options
  authentication.go, and the options Complete step for the token expiration):
  duplicate, empty or malformed ``service-account-issuer`` values,
  ``service-account-max-token-expiration`` outside [1h, 2^32 s], unknown
  flags (pflag) and unparsable flag values.
"""

import decimal
import math
import os
import re
import shlex
from dataclasses import dataclass, field

import yaml

K3S_VERSION = "v1.31.4+k3s1"
K3S_COMMIT = "a562d090"
DEFAULT_CONFIG = "/etc/rancher/k3s/config.yaml"
DEFAULT_DATA_DIR = "/var/lib/rancher/k3s"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
# The installer names the unit k3s.service for servers and k3s-agent.service
# for agents.
SERVER_UNIT = "k3s.service"
AGENT_UNIT = "k3s-agent.service"

# ---------------------------------------------------------------------------
# K3s CLI flags (k3s pkg/cli/cmds). The stand-in accepts only the flags listed
# here. Flags in SLICE_FLAGS accumulate when repeated and BOOL_FLAGS take no
# value. Every other flag keeps its last value.

COMMON_FLAGS = {
    "config", "c", "debug", "v", "vmodule", "log", "l", "alsologtostderr",
    "data-dir", "d", "node-name", "with-node-id", "node-label", "node-taint",
    "image-credential-provider-bin-dir", "image-credential-provider-config",
    "docker", "container-runtime-endpoint", "default-runtime", "disable-default-registry-endpoint",
    "pause-image", "snapshotter", "private-registry", "system-default-registry",
    "node-ip", "i", "node-external-ip", "node-internal-dns", "node-external-dns",
    "resolv-conf", "flannel-iface", "flannel-conf", "flannel-cni-conf",
    "kubelet-arg", "kube-proxy-arg", "protect-kernel-defaults", "secrets-encryption-provider",
    "selinux", "lb-server-port", "rootless", "prefer-bundled-bin",
    "airgap-extra-registry", "token", "t", "token-file", "server", "s",
    "vpn-auth", "vpn-auth-file", "enable-pprof", "bind-address",
}

SERVER_ONLY_FLAGS = {
    "advertise-address", "advertise-port", "https-listen-port", "supervisor-port",
    "apiserver-port", "apiserver-bind-address", "tls-san", "tls-san-security",
    "cluster-cidr", "service-cidr", "service-node-port-range", "cluster-dns",
    "cluster-domain", "flannel-backend", "flannel-ipv6-masq", "flannel-external-ip",
    "egress-selector-mode", "servicelb-namespace", "write-kubeconfig", "o",
    "write-kubeconfig-mode", "write-kubeconfig-group", "helm-job-image",
    "agent-token", "agent-token-file", "cluster-init", "cluster-reset",
    "cluster-reset-restore-path", "kube-apiserver-arg", "etcd-arg",
    "kube-controller-manager-arg", "kube-scheduler-arg",
    "kube-cloud-controller-manager-arg", "datastore-endpoint", "datastore-cafile",
    "datastore-certfile", "datastore-keyfile", "kine-tls", "etcd-expose-metrics",
    "etcd-disable-snapshots", "etcd-snapshot-name", "etcd-snapshot-schedule-cron",
    "etcd-snapshot-retention", "etcd-snapshot-dir", "etcd-snapshot-compress",
    "etcd-s3", "etcd-s3-endpoint", "etcd-s3-bucket", "etcd-s3-region",
    "etcd-s3-folder", "etcd-s3-access-key", "etcd-s3-secret-key",
    "etcd-s3-insecure", "etcd-s3-skip-ssl-verify", "etcd-s3-timeout",
    "default-local-storage-path", "disable", "disable-scheduler",
    "disable-cloud-controller", "disable-kube-proxy", "disable-network-policy",
    "disable-helm-controller", "disable-apiserver", "disable-controller-manager",
    "disable-etcd", "disable-agent", "embedded-registry", "supervisor-metrics",
    "secrets-encryption", "enable-pprof", "system-default-registry",
}

AGENT_FLAGS = COMMON_FLAGS
SERVER_FLAGS = COMMON_FLAGS | SERVER_ONLY_FLAGS

SLICE_FLAGS = {
    "tls-san", "kube-apiserver-arg", "kube-controller-manager-arg",
    "kube-scheduler-arg", "kube-cloud-controller-manager-arg", "etcd-arg",
    "kubelet-arg", "kube-proxy-arg", "node-label", "node-taint", "disable",
    "cluster-cidr", "service-cidr", "cluster-dns", "node-ip", "i",
    "node-external-ip", "airgap-extra-registry", "node-internal-dns",
    "node-external-dns",
}

BOOL_FLAGS = {
    "debug", "alsologtostderr", "with-node-id", "docker", "protect-kernel-defaults",
    "selinux", "rootless", "prefer-bundled-bin", "flannel-ipv6-masq",
    "flannel-external-ip", "cluster-init", "cluster-reset", "kine-tls",
    "etcd-expose-metrics", "etcd-disable-snapshots", "etcd-snapshot-compress",
    "etcd-s3", "etcd-s3-insecure", "etcd-s3-skip-ssl-verify", "disable-scheduler",
    "disable-cloud-controller", "disable-kube-proxy", "disable-network-policy",
    "disable-helm-controller", "disable-apiserver", "disable-controller-manager",
    "disable-etcd", "disable-agent", "embedded-registry", "supervisor-metrics",
    "secrets-encryption", "enable-pprof", "disable-default-registry-endpoint",
}

# Environment variables bound to flags (urfave/cli EnvVar). A flag given on
# the command line or in the config wins over its variable.
FLAG_ENV_VARS = {
    "token": "K3S_TOKEN",
    "token-file": "K3S_TOKEN_FILE",
    "server": "K3S_URL",
    "write-kubeconfig-mode": "K3S_KUBECONFIG_MODE",
    "write-kubeconfig-group": "K3S_KUBECONFIG_GROUP",
    "node-name": "K3S_NODE_NAME",
    "data-dir": "K3S_DATA_DIR",
    "cluster-init": "K3S_CLUSTER_INIT",
    "selinux": "K3S_SELINUX",
}

# ---------------------------------------------------------------------------
# kube-apiserver flags (kubernetes cmd/kube-apiserver, v1.31). A flag not in
# APISERVER_FLAGS makes kube-apiserver exit with "unknown flag".

APISERVER_BOOL_FLAGS = {
    "allow-privileged", "anonymous-auth", "profiling", "enable-aggregator-routing",
    "enable-bootstrap-token-auth", "service-account-lookup",
    "service-account-extend-token-expiration", "watch-cache",
    "enable-priority-and-fairness", "enable-garbage-collector",
    "permit-port-sharing", "permit-address-sharing",
    "encryption-provider-config-automatic-reload", "audit-log-compress",
    "contention-profiling", "enable-logs-handler", "strict-transport-security-directives",
}

APISERVER_DURATION_FLAGS = {
    "service-account-max-token-expiration", "event-ttl", "request-timeout",
    "shutdown-delay-duration", "kubelet-timeout", "audit-log-batch-max-wait",
    "audit-webhook-initial-backoff", "livez-grace-period",
}

APISERVER_FLAGS = APISERVER_BOOL_FLAGS | APISERVER_DURATION_FLAGS | {
    "admission-control-config-file", "advertise-address", "advertise-port",
    "aggregator-reject-forwarding-redirect", "api-audiences", "audit-log-format",
    "audit-log-maxage", "audit-log-maxbackup", "audit-log-maxsize", "audit-log-mode",
    "audit-log-path", "audit-policy-file", "audit-webhook-config-file",
    "audit-webhook-mode", "authentication-config", "authentication-token-webhook-config-file",
    "authorization-config", "authorization-mode", "authorization-webhook-config-file",
    "bind-address", "cert-dir", "client-ca-file", "cloud-provider", "cors-allowed-origins",
    "default-not-ready-toleration-seconds", "default-unreachable-toleration-seconds",
    "delete-collection-workers", "disable-admission-plugins", "egress-selector-config-file",
    "enable-admission-plugins", "encryption-provider-config", "endpoint-reconciler-type",
    "etcd-cafile", "etcd-certfile", "etcd-keyfile", "etcd-prefix", "etcd-servers",
    "etcd-servers-overrides", "external-hostname", "feature-gates", "goaway-chance",
    "http2-max-streams-per-connection", "kubelet-certificate-authority",
    "kubelet-client-certificate", "kubelet-client-key", "kubelet-preferred-address-types",
    "log-flush-frequency", "logging-format", "max-connection-bytes-per-sec",
    "max-mutating-requests-inflight", "max-requests-inflight", "min-request-timeout",
    "oidc-ca-file", "oidc-client-id", "oidc-groups-claim", "oidc-groups-prefix",
    "oidc-issuer-url", "oidc-required-claim", "oidc-signing-algs", "oidc-username-claim",
    "oidc-username-prefix", "proxy-client-cert-file", "proxy-client-key-file",
    "requestheader-allowed-names", "requestheader-client-ca-file",
    "requestheader-extra-headers-prefix", "requestheader-group-headers",
    "requestheader-username-headers", "runtime-config", "secure-port",
    "service-account-issuer", "service-account-jwks-uri", "service-account-key-file",
    "service-account-signing-endpoint", "service-account-signing-key-file",
    "service-cluster-ip-range", "service-node-port-range", "storage-backend",
    "storage-media-type", "tls-cert-file", "tls-cipher-suites", "tls-min-version",
    "tls-private-key-file", "tls-sni-cert-key", "token-auth-file", "v", "vmodule",
    "watch-cache-sizes",
}

# Flags that accumulate repeated values unchanged (pflag StringArray).
APISERVER_ARRAY_FLAGS = {"service-account-issuer"}


class StartError(Exception):
    """A start attempt that fails, with the journal lines K3s writes."""

    def __init__(self, message, journal=()):
        super().__init__(message)
        self.journal = list(journal)


@dataclass
class Unit:
    """A systemd service unit as loaded by daemon-reload."""

    name: str
    exec_start: list = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    environment_files: list = field(default_factory=list)
    description: str = ""
    sources: dict = field(default_factory=dict)


@dataclass
class Evaluation:
    """The outcome of a successful start attempt."""

    command: str
    k3s_args: list
    warnings: list
    settings: dict
    apiserver_args: list = field(default_factory=list)
    issuers: list = field(default_factory=list)
    api_audiences: list = field(default_factory=list)
    max_token_expiration_seconds: float = 0.0

    @property
    def signing_issuer(self):
        return self.issuers[0] if self.issuers else None


def device_path(root, path):
    """Map an absolute path inside the device to the path seen by this process."""
    if not os.path.isabs(path):
        path = "/" + path
    return os.path.join(root, path.lstrip("/")) if root != "/" else path


# ---------------------------------------------------------------------------
# systemd unit files


def unit_file_paths(root, unit_name):
    """Return the unit file and its drop-ins in the order systemd applies them."""
    base = device_path(root, f"/etc/systemd/system/{unit_name}")
    paths = [base] if os.path.isfile(base) else []
    dropin_dir = base + ".d"
    if os.path.isdir(dropin_dir):
        paths += [
            os.path.join(dropin_dir, name)
            for name in sorted(os.listdir(dropin_dir))
            if name.endswith(".conf")
        ]
    return paths


def read_unit_sources(root, unit_name):
    """Return {device path: text} for the unit file and its drop-ins."""
    sources = {}
    for path in unit_file_paths(root, unit_name):
        with open(path, encoding="utf-8") as handle:
            inside_path = "/" + os.path.relpath(path, root) if root != "/" else path
            sources[inside_path] = handle.read()
    return sources


def expand_specifiers(value, unit_name):
    stem = unit_name.rsplit(".", 1)[0]
    return re.sub(r"%([%nN])", lambda m: {"%": "%", "n": unit_name, "N": stem}[m.group(1)], value)


def parse_unit(unit_name, sources):
    """Parse unit sources (from read_unit_sources) into a Unit.

    An empty assignment (``ExecStart=``) resets the list, as in systemd.
    """
    unit = Unit(name=unit_name, sources=dict(sources))
    for text in sources.values():
        for key, value in _unit_assignments(text):
            value = expand_specifiers(value, unit_name)
            if key == "ExecStart":
                if value == "":
                    unit.exec_start = []
                else:
                    unit.exec_start = shlex.split(value.lstrip("-@+!:"))
            elif key == "Environment":
                if value == "":
                    unit.environment = {}
                for item in shlex.split(value):
                    name, _, item_value = item.partition("=")
                    unit.environment[name] = item_value
            elif key == "EnvironmentFile":
                if value == "":
                    unit.environment_files = []
                else:
                    unit.environment_files.append(value)
            elif key == "Description":
                unit.description = value
    return unit


def _unit_assignments(text):
    """Yield (key, value) from the [Service] and [Unit] sections of a unit file."""
    lines = text.splitlines()
    index = 0
    section = None
    while index < len(lines):
        line = lines[index].strip()
        index += 1
        while line.endswith("\\") and index < len(lines):
            line = line[:-1] + " " + lines[index].strip()
            index += 1
        if line.endswith("\\"):
            line = line[:-1]
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section in ("Service", "Unit") and "=" in line:
            key, _, value = line.partition("=")
            yield key.strip(), value.strip()


def parse_environment_file(text):
    """Parse a systemd EnvironmentFile (KEY=VALUE lines, optional quotes)."""
    environment = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        environment[key.strip()] = value
    return environment


def unit_environment(root, unit):
    """Return the environment variables that a start attempt of the unit runs with."""
    environment = {}
    for entry in unit.environment_files:
        optional = entry.startswith("-")
        path = entry.lstrip("-")
        try:
            with open(device_path(root, path), encoding="utf-8") as handle:
                environment.update(parse_environment_file(handle.read()))
        except FileNotFoundError:
            if not optional:
                raise StartError(
                    f"Failed to load environment files: {path}",
                    [("systemd", f"{unit.name}: Failed to load environment files: No such file or directory")],
                )
    environment.update(unit.environment)
    return environment


# ---------------------------------------------------------------------------
# K3s config files (k3s pkg/configfilearg/parser.go)


class GoYamlLoader(yaml.SafeLoader):
    """A YAML 1.1 loader that resolves scalars the way Go gopkg.in/yaml.v2 does.

    yaml.v2 keeps timestamps as strings when decoding into interface{}, and it
    also reads y/Y/n/N as booleans.
    """


GoYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
GoYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN")
)
GoYamlLoader.add_constructor(
    "tag:yaml.org,2002:bool",
    lambda loader, node: loader.construct_scalar(node) in
    ("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"),
)


def go_string(value):
    """Convert a decoded YAML value to a string like wrangler convert.ToString."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, list):
        return go_string(value[0]) if value else ""
    if isinstance(value, dict):
        return "map[" + " ".join(f"{go_string(k)}:{go_string(v)}" for k, v in value.items()) + "]"
    return str(value)


def go_float(value):
    """Format a float like Go's fmt %v (strconv 'g' with the shortest digits)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    # repr() gives the shortest digits that round-trip, as Go's strconv does.
    number = decimal.Decimal(repr(abs(value))).normalize()
    digits = "".join(str(digit) for digit in number.as_tuple().digits)
    exponent = len(digits) + number.as_tuple().exponent - 1
    # strconv uses %e when the exponent is < -4 or >= 6 for the shortest form.
    if exponent < -4 or exponent >= 6:
        body = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{body}e{'+' if exponent >= 0 else '-'}{abs(exponent):02d}"
    return sign + format(number, "f")


def to_slice(value):
    """Return the list form of a config value for ``key+`` appends (parser.go toSlice)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    text = go_string(value).strip()
    return [text] if text else []


def load_config_pairs(text):
    """Decode one config file into an ordered list of (key, value) pairs.

    Duplicate keys are kept in order, as with Go yaml.MapSlice.
    """
    try:
        node = yaml.compose(text, Loader=GoYamlLoader)
    except yaml.YAMLError as error:
        raise StartError(go_yaml_error(error)) from None
    if node is None:
        return []
    if not isinstance(node, yaml.MappingNode):
        kind = {"tag:yaml.org,2002:seq": "!!seq", "tag:yaml.org,2002:str": "!!str"}.get(node.tag, node.tag)
        raise StartError(
            f"yaml: unmarshal errors:\n  line {node.start_mark.line + 1}: cannot unmarshal {kind} into yaml.MapSlice"
        )
    loader = GoYamlLoader("")
    pairs = []
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        value = loader.construct_object(value_node, deep=True)
        pairs.append((go_string(key), value))
    return pairs


def go_yaml_error(error):
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is not None:
        return f"yaml: line {mark.line + 1}: {problem}"
    return f"yaml: {problem}"


def config_file_path(args, environment):
    """Return the config path K3s uses (parser.go findConfigFileFlag)."""
    if environment.get("K3S_CONFIG_FILE"):
        return environment["K3S_CONFIG_FILE"]
    for index, arg in enumerate(args):
        for flag in ("--config", "-c"):
            if arg == flag:
                return args[index + 1] if index + 1 < len(args) else ""
            if arg.startswith(flag + "="):
                return arg[len(flag) + 1:]
    return DEFAULT_CONFIG


def config_dropins(root, config_path):
    directory = device_path(root, config_path + ".d")
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name.encode())
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise StartError(f"open {config_path}.d: not a directory") from None
    return [
        config_path + ".d/" + entry.name
        for entry in entries
        if not entry.is_dir(follow_symlinks=False)
        and entry.name.lower().endswith((".yaml", ".yml"))
    ]


def read_config_args(root, config_path):
    """Return (files read, --key=value args) for a config file and its drop-ins.

    Returns no args when neither the file nor any drop-in exists, because K3s
    treats a missing config as empty.
    """
    files = config_dropins(root, config_path)
    if os.path.exists(device_path(root, config_path)):
        files = [config_path] + files
    elif not files:
        return [], []
    values = {}
    key_order = []
    for path in files:
        try:
            with open(device_path(root, path), encoding="utf-8") as handle:
                text = handle.read()
        except IsADirectoryError:
            raise StartError(f"read {path}: is a directory") from None
        for key, value in load_config_pairs(text):
            is_append = key.endswith("+")
            key = key.removesuffix("+")
            if key not in values:
                key_order.append(key)
            if is_append and key in values:
                values[key] = to_slice(values[key]) + to_slice(value)
            else:
                values[key] = value
    args = []
    for key in key_order:
        prefix = "-" if len(key) == 1 else "--"
        value = values[key]
        if isinstance(value, list):
            args += [f"{prefix}{key}={go_string(item)}" for item in value]
        else:
            args.append(f"{prefix}{key}={go_string(value)}")
    return files, args


def strip_unknown_flags(args, known):
    """Drop config args that are not flags of the command (parser.go stripInvalidFlags)."""
    kept, warnings = [], []
    for arg in args:
        match = re.match(r"^-+([^=]*)=", arg)
        name = match.group(1) if match else arg
        if name in known:
            kept.append(arg)
        else:
            warnings.append(f"Unknown flag {arg.split('=')[0]} found in config.yaml, skipping")
    return kept, warnings


def parse_k3s_flags(command, args, environment):
    """Parse K3s subcommand flags the way urfave/cli (Go flag package) does.

    Returns {flag: value or list}. Unknown flags raise StartError.
    """
    known = SERVER_FLAGS if command == "server" else AGENT_FLAGS
    values = {}
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not arg.startswith("-") or arg in ("-", "--"):
            raise StartError(f"Incorrect Usage: unexpected argument {arg!r}")
        name, has_value, value = arg.lstrip("-").partition("=")
        if name not in known:
            raise StartError(f"Incorrect Usage: flag provided but not defined: -{name}")
        if name in BOOL_FLAGS:
            value = value if has_value else "true"
        elif not has_value:
            if index >= len(args):
                raise StartError(f"Incorrect Usage: flag needs an argument: -{name}")
            value = args[index]
            index += 1
        if name in SLICE_FLAGS:
            values.setdefault(name, []).append(value)
        else:
            values[name] = value
    for name, variable in FLAG_ENV_VARS.items():
        if name not in values and environment.get(variable) and name in known:
            values[name] = environment[variable]
    return values


# ---------------------------------------------------------------------------
# kube-apiserver arguments


def default_apiserver_args(settings):
    """Return the argument map K3s starts kube-apiserver with (pkg/daemons/control/server.go)."""
    data_dir = settings["data-dir"]
    domain = settings["cluster-domain"]
    tls = f"{data_dir}/server/tls"
    return {
        "advertise-address": settings["node-ip"],
        "advertise-port": "6443",
        "allow-privileged": "true",
        "anonymous-auth": "false",
        "api-audiences": f"https://kubernetes.default.svc.{domain},k3s",
        "authorization-mode": "Node,RBAC",
        "bind-address": "127.0.0.1",
        "cert-dir": f"{tls}/temporary-certs",
        "client-ca-file": f"{tls}/client-ca.crt",
        "egress-selector-config-file": f"{data_dir}/server/etc/egress-selector-config.yaml",
        "enable-admission-plugins": "NodeRestriction",
        "enable-aggregator-routing": "true",
        "etcd-servers": "unix://kine.sock",
        "kubelet-certificate-authority": f"{tls}/server-ca.crt",
        "kubelet-client-certificate": f"{tls}/client-kube-apiserver.crt",
        "kubelet-client-key": f"{tls}/client-kube-apiserver.key",
        "kubelet-preferred-address-types": "InternalIP,ExternalIP,Hostname",
        "profiling": "false",
        "proxy-client-cert-file": f"{tls}/client-auth-proxy.crt",
        "proxy-client-key-file": f"{tls}/client-auth-proxy.key",
        "requestheader-allowed-names": "system:auth-proxy",
        "requestheader-client-ca-file": f"{tls}/request-header-ca.crt",
        "requestheader-extra-headers-prefix": "X-Remote-Extra-",
        "requestheader-group-headers": "X-Remote-Group",
        "requestheader-username-headers": "X-Remote-User",
        "secure-port": "6444",
        "service-account-issuer": f"https://kubernetes.default.svc.{domain}",
        "service-account-key-file": f"{tls}/service.key",
        "service-account-signing-key-file": f"{tls}/service.current.key",
        "service-cluster-ip-range": "10.43.0.0/16",
        "service-node-port-range": "30000-32767",
        "storage-backend": "etcd3",
        "tls-cert-file": f"{tls}/serving-kube-apiserver.crt",
        "tls-private-key-file": f"{tls}/serving-kube-apiserver.key",
    }


def merge_apiserver_args(initial, extra_args):
    """Merge defaults with kube-apiserver-arg items (k3s pkg/util/args.go GetArgs)."""
    initial = dict(initial)
    multi = {}
    for item in extra_args:
        arg, has_value, value = item.removeprefix("--").partition("=")
        if not has_value:
            value = "true"
        cleaned = arg.rstrip("-+")
        existing = multi.get(cleaned, [])
        if arg.endswith("+"):
            values = ([initial[cleaned]] if cleaned in initial else []) + existing + [value]
        elif arg.endswith("-"):
            values = [value] + ([initial[cleaned]] if cleaned in initial else []) + existing
        else:
            values = existing + [value]
        initial.pop(cleaned, None)
        multi[cleaned] = values
    for arg, value in initial.items():
        multi[arg] = [value]
    return [f"--{arg.removeprefix('--')}={value}" for arg in sorted(multi) for value in multi[arg]]


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text):
    """Parse a Go time.ParseDuration string into seconds, raising ValueError like Go."""
    original = text
    if text in ("0", "+0", "-0"):
        return 0.0
    if text == "":
        raise ValueError(f'time: invalid duration "{original}"')
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    total = 0.0
    while text:
        number = re.match(r"(\d+(?:\.\d*)?|\.\d+)", text)
        if not number:
            raise ValueError(f'time: invalid duration "{original}"')
        text = text[number.end():]
        unit = re.match(r"[^\d.]+", text)
        if not unit:
            raise ValueError(f'time: missing unit in duration "{original}"')
        if unit.group(0) not in _DURATION_UNITS:
            raise ValueError(f'time: unknown unit "{unit.group(0)}" in duration "{original}"')
        total += float(number.group(1)) * _DURATION_UNITS[unit.group(0)]
        text = text[unit.end():]
    return sign * total


def _issuer_url_error(issuer):
    """Return why an issuer is not a valid URL, or None.

    NOTE: Go url.Parse accepts some of these characters in URL paths, so this
    is stricter than kube-apiserver: whitespace, quotes and commas always fail.
    """
    host = issuer.split("://", 1)[-1].split("/", 1)[0]
    for character in issuer:
        if character.isspace() or character in "\"'`," or ord(character) < 0x20:
            where = "host name" if character in host else "URL"
            return f'parse "{issuer}": invalid character "{character}" in {where}'
    return None


def validate_apiserver_args(apiserver_args, rejected_flags=()):
    """Validate kube-apiserver arguments and return the parsed values.

    Raises StartError with the lines kube-apiserver and K3s write when a value
    is invalid. Returns (issuers, api_audiences, max_token_expiration_seconds).
    """
    issuers, audiences, max_expiration = [], [], 0.0
    for arg in apiserver_args:
        name, _, value = arg.removeprefix("--").partition("=")
        if name not in APISERVER_FLAGS or name in rejected_flags:
            raise _apiserver_error(f"unknown flag: --{name}")
        if name in APISERVER_BOOL_FLAGS and value not in ("1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"):
            raise _apiserver_error(
                f'invalid argument "{value}" for "--{name}" flag: strconv.ParseBool: parsing "{value}": invalid syntax'
            )
        if name in APISERVER_DURATION_FLAGS:
            try:
                seconds = parse_go_duration(value)
            except ValueError as error:
                raise _apiserver_error(f'invalid argument "{value}" for "--{name}" flag: {error}') from None
            if name == "service-account-max-token-expiration":
                max_expiration = seconds
        if name in APISERVER_ARRAY_FLAGS:
            issuers.append(value)
        if name == "api-audiences":
            # api-audiences is a pflag StringSlice, so kube-apiserver splits it on commas.
            audiences += [item for item in value.split(",") if item]
    errors = []
    seen = set()
    for issuer in issuers:
        url_error = _issuer_url_error(issuer)
        if url_error and ":" in issuer:
            errors.append(f'service-account-issuer "{issuer}" contained a \':\' but was not a valid URL: {url_error}')
            continue
        if url_error:
            errors.append(f'service-account-issuer "{issuer}" is not a valid URL: {url_error}')
            continue
        if issuer == "":
            errors.append("service-account-issuer should not be an empty string")
            continue
        if issuer in seen:
            errors.append(f'service-account-issuer "{issuer}" is already specified')
            continue
        seen.add(issuer)
    if max_expiration and not 3600 <= max_expiration <= 2**32:
        errors.append("the service-account-max-token-expiration must be between 1 hour and 2^32 seconds")
    if errors:
        text = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
        raise StartError(
            f"apiserver exited: {text}",
            [("k3s", f"Error: {text}"), ("k3s", logrus_line("fatal", f"apiserver exited: {text}"))],
        )
    return issuers, audiences, max_expiration


def _apiserver_error(text):
    return StartError(
        f"apiserver exited: {text}",
        [("k3s", f"Error: {text}"), ("k3s", logrus_line("fatal", f"apiserver exited: {text}"))],
    )


def logrus_line(level, message):
    """Format a log line like K3s's logrus text formatter (the time is filled in later)."""
    escaped = message.replace("\\", "\\\\").replace('"', '\\"')
    return f'level={level} msg="{escaped}"'


# ---------------------------------------------------------------------------
# Whole start attempt


def evaluate_start(root, unit, node_ip, rejected_flags=()):
    """Compute what a start of ``unit`` does with the files as they are now.

    Returns an Evaluation, or raises StartError with the journal lines of the
    failed start.
    """
    environment = unit_environment(root, unit)
    if not unit.exec_start:
        raise StartError(
            f"{unit.name} has no ExecStart= setting",
            [("systemd", f"{unit.name}: Service has no ExecStart=, ExecStop=, or SuccessAction=. Refusing.")],
        )
    argv = unit.exec_start
    if len(argv) < 2 or argv[1] not in ("server", "agent"):
        raise StartError("ExecStart does not run k3s server or k3s agent")
    command = argv[1]
    config_path = config_file_path(argv[1:], environment)
    try:
        files, config_args = read_config_args(root, config_path) if config_path else ([], [])
    except StartError as error:
        raise StartError(str(error), [("k3s", logrus_line("fatal", str(error)))]) from None
    warnings = []
    if command == "server":
        config_args, warnings = strip_unknown_flags(config_args, SERVER_FLAGS)
    k3s_args = config_args + argv[2:]
    try:
        flags = parse_k3s_flags(command, k3s_args, environment)
    except StartError as error:
        raise StartError(
            str(error),
            [("k3s", str(error)), ("k3s", logrus_line("fatal", "Error: " + str(error).removeprefix("Incorrect Usage: ")))],
        ) from None
    settings = {
        "config-files": files,
        "data-dir": flags.get("data-dir", DEFAULT_DATA_DIR),
        "cluster-domain": flags.get("cluster-domain", DEFAULT_CLUSTER_DOMAIN),
        "node-ip": (flags.get("node-ip") or [node_ip])[0],
        "write-kubeconfig-mode": flags.get("write-kubeconfig-mode", ""),
        "write-kubeconfig-group": flags.get("write-kubeconfig-group", ""),
        "flags": flags,
    }
    evaluation = Evaluation(command=command, k3s_args=[argv[0], command] + k3s_args, warnings=warnings, settings=settings)
    if command == "agent":
        if not flags.get("server"):
            raise StartError("--server is required", [("k3s", logrus_line("fatal", "--server is required"))])
        if not (flags.get("token") or flags.get("token-file")):
            raise StartError("--token is required", [("k3s", logrus_line("fatal", "--token is required"))])
        return evaluation
    defaults = default_apiserver_args(settings)
    evaluation.apiserver_args = merge_apiserver_args(defaults, flags.get("kube-apiserver-arg", []))
    issuers, audiences, max_expiration = validate_apiserver_args(evaluation.apiserver_args, rejected_flags)
    evaluation.issuers = issuers
    evaluation.api_audiences = audiences
    evaluation.max_token_expiration_seconds = max_expiration
    return evaluation
