//! The command line: argument definitions and the run they start.
//!
//! A run reads as its steps: load the inventory and playbook, check the SSH and Azure
//! settings, resolve the issuers, converge the devices, write the reports, and choose the
//! exit status.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::azure::credential::{self, AuthMethod};
use crate::azure::{self, issuer::check_endpoint, AzureSettings, ClusterProblem, Resolution};
use crate::converge::{Job, Mode};
use crate::fleet::{self, Progress, DEFAULT_CONCURRENCY};
use crate::inventory::{self, Inventory, LoadOptions, Role};
use crate::playbook::Playbook;
use crate::report::{self, DeviceReport, JsonReport, Totals};
use crate::secret::{Secret, SecretSource};
use crate::ssh::auth::{KeyStore, Passphrase};
use crate::ssh::host_keys::HostKeyStore;
use crate::ssh::ssh_config::SshConfig;
use crate::ssh::target::{self, Fallbacks, Request};
use crate::ssh::tokens::TokenValues;
use crate::ssh::{Dialer, Target};

/// Interval between keepalives when ssh_config sets no ServerAliveInterval. With
/// [`DEFAULT_KEEPALIVE_MAX`], a dead peer is noticed within about 45 s.
const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// Unanswered keepalives before a connection counts as dead, when ssh_config sets no
/// ServerAliveCountMax.
const DEFAULT_KEEPALIVE_MAX: usize = 3;

/// Named exit statuses. docs/exit-codes.md documents them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Every server is compliant at the end (for a check: nothing would change).
    Compliant = 0,
    /// An unexpected internal error.
    Internal = 1,
    /// Invalid input or configuration: inventory, playbook, options.
    InvalidInput = 2,
    /// At least one device failed or is not compliant.
    DevicesFailed = 3,
    /// Azure authentication failed, so no issuer could be resolved.
    AzureAuthFailed = 4,
}

/// Converge Azure Arc-connected K3s servers on their cluster's Arc OIDC issuer.
#[derive(Debug, Parser)]
#[command(name = "arcfleet", version, about, long_about = None)]
pub struct Cli {
    /// More log output on stderr (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Configure each K3s server's issuer, restart K3s, verify and report.
    Converge {
        /// Show what would change (with a diff) and change nothing.
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Report compliance with the same probe as converge, changing nothing.
    Audit {
        #[command(flatten)]
        run: RunArgs,
    },
}

/// Options shared by converge and audit.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Inventory file: arcfleet YAML (.yaml/.yml), CSV (.csv) or an Ansible inventory
    /// (YAML, or INI: .ini or no extension).
    #[arg(long, short = 'i', value_name = "FILE")]
    pub inventory: PathBuf,

    /// Inventory format; `auto` decides by extension and content.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "auto")]
    pub inventory_format: inventory::Format,

    /// Playbook file; the built-in playbooks/k3s-oidc-issuer.yaml when not given.
    #[arg(long, value_name = "FILE")]
    pub playbook: Option<PathBuf>,

    /// Write the CSV compliance report here.
    #[arg(long, value_name = "FILE")]
    pub report_csv: Option<PathBuf>,

    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub report_json: Option<PathBuf>,

