//! The in-memory repository: the same contract as Redis, for a quick start and fast tests.
//! State is lost when the process exits, and it cannot be shared between worker processes.

mod sessions;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};

use super::{
    AgentCommit, AgentFilter, AgentRepository, CommitOutcome, Health, Outbox, RepositoryError,
    RepositoryOptions, Versioned, capability_changes,
};
use crate::model::{Agent, HistoryEntry, Page};
use crate::outbox::OutboxMessage;

#[derive(Debug, Clone, Default)]
pub struct MemoryRepository {
    inner: Arc<Mutex<State>>,
    options: RepositoryOptions,
}

#[derive(Debug, Default)]
struct State {
    /// In id order, as listings page through them.
    agents: BTreeMap<String, Versioned<Agent>>,
    events: HashMap<String, HashMap<String, DateTime<Utc>>>,
    history: HashMap<String, VecDeque<HistoryEntry>>,
    capabilities: HashMap<String, BTreeSet<String>>,
    liveness: HashMap<String, DateTime<Utc>>,
    outbox: HashMap<String, (DateTime<Utc>, OutboxMessage)>,
    workflows: sessions::Workflows,
    sessions: sessions::Sessions,
    counters: HashMap<String, i64>,
    generation: Option<String>,
}

impl MemoryRepository {
    pub fn new(options: RepositoryOptions) -> Self {
        Self {
            inner: Arc::default(),
            options,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied commit behind, since every
        // commit checks before it writes; the data is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One page of `records` that pass `keep`, with the id of the last as the cursor when more
/// remain.
fn page<'a, T: Clone + 'a>(
    records: impl Iterator<Item = &'a T>,
    keep: impl Fn(&T) -> bool,
    limit: usize,
    id: impl Fn(&T) -> String,
) -> Page<T> {
    let mut matching = records.filter(|record| keep(record));
    let items: Vec<T> = matching.by_ref().take(limit).cloned().collect();
    let next_cursor = match matching.next() {
        Some(_) => items.last().map(&id),
        None => None,
    };
    Page { items, next_cursor }
}

impl State {
    fn seen_event(&self, agent_id: &str, event_id: &str) -> bool {
        self.events
            .get(agent_id)
            .is_some_and(|events| events.contains_key(event_id))
    }

    fn record_event(
        &mut self,
        agent_id: &str,
        event_id: &str,
        now: DateTime<Utc>,
        window: chrono::Duration,
    ) {
        let cutoff = now - window;
        let events = self.events.entry(agent_id.to_owned()).or_default();
        events.retain(|_, at| *at >= cutoff);
        events.insert(event_id.to_owned(), now);
    }

    fn move_counters(&mut self, moves: &[(String, i64)]) {
        for (field, delta) in moves {
            *self.counters.entry(field.clone()).or_default() += delta;
        }
    }

    fn add_outbox(&mut self, messages: &[OutboxMessage], due: DateTime<Utc>) {
        for message in messages {
            self.outbox
                .insert(message.id.clone(), (due, message.clone()));
        }
    }
}

impl AgentRepository for MemoryRepository {
    async fn load(&self, agent_id: &str) -> Result<Option<Versioned<Agent>>, RepositoryError> {
        Ok(self.state().agents.get(agent_id).cloned())
    }

    async fn commit(&self, commit: AgentCommit<'_>) -> Result<CommitOutcome, RepositoryError> {
        let mut state = self.state();
        let id = commit.agent.agent_id.as_str();
        let current = state.agents.get(id).map_or(0, |record| record.version);
        if commit
            .event_id
            .is_some_and(|event_id| state.seen_event(id, event_id))
        {
            return Ok(CommitOutcome::Duplicate);
        }
        if current != commit.expected_version {
            return Ok(CommitOutcome::Conflict);
        }

        let version = current + 1;
        state.agents.insert(
            id.to_owned(),
            Versioned {
                version,
                value: commit.agent.clone(),
            },
        );
        if let Some(event_id) = commit.event_id {
            state.record_event(id, event_id, commit.now, self.options.dedupe_window);
        }
        if let Some(entry) = commit.history {
            let history = state.history.entry(id.to_owned()).or_default();
            history.push_front(entry.clone());
            history.truncate(self.options.history_length);
        }
        match commit.liveness_deadline {
            Some(deadline) => state.liveness.insert(id.to_owned(), deadline),
            None => state.liveness.remove(id),
        };
        let (removed, added) =
            capability_changes(commit.previous_capabilities, &commit.agent.capabilities);
        for capability in removed {
            if let Some(members) = state.capabilities.get_mut(capability) {
                members.remove(id);
            }
        }
        for capability in added {
            let members = state.capabilities.entry(capability.to_owned()).or_default();
            members.insert(id.to_owned());
        }
        state.move_counters(commit.counters);
        state.add_outbox(commit.outbox, commit.now + self.options.outbox_grace);
        let waiting = commit
            .check_waiting
            .iter()
            .any(|capability| state.sessions.any_waiting(capability));
        Ok(CommitOutcome::Committed { version, waiting })
    }

    async fn history(
        &self,
        agent_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, RepositoryError> {
        let state = self.state();
        let history = state.history.get(agent_id);
        Ok(history
            .map(|entries| entries.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn list(
        &self,
        filter: &AgentFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<Agent>, RepositoryError> {
        use std::ops::Bound::{Excluded, Unbounded};

        let state = self.state();
        let start = cursor.map_or(Unbounded, |c| Excluded(c.to_owned()));
        let records = state
            .agents
            .range((start, Unbounded))
            .map(|(_, r)| &r.value);
        Ok(page(
            records,
            |agent| filter.matches(agent),
            limit,
            |agent| agent.agent_id.clone(),
        ))
    }

    async fn claim_due_liveness(
        &self,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<String>, RepositoryError> {
        let mut state = self.state();
        let mut due: Vec<String> = state
            .liveness
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        due.sort();
        due.truncate(limit);
        for id in &due {
            state.liveness.insert(id.clone(), claim_until);
        }
        Ok(due)
    }
}

impl Outbox for MemoryRepository {
    async fn claim_due_outbox(
        &self,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<OutboxMessage>, RepositoryError> {
        let mut state = self.state();
        let mut due: Vec<&mut (DateTime<Utc>, OutboxMessage)> = state
            .outbox
            .values_mut()
            .filter(|(at, _)| *at <= now)
            .collect();
        due.sort_by_key(|(at, _)| *at);
        Ok(due
            .into_iter()
            .take(limit)
            .map(|entry| {
                entry.0 = claim_until;
                entry.1.clone()
            })
            .collect())
    }

    async fn remove_outbox(&self, ids: &[String]) -> Result<(), RepositoryError> {
        let mut state = self.state();
        for id in ids {
            state.outbox.remove(id);
        }
        Ok(())
    }
}

impl Health for MemoryRepository {
    async fn ping(&self) -> Result<(), RepositoryError> {
        Ok(())
    }

    async fn generation(&self, candidate: &str) -> Result<String, RepositoryError> {
        let mut state = self.state();
        Ok(state
            .generation
            .get_or_insert_with(|| candidate.to_owned())
            .clone())
    }

    async fn counters(&self) -> Result<HashMap<String, i64>, RepositoryError> {
        Ok(self.state().counters.clone())
    }
}
