//! Workflows and sessions in Redis; the key layout is in the parent module.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{RedisRepository, decode, millis, unavailable};
use crate::model::{Agent, Page};
use crate::repository::sessions::{
    DefineOutcome, Freshness, SessionCommit, SessionCommitOutcome, SessionFilter,
    SessionRepository, WorkflowRepository,
};
use crate::repository::{RepositoryError, Versioned};
use crate::workflow::{Session, Timer, WorkflowDefinition};

/// How long a trigger's idempotency key keeps naming its session.
const IDEMPOTENCY_TTL_SECS: u64 = 7 * 24 * 3600;
/// Records read per round trip while filtering a listing, and per listing call at most.
const LIST_BATCH: usize = 100;
const LIST_BUDGET: usize = 2_000;

fn encode<T: serde::Serialize>(key: &str, value: &T) -> Result<String, RepositoryError> {
    serde_json::to_string(value).map_err(|source| RepositoryError::Corrupt {
        key: key.to_owned(),
        source,
    })
}

impl RedisRepository {
    /// Reads `(version, record)` of many hashes in one round trip; missing ones are skipped.
    async fn load_many<T: serde::de::DeserializeOwned>(
        &self,
        keys: &[String],
    ) -> Result<Vec<Versioned<T>>, RepositoryError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HMGET").arg(key).arg("v").arg("d");
        }
        let mut connection = self.connection.clone();
        let rows: Vec<(Option<u64>, Option<String>)> = pipe
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        let mut records = Vec::with_capacity(rows.len());
        for (key, row) in keys.iter().zip(rows) {
            if let (Some(version), Some(data)) = row {
                records.push(Versioned {
                    version,
                    value: decode(key, &data)?,
                });
            }
        }
        Ok(records)
    }

    /// Reads the records of `ids`, missing ones skipped. A kept record stands for the stored
    /// one when Redis holds the same version in the same incarnation, so only the version and
    /// incarnation of a kept record cross the wire; the others are read whole, decoded and
    /// kept. A kept record found stale costs a second round trip.
    async fn load_agents(
        &self,
        ids: Vec<String>,
    ) -> Result<Vec<Versioned<Arc<Agent>>>, RepositoryError> {
        let mut connection = self.connection.clone();
        let mut records = Vec::with_capacity(ids.len());
        let mut unread: Vec<(String, String)> = ids
            .into_iter()
            .map(|id| {
                let key = self.keys.agent(&id);
                (id, key)
            })
            .collect();
        for whole in [false, true] {
            if unread.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for (id, key) in &unread {
                let command = pipe.cmd("HMGET").arg(key).arg("v").arg("i");
                if whole || !self.agents.contains(id) {
                    command.arg("d");
                }
            }
            let rows: Vec<Vec<Option<String>>> = pipe
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            let mut stale = Vec::new();
            for ((id, key), row) in unread.into_iter().zip(rows) {
                let mut fields = row.into_iter();
                let mut field = || fields.next().flatten();
                let (Some(version), incarnation) = (field(), field().unwrap_or_default()) else {
                    continue;
                };
                let version: u64 = decode(&key, &version)?;
                if let Some(record) = self.agents.get_current(&id, version, &incarnation) {
                    records.push(record);
                } else if let Some(data) = field() {
                    let record = Versioned {
                        version,
                        value: Arc::new(decode(&key, &data)?),
                    };
                    self.agents.put(record.clone(), incarnation);
                    records.push(record);
                } else {
                    stale.push((id, key));
                }
            }
            unread = stale;
        }
        Ok(records)
    }
}

impl WorkflowRepository for RedisRepository {
    async fn define(
        &self,
        definition: &WorkflowDefinition,
    ) -> Result<DefineOutcome, RepositoryError> {
        let key = self.keys.workflow(&definition.id);
        let json = encode(&key, definition)?;
        let mut connection = self.connection.clone();
        let outcome: String = self
            .define_workflow
            .key(&key)
            .key(self.keys.workflows())
            .arg(&definition.id)
            .arg(&definition.version)
            .arg(json)
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        Ok(match outcome.as_str() {
            "created" => DefineOutcome::Created,
            "unchanged" => DefineOutcome::Unchanged,
            _ => DefineOutcome::VersionExists,
        })
    }

