#!/usr/bin/python3
"""Start and stop an arcfleet test lab: SSH devices with a K3s stand-in plus an Azure emulator.

    lab.py spec --devices N [--clusters M] [--agents K] [--user-devices U] [--bastion] [--seed S]
    lab.py up --dir DIR --spec SPEC.json
    lab.py down --dir DIR

``up`` writes DIR/manifest.json and returns once every device's sshd accepts
TCP connections and the emulator responds. ``down`` stops every process the
lab started, removes the network namespaces it created, and can be run any
number of times. Both need root, because each device is a real sshd in its
own mount namespace. The spec and manifest formats are described in
tests/lab/README.md.
"""

import argparse
import base64
import contextlib
import csv
import grp
import hashlib
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import yaml

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, LAB_DIR)

import k3s_model  # noqa: E402
import k3s_standin  # noqa: E402

LAB_USER = "labuser"
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
STANDIN_CODE_DIR = "/var/lib/rancher/k3s/data/standin"
STANDIN_MODULES = ("k3s_standin.py", "k3s_model.py", "k3s_kubectl.py")
STANDIN_COMMANDS = ("k3s", "systemctl", "journalctl")
# Host paths that get a per-device directory bound over them inside the
# device's mount namespace. /root starts empty, so that a root login on a
# device does not run the host's shell start-up files (a ~/.bashrc that
# initialises pyenv costs about 0.6 s of CPU on every SSH command).
BIND_DIRECTORIES = (
    "/etc/rancher", "/var/lib/rancher", "/etc/systemd/system", "/usr/local/bin",
    "/etc/sudoers.d", "/etc/default", "/var/lib/arcfleet", "/home", "/root",
)
# Host paths that get a per-device file bound over them.
BIND_FILES = ("/etc/passwd", "/etc/shadow", "/etc/group", "/etc/hosts")
# Real systemctl and journalctl are shadowed too, for callers using absolute paths.
SHADOWED_BINARIES = ("/usr/bin/systemctl", "/usr/bin/journalctl")
# Bind mounts need existing mount points, so these are created on the host
# (empty) when missing. They are never removed, because removing a directory
# that is a mount point in another lab's namespace would detach that mount.
HOST_MOUNT_POINTS = ("/etc/rancher", "/var/lib/rancher", "/var/lib/arcfleet")
SSHD_START_ATTEMPTS = 5
READY_TIMEOUT_SECONDS = 60.0
FEDERATED_ISSUER = "https://oidc.arcfleet-lab.invalid/"
FEDERATED_SUBJECT = "system:serviceaccount:arcfleet:arcfleet"
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
# Bastion labs: network namespaces are named NETNS_PREFIX + index + "b" (bastion) or "d"
# (devices), and use 10.250.<index>.0/24. The host end of the veth pair to the bastion
# has .1/24, the bastion .2/25 towards the host and .129/25 towards the devices, which
# have .130 and up. The bastion does not forward, so only the bastion's own sshd reaches
# the devices, and packets for them from the host never leave the host's veth.
NETNS_PREFIX = "afl"
BASTION_SUBNET_PREFIX = "10.250"
FIRST_DEVICE_HOST = 130
MAX_BASTION_DEVICES = 254 - FIRST_DEVICE_HOST + 1


class LabError(Exception):
    """A lab setup failure with a message for the user."""


# ---------------------------------------------------------------------------
# Spec


def default_spec(devices, clusters=1, agents=0, user_devices=0, seed=None, bastion=False):
    """Return a spec with ``devices`` devices spread round-robin over ``clusters`` clusters.

    The last ``agents`` devices are agents and the first ``user_devices`` log in as labuser.
    With ``bastion``, the devices are reachable only through a bastion sshd.
    """
    if devices < 1 or clusters < 1:
        raise LabError("--devices and --clusters must be at least 1")
    if agents > devices or user_devices > devices:
        raise LabError("--agents and --user-devices cannot exceed --devices")
    rng = random.Random(seed)
    subscription = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    cluster_specs = []
    for index in range(clusters):
        site = _site_name(index)
        cluster_specs.append({
            "name": f"plant-{site}-line1",
            "subscription": subscription,
            "resource_group": f"rg-plant-{site}",
            "location": "eastus",
        })
    device_specs = []
    width = max(2, len(str(devices)))
    for index in range(devices):
        cluster = cluster_specs[index % clusters]
        device_specs.append({
            "name": f"edge-{index + 1:0{width}d}",
            "cluster": cluster["name"],
            "role": "agent" if index >= devices - agents else "server",
            "user": LAB_USER if index < user_devices else "root",
            "labels": {"site": cluster["name"].split("-")[1]},
        })
    spec = {"clusters": cluster_specs, "devices": device_specs}
    if bastion:
        spec["bastion"] = True
    return spec


