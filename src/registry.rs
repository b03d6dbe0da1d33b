//! The pure rules of the agent registry: from (current record, event, now) to (new record,
//! effects). Nothing here does I/O; the handler loads, calls [`apply`], commits, publishes.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::model::{Agent, AgentState, Deregistration, HistoryEntry, Registration};
use crate::outbox::OutboxMessage;
use crate::subjects;

/// What happened to an agent, as applied by [`apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum AgentCommand {
    Register(Registration),
    Deregister(Deregistration),
    State {
        state: AgentState,
        timestamp: DateTime<Utc>,
        details: Map<String, Value>,
    },
    /// A heartbeat, or any other event from the agent (task progress and results): it proves
    /// the agent alive and changes nothing else here.
    Seen,
    /// The timer loop found the agent's liveness deadline due.
    CheckLiveness,
}

/// How the event was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The record changed as the event asked.
    Applied,
    /// A state report older than the last applied one: recorded and counted, not applied.
    Stale,
}

/// The kinds of agent transition published on `opscore.status.agent.<agentId>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionKind {
    Registered,
    Deregistered,
    StateChanged,
    Offline,
    Online,
}

impl TransitionKind {
    fn event_type(self) -> &'static str {
        match self {
            Self::Registered => "opscore.agent.registered.v1",
            Self::Deregistered => "opscore.agent.deregistered.v1",
            Self::StateChanged => "opscore.agent.state_changed.v1",
            Self::Offline => "opscore.agent.offline.v1",
            Self::Online => "opscore.agent.online.v1",
        }
    }
}

/// The data of one agent status event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    pub agent_id: String,
    /// Per-agent, strictly increasing; a gap tells a monitor it missed an event.
    pub seq: u64,
    pub kind: TransitionKind,
    pub state: AgentState,
    pub previous_state: Option<AgentState>,
    pub deregistered: bool,
    pub timestamp: DateTime<Utc>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub details: Map<String, Value>,
}

impl Transition {
    /// The status message for this transition; its id makes a republish a duplicate.
    pub fn to_message(&self) -> OutboxMessage {
        let id = format!("agent:{}:{}", self.agent_id, self.seq);
        // The agent id was validated as a token before any record was created.
        let subject = subjects::agent_status(&self.agent_id)
            .unwrap_or_else(|_| format!("opscore.status.agent.invalid-{}", self.seq));
        OutboxMessage::cloudevent(id, subject, self.kind.event_type(), self.timestamp, self)
    }
}

/// The result of applying an event: the record to commit and what to do after the commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub applied: Applied,
    pub agent: Agent,
    /// Appended to the capped history in the same commit.
    pub history: Option<HistoryEntry>,
    pub transitions: Vec<Transition>,
    /// When the agent becomes offline unless heard from; `None` removes it from the timers
    /// (deregistered or already offline).
    pub liveness_deadline: Option<DateTime<Utc>>,
}

/// An event for an agent that has no record: it must register first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("agent {0} is not registered")]
pub struct NotRegistered(pub String);

/// Applies `command` for `agent_id` to the current record.
pub fn apply(
    agent_id: &str,
    current: Option<&Agent>,
    command: AgentCommand,
    now: DateTime<Utc>,
    liveness_timeout: chrono::Duration,
) -> Result<Change, NotRegistered> {
    let mut change = match (current, command) {
        (None, AgentCommand::Register(registration)) => register_new(registration, now),
        (None, _) => return Err(NotRegistered(agent_id.to_owned())),
        (Some(agent), AgentCommand::CheckLiveness) => {
            return Ok(check_liveness(agent, now, liveness_timeout));
        }
        (Some(agent), command) => {
            let mut change = Change {
                applied: Applied::Applied,
                agent: agent.clone(),
                history: None,
                transitions: Vec::new(),
                liveness_deadline: None,
            };
            change.agent.last_seen = now;
            if change.agent.state == AgentState::Offline {
                come_back(&mut change, now);
            }
            match command {
                AgentCommand::Register(registration) => reregister(&mut change, registration, now),
                AgentCommand::Deregister(deregistration) => {
                    deregister(&mut change, deregistration, now);
                }
                AgentCommand::State {
                    state,
                    timestamp,
                    details,
                } => report_state(&mut change, state, timestamp, details, now),
                AgentCommand::Seen | AgentCommand::CheckLiveness => {}
            }
            change
        }
    };
    if !change.agent.deregistered && change.agent.state != AgentState::Offline {
        change.liveness_deadline = Some(change.agent.last_seen + liveness_timeout);
    }
    Ok(change)
}

