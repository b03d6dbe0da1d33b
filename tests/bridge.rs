//! `opscore bridge` against a real worker, NATS and Redis, driven with a real HTTP client:
//! every status code of the Ops-Core contract, the AgentKit webhook signature, and workflows
//! run by HTTP agents through a test server that plays AgentKit.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use common::*;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const KEY: &str = "test-api-key";
const SECRET: &str = "test-webhook-secret";

fn http_client() -> reqwest::Client {
    // reqwest is built without a crypto provider; the bridge installs ring the same way.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("http client")
}

/// A bridge running inside the test process on a port it was handed.
struct Bridge {
    url: String,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Bridge {
    async fn start(settings: opscore::config::Settings, listener: TcpListener) -> Self {
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            opscore::bridge::serve(settings, listener, token)
                .await
                .expect("bridge runs");
        });
        // The listener is bound already, so this waits for the bridge to serve, not to bind.
        let health = http_client()
            .get(format!("{url}/health"))
            .send()
            .await
            .expect("bridge answers");
        assert_eq!(health.status(), 200);
        Self {
            url,
            shutdown,
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("bridge stops in time")
                .expect("bridge task");
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What the test AgentKit does with a `run` request.
#[derive(Debug, Clone, Copy)]
enum Kit {
    /// 202, then the agent reports `active` and `idle` through the bridge, unless the task's
    /// parameters say `"hold": true`.
    Work,
    /// 500, every time.
    Fail,
}

#[derive(Clone)]
struct KitState {
    behaviour: Kit,
    runs: mpsc::UnboundedSender<(String, Value)>,
    calls: Arc<AtomicUsize>,
    bridge_url: String,
}

/// A test server playing AgentKit's `POST /v1/agents/{agentId}/run`.
struct AgentKit {
    url: String,
    runs: mpsc::UnboundedReceiver<(String, Value)>,
    calls: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl AgentKit {
    async fn start(behaviour: Kit, bridge_url: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        let (sender, runs) = mpsc::unbounded_channel();
        let calls = Arc::new(AtomicUsize::new(0));
        let state = KitState {
            behaviour,
            runs: sender,
            calls: calls.clone(),
            bridge_url: bridge_url.to_owned(),
        };
        let app = axum::Router::new()
            .route("/v1/agents/{agent_id}/run", post(kit_run))
            .with_state(state);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("agentkit serves");
        });
        Self {
            url,
            runs,
            calls,
            task,
        }
    }

    /// The next `run` request, as (agent id, body).
    async fn next_run(&mut self) -> (String, Value) {
        tokio::time::timeout(WAIT, self.runs.recv())
            .await
            .expect("agentkit got a run request in time")
            .expect("agentkit open")
    }
}

impl Drop for AgentKit {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn kit_run(
    State(kit): State<KitState>,
    Path(agent_id): Path<String>,
    Json(body): Json<Value>,
) -> StatusCode {
    kit.calls.fetch_add(1, Ordering::SeqCst);
    kit.runs.send((agent_id.clone(), body.clone())).ok();
    match kit.behaviour {
        Kit::Fail => StatusCode::INTERNAL_SERVER_ERROR,
        Kit::Work => {
            if body["payload"]["task_parameters"]["hold"] != json!(true) {
                tokio::spawn(agent_works(kit.bridge_url, agent_id, body));
            }
            StatusCode::ACCEPTED
        }
    }
}

/// What an AgentKit agent does with a task: `active`, then `idle` with its output, both
/// naming the task in `details.opscore_task_id`.
async fn agent_works(bridge_url: String, agent_id: String, run: Value) {
    let http = http_client();
    let task_id = run["opscore_task_id"].clone();
    let url = format!("{bridge_url}/v1/opscore/agent/{agent_id}/state");
    let reports = [
        ("active", json!({"opscore_task_id": task_id})),
        (
            "idle",
            json!({"opscore_task_id": task_id, "answer": run["task_name"]}),
        ),
    ];
    for (state, details) in reports {
        let body = json!({"agentId": agent_id, "state": state,
            "timestamp": chrono::Utc::now().to_rfc3339(), "details": details});
        let response = http
            .post(&url)
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .expect("state report sent");
        assert_eq!(response.status(), 202, "state report {state}");
    }
}

struct Setup {
    nats: NatsServer,
    _redis: RedisServer,
    worker: InProcessWorker,
    bridge: Bridge,
    agentkit: Option<AgentKit>,
    http: reqwest::Client,
    status: Watcher,
}

/// Servers, a worker with the sample workflow, optionally a test AgentKit, and a bridge with
/// the API key `KEY`; `overrides` are `OPSCORE__...` settings on top.
async fn setup(overrides: &[(&str, &str)], kit: Option<Kit>) -> Setup {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let bridge_url = format!("http://{}", listener.local_addr().expect("bound"));
    let agentkit = match kit {
        Some(behaviour) => Some(AgentKit::start(behaviour, &bridge_url).await),
        None => None,
    };
    let directory = sample_workflows();
    let agentkit_url = agentkit.as_ref().map(|k| k.url.clone()).unwrap_or_default();
    let mut all = vec![
        ("OPSCORE__WORKFLOWS__DIRECTORY", directory.as_str()),
        ("OPSCORE__BRIDGE__API_KEY", KEY),
        ("OPSCORE__BRIDGE__AGENTKIT_URL", agentkit_url.as_str()),
    ];
    all.extend_from_slice(overrides);
    let settings = settings(&nats, Some(&redis), &all);
    let worker = InProcessWorker::start(settings.clone(), &nats).await;
    let status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let bridge = Bridge::start(settings, listener).await;
    Setup {
        nats,
        _redis: redis,
        worker,
        bridge,
        agentkit,
        http: http_client(),
        status,
    }
}

impl Setup {
    /// Sends a request with the bearer `key` (none: no Authorization header) and returns the
    /// status and the JSON body.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.bridge.url));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, Some(KEY), None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(KEY), Some(body))
            .await
    }

