//! Playbooks: the built-in convergence steps a run performs and their parameters.
//!
//! A playbook lists steps by name, in the order they run, each with optional parameters.
//! The steps are built in; a playbook chooses which run and tunes them. Unknown steps,
//! unknown parameters and invalid values are rejected with `file:line`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::k3s::duration::parse_go_duration;
use crate::yaml::{self, Node, Value};

/// The default playbook, shipped as `playbooks/k3s-oidc-issuer.yaml`.
pub const DEFAULT_PLAYBOOK: &str = include_str!("../playbooks/k3s-oidc-issuer.yaml");

/// Steps in the only order they can run.
const STEP_ORDER: [&str; 5] = [
    "probe",
    "configure-apiserver",
    "restart-k3s",
    "verify-token",
    "restart-secret-sync",
];

/// A loaded playbook.
#[derive(Debug, Clone, PartialEq)]
pub struct Playbook {
    /// The playbook's name.
    pub name: String,
    /// The file it was loaded from (`None`: the built-in default).
    pub source: Option<PathBuf>,
    /// Parameters of `configure-apiserver`.
    pub configure: Configure,
    /// Parameters of `restart-k3s`; `None` when the step is left out.
    pub restart: Option<Restart>,
    /// Parameters of `restart-secret-sync`; `None` when the step is left out.
    pub secret_sync: Option<SecretSync>,
    /// Parameters of `verify-token`; `None` when the step is left out.
    pub verify_token: Option<VerifyToken>,
    /// The rollout plan; command-line options override each field.
    pub rollout: Rollout,
}

/// The playbook's `rollout:` section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rollout {
    /// Label whose values name the waves (default `wave`).
    pub label: Option<String>,
    /// Wave names in order.
    pub waves: Vec<String>,
    /// Batch ramp inside a wave, such as `1, 5, 20%`.
    pub batch: Option<String>,
    /// Failure budget per wave, in percent.
    pub max_fail_percent: Option<f64>,
    /// Pause between waves.
    pub pause_between_waves: Option<Duration>,
    /// Whether later waves run after a wave exceeded its budget.
    pub continue_past_failed_waves: bool,
}

/// Parameters of `configure-apiserver`.
#[derive(Debug, Clone, PartialEq)]
pub struct Configure {
    /// `service-account-max-token-expiration`, as a Go duration.
    pub max_token_expiration: String,
    /// Whether earlier issuers stay accepted after the Arc issuer.
    pub keep_previous_issuers: bool,
}

/// Parameters of `restart-k3s`.
#[derive(Debug, Clone, PartialEq)]
pub struct Restart {
    /// Bound on the restart and the new issuer appearing.
    pub deadline: Duration,
    /// How long K3s must stay healthy after the new issuer appears.
    pub stability_window: Duration,
}

/// Parameters of `verify-token`.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyToken {
    /// Namespace of the service account the token is minted for.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The token's audience.
    pub audience: String,
}

/// Parameters of `restart-secret-sync`.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretSync {
    /// Namespace of the Secret Store Extension's deployments.
    pub namespace: String,
    /// Bound on each deployment's rollout.
    pub rollout_timeout: Duration,
}

/// A playbook that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PlaybookError {
    /// The file could not be read.
    #[error("cannot read playbook {}: {source}", path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is invalid.
    #[error("{}:{line}: {message}", path.display())]
    Invalid {
        /// The path.
        path: PathBuf,
        /// The line.
        line: usize,
        /// The problem.
        message: String,
    },
}

