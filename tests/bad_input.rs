//! Hostile and malformed input: each kind lands in the dead-letter stream with its reason,
//! and the worker keeps serving.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn every_kind_of_bad_input_is_dead_lettered_and_the_worker_keeps_serving() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let worker = InProcessWorker::start(
        settings(
            &nats,
            Some(&redis),
            &[("OPSCORE__WORKER__MAX_MESSAGE_BYTES", "4096")],
        ),
        &nats,
    )
    .await;
    let mut dlq = Watcher::subscribe(&nats, "opscore.dlq.>").await;
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agent = AgentClient::new(&nats, "victim").await;
    agent.register(&["x"]).await;
    status.agent_event("victim", "registered").await;

    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "opscore.agent.victim.state",
            b"not json at all".to_vec(),
            "not_json",
        ),
        (
            "opscore.agent.victim.state",
            json!({"agentId": "victim", "state": 7, "timestamp": ts(1)})
                .to_string()
                .into_bytes(),
            "schema",
        ),
        (
            "opscore.agent.victim.state",
            json!({"agentId": "victim", "state": "sleeping", "timestamp": ts(1)})
                .to_string()
                .into_bytes(),
            "schema",
        ),
        (
            "opscore.agent.victim.state",
            json!({"agentId": "victim", "state": "offline", "timestamp": ts(1)})
                .to_string()
                .into_bytes(),
            "schema",
        ),
        (
            "opscore.agent.victim.state",
            json!({"specversion": "0.3", "id": "e", "source": "s", "type": "t", "data": {}})
                .to_string()
                .into_bytes(),
            "unsupported_specversion",
        ),
        (
            "opscore.agent.victim.state",
            json!({"agentId": "intruder", "state": "idle", "timestamp": ts(1)})
                .to_string()
                .into_bytes(),
            "spoofed",
        ),
        (
            "opscore.agent.victim.heartbeat",
            json!({"agentId": "vic tim"}).to_string().into_bytes(),
            "invalid_token",
        ),
        (
            "opscore.agent.vic*tim.heartbeat",
            json!({"agentId": "vic*tim"}).to_string().into_bytes(),
            "invalid_token",
        ),
        (
            "opscore.agent.victim.reboot",
            json!({"agentId": "victim"}).to_string().into_bytes(),
            "unknown_event",
        ),
        (
            "opscore.agent.victim.state",
            json!({"agentId": "victim", "padding": "x".repeat(5000)})
                .to_string()
                .into_bytes(),
            "too_large",
        ),
        (
            // Just under nats-server's default limit of 1 MiB per message.
            "opscore.agent.victim.state",
            json!({"agentId": "victim", "padding": "x".repeat(1_040_000)})
                .to_string()
                .into_bytes(),
            "too_large",
        ),
        ("opscore.agent.victim.state", deep.into_bytes(), "too_deep"),
    ];

    for (i, (subject, payload, reason)) in cases.iter().enumerate() {
        let msg_id = format!("bad-{i}");
        agent
            .publish_raw(subject, payload.clone(), Some(&msg_id))
            .await;
        let (dlq_subject, letter) = dlq
            .expect(&format!("dead letter {reason}"), |_, body| {
                body["_headers"]["Opscore-Original-Msg-Id"] == msg_id.as_str()
            })
            .await;
        assert_eq!(dlq_subject, format!("opscore.dlq.{reason}"), "case {i}");
        let headers = &letter["_headers"];
        assert_eq!(headers["Opscore-Dlq-Reason"], *reason);
        assert_eq!(headers["Opscore-Original-Subject"], *subject);
        assert!(
            headers["Opscore-Dlq-Error"]
                .as_str()
                .is_some_and(|e| !e.is_empty()),
            "case {i} has an error text"
        );
    }

    // The worker still applies good events, and the bad ones left the agent untouched.
    agent.report("idle", &ts(2)).await;
    let idle = status.agent_event("victim", "state_changed").await;
    assert_eq!(idle["state"], "idle");
    assert_eq!(idle["seq"], 2, "no bad event caused a transition");
    wait_until_quiet(&nats).await;
    worker.stop().await;
}

#[tokio::test]
async fn a_dead_letter_keeps_the_original_payload_and_headers() {
    let nats = NatsServer::start();
    let worker = InProcessWorker::start(settings(&nats, None, &[]), &nats).await;
    let client = nats.client().await;
    let mut dlq = client.subscribe("opscore.dlq.>").await.expect("subscribe");
    client.flush().await.expect("flush");

    let mut headers = async_nats::HeaderMap::new();
    headers.insert("X-Trace", "abc");
    let payload = b"{broken".to_vec();
    async_nats::jetstream::new(client.clone())
        .publish_with_headers("opscore.agent.p1.state", headers, payload.clone().into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    let letter = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut dlq))
        .await
        .expect("dead letter arrives")
        .expect("subscription");
    assert_eq!(letter.payload.as_ref(), payload.as_slice());
    let headers = letter.headers.expect("headers");
    assert_eq!(headers.get("X-Trace").map(|v| v.as_str()), Some("abc"));
    assert_eq!(
        headers.get("Opscore-Dlq-Reason").map(|v| v.as_str()),
        Some("not_json")
    );
    let seq: Value = headers
        .get("Opscore-Original-Seq")
        .map(|v| {
            v.as_str()
                .parse::<u64>()
                .map(Value::from)
                .unwrap_or(Value::Null)
        })
        .unwrap_or(Value::Null);
    assert!(seq.as_u64().is_some_and(|s| s > 0));
    worker.stop().await;
}
