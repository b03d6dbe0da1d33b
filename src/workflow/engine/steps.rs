//! The steps the public transitions share: checks, the ways a task or session ends, and the
//! builders of effects. Every status change goes through `task_event` or `session_event`,
//! which is what keeps `seq` strictly increasing.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{Rejection, later};
use crate::workflow::backoff::backoff_delay;
use crate::workflow::definition::{OnFailure, TaskSettings};
use crate::workflow::effect::{
    Cancellation, DeadLetter, DeadLetterReason, Effect, EventError, EventKind, EventStatus,
    LeaseRelease, SessionEvent, Timer, TimerKind,
};
use crate::workflow::session::{
    PendingReason, Session, SessionError, SessionStatus, TaskError, TaskStatus,
};

/// How a session ends before all of its tasks finish.
#[derive(Debug)]
pub(super) enum Ending {
    Failed(SessionError),
    Cancelled,
}

impl Session {
    pub(super) fn index_of(&self, task_id: &str) -> Result<usize, Rejection> {
        self.tasks
            .iter()
            .position(|t| t.task_id == task_id)
            .ok_or_else(|| Rejection::UnknownTask(task_id.to_owned()))
    }

    pub(super) fn settings(&self, idx: usize) -> TaskSettings {
        self.definition
            .settings_for(&self.tasks[idx].task_definition_id)
    }

    /// Whether the scheduler may place task `idx` now.
    pub(super) fn is_ready(&self, idx: usize, now: DateTime<Utc>) -> bool {
        let task = &self.tasks[idx];
        self.status == SessionStatus::Running
            && matches!(task.status, TaskStatus::Pending | TaskStatus::Retrying)
            && task.next_attempt_at.is_none_or(|at| at <= now)
            && self.unresolved_dependencies(idx).is_empty()
    }

    /// A dependency is resolved once completed, or once failed for good under
    /// `onFailure: continue`. A dependency missing from the session (only possible in a
    /// hand-edited record) never resolves, which leaves the task visibly `waiting_on` it.
    fn unresolved_dependencies(&self, idx: usize) -> Vec<String> {
        self.tasks[idx]
            .depends_on
            .iter()
            .filter(|dep| {
                let Some(task) = self.tasks.iter().find(|t| &t.task_definition_id == *dep) else {
                    return true;
                };
                let resolved = task.status == TaskStatus::Completed
                    || (task.status == TaskStatus::Failed
                        && self.definition.settings_for(dep).on_failure == OnFailure::Continue);
                !resolved
            })
            .cloned()
            .collect()
    }

    /// The outputs of task `idx`'s completed dependencies, by task definition id.
    pub(super) fn dependency_results(&self, idx: usize) -> Map<String, Value> {
        self.tasks[idx]
            .depends_on
            .iter()
            .filter_map(|dep| {
                let task = self.tasks.iter().find(|t| &t.task_definition_id == dep)?;
                let output = task
                    .output
                    .clone()
                    .filter(|_| task.status == TaskStatus::Completed);
                Some((dep.clone(), output?))
            })
            .collect()
    }

    /// Accepts a report only from the current lease: right epoch, right agent, still live.
    pub(super) fn check_lease(
        &self,
        task_id: &str,
        agent_id: &str,
        lease_epoch: u64,
    ) -> Result<usize, Rejection> {
        let idx = self.index_of(task_id)?;
        let task = &self.tasks[idx];
        if task.lease_epoch == 0 || lease_epoch != task.lease_epoch {
            return Err(Rejection::StaleLease {
                task_id: task_id.to_owned(),
                epoch: lease_epoch,
                current: task.lease_epoch,
            });
        }
        if task.agent_id.as_deref() != Some(agent_id) {
            return Err(Rejection::NotLeaseHolder {
                task_id: task_id.to_owned(),
                agent_id: agent_id.to_owned(),
            });
        }
        if !task.is_leased() {
            return Err(Rejection::LeaseEnded {
                task_id: task_id.to_owned(),
                epoch: lease_epoch,
                status: task.status,
            });
        }
        Ok(idx)
    }

    /// Frees the holder's slot and, when `cancel`, tells it to stop working on the task.
    pub(super) fn end_lease(&mut self, idx: usize, cancel: bool, effects: &mut Vec<Effect>) {
        self.tasks[idx].lease_deadline = None;
        let Some((cancellation, release)) = self.lease_messages(idx) else {
            return;
        };
        if cancel {
            effects.push(Effect::Cancel(cancellation));
        }
        effects.push(Effect::ReleaseLease(release));
    }

