//! The agent registry end to end: a worker, a real nats-server and redis-server, agents
//! publishing events, and a monitor reading the status stream.

mod common;

use common::*;
use serde_json::json;

struct Setup {
    nats: NatsServer,
    _redis: RedisServer,
    worker: InProcessWorker,
    status: Watcher,
}

async fn setup(overrides: &[(&str, &str)]) -> Setup {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let worker = InProcessWorker::start(settings(&nats, Some(&redis), overrides), &nats).await;
    let status = Watcher::subscribe(&nats, "opscore.status.>").await;
    Setup {
        nats,
        _redis: redis,
        worker,
        status,
    }
}

#[tokio::test]
async fn registration_is_published_and_readable_through_the_api() {
    let mut s = setup(&[]).await;
    let agent = AgentClient::new(&s.nats, "agent-1").await;
    agent.register(&["summarise", "draft"]).await;

    let event = s.status.agent_event("agent-1", "registered").await;
    assert_eq!(event["state"], "unknown");
    assert_eq!(event["seq"], 1);

    let record = api(&s.nats, "agent", "get", json!({"agentId": "agent-1"}))
        .await
        .expect("agent.get");
    assert_eq!(record["agentName"], "Agent agent-1");
    assert_eq!(record["capabilities"], json!(["draft", "summarise"]));
    assert_eq!(record["contactEndpoint"], "http://agents.example/agent");
    assert_eq!(record["maxConcurrentTasks"], 1);
    assert_eq!(record["state"], "unknown");
    assert_eq!(record["deregistered"], false);
    assert_eq!(record["alive"], true);
    s.worker.stop().await;
}

