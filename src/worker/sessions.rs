//! Running sessions: each operation loads a session, lets the pure engine decide, commits the
//! session together with the agents whose leases change, then publishes and follows up.
//!
//! Follow-ups are what makes placement event-driven: a finished task makes its dependents
//! ready (place them now), a released lease frees a slot (place what waits for that agent's
//! capabilities), an agent that registers or becomes idle does the same.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use tracing::{debug, info, warn};

use super::claims::{Claim, Claims};
use super::gates::Gates;
use crate::bus::Publisher;
use crate::model::{Agent, Lease};
use crate::outbox::OutboxMessage;
use crate::repository::sessions::waiting_capabilities;
use crate::repository::{
    Freshness, Repository, RepositoryError, SessionCommit, SessionCommitOutcome, Versioned,
    counter_moves,
};
use crate::subjects;
use crate::workflow::{
    Candidate, Effect, PendingReason, Rejection, Session, Timer, TimerKind, WorkflowDefinition,
    choose_agent,
};

/// Compare-and-set attempts before an operation gives up for now.
const MAX_ATTEMPTS: usize = 16;
/// Agents of one capability considered for a placement.
const CANDIDATE_LIMIT: usize = 1_000;
/// Waiting sessions re-examined when one agent becomes available.
const WAITING_BATCH: usize = 32;
/// Times a placement that lost every attempt to other placements is tried again.
const CONTENDED_ROUNDS: u32 = 3;
/// Longest pause before the first of those rounds, in milliseconds; it doubles each round.
const CONTENDED_PAUSE_MS: u64 = 5;

/// How an operation on a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOutcome {
    Applied,
    /// The engine refused it (stale lease, unknown task, session ended, ...).
    Rejected(Rejection),
    /// The event was applied before.
    Duplicate,
    /// No such session.
    NotFound,
    /// Other writers kept winning; try again later.
    Contended,
}

/// What became of a task report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub outcome: SessionOutcome,
    /// The report's commit also refreshed the reporting agent's liveness, as any event from
    /// the agent does; when false, the caller refreshes it.
    pub agent_seen: bool,
}

impl Reported {
    fn not_seen(outcome: SessionOutcome) -> Self {
        Self {
            outcome,
            agent_seen: false,
        }
    }
}

/// Why a trigger failed.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("workflow {0} is not defined")]
    UnknownWorkflow(String),
    #[error("agent {0} is not registered")]
    UnknownAgent(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Storage(#[from] RepositoryError),
    #[error("session could not be created: too many concurrent changes")]
    Contended,
}

/// What a trigger asks for.
#[derive(Debug, Clone)]
pub struct Trigger {
    pub definition: WorkflowDefinition,
    pub input: Value,
    pub agent_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub metadata: Map<String, Value>,
    /// The W3C `traceparent` of the request, continued by every message about the session.
    pub traceparent: Option<String>,
}

/// A started (or, for a repeated idempotency key, existing) session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Triggered {
    pub session_id: String,
    pub workflow_id: String,
    pub created: bool,
}

/// A task report from an agent, as the engine takes it.
#[derive(Debug, Clone)]
pub enum Report {
    Progress {
        lease_epoch: u64,
    },
    Result {
        lease_epoch: u64,
        outcome: crate::workflow::TaskOutcome,
    },
    Legacy(crate::workflow::LegacyReport),
}

/// What to do after a commit.
#[derive(Debug, Default)]
struct FollowUps {
    /// The session just committed, as committed: its placement starts from it instead of
    /// reading it back.
    committed: Option<Versioned<Session>>,
    sessions: BTreeSet<String>,
    /// Capabilities of agents that can take more tasks now: sessions waiting for them.
    capabilities: BTreeSet<String>,
    /// Place every waiting session read, even after a placement found no free slot left:
    /// an agent that appeared or came back can change why sessions wait (from
    /// `no_capable_agent` to `all_capable_agents_busy`). A released slot changes no reason, so
    /// the sessions after the one that takes it are skipped.
    every_waiting: bool,
}

/// What placing the ready tasks of one session did.
#[derive(Debug)]
struct Placement {
    outcome: SessionOutcome,
    dispatched: usize,
    /// Capabilities of the session's ready tasks that no agent could take a task of once the
    /// placement was done: other sessions waiting for them need not be tried now.
    saturated: BTreeSet<String>,
}

impl Placement {
    fn new(outcome: SessionOutcome, dispatched: usize) -> Self {
        Self {
            outcome,
            dispatched,
            saturated: BTreeSet::new(),
        }
    }
}

/// Sessions as the worker runs them.
#[derive(Debug, Clone)]
pub struct Sessions<R> {
    repository: R,
    publisher: Publisher,
    /// How long an agent stays alive after it was last heard from.
    liveness_timeout: chrono::Duration,
    /// Slots this process's placements are about to take, shared by every clone.
    claims: Arc<Claims>,
    /// Agent records this process's changes are writing, shared with the registry.
    gates: Arc<Gates>,
}

impl<R: Repository> Sessions<R> {
    pub fn new(
        repository: R,
        publisher: Publisher,
        liveness_timeout: chrono::Duration,
        gates: Arc<Gates>,
    ) -> Self {
        Self {
            repository,
            publisher,
            liveness_timeout,
            claims: Arc::default(),
            gates,
        }
    }

