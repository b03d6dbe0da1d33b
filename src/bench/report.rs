//! Every figure of a run: the structures serialised as the `--json` line, and the table
//! printed for people.

use std::collections::BTreeMap;
use std::fmt::{self, Display, Formatter};

use serde::Serialize;

use super::Options;
use super::metrics::HistogramDelta;
use super::probe::{CpuUse, Machine};
use super::stats::Percentiles;

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub run_id: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub machine: Machine,
    /// `private` when the harness started its own servers, else the NATS address.
    pub servers: String,
    /// `spawned` or `external`.
    pub worker: String,
    pub parameters: Options,
    pub scenarios: Vec<ScenarioReport>,
    pub total_seconds: f64,
}

/// The result of one scenario.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "scenario", rename_all = "lowercase")]
pub enum ScenarioReport {
    Ingest(IngestReport),
    Workflow(WorkflowReport),
    Registry(RegistryReport),
    Scaleout(ScaleoutReport),
    Bridge(BridgeReport),
    Floor(Box<FloorReport>),
}

/// JetStream publish-with-ack throughput of state-report-sized messages.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub messages: u64,
    pub failed: u64,
    pub message_bytes: usize,
    pub connections: usize,
    pub window: usize,
    pub seconds: f64,
    pub per_second: f64,
}

/// What the harness saw of the processes during a phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Observed {
    /// Largest total `VmRSS` of the worker processes, polled every 100 ms, in MiB.
    pub worker_rss_peak_mib: Option<f64>,
    /// The worker's own handler histogram (`opscore_handler_duration_seconds`) over the phase.
    pub handler: Option<HistogramDelta>,
    /// The worker's own dispatch histogram (`opscore_dispatch_latency_seconds`).
    pub worker_dispatch: Option<HistogramDelta>,
    /// Worker counters that moved during the phase (retries, reconciler repairs, ...).
    pub worker_counters: BTreeMap<String, f64>,
    pub cpu: Option<CpuUse>,
}

/// One phase of the ingest scenario.
#[derive(Debug, Clone, Serialize)]
pub struct IngestPhase {
    /// `saturation` (closed loop, bounded backlog) or `offered` (fixed rate).
    pub mode: String,
    pub offered_per_second: Option<f64>,
    /// Publishes JetStream acknowledged.
    pub published: u64,
    pub publish_failed: u64,
    /// State changes seen on the status stream.
    pub applied: u64,
    /// How the end was recognised: `all seen applied`, `consumer quiet` or `timed out`.
    pub settled: String,
    /// Events the worker counted handled, any outcome (from its metrics, when readable).
    pub handled: Option<u64>,
    pub handled_per_second: Option<f64>,
    /// First publish to last applied event.
    pub seconds: f64,
    pub applied_per_second: f64,
    pub ceiling_ratio: f64,
    /// Publish to `state_changed` received on the status stream.
    pub latency: Option<Percentiles>,
    /// Status messages the harness's watch dropped (slow consumer); 0 for trustworthy counts.
    pub monitor_dropped: u64,
    pub observed: Observed,
}

/// Scenario 1.
#[derive(Debug, Clone, Serialize)]
pub struct IngestReport {
    pub workers: usize,
    pub agents: usize,
    pub ceiling: Ceiling,
    pub saturation: IngestPhase,
    pub offered: IngestPhase,
}

/// One phase of the workflow scenario.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowPhase {
    pub mode: String,
    pub offered_tasks_per_second: Option<f64>,
    pub sessions_triggered: u64,
    pub trigger_failed: u64,
    pub sessions_completed: u64,
    pub sessions_failed: u64,
    /// Triggered sessions that had not ended when the drain time ran out.
    pub sessions_unfinished: u64,
    pub tasks_completed: u64,
    /// First trigger to last session end.
    pub seconds: f64,
    pub tasks_per_second: f64,
    pub sessions_per_second: f64,
    /// Tasks per second over the JetStream ceiling (each task is several messages).
    pub ceiling_ratio: Option<f64>,
    /// Task ready (trigger sent, or last dependency's result published) to assignment
    /// received by the agent.
    pub dispatch: Option<Percentiles>,
    /// Trigger sent to `session.completed` received.
    pub session_duration: Option<Percentiles>,
    /// `workflow.trigger` request to reply.
    pub trigger: Option<Percentiles>,
    pub observed: Observed,
}

/// Scenario 2.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowReport {
    pub workers: usize,
    pub agents: usize,
    pub ceiling: Ceiling,
    pub saturation: WorkflowPhase,
    pub offered: WorkflowPhase,
}

