//! Subject parsing and the id-token rule: an arbitrary string as an inbound subject, and the
//! whole string and each of its `.`-separated pieces as an id placed into every subject builder.

#![no_main]

use libfuzzer_sys::fuzz_target;
use opscore::envelope::DeadLetterReason;
use opscore::subjects::{self, AgentEventKind, InvalidToken, SubjectError};

fuzz_target!(|input: &[u8]| {
    let subject = String::from_utf8_lossy(input);
    check_parse(&subject);

    check_token(&subject);
    for piece in subject.split('.') {
        check_token(piece);
    }

    if let Some(reason) = DeadLetterReason::parse(&subject) {
        assert_eq!(reason.as_str(), subject);
        assert!(subjects::dlq(reason.as_str()).is_ok());
    }
});

/// An inbound subject parses exactly when it is one a valid agent could have published on.
fn check_parse(subject: &str) {
    match subjects::parse_agent_event(subject) {
        Ok((agent_id, kind)) => {
            assert!(subjects::is_valid_token(agent_id));
            assert_eq!(
                subjects::agent_event(agent_id, kind).as_deref(),
                Ok(subject),
                "a parsed subject must be rebuilt exactly"
            );
        }
        Err(SubjectError::NotAgentEvent(s)) => {
            assert_eq!(s, subject);
            assert!(!subject.starts_with("opscore.agent."));
        }
        Err(SubjectError::InvalidAgentId {
            subject: s,
            source: InvalidToken(id),
        }) => {
            assert_eq!(s, subject);
            assert!(!subjects::is_valid_token(&id));
            let rest = subject
                .strip_prefix("opscore.agent.")
                .expect("an agent event subject");
            assert_eq!(rest.split('.').next(), Some(id.as_str()));
        }
        Err(SubjectError::UnknownEvent(s)) => {
            assert_eq!(s, subject);
            let rest = subject
                .strip_prefix("opscore.agent.")
                .expect("an agent event subject");
            // Either no kind follows the id, or the id is fine and the kind is unknown.
            if let Some((id, suffix)) = rest.split_once('.') {
                assert!(subjects::is_valid_token(id));
                assert!(
                    AgentEventKind::ALL
                        .iter()
                        .all(|kind| kind.suffix() != suffix)
                );
            }
        }
    }
}

/// A valid token is one subject token in every builder; an invalid one is refused by all.
fn check_token(id: &str) {
    let valid = subjects::is_valid_token(id);
    assert_eq!(subjects::token(id).is_ok(), valid);
    let built = [
        subjects::dispatch(id),
        subjects::agent_status(id),
        subjects::session_status(id),
        subjects::dlq(id),
    ];

    if !valid {
        assert_eq!(subjects::token(id), Err(InvalidToken(id.to_owned())));
        for subject in built {
            assert_eq!(subject, Err(InvalidToken(id.to_owned())));
        }
        for kind in AgentEventKind::ALL {
            assert!(subjects::agent_event(id, kind).is_err());
        }
        return;
    }

    assert!((1..=subjects::MAX_TOKEN_LEN).contains(&id.len()));
    assert!(
        !id.contains(['.', '*', '>']) && !id.chars().any(char::is_whitespace),
        "token {id:?} could re-route a message"
    );
    for subject in built {
        let subject = subject.expect("valid token");
        assert_eq!(subject.rsplit('.').next(), Some(id));
    }
    for kind in AgentEventKind::ALL {
        let subject = subjects::agent_event(id, kind).expect("valid token");
        assert_eq!(subjects::parse_agent_event(&subject), Ok((id, kind)));
    }
}
