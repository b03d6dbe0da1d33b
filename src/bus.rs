//! NATS: the connection, the JetStream streams and consumer opscore relies on, and publishing
//! with JetStream acknowledgements.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{ConnectOptions, HeaderMap};
use futures::future::join_all;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{NatsSettings, Settings};
use crate::outbox::OutboxMessage;
use crate::subjects;

pub const EVENTS_STREAM: &str = "OPSCORE_EVENTS";
pub const DISPATCH_STREAM: &str = "OPSCORE_DISPATCH";
pub const STATUS_STREAM: &str = "OPSCORE_STATUS";
pub const DLQ_STREAM: &str = "OPSCORE_DLQ";

/// A NATS failure, by the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("nats: cannot read credentials file {path}: {source}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nats: cannot connect to {servers}: {source}")]
    Connect {
        servers: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("nats: invalid server address {0}")]
    Address(String),
    #[error("jetstream: stream {stream}: {source}")]
    Stream {
        stream: &'static str,
        #[source]
        source: async_nats::Error,
    },
    #[error("jetstream: consumer {consumer}: {source}")]
    Consumer {
        consumer: String,
        #[source]
        source: async_nats::Error,
    },
}

/// Connects with the configured authentication, TLS and ping interval. Connection changes are
/// logged at info: they are what an operator acts on.
pub async fn connect(settings: &NatsSettings) -> Result<async_nats::Client, BusError> {
    let mut options = if !settings.credentials_file.is_empty() {
        ConnectOptions::with_credentials_file(&settings.credentials_file)
            .await
            .map_err(|source| BusError::Credentials {
                path: settings.credentials_file.clone(),
                source,
            })?
    } else if settings.nkey_seed.is_set() {
        ConnectOptions::with_nkey(settings.nkey_seed.expose().to_owned())
    } else if settings.token.is_set() {
        ConnectOptions::with_token(settings.token.expose().to_owned())
    } else if !settings.user.is_empty() {
        ConnectOptions::with_user_and_password(
            settings.user.clone(),
            settings.password.expose().to_owned(),
        )
    } else {
        ConnectOptions::new()
    };
    if !settings.tls_ca_file.is_empty() {
        options = options.add_root_certificates(settings.tls_ca_file.clone().into());
    }
    if !settings.tls_cert_file.is_empty() {
        options = options.add_client_certificate(
            settings.tls_cert_file.clone().into(),
            settings.tls_key_file.clone().into(),
        );
    }
    let servers = settings
        .servers
        .iter()
        .map(|s| {
            s.parse()
                .map_err(|_| BusError::Address(crate::config::redact_url(s)))
        })
        .collect::<Result<Vec<async_nats::ServerAddr>, _>>()?;
    options
        .name(&settings.name)
        .require_tls(settings.tls_required)
        .ping_interval(settings.ping_interval())
        .connection_timeout(Duration::from_secs(settings.connect_timeout_secs))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => {
                    metrics::counter!("opscore_nats_connects_total").increment(1);
                    info!("nats connected");
                }
                async_nats::Event::Disconnected => {
                    metrics::counter!("opscore_nats_disconnects_total").increment(1);
                    warn!("nats disconnected");
                }
                other => info!(event = %other, "nats event"),
            }
        })
        .connect(servers)
        .await
        .map_err(|source| BusError::Connect {
            servers: settings.servers_for_log(),
            source,
        })
}

fn stream_config(
    name: &'static str,
    subject: &str,
    max_age_secs: u64,
    settings: &Settings,
) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        max_age: Duration::from_secs(max_age_secs),
        storage: stream::StorageType::File,
        num_replicas: settings.streams.replicas,
        duplicate_window: Duration::from_secs(settings.streams.duplicate_window_secs),
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// Creates or updates the four streams; safe to run from every worker at every start.
pub async fn ensure_streams(
    jetstream: &jetstream::Context,
    settings: &Settings,
) -> Result<(), BusError> {
    let streams = &settings.streams;
    let configs = [
        (
            EVENTS_STREAM,
            subjects::AGENT_EVENTS,
            streams.events_max_age_secs,
        ),
        (
            DISPATCH_STREAM,
            subjects::DISPATCH_ALL,
            streams.dispatch_max_age_secs,
        ),
        (
            STATUS_STREAM,
            subjects::STATUS_ALL,
            streams.status_max_age_secs,
        ),
        (DLQ_STREAM, subjects::DLQ_ALL, streams.dlq_max_age_secs),
    ];
    for (name, subject, max_age) in configs {
        jetstream
            .create_or_update_stream(stream_config(name, subject, max_age, settings))
            .await
            .map_err(|source| BusError::Stream {
                stream: name,
                source: source.into(),
            })?;
    }
    Ok(())
}