    /// SSH user when neither the inventory nor ssh_config sets one [default: the local
    /// user].
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Private key when neither the inventory nor ssh_config names one [default:
    /// ~/.ssh/id_ed25519, id_ecdsa and id_rsa, those that exist]. ssh-agent keys
    /// (SSH_AUTH_SOCK) are tried too.
    #[arg(long, value_name = "FILE")]
    pub identity: Option<String>,

    /// File holding the passphrase of encrypted private keys (one line).
    #[arg(long, value_name = "FILE", conflicts_with = "identity_passphrase_env")]
    pub identity_passphrase_file: Option<PathBuf>,

    /// Environment variable holding the passphrase of encrypted private keys.
    #[arg(long, value_name = "NAME")]
    pub identity_passphrase_env: Option<String>,

    /// OpenSSH client configuration to read, or `none` [default: ~/.ssh/config if it
    /// exists]. The inventory's fields win over it, and it wins over --user, --identity,
    /// --known-hosts, --connect-timeout and --accept-new-host-keys.
    #[arg(long, value_name = "FILE|none")]
    pub ssh_config: Option<String>,

    /// known_hosts file that host keys are checked against when ssh_config sets no
    /// UserKnownHostsFile; unknown or changed keys fail the device.
    #[arg(long, value_name = "FILE", default_value = "~/.ssh/known_hosts")]
    pub known_hosts: String,

    /// Record the keys of hosts that known_hosts does not list yet (as OpenSSH's
    /// StrictHostKeyChecking accept-new); changed and revoked keys still fail the device.
    #[arg(long)]
    pub accept_new_host_keys: bool,

    /// File holding the sudo password of non-root users (one line), for devices where sudo
    /// requires one. It is sent on stdin, never on a command line.
    #[arg(long, value_name = "FILE", conflicts_with = "sudo_password_env")]
    pub sudo_password_file: Option<PathBuf>,

    /// Environment variable holding the sudo password of non-root users.
    #[arg(long, value_name = "NAME")]
    pub sudo_password_env: Option<String>,

    /// Devices worked on at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONCURRENCY)]
    pub concurrency: usize,

    /// Bound on connecting and authenticating to one device (or jump host) when ssh_config
    /// sets no ConnectTimeout.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Bound on each remote command other than restarts and rollouts.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub command_timeout: Duration,

    /// Azure Resource Manager endpoint.
    #[arg(long, value_name = "URL", env = "ARCFLEET_ARM_ENDPOINT", default_value = azure::PUBLIC_ARM_ENDPOINT)]
    pub arm_endpoint: String,

    /// Azure credential; `auto` tries the client secret, workload identity and the Azure
    /// CLI in that order and never managed identity.
    #[arg(long, value_enum, value_name = "METHOD", default_value = "auto")]
    pub azure_auth: AuthMethod,

    /// Print no progress; only the summary and errors.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// An error that ends the run before any device is touched.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SetupError {
    message: String,
    exit: Exit,
}

impl SetupError {
    fn invalid(message: impl Into<String>) -> Self {
        SetupError {
            message: message.into(),
            exit: Exit::InvalidInput,
        }
    }

