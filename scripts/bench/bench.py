#!/usr/bin/python3
"""Measure arcfleet beside ansible-core and pyinfra on lab devices, and arcfleet alone at scale.

    bench.py compare --devices N --runs R --work DIR --venv VENV [--tools arcfleet,ansible,pyinfra]
    bench.py scale --devices 100,300,1000 --runs R --work DIR [--concurrency C]

Both start the lab of tests/lab (real sshd devices on 127.0.0.1 with a K3s stand-in, and
the Azure emulator), one single-server cluster per device, so that no tool waits for
another server of the same cluster. Every tool gets a fresh lab, so that its first
converge changes every device.

``compare`` runs, per repetition and tool: (a) converge, which changes every device,
(b) the same converge again, which changes nothing, and (c) an audit. ``scale`` runs
arcfleet only: audit, converge, converge again and audit, for each device count.

For each run it records these figures:

* the wall time;
* the controller's CPU time, from a cgroup that contains the tool and every process it
  starts, so Ansible's ssh control masters, which outlive ansible-playbook, count too;
* the devices' CPU time, from a cgroup that contains every lab sshd and what it starts;
* the Azure emulator's CPU time, from a cgroup of its own;
* the largest resident set of one controller process (getrusage ru_maxrss);
* the controller cgroup's peak memory, where the memory controller is available.

After each run it checks on the lab's files that the run did what it should: (a) wrote
arcfleet's drop-in and restarted K3s exactly once on every device, and (b) and (c)
changed nothing.

Needs root, as the lab does. Writes results.json and results.md in the work directory
and prints the Markdown tables. Sends nothing to any address but 127.0.0.1.
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(BENCH_DIR))
LAB_PY = os.path.join(REPO, "tests", "lab", "lab.py")
# The lab needs PyYAML from Debian's python3-yaml, so it runs on the system Python.
LAB_PYTHON = "/usr/bin/python3"
DROPIN = "/etc/rancher/k3s/config.yaml.d/zz-arcfleet-oidc-issuer.yaml"
# Ansible forks and pyinfra --parallel are set to arcfleet's default --concurrency.
PARALLELISM = 50
# The environment variables arcfleet reads, and the manifest keys that fill them.
AZURE_ENV = (
    ("ARCFLEET_ARM_ENDPOINT", "arm_endpoint"),
    ("AZURE_AUTHORITY_HOST", "authority_host"),
    ("AZURE_TENANT_ID", "tenant_id"),
    ("AZURE_CLIENT_ID", "client_id"),
    ("AZURE_CLIENT_SECRET", "client_secret"),
    ("SSL_CERT_FILE", "ca_file"),
)


class BenchError(Exception):
    """A setup or check failure, with a message for the user."""


# ---------------------------------------------------------------------------
# Cgroups


def cgroup_mounts():
    """Return {controller: mount point} for cgroup v1 and {"unified": mount point} for v2."""
    mounts = {}
    with open("/proc/mounts", encoding="utf-8") as handle:
        for line in handle:
            _source, target, fstype, options = line.split()[:4]
            if fstype == "cgroup2":
                mounts["unified"] = target
            elif fstype == "cgroup":
                for option in options.split(","):
                    mounts.setdefault(option, target)
    return mounts


def own_cgroup_paths():
    """Return {controller: path} of this process, and {"unified": path} for v2."""
    paths = {}
    with open("/proc/self/cgroup", encoding="utf-8") as handle:
        for line in handle:
            _hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == "":
                paths["unified"] = path
            for controller in controllers.split(","):
                paths[controller] = path
    return paths


class Cgroup:
    """A group of processes whose CPU time and, where possible, peak memory are read.

    CPU comes from cgroup v1 ``cpuacct`` when it is mounted, else from v2 ``cpu.stat``.
    Peak memory comes from v1 ``memory.max_usage_in_bytes`` or v2 ``memory.peak``; both
    count page cache the group's processes touched, not only their resident memory.
    The v1 groups are made inside this process's own groups, so that limits placed on
    the caller still apply. The v2 groups are made at the root of the hierarchy.
    """

    def __init__(self, name):
        mounts = cgroup_mounts()
        own = own_cgroup_paths()
        self.dirs = []
        self.cpu_dir = self.memory_dir = None
        self.cpu_kind = self.memory_kind = None
        if "cpuacct" in mounts:
            self.cpu_dir = self._make(mounts["cpuacct"], own.get("cpuacct", "/"), name)
            self.cpu_kind = "v1"
        if "memory" in mounts:
            self.memory_dir = self._make(mounts["memory"], own.get("memory", "/"), name)
            self.memory_kind = "v1"
        if "unified" in mounts and (self.cpu_dir is None or self.memory_dir is None):
            unified = self._make(mounts["unified"], "/", name)
            if self.cpu_dir is None and os.path.exists(os.path.join(unified, "cpu.stat")):
                self.cpu_dir, self.cpu_kind = unified, "v2"
            if self.memory_dir is None and os.path.exists(os.path.join(unified, "memory.peak")):
                self.memory_dir, self.memory_kind = unified, "v2"
        if self.cpu_dir is None:
            raise BenchError("no cgroup hierarchy with CPU accounting (cpuacct or cgroup2 cpu.stat) is mounted")

    def _make(self, mount, parent, name):
        path = os.path.join(mount, parent.lstrip("/"), name)
        os.makedirs(path, exist_ok=True)
        self.dirs.append(path)
        return path

    def join(self):
        """Move the calling process into the group; meant for ``preexec_fn``."""
        for directory in self.dirs:
            with open(os.path.join(directory, "cgroup.procs"), "w", encoding="ascii") as handle:
                handle.write("0")

    def add(self, pid):
        for directory in self.dirs:
            with open(os.path.join(directory, "cgroup.procs"), "w", encoding="ascii") as handle:
                handle.write(str(pid))

    def pids(self):
        with open(os.path.join(self.cpu_dir, "cgroup.procs"), encoding="ascii") as handle:
            return [int(line) for line in handle if line.strip()]

    def cpu_seconds(self):
        """Return (user, system, total) CPU seconds used by the group since it was made.

        The total is exact (cgroup v1 ``cpuacct.usage``, v2 ``usage_usec``). The v1 user and
        system split is sampled at timer ticks, so it undercounts a process that runs in
        short bursts, such as arcfleet waiting on 50 devices.
        """
        if self.cpu_kind == "v1":
            def read(name):
                with open(os.path.join(self.cpu_dir, name), encoding="ascii") as handle:
                    return int(handle.read()) / 1e9
            return read("cpuacct.usage_user"), read("cpuacct.usage_sys"), read("cpuacct.usage")
        stat = {}
        with open(os.path.join(self.cpu_dir, "cpu.stat"), encoding="ascii") as handle:
            for line in handle:
                key, value = line.split()
                stat[key] = int(value)
        return stat["user_usec"] / 1e6, stat["system_usec"] / 1e6, stat["usage_usec"] / 1e6

    def reset_peak(self):
        """Start a new peak. On cgroup v1, first reclaim the page cache earlier runs left
        in the group (``memory.force_empty``), which would otherwise count towards it."""
        if self.memory_kind == "v1":
            with contextlib.suppress(OSError):
                with open(os.path.join(self.memory_dir, "memory.force_empty"), "w", encoding="ascii") as handle:
                    handle.write("0")
            with open(os.path.join(self.memory_dir, "memory.max_usage_in_bytes"), "w", encoding="ascii") as handle:
                handle.write("0")
        elif self.memory_kind == "v2":
            # NOTE: writing to memory.peak resets it only on Linux 6.12 and later. On older
            # kernels the write fails, so the peak covers the group's whole life.
            with contextlib.suppress(OSError):
                with open(os.path.join(self.memory_dir, "memory.peak"), "w", encoding="ascii") as handle:
                    handle.write("0")

    def peak_bytes(self):
        if self.memory_kind is None:
            return None
        name = "memory.max_usage_in_bytes" if self.memory_kind == "v1" else "memory.peak"
        with open(os.path.join(self.memory_dir, name), encoding="ascii") as handle:
            return int(handle.read())

    def stop_processes(self):
        """Stop the processes left in the group (ssh control masters); return how many."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def remove(self):
        for directory in reversed(self.dirs):
            try:
                os.rmdir(directory)
            except OSError as error:
                print(f"bench: cannot remove cgroup {directory}: {error}", file=sys.stderr)


