//! The ceiling of the bus itself: JetStream publish-with-ack of messages the size of a state
//! report, into a scratch stream, with the same connections and acknowledgement window as the
//! ingest publisher. opscore cannot apply events faster than the bus stores them, so its
//! figures are reported as a ratio of this one, taken on the same servers in the same run.

use std::time::{Duration, Instant};

use async_nats::Subject;
use async_nats::jetstream::{self, stream};
use tracing::debug;

use super::agents::{self, state_payload};
use super::publish::{self, Next, Pace, Plan, Tally};
use super::report::Ceiling;
use super::stats;
use super::{BenchError, Context};

/// Measures the ceiling by publishing for `--ceiling-secs`.
pub(crate) async fn measure(context: &Context) -> Result<Ceiling, BenchError> {
    let options = &context.options;
    let run = &context.run_id;
    let name = format!("BENCH_CEILING_{run}");
    let subjects = format!("bench.ceiling.{run}.>");
    let jetstream = jetstream::new(context.control.clone());
    // File storage and one replica, as the opscore streams are configured by default.
    jetstream
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subjects],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| BenchError::nats("create the ceiling stream", e))?;

    // Bounded by time, not by count: the bus is fast enough that a fixed count would be
    // over in a fraction of a second, too short to be a stable figure.
    let duration = Duration::from_secs(options.ceiling_secs.max(1));
    let result = publish_all(context, duration).await;
    if let Err(error) = jetstream.delete_stream(&name).await {
        debug!(%error, "deleting the ceiling stream");
    }
    let (tally, message_bytes) = result?;
    let span = tally.last_ack_ns.saturating_sub(tally.first_ns);
    Ok(Ceiling {
        messages: tally.acked,
        failed: tally.failed,
        message_bytes,
        connections: options.connections,
        window: options.window,
        seconds: stats::seconds(span),
        per_second: stats::per_second(tally.acked, span),
    })
}

async fn publish_all(context: &Context, duration: Duration) -> Result<(Tally, usize), BenchError> {
    let options = &context.options;
    let clock = context.clock;
    let run = context.run_id.clone();
    let deadline = Instant::now() + duration;
    // More than any connection can publish before the deadline.
    let per_connection = u64::from(u32::MAX);
    // Ids as long as the ingest agents' ids and marks as long as the ingest phases' marks,
    // so payloads have the size of an ingest state report.
    let agent_prefix = format!("b{run}-in-");
    let agents = options.agents.max(1) as u64;
    let epoch = chrono::Utc::now();
    let size = |n: u64| {
        state_payload(
            &format!("{agent_prefix}{}", n % agents),
            n / agents,
            epoch,
            &run,
            "ceil",
            n % options.events.max(1),
        )
        .len()
    };

    let mut clients = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    let connections = options.connections.max(1) as u64;
    for c in 0..connections {
        let client = agents::connect(
            &context.nats_url,
            &format!("opscore-bench ceiling {c}"),
            None,
        )
        .await?;
        let jetstream = jetstream::new(client.clone());
        clients.push(client);
        let plan = Plan {
            window: options.window,
            pace: Pace::FlatOut,
            deadline,
            gate: None,
        };
        let (run, prefix, events) = (run.clone(), agent_prefix.clone(), options.events.max(1));
        tasks.spawn(async move {
            publish::publish(&jetstream, per_connection, &plan, clock, |i, _| {
                // Numbered as the ingest publisher numbers its events, wrapping at --events.
                let n = i * connections + c;
                let agent = format!("{prefix}{}", n % agents);
                let subject = Subject::from(format!("bench.ceiling.{run}.{agent}.state"));
                let payload = state_payload(&agent, n / agents, epoch, &run, "ceil", n % events);
                Next::Send(subject, payload)
            })
            .await
        });
    }
    let mut total = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(tally) => total.merge(tally),
            Err(error) => return Err(BenchError::Setup(format!("ceiling publisher: {error}"))),
        }
    }
    for client in clients {
        let _ = client.drain().await;
    }
    // The size of a typical message: one from the middle of an ingest phase.
    Ok((total, size(options.events / 2)))
}