    pub fn repository(&self) -> &R {
        &self.repository
    }

    /// Starts a session and places its first tasks. A repeated idempotency key returns the
    /// session it created.
    pub async fn trigger(&self, trigger: Trigger) -> Result<Triggered, TriggerError> {
        if let Some(agent_id) = &trigger.agent_id {
            subjects::token(agent_id).map_err(|e| TriggerError::Invalid(e.to_string()))?;
            if self.repository.load(agent_id).await?.is_none() {
                return Err(TriggerError::UnknownAgent(agent_id.clone()));
            }
        }
        let now = Utc::now();
        let session_id = uuid::Uuid::now_v7().to_string();
        let workflow_id = trigger.definition.id.clone();
        let (session, effects) = Session::start(
            trigger.definition,
            &session_id,
            trigger.input,
            trigger.agent_id,
            trigger.metadata,
            now,
        )
        .map_err(|e| TriggerError::Invalid(e.to_string()))?;
        let mut session = session;
        session.traceparent = trigger
            .traceparent
            .as_deref()
            .and_then(crate::trace::parse)
            .map(str::to_owned);

        let mut change = Change::new(session, 0, now);
        change.absorb(&self.repository, effects).await?;
        match change
            .commit(&self.repository, None, trigger.idempotency_key.as_deref())
            .await?
        {
            SessionCommitOutcome::Committed { .. } => {}
            SessionCommitOutcome::KeyTaken(existing) => {
                // The key names the session it created, whatever this request asked to run.
                let workflow_id = match self.repository.load_session(&existing).await? {
                    Some(record) => record.value.workflow_id,
                    None => workflow_id,
                };
                return Ok(Triggered {
                    session_id: existing,
                    workflow_id,
                    created: false,
                });
            }
            SessionCommitOutcome::Conflict | SessionCommitOutcome::Duplicate => {
                return Err(TriggerError::Contended);
            }
        }
        metrics::counter!("opscore_sessions_started_total").increment(1);
        info!(session_id, workflow_id, "session started");
        crate::faults::crash_point("after_commit");
        self.publisher.flush(&self.repository, &change.outbox).await;
        crate::faults::crash_point("after_publish");
        self.follow_up(FollowUps {
            committed: Some(Versioned {
                version: 1,
                value: change.session,
            }),
            sessions: BTreeSet::from([session_id.clone()]),
            capabilities: BTreeSet::new(),
            every_waiting: false,
        })
        .await;
        Ok(Triggered {
            session_id,
            workflow_id,
            created: true,
        })
    }

    /// Applies an agent's report on one of its tasks, deduplicated by `event_id`.
    /// `from_agent`: the agent sent the report itself, so it proves the agent alive.
    pub async fn report(
        &self,
        agent_id: &str,
        event_id: &str,
        task_id: &str,
        report: Report,
        from_agent: bool,
    ) -> Result<Reported, RepositoryError> {
        let Some(session_id) = session_of_task(task_id) else {
            return Ok(Reported::not_seen(SessionOutcome::NotFound));
        };
        self.apply(
            session_id,
            Some((agent_id, event_id)),
            from_agent.then_some(agent_id),
            &[],
            |session, now| {
                let jitter = rand::random::<f64>();
                match report.clone() {
                    Report::Progress { lease_epoch } => {
                        session.apply_progress(task_id, agent_id, lease_epoch, now)
                    }
                    Report::Result {
                        lease_epoch,
                        outcome,
                    } => session.apply_result(task_id, agent_id, lease_epoch, outcome, jitter, now),
                    Report::Legacy(legacy) => {
                        session.apply_legacy(task_id, agent_id, legacy, jitter, now)
                    }
                }
            },
        )
        .await
    }

    /// Cancels a session, telling every lease holder to stop. Returns the cancelled session.
    pub async fn cancel(
        &self,
        session_id: &str,
    ) -> Result<(SessionOutcome, Option<Session>), RepositoryError> {
        let outcome = self
            .apply(session_id, None, None, &[], |session, now| {
                session.cancel(now)
            })
            .await?
            .outcome;
        if outcome == SessionOutcome::Applied {
            metrics::counter!("opscore_sessions_cancelled_total").increment(1);
        }
        let session = self
            .repository
            .load_session(session_id)
            .await?
            .map(|record| record.value);
        Ok((outcome, session))
    }

    /// Fires one due timer.
    pub async fn fire(&self, timer: &Timer) -> Result<SessionOutcome, RepositoryError> {
        let key = [timer.key()];
        let outcome = match &timer.kind {
            TimerKind::LeaseDeadline {
                task_id,
                lease_epoch,
            } => {
                self.apply(&timer.session_id, None, None, &key, |session, now| {
                    let effects =
                        session.lease_expired(task_id, *lease_epoch, rand::random::<f64>(), now);
                    if !effects.is_empty() {
                        metrics::counter!("opscore_tasks_timed_out_total").increment(1);
                    }
                    Ok(effects)
                })
                .await?
                .outcome
            }
            TimerKind::QueueTimeout { task_id, .. } => {
                self.apply(&timer.session_id, None, None, &key, |session, now| {
                    Ok(session.queue_timeout(task_id, now))
                })
                .await?
                .outcome
            }
            TimerKind::Backoff { .. } => self.place(&timer.session_id, &key, None).await?.outcome,
        };
        if outcome == SessionOutcome::NotFound {
            self.repository.clear_timers(&key).await?;
        }
        Ok(outcome)
    }

