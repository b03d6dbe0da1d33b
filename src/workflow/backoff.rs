//! Retry delays: exponential growth, capped, shortened by a random fraction.

use chrono::TimeDelta;

use super::definition::RetryPolicy;

/// The delay after failed attempt `attempt` (1 for the first) before the next one.
///
/// The undisturbed delay is `initialDelayMs × multiplier^(attempt − 1)`, capped at
/// `maxDelayMs`. Jitter then shortens it by up to the `jitter` fraction:
/// `delay × (1 − jitter × jitter_sample)`. Jitter only ever shortens, so the cap holds
/// exactly and a fleet that failed together spreads its retries over
/// `(delay × (1 − jitter), delay]`.
///
/// `jitter_sample` is a uniform sample in `[0, 1)` supplied by the caller, keeping this pure;
/// values outside that range are clamped and NaN counts as 0.
pub fn backoff_delay(policy: &RetryPolicy, attempt: u32, jitter_sample: f64) -> TimeDelta {
    let initial = policy.initial_delay_ms as f64;
    let max = policy.max_delay_ms as f64;
    let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
    // `0 × ∞` would be NaN once the power overflows, so a zero delay stays zero explicitly.
    let grown = if initial == 0.0 {
        0.0
    } else {
        initial * policy.multiplier.powi(exponent)
    };
    let capped = grown.min(max);

    let sample = if jitter_sample.is_nan() {
        0.0
    } else {
        jitter_sample.clamp(0.0, 1.0)
    };
    let jitter = policy.jitter.clamp(0.0, 1.0);
    let delay_ms = capped * (1.0 - jitter * sample);
    // The float-to-int cast saturates, and `delay_ms` is at most `maxDelayMs` anyway.
    TimeDelta::milliseconds(delay_ms.round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            initial_delay_ms: 1000,
            max_delay_ms: 10_000,
            multiplier: 2.0,
            jitter: 0.5,
        }
    }

    #[test]
    fn backoff_doubles_per_attempt_without_jitter() {
        let delays: Vec<i64> = (1..=4)
            .map(|a| backoff_delay(&policy(), a, 0.0).num_milliseconds())
            .collect();
        assert_eq!(delays, [1000, 2000, 4000, 8000]);
    }

    #[test]
    fn backoff_is_capped_at_the_max_delay() {
        assert_eq!(backoff_delay(&policy(), 5, 0.0).num_milliseconds(), 10_000);
        assert_eq!(
            backoff_delay(&policy(), u32::MAX, 0.0).num_milliseconds(),
            10_000
        );
    }

    #[test]
    fn jitter_shortens_by_at_most_its_fraction() {
        assert_eq!(
            backoff_delay(&policy(), 1, 0.999_999).num_milliseconds(),
            500
        );
        assert_eq!(
            backoff_delay(&policy(), 1, f64::NAN).num_milliseconds(),
            1000
        );
    }

    #[test]
    fn zero_initial_delay_retries_at_once_even_after_many_attempts() {
        let policy = RetryPolicy {
            initial_delay_ms: 0,
            ..policy()
        };
        assert_eq!(backoff_delay(&policy, 5000, 0.3), TimeDelta::zero());
    }

    proptest! {
        #[test]
        fn jittered_backoff_stays_within_bounds(
            attempt in 1u32..64,
            sample in 0.0f64..1.0,
            jitter in 0.0f64..=1.0,
            multiplier in 1.0f64..10.0,
        ) {
            let policy = RetryPolicy { jitter, multiplier, ..policy() };
            let plain = backoff_delay(&RetryPolicy { jitter: 0.0, ..policy }, attempt, 0.0);
            let delay = backoff_delay(&policy, attempt, sample).num_milliseconds();
            let plain = plain.num_milliseconds();
            prop_assert!(delay <= plain && plain <= 10_000);
            prop_assert!(delay as f64 >= (plain as f64 * (1.0 - jitter)).floor());
            let next = backoff_delay(&RetryPolicy { jitter: 0.0, ..policy }, attempt + 1, 0.0);
            prop_assert!(next.num_milliseconds() >= plain);
        }
    }
}
