//! Rollout control on lab devices: waves and failure budgets, one HA server at a time,
//! interruption, sharding, retries and the CI outputs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{describe, read_csv, rows_by_device, run, write_inventory, write_playbook, Lab};

fn path(buf: &Path) -> &str {
    buf.to_str().unwrap()
}

fn waves_spec(waves: &[(&str, usize)]) -> Value {
    let total: usize = waves.iter().map(|(_, n)| n).sum();
    let mut spec = support::spec(total, 1, 0);
    let mut index = 0;
    for (wave, count) in waves {
        for _ in 0..*count {
            spec["devices"][index]["labels"] = json!({"wave": wave});
            index += 1;
        }
    }
    support::isolate_clusters(&mut spec);
    spec
}

/// Writes a CSV inventory with each device's wave label.
fn inventory_with_waves(lab: &Lab) -> PathBuf {
    let path = write_inventory(lab, &[]);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text.lines();
    let mut out = format!("{}\n", lines.next().unwrap());
    for line in lines {
        let name = line.split(',').next().unwrap();
        let wave = lab.device(name)["labels"]["wave"].as_str().unwrap_or("");
        out.push_str(line.trim_end_matches(','));
        out.push_str(&format!(",wave={wave}\n"));
    }
    std::fs::write(&path, out).unwrap();
    path
}

#[test]
fn wave_over_budget_stops_before_next_wave() {
    let lab = Lab::start(&waves_spec(&[("canary", 2), ("early", 3), ("rest", 3)]));
    let names = lab.device_names();
    lab.set_faults(
        &names[1],
        json!({"reject_flags": ["service-account-max-token-expiration"]}),
    );
    let inventory = inventory_with_waves(&lab);
    let playbook = write_playbook(&lab);
    let report = lab.scratch("report.csv");
    let summary = lab.scratch("summary.md");
    let output = run(
        &lab,
        &[
            "converge",
            "--inventory",
            path(&inventory),
            "--playbook",
            path(&playbook),
            "--report-csv",
            path(&report),
            "--summary-md",
            path(&summary),
            "--waves",
            "canary,early,rest",
            "--max-fail-percent",
            "0",
        ],
    );
    assert_eq!(
        output.status.code(),
        Some(5),
        "budget exit code: {}",
        describe(&output)
    );
    let rows = rows_by_device(&report);
    assert_eq!(rows[&names[0]]["action"], "changed");
    assert_eq!(rows[&names[1]]["action"], "failed");
    for name in &names[2..] {
        assert_eq!(rows[name]["action"], "skipped", "{name}: {:?}", rows[name]);
        assert!(
            rows[name]["error"].contains("exceeded its failure budget"),
            "{:?}",
            rows[name]
        );
        assert!(lab.restarts(name).is_empty(), "{name} was not touched");
    }
    let markdown = std::fs::read_to_string(&summary).unwrap();
    assert!(
        markdown.contains("Exit status: **budget-exceeded**"),
        "{markdown}"
    );
    assert!(
        markdown.contains("| canary | 2 | 1 | 0 | 1 | 0 |"),
        "{markdown}"
    );

    // The failed list names the failed and skipped devices; a retry runs only those.
    let failed = std::fs::read_to_string(lab.scratch("arcfleet-failed.txt")).unwrap();
    for name in &names[1..] {
        assert!(failed.contains(name.as_str()), "{failed}");
    }
    assert!(
        !failed
            .lines()
            .any(|l| l.starts_with(&format!("{} ", names[0]))),
        "{failed}"
    );
    lab.set_faults(&names[1], json!({}));
    let retry = run(
        &lab,
        &[
            "converge",
            "--inventory",
            path(&inventory),
            "--playbook",
            path(&playbook),
            "--report-csv",
            path(&report),
            "--retry-failed",
            path(&lab.scratch("arcfleet-failed.txt")),
        ],
    );
    assert_eq!(retry.status.code(), Some(0), "{}", describe(&retry));
    let rows = rows_by_device(&report);
    assert_eq!(rows.len(), names.len() - 1, "only the listed devices run");
    assert!(!rows.contains_key(&names[0]));
    assert_eq!(
        lab.restarts(&names[0]).len(),
        1,
        "the converged device is left alone"
    );
}

