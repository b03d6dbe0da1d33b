//! The intake: pulls from the shared durable consumer and hands each message to a lane.
//!
//! Messages are spread over lanes by agent id, and each lane handles its messages one at a
//! time, so the events of one agent are applied in the order the stream holds them (a register
//! before the state that follows it) while different agents proceed in parallel.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::handler::{Delivery, Handler, Outcome};
use crate::admin::Loops;
use crate::bus;
use crate::repository::Repository;

/// Messages queued per lane before the intake waits for the lane.
const LANE_CAPACITY: usize = 8;

/// What the intake hands each message to: the worker's [`Handler`], or the benchmark's
/// relay, which measures the intake and the bus without the registry and storage.
pub(crate) trait Handle: Clone + Send + Sync + 'static {
    fn handle(&self, delivery: &Delivery) -> impl Future<Output = Outcome> + Send;
}

impl<R: Repository> Handle for Handler<R> {
    fn handle(&self, delivery: &Delivery) -> impl Future<Output = Outcome> + Send {
        Handler::handle(self, delivery)
    }
}

/// Runs the intake until `shutdown`, then lets the lanes finish what they hold, for at most
/// `grace`.
pub(crate) async fn run<H: Handle>(
    consumer: PullConsumer,
    handler: H,
    loops: Arc<Loops>,
    lanes: usize,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut workers = JoinSet::new();
    let senders: Vec<mpsc::Sender<jetstream::Message>> = (0..lanes)
        .map(|lane| {
            let (sender, receiver) = mpsc::channel(LANE_CAPACITY);
            let handler = handler.clone();
            workers.spawn(run_lane(handler, receiver).instrument(info_span!("lane", lane)));
            sender
        })
        .collect();

    loops.set_intake_running(true);
    pull(&consumer, &senders, lanes, &shutdown).await;
    loops.set_intake_running(false);

    // Stop intake: dropping the senders ends each lane once its queue is empty.
    drop(senders);
    let drained = tokio::time::timeout(grace, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => info!("intake drained; every handled message was acknowledged"),
        Err(_) => {
            warn!(
                grace_secs = grace.as_secs(),
                unfinished_lanes = workers.len(),
                "grace period over; unfinished messages will be redelivered"
            );
            workers.abort_all();
        }
    }
}

async fn pull(
    consumer: &PullConsumer,
    senders: &[mpsc::Sender<jetstream::Message>],
    lanes: usize,
    shutdown: &CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let Some(mut messages) = bus::pull_messages(consumer, lanes.max(16), shutdown).await else {
            return;
        };
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    let lane = lane_of(&message.subject, lanes);
                    if senders[lane].send(message).await.is_err() {
                        return;
                    }
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

/// The lane of a subject: a stable hash of its agent id token.
fn lane_of(subject: &str, lanes: usize) -> usize {
    let agent = subject.split('.').nth(2).unwrap_or(subject);
    let mut hasher = std::hash::DefaultHasher::new();
    agent.hash(&mut hasher);
    (hasher.finish() % lanes as u64) as usize
}

async fn run_lane<H: Handle>(handler: H, mut receiver: mpsc::Receiver<jetstream::Message>) {
    while let Some(message) = receiver.recv().await {
        let Ok(info) = message.info() else {
            // Not a JetStream delivery: nothing to acknowledge and nothing to apply.
            continue;
        };
        let delivery = Delivery {
            subject: message.subject.to_string(),
            headers: message.headers.clone(),
            payload: message.payload.clone(),
            stream_seq: info.stream_sequence,
            delivered: u64::try_from(info.delivered).unwrap_or(1),
        };
        let span = info_span!(
            "message",
            subject = %delivery.subject,
            stream_seq = delivery.stream_seq,
            trace_id = tracing::field::Empty,
        );
        let traceparent = delivery
            .headers
            .as_ref()
            .and_then(|headers| headers.get(crate::trace::HEADER));
        if let Some(traceparent) = traceparent {
            crate::telemetry::set_remote_parent(&span, traceparent.as_str());
        }
        let outcome = handler.handle(&delivery).instrument(span).await;
        debug!(subject = %delivery.subject, stream_seq = delivery.stream_seq, ?outcome, "handled");
        let ack = match outcome {
            Outcome::Applied | Outcome::Stale | Outcome::Duplicate => AckKind::Ack,
            Outcome::DeadLettered(_) => AckKind::Term,
            // A plain nak redelivers at once; the delay is what makes the retry a backoff.
            Outcome::Retry(delay) => AckKind::Nak(Some(delay)),
        };
        crate::faults::crash_point("before_ack");
        if let Err(error) = message.ack_with(ack).await {
            // The message will be redelivered after the ack wait and recognised as a
            // duplicate, so this costs time, not correctness.
            debug!(%error, stream_seq = delivery.stream_seq, "acknowledgement failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_agent_always_maps_to_one_lane() {
        let a = lane_of("opscore.agent.a1.register", 64);
        assert_eq!(lane_of("opscore.agent.a1.state", 64), a);
        assert_eq!(lane_of("opscore.agent.a1.task.result", 64), a);
        assert!(lane_of("weird", 64) < 64);
    }
}