    /// Places the ready tasks of sessions waiting for `capabilities`, those of an agent that
    /// became able to take tasks.
    pub async fn agent_available(&self, capabilities: &[String]) {
        self.follow_up(FollowUps {
            committed: None,
            sessions: BTreeSet::new(),
            capabilities: capabilities.iter().cloned().collect(),
            every_waiting: true,
        })
        .await;
    }

    /// Places the ready tasks of a session: each goes to one of the least recently assigned
    /// eligible agents ([`choose_agent`]), or records why it waits. Returns how many tasks
    /// were dispatched.
    pub async fn schedule(&self, session_id: &str) -> Result<usize, RepositoryError> {
        Ok(self.place(session_id, &[], None).await?.dispatched)
    }

    /// Places the ready tasks of `session_id`, starting from `known` when the caller has just
    /// committed it (a stale one only costs a conflict and a read).
    async fn place(
        &self,
        session_id: &str,
        timers_fired: &[String],
        mut known: Option<Versioned<Session>>,
    ) -> Result<Placement, RepositoryError> {
        let mut total = 0;
        let mut timers_fired = timers_fired;
        // Attempts made: a commit that leaves tasks for the next one does not count.
        let mut attempt = 0;
        // Choices made again because a record chosen from changed in this process meanwhile.
        let mut rechosen = 0;
        while attempt < MAX_ATTEMPTS {
            let record = match known.take() {
                Some(record) => record,
                None => match self.repository.load_session(session_id).await? {
                    Some(record) => record,
                    None => return Ok(Placement::new(SessionOutcome::NotFound, total)),
                },
            };
            let now = Utc::now();
            let ready = record.value.ready_tasks(now);
            if ready.is_empty() && timers_fired.is_empty() {
                return Ok(Placement::new(SessionOutcome::Applied, total));
            }
            let mut dispatched = 0;
            let mut began_waiting = false;

            // Candidates for every capability the ready tasks need, read before deciding.
            let mut agents: BTreeMap<String, (Arc<Agent>, u64)> = BTreeMap::new();
            let capabilities: BTreeSet<String> = record
                .value
                .tasks
                .iter()
                .filter(|task| ready.contains(&task.task_id))
                .map(|task| task.capability.clone())
                .collect();
            // The first attempt chooses from the agent records this worker keeps, which its own
            // commits keep current; a record another worker changed since fails the commit's
            // compare-and-set, and every later attempt reads the candidates as stored. A task
            // found waiting on kept records is safe too: a commit that puts it among the
            // waiting sessions is followed by a pass on stored records (`began_waiting`),
            // and a session already waiting is found by the follow-up of the worker that frees
            // a slot.
            let freshness = if attempt == 0 {
                Freshness::Kept
            } else {
                Freshness::Current
            };
            for capability in &capabilities {
                for agent in self
                    .repository
                    .capable_agents(capability, CANDIDATE_LIMIT, freshness)
                    .await?
                {
                    agents.insert(agent.value.agent_id.clone(), (agent.value, agent.version));
                }
            }

            let unchanged = record.value.clone();
            let mut change = Change::new(record.value, record.version, now);
            change.agents = agents;
            change.timers_clear.extend(timers_fired.iter().cloned());
            let pinned = change.session.agent_id.clone();
            // Held until this attempt's commit is done.
            let mut claimed: Vec<Claim> = Vec::new();
            // After a lost race, one dispatch per commit: a commit that reserves slots on
            // several agents fails if any of them changed since it was read, and under load
            // one of them nearly always has. The tasks left over go in the next attempts.
            let one_at_a_time = attempt > 0;
            let mut deferred = false;
            for task_id in ready {
                if one_at_a_time && dispatched > 0 {
                    deferred = true;
                    break;
                }
                let Some(task) = change.session.tasks.iter().find(|t| t.task_id == task_id) else {
                    continue;
                };
                let capability = task.capability.clone();
                let spread = spread(session_id, &task_id, attempt);
                // This attempt's own claims are already leases in `change.agents`.
                let claimed_elsewhere = |agent_id: &str| {
                    let own = claimed.iter().filter(|c| c.agent_id() == agent_id).count();
                    let own = u32::try_from(own).unwrap_or(u32::MAX);
                    self.claims.held(agent_id).saturating_sub(own)
                };
                let choose = |count_claims: bool| {
                    let candidates: Vec<Candidate> = change
                        .agents
                        .values()
                        .map(|(agent, _)| {
                            let taken = if count_claims {
                                claimed_elsewhere(&agent.agent_id)
                            } else {
                                0
                            };
                            candidate(agent, taken)
                        })
                        .collect();
                    choose_agent(&candidates, &capability, pinned.as_deref(), spread)
                };
                // Slots other placements claimed rank as taken, unless no other slot is
                // free: then the task races for one rather than wait for a claim that may
                // yet be given back.
                let choice = match choose(true) {
                    Err(PendingReason::AllCapableAgentsBusy) => choose(false),
                    choice => choice,
                };
                let effects = match choice {
                    Ok(agent_id) => {
                        let effects = change.session.assign(&task_id, &agent_id, now);
                        let effects = effects.map_err(|e| {
                            // The engine listed the task as ready a moment ago.
                            warn!(%e, session_id, task_id, "placement refused");
                        });
                        let Ok(effects) = effects else { continue };
                        claimed.push(self.claims.claim(&agent_id));
                        change.reserve(&agent_id, &task_id, now);
                        dispatched += 1;
                        effects
                    }
                    Err(reason) => match change.session.mark_waiting(&task_id, reason, now) {
                        Ok(effects) => {
                            began_waiting |= !effects.is_empty();
                            effects
                        }
                        Err(e) => {
                            warn!(%e, session_id, task_id, "cannot record why the task waits");
                            continue;
                        }
                    },
                };
                change.absorb(&self.repository, effects).await?;
            }

            let placed = Placement {
                outcome: SessionOutcome::Applied,
                dispatched: total + dispatched,
                saturated: saturated(&change.agents, &capabilities),
            };
            // Every task still waits for the same reason: nothing to write.
            if change.session == unchanged && change.is_empty() {
                count_placement("unchanged");
                return Ok(placed);
            }
            // The agents given tasks are written under their gates. Another change in this
            // process may have committed one of them since the candidates were read: the
            // leases move onto the record it left, or the tasks are chosen again from it, at
            // no round trip to storage, where committing the stale record would cost a
            // conflict and a fresh read.
            let passage = self.gates.pass(&change.changed).await;
            if !self.rebase_chosen(&mut change).await? {
                drop(passage);
                count_placement("rechosen");
                rechosen += 1;
                if rechosen >= MAX_ATTEMPTS {
                    attempt += 1;
                }
                known = Some(Versioned {
                    version: change.version,
                    value: unchanged,
                });
                continue;
            }
            let committed = change.commit(&self.repository, None, None).await?;
            drop(passage);
            match committed {
                SessionCommitOutcome::Committed { .. } => {
                    count_placement(if dispatched > 0 {
                        "dispatched"
                    } else {
                        "waiting"
                    });
                    crate::faults::crash_point("after_commit");
                    metrics::counter!("opscore_tasks_dispatched_total")
                        .increment(dispatched as u64);
                    self.publisher.flush(&self.repository, &change.outbox).await;
                    crate::faults::crash_point("after_publish");
                    total += dispatched;
                    timers_fired = &[];
                    if began_waiting {
                        // A slot freed after the candidates were read and before this commit
                        // put the session among the waiting ones would wake nobody: the
                        // agent's follow-up looked for waiting sessions too early. Reading
                        // the candidates once more, now that the session is visibly waiting,
                        // closes that gap: a slot freed later finds the session through its
                        // follow-up.
                        attempt += 1;
                        continue;
                    }
                    if !deferred {
                        return Ok(placed);
                    }
                    // Each such commit dispatched a task, so this ends with the ready tasks.
                    known = Some(Versioned {
                        version: change.version + 1,
                        value: change.session,
                    });
                }
                SessionCommitOutcome::Conflict => {
                    count_placement("conflict");
                    debug!(session_id, "placement conflict; retrying");
                    attempt += 1;
                }
                SessionCommitOutcome::Duplicate | SessionCommitOutcome::KeyTaken(_) => {
                    return Ok(Placement::new(SessionOutcome::Duplicate, total));
                }
            }
        }
        Ok(Placement::new(SessionOutcome::Contended, total))
    }

