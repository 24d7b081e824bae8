//! End-to-end runs of the `arcfleet` binary against real sshd devices with the K3s
//! stand-in and the Azure emulator.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::json;
use support::{describe, read_csv, rows_by_device, run, write_inventory, write_playbook, Lab};

fn servers(lab: &Lab) -> Vec<String> {
    lab.manifest["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["role"] == "server")
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn fleet_converges_and_second_run_changes_nothing() {
    let mut spec = support::spec(6, 2, 1);
    // A cluster ARM does not know, with one server of its own.
    let first_cluster = spec["clusters"][0].clone();
    let mut missing = first_cluster.clone();
    missing["name"] = json!("decommissioned-line");
    missing["exists"] = json!(false);
    missing.as_object_mut().unwrap().remove("issuer_url");
    spec["clusters"].as_array_mut().unwrap().push(missing);
    spec["devices"][5]["cluster"] = json!("decommissioned-line");
    let lab = Lab::start(&spec);

    // One row points at a closed port, and one device's known_hosts entry gets another
    // device's key.
    let unreachable =
        "edge-gone,127.0.0.1,1,root,00000000-0000-0000-0000-000000000001,rg,c,server,";
    let first_cluster_name = first_cluster["name"].as_str().unwrap();
    let unreachable = unreachable.replace(
        ",rg,c,",
        &format!(
            ",{},{},",
            first_cluster["resource_group"].as_str().unwrap(),
            first_cluster_name
        ),
    );
    let unreachable = unreachable.replace(
        "00000000-0000-0000-0000-000000000001",
        first_cluster["subscription"].as_str().unwrap(),
    );
    let inventory = write_inventory(&lab, &[&unreachable]);
    let names = lab.device_names();
    // The mismatching device is the last server of its cluster, because a failure ends
    // the cluster's turn and would skip the servers after it.
    let (mismatch, donor) = (names[3].clone(), names[0].clone());
    let known_hosts = std::fs::read_to_string(lab.field("known_hosts")).unwrap();
    let port_of = |name: &str| lab.device(name)["port"].as_u64().unwrap();
    let donor_key = known_hosts
        .lines()
        .find(|l| l.starts_with(&format!("[127.0.0.1]:{} ", port_of(&donor))))
        .unwrap()
        .split_once(' ')
        .unwrap()
        .1
        .to_owned();
    let rewritten: Vec<String> = known_hosts
        .lines()
        .map(|line| {
            let prefix = format!("[127.0.0.1]:{} ", port_of(&mismatch));
            if line.starts_with(&prefix) {
                format!("{prefix}{donor_key}")
            } else {
                line.to_owned()
            }
        })
        .collect();
    std::fs::write(lab.field("known_hosts"), rewritten.join("\n") + "\n").unwrap();

    let playbook = write_playbook(&lab);
    let report = lab.scratch("report.csv");
    let args = [
        "converge",
        "--inventory",
        inventory.to_str().unwrap(),
        "--playbook",
        playbook.to_str().unwrap(),
        "--report-csv",
        report.to_str().unwrap(),
    ];
    let output = run(&lab, &args);
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let rows = rows_by_device(&report);
    assert_eq!(rows.len(), names.len() + 1, "one row per inventory device");

    let decommissioned = names[5].clone();
    let good: Vec<String> = servers(&lab)
        .into_iter()
        .filter(|n| *n != mismatch && *n != decommissioned)
        .collect();
    assert!(good.len() >= 4, "{good:?}");
    for name in &good {
        let row = &rows[name];
        assert_eq!(row["action"], "changed", "{name}: {row:?}");
        assert_eq!(row["compliant"], "true", "{name}: {row:?}");
        let expected = lab.cluster_issuer(name);
        assert_eq!(row["expected_issuer"], expected, "{name}");
        assert_eq!(
            lab.published_issuer(name).as_deref(),
            Some(expected.as_str()),
            "{name}"
        );
        assert_eq!(lab.restarts(name).len(), 1, "{name} restarted once");
    }

    let agent = names
        .iter()
        .find(|n| lab.device(n)["role"] == "agent")
        .unwrap();
    assert_eq!(rows[agent]["action"], "not-applicable");
    assert!(lab.restarts(agent).is_empty(), "agent left alone");

    assert_eq!(rows["edge-gone"]["action"], "failed");
    assert!(
        rows["edge-gone"]["error"].contains("cannot connect"),
        "{:?}",
        rows["edge-gone"]
    );

    assert_eq!(rows[&mismatch]["action"], "failed");
    assert!(
        rows[&mismatch]["error"].contains("does not match"),
        "{:?}",
        rows[&mismatch]
    );
    assert!(lab.restarts(&mismatch).is_empty());

    assert_eq!(rows[&decommissioned]["action"], "failed");
    assert!(
        rows[&decommissioned]["error"].contains("ARM has no connected cluster"),
        "{:?}",
        rows[&decommissioned]
    );
    assert!(lab.restarts(&decommissioned).is_empty());
    // The first cluster and the decommissioned one share a resource group, which is
    // listed; the other cluster is read with a GET.
    assert_eq!(lab.arm_requests(), 2, "one list and one GET");

    // The second run changes and restarts nothing.
    let second = run(&lab, &args);
    assert_eq!(second.status.code(), Some(3), "{}", describe(&second));
    let rows = rows_by_device(&report);
    for name in &good {
        assert_eq!(
            rows[name]["action"], "unchanged",
            "{name}: {:?}",
            rows[name]
        );
        assert_eq!(rows[name]["compliant"], "true");
        assert_eq!(lab.restarts(name).len(), 1, "{name} not restarted again");
    }
    // A compliant server costs one channel: the probe mints the proof token too.
    let record = latest_run_record(&lab);
    for name in &good {
        let transcript =
            std::fs::read_to_string(record.join("transcripts").join(format!("{name}.log")))
                .unwrap();
        assert_eq!(
            transcript.matches("\n$ ").count(),
            1,
            "{name} took one command:\n{transcript}"
        );
        assert!(transcript.contains("@@claims "), "{transcript}");
    }
}

/// Snapshot of every file under a device's /etc/rancher, for detecting changes.
/// Runs `converge` with a playbook and a CSV report.
fn converge(
    lab: &Lab,
    inventory: &std::path::Path,
    playbook: &std::path::Path,
    report: &std::path::Path,
) -> std::process::Output {
    run(
        lab,
        &[
            "converge",
            "--inventory",
            inventory.to_str().unwrap(),
            "--playbook",
            playbook.to_str().unwrap(),
            "--report-csv",
            report.to_str().unwrap(),
        ],
    )
}

/// Returns the run record folder written last.
fn latest_run_record(lab: &Lab) -> std::path::PathBuf {
    std::fs::read_dir(lab.scratch("arcfleet-runs"))
        .unwrap()
        .flatten()
        .max_by_key(|entry| entry.metadata().and_then(|m| m.modified()).ok())
        .unwrap()
        .path()
}

fn rancher_files(lab: &Lab, device: &str) -> Vec<(String, Vec<u8>)> {
    let root = lab.device_path(device, "/etc/rancher");
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn audit_and_check_change_nothing() {
    let lab = Lab::start(&support::spec(3, 1, 0));
    let inventory = write_inventory(&lab, &[]);
    let playbook = write_playbook(&lab);
    let inventory = inventory.to_str().unwrap();
    let playbook = playbook.to_str().unwrap();
    let before: Vec<_> = servers(&lab)
        .iter()
        .map(|d| rancher_files(&lab, d))
        .collect();

    let audit = run(
        &lab,
        &["audit", "--inventory", inventory, "--playbook", playbook],
    );
    assert_eq!(audit.status.code(), Some(3), "{}", describe(&audit));
    assert!(String::from_utf8_lossy(&audit.stdout).contains("would-change"));

    let check = run(
        &lab,
        &[
            "converge",
            "--check",
            "--inventory",
            inventory,
            "--playbook",
            playbook,
        ],
    );
    assert_eq!(check.status.code(), Some(3), "{}", describe(&check));
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        stdout.contains("+++ /etc/rancher/k3s/config.yaml.d/zz-arcfleet-oidc-issuer.yaml"),
        "{stdout}"
    );
    assert!(
        stdout.contains("+  - \"service-account-issuer-="),
        "{stdout}"
    );

    let after: Vec<_> = servers(&lab)
        .iter()
        .map(|d| rancher_files(&lab, d))
        .collect();
    assert_eq!(before, after, "audit and --check leave files alone");
    for name in servers(&lab) {
        assert!(lab.restarts(&name).is_empty(), "{name} not restarted");
    }

    let converge = run(
        &lab,
        &["converge", "--inventory", inventory, "--playbook", playbook],
    );
    assert_eq!(converge.status.code(), Some(0), "{}", describe(&converge));
    let audit = run(
        &lab,
        &["audit", "--inventory", inventory, "--playbook", playbook],
    );
    assert_eq!(audit.status.code(), Some(0), "{}", describe(&audit));
}

#[test]
fn rejected_flag_is_rolled_back() {
    // Two clusters, so that the failure on one does not stop the other.
    let lab = Lab::start(&support::spec(2, 2, 0));
    let names = lab.device_names();
    lab.set_faults(
        &names[0],
        json!({"reject_flags": ["service-account-max-token-expiration"]}),
    );
    let before = lab
        .published_issuer(&names[0])
        .expect("API answers before the run");
    let inventory = write_inventory(&lab, &[]);
    let playbook = write_playbook(&lab);
    let report = lab.scratch("report.csv");
    let output = converge(&lab, &inventory, &playbook, &report);
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let rows = rows_by_device(&report);
    let failed = &rows[&names[0]];
    assert_eq!(failed["action"], "failed", "{failed:?}");
    assert_eq!(failed["rolled_back"], "true", "{failed:?}");
    assert!(failed["error"].contains("rolled back"), "{failed:?}");
    assert!(
        failed["error"].contains("unknown flag"),
        "journal lines in the error: {failed:?}"
    );
    assert_eq!(
        lab.published_issuer(&names[0]),
        Some(before),
        "old issuer served again"
    );
    let dropin = lab.device_path(
        &names[0],
        "/etc/rancher/k3s/config.yaml.d/zz-arcfleet-oidc-issuer.yaml",
    );
    assert!(!dropin.exists(), "the drop-in is removed again");
    assert_eq!(
        rows[&names[1]]["action"], "changed",
        "{:?}",
        rows[&names[1]]
    );
}

#[test]
fn failed_restart_keeps_files_it_did_not_write() {
    let lab = Lab::start(&support::spec(1, 1, 0));
    let name = lab.device_names()[0].clone();
    let inventory = write_inventory(&lab, &[]);
    let report = lab.scratch("report.csv");
    // A playbook without restart-k3s writes the drop-in and leaves the restart for later.
    let write_only = lab.scratch("write-only.yaml");
    std::fs::write(
        &write_only,
        "name: write-only\nsteps:\n  - probe\n  - configure-apiserver\n",
    )
    .unwrap();
    let output = converge(&lab, &inventory, &write_only, &report);
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let dropin = lab.device_path(
        &name,
        "/etc/rancher/k3s/config.yaml.d/zz-arcfleet-oidc-issuer.yaml",
    );
    let written = std::fs::read_to_string(&dropin).unwrap();

    // The next run only restarts, and the restart fails: the files are not this run's to
    // roll back, so they stay as they are and K3s is not restarted a second time.
    lab.set_faults(
        &name,
        json!({"reject_flags": ["service-account-max-token-expiration"]}),
    );
    let output = converge(&lab, &inventory, &write_playbook(&lab), &report);
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let row = &rows_by_device(&report)[&name];
    assert_eq!(row["action"], "failed", "{row:?}");
    assert_eq!(row["rolled_back"], "false", "{row:?}");
    assert_eq!(row["cause"], "rollback-failed", "{row:?}");
    assert!(
        row["error"].contains("arcfleet wrote nothing in this run"),
        "{row:?}"
    );
    assert_eq!(std::fs::read_to_string(&dropin).unwrap(), written);
    assert_eq!(
        lab.restarts(&name).len(),
        1,
        "one restart: {:?}",
        lab.restarts(&name)
    );
}

#[test]
fn malformed_inventory_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.csv");
    std::fs::write(
        &path,
        "name,host,port,user,subscription,resource_group,cluster,role,labels\n\
         edge-1,10.0.0.1,22,root,s,rg,c,server,\n\
         edge-2,10.0.0.2,2x2,root,s,rg,c,server,\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_arcfleet"))
        .current_dir(dir.path())
        .args(["converge", "--inventory", path.to_str().unwrap()])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("fleet.csv:3:"), "{stderr}");
    assert!(stderr.contains("field `port`"), "{stderr}");
    assert!(stderr.contains("2x2"), "{stderr}");
}

