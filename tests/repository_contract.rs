//! One contract, two repositories: every test here runs against the in-memory repository and
//! against Redis (a real redis-server started for the test).

mod common;

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use opscore::model::{Agent, AgentState, HistoryEntry};
use opscore::outbox::OutboxMessage;
use opscore::repository::{
    AgentCommit, AgentFilter, AgentRepository, CommitOutcome, DefineOutcome, Freshness, Health,
    RedisRepository, Repository, RepositoryOptions, SessionCommit, SessionCommitOutcome,
    SessionFilter, SessionRepository,
};
use opscore::workflow::{Session, Timer, TimerKind, WorkflowDefinition};
use serde_json::Map;

const OPTIONS: RepositoryOptions = RepositoryOptions {
    history_length: 3,
    dedupe_window: chrono::Duration::seconds(60),
    outbox_grace: chrono::Duration::seconds(5),
};

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + secs, 0)
        .single()
        .expect("valid time")
}

fn agent(id: &str, capabilities: &[&str], state: AgentState) -> Agent {
    Agent {
        agent_id: id.to_owned(),
        agent_name: format!("Agent {id}"),
        version: "1".to_owned(),
        capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
        contact_endpoint: None,
        metadata: Map::new(),
        max_concurrent_tasks: 1,
        state,
        state_timestamp: at(0),
        reported_state: None,
        reported_at: None,
        details: Map::new(),
        registered_at: at(0),
        last_seen: at(0),
        deregistered: false,
        deregistered_at: None,
        deregister_reason: None,
        seq: 0,
        stale_events: 0,
        leases: Vec::new(),
        last_assigned_at: None,
    }
}

/// Commits `agent` over `previous` (the record at `version`), with an optional event id.
async fn put<R: Repository>(
    repository: &R,
    agent: &Agent,
    version: u64,
    previous: &[String],
    event_id: Option<&str>,
    now: DateTime<Utc>,
) -> CommitOutcome {
    put_checking(repository, agent, version, previous, event_id, now, &[]).await
}

/// As [`put`], asking the commit whether sessions wait for any of `check_waiting`.
async fn put_checking<R: Repository>(
    repository: &R,
    agent: &Agent,
    version: u64,
    previous: &[String],
    event_id: Option<&str>,
    now: DateTime<Utc>,
    check_waiting: &[String],
) -> CommitOutcome {
    repository
        .commit(AgentCommit {
            agent,
            expected_version: version,
            previous_capabilities: previous,
            event_id,
            history: None,
            liveness_deadline: Some(now + chrono::Duration::seconds(30)),
            outbox: &[],
            counters: &[],
            check_waiting,
            now,
        })
        .await
        .expect("commit")
}

/// The record a change of `id` would start from; it must exist.
async fn for_change<R: Repository>(
    repository: &R,
    id: &str,
) -> opscore::repository::Versioned<Agent> {
    repository
        .load_for_change(id)
        .await
        .expect("load")
        .expect("exists")
}

async fn ids<R: Repository>(repository: &R, filter: AgentFilter) -> Vec<String> {
    let page = repository.list(&filter, None, 100).await.expect("list");
    page.items.into_iter().map(|a| a.agent_id).collect()
}

async fn loads_nothing_for_an_unknown_agent<R: Repository>(repository: R) {
    assert_eq!(repository.load("nobody").await.expect("load"), None);
}

async fn commits_are_compare_and_set_on_the_version<R: Repository>(repository: R) {
    let a = agent("a", &["x"], AgentState::Unknown);
    assert_eq!(
        put(&repository, &a, 0, &[], None, at(0)).await,
        CommitOutcome::Committed {
            version: 1,
            waiting: false
        }
    );
    let loaded = repository.load("a").await.expect("load").expect("exists");
    assert_eq!((loaded.version, &loaded.value), (1, &a));

    assert_eq!(
        put(&repository, &a, 0, &[], None, at(1)).await,
        CommitOutcome::Conflict
    );
    let idle = agent("a", &["x"], AgentState::Idle);
    assert_eq!(
        put(&repository, &idle, 1, &a.capabilities, None, at(1)).await,
        CommitOutcome::Committed {
            version: 2,
            waiting: false
        }
    );
    assert_eq!(
        repository
            .load("a")
            .await
            .expect("load")
            .expect("exists")
            .value
            .state,
        AgentState::Idle
    );
}

