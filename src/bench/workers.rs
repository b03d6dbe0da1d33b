//! Worker processes the harness starts itself (`--spawn-worker`): children of the `opscore`
//! binary configured through `OPSCORE__…` variables, each scenario with a fresh Redis key
//! prefix so that runs never see each other's data.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tokio::process::{Child, Command};
use tracing::{debug, info, warn};

use super::BenchError;
use crate::bus;
use crate::config::Settings;

/// How long a worker may take to answer `$SRV.PING` after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a worker may take to drain and exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long replies to a `$SRV` request are collected: every instance answers.
const GATHER: Duration = Duration::from_millis(300);

/// What a spawned process runs, configured the same way either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Program {
    /// `opscore run`: the worker under test.
    Worker,
    /// `opscore-bench relay`: the floor scenario's stand-in for a worker (see [`super::relay`]).
    Relay,
}

impl Program {
    /// The micro service its processes answer `$SRV.PING` under.
    fn service(self) -> &'static str {
        match self {
            Self::Worker => "opscore",
            Self::Relay => super::relay::SERVICE,
        }
    }

    /// How its processes are named in the CPU figures.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Worker => "opscore",
            Self::Relay => "relay",
        }
    }
}

/// What every spawned worker of a run shares.
#[derive(Debug, Clone)]
pub(crate) struct SpawnConfig {
    pub(crate) binary: PathBuf,
    pub(crate) nats_url: String,
    pub(crate) redis_url: String,
    pub(crate) run_id: String,
    /// Where each worker's log goes (`<label>-<n>.log`).
    pub(crate) log_dir: PathBuf,
    /// The workers' `RUST_LOG`.
    pub(crate) log_level: String,
    /// The `opscore-bench` binary serving relays; `None`: the running one.
    pub(crate) relay_binary: Option<PathBuf>,
}

impl SpawnConfig {
    /// The durable consumer every worker of this run shares.
    pub(crate) fn consumer(&self) -> String {
        format!("opscore-bench-{}", self.run_id)
    }

