//! One step of the worker: handle one inbound message and say what to do with it.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use tracing::{debug, warn};

use super::agents::{Agents, CommandOutcome};
use super::sessions::{Report, SessionOutcome, Sessions};
use crate::bus::Publisher;
use crate::dlq::DeadLetter;
use crate::envelope::{DeadLetterReason, Envelope, Limits, Rejected};
use crate::model::{
    AgentState, Deregistration, Heartbeat, Registration, StateReport, TaskProgress, TaskResult,
    TaskResultStatus,
};
use crate::registry::AgentCommand;
use crate::repository::Repository;
use crate::subjects::{self, AgentEventKind, SubjectError};

/// An inbound message as the handler sees it, independent of the consumer that fetched it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subject: String,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
    /// Its sequence in `OPSCORE_EVENTS`.
    pub stream_seq: u64,
    /// How many times it has been delivered, this time included.
    pub delivered: u64,
}

/// What became of a message, and so what to tell JetStream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied and committed: ack.
    Applied,
    /// Older than the applied state, or a task report naming a lease that is not current;
    /// recorded and counted: ack.
    Stale,
    /// Applied before: ack.
    Duplicate,
    /// Copied to the dead-letter stream: terminate.
    DeadLettered(DeadLetterReason),
    /// Cannot be applied now: nak with this delay.
    Retry(Duration),
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Stale => "stale",
            Self::Duplicate => "duplicate",
            Self::DeadLettered(_) => "dead_lettered",
            Self::Retry(_) => "retry",
        }
    }
}

/// Handler settings taken from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct HandlerOptions {
    pub limits: Limits,
    pub retry_delay: Duration,
    pub unknown_agent_retries: u64,
    pub unknown_agent_retry_delay: Duration,
}

