//! End-to-end SSH features against real OpenSSH sshd devices: ssh-agent, RSA and
//! encrypted keys, certificates, known_hosts forms, accept-new, ssh_config, sudo with a
//! password, and a connection dropped during a K3s restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{describe, rows_by_device, write_inventory, write_playbook, Lab};

/// A finished arcfleet run and its reports.
struct Run {
    output: Output,
    rows: HashMap<String, HashMap<String, String>>,
    json: String,
}

impl Run {
    fn all_text(&self) -> String {
        format!(
            "{}{}{}",
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr),
            self.json
        )
    }
}

/// Runs `converge` with the lab's playbook and both reports, plus `extra` arguments.
fn converge(lab: &Lab, mut command: Command, inventory: &Path, extra: &[&str]) -> Run {
    let playbook = write_playbook(lab);
    let csv = lab.scratch("report.csv");
    let json = lab.scratch("report.json");
    let _ = std::fs::remove_file(&csv);
    let _ = std::fs::remove_file(&json);
    command
        .arg("--inventory")
        .arg(inventory)
        .arg("--playbook")
        .arg(&playbook)
        .arg("--report-csv")
        .arg(&csv)
        .arg("--report-json")
        .arg(&json)
        .args(extra);
    let output = command.output().expect("run arcfleet");
    Run {
        rows: if csv.exists() {
            rows_by_device(&csv)
        } else {
            HashMap::new()
        },
        json: std::fs::read_to_string(&json).unwrap_or_default(),
        output,
    }
}

fn keygen(args: &[&str]) {
    let output = Command::new("ssh-keygen").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "ssh-keygen {args:?}: {}",
        describe(&output)
    );
}

fn authorize(lab: &Lab, public_key: &Path) {
    let key = std::fs::read_to_string(public_key).unwrap();
    let path = lab.field("authorized_keys");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&key);
    std::fs::write(&path, text).unwrap();
}

fn first_server(lab: &Lab) -> String {
    lab.device_names().into_iter().next().unwrap()
}

fn port_of(lab: &Lab, device: &str) -> u64 {
    lab.device(device)["port"].as_u64().unwrap()
}

/// An ssh-agent in the foreground, stopped when dropped.
struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Agent {
    fn start(dir: &Path) -> Agent {
        let socket = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ssh-agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "ssh-agent did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent { child, socket }
    }

    fn add(&self, key: &Path) {
        let output = Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &self.socket)
            .output()
            .unwrap();
        assert!(output.status.success(), "ssh-add: {}", describe(&output));
    }

    fn remove_all(&self) {
        let output = Command::new("ssh-add")
            .arg("-D")
            .env("SSH_AUTH_SOCK", &self.socket)
            .output()
            .unwrap();
        assert!(output.status.success(), "ssh-add -D: {}", describe(&output));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn agent_key_logs_in_without_key_file() {
    let lab = Lab::start(&support::spec(1, 1, 0));
    let inventory = write_inventory(&lab, &[]);
    let agent = Agent::start(&lab.scratch(""));
    agent.add(Path::new(&lab.field("identity_file")));
    let with_agent = || {
        let mut command = lab.arcfleet_without_keys(&["converge"]);
        command
            .arg("--known-hosts")
            .arg(lab.field("known_hosts"))
            .env("SSH_AUTH_SOCK", &agent.socket);
        command
    };

    let run = converge(&lab, with_agent(), &inventory, &[]);
    assert_eq!(
        run.output.status.code(),
        Some(0),
        "{}",
        describe(&run.output)
    );
    let device = first_server(&lab);
    assert_eq!(
        run.rows[&device]["action"], "changed",
        "{:?}",
        run.rows[&device]
    );

    agent.remove_all();
    let run = converge(&lab, with_agent(), &inventory, &[]);
    assert_eq!(
        run.output.status.code(),
        Some(3),
        "{}",
        describe(&run.output)
    );
    let error = &run.rows[&device]["error"];
    assert!(error.contains("no key to log in"), "{error}");
    assert!(error.contains("ssh-agent at"), "{error}");
}

#[test]
fn rsa_key_signs_with_sha2() {
    let lab = Lab::start(&support::spec(1, 1, 0));
    let key = lab.scratch("id_rsa");
    keygen(&[
        "-q",
        "-t",
        "rsa",
        "-b",
        "3072",
        "-N",
        "",
        "-f",
        key.to_str().unwrap(),
    ]);
    authorize(&lab, &key.with_extension("pub"));
    let inventory = write_inventory(&lab, &[]);
    let mut command = lab.arcfleet_without_keys(&["converge"]);
    command
        .arg("--identity")
        .arg(&key)
        .arg("--known-hosts")
        .arg(lab.field("known_hosts"));
    let run = converge(&lab, command, &inventory, &[]);
    assert_eq!(
        run.output.status.code(),
        Some(0),
        "{}",
        describe(&run.output)
    );

    // OpenSSH 8.8 and later refuse ssh-rsa (SHA-1) signatures by default, so this login
    // used rsa-sha2-256 or -512.
    let device = first_server(&lab);
    let log = std::fs::read_to_string(lab.device(&device)["sshd_log"].as_str().unwrap()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("Accepted publickey for root") && l.contains(": RSA SHA256:")),
        "{log}"
    );
}

