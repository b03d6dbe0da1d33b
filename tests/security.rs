//! The sample nats-server configuration's permissions hold: an agent cannot publish another
//! agent's events or read another agent's dispatches. And no secret reaches the logs.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::json;

const CONFIG: &str = include_str!("../config/nats/nats-server.conf");
const PASSWORDS: &[(&str, &str)] = &[
    ("OPSCORE_NATS_PASSWORD", "worker-secret-7f3a"),
    ("MONITOR_NATS_PASSWORD", "monitor-secret-91c2"),
    ("AGENT_A_NATS_PASSWORD", "agent-a-secret-44d0"),
    ("AGENT_B_NATS_PASSWORD", "agent-b-secret-be17"),
];

async fn agent(nats: &NatsServer, id: &str, password: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(id.to_owned(), password.to_owned())
        .custom_inbox_prefix(format!("_INBOX_{id}"))
        .connect(nats.url())
        .await
        .expect("agent connects")
}

async fn publish(client: &async_nats::Client, subject: String, body: serde_json::Value) {
    async_nats::jetstream::new(client.clone())
        .publish(subject, body.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

#[tokio::test]
async fn agents_are_confined_to_their_own_subjects() {
    let nats = NatsServer::start_with_config(CONFIG, PASSWORDS);
    let redis = RedisServer::start();
    let worker_settings = settings(
        &nats,
        Some(&redis),
        &[
            ("OPSCORE__NATS__USER", "opscore"),
            ("OPSCORE__NATS__PASSWORD", "worker-secret-7f3a"),
        ],
    );
    let monitor = async_nats::ConnectOptions::with_user_and_password(
        "opscore".into(),
        "worker-secret-7f3a".into(),
    )
    .connect(nats.url())
    .await
    .expect("monitor connects");
    let mut status = monitor
        .subscribe("opscore.status.agent.>")
        .await
        .expect("subscribe");
    monitor.flush().await.expect("flush");
    let worker = InProcessWorker::start_as(worker_settings, &monitor).await;

    let a = agent(&nats, "agent-a", "agent-a-secret-44d0").await;
    let b = agent(&nats, "agent-b", "agent-b-secret-be17").await;
    for (client, id) in [(&a, "agent-a"), (&b, "agent-b")] {
        publish(
            client,
            format!("opscore.agent.{id}.register"),
            registration(id, &["job"]),
        )
        .await;
    }

    // agent-a listens on agent-b's dispatch subject and publishes a state for agent-b. The
    // server refuses both; a plain publish still returns Ok on the client, so what is asserted
    // is that nothing arrives.
    let mut stolen = a
        .subscribe("opscore.dispatch.agent-b")
        .await
        .expect("subscribe call returns");
    a.publish(
        "opscore.agent.agent-b.state",
        json!({"agentId": "agent-b", "state": "error", "timestamp": ts(1)})
            .to_string()
            .into(),
    )
    .await
    .expect("a forbidden publish still returns Ok");
    a.flush().await.ok();

    // agent-b's own report is the marker: it is the first state change agent-b gets.
    publish(
        &b,
        "opscore.agent.agent-b.state".into(),
        json!({"agentId": "agent-b", "state": "idle", "timestamp": ts(2)}),
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let message = tokio::time::timeout_at(deadline, status.next())
            .await
            .expect("status")
            .expect("open");
        let event: serde_json::Value = serde_json::from_slice(&message.payload).expect("json");
        let data = &event["data"];
        if data["agentId"] == "agent-b" && data["kind"] == "state_changed" {
            assert_eq!(
                data["state"], "idle",
                "agent-a's forged state never applied"
            );
            break;
        }
    }

    // A task for agent-b reaches agent-b only.
    let mut own = b
        .subscribe("opscore.dispatch.agent-b")
        .await
        .expect("subscribe");
    b.flush().await.expect("flush");
    let api = opscore::api::ApiClient::new(monitor.clone());
    let definition = json!({"id": "sec", "name": "sec", "version": "1",
        "tasks": [{"taskId": "t", "name": "t", "agentCapability": "job"}]});
    api.call(
        "workflow",
        "trigger",
        &json!({"workflowDefinition": definition, "agentId": "agent-b"}),
    )
    .await
    .expect("trigger");
    tokio::time::timeout(WAIT, own.next())
        .await
        .expect("agent-b gets its task")
        .expect("open");
    let leaked = tokio::time::timeout(Duration::from_millis(500), stolen.next()).await;
    assert!(
        !matches!(leaked, Ok(Some(_))),
        "agent-a read agent-b's dispatch"
    );
    worker.stop().await;
}

#[tokio::test]
async fn no_secret_reaches_the_logs() {
    let nats = NatsServer::start_with_config(CONFIG, PASSWORDS);
    let redis = RedisServer::start();
    let redis_password = "redis-secret-0c55";
    let redis_url = format!(
        "redis://default:{redis_password}@127.0.0.1:{}/0",
        redis.port
    );
    let vars = env_vars(
        &nats,
        &redis,
        &[
            ("OPSCORE__NATS__USER", "opscore"),
            ("OPSCORE__NATS__PASSWORD", "worker-secret-7f3a"),
            ("OPSCORE__REDIS__URL", &redis_url),
        ],
    );
    let mut worker = ChildWorker::spawn(&vars);
    worker
        .wait_until_serving_as(&nats, "opscore", "worker-secret-7f3a")
        .await;
    let status = worker.terminate();
    assert!(status.success());
    let log = worker.log_text();
    assert!(log.contains("streams and consumer ready"), "{log}");
    for secret in PASSWORDS.iter().map(|(_, s)| *s).chain([redis_password]) {
        assert!(!log.contains(secret), "a secret in the log:\n{log}");
    }
}

/// Makes a CA and, signed by it, a certificate for `name` valid for 127.0.0.1, with openssl.
/// Returns the paths of the CA certificate, the certificate and its key.
fn certificates(dir: &std::path::Path, name: &str) -> (String, String, String) {
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl on PATH");
        assert!(status.success(), "openssl {args:?}");
    };
    if !dir.join("ca.pem").exists() {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=opscore test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
    }
    let (key, csr, cert) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        &key,
        "-out",
        &csr,
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("extensions");
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        &cert,
    ]);
    let path = |file: &str| dir.join(file).display().to_string();
    (path("ca.pem"), path(&cert), path(&key))
}