class Groups:
    """The three groups of a benchmark: the tool, the devices and the Azure emulator."""

    def __init__(self):
        tag = f"arcfleet-bench-{os.getpid()}"
        self.controller = Cgroup(f"{tag}-controller")
        self.devices = Cgroup(f"{tag}-devices")
        self.azure = Cgroup(f"{tag}-azure")

    def remove(self):
        self.controller.stop_processes()
        for group in (self.controller, self.devices, self.azure):
            group.remove()


# ---------------------------------------------------------------------------
# Lab


def bench_spec(devices):
    """Return a lab spec with one single-server cluster per device.

    Clusters sit ten to a resource group in four subscriptions, so arcfleet reads them
    from ARM with list requests, as it would on a real fleet.
    """
    width = max(3, len(str(devices)))
    subscriptions = [f"5f0c1d2e-0000-4a1b-8c3d-{index:012d}" for index in range(4)]
    clusters, device_specs = [], []
    for index in range(devices):
        group = index // 10
        name = f"site-{index + 1:0{width}d}"
        clusters.append({
            "name": name,
            "subscription": subscriptions[group % len(subscriptions)],
            "resource_group": f"rg-sites-{group:04d}",
            "location": "eastus",
        })
        device_specs.append({"name": f"edge-{index + 1:0{width}d}", "cluster": name, "role": "server",
                             "labels": {"site": name}})
    return {"clusters": clusters, "devices": device_specs}


