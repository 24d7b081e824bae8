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

mod probe;
pub mod remote;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::azure::ClusterProblem;
use crate::inventory::{Device, Role};
use crate::k3s::plan::{Decision, Plan, Target};
use crate::playbook::Playbook;
use crate::report::{transcript, Action, Cause, DeviceReport};
use crate::ssh::known_hosts::KnownHosts;
use crate::ssh::{Endpoint, KeyStore, Session, Settings, SshError};

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
    /// SSH connection settings.
    pub ssh: Settings,
    /// Trusted host keys.
    pub known_hosts: Arc<KnownHosts>,
    /// Private keys, loaded once.
    pub keys: Arc<KeyStore>,
    /// Key for devices that do not name their own.
    pub default_identity: std::path::PathBuf,
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
/// report.
pub async fn run_device(
    device: &Device,
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

    let endpoint = Endpoint {
        host: device.host.clone(),
        port: device.port,
        user: device.user.clone(),
        identity: device
            .identity_file
            .as_deref()
            .map_or_else(|| job.default_identity.clone(), crate::ssh::expand_home),
    };
    let session =
        match Session::connect(&endpoint, &job.ssh, job.known_hosts.clone(), &job.keys).await {
            Ok(session) => session,
            Err(error) => {
                report.unreachable = error.is_unreachable();
                let mut report = report.fail(error.cause(), error.to_string());
                report.duration = started.elapsed();
                return report;
            }
        };
    let mut node = Node {
        session: &session,
        sudo: device.user != "root",
        job,
        report,
    };
    if let Err(failure) = node.converge(&issuer).await {
        node.report = node.report.fail(failure.cause, failure.message);
    }
    let mut report = node.report;
    session.close().await;
    report.duration = started.elapsed();
    report
}

