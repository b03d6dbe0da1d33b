//! Scenario 2, workflow: sessions of a three-step chain and of a fan-out/fan-in workflow,
//! alternately, run by agents that complete each task at once. First as many sessions at once
//! as `--concurrency` allows, then at a fixed offered rate of tasks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::agents::connect;
use super::ceiling;
use super::deployment::Deployment;
use super::publish::Pace;
use super::report::{Ceiling, WorkflowPhase, WorkflowReport};
use super::stats::{self, Clock, Gate, Percentiles};
use super::taskagents::TaskAgents;
use super::{BenchError, Context};
use crate::api::ApiClient;

/// Tasks of the chain and of the fan-out/fan-in workflow; sessions alternate between them.
const CHAIN_TASKS: u64 = 3;
const FAN_TASKS: u64 = 5;

/// Runs the workflow scenario against `--workers` workers.
pub(crate) async fn run(context: &Context) -> Result<WorkflowReport, BenchError> {
    let options = &context.options;
    let deployment = Deployment::start(context, options.workers, "workflow", &[]).await?;
    let result = async {
        let ceiling = ceiling::measure(context).await?;
        let workflows = Workflows::prepare(context, "wf").await?;
        let saturation = workflows
            .saturation(context, &deployment, Some(&ceiling))
            .await;
        let offered = if saturation.is_ok() {
            let seconds = options.duration_secs;
            workflows
                .offered(context, &deployment, Some(&ceiling), seconds)
                .await
        } else {
            Err(BenchError::Setup("saturation phase failed".to_owned()))
        };
        workflows.close().await;
        deployment.wait_quiet(context).await?;
        Ok(WorkflowReport {
            workers: deployment.workers,
            agents: options.workflow_agents,
            ceiling,
            saturation: saturation?,
            offered: offered?,
        })
    }
    .await;
    deployment.stop().await;
    result
}

/// The two workflows, defined; their agents, running; and the watch on session status.
#[derive(Debug)]
pub(crate) struct Workflows {
    chain: String,
    fan: String,
    agents: TaskAgents,
    watch: SessionWatch,
}

impl Workflows {
    /// Defines the workflows through `workflow.define` and starts the agents (ids
    /// `b<run>-<label>-<n>`).
    pub(crate) async fn prepare(context: &Context, label: &str) -> Result<Self, BenchError> {
        let run = &context.run_id;
        let capability = format!("bench-work-{run}");
        let chain = format!("bench-chain-{run}");
        let fan = format!("bench-fan-{run}");
        let api = ApiClient::new(context.control.clone());
        for definition in [
            chain_definition(&chain, &capability),
            fan_definition(&fan, &capability),
        ] {
            api.call("workflow", "define", &definition)
                .await
                .map_err(|e| BenchError::api("workflow.define", e))?;
        }
        let watch = SessionWatch::start(context).await?;
        let agents = TaskAgents::start(context, label, &capability).await?;
        Ok(Self {
            chain,
            fan,
            agents,
            watch,
        })
    }

    /// `--sessions` sessions, at most `--concurrency` of them running at once.
    pub(crate) async fn saturation(
        &self,
        context: &Context,
        deployment: &Deployment,
        ceiling: Option<&Ceiling>,
    ) -> Result<WorkflowPhase, BenchError> {
        let options = &context.options;
        let gate = Arc::new(Gate::new(options.concurrency));
        let plan = Trigger {
            name: "sat",
            sessions: options.sessions,
            pace: Pace::FlatOut,
            gate: Some(gate),
            max_secs: options.max_phase_secs,
        };
        self.phase(context, deployment, ceiling, plan).await
    }

