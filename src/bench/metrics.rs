//! The worker's own view of a phase: its histograms and counters, read from `/metrics` on
//! the admin port each worker announces in `$SRV.INFO`, summed over workers, and compared
//! before and after the phase.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Time spent handling one inbound message, from decoding to the acknowledgement decision.
const HANDLER: &str = "opscore_handler_duration_seconds";
/// Time from a task becoming ready to its assignment being published, as the worker sees it.
const DISPATCH: &str = "opscore_dispatch_latency_seconds";
/// Counters whose change says where a phase's work went: retries (contention), repairs by
/// the reconciler (work the event path missed), republished outbox messages.
const COUNTERS: &[&str] = &[
    "opscore_events_total",
    "opscore_reconciler_repairs_total",
    "opscore_tasks_dispatched_total",
    "opscore_task_reports_rejected_total",
    "opscore_tasks_timed_out_total",
    "opscore_outbox_republished_total",
    "opscore_storage_errors_total",
    "opscore_placements_total",
    "opscore_placements_contended_total",
];

/// One Prometheus histogram, summed over every worker that exposes it.
#[derive(Debug, Clone, Default, PartialEq)]
struct Histogram {
    /// Cumulative counts by upper bound in nanoseconds (`u64::MAX` for `+Inf`).
    buckets: BTreeMap<u64, u64>,
    sum: f64,
    count: u64,
}

/// A histogram's change over a window, as the worker measured it.
#[derive(Debug, Clone, Serialize)]
pub struct HistogramDelta {
    pub metric: String,
    pub count: u64,
    pub mean_ms: f64,
    /// Upper bound of the bucket holding the median: the median is at most this.
    pub p50_at_most_ms: Option<f64>,
    pub p99_at_most_ms: Option<f64>,
    /// The sum of observed durations divided by the window: how many were in progress on
    /// average (for the handler, how many lanes were busy).
    pub busy_average: f64,
}

/// Bucket bounds are kept as integer nanoseconds so they can key an ordered map.
fn bound_key(le: &str) -> Option<u64> {
    if le == "+Inf" {
        return Some(u64::MAX);
    }
    le.parse::<f64>().ok().map(|s| (s * 1e9).round() as u64)
}

impl Histogram {
    fn add_line(&mut self, line: &str, metric: &str) {
        let Some(rest) = line.strip_prefix(metric) else {
            return;
        };
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            return;
        };
        if let Some(labels) = rest.strip_prefix("_bucket{") {
            let le = labels
                .split("le=\"")
                .nth(1)
                .and_then(|v| v.split('"').next());
            if let Some(key) = le.and_then(bound_key) {
                *self.buckets.entry(key).or_default() += value as u64;
            }
        } else if rest.starts_with("_sum") {
            self.sum += value;
        } else if rest.starts_with("_count") {
            self.count += value as u64;
        }
    }

    /// What changed since `before`, over a window of `seconds`; `None` if nothing did.
    fn delta(&self, before: &Self, metric: &str, seconds: f64) -> Option<HistogramDelta> {
        let count = self.count.saturating_sub(before.count);
        if count == 0 {
            return None;
        }
        let sum = (self.sum - before.sum).max(0.0);
        let at_most = |q: f64| {
            let wanted = (q * count as f64).ceil() as u64;
            self.buckets
                .iter()
                .map(|(le, n)| (*le, n.saturating_sub(*before.buckets.get(le).unwrap_or(&0))))
                .find(|(_, n)| *n >= wanted)
                .and_then(|(le, _)| (le != u64::MAX).then_some(le as f64 / 1e6))
        };
        Some(HistogramDelta {
            metric: metric.to_owned(),
            count,
            mean_ms: sum / count as f64 * 1e3,
            p50_at_most_ms: at_most(0.50),
            p99_at_most_ms: at_most(0.99),
            busy_average: if seconds > 0.0 { sum / seconds } else { 0.0 },
        })
    }
}

/// The metrics of interest, summed over every worker that answered.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Metrics {
    handler: Histogram,
    dispatch: Histogram,
    /// By series (`name{labels}`).
    counters: BTreeMap<String, f64>,
}

