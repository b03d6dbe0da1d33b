//! Failures, retries, timeouts and cancellation: the ways a task or a session ends early.

use super::*;

#[test]
fn retryable_failure_retries_after_backoff_then_succeeds() {
    let retry = json!({"retry": {"maxAttempts": 3, "initialDelayMs": 1000, "jitter": 0.0}});
    let mut session = start(dag(&[("a", &[])], retry));
    assign(&mut session, "a", "x", t0());

    let effects = finish(&mut session, "a", failed("flaky", true), t0()).expect("accepted");
    let until = t0() + secs(1);
    assert_eq!(kinds(&effects), [EventKind::TaskRetrying]);
    assert!(effects.contains(&Effect::Timer(Timer {
        session_id: SESSION.to_owned(),
        kind: TimerKind::Backoff {
            task_id: id("a"),
            attempt: 1
        },
        at: until,
    })));
    let a = task(&session, "a");
    assert_eq!(a.status, TaskStatus::Retrying);
    assert_eq!(a.pending, Some(PendingReason::Backoff { until }));
    assert_eq!(
        a.error,
        Some(TaskError {
            message: "flaky".to_owned(),
            retryable: true
        })
    );
    assert!(session.ready_tasks(t0()).is_empty());
    assert!(matches!(
        session.assign(&id("a"), "x", t0()),
        Err(Rejection::NotReady { .. })
    ));

    assert_eq!(session.ready_tasks(until), [id("a")]);
    let effects = assign(&mut session, "a", "y", until);
    assert_eq!(
        (
            dispatched(&effects).attempt,
            dispatched(&effects).lease_epoch
        ),
        (2, 2)
    );
    finish(&mut session, "a", done(json!(1)), until).expect("accepted");
    assert_eq!(session.status, SessionStatus::Completed);
    assert_eq!(task(&session, "a").error, None);
}

#[test]
fn exhausted_retries_dead_letter_fail_the_session_and_cancel_other_leases() {
    let mut session = start(dag(
        &[("a", &[]), ("b", &[]), ("c", &["a"])],
        json!({"retry": {"maxAttempts": 1}}),
    ));
    assign(&mut session, "a", "x", t0());
    assign(&mut session, "b", "y", t0());

    let effects = finish(&mut session, "a", failed("boom", true), t0()).expect("accepted");
    let dead = effects.iter().find_map(|e| match e {
        Effect::DeadLetter(d) => Some(d),
        _ => None,
    });
    assert_eq!(
        dead,
        Some(&DeadLetter {
            session_id: SESSION.to_owned(),
            workflow_id: "wf".to_owned(),
            task_id: id("a"),
            task_definition_id: "a".to_owned(),
            capability: "cap".to_owned(),
            attempt: 1,
            reason: DeadLetterReason::RetriesExhausted,
            error: TaskError {
                message: "boom".to_owned(),
                retryable: true
            },
            timestamp: t0(),
        })
    );
    assert!(effects.contains(&Effect::Cancel(Cancellation {
        agent_id: "y".to_owned(),
        session_id: SESSION.to_owned(),
        task_id: id("b"),
        lease_epoch: 1,
    })));
    let released: Vec<&str> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::ReleaseLease(r) => Some(r.agent_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(released, ["x", "y"]);
    assert_eq!(
        kinds(&effects),
        [
            EventKind::TaskFailed,
            EventKind::TaskCancelled,
            EventKind::TaskCancelled,
            EventKind::SessionFailed
        ]
    );
    assert_eq!(session.status, SessionStatus::Failed);
    assert_eq!(
        session.error,
        Some(SessionError {
            message: "boom".to_owned(),
            task_id: Some(id("a")),
            task_definition_id: Some("a".to_owned()),
        })
    );
    assert_eq!(task(&session, "b").status, TaskStatus::Cancelled);
    assert_eq!(task(&session, "c").status, TaskStatus::Cancelled);
}

#[test]
fn non_retryable_failure_fails_at_the_first_attempt() {
    let mut session = start(dag(&[("a", &[])], json!({})));
    assign(&mut session, "a", "x", t0());
    let effects = finish(&mut session, "a", failed("bad input", false), t0()).expect("accepted");
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::DeadLetter(DeadLetter {
            reason: DeadLetterReason::NotRetryable,
            ..
        })
    )));
    assert_eq!(session.status, SessionStatus::Failed);
}

