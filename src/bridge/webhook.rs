//! `POST /v1/opscore/internal/agent/notify`: AgentKit tells opscore that an agent registered
//! or went away. The notification is relayed as the agent's own `register` or `deregister`
//! event, and the answer waits (briefly) until the worker has applied it, so that a client
//! reading the agent right after the 200 finds it, as it did with the original service.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tracing::debug;

use super::agents::KnownAgent;
use super::http::{AppState, HttpError, body_bytes, parse_json};
use crate::subjects::{self, AgentEventKind};

/// How long the answer waits for the worker to apply a notification. Past it the answer is
/// still 200: JetStream holds the event and the worker applies it when it can.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// The longest capability name the worker accepts.
const MAX_CAPABILITY_LEN: usize = 128;

#[derive(Debug, Deserialize)]
pub(crate) struct Notification {
    event_type: String,
    agent_details: AgentDetails,
}

/// `agent_details`. Every field is optional at this level because what is required depends
/// on the event type; `registrationTime` and other extra fields AgentKit sends are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AgentDetails {
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    agent_name: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    contact_endpoint: Option<String>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    #[serde(default)]
    max_concurrent_tasks: Option<u32>,
    /// Why the agent deregisters, for a DEREGISTER.
    #[serde(default)]
    reason: Option<String>,
}

/// Verifies the signature when a secret is configured (401), parses (422), and relays a
/// REGISTER or DEREGISTER (any case; anything else is a 400).
pub(crate) async fn notify(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), HttpError> {
    // The signature covers the raw bytes, so it is checked before anything is parsed.
    let body = body_bytes(body)?;
    if let Some(secret) = &app.webhook_secret {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        secret
            .verify(
                header("x-agentkit-timestamp"),
                header("x-agentkit-signature"),
                &body,
                chrono::Utc::now(),
            )
            .map_err(|e| HttpError::Unauthorized(e.to_string()))?;
    }
    let notification: Notification = parse_json(&body)?;

    let event_type = notification.event_type.to_ascii_uppercase();
    if !matches!(event_type.as_str(), "REGISTER" | "DEREGISTER") {
        return Err(HttpError::BadRequest(format!(
            "Unknown event type: {}",
            notification.event_type
        )));
    }
    let details = notification.agent_details;
    let agent_id = match details.agent_id.as_deref() {
        Some(id) if !id.is_empty() => id.to_owned(),
        _ => {
            return Err(HttpError::BadRequest(format!(
                "Missing agentId in agent_details for {event_type} event."
            )));
        }
    };
    subjects::token(&agent_id)
        .map_err(|e| HttpError::invalid(&["body", "agent_details", "agentId"], e.to_string()))?;

    let message = if event_type == "REGISTER" {
        register(&app, &agent_id, details).await?
    } else {
        deregister(&app, &agent_id, details).await?
    };
    Ok((
        StatusCode::OK,
        Json(json!({ "status": "success", "message": message })),
    ))
}

async fn register(
    app: &AppState,
    agent_id: &str,
    details: AgentDetails,
) -> Result<String, HttpError> {
    let registration = registration(agent_id, details)?;
    let contact_endpoint = registration["contactEndpoint"].as_str().map(str::to_owned);
    let applied = relay_and_wait(
        app,
        agent_id,
        AgentEventKind::Register,
        &registration,
        "registered",
    )
    .await?;
    app.agents.insert(agent_id, KnownAgent { contact_endpoint });
    Ok(if applied {
        format!("Agent {agent_id} registered successfully.")
    } else {
        format!("Agent {agent_id} registration accepted.")
    })
}

async fn deregister(
    app: &AppState,
    agent_id: &str,
    details: AgentDetails,
) -> Result<String, HttpError> {
    // An unknown agent would only be retried by the worker and dead-lettered.
    if app.agents.lookup(&app.api, agent_id).await?.is_none() {
        return Err(HttpError::NotFound(format!(
            "agent {agent_id} is not registered"
        )));
    }
    let event = json!({ "agentId": agent_id, "reason": details.reason });
    let applied = relay_and_wait(
        app,
        agent_id,
        AgentEventKind::Deregister,
        &event,
        "deregistered",
    )
    .await?;
    app.agents.forget(agent_id);
    Ok(if applied {
        format!("Agent {agent_id} deregistered.")
    } else {
        format!("Agent {agent_id} deregistration accepted.")
    })
}

/// Maps `agent_details` to the payload of `opscore.agent.<agentId>.register`, refusing what
/// the worker would refuse.
fn registration(agent_id: &str, details: AgentDetails) -> Result<Value, HttpError> {
    let required = |value: Option<String>, field: &str| {
        value.ok_or_else(|| HttpError::invalid(&["body", "agent_details", field], "field required"))
    };
    let agent_name = required(details.agent_name, "agentName")?;
    let version = required(details.version, "version")?;
    let capabilities = details.capabilities.unwrap_or_default();
    if capabilities
        .iter()
        .any(|c| c.is_empty() || c.len() > MAX_CAPABILITY_LEN)
    {
        return Err(HttpError::invalid(
            &["body", "agent_details", "capabilities"],
            format!("capabilities must be 1 to {MAX_CAPABILITY_LEN} characters long"),
        ));
    }
    if let Some(endpoint) = &details.contact_endpoint {
        let valid =
            reqwest::Url::parse(endpoint).is_ok_and(|url| matches!(url.scheme(), "http" | "https"));
        if !valid {
            return Err(HttpError::invalid(
                &["body", "agent_details", "contactEndpoint"],
                "must be an http:// or https:// url",
            ));
        }
    }
    let max_concurrent_tasks = details.max_concurrent_tasks.unwrap_or(1);
    if max_concurrent_tasks == 0 {
        return Err(HttpError::invalid(
            &["body", "agent_details", "maxConcurrentTasks"],
            "must be at least 1",
        ));
    }
    Ok(json!({
        "agentId": agent_id,
        "agentName": agent_name,
        "version": version,
        "capabilities": capabilities,
        "contactEndpoint": details.contact_endpoint,
        "metadata": details.metadata.unwrap_or_default(),
        "maxConcurrentTasks": max_concurrent_tasks,
    }))
}

/// Publishes `event` and waits up to [`APPLY_WAIT`] for the agent status event of
/// `transition` that the worker publishes once it has applied it. Returns whether it came.
async fn relay_and_wait(
    app: &AppState,
    agent_id: &str,
    kind: AgentEventKind,
    event: &Value,
    transition: &str,
) -> Result<bool, HttpError> {
    // Subscribing first, on the connection that then publishes, orders the subscription
    // before the event at the server, so the status event cannot slip past unseen.
    let subscription = match subjects::agent_status(agent_id) {
        Ok(subject) => app.client.subscribe(subject).await.ok(),
        Err(_) => None,
    };
    app.publish_event(agent_id, kind, event).await?;
    let Some(mut subscription) = subscription else {
        return Ok(false);
    };
    let seen = async {
        while let Some(message) = subscription.next().await {
            let status: Value = serde_json::from_slice(&message.payload).unwrap_or_default();
            if status["data"]["kind"] == transition {
                return true;
            }
        }
        false
    };
    let applied = tokio::time::timeout(APPLY_WAIT, seen)
        .await
        .unwrap_or(false);
    if !applied {
        debug!(
            agent_id,
            transition, "not applied within the wait; answering anyway"
        );
    }
    Ok(applied)
}
