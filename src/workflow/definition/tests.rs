use serde_json::{Value, json};

use super::*;

const SAMPLE: &str = r#"{"id": "sample_workflow_id", "name": "Sample Load Test Workflow", "version": "1.0",
 "tasks": [
   {"taskId": "step_1", "name": "First Step", "agentCapability": "test_capability",
    "parameters": {"message": "This is the first step."}, "nextTaskId": "step_2"},
   {"taskId": "step_2", "name": "Second Step", "agentCapability": "another_capability",
    "parameters": {"value": 123}, "nextTaskId": null}]}"#;

fn parse(value: Value) -> WorkflowDefinition {
    serde_json::from_value(value).expect("definition parses")
}

/// A workflow around `tasks`, each given as (id, dependsOn).
fn dag(tasks: &[(&str, &[&str])]) -> WorkflowDefinition {
    let tasks: Vec<Value> = tasks
        .iter()
        .map(|(id, deps)| json!({"taskId": id, "name": id, "agentCapability": "cap", "dependsOn": deps}))
        .collect();
    parse(json!({"id": "wf", "name": "wf", "version": "1", "tasks": tasks}))
}

fn error_of(definition: &WorkflowDefinition) -> DefinitionError {
    definition.validate().expect_err("definition is invalid")
}

#[test]
fn sample_workflow_parses_validates_and_keeps_its_shape() {
    let definition: WorkflowDefinition = serde_json::from_str(SAMPLE).expect("sample parses");
    assert_eq!(definition.validate(), Ok(()));

    let original: Value = serde_json::from_str(SAMPLE).expect("sample is json");
    assert_eq!(
        serde_json::to_value(&definition).expect("serializes"),
        original
    );
}

#[test]
fn unknown_fields_are_ignored() {
    let definition = parse(json!({
        "id": "wf", "name": "wf", "version": "1", "owner": "legacy-tool",
        "tasks": [{"taskId": "a", "name": "a", "agentCapability": "cap", "color": "red"}]
    }));
    assert_eq!(definition.validate(), Ok(()));
    assert!(definition.tasks[0].parameters.is_empty());
}

#[test]
fn invalid_workflow_id_is_rejected() {
    for id in ["", "a.b", "a b", "a*", &"x".repeat(129)] {
        let mut definition = dag(&[("a", &[])]);
        definition.id = id.to_owned();
        assert_eq!(
            error_of(&definition),
            DefinitionError::InvalidWorkflowId(id.to_owned())
        );
    }
}

#[test]
fn workflow_without_tasks_is_rejected() {
    assert_eq!(error_of(&dag(&[])), DefinitionError::NoTasks);
}

#[test]
fn invalid_task_id_is_rejected() {
    let definition = dag(&[("a", &[]), ("b.c", &["a"])]);
    assert_eq!(
        error_of(&definition),
        DefinitionError::InvalidTaskId("b.c".to_owned())
    );
}

#[test]
fn duplicate_task_id_names_the_task() {
    let error = error_of(&dag(&[("a", &[]), ("a", &[])]));
    assert_eq!(error, DefinitionError::DuplicateTaskId("a".to_owned()));
    assert_eq!(error.to_string(), "task a: duplicate task id");
}

#[test]
fn missing_or_invalid_capability_names_the_task() {
    let missing = parse(json!({"id": "wf", "name": "wf", "version": "1",
        "tasks": [{"taskId": "a", "name": "a"}]}));
    assert_eq!(
        error_of(&missing),
        DefinitionError::MissingCapability("a".to_owned())
    );

    let mut invalid = dag(&[("a", &[])]);
    invalid.tasks[0].agent_capability = "gpu.large".to_owned();
    assert_eq!(
        error_of(&invalid),
        DefinitionError::InvalidCapability {
            task_id: "a".to_owned(),
            capability: "gpu.large".to_owned()
        }
    );
}

#[test]
fn unknown_dependency_names_both_tasks() {
    let error = error_of(&dag(&[("step_1", &[]), ("step_2", &["step_9"])]));
    assert_eq!(
        error.to_string(),
        "task step_2: depends on unknown task step_9"
    );
}

