use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use serde_json::{Map, Value, json};

use super::*;
use crate::workflow::definition::OnFailure;
use crate::workflow::effect::{Cancellation, DeadLetter, LeaseRelease, SessionEvent};
use crate::workflow::legacy::legacy_report;
use crate::workflow::session::SessionError;

const SESSION: &str = "3f2c0d6e-8b1a-4c4e-9a55-0f6f3f1c2b7d";

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, 1, 12, 0, 0)
        .single()
        .expect("valid time")
}

fn secs(n: i64) -> TimeDelta {
    TimeDelta::seconds(n)
}

fn definition(value: Value) -> WorkflowDefinition {
    serde_json::from_value(value).expect("definition parses")
}

fn sample() -> WorkflowDefinition {
    definition(
        json!({"id": "sample_workflow_id", "name": "Sample Load Test Workflow",
        "version": "1.0", "tasks": [
        {"taskId": "step_1", "name": "First Step", "agentCapability": "test_capability",
         "parameters": {"message": "This is the first step."}, "nextTaskId": "step_2"},
        {"taskId": "step_2", "name": "Second Step", "agentCapability": "another_capability",
         "parameters": {"value": 123}, "nextTaskId": null}]}),
    )
}

/// A workflow of `tasks` given as (id, dependsOn), with `extra` merged into every task.
fn dag(tasks: &[(&str, &[&str])], extra: Value) -> WorkflowDefinition {
    let tasks: Vec<Value> = tasks
        .iter()
        .map(|(id, deps)| {
            let mut task = json!({"taskId": id, "name": id, "agentCapability": "cap",
                "dependsOn": deps});
            if let (Some(task), Some(extra)) = (task.as_object_mut(), extra.as_object()) {
                task.extend(extra.clone());
            }
            task
        })
        .collect();
    definition(json!({"id": "wf", "name": "wf", "version": "1", "tasks": tasks}))
}

fn start(definition: WorkflowDefinition) -> Session {
    let input = json!({"topic": "load"});
    Session::start(definition, SESSION, input, None, Map::new(), t0())
        .expect("session starts")
        .0
}

fn id(def: &str) -> String {
    format!("{SESSION}-{def}")
}

fn task<'a>(session: &'a Session, def: &str) -> &'a Task {
    session
        .tasks
        .iter()
        .find(|t| t.task_definition_id == def)
        .expect("task exists")
}

fn assign(session: &mut Session, def: &str, agent: &str, now: DateTime<Utc>) -> Vec<Effect> {
    session
        .assign(&id(def), agent, now)
        .expect("assignment accepted")
}

fn finish(
    session: &mut Session,
    def: &str,
    outcome: TaskOutcome,
    now: DateTime<Utc>,
) -> Result<Vec<Effect>, Rejection> {
    let task = task(session, def);
    let (agent, epoch) = (task.agent_id.clone().unwrap_or_default(), task.lease_epoch);
    session.apply_result(&id(def), &agent, epoch, outcome, 0.0, now)
}

fn done(output: Value) -> TaskOutcome {
    TaskOutcome::Completed { output }
}

fn failed(message: &str, retryable: bool) -> TaskOutcome {
    TaskOutcome::Failed {
        message: message.to_owned(),
        retryable,
    }
}

fn events(effects: &[Effect]) -> Vec<&SessionEvent> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Status(event) => Some(event),
            _ => None,
        })
        .collect()
}

fn kinds(effects: &[Effect]) -> Vec<EventKind> {
    events(effects).iter().map(|e| e.kind).collect()
}

fn dispatched(effects: &[Effect]) -> &Assignment {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Dispatch { assignment, .. } => Some(assignment),
            _ => None,
        })
        .expect("a dispatch")
}

mod failures;
mod leases;

