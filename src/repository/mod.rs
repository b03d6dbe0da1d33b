//! Where state lives. The traits here are the whole contract between the worker and storage;
//! [`RedisRepository`] is the production implementation and [`MemoryRepository`] the quick-start
//! and test one. Both pass the contract suite in `tests/repository_contract.rs`.
//!
//! Every change is a compare-and-set on the record's `version`, and records the id of the event
//! that caused it and the messages to publish in the same atomic step, so that a redelivered
//! event has no second effect and no effect is lost between the commit and the publish.

mod memory;
mod redis;
pub mod sessions;

use std::future::Future;

use chrono::{DateTime, Utc};

pub use self::memory::MemoryRepository;
pub use self::redis::RedisRepository;
pub use self::sessions::{
    DefineOutcome, Freshness, SessionCommit, SessionCommitOutcome, SessionFilter,
    SessionRepository, WorkflowRepository,
};
use crate::model::{Agent, AgentState, HistoryEntry, Page};
use crate::outbox::OutboxMessage;

/// A storage failure, named by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// Storage cannot be reached or answered too late: retry the work later.
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] ::redis::RedisError),
    /// A stored record cannot be decoded: an operator must look at it.
    #[error("corrupt record {key}: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A record with the version its next compare-and-set must name.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// 0 means "does not exist yet"; every commit adds one.
    pub version: u64,
    pub value: T,
}

/// One atomic change of an agent record.
#[derive(Debug, Clone)]
pub struct AgentCommit<'a> {
    pub agent: &'a Agent,
    /// The version the record was read at; the commit fails with a conflict otherwise.
    pub expected_version: u64,
    /// The capabilities the record had at that version, to update the capability indexes.
    pub previous_capabilities: &'a [String],
    /// The inbound event this change applies; a second commit with the same id is refused.
    pub event_id: Option<&'a str>,
    pub history: Option<&'a HistoryEntry>,
    /// `None` removes the agent from the liveness timers.
    pub liveness_deadline: Option<DateTime<Utc>>,
    /// Messages to publish once committed.
    pub outbox: &'a [OutboxMessage],
    /// Moves of the shared counters behind the gauges (see [`Health::counters`]).
    pub counters: &'a [(String, i64)],
    /// Capabilities to look for waiting sessions in, with the commit: those of an agent the
    /// change lets take tasks. The answer is [`CommitOutcome::Committed`]'s `waiting`.
    pub check_waiting: &'a [String],
    pub now: DateTime<Utc>,
}

/// How a compare-and-set ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed {
        version: u64,
        /// Whether a session waits for any of the `check_waiting` capabilities.
        waiting: bool,
    },
    /// The record changed since it was read: read it again and recompute.
    Conflict,
    /// The event was applied before: nothing was written.
    Duplicate,
}

/// Filters of an agent listing; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFilter {
    pub capability: Option<String>,
    pub state: Option<AgentState>,
}

impl AgentFilter {
    pub fn matches(&self, agent: &Agent) -> bool {
        self.capability
            .as_ref()
            .is_none_or(|c| agent.capabilities.contains(c))
            && self.state.is_none_or(|s| agent.state == s)
    }
}

/// Tuning that both implementations share.
#[derive(Debug, Clone, Copy)]
pub struct RepositoryOptions {
    /// Entries kept in each agent's history.
    pub history_length: usize,
    /// How long an applied event id is remembered.
    pub dedupe_window: chrono::Duration,
    /// How long after a commit an unpublished outbox message is taken over by the sweeper.
    pub outbox_grace: chrono::Duration,
}

impl Default for RepositoryOptions {
    fn default() -> Self {
        Self {
            history_length: 50,
            dedupe_window: chrono::Duration::hours(24),
            outbox_grace: chrono::Duration::seconds(5),
        }
    }
}

