//! `opscore recover`: what can be rebuilt after Redis lost opscore's data.
//!
//! **The registry** comes back from `OPSCORE_EVENTS`. Every registration, deregistration,
//! state report and heartbeat the stream still holds is handled again, in stream order, by the
//! same [`Handler`] the worker runs, so the registry rules apply as they did the first time:
//! an older state report after a newer one counts as stale, an event for an agent whose
//! registration is no longer in the stream is dead lettered as `unknown_agent`. Task reports
//! are skipped: the sessions they report on are gone.
//!
//! **Sessions** cannot be rebuilt: the streams keep their transitions, not their definitions
//! and inputs. Each session whose last transition on `OPSCORE_STATUS` is not an end, and which
//! storage does not hold, is ended explicitly: a `session.failed` transition saying that
//! storage lost it, on the session's status subject, so that monitors and `session watch` see
//! it end instead of waiting forever.
//!
//! Running it against intact storage changes nothing: replayed events are duplicates, and
//! sessions storage holds are left alone. Workers may keep running meanwhile.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use chrono::Utc;
use futures::StreamExt;
use serde_json::{Value, json};
use tracing::{info, warn};

use super::{Agents, Delivery, Gates, Handler, HandlerOptions, Outcome, Sessions};
use crate::bus::{self, BusError, Publisher};
use crate::config::Settings;
use crate::outbox::OutboxMessage;
use crate::repository::{Repository, RepositoryError};
use crate::subjects::{self, AgentEventKind};

/// How long one message may take to arrive while a stream is read back.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Times an event that storage could not take now is handled again before recovery stops.
const RETRIES: u32 = 5;

/// What a recovery did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Agent events handled again, by outcome.
    pub applied: u64,
    pub stale: u64,
    pub duplicate: u64,
    pub dead_lettered: u64,
    /// Task reports in the events stream, not replayed.
    pub task_reports_skipped: u64,
    /// Sessions ended with `session.failed` because storage no longer held them.
    pub sessions_failed: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("redis: {0}")]
    Repository(#[from] RepositoryError),
    #[error("reading {stream}: {message}")]
    Read {
        stream: &'static str,
        message: String,
    },
    #[error("event {stream_seq} could not be applied: storage kept refusing it")]
    Storage { stream_seq: u64 },
    #[error("publishing the end of session {session_id}: {message}")]
    Publish { session_id: String, message: String },
}

/// Rebuilds the registry from the events stream and ends the sessions storage lost.
pub async fn recover<R: Repository>(
    settings: &Settings,
    repository: R,
) -> Result<Recovery, RecoverError> {
    let client = bus::connect(&settings.nats).await?;
    let jetstream = jetstream::new(client);
    bus::ensure_streams(&jetstream, settings).await?;
    let publisher = Publisher::new(jetstream.clone());
    let liveness = chrono::Duration::seconds(settings.agents.liveness_timeout_secs as i64);
    let gates = std::sync::Arc::new(Gates::default());
    let handler = Handler::new(
        Agents::new(
            repository.clone(),
            publisher.clone(),
            liveness,
            gates.clone(),
        ),
        Sessions::new(repository.clone(), publisher.clone(), liveness, gates),
        publisher.clone(),
        HandlerOptions::new(&settings.worker),
    );

    let mut recovery = Recovery::default();
    replay_agent_events(&jetstream, &handler, &mut recovery).await?;
    fail_lost_sessions(&jetstream, &repository, &publisher, &mut recovery).await?;
    Ok(recovery)
}

async fn replay_agent_events<R: Repository>(
    jetstream: &jetstream::Context,
    handler: &Handler<R>,
    recovery: &mut Recovery,
) -> Result<(), RecoverError> {
    let read_error = |message: String| RecoverError::Read {
        stream: bus::EVENTS_STREAM,
        message,
    };
    let stream = jetstream
        .get_stream(bus::EVENTS_STREAM)
        .await
        .map_err(|e| read_error(e.to_string()))?;
    let mut consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| read_error(e.to_string()))?;
    // What the stream holds now; events published later reach the workers as usual.
    let held = consumer
        .info()
        .await
        .map_err(|e| read_error(e.to_string()))?
        .num_pending;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| read_error(e.to_string()))?;
    for _ in 0..held {
        let message = next(&mut messages, bus::EVENTS_STREAM).await?;
        let info = message.info().map_err(|e| read_error(e.to_string()))?;
        let stream_seq = info.stream_sequence;
        let is_task_report =
            subjects::parse_agent_event(&message.subject).is_ok_and(|(_, kind)| {
                matches!(
                    kind,
                    AgentEventKind::TaskProgress | AgentEventKind::TaskResult
                )
            });
        if is_task_report {
            recovery.task_reports_skipped += 1;
        } else {
            let delivery = Delivery {
                subject: message.subject.to_string(),
                headers: message.headers.clone(),
                payload: message.payload.clone(),
                stream_seq,
                // Last delivery: an event whose agent is unknown now stays unknown.
                delivered: u64::MAX,
            };
            replay(handler, &delivery, recovery).await?;
        }
    }
    Ok(())
}

