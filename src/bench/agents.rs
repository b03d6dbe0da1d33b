//! Simulated agents that only publish (registrations and state reports), spread over a pool
//! of their own NATS connections, and the watch that sees their transitions come back on
//! `opscore.status.agent.>`.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::Subject;
use async_nats::jetstream;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::BenchError;
use super::publish::{self, Next, Pace, Plan, Tally};
use super::stats::{Clock, Gate};

/// Messages a monitor subscription may buffer before the client drops them. Large, because a
/// dropped status event would read as an event the worker never applied.
const MONITOR_CAPACITY: usize = 1 << 20;

/// One simulated agent.
#[derive(Debug, Clone)]
pub(crate) struct SimAgent {
    pub(crate) id: String,
    pub(crate) state_subject: Subject,
    /// State reports sent so far: their parity picks the next state, their count the next
    /// timestamp, so every report is a transition and none is stale.
    pub(crate) reports: u64,
    /// The phase event number of the agent's last report, while the harness has not seen it
    /// applied (its stamp is still set).
    pub(crate) in_flight: Option<u64>,
}

/// Agents that publish on one connection; the events of one agent always leave in order.
#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) jetstream: jetstream::Context,
    pub(crate) agents: Vec<SimAgent>,
}

/// Agents spread over several connections.
#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) groups: Vec<Group>,
    clients: Vec<async_nats::Client>,
    /// Agent clocks start here; report `k` of an agent is stamped `epoch + k µs`.
    pub(crate) epoch: DateTime<Utc>,
}

