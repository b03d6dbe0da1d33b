//! The Redis repository. Key layout (every key starts with the configured prefix, see
//! `docs/storage.md`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `agent:<id>` | hash | `v` version, `d` record JSON |
//! | `agent:<id>:events` | zset | applied event ids, scored by time applied |
//! | `agent:<id>:history` | list | recent states, newest first |
//! | `agents` | zset | every agent id, score 0 (lexical order for paging) |
//! | `cap:<capability>` | zset | ids of agents with the capability |
//! | `timers:liveness` | zset | agent ids, scored by liveness deadline (ms) |
//! | `outbox` / `outbox:due` | hash / zset | unpublished messages and when to sweep them |
//! | `counters` | hash | the counts behind the gauges, moved by every commit |
//! | `generation` | string | an id written when the storage was first used (data-loss check) |
//!
//! and for workflows ([`sessions`]):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `workflow:<id>` | hash | `latest` version, `v:<version>` definition JSON |
//! | `workflows` | zset | every workflow id |
//! | `session:<id>` | hash | `v` version, `d` session JSON with its tasks |
//! | `sessions` / `sessions:active` | zset | every session id / those not ended |
//! | `idem:<key>` | string | the session a trigger's idempotency key created |
//! | `waiting:<capability>` | zset | sessions with a task waiting for such an agent |
//! | `timers:workflow` / `timers:workflow:data` | zset / hash | lease, backoff and queue timers |

mod cache;
mod sessions;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use self::cache::AgentCache;
use super::{
    AgentCommit, AgentFilter, AgentRepository, CommitOutcome, Health, Outbox, RepositoryError,
    RepositoryOptions, Versioned, capability_changes,
};
use crate::model::{Agent, HistoryEntry, Page};
use crate::outbox::OutboxMessage;

/// Records read per round trip while filtering a listing.
const LIST_BATCH: usize = 200;
/// Records a single listing call may read before returning a short page with a cursor.
const LIST_BUDGET: usize = 5_000;

#[derive(Clone)]
pub struct RedisRepository {
    connection: ConnectionManager,
    keys: Keys,
    options: RepositoryOptions,
    /// Shared by every clone, so by the whole process.
    agents: Arc<AgentCache>,
    commit_agent: &'static Script,
    commit_session: &'static Script,
    define_workflow: &'static Script,
    claim_due: &'static Script,
}

impl std::fmt::Debug for RedisRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRepository")
            .field("prefix", &self.keys.prefix)
            .finish_non_exhaustive()
    }
}

/// Builds every key from the prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn agent(&self, id: &str) -> String {
        format!("{}agent:{id}", self.prefix)
    }
    fn events(&self, id: &str) -> String {
        format!("{}agent:{id}:events", self.prefix)
    }
    fn history(&self, id: &str) -> String {
        format!("{}agent:{id}:history", self.prefix)
    }
    fn agents(&self) -> String {
        format!("{}agents", self.prefix)
    }
    fn capability(&self, capability: &str) -> String {
        format!("{}cap:{capability}", self.prefix)
    }
    fn liveness(&self) -> String {
        format!("{}timers:liveness", self.prefix)
    }
    fn outbox(&self) -> String {
        format!("{}outbox", self.prefix)
    }
    fn outbox_due(&self) -> String {
        format!("{}outbox:due", self.prefix)
    }
    fn counters(&self) -> String {
        format!("{}counters", self.prefix)
    }
    fn workflow(&self, id: &str) -> String {
        format!("{}workflow:{id}", self.prefix)
    }
    fn workflows(&self) -> String {
        format!("{}workflows", self.prefix)
    }
    fn session(&self, id: &str) -> String {
        format!("{}session:{id}", self.prefix)
    }
    fn sessions(&self) -> String {
        format!("{}sessions", self.prefix)
    }
    fn active_sessions(&self) -> String {
        format!("{}sessions:active", self.prefix)
    }
    fn idempotency(&self, key: &str) -> String {
        format!("{}idem:{key}", self.prefix)
    }
    fn waiting(&self, capability: &str) -> String {
        format!("{}waiting:{capability}", self.prefix)
    }
    fn timers(&self) -> String {
        format!("{}timers:workflow", self.prefix)
    }
    fn timer_data(&self) -> String {
        format!("{}timers:workflow:data", self.prefix)
    }
}