impl Playbook {
    /// Loads a playbook file.
    pub fn load(path: &Path) -> Result<Playbook, PlaybookError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlaybookError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut playbook = Self::parse(&text, path)?;
        playbook.source = Some(path.to_owned());
        Ok(playbook)
    }

    /// Returns the built-in default playbook.
    pub fn builtin() -> Playbook {
        // The built-in text is checked by a unit test, so parsing it cannot fail here.
        Self::parse(
            DEFAULT_PLAYBOOK,
            Path::new("playbooks/k3s-oidc-issuer.yaml"),
        )
        .unwrap_or_else(|error| unreachable!("built-in playbook is invalid: {error}"))
    }

    /// Parses playbook text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Playbook, PlaybookError> {
        let fail = |line: usize, message: String| PlaybookError::Invalid {
            path: path.to_owned(),
            line,
            message,
        };
        let root = yaml::parse(text)
            .map_err(|e| fail(e.line, format!("invalid YAML: {}", e.message)))?
            .ok_or_else(|| fail(1, "the playbook is empty: add `steps:`".to_owned()))?;
        let Value::Map(entries) = &root.value else {
            return Err(fail(
                root.line,
                "the playbook must be a mapping with `steps:`".into(),
            ));
        };

        let mut name = String::from("unnamed");
        let mut steps_node = None;
        let mut rollout = Rollout::default();
        for (key, value) in entries {
            match key.as_scalar().unwrap_or("") {
                "name" => name = value.as_scalar().unwrap_or("").to_owned(),
                "description" => {}
                "steps" => steps_node = Some(value),
                "rollout" => rollout = parse_rollout(value, path)?,
                other => {
                    return Err(fail(
                        key.line,
                        format!(
                            "unknown field `{other}`: expected name, description, steps or rollout"
                        ),
                    ))
                }
            }
        }
        let steps_node =
            steps_node.ok_or_else(|| fail(root.line, "missing field `steps`".to_owned()))?;
        let Value::Seq(steps) = &steps_node.value else {
            return Err(fail(
                steps_node.line,
                "field `steps` must be a list".to_owned(),
            ));
        };

        let mut playbook = Playbook {
            name,
            source: None,
            configure: Configure {
                max_token_expiration: "24h".to_owned(),
                keep_previous_issuers: true,
            },
            restart: None,
            secret_sync: None,
            verify_token: None,
            rollout,
        };
        let mut seen: Vec<&str> = Vec::new();
        for step in steps {
            let (step_name, params) = step_parts(step).map_err(|m| fail(step.line, m))?;
            let position = STEP_ORDER
                .iter()
                .position(|s| *s == step_name)
                .ok_or_else(|| {
                    fail(
                        step.line,
                        format!(
                            "unknown step `{step_name}`: expected one of {}",
                            STEP_ORDER.join(", ")
                        ),
                    )
                })?;
            if let Some(later) = seen
                .iter()
                .find(|s| STEP_ORDER.iter().position(|o| o == *s).unwrap_or(0) >= position)
            {
                return Err(fail(
                    step.line,
                    if *later == STEP_ORDER[position] {
                        format!("step `{step_name}` appears twice: list each step once")
                    } else {
                        format!("step `{step_name}` must come before `{later}`")
                    },
                ));
            }
            seen.push(STEP_ORDER[position]);
            let params = Params {
                entries: params,
                path,
                step: step_name,
            };
            match step_name {
                "probe" => params.expect_only(&[])?,
                "configure-apiserver" => {
                    params.expect_only(&["max_token_expiration", "keep_previous_issuers"])?;
                    if let Some((value, line)) = params.get("max_token_expiration") {
                        if parse_go_duration(value).is_none_or(|d| d < Duration::from_secs(3600)) {
                            return Err(fail(
                                line,
                                format!(
                                    "invalid max_token_expiration `{value}`: expected a Go \
                                     duration of at least 1h, such as `24h`"
                                ),
                            ));
                        }
                        playbook.configure.max_token_expiration = value.to_owned();
                    }
                    if let Some(keep) = params.bool("keep_previous_issuers")? {
                        playbook.configure.keep_previous_issuers = keep;
                    }
                }
                "restart-k3s" => {
                    params.expect_only(&["deadline", "stability_window"])?;
                    playbook.restart = Some(Restart {
                        deadline: params
                            .duration("deadline")?
                            .unwrap_or(Duration::from_secs(180)),
                        stability_window: params
                            .duration("stability_window")?
                            .unwrap_or(Duration::from_secs(15)),
                    });
                }
                "verify-token" => {
                    params.expect_only(&["namespace", "service_account", "audience"])?;
                    let text = |name: &str, default: &str| -> Result<String, PlaybookError> {
                        match params.get(name) {
                            Some((value, line)) => {
                                check_namespace(value)
                                    .map_err(|m| fail(line, format!("{name}: {m}")))?;
                                Ok(value.to_owned())
                            }
                            None => Ok(default.to_owned()),
                        }
                    };
                    let audience = params
                        .get("audience")
                        .map_or("api://AzureADTokenExchange", |(value, _)| value)
                        .to_owned();
                    playbook.verify_token = Some(VerifyToken {
                        namespace: text("namespace", "azure-secret-store")?,
                        service_account: text("service_account", "secret-sync-controller")?,
                        audience,
                    });
                }
                "restart-secret-sync" => {
                    params.expect_only(&["namespace", "rollout_timeout"])?;
                    let namespace = match params.get("namespace") {
                        Some((value, line)) => {
                            check_namespace(value).map_err(|m| fail(line, m))?;
                            value.to_owned()
                        }
                        None => "azure-secret-store".to_owned(),
                    };
                    playbook.secret_sync = Some(SecretSync {
                        namespace,
                        rollout_timeout: params
                            .duration("rollout_timeout")?
                            .unwrap_or(Duration::from_secs(120)),
                    });
                }
                _ => {}
            }
        }
        for required in ["probe", "configure-apiserver"] {
            if !seen.contains(&required) {
                return Err(fail(
                    steps_node.line,
                    format!("step `{required}` is required"),
                ));
            }
        }
        Ok(playbook)
    }
}

