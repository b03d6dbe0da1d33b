//! Scenario 1, ingest: agents register, then publish state reports, first as fast as the
//! worker absorbs them (a closed loop with a bounded backlog), then at a fixed offered rate.
//! Each report is matched to its `state_changed` event on the status stream.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::agents::{AgentWatch, Pool, state_payload};
use super::ceiling;
use super::deployment::Deployment;
use super::publish::{self, Next, Pace, Plan, shares};
use super::report::{Ceiling, IngestPhase, IngestReport};
use super::stats::{self, Gate, Percentiles};
use super::{BenchError, Context};

/// Runs the ingest scenario against `--workers` workers.
pub(crate) async fn run(context: &Context) -> Result<IngestReport, BenchError> {
    let options = &context.options;
    let deployment = Deployment::start(context, options.workers, "ingest", &[]).await?;
    let result = async {
        let ceiling = ceiling::measure(context).await?;
        info!(
            per_second = ceiling.per_second,
            "jetstream ceiling measured"
        );
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

/// How often the events consumer is checked while a phase settles.
const QUIET_POLL: Duration = Duration::from_millis(100);

/// How the end of a phase was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Every acknowledged report was seen applied on the status stream.
    AllSeen,
    /// The events consumer holds nothing pending or unacknowledged, yet some reports were
    /// never seen applied (counted stale or changing nothing, see the worker's counters).
    ConsumerQuiet,
    /// The drain time ran out.
    TimedOut,
}

impl Settled {
    fn as_str(self) -> &'static str {
        match self {
            Self::AllSeen => "all seen applied",
            Self::ConsumerQuiet => "consumer quiet",
            Self::TimedOut => "timed out",
        }
    }
}

#[derive(Debug)]
struct Settlement {
    how: Settled,
    at_ns: u64,
}

/// How one phase publishes.
#[derive(Debug)]
struct PhasePlan {
    /// Marks the phase's reports, so the watch matches only them.
    name: &'static str,
    events: u64,
    pace: Pace,
    /// Present in a closed-loop phase: the backlog bound.
    gate: Option<Arc<Gate>>,
    max_secs: u64,
}

/// Registered agents ready to report, and the watch that sees their reports applied.
#[derive(Debug)]
pub(crate) struct Ingest {
    pub(crate) pool: Pool,
    pub(crate) watch: AgentWatch,
    /// Every agent's id is this prefix and its number.
    pub(crate) prefix: String,
}

impl Ingest {
    /// Connects `--agents` agents (ids `b<run>-<label>-<n>`) and registers them.
    pub(crate) async fn prepare(context: &Context, label: &str) -> Result<Self, BenchError> {
        let options = &context.options;
        let prefix = format!("b{}-{label}-", context.run_id);
        let watch =
            AgentWatch::start(&context.nats_url, &context.run_id, &prefix, context.clock).await?;
        let mut pool = Pool::connect(
            &context.nats_url,
            options.connections,
            &prefix,
            options.agents,
        )
        .await?;
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
        Ok(Self {
            pool,
            watch,
            prefix,
        })
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
        let plan = PhasePlan {
            name: "sat",
            events: options.events,
            pace: Pace::FlatOut,
            gate: Some(Arc::new(Gate::new(options.backlog))),
            max_secs: options.max_phase_secs,
        };
        self.phase(context, deployment, ceiling, plan).await
    }

    /// Publishes at `--rate` events per second for `--duration-secs`.
    pub(crate) async fn offered(
        &mut self,
        context: &Context,
        deployment: &Deployment,
        ceiling: &Ceiling,
    ) -> Result<IngestPhase, BenchError> {
        let options = &context.options;
        let plan = PhasePlan {
            name: "rate",
            events: (options.rate * options.duration_secs as f64).round() as u64,
            pace: Pace::Rate(options.rate),
            gate: None,
            // Slack past the nominal length: a late tick must not cut the last events off.
            max_secs: options.duration_secs + 5,
        };
        self.phase(context, deployment, ceiling, plan).await
    }

