//! The control API: the NATS micro service `opscore`, request-reply on `opscore.api.*`.
//!
//! Errors follow the micro convention (`Nats-Service-Error`, `Nats-Service-Error-Code`) and
//! also carry a JSON body `{"error":{"code","message"}}`. async-nats counts an error in
//! `$SRV.STATS` only when the reply has no body, so opscore counts errors itself and reports
//! them in each endpoint's `data`.

mod agents;
mod dlq;
mod workflows;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::service::{self, Service, ServiceExt};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use crate::bus::Publisher;
use crate::config::Settings;
use crate::repository::{Repository, RepositoryError};
use crate::subjects;
use crate::worker::Sessions;

/// Requests one endpoint handles at once.
const CONCURRENCY: usize = 32;
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// A refused request, as the requester sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {message}")]
pub struct ApiError {
    pub code: u16,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            code: 400,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: 404,
            message: message.into(),
        }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            code: 409,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            code: 500,
            message: message.into(),
        }
    }
}

impl From<RepositoryError> for ApiError {
    fn from(error: RepositoryError) -> Self {
        Self::internal(error.to_string())
    }
}

/// The endpoints, as `(resource, verb)`.
const ENDPOINTS: &[(&str, &str)] = &[
    ("agent", "get"),
    ("agent", "list"),
    ("workflow", "define"),
    ("workflow", "get"),
    ("workflow", "list"),
    ("workflow", "trigger"),
    ("session", "get"),
    ("session", "list"),
    ("session", "cancel"),
    ("dlq", "list"),
    ("dlq", "replay"),
];

/// A started micro service with its endpoint subscriptions, ready to [`ApiService::serve`].
pub struct ApiService<R> {
    service: Service,
    endpoints: Vec<(String, service::endpoint::Endpoint)>,
    state: Arc<ApiState<R>>,
}

impl<R> std::fmt::Debug for ApiService<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiService")
            .field("endpoints", &self.endpoints.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct ApiState<R> {
    repository: R,
    sessions: Sessions<R>,
    publisher: Publisher,
    history_length: usize,
    errors: Arc<Mutex<HashMap<String, u64>>>,
}

/// Registers the service and its endpoints with NATS.
pub async fn start<R: Repository>(
    client: &async_nats::Client,
    sessions: Sessions<R>,
    publisher: Publisher,
    settings: &Settings,
    admin_address: Option<std::net::SocketAddr>,
) -> Result<ApiService<R>, async_nats::Error> {
    let errors: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let stats_errors = errors.clone();
    let service = client
        .service_builder()
        .description("opscore control API: agents, workflows, sessions, dead letters")
        .metadata(
            admin_address
                .map(|address| HashMap::from([("admin".to_owned(), address.to_string())]))
                .unwrap_or_default(),
        )
        .stats_handler(move |endpoint, _stats| {
            let errors = stats_errors
                .lock()
                .map(|errors| errors.get(&endpoint).copied().unwrap_or(0))
                .unwrap_or(0);
            json!({ "errors": errors })
        })
        .start("opscore", env!("CARGO_PKG_VERSION"))
        .await?;

    let mut endpoints = Vec::new();
    for (resource, verb) in ENDPOINTS {
        let name = format!("{resource}-{verb}");
        let endpoint = service
            .endpoint_builder()
            .name(&name)
            .add(subjects::api(resource, verb))
            .await?;
        endpoints.push((name, endpoint));
    }
    Ok(ApiService {
        service,
        endpoints,
        state: Arc::new(ApiState {
            repository: sessions.repository().clone(),
            sessions,
            publisher,
            history_length: settings.agents.history_length,
            errors,
        }),
    })
}

impl<R: Repository> ApiService<R> {
    /// Answers requests until `shutdown`, then stops the service.
    pub async fn serve(self, shutdown: CancellationToken) {
        let mut tasks = JoinSet::new();
        for (name, endpoint) in self.endpoints {
            let state = self.state.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                let requests = endpoint.take_until(shutdown.cancelled_owned());
                requests
                    .for_each_concurrent(CONCURRENCY, |request| {
                        let state = state.clone();
                        let name = name.clone();
                        async move { state.answer(&name, request).await }
                    })
                    .await;
            });
        }
        while tasks.join_next().await.is_some() {}
        if let Err(error) = self.service.stop().await {
            debug!(%error, "stopping the micro service");
        }
    }
}