    /// Posts raw bytes to the webhook with the given extra headers.
    async fn notify_raw(&self, body: &[u8], headers: &[(&str, String)]) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!(
                "{}/v1/opscore/internal/agent/notify",
                self.bridge.url
            ))
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("webhook sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn notify(&self, body: Value) -> (u16, Value) {
        self.notify_raw(body.to_string().as_bytes(), &[]).await
    }

    /// Registers an agent through the webhook and reports it idle through the state endpoint.
    async fn http_agent(&self, agent_id: &str, capabilities: &[&str], contact: Option<&str>) {
        let (status, body) = self.notify(register(agent_id, capabilities, contact)).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = self
            .post(
                &format!("/v1/opscore/agent/{agent_id}/state"),
                state_report(agent_id, "idle"),
            )
            .await;
        assert_eq!(status, 202, "{body}");
    }
}

fn register(agent_id: &str, capabilities: &[&str], contact: Option<&str>) -> Value {
    json!({"event_type": "REGISTER", "agent_details": {
        "agentId": agent_id, "agentName": format!("Agent {agent_id}"), "version": "1.0",
        "capabilities": capabilities, "contactEndpoint": contact,
        "metadata": {"team": "tests"}, "registrationTime": "2026-01-01T00:00:00"}})
}

fn state_report(agent_id: &str, state: &str) -> Value {
    json!({"agentId": agent_id, "state": state, "timestamp": chrono::Utc::now().to_rfc3339(),
        "details": {"note": "from the test"}})
}

/// The hex HMAC-SHA256 AgentKit sends: over the timestamp, a `.` and the raw body.
fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn assert_validation_error(status: u16, body: &Value) {
    assert_eq!(status, 422, "{body}");
    assert!(body["detail"][0]["msg"].is_string(), "{body}");
}

#[tokio::test]
async fn health_and_the_openapi_document_need_no_key_and_cover_every_endpoint() {
    let s = setup(&[], None).await;
    let (status, body) = s.call(reqwest::Method::GET, "/health", None, None).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));

    let (status, document) = s
        .call(reqwest::Method::GET, "/openapi.json", None, None)
        .await;
    assert_eq!(status, 200);
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3."))
    );
    let mut paths: Vec<&str> = document["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "/health",
            "/openapi.json",
            "/v1/opscore/agent/{agentId}/state",
            "/v1/opscore/agent/{agentId}/workflow",
            "/v1/opscore/agents",
            "/v1/opscore/internal/agent/notify",
            "/v1/opscore/sessions/{sessionId}",
            "/v1/opscore/sessions/{sessionId}/cancel",
        ]
    );
    let state = &document["paths"]["/v1/opscore/agent/{agentId}/state"];
    assert!(state["get"]["responses"]["404"].is_object());
    assert!(state["post"]["responses"]["202"].is_object());

    let (status, body) = s.get("/v1/nothing-here").await;
    assert_eq!(status, 404);
    assert_eq!(body["detail"], "Not Found");
    s.bridge.stop().await;
    s.worker.stop().await;
}

