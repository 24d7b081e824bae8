//! The command line: argument definitions and the run they start.
//!
//! A run reads as its steps: load the inventory and playbook, check the outputs and the SSH
//! and Azure settings, select the devices, resolve the issuers from ARM or, offline, from an
//! issuers file, roll out in waves, check the workload identities (audit only), write the
//! reports, and choose the exit status. `issuers export` resolves the issuers and writes
//! the issuers file; `report merge` joins sharded CSV reports.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

use clap::{Args, Parser, Subcommand};

use crate::azure::cloud::{self, Cloud};
use crate::azure::credential::{self, AuthMethod};
use crate::azure::identity::{self, IdentityReport};
use crate::azure::issuers_file::{self, IssuersFile};
use crate::azure::pipeline::RetrySettings;
use crate::azure::{self, ArmClient, ClusterProblem, Resolution};
use crate::converge::{Job, Mode};
use crate::events::{Event, Events};
use crate::inventory::{self, ClusterRef, Inventory, LoadOptions, Role};
use crate::playbook::{self, Playbook};
use crate::progress::Progress;
use crate::report::{self, Action, DeviceReport, JsonReport, Totals};
use crate::rollout::{self, select, waves, DEFAULT_CONCURRENCY};
use crate::secret::{Secret, SecretSource};
use crate::shutdown::{self, Shutdown};
use crate::ssh::auth::{KeyStore, Passphrase};
use crate::ssh::fd_limit;
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
    /// A wave exceeded its failure budget and the rollout stopped.
    BudgetExceeded = 5,
    /// SIGINT or SIGTERM stopped the run.
    Interrupted = 130,
}

impl Exit {
    /// Returns the status's name, as docs/exit-codes.md lists it.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Compliant => "compliant",
            Exit::Internal => "internal-error",
            Exit::InvalidInput => "invalid-input",
            Exit::DevicesFailed => "devices-failed",
            Exit::AzureAuthFailed => "azure-auth-failed",
            Exit::BudgetExceeded => "budget-exceeded",
            Exit::Interrupted => "interrupted",
        }
    }
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

impl Cli {
    /// Returns whether the command asked for quiet output.
    pub fn quiet(&self) -> bool {
        match &self.command {
            Command::Converge { run, .. } | Command::Audit { run } => run.quiet,
            Command::Report { .. } | Command::Issuers { .. } => false,
        }
    }
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
    /// Work with the offline issuers file.
    Issuers {
        /// The issuers command.
        #[command(subcommand)]
        command: IssuersCommand,
    },
    /// Work with CSV reports.
    Report {
        #[command(subcommand)]
        command: ReportCommand,
    },
}

