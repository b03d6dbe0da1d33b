//! Configuration: built-in defaults, then an optional file, then `OPSCORE__SECTION__KEY`
//! environment variables, validated before anything connects.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The defaults, compiled in so the binary runs from any directory.
const DEFAULTS: &str = include_str!("../config/default.toml");

/// Why the configuration could not be used. Each message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// A value that must never be printed: passwords, tokens, seeds.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_set() { "\"***\"" } else { "\"\"" })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub nats: NatsSettings,
    pub redis: RedisSettings,
    pub storage: StorageSettings,
    pub streams: StreamSettings,
    pub worker: WorkerSettings,
    pub agents: AgentSettings,
    pub workflows: WorkflowSettings,
    pub admin: AdminSettings,
    pub bridge: BridgeSettings,
    pub traces: TraceSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSettings {
    pub servers: Vec<String>,
    pub name: String,
    pub user: String,
    pub password: Secret,
    pub token: Secret,
    /// An nkey seed (`SU…`); the public key is derived from it.
    pub nkey_seed: Secret,
    pub credentials_file: String,
    pub tls_required: bool,
    pub tls_ca_file: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    pub ping_interval_secs: u64,
    pub connect_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: Secret,
    pub key_prefix: String,
    pub response_timeout_ms: u64,
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Redis,
    Memory,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    pub backend: Backend,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    pub replicas: usize,
    pub events_max_age_secs: u64,
    pub dispatch_max_age_secs: u64,
    pub status_max_age_secs: u64,
    pub dlq_max_age_secs: u64,
    pub duplicate_window_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub consumer: String,
    pub max_in_flight: usize,
    pub ack_wait_secs: u64,
    pub retry_delay_ms: u64,
    pub unknown_agent_retries: u64,
    pub unknown_agent_retry_delay_ms: u64,
    pub max_message_bytes: usize,
    pub max_json_depth: usize,
    pub dedupe_window_secs: u64,
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    pub liveness_timeout_secs: u64,
    pub history_length: usize,
    pub timer_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSettings {
    pub directory: String,
    pub reconcile_interval_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    pub enabled: bool,
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSettings {
    pub listen: String,
    pub api_key: Secret,
    pub webhook_secret: Secret,
    pub signature_window_secs: u64,
    pub agentkit_url: String,
    pub consumer: String,
    pub delivery_attempts: u32,
    pub delivery_initial_delay_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSettings {
    /// OTLP/HTTP traces endpoint; empty disables export.
    pub otlp_endpoint: String,
    pub service_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Settings {
    /// Loads the defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, None)
    }

    /// Like [`Settings::load`], with the environment given as a map instead of read from the
    /// process (tests use this rather than mutating their own environment).
    pub fn load_with_env(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).required(true));
        }

        // `OPSCORE__NATS__PING_INTERVAL_SECS` → `nats.ping_interval_secs`: the prefix separator
        // follows the key separator, so the single `_` inside key names is left alone.
        let environment = config::Environment::with_prefix("OPSCORE")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("nats.servers")
            .try_parsing(true)
            .source(env);
        let settings: Settings = builder.add_source(environment).build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every value that deserialised but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }

        let nats = &self.nats;
        if nats.servers.is_empty()
            || nats
                .servers
                .iter()
                .any(|s| s.parse::<async_nats::ServerAddr>().is_err())
        {
            return Err(invalid(
                "nats.servers",
                "at least one server address is required",
            ));
        }
        let auth_methods = [
            !nats.user.is_empty() || nats.password.is_set(),
            nats.token.is_set(),
            nats.nkey_seed.is_set(),
            !nats.credentials_file.is_empty(),
        ];
        if auth_methods.iter().filter(|set| **set).count() > 1 {
            return Err(invalid(
                "nats.user",
                "set only one of user/password, token, nkey_seed and credentials_file",
            ));
        }
        if nats.password.is_set() && nats.user.is_empty() {
            return Err(invalid("nats.user", "a password needs a user"));
        }
        if nats.tls_cert_file.is_empty() != nats.tls_key_file.is_empty() {
            return Err(invalid(
                "nats.tls_cert_file",
                "a client certificate and its key go together",
            ));
        }
        if !(1..=300).contains(&nats.ping_interval_secs) {
            return Err(invalid("nats.ping_interval_secs", "must be from 1 to 300"));
        }
        if nats.connect_timeout_secs == 0 {
            return Err(invalid("nats.connect_timeout_secs", "must be positive"));
        }

        let url = self.redis.url.expose();
        if self.storage.backend == Backend::Redis
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(invalid(
                "redis.url",
                "must start with redis:// or rediss://",
            ));
        }
        if self.redis.response_timeout_ms == 0 || self.redis.connect_timeout_ms == 0 {
            return Err(invalid(
                "redis.response_timeout_ms",
                "timeouts must be positive",
            ));
        }

        if !(1..=5).contains(&self.streams.replicas) {
            return Err(invalid("streams.replicas", "must be from 1 to 5"));
        }
        let ages = [
            (
                "streams.events_max_age_secs",
                self.streams.events_max_age_secs,
            ),
            (
                "streams.dispatch_max_age_secs",
                self.streams.dispatch_max_age_secs,
            ),
            (
                "streams.status_max_age_secs",
                self.streams.status_max_age_secs,
            ),
            ("streams.dlq_max_age_secs", self.streams.dlq_max_age_secs),
        ];
        if let Some((key, _)) = ages.into_iter().find(|(_, age)| *age == 0) {
            return Err(invalid(key, "must be positive"));
        }
        if self.streams.duplicate_window_secs == 0 {
            return Err(invalid("streams.duplicate_window_secs", "must be positive"));
        }

        let worker = &self.worker;
        if !crate::subjects::is_valid_token(&worker.consumer) {
            return Err(invalid(
                "worker.consumer",
                "must match [A-Za-z0-9_-]{1,128}",
            ));
        }
        if !(1..=10_000).contains(&worker.max_in_flight) {
            return Err(invalid("worker.max_in_flight", "must be from 1 to 10000"));
        }
        if worker.ack_wait_secs == 0 {
            return Err(invalid("worker.ack_wait_secs", "must be positive"));
        }
        if worker.max_message_bytes < 1024 {
            return Err(invalid("worker.max_message_bytes", "must be at least 1024"));
        }
        if !(2..=128).contains(&worker.max_json_depth) {
            return Err(invalid("worker.max_json_depth", "must be from 2 to 128"));
        }

        if self.agents.liveness_timeout_secs == 0 {
            return Err(invalid("agents.liveness_timeout_secs", "must be positive"));
        }
        if !(1..=10_000).contains(&self.agents.history_length) {
            return Err(invalid("agents.history_length", "must be from 1 to 10000"));
        }
        if !(10..=60_000).contains(&self.agents.timer_interval_ms) {
            return Err(invalid(
                "agents.timer_interval_ms",
                "must be from 10 to 60000",
            ));
        }

        if !(1..=86_400).contains(&self.workflows.reconcile_interval_secs) {
            return Err(invalid(
                "workflows.reconcile_interval_secs",
                "must be from 1 to 86400",
            ));
        }
        let directory = &self.workflows.directory;
        if !directory.is_empty() && !Path::new(directory).is_dir() {
            return Err(invalid(
                "workflows.directory",
                format!("{directory} is not a directory"),
            ));
        }

        if self.admin.enabled && self.admin.listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "admin.listen",
                "must be an address such as 127.0.0.1:9090",
            ));
        }
        let bridge = &self.bridge;
        if bridge.listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "bridge.listen",
                "must be an address such as 127.0.0.1:8080",
            ));
        }
        if !crate::subjects::is_valid_token(&bridge.consumer) {
            return Err(invalid(
                "bridge.consumer",
                "must match [A-Za-z0-9_-]{1,128}",
            ));
        }
        if bridge.delivery_attempts == 0 {
            return Err(invalid("bridge.delivery_attempts", "must be at least 1"));
        }
        let otlp = &self.traces.otlp_endpoint;
        if !otlp.is_empty() && !otlp.starts_with("http://") && !otlp.starts_with("https://") {
            return Err(invalid(
                "traces.otlp_endpoint",
                "must start with http:// or https://",
            ));
        }
        if self.traces.service_name.is_empty() {
            return Err(invalid("traces.service_name", "must not be empty"));
        }
        let agentkit = &bridge.agentkit_url;
        if !agentkit.is_empty()
            && !agentkit.starts_with("http://")
            && !agentkit.starts_with("https://")
        {
            return Err(invalid(
                "bridge.agentkit_url",
                "must start with http:// or https://",
            ));
        }
        Ok(())
    }
}

