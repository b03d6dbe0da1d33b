//! `dlq.list` and `dlq.replay`: the operator's view of `OPSCORE_DLQ`.
//!
//! Two kinds of dead letter live there: inbound messages that could never be applied (their
//! payload as it was, the facts in `Opscore-*` headers) and tasks that failed for good (a
//! CloudEvent of type `opscore.task.dead_lettered.v1`). Replaying the first publishes the
//! original message again; replaying the second starts a new session of the same workflow
//! definition with the same input.

use async_nats::HeaderMap;
use async_nats::jetstream::message::StreamMessage;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ApiError, ApiState};
use crate::bus::DLQ_STREAM;
use crate::dlq;
use crate::repository::Repository;
use crate::worker::{Trigger, TriggerError};

const DEFAULT_LIMIT: u64 = 50;
const MAX_LIMIT: u64 = 1000;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct DlqList {
    limit: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DlqReplay {
    /// The dead letter's sequence in `OPSCORE_DLQ`, the `id` of `dlq.list`.
    id: u64,
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|value| value.as_str().to_owned())
}

/// A dead letter as `dlq.list` shows it.
fn entry(message: &StreamMessage) -> Value {
    let headers: Map<String, Value> = message
        .headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            let value = values.first().map(|v| v.as_str()).unwrap_or_default();
            (name.to_owned(), Value::from(value))
        })
        .collect();
    let reason = message
        .subject
        .strip_prefix("opscore.dlq.")
        .unwrap_or(&message.subject);
    let payload = String::from_utf8_lossy(&message.payload);
    let task: Option<Value> = serde_json::from_str::<Value>(&payload)
        .ok()
        .filter(|v| v["type"] == "opscore.task.dead_lettered.v1")
        .map(|v| v["data"].clone());
    json!({
        "id": message.sequence,
        "subject": message.subject.as_str(),
        "reason": reason,
        "error": header(&message.headers, dlq::ERROR)
            .or_else(|| task.as_ref().and_then(|t| t["error"]["message"].as_str().map(str::to_owned))),
        "originalSubject": header(&message.headers, dlq::ORIGINAL_SUBJECT),
        "task": task,
        "headers": headers,
        "payload": payload,
        "time": message.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

impl<R: Repository> ApiState<R> {
    async fn dlq_message(&self, sequence: u64) -> Result<Option<StreamMessage>, ApiError> {
        let stream = self
            .publisher
            .jetstream()
            .get_stream(DLQ_STREAM)
            .await
            .map_err(|e| ApiError::internal(format!("dlq stream: {e}")))?;
        match stream.get_raw_message(sequence).await {
            Ok(message) => Ok(Some(message)),
            Err(error)
                if matches!(
                    error.kind(),
                    async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound
                ) =>
            {
                Ok(None)
            }
            Err(error) => Err(ApiError::internal(format!(
                "dlq message {sequence}: {error}"
            ))),
        }
    }

    pub(super) async fn dlq_list(&self, request: DlqList) -> Result<Value, ApiError> {
        let limit = request.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::bad_request(format!(
                "limit must be from 1 to {MAX_LIMIT}"
            )));
        }
        let stream = self
            .publisher
            .jetstream()
            .get_stream(DLQ_STREAM)
            .await
            .map_err(|e| ApiError::internal(format!("dlq stream: {e}")))?;
        let state = stream
            .get_info()
            .await
            .map_err(|e| ApiError::internal(format!("dlq stream: {e}")))?
            .state;

        // Newest first; sequences removed by age or by hand are skipped.
        let mut entries = Vec::new();
        let mut sequence = state.last_sequence;
        while sequence >= state.first_sequence.max(1) && (entries.len() as u64) < limit {
            if let Some(message) = self.dlq_message(sequence).await? {
                entries.push(entry(&message));
            }
            sequence -= 1;
        }
        Ok(json!({ "entries": entries }))
    }

    pub(super) async fn dlq_replay(
        &self,
        request: DlqReplay,
        traceparent: Option<&str>,
    ) -> Result<Value, ApiError> {
        let message = self
            .dlq_message(request.id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no dead letter {}", request.id)))?;

        if let Some(subject) = header(&message.headers, dlq::ORIGINAL_SUBJECT) {
            // The original headers, without the facts the dead-lettering added. A fresh
            // message id keeps two replays of one letter from both landing.
            let mut headers = HeaderMap::new();
            for (name, values) in message.headers.iter() {
                let name: &str = name.as_ref();
                if name.starts_with("Opscore-") || name.eq_ignore_ascii_case("Nats-Msg-Id") {
                    continue;
                }
                for value in values {
                    headers.append(name, value.as_str());
                }
            }
            if let Some(original_id) = header(&message.headers, dlq::ORIGINAL_MSG_ID) {
                headers.insert("Opscore-Original-Msg-Id", original_id.as_str());
            }
            headers.insert("Opscore-Replay-Of", request.id.to_string().as_str());
            headers.insert("Nats-Msg-Id", format!("replay:{}", request.id).as_str());
            self.publisher
                .publish(subject.clone(), headers, message.payload.clone())
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?;
            return Ok(json!({ "replayed": true, "subject": subject }));
        }

        let event: Value = serde_json::from_slice(&message.payload).map_err(|_| {
            ApiError::bad_request(format!("dead letter {} cannot be replayed", request.id))
        })?;
        let session_id = event["data"]["sessionId"].as_str().ok_or_else(|| {
            ApiError::bad_request(format!("dead letter {} names no session", request.id))
        })?;
        let session = self
            .repository
            .load_session(session_id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("session {session_id} no longer exists")))?
            .value;
        let mut metadata = session.metadata.clone();
        metadata.insert(
            "replayOf".to_owned(),
            json!({"sessionId": session_id, "taskId": event["data"]["taskId"], "deadLetter": request.id}),
        );
        let trigger = Trigger {
            definition: session.definition,
            input: session.input,
            agent_id: session.agent_id,
            // Replaying one letter twice returns the session the first replay started.
            idempotency_key: Some(format!("dlq-replay-{}", request.id)),
            metadata,
            traceparent: traceparent.map(str::to_owned),
        };
        let triggered = self.sessions.trigger(trigger).await.map_err(|e| match e {
            TriggerError::UnknownAgent(_) | TriggerError::UnknownWorkflow(_) => {
                ApiError::not_found(e.to_string())
            }
            other => ApiError::internal(other.to_string()),
        })?;
        Ok(json!({ "replayed": true, "sessionId": triggered.session_id }))
    }
}
