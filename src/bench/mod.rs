//! `opscore-bench`: drives a running worker through NATS only, as agents and clients do, and
//! measures it against the ceiling of the bus itself.
//!
//! Simulated agents publish on their own connections; watches on the status streams see what
//! the worker applied, and every latency is taken between two points the harness observes
//! itself (a publish and a status event, a result and the next assignment). The worker is
//! either one already running or child processes of the `opscore` binary
//! (`--spawn-worker`); the harness never links the worker's code into its measurements.
//! `docs/performance.md` explains every figure.

mod agents;
mod bridge;
mod ceiling;
mod deployment;
mod floor;
mod ingest;
pub mod metrics;
pub mod probe;
mod publish;
mod registry;
pub mod relay;
pub mod report;
mod scaleout;
mod servers;
pub mod stats;
mod taskagents;
mod workers;
mod workflow;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::info;

pub use self::report::Report;
use self::report::ScenarioReport;
use self::servers::Servers;
use self::stats::Clock;
use self::workers::SpawnConfig;

/// Which scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Ingest,
    Workflow,
    Registry,
    Scaleout,
    Bridge,
    Floor,
    All,
}

/// What to run and how hard; every loop is bounded by a count and by a time.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct Options {
    /// The scenario to run.
    #[arg(long, value_enum, default_value = "all")]
    pub scenario: Scenario,
    /// NATS server of the worker under test (ignored with --start-servers).
    #[arg(long = "nats", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Redis of spawned workers (ignored with --start-servers).
    #[arg(long = "redis", default_value = "redis://127.0.0.1:6379/0")]
    pub redis_url: String,
    /// Start a private nats-server (JetStream, temporary store) and redis-server (no
    /// persistence) on free loopback ports for this run, and stop them at the end.
    #[arg(long)]
    pub start_servers: bool,
    /// Run the worker as child processes of this `opscore` binary, fresh for each scenario;
    /// without it, a worker must already serve on the NATS server.
    #[arg(long, value_name = "PATH_TO_OPSCORE")]
    pub spawn_worker: Option<PathBuf>,
    /// `RUST_LOG` of spawned workers; with anything but `warn` their logs are kept and
    /// their directory printed, for diagnosis.
    #[arg(long, default_value = "warn")]
    pub worker_log: String,
    /// Worker processes to spawn for the ingest, workflow and registry scenarios.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// NATS connections the publishing agents (and the ceiling) are spread over.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Publishes in flight without an acknowledgement, per connection.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// How long the JetStream ceiling is measured, in seconds, before each scenario.
    #[arg(long, default_value_t = 5)]
    pub ceiling_secs: u64,
    /// Ingest: agents reporting states.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Ingest: state events of the saturation phase.
    #[arg(long, default_value_t = 50_000)]
    pub events: u64,
    /// Ingest, saturation: events published but not yet seen applied, at most.
    #[arg(long, default_value_t = 1000)]
    pub backlog: u64,
    /// Ingest: offered rate of the fixed-rate phase, events per second.
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// Length of each fixed-rate phase, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Longest a saturation phase may publish or trigger, in seconds.
    #[arg(long, default_value_t = 60)]
    pub max_phase_secs: u64,
    /// How long to wait after the last publish for everything to be applied, in seconds.
    #[arg(long, default_value_t = 30)]
    pub drain_secs: u64,
    /// Workflow: agents completing tasks.
    #[arg(long, default_value_t = 32)]
    pub workflow_agents: usize,
    /// Workflow: `maxConcurrentTasks` of each agent.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// Workflow: sessions of the saturation phase.
    #[arg(long, default_value_t = 2000)]
    pub sessions: u64,
    /// Workflow, saturation: sessions running at once, at most.
    #[arg(long, default_value_t = 100)]
    pub concurrency: u64,
    /// Workflow: offered rate of the fixed-rate phase, tasks per second (sessions alternate
    /// a 3-task chain and a 5-task fan-out/fan-in, 4 tasks on average).
    #[arg(long, default_value_t = 500.0)]
    pub task_rate: f64,
    /// Registry: sizes to register, each against a fresh worker when spawning.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    pub registry_agents: Vec<usize>,
    /// Registry: `agent.list` calls measured per listing.
    #[arg(long, default_value_t = 200)]
    pub list_calls: usize,
    /// Registry: length of the dispatch phase run against the large registry, in seconds.
    #[arg(long, default_value_t = 5)]
    pub registry_dispatch_secs: u64,
    /// Bridge: HTTP requests in flight in each phase, one phase per value; at most `--agents`.
    #[arg(long, value_delimiter = ',', default_value = "1,50")]
    pub bridge_concurrency: Vec<usize>,
    /// Bridge: state reports posted in each phase.
    #[arg(long, default_value_t = 20_000)]
    pub bridge_requests: u64,
    /// Floor: the `opscore-bench` binary that serves as the relay; by default this one.
    #[arg(long, value_name = "PATH_TO_OPSCORE_BENCH")]
    pub relay_binary: Option<PathBuf>,
}

/// Why a run could not complete.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Nats {
        what: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: crate::api::ApiError,
    },
    #[error(transparent)]
    Config(crate::config::ConfigError),
    #[error("setup: {0}")]
    Setup(String),
    #[error("{what} timed out after {seconds} s")]
    Timeout { what: String, seconds: u64 },
}

impl BenchError {
    fn nats(what: impl Into<String>, source: impl Into<async_nats::Error>) -> Self {
        Self::Nats {
            what: what.into(),
            source: source.into(),
        }
    }

