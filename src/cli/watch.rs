//! `opscore watch` and `opscore session watch`: the status streams as readable lines.

use futures::StreamExt;
use serde_json::{Value, json};

use super::{CliError, WatchArgs, api, connect};
use async_nats::jetstream::consumer;

use crate::api::ApiError;
use crate::bus::STATUS_STREAM;
use crate::config::Settings;
use crate::subjects;

pub(super) async fn watch(settings: &Settings, args: WatchArgs) -> Result<(), CliError> {
    let subject = match (&args.agent, &args.session) {
        (Some(agent), _) => subjects::agent_status(agent),
        (_, Some(session)) => subjects::session_status(session),
        _ => Ok(subjects::STATUS_ALL.to_owned()),
    }
    .map_err(|e| CliError::Api(ApiError::bad_request(e.to_string())))?;
    let client = connect(settings).await?;
    let mut subscription = client
        .subscribe(subject)
        .await
        .map_err(|e| CliError::Unavailable(e.to_string()))?;
    while let Some(message) = subscription.next().await {
        let text = String::from_utf8_lossy(&message.payload);
        if args.json {
            println!("{text}");
            continue;
        }
        match serde_json::from_str::<Value>(&text) {
            Ok(event) => println!("{}", status_line(&event)),
            Err(_) => println!("{} {text}", message.subject),
        }
    }
    Ok(())
}

/// One readable line for a status event.
pub fn status_line(event: &Value) -> String {
    let data = &event["data"];
    let time = event["time"].as_str().unwrap_or("");
    let kind = data["kind"].as_str().unwrap_or("?");
    let seq = data["seq"].as_u64().unwrap_or(0);
    if let Some(agent) = data["agentId"]
        .as_str()
        .filter(|_| data["sessionId"].is_null())
    {
        let state = data["state"].as_str().unwrap_or("?");
        let transition = match data["previousState"].as_str() {
            Some(previous) => format!("{previous} -> {state}"),
            None => state.to_owned(),
        };
        return format!("{time} agent {agent} #{seq} {kind} {transition}");
    }
    let session = data["sessionId"].as_str().unwrap_or("?");
    let mut line = format!("{time} session {session} #{seq} {kind}");
    for field in ["taskDefinitionId", "status", "agentId", "attempt"] {
        match &data[field] {
            Value::Null => {}
            Value::String(s) => line.push_str(&format!(" {field}={s}")),
            other => line.push_str(&format!(" {field}={other}")),
        }
    }
    line
}

/// How a followed session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    Completed,
    FailedOrCancelled,
}

/// Prints a session's transitions, from its first, until it ends. They are read from the
/// `OPSCORE_STATUS` stream with an ordered consumer, so none is missed or repeated, however
/// soon after the trigger the watch starts.
pub(super) async fn session_watch(
    settings: &Settings,
    session_id: &str,
    json_lines: bool,
) -> Result<Ending, CliError> {
    let subject = subjects::session_status(session_id)
        .map_err(|e| CliError::Api(ApiError::bad_request(e.to_string())))?;
    // Fails with 404 for a session that does not exist, rather than waiting forever.
    let session = api(settings)
        .await?
        .call("session", "get", &json!({ "sessionId": session_id }))
        .await?;
    // An ended session's transitions may have aged out of the stream; its record is the
    // answer then.
    let status = session["status"].as_str();
    if let Some(ending) = ending(status) {
        println!(
            "session {session_id} {} at {}",
            status.unwrap_or("?"),
            session["endTime"].as_str().unwrap_or("?")
        );
        return Ok(ending);
    }

    let unavailable = |e: &dyn std::fmt::Display| CliError::Unavailable(e.to_string());
    let jetstream = async_nats::jetstream::new(connect(settings).await?);
    let stream = jetstream
        .get_stream(STATUS_STREAM)
        .await
        .map_err(|e| unavailable(&e))?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| unavailable(&e))?;

    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| unavailable(&e))?;
        let Ok(event) = serde_json::from_slice::<Value>(&message.payload) else {
            continue;
        };
        if json_lines {
            println!("{event}");
        } else {
            println!("{}", status_line(&event));
        }
        let data = &event["data"];
        let is_session_event = data["kind"]
            .as_str()
            .is_some_and(|k| k.starts_with("session."));
        if is_session_event && let Some(ending) = ending(data["status"].as_str()) {
            return Ok(ending);
        }
    }
    Err(CliError::Unavailable("the status stream ended".to_owned()))
}

fn ending(status: Option<&str>) -> Option<Ending> {
    match status? {
        "completed" => Some(Ending::Completed),
        "failed" | "cancelled" => Some(Ending::FailedOrCancelled),
        _ => None,
    }
}