    async fn workflow(
        &self,
        workflow_id: &str,
        version: Option<&str>,
    ) -> Result<Option<WorkflowDefinition>, RepositoryError> {
        let key = self.keys.workflow(workflow_id);
        let mut connection = self.connection.clone();
        let version = match version {
            Some(version) => version.to_owned(),
            None => {
                let latest: Option<String> = redis::cmd("HGET")
                    .arg(&key)
                    .arg("latest")
                    .query_async(&mut connection)
                    .await
                    .map_err(unavailable)?;
                let Some(latest) = latest else {
                    return Ok(None);
                };
                latest
            }
        };
        let json: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg(format!("v:{version}"))
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        json.map(|json| decode(&key, &json)).transpose()
    }

    async fn workflows(&self) -> Result<Vec<WorkflowDefinition>, RepositoryError> {
        let mut connection = self.connection.clone();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.workflows())
            .arg(0)
            .arg(-1)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        let mut definitions = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(definition) = self.workflow(&id, None).await? {
                definitions.push(definition);
            }
        }
        Ok(definitions)
    }
}

impl SessionRepository for RedisRepository {
    async fn load_session(
        &self,
        session_id: &str,
    ) -> Result<Option<Versioned<Session>>, RepositoryError> {
        let mut records = self.load_many(&[self.keys.session(session_id)]).await?;
        Ok(records.pop())
    }

    async fn commit_session(
        &self,
        commit: SessionCommit<'_>,
    ) -> Result<SessionCommitOutcome, RepositoryError> {
        let session = commit.session;
        let id = session.session_id.as_str();
        let session_json = encode(&self.keys.session(id), session)?;
        let (event_agent, event_id) = commit.event.unwrap_or(("", ""));

        let mut invocation = self.commit_session.prepare_invoke();
        invocation
            .key(self.keys.session(id))
            .key(self.keys.sessions())
            .key(self.keys.active_sessions())
            .key(self.keys.timers())
            .key(self.keys.timer_data())
            .key(self.keys.outbox())
            .key(self.keys.outbox_due())
            .key(self.keys.events(event_agent))
            .key(self.keys.idempotency(commit.idempotency_key.unwrap_or("")))
            .key(self.keys.counters())
            .key(self.keys.liveness());
        for (agent, _) in &commit.agents {
            invocation.key(self.keys.agent(&agent.agent_id));
        }
        for capability in commit
            .waiting_leave
            .iter()
            .chain(&commit.waiting_join)
            .chain(&commit.check_waiting)
        {
            invocation.key(self.keys.waiting(capability));
        }

        invocation
            .arg(commit.expected_version)
            .arg(session_json)
            .arg(id)
            .arg(if session.status.is_ended() { "1" } else { "0" })
            .arg(event_id)
            .arg(millis(commit.now))
            .arg(millis(commit.now - self.options.dedupe_window))
            .arg(IDEMPOTENCY_TTL_SECS)
            .arg(if commit.idempotency_key.is_some() {
                "1"
            } else {
                ""
            })
            .arg(commit.agents.len())
            .arg(commit.waiting_leave.len())
            .arg(commit.waiting_join.len())
            .arg(commit.timers_set.len())
            .arg(commit.timers_clear.len())
            .arg(commit.outbox.len())
            .arg(millis(commit.now + self.options.outbox_grace))
            .arg(commit.counters.len());
        match commit.liveness {
            Some((agent_id, deadline)) => invocation.arg(agent_id).arg(millis(deadline)),
            None => invocation.arg("").arg(""),
        };
        invocation.arg(commit.check_waiting.len());
        for (agent, version) in &commit.agents {
            let key = self.keys.agent(&agent.agent_id);
            // A record kept at the version read names its incarnation, so that a record lost
            // and created again up to that version is not overwritten with the old one.
            let incarnation = self
                .agents
                .incarnation(&agent.agent_id, *version)
                .unwrap_or_default();
            invocation
                .arg(*version)
                .arg(incarnation)
                .arg(encode(&key, agent)?);
        }
        for key in &commit.timers_clear {
            invocation.arg(key);
        }
        for timer in &commit.timers_set {
            invocation
                .arg(timer.key())
                .arg(millis(timer.at))
                .arg(encode(&self.keys.timer_data(), timer)?);
        }
        for message in commit.outbox {
            invocation
                .arg(&message.id)
                .arg(encode(&self.keys.outbox(), message)?);
        }
        for (field, delta) in &commit.counters {
            invocation.arg(field).arg(*delta);
        }

        let mut connection = self.connection.clone();
        let reply: Result<(String, String, u8), _> = invocation.invoke_async(&mut connection).await;
        // The agent records this commit wrote, or might have written, are what the next
        // change of those agents starts from.
        let committed = matches!(&reply, Ok((status, _, _)) if status == "ok");
        for (agent, version) in &commit.agents {
            // The incarnation is known when the record kept is the one this commit changed.
            match self.agents.incarnation(&agent.agent_id, *version) {
                Some(incarnation) if committed => {
                    let record = Versioned {
                        version: version + 1,
                        value: Arc::new((*agent).clone()),
                    };
                    self.agents.put(record, incarnation);
                }
                _ => self.agents.forget(&agent.agent_id),
            }
        }
        let (status, owner, waiting) = reply.map_err(unavailable)?;
        Ok(match status.as_str() {
            "ok" => SessionCommitOutcome::Committed {
                waiting: waiting == 1,
            },
            "duplicate" => SessionCommitOutcome::Duplicate,
            "key_taken" => SessionCommitOutcome::KeyTaken(owner),
            _ => SessionCommitOutcome::Conflict,
        })
    }