#[tokio::test]
async fn the_worker_connects_over_mutual_tls() {
    let dir = tempfile::TempDir::new().expect("certificate dir");
    let (ca, server_cert, server_key) = certificates(dir.path(), "server");
    let (_, client_cert, client_key) = certificates(dir.path(), "client");
    let nats = NatsServer::start_with_config(
        &format!(
            "jetstream {{\n  store_dir: \"js\"\n}}\ntls {{\n  cert_file: {server_cert:?}\n  key_file: {server_key:?}\n  ca_file: {ca:?}\n  verify: true\n}}\n"
        ),
        &[],
    );
    let redis = RedisServer::start();
    let client = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(ca.clone().into())
        .add_client_certificate(client_cert.clone().into(), client_key.clone().into())
        .connect(nats.url())
        .await
        .expect("a client with a certificate connects");

    // Without a certificate the server turns a client away; under TLS 1.3 that happens after
    // the handshake, so the sign is that the client never reaches the server, where a
    // connected one would at once be told that no one serves a subject.
    let without_certificate = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(ca.clone().into())
        .connect(nats.url())
        .await;
    if let Ok(stranger) = without_certificate {
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            stranger.request("opscore.nobody.serves.this", "".into()),
        )
        .await;
        let reached = matches!(
            answer,
            Ok(Err(ref error)) if error.kind() == async_nats::RequestErrorKind::NoResponders
        );
        assert!(!reached, "the server demands a client certificate");
    }

    let worker = InProcessWorker::start_as(
        settings(
            &nats,
            Some(&redis),
            &[
                ("OPSCORE__NATS__TLS_REQUIRED", "true"),
                ("OPSCORE__NATS__TLS_CA_FILE", &ca),
                ("OPSCORE__NATS__TLS_CERT_FILE", &client_cert),
                ("OPSCORE__NATS__TLS_KEY_FILE", &client_key),
            ],
        ),
        &client,
    )
    .await;
    publish(
        &client,
        "opscore.agent.secure.register".to_owned(),
        registration("secure", &["x"]),
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let reply = client
            .request(
                "opscore.api.agent.get",
                json!({"agentId": "secure"}).to_string().into(),
            )
            .await
            .expect("agent.get over TLS");
        let body: serde_json::Value = serde_json::from_slice(&reply.payload).expect("json");
        if body["agentId"] == "secure" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never registered: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await;
}

