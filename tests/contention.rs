//! Placement while other writers keep changing the agents it picks. A busy fleet changes agent
//! records all the time (results free slots, other placements take them), and a commit that
//! reserves slots on several agents fails when any one of them changed since it was read.
//! Real writers cannot make that happen on cue, so the repository here stages it: it can
//! refuse, as a conflict, every session commit that touches more than one agent, and it can
//! hold back the commit of a task report or of an agent's own event until the test lets it go.
//! Everything else goes to Redis.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
use tokio::sync::{Notify, Semaphore};

/// Redis, with session commits staged by the test.
#[derive(Clone)]
struct Raced {
    redis: RedisRepository,
    /// Refuse every session commit touching several agents, as a lost race.
    refuse_shared: bool,
    refused: Arc<AtomicU64>,
    /// Conflicts Redis answered to session and agent commits.
    conflicts: Arc<AtomicU64>,
    hold: Arc<Hold>,
}

/// Holds back the next task report's session commit, or the next agent event's commit.
struct Hold {
    armed: AtomicBool,
    armed_agent: AtomicBool,
    holding: AtomicBool,
    /// A commit is held.
    held: Notify,
    /// Candidates were read while a commit was held.
    candidates_read: Notify,
    release: Semaphore,
}

impl Raced {
    fn new(redis: RedisRepository, refuse_shared: bool) -> Self {
        Self {
            redis,
            refuse_shared,
            refused: Arc::default(),
            conflicts: Arc::default(),
            hold: Arc::new(Hold {
                armed: AtomicBool::new(false),
                armed_agent: AtomicBool::new(false),
                holding: AtomicBool::new(false),
                held: Notify::new(),
                candidates_read: Notify::new(),
                release: Semaphore::new(0),
            }),
        }
    }
}

impl Hold {
    /// Holds the commit in progress until the test releases it.
    async fn wait(&self) {
        self.holding.store(true, Ordering::SeqCst);
        self.held.notify_one();
        self.release.acquire().await.expect("open").forget();
        self.holding.store(false, Ordering::SeqCst);
    }
}

impl SessionRepository for Raced {
    async fn commit_session(
        &self,
        commit: SessionCommit<'_>,
    ) -> Result<SessionCommitOutcome, RepositoryError> {
        if self.refuse_shared && commit.agents.len() > 1 {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Ok(SessionCommitOutcome::Conflict);
        }
        if commit.event.is_some() && self.hold.armed.swap(false, Ordering::SeqCst) {
            self.hold.wait().await;
        }
        let outcome = self.redis.commit_session(commit).await;
        if matches!(outcome, Ok(SessionCommitOutcome::Conflict)) {
            self.conflicts.fetch_add(1, Ordering::SeqCst);
        }
        outcome
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
    ) -> Result<Vec<Versioned<Arc<Agent>>>, RepositoryError> {
        if self.hold.holding.load(Ordering::SeqCst) {
            self.hold.candidates_read.notify_one();
        }
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
        if commit.event_id.is_some() && self.hold.armed_agent.swap(false, Ordering::SeqCst) {
            self.hold.wait().await;
        }
        let outcome = self.redis.commit(commit).await;
        if matches!(outcome, Ok(CommitOutcome::Conflict)) {
            self.conflicts.fetch_add(1, Ordering::SeqCst);
        }
        outcome
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
    let raced = Raced::new(
        opscore::worker::redis_repository(&settings).expect("redis repository"),
        true,
    );
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

/// A worker on staged Redis, with an agent `solo` of two slots that holds the task of a first
/// session: one slot taken, one free.
struct Solo {
    nats: NatsServer,
    _redis: RedisServer,
    raced: Raced,
    worker: InProcessWorker,
    agent: SimAgent,
    first: String,
    first_task: serde_json::Value,
}

/// A trigger of a session with one task for `solo`.
fn one_task(workflow_id: &str) -> serde_json::Value {
    let task = json!({"taskId": "t", "name": "t", "agentCapability": "solo", "dependsOn": []});
    json!({"workflowDefinition": {"id": workflow_id, "name": workflow_id, "version": "1", "tasks": [task]}})
}

impl Solo {
    async fn start() -> Self {
        let nats = NatsServer::start();
        let redis = RedisServer::start();
        let settings = settings(&nats, Some(&redis), &[]);
        let raced = Raced::new(
            opscore::worker::redis_repository(&settings).expect("redis repository"),
            false,
        );
        let worker = InProcessWorker::start_with(settings, raced.clone(), &nats).await;
        let mut agent = SimAgent::start(&nats, "solo", &["solo"], 2).await;
        let first = trigger(&nats, one_task("first")).await;
        let first_task = agent.next_assignment().await;
        Self {
            nats,
            _redis: redis,
            raced,
            worker,
            agent,
            first,
            first_task,
        }
    }

    /// Triggers a second session while a held commit is released once the placement of its
    /// task has read the agent; returns the second session and its task.
    async fn place_second_while_held(&mut self) -> (String, serde_json::Value) {
        self.raced.hold.held.notified().await;
        let hold = &self.raced.hold;
        let release_once_read = async {
            hold.candidates_read.notified().await;
            hold.release.add_permits(1);
        };
        let (second, ()) = tokio::join!(trigger(&self.nats, one_task("second")), release_once_read);
        (second, self.agent.next_assignment().await)
    }

    /// Completes what is left, checks that both sessions completed, and that no commit lost a
    /// race.
    async fn finish(self, second: String, tasks: &[&serde_json::Value]) {
        for task in tasks {
            self.agent.complete(task, json!(null)).await;
        }
        let ended = wait_for_sessions(&self.nats, &[self.first.clone(), second]).await;
        assert!(
            ended.iter().all(|session| session["status"] == "completed"),
            "{ended:?}"
        );
        assert_eq!(
            self.raced.conflicts.load(Ordering::SeqCst),
            0,
            "the two changes of the agent took turns"
        );
        self.worker.stop().await;
    }
}

/// A result giving back one of an agent's slots while a placement takes another: both are
/// right, and within one worker neither should cost the other a conflict. The result's commit
/// is held while the placement reads the agent; the placement then waits for it and takes the
/// slot on the record it leaves.
#[tokio::test]
async fn a_result_and_a_placement_on_one_agent_take_turns_in_one_worker() {
    let mut solo = Solo::start().await;
    solo.raced.hold.armed.store(true, Ordering::SeqCst);
    solo.agent.complete(&solo.first_task, json!(null)).await;
    let (second, second_task) = solo.place_second_while_held().await;
    solo.finish(second, &[&second_task]).await;
}

/// An agent's own event and a placement on that agent: within one worker they take turns too.
/// The agent's commit is held while the placement reads the agent.
#[tokio::test]
async fn an_agent_event_and_a_placement_on_that_agent_take_turns_in_one_worker() {
    let mut solo = Solo::start().await;
    solo.raced.hold.armed_agent.store(true, Ordering::SeqCst);
    let now = chrono::Utc::now().to_rfc3339();
    solo.agent.agent.report("active", &now).await;
    let (second, second_task) = solo.place_second_while_held().await;
    let first_task = solo.first_task.clone();
    solo.finish(second, &[&first_task, &second_task]).await;
}