async fn an_event_id_is_applied_once_within_the_window<R: Repository>(repository: R) {
    let a = agent("a", &["x"], AgentState::Unknown);
    assert_eq!(
        put(&repository, &a, 0, &[], Some("e1"), at(0)).await,
        CommitOutcome::Committed {
            version: 1,
            waiting: false
        }
    );
    // A duplicate is recognised even when it names the current version.
    assert_eq!(
        put(&repository, &a, 1, &[], Some("e1"), at(1)).await,
        CommitOutcome::Duplicate
    );
    assert_eq!(
        repository
            .load("a")
            .await
            .expect("load")
            .expect("exists")
            .version,
        1
    );

    // Past the window, a later commit forgets it.
    assert_eq!(
        put(&repository, &a, 1, &[], Some("e2"), at(120)).await,
        CommitOutcome::Committed {
            version: 2,
            waiting: false
        }
    );
    assert_eq!(
        put(&repository, &a, 2, &[], Some("e1"), at(121)).await,
        CommitOutcome::Committed {
            version: 3,
            waiting: false
        }
    );
}

async fn history_is_capped_and_newest_first<R: Repository>(repository: R) {
    let a = agent("a", &["x"], AgentState::Unknown);
    for (version, state) in [
        AgentState::Idle,
        AgentState::Busy,
        AgentState::Idle,
        AgentState::Error,
    ]
    .into_iter()
    .enumerate()
    {
        let entry = HistoryEntry {
            state,
            timestamp: at(version as i64),
            received_at: at(version as i64),
            details: Map::new(),
        };
        let outcome = repository
            .commit(AgentCommit {
                agent: &a,
                expected_version: version as u64,
                previous_capabilities: &[],
                event_id: None,
                history: Some(&entry),
                liveness_deadline: None,
                outbox: &[],
                counters: &[],
                check_waiting: &[],
                now: at(version as i64),
            })
            .await
            .expect("commit");
        assert!(matches!(outcome, CommitOutcome::Committed { .. }));
    }
    let history = repository.history("a", 10).await.expect("history");
    let states: Vec<AgentState> = history.iter().map(|h| h.state).collect();
    assert_eq!(
        states,
        [AgentState::Error, AgentState::Idle, AgentState::Busy]
    );
    assert_eq!(repository.history("a", 1).await.expect("history").len(), 1);
    assert!(
        repository
            .history("nobody", 5)
            .await
            .expect("history")
            .is_empty()
    );
}

async fn listings_filter_follow_capability_changes_and_page<R: Repository>(repository: R) {
    for (id, caps, state) in [
        ("c", &["x"][..], AgentState::Idle),
        ("a", &["x", "y"][..], AgentState::Busy),
        ("b", &["y"][..], AgentState::Idle),
    ] {
        put(&repository, &agent(id, caps, state), 0, &[], None, at(0)).await;
    }
    assert_eq!(
        ids(&repository, AgentFilter::default()).await,
        ["a", "b", "c"]
    );
    let x = AgentFilter {
        capability: Some("x".into()),
        state: None,
    };
    assert_eq!(ids(&repository, x.clone()).await, ["a", "c"]);
    let idle = AgentFilter {
        capability: None,
        state: Some(AgentState::Idle),
    };
    assert_eq!(ids(&repository, idle).await, ["b", "c"]);

    // "a" drops capability x.
    let changed = agent("a", &["y"], AgentState::Busy);
    put(
        &repository,
        &changed,
        1,
        &["x".into(), "y".into()],
        None,
        at(1),
    )
    .await;
    assert_eq!(ids(&repository, x).await, ["c"]);

    let first = repository
        .list(&AgentFilter::default(), None, 2)
        .await
        .expect("page");
    assert_eq!(first.items.len(), 2);
    let cursor = first.next_cursor.expect("more pages");
    let second = repository
        .list(&AgentFilter::default(), Some(&cursor), 2)
        .await
        .expect("page");
    assert_eq!(
        second
            .items
            .iter()
            .map(|a| a.agent_id.as_str())
            .collect::<Vec<_>>(),
        ["c"]
    );
    assert_eq!(second.next_cursor, None);
}

