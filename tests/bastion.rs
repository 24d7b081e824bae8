//! End-to-end runs through a bastion: lab devices in a network namespace that only the
//! bastion's sshd can reach, and arcfleet connecting through it with ProxyJump from
//! ssh_config, the YAML inventory or an Ansible inventory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{describe, rows_by_device, write_inventory, write_playbook, Lab};

fn converge(lab: &Lab, command: Command, inventory: &Path) -> (std::process::Output, PathBuf) {
    let playbook = write_playbook(lab);
    converge_with(lab, command, inventory, &playbook)
}

fn converge_with(
    lab: &Lab,
    mut command: Command,
    inventory: &Path,
    playbook: &Path,
) -> (std::process::Output, PathBuf) {
    let report = lab.scratch("report.csv");
    let _ = std::fs::remove_file(&report);
    let output = command
        .arg("--inventory")
        .arg(inventory)
        .arg("--playbook")
        .arg(playbook)
        .arg("--report-csv")
        .arg(&report)
        .output()
        .expect("run arcfleet");
    (output, report)
}

fn bastion(lab: &Lab) -> (String, String) {
    let bastion = &lab.manifest["bastion"];
    let host = bastion["host"].as_str().unwrap().to_owned();
    let log = bastion["sshd_log"].as_str().unwrap().to_owned();
    (host, log)
}

/// Counts the logins the bastion's sshd accepted.
fn bastion_logins(lab: &Lab) -> usize {
    let (_, log) = bastion(lab);
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|line| line.contains("Accepted publickey"))
        .count()
}

#[test]
fn fifty_devices_share_one_bastion_session() {
    let lab = Lab::start(&support::bastion_spec(50));
    let sshd_config =
        std::fs::read_to_string(Path::new(&bastion(&lab).1).with_file_name("sshd_config")).unwrap();
    assert!(
        !sshd_config.lines().any(|l| l.starts_with("MaxStartups")),
        "the bastion keeps OpenSSH's default MaxStartups 10:30:100"
    );
    let logins_before = bastion_logins(&lab);
    let inventory = write_inventory(&lab, &[]);

    // Every device runs its probe, restart and checks at once, each command a few Python
    // processes of the K3s stand-in, so on a small or busy CI machine commands can take
    // minutes. The bounds are generous because this test is about connections, not speed.
    let playbook = lab.scratch("slow-playbook.yaml");
    std::fs::write(
        &playbook,
        support::FAST_PLAYBOOK.replace("deadline: 40s", "deadline: 600s"),
    )
    .unwrap();
    let mut command = lab.arcfleet(&["converge"]);
    command
        .arg("--ssh-config")
        .arg(lab.field("ssh_config"))
        .args(["--command-timeout", "600s", "--connect-timeout", "120s"]);
    let (output, report) = converge_with(&lab, command, &inventory, &playbook);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));

    let rows = rows_by_device(&report);
    assert_eq!(rows.len(), 50);
    for name in lab.device_names() {
        let row = &rows[&name];
        assert_eq!(row["action"], "changed", "{name}: {row:?}");
        assert_eq!(lab.restarts(&name).len(), 1, "{name} restarted once");
    }
    assert_eq!(
        bastion_logins(&lab) - logins_before,
        1,
        "every device went through one authenticated bastion session"
    );
}

#[test]
fn devices_need_the_bastion() {
    let lab = Lab::start(&support::bastion_spec(2));
    let names = lab.device_names();
    let inventory = write_inventory(&lab, &[]);
    // An audit contacts every server, where a converge would skip a cluster's other
    // servers after its first failure.
    let mut direct = lab.arcfleet(&["audit"]);
    direct.args(["--ssh-config", "none", "--connect-timeout", "5s"]);
    let (output, report) = converge(&lab, direct, &inventory);
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let rows = rows_by_device(&report);
    for name in &names {
        assert_eq!(rows[name]["action"], "failed", "{:?}", rows[name]);
        assert!(lab.restarts(name).is_empty());
    }

    // The YAML inventory's proxy_jump names the bastion.
    let (host, _) = bastion(&lab);
    let cluster = &lab.manifest["clusters"][0];
    let mut yaml = format!(
        "defaults:\n  user: root\n  proxy_jump: root@{host}:22\nclusters:\n  c:\n    \
         subscription: {}\n    resource_group: {}\n    name: {}\ndevices:\n",
        cluster["subscription"].as_str().unwrap(),
        cluster["resource_group"].as_str().unwrap(),
        cluster["name"].as_str().unwrap()
    );
    for name in &names {
        let address = lab.device(name)["host"].as_str().unwrap();
        yaml.push_str(&format!(
            "  - {{name: {name}, host: {address}, cluster: c}}\n"
        ));
    }
    let yaml_inventory = lab.scratch("fleet.yaml");
    std::fs::write(&yaml_inventory, yaml).unwrap();
    let mut through = lab.arcfleet(&["converge"]);
    through.args(["--ssh-config", "none"]);
    let (output, report) = converge(&lab, through, &yaml_inventory);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let rows = rows_by_device(&report);
    for name in &names {
        assert_eq!(rows[name]["action"], "changed", "{:?}", rows[name]);
    }
}

