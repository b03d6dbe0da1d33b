//! What the engine asks its caller to do once the new session record is committed: publish
//! assignments, cancellations and status events, release agent slots, arm timers, and copy
//! final failures to the dead-letter stream.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::session::{PendingReason, SessionError, SessionStatus, TaskError, TaskStatus};

/// One action for the caller, in the order the engine produced them.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Publish `assignment` on `opscore.dispatch.<agent_id>` with `Nats-Msg-Id`
    /// [`Assignment::message_id`].
    Dispatch {
        agent_id: String,
        assignment: Assignment,
    },
    /// Tell an agent to stop a task, on `opscore.dispatch.<agentId>`.
    Cancel(Cancellation),
    /// The agent no longer holds this lease: free its slot.
    ReleaseLease(LeaseRelease),
    /// Wake the engine at `at` (see [`Timer::key`] for deduplication).
    Timer(Timer),
    /// Publish on `opscore.status.session.<sessionId>`.
    Status(SessionEvent),
    /// A task failed for good: copy it to the dead-letter stream.
    DeadLetter(DeadLetter),
}

/// A task handed to an agent (CloudEvents type `opscore.task.assigned.v1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub task_id: String,
    pub session_id: String,
    pub workflow_id: String,
    pub task_definition_id: String,
    pub name: String,
    pub capability: String,
    pub parameters: Map<String, Value>,
    /// The session's input.
    pub input: Value,
    /// Output of each completed dependency by task definition id. A dependency that failed
    /// under `onFailure: continue` is absent.
    pub results: Map<String, Value>,
    pub attempt: u32,
    /// To be echoed in every progress report and result.
    pub lease_epoch: u64,
    /// When the lease expires unless a progress report extends it.
    pub deadline: DateTime<Utc>,
}

impl Assignment {
    /// `Nats-Msg-Id` of the dispatch: `{taskId}:{attempt}`, so a repeated publish of the same
    /// attempt is deduplicated by JetStream.
    pub fn message_id(&self) -> String {
        format!("{}:{}", self.task_id, self.attempt)
    }
}

/// A cancellation sent to an agent (CloudEvents type `opscore.task.cancelled.v1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cancellation {
    pub agent_id: String,
    pub session_id: String,
    pub task_id: String,
    pub lease_epoch: u64,
}

impl Cancellation {
    /// `Nats-Msg-Id` of the cancellation: `{taskId}:{leaseEpoch}:cancel`.
    pub fn message_id(&self) -> String {
        format!("{}:{}:cancel", self.task_id, self.lease_epoch)
    }
}

/// A lease that ended, for the per-agent slot count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRelease {
    pub agent_id: String,
    pub session_id: String,
    pub task_id: String,
    pub lease_epoch: u64,
}

/// A wake-up the engine needs. Firing one late, twice, or after the state moved on is safe:
/// the matching engine call ignores a timer that no longer applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timer {
    pub session_id: String,
    pub kind: TimerKind,
    pub at: DateTime<Utc>,
}

/// What a timer is for, and which engine call handles it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum TimerKind {
    /// Call `Session::lease_expired` with this epoch.
    LeaseDeadline { task_id: String, lease_epoch: u64 },
    /// The backoff before attempt `attempt + 1` is over: run the scheduler for the session.
    Backoff { task_id: String, attempt: u32 },
    /// Call `Session::queue_timeout`. `attempt` is the attempts made before this wait.
    QueueTimeout { task_id: String, attempt: u32 },
}

impl Timer {
    /// A stable identity for the timer, e.g. a sorted-set member. A progress report re-arms
    /// the lease timer under the same key, so storing by key moves the deadline instead of
    /// piling up timers.
    pub fn key(&self) -> String {
        let session = &self.session_id;
        match &self.kind {
            TimerKind::LeaseDeadline {
                task_id,
                lease_epoch,
            } => {
                format!("lease:{session}:{task_id}:{lease_epoch}")
            }
            TimerKind::Backoff { task_id, attempt } => {
                format!("backoff:{session}:{task_id}:{attempt}")
            }
            TimerKind::QueueTimeout { task_id, attempt } => {
                format!("queue:{session}:{task_id}:{attempt}")
            }
        }
    }
}

