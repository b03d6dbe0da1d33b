//! The storage contract of workflows: definitions, sessions, the timers that drive them, and
//! the index of sessions waiting for an agent of some capability.

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{RepositoryError, Versioned};
use crate::model::{Agent, Page};
use crate::outbox::OutboxMessage;
use crate::workflow::{Session, SessionStatus, Timer, WorkflowDefinition};

/// How current the agent records of a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// As stored at the time of the read.
    Current,
    /// As this process last committed or read them where it keeps them, which another worker
    /// may have changed since: enough for a choice that a commit's compare-and-set checks.
    Kept,
}

/// One atomic change of a session and of the agents whose leases it takes or releases.
#[derive(Debug, Clone)]
pub struct SessionCommit<'a> {
    pub session: &'a Session,
    /// 0 creates the session. A committed session's version is this one plus one, as is a
    /// committed agent's.
    pub expected_version: u64,
    /// Agent records changed with it (leases reserved or released), each compare-and-set.
    pub agents: Vec<(&'a Agent, u64)>,
    /// The inbound event applied, recorded in this agent's applied-event ids.
    pub event: Option<(&'a str, &'a str)>,
    /// An agent heard from with this change, one of `agents`: its liveness deadline moves to
    /// this time, as any event from the agent would move it.
    pub liveness: Option<(&'a str, DateTime<Utc>)>,
    /// For a new session: the trigger's idempotency key, claimed atomically.
    pub idempotency_key: Option<&'a str>,
    /// Capabilities whose waiting index the session leaves, and those it joins.
    pub waiting_leave: Vec<String>,
    pub waiting_join: Vec<String>,
    pub timers_set: Vec<Timer>,
    /// Keys of timers that fired or no longer apply.
    pub timers_clear: Vec<String>,
    pub outbox: &'a [OutboxMessage],
    /// Moves of the shared counters behind the gauges.
    pub counters: Vec<(String, i64)>,
    /// Capabilities to look for waiting sessions in once the commit is done (those of agents
    /// that got a slot back).
    pub check_waiting: Vec<String>,
    pub now: DateTime<Utc>,
}

/// How a session commit ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommitOutcome {
    /// `waiting`: a session waits for one of the capabilities the commit was asked to check.
    Committed { waiting: bool },
    /// The session or one of the agents changed since it was read.
    Conflict,
    /// The event was applied before.
    Duplicate,
    /// The idempotency key already names this session.
    KeyTaken(String),
}

/// Filters of a session listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFilter {
    pub status: Option<SessionStatus>,
    pub workflow_id: Option<String>,
}

impl SessionFilter {
    pub fn matches(&self, session: &Session) -> bool {
        self.status.is_none_or(|s| session.status == s)
            && self
                .workflow_id
                .as_ref()
                .is_none_or(|w| &session.workflow_id == w)
    }
}

/// How a definition was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefineOutcome {
    Created,
    /// The same id and version with the same content: nothing to do.
    Unchanged,
    /// The same id and version with other content: versions are immutable.
    VersionExists,
}

/// Workflow definitions, versioned: each (id, version) is immutable, the latest defined wins.
pub trait WorkflowRepository: Send + Sync + 'static {
    fn define(
        &self,
        definition: &WorkflowDefinition,
    ) -> impl Future<Output = Result<DefineOutcome, RepositoryError>> + Send;

    /// The given version, or the latest when `version` is `None`.
    fn workflow(
        &self,
        workflow_id: &str,
        version: Option<&str>,
    ) -> impl Future<Output = Result<Option<WorkflowDefinition>, RepositoryError>> + Send;

    /// The latest version of every workflow, in id order.
    fn workflows(
        &self,
    ) -> impl Future<Output = Result<Vec<WorkflowDefinition>, RepositoryError>> + Send;
}

/// Sessions, their timers and the agents they are placed on.
pub trait SessionRepository: Send + Sync + 'static {
    fn load_session(
        &self,
        session_id: &str,
    ) -> impl Future<Output = Result<Option<Versioned<Session>>, RepositoryError>> + Send;

    fn commit_session(
        &self,
        commit: SessionCommit<'_>,
    ) -> impl Future<Output = Result<SessionCommitOutcome, RepositoryError>> + Send;

    /// Newest first (session ids are time-ordered UUIDs), after `cursor`.
    fn list_sessions(
        &self,
        filter: &SessionFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Page<Session>, RepositoryError>> + Send;

    /// Sessions not yet ended, in id order after `cursor`, for the reconciler.
    fn active_sessions(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Page<String>, RepositoryError>> + Send;

    /// Sessions with a task waiting for an agent of `capability`, oldest first.
    fn waiting_sessions(
        &self,
        capability: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, RepositoryError>> + Send;

    /// Agents with `capability`, at most `limit`, with their versions, as current as
    /// `freshness` asks. Records are shared: a placement copies only those it changes.
    fn capable_agents(
        &self,
        capability: &str,
        limit: usize,
        freshness: Freshness,
    ) -> impl Future<Output = Result<Vec<Versioned<Arc<Agent>>>, RepositoryError>> + Send;

    /// Timers due at `now`, claimed until `claim_until`.
    fn claim_due_timers(
        &self,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Timer>, RepositoryError>> + Send;

    /// Forgets timers that fired without changing anything (stale ones).
    fn clear_timers(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<(), RepositoryError>> + Send;
}

/// The capabilities of a session's tasks that wait for an agent: the waiting index holds the
/// session under each of them.
pub fn waiting_capabilities(session: &Session) -> Vec<String> {
    use crate::workflow::PendingReason;

    let mut capabilities: Vec<String> = session
        .tasks
        .iter()
        .filter(|task| {
            !session.status.is_ended()
                && matches!(
                    task.pending,
                    Some(PendingReason::NoCapableAgent | PendingReason::AllCapableAgentsBusy)
                )
        })
        .map(|task| task.capability.clone())
        .collect();
    capabilities.sort();
    capabilities.dedup();
    capabilities
}
