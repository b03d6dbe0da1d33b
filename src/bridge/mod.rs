//! `opscore bridge`: the HTTP API of the original Ops-Core service and the AgentKit webhook,
//! relayed over NATS, so that AgentKit deployments and scripts written for that service keep
//! working unchanged.
//!
//! The bridge holds no state of its own and never touches Redis. What agents say (register,
//! deregister, state) is published on their event subjects and acknowledged by JetStream
//! before the HTTP answer; what callers read or ask for (agent state, agent lists, sessions,
//! triggers, cancellations) goes to a running worker through the control API. Assignments for
//! agents registered with a `contactEndpoint` are taken from `OPSCORE_DISPATCH` by a durable
//! consumer and delivered through AgentKit's `run` endpoint. Any number of bridges can run side
//! by side: they share that consumer. `docs/bridge.md` describes the endpoints.
//!
//! | file | owns |
//! |---|---|
//! | `http.rs` | the router, shared state, bearer check, error bodies, request parsing |
//! | `rest.rs` | the bearer endpoints: agent state, workflows, agents, sessions |
//! | `webhook.rs` | the AgentKit registration webhook |
//! | `auth.rs` | the constant-time API key check and the webhook signature |
//! | `agents.rs` | a short-lived cache of agent lookups |
//! | `consumer.rs` | the durable dispatch consumer and its pull loop |
//! | `delivery.rs` | delivery of one assignment to AgentKit, or its failure report |
//! | `openapi.json` | the OpenAPI document served at `/openapi.json` |

mod agents;
mod auth;
mod consumer;
mod delivery;
mod http;
mod rest;
mod webhook;

use std::sync::Arc;

use async_nats::jetstream;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use self::auth::{ApiKey, WebhookSecret};
use crate::api::ApiClient;
use crate::bus::{self, BusError, Publisher};
use crate::config::Settings;