/// Runs arcfleet under `prlimit` with a soft open-file limit of 64 and a hard limit of 128,
/// on an inventory of two devices on closed loopback ports. No device is contacted,
/// because without Azure credentials no issuer resolves, and the Azure endpoints point at
/// a closed loopback port too.
fn run_with_file_limit(concurrency: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.csv");
    std::fs::write(
        &path,
        "name,host,port,user,subscription,resource_group,cluster,role,labels\n\
         edge-1,127.0.0.1,1,root,s,rg,c,server,\n\
         edge-2,127.0.0.1,1,root,s,rg,c,server,\n",
    )
    .unwrap();
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, "").unwrap();
    std::process::Command::new("prlimit")
        .arg("--nofile=64:128")
        .arg(env!("CARGO_BIN_EXE_arcfleet"))
        .current_dir(dir.path())
        .args(["-v", "audit", "--inventory", path.to_str().unwrap()])
        .args(["--concurrency", concurrency])
        .arg("--known-hosts")
        .arg(&known_hosts)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("ARCFLEET_ARM_ENDPOINT", "http://127.0.0.1:1/")
        .env("AZURE_AUTHORITY_HOST", "http://127.0.0.1:1/")
        .output()
        .unwrap()
}

#[test]
fn open_file_limit_is_raised_to_hard_limit() {
    // 50 devices need 114 descriptors: more than the soft limit, within the hard one.
    let output = run_with_file_limit("50");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("soft=Some(128)"), "{}", describe(&output));
    assert!(!stderr.contains("open files"), "{stderr}");
    assert_ne!(output.status.code(), Some(2), "{}", describe(&output));
}

