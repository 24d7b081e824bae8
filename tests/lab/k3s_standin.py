"""Stand-in for K3s, systemctl and journalctl on a lab device.

Each lab device has shims ``/usr/local/bin/k3s``, ``systemctl`` and
``journalctl`` that import this module and call ``main(sys.argv)``, and the
command name (``argv[0]``) selects the tool. There is no daemon. Every call
reads the files and the state under ``/var/lib/rancher/k3s/standin/``, works
out what systemd and K3s would have done by now, prints the result and
saves the new state.

A start of ``k3s.service`` or ``k3s-agent.service`` computes the effective
K3s flags and kube-apiserver arguments from the unit and config files as they
are at that moment (see ``k3s_model``). A valid start makes the unit active
and publishes the first ``service-account-issuer`` as the signing issuer. An
invalid start leaves the unit in ``activating (auto-restart)``, as with
``Restart=always``, and the API server stops responding.

Device-side files (all under /var/lib/rancher/k3s/standin/):

* ``state.json``    unit states, the last successful evaluation, deployment
                    rollout times (written atomically under ``.lock``)
* ``faults.json``   injected faults, read on every call (see FAULT_KEYS)
* ``cluster.json``  the Kubernetes objects of this node, written by the lab
* ``journal.jsonl`` journal entries printed by journalctl
* ``restarts.log``  one JSON line per start attempt
* ``rollouts.log``  one JSON line per ``kubectl rollout restart``
* ``calls.log``     one JSON line per call made as root: the tool, its arguments and
                    the command lines of its ancestor processes

Automatic restarts (``Restart=always``, ``RestartSec=5s``) happen lazily. The
first command run as root at least 5 s after a failure makes one attempt, so
NRestarts counts fewer attempts than systemd would when nothing runs.

For debugging from the host, ``K3S_STANDIN_ROOT=DIR/devices/NAME/root python3
k3s_standin.py systemctl status k3s`` runs a tool against a device's files.
"""

import contextlib
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import k3s_model as model  # noqa: E402

STANDIN_DIR = "/var/lib/rancher/k3s/standin"
KUBECONFIG = "/etc/rancher/k3s/k3s.yaml"
RESTART_SEC = 5.0
UNIT_DESCRIPTION = "Lightweight Kubernetes"

# Keys of faults.json. Missing keys mean no fault.
FAULT_KEYS = {
    "restart_hang": "systemctl start/restart blocks until killed; the unit stays activating",
    "restart_delay_seconds": "systemctl start/restart takes this long before it completes",
    "crash_after_seconds": "the unit fails this many seconds after a start and keeps failing",
    "reject_flags": "kube-apiserver flag names that fail the start as unknown flags",
    "api_unavailable": "the unit stays active but the API does not answer",
    "token_issuer": "tokens minted with kubectl create token carry this issuer, as when the "
    "kubeconfig reaches another API server that signs with a different issuer",
    "etcd_voter_after_seconds": "an embedded-etcd server reports EtcdIsVoter False for this long after a start",
    "only_when_config_contains": "the other faults apply only while a file under "
    "/etc/rancher/k3s contains this text, so a fault can follow a config change",
    "drop_connection_once": "the next systemctl start/restart kills the SSH connection it came "
    "through after the start has begun, then removes this key; the start goes on",
}


