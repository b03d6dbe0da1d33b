//! Scenario 5, bridge: `opscore bridge` in front of the worker, driven the way AgentKit agents
//! drive the original service. HTTP clients post state reports to
//! `POST /v1/opscore/agent/{agentId}/state`, one phase for each `--bridge-concurrency` (requests
//! in flight at once). Each request is timed to its `202 Accepted`, and every accepted report is
//! then matched to its `state_changed` event on the status stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::process::Child;
use tokio::task::JoinSet;
use tracing::info;

use super::agents::state_payload;
use super::deployment::Deployment;
use super::ingest::Ingest;
use super::publish::shares;
use super::report::{BridgePhase, BridgeReport};
use super::stats::{self, Clock, Percentiles};
use super::workers::{self, SpawnConfig};
use super::{BenchError, Context};

/// How long the bridge may take to answer `GET /health` after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one phase per concurrency against a spawned worker and bridge; needs `--spawn-worker`.
pub(crate) async fn run(context: &Context) -> Result<BridgeReport, BenchError> {
    let options = &context.options;
    let Some(spawn) = &context.spawn else {
        return Err(BenchError::Usage(
            "the bridge scenario starts its own bridge: give --spawn-worker".to_owned(),
        ));
    };
    let widest = options
        .bridge_concurrency
        .iter()
        .copied()
        .max()
        .unwrap_or(1);
    if widest > options.agents {
        return Err(BenchError::Usage(format!(
            "--bridge-concurrency {widest} needs at least as many --agents ({}): each client \
             reports for agents of its own, so that every agent's reports stay in order",
            options.agents
        )));
    }
    let deployment = Deployment::start(context, options.workers, "bridge", &[]).await?;
    let result = async {
        let bridge = Bridge::start(spawn, context).await?;
        let ingest = match Ingest::prepare(context, "br").await {
            Ok(ingest) => ingest,
            Err(error) => {
                bridge.stop().await;
                return Err(error);
            }
        };
        // Reports sent per agent, across phases: each agent's next report is newer than its
        // last and of the other state, so every report is a transition.
        let reports: Arc<Vec<AtomicU64>> =
            Arc::new((0..options.agents).map(|_| AtomicU64::new(0)).collect());
        let mut phases = Vec::new();
        let mut failure = None;
        for (index, &concurrency) in options.bridge_concurrency.iter().enumerate() {
            let phase = Phase {
                name: format!("http{index}"),
                concurrency: concurrency.max(1),
            };
            match phase
                .run(context, &deployment, &bridge, &ingest, &reports)
                .await
            {
                Ok(phase) => phases.push(phase),
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        ingest.close().await;
        bridge.stop().await;
        if let Some(error) = failure {
            return Err(error);
        }
        deployment.wait_quiet(context).await?;
        Ok(BridgeReport {
            workers: deployment.workers,
            agents: options.agents,
            phases,
        })
    }
    .await;
    deployment.stop().await;
    result
}

/// A bridge process and what a client needs to call it.
#[derive(Debug)]
struct Bridge {
    child: Child,
    base_url: String,
    api_key: String,
    http: reqwest::Client,
}

impl Bridge {
    async fn start(spawn: &SpawnConfig, context: &Context) -> Result<Self, BenchError> {
        let port = free_port()?;
        let api_key = uuid::Uuid::new_v4().simple().to_string();
        let extra = [
            ("OPSCORE__BRIDGE__LISTEN", format!("127.0.0.1:{port}")),
            ("OPSCORE__BRIDGE__API_KEY", api_key.clone()),
            (
                "OPSCORE__BRIDGE__CONSUMER",
                format!("opscore-bench-bridge-{}", context.run_id),
            ),
        ];
        let (mut child, log) = spawn.spawn("bridge", "bridge", "bridge", &extra)?;
        crate::bridge::use_ring_provider();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(usize::MAX)
            .build()
            .map_err(|e| BenchError::Setup(format!("HTTP client: {e}")))?;
        let base_url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BenchError::Setup(format!(
                    "bridge exited with {status} before serving; see {}",
                    log.display()
                )));
            }
            let health = http.get(format!("{base_url}/health")).send().await;
            if health.is_ok_and(|r| r.status() == reqwest::StatusCode::OK) {
                break;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: format!("bridge start (see {})", log.display()),
                    seconds: START_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        info!(%base_url, "bridge serving");
        Ok(Self {
            child,
            base_url,
            api_key,
            http,
        })
    }

    async fn stop(mut self) {
        workers::terminate(std::slice::from_mut(&mut self.child)).await;
    }
}

/// A port the kernel just handed out and took back: free for the bridge to bind, unless
/// something else binds it first.
fn free_port() -> Result<u16, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|source| BenchError::Io {
            what: "find a free port for the bridge".to_owned(),
            source,
        })
}

/// One phase: `--bridge-requests` reports from `concurrency` clients.
#[derive(Debug)]
struct Phase {
    /// Marks the phase's reports, so the watch matches only them.
    name: String,
    concurrency: usize,
}

