//! `opscore doctor`: checks the configuration and everything the worker needs, printing each
//! check with a fix when it fails.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;

use crate::bus::{self, DISPATCH_STREAM, DLQ_STREAM, EVENTS_STREAM, STATUS_STREAM};
use crate::config::{Backend, Settings};
use crate::repository::{Health, RedisRepository};
use crate::worker::repository_options;

/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// The oldest nats-server opscore is tested with.
const MIN_SERVER: (u64, u64) = (2, 9);

/// One check's result: what was checked, and the problem with its fix when it failed.
struct Check {
    name: String,
    failure: Option<(String, String)>,
}

impl Check {
    fn ok(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            failure: None,
        }
    }

    fn fail(name: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            failure: Some((problem.into(), fix.into())),
        }
    }

    fn print(&self) {
        match &self.failure {
            None => println!("ok    {}", self.name),
            Some((problem, fix)) => {
                println!("FAIL  {}: {problem}", self.name);
                println!("      fix: {fix}");
            }
        }
    }
}

/// Runs every check; true when all passed.
pub(super) async fn doctor(settings: &Settings) -> bool {
    let mut checks = vec![Check::ok(format!(
        "configuration is valid (storage backend {:?}, {} NATS server(s))",
        settings.storage.backend,
        settings.nats.servers.len()
    ))];
    checks.extend(nats_checks(settings).await);
    if settings.storage.backend == Backend::Redis {
        checks.extend(redis_checks(settings).await);
    }

    for check in &checks {
        check.print();
    }
    let failed = checks.iter().filter(|c| c.failure.is_some()).count();
    if failed == 0 {
        println!("all {} checks passed", checks.len());
    } else {
        println!("{failed} of {} checks failed", checks.len());
    }
    failed == 0
}

async fn nats_checks(settings: &Settings) -> Vec<Check> {
    let servers = settings.nats.servers_for_log();
    let client = match tokio::time::timeout(CHECK_TIMEOUT, bus::connect(&settings.nats)).await {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => {
            return vec![Check::fail(
                "nats connection",
                error.to_string(),
                format!(
                    "check nats.servers ({servers}), that nats-server runs there, and the credentials or TLS settings"
                ),
            )];
        }
        Err(_) => {
            return vec![Check::fail(
                "nats connection",
                format!(
                    "no answer from {servers} within {}s",
                    CHECK_TIMEOUT.as_secs()
                ),
                "check nats.servers and that nothing blocks the port",
            )];
        }
    };
    let mut checks = vec![Check::ok(format!("nats connection to {servers}"))];

    let version = client.server_info().version;
    checks.push(match parse_version(&version) {
        Some(found) if found >= MIN_SERVER => Check::ok(format!("nats-server version {version}")),
        _ => Check::fail(
            "nats-server version",
            format!("{version} is older than {}.{}", MIN_SERVER.0, MIN_SERVER.1),
            "upgrade nats-server",
        ),
    });

    // The raw account-info request, read as plain JSON: its shape differs between server
    // versions, and only the presence of an error matters here.
    let fix = "start nats-server with -js (or jetstream {} in its configuration) and allow this user $JS.API.>";
    let info = tokio::time::timeout(CHECK_TIMEOUT, client.request("$JS.API.INFO", "".into())).await;
    let problem = match info {
        Ok(Ok(reply)) => match serde_json::from_slice::<serde_json::Value>(&reply.payload) {
            Ok(body) if body.get("error").is_none() => None,
            Ok(body) => Some(
                body["error"]["description"]
                    .as_str()
                    .unwrap_or("error")
                    .to_owned(),
            ),
            Err(error) => Some(format!("unreadable reply: {error}")),
        },
        Ok(Err(error)) => Some(error.to_string()),
        Err(_) => Some("no answer".to_owned()),
    };
    if let Some(problem) = problem {
        checks.push(Check::fail("jetstream", problem, fix));
        return checks;
    }
    checks.push(Check::ok("jetstream is enabled for this account"));
    let jetstream = jetstream::new(client.clone());

    for name in [EVENTS_STREAM, DISPATCH_STREAM, STATUS_STREAM, DLQ_STREAM] {
        checks.push(match jetstream.get_stream_no_info(name).await {
            Ok(_) => Check::ok(format!("stream {name}")),
            Err(error) => Check::fail(
                format!("stream {name}"),
                error.to_string(),
                "start `opscore run` once: it creates the streams (the user needs $JS.API.STREAM.>)",
            ),
        });
    }
    let consumer = &settings.worker.consumer;
    let found: Result<jetstream::consumer::PullConsumer, _> = jetstream
        .get_consumer_from_stream(consumer, EVENTS_STREAM)
        .await;
    checks.push(match found {
        Ok(_) => Check::ok(format!("consumer {consumer} on {EVENTS_STREAM}")),
        Err(error) => Check::fail(
            format!("consumer {consumer}"),
            error.to_string(),
            "start `opscore run` once: it creates the consumer (the user needs $JS.API.CONSUMER.>)",
        ),
    });
    checks.push(request_reply(&client).await);
    checks
}