/// A result releasing an agent's lease proves the agent alive: its session commit moves the
/// agent's liveness deadline with the record.
async fn a_session_commit_moves_the_liveness_of_the_agent_heard_from<R: Repository>(repository: R) {
    let a = agent("a", &["x"], AgentState::Idle);
    put(&repository, &a, 0, &[], None, at(0)).await; // deadline at(30)
    let s = session("01890a5d-ac96-774b-bcce-b302099a8057", "w");
    let mut commit = session_commit(&s, 0);
    commit.agents = vec![(&a, 1)];
    commit.liveness = Some(("a", at(90)));
    assert_eq!(
        repository.commit_session(commit).await.expect("commit"),
        SessionCommitOutcome::Committed { waiting: false }
    );

    assert!(
        repository
            .claim_due_liveness(at(89), at(200), 10)
            .await
            .expect("claim")
            .is_empty(),
        "the deadline of at(30) moved"
    );
    assert_eq!(
        repository
            .claim_due_liveness(at(90), at(200), 10)
            .await
            .expect("claim"),
        ["a"]
    );
}

async fn due_liveness_timers_are_claimed_once<R: Repository>(repository: R) {
    let a = agent("a", &["x"], AgentState::Idle);
    put(&repository, &a, 0, &[], None, at(0)).await; // deadline at(30)
    let b = agent("b", &["x"], AgentState::Idle);
    put(&repository, &b, 0, &[], None, at(100)).await; // deadline at(130)

    assert!(
        repository
            .claim_due_liveness(at(29), at(40), 10)
            .await
            .expect("claim")
            .is_empty()
    );
    assert_eq!(
        repository
            .claim_due_liveness(at(30), at(40), 10)
            .await
            .expect("claim"),
        ["a"]
    );
    // Claimed: nobody else takes it until the claim runs out.
    assert!(
        repository
            .claim_due_liveness(at(35), at(45), 10)
            .await
            .expect("claim")
            .is_empty()
    );
    assert_eq!(
        repository
            .claim_due_liveness(at(40), at(50), 10)
            .await
            .expect("claim"),
        ["a"]
    );

    // A commit without a deadline removes the timer.
    repository
        .commit(AgentCommit {
            agent: &a,
            expected_version: 1,
            previous_capabilities: &a.capabilities,
            event_id: None,
            history: None,
            liveness_deadline: None,
            outbox: &[],
            counters: &[],
            check_waiting: &[],
            now: at(41),
        })
        .await
        .expect("commit");
    assert_eq!(
        repository
            .claim_due_liveness(at(200), at(210), 10)
            .await
            .expect("claim"),
        ["b"]
    );
}

async fn the_outbox_keeps_messages_until_removed<R: Repository>(repository: R) {
    let message = |id: &str| OutboxMessage {
        id: id.to_owned(),
        subject: "opscore.status.agent.a".to_owned(),
        payload: format!("{{\"id\":\"{id}\"}}"),
        headers: Vec::new(),
    };
    let messages = [message("m1"), message("m2")];
    let a = agent("a", &["x"], AgentState::Idle);
    repository
        .commit(AgentCommit {
            agent: &a,
            expected_version: 0,
            previous_capabilities: &[],
            event_id: None,
            history: None,
            liveness_deadline: None,
            outbox: &messages,
            counters: &[],
            check_waiting: &[],
            now: at(0),
        })
        .await
        .expect("commit");

    // Within the grace period the committing worker is expected to publish them itself.
    assert!(
        repository
            .claim_due_outbox(at(4), at(20), 10)
            .await
            .expect("claim")
            .is_empty()
    );
    repository
        .remove_outbox(&["m1".to_owned()])
        .await
        .expect("remove");
    let stranded = repository
        .claim_due_outbox(at(5), at(20), 10)
        .await
        .expect("claim");
    assert_eq!(stranded, [message("m2")]);
    assert!(
        repository
            .claim_due_outbox(at(6), at(20), 10)
            .await
            .expect("claim")
            .is_empty()
    );
    repository
        .remove_outbox(&["m2".to_owned()])
        .await
        .expect("remove");
    assert!(
        repository
            .claim_due_outbox(at(100), at(120), 10)
            .await
            .expect("claim")
            .is_empty()
    );
}

async fn health_answers_and_commits_move_counters<R: Repository>(repository: R) {
    repository.ping().await.expect("ping");
    let a = agent("a", &["x"], AgentState::Idle);
    let moves = [
        ("agents:idle".to_owned(), 1),
        ("agents:busy".to_owned(), -1),
    ];
    repository
        .commit(AgentCommit {
            agent: &a,
            expected_version: 0,
            previous_capabilities: &[],
            event_id: None,
            history: None,
            liveness_deadline: None,
            outbox: &[],
            counters: &moves,
            check_waiting: &[],
            now: at(0),
        })
        .await
        .expect("commit");
    let counters = repository.counters().await.expect("counters");
    assert_eq!(counters.get("agents:idle"), Some(&1));
    assert_eq!(counters.get("agents:busy"), Some(&-1));
}

