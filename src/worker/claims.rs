//! Slots that placements running in this process are about to take.
//!
//! Placements read the candidates, pick an agent and commit the lease with a compare-and-set on
//! the agent's record. Placements running at once read the same records and rank them alike,
//! so without knowing of each other they pick the same agents and all but one lose the
//! compare-and-set, to read everything again. A placement claims the slot it picked until its
//! commit is done, and the others rank that agent as if the slot were taken. Claims are only a
//! hint within one process: the compare-and-set stays what decides, across workers too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Default)]
pub(crate) struct Claims {
    slots: Mutex<HashMap<String, u32>>,
}

impl Claims {
    /// Slots of `agent_id` claimed by placements not yet committed.
    pub(crate) fn held(&self, agent_id: &str) -> u32 {
        self.slots().get(agent_id).copied().unwrap_or(0)
    }

    /// Claims one slot of `agent_id` until the returned claim is dropped.
    pub(crate) fn claim(self: &Arc<Self>, agent_id: &str) -> Claim {
        *self.slots().entry(agent_id.to_owned()).or_default() += 1;
        Claim {
            claims: Arc::clone(self),
            agent_id: agent_id.to_owned(),
        }
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<String, u32>> {
        // Counts left by a panicking holder are still counts.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One claimed slot, given back on drop.
#[derive(Debug)]
pub(crate) struct Claim {
    claims: Arc<Claims>,
    agent_id: String,
}

impl Claim {
    pub(crate) fn agent_id(&self) -> &str {
        &self.agent_id
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut slots = self.claims.slots();
        if let Some(count) = slots.get_mut(&self.agent_id) {
            *count -= 1;
            if *count == 0 {
                slots.remove(&self.agent_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_holds_a_slot_until_dropped() {
        let claims = Arc::new(Claims::default());
        let first = claims.claim("a");
        let second = claims.claim("a");
        assert_eq!((claims.held("a"), claims.held("b")), (2, 0));
        drop(first);
        assert_eq!(claims.held("a"), 1);
        drop(second);
        assert_eq!(claims.held("a"), 0);
        assert!(
            claims.slots().is_empty(),
            "nothing kept for agents without claims"
        );
    }
}