    /// `--task-rate` tasks per second offered for `seconds`.
    pub(crate) async fn offered(
        &self,
        context: &Context,
        deployment: &Deployment,
        ceiling: Option<&Ceiling>,
        seconds: u64,
    ) -> Result<WorkflowPhase, BenchError> {
        let rate = context.options.task_rate / ((CHAIN_TASKS + FAN_TASKS) as f64 / 2.0);
        let plan = Trigger {
            name: "rate",
            sessions: (rate * seconds as f64).round() as u64,
            pace: Pace::Rate(rate),
            gate: None,
            max_secs: seconds + 5,
        };
        self.phase(context, deployment, ceiling, plan).await
    }

    async fn phase(
        &self,
        context: &Context,
        deployment: &Deployment,
        ceiling: Option<&Ceiling>,
        plan: Trigger,
    ) -> Result<WorkflowPhase, BenchError> {
        self.watch.set_gate(plan.gate.clone());
        let observation = deployment.observe(context).await;
        let (triggered, trigger_failed) = self.trigger(context, &plan).await;
        let ids: HashSet<String> = triggered.iter().map(|t| t.session_id.clone()).collect();
        let drain = Duration::from_secs(context.options.drain_secs);
        let ended = self.watch.wait_ended(&ids, drain).await;
        if ended < ids.len() {
            warn!(
                phase = plan.name,
                ended,
                triggered = ids.len(),
                "not every session ended"
            );
        }
        let observed = observation.finish(deployment).await;
        self.watch.set_gate(None);
        let progress = self.watch.take(&ids);

        let mut figures = WorkflowPhase {
            mode: if plan.gate.is_some() {
                "saturation"
            } else {
                "offered"
            }
            .to_owned(),
            offered_tasks_per_second: match plan.pace {
                Pace::Rate(_) => Some(context.options.task_rate),
                Pace::FlatOut => None,
            },
            sessions_triggered: triggered.len() as u64,
            trigger_failed,
            sessions_completed: 0,
            sessions_failed: 0,
            sessions_unfinished: 0,
            tasks_completed: 0,
            seconds: 0.0,
            tasks_per_second: 0.0,
            sessions_per_second: 0.0,
            ceiling_ratio: None,
            dispatch: Percentiles::from_nanos(self.agents.take_dispatch(plan.name)),
            session_duration: None,
            trigger: Percentiles::from_nanos(
                triggered.iter().map(|t| t.replied - t.sent).collect(),
            ),
            observed,
        };
        let mut durations = Vec::new();
        let first = triggered.iter().map(|t| t.sent).min().unwrap_or(0);
        let mut last = first;
        for trigger in &triggered {
            let Some(seen) = progress.get(&trigger.session_id) else {
                figures.sessions_unfinished += 1;
                continue;
            };
            figures.tasks_completed += seen.tasks_completed;
            last = last.max(seen.last_ns);
            match seen.end {
                Some((End::Completed, at)) => {
                    figures.sessions_completed += 1;
                    durations.push(at.saturating_sub(trigger.sent));
                    last = last.max(at);
                }
                Some((End::Failed, at)) => {
                    figures.sessions_failed += 1;
                    last = last.max(at);
                }
                None => figures.sessions_unfinished += 1,
            }
        }
        let span = last.saturating_sub(first);
        figures.seconds = stats::seconds(span);
        figures.tasks_per_second = stats::per_second(figures.tasks_completed, span);
        figures.sessions_per_second = stats::per_second(figures.sessions_completed, span);
        figures.ceiling_ratio = ceiling.map(|c| figures.tasks_per_second / c.per_second.max(1e-9));
        figures.session_duration = Percentiles::from_nanos(durations);
        let failed_results = self.agents.results_failed();
        if failed_results > 0 {
            warn!(failed_results, "some task results were not acknowledged");
        }
        info!(
            phase = plan.name,
            tasks_per_second = figures.tasks_per_second,
            "workflow phase done"
        );
        Ok(figures)
    }

