//! The workflow engine end to end: definitions, triggers, placement on simulated agents,
//! results, retries, timeouts, cancellation and dead letters, against real servers.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::{Value, json};

struct Setup {
    nats: NatsServer,
    redis: RedisServer,
    worker: InProcessWorker,
    status: Watcher,
}

async fn setup(overrides: &[(&str, &str)]) -> Setup {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let directory = sample_workflows();
    let mut all = vec![("OPSCORE__WORKFLOWS__DIRECTORY", directory.as_str())];
    all.extend_from_slice(overrides);
    let worker = InProcessWorker::start(settings(&nats, Some(&redis), &all), &nats).await;
    let status = Watcher::subscribe(&nats, "opscore.status.>").await;
    Setup {
        nats,
        redis,
        worker,
        status,
    }
}

#[tokio::test]
async fn the_sample_workflow_runs_to_completion_with_results_passed_on() {
    let mut s = setup(&[]).await;
    let mut first = SimAgent::start(&s.nats, "agent-a", &["test_capability"], 1).await;
    let mut second = SimAgent::start(&s.nats, "agent-b", &["another_capability"], 1).await;

    let session_id = trigger(
        &s.nats,
        json!({"workflowId": "sample_workflow_id", "input": {"run": 1}}),
    )
    .await;

    let step_1 = first.next_assignment().await;
    assert_eq!(step_1["taskDefinitionId"], "step_1");
    assert_eq!(step_1["sessionId"], session_id.as_str());
    assert_eq!(step_1["workflowId"], "sample_workflow_id");
    assert_eq!(step_1["capability"], "test_capability");
    assert_eq!(
        step_1["parameters"],
        json!({"message": "This is the first step."})
    );
    assert_eq!(step_1["input"], json!({"run": 1}));
    assert_eq!(
        (step_1["attempt"].as_u64(), step_1["leaseEpoch"].as_u64()),
        (Some(1), Some(1))
    );
    first.progress(&step_1).await;
    first.complete(&step_1, json!({"words": 5})).await;

    let step_2 = second.next_assignment().await;
    assert_eq!(step_2["taskDefinitionId"], "step_2");
    assert_eq!(step_2["results"], json!({"step_1": {"words": 5}}));
    second.complete(&step_2, json!({"total": 123})).await;

    let done = session_event(&mut s.status, &session_id, "session.completed").await;
    assert_eq!(done["status"], "completed");
    let session = api(&s.nats, "session", "get", json!({"sessionId": session_id}))
        .await
        .expect("get");
    assert_eq!(session["status"], "completed");
    assert_eq!(
        session["result"],
        json!({"step_1": {"words": 5}, "step_2": {"total": 123}})
    );
    let tasks = session["tasks"].as_array().expect("tasks");
    assert!(tasks.iter().all(|t| t["status"] == "completed"));
    assert_eq!(tasks[0]["agentId"], "agent-a");
    s.worker.stop().await;
}

fn workflow(id: &str, tasks: Value) -> Value {
    json!({"id": id, "name": format!("Workflow {id}"), "version": "1", "tasks": tasks})
}

fn task(id: &str, capability: &str, depends_on: &[&str]) -> Value {
    json!({"taskId": id, "name": id, "agentCapability": capability, "dependsOn": depends_on})
}

