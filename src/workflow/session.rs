//! The session record: one run of a workflow with its tasks, as stored and as `session.get`
//! returns it. Field names are those of the original service.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::definition::{MAX_TOKEN_LEN, WorkflowDefinition};

/// Longest session id accepted, so that `{sessionId}-{taskDefinitionId}` task ids keep room for
/// the task part within [`MAX_TOKEN_LEN`].
pub const MAX_SESSION_ID_LEN: usize = 64;

/// One run of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub session_id: String,
    pub workflow_id: String,
    pub workflow_version: String,
    /// The only agent allowed to run this session's tasks, when the trigger pinned one.
    pub agent_id: Option<String>,
    pub status: SessionStatus,
    pub start_time: DateTime<Utc>,
    pub end_time: Option<DateTime<Utc>>,
    /// The trigger's payload, handed to every task.
    pub input: Value,
    /// On completion: each completed task's output by task definition id.
    pub result: Option<Value>,
    pub error: Option<SessionError>,
    pub metadata: Map<String, Value>,
    /// The definition as it was when the session started; later redefinitions do not apply.
    pub definition: WorkflowDefinition,
    /// In definition order.
    pub tasks: Vec<Task>,
    /// Sequence number of the last status event emitted for this session (0: none yet).
    pub seq: u64,
    /// The W3C `traceparent` of the request that started the session; every message about
    /// the session continues that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Session lifecycle: `pending` → `running` → `completed` | `failed` | `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    /// Part of the contract for records written before their start; the engine itself
    /// creates and starts a session in one step.
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_ended(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a session failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionError {
    pub message: String,
    /// The task whose failure ended the session.
    pub task_id: Option<String>,
    pub task_definition_id: Option<String>,
}

/// One step of a session.
///
/// `dispatchedAt` and `startedAt` describe the current (or last) attempt; `finishedAt` is set
/// once the task reaches a final status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    /// Unique across sessions: see [`task_id_for`].
    pub task_id: String,
    pub task_definition_id: String,
    pub name: String,
    pub capability: String,
    pub parameters: Map<String, Value>,
    /// Task definition ids this task waits for, in definition order.
    pub depends_on: Vec<String>,
    pub status: TaskStatus,
    /// Attempts dispatched so far (0 before the first).
    pub attempt: u32,
    /// The lease holder while `dispatched` or `running`; afterwards the agent of the last
    /// attempt.
    pub agent_id: Option<String>,
    /// Fencing token: raised on every assignment, so reports naming an older epoch are
    /// recognised as stale (0: never leased).
    pub lease_epoch: u64,
    /// When the current lease expires unless progress extends it.
    pub lease_deadline: Option<DateTime<Utc>>,
    pub output: Option<Value>,
    /// The last attempt's error, kept through a retry so that it shows why.
    pub error: Option<TaskError>,
    /// Why an unplaced task is waiting. `None` on a ready task no placement has been tried for.
    pub pending: Option<PendingReason>,
    pub created_at: DateTime<Utc>,
    /// When the task last became ready to place (dependencies resolved or backoff over); the
    /// queue timeout counts from here.
    pub ready_at: Option<DateTime<Utc>>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The earliest time of the next attempt while `retrying`.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

impl Task {
    /// Whether an agent holds a live lease on this task.
    pub fn is_leased(&self) -> bool {
        matches!(self.status, TaskStatus::Dispatched | TaskStatus::Running)
    }

    /// Whether the task will never change again.
    pub fn is_finished(&self) -> bool {
        matches!(
            self.status,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

/// Task lifecycle: `pending` → `dispatched` → `running` → `completed` | `failed`, with
/// `retrying` between attempts and `cancelled` when the session ends first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Pending,
    Dispatched,
    Running,
    Retrying,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Dispatched => "dispatched",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed attempt as the agent (or the engine, for timeouts) described it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskError {
    pub message: String,
    pub retryable: bool,
}

/// Why a task that is not running is waiting, e.g. `{"reason":"backoff","until":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "reason",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum PendingReason {
    /// No live agent has the capability.
    NoCapableAgent,
    /// Capable agents exist but none is in a state to take work or has a free slot.
    AllCapableAgentsBusy,
    /// A retry is scheduled for `until`.
    Backoff { until: DateTime<Utc> },
    /// Dependencies (task definition ids) not yet resolved.
    WaitingOn { tasks: Vec<String> },
}

/// The task id of a task of a session: `{sessionId}-{taskDefinitionId}`, which is readable and
/// derived without any generator, so replaying a start produces the same ids.
///
/// When that would exceed [`MAX_TOKEN_LEN`], the definition id is cut and a 64-bit FNV-1a hash
/// of the whole of it is appended (`{sessionId}-{prefix}-{hash}`), so distinct definitions keep
/// distinct ids. `session_id` must be at most [`MAX_SESSION_ID_LEN`] long.
pub fn task_id_for(session_id: &str, task_definition_id: &str) -> String {
    let plain = format!("{session_id}-{task_definition_id}");
    if plain.len() <= MAX_TOKEN_LEN {
        return plain;
    }
    let hash = format!("{:016x}", fnv1a(task_definition_id.as_bytes()));
    let room = MAX_TOKEN_LEN.saturating_sub(session_id.len() + 2 + hash.len());
    // Definition ids are ASCII once validated, so any byte offset is a char boundary; the
    // lookup keeps an unvalidated id from panicking.
    let prefix = task_definition_id.get(..room).unwrap_or_default();
    format!("{session_id}-{prefix}-{hash}")
}

/// FNV-1a, chosen because it is stable across Rust releases (unlike `DefaultHasher`) and the
/// ids it feeds are stored.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::definition::is_token;

    #[test]
    fn task_id_joins_session_and_definition_ids() {
        let id = task_id_for("3f2c0d6e-8b1a-4c4e-9a55-0f6f3f1c2b7d", "step_1");
        assert_eq!(id, "3f2c0d6e-8b1a-4c4e-9a55-0f6f3f1c2b7d-step_1");
    }

    #[test]
    fn long_task_ids_are_shortened_to_distinct_tokens() {
        let session = "3f2c0d6e-8b1a-4c4e-9a55-0f6f3f1c2b7d";
        let a = format!("{}a", "x".repeat(127));
        let b = format!("{}b", "x".repeat(127));
        let (id_a, id_b) = (task_id_for(session, &a), task_id_for(session, &b));
        assert!(is_token(&id_a), "{id_a}");
        assert_eq!(id_a.len(), MAX_TOKEN_LEN);
        assert_ne!(id_a, id_b);

        let longest_session = "s".repeat(MAX_SESSION_ID_LEN);
        assert!(is_token(&task_id_for(&longest_session, &a)));
    }

    #[test]
    fn pending_reasons_use_the_documented_wire_form() {
        let json = |r: &PendingReason| serde_json::to_value(r).expect("serializable");
        assert_eq!(
            json(&PendingReason::NoCapableAgent),
            serde_json::json!({"reason": "no_capable_agent"})
        );
        assert_eq!(
            json(&PendingReason::AllCapableAgentsBusy),
            serde_json::json!({"reason": "all_capable_agents_busy"})
        );
        assert_eq!(
            json(&PendingReason::WaitingOn {
                tasks: vec!["step_1".into()]
            }),
            serde_json::json!({"reason": "waiting_on", "tasks": ["step_1"]})
        );
        let until = DateTime::parse_from_rfc3339("2025-01-02T03:04:05Z")
            .expect("valid timestamp")
            .with_timezone(&Utc);
        assert_eq!(
            json(&PendingReason::Backoff { until }),
            serde_json::json!({"reason": "backoff", "until": "2025-01-02T03:04:05Z"})
        );
    }

    #[test]
    fn statuses_are_lowercase_on_the_wire() {
        assert_eq!(
            serde_json::to_value(SessionStatus::Cancelled).expect("serializable"),
            "cancelled"
        );
        assert_eq!(
            serde_json::to_value(TaskStatus::Dispatched).expect("serializable"),
            "dispatched"
        );
    }
}