/// A NATS connection of the harness, named so `nats server report connections` shows it.
pub(crate) async fn connect(
    url: &str,
    name: &str,
    dropped: Option<Arc<AtomicU64>>,
) -> Result<async_nats::Client, BenchError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .subscription_capacity(MONITOR_CAPACITY);
    if let Some(dropped) = dropped {
        options = options.event_callback(move |event| {
            let dropped = dropped.clone();
            async move {
                if let async_nats::Event::SlowConsumer(_) = event {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    options
        .connect(url)
        .await
        .map_err(|e| BenchError::nats(format!("connect to {url}"), e))
}

impl Pool {
    /// Makes `count` agents named `<prefix><n>` over `connections` new connections.
    pub(crate) async fn connect(
        url: &str,
        connections: usize,
        prefix: &str,
        count: usize,
    ) -> Result<Self, BenchError> {
        let connections = connections.clamp(1, count.max(1));
        let mut groups = Vec::new();
        let mut clients = Vec::new();
        for c in 0..connections {
            let client = connect(url, &format!("opscore-bench agents {c}"), None).await?;
            let agents = (c..count)
                .step_by(connections)
                .map(|n| {
                    let id = format!("{prefix}{n}");
                    SimAgent {
                        state_subject: Subject::from(format!("opscore.agent.{id}.state")),
                        id,
                        reports: 0,
                        in_flight: None,
                    }
                })
                .collect();
            groups.push(Group {
                jetstream: jetstream::new(client.clone()),
                agents,
            });
            clients.push(client);
        }
        Ok(Self {
            groups,
            clients,
            epoch: Utc::now(),
        })
    }

    /// Runs `work` on every group at once, each on its own task, and puts the groups back.
    pub(crate) async fn on_groups<F, Fut>(&mut self, work: F) -> Tally
    where
        F: Fn(usize, Group) -> Fut,
        Fut: Future<Output = (Group, Tally)> + Send + 'static,
    {
        let mut tasks = JoinSet::new();
        for (g, group) in std::mem::take(&mut self.groups).into_iter().enumerate() {
            let work = work(g, group);
            tasks.spawn(async move { (g, work.await) });
        }
        let mut done = Vec::new();
        let mut total = Tally::default();
        while let Some(joined) = tasks.join_next().await {
            // A publisher task only ends by returning; a panic there is a bug worth seeing.
            let (g, (group, tally)) =
                joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            total.merge(tally);
            done.push((g, group));
        }
        done.sort_by_key(|(g, _)| *g);
        self.groups = done.into_iter().map(|(_, group)| group).collect();
        total
    }

    /// Registers every agent with `capabilities(n)` for agent `n` of each group, pipelined.
    pub(crate) async fn register(
        &mut self,
        capabilities: Arc<dyn Fn(usize) -> Vec<String> + Send + Sync>,
        window: usize,
        deadline: Instant,
        clock: Clock,
    ) -> Tally {
        self.on_groups(|_, group| {
            let capabilities = capabilities.clone();
            let plan = Plan {
                window,
                pace: Pace::FlatOut,
                deadline,
                gate: None,
            };
            async move {
                let count = group.agents.len() as u64;
                let tally = publish::publish(&group.jetstream, count, &plan, clock, |i, _| {
                    let agent = &group.agents[i as usize];
                    let body = serde_json::json!({
                        "agentId": agent.id,
                        "agentName": format!("bench agent {}", agent.id),
                        "version": env!("CARGO_PKG_VERSION"),
                        "capabilities": capabilities(i as usize),
                        "maxConcurrentTasks": 1,
                    });
                    let subject = format!("opscore.agent.{}.register", agent.id);
                    Next::Send(Subject::from(subject), Bytes::from(body.to_string()))
                })
                .await;
                (group, tally)
            }
        })
        .await
    }

    /// Closes the pool's connections after their pending writes.
    pub(crate) async fn close(self) {
        for client in self.clients {
            let _ = client.drain().await;
        }
    }
}

/// The payload of state report `report` of `agent_id`: it alternates `idle` and `busy` so
/// every report is a transition, and carries marks the watch matches it by.
pub(crate) fn state_payload(
    agent_id: &str,
    report: u64,
    epoch: DateTime<Utc>,
    run: &str,
    phase: &str,
    n: u64,
) -> Bytes {
    let state = if report.is_multiple_of(2) {
        "idle"
    } else {
        "busy"
    };
    let micros = i64::try_from(report).unwrap_or(i64::MAX);
    let timestamp = (epoch + chrono::Duration::microseconds(micros))
        .to_rfc3339_opts(SecondsFormat::Micros, true);
    Bytes::from(format!(
        r#"{{"agentId":"{agent_id}","state":"{state}","timestamp":"{timestamp}","details":{{"run":"{run}","phase":"{phase}","n":{n}}}}}"#
    ))
}

/// What the watch records for one phase of state reports.
#[derive(Debug)]
pub(crate) struct PhaseRecord {
    pub(crate) name: String,
    /// Publish time of event `n`: 0 until it is published, and 0 again once the watch saw
    /// it applied (the watch takes the stamp), so a stamp still set means "in flight".
    stamps: Arc<Vec<AtomicU64>>,
    /// Publish-to-applied latency of every matched event, in nanoseconds.
    pub(crate) latencies: Vec<u64>,
    /// State changes of this phase seen.
    pub(crate) applied: u64,
    /// When the last matched event was seen.
    pub(crate) last_ns: u64,
    gate: Option<Arc<Gate>>,
}

#[derive(Debug)]
struct WatchState {
    run: String,
    /// Ids of this run's agents start with it.
    prefix: String,
    clock: Clock,
    registered: AtomicU64,
    applied: AtomicU64,
    notify: Notify,
    phase: std::sync::Mutex<Option<PhaseRecord>>,
    dropped: Arc<AtomicU64>,
}

/// A subscriber to `opscore.status.agent.>` counting this run's registrations and matching
/// each applied state report to its publish time.
#[derive(Debug)]
pub(crate) struct AgentWatch {
    state: Arc<WatchState>,
    stop: CancellationToken,
}

#[derive(Deserialize)]
struct StatusEvent<'a> {
    #[serde(borrow)]
    data: Transition<'a>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Transition<'a> {
    #[serde(borrow)]
    agent_id: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    details: Option<Marks<'a>>,
}

#[derive(Deserialize)]
struct Marks<'a> {
    #[serde(default, borrow)]
    run: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    phase: Option<Cow<'a, str>>,
    #[serde(default)]
    n: Option<u64>,
}

impl AgentWatch {
    /// Subscribes on its own connection and returns once the subscription is in place.
    pub(crate) async fn start(
        url: &str,
        run: &str,
        prefix: &str,
        clock: Clock,
    ) -> Result<Self, BenchError> {
        let dropped = Arc::new(AtomicU64::new(0));
        let client = connect(url, "opscore-bench agent watch", Some(dropped.clone())).await?;
        let mut subscription = client
            .subscribe("opscore.status.agent.>")
            .await
            .map_err(|e| BenchError::nats("subscribe to agent status", e))?;
        client
            .flush()
            .await
            .map_err(|e| BenchError::nats("flush the watch subscription", e))?;
        let state = Arc::new(WatchState {
            run: run.to_owned(),
            prefix: prefix.to_owned(),
            clock,
            registered: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            notify: Notify::new(),
            phase: std::sync::Mutex::new(None),
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

    /// Registrations of this run's agents seen so far.
    pub(crate) fn registered(&self) -> u64 {
        self.state.registered.load(Ordering::Acquire)
    }

    /// Messages the watch's connection dropped as a slow consumer; any makes counts suspect.
    pub(crate) fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::Relaxed)
    }

    /// Waits until `target` registrations were seen; returns the clock time it happened, or
    /// the count reached when `timeout` ran out.
    pub(crate) async fn wait_registered(&self, target: u64, timeout: Duration) -> Result<u64, u64> {
        self.wait(&self.state.registered, target, timeout).await
    }

    /// Starts matching state reports marked with phase `name`.
    pub(crate) fn begin_phase(
        &self,
        name: &str,
        events: usize,
        gate: Option<Arc<Gate>>,
    ) -> Arc<Vec<AtomicU64>> {
        let stamps: Arc<Vec<AtomicU64>> =
            Arc::new((0..events).map(|_| AtomicU64::new(0)).collect());
        self.state.applied.store(0, Ordering::Release);
        if let Ok(mut phase) = self.state.phase.lock() {
            *phase = Some(PhaseRecord {
                name: name.to_owned(),
                stamps: stamps.clone(),
                latencies: Vec::with_capacity(events),
                applied: 0,
                last_ns: 0,
                gate,
            });
        }
        stamps
    }

    /// Waits until `target` reports of the current phase were applied; see
    /// [`AgentWatch::wait_registered`] for the result.
    pub(crate) async fn wait_applied(&self, target: u64, timeout: Duration) -> Result<u64, u64> {
        self.wait(&self.state.applied, target, timeout).await
    }

    /// Stops matching and hands over what the phase recorded.
    pub(crate) fn end_phase(&self) -> Option<PhaseRecord> {
        self.state
            .phase
            .lock()
            .ok()
            .and_then(|mut phase| phase.take())
    }

    async fn wait(&self, counter: &AtomicU64, target: u64, timeout: Duration) -> Result<u64, u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.state.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if counter.load(Ordering::Acquire) >= target {
                return Ok(self.state.clock.now_ns());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(counter.load(Ordering::Acquire));
            }
        }
    }

    pub(crate) fn stop(self) {
        self.stop.cancel();
    }
}

impl WatchState {
    fn observe(&self, payload: &[u8]) {
        let now = self.clock.now_ns();
        let Ok(event) = serde_json::from_slice::<StatusEvent<'_>>(payload) else {
            return;
        };
        let transition = event.data;
        if !transition.agent_id.starts_with(&self.prefix) {
            return;
        }
        match transition.kind.as_ref() {
            "registered" => {
                self.registered.fetch_add(1, Ordering::AcqRel);
                self.notify.notify_waiters();
            }
            "state_changed" => {
                let Some(marks) = transition.details else {
                    return;
                };
                if marks.run.as_deref() != Some(self.run.as_str()) {
                    return;
                }
                let Ok(mut guard) = self.phase.lock() else {
                    return;
                };
                let Some(phase) = guard.as_mut() else {
                    return;
                };
                if marks.phase.as_deref() != Some(phase.name.as_str()) {
                    return;
                }
                let stamp = marks
                    .n
                    .and_then(|n| phase.stamps.get(usize::try_from(n).ok()?))
                    .map_or(0, |stamp| stamp.swap(0, Ordering::AcqRel));
                if stamp > 0 {
                    phase.latencies.push(now.saturating_sub(stamp));
                }
                phase.applied += 1;
                phase.last_ns = now;
                if let Some(gate) = &phase.gate {
                    gate.complete(1);
                }
                drop(guard);
                self.applied.fetch_add(1, Ordering::AcqRel);
                self.notify.notify_waiters();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_payloads_alternate_and_parse_as_reports() {
        let epoch = Utc::now();
        let first: serde_json::Value =
            serde_json::from_slice(&state_payload("a-1", 0, epoch, "r1", "sat", 7)).expect("json");
        let second: serde_json::Value =
            serde_json::from_slice(&state_payload("a-1", 1, epoch, "r1", "sat", 8)).expect("json");
        assert_eq!(first["state"], "idle");
        assert_eq!(second["state"], "busy");
        assert_eq!(first["details"]["n"], 7);
        let report: crate::model::StateReport =
            serde_json::from_value(second).expect("a valid state report");
        assert!(report.timestamp > epoch);
    }
}
