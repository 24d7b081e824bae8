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
mod proof;
pub mod remote;
mod restart;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::azure::ClusterProblem;
use crate::inventory::{Device, Role};
use crate::k3s::plan::{Decision, Plan, Target};
use crate::playbook::Playbook;
use crate::report::{transcript, Action, Cause, DeviceReport};
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
    /// Caps K3s restarts in progress fleet-wide, separately from the device concurrency.
    pub restart_slots: Arc<tokio::sync::Semaphore>,
    /// Set when the run is interrupted.
    pub shutdown: Arc<crate::shutdown::Shutdown>,
    /// Machine-readable events.
    pub events: Arc<crate::events::Events>,
    /// Signing keys the Arc issuers publish, fetched once per run; `None` for offline runs
    /// (`--issuers-file`), which check the token's issuer but not its key.
    pub issuer_keys: Option<Arc<crate::azure::oidc::IssuerKeys>>,
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
        Some(Err(problem)) => return report.fail(problem.cause(), problem.to_string()),
        None => {
            return report.fail(
                Cause::AzureClusterNotFound,
                "the device names no Arc cluster",
            )
        }
    };
    report.expected_issuer = issuer.clone();
    let Some(target) = target else {
        return report.fail(
            Cause::CommandFailed,
            "arcfleet has no SSH settings for the device",
        );
    };
    report.host = target.host.clone();
    report.port = target.port;

    let mut report = match connect(target, job, report).await {
        Ok(mut node) => {
            if let Err(failure) = node.converge(&issuer).await {
                node.report = node.report.fail(failure.cause, failure.message);
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
            return Err(Box::new(report.fail(error.cause(), error.to_string())));
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
            report.fail(error.cause(), format!("checking sudo failed: {error}")),
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

/// A helper's failure, worded for the report.
type StepResult<T> = Result<T, String>;

/// A step's failure: the report cause and the message.
#[derive(Debug)]
struct Failure {
    cause: Cause,
    message: String,
}

impl Failure {
    /// Returns a function that tags a message with `cause`, for `map_err`.
    fn with(cause: Cause) -> impl Fn(String) -> Failure {
        move |message| Failure { cause, message }
    }
}

impl Node<'_> {
    /// Runs a script on the node as root.
    async fn run(&mut self, script: &str, limit: Duration) -> Result<ssh::Output, SshError> {
        let command = remote::wrap(script, &self.connection.privilege);
        let started = Instant::now();
        let result = self.connection.run_as_root(script, limit).await;
        let (stdout, stderr, status) = match &result {
            Ok(output) => (
                transcript::summarise_file_payloads(&output.stdout_text()),
                output.stderr_text(),
                format!("exit status {}", output.status),
            ),
            Err(error) => (String::new(), String::new(), format!("error: {error}")),
        };
        self.report.transcript.push(transcript::Entry {
            command: transcript::redact(&command),
            stdout: transcript::redact(&stdout),
            stderr: transcript::redact(&stderr),
            status,
            duration: started.elapsed(),
        });
        result
    }

    fn step<E: AsRef<str>>(&self, step: &str, result: Result<(), E>) {
        let result = result.as_ref().map(|_| ()).map_err(AsRef::as_ref);
        let (outcome, detail) = match result {
            Ok(()) => ("ok", ""),
            Err(detail) => ("failed", detail),
        };
        self.job
            .events
            .step(&self.report.device, step, outcome, detail);
    }

    async fn converge(&mut self, issuer: &str) -> Result<(), Failure> {
        let probe = Probe::read(self, issuer).await;
        self.step(
            "probe",
            probe.as_ref().map(|_| ()).map_err(|f| f.message.as_str()),
        );
        let probe = probe?;
        self.report.previous_issuer = probe.published_issuer.clone().unwrap_or_default();
        self.report.effective_issuer = self.report.previous_issuer.clone();

        let playbook = &self.job.playbook;
        let target = Target {
            issuer: issuer.to_owned(),
            keep_previous_issuers: playbook.configure.keep_previous_issuers,
            max_token_expiration: playbook.configure.max_token_expiration.clone(),
        };
        let plan = probe.files.plan(&target).map_err(|error| Failure {
            cause: Cause::ConfigInvalid,
            message: format!(
                "K3s configuration cannot be read as K3s would: {error}; arcfleet changed nothing"
            ),
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
            return Err(Failure {
                cause: Cause::ConfigOverridden,
                message: format!("cannot make the Arc issuer effective: {reason}"),
            });
        }
        let serving = probe.published_issuer.as_deref() == Some(issuer);
        let needs_write = plan.decision == Decision::Change;
        if !needs_write && serving {
            self.report.action = Action::Unchanged;
            self.report.compliant = true;
            return self.prove_minted(issuer, probe.token.clone()).await;
        }
        if self.job.mode != Mode::Converge {
            self.report.action = Action::WouldChange;
            self.report.cause = Some(Cause::IssuerNotEffective);
            self.report.error = if needs_write {
                format!("arcfleet would write {} and restart K3s", plan.dropin_path)
            } else {
                format!(
                    "configured, but {}: K3s needs a restart",
                    serving_description(&probe)
                )
            };
            return Ok(());
        }

        if self.job.shutdown.is_requested() {
            self.report.action = Action::Skipped;
            self.report.cause = Some(Cause::NotStarted);
            self.report.error = "interrupted before any change: nothing was written".to_owned();
            return Ok(());
        }
        if needs_write {
            let written = self.write_dropin(&plan).await;
            self.step("write-dropin", written.as_ref().map(|_| ()));
            written.map_err(Failure::with(Cause::CommandFailed))?;
        }
        let Some(restart) = playbook.restart.clone() else {
            // The playbook leaves restarts to someone else: the change is in place, and K3s
            // applies it at its next restart.
            self.report.cause = Some(Cause::IssuerNotEffective);
            let pending = "the playbook leaves out restart-k3s, so K3s signs with the Arc \
                           issuer only after its next restart";
            if needs_write {
                self.report.action = Action::Changed;
                self.report.error = format!("wrote {}; {pending}", plan.dropin_path);
            } else {
                self.report.action = Action::WouldChange;
                self.report.error =
                    format!("configured, but {}; {pending}", serving_description(&probe));
            }
            return Ok(());
        };
        let slots = self.job.restart_slots.clone();
        let Ok(slot) = slots.acquire().await else {
            return Err(Failure {
                cause: Cause::CommandFailed,
                message: "the restart limiter closed".into(),
            });
        };
        let restarted = self
            .restart_and_verify(&plan, needs_write, issuer, &probe, &restart)
            .await;
        self.step(
            "restart-k3s",
            restarted
                .as_ref()
                .map(|_| ())
                .map_err(|f| f.message.as_str()),
        );
        restarted?;
        let ready = self
            .wait_node_ready(probe.files.node_name(), restart.deadline)
            .await;
        self.step("wait-node-ready", ready.as_ref().map(|_| ()));
        ready.map_err(Failure::with(Cause::NodeNotReady))?;
        drop(slot);
        self.report.action = Action::Changed;
        self.report.compliant = true;
        self.report.error.clear();
        self.prove_token(issuer).await?;
        if let Some(secret_sync) = playbook.secret_sync.clone() {
            let summary = self.restart_secret_sync(&secret_sync).await;
            let healthy = summary.starts_with("synced")
                || summary == "no SecretSync objects"
                || summary.starts_with("no deployments in namespace");
            if !healthy {
                // The issuer is in place, but secrets may not flow yet: not compliant.
                self.report.compliant = false;
                self.report.cause = Some(Cause::SecretSyncFailing);
                self.report.error = format!("SecretSync {summary}");
            }
            let outcome = if healthy { "ok" } else { "failed" };
            self.job.events.step(
                &self.report.device,
                "restart-secret-sync",
                outcome,
                &summary,
            );
            self.report.secret_sync = summary;
        }
        Ok(())
    }

    async fn write_dropin(&mut self, plan: &Plan) -> StepResult<()> {
        let expected = remote::content_hash(plan.current_dropin.as_deref());
        let script = remote::apply_dropin(&plan.dropin_path, &expected, plan.new_dropin.as_deref());
        let output = match self.run(&script, self.job.command_timeout).await {
            Ok(output) => output,
            Err(error) if error.is_connection_lost() => {
                return self.check_write_after_drop(plan, &error.to_string()).await
            }
            Err(error) => return Err(format!("writing {} failed: {error}", plan.dropin_path)),
        };
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

    /// Decides, after the connection dropped during the write, whether the write happened:
    /// reconnects and compares the drop-in with the old and the new content. The write is
    /// a rename, so the file has one or the other.
    ///
    /// NOTE: no end-to-end test drops the connection during the write, because the lab's
    /// drop fault fires only on `systemctl start` and `restart`.
    async fn check_write_after_drop(&mut self, plan: &Plan, error: &str) -> StepResult<()> {
        let path = &plan.dropin_path;
        self.report.log.push(format!(
            "the connection dropped while writing {path} ({error}); reconnecting to read it"
        ));
        let output = self
            .run(&remote::file_hash(path), self.job.command_timeout)
            .await
            .map_err(|e| format!("cannot tell whether {path} was written: {e}"))?;
        let found = output.stdout_text().trim().to_owned();
        if found == remote::content_hash(plan.new_dropin.as_deref()) {
            self.report.log.push(format!("wrote {path}"));
            Ok(())
        } else if found == remote::content_hash(plan.current_dropin.as_deref()) {
            Err(format!(
                "writing {path} failed: the connection dropped ({error}), and the file is \
                 unchanged"
            ))
        } else {
            Err(format!(
                "writing {path} failed: the connection dropped ({error}), and the file now has \
                 content arcfleet did not write; run arcfleet again"
            ))
        }
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

/// Describes what the running API server publishes, for messages about a node whose
/// files are right but whose issuer is not yet.
fn serving_description(probe: &Probe) -> String {
    match (&probe.published_issuer, &probe.api_error) {
        (Some(issuer), _) => format!("the running API server publishes {issuer}"),
        (None, Some(error)) => format!("the API server does not answer ({error})"),
        (None, None) => "the API server does not answer".to_owned(),
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
