//! Who may call the bridge: the bearer key of the REST endpoints and the HMAC signature of
//! the AgentKit webhook. Both comparisons take constant time, so response timing tells an
//! attacker nothing about how much of a guess was right.

use std::fmt;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Keys the digest of API keys. Any fixed key works: it only turns keys of any length into
/// tags of one length, which `verify_slice` then compares in constant time.
const API_KEY_CONTEXT: &[u8] = b"opscore bridge api key";

/// The configured bearer key, kept only as a tag.
pub(crate) struct ApiKey {
    tag: Vec<u8>,
}

impl ApiKey {
    /// `None` for an empty key: there is no default key, and an empty one would match an
    /// empty bearer token.
    pub(crate) fn new(key: &str) -> Option<Self> {
        if key.is_empty() {
            return None;
        }
        let tag = keyed(API_KEY_CONTEXT, key.as_bytes())?
            .finalize()
            .into_bytes()
            .to_vec();
        Some(Self { tag })
    }

    /// Whether `presented` is the configured key.
    pub(crate) fn matches(&self, presented: &str) -> bool {
        keyed(API_KEY_CONTEXT, presented.as_bytes())
            .is_some_and(|mac| mac.verify_slice(&self.tag).is_ok())
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// A MAC keyed with `key` that has already absorbed `message`.
fn keyed(key: &[u8], message: &[u8]) -> Option<HmacSha256> {
    // HMAC accepts keys of any length, so this never fails; `None` keeps the caller honest
    // without an unwrap.
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    mac.update(message);
    Some(mac)
}

/// Why a webhook notification's signature was refused. Each is answered with 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SignatureError {
    #[error("missing X-AgentKit-Timestamp header")]
    MissingTimestamp,
    #[error("missing X-AgentKit-Signature header")]
    MissingSignature,
    #[error("X-AgentKit-Timestamp is neither epoch seconds nor an ISO 8601 time")]
    InvalidTimestamp,
    #[error("X-AgentKit-Timestamp is {skew_secs} s away from now, beyond the allowed window")]
    OutsideWindow { skew_secs: i64 },
    #[error("X-AgentKit-Signature does not match the body")]
    Mismatch,
}

/// The shared secret of the AgentKit webhook and the allowed clock difference.
pub(crate) struct WebhookSecret {
    key: Vec<u8>,
    window_secs: u64,
}

impl WebhookSecret {
    /// `None` for an empty secret: notifications are then accepted unsigned.
    pub(crate) fn new(secret: &str, window_secs: u64) -> Option<Self> {
        (!secret.is_empty()).then(|| Self {
            key: secret.as_bytes().to_vec(),
            window_secs,
        })
    }

    /// Checks `signature`, the hex HMAC-SHA256 over `timestamp`, a `.` and the raw `body`,
    /// and that `timestamp` lies within the window around `now`. AgentKit sends epoch
    /// seconds; an ISO 8601 time is accepted too, as some AgentKit versions document it. The
    /// timestamp is signed exactly as sent, so either form verifies.
    pub(crate) fn verify(
        &self,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<(), SignatureError> {
        let timestamp = timestamp.ok_or(SignatureError::MissingTimestamp)?;
        let signature = signature.ok_or(SignatureError::MissingSignature)?;
        let signed_at = parse_signed_at(timestamp).ok_or(SignatureError::InvalidTimestamp)?;
        let skew_secs = (now - signed_at).num_seconds();
        if skew_secs.unsigned_abs() > self.window_secs {
            return Err(SignatureError::OutsideWindow { skew_secs });
        }

        let hex_digest = signature.trim();
        let hex_digest = hex_digest.strip_prefix("sha256=").unwrap_or(hex_digest);
        let expected = hex::decode(hex_digest).map_err(|_| SignatureError::Mismatch)?;
        let mut mac = keyed(&self.key, timestamp.as_bytes()).ok_or(SignatureError::Mismatch)?;
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&expected)
            .map_err(|_| SignatureError::Mismatch)
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSecret")
            .field("window_secs", &self.window_secs)
            .finish_non_exhaustive()
    }
}

fn parse_signed_at(timestamp: &str) -> Option<DateTime<Utc>> {
    let timestamp = timestamp.trim();
    match timestamp.parse::<i64>() {
        Ok(secs) => DateTime::from_timestamp(secs, 0),
        Err(_) => super::http::parse_time(timestamp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn api_keys_match_only_themselves() {
        let key = ApiKey::new("s3cret").expect("a key");
        assert!(key.matches("s3cret"));
        assert!(!key.matches("s3cre"));
        assert!(!key.matches("s3cret "));
        assert!(!key.matches(""));
        assert!(ApiKey::new("").is_none());
        assert!(!format!("{key:?}").contains("s3cret"));
    }

    #[test]
    fn signatures_over_timestamp_and_body_are_accepted_within_the_window() {
        let secret = WebhookSecret::new("shh", 300).expect("a secret");
        let now = Utc::now();
        let ts = now.timestamp().to_string();
        let body = br#"{"event_type":"REGISTER"}"#;
        let good = sign("shh", &ts, body);
        assert_eq!(secret.verify(Some(&ts), Some(&good), body, now), Ok(()));
        let prefixed = format!("sha256={}", good.to_uppercase());
        assert_eq!(secret.verify(Some(&ts), Some(&prefixed), body, now), Ok(()));

        let iso = now.to_rfc3339();
        let signed_iso = sign("shh", &iso, body);
        assert_eq!(
            secret.verify(Some(&iso), Some(&signed_iso), body, now),
            Ok(())
        );
    }

    #[test]
    fn wrong_or_missing_signatures_and_old_timestamps_are_refused() {
        let secret = WebhookSecret::new("shh", 300).expect("a secret");
        let now = Utc::now();
        let ts = now.timestamp().to_string();
        let body = b"{}";
        let check = |ts: Option<&str>, sig: Option<&str>| secret.verify(ts, sig, body, now);

        assert_eq!(
            check(Some(&ts), Some(&sign("other", &ts, body))),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(Some(&ts), Some("not hex")),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(None, Some("00")),
            Err(SignatureError::MissingTimestamp)
        );
        assert_eq!(
            check(Some(&ts), None),
            Err(SignatureError::MissingSignature)
        );
        assert_eq!(
            check(Some("yesterday"), Some("00")),
            Err(SignatureError::InvalidTimestamp)
        );

        let old = (now.timestamp() - 301).to_string();
        assert_eq!(
            check(Some(&old), Some(&sign("shh", &old, body))),
            Err(SignatureError::OutsideWindow { skew_secs: 301 })
        );
        let future = (now.timestamp() + 600).to_string();
        assert!(matches!(
            check(Some(&future), Some(&sign("shh", &future, body))),
            Err(SignatureError::OutsideWindow { .. })
        ));
    }
}