/// `arcfleet report` subcommands.
#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Join the CSV reports of sharded runs into one; a device in two reports is an error.
    Merge {
        /// Write the merged report here.
        #[arg(long, short = 'o', value_name = "FILE")]
        out: PathBuf,
        /// The CSV reports, in order.
        #[arg(required = true, value_name = "REPORT")]
        reports: Vec<PathBuf>,
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

    #[command(flatten)]
    pub azure: AzureArgs,

    /// Read the issuers from this file (written by `arcfleet issuers export`) instead of
    /// Azure; no Azure credential is used.
    #[arg(long, value_name = "FILE")]
    pub issuers_file: Option<PathBuf>,

    /// Print no progress; only the summary and errors.
    #[arg(long, short = 'q')]
    pub quiet: bool,

    /// Only devices matching one of these patterns: a name glob (`pa-l1-*`) or
    /// `label=value` (also `role=`, `cluster=`, `name=`); comma-separated or repeated.
    #[arg(long, value_name = "PATTERN", value_delimiter = ',')]
    pub limit: Vec<String>,

    /// Only shard I of N (1-based). Servers of one cluster stay in one shard, and the N
    /// shards cover the inventory exactly once.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,

    /// Only the devices listed in FILE, as an earlier run's --failed-list wrote it.
    #[arg(long, value_name = "FILE")]
    pub retry_failed: Option<PathBuf>,

    /// Directory that receives one run record per run: a folder with the CSV and JSON
    /// reports and one transcript per device.
    #[arg(long, value_name = "DIR", default_value = "arcfleet-runs")]
    pub run_dir: PathBuf,

    /// Write the names of failed and skipped devices here, for --retry-failed.
    #[arg(long, value_name = "FILE", default_value = "arcfleet-failed.txt")]
    pub failed_list: PathBuf,

    /// Print one JSON event per line on stdout; the summary table goes to stderr.
    #[arg(long)]
    pub json: bool,

    /// Write a JUnit XML report with one test case per device.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,

    /// Write a Markdown summary for a CI job page.
    #[arg(long, value_name = "FILE")]
    pub summary_md: Option<PathBuf>,

    /// Label whose values name the waves [default: the playbook's, else `wave`].
    #[arg(long, value_name = "LABEL")]
    pub wave_label: Option<String>,

    /// Wave order, comma-separated; other wave values follow in inventory order.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub waves: Vec<String>,

    /// Batch ramp inside each wave: counts and percentages, such as `1,5,20%`; the last
    /// size repeats [default: the whole wave at once].
    #[arg(long, value_name = "RAMP")]
    pub batch: Option<String>,

    /// Failure budget per wave in percent of its devices; unreachable devices count as
    /// failures. The rollout stops when failures exceed it (at 10% of 20 devices, the
    /// third failure stops it) [default: no budget].
    #[arg(long, value_name = "PERCENT")]
    pub max_fail_percent: Option<String>,

    /// Soak time between waves.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub pause_between_waves: Option<Duration>,

    /// Run later waves even after a wave exceeded its budget, for independent sites.
    #[arg(long)]
    pub continue_past_failed_waves: bool,

    /// K3s restarts in progress at once, fleet-wide [default: no cap beyond
    /// --concurrency].
    #[arg(long, value_name = "N")]
    pub restart_concurrency: Option<usize>,
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
        Command::Report {
            command: ReportCommand::Merge { out, reports },
        } => return merge_reports(&out, &reports),
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
    let selected = match select_devices(&args, &inventory) {
        Ok(selected) => selected,
        Err(error) => return report_setup_failure(mode, &args, inventory.devices.iter(), error),
    };
    match prepare_and_run(mode, &args, &inventory, &selected).await {
        Ok(exit) => Ok(exit),
        Err(error) => {
            let devices = selected.iter().map(|&index| &inventory.devices[index]);
            report_setup_failure(mode, &args, devices, error)
        }
    }
}

/// Writes the reports of a run that stopped before contacting any device: the inventory
/// loaded, so each of `devices` still gets a row with the reason nothing was done to it.
fn report_setup_failure<'a>(
    mode: Mode,
    args: &RunArgs,
    devices: impl Iterator<Item = &'a inventory::Device>,
    error: SetupError,
) -> Result<Exit, SetupError> {
    let reports: Vec<DeviceReport> = devices
        .map(|device| DeviceReport::new(device).skip(error.to_string()))
        .collect();
    if let Err(write_error) = write_reports(mode, args, &reports, error.exit(), None) {
        tracing::error!("{write_error}");
    }
    Err(error)
}

