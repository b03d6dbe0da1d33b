//! Logging (readable text for people by default, JSON lines for machines) and the metrics
//! recorder behind `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Buckets of every `_seconds` histogram: from a tenth of a millisecond (a handler on a warm
/// path) to a minute (a long session).
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// The Prometheus recorder, installed on first use. Several workers in one process (tests)
/// share it, as they share the process's metrics.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first; metrics then go there.
        drop(metrics::set_global_recorder(recorder));
        handle
    })
}

use crate::config::{LogFormat, LogSettings, TraceSettings};

/// Keeps the trace exporter alive; dropping it flushes the spans still buffered.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("opscore: flushing traces at exit failed: {error}");
        }
    }
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("traces.otlp_endpoint: {0}")]
pub struct TelemetryError(String);

/// Installs the global subscriber: logs in the configured format, and spans exported over
/// OTLP/HTTP when `traces.otlp_endpoint` is set. `RUST_LOG`, when set, overrides the level.
pub fn init(
    settings: &LogSettings,
    format: Option<LogFormat>,
    traces: &TraceSettings,
) -> Result<TelemetryGuard, TelemetryError> {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format.unwrap_or(settings.format) {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };

    let mut guard = TelemetryGuard::default();
    let spans = if traces.otlp_endpoint.is_empty() {
        None
    } else {
        use opentelemetry_otlp::WithExportConfig;

        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(&traces.otlp_endpoint)
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(traces.service_name.clone())
            .build();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("opscore");
        guard.provider = Some(provider);
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    };

    // A second initialisation (tests running several workers in one process) keeps the first.
    drop(
        tracing_subscriber::registry()
            .with(filter)
            .with(logs)
            .with(spans)
            .try_init(),
    );
    Ok(guard)
}

/// Makes `span` a child of the W3C `traceparent` it is given, so that exported spans join the
/// caller's trace. Without an exporter this changes nothing visible.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    struct Carrier<'a>(&'a str);
    impl opentelemetry::propagation::Extractor for Carrier<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == crate::trace::HEADER).then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec![crate::trace::HEADER]
        }
    }

    let propagator = opentelemetry_sdk::propagation::TraceContextPropagator::new();
    let context = propagator.extract(&Carrier(traceparent));
    // Fails only when the span is disabled or already has a parent.
    drop(span.set_parent(context));
}