/// One `key: value` entry of a YAML mapping.
type Entry = (Node, Node);

/// Parses the `rollout:` section.
fn parse_rollout(node: &Node, path: &Path) -> Result<Rollout, PlaybookError> {
    let Value::Map(entries) = &node.value else {
        return Err(PlaybookError::Invalid {
            path: path.to_owned(),
            line: node.line,
            message: "field `rollout` must be a mapping".to_owned(),
        });
    };
    let params = Params {
        entries,
        path,
        step: "rollout",
    };
    params.expect_only(&[
        "label",
        "waves",
        "batch",
        "max_fail_percent",
        "pause_between_waves",
        "continue_past_failed_waves",
    ])?;
    let mut rollout = Rollout {
        label: params.get("label").map(|(value, _)| value.to_owned()),
        batch: params.get("batch").map(|(value, _)| value.to_owned()),
        pause_between_waves: params.duration("pause_between_waves")?,
        continue_past_failed_waves: params.bool("continue_past_failed_waves")?.unwrap_or(false),
        ..Rollout::default()
    };
    if let Some((value, line)) = params.get("batch") {
        crate::rollout::waves::parse_batches(value).map_err(|m| params.fail(line, m))?;
    }
    if let Some((value, line)) = params.get("max_fail_percent") {
        rollout.max_fail_percent = Some(parse_percent(value).map_err(|m| params.fail(line, m))?);
    }
    if let Some((_, value)) = entries
        .iter()
        .rev()
        .find(|(k, _)| k.as_scalar() == Some("waves"))
    {
        let Value::Seq(items) = &value.value else {
            return Err(params.fail(
                value.line,
                "`waves` must be a list of wave names".to_owned(),
            ));
        };
        rollout.waves = items
            .iter()
            .filter_map(|item| item.as_scalar().map(str::to_owned))
            .collect();
    }
    Ok(rollout)
}

/// Parses a failure budget such as `10` or `10%`.
pub fn parse_percent(text: &str) -> Result<f64, String> {
    match text.trim().trim_end_matches('%').parse::<f64>() {
        Ok(value) if (0.0..=100.0).contains(&value) => Ok(value),
        _ => Err(format!(
            "invalid max_fail_percent `{text}`: expected a number from 0 to 100"
        )),
    }
}

/// Splits a step into its name and parameter entries: `- name` or `- name: {params}`.
fn step_parts(step: &Node) -> Result<(&str, &[Entry]), String> {
    match &step.value {
        Value::Scalar { text, .. } => Ok((text.as_str(), &[])),
        Value::Map(entries) if entries.len() == 1 => {
            let (key, value) = &entries[0];
            let name = key.as_scalar().unwrap_or("");
            match &value.value {
                Value::Map(params) => Ok((name, params.as_slice())),
                _ if value.is_null() => Ok((name, &[])),
                _ => Err(format!("parameters of step `{name}` must be a mapping")),
            }
        }
        _ => Err("a step is a name, or a name with a mapping of parameters".to_owned()),
    }
}

/// A step's parameters, for typed access with errors at the right line.
struct Params<'a> {
    entries: &'a [Entry],
    path: &'a Path,
    step: &'a str,
}

