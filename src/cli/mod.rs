//! The command line: `opscore run` and the client commands that talk to a running worker.

mod agents;
mod doctor;
mod sessions;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

pub use self::watch::status_line;
use crate::api::{ApiClient, ApiError};
use crate::bus;
use crate::config::{LogFormat, Settings};

/// Exit code for a configuration that cannot be used (sysexits EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;
/// Exit code when NATS or Redis cannot be reached (sysexits EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// opscore: the operations core for fleets of AI agents. It keeps the registry and lifecycle of
/// agents that publish events on NATS, runs workflows by dispatching tasks to capable agents,
/// and publishes every transition on status streams.
#[derive(Debug, Parser)]
#[command(name = "opscore", version)]
pub struct Cli {
    /// A TOML file layered over the built-in defaults; OPSCORE__SECTION__KEY variables
    /// override both.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log format; overrides log.format from the configuration.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(format: LogFormatArg) -> Self {
        match format {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker: consume agent events, keep the registry, serve the control API.
    Run,
    /// Query the agent registry of a running worker.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Define, list and trigger workflows.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Inspect, follow and cancel sessions.
    #[command(subcommand)]
    Session(SessionCommand),
    /// Inspect and replay dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Follow the status streams live: one line per agent, session or task transition.
    Watch(WatchArgs),
    /// Check the configuration, NATS (JetStream, streams, consumer, permissions) and Redis,
    /// with a fix for each failure; exits non-zero when a check fails.
    Doctor,
    /// Run the HTTP bridge: the original Ops-Core REST API and AgentKit webhook, relayed over
    /// NATS.
    Bridge,
    /// After Redis lost its data: rebuild the agent registry from the events stream and end,
    /// as failed, the sessions storage lost. Harmless on intact storage.
    Recover,
}

#[derive(Debug, Subcommand)]
pub enum WorkflowCommand {
    /// Define a workflow from a JSON file (validated; versions are immutable).
    Define {
        /// The definition, in the workflow JSON format.
        file: PathBuf,
    },
    /// List the latest version of every workflow.
    List {
        /// Print the raw JSON reply.
        #[arg(long)]
        json: bool,
    },
    /// Show a workflow definition.
    Get {
        workflow_id: String,
        /// A version other than the latest.
        #[arg(long)]
        version: Option<String>,
    },
    /// Start a session of a workflow and print its id.
    Trigger(TriggerArgs),
}

#[derive(Debug, Args)]
pub struct TriggerArgs {
    /// The workflow to run.
    pub workflow_id: String,
    /// The session's initial payload, as JSON.
    #[arg(long, value_name = "JSON")]
    pub input: Option<String>,
    /// Run every task of the session on this agent.
    #[arg(long, value_name = "ID")]
    pub agent: Option<String>,
    /// Triggering twice with one key starts one session.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Follow the session until it ends; exit 0 only if it completed.
    #[arg(long)]
    pub watch: bool,
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Show a session with its tasks, attempts, lease holders and why pending tasks wait.
    Get {
        session_id: String,
        /// Print the raw JSON reply on one line.
        #[arg(long)]
        json: bool,
    },
    /// List sessions, newest first.
    List {
        /// Only sessions in this status (pending, running, completed, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// Only sessions of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print one JSON object per session.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a session: stop scheduling and tell every lease holder to stop.
    Cancel { session_id: String },
    /// Follow a session live until it ends; exit 0 only if it completed.
    Watch {
        session_id: String,
        /// Print each status event as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, newest first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print one JSON object per entry.
        #[arg(long)]
        json: bool,
    },
    /// Replay a dead letter: publish the message again, or rerun a failed task's session.
    Replay {
        /// The entry id shown by `dlq list`.
        id: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List registered agents, optionally filtered.
    List(ListArgs),
    /// Show one agent with its liveness and recent state history.
    Get {
        /// The agent id.
        agent_id: String,
        /// Print the raw JSON reply on one line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only agents with this capability.
    #[arg(long)]
    pub capability: Option<String>,
    /// Only agents in this state (idle, busy, offline, ...).
    #[arg(long)]
    pub state: Option<String>,
    /// Agents per page.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Print one JSON object per agent instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this agent's transitions.
    #[arg(long, conflicts_with = "session")]
    pub agent: Option<String>,
    /// Only this session's transitions.
    #[arg(long)]
    pub session: Option<String>,
    /// Print each status event as the JSON it was published as.
    #[arg(long)]
    pub json: bool,
}

/// Runs a parsed command line with loaded settings.
pub async fn execute(command: Command, settings: Settings) -> ExitCode {
    let result = match command {
        Command::Run => return run(settings).await,
        Command::Bridge => {
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            return match crate::bridge::run(settings, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error @ crate::bridge::BridgeError::Config { .. }) => {
                    error!(%error, "opscore bridge cannot start");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(error) => {
                    error!(%error, "opscore bridge failed");
                    ExitCode::from(EXIT_UNAVAILABLE)
                }
            };
        }
        Command::Agent(AgentCommand::List(args)) => agents::agent_list(&settings, args).await,
        Command::Agent(AgentCommand::Get { agent_id, json }) => {
            agents::agent_get(&settings, &agent_id, json).await
        }
        Command::Workflow(command) => sessions::workflow(&settings, command).await,
        Command::Session(command) => sessions::session(&settings, command).await,
        Command::Dlq(command) => sessions::dlq(&settings, command).await,
        Command::Watch(args) => watch::watch(&settings, args).await,
        Command::Recover => recover(&settings).await,
        Command::Doctor => {
            return if doctor::doctor(&settings).await {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Unavailable(message)) => {
            eprintln!("opscore: {message}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(CliError::Api(error)) => {
            eprintln!("opscore: {}", error.message);
            ExitCode::FAILURE
        }
        Err(CliError::Usage(message)) => {
            eprintln!("opscore: {message}");
            ExitCode::from(EXIT_USAGE)
        }
        // The session ended without completing; its transitions were printed.
        Err(CliError::Unsuccessful) => ExitCode::FAILURE,
    }
}

/// Exit code for arguments that parse but make no sense, such as invalid JSON (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

#[derive(Debug)]
enum CliError {
    Unavailable(String),
    Api(ApiError),
    Usage(String),
    Unsuccessful,
}

impl From<ApiError> for CliError {
    fn from(error: ApiError) -> Self {
        Self::Api(error)
    }
}

async fn recover(settings: &Settings) -> Result<(), CliError> {
    if settings.storage.backend != crate::config::Backend::Redis {
        return Err(CliError::Usage(
            "opscore recover rebuilds Redis storage; storage.backend is not redis".to_owned(),
        ));
    }
    let repository = crate::worker::redis_repository(settings)
        .map_err(|e| CliError::Unavailable(format!("redis: {e}")))?;
    let recovery = crate::worker::recover(settings, repository)
        .await
        .map_err(|e| CliError::Unavailable(e.to_string()))?;
    println!(
        "agent events replayed: {} applied, {} stale, {} duplicate, {} dead lettered",
        recovery.applied, recovery.stale, recovery.duplicate, recovery.dead_lettered
    );
    println!(
        "task reports skipped: {} (their sessions are gone)",
        recovery.task_reports_skipped
    );
    println!(
        "sessions lost with the storage, ended as failed: {}",
        recovery.sessions_failed.len()
    );
    for session_id in &recovery.sessions_failed {
        println!("  {session_id}");
    }
    Ok(())
}

async fn run(settings: Settings) -> ExitCode {
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    match crate::worker::run(settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!(%error, "opscore cannot start");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
pub(crate) async fn stop_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!(signal = "SIGINT", "shutting down"),
        () = terminate => info!(signal = "SIGTERM", "shutting down"),
    }
    shutdown.cancel();
}

async fn connect(settings: &Settings) -> Result<async_nats::Client, CliError> {
    bus::connect(&settings.nats)
        .await
        .map_err(|e| CliError::Unavailable(e.to_string()))
}

async fn api(settings: &Settings) -> Result<ApiClient, CliError> {
    Ok(ApiClient::new(connect(settings).await?))
}
