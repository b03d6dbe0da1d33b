//! `opscore agent list|get`.

use serde_json::{Value, json};

use super::{CliError, ListArgs, api};
use crate::config::Settings;

pub(super) async fn agent_list(settings: &Settings, args: ListArgs) -> Result<(), CliError> {
    let client = api(settings).await?;
    let mut cursor: Option<String> = None;
    if !args.json {
        println!(
            "{:<24} {:<24} {:<13} {:<25} CAPABILITIES",
            "AGENT", "NAME", "STATE", "LAST SEEN"
        );
    }
    loop {
        let request = json!({
            "capability": args.capability,
            "state": args.state,
            "limit": args.limit,
            "cursor": cursor,
        });
        let page = client.call("agent", "list", &request).await?;
        for agent in page["agents"].as_array().into_iter().flatten() {
            if args.json {
                println!("{agent}");
            } else {
                println!("{}", agent_row(agent));
            }
        }
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(()),
        }
    }
}

fn agent_row(agent: &Value) -> String {
    let capabilities: Vec<&str> = agent["capabilities"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut state = agent["state"].as_str().unwrap_or("?").to_owned();
    if agent["deregistered"].as_bool() == Some(true) {
        state.push('*');
    }
    format!(
        "{:<24} {:<24} {:<13} {:<25} {}",
        agent["agentId"].as_str().unwrap_or("?"),
        agent["agentName"].as_str().unwrap_or(""),
        state,
        agent["lastSeen"].as_str().unwrap_or(""),
        capabilities.join(","),
    )
}

pub(super) async fn agent_get(
    settings: &Settings,
    agent_id: &str,
    json: bool,
) -> Result<(), CliError> {
    let client = api(settings).await?;
    let agent = client
        .call("agent", "get", &json!({ "agentId": agent_id }))
        .await?;
    if json {
        println!("{agent}");
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&agent).unwrap_or_default()
        );
    }
    Ok(())
}
