//! A short-lived cache of agent lookups.
//!
//! Every state report is checked against the registry (an unknown agent is a 404, not a
//! dead letter later) and every assignment needs the agent's `contactEndpoint`. Asking the
//! worker each time would add a request-reply round trip per report, so a found agent is
//! remembered for a few seconds. Only found agents are cached: an agent that registers must be
//! recognised at once, while a deregistration that takes a few seconds to be noticed here
//! costs nothing, since the worker applies the registry rules to whatever is relayed.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::api::{ApiClient, ApiError};

/// How long a lookup is trusted.
const TTL: Duration = Duration::from_secs(5);
/// Entries kept at most; beyond it expired ones are dropped, then all if need be.
const MAX_ENTRIES: usize = 10_000;

/// What the bridge needs to know of a registered agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KnownAgent {
    /// Where AgentKit reaches the agent; `None` for an agent that takes its work from NATS.
    pub(crate) contact_endpoint: Option<String>,
}

/// Agents recently found in the registry, by id.
#[derive(Debug, Default)]
pub(crate) struct AgentCache {
    entries: Mutex<HashMap<String, (Instant, KnownAgent)>>,
}

impl AgentCache {
    /// The agent if it is registered: from the cache when fresh, else from `agent.get`.
    /// `Ok(None)` means the worker does not know it; an error means the worker could not say.
    pub(crate) async fn lookup(
        &self,
        api: &ApiClient,
        agent_id: &str,
    ) -> Result<Option<KnownAgent>, ApiError> {
        if let Some(known) = self.fresh(agent_id) {
            return Ok(Some(known));
        }
        match api
            .call("agent", "get", &json!({ "agentId": agent_id }))
            .await
        {
            Ok(agent) => {
                let known = KnownAgent {
                    contact_endpoint: agent["contactEndpoint"].as_str().map(str::to_owned),
                };
                self.insert(agent_id, known.clone());
                Ok(Some(known))
            }
            Err(error) if error.code == 404 => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Remembers an agent the bridge itself just registered, so that its first state report
    /// is accepted even before the worker has applied the registration.
    pub(crate) fn insert(&self, agent_id: &str, known: KnownAgent) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= MAX_ENTRIES {
            let now = Instant::now();
            entries.retain(|_, (at, _)| now.duration_since(*at) < TTL);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(agent_id.to_owned(), (Instant::now(), known));
    }

    /// Forgets an agent, after the bridge relayed its deregistration.
    pub(crate) fn forget(&self, agent_id: &str) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(agent_id);
    }

    fn fresh(&self, agent_id: &str) -> Option<KnownAgent> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(agent_id)
            .filter(|(at, _)| at.elapsed() < TTL)
            .map(|(_, known)| known.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserted_agents_are_found_until_forgotten() {
        let cache = AgentCache::default();
        let known = KnownAgent {
            contact_endpoint: Some("http://a".to_owned()),
        };
        cache.insert("a", known.clone());
        assert_eq!(cache.fresh("a"), Some(known));
        assert_eq!(cache.fresh("b"), None);
        cache.forget("a");
        assert_eq!(cache.fresh("a"), None);
    }

    #[test]
    fn a_full_cache_makes_room() {
        let cache = AgentCache::default();
        for i in 0..=MAX_ENTRIES {
            cache.insert(
                &format!("a{i}"),
                KnownAgent {
                    contact_endpoint: None,
                },
            );
        }
        let len = cache.entries.lock().map(|e| e.len()).unwrap_or(0);
        assert!(len <= MAX_ENTRIES, "{len}");
        assert!(cache.fresh(&format!("a{MAX_ENTRIES}")).is_some());
    }
}
