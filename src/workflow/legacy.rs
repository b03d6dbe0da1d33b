//! Agents of the original service know neither task results nor lease epochs: they report
//! their own state with the task id in `details.opscore_task_id`. This maps such reports onto
//! progress and results.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::effect::Effect;
use super::engine::{Rejection, TaskOutcome};
use super::session::Session;

/// What a legacy state report means for the task it names.
#[derive(Debug, Clone, PartialEq)]
pub enum LegacyReport {
    /// `active`: still working.
    Progress,
    /// `idle` (the task is done, `details` is its output) or `error`.
    Result(TaskOutcome),
}

/// Reads a state report. `None` when it names no task or its state says nothing about one.
/// The state is compared case-insensitively, as agent input is.
pub fn legacy_report(state: &str, details: &Value) -> Option<(String, LegacyReport)> {
    let task_id = details.get("opscore_task_id")?.as_str()?.to_owned();
    let report = match state.to_ascii_lowercase().as_str() {
        "active" => LegacyReport::Progress,
        "idle" => LegacyReport::Result(TaskOutcome::Completed {
            output: details.clone(),
        }),
        "error" => {
            let message = ["error", "message"]
                .iter()
                .find_map(|key| details.get(*key)?.as_str())
                .unwrap_or("agent reported error")
                .to_owned();
            LegacyReport::Result(TaskOutcome::Failed {
                message,
                retryable: true,
            })
        }
        _ => return None,
    };
    Some((task_id, report))
}

impl Session {
    /// Applies a legacy report under the agent's current lease. Such agents cannot name an
    /// epoch, so the report is accepted only while `agent_id` holds the task's lease; one that
    /// arrives after a reassignment is therefore refused rather than fenced by epoch.
    pub fn apply_legacy(
        &mut self,
        task_id: &str,
        agent_id: &str,
        report: LegacyReport,
        jitter_sample: f64,
        now: DateTime<Utc>,
    ) -> Result<Vec<Effect>, Rejection> {
        let task = self
            .tasks
            .iter()
            .find(|t| t.task_id == task_id)
            .ok_or_else(|| Rejection::UnknownTask(task_id.to_owned()))?;
        if task.agent_id.as_deref() != Some(agent_id) {
            return Err(Rejection::NotLeaseHolder {
                task_id: task_id.to_owned(),
                agent_id: agent_id.to_owned(),
            });
        }
        let epoch = task.lease_epoch;
        match report {
            LegacyReport::Progress => self.apply_progress(task_id, agent_id, epoch, now),
            LegacyReport::Result(outcome) => {
                self.apply_result(task_id, agent_id, epoch, outcome, jitter_sample, now)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn legacy_states_map_to_progress_and_results() {
        let details = json!({"opscore_task_id": "s-step_1", "summary": "done"});
        assert_eq!(
            legacy_report("active", &details),
            Some(("s-step_1".to_owned(), LegacyReport::Progress))
        );
        assert_eq!(
            legacy_report("IDLE", &details),
            Some((
                "s-step_1".to_owned(),
                LegacyReport::Result(TaskOutcome::Completed {
                    output: details.clone()
                })
            ))
        );
        assert_eq!(legacy_report("busy", &details), None);
        assert_eq!(legacy_report("idle", &json!({"summary": "done"})), None);
    }

    #[test]
    fn legacy_error_takes_its_message_from_details() {
        let failed = |details: Value| match legacy_report("error", &details) {
            Some((_, LegacyReport::Result(TaskOutcome::Failed { message, retryable }))) => {
                Some((message, retryable))
            }
            _ => None,
        };
        let id = "s-step_1";
        assert_eq!(
            failed(json!({"opscore_task_id": id, "error": "disk full", "message": "x"})),
            Some(("disk full".to_owned(), true))
        );
        assert_eq!(
            failed(json!({"opscore_task_id": id, "message": "oom"})),
            Some(("oom".to_owned(), true))
        );
        assert_eq!(
            failed(json!({"opscore_task_id": id})),
            Some(("agent reported error".to_owned(), true))
        );
    }
}