#[test]
fn sample_workflow_runs_to_completion() {
    let (mut session, effects) = Session::start(
        sample(),
        SESSION,
        json!({"topic": "load"}),
        None,
        Map::new(),
        t0(),
    )
    .expect("session starts");
    assert_eq!(session.status, SessionStatus::Running);
    assert_eq!(
        kinds(&effects),
        [
            EventKind::SessionStarted,
            EventKind::TaskPending,
            EventKind::TaskPending
        ]
    );
    assert_eq!(session.ready_tasks(t0()), [id("step_1")]);
    assert_eq!(
        task(&session, "step_2").pending,
        Some(PendingReason::WaitingOn {
            tasks: vec!["step_1".to_owned()]
        })
    );

    let effects = assign(&mut session, "step_1", "agent-a", t0());
    let Effect::Dispatch {
        agent_id,
        assignment,
    } = &effects[0]
    else {
        panic!("dispatch first, got {effects:?}");
    };
    assert_eq!(agent_id, "agent-a");
    assert_eq!(assignment.message_id(), format!("{}:1", id("step_1")));
    assert_eq!((assignment.attempt, assignment.lease_epoch), (1, 1));
    assert_eq!(assignment.deadline, t0() + secs(300));
    assert_eq!(assignment.input, json!({"topic": "load"}));
    assert_eq!(assignment.parameters["message"], "This is the first step.");
    assert!(assignment.results.is_empty());
    assert!(effects.contains(&Effect::Timer(Timer {
        session_id: SESSION.to_owned(),
        kind: TimerKind::LeaseDeadline {
            task_id: id("step_1"),
            lease_epoch: 1
        },
        at: t0() + secs(300),
    })));

    let progress = session.apply_progress(&id("step_1"), "agent-a", 1, t0() + secs(10));
    assert_eq!(
        kinds(&progress.expect("progress accepted")),
        [EventKind::TaskRunning]
    );
    assert_eq!(task(&session, "step_1").started_at, Some(t0() + secs(10)));

    let effects = finish(
        &mut session,
        "step_1",
        done(json!({"ok": 1})),
        t0() + secs(20),
    );
    let effects = effects.expect("result accepted");
    assert_eq!(
        effects[0],
        Effect::ReleaseLease(LeaseRelease {
            agent_id: "agent-a".to_owned(),
            session_id: SESSION.to_owned(),
            task_id: id("step_1"),
            lease_epoch: 1,
        })
    );
    assert_eq!(
        kinds(&effects),
        [EventKind::TaskCompleted, EventKind::TaskPending]
    );
    assert_eq!(session.ready_tasks(t0() + secs(20)), [id("step_2")]);

    let effects = assign(&mut session, "step_2", "agent-b", t0() + secs(21));
    assert_eq!(
        dispatched(&effects).results,
        *json!({"step_1": {"ok": 1}}).as_object().expect("object")
    );
    let effects = finish(
        &mut session,
        "step_2",
        done(json!({"ok": 2})),
        t0() + secs(30),
    );
    assert_eq!(
        kinds(&effects.expect("result accepted")),
        [EventKind::TaskCompleted, EventKind::SessionCompleted]
    );
    assert_eq!(session.status, SessionStatus::Completed);
    assert_eq!(session.end_time, Some(t0() + secs(30)));
    assert_eq!(
        session.result,
        Some(json!({"step_1": {"ok": 1}, "step_2": {"ok": 2}}))
    );
    assert_eq!(session.seq, 10);
}

#[test]
fn diamond_fans_out_and_the_join_receives_both_results() {
    let mut session = start(dag(
        &[("a", &[]), ("b", &["a"]), ("c", &["a"]), ("d", &["b", "c"])],
        json!({}),
    ));
    assign(&mut session, "a", "x", t0());
    finish(&mut session, "a", done(json!("A")), t0()).expect("accepted");
    assert_eq!(session.ready_tasks(t0()), [id("b"), id("c")]);

    assign(&mut session, "b", "x", t0());
    assign(&mut session, "c", "y", t0());
    finish(&mut session, "c", done(json!("C")), t0()).expect("accepted");
    assert_eq!(
        task(&session, "d").pending,
        Some(PendingReason::WaitingOn {
            tasks: vec!["b".to_owned()]
        })
    );
    assert!(session.ready_tasks(t0()).is_empty());

    finish(&mut session, "b", done(json!("B")), t0()).expect("accepted");
    let effects = assign(&mut session, "d", "x", t0());
    assert_eq!(
        dispatched(&effects).results,
        *json!({"b": "B", "c": "C"}).as_object().expect("object")
    );
}

