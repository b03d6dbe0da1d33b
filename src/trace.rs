//! W3C trace context (`traceparent`) carried in NATS headers, so that one trace follows an
//! event from an agent or a client through the worker to the dispatch and the result.
//!
//! opscore continues a trace it is given: each message it publishes for that trace carries a
//! `traceparent` with the same trace id and a new span id, and the handling of an event logs
//! the trace id as a span field. It does not start traces of its own.

/// The header name, as W3C Trace Context spells it.
pub const HEADER: &str = "traceparent";

/// A valid `traceparent` (version 00): `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`,
/// neither id all zeros.
pub fn parse(value: &str) -> Option<&str> {
    let parts: Vec<&str> = value.trim().split('-').collect();
    let [version, trace_id, parent_id, flags] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = *version == "00"
        && hex(trace_id, 32)
        && hex(parent_id, 16)
        && hex(flags, 2)
        && trace_id.bytes().any(|b| b != b'0')
        && parent_id.bytes().any(|b| b != b'0');
    valid.then_some(value.trim())
}

/// The trace id of a valid `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    parse(traceparent)?.split('-').nth(1)
}

/// A `traceparent` for a new span of the same trace, with the same flags.
pub fn child(traceparent: &str) -> Option<String> {
    let parent = parse(traceparent)?;
    let mut parts = parent.split('-');
    let (_, trace_id, _, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let span_id = loop {
        let candidate: u64 = rand::random();
        if candidate != 0 {
            break candidate;
        }
    };
    Some(format!("00-{trace_id}-{span_id:016x}-{flags}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_span() {
        let child = child(PARENT).expect("valid parent");
        assert_eq!(trace_id(&child), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(child.ends_with("-01"));
        assert_ne!(child, PARENT);
        assert!(parse(&child).is_some());
    }

    #[test]
    fn malformed_trace_contexts_are_ignored() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
            assert_eq!(child(bad), None);
        }
    }
}
