//! What an operator relies on: probes that tell the truth, metrics that parse and move,
//! trace context that crosses the bus, and `opscore doctor`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn get(url: &str) -> (u16, String) {
    let response = http()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// Polls `url` until it answers `status`; fails after [`WAIT`].
async fn wait_for_status(url: &str, status: u16) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(response) = http().get(url).send().await {
            let code = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if code == status {
                return body;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Parses Prometheus text exposition: every line is a comment or `name{labels} value`.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix('#') {
            let kind = comment.split_whitespace().next();
            assert!(
                matches!(kind, Some("HELP" | "TYPE")),
                "bad comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels in {line:?}");
        }
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis_and_nats_while_liveness_holds() {
    let mut nats = NatsServer::start();
    let mut redis = RedisServer::start();
    let worker = InProcessWorker::start(settings(&nats, Some(&redis), &[]), &nats).await;
    let admin = admin_address(&nats).await;
    let (readyz, livez) = (
        format!("http://{admin}/readyz"),
        format!("http://{admin}/livez"),
    );

    let ready = wait_for_status(&readyz, 200).await;
    assert_eq!(
        ready["checks"],
        json!({"nats": "ok", "redis": "ok", "streams": "ok"})
    );
    assert_eq!(get(&livez).await.0, 200);

    redis.kill();
    let unready = wait_for_status(&readyz, 503).await;
    assert_ne!(unready["checks"]["redis"], "ok", "{unready}");
    assert_eq!(unready["checks"]["nats"], "ok");
    assert_eq!(get(&livez).await.0, 200, "an outage is not death");
    redis.restart();
    wait_for_status(&readyz, 200).await;

    nats.kill();
    let unready = wait_for_status(&readyz, 503).await;
    assert_ne!(unready["checks"]["nats"], "ok", "{unready}");
    nats.restart();
    wait_for_status(&readyz, 200).await;
    worker.stop().await;
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_with_events() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let worker = InProcessWorker::start(settings(&nats, Some(&redis), &[]), &nats).await;
    let metrics = format!("http://{}/metrics", admin_address(&nats).await);
    let applied = r#"opscore_events_total{outcome="applied"}"#;
    let before = parse_prometheus(&get(&metrics).await.1)
        .get(applied)
        .copied()
        .unwrap_or(0.0);

    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agent = AgentClient::new(&nats, "m1").await;
    agent.register(&["x"]).await;
    agent.report("busy", &ts(1)).await;
    status.agent_event("m1", "state_changed").await;
    wait_until_quiet(&nats).await;

    let (code, text) = get(&metrics).await;
    assert_eq!(code, 200);
    let samples = parse_prometheus(&text);
    assert!(
        samples[applied] >= before + 2.0,
        "two events applied: {text}"
    );
    assert_eq!(
        samples.get(r#"opscore_agents{state="busy"}"#),
        Some(&1.0),
        "{text}"
    );
    assert!(
        samples.contains_key("opscore_handler_duration_seconds_count"),
        "{text}"
    );
    assert!(
        samples.contains_key("opscore_consumer_pending_messages"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE opscore_events_total counter"),
        "{text}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_traced_trigger_carries_its_trace_to_the_dispatch() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let directory = sample_workflows();
    let worker = InProcessWorker::start(
        settings(
            &nats,
            Some(&redis),
            &[("OPSCORE__WORKFLOWS__DIRECTORY", &directory)],
        ),
        &nats,
    )
    .await;
    let client = nats.client().await;
    let mut dispatch = client
        .subscribe("opscore.dispatch.traced")
        .await
        .expect("subscribe");
    let agent = AgentClient::new(&nats, "traced").await;
    agent.register(&["test_capability"]).await;
    agent.report("idle", &chrono::Utc::now().to_rfc3339()).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").as_str(),
    );
    let request = json!({"workflowId": "sample_workflow_id"}).to_string();
    client
        .request_with_headers("opscore.api.workflow.trigger", headers, request.into())
        .await
        .expect("trigger");

    let message = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut dispatch))
        .await
        .expect("a dispatch")
        .expect("subscription");
    let traceparent = message
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(|v| v.as_str().to_owned())
        .expect("the dispatch carries a traceparent");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts[1], trace_id, "same trace");
    assert_ne!(parts[2], "00f067aa0ba902b7", "a span of its own");
    worker.stop().await;
}

#[tokio::test]
async fn doctor_passes_against_a_running_worker_and_explains_a_wrong_address() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let worker = InProcessWorker::start(settings(&nats, Some(&redis), &[]), &nats).await;
    let (nats_url, redis_url) = (nats.url(), redis.url());
    let doctor = |env: Vec<(&'static str, String)>| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_opscore"))
            .arg("doctor")
            .envs(env)
            .output()
            .await
            .expect("run doctor")
    };

    let healthy = doctor(vec![
        ("OPSCORE__NATS__SERVERS", nats_url.clone()),
        ("OPSCORE__REDIS__URL", redis_url.clone()),
    ])
    .await;
    let printed = String::from_utf8_lossy(&healthy.stdout).into_owned();
    assert!(healthy.status.success(), "{printed}");
    assert!(
        printed.contains("ok    consumer opscore-worker"),
        "{printed}"
    );

    let wrong = doctor(vec![
        ("OPSCORE__NATS__SERVERS", "nats://127.0.0.1:1".to_owned()),
        ("OPSCORE__REDIS__URL", "redis://127.0.0.1:1/0".to_owned()),
    ])
    .await;
    let printed = String::from_utf8_lossy(&wrong.stdout).into_owned();
    assert!(!wrong.status.success());
    assert!(printed.contains("FAIL  nats connection"), "{printed}");
    assert!(printed.contains("fix: check nats.servers"), "{printed}");
    assert!(printed.contains("FAIL  redis"), "{printed}");
    worker.stop().await;
}

/// A collector that keeps every OTLP/HTTP request body it receives.
async fn collector() -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<axum::body::Bytes>,
) {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sender = sender.clone();
            async move {
                sender.send(body).ok();
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    (format!("http://{address}/v1/traces"), receiver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_a_traced_event_are_exported_in_its_trace() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let (endpoint, mut exported) = collector().await;
    let mut worker = ChildWorker::spawn(&env_vars(
        &nats,
        &redis,
        &[
            ("OPSCORE__TRACES__OTLP_ENDPOINT", &endpoint),
            // The batch exporter's delay, read by the OpenTelemetry SDK.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    ));
    worker.wait_until_serving(&nats).await;

    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{trace_id}-b7ad6b7169203331-01").as_str(),
    );
    let body = registration("otel-1", &["x"]).to_string();
    async_nats::jetstream::new(nats.client().await)
        .publish_with_headers("opscore.agent.otel-1.register", headers, body.into())
        .await
        .expect("publish")
        .await
        .expect("stored");

    // OTLP/HTTP protobuf carries trace ids as their 16 raw bytes.
    let wanted: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = tokio::time::timeout_at(deadline, exported.recv())
            .await
            .expect("spans exported in time")
            .expect("collector running");
        if body.windows(16).any(|window| window == wanted.as_slice()) {
            break;
        }
    }
    assert!(worker.terminate().success());
}
