use std::process::ExitCode;

use clap::Parser;
use opscore::cli::{self, Cli};
use opscore::config::Settings;

/// glibc's allocator spent about a third of the worker's CPU time in `malloc` and `free`
/// under load, contending between runtime threads; mimalloc keeps per-thread heaps.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();

    // Configuration is validated before anything connects; a bad value names its key.
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("opscore: {error}");
            return ExitCode::from(cli::EXIT_CONFIG);
        }
    };
    // Client commands print results; their own logs would only be noise below warnings.
    let mut log = settings.log.clone();
    if !matches!(cli.command, cli::Command::Run | cli::Command::Bridge) {
        log.level = "warn".to_owned();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("opscore: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Outside the runtime: the trace exporter runs its blocking HTTP client on a thread of its
    // own, and such a client must not be created or dropped inside async code.
    let guard = opscore::telemetry::init(&log, cli.log_format.map(Into::into), &settings.traces);
    let _guard = match guard {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("opscore: {error}");
            return ExitCode::from(cli::EXIT_CONFIG);
        }
    };

    runtime.block_on(cli::execute(cli.command, settings))
}