fn session(id: &str, workflow: &str) -> Session {
    let definition: WorkflowDefinition = serde_json::from_value(serde_json::json!({
        "id": workflow, "name": workflow, "version": "1",
        "tasks": [{"taskId": "t", "name": "t", "agentCapability": "x"}]
    }))
    .expect("definition");
    Session::start(
        definition,
        id,
        serde_json::json!({}),
        None,
        Map::new(),
        at(0),
    )
    .expect("session")
    .0
}

fn session_commit<'a>(session: &'a Session, version: u64) -> SessionCommit<'a> {
    SessionCommit {
        session,
        expected_version: version,
        agents: Vec::new(),
        event: None,
        liveness: None,
        idempotency_key: None,
        waiting_leave: Vec::new(),
        waiting_join: Vec::new(),
        timers_set: Vec::new(),
        timers_clear: Vec::new(),
        outbox: &[],
        counters: Vec::new(),
        check_waiting: Vec::new(),
        now: at(0),
    }
}

async fn sessions_commit_with_their_agents_atomically<R: Repository>(repository: R) {
    let a = agent("a", &["x"], AgentState::Idle);
    put(&repository, &a, 0, &[], None, at(0)).await;
    let s = session("01890a5d-ac96-774b-bcce-b302099a8057", "w");

    // A stale agent version fails the whole commit: neither record changes.
    let mut stale = session_commit(&s, 0);
    stale.agents = vec![(&a, 7)];
    assert_eq!(
        repository.commit_session(stale).await.expect("commit"),
        SessionCommitOutcome::Conflict
    );
    assert!(
        repository
            .load_session(&s.session_id)
            .await
            .expect("load")
            .is_none()
    );

    let leased = with_lease(&a, &s);
    let mut commit = session_commit(&s, 0);
    commit.agents = vec![(&leased, 1)];
    commit.event = Some(("a", "e1"));
    commit.idempotency_key = Some("key-1");
    assert_eq!(
        repository.commit_session(commit).await.expect("commit"),
        SessionCommitOutcome::Committed { waiting: false }
    );
    assert_eq!(
        repository
            .load_session(&s.session_id)
            .await
            .expect("load")
            .expect("exists")
            .version,
        1
    );
    let agent_after = repository.load("a").await.expect("load").expect("exists");
    assert_eq!(
        (agent_after.version, agent_after.value.leases.len()),
        (2, 1)
    );

    // The same event again is a duplicate; the same key names the first session.
    let mut again = session_commit(&s, 1);
    again.event = Some(("a", "e1"));
    assert_eq!(
        repository.commit_session(again).await.expect("commit"),
        SessionCommitOutcome::Duplicate
    );
    let other = session("01890a5d-ac96-774b-bcce-b302099a8058", "w");
    let mut keyed = session_commit(&other, 0);
    keyed.idempotency_key = Some("key-1");
    assert_eq!(
        repository.commit_session(keyed).await.expect("commit"),
        SessionCommitOutcome::KeyTaken(s.session_id.clone())
    );
}

async fn a_change_starts_from_the_last_committed_record<R: Repository>(repository: R) {
    let a = agent("a", &["x"], AgentState::Idle);
    put(&repository, &a, 0, &[], None, at(0)).await;
    let base = repository.load_for_change("a").await.expect("load");
    assert_eq!(base.map(|r| r.version), Some(1));

    // A session commit that leases the agent: the next change starts from what it wrote.
    lease_in_new_session(&repository, &a).await;
    let current = for_change(&repository, "a").await;
    assert_eq!((current.version, current.value.leases.len()), (2, 1));

    // A change computed from the older record conflicts; the current record comes next.
    let busy = agent("a", &["x"], AgentState::Busy);
    assert_eq!(
        put(&repository, &busy, 1, &a.capabilities, None, at(1)).await,
        CommitOutcome::Conflict
    );
    let current = for_change(&repository, "a").await;
    assert_eq!((current.version, current.value.leases.len()), (2, 1));
    let mut busy = current.value;
    busy.state = AgentState::Busy;
    assert_eq!(
        put(&repository, &busy, 2, &a.capabilities, None, at(1)).await,
        CommitOutcome::Committed {
            version: 3,
            waiting: false
        }
    );
    let stored = repository.load("a").await.expect("load").expect("exists");
    assert_eq!((stored.version, stored.value), (3, busy));
}

