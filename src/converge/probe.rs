//! Reading a node's K3s state: the unit, the published issuer and the config files.

use super::remote::{self, Privilege};
use super::{Failure, Node};
use crate::k3s::config::ConfigFile;
use crate::k3s::plan::{NodeFiles, DEFAULT_CONFIG_PATH};
use crate::k3s::unit::{self, Unit};
use crate::report::Cause;

/// Standard environment files of the K3s unit, read even when the unit does not list them
/// so that a hand-edited unit is still understood.
const STANDARD_ENV_FILES: [&str; 3] = [
    "/etc/default/k3s",
    "/etc/sysconfig/k3s",
    "/etc/systemd/system/k3s.service.env",
];

/// The K3s state read from a node.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Files that shape kube-apiserver's flags.
    pub files: NodeFiles,
    /// The issuer the running API server publishes, when it responds.
    pub published_issuer: Option<String>,
    /// The error from the API server request, when it failed.
    pub api_error: Option<String>,
    /// The token minted for the playbook's verify-token step, or why minting failed;
    /// `None` without that step.
    pub token: Option<Result<remote::Minted, String>>,
}

/// Returns the files the first round trip reads, where K3s keeps them unless its unit
/// moves them: the standard environment files, the default config file and its drop-in
/// directory.
fn default_files() -> (Vec<String>, Vec<String>) {
    let mut files: Vec<String> = STANDARD_ENV_FILES.iter().map(|p| p.to_string()).collect();
    files.push(DEFAULT_CONFIG_PATH.to_owned());
    (files, vec![format!("{DEFAULT_CONFIG_PATH}.d")])
}

impl Probe {
    /// Reads the node, in one round trip when K3s keeps its files in the default places
    /// and a token minted for the verify-token step carries `issuer`. More round trips
    /// read files the unit moved, and the OIDC discovery document when the token carries
    /// another issuer, since the issuer a token carries is not always the one the API
    /// server publishes.
    pub(super) async fn read(node: &mut Node<'_>, issuer: &str) -> Result<Probe, Failure> {
        let command_failed = Failure::with(Cause::CommandFailed);
        let auth_failed = Failure::with(Cause::AuthFailed);
        let not_a_server = Failure::with(Cause::NotAServer);
        let limit = node.job.command_timeout;
        let (files, dirs) = default_files();
        let step = node.job.playbook.verify_token.clone();
        let token_request = step.as_ref().map(remote::TokenRequest::from);
        let output = node
            .run(&remote::status_probe(&files, &dirs, token_request), limit)
            .await
            .map_err(|e| command_failed(format!("probe failed: {e}")))?;
        if output.status != 0 {
            return Err(sudo_hint(&output.stderr_text(), &node.connection.privilege));
        }
        let tagged = remote::Tagged::parse(&output.stdout_text());
        if tagged.first("uid") != Some("0") {
            return Err(auth_failed(
                "commands do not run as root on the node: give the user sudo rights".into(),
            ));
        }
        let units: Vec<(String, String)> = tagged
            .all("unit")
            .iter()
            .filter_map(|v| {
                v.split_once(' ')
                    .map(|(n, b)| (n.to_owned(), remote::decode(b)))
            })
            .collect();
        let Some((_, unit_text)) = units.iter().find(|(name, _)| name == "k3s") else {
            let message = if units.iter().any(|(name, _)| name == "k3s-agent") {
                "the node runs k3s-agent, not a K3s server: set its role to agent in the inventory"
            } else {
                "no k3s.service unit on the node: is K3s installed as a server?"
            };
            return Err(not_a_server(message.to_owned()));
        };
        let unit = unit::parse_systemctl_cat(unit_text, "k3s");
        if unit.subcommand() != Some("server") {
            return Err(not_a_server(format!(
                "k3s.service runs `k3s {}`, not `k3s server`",
                unit.subcommand().unwrap_or("")
            )));
        }
        let token = remote::minted(&tagged);
        let mut published_issuer = tagged
            .first("oidc")
            .and_then(|b64| issuer_from_discovery(&remote::decode(b64)));
        let mut api_error = tagged
            .first("oidc-error")
            .map(|b64| remote::decode(b64).trim().to_owned());
        if let Some(Ok(minted)) = &token {
            match token_issuer(minted) {
                Some(signed) if signed == issuer => published_issuer = Some(signed),
                _ => (published_issuer, api_error) = read_discovery(node).await,
            }
        }

        let prefetched = remote::files(&tagged);
        let files = read_files(node, unit, prefetched)
            .await
            .map_err(command_failed)?;
        Ok(Probe {
            files,
            published_issuer,
            api_error,
            token,
        })
    }
}

