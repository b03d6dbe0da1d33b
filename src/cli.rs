//! The command line: `opscore run` and the client commands that talk to a running worker.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::api::{ApiClient, ApiError};
use crate::bus;
use crate::config::{LogFormat, Settings};
use crate::subjects;

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
    /// Follow the status streams live: one line per agent, session or task transition.
    Watch(WatchArgs),
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
        Command::Agent(AgentCommand::List(args)) => agent_list(&settings, args).await,
        Command::Agent(AgentCommand::Get { agent_id, json }) => {
            agent_get(&settings, &agent_id, json).await
        }
        Command::Watch(args) => watch(&settings, args).await,
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
    }
}

#[derive(Debug)]
enum CliError {
    Unavailable(String),
    Api(ApiError),
}

impl From<ApiError> for CliError {
    fn from(error: ApiError) -> Self {
        Self::Api(error)
    }
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
async fn stop_on_signal(shutdown: CancellationToken) {
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

async fn agent_list(settings: &Settings, args: ListArgs) -> Result<(), CliError> {
    let client = api(settings).await?;
    let mut cursor: Option<String> = None;
    if !args.json {
        println!(
            "{:<24} {:<24} {:<13} {:<25} CAPABILITIES",
            "AGENT", "NAME", "STATE", "LAST SEEN"
        );
    }
    loop {
        let request = json!({
            "capability": args.capability,
            "state": args.state,
            "limit": args.limit,
            "cursor": cursor,
        });
        let page = client.call("agent", "list", &request).await?;
        for agent in page["agents"].as_array().into_iter().flatten() {
            if args.json {
                println!("{agent}");
            } else {
                println!("{}", agent_row(agent));
            }
        }
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(()),
        }
    }
}

fn agent_row(agent: &Value) -> String {
    let capabilities: Vec<&str> = agent["capabilities"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut state = agent["state"].as_str().unwrap_or("?").to_owned();
    if agent["deregistered"].as_bool() == Some(true) {
        state.push('*');
    }
    format!(
        "{:<24} {:<24} {:<13} {:<25} {}",
        agent["agentId"].as_str().unwrap_or("?"),
        agent["agentName"].as_str().unwrap_or(""),
        state,
        agent["lastSeen"].as_str().unwrap_or(""),
        capabilities.join(","),
    )
}

async fn agent_get(settings: &Settings, agent_id: &str, json: bool) -> Result<(), CliError> {
    let client = api(settings).await?;
    let agent = client
        .call("agent", "get", &json!({ "agentId": agent_id }))
        .await?;
    if json {
        println!("{agent}");
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&agent).unwrap_or_default()
        );
    }
    Ok(())
}

async fn watch(settings: &Settings, args: WatchArgs) -> Result<(), CliError> {
    let subject = match (&args.agent, &args.session) {
        (Some(agent), _) => subjects::agent_status(agent),
        (_, Some(session)) => subjects::session_status(session),
        _ => Ok(subjects::STATUS_ALL.to_owned()),
    }
    .map_err(|e| CliError::Api(ApiError::bad_request(e.to_string())))?;
    let client = connect(settings).await?;
    let mut subscription = client
        .subscribe(subject)
        .await
        .map_err(|e| CliError::Unavailable(e.to_string()))?;
    while let Some(message) = subscription.next().await {
        let text = String::from_utf8_lossy(&message.payload);
        if args.json {
            println!("{text}");
            continue;
        }
        match serde_json::from_str::<Value>(&text) {
            Ok(event) => println!("{}", status_line(&event)),
            Err(_) => println!("{} {text}", message.subject),
        }
    }
    Ok(())
}

/// One readable line for a status event.
pub fn status_line(event: &Value) -> String {
    let data = &event["data"];
    let time = event["time"].as_str().unwrap_or("");
    let kind = data["kind"].as_str().unwrap_or("?");
    let seq = data["seq"].as_u64().unwrap_or(0);
    if let Some(agent) = data["agentId"]
        .as_str()
        .filter(|_| data["sessionId"].is_null())
    {
        let state = data["state"].as_str().unwrap_or("?");
        let transition = match data["previousState"].as_str() {
            Some(previous) => format!("{previous} -> {state}"),
            None => state.to_owned(),
        };
        return format!("{time} agent {agent} #{seq} {kind} {transition}");
    }
    let session = data["sessionId"].as_str().unwrap_or("?");
    let mut line = format!("{time} session {session} #{seq} {kind}");
    for field in ["taskDefinitionId", "status", "agentId", "attempt"] {
        match &data[field] {
            Value::Null => {}
            Value::String(s) => line.push_str(&format!(" {field}={s}")),
            other => line.push_str(&format!(" {field}={other}")),
        }
    }
    line
}