/// A session commit that gives agents a slot back says whether sessions wait for their
/// capabilities, so that the worker reads the waiting sessions only when there are some.
async fn a_session_commit_tells_whether_sessions_wait_for_the_capabilities<R: Repository>(
    repository: R,
) {
    let (x, y) = (vec!["x".to_owned()], vec!["y".to_owned()]);
    let waiting = session("01890a5d-ac96-774b-bcce-b302099a8057", "w");
    let mut waits = session_commit(&waiting, 0);
    waits.waiting_join = x.clone();
    waits.check_waiting = x.clone();
    assert_eq!(
        repository.commit_session(waits).await.expect("commit"),
        SessionCommitOutcome::Committed { waiting: true },
        "the check comes after the commit's own changes"
    );

    let other = session("01890a5d-ac96-774b-bcce-b302099a8058", "w");
    let mut releases = session_commit(&other, 0);
    releases.check_waiting = y;
    assert_eq!(
        repository.commit_session(releases).await.expect("commit"),
        SessionCommitOutcome::Committed { waiting: false }
    );
    let mut releases = session_commit(&other, 1);
    releases.check_waiting = x;
    assert_eq!(
        repository.commit_session(releases).await.expect("commit"),
        SessionCommitOutcome::Committed { waiting: true }
    );
}

async fn a_commit_tells_whether_sessions_wait_for_the_capabilities<R: Repository>(repository: R) {
    let commit = |agent: &Agent, version: u64, check: &[String]| {
        let (agent, check) = (agent.clone(), check.to_vec());
        let repository = repository.clone();
        async move {
            let previous = agent.capabilities.clone();
            put_checking(&repository, &agent, version, &previous, None, at(1), &check).await
        }
    };
    let a = agent("a", &["x", "y"], AgentState::Idle);
    let (x, y) = (vec!["x".to_owned()], vec!["y".to_owned()]);
    assert_eq!(
        commit(&a, 0, &x).await,
        CommitOutcome::Committed {
            version: 1,
            waiting: false
        }
    );

    let s = session("01890a5d-ac96-774b-bcce-b302099a8057", "w");
    let mut waits = session_commit(&s, 0);
    waits.waiting_join = vec!["x".to_owned()];
    assert_eq!(
        repository.commit_session(waits).await.expect("commit"),
        SessionCommitOutcome::Committed { waiting: false }
    );
    assert_eq!(
        commit(&a, 1, &x).await,
        CommitOutcome::Committed {
            version: 2,
            waiting: true
        }
    );
    assert_eq!(
        commit(&a, 2, &y).await,
        CommitOutcome::Committed {
            version: 3,
            waiting: false
        }
    );
    assert_eq!(
        commit(&a, 3, &[]).await,
        CommitOutcome::Committed {
            version: 4,
            waiting: false
        },
        "nothing asked, nothing looked for"
    );

    let mut placed = session_commit(&s, 1);
    placed.waiting_leave = vec!["x".to_owned()];
    assert_eq!(
        repository.commit_session(placed).await.expect("commit"),
        SessionCommitOutcome::Committed { waiting: false }
    );
    assert_eq!(
        commit(&a, 4, &x).await,
        CommitOutcome::Committed {
            version: 5,
            waiting: false
        },
        "the session no longer waits"
    );
}

async fn capable_agents_are_the_stored_records<R: Repository>(repository: R) {
    let read = |capability: &'static str, limit: usize, freshness: Freshness| {
        let repository = repository.clone();
        async move {
            let mut records = repository
                .capable_agents(capability, limit, freshness)
                .await
                .expect("capable agents");
            records.sort_by(|a, b| a.value.agent_id.cmp(&b.value.agent_id));
            records
                .into_iter()
                .map(|r| (r.version, (*r.value).clone()))
                .collect::<Vec<_>>()
        }
    };
    let capable = |capability, limit| read(capability, limit, Freshness::Current);
    let a = agent("a", &["x"], AgentState::Idle);
    let b = agent("b", &["x", "y"], AgentState::Idle);
    for record in [&a, &b, &agent("c", &["y"], AgentState::Idle)] {
        put(&repository, record, 0, &[], None, at(0)).await;
    }
    assert_eq!(capable("x", 10).await, [(1, a.clone()), (1, b.clone())]);
    assert_eq!(capable("x", 1).await.len(), 1, "at most the limit");
    assert!(capable("z", 10).await.is_empty());

    // A session commit leasing `a` is what the next placement sees.
    let leased = lease_in_new_session(&repository, &a).await;
    assert_eq!(capable("x", 10).await, [(2, leased), (1, b)]);
    // With one writer, what it keeps is what is stored.
    assert_eq!(read("x", 10, Freshness::Kept).await, capable("x", 10).await);
}