/// A transition, published on `opscore.status.session.<sessionId>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionEvent {
    pub session_id: String,
    /// Strictly increasing per session, so a monitor can detect a gap.
    pub seq: u64,
    pub kind: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_definition_id: Option<String>,
    /// The session's status for session events, the task's for task events.
    pub status: EventStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<PendingReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<EventError>,
    pub timestamp: DateTime<Utc>,
}

/// The `kind` of a [`SessionEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "session.started")]
    SessionStarted,
    #[serde(rename = "session.completed")]
    SessionCompleted,
    #[serde(rename = "session.failed")]
    SessionFailed,
    #[serde(rename = "session.cancelled")]
    SessionCancelled,
    #[serde(rename = "task.pending")]
    TaskPending,
    #[serde(rename = "task.dispatched")]
    TaskDispatched,
    #[serde(rename = "task.running")]
    TaskRunning,
    #[serde(rename = "task.retrying")]
    TaskRetrying,
    #[serde(rename = "task.completed")]
    TaskCompleted,
    #[serde(rename = "task.failed")]
    TaskFailed,
    #[serde(rename = "task.cancelled")]
    TaskCancelled,
}

/// A session or task status, as the event's kind implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EventStatus {
    Session(SessionStatus),
    Task(TaskStatus),
}

/// A task's error on task events, the session's on `session.failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EventError {
    Task(TaskError),
    Session(SessionError),
}

/// A task that failed for good, for the dead-letter stream (`opscore.dlq.<reason>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub session_id: String,
    pub workflow_id: String,
    pub task_id: String,
    pub task_definition_id: String,
    pub capability: String,
    /// Attempts made.
    pub attempt: u32,
    pub reason: DeadLetterReason,
    pub error: TaskError,
    pub timestamp: DateTime<Utc>,
}

impl DeadLetter {
    /// `Nats-Msg-Id` of the dead letter: a task fails for good at most once.
    pub fn message_id(&self) -> String {
        format!("{}:dead", self.task_id)
    }
}

/// Why a task failed for good; the last token of its DLQ subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// The last allowed attempt failed (or timed out) with a retryable error.
    RetriesExhausted,
    /// The agent reported an error it marked not retryable.
    NotRetryable,
    /// No capable agent took the task within `queueTimeoutSeconds`.
    QueueTimeout,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RetriesExhausted => "retries_exhausted",
            Self::NotRetryable => "not_retryable",
            Self::QueueTimeout => "queue_timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0)
            .single()
            .expect("valid time")
    }

    #[test]
    fn assignment_carries_exactly_the_contract_fields() {
        let assignment = Assignment {
            task_id: "s-a".to_owned(),
            session_id: "s".to_owned(),
            workflow_id: "wf".to_owned(),
            task_definition_id: "a".to_owned(),
            name: "A".to_owned(),
            capability: "cap".to_owned(),
            parameters: Map::new(),
            input: Value::Null,
            results: Map::new(),
            attempt: 2,
            lease_epoch: 3,
            deadline: at(),
        };
        assert_eq!(assignment.message_id(), "s-a:2");
        assert_eq!(
            serde_json::to_value(&assignment).expect("serializes"),
            json!({"taskId": "s-a", "sessionId": "s", "workflowId": "wf",
                   "taskDefinitionId": "a", "name": "A", "capability": "cap",
                   "parameters": {}, "input": null, "results": {}, "attempt": 2,
                   "leaseEpoch": 3, "deadline": "2025-01-01T00:00:00Z"})
        );
    }

    #[test]
    fn lease_timer_key_is_stable_across_extensions() {
        let timer = |at| Timer {
            session_id: "s".to_owned(),
            kind: TimerKind::LeaseDeadline {
                task_id: "s-a".to_owned(),
                lease_epoch: 1,
            },
            at,
        };
        let (first, extended) = (timer(at()), timer(at() + chrono::TimeDelta::seconds(30)));
        assert_eq!(first.key(), "lease:s:s-a:1");
        assert_eq!(first.key(), extended.key());
        assert_eq!(
            serde_json::to_value(&first).expect("serializes"),
            json!({"sessionId": "s", "at": "2025-01-01T00:00:00Z",
                   "kind": {"type": "leaseDeadline", "taskId": "s-a", "leaseEpoch": 1}})
        );
    }
}
