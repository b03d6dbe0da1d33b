//! The admin HTTP port: `/livez`, `/readyz` and `/metrics` (Prometheus text).
//!
//! Readiness checks what the worker needs to make progress: the NATS connection, Redis, and
//! the streams and consumer. Each check is bounded in time, so a probe answers promptly even
//! while a dependency hangs. Liveness only asks whether the worker's own loops still turn: a
//! dependency outage makes the worker unready, never dead, so an orchestrator does not restart
//! it in a loop while Redis is away.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use axum::Router;
use axum::extract::State as Extract;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::Utc;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus::{DISPATCH_STREAM, DLQ_STREAM, EVENTS_STREAM, STATUS_STREAM};
use crate::repository::Repository;
use crate::telemetry;

/// How long one readiness check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Signs of life from the worker's loops, written by the loops and read by `/livez`.
#[derive(Debug, Default)]
pub struct Loops {
    /// When the timer loop last completed a round (Unix milliseconds).
    timer_tick_ms: AtomicI64,
    intake_running: AtomicBool,
}

impl Loops {
    pub fn timer_ticked(&self) {
        self.timer_tick_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    pub fn set_intake_running(&self, running: bool) {
        self.intake_running.store(running, Ordering::Relaxed);
    }

    /// Alive when the intake runs and the timer loop turned within `stall`.
    fn alive(&self, stall: Duration) -> Result<(), String> {
        if !self.intake_running.load(Ordering::Relaxed) {
            return Err("the intake loop is not running".to_owned());
        }
        let last = self.timer_tick_ms.load(Ordering::Relaxed);
        let idle_ms = Utc::now().timestamp_millis() - last;
        if idle_ms > stall.as_millis() as i64 {
            return Err(format!("the timer loop has not turned for {idle_ms} ms"));
        }
        Ok(())
    }
}

/// What the probes read.
#[derive(Debug)]
pub struct Admin<R> {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub repository: R,
    pub consumer: String,
    pub loops: Arc<Loops>,
    /// How long the timer loop may stay silent before the worker counts as stalled.
    pub stall: Duration,
}

/// Serves the admin port until `shutdown`.
pub async fn serve<R: Repository>(
    admin: Admin<R>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    if let Ok(address) = listener.local_addr() {
        info!(%address, "admin port listening");
    }
    let router = Router::new()
        .route("/livez", get(livez::<R>))
        .route("/readyz", get(readyz::<R>))
        .route("/metrics", get(metrics::<R>))
        .with_state(Arc::new(admin));
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = served {
        warn!(%error, "admin port stopped");
    }
}

async fn livez<R: Repository>(Extract(admin): Extract<Arc<Admin<R>>>) -> impl IntoResponse {
    match admin.loops.alive(admin.stall) {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"alive": true}))),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"alive": false, "reason": reason})),
        ),
    }
}

async fn readyz<R: Repository>(Extract(admin): Extract<Arc<Admin<R>>>) -> impl IntoResponse {
    let checks = admin.checks().await;
    let ready = checks.values().all(|check| check == "ok");
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({"ready": ready, "checks": checks})),
    )
}

async fn metrics<R: Repository>(Extract(admin): Extract<Arc<Admin<R>>>) -> impl IntoResponse {
    admin.refresh_gauges().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::metrics_handle().render(),
    )
}

impl<R: Repository> Admin<R> {
    /// Each dependency with `"ok"` or why it is not.
    async fn checks(&self) -> serde_json::Map<String, Value> {
        let mut checks = serde_json::Map::new();
        let nats = match self.client.connection_state() {
            State::Connected => "ok".to_owned(),
            other => format!("nats is {other:?}").to_lowercase(),
        };
        let nats_up = nats == "ok";
        checks.insert("nats".into(), nats.into());

        let redis = match tokio::time::timeout(CHECK_TIMEOUT, self.repository.ping()).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(error)) => error.to_string(),
            Err(_) => "redis did not answer in time".to_owned(),
        };
        checks.insert("redis".into(), redis.into());

        // Without a connection the stream checks would only wait for their timeout.
        let streams = if nats_up {
            self.check_streams().await
        } else {
            "unknown while nats is down".to_owned()
        };
        checks.insert("streams".into(), streams.into());
        checks
    }

    async fn check_streams(&self) -> String {
        let check = async {
            for name in [EVENTS_STREAM, DISPATCH_STREAM, STATUS_STREAM, DLQ_STREAM] {
                self.jetstream
                    .get_stream_no_info(name)
                    .await
                    .map_err(|e| format!("stream {name}: {e}"))?;
            }
            let mut consumer: jetstream::consumer::PullConsumer = self
                .jetstream
                .get_consumer_from_stream(&self.consumer, EVENTS_STREAM)
                .await
                .map_err(|e| format!("consumer {}: {e}", self.consumer))?;
            let info = consumer
                .info()
                .await
                .map_err(|e| format!("consumer {}: {e}", self.consumer))?;
            metrics::gauge!("opscore_consumer_pending_messages").set(info.num_pending as f64);
            metrics::gauge!("opscore_consumer_unacknowledged_messages")
                .set(info.num_ack_pending as f64);
            Ok::<(), String>(())
        };
        match tokio::time::timeout(CHECK_TIMEOUT, check).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(error)) => error,
            Err(_) => "jetstream did not answer in time".to_owned(),
        }
    }

    /// Sets the fleet-wide gauges from the counters every commit moves, and the consumer lag.
    async fn refresh_gauges(&self) {
        match tokio::time::timeout(CHECK_TIMEOUT, self.repository.counters()).await {
            Ok(Ok(counters)) => {
                for (field, value) in counters {
                    let mut parts = field.splitn(3, ':');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some("agents"), Some(state), None) => {
                            metrics::gauge!("opscore_agents", "state" => state.to_owned())
                                .set(value as f64);
                        }
                        (Some("sessions"), Some(status), None) => {
                            metrics::gauge!("opscore_sessions", "status" => status.to_owned())
                                .set(value as f64);
                        }
                        (Some("tasks"), Some("pending"), Some(reason)) => {
                            metrics::gauge!("opscore_tasks_pending", "reason" => reason.to_owned())
                                .set(value as f64);
                        }
                        _ => {}
                    }
                }
            }
            Ok(Err(error)) => warn!(%error, "gauges not refreshed"),
            Err(_) => warn!("gauges not refreshed: storage did not answer in time"),
        }
        if self.client.connection_state() == State::Connected {
            // Also refreshes the consumer lag gauges.
            self.check_streams().await;
        }
    }
}