impl<R: Repository> ApiState<R> {
    async fn answer(&self, endpoint: &str, request: service::Request) {
        let traceparent = request
            .message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(crate::trace::HEADER))
            .and_then(|value| crate::trace::parse(value.as_str()));
        let span = tracing::info_span!("request", endpoint);
        if let Some(traceparent) = traceparent {
            crate::telemetry::set_remote_parent(&span, traceparent);
        }
        let result = self
            .route(endpoint, &request.message.payload, traceparent)
            .instrument(span)
            .await;
        let (payload, headers) = match result {
            Ok(value) => (Bytes::from(value.to_string()), HeaderMap::new()),
            Err(error) => {
                if let Ok(mut errors) = self.errors.lock() {
                    *errors.entry(endpoint.to_owned()).or_default() += 1;
                }
                if error.code >= 500 {
                    warn!(endpoint, code = error.code, error = %error.message, "api request failed");
                }
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Service-Error", error.message.as_str());
                headers.insert("Nats-Service-Error-Code", error.code.to_string().as_str());
                let body = json!({"error": {"code": error.code, "message": error.message}});
                (Bytes::from(body.to_string()), headers)
            }
        };
        if let Err(error) = request.respond_with_headers(Ok(payload), headers).await {
            debug!(%error, endpoint, "reply not sent");
        }
    }

    async fn route(
        &self,
        endpoint: &str,
        payload: &[u8],
        traceparent: Option<&str>,
    ) -> Result<Value, ApiError> {
        match endpoint {
            "agent-get" => self.agent_get(parse(payload)?).await,
            "agent-list" => self.agent_list(parse(payload)?).await,
            "workflow-define" => self.workflow_define(parse(payload)?).await,
            "workflow-get" => self.workflow_get(parse(payload)?).await,
            "workflow-list" => self.workflow_list().await,
            "workflow-trigger" => self.workflow_trigger(parse(payload)?, traceparent).await,
            "session-get" => self.session_get(parse(payload)?).await,
            "session-list" => self.session_list(parse(payload)?).await,
            "session-cancel" => self.session_cancel(parse(payload)?).await,
            "dlq-list" => self.dlq_list(parse(payload)?).await,
            "dlq-replay" => self.dlq_replay(parse(payload)?, traceparent).await,
            _ => Err(ApiError::not_found(format!("no endpoint {endpoint}"))),
        }
    }
}

/// Parses a request body; an empty body is an empty object.
fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, ApiError> {
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        payload
    };
    serde_json::from_slice(payload).map_err(|e| ApiError::bad_request(format!("request: {e}")))
}

pub(crate) fn checked_id<'a>(field: &str, id: &'a str) -> Result<&'a str, ApiError> {
    subjects::token(id).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
}

pub(crate) fn limit(requested: Option<usize>) -> Result<usize, ApiError> {
    match requested {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::bad_request(format!(
            "limit must be from 1 to {MAX_LIMIT}"
        ))),
    }
}

pub(crate) fn to_value<T: Serialize>(value: &T) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::internal(e.to_string()))
}

/// A request-reply client of the control API, as the CLI and tests use it.
#[derive(Debug, Clone)]
pub struct ApiClient {
    client: async_nats::Client,
}

impl ApiClient {
    pub fn new(client: async_nats::Client) -> Self {
        Self { client }
    }

    /// Sends `request` to `opscore.api.<resource>.<verb>` and returns the reply body, or the
    /// service's error.
    pub async fn call(
        &self,
        resource: &str,
        verb: &str,
        request: &Value,
    ) -> Result<Value, ApiError> {
        let subject = Subject::from(subjects::api(resource, verb));
        let reply = self
            .client
            .request(subject, request.to_string().into())
            .await
            .map_err(|e| ApiError::internal(format!("request failed: {e}")))?;
        let body: Value = serde_json::from_slice(&reply.payload)
            .map_err(|e| ApiError::internal(format!("reply is not JSON: {e}")))?;
        let code = reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .and_then(|code| code.as_str().parse::<u16>().ok());
        match code {
            Some(code) => Err(ApiError {
                code,
                message: body["error"]["message"]
                    .as_str()
                    .unwrap_or("no message")
                    .to_owned(),
            }),
            None => Ok(body),
        }
    }
}
