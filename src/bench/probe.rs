//! What the harness reads besides the bus: process memory and CPU time from `/proc`, facts
//! about the machine, and the worker's own histograms from its admin port's `/metrics`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How often the resident set of watched processes is sampled.
const RSS_INTERVAL: Duration = Duration::from_millis(100);

/// A `VmRSS` / `VmHWM` line of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// The peak resident set of a process over its whole life (`VmHWM`), in KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM")
}

/// The resident set of a process now (`VmRSS`), in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// Polls `VmRSS` of some processes in the background and keeps the largest sum seen.
#[derive(Debug)]
pub(crate) struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl RssSampler {
    pub(crate) fn start(pids: Vec<u32>) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (max, token) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(RSS_INTERVAL);
            while token.run_until_cancelled(ticker.tick()).await.is_some() {
                let total: u64 = pids.iter().filter_map(|pid| rss_kib(*pid)).sum();
                max.fetch_max(total, Ordering::Relaxed);
            }
        });
        Self { peak, stop }
    }

    /// Stops sampling; the largest total `VmRSS` seen, in KiB (0 if never read).
    pub(crate) fn finish(self) -> u64 {
        self.stop.cancel();
        self.peak.load(Ordering::Relaxed)
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields that follow start after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Busy and total jiffies of the whole machine, from the first line of `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let values: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// CPU used by one process during a measured window, in cores (1.0 = one core busy).
#[derive(Debug, Clone, Serialize)]
pub struct ProcessCpu {
    pub name: String,
    pub pid: u32,
    pub cores: f64,
}

/// Where the cores went during a measured window.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUse {
    pub wall_seconds: f64,
    pub processes: Vec<ProcessCpu>,
    /// Busy cores of the whole machine, including work that is not part of the benchmark.
    pub machine_busy_cores: f64,
}

/// CPU counters taken at the start of a window; [`CpuWindow::finish`] turns them into use.
#[derive(Debug)]
pub(crate) struct CpuWindow {
    started: Instant,
    processes: Vec<(String, u32, u64)>,
    machine: Option<(u64, u64)>,
}

impl CpuWindow {
    pub(crate) fn start(processes: &[(String, u32)]) -> Self {
        Self {
            started: Instant::now(),
            processes: processes
                .iter()
                .filter_map(|(name, pid)| Some((name.clone(), *pid, cpu_ticks(*pid)?)))
                .collect(),
            machine: machine_ticks(),
        }
    }

    pub(crate) fn finish(self) -> CpuUse {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let hz = clock_ticks();
        let processes = self
            .processes
            .into_iter()
            .filter_map(|(name, pid, before)| {
                let used = cpu_ticks(pid)?.saturating_sub(before) as f64 / hz;
                Some(ProcessCpu {
                    name,
                    pid,
                    cores: used / wall,
                })
            })
            .collect();
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let machine_busy_cores = match (self.machine, machine_ticks()) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                (busy1 - busy0) as f64 / (total1 - total0) as f64 * cores
            }
            _ => 0.0,
        };
        CpuUse {
            wall_seconds: wall,
            processes,
            machine_busy_cores,
        }
    }
}

/// Facts about the machine a run took place on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_mib: u64,
    pub kernel: String,
    /// `/proc/loadavg` when the run started: other work sharing the machine shows here.
    pub load_average: String,
    pub nats_server_version: String,
}

impl Machine {
    pub(crate) fn read(nats: &async_nats::Client) -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        Self {
            nproc: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_default(),
            memory_mib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |kib| kib / 1024),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            load_average: read("/proc/loadavg").trim().to_owned(),
            nats_server_version: nats.server_info().version,
        }
    }
}

/// One Prometheus histogram, summed over every worker that exposes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Histogram {
    /// Cumulative counts by upper bound in seconds, ascending; `+Inf` is the total count.
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

    /// What changed since `before`, over a window of `seconds`.
    pub(crate) fn delta(&self, before: &Self, metric: &str, seconds: f64) -> HistogramDelta {
        let count = self.count.saturating_sub(before.count);
        let sum = (self.sum - before.sum).max(0.0);
        let at_most = |q: f64| {
            let wanted = (q * count as f64).ceil() as u64;
            self.buckets
                .iter()
                .map(|(le, n)| (*le, n.saturating_sub(*before.buckets.get(le).unwrap_or(&0))))
                .find(|(_, n)| count > 0 && *n >= wanted)
                .and_then(|(le, _)| (le != u64::MAX).then_some(le as f64 / 1e6))
        };
        HistogramDelta {
            metric: metric.to_owned(),
            count,
            mean_ms: if count == 0 {
                0.0
            } else {
                sum / count as f64 * 1e3
            },
            p50_at_most_ms: at_most(0.50),
            p99_at_most_ms: at_most(0.99),
            busy_average: if seconds > 0.0 { sum / seconds } else { 0.0 },
        }
    }
}

/// The worker histograms the report shows beside the harness's own measurements.
pub(crate) const HANDLER: &str = "opscore_handler_duration_seconds";
pub(crate) const DISPATCH: &str = "opscore_dispatch_latency_seconds";

/// Reads `metric` from every admin address and sums it; `None` if no worker answered.
pub(crate) async fn scrape(addresses: &[String], metric: &str) -> Option<Histogram> {
    let mut total = Histogram::default();
    let mut answered = false;
    for address in addresses {
        let Some(text) = http_get(address, "/metrics").await else {
            continue;
        };
        answered = true;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            total.add_line(line, metric);
        }
    }
    answered.then_some(total)
}

/// A minimal HTTP/1.0 GET: the admin port is plain HTTP on loopback, and this keeps the
/// harness free of TLS set-up for one request per window.
async fn http_get(address: &str, path: &str) -> Option<String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8(response).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200")
            .then(|| body.to_owned())
            .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_deltas_bound_the_percentiles_by_bucket() {
        let text = |fast: u64, slow: u64| {
            format!(
                "m_bucket{{le=\"0.001\"}} {fast}\nm_bucket{{le=\"0.01\"}} {}\n\
                 m_bucket{{le=\"+Inf\"}} {}\nm_sum {}\nm_count {}\n",
                fast + slow,
                fast + slow,
                fast as f64 * 0.0005 + slow as f64 * 0.005,
                fast + slow
            )
        };
        let parse = |t: String| {
            let mut h = Histogram::default();
            t.lines().for_each(|l| h.add_line(l, "m"));
            h
        };
        let before = parse(text(10, 0));
        let after = parse(text(108, 2));
        let delta = after.delta(&before, "m", 1.0);
        assert_eq!(delta.count, 100);
        assert_eq!(delta.p50_at_most_ms, Some(1.0));
        assert_eq!(delta.p99_at_most_ms, Some(10.0));
        assert!((delta.mean_ms - 0.59).abs() < 1e-9);
    }

    #[test]
    fn the_own_process_has_cpu_and_memory_figures() {
        let pid = std::process::id();
        assert!(rss_kib(pid).is_some_and(|kib| kib > 0));
        assert!(peak_rss_kib(pid).is_some());
        assert!(cpu_ticks(pid).is_some());
    }
}
