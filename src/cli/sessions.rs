//! `opscore workflow|session|dlq`: workflows, sessions and dead letters of a running worker.

use serde_json::{Value, json};

use super::watch::{Ending, session_watch};
use super::{CliError, DlqCommand, SessionCommand, TriggerArgs, WorkflowCommand, api};
use crate::config::Settings;

fn print_json(value: &Value, one_line: bool) {
    if one_line {
        println!("{value}");
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    }
}

fn items<'a>(reply: &'a Value, field: &str) -> impl Iterator<Item = &'a Value> {
    reply[field].as_array().into_iter().flatten()
}

pub(super) async fn workflow(
    settings: &Settings,
    command: WorkflowCommand,
) -> Result<(), CliError> {
    match command {
        WorkflowCommand::Define { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
            let definition: Value = serde_json::from_str(&text)
                .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
            let reply = api(settings)
                .await?
                .call("workflow", "define", &definition)
                .await?;
            println!(
                "defined {} version {}",
                reply["workflowId"].as_str().unwrap_or("?"),
                reply["version"].as_str().unwrap_or("?")
            );
        }
        WorkflowCommand::List { json } => {
            let reply = api(settings)
                .await?
                .call("workflow", "list", &json!({}))
                .await?;
            if json {
                print_json(&reply, true);
                return Ok(());
            }
            println!("{:<32} {:<10} {:>5}  NAME", "WORKFLOW", "VERSION", "TASKS");
            for workflow in items(&reply, "workflows") {
                println!(
                    "{:<32} {:<10} {:>5}  {}",
                    workflow["id"].as_str().unwrap_or("?"),
                    workflow["version"].as_str().unwrap_or("?"),
                    workflow["tasks"].as_array().map_or(0, Vec::len),
                    workflow["name"].as_str().unwrap_or(""),
                );
            }
        }
        WorkflowCommand::Get {
            workflow_id,
            version,
        } => {
            let request = json!({ "workflowId": workflow_id, "version": version });
            print_json(
                &api(settings)
                    .await?
                    .call("workflow", "get", &request)
                    .await?,
                false,
            );
        }
        WorkflowCommand::Trigger(args) => trigger(settings, args).await?,
    }
    Ok(())
}

async fn trigger(settings: &Settings, args: TriggerArgs) -> Result<(), CliError> {
    let input: Value = match &args.input {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| CliError::Usage(format!("--input is not JSON: {e}")))?,
        None => json!({}),
    };
    let request = json!({
        "workflowId": args.workflow_id,
        "input": input,
        "agentId": args.agent,
        "idempotencyKey": args.idempotency_key,
    });
    let reply = api(settings)
        .await?
        .call("workflow", "trigger", &request)
        .await?;
    let session_id = reply["sessionId"].as_str().unwrap_or_default().to_owned();
    println!("{session_id}");
    if args.watch {
        return match session_watch(settings, &session_id, false).await? {
            Ending::Completed => Ok(()),
            Ending::FailedOrCancelled => Err(CliError::Unsuccessful),
        };
    }
    Ok(())
}

pub(super) async fn session(settings: &Settings, command: SessionCommand) -> Result<(), CliError> {
    match command {
        SessionCommand::Get { session_id, json } => {
            let reply = api(settings)
                .await?
                .call("session", "get", &json!({ "sessionId": session_id }))
                .await?;
            print_json(&reply, json);
        }
        SessionCommand::List {
            status,
            workflow,
            limit,
            json,
        } => {
            let request = json!({ "status": status, "workflowId": workflow, "limit": limit });
            let reply = api(settings)
                .await?
                .call("session", "list", &request)
                .await?;
            if !json {
                println!(
                    "{:<38} {:<24} {:<10} START",
                    "SESSION", "WORKFLOW", "STATUS"
                );
            }
            for session in items(&reply, "sessions") {
                if json {
                    println!("{session}");
                    continue;
                }
                println!(
                    "{:<38} {:<24} {:<10} {}",
                    session["sessionId"].as_str().unwrap_or("?"),
                    session["workflowId"].as_str().unwrap_or("?"),
                    session["status"].as_str().unwrap_or("?"),
                    session["startTime"].as_str().unwrap_or(""),
                );
            }
        }
        SessionCommand::Cancel { session_id } => {
            let reply = api(settings)
                .await?
                .call("session", "cancel", &json!({ "sessionId": session_id }))
                .await?;
            println!(
                "session {} {}",
                session_id,
                reply["status"].as_str().unwrap_or("?")
            );
        }
        SessionCommand::Watch { session_id, json } => {
            if session_watch(settings, &session_id, json).await? == Ending::FailedOrCancelled {
                return Err(CliError::Unsuccessful);
            }
        }
    }
    Ok(())
}

pub(super) async fn dlq(settings: &Settings, command: DlqCommand) -> Result<(), CliError> {
    match command {
        DlqCommand::List { limit, json } => {
            let reply = api(settings)
                .await?
                .call("dlq", "list", &json!({ "limit": limit }))
                .await?;
            if !json {
                println!("{:>8}  {:<24} {:<40} ERROR", "ID", "REASON", "ORIGINAL");
            }
            for entry in items(&reply, "entries") {
                if json {
                    println!("{entry}");
                    continue;
                }
                let original = entry["originalSubject"]
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| {
                        entry["task"]["taskId"]
                            .as_str()
                            .map(|t| format!("task {t}"))
                    })
                    .unwrap_or_default();
                println!(
                    "{:>8}  {:<24} {:<40} {}",
                    entry["id"],
                    entry["reason"].as_str().unwrap_or("?"),
                    original,
                    entry["error"].as_str().unwrap_or(""),
                );
            }
        }
        DlqCommand::Replay { id } => {
            let reply = api(settings)
                .await?
                .call("dlq", "replay", &json!({ "id": id }))
                .await?;
            match reply["sessionId"].as_str() {
                Some(session) => println!("replayed {id} as session {session}"),
                None => println!(
                    "replayed {id} to {}",
                    reply["subject"].as_str().unwrap_or("?")
                ),
            }
        }
    }
    Ok(())
}
