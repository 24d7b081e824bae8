//! Restarting K3s within a deadline, waiting for the issuer, and rolling back.
//!
//! A restart is never repeated blindly. When the connection drops while
//! `systemctl restart k3s` runs (sshd restarted with the node, a flaky link, a jump host
//! that went away), arcfleet reconnects and reads the unit's state, main PID and start
//! time. If they changed, K3s is restarting or has restarted, and arcfleet goes on waiting
//! for the issuer. Only when they stay exactly as before the restart, for
//! [`UNCHANGED_READS`] reads a second apart, did the command never reach the node, and
//! arcfleet runs it then, once.

use std::time::{Duration, Instant};

use super::probe::{self, Probe};
use super::{remote, Failure, Node, StepResult};
use crate::k3s::plan::Plan;
use crate::playbook::Restart;
use crate::report::Cause;
use crate::ssh::Output;

/// Reads of an unchanged K3s unit, one second apart, after which a restart whose command
/// was lost with the connection counts as never started. systemd moves the unit to
/// `deactivating` as soon as the restart job exists, so a started restart shows at once.
const UNCHANGED_READS: usize = 3;

/// Attempts of the health check after the stability window when SSH, not K3s, fails.
const HEALTH_ATTEMPTS: usize = 3;

/// The identity of the K3s process at one moment (state, main PID, start time), with the
/// node clock.
#[derive(Debug, Clone, PartialEq)]
struct UnitMarker {
    /// Node clock, Unix seconds, for reading the journal from there.
    since: String,
    /// `ActiveState=... SubState=... ExecMainPID=... ExecMainStartTimestamp=...`.
    unit: String,
}

impl UnitMarker {
    fn parse(stdout: &str) -> UnitMarker {
        let tagged = remote::Tagged::parse(stdout);
        UnitMarker {
            since: tagged.first("since").unwrap_or("").to_owned(),
            unit: tagged.first("unit").unwrap_or("").trim().to_owned(),
        }
    }

    fn is_active(&self) -> bool {
        self.unit
            .split_whitespace()
            .any(|p| p == "ActiveState=active")
    }
}

