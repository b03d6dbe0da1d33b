//! `opscore run`: connects, prepares the streams, and runs the intake, the timers and the
//! control API until asked to stop.

mod agents;
mod claims;
pub(crate) mod consumer;
mod gates;
mod handler;
mod recover;
mod sessions;
mod timers;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

pub use self::agents::{Agents, CommandOutcome};
pub use self::gates::Gates;
pub use self::handler::{Delivery, Handler, HandlerOptions, Outcome};
pub use self::recover::{RecoverError, Recovery, recover};
pub use self::sessions::{
    Report, SessionOutcome, Sessions, Trigger, TriggerError, Triggered, session_of_task,
};
pub use self::timers::{GenerationWatch, ReconcileReport, TimerReport, reconcile, run_due};
use crate::admin::{self, Admin, Loops};
use crate::api;
use crate::bus::{self, BusError, Publisher};
use crate::config::{Backend, Settings};
use crate::repository::{
    DefineOutcome, MemoryRepository, RedisRepository, Repository, RepositoryError,
    RepositoryOptions,
};
use crate::telemetry;
use crate::workflow::WorkflowDefinition;

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("redis: {0}")]
    Repository(#[from] RepositoryError),
    #[error("control api: {0}")]
    Api(async_nats::Error),
    #[error("workflow file {path}: {message}")]
    Workflow { path: String, message: String },
    #[error("admin port: invalid address")]
    AdminAddress,
    #[error("admin port: {0}")]
    Admin(std::io::Error),
}

/// Defines every `*.json` workflow in `directory` (empty: none). A file that does not parse
/// or validate stops startup, naming the file and the task at fault.
pub async fn load_workflows<R: Repository>(
    repository: &R,
    directory: &str,
) -> Result<usize, StartError> {
    if directory.is_empty() {
        return Ok(0);
    }
    let error = |path: &std::path::Path, message: String| StartError::Workflow {
        path: path.display().to_string(),
        message,
    };
    let entries = std::fs::read_dir(directory)
        .map_err(|e| error(std::path::Path::new(directory), e.to_string()))?;
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    for path in &paths {
        let text = std::fs::read_to_string(path).map_err(|e| error(path, e.to_string()))?;
        let definition: WorkflowDefinition =
            serde_json::from_str(&text).map_err(|e| error(path, e.to_string()))?;
        definition
            .validate()
            .map_err(|e| error(path, e.to_string()))?;
        match repository.define(&definition).await? {
            DefineOutcome::Created | DefineOutcome::Unchanged => {
                info!(workflow_id = %definition.id, version = %definition.version, "workflow defined");
            }
            DefineOutcome::VersionExists => {
                return Err(error(
                    path,
                    format!(
                        "version {} of workflow {} is already defined with other content",
                        definition.version, definition.id
                    ),
                ));
            }
        }
    }
    Ok(paths.len())
}

/// Repository options from the configuration.
pub fn repository_options(settings: &Settings) -> RepositoryOptions {
    RepositoryOptions {
        history_length: settings.agents.history_length,
        dedupe_window: chrono::Duration::seconds(settings.worker.dedupe_window_secs as i64),
        ..RepositoryOptions::default()
    }
}

/// How long the outbox cleanup may take to finish at shutdown.
const CLEANUP_GRACE: Duration = Duration::from_secs(2);

/// Runs the worker until `shutdown` is cancelled, then drains within the grace period.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), StartError> {
    match settings.storage.backend {
        Backend::Redis => {
            let repository = redis_repository(&settings)?;
            run_with(settings, repository, shutdown).await
        }
        Backend::Memory => {
            info!("storage backend is memory: state is lost when the process exits");
            let repository = MemoryRepository::new(repository_options(&settings));
            run_with(settings, repository, shutdown).await
        }
    }
}

/// The Redis repository the settings describe.
pub fn redis_repository(settings: &Settings) -> Result<RedisRepository, RepositoryError> {
    let redis = &settings.redis;
    RedisRepository::connect(
        redis.url.expose(),
        &redis.key_prefix,
        Duration::from_millis(redis.response_timeout_ms),
        Duration::from_millis(redis.connect_timeout_ms),
        repository_options(settings),
    )
}