#[test]
fn ha_cluster_restarts_one_server_at_a_time() {
    let mut spec = support::spec(3, 1, 0);
    for (index, device) in spec["devices"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        let join = if index == 0 {
            "--cluster-init".to_owned()
        } else {
            "--server=https://10.1.0.10:6443".to_owned()
        };
        device["exec_start_args"] = json!(["server", join]);
        device["faults"] = json!({
            "restart_delay_seconds": 1,
            "etcd_voter_after_seconds": 2,
            "only_when_config_contains": "service-account-issuer-="
        });
    }
    let lab = Lab::start(&spec);
    let inventory = write_inventory(&lab, &[]);
    let playbook = write_playbook(&lab);
    let events = lab.scratch("events.jsonl");
    let output = lab
        .arcfleet(&[
            "converge",
            "--inventory",
            path(&inventory),
            "--playbook",
            path(&playbook),
            "--json",
        ])
        .output()
        .unwrap();
    std::fs::write(&events, &output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));

    let mut intervals: Vec<(f64, f64, String)> = Vec::new();
    for name in lab.device_names() {
        let restarts = lab.restarts(&name);
        assert_eq!(restarts.len(), 1, "{name}: {restarts:?}");
        let entry = &restarts[0];
        intervals.push((
            entry["begin"].as_f64().unwrap(),
            entry["end"].as_f64().unwrap(),
            name,
        ));
    }
    intervals.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    for pair in intervals.windows(2) {
        // The next server starts only after the previous one restarted and its etcd
        // member votes again, which the stand-in reports 2 s after the start.
        assert!(
            pair[1].0 >= pair[0].1 + 2.0,
            "{} started at {} before {} was back (restart ended {})",
            pair[1].2,
            pair[1].0,
            pair[0].2,
            pair[0].1
        );
    }

    // --json prints one event per line, and the step events include the node wait.
    let lines: Vec<Value> = output
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("every stdout line is JSON"))
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"run_started"));
    assert_eq!(kinds.last(), Some(&"run_finished"));
    assert_eq!(kinds.iter().filter(|k| **k == "device_started").count(), 3);
    assert_eq!(kinds.iter().filter(|k| **k == "device_finished").count(), 3);
    assert_eq!(kinds.iter().filter(|k| **k == "wave_finished").count(), 1);
    assert!(lines.iter().any(|e| e["event"] == "step_done"
        && e["step"] == "wait-node-ready"
        && e["outcome"] == "ok"));
    assert_eq!(lines.last().unwrap()["exit"], "compliant");
}