def _site_name(index):
    letters = "abcdefghijklmnopqrstuvwxyz"
    return letters[index] if index < 26 else letters[index // 26 - 1] + letters[index % 26]


def normalize_spec(spec):
    """Validate a spec and return a copy with every default filled in."""
    spec = json.loads(json.dumps(spec))
    spec.setdefault("tenant_id", str(uuid.uuid4()))
    spec.setdefault("client_id", str(uuid.uuid4()))
    spec.setdefault("client_secret", generate_client_secret())
    spec.setdefault("client_object_id", str(uuid.uuid4()))
    spec.setdefault("page_size", 100)
    spec.setdefault("bastion", False)
    spec.setdefault("user_ca", False)
    if not spec.get("clusters") or not spec.get("devices"):
        raise LabError("the spec needs at least one cluster and one device")
    if spec["bastion"] and len(spec["devices"]) > MAX_BASTION_DEVICES:
        raise LabError(f"a bastion lab has at most {MAX_BASTION_DEVICES} devices (one address each in a /25)")
    normalize_clusters(spec["clusters"], spec["tenant_id"])
    normalize_devices(spec["devices"], [cluster["name"] for cluster in spec["clusters"]])
    return spec


def normalize_clusters(clusters, tenant_id):
    names = set()
    for cluster in clusters:
        name = cluster.get("name")
        if not name or name in names:
            raise LabError(f"invalid cluster name {name!r}: every cluster needs a unique, non-empty name")
        names.add(name)
        for required in ("subscription", "resource_group"):
            if not cluster.get(required):
                raise LabError(f"cluster {name!r} is missing {required!r}")
        cluster.setdefault("location", "eastus")
        # None until the lab's OIDC issuer server has a port; see assign_issuers.
        cluster.setdefault("issuer_url", None)
        for key, value in (("oidc_enabled", True), ("workload_identity_enabled", True),
                           ("connectivity_status", "Connected"), ("provisioning_state", "Succeeded"),
                           ("exists", True), ("forbidden", False), ("tags", {})):
            cluster.setdefault(key, value)


def normalize_devices(devices, cluster_names):
    cluster_index = {name: index for index, name in enumerate(cluster_names)}
    names = set()
    members = {}
    for device in devices:
        name = device.get("name", "")
        if not name or not all(c.isalnum() or c == "-" for c in name) or name in names:
            raise LabError(f"invalid device name {name!r}: every device needs a unique name of letters, digits and '-'")
        names.add(name)
        if device.get("cluster") not in cluster_index:
            raise LabError(f"device {name!r} names unknown cluster {device.get('cluster')!r}")
        role = device.setdefault("role", "server")
        if role not in ("server", "agent"):
            raise LabError(f"device {name!r} has invalid role {role!r}, expected 'server' or 'agent'")
        user = device.setdefault("user", "root")
        if user not in ("root", LAB_USER):
            raise LabError(f"device {name!r} has invalid user {user!r}, expected 'root' or {LAB_USER!r}")
        for key, value in (("labels", {}), ("files", {}), ("faults", {}), ("exec_start_args", [role]),
                           ("secret_store", True), ("start", True), ("sudo_password", None),
                           ("host_certificate", False)):
            device.setdefault(key, value)
        if device["sudo_password"] is not None:
            password = device["sudo_password"]
            if user != LAB_USER or not isinstance(password, str) or not password or "\n" in password:
                raise LabError(f"device {name!r}: sudo_password needs user {LAB_USER!r} and a one-line, non-empty string")

        # Node IPs only appear in outputs, so they repeat after 250 clusters.
        host_index = len(members.setdefault(device["cluster"], []))
        members[device["cluster"]].append(name)
        network = cluster_index[device["cluster"]] % 250 + 1
        device.setdefault("node_ip", f"10.{network}.{host_index // 250}.{host_index % 250 + 2}")

        for path in device["files"]:
            if not any(path == base or path.startswith(base + "/") for base in BIND_DIRECTORIES):
                raise LabError(f"device {name!r} has file {path!r} outside the per-device directories {BIND_DIRECTORIES}")
        unknown_faults = set(device["faults"]) - set(k3s_standin.FAULT_KEYS)
        if unknown_faults:
            raise LabError(f"device {name!r} has unknown faults {sorted(unknown_faults)}. Known faults: {sorted(k3s_standin.FAULT_KEYS)}")


def generate_client_secret():
    """Return a random secret in the shape of an Entra client secret value."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
    return "".join(secrets.choice(alphabet) for _ in range(3)) + "8Q~" + "".join(secrets.choice(alphabet) for _ in range(34))


# ---------------------------------------------------------------------------
# Files of one device


def write_file(path, text, mode=0o644, uid=0, gid=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, mode)
    os.chown(path, uid, gid)


def unit_text(device):
    """Return the unit file the K3s install script writes for this device."""
    unit_name = k3s_model.SERVER_UNIT if device["role"] == "server" else k3s_model.AGENT_UNIT
    args = device["exec_start_args"]
    exec_lines = ["ExecStart=/usr/local/bin/k3s \\"]
    if args:
        exec_lines.append(f"    {args[0]} \\")
        # The installer single-quotes each further argument and indents it with a tab.
        exec_lines += [f"\t{installer_quote(arg)} \\" for arg in args[1:]]
    return "\n".join([
        "[Unit]",
        "Description=Lightweight Kubernetes",
        "Documentation=https://k3s.io",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
        "[Service]",
        "Type=notify",
        "EnvironmentFile=-/etc/default/%N",
        "EnvironmentFile=-/etc/sysconfig/%N",
        f"EnvironmentFile=-/etc/systemd/system/{unit_name}.env",
        "KillMode=process",
        "Delegate=yes",
        "User=root",
        "# Having non-zero Limit*s causes performance problems due to accounting overhead",
        "# in the kernel. We recommend using cgroups to do container-local accounting.",
        "LimitNOFILE=1048576",
        "LimitNPROC=infinity",
        "LimitCORE=infinity",
        "TasksMax=infinity",
        "TimeoutStartSec=0",
        "Restart=always",
        "RestartSec=5s",
        "ExecStartPre=/bin/sh -xc '! /usr/bin/systemctl is-enabled --quiet nm-cloud-setup.service 2>/dev/null'",
        "ExecStartPre=-/sbin/modprobe br_netfilter",
        "ExecStartPre=-/sbin/modprobe overlay",
        *exec_lines,
        "",
        "",
    ])


def installer_quote(arg):
    """Quote an argument like the K3s install script's quote() function."""
    return "'" + arg.replace("'", "'\\''") + "'"


def default_config_text(device, cluster_members, cluster_token):
    """Return a realistic /etc/rancher/k3s/config.yaml without service-account-issuer."""
    labels = [f"{key}={value}" for key, value in sorted(device["labels"].items())]
    labels.append(f"arcfleet.example/cluster={device['cluster']}")
    lines = ["# K3s configuration written by the arcfleet lab."]
    if device["role"] == "server":
        first_server = next(member for member in cluster_members if member["role"] == "server")
        lines += ['write-kubeconfig-mode: "0640"', "tls-san:", f"  - {device['name']}.lab.internal", f"  - {device['node_ip']}"]
        if first_server is device:
            lines.append("cluster-init: true")
        else:
            lines += [f"server: https://{first_server['node_ip']}:6443", f"token: {cluster_token}"]
        lines += ["disable:", "  - traefik"]
    lines.append("node-label:")
    lines += [f'  - "{label}"' for label in labels]
    return "\n".join(lines) + "\n"


def shim_text():
    return (
        "#!/usr/bin/python3 -I\n"
        "# arcfleet lab stand-in: k3s, systemctl and journalctl dispatch on the command name.\n"
        "import sys\n"
        f"sys.path.insert(0, {STANDIN_CODE_DIR!r})\n"
        "import k3s_standin\n"
        "sys.exit(k3s_standin.main(sys.argv))\n"
    )


def account_files(lab_ids):
    """Return host passwd, shadow and group texts with labuser added."""
    uid, gid = lab_ids
    with open("/etc/passwd", encoding="utf-8") as handle:
        passwd = handle.read().rstrip("\n") + f"\n{LAB_USER}:x:{uid}:{gid}:arcfleet lab user:/home/{LAB_USER}:/bin/sh\n"
    with open("/etc/shadow", encoding="utf-8") as handle:
        # '*' (no password) rather than '!' (locked) so sshd accepts key logins.
        shadow = handle.read().rstrip("\n") + f"\n{LAB_USER}:*:19700:0:99999:7:::\n"
    with open("/etc/group", encoding="utf-8") as handle:
        group = handle.read().rstrip("\n") + f"\n{LAB_USER}:x:{gid}:\n"
    return passwd, shadow, group


def password_hash(password):
    """Return a SHA-512 crypt(3) hash of password, made by openssl (read from stdin, so the
    password is not in the process list)."""
    result = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password + "\n",
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"openssl passwd failed: {result.stderr.strip()}. Install openssl.")
    return result.stdout.strip()


def free_lab_ids():
    """Return a uid and gid for labuser that the host does not use."""
    used_uids, used_gids = set(), set()
    with open("/etc/passwd", encoding="utf-8") as handle:
        used_uids = {int(line.split(":")[2]) for line in handle if line.count(":") >= 3}
    with open("/etc/group", encoding="utf-8") as handle:
        used_gids = {int(line.split(":")[2]) for line in handle if line.count(":") >= 3}
    candidate = 1500
    while candidate in used_uids or candidate in used_gids:
        candidate += 1
    return candidate, candidate


