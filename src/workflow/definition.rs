//! Workflow definitions: the original wire format, its DAG, retry and timeout extensions, and
//! their validation.
//!
//! Built-in settings, used when neither the task nor the workflow `defaults` set a value:
//! `maxAttempts` 3, `initialDelayMs` 1000, `maxDelayMs` 60000, `multiplier` 2.0, `jitter` 0.2,
//! `timeoutSeconds` 300, no `queueTimeoutSeconds` (wait for an agent forever), `onFailure`
//! `failSession`. Each setting is resolved on its own, so a task that sets only
//! `retry.maxAttempts` keeps the workflow's (or built-in) delays.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod validate;

pub use validate::{DefinitionError, SettingProblem, SettingsScope};

pub use crate::subjects::MAX_TOKEN_LEN;

/// Longest duration (timeouts, backoff delays) a definition may ask for: 30 days. The bound
/// keeps deadline arithmetic far from the limits of `chrono`.
pub const MAX_DURATION_SECONDS: u64 = 30 * 24 * 3600;

/// Most tasks one workflow may hold. A session is one record rewritten on every change, so its
/// size is bounded.
pub const MAX_TASKS: usize = 1000;

/// Whether `s` can be an id in a subject; the rule lives with the subjects.
pub(crate) use crate::subjects::is_valid_token as is_token;

/// A workflow as clients define it (`workflow.define`) and sessions snapshot it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowDefinition {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Free-form version label, e.g. `"1.0"`.
    pub version: String,
    pub tasks: Vec<TaskDefinition>,
    /// Settings for every task that does not set its own.
    #[serde(default, skip_serializing_if = "SettingsSpec::is_empty")]
    pub defaults: SettingsSpec,
}

/// One step of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskDefinition {
    /// Defaulted when missing so that validation, not the parser, reports it with context.
    #[serde(default)]
    pub task_id: String,
    pub name: String,
    /// Defaulted when missing so that validation reports it naming the task.
    #[serde(default)]
    pub agent_capability: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// The original format's successor link: `nextTaskId: X` on task A means X depends on A.
    /// Always serialized (as `null` when absent) to keep the original shape.
    #[serde(default)]
    pub next_task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    #[serde(flatten)]
    pub settings: SettingsSpec,
}

/// Optional settings, on a task or as workflow `defaults`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettingsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Run time allowed per attempt before the lease expires; progress reports extend it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Time a ready task may wait for a capable agent before it fails. `0` means wait forever,
    /// so a task can opt out of a workflow-wide default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
}

impl SettingsSpec {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Retry settings as written; unset fields fall back field by field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    /// Fraction (0 to 1) by which a delay may be shortened at random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
}

/// What a task's final failure does to its session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OnFailure {
    /// The session fails and every other task is cancelled.
    #[default]
    FailSession,
    /// The failure counts as a resolved dependency: dependents run (without the failed task in
    /// their `results`) and the session can still complete.
    Continue,
}

/// A fully resolved retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts in total, the first included.
    pub max_attempts: u32,
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
    pub multiplier: f64,
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_delay_ms: 1000,
            max_delay_ms: 60_000,
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

/// Built-in run time per attempt.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 300;

/// The settings that apply to one task: its own value, else the workflow default, else the
/// built-in one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskSettings {
    pub retry: RetryPolicy,
    pub timeout_seconds: u64,
    /// `None`: wait for a capable agent forever.
    pub queue_timeout_seconds: Option<u64>,
    pub on_failure: OnFailure,
}

/// A task with its settings and its full dependency list resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedTask<'a> {
    pub definition: &'a TaskDefinition,
    pub settings: TaskSettings,
    /// `dependsOn` plus every task whose `nextTaskId` names this one, in definition order.
    pub depends_on: Vec<String>,
}

impl WorkflowDefinition {
    /// Dependency indices of every task, in definition order, ignoring unknown references.
    fn dependency_lists(&self) -> Vec<Vec<usize>> {
        let index: HashMap<&str, usize> = self
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.task_id.as_str(), i))
            .collect();
        let mut lists: Vec<Vec<usize>> = self
            .tasks
            .iter()
            .map(|t| {
                t.depends_on
                    .iter()
                    .filter_map(|d| index.get(d.as_str()).copied())
                    .collect()
            })
            .collect();
        for (i, task) in self.tasks.iter().enumerate() {
            if let Some(next) = task.next_task_id.as_deref().and_then(|n| index.get(n)) {
                lists[*next].push(i);
            }
        }
        for list in &mut lists {
            list.sort_unstable();
            list.dedup();
        }
        lists
    }

    /// Every task with its resolved settings and dependencies, in definition order.
    pub fn resolved_tasks(&self) -> Vec<ResolvedTask<'_>> {
        self.tasks
            .iter()
            .zip(self.dependency_lists())
            .map(|(task, deps)| ResolvedTask {
                definition: task,
                settings: resolve_settings(&task.settings, &self.defaults),
                depends_on: deps
                    .into_iter()
                    .map(|d| self.tasks[d].task_id.clone())
                    .collect(),
            })
            .collect()
    }

    /// The settings of one task; the workflow defaults if no task has that id.
    pub fn settings_for(&self, task_id: &str) -> TaskSettings {
        let own = self
            .tasks
            .iter()
            .find(|t| t.task_id == task_id)
            .map(|t| &t.settings);
        resolve_settings(own.unwrap_or(&SettingsSpec::default()), &self.defaults)
    }
}

fn resolve_settings(own: &SettingsSpec, defaults: &SettingsSpec) -> TaskSettings {
    let builtin = RetryPolicy::default();
    TaskSettings {
        retry: RetryPolicy {
            max_attempts: pick(own, defaults, |r| r.max_attempts).unwrap_or(builtin.max_attempts),
            initial_delay_ms: pick(own, defaults, |r| r.initial_delay_ms)
                .unwrap_or(builtin.initial_delay_ms),
            max_delay_ms: pick(own, defaults, |r| r.max_delay_ms).unwrap_or(builtin.max_delay_ms),
            multiplier: pick(own, defaults, |r| r.multiplier).unwrap_or(builtin.multiplier),
            jitter: pick(own, defaults, |r| r.jitter).unwrap_or(builtin.jitter),
        },
        timeout_seconds: own
            .timeout_seconds
            .or(defaults.timeout_seconds)
            .unwrap_or(DEFAULT_TIMEOUT_SECONDS),
        queue_timeout_seconds: own
            .queue_timeout_seconds
            .or(defaults.queue_timeout_seconds)
            .filter(|&s| s > 0),
        on_failure: own.on_failure.or(defaults.on_failure).unwrap_or_default(),
    }
}

/// One retry field: the task's value, else the workflow default's.
fn pick<T>(
    own: &SettingsSpec,
    defaults: &SettingsSpec,
    field: impl Fn(&RetrySpec) -> Option<T>,
) -> Option<T> {
    own.retry
        .as_ref()
        .and_then(&field)
        .or_else(|| defaults.retry.as_ref().and_then(&field))
}

#[cfg(test)]
mod tests;
