//! The harness's clock, percentiles, and the backlog gate that keeps publishers a bounded
//! distance ahead of what the worker has applied.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

/// One monotonic time base for the whole run. Times travel inside payloads as nanoseconds
/// since the harness started, so a timestamp taken by one simulated agent and read by another
/// task is comparable without any wall clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    /// Nanoseconds since the clock was made; never 0, so 0 can mean "not stamped".
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency percentiles over `samples` observations, by the nearest-rank method on a sorted
/// vector: p99 is the smallest value that at least 99% of the samples do not exceed. With
/// fewer than 1,000 samples p99.9 is the maximum; the sample count says how far to trust it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Percentiles of latencies given in nanoseconds; `None` without any sample.
    pub fn from_nanos(mut samples: Vec<u64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let ms = |ns: u64| ns as f64 / 1e6;
        Some(Self {
            samples: samples.len(),
            p50_ms: ms(nearest_rank(&samples, 0.50)),
            p99_ms: ms(nearest_rank(&samples, 0.99)),
            p999_ms: ms(nearest_rank(&samples, 0.999)),
            max_ms: ms(samples[samples.len() - 1]),
        })
    }
}

/// The value at quantile `q` of a sorted, non-empty slice.
fn nearest_rank(sorted: &[u64], q: f64) -> u64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Events per second over a span given in nanoseconds; 0 for an empty span.
pub fn per_second(count: u64, span_ns: u64) -> f64 {
    if span_ns == 0 {
        0.0
    } else {
        count as f64 / (span_ns as f64 / 1e9)
    }
}

/// Seconds in a span of nanoseconds.
pub fn seconds(span_ns: u64) -> f64 {
    span_ns as f64 / 1e9
}

/// Holds a producer back while `limit` of its items are admitted but not yet completed.
///
/// Publishing faster than the worker applies only grows the stream's backlog, and then the
/// latency measured is the queue's length, not the worker's. The gate turns "as fast as the
/// worker absorbs" into a closed loop: the producer waits for completions observed on the
/// status stream.
#[derive(Debug)]
pub struct Gate {
    admitted: AtomicU64,
    completed: AtomicU64,
    limit: u64,
    notify: Notify,
}

impl Gate {
    pub fn new(limit: u64) -> Self {
        Self {
            admitted: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            limit: limit.max(1),
            notify: Notify::new(),
        }
    }

    /// Waits until fewer than `limit` admitted items are incomplete, then admits one more.
    /// Returns `false` if `deadline` passed first.
    pub async fn admit(&self, deadline: Instant) -> bool {
        loop {
            // Registered before the check, so a completion between the check and the wait
            // still wakes this waiter.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let admitted = self.admitted.load(Ordering::Acquire);
            if admitted.saturating_sub(self.completed.load(Ordering::Acquire)) < self.limit {
                self.admitted.fetch_add(1, Ordering::AcqRel);
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // A bounded wait: completions that never come (a lost event) must not hang the
            // producer past its deadline.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(100)), notified).await;
        }
    }

    /// Waits for the next completion, at most `timeout`.
    pub async fn changed(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.notify.notified()).await;
    }

    /// Records `count` completions and wakes waiting producers.
    pub fn complete(&self, count: u64) {
        self.completed.fetch_add(count, Ordering::AcqRel);
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<u64> = (1..=100).map(|ms| ms * 1_000_000).collect();
        let p = Percentiles::from_nanos(samples).expect("samples");
        assert_eq!(p.samples, 100);
        assert_eq!(p.p50_ms, 50.0);
        assert_eq!(p.p99_ms, 99.0);
        assert_eq!(p.p999_ms, 100.0);
        assert_eq!(p.max_ms, 100.0);
        assert!(Percentiles::from_nanos(Vec::new()).is_none());
    }

    #[test]
    fn one_sample_is_every_percentile() {
        let p = Percentiles::from_nanos(vec![2_000_000]).expect("sample");
        assert_eq!((p.p50_ms, p.p99_ms, p.max_ms), (2.0, 2.0, 2.0));
    }

    #[tokio::test]
    async fn the_gate_admits_up_to_its_limit_then_waits_for_completions() {
        let gate = Gate::new(2);
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(gate.admit(soon).await);
        assert!(gate.admit(soon).await);
        assert!(!gate.admit(soon).await, "a third item waits");
        gate.complete(1);
        assert!(gate.admit(Instant::now() + Duration::from_millis(50)).await);
    }
}