fn register_new(registration: Registration, now: DateTime<Utc>) -> Change {
    let mut agent = Agent {
        agent_id: registration.agent_id.clone(),
        agent_name: String::new(),
        version: String::new(),
        capabilities: Vec::new(),
        contact_endpoint: None,
        metadata: Map::new(),
        max_concurrent_tasks: 1,
        state: AgentState::Unknown,
        state_timestamp: now,
        reported_state: None,
        reported_at: None,
        details: Map::new(),
        registered_at: now,
        last_seen: now,
        deregistered: false,
        deregistered_at: None,
        deregister_reason: None,
        seq: 0,
        stale_events: 0,
        leases: Vec::new(),
        last_assigned_at: None,
    };
    copy_registration(&mut agent, registration);
    let mut change = Change {
        applied: Applied::Applied,
        agent,
        history: None,
        transitions: Vec::new(),
        liveness_deadline: None,
    };
    transition(&mut change, TransitionKind::Registered, None, now);
    change
}

fn copy_registration(agent: &mut Agent, registration: Registration) {
    agent.agent_name = registration.agent_name;
    agent.version = registration.version;
    agent.capabilities = registration.capabilities;
    agent.capabilities.sort();
    agent.capabilities.dedup();
    agent.contact_endpoint = registration.contact_endpoint;
    agent.metadata = registration.metadata;
    agent.max_concurrent_tasks = registration.max_concurrent_tasks;
}

/// Updates what the agent says of itself; the reported state is never touched, since a
/// registration carries none and the last report may be newer than it.
fn reregister(change: &mut Change, registration: Registration, now: DateTime<Utc>) {
    copy_registration(&mut change.agent, registration);
    change.agent.deregistered = false;
    change.agent.deregistered_at = None;
    change.agent.deregister_reason = None;
    transition(change, TransitionKind::Registered, None, now);
}

fn deregister(change: &mut Change, deregistration: Deregistration, now: DateTime<Utc>) {
    change.agent.deregistered = true;
    change.agent.deregistered_at = Some(now);
    change.agent.deregister_reason = deregistration.reason;
    transition(change, TransitionKind::Deregistered, None, now);
}

fn report_state(
    change: &mut Change,
    state: AgentState,
    timestamp: DateTime<Utc>,
    details: Map<String, Value>,
    now: DateTime<Utc>,
) {
    if change
        .agent
        .reported_at
        .is_some_and(|applied| timestamp < applied)
    {
        change.applied = Applied::Stale;
        change.agent.stale_events += 1;
        return;
    }

    let previous = change.agent.state;
    let agent = &mut change.agent;
    agent.state = state;
    agent.state_timestamp = timestamp;
    agent.reported_state = Some(state);
    agent.reported_at = Some(timestamp);
    agent.details = details.clone();
    change.history = Some(HistoryEntry {
        state,
        timestamp,
        received_at: now,
        details,
    });
    if previous != state {
        transition(change, TransitionKind::StateChanged, Some(previous), now);
    }
}

fn come_back(change: &mut Change, now: DateTime<Utc>) {
    let agent = &mut change.agent;
    agent.state = agent.reported_state.unwrap_or(AgentState::Unknown);
    agent.state_timestamp = agent.reported_at.unwrap_or(now);
    transition(
        change,
        TransitionKind::Online,
        Some(AgentState::Offline),
        now,
    );
}