/// Loads the playbook and settings, resolves issuers and rolls out the selected devices.
async fn prepare_and_run(
    mode: Mode,
    args: &RunArgs,
    inventory: &Inventory,
    selected: &[usize],
) -> Result<Exit, SetupError> {
    let playbook = match &args.playbook {
        Some(path) => Playbook::load(path).map_err(|e| SetupError::invalid(e.to_string()))?,
        None => Playbook::builtin(),
    };
    check_outputs(args)?;
    let options = rollout_options(args, &playbook)?;
    let wave_label = args
        .wave_label
        .clone()
        .or_else(|| playbook.rollout.label.clone())
        .unwrap_or_else(|| "wave".to_owned());
    let wave_order = if args.waves.is_empty() {
        playbook.rollout.waves.clone()
    } else {
        args.waves.clone()
    };
    let plan = waves::plan(&inventory.devices, selected, &wave_label, &wave_order);
    let job = Arc::new(build_job(mode, args, playbook)?);
    let targets = resolve_targets(args, inventory, selected)?;
    check_known_hosts_exist(inventory, &targets)?;
    check_required_keys(&targets)?;
    shutdown::listen(job.shutdown.clone(), Exit::Interrupted as u8);

    let selected_inventory = Inventory {
        devices: selected
            .iter()
            .map(|&i| inventory.devices[i].clone())
            .collect(),
        clusters: inventory.clusters.clone(),
        identities: inventory.identities.clone(),
        warnings: Vec::new(),
    };
    let (resolution, client) = resolve_issuers(mode, args, &selected_inventory).await?;

    job.events.emit(Event::RunStarted {
        mode: mode.as_str().to_owned(),
        devices: selected.len(),
        waves: plan.iter().map(|w| w.name.clone()).collect(),
    });
    let progress = Progress::new(selected.len(), args.quiet || args.json);
    let mut outcome = rollout::run(
        inventory,
        &targets,
        &resolution,
        job.clone(),
        &plan,
        &options,
        &progress,
    )
    .await;
    progress.finish();
    job.dialer.close().await;

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

    if let Some(identity) = &identity {
        mark_identity_findings(&mut outcome.reports, identity);
    }
    let exit = exit_status(&outcome, &resolution, identity.as_ref());
    print_outcome(mode, args, &outcome.reports);
    if let Some(identity) = &identity {
        let text = identity::render(identity);
        if args.json {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
    }
    write_reports(mode, args, &outcome.reports, exit, identity.as_ref())?;
    job.events.emit(Event::RunFinished {
        totals: Totals::of(&outcome.reports),
        exit_code: exit as u8,
        exit: exit.name().to_owned(),
    });
    Ok(exit)
}

/// Checks, before any device is contacted, that every output path is writable and that
/// no output would overwrite an input or another output.
fn check_outputs(args: &RunArgs) -> Result<(), SetupError> {
    let mut outputs: Vec<(&str, &Path)> = vec![("--failed-list", args.failed_list.as_path())];
    for (option, path) in [
        ("--report-csv", &args.report_csv),
        ("--report-json", &args.report_json),
        ("--junit", &args.junit),
        ("--summary-md", &args.summary_md),
    ] {
        if let Some(path) = path {
            outputs.push((option, path.as_path()));
        }
    }
    let mut inputs: Vec<(&str, &Path)> = vec![("--inventory", args.inventory.as_path())];
    if let Some(playbook) = &args.playbook {
        inputs.push(("--playbook", playbook.as_path()));
    }
    if let Some(retry) = &args.retry_failed {
        inputs.push(("--retry-failed", retry.as_path()));
    }
    let identity = |path: &Path| -> PathBuf {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let parent = parent.canonicalize().unwrap_or_else(|_| parent.to_owned());
        parent.join(path.file_name().unwrap_or_default())
    };
    if args.run_dir.exists() && !args.run_dir.is_dir() {
        return Err(SetupError::invalid(format!(
            "--run-dir {} is not a directory: give a directory for the run records",
            args.run_dir.display()
        )));
    }
    for (index, (option, path)) in outputs.iter().enumerate() {
        if path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/') {
            return Err(SetupError::invalid(format!(
                "{option} {} is a directory: give a file path",
                path.display()
            )));
        }
        for (other, other_path) in inputs.iter().chain(&outputs[..index]) {
            // A retry list may be rewritten by the run that reads it.
            if *other == "--retry-failed" && *option == "--failed-list" {
                continue;
            }
            if identity(path) == identity(other_path) {
                return Err(SetupError::invalid(format!(
                    "{option} {} is the same file as {other}: choose another path",
                    path.display()
                )));
            }
        }
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let probe = parent.join(format!(".arcfleet-write-check.{}", std::process::id()));
        match std::fs::write(&probe, b"") {
            Ok(()) => {
                let _ = std::fs::remove_file(&probe);
            }
            Err(error) => {
                return Err(SetupError::invalid(format!(
                    "{option} {}: cannot write in {}: {error}",
                    path.display(),
                    parent.display()
                )))
            }
        }
    }
    Ok(())
}