#[test]
fn continue_on_failure_lets_dependents_run_and_the_session_complete() {
    let mut definition = dag(&[("a", &[]), ("b", &[]), ("c", &["a", "b"])], json!({}));
    definition.tasks[0].settings.on_failure = Some(OnFailure::Continue);
    let mut session = start(definition);
    assign(&mut session, "a", "x", t0());
    assign(&mut session, "b", "y", t0());
    finish(&mut session, "b", done(json!("B")), t0()).expect("accepted");

    let effects = finish(&mut session, "a", failed("nope", false), t0()).expect("accepted");
    assert_eq!(
        kinds(&effects),
        [EventKind::TaskFailed, EventKind::TaskPending]
    );
    assert_eq!(session.status, SessionStatus::Running);

    let effects = assign(&mut session, "c", "x", t0());
    assert_eq!(
        dispatched(&effects).results,
        *json!({"b": "B"}).as_object().expect("object")
    );
    finish(&mut session, "c", done(json!("C")), t0()).expect("accepted");
    assert_eq!(session.status, SessionStatus::Completed);
    assert_eq!(session.result, Some(json!({"b": "B", "c": "C"})));
}

#[test]
fn cancel_stops_every_lease_and_cancels_unfinished_tasks() {
    let mut session = start(dag(&[("a", &[]), ("b", &[]), ("c", &["a"])], json!({})));
    assign(&mut session, "a", "x", t0());
    assign(&mut session, "b", "y", t0());
    finish(&mut session, "b", done(json!(1)), t0()).expect("accepted");

    let effects = session.cancel(t0()).expect("cancel accepted");
    let cancelled: Vec<&str> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Cancel(c) => Some(c.agent_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(cancelled, ["x"]);
    assert_eq!(
        kinds(&effects),
        [
            EventKind::TaskCancelled,
            EventKind::TaskCancelled,
            EventKind::SessionCancelled
        ]
    );
    assert_eq!(session.status, SessionStatus::Cancelled);
    assert_eq!(task(&session, "b").status, TaskStatus::Completed);
    assert_eq!(
        session.cancel(t0()),
        Err(Rejection::AlreadyEnded(SessionStatus::Cancelled))
    );
    assert!(session.ready_tasks(t0()).is_empty());
}

#[test]
fn queue_timeout_fails_a_task_no_agent_took() {
    let mut session = start(dag(&[("a", &[])], json!({"queueTimeoutSeconds": 30})));
    let effects = session
        .mark_waiting(&id("a"), PendingReason::NoCapableAgent, t0() + secs(5))
        .expect("accepted");
    assert_eq!(kinds(&effects), [EventKind::TaskPending]);
    assert!(effects.contains(&Effect::Timer(Timer {
        session_id: SESSION.to_owned(),
        kind: TimerKind::QueueTimeout {
            task_id: id("a"),
            attempt: 0
        },
        at: t0() + secs(30),
    })));

    let same = session.mark_waiting(&id("a"), PendingReason::NoCapableAgent, t0() + secs(6));
    assert_eq!(same, Ok(vec![]));
    let busy = session
        .mark_waiting(
            &id("a"),
            PendingReason::AllCapableAgentsBusy,
            t0() + secs(7),
        )
        .expect("accepted");
    assert_eq!(
        kinds(&busy),
        [EventKind::TaskPending],
        "reason changed, timer already armed"
    );
    assert_eq!(busy.len(), 1);

    assert!(session.queue_timeout(&id("a"), t0() + secs(29)).is_empty());
    let effects = session.queue_timeout(&id("a"), t0() + secs(30));
    assert_eq!(
        kinds(&effects),
        [EventKind::TaskFailed, EventKind::SessionFailed]
    );
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::DeadLetter(DeadLetter {
            reason: DeadLetterReason::QueueTimeout,
            ..
        })
    )));
    let error = task(&session, "a").error.clone().expect("an error");
    assert_eq!(
        error.message,
        "no agent with capability cap took the task within 30s"
    );
    assert!(!error.retryable);
}

#[test]
fn queue_timeout_is_ignored_once_the_task_is_placed_or_without_a_limit() {
    let mut session = start(dag(&[("a", &[])], json!({"queueTimeoutSeconds": 30})));
    assign(&mut session, "a", "x", t0());
    assert!(session.queue_timeout(&id("a"), t0() + secs(60)).is_empty());

    let mut session = start(dag(&[("a", &[])], json!({})));
    let effects = session
        .mark_waiting(&id("a"), PendingReason::NoCapableAgent, t0())
        .expect("accepted");
    assert_eq!(effects.len(), 1, "no timer without a queue timeout");
    assert!(
        session
            .queue_timeout(&id("a"), t0() + secs(86_400))
            .is_empty()
    );
}
