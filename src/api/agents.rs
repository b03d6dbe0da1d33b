//! `agent.get` and `agent.list`.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{ApiError, ApiState, checked_id, limit, to_value};
use crate::model::{Agent, AgentState, HistoryEntry};
use crate::repository::{AgentFilter, Repository};

impl<R: Repository> ApiState<R> {
    pub(super) async fn agent_get(&self, request: AgentGet) -> Result<Value, ApiError> {
        let agent_id = checked_id("agentId", &request.agent_id)?;
        let record =
            self.repository.load(agent_id).await?.ok_or_else(|| {
                ApiError::not_found(format!("agent {agent_id} is not registered"))
            })?;
        let history = self
            .repository
            .history(agent_id, self.history_length)
            .await?;
        to_value(&AgentView {
            alive: record.value.is_alive(),
            agent: &record.value,
            history,
        })
    }

    pub(super) async fn agent_list(&self, request: AgentList) -> Result<Value, ApiError> {
        let state = request
            .state
            .as_deref()
            .map(str::parse::<AgentState>)
            .transpose()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let cursor = request
            .cursor
            .as_deref()
            .map(|cursor| checked_id("cursor", cursor))
            .transpose()?;
        let filter = AgentFilter {
            capability: request.capability,
            state,
        };
        let page = self
            .repository
            .list(&filter, cursor, limit(request.limit)?)
            .await?;
        Ok(json!({ "agents": page.items, "nextCursor": page.next_cursor }))
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct AgentGet {
    agent_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct AgentList {
    capability: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `agent.get`'s reply: the record, its liveness and its recent history.
#[derive(Debug, Serialize)]
struct AgentView<'a> {
    #[serde(flatten)]
    agent: &'a Agent,
    alive: bool,
    history: Vec<HistoryEntry>,
}