    /// Returns the exit status for this error.
    pub fn exit(&self) -> Exit {
        self.exit
    }
}

/// Runs a parsed command line and returns the exit status.
pub async fn run(cli: Cli) -> Result<Exit, SetupError> {
    let (mode, args) = match cli.command {
        Command::Converge { check: false, run } => (Mode::Converge, run),
        Command::Converge { check: true, run } => (Mode::Check, run),
        Command::Audit { run } => (Mode::Audit, run),
    };
    let inventory = load_inventory(&args)?;
    match prepare_and_run(mode, &args, &inventory).await {
        Ok(exit) => Ok(exit),
        Err(error) => {
            // The inventory loaded, so every device still gets a report row, with the
            // reason nothing was done to it.
            let reports: Vec<DeviceReport> = inventory
                .devices
                .iter()
                .map(|device| DeviceReport::new(device).fail(error.to_string()))
                .collect();
            write_reports(mode, &args, &reports)?;
            Err(error)
        }
    }
}

/// Loads the playbook and settings, resolves issuers and converges every device.
async fn prepare_and_run(
    mode: Mode,
    args: &RunArgs,
    inventory: &Inventory,
) -> Result<Exit, SetupError> {
    let playbook = match &args.playbook {
        Some(path) => Playbook::load(path).map_err(|e| SetupError::invalid(e.to_string()))?,
        None => Playbook::builtin(),
    };
    let targets = resolve_targets(args, inventory)?;
    let job = Arc::new(build_job(mode, args, playbook)?);

    let resolution = resolve_issuers(args, inventory).await?;
    tracing::info!(requests = resolution.requests, "ARM requests sent");

    let progress = Progress::new(inventory.devices.len(), args.quiet);
    let reports = fleet::run(
        inventory,
        &targets,
        &resolution,
        job.clone(),
        args.concurrency,
        &progress,
    )
    .await;
    progress.finish();
    job.dialer.close().await;

    print_outcome(mode, &reports);
    write_reports(mode, args, &reports)?;
    Ok(exit_status(&reports, &resolution))
}

fn load_inventory(args: &RunArgs) -> Result<Inventory, SetupError> {
    let options = LoadOptions {
        format: args.inventory_format,
    };
    let inventory = inventory::load(&args.inventory, &options)
        .map_err(|e| SetupError::invalid(e.to_string()))?;
    for warning in &inventory.warnings {
        tracing::warn!("{warning}");
    }
    if inventory.devices.is_empty() {
        return Err(SetupError::invalid(format!(
            "{} lists no devices",
            args.inventory.display()
        )));
    }
    Ok(inventory)
}

/// Reads `--ssh-config`, or `~/.ssh/config` when it exists.
fn load_ssh_config(args: &RunArgs, tokens: &TokenValues) -> Result<SshConfig, SetupError> {
    let path = match args.ssh_config.as_deref() {
        Some("none") => return Ok(SshConfig::empty()),
        Some(path) => PathBuf::from(path),
        None => {
            let default = PathBuf::from(&tokens.home).join(".ssh/config");
            if !default.exists() {
                return Ok(SshConfig::empty());
            }
            default
        }
    };
    let (config, warnings) =
        SshConfig::load(&path).map_err(|e| SetupError::invalid(e.to_string()))?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    tracing::debug!(path = %path.display(), "read ssh_config");
    Ok(config)
}

/// Works out how to reach every server. Agents get no target: they are never contacted.
/// Every device's problems are listed, so one run shows everything to fix.
fn resolve_targets(
    args: &RunArgs,
    inventory: &Inventory,
) -> Result<Vec<Option<Target>>, SetupError> {
    let tokens = TokenValues::local();
    let config = load_ssh_config(args, &tokens)?;
    let fallbacks = Fallbacks {
        user: args
            .user
            .clone()
            .unwrap_or_else(|| tokens.local_user.clone()),
        identity: args.identity.clone(),
        known_hosts: args.known_hosts.clone(),
        accept_new: args.accept_new_host_keys,
        connect_timeout: args.connect_timeout,
        keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
        keepalive_max: DEFAULT_KEEPALIVE_MAX,
        agent: std::env::var_os("SSH_AUTH_SOCK")
            .filter(|value| !value.is_empty())
            .map(PathBuf::from),
        tokens,
    };
    let mut targets = Vec::new();
    let mut problems = Vec::new();
    for device in &inventory.devices {
        if device.role == Role::Agent {
            targets.push(None);
            continue;
        }
        let request = Request {
            host: device.host.clone(),
            port: device.port,
            user: device.user.clone(),
            identity_file: device
                .identity_file
                .as_ref()
                .map(|path| path.to_string_lossy().into_owned()),
            proxy_jump: device.proxy_jump.clone(),
        };
        match target::resolve(&request, &config, &fallbacks) {
            Ok(target) => targets.push(Some(target)),
            Err(message) => {
                problems.push(format!(
                    "device `{}` ({}): {message}",
                    device.name, device.source
                ));
                targets.push(None);
            }
        }
    }
    if problems.is_empty() {
        return Ok(targets);
    }
    Err(SetupError::invalid(format!(
        "cannot work out how to reach {} device(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    )))
}

fn read_secret(
    source: Option<SecretSource>,
    what: &str,
) -> Result<Option<(Secret, String)>, SetupError> {
    let Some(source) = source else {
        return Ok(None);
    };
    let (secret, warning) = source
        .read()
        .map_err(|e| SetupError::invalid(format!("cannot read the {what}: {e}")))?;
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    Ok(Some((secret, source.to_string())))
}

fn build_job(mode: Mode, args: &RunArgs, playbook: Playbook) -> Result<Job, SetupError> {
    if args.concurrency == 0 {
        return Err(SetupError::invalid("--concurrency must be at least 1"));
    }
    let passphrase = read_secret(
        SecretSource::from_options(
            args.identity_passphrase_file.as_deref(),
            args.identity_passphrase_env.as_deref(),
        ),
        "identity passphrase",
    )?
    .map(|(secret, source)| Passphrase { secret, source });
    let sudo_password = read_secret(
        SecretSource::from_options(
            args.sudo_password_file.as_deref(),
            args.sudo_password_env.as_deref(),
        ),
        "sudo password",
    )?
    .map(|(secret, _)| secret);
    if sudo_password
        .as_ref()
        .is_some_and(|p| p.expose().contains('\n'))
    {
        return Err(SetupError::invalid(
            "the sudo password contains a line break, which sudo -S cannot read: sudo reads \
             one line",
        ));
    }
    let dialer = Dialer::new(
        Arc::new(HostKeyStore::default()),
        Arc::new(KeyStore::new(passphrase)),
    );
    Ok(Job {
        mode,
        playbook: Arc::new(playbook),
        dialer: Arc::new(dialer),
        sudo_password,
        command_timeout: args.command_timeout,
    })
}

/// Resolves the issuer of every cluster a server names. A credential that cannot be set
/// up fails every server with the reason, so the reports still list them.
async fn resolve_issuers(args: &RunArgs, inventory: &Inventory) -> Result<Resolution, SetupError> {
    let clusters: Vec<_> = inventory
        .devices
        .iter()
        .filter(|device| device.role == Role::Server)
        .filter_map(|device| device.cluster.clone())
        .collect();
    if clusters.is_empty() {
        return Ok(Resolution::default());
    }
    let arm_endpoint =
        check_endpoint("--arm-endpoint", &args.arm_endpoint).map_err(SetupError::invalid)?;
    let authority = std::env::var("AZURE_AUTHORITY_HOST")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "https://login.microsoftonline.com/".to_owned());
    let authority_host =
        check_endpoint("AZURE_AUTHORITY_HOST", &authority).map_err(SetupError::invalid)?;

    let env = |name: &str| std::env::var(name).ok();
    let chosen = match credential::choose(args.azure_auth, &authority_host, &env) {
        Ok(chosen) => chosen,
        Err(error) => {
            let mut resolution = Resolution::default();
            for cluster in &clusters {
                resolution.insert(cluster, Err(ClusterProblem::AuthFailed(error.to_string())));
            }
            return Ok(resolution);
        }
    };
    tracing::info!(method = chosen.name, endpoint = %arm_endpoint, "resolving issuers from ARM");
    let settings = AzureSettings {
        arm_endpoint,
        credential: chosen.credential,
    };
    Ok(azure::resolve(&settings, &clusters).await)
}

fn print_outcome(mode: Mode, reports: &[DeviceReport]) {
    if mode == Mode::Check {
        for report in reports.iter().filter(|r| !r.diff.is_empty()) {
            println!("--- {} ({})", report.device, report.host);
            print!("{}", report.diff);
            println!(
                "issuers: [{}] -> [{}]\n",
                report.issuers_before.join(", "),
                report.issuers_after.join(", ")
            );
        }
    }
    print!("{}", report::render_summary(reports));
}

fn write_reports(mode: Mode, args: &RunArgs, reports: &[DeviceReport]) -> Result<(), SetupError> {
    let io_error = |path: &Path, error: std::io::Error| SetupError {
        message: format!("cannot write report {}: {error}", path.display()),
        exit: Exit::Internal,
    };
    if let Some(path) = &args.report_csv {
        report::write_file_atomically(path, |buffer| {
            report::write_csv(buffer, reports).map_err(std::io::Error::other)
        })
        .map_err(|e| io_error(path, e))?;
        tracing::info!(path = %path.display(), "wrote CSV report");
    }
    if let Some(path) = &args.report_json {
        let document = JsonReport {
            mode: mode.as_str(),
            totals: Totals::of(reports),
            devices: reports,
        };
        report::write_file_atomically(path, |buffer| {
            serde_json::to_writer_pretty(&mut *buffer, &document).map_err(std::io::Error::other)?;
            buffer.push(b'\n');
            Ok(())
        })
        .map_err(|e| io_error(path, e))?;
        tracing::info!(path = %path.display(), "wrote JSON report");
    }
    Ok(())
}

fn exit_status(reports: &[DeviceReport], resolution: &Resolution) -> Exit {
    if resolution.auth_failure().is_some() {
        return Exit::AzureAuthFailed;
    }
    let all_compliant = reports.iter().all(|r| r.role == Role::Agent || r.compliant);
    if all_compliant {
        Exit::Compliant
    } else {
        Exit::DevicesFailed
    }
}