    /// Sends the triggers of a phase; returns the sessions created and the failed requests.
    async fn trigger(&self, context: &Context, plan: &Trigger) -> (Vec<Triggered>, u64) {
        let api = ApiClient::new(context.control.clone());
        let clock = context.clock;
        let deadline = context.deadline(plan.max_secs);
        let started = Instant::now();
        let mut ticker = tokio::time::interval(Duration::from_millis(1));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut requests = JoinSet::new();
        let mut i = 0;
        'phase: while i < plan.sessions && Instant::now() < deadline {
            let allowed = match plan.pace {
                Pace::FlatOut => plan.sessions,
                Pace::Rate(per_second) => {
                    ticker.tick().await;
                    let due = (started.elapsed().as_secs_f64() * per_second).floor() as u64 + 1;
                    due.min(plan.sessions)
                }
            };
            while i < allowed {
                if let Some(gate) = &plan.gate
                    && !gate.admit(deadline).await
                {
                    break 'phase;
                }
                let workflow = if i % 2 == 0 { &self.chain } else { &self.fan };
                let (api, workflow, name, gate) =
                    (api.clone(), workflow.clone(), plan.name, plan.gate.clone());
                requests.spawn(async move {
                    let sent = clock.now_ns();
                    let input = json!({"t": sent, "phase": name, "i": i});
                    let request = json!({"workflowId": workflow, "input": input});
                    let reply = api.call("workflow", "trigger", &request).await;
                    let replied = clock.now_ns();
                    let session_id = reply
                        .ok()
                        .and_then(|r| r["sessionId"].as_str().map(str::to_owned));
                    if session_id.is_none()
                        && let Some(gate) = gate
                    {
                        // No session will end for this trigger: give its place back.
                        gate.complete(1);
                    }
                    session_id.map(|session_id| Triggered {
                        session_id,
                        sent,
                        replied,
                    })
                });
                i += 1;
            }
        }
        let mut triggered = Vec::new();
        let mut failed = 0;
        while let Some(joined) = requests.join_next().await {
            match joined {
                Ok(Some(t)) => triggered.push(t),
                _ => failed += 1,
            }
        }
        (triggered, failed)
    }

    /// Stops the agents and the watch.
    pub(crate) async fn close(self) {
        self.agents.stop().await;
        self.watch.stop();
    }
}

/// How one phase triggers sessions.
#[derive(Debug)]
struct Trigger {
    name: &'static str,
    sessions: u64,
    pace: Pace,
    gate: Option<Arc<Gate>>,
    max_secs: u64,
}

/// A session the worker created.
#[derive(Debug)]
struct Triggered {
    session_id: String,
    /// When the trigger request left; also the ready time of the first tasks.
    sent: u64,
    replied: u64,
}

fn chain_definition(id: &str, capability: &str) -> Value {
    let step = |n: u32, next: Option<String>| {
        json!({"taskId": format!("step_{n}"), "name": format!("step {n}"),
            "agentCapability": capability, "nextTaskId": next})
    };
    json!({"id": id, "name": "bench three-step chain", "version": "1", "tasks": [
        step(1, Some("step_2".to_owned())), step(2, Some("step_3".to_owned())), step(3, None)]})
}

fn fan_definition(id: &str, capability: &str) -> Value {
    let task = |task_id: &str, depends_on: &[&str]| {
        json!({"taskId": task_id, "name": task_id, "agentCapability": capability,
            "dependsOn": depends_on})
    };
    json!({"id": id, "name": "bench fan-out/fan-in", "version": "1", "tasks": [
        task("split", &[]),
        task("part_1", &["split"]), task("part_2", &["split"]), task("part_3", &["split"]),
        task("join", &["part_1", "part_2", "part_3"])]})
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Completed,
    /// Failed or cancelled.
    Failed,
}

/// What the status stream said about one session.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    tasks_completed: u64,
    last_ns: u64,
    end: Option<(End, u64)>,
}

#[derive(Debug)]
struct SessionState {
    clock: Clock,
    sessions: std::sync::Mutex<HashMap<String, Progress>>,
    gate: std::sync::Mutex<Option<Arc<Gate>>>,
    dropped: Arc<AtomicU64>,
}

