//! Faults injected around a running worker: the network to NATS or Redis goes silent, the
//! NATS server dies and comes back, a worker among three is killed, a worker is stopped under
//! load, a monitor stops reading. After each, every event NATS acknowledged is applied exactly
//! once.

mod common;

use std::time::Duration;

use common::proxy::{FaultProxy, Mode};
use common::*;
use serde_json::json;

/// How long the network stays silent, as in the issue's scenario.
const OUTAGE: Duration = Duration::from_secs(15);

async fn get_status(url: &str) -> Option<u16> {
    http()
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Polls `url` until it answers `status`, within `limit`.
async fn wait_for_status(url: &str, status: u16, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while get_status(url).await != Some(status) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers `count` agents and waits until the worker applied each registration.
async fn register(
    nats: &NatsServer,
    status: &mut Watcher,
    prefix: &str,
    count: usize,
) -> Vec<AgentClient> {
    let mut agents = Vec::new();
    for i in 0..count {
        let agent = AgentClient::new(nats, &format!("{prefix}{i}")).await;
        agent.register(&["x"]).await;
        agents.push(agent);
    }
    for agent in &agents {
        status.agent_event(&agent.id, "registered").await;
    }
    agents
}

/// Asserts each agent applied exactly `reports` state reports, counting stale ones, and, when
/// it reported more than once, ended in the state of its newest report (`idle` after an even
/// count, `busy` after an odd one, as the publishers here alternate).
async fn assert_applied_once(nats: &NatsServer, agents: &[AgentClient], reports: usize) {
    for agent in agents {
        let record = api(nats, "agent", "get", json!({"agentId": agent.id}))
            .await
            .expect("agent.get");
        let history = record["history"].as_array().map_or(0, Vec::len);
        let stale = record["staleEvents"].as_u64().unwrap_or(0) as usize;
        assert_eq!(history + stale, reports, "{}: {record}", agent.id);
        if reports > 1 {
            let newest = if reports.is_multiple_of(2) {
                "idle"
            } else {
                "busy"
            };
            assert_eq!(record["state"], newest, "the newest report wins: {record}");
        }
    }
}

/// Starts one publisher per agent, on a connection of its own, that publishes `reports` state
/// reports in order (`busy`, `idle`, ...) through JetStream, each acknowledged.
fn publish_reports(
    nats: &NatsServer,
    agents: &[AgentClient],
    reports: i64,
) -> Vec<tokio::task::JoinHandle<()>> {
    agents
        .iter()
        .map(|agent| {
            let id = agent.id.clone();
            let url = nats.url();
            tokio::spawn(async move {
                let client = async_nats::connect(url).await.expect("connect");
                let jetstream = async_nats::jetstream::new(client);
                for report in 1..=reports {
                    let state = if report % 2 == 0 { "idle" } else { "busy" };
                    let body = json!({"agentId": id, "state": state, "timestamp": ts(report)});
                    jetstream
                        .publish(format!("opscore.agent.{id}.state"), body.to_string().into())
                        .await
                        .expect("publish")
                        .await
                        .expect("stored");
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_network_to_nats_is_detected_and_recovered() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(nats.port).await;
    let proxied = format!("nats://127.0.0.1:{}", proxy.port);
    // Messages the server handed to a pull request of the dead connection come back after
    // the ack wait; a short one keeps the test short.
    let worker = InProcessWorker::start(
        settings(
            &nats,
            Some(&redis),
            &[
                ("OPSCORE__NATS__SERVERS", &proxied),
                ("OPSCORE__WORKER__ACK_WAIT_SECS", "2"),
            ],
        ),
        &nats,
    )
    .await;
    let readyz = format!("http://{}/readyz", admin_address(&nats).await);
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agents = register(&nats, &mut status, "n", 5).await;

    proxy.set(Mode::Blackhole);
    let silenced = tokio::time::Instant::now();
    // Two missed pings at one-second intervals reveal the dead link.
    wait_for_status(&readyz, 503, Duration::from_secs(10)).await;
    for agent in &agents {
        agent.report("busy", &ts(1)).await;
    }
    tokio::time::sleep_until(silenced + OUTAGE).await;
    proxy.set(Mode::Pass);

    wait_for_status(&readyz, 200, WAIT).await;
    for agent in &agents {
        status.agent_event(&agent.id, "state_changed").await;
    }
    wait_until_quiet(&nats).await;
    assert_applied_once(&nats, &agents, 1).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_network_to_redis_is_detected_and_recovered() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port).await;
    let proxied = format!("redis://127.0.0.1:{}/0", proxy.port);
    let worker = InProcessWorker::start(
        settings(&nats, Some(&redis), &[("OPSCORE__REDIS__URL", &proxied)]),
        &nats,
    )
    .await;
    let readyz = format!("http://{}/readyz", admin_address(&nats).await);
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agents = register(&nats, &mut status, "r", 5).await;

    proxy.set(Mode::Blackhole);
    let silenced = tokio::time::Instant::now();
    wait_for_status(&readyz, 503, Duration::from_secs(10)).await;
    for agent in &agents {
        agent.report("busy", &ts(1)).await;
    }
    wait_for_redelivery(&nats).await;
    tokio::time::sleep_until(silenced + OUTAGE).await;
    proxy.set(Mode::Pass);

    wait_for_status(&readyz, 200, WAIT).await;
    for agent in &agents {
        status.agent_event(&agent.id, "state_changed").await;
    }
    wait_until_quiet(&nats).await;
    assert_applied_once(&nats, &agents, 1).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_with_its_store_loses_no_acknowledged_event() {
    let mut nats = NatsServer::start();
    let redis = RedisServer::start();
    let worker = InProcessWorker::start(settings(&nats, Some(&redis), &[]), &nats).await;
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agents = register(&nats, &mut status, "k", 10).await;
    for agent in &agents {
        agent.report("busy", &ts(1)).await;
    }

    nats.kill();
    nats.restart();
    // Clients of the old server reconnect; these publishers are new.
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let mut after = Vec::new();
    for agent in &agents {
        let again = AgentClient::new(&nats, &agent.id).await;
        again.report("idle", &ts(2)).await;
        after.push(again);
    }
    for agent in &after {
        let event = status.agent_event(&agent.id, "state_changed").await;
        if event["state"] == "busy" {
            status.agent_event(&agent.id, "state_changed").await;
        }
    }
    wait_until_quiet(&nats).await;
    assert_applied_once(&nats, &after, 2).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_while_agents_publish_loses_nothing() {
    let mut nats = NatsServer::start();
    let redis = RedisServer::start();
    // Messages the old server handed to the worker's pull come back after the ack wait.
    let worker = InProcessWorker::start(
        settings(
            &nats,
            Some(&redis),
            &[("OPSCORE__WORKER__ACK_WAIT_SECS", "2")],
        ),
        &nats,
    )
    .await;
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agents = register(&nats, &mut status, "p", 10).await;

    // Publishers as careful agents write them: each report has its own `Nats-Msg-Id` and is
    // published again, with the same id, until JetStream acknowledges it.
    const REPORTS: i64 = 20;
    let publishers: Vec<_> = agents
        .iter()
        .map(|agent| {
            let id = agent.id.clone();
            let url = nats.url();
            tokio::spawn(async move {
                let client = async_nats::ConnectOptions::new()
                    .retry_on_initial_connect()
                    .connect(url)
                    .await
                    .expect("connect");
                let jetstream = async_nats::jetstream::new(client);
                for report in 1..=REPORTS {
                    let state = if report % 2 == 0 { "idle" } else { "busy" };
                    let body = json!({"agentId": id, "state": state, "timestamp": ts(report)});
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("{id}-{report}").as_str());
                    loop {
                        let stored = match jetstream
                            .publish_with_headers(
                                format!("opscore.agent.{id}.state"),
                                headers.clone(),
                                body.to_string().into(),
                            )
                            .await
                        {
                            Ok(ack) => ack.await.is_ok(),
                            Err(_) => false,
                        };
                        if stored {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();

    // The server dies while the reports flow, and comes back with its store.
    status
        .expect("some reports applied", |_, body| {
            body["data"]["kind"] == "state_changed"
        })
        .await;
    nats.kill();
    nats.restart();
    for publisher in publishers {
        tokio::time::timeout(Duration::from_secs(60), publisher)
            .await
            .expect("publishers finish once the server is back")
            .expect("publisher");
    }
    wait_until_quiet(&nats).await;
    assert_applied_once(&nats, &agents, REPORTS as usize).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_workers_killed_under_load_loses_no_update() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let vars = env_vars(&nats, &redis, &[("OPSCORE__WORKER__ACK_WAIT_SECS", "2")]);
    let mut workers: Vec<ChildWorker> = (0..3).map(|_| ChildWorker::spawn(&vars)).collect();
    wait_until_serving(&nats).await;
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agents = register(&nats, &mut status, "t", 20).await;

    const REPORTS: i64 = 6;
    for report in 1..=REPORTS {
        if report == REPORTS / 2 {
            workers[1].kill();
        }
        for agent in &agents {
            let state = if report % 2 == 0 { "idle" } else { "busy" };
            agent.report(state, &ts(report)).await;
        }
    }
    wait_until_quiet(&nats).await;
    assert_applied_once(&nats, &agents, REPORTS as usize).await;
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_in_flight_work_and_loses_nothing() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let vars = env_vars(&nats, &redis, &[]);
    let mut worker = ChildWorker::spawn(&vars);
    worker.wait_until_serving(&nats).await;
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agents = register(&nats, &mut status, "s", 20).await;

    const REPORTS: i64 = 10;
    let publishers = publish_reports(&nats, &agents, REPORTS);

    // Stop the worker while the publishers are at work.
    status
        .expect("some reports applied", |_, body| {
            body["data"]["kind"] == "state_changed"
        })
        .await;
    let started = std::time::Instant::now();
    let exit = worker.terminate();
    assert!(exit.success(), "{exit:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "exit within the grace period"
    );
    assert!(
        worker.log_text().contains("intake drained"),
        "{}",
        worker.log_text()
    );
    for publisher in publishers {
        publisher.await.expect("publisher");
    }

    let _next = ChildWorker::spawn(&vars);
    wait_until_serving(&nats).await;
    wait_until_quiet(&nats).await;
    assert_applied_once(&nats, &agents, REPORTS as usize).await;
}

/// Runs `opscore recover` against the test's servers; returns its standard output.
async fn recover(nats: &NatsServer, redis: &RedisServer) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_opscore"))
        .arg("recover")
        .envs(env_vars(nats, redis, &[]))
        .output()
        .await
        .expect("run opscore recover");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_is_detected_reported_and_recovered() {
    let nats = NatsServer::start();
    let mut redis = RedisServer::start();
    let worker = InProcessWorker::start(settings(&nats, Some(&redis), &[]), &nats).await;
    let metrics = format!("http://{}/metrics", admin_address(&nats).await);
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agents = register(&nats, &mut status, "e", 3).await;
    for (n, agent) in agents.iter().enumerate() {
        agent.report("busy", &ts(1)).await;
        if n > 0 {
            agent.report("idle", &ts(2)).await;
        }
    }
    // A session whose only task an agent holds and never finishes.
    let mut holder = SimAgent::start(&nats, "holder", &["job"], 1).await;
    let definition = json!({"id": "lost", "name": "lost", "version": "1", "tasks": [
        {"taskId": "t", "name": "t", "agentCapability": "job"}]});
    let session = api(
        &nats,
        "workflow",
        "trigger",
        json!({"workflowDefinition": definition}),
    )
    .await
    .expect("trigger");
    let session_id = session["sessionId"].as_str().expect("id").to_owned();
    holder.next_assignment().await;
    wait_until_quiet(&nats).await;

    // Without an append-only file the restarted server is empty.
    redis.restart();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = metrics_text(&metrics).await;
        if text.lines().any(|line| {
            line.starts_with("opscore_storage_data_loss_total ") && !line.ends_with(" 0")
        }) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "data loss not reported:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let missing = api(&nats, "agent", "get", json!({"agentId": "e0"}))
        .await
        .expect_err("gone");
    assert_eq!(missing.code, 404);

    // The registry comes back from the events stream, with the worker still running.
    let report = recover(&nats, &redis).await;
    assert!(
        report.contains("sessions lost with the storage, ended as failed: 1"),
        "{report}"
    );
    assert!(report.contains(&session_id), "{report}");
    for (n, agent) in agents.iter().enumerate() {
        let record = api(&nats, "agent", "get", json!({"agentId": agent.id}))
            .await
            .expect("rebuilt");
        let last = if n > 0 { "idle" } else { "busy" };
        assert_eq!(record["state"], last, "{record}");
        assert_eq!(record["capabilities"], json!(["x"]), "{record}");
    }
    let holder_record = api(&nats, "agent", "get", json!({"agentId": "holder"}))
        .await
        .expect("rebuilt");
    assert_eq!(
        holder_record["leases"],
        json!([]),
        "the lost session's lease is gone"
    );

    // The lost session ends, visibly, on its status subject.
    let ended = status
        .expect("the lost session's end", |subject, body| {
            subject == format!("opscore.status.session.{session_id}")
                && body["data"]["kind"] == "session.failed"
        })
        .await;
    assert_eq!(ended.1["data"]["error"]["reason"], "storage_lost");

    // A second run finds nothing left to do.
    let again = recover(&nats, &redis).await;
    assert!(again.contains(": 0 applied"), "{again}");
    assert!(
        again.contains("sessions lost with the storage, ended as failed: 0"),
        "{again}"
    );
    worker.stop().await;
}

/// A subscriber on a raw connection that, once its subscription is in place, reads nothing
/// more: what the server sends it piles up in a small receive buffer and then in the server.
struct StalledMonitor {
    _socket: tokio::net::TcpStream,
}

impl StalledMonitor {
    async fn subscribe(nats: &NatsServer, subject: &str) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("receive buffer");
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], nats.port));
        let mut stream = socket.connect(address).await.expect("connect");
        let hello = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"name\":\"stalled monitor\"}}\r\nSUB {subject} 1\r\nPING\r\n"
        );
        stream.write_all(hello.as_bytes()).await.expect("subscribe");
        // The server answers the PING after it processed the SUB.
        let mut received = Vec::new();
        while !received.windows(6).any(|w| w == b"PONG\r\n") {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .expect("PONG in time")
                .expect("read");
            assert!(
                n > 0,
                "server closed: {}",
                String::from_utf8_lossy(&received)
            );
            received.extend_from_slice(&chunk[..n]);
        }
        Self { _socket: stream }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_that_stops_reading_never_stalls_the_worker() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    // A process of its own, so that its counters count this test's events only.
    let mut worker = ChildWorker::spawn(&env_vars(&nats, &redis, &[]));
    worker.wait_until_serving(&nats).await;
    let metrics = format!("http://{}/metrics", admin_address(&nats).await);
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agents = register(&nats, &mut status, "m", 40).await;
    let _stalled = StalledMonitor::subscribe(&nats, "opscore.status.>").await;

    // 40 agents report 40 times each, in parallel; every report is a transition the stalled
    // monitor is sent and never reads.
    const REPORTS: i64 = 40;
    let publishers = publish_reports(&nats, &agents, REPORTS);
    for publisher in publishers {
        publisher.await.expect("publisher");
    }

    wait_until_quiet(&nats).await;
    assert_applied_once(&nats, &agents, REPORTS as usize).await;
    // A monitor that does read was sent every transition, up to each agent's last.
    for agent in &agents {
        let record = api(&nats, "agent", "get", json!({"agentId": agent.id}))
            .await
            .expect("agent.get");
        assert_eq!(
            record["staleEvents"], 0,
            "one worker applies an agent's events in order"
        );
        for _ in 0..REPORTS {
            status.agent_event(&agent.id, "state_changed").await;
        }
    }
    // The worker's own account: every event applied, none stale, duplicate or dead lettered.
    let text = metrics_text(&metrics).await;
    let events = |outcome: &str| {
        let series = format!("opscore_events_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(series.as_str()))
            .map_or(0, |n| n.parse::<u64>().expect("a count"))
    };
    let published = agents.len() as u64 * (1 + REPORTS as u64);
    assert_eq!(events("applied"), published, "{text}");
    for outcome in ["stale", "duplicate", "dead_lettered", "retry"] {
        assert_eq!(events(outcome), 0, "{outcome}: {text}");
    }
    drop(worker);
}
