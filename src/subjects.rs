//! Every NATS subject opscore reads or writes is built or parsed here.
//!
//! Ids become subject tokens, and a token holding `.`, `*`, `>` or whitespace would re-route a
//! message, so every id is checked against [`is_valid_token`] before it is placed in a subject.
//! `subjects.md` at the repository root documents the same layout for client authors.

use std::fmt;

/// The root token shared by every opscore subject.
pub const ROOT: &str = "opscore";
/// Subjects agents publish on; captured by the `OPSCORE_EVENTS` stream.
pub const AGENT_EVENTS: &str = "opscore.agent.>";
/// Subjects opscore publishes task assignments and cancellations on (`OPSCORE_DISPATCH`).
pub const DISPATCH_ALL: &str = "opscore.dispatch.>";
/// Subjects of agent, session and task transitions (`OPSCORE_STATUS`).
pub const STATUS_ALL: &str = "opscore.status.>";
/// Subjects of dead letters (`OPSCORE_DLQ`).
pub const DLQ_ALL: &str = "opscore.dlq.>";
/// Prefix of the control API endpoints of the `opscore` micro service.
pub const API_PREFIX: &str = "opscore.api";

/// A header naming who published an agent's event when it was not the agent itself (the
/// bridge reporting an undeliverable assignment). Such events do not refresh liveness.
pub const REPORTED_BY_HEADER: &str = "Opscore-Reported-By";

/// The longest id accepted as a subject token.
pub const MAX_TOKEN_LEN: usize = 128;

/// Whether `id` may be used as one subject token: `^[A-Za-z0-9_-]{1,128}$`.
pub fn is_valid_token(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TOKEN_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An id that cannot be used as a subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id {0:?}: expected 1 to 128 characters of A-Z, a-z, 0-9, '_' or '-'")]
pub struct InvalidToken(pub String);

/// Checks `id` with [`is_valid_token`], naming it in the error.
pub fn token(id: &str) -> Result<&str, InvalidToken> {
    if is_valid_token(id) {
        Ok(id)
    } else {
        Err(InvalidToken(id.to_owned()))
    }
}

/// The kinds of event an agent publishes under `opscore.agent.<agentId>.`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentEventKind {
    Register,
    Deregister,
    State,
    Heartbeat,
    TaskProgress,
    TaskResult,
}

impl AgentEventKind {
    /// Every kind, in the order of the declaration.
    pub const ALL: [Self; 6] = [
        Self::Register,
        Self::Deregister,
        Self::State,
        Self::Heartbeat,
        Self::TaskProgress,
        Self::TaskResult,
    ];

    /// The subject suffix after the agent id.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Register => "register",
            Self::Deregister => "deregister",
            Self::State => "state",
            Self::Heartbeat => "heartbeat",
            Self::TaskProgress => "task.progress",
            Self::TaskResult => "task.result",
        }
    }

    fn from_suffix(suffix: &str) -> Option<Self> {
        Some(match suffix {
            "register" => Self::Register,
            "deregister" => Self::Deregister,
            "state" => Self::State,
            "heartbeat" => Self::Heartbeat,
            "task.progress" => Self::TaskProgress,
            "task.result" => Self::TaskResult,
            _ => return None,
        })
    }
}

impl fmt::Display for AgentEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suffix())
    }
}

/// Why an inbound subject could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject {0:?} is not an agent event subject")]
    NotAgentEvent(String),
    #[error("subject {subject:?}: {source}")]
    InvalidAgentId {
        subject: String,
        source: InvalidToken,
    },
    #[error("subject {0:?}: unknown event type")]
    UnknownEvent(String),
}

/// Splits `opscore.agent.<agentId>.<kind>` into the agent id and the event kind.
pub fn parse_agent_event(subject: &str) -> Result<(&str, AgentEventKind), SubjectError> {
    let rest = subject
        .strip_prefix("opscore.agent.")
        .ok_or_else(|| SubjectError::NotAgentEvent(subject.to_owned()))?;
    let (agent_id, suffix) = rest
        .split_once('.')
        .ok_or_else(|| SubjectError::UnknownEvent(subject.to_owned()))?;
    token(agent_id).map_err(|source| SubjectError::InvalidAgentId {
        subject: subject.to_owned(),
        source,
    })?;
    let kind = AgentEventKind::from_suffix(suffix)
        .ok_or_else(|| SubjectError::UnknownEvent(subject.to_owned()))?;
    Ok((agent_id, kind))
}

/// `opscore.agent.<agentId>.<kind>`, the subject an agent publishes an event on.
pub fn agent_event(agent_id: &str, kind: AgentEventKind) -> Result<String, InvalidToken> {
    Ok(format!(
        "opscore.agent.{}.{}",
        token(agent_id)?,
        kind.suffix()
    ))
}

/// `opscore.dispatch.<agentId>`, where an agent receives assignments and cancellations.
pub fn dispatch(agent_id: &str) -> Result<String, InvalidToken> {
    Ok(format!("opscore.dispatch.{}", token(agent_id)?))
}

/// `opscore.status.agent.<agentId>`, the transitions of one agent.
pub fn agent_status(agent_id: &str) -> Result<String, InvalidToken> {
    Ok(format!("opscore.status.agent.{}", token(agent_id)?))
}

/// `opscore.status.session.<sessionId>`, the transitions of one session and its tasks.
pub fn session_status(session_id: &str) -> Result<String, InvalidToken> {
    Ok(format!("opscore.status.session.{}", token(session_id)?))
}

/// `opscore.dlq.<reason>`, where a message that can never be applied is copied.
pub fn dlq(reason: &str) -> Result<String, InvalidToken> {
    Ok(format!("opscore.dlq.{}", token(reason)?))
}

/// `opscore.api.<resource>.<verb>`, one endpoint of the control API.
pub fn api(resource: &str, verb: &str) -> String {
    format!("{API_PREFIX}.{resource}.{verb}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_accept_the_documented_alphabet_only() {
        assert!(is_valid_token("agent-1_A"));
        assert!(is_valid_token(&"a".repeat(128)));
        for bad in ["", "a.b", "a*", ">", "a b", "a\tb", "é", &"a".repeat(129)] {
            assert!(!is_valid_token(bad), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn agent_event_subjects_round_trip() {
        for kind in AgentEventKind::ALL {
            let subject = agent_event("agent-7", kind).expect("valid id");
            assert_eq!(parse_agent_event(&subject), Ok(("agent-7", kind)));
        }
    }

    #[test]
    fn parsing_rejects_foreign_and_unknown_subjects() {
        assert!(matches!(
            parse_agent_event("opscore.status.agent.a"),
            Err(SubjectError::NotAgentEvent(_))
        ));
        assert!(matches!(
            parse_agent_event("opscore.agent.a.reboot"),
            Err(SubjectError::UnknownEvent(_))
        ));
        assert!(matches!(
            parse_agent_event("opscore.agent.a"),
            Err(SubjectError::UnknownEvent(_))
        ));
        assert!(matches!(
            parse_agent_event("opscore.agent.a.b.state"),
            Err(SubjectError::UnknownEvent(_))
        ));
    }

    #[test]
    fn builders_refuse_ids_that_would_reroute() {
        assert!(dispatch("a.b").is_err());
        assert!(agent_status("*").is_err());
        assert!(session_status(">").is_err());
        assert_eq!(dispatch("a1").as_deref(), Ok("opscore.dispatch.a1"));
        assert_eq!(api("agent", "get"), "opscore.api.agent.get");
    }
}