    /// Loads a session, applies `decide`, commits with the agents whose leases it released,
    /// publishes, then places what became ready and what waits for the freed agents.
    async fn apply<F>(
        &self,
        session_id: &str,
        event: Option<(&str, &str)>,
        heard_from: Option<&str>,
        timers_fired: &[String],
        decide: F,
    ) -> Result<Reported, RepositoryError>
    where
        F: Fn(&mut Session, DateTime<Utc>) -> Result<Vec<Effect>, Rejection>,
    {
        for _ in 0..MAX_ATTEMPTS {
            let Some(record) = self.repository.load_session(session_id).await? else {
                return Ok(Reported::not_seen(SessionOutcome::NotFound));
            };
            let now = Utc::now();
            // The change snapshots the session's indexes and counters before the engine moves
            // it, so that the commit can take it out of what it leaves.
            let mut change = Change::new(record.value, record.version, now);
            let effects = match decide(&mut change.session, now) {
                Ok(effects) => effects,
                Err(rejection) => {
                    return Ok(Reported::not_seen(SessionOutcome::Rejected(rejection)));
                }
            };
            change.timers_clear.extend(timers_fired.iter().cloned());
            // The agents given a slot back are read and written under their gates, so that the
            // records read are the last this process committed.
            let released: Vec<String> = effects
                .iter()
                .filter_map(|effect| match effect {
                    Effect::ReleaseLease(release) => Some(release.agent_id.clone()),
                    _ => None,
                })
                .collect();
            let passage = self.gates.pass(&released).await;
            change.absorb(&self.repository, effects).await?;
            if let Some(agent_id) = heard_from {
                change.hear_from(agent_id, self.liveness_timeout);
            }
            let committed = change.commit(&self.repository, event, None).await?;
            drop(passage);

            match committed {
                SessionCommitOutcome::Committed { waiting } => {
                    crate::faults::crash_point("after_commit");
                    self.publisher.flush(&self.repository, &change.outbox).await;
                    crate::faults::crash_point("after_publish");
                    // The commit looked for sessions waiting for the capabilities of the
                    // agents it gave a slot back; a session that began waiting after it read
                    // the agents with that slot free.
                    let capabilities = if waiting {
                        change.released_capabilities()
                    } else {
                        BTreeSet::new()
                    };
                    let follow_ups = FollowUps {
                        committed: Some(Versioned {
                            version: change.version + 1,
                            value: change.session,
                        }),
                        sessions: BTreeSet::from([session_id.to_owned()]),
                        capabilities,
                        every_waiting: false,
                    };
                    let agent_seen = change.liveness.is_some();
                    self.follow_up(follow_ups).await;
                    return Ok(Reported {
                        outcome: SessionOutcome::Applied,
                        agent_seen,
                    });
                }
                SessionCommitOutcome::Conflict => debug!(session_id, "session conflict; retrying"),
                SessionCommitOutcome::Duplicate | SessionCommitOutcome::KeyTaken(_) => {
                    return Ok(Reported::not_seen(SessionOutcome::Duplicate));
                }
            }
        }
        Ok(Reported::not_seen(SessionOutcome::Contended))
    }