/// Scenario 3, for one registry size.
#[derive(Debug, Clone, Serialize)]
pub struct RegistrySize {
    pub agents: usize,
    pub registered: u64,
    pub register_seconds: f64,
    pub registered_per_second: f64,
    /// `VmRSS` of the worker(s) once serving, before any agent registered.
    pub rss_start_mib: Option<f64>,
    /// `VmRSS` once every agent was registered.
    pub rss_registered_mib: Option<f64>,
    /// `VmHWM` at the end: the peak over the worker's whole life (spawned workers only).
    pub rss_hwm_mib: Option<f64>,
    /// How the memory figures were read.
    pub rss_source: String,
    pub list_all: Option<Percentiles>,
    pub list_capability: Option<Percentiles>,
    /// Agents in the first page of each listing (limit 100).
    pub list_page_sizes: (usize, usize),
    pub dispatch: WorkflowPhase,
}

/// Scenario 3.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryReport {
    pub sizes: Vec<RegistrySize>,
}

/// Scenario 4, for one number of workers.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleoutStep {
    pub workers: usize,
    pub ingest: IngestPhase,
    pub workflow: WorkflowPhase,
}

/// Scenario 4.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleoutReport {
    pub ceiling: Ceiling,
    pub steps: Vec<ScaleoutStep>,
    /// Applied events per second with two workers over one.
    pub ingest_speedup: Option<f64>,
    pub workflow_speedup: Option<f64>,
}

/// Scenario 6: the ingest saturation phase against processes doing more and more of the work.
#[derive(Debug, Clone, Serialize)]
pub struct FloorReport {
    pub ceiling: Ceiling,
    /// The relay: opscore's intake and the status publish, nothing applied, nothing stored.
    pub relay: IngestPhase,
    /// The worker with the in-memory repository.
    pub memory: IngestPhase,
    /// The worker with Redis, as deployed.
    pub redis: IngestPhase,
    /// Applied events per second of each worker over the relay's.
    pub memory_over_relay: Option<f64>,
    pub redis_over_relay: Option<f64>,
}

/// One phase of the bridge scenario.
#[derive(Debug, Clone, Serialize)]
pub struct BridgePhase {
    /// HTTP requests in flight at once.
    pub concurrency: usize,
    pub requests: u64,
    /// Requests answered `202 Accepted`.
    pub accepted: u64,
    /// Requests answered otherwise, or not answered.
    pub failed: u64,
    /// First request sent to last response received.
    pub seconds: f64,
    pub accepted_per_second: f64,
    /// Request sent to response received.
    pub request: Option<Percentiles>,
    /// Accepted reports seen applied on the status stream.
    pub applied: u64,
    /// Request sent to `state_changed` received on the status stream.
    pub request_to_applied: Option<Percentiles>,
    pub monitor_dropped: u64,
    pub observed: Observed,
}

/// Scenario 5.
#[derive(Debug, Clone, Serialize)]
pub struct BridgeReport {
    pub workers: usize,
    pub agents: usize,
    pub phases: Vec<BridgePhase>,
}

fn thousands(value: f64) -> String {
    let whole = value.round() as u64;
    let digits = whole.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn percentiles(p: Option<&Percentiles>) -> String {
    match p {
        Some(p) => format!(
            "{:.2} / {:.2} / {:.2} ms (max {:.2}, n={})",
            p.p50_ms, p.p99_ms, p.p999_ms, p.max_ms, p.samples
        ),
        None => "no samples".to_owned(),
    }
}

fn mib(value: Option<f64>) -> String {
    value.map_or("-".to_owned(), |v| format!("{v:.1} MiB"))
}

fn row(f: &mut Formatter<'_>, label: &str, value: &str, ratio: Option<f64>) -> fmt::Result {
    let ratio = ratio.map_or(String::new(), |r| format!("{r:.3}"));
    writeln!(f, "  {label:<40} {value:<44} {ratio}")
}

impl Display for Observed {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for histogram in [&self.handler, &self.worker_dispatch].into_iter().flatten() {
            let bound = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("<= {v} ms"));
            row(
                f,
                &format!("    worker {}", histogram.metric),
                &format!(
                    "n={} mean {:.2} ms, p50 {}, p99 {}, in progress {:.1}",
                    histogram.count,
                    histogram.mean_ms,
                    bound(histogram.p50_at_most_ms),
                    bound(histogram.p99_at_most_ms),
                    histogram.busy_average
                ),
                None,
            )?;
        }
        if !self.worker_counters.is_empty() {
            let moved: Vec<String> = self
                .worker_counters
                .iter()
                .map(|(series, n)| format!("{} {n}", series.trim_start_matches("opscore_")))
                .collect();
            row(f, "    worker counters", &moved.join(", "), None)?;
        }
        if let Some(cpu) = &self.cpu {
            let parts: Vec<String> = cpu
                .processes
                .iter()
                .map(|p| format!("{} {:.2}", p.name, p.cores))
                .collect();
            row(
                f,
                "    cpu cores used",
                &format!(
                    "{}; machine {:.2} busy",
                    parts.join(", "),
                    cpu.machine_busy_cores
                ),
                None,
            )?;
        }
        if self.worker_rss_peak_mib.is_some() {
            row(
                f,
                "    worker RSS peak (VmRSS polled)",
                &mib(self.worker_rss_peak_mib),
                None,
            )?;
        }
        Ok(())
    }
}