/// What the worker's metrics say about a window.
#[derive(Debug, Clone, Default)]
pub(crate) struct MetricsDelta {
    pub(crate) handler: Option<HistogramDelta>,
    pub(crate) dispatch: Option<HistogramDelta>,
    /// Counter series that moved, by how much.
    pub(crate) counters: BTreeMap<String, f64>,
}

impl Metrics {
    fn add_text(&mut self, text: &str) {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            self.handler.add_line(line, HANDLER);
            self.dispatch.add_line(line, DISPATCH);
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            if COUNTERS.contains(&name)
                && let Ok(value) = value.parse::<f64>()
            {
                *self.counters.entry(series.to_owned()).or_default() += value;
            }
        }
    }

    /// What changed since `before`, over a window of `seconds`.
    pub(crate) fn delta(&self, before: &Self, seconds: f64) -> MetricsDelta {
        MetricsDelta {
            handler: self.handler.delta(&before.handler, HANDLER, seconds),
            dispatch: self.dispatch.delta(&before.dispatch, DISPATCH, seconds),
            counters: self
                .counters
                .iter()
                .map(|(series, n)| {
                    (
                        series.clone(),
                        n - before.counters.get(series).unwrap_or(&0.0),
                    )
                })
                .filter(|(_, moved)| *moved != 0.0)
                .collect(),
        }
    }
}

/// Reads `/metrics` from every admin address; `None` if no worker answered.
pub(crate) async fn scrape(addresses: &[String]) -> Option<Metrics> {
    let mut total = Metrics::default();
    let mut answered = false;
    for address in addresses {
        if let Some(text) = http_get(address, "/metrics").await {
            answered = true;
            total.add_text(&text);
        }
    }
    answered.then_some(total)
}

/// A minimal HTTP/1.0 GET: the admin port is plain HTTP on loopback, and this keeps the
/// harness free of an HTTP client set-up for one request per window.
async fn http_get(address: &str, path: &str) -> Option<String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8(response).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?;
        (status == "200").then(|| body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(fast: u64, slow: u64, retries: u64) -> String {
        format!(
            "# TYPE {HANDLER} histogram\n\
             {HANDLER}_bucket{{le=\"0.001\"}} {fast}\n{HANDLER}_bucket{{le=\"0.01\"}} {}\n\
             {HANDLER}_bucket{{le=\"+Inf\"}} {}\n{HANDLER}_sum {}\n{HANDLER}_count {}\n\
             opscore_events_total{{outcome=\"retry\"}} {retries}\n\
             opscore_events_total{{outcome=\"applied\"}} 7\n",
            fast + slow,
            fast + slow,
            fast as f64 * 0.0005 + slow as f64 * 0.005,
            fast + slow
        )
    }

    fn parse(text: &str) -> Metrics {
        let mut metrics = Metrics::default();
        metrics.add_text(text);
        metrics
    }

    #[test]
    fn histogram_deltas_bound_the_percentiles_by_bucket() {
        let before = parse(&exposition(10, 0, 1));
        let after = parse(&exposition(108, 2, 4));
        let delta = after.delta(&before, 1.0);
        let handler = delta.handler.expect("the handler moved");
        assert_eq!(handler.count, 100);
        assert_eq!(handler.p50_at_most_ms, Some(1.0));
        assert_eq!(handler.p99_at_most_ms, Some(10.0));
        assert!((handler.mean_ms - 0.59).abs() < 1e-9);
        assert!(delta.dispatch.is_none(), "no dispatch histogram");
    }

    #[test]
    fn only_counters_that_moved_are_reported() {
        let delta = parse(&exposition(1, 0, 4)).delta(&parse(&exposition(1, 0, 1)), 1.0);
        let moved: Vec<(&str, f64)> = delta
            .counters
            .iter()
            .map(|(series, n)| (series.as_str(), *n))
            .collect();
        assert_eq!(
            moved,
            vec![("opscore_events_total{outcome=\"retry\"}", 3.0)]
        );
    }
}