#[derive(Deserialize)]
struct SessionEvent {
    data: SessionData,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionData {
    session_id: String,
    kind: String,
}

/// A subscriber to `opscore.status.session.>`.
#[derive(Debug)]
struct SessionWatch {
    state: Arc<SessionState>,
    stop: CancellationToken,
}

impl SessionWatch {
    async fn start(context: &Context) -> Result<Self, BenchError> {
        let dropped = Arc::new(AtomicU64::new(0));
        let client = connect(
            &context.nats_url,
            "opscore-bench session watch",
            Some(dropped.clone()),
        )
        .await?;
        let mut subscription = client
            .subscribe("opscore.status.session.>")
            .await
            .map_err(|e| BenchError::nats("subscribe to session status", e))?;
        client
            .flush()
            .await
            .map_err(|e| BenchError::nats("flush the session watch", e))?;
        let state = Arc::new(SessionState {
            clock: context.clock,
            sessions: Default::default(),
            gate: Default::default(),
            dropped,
        });
        let stop = CancellationToken::new();
        let (shared, token) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            while let Some(Some(message)) = token.run_until_cancelled(subscription.next()).await {
                shared.observe(&message.payload);
            }
            drop(client);
        });
        Ok(Self { state, stop })
    }

    fn set_gate(&self, gate: Option<Arc<Gate>>) {
        if let Ok(mut current) = self.state.gate.lock() {
            *current = gate;
        }
    }

    /// Waits until every session in `ids` ended or `timeout` passed; returns how many ended.
    async fn wait_ended(&self, ids: &HashSet<String>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let ended = self.state.sessions.lock().map_or(0, |sessions| {
                ids.iter()
                    .filter(|id| sessions.get(*id).is_some_and(|p| p.end.is_some()))
                    .count()
            });
            if ended == ids.len() || Instant::now() > deadline {
                return ended;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Removes and returns what was seen of the sessions in `ids`.
    fn take(&self, ids: &HashSet<String>) -> HashMap<String, Progress> {
        let Ok(mut sessions) = self.state.sessions.lock() else {
            return HashMap::new();
        };
        ids.iter()
            .filter_map(|id| Some((id.clone(), sessions.remove(id)?)))
            .collect()
    }

    fn stop(self) {
        let dropped = self.state.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            warn!(
                dropped,
                "the session watch was a slow consumer; counts are low"
            );
        }
        self.stop.cancel();
    }
}

impl SessionState {
    fn observe(&self, payload: &[u8]) {
        let now = self.clock.now_ns();
        let Ok(event) = serde_json::from_slice::<SessionEvent>(payload) else {
            return;
        };
        let end = match event.data.kind.as_str() {
            "session.completed" => Some(End::Completed),
            "session.failed" | "session.cancelled" => Some(End::Failed),
            "task.completed" => None,
            _ => return,
        };
        let Ok(mut sessions) = self.sessions.lock() else {
            return;
        };
        let progress = sessions.entry(event.data.session_id).or_default();
        match end {
            None => {
                progress.tasks_completed += 1;
                progress.last_ns = now;
            }
            Some(end) if progress.end.is_none() => {
                progress.end = Some((end, now));
                drop(sessions);
                if let Ok(gate) = self.gate.lock()
                    && let Some(gate) = gate.as_ref()
                {
                    gate.complete(1);
                }
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::WorkflowDefinition;

    #[test]
    fn both_workflows_are_valid_definitions() {
        for (definition, tasks) in [
            (chain_definition("c", "cap"), CHAIN_TASKS),
            (fan_definition("f", "cap"), FAN_TASKS),
        ] {
            let parsed: WorkflowDefinition =
                serde_json::from_value(definition).expect("definition parses");
            parsed.validate().expect("definition is valid");
            assert_eq!(parsed.tasks.len() as u64, tasks);
        }
    }
}