def build_device(lab, device, cluster, cluster_members, accounts):
    """Create the device's directory tree: the files seen inside its namespace.

    Returns (root, unit name).
    """
    root = os.path.join(lab["dir"], "devices", device["name"], "root")
    if os.path.exists(root):
        shutil.rmtree(root)
    for directory in BIND_DIRECTORIES:
        os.makedirs(root + directory, mode=0o755, exist_ok=True)
    os.chmod(root + "/root", 0o700)
    write_accounts(lab, root, device, accounts)
    write_standin(lab, root)
    unit_name = write_k3s_files(root, device, cluster, cluster_members)
    standin_dir = root + k3s_standin.STANDIN_DIR
    os.makedirs(standin_dir, exist_ok=True)
    os.chmod(standin_dir, 0o755)
    write_file(standin_dir + "/faults.json", json.dumps(device["faults"], indent=2) + "\n")
    write_file(standin_dir + "/cluster.json", json.dumps(cluster_model(device, cluster), indent=2) + "\n")
    return root, unit_name


def write_accounts(lab, root, device, accounts):
    """Write the device's passwd, shadow, group, hosts, sudoers and labuser home."""
    passwd, shadow, group = accounts["texts"]
    uid, gid = accounts["ids"]
    sudoers = f"{LAB_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n"
    if device["sudo_password"] is not None:
        # sudo checks the password against this device's shadow file through PAM. The
        # lecture is off, so sudo writes no "lectured" file outside the device tree.
        shadow = shadow.replace(f"\n{LAB_USER}:*:", f"\n{LAB_USER}:{password_hash(device['sudo_password'])}:")
        sudoers = f"Defaults:{LAB_USER} lecture=never\n{LAB_USER} ALL=(ALL:ALL) ALL\n"
    write_file(root + "/etc/passwd", passwd)
    write_file(root + "/etc/shadow", shadow, 0o640, 0, accounts["shadow_gid"])
    write_file(root + "/etc/group", group)
    with open("/etc/hosts", encoding="utf-8") as handle:
        write_file(root + "/etc/hosts", handle.read().rstrip("\n") + f"\n127.0.1.1 {device['name']}\n")
    shutil.copytree("/etc/default", root + "/etc/default", dirs_exist_ok=True, symlinks=True)
    write_file(root + "/etc/sudoers.d/" + LAB_USER, sudoers, 0o440)
    home = root + "/home/" + LAB_USER
    os.makedirs(home + "/.ssh", exist_ok=True)
    os.chmod(home + "/.ssh", 0o700)
    shutil.copy(lab["authorized_keys"], home + "/.ssh/authorized_keys")
    os.chmod(home + "/.ssh/authorized_keys", 0o600)
    for path in (home, home + "/.ssh", home + "/.ssh/authorized_keys"):
        os.chown(path, uid, gid)


def write_standin(lab, root):
    """Install the stand-in shims and modules in the device tree."""
    for command in STANDIN_COMMANDS:
        write_file(root + "/usr/local/bin/" + command, shim_text(), 0o755)
    for binary in SHADOWED_BINARIES:
        if os.path.exists(binary):
            write_file(root + binary, shim_text(), 0o755)
    os.makedirs(root + STANDIN_CODE_DIR, exist_ok=True)
    for module in STANDIN_MODULES:
        # Hard links to the lab's single copy keep a 1000-device lab small.
        os.link(os.path.join(lab["dir"], "standin", module), root + STANDIN_CODE_DIR + "/" + module)


def write_k3s_files(root, device, cluster, cluster_members):
    """Write the unit file, its .env file, the K3s config and the spec's files; return the unit name."""
    unit_name = k3s_model.SERVER_UNIT if device["role"] == "server" else k3s_model.AGENT_UNIT
    write_file(root + "/etc/systemd/system/" + unit_name, unit_text(device))
    env_text = ""
    if device["role"] == "agent":
        # The installer stores the join URL and token of an agent in the .env file.
        first_server = next((member for member in cluster_members if member["role"] == "server"), None)
        server_ip = first_server["node_ip"] if first_server else "10.0.0.1"
        env_text = f'K3S_TOKEN="{cluster["token"]}"\nK3S_URL="https://{server_ip}:6443"\n'
    write_file(root + f"/etc/systemd/system/{unit_name}.env", env_text, 0o600)
    wants = root + "/etc/systemd/system/multi-user.target.wants"
    os.makedirs(wants, exist_ok=True)
    os.symlink(f"/etc/systemd/system/{unit_name}", os.path.join(wants, unit_name))

    files = {"/etc/rancher/k3s/config.yaml": default_config_text(device, cluster_members, cluster["token"])}
    files.update(device["files"])
    for path, text in files.items():
        # A null file in the spec removes a default file, such as config.yaml.
        if text is not None:
            write_file(root + path, text)
    return unit_name


def cluster_model(device, cluster):
    """Return the Kubernetes objects the device's stand-in serves."""
    namespaces = ["default", "kube-node-lease", "kube-public", "kube-system"]
    deployments = [{"namespace": "kube-system", "name": "coredns", "replicas": 1},
                   {"namespace": "kube-system", "name": "local-path-provisioner", "replicas": 1},
                   {"namespace": "kube-system", "name": "metrics-server", "replicas": 1}]
    service_accounts = ["kube-system/coredns"]
    secretsyncs = []
    if device["secret_store"]:
        namespaces.append("azure-secret-store")
        deployments.append({"namespace": "azure-secret-store", "name": "secret-sync-controller", "replicas": 1,
                            "service_account": "secret-sync-controller"})
        service_accounts.append("azure-secret-store/secret-sync-controller")
        secretsyncs = device.get("secretsyncs", [{
            "namespace": "default", "name": "app-secrets", "service_account": "default",
            "secret_provider_class": "app-secrets-spc", "controller": "azure-secret-store/secret-sync-controller",
        }])
    return {
        "hostname": device["name"],
        "node_ip": device["node_ip"],
        "role": device["role"],
        "cluster": device["cluster"],
        "arc_issuer": cluster["issuer_url"] if cluster["oidc_enabled"] else None,
        "secret_store": device["secret_store"],
        "namespaces": sorted(namespaces),
        "service_accounts": sorted(service_accounts),
        "deployments": deployments,
        "secretsyncs": secretsyncs,
    }


# ---------------------------------------------------------------------------
# Processes


class PidRegistry:
    """The pids the lab started, saved to DIR/pids.json after every change."""

    def __init__(self, lab_dir):
        self.path = os.path.join(lab_dir, "pids.json")
        self.data = {"emulator": None, "sshd": {}, "namespaces": {}, "netns": []}

    def save(self):
        k3s_standin.write_json_atomic(self.path, self.data)