#[tokio::test]
async fn the_webhook_registers_and_deregisters_agents() {
    let s = setup(&[], None).await;
    let (status, body) = s
        .notify(register(
            "wh-1",
            &["summarize"],
            Some("http://agent.example/a"),
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "success");
    assert_eq!(body["message"], "Agent wh-1 registered successfully.");

    // The answer came after the worker applied the registration, so it is readable at once.
    let (status, state) = s.get("/v1/opscore/agent/wh-1/state").await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["state"], "unknown");
    let agent = api(&s.nats, "agent", "get", json!({"agentId": "wh-1"}))
        .await
        .expect("registered");
    assert_eq!(agent["contactEndpoint"], "http://agent.example/a");
    assert_eq!(agent["capabilities"], json!(["summarize"]));
    assert_eq!(agent["maxConcurrentTasks"], 1);
    assert_eq!(agent["metadata"], json!({"team": "tests"}));

    let mut other = register("wh-1", &[], None);
    other["event_type"] = json!("REBOOT");
    let (status, body) = s.notify(other).await;
    assert_eq!(
        (status, body["detail"].clone()),
        (400, json!("Unknown event type: REBOOT"))
    );
    let (status, body) = s
        .notify(
            json!({"event_type": "REGISTER", "agent_details": {"agentName": "x", "version": "1"}}),
        )
        .await;
    assert_eq!(status, 400, "{body}");

    let mut wrong_type = register("wh-2", &[], None);
    wrong_type["agent_details"]["capabilities"] = json!("summarize");
    let (status, body) = s.notify(wrong_type).await;
    assert_validation_error(status, &body);
    let (status, body) = s.notify(json!({"event_type": "REGISTER"})).await;
    assert_validation_error(status, &body);
    let (status, body) = s.notify_raw(b"{not json", &[]).await;
    assert_validation_error(status, &body);
    let mut nameless = register("wh-2", &[], None);
    nameless["agent_details"]
        .as_object_mut()
        .expect("details")
        .remove("agentName");
    let (status, body) = s.notify(nameless).await;
    assert_validation_error(status, &body);
    let (status, body) = s.notify(register("wh.2", &[], None)).await;
    assert_validation_error(status, &body);

    let deregister = json!({"event_type": "deregister", "agent_details": {"agentId": "wh-1"}});
    let (status, body) = s.notify(deregister).await;
    assert_eq!(status, 200, "{body}");
    let agent = api(&s.nats, "agent", "get", json!({"agentId": "wh-1"}))
        .await
        .expect("still on record");
    assert_eq!(agent["deregistered"], true);
    let ghost = json!({"event_type": "DEREGISTER", "agent_details": {"agentId": "ghost"}});
    assert_eq!(s.notify(ghost).await.0, 404);
    s.bridge.stop().await;
    s.worker.stop().await;
}

#[tokio::test]
async fn signed_webhooks_are_verified_within_the_window() {
    let s = setup(&[("OPSCORE__BRIDGE__WEBHOOK_SECRET", SECRET)], None).await;
    let body = register("signed-1", &["x"], None).to_string().into_bytes();
    let now = chrono::Utc::now().timestamp().to_string();
    let headers = |timestamp: &str, signature: String| {
        vec![
            ("X-AgentKit-Timestamp", timestamp.to_owned()),
            ("X-AgentKit-Signature", signature),
        ]
    };

    let (status, reply) = s
        .notify_raw(&body, &headers(&now, sign(SECRET, &now, &body)))
        .await;
    assert_eq!(status, 200, "{reply}");

    let (status, reply) = s
        .notify_raw(&body, &headers(&now, sign("not-the-secret", &now, &body)))
        .await;
    assert_eq!(status, 401, "{reply}");
    assert!(reply["detail"].is_string());
    let mut tampered = body.clone();
    tampered.push(b' ');
    let (status, _) = s
        .notify_raw(&tampered, &headers(&now, sign(SECRET, &now, &body)))
        .await;
    assert_eq!(status, 401);

    let old = (chrono::Utc::now().timestamp() - 3600).to_string();
    let (status, reply) = s
        .notify_raw(&body, &headers(&old, sign(SECRET, &old, &body)))
        .await;
    assert_eq!(status, 401, "{reply}");
    let (status, _) = s.notify_raw(&body, &[]).await;
    assert_eq!(status, 401);
    s.bridge.stop().await;
    s.worker.stop().await;
}

