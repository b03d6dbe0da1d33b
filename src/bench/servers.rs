//! Private servers for one benchmark run: a nats-server with JetStream in its own store
//! directory and a redis-server that keeps nothing on disk, both on free loopback ports and
//! stopped when the run ends.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tracing::{debug, info};

use super::BenchError;

/// How long a server may take to open its port.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A server process the harness started.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    pub(crate) name: &'static str,
    pub(crate) port: u16,
    child: Child,
}

impl ServerProcess {
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn stop(mut self) {
        // SIGKILL is fine: nothing on these servers outlives the run.
        if let Err(error) = self.child.kill().await {
            debug!(%error, server = self.name, "stopping server");
        }
    }
}

/// The nats-server and redis-server of one run.
#[derive(Debug)]
pub(crate) struct Servers {
    pub(crate) nats: ServerProcess,
    pub(crate) redis: ServerProcess,
    /// Holds the JetStream store; removed when the servers stop.
    dir: PathBuf,
}

impl Servers {
    /// Starts both servers under `dir` (created here, removed by [`Servers::stop`]).
    pub(crate) async fn start(dir: &Path) -> Result<Self, BenchError> {
        let store = dir.join("jetstream");
        std::fs::create_dir_all(&store).map_err(|source| BenchError::Io {
            what: format!("create {}", store.display()),
            source,
        })?;

        let nats_port = free_port()?;
        let mut nats = Command::new("nats-server");
        nats.args([
            "-a",
            "127.0.0.1",
            "-p",
            &nats_port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(&store);
        let nats = spawn("nats-server", nats, nats_port).await?;

        let redis_port = free_port()?;
        let mut redis = Command::new("redis-server");
        redis
            .args(["--bind", "127.0.0.1", "--port", &redis_port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir);
        let redis = match spawn("redis-server", redis, redis_port).await {
            Ok(redis) => redis,
            Err(error) => {
                nats.stop().await;
                return Err(error);
            }
        };
        info!(
            nats_port,
            redis_port, "private nats-server and redis-server started"
        );
        Ok(Self {
            nats,
            redis,
            dir: dir.to_owned(),
        })
    }

    pub(crate) fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.nats.port)
    }

    pub(crate) fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.redis.port)
    }

    /// Stops both servers and removes the JetStream store.
    pub(crate) async fn stop(self) {
        self.nats.stop().await;
        self.redis.stop().await;
        if let Err(error) = std::fs::remove_dir_all(self.dir.join("jetstream")) {
            debug!(%error, "removing the jetstream store");
        }
        info!("private servers stopped");
    }
}

fn free_port() -> Result<u16, BenchError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|source| BenchError::Io {
            what: "find a free loopback port".to_owned(),
            source,
        })
}

async fn spawn(
    name: &'static str,
    mut command: Command,
    port: u16,
) -> Result<ServerProcess, BenchError> {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| BenchError::Io {
            what: format!("start {name} (is it on PATH?)"),
            source,
        })?;
    let mut server = ServerProcess { name, port, child };
    let deadline = Instant::now() + START_TIMEOUT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(BenchError::Setup(format!("{name} exited with {status}")));
        }
        if Instant::now() > deadline {
            server.stop().await;
            return Err(BenchError::Setup(format!(
                "{name} did not open port {port}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(server)
}