    pub(super) fn complete_task(
        &mut self,
        idx: usize,
        output: Value,
        now: DateTime<Utc>,
        effects: &mut Vec<Effect>,
    ) {
        let task = &mut self.tasks[idx];
        task.status = TaskStatus::Completed;
        task.output = Some(output);
        task.error = None;
        task.finished_at = Some(now);
        effects.push(self.task_event(idx, EventKind::TaskCompleted, now));
        self.advance(now, effects);
    }

    /// An attempt failed (the lease is already released): retry after a backoff if the error
    /// allows and attempts remain, else fail the task for good.
    pub(super) fn attempt_failed(
        &mut self,
        idx: usize,
        error: TaskError,
        jitter_sample: f64,
        now: DateTime<Utc>,
        effects: &mut Vec<Effect>,
    ) {
        let retry = self.settings(idx).retry;
        let attempt = self.tasks[idx].attempt;
        if !error.retryable {
            return self.fail_task(idx, error, DeadLetterReason::NotRetryable, now, effects);
        }
        if attempt >= retry.max_attempts {
            return self.fail_task(idx, error, DeadLetterReason::RetriesExhausted, now, effects);
        }

        let until = later(now, backoff_delay(&retry, attempt, jitter_sample));
        let task = &mut self.tasks[idx];
        task.status = TaskStatus::Retrying;
        task.error = Some(error);
        task.next_attempt_at = Some(until);
        // The queue timeout of the next attempt counts from the end of the backoff.
        task.ready_at = Some(until);
        task.pending = Some(PendingReason::Backoff { until });
        let timer = Timer {
            session_id: self.session_id.clone(),
            kind: TimerKind::Backoff {
                task_id: task.task_id.clone(),
                attempt,
            },
            at: until,
        };
        effects.push(self.task_event(idx, EventKind::TaskRetrying, now));
        effects.push(Effect::Timer(timer));
    }

    /// Fails task `idx` for good, dead-letters it, and applies its `onFailure`.
    pub(super) fn fail_task(
        &mut self,
        idx: usize,
        error: TaskError,
        reason: DeadLetterReason,
        now: DateTime<Utc>,
        effects: &mut Vec<Effect>,
    ) {
        let task = &mut self.tasks[idx];
        task.status = TaskStatus::Failed;
        task.error = Some(error.clone());
        task.pending = None;
        task.next_attempt_at = None;
        task.lease_deadline = None;
        task.finished_at = Some(now);
        effects.push(self.task_event(idx, EventKind::TaskFailed, now));
        let message = error.message.clone();
        effects.push(self.dead_letter(idx, error, reason, now));

        match self.settings(idx).on_failure {
            OnFailure::FailSession => {
                let task = &self.tasks[idx];
                let failure = SessionError {
                    message,
                    task_id: Some(task.task_id.clone()),
                    task_definition_id: Some(task.task_definition_id.clone()),
                };
                self.end_session(Ending::Failed(failure), now, effects);
            }
            OnFailure::Continue => self.advance(now, effects),
        }
    }

    /// After a task resolved: release the tasks that waited only on it, and complete the
    /// session once every task has finished.
    fn advance(&mut self, now: DateTime<Utc>, effects: &mut Vec<Effect>) {
        for idx in 0..self.tasks.len() {
            let task = &self.tasks[idx];
            if task.status != TaskStatus::Pending
                || !matches!(task.pending, Some(PendingReason::WaitingOn { .. }))
            {
                continue;
            }
            let waiting = self.unresolved_dependencies(idx);
            let task = &mut self.tasks[idx];
            if waiting.is_empty() {
                task.pending = None;
                task.ready_at = Some(now);
                effects.push(self.task_event(idx, EventKind::TaskPending, now));
            } else {
                // Narrowed quietly: a fan-in would otherwise emit one event per dependency.
                task.pending = Some(PendingReason::WaitingOn { tasks: waiting });
            }
        }

        // Under `failSession` a failed task has already ended the session, so a finished
        // task here is completed, or failed under `continue`.
        if self.status == SessionStatus::Running && self.tasks.iter().all(|t| t.is_finished()) {
            let result: Map<String, Value> = self
                .tasks
                .iter()
                .filter(|t| t.status == TaskStatus::Completed)
                .filter_map(|t| Some((t.task_definition_id.clone(), t.output.clone()?)))
                .collect();
            self.status = SessionStatus::Completed;
            self.end_time = Some(now);
            self.result = Some(Value::Object(result));
            effects.push(self.session_event(EventKind::SessionCompleted, now));
        }
    }

