//! Choosing the agent for a ready task.

use chrono::{DateTime, Utc};

use super::session::PendingReason;

/// What the scheduler knows about one registered agent, borrowed from its record: a placement
/// ranks every capable agent for each task, and copies nothing to do it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub agent_id: &'a str,
    pub capabilities: &'a [String],
    /// Heard from within the liveness timeout.
    pub alive: bool,
    /// Last reported state, already lowercased by the caller.
    pub state: &'a str,
    pub deregistered: bool,
    pub max_concurrent_tasks: u32,
    /// Live task leases the agent holds now.
    pub leases_held: u32,
    /// `None`: never assigned, which ranks before any time.
    pub last_assigned_at: Option<DateTime<Utc>>,
}

impl Candidate<'_> {
    /// Could take this capability at some point: live, registered, not winding down.
    fn is_capable(&self, capability: &str) -> bool {
        !self.deregistered
            && self.alive
            && self.state != "draining"
            && self.capabilities.iter().any(|c| c == capability)
    }

    /// Can take a task now.
    fn has_free_slot(&self) -> bool {
        matches!(self.state, "idle" | "active") && self.leases_held < self.max_concurrent_tasks
    }
}

/// How many of the least recently assigned eligible agents one placement chooses among.
pub const SPREAD: usize = 8;