/// One connected device during its run.
struct Node<'a> {
    session: &'a Session,
    sudo: bool,
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
    async fn run(&mut self, script: &str, limit: Duration) -> Result<crate::ssh::Output, SshError> {
        let command = remote::wrap(script, self.sudo);
        let started = Instant::now();
        let result = self.session.run(&command, None, limit).await;
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
        let probe = Probe::read(self).await;
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
            return self.prove_token(issuer).await;
        }
        if self.job.mode != Mode::Converge {
            self.report.action = Action::WouldChange;
            self.report.cause = Some(Cause::IssuerNotEffective);
            self.report.error = if needs_write {
                format!("arcfleet would write {} and restart K3s", plan.dropin_path)
            } else {
                "configured, but the running API server publishes another issuer: K3s needs a restart"
                    .to_owned()
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
            // The playbook leaves restarts to someone else: the change is written, and K3s
            // applies it at its next restart.
            self.report.action = Action::Changed;
            self.report.cause = Some(Cause::IssuerNotEffective);
            self.report.error = format!(
                "wrote {}; the playbook leaves out restart-k3s, so K3s signs with the Arc issuer \
                 only after its next restart",
                plan.dropin_path
            );
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
            .restart_and_verify(&plan, issuer, &probe, &restart)
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
            self.report.secret_sync = self.restart_secret_sync(&secret_sync).await;
            if self.report.secret_sync.starts_with("failing") {
                // The issuer is in place, but secrets do not flow yet: not compliant.
                self.report.compliant = false;
                self.report.cause = Some(Cause::SecretSyncFailing);
                self.report.error = format!("SecretSync {}", self.report.secret_sync);
            }
            self.job.events.step(
                &self.report.device,
                "restart-secret-sync",
                "ok",
                &self.report.secret_sync,
            );
        }
        Ok(())
    }

    /// Mints a token on the node and checks that its `iss` is the Arc issuer byte for byte
    /// and that the issuer publishes its signing key. The token never leaves this function:
    /// it is decoded here and is neither logged nor put in the transcript.
    async fn prove_token(&mut self, issuer: &str) -> Result<(), Failure> {
        let Some(step) = self.job.playbook.verify_token.clone() else {
            return Ok(());
        };
        let token = match self
            .mint_token(&step.namespace, &step.service_account, &step.audience)
            .await
        {
            Ok(token) => token,
            Err(error) if error.contains("not found") => {
                self.report.log.push(format!(
                    "service account {}/{} not found; minting the token for default/default",
                    step.namespace, step.service_account
                ));
                self.mint_token("default", "default", &step.audience)
                    .await
                    .map_err(Failure::with(Cause::CommandFailed))?
            }
            Err(error) => {
                return Err(Failure {
                    cause: Cause::CommandFailed,
                    message: error,
                })
            }
        };
        let claims = crate::azure::oidc::decode_token(&token)
            .map_err(Failure::with(Cause::TokenIssuerMismatch))?;
        drop(token);
        self.report.token_issuer = claims.issuer.clone();
        if claims.issuer != issuer {
            let message = format!(
                "a token minted on the node has issuer {}, not the Arc issuer {issuer}: Entra \
                 would answer AADSTS700211",
                claims.issuer
            );
            self.step("verify-token", Err(message.as_str()));
            return Err(Failure {
                cause: Cause::TokenIssuerMismatch,
                message,
            });
        }
        let Some(issuer_keys) = self.job.issuer_keys.clone() else {
            self.report.log.push(
                "token issuer matches; signing key not checked: offline run without access to the issuer"
                    .into(),
            );
            self.step("verify-token", Ok::<(), &str>(()));
            return Ok(());
        };
        let published = issuer_keys.key_ids(issuer).await;
        let result = match published {
            Ok(kids) if kids.contains(&claims.key_id) => {
                self.report.signing_key_published = Some(true);
                self.report.log.push(format!(
                    "token issuer matches; Arc publishes key {}",
                    claims.key_id
                ));
                Ok(())
            }
            Ok(kids) => {
                self.report.signing_key_published = Some(false);
                Err(Failure {
                    cause: Cause::SigningKeyNotPublished,
                    message: format!(
                        "the node signs tokens with key {}, which the Arc issuer does not publish \
                         ({} keys published): Entra cannot verify its tokens",
                        claims.key_id,
                        kids.len()
                    ),
                })
            }
            Err(error) => Err(Failure {
                cause: Cause::SigningKeyNotPublished,
                message: format!("cannot read the keys the Arc issuer publishes: {error}"),
            }),
        };
        self.step(
            "verify-token",
            result.as_ref().map(|_| ()).map_err(|f| f.message.as_str()),
        );
        result
    }

    /// Runs `k3s kubectl create token` and returns the token; the transcript records that
    /// a token was minted, never the token.
    async fn mint_token(
        &mut self,
        namespace: &str,
        account: &str,
        audience: &str,
    ) -> Result<String, String> {
        let script = remote::create_token(namespace, account, audience);
        let command = remote::wrap(&script, self.sudo);
        let started = Instant::now();
        let result = self
            .session
            .run(&command, None, self.job.command_timeout)
            .await;
        let status = match &result {
            Ok(output) => format!("exit status {}", output.status),
            Err(error) => format!("error: {error}"),
        };
        self.report.transcript.push(transcript::Entry {
            command: transcript::redact(&command),
            stdout: "<token not recorded>".to_owned(),
            stderr: result
                .as_ref()
                .map(|o| transcript::redact(&o.stderr_text()))
                .unwrap_or_default(),
            status,
            duration: started.elapsed(),
        });
        let output = result.map_err(|e| format!("minting a token failed: {e}"))?;
        if output.status != 0 {
            return Err(format!(
                "minting a token failed: {}",
                output.stderr_text().trim()
            ));
        }
        Ok(output.stdout_text())
    }

    /// Waits until the node is Ready and, on an embedded-etcd server, its etcd member votes
    /// again (condition EtcdIsVoter), so that the next server of the cluster may restart.
    async fn wait_node_ready(
        &mut self,
        node_name: Option<String>,
        limit: Duration,
    ) -> StepResult<()> {
        let deadline = Instant::now() + limit;
        let script = remote::node_conditions(node_name.as_deref());
        loop {
            let state = match self.run(&script, self.job.command_timeout).await {
                Ok(output) if output.status == 0 => node_state(&output.stdout_text()),
                Ok(output) => Err(output.stderr_text().trim().to_owned()),
                Err(error) => Err(error.to_string()),
            };
            match state {
                Ok(NodeState {
                    ready: true,
                    etcd_voter: None | Some(true),
                }) => {
                    self.report
                        .log
                        .push("node is Ready and its etcd member votes".into());
                    return Ok(());
                }
                other if Instant::now() >= deadline => {
                    let seen = match other {
                        Ok(state) => {
                            format!("Ready={}, EtcdIsVoter={:?}", state.ready, state.etcd_voter)
                        }
                        Err(error) => error,
                    };
                    return Err(format!(
                        "the node did not become Ready with a voting etcd member within {}s ({seen}); \
                         its issuer change is in place, but the cluster's other servers were not \
                         restarted",
                        limit.as_secs()
                    ));
                }
                _ => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
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

    /// Restarts K3s and waits for `issuer`; on failure rolls back and returns why.
    async fn restart_and_verify(
        &mut self,
        plan: &Plan,
        issuer: &str,
        probe: &Probe,
        restart: &crate::playbook::Restart,
    ) -> Result<(), Failure> {
        let outcome = self.restart_until(issuer, restart).await;
        let since = match outcome {
            Ok(()) => return Ok(()),
            Err((since, why)) => {
                self.report.log.push(format!("restart failed: {why}"));
                (since, why)
            }
        };
        let journal = self.journal(&since.0).await;
        let rollback = self.roll_back(plan, probe, restart).await;
        self.report.rolled_back = rollback.is_ok();
        if rollback.is_ok() {
            self.report.issuers_after = plan.before.issuer_list();
        }
        self.report.effective_issuer = self.published_issuer().await.unwrap_or_default();
        let (cause, rollback_note) = match rollback {
            Ok(()) => (
                Cause::RestartFailedRolledBack,
                "rolled back to the previous configuration".to_owned(),
            ),
            Err(error) => (
                Cause::RollbackFailed,
                format!("ROLLBACK FAILED, the node needs attention: {error}"),
            ),
        };
        Err(Failure {
            cause,
            message: format!(
                "K3s did not come up with the Arc issuer: {}; {rollback_note}. K3s journal:\n{journal}",
                since.1
            ),
        })
    }

    /// Restarts K3s and waits until it publishes `issuer` and stays healthy. On failure
    /// returns the node clock before the restart and why it failed.
    async fn restart_until(
        &mut self,
        issuer: &str,
        restart: &crate::playbook::Restart,
    ) -> Result<(), (String, String)> {
        let started = Instant::now();
        let deadline_seconds = restart.deadline.as_secs().max(1);
        let limit = restart.deadline + Duration::from_secs(15);
        let output = self
            .run(&remote::restart_k3s(deadline_seconds), limit)
            .await
            .map_err(|e| (String::new(), format!("restart command failed: {e}")))?;
        self.report.k3s_restarted = true;
        let tagged = remote::Tagged::parse(&output.stdout_text());
        let since = tagged.first("since").unwrap_or("").to_owned();
        match tagged.first("restart") {
            Some("0") => {}
            Some("124") | Some("137") => {
                return Err((
                    since,
                    format!("`systemctl restart k3s` did not finish within {deadline_seconds}s"),
                ))
            }
            Some(code) => {
                return Err((
                    since,
                    format!("`systemctl restart k3s` failed with exit status {code}"),
                ))
            }
            None => return Err((since, "the restart command printed no status".to_owned())),
        }
        self.report.log.push("restarted k3s".into());

        let deadline = started + restart.deadline;
        self.wait_for_issuer(Some(issuer), deadline)
            .await
            .map_err(|why| (since.clone(), why))?;
        tokio::time::sleep(restart.stability_window).await;
        let health = self.health().await;
        match health {
            Health {
                active: true,
                issuer: Some(published),
                ..
            } if published == issuer => {
                self.report.effective_issuer = published;
                self.report.log.push(format!(
                    "API server publishes the Arc issuer and stayed up for {}s",
                    restart.stability_window.as_secs()
                ));
                Ok(())
            }
            health => Err((
                since,
                format!(
                    "K3s did not stay up for the {}s stability window: {}",
                    restart.stability_window.as_secs(),
                    health.describe()
                ),
            )),
        }
    }

    /// Polls until K3s is active and publishes `issuer` (or any issuer, for `None`).
    async fn wait_for_issuer(&mut self, issuer: Option<&str>, deadline: Instant) -> StepResult<()> {
        loop {
            let health = self.health().await;
            let good = health.active
                && match (issuer, &health.issuer) {
                    (Some(expected), Some(published)) => published == expected,
                    (None, _) => true,
                    (Some(_), None) => false,
                };
            if good {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "deadline passed; last check: {}",
                    health.describe()
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn health(&mut self) -> Health {
        match self
            .run(&remote::health_check(), self.job.command_timeout)
            .await
        {
            Ok(output) => Health::parse(&output.stdout_text()),
            Err(error) => Health {
                active: false,
                issuer: None,
                detail: format!("health check failed: {error}"),
            },
        }
    }

    async fn published_issuer(&mut self) -> Option<String> {
        self.health().await.issuer
    }

    async fn journal(&mut self, since: &str) -> String {
        if since.is_empty() {
            return "(node clock unknown, journal not read)".to_owned();
        }
        match self
            .run(&remote::journal_since(since), self.job.command_timeout)
            .await
        {
            Ok(output) => output.stdout_text().trim_end().to_owned(),
            Err(error) => format!("(journal not read: {error})"),
        }
    }

    async fn roll_back(
        &mut self,
        plan: &Plan,
        probe: &Probe,
        restart: &crate::playbook::Restart,
    ) -> StepResult<()> {
        let output = self
            .run(
                &remote::restore_dropin(&plan.dropin_path),
                self.job.command_timeout,
            )
            .await
            .map_err(|e| format!("restoring {} failed: {e}", plan.dropin_path))?;
        if output.status != 0 {
            return Err(format!(
                "restoring {} failed: {}",
                plan.dropin_path,
                output.stderr_text().trim()
            ));
        }
        self.report
            .log
            .push(format!("restored the previous {}", plan.dropin_path));
        let started = Instant::now();
        let limit = restart.deadline + Duration::from_secs(15);
        let output = self
            .run(
                &remote::restart_k3s(restart.deadline.as_secs().max(1)),
                limit,
            )
            .await
            .map_err(|e| format!("restart after restoring failed: {e}"))?;
        let tagged = remote::Tagged::parse(&output.stdout_text());
        if tagged.first("restart") != Some("0") {
            return Err(format!(
                "`systemctl restart k3s` after restoring ended with status {}",
                tagged.first("restart").unwrap_or("unknown")
            ));
        }
        // The restored files decide the issuer K3s signs with now, which can differ from the
        // one it published before the run when the files had changed since its last start.
        let restored = plan.before.issuer_list().first().cloned();
        let expected = restored.as_deref().or(probe.published_issuer.as_deref());
        self.wait_for_issuer(expected, started + restart.deadline)
            .await
            .map_err(|why| {
                format!(
                    "K3s did not come back with the previous issuer {}: {why}",
                    expected.unwrap_or("(any)")
                )
            })?;
        self.report
            .log
            .push("previous issuer is served again".into());
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

/// The result of one health check.
struct Health {
    active: bool,
    issuer: Option<String>,
    detail: String,
}

impl Health {
    fn parse(stdout: &str) -> Health {
        let tagged = remote::Tagged::parse(stdout);
        let state = tagged
            .first("active")
            .and_then(|v| v.split_once(' ').map(|(_, s)| s.to_owned()))
            .unwrap_or_default();
        let issuer = tagged
            .first("oidc")
            .and_then(|b64| probe::issuer_from_discovery(&remote::decode(b64)));
        let detail = match (&issuer, tagged.first("oidc-error")) {
            (Some(issuer), _) => format!("unit {state}, API publishes {issuer}"),
            (None, Some(error)) => {
                format!(
                    "unit {state}, API not answering: {}",
                    remote::decode(error).trim()
                )
            }
            (None, None) => format!("unit {state}, API not answering"),
        };
        Health {
            active: state == "active",
            issuer,
            detail,
        }
    }

    fn describe(&self) -> String {
        self.detail.clone()
    }
}

/// Node conditions that gate the next server's restart.
#[derive(Debug, PartialEq)]
struct NodeState {
    ready: bool,
    /// `None` when the node has no EtcdIsVoter condition (no embedded etcd).
    etcd_voter: Option<bool>,
}

/// Reads this node's conditions from `@@node NAME` and `kubectl get nodes -o json` output.
fn node_state(stdout: &str) -> Result<NodeState, String> {
    let tagged = remote::Tagged::parse(stdout);
    let name = tagged.first("node").unwrap_or("").trim().to_owned();
    let json = stdout
        .lines()
        .filter(|l| !l.starts_with("@@"))
        .collect::<Vec<_>>()
        .join("\n");
    let list: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| format!("cannot read the node list: {e}"))?;
    let items = list["items"].as_array().cloned().unwrap_or_default();
    let node = items
        .iter()
        .find(|n| n["metadata"]["name"].as_str() == Some(name.as_str()))
        .or_else(|| {
            if items.len() == 1 {
                items.first()
            } else {
                None
            }
        })
        .ok_or_else(|| format!("node `{name}` is not in the node list"))?;
    let condition = |kind: &str| {
        node["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"].as_str() == Some(kind)))
            .map(|c| c["status"].as_str() == Some("True"))
    };
    Ok(NodeState {
        ready: condition("Ready").unwrap_or(false),
        etcd_voter: condition("EtcdIsVoter"),
    })
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

    #[test]
    fn node_state_reads_conditions() {
        let list = r#"{"items":[{"metadata":{"name":"other"},"status":{"conditions":[]}},
            {"metadata":{"name":"edge-01"},"status":{"conditions":[
            {"type":"Ready","status":"True"},{"type":"EtcdIsVoter","status":"False"}]}}]}"#;
        let state = node_state(&format!("@@node edge-01\n{list}\n")).unwrap();
        assert_eq!(
            state,
            NodeState {
                ready: true,
                etcd_voter: Some(false)
            }
        );
        assert!(node_state("@@node missing\n{\"items\":[{},{}]}").is_err());
    }

    #[test]
    fn health_parse() {
        let doc = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            r#"{"issuer":"https://a/","jwks_uri":"https://a/openid/v1/jwks"}"#,
        );
        let health = Health::parse(&format!("@@active k3s active\n@@oidc {doc}\n"));
        assert!(health.active);
        assert_eq!(health.issuer.as_deref(), Some("https://a/"));
    }
}