/// Why the bridge could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// A `bridge.*` value that cannot work; nothing was connected.
    #[error("configuration key {key}: {message}")]
    Config { key: &'static str, message: String },
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("http: cannot listen on {address}: {source}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("http: server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("agentkit: cannot build the http client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Runs the bridge on `bridge.listen` until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), BridgeError> {
    validate(&settings)?;
    let address = settings.bridge.listen.clone();
    let listener = TcpListener::bind(&address)
        .await
        .map_err(|source| BridgeError::Listen { address, source })?;
    serve(settings, listener, shutdown).await
}

/// Runs the bridge on a listener the caller bound (tests bind port 0), until `shutdown`.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), BridgeError> {
    validate(&settings)?;
    let bridge = &settings.bridge;
    let api_key = ApiKey::new(bridge.api_key.expose());
    if api_key.is_none() {
        warn!("bridge.api_key is not set: every bearer endpoint answers 401");
    }
    let webhook_secret =
        WebhookSecret::new(bridge.webhook_secret.expose(), bridge.signature_window_secs);
    if webhook_secret.is_none() {
        warn!("bridge.webhook_secret is not set: webhook notifications are accepted unsigned");
    }

    let client = bus::connect(&settings.nats).await?;
    let jetstream = jetstream::new(client.clone());
    // Publishing an agent event needs OPSCORE_EVENTS, and delivery needs OPSCORE_DISPATCH, so
    // the bridge may start before any worker has created them.
    bus::ensure_streams(&jetstream, &settings).await?;
    let publisher = Publisher::new(jetstream.clone());
    let api = ApiClient::new(client.clone());
    let agents = Arc::new(agents::AgentCache::default());

    let deliverer = if bridge.agentkit_url.is_empty() {
        info!("bridge.agentkit_url is not set: assignments are not delivered to http agents");
        None
    } else {
        let consumer = consumer::ensure(&jetstream, &bridge.consumer).await?;
        let deliverer =
            delivery::Deliverer::new(api.clone(), publisher.clone(), agents.clone(), bridge)
                .map_err(BridgeError::Client)?;
        Some((consumer, deliverer))
    };

    let state = Arc::new(http::AppState {
        api,
        client: client.clone(),
        publisher,
        api_key,
        webhook_secret,
        agents,
        limits: crate::envelope::Limits {
            max_bytes: settings.worker.max_message_bytes,
            max_depth: settings.worker.max_json_depth,
        },
    });
    let router = http::router(state, settings.worker.max_message_bytes);
    let local = listener
        .local_addr()
        .map_or_else(|_| settings.bridge.listen.clone(), |a| a.to_string());
    info!(listen = %local, servers = %settings.nats.servers_for_log(), "bridge is running");

    let delivering = deliverer.map(|(consumer, deliverer)| {
        let grace = settings.worker.shutdown_grace();
        let shutdown = shutdown.clone();
        tokio::spawn(
            consumer::run(consumer, deliverer, shutdown, grace).instrument(info_span!("delivery")),
        )
    });

    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    // The server ends on shutdown, or on its own failure; either way delivery stops too.
    shutdown.cancel();
    if let Some(delivering) = delivering
        && let Err(error) = delivering.await
    {
        warn!(%error, "delivery task ended abnormally");
    }
    if let Err(error) = client.flush().await {
        info!(%error, "nats flush at shutdown failed");
    }
    served.map_err(BridgeError::Serve)?;
    info!("bridge stopped");
    Ok(())
}

/// Checks the `bridge.*` keys before anything connects, naming the key at fault.
fn validate(settings: &Settings) -> Result<(), BridgeError> {
    let invalid = |key, message: &str| BridgeError::Config {
        key,
        message: message.to_owned(),
    };
    let bridge = &settings.bridge;
    if !crate::subjects::is_valid_token(&bridge.consumer) {
        return Err(invalid(
            "bridge.consumer",
            "must match [A-Za-z0-9_-]{1,128}",
        ));
    }
    if bridge.delivery_attempts == 0 {
        return Err(invalid("bridge.delivery_attempts", "must be at least 1"));
    }
    if bridge.signature_window_secs == 0 {
        return Err(invalid("bridge.signature_window_secs", "must be positive"));
    }
    if !bridge.agentkit_url.is_empty() {
        let url = reqwest::Url::parse(&bridge.agentkit_url)
            .map_err(|e| invalid("bridge.agentkit_url", &e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(
                "bridge.agentkit_url",
                "must be an http:// or https:// url",
            ));
        }
    }
    Ok(())
}

/// Makes ring the process's rustls crypto provider, as it must be before a reqwest client is
/// built: reqwest is built without a provider of its own so that ring, which NATS already
/// uses, is the only one. Installing it twice (two bridges in one process) is harmless.
pub(crate) fn use_ring_provider() {
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a rustls crypto provider was already installed");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// The defaults, changed after loading: these are checks the bridge makes itself, for
    /// settings that did not come through `Settings::load`.
    fn defaults() -> Settings {
        Settings::load_with_env(None, Some(HashMap::new())).expect("valid defaults")
    }

    #[test]
    fn bridge_keys_that_cannot_work_are_named() {
        type Change = fn(&mut Settings);
        let cases: [(Change, &str); 5] = [
            (|s| s.bridge.consumer = "a.b".into(), "bridge.consumer"),
            (
                |s| s.bridge.delivery_attempts = 0,
                "bridge.delivery_attempts",
            ),
            (
                |s| s.bridge.signature_window_secs = 0,
                "bridge.signature_window_secs",
            ),
            (
                |s| s.bridge.agentkit_url = "ftp://kit".into(),
                "bridge.agentkit_url",
            ),
            (
                |s| s.bridge.agentkit_url = "not a url".into(),
                "bridge.agentkit_url",
            ),
        ];
        for (change, key) in cases {
            let mut settings = defaults();
            change(&mut settings);
            match validate(&settings) {
                Err(BridgeError::Config { key: named, .. }) => assert_eq!(named, key),
                other => panic!("{key}: expected a config error, got {other:?}"),
            }
        }
        let mut fine = defaults();
        fine.bridge.agentkit_url = "https://kit.example/".into();
        assert!(validate(&fine).is_ok());
    }
}
