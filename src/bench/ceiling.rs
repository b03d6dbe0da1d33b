//! The ceiling of the bus itself: JetStream publish-with-ack of messages the size of a state
//! report, into a scratch stream, with the same connections and acknowledgement window as the
//! ingest publisher. opscore cannot apply events faster than the bus stores them, so its
//! figures are reported as a ratio of this one, taken on the same servers in the same run.

use std::time::{Duration, Instant};

use async_nats::Subject;
use async_nats::jetstream::{self, stream};
use tracing::debug;

use super::agents::{self, state_payload};
use super::publish::{self, Pace, Plan, Tally, shares};
use super::report::Ceiling;
use super::stats::{self, Clock};
use super::{BenchError, Context};

/// Measures the ceiling with `messages` publishes (or fewer if `max_duration` runs out).
pub(crate) async fn measure(
    context: &Context,
    messages: u64,
    max_duration: Duration,
) -> Result<Ceiling, BenchError> {
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

    let result = publish_all(context, messages, max_duration).await;
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

async fn publish_all(
    context: &Context,
    messages: u64,
    max_duration: Duration,
) -> Result<(Tally, usize), BenchError> {
    let options = &context.options;
    let clock = context.clock;
    let run = context.run_id.clone();
    let deadline = Instant::now() + max_duration;
    // Ids as long as the ingest agents' ids, so payloads have the same size.
    let agent_prefix = format!("b{run}-in-");
    let epoch = chrono::Utc::now();
    let sample = state_payload(
        &format!("{agent_prefix}0"),
        0,
        epoch,
        &run,
        "ceiling",
        messages,
    );

    let mut clients = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    let parts = shares(messages, options.connections);
    let agents = options.agents.max(1) as u64;
    let mut offset = 0;
    for (c, count) in parts.into_iter().enumerate() {
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
        let (run, prefix, start) = (run.clone(), agent_prefix.clone(), offset);
        offset += count;
        tasks.spawn(async move {
            publish::publish(&jetstream, count, &plan, clock, |i, _| {
                let n = start + i;
                let agent = format!("{prefix}{}", n % agents);
                let subject = Subject::from(format!("bench.ceiling.{run}.{agent}.state"));
                let payload = state_payload(&agent, n / agents, epoch, &run, "ceiling", n);
                (subject, payload)
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
    Ok((total, sample.len()))
}
