//! The workflow engine end to end: definitions, triggers, placement on simulated agents,
//! results, retries, timeouts, cancellation and dead letters, against real servers.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

struct Setup {
    nats: NatsServer,
    _redis: RedisServer,
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
        _redis: redis,
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