#[test]
fn ansible_inventory_jumps_through_bastion() {
    let lab = Lab::start(&support::bastion_spec(3));
    let names = lab.device_names();
    let (host, _) = bastion(&lab);
    let cluster = &lab.manifest["clusters"][0];
    let mut ini = String::from("[edge]\n");
    for name in &names {
        let address = lab.device(name)["host"].as_str().unwrap();
        ini.push_str(&format!("{name} ansible_host={address}\n"));
    }
    ini.push_str(&format!(
        "\n[edge:vars]\nansible_user=root\nansible_ssh_common_args='-J root@{host}'\n\
         arc_subscription={}\narc_resource_group={}\narc_cluster={}\n",
        cluster["subscription"].as_str().unwrap(),
        cluster["resource_group"].as_str().unwrap(),
        cluster["name"].as_str().unwrap()
    ));
    let inventory = lab.scratch("hosts");
    std::fs::write(&inventory, ini).unwrap();

    let mut command = lab.arcfleet(&["converge"]);
    command.args(["--ssh-config", "none"]);
    let (output, report) = converge(&lab, command, &inventory);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let rows = rows_by_device(&report);
    for name in &names {
        assert_eq!(rows[name]["action"], "changed", "{:?}", rows[name]);
        assert_eq!(
            lab.published_issuer(name),
            Some(lab.cluster_issuer(name)),
            "{name} signs with the Arc issuer"
        );
    }
}

#[test]
fn two_hop_jump_logs_in_per_hop() {
    let lab = Lab::start(&support::bastion_spec(2));
    let (host, _) = bastion(&lab);
    let hosts: Vec<String> = lab
        .device_names()
        .iter()
        .map(|n| lab.device(n)["host"].as_str().unwrap().to_owned())
        .collect();
    // The second hop is the bastion again, reached from inside its own namespace, so the
    // chain is host -> bastion -> bastion -> device, each hop a real sshd login.
    let config = lab.scratch("ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host {}\n    ProxyJump jump-outer,jump-inner\n\n\
             Host jump-outer jump-inner\n    HostName {host}\n    User root\n\n\
             Host *\n    IdentityFile {}\n    UserKnownHostsFile {}\n",
            hosts.join(" "),
            lab.field("identity_file"),
            lab.field("known_hosts"),
        ),
    )
    .unwrap();

    let logins_before = bastion_logins(&lab);
    let inventory = write_inventory(&lab, &[]);
    let mut command = lab.arcfleet_without_keys(&["converge"]);
    command.arg("--ssh-config").arg(&config);
    let (output, report) = converge(&lab, command, &inventory);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    for row in rows_by_device(&report).values() {
        assert_eq!(row["action"], "changed", "{row:?}");
    }
    assert_eq!(
        bastion_logins(&lab) - logins_before,
        2,
        "one session per hop"
    );
}

#[test]
fn unreachable_bastion_fails_each_device() {
    let lab = Lab::start(&support::bastion_spec(3));
    let config = lab.scratch("ssh_config");
    let hosts: Vec<String> = lab
        .device_names()
        .iter()
        .map(|n| lab.device(n)["host"].as_str().unwrap().to_owned())
        .collect();
    std::fs::write(
        &config,
        format!("Host {}\n    ProxyJump root@127.0.0.1:1\n", hosts.join(" ")),
    )
    .unwrap();
    let inventory = write_inventory(&lab, &[]);
    let mut command = lab.arcfleet(&["audit"]);
    command.arg("--ssh-config").arg(&config);
    let (output, report) = converge(&lab, command, &inventory);
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    for row in rows_by_device(&report).values() {
        assert_eq!(row["action"], "failed");
        assert!(
            row["error"].contains("through jump host root@127.0.0.1:1: cannot connect"),
            "{row:?}"
        );
    }
}