#[test]
fn encrypted_key_with_passphrase_never_shown() {
    const PASSPHRASE: &str = "correct horse battery staple 7";
    let lab = Lab::start(&support::spec(1, 1, 0));
    let key = lab.scratch("id_encrypted");
    keygen(&[
        "-q",
        "-t",
        "ed25519",
        "-N",
        PASSPHRASE,
        "-f",
        key.to_str().unwrap(),
    ]);
    authorize(&lab, &key.with_extension("pub"));
    let passphrase_file = lab.scratch("passphrase");
    std::fs::write(&passphrase_file, format!("{PASSPHRASE}\n")).unwrap();
    std::fs::set_permissions(&passphrase_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let inventory = write_inventory(&lab, &[]);
    let device = first_server(&lab);
    let command = || {
        let mut command = lab.arcfleet_without_keys(&["-vv", "converge"]);
        command
            .arg("--identity")
            .arg(&key)
            .arg("--known-hosts")
            .arg(lab.field("known_hosts"));
        command
    };

    let without = converge(&lab, command(), &inventory, &[]);
    assert_eq!(
        without.output.status.code(),
        Some(3),
        "{}",
        describe(&without.output)
    );
    let error = &without.rows[&device]["error"];
    assert!(error.contains("the key is encrypted"), "{error}");
    assert!(error.contains("--identity-passphrase-file"), "{error}");

    let from_file = converge(
        &lab,
        command(),
        &inventory,
        &[
            "--identity-passphrase-file",
            passphrase_file.to_str().unwrap(),
        ],
    );
    assert_eq!(
        from_file.output.status.code(),
        Some(0),
        "{}",
        describe(&from_file.output)
    );
    assert_eq!(from_file.rows[&device]["action"], "changed");
    assert!(
        !from_file.all_text().contains(PASSPHRASE),
        "passphrase in the output"
    );

    let mut wrong = command();
    wrong.env("ARCFLEET_TEST_PASSPHRASE", "not the passphrase");
    let wrong = converge(
        &lab,
        wrong,
        &inventory,
        &["--identity-passphrase-env", "ARCFLEET_TEST_PASSPHRASE"],
    );
    assert_eq!(
        wrong.output.status.code(),
        Some(3),
        "{}",
        describe(&wrong.output)
    );
    let error = &wrong.rows[&device]["error"];
    assert!(
        error.contains("environment variable ARCFLEET_TEST_PASSPHRASE"),
        "{error}"
    );
    assert!(
        !wrong.all_text().contains("not the passphrase"),
        "passphrase in the output"
    );
}

#[test]
fn hashed_known_hosts_are_trusted() {
    let lab = Lab::start(&support::spec(2, 1, 0));
    keygen(&["-q", "-H", "-f", &lab.field("known_hosts")]);
    let text = std::fs::read_to_string(lab.field("known_hosts")).unwrap();
    assert!(text.lines().all(|l| l.starts_with("|1|")), "{text}");
    let inventory = write_inventory(&lab, &[]);
    let run = converge(&lab, lab.arcfleet(&["converge"]), &inventory, &[]);
    assert_eq!(
        run.output.status.code(),
        Some(0),
        "{}",
        describe(&run.output)
    );
    for name in lab.device_names() {
        assert_eq!(run.rows[&name]["action"], "changed", "{name}");
    }
}

/// Returns the known_hosts key (`type base64`) recorded for a device.
fn recorded_key(lab: &Lab, device: &str) -> String {
    let prefix = format!("[127.0.0.1]:{} ", port_of(lab, device));
    std::fs::read_to_string(lab.field("known_hosts"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
        .unwrap()
}

#[test]
fn revoked_host_key_is_rejected() {
    let lab = Lab::start(&support::spec(2, 2, 0));
    let names = lab.device_names();
    let revoked = format!("@revoked [127.0.0.1]:* {}\n", recorded_key(&lab, &names[0]));
    let mut text = std::fs::read_to_string(lab.field("known_hosts")).unwrap();
    text.push_str(&revoked);
    std::fs::write(lab.field("known_hosts"), text).unwrap();
    let inventory = write_inventory(&lab, &[]);

    let run = converge(
        &lab,
        lab.arcfleet(&["converge"]),
        &inventory,
        &["--accept-new-host-keys"],
    );
    assert_eq!(
        run.output.status.code(),
        Some(3),
        "{}",
        describe(&run.output)
    );
    let row = &run.rows[&names[0]];
    assert_eq!(row["action"], "failed");
    assert!(row["error"].contains("is revoked at"), "{row:?}");
    assert!(lab.restarts(&names[0]).is_empty());
    assert_eq!(run.rows[&names[1]]["action"], "changed");
}

#[test]
fn host_certificate_from_listed_authority() {
    let mut spec = support::spec(2, 1, 0);
    spec["devices"][0]["host_certificate"] = json!(true);
    let lab = Lab::start(&spec);
    let names = lab.device_names();
    let ca = std::fs::read_to_string(lab.field("host_ca_public_key")).unwrap();
    let plain = format!("[127.0.0.1]:{} ", port_of(&lab, &names[0]));
    let known_hosts = std::fs::read_to_string(lab.field("known_hosts")).unwrap();
    let without_plain: Vec<&str> = known_hosts
        .lines()
        .filter(|l| !l.starts_with(&plain))
        .collect();
    let trusting = format!(
        "{}\n@cert-authority [127.0.0.1]:{} {}",
        without_plain.join("\n"),
        port_of(&lab, &names[0]),
        ca.trim()
    );
    std::fs::write(lab.field("known_hosts"), format!("{trusting}\n")).unwrap();
    let inventory = write_inventory(&lab, &[]);

    let run = converge(&lab, lab.arcfleet(&["converge"]), &inventory, &[]);
    assert_eq!(
        run.output.status.code(),
        Some(0),
        "{}",
        describe(&run.output)
    );
    assert_eq!(run.rows[&names[0]]["action"], "changed");

    let ca_key = ca.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    let revoked = format!("{trusting}\n@revoked * {ca_key}\n");
    std::fs::write(lab.field("known_hosts"), revoked).unwrap();
    let run = converge(&lab, lab.arcfleet(&["converge"]), &inventory, &[]);
    assert_eq!(
        run.output.status.code(),
        Some(3),
        "{}",
        describe(&run.output)
    );
    let row = &run.rows[&names[0]];
    assert!(row["error"].contains("is revoked at"), "{row:?}");
}

#[test]
fn user_certificate_logs_in() {
    let mut spec = support::spec(1, 1, 0);
    spec["user_ca"] = json!(true);
    let lab = Lab::start(&spec);
    let key = lab.scratch("id_certified");
    keygen(&["-q", "-t", "ed25519", "-N", "", "-f", key.to_str().unwrap()]);
    let ca = lab.field("user_ca_key");
    let command = || {
        let mut command = lab.arcfleet_without_keys(&["converge"]);
        command
            .arg("--identity")
            .arg(&key)
            .arg("--known-hosts")
            .arg(lab.field("known_hosts"));
        command
    };
    let inventory = write_inventory(&lab, &[]);
    let device = first_server(&lab);

    let rejected = converge(&lab, command(), &inventory, &[]);
    assert_eq!(
        rejected.output.status.code(),
        Some(3),
        "{}",
        describe(&rejected.output)
    );
    assert!(
        rejected.rows[&device]["error"].contains("rejected every key offered"),
        "{:?}",
        rejected.rows[&device]
    );

    keygen(&[
        "-q",
        "-s",
        &ca,
        "-I",
        "arcfleet-test",
        "-n",
        "root",
        &format!("{}.pub", key.display()),
    ]);
    assert!(lab.scratch("id_certified-cert.pub").exists());
    let run = converge(&lab, command(), &inventory, &[]);
    assert_eq!(
        run.output.status.code(),
        Some(0),
        "{}",
        describe(&run.output)
    );
    assert_eq!(run.rows[&device]["action"], "changed");

    // The same certificate from ssh_config's CertificateFile instead of beside the key.
    let moved = lab.scratch("certificates/root.cert");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(lab.scratch("id_certified-cert.pub"), &moved).unwrap();
    let config = lab.scratch("ssh_config");
    let text = format!("Host *\n    CertificateFile {}\n", moved.display());
    std::fs::write(&config, text).unwrap();
    let mut with_config = command();
    with_config.arg("--ssh-config").arg(&config);
    let run = converge(&lab, with_config, &inventory, &[]);
    assert_eq!(
        run.output.status.code(),
        Some(0),
        "{}",
        describe(&run.output)
    );
    assert_eq!(
        run.rows[&device]["action"], "unchanged",
        "logged in with the certificate named by CertificateFile"
    );
}

#[test]
fn accept_new_records_unknown_keys_only() {
    let lab = Lab::start(&support::spec(3, 3, 0));
    let names = lab.device_names();
    let known_hosts = lab.field("known_hosts");
    let donor_key = recorded_key(&lab, &names[2]);
    keygen(&["-q", "-H", "-f", &known_hosts]);
    let unknown_name = format!("[127.0.0.1]:{}", port_of(&lab, &names[0]));
    keygen(&["-q", "-R", &unknown_name, "-f", &known_hosts]);
    let changed_name = format!("[127.0.0.1]:{}", port_of(&lab, &names[1]));
    keygen(&["-q", "-R", &changed_name, "-f", &known_hosts]);
    let mut text = std::fs::read_to_string(&known_hosts).unwrap();
    text.push_str(&format!("{changed_name} {donor_key}\n"));
    std::fs::write(&known_hosts, &text).unwrap();
    let inventory = write_inventory(&lab, &[]);

    let strict = converge(&lab, lab.arcfleet(&["converge"]), &inventory, &[]);
    assert_eq!(
        strict.output.status.code(),
        Some(3),
        "{}",
        describe(&strict.output)
    );
    assert!(
        strict.rows[&names[0]]["error"].contains("is not in"),
        "{:?}",
        strict.rows[&names[0]]
    );
    assert_eq!(
        std::fs::read_to_string(&known_hosts).unwrap(),
        text,
        "nothing recorded"
    );

    let accepting = converge(
        &lab,
        lab.arcfleet(&["converge"]),
        &inventory,
        &["--accept-new-host-keys"],
    );
    assert_eq!(
        accepting.output.status.code(),
        Some(3),
        "{}",
        describe(&accepting.output)
    );
    assert_eq!(accepting.rows[&names[0]]["action"], "changed");
    assert!(
        accepting.rows[&names[1]]["error"].contains("does not match"),
        "a changed key is never replaced: {:?}",
        accepting.rows[&names[1]]
    );
    assert_eq!(accepting.rows[&names[2]]["action"], "unchanged");

    let after = std::fs::read_to_string(&known_hosts).unwrap();
    assert_eq!(after.lines().count(), text.lines().count() + 1, "{after}");
    let added = after.lines().last().unwrap();
    assert!(
        added.starts_with("|1|"),
        "hashed like the rest of the file: {added}"
    );
    let found = Command::new("ssh-keygen")
        .args(["-F", &unknown_name, "-f", &known_hosts])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "OpenSSH finds the new entry: {}",
        describe(&found)
    );
    assert!(
        after.contains(&format!("{changed_name} {donor_key}")),
        "changed entry kept"
    );
}

fn write_ssh_config(lab: &Lab, body: &str) -> PathBuf {
    let path = lab.scratch("ssh_config");
    std::fs::write(&path, body).unwrap();
    path
}

/// Writes an arcfleet YAML inventory whose devices are ssh_config aliases.
fn alias_inventory(lab: &Lab, aliases: &[(&str, &str)]) -> PathBuf {
    let cluster = &lab.manifest["clusters"][0];
    let mut text = format!(
        "clusters:\n  c:\n    subscription: {}\n    resource_group: {}\n    name: {}\ndevices:\n",
        cluster["subscription"].as_str().unwrap(),
        cluster["resource_group"].as_str().unwrap(),
        cluster["name"].as_str().unwrap()
    );
    for (name, alias) in aliases {
        text.push_str(&format!(
            "  - {{name: {name}, host: {alias}, cluster: c}}\n"
        ));
    }
    let path = lab.scratch("aliases.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn ssh_config_supplies_address_user_and_key() {
    let lab = Lab::start(&support::spec(2, 1, 0));
    let names = lab.device_names();
    let config = write_ssh_config(
        &lab,
        &format!(
            "# lab aliases\nHost edge-a\n    HostName 127.0.0.1\n    Port {}\n\n\
             Host edge-b\n    HostName 127.0.0.1\n    Port {}\n    IdentitiyFile /typo\n\n\
             Host edge-*\n    User root\n    IdentityFile {}\n    UserKnownHostsFile {}\n    \
             ServerAliveInterval 5\n    ForwardAgent no\n",
            port_of(&lab, &names[0]),
            port_of(&lab, &names[1]),
            lab.field("identity_file"),
            lab.field("known_hosts"),
        ),
    );

    let inventory = alias_inventory(&lab, &[("dev-a", "edge-a"), ("dev-b", "edge-b")]);
    let mut command = lab.arcfleet_without_keys(&["converge"]);
    command
        .arg("--ssh-config")
        .arg(&config)
        .arg("--user")
        .arg("nobody-from-the-command-line");
    let run = converge(&lab, command, &inventory, &[]);
    assert_eq!(
        run.output.status.code(),
        Some(0),
        "{}",
        describe(&run.output)
    );

    for (name, device) in [("dev-a", &names[0]), ("dev-b", &names[1])] {
        let row = &run.rows[name];
        assert_eq!(row["action"], "changed", "{row:?}");
        assert_eq!(row["host"], "127.0.0.1", "HostName maps the alias");
        assert_eq!(row["port"], port_of(&lab, device).to_string());
    }

    let stderr = String::from_utf8_lossy(&run.output.stderr);
    let typo_line = format!(
        "{}:9: unknown ssh_config keyword `identitiyfile`",
        config.display()
    );
    assert!(stderr.contains(&typo_line), "{stderr}");
    assert!(
        stderr.contains("`identityfile`"),
        "suggests the keyword: {stderr}"
    );
    assert!(
        !stderr.contains("forwardagent"),
        "real keywords stay quiet: {stderr}"
    );
}

#[test]
fn weak_or_unsupported_ssh_config_stops_the_run() {
    let lab = Lab::start(&support::spec(1, 1, 0));
    let names = lab.device_names();
    let inventory = alias_inventory(&lab, &[("dev-a", "edge-a")]);
    let cases = [
        (
            format!(
                "Host edge-a\n    HostName 127.0.0.1\n    Port {}\n    StrictHostKeyChecking no\n",
                port_of(&lab, &names[0])
            ),
            ":4: StrictHostKeyChecking no",
        ),
        (
            "Include ~/.ssh/other\n".to_owned(),
            ":1: arcfleet does not support `include`",
        ),
        (
            "Host edge-a\n    ProxyCommand nc %h %p\n".to_owned(),
            ":2: arcfleet does not run ProxyCommand",
        ),
    ];
    for (body, expected) in cases {
        let config = write_ssh_config(&lab, &body);
        let mut command = lab.arcfleet(&["converge"]);
        command.arg("--ssh-config").arg(&config);
        let run = converge(&lab, command, &inventory, &[]);
        assert_eq!(
            run.output.status.code(),
            Some(2),
            "{body}: {}",
            describe(&run.output)
        );
        let stderr = String::from_utf8_lossy(&run.output.stderr);
        assert!(
            stderr.contains(&format!("{}{expected}", config.display())),
            "{stderr}"
        );
    }
    assert!(
        lab.restarts(&names[0]).is_empty(),
        "no device was contacted"
    );
}

#[test]
fn sudo_password_is_fed_on_stdin_only() {
    const PASSWORD: &str = "lab-sudo-Secret-31";
    let mut spec = support::spec(2, 2, 0);
    spec["devices"][0]["user"] = json!("labuser");
    spec["devices"][0]["sudo_password"] = json!(PASSWORD);
    let lab = Lab::start(&spec);
    let names = lab.device_names();
    let device = &names[0];
    let inventory = write_inventory(&lab, &[]);
    let password_file = lab.scratch("sudo-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let without = converge(&lab, lab.arcfleet(&["converge"]), &inventory, &[]);
    assert_eq!(
        without.output.status.code(),
        Some(3),
        "{}",
        describe(&without.output)
    );
    let error = &without.rows[device]["error"];
    assert!(error.contains("sudo asks for a password"), "{error}");
    assert!(error.contains("--sudo-password-file"), "{error}");

    let mut wrong = lab.arcfleet(&["converge"]);
    wrong.env("ARCFLEET_TEST_SUDO", "wrong-password-9");
    let wrong = converge(
        &lab,
        wrong,
        &inventory,
        &["--sudo-password-env", "ARCFLEET_TEST_SUDO"],
    );
    assert_eq!(
        wrong.output.status.code(),
        Some(3),
        "{}",
        describe(&wrong.output)
    );
    assert!(
        wrong.rows[device]["error"].contains("sudo rejected the password"),
        "{:?}",
        wrong.rows[device]
    );
    assert!(lab.restarts(device).is_empty());

    let run = converge(
        &lab,
        lab.arcfleet(&["-vv", "converge"]),
        &inventory,
        &["--sudo-password-file", password_file.to_str().unwrap()],
    );
    assert_eq!(
        run.output.status.code(),
        Some(0),
        "{}",
        describe(&run.output)
    );
    assert_eq!(
        run.rows[device]["action"], "changed",
        "{:?}",
        run.rows[device]
    );
    assert!(
        !run.all_text().contains(PASSWORD),
        "password in output or report"
    );
    assert_eq!(
        without.rows[&names[1]]["action"], "changed",
        "the root device never needed the password"
    );

    let calls = lab.calls(device);
    let command_lines: Vec<String> = calls
        .iter()
        .flat_map(|call| call["ancestors"].as_array().unwrap().clone())
        .map(|line| line.as_str().unwrap().to_owned())
        .collect();
    assert!(
        command_lines
            .iter()
            .any(|line| line.starts_with("sudo -k -S -p ")),
        "scripts ran through sudo -S: {command_lines:?}"
    );
    assert!(
        command_lines.iter().all(|line| !line.contains(PASSWORD)),
        "the password never appears in a process's command line"
    );
}

#[test]
fn dropped_connection_during_restart_restarts_once() {
    let lab = Lab::start(&support::spec(2, 1, 0));
    let names = lab.device_names();
    lab.set_faults(
        &names[0],
        json!({"drop_connection_once": true, "restart_delay_seconds": 2}),
    );
    let inventory = write_inventory(&lab, &[]);
    let run = converge(&lab, lab.arcfleet(&["converge"]), &inventory, &[]);
    assert_eq!(
        run.output.status.code(),
        Some(0),
        "{}",
        describe(&run.output)
    );
    assert_eq!(
        run.rows[&names[0]]["action"], "changed",
        "{:?}",
        run.rows[&names[0]]
    );
    assert_eq!(lab.restarts(&names[0]).len(), 1, "exactly one restart");
    assert_eq!(
        lab.published_issuer(&names[0]),
        Some(lab.cluster_issuer(&names[0]))
    );

    let report: Value = serde_json::from_str(&run.json).unwrap();
    let entry = report["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == names[0].as_str())
        .unwrap();
    let log: Vec<&str> = entry["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        log.iter()
            .any(|l| l.contains("connection dropped during `systemctl restart k3s`")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("instead of restarting again")),
        "{log:?}"
    );
    assert!(log.iter().any(|l| l.contains("reconnected")), "{log:?}");
    let faults = std::fs::read_to_string(
        lab.device_path(&names[0], "/var/lib/rancher/k3s/standin/faults.json"),
    )
    .unwrap();
    assert!(
        !faults.contains("drop_connection_once"),
        "the fault fired: {faults}"
    );
}
