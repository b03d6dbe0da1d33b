//! The agent records this process last committed or read whole, so that the next change of the
//! same agent is computed without reading the record back first, and a placement reading the
//! candidates for a task decodes only the records changed since.
//!
//! A cached record may be stale: another worker, or a session commit elsewhere, may have
//! changed the agent since. That costs one compare-and-set conflict, whose reply carries the
//! current record, and the cache holds that one from then on. Each record is kept with its
//! incarnation, so that a record deleted or lost and created again up to the same version is
//! not mistaken for the one kept. A placement takes a kept record only when Redis holds the same
//! version in the same incarnation. Reads that must be current (`load`, the control API,
//! listings) never look here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::model::Agent;
use crate::repository::Versioned;

/// Records kept at most, a couple of MiB: the worker's memory does not grow with the registry.
/// A fleet with more agents than this reporting at once pays one more read for each report of
/// an agent not kept.
pub(super) const CAPACITY: usize = 1024;

#[derive(Debug, Default)]
pub(super) struct AgentCache {
    records: Mutex<HashMap<String, Kept>>,
}

/// A kept record is shared with the placements reading it, so that reading every candidate of a
/// capability copies none of them.
#[derive(Debug)]
struct Kept {
    record: Versioned<Arc<Agent>>,
    incarnation: String,
}

impl AgentCache {
    pub(super) fn get(&self, agent_id: &str) -> Option<Versioned<Arc<Agent>>> {
        self.records().get(agent_id).map(|kept| kept.record.clone())
    }

    pub(super) fn contains(&self, agent_id: &str) -> bool {
        self.records().contains_key(agent_id)
    }

    /// The record kept for `agent_id`, if it is the one at `version` in `incarnation`.
    pub(super) fn get_current(
        &self,
        agent_id: &str,
        version: u64,
        incarnation: &str,
    ) -> Option<Versioned<Arc<Agent>>> {
        self.records()
            .get(agent_id)
            .filter(|kept| kept.record.version == version && kept.incarnation == incarnation)
            .map(|kept| kept.record.clone())
    }

    /// The incarnation of the record kept for `agent_id`, if it is the one at `version`.
    pub(super) fn incarnation(&self, agent_id: &str, version: u64) -> Option<String> {
        self.records()
            .get(agent_id)
            .filter(|kept| kept.record.version == version)
            .map(|kept| kept.incarnation.clone())
    }

    pub(super) fn put(&self, record: Versioned<Arc<Agent>>, incarnation: String) {
        let mut records = self.records();
        if records.len() >= CAPACITY && !records.contains_key(&record.value.agent_id) {
            // Whichever record the map yields first goes: no bookkeeping per hit, and an
            // evicted agent costs one read on its next change.
            if let Some(victim) = records.keys().next().cloned() {
                records.remove(&victim);
            }
        }
        let id = record.value.agent_id.clone();
        records.insert(
            id,
            Kept {
                record,
                incarnation,
            },
        );
    }

    pub(super) fn forget(&self, agent_id: &str) {
        self.records().remove(agent_id);
    }

    fn records(&self) -> MutexGuard<'_, HashMap<String, Kept>> {
        // A panic while holding the lock leaves a map that is still a valid cache.
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, version: u64) -> Versioned<Arc<Agent>> {
        let json = serde_json::json!({
            "agentId": id, "agentName": id, "version": "1", "capabilities": [],
            "metadata": {}, "details": {}, "maxConcurrentTasks": 1, "state": "idle", "stateTimestamp": "2026-01-01T00:00:00Z",
            "registeredAt": "2026-01-01T00:00:00Z", "lastSeen": "2026-01-01T00:00:00Z",
            "deregistered": false, "seq": 0, "staleEvents": 0
        });
        Versioned {
            version,
            value: Arc::new(serde_json::from_value(json).expect("an agent record")),
        }
    }

    #[test]
    fn holds_the_last_record_put_and_forgets_on_request() {
        let cache = AgentCache::default();
        cache.put(record("a", 1), "i1".to_owned());
        cache.put(record("a", 2), "i1".to_owned());
        assert_eq!(cache.get("a").map(|r| r.version), Some(2));
        assert_eq!(cache.incarnation("a", 2).as_deref(), Some("i1"));
        assert_eq!(cache.incarnation("a", 1), None, "only for the version kept");
        assert!(cache.get_current("a", 2, "i1").is_some());
        assert!(cache.get_current("a", 1, "i1").is_none(), "another version");
        assert!(cache.get_current("a", 2, "i2").is_none(), "another life");
        cache.forget("a");
        assert_eq!(cache.get("a"), None);
    }

    #[test]
    fn never_holds_more_than_its_capacity() {
        let cache = AgentCache::default();
        for n in 0..CAPACITY + 10 {
            cache.put(record(&format!("a{n}"), 1), String::new());
        }
        assert_eq!(cache.records().len(), CAPACITY);
        let last = format!("a{}", CAPACITY + 9);
        assert!(cache.get(&last).is_some(), "the newest record is kept");
    }
}
