//! `workflow.*` and `session.*`.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ApiError, ApiState, checked_id, limit, to_value};
use crate::repository::{DefineOutcome, Repository, SessionFilter};
use crate::worker::{SessionOutcome, Trigger, TriggerError};
use crate::workflow::{Rejection, Session, SessionStatus, WorkflowDefinition};

/// The longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WorkflowGet {
    workflow_id: String,
    #[serde(default)]
    version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WorkflowTrigger {
    #[serde(default)]
    workflow_id: Option<String>,
    #[serde(default)]
    workflow_definition: Option<Value>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    metadata: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SessionGet {
    session_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct SessionList {
    status: Option<SessionStatus>,
    workflow_id: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// A definition from a request, validated, with errors that name the task.
pub(crate) fn definition(value: Value) -> Result<WorkflowDefinition, ApiError> {
    let definition: WorkflowDefinition = serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("workflow definition: {e}")))?;
    definition
        .validate()
        .map_err(|e| ApiError::bad_request(format!("workflow {}: {e}", definition.id)))?;
    Ok(definition)
}

/// A session as listings show it: everything but the definition snapshot.
fn summary(session: &Session) -> Value {
    let mut value = serde_json::to_value(session).unwrap_or(Value::Null);
    if let Some(object) = value.as_object_mut() {
        object.remove("definition");
    }
    value
}

impl<R: Repository> ApiState<R> {
    pub(super) async fn workflow_define(&self, request: Value) -> Result<Value, ApiError> {
        let definition = definition(request)?;
        match self.repository.define(&definition).await? {
            DefineOutcome::Created | DefineOutcome::Unchanged => Ok(json!({
                "workflowId": definition.id,
                "version": definition.version,
            })),
            DefineOutcome::VersionExists => Err(ApiError::conflict(format!(
                "workflow {} version {} is already defined with other content; give it a new version",
                definition.id, definition.version
            ))),
        }
    }

    pub(super) async fn workflow_get(&self, request: WorkflowGet) -> Result<Value, ApiError> {
        let workflow_id = checked_id("workflowId", &request.workflow_id)?;
        let definition = self
            .repository
            .workflow(workflow_id, request.version.as_deref())
            .await?
            .ok_or_else(|| ApiError::not_found(format!("workflow {workflow_id} is not defined")))?;
        to_value(&definition)
    }

    pub(super) async fn workflow_list(&self) -> Result<Value, ApiError> {
        let workflows = self.repository.workflows().await?;
        Ok(json!({ "workflows": workflows }))
    }

    pub(super) async fn workflow_trigger(
        &self,
        request: WorkflowTrigger,
        traceparent: Option<&str>,
    ) -> Result<Value, ApiError> {
        let definition = match (request.workflow_id, request.workflow_definition) {
            (Some(id), None) => {
                let id = checked_id("workflowId", &id)?;
                self.repository
                    .workflow(id, None)
                    .await?
                    .ok_or_else(|| ApiError::not_found(format!("workflow {id} is not defined")))?
            }
            (None, Some(inline)) => definition(inline)?,
            _ => {
                return Err(ApiError::bad_request(
                    "give exactly one of workflowId and workflowDefinition",
                ));
            }
        };
        if request
            .idempotency_key
            .as_ref()
            .is_some_and(|key| key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY)
        {
            return Err(ApiError::bad_request(format!(
                "idempotencyKey must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
            )));
        }
        let trigger = Trigger {
            definition,
            input: request.input.unwrap_or_else(|| json!({})),
            agent_id: request.agent_id,
            idempotency_key: request.idempotency_key,
            metadata: request.metadata,
            traceparent: traceparent.map(str::to_owned),
        };
        let triggered = self.sessions.trigger(trigger).await.map_err(|e| match e {
            TriggerError::UnknownWorkflow(_) | TriggerError::UnknownAgent(_) => {
                ApiError::not_found(e.to_string())
            }
            TriggerError::Invalid(_) => ApiError::bad_request(e.to_string()),
            TriggerError::Contended => ApiError::conflict(e.to_string()),
            TriggerError::Storage(_) => ApiError::internal(e.to_string()),
        })?;
        Ok(json!({
            "sessionId": triggered.session_id,
            "workflowId": triggered.workflow_id,
            "created": triggered.created,
        }))
    }

    pub(super) async fn session_get(&self, request: SessionGet) -> Result<Value, ApiError> {
        let session_id = checked_id("sessionId", &request.session_id)?;
        let session = self
            .repository
            .load_session(session_id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("session {session_id} does not exist")))?;
        to_value(&session.value)
    }

    pub(super) async fn session_list(&self, request: SessionList) -> Result<Value, ApiError> {
        let cursor = request
            .cursor
            .as_deref()
            .map(|cursor| checked_id("cursor", cursor))
            .transpose()?;
        let filter = SessionFilter {
            status: request.status,
            workflow_id: request.workflow_id,
        };
        let page = self
            .repository
            .list_sessions(&filter, cursor, limit(request.limit)?)
            .await?;
        let sessions: Vec<Value> = page.items.iter().map(summary).collect();
        Ok(json!({ "sessions": sessions, "nextCursor": page.next_cursor }))
    }

    pub(super) async fn session_cancel(&self, request: SessionGet) -> Result<Value, ApiError> {
        let session_id = checked_id("sessionId", &request.session_id)?;
        let (outcome, session) = self.sessions.cancel(session_id).await?;
        match outcome {
            SessionOutcome::Applied => {}
            SessionOutcome::NotFound => {
                return Err(ApiError::not_found(format!(
                    "session {session_id} does not exist"
                )));
            }
            SessionOutcome::Rejected(Rejection::AlreadyEnded(status)) => {
                return Err(ApiError::conflict(format!(
                    "session {session_id} already {status}"
                )));
            }
            other => {
                return Err(ApiError::conflict(format!(
                    "session {session_id}: {other:?}"
                )));
            }
        }
        let session = session
            .ok_or_else(|| ApiError::not_found(format!("session {session_id} does not exist")))?;
        to_value(&session)
    }
}