#[test]
fn concurrency_above_file_limit_is_rejected() {
    let output = run_with_file_limit("100");
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--concurrency 100 needs about 164 open files"),
        "{stderr}"
    );
    assert!(stderr.contains("limit is 128"), "{stderr}");
    assert!(stderr.contains("at most 64"), "{stderr}");
}

#[test]
fn non_root_user_converges_through_sudo() {
    let mut spec = support::spec(2, 1, 0);
    spec["devices"][0]["user"] = json!("labuser");
    let lab = Lab::start(&spec);
    let names = lab.device_names();
    assert_eq!(lab.device(&names[0])["user"], "labuser");
    let inventory = write_inventory(&lab, &[]);
    let playbook = write_playbook(&lab);
    let report = lab.scratch("report.csv");
    let output = converge(&lab, &inventory, &playbook, &report);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let rows = rows_by_device(&report);
    assert_eq!(
        rows[&names[0]]["action"], "changed",
        "{:?}",
        rows[&names[0]]
    );
    let expected = lab.cluster_issuer(&names[0]);
    assert_eq!(lab.published_issuer(&names[0]), Some(expected));
}

#[test]
fn wrong_client_secret_fails_azure_auth() {
    let lab = Lab::start(&support::spec(2, 1, 0));
    let inventory = write_inventory(&lab, &[]);
    let report = lab.scratch("report.csv");
    let output = lab
        .arcfleet(&[
            "converge",
            "--inventory",
            inventory.to_str().unwrap(),
            "--report-csv",
            report.to_str().unwrap(),
        ])
        .env("AZURE_CLIENT_SECRET", "not-the-secret")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4), "{}", describe(&output));
    let rows = read_csv(&report);
    assert_eq!(rows.len(), 2, "every device has a row");
    for row in &rows {
        assert_eq!(row["action"], "failed");
        assert!(
            row["error"].contains("Azure authentication failed"),
            "{row:?}"
        );
        assert!(
            !row["error"].contains("not-the-secret"),
            "no secret in the report: {row:?}"
        );
    }
    for name in lab.device_names() {
        assert!(lab.restarts(&name).is_empty());
    }
}

