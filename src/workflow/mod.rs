//! Workflow definitions and the pure session engine.
//!
//! Nothing in this module does I/O, reads the clock or draws random numbers: every transition
//! takes the current [`Session`], the event, `now` (and a jitter sample where a retry may be
//! scheduled) and returns the [`Effect`]s to perform once the changed record is committed. A
//! handler loads the session, calls one method, compare-and-sets the record, then performs
//! the effects in order.
//!
//! - [`definition`]: the workflow format, its validation and resolved per-task settings.
//! - [`session`]: the session and task records as stored and as `session.get` returns them.
//! - [`engine`]: the transitions (`start`, `assign`, results, timers, `cancel`).
//! - [`effect`]: what the engine asks the caller to publish, release or schedule.
//! - [`dispatch`]: which agent gets a ready task.
//! - [`backoff`]: retry delays.
//! - [`legacy`]: state reports from agents of the original service.
//!
//! A scheduling pass for a session: for each id of [`Session::ready_tasks`], call
//! [`choose_agent`] and then [`Session::assign`] on success or [`Session::mark_waiting`] with
//! the reason on failure.

pub mod backoff;
pub mod definition;
pub mod dispatch;
pub mod effect;
pub mod engine;
pub mod legacy;
pub mod session;

pub use backoff::backoff_delay;
pub use definition::{
    DefinitionError, OnFailure, ResolvedTask, RetryPolicy, RetrySpec, SettingProblem,
    SettingsScope, SettingsSpec, TaskDefinition, TaskSettings, WorkflowDefinition,
};
pub use dispatch::{Candidate, choose_agent};
pub use effect::{
    Assignment, Cancellation, DeadLetter, DeadLetterReason, Effect, EventError, EventKind,
    EventStatus, LeaseRelease, SessionEvent, Timer, TimerKind,
};
pub use engine::{Rejection, StartError, TaskOutcome};
pub use legacy::{LegacyReport, legacy_report};
pub use session::{
    PendingReason, Session, SessionError, SessionStatus, Task, TaskError, TaskStatus, task_id_for,
};