/// The next message of an ordered read of `stream`, which must come within [`READ_TIMEOUT`].
async fn next(
    messages: &mut consumer::pull::Ordered,
    stream: &'static str,
) -> Result<jetstream::Message, RecoverError> {
    let read_error = |message: String| RecoverError::Read { stream, message };
    tokio::time::timeout(READ_TIMEOUT, messages.next())
        .await
        .map_err(|_| read_error(format!("no message within {READ_TIMEOUT:?}")))?
        .ok_or_else(|| read_error("the stream ended".to_owned()))?
        .map_err(|e| read_error(e.to_string()))
}

async fn replay<R: Repository>(
    handler: &Handler<R>,
    delivery: &Delivery,
    recovery: &mut Recovery,
) -> Result<(), RecoverError> {
    for _ in 0..RETRIES {
        match handler.handle(delivery).await {
            Outcome::Applied => recovery.applied += 1,
            Outcome::Stale => recovery.stale += 1,
            Outcome::Duplicate => recovery.duplicate += 1,
            Outcome::DeadLettered(_) => recovery.dead_lettered += 1,
            Outcome::Retry(delay) => {
                tokio::time::sleep(delay).await;
                continue;
            }
        }
        return Ok(());
    }
    Err(RecoverError::Storage {
        stream_seq: delivery.stream_seq,
    })
}

async fn fail_lost_sessions<R: Repository>(
    jetstream: &jetstream::Context,
    repository: &R,
    publisher: &Publisher,
    recovery: &mut Recovery,
) -> Result<(), RecoverError> {
    let read_error = |message: String| RecoverError::Read {
        stream: bus::STATUS_STREAM,
        message,
    };
    let stream = jetstream
        .get_stream(bus::STATUS_STREAM)
        .await
        .map_err(|e| read_error(e.to_string()))?;
    // The last transition of every session the stream still holds.
    let mut consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: "opscore.status.session.>".to_owned(),
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| read_error(e.to_string()))?;
    let sessions = consumer
        .info()
        .await
        .map_err(|e| read_error(e.to_string()))?
        .num_pending;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| read_error(e.to_string()))?;
    for _ in 0..sessions {
        let message = next(&mut messages, bus::STATUS_STREAM).await?;
        let Ok(event) = serde_json::from_slice::<Value>(&message.payload) else {
            warn!(subject = %message.subject, "status message is not JSON; skipped");
            continue;
        };
        let data = &event["data"];
        let ended = matches!(
            data["kind"].as_str(),
            Some("session.completed" | "session.failed" | "session.cancelled")
        );
        let Some(session_id) = data["sessionId"].as_str() else {
            continue;
        };
        if ended || repository.load_session(session_id).await?.is_some() {
            continue;
        }
        let Ok(subject) = subjects::session_status(session_id) else {
            continue;
        };
        let seq = data["seq"].as_u64().unwrap_or(0) + 1;
        let lost = lost_session_event(session_id, subject, seq);
        if publisher
            .publish_outbox(std::slice::from_ref(&lost))
            .await
            .is_empty()
        {
            return Err(RecoverError::Publish {
                session_id: session_id.to_owned(),
                message: "JetStream did not acknowledge the transition".to_owned(),
            });
        }
        info!(session_id, "session lost with the storage: ended as failed");
        recovery.sessions_failed.push(session_id.to_owned());
    }
    Ok(())
}

/// The `session.failed` transition of a session storage lost, following its last known
/// transition (whose `seq` is one less).
fn lost_session_event(session_id: &str, subject: String, seq: u64) -> OutboxMessage {
    let now = Utc::now();
    let data = json!({
        "sessionId": session_id,
        "seq": seq,
        "kind": "session.failed",
        "status": "failed",
        "error": {
            "message": "storage lost this session: it cannot be resumed; trigger it again",
            "reason": "storage_lost",
        },
        "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
    });
    OutboxMessage::cloudevent(
        format!("session:{session_id}:{seq}"),
        subject,
        "opscore.session.failed.v1",
        now,
        &data,
    )
}
