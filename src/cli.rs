//! The command line: argument definitions and the run they start.
//!
//! A run reads as its steps: load the inventory and playbook, check the SSH and Azure
//! settings, and resolve the issuers from ARM or, offline, from an issuers file. Then
//! converge the devices, check the workload identities (audit only), write the reports,
//! and choose the exit status. `issuers export` resolves the issuers and writes the issuers file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::azure::cloud::{self, Cloud};
use crate::azure::credential::{self, AuthMethod};
use crate::azure::identity::{self, IdentityReport};
use crate::azure::issuers_file::{self, IssuersFile};
use crate::azure::pipeline::RetrySettings;
use crate::azure::{self, ArmClient, ClusterProblem, Resolution};
use crate::converge::{Job, Mode};
use crate::fleet::{self, Progress, DEFAULT_CONCURRENCY};
use crate::inventory::{self, ClusterRef, Inventory, LoadOptions, Role};
use crate::playbook::Playbook;
use crate::report::{self, DeviceReport, JsonReport, Totals};
use crate::ssh::known_hosts::KnownHosts;
use crate::ssh::{KeyStore, Settings};

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
    /// Report compliance with the same probe as converge, changing nothing, and check the
    /// federated identity credentials of the inventory's workload identities.
    Audit {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Work with the offline issuers file.
    Issuers {
        /// The issuers command.
        #[command(subcommand)]
        command: IssuersCommand,
    },
}

/// Subcommands of `arcfleet issuers`.
#[derive(Debug, Subcommand)]
pub enum IssuersCommand {
    /// Resolve the issuer of every cluster the inventory names and write them to a CSV file
    /// for `--issuers-file`.
    Export {
        /// Inventory file: .yaml/.yml or .csv.
        #[arg(long, short = 'i', value_name = "FILE")]
        inventory: PathBuf,
        /// The CSV file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        azure: AzureArgs,
    },
}

/// How to reach Azure, shared by every command that reads ARM.
#[derive(Debug, Args)]
pub struct AzureArgs {
    /// Azure cloud: sets the ARM endpoint, the Entra authority host and the token scope.
    #[arg(
        long,
        value_enum,
        value_name = "CLOUD",
        env = "ARCFLEET_CLOUD",
        default_value = "AzureCloud"
    )]
    pub cloud: Cloud,

    /// Azure Resource Manager endpoint, replacing the cloud's (and with it the token
    /// scope, `<URL>/.default`).
    #[arg(long, value_name = "URL", env = "ARCFLEET_ARM_ENDPOINT")]
    pub arm_endpoint: Option<String>,

    /// Azure credential; `auto` tries the client secret, workload identity and the Azure
    /// CLI in that order and never managed identity.
    #[arg(long, value_enum, value_name = "METHOD", default_value = "auto")]
    pub azure_auth: AuthMethod,

    /// Bound on the time from an ARM request's first attempt to its last retry, when ARM
    /// throttles it (429 with Retry-After) or fails with a server error.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = humantime::parse_duration)]
    pub arm_max_wait: Duration,

    /// Wait up to this long for clusters whose OIDC issuer URL is still empty, or that are
    /// still connecting or provisioning, re-reading them meanwhile; 0s reports them at once.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub wait_for_issuer: Duration,
}

