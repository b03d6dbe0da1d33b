//! Workflow definitions as `workflow.define` receives them: arbitrary bytes parsed as a JSON
//! request, deserialised and validated. An accepted definition must survive re-serialisation,
//! and a session of it must start and run an attempt, since validation is what the engine
//! relies on. A refused one must be refused for a reason that holds.

#![no_main]

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use opscore::workflow::{DefinitionError, Session, TaskOutcome, WorkflowDefinition, backoff_delay};
use serde_json::{Map, Value};

/// The shape of the session ids the worker draws (UUID v7).
const SESSION_ID: &str = "01936d3a-8f2e-7c41-9b6a-3e5f7d2c1a09";

fuzz_target!(|input: &[u8]| {
    // As the control API reads a request body: JSON first, then the definition from it.
    let Ok(request) = serde_json::from_slice::<Value>(input) else {
        return;
    };
    let Ok(definition) = serde_json::from_value::<WorkflowDefinition>(request) else {
        return;
    };
    match definition.validate() {
        Ok(()) => check_accepted(&definition, input),
        Err(error) => check_refused(&definition, &error),
    }
});

fn check_accepted(definition: &WorkflowDefinition, input: &[u8]) {
    // What `workflow.get` returns and the repository stores reads back as the same definition.
    let value = serde_json::to_value(definition).expect("definition serialises");
    let again: WorkflowDefinition = serde_json::from_value(value).expect("re-serialised parses");
    assert_eq!(&again, definition);
    let text = serde_json::to_vec(definition).expect("definition serialises");
    let stored: WorkflowDefinition = serde_json::from_slice(&text).expect("stored text parses");
    assert_eq!(
        stored.validate(),
        Ok(()),
        "a stored definition must validate again"
    );

    let ids: HashSet<&str> = definition
        .tasks
        .iter()
        .map(|t| t.task_id.as_str())
        .collect();
    for resolved in definition.resolved_tasks() {
        let own = resolved.definition.task_id.as_str();
        assert!(
            resolved
                .depends_on
                .iter()
                .all(|d| d != own && ids.contains(d.as_str()))
        );
        assert_eq!(definition.settings_for(own), resolved.settings);
        let retry = &resolved.settings.retry;
        for attempt in 1..=retry.max_attempts.min(64) {
            let delay = backoff_delay(retry, attempt, 0.5).num_milliseconds();
            assert!((0..=retry.max_delay_ms as i64).contains(&delay));
        }
    }

    run_one_attempt(definition.clone(), input);
}

/// Starts a session, leases every ready task and fails it, so that deadlines, backoff and
/// timers are computed from the definition's settings.
fn run_one_attempt(definition: WorkflowDefinition, input: &[u8]) {
    let now: DateTime<Utc> = DateTime::from_timestamp(1_750_000_000, 0).expect("valid time");
    let (mut session, _) =
        Session::start(definition, SESSION_ID, Value::Null, None, Map::new(), now)
            .expect("a validated definition starts");

    let jitter_sample = (input.len() % 100) as f64 / 100.0;
    for task_id in session.ready_tasks(now) {
        // A final failure (one attempt, `failSession`) ends the session and cancels the rest.
        if session.status.is_ended() {
            break;
        }
        session
            .assign(&task_id, "agent-1", now)
            .expect("a ready task is assigned");
        let epoch = session
            .tasks
            .iter()
            .find(|t| t.task_id == task_id)
            .expect("assigned task exists")
            .lease_epoch;
        let failure = TaskOutcome::Failed {
            message: "fuzz".to_owned(),
            retryable: true,
        };
        session
            .apply_result(&task_id, "agent-1", epoch, failure, jitter_sample, now)
            .expect("the lease holder reports");
    }

    // Sessions are stored as JSON text and read back on every change.
    let text = serde_json::to_vec(&session).expect("session serialises");
    serde_json::from_slice::<Session>(&text).expect("stored session parses");
}

/// The reasons that name a structure must hold in the definition.
fn check_refused(definition: &WorkflowDefinition, error: &DefinitionError) {
    let _ = error.to_string();
    match error {
        DefinitionError::Cycle(names) => {
            assert!(names.len() >= 2, "cycle {names:?} is too short");
            assert_eq!(names.first(), names.last());
            let dependencies = dependencies(definition);
            for pair in names.windows(2) {
                let (from, to) = (&pair[0], &pair[1]);
                assert!(
                    dependencies
                        .get(to.as_str())
                        .is_some_and(|deps| deps.contains(from.as_str())),
                    "cycle {names:?}: {to} does not depend on {from}"
                );
            }
        }
        DefinitionError::NoStartTask => {
            let dependencies = dependencies(definition);
            assert!(definition.tasks.iter().all(|t| {
                dependencies
                    .get(t.task_id.as_str())
                    .is_some_and(|deps| !deps.is_empty())
            }));
        }
        _ => {}
    }
}

/// Each task's dependencies: its `dependsOn` and every task whose `nextTaskId` names it.
fn dependencies(definition: &WorkflowDefinition) -> HashMap<&str, HashSet<&str>> {
    let mut map: HashMap<&str, HashSet<&str>> = HashMap::new();
    for task in &definition.tasks {
        let entry = map.entry(task.task_id.as_str()).or_default();
        entry.extend(task.depends_on.iter().map(String::as_str));
        if let Some(next) = task.next_task_id.as_deref() {
            map.entry(next).or_default().insert(task.task_id.as_str());
        }
    }
    map
}