impl NatsSettings {
    /// The server addresses as they may be logged: credentials in a URL are masked.
    pub fn servers_for_log(&self) -> String {
        self.servers
            .iter()
            .map(|server| redact_url(server))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs)
    }
}

impl WorkerSettings {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

impl AgentSettings {
    pub fn liveness_timeout(&self) -> Duration {
        Duration::from_secs(self.liveness_timeout_secs)
    }

    pub fn timer_interval(&self) -> Duration {
        Duration::from_millis(self.timer_interval_ms)
    }
}

/// `scheme://user:password@host` → `scheme://***@host`; other text is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_load_and_validate() {
        let settings = Settings::load_with_env(None, env(&[])).expect("defaults are valid");
        assert_eq!(settings.nats.servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(settings.storage.backend, Backend::Redis);
        assert_eq!(settings.agents.history_length, 50);
    }

    #[test]
    fn environment_overrides_nested_keys_with_underscores() {
        let settings = Settings::load_with_env(
            None,
            env(&[
                ("OPSCORE__NATS__PING_INTERVAL_SECS", "7"),
                ("OPSCORE__REDIS__KEY_PREFIX", "{t}:"),
                ("OPSCORE__STORAGE__BACKEND", "memory"),
                ("OPSCORE__NATS__SERVERS", "nats://a:1,nats://b:2"),
                ("UNRELATED__NATS__NAME", "ignored"),
            ]),
        )
        .expect("valid overrides");
        assert_eq!(settings.nats.ping_interval_secs, 7);
        assert_eq!(settings.redis.key_prefix, "{t}:");
        assert_eq!(settings.storage.backend, Backend::Memory);
        assert_eq!(settings.nats.servers, ["nats://a:1", "nats://b:2"]);
        assert_eq!(settings.nats.name, "opscore");
    }