    async fn phase(
        &mut self,
        context: &Context,
        deployment: &Deployment,
        ceiling: &Ceiling,
        plan: PhasePlan,
    ) -> Result<IngestPhase, BenchError> {
        let options = &context.options;
        let PhasePlan {
            name,
            events,
            pace,
            gate,
            max_secs,
        } = plan;
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
        // In a closed loop an agent reports again only once its last report was seen applied,
        // as an agent waiting for its state to be taken would. With several workers sharing
        // the consumer, two reports of one agent in flight at once could be handled out of
        // order, the older then counted stale and never seen on the status stream.
        let closed_loop = gate.is_some();
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
                    for agent in &mut group.agents {
                        agent.in_flight = None;
                    }
                    let in_flight = |n: u64| {
                        stamps
                            .get(n as usize)
                            .is_some_and(|stamp| stamp.load(Ordering::Acquire) != 0)
                    };
                    let tally =
                        publish::publish(&group.jetstream, count, &plan, clock, |i, now| {
                            let n = start + i;
                            let agent = &mut group.agents[(i % agents) as usize];
                            if closed_loop && agent.in_flight.is_some_and(in_flight) {
                                return Next::NotYet;
                            }
                            if let Some(stamp) = stamps.get(n as usize) {
                                stamp.store(now, Ordering::Release);
                            }
                            agent.in_flight = Some(n);
                            let payload =
                                state_payload(&agent.id, agent.reports, epoch, &run, &name, n);
                            agent.reports += 1;
                            Next::Send(agent.state_subject.clone(), payload)
                        })
                        .await;
                    (group, tally)
                }
            })
            .await;

        let settled = self.settle(context, deployment, tally.acked).await?;
        if settled.how != Settled::AllSeen {
            warn!(
                phase = name,
                published = tally.acked,
                settled = settled.how.as_str(),
                "not every event was seen applied"
            );
        }
        let record = self
            .watch
            .end_phase()
            .ok_or_else(|| BenchError::Setup("the ingest watch lost its phase".to_owned()))?;
        let observed = observation.finish(deployment).await;
        let end = match settled.how {
            Settled::AllSeen => record.last_ns,
            Settled::ConsumerQuiet | Settled::TimedOut => settled.at_ns,
        };
        let span = end.saturating_sub(tally.first_ns);
        let applied_per_second = stats::per_second(record.applied, span);
        // Every outcome the worker counted (applied, stale, duplicate, ...), when its metrics
        // are readable: applied reports that changed nothing publish no status event.
        let handled: Option<u64> =
            observed
                .worker_counters
                .iter()
                .fold(None, |sum, (series, n)| {
                    if series.starts_with("opscore_events_total{") {
                        Some(sum.unwrap_or(0) + *n as u64)
                    } else {
                        sum
                    }
                });
        Ok(IngestPhase {
            mode: if gate.is_some() {
                "saturation"
            } else {
                "offered"
            }
            .to_owned(),
            offered_per_second: match pace {
                Pace::Rate(rate) => Some(rate),
                Pace::FlatOut => None,
            },
            published: tally.acked,
            publish_failed: tally.failed,
            applied: record.applied,
            settled: settled.how.as_str().to_owned(),
            handled,
            handled_per_second: handled.map(|h| stats::per_second(h, span)),
            seconds: stats::seconds(span),
            applied_per_second,
            ceiling_ratio: applied_per_second / ceiling.per_second.max(f64::MIN_POSITIVE),
            latency: Percentiles::from_nanos(record.latencies),
            monitor_dropped: self.watch.dropped(),
            observed,
        })
    }

    /// Waits until every acknowledged report was seen applied, or (spawned workers) the
    /// events consumer holds nothing more, or the drain time ran out.
    async fn settle(
        &self,
        context: &Context,
        deployment: &Deployment,
        published: u64,
    ) -> Result<Settlement, BenchError> {
        let deadline = context.deadline(context.options.drain_secs);
        loop {
            if self.watch.wait_applied(published, QUIET_POLL).await.is_ok() {
                return Ok(Settlement {
                    how: Settled::AllSeen,
                    at_ns: context.clock.now_ns(),
                });
            }
            let how = match deployment.backlog(context).await? {
                Some((0, 0)) => Settled::ConsumerQuiet,
                _ if Instant::now() > deadline => Settled::TimedOut,
                _ => continue,
            };
            return Ok(Settlement {
                how,
                at_ns: context.clock.now_ns(),
            });
        }
    }

    /// Closes the agents' connections and the watch.
    pub(crate) async fn close(self) {
        self.pool.close().await;
        self.watch.stop();
    }
}