/// The durable pull consumer on `OPSCORE_EVENTS` that every worker instance shares.
pub async fn events_consumer(
    jetstream: &jetstream::Context,
    settings: &Settings,
) -> Result<consumer::PullConsumer, BusError> {
    let worker = &settings.worker;
    let error = |source: async_nats::Error| BusError::Consumer {
        consumer: worker.consumer.clone(),
        source,
    };
    let stream = jetstream
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| error(e.into()))?;
    let config = consumer::pull::Config {
        durable_name: Some(worker.consumer.clone()),
        description: Some("opscore workers: agent events".to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(worker.ack_wait_secs),
        // opscore decides itself when a message is hopeless (dead letters); the server must
        // never drop one after some number of deliveries.
        max_deliver: -1,
        max_ack_pending: (worker.max_in_flight * 4) as i64,
        ..Default::default()
    };
    stream
        .get_or_create_consumer(&worker.consumer, config)
        .await
        .map_err(|e| error(e.into()))
}

/// Pause before a pull is set up again after it failed.
const REPULL_DELAY: Duration = Duration::from_secs(1);

/// Opens the pull stream of a consumer, in batches of `batch`, retrying until it opens; `None`
/// once `shutdown` is cancelled.
pub async fn pull_messages(
    consumer: &consumer::PullConsumer,
    batch: usize,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<consumer::pull::Stream> {
    loop {
        let stream = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        match stream {
            Ok(messages) => return Some(messages),
            Err(error) => {
                warn!(%error, "cannot pull from the consumer; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(REPULL_DELAY) => {}
                }
            }
        }
    }
}

/// A message JetStream did not acknowledge.
#[derive(Debug, thiserror::Error)]
#[error("publish {subject}: {message}")]
pub struct PublishFailed {
    pub subject: String,
    pub message: String,
}

/// Publishes to streams and waits for JetStream's acknowledgement.
#[derive(Debug, Clone)]
pub struct Publisher {
    jetstream: jetstream::Context,
    /// Where the ids of published outbox messages go to be removed in batches; without it,
    /// each flush removes its own.
    cleanup: Option<mpsc::Sender<String>>,
}

/// Outbox ids removed by one command, at most.
const CLEANUP_BATCH: usize = 512;

impl Publisher {
    pub fn new(jetstream: jetstream::Context) -> Self {
        Self {
            jetstream,
            cleanup: None,
        }
    }

    /// Removes published outbox messages in batches from now on: one command for all the
    /// messages published meanwhile instead of one per flush, off the path of the change
    /// that committed them. The returned task ends, after its last batch, once every clone of
    /// this publisher is dropped. A message published and not yet removed is harmless: the
    /// sweeper would publish it again under the same `Nats-Msg-Id`, which JetStream drops.
    pub fn with_outbox_cleanup<O>(mut self, outbox: O) -> (Self, tokio::task::JoinHandle<()>)
    where
        O: crate::repository::Outbox + Send + Sync + 'static,
    {
        let (sender, mut receiver) = mpsc::channel(CLEANUP_BATCH * 4);
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(CLEANUP_BATCH);
            while receiver.recv_many(&mut batch, CLEANUP_BATCH).await > 0 {
                if let Err(error) = outbox.remove_outbox(&batch).await {
                    tracing::debug!(%error, "outbox cleanup failed; the sweeper will publish again");
                }
                batch.clear();
            }
        });
        self.cleanup = Some(sender);
        (self, task)
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Publishes `payload` with `headers`, returning once the stream has stored it.
    pub async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<(), PublishFailed> {
        let failed = |error: &dyn std::fmt::Display| PublishFailed {
            subject: subject.clone(),
            message: error.to_string(),
        };
        let ack = self
            .jetstream
            .publish_with_headers(subject.clone(), headers, payload)
            .await
            .map_err(|e| failed(&e))?;
        ack.await.map(drop).map_err(|e| failed(&e))
    }

    /// Publishes committed messages and forgets those JetStream stored. What fails stays in
    /// the outbox for the sweeper; the change itself is already safe.
    pub async fn flush<O: crate::repository::Outbox>(
        &self,
        outbox: &O,
        messages: &[OutboxMessage],
    ) {
        if messages.is_empty() {
            return;
        }
        let mut published = self.publish_outbox(messages).await;
        if let Some(cleanup) = &self.cleanup {
            // A full queue means removal lags: this flush removes its own, as without one.
            while let Some(id) = published.pop() {
                if let Err(error) = cleanup.try_send(id) {
                    published.push(error.into_inner());
                    break;
                }
            }
        }
        if published.is_empty() {
            return;
        }
        if let Err(error) = outbox.remove_outbox(&published).await {
            tracing::debug!(%error, "outbox cleanup failed; the sweeper will publish again");
        }
    }

    /// Publishes outbox messages concurrently; returns the ids JetStream acknowledged.
    pub async fn publish_outbox(&self, messages: &[OutboxMessage]) -> Vec<String> {
        let publishes = messages.iter().map(|message| async move {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", message.id.as_str());
            headers.insert("Content-Type", "application/cloudevents+json");
            for (name, value) in &message.headers {
                headers.insert(name.as_str(), value.as_str());
            }
            let result = self
                .publish(
                    message.subject.clone(),
                    headers,
                    message.payload.clone().into(),
                )
                .await;
            match result {
                Ok(()) => Some(message.id.clone()),
                Err(error) => {
                    warn!(%error, msg_id = %message.id, "publish failed; the outbox keeps it");
                    None
                }
            }
        });
        join_all(publishes).await.into_iter().flatten().collect()
    }
}