fn script(source: &'static str) -> &'static Script {
    // Scripts are compiled once per process and invoked by hash (EVALSHA), falling back to
    // EVAL once after a server restart has flushed its script cache.
    Box::leak(Box::new(Script::new(source)))
}

fn unavailable(error: redis::RedisError) -> RepositoryError {
    RepositoryError::Unavailable(error)
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, json: &str) -> Result<T, RepositoryError> {
    serde_json::from_str(json).map_err(|source| RepositoryError::Corrupt {
        key: key.to_owned(),
        source,
    })
}

fn millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

impl RedisRepository {
    /// Creates the repository without waiting for Redis: the first command connects, and a
    /// dropped connection is re-established in the background.
    pub fn connect(
        url: &str,
        key_prefix: &str,
        response_timeout: Duration,
        connect_timeout: Duration,
        options: RepositoryOptions,
    ) -> Result<Self, RepositoryError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(connect_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let connection =
            ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?;
        Ok(Self {
            connection,
            keys: Keys {
                prefix: key_prefix.to_owned(),
            },
            options,
            agents: Arc::default(),
            commit_agent: script(include_str!("../scripts/commit_agent.lua")),
            commit_session: script(include_str!("../scripts/commit_session.lua")),
            define_workflow: script(include_str!("../scripts/define_workflow.lua")),
            claim_due: script(include_str!("../scripts/claim_due.lua")),
        })
    }

    /// Claims due members of a timer zset and reads their entries from the companion hash.
    async fn claim_entries<T: serde::de::DeserializeOwned>(
        &self,
        due: String,
        entries: String,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<T>, RepositoryError> {
        let ids = self.claim(due, now, claim_until, limit).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.connection.clone();
        let found: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&entries)
            .arg(&ids)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        found
            .into_iter()
            .flatten()
            .map(|json| decode(&entries, &json))
            .collect()
    }

    /// Removes members from a timer zset and their entries from the companion hash.
    async fn remove_entries(
        &self,
        due: String,
        entries: String,
        ids: &[String],
    ) -> Result<(), RepositoryError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut connection = self.connection.clone();
        redis::pipe()
            .atomic()
            .zrem(due, ids)
            .hdel(entries, ids)
            .query_async::<()>(&mut connection)
            .await
            .map_err(unavailable)
    }

    async fn claim(
        &self,
        key: String,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<String>, RepositoryError> {
        let mut connection = self.connection.clone();
        self.claim_due
            .key(key)
            .arg(millis(now))
            .arg(millis(claim_until))
            .arg(limit)
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)
    }
}

