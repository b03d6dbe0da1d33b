//! The `opscore` binary: configuration errors, the client commands against a running worker,
//! `watch`, and shutdown on SIGTERM.

mod common;

use std::process::{Command, Output, Stdio};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

fn opscore(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_opscore"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run opscore")
}

/// The same, without blocking the runtime that serves the in-process worker.
async fn opscore_async(args: &[&str], env: &[(&str, &str)]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_opscore"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .expect("run opscore")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn every_command_explains_itself() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["agent", "--help"],
        vec!["agent", "list", "--help"],
        vec!["agent", "get", "--help"],
        vec!["watch", "--help"],
    ] {
        let output = opscore(&args, &[]);
        assert!(output.status.success(), "{args:?}");
        assert!(stdout(&output).contains("Usage:"), "{args:?}");
    }
    assert!(stdout(&opscore(&["--help"], &[])).contains("operations core for fleets of AI agents"));
}

#[test]
fn an_invalid_environment_value_stops_startup_and_names_the_key() {
    let output = opscore(&["run"], &[("OPSCORE__NATS__PING_INTERVAL_SECS", "0")]);
    assert_eq!(output.status.code(), Some(78));
    assert!(
        stderr(&output).contains("nats.ping_interval_secs"),
        "{}",
        stderr(&output)
    );

    let output = opscore(&["run"], &[("OPSCORE__STORAGE__BACKEND", "postgres")]);
    assert_eq!(output.status.code(), Some(78));
    assert!(stderr(&output).contains("backend"), "{}", stderr(&output));
}

#[test]
fn a_missing_config_file_is_a_configuration_error() {
    let output = opscore(&["--config", "/nonexistent/opscore.toml", "run"], &[]);
    assert_eq!(output.status.code(), Some(78));
    assert!(
        stderr(&output).contains("opscore.toml"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn client_commands_report_an_unreachable_nats() {
    let output = opscore(
        &["agent", "list"],
        &[
            ("OPSCORE__NATS__SERVERS", "nats://127.0.0.1:1"),
            ("OPSCORE__NATS__CONNECT_TIMEOUT_SECS", "1"),
        ],
    );
    assert_eq!(output.status.code(), Some(69));
    assert!(
        stderr(&output).contains("cannot connect"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn agent_commands_query_a_running_worker() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let worker = InProcessWorker::start(settings(&nats, Some(&redis), &[]), &nats).await;
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agent = AgentClient::new(&nats, "cli-1").await;
    agent.register(&["translate"]).await;
    agent.report("idle", &ts(1)).await;
    status.agent_event("cli-1", "state_changed").await;

    // The server address reaches the binary through a real environment variable.
    let url = nats.url();
    let env = [("OPSCORE__NATS__SERVERS", url.as_str())];
    let list = opscore_async(&["agent", "list"], &env).await;
    assert!(list.status.success(), "{}", stderr(&list));
    let table = stdout(&list);
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|header| header.starts_with("AGENT"))
    );
    assert!(
        table.contains("cli-1") && table.contains("idle") && table.contains("translate"),
        "{table}"
    );

    let json_list = opscore_async(
        &["agent", "list", "--capability", "translate", "--json"],
        &env,
    )
    .await;
    let agents: Vec<Value> = stdout(&json_list)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["agentId"], "cli-1");

    let get = opscore_async(&["agent", "get", "cli-1", "--json"], &env).await;
    let record: Value = serde_json::from_str(&stdout(&get)).expect("json");
    assert_eq!(record["state"], "idle");
    assert_eq!(record["history"][0]["state"], "idle");

    let missing = opscore_async(&["agent", "get", "nobody"], &env).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("not registered"),
        "{}",
        stderr(&missing)
    );
    worker.stop().await;
}

#[tokio::test]
async fn watch_prints_each_transition_as_it_happens() {
    let nats = NatsServer::start();
    let worker = InProcessWorker::start(settings(&nats, None, &[]), &nats).await;
    let url = nats.url();

    let mut readable = tokio::process::Command::new(env!("CARGO_BIN_EXE_opscore"))
        .args(["watch", "--agent", "w-1"])
        .env("OPSCORE__NATS__SERVERS", &url)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("watch");
    let mut machine = tokio::process::Command::new(env!("CARGO_BIN_EXE_opscore"))
        .args(["watch", "--json"])
        .env("OPSCORE__NATS__SERVERS", &url)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("watch --json");
    let mut readable_lines = BufReader::new(readable.stdout.take().expect("stdout")).lines();
    let mut machine_lines = BufReader::new(machine.stdout.take().expect("stdout")).lines();

    // The watchers subscribe after starting; registering again until one line arrives
    // covers the moment in between without guessing its length.
    let agent = AgentClient::new(&nats, "w-1").await;
    let first = loop {
        agent.register(&["x"]).await;
        let next = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            readable_lines.next_line(),
        )
        .await;
        if let Ok(line) = next {
            break line.expect("read").expect("a line");
        }
    };
    assert!(
        first.contains("agent w-1") && first.contains("registered"),
        "{first}"
    );

    agent.report("busy", &ts(1)).await;
    let line = loop {
        let line = tokio::time::timeout(WAIT, readable_lines.next_line())
            .await
            .expect("a line in time")
            .expect("read")
            .expect("a line");
        if line.contains("state_changed") {
            break line;
        }
    };
    assert!(line.contains("unknown -> busy"), "{line}");

    let json_line = tokio::time::timeout(WAIT, machine_lines.next_line())
        .await
        .expect("a line in time")
        .expect("read")
        .expect("a line");
    let event: Value = serde_json::from_str(&json_line).expect("--json prints JSON");
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["data"]["agentId"], json!("w-1"));
    worker.stop().await;
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let mut worker = ChildWorker::spawn(&env_vars(&nats, &redis, &[]));
    wait_until_serving(&nats).await;
    let agent = AgentClient::new(&nats, "t-1").await;
    agent.register(&["x"]).await;
    for i in 0..50 {
        agent
            .report(if i % 2 == 0 { "busy" } else { "idle" }, &ts(i))
            .await;
    }

    let status = worker.terminate();
    assert!(status.success(), "exit status {status:?}");
    let log = worker.log_text();
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("intake drained"), "{log}");
    assert!(log.contains("opscore stopped"), "{log}");
}