/// Commits a new session that takes a lease on `agent`, stored at version 1; returns the
/// agent's record as committed.
async fn lease_in_new_session<R: Repository>(repository: &R, agent: &Agent) -> Agent {
    let s = session("01890a5d-ac96-774b-bcce-b302099a8057", "w");
    let leased = with_lease(agent, &s);
    let mut commit = session_commit(&s, 0);
    commit.agents = vec![(&leased, 1)];
    assert_eq!(
        repository.commit_session(commit).await.expect("commit"),
        SessionCommitOutcome::Committed { waiting: false }
    );
    leased
}

/// `agent` holding the lease of task `t` of `session`.
fn with_lease(agent: &Agent, session: &Session) -> Agent {
    let mut leased = agent.clone();
    leased.leases.push(opscore::model::Lease {
        session_id: session.session_id.clone(),
        task_id: "t".into(),
        lease_epoch: 1,
    });
    leased
}

async fn sessions_list_newest_first_and_track_waiting_and_timers<R: Repository>(repository: R) {
    let older = session("01890a5d-ac96-774b-bcce-b302099a8057", "w1");
    let newer = session("01890a5d-ac96-774b-bcce-b302099a8058", "w2");
    let mut first = session_commit(&older, 0);
    first.waiting_join = vec!["x".into()];
    repository.commit_session(first).await.expect("commit");
    let timer = Timer {
        session_id: newer.session_id.clone(),
        kind: TimerKind::Backoff {
            task_id: "t".into(),
            attempt: 1,
        },
        at: at(10),
    };
    let mut second = session_commit(&newer, 0);
    second.timers_set = vec![timer.clone()];
    repository.commit_session(second).await.expect("commit");

    let all = repository
        .list_sessions(&SessionFilter::default(), None, 10)
        .await
        .expect("list");
    let ids: Vec<&str> = all.items.iter().map(|s| s.workflow_id.as_str()).collect();
    assert_eq!(ids, ["w2", "w1"]);
    let filter = SessionFilter {
        status: None,
        workflow_id: Some("w1".into()),
    };
    assert_eq!(
        repository
            .list_sessions(&filter, None, 10)
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    assert_eq!(
        repository
            .active_sessions(None, 10)
            .await
            .expect("active")
            .items
            .len(),
        2
    );

    assert_eq!(
        repository.waiting_sessions("x", 10).await.expect("waiting"),
        std::slice::from_ref(&older.session_id)
    );
    let mut leave = session_commit(&older, 1);
    leave.waiting_leave = vec!["x".into()];
    repository.commit_session(leave).await.expect("commit");
    assert!(
        repository
            .waiting_sessions("x", 10)
            .await
            .expect("waiting")
            .is_empty()
    );

    assert!(
        repository
            .claim_due_timers(at(9), at(20), 10)
            .await
            .expect("claim")
            .is_empty()
    );
    assert_eq!(
        repository
            .claim_due_timers(at(10), at(20), 10)
            .await
            .expect("claim"),
        std::slice::from_ref(&timer)
    );
    assert!(
        repository
            .claim_due_timers(at(15), at(25), 10)
            .await
            .expect("claim")
            .is_empty()
    );
    repository
        .clear_timers(&[timer.key()])
        .await
        .expect("clear");
    assert!(
        repository
            .claim_due_timers(at(30), at(40), 10)
            .await
            .expect("claim")
            .is_empty()
    );
}

async fn workflow_versions_are_immutable<R: Repository>(repository: R) {
    let v1 = session("01890a5d-ac96-774b-bcce-b302099a8057", "w").definition;
    assert_eq!(
        repository.define(&v1).await.expect("define"),
        DefineOutcome::Created
    );
    assert_eq!(
        repository.define(&v1).await.expect("define"),
        DefineOutcome::Unchanged
    );
    let mut changed = v1.clone();
    changed.name = "renamed".into();
    assert_eq!(
        repository.define(&changed).await.expect("define"),
        DefineOutcome::VersionExists
    );
    changed.version = "2".into();
    assert_eq!(
        repository.define(&changed).await.expect("define"),
        DefineOutcome::Created
    );
    assert_eq!(
        repository
            .workflow("w", None)
            .await
            .expect("get")
            .map(|d| d.version),
        Some("2".into())
    );
    assert_eq!(
        repository.workflow("w", Some("1")).await.expect("get"),
        Some(v1)
    );
    assert_eq!(repository.workflows().await.expect("list").len(), 1);
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(opscore::repository::MemoryRepository::new(super::OPTIONS)).await;
                }
            )*
        }

        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let server = crate::common::RedisServer::start();
                    let repository = super::redis_repository(&server);
                    super::$name(repository).await;
                }
            )*
        }
    };
}

