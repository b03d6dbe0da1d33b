//! The relay: opscore's own intake with a handler that applies nothing. It pulls from the
//! events consumer as the worker does, decodes each registration or state report, publishes
//! the status event a worker would publish for it (awaiting JetStream's acknowledgement), and
//! acknowledges the report. No registry rules, no storage.
//!
//! The floor scenario drives it exactly as it drives a worker: what the relay reaches is what
//! the bus and the intake allow on this machine before opscore does any work of its own.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use serde_json::Map;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admin::Loops;
use crate::bus::{self, Publisher};
use crate::config::Settings;
use crate::envelope::{Envelope, Limits};
use crate::model::{AgentState, StateReport};
use crate::registry::{Transition, TransitionKind};
use crate::subjects::{self, AgentEventKind};
use crate::worker::consumer::{self, Handle};
use crate::worker::{Delivery, Outcome};

/// The micro service name the relay answers `$SRV.PING` under, so the harness knows it serves.
pub(crate) const SERVICE: &str = "opscore-relay";

/// How long a report whose status event could not be published waits to be delivered again.
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    #[error("micro service: {0}")]
    Service(async_nats::Error),
}

/// Serves as a relay until SIGTERM or SIGINT, configured like a worker (`OPSCORE__…`).
pub async fn serve() -> Result<(), RelayError> {
    let settings = Settings::load(None)?;
    let client = bus::connect(&settings.nats).await?;
    let jetstream = jetstream::new(client.clone());
    bus::ensure_streams(&jetstream, &settings).await?;
    let events = bus::events_consumer(&jetstream, &settings).await?;
    let relay = Relay {
        publisher: Publisher::new(jetstream),
        limits: Limits {
            max_bytes: settings.worker.max_message_bytes,
            max_depth: settings.worker.max_json_depth,
        },
    };
    let service = {
        use async_nats::service::ServiceExt;
        client
            .service_builder()
            .description("opscore-bench relay: the intake and the bus, nothing applied")
            .start(SERVICE, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(RelayError::Service)?
    };

    let shutdown = CancellationToken::new();
    tokio::spawn(crate::cli::stop_on_signal(shutdown.clone()));
    info!(consumer = %settings.worker.consumer, "relay serving");
    consumer::run(
        events,
        relay,
        Arc::new(Loops::default()),
        settings.worker.max_in_flight,
        shutdown,
        settings.worker.shutdown_grace(),
    )
    .await;
    drop(service);
    let _ = client.flush().await;
    Ok(())
}

#[derive(Debug, Clone)]
struct Relay {
    publisher: Publisher,
    limits: Limits,
}

impl Handle for Relay {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        // Anything the relay cannot turn into a status event is acknowledged and dropped:
        // the benchmark's agents send only registrations and state reports.
        let Some(transition) = self.transition(delivery) else {
            return Outcome::Stale;
        };
        let message = transition.to_message();
        if self.publisher.publish_outbox(&[message]).await.is_empty() {
            return Outcome::Retry(RETRY_DELAY);
        }
        Outcome::Applied
    }
}

impl Relay {
    /// The status event a worker would publish for the event, without its registry rules:
    /// the stream sequence stands for the agent's `seq`, and nothing is checked for order.
    fn transition(&self, delivery: &Delivery) -> Option<Transition> {
        let (agent_id, kind) = subjects::parse_agent_event(&delivery.subject).ok()?;
        let msg_id = delivery
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str());
        let envelope =
            Envelope::decode(&delivery.payload, msg_id, delivery.stream_seq, self.limits).ok()?;
        let (kind, state, timestamp, details) = match kind {
            AgentEventKind::Register => (
                TransitionKind::Registered,
                AgentState::Unknown,
                Utc::now(),
                Map::new(),
            ),
            AgentEventKind::State => {
                let report: StateReport = envelope.parse().ok()?;
                (
                    TransitionKind::StateChanged,
                    report.state.parse().ok()?,
                    report.timestamp,
                    report.details.unwrap_or_default(),
                )
            }
            _ => return None,
        };
        Some(Transition {
            agent_id: agent_id.to_owned(),
            seq: delivery.stream_seq,
            kind,
            state,
            previous_state: None,
            deregistered: false,
            timestamp,
            details,
        })
    }
}
