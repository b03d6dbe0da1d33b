//! Session transitions. Each is a method on [`Session`] taking the event and `now` (and, where
//! a retry may be scheduled, a jitter sample) and returning the effects to perform after the
//! changed record is committed. Nothing here reads a clock or a random generator.
//!
//! A refused event returns a [`Rejection`] and leaves the session untouched, so a handler can
//! count it and ack. Timer calls (`lease_expired`, `queue_timeout`) instead return no effects
//! when the timer no longer applies, since stale timers are routine.

use std::collections::HashSet;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Map, Value};

use super::definition::{DefinitionError, WorkflowDefinition, is_token};
use super::effect::{Assignment, DeadLetterReason, Effect, EventKind, Timer, TimerKind};
use super::session::{
    MAX_SESSION_ID_LEN, PendingReason, Session, SessionStatus, Task, TaskError, TaskStatus,
    task_id_for,
};
use steps::Ending;

/// Why a session could not be started.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    #[error("invalid session id {0:?}: must match ^[A-Za-z0-9_-]{{1,64}}$")]
    InvalidSessionId(String),
    #[error("invalid agent id {0:?}: must match ^[A-Za-z0-9_-]{{1,128}}$")]
    InvalidAgentId(String),
    /// Only possible for a definition id crafted to equal another's shortened form.
    #[error("task {0}: task id collides with another task's")]
    TaskIdCollision(String),
}

/// Why the engine refused an event. The session is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("task {0}: unknown task")]
    UnknownTask(String),
    /// The report names an older lease, e.g. from an agent whose lease expired.
    #[error("task {task_id}: stale lease epoch {epoch}, current is {current}")]
    StaleLease {
        task_id: String,
        epoch: u64,
        current: u64,
    },
    /// Another agent holds the lease: a spoof or a confused agent.
    #[error("task {task_id}: agent {agent_id} does not hold the lease")]
    NotLeaseHolder { task_id: String, agent_id: String },
    /// The lease named is current but already ended: a duplicate report.
    #[error("task {task_id}: lease {epoch} already ended, task is {status}")]
    LeaseEnded {
        task_id: String,
        epoch: u64,
        status: TaskStatus,
    },
    #[error("task {task_id}: not ready to dispatch, task is {status}")]
    NotReady { task_id: String, status: TaskStatus },
    #[error("task {task_id}: session is pinned to agent {pinned}")]
    PinnedToOtherAgent { task_id: String, pinned: String },
    #[error("invalid agent id {0:?}: must match ^[A-Za-z0-9_-]{{1,128}}$")]
    InvalidAgentId(String),
    /// `mark_waiting` accepts only `no_capable_agent` and `all_capable_agents_busy`.
    #[error("task {0}: only a missing or busy agent is a reason to wait for placement")]
    NotAnAgentWait(String),
    /// The control API maps this to 409.
    #[error("session already {0}")]
    AlreadyEnded(SessionStatus),
}

impl Rejection {
    /// Whether this is a late or repeated report that at-least-once delivery makes routine,
    /// to be counted as stale or duplicate rather than reported as an error.
    pub fn is_stale_report(&self) -> bool {
        matches!(self, Self::StaleLease { .. } | Self::LeaseEnded { .. })
    }
}

/// What an agent reported for its attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskOutcome {
    Completed { output: Value },
    Failed { message: String, retryable: bool },
}

impl Session {
    /// Starts a session of `definition` (validated here) with the given id. Tasks without
    /// dependencies are ready at once; the others wait on theirs.
    pub fn start(
        definition: WorkflowDefinition,
        session_id: &str,
        input: Value,
        pinned_agent: Option<String>,
        metadata: Map<String, Value>,
        now: DateTime<Utc>,
    ) -> Result<(Session, Vec<Effect>), StartError> {
        definition.validate()?;
        if !is_token(session_id) || session_id.len() > MAX_SESSION_ID_LEN {
            return Err(StartError::InvalidSessionId(session_id.to_owned()));
        }
        if let Some(agent) = pinned_agent.as_deref().filter(|a| !is_token(a)) {
            return Err(StartError::InvalidAgentId(agent.to_owned()));
        }

        let mut tasks: Vec<Task> = Vec::with_capacity(definition.tasks.len());
        let mut task_ids = HashSet::new();
        for resolved in definition.resolved_tasks() {
            let def = resolved.definition;
            let task_id = task_id_for(session_id, &def.task_id);
            if !task_ids.insert(task_id.clone()) {
                return Err(StartError::TaskIdCollision(def.task_id.clone()));
            }
            let waiting = !resolved.depends_on.is_empty();
            tasks.push(Task {
                task_id,
                task_definition_id: def.task_id.clone(),
                name: def.name.clone(),
                capability: def.agent_capability.clone(),
                parameters: def.parameters.clone(),
                pending: waiting.then(|| PendingReason::WaitingOn {
                    tasks: resolved.depends_on.clone(),
                }),
                depends_on: resolved.depends_on,
                status: TaskStatus::Pending,
                attempt: 0,
                agent_id: None,
                lease_epoch: 0,
                lease_deadline: None,
                output: None,
                error: None,
                created_at: now,
                ready_at: (!waiting).then_some(now),
                dispatched_at: None,
                started_at: None,
                finished_at: None,
                next_attempt_at: None,
            });
        }

        // Created pending and started in the same step: nothing can happen in between.
        let mut session = Session {
            session_id: session_id.to_owned(),
            workflow_id: definition.id.clone(),
            workflow_version: definition.version.clone(),
            agent_id: pinned_agent,
            status: SessionStatus::Running,
            start_time: now,
            end_time: None,
            input,
            result: None,
            error: None,
            metadata,
            definition,
            tasks,
            seq: 0,
            traceparent: None,
        };
        let mut effects = vec![session.session_event(EventKind::SessionStarted, now)];
        for idx in 0..session.tasks.len() {
            effects.push(session.task_event(idx, EventKind::TaskPending, now));
        }
        Ok((session, effects))
    }