/// What one client saw.
#[derive(Debug, Default)]
struct ClientTally {
    accepted: u64,
    failed: u64,
    latencies: Vec<u64>,
    first_ns: Option<u64>,
    last_ns: u64,
}

impl Phase {
    async fn run(
        self,
        context: &Context,
        deployment: &Deployment,
        bridge: &Bridge,
        ingest: &Ingest,
        reports: &Arc<Vec<AtomicU64>>,
    ) -> Result<BridgePhase, BenchError> {
        let options = &context.options;
        let requests = options.bridge_requests;
        let stamps = ingest
            .watch
            .begin_phase(&self.name, requests as usize, None);
        let observation = deployment.observe(context).await;
        let deadline = context.deadline(options.max_phase_secs);

        let mut clients = JoinSet::new();
        let mut offset = 0;
        for (client, count) in shares(requests, self.concurrency).into_iter().enumerate() {
            let job = ClientJob {
                http: bridge.http.clone(),
                base_url: bridge.base_url.clone(),
                authorization: format!("Bearer {}", bridge.api_key),
                agents: (client..options.agents)
                    .step_by(self.concurrency)
                    .map(|n| (n, format!("{}{n}", ingest.prefix)))
                    .collect(),
                reports: reports.clone(),
                epoch: ingest.pool.epoch,
                run: context.run_id.clone(),
                phase: self.name.clone(),
                first_mark: offset,
                count,
                stamps: stamps.clone(),
                clock: context.clock,
                deadline,
            };
            offset += count;
            clients.spawn(job.run());
        }
        let mut tally = ClientTally::default();
        while let Some(joined) = clients.join_next().await {
            let client = joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            tally.accepted += client.accepted;
            tally.failed += client.failed;
            tally.latencies.extend(client.latencies);
            tally.first_ns = match (tally.first_ns, client.first_ns) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tally.last_ns = tally.last_ns.max(client.last_ns);
        }

        let drained = ingest
            .watch
            .wait_applied(tally.accepted, Duration::from_secs(options.drain_secs))
            .await;
        let record = ingest.watch.end_phase();
        let observed = observation.finish(deployment).await;
        let span = tally
            .last_ns
            .saturating_sub(tally.first_ns.unwrap_or(tally.last_ns));
        let (applied, applied_latency) = record.map_or((0, None), |r| {
            (r.applied, Percentiles::from_nanos(r.latencies))
        });
        if let Err(seen) = drained {
            info!(
                seen,
                accepted = tally.accepted,
                "not every accepted report was seen applied"
            );
        }
        Ok(BridgePhase {
            concurrency: self.concurrency,
            requests,
            accepted: tally.accepted,
            failed: tally.failed,
            seconds: stats::seconds(span),
            accepted_per_second: stats::per_second(tally.accepted, span),
            request: Percentiles::from_nanos(tally.latencies),
            applied,
            request_to_applied: applied_latency,
            monitor_dropped: ingest.watch.dropped(),
            observed,
        })
    }
}

/// One HTTP client of a phase: its requests go one after another, to its own agents in turn.
struct ClientJob {
    http: reqwest::Client,
    base_url: String,
    authorization: String,
    /// The client's agents, by number and id; no other client reports for them.
    agents: Vec<(usize, String)>,
    reports: Arc<Vec<AtomicU64>>,
    epoch: chrono::DateTime<chrono::Utc>,
    run: String,
    phase: String,
    /// Event number of the client's first request within the phase.
    first_mark: u64,
    count: u64,
    stamps: Arc<Vec<AtomicU64>>,
    clock: Clock,
    deadline: Instant,
}

impl ClientJob {
    async fn run(self) -> ClientTally {
        let mut tally = ClientTally {
            latencies: Vec::with_capacity(self.count as usize),
            ..ClientTally::default()
        };
        for i in 0..self.count {
            if Instant::now() > self.deadline {
                break;
            }
            let (number, agent) = &self.agents[(i as usize) % self.agents.len()];
            let mark = self.first_mark + i;
            let report = self.reports[*number].fetch_add(1, Ordering::Relaxed);
            let body = state_payload(agent, report, self.epoch, &self.run, &self.phase, mark);
            let sent = self.clock.now_ns();
            tally.first_ns.get_or_insert(sent);
            if let Some(stamp) = self.stamps.get(mark as usize) {
                stamp.store(sent, Ordering::Release);
            }
            let response = self
                .http
                .post(format!("{}/v1/opscore/agent/{agent}/state", self.base_url))
                .header(reqwest::header::AUTHORIZATION, &self.authorization)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await;
            let done = self.clock.now_ns();
            tally.last_ns = done;
            if response.is_ok_and(|r| r.status() == reqwest::StatusCode::ACCEPTED) {
                tally.accepted += 1;
                tally.latencies.push(done - sent);
            } else {
                tally.failed += 1;
                // Not accepted, so never applied: the watch must not wait for it.
                if let Some(stamp) = self.stamps.get(mark as usize) {
                    stamp.store(0, Ordering::Release);
                }
            }
        }
        tally
    }
}
