//! The router and what every handler shares: state, the bearer check, error bodies in the
//! original service's shape (`{"detail": ...}`), request parsing, and relaying agent events.

use std::sync::Arc;

use async_nats::HeaderMap as NatsHeaders;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::debug;

use super::agents::AgentCache;
use super::auth::{ApiKey, WebhookSecret};
use super::{rest, webhook};
use crate::api::{ApiClient, ApiError};
use crate::bus::Publisher;
use crate::envelope::{DeadLetterReason, Envelope, Limits};
use crate::subjects::{self, AgentEventKind};

/// The OpenAPI document; kept by hand beside the handlers it describes.
const OPENAPI: &str = include_str!("openapi.json");

/// What every handler reaches.
#[derive(Debug)]
pub(crate) struct AppState {
    pub(crate) api: ApiClient,
    /// The connection under `api` and `publisher`, for waiting on status events.
    pub(crate) client: async_nats::Client,
    pub(crate) publisher: Publisher,
    /// `None` when unconfigured: every bearer endpoint then answers 401.
    pub(crate) api_key: Option<ApiKey>,
    /// `None` when unconfigured: webhook notifications are accepted unsigned.
    pub(crate) webhook_secret: Option<WebhookSecret>,
    pub(crate) agents: Arc<AgentCache>,
    /// The worker's inbound limits, checked here so that an oversized or overly deep event
    /// is refused to the caller instead of dead-lettered after a 202.
    pub(crate) limits: Limits,
}

/// Builds the router. Bodies are capped at twice the worker's message limit, since a webhook
/// wraps the event it carries; the event itself is checked against the limit exactly.
pub(crate) fn router(state: Arc<AppState>, max_message_bytes: usize) -> Router {
    let bearer = Router::new()
        .route(
            "/v1/opscore/agent/{agentId}/state",
            get(rest::get_state).post(rest::post_state),
        )
        .route(
            "/v1/opscore/agent/{agentId}/workflow",
            post(rest::trigger_workflow),
        )
        .route("/v1/opscore/agents", get(rest::list_agents))
        .route("/v1/opscore/sessions/{sessionId}", get(rest::get_session))
        .route(
            "/v1/opscore/sessions/{sessionId}/cancel",
            post(rest::cancel_session),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/v1/opscore/internal/agent/notify", post(webhook::notify))
        .merge(bearer)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_message_bytes.saturating_mul(2)))
        .with_state(state)
}

/// A refused request. The texts of the original service are kept where its clients may
/// show them; the rest follow opscore's lowercase style.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    /// A body or parameter that does not fit the schema (FastAPI's 422), at `loc`.
    #[error("{message}")]
    Unprocessable {
        loc: Vec<String>,
        kind: &'static str,
        message: String,
    },
    /// The worker or JetStream could not be reached or failed; the caller may retry.
    #[error("{0}")]
    Unavailable(String),
}

impl HttpError {
    /// A schema error at `loc` (e.g. `["body", "timestamp"]`).
    pub(crate) fn invalid(loc: &[&str], message: impl Into<String>) -> Self {
        Self::Unprocessable {
            loc: loc.iter().map(|s| (*s).to_owned()).collect(),
            kind: "value_error",
            message: message.into(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            // FastAPI's validation errors are a list of {loc, msg, type}; clients written
            // against the original service may read them that way.
            Self::Unprocessable { loc, kind, message } => {
                json!({"detail": [{"loc": loc, "msg": message, "type": kind}]})
            }
            other => json!({ "detail": other.to_string() }),
        };
        if let Self::Unavailable(message) = &self {
            metrics::counter!("opscore_bridge_upstream_errors_total").increment(1);
            debug!(error = %message, "request failed upstream");
        }
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<ApiError> for HttpError {
    fn from(error: ApiError) -> Self {
        match error.code {
            400 => Self::BadRequest(error.message),
            404 => Self::NotFound(error.message),
            409 => Self::Conflict(error.message),
            _ => Self::Unavailable(format!("opscore worker: {}", error.message)),
        }
    }
}

/// A path parameter that must be usable as a subject token; anything else is a 422 naming
/// the parameter, and never reaches NATS.
#[derive(Debug)]
pub(crate) struct IdPath(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(params) = Path::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|e| HttpError::invalid(&["path"], e.body_text()))?;
        let (name, id) = params
            .into_iter()
            .next()
            .ok_or_else(|| HttpError::invalid(&["path"], "missing path parameter"))?;
        subjects::token(&id).map_err(|e| HttpError::invalid(&["path", &name], e.to_string()))?;
        Ok(Self(id))
    }
}

/// Parses a JSON body into `T`; what does not fit is a 422, an oversized body a 413.
pub(crate) fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, HttpError> {
    parse_json(&body_bytes(body)?)
}

/// The raw body, or why it could not be read (413 when over the limit).
pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, HttpError> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => HttpError::TooLarge(rejection.body_text()),
        _ => HttpError::BadRequest(rejection.body_text()),
    })
}