impl HandlerOptions {
    pub fn new(worker: &crate::config::WorkerSettings) -> Self {
        Self {
            limits: Limits {
                max_bytes: worker.max_message_bytes,
                max_depth: worker.max_json_depth,
            },
            retry_delay: Duration::from_millis(worker.retry_delay_ms),
            unknown_agent_retries: worker.unknown_agent_retries,
            unknown_agent_retry_delay: Duration::from_millis(worker.unknown_agent_retry_delay_ms),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Handler<R> {
    agents: Agents<R>,
    sessions: Sessions<R>,
    publisher: Publisher,
    options: HandlerOptions,
}

/// A validated inbound event.
#[derive(Debug, Clone)]
enum Event {
    Agent(AgentCommand),
    Task { task_id: String, report: Report },
}

impl<R: Repository> Handler<R> {
    pub fn new(
        agents: Agents<R>,
        sessions: Sessions<R>,
        publisher: Publisher,
        options: HandlerOptions,
    ) -> Self {
        Self {
            agents,
            sessions,
            publisher,
            options,
        }
    }

    /// Handles one message: decode, validate, apply, and dead-letter what can never apply.
    pub async fn handle(&self, delivery: &Delivery) -> Outcome {
        let started = Instant::now();
        let outcome = match self.apply(delivery).await {
            Ok(outcome) => outcome,
            Err(rejected) => self.dead_letter(delivery, &rejected).await,
        };
        metrics::counter!("opscore_events_total", "outcome" => outcome.label()).increment(1);
        metrics::histogram!("opscore_handler_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        outcome
    }

    async fn apply(&self, delivery: &Delivery) -> Result<Outcome, Rejected> {
        let (agent_id, kind) = subjects::parse_agent_event(&delivery.subject).map_err(|e| {
            let reason = match e {
                SubjectError::InvalidAgentId { .. } => DeadLetterReason::InvalidToken,
                SubjectError::NotAgentEvent(_) | SubjectError::UnknownEvent(_) => {
                    DeadLetterReason::UnknownEvent
                }
            };
            Rejected::new(reason, e.to_string())
        })?;
        let msg_id = delivery
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str());
        let envelope = Envelope::decode(
            &delivery.payload,
            msg_id,
            delivery.stream_seq,
            self.options.limits,
        )?;
        let event_id = envelope.event_id.as_str();
        let trace = delivery
            .headers
            .as_ref()
            .and_then(|headers| headers.get(crate::trace::HEADER))
            .and_then(|value| crate::trace::parse(value.as_str()));
        if let Some(trace_id) = trace.and_then(crate::trace::trace_id) {
            tracing::Span::current().record("trace_id", trace_id);
        }
        let outcome = match event(agent_id, kind, &envelope)? {
            Event::Agent(command) => {
                let legacy = match &command {
                    AgentCommand::State { state, details, .. } => {
                        let details = serde_json::Value::Object(details.clone());
                        crate::workflow::legacy_report(state.as_str(), &details)
                    }
                    _ => None,
                };
                let result = self
                    .agents
                    .execute(agent_id, Some(event_id), command, trace)
                    .await;
                let outcome = self.agent_outcome(agent_id, delivery, result).await?;
                // Agents of the original service report task progress as states naming the
                // task; the state is applied above, its meaning for the task here, under a
                // derived event id so that each is deduplicated on its own. A duplicate state
                // is a redelivery whose task half may not have happened (a crash or a storage
                // failure in between), so the task half runs again; its own id keeps it once.
                if let (Outcome::Applied | Outcome::Duplicate, Some((task_id, report))) =
                    (outcome, legacy)
                {
                    crate::faults::crash_point("before_legacy_task");
                    let task_event = format!("{event_id}#task");
                    // The state's own commit refreshed the agent's liveness already.
                    let result = self
                        .sessions
                        .report(
                            agent_id,
                            &task_event,
                            &task_id,
                            Report::Legacy(report),
                            false,
                        )
                        .await
                        .map(|reported| reported.outcome);
                    // The state itself is applied; a task it names that belongs to no session
                    // only makes the report meaningless for tasks, not undeliverable.
                    match self.task_outcome(&task_id, result) {
                        Ok(Outcome::Retry(delay)) => return Ok(Outcome::Retry(delay)),
                        // The redelivery of a state applied before did apply its task half.
                        Ok(Outcome::Applied) => return Ok(Outcome::Applied),
                        Ok(_) => {}
                        Err(rejected) => {
                            metrics::counter!("opscore_task_reports_rejected_total").increment(1);
                            debug!(task_id, error = %rejected.message, "legacy report names no task");
                        }
                    }
                }
                outcome
            }
            Event::Task { task_id, report } => {
                let from_agent = delivery
                    .headers
                    .as_ref()
                    .is_none_or(|h| h.get(subjects::REPORTED_BY_HEADER).is_none());
                let result = self
                    .sessions
                    .report(agent_id, event_id, &task_id, report, from_agent)
                    .await;
                let agent_seen = result.as_ref().is_ok_and(|reported| reported.agent_seen);
                let outcome =
                    self.task_outcome(&task_id, result.map(|reported| reported.outcome))?;
                if from_agent && !agent_seen && outcome != Outcome::Retry(self.options.retry_delay)
                {
                    // Any report proves the agent alive; a result usually refreshed it with
                    // its own commit. A failure here only delays liveness.
                    if let Err(error) = self
                        .agents
                        .execute(agent_id, None, AgentCommand::Seen, trace)
                        .await
                    {
                        debug!(%error, agent_id, "liveness refresh failed");
                    }
                }
                outcome
            }
        };
        Ok(outcome)
    }

    async fn agent_outcome(
        &self,
        agent_id: &str,
        delivery: &Delivery,
        result: Result<CommandOutcome, crate::repository::RepositoryError>,
    ) -> Result<Outcome, Rejected> {
        Ok(match result {
            Ok(CommandOutcome::Applied { available }) => {
                if let Some(capabilities) = available {
                    self.sessions.agent_available(&capabilities).await;
                }
                Outcome::Applied
            }
            Ok(CommandOutcome::Stale) => Outcome::Stale,
            Ok(CommandOutcome::Duplicate) => Outcome::Duplicate,
            Ok(CommandOutcome::Contended) => Outcome::Retry(self.options.retry_delay),
            Ok(CommandOutcome::NotRegistered) => {
                // The registration may still be in flight (another worker, a reordered
                // publish), so wait a little before giving up on the agent.
                if delivery.delivered <= self.options.unknown_agent_retries {
                    Outcome::Retry(self.options.unknown_agent_retry_delay)
                } else {
                    return Err(Rejected::new(
                        DeadLetterReason::UnknownAgent,
                        format!(
                            "agent {agent_id} is not registered after {} deliveries",
                            delivery.delivered
                        ),
                    ));
                }
            }
            Err(error) => self.storage_error(&error),
        })
    }

    fn task_outcome(
        &self,
        task_id: &str,
        result: Result<SessionOutcome, crate::repository::RepositoryError>,
    ) -> Result<Outcome, Rejected> {
        Ok(match result {
            Ok(SessionOutcome::Applied) => Outcome::Applied,
            Ok(SessionOutcome::Duplicate) => Outcome::Duplicate,
            Ok(SessionOutcome::Rejected(rejection)) => {
                // A zombie agent's late report, a repeated one, or a report from an agent
                // that does not hold the lease: counted, never applied.
                metrics::counter!("opscore_task_reports_rejected_total").increment(1);
                debug!(task_id, %rejection, "task report rejected");
                Outcome::Stale
            }
            Ok(SessionOutcome::NotFound) => {
                return Err(Rejected::new(
                    DeadLetterReason::UnknownTask,
                    format!("task {task_id} belongs to no session"),
                ));
            }
            Ok(SessionOutcome::Contended) => Outcome::Retry(self.options.retry_delay),
            Err(error) => self.storage_error(&error),
        })
    }

    fn storage_error(&self, error: &crate::repository::RepositoryError) -> Outcome {
        metrics::counter!("opscore_storage_errors_total").increment(1);
        debug!(%error, "storage unavailable; message will be redelivered");
        Outcome::Retry(self.options.retry_delay)
    }

    async fn dead_letter(&self, delivery: &Delivery, rejected: &Rejected) -> Outcome {
        let letter = DeadLetter {
            subject: &delivery.subject,
            headers: delivery.headers.as_ref(),
            payload: &delivery.payload,
            stream_seq: delivery.stream_seq,
            rejected,
        };
        match letter.publish(&self.publisher).await {
            Ok(()) => {
                metrics::counter!("opscore_events_dead_lettered_total", "reason" => rejected.reason.as_str())
                    .increment(1);
                warn!(
                    subject = %delivery.subject,
                    stream_seq = delivery.stream_seq,
                    reason = %rejected.reason,
                    error = %rejected.message,
                    "message dead-lettered"
                );
                Outcome::DeadLettered(rejected.reason)
            }
            Err(error) => {
                warn!(%error, stream_seq = delivery.stream_seq, "dead-letter publish failed; will retry");
                Outcome::Retry(self.options.retry_delay)
            }
        }
    }
}

/// Validates the payload of one kind of event and turns it into a command.
fn event(agent_id: &str, kind: AgentEventKind, envelope: &Envelope) -> Result<Event, Rejected> {
    let command = match kind {
        AgentEventKind::Register => {
            let registration: Registration = envelope.parse()?;
            same_agent(agent_id, &registration.agent_id)?;
            if registration.max_concurrent_tasks == 0 {
                return Err(schema("maxConcurrentTasks must be at least 1"));
            }
            if registration
                .capabilities
                .iter()
                .any(|c| c.is_empty() || c.len() > 128)
            {
                return Err(schema("capabilities must be 1 to 128 characters long"));
            }
            AgentCommand::Register(registration)
        }
        AgentEventKind::Deregister => {
            let deregistration: Deregistration = envelope.parse()?;
            same_agent(agent_id, &deregistration.agent_id)?;
            AgentCommand::Deregister(deregistration)
        }
        AgentEventKind::State => {
            let report: StateReport = envelope.parse()?;
            same_agent(agent_id, &report.agent_id)?;
            let state: AgentState = report
                .state
                .parse()
                .map_err(|e: crate::model::UnknownState| schema(e.to_string()))?;
            if !state.is_reportable() {
                return Err(schema(format!("state {state} is set by opscore only")));
            }
            AgentCommand::State {
                state,
                timestamp: report.timestamp,
                details: report.details.unwrap_or_default(),
            }
        }
        AgentEventKind::Heartbeat => {
            let heartbeat: Heartbeat = envelope.parse()?;
            same_agent(agent_id, &heartbeat.agent_id)?;
            AgentCommand::Seen
        }
        AgentEventKind::TaskProgress => {
            let progress: TaskProgress = envelope.parse()?;
            return Ok(Event::Task {
                report: Report::Progress {
                    lease_epoch: progress.lease_epoch,
                },
                task_id: task_id(progress.task_id)?,
            });
        }
        AgentEventKind::TaskResult => {
            let result: TaskResult = envelope.parse()?;
            let outcome = match result.status {
                TaskResultStatus::Completed => crate::workflow::TaskOutcome::Completed {
                    output: result.output.unwrap_or(serde_json::Value::Null),
                },
                TaskResultStatus::Failed => {
                    let error = result
                        .error
                        .ok_or_else(|| schema("a failed result needs an error"))?;
                    crate::workflow::TaskOutcome::Failed {
                        message: error.message,
                        retryable: error.retryable,
                    }
                }
            };
            return Ok(Event::Task {
                report: Report::Result {
                    lease_epoch: result.lease_epoch,
                    outcome,
                },
                task_id: task_id(result.task_id)?,
            });
        }
    };
    Ok(Event::Agent(command))
}

fn task_id(id: String) -> Result<String, Rejected> {
    subjects::token(&id)
        .map_err(|e| Rejected::new(DeadLetterReason::InvalidToken, format!("taskId: {e}")))?;
    Ok(id)
}

fn schema(message: impl Into<String>) -> Rejected {
    Rejected::new(DeadLetterReason::Schema, message)
}

/// The subject names the agent; a payload naming another one is refused as a spoof.
fn same_agent(subject_agent: &str, payload_agent: &str) -> Result<(), Rejected> {
    subjects::token(payload_agent)
        .map_err(|e| Rejected::new(DeadLetterReason::InvalidToken, format!("agentId: {e}")))?;
    if payload_agent != subject_agent {
        return Err(Rejected::new(
            DeadLetterReason::Spoofed,
            format!("payload agentId {payload_agent} differs from subject agent {subject_agent}"),
        ));
    }
    Ok(())
}