/// Returns the issuer a minted token carries.
fn token_issuer(minted: &remote::Minted) -> Option<String> {
    crate::azure::oidc::decode_token(&format!("{}.", minted.claims))
        .ok()
        .map(|claims| claims.issuer)
}

/// Reads the issuer the API server publishes in its OIDC discovery document, or the
/// error the request returned.
async fn read_discovery(node: &mut Node<'_>) -> (Option<String>, Option<String>) {
    match node
        .run(&remote::health_check(), node.job.command_timeout)
        .await
    {
        Ok(output) => {
            let tagged = remote::Tagged::parse(&output.stdout_text());
            let issuer = tagged
                .first("oidc")
                .and_then(|b64| issuer_from_discovery(&remote::decode(b64)));
            let error = tagged
                .first("oidc-error")
                .map(|b64| remote::decode(b64).trim().to_owned());
            (issuer, error)
        }
        Err(error) => (
            None,
            Some(format!(
                "reading the OIDC discovery document failed: {error}"
            )),
        ),
    }
}

/// Reads environment and config files for `unit`, starting from the files the probe
/// already read in the default places.
async fn read_files(
    node: &mut Node<'_>,
    unit: Unit,
    prefetched: Vec<(String, String)>,
) -> Result<NodeFiles, String> {
    let mut env_files: Vec<String> = unit
        .environment_files
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    for standard in STANDARD_ENV_FILES {
        if !env_files.iter().any(|p| p == standard) {
            env_files.push(standard.to_owned());
        }
    }
    let mut files = NodeFiles {
        unit,
        ..NodeFiles::default()
    };
    let guess = files.config_path();
    let (default_paths, _) = default_files();
    let all_read =
        guess == DEFAULT_CONFIG_PATH && env_files.iter().all(|path| default_paths.contains(path));
    let read = if all_read {
        prefetched
    } else {
        fetch(
            node,
            env_files.iter().cloned().chain([guess.clone()]).collect(),
            vec![format!("{guess}.d")],
        )
        .await?
    };

    // Environment files apply in the unit's order; inline Environment= lines come first.
    files.environment = files.unit.environment.clone();
    for (path, _) in &files.unit.environment_files {
        if let Some((_, text)) = read.iter().find(|(p, _)| p == path) {
            files.environment.extend(unit::parse_environment_file(text));
        }
    }
    let config_path = files.config_path();
    let read = if config_path == guess {
        read
    } else {
        fetch(
            node,
            vec![config_path.clone()],
            vec![format!("{config_path}.d")],
        )
        .await?
    };
    let dropin_prefix = format!("{config_path}.d/");
    for (path, text) in read {
        if path == config_path {
            files.main = Some(ConfigFile { path, text });
        } else if path.starts_with(&dropin_prefix) {
            files.dropins.push(ConfigFile { path, text });
        }
    }
    Ok(files)
}

async fn fetch(
    node: &mut Node<'_>,
    paths: Vec<String>,
    dirs: Vec<String>,
) -> Result<Vec<(String, String)>, String> {
    let output = node
        .run(&remote::read_files(&paths, &dirs), node.job.command_timeout)
        .await
        .map_err(|e| format!("reading K3s files failed: {e}"))?;
    if output.status != 0 {
        return Err(format!(
            "reading K3s files failed: {}",
            output.stderr_text().trim()
        ));
    }
    Ok(remote::files(&remote::Tagged::parse(&output.stdout_text())))
}

/// Returns the `issuer` of an OIDC discovery document.
pub(super) fn issuer_from_discovery(document: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(document).ok()?;
    value["issuer"].as_str().map(str::to_owned)
}

fn sudo_hint(stderr: &str, privilege: &Privilege) -> Failure {
    let stderr = stderr.trim();
    let asks_password =
        stderr.contains("password is required") || stderr.contains("a terminal is required");
    let auth_failed = Failure::with(Cause::AuthFailed);
    match privilege {
        Privilege::Sudo if asks_password => auth_failed(format!(
            "sudo asks for a password ({stderr}): give the user passwordless sudo, or pass \
             --sudo-password-file or --sudo-password-env"
        )),
        Privilege::SudoPassword(_)
            if stderr.contains("incorrect password") || stderr.contains("Sorry, try again") =>
        {
            auth_failed(
                "sudo rejected the password given with --sudo-password-file or \
                 --sudo-password-env: check it for this user"
                    .to_owned(),
            )
        }
        _ => Failure::with(Cause::CommandFailed)(format!("probe failed: {stderr}")),
    }
}