#[test]
fn unknown_next_task_names_both_tasks() {
    let mut definition = dag(&[("step_1", &[])]);
    definition.tasks[0].next_task_id = Some("step_9".to_owned());
    assert_eq!(
        error_of(&definition),
        DefinitionError::UnknownNextTask {
            task_id: "step_1".to_owned(),
            unknown: "step_9".to_owned()
        }
    );
}

#[test]
fn self_dependency_is_rejected() {
    let error = error_of(&dag(&[("a", &[]), ("b", &["b"])]));
    assert_eq!(error, DefinitionError::SelfDependency("b".to_owned()));

    let mut definition = dag(&[("a", &[])]);
    definition.tasks[0].next_task_id = Some("a".to_owned());
    assert_eq!(
        error_of(&definition),
        DefinitionError::SelfDependency("a".to_owned())
    );
}

#[test]
fn cycle_names_the_tasks_in_it() {
    let definition = dag(&[
        ("start", &[]),
        ("a", &["start", "c"]),
        ("b", &["a"]),
        ("c", &["b"]),
        ("d", &["c"]),
    ]);
    let error = error_of(&definition);
    let DefinitionError::Cycle(tasks) = &error else {
        panic!("expected a cycle, got {error:?}");
    };
    // The cycle may be reported from any of its tasks, but always closes on itself.
    assert_eq!(tasks.first(), tasks.last());
    let mut members: Vec<&str> = tasks[1..].iter().map(String::as_str).collect();
    members.sort_unstable();
    assert_eq!(members, ["a", "b", "c"]);
    assert!(error.to_string().starts_with("tasks "), "{error}");
}

#[test]
fn cycle_through_next_task_links_is_found() {
    let mut definition = dag(&[("start", &[]), ("a", &["start"]), ("b", &["a"])]);
    definition.tasks[2].next_task_id = Some("a".to_owned());
    let DefinitionError::Cycle(tasks) = error_of(&definition) else {
        panic!("expected a cycle");
    };
    assert_eq!(tasks.len(), 3);
}

#[test]
fn workflow_where_every_task_has_a_dependency_has_no_start() {
    let error = error_of(&dag(&[("a", &["b"]), ("b", &["a"])]));
    assert_eq!(error, DefinitionError::NoStartTask);
}

#[test]
fn out_of_range_retry_settings_name_the_task() {
    let cases = [
        (json!({"maxAttempts": 0}), SettingProblem::NoAttempts),
        (json!({"multiplier": 0.5}), SettingProblem::Multiplier(0.5)),
        (json!({"jitter": 1.5}), SettingProblem::Jitter(1.5)),
        (json!({"jitter": -0.1}), SettingProblem::Jitter(-0.1)),
        (
            json!({"initialDelayMs": 5000, "maxDelayMs": 1000}),
            SettingProblem::InitialAboveMax {
                initial: 5000,
                max: 1000,
            },
        ),
        // The built-in maximum (60 s) applies when the task sets only the initial delay.
        (
            json!({"initialDelayMs": 120_000}),
            SettingProblem::InitialAboveMax {
                initial: 120_000,
                max: 60_000,
            },
        ),
    ];
    for (retry, problem) in cases {
        let definition = parse(json!({"id": "wf", "name": "wf", "version": "1",
            "tasks": [{"taskId": "a", "name": "a", "agentCapability": "cap", "retry": retry}]}));
        assert_eq!(
            error_of(&definition),
            DefinitionError::InvalidSetting {
                scope: SettingsScope::Task("a".to_owned()),
                problem
            }
        );
    }
}

