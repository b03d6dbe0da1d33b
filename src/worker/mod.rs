//! `opscore run`: connects, prepares the streams, and runs the intake, the timers and the
//! control API until asked to stop.

mod agents;
mod consumer;
mod handler;
mod timers;

use std::time::Duration;

use async_nats::jetstream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

pub use self::agents::{Agents, CommandOutcome};
pub use self::handler::{Delivery, Handler, HandlerOptions, Outcome};
pub use self::timers::{TimerReport, run_due};
use crate::api;
use crate::bus::{self, BusError, Publisher};
use crate::config::{Backend, Settings};
use crate::envelope::Limits;
use crate::repository::{
    MemoryRepository, RedisRepository, Repository, RepositoryError, RepositoryOptions,
};

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("redis: {0}")]
    Repository(#[from] RepositoryError),
    #[error("control api: {0}")]
    Api(async_nats::Error),
}

/// Repository options from the configuration.
pub fn repository_options(settings: &Settings) -> RepositoryOptions {
    RepositoryOptions {
        history_length: settings.agents.history_length,
        dedupe_window: chrono::Duration::seconds(settings.worker.dedupe_window_secs as i64),
        ..RepositoryOptions::default()
    }
}

/// Runs the worker until `shutdown` is cancelled, then drains within the grace period.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), StartError> {
    let options = repository_options(&settings);
    match settings.storage.backend {
        Backend::Redis => {
            let redis = &settings.redis;
            let repository = RedisRepository::connect(
                redis.url.expose(),
                &redis.key_prefix,
                Duration::from_millis(redis.response_timeout_ms),
                Duration::from_millis(redis.connect_timeout_ms),
                options,
            )?;
            run_with(settings, repository, shutdown).await
        }
        Backend::Memory => {
            info!("storage backend is memory: state is lost when the process exits");
            run_with(settings, MemoryRepository::new(options), shutdown).await
        }
    }
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
        servers = %settings.nats.servers.join(","),
        consumer = %settings.worker.consumer,
        "streams and consumer ready"
    );

    let publisher = Publisher::new(jetstream);
    let liveness = chrono::Duration::seconds(settings.agents.liveness_timeout_secs as i64);
    let agents = Agents::new(repository.clone(), publisher.clone(), liveness);
    let worker = &settings.worker;
    let handler = Handler::new(
        agents.clone(),
        publisher,
        HandlerOptions {
            limits: Limits {
                max_bytes: worker.max_message_bytes,
                max_depth: worker.max_json_depth,
            },
            retry_delay: Duration::from_millis(worker.retry_delay_ms),
            unknown_agent_retries: worker.unknown_agent_retries,
            unknown_agent_retry_delay: Duration::from_millis(worker.unknown_agent_retry_delay_ms),
        },
    );
    let service = api::start(&client, repository, &settings)
        .await
        .map_err(StartError::Api)?;

    let mut tasks = JoinSet::new();
    tasks.spawn(
        consumer::run(
            consumer,
            handler,
            worker.max_in_flight,
            shutdown.clone(),
            worker.shutdown_grace(),
        )
        .instrument(info_span!("consumer")),
    );
    tasks.spawn(
        timers::run(agents, settings.agents.timer_interval(), shutdown.clone())
            .instrument(info_span!("timer")),
    );
    tasks.spawn(
        service
            .serve(shutdown.clone())
            .instrument(info_span!("api")),
    );
    info!("opscore is running");

    while tasks.join_next().await.is_some() {}
    // Pending publishes (acks and naks) leave before the connection closes.
    if let Err(error) = client.flush().await {
        info!(%error, "nats flush at shutdown failed");
    }
    info!("opscore stopped");
    Ok(())
}