#[test]
fn report_is_written_when_setup_fails() {
    let lab = Lab::start(&support::spec(1, 1, 0));
    let inventory = write_inventory(&lab, &[]);
    let report = lab.scratch("report.csv");
    let output = lab
        .arcfleet(&[
            "converge",
            "--inventory",
            inventory.to_str().unwrap(),
            "--report-csv",
            report.to_str().unwrap(),
            "--playbook",
            "/nonexistent/playbook.yaml",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    let rows = read_csv(&report);
    assert_eq!(rows.len(), 1);
    assert!(
        rows[0]["error"].contains("/nonexistent/playbook.yaml"),
        "{:?}",
        rows[0]
    );
}

#[test]
fn missing_known_hosts_stops_the_run_up_front() {
    let lab = Lab::start(&support::spec(2, 2, 0));
    let inventory = write_inventory(&lab, &[]);
    let report = lab.scratch("report.csv");
    let missing = lab.scratch("no-such-known_hosts");
    // Without this, a global /etc/ssh/ssh_known_hosts on the test machine would count.
    let config = lab.scratch("ssh_config");
    std::fs::write(
        &config,
        "GlobalKnownHostsFile /nonexistent/ssh_known_hosts\n",
    )
    .unwrap();
    let output = lab
        .arcfleet_without_keys(&["converge", "--inventory", inventory.to_str().unwrap()])
        .arg("--identity")
        .arg(lab.field("identity_file"))
        .arg("--known-hosts")
        .arg(&missing)
        .arg("--ssh-config")
        .arg(&config)
        .arg("--report-csv")
        .arg(&report)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no known_hosts file exists for 2 host(s)")
            && stderr.contains(missing.to_str().unwrap())
            && stderr.contains("--accept-new-host-keys"),
        "{stderr}"
    );
    for name in lab.device_names() {
        assert!(stderr.contains(&name), "{name} is named: {stderr}");
    }
    let rows = read_csv(&report);
    assert_eq!(rows.len(), 2);
    for (row, name) in rows.iter().zip(lab.device_names()) {
        assert_eq!(row["action"], "skipped", "{row:?}");
        assert!(lab.restarts(&name).is_empty());
    }

    // A run that selects one device reports that device only.
    let first = &lab.device_names()[0];
    let output = lab
        .arcfleet_without_keys(&["converge", "--inventory", inventory.to_str().unwrap()])
        .args(["--limit", first])
        .arg("--known-hosts")
        .arg(&missing)
        .arg("--ssh-config")
        .arg(&config)
        .arg("--report-csv")
        .arg(&report)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    let rows = read_csv(&report);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(&rows[0]["device"], first);
}

#[test]
fn bad_output_or_key_path_stops_the_run() {
    let lab = Lab::start(&support::spec(1, 1, 0));
    let name = lab.device_names()[0].clone();
    let inventory = write_inventory(&lab, &[]);
    let directory = lab.scratch("reports");
    std::fs::create_dir_all(&directory).unwrap();
    let missing_key = lab.scratch("no-such-key");
    let known_hosts = lab.field("known_hosts");
    let cases: [(&[&str], &str); 3] = [
        (
            &["--report-csv", directory.to_str().unwrap()],
            "is a directory: give a file path",
        ),
        (
            &["--run-dir", inventory.to_str().unwrap()],
            "is not a directory",
        ),
        (
            &["--identity", missing_key.to_str().unwrap()],
            "cannot be read",
        ),
    ];
    for (extra, expected) in cases {
        let mut command = lab.arcfleet_without_keys(&[
            "converge",
            "--inventory",
            inventory.to_str().unwrap(),
            "--known-hosts",
            &known_hosts,
        ]);
        command.args(extra);
        if extra[0] != "--identity" {
            command.arg("--identity").arg(lab.field("identity_file"));
        }
        let output = command.output().unwrap();
        assert_eq!(
            output.status.code(),
            Some(2),
            "{extra:?}: {}",
            describe(&output)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
    assert!(lab.calls(&name).is_empty(), "no device was contacted");
}
