//! The worker under test in one scenario, and what the harness observes of it while a phase
//! runs: memory, CPU, and the worker's own histograms.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use tracing::debug;

use super::metrics::{self, Metrics};
use super::probe::{CpuWindow, RssSampler};
use super::report::Observed;
use super::workers::{self, Program, WorkerSet};
use super::{BenchError, Context};
use crate::bus;

/// How long the events consumer may take to become quiet at the end of a scenario.
const QUIET_TIMEOUT: Duration = Duration::from_secs(60);

/// The workers a scenario drives: spawned for it, or the ones already serving.
#[derive(Debug)]
pub(crate) struct Deployment {
    set: Option<WorkerSet>,
    /// Admin addresses announced in `$SRV.INFO`, for `/metrics`.
    admin: Vec<String>,
    pub(crate) workers: usize,
}

impl Deployment {
    /// Spawns `count` workers for scenario `label` with `extra` environment, or, without
    /// `--spawn-worker`, checks that a worker serves.
    pub(crate) async fn start(
        context: &Context,
        count: usize,
        label: &str,
        extra: &[(&str, String)],
    ) -> Result<Self, BenchError> {
        let set = match &context.spawn {
            Some(spawn) => Some(
                WorkerSet::start(
                    spawn,
                    Program::Worker,
                    count,
                    label,
                    extra,
                    &context.control,
                )
                .await?,
            ),
            None => None,
        };
        let serving = workers::gather(&context.control, "$SRV.PING.opscore")
            .await?
            .len();
        if serving == 0 {
            return Err(BenchError::Setup(format!(
                "no opscore worker answers $SRV.PING on {}; start one or give --spawn-worker",
                context.nats_url
            )));
        }
        Ok(Self {
            set,
            admin: workers::admin_addresses(&context.control).await,
            workers: serving,
        })
    }

    /// Spawns one relay in place of a worker (see [`super::relay`]); needs `--spawn-worker`,
    /// whose settings it shares.
    pub(crate) async fn relay(context: &Context, label: &str) -> Result<Self, BenchError> {
        let spawn = context
            .spawn
            .as_ref()
            .ok_or_else(|| BenchError::Usage("the relay needs --spawn-worker".to_owned()))?;
        let set = WorkerSet::start(spawn, Program::Relay, 1, label, &[], &context.control).await?;
        Ok(Self {
            set: Some(set),
            admin: Vec::new(),
            workers: 1,
        })
    }

    /// Process ids of the spawned workers (none for an external worker).
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.set.as_ref().map(WorkerSet::pids).unwrap_or_default()
    }

    /// Every process whose CPU the harness can account for.
    fn processes(&self, context: &Context) -> Vec<(String, u32)> {
        let program = self
            .set
            .as_ref()
            .map_or(Program::Worker, WorkerSet::program);
        let mut processes: Vec<(String, u32)> = self
            .pids()
            .into_iter()
            .enumerate()
            .map(|(n, pid)| (format!("{}#{n}", program.label()), pid))
            .collect();
        processes.extend(context.servers.iter().cloned());
        processes.push(("opscore-bench".to_owned(), std::process::id()));
        processes
    }

    /// Starts observing a phase.
    pub(crate) async fn observe(&self, context: &Context) -> Observation {
        let pids = self.pids();
        Observation {
            started: Instant::now(),
            metrics: metrics::scrape(&self.admin).await,
            cpu: CpuWindow::start(&self.processes(context)),
            rss: (!pids.is_empty()).then(|| RssSampler::start(pids)),
        }
    }

    /// Waits until the events consumer of spawned workers has nothing pending or
    /// unacknowledged, so the next scenario starts from a quiet bus.
    pub(crate) async fn wait_quiet(&self, context: &Context) -> Result<(), BenchError> {
        let deadline = Instant::now() + QUIET_TIMEOUT;
        loop {
            let Some((pending, unacknowledged)) = self.backlog(context).await? else {
                return Ok(());
            };
            if pending == 0 && unacknowledged == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: format!(
                        "events consumer still holds {pending} pending and {unacknowledged} \
                         unacknowledged"
                    ),
                    seconds: QUIET_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Messages of spawned workers' events consumer not yet delivered and not yet
    /// acknowledged; `None` for an external worker, whose consumer the harness does not know.
    pub(crate) async fn backlog(
        &self,
        context: &Context,
    ) -> Result<Option<(u64, usize)>, BenchError> {
        let Some(spawn) = &context.spawn else {
            return Ok(None);
        };
        let jetstream = jetstream::new(context.control.clone());
        let mut consumer: jetstream::consumer::PullConsumer = jetstream
            .get_consumer_from_stream(spawn.consumer(), bus::EVENTS_STREAM)
            .await
            .map_err(|e| BenchError::nats("read the events consumer", e))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| BenchError::nats("read the events consumer", e))?;
        Ok(Some((info.num_pending, info.num_ack_pending)))
    }

    /// Stops spawned workers; an external worker is left running.
    pub(crate) async fn stop(self) {
        if let Some(set) = self.set {
            set.stop().await;
        }
    }
}

/// Counters taken at the start of a phase.
#[derive(Debug)]
pub(crate) struct Observation {
    started: Instant,
    metrics: Option<Metrics>,
    cpu: CpuWindow,
    rss: Option<RssSampler>,
}

impl Observation {
    /// What changed since the phase started.
    pub(crate) async fn finish(self, deployment: &Deployment) -> Observed {
        let seconds = self.started.elapsed().as_secs_f64();
        let cpu = self.cpu.finish();
        let worker_rss_peak_mib = self.rss.map(|rss| rss.finish() as f64 / 1024.0);
        let after = metrics::scrape(&deployment.admin).await;
        if after.is_none() {
            debug!("no worker metrics: the admin port is off or unreachable");
        }
        let delta = match (self.metrics, after) {
            (Some(before), Some(after)) => after.delta(&before, seconds),
            _ => Default::default(),
        };
        Observed {
            worker_rss_peak_mib,
            handler: delta.handler,
            worker_dispatch: delta.dispatch,
            worker_counters: delta.counters,
            cpu: Some(cpu),
        }
    }
}