/// Parses raw JSON into `T`, telling a malformed document from one of the wrong shape.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    serde_json::from_slice(body).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Data => "value_error",
            _ => "json_invalid",
        };
        HttpError::Unprocessable {
            loc: vec!["body".to_owned()],
            kind,
            message: e.to_string(),
        }
    })
}

/// An ISO 8601 time: RFC 3339, or without an offset, which is read as UTC (Python's
/// `datetime.utcnow().isoformat()` gives that form).
pub(crate) fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Some(time.to_utc());
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|naive| naive.and_utc())
}

impl AppState {
    /// Publishes an agent event on `opscore.agent.<agentId>.<kind>` and returns once
    /// JetStream has stored it. The event gets a fresh `Nats-Msg-Id`, its id for the worker.
    pub(crate) async fn publish_event(
        &self,
        agent_id: &str,
        kind: AgentEventKind,
        event: &Value,
    ) -> Result<(), HttpError> {
        let subject = subjects::agent_event(agent_id, kind)
            .map_err(|e| HttpError::invalid(&["body", "agentId"], e.to_string()))?;
        let payload = event.to_string().into_bytes();
        let msg_id = uuid::Uuid::now_v7().to_string();
        Envelope::decode(&payload, Some(&msg_id), 0, self.limits).map_err(
            |rejected| match rejected.reason {
                DeadLetterReason::TooLarge => HttpError::TooLarge(rejected.message),
                _ => HttpError::invalid(&["body"], rejected.message),
            },
        )?;

        let mut headers = NatsHeaders::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        headers.insert("Content-Type", "application/json");
        self.publisher
            .publish(subject, headers, payload.into())
            .await
            .map_err(|e| HttpError::Unavailable(e.to_string()))
    }
}

async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    match check_bearer(state.api_key.as_ref(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

fn check_bearer(key: Option<&ApiKey>, headers: &HeaderMap) -> Result<(), HttpError> {
    let Some(key) = key else {
        return Err(HttpError::Unauthorized(
            "no api key is configured on the bridge (bridge.api_key)".to_owned(),
        ));
    };
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| HttpError::Unauthorized("Authorization header missing".to_owned()))?;
    let refused = || HttpError::Unauthorized("Invalid authentication credentials".to_owned());
    let value = value.to_str().map_err(|_| refused())?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("bearer") && key.matches(token.trim()) {
        Ok(())
    } else {
        Err(refused())
    }
}

async fn health() -> axum::Json<Value> {
    axum::Json(json!({ "status": "ok" }))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn not_found() -> HttpError {
    HttpError::NotFound("Not Found".to_owned())
}

async fn method_not_allowed() -> Response {
    let body = axum::Json(json!({ "detail": "Method Not Allowed" }));
    (StatusCode::METHOD_NOT_ALLOWED, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_with_or_without_an_offset_are_read_as_utc() {
        let expected = parse_time("2026-01-01T10:00:00Z").expect("rfc 3339");
        assert_eq!(parse_time("2026-01-01T12:00:00+02:00"), Some(expected));
        assert_eq!(parse_time("2026-01-01T10:00:00"), Some(expected));
        assert!(parse_time("2026-01-01T10:00:00.123456").is_some());
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(parse_time("1700000000"), None);
    }

    #[test]
    fn the_bearer_check_wants_the_scheme_and_the_key() {
        let key = ApiKey::new("k1");
        let check = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(header::AUTHORIZATION, value.parse().expect("header"));
            }
            check_bearer(key.as_ref(), &headers).is_ok()
        };
        assert!(check(Some("Bearer k1")));
        assert!(check(Some("bearer k1")));
        assert!(!check(Some("Bearer k2")));
        assert!(!check(Some("Basic k1")));
        assert!(!check(Some("k1")));
        assert!(!check(None));
        assert!(check_bearer(None, &HeaderMap::new()).is_err());
    }

    #[test]
    fn the_openapi_document_is_json() {
        let document: Value = serde_json::from_str(OPENAPI).expect("valid json");
        assert_eq!(document["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    }
}
