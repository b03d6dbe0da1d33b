//! What the harness reads of the processes: memory and CPU time from `/proc`, and facts
//! about the machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_process_has_cpu_and_memory_figures() {
        let pid = std::process::id();
        assert!(rss_kib(pid).is_some_and(|kib| kib > 0));
        assert!(peak_rss_kib(pid).is_some());
        assert!(cpu_ticks(pid).is_some());
    }
}
