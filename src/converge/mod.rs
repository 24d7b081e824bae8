//! Converging one device: probe, plan, write, restart, verify, roll back, restart the
//! secret-sync controller.
//!
//! The steps for a server, each skipped when nothing needs it:
//!
//! 1. Probe: the K3s unit, the issuer the running API server publishes, the environment
//!    files and every config file (see [`probe`]).
//! 2. Plan the drop-in from the effective configuration ([`crate::k3s::plan`]).
//! 3. Write the drop-in atomically, keeping the previous version on the node.
//! 4. Restart K3s within the playbook's deadline and wait until the API server publishes
//!    the Arc issuer and stays up for the stability window.
//! 5. On failure, restore the previous drop-in, restart again and check that the old
//!    issuer is back; report the journal lines that explain the failure.
//! 6. Restart the secret-sync controller's deployments and read the SecretSync objects.

mod connection;
mod probe;
pub mod remote;
mod restart;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::azure::ClusterProblem;
use crate::inventory::{Device, Role};
use crate::k3s::plan::{Decision, Plan, Target};
use crate::playbook::Playbook;
use crate::report::{Action, DeviceReport};
use crate::secret::Secret;
use crate::ssh::{self, Dialer, SshError};

use connection::Connection;

pub use probe::Probe;

/// The kind of run: converge, check or audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Change and restart what differs.
    Converge,
    /// Show what converge would change; change nothing.
    Check,
    /// Report compliance; change nothing.
    Audit,
}

impl Mode {
    /// Returns the command name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Converge => "converge",
            Mode::Check => "check",
            Mode::Audit => "audit",
        }
    }
}

/// Settings shared by every device of a run.
pub struct Job {
    /// The mode.
    pub mode: Mode,
    /// The playbook.
    pub playbook: Arc<Playbook>,
    /// Opens SSH connections, sharing jump host sessions and keys.
    pub dialer: Arc<Dialer>,
    /// Password for sudo on devices where sudo requires one.
    pub sudo_password: Option<Secret>,
    /// Bound on each remote command that is not a restart or a rollout.
    pub command_timeout: Duration,
}

/// Converges, checks or audits one device, never failing: every problem ends up in the
/// report. `target` is the device's SSH route; agents have none, because they are never
/// contacted.
pub async fn run_device(
    device: &Device,
    target: Option<&ssh::Target>,
    issuer: Option<Result<String, ClusterProblem>>,
    job: &Job,
) -> DeviceReport {
    let started = Instant::now();
    let mut report = DeviceReport::new(device);
    if device.role == Role::Agent {
        report.action = Action::NotApplicable;
        report.compliant = true;
        report
            .log
            .push("agent: kube-apiserver runs on servers only; left untouched".into());
        return report;
    }
    let issuer = match issuer {
        Some(Ok(issuer)) => issuer,
        Some(Err(problem)) => return report.fail(problem.to_string()),
        None => return report.fail("the device names no Arc cluster"),
    };
    report.expected_issuer = issuer.clone();
    let Some(target) = target else {
        return report.fail("arcfleet has no SSH settings for the device");
    };
    report.host = target.host.clone();
    report.port = target.port;

    let mut report = match connect(target, job, report).await {
        Ok(mut node) => {
            if let Err(error) = node.converge(&issuer).await {
                node.report = node.report.fail(error);
            }
            if node.connection.reconnects > 0 {
                let count = node.connection.reconnects;
                node.report
                    .log
                    .push(format!("reconnected {count} time(s) during the run"));
            }
            node.connection.close().await;
            node.report
        }
        Err(report) => *report,
    };
    report.duration = started.elapsed();
    report
}

