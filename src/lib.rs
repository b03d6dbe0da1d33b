//! opscore: the operations core for fleets of AI agents.
//!
//! Agents publish events on NATS; opscore keeps their registry in a repository (Redis or
//! memory), runs workflows, and publishes every transition on status streams. The module tree
//! follows the runtime roles of `DESIGN.md`:
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | settings: defaults, file, environment; validation before connecting |
//! | [`subjects`] | every NATS subject, and the id-token rule that keeps them safe |
//! | [`envelope`] | inbound decoding: limits, CloudEvents or bare JSON, event ids |
//! | [`model`] | agent records and agent payloads, with the original field names |
//! | [`registry`] | the pure agent rules: (record, event, now) → (record, effects) |
//! | [`workflow`] | workflow definitions and the pure session engine |
//! | [`repository`] | storage traits, Redis and in-memory implementations |
//! | [`outbox`] | messages committed with a change and published after it |
//! | [`bus`] | the NATS connection, streams, consumer and acknowledged publishing |
//! | [`dlq`] | dead letters: copying refused messages with their reason |
//! | [`faults`] | crash points for fault-injection tests (debug builds only) |
//! | [`worker`] | `opscore run`: intake, handlers, timers, shutdown |
//! | [`admin`] | the admin HTTP port: liveness, readiness, Prometheus metrics |
//! | [`api`] | the `opscore` micro service on `opscore.api.*`, and its client |
//! | [`bridge`] | `opscore bridge`: the original HTTP API and AgentKit, relayed over NATS |
//! | [`bench`] | `opscore-bench`: simulated agents, scenarios and figures against the bus ceiling |
//! | [`trace`] | W3C trace context carried in NATS headers |
//! | [`cli`], [`telemetry`] | the command line and logging |

pub mod admin;
pub mod api;
pub mod bench;
pub mod bridge;
pub mod bus;
pub mod cli;
pub mod config;
pub mod dlq;
pub mod envelope;
pub mod faults;
pub mod model;
pub mod outbox;
pub mod registry;
pub mod repository;
pub mod subjects;
pub mod telemetry;
pub mod trace;
pub mod worker;
pub mod workflow;