#[tokio::test]
async fn a_diamond_fans_out_and_joins_with_both_results() {
    let mut s = setup(&[]).await;
    let mut agent = SimAgent::start(&s.nats, "d1", &["work"], 2).await;
    let definition = workflow(
        "diamond",
        json!([
            task("a", "work", &[]),
            task("b", "work", &["a"]),
            task("c", "work", &["a"]),
            task("d", "work", &["b", "c"]),
        ]),
    );
    api(&s.nats, "workflow", "define", definition)
        .await
        .expect("define");
    let session_id = trigger(&s.nats, json!({"workflowId": "diamond"})).await;

    let a = agent.next_assignment().await;
    assert_eq!(a["taskDefinitionId"], "a");
    agent.complete(&a, json!("A")).await;

    // Both branches are dispatched at once: the agent has two slots.
    let first = agent.next_assignment().await;
    let second = agent.next_assignment().await;
    let mut branches = [
        first["taskDefinitionId"].clone(),
        second["taskDefinitionId"].clone(),
    ];
    branches.sort_by_key(|v| v.to_string());
    assert_eq!(branches, [json!("b"), json!("c")]);
    assert_eq!(first["results"], json!({"a": "A"}));
    agent
        .complete(&first, json!(first["taskDefinitionId"]))
        .await;
    agent
        .complete(&second, json!(second["taskDefinitionId"]))
        .await;

    let d = agent.next_assignment().await;
    assert_eq!(d["taskDefinitionId"], "d");
    assert_eq!(d["results"], json!({"b": "b", "c": "c"}));
    agent.complete(&d, json!("D")).await;
    session_event(&mut s.status, &session_id, "session.completed").await;
    s.worker.stop().await;
}

#[tokio::test]
async fn a_failed_attempt_is_retried_after_backoff_then_succeeds() {
    let mut s = setup(&[]).await;
    let mut agent = SimAgent::start(&s.nats, "r1", &["flaky"], 1).await;
    let mut definition = workflow("retry", json!([task("only", "flaky", &[])]));
    definition["defaults"] =
        json!({"retry": {"maxAttempts": 3, "initialDelayMs": 50, "maxDelayMs": 100}});
    let session_id = trigger(&s.nats, json!({"workflowDefinition": definition})).await;

    let attempt_1 = agent.next_assignment().await;
    agent.fail(&attempt_1, "transient", true).await;
    let retrying = session_event(&mut s.status, &session_id, "task.retrying").await;
    assert_eq!(retrying["reason"]["reason"], "backoff");

    let attempt_2 = agent.next_assignment().await;
    assert_eq!(attempt_2["taskId"], attempt_1["taskId"]);
    assert_eq!(
        (
            attempt_2["attempt"].as_u64(),
            attempt_2["leaseEpoch"].as_u64()
        ),
        (Some(2), Some(2))
    );
    agent.complete(&attempt_2, json!({"ok": true})).await;
    session_event(&mut s.status, &session_id, "session.completed").await;
    s.worker.stop().await;
}

#[tokio::test]
async fn exhausted_retries_fail_the_session_dead_letter_the_task_and_replay_it() {
    let mut s = setup(&[]).await;
    let mut dlq = Watcher::subscribe(&s.nats, "opscore.dlq.>").await;
    let mut agent = SimAgent::start(&s.nats, "x1", &["doomed"], 1).await;
    let mut definition = workflow(
        "doomed",
        json!([
            task("only", "doomed", &[]),
            task("after", "doomed", &["only"])
        ]),
    );
    definition["defaults"] =
        json!({"retry": {"maxAttempts": 2, "initialDelayMs": 20, "maxDelayMs": 20}});
    api(&s.nats, "workflow", "define", definition)
        .await
        .expect("define");
    let session_id = trigger(&s.nats, json!({"workflowId": "doomed", "input": {"n": 7}})).await;

    for _ in 0..2 {
        let attempt = agent.next_assignment().await;
        agent.fail(&attempt, "broken input", true).await;
    }
    let failed = session_event(&mut s.status, &session_id, "session.failed").await;
    assert_eq!(failed["status"], "failed");
    let session = api(&s.nats, "session", "get", json!({"sessionId": session_id}))
        .await
        .expect("get");
    assert_eq!(session["error"]["taskDefinitionId"], "only");
    assert_eq!(session["error"]["message"], "broken input");
    assert_eq!(session["tasks"][1]["status"], "cancelled");

    let (subject, letter) = dlq.expect("task dead letter", |_, _| true).await;
    assert_eq!(subject, "opscore.dlq.retries_exhausted");
    assert_eq!(letter["data"]["attempt"], 2);

    let entries = api(&s.nats, "dlq", "list", json!({}))
        .await
        .expect("dlq.list");
    let entry = entries["entries"][0].clone();
    assert_eq!(entry["reason"], "retries_exhausted");
    let replay = api(&s.nats, "dlq", "replay", json!({"id": entry["id"]}))
        .await
        .expect("replay");
    let replayed = replay["sessionId"]
        .as_str()
        .expect("a new session")
        .to_owned();
    assert_ne!(replayed, session_id);
    let again = agent.next_assignment().await;
    assert_eq!(again["sessionId"], replayed.as_str());
    assert_eq!(again["input"], json!({"n": 7}));
    // Replaying the same letter again returns the same session.
    let twice = api(&s.nats, "dlq", "replay", json!({"id": entry["id"]}))
        .await
        .expect("replay");
    assert_eq!(twice["sessionId"], replayed.as_str());
    s.worker.stop().await;
}