class Lab:
    """One lab from tests/lab, started with its devices in the devices cgroup."""

    def __init__(self, directory, devices, groups):
        self.dir = directory
        self.groups = groups
        self.count = devices
        self.manifest = None

    def up(self):
        os.makedirs(self.dir, exist_ok=True)
        spec_path = os.path.join(self.dir, "..", os.path.basename(self.dir) + "-spec.json")
        with open(spec_path, "w", encoding="utf-8") as handle:
            json.dump(bench_spec(self.count), handle)
        started = time.monotonic()
        result = subprocess.run([LAB_PYTHON, LAB_PY, "up", "--dir", self.dir, "--spec", spec_path],
                                preexec_fn=self.groups.devices.join, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BenchError(f"lab up failed:\n{result.stdout}{result.stderr}")
        with open(os.path.join(self.dir, "manifest.json"), encoding="utf-8") as handle:
            self.manifest = json.load(handle)
        with open(os.path.join(self.dir, "pids.json"), encoding="utf-8") as handle:
            pids = json.load(handle)
        # The emulator and the OIDC issuer server stand in for Azure, not for devices.
        for key in ("emulator", "oidc_issuer"):
            if pids.get(key):
                self.groups.azure.add(pids[key])
        return time.monotonic() - started

    def down(self):
        subprocess.run([LAB_PYTHON, LAB_PY, "down", "--dir", self.dir], capture_output=True, check=False)

    def issuers(self):
        """Return {device name: Arc issuer of its cluster}."""
        by_cluster = {cluster["name"]: cluster["issuer_url"] for cluster in self.manifest["clusters"]}
        return {device["name"]: by_cluster[device["cluster"]] for device in self.manifest["devices"]}

    def azure_env(self):
        return {name: str(self.manifest[key]) for name, key in AZURE_ENV}

    def converge_from_host(self):
        """Write arcfleet's drop-in into every device tree and restart K3s from the host.

        Ends in the state a converge leaves, without SSH, for benchmarks of the no-op run
        and the audit alone.
        """
        sys.path.insert(0, os.path.dirname(LAB_PY))
        import k3s_standin  # pylint: disable=import-outside-toplevel

        issuers = self.issuers()
        for device in self.manifest["devices"]:
            path = device["root"] + DROPIN
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(expected_dropin(issuers[device["name"]]))
            os.chmod(path, 0o600)
            k3s_standin.start_initial(device["root"], device["unit"])

    def snapshot(self):
        """Return {device: (restart records, drop-in text or None)} read from the device trees."""
        state = {}
        for device in self.manifest["devices"]:
            restarts = []
            with contextlib.suppress(FileNotFoundError):
                with open(os.path.join(device["standin_dir"], "restarts.log"), encoding="utf-8") as handle:
                    restarts = [json.loads(line) for line in handle if line.strip()]
            dropin = None
            with contextlib.suppress(FileNotFoundError):
                with open(device["root"] + DROPIN, encoding="utf-8") as handle:
                    dropin = handle.read()
            state[device["name"]] = (restarts, dropin)
        return state


def expected_dropin(issuer):
    """Return the drop-in arcfleet writes for ``issuer``, as docs/convergence.md shows it."""
    return (
        "# Written by arcfleet; the next converge replaces this file, so keep other settings\n"
        "# in other files. kube-apiserver signs service-account tokens with the first\n"
        "# service-account-issuer (the cluster's Azure Arc OIDC issuer) and accepts the rest.\n"
        "kube-apiserver-arg+:\n"
        f'  - "service-account-issuer-={issuer}"\n'
        '  - "service-account-max-token-expiration=24h"\n'
    )


def check_run(lab, before, after, changes):
    """Return the problems found when comparing device state before and after a run.

    With ``changes``, every device must have arcfleet's drop-in and exactly one new,
    successful restart that signs with the Arc issuer; without, nothing may change.
    """
    problems = []
    issuers = lab.issuers()
    for name, (restarts_before, dropin_before) in before.items():
        restarts_after, dropin_after = after[name]
        new = restarts_after[len(restarts_before):]
        if changes:
            if dropin_after != expected_dropin(issuers[name]):
                problems.append(f"{name}: the drop-in is not arcfleet's")
            if len(new) != 1:
                problems.append(f"{name}: {len(new)} K3s restarts, expected 1")
            elif new[0].get("result") != "success" or new[0].get("signing_issuer") != issuers[name]:
                problems.append(f"{name}: the restart ended {new[0].get('result')} signing with "
                                f"{new[0].get('signing_issuer')}")
        else:
            if new:
                problems.append(f"{name}: {len(new)} K3s restarts, expected none")
            if dropin_after != dropin_before:
                problems.append(f"{name}: the drop-in changed")
    return problems


# ---------------------------------------------------------------------------
# Tools


class Tool:
    """How to run one tool's converge and audit against a lab."""

    name = ""

    def __init__(self, options):
        self.options = options

    def prepare(self, lab, work):
        """Write what the tool needs for ``lab`` (inventories) under ``work``."""
        self.lab = lab
        self.work = work
        os.makedirs(work, exist_ok=True)

    def command(self, mode, run_dir):
        """Return (argv, env, cwd) for ``mode`` (converge or audit)."""
        raise NotImplementedError

    def base_env(self, run_dir):
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": run_dir, "LANG": "C.UTF-8"}


class Arcfleet(Tool):
    name = "arcfleet"

    def command(self, mode, run_dir, concurrency=PARALLELISM):
        manifest = self.lab.manifest
        argv = [self.options.arcfleet, mode, "--inventory", manifest["inventory_yaml"],
                "--identity", manifest["identity_file"], "--known-hosts", manifest["known_hosts"],
                "--playbook", os.path.join(BENCH_DIR, "arcfleet-playbook.yaml"),
                "--run-dir", os.path.join(run_dir, "records"), "--failed-list", os.path.join(run_dir, "failed.txt"),
                "--concurrency", str(concurrency), "--quiet",
                # The lab's devices share this machine's CPUs, so under load one command can
                # wait in the run queue for more than the default 60s. Ansible and pyinfra
                # set no command timeout at all.
                "--command-timeout", "600s"]
        env = self.base_env(run_dir)
        env.update(self.lab.azure_env())
        return argv, env, run_dir


class Ansible(Tool):
    name = "ansible"

    def prepare(self, lab, work):
        super().prepare(lab, work)
        manifest = lab.manifest
        issuers = lab.issuers()
        ssh_args = (f"-o UserKnownHostsFile={manifest['known_hosts']} -o StrictHostKeyChecking=yes")
        hosts = {}
        for device in manifest["devices"]:
            hosts[device["name"]] = {"ansible_host": device["host"], "ansible_port": device["port"],
                                     "ansible_user": device["user"], "arc_issuer": issuers[device["name"]]}
        inventory = {"k3s_servers": {"hosts": hosts, "vars": {
            "ansible_ssh_private_key_file": manifest["identity_file"],
            "ansible_ssh_common_args": ssh_args}}}
        self.inventory = os.path.join(work, "ansible-inventory.json")
        with open(self.inventory, "w", encoding="utf-8") as handle:
            json.dump(inventory, handle)

    def command(self, mode, run_dir):
        playbook = os.path.join(BENCH_DIR, "ansible", f"{mode}.yml")
        argv = [os.path.join(self.options.venv, "bin", "ansible-playbook"), "-i", self.inventory, playbook]
        env = self.base_env(run_dir)
        env["PATH"] = os.path.join(self.options.venv, "bin") + ":" + env["PATH"]
        env.update({
            "ANSIBLE_CONFIG": os.path.join(BENCH_DIR, "ansible", "ansible.cfg"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": os.path.join(run_dir, "cp"),
            "ANSIBLE_LOCAL_TEMP": os.path.join(run_dir, "tmp"),
            "ANSIBLE_FORKS": str(PARALLELISM),
        })
        return argv, env, run_dir


class Pyinfra(Tool):
    name = "pyinfra"

    def prepare(self, lab, work):
        super().prepare(lab, work)
        manifest = lab.manifest
        issuers = lab.issuers()
        hosts = []
        for device in manifest["devices"]:
            hosts.append((device["name"], {
                "ssh_hostname": device["host"], "ssh_port": device["port"], "ssh_user": device["user"],
                "ssh_key": manifest["identity_file"], "ssh_known_hosts_file": manifest["known_hosts"],
                "ssh_strict_host_key_checking": "yes", "ssh_allow_agent": False, "ssh_look_for_keys": False,
                "arc_issuer": issuers[device["name"]],
            }))
        self.inventory = os.path.join(work, "pyinfra_inventory.py")
        with open(self.inventory, "w", encoding="utf-8") as handle:
            handle.write("# Written by scripts/bench/bench.py from the lab manifest.\n")
            handle.write(f"k3s_servers = {hosts!r}\n")

    def command(self, mode, run_dir):
        deploy = os.path.join(BENCH_DIR, "pyinfra", f"{mode}.py")
        argv = [os.path.join(self.options.venv, "bin", "pyinfra"), "-y", "--parallel", str(PARALLELISM),
                self.inventory, deploy]
        env = self.base_env(run_dir)
        env["PATH"] = os.path.join(self.options.venv, "bin") + ":" + env["PATH"]
        # pyinfra imports k3s_issuer.py from its working directory.
        return argv, env, os.path.join(BENCH_DIR, "pyinfra")


TOOLS = {tool.name: tool for tool in (Arcfleet, Ansible, Pyinfra)}


# ---------------------------------------------------------------------------
# Measuring one run


def load_average():
    with open("/proc/loadavg", encoding="ascii") as handle:
        return float(handle.read().split()[0])


def measure(argv, env, cwd, groups, log_path):
    """Run argv in the controller cgroup and return its measurements."""
    before = {name: getattr(groups, name).cpu_seconds() for name in ("controller", "devices", "azure")}
    groups.controller.reset_peak()
    load = load_average()
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, preexec_fn=groups.controller.join)
        _pid, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    after = {name: getattr(groups, name).cpu_seconds() for name in ("controller", "devices", "azure")}
    peak = groups.controller.peak_bytes()
    leftovers = groups.controller.stop_processes()

    def delta(name):
        return after[name][2] - before[name][2]

    return {
        "exit": process.returncode,
        "wall_s": wall,
        "controller_cpu_s": delta("controller"),
        "controller_user_s": after["controller"][0] - before["controller"][0],
        "controller_sys_s": after["controller"][1] - before["controller"][1],
        "rusage_cpu_s": usage.ru_utime + usage.ru_stime,
        "device_cpu_s": delta("devices"),
        "azure_cpu_s": delta("azure"),
        "maxrss_mb": usage.ru_maxrss / 1024,
        "cgroup_peak_mb": None if peak is None else peak / 2**20,
        "leftover_processes": leftovers,
        "load_before": load,
        "log": log_path,
    }


def run_mode(tool, mode, label, lab, groups, run_root, changes, extra=None):
    """Run one mode of a tool, check the devices afterwards and return the record."""
    run_dir = os.path.join(run_root, label)
    os.makedirs(os.path.join(run_dir, "cp"), exist_ok=True)
    argv, env, cwd = tool.command(mode, run_dir, **(extra or {}))
    before = lab.snapshot()
    record = measure(argv, env, cwd, groups, os.path.join(run_dir, "output.log"))
    record["problems"] = check_run(lab, before, lab.snapshot(), changes)
    record.update({"tool": tool.name, "run": label, "devices": lab.count})
    # An arcfleet audit before any change reports every device as would-change and exits 3
    # (devices-failed), which is its expected result there.
    expected_exit = 3 if (tool.name == "arcfleet" and label == "audit-before") else 0
    if record["exit"] != expected_exit:
        record["problems"].insert(0, f"exit status {record['exit']}, expected {expected_exit}; see {record['log']}")
    status = "ok" if not record["problems"] else "CHECK FAILED: " + "; ".join(record["problems"][:5])
    print(f"  {tool.name:8} {label:13} wall {record['wall_s']:7.2f} s  controller CPU {record['controller_cpu_s']:7.2f} s"
          f"  device CPU {record['device_cpu_s']:7.2f} s  maxrss {record['maxrss_mb']:6.1f} MB  {status}",
          flush=True)
    return record


def cross_audit(lab, groups, options, run_root):
    """Run arcfleet audit (not measured) after another tool, to show its result is arcfleet's."""
    arcfleet = Arcfleet(options)
    arcfleet.prepare(lab, run_root)
    run_dir = os.path.join(run_root, "cross-audit")
    os.makedirs(run_dir, exist_ok=True)
    argv, env, cwd = arcfleet.command("audit", run_dir)
    with open(os.path.join(run_dir, "output.log"), "wb") as log:
        result = subprocess.run(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, check=False)
    return result.returncode


# ---------------------------------------------------------------------------
# Summaries


def machine_info():
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    with open("/proc/meminfo", encoding="ascii") as handle:
        memory_kib = int(handle.readline().split()[1])
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(memory_kib / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "nofile_soft_limit": __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)[0]}