#[test]
fn sigterm_leaves_every_device_consistent() {
    let mut spec = support::spec(20, 1, 0);
    for device in spec["devices"].as_array_mut().unwrap() {
        device["faults"] = json!({"restart_delay_seconds": 2, "only_when_config_contains": "service-account-issuer-="});
    }
    support::isolate_clusters(&mut spec);
    let lab = Lab::start(&spec);
    let inventory = write_inventory(&lab, &[]);
    let playbook = write_playbook(&lab);
    let report = lab.scratch("report.csv");
    let junit = lab.scratch("junit.xml");
    let child = lab
        .arcfleet(&[
            "converge",
            "--inventory",
            path(&inventory),
            "--playbook",
            path(&playbook),
            "--report-csv",
            path(&report),
            "--junit",
            path(&junit),
            "--concurrency",
            "4",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    // Wait until some devices restarted, then ask arcfleet to stop.
    let deadline = Instant::now() + Duration::from_secs(60);
    while lab
        .device_names()
        .iter()
        .filter(|n| !lab.restarts(n).is_empty())
        .count()
        < 3
    {
        assert!(Instant::now() < deadline, "no restarts seen");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", describe(&output));

    let rows = rows_by_device(&report);
    assert_eq!(rows.len(), 20, "a complete report");
    let mut actions = HashSet::new();
    for name in lab.device_names() {
        let row = &rows[&name];
        actions.insert(row["action"].clone());
        let dropin = lab.device_path(
            &name,
            "/etc/rancher/k3s/config.yaml.d/zz-arcfleet-oidc-issuer.yaml",
        );
        let published = lab.published_issuer(&name);
        match row["action"].as_str() {
            "changed" => {
                assert!(dropin.exists(), "{name}");
                assert_eq!(published, Some(lab.cluster_issuer(&name)), "{name}");
            }
            "skipped" => {
                assert!(!dropin.exists(), "{name}: unchanged");
                assert!(lab.restarts(&name).is_empty(), "{name}");
                assert_eq!(
                    published.as_deref(),
                    Some("https://kubernetes.default.svc.cluster.local"),
                    "{name}"
                );
            }
            "failed" => assert_eq!(row["rolled_back"], "true", "{name}: {row:?}"),
            other => panic!("{name}: unexpected action {other}"),
        }
        let leftovers: Vec<_> =
            std::fs::read_dir(lab.device_path(&name, "/etc/rancher/k3s/config.yaml.d"))
                .map(|dir| {
                    dir.filter_map(Result::ok)
                        .filter(|e| e.file_name().to_string_lossy().starts_with(".arcfleet"))
                        .collect()
                })
                .unwrap_or_default();
        assert!(
            leftovers.is_empty(),
            "{name}: temporary files left: {leftovers:?}"
        );
    }
    assert!(actions.contains("changed"), "{actions:?}");
    assert!(actions.contains("skipped"), "{actions:?}");

    // The JUnit report is complete and parses with a JUnit reader.
    let suites = junit_parser::from_reader(std::io::BufReader::new(
        std::fs::File::open(&junit).unwrap(),
    ))
    .unwrap();
    let cases: usize = suites.suites.iter().map(|s| s.cases.len()).sum();
    assert_eq!(cases, 20);
    let skipped = suites
        .suites
        .iter()
        .flat_map(|s| &s.cases)
        .filter(|c| c.status.is_skipped())
        .count();
    let expected_skipped = rows.values().filter(|r| r["action"] == "skipped").count();
    assert_eq!(skipped, expected_skipped);
}

#[test]
fn shards_cover_each_device_once() {
    let mut spec = support::spec(9, 4, 2);
    spec["devices"][8]["role"] = json!("server");
    let lab = Lab::start(&spec);
    let inventory = write_inventory(&lab, &[]);
    let mut reports = Vec::new();
    for shard in 1..=3 {
        let report = lab.scratch(&format!("shard-{shard}.csv"));
        let output = run(
            &lab,
            &[
                "audit",
                "--inventory",
                path(&inventory),
                "--shard",
                &format!("{shard}/3"),
                "--report-csv",
                path(&report),
            ],
        );
        assert!(
            matches!(output.status.code(), Some(0 | 3)),
            "{}",
            describe(&output)
        );
        reports.push(report);
    }
    let mut seen: Vec<String> = Vec::new();
    for report in &reports {
        let rows = read_csv(report);
        let clusters: HashSet<String> = rows.iter().map(|r| r["cluster"].clone()).collect();
        for other in reports.iter().filter(|o| *o != report) {
            for row in read_csv(other) {
                assert!(
                    !clusters.contains(&row["cluster"]) || row["cluster"].is_empty(),
                    "cluster split across shards"
                );
            }
        }
        seen.extend(rows.into_iter().map(|r| r["device"].clone()));
    }
    seen.sort();
    let mut all = lab.device_names();
    all.sort();
    assert_eq!(seen, all, "the shards cover every device exactly once");

    let merged = lab.scratch("merged.csv");
    let mut args = vec!["report", "merge", "--out", path(&merged)];
    args.extend(reports.iter().map(|r| path(r)));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_arcfleet"))
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    assert_eq!(read_csv(&merged).len(), all.len());

    let overlap = std::process::Command::new(env!("CARGO_BIN_EXE_arcfleet"))
        .args([
            "report",
            "merge",
            "--out",
            path(&merged),
            path(&reports[0]),
            path(&reports[0]),
        ])
        .output()
        .unwrap();
    assert_eq!(overlap.status.code(), Some(2), "{}", describe(&overlap));
    assert!(String::from_utf8_lossy(&overlap.stderr).contains("the shards overlap"));
}