#[tokio::test]
async fn a_non_retryable_error_fails_at_once() {
    let mut s = setup(&[]).await;
    let mut agent = SimAgent::start(&s.nats, "n1", &["strict"], 1).await;
    let session_id = trigger(
        &s.nats,
        json!({"workflowDefinition": workflow("strict", json!([task("t", "strict", &[])]))}),
    )
    .await;
    let attempt = agent.next_assignment().await;
    agent.fail(&attempt, "invalid request", false).await;
    session_event(&mut s.status, &session_id, "session.failed").await;
    agent.expect_nothing(Duration::from_millis(300)).await;
    s.worker.stop().await;
}

#[tokio::test]
async fn an_expired_lease_is_reassigned_and_the_late_result_is_rejected() {
    let mut s = setup(&[]).await;
    let mut slow = SimAgent::start(&s.nats, "slow", &["job"], 1).await;
    let mut definition = workflow("lease", json!([task("t", "job", &[])]));
    definition["defaults"] = json!({"timeoutSeconds": 1, "retry": {"maxAttempts": 3, "initialDelayMs": 10, "maxDelayMs": 10}});
    let session_id = trigger(&s.nats, json!({"workflowDefinition": definition})).await;

    let first = slow.next_assignment().await;
    // Silence: the lease expires, the holder is told to stop, and the task is retried.
    let (kind, cancelled) = slow.next_message().await;
    assert_eq!(kind, "opscore.task.cancelled.v1");
    assert_eq!(cancelled["leaseEpoch"], first["leaseEpoch"]);
    let mut fast = SimAgent::start(&s.nats, "fast", &["job"], 1).await;
    let second = tokio::select! {
        a = fast.next_assignment() => (a, "fast"),
        a = slow.next_assignment() => (a, "slow"),
    };
    let (second, holder) = second;
    assert_eq!(second["leaseEpoch"], 2);

    // The zombie's result for epoch 1 changes nothing.
    slow.complete(&first, json!({"late": true})).await;
    let worker_holder = if holder == "fast" { &fast } else { &slow };
    worker_holder.complete(&second, json!({"on": "time"})).await;
    session_event(&mut s.status, &session_id, "session.completed").await;
    let session = api(&s.nats, "session", "get", json!({"sessionId": session_id}))
        .await
        .expect("get");
    assert_eq!(session["result"], json!({"t": {"on": "time"}}));
    assert_eq!(session["tasks"][0]["attempt"], 2);
    s.worker.stop().await;
}

