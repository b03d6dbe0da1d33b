//! Simulated agents that take tasks: each subscribes to its dispatch subject on its own
//! connection and completes every assignment at once with a `task.result`, recording how
//! long the task waited between becoming ready and reaching it.
//!
//! Readiness travels with the data: a trigger carries its send time in the session input, and
//! each result carries its publish time in its output, which the engine hands to dependent
//! tasks in `results`. A task became ready when the last of those happened.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::agents::connect;
use super::stats::Clock;
use super::{BenchError, Context};
use crate::api::ApiClient;

const ASSIGNED: &str = "opscore.task.assigned.v1";

/// Dispatch latencies by phase, in nanoseconds.
#[derive(Debug, Default)]
struct Recorder {
    dispatch: Mutex<HashMap<String, Vec<u64>>>,
    results_failed: AtomicU64,
}

#[derive(Deserialize)]
struct Dispatch {
    #[serde(rename = "type")]
    kind: String,
    data: AssignmentView,
}

/// The fields of an assignment the agent needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AssignmentView {
    task_id: String,
    lease_epoch: u64,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    results: serde_json::Map<String, Value>,
}

impl Recorder {
    fn record(&self, task: &AssignmentView, received: u64) {
        let ready = if task.results.is_empty() {
            task.input["t"].as_u64()
        } else {
            task.results.values().filter_map(|r| r["t"].as_u64()).max()
        };
        let (Some(ready), Some(phase)) = (ready, task.input["phase"].as_str()) else {
            return;
        };
        if let Ok(mut dispatch) = self.dispatch.lock() {
            dispatch
                .entry(phase.to_owned())
                .or_default()
                .push(received.saturating_sub(ready));
        }
    }
}

