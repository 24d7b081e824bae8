//! End-to-end runs from Ansible inventories, YAML and INI, against lab devices.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;

use serde_json::Value;
use support::{describe, rows_by_device, write_playbook, Lab};

fn cluster_vars(cluster: &Value) -> [(&'static str, String); 3] {
    [
        (
            "arc_subscription",
            cluster["subscription"].as_str().unwrap().to_owned(),
        ),
        (
            "arc_resource_group",
            cluster["resource_group"].as_str().unwrap().to_owned(),
        ),
        ("arc_cluster", cluster["name"].as_str().unwrap().to_owned()),
    ]
}

fn converge(
    lab: &Lab,
    inventory: &Path,
    extra: &[&str],
) -> (std::process::Output, std::path::PathBuf) {
    let playbook = write_playbook(lab);
    let report = lab.scratch("report.csv");
    let _ = std::fs::remove_file(&report);
    let output = lab
        .arcfleet(&["converge"])
        .arg("--inventory")
        .arg(inventory)
        .arg("--playbook")
        .arg(&playbook)
        .arg("--report-csv")
        .arg(&report)
        .args(extra)
        .output()
        .unwrap();
    (output, report)
}

/// Returns the lab's devices as (name, port, user, role, cluster).
fn devices(lab: &Lab) -> Vec<(String, u64, String, String, Value)> {
    lab.manifest["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let cluster = lab.manifest["clusters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == d["cluster"])
                .unwrap()
                .clone();
            (
                d["name"].as_str().unwrap().to_owned(),
                d["port"].as_u64().unwrap(),
                d["user"].as_str().unwrap().to_owned(),
                d["role"].as_str().unwrap().to_owned(),
                cluster,
            )
        })
        .collect()
}

#[test]
fn ansible_ini_inventory_converges() {
    let lab = Lab::start(&support::spec(3, 2, 1));
    let mut ini = String::from("# lab fleet\n");
    for (name, port, user, role, cluster) in devices(&lab) {
        // Agents go into a group named `agent`, which makes them agents (k3s-ansible's
        // layout); servers into one group per cluster, with the cluster as group vars.
        let group = if role == "agent" {
            "agent".to_owned()
        } else {
            cluster["name"].as_str().unwrap().replace('-', "_")
        };
        ini.push_str(&format!(
            "[{group}]\n{name} ansible_host=127.0.0.1 ansible_port={port} ansible_user={user}\n"
        ));
        if role != "agent" {
            ini.push_str(&format!("[{group}:vars]\n"));
            for (key, value) in cluster_vars(&cluster) {
                ini.push_str(&format!("{key}={value}\n"));
            }
        }
    }
    let inventory = lab.scratch("hosts.ini");
    std::fs::write(&inventory, &ini).unwrap();

    let (output, report) = converge(&lab, &inventory, &[]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{ini}\n{}",
        describe(&output)
    );
    let rows = rows_by_device(&report);
    for (name, _, _, role, _) in devices(&lab) {
        let expected = if role == "agent" {
            "not-applicable"
        } else {
            "changed"
        };
        assert_eq!(rows[&name]["action"], expected, "{name}: {:?}", rows[&name]);
    }
}

#[test]
fn ansible_yaml_inventory_converges() {
    let lab = Lab::start(&support::spec(2, 1, 0));
    let (_, _, _, _, cluster) = devices(&lab).remove(0);
    let mut yaml = String::from("all:\n  vars:\n");
    for (key, value) in cluster_vars(&cluster) {
        yaml.push_str(&format!("    {key}: {value}\n"));
    }
    yaml.push_str(
        "  children:\n    k3s_cluster:\n      children:\n        server:\n          hosts:\n",
    );
    for (name, port, user, _, _) in devices(&lab) {
        yaml.push_str(&format!(
            "            {name}: {{ansible_host: 127.0.0.1, ansible_port: {port}, ansible_user: {user}}}\n"
        ));
    }
    let inventory = lab.scratch("inventory.yml");
    std::fs::write(&inventory, &yaml).unwrap();

    let (output, report) = converge(&lab, &inventory, &["--inventory-format", "ansible"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{yaml}\n{}",
        describe(&output)
    );
    let rows = rows_by_device(&report);
    for (name, _, _, _, _) in devices(&lab) {
        assert_eq!(
            rows[&name]["action"], "changed",
            "{name}: {:?}",
            rows[&name]
        );
        assert_eq!(lab.published_issuer(&name), Some(lab.cluster_issuer(&name)));
    }

    // Auto detection reads the same file as Ansible too.
    let (output, report) = converge(&lab, &inventory, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let rows = rows_by_device(&report);
    assert!(
        rows.values().all(|r| r["action"] == "unchanged"),
        "{rows:?}"
    );
}

#[test]
fn ansible_inventory_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hosts");
    std::fs::write(&path, "[edge]\nedge-01 ansible_port=22x\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_arcfleet"))
        .args(["audit", "--inventory", path.to_str().unwrap()])
        .env_clear()
        // No lab here: the run stops at the inventory, and Azure points at a closed
        // loopback port in case it did not.
        .env("ARCFLEET_ARM_ENDPOINT", "http://127.0.0.1:1/")
        .env("AZURE_AUTHORITY_HOST", "http://127.0.0.1:1/")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("hosts:2:"), "{stderr}");
    assert!(stderr.contains("22x"), "{stderr}");
}
