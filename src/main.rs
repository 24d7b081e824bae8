//! The `arcfleet` command.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use arcfleet::cli::{self, Cli, Exit};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
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

/// Sends logs to stderr: info by default, debug with -v, trace with -vv; RUST_LOG
/// overrides. Dependencies log at warn unless RUST_LOG sets their level.
///
/// azure_core 0.21 logs whole requests at debug (transport policy) and trace (retry
/// policy), and its header redaction is inverted, so those lines would contain the bearer
/// token. Both targets are capped at info whatever RUST_LOG sets.
fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,arcfleet={level}")));
    let filter = [
        "azure_core::policies::transport=info",
        "azure_core::policies::retry_policies=info",
    ]
    .into_iter()
    .filter_map(|directive| directive.parse().ok())
    .fold(filter, EnvFilter::add_directive);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