    /// The environment of a worker for scenario `label`, with `extra` on top.
    fn env(&self, label: &str, extra: &[(&str, String)]) -> Vec<(String, String)> {
        let mut env = vec![
            ("OPSCORE__NATS__SERVERS", self.nats_url.clone()),
            ("OPSCORE__REDIS__URL", self.redis_url.clone()),
            (
                "OPSCORE__REDIS__KEY_PREFIX",
                format!("opscore-bench:{}:{label}:", self.run_id),
            ),
            ("OPSCORE__WORKER__CONSUMER", self.consumer()),
            // Port 0: several workers on one machine; each announces its port in `$SRV.INFO`.
            ("OPSCORE__ADMIN__LISTEN", "127.0.0.1:0".to_owned()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    /// Starts `opscore <subcommand>` with the environment of scenario `label` and `extra`,
    /// its stderr in `<log_name>.log` under the run's directory.
    pub(crate) fn spawn(
        &self,
        subcommand: &str,
        label: &str,
        log_name: &str,
        extra: &[(&str, String)],
    ) -> Result<(Child, PathBuf), BenchError> {
        self.spawn_binary(&self.binary, subcommand, label, log_name, extra)
    }

    /// Starts `program` as [`SpawnConfig::spawn`] starts `opscore run`.
    fn spawn_program(
        &self,
        program: Program,
        label: &str,
        log_name: &str,
        extra: &[(&str, String)],
    ) -> Result<(Child, PathBuf), BenchError> {
        match program {
            Program::Worker => self.spawn("run", label, log_name, extra),
            Program::Relay => {
                let harness = match &self.relay_binary {
                    Some(binary) => binary.clone(),
                    None => std::env::current_exe().map_err(|source| BenchError::Io {
                        what: "find the harness's own binary".to_owned(),
                        source,
                    })?,
                };
                self.spawn_binary(&harness, "relay", label, log_name, extra)
            }
        }
    }

    fn spawn_binary(
        &self,
        binary: &Path,
        subcommand: &str,
        label: &str,
        log_name: &str,
        extra: &[(&str, String)],
    ) -> Result<(Child, PathBuf), BenchError> {
        let log = self.log_dir.join(format!("{log_name}.log"));
        let file = std::fs::File::create(&log).map_err(|source| BenchError::Io {
            what: format!("create {}", log.display()),
            source,
        })?;
        let child = Command::new(binary)
            .arg(subcommand)
            .envs(self.env(label, extra))
            .env("RUST_LOG", &self.log_level)
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| BenchError::Io {
                what: format!("start {} {subcommand}", binary.display()),
                source,
            })?;
        Ok((child, log))
    }

    /// Creates the streams and the run's durable consumer before any worker starts.
    ///
    /// A consumer the worker created itself would deliver the events stream from its first
    /// message, replaying every earlier run on the same server. The harness creates it first,
    /// delivering only new messages, with the settings the worker would use (the child loads
    /// the same defaults and environment); the worker then finds and uses it.
    pub(crate) async fn prepare(&self, client: &async_nats::Client) -> Result<(), BenchError> {
        let mut env: HashMap<String, String> = std::env::vars()
            .filter(|(key, _)| key.starts_with("OPSCORE__"))
            .collect();
        env.extend(self.env("prepare", &[]));
        let settings = Settings::load_with_env(None, Some(env)).map_err(BenchError::Config)?;
        let jetstream = jetstream::new(client.clone());
        bus::ensure_streams(&jetstream, &settings)
            .await
            .map_err(|e| BenchError::nats("create the opscore streams", e))?;
        let stream = jetstream
            .get_stream(bus::EVENTS_STREAM)
            .await
            .map_err(|e| BenchError::nats("read the events stream", e))?;
        let worker = &settings.worker;
        let config = consumer::pull::Config {
            durable_name: Some(worker.consumer.clone()),
            description: Some("opscore-bench workers: agent events".to_owned()),
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(worker.ack_wait_secs),
            max_deliver: -1,
            max_ack_pending: (worker.max_in_flight * 4) as i64,
            ..Default::default()
        };
        stream
            .create_consumer(config)
            .await
            .map_err(|e| BenchError::nats("create the run's events consumer", e))?;
        Ok(())
    }

    /// Deletes the run's consumer once every scenario is over.
    pub(crate) async fn cleanup(&self, client: &async_nats::Client) {
        let jetstream = jetstream::new(client.clone());
        if let Ok(stream) = jetstream.get_stream(bus::EVENTS_STREAM).await
            && let Err(error) = stream.delete_consumer(&self.consumer()).await
        {
            debug!(%error, "deleting the run's consumer");
        }
    }
}

/// Worker processes (or relays) started for one scenario.
#[derive(Debug)]
pub(crate) struct WorkerSet {
    program: Program,
    children: Vec<Child>,
    logs: Vec<PathBuf>,
}

impl WorkerSet {
    /// Starts `count` processes of `program` for scenario `label` and waits until all of
    /// them serve.
    pub(crate) async fn start(
        config: &SpawnConfig,
        program: Program,
        count: usize,
        label: &str,
        extra: &[(&str, String)],
        client: &async_nats::Client,
    ) -> Result<Self, BenchError> {
        let mut set = Self {
            program,
            children: Vec::new(),
            logs: Vec::new(),
        };
        for n in 0..count {
            let (child, log) =
                config.spawn_program(program, label, &format!("{label}-{n}"), extra)?;
            set.children.push(child);
            set.logs.push(log);
        }
        set.wait_until_serving(client, count).await?;
        info!(
            processes = count,
            program = program.label(),
            label,
            "serving"
        );
        Ok(set)
    }

    pub(crate) fn program(&self) -> Program {
        self.program
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    async fn wait_until_serving(
        &mut self,
        client: &async_nats::Client,
        count: usize,
    ) -> Result<(), BenchError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            for (child, log) in self.children.iter_mut().zip(&self.logs) {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(BenchError::Setup(format!(
                        "worker exited with {status} before serving; see {}",
                        log.display()
                    )));
                }
            }
            let ping = format!("$SRV.PING.{}", self.program.service());
            if gather(client, &ping).await?.len() >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Setup(format!(
                    "{count} workers did not serve within {}s; see {}",
                    START_TIMEOUT.as_secs(),
                    log_list(&self.logs)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every worker with SIGTERM, as an operator would, and kills what is still
    /// running after the grace period.
    pub(crate) async fn stop(mut self) {
        terminate(&mut self.children).await;
    }
}

/// Sends SIGTERM to every child, waits for each, and kills what still runs after
/// [`STOP_TIMEOUT`].
pub(crate) async fn terminate(children: &mut [Child]) {
    for child in children.iter() {
        if let Some(pid) = child.id() {
            let sent = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
            if let Err(error) = sent {
                debug!(%error, pid, "sending SIGTERM");
            }
        }
    }
    for child in children {
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => warn!(%status, "child process exited with an error"),
            Ok(Err(error)) => debug!(%error, "waiting for a child process"),
            Err(_) => {
                warn!("child process did not stop after SIGTERM; killing it");
                if let Err(error) = child.kill().await {
                    debug!(%error, "killing a child process");
                }
            }
        }
    }
}

fn log_list(logs: &[PathBuf]) -> String {
    logs.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sends a `$SRV` request and collects every reply that arrives within [`GATHER`]: with
/// several workers each instance answers, and `request` would keep only the first.
pub(crate) async fn gather(
    client: &async_nats::Client,
    subject: &str,
) -> Result<Vec<serde_json::Value>, BenchError> {
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| BenchError::nats("subscribe to an inbox", e))?;
    client
        .publish_with_reply(subject.to_owned(), inbox, "".into())
        .await
        .map_err(|e| BenchError::nats(format!("publish {subject}"), e))?;
    let mut answers = Vec::new();
    let deadline = tokio::time::Instant::now() + GATHER;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await {
        if let Ok(value) = serde_json::from_slice(&message.payload) {
            answers.push(value);
        }
    }
    Ok(answers)
}

/// The admin addresses the serving workers announce in their `$SRV.INFO` metadata.
pub(crate) async fn admin_addresses(client: &async_nats::Client) -> Vec<String> {
    match gather(client, "$SRV.INFO.opscore").await {
        Ok(infos) => infos
            .iter()
            .filter_map(|info| info["metadata"]["admin"].as_str().map(str::to_owned))
            .collect(),
        Err(error) => {
            debug!(%error, "no $SRV.INFO");
            Vec::new()
        }
    }
}

/// A fresh directory for one run's logs under the system temporary directory.
pub(crate) fn run_dir(run_id: &str) -> Result<PathBuf, BenchError> {
    let dir = std::env::temp_dir().join(format!("opscore-bench-{run_id}"));
    std::fs::create_dir_all(&dir).map_err(|source| BenchError::Io {
        what: format!("create {}", dir.display()),
        source,
    })?;
    Ok(dir)
}

/// Whether `path` looks like an executable file, checked before anything is started.
pub(crate) fn check_binary(path: &Path) -> Result<(), BenchError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(BenchError::Usage(format!(
            "--spawn-worker {}: no such file (build it with cargo build --release --bins)",
            path.display()
        )))
    }
}