/// Publishes a request on an `opscore.api` subject to itself: the worker needs to subscribe and
/// publish there, and a missing permission shows as the request never arriving.
async fn request_reply(client: &async_nats::Client) -> Check {
    let subject = format!("opscore.api.doctor.{}", uuid::Uuid::new_v4().simple());
    let name = "publish and subscribe on opscore.api.*";
    let fix = "allow this user to publish and subscribe on opscore.> and _INBOX.>";
    let mut subscription = match client.subscribe(subject.clone()).await {
        Ok(subscription) => subscription,
        Err(error) => return Check::fail(name, error.to_string(), fix),
    };
    let responder = async {
        if let Some(request) = subscription.next().await
            && let Some(reply) = request.reply
        {
            client.publish(reply, "ok".into()).await.ok();
        }
    };
    let request = tokio::time::timeout(CHECK_TIMEOUT, client.request(subject, "".into()));
    let (_, answer) = tokio::join!(responder, request);
    match answer {
        Ok(Ok(_)) => Check::ok(name),
        Ok(Err(error)) => Check::fail(name, error.to_string(), fix),
        Err(_) => Check::fail(name, "the request did not come back", fix),
    }
}

async fn redis_checks(settings: &Settings) -> Vec<Check> {
    let redis = &settings.redis;
    let fix = "check redis.url (host, port, database, user and password or TLS) and that redis-server runs";
    let repository = match RedisRepository::connect(
        redis.url.expose(),
        &redis.key_prefix,
        Duration::from_millis(redis.response_timeout_ms),
        Duration::from_millis(redis.connect_timeout_ms),
        repository_options(settings),
    ) {
        Ok(repository) => repository,
        Err(error) => return vec![Check::fail("redis url", error.to_string(), fix)],
    };
    let mut checks = Vec::new();
    match tokio::time::timeout(CHECK_TIMEOUT, repository.ping()).await {
        Ok(Ok(())) => checks.push(Check::ok("redis answers")),
        Ok(Err(error)) => {
            checks.push(Check::fail("redis", error.to_string(), fix));
            return checks;
        }
        Err(_) => {
            checks.push(Check::fail("redis", "no answer in time", fix));
            return checks;
        }
    }
    // Every change is a Lua script writing under the prefix: reading the counters runs the
    // same permission path a worker's reads do, and a script proves EVAL is allowed.
    checks.push(match repository.check_scripts().await {
        Ok(()) => Check::ok(format!("redis runs scripts and writes under {:?}", redis.key_prefix)),
        Err(error) => Check::fail(
            "redis scripts",
            error.to_string(),
            "the Redis user needs EVAL, EVALSHA and SCRIPT, and write access to keys under the prefix",
        ),
    });
    checks
}

/// `"2.10.4"` (or `"v2.9.10-beta"`) as (major, minor).
fn parse_version(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim_start_matches('v').split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_parse() {
        assert_eq!(parse_version("2.9.10"), Some((2, 9)));
        assert_eq!(parse_version("v2.10.0-beta.1"), Some((2, 10)));
        assert_eq!(parse_version("garbage"), None);
    }
}