impl Node<'_> {
    /// Restarts K3s and waits for `issuer`; on failure rolls back and returns why.
    /// `wrote` is whether this run wrote the drop-in. When it did not, nothing of this run's
    /// needs rolling back, and the saved version is an earlier run's.
    pub(super) async fn restart_and_verify(
        &mut self,
        plan: &Plan,
        wrote: bool,
        issuer: &str,
        probe: &Probe,
        restart: &Restart,
    ) -> Result<(), Failure> {
        let (since, why) = match self.restart_until(issuer, restart).await {
            Ok(()) => return Ok(()),
            Err(failed) => failed,
        };
        self.report.log.push(format!("restart failed: {why}"));
        let journal = self.journal(&since).await;
        let restarted = self.report.k3s_restarted;
        let (cause, note) = match (wrote, restarted) {
            (true, true) => match self.roll_back(plan, probe, restart).await {
                Ok(()) => (
                    Cause::RestartFailedRolledBack,
                    "rolled back to the previous configuration".to_owned(),
                ),
                Err(error) => (
                    Cause::RollbackFailed,
                    format!("ROLLBACK FAILED, the node needs attention: {error}"),
                ),
            },
            (true, false) => match self.restore_file(plan).await {
                Ok(()) => (
                    Cause::RestartFailedRolledBack,
                    "K3s was not restarted and still runs its previous configuration; restored \
                     the previous drop-in"
                        .to_owned(),
                ),
                Err(error) => (
                    Cause::RollbackFailed,
                    format!(
                        "ROLLBACK FAILED, the node needs attention: K3s was not restarted, but \
                         {error}"
                    ),
                ),
            },
            (false, _) => {
                let published = self.published_issuer().await;
                let cause = match (restarted, &published) {
                    (true, None) => Cause::RollbackFailed,
                    (false, _) => Cause::CommandFailed,
                    (true, Some(_)) => Cause::IssuerNotEffective,
                };
                let state = match &published {
                    Some(issuer) => format!("K3s publishes {issuer}"),
                    None => "K3s does not answer, the node needs attention".to_owned(),
                };
                (
                    cause,
                    format!(
                        "arcfleet wrote nothing in this run, so there is nothing to roll back; \
                         {state}"
                    ),
                )
            }
        };
        self.report.rolled_back = matches!(cause, Cause::RestartFailedRolledBack);
        if self.report.rolled_back {
            self.report.issuers_after = plan.before.issuer_list();
        }
        self.report.effective_issuer = self.published_issuer().await.unwrap_or_default();
        Err(Failure {
            cause,
            message: format!(
                "K3s did not come up with the Arc issuer: {why}; {note}. K3s journal:\n{journal}"
            ),
        })
    }

    /// Restarts K3s and waits until it publishes `issuer` and stays healthy. On failure
    /// returns the node clock before the restart and why it failed.
    async fn restart_until(
        &mut self,
        issuer: &str,
        restart: &Restart,
    ) -> Result<(), (String, String)> {
        let deadline = Instant::now() + restart.deadline;
        // A failed read drops a lost connection, so the second attempt reconnects.
        let before = match self.unit_marker().await {
            Ok(before) => before,
            Err(_) => self
                .unit_marker()
                .await
                .map_err(|why| (String::new(), why))?,
        };
        let since = before.since.clone();
        self.restart_once(restart, &before, deadline)
            .await
            .map_err(|why| (since.clone(), why))?;
        self.report.log.push("restarted k3s".into());

        self.wait_for_issuer(Some(issuer), deadline)
            .await
            .map_err(|why| (since.clone(), why))?;
        if restart.stability_window.is_zero() {
            // With a zero window, the poll that saw the Arc issuer is the last check.
            self.report.effective_issuer = issuer.to_owned();
            self.report
                .log
                .push("API server publishes the Arc issuer".into());
            return Ok(());
        }
        tokio::time::sleep(restart.stability_window).await;
        let mut health = self.health().await;
        for _ in 1..HEALTH_ATTEMPTS {
            if health.reachable {
                break;
            }
            // The check itself failed, not K3s: ask again over a new connection.
            tokio::time::sleep(Duration::from_secs(1)).await;
            health = self.health().await;
        }
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

    async fn unit_marker(&mut self) -> StepResult<UnitMarker> {
        let output = self
            .run(&remote::unit_marker(), self.job.command_timeout)
            .await
            .map_err(|e| format!("reading the K3s unit state failed: {e}"))?;
        Ok(UnitMarker::parse(&output.stdout_text()))
    }

    /// Runs `systemctl restart k3s` once, bounded by the playbook's deadline. `before` is
    /// the unit as it was before, for telling after a dropped connection whether the
    /// restart happened.
    async fn restart_once(
        &mut self,
        restart: &Restart,
        before: &UnitMarker,
        deadline: Instant,
    ) -> StepResult<()> {
        let deadline_seconds = restart.deadline.as_secs().max(1);
        let limit = restart.deadline + Duration::from_secs(15);
        let command = remote::restart_k3s(deadline_seconds);
        match self.run(&command, limit).await {
            Ok(output) => {
                self.report.k3s_restarted = true;
                restart_status(&output, deadline_seconds)
            }
            Err(error) if error.is_connection_lost() => {
                self.report.log.push(format!(
                    "the connection dropped during `systemctl restart k3s` ({error}); \
                     reconnecting to read the unit state before deciding anything"
                ));
                let began = self.restart_began(before, deadline).await.map_err(|why| {
                    // The restart may have run: roll back as if it had.
                    self.report.k3s_restarted = true;
                    format!("whether K3s restarted is unknown: {why}")
                })?;
                if began {
                    self.report.k3s_restarted = true;
                    self.report.log.push(
                        "K3s restarted or is restarting: waiting for it instead of \
                         restarting again"
                            .into(),
                    );
                    return Ok(());
                }
                self.report.log.push(format!(
                    "K3s runs the same process as before ({}): the restart never reached the \
                     node, so arcfleet runs it now",
                    before.unit
                ));
                let output = self
                    .run(&command, limit)
                    .await
                    .map_err(|e| format!("restart command failed: {e}"))?;
                self.report.k3s_restarted = true;
                restart_status(&output, deadline_seconds)
            }
            Err(error) => {
                // The command was sent and may have restarted K3s before it failed.
                self.report.k3s_restarted = true;
                Err(format!("restart command failed: {error}"))
            }
        }
    }

    /// Reconnects and reads the unit until it differs from `before` (the restart began)
    /// or stays the same for [`UNCHANGED_READS`] reads (it did not).
    async fn restart_began(&mut self, before: &UnitMarker, deadline: Instant) -> StepResult<bool> {
        let mut unchanged = 0;
        loop {
            match self.unit_marker().await {
                Ok(now) if now.unit != before.unit || (before.is_active() && !now.is_active()) => {
                    self.report
                        .log
                        .push(format!("unit after reconnecting: {}", now.unit));
                    return Ok(true);
                }
                Ok(_) => {
                    unchanged += 1;
                    if unchanged >= UNCHANGED_READS {
                        return Ok(false);
                    }
                }
                Err(why) if Instant::now() >= deadline => {
                    return Err(format!(
                        "the node did not answer again before the deadline after the \
                         connection dropped: {why}"
                    ))
                }
                Err(why) => tracing::debug!(%why, "node not reachable yet after the drop"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Polls until K3s is active and publishes `issuer` (or any issuer, for `None`). A
    /// dropped connection only costs a poll: the next one reconnects.
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
                reachable: false,
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

    /// Waits until the node is Ready and, on an embedded-etcd server, its etcd member votes
    /// again (condition EtcdIsVoter), so that the next server of the cluster may restart.
    pub(super) async fn wait_node_ready(
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

    /// Puts the drop-in back as it was before this run's write.
    async fn restore_file(&mut self, plan: &Plan) -> StepResult<()> {
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
        Ok(())
    }

    async fn roll_back(&mut self, plan: &Plan, probe: &Probe, restart: &Restart) -> StepResult<()> {
        self.restore_file(plan).await?;
        let deadline = Instant::now() + restart.deadline;
        let before = self.unit_marker().await?;
        self.restart_once(restart, &before, deadline)
            .await
            .map_err(|why| format!("restart after restoring failed: {why}"))?;
        // The restored files decide the issuer K3s signs with now, which can differ from the
        // one it published before the run when the files had changed since its last start.
        let restored = plan.before.issuer_list().first().cloned();
        let expected = restored.as_deref().or(probe.published_issuer.as_deref());
        self.wait_for_issuer(expected, deadline)
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
}

/// Reads the exit status the restart script printed.
fn restart_status(output: &Output, deadline_seconds: u64) -> StepResult<()> {
    let tagged = remote::Tagged::parse(&output.stdout_text());
    match tagged.first("restart") {
        Some("0") => Ok(()),
        Some("124") | Some("137") => Err(format!(
            "`systemctl restart k3s` did not finish within {deadline_seconds}s"
        )),
        Some(code) => Err(format!(
            "`systemctl restart k3s` failed with exit status {code}"
        )),
        None => Err("the restart command printed no status".to_owned()),
    }
}

/// The result of one health check.
struct Health {
    /// Whether the check ran on the node; `false` when SSH failed.
    reachable: bool,
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
            reachable: true,
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn unit_marker_parse() {
        let marker = UnitMarker::parse(
            "@@since 1700000000\n@@unit ActiveState=active SubState=running ExecMainPID=42 \n",
        );
        assert_eq!(marker.since, "1700000000");
        assert!(marker.is_active());
        assert_eq!(
            marker.unit,
            "ActiveState=active SubState=running ExecMainPID=42"
        );
        assert!(!UnitMarker::parse("@@unit ActiveState=activating\n").is_active());
    }

    #[test]
    fn restart_status_codes() {
        let output = |text: &str| Output {
            stdout: text.as_bytes().to_vec(),
            ..Output::default()
        };
        assert!(restart_status(&output("@@restart 0\n"), 30).is_ok());
        assert!(restart_status(&output("@@restart 124\n"), 30)
            .unwrap_err()
            .contains("within 30s"));
        assert!(restart_status(&output("@@restart 1\n"), 30)
            .unwrap_err()
            .contains("exit status 1"));
        assert!(restart_status(&output(""), 30).is_err());
    }
}
