//! Random interleavings of everything that can happen to a session, checked against the
//! invariants the rest of opscore relies on.

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::*;

const AGENTS: [&str; 3] = ["agent-0", "agent-1", "agent-2"];

#[derive(Debug, Clone)]
struct TaskSpec {
    /// Bit j set: depends on task j (only j below this task's index is used).
    deps: u8,
    max_attempts: u32,
    continue_on_failure: bool,
    queue_timeout: Option<u64>,
}

#[derive(Debug, Clone)]
enum Op {
    Assign { task: usize, agent: usize },
    Progress { task: usize, stale: bool },
    Complete { task: usize, stale: bool },
    Fail { task: usize, retryable: bool },
    ResultFromWrongAgent { task: usize, agent: usize },
    ReplayLastResult,
    ExpireLease { task: usize, stale: bool },
    MarkWaiting { task: usize, busy: bool },
    QueueTimeout { task: usize },
    Advance { seconds: i64 },
    Cancel,
}

fn task_spec() -> impl Strategy<Value = TaskSpec> {
    (
        any::<u8>(),
        1u32..=3,
        any::<bool>(),
        prop::option::of(1u64..=40),
    )
        .prop_map(
            |(deps, max_attempts, continue_on_failure, queue_timeout)| TaskSpec {
                deps,
                max_attempts,
                continue_on_failure,
                queue_timeout,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    let task = 0usize..6;
    prop_oneof![
        4 => (task.clone(), 0usize..3).prop_map(|(task, agent)| Op::Assign { task, agent }),
        2 => (task.clone(), any::<bool>()).prop_map(|(task, stale)| Op::Progress { task, stale }),
        4 => (task.clone(), any::<bool>()).prop_map(|(task, stale)| Op::Complete { task, stale }),
        2 => (task.clone(), any::<bool>()).prop_map(|(task, retryable)| Op::Fail { task, retryable }),
        1 => (task.clone(), 0usize..3).prop_map(|(task, agent)| Op::ResultFromWrongAgent { task, agent }),
        2 => Just(Op::ReplayLastResult),
        2 => (task.clone(), any::<bool>()).prop_map(|(task, stale)| Op::ExpireLease { task, stale }),
        1 => (task.clone(), any::<bool>()).prop_map(|(task, busy)| Op::MarkWaiting { task, busy }),
        1 => task.prop_map(|task| Op::QueueTimeout { task }),
        2 => (0i64..90).prop_map(|seconds| Op::Advance { seconds }),
        1 => Just(Op::Cancel),
    ]
}

fn definition(specs: &[TaskSpec]) -> WorkflowDefinition {
    let tasks: Vec<Value> = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let deps: Vec<String> = (0..i)
                .filter(|j| spec.deps & (1 << j) != 0)
                .map(|j| format!("t{j}"))
                .collect();
            json!({
                "taskId": format!("t{i}"), "name": "t", "agentCapability": "cap",
                "dependsOn": deps, "timeoutSeconds": 30,
                "queueTimeoutSeconds": spec.queue_timeout.unwrap_or(0),
                "retry": {"maxAttempts": spec.max_attempts, "initialDelayMs": 500,
                          "maxDelayMs": 4000, "jitter": 0.5},
                "onFailure": if spec.continue_on_failure { "continue" } else { "failSession" },
            })
        })
        .collect();
    serde_json::from_value(json!({"id": "wf", "name": "wf", "version": "1", "tasks": tasks}))
        .expect("generated definition parses")
}

/// The outside view of a session, rebuilt from effects only.
struct Harness {
    session: Session,
    now: DateTime<Utc>,
    /// Live leases as the effects announced them: task id to (agent, epoch).
    leases: HashMap<String, (String, u64)>,
    highest_epoch: HashMap<String, u64>,
    completions: HashMap<String, u32>,
    seq: u64,
    last_result: Option<(String, String, u64, TaskOutcome)>,
}