/// Options shared by converge and audit.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Inventory file: .yaml/.yml or .csv.
    #[arg(long, short = 'i', value_name = "FILE")]
    pub inventory: PathBuf,

    /// Playbook file; the built-in playbooks/k3s-oidc-issuer.yaml when not given.
    #[arg(long, value_name = "FILE")]
    pub playbook: Option<PathBuf>,

    /// Write the CSV compliance report here.
    #[arg(long, value_name = "FILE")]
    pub report_csv: Option<PathBuf>,

    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub report_json: Option<PathBuf>,

    /// SSH user for devices whose inventory entry has none [default: the local user].
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Private key for devices whose inventory entry names none.
    #[arg(long, value_name = "FILE", default_value = "~/.ssh/id_ed25519")]
    pub identity: String,

    /// known_hosts file that host keys are checked against; unknown or changed keys fail
    /// the device.
    #[arg(long, value_name = "FILE", default_value = "~/.ssh/known_hosts")]
    pub known_hosts: String,

    /// Devices worked on at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONCURRENCY)]
    pub concurrency: usize,

    /// Bound on connecting and authenticating to one device.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Bound on each remote command other than restarts and rollouts.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub command_timeout: Duration,

    #[command(flatten)]
    pub azure: AzureArgs,

    /// Read the issuers from this file (written by `arcfleet issuers export`) instead of
    /// Azure; no Azure credential is used.
    #[arg(long, value_name = "FILE")]
    pub issuers_file: Option<PathBuf>,

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

    fn auth(message: impl Into<String>) -> Self {
        SetupError {
            message: message.into(),
            exit: Exit::AzureAuthFailed,
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
        Command::Issuers {
            command:
                IssuersCommand::Export {
                    inventory,
                    out,
                    azure,
                },
        } => return export_issuers(&inventory, &out, &azure).await,
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
            write_reports(mode, &args, &reports, None)?;
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
    let job = build_job(mode, args, playbook)?;

    let (resolution, client) = resolve_issuers(mode, args, inventory).await?;

    let progress = Progress::new(inventory.devices.len(), args.quiet);
    let reports = fleet::run(
        inventory,
        &resolution,
        Arc::new(job),
        args.concurrency,
        &progress,
    )
    .await;
    progress.finish();

    let identity = match (&client, mode) {
        (Some(client), Mode::Audit) if !inventory.identities.is_empty() => {
            Some(identity::check_all(client, &inventory.identities, &resolution).await)
        }
        (None, Mode::Audit) if !inventory.identities.is_empty() => {
            tracing::warn!(
                identities = inventory.identities.len(),
                "identity check skipped: --issuers-file runs without Azure access"
            );
            None
        }
        _ => None,
    };
    if let Some(client) = &client {
        log_arm_requests(client);
    }

    print_outcome(mode, &reports);
    if let Some(identity) = &identity {
        print!("{}", identity::render(identity));
    }
    write_reports(mode, args, &reports, identity.as_ref())?;
    Ok(exit_status(&reports, &resolution, identity.as_ref()))
}

fn log_arm_requests(client: &ArmClient) {
    let stats = client.stats();
    tracing::info!(
        requests = stats.requests(),
        throttled = stats.throttled(),
        "ARM requests sent (HTTP requests, pages and retries included)"
    );
}

fn load_inventory(args: &RunArgs) -> Result<Inventory, SetupError> {
    let default_user = args.user.clone().unwrap_or_else(local_user);
    let inventory = inventory::load(&args.inventory, &LoadOptions { default_user })
        .map_err(|e| SetupError::invalid(e.to_string()))?;
    if inventory.devices.is_empty() {
        return Err(SetupError::invalid(format!(
            "{} lists no devices",
            args.inventory.display()
        )));
    }
    Ok(inventory)
}

fn build_job(mode: Mode, args: &RunArgs, playbook: Playbook) -> Result<Job, SetupError> {
    let known_hosts_path = expand_home(&args.known_hosts);
    let known_hosts = KnownHosts::load(&known_hosts_path).map_err(|error| {
        SetupError::invalid(format!(
            "cannot read known_hosts {}: {error}",
            known_hosts_path.display()
        ))
    })?;
    if args.concurrency == 0 {
        return Err(SetupError::invalid("--concurrency must be at least 1"));
    }
    Ok(Job {
        mode,
        playbook: Arc::new(playbook),
        ssh: Settings {
            connect_timeout: args.connect_timeout,
            keepalive_interval: Duration::from_secs(15),
            keepalive_max: 3,
        },
        known_hosts: Arc::new(known_hosts),
        keys: Arc::new(KeyStore::default()),
        default_identity: expand_home(&args.identity),
        command_timeout: args.command_timeout,
    })
}

/// Resolves the issuer of every cluster a server names (and, for an audit, every cluster
/// an identity names), from the issuers file or from ARM. Returns the ARM client when ARM
/// was used, for the identity check. A credential that cannot be set up fails every server
/// with the reason, so the reports still list them.
async fn resolve_issuers(
    mode: Mode,
    args: &RunArgs,
    inventory: &Inventory,
) -> Result<(Resolution, Option<ArmClient>), SetupError> {
    let mut clusters: Vec<ClusterRef> = inventory
        .devices
        .iter()
        .filter(|device| device.role == Role::Server)
        .filter_map(|device| device.cluster.clone())
        .collect();
    if mode == Mode::Audit {
        clusters.extend(inventory.identities.iter().map(|i| i.cluster.clone()));
    }
    if let Some(path) = &args.issuers_file {
        let file = IssuersFile::load(path).map_err(|e| SetupError::invalid(e.to_string()))?;
        tracing::info!(path = %path.display(), rows = file.len(), "read issuers offline");
        return Ok((file.resolution(&clusters), None));
    }
    if clusters.is_empty() {
        return Ok((Resolution::default(), None));
    }
    let client = match arm_client(&args.azure) {
        Ok(client) => client,
        Err(error) if error.exit == Exit::AzureAuthFailed => {
            let mut resolution = Resolution::default();
            for cluster in &clusters {
                let problem = ClusterProblem::AuthFailed(error.message.clone());
                resolution.insert(cluster, Err(problem));
            }
            return Ok((resolution, None));
        }
        Err(error) => return Err(error),
    };
    let resolution = azure::resolve(&client, &clusters, args.azure.wait_for_issuer).await;
    Ok((resolution, Some(client)))
}

/// Builds the ARM client from the options and the environment. A credential that cannot
/// be set up is an [`Exit::AzureAuthFailed`] error.
fn arm_client(args: &AzureArgs) -> Result<ArmClient, SetupError> {
    let authority = std::env::var("AZURE_AUTHORITY_HOST").ok();
    let endpoints = cloud::endpoints(
        args.cloud,
        args.arm_endpoint.as_deref(),
        authority.as_deref(),
    )
    .map_err(SetupError::invalid)?;
    let env = |name: &str| std::env::var(name).ok();
    let chosen = credential::choose(args.azure_auth, &endpoints.authority, &env)
        .map_err(|error| SetupError::auth(error.to_string()))?;
    tracing::info!(
        method = chosen.name,
        cloud = args.cloud.as_str(),
        endpoint = %endpoints.arm,
        "resolving issuers from ARM"
    );
    let retry = RetrySettings {
        max_wait: args.arm_max_wait,
        ..RetrySettings::default()
    };
    Ok(ArmClient::new(
        endpoints.arm,
        endpoints.scope,
        chosen.credential,
        retry,
    ))
}

/// Runs `issuers export`: resolves every cluster the inventory names and writes the file.
async fn export_issuers(
    inventory_path: &Path,
    out: &Path,
    args: &AzureArgs,
) -> Result<Exit, SetupError> {
    let options = LoadOptions {
        default_user: local_user(),
    };
    let inventory = inventory::load(inventory_path, &options)
        .map_err(|e| SetupError::invalid(e.to_string()))?;
    if inventory.clusters.is_empty() {
        return Err(SetupError::invalid(format!(
            "{} names no clusters",
            inventory_path.display()
        )));
    }
    let client = arm_client(args)?;
    let resolution = azure::resolve(&client, &inventory.clusters, args.wait_for_issuer).await;
    log_arm_requests(&client);
    if let Some(message) = resolution.auth_failure() {
        return Err(SetupError::auth(message.to_owned()));
    }

    let now = time::OffsetDateTime::now_utc();
    let resolved_at = now
        .replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let text = issuers_file::render(&inventory.clusters, &resolution, &resolved_at);
    report::write_file_atomically(out, |buffer| {
        buffer.extend_from_slice(&text);
        Ok(())
    })
    .map_err(|error| SetupError {
        message: format!("cannot write issuers file {}: {error}", out.display()),
        exit: Exit::Internal,
    })?;
    let ready = inventory
        .clusters
        .iter()
        .filter(|cluster| resolution.issuer(cluster).is_ok())
        .count();
    let total = inventory.clusters.len();
    println!(
        "wrote {} clusters to {} ({ready} ready, {} without an issuer)",
        total,
        out.display(),
        total - ready
    );
    Ok(if ready == total {
        Exit::Compliant
    } else {
        Exit::DevicesFailed
    })
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

fn write_reports(
    mode: Mode,
    args: &RunArgs,
    reports: &[DeviceReport],
    identity: Option<&IdentityReport>,
) -> Result<(), SetupError> {
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
            identity,
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

fn exit_status(
    reports: &[DeviceReport],
    resolution: &Resolution,
    identity: Option<&IdentityReport>,
) -> Exit {
    if resolution.auth_failure().is_some() {
        return Exit::AzureAuthFailed;
    }
    let all_compliant = reports.iter().all(|r| r.role == Role::Agent || r.compliant);
    let identities_ok = identity.is_none_or(|report| report.findings.is_empty());
    if all_compliant && identities_ok {
        Exit::Compliant
    } else {
        Exit::DevicesFailed
    }
}

fn local_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "root".to_owned())
}

/// Expands a leading `~/` to the home directory.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}