#[tokio::test]
async fn a_task_waits_for_a_capable_agent_and_runs_when_one_registers() {
    let mut s = setup(&[]).await;
    let session_id = trigger(
        &s.nats,
        json!({"workflowDefinition": workflow("wait", json!([task("t", "rare", &[])]))}),
    )
    .await;
    let pending = session_event(&mut s.status, &session_id, "task.pending").await;
    assert!(pending.get("taskId").is_some());
    let waiting = s
        .status
        .expect("the no_capable_agent reason", |_, body| {
            body["data"]["reason"]["reason"] == "no_capable_agent"
        })
        .await;
    assert_eq!(waiting.1["data"]["sessionId"], session_id.as_str());
    let session = api(&s.nats, "session", "get", json!({"sessionId": session_id}))
        .await
        .expect("get");
    assert_eq!(session["tasks"][0]["pending"]["reason"], "no_capable_agent");

    let mut agent = SimAgent::start(&s.nats, "rare-1", &["rare"], 1).await;
    let assignment = agent.next_assignment().await;
    assert_eq!(assignment["sessionId"], session_id.as_str());
    agent.complete(&assignment, json!(null)).await;
    session_event(&mut s.status, &session_id, "session.completed").await;
    s.worker.stop().await;
}

#[tokio::test]
async fn a_busy_agent_gets_the_next_task_when_its_slot_frees() {
    let mut s = setup(&[]).await;
    let mut agent = SimAgent::start(&s.nats, "one-slot", &["job"], 1).await;
    let definition = workflow("busy", json!([task("t", "job", &[])]));
    let first = trigger(&s.nats, json!({"workflowDefinition": definition.clone()})).await;
    let second = trigger(&s.nats, json!({"workflowDefinition": definition})).await;
    let task_1 = agent.next_assignment().await;
    let waiting = s
        .status
        .expect("all_capable_agents_busy", |_, body| {
            body["data"]["reason"]["reason"] == "all_capable_agents_busy"
        })
        .await;
    let waiting_session = waiting.1["data"]["sessionId"]
        .as_str()
        .expect("session")
        .to_owned();
    assert!(waiting_session == first || waiting_session == second);
    agent.complete(&task_1, json!(1)).await;
    // No idle report needed: the freed slot takes the waiting task.
    let task_2 = agent.next_assignment().await;
    assert_ne!(task_2["sessionId"], task_1["sessionId"]);
    agent.complete(&task_2, json!(2)).await;
    session_event(&mut s.status, &first, "session.completed").await;
    session_event(&mut s.status, &second, "session.completed").await;
    s.worker.stop().await;
}

/// A freed slot goes to the first waiting session that can take it; the sessions after it
/// are not read again only to find every agent busy. The worker runs as a child process, so
/// that its metrics count this test's placements alone.
#[tokio::test]
async fn a_freed_slot_wakes_one_waiting_session_not_all() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let mut worker = ChildWorker::spawn(&env_vars(
        &nats,
        &redis,
        &[("OPSCORE__WORKFLOWS__RECONCILE_INTERVAL_SECS", "86400")],
    ));
    worker.wait_until_serving(&nats).await;
    let metrics = format!("http://{}/metrics", admin_address(&nats).await);
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let mut agent = SimAgent::start(&nats, "solo-1", &["solo"], 1).await;
    let definition = workflow("herd", json!([task("t", "solo", &[])]));
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(trigger(&nats, json!({"workflowDefinition": definition.clone()})).await);
    }
    let mut assignment = agent.next_assignment().await;
    for _ in 0..3 {
        status
            .expect("all_capable_agents_busy", |_, body| {
                body["data"]["reason"]["reason"] == "all_capable_agents_busy"
            })
            .await;
    }
    let before = metrics_text(&metrics).await;

    for _ in 0..3 {
        agent.complete(&assignment, json!(null)).await;
        assignment = agent.next_assignment().await;
    }
    agent.complete(&assignment, json!(null)).await;
    // Results are applied in the agent's order, each with its follow-up: once every session
    // completed, the placements the first three results caused are over.
    let ended = wait_for_sessions(&nats, &sessions).await;
    assert!(
        ended.iter().all(|s| s["status"] == "completed"),
        "{ended:?}"
    );

    let after = metrics_text(&metrics).await;
    let moved = |outcome: &str| {
        let name = format!("opscore_placements_total{{outcome=\"{outcome}\"}}");
        sample(&after, &name) - sample(&before, &name)
    };
    assert_eq!(moved("dispatched"), 3.0, "{after}");
    assert_eq!(moved("unchanged"), 0.0, "{after}");
    worker.kill();
}