class Device:
    """Paths and state of one device, seen from inside (root "/") or from the host."""

    def __init__(self, root="/"):
        self.root = root

    def path(self, device_path):
        return model.device_path(self.root, device_path)

    def standin(self, name):
        return self.path(f"{STANDIN_DIR}/{name}")

    @property
    def is_root(self):
        return os.geteuid() == 0

    def cluster(self):
        return read_json(self.standin("cluster.json"), {})

    def faults(self):
        faults = read_json(self.standin("faults.json"), {})
        unknown = set(faults) - set(FAULT_KEYS)
        if unknown:
            print(f"k3s stand-in: faults.json has unknown keys {sorted(unknown)}, which are ignored. "
                  f"Known keys: {sorted(FAULT_KEYS)}", file=sys.stderr)
        trigger = faults.get("only_when_config_contains")
        if trigger and not self.config_contains(trigger):
            return {}
        return faults

    def config_contains(self, text):
        """Return whether any regular file under /etc/rancher/k3s contains text."""
        for directory, _dirs, names in os.walk(self.path("/etc/rancher/k3s")):
            for name in names:
                try:
                    with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as handle:
                        if text in handle.read():
                            return True
                except OSError:
                    continue
        return False

    @contextlib.contextmanager
    def locked(self):
        if not self.is_root:
            yield
            return
        with open(self.standin(".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def load_state(self):
        state = read_json(self.standin("state.json"), {})
        state.setdefault("units", {})
        state.setdefault("deployments", {})
        return state

    def save_state(self, state):
        if self.is_root:
            write_json_atomic(self.standin("state.json"), state)

    def journal(self, unit, ident, pid, message, timestamp=None):
        """Append one journal entry. Messages in logrus format get a time= prefix."""
        if not self.is_root:
            return
        timestamp = time.time() if timestamp is None else timestamp
        if message.startswith("level="):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
            message = f'time="{stamp}" {message}'
        append_line(self.standin("journal.jsonl"), {"ts": timestamp, "unit": unit, "ident": ident, "pid": pid, "msg": message})

    def journal_entries(self):
        entries = []
        with contextlib.suppress(FileNotFoundError):
            with open(self.standin("journal.jsonl"), encoding="utf-8") as handle:
                entries = [json.loads(line) for line in handle if line.strip()]
        return sorted(entries, key=lambda entry: entry["ts"])

    def log_restart(self, record):
        if self.is_root:
            append_line(self.standin("restarts.log"), record)


def read_json(path, default):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as error:
        print(f"k3s stand-in: invalid JSON in {path}: {error}. Using the defaults until the file is fixed.", file=sys.stderr)
        return default


def write_json_atomic(path, data):
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def append_line(path, record):
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


def systemd_timestamp(timestamp):
    """Format a time like systemctl show, for example 'Thu 2024-12-05 10:00:00 UTC'."""
    if not timestamp:
        return ""
    return time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(timestamp))


def normalize_unit(name):
    return name if "." in name else name + ".service"


# ---------------------------------------------------------------------------
# Unit state


def unit_record(device, state, unit_name):
    """Return the state record of a unit, or None when systemd does not know it.

    systemd loads a unit file the first time the unit is used and keeps that
    definition until daemon-reload, so the first use stores a snapshot.
    """
    record = state["units"].get(unit_name)
    if record is None:
        sources = model.read_unit_sources(device.root, unit_name)
        if not sources:
            return None
        record = state["units"][unit_name] = new_unit_record(sources)
    return record


def new_unit_record(sources):
    return {
        "loaded": sources,
        "enabled": True,
        "active_state": "inactive",
        "sub_state": "dead",
        "result": "success",
        "main_pid": 0,
        "n_restarts": 0,
        "next_attempt_at": None,
        "crash_loop": False,
        "restart_pid": None,
        "timestamps": {},
        "evaluation": None,
        "last_error": None,
    }


def needs_daemon_reload(device, unit_name, record):
    return model.read_unit_sources(device.root, unit_name) != record["loaded"]


def set_state(record, active_state, sub_state, now):
    """Change the unit state and its systemd timestamps."""
    before = record["active_state"]
    stamps = record["timestamps"]
    if before != active_state:
        if active_state == "active":
            stamps["ActiveEnterTimestamp"] = now
        if before == "active":
            stamps["ActiveExitTimestamp"] = now
        if active_state == "inactive":
            stamps["InactiveEnterTimestamp"] = now
        if before == "inactive":
            stamps["InactiveExitTimestamp"] = now
    stamps["StateChangeTimestamp"] = now
    record["active_state"] = active_state
    record["sub_state"] = sub_state


def api_is_up(device, state, faults=None):
    """Return True when the K3s API server of this device responds."""
    faults = device.faults() if faults is None else faults
    record = state["units"].get(model.SERVER_UNIT)
    return bool(record and record["active_state"] == "active" and not faults.get("api_unavailable"))


def refresh(device, state, now=None):
    """Apply what systemd did since the last call: crashes and automatic restarts.

    Only root writes state, so for other users only crashes are applied, and
    only in memory.
    """
    now = time.time() if now is None else now
    faults = device.faults()
    for unit_name, record in state["units"].items():
        crash_after = faults.get("crash_after_seconds")
        started = record["timestamps"].get("ExecMainStartTimestamp")
        if record["active_state"] == "active" and crash_after is not None and started and now >= started + crash_after:
            crash_time = started + crash_after
            fail_unit(device, unit_name, record, crash_time, "lab fault crash_after_seconds", [
                ("k3s", model.logrus_line("fatal", f"apiserver exited: crashed {crash_after} s after start (lab fault crash_after_seconds)")),
            ])
            record["crash_loop"] = True
        due = record.get("next_attempt_at")
        if device.is_root and record["sub_state"] == "auto-restart" and due and now >= due:
            auto_restart(device, state, unit_name, record, now, faults)


def fail_unit(device, unit_name, record, now, error, journal_lines):
    pid = record["main_pid"]
    for ident, message in journal_lines:
        device.journal(unit_name, ident, pid if ident != "systemd" else 1, message, now)
    device.journal(unit_name, "systemd", 1, f"{unit_name}: Main process exited, code=exited, status=1/FAILURE", now)
    device.journal(unit_name, "systemd", 1, f"{unit_name}: Failed with result 'exit-code'.", now)
    set_state(record, "activating", "auto-restart", now)
    record["result"] = "exit-code"
    record["last_error"] = error
    record["next_attempt_at"] = now + RESTART_SEC


def auto_restart(device, state, unit_name, record, now, faults):
    record["n_restarts"] += 1
    device.journal(unit_name, "systemd", 1, f"{unit_name}: Scheduled restart job, restart counter is at {record['n_restarts']}.", now)
    begin_start(device, unit_name, record, now)
    if faults.get("restart_hang"):
        record["next_attempt_at"] = None
        device.log_restart(restart_record(unit_name, "auto-restart", now, None, "hung", None))
        return
    if record.get("crash_loop") and faults.get("crash_after_seconds") is not None:
        outcome = model.StartError("lab fault crash_after_seconds", [
            ("k3s", model.logrus_line("fatal", "apiserver exited: crashed at start (lab fault crash_after_seconds)")),
        ])
    else:
        outcome = evaluate(device, record, unit_name, faults)
    finish_start(device, state, unit_name, record, outcome, now, time.time(), "auto-restart")


def begin_start(device, unit_name, record, now):
    set_state(record, "activating", "start", now)
    record["main_pid"] = random.randint(2000, 60000)
    record["timestamps"]["ExecMainStartTimestamp"] = now
    record["next_attempt_at"] = None
    device.journal(unit_name, "systemd", 1, f"Starting {unit_name} - {UNIT_DESCRIPTION}...", now)
    device.journal(unit_name, "k3s", record["main_pid"], model.logrus_line("info", f"Starting k3s {model.K3S_VERSION} ({model.K3S_COMMIT})"), now)


def evaluate(device, record, unit_name, faults):
    """Return the Evaluation of a start, or the StartError that fails it."""
    unit = model.parse_unit(unit_name, record["loaded"])
    node_ip = device.cluster().get("node_ip", "10.0.0.1")
    try:
        return model.evaluate_start(device.root, unit, node_ip, faults.get("reject_flags") or ())
    except model.StartError as error:
        return error


def finish_start(device, state, unit_name, record, outcome, begin, end, trigger, initial=False):
    """Apply the outcome of a start attempt to the state, journal and restarts.log.

    Returns True when the start succeeded.
    """
    if isinstance(outcome, model.StartError):
        journal_lines = outcome.journal or [("k3s", model.logrus_line("fatal", str(outcome)))]
        fail_unit(device, unit_name, record, end, str(outcome), journal_lines)
        device.journal(unit_name, "systemd", 1, f"Failed to start {unit_name} - {UNIT_DESCRIPTION}.", end)
        device.log_restart(restart_record(unit_name, trigger, begin, end, "failed", None, str(outcome), initial))
        return False

    pid = record["main_pid"]
    for warning in outcome.warnings:
        device.journal(unit_name, "k3s", pid, model.logrus_line("warning", warning), end)
    if outcome.command == "server":
        running = "Running kube-apiserver " + " ".join(outcome.apiserver_args)
        device.journal(unit_name, "k3s", pid, model.logrus_line("info", running), end)
        write_kubeconfig(device, outcome.settings)
        device.journal(unit_name, "k3s", pid, model.logrus_line("info", "k3s is up and running"), end)
    else:
        device.journal(unit_name, "k3s", pid, model.logrus_line("info", "k3s agent is up and running"), end)
    device.journal(unit_name, "systemd", 1, f"Started {unit_name} - {UNIT_DESCRIPTION}.", end)

    set_state(record, "active", "running", end)
    record["result"] = "success"
    record["last_error"] = None
    record["crash_loop"] = False
    record["evaluation"] = {
        "command": outcome.command,
        "k3s_args": outcome.k3s_args,
        "config_files": outcome.settings["config-files"],
        "apiserver_args": outcome.apiserver_args,
        "issuers": outcome.issuers,
        "signing_issuer": outcome.signing_issuer,
        "api_audiences": outcome.api_audiences,
        "max_token_expiration_seconds": outcome.max_token_expiration_seconds,
        "started_at": end,
    }
    if outcome.command == "server":
        # Pods that never ran get their first tokens from this start.
        for deployment in device.cluster().get("deployments", []):
            key = f"{deployment['namespace']}/{deployment['name']}"
            first_run = {"restarted_at": None, "token_issuer": outcome.signing_issuer, "created_at": end}
            state["deployments"].setdefault(key, first_run)
    record_line = restart_record(unit_name, trigger, begin, end, "success", outcome.signing_issuer, None, initial, outcome.issuers)
    device.log_restart(record_line)
    return True


def restart_record(unit_name, trigger, begin, end, result, signing_issuer, error=None, initial=False, issuers=None):
    return {
        "unit": unit_name,
        "trigger": trigger,
        "initial": initial,
        "begin": begin,
        "end": end,
        "result": result,
        "signing_issuer": signing_issuer,
        "issuers": issuers or [],
        "error": error,
        "pid": os.getpid(),
    }


def write_kubeconfig(device, settings):
    """Write /etc/rancher/k3s/k3s.yaml with the mode and group K3s would set."""
    path = device.path(KUBECONFIG)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(KUBECONFIG_TEXT)
    mode_text = settings["write-kubeconfig-mode"] or "0600"
    try:
        os.chmod(path, int(mode_text, 8))
    except ValueError:
        os.chmod(path, 0o600)
    group = settings["write-kubeconfig-group"]
    gid = group_id(device, group) if group else 0
    os.chown(path, 0, gid if gid is not None else 0)


def group_id(device, name):
    with contextlib.suppress(FileNotFoundError):
        with open(device.path("/etc/group"), encoding="utf-8") as handle:
            for line in handle:
                fields = line.strip().split(":")
                if len(fields) >= 3 and fields[0] == name:
                    return int(fields[2])
    return None


KUBECONFIG_TEXT = """apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: TEFCIFNUQU5ELUlOIENFUlRJRklDQVRF
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {}
users:
- name: default
  user:
    client-certificate-data: TEFCIFNUQU5ELUlOIENFUlRJRklDQVRF
    client-key-data: TEFCIFNUQU5ELUlOIEtFWQ==
"""


def start_initial(root, unit_name):
    """Start a unit from the host during lab setup. Its restarts.log line has initial=true.

    Returns the Evaluation or raises StartError.
    """
    device = Device(root)
    with device.locked():
        state = device.load_state()
        record = unit_record(device, state, unit_name)
        if record is None:
            raise model.StartError(f"Unit {unit_name} not found.")
        now = time.time()
        state.setdefault("created_at", now)
        begin_start(device, unit_name, record, now)
        outcome = evaluate(device, record, unit_name, device.faults())
        finish_start(device, state, unit_name, record, outcome, now, time.time(), "lab up", initial=True)
        device.save_state(state)
    if isinstance(outcome, model.StartError):
        raise outcome
    return outcome


# ---------------------------------------------------------------------------
# systemctl

SYSTEMCTL_VALUE_OPTIONS = {"-p", "--property", "-n", "--lines", "-o", "--output", "-t", "--type", "--state", "-H", "--host", "-M", "--machine"}
MUTATING_VERBS = {"start", "stop", "restart", "try-restart", "reload-or-restart", "daemon-reload", "enable", "disable", "reset-failed", "kill"}


def systemctl_main(device, args):
    options, properties, positional = parse_systemctl_args(args)
    if not positional:
        print("systemctl: the lab stand-in needs a command verb, for example: systemctl status k3s", file=sys.stderr)
        return 1
    verb, units = positional[0], [normalize_unit(name) for name in positional[1:]]
    if verb in MUTATING_VERBS and not device.is_root:
        target = units[0] if units else ""
        print(f"Failed to {verb} {target}: Interactive authentication required.", file=sys.stderr)
        print(f"See system logs and 'systemctl status {target}' for details.", file=sys.stderr)
        return 1
    handlers = {
        "start": systemctl_start, "restart": systemctl_start, "try-restart": systemctl_start,
        "reload-or-restart": systemctl_start, "stop": systemctl_stop,
        "is-active": systemctl_is_active, "is-failed": systemctl_is_failed,
        "is-enabled": systemctl_is_enabled, "enable": systemctl_enable, "disable": systemctl_enable,
        "status": systemctl_status, "show": systemctl_show, "cat": systemctl_cat,
        "daemon-reload": systemctl_daemon_reload, "reset-failed": systemctl_reset_failed,
    }
    if verb not in handlers:
        print(f"Unknown command verb '{verb}'.", file=sys.stderr)
        return 1
    if verb not in ("daemon-reload",) and not units:
        print("Too few arguments.", file=sys.stderr)
        return 1
    return handlers[verb](device, verb, units, options, properties)


def parse_systemctl_args(args):
    options, properties, positional = set(), [], []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg in SYSTEMCTL_VALUE_OPTIONS:
            value = args[index] if index < len(args) else ""
            index += 1
            if arg in ("-p", "--property"):
                properties += value.split(",")
        elif arg.startswith("--property="):
            properties += arg.split("=", 1)[1].split(",")
        elif arg.startswith("--") and "=" in arg:
            options.add(arg.split("=", 1)[0])
        elif arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            options.update("-" + letter for letter in arg[1:])
        elif arg.startswith("-"):
            options.add(arg)
        else:
            positional.append(arg)
    return options, properties, positional


def _quiet(options):
    return "-q" in options or "--quiet" in options


def systemctl_start(device, verb, units, options, _properties):
    if "--no-block" in options:
        for unit_name in units:
            detached = [sys.executable, os.path.abspath(sys.argv[0]), verb, unit_name]
            subprocess.Popen(detached, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return 0
    exit_code = 0
    for unit_name in units:
        exit_code = max(exit_code, start_one(device, verb, unit_name))
    return exit_code


def start_one(device, verb, unit_name):
    """Run systemctl start/restart for one unit, blocking like a Type=notify start job."""
    with device.locked():
        state = device.load_state()
        refresh(device, state)
        record = unit_record(device, state, unit_name)
        if record is None:
            print(f"Failed to {verb} {unit_name}: Unit {unit_name} not found.", file=sys.stderr)
            return 5
        if needs_daemon_reload(device, unit_name, record):
            print(reload_warning(unit_name), file=sys.stderr)
        if verb == "try-restart" and record["active_state"] != "active":
            return 0
        if verb == "start" and record["active_state"] in ("active", "activating") and record["sub_state"] != "auto-restart":
            return 0
        now = time.time()
        supersede(record)
        if record["active_state"] == "active":
            stop_lines(device, unit_name, record, now)
        record["n_restarts"] = 0
        begin_start(device, unit_name, record, now)
        record["restart_pid"] = os.getpid()
        faults = device.faults()
        outcome = None if faults.get("restart_hang") else evaluate(device, record, unit_name, faults)
        device.save_state(state)
    if faults.get("drop_connection_once"):
        clear_fault(device, "drop_connection_once")
        drop_ssh_connection()
    if faults.get("restart_hang"):
        device.log_restart(restart_record(unit_name, f"systemctl {verb}", now, None, "hung", None))
        while True:
            time.sleep(3600)
    delay = float(faults.get("restart_delay_seconds") or 0)
    if delay > 0:
        time.sleep(delay)
    with device.locked():
        state = device.load_state()
        record = state["units"][unit_name]
        if record.get("restart_pid") != os.getpid():
            print(f"Job for {unit_name} canceled.", file=sys.stderr)
            return 1
        record["restart_pid"] = None
        ok = finish_start(device, state, unit_name, record, outcome, now, time.time(), f"systemctl {verb}")
        device.save_state(state)
    if not ok:
        print(
            f"Job for {unit_name} failed because the control process exited with error code.\n"
            f"See \"systemctl status {unit_name}\" and \"journalctl -xeu {unit_name}\" for details.",
            file=sys.stderr,
        )
        return 1
    return 0


def clear_fault(device, key):
    """Remove one key from faults.json, so that a one-shot fault fires once."""
    path = device.standin("faults.json")
    faults = read_json(path, {})
    faults.pop(key, None)
    write_json_atomic(path, faults)


def ancestors():
    """Yield (pid, comm, argv) of this process's ancestors, parent first."""
    pid = os.getppid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8") as handle:
                comm = handle.read().strip()
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
            with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError):
            return
        yield pid, comm, argv
        pid = parent


SSHD_NAMES = ("sshd", "sshd-session", "sshd-auth")


def drop_ssh_connection():
    """Kill the sshd processes serving the SSH connection this command came through.

    They are the sshd ancestors whose parent is an sshd too; the topmost sshd is the
    listener, which stays. (Its command line cannot tell, because sshd rewrites it to
    "sshd: ... [listener] ...".) The command keeps running: sshd starts commands without a
    terminal in their own session, so nothing signals them when the connection goes.
    """
    chain = list(ancestors())
    victims = [pid for index, (pid, comm, _argv) in enumerate(chain)
               if comm in SSHD_NAMES and index + 1 < len(chain) and chain[index + 1][1] in SSHD_NAMES]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def log_call(device, tool, args):
    """Append the tool, its arguments and its ancestors' command lines to calls.log."""
    if not device.is_root:
        return
    record = {"time": time.time(), "tool": tool, "args": args,
              "ancestors": [" ".join(argv) for _pid, _comm, argv in ancestors()]}
    with contextlib.suppress(OSError):
        append_line(device.standin("calls.log"), record)


def supersede(record):
    """Kill a still-running systemctl start/restart of this unit (for example a hung one)."""
    pid = record.get("restart_pid")
    record["restart_pid"] = None
    if not pid or pid == os.getpid() or not is_standin_process(pid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def is_standin_process(pid):
    """Return True when pid is a systemctl stand-in process in this mount namespace."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().split(b"\0")
        same_namespace = os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    # The command line is "/usr/bin/python3 -I /usr/local/bin/systemctl ...".
    return same_namespace and any(os.path.basename(part) == b"systemctl" for part in command[:3])


def stop_lines(device, unit_name, record, now):
    device.journal(unit_name, "systemd", 1, f"Stopping {unit_name} - {UNIT_DESCRIPTION}...", now)
    device.journal(unit_name, "systemd", 1, f"{unit_name}: Deactivated successfully.", now)
    device.journal(unit_name, "systemd", 1, f"Stopped {unit_name} - {UNIT_DESCRIPTION}.", now)


def reload_warning(unit_name):
    return (
        f"Warning: The unit file, source configuration file or drop-ins of {unit_name} changed on disk. "
        "Run 'systemctl daemon-reload' to reload units."
    )


def systemctl_stop(device, verb, units, _options, _properties):
    exit_code = 0
    with device.locked():
        state = device.load_state()
        refresh(device, state)
        for unit_name in units:
            record = unit_record(device, state, unit_name)
            if record is None:
                print(f"Failed to stop {unit_name}: Unit {unit_name} not loaded.", file=sys.stderr)
                exit_code = 5
                continue
            supersede(record)
            now = time.time()
            if record["active_state"] != "inactive":
                stop_lines(device, unit_name, record, now)
            set_state(record, "inactive", "dead", now)
            record["next_attempt_at"] = None
            record["main_pid"] = 0
        device.save_state(state)
    return exit_code


def _read_units(device, units):
    with device.locked():
        state = device.load_state()
        refresh(device, state)
        records = {name: unit_record(device, state, name) for name in units}
        device.save_state(state)
    return state, records


def systemctl_is_active(device, _verb, units, options, _properties):
    _state, records = _read_units(device, units)
    exit_code = 3
    for name, record in records.items():
        active_state = record["active_state"] if record else "inactive"
        if not _quiet(options):
            print(active_state)
        if active_state == "active":
            exit_code = 0
    return exit_code


def systemctl_is_failed(device, _verb, units, options, _properties):
    _state, records = _read_units(device, units)
    exit_code = 1
    for record in records.values():
        failed = record is not None and record["active_state"] == "failed"
        if not _quiet(options):
            print(record["active_state"] if record else "inactive")
        if failed:
            exit_code = 0
    return exit_code


def systemctl_is_enabled(device, _verb, units, options, _properties):
    _state, records = _read_units(device, units)
    exit_code = 0
    for name, record in records.items():
        if record is None:
            print(f"Failed to get unit file state for {name}: No such file or directory", file=sys.stderr)
            exit_code = 1
            continue
        if not _quiet(options):
            print("enabled" if record["enabled"] else "disabled")
        if not record["enabled"]:
            exit_code = 1
    return exit_code


def systemctl_enable(device, verb, units, _options, _properties):
    with device.locked():
        state = device.load_state()
        for name in units:
            record = unit_record(device, state, name)
            if record is None:
                print(f"Failed to {verb} unit: Unit file {name} does not exist.", file=sys.stderr)
                return 1
            record["enabled"] = verb == "enable"
        device.save_state(state)
    return 0


def systemctl_daemon_reload(device, _verb, _units, _options, _properties):
    with device.locked():
        state = device.load_state()
        for name, record in list(state["units"].items()):
            sources = model.read_unit_sources(device.root, name)
            if sources:
                record["loaded"] = sources
            else:
                del state["units"][name]
        device.save_state(state)
    return 0


def systemctl_reset_failed(device, _verb, units, _options, _properties):
    return 0


def unit_properties(device, name, record):
    """Return the systemctl show properties of a unit, in systemd's order."""
    if record is None:
        return {"Id": name, "Names": name, "LoadState": "not-found", "ActiveState": "inactive", "SubState": "dead",
                "UnitFileState": "", "NRestarts": "0", "MainPID": "0", "Result": "success"}
    stamps = record["timestamps"]
    active = record["active_state"] == "active"
    fragment = f"/etc/systemd/system/{name}"
    dropins = [path for path in record["loaded"] if path != fragment]
    return {
        "Type": "notify",
        "Restart": "always",
        "RestartUSec": "5s",
        "MainPID": str(record["main_pid"] if record["active_state"] != "inactive" else 0),
        "ExecMainStartTimestamp": systemd_timestamp(stamps.get("ExecMainStartTimestamp")),
        "ExecMainPID": str(record["main_pid"]),
        "ExecMainCode": "0" if active else "1",
        "ExecMainStatus": "0" if record["result"] == "success" else "1",
        "NRestarts": str(record["n_restarts"]),
        "Result": record["result"],
        "Id": name,
        "Names": name,
        "Description": UNIT_DESCRIPTION,
        "LoadState": "loaded",
        "ActiveState": record["active_state"],
        "SubState": record["sub_state"],
        "FragmentPath": fragment,
        "DropInPaths": " ".join(dropins),
        "UnitFileState": "enabled" if record["enabled"] else "disabled",
        "StateChangeTimestamp": systemd_timestamp(stamps.get("StateChangeTimestamp")),
        "InactiveExitTimestamp": systemd_timestamp(stamps.get("InactiveExitTimestamp")),
        "ActiveEnterTimestamp": systemd_timestamp(stamps.get("ActiveEnterTimestamp")),
        "ActiveExitTimestamp": systemd_timestamp(stamps.get("ActiveExitTimestamp")),
        "InactiveEnterTimestamp": systemd_timestamp(stamps.get("InactiveEnterTimestamp")),
        "NeedDaemonReload": "yes" if needs_daemon_reload(device, name, record) else "no",
    }


def systemctl_show(device, _verb, units, options, properties):
    _state, records = _read_units(device, units)
    blocks = []
    for name, record in records.items():
        values = unit_properties(device, name, record)
        selected = properties or list(values)
        lines = []
        for prop in selected:
            value = values.get(prop, "")
            lines.append(value if "--value" in options else f"{prop}={value}")
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return 0


def systemctl_status(device, _verb, units, options, _properties):
    state, records = _read_units(device, units)
    exit_code = 0
    hostname = device.cluster().get("hostname", "localhost")
    for name, record in records.items():
        if record is None:
            print(f"Unit {name} could not be found.", file=sys.stderr)
            exit_code = max(exit_code, 4)
            continue
        if needs_daemon_reload(device, name, record):
            print(reload_warning(name), file=sys.stderr)
        stamps = record["timestamps"]
        active_state, sub_state = record["active_state"], record["sub_state"]
        since = stamps.get("StateChangeTimestamp")
        detail = f"{active_state} ({sub_state})"
        if record["result"] != "success" and active_state != "active":
            detail += f" (Result: {record['result']})"
        if since:
            detail += f" since {systemd_timestamp(since)}; {int(time.time() - since)}s ago"
        if active_state == "active":
            marker = "●"
        elif record["result"] != "success":
            marker = "×"
        else:
            marker = "○"
        print(f"{marker} {name} - {UNIT_DESCRIPTION}")
        print(f"     Loaded: loaded (/etc/systemd/system/{name}; {'enabled' if record['enabled'] else 'disabled'}; preset: enabled)")
        print(f"     Active: {detail}")
        print("       Docs: https://k3s.io")
        if active_state != "inactive":
            print(f"   Main PID: {record['main_pid']} (k3s-{'server' if name == model.SERVER_UNIT else 'agent'})")
        print(f"     CGroup: /system.slice/{name}")
        if not _quiet(options) and device.is_root:
            entries = [entry for entry in device.journal_entries() if entry["unit"] == name][-10:]
            if entries:
                print()
            for entry in entries:
                print(format_entry(entry, "short", hostname))
        if active_state != "active":
            exit_code = max(exit_code, 3)
    return exit_code


def systemctl_cat(device, _verb, units, _options, _properties):
    exit_code = 0
    for name in units:
        sources = model.read_unit_sources(device.root, name)
        if not sources:
            print(f"No files found for {name}.", file=sys.stderr)
            exit_code = 1
            continue
        parts = [f"# {path}\n{text.removesuffix(chr(10))}" for path, text in sources.items()]
        print("\n\n".join(parts))
    return exit_code


# ---------------------------------------------------------------------------
# journalctl


def expand_short_options(arg):
    """Split a cluster of short options such as -xeu into -x -e -u."""
    expanded = []
    letters = arg[1:]
    for position, letter in enumerate(letters):
        expanded.append("-" + letter)
        if letter in "unoSU" and position + 1 < len(letters):
            # The rest of the cluster is the option's value, as in -uk3s.
            expanded.append(letters[position + 1:])
            break
    return expanded


def parse_journalctl_args(args):
    """Return the journalctl filter options, or raise ValueError for an invalid timestamp."""
    options = {"units": [], "since": None, "until": None, "lines": None, "output": "short"}
    args = list(args)
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            args[index:index] = expand_short_options(arg)
            continue
        name, has_value, value = arg.partition("=")
        takes_value = name in ("-u", "--unit", "-S", "--since", "-U", "--until", "-n", "--lines", "-o", "--output")
        if takes_value and not has_value:
            if name in ("-n", "--lines") and (index >= len(args) or not args[index].lstrip("+").isdigit()):
                value = "10"
            else:
                value = args[index] if index < len(args) else ""
                index += 1
        if name in ("-u", "--unit"):
            options["units"].append(normalize_unit(value))
        elif name in ("-S", "--since", "-U", "--until"):
            moment = parse_journal_time(value)
            if moment is False:
                raise ValueError(f"Failed to parse timestamp: {value}")
            options["since" if name in ("-S", "--since") else "until"] = moment
        elif name in ("-n", "--lines"):
            options["lines"] = int(value.lstrip("+") or 10)
        elif name in ("-e", "--pager-end"):
            options["lines"] = options["lines"] or 1000
        elif name in ("-o", "--output"):
            options["output"] = value
    return options


def journalctl_main(device, args):
    try:
        options = parse_journalctl_args(args)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    if not device.is_root:
        print("Hint: You are currently not seeing messages from other users and the system.\n"
              "      Users in groups 'adm', 'systemd-journal' can see all messages.\n"
              "      Pass -q to turn off this notice.", file=sys.stderr)
        print("-- No entries --")
        return 0

    units, since, until, lines = options["units"], options["since"], options["until"], options["lines"]
    entries = [
        entry for entry in device.journal_entries()
        if (not units or entry["unit"] in units)
        and (since is None or entry["ts"] >= since)
        and (until is None or entry["ts"] <= until)
    ]
    if lines is not None:
        entries = entries[-lines:] if lines else []
    if not entries:
        print("-- No entries --")
        return 0
    hostname = device.cluster().get("hostname", "localhost")
    for entry in entries:
        print(format_entry(entry, options["output"], hostname))
    return 0


def parse_journal_time(text):
    """Parse a journalctl --since/--until value into epoch seconds, or False."""
    now = time.time()
    text = text.strip()
    if text.startswith("@"):
        try:
            return float(text[1:])
        except ValueError:
            return False
    if text == "now":
        return now
    day = time.mktime(time.localtime(now)[:3] + (0, 0, 0, 0, 0, -1))
    named = {"today": day, "yesterday": day - 86400, "tomorrow": day + 86400}
    if text in named:
        return named[text]
    relative = text.removesuffix(" ago").replace(" ", "")
    if text.endswith(" ago") or relative.startswith("-"):
        try:
            return now - model.parse_go_duration(relative.lstrip("-").replace("min", "m").replace("sec", "s"))
        except ValueError:
            return False
    for pattern in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return time.mktime(time.strptime(text, pattern))
        except ValueError:
            continue
    return False


def format_entry(entry, output, hostname):
    timestamp = entry["ts"]
    ident = entry["ident"]
    prefix_ident = f"{ident}[{entry['pid']}]"
    if output == "cat":
        return entry["msg"]
    if output == "json":
        return json.dumps({
            "__REALTIME_TIMESTAMP": str(int(timestamp * 1e6)), "_HOSTNAME": hostname,
            "SYSLOG_IDENTIFIER": ident, "_PID": str(entry["pid"]), "_SYSTEMD_UNIT": entry["unit"],
            "MESSAGE": entry["msg"],
        })
    if output == "short-iso":
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))
    elif output == "short-precise":
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime(timestamp)) + f".{int(timestamp % 1 * 1e6):06d}"
    else:
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime(timestamp))
    return f"{stamp} {hostname} {prefix_ident}: {entry['msg']}"


# ---------------------------------------------------------------------------
# k3s


def k3s_main(device, args):
    if args and args[0] in ("--version", "-v", "version"):
        print(f"k3s version {model.K3S_VERSION} ({model.K3S_COMMIT})\ngo version go1.22.9")
        return 0
    if args and args[0] == "kubectl":
        import k3s_kubectl

        return k3s_kubectl.kubectl_main(device, args[1:])
    print(f"k3s: the lab stand-in supports only 'k3s kubectl' and 'k3s --version'; "
          f"start K3s with 'systemctl start k3s' (got: k3s {' '.join(args)})", file=sys.stderr)
    return 1


def main(argv):
    tool = os.path.basename(argv[0])
    args = argv[1:]
    if tool in ("k3s_standin.py", "k3s_standin") and args:
        tool, args = args[0], args[1:]
    root = os.environ.get("K3S_STANDIN_ROOT", "/")
    device = Device(root)
    if root == "/":
        log_call(device, tool, args)
    if tool == "systemctl":
        return systemctl_main(device, args)
    if tool == "journalctl":
        return journalctl_main(device, args)
    if tool == "k3s":
        return k3s_main(device, args)
    print(f"k3s stand-in: unknown tool {tool!r}, expected k3s, systemctl or journalctl", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
