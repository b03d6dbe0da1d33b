//! Dead letters: a message that can never be applied is copied to `opscore.dlq.<reason>` with
//! its original subject, headers and payload, then terminated on its own stream.
//!
//! The copy keeps the original payload byte for byte (so it can be replayed as it was) and
//! carries the facts in headers:
//!
//! | header | value |
//! |---|---|
//! | `Opscore-Dlq-Reason` | the reason token |
//! | `Opscore-Dlq-Error` | the error text |
//! | `Opscore-Original-Subject` | where it was published |
//! | `Opscore-Original-Seq` | its sequence in `OPSCORE_EVENTS` |
//! | `Opscore-Original-Msg-Id` | its `Nats-Msg-Id`, if it had one |

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::bus::{PublishFailed, Publisher};
use crate::envelope::{DeadLetterReason, Rejected};
use crate::subjects;

pub const REASON: &str = "Opscore-Dlq-Reason";
pub const ERROR: &str = "Opscore-Dlq-Error";
pub const ORIGINAL_SUBJECT: &str = "Opscore-Original-Subject";
pub const ORIGINAL_SEQ: &str = "Opscore-Original-Seq";
pub const ORIGINAL_MSG_ID: &str = "Opscore-Original-Msg-Id";

/// The longest error text carried in a header.
const MAX_ERROR_LEN: usize = 512;
/// Of a payload refused as too large, only this much is copied, so the copy itself fits.
const MAX_COPIED_BYTES: usize = 64 * 1024;

/// A message to dead-letter: where it came from and why it is refused.
#[derive(Debug)]
pub struct DeadLetter<'a> {
    pub subject: &'a str,
    pub headers: Option<&'a HeaderMap>,
    pub payload: &'a Bytes,
    pub stream_seq: u64,
    pub rejected: &'a Rejected,
}

impl DeadLetter<'_> {
    /// Publishes the copy and waits for JetStream to store it. Its message id is derived from
    /// the original's stream sequence, so a redelivered message is not copied twice.
    pub async fn publish(&self, publisher: &Publisher) -> Result<(), PublishFailed> {
        let reason = self.rejected.reason;
        let mut headers = HeaderMap::new();
        if let Some(original) = self.headers {
            for (name, values) in original.iter() {
                let name: &str = name.as_ref();
                if name.eq_ignore_ascii_case("Nats-Msg-Id") {
                    continue;
                }
                for value in values {
                    headers.append(name, value.as_str());
                }
            }
            if let Some(msg_id) = original.get("Nats-Msg-Id") {
                headers.insert(ORIGINAL_MSG_ID, msg_id.as_str());
            }
        }
        headers.insert(REASON, reason.as_str());
        headers.insert(ERROR, header_text(&self.rejected.message).as_str());
        headers.insert(ORIGINAL_SUBJECT, header_text(self.subject).as_str());
        headers.insert(ORIGINAL_SEQ, self.stream_seq.to_string().as_str());
        headers.insert("Nats-Msg-Id", format!("dlq:{}", self.stream_seq).as_str());

        let payload = if reason == DeadLetterReason::TooLarge {
            self.payload
                .slice(..self.payload.len().min(MAX_COPIED_BYTES))
        } else {
            self.payload.clone()
        };
        // Reason tokens are constants that always form a valid subject.
        let subject =
            subjects::dlq(reason.as_str()).unwrap_or_else(|_| "opscore.dlq.schema".into());
        publisher.publish(subject, headers, payload).await
    }
}

/// Header values cannot hold line breaks; long texts are cut on a character boundary.
fn header_text(text: &str) -> String {
    let single_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match single_line.char_indices().nth(MAX_ERROR_LEN) {
        Some((cut, _)) => format!("{}…", &single_line[..cut]),
        None => single_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_text_is_one_bounded_line() {
        assert_eq!(header_text("a\r\nb"), "a  b");
        let long = header_text(&"é".repeat(600));
        assert_eq!(long.chars().count(), MAX_ERROR_LEN + 1);
    }
}