    fn api(what: impl Into<String>, source: crate::api::ApiError) -> Self {
        Self::Api {
            what: what.into(),
            source,
        }
    }
}

/// What every scenario of a run shares.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) options: Options,
    pub(crate) clock: Clock,
    /// Eight hex digits; every id, subject and key the run creates carries it.
    pub(crate) run_id: String,
    pub(crate) nats_url: String,
    /// The harness's own connection: control API calls, stream management, `$SRV` requests.
    pub(crate) control: async_nats::Client,
    pub(crate) spawn: Option<SpawnConfig>,
    /// Server processes the harness started, by name, for CPU accounting.
    pub(crate) servers: Vec<(String, u32)>,
}

impl Context {
    pub(crate) fn deadline(&self, seconds: u64) -> Instant {
        Instant::now() + Duration::from_secs(seconds)
    }
}

/// Runs the chosen scenarios and returns every figure.
pub async fn run(options: Options) -> Result<Report, BenchError> {
    let started = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if matches!(
        options.scenario,
        Scenario::Scaleout | Scenario::Bridge | Scenario::Floor
    ) && options.spawn_worker.is_none()
    {
        return Err(BenchError::Usage(
            "the scaleout, bridge and floor scenarios start their own processes: give \
             --spawn-worker"
                .to_owned(),
        ));
    }
    if let Some(binary) = &options.spawn_worker {
        workers::check_binary(binary)?;
    }
    let keep_logs = options.worker_log != "warn";
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let dir = workers::run_dir(&run_id)?;

    let servers = if options.start_servers {
        Some(Servers::start(&dir).await?)
    } else {
        None
    };
    let result = run_with(options, run_id, &dir, servers.as_ref(), started, started_at).await;
    if let Some(servers) = servers {
        servers.stop().await;
    }
    if result.is_ok() && !keep_logs {
        // Worker logs are kept only when something went wrong or when asked for.
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        info!(directory = %dir.display(), "worker logs kept");
    }
    result
}

async fn run_with(
    options: Options,
    run_id: String,
    dir: &std::path::Path,
    servers: Option<&Servers>,
    started: Instant,
    started_at: String,
) -> Result<Report, BenchError> {
    let nats_url = servers.map_or_else(|| options.nats_url.clone(), Servers::nats_url);
    let redis_url = servers.map_or_else(|| options.redis_url.clone(), Servers::redis_url);
    let control = agents::connect(&nats_url, "opscore-bench control", None).await?;
    let machine = probe::Machine::read(&control);
    let spawn = options.spawn_worker.as_ref().map(|binary| SpawnConfig {
        binary: binary.clone(),
        nats_url: nats_url.clone(),
        redis_url,
        run_id: run_id.clone(),
        log_dir: dir.to_owned(),
        log_level: options.worker_log.clone(),
        relay_binary: options.relay_binary.clone(),
    });
    if let Some(spawn) = &spawn {
        spawn.prepare(&control).await?;
    }
    let server_pids = servers
        .map(|s| {
            [&s.nats, &s.redis]
                .into_iter()
                .filter_map(|p| Some((p.name.to_owned(), p.pid()?)))
                .collect()
        })
        .unwrap_or_default();
    let context = Context {
        options,
        clock: Clock::new(),
        run_id,
        nats_url,
        control,
        spawn,
        servers: server_pids,
    };
    info!(run_id = %context.run_id, scenario = ?context.options.scenario, "benchmark starting");

    let scenarios = run_scenarios(&context).await;
    if let Some(spawn) = &context.spawn {
        spawn.cleanup(&context.control).await;
    }
    Ok(Report {
        run_id: context.run_id.clone(),
        started_at,
        machine,
        servers: if servers.is_some() {
            format!("private ({})", context.nats_url)
        } else {
            context.nats_url.clone()
        },
        worker: if context.spawn.is_some() {
            "spawned".to_owned()
        } else {
            "external".to_owned()
        },
        parameters: context.options.clone(),
        scenarios: scenarios?,
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

async fn run_scenarios(context: &Context) -> Result<Vec<ScenarioReport>, BenchError> {
    let scenario = context.options.scenario;
    let wants = |s: Scenario| scenario == s || scenario == Scenario::All;
    let mut reports = Vec::new();
    if wants(Scenario::Ingest) {
        reports.push(ScenarioReport::Ingest(ingest::run(context).await?));
    }
    if wants(Scenario::Workflow) {
        reports.push(ScenarioReport::Workflow(workflow::run(context).await?));
    }
    if wants(Scenario::Registry) {
        reports.push(ScenarioReport::Registry(registry::run(context).await?));
    }
    if wants(Scenario::Scaleout) {
        if context.spawn.is_some() {
            reports.push(ScenarioReport::Scaleout(scaleout::run(context).await?));
        } else {
            info!("scaleout skipped: it needs --spawn-worker");
        }
    }
    if wants(Scenario::Bridge) {
        if context.spawn.is_some() {
            reports.push(ScenarioReport::Bridge(bridge::run(context).await?));
        } else {
            info!("bridge skipped: it needs --spawn-worker");
        }
    }
    if wants(Scenario::Floor) {
        if context.spawn.is_some() {
            reports.push(ScenarioReport::Floor(Box::new(floor::run(context).await?)));
        } else {
            info!("floor skipped: it needs --spawn-worker");
        }
    }
    Ok(reports)
}
