//! One change at a time per agent record within this process.
//!
//! Changes write agent records with a compare-and-set: a result gives a slot back, a placement
//! takes one, the agent reports a new state. Two such changes of one agent computed at once in
//! one process race, and the loser reads everything again and starts over. Within a process
//! they need not race: a change passes the gate of every agent record it writes before it reads
//! the records it starts from, and holds the gates until its commit is done, so the next change
//! of the same agent starts from the record just committed. Across processes the
//! compare-and-set still decides.
//!
//! Gates are striped: agents share a fixed number of locks, so memory does not grow with the
//! fleet, and two agents on one stripe only wait for each other a little more.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

use tokio::sync::{Mutex, MutexGuard};

const STRIPES: usize = 256;

/// The gates of one process, shared by the registry ([`Agents`](super::Agents)) and the
/// workflow side ([`Sessions`](super::Sessions)).
#[derive(Debug)]
pub struct Gates {
    stripes: Box<[Mutex<()>]>,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

/// The gates a change holds; dropping it lets the next change of those agents through.
#[derive(Debug)]
pub(crate) struct Passage<'a> {
    _held: Vec<MutexGuard<'a, ()>>,
}

impl Gates {
    /// Waits until no other change of these agents runs in this process, and holds them.
    /// Every change takes its stripes in one order, so two changes never wait for each other.
    pub(crate) async fn pass<I>(&self, agent_ids: I) -> Passage<'_>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut stripes: Vec<usize> = agent_ids
            .into_iter()
            .map(|agent_id| self.stripe(agent_id.as_ref()))
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut held = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            held.push(self.stripes[stripe].lock().await);
        }
        Passage { _held: held }
    }

    fn stripe(&self, agent_id: &str) -> usize {
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(agent_id);
        (hash % self.stripes.len() as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_change_waits_for_the_one_holding_its_agent() {
        let gates = Gates::default();
        let first = gates.pass(["a", "b"]).await;
        let second = gates.pass(["b"]);
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), &mut second)
                .await
                .is_err(),
            "b is held"
        );
        drop(first);
        let _second = second.await;
    }

    #[tokio::test]
    async fn changes_of_overlapping_agents_never_wait_for_each_other() {
        let gates = std::sync::Arc::new(Gates::default());
        let mut changes = tokio::task::JoinSet::new();
        for i in 0..64 {
            let gates = gates.clone();
            changes.spawn(async move {
                let mut agents = vec![format!("agent-{}", i % 7), format!("agent-{}", i % 5)];
                if i % 2 == 0 {
                    agents.reverse();
                }
                for _ in 0..50 {
                    let _held = gates.pass(&agents).await;
                    tokio::task::yield_now().await;
                }
            });
        }
        let all_done = async {
            while let Some(change) = changes.join_next().await {
                change.expect("no change panicked");
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all_done)
            .await
            .expect("changes holding overlapping agents waited for each other");
    }

    #[test]
    fn one_agent_takes_its_stripe_once() {
        let gates = Gates::default();
        let passage = futures::executor::block_on(gates.pass(["a", "a"]));
        assert_eq!(passage._held.len(), 1);
    }
}