    /// Brings the agents `change` gives tasks up to the records this process last committed:
    /// a record another change wrote since it was read takes the same leases if it can still
    /// hold them. False when one cannot, and the tasks must be chosen again.
    async fn rebase_chosen(&self, change: &mut Change) -> Result<bool, RepositoryError> {
        let changed: Vec<String> = change.changed.iter().cloned().collect();
        for agent_id in changed {
            let Some((_, chosen)) = change.agents.get(&agent_id) else {
                continue;
            };
            let chosen = *chosen;
            let Some(current) = self.repository.load_for_change(&agent_id).await? else {
                return Ok(false);
            };
            if current.version != chosen && !change.rebase(&agent_id, current) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Places the ready tasks of the given sessions and of the sessions waiting for the given
    /// capabilities. Failures are left to the reconciler.
    async fn follow_up(&self, follow_ups: FollowUps) {
        let mut committed = follow_ups.committed;
        // Each session with the capability it waits for, if it is queued as a waiting one.
        let mut sessions: Vec<(String, Option<String>)> = follow_ups
            .sessions
            .into_iter()
            .map(|session_id| (session_id, None))
            .collect();
        for capability in &follow_ups.capabilities {
            match self
                .repository
                .waiting_sessions(capability, WAITING_BATCH)
                .await
            {
                Ok(waiting) => sessions.extend(
                    waiting
                        .into_iter()
                        .map(|session_id| (session_id, Some(capability.clone()))),
                ),
                Err(error) => debug!(%error, capability, "cannot read waiting sessions"),
            }
        }
        let mut seen = BTreeSet::new();
        let mut queue: VecDeque<(String, Option<String>, u32)> = sessions
            .into_iter()
            .filter(|(session_id, _)| seen.insert(session_id.clone()))
            .map(|(session_id, waits_for)| (session_id, waits_for, 0))
            .collect();
        let mut saturated = BTreeSet::new();
        while let Some((session_id, waits_for, round)) = queue.pop_front() {
            // A placement found no agent of this capability able to take a task: the other
            // sessions waiting for it would only read the same. A slot freed after that
            // placement read the agents wakes them through its own follow-up.
            if !follow_ups.every_waiting
                && waits_for.as_ref().is_some_and(|c| saturated.contains(c))
            {
                continue;
            }
            let known = committed.take_if(|record| record.value.session_id == session_id);
            match self.place(&session_id, &[], known).await {
                Ok(placement) if placement.outcome == SessionOutcome::Contended => {
                    if round < CONTENDED_ROUNDS {
                        // Every attempt lost a race for an agent record: other placements
                        // hold the agents this session's tasks want. Step back for a random
                        // moment so the racers drift apart, then try again after the rest
                        // of the queue.
                        let pause = rand::random_range(1..=CONTENDED_PAUSE_MS << round);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                        queue.push_back((session_id, waits_for, round + 1));
                    } else {
                        metrics::counter!("opscore_placements_contended_total").increment(1);
                        debug!(session_id, "placement contended; the reconciler will retry");
                    }
                }
                Ok(placement) => saturated.extend(placement.saturated),
                Err(error) => {
                    debug!(%error, session_id, "placement failed; the reconciler will retry")
                }
            }
        }
    }
}

/// A session being changed, the agents it touches and what to do once it is committed.
#[derive(Debug)]
struct Change {
    session: Session,
    version: u64,
    waiting_before: Vec<String>,
    /// The session's counters as read, to move them by the difference on commit.
    counts_before: BTreeMap<String, i64>,
    /// Agents read for this change, by id, with the version read.
    agents: BTreeMap<String, (Arc<Agent>, u64)>,
    /// Ids of the agents whose records this change modifies.
    changed: BTreeSet<String>,
    /// Agents that got a slot back.
    released: BTreeSet<String>,
    /// Leases this change adds, by the agent that takes them.
    reserved: Vec<(String, Lease)>,
    timers_set: Vec<Timer>,
    timers_clear: Vec<String>,
    outbox: Vec<OutboxMessage>,
    /// The agent this change proves alive, and its new liveness deadline.
    liveness: Option<(String, DateTime<Utc>)>,
    now: DateTime<Utc>,
}

impl Change {
    fn new(session: Session, version: u64, now: DateTime<Utc>) -> Self {
        let (waiting_before, counts_before) = if version == 0 {
            (Vec::new(), BTreeMap::new())
        } else {
            (waiting_capabilities(&session), gauge_counts(&session))
        };
        Self {
            session,
            version,
            waiting_before,
            counts_before,
            agents: BTreeMap::new(),
            changed: BTreeSet::new(),
            reserved: Vec::new(),
            released: BTreeSet::new(),
            timers_set: Vec::new(),
            timers_clear: Vec::new(),
            outbox: Vec::new(),
            liveness: None,
            now,
        }
    }

    /// Whether the change writes nothing besides the session itself.
    fn is_empty(&self) -> bool {
        self.changed.is_empty()
            && self.outbox.is_empty()
            && self.timers_set.is_empty()
            && self.timers_clear.is_empty()
    }

    /// Records that `agent_id` was heard from, when this change writes its record anyway (a
    /// result releasing its lease): the commit then refreshes its liveness, and the agent's
    /// record is written once instead of twice. An agent that is not alive is left to the
    /// registry, which brings it back online.
    fn hear_from(&mut self, agent_id: &str, liveness_timeout: chrono::Duration) {
        if !self.changed.contains(agent_id) {
            return;
        }
        if let Some((agent, _)) = self.agents.get_mut(agent_id)
            && agent.is_alive()
        {
            Arc::make_mut(agent).last_seen = self.now;
            self.liveness = Some((agent_id.to_owned(), self.now + liveness_timeout));
        }
    }

    /// The capabilities of the agents that got a slot back, each once. Every released agent
    /// was read into the change to release its lease.
    fn released_capabilities(&self) -> BTreeSet<String> {
        self.released
            .iter()
            .filter_map(|agent_id| self.agents.get(agent_id))
            .flat_map(|(agent, _)| agent.capabilities.iter().cloned())
            .collect()
    }

    /// Takes a slot of `agent_id` for the task's new lease.
    fn reserve(&mut self, agent_id: &str, task_id: &str, now: DateTime<Utc>) {
        let Some(task) = self.session.tasks.iter().find(|t| t.task_id == task_id) else {
            return;
        };
        let lease = Lease {
            session_id: self.session.session_id.clone(),
            task_id: task_id.to_owned(),
            lease_epoch: task.lease_epoch,
        };
        if let Some((agent, _)) = self.agents.get_mut(agent_id) {
            let agent = Arc::make_mut(agent);
            agent.leases.push(lease.clone());
            agent.last_assigned_at = Some(now);
            self.changed.insert(agent_id.to_owned());
            self.reserved.push((agent_id.to_owned(), lease));
        }
    }

    /// Moves this change's leases on `agent_id` onto `current`, a later record of the agent,
    /// if it can still take every one of them; otherwise leaves the change as it was.
    fn rebase(&mut self, agent_id: &str, current: Versioned<Agent>) -> bool {
        let Versioned {
            version,
            value: mut agent,
        } = current;
        for (_, lease) in self.reserved.iter().filter(|(id, _)| id == agent_id) {
            let Some(task) = self
                .session
                .tasks
                .iter()
                .find(|t| t.task_id == lease.task_id)
            else {
                return false;
            };
            let candidates = [candidate(&agent, 0)];
            if choose_agent(&candidates, &task.capability, Some(agent_id), 0).is_err() {
                return false;
            }
            agent.leases.push(lease.clone());
            agent.last_assigned_at = Some(self.now);
        }
        self.agents
            .insert(agent_id.to_owned(), (Arc::new(agent), version));
        true
    }

    /// Turns the engine's effects into records to write and messages to publish.
    async fn absorb<R: Repository>(
        &mut self,
        repository: &R,
        effects: Vec<Effect>,
    ) -> Result<(), RepositoryError> {
        let trace = self.session.traceparent.clone();
        let outbox_before = self.outbox.len();
        for effect in effects {
            match effect {
                Effect::Dispatch {
                    agent_id,
                    assignment,
                } => {
                    let ready_at = self
                        .session
                        .tasks
                        .iter()
                        .find(|task| task.task_id == assignment.task_id)
                        .and_then(|task| task.ready_at);
                    if let Some(waited) = ready_at.and_then(|at| (self.now - at).to_std().ok()) {
                        metrics::histogram!("opscore_dispatch_latency_seconds")
                            .record(waited.as_secs_f64());
                    }
                    self.outbox.push(dispatch_message(
                        &agent_id,
                        assignment.message_id(),
                        "opscore.task.assigned.v1",
                        &assignment,
                        self.now,
                    ));
                }
                Effect::Cancel(cancellation) => {
                    self.outbox.push(dispatch_message(
                        &cancellation.agent_id,
                        cancellation.message_id(),
                        "opscore.task.cancelled.v1",
                        &cancellation,
                        self.now,
                    ));
                }
                Effect::ReleaseLease(release) => {
                    if !self.agents.contains_key(&release.agent_id)
                        && let Some(Versioned { version, value }) =
                            repository.load_for_change(&release.agent_id).await?
                    {
                        self.agents
                            .insert(release.agent_id.clone(), (Arc::new(value), version));
                    }
                    if let Some((agent, _)) = self.agents.get_mut(&release.agent_id) {
                        Arc::make_mut(agent).leases.retain(|lease| {
                            !(lease.task_id == release.task_id
                                && lease.lease_epoch == release.lease_epoch)
                        });
                        self.changed.insert(release.agent_id.clone());
                        self.released.insert(release.agent_id);
                    }
                }
                Effect::Timer(timer) => self.timers_set.push(timer),
                Effect::Status(event) => {
                    let id = format!("session:{}:{}", event.session_id, event.seq);
                    let kind = serde_json::to_value(event.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    let subject = subjects::session_status(&event.session_id)
                        .unwrap_or_else(|_| "opscore.status.session.invalid".to_owned());
                    track_task_metrics(&kind);
                    if kind.starts_with("session.") && self.session.status.is_ended() {
                        let lasted = (self.now - self.session.start_time)
                            .to_std()
                            .unwrap_or_default();
                        metrics::histogram!("opscore_session_duration_seconds")
                            .record(lasted.as_secs_f64());
                    }
                    self.outbox.push(OutboxMessage::cloudevent(
                        id,
                        subject,
                        &format!("opscore.{kind}.v1"),
                        self.now,
                        &event,
                    ));
                }
                Effect::DeadLetter(letter) => {
                    let reason = letter.reason.as_str();
                    let subject = subjects::dlq(reason)
                        .unwrap_or_else(|_| "opscore.dlq.retries_exhausted".to_owned());
                    metrics::counter!("opscore_tasks_dead_lettered_total", "reason" => reason)
                        .increment(1);
                    self.outbox.push(OutboxMessage::cloudevent(
                        letter.message_id(),
                        subject,
                        "opscore.task.dead_lettered.v1",
                        self.now,
                        &letter,
                    ));
                }
            }
        }
        for message in &mut self.outbox[outbox_before..] {
            message.continue_trace(trace.as_deref());
        }
        Ok(())
    }

    async fn commit<R: Repository>(
        &self,
        repository: &R,
        event: Option<(&str, &str)>,
        idempotency_key: Option<&str>,
    ) -> Result<SessionCommitOutcome, RepositoryError> {
        let waiting_after = waiting_capabilities(&self.session);
        let waiting_leave = self
            .waiting_before
            .iter()
            .filter(|c| !waiting_after.contains(c))
            .cloned()
            .collect();
        let waiting_join = waiting_after
            .iter()
            .filter(|c| !self.waiting_before.contains(c))
            .cloned()
            .collect();
        let agents = self
            .changed
            .iter()
            .filter_map(|id| self.agents.get(id))
            .map(|(agent, version)| (agent.as_ref(), *version))
            .collect();
        repository
            .commit_session(SessionCommit {
                session: &self.session,
                expected_version: self.version,
                agents,
                event,
                liveness: self
                    .liveness
                    .as_ref()
                    .map(|(agent_id, deadline)| (agent_id.as_str(), *deadline)),
                idempotency_key,
                waiting_leave,
                waiting_join,
                timers_set: self.timers_set.clone(),
                timers_clear: self.timers_clear.clone(),
                outbox: &self.outbox,
                counters: counter_moves(&self.counts_before, &gauge_counts(&self.session)),
                check_waiting: self.released_capabilities().into_iter().collect(),
                now: self.now,
            })
            .await
    }
}

/// Which of the least recently assigned agents a placement takes ([`choose_agent`]): fixed
/// for one task and attempt, different across the tasks placed at once (and across the retries
/// of one placement), so that concurrent placements spread over several agent records instead
/// of all conflicting on the same one.
fn spread(session_id: &str, task_id: &str, attempt: usize) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (session_id, task_id).hash(&mut hasher);
    hasher.finish().wrapping_add(attempt as u64)
}

/// The session's contribution to the counters behind the gauges: sessions by status, and its
/// waiting tasks by the reason they wait.
fn gauge_counts(session: &Session) -> BTreeMap<String, i64> {
    let mut counts = BTreeMap::from([(format!("sessions:{}", session.status.as_str()), 1)]);
    if session.status.is_ended() {
        return counts;
    }
    for task in &session.tasks {
        let reason = match &task.pending {
            Some(PendingReason::NoCapableAgent) => "no_capable_agent",
            Some(PendingReason::AllCapableAgentsBusy) => "all_capable_agents_busy",
            Some(PendingReason::Backoff { .. }) => "backoff",
            Some(PendingReason::WaitingOn { .. }) => "waiting_on",
            None => continue,
        };
        if !task.is_finished() && !task.is_leased() {
            *counts.entry(format!("tasks:pending:{reason}")).or_default() += 1;
        }
    }
    counts
}

fn track_task_metrics(kind: &str) {
    let counter = match kind {
        "task.completed" => "opscore_tasks_completed_total",
        "task.failed" => "opscore_tasks_failed_total",
        "task.retrying" => "opscore_tasks_retried_total",
        "session.completed" | "session.failed" => "opscore_sessions_ended_total",
        _ => return,
    };
    metrics::counter!(counter).increment(1);
}

fn dispatch_message(
    agent_id: &str,
    id: String,
    event_type: &str,
    data: &impl serde::Serialize,
    now: DateTime<Utc>,
) -> OutboxMessage {
    // Agent ids were validated as tokens when the agent registered.
    let subject = subjects::dispatch(agent_id)
        .unwrap_or_else(|_| format!("opscore.dispatch.invalid-{}", json!(agent_id)));
    OutboxMessage::cloudevent(id, subject, event_type, now, data)
}

/// Counts one placement attempt that read the candidates, by how it ended.
fn count_placement(outcome: &'static str) {
    metrics::counter!("opscore_placements_total", "outcome" => outcome).increment(1);
}

/// The capabilities among `capabilities` that none of `agents` can take a task of now.
fn saturated(
    agents: &BTreeMap<String, (Arc<Agent>, u64)>,
    capabilities: &BTreeSet<String>,
) -> BTreeSet<String> {
    let candidates: Vec<Candidate> = agents
        .values()
        .map(|(agent, _)| candidate(agent, 0))
        .collect();
    capabilities
        .iter()
        .filter(|capability| choose_agent(&candidates, capability, None, 0).is_err())
        .cloned()
        .collect()
}

/// The scheduler's view of `agent`, with `claimed` more of its slots counted as taken.
fn candidate(agent: &Agent, claimed: u32) -> Candidate<'_> {
    let leases = u32::try_from(agent.leases.len()).unwrap_or(u32::MAX);
    Candidate {
        agent_id: &agent.agent_id,
        capabilities: &agent.capabilities,
        alive: agent.is_alive(),
        state: agent.state.as_str(),
        deregistered: agent.deregistered,
        max_concurrent_tasks: agent.max_concurrent_tasks,
        leases_held: leases.saturating_add(claimed),
        last_assigned_at: agent.last_assigned_at,
    }
}

/// The session a task belongs to. Task ids are `{sessionId}-{taskDefinitionId}` and session
/// ids are hyphenated UUIDs, 36 characters long.
pub fn session_of_task(task_id: &str) -> Option<&str> {
    const UUID_LEN: usize = 36;
    let session = task_id.get(..UUID_LEN)?;
    let separator = task_id.get(UUID_LEN..=UUID_LEN)?;
    (separator == "-" && uuid::Uuid::parse_str(session).is_ok()).then_some(session)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(max_concurrent_tasks: u32, leases: &[&str]) -> Agent {
        let leases: Vec<Value> = leases
            .iter()
            .map(|task| json!({"sessionId": "other", "taskId": task, "leaseEpoch": 1}))
            .collect();
        serde_json::from_value(json!({
            "agentId": "a", "agentName": "a", "version": "1", "capabilities": ["x"],
            "metadata": {}, "details": {}, "maxConcurrentTasks": max_concurrent_tasks,
            "state": "idle", "stateTimestamp": "2026-01-01T00:00:00Z",
            "registeredAt": "2026-01-01T00:00:00Z", "lastSeen": "2026-01-01T00:00:00Z",
            "deregistered": false, "seq": 0, "staleEvents": 0, "leases": leases
        }))
        .expect("an agent record")
    }

    /// A change that reserved a slot of agent `a`, read at version 5 with no leases.
    fn reserved_on_a() -> (Change, String) {
        let definition: WorkflowDefinition = serde_json::from_value(json!({
            "id": "w", "name": "w", "version": "1",
            "tasks": [{"taskId": "t", "name": "t", "agentCapability": "x", "dependsOn": []}]
        }))
        .expect("a definition");
        let now = Utc::now();
        let (session, _) = Session::start(
            definition,
            "01890a5d-ac96-774b-bcce-b302099a8057",
            json!({}),
            None,
            Map::new(),
            now,
        )
        .expect("a session");
        let task_id = session.tasks[0].task_id.clone();
        let mut change = Change::new(session, 1, now);
        change
            .agents
            .insert("a".to_owned(), (Arc::new(agent(2, &[])), 5));
        change.reserve("a", &task_id, now);
        (change, task_id)
    }

    #[test]
    fn a_reservation_moves_onto_a_later_record_with_room_for_it() {
        let (mut change, task_id) = reserved_on_a();
        let later = Versioned {
            version: 6,
            value: agent(2, &["elsewhere"]),
        };
        assert!(change.rebase("a", later));
        let (record, version) = &change.agents["a"];
        let tasks: Vec<&str> = record.leases.iter().map(|l| l.task_id.as_str()).collect();
        assert_eq!((*version, tasks), (6, vec!["elsewhere", task_id.as_str()]));
        assert_eq!(record.last_assigned_at, Some(change.now));
    }

    #[test]
    fn a_reservation_stays_where_the_later_record_has_no_room() {
        let (mut change, task_id) = reserved_on_a();
        let full = Versioned {
            version: 6,
            value: agent(2, &["one", "two"]),
        };
        assert!(!change.rebase("a", full));
        let (record, version) = &change.agents["a"];
        let tasks: Vec<&str> = record.leases.iter().map(|l| l.task_id.as_str()).collect();
        assert_eq!((*version, tasks), (5, vec![task_id.as_str()]), "untouched");
    }

    #[test]
    fn task_ids_lead_back_to_their_session() {
        let session = "01890a5d-ac96-774b-bcce-b302099a8057";
        assert_eq!(session_of_task(&format!("{session}-step_1")), Some(session));
        assert_eq!(session_of_task("short-step"), None);
        assert_eq!(session_of_task(&format!("{session}xstep")), None);
    }
}
