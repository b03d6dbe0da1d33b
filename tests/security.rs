//! The sample nats-server configuration's permissions hold: an agent cannot publish another
//! agent's events or read another agent's dispatches. And no secret reaches the logs.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::json;

const CONFIG: &str = include_str!("../config/nats/nats-server.conf");
const PASSWORDS: &[(&str, &str)] = &[
    ("OPSCORE_NATS_PASSWORD", "worker-secret-7f3a"),
    ("MONITOR_NATS_PASSWORD", "monitor-secret-91c2"),
    ("AGENT_A_NATS_PASSWORD", "agent-a-secret-44d0"),
    ("AGENT_B_NATS_PASSWORD", "agent-b-secret-be17"),
];

async fn agent(nats: &NatsServer, id: &str, password: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(id.to_owned(), password.to_owned())
        .custom_inbox_prefix(format!("_INBOX_{id}"))
        .connect(nats.url())
        .await
        .expect("agent connects")
}

async fn publish(client: &async_nats::Client, subject: String, body: serde_json::Value) {
    async_nats::jetstream::new(client.clone())
        .publish(subject, body.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

#[tokio::test]
async fn agents_are_confined_to_their_own_subjects() {
    let nats = NatsServer::start_with_config(CONFIG, PASSWORDS);
    let redis = RedisServer::start();
    let worker_settings = settings(
        &nats,
        Some(&redis),
        &[
            ("OPSCORE__NATS__USER", "opscore"),
            ("OPSCORE__NATS__PASSWORD", "worker-secret-7f3a"),
        ],
    );
    let monitor = async_nats::ConnectOptions::with_user_and_password(
        "opscore".into(),
        "worker-secret-7f3a".into(),
    )
    .connect(nats.url())
    .await
    .expect("monitor connects");
    let mut status = monitor
        .subscribe("opscore.status.agent.>")
        .await
        .expect("subscribe");
    monitor.flush().await.expect("flush");
    let worker = InProcessWorker::start_as(worker_settings, &monitor).await;

    let a = agent(&nats, "agent-a", "agent-a-secret-44d0").await;
    let b = agent(&nats, "agent-b", "agent-b-secret-be17").await;
    for (client, id) in [(&a, "agent-a"), (&b, "agent-b")] {
        publish(
            client,
            format!("opscore.agent.{id}.register"),
            registration(id, &["job"]),
        )
        .await;
    }

    // agent-a listens on agent-b's dispatch subject and publishes a state for agent-b. The
    // server refuses both; a plain publish still returns Ok on the client, so what is asserted
    // is that nothing arrives.
    let mut stolen = a
        .subscribe("opscore.dispatch.agent-b")
        .await
        .expect("subscribe call returns");
    a.publish(
        "opscore.agent.agent-b.state",
        json!({"agentId": "agent-b", "state": "error", "timestamp": ts(1)})
            .to_string()
            .into(),
    )
    .await
    .expect("a forbidden publish still returns Ok");
    a.flush().await.ok();

    // agent-b's own report is the marker: it is the first state change agent-b gets.
    publish(
        &b,
        "opscore.agent.agent-b.state".into(),
        json!({"agentId": "agent-b", "state": "idle", "timestamp": ts(2)}),
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let message = tokio::time::timeout_at(deadline, status.next())
            .await
            .expect("status")
            .expect("open");
        let event: serde_json::Value = serde_json::from_slice(&message.payload).expect("json");
        let data = &event["data"];
        if data["agentId"] == "agent-b" && data["kind"] == "state_changed" {
            assert_eq!(
                data["state"], "idle",
                "agent-a's forged state never applied"
            );
            break;
        }
    }

    // A task for agent-b reaches agent-b only.
    let mut own = b
        .subscribe("opscore.dispatch.agent-b")
        .await
        .expect("subscribe");
    b.flush().await.expect("flush");
    let api = opscore::api::ApiClient::new(monitor.clone());
    let definition = json!({"id": "sec", "name": "sec", "version": "1",
        "tasks": [{"taskId": "t", "name": "t", "agentCapability": "job"}]});
    api.call(
        "workflow",
        "trigger",
        &json!({"workflowDefinition": definition, "agentId": "agent-b"}),
    )
    .await
    .expect("trigger");
    tokio::time::timeout(WAIT, own.next())
        .await
        .expect("agent-b gets its task")
        .expect("open");
    let leaked = tokio::time::timeout(Duration::from_millis(500), stolen.next()).await;
    assert!(
        !matches!(leaked, Ok(Some(_))),
        "agent-a read agent-b's dispatch"
    );
    worker.stop().await;
}

#[tokio::test]
async fn no_secret_reaches_the_logs() {
    let nats = NatsServer::start_with_config(CONFIG, PASSWORDS);
    let redis = RedisServer::start();
    let redis_password = "redis-secret-0c55";
    let redis_url = format!(
        "redis://default:{redis_password}@127.0.0.1:{}/0",
        redis.port
    );
    let vars = env_vars(
        &nats,
        &redis,
        &[
            ("OPSCORE__NATS__USER", "opscore"),
            ("OPSCORE__NATS__PASSWORD", "worker-secret-7f3a"),
            ("OPSCORE__REDIS__URL", &redis_url),
        ],
    );
    let mut worker = ChildWorker::spawn(&vars);
    worker
        .wait_until_serving_as(&nats, "opscore", "worker-secret-7f3a")
        .await;
    let status = worker.terminate();
    assert!(status.success());
    let log = worker.log_text();
    assert!(log.contains("streams and consumer ready"), "{log}");
    for secret in PASSWORDS.iter().map(|(_, s)| *s).chain([redis_password]) {
        assert!(!log.contains(secret), "a secret in the log:\n{log}");
    }
}