impl Harness {
    fn observe(&mut self, effects: &[Effect]) -> Result<(), TestCaseError> {
        for effect in effects {
            match effect {
                Effect::Dispatch {
                    agent_id,
                    assignment,
                } => {
                    let task = &assignment.task_id;
                    prop_assert!(
                        !self.leases.contains_key(task),
                        "second live lease on {task}"
                    );
                    let highest = self.highest_epoch.entry(task.clone()).or_default();
                    prop_assert!(assignment.lease_epoch > *highest, "epoch did not grow");
                    *highest = assignment.lease_epoch;
                    self.leases
                        .insert(task.clone(), (agent_id.clone(), assignment.lease_epoch));
                }
                Effect::Cancel(c) => {
                    let live = (c.agent_id.clone(), c.lease_epoch);
                    prop_assert_eq!(
                        self.leases.get(&c.task_id),
                        Some(&live),
                        "cancel of a dead lease"
                    );
                }
                Effect::ReleaseLease(r) => {
                    let live = self.leases.remove(&r.task_id);
                    prop_assert_eq!(live, Some((r.agent_id.clone(), r.lease_epoch)));
                }
                Effect::Status(event) => {
                    prop_assert_eq!(event.seq, self.seq + 1, "seq must grow by one");
                    self.seq = event.seq;
                    if event.kind == EventKind::TaskCompleted {
                        let task = event.task_id.clone().unwrap_or_default();
                        let count = self.completions.entry(task).or_default();
                        *count += 1;
                        prop_assert_eq!(*count, 1, "task completed twice");
                    }
                }
                Effect::Timer(_) | Effect::DeadLetter(_) => {}
            }
        }
        self.check_record()
    }

