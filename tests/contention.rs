//! Placement while other writers keep changing the agents it picks. A busy fleet changes agent
//! records all the time (results free slots, other placements take them), and a commit that
//! reserves slots on several agents fails when any one of them changed since it was read.
//! Real writers cannot make that happen on cue, so the repository here refuses, as a conflict,
//! every session commit that touches more than one agent, and passes the rest to Redis.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use common::*;
use opscore::model::{Agent, HistoryEntry, Page};
use opscore::outbox::OutboxMessage;
use opscore::repository::{
    AgentCommit, AgentFilter, AgentRepository, CommitOutcome, DefineOutcome, Freshness, Health,
    Outbox, RedisRepository, RepositoryError, SessionCommit, SessionCommitOutcome, SessionFilter,
    SessionRepository, Versioned, WorkflowRepository,
};
use opscore::workflow::{Session, Timer, WorkflowDefinition};
use serde_json::json;

/// Redis, except that a session commit touching several agents always loses a race.
#[derive(Clone)]
struct Raced {
    redis: RedisRepository,
    refused: Arc<AtomicU64>,
}

impl SessionRepository for Raced {
    async fn commit_session(
        &self,
        commit: SessionCommit<'_>,
    ) -> Result<SessionCommitOutcome, RepositoryError> {
        if commit.agents.len() > 1 {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Ok(SessionCommitOutcome::Conflict);
        }
        self.redis.commit_session(commit).await
    }

    async fn load_session(
        &self,
        session_id: &str,
    ) -> Result<Option<Versioned<Session>>, RepositoryError> {
        self.redis.load_session(session_id).await
    }

    async fn list_sessions(
        &self,
        filter: &SessionFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<Session>, RepositoryError> {
        self.redis.list_sessions(filter, cursor, limit).await
    }

    async fn active_sessions(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<String>, RepositoryError> {
        self.redis.active_sessions(cursor, limit).await
    }

    async fn waiting_sessions(
        &self,
        capability: &str,
        limit: usize,
    ) -> Result<Vec<String>, RepositoryError> {
        self.redis.waiting_sessions(capability, limit).await
    }

    async fn capable_agents(
        &self,
        capability: &str,
        limit: usize,
        freshness: Freshness,
    ) -> Result<Vec<Versioned<Agent>>, RepositoryError> {
        self.redis
            .capable_agents(capability, limit, freshness)
            .await
    }

    async fn claim_due_timers(
        &self,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Timer>, RepositoryError> {
        self.redis.claim_due_timers(now, claim_until, limit).await
    }

    async fn clear_timers(&self, keys: &[String]) -> Result<(), RepositoryError> {
        self.redis.clear_timers(keys).await
    }
}

impl AgentRepository for Raced {
    async fn load(&self, agent_id: &str) -> Result<Option<Versioned<Agent>>, RepositoryError> {
        self.redis.load(agent_id).await
    }

    async fn load_for_change(
        &self,
        agent_id: &str,
    ) -> Result<Option<Versioned<Agent>>, RepositoryError> {
        self.redis.load_for_change(agent_id).await
    }

    async fn commit(&self, commit: AgentCommit<'_>) -> Result<CommitOutcome, RepositoryError> {
        self.redis.commit(commit).await
    }

    async fn history(
        &self,
        agent_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, RepositoryError> {
        self.redis.history(agent_id, limit).await
    }

    async fn list(
        &self,
        filter: &AgentFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<Agent>, RepositoryError> {
        self.redis.list(filter, cursor, limit).await
    }

    async fn claim_due_liveness(
        &self,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<String>, RepositoryError> {
        self.redis.claim_due_liveness(now, claim_until, limit).await
    }
}

impl WorkflowRepository for Raced {
    async fn define(
        &self,
        definition: &WorkflowDefinition,
    ) -> Result<DefineOutcome, RepositoryError> {
        self.redis.define(definition).await
    }

    async fn workflow(
        &self,
        workflow_id: &str,
        version: Option<&str>,
    ) -> Result<Option<WorkflowDefinition>, RepositoryError> {
        self.redis.workflow(workflow_id, version).await
    }

    async fn workflows(&self) -> Result<Vec<WorkflowDefinition>, RepositoryError> {
        self.redis.workflows().await
    }
}

impl Outbox for Raced {
    async fn claim_due_outbox(
        &self,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<OutboxMessage>, RepositoryError> {
        self.redis.claim_due_outbox(now, claim_until, limit).await
    }

    async fn remove_outbox(&self, ids: &[String]) -> Result<(), RepositoryError> {
        self.redis.remove_outbox(ids).await
    }
}

impl Health for Raced {
    async fn ping(&self) -> Result<(), RepositoryError> {
        self.redis.ping().await
    }

    async fn counters(&self) -> Result<std::collections::HashMap<String, i64>, RepositoryError> {
        self.redis.counters().await
    }

    async fn generation(&self, candidate: &str) -> Result<String, RepositoryError> {
        self.redis.generation(candidate).await
    }
}

#[tokio::test]
async fn parallel_tasks_are_placed_one_by_one_when_placing_them_together_keeps_losing() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    // The reconciler would place what the event-driven placement gave up on; not here.
    let settings = settings(
        &nats,
        Some(&redis),
        &[("OPSCORE__WORKFLOWS__RECONCILE_INTERVAL_SECS", "86400")],
    );
    let raced = Raced {
        redis: opscore::worker::redis_repository(&settings).expect("redis repository"),
        refused: Arc::default(),
    };
    let worker = InProcessWorker::start_with(settings, raced.clone(), &nats).await;
    // One slot each: three tasks ready at once need three agents.
    let mut agents = Vec::new();
    for id in ["wide-1", "wide-2", "wide-3"] {
        agents.push(SimAgent::start(&nats, id, &["wide"], 1).await);
    }
    let tasks: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|id| json!({"taskId": id, "name": id, "agentCapability": "wide", "dependsOn": []}))
        .collect();
    let definition = json!({"id": "wide", "name": "Wide", "version": "1", "tasks": tasks});
    let session_id = trigger(&nats, json!({"workflowDefinition": definition})).await;

    let mut placed = BTreeSet::new();
    for agent in &mut agents {
        let assignment = agent.next_assignment().await;
        placed.insert(assignment["taskDefinitionId"].as_str().map(str::to_owned));
        agent.complete(&assignment, json!(null)).await;
    }
    assert_eq!(
        placed.len(),
        3,
        "each agent got a different task: {placed:?}"
    );
    let ended = wait_for_sessions(&nats, std::slice::from_ref(&session_id)).await;
    assert_eq!(ended[0]["status"], "completed", "{ended:?}");
    assert!(
        raced.refused.load(Ordering::SeqCst) > 0,
        "the placement of all three at once was tried and lost"
    );
    worker.stop().await;
}