fn check_liveness(agent: &Agent, now: DateTime<Utc>, timeout: chrono::Duration) -> Change {
    let mut change = Change {
        applied: Applied::Applied,
        agent: agent.clone(),
        history: None,
        transitions: Vec::new(),
        liveness_deadline: None,
    };
    if agent.deregistered || agent.state == AgentState::Offline {
        return change;
    }
    let deadline = agent.last_seen + timeout;
    if deadline > now {
        // Heard from since the timer was set: re-arm it.
        change.liveness_deadline = Some(deadline);
        return change;
    }

    let previous = agent.state;
    change.agent.state = AgentState::Offline;
    change.agent.state_timestamp = now;
    change.history = Some(HistoryEntry {
        state: AgentState::Offline,
        timestamp: now,
        received_at: now,
        details: Map::new(),
    });
    transition(&mut change, TransitionKind::Offline, Some(previous), now);
    change
}

fn transition(
    change: &mut Change,
    kind: TransitionKind,
    previous_state: Option<AgentState>,
    now: DateTime<Utc>,
) {
    let agent = &mut change.agent;
    agent.seq += 1;
    change.transitions.push(Transition {
        agent_id: agent.agent_id.clone(),
        seq: agent.seq,
        kind,
        state: agent.state,
        previous_state,
        deregistered: agent.deregistered,
        timestamp: now,
        details: if kind == TransitionKind::StateChanged {
            agent.details.clone()
        } else {
            Map::new()
        },
    });
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    const TIMEOUT: chrono::Duration = chrono::Duration::seconds(30);

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0)
            .single()
            .expect("valid time")
    }

    fn registration() -> Registration {
        Registration {
            agent_id: "a1".into(),
            agent_name: "Agent One".into(),
            version: "1.0".into(),
            capabilities: vec!["summarise".into(), "draft".into(), "draft".into()],
            contact_endpoint: None,
            metadata: Map::new(),
            max_concurrent_tasks: 2,
        }
    }

    fn registered() -> Agent {
        apply(
            "a1",
            None,
            AgentCommand::Register(registration()),
            at(0),
            TIMEOUT,
        )
        .expect("registers")
        .agent
    }

    fn state(agent: &Agent, state: AgentState, reported: i64, now: i64) -> Change {
        let command = AgentCommand::State {
            state,
            timestamp: at(reported),
            details: Map::new(),
        };
        apply("a1", Some(agent), command, at(now), TIMEOUT).expect("registered")
    }

    #[test]
    fn registration_creates_an_unknown_agent_with_a_liveness_deadline() {
        let change = apply(
            "a1",
            None,
            AgentCommand::Register(registration()),
            at(0),
            TIMEOUT,
        )
        .expect("ok");
        assert_eq!(change.agent.state, AgentState::Unknown);
        assert_eq!(change.agent.capabilities, ["draft", "summarise"]);
        assert_eq!(change.liveness_deadline, Some(at(30)));
        assert_eq!(change.transitions.len(), 1);
        assert_eq!(change.transitions[0].kind, TransitionKind::Registered);
        assert_eq!(change.transitions[0].seq, 1);
    }

    #[test]
    fn events_for_unregistered_agents_are_refused() {
        let err = apply("ghost", None, AgentCommand::Seen, at(0), TIMEOUT).expect_err("unknown");
        assert_eq!(err, NotRegistered("ghost".into()));
    }

    #[test]
    fn a_newer_state_is_applied_with_history_and_a_transition() {
        let change = state(&registered(), AgentState::Idle, 5, 6);
        assert_eq!(change.applied, Applied::Applied);
        assert_eq!(change.agent.state, AgentState::Idle);
        assert_eq!(change.agent.state_timestamp, at(5));
        assert_eq!(
            change.history.as_ref().map(|h| h.state),
            Some(AgentState::Idle)
        );
        assert_eq!(change.transitions[0].kind, TransitionKind::StateChanged);
        assert_eq!(
            change.transitions[0].previous_state,
            Some(AgentState::Unknown)
        );
        assert_eq!(change.transitions[0].seq, 2);
    }

    #[test]
    fn an_older_state_is_stale_counted_and_not_applied() {
        let idle = state(&registered(), AgentState::Idle, 10, 10).agent;
        let change = state(&idle, AgentState::Busy, 9, 11);
        assert_eq!(change.applied, Applied::Stale);
        assert_eq!(change.agent.state, AgentState::Idle);
        assert_eq!(change.agent.stale_events, 1);
        assert!(change.history.is_none());
        assert!(change.transitions.is_empty());
    }

    #[test]
    fn repeating_the_same_state_records_history_without_a_transition() {
        let idle = state(&registered(), AgentState::Idle, 10, 10).agent;
        let change = state(&idle, AgentState::Idle, 20, 20);
        assert!(change.history.is_some());
        assert!(change.transitions.is_empty());
    }

    #[test]
    fn reregistration_keeps_the_reported_state() {
        let busy = state(&registered(), AgentState::Busy, 10, 10).agent;
        let mut update = registration();
        update.version = "2.0".into();
        let change = apply(
            "a1",
            Some(&busy),
            AgentCommand::Register(update),
            at(20),
            TIMEOUT,
        )
        .expect("ok");
        assert_eq!(change.agent.state, AgentState::Busy);
        assert_eq!(change.agent.version, "2.0");
        assert_eq!(change.agent.registered_at, at(0));
    }

    #[test]
    fn deregistration_stops_liveness_and_reregistration_restores_it() {
        let command = AgentCommand::Deregister(Deregistration {
            agent_id: "a1".into(),
            reason: Some("maintenance".into()),
        });
        let gone = apply("a1", Some(&registered()), command, at(5), TIMEOUT).expect("ok");
        assert!(gone.agent.deregistered);
        assert_eq!(gone.liveness_deadline, None);
        assert_eq!(gone.transitions[0].kind, TransitionKind::Deregistered);

        let back = apply(
            "a1",
            Some(&gone.agent),
            AgentCommand::Register(registration()),
            at(6),
            TIMEOUT,
        )
        .expect("ok");
        assert!(!back.agent.deregistered);
        assert_eq!(back.liveness_deadline, Some(at(36)));
    }

    #[test]
    fn silence_past_the_timeout_makes_the_agent_offline() {
        let idle = state(&registered(), AgentState::Idle, 1, 1).agent;
        let early = apply(
            "a1",
            Some(&idle),
            AgentCommand::CheckLiveness,
            at(20),
            TIMEOUT,
        )
        .expect("ok");
        assert_eq!(early.agent.state, AgentState::Idle);
        assert_eq!(early.liveness_deadline, Some(at(31)));

        let late = apply(
            "a1",
            Some(&idle),
            AgentCommand::CheckLiveness,
            at(31),
            TIMEOUT,
        )
        .expect("ok");
        assert_eq!(late.agent.state, AgentState::Offline);
        assert_eq!(late.liveness_deadline, None);
        assert_eq!(late.transitions[0].kind, TransitionKind::Offline);
        assert_eq!(late.transitions[0].previous_state, Some(AgentState::Idle));
    }

    #[test]
    fn any_event_brings_an_offline_agent_back_to_its_reported_state() {
        let idle = state(&registered(), AgentState::Idle, 1, 1).agent;
        let offline = apply(
            "a1",
            Some(&idle),
            AgentCommand::CheckLiveness,
            at(40),
            TIMEOUT,
        )
        .expect("ok")
        .agent;
        let back = apply("a1", Some(&offline), AgentCommand::Seen, at(50), TIMEOUT).expect("ok");
        assert_eq!(back.agent.state, AgentState::Idle);
        assert_eq!(back.transitions[0].kind, TransitionKind::Online);
        assert_eq!(back.liveness_deadline, Some(at(80)));
    }

    #[test]
    fn sequence_numbers_increase_across_transitions() {
        let idle = state(&registered(), AgentState::Idle, 1, 1).agent;
        let busy = state(&idle, AgentState::Busy, 2, 2);
        assert_eq!(busy.transitions[0].seq, idle.seq + 1);
        let message = busy.transitions[0].to_message();
        assert_eq!(message.subject, "opscore.status.agent.a1");
        assert_eq!(message.id, format!("agent:a1:{}", idle.seq + 1));
    }
}
