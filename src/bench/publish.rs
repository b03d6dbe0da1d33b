//! Pipelined JetStream publishing, shared by the ceiling and the simulated agents: many
//! publishes in flight on one connection, a bounded number of unacknowledged ones, and either
//! no pacing or a fixed offered rate.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Subject;
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::time::MissedTickBehavior;
use tracing::debug;

use super::stats::{Clock, Gate};

/// The pacing tick of an offered rate. Each tick sends what the rate allows by then, so the
/// offered load does not drift when a tick comes late.
const TICK: Duration = Duration::from_millis(1);

/// How long a publisher waits before asking again for a message that was not ready.
const NOT_YET_WAIT: Duration = Duration::from_millis(5);

/// What the message source has for the publisher.
#[derive(Debug)]
pub(crate) enum Next {
    Send(Subject, Bytes),
    /// The next message may not leave yet (its agent still has one in flight).
    NotYet,
}

/// How fast to publish.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Pace {
    /// As fast as acknowledgements (and the gate, if any) allow.
    FlatOut,
    /// A fixed number of messages per second.
    Rate(f64),
}

/// How one connection publishes its share of a phase.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Publishes sent but not yet acknowledged, at most.
    pub(crate) window: usize,
    pub(crate) pace: Pace,
    /// Nothing is published after this.
    pub(crate) deadline: Instant,
    /// Completions the publisher waits for, beyond acknowledgements.
    pub(crate) gate: Option<Arc<Gate>>,
}

/// What one or more publishers did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) sent: u64,
    pub(crate) acked: u64,
    pub(crate) failed: u64,
    /// Clock time of the first publish, 0 if none.
    pub(crate) first_ns: u64,
    /// Clock time at which the last acknowledgement was seen.
    pub(crate) last_ack_ns: u64,
}

impl Tally {
    pub(crate) fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        self.acked += other.acked;
        self.failed += other.failed;
        self.first_ns = match (self.first_ns, other.first_ns) {
            (0, t) | (t, 0) => t,
            (a, b) => a.min(b),
        };
        self.last_ack_ns = self.last_ack_ns.max(other.last_ack_ns);
    }
}

/// Publishes `count` messages made by `next(i, now_ns)` on `jetstream`, following `plan`.
///
/// `next` is called just before each publish with the clock time, so a caller can stamp the
/// message (the time travels in the payload or is kept by index) at the moment it leaves. It
/// may answer [`Next::NotYet`]; it is then asked again for the same message a little later.
pub(crate) async fn publish<F>(
    jetstream: &jetstream::Context,
    count: u64,
    plan: &Plan,
    clock: Clock,
    mut next: F,
) -> Tally
where
    F: FnMut(u64, u64) -> Next,
{
    let mut tally = Tally::default();
    let mut acks = FuturesUnordered::new();
    let started = Instant::now();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut i = 0;
    'phase: while i < count && Instant::now() < plan.deadline {
        let allowed = match plan.pace {
            Pace::FlatOut => count,
            Pace::Rate(per_second) => {
                ticker.tick().await;
                let due = (started.elapsed().as_secs_f64() * per_second).floor() as u64 + 1;
                due.min(count)
            }
        };
        while i < allowed {
            if let Some(gate) = &plan.gate
                && !gate.admit(plan.deadline).await
            {
                break 'phase;
            }
            while acks.len() >= plan.window {
                settle(&mut tally, acks.next().await, plan, clock);
            }
            let (subject, payload) = loop {
                let now = clock.now_ns();
                if let Next::Send(subject, payload) = next(i, now) {
                    if tally.first_ns == 0 {
                        tally.first_ns = now;
                    }
                    break (subject, payload);
                }
                if Instant::now() >= plan.deadline {
                    break 'phase;
                }
                // Woken by the next completion, or soon after in any case.
                match &plan.gate {
                    Some(gate) => gate.changed(NOT_YET_WAIT).await,
                    None => tokio::time::sleep(NOT_YET_WAIT).await,
                }
            };
            i += 1;
            match jetstream.publish(subject, payload).await {
                Ok(ack) => {
                    tally.sent += 1;
                    acks.push(ack.into_future());
                }
                Err(error) => {
                    debug!(%error, "publish failed");
                    tally.failed += 1;
                    release(plan);
                }
            }
            if Instant::now() >= plan.deadline {
                break 'phase;
            }
        }
    }
    while let Some(ack) = acks.next().await {
        settle(&mut tally, Some(ack), plan, clock);
    }
    tally
}

fn settle<E: std::fmt::Display>(
    tally: &mut Tally,
    ack: Option<Result<jetstream::publish::PublishAck, E>>,
    plan: &Plan,
    clock: Clock,
) {
    match ack {
        Some(Ok(_)) => {
            tally.acked += 1;
            tally.last_ack_ns = clock.now_ns();
        }
        Some(Err(error)) => {
            debug!(%error, "publish not acknowledged");
            tally.failed += 1;
            release(plan);
        }
        None => {}
    }
}

/// A message that never reached the stream will never complete: give its place back.
fn release(plan: &Plan) {
    if let Some(gate) = &plan.gate {
        gate.complete(1);
    }
}

/// Splits `total` into `parts` shares that differ by at most one, larger shares first.
pub(crate) fn shares(total: u64, parts: usize) -> Vec<u64> {
    let parts = parts.max(1) as u64;
    (0..parts)
        .map(|p| total / parts + u64::from(p < total % parts))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_total() {
        assert_eq!(shares(10, 3), vec![4, 3, 3]);
        assert_eq!(shares(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(shares(5, 0), vec![5]);
    }

    #[test]
    fn tallies_merge_to_the_earliest_start_and_latest_ack() {
        let mut a = Tally {
            sent: 2,
            acked: 2,
            failed: 0,
            first_ns: 50,
            last_ack_ns: 90,
        };
        a.merge(Tally {
            sent: 1,
            acked: 0,
            failed: 1,
            first_ns: 40,
            last_ack_ns: 0,
        });
        assert_eq!((a.sent, a.acked, a.failed), (3, 2, 1));
        assert_eq!((a.first_ns, a.last_ack_ns), (40, 90));
    }
}