/// The README's demo: a worker with the sample workflow, two example agents, and one command
/// that triggers the workflow and follows it to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_demo_runs_the_sample_workflow_to_completion() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let directory = sample_workflows();
    let _worker = ChildWorker::spawn(&env_vars(
        &nats,
        &redis,
        &[("OPSCORE__WORKFLOWS__DIRECTORY", &directory)],
    ));
    wait_until_serving(&nats).await;
    let mut status = Watcher::subscribe(&nats, "opscore.status.agent.>").await;

    let example = std::path::Path::new(env!("CARGO_BIN_EXE_opscore"))
        .parent()
        .expect("target dir")
        .join("examples/agent");
    let url = nats.url();
    let mut agents = Vec::new();
    for (id, capability) in [
        ("agent-a", "test_capability"),
        ("agent-b", "another_capability"),
    ] {
        agents.push(
            tokio::process::Command::new(&example)
                .args([
                    "--id",
                    id,
                    "--capability",
                    capability,
                    "--nats",
                    &url,
                    "--work-ms",
                    "20",
                ])
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("example agent (built by cargo test)"),
        );
        status.agent_event(id, "state_changed").await;
    }

    let demo = opscore_async(
        &["workflow", "trigger", "sample_workflow_id", "--watch"],
        &[("OPSCORE__NATS__SERVERS", url.as_str())],
    )
    .await;
    let printed = stdout(&demo);
    assert!(demo.status.success(), "{printed}\n{}", stderr(&demo));
    assert!(
        printed.contains("#1 session.started"),
        "the whole history: {printed}"
    );
    assert!(printed.contains("session.completed"), "{printed}");
    assert!(printed.contains("taskDefinitionId=step_2"), "{printed}");
}
