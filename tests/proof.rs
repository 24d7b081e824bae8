//! Proof and causes on lab devices: each cause comes from a setup that really has that
//! fault, the token proof catches a signing key Arc does not publish, and no token,
//! password or join token reaches a report, transcript or log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};
use support::{describe, rows_by_device, run, write_inventory, Lab};

/// Device names and the cause each one's fault must produce.
const EXPECTED: &[(&str, &str)] = &[
    ("healthy", ""),
    ("unknown-key", "host-key-unknown"),
    ("changed-key", "host-key-mismatch"),
    ("wrong-user", "auth-failed"),
    ("agent-only", "not-a-server"),
    ("gone-cluster", "azure-cluster-not-found"),
    ("offline-cluster", "azure-cluster-not-ready"),
    ("no-issuer-yet", "issuer-missing-in-azure"),
    ("broken-yaml", "config-invalid"),
    ("overridden", "config-overridden"),
    ("rejects-flag", "restart-failed-rolled-back"),
    ("never-starts", "rollback-failed"),
    ("learner", "node-not-ready"),
    ("unpublished-key", "signing-key-not-published"),
    ("stale-credential", "secret-sync-failing"),
    ("file-not-dir", "command-failed"),
    ("foreign-token", "token-issuer-mismatch"),
];

fn fault_spec() -> Value {
    let mut spec = support::spec(EXPECTED.len(), 1, 0);
    for (index, (name, _)) in EXPECTED.iter().enumerate() {
        spec["devices"][index]["name"] = json!(name);
    }
    support::isolate_clusters(&mut spec);
    let device = |spec: &mut Value, name: &str| -> usize {
        spec["devices"]
            .as_array()
            .unwrap()
            .iter()
            .position(|d| d["name"] == name)
            .unwrap()
    };
    let cluster = |spec: &mut Value, name: &str| -> usize {
        let cluster = format!("site-{name}");
        spec["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .position(|c| c["name"] == cluster.as_str())
            .unwrap()
    };

    let agent = device(&mut spec, "agent-only");
    spec["devices"][agent]["role"] = json!("agent");
    let gone = cluster(&mut spec, "gone-cluster");
    spec["clusters"][gone]["exists"] = json!(false);
    let offline = cluster(&mut spec, "offline-cluster");
    spec["clusters"][offline]["connectivity_status"] = json!("Offline");
    let pending = cluster(&mut spec, "no-issuer-yet");
    spec["clusters"][pending]["issuer_url"] = json!("");
    let overridden = device(&mut spec, "overridden");
    spec["devices"][overridden]["files"] = json!({
        "/etc/rancher/k3s/config.yaml.d/zzz-site.yaml": "kube-apiserver-arg:\n  - audit-log-maxage=7\n"
    });
    let rejects = device(&mut spec, "rejects-flag");
    spec["devices"][rejects]["faults"] = json!({
        "reject_flags": ["service-account-max-token-expiration"],
        "only_when_config_contains": "service-account-issuer-="
    });
    // Without a config trigger the hang stays after the rollback, so the old
    // configuration does not start either.
    let never = device(&mut spec, "never-starts");
    spec["devices"][never]["faults"] = json!({"restart_hang": true});
    let learner = device(&mut spec, "learner");
    spec["devices"][learner]["exec_start_args"] = json!(["server", "--cluster-init"]);
    spec["devices"][learner]["faults"] = json!({
        "etcd_voter_after_seconds": 3600,
        "only_when_config_contains": "service-account-issuer-="
    });
    let foreign = device(&mut spec, "foreign-token");
    spec["devices"][foreign]["faults"] =
        json!({"token_issuer": "https://kubernetes.default.svc.cluster.local"});
    let unpublished = device(&mut spec, "unpublished-key");
    spec["devices"][unpublished]["publish_signing_key"] = json!(false);
    spec
}

/// Breaks what the spec cannot express, after the lab is up.
fn break_devices(lab: &Lab) {
    // Someone edited config.yaml into invalid YAML after K3s last started.
    std::fs::write(
        lab.device_path("broken-yaml", "/etc/rancher/k3s/config.yaml"),
        "kube-apiserver-arg: [unclosed\n",
    )
    .unwrap();
    // The drop-in directory is a file, so the write fails.
    let dropins = lab.device_path("file-not-dir", "/etc/rancher/k3s/config.yaml.d");
    let _ = std::fs::remove_dir_all(&dropins);
    std::fs::write(&dropins, "not a directory\n").unwrap();
    // The federated identity credential still trusts another issuer, so the controller's
    // new token is refused and SecretSync keeps failing.
    let cluster_file = lab.device_path(
        "stale-credential",
        "/var/lib/rancher/k3s/standin/cluster.json",
    );
    let mut model: Value = serde_json::from_slice(&std::fs::read(&cluster_file).unwrap()).unwrap();
    model["arc_issuer"] = json!("https://stale.example/issuer/");
    std::fs::write(&cluster_file, serde_json::to_vec(&model).unwrap()).unwrap();

    // known_hosts: drop one device's entry and give another a different device's key.
    let port = |name: &str| lab.device(name)["port"].as_u64().unwrap();
    let prefix = |name: &str| format!("[127.0.0.1]:{} ", port(name));
    let text = std::fs::read_to_string(lab.field("known_hosts")).unwrap();
    let donor_key = text
        .lines()
        .find(|l| l.starts_with(&prefix("healthy")))
        .unwrap()
        .split_once(' ')
        .unwrap()
        .1
        .to_owned();
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with(&prefix("unknown-key")))
        .map(|l| {
            if l.starts_with(&prefix("changed-key")) {
                format!("{}{donor_key}", prefix("changed-key"))
            } else {
                l.to_owned()
            }
        })
        .collect();
    std::fs::write(lab.field("known_hosts"), lines.join("\n") + "\n").unwrap();
}