    /// Ids of the tasks the scheduler should try to place now: pending or retrying, every
    /// dependency resolved, backoff over. In definition order.
    pub fn ready_tasks(&self, now: DateTime<Utc>) -> Vec<String> {
        (0..self.tasks.len())
            .filter(|&idx| self.is_ready(idx, now))
            .map(|idx| self.tasks[idx].task_id.clone())
            .collect()
    }

    /// Leases a ready task to `agent_id` for one attempt.
    pub fn assign(
        &mut self,
        task_id: &str,
        agent_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Effect>, Rejection> {
        let idx = self.index_of(task_id)?;
        if self.status.is_ended() {
            return Err(Rejection::AlreadyEnded(self.status));
        }
        if !self.is_ready(idx, now) {
            return Err(Rejection::NotReady {
                task_id: task_id.to_owned(),
                status: self.tasks[idx].status,
            });
        }
        if let Some(pinned) = self.agent_id.as_deref().filter(|&p| p != agent_id) {
            return Err(Rejection::PinnedToOtherAgent {
                task_id: task_id.to_owned(),
                pinned: pinned.to_owned(),
            });
        }
        if !is_token(agent_id) {
            return Err(Rejection::InvalidAgentId(agent_id.to_owned()));
        }

        let deadline = later(now, seconds(self.settings(idx).timeout_seconds));
        let results = self.dependency_results(idx);
        let task = &mut self.tasks[idx];
        task.attempt += 1;
        task.lease_epoch += 1;
        task.agent_id = Some(agent_id.to_owned());
        task.status = TaskStatus::Dispatched;
        task.lease_deadline = Some(deadline);
        task.pending = None;
        task.next_attempt_at = None;
        task.dispatched_at = Some(now);
        task.started_at = None;

        let assignment = Assignment {
            task_id: task.task_id.clone(),
            session_id: self.session_id.clone(),
            workflow_id: self.workflow_id.clone(),
            task_definition_id: task.task_definition_id.clone(),
            name: task.name.clone(),
            capability: task.capability.clone(),
            parameters: task.parameters.clone(),
            input: self.input.clone(),
            results,
            attempt: task.attempt,
            lease_epoch: task.lease_epoch,
            deadline,
        };
        let timer = self.lease_timer(idx, deadline);
        Ok(vec![
            Effect::Dispatch {
                agent_id: agent_id.to_owned(),
                assignment,
            },
            self.task_event(idx, EventKind::TaskDispatched, now),
            timer,
        ])
    }

    /// Records why a ready task could not be placed. A status event is emitted only when the
    /// reason changes, so repeated scheduling passes do not flood monitors. When the task
    /// starts waiting and has a queue timeout, a timer is armed for it.
    pub fn mark_waiting(
        &mut self,
        task_id: &str,
        reason: PendingReason,
        now: DateTime<Utc>,
    ) -> Result<Vec<Effect>, Rejection> {
        let idx = self.index_of(task_id)?;
        if !matches!(
            reason,
            PendingReason::NoCapableAgent | PendingReason::AllCapableAgentsBusy
        ) {
            return Err(Rejection::NotAnAgentWait(task_id.to_owned()));
        }
        if !self.is_ready(idx, now) {
            return Err(Rejection::NotReady {
                task_id: task_id.to_owned(),
                status: self.tasks[idx].status,
            });
        }
        if self.tasks[idx].pending.as_ref() == Some(&reason) {
            return Ok(Vec::new());
        }

        let settings = self.settings(idx);
        let task = &mut self.tasks[idx];
        let was_waiting_for_agent = matches!(
            task.pending,
            Some(PendingReason::NoCapableAgent | PendingReason::AllCapableAgentsBusy)
        );
        task.pending = Some(reason);
        let timer = match (settings.queue_timeout_seconds, task.ready_at) {
            (Some(limit), Some(ready_at)) if !was_waiting_for_agent => Some(Timer {
                session_id: self.session_id.clone(),
                kind: TimerKind::QueueTimeout {
                    task_id: task.task_id.clone(),
                    attempt: task.attempt,
                },
                at: later(ready_at, seconds(limit)),
            }),
            _ => None,
        };

        let mut effects = vec![self.task_event(idx, EventKind::TaskPending, now)];
        effects.extend(timer.map(Effect::Timer));
        Ok(effects)
    }

    /// A progress report from the lease holder: the task is running and its lease extends to
    /// `now + timeoutSeconds`.
    pub fn apply_progress(
        &mut self,
        task_id: &str,
        agent_id: &str,
        lease_epoch: u64,
        now: DateTime<Utc>,
    ) -> Result<Vec<Effect>, Rejection> {
        let idx = self.check_lease(task_id, agent_id, lease_epoch)?;
        let extended = later(now, seconds(self.settings(idx).timeout_seconds));
        let mut effects = Vec::new();

        let task = &mut self.tasks[idx];
        let deadline = task.lease_deadline.map_or(extended, |d| d.max(extended));
        task.lease_deadline = Some(deadline);
        if task.status == TaskStatus::Dispatched {
            task.status = TaskStatus::Running;
            task.started_at = Some(now);
            effects.push(self.task_event(idx, EventKind::TaskRunning, now));
        }
        effects.push(self.lease_timer(idx, deadline));
        Ok(effects)
    }

    /// The lease holder's result for its attempt. `jitter_sample` (uniform in `[0, 1)`) is used
    /// only if a retry is scheduled.
    pub fn apply_result(
        &mut self,
        task_id: &str,
        agent_id: &str,
        lease_epoch: u64,
        outcome: TaskOutcome,
        jitter_sample: f64,
        now: DateTime<Utc>,
    ) -> Result<Vec<Effect>, Rejection> {
        let idx = self.check_lease(task_id, agent_id, lease_epoch)?;
        let mut effects = Vec::new();
        self.end_lease(idx, false, &mut effects);
        match outcome {
            TaskOutcome::Completed { output } => self.complete_task(idx, output, now, &mut effects),
            TaskOutcome::Failed { message, retryable } => {
                let error = TaskError { message, retryable };
                self.attempt_failed(idx, error, jitter_sample, now, &mut effects);
            }
        }
        Ok(effects)
    }

    /// A lease deadline timer fired. If that lease is still held and its deadline has passed,
    /// the attempt times out as a retryable failure and its holder is told to stop; otherwise
    /// (progress extended it, a result arrived, the task was reassigned) nothing happens.
    pub fn lease_expired(
        &mut self,
        task_id: &str,
        lease_epoch: u64,
        jitter_sample: f64,
        now: DateTime<Utc>,
    ) -> Vec<Effect> {
        let Some(idx) = self.tasks.iter().position(|t| t.task_id == task_id) else {
            return Vec::new();
        };
        let task = &self.tasks[idx];
        if !task.is_leased()
            || task.lease_epoch != lease_epoch
            || task.lease_deadline.is_none_or(|deadline| deadline > now)
        {
            return Vec::new();
        }

        let mut effects = Vec::new();
        self.end_lease(idx, true, &mut effects);
        let error = TaskError {
            message: "lease expired".to_owned(),
            retryable: true,
        };
        self.attempt_failed(idx, error, jitter_sample, now, &mut effects);
        effects
    }

    /// A queue timeout timer fired. If the task is still ready but unplaced and has waited its
    /// `queueTimeoutSeconds` since it became ready, it fails for good.
    pub fn queue_timeout(&mut self, task_id: &str, now: DateTime<Utc>) -> Vec<Effect> {
        let Some(idx) = self.tasks.iter().position(|t| t.task_id == task_id) else {
            return Vec::new();
        };
        let (Some(limit), Some(ready_at)) = (
            self.settings(idx).queue_timeout_seconds,
            self.tasks[idx].ready_at,
        ) else {
            return Vec::new();
        };
        if !self.is_ready(idx, now) || later(ready_at, seconds(limit)) > now {
            return Vec::new();
        }

        let message = format!(
            "no agent with capability {} took the task within {limit}s",
            self.tasks[idx].capability
        );
        let error = TaskError {
            message,
            retryable: false,
        };
        let mut effects = Vec::new();
        self.fail_task(
            idx,
            error,
            DeadLetterReason::QueueTimeout,
            now,
            &mut effects,
        );
        effects
    }

    /// Cancels a session that has not ended: every lease holder is told to stop and every
    /// unfinished task is cancelled.
    pub fn cancel(&mut self, now: DateTime<Utc>) -> Result<Vec<Effect>, Rejection> {
        if self.status.is_ended() {
            return Err(Rejection::AlreadyEnded(self.status));
        }
        let mut effects = Vec::new();
        self.end_session(Ending::Cancelled, now, &mut effects);
        Ok(effects)
    }
}

mod steps;

/// `t + delta`, saturating instead of panicking at the end of time.
fn later(t: DateTime<Utc>, delta: TimeDelta) -> DateTime<Utc> {
    t.checked_add_signed(delta)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn seconds(s: u64) -> TimeDelta {
    TimeDelta::try_seconds(i64::try_from(s).unwrap_or(i64::MAX)).unwrap_or(TimeDelta::MAX)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
