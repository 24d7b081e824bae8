//! Node layouts and failure paths, each on a lab device: where K3s's flags come from, what
//! arcfleet makes of them, and how a failed restart is rolled back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use support::{describe, rows_by_device, run, write_inventory, Lab};

const DROPIN: &str = "/etc/rancher/k3s/config.yaml.d/zz-arcfleet-oidc-issuer.yaml";
const CONFIG: &str = "/etc/rancher/k3s/config.yaml";
const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A config.yaml with comments, quoting and a YAML 1.1 octal-looking value, which must
/// stay byte-identical.
const HAND_WRITTEN: &str = "# Site settings, managed by the plant team.\n\
write-kubeconfig-mode: \"0640\"   # quoted on purpose\n\
tls-san:\n  - edge.plant-a.example\n\
node-label: [\"site=plant-a\"]\n";

fn playbook(lab: &Lab, deadline: &str, stability: &str) -> PathBuf {
    let path = lab.scratch("playbook.yaml");
    let text = format!(
        "name: test\nsteps:\n  - probe\n  - configure-apiserver\n  - restart-k3s:\n      \
         deadline: {deadline}\n      stability_window: {stability}\n  - verify-token\n  - restart-secret-sync\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn converge(lab: &Lab, playbook: &Path) -> (std::process::Output, PathBuf) {
    let inventory = write_inventory(lab, &[]);
    let report = lab.scratch("report.csv");
    let output = run(
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
    );
    (output, report)
}

fn device_spec(name: &str, cluster: &str, files: Value, exec_start: Option<Value>) -> Value {
    let mut device =
        json!({"name": name, "cluster": cluster, "role": "server", "user": "root", "files": files});
    if let Some(args) = exec_start {
        device["exec_start_args"] = args;
    }
    device
}

#[test]
fn node_layouts_converge_or_name_the_blocking_line() {
    let mut spec = support::spec(1, 1, 0);
    let cluster = spec["clusters"][0]["name"].as_str().unwrap().to_owned();
    let c = cluster.as_str();
    spec["devices"] = json!([
        device_spec("plain", c, json!({CONFIG: HAND_WRITTEN}), None),
        device_spec(
            "old-issuer-in-config",
            c,
            json!({CONFIG: "kube-apiserver-arg:\n  - service-account-issuer=https://old.example/\n"}),
            None
        ),
        device_spec(
            "issuer-in-execstart",
            c,
            json!({CONFIG: HAND_WRITTEN}),
            Some(json!([
                "server",
                "--kube-apiserver-arg=service-account-issuer=https://unit.example/"
            ]))
        ),
        device_spec(
            "only-dropins",
            c,
            json!({CONFIG: null, "/etc/rancher/k3s/config.yaml.d/10-site.yaml": "write-kubeconfig-mode: \"0644\"\n"}),
            None
        ),
        device_spec(
            "later-dropin-replaces",
            c,
            json!({CONFIG: HAND_WRITTEN, "/etc/rancher/k3s/config.yaml.d/zzz-site.yaml": "kube-apiserver-arg:\n  - audit-log-maxage=7\n"}),
            None
        ),
        device_spec(
            "issuer-prepended-in-execstart",
            c,
            json!({CONFIG: HAND_WRITTEN}),
            Some(json!([
                "server",
                "--kube-apiserver-arg=service-account-issuer-=https://unit.example/"
            ]))
        ),
        device_spec("invalid-yaml", c, json!({CONFIG: HAND_WRITTEN}), None),
    ]);
    // Each layout is an independent single-server cluster.
    support::isolate_clusters(&mut spec);
    let lab = Lab::start(&spec);

    // Someone broke config.yaml after K3s last started; K3s would refuse it on restart.
    let broken = "kube-apiserver-arg: [unclosed\nwrite-kubeconfig-mode: \"0640\"\n";
    std::fs::write(lab.device_path("invalid-yaml", CONFIG), broken).unwrap();

    let config_before: Vec<(String, Option<Vec<u8>>)> = lab
        .device_names()
        .iter()
        .map(|name| {
            (
                name.clone(),
                std::fs::read(lab.device_path(name, CONFIG)).ok(),
            )
        })
        .collect();

    let (output, report) = converge(&lab, &playbook(&lab, "40s", "1s"));
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let rows = rows_by_device(&report);

    let changed = [
        ("plain", DEFAULT_ISSUER),
        ("old-issuer-in-config", "https://old.example/"),
        ("issuer-in-execstart", "https://unit.example/"),
        ("only-dropins", DEFAULT_ISSUER),
    ];
    for (name, previous) in &changed {
        let arc = lab.cluster_issuer(name);
        let issuers = [arc.as_str(), previous];
        let row = &rows[*name];
        assert_eq!(row["action"], "changed", "{name}: {row:?}");
        assert_eq!(row["compliant"], "true", "{name}: {row:?}");
        assert_eq!(row["issuers_after"], issuers.join(" "), "{name}");
        assert_eq!(
            lab.published_issuer(name).as_deref(),
            Some(arc.as_str()),
            "{name}"
        );
        let state: Value = serde_json::from_slice(
            &std::fs::read(lab.device_path(name, "/var/lib/rancher/k3s/standin/state.json"))
                .unwrap(),
        )
        .unwrap();
        let running = &state["units"]["k3s.service"]["evaluation"];
        assert_eq!(
            running["issuers"],
            json!(issuers),
            "{name}: the stand-in runs these issuers"
        );
        assert_eq!(
            running["max_token_expiration_seconds"],
            json!(86400.0),
            "{name}"
        );
    }

    let blocked = [
        ("later-dropin-replaces", "zzz-site.yaml:1"),
        (
            "issuer-prepended-in-execstart",
            "/etc/systemd/system/k3s.service",
        ),
        ("invalid-yaml", "config.yaml:"),
    ];
    for (name, fragment) in &blocked {
        let row = &rows[*name];
        assert_eq!(row["action"], "failed", "{name}: {row:?}");
        assert_eq!(row["compliant"], "false", "{name}: {row:?}");
        assert!(row["error"].contains(fragment), "{name}: {row:?}");
        assert!(lab.restarts(name).is_empty(), "{name} was not restarted");
        assert!(
            !lab.device_path(name, DROPIN).exists(),
            "{name}: nothing written"
        );
    }

    for (name, before) in &config_before {
        let after = std::fs::read(lab.device_path(name, CONFIG)).ok();
        assert_eq!(&after, before, "{name}: config.yaml is byte-identical");
    }
}

fn single_device_lab(faults: Value) -> Lab {
    let mut spec = support::spec(1, 1, 0);
    spec["devices"][0]["faults"] = faults;
    Lab::start(&spec)
}

fn assert_rolled_back(lab: &Lab, report: &Path, fragment: &str) {
    let name = &lab.device_names()[0];
    let rows = rows_by_device(report);
    let row = &rows[name];
    assert_eq!(row["action"], "failed", "{row:?}");
    assert_eq!(row["rolled_back"], "true", "{row:?}");
    assert_eq!(row["k3s_restarted"], "true", "{row:?}");
    assert!(row["error"].contains(fragment), "{row:?}");
    assert_eq!(
        lab.published_issuer(name).as_deref(),
        Some(DEFAULT_ISSUER),
        "old issuer served again"
    );
    assert!(
        !lab.device_path(name, DROPIN).exists(),
        "the drop-in is gone again"
    );
    assert_eq!(row["effective_issuer"], DEFAULT_ISSUER, "{row:?}");
}

#[test]
fn hung_restart_is_bounded_and_rolled_back() {
    let lab = single_device_lab(
        json!({"restart_hang": true, "only_when_config_contains": "service-account-issuer-="}),
    );
    let started = std::time::Instant::now();
    let (output, report) = converge(&lab, &playbook(&lab, "4s", "1s"));
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    assert!(
        started.elapsed().as_secs() < 40,
        "bounded by the deadline: {:?}",
        started.elapsed()
    );
    assert_rolled_back(&lab, &report, "did not finish within 4s");
}

#[test]
fn crash_after_start_is_rolled_back() {
    let lab = single_device_lab(
        json!({"crash_after_seconds": 2, "only_when_config_contains": "service-account-issuer-="}),
    );
    let (output, report) = converge(&lab, &playbook(&lab, "30s", "4s"));
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    // The crash shows either in the stability window or, on a slow machine, before the
    // first health check; both count as K3s not coming up.
    assert_rolled_back(&lab, &report, "K3s did not come up with the Arc issuer");
}