def median(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def number(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def compare_table(records, devices):
    """Return the Markdown table of medians, with ratios to arcfleet within each repetition."""
    lines = [
        f"| tool | run | wall s | controller CPU s | controller CPU ms/device | device CPU s "
        f"| max RSS MB | controller cgroup peak MB | wall ÷ arcfleet | controller CPU ÷ arcfleet | device CPU ÷ arcfleet |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    good = [record for record in records if not record["problems"]]
    for run in ("converge", "noop", "audit"):
        for tool in TOOLS:
            mine = [record for record in good if record["tool"] == tool and record["run"] == run]
            if not mine:
                continue
            ratios = {}
            for key in ("wall_s", "controller_cpu_s", "device_cpu_s"):
                values = []
                for record in mine:
                    base = next((other for other in good if other["tool"] == "arcfleet" and other["run"] == run
                                 and other["repetition"] == record["repetition"]), None)
                    if base and base[key] > 0:
                        values.append(record[key] / base[key])
                ratios[key] = median(values)
            cpu = median([record["controller_cpu_s"] for record in mine])
            lines.append(
                f"| {tool} | {run} | {number(median([r['wall_s'] for r in mine]))} | {number(cpu)} "
                f"| {number(cpu * 1000 / devices, 1)} | {number(median([r['device_cpu_s'] for r in mine]))} "
                f"| {number(median([r['maxrss_mb'] for r in mine]), 1)} "
                f"| {number(median([r['cgroup_peak_mb'] for r in mine]), 1)} "
                f"| {number(ratios['wall_s'], 1)} | {number(ratios['controller_cpu_s'], 1)} "
                f"| {number(ratios['device_cpu_s'], 1)} |")
    return "\n".join(lines) + "\n"


def scale_table(records):
    lines = [
        "| devices | run | wall s | wall ms/device | controller CPU s | controller CPU ms/device "
        "| device CPU s | max RSS MB | runs |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    good = [record for record in records if not record["problems"]]
    for devices in sorted({record["devices"] for record in good}):
        for run in ("audit-before", "converge", "noop", "audit"):
            mine = [record for record in good if record["devices"] == devices and record["run"] == run]
            if not mine:
                continue
            wall = median([record["wall_s"] for record in mine])
            cpu = median([record["controller_cpu_s"] for record in mine])
            lines.append(
                f"| {devices} | {run} | {number(wall)} | {number(wall * 1000 / devices, 1)} | {number(cpu)} "
                f"| {number(cpu * 1000 / devices, 2)} | {number(median([r['device_cpu_s'] for r in mine]))} "
                f"| {number(median([r['maxrss_mb'] for r in mine]), 1)} | {len(mine)} |")
    return "\n".join(lines) + "\n"


def write_results(work, kind, records, table, extra):
    document = {"kind": kind, "machine": machine_info(), "records": records, **extra}
    with open(os.path.join(work, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1)
    loads = [record["load_before"] for record in records]
    header = (f"Machine: {document['machine']['cpus']} CPUs ({document['machine']['cpu_model']}), "
              f"{document['machine']['memory_gib']} GiB, Linux {document['machine']['kernel']}; "
              f"1-minute load average before the runs: median {number(median(loads), 1)}, "
              f"max {number(max(loads) if loads else None, 1)}.\n\n")
    with open(os.path.join(work, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(header + table)
    print("\n" + header + table)
    failed = [record for record in records if record["problems"]]
    for record in failed:
        print(f"bench: {record['tool']} {record['run']} (repetition {record.get('repetition')}) "
              f"failed its checks: {'; '.join(record['problems'][:5])}", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------------
# Commands


def stop_on_sigterm(_signal, _frame):
    raise SystemExit("stopped by SIGTERM")


def compare(options):
    tools = [TOOLS[name](options) for name in options.tools]
    groups = Groups()
    records, cross = [], []
    try:
        for repetition in range(1, options.runs + 1):
            # Tools take turns within each repetition, so that changing load affects all.
            order = tools[repetition - 1:] + tools[:repetition - 1]
            for tool in order:
                root = os.path.join(options.work, f"rep{repetition}-{tool.name}")
                lab = Lab(os.path.join(root, "lab"), options.devices, groups)
                seconds = lab.up()
                print(f"repetition {repetition}, {tool.name}: lab of {options.devices} devices up in {seconds:.1f} s",
                      flush=True)
                try:
                    tool.prepare(lab, root)
                    if "converge" not in options.modes:
                        lab.converge_from_host()
                    runs = [("converge", "converge", True), ("converge", "noop", False), ("audit", "audit", False)]
                    for mode, label, changes in runs:
                        if label not in options.modes:
                            continue
                        record = run_mode(tool, mode, label, lab, groups, root, changes)
                        record["repetition"] = repetition
                        records.append(record)
                    if tool.name != "arcfleet":
                        status = cross_audit(lab, groups, options, root)
                        cross.append({"tool": tool.name, "repetition": repetition, "arcfleet_audit_exit": status})
                        print(f"  arcfleet audit after {tool.name}: exit {status}"
                              f" ({'compliant' if status == 0 else 'NOT compliant'})", flush=True)
                finally:
                    lab.down()
                    if not options.keep:
                        shutil.rmtree(os.path.join(root, "lab"), ignore_errors=True)
    except (KeyboardInterrupt, SystemExit) as stop:
        # The runs so far still make a table; the interrupted run is left out.
        print(f"bench: interrupted ({stop!r}); writing the results of the finished runs", file=sys.stderr)
    finally:
        groups.remove()
    for entry in cross:
        if entry["arcfleet_audit_exit"] != 0:
            records.append({"tool": entry["tool"], "run": "cross-audit", "repetition": entry["repetition"],
                            "problems": [f"arcfleet audit exited {entry['arcfleet_audit_exit']} after it"],
                            "load_before": 0.0})
    table = compare_table([record for record in records if record["run"] != "cross-audit"], options.devices)
    return write_results(options.work, "compare", records, table,
                         {"devices": options.devices, "runs": options.runs, "modes": options.modes,
                          "cross_audit": cross})


def scale(options):
    arcfleet = Arcfleet(options)
    groups = Groups()
    records = []
    try:
        for devices in options.devices:
            for repetition in range(1, options.runs + 1):
                root = os.path.join(options.work, f"n{devices}-rep{repetition}")
                lab = Lab(os.path.join(root, "lab"), devices, groups)
                seconds = lab.up()
                print(f"{devices} devices, repetition {repetition}: lab up in {seconds:.1f} s", flush=True)
                try:
                    arcfleet.prepare(lab, root)
                    for mode, label, changes in (("audit", "audit-before", False), ("converge", "converge", True),
                                                 ("converge", "noop", False), ("audit", "audit", False)):
                        record = run_mode(arcfleet, mode, label, lab, groups, root, changes,
                                          {"concurrency": options.concurrency})
                        record["repetition"] = repetition
                        record["concurrency"] = options.concurrency
                        records.append(record)
                finally:
                    lab.down()
                    if not options.keep:
                        shutil.rmtree(os.path.join(root, "lab"), ignore_errors=True)
    except (KeyboardInterrupt, SystemExit) as stop:
        print(f"bench: interrupted ({stop!r}); writing the results of the finished runs", file=sys.stderr)
    finally:
        groups.remove()
    return write_results(options.work, "scale", records, scale_table(records),
                         {"devices": options.devices, "runs": options.runs, "concurrency": options.concurrency})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("compare", "scale"):
        sub = commands.add_parser(name)
        sub.add_argument("--work", required=True, help="directory for labs, logs and results")
        sub.add_argument("--runs", type=int, default=3, help="repetitions; tables show medians (default 3)")
        sub.add_argument("--arcfleet", default=os.path.join(REPO, "target", "release", "arcfleet"),
                         help="arcfleet binary (default target/release/arcfleet)")
        sub.add_argument("--keep", action="store_true", help="keep each lab's directory after it stops")
    compare_parser = commands.choices["compare"]
    compare_parser.add_argument("--devices", type=int, default=100, help="lab devices (default 100)")
    compare_parser.add_argument("--venv", required=True, help="virtualenv with ansible-core and pyinfra")
    compare_parser.add_argument("--modes", type=lambda text: text.split(","), default=["converge", "noop", "audit"],
                                help="runs to measure, from converge,noop,audit (default all). Without converge, "
                                     "the devices are converged from the host before the first measured run")
    compare_parser.add_argument("--tools", type=lambda text: text.split(","), default=list(TOOLS),
                                help="comma-separated tools (default arcfleet,ansible,pyinfra)")
    scale_parser = commands.choices["scale"]
    scale_parser.add_argument("--devices", type=lambda text: [int(n) for n in text.split(",")],
                              default=[100, 300, 1000], help="comma-separated device counts (default 100,300,1000)")
    scale_parser.add_argument("--concurrency", type=int, default=PARALLELISM,
                              help=f"arcfleet --concurrency (default {PARALLELISM})")
    options = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.py: run as root: the lab starts sshd in mount namespaces and the benchmark makes cgroups",
              file=sys.stderr)
        return 2
    unknown = [name for name in getattr(options, "tools", []) if name not in TOOLS]
    if unknown:
        print(f"bench.py: unknown tools {unknown}; choose from {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    if not os.access(options.arcfleet, os.X_OK):
        print(f"bench.py: {options.arcfleet} is missing: run cargo build --release first", file=sys.stderr)
        return 2
    os.makedirs(options.work, exist_ok=True)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        return compare(options) if options.command == "compare" else scale(options)
    except BenchError as error:
        print(f"bench.py: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