/// Picks the agent for a task needing `capability`, or says why none can take it.
///
/// Eligible agents are capable (see [`Candidate`]), report `idle` or `active`, and hold fewer
/// leases than `maxConcurrentTasks`; `pinned` restricts the choice to that agent. The eligible
/// agents are ranked least recently assigned first, ties going to the smallest agent id, and
/// `spread` picks one of the first [`SPREAD`] of them (`spread % SPREAD`, within however many
/// there are). With `spread` 0 the least recently assigned agent wins. Placements running at
/// once each pass a different `spread`, so they do not all race for the same agent record.
/// Without any capable agent the reason is `no_capable_agent`; when capable agents exist but
/// none is eligible it is `all_capable_agents_busy`.
pub fn choose_agent(
    candidates: &[Candidate<'_>],
    capability: &str,
    pinned: Option<&str>,
    spread: u64,
) -> Result<String, PendingReason> {
    let mut capable = candidates
        .iter()
        .filter(|c| pinned.is_none_or(|p| c.agent_id == p))
        .filter(|c| c.is_capable(capability))
        .peekable();
    if capable.peek().is_none() {
        return Err(PendingReason::NoCapableAgent);
    }
    let mut eligible: Vec<&Candidate> = capable.filter(|c| c.has_free_slot()).collect();
    if eligible.is_empty() {
        return Err(PendingReason::AllCapableAgentsBusy);
    }
    let rank = |a: &&Candidate, b: &&Candidate| {
        a.last_assigned_at
            .cmp(&b.last_assigned_at)
            .then_with(|| a.agent_id.cmp(b.agent_id))
    };
    let window = eligible.len().min(SPREAD);
    if window < eligible.len() {
        eligible.select_nth_unstable_by(window - 1, rank);
        eligible.truncate(window);
    }
    eligible.sort_unstable_by(rank);
    // `window` is at most SPREAD, so the remainder fits in usize.
    let pick = (spread % window as u64) as usize;
    Ok(eligible[pick].agent_id.to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use super::*;
    use chrono::TimeZone;

    static SUMMARIZE: LazyLock<Vec<String>> = LazyLock::new(|| vec!["summarize".to_owned()]);

    fn agent(id: &str) -> Candidate<'_> {
        Candidate {
            agent_id: id,
            capabilities: &SUMMARIZE,
            alive: true,
            state: "idle",
            deregistered: false,
            max_concurrent_tasks: 1,
            leases_held: 0,
            last_assigned_at: None,
        }
    }

    fn at(minute: u32) -> Option<DateTime<Utc>> {
        Utc.with_ymd_and_hms(2025, 1, 1, 0, minute, 0).single()
    }

    #[test]
    fn least_recently_assigned_agent_wins() {
        let a = Candidate {
            last_assigned_at: at(5),
            ..agent("a")
        };
        let b = Candidate {
            last_assigned_at: at(1),
            ..agent("b")
        };
        assert_eq!(
            choose_agent(&[a.clone(), b], "summarize", None, 0),
            Ok("b".to_owned())
        );

        let never = agent("c");
        assert_eq!(
            choose_agent(&[a, never], "summarize", None, 0),
            Ok("c".to_owned())
        );
    }

    #[test]
    fn ties_go_to_the_smallest_agent_id() {
        let agents = [agent("b"), agent("a"), agent("c")];
        assert_eq!(
            choose_agent(&agents, "summarize", None, 0),
            Ok("a".to_owned())
        );
    }

    #[test]
    fn active_agents_with_a_free_slot_are_eligible() {
        let a = Candidate {
            state: "active",
            max_concurrent_tasks: 2,
            leases_held: 1,
            ..agent("a")
        };
        assert_eq!(choose_agent(&[a], "summarize", None, 0), Ok("a".to_owned()));
    }

    #[test]
    fn missing_capability_dead_deregistered_or_draining_agents_are_not_capable() {
        let translate = ["translate".to_owned()];
        let agents = [
            Candidate {
                capabilities: &translate,
                ..agent("a")
            },
            Candidate {
                alive: false,
                ..agent("b")
            },
            Candidate {
                deregistered: true,
                ..agent("c")
            },
            Candidate {
                state: "draining",
                ..agent("d")
            },
        ];
        assert_eq!(
            choose_agent(&agents, "summarize", None, 0),
            Err(PendingReason::NoCapableAgent)
        );
        assert_eq!(
            choose_agent(&[], "summarize", None, 0),
            Err(PendingReason::NoCapableAgent)
        );
    }

    #[test]
    fn full_or_busy_capable_agents_mean_all_busy() {
        let agents = [
            Candidate {
                leases_held: 1,
                ..agent("a")
            },
            Candidate {
                state: "busy",
                ..agent("b")
            },
            Candidate {
                state: "error",
                ..agent("c")
            },
            Candidate {
                max_concurrent_tasks: 0,
                ..agent("d")
            },
            Candidate {
                state: "IDLE",
                ..agent("e")
            },
        ];
        assert_eq!(
            choose_agent(&agents, "summarize", None, 0),
            Err(PendingReason::AllCapableAgentsBusy)
        );
    }

    #[test]
    fn pinned_session_only_uses_its_agent() {
        let agents = [
            agent("a"),
            Candidate {
                last_assigned_at: at(1),
                ..agent("b")
            },
        ];
        assert_eq!(
            choose_agent(&agents, "summarize", Some("b"), 0),
            Ok("b".to_owned())
        );
        assert_eq!(
            choose_agent(&agents, "summarize", Some("z"), 0),
            Err(PendingReason::NoCapableAgent)
        );

        let busy = [
            agent("a"),
            Candidate {
                leases_held: 1,
                ..agent("b")
            },
        ];
        assert_eq!(
            choose_agent(&busy, "summarize", Some("b"), 0),
            Err(PendingReason::AllCapableAgentsBusy)
        );
    }

    #[test]
    fn spread_picks_among_the_least_recently_assigned_only() {
        // Twelve eligible agents; agent n was assigned at minute 20 - n, so "l" (n = 11) is the
        // least recently assigned and "a" the most.
        let ids: Vec<String> = (0..12u8)
            .map(|n| char::from(b'a' + n).to_string())
            .collect();
        let agents: Vec<Candidate> = (0..12u32)
            .zip(&ids)
            .map(|(n, id)| Candidate {
                last_assigned_at: at(20 - n),
                ..agent(id)
            })
            .collect();
        let picks: Vec<String> = (0..SPREAD as u64 * 2)
            .map(|spread| choose_agent(&agents, "summarize", None, spread).expect("an agent"))
            .collect();
        let window = ["l", "k", "j", "i", "h", "g", "f", "e"];
        assert_eq!(picks[..SPREAD], window, "in rank order");
        assert_eq!(picks[SPREAD..], window, "and round again");

        // Fewer eligible agents than the spread: the choice stays among them.
        let two = &agents[10..];
        assert_eq!(
            choose_agent(two, "summarize", None, 3),
            Ok("k".to_owned()),
            "3 % 2 picks the second"
        );
    }
}
