//! Delivery of one assignment to an HTTP agent through AgentKit.
//!
//! An assignment for an agent registered with a `contactEndpoint` is posted to
//! `{agentkit_url}/v1/agents/{agentId}/run`; AgentKit answers 202 once it has accepted it. A
//! failed post is retried with exponential backoff, and when the attempts are exhausted the
//! bridge publishes a failed result for that attempt on the agent's `task.result` subject, so
//! the engine retries the task or fails it: an assignment is never dropped silently. The
//! message is acknowledged only after the post succeeded or the failure report was stored by
//! JetStream.
//!
//! Acknowledged without a post: cancellations (AgentKit has no endpoint to stop a task; the
//! engine has already released the lease, and a late state report from the agent is refused),
//! assignments for agents without a `contactEndpoint` (they take their work from NATS),
//! assignments for agents the registry does not know, and assignments whose lease deadline has
//! passed (the engine has reassigned the task already).

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, field, info_span, warn};

use super::agents::{AgentCache, KnownAgent};
use crate::api::ApiClient;
use crate::bus::Publisher;
use crate::config::BridgeSettings;
use crate::subjects::{self, AgentEventKind};
use crate::workflow::Assignment;

/// The longest wait between two attempts. A backoff step plus one request stays below the
/// consumer's ack wait, since each retry sends a progress acknowledgement.
const MAX_DELAY: Duration = Duration::from_secs(15);
/// How long one post to AgentKit may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Redelivery delay when the worker cannot say who the agent is, or JetStream refused the
/// failure report.
const RETRY_LATER: Duration = Duration::from_secs(1);

/// What became of one dispatch message, and so what to tell JetStream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// AgentKit accepted the assignment: ack.
    Delivered,
    /// Undeliverable; the failed attempt was reported to the engine: ack.
    ReportedFailed,
    /// Nothing to deliver (see the module documentation): ack.
    Skipped(&'static str),
    /// Not a dispatch message opscore writes: terminate.
    Malformed,
    /// Cannot be decided now: nak with this delay.
    Retry(Duration),
    /// Shutdown came during the backoff: nak, for another bridge or the next start.
    Interrupted,
}

/// A dispatch message as the worker writes it: a CloudEvents envelope.
#[derive(Debug, Deserialize)]
struct DispatchEvent {
    #[serde(rename = "type")]
    kind: String,
    data: Value,
}

/// Why the posts of one assignment ended without acceptance.
enum Undelivered {
    Failed(String),
    Interrupted,
}

/// Posts assignments to AgentKit.
#[derive(Debug)]
pub(crate) struct Deliverer {
    api: ApiClient,
    publisher: Publisher,
    agents: Arc<AgentCache>,
    http: reqwest::Client,
    /// `bridge.agentkit_url` without a trailing `/`.
    agentkit_url: String,
    attempts: u32,
    initial_delay: Duration,
}

