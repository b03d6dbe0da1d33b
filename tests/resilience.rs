//! Failures of the parts around the worker: Redis going away mid-stream, worker restarts, and
//! several workers sharing one consumer.

mod common;

use common::*;
use serde_json::json;

async fn history_states(nats: &NatsServer, agent_id: &str) -> Vec<String> {
    let record = api(nats, "agent", "get", json!({"agentId": agent_id}))
        .await
        .unwrap_or_else(|e| panic!("agent {agent_id}: {e}"));
    record["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| h["state"].as_str().expect("state").to_owned())
        .collect()
}

#[tokio::test]
async fn events_published_while_redis_is_down_are_applied_once_it_returns() {
    let nats = NatsServer::start();
    let mut redis = RedisServer::start_with(true);
    let worker = InProcessWorker::start(settings(&nats, Some(&redis), &[]), &nats).await;
    let readyz = format!("http://{}/readyz", admin_address(&nats).await);
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;

    let agents: Vec<AgentClient> = futures::future::join_all((0..10).map(|i| {
        let nats = &nats;
        async move { AgentClient::new(nats, &format!("r{i}")).await }
    }))
    .await;
    for agent in &agents {
        agent.register(&["x"]).await;
    }
    for agent in &agents {
        status.agent_event(&agent.id, "registered").await;
    }

    redis.kill();
    for agent in &agents {
        agent.report("busy", &ts(1)).await;
    }
    // Nothing can be committed, so the worker refuses the events with a delay and JetStream
    // delivers them again; none is acknowledged.
    wait_for_redelivery(&nats).await;
    let (pending, unacked) = unacknowledged(&nats).await;
    assert_eq!(
        pending + unacked as u64,
        agents.len() as u64,
        "no event acked while redis is down"
    );
    let not_ready = http().get(&readyz).send().await.expect("readyz");
    assert_eq!(
        not_ready.status().as_u16(),
        503,
        "not ready while redis is down"
    );

    redis.restart();
    for agent in &agents {
        let event = status.agent_event(&agent.id, "state_changed").await;
        assert_eq!(event["state"], "busy");
    }
    wait_until_quiet(&nats).await;
    let ready = http().get(&readyz).send().await.expect("readyz");
    assert_eq!(ready.status().as_u16(), 200, "ready once redis is back");
    for agent in &agents {
        assert_eq!(
            history_states(&nats, &agent.id).await,
            ["busy"],
            "{} applied once",
            agent.id
        );
    }

    // A new worker on the same Redis finds every agent.
    worker.stop().await;
    let worker = InProcessWorker::start(settings(&nats, Some(&redis), &[]), &nats).await;
    let listed = api(&nats, "agent", "list", json!({})).await.expect("list");
    assert_eq!(listed["agents"].as_array().map(Vec::len), Some(10));
    worker.stop().await;
}

#[tokio::test]
async fn two_worker_processes_share_the_consumer_and_apply_each_event_once() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let vars = env_vars(&nats, &redis, &[("OPSCORE__WORKER__MAX_IN_FLIGHT", "8")]);
    let first = ChildWorker::spawn(&vars);
    let second = ChildWorker::spawn(&vars);
    wait_until_serving(&nats).await;

    const AGENTS: usize = 40;
    const REPORTS: i64 = 6;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let agent = AgentClient::new(&nats, &format!("w{i}")).await;
        agent.register(&["x"]).await;
        agents.push(agent);
    }
    for report in 1..=REPORTS {
        for agent in &agents {
            let state = if report % 2 == 0 { "idle" } else { "busy" };
            // Each report is published twice as the same CloudEvent, as a publisher that
            // retries after a lost acknowledgement does; JetStream stores both copies.
            let event = json!({"specversion": "1.0", "id": format!("{}-{report}", agent.id),
                "source": "test", "type": "state",
                "data": {"agentId": agent.id, "state": state, "timestamp": ts(report)}});
            agent.publish("state", event.clone()).await;
            agent.publish("state", event).await;
        }
    }
    wait_until_quiet(&nats).await;

    for agent in &agents {
        // The two workers may take one agent's reports out of order; a report older than
        // the applied one is stale. Either way each report has exactly one effect.
        let states = history_states(&nats, &agent.id).await;
        let record = api(&nats, "agent", "get", json!({"agentId": agent.id}))
            .await
            .expect("get");
        let stale = record["staleEvents"].as_u64().expect("staleEvents") as usize;
        assert_eq!(
            states.len() + stale,
            REPORTS as usize,
            "{}: {states:?} + {stale} stale",
            agent.id
        );
        assert_eq!(record["state"], "idle", "the newest report wins");
    }

    let handled = |worker: &ChildWorker| worker.log_text().matches("handled").count();
    assert!(
        handled(&first) > 0 && handled(&second) > 0,
        "both workers took part"
    );
    assert_eq!(
        handled(&first) + handled(&second),
        AGENTS * (1 + 2 * REPORTS as usize)
    );
}

#[tokio::test]
async fn published_status_messages_leave_the_outbox() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let worker = InProcessWorker::start(settings(&nats, Some(&redis), &[]), &nats).await;
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agent = AgentClient::new(&nats, "tidy").await;
    agent.register(&["x"]).await;
    for n in 1..=20 {
        agent
            .report(if n % 2 == 0 { "idle" } else { "busy" }, &ts(n))
            .await;
    }
    for _ in 0..21 {
        status
            .expect("a transition of tidy", |subject, _| {
                subject == "opscore.status.agent.tidy"
            })
            .await;
    }

    // Every message was published, so each leaves the outbox, removed in batches after its
    // publish. The sweeper would take the ones left only after their 5 s grace: the outbox
    // must be empty before that.
    let mut connection = redis.connection().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(4);
    loop {
        let (kept, due): (u64, u64) = redis::pipe()
            .cmd("HLEN")
            .arg("opscore:outbox")
            .cmd("ZCARD")
            .arg("opscore:outbox:due")
            .query_async(&mut connection)
            .await
            .expect("outbox size");
        if (kept, due) == (0, 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "outbox still holds {kept} messages ({due} due)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    worker.stop().await;
}