def run_parallel(commands, limit=64):
    """Run commands, at most ``limit`` at a time, and raise LabError on the first failure."""
    pending = list(commands)
    running = []
    while pending or running:
        while pending and len(running) < limit:
            command = pending.pop(0)
            running.append((command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        command, process = running.pop(0)
        output = process.communicate()[0]
        if process.returncode != 0:
            raise LabError(f"{shlex.join(command)} failed with exit code {process.returncode}: {output.decode(errors='replace')}")


def lab_port_range():
    """Return the port range for sshd: just below the kernel's ephemeral range."""
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="utf-8") as handle:
        low, _high = (int(value) for value in handle.read().split())
    return (max(1024, low - 12000), low) if low - 1024 > 2000 else (low, 65535)


def pick_port(used, port_range):
    """Return a port on 127.0.0.1 that is free right now and not in ``used``."""
    for _ in range(1000):
        port = random.randrange(*port_range)
        if port in used:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        used.add(port)
        return port
    raise LabError(f"no free TCP port on 127.0.0.1 in {port_range}")


def sshd_config_text(lab, device, device_dir, listen):
    lines = [
        "# sshd for one arcfleet lab device",
        f"ListenAddress {listen}",
        f"HostKey {device_dir}/ssh_host_ed25519_key",
        f"PidFile {device_dir}/sshd.pid",
        f"AuthorizedKeysFile {lab['authorized_keys']}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PrintMotd no",
        "PrintLastLog no",
        "AcceptEnv LANG LC_*",
    ]
    if device["host_certificate"]:
        lines.append(f"HostCertificate {device_dir}/ssh_host_ed25519_key-cert.pub")
    if lab.get("user_ca"):
        lines.append(f"TrustedUserCAKeys {lab['user_ca']}.pub")
    if os.path.exists(SFTP_SERVER):
        lines.append(f"Subsystem sftp {SFTP_SERVER}")
    # sshd reads authorized keys as the login user, and labuser may not be
    # able to reach the lab directory, so labuser has its own copy at home.
    lines += [f"Match User {LAB_USER}", "    AuthorizedKeysFile .ssh/authorized_keys"]
    return "\n".join(lines) + "\n"


def fstab_text(root):
    """Return the bind mounts of a device as an fstab, applied with one ``mount --all`` call."""

    def escape(path):
        return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")

    targets = list(BIND_DIRECTORIES + BIND_FILES) + [path for path in SHADOWED_BINARIES if os.path.exists(path)]
    return "".join(f"{escape(root + path)} {escape(path)} none bind 0 0\n" for path in targets)


def namespace_script(device, device_dir):
    """Return the shell script run inside the new mount namespace: bind mounts, then sshd."""
    return "\n".join([
        "#!/bin/sh",
        "# Runs inside the device's own mount and UTS namespaces.",
        "set -e",
        f"hostname {shlex.quote(device['name'])}",
        f"mount --all --fstab {shlex.quote(device_dir + '/fstab')}",
        f"exec {SSHD} -D -e -f {shlex.quote(device_dir + '/sshd_config')}",
        "",
    ])


def start_sshd(lab, device, listen, netns=None):
    """Start a device's sshd listening on ``listen`` (address:port), inside ``netns`` if given."""
    device_dir = os.path.join(lab["dir"], "devices", device["name"])
    write_file(device_dir + "/sshd_config", sshd_config_text(lab, device, device_dir, listen))
    log = open(device_dir + "/sshd.log", "ab")
    command = ["unshare", "--mount", "--propagation", "private", "--uts", "/bin/sh", device_dir + "/start.sh"]
    if netns:
        command = ["ip", "netns", "exec", netns] + command
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    return process


def accepts_connections(port, host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((host, port)) == 0


def start_all_sshd(lab, devices, registry):
    """Start one sshd per device in parallel and wait until each accepts connections.

    An sshd that loses its port to another process is restarted on a new port.
    """
    port_range = lab_port_range()
    used = set()
    pending = {}
    attempts = {}
    for device in devices:
        port = pick_port(used, port_range)
        pending[device["name"]] = (device, port, start_sshd(lab, device, f"127.0.0.1:{port}"))
        attempts[device["name"]] = 1
    ready = {}
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS + 0.05 * len(devices)
    while pending:
        if time.monotonic() > deadline:
            raise LabError(f"sshd did not accept connections in time on: {sorted(pending)}")
        for name, (device, port, process) in list(pending.items()):
            if process.poll() is not None:
                log_tail = read_tail(os.path.join(lab["dir"], "devices", name, "sshd.log"))
                if "Address already in use" in log_tail and attempts[name] < SSHD_START_ATTEMPTS:
                    attempts[name] += 1
                    port = pick_port(used, port_range)
                    pending[name] = (device, port, start_sshd(lab, device, f"127.0.0.1:{port}"))
                    continue
                raise LabError(f"sshd for device {name} exited with code {process.returncode}:\n{log_tail}")
            if accepts_connections(port):
                ready[name] = (port, process.pid)
                registry.data["sshd"][name] = process.pid
                registry.data["namespaces"][name] = os.readlink(f"/proc/{process.pid}/ns/mnt")
                del pending[name]
        registry.save()
        if pending:
            time.sleep(0.01)
    return ready


def start_all_sshd_in_netns(lab, devices, network, registry):
    """Start each device's sshd on port 22 of its own address in the devices namespace and
    wait until each logs that it listens. The host cannot connect there to check, by design."""
    pending = {}
    for device in devices:
        address = network["addresses"][device["name"]]
        log_path = os.path.join(lab["dir"], "devices", device["name"], "sshd.log")
        offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        process = start_sshd(lab, device, f"{address}:22", netns=network["devices_netns"])
        pending[device["name"]] = (process, log_path, offset, f"Server listening on {address} port 22")
    ready = {}
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS + 0.05 * len(devices)
    while pending:
        if time.monotonic() > deadline:
            raise LabError(f"sshd did not start listening in time on: {sorted(pending)}")
        for name, (process, log_path, offset, listening) in list(pending.items()):
            if process.poll() is not None:
                raise LabError(f"sshd for device {name} exited with code {process.returncode}:\n{read_tail(log_path)}")
            with open(log_path, "rb") as handle:
                handle.seek(offset)
                if listening.encode() not in handle.read():
                    continue
            ready[name] = (22, process.pid)
            registry.data["sshd"][name] = process.pid
            registry.data["namespaces"][name] = os.readlink(f"/proc/{process.pid}/ns/mnt")
            del pending[name]
        registry.save()
        if pending:
            time.sleep(0.01)
    return ready


# ---------------------------------------------------------------------------
# Bastion network


def ip(*args, check=True):
    """Run ip(8); raise LabError with its message when it fails and ``check`` is set."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise LabError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def claim_network_index(registry):
    """Create the two namespaces of a free lab network index and return the index.

    ``ip netns add`` fails for an existing name, so two labs starting at the same time
    never get the same index.
    """
    used = ip("-o", "-4", "addr", "show").stdout
    for index in range(1, 255):
        bastion_ns, devices_ns = f"{NETNS_PREFIX}{index}b", f"{NETNS_PREFIX}{index}d"
        if f" {BASTION_SUBNET_PREFIX}.{index}." in used or os.path.exists(f"/run/netns/{devices_ns}"):
            continue
        if ip("netns", "add", bastion_ns, check=False).returncode != 0:
            continue
        registry.data["netns"] = [bastion_ns]
        registry.save()
        ip("netns", "add", devices_ns)
        registry.data["netns"].append(devices_ns)
        registry.save()
        return index
    raise LabError(f"no free lab network: {BASTION_SUBNET_PREFIX}.N.0/24 is in use for every N from 1 to 254")


def create_bastion_network(spec, registry):
    """Create the namespaces and veth links of a bastion lab (see NETNS_PREFIX)."""
    index = claim_network_index(registry)
    prefix = f"{BASTION_SUBNET_PREFIX}.{index}."
    bastion_ns, devices_ns = registry.data["netns"]
    host_link, bastion_up, bastion_down, devices_link = (
        f"{NETNS_PREFIX}{index}{suffix}" for suffix in ("h", "b0", "b1", "d0"))
    ip("link", "add", host_link, "type", "veth", "peer", "name", bastion_up, "netns", bastion_ns)
    ip("addr", "add", f"{prefix}1/24", "dev", host_link)
    ip("link", "set", host_link, "up")
    ip("-n", bastion_ns, "link", "set", "lo", "up")
    ip("-n", bastion_ns, "addr", "add", f"{prefix}2/25", "dev", bastion_up)
    ip("-n", bastion_ns, "link", "set", bastion_up, "up")
    ip("-n", bastion_ns, "link", "add", bastion_down, "type", "veth", "peer", "name", devices_link, "netns", devices_ns)
    ip("-n", bastion_ns, "addr", "add", f"{prefix}129/25", "dev", bastion_down)
    ip("-n", bastion_ns, "link", "set", bastion_down, "up")
    ip("-n", devices_ns, "link", "set", "lo", "up")
    addresses = {}
    for offset, device in enumerate(spec["devices"]):
        address = f"{prefix}{FIRST_DEVICE_HOST + offset}"
        ip("-n", devices_ns, "addr", "add", f"{address}/25", "dev", devices_link)
        addresses[device["name"]] = address
    ip("-n", devices_ns, "link", "set", devices_link, "up")
    # New namespaces start with forwarding off; keep it so explicitly, because the host must
    # never reach the devices except through the bastion's sshd.
    subprocess.run(["ip", "netns", "exec", bastion_ns, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"], check=True)
    return {"index": index, "bastion_netns": bastion_ns, "devices_netns": devices_ns,
            "bastion_host": f"{prefix}2", "host_link": host_link, "addresses": addresses}


def bastion_sshd_config_text(lab, bastion_dir, host):
    return "\n".join([
        "# The bastion of an arcfleet lab: forwarding only. MaxStartups is left at",
        "# OpenSSH's default (10:30:100) on purpose.",
        f"ListenAddress {host}:22",
        f"HostKey {bastion_dir}/ssh_host_ed25519_key",
        f"PidFile {bastion_dir}/sshd.pid",
        f"AuthorizedKeysFile {lab['authorized_keys']}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "AllowTcpForwarding yes",
        "PermitTTY no",
        "X11Forwarding no",
        "ForceCommand /bin/false",
        "LogLevel VERBOSE",
        "",
    ])


def start_bastion(lab, network, registry):
    """Start the bastion's sshd in its namespace and wait until the host can connect."""
    bastion_dir = os.path.join(lab["dir"], "bastion")
    os.makedirs(bastion_dir, exist_ok=True)
    key = bastion_dir + "/ssh_host_ed25519_key"
    for suffix in ("", ".pub"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(key + suffix)
    run_parallel([["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lab-bastion", "-f", key]])
    config = bastion_dir + "/sshd_config"
    write_file(config, bastion_sshd_config_text(lab, bastion_dir, network["bastion_host"]))
    log_path = bastion_dir + "/sshd.log"
    log = open(log_path, "ab")
    process = subprocess.Popen(["ip", "netns", "exec", network["bastion_netns"], SSHD, "-D", "-e", "-f", config],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    registry.data["sshd"]["bastion"] = process.pid
    registry.save()
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not accepts_connections(22, network["bastion_host"]):
        if process.poll() is not None:
            raise LabError(f"the bastion sshd exited with code {process.returncode}:\n{read_tail(log_path)}")
        if time.monotonic() > deadline:
            raise LabError(f"the bastion sshd did not accept connections in time. Its log is {log_path}")
        time.sleep(0.02)
    with open(key + ".pub", encoding="utf-8") as handle:
        key_type, key_data = handle.read().split()[:2]
    return {"host": network["bastion_host"], "port": 22, "user": "root", "sshd_pid": process.pid,
            "sshd_log": log_path, "netns": network["bastion_netns"], "devices_netns": network["devices_netns"],
            "known_hosts_line": f"{network['bastion_host']} {key_type} {key_data}"}


def delete_networks(names):
    """Delete lab network namespaces; their veth links go with them."""
    for name in names:
        ip("netns", "del", name, check=False)


def read_tail(path, size=2000):
    with contextlib.suppress(FileNotFoundError):
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode(errors="replace")
    return ""


def start_emulator(lab, registry):
    emulator_dir = os.path.join(lab["dir"], "emulator")
    port_file = os.path.join(emulator_dir, "port")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(port_file)
    command = [sys.executable, os.path.join(LAB_DIR, "azure_emulator.py"), "--state", lab["emulator_state"],
               "--port", "0", "--port-file", port_file, "--log", lab["emulator_log"]]
    stderr = open(os.path.join(emulator_dir, "emulator.stderr"), "ab")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True)
    stderr.close()
    registry.data["emulator"] = process.pid
    registry.save()
    return process, port_file


def start_oidc_issuer(lab, registry):
    """Make the lab CA and a certificate for 127.0.0.1, start the HTTPS OIDC issuer server,
    and return its port."""
    tls_dir = os.path.join(lab["dir"], "oidc")
    os.makedirs(tls_dir, mode=0o755, exist_ok=True)
    lab["ca_file"] = os.path.join(tls_dir, "ca.pem")
    lab["oidc_state"] = os.path.join(tls_dir, "state.json")
    ca_key, cert, key = (os.path.join(tls_dir, name) for name in ("ca.key", "cert.pem", "key.pem"))
    extensions = os.path.join(tls_dir, "san.cnf")
    write_file(extensions, "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    openssl = [
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", ca_key, "-out", lab["ca_file"], "-days", "2", "-subj", "/CN=arcfleet lab CA"],
        ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", cert + ".csr", "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", cert + ".csr", "-CA", lab["ca_file"], "-CAkey", ca_key,
         "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", extensions],
    ]
    for command in openssl:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise LabError(f"{' '.join(command[:2])} failed: {result.stderr.strip()}")
    write_file(lab["oidc_state"], json.dumps({"issuers": {}}))
    port_file = os.path.join(tls_dir, "port")
    log = open(os.path.join(tls_dir, "oidc_issuer.stderr"), "ab")
    process = subprocess.Popen(
        [sys.executable, os.path.join(LAB_DIR, "oidc_issuer.py"), "--state", lab["oidc_state"], "--cert", cert,
         "--key", key, "--port", "0", "--port-file", port_file],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    registry.data["oidc_issuer"] = process.pid
    registry.save()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LabError("the OIDC issuer server exited:\n" + read_tail(os.path.join(tls_dir, "oidc_issuer.stderr")))
        if os.path.exists(port_file):
            return int(open(port_file, encoding="utf-8").read())
        time.sleep(0.02)
    raise LabError("the OIDC issuer server did not start within 20 s")


def assign_issuers(lab, spec):
    """Give clusters without an issuer_url one served by the lab's OIDC issuer server, and
    publish the signing key ID of each of their devices there (unless a device sets
    publish_signing_key: false)."""
    issuers = {}
    for cluster in spec["clusters"]:
        if cluster["issuer_url"] is None:
            path = f"{cluster['location']}/{spec['tenant_id']}/{uuid.uuid4()}"
            cluster["issuer_url"] = f"https://127.0.0.1:{lab['oidc_port']}/{path}/"
            issuers[path] = {"kids": [], "cluster": cluster["name"]}
    by_cluster = {entry["cluster"]: entry for entry in issuers.values()}
    for device in spec["devices"]:
        entry = by_cluster.get(device["cluster"])
        if entry is not None and device.get("publish_signing_key", True):
            entry["kids"].append(signing_key_id(device["name"]))
    write_file(lab["oidc_state"], json.dumps({"issuers": issuers}, indent=2))


def signing_key_id(hostname):
    """Return the key ID the K3s stand-in puts in tokens on the device with this host name."""
    digest = hashlib.sha256(hostname.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def wait_for_emulator(lab, process, port_file):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LabError(f"the Azure emulator exited with code {process.returncode}:\n"
                           + read_tail(os.path.join(lab["dir"], "emulator", "emulator.stderr")))
        if os.path.exists(port_file):
            with open(port_file, encoding="utf-8") as handle:
                text = handle.read().strip()
            if text:
                port = int(text)
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_emulator/health", timeout=2) as response:
                        if response.status == 200:
                            return port
        time.sleep(0.02)
    log = os.path.join(lab["dir"], "emulator", "emulator.stderr")
    raise LabError(f"the Azure emulator did not respond within 20 s. Its output is in {log}")


# ---------------------------------------------------------------------------
# up / down


def check_prerequisites(spec):
    for tool in (SSHD, shutil.which("unshare"), shutil.which("ssh-keygen"), shutil.which("mount")):
        if not tool or not os.path.exists(tool):
            raise LabError(f"missing tool {tool!r}. Install openssh-server, openssh-client and util-linux.")
    if any(device["user"] == LAB_USER for device in spec["devices"]) and not shutil.which("sudo"):
        raise LabError("devices with user labuser need sudo. Install it with: apt-get install -y sudo")
    if spec["bastion"] and not shutil.which("ip"):
        raise LabError("a bastion lab needs ip(8). Install it with: apt-get install -y iproute2")
    if any(device["sudo_password"] for device in spec["devices"]) and not shutil.which("openssl"):
        raise LabError("devices with sudo_password need openssl. Install it with: apt-get install -y openssl")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    for path in HOST_MOUNT_POINTS:
        os.makedirs(path, mode=0o755, exist_ok=True)


def up(lab_dir, spec_path):
    try:
        with open(spec_path, encoding="utf-8") as handle:
            spec = normalize_spec(json.load(handle))
    except FileNotFoundError:
        raise LabError(f"spec file {spec_path} not found. Create one with: lab.py spec --devices N > {spec_path}") from None
    except json.JSONDecodeError as error:
        raise LabError(f"spec file {spec_path} is not valid JSON: {error}") from None
    check_prerequisites(spec)
    lab_dir = os.path.abspath(lab_dir)
    if os.path.exists(os.path.join(lab_dir, "pids.json")):
        raise LabError(f"a lab is already running in {lab_dir}. Run 'lab.py down --dir {lab_dir}' first.")
    os.makedirs(lab_dir, exist_ok=True)
    os.chmod(lab_dir, 0o755)
    registry = PidRegistry(lab_dir)
    registry.save()
    try:
        return _up(lab_dir, spec, registry)
    except BaseException:
        down(lab_dir, quiet=True)
        raise


def _up(lab_dir, spec, registry):
    """Start the emulator, build and start every device, and write the outputs."""
    started = time.monotonic()
    timings = {}
    for sub in ("ssh", "emulator", "devices", "standin"):
        os.makedirs(os.path.join(lab_dir, sub), mode=0o755, exist_ok=True)
    lab = {
        "dir": lab_dir,
        "identity_file": os.path.join(lab_dir, "ssh", "id_ed25519"),
        "authorized_keys": os.path.join(lab_dir, "ssh", "authorized_keys"),
        "emulator_state": os.path.join(lab_dir, "emulator", "state.json"),
        "emulator_log": os.path.join(lab_dir, "emulator", "requests.jsonl"),
        "user_ca": os.path.join(lab_dir, "ssh", "user_ca") if spec["user_ca"] else None,
        "host_ca": os.path.join(lab_dir, "ssh", "host_ca"),
    }
    clusters = {cluster["name"]: cluster for cluster in spec["clusters"]}
    for cluster in clusters.values():
        cluster["token"] = "K10" + secrets.token_hex(32) + "::server:" + secrets.token_hex(16)
    lab["oidc_port"] = start_oidc_issuer(lab, registry)
    assign_issuers(lab, spec)
    write_emulator_state(lab, spec)
    emulator, port_file = start_emulator(lab, registry)

    network = create_bastion_network(spec, registry) if spec["bastion"] else None
    addresses = network["addresses"] if network else {d["name"]: "127.0.0.1" for d in spec["devices"]}
    generate_keys(lab, spec, addresses)
    timings["keygen"] = time.monotonic() - started
    roots = build_devices(lab, spec, clusters)
    timings["devices"] = time.monotonic() - started - timings["keygen"]
    if network:
        bastion = start_bastion(lab, network, registry)
        ready = start_all_sshd_in_netns(lab, spec["devices"], network, registry)
    else:
        bastion = None
        ready = start_all_sshd(lab, spec["devices"], registry)
    timings["sshd"] = time.monotonic() - started - timings["keygen"] - timings["devices"]
    emulator_port = wait_for_emulator(lab, emulator, port_file)
    manifest = write_outputs(lab, spec, clusters, roots, ready, emulator_port, addresses, bastion)

    phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
    print(f"lab up: {len(spec['devices'])} devices, {len(clusters)} clusters, emulator on port {emulator_port}, "
          f"{time.monotonic() - started:.1f} s ({phases}); manifest {manifest}")
    return manifest


def generate_keys(lab, spec, addresses):
    """Create the client key pair, the CAs and one ed25519 host key per device, in parallel,
    then sign the host keys of devices with ``host_certificate`` for their address and name."""
    cas = [lab["host_ca"]] + ([lab["user_ca"]] if lab["user_ca"] else [])
    for path in [lab["identity_file"]] + cas:
        for suffix in ("", ".pub"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)
    keygen = [["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "arcfleet-lab-client", "-f", lab["identity_file"]]]
    keygen += [["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", os.path.basename(ca), "-f", ca] for ca in cas]
    for device in spec["devices"]:
        device_dir = os.path.join(lab["dir"], "devices", device["name"])
        os.makedirs(device_dir, exist_ok=True)
        for suffix in ("", ".pub"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{device_dir}/ssh_host_ed25519_key{suffix}")
        keygen.append(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", device["name"], "-f", f"{device_dir}/ssh_host_ed25519_key"])
    run_parallel(keygen)
    signing = []
    for device in spec["devices"]:
        if device["host_certificate"]:
            device_dir = os.path.join(lab["dir"], "devices", device["name"])
            principals = f"{addresses[device['name']]},{device['name']}"
            signing.append(["ssh-keygen", "-q", "-s", lab["host_ca"], "-h", "-I", f"{device['name']}-host",
                            "-n", principals, f"{device_dir}/ssh_host_ed25519_key.pub"])
    run_parallel(signing)
    shutil.copy(lab["identity_file"] + ".pub", lab["authorized_keys"])
    os.chmod(lab["authorized_keys"], 0o644)


def build_devices(lab, spec, clusters):
    """Build every device tree and run its initial start; return {name: (root, unit name)}."""
    for module in STANDIN_MODULES:
        shutil.copy(os.path.join(LAB_DIR, module), os.path.join(lab["dir"], "standin", module))
        os.chmod(os.path.join(lab["dir"], "standin", module), 0o644)
    ids = free_lab_ids()
    accounts = {"ids": ids, "texts": account_files(ids), "shadow_gid": grp.getgrnam("shadow").gr_gid}
    members = {}
    for device in spec["devices"]:
        members.setdefault(device["cluster"], []).append(device)
    roots = {}
    for device in spec["devices"]:
        root, unit_name = build_device(lab, device, clusters[device["cluster"]], members[device["cluster"]], accounts)
        roots[device["name"]] = (root, unit_name)
        device_dir = os.path.join(lab["dir"], "devices", device["name"])
        write_file(device_dir + "/fstab", fstab_text(root))
        write_file(device_dir + "/start.sh", namespace_script(device, device_dir), 0o755)
        if not device["start"]:
            continue
        try:
            k3s_standin.start_initial(root, unit_name)
        except k3s_model.StartError as error:
            raise LabError(f"the initial start of {unit_name} on device {device['name']} failed: {error}") from None
    return roots


def write_emulator_state(lab, spec):
    state = {
        "tenant_id": spec["tenant_id"],
        "page_size": spec["page_size"],
        "token_lifetime_seconds": 3599,
        "clients": [{"client_id": spec["client_id"], "client_secret": spec["client_secret"],
                     "object_id": spec["client_object_id"], "display_name": "arcfleet-lab"}],
        "federated_credentials": [{"client_id": spec["client_id"], "issuer": FEDERATED_ISSUER,
                                   "subject": FEDERATED_SUBJECT, "audiences": [FEDERATED_AUDIENCE]}],
        "clusters": [
            {key: value for key, value in cluster.items() if key != "token"} for cluster in spec["clusters"]
        ],
        "node_counts": {},
        "faults": {"throttle_next": 0, "throttle_forever": False, "retry_after_seconds": 1},
    }
    for device in spec["devices"]:
        state["node_counts"][device["cluster"]] = state["node_counts"].get(device["cluster"], 0) + 1
    state.update(spec.get("emulator", {}))
    k3s_standin.write_json_atomic(lab["emulator_state"], state)


def federated_token(lifetime_seconds=7 * 86400):
    """Return an unsigned-looking JWT the emulator accepts as a federated assertion."""
    now = int(time.time())
    header = {"alg": "RS256", "kid": "arcfleet-lab", "typ": "JWT"}
    payload = {"aud": [FEDERATED_AUDIENCE], "exp": now + lifetime_seconds, "iat": now, "iss": FEDERATED_ISSUER,
               "nbf": now, "sub": FEDERATED_SUBJECT}

    def encode(part):
        return base64.urlsafe_b64encode(json.dumps(part, separators=(",", ":")).encode()).rstrip(b"=").decode()

    return f"{encode(header)}.{encode(payload)}." + base64.urlsafe_b64encode(secrets.token_bytes(64)).rstrip(b"=").decode()


def known_hosts_name(host, port):
    """Return the name OpenSSH records a host under: host, or [host]:port off port 22."""
    return host if port == 22 else f"[{host}]:{port}"


def manifest_devices(lab, spec, roots, ready, addresses):
    """Return the manifest's device entries and the known_hosts lines."""
    devices, known_hosts_lines = [], []
    for device in spec["devices"]:
        port, pid = ready[device["name"]]
        host = addresses[device["name"]]
        device_dir = os.path.join(lab["dir"], "devices", device["name"])
        with open(device_dir + "/ssh_host_ed25519_key.pub", encoding="utf-8") as handle:
            key_type, key = handle.read().split()[:2]
        known_hosts_lines.append(f"{known_hosts_name(host, port)} {key_type} {key}")
        root, unit_name = roots[device["name"]]
        devices.append({
            "name": device["name"], "host": host, "port": port, "user": device["user"],
            "role": device["role"], "cluster": device["cluster"], "labels": device["labels"],
            "node_ip": device["node_ip"], "unit": unit_name, "root": root,
            "standin_dir": root + k3s_standin.STANDIN_DIR, "sshd_pid": pid, "sshd_log": device_dir + "/sshd.log",
            "host_certificate": device["host_certificate"], "sudo_password": device["sudo_password"],
        })
    return devices, known_hosts_lines


def write_outputs(lab, spec, clusters, roots, ready, emulator_port, addresses, bastion):
    """Write known_hosts, the ssh_config, the federated token, the inventories and
    manifest.json; return the manifest path."""
    lab_dir = lab["dir"]
    devices, known_hosts_lines = manifest_devices(lab, spec, roots, ready, addresses)
    if bastion:
        known_hosts_lines.append(bastion["known_hosts_line"])
    known_hosts = os.path.join(lab_dir, "ssh", "known_hosts")
    write_file(known_hosts, "\n".join(known_hosts_lines) + "\n")
    ssh_config = os.path.join(lab_dir, "ssh", "config")
    write_file(ssh_config, ssh_config_text(lab, known_hosts, devices, bastion))
    federated_token_file = os.path.join(lab_dir, "federated_token.jwt")
    write_file(federated_token_file, federated_token(), 0o600)
    inventory_csv = os.path.join(lab_dir, "inventory.csv")
    inventory_yaml = os.path.join(lab_dir, "inventory.yaml")
    write_inventories(inventory_csv, inventory_yaml, devices, clusters)

    base_url = f"http://127.0.0.1:{emulator_port}/"
    cluster_keys = ("name", "subscription", "resource_group", "location", "issuer_url",
                    "oidc_enabled", "workload_identity_enabled", "exists", "forbidden")
    manifest = {
        "dir": lab_dir,
        "arm_endpoint": base_url,
        "authority_host": base_url,
        "tenant_id": spec["tenant_id"],
        "client_id": spec["client_id"],
        "client_secret": spec["client_secret"],
        "client_object_id": spec["client_object_id"],
        "federated_token_file": federated_token_file,
        "federated_issuer": FEDERATED_ISSUER,
        "identity_file": lab["identity_file"],
        "known_hosts": known_hosts,
        "authorized_keys": lab["authorized_keys"],
        "ssh_config": ssh_config,
        "host_ca_public_key": lab["host_ca"] + ".pub",
        "user_ca_key": lab["user_ca"],
        "bastion": bastion,
        "inventory_csv": inventory_csv,
        "inventory_yaml": inventory_yaml,
        "emulator_log": lab["emulator_log"],
        "emulator_state": lab["emulator_state"],
        "emulator_port": emulator_port,
        "oidc_port": lab["oidc_port"],
        "ca_file": lab["ca_file"],
        "lab_user": LAB_USER,
        "default_issuer": f"https://kubernetes.default.svc.{k3s_model.DEFAULT_CLUSTER_DOMAIN}",
        "clusters": [{key: cluster[key] for key in cluster_keys} for cluster in clusters.values()],
        "devices": devices,
    }
    path = os.path.join(lab_dir, "manifest.json")
    k3s_standin.write_json_atomic(path, manifest)
    return path


def ssh_config_text(lab, known_hosts, devices, bastion):
    """Return an OpenSSH client configuration for the lab: `ssh -F FILE -p PORT USER@HOST`
    reaches any device, through the bastion when there is one."""
    lines = ["# OpenSSH client configuration of an arcfleet lab."]
    if bastion:
        hosts = " ".join(device["host"] for device in devices)
        lines += ["Host lab-bastion", f"    HostName {bastion['host']}", f"    Port {bastion['port']}",
                  f"    User {bastion['user']}", "", f"Host {hosts}", "    ProxyJump lab-bastion", ""]
    lines += ["Host *", f"    IdentityFile {lab['identity_file']}", "    IdentitiesOnly yes",
              f"    UserKnownHostsFile {known_hosts}", "    StrictHostKeyChecking yes", "    BatchMode yes",
              "    ConnectTimeout 10", ""]
    return "\n".join(lines)


def write_inventories(csv_path, yaml_path, devices, clusters):
    with open(csv_path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["name", "host", "port", "user", "subscription", "resource_group", "cluster", "role", "labels"])
        for device in devices:
            cluster = clusters[device["cluster"]]
            labels = ";".join(f"{key}={value}" for key, value in sorted(device["labels"].items()))
            writer.writerow([device["name"], device["host"], device["port"], device["user"], cluster["subscription"],
                             cluster["resource_group"], device["cluster"], device["role"], labels])

    def flow(mapping):
        return yaml.safe_dump(mapping, default_flow_style=True, sort_keys=False, width=1 << 20).strip()

    lines = ["defaults:", "  user: root", "  port: 22", "clusters:"]
    for name, cluster in clusters.items():
        entry = {"subscription": cluster["subscription"], "resource_group": cluster["resource_group"], "name": name}
        lines.append(f"  {flow({name: entry})[1:-1]}")
    lines.append("devices:")
    for device in devices:
        entry = {key: device[key] for key in ("name", "host", "port", "user", "role", "cluster", "labels")}
        lines.append(f"  - {flow(entry)}")
    with open(yaml_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def lab_processes(lab_dir, registry_data):
    """Return {pid: description} of live processes the lab started.

    A process counts when it runs in one of the device mount namespaces and
    its mounts come from this lab's device directories, or when it is the
    lab's sshd or emulator process.
    """
    devices_dir = os.path.join(lab_dir, "devices") + "/"
    namespaces = set(registry_data.get("namespaces", {}).values())
    networks = set()
    for name in registry_data.get("netns", []):
        with contextlib.suppress(FileNotFoundError):
            networks.add(f"net:[{os.stat(f'/run/netns/{name}').st_ino}]")
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            if os.readlink(f"/proc/{pid}/ns/net") in networks:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    found[pid] = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
                continue
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
            if namespace not in namespaces:
                continue
            with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="replace") as handle:
                if devices_dir not in handle.read():
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                found[pid] = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    for pid, marker in [(registry_data.get("emulator"), "azure_emulator.py"),
                        (registry_data.get("oidc_issuer"), "oidc_issuer.py")] + [
        (pid, "sshd") for pid in registry_data.get("sshd", {}).values()
    ]:
        if not pid or pid in found:
            continue
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
            if marker in command and lab_dir in command:
                found[pid] = command.strip()
    return found


def down(lab_dir, quiet=False):
    """Stop every process of the lab in ``lab_dir``. Does nothing when no lab runs there."""
    lab_dir = os.path.abspath(lab_dir)
    path = os.path.join(lab_dir, "pids.json")
    if not os.path.exists(path):
        if not quiet:
            print(f"lab down: no running lab in {lab_dir}")
        return 0
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    processes = lab_processes(lab_dir, data)
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(_alive(pid) for pid in processes):
        time.sleep(0.02)
    survivors = [pid for pid in processes if _alive(pid)]
    for pid in survivors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in processes:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    delete_networks(data.get("netns", []))
    os.replace(path, os.path.join(lab_dir, "pids.stopped.json"))
    if not quiet:
        print(f"lab down: stopped {len(processes)} processes ({len(survivors)} needed SIGKILL) in {lab_dir}")
    return 0


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description="arcfleet test lab: SSH devices with a K3s stand-in and an Azure emulator")
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="start a lab and write DIR/manifest.json")
    up_parser.add_argument("--dir", required=True, help="lab directory (created if missing)")
    up_parser.add_argument("--spec", required=True, help="spec JSON file (see tests/lab/README.md)")
    down_parser = commands.add_parser("down", help="stop every process of the lab in DIR")
    down_parser.add_argument("--dir", required=True, help="lab directory given to 'up'")
    spec_parser = commands.add_parser("spec", help="print a default spec JSON")
    spec_parser.add_argument("--devices", type=int, required=True, help="number of devices")
    spec_parser.add_argument("--clusters", type=int, default=1, help="number of clusters, devices spread round-robin (default 1)")
    spec_parser.add_argument("--agents", type=int, default=0, help="how many of the devices are K3s agents (default 0)")
    spec_parser.add_argument("--user-devices", type=int, default=0, help=f"how many devices log in as {LAB_USER} with sudo (default 0)")
    spec_parser.add_argument("--bastion", action="store_true", help="put the devices behind a bastion in network namespaces")
    spec_parser.add_argument("--seed", type=int, help="random seed for the subscription id (default: random)")
    args = parser.parse_args(argv)
    try:
        if args.command == "spec":
            spec = default_spec(args.devices, args.clusters, args.agents, args.user_devices, args.seed, args.bastion)
            print(json.dumps(spec, indent=2))
            return 0
        if os.geteuid() != 0:
            raise LabError("lab.py must run as root, because it creates mount namespaces and starts sshd. Run it with sudo.")
        if args.command == "up":
            up(args.dir, args.spec)
            return 0
        return down(args.dir)
    except LabError as error:
        print(f"lab.py {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