#[tokio::test]
async fn state_reports_are_relayed_and_read_back() {
    let mut s = setup(&[], None).await;
    let (status, _) = s.notify(register("st-1", &["x"], None)).await;
    assert_eq!(status, 200);

    let path = "/v1/opscore/agent/st-1/state";
    let mut report = state_report("st-1", "IDLE");
    report["details"] = json!({"load": 3});
    let (status, body) = s.post(path, report).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        body,
        json!({"status": "success", "message": "State update accepted"})
    );
    let changed = s.status.agent_event("st-1", "state_changed").await;
    assert_eq!(changed["state"], "idle");
    let agent = api(&s.nats, "agent", "get", json!({"agentId": "st-1"}))
        .await
        .expect("registered");
    assert_eq!(agent["state"], "idle");
    let (status, state) = s.get(path).await;
    assert_eq!(status, 200);
    assert_eq!(state["agentId"], "st-1");
    assert_eq!(state["state"], "idle");
    assert_eq!(state["details"], json!({"load": 3}));
    assert!(state["timestamp"].is_string());

    // A time without an offset, as Python's utcnow().isoformat() writes it, is UTC.
    let mut naive = state_report("st-1", "busy");
    naive["timestamp"] = json!(chrono::Utc::now().naive_utc().to_string().replace(' ', "T"));
    assert_eq!(s.post(path, naive).await.0, 202);

    let (status, body) = s.post(path, state_report("st-2", "idle")).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = s
        .post(
            "/v1/opscore/agent/nobody/state",
            state_report("nobody", "idle"),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let invalid = [
        json!({"agentId": "st-1", "state": "idle"}),
        json!({"agentId": "st-1", "state": "idle", "timestamp": "half past nine"}),
        json!({"agentId": "st-1", "state": "sleeping", "timestamp": "2026-01-01T00:00:00Z"}),
        json!({"agentId": "st-1", "state": "offline", "timestamp": "2026-01-01T00:00:00Z"}),
        json!({"agentId": "st-1", "state": "idle", "timestamp": "2026-01-01T00:00:00Z",
            "details": 5}),
        json!({"agentId": 7, "state": "idle", "timestamp": "2026-01-01T00:00:00Z"}),
    ];
    for body in invalid {
        let (status, reply) = s.post(path, body).await;
        assert_validation_error(status, &reply);
    }
    let (status, reply) = s
        .post("/v1/opscore/agent/st.1/state", state_report("st.1", "idle"))
        .await;
    assert_validation_error(status, &reply);

    let post = reqwest::Method::POST;
    let (status, body) = s
        .call(post.clone(), path, None, Some(state_report("st-1", "idle")))
        .await;
    assert_eq!(
        (status, body["detail"].clone()),
        (401, json!("Authorization header missing"))
    );
    let (status, _) = s
        .call(
            post,
            path,
            Some("wrong"),
            Some(state_report("st-1", "idle")),
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = s
        .call(reqwest::Method::GET, path, Some("wrong"), None)
        .await;
    assert_eq!(status, 401);
    let (status, body) = s.get("/v1/opscore/agent/nobody/state").await;
    assert_eq!(status, 404, "{body}");
    s.bridge.stop().await;
    s.worker.stop().await;
}

#[tokio::test]
async fn without_a_configured_key_every_bearer_endpoint_answers_401() {
    let s = setup(&[("OPSCORE__BRIDGE__API_KEY", "")], None).await;
    let get = reqwest::Method::GET;
    for key in [Some(""), Some(KEY), None] {
        let (status, body) = s
            .call(get.clone(), "/v1/opscore/agent/a/state", key, None)
            .await;
        assert_eq!(status, 401, "{body}");
        let (status, _) = s.call(get.clone(), "/v1/opscore/agents", key, None).await;
        assert_eq!(status, 401);
    }
    let (status, _) = s.call(get, "/health", None, None).await;
    assert_eq!(status, 200);
    s.bridge.stop().await;
    s.worker.stop().await;
}

#[tokio::test]
async fn workflows_sessions_and_agents_are_served_over_http() {
    let s = setup(&[], None).await;
    s.http_agent("wf-1", &["test_capability"], None).await;
    let trigger = "/v1/opscore/agent/wf-1/workflow";

    let (status, body) = s
        .post(
            trigger,
            json!({"workflowDefinitionId": "sample_workflow_id", "initialPayload": {"n": 1}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["workflowId"], "sample_workflow_id");
    assert_eq!(body["message"], "Workflow triggered successfully");
    let session_id = body["sessionId"].as_str().expect("sessionId").to_owned();

    let (status, session) = s.get(&format!("/v1/opscore/sessions/{session_id}")).await;
    assert_eq!(status, 200, "{session}");
    assert_eq!(session["agentId"], "wf-1");
    assert_eq!(session["input"], json!({"n": 1}));
    let (status, _) = s.get("/v1/opscore/sessions/no-such-session").await;
    assert_eq!(status, 404);

    let cancel = format!("/v1/opscore/sessions/{session_id}/cancel");
    let (status, cancelled) = s.post(&cancel, json!({})).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(s.post(&cancel, json!({})).await.0, 409);

    let (status, body) = s
        .post(trigger, json!({"workflowDefinitionId": "no_such_workflow"}))
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = s
        .post(
            "/v1/opscore/agent/ghost/workflow",
            json!({"workflowDefinitionId": "sample_workflow_id"}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let inline = json!({"id": "inline", "name": "Inline", "version": "1",
        "tasks": [{"taskId": "t", "name": "T", "agentCapability": "test_capability"}]});
    let (status, body) = s
        .post(
            trigger,
            json!({"workflowDefinitionId": "sample_workflow_id", "workflowDefinition": inline}),
        )
        .await;
    assert_validation_error(status, &body);
    let (status, body) = s.post(trigger, json!({"initialPayload": {}})).await;
    assert_validation_error(status, &body);
    let mut cyclic = inline.clone();
    cyclic["tasks"][0]["dependsOn"] = json!(["t"]);
    let (status, body) = s.post(trigger, json!({"workflowDefinition": cyclic})).await;
    assert_validation_error(status, &body);
    let (status, body) = s.post(trigger, json!({"workflowDefinition": inline})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["workflowId"], "inline");

    let keyed = |key: &'static str| {
        s.http
            .post(format!("{}{trigger}", s.bridge.url))
            .bearer_auth(KEY)
            .header("Idempotency-Key", key)
            .json(&json!({"workflowDefinitionId": "sample_workflow_id"}))
            .send()
    };
    let first: Value = keyed("order-1")
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let second: Value = keyed("order-1")
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(first["sessionId"], second["sessionId"]);

    let (status, page) = s.get("/v1/opscore/agents?capability=test_capability").await;
    assert_eq!(status, 200, "{page}");
    let agents = page["agents"].as_array().expect("agents");
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["agentId"], "wf-1");
    let (status, body) = s.get("/v1/opscore/agents?state=sleepy").await;
    assert_validation_error(status, &body);
    assert_eq!(s.get("/v1/opscore/agents?limit=many").await.0, 422);
    s.bridge.stop().await;
    s.worker.stop().await;
}

/// Waits until the bridge's dispatch consumer has acknowledged everything it was given.
async fn wait_until_delivered(nats: &NatsServer) {
    let jetstream = async_nats::jetstream::new(nats.client().await);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = jetstream
            .get_consumer_from_stream("opscore-bridge", "OPSCORE_DISPATCH")
            .await
            .expect("dispatch consumer");
        let info = consumer.info().await.expect("consumer info");
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "dispatch messages left: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_workflow_triggered_over_http_runs_to_completion_on_an_agentkit_agent() {
    let mut s = setup(&[], Some(Kit::Work)).await;
    let capabilities = ["test_capability", "another_capability"];
    s.http_agent("kit-1", &capabilities, Some("http://agent.example/kit-1"))
        .await;

    let (status, body) = s
        .post(
            "/v1/opscore/agent/kit-1/workflow",
            json!({"workflowDefinitionId": "sample_workflow_id", "initialPayload": {"run": 1}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let session_id = body["sessionId"].as_str().expect("sessionId").to_owned();

    let kit = s.agentkit.as_mut().expect("agentkit");
    let (agent_id, run) = kit.next_run().await;
    assert_eq!(agent_id, "kit-1");
    assert_eq!(run["senderId"], "opscore");
    assert_eq!(run["messageType"], "workflow_task");
    assert_eq!(run["task_name"], "First Step");
    assert_eq!(run["opscore_session_id"], session_id.as_str());
    assert_eq!(run["sessionContext"]["sessionId"], session_id.as_str());
    assert_eq!(run["payload"]["task_name"], "First Step");
    assert_eq!(
        run["payload"]["task_parameters"],
        json!({"message": "This is the first step."})
    );
    assert_eq!(run["payload"]["input"], json!({"run": 1}));
    assert_eq!(run["payload"]["leaseEpoch"], 1);
    let step_1 = run["opscore_task_id"].clone();
    let (_, run) = kit.next_run().await;
    assert_eq!(run["task_name"], "Second Step");
    assert_eq!(run["payload"]["results"]["step_1"]["answer"], "First Step");

    session_event(&mut s.status, &session_id, "session.completed").await;
    let (status, session) = s.get(&format!("/v1/opscore/sessions/{session_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(session["status"], "completed");
    assert_eq!(session["tasks"][0]["taskId"], step_1);
    assert_eq!(session["result"]["step_2"]["answer"], "Second Step");

    // A cancelled assignment is acknowledged without a post to AgentKit.
    let held = json!({"id": "held", "name": "Held", "version": "1", "tasks": [
        {"taskId": "t", "name": "T", "agentCapability": "test_capability",
         "parameters": {"hold": true}}]});
    let (status, body) = s
        .post(
            "/v1/opscore/agent/kit-1/workflow",
            json!({"workflowDefinition": held}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let held_session = body["sessionId"].as_str().expect("sessionId").to_owned();
    let kit = s.agentkit.as_mut().expect("agentkit");
    let (_, run) = kit.next_run().await;
    assert_eq!(run["opscore_session_id"], held_session.as_str());
    let (status, _) = s
        .post(
            &format!("/v1/opscore/sessions/{held_session}/cancel"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200);
    session_event(&mut s.status, &held_session, "session.cancelled").await;
    wait_until_delivered(&s.nats).await;
    let kit = s.agentkit.as_ref().expect("agentkit");
    assert_eq!(kit.calls.load(Ordering::SeqCst), 3);
    s.bridge.stop().await;
    s.worker.stop().await;
}

#[tokio::test]
async fn an_undeliverable_assignment_fails_its_attempt_and_the_engine_retries_then_fails() {
    let overrides = [
        ("OPSCORE__BRIDGE__DELIVERY_ATTEMPTS", "2"),
        ("OPSCORE__BRIDGE__DELIVERY_INITIAL_DELAY_MS", "20"),
    ];
    let mut s = setup(&overrides, Some(Kit::Fail)).await;
    s.http_agent("down-1", &["job"], Some("http://agent.example/down-1"))
        .await;
    let definition = json!({"id": "undeliverable", "name": "U", "version": "1",
        "defaults": {"retry": {"maxAttempts": 2, "initialDelayMs": 20, "maxDelayMs": 20}},
        "tasks": [{"taskId": "t", "name": "T", "agentCapability": "job"}]});
    let (status, body) = s
        .post(
            "/v1/opscore/agent/down-1/workflow",
            json!({"workflowDefinition": definition}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let session_id = body["sessionId"].as_str().expect("sessionId").to_owned();

    let retrying = session_event(&mut s.status, &session_id, "task.retrying").await;
    assert_eq!(retrying["reason"]["reason"], "backoff");
    session_event(&mut s.status, &session_id, "session.failed").await;
    let (_, session) = s.get(&format!("/v1/opscore/sessions/{session_id}")).await;
    assert_eq!(session["status"], "failed");
    assert_eq!(session["tasks"][0]["attempt"], 2);
    let message = session["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("agentkit delivery failed"), "{session}");
    // Two deliveries, one per attempt, each posted twice.
    let kit = s.agentkit.as_ref().expect("agentkit");
    assert_eq!(kit.calls.load(Ordering::SeqCst), 4);
    wait_until_delivered(&s.nats).await;
    s.bridge.stop().await;
    s.worker.stop().await;
}
