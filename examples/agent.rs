//! A small agent to copy when connecting your own: it registers with its capabilities,
//! reports `idle`, sends heartbeats, takes assignments from `opscore.dispatch.<agentId>`,
//! reports progress, and publishes a result for each task.
//!
//! It talks plain NATS and JSON, exactly as `subjects.md` describes, so the same steps work
//! from any language. Run two of them for the README demo:
//!
//! ```text
//! cargo run --example agent -- --id agent-a --capability test_capability
//! cargo run --example agent -- --id agent-b --capability another_capability
//! ```

use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};

/// An example opscore agent.
#[derive(Debug, Parser)]
struct Args {
    /// The agent id: letters, digits, '_' and '-'.
    #[arg(long)]
    id: String,
    /// A capability this agent offers; repeat for several.
    #[arg(long = "capability", required = true)]
    capabilities: Vec<String>,
    /// NATS server address.
    #[arg(long, default_value = "nats://127.0.0.1:4222", env = "NATS_URL")]
    nats: String,
    /// How long each task takes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    work_ms: u64,
    /// Tasks taken at once.
    #[arg(long, default_value_t = 1)]
    max_concurrent_tasks: u32,
}

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let args = Args::parse();
    let client = async_nats::connect(&args.nats).await?;
    let jetstream = jetstream::new(client.clone());

    // Subscribe before registering, so no assignment can arrive before anyone listens.
    let mut assignments = client
        .subscribe(format!("opscore.dispatch.{}", args.id))
        .await?;

    let events = format!("opscore.agent.{}", args.id);
    let registration = json!({
        "agentId": args.id,
        "agentName": format!("Example agent {}", args.id),
        "version": env!("CARGO_PKG_VERSION"),
        "capabilities": args.capabilities,
        "maxConcurrentTasks": args.max_concurrent_tasks,
        "metadata": {"example": true},
    });
    publish(&jetstream, format!("{events}.register"), registration).await?;
    let idle = json!({"agentId": args.id, "state": "idle", "timestamp": Utc::now()});
    publish(&jetstream, format!("{events}.state"), idle).await?;
    println!("agent {} ready for {:?}", args.id, args.capabilities);

    // Heartbeats keep the agent alive in opscore's eyes between tasks.
    let heartbeat = {
        let (jetstream, subject, id) = (
            jetstream.clone(),
            format!("{events}.heartbeat"),
            args.id.clone(),
        );
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(10));
            loop {
                ticker.tick().await;
                let beat = json!({"agentId": id, "timestamp": Utc::now()});
                if publish(&jetstream, subject.clone(), beat).await.is_err() {
                    eprintln!("heartbeat not acknowledged");
                }
            }
        })
    };

    while let Some(message) = assignments.next().await {
        let Ok(event) = serde_json::from_slice::<Value>(&message.payload) else {
            eprintln!("ignoring a message that is not JSON");
            continue;
        };
        let task = &event["data"];
        match event["type"].as_str() {
            Some("opscore.task.assigned.v1") => {
                let (task_id, epoch) = (task["taskId"].clone(), task["leaseEpoch"].clone());
                println!(
                    "task {task_id}: {} (attempt {})",
                    task["name"], task["attempt"]
                );
                let progress =
                    json!({"taskId": task_id, "leaseEpoch": epoch, "details": {"step": "started"}});
                publish(&jetstream, format!("{events}.task.progress"), progress).await?;

                tokio::time::sleep(Duration::from_millis(args.work_ms)).await;

                let result = json!({
                    "taskId": task_id,
                    "leaseEpoch": epoch,
                    "status": "completed",
                    "output": {"by": args.id, "parameters": task["parameters"], "received": task["results"]},
                });
                publish(&jetstream, format!("{events}.task.result"), result).await?;
                println!("task {task_id}: completed");
            }
            Some("opscore.task.cancelled.v1") => println!("task {} cancelled", task["taskId"]),
            other => eprintln!("ignoring a message of type {other:?}"),
        }
    }
    heartbeat.abort();
    Ok(())
}

/// Publishes to JetStream and waits for the stream to store the event, so nothing the agent
/// reports is lost in transit.
async fn publish(
    jetstream: &jetstream::Context,
    subject: String,
    payload: Value,
) -> Result<(), async_nats::Error> {
    jetstream
        .publish(subject, payload.to_string().into())
        .await?
        .await?;
    Ok(())
}
