//! Workflows and sessions in memory, with the semantics of the Redis scripts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{MemoryRepository, page};
use crate::model::{Agent, Page};
use crate::repository::sessions::{
    DefineOutcome, Freshness, SessionCommit, SessionCommitOutcome, SessionFilter,
    SessionRepository, WorkflowRepository,
};
use crate::repository::{RepositoryError, Versioned};
use crate::workflow::{Session, Timer, WorkflowDefinition};

/// Definitions by id: the latest version and every version stored.
#[derive(Debug, Default)]
pub(super) struct Workflows {
    by_id: BTreeMap<String, (String, HashMap<String, WorkflowDefinition>)>,
}

#[derive(Debug, Default)]
pub(super) struct Sessions {
    records: BTreeMap<String, Versioned<Session>>,
    active: BTreeSet<String>,
    idempotency: HashMap<String, String>,
    /// Capability → session → when it started waiting.
    waiting: HashMap<String, HashMap<String, DateTime<Utc>>>,
    timers: HashMap<String, Timer>,
    /// When a claimed timer may be claimed again; absent when unclaimed.
    claims: HashMap<String, DateTime<Utc>>,
}

impl Sessions {
    /// Whether a session waits for an agent with `capability`.
    pub(super) fn any_waiting(&self, capability: &str) -> bool {
        self.waiting
            .get(capability)
            .is_some_and(|sessions| !sessions.is_empty())
    }
}

impl WorkflowRepository for MemoryRepository {
    async fn define(
        &self,
        definition: &WorkflowDefinition,
    ) -> Result<DefineOutcome, RepositoryError> {
        let mut state = self.state();
        let (latest, versions) = state
            .workflows
            .by_id
            .entry(definition.id.clone())
            .or_insert_with(|| (definition.version.clone(), HashMap::new()));
        match versions.get(&definition.version) {
            Some(existing) if existing == definition => Ok(DefineOutcome::Unchanged),
            Some(_) => Ok(DefineOutcome::VersionExists),
            None => {
                versions.insert(definition.version.clone(), definition.clone());
                *latest = definition.version.clone();
                Ok(DefineOutcome::Created)
            }
        }
    }

    async fn workflow(
        &self,
        workflow_id: &str,
        version: Option<&str>,
    ) -> Result<Option<WorkflowDefinition>, RepositoryError> {
        let state = self.state();
        Ok(state
            .workflows
            .by_id
            .get(workflow_id)
            .and_then(|(latest, versions)| versions.get(version.unwrap_or(latest)))
            .cloned())
    }

    async fn workflows(&self) -> Result<Vec<WorkflowDefinition>, RepositoryError> {
        let state = self.state();
        Ok(state
            .workflows
            .by_id
            .values()
            .filter_map(|(latest, versions)| versions.get(latest).cloned())
            .collect())
    }
}

impl SessionRepository for MemoryRepository {
    async fn load_session(
        &self,
        session_id: &str,
    ) -> Result<Option<Versioned<Session>>, RepositoryError> {
        Ok(self.state().sessions.records.get(session_id).cloned())
    }

