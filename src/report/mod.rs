//! Per-device results and their renderings: the console summary, the CSV compliance
//! report, the JSON report, JUnit XML and the Markdown summary. Rendering functions are
//! pure, so tests pin their output.

pub mod cause;
pub mod junit;
pub mod markdown;
pub mod merge;
pub mod transcript;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::inventory::Role;
pub use cause::Cause;

/// The outcome of a run for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// The device already matched; nothing was written or restarted.
    Unchanged,
    /// arcfleet changed the configuration or restarted K3s, and the device is compliant.
    Changed,
    /// A check or audit found that converge would change the device.
    WouldChange,
    /// The device is an agent; there is nothing to configure.
    NotApplicable,
    /// The device could not be checked or converged.
    Failed,
    /// The run did not start on the device: its wave was not reached, the rollout halted
    /// or was interrupted, or an earlier server of its cluster failed.
    Skipped,
}

impl Action {
    /// Returns the name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Unchanged => "unchanged",
            Action::Changed => "changed",
            Action::WouldChange => "would-change",
            Action::NotApplicable => "not-applicable",
            Action::Failed => "failed",
            Action::Skipped => "skipped",
        }
    }
}

/// Everything a run found out about one device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    /// Inventory name.
    pub device: String,
    /// Host name or address.
    pub host: String,
    /// SSH port.
    pub port: u16,
    /// `resource-group/name` of the Arc cluster, empty for agents without one.
    pub cluster: String,
    /// Inventory role.
    pub role: Role,
    /// The rollout wave the device belongs to.
    pub wave: String,
    /// The Arc issuer the node should sign with, empty when unknown.
    pub expected_issuer: String,
    /// The issuer the running API server publishes at the end, empty when unknown.
    pub effective_issuer: String,
    /// The issuer the API server published before the run.
    pub previous_issuer: String,
    /// Configured `service-account-issuer` values before the run, in order.
    pub issuers_before: Vec<String>,
    /// Configured `service-account-issuer` values after the run (or after the change, for
    /// a check).
    pub issuers_after: Vec<String>,
    /// Whether the device signs with the expected issuer at the end.
    pub compliant: bool,
    /// The outcome.
    pub action: Action,
    /// The reason the device failed or is not compliant, with its fix; empty otherwise.
    pub error: String,
    /// The cause of a failed, skipped or non-compliant device, from a fixed list.
    pub cause: Option<Cause>,
    /// Whether the device could not be reached over the network.
    pub unreachable: bool,
    /// Whether K3s was restarted.
    pub k3s_restarted: bool,
    /// Whether a failed change was rolled back.
    pub rolled_back: bool,
    /// State of the SecretSync objects, or why they were not checked.
    pub secret_sync: String,
    /// The `iss` of a token minted on the node at the end of the run, empty when none was.
    pub token_issuer: String,
    /// Whether the Arc issuer publishes the token's signing key; `None` when not checked.
    pub signing_key_published: Option<bool>,
    /// Unified diff of arcfleet's drop-in, empty when it does not change.
    pub diff: String,
    /// Steps taken, one line each, for the per-device log.
    pub log: Vec<String>,
    /// Time spent on the device.
    #[serde(serialize_with = "serialize_millis")]
    pub duration: Duration,
    /// Every command run on the device, redacted; written to the run record, not the JSON
    /// report.
    #[serde(skip)]
    pub transcript: Vec<transcript::Entry>,
}

fn serialize_millis<S: serde::Serializer>(
    value: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(u64::try_from(value.as_millis()).unwrap_or(u64::MAX))
}

impl DeviceReport {
    /// Creates a report for a device with nothing known yet.
    pub fn new(device: &crate::inventory::Device) -> DeviceReport {
        DeviceReport {
            device: device.name.clone(),
            host: device.host.clone(),
            port: device.port.unwrap_or(crate::inventory::DEFAULT_PORT),
            cluster: device
                .cluster
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            role: device.role,
            wave: String::new(),
            expected_issuer: String::new(),
            effective_issuer: String::new(),
            previous_issuer: String::new(),
            issuers_before: Vec::new(),
            issuers_after: Vec::new(),
            compliant: false,
            action: Action::Failed,
            error: String::new(),
            cause: None,
            unreachable: false,
            k3s_restarted: false,
            rolled_back: false,
            secret_sync: String::new(),
            token_issuer: String::new(),
            signing_key_published: None,
            diff: String::new(),
            log: Vec::new(),
            duration: Duration::ZERO,
            transcript: Vec::new(),
        }
    }