impl AgentRepository for RedisRepository {
    async fn load_for_change(
        &self,
        agent_id: &str,
    ) -> Result<Option<Versioned<Agent>>, RepositoryError> {
        if let Some(record) = self.agents.get(agent_id) {
            return Ok(Some(Versioned {
                version: record.version,
                value: Agent::clone(&record.value),
            }));
        }
        let key = self.keys.agent(agent_id);
        let mut connection = self.connection.clone();
        let (version, data, incarnation): (Option<u64>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(&key)
                .arg("v")
                .arg("d")
                .arg("i")
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
        let (Some(version), Some(data)) = (version, data) else {
            return Ok(None);
        };
        let value: Agent = decode(&key, &data)?;
        self.agents.put(
            Versioned {
                version,
                value: Arc::new(value.clone()),
            },
            incarnation.unwrap_or_default(),
        );
        Ok(Some(Versioned { version, value }))
    }

    async fn load(&self, agent_id: &str) -> Result<Option<Versioned<Agent>>, RepositoryError> {
        let key = self.keys.agent(agent_id);
        let mut connection = self.connection.clone();
        let (version, data): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("v")
            .arg("d")
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        match (version, data) {
            (Some(version), Some(data)) => Ok(Some(Versioned {
                version,
                value: decode(&key, &data)?,
            })),
            _ => Ok(None),
        }
    }

    async fn commit(&self, commit: AgentCommit<'_>) -> Result<CommitOutcome, RepositoryError> {
        let id = commit.agent.agent_id.as_str();
        let record =
            serde_json::to_string(commit.agent).map_err(|source| RepositoryError::Corrupt {
                key: self.keys.agent(id),
                source,
            })?;
        let history = match commit.history {
            Some(entry) => {
                serde_json::to_string(entry).map_err(|source| RepositoryError::Corrupt {
                    key: self.keys.history(id),
                    source,
                })?
            }
            None => String::new(),
        };
        let (leave, join) =
            capability_changes(commit.previous_capabilities, &commit.agent.capabilities);

        let mut invocation = self.commit_agent.prepare_invoke();
        invocation
            .key(self.keys.agent(id))
            .key(self.keys.events(id))
            .key(self.keys.history(id))
            .key(self.keys.liveness())
            .key(self.keys.agents())
            .key(self.keys.outbox())
            .key(self.keys.outbox_due())
            .key(self.keys.counters());
        for capability in leave.iter().chain(&join) {
            invocation.key(self.keys.capability(capability));
        }
        for capability in commit.check_waiting {
            invocation.key(self.keys.waiting(capability));
        }
        invocation
            .arg(commit.expected_version)
            .arg(record)
            .arg(id)
            .arg(commit.event_id.unwrap_or(""))
            .arg(millis(commit.now))
            .arg(millis(commit.now - self.options.dedupe_window))
            .arg(history)
            .arg(self.options.history_length)
            .arg(
                commit
                    .liveness_deadline
                    .map(millis)
                    .map_or(String::new(), |ms| ms.to_string()),
            )
            .arg(millis(commit.now + self.options.outbox_grace))
            .arg(leave.len())
            .arg(join.len())
            .arg(commit.counters.len())
            .arg(commit.check_waiting.len())
            // A change from a kept record must find the record in the life it was kept in;
            // one from a record just read is a plain compare-and-set on the version.
            .arg(
                self.agents
                    .incarnation(id, commit.expected_version)
                    .unwrap_or_default(),
            )
            .arg(uuid::Uuid::new_v4().simple().to_string());
        for (field, delta) in commit.counters {
            invocation.arg(field).arg(*delta);
        }
        for message in commit.outbox {
            let payload =
                serde_json::to_string(message).map_err(|source| RepositoryError::Corrupt {
                    key: self.keys.outbox(),
                    source,
                })?;
            invocation.arg(&message.id).arg(payload);
        }

        let mut connection = self.connection.clone();
        let reply: Result<(String, u64, String, u8, String), _> =
            invocation.invoke_async(&mut connection).await;
        let (status, version, current, waiting, incarnation) = match reply {
            Ok(reply) => reply,
            Err(error) => {
                // The commit may or may not have happened: the next change reads the record.
                self.agents.forget(id);
                return Err(unavailable(error));
            }
        };
        Ok(match status.as_str() {
            "ok" => {
                let record = Versioned {
                    version,
                    value: Arc::new(commit.agent.clone()),
                };
                self.agents.put(record, incarnation);
                CommitOutcome::Committed {
                    version,
                    waiting: waiting == 1,
                }
            }
            "duplicate" => {
                self.agents.forget(id);
                CommitOutcome::Duplicate
            }
            _ => {
                // The reply carries the current record: the retry starts from it.
                match decode::<Agent>(&self.keys.agent(id), &current) {
                    Ok(value) if version > 0 => {
                        let value = Arc::new(value);
                        self.agents.put(Versioned { version, value }, incarnation);
                    }
                    _ => self.agents.forget(id),
                }
                CommitOutcome::Conflict
            }
        })
    }

    async fn history(
        &self,
        agent_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, RepositoryError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let key = self.keys.history(agent_id);
        let mut connection = self.connection.clone();
        let entries: Vec<String> = connection
            .lrange(&key, 0, limit as isize - 1)
            .await
            .map_err(unavailable)?;
        entries.iter().map(|entry| decode(&key, entry)).collect()
    }

    async fn list(
        &self,
        filter: &AgentFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<Agent>, RepositoryError> {
        let index = match &filter.capability {
            Some(capability) => self.keys.capability(capability),
            None => self.keys.agents(),
        };
        let mut connection = self.connection.clone();
        let mut items = Vec::new();
        let mut after = cursor.map(str::to_owned);
        let mut read = 0;
        loop {
            let min = after.as_ref().map_or("-".to_owned(), |id| format!("({id}"));
            let ids: Vec<String> = connection
                .zrangebylex_limit(&index, &min, "+", 0, LIST_BATCH as isize)
                .await
                .map_err(unavailable)?;
            if ids.is_empty() {
                return Ok(Page {
                    items,
                    next_cursor: None,
                });
            }

            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hget(self.keys.agent(id), "d");
            }
            let records: Vec<Option<String>> = pipe
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            for (id, record) in ids.iter().zip(records) {
                read += 1;
                after = Some(id.clone());
                // An id indexed by a commit whose record was since deleted by hand is skipped.
                let Some(record) = record else { continue };
                let agent: Agent = decode(&self.keys.agent(id), &record)?;
                if filter.matches(&agent) {
                    items.push(agent);
                }
                if items.len() == limit {
                    return Ok(Page {
                        items,
                        next_cursor: after,
                    });
                }
            }
            if ids.len() < LIST_BATCH {
                return Ok(Page {
                    items,
                    next_cursor: None,
                });
            }
            if read >= LIST_BUDGET {
                return Ok(Page {
                    items,
                    next_cursor: after,
                });
            }
        }
    }

    async fn claim_due_liveness(
        &self,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<String>, RepositoryError> {
        self.claim(self.keys.liveness(), now, claim_until, limit)
            .await
    }
}

impl Outbox for RedisRepository {
    async fn claim_due_outbox(
        &self,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<OutboxMessage>, RepositoryError> {
        self.claim_entries(
            self.keys.outbox_due(),
            self.keys.outbox(),
            now,
            claim_until,
            limit,
        )
        .await
    }

    async fn remove_outbox(&self, ids: &[String]) -> Result<(), RepositoryError> {
        self.remove_entries(self.keys.outbox_due(), self.keys.outbox(), ids)
            .await
    }
}

impl RedisRepository {
    /// Runs a script that writes and deletes a probe key under the prefix, for `opscore
    /// doctor`: it fails when the user may not run scripts or write there.
    pub async fn check_scripts(&self) -> Result<(), RepositoryError> {
        let probe = Script::new(
            "redis.call('SET', KEYS[1], '1', 'PX', 1000) return redis.call('DEL', KEYS[1])",
        );
        let mut connection = self.connection.clone();
        probe
            .key(format!("{}doctor:probe", self.keys.prefix))
            .invoke_async::<i64>(&mut connection)
            .await
            .map(drop)
            .map_err(unavailable)
    }
}

impl Health for RedisRepository {
    async fn ping(&self) -> Result<(), RepositoryError> {
        let mut connection = self.connection.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map(drop)
            .map_err(unavailable)
    }

    async fn generation(&self, candidate: &str) -> Result<String, RepositoryError> {
        let key = format!("{}generation", self.keys.prefix);
        let mut connection = self.connection.clone();
        // SET NX then GET in one round trip: whoever writes first names the generation.
        let (_, generation): (Option<String>, String) = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(&key)
            .arg(candidate)
            .arg("NX")
            .cmd("GET")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        Ok(generation)
    }

    async fn counters(&self) -> Result<std::collections::HashMap<String, i64>, RepositoryError> {
        let mut connection = self.connection.clone();
        redis::cmd("HGETALL")
            .arg(self.keys.counters())
            .query_async(&mut connection)
            .await
            .map_err(unavailable)
    }
}