/// Connects and chooses how to become root. On failure returns the finished report.
async fn connect<'a>(
    target: &'a ssh::Target,
    job: &'a Job,
    mut report: DeviceReport,
) -> Result<Node<'a>, Box<DeviceReport>> {
    let mut connection = match Connection::open(&job.dialer, target).await {
        Ok(connection) => connection,
        Err(error) => {
            report.unreachable = error.is_unreachable();
            return Err(Box::new(report.fail(error.to_string())));
        }
    };
    report
        .log
        .push(format!("connected to {}", target.describe()));
    let choice = connection
        .choose_privilege(job.sudo_password.as_ref(), job.command_timeout)
        .await;
    if let Err(error) = choice {
        connection.close().await;
        return Err(Box::new(
            report.fail(format!("checking sudo failed: {error}")),
        ));
    }
    Ok(Node {
        connection,
        job,
        report,
    })
}

/// One connected device during its run.
struct Node<'a> {
    connection: Connection<'a>,
    job: &'a Job,
    report: DeviceReport,
}

/// A step failure, worded for the report.
type StepResult<T> = Result<T, String>;

impl Node<'_> {
    /// Runs a script on the node as root.
    async fn run(&mut self, script: &str, limit: Duration) -> Result<ssh::Output, SshError> {
        self.connection.run_as_root(script, limit).await
    }

    async fn converge(&mut self, issuer: &str) -> StepResult<()> {
        let probe = Probe::read(self).await?;
        self.report.previous_issuer = probe.published_issuer.clone().unwrap_or_default();
        self.report.effective_issuer = self.report.previous_issuer.clone();

        let playbook = &self.job.playbook;
        let target = Target {
            issuer: issuer.to_owned(),
            keep_previous_issuers: playbook.configure.keep_previous_issuers,
            max_token_expiration: playbook.configure.max_token_expiration.clone(),
        };
        let plan = probe.files.plan(&target).map_err(|error| {
            format!(
                "K3s configuration cannot be read as K3s would: {error}; arcfleet changed nothing"
            )
        })?;
        self.report.issuers_before = plan.before.issuer_list();
        self.report.issuers_after = plan.after.issuer_list();
        self.report.diff = plan_diff(&plan);
        self.report.log.push(format!(
            "issuers before: [{}]; after: [{}]",
            plan.before.issuer_list().join(", "),
            plan.after.issuer_list().join(", ")
        ));

        if let Decision::Blocked(reason) = &plan.decision {
            return Err(format!("cannot make the Arc issuer effective: {reason}"));
        }
        let serving = probe.published_issuer.as_deref() == Some(issuer);
        let needs_write = plan.decision == Decision::Change;
        if !needs_write && serving {
            self.report.action = Action::Unchanged;
            self.report.compliant = true;
            return Ok(());
        }
        if self.job.mode != Mode::Converge {
            self.report.action = Action::WouldChange;
            self.report.error = if needs_write {
                format!("arcfleet would write {} and restart K3s", plan.dropin_path)
            } else {
                "configured, but the running API server publishes another issuer: K3s needs a restart"
                    .to_owned()
            };
            return Ok(());
        }

        if needs_write {
            self.write_dropin(&plan).await?;
        }
        let Some(restart) = playbook.restart.clone() else {
            return Err(
                "the playbook leaves out restart-k3s, so K3s still runs the old issuer".into(),
            );
        };
        self.restart_and_verify(&plan, issuer, &probe, &restart)
            .await?;
        self.report.action = Action::Changed;
        self.report.compliant = true;
        self.report.error.clear();
        if let Some(secret_sync) = playbook.secret_sync.clone() {
            self.report.secret_sync = self.restart_secret_sync(&secret_sync).await;
        }
        Ok(())
    }

    async fn write_dropin(&mut self, plan: &Plan) -> StepResult<()> {
        let expected = remote::content_hash(plan.current_dropin.as_deref());
        let script = remote::apply_dropin(&plan.dropin_path, &expected, plan.new_dropin.as_deref());
        let output = self
            .run(&script, self.job.command_timeout)
            .await
            .map_err(|e| format!("writing {} failed: {e}", plan.dropin_path))?;
        if output.status != 0 {
            return Err(format!(
                "writing {} failed (exit status {}): {}",
                plan.dropin_path,
                output.status,
                output.stderr_text().trim()
            ));
        }
        self.report.log.push(format!("wrote {}", plan.dropin_path));
        Ok(())
    }

    /// Restarts the secret-sync deployments and summarises the SecretSync objects.
    async fn restart_secret_sync(&mut self, step: &crate::playbook::SecretSync) -> String {
        let timeout_seconds = step.rollout_timeout.as_secs().max(1);
        let limit = step.rollout_timeout + self.job.command_timeout;
        let script = remote::restart_secret_sync(&step.namespace, timeout_seconds);
        let output = match self.run(&script, limit).await {
            Ok(output) => output,
            Err(error) => return format!("controller restart failed: {error}"),
        };
        if output.status != 0 {
            return format!(
                "controller restart failed: {}",
                output.stderr_text().lines().last().unwrap_or("").trim()
            );
        }
        let tagged = remote::Tagged::parse(&output.stdout_text());
        if tagged.first("deployments") == Some("none") {
            return format!("no deployments in namespace {}", step.namespace);
        }
        self.report.log.push(format!(
            "restarted and rolled out {}",
            tagged.all("rolled-out").join(", ")
        ));
        match self
            .run(&remote::list_secret_syncs(), self.job.command_timeout)
            .await
        {
            Ok(output) if output.status == 0 => summarise_secret_syncs(&output.stdout_text()),
            Ok(output) => format!(
                "cannot list SecretSync objects: {}",
                output.stderr_text().trim()
            ),
            Err(error) => format!("cannot list SecretSync objects: {error}"),
        }
    }
}