fn redis_repository(server: &common::RedisServer) -> RedisRepository {
    RedisRepository::connect(
        &server.url(),
        "contract:",
        Duration::from_secs(2),
        Duration::from_secs(2),
        OPTIONS,
    )
    .expect("redis repository")
}

contract!(
    loads_nothing_for_an_unknown_agent,
    commits_are_compare_and_set_on_the_version,
    an_event_id_is_applied_once_within_the_window,
    history_is_capped_and_newest_first,
    listings_filter_follow_capability_changes_and_page,
    due_liveness_timers_are_claimed_once,
    a_session_commit_moves_the_liveness_of_the_agent_heard_from,
    the_outbox_keeps_messages_until_removed,
    health_answers_and_commits_move_counters,
    sessions_commit_with_their_agents_atomically,
    a_change_starts_from_the_last_committed_record,
    a_commit_tells_whether_sessions_wait_for_the_capabilities,
    a_session_commit_tells_whether_sessions_wait_for_the_capabilities,
    capable_agents_are_the_stored_records,
    sessions_list_newest_first_and_track_waiting_and_timers,
    workflow_versions_are_immutable,
);

/// Two repositories on one Redis are two workers: what one changes, the other's next change
/// learns from its conflict, and plain reads are always current.
#[tokio::test]
async fn redis_a_record_another_worker_changed_costs_one_conflict() {
    let server = common::RedisServer::start();
    let (first, second) = (redis_repository(&server), redis_repository(&server));
    let a = agent("a", &["x"], AgentState::Idle);
    put(&first, &a, 0, &[], None, at(0)).await;

    let theirs = for_change(&second, "a").await;
    let mut busy = theirs.value;
    busy.state = AgentState::Busy;
    assert_eq!(
        put(&second, &busy, theirs.version, &a.capabilities, None, at(1)).await,
        CommitOutcome::Committed {
            version: 2,
            waiting: false
        }
    );

    let cached = for_change(&first, "a").await;
    assert_eq!(
        cached.version, 1,
        "the first worker still starts from its own commit"
    );
    let current = first.load("a").await.expect("load").expect("exists");
    assert_eq!(
        (current.version, current.value.state),
        (2, AgentState::Busy)
    );

    let active = agent("a", &["x"], AgentState::Active);
    assert_eq!(
        put(
            &first,
            &active,
            cached.version,
            &a.capabilities,
            None,
            at(2)
        )
        .await,
        CommitOutcome::Conflict
    );
    let refreshed = for_change(&first, "a").await;
    assert_eq!((refreshed.version, refreshed.value), (2, busy));
}

/// A record lost and created again up to the version a worker keeps is another record: the
/// worker's next change from the kept one conflicts instead of overwriting it.
#[tokio::test]
async fn redis_a_record_created_again_is_not_taken_for_the_one_kept() {
    let server = common::RedisServer::start();
    let (first, second) = (redis_repository(&server), redis_repository(&server));
    let old = agent("a", &["x"], AgentState::Idle);
    put(&first, &old, 0, &[], None, at(0)).await;

    flush(&server).await;
    let new = agent("a", &["y"], AgentState::Busy);
    assert_eq!(
        put(&second, &new, 0, &[], None, at(1)).await,
        CommitOutcome::Committed {
            version: 1,
            waiting: false
        }
    );

    let kept = for_change(&first, "a").await;
    assert_eq!(
        (kept.version, &kept.value),
        (1, &old),
        "the first worker keeps the old one"
    );
    let mut changed = kept.value;
    changed.state = AgentState::Active;
    assert_eq!(
        put(&first, &changed, 1, &old.capabilities, None, at(2)).await,
        CommitOutcome::Conflict
    );
    let current = for_change(&first, "a").await;
    assert_eq!((current.version, current.value), (1, new));
}

