//! Scenario 1, ingest: agents register, then publish state reports, first as fast as the
//! worker absorbs them (a closed loop with a bounded backlog), then at a fixed offered rate.
//! Each report is matched to its `state_changed` event on the status stream.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::agents::{AgentWatch, Pool, state_payload};
use super::ceiling;
use super::deployment::Deployment;
use super::publish::{self, Pace, Plan, shares};
use super::report::{Ceiling, IngestPhase, IngestReport};
use super::stats::{self, Gate, Percentiles};
use super::{BenchError, Context};

/// Runs the ingest scenario against `--workers` workers.
pub(crate) async fn run(context: &Context) -> Result<IngestReport, BenchError> {
    let options = &context.options;
    let deployment = Deployment::start(context, options.workers, "ingest", &[]).await?;
    let result = async {
        let ceiling = ceiling::measure(
            context,
            options.events,
            Duration::from_secs(options.max_phase_secs),
        )
        .await?;
        info!(per_second = ceiling.per_second, "jetstream ceiling measured");
        let mut ingest = Ingest::prepare(context, "in").await?;
        let saturation = ingest.saturation(context, &deployment, &ceiling).await;
        // The agents' connections are closed whatever happened, so the offered phase runs
        // only after a saturation phase that worked.
        let offered = if saturation.is_ok() {
            ingest.offered(context, &deployment, &ceiling).await
        } else {
            Err(BenchError::Setup("saturation phase failed".to_owned()))
        };
        ingest.close().await;
        deployment.wait_quiet(context).await?;
        Ok(IngestReport {
            workers: deployment.workers,
            agents: options.agents,
            ceiling,
            saturation: saturation?,
            offered: offered?,
        })
    }
    .await;
    deployment.stop().await;
    result
}

/// Registered agents ready to report, and the watch that sees their reports applied.
#[derive(Debug)]
pub(crate) struct Ingest {
    pool: Pool,
    watch: AgentWatch,
}

impl Ingest {
    /// Connects `--agents` agents (ids `b<run>-<label>-<n>`) and registers them.
    pub(crate) async fn prepare(context: &Context, label: &str) -> Result<Self, BenchError> {
        let options = &context.options;
        let prefix = format!("b{}-{label}-", context.run_id);
        let watch = AgentWatch::start(&context.nats_url, &context.run_id, &prefix, context.clock)
            .await?;
        let mut pool =
            Pool::connect(&context.nats_url, options.connections, &prefix, options.agents).await?;
        let capability = format!("bench-ingest-{}", context.run_id);
        let tally = pool
            .register(
                Arc::new(move |_| vec![capability.clone()]),
                options.window,
                context.deadline(options.max_phase_secs),
                context.clock,
            )
            .await;
        let timeout = Duration::from_secs(options.drain_secs);
        if let Err(seen) = watch.wait_registered(tally.acked, timeout).await {
            return Err(BenchError::Timeout {
                what: format!("registration of {} agents ({seen} seen)", tally.acked),
                seconds: options.drain_secs,
            });
        }
        Ok(Self { pool, watch })
    }

    /// Publishes `--events` reports as fast as the worker applies them, with at most
    /// `--backlog` published and not yet applied.
    pub(crate) async fn saturation(
        &mut self,
        context: &Context,
        deployment: &Deployment,
        ceiling: &Ceiling,
    ) -> Result<IngestPhase, BenchError> {
        let options = &context.options;
        let gate = Arc::new(Gate::new(options.backlog));
        let deadline = options.max_phase_secs;
        let events = options.events;
        self.phase(context, deployment, ceiling, "sat", events, Pace::FlatOut, Some(gate), deadline)
            .await
    }

    /// Publishes at `--rate` events per second for `--duration-secs`.
    pub(crate) async fn offered(
        &mut self,
        context: &Context,
        deployment: &Deployment,
        ceiling: &Ceiling,
    ) -> Result<IngestPhase, BenchError> {
        let options = &context.options;
        let events = (options.rate * options.duration_secs as f64).round() as u64;
        // Slack past the nominal length: a late tick must not cut the last events off.
        let deadline = options.duration_secs + 5;
        let pace = Pace::Rate(options.rate);
        self.phase(context, deployment, ceiling, "rate", events, pace, None, deadline)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn phase(
        &mut self,
        context: &Context,
        deployment: &Deployment,
        ceiling: &Ceiling,
        name: &str,
        events: u64,
        pace: Pace,
        gate: Option<Arc<Gate>>,
        max_secs: u64,
    ) -> Result<IngestPhase, BenchError> {
        let options = &context.options;
        let stamps = self.watch.begin_phase(name, events as usize, gate.clone());
        let observation = deployment.observe(context).await;
        let parts = shares(events, self.pool.groups.len());
        let offsets: Vec<u64> = parts
            .iter()
            .scan(0, |next, count| {
                let start = *next;
                *next += count;
                Some(start)
            })
            .collect();
        let (clock, epoch, run) = (context.clock, self.pool.epoch, context.run_id.clone());
        let deadline = context.deadline(max_secs);
        let tally = self
            .pool
            .on_groups(|g, mut group| {
                let (count, start) = (parts[g], offsets[g]);
                let plan = Plan {
                    window: options.window,
                    pace: match pace {
                        Pace::Rate(rate) => Pace::Rate(rate * count as f64 / events.max(1) as f64),
                        flat => flat,
                    },
                    deadline,
                    gate: gate.clone(),
                };
                let (stamps, run, name) = (stamps.clone(), run.clone(), name.to_owned());
                async move {
                    let agents = group.agents.len().max(1) as u64;
                    let tally = publish::publish(&group.jetstream, count, &plan, clock, |i, now| {
                        let n = start + i;
                        if let Some(stamp) = stamps.get(n as usize) {
                            stamp.store(now, std::sync::atomic::Ordering::Release);
                        }
                        let agent = &mut group.agents[(i % agents) as usize];
                        let payload = state_payload(&agent.id, agent.reports, epoch, &run, &name, n);
                        agent.reports += 1;
                        (agent.state_subject.clone(), payload)
                    })
                    .await;
                    (group, tally)
                }
            })
            .await;

        let drain = Duration::from_secs(options.drain_secs);
        if let Err(seen) = self.watch.wait_applied(tally.acked, drain).await {
            warn!(phase = name, published = tally.acked, applied = seen, "not every event was seen applied");
        }
        let record = self
            .watch
            .end_phase()
            .ok_or_else(|| BenchError::Setup("the ingest watch lost its phase".to_owned()))?;
        let observed = observation.finish(deployment).await;
        let span = record.last_ns.saturating_sub(tally.first_ns);
        let applied_per_second = stats::per_second(record.applied, span);
        Ok(IngestPhase {
            mode: if gate.is_some() { "saturation" } else { "offered" }.to_owned(),
            offered_per_second: match pace {
                Pace::Rate(rate) => Some(rate),
                Pace::FlatOut => None,
            },
            published: tally.acked,
            publish_failed: tally.failed,
            applied: record.applied,
            seconds: stats::seconds(span),
            applied_per_second,
            ceiling_ratio: applied_per_second / ceiling.per_second.max(f64::MIN_POSITIVE),
            latency: Percentiles::from_nanos(record.latencies),
            monitor_dropped: self.watch.dropped(),
            observed,
        })
    }

    /// Closes the agents' connections and the watch.
    pub(crate) async fn close(self) {
        self.pool.close().await;
        self.watch.stop();
    }
}