    /// Marks the device failed with `cause` and `error`.
    pub fn fail(mut self, cause: Cause, error: impl Into<String>) -> DeviceReport {
        self.action = Action::Failed;
        self.compliant = false;
        self.cause = Some(cause);
        self.error = error.into();
        self
    }

    /// Marks the device as not started, with the reason.
    pub fn skip(mut self, reason: impl Into<String>) -> DeviceReport {
        self.action = Action::Skipped;
        self.compliant = false;
        self.cause = Some(Cause::NotStarted);
        self.error = reason.into();
        self
    }

    /// Returns the one-line fix for the cause, empty when there is none.
    pub fn fix(&self) -> &'static str {
        self.cause.map_or("", Cause::fix)
    }
}

/// The CSV report's columns, in order.
pub const CSV_COLUMNS: [&str; 21] = [
    "device",
    "host",
    "port",
    "cluster",
    "role",
    "expected_issuer",
    "effective_issuer",
    "compliant",
    "action",
    "error",
    "cause",
    "fix",
    "previous_issuer",
    "issuers_after",
    "k3s_restarted",
    "rolled_back",
    "secret_sync",
    "duration_ms",
    "wave",
    "token_issuer",
    "signing_key_published",
];

/// Writes the CSV compliance report: one row per device, in inventory order.
pub fn write_csv(writer: impl Write, reports: &[DeviceReport]) -> csv::Result<()> {
    let mut csv = csv::Writer::from_writer(writer);
    csv.write_record(CSV_COLUMNS)?;
    for report in reports {
        csv.write_record([
            report.device.as_str(),
            &report.host,
            &report.port.to_string(),
            &report.cluster,
            &report.role.to_string(),
            &report.expected_issuer,
            &report.effective_issuer,
            if report.compliant { "true" } else { "false" },
            report.action.as_str(),
            &one_line(&report.error),
            report.cause.map_or("", Cause::as_str),
            report.fix(),
            &report.previous_issuer,
            &report.issuers_after.join(" "),
            if report.k3s_restarted {
                "true"
            } else {
                "false"
            },
            if report.rolled_back { "true" } else { "false" },
            &one_line(&report.secret_sync),
            &report.duration.as_millis().to_string(),
            &report.wave,
            &report.token_issuer,
            match report.signing_key_published {
                Some(true) => "true",
                Some(false) => "false",
                None => "",
            },
        ])?;
    }
    csv.flush()?;
    Ok(())
}

/// Writes a report file through a temporary file and a rename, so that a reader never
/// sees half a report.
pub fn write_file_atomically(
    path: &Path,
    render: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    render(&mut buffer)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    std::fs::write(&temporary, &buffer)?;
    std::fs::rename(&temporary, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temporary);
    })
}

/// The JSON report document.
#[derive(Debug, Serialize)]
pub struct JsonReport<'a> {
    /// The command that ran (`converge`, `check` or `audit`).
    pub mode: &'a str,
    /// Counts per action, and of compliant servers.
    pub totals: Totals,
    /// Every device.
    pub devices: &'a [DeviceReport],
    /// The identity check of `audit`, when the inventory lists identities and Azure was
    /// read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<&'a crate::azure::identity::IdentityReport>,
}

/// Counts of devices by outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Devices in the run.
    pub devices: usize,
    /// Servers compliant at the end.
    pub compliant: usize,
    /// Devices left as they were.
    pub unchanged: usize,
    /// Devices changed.
    pub changed: usize,
    /// Devices a check would change.
    pub would_change: usize,
    /// Agents.
    pub not_applicable: usize,
    /// Failed devices.
    pub failed: usize,
    /// Devices the run did not start on.
    pub skipped: usize,
}

impl Totals {
    /// Counts the reports.
    pub fn of(reports: &[DeviceReport]) -> Totals {
        let mut totals = Totals {
            devices: reports.len(),
            ..Totals::default()
        };
        for report in reports {
            if report.compliant && report.role == Role::Server {
                totals.compliant += 1;
            }
            match report.action {
                Action::Unchanged => totals.unchanged += 1,
                Action::Changed => totals.changed += 1,
                Action::WouldChange => totals.would_change += 1,
                Action::NotApplicable => totals.not_applicable += 1,
                Action::Failed => totals.failed += 1,
                Action::Skipped => totals.skipped += 1,
            }
        }
        totals
    }
}