/// A placement reads the candidates as stored, whatever this worker keeps: records another
/// worker changed, and a record lost and created again up to the version kept.
#[tokio::test]
async fn redis_candidates_are_read_as_stored_whatever_is_kept() {
    let server = common::RedisServer::start();
    let (first, second) = (redis_repository(&server), redis_repository(&server));
    let candidates = |repository: &RedisRepository| {
        let repository = repository.clone();
        async move {
            let records = repository
                .capable_agents("x", 10, Freshness::Current)
                .await
                .expect("capable");
            records
                .into_iter()
                .map(|r| (r.version, (*r.value).clone()))
                .collect::<Vec<_>>()
        }
    };
    let old = agent("a", &["x"], AgentState::Idle);
    put(&first, &old, 0, &[], None, at(0)).await;
    assert_eq!(candidates(&first).await, [(1, old.clone())]);

    let mut busy = old.clone();
    busy.state = AgentState::Busy;
    put(&second, &busy, 1, &old.capabilities, None, at(1)).await;
    assert_eq!(
        candidates(&first).await,
        [(2, busy.clone())],
        "changed by another worker"
    );

    flush(&server).await;
    let new = agent("a", &["x"], AgentState::Active);
    put(&second, &new, 0, &[], None, at(2)).await;
    put(&second, &new, 1, &old.capabilities, None, at(3)).await;
    assert_eq!(
        candidates(&first).await,
        [(2, new)],
        "the same version in another life"
    );
}

/// Places a new session's task on the one kept candidate of capability `x`, after checking
/// that it is `expected` (version and record); returns how the commit ended.
async fn place_on_kept(
    repository: &RedisRepository,
    expected: (u64, &Agent),
    why: &str,
) -> SessionCommitOutcome {
    let kept = repository
        .capable_agents("x", 10, Freshness::Kept)
        .await
        .expect("kept");
    assert_eq!((kept[0].version, kept[0].value.as_ref()), expected, "{why}");
    let s = session("01890a5d-ac96-774b-bcce-b302099a8057", "w");
    let leased = with_lease(&kept[0].value, &s);
    let mut commit = session_commit(&s, 0);
    commit.agents = vec![(&leased, kept[0].version)];
    repository.commit_session(commit).await.expect("commit")
}

/// Kept candidates are what this worker last committed or read, possibly a version behind
/// another worker's change; a placement chosen from them fails its compare-and-set, and the
/// next read as stored sees the change.
#[tokio::test]
async fn redis_kept_candidates_may_lag_and_the_commit_catches_it() {
    let server = common::RedisServer::start();
    let (first, second) = (redis_repository(&server), redis_repository(&server));
    let old = agent("a", &["x"], AgentState::Idle);
    put(&first, &old, 0, &[], None, at(0)).await;
    let mut busy = old.clone();
    busy.state = AgentState::Busy;
    put(&second, &busy, 1, &old.capabilities, None, at(1)).await;

    assert_eq!(
        place_on_kept(&first, (1, &old), "a version behind").await,
        SessionCommitOutcome::Conflict
    );
    let current = first
        .capable_agents("x", 10, Freshness::Current)
        .await
        .expect("current");
    assert_eq!((current[0].version, current[0].value.as_ref()), (2, &busy));
}

/// A placement chosen from a kept record does not overwrite a record lost and created again up
/// to the same version: the session commit checks the incarnation too.
#[tokio::test]
async fn redis_a_session_commit_does_not_take_a_record_created_again_for_the_one_kept() {
    let server = common::RedisServer::start();
    let (first, second) = (redis_repository(&server), redis_repository(&server));
    let old = agent("a", &["x"], AgentState::Idle);
    put(&first, &old, 0, &[], None, at(0)).await;

    flush(&server).await;
    let new = agent("a", &["x"], AgentState::Busy);
    put(&second, &new, 0, &[], None, at(1)).await;

    let why = "the first worker keeps the old record, at the version the new one has";
    assert_eq!(
        place_on_kept(&first, (1, &old), why).await,
        SessionCommitOutcome::Conflict
    );
    let stored = first.load("a").await.expect("load").expect("exists");
    assert_eq!((stored.version, stored.value), (1, new));
}

#[tokio::test]
async fn redis_reports_unavailability_as_a_retryable_error() {
    let mut server = common::RedisServer::start();
    let repository = redis_repository(&server);
    repository.ping().await.expect("up");
    server.kill();
    let error = repository.load("a").await.expect_err("redis is down");
    assert!(
        matches!(error, opscore::repository::RepositoryError::Unavailable(_)),
        "{error}"
    );
}

/// Empties the server's database, as a `FLUSHDB` by an operator would.
async fn flush(server: &common::RedisServer) {
    let mut connection = server.connection().await;
    let _: () = ::redis::cmd("FLUSHDB")
        .query_async(&mut connection)
        .await
        .expect("flush");
}