/// The agent registry.
pub trait AgentRepository: Send + Sync + 'static {
    fn load(
        &self,
        agent_id: &str,
    ) -> impl Future<Output = Result<Option<Versioned<Agent>>, RepositoryError>> + Send;

    /// The record to base a change on. Unlike [`load`](Self::load) it may answer from what
    /// this process last committed, which another writer may have changed since: a stale
    /// record costs the commit a [`CommitOutcome::Conflict`], after which this answers with
    /// the current record. Only for compare-and-set; reads that must be current use `load`.
    fn load_for_change(
        &self,
        agent_id: &str,
    ) -> impl Future<Output = Result<Option<Versioned<Agent>>, RepositoryError>> + Send {
        self.load(agent_id)
    }

    fn commit(
        &self,
        commit: AgentCommit<'_>,
    ) -> impl Future<Output = Result<CommitOutcome, RepositoryError>> + Send;

    /// The most recent history entries, newest first.
    fn history(
        &self,
        agent_id: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<HistoryEntry>, RepositoryError>> + Send;

    /// Agents in id order after `cursor`. A page may hold fewer than `limit` matches when a
    /// filter skips many records; only `next_cursor == None` means the listing is complete.
    fn list(
        &self,
        filter: &AgentFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Page<Agent>, RepositoryError>> + Send;

    /// Agents whose liveness deadline is due at `now`, claimed until `claim_until` so that
    /// other workers skip them meanwhile. The commit that follows re-arms or removes the timer.
    fn claim_due_liveness(
        &self,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, RepositoryError>> + Send;
}

/// Messages committed but not yet known to be published.
pub trait Outbox: Send + Sync + 'static {
    /// Messages whose grace period has passed, claimed until `claim_until`.
    fn claim_due_outbox(
        &self,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<OutboxMessage>, RepositoryError>> + Send;

    /// Forgets messages JetStream has acknowledged.
    fn remove_outbox(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<(), RepositoryError>> + Send;
}

/// Storage reachability, for readiness probes, and the counters behind the gauges.
pub trait Health: Send + Sync + 'static {
    fn ping(&self) -> impl Future<Output = Result<(), RepositoryError>> + Send;

    /// Counters that every commit moves atomically with its change, such as
    /// `agents:idle` or `tasks:pending:no_capable_agent`: the gauges of all workers at once.
    fn counters(
        &self,
    ) -> impl Future<Output = Result<std::collections::HashMap<String, i64>, RepositoryError>> + Send;

    /// The storage's generation: an id written once, when the storage was first used. A
    /// different answer later means the storage lost its data (an empty restart, a flush) and
    /// started again. `candidate` becomes the generation when there is none.
    fn generation(
        &self,
        candidate: &str,
    ) -> impl Future<Output = Result<String, RepositoryError>> + Send;
}

/// The moves that turn the counts `before` into `after`, leaving out the unchanged.
pub fn counter_moves(
    before: &std::collections::BTreeMap<String, i64>,
    after: &std::collections::BTreeMap<String, i64>,
) -> Vec<(String, i64)> {
    let mut fields: Vec<&String> = before.keys().chain(after.keys()).collect();
    fields.sort();
    fields.dedup();
    fields
        .into_iter()
        .filter_map(|field| {
            let delta = after.get(field).unwrap_or(&0) - before.get(field).unwrap_or(&0);
            (delta != 0).then(|| (field.clone(), delta))
        })
        .collect()
}

/// Everything the worker needs from storage.
pub trait Repository:
    AgentRepository + SessionRepository + WorkflowRepository + Outbox + Health + Clone
{
}

impl<T> Repository for T where
    T: AgentRepository + SessionRepository + WorkflowRepository + Outbox + Health + Clone
{
}

/// Capabilities to take out of and put into the indexes when `old` becomes `new`.
fn capability_changes<'a>(old: &'a [String], new: &'a [String]) -> (Vec<&'a str>, Vec<&'a str>) {
    let removed = old
        .iter()
        .filter(|c| !new.contains(c))
        .map(String::as_str)
        .collect();
    let added = new
        .iter()
        .filter(|c| !old.contains(c))
        .map(String::as_str)
        .collect();
    (removed, added)
}
