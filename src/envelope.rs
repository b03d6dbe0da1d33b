//! Inbound message decoding: size and depth limits, CloudEvents 1.0 structured mode or a bare
//! `data` object, and the event id used for deduplication.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why a message can never be applied; also the last token of its `opscore.dlq.<reason>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    NotJson,
    TooLarge,
    TooDeep,
    Schema,
    UnsupportedSpecversion,
    InvalidToken,
    Spoofed,
    UnknownEvent,
    UnknownAgent,
    UnknownTask,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 10] = [
        Self::NotJson,
        Self::TooLarge,
        Self::TooDeep,
        Self::Schema,
        Self::UnsupportedSpecversion,
        Self::InvalidToken,
        Self::Spoofed,
        Self::UnknownEvent,
        Self::UnknownAgent,
        Self::UnknownTask,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotJson => "not_json",
            Self::TooLarge => "too_large",
            Self::TooDeep => "too_deep",
            Self::Schema => "schema",
            Self::UnsupportedSpecversion => "unsupported_specversion",
            Self::InvalidToken => "invalid_token",
            Self::Spoofed => "spoofed",
            Self::UnknownEvent => "unknown_event",
            Self::UnknownAgent => "unknown_agent",
            Self::UnknownTask => "unknown_task",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == s)
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message rejected for good, with the reason and a human-readable explanation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Rejected {
    pub reason: DeadLetterReason,
    pub message: String,
}

impl Rejected {
    pub fn new(reason: DeadLetterReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Limits applied before a payload is parsed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_depth: usize,
}

/// The longest event id accepted.
const MAX_EVENT_ID_LEN: usize = 256;

/// A decoded inbound event: its id and its `data` object.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The CloudEvents `id`, else the `Nats-Msg-Id` header, else `seq:<stream sequence>`.
    pub event_id: String,
    pub data: Value,
}

impl Envelope {
    /// Decodes `payload`. `msg_id` is the `Nats-Msg-Id` header and `stream_seq` the message's
    /// sequence in its stream, the fallbacks for the event id.
    pub fn decode(
        payload: &[u8],
        msg_id: Option<&str>,
        stream_seq: u64,
        limits: Limits,
    ) -> Result<Self, Rejected> {
        if payload.len() > limits.max_bytes {
            return Err(Rejected::new(
                DeadLetterReason::TooLarge,
                format!(
                    "payload of {} bytes exceeds the limit of {}",
                    payload.len(),
                    limits.max_bytes
                ),
            ));
        }
        // Checked on the raw bytes so that a hostile document is refused before the parser
        // recurses into it.
        let depth = nesting_depth(payload);
        if depth > limits.max_depth {
            return Err(Rejected::new(
                DeadLetterReason::TooDeep,
                format!(
                    "nesting depth {depth} exceeds the limit of {}",
                    limits.max_depth
                ),
            ));
        }
        let value: Value = serde_json::from_slice(payload)
            .map_err(|e| Rejected::new(DeadLetterReason::NotJson, e.to_string()))?;
        let Value::Object(mut object) = value else {
            return Err(Rejected::new(
                DeadLetterReason::Schema,
                "payload must be a JSON object",
            ));
        };

        let Some(specversion) = object.get("specversion") else {
            let event_id = match msg_id {
                Some(id) if !id.is_empty() => id.to_owned(),
                _ => format!("seq:{stream_seq}"),
            };
            check_event_id(&event_id)?;
            return Ok(Self {
                event_id,
                data: Value::Object(object),
            });
        };

        if specversion.as_str() != Some("1.0") {
            return Err(Rejected::new(
                DeadLetterReason::UnsupportedSpecversion,
                format!("specversion {specversion} is not supported; use \"1.0\""),
            ));
        }
        let event_id = match object.get("id") {
            Some(Value::String(id)) if !id.is_empty() => id.clone(),
            _ => {
                return Err(Rejected::new(
                    DeadLetterReason::Schema,
                    "cloudevent: id must be a non-empty string",
                ));
            }
        };
        check_event_id(&event_id)?;
        for attribute in ["source", "type"] {
            if !matches!(object.get(attribute), Some(Value::String(s)) if !s.is_empty()) {
                return Err(Rejected::new(
                    DeadLetterReason::Schema,
                    format!("cloudevent: {attribute} must be a non-empty string"),
                ));
            }
        }
        match object.remove("data") {
            Some(data @ Value::Object(_)) => Ok(Self { event_id, data }),
            _ => Err(Rejected::new(
                DeadLetterReason::Schema,
                "cloudevent: data must be a JSON object",
            )),
        }
    }