/// Renders the drop-in change as a unified diff, empty when nothing changes.
fn plan_diff(plan: &Plan) -> String {
    if plan.current_dropin == plan.new_dropin {
        return String::new();
    }
    let old = plan.current_dropin.as_deref().unwrap_or("");
    let new = plan.new_dropin.as_deref().unwrap_or("");
    let old_name = if plan.current_dropin.is_some() {
        plan.dropin_path.clone()
    } else {
        "/dev/null".into()
    };
    let new_name = if plan.new_dropin.is_some() {
        plan.dropin_path.clone()
    } else {
        "/dev/null".into()
    };
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .header(&old_name, &new_name)
        .to_string()
}

/// Summarises `kubectl get secretsyncs -o json`: synced, failing with reasons, or none.
fn summarise_secret_syncs(json: &str) -> String {
    let Ok(list) = serde_json::from_str::<serde_json::Value>(json) else {
        return "cannot read the SecretSync list".to_owned();
    };
    let items = list["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return "no SecretSync objects".to_owned();
    }
    let mut failing = Vec::new();
    for item in &items {
        let name = format!(
            "{}/{}",
            item["metadata"]["namespace"].as_str().unwrap_or(""),
            item["metadata"]["name"].as_str().unwrap_or("")
        );
        let conditions = item["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let failed = conditions
            .iter()
            .find(|c| c["status"].as_str() == Some("False"));
        match failed {
            Some(condition) => failing.push(format!(
                "{name}: {}",
                condition["reason"].as_str().unwrap_or("unknown reason")
            )),
            None if conditions.is_empty() => failing.push(format!("{name}: no status yet")),
            None => {}
        }
    }
    if failing.is_empty() {
        format!("synced ({})", items.len())
    } else {
        format!("failing: {}", failing.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_sync_summary() {
        let synced = r#"{"items":[{"metadata":{"namespace":"default","name":"a"},
            "status":{"conditions":[{"type":"SecretSyncReady","status":"True","reason":"UpdateNoValueChangeSucceeded"}]}}]}"#;
        assert_eq!(summarise_secret_syncs(synced), "synced (1)");
        let failing = r#"{"items":[{"metadata":{"namespace":"default","name":"a"},
            "status":{"conditions":[{"type":"SecretSyncReady","status":"False","reason":"ControllerSyncFailed"}]}}]}"#;
        assert_eq!(
            summarise_secret_syncs(failing),
            "failing: default/a: ControllerSyncFailed"
        );
        assert_eq!(
            summarise_secret_syncs(r#"{"items":[]}"#),
            "no SecretSync objects"
        );
    }
}
