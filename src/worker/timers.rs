//! The timer loop: agent liveness, workflow timers (lease deadlines, retry backoff, queue
//! timeouts) and the outbox sweep; and the reconciler. Timers live in the repository, so any
//! worker may fire a due one, and a claim keeps two workers from firing it at once.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::agents::Agents;
use super::sessions::Sessions;
use crate::admin::Loops;
use crate::registry::AgentCommand;
use crate::repository::{Repository, RepositoryError};

/// Timers claimed per round.
const BATCH: usize = 256;
/// How long a claim keeps other workers off a timer; a worker that dies holding it delays the
/// timer by at most this much.
const CLAIM: chrono::Duration = chrono::Duration::seconds(10);
/// Active sessions the reconciler reads per page.
const RECONCILE_PAGE: usize = 200;

/// What one round of timers did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimerReport {
    /// Agents whose liveness deadline was checked.
    pub liveness_checked: usize,
    /// Workflow timers fired.
    pub workflow_timers: usize,
    /// Messages taken from the outbox and published again.
    pub outbox_republished: usize,
}

/// Runs due timers once; the loop calls this, and tests call it directly.
pub async fn run_due<R: Repository>(
    agents: &Agents<R>,
    sessions: &Sessions<R>,
) -> Result<TimerReport, RepositoryError> {
    let now = Utc::now();
    let repository = agents.repository();
    let mut report = TimerReport::default();

    let due = repository
        .claim_due_liveness(now, now + CLAIM, BATCH)
        .await?;
    for agent_id in due {
        agents
            .execute(&agent_id, None, AgentCommand::CheckLiveness, None)
            .await?;
        report.liveness_checked += 1;
    }

    let timers = repository.claim_due_timers(now, now + CLAIM, BATCH).await?;
    for timer in timers {
        sessions.fire(&timer).await?;
        report.workflow_timers += 1;
    }

    let stranded = repository.claim_due_outbox(now, now + CLAIM, BATCH).await?;
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

/// What the reconciler found and repaired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Active sessions examined.
    pub sessions: usize,
    /// Tasks that were ready with an eligible agent but that no event had placed: dispatched now.
    pub placed: usize,
}

/// Re-examines every active session once. Placement is normally triggered by events; a
/// session with ready tasks found here lost its trigger (a worker died between a commit and
/// the placement that should follow it), and this repairs it.
pub async fn reconcile<R: Repository>(
    sessions: &Sessions<R>,
) -> Result<ReconcileReport, RepositoryError> {
    let repository = sessions.repository();
    let mut report = ReconcileReport::default();
    let mut cursor: Option<String> = None;
    loop {
        let page = repository
            .active_sessions(cursor.as_deref(), RECONCILE_PAGE)
            .await?;
        for session_id in &page.items {
            report.sessions += 1;
            // Placement is idempotent: a session whose ready tasks have no eligible agent
            // only has its reasons confirmed. A dispatch here is drift: a placement that an
            // event should have triggered and did not (a worker died in between).
            report.placed += sessions.schedule(session_id).await?;
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    if report.placed > 0 {
        metrics::counter!("opscore_reconciler_repairs_total").increment(report.placed as u64);
        warn!(
            placed = report.placed,
            "reconciler dispatched tasks no event had placed"
        );
    }
    Ok(report)
}

/// Watches the storage's generation: a change means Redis came back without its data.
#[derive(Debug, Default)]
pub struct GenerationWatch {
    known: Option<String>,
}

impl GenerationWatch {
    /// Reads the generation (writing one if there is none) and reports a change as data loss.
    /// Returns true when data loss was detected by this call.
    pub async fn check<R: Repository>(&mut self, repository: &R) -> Result<bool, RepositoryError> {
        let candidate = uuid::Uuid::new_v4().to_string();
        let current = repository.generation(&candidate).await?;
        let lost = self.known.as_ref().is_some_and(|known| *known != current);
        if lost {
            metrics::counter!("opscore_storage_data_loss_total").increment(1);
            error!(
                previous = self.known.as_deref().unwrap_or_default(),
                current,
                "storage lost its data: agents, sessions and timers written before are gone; see docs/operations.md"
            );
        }
        self.known = Some(current);
        Ok(lost)
    }
}

pub(crate) async fn run<R: Repository>(
    agents: Agents<R>,
    sessions: Sessions<R>,
    loops: Arc<Loops>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut generation = GenerationWatch::default();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Err(error) = generation.check(agents.repository()).await {
            debug!(%error, "generation not checked");
        }
        let result = run_due(&agents, &sessions).await;
        loops.timer_ticked();
        failing = report_health("timers", result.map(|r| debug!(?r, "timers")), failing);
    }
}

pub(crate) async fn run_reconciler<R: Repository>(
    sessions: Sessions<R>,
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
        let result = reconcile(&sessions).await;
        failing = report_health(
            "reconciler",
            result.map(|r| debug!(?r, "reconciled")),
            failing,
        );
    }
}

/// Logs a storage outage once when it starts and once when it ends, not on every tick.
fn report_health(loop_name: &str, result: Result<(), RepositoryError>, failing: bool) -> bool {
    match result {
        Ok(()) => {
            if failing {
                info!(loop_name, "storage reachable again");
            }
            false
        }
        Err(error) => {
            metrics::counter!("opscore_storage_errors_total").increment(1);
            if !failing {
                warn!(loop_name, %error, "cannot reach storage");
            }
            true
        }
    }
}