/// Runs the worker on a given repository.
pub async fn run_with<R: Repository>(
    settings: Settings,
    repository: R,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let client = bus::connect(&settings.nats).await?;
    let jetstream = jetstream::new(client.clone());
    bus::ensure_streams(&jetstream, &settings).await?;
    let consumer = bus::events_consumer(&jetstream, &settings).await?;
    info!(
        servers = %settings.nats.servers_for_log(),
        consumer = %settings.worker.consumer,
        "streams and consumer ready"
    );

    let (publisher, cleanup) = Publisher::new(jetstream).with_outbox_cleanup(repository.clone());
    let liveness = chrono::Duration::seconds(settings.agents.liveness_timeout_secs as i64);
    let gates = Arc::new(Gates::default());
    let agents = Agents::new(
        repository.clone(),
        publisher.clone(),
        liveness,
        gates.clone(),
    );
    let sessions = Sessions::new(repository.clone(), publisher.clone(), liveness, gates);
    load_workflows(&repository, &settings.workflows.directory).await?;
    let worker = &settings.worker;
    let handler = Handler::new(
        agents.clone(),
        sessions.clone(),
        publisher.clone(),
        HandlerOptions::new(worker),
    );
    // The admin port is bound first so that its actual address (port 0 picks one) can be
    // announced in the micro service's metadata, where `$SRV.INFO` shows it.
    let admin_listener = if settings.admin.enabled {
        // Validated as an address with the rest of the configuration.
        let listen: std::net::SocketAddr = settings
            .admin
            .listen
            .parse()
            .map_err(|_| StartError::AdminAddress)?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(StartError::Admin)?;
        Some(listener)
    } else {
        None
    };
    let admin_address = admin_listener
        .as_ref()
        .and_then(|listener| listener.local_addr().ok());
    let service = api::start(
        &client,
        sessions.clone(),
        publisher.clone(),
        &settings,
        admin_address,
    )
    .await
    .map_err(StartError::Api)?;
    telemetry::metrics_handle();
    let loops = Arc::new(Loops::default());

    let mut tasks = JoinSet::new();
    if let Some(listener) = admin_listener {
        let admin = Admin {
            client: client.clone(),
            jetstream: publisher.jetstream().clone(),
            repository: repository.clone(),
            consumer: worker.consumer.clone(),
            loops: loops.clone(),
            stall: (settings.agents.timer_interval() * 20).max(Duration::from_secs(30)),
        };
        tasks
            .spawn(admin::serve(admin, listener, shutdown.clone()).instrument(info_span!("admin")));
    }
    tasks.spawn(
        consumer::run(
            consumer,
            handler,
            loops.clone(),
            worker.max_in_flight,
            shutdown.clone(),
            worker.shutdown_grace(),
        )
        .instrument(info_span!("consumer")),
    );
    tasks.spawn(
        timers::run(
            agents,
            sessions.clone(),
            loops,
            settings.agents.timer_interval(),
            shutdown.clone(),
        )
        .instrument(info_span!("timer")),
    );
    tasks.spawn(
        timers::run_reconciler(
            sessions,
            Duration::from_secs(settings.workflows.reconcile_interval_secs),
            shutdown.clone(),
        )
        .instrument(info_span!("reconciler")),
    );
    tasks.spawn(
        service
            .serve(shutdown.clone())
            .instrument(info_span!("api")),
    );
    info!("opscore is running");

    while tasks.join_next().await.is_some() {}
    // The loops are gone, and with them every clone of the publisher: the cleanup removes
    // its last batch and ends. What it cannot remove in time the sweeper republishes later,
    // as duplicates JetStream drops.
    drop(publisher);
    if tokio::time::timeout(CLEANUP_GRACE, cleanup).await.is_err() {
        info!("outbox cleanup unfinished at shutdown");
    }
    // Pending publishes (acks and naks) leave before the connection closes.
    if let Err(error) = client.flush().await {
        info!(%error, "nats flush at shutdown failed");
    }
    info!("opscore stopped");
    Ok(())
}