/// Starts a worker authenticated by `auth` (environment overrides) against a server whose
/// configuration holds `authorization`, and checks it serves; `client` connects as the test.
async fn serves_with(
    authorization: &str,
    auth: &[(&str, &str)],
    client: async_nats::ConnectOptions,
) {
    let nats = NatsServer::start_with_config(
        &format!("jetstream {{\n  store_dir: \"js\"\n}}\n{authorization}\n"),
        &[],
    );
    let redis = RedisServer::start();
    assert!(
        async_nats::connect(nats.url()).await.is_err(),
        "the server refuses clients without credentials"
    );
    let client = client.connect(nats.url()).await.expect("the test connects");
    let worker = InProcessWorker::start_as(settings(&nats, Some(&redis), auth), &client).await;
    let reply = client
        .request("opscore.api.agent.list", json!({}).to_string().into())
        .await
        .expect("agent.list answers");
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).expect("json");
    assert!(body["agents"].is_array(), "{body}");
    worker.stop().await;
}

#[tokio::test]
async fn the_worker_authenticates_with_a_token() {
    serves_with(
        "authorization {\n  token: \"token-5d21\"\n}",
        &[("OPSCORE__NATS__TOKEN", "token-5d21")],
        async_nats::ConnectOptions::with_token("token-5d21".to_owned()),
    )
    .await;
}

#[tokio::test]
async fn the_worker_authenticates_with_an_nkey() {
    let worker_key = nkeys::KeyPair::new_user();
    let test_key = nkeys::KeyPair::new_user();
    let seed = worker_key.seed().expect("seed");
    serves_with(
        &format!(
            "authorization {{\n  users: [\n    {{ nkey: {:?} }}\n    {{ nkey: {:?} }}\n  ]\n}}",
            worker_key.public_key(),
            test_key.public_key()
        ),
        &[("OPSCORE__NATS__NKEY_SEED", &seed)],
        async_nats::ConnectOptions::with_nkey(test_key.seed().expect("seed")),
    )
    .await;
}

#[tokio::test]
async fn the_worker_uses_a_redis_acl_user() {
    let nats = NatsServer::start();
    // The default user is off; `opscore` has exactly the rules docs/operations.md gives.
    let mut args = vec!["--user", "default", "off", "--user", "opscore", "on"];
    args.extend([
        ">redis-secret-0c9e",
        "resetkeys",
        "~opscore:*",
        "resetchannels",
    ]);
    args.extend(
        "-@all +evalsha +script|load +hget +hset +hmget +hgetall +hdel +hincrby \
         +zadd +zrem +zscore +zrange +zrangebylex +zrevrangebylex +zrangebyscore \
         +zremrangebyscore +lpush +ltrim +lrange +get +set +del +multi +exec +ping +select"
            .split_whitespace(),
    );
    let redis = RedisServer::start_with_args(false, &args);
    let mut anonymous = redis.connection().await;
    let refused: Result<String, _> = redis::cmd("PING").query_async(&mut anonymous).await;
    assert!(refused.is_err(), "redis refuses the default user");

    let url = format!(
        "redis://opscore:redis-secret-0c9e@127.0.0.1:{}/0",
        redis.port
    );
    let worker = InProcessWorker::start(
        settings(&nats, Some(&redis), &[("OPSCORE__REDIS__URL", &url)]),
        &nats,
    )
    .await;
    let mut status = Watcher::subscribe(&nats, "opscore.status.>").await;
    let agent = AgentClient::new(&nats, "acl").await;
    agent.register(&["x"]).await;
    status.agent_event("acl", "registered").await;
    // An available agent's commit also looks for waiting sessions.
    agent.report("idle", "2026-01-01T00:00:00Z").await;
    status.agent_event("acl", "state_changed").await;
    worker.stop().await;
}
