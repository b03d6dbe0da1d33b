//! Lease fencing: which reports are accepted, and what an expired lease does.

use super::*;

#[test]
fn stale_epoch_result_is_rejected() {
    let mut session = start(dag(&[("a", &[])], json!({})));
    assign(&mut session, "a", "x", t0());
    let before = session.clone();

    for epoch in [0, 2] {
        let rejection = session.apply_result(&id("a"), "x", epoch, done(json!(1)), 0.0, t0());
        assert_eq!(
            rejection,
            Err(Rejection::StaleLease {
                task_id: id("a"),
                epoch,
                current: 1
            })
        );
        assert!(rejection.expect_err("rejected").is_stale_report());
    }
    assert_eq!(session, before);
}

#[test]
fn report_from_an_agent_without_the_lease_is_rejected() {
    let mut session = start(dag(&[("a", &[])], json!({})));
    assign(&mut session, "a", "x", t0());
    assert_eq!(
        session.apply_progress(&id("a"), "intruder", 1, t0()),
        Err(Rejection::NotLeaseHolder {
            task_id: id("a"),
            agent_id: "intruder".to_owned()
        })
    );
    assert_eq!(
        session.apply_progress("nope", "x", 1, t0()),
        Err(Rejection::UnknownTask("nope".to_owned()))
    );
}

#[test]
fn duplicate_result_is_rejected_as_an_ended_lease() {
    let mut session = start(dag(&[("a", &[]), ("b", &[])], json!({})));
    assign(&mut session, "a", "x", t0());
    finish(&mut session, "a", done(json!(1)), t0()).expect("accepted");
    let before = session.clone();
    let again = session.apply_result(&id("a"), "x", 1, done(json!(1)), 0.0, t0());
    assert_eq!(
        again,
        Err(Rejection::LeaseEnded {
            task_id: id("a"),
            epoch: 1,
            status: TaskStatus::Completed
        })
    );
    assert_eq!(session, before);
}

#[test]
fn expired_lease_is_reassigned_with_a_new_epoch_and_the_late_result_is_rejected() {
    let mut session = start(dag(&[("a", &[])], json!({"timeoutSeconds": 60})));
    assign(&mut session, "a", "slow", t0());
    assert!(
        session
            .lease_expired(&id("a"), 1, 0.0, t0() + secs(59))
            .is_empty()
    );

    let expired = t0() + secs(60);
    let effects = session.lease_expired(&id("a"), 1, 0.0, expired);
    assert!(matches!(&effects[0], Effect::Cancel(c) if c.agent_id == "slow" && c.lease_epoch == 1));
    assert!(matches!(&effects[1], Effect::ReleaseLease(r) if r.agent_id == "slow"));
    assert_eq!(kinds(&effects), [EventKind::TaskRetrying]);
    assert_eq!(
        task(&session, "a")
            .error
            .as_ref()
            .map(|e| e.message.as_str()),
        Some("lease expired")
    );

    let retry_at = expired + secs(1);
    let effects = assign(&mut session, "a", "fast", retry_at);
    assert_eq!(dispatched(&effects).lease_epoch, 2);
    assert_eq!(
        session.apply_result(&id("a"), "slow", 1, done(json!("late")), 0.0, retry_at),
        Err(Rejection::StaleLease {
            task_id: id("a"),
            epoch: 1,
            current: 2
        })
    );
    // The old timer firing again must not touch the new lease.
    assert!(
        session
            .lease_expired(&id("a"), 1, 0.0, retry_at + secs(600))
            .is_empty()
    );

    let epoch = task(&session, "a").lease_epoch;
    session
        .apply_result(&id("a"), "fast", epoch, done(json!("ok")), 0.0, retry_at)
        .expect("accepted");
    assert_eq!(session.status, SessionStatus::Completed);
}

#[test]
fn progress_extends_the_lease_and_the_old_deadline_is_ignored() {
    let mut session = start(dag(&[("a", &[])], json!({"timeoutSeconds": 60})));
    assign(&mut session, "a", "x", t0());
    let effects = session
        .apply_progress(&id("a"), "x", 1, t0() + secs(50))
        .expect("accepted");
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Timer(t) if t.at == t0() + secs(110)))
    );
    assert!(
        session
            .lease_expired(&id("a"), 1, 0.0, t0() + secs(60))
            .is_empty()
    );
    assert_eq!(task(&session, "a").status, TaskStatus::Running);

    // A second progress report is silent apart from the re-armed timer.
    let effects = session
        .apply_progress(&id("a"), "x", 1, t0() + secs(70))
        .expect("accepted");
    assert!(kinds(&effects).is_empty());
    assert_eq!(effects.len(), 1);
}

#[test]
fn legacy_reports_apply_under_the_reporting_agents_lease() {
    let mut session = start(dag(&[("a", &[])], json!({})));
    assign(&mut session, "a", "old-agent", t0());
    let details = json!({"opscore_task_id": id("a"), "summary": "done"});

    let (task_id, report) = legacy_report("idle", &details).expect("a report");
    assert_eq!(
        session.apply_legacy(&task_id, "someone-else", report.clone(), 0.0, t0()),
        Err(Rejection::NotLeaseHolder {
            task_id: id("a"),
            agent_id: "someone-else".to_owned()
        })
    );

    let (_, progress) = legacy_report("active", &details).expect("a report");
    let effects = session
        .apply_legacy(&task_id, "old-agent", progress, 0.0, t0())
        .expect("ok");
    assert_eq!(kinds(&effects), [EventKind::TaskRunning]);

    session
        .apply_legacy(&task_id, "old-agent", report, 0.0, t0())
        .expect("accepted");
    assert_eq!(task(&session, "a").output, Some(details));
    assert_eq!(session.status, SessionStatus::Completed);
}