    /// Ends the session: lease holders are told to stop, unfinished tasks are cancelled.
    pub(super) fn end_session(
        &mut self,
        ending: Ending,
        now: DateTime<Utc>,
        effects: &mut Vec<Effect>,
    ) {
        for idx in 0..self.tasks.len() {
            if self.tasks[idx].is_finished() {
                continue;
            }
            if self.tasks[idx].is_leased() {
                self.end_lease(idx, true, effects);
            }
            let task = &mut self.tasks[idx];
            task.status = TaskStatus::Cancelled;
            task.pending = None;
            task.next_attempt_at = None;
            task.finished_at = Some(now);
            effects.push(self.task_event(idx, EventKind::TaskCancelled, now));
        }

        let kind = match ending {
            Ending::Failed(error) => {
                self.status = SessionStatus::Failed;
                self.error = Some(error);
                EventKind::SessionFailed
            }
            Ending::Cancelled => {
                self.status = SessionStatus::Cancelled;
                EventKind::SessionCancelled
            }
        };
        self.end_time = Some(now);
        effects.push(self.session_event(kind, now));
    }

    pub(super) fn session_event(&mut self, kind: EventKind, now: DateTime<Utc>) -> Effect {
        self.seq += 1;
        Effect::Status(SessionEvent {
            session_id: self.session_id.clone(),
            seq: self.seq,
            kind,
            task_id: None,
            task_definition_id: None,
            status: EventStatus::Session(self.status),
            attempt: None,
            agent_id: self.agent_id.clone(),
            reason: None,
            error: self.error.clone().map(EventError::Session),
            timestamp: now,
        })
    }

    pub(super) fn task_event(&mut self, idx: usize, kind: EventKind, now: DateTime<Utc>) -> Effect {
        self.seq += 1;
        let task = &self.tasks[idx];
        Effect::Status(SessionEvent {
            session_id: self.session_id.clone(),
            seq: self.seq,
            kind,
            task_id: Some(task.task_id.clone()),
            task_definition_id: Some(task.task_definition_id.clone()),
            status: EventStatus::Task(task.status),
            attempt: Some(task.attempt),
            agent_id: task.agent_id.clone(),
            reason: task.pending.clone(),
            error: task.error.clone().map(EventError::Task),
            timestamp: now,
        })
    }

    pub(super) fn lease_timer(&self, idx: usize, at: DateTime<Utc>) -> Effect {
        let task = &self.tasks[idx];
        Effect::Timer(Timer {
            session_id: self.session_id.clone(),
            kind: TimerKind::LeaseDeadline {
                task_id: task.task_id.clone(),
                lease_epoch: task.lease_epoch,
            },
            at,
        })
    }

    fn dead_letter(
        &self,
        idx: usize,
        error: TaskError,
        reason: DeadLetterReason,
        now: DateTime<Utc>,
    ) -> Effect {
        let task = &self.tasks[idx];
        Effect::DeadLetter(DeadLetter {
            session_id: self.session_id.clone(),
            workflow_id: self.workflow_id.clone(),
            task_id: task.task_id.clone(),
            task_definition_id: task.task_definition_id.clone(),
            capability: task.capability.clone(),
            attempt: task.attempt,
            reason,
            error,
            timestamp: now,
        })
    }

    /// The messages ending task `idx`'s lease; `None` if it was never leased.
    fn lease_messages(&self, idx: usize) -> Option<(Cancellation, LeaseRelease)> {
        let task = &self.tasks[idx];
        let agent_id = task.agent_id.clone()?;
        let cancellation = Cancellation {
            agent_id: agent_id.clone(),
            session_id: self.session_id.clone(),
            task_id: task.task_id.clone(),
            lease_epoch: task.lease_epoch,
        };
        let release = LeaseRelease {
            agent_id,
            session_id: self.session_id.clone(),
            task_id: task.task_id.clone(),
            lease_epoch: task.lease_epoch,
        };
        Some((cancellation, release))
    }
}
