//! Applying agent commands: load, decide with the pure rules, compare-and-set, publish.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;
use tracing::debug;

use super::gates::Gates;
use crate::bus::Publisher;
use crate::model::Agent;
use crate::outbox::OutboxMessage;
use crate::registry::{self, AgentCommand, Applied, TransitionKind};
use crate::repository::{AgentCommit, CommitOutcome, Repository, RepositoryError, counter_moves};

/// Compare-and-set attempts before the work is handed back for a later retry. Conflicts only
/// happen when several workers change one agent at the same moment.
const MAX_CAS_ATTEMPTS: usize = 16;

/// How a command ended once storage answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandOutcome {
    /// `available`: the agent's capabilities when the change made it able to take tasks
    /// (registered, reported idle or active, came back online) and a session waits for one
    /// of them, so that its tasks are placed; `None` otherwise.
    Applied {
        available: Option<Vec<String>>,
    },
    Stale,
    /// The event id was applied before; nothing changed.
    Duplicate,
    /// The agent has no record and the command needs one.
    NotRegistered,
    /// Other writers kept winning the compare-and-set; try again later.
    Contended,
}

/// The agent's contribution to the `agents:<state>` counters behind the agents-by-state gauge;
/// deregistered agents count apart.
fn gauge_counts(agent: &Agent) -> BTreeMap<String, i64> {
    let bucket = if agent.deregistered {
        "deregistered"
    } else {
        agent.state.as_str()
    };
    BTreeMap::from([(format!("agents:{bucket}"), 1)])
}

/// The agent registry as the worker uses it.
#[derive(Debug, Clone)]
pub struct Agents<R> {
    repository: R,
    publisher: Publisher,
    liveness_timeout: chrono::Duration,
    /// Agent records this process's changes are writing, shared with the workflow side.
    gates: Arc<Gates>,
}

impl<R: Repository> Agents<R> {
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
            gates,
        }
    }

    pub fn repository(&self) -> &R {
        &self.repository
    }

    /// Applies `command` to the agent, recording `event_id` with the change so the same
    /// event is never applied twice, then publishes the resulting status events.
    pub async fn execute(
        &self,
        agent_id: &str,
        event_id: Option<&str>,
        command: AgentCommand,
        trace: Option<&str>,
    ) -> Result<CommandOutcome, RepositoryError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            // A placement or a result of this process does not write the record between this
            // read and the commit.
            let passage = self.gates.pass([agent_id]).await;
            let current = self.repository.load_for_change(agent_id).await?;
            let (version, agent) = match &current {
                Some(record) => (record.version, Some(&record.value)),
                None => (0, None),
            };
            let now = Utc::now();
            let change =
                match registry::apply(agent_id, agent, command.clone(), now, self.liveness_timeout)
                {
                    Ok(change) => change,
                    Err(registry::NotRegistered(_)) => return Ok(CommandOutcome::NotRegistered),
                };
            let messages: Vec<OutboxMessage> = change
                .transitions
                .iter()
                .map(|transition| {
                    let mut message = transition.to_message();
                    message.continue_trace(trace);
                    message
                })
                .collect();
            let previous_capabilities = agent.map_or(&[][..], |a| a.capabilities.as_slice());
            // An agent that can now take tasks looks, with its commit, for sessions waiting
            // for its capabilities; a worker places them after the commit.
            let available = change.agent.is_alive()
                && change.agent.state.accepts_tasks()
                && change.transitions.iter().any(|t| {
                    matches!(
                        t.kind,
                        TransitionKind::Registered
                            | TransitionKind::StateChanged
                            | TransitionKind::Online
                    )
                });
            let check_waiting = if available {
                change.agent.capabilities.as_slice()
            } else {
                &[]
            };
            let counters = counter_moves(
                &agent.map(gauge_counts).unwrap_or_default(),
                &gauge_counts(&change.agent),
            );

            let outcome = self
                .repository
                .commit(AgentCommit {
                    agent: &change.agent,
                    expected_version: version,
                    previous_capabilities,
                    event_id,
                    history: change.history.as_ref(),
                    liveness_deadline: change.liveness_deadline,
                    outbox: &messages,
                    counters: &counters,
                    check_waiting,
                    now,
                })
                .await?;
            drop(passage);
            match outcome {
                CommitOutcome::Committed { waiting, .. } => {
                    crate::faults::crash_point("after_commit");
                    self.flush(&messages).await;
                    crate::faults::crash_point("after_publish");
                    let available = (available && waiting).then_some(change.agent.capabilities);
                    return Ok(match change.applied {
                        Applied::Applied => CommandOutcome::Applied { available },
                        Applied::Stale => CommandOutcome::Stale,
                    });
                }
                CommitOutcome::Duplicate => return Ok(CommandOutcome::Duplicate),
                CommitOutcome::Conflict => debug!(agent_id, "version conflict; reloading"),
            }
        }
        Ok(CommandOutcome::Contended)
    }

    /// Publishes committed messages; see [`Publisher::flush`].
    pub async fn flush(&self, messages: &[OutboxMessage]) {
        self.publisher.flush(&self.repository, messages).await;
    }
}
