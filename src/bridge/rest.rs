//! The bearer endpoints: agent state reports and reads, workflow triggers, and the additions
//! beyond the original service (agent list, session read and cancel).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::http::{AppState, HttpError, IdPath, parse_body, parse_time};
use crate::api::ApiError;
use crate::model::AgentState;
use crate::subjects::{self, AgentEventKind};

type Reply = Result<(StatusCode, Json<Value>), HttpError>;

/// `POST /v1/opscore/agent/{agentId}/state`, as the AgentKit SDK sends it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StateUpdate {
    agent_id: String,
    /// ISO 8601; validated here so that a bad time is a 422, not a dead letter.
    timestamp: String,
    state: String,
    #[serde(default)]
    details: Option<Map<String, Value>>,
}

/// Relays a state report once the agent is known to exist. Checks follow the original
/// service's order: schema (422), path and body disagree (400), unknown agent (404).
pub(crate) async fn post_state(
    State(app): State<Arc<AppState>>,
    IdPath(agent_id): IdPath,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    let update: StateUpdate = parse_body(body)?;
    let timestamp = parse_time(&update.timestamp).ok_or_else(|| {
        HttpError::invalid(
            &["body", "timestamp"],
            format!("{:?} is not an ISO 8601 time", update.timestamp),
        )
    })?;
    let state: AgentState = update
        .state
        .parse()
        .map_err(|e: crate::model::UnknownState| {
            HttpError::invalid(&["body", "state"], e.to_string())
        })?;
    if !state.is_reportable() {
        return Err(HttpError::invalid(
            &["body", "state"],
            format!("state {state} is set by opscore only"),
        ));
    }
    if update.agent_id != agent_id {
        return Err(HttpError::BadRequest(
            "Agent ID in path does not match agent ID in payload".to_owned(),
        ));
    }
    if app.agents.lookup(&app.api, &agent_id).await?.is_none() {
        return Err(not_registered(&agent_id));
    }

    let event = json!({
        "agentId": agent_id,
        "state": state.as_str(),
        "timestamp": timestamp,
        "details": update.details.unwrap_or_default(),
    });
    app.publish_event(&agent_id, AgentEventKind::State, &event)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"status": "success", "message": "State update accepted"})),
    ))
}

/// `GET /v1/opscore/agent/{agentId}/state`: the agent's effective state, as the worker has it.
pub(crate) async fn get_state(State(app): State<Arc<AppState>>, IdPath(agent_id): IdPath) -> Reply {
    let agent = app
        .api
        .call("agent", "get", &json!({ "agentId": agent_id }))
        .await
        .map_err(|e| match e.code {
            404 => not_registered(&agent_id),
            _ => e.into(),
        })?;
    Ok((
        StatusCode::OK,
        Json(json!({
            "agentId": agent["agentId"],
            "state": agent["state"],
            "details": agent["details"],
            "timestamp": agent["stateTimestamp"],
        })),
    ))
}

/// `POST /v1/opscore/agent/{agentId}/workflow`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WorkflowRequest {
    #[serde(default)]
    workflow_definition_id: Option<String>,
    #[serde(default)]
    workflow_definition: Option<Map<String, Value>>,
    #[serde(default)]
    initial_payload: Option<Map<String, Value>>,
}

/// Starts a session pinned to the path's agent: every task of it runs there, as in the
/// original service. An `Idempotency-Key` header makes a retried trigger return the session
/// the first one started.
pub(crate) async fn trigger_workflow(
    State(app): State<Arc<AppState>>,
    IdPath(agent_id): IdPath,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    let request: WorkflowRequest = parse_body(body)?;
    let mut trigger = match (request.workflow_definition_id, request.workflow_definition) {
        (Some(id), None) => {
            subjects::token(&id).map_err(|e| {
                HttpError::invalid(&["body", "workflowDefinitionId"], e.to_string())
            })?;
            json!({ "workflowId": id })
        }
        (None, Some(definition)) => json!({ "workflowDefinition": definition }),
        _ => {
            return Err(HttpError::invalid(
                &["body"],
                "give exactly one of workflowDefinitionId and workflowDefinition",
            ));
        }
    };
    trigger["agentId"] = json!(agent_id);
    trigger["input"] = Value::Object(request.initial_payload.unwrap_or_default());
    if let Some(key) = headers.get("idempotency-key") {
        let key = key
            .to_str()
            .map_err(|_| HttpError::invalid(&["header", "Idempotency-Key"], "must be ascii"))?;
        trigger["idempotencyKey"] = json!(key);
    }

    // The worker's 400s here are all about the request's content (an inline definition that
    // does not validate, a bad idempotency key), which FastAPI would have answered with 422.
    let triggered = app
        .api
        .call("workflow", "trigger", &trigger)
        .await
        .map_err(|e| match e.code {
            400 => HttpError::invalid(&["body"], e.message),
            _ => e.into(),
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "sessionId": triggered["sessionId"],
            "workflowId": triggered["workflowId"],
            "message": "Workflow triggered successfully",
        })),
    ))
}

/// Query of `GET /v1/opscore/agents`, passed on to `agent.list`.
#[derive(Debug, Deserialize)]
pub(crate) struct AgentsQuery {
    capability: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /v1/opscore/agents`: one page of registered agents, as `agent.list` returns it.
pub(crate) async fn list_agents(
    State(app): State<Arc<AppState>>,
    query: Result<Query<AgentsQuery>, QueryRejection>,
) -> Reply {
    let Query(query) = query.map_err(|e| HttpError::invalid(&["query"], e.body_text()))?;
    let request = json!({
        "capability": query.capability,
        "state": query.state,
        "limit": query.limit,
        "cursor": query.cursor,
    });
    let page = app
        .api
        .call("agent", "list", &request)
        .await
        .map_err(query_error)?;
    Ok((StatusCode::OK, Json(page)))
}

/// `GET /v1/opscore/sessions/{sessionId}`: the session with its tasks.
pub(crate) async fn get_session(
    State(app): State<Arc<AppState>>,
    IdPath(session_id): IdPath,
) -> Reply {
    let session = app
        .api
        .call("session", "get", &json!({ "sessionId": session_id }))
        .await?;
    Ok((StatusCode::OK, Json(session)))
}

/// `POST /v1/opscore/sessions/{sessionId}/cancel`: 200 with the cancelled session, 409 when
/// it had already ended.
pub(crate) async fn cancel_session(
    State(app): State<Arc<AppState>>,
    IdPath(session_id): IdPath,
) -> Reply {
    let session = app
        .api
        .call("session", "cancel", &json!({ "sessionId": session_id }))
        .await?;
    Ok((StatusCode::OK, Json(session)))
}

fn not_registered(agent_id: &str) -> HttpError {
    HttpError::NotFound(format!("agent {agent_id} is not registered"))
}

/// A listing's 400 is about its query parameters: a 422 in FastAPI's terms.
fn query_error(error: ApiError) -> HttpError {
    match error.code {
        400 => HttpError::invalid(&["query"], error.message),
        _ => error.into(),
    }
}
