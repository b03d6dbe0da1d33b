//! Validation of definitions, with errors that name the task at fault.

use std::collections::{HashMap, HashSet};
use std::fmt;

use super::{
    MAX_DURATION_SECONDS, MAX_TASKS, SettingsSpec, TaskSettings, WorkflowDefinition, is_token,
    resolve_settings,
};

/// Where an invalid setting was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingsScope {
    Defaults,
    Task(String),
}

impl fmt::Display for SettingsScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Defaults => f.write_str("defaults"),
            Self::Task(id) => write!(f, "task {id}"),
        }
    }
}

/// Why a resolved setting is out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SettingProblem {
    #[error("retry maxAttempts must be at least 1")]
    NoAttempts,
    #[error("retry multiplier {0} must be a finite number of at least 1")]
    Multiplier(f64),
    #[error("retry jitter {0} must be between 0 and 1")]
    Jitter(f64),
    #[error("retry initialDelayMs {initial} exceeds maxDelayMs {max}")]
    InitialAboveMax { initial: u64, max: u64 },
    #[error("retry maxDelayMs {0} exceeds the limit of {MAX_DURATION_SECONDS} seconds")]
    DelayTooLong(u64),
    #[error("timeoutSeconds must be at least 1")]
    NoTimeout,
    #[error("timeoutSeconds {0} exceeds the limit of {MAX_DURATION_SECONDS}")]
    TimeoutTooLong(u64),
    #[error("queueTimeoutSeconds {0} exceeds the limit of {MAX_DURATION_SECONDS}")]
    QueueTimeoutTooLong(u64),
}

/// Why a definition was refused. Every task-level variant names the task.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DefinitionError {
    #[error("invalid workflow id {0:?}: must match ^[A-Za-z0-9_-]{{1,128}}$")]
    InvalidWorkflowId(String),
    #[error("workflow has no tasks")]
    NoTasks,
    #[error("workflow has {0} tasks, more than the limit of {MAX_TASKS}")]
    TooManyTasks(usize),
    #[error("invalid task id {0:?}: must match ^[A-Za-z0-9_-]{{1,128}}$")]
    InvalidTaskId(String),
    #[error("task {0}: duplicate task id")]
    DuplicateTaskId(String),
    #[error("task {0}: missing agentCapability")]
    MissingCapability(String),
    #[error(
        "task {task_id}: invalid agentCapability {capability:?}: must match ^[A-Za-z0-9_-]{{1,128}}$"
    )]
    InvalidCapability { task_id: String, capability: String },
    #[error("task {task_id}: depends on unknown task {unknown}")]
    UnknownDependency { task_id: String, unknown: String },
    #[error("task {task_id}: nextTaskId names unknown task {unknown}")]
    UnknownNextTask { task_id: String, unknown: String },
    #[error("task {0}: depends on itself")]
    SelfDependency(String),
    #[error("tasks {} form a dependency cycle", .0.join(" -> "))]
    Cycle(Vec<String>),
    #[error("no start task: every task depends on another")]
    NoStartTask,
    #[error("{scope}: {problem}")]
    InvalidSetting {
        scope: SettingsScope,
        problem: SettingProblem,
    },
}

