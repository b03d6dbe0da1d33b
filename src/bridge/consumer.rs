//! The durable consumer on `OPSCORE_DISPATCH` the bridge delivers from, and its pull loop.
//!
//! Every bridge instance shares the consumer, so each dispatch message reaches one of them.
//! Messages are handled concurrently, since one slow AgentKit endpoint must not hold up the
//! assignments of other agents; what each message leads to is [`Deliverer::process`]'s.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::delivery::Deliverer;
use crate::bus::{BusError, DISPATCH_STREAM};
use crate::subjects;

/// Deliveries in progress at once, across all agents.
const CONCURRENCY: usize = 64;
/// How long JetStream waits for an acknowledgement before redelivering. A delivery that
/// retries sends a progress acknowledgement before each attempt.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// Creates the durable consumer the bridge delivers from, or returns it if it exists.
pub(crate) async fn ensure(
    jetstream: &jetstream::Context,
    name: &str,
) -> Result<consumer::PullConsumer, BusError> {
    let error = |source: async_nats::Error| BusError::Consumer {
        consumer: name.to_owned(),
        source,
    };
    let stream = jetstream
        .get_stream(DISPATCH_STREAM)
        .await
        .map_err(|e| error(e.into()))?;
    let config = consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        description: Some("opscore bridge: assignments for http agents".to_owned()),
        // From the start of the stream: assignments made before the first bridge started are
        // delivered too, and those whose deadline has passed are skipped cheaply.
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_deliver: -1,
        max_ack_pending: (CONCURRENCY * 2) as i64,
        filter_subject: subjects::DISPATCH_ALL.to_owned(),
        ..Default::default()
    };
    stream
        .get_or_create_consumer(name, config)
        .await
        .map_err(|e| error(e.into()))
}

/// Delivers until `shutdown`, then lets deliveries in progress finish for at most `grace`;
/// what is left unacknowledged is redelivered after the ack wait.
pub(crate) async fn run(
    consumer: consumer::PullConsumer,
    deliverer: Arc<Deliverer>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut tasks = JoinSet::new();
    pull(&consumer, &deliverer, &mut tasks, &shutdown).await;
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    match drained {
        Ok(()) => info!("delivery drained"),
        Err(_) => {
            warn!(
                grace_secs = grace.as_secs(),
                unfinished = tasks.len(),
                "grace period over; unfinished assignments will be redelivered"
            );
            tasks.abort_all();
        }
    }
}

async fn pull(
    consumer: &consumer::PullConsumer,
    deliverer: &Arc<Deliverer>,
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) {
    // A permit is taken before each message, so at most CONCURRENCY deliveries run and the
    // rest wait in JetStream rather than in memory.
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    while !shutdown.is_cancelled() {
        let Some(mut messages) = crate::bus::pull_messages(consumer, CONCURRENCY, shutdown).await
        else {
            return;
        };
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => return,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    let deliverer = deliverer.clone();
                    let shutdown = shutdown.clone();
                    tasks.spawn(async move {
                        deliverer.process(message, &shutdown).await;
                        drop(permit);
                    });
                    while tasks.try_join_next().is_some() {}
                }
                // A missed heartbeat usually means the pull request died with a connection;
                // a new stream asks again at once instead of waiting for it to expire.
                Some(Err(error)) => {
                    debug!(%error, "pull stream error; pulling anew");
                    break;
                }
                None => break,
            }
        }
    }
}
