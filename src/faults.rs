//! Crash points for the fault-injection tests, compiled into debug builds only.
//!
//! `OPSCORE_CRASH_POINT=<name>` makes the process abort (no destructors, no flushing: as good
//! as SIGKILL) the `OPSCORE_CRASH_AFTER`-th time (default 1) it reaches the point of that
//! name. The points are `after_commit` (a change is in storage, nothing published),
//! `after_publish` (published, inbound message not yet acknowledged), `before_ack`, and
//! `before_legacy_task` (a legacy state report naming a task: its state applied, its meaning
//! for the task not yet).
//! Release builds contain none of this.

#[cfg(debug_assertions)]
pub fn crash_point(name: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    let armed = ARMED.get_or_init(|| {
        let point = std::env::var("OPSCORE_CRASH_POINT").ok()?;
        let after = std::env::var("OPSCORE_CRASH_AFTER")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        Some((point, after))
    });
    if let Some((point, after)) = armed
        && point == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *after
    {
        eprintln!("crash point {name} reached: aborting");
        std::process::abort();
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn crash_point(_name: &str) {}