#[tokio::test]
async fn cancelling_a_session_reaches_the_agent_and_frees_its_slot() {
    let mut s = setup(&[]).await;
    let mut agent = SimAgent::start(&s.nats, "c1", &["job"], 1).await;
    let definition = workflow("cancel", json!([task("t", "job", &[])]));
    let session_id = trigger(&s.nats, json!({"workflowDefinition": definition.clone()})).await;
    let assignment = agent.next_assignment().await;

    let cancelled = api(
        &s.nats,
        "session",
        "cancel",
        json!({"sessionId": session_id}),
    )
    .await
    .expect("cancel");
    assert_eq!(cancelled["status"], "cancelled");
    let (kind, data) = agent.next_message().await;
    assert_eq!(kind, "opscore.task.cancelled.v1");
    assert_eq!(data["taskId"], assignment["taskId"]);
    session_event(&mut s.status, &session_id, "session.cancelled").await;

    let again = api(
        &s.nats,
        "session",
        "cancel",
        json!({"sessionId": session_id}),
    )
    .await
    .expect_err("409");
    assert_eq!(again.code, 409);
    // The slot is free again.
    let next = trigger(&s.nats, json!({"workflowDefinition": definition})).await;
    assert_eq!(agent.next_assignment().await["sessionId"], next.as_str());
    s.worker.stop().await;
}

#[tokio::test]
async fn agents_that_only_report_states_complete_their_tasks() {
    let mut s = setup(&[]).await;
    let mut agent = SimAgent::start(&s.nats, "old", &["legacy"], 1).await;
    let session_id = trigger(
        &s.nats,
        json!({"workflowDefinition": workflow("legacy", json!([task("t", "legacy", &[])]))}),
    )
    .await;
    let assignment = agent.next_assignment().await;
    let task_id = assignment["taskId"].as_str().expect("taskId");
    agent
        .agent
        .publish(
            "state",
            json!({"agentId": "old", "state": "ACTIVE", "timestamp": chrono::Utc::now(),
            "details": {"opscore_task_id": task_id}}),
        )
        .await;
    session_event(&mut s.status, &session_id, "task.running").await;
    agent
        .agent
        .publish(
            "state",
            json!({"agentId": "old", "state": "idle", "timestamp": chrono::Utc::now(),
            "details": {"opscore_task_id": task_id, "answer": 42}}),
        )
        .await;
    session_event(&mut s.status, &session_id, "session.completed").await;
    let session = api(&s.nats, "session", "get", json!({"sessionId": session_id}))
        .await
        .expect("get");
    assert_eq!(session["tasks"][0]["output"]["answer"], 42);
    s.worker.stop().await;
}

#[tokio::test]
async fn a_session_pinned_to_an_agent_runs_only_there() {
    let s = setup(&[]).await;
    let mut other = SimAgent::start(&s.nats, "other", &["job"], 1).await;
    let mut pinned = SimAgent::start(&s.nats, "pinned", &["job"], 1).await;
    let session_id = trigger(
        &s.nats,
        json!({"workflowDefinition": workflow("pin", json!([task("t", "job", &[])])), "agentId": "pinned"}),
    )
    .await;
    let assignment = pinned.next_assignment().await;
    assert_eq!(assignment["sessionId"], session_id.as_str());
    other.expect_nothing(Duration::from_millis(200)).await;
    let missing = api(&s.nats, "workflow", "trigger",
        json!({"workflowDefinition": workflow("pin", json!([task("t", "job", &[])])), "agentId": "ghost"}))
        .await
        .expect_err("unknown agent");
    assert_eq!(missing.code, 404);
    s.worker.stop().await;
}