/// Writes the inventory: every lab device as a server (the agent included) and a user
/// that does not exist for one device.
fn fault_inventory(lab: &Lab) -> std::path::PathBuf {
    let path = write_inventory(lab, &[]);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(",agent,", ",server,")
        .lines()
        .map(|line| {
            if line.starts_with("wrong-user,") {
                line.replacen(",root,", ",ghost,", 1)
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&path, text + "\n").unwrap();
    path
}

fn fast_playbook(lab: &Lab) -> std::path::PathBuf {
    let path = lab.scratch("playbook.yaml");
    std::fs::write(
        &path,
        "name: proof\nsteps:\n  - probe\n  - configure-apiserver\n  - restart-k3s:\n      \
         deadline: 8s\n      stability_window: 1s\n  - verify-token\n  - restart-secret-sync:\n      \
         rollout_timeout: 20s\n",
    )
    .unwrap();
    path
}

/// Returns whether `text` contains a JSON Web Token: a base64url JSON header, a payload and
/// a signature joined by dots. Base64 of plain JSON (`eyJ...` without dots) is not one.
fn contains_jwt(text: &str) -> bool {
    text.match_indices("eyJ").any(|(start, _)| {
        let token: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .collect();
        token.split('.').filter(|part| part.len() >= 4).count() >= 3
    })
}

/// Lists every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(next) = stack.pop() {
        for entry in std::fs::read_dir(&next).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

#[test]
fn every_cause_comes_from_a_real_fault() {
    let lab = Lab::start(&fault_spec());
    break_devices(&lab);
    let inventory = fault_inventory(&lab);
    let playbook = fast_playbook(&lab);
    let report = lab.scratch("report.csv");
    let output = run(
        &lab,
        &[
            "converge",
            "--inventory",
            inventory.to_str().unwrap(),
            "--playbook",
            playbook.to_str().unwrap(),
            "--report-csv",
            report.to_str().unwrap(),
            "--report-json",
            lab.scratch("report.json").to_str().unwrap(),
        ],
    );
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let rows = rows_by_device(&report);
    for (name, cause) in EXPECTED {
        let row = &rows[*name];
        assert_eq!(row["cause"], *cause, "{name}: {row:?}");
        if cause.is_empty() {
            assert_eq!(row["compliant"], "true", "{name}: {row:?}");
            assert_eq!(row["signing_key_published"], "true", "{name}: {row:?}");
            assert_eq!(row["token_issuer"], lab.cluster_issuer(name), "{name}");
        } else {
            assert_eq!(row["compliant"], "false", "{name}: {row:?}");
            assert!(!row["fix"].is_empty(), "{name}: every cause has a fix");
        }
    }
    assert_eq!(rows["unpublished-key"]["signing_key_published"], "false");
    assert_eq!(
        rows["unpublished-key"]["token_issuer"],
        lab.cluster_issuer("unpublished-key")
    );
    assert_eq!(rows["rejects-flag"]["rolled_back"], "true");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("By cause:"), "{stdout}");
    assert!(
        stdout.contains("  config-overridden (1): overridden"),
        "{stdout}"
    );

    // An audit of a device converge has not reached reports that the issuer is not
    // effective, and a cluster whose first server fails skips the rest.
    let audit = run(
        &lab,
        &[
            "audit",
            "--inventory",
            inventory.to_str().unwrap(),
            "--playbook",
            playbook.to_str().unwrap(),
            "--report-csv",
            report.to_str().unwrap(),
            "--limit",
            "overridden,healthy",
        ],
    );
    assert_eq!(audit.status.code(), Some(3), "{}", describe(&audit));
    let rows = rows_by_device(&report);
    assert_eq!(rows["healthy"]["cause"], "");
    assert_eq!(rows["overridden"]["cause"], "config-overridden");

    // No secret anywhere: not the client secret, no token, no K3s join token.
    let secret = lab.field("client_secret");
    let mut texts: Vec<(String, String)> = vec![
        (
            "stdout".into(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        ),
        (
            "stderr".into(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ),
    ];
    for path in files_under(&lab.scratch("")) {
        let is_output = path.starts_with(lab.scratch("arcfleet-runs"))
            || path
                .extension()
                .is_some_and(|e| e == "csv" || e == "json" || e == "txt");
        if is_output && !path.starts_with(lab.lab_dir()) {
            texts.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap_or_default(),
            ));
        }
    }
    let record_count = files_under(&lab.scratch("arcfleet-runs")).len();
    assert!(
        record_count >= 8,
        "run records with transcripts were written ({record_count} files)"
    );
    assert!(
        contains_jwt("x eyJhbGciOi.eyJpc3MiOi.c2lnbmF0 y"),
        "the JWT check itself works"
    );
    let join_token_prefix = "K10";
    for (name, text) in &texts {
        assert!(!text.contains(&secret), "{name} contains the client secret");
        assert!(!contains_jwt(text), "{name} contains a JWT");
        assert!(
            !text.contains(join_token_prefix),
            "{name} contains a K3s join token"
        );
    }
    let modes: HashMap<String, u32> = files_under(&lab.scratch("arcfleet-runs"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| {
            use std::os::unix::fs::PermissionsExt;
            (
                p.display().to_string(),
                std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
            )
        })
        .collect();
    assert!(
        modes.values().all(|mode| *mode == 0o600),
        "transcripts are private: {modes:?}"
    );
}
