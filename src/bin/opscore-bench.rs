//! `opscore-bench`: the benchmark harness. Parses the command line and hands over to
//! [`opscore::bench`]; `docs/performance.md` describes the scenarios and every figure.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Drives a running opscore worker through NATS and measures it against the bus's own
/// JetStream publish-with-ack ceiling, taken in the same run on the same servers.
#[derive(Debug, Parser)]
#[command(name = "opscore-bench", version)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    options: opscore::bench::Options,
    /// Also print every figure as one JSON line after the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Serve as the floor scenario's relay, configured like a worker through `OPSCORE__…`
    /// variables; the harness starts it itself.
    #[command(hide = true)]
    Relay,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("opscore=info,warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("opscore-bench: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Mode::Relay) = cli.mode {
        return match runtime.block_on(opscore::bench::relay::serve()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("opscore-bench relay: {error}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(opscore::bench::run(cli.options)) {
        Ok(report) => {
            print!("{report}");
            if cli.json {
                match serde_json::to_string(&report) {
                    Ok(line) => println!("{line}"),
                    Err(error) => {
                        eprintln!("opscore-bench: cannot encode the report: {error}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("opscore-bench: {error}");
            ExitCode::FAILURE
        }
    }
}