impl WorkflowDefinition {
    /// Checks everything the engine relies on; the first problem found is returned.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        if !is_token(&self.id) {
            return Err(DefinitionError::InvalidWorkflowId(self.id.clone()));
        }
        if self.tasks.is_empty() {
            return Err(DefinitionError::NoTasks);
        }
        if self.tasks.len() > MAX_TASKS {
            return Err(DefinitionError::TooManyTasks(self.tasks.len()));
        }

        let mut seen = HashSet::new();
        for task in &self.tasks {
            let id = &task.task_id;
            if !is_token(id) {
                return Err(DefinitionError::InvalidTaskId(id.clone()));
            }
            if !seen.insert(id.as_str()) {
                return Err(DefinitionError::DuplicateTaskId(id.clone()));
            }
            if task.agent_capability.is_empty() {
                return Err(DefinitionError::MissingCapability(id.clone()));
            }
            if !is_token(&task.agent_capability) {
                return Err(DefinitionError::InvalidCapability {
                    task_id: id.clone(),
                    capability: task.agent_capability.clone(),
                });
            }
        }

        check_settings(&resolve_settings(&SettingsSpec::default(), &self.defaults)).map_err(
            |problem| DefinitionError::InvalidSetting {
                scope: SettingsScope::Defaults,
                problem,
            },
        )?;
        for task in &self.tasks {
            check_settings(&resolve_settings(&task.settings, &self.defaults)).map_err(
                |problem| DefinitionError::InvalidSetting {
                    scope: SettingsScope::Task(task.task_id.clone()),
                    problem,
                },
            )?;
        }

        self.check_references(&seen)?;
        let dependencies = self.dependency_lists();
        if dependencies.iter().all(|deps| !deps.is_empty()) {
            return Err(DefinitionError::NoStartTask);
        }
        self.check_acyclic(&dependencies)
    }

    fn check_references(&self, known: &HashSet<&str>) -> Result<(), DefinitionError> {
        for task in &self.tasks {
            let id = &task.task_id;
            for dep in &task.depends_on {
                if dep == id {
                    return Err(DefinitionError::SelfDependency(id.clone()));
                }
                if !known.contains(dep.as_str()) {
                    return Err(DefinitionError::UnknownDependency {
                        task_id: id.clone(),
                        unknown: dep.clone(),
                    });
                }
            }
            if let Some(next) = &task.next_task_id {
                if next == id {
                    return Err(DefinitionError::SelfDependency(id.clone()));
                }
                if !known.contains(next.as_str()) {
                    return Err(DefinitionError::UnknownNextTask {
                        task_id: id.clone(),
                        unknown: next.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Kahn's algorithm, iterative so that a long chain cannot exhaust the stack. Whatever it
    /// cannot order lies on or behind a cycle; walking predecessors inside that remainder must
    /// revisit a task, and the revisited stretch is a cycle to report.
    fn check_acyclic(&self, dependencies: &[Vec<usize>]) -> Result<(), DefinitionError> {
        let n = self.tasks.len();
        let mut dependents = vec![Vec::new(); n];
        let mut unresolved: Vec<usize> = dependencies.iter().map(Vec::len).collect();
        for (task, deps) in dependencies.iter().enumerate() {
            for &dep in deps {
                dependents[dep].push(task);
            }
        }

        let mut ready: Vec<usize> = (0..n).filter(|&t| unresolved[t] == 0).collect();
        let mut ordered = vec![false; n];
        while let Some(task) = ready.pop() {
            ordered[task] = true;
            for &next in &dependents[task] {
                unresolved[next] -= 1;
                if unresolved[next] == 0 {
                    ready.push(next);
                }
            }
        }

        let Some(start) = (0..n).find(|&t| !ordered[t]) else {
            return Ok(());
        };
        let mut path = vec![start];
        let mut position = HashMap::from([(start, 0)]);
        let mut current = start;
        // Every task of the remainder has a predecessor in it, so this ends on a revisit.
        while let Some(&pred) = dependencies[current].iter().find(|&&d| !ordered[d]) {
            if let Some(&at) = position.get(&pred) {
                path.drain(..at);
                break;
            }
            position.insert(pred, path.len());
            path.push(pred);
            current = pred;
        }
        // The walk followed predecessors; report in the order the work flows.
        path.reverse();
        let mut names: Vec<String> = path
            .iter()
            .map(|&t| self.tasks[t].task_id.clone())
            .collect();
        if let Some(first) = names.first().cloned() {
            names.push(first);
        }
        Err(DefinitionError::Cycle(names))
    }
}

fn check_settings(settings: &TaskSettings) -> Result<(), SettingProblem> {
    let retry = &settings.retry;
    if retry.max_attempts == 0 {
        return Err(SettingProblem::NoAttempts);
    }
    // Written so that NaN fails both checks.
    if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
        return Err(SettingProblem::Multiplier(retry.multiplier));
    }
    if !(0.0..=1.0).contains(&retry.jitter) {
        return Err(SettingProblem::Jitter(retry.jitter));
    }
    if retry.max_delay_ms / 1000 > MAX_DURATION_SECONDS {
        return Err(SettingProblem::DelayTooLong(retry.max_delay_ms));
    }
    if retry.initial_delay_ms > retry.max_delay_ms {
        return Err(SettingProblem::InitialAboveMax {
            initial: retry.initial_delay_ms,
            max: retry.max_delay_ms,
        });
    }
    if settings.timeout_seconds == 0 {
        return Err(SettingProblem::NoTimeout);
    }
    if settings.timeout_seconds > MAX_DURATION_SECONDS {
        return Err(SettingProblem::TimeoutTooLong(settings.timeout_seconds));
    }
    match settings.queue_timeout_seconds {
        Some(s) if s > MAX_DURATION_SECONDS => Err(SettingProblem::QueueTimeoutTooLong(s)),
        _ => Ok(()),
    }
}
