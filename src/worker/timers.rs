//! The timer loop: liveness deadlines and the outbox sweep. Timers live in the repository, so
//! any worker may fire a due one and a claim keeps two workers from firing it at once.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::agents::Agents;
use crate::registry::AgentCommand;
use crate::repository::{Repository, RepositoryError};

/// Timers claimed per round.
const BATCH: usize = 256;
/// How long a claim keeps other workers off a timer; a worker that dies holding it delays the
/// timer by at most this much.
const CLAIM: chrono::Duration = chrono::Duration::seconds(10);

/// What one round of timers did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimerReport {
    /// Agents whose liveness deadline was checked.
    pub liveness_checked: usize,
    /// Messages taken from the outbox and published again.
    pub outbox_republished: usize,
}

/// Runs due timers once; the loop calls this, and tests call it directly.
pub async fn run_due<R: Repository>(agents: &Agents<R>) -> Result<TimerReport, RepositoryError> {
    let now = Utc::now();
    let mut report = TimerReport::default();

    let due = agents
        .repository()
        .claim_due_liveness(now, now + CLAIM, BATCH)
        .await?;
    for agent_id in due {
        agents
            .execute(&agent_id, None, AgentCommand::CheckLiveness)
            .await?;
        report.liveness_checked += 1;
    }

    let stranded = agents
        .repository()
        .claim_due_outbox(now, now + CLAIM, BATCH)
        .await?;
    if !stranded.is_empty() {
        report.outbox_republished = stranded.len();
        metrics::counter!("opscore_outbox_republished_total").increment(stranded.len() as u64);
        info!(
            count = stranded.len(),
            "republishing messages left in the outbox"
        );
        agents.flush(&stranded).await;
    }
    Ok(report)
}

pub(crate) async fn run<R: Repository>(
    agents: Agents<R>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match run_due(&agents).await {
            Ok(report) => {
                if failing {
                    info!("timers running again");
                    failing = false;
                }
                debug!(?report, "timers");
            }
            // Logged once per outage rather than on every tick.
            Err(error) if !failing => {
                warn!(%error, "timers cannot reach storage");
                failing = true;
            }
            Err(_) => {}
        }
    }
}