#[test]
fn mark_waiting_accepts_only_agent_reasons_on_ready_tasks() {
    let mut session = start(dag(&[("a", &[]), ("b", &["a"])], json!({})));
    assert_eq!(
        session.mark_waiting(&id("a"), PendingReason::Backoff { until: t0() }, t0()),
        Err(Rejection::NotAnAgentWait(id("a")))
    );
    assert_eq!(
        session.mark_waiting(&id("b"), PendingReason::NoCapableAgent, t0()),
        Err(Rejection::NotReady {
            task_id: id("b"),
            status: TaskStatus::Pending
        })
    );
}

#[test]
fn assign_refuses_tasks_that_are_not_ready() {
    let mut session = start(dag(&[("a", &[]), ("b", &["a"])], json!({})));
    assert!(matches!(
        session.assign(&id("b"), "x", t0()),
        Err(Rejection::NotReady { .. })
    ));
    assign(&mut session, "a", "x", t0());
    assert_eq!(
        session.assign(&id("a"), "y", t0()),
        Err(Rejection::NotReady {
            task_id: id("a"),
            status: TaskStatus::Dispatched
        })
    );

    let mut session = start(dag(&[("a", &[])], json!({})));
    assert_eq!(
        session.assign(&id("a"), "bad.agent", t0()),
        Err(Rejection::InvalidAgentId("bad.agent".to_owned()))
    );
}

#[test]
fn pinned_session_refuses_other_agents() {
    let (mut session, _) = Session::start(
        dag(&[("a", &[])], json!({})),
        SESSION,
        Value::Null,
        Some("only".to_owned()),
        Map::new(),
        t0(),
    )
    .expect("session starts");
    assert_eq!(
        session.assign(&id("a"), "other", t0()),
        Err(Rejection::PinnedToOtherAgent {
            task_id: id("a"),
            pinned: "only".to_owned()
        })
    );
    assign(&mut session, "a", "only", t0());
}

#[test]
fn start_rejects_bad_ids_and_invalid_definitions() {
    let start = |definition, session_id: &str, agent: Option<&str>| {
        Session::start(
            definition,
            session_id,
            Value::Null,
            agent.map(str::to_owned),
            Map::new(),
            t0(),
        )
        .map(|_| ())
    };
    let ok = || dag(&[("a", &[])], json!({}));
    assert_eq!(
        start(ok(), "a.b", None),
        Err(StartError::InvalidSessionId("a.b".to_owned()))
    );
    assert!(start(ok(), &"s".repeat(65), None).is_err());
    assert_eq!(
        start(ok(), SESSION, Some("x>")),
        Err(StartError::InvalidAgentId("x>".to_owned()))
    );
    assert_eq!(
        start(dag(&[], json!({})), SESSION, None),
        Err(StartError::Definition(DefinitionError::NoTasks))
    );
}

#[test]
fn session_uses_the_documented_field_names_and_round_trips() {
    let mut session = start(sample());
    assign(&mut session, "step_1", "agent-a", t0());
    let json = serde_json::to_value(&session).expect("serializes");
    for field in [
        "sessionId",
        "workflowId",
        "workflowVersion",
        "agentId",
        "status",
        "startTime",
        "endTime",
        "input",
        "result",
        "error",
        "metadata",
        "definition",
        "tasks",
        "seq",
    ] {
        assert!(json.get(field).is_some(), "missing {field}");
    }
    let task = &json["tasks"][1];
    for field in [
        "taskId",
        "taskDefinitionId",
        "leaseEpoch",
        "leaseDeadline",
        "readyAt",
        "nextAttemptAt",
    ] {
        assert!(task.get(field).is_some(), "missing {field}");
    }
    assert_eq!(json["status"], "running");
    assert_eq!(
        task["pending"],
        json!({"reason": "waiting_on", "tasks": ["step_1"]})
    );

    let back: Session = serde_json::from_value(json).expect("deserializes");
    assert_eq!(back, session);
}

#[test]
fn status_events_serialize_with_their_kind_and_sequence() {
    let (_, effects) =
        Session::start(sample(), SESSION, Value::Null, None, Map::new(), t0()).expect("starts");
    let json = serde_json::to_value(events(&effects)[1]).expect("serializes");
    assert_eq!(json["kind"], "task.pending");
    assert_eq!(json["seq"], 2);
    assert_eq!(json["status"], "pending");
    assert_eq!(json["taskDefinitionId"], "step_1");
    assert_eq!(json["timestamp"], "2025-01-01T12:00:00Z");
}