    #[test]
    fn a_file_overrides_defaults_and_the_environment_overrides_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("opscore.toml");
        std::fs::write(
            &path,
            "[agents]\nliveness_timeout_secs = 3\nhistory_length = 9\n",
        )
        .expect("write");
        let settings = Settings::load_with_env(
            Some(&path),
            env(&[("OPSCORE__AGENTS__HISTORY_LENGTH", "4")]),
        )
        .expect("valid file");
        assert_eq!(settings.agents.liveness_timeout_secs, 3);
        assert_eq!(settings.agents.history_length, 4);
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases = [
            (
                "OPSCORE__NATS__PING_INTERVAL_SECS",
                "0",
                "nats.ping_interval_secs",
            ),
            ("OPSCORE__REDIS__URL", "http://x", "redis.url"),
            ("OPSCORE__WORKER__CONSUMER", "a.b", "worker.consumer"),
            (
                "OPSCORE__STREAMS__EVENTS_MAX_AGE_SECS",
                "0",
                "streams.events_max_age_secs",
            ),
            (
                "OPSCORE__WORKFLOWS__RECONCILE_INTERVAL_SECS",
                "0",
                "workflows.reconcile_interval_secs",
            ),
            (
                "OPSCORE__WORKFLOWS__DIRECTORY",
                "/nonexistent/dir",
                "workflows.directory",
            ),
            ("OPSCORE__ADMIN__LISTEN", "not-an-address", "admin.listen"),
            ("OPSCORE__BRIDGE__LISTEN", "8080", "bridge.listen"),
            (
                "OPSCORE__NATS__SERVERS",
                "nats://bad host:4222",
                "nats.servers",
            ),
            (
                "OPSCORE__AGENTS__HISTORY_LENGTH",
                "0",
                "agents.history_length",
            ),
        ];
        for (var, value, key) in cases {
            let err = Settings::load_with_env(None, env(&[(var, value)]))
                .expect_err("invalid value must be refused");
            match err {
                ConfigError::Invalid { key: named, .. } => assert_eq!(named, key),
                other => panic!("{var}: expected Invalid, got {other}"),
            }
        }
    }

    #[test]
    fn type_errors_and_unknown_keys_name_the_key() {
        let err = Settings::load_with_env(None, env(&[("OPSCORE__AGENTS__HISTORY_LENGTH", "x")]))
            .expect_err("not a number");
        assert!(err.to_string().contains("history_length"), "{err}");
        let err = Settings::load_with_env(None, env(&[("OPSCORE__NATS__PORT", "1")]))
            .expect_err("unknown key");
        assert!(err.to_string().contains("port"), "{err}");
    }

    #[test]
    fn credentials_in_urls_are_masked_for_logs() {
        assert_eq!(redact_url("nats://u:p@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("nats://token@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact_url("h:4222"), "h:4222");
    }

    #[test]
    fn secrets_are_not_printed() {
        let settings = Settings::load_with_env(
            None,
            env(&[
                ("OPSCORE__NATS__TOKEN", "s3cr3t-token"),
                ("OPSCORE__REDIS__URL", "redis://u:hunter2@h:1/0"),
            ]),
        )
        .expect("valid");
        let printed = format!("{settings:?}");
        assert!(!printed.contains("s3cr3t-token"));
        assert!(!printed.contains("hunter2"));
    }
}