fn rollout_options(args: &RunArgs, playbook: &Playbook) -> Result<rollout::Options, SetupError> {
    let batch = args
        .batch
        .clone()
        .or_else(|| playbook.rollout.batch.clone());
    let batches = match batch {
        Some(text) => {
            waves::parse_batches(&text).map_err(|m| SetupError::invalid(format!("--batch: {m}")))?
        }
        None => Vec::new(),
    };
    let max_fail_percent = match &args.max_fail_percent {
        Some(text) => Some(
            playbook::parse_percent(text)
                .map_err(|m| SetupError::invalid(format!("--max-fail-percent: {m}")))?,
        ),
        None => playbook.rollout.max_fail_percent,
    };
    Ok(rollout::Options {
        concurrency: args.concurrency,
        batches,
        max_fail_percent,
        pause_between_waves: args
            .pause_between_waves
            .or(playbook.rollout.pause_between_waves)
            .unwrap_or(Duration::ZERO),
        continue_past_failed_waves: args.continue_past_failed_waves
            || playbook.rollout.continue_past_failed_waves,
    })
}

/// Applies --limit, --shard and --retry-failed; returns inventory indices.
fn select_devices(args: &RunArgs, inventory: &Inventory) -> Result<Vec<usize>, SetupError> {
    for pattern in &args.limit {
        select::check_limit(pattern).map_err(SetupError::invalid)?;
    }
    let shard = match &args.shard {
        Some(text) => Some(select::parse_shard(text).map_err(SetupError::invalid)?),
        None => None,
    };
    let retry = match &args.retry_failed {
        Some(path) => {
            Some(select::read_retry_list(path, &inventory.devices).map_err(SetupError::invalid)?)
        }
        None => None,
    };
    let in_shard =
        shard.map(|(index, count)| select::shard_members(&inventory.devices, index, count));
    let selected: Vec<usize> = inventory
        .devices
        .iter()
        .enumerate()
        .filter(|(_, d)| args.limit.is_empty() || args.limit.iter().any(|p| select::matches(d, p)))
        .filter(|(i, _)| in_shard.as_ref().is_none_or(|members| members[*i]))
        .filter(|(_, d)| retry.as_ref().is_none_or(|names| names.contains(&d.name)))
        .map(|(i, _)| i)
        .collect();
    if selected.is_empty() && args.shard.is_none() {
        return Err(SetupError::invalid(
            "no device matches --limit and --retry-failed: check the patterns against the inventory",
        ));
    }
    Ok(selected)
}