impl Params<'_> {
    fn fail(&self, line: usize, message: String) -> PlaybookError {
        PlaybookError::Invalid {
            path: self.path.to_owned(),
            line,
            message: format!("step `{}`: {message}", self.step),
        }
    }

    fn expect_only(&self, allowed: &[&str]) -> Result<(), PlaybookError> {
        for (key, _) in self.entries {
            let name = key.as_scalar().unwrap_or("");
            if !allowed.contains(&name) {
                let expected = if allowed.is_empty() {
                    "this step takes no parameters".to_owned()
                } else {
                    format!("expected one of {}", allowed.join(", "))
                };
                return Err(self.fail(key.line, format!("unknown parameter `{name}`: {expected}")));
            }
        }
        Ok(())
    }

    fn get(&self, name: &str) -> Option<(&str, usize)> {
        self.entries
            .iter()
            .rev()
            .find(|(key, _)| key.as_scalar() == Some(name))
            .map(|(_, value)| (value.as_scalar().unwrap_or(""), value.line))
    }

    fn duration(&self, name: &str) -> Result<Option<Duration>, PlaybookError> {
        let Some((value, line)) = self.get(name) else {
            return Ok(None);
        };
        humantime::parse_duration(value).map(Some).map_err(|_| {
            self.fail(
                line,
                format!("invalid {name} `{value}`: expected a duration such as `90s` or `3m`"),
            )
        })
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, PlaybookError> {
        match self.get(name) {
            None => Ok(None),
            Some(("true", _)) => Ok(Some(true)),
            Some(("false", _)) => Ok(Some(false)),
            Some((value, line)) => Err(self.fail(
                line,
                format!("invalid {name} `{value}`: expected true or false"),
            )),
        }
    }
}

/// Checks a Kubernetes namespace name (RFC 1123 label).
fn check_namespace(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid namespace `{}`: expected lowercase letters, digits and `-`",
            name.escape_debug()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Playbook, PlaybookError> {
        Playbook::parse(text, Path::new("p.yaml"))
    }

    #[test]
    fn builtin_playbook_parses() {
        let playbook = Playbook::builtin();
        assert_eq!(playbook.name, "k3s-oidc-issuer");
        assert_eq!(playbook.configure.max_token_expiration, "24h");
        assert!(playbook.configure.keep_previous_issuers);
        assert_eq!(
            playbook.restart.as_ref().unwrap().deadline,
            Duration::from_secs(180)
        );
        assert_eq!(
            playbook.secret_sync.as_ref().unwrap().namespace,
            "azure-secret-store"
        );
    }

    #[test]
    fn unknown_step_names_line() {
        let error = parse("steps:\n  - probe\n  - reboot\n")
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("p.yaml:3:"), "{error}");
        assert!(error.contains("unknown step `reboot`"), "{error}");
    }

    #[test]
    fn unknown_parameter_names_line() {
        let text = "steps:\n  - probe\n  - configure-apiserver:\n      max_token_expiry: 24h\n";
        let error = parse(text).unwrap_err().to_string();
        assert!(error.starts_with("p.yaml:4:"), "{error}");
        assert!(
            error.contains("unknown parameter `max_token_expiry`"),
            "{error}"
        );
    }

    #[test]
    fn steps_out_of_order_are_rejected() {
        let text = "steps:\n  - configure-apiserver\n  - probe\n";
        let error = parse(text).unwrap_err().to_string();
        assert!(error.contains("must come before"), "{error}");
    }

    #[test]
    fn short_token_lifetime_is_rejected() {
        let text = "steps:\n  - probe\n  - configure-apiserver:\n      max_token_expiration: 30m\n";
        let error = parse(text).unwrap_err().to_string();
        assert!(error.contains("at least 1h"), "{error}");
    }

    #[test]
    fn left_out_steps_are_none() {
        let playbook = parse("steps:\n  - probe\n  - configure-apiserver\n").unwrap();
        assert_eq!(playbook.restart, None);
        assert_eq!(playbook.secret_sync, None);
    }

    #[test]
    fn rollout_section_parses() {
        let text =
            "rollout:\n  waves: [canary, rest]\n  batch: 1, 5, 20%\n  max_fail_percent: 10\n  \
                    pause_between_waves: 5m\nsteps:\n  - probe\n  - configure-apiserver\n";
        let playbook = parse(text).unwrap();
        assert_eq!(playbook.rollout.waves, vec!["canary", "rest"]);
        assert_eq!(playbook.rollout.batch.as_deref(), Some("1, 5, 20%"));
        assert_eq!(playbook.rollout.max_fail_percent, Some(10.0));
        assert_eq!(
            playbook.rollout.pause_between_waves,
            Some(Duration::from_secs(300))
        );
    }

    #[test]
    fn rollout_bad_batch_names_line() {
        let text = "rollout:\n  batch: 0, 5\nsteps:\n  - probe\n  - configure-apiserver\n";
        let error = parse(text).unwrap_err().to_string();
        assert!(error.starts_with("p.yaml:2:"), "{error}");
    }

    #[test]
    fn bad_duration_is_rejected() {
        let text =
            "steps:\n  - probe\n  - configure-apiserver\n  - restart-k3s:\n      deadline: soon\n";
        let error = parse(text).unwrap_err().to_string();
        assert!(error.starts_with("p.yaml:5:"), "{error}");
    }
}