/// Renders the end-of-run summary table.
pub fn render_summary(reports: &[DeviceReport]) -> String {
    let headers = [
        "DEVICE",
        "CLUSTER",
        "ROLE",
        "ACTION",
        "COMPLIANT",
        "ISSUER / ERROR",
    ];
    let rows: Vec<[String; 6]> = reports
        .iter()
        .map(|r| {
            let detail = if r.error.is_empty() {
                r.effective_issuer.clone()
            } else {
                one_line(&r.error)
            };
            [
                r.device.clone(),
                r.cluster.clone(),
                r.role.to_string(),
                r.action.as_str().to_owned(),
                if r.role == Role::Agent {
                    "-".to_owned()
                } else {
                    r.compliant.to_string()
                },
                detail,
            ]
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row.iter()).take(5) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &[&str]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i < 5 {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            } else {
                out.push_str(cell);
            }
        }
        text.push_str(out.trim_end());
        text.push('\n');
    };
    line(&headers);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    let mut causes: std::collections::BTreeMap<Cause, Vec<&str>> =
        std::collections::BTreeMap::new();
    for report in reports {
        if let Some(cause) = report.cause {
            causes.entry(cause).or_default().push(&report.device);
        }
    }
    if !causes.is_empty() {
        text.push_str("\nBy cause:\n");
        for (cause, devices) in &causes {
            text.push_str(&format!(
                "  {cause} ({}): {}\n",
                devices.len(),
                devices.join(", ")
            ));
            text.push_str(&format!("    fix: {}\n", cause.fix()));
        }
    }
    let totals = Totals::of(reports);
    text.push_str(&format!(
        "\n{} devices: {} compliant servers, {} unchanged, {} changed, {} would change, {} not \
         applicable, {} failed, {} skipped\n",
        totals.devices,
        totals.compliant,
        totals.unchanged,
        totals.changed,
        totals.would_change,
        totals.not_applicable,
        totals.failed,
        totals.skipped
    ));
    text
}

/// Joins a multi-line message into one line for tables and CSV cells.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(name: &str, action: Action, compliant: bool) -> DeviceReport {
        DeviceReport {
            device: name.into(),
            host: "10.0.0.1".into(),
            port: 22,
            cluster: "rg/c1".into(),
            role: Role::Server,
            wave: "canary".into(),
            expected_issuer: "https://a/".into(),
            effective_issuer: if compliant {
                "https://a/".into()
            } else {
                String::new()
            },
            previous_issuer: String::new(),
            issuers_before: vec![],
            issuers_after: vec!["https://a/".into(), "https://b/".into()],
            compliant,
            action,
            error: if compliant {
                String::new()
            } else {
                "line one\nline two".into()
            },
            cause: if compliant {
                None
            } else {
                Some(Cause::Unreachable)
            },
            unreachable: false,
            k3s_restarted: false,
            rolled_back: false,
            secret_sync: "synced (1)".into(),
            token_issuer: String::new(),
            signing_key_published: None,
            diff: String::new(),
            log: vec![],
            duration: Duration::from_millis(1234),
            transcript: vec![],
        }
    }

    #[test]
    fn csv_has_required_columns_and_one_line_errors() {
        let mut out = Vec::new();
        write_csv(
            &mut out,
            &[
                report("e1", Action::Changed, true),
                report("e2", Action::Failed, false),
            ],
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next().unwrap(), CSV_COLUMNS.join(","));
        assert_eq!(
            lines.next().unwrap(),
            "e1,10.0.0.1,22,rg/c1,server,https://a/,https://a/,true,changed,,,,,https://a/ https://b/,false,false,synced (1),1234,canary,,"
        );
        assert!(lines.next().unwrap().contains("line one | line two"));
    }

    #[test]
    fn summary_counts_actions() {
        let text = render_summary(&[
            report("e1", Action::Unchanged, true),
            report("e2", Action::Failed, false),
        ]);
        assert!(
            text.starts_with("DEVICE  CLUSTER  ROLE    ACTION     COMPLIANT  ISSUER / ERROR\n"),
            "{text}"
        );
        assert!(
            text.contains("2 devices: 1 compliant servers, 1 unchanged, 0 changed"),
            "{text}"
        );
    }

    #[test]
    fn atomic_write_replaces_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        std::fs::write(&path, "old").unwrap();
        write_file_atomically(&path, |b| {
            b.extend_from_slice(b"new");
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