    /// Deserialises the data into a payload type, reporting schema errors with their path.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Rejected> {
        T::deserialize(&self.data)
            .map_err(|e| Rejected::new(DeadLetterReason::Schema, e.to_string()))
    }
}

fn check_event_id(id: &str) -> Result<(), Rejected> {
    if id.len() > MAX_EVENT_ID_LEN {
        return Err(Rejected::new(
            DeadLetterReason::Schema,
            format!("event id longer than {MAX_EVENT_ID_LEN} bytes"),
        ));
    }
    Ok(())
}

/// The deepest nesting of arrays and objects in a JSON text, ignoring brackets inside strings.
/// Malformed text yields some depth; the parser reports it afterwards.
fn nesting_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bytes: 1024,
        max_depth: 8,
    };

    fn decode(payload: &str) -> Result<Envelope, Rejected> {
        Envelope::decode(payload.as_bytes(), None, 42, LIMITS)
    }

    fn reason(payload: &str) -> DeadLetterReason {
        decode(payload).expect_err("must be rejected").reason
    }

    #[test]
    fn bare_data_takes_its_id_from_the_header_then_the_stream_sequence() {
        let with_header =
            Envelope::decode(br#"{"agentId":"a"}"#, Some("evt-1"), 42, LIMITS).expect("valid");
        assert_eq!(with_header.event_id, "evt-1");
        assert_eq!(
            decode(r#"{"agentId":"a"}"#).expect("valid").event_id,
            "seq:42"
        );
    }

    #[test]
    fn cloudevents_yield_their_id_and_data() {
        let envelope = decode(
            r#"{"specversion":"1.0","id":"e1","source":"agent/a","type":"x",
                "datacontenttype":"application/json","data":{"agentId":"a"}}"#,
        )
        .expect("valid");
        assert_eq!(envelope.event_id, "e1");
        assert_eq!(envelope.data, serde_json::json!({"agentId": "a"}));
    }

    #[test]
    fn malformed_input_is_classified() {
        assert_eq!(reason("not json"), DeadLetterReason::NotJson);
        assert_eq!(reason("[1,2]"), DeadLetterReason::Schema);
        assert_eq!(
            reason(r#"{"specversion":"0.3","id":"e","source":"s","type":"t","data":{}}"#),
            DeadLetterReason::UnsupportedSpecversion
        );
        assert_eq!(
            reason(r#"{"specversion":"1.0","source":"s","type":"t","data":{}}"#),
            DeadLetterReason::Schema
        );
        assert_eq!(
            reason(r#"{"specversion":"1.0","id":"e","source":"s","type":"t","data":"x"}"#),
            DeadLetterReason::Schema
        );
        assert_eq!(
            reason(&format!("\"{}\"", "x".repeat(2000))),
            DeadLetterReason::TooLarge
        );
        assert_eq!(reason(&"[".repeat(9)), DeadLetterReason::TooDeep);
    }

    #[test]
    fn brackets_inside_strings_do_not_count_as_depth() {
        let payload = format!(r#"{{"agentId":"{}"}}"#, "[{".repeat(20));
        assert!(decode(&payload).is_ok());
        assert_eq!(nesting_depth(br#"{"a":"\"[[["}"#), 1);
    }

    #[test]
    fn typed_parsing_reports_schema_errors() {
        let envelope = decode(r#"{"agentId":5}"#).expect("valid json");
        let err = envelope
            .parse::<crate::model::Heartbeat>()
            .expect_err("wrong type");
        assert_eq!(err.reason, DeadLetterReason::Schema);
        assert!(err.message.contains("invalid type"), "{}", err.message);
    }
}