impl Display for IngestPhase {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let label = match self.offered_per_second {
            Some(rate) => format!("applied at offered {}/s", thousands(rate)),
            None => "applied at saturation".to_owned(),
        };
        row(
            f,
            &label,
            &format!(
                "{} ev/s ({}/{} in {:.2} s)",
                thousands(self.applied_per_second),
                self.applied,
                self.published,
                self.seconds
            ),
            Some(self.ceiling_ratio),
        )?;
        row(
            f,
            "  publish->applied p50/p99/p99.9",
            &percentiles(self.latency.as_ref()),
            None,
        )?;
        if self.applied != self.published {
            row(
                f,
                "  end recognised by",
                &format!(
                    "{}; worker handled {} ({}/s)",
                    self.settled,
                    self.handled.map_or("-".to_owned(), |h| h.to_string()),
                    self.handled_per_second.map_or("-".to_owned(), thousands)
                ),
                None,
            )?;
        }
        if self.publish_failed > 0 || self.monitor_dropped > 0 {
            row(
                f,
                "  publish failures / watch drops",
                &format!("{} / {}", self.publish_failed, self.monitor_dropped),
                None,
            )?;
        }
        write!(f, "{}", self.observed)
    }
}

impl Display for WorkflowPhase {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let label = match self.offered_tasks_per_second {
            Some(rate) => format!("tasks at offered {}/s", thousands(rate)),
            None => "tasks at saturation".to_owned(),
        };
        row(
            f,
            &label,
            &format!(
                "{} tasks/s, {:.1} sessions/s ({:.2} s)",
                thousands(self.tasks_per_second),
                self.sessions_per_second,
                self.seconds
            ),
            self.ceiling_ratio,
        )?;
        row(
            f,
            "  sessions ok/failed/unfinished of",
            &format!(
                "{}/{}/{} of {} ({} trigger errors), {} tasks",
                self.sessions_completed,
                self.sessions_failed,
                self.sessions_unfinished,
                self.sessions_triggered,
                self.trigger_failed,
                self.tasks_completed
            ),
            None,
        )?;
        row(
            f,
            "  dispatch p50/p99/p99.9",
            &percentiles(self.dispatch.as_ref()),
            None,
        )?;
        row(
            f,
            "  session duration p50/p99/p99.9",
            &percentiles(self.session_duration.as_ref()),
            None,
        )?;
        row(
            f,
            "  trigger request p50/p99/p99.9",
            &percentiles(self.trigger.as_ref()),
            None,
        )?;
        write!(f, "{}", self.observed)
    }
}

impl Display for BridgePhase {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        row(
            f,
            &format!("state reports, {} in flight", self.concurrency),
            &format!(
                "{} req/s ({}/{} accepted in {:.2} s)",
                thousands(self.accepted_per_second),
                self.accepted,
                self.requests,
                self.seconds
            ),
            None,
        )?;
        row(
            f,
            "  request->202 p50/p99/p99.9",
            &percentiles(self.request.as_ref()),
            None,
        )?;
        row(
            f,
            "  request->applied p50/p99/p99.9",
            &percentiles(self.request_to_applied.as_ref()),
            None,
        )?;
        if self.failed > 0 || self.applied != self.accepted || self.monitor_dropped > 0 {
            row(
                f,
                "  failed / applied / watch drops",
                &format!(
                    "{} / {} / {}",
                    self.failed, self.applied, self.monitor_dropped
                ),
                None,
            )?;
        }
        write!(f, "{}", self.observed)
    }
}

