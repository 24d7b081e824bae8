//! End-to-end runs of the `arcfleet` binary against the Azure emulator: bulk reads,
//! throttling, per-cluster ARM errors, Entra token errors, the offline issuers file and the
//! federated identity credential check.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use support::{describe, read_csv, rows_by_device, run, write_playbook, Lab};

const SSE_SUBJECT: &str = "system:serviceaccount:azure-secret-store:secret-sync-controller";
const AUDIENCE: &str = "api://AzureADTokenExchange";

/// Writes a YAML inventory of the lab's devices and clusters. `identities` maps a cluster
/// name to the YAML lines of its `identities:` list.
fn write_yaml_inventory(lab: &Lab, identities: &[(&str, &str)]) -> PathBuf {
    let mut text = String::from("clusters:\n");
    for cluster in lab.manifest["clusters"].as_array().unwrap() {
        let name = cluster["name"].as_str().unwrap();
        text.push_str(&format!(
            "  {name}:\n    subscription: {}\n    resource_group: {}\n",
            cluster["subscription"].as_str().unwrap(),
            cluster["resource_group"].as_str().unwrap()
        ));
        if let Some((_, lines)) = identities.iter().find(|(key, _)| *key == name) {
            text.push_str("    identities:\n");
            text.push_str(lines);
        }
    }
    text.push_str("devices:\n");
    for device in lab.manifest["devices"].as_array().unwrap() {
        text.push_str(&format!(
            "  - {{name: {}, host: {}, port: {}, user: {}, role: {}, cluster: {}}}\n",
            device["name"].as_str().unwrap(),
            device["host"].as_str().unwrap(),
            device["port"],
            device["user"].as_str().unwrap(),
            device["role"].as_str().unwrap(),
            device["cluster"].as_str().unwrap(),
        ));
    }
    let path = lab.scratch("inventory.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn export(lab: &Lab, inventory: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "issuers",
        "export",
        "--inventory",
        inventory.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    lab.arcfleet_without_keys(&args)
        .output()
        .expect("run arcfleet issuers export")
}

/// Returns a spec of one server on the first of `clusters`.
fn spec_with_clusters(clusters: Vec<Value>) -> Value {
    let mut spec = support::spec(1, 1, 0);
    spec["devices"][0]["cluster"] = clusters[0]["name"].clone();
    spec["clusters"] = Value::Array(clusters);
    spec
}

fn cluster(name: &str, subscription: &str, group: &str) -> Value {
    json!({"name": name, "subscription": subscription, "resource_group": group, "location": "eastus"})
}

fn issuers_by_cluster(
    path: &Path,
) -> std::collections::HashMap<String, std::collections::HashMap<String, String>> {
    read_csv(path)
        .into_iter()
        .map(|row| (row["cluster"].clone(), row))
        .collect()
}

#[test]
fn two_hundred_clusters_resolve_in_few_lists() {
    let subscriptions = [
        "0b6f3f52-1111-4c3a-9d59-7c1e1a000001",
        "0b6f3f52-2222-4c3a-9d59-7c1e1a000002",
    ];
    let clusters: Vec<Value> = (0..200)
        .map(|i| {
            cluster(
                &format!("line-{i:03}"),
                subscriptions[i % 2],
                &format!("rg-site-{}", i % 10),
            )
        })
        .collect();
    let mut spec = spec_with_clusters(clusters);
    spec["page_size"] = json!(25);
    let lab = Lab::start(&spec);
    let inventory = write_yaml_inventory(&lab, &[]);
    let out = lab.scratch("issuers.csv");

    let output = export(&lab, &inventory, &out, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let rows = issuers_by_cluster(&out);
    assert_eq!(rows.len(), 200);
    for entry in lab.manifest["clusters"].as_array().unwrap() {
        let name = entry["name"].as_str().unwrap();
        assert_eq!(
            rows[name]["issuer"],
            entry["issuer_url"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(rows[name]["status"], "ready", "{name}");
    }

    // Two subscription lists of 100 clusters each, 25 per page.
    let arm = lab.emulator_requests("arm");
    assert_eq!(arm.len(), 8, "{arm:#?}");
    assert!(
        arm.iter().all(|r| r["path"]
            .as_str()
            .unwrap()
            .ends_with("/providers/Microsoft.Kubernetes/connectedClusters")),
        "only list requests: {arm:#?}"
    );
    assert!(arm.iter().all(|r| r["api_version"] == "2024-07-15-preview"));
    assert_eq!(lab.emulator_requests("token").len(), 1, "one cached token");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("requests=8"), "{stderr}");
}

fn small_lab(faults: Value) -> (Lab, PathBuf) {
    let mut spec = support::spec(2, 2, 0);
    spec["emulator"] = json!({"faults": faults});
    let lab = Lab::start(&spec);
    let inventory = write_yaml_inventory(&lab, &[]);
    (lab, inventory)
}

#[test]
fn throttling_is_waited_out() {
    let (lab, inventory) =
        small_lab(json!({"throttle_next": 2, "throttle_forever": false, "retry_after_seconds": 1}));
    let out = lab.scratch("issuers.csv");
    let output = export(&lab, &inventory, &out, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    assert!(read_csv(&out).iter().all(|row| row["status"] == "ready"));

    let arm = lab.emulator_requests("arm");
    let statuses: Vec<u64> = arm.iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    // Each retry of a throttled request waits for Retry-After (1 s) at least.
    let times: Vec<f64> = arm.iter().map(|r| r["ts"].as_f64().unwrap()).collect();
    let first_throttled = times[statuses.iter().position(|s| *s == 429).unwrap()];
    let last = times.iter().cloned().fold(0.0, f64::max);
    assert!(last - first_throttled >= 1.0, "{times:?}");
}

#[test]
fn endless_throttling_ends_within_bound() {
    let (lab, inventory) =
        small_lab(json!({"throttle_next": 0, "throttle_forever": true, "retry_after_seconds": 1}));
    let out = lab.scratch("issuers.csv");
    let started = Instant::now();
    let output = export(&lab, &inventory, &out, &["--arm-max-wait", "4s"]);
    let elapsed = started.elapsed();
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    assert!(elapsed < Duration::from_secs(8), "ended after {elapsed:?}");
    for row in read_csv(&out) {
        assert_eq!(row["status"], "failed", "{row:?}");
        assert!(row["message"].contains("HTTP 429"), "{row:?}");
        assert!(
            row["message"].contains("4.0 s retry budget (--arm-max-wait)"),
            "{row:?}"
        );
    }

    // A Retry-After longer than the budget ends the request at once.
    lab.patch_emulator(json!({"faults": {"retry_after_seconds": 300}}));
    let started = Instant::now();
    let output = export(&lab, &inventory, &out, &["--arm-max-wait", "4s"]);
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    for row in read_csv(&out) {
        assert!(row["message"].contains("asked to wait 300.0 s"), "{row:?}");
    }
}

#[test]
fn forbidden_and_missing_clusters_fail_only_their_devices() {
    let mut spec = support::spec(6, 6, 0);
    let subscription = spec["clusters"][0]["subscription"]
        .as_str()
        .unwrap()
        .to_owned();
    // The last cluster is alone in its subscription, so it is read with a GET, which the
    // emulator answers with 404 ResourceNotFound.
    let other_subscription = "5c2e7d10-3a4b-4c5d-8e9f-0a1b2c3d4e5f";
    let clusters = [
        ("ok-a", "rg-a", json!({})),
        ("gone", "rg-a", json!({"exists": false})),
        ("secret", "rg-f", json!({"forbidden": true})),
        ("ok-f", "rg-f", json!({})),
        ("ok-c", "rg-c", json!({})),
        ("gone-get", "rg-other", json!({"exists": false})),
    ];
    let mut entries = Vec::new();
    for (index, (name, group, extra)) in clusters.iter().enumerate() {
        let owner = if *name == "gone-get" {
            other_subscription
        } else {
            subscription.as_str()
        };
        let mut entry = cluster(name, owner, group);
        for (key, value) in extra.as_object().unwrap() {
            entry[key] = value.clone();
        }
        entries.push(entry);
        spec["devices"][index]["cluster"] = json!(name);
    }
    spec["clusters"] = Value::Array(entries);
    let lab = Lab::start(&spec);
    let inventory = support::write_inventory(&lab, &[]);
    let playbook = write_playbook(&lab);
    let report = lab.scratch("report.csv");
    let output = run(
        &lab,
        &[
            "audit",
            "--inventory",
            inventory.to_str().unwrap(),
            "--playbook",
            playbook.to_str().unwrap(),
            "--report-csv",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let rows = rows_by_device(&report);
    let device_of = |cluster: &str| {
        let device = lab.manifest["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["cluster"] == cluster)
            .unwrap();
        rows[device["name"].as_str().unwrap()].clone()
    };
    for name in ["ok-a", "ok-f", "ok-c"] {
        let row = device_of(name);
        assert_eq!(row["action"], "would-change", "{name}: {row:?}");
        assert!(row["expected_issuer"].starts_with("https://"), "{row:?}");
    }
    let forbidden = device_of("secret");
    assert_eq!(forbidden["action"], "failed");
    assert!(
        forbidden["error"].contains("not allowed to read"),
        "{forbidden:?}"
    );
    assert!(
        forbidden["error"].contains("AuthorizationFailed"),
        "{forbidden:?}"
    );
    let not_found = device_of("gone-get");
    assert_eq!(not_found["action"], "failed");
    assert!(
        not_found["error"].contains("ARM has no connected cluster")
            && not_found["error"].contains("ResourceNotFound"),
        "{not_found:?}"
    );
    let missing = device_of("gone");
    assert_eq!(missing["action"], "failed");
    assert!(
        missing["error"].contains("ARM has no connected cluster"),
        "{missing:?}"
    );

    // Three reads in one subscription list it (403), then the narrower plan lists rg-a,
    // lists rg-f (403) and GETs its clusters, and GETs the cluster of rg-c. The other
    // subscription takes one GET (404).
    let arm = lab.emulator_requests("arm");
    let summary: Vec<(String, u64)> = arm
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap().to_owned(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(arm.len(), 7, "{summary:#?}");
    assert_eq!(
        summary.iter().filter(|(_, s)| *s == 404).count(),
        1,
        "{summary:#?}"
    );
    assert_eq!(
        summary.iter().filter(|(_, s)| *s == 403).count(),
        3,
        "{summary:#?}"
    );
}

/// Returns a JWT like the lab's federated token with another issuer.
fn token_with_issuer(lab: &Lab, issuer: &str) -> PathBuf {
    let token = std::fs::read_to_string(lab.field("federated_token_file")).unwrap();
    let parts: Vec<&str> = token.trim().split('.').collect();
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Value = serde_json::from_slice(&engine.decode(parts[1]).unwrap()).unwrap();
    claims["iss"] = json!(issuer);
    let payload = engine.encode(serde_json::to_vec(&claims).unwrap());
    let path = lab.scratch("token.jwt");
    std::fs::write(&path, format!("{}.{payload}.{}", parts[0], parts[2])).unwrap();
    path
}

#[test]
fn token_errors_show_aadsts_codes() {
    let (lab, inventory) = small_lab(json!({}));
    let out = lab.scratch("issuers.csv");
    let args = [
        "issuers",
        "export",
        "--inventory",
        inventory.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];

    let wrong_secret = "abc8Q~wrong-secret-value-0123456789";
    let output = lab
        .arcfleet_without_keys(&args)
        .env("AZURE_CLIENT_SECRET", wrong_secret)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("AADSTS7000215: Invalid client secret provided"),
        "{stderr}"
    );
    assert!(stderr.contains("not its secret ID"), "{stderr}");
    assert!(
        !stderr.contains(wrong_secret),
        "no secret in the output: {stderr}"
    );
    assert!(!out.exists(), "no file after an authentication failure");

    let token = token_with_issuer(&lab, "https://kubernetes.default.svc.cluster.local");
    let output = lab
        .arcfleet_without_keys(&args)
        .env_remove("AZURE_CLIENT_SECRET")
        .env("AZURE_FEDERATED_TOKEN_FILE", &token)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "AADSTS700211: No matching federated identity record found for presented \
             assertion issuer 'https://kubernetes.default.svc.cluster.local'"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("trailing slash included"), "{stderr}");

    // The lab's own token matches the app's federated credential.
    let output = lab
        .arcfleet_without_keys(&args)
        .env_remove("AZURE_CLIENT_SECRET")
        .env(
            "AZURE_FEDERATED_TOKEN_FILE",
            lab.field("federated_token_file"),
        )
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let token_requests = lab.emulator_requests("token");
    let last = token_requests.last().unwrap();
    assert_eq!(
        last["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
}

#[test]
fn converge_report_shows_token_error_code() {
    let (lab, _) = small_lab(json!({}));
    let inventory = support::write_inventory(&lab, &[]);
    let report = lab.scratch("report.csv");
    let output = lab
        .arcfleet(&[
            "converge",
            "--inventory",
            inventory.to_str().unwrap(),
            "--report-csv",
            report.to_str().unwrap(),
        ])
        .env("AZURE_CLIENT_SECRET", "abc8Q~wrong")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4), "{}", describe(&output));
    for row in read_csv(&report) {
        assert!(row["error"].contains("AADSTS7000215"), "{row:?}");
    }
}

#[test]
fn issuers_file_round_trips() {
    let (lab, _) = small_lab(json!({}));
    let inventory = support::write_inventory(&lab, &[]);
    let out = lab.scratch("issuers.csv");
    let output = export(&lab, &inventory, &out, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let arm_before = lab.emulator_log().len();

    // No Azure variables and an ARM endpoint where nothing listens: the run must not
    // need Azure at all.
    let playbook = write_playbook(&lab);
    let report = lab.scratch("report.csv");
    let offline = |issuers: &Path| {
        lab.arcfleet(&[
            "converge",
            "--inventory",
            inventory.to_str().unwrap(),
            "--playbook",
            playbook.to_str().unwrap(),
            "--report-csv",
            report.to_str().unwrap(),
            "--issuers-file",
            issuers.to_str().unwrap(),
        ])
        .env_remove("AZURE_CLIENT_SECRET")
        .env_remove("AZURE_TENANT_ID")
        .env_remove("AZURE_CLIENT_ID")
        .env("ARCFLEET_ARM_ENDPOINT", "http://127.0.0.1:1/")
        .env("AZURE_AUTHORITY_HOST", "http://127.0.0.1:1/")
        .output()
        .unwrap()
    };
    let output = offline(&out);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let rows = rows_by_device(&report);
    for name in lab.device_names() {
        assert_eq!(rows[&name]["action"], "changed", "{:?}", rows[&name]);
        assert_eq!(
            lab.published_issuer(&name),
            Some(lab.cluster_issuer(&name)),
            "{name}"
        );
    }
    assert_eq!(
        lab.emulator_log().len(),
        arm_before,
        "no request reached Azure"
    );

    // An edited file with an issuer that ARM would never return is rejected with its line.
    let text = std::fs::read_to_string(&out).unwrap();
    let issuer = lab.cluster_issuer(&lab.device_names()[1]);
    let edited = text.replace(&issuer, &issuer.replace("https://", "http://"));
    let bad = lab.scratch("bad-issuers.csv");
    std::fs::write(&bad, edited).unwrap();
    let output = offline(&bad);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad-issuers.csv:3: invalid issuer"),
        "{stderr}"
    );
}

#[test]
fn wait_for_issuer_polls_until_issuer_appears() {
    let mut spec = support::spec(1, 1, 0);
    spec["clusters"][0]["issuer_url"] = json!("");
    let lab = Lab::start(&spec);
    let inventory = write_yaml_inventory(&lab, &[]);
    let out = lab.scratch("issuers.csv");
    let name = lab.manifest["clusters"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();

    let output = export(&lab, &inventory, &out, &[]);
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let rows = issuers_by_cluster(&out);
    assert_eq!(rows[&name]["status"], "not-ready");
    assert_eq!(rows[&name]["failed_gate"], "oidc-issuer");
    assert!(
        rows[&name]["message"].contains("--wait-for-issuer"),
        "{:?}",
        rows[&name]
    );

    let issuer = format!(
        "https://eastus.oic.prod-arc.azure.com/{}/5b0c2a44-7f6e-4c1e-9a35-1f2d3c4b5a69/",
        lab.field("tenant_id")
    );
    let child = lab
        .arcfleet_without_keys(&[
            "issuers",
            "export",
            "--inventory",
            inventory.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--wait-for-issuer",
            "30s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    lab.patch_emulator(json!({"clusters": {name.clone(): {"issuer_url": issuer}}}));
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    assert_eq!(issuers_by_cluster(&out)[&name]["issuer"], issuer);
}

#[test]
fn cloud_endpoints_yield_to_explicit_overrides() {
    let (lab, inventory) = small_lab(json!({}));
    let out = lab.scratch("issuers.csv");
    let output = export(&lab, &inventory, &out, &["--cloud", "AzureUSGovernment"]);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let token = &lab.emulator_requests("token")[0];
    assert_eq!(
        token["scope"],
        format!("{}.default", lab.field("arm_endpoint"))
    );
}

/// Writes the YAML lines of one identity entry.
fn identity_lines(name: &str) -> String {
    format!(
        "      - {{resource_group: rg-identities, name: {name}, service_account: \
         azure-secret-store/secret-sync-controller}}\n"
    )
}

#[test]
fn identity_mismatches_are_found() {
    let spec = support::spec(1, 1, 0);
    let subscription = spec["clusters"][0]["subscription"]
        .as_str()
        .unwrap()
        .to_owned();
    // The lab serves the issuer's discovery document on loopback, so the token proof that
    // converge and audit run reaches nothing outside this machine.
    let lab = Lab::start(&spec);
    let issuer = lab.manifest["clusters"][0]["issuer_url"]
        .as_str()
        .unwrap()
        .to_owned();
    let credential = |name: &str, issuer: &str, subject: &str, audience: &str| json!({"name": name, "issuer": issuer, "subject": subject, "audiences": [audience]});
    let identity = |name: &str, credentials: Vec<Value>| {
        json!({"subscription": subscription, "resource_group": "rg-identities", "name": name,
               "federated_credentials": credentials})
    };
    lab.patch_emulator(json!({"identities": [
        identity("good", vec![credential("sse", &issuer, SSE_SUBJECT, AUDIENCE)]),
        identity("old-issuer", vec![credential("sse", "https://kubernetes.default.svc.cluster.local", SSE_SUBJECT, AUDIENCE)]),
        identity("wrong-subject", vec![credential("sse", &issuer, "system:serviceaccount:default:default", AUDIENCE)]),
        identity("wrong-audience", vec![credential("sse", &issuer, SSE_SUBJECT, "api://other")]),
    ]}));
    let cluster_name = lab.manifest["clusters"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let playbook = write_playbook(&lab);

    // Converge first, so that only the identities can make the audit fail.
    let good_only = write_yaml_inventory(&lab, &[(&cluster_name, &identity_lines("good"))]);
    let converge = run(
        &lab,
        &[
            "converge",
            "--inventory",
            good_only.to_str().unwrap(),
            "--playbook",
            playbook.to_str().unwrap(),
        ],
    );
    assert_eq!(converge.status.code(), Some(0), "{}", describe(&converge));
    let audit = run(
        &lab,
        &[
            "audit",
            "--inventory",
            good_only.to_str().unwrap(),
            "--playbook",
            playbook.to_str().unwrap(),
        ],
    );
    assert_eq!(audit.status.code(), Some(0), "{}", describe(&audit));
    assert!(
        String::from_utf8_lossy(&audit.stdout).contains("identity check: 1 identities, 0 findings"),
        "{}",
        describe(&audit)
    );

    let lines: String = [
        "good",
        "old-issuer",
        "wrong-subject",
        "wrong-audience",
        "missing",
    ]
    .iter()
    .map(|name| identity_lines(name))
    .collect();
    let inventory = write_yaml_inventory(&lab, &[(&cluster_name, &lines)]);
    let report = lab.scratch("report.json");
    let audit = run(
        &lab,
        &[
            "audit",
            "--inventory",
            inventory.to_str().unwrap(),
            "--playbook",
            playbook.to_str().unwrap(),
            "--report-json",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(audit.status.code(), Some(3), "{}", describe(&audit));
    let stdout = String::from_utf8_lossy(&audit.stdout);
    assert!(
        stdout.contains("identity check: 5 identities, 4 findings"),
        "{stdout}"
    );

    let document: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    // The cluster's server signs correctly, but Entra would refuse its workloads' tokens.
    let device = &document["devices"][0];
    assert_eq!(
        device["cause"], "identity-credential-mismatch",
        "{device:#}"
    );
    assert_eq!(device["compliant"], false, "{device:#}");
    let findings = document["identity"]["findings"].as_array().unwrap();
    let by_identity = |name: &str| {
        findings
            .iter()
            .find(|f| f["identity"] == format!("rg-identities/{name}"))
            .unwrap_or_else(|| panic!("no finding for {name}: {findings:#?}"))
            .clone()
    };
    for (name, kind, code) in [
        ("old-issuer", "issuer-mismatch", json!(700211)),
        ("wrong-subject", "subject-mismatch", json!(700213)),
        ("wrong-audience", "audience-mismatch", json!(700212)),
        ("missing", "read-failed", Value::Null),
    ] {
        let finding = by_identity(name);
        assert_eq!(finding["kind"], kind, "{finding:#}");
        assert_eq!(finding["aadsts"], code, "{finding:#}");
        assert_eq!(finding["subject"], SSE_SUBJECT);
    }
    assert!(by_identity("old-issuer")["message"]
        .as_str()
        .unwrap()
        .contains(&format!("--issuer {issuer}")));
    assert!(by_identity("missing")["message"]
        .as_str()
        .unwrap()
        .contains("ResourceNotFound"));
    assert!(
        findings
            .iter()
            .all(|f| f["identity"] != "rg-identities/good"),
        "{findings:#?}"
    );

    let fic_lists = lab
        .emulator_requests("arm")
        .into_iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .unwrap()
                .ends_with("/federatedIdentityCredentials")
        })
        .count();
    assert_eq!(fic_lists, 5 + 1, "one list per identity and audit");
}