/// A set of running task agents.
#[derive(Debug)]
pub(crate) struct TaskAgents {
    pub(crate) count: usize,
    recorder: Arc<Recorder>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl TaskAgents {
    /// Starts `--workflow-agents` agents offering `capability`, and returns once the worker
    /// lists all of them as idle.
    pub(crate) async fn start(
        context: &Context,
        label: &str,
        capability: &str,
    ) -> Result<Self, BenchError> {
        let options = &context.options;
        let mut agents = Self {
            count: options.workflow_agents,
            recorder: Arc::default(),
            stop: CancellationToken::new(),
            tasks: JoinSet::new(),
        };
        for n in 0..options.workflow_agents {
            let id = format!("b{}-{label}-{n}", context.run_id);
            let client = connect(&context.nats_url, &format!("opscore-bench {id}"), None).await?;
            // Subscribed before registering, so no assignment can arrive before anyone listens.
            let dispatch = client
                .subscribe(format!("opscore.dispatch.{id}"))
                .await
                .map_err(|e| BenchError::nats("subscribe to dispatch", e))?;
            client
                .flush()
                .await
                .map_err(|e| BenchError::nats("flush the dispatch subscription", e))?;
            let jetstream = jetstream::new(client);
            let registration = json!({
                "agentId": id,
                "agentName": format!("bench task agent {n}"),
                "version": env!("CARGO_PKG_VERSION"),
                "capabilities": [capability],
                "maxConcurrentTasks": options.slots,
            });
            let idle = json!({"agentId": id, "state": "idle", "timestamp": chrono::Utc::now()});
            for (kind, body) in [("register", registration), ("state", idle)] {
                let subject = format!("opscore.agent.{id}.{kind}");
                jetstream
                    .publish(subject, Bytes::from(body.to_string()))
                    .await
                    .map_err(|e| BenchError::nats("publish", e))?
                    .await
                    .map_err(|e| BenchError::nats(format!("publish {kind} of {id}"), e))?;
            }
            let (recorder, stop, clock) =
                (agents.recorder.clone(), agents.stop.clone(), context.clock);
            agents
                .tasks
                .spawn(serve(id, jetstream, dispatch, clock, recorder, stop));
        }
        agents.wait_idle(context, capability).await?;
        Ok(agents)
    }

    /// Waits until `agent.list` shows every agent idle with the capability.
    async fn wait_idle(&self, context: &Context, capability: &str) -> Result<(), BenchError> {
        let api = ApiClient::new(context.control.clone());
        let seconds = context.options.drain_secs;
        let deadline = context.deadline(seconds);
        loop {
            let mut idle = 0;
            let mut cursor: Option<String> = None;
            loop {
                let request = json!({"capability": capability, "state": "idle", "limit": 1000,
                    "cursor": cursor});
                let page = api
                    .call("agent", "list", &request)
                    .await
                    .map_err(|e| BenchError::api("agent.list", e))?;
                idle += page["agents"].as_array().map_or(0, Vec::len);
                match page["nextCursor"].as_str() {
                    Some(next) => cursor = Some(next.to_owned()),
                    None => break,
                }
            }
            if idle >= self.count {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: format!("{} task agents to be idle ({idle} are)", self.count),
                    seconds,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Takes the dispatch latencies recorded for `phase`.
    pub(crate) fn take_dispatch(&self, phase: &str) -> Vec<u64> {
        self.recorder
            .dispatch
            .lock()
            .ok()
            .and_then(|mut d| d.remove(phase))
            .unwrap_or_default()
    }

    /// Results JetStream did not acknowledge; their tasks wait for a lease timeout.
    pub(crate) fn results_failed(&self) -> u64 {
        self.recorder.results_failed.load(Ordering::Relaxed)
    }

    /// Stops every agent; their connections close with them.
    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// One agent: complete every assignment at once, never waiting for the previous result's
/// acknowledgement before taking the next assignment.
async fn serve(
    id: String,
    jetstream: jetstream::Context,
    mut dispatch: async_nats::Subscriber,
    clock: Clock,
    recorder: Arc<Recorder>,
    stop: CancellationToken,
) {
    let results = Subject::from(format!("opscore.agent.{id}.task.result"));
    let mut acks = FuturesUnordered::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(ack) = acks.next(), if !acks.is_empty() => {
                if let Err(error) = ack {
                    debug!(%error, agent_id = %id, "result not acknowledged");
                    recorder.results_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            message = dispatch.next() => {
                let Some(message) = message else { break };
                let received = clock.now_ns();
                let Ok(event) = serde_json::from_slice::<Dispatch>(&message.payload) else {
                    continue;
                };
                if event.kind != ASSIGNED {
                    continue;
                }
                let task = event.data;
                recorder.record(&task, received);
                // Task ids are subject tokens (validated by the worker), safe inside JSON.
                let body = format!(
                    r#"{{"taskId":"{}","leaseEpoch":{},"status":"completed","output":{{"t":{}}}}}"#,
                    task.task_id,
                    task.lease_epoch,
                    clock.now_ns()
                );
                match jetstream.publish(results.clone(), Bytes::from(body)).await {
                    Ok(ack) => acks.push(ack.into_future()),
                    Err(error) => {
                        debug!(%error, agent_id = %id, "result not published");
                        recorder.results_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    while acks.next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(value: Value) -> AssignmentView {
        serde_json::from_value(value).expect("assignment")
    }

    #[test]
    fn a_task_is_ready_when_its_last_dependency_reported() {
        let recorder = Recorder::default();
        recorder.record(
            &assignment(json!({"taskId": "s-a", "leaseEpoch": 1,
                "input": {"t": 100, "phase": "p"}, "results": {}})),
            150,
        );
        recorder.record(
            &assignment(json!({"taskId": "s-b", "leaseEpoch": 1,
                "input": {"t": 100, "phase": "p"},
                "results": {"x": {"t": 300}, "y": {"t": 400}}})),
            450,
        );
        let dispatch = recorder.dispatch.lock().expect("lock").remove("p");
        assert_eq!(dispatch, Some(vec![50, 50]));
    }
}