#[tokio::test]
async fn definitions_are_validated_versioned_and_listed() {
    let s = setup(&[]).await;
    let listed = api(&s.nats, "workflow", "list", json!({}))
        .await
        .expect("list");
    assert_eq!(
        listed["workflows"][0]["id"], "sample_workflow_id",
        "loaded from the directory"
    );

    let cyclic = workflow(
        "cyc",
        json!([
            task("s", "x", &[]),
            task("a", "x", &["s", "b"]),
            task("b", "x", &["a"])
        ]),
    );
    let error = api(&s.nats, "workflow", "define", cyclic)
        .await
        .expect_err("cycle");
    assert_eq!(error.code, 400);
    assert!(error.message.contains("cycle"), "{}", error.message);
    let unknown = workflow("unk", json!([task("a", "x", &["nope"])]));
    let error = api(&s.nats, "workflow", "define", unknown)
        .await
        .expect_err("unknown reference");
    assert!(
        error.message.contains("task a") && error.message.contains("nope"),
        "{}",
        error.message
    );

    let v1 = workflow("ver", json!([task("a", "x", &[])]));
    let reply = api(&s.nats, "workflow", "define", v1.clone())
        .await
        .expect("define");
    assert_eq!(reply, json!({"workflowId": "ver", "version": "1"}));
    api(&s.nats, "workflow", "define", v1)
        .await
        .expect("the same definition again is fine");
    let changed = workflow("ver", json!([task("a", "y", &[])]));
    assert_eq!(
        api(&s.nats, "workflow", "define", changed.clone())
            .await
            .expect_err("409")
            .code,
        409
    );
    let mut v2 = changed;
    v2["version"] = json!("2");
    api(&s.nats, "workflow", "define", v2)
        .await
        .expect("a new version");
    let latest = api(&s.nats, "workflow", "get", json!({"workflowId": "ver"}))
        .await
        .expect("get");
    assert_eq!(latest["version"], "2");
    let old = api(
        &s.nats,
        "workflow",
        "get",
        json!({"workflowId": "ver", "version": "1"}),
    )
    .await
    .expect("get");
    assert_eq!(old["tasks"][0]["agentCapability"], "x");

    let error = api(
        &s.nats,
        "workflow",
        "trigger",
        json!({"workflowId": "nope"}),
    )
    .await
    .expect_err("404");
    assert_eq!(error.code, 404);
    let error = api(&s.nats, "workflow", "trigger", json!({}))
        .await
        .expect_err("400");
    assert_eq!(error.code, 400);
    s.worker.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_returns_the_session_it_created() {
    let s = setup(&[]).await;
    let request = json!({"workflowId": "sample_workflow_id", "idempotencyKey": "order-42"});
    let first = api(&s.nats, "workflow", "trigger", request.clone())
        .await
        .expect("trigger");
    let second = api(&s.nats, "workflow", "trigger", request)
        .await
        .expect("trigger");
    assert_eq!(first["sessionId"], second["sessionId"]);
    assert_eq!(
        (first["created"].as_bool(), second["created"].as_bool()),
        (Some(true), Some(false))
    );

    let listed = api(
        &s.nats,
        "session",
        "list",
        json!({"workflowId": "sample_workflow_id"}),
    )
    .await
    .expect("list");
    assert_eq!(listed["sessions"].as_array().map(Vec::len), Some(1));
    let running = api(&s.nats, "session", "list", json!({"status": "completed"}))
        .await
        .expect("list");
    assert_eq!(running["sessions"].as_array().map(Vec::len), Some(0));
    s.worker.stop().await;
}

#[tokio::test]
async fn a_result_for_no_session_is_dead_lettered() {
    let s = setup(&[]).await;
    let mut dlq = Watcher::subscribe(&s.nats, "opscore.dlq.>").await;
    let agent = SimAgent::start(&s.nats, "u1", &["job"], 1).await;
    let task = json!({"taskId": "01890a5d-ac96-774b-bcce-b302099a8057-step", "leaseEpoch": 1});
    agent.complete(&task, json!(null)).await;
    let (subject, _) = dlq.expect("unknown_task", |_, _| true).await;
    assert_eq!(subject, "opscore.dlq.unknown_task");
    s.worker.stop().await;
}

#[tokio::test]
async fn a_task_nobody_takes_fails_after_its_queue_timeout() {
    let mut s = setup(&[]).await;
    let mut dlq = Watcher::subscribe(&s.nats, "opscore.dlq.>").await;
    let mut definition = workflow("queue", json!([task("t", "nobody", &[])]));
    definition["tasks"][0]["queueTimeoutSeconds"] = json!(1);
    let session_id = trigger(&s.nats, json!({"workflowDefinition": definition})).await;
    let failed = session_event(&mut s.status, &session_id, "session.failed").await;
    assert_eq!(failed["status"], "failed");
    let (subject, letter) = dlq.expect("queue_timeout dead letter", |_, _| true).await;
    assert_eq!(subject, "opscore.dlq.queue_timeout");
    assert!(
        letter["data"]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nobody"))
    );
    s.worker.stop().await;
}

/// An agent's record version, when it was last heard from and its liveness deadline (ms), as
/// Redis holds them.
async fn liveness_of(redis: &RedisServer, agent_id: &str) -> (u64, i64, i64) {
    let mut connection = redis.connection().await;
    let (version, data): (u64, String) = redis::cmd("HMGET")
        .arg(format!("opscore:agent:{agent_id}"))
        .arg("v")
        .arg("d")
        .query_async(&mut connection)
        .await
        .expect("agent record");
    let record: Value = serde_json::from_str(&data).expect("record JSON");
    let last_seen = record["lastSeen"]
        .as_str()
        .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
        .expect("lastSeen")
        .timestamp_millis();
    let deadline: f64 = redis::cmd("ZSCORE")
        .arg("opscore:timers:liveness")
        .arg(agent_id)
        .query_async(&mut connection)
        .await
        .expect("liveness deadline");
    (version, last_seen, deadline as i64)
}

/// A result proves its agent alive. The commit that frees the agent's slot moves its liveness
/// deadline too, so the record is written once per result: a second write for liveness would
/// fail placements racing for the agent.
#[tokio::test]
async fn a_result_refreshes_its_agents_liveness_in_the_commit_that_frees_its_slot() {
    let s = setup(&[]).await;
    let mut agent = SimAgent::start(&s.nats, "lively", &["test_capability"], 1).await;
    trigger(&s.nats, json!({"workflowId": "sample_workflow_id"})).await;
    let step = agent.next_assignment().await;
    wait_until_quiet(&s.nats).await;
    let (assigned, _, _) = liveness_of(&s.redis, "lively").await;

    let sent = chrono::Utc::now().timestamp_millis();
    agent.complete(&step, json!(1)).await;
    wait_until_quiet(&s.nats).await;
    let (version, last_seen, deadline) = liveness_of(&s.redis, "lively").await;
    assert_eq!(
        version,
        assigned + 1,
        "one write for the slot and the liveness"
    );
    assert!(
        last_seen >= sent,
        "heard from at {last_seen}, result sent at {sent}"
    );
    assert_eq!(deadline, last_seen + 30_000, "the default liveness timeout");
    s.worker.stop().await;
}

/// The fleet-wide counters behind the gauges, as Redis holds them.
async fn counters(redis: &RedisServer) -> std::collections::HashMap<String, i64> {
    let mut connection = redis.connection().await;
    redis::cmd("HGETALL")
        .arg("opscore:counters")
        .query_async(&mut connection)
        .await
        .expect("counters")
}

#[tokio::test]
async fn ended_sessions_leave_the_waiting_index_and_the_gauges() {
    let mut s = setup(&[]).await;
    let mut definition = workflow("leave", json!([task("t", "nobody", &[])]));
    definition["tasks"][0]["queueTimeoutSeconds"] = json!(1);
    let session_id = trigger(&s.nats, json!({"workflowDefinition": definition})).await;
    session_event(&mut s.status, &session_id, "session.failed").await;

    let mut agent = SimAgent::start(&s.nats, "gauge", &["test_capability"], 1).await;
    let done = trigger(&s.nats, json!({"workflowId": "sample_workflow_id"})).await;
    let step = agent.next_assignment().await;
    agent.complete(&step, json!(1)).await;
    // step_2's placement, which finds no agent, is the last change of the session.
    let subject = format!("opscore.status.session.{done}");
    s.status
        .expect("step_2 waiting for an agent", |sub, body| {
            sub == subject && body["data"]["reason"]["reason"] == "no_capable_agent"
        })
        .await;

    let mut connection = s.redis.connection().await;
    let waiting: i64 = redis::cmd("ZCARD")
        .arg("opscore:waiting:nobody")
        .query_async(&mut connection)
        .await
        .expect("zcard");
    assert_eq!(waiting, 0, "a failed session waits for nothing");
    let counters = counters(&s.redis).await;
    assert_eq!(counters.get("sessions:failed"), Some(&1), "{counters:?}");
    assert_eq!(
        counters.get("sessions:running"),
        Some(&1),
        "the sample session: {counters:?}"
    );
    assert_eq!(
        counters
            .get("tasks:pending:no_capable_agent")
            .copied()
            .unwrap_or(0),
        1,
        "step_2 waits: {counters:?}"
    );
    assert_eq!(
        counters
            .get("tasks:pending:waiting_on")
            .copied()
            .unwrap_or(0),
        0,
        "{counters:?}"
    );
    s.worker.stop().await;
}

#[tokio::test]
async fn an_agent_that_never_acknowledges_its_dispatches_loses_the_task_to_another() {
    let mut s = setup(&[]).await;
    // This agent takes its assignments through a durable JetStream consumer, as a careful
    // agent would, then neither acknowledges them nor reports anything.
    let jetstream = async_nats::jetstream::new(s.nats.client().await);
    let stream = jetstream
        .get_stream("OPSCORE_DISPATCH")
        .await
        .expect("dispatch stream");
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("mute".to_owned()),
            filter_subject: "opscore.dispatch.mute".to_owned(),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("the agent's consumer");
    let mute = AgentClient::new(&s.nats, "mute").await;
    mute.register(&["job"]).await;
    mute.report("idle", &chrono::Utc::now().to_rfc3339()).await;

    let mut definition = workflow("mute", json!([task("t", "job", &[])]));
    definition["defaults"] = json!({"timeoutSeconds": 1, "retry": {"maxAttempts": 3, "initialDelayMs": 10, "maxDelayMs": 10}});
    let session_id = trigger(&s.nats, json!({"workflowDefinition": definition})).await;
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(WAIT)
        .messages()
        .await
        .expect("fetch");
    let received = batch
        .next()
        .await
        .expect("the assignment reaches the agent")
        .expect("a message");
    let first: Value = serde_json::from_slice(&received.payload).expect("JSON");
    assert_eq!(first["type"], "opscore.task.assigned.v1");
    assert_eq!(first["data"]["sessionId"], session_id.as_str());

    // The mute agent says it is busy, as one stuck on its work would (so the retry cannot go
    // back to it), and a working agent arrives: once the lease expires, the retry reaches it.
    mute.report("busy", &chrono::Utc::now().to_rfc3339()).await;
    let mut worker = SimAgent::start(&s.nats, "worker", &["job"], 1).await;
    let assignment = worker.next_assignment().await;
    assert_eq!(assignment["sessionId"], session_id.as_str());
    assert_eq!(assignment["leaseEpoch"], 2, "{assignment}");
    worker.complete(&assignment, json!({"done": true})).await;
    session_event(&mut s.status, &session_id, "session.completed").await;
    let session = api(&s.nats, "session", "get", json!({"sessionId": session_id}))
        .await
        .expect("get");
    assert_eq!(session["result"], json!({"t": {"done": true}}));

    // The first assignment was never acknowledged, and the engine did not need it to be.
    let mut consumer = consumer;
    let info = consumer.info().await.expect("consumer info");
    assert!(
        info.num_ack_pending + info.num_pending as usize >= 1,
        "{info:?}"
    );
    s.worker.stop().await;
}