fn merge_reports(out: &Path, inputs: &[PathBuf]) -> Result<Exit, SetupError> {
    let merged = report::merge::merge(inputs).map_err(|e| SetupError::invalid(e.to_string()))?;
    report::write_file_atomically(out, |buffer| {
        buffer.extend_from_slice(merged.as_bytes());
        Ok(())
    })
    .map_err(|error| SetupError {
        message: format!("cannot write {}: {error}", out.display()),
        exit: Exit::Internal,
    })?;
    let rows = merged.lines().count().saturating_sub(1);
    println!(
        "merged {} reports, {rows} devices, into {}",
        inputs.len(),
        out.display()
    );
    Ok(Exit::Compliant)
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
    selected: &[usize],
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
    let mut targets = vec![None; inventory.devices.len()];
    let mut problems = Vec::new();
    for &index in selected {
        let device = &inventory.devices[index];
        if device.role == Role::Agent {
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
            Ok(target) => targets[index] = Some(target),
            Err(message) => problems.push(format!(
                "device `{}` ({}): {message}",
                device.name, device.source
            )),
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

/// Fails before any device is contacted when a route strictly checks host keys against
/// known_hosts files of which none exists, since every device on it would fail alike.
fn check_known_hosts_exist(
    inventory: &Inventory,
    targets: &[Option<Target>],
) -> Result<(), SetupError> {
    use std::collections::{BTreeMap, BTreeSet};
    // known_hosts files -> (host addresses, device names).
    let mut missing: BTreeMap<Vec<PathBuf>, (BTreeSet<String>, BTreeSet<&str>)> = BTreeMap::new();
    for (device, target) in inventory.devices.iter().zip(targets) {
        let Some(target) = target else {
            continue;
        };
        for hop in target.jumps.iter().chain([target]) {
            if !hop.accept_new && !hop.known_hosts.iter().any(|path| path.exists()) {
                let (hosts, devices) = missing.entry(hop.known_hosts.clone()).or_default();
                hosts.insert(hop.address());
                devices.insert(&device.name);
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    const NAMED: usize = 5;
    let groups: Vec<String> = missing
        .iter()
        .map(|(files, (hosts, devices))| {
            let files: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
            let mut names: Vec<&str> = devices.iter().take(NAMED).copied().collect();
            if devices.len() > NAMED {
                names.push("...");
            }
            format!(
                "no known_hosts file exists for {} host(s), used by {} device(s) ({}): looked \
                 for {}",
                hosts.len(),
                devices.len(),
                names.join(", "),
                files.join(", ")
            )
        })
        .collect();
    Err(SetupError::invalid(format!(
        "{}. Record the hosts' keys in one (for example with ssh-keyscan, after checking the \
         fingerprints), point --known-hosts or UserKnownHostsFile at the file that has them, or \
         pass --accept-new-host-keys to record keys on first contact",
        groups.join("; ")
    )))
}

/// Fails before any device is contacted when a private key that `--identity` or the
/// inventory names cannot be read, since every device that uses it would fail alike.
fn check_required_keys(targets: &[Option<Target>]) -> Result<(), SetupError> {
    let mut problems = std::collections::BTreeMap::new();
    let hops = targets
        .iter()
        .flatten()
        .flat_map(|target| target.jumps.iter().chain([target]));
    for identity in hops.flat_map(|hop| &hop.identities) {
        if !identity.required || problems.contains_key(&identity.path) {
            continue;
        }
        let problem = match std::fs::metadata(&identity.path) {
            Ok(metadata) if !metadata.is_file() => Some("is not a file".to_owned()),
            Ok(_) => std::fs::File::open(&identity.path)
                .err()
                .map(|error| format!("cannot be read: {error}")),
            Err(error) => Some(format!("cannot be read: {error}")),
        };
        if let Some(problem) = problem {
            problems.insert(identity.path.clone(), problem);
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = problems
        .iter()
        .map(|(path, problem)| format!("private key {} {problem}", path.display()))
        .collect();
    Err(SetupError::invalid(format!(
        "{}: fix the path given with --identity or the inventory's identity_file",
        lines.join("; ")
    )))
}

fn read_secret(
    source: Option<SecretSource>,
    label: &str,
) -> Result<Option<(Secret, String)>, SetupError> {
    let Some(source) = source else {
        return Ok(None);
    };
    let (secret, warning) = source
        .read()
        .map_err(|e| SetupError::invalid(format!("cannot read the {label}: {e}")))?;
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    Ok(Some((secret, source.to_string())))
}

fn build_job(mode: Mode, args: &RunArgs, playbook: Playbook) -> Result<Job, SetupError> {
    if args.concurrency == 0 {
        return Err(SetupError::invalid("--concurrency must be at least 1"));
    }
    fd_limit::check_concurrency(args.concurrency, fd_limit::current_soft_limit())
        .map_err(SetupError::invalid)?;
    for (option, value) in [
        ("--connect-timeout", args.connect_timeout),
        ("--command-timeout", args.command_timeout),
    ] {
        if value < Duration::from_secs(1) {
            return Err(SetupError::invalid(format!(
                "{option} {value:?} is too short: use at least 1s"
            )));
        }
    }
    let restart_slots = match args.restart_concurrency {
        Some(0) => {
            return Err(SetupError::invalid(
                "--restart-concurrency must be at least 1",
            ))
        }
        Some(n) => n,
        None => tokio::sync::Semaphore::MAX_PERMITS,
    };
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
        restart_slots: Arc::new(tokio::sync::Semaphore::new(restart_slots)),
        shutdown: Arc::new(Shutdown::default()),
        events: Arc::new(Events::new(args.json)),
        issuer_keys: args
            .issuers_file
            .is_none()
            .then(|| Arc::new(crate::azure::oidc::IssuerKeys::default())),
    })
}

fn log_arm_requests(client: &ArmClient) {
    let stats = client.stats();
    tracing::info!(
        requests = stats.requests(),
        throttled = stats.throttled(),
        "ARM requests sent (HTTP requests, pages and retries included)"
    );
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
    let inventory = inventory::load(inventory_path, &LoadOptions::default())
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

fn print_outcome(mode: Mode, args: &RunArgs, reports: &[DeviceReport]) {
    let mut text = String::new();
    if mode == Mode::Check {
        for report in reports
            .iter()
            .filter(|r| !r.diff.is_empty() && r.action == Action::WouldChange)
        {
            text.push_str(&format!(
                "--- {} ({})\n{}",
                report.device, report.host, report.diff
            ));
            text.push_str(&format!(
                "issuers: [{}] -> [{}]\n\n",
                report.issuers_before.join(", "),
                report.issuers_after.join(", ")
            ));
        }
    }
    text.push_str(&report::render_summary(reports));
    // With --json, stdout carries only events.
    if args.json {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
}

/// Writes every report the options ask for, plus the failed-devices list.
fn write_reports(
    mode: Mode,
    args: &RunArgs,
    reports: &[DeviceReport],
    exit: Exit,
    identity: Option<&IdentityReport>,
) -> Result<(), SetupError> {
    // A report that cannot be written must not keep the others from being written, so
    // every writer runs, logs its own error, and the count is returned at the end.
    let first_error: std::cell::RefCell<Option<SetupError>> = std::cell::RefCell::new(None);
    let failures = std::cell::Cell::new(0usize);
    let write = |path: &Path, what: &str, render: &dyn Fn(&mut Vec<u8>) -> std::io::Result<()>| {
        match report::write_file_atomically(path, |buffer| render(buffer)) {
            Ok(()) => tracing::info!(path = %path.display(), "wrote {what}"),
            Err(error) => {
                let message = format!("cannot write {what} {}: {error}", path.display());
                tracing::error!("{message}");
                failures.set(failures.get() + 1);
                first_error.borrow_mut().get_or_insert(SetupError {
                    message,
                    exit: Exit::Internal,
                });
            }
        }
        Ok::<(), SetupError>(())
    };
    if let Some(path) = &args.report_csv {
        write(path, "CSV report", &|buffer| {
            report::write_csv(buffer, reports).map_err(std::io::Error::other)
        })?;
    }
    if let Some(path) = &args.report_json {
        let document = JsonReport {
            mode: mode.as_str(),
            totals: Totals::of(reports),
            devices: reports,
            identity,
        };
        write(path, "JSON report", &|buffer| {
            serde_json::to_writer_pretty(&mut *buffer, &document).map_err(std::io::Error::other)?;
            buffer.push(b'\n');
            Ok(())
        })?;
    }
    if let Some(path) = &args.junit {
        let xml = report::junit::render("arcfleet", reports).map_err(|e| SetupError {
            message: format!("cannot render JUnit XML: {e}"),
            exit: Exit::Internal,
        })?;
        write(path, "JUnit report", &|buffer| {
            buffer.extend_from_slice(xml.as_bytes());
            Ok(())
        })?;
    }
    if let Some(path) = &args.summary_md {
        let title = format!("arcfleet {}", mode.as_str());
        let markdown = report::markdown::render(&title, exit.name(), reports);
        write(path, "Markdown summary", &|buffer| {
            buffer.extend_from_slice(markdown.as_bytes());
            Ok(())
        })?;
    }
    if let Err(error) = write_run_record(mode, args, reports, identity) {
        tracing::error!("{error}");
        failures.set(failures.get() + 1);
        first_error.borrow_mut().get_or_insert(error);
    }
    let failed: Vec<(&str, &str, &str)> = reports
        .iter()
        .filter(|r| matches!(r.action, Action::Failed | Action::Skipped))
        .map(|r| (r.device.as_str(), r.action.as_str(), r.error.as_str()))
        .collect();
    let list = select::render_retry_list(&failed);
    write(&args.failed_list, "failed-devices list", &|buffer| {
        buffer.extend_from_slice(list.as_bytes());
        Ok(())
    })?;
    match first_error.into_inner() {
        // Each error is logged above, so the returned one only sums them up.
        Some(error) => Err(SetupError {
            message: format!(
                "{} output file(s) could not be written, see the errors above",
                failures.get()
            ),
            exit: error.exit,
        }),
        None => Ok(()),
    }
}

/// Writes the run record: `<run-dir>/<UTC time>-<mode>/` with report.csv, report.json and
/// transcripts/<device>.log, and prints its path.
fn write_run_record(
    mode: Mode,
    args: &RunArgs,
    reports: &[DeviceReport],
    identity: Option<&IdentityReport>,
) -> Result<(), SetupError> {
    let stamp = time::OffsetDateTime::now_utc()
        .format(&time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default();
    let mut folder = args.run_dir.join(format!("{stamp}-{}", mode.as_str()));
    for attempt in 2.. {
        if !folder.exists() {
            break;
        }
        folder = args
            .run_dir
            .join(format!("{stamp}-{}-{attempt}", mode.as_str()));
    }
    let io_error = |error: std::io::Error| SetupError {
        message: format!("cannot write the run record {}: {error}", folder.display()),
        exit: Exit::Internal,
    };
    let transcripts = folder.join("transcripts");
    // Run records describe the fleet's configuration, so only the user reads them.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&transcripts)
        .map_err(io_error)?;
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o700)).map_err(io_error)?;
    report::write_file_atomically(&folder.join("report.csv"), |buffer| {
        report::write_csv(buffer, reports).map_err(std::io::Error::other)
    })
    .map_err(io_error)?;
    let document = JsonReport {
        mode: mode.as_str(),
        totals: Totals::of(reports),
        devices: reports,
        identity,
    };
    report::write_file_atomically(&folder.join("report.json"), |buffer| {
        serde_json::to_writer_pretty(&mut *buffer, &document).map_err(std::io::Error::other)
    })
    .map_err(io_error)?;
    for device in reports.iter().filter(|r| !r.transcript.is_empty()) {
        let text = report::transcript::render(&device.device, &device.host, &device.transcript);
        write_private(
            &transcripts.join(format!("{}.log", device.device)),
            text.as_bytes(),
        )
        .map_err(io_error)?;
    }
    eprintln!("run record: {}", folder.display());
    Ok(())
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// Gives the servers of a cluster with identity-check findings the cause
/// `identity-credential-mismatch`, unless they already have a cause: their tokens carry
/// the right issuer, but Entra would still refuse the exchange.
fn mark_identity_findings(reports: &mut [DeviceReport], identity: &IdentityReport) {
    for report in reports
        .iter_mut()
        .filter(|r| r.role == Role::Server && r.cause.is_none())
    {
        let findings: Vec<&str> = identity
            .findings
            .iter()
            .filter(|finding| finding.cluster == report.cluster)
            .map(|finding| finding.message.as_str())
            .collect();
        if let Some(first) = findings.first() {
            report.compliant = false;
            report.cause = Some(crate::report::Cause::IdentityCredentialMismatch);
            report.error = format!(
                "{} federated identity credential finding(s); first: {first}",
                findings.len()
            );
        }
    }
}

fn exit_status(
    outcome: &rollout::Outcome,
    resolution: &Resolution,
    identity: Option<&IdentityReport>,
) -> Exit {
    if outcome.interrupted {
        return Exit::Interrupted;
    }
    if resolution.auth_failure().is_some() {
        return Exit::AzureAuthFailed;
    }
    if outcome.halted && !outcome.reports.is_empty() {
        return Exit::BudgetExceeded;
    }
    let all_compliant = outcome
        .reports
        .iter()
        .all(|r| r.role == Role::Agent || r.compliant);
    let identities_ok = identity.is_none_or(|report| report.findings.is_empty());
    if all_compliant && identities_ok {
        Exit::Compliant
    } else {
        Exit::DevicesFailed
    }
}