impl Deliverer {
    pub(crate) fn new(
        api: ApiClient,
        publisher: Publisher,
        agents: Arc<AgentCache>,
        settings: &BridgeSettings,
    ) -> Result<Arc<Self>, reqwest::Error> {
        super::use_ring_provider();
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("opscore-bridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Arc::new(Self {
            api,
            publisher,
            agents,
            http,
            agentkit_url: settings.agentkit_url.trim_end_matches('/').to_owned(),
            attempts: settings.delivery_attempts.max(1),
            initial_delay: Duration::from_millis(settings.delivery_initial_delay_ms),
        }))
    }

    /// Handles one dispatch message and acknowledges it according to the outcome.
    pub(crate) async fn process(&self, message: jetstream::Message, shutdown: &CancellationToken) {
        let span = info_span!(
            "assignment",
            subject = %message.subject,
            task_id = field::Empty,
            attempt = field::Empty,
        );
        let outcome = self.handle(&message, shutdown).instrument(span).await;
        let label = match outcome {
            Outcome::Delivered => "delivered",
            Outcome::ReportedFailed => "reported_failed",
            Outcome::Skipped(_) => "skipped",
            Outcome::Malformed => "malformed",
            Outcome::Retry(_) => "retry",
            Outcome::Interrupted => "interrupted",
        };
        metrics::counter!("opscore_bridge_dispatch_total", "outcome" => label).increment(1);
        debug!(subject = %message.subject, ?outcome, "dispatch message handled");
        let ack = match outcome {
            Outcome::Delivered | Outcome::ReportedFailed | Outcome::Skipped(_) => AckKind::Ack,
            Outcome::Malformed => AckKind::Term,
            Outcome::Retry(delay) => AckKind::Nak(Some(delay)),
            Outcome::Interrupted => AckKind::Nak(None),
        };
        if let Err(error) = message.ack_with(ack).await {
            // Redelivered after the ack wait: for a delivered assignment AgentKit then sees
            // it twice, which `opscore_task_id` lets an agent recognise.
            debug!(%error, subject = %message.subject, "acknowledgement failed");
        }
    }

    /// Decides what to do with one dispatch message, posting it if it is for an HTTP agent.
    pub(crate) async fn handle(
        &self,
        message: &jetstream::Message,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let agent_id = match message.subject.strip_prefix("opscore.dispatch.") {
            Some(id) if subjects::is_valid_token(id) => id,
            _ => return malformed(message, "not a dispatch subject"),
        };
        let event: DispatchEvent = match serde_json::from_slice(&message.payload) {
            Ok(event) => event,
            Err(_) => return malformed(message, "not a cloudevent"),
        };
        match event.kind.as_str() {
            "opscore.task.assigned.v1" => {}
            "opscore.task.cancelled.v1" => return Outcome::Skipped("cancellation"),
            _ => return malformed(message, "unknown event type"),
        }
        let Ok(assignment) = serde_json::from_value::<Assignment>(event.data) else {
            return malformed(message, "not an assignment");
        };
        let span = Span::current();
        span.record("task_id", assignment.task_id.as_str());
        span.record("attempt", assignment.attempt);
        if assignment.deadline <= Utc::now() {
            return Outcome::Skipped("lease expired");
        }

        match self.agents.lookup(&self.api, agent_id).await {
            Ok(Some(KnownAgent {
                contact_endpoint: Some(_),
            })) => {}
            Ok(Some(_)) => return Outcome::Skipped("not an http agent"),
            Ok(None) => return Outcome::Skipped("unknown agent"),
            Err(error) => {
                debug!(%error, agent_id, "agent lookup failed; will retry");
                return Outcome::Retry(RETRY_LATER);
            }
        }

        let request = run_request(&assignment);
        match self
            .post_with_retries(message, agent_id, &request, shutdown)
            .await
        {
            Ok(()) => Outcome::Delivered,
            Err(Undelivered::Interrupted) => Outcome::Interrupted,
            Err(Undelivered::Failed(reason)) => {
                self.report_failure(agent_id, &assignment, &reason).await
            }
        }
    }

    async fn post_with_retries(
        &self,
        message: &jetstream::Message,
        agent_id: &str,
        request: &Value,
        shutdown: &CancellationToken,
    ) -> Result<(), Undelivered> {
        let url = format!("{}/v1/agents/{agent_id}/run", self.agentkit_url);
        let mut delay = self.initial_delay;
        for attempt in 1..=self.attempts {
            if attempt > 1 {
                // Tells JetStream the message is still being worked on, so that no other
                // bridge receives it during the backoff.
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    debug!(%error, "progress acknowledgement failed");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Err(Undelivered::Interrupted),
                    () = tokio::time::sleep(delay) => {}
                }
                delay = delay.saturating_mul(2).min(MAX_DELAY);
            }
            match self.post(&url, request).await {
                Ok(()) => return Ok(()),
                Err(Post::Permanent(reason)) => return Err(Undelivered::Failed(reason)),
                Err(Post::Transient(reason)) if attempt == self.attempts => {
                    return Err(Undelivered::Failed(format!(
                        "{reason} ({attempt} attempts)"
                    )));
                }
                Err(Post::Transient(reason)) => {
                    debug!(
                        agent_id,
                        delivery_attempt = attempt,
                        error = %reason,
                        "delivery failed"
                    );
                }
            }
        }
        Err(Undelivered::Failed(
            "no delivery attempt configured".to_owned(),
        ))
    }

    async fn post(&self, url: &str, request: &Value) -> Result<(), Post> {
        let response = self
            .http
            .post(url)
            .json(request)
            .send()
            .await
            .map_err(|e| Post::Transient(format!("agentkit unreachable: {e}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let reason = format!("agentkit answered {status}");
        // Another client error would be the same the next time; a timeout or a rate limit
        // may not be.
        let transient = !status.is_client_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
        Err(if transient {
            Post::Transient(reason)
        } else {
            Post::Permanent(reason)
        })
    }

    /// Publishes a failed, retryable result for the assignment's attempt, as the agent would.
    /// Its `Nats-Msg-Id` makes a repeated report of one attempt a duplicate.
    async fn report_failure(
        &self,
        agent_id: &str,
        assignment: &Assignment,
        reason: &str,
    ) -> Outcome {
        warn!(
            agent_id,
            error = %reason,
            "assignment undeliverable; reporting the attempt as failed"
        );
        let Ok(subject) = subjects::agent_event(agent_id, AgentEventKind::TaskResult) else {
            return Outcome::Malformed;
        };
        let result = json!({
            "taskId": assignment.task_id,
            "leaseEpoch": assignment.lease_epoch,
            "status": "failed",
            "error": {"message": format!("agentkit delivery failed: {reason}"), "retryable": true},
        });
        let mut headers = HeaderMap::new();
        let msg_id = format!(
            "{}:{}:undeliverable",
            assignment.task_id, assignment.lease_epoch
        );
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        headers.insert("Content-Type", "application/json");
        // The report is the bridge's, not a sign of life from the agent.
        headers.insert(crate::subjects::REPORTED_BY_HEADER, "bridge");
        match self
            .publisher
            .publish(subject, headers, result.to_string().into())
            .await
        {
            Ok(()) => Outcome::ReportedFailed,
            Err(error) => {
                warn!(%error, "failure report not stored; the assignment will be retried");
                Outcome::Retry(RETRY_LATER)
            }
        }
    }
}

/// Why one post failed: worth another attempt or not.
enum Post {
    Transient(String),
    Permanent(String),
}

fn malformed(message: &jetstream::Message, why: &'static str) -> Outcome {
    warn!(subject = %message.subject, reason = why, "dispatch message not understood; terminated");
    Outcome::Malformed
}

/// The body of AgentKit's `run` request. The correlation ids are top-level, where AgentKit
/// keeps them and passes them to the agent; `payload` holds what the agent works with.
fn run_request(assignment: &Assignment) -> Value {
    json!({
        "senderId": "opscore",
        "messageType": "workflow_task",
        "payload": {
            "task_name": assignment.name,
            "task_parameters": assignment.parameters,
            "taskId": assignment.task_id,
            "sessionId": assignment.session_id,
            "workflowId": assignment.workflow_id,
            "taskDefinitionId": assignment.task_definition_id,
            "capability": assignment.capability,
            "attempt": assignment.attempt,
            "leaseEpoch": assignment.lease_epoch,
            "deadline": assignment.deadline,
            "input": assignment.input,
            "results": assignment.results,
        },
        "sessionContext": {"sessionId": assignment.session_id},
        "task_name": assignment.name,
        "opscore_session_id": assignment.session_id,
        "opscore_task_id": assignment.task_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_request_carries_the_task_and_its_correlation_ids() {
        let assignment: Assignment = serde_json::from_value(json!({
            "taskId": "s1-step_1", "sessionId": "s1", "workflowId": "w",
            "taskDefinitionId": "step_1",
            "name": "First Step", "capability": "c", "parameters": {"message": "hi"},
            "input": {"n": 1}, "results": {}, "attempt": 2, "leaseEpoch": 3,
            "deadline": "2026-01-01T00:00:00Z",
        }))
        .expect("an assignment");
        let request = run_request(&assignment);
        assert_eq!(request["senderId"], "opscore");
        assert_eq!(request["messageType"], "workflow_task");
        assert_eq!(request["task_name"], "First Step");
        assert_eq!(request["opscore_session_id"], "s1");
        assert_eq!(request["opscore_task_id"], "s1-step_1");
        assert_eq!(request["sessionContext"], json!({"sessionId": "s1"}));
        let payload = &request["payload"];
        assert_eq!(payload["task_name"], "First Step");
        assert_eq!(payload["task_parameters"], json!({"message": "hi"}));
        assert_eq!(payload["leaseEpoch"], 3);
        assert_eq!(payload["attempt"], 2);
        assert_eq!(payload["input"], json!({"n": 1}));
    }
}