#[test]
fn out_of_range_timeouts_are_rejected() {
    let mut definition = dag(&[("a", &[])]);
    definition.tasks[0].settings.timeout_seconds = Some(0);
    assert_eq!(
        error_of(&definition).to_string(),
        "task a: timeoutSeconds must be at least 1"
    );

    let mut definition = dag(&[("a", &[])]);
    definition.defaults.queue_timeout_seconds = Some(MAX_DURATION_SECONDS + 1);
    assert_eq!(
        error_of(&definition),
        DefinitionError::InvalidSetting {
            scope: SettingsScope::Defaults,
            problem: SettingProblem::QueueTimeoutTooLong(MAX_DURATION_SECONDS + 1)
        }
    );
}

#[test]
fn invalid_defaults_are_reported_as_defaults() {
    let definition = parse(json!({"id": "wf", "name": "wf", "version": "1",
        "defaults": {"retry": {"maxAttempts": 0}},
        "tasks": [{"taskId": "a", "name": "a", "agentCapability": "cap"}]}));
    assert_eq!(
        error_of(&definition).to_string(),
        "defaults: retry maxAttempts must be at least 1"
    );
}

#[test]
fn settings_resolve_task_then_defaults_then_built_in_field_by_field() {
    let definition = parse(json!({"id": "wf", "name": "wf", "version": "1",
        "defaults": {"retry": {"maxAttempts": 5, "initialDelayMs": 200}, "timeoutSeconds": 30,
                     "queueTimeoutSeconds": 60, "onFailure": "continue"},
        "tasks": [
            {"taskId": "a", "name": "a", "agentCapability": "cap",
             "retry": {"maxAttempts": 7}, "queueTimeoutSeconds": 0, "onFailure": "failSession"},
            {"taskId": "b", "name": "b", "agentCapability": "cap"}]}));
    assert_eq!(definition.validate(), Ok(()));

    let a = definition.settings_for("a");
    assert_eq!(
        a.retry,
        RetryPolicy {
            max_attempts: 7,
            initial_delay_ms: 200,
            ..RetryPolicy::default()
        }
    );
    assert_eq!(a.timeout_seconds, 30);
    assert_eq!(a.queue_timeout_seconds, None, "0 opts out of the default");
    assert_eq!(a.on_failure, OnFailure::FailSession);

    let b = definition.settings_for("b");
    assert_eq!(b.retry.max_attempts, 5);
    assert_eq!(b.queue_timeout_seconds, Some(60));
    assert_eq!(b.on_failure, OnFailure::Continue);

    let built_in = dag(&[("a", &[])]).settings_for("a");
    assert_eq!(built_in.retry, RetryPolicy::default());
    assert_eq!(built_in.timeout_seconds, DEFAULT_TIMEOUT_SECONDS);
    assert_eq!(built_in.queue_timeout_seconds, None);
    assert_eq!(built_in.on_failure, OnFailure::FailSession);
}

#[test]
fn dependencies_merge_depends_on_and_next_task_links_in_definition_order() {
    let mut definition = dag(&[("a", &[]), ("b", &[]), ("c", &["b"]), ("d", &[])]);
    definition.tasks[0].next_task_id = Some("c".to_owned());
    definition.tasks[1].next_task_id = Some("c".to_owned());
    assert_eq!(definition.validate(), Ok(()));

    let deps: Vec<(String, Vec<String>)> = definition
        .resolved_tasks()
        .into_iter()
        .map(|t| (t.definition.task_id.clone(), t.depends_on))
        .collect();
    assert_eq!(
        deps,
        [
            ("a".to_owned(), vec![]),
            ("b".to_owned(), vec![]),
            ("c".to_owned(), vec!["a".to_owned(), "b".to_owned()]),
            ("d".to_owned(), vec![]),
        ]
    );
}

#[test]
fn long_chains_validate_without_recursion() {
    let ids: Vec<String> = (0..MAX_TASKS).map(|i| format!("t{i}")).collect();
    let tasks: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let deps: Vec<&String> = ids[..i].last().into_iter().collect();
            json!({"taskId": id, "name": id, "agentCapability": "cap", "dependsOn": deps})
        })
        .collect();
    let definition = parse(json!({"id": "wf", "name": "wf", "version": "1", "tasks": tasks}));
    assert_eq!(definition.validate(), Ok(()));
}