#[tokio::test]
async fn state_reports_move_the_agent_and_fill_its_history() {
    let mut s = setup(&[]).await;
    let agent = AgentClient::new(&s.nats, "a2").await;
    agent.register(&["x"]).await;
    agent.report("IDLE", &ts(1)).await;
    agent.report("busy", &ts(2)).await;

    let idle = s.status.agent_event("a2", "state_changed").await;
    assert_eq!(
        (idle["previousState"].as_str(), idle["state"].as_str()),
        (Some("unknown"), Some("idle"))
    );
    let busy = s.status.agent_event("a2", "state_changed").await;
    assert_eq!(busy["state"], "busy");
    assert_eq!(busy["seq"], 3, "seq counts every transition of the agent");

    let record = api(&s.nats, "agent", "get", json!({"agentId": "a2"}))
        .await
        .expect("get");
    assert_eq!(record["state"], "busy");
    let history: Vec<&str> = record["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| h["state"].as_str().expect("state"))
        .collect();
    assert_eq!(history, ["busy", "idle"]);
    s.worker.stop().await;
}

#[tokio::test]
async fn stale_and_duplicate_events_have_no_second_effect() {
    let mut s = setup(&[]).await;
    let agent = AgentClient::new(&s.nats, "a3").await;
    agent.register(&["x"]).await;
    agent.report("busy", &ts(10)).await;
    s.status.agent_event("a3", "state_changed").await;

    // Older than the applied report: recorded as stale, not applied.
    agent.report("idle", &ts(5)).await;
    // The same event twice (a CloudEvent id), more than JetStream's duplicate window would
    // catch if the publisher had not set a message id.
    let event = json!({"specversion": "1.0", "id": "evt-77", "source": "agent/a3", "type": "state",
        "data": {"agentId": "a3", "state": "error", "timestamp": ts(20)}});
    agent.publish("state", event.clone()).await;
    agent.publish("state", event).await;
    // A marker that orders after everything above on the status stream.
    agent.report("idle", &ts(30)).await;

    let error = s.status.agent_event("a3", "state_changed").await;
    assert_eq!(error["state"], "error");
    let idle = s.status.agent_event("a3", "state_changed").await;
    assert_eq!(idle["state"], "idle");
    assert_eq!(idle["seq"].as_u64(), error["seq"].as_u64().map(|s| s + 1));
    wait_until_quiet(&s.nats).await;

    let record = api(&s.nats, "agent", "get", json!({"agentId": "a3"}))
        .await
        .expect("get");
    assert_eq!(record["staleEvents"], 1);
    let states: Vec<&str> = record["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| h["state"].as_str().expect("state"))
        .collect();
    assert_eq!(
        states,
        ["idle", "error", "busy"],
        "the duplicate left one history entry"
    );
    s.worker.stop().await;
}

#[tokio::test]
async fn a_silent_agent_goes_offline_and_comes_back_on_its_next_event() {
    let mut s = setup(&[("OPSCORE__AGENTS__LIVENESS_TIMEOUT_SECS", "1")]).await;
    let agent = AgentClient::new(&s.nats, "a4").await;
    agent.register(&["x"]).await;
    agent.report("idle", &ts(1)).await;

    let offline = s.status.agent_event("a4", "offline").await;
    assert_eq!(offline["previousState"], "idle");
    let record = api(&s.nats, "agent", "get", json!({"agentId": "a4"}))
        .await
        .expect("get");
    assert_eq!(record["state"], "offline");
    assert_eq!(record["alive"], false);

    agent.publish("heartbeat", json!({"agentId": "a4"})).await;
    let online = s.status.agent_event("a4", "online").await;
    assert_eq!(online["state"], "idle", "the reported state is restored");
    s.worker.stop().await;
}

#[tokio::test]
async fn deregistration_is_visible_and_keeps_the_history() {
    let mut s = setup(&[]).await;
    let agent = AgentClient::new(&s.nats, "a5").await;
    agent.register(&["x"]).await;
    agent.report("idle", &ts(1)).await;
    agent
        .publish(
            "deregister",
            json!({"agentId": "a5", "reason": "maintenance"}),
        )
        .await;
    let event = s.status.agent_event("a5", "deregistered").await;
    assert_eq!(event["deregistered"], true);

    let record = api(&s.nats, "agent", "get", json!({"agentId": "a5"}))
        .await
        .expect("get");
    assert_eq!(record["deregistered"], true);
    assert_eq!(record["deregisterReason"], "maintenance");
    assert_eq!(record["history"][0]["state"], "idle");
    s.worker.stop().await;
}

#[tokio::test]
async fn events_for_an_unregistered_agent_are_retried_then_dead_lettered() {
    let s = setup(&[]).await;
    let mut dlq = Watcher::subscribe(&s.nats, "opscore.dlq.>").await;
    let agent = AgentClient::new(&s.nats, "ghost").await;
    agent.report("idle", &ts(1)).await;

    let (subject, letter) = dlq.expect("unknown_agent dead letter", |_, _| true).await;
    assert_eq!(subject, "opscore.dlq.unknown_agent");
    assert_eq!(
        letter["_headers"]["Opscore-Original-Subject"],
        "opscore.agent.ghost.state"
    );
    assert!(
        letter["_headers"]["Opscore-Dlq-Error"]
            .as_str()
            .is_some_and(|e| e.contains("after 3 deliveries")),
        "{letter}"
    );
    s.worker.stop().await;
}

#[tokio::test]
async fn a_registration_published_late_still_wins_over_the_retry_limit() {
    let mut s = setup(&[("OPSCORE__WORKER__UNKNOWN_AGENT_RETRIES", "50")]).await;
    let agent = AgentClient::new(&s.nats, "late").await;
    agent.report("busy", &ts(1)).await;
    agent.register(&["x"]).await;

    let event = s.status.agent_event("late", "state_changed").await;
    assert_eq!(event["state"], "busy");
    s.worker.stop().await;
}

#[tokio::test]
async fn agent_list_filters_by_capability_and_state_and_pages() {
    let mut s = setup(&[]).await;
    for i in 0..5 {
        let agent = AgentClient::new(&s.nats, &format!("list-{i}")).await;
        agent
            .register(if i % 2 == 0 { &["even"] } else { &["odd"] })
            .await;
        if i < 2 {
            agent.report("idle", &ts(1)).await;
        }
    }
    for _ in 0..2 {
        s.status
            .expect("two idle agents", |_, body| body["data"]["state"] == "idle")
            .await;
    }
    wait_until_quiet(&s.nats).await;

    let even = api(&s.nats, "agent", "list", json!({"capability": "even"}))
        .await
        .expect("list");
    let ids: Vec<&str> = even["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| a["agentId"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["list-0", "list-2", "list-4"]);

    let idle = api(&s.nats, "agent", "list", json!({"state": "IDLE"}))
        .await
        .expect("list");
    assert_eq!(idle["agents"].as_array().map(Vec::len), Some(2));

    let mut cursor = serde_json::Value::Null;
    let mut paged = Vec::new();
    loop {
        let page = api(
            &s.nats,
            "agent",
            "list",
            json!({"limit": 2, "cursor": cursor}),
        )
        .await
        .expect("page");
        paged.extend(
            page["agents"]
                .as_array()
                .expect("agents")
                .iter()
                .map(|a| a["agentId"].as_str().expect("id").to_owned()),
        );
        cursor = page["nextCursor"].clone();
        if cursor.is_null() {
            break;
        }
    }
    assert_eq!(paged, ["list-0", "list-1", "list-2", "list-3", "list-4"]);
    s.worker.stop().await;
}

#[tokio::test]
async fn api_errors_carry_codes_and_the_micro_endpoints_answer() {
    let s = setup(&[]).await;
    let missing = api(&s.nats, "agent", "get", json!({"agentId": "nobody"}))
        .await
        .expect_err("404");
    assert_eq!(missing.code, 404);
    let bad = api(&s.nats, "agent", "get", json!({"agentId": "a.b"}))
        .await
        .expect_err("400");
    assert_eq!(bad.code, 400);
    let bad_state = api(&s.nats, "agent", "list", json!({"state": "sleepy"}))
        .await
        .expect_err("400");
    assert_eq!(bad_state.code, 400);
    let bad_body = api(&s.nats, "agent", "list", json!(["not", "an", "object"]))
        .await
        .expect_err("400");
    assert_eq!(bad_body.code, 400);

    let client = s.nats.client().await;
    for verb in ["PING", "INFO", "STATS"] {
        let reply = client
            .request(format!("$SRV.{verb}.opscore"), "".into())
            .await
            .expect("micro verb answers");
        let body: serde_json::Value = serde_json::from_slice(&reply.payload).expect("json");
        assert_eq!(body["name"], "opscore", "{verb}: {body}");
    }
    let stats = client
        .request("$SRV.STATS.opscore", "".into())
        .await
        .expect("stats");
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).expect("json");
    let get = stats["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["name"] == "agent-get")
        .expect("agent-get endpoint")
        .clone();
    assert_eq!(get["num_requests"], 2);
    assert_eq!(get["data"]["errors"], 2);
    s.worker.stop().await;
}

#[tokio::test]
async fn the_memory_backend_serves_the_same_registry() {
    let nats = NatsServer::start();
    let worker = InProcessWorker::start(settings(&nats, None, &[]), &nats).await;
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agent = AgentClient::new(&nats, "mem-1").await;
    agent.register(&["x"]).await;
    agent.report("active", &ts(1)).await;
    status.agent_event("mem-1", "state_changed").await;
    let record = api(&nats, "agent", "get", json!({"agentId": "mem-1"}))
        .await
        .expect("get");
    assert_eq!(record["state"], "active");
    worker.stop().await;
}