    async fn list_sessions(
        &self,
        filter: &SessionFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<Session>, RepositoryError> {
        let mut connection = self.connection.clone();
        let mut items = Vec::new();
        let mut before = cursor.map(str::to_owned);
        let mut read = 0;
        loop {
            let max = before
                .as_ref()
                .map_or("+".to_owned(), |id| format!("({id}"));
            let ids: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
                .arg(self.keys.sessions())
                .arg(&max)
                .arg("-")
                .arg("LIMIT")
                .arg(0)
                .arg(LIST_BATCH)
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            let keys: Vec<String> = ids.iter().map(|id| self.keys.session(id)).collect();
            let sessions: Vec<Versioned<Session>> = self.load_many(&keys).await?;
            read += ids.len();
            for session in sessions {
                let session = session.value;
                if filter.matches(&session) {
                    let id = session.session_id.clone();
                    items.push(session);
                    if items.len() == limit {
                        return Ok(Page {
                            items,
                            next_cursor: Some(id),
                        });
                    }
                }
            }
            // Past this batch, including ids whose record is gone.
            before = ids.last().cloned();
            if ids.len() < LIST_BATCH {
                return Ok(Page {
                    items,
                    next_cursor: None,
                });
            }
            if read >= LIST_BUDGET {
                return Ok(Page {
                    items,
                    next_cursor: before,
                });
            }
        }
    }

    async fn active_sessions(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<String>, RepositoryError> {
        let min = cursor.map_or("-".to_owned(), |id| format!("({id}"));
        let mut connection = self.connection.clone();
        let ids: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(self.keys.active_sessions())
            .arg(&min)
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        let next_cursor = (ids.len() == limit).then(|| ids.last().cloned()).flatten();
        Ok(Page {
            items: ids,
            next_cursor,
        })
    }

    async fn waiting_sessions(
        &self,
        capability: &str,
        limit: usize,
    ) -> Result<Vec<String>, RepositoryError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut connection = self.connection.clone();
        redis::cmd("ZRANGE")
            .arg(self.keys.waiting(capability))
            .arg(0)
            .arg(limit - 1)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)
    }

    async fn capable_agents(
        &self,
        capability: &str,
        limit: usize,
        freshness: Freshness,
    ) -> Result<Vec<Versioned<Arc<Agent>>>, RepositoryError> {
        let mut connection = self.connection.clone();
        let ids: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(self.keys.capability(capability))
            .arg("-")
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        if freshness == Freshness::Current {
            return self.load_agents(ids).await;
        }
        let mut kept = Vec::with_capacity(ids.len());
        let mut unknown = Vec::new();
        for id in ids {
            match self.agents.get(&id) {
                Some(record) => kept.push(record),
                None => unknown.push(id),
            }
        }
        kept.extend(self.load_agents(unknown).await?);
        Ok(kept)
    }

    async fn claim_due_timers(
        &self,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Timer>, RepositoryError> {
        self.claim_entries(
            self.keys.timers(),
            self.keys.timer_data(),
            now,
            claim_until,
            limit,
        )
        .await
    }

    async fn clear_timers(&self, keys: &[String]) -> Result<(), RepositoryError> {
        self.remove_entries(self.keys.timers(), self.keys.timer_data(), keys)
            .await
    }
}
