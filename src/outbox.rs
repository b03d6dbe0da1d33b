//! Messages opscore publishes as the effect of a committed change.
//!
//! They are written to the repository's outbox in the same atomic step as the change, published
//! after the commit, and removed once JetStream has acknowledged them. A worker that dies in
//! between leaves them in the outbox, where the timer loop of any worker finds and republishes
//! them; their deterministic `Nats-Msg-Id` lets JetStream drop the second copy.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// One message waiting to be published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxMessage {
    /// The `Nats-Msg-Id`, also the message's key in the outbox.
    pub id: String,
    pub subject: String,
    pub payload: String,
    /// Extra headers, such as a `traceparent`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

impl OutboxMessage {
    /// Wraps `data` in a CloudEvents 1.0 structured envelope whose id is the message id.
    pub fn cloudevent(
        id: String,
        subject: String,
        event_type: &str,
        time: DateTime<Utc>,
        data: Value,
    ) -> Self {
        let envelope = json!({
            "specversion": "1.0",
            "id": id,
            "source": "opscore",
            "type": event_type,
            "time": time.to_rfc3339_opts(SecondsFormat::Millis, true),
            "datacontenttype": "application/json",
            "data": data,
        });
        Self {
            id,
            subject,
            payload: envelope.to_string(),
            headers: Vec::new(),
        }
    }

    /// Adds a `traceparent` continuing `trace`, if there is a valid one.
    pub fn continue_trace(&mut self, trace: Option<&str>) {
        if let Some(traceparent) = trace.and_then(crate::trace::child) {
            self.headers
                .push((crate::trace::HEADER.to_owned(), traceparent));
        }
    }
}
