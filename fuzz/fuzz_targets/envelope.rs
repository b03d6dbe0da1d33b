//! Inbound agent events as the worker sees them: a subject, an optional `Nats-Msg-Id` header
//! and a payload, through subject parsing, envelope decoding and the typed payload of the kind.
//!
//! Input layout, so that seeds stay readable: `<subject>\n<msg id>\n<payload>`. An empty msg
//! id line means no header; input without a newline is all subject, with an empty payload.

#![no_main]

use libfuzzer_sys::fuzz_target;
use opscore::envelope::{DeadLetterReason, Envelope, Limits};
use opscore::model::{
    AgentState, Deregistration, Heartbeat, Registration, StateReport, TaskProgress, TaskResult,
};
use opscore::subjects::{self, AgentEventKind};
use serde_json::Value;

/// The shipped defaults (`config/default.toml`) and the tightest limits the configuration
/// accepts, so that both the size and the depth checks are reached by small inputs.
const LIMITS: [Limits; 2] = [
    Limits {
        max_bytes: 65536,
        max_depth: 32,
    },
    Limits {
        max_bytes: 1024,
        max_depth: 2,
    },
];

fuzz_target!(|input: &[u8]| {
    let (subject, rest) = split_line(input);
    let (msg_id, payload) = split_line(rest);
    let subject = String::from_utf8_lossy(subject);
    let msg_id = String::from_utf8_lossy(msg_id);
    let msg_id = (!msg_id.is_empty()).then_some(msg_id.as_ref());
    let stream_seq = input.len() as u64;

    // The worker refuses a bad subject before decoding; here an unparsable subject tries the
    // payload against every kind instead, so the payload parsers see more inputs.
    let kinds = match subjects::parse_agent_event(&subject) {
        Ok((agent_id, kind)) => {
            assert!(subjects::is_valid_token(agent_id));
            vec![kind]
        }
        Err(_) => AgentEventKind::ALL.to_vec(),
    };

    for limits in LIMITS {
        match Envelope::decode(payload, msg_id, stream_seq, limits) {
            Ok(envelope) => {
                check_accepted(&envelope, payload, msg_id, stream_seq, limits);
                for &kind in &kinds {
                    parse_payload(&envelope, kind);
                }
            }
            Err(rejected) => {
                assert_eq!(
                    DeadLetterReason::parse(rejected.reason.as_str()),
                    Some(rejected.reason)
                );
                assert!(subjects::dlq(rejected.reason.as_str()).is_ok());
                let _ = rejected.to_string();
            }
        }
    }
});

/// What an accepted envelope promises the handlers.
fn check_accepted(
    envelope: &Envelope,
    payload: &[u8],
    msg_id: Option<&str>,
    stream_seq: u64,
    limits: Limits,
) {
    assert!(payload.len() <= limits.max_bytes);
    assert!(!envelope.event_id.is_empty());
    assert!(envelope.event_id.len() <= 256);
    assert!(envelope.data.is_object());
    // The depth check runs on raw bytes before parsing; it must never let a deeper document
    // through.
    assert!(
        depth(&envelope.data) <= limits.max_depth,
        "data of depth {} accepted under a limit of {}",
        depth(&envelope.data),
        limits.max_depth
    );

    let whole: Value = serde_json::from_slice(payload).expect("accepted payload is json");
    if whole.get("specversion").is_none() {
        // Bare data: the whole object, with its id from the header, else the stream sequence.
        assert_eq!(envelope.data, whole);
        let expected = match msg_id {
            Some(id) => id.to_owned(),
            None => format!("seq:{stream_seq}"),
        };
        assert_eq!(envelope.event_id, expected);
    } else {
        assert_eq!(
            whole.get("id").and_then(Value::as_str),
            Some(envelope.event_id.as_str())
        );
        assert_eq!(whole.get("data"), Some(&envelope.data));
    }
}

/// The typed payload of one kind, parsed the way the worker's handler does.
fn parse_payload(envelope: &Envelope, kind: AgentEventKind) {
    match kind {
        AgentEventKind::Register => {
            let _ = envelope.parse::<Registration>();
        }
        AgentEventKind::Deregister => {
            let _ = envelope.parse::<Deregistration>();
        }
        AgentEventKind::State => {
            if let Ok(report) = envelope.parse::<StateReport>() {
                if let Ok(state) = report.state.parse::<AgentState>() {
                    assert!(state.as_str().eq_ignore_ascii_case(report.state.trim()));
                    assert_eq!(state.as_str().parse::<AgentState>(), Ok(state));
                }
                let details = Value::Object(report.details.unwrap_or_default());
                let _ = opscore::workflow::legacy_report(&report.state, &details);
            }
        }
        AgentEventKind::Heartbeat => {
            let _ = envelope.parse::<Heartbeat>();
        }
        AgentEventKind::TaskProgress => {
            let _ = envelope.parse::<TaskProgress>();
        }
        AgentEventKind::TaskResult => {
            let _ = envelope.parse::<TaskResult>();
        }
    }
}

/// Splits off the first line; without a newline the whole input is the line.
fn split_line(input: &[u8]) -> (&[u8], &[u8]) {
    match input.iter().position(|&b| b == b'\n') {
        Some(at) => (&input[..at], &input[at + 1..]),
        None => (input, &[]),
    }
}

/// Nesting depth of arrays and objects, counted the way the decoder's limit counts it.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}
