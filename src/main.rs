//! The `arcfleet` command.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use arcfleet::cli::{self, Cli, Exit};
use arcfleet::ssh::fd_limit;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet());
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("arcfleet: cannot start the async runtime: {error}");
            return ExitCode::from(Exit::Internal as u8);
        }
    };
    let exit = match runtime.block_on(cli::run(cli)) {
        Ok(exit) => exit,
        Err(error) => {
            eprintln!("arcfleet: {error}");
            error.exit()
        }
    };
    ExitCode::from(exit as u8)
}

/// Raises the soft open-file limit to the hard limit, because each device being worked on
/// uses one socket and `--concurrency` may exceed the common default soft limit of 1024.
fn raise_open_file_limit() {
    match fd_limit::raise_soft_limit() {
        Ok(limit) => tracing::debug!(
            before = ?limit.before,
            soft = ?limit.soft,
            hard = ?limit.hard,
            "open-file limit (None: unlimited)"
        ),
        Err(error) => tracing::warn!("cannot raise the open-file limit to the hard limit: {error}"),
    }
}

/// Sends logs to stderr: info by default, debug with -v, trace with -vv, warnings only
/// with -q; RUST_LOG replaces these levels. Dependencies log at warn unless RUST_LOG sets
/// their level.
///
/// The HTTP and SSH libraries dump whole requests and packets at debug and trace level:
/// azure_core 0.21's transport and retry policies print the Authorization header, because
/// its header redaction is inverted. Their level is capped at info whatever RUST_LOG sets.
fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let mut filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,arcfleet={level}")));
    for target in [
        "azure_core",
        "azure_identity",
        "reqwest",
        "hyper",
        "hyper_util",
        "h2",
        "russh",
    ] {
        if let Ok(directive) = format!("{target}=info").parse() {
            filter = filter.add_directive(directive);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