impl Display for Ceiling {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        row(
            f,
            &format!("JetStream ceiling ({} B, publish+ack)", self.message_bytes),
            &format!(
                "{} msg/s ({} in {:.2} s, {} conn x {} window)",
                thousands(self.per_second),
                self.messages,
                self.seconds,
                self.connections,
                self.window
            ),
            Some(1.0),
        )
    }
}

impl Display for Report {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let m = &self.machine;
        writeln!(
            f,
            "opscore-bench run {} at {}: {} cores ({}), {} MiB, load {} at start, nats-server {}",
            self.run_id,
            self.started_at,
            m.nproc,
            m.cpu_model,
            m.memory_mib,
            m.load_average,
            m.nats_server_version
        )?;
        writeln!(f, "servers: {}, worker: {}", self.servers, self.worker)?;
        writeln!(f, "  {:<40} {:<44} /ceiling", "figure", "value")?;
        for scenario in &self.scenarios {
            match scenario {
                ScenarioReport::Ingest(r) => {
                    writeln!(f, "== ingest: {} agents, {} worker(s)", r.agents, r.workers)?;
                    write!(f, "{}{}{}", r.ceiling, r.saturation, r.offered)?;
                }
                ScenarioReport::Workflow(r) => {
                    writeln!(
                        f,
                        "== workflow: {} agents, {} worker(s)",
                        r.agents, r.workers
                    )?;
                    write!(f, "{}{}{}", r.ceiling, r.saturation, r.offered)?;
                }
                ScenarioReport::Registry(r) => {
                    for size in &r.sizes {
                        writeln!(f, "== registry: {} agents", size.agents)?;
                        row(
                            f,
                            "registered",
                            &format!(
                                "{} in {:.2} s ({}/s)",
                                size.registered,
                                size.register_seconds,
                                thousands(size.registered_per_second)
                            ),
                            None,
                        )?;
                        row(
                            f,
                            "worker RSS start / registered / peak",
                            &format!(
                                "{} / {} / {} ({})",
                                mib(size.rss_start_mib),
                                mib(size.rss_registered_mib),
                                mib(size.rss_hwm_mib),
                                size.rss_source
                            ),
                            None,
                        )?;
                        row(
                            f,
                            "agent.list p50/p99/p99.9",
                            &percentiles(size.list_all.as_ref()),
                            None,
                        )?;
                        row(
                            f,
                            "agent.list capability p50/p99/p99.9",
                            &percentiles(size.list_capability.as_ref()),
                            None,
                        )?;
                        write!(f, "{}", size.dispatch)?;
                    }
                }
                ScenarioReport::Bridge(r) => {
                    writeln!(
                        f,
                        "== bridge: {} agents, {} worker(s), one bridge",
                        r.agents, r.workers
                    )?;
                    for phase in &r.phases {
                        write!(f, "{phase}")?;
                    }
                }
                ScenarioReport::Floor(r) => {
                    writeln!(
                        f,
                        "== floor: ingest saturation against less and more of opscore"
                    )?;
                    write!(f, "{}", r.ceiling)?;
                    writeln!(f, "  -- relay: the intake and the bus, nothing applied")?;
                    write!(f, "{}", r.relay)?;
                    writeln!(f, "  -- opscore, in-memory repository")?;
                    write!(f, "{}", r.memory)?;
                    writeln!(f, "  -- opscore, Redis")?;
                    write!(f, "{}", r.redis)?;
                    let ratio = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{s:.2}"));
                    row(
                        f,
                        "in-memory / Redis over the relay",
                        &format!(
                            "{} / {}",
                            ratio(r.memory_over_relay),
                            ratio(r.redis_over_relay)
                        ),
                        None,
                    )?;
                }
                ScenarioReport::Scaleout(r) => {
                    writeln!(f, "== scaleout")?;
                    write!(f, "{}", r.ceiling)?;
                    for step in &r.steps {
                        writeln!(f, "  -- {} worker(s)", step.workers)?;
                        write!(f, "{}{}", step.ingest, step.workflow)?;
                    }
                    let speedup = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{s:.2}x"));
                    row(
                        f,
                        "speed-up ingest / workflow",
                        &format!(
                            "{} / {}",
                            speedup(r.ingest_speedup),
                            speedup(r.workflow_speedup)
                        ),
                        None,
                    )?;
                }
            }
        }
        writeln!(f, "total {:.1} s", self.total_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1234.0), "1,234");
        assert_eq!(thousands(1234567.0), "1,234,567");
    }
}
