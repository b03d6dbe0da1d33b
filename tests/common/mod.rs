//! The test harness: real nats-server and redis-server processes on free loopback ports, each
//! killed when its handle drops, and helpers that play agents and monitors.
#![allow(dead_code, unreachable_pub)]

pub mod proxy;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use opscore::config::Settings;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any single expected event may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(15);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not open port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A nats-server with JetStream and its own store directory.
pub struct NatsServer {
    pub port: u16,
    store: TempDir,
    /// A configuration file, when started with one, and the environment it reads.
    config: Option<(PathBuf, Vec<(String, String)>)>,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start() -> Self {
        let mut server = Self {
            port: free_port(),
            store: TempDir::new().expect("store dir"),
            config: None,
            child: None,
        };
        server.spawn();
        server
    }

    /// Starts with a configuration file and the environment variables it refers to. Its
    /// monitoring port is dropped, its store moved to a directory of the test, and its
    /// client port overridden on the command line.
    pub fn start_with_config(config: &str, env: &[(&str, &str)]) -> Self {
        let store = TempDir::new().expect("store dir");
        let path = store.path().join("nats-server.conf");
        let config: String = config
            .lines()
            .filter(|line| !line.trim_start().starts_with("http_port"))
            .map(|line| match line.trim_start().starts_with("store_dir") {
                true => format!("  store_dir: {:?}", store.path().join("js")),
                false => line.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&path, config).expect("write config");
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut server = Self {
            port: free_port(),
            store,
            config: Some((path, env)),
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut command =
            Command::new(std::env::var("NATS_SERVER").unwrap_or("nats-server".into()));
        let port = self.port.to_string();
        command.args(["-a", "127.0.0.1", "-p", &port]);
        match &self.config {
            Some((path, env)) => {
                command
                    .arg("-c")
                    .arg(path)
                    .envs(env.iter().map(|(k, v)| (k, v)));
            }
            None => {
                command.args(["-js", "-sd"]).arg(self.store.path());
            }
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on PATH (apt-get install nats-server)");
        self.child = Some(child);
        wait_for_port(self.port, "nats-server");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL); its store survives for [`NatsServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to test nats")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A redis-server that keeps nothing on disk unless asked to.
pub struct RedisServer {
    pub port: u16,
    dir: TempDir,
    append_only: bool,
    /// Further command-line settings, such as ACL users.
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With `append_only`, data survives [`RedisServer::restart`].
    pub fn start_with(append_only: bool) -> Self {
        Self::start_with_args(append_only, &[])
    }

    /// With further redis-server settings on its command line.
    pub fn start_with_args(append_only: bool, extra: &[&str]) -> Self {
        let mut server = Self {
            port: free_port(),
            dir: TempDir::new().expect("redis dir"),
            append_only,
            extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new(std::env::var("REDIS_SERVER").unwrap_or("redis-server".into()))
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
            ])
            .args(["--appendonly", if self.append_only { "yes" } else { "no" }])
            // Every write reaches the disk before Redis answers, so a SIGKILL loses nothing.
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)");
        self.child = Some(child);
        wait_for_port(self.port, "redis-server");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Settings pointing at the test servers, with quick timers, and `overrides` as environment
/// variables (`OPSCORE__SECTION__KEY`) on top.
pub fn settings(
    nats: &NatsServer,
    redis: Option<&RedisServer>,
    overrides: &[(&str, &str)],
) -> Settings {
    let mut env: HashMap<String, String> = [
        ("OPSCORE__NATS__SERVERS", nats.url()),
        ("OPSCORE__NATS__PING_INTERVAL_SECS", "1".into()),
        ("OPSCORE__AGENTS__TIMER_INTERVAL_MS", "100".into()),
        ("OPSCORE__WORKER__RETRY_DELAY_MS", "200".into()),
        (
            "OPSCORE__WORKER__UNKNOWN_AGENT_RETRY_DELAY_MS",
            "100".into(),
        ),
        ("OPSCORE__WORKER__UNKNOWN_AGENT_RETRIES", "2".into()),
        ("OPSCORE__WORKER__SHUTDOWN_GRACE_SECS", "5".into()),
        ("OPSCORE__REDIS__RESPONSE_TIMEOUT_MS", "500".into()),
        ("OPSCORE__REDIS__CONNECT_TIMEOUT_MS", "500".into()),
        // Port 0: the worker picks a free port and announces it in `$SRV.INFO`.
        ("OPSCORE__ADMIN__LISTEN", "127.0.0.1:0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    match redis {
        Some(redis) => env.insert("OPSCORE__REDIS__URL".into(), redis.url()),
        None => env.insert("OPSCORE__STORAGE__BACKEND".into(), "memory".into()),
    };
    for (key, value) in overrides {
        env.insert((*key).to_owned(), (*value).to_owned());
    }
    Settings::load_with_env(None, Some(env)).expect("valid test settings")
}

/// The same settings as environment variables, for a worker run as a child process.
pub fn env_vars(
    nats: &NatsServer,
    redis: &RedisServer,
    overrides: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut vars = vec![
        ("OPSCORE__NATS__SERVERS".to_owned(), nats.url()),
        (
            "OPSCORE__ADMIN__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        (
            "OPSCORE__NATS__PING_INTERVAL_SECS".to_owned(),
            "1".to_owned(),
        ),
        ("OPSCORE__REDIS__URL".to_owned(), redis.url()),
        (
            "OPSCORE__AGENTS__TIMER_INTERVAL_MS".to_owned(),
            "100".to_owned(),
        ),
        (
            "OPSCORE__WORKER__RETRY_DELAY_MS".to_owned(),
            "200".to_owned(),
        ),
        (
            "OPSCORE__WORKER__UNKNOWN_AGENT_RETRY_DELAY_MS".to_owned(),
            "100".to_owned(),
        ),
    ];
    vars.extend(
        overrides
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    vars
}

/// A worker running inside the test process.
pub struct InProcessWorker {
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl InProcessWorker {
    /// Starts the worker and returns once its control API answers.
    pub async fn start(settings: Settings, nats: &NatsServer) -> Self {
        let worker = Self::spawn(|token| opscore::worker::run(settings, token));
        wait_until_serving(nats).await;
        worker
    }

    /// Like [`InProcessWorker::start`], on a repository of the test's own.
    pub async fn start_with<R: opscore::repository::Repository>(
        settings: Settings,
        repository: R,
        nats: &NatsServer,
    ) -> Self {
        let worker = Self::spawn(|token| opscore::worker::run_with(settings, repository, token));
        wait_until_serving(nats).await;
        worker
    }

    /// Like [`InProcessWorker::start`], waiting with a client of the caller's (for servers
    /// that require authentication).
    pub async fn start_as(settings: Settings, client: &async_nats::Client) -> Self {
        let worker = Self::spawn(|token| opscore::worker::run(settings, token));
        wait_for_ping(client).await;
        worker
    }

    fn spawn<F>(run: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: Future<Output = Result<(), opscore::worker::StartError>> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let running = run(shutdown.clone());
        let task = tokio::spawn(async move { running.await.expect("worker runs") });
        Self {
            shutdown,
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("worker stops within the grace period")
                .expect("worker task");
        }
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits until an `opscore` micro service answers `$SRV.PING.opscore`.
pub async fn wait_until_serving(nats: &NatsServer) {
    wait_for_ping(&nats.client().await).await;
}

async fn wait_for_ping(client: &async_nats::Client) {
    let deadline = Instant::now() + WAIT;
    loop {
        let ping = client.request("$SRV.PING.opscore", "".into());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), ping).await {
            return;
        }
        assert!(Instant::now() < deadline, "worker did not start serving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The admin address a worker announces in its `$SRV.INFO` metadata (one worker answers).
pub async fn admin_address(nats: &NatsServer) -> String {
    let client = nats.client().await;
    let reply = client
        .request("$SRV.INFO.opscore", "".into())
        .await
        .expect("$SRV.INFO answers");
    let info: Value = serde_json::from_slice(&reply.payload).expect("json");
    info["metadata"]["admin"]
        .as_str()
        .unwrap_or_else(|| panic!("no admin address in {info}"))
        .to_owned()
}

/// A worker run as a child process of the `opscore` binary, so it can be SIGKILLed.
pub struct ChildWorker {
    child: Child,
    pub log: PathBuf,
    _dir: TempDir,
}

impl ChildWorker {
    pub fn spawn(vars: &[(String, String)]) -> Self {
        let dir = TempDir::new().expect("log dir");
        let log = dir.path().join("worker.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_opscore"))
            .arg("run")
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "opscore=debug,info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn opscore run");
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }

    /// Waits until the worker serves its control API; fails with its log if it exited.
    pub async fn wait_until_serving(&mut self, nats: &NatsServer) {
        let client = nats.client().await;
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "worker exited with {status} before serving:\n{}",
                    self.log_text()
                );
            }
            let ping = client.request("$SRV.PING.opscore", "".into());
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), ping).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not start serving:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Like [`ChildWorker::wait_until_serving`], as an authenticated user.
    pub async fn wait_until_serving_as(&mut self, nats: &NatsServer, user: &str, password: &str) {
        let client =
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                .connect(nats.url())
                .await
                .expect("connect");
        let serving = tokio::time::timeout(WAIT, wait_for_ping(&client)).await;
        assert!(
            serving.is_ok(),
            "worker did not serve:\n{}",
            self.log_text()
        );
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("worker exits")
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        self.child.wait().expect("worker exits")
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Plays an agent: publishes its events to JetStream and waits for the stream's ack.
pub struct AgentClient {
    pub id: String,
    jetstream: jetstream::Context,
}

impl AgentClient {
    pub async fn new(nats: &NatsServer, id: &str) -> Self {
        Self {
            id: id.to_owned(),
            jetstream: jetstream::new(nats.client().await),
        }
    }

    pub async fn publish(&self, suffix: &str, payload: Value) {
        self.publish_raw(
            &format!("opscore.agent.{}.{suffix}", self.id),
            payload.to_string().into_bytes(),
            None,
        )
        .await;
    }

    /// Publishes with a `Nats-Msg-Id`, as a publisher that names its events does.
    pub async fn publish_with_id(&self, suffix: &str, payload: Value, msg_id: &str) {
        self.publish_raw(
            &format!("opscore.agent.{}.{suffix}", self.id),
            payload.to_string().into_bytes(),
            Some(msg_id),
        )
        .await;
    }

    pub async fn publish_raw(&self, subject: &str, payload: Vec<u8>, msg_id: Option<&str>) {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert("Nats-Msg-Id", id);
        }
        self.jetstream
            .publish_with_headers(subject.to_owned(), headers, payload.into())
            .await
            .expect("publish")
            .await
            .expect("stream ack");
    }

    pub async fn register(&self, capabilities: &[&str]) {
        self.publish("register", registration(&self.id, capabilities))
            .await;
    }

    pub async fn report(&self, state: &str, timestamp: &str) {
        self.publish(
            "state",
            json!({"agentId": self.id, "state": state, "timestamp": timestamp}),
        )
        .await;
    }
}

pub fn registration(agent_id: &str, capabilities: &[&str]) -> Value {
    json!({
        "agentId": agent_id,
        "agentName": format!("Agent {agent_id}"),
        "version": "1.0.0",
        "capabilities": capabilities,
        "contactEndpoint": "http://agents.example/agent",
        "metadata": {"team": "tests"},
    })
}

/// A monitor: a live subscription to some subjects, with a bounded wait for what it expects.
pub struct Watcher {
    subscription: async_nats::Subscriber,
    /// Every message received, in order.
    pub seen: Vec<(String, Value)>,
    /// Received messages no expectation has taken yet.
    unclaimed: Vec<(String, Value)>,
}

impl Watcher {
    pub async fn subscribe(nats: &NatsServer, subject: &str) -> Self {
        let client = nats.client().await;
        let subscription = client
            .subscribe(subject.to_owned())
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        Self {
            subscription,
            seen: Vec::new(),
            unclaimed: Vec::new(),
        }
    }

    /// The first message, received earlier or now, whose (subject, JSON body) satisfies
    /// `predicate` and that no earlier expectation took; fails after [`WAIT`].
    pub async fn expect<F>(&mut self, what: &str, predicate: F) -> (String, Value)
    where
        F: Fn(&str, &Value) -> bool,
    {
        if let Some(i) = self.unclaimed.iter().position(|(s, b)| predicate(s, b)) {
            return self.unclaimed.remove(i);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (subject, body) = self.receive(what, deadline).await;
            if predicate(&subject, &body) {
                return (subject, body);
            }
            self.unclaimed.push((subject, body));
        }
    }

    /// The next message from the subscription, as subject and JSON body (dead letters get
    /// their headers under `_headers`).
    async fn receive(&mut self, what: &str, deadline: tokio::time::Instant) -> (String, Value) {
        let message = tokio::time::timeout_at(deadline, self.subscription.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {:#?}", self.seen))
            .expect("subscription open");
        let body: Value = serde_json::from_slice(&message.payload).unwrap_or_else(|_| {
            Value::String(String::from_utf8_lossy(&message.payload).into_owned())
        });
        let subject = message.subject.to_string();
        let headers = message.headers.clone().unwrap_or_default();
        let body = match body {
            Value::Object(mut map) if subject.starts_with("opscore.dlq.") => {
                map.insert("_headers".into(), header_json(&headers));
                Value::Object(map)
            }
            other if subject.starts_with("opscore.dlq.") => {
                json!({"_raw": other, "_headers": header_json(&headers)})
            }
            other => other,
        };
        self.seen.push((subject.clone(), body.clone()));
        (subject, body)
    }

    /// Waits for the agent status event of `kind` for `agent`.
    pub async fn agent_event(&mut self, agent: &str, kind: &str) -> Value {
        let what = format!("{kind} of agent {agent}");
        self.expect(&what, |subject, body| {
            subject == format!("opscore.status.agent.{agent}") && body["data"]["kind"] == kind
        })
        .await
        .1["data"]
            .clone()
    }
}

fn header_json(headers: &async_nats::HeaderMap) -> Value {
    let map: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            (
                name.to_owned(),
                Value::String(
                    values
                        .first()
                        .map(|v| v.as_str().to_owned())
                        .unwrap_or_default(),
                ),
            )
        })
        .collect();
    Value::Object(map)
}

/// Calls the control API.
pub async fn api(
    nats: &NatsServer,
    resource: &str,
    verb: &str,
    request: Value,
) -> Result<Value, opscore::api::ApiError> {
    opscore::api::ApiClient::new(nats.client().await)
        .call(resource, verb, &request)
        .await
}

/// Reads the events consumer's state: how many messages are not yet acknowledged.
pub async fn unacknowledged(nats: &NatsServer) -> (u64, usize) {
    let jetstream = jetstream::new(nats.client().await);
    let mut consumer: jetstream::consumer::PullConsumer = jetstream
        .get_consumer_from_stream("opscore-worker", "OPSCORE_EVENTS")
        .await
        .expect("events consumer");
    let info = consumer.info().await.expect("consumer info");
    (info.num_pending, info.num_ack_pending)
}

/// Waits until the worker has refused at least one event and JetStream redelivered it.
pub async fn wait_for_redelivery(nats: &NatsServer) {
    let jetstream = jetstream::new(nats.client().await);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut consumer: jetstream::consumer::PullConsumer = jetstream
            .get_consumer_from_stream("opscore-worker", "OPSCORE_EVENTS")
            .await
            .expect("events consumer");
        if consumer
            .info()
            .await
            .expect("consumer info")
            .num_redelivered
            > 0
        {
            return;
        }
        assert!(Instant::now() < deadline, "no event was redelivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the events consumer has nothing pending or unacknowledged.
pub async fn wait_until_quiet(nats: &NatsServer) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (pending, ack_pending) = unacknowledged(nats).await;
        if pending == 0 && ack_pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "events still pending: {pending} pending, {ack_pending} unacknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the outbox (default key prefix) is empty: every committed message was
/// published, by the worker that committed it or, when that worker died first, by the sweeper
/// of another once the message's grace period passed.
pub async fn wait_until_outbox_empty(redis: &RedisServer) {
    let mut connection = redis.connection().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kept: u64 = redis::cmd("HLEN")
            .arg("opscore:outbox")
            .query_async(&mut connection)
            .await
            .expect("outbox size");
        if kept == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the outbox still holds {kept} messages"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// RFC 3339 time `secs` seconds after a fixed instant, for ordering state reports.
pub fn ts(secs: i64) -> String {
    (chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").expect("valid")
        + chrono::Duration::seconds(secs))
    .to_utc()
    .to_rfc3339()
}

/// A simulated agent under the test's control: it registers and reports idle, then the test
/// decides what it does with each assignment.
pub struct SimAgent {
    pub agent: AgentClient,
    pub dispatch: async_nats::Subscriber,
}

impl SimAgent {
    pub async fn start(nats: &NatsServer, id: &str, capabilities: &[&str], slots: u32) -> Self {
        let client = nats.client().await;
        let dispatch = client
            .subscribe(format!("opscore.dispatch.{id}"))
            .await
            .expect("subscribe to dispatch");
        client.flush().await.expect("flush");
        let agent = AgentClient::new(nats, id).await;
        let mut registration = registration(id, capabilities);
        registration["maxConcurrentTasks"] = json!(slots);
        agent.publish("register", registration).await;
        agent.report("idle", &chrono::Utc::now().to_rfc3339()).await;
        Self { agent, dispatch }
    }

    /// The next message on the agent's dispatch subject, as (CloudEvent type, data).
    pub async fn next_message(&mut self) -> (String, Value) {
        let message = tokio::time::timeout(WAIT, self.dispatch.next())
            .await
            .unwrap_or_else(|_| panic!("agent {} got no dispatch in time", self.agent.id))
            .expect("dispatch subscription");
        let event: Value = serde_json::from_slice(&message.payload).expect("dispatch is JSON");
        (
            event["type"].as_str().unwrap_or_default().to_owned(),
            event["data"].clone(),
        )
    }

    /// The next assignment; fails on anything else.
    pub async fn next_assignment(&mut self) -> Value {
        let (kind, data) = self.next_message().await;
        assert_eq!(kind, "opscore.task.assigned.v1", "{data}");
        data
    }

    /// Asserts that nothing reaches the dispatch subject within `quiet`.
    pub async fn expect_nothing(&mut self, quiet: Duration) {
        if let Ok(Some(message)) = tokio::time::timeout(quiet, self.dispatch.next()).await {
            panic!(
                "unexpected dispatch: {}",
                String::from_utf8_lossy(&message.payload)
            );
        }
    }

    pub async fn progress(&self, task: &Value) {
        let body =
            json!({"taskId": task["taskId"], "leaseEpoch": task["leaseEpoch"], "details": {}});
        self.agent.publish("task.progress", body).await;
    }

    pub async fn complete(&self, task: &Value, output: Value) {
        let body = json!({"taskId": task["taskId"], "leaseEpoch": task["leaseEpoch"],
            "status": "completed", "output": output});
        self.agent.publish("task.result", body).await;
    }

    pub async fn fail(&self, task: &Value, message: &str, retryable: bool) {
        let body = json!({"taskId": task["taskId"], "leaseEpoch": task["leaseEpoch"],
            "status": "failed", "error": {"message": message, "retryable": retryable}});
        self.agent.publish("task.result", body).await;
    }
}

/// Waits for the session status event of `kind` (e.g. `session.completed`).
pub async fn session_event(watcher: &mut Watcher, session_id: &str, kind: &str) -> Value {
    let subject = format!("opscore.status.session.{session_id}");
    watcher
        .expect(&format!("{kind} of session {session_id}"), |s, body| {
            s == subject && body["data"]["kind"] == kind
        })
        .await
        .1["data"]
        .clone()
}

/// Triggers a workflow through the control API and returns the session id.
pub async fn trigger(nats: &NatsServer, request: Value) -> String {
    let reply = api(nats, "workflow", "trigger", request)
        .await
        .expect("workflow.trigger");
    reply["sessionId"].as_str().expect("sessionId").to_owned()
}

/// The directory holding the shipped sample workflow.
pub fn sample_workflows() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/config/workflows").to_owned()
}

/// An agent that completes every assignment at once, counting what it was given.
pub struct AutoAgent {
    pub id: String,
    /// Every assignment received, as (taskId, attempt).
    pub received: std::sync::Arc<std::sync::Mutex<Vec<(String, u64)>>>,
    task: JoinHandle<()>,
}

impl AutoAgent {
    pub async fn start(nats: &NatsServer, id: &str, capabilities: &[&str], slots: u32) -> Self {
        let mut sim = SimAgent::start(nats, id, capabilities, slots).await;
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = received.clone();
        let agent_id = id.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let Some(message) = sim.dispatch.next().await else {
                    return;
                };
                let event: Value = serde_json::from_slice(&message.payload).unwrap_or_default();
                if event["type"] != "opscore.task.assigned.v1" {
                    continue;
                }
                let task = event["data"].clone();
                let key = (
                    task["taskId"].as_str().unwrap_or_default().to_owned(),
                    task["attempt"].as_u64().unwrap_or_default(),
                );
                log.lock().expect("log").push(key);
                let output = json!({"by": agent_id, "task": task["taskDefinitionId"]});
                sim.complete(&task, output).await;
            }
        });
        Self {
            id: id.to_owned(),
            received,
            task,
        }
    }
}

impl Drop for AutoAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every message a stream holds, as (subject, Nats-Msg-Id, JSON body).
pub async fn stream_messages(nats: &NatsServer, stream: &str) -> Vec<(String, String, Value)> {
    let jetstream = jetstream::new(nats.client().await);
    let stream = jetstream.get_stream(stream).await.expect("stream");
    let state = stream.get_info().await.expect("stream info").state;
    let mut messages = Vec::new();
    if state.messages == 0 {
        return messages;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue;
        };
        let msg_id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let body = serde_json::from_slice(&message.payload).unwrap_or(Value::Null);
        messages.push((message.subject.to_string(), msg_id, body));
    }
    messages
}

/// Waits until every listed session has ended, and returns their final records.
pub async fn wait_for_sessions(nats: &NatsServer, session_ids: &[String]) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sessions = Vec::new();
    for session_id in session_ids {
        loop {
            let reply = api(nats, "session", "get", json!({"sessionId": session_id})).await;
            if let Ok(session) = reply {
                let status = session["status"].as_str().unwrap_or_default();
                if matches!(status, "completed" | "failed" | "cancelled") {
                    sessions.push(session);
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "session {session_id} did not end"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    sessions
}

/// The Prometheus text a worker's `/metrics` serves.
pub async fn metrics_text(url: &str) -> String {
    http()
        .get(url)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body")
}

/// The value of one sample of a Prometheus text, named as exposed (`name{label="value"}`);
/// 0 when the worker has not exposed it yet.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().expect("a sample value"))
}

/// An HTTP client; reqwest is built without a default TLS provider, so install rustls' ring
/// provider first (once per process).
pub fn http() -> reqwest::Client {
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        drop(rustls::crypto::ring::default_provider().install_default());
    });
    reqwest::Client::new()
}
