//! The agent records opscore keeps and the payloads agents send, with the field names of the
//! original service (camelCase on the wire).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An agent's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    Initializing,
    Idle,
    Active,
    Busy,
    Error,
    Finished,
    Draining,
    /// Set by opscore when the agent is silent past the liveness timeout.
    Offline,
    /// Set by opscore for an agent that registered but has not reported a state.
    Unknown,
}

impl AgentState {
    pub const ALL: [AgentState; 9] = [
        Self::Initializing,
        Self::Idle,
        Self::Active,
        Self::Busy,
        Self::Error,
        Self::Finished,
        Self::Draining,
        Self::Offline,
        Self::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initializing => "initializing",
            Self::Idle => "idle",
            Self::Active => "active",
            Self::Busy => "busy",
            Self::Error => "error",
            Self::Finished => "finished",
            Self::Draining => "draining",
            Self::Offline => "offline",
            Self::Unknown => "unknown",
        }
    }

    /// Whether an agent may report this state itself; `offline` and `unknown` are opscore's.
    pub fn is_reportable(self) -> bool {
        !matches!(self, Self::Offline | Self::Unknown)
    }

    /// Whether an agent in this state may be handed a task.
    pub fn accepts_tasks(self) -> bool {
        matches!(self, Self::Idle | Self::Active)
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is not one of [`AgentState::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown agent state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for AgentState {
    type Err = UnknownState;

    /// Case-insensitive, as agents of the original service send `IDLE` as often as `idle`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// A task lease an agent holds; it occupies one of the agent's `maxConcurrentTasks` slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub session_id: String,
    pub task_id: String,
    pub lease_epoch: u64,
}

/// The registry record of one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    pub agent_id: String,
    pub agent_name: String,
    pub version: String,
    pub capabilities: Vec<String>,
    pub contact_endpoint: Option<String>,
    pub metadata: Map<String, Value>,
    pub max_concurrent_tasks: u32,
    /// The effective state: the last reported one, or `offline` / `unknown`.
    pub state: AgentState,
    /// When the agent says the effective state began (its own clock), or when opscore set it.
    pub state_timestamp: DateTime<Utc>,
    /// The last state the agent reported itself, restored when it comes back from `offline`.
    pub reported_state: Option<AgentState>,
    /// The agent's timestamp of that report; a report older than this is stale.
    pub reported_at: Option<DateTime<Utc>>,
    pub details: Map<String, Value>,
    pub registered_at: DateTime<Utc>,
    /// When opscore last received any event from the agent.
    pub last_seen: DateTime<Utc>,
    pub deregistered: bool,
    pub deregistered_at: Option<DateTime<Utc>>,
    pub deregister_reason: Option<String>,
    /// Sequence number of the last status event published for this agent.
    pub seq: u64,
    /// State events that arrived older than the applied state and were not applied.
    pub stale_events: u64,
    /// Leases of tasks currently assigned to this agent.
    #[serde(default)]
    pub leases: Vec<Lease>,
    /// When the agent was last handed a task; the least recent wins the next one.
    #[serde(default)]
    pub last_assigned_at: Option<DateTime<Utc>>,
}

impl Agent {
    /// Alive and registered; liveness alone does not make an agent eligible for tasks.
    pub fn is_alive(&self) -> bool {
        !self.deregistered && self.state != AgentState::Offline
    }
}

/// One entry of an agent's capped state history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub state: AgentState,
    /// The time the agent gave for the state (or opscore's, for the states it sets).
    pub timestamp: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub details: Map<String, Value>,
}

/// `opscore.agent.<agentId>.register`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    pub agent_id: String,
    pub agent_name: String,
    pub version: String,
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub contact_endpoint: Option<String>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    #[serde(default = "one")]
    pub max_concurrent_tasks: u32,
}

fn one() -> u32 {
    1
}

/// `opscore.agent.<agentId>.deregister`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deregistration {
    pub agent_id: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// `opscore.agent.<agentId>.state`. The state is kept as text until validated, so that an
/// unknown state is reported as such rather than as a generic schema error.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateReport {
    pub agent_id: String,
    pub state: String,
    pub timestamp: DateTime<Utc>,
    #[serde(default)]
    pub details: Option<Map<String, Value>>,
}

/// `opscore.agent.<agentId>.heartbeat`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    pub agent_id: String,
    #[serde(default)]
    pub timestamp: Option<DateTime<Utc>>,
}

/// `opscore.agent.<agentId>.task.progress`: the agent works on the task; extends its lease.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskProgress {
    pub task_id: String,
    pub lease_epoch: u64,
    #[serde(default)]
    pub details: Option<Map<String, Value>>,
}

/// `opscore.agent.<agentId>.task.result`: the end of the agent's attempt.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskResult {
    pub task_id: String,
    pub lease_epoch: u64,
    pub status: TaskResultStatus,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub error: Option<TaskResultError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskResultStatus {
    Completed,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskResultError {
    pub message: String,
    /// A non-retryable error fails the task at once, whatever attempts remain.
    #[serde(default = "yes")]
    pub retryable: bool,
}

fn yes() -> bool {
    true
}

/// One page of a listing; `next_cursor` is `None` on the last page.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_parse_case_insensitively() {
        assert_eq!("IDLE".parse(), Ok(AgentState::Idle));
        assert_eq!(" Busy ".parse(), Ok(AgentState::Busy));
        assert!("sleeping".parse::<AgentState>().is_err());
    }

    #[test]
    fn only_opscore_sets_offline_and_unknown() {
        assert!(!AgentState::Offline.is_reportable());
        assert!(!AgentState::Unknown.is_reportable());
        assert!(AgentState::Draining.is_reportable());
    }

    #[test]
    fn registration_defaults_to_one_concurrent_task() {
        let reg: Registration = serde_json::from_value(serde_json::json!({
            "agentId": "a", "agentName": "A", "version": "1", "capabilities": ["x"]
        }))
        .expect("valid registration");
        assert_eq!(reg.max_concurrent_tasks, 1);
        assert!(reg.contact_endpoint.is_none());
    }
}