    /// The record agrees with what the effects told the outside world.
    fn check_record(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.session.seq, self.seq);
        for task in &self.session.tasks {
            let live = self.leases.get(&task.task_id);
            if task.is_leased() {
                let holder = task.agent_id.clone().unwrap_or_default();
                prop_assert_eq!(live, Some(&(holder, task.lease_epoch)));
            } else {
                prop_assert!(
                    live.is_none(),
                    "lease of {} outlived its task",
                    task.task_id
                );
            }
        }
        if self.session.status.is_ended() {
            prop_assert!(self.leases.is_empty());
            prop_assert!(self.session.tasks.iter().all(Task::is_finished));
        }
        Ok(())
    }

    /// Applies a report that must be refused, and checks that it changed nothing.
    fn expect_rejected(
        &mut self,
        task: &str,
        agent: &str,
        epoch: u64,
        outcome: TaskOutcome,
    ) -> Result<(), TestCaseError> {
        let before = self.session.clone();
        let outcome = self
            .session
            .apply_result(task, agent, epoch, outcome, 0.5, self.now);
        prop_assert!(
            outcome.is_err(),
            "stale or foreign result accepted: {:?}",
            outcome
        );
        prop_assert_eq!(&self.session, &before);
        Ok(())
    }

    fn result(&mut self, task: &str, outcome: TaskOutcome) -> Result<(), TestCaseError> {
        let Some(current) = self.session.tasks.iter().find(|t| t.task_id == task) else {
            return Ok(());
        };
        let (agent, epoch) = (
            current.agent_id.clone().unwrap_or_default(),
            current.lease_epoch,
        );
        let before = self.session.clone();
        match self
            .session
            .apply_result(task, &agent, epoch, outcome.clone(), 0.5, self.now)
        {
            Ok(effects) => {
                self.last_result = Some((task.to_owned(), agent, epoch, outcome));
                self.observe(&effects)
            }
            Err(_) => {
                prop_assert_eq!(&self.session, &before);
                Ok(())
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let n = self.session.tasks.len();
        let task_at = |i: usize| self.session.tasks[i % n].clone();
        match op.clone() {
            Op::Assign { task, agent } => {
                let task = task_at(task);
                if let Ok(effects) = self.session.assign(&task.task_id, AGENTS[agent], self.now) {
                    self.observe(&effects)?;
                }
            }
            Op::Progress { task, stale } => {
                let task = task_at(task);
                let agent = task.agent_id.clone().unwrap_or_default();
                let epoch = if stale {
                    task.lease_epoch.wrapping_sub(1)
                } else {
                    task.lease_epoch
                };
                let progress = self
                    .session
                    .apply_progress(&task.task_id, &agent, epoch, self.now);
                prop_assert!(!(stale && progress.is_ok()), "stale progress accepted");
                if let Ok(effects) = progress {
                    self.observe(&effects)?;
                }
            }
            Op::Complete { task, stale } => {
                let task = task_at(task);
                let outcome = TaskOutcome::Completed {
                    output: json!(task.task_definition_id),
                };
                if stale && task.lease_epoch > 0 {
                    let agent = task.agent_id.clone().unwrap_or_default();
                    self.expect_rejected(&task.task_id, &agent, task.lease_epoch - 1, outcome)?;
                } else {
                    self.result(&task.task_id, outcome)?;
                }
            }
            Op::Fail { task, retryable } => {
                let task = task_at(task);
                let outcome = TaskOutcome::Failed {
                    message: "boom".to_owned(),
                    retryable,
                };
                self.result(&task.task_id, outcome)?;
            }
            Op::ResultFromWrongAgent { task, agent } => {
                let task = task_at(task);
                let outcome = TaskOutcome::Completed {
                    output: Value::Null,
                };
                if task.agent_id.as_deref() != Some(AGENTS[agent]) {
                    self.expect_rejected(&task.task_id, AGENTS[agent], task.lease_epoch, outcome)?;
                }
            }
            Op::ReplayLastResult => {
                if let Some((task, agent, epoch, outcome)) = self.last_result.clone() {
                    self.expect_rejected(&task, &agent, epoch, outcome)?;
                }
            }
            Op::ExpireLease { task, stale } => {
                let task = task_at(task);
                if stale {
                    let epoch = task.lease_epoch.wrapping_sub(1);
                    let effects = self
                        .session
                        .lease_expired(&task.task_id, epoch, 0.5, self.now);
                    prop_assert!(effects.is_empty(), "stale lease timer acted");
                } else {
                    if let Some(deadline) = task.lease_deadline {
                        self.now = self.now.max(deadline);
                    }
                    let effects =
                        self.session
                            .lease_expired(&task.task_id, task.lease_epoch, 0.5, self.now);
                    self.observe(&effects)?;
                }
            }
            Op::MarkWaiting { task, busy } => {
                let task = task_at(task);
                let reason = if busy {
                    PendingReason::AllCapableAgentsBusy
                } else {
                    PendingReason::NoCapableAgent
                };
                if let Ok(effects) = self.session.mark_waiting(&task.task_id, reason, self.now) {
                    self.observe(&effects)?;
                }
            }
            Op::QueueTimeout { task } => {
                let task = task_at(task);
                let effects = self.session.queue_timeout(&task.task_id, self.now);
                self.observe(&effects)?;
            }
            Op::Advance { seconds } => self.now += TimeDelta::seconds(seconds),
            Op::Cancel => {
                let was_ended = self.session.status.is_ended();
                match self.session.cancel(self.now) {
                    Ok(effects) => self.observe(&effects)?,
                    Err(rejection) => {
                        prop_assert!(was_ended);
                        prop_assert_eq!(rejection, Rejection::AlreadyEnded(self.session.status));
                    }
                }
            }
        }
        Ok(())
    }

    /// Drives the session to its end: every live lease either completes or (with `expire`)
    /// times out, attempt after attempt, until retries run out.
    fn drain(&mut self, expire: bool) -> Result<(), TestCaseError> {
        for _ in 0..500 {
            if self.session.status.is_ended() {
                return Ok(());
            }
            for idx in 0..self.session.tasks.len() {
                // Re-read each time: ending one lease can end the session and the others.
                let task = self.session.tasks[idx].clone();
                if !task.is_leased() {
                    continue;
                }
                if expire {
                    self.now = self.now.max(task.lease_deadline.unwrap_or(self.now));
                    let effects =
                        self.session
                            .lease_expired(&task.task_id, task.lease_epoch, 0.5, self.now);
                    prop_assert!(!effects.is_empty(), "due lease did not expire");
                    self.observe(&effects)?;
                } else {
                    let output = TaskOutcome::Completed { output: json!(1) };
                    self.result(&task.task_id, output)?;
                }
            }
            for task_id in self.session.ready_tasks(self.now) {
                let effects = self.session.assign(&task_id, AGENTS[0], self.now);
                prop_assert!(effects.is_ok(), "ready task refused: {:?}", effects);
                self.observe(&effects.unwrap_or_default())?;
            }
            // Nothing to place now: wait for the earliest backoff to end.
            let next = self
                .session
                .tasks
                .iter()
                .filter_map(|t| t.next_attempt_at)
                .filter(|&at| at > self.now)
                .min();
            if let Some(at) = next.filter(|_| self.session.ready_tasks(self.now).is_empty()) {
                self.now = at;
            }
        }
        prop_assert!(
            self.session.status.is_ended(),
            "session never ended: {:?}",
            self.session
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_interleavings_keep_leases_fenced_and_sessions_finite(
        specs in prop::collection::vec(task_spec(), 1..=5),
        ops in prop::collection::vec(op(), 0..80),
        expire in any::<bool>(),
    ) {
        let start = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).single().expect("valid time");
        let (session, effects) = Session::start(
            definition(&specs), "s-1", Value::Null, None, Map::new(), start,
        ).expect("session starts");
        let mut harness = Harness {
            session,
            now: start,
            leases: HashMap::new(),
            highest_epoch: HashMap::new(),
            completions: HashMap::new(),
            seq: 0,
            last_result: None,
        };
        harness.observe(&effects)?;
        for op in &ops {
            harness.apply(op)?;
        }
        harness.drain(expire)?;

        let json = serde_json::to_string(&harness.session).expect("serializes");
        let back: Session = serde_json::from_str(&json).expect("deserializes");
        prop_assert_eq!(back, harness.session);
    }
}