    async fn commit_session(
        &self,
        commit: SessionCommit<'_>,
    ) -> Result<SessionCommitOutcome, RepositoryError> {
        let mut state = self.state();
        let session = commit.session;
        let id = session.session_id.clone();

        if let Some((agent_id, event_id)) = commit.event
            && state.seen_event(agent_id, event_id)
        {
            return Ok(SessionCommitOutcome::Duplicate);
        }
        if let Some(key) = commit.idempotency_key
            && let Some(owner) = state.sessions.idempotency.get(key)
        {
            return Ok(SessionCommitOutcome::KeyTaken(owner.clone()));
        }
        let current = state.sessions.records.get(&id).map_or(0, |r| r.version);
        let agents_current = commit.agents.iter().all(|(agent, version)| {
            state.agents.get(&agent.agent_id).map_or(0, |r| r.version) == *version
        });
        if current != commit.expected_version || !agents_current {
            return Ok(SessionCommitOutcome::Conflict);
        }

        state.sessions.records.insert(
            id.clone(),
            Versioned {
                version: current + 1,
                value: session.clone(),
            },
        );
        if session.status.is_ended() {
            state.sessions.active.remove(&id);
        } else {
            state.sessions.active.insert(id.clone());
        }
        for (agent, version) in &commit.agents {
            state.agents.insert(
                agent.agent_id.clone(),
                Versioned {
                    version: version + 1,
                    value: (*agent).clone(),
                },
            );
        }
        if let Some((agent_id, event_id)) = commit.event {
            state.record_event(agent_id, event_id, commit.now, self.options.dedupe_window);
        }
        if let Some((agent_id, deadline)) = commit.liveness {
            state.liveness.insert(agent_id.to_owned(), deadline);
        }
        if let Some(key) = commit.idempotency_key {
            state
                .sessions
                .idempotency
                .insert(key.to_owned(), id.clone());
        }
        for capability in &commit.waiting_leave {
            if let Some(waiting) = state.sessions.waiting.get_mut(capability) {
                waiting.remove(&id);
            }
        }
        for capability in &commit.waiting_join {
            let waiting = state
                .sessions
                .waiting
                .entry(capability.clone())
                .or_default();
            waiting.entry(id.clone()).or_insert(commit.now);
        }
        for key in &commit.timers_clear {
            state.sessions.timers.remove(key);
            state.sessions.claims.remove(key);
        }
        for timer in &commit.timers_set {
            state.sessions.claims.remove(&timer.key());
            state.sessions.timers.insert(timer.key(), timer.clone());
        }
        state.move_counters(&commit.counters);
        state.add_outbox(commit.outbox, commit.now + self.options.outbox_grace);
        let waiting = commit
            .check_waiting
            .iter()
            .any(|capability| state.sessions.any_waiting(capability));
        Ok(SessionCommitOutcome::Committed { waiting })
    }

    async fn list_sessions(
        &self,
        filter: &SessionFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<Session>, RepositoryError> {
        use std::ops::Bound::{Excluded, Unbounded};

        let state = self.state();
        let end = cursor.map_or(Unbounded, |c| Excluded(c.to_owned()));
        let records = state
            .sessions
            .records
            .range((Unbounded, end))
            .rev()
            .map(|(_, r)| &r.value);
        Ok(page(
            records,
            |s| filter.matches(s),
            limit,
            |s| s.session_id.clone(),
        ))
    }

    async fn active_sessions(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<String>, RepositoryError> {
        use std::ops::Bound::{Excluded, Unbounded};

        let state = self.state();
        let start = cursor.map_or(Unbounded, |c| Excluded(c.to_owned()));
        let items: Vec<String> = state
            .sessions
            .active
            .range((start, Unbounded))
            .take(limit)
            .cloned()
            .collect();
        let next_cursor = (items.len() == limit)
            .then(|| items.last().cloned())
            .flatten();
        Ok(Page { items, next_cursor })
    }

    async fn waiting_sessions(
        &self,
        capability: &str,
        limit: usize,
    ) -> Result<Vec<String>, RepositoryError> {
        let state = self.state();
        let Some(waiting) = state.sessions.waiting.get(capability) else {
            return Ok(Vec::new());
        };
        let mut sessions: Vec<(&DateTime<Utc>, &String)> =
            waiting.iter().map(|(id, at)| (at, id)).collect();
        sessions.sort();
        Ok(sessions
            .into_iter()
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect())
    }

    /// Always current: the records are the stored ones.
    async fn capable_agents(
        &self,
        capability: &str,
        limit: usize,
        _freshness: Freshness,
    ) -> Result<Vec<Versioned<Arc<Agent>>>, RepositoryError> {
        let state = self.state();
        let Some(members) = state.capabilities.get(capability) else {
            return Ok(Vec::new());
        };
        Ok(members
            .iter()
            .take(limit)
            .filter_map(|id| state.agents.get(id))
            .map(|record| Versioned {
                version: record.version,
                value: Arc::new(record.value.clone()),
            })
            .collect())
    }

    async fn claim_due_timers(
        &self,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Timer>, RepositoryError> {
        let mut state = self.state();
        let sessions = &mut state.sessions;
        let mut due: Vec<Timer> = sessions
            .timers
            .iter()
            .filter(|(key, timer)| sessions.claims.get(*key).copied().unwrap_or(timer.at) <= now)
            .map(|(_, timer)| timer.clone())
            .collect();
        due.sort_by_key(|timer| timer.at);
        due.truncate(limit);
        for timer in &due {
            sessions.claims.insert(timer.key(), claim_until);
        }
        Ok(due)
    }

    async fn clear_timers(&self, keys: &[String]) -> Result<(), RepositoryError> {
        let mut state = self.state();
        for key in keys {
            state.sessions.timers.remove(key);
            state.sessions.claims.remove(key);
        }
        Ok(())
    }
}
