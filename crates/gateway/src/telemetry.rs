//! Telemetry set-up (issue 8): the `[telemetry]` configuration section, OpenTelemetry tracing
//! with OTLP export over HTTP/protobuf, the log formats (text or JSON carrying the trace and span
//! ids), and the probes `/livez` and `/readyz` served on the admin listener.
//!
//! Tracing model: the edge opens one `request` span per request (target [`REQUEST_TARGET`]) and
//! every stage opens a child span named after itself under [`STAGE_TARGET`]: `auth`, `validate`,
//! `decide`, `commit`, and in the background `deliver` (one per push attempt) and `feed` (one per
//! Bulk export). Span fields are limited to what identifies no patient: route templates, resource
//! types, partner ids, feed ids, counts, status codes and outcomes — never an NHS number, a
//! resource id, a name or a free-text reason (Architecture Invariant: no patient identifiers in
//! logs or spans).
//!
//! A missing or unreachable collector never slows or fails a request: spans go to a bounded
//! queue drained by the SDK's batch processor on its own thread; when the queue is full spans are
//! dropped (the SDK logs one warning and the total at shutdown), and failed exports are counted
//! in `caregate_telemetry_export_failures_total` with a rate-limited warning.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::Extension;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use serde::Deserialize;
use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Target of the per-request root span opened by the edge.
pub const REQUEST_TARGET: &str = "caregate::request";
/// Target of the per-stage spans (`auth`, `validate`, `decide`, `commit`, `deliver`, `feed`).
pub const STAGE_TARGET: &str = "caregate::stage";

/// `[telemetry]` as written in the configuration file. Every key is optional; OTLP export is off
/// unless `enabled = true` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySection {
    /// Export traces and metrics over OTLP.
    pub enabled: bool,
    /// The collector's OTLP/HTTP base URL; `/v1/traces` and `/v1/metrics` are appended.
    pub endpoint: String,
    /// The OTLP transport: only `http/protobuf` is built in (no gRPC stack).
    pub protocol: String,
    /// `service.name` of the exported telemetry.
    pub service_name: String,
    /// Share of requests whose traces are exported, 0.0–1.0.
    pub sampling_ratio: f64,
    /// Spans waiting for export at most; beyond it spans are dropped (counted), never waited for.
    pub max_queue_size: usize,
    /// One OTLP export may take this long before it is abandoned.
    pub export_timeout_secs: u64,
    /// How often metrics are pushed over OTLP.
    pub metrics_interval_secs: u64,
    /// How often delivery queue depth/lag are sampled from the store for `/metrics`.
    pub sample_interval_secs: u64,
    /// `text` (human-readable) or `json` (one object per line, with trace and span ids).
    pub log_format: LogFormat,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: default_endpoint(),
            protocol: PROTOCOL_HTTP_PROTOBUF.to_owned(),
            service_name: default_service_name(),
            sampling_ratio: 1.0,
            max_queue_size: 2048,
            export_timeout_secs: 10,
            metrics_interval_secs: 60,
            sample_interval_secs: 15,
            log_format: LogFormat::Text,
        }
    }
}

/// The OTLP default endpoint for HTTP (OpenTelemetry specification, "OTLP Exporter").
fn default_endpoint() -> String {
    "http://localhost:4318".to_owned()
}

fn default_service_name() -> String {
    "caregate".to_owned()
}

const PROTOCOL_HTTP_PROTOBUF: &str = "http/protobuf";

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[telemetry]` after validation and after the standard `OTEL_*` variables were applied.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    /// `Some`: export over OTLP to this base URL.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    pub sampling_ratio: f64,
    pub max_queue_size: usize,
    pub export_timeout: Duration,
    pub metrics_interval: Duration,
    pub sample_interval: Duration,
    pub log_format: LogFormat,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySection::default()
            .settings(|_| None)
            .unwrap_or_else(|_| unreachable_defaults())
    }
}

/// The defaults always validate (tested); this only satisfies the type.
fn unreachable_defaults() -> TelemetrySettings {
    TelemetrySettings {
        otlp_endpoint: None,
        service_name: default_service_name(),
        sampling_ratio: 1.0,
        max_queue_size: 2048,
        export_timeout: Duration::from_secs(10),
        metrics_interval: Duration::from_secs(60),
        sample_interval: Duration::from_secs(15),
        log_format: LogFormat::Text,
    }
}

/// A `[telemetry]` value that cannot be used: the key (or variable) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TelemetryConfigError {
    pub key: String,
    pub message: String,
}

impl TelemetrySection {
    /// Validate, with the standard OpenTelemetry variables taking precedence over the file
    /// (`OTEL_SDK_DISABLED`, `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`,
    /// `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER_ARG`). `env` reads a variable (pure: tests pass
    /// a map; the gateway passes `std::env::var`).
    pub fn settings(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<TelemetrySettings, TelemetryConfigError> {
        let error = |key: &str, message: String| TelemetryConfigError {
            key: key.to_owned(),
            message,
        };
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let mut enabled = self.enabled;
        let mut endpoint = self.endpoint.clone();
        if let Some(value) = env("OTEL_EXPORTER_OTLP_ENDPOINT") {
            enabled = true;
            endpoint = value;
        }
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            enabled = false;
        }
        let protocol = env("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|| self.protocol.clone());
        if protocol != PROTOCOL_HTTP_PROTOBUF {
            return Err(error(
                "telemetry.protocol",
                format!(
                    "`{protocol}` is not supported: only `http/protobuf` is built in (no gRPC stack)"
                ),
            ));
        }
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        if enabled && !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(error(
                "telemetry.endpoint",
                "must be an http:// or https:// URL (the collector's OTLP/HTTP base)".to_owned(),
            ));
        }
        let service_name = env("OTEL_SERVICE_NAME").unwrap_or_else(|| self.service_name.clone());
        if service_name.is_empty() || service_name.len() > 200 {
            return Err(error(
                "telemetry.service_name",
                "must be 1-200 characters".to_owned(),
            ));
        }
        let sampling_ratio = match env("OTEL_TRACES_SAMPLER_ARG") {
            Some(value) => value.trim().parse::<f64>().map_err(|_| {
                error(
                    "OTEL_TRACES_SAMPLER_ARG",
                    "must be a number between 0 and 1".to_owned(),
                )
            })?,
            None => self.sampling_ratio,
        };
        if !(0.0..=1.0).contains(&sampling_ratio) {
            return Err(error(
                "telemetry.sampling_ratio",
                "must be between 0.0 and 1.0".to_owned(),
            ));
        }
        if self.max_queue_size == 0 || self.max_queue_size > 1_000_000 {
            return Err(error(
                "telemetry.max_queue_size",
                "must be between 1 and 1000000".to_owned(),
            ));
        }
        for (key, value) in [
            ("telemetry.export_timeout_secs", self.export_timeout_secs),
            (
                "telemetry.metrics_interval_secs",
                self.metrics_interval_secs,
            ),
            ("telemetry.sample_interval_secs", self.sample_interval_secs),
        ] {
            if value == 0 || value > 3600 {
                return Err(error(key, "must be between 1 and 3600 seconds".to_owned()));
            }
        }
        Ok(TelemetrySettings {
            otlp_endpoint: enabled.then_some(endpoint),
            service_name,
            sampling_ratio,
            max_queue_size: self.max_queue_size,
            export_timeout: Duration::from_secs(self.export_timeout_secs),
            metrics_interval: Duration::from_secs(self.metrics_interval_secs),
            sample_interval: Duration::from_secs(self.sample_interval_secs),
            log_format: self.log_format,
        })
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("telemetry: {0}")]
pub struct TelemetryError(String);

/// The installed telemetry: keep it alive for the process's life and call
/// [`Telemetry::shutdown`] after the runtime stopped (it flushes what is queued, bounded).
#[derive(Debug)]
pub struct Telemetry {
    tracer_provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// Build the tracer provider (OTLP when configured, else spans get ids but go nowhere) and
    /// install the process-wide metrics (Prometheus always, OTLP when configured). Call it
    /// outside the async runtime: the OTLP client is a blocking one owned by the SDK's threads.
    pub fn init(settings: &TelemetrySettings) -> Result<Self, TelemetryError> {
        let metrics = crate::metrics::Metrics::new(settings)
            .map_err(|e| TelemetryError(format!("metrics: {e}")))?;
        crate::metrics::install(metrics);
        let mut builder = SdkTracerProvider::builder().with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build(),
        );
        let exporting = match &settings.otlp_endpoint {
            Some(endpoint) => {
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(http_client(settings.export_timeout)?)
                    .with_endpoint(format!("{endpoint}/v1/traces"))
                    .with_timeout(settings.export_timeout)
                    .build()
                    .map_err(|e| TelemetryError(format!("OTLP span exporter: {e}")))?;
                let processor = BatchSpanProcessor::builder(CountingExporter { inner: exporter })
                    .with_batch_config(
                        BatchConfigBuilder::default()
                            .with_max_queue_size(settings.max_queue_size)
                            .with_max_export_batch_size(settings.max_queue_size.min(512))
                            .with_scheduled_delay(Duration::from_millis(500))
                            .build(),
                    )
                    .build();
                builder = builder
                    .with_span_processor(processor)
                    .with_sampler(Sampler::TraceIdRatioBased(settings.sampling_ratio));
                true
            }
            // No exporter: spans still get trace and span ids (for the logs), nothing is kept.
            None => {
                builder = builder.with_sampler(Sampler::AlwaysOff);
                false
            }
        };
        Ok(Self {
            tracer_provider: builder.build(),
            exporting,
        })
    }

    /// The layers to add to the process's subscriber: OpenTelemetry spans (request and stage
    /// spans only, whatever the log filter says) and the stage latency histograms.
    pub fn layers<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let tracer = self.tracer_provider.tracer("caregate");
        let ours = tracing_subscriber::filter::Targets::new()
            .with_target(REQUEST_TARGET, tracing::Level::INFO)
            .with_target(STAGE_TARGET, tracing::Level::INFO);
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_filter(ours.clone())
            .and_then(crate::metrics::StageTimer.with_filter(ours))
    }

    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Flush and stop the exporters (bounded by their timeouts). Call outside the runtime.
    pub fn shutdown(self) {
        if let Err(error) = self.tracer_provider.shutdown() {
            tracing::debug!(%error, "trace exporter shutdown");
        }
        crate::metrics::global().shutdown();
    }
}

/// The OTLP client: a blocking reqwest client (rustls on aws-lc-rs, like every other client
/// here) built on its own thread, because building or dropping one inside the async runtime
/// panics. It follows no redirects.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::blocking::Client, TelemetryError> {
    std::thread::Builder::new()
        .name("caregate-otlp-client".to_owned())
        .spawn(move || {
            reqwest::blocking::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(2)))
                .redirect(reqwest::redirect::Policy::none())
                .build()
        })
        .map_err(|e| TelemetryError(format!("cannot start a thread: {e}")))?
        .join()
        .map_err(|_| TelemetryError("building the OTLP HTTP client panicked".to_owned()))?
        .map_err(|e| TelemetryError(format!("OTLP HTTP client: {e}")))
}

/// Counts failed span exports (`caregate_telemetry_export_failures_total`) and warns at most once
/// a minute, so a collector that is down is visible without flooding the log.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
}

static LAST_EXPORT_WARNING: AtomicU64 = AtomicU64::new(0);

pub(crate) fn export_failed(signal: &'static str, error: &dyn std::fmt::Display) {
    crate::metrics::global().export_failure(signal);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let last = LAST_EXPORT_WARNING.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST_EXPORT_WARNING
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(signal, %error, "OTLP export failed; telemetry is dropped, requests are not affected (counted in caregate_telemetry_export_failures_total)");
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for CountingExporter<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => crate::metrics::global().spans_exported(spans),
            Err(error) => export_failed("traces", error),
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// JSON log lines: `timestamp`, `level`, `target`, the event's fields (`message` first), the
/// current span's name and, when the event happens inside a traced span, `trace_id` and
/// `span_id` (W3C hex) to find the trace from the log and back.
///
/// The ids come from the OpenTelemetry layer through the subscriber, which a formatter cannot
/// reach while an event is being dispatched (`tracing` hides the current dispatcher then to stop
/// re-entry); so the formatter keeps a weak handle to it, set by [`JsonWithTrace::bind_current`]
/// once the subscriber is installed. Until then lines carry no ids.
#[derive(Debug, Clone, Default)]
pub struct JsonWithTrace {
    dispatch: Arc<std::sync::OnceLock<tracing::dispatcher::WeakDispatch>>,
}

impl JsonWithTrace {
    pub fn new() -> Self {
        Self::default()
    }

    /// Remember the current dispatcher (call right after installing the subscriber).
    pub fn bind_current(&self) {
        tracing::dispatcher::get_default(|dispatch| {
            let _ = self.dispatch.set(dispatch.downgrade());
        });
    }
}

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = serde_json::Map::new();
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        line.insert("timestamp".into(), now.into());
        let metadata = event.metadata();
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        let mut fields = JsonFields(serde_json::Map::new());
        event.record(&mut fields);
        line.extend(fields.0);
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
            let context = self
                .dispatch
                .get()
                .and_then(tracing::dispatcher::WeakDispatch::upgrade)
                .and_then(|dispatch| {
                    tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)
                });
            if let Some(context) = context {
                let otel = context.span();
                let span_context = otel.span_context();
                if span_context.is_valid() {
                    line.insert(
                        "trace_id".into(),
                        span_context.trace_id().to_string().into(),
                    );
                    line.insert("span_id".into(), span_context.span_id().to_string().into());
                }
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Collects an event's fields as JSON values.
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
}

// ---------------------------------------------------------------------------------------------
// Probes (admin listener, unauthenticated, not audited: they carry no patient data).

/// What `/readyz` checks, built by the runtime.
pub struct Readiness {
    /// `Some(reason)` once the store has fail-stopped (it refuses every write until restart).
    pub store_failure: Box<dyn Fn() -> Option<String> + Send + Sync>,
    /// The decide stage, when `[policy]` is configured: ready only with a bundle in force.
    pub policy: Option<Arc<crate::policy_stage::PolicyStage>>,
    /// Turns true when shutdown begins: the listeners stop accepting.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").finish_non_exhaustive()
    }
}

impl Readiness {
    /// `Err(reason)`: a short, fixed reason (no internal detail, no data).
    pub fn check(&self) -> Result<(), &'static str> {
        if *self.stopping.borrow() {
            return Err("shutting down: listeners are draining");
        }
        if (self.store_failure)().is_some() {
            return Err("store failed (fail-stop): writes are refused until restart");
        }
        if let Some(policy) = &self.policy
            && policy.version().is_empty()
        {
            return Err("no policy bundle in force");
        }
        Ok(())
    }
}

/// `GET /livez`: the process is up and its event loop answers (this handler runs on it, and the
/// metrics sampler's heartbeat — a task ticking every second — is recent).
pub async fn livez() -> Response {
    match crate::metrics::global().heartbeat_age() {
        Some(age) if age > Duration::from_secs(30) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "unhealthy", "reason": "event loop stalled" })),
        )
            .into_response(),
        _ => Json(serde_json::json!({ "status": "ok" })).into_response(),
    }
}

/// `GET /readyz`: 200 when the store takes writes, the policy is loaded and the listeners are
/// accepting; 503 with a short JSON reason otherwise.
pub async fn readyz(readiness: Option<Extension<Arc<Readiness>>>) -> Response {
    let Some(Extension(readiness)) = readiness else {
        return Json(serde_json::json!({ "status": "ready" })).into_response();
    };
    match readiness.check() {
        Ok(()) => Json(serde_json::json!({ "status": "ready" })).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "not ready", "reason": reason })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with_env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    /// A log destination the test can read.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_log_lines_carry_the_trace_and_span_ids_of_the_stage() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let captured = Captured::default();
        let writer = captured.clone();
        let json = JsonWithTrace::new();
        // As with export off: nothing sampled, yet the ids exist for the logs.
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::AlwaysOff)
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(json.clone())
                    .with_writer(move || writer.clone()),
            )
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let mut ids = (String::new(), String::new());
        tracing::subscriber::with_default(subscriber, || {
            json.bind_current();
            let span = tracing::info_span!(target: STAGE_TARGET, "commit", records = 2);
            let _entered = span.enter();
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            let context = span.context();
            let otel = context.span();
            ids = (
                otel.span_context().trace_id().to_string(),
                otel.span_context().span_id().to_string(),
            );
            tracing::info!(records = 2, "store batch committed");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["message"], "store batch committed", "{line}");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["records"], 2);
        assert_eq!(line["span"], "commit");
        assert_eq!(line["trace_id"], ids.0.as_str(), "{line}");
        assert_eq!(line["span_id"], ids.1.as_str(), "{line}");
        assert_eq!(ids.0.len(), 32);
    }

    #[test]
    fn readiness_names_shutdown_and_store_failure() {
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = failed.clone();
        let readiness = Readiness {
            store_failure: Box::new(move || {
                flag.load(Ordering::SeqCst).then(|| "failed".to_owned())
            }),
            policy: None,
            stopping,
        };
        assert_eq!(readiness.check(), Ok(()));
        failed.store(true, Ordering::SeqCst);
        assert!(readiness.check().unwrap_err().contains("fail-stop"));
        failed.store(false, Ordering::SeqCst);
        stop.send(true).unwrap();
        assert!(readiness.check().unwrap_err().contains("shutting down"));
    }

    #[test]
    fn telemetry_is_off_by_default() {
        let settings = TelemetrySection::default().settings(|_| None).unwrap();
        assert_eq!(settings.otlp_endpoint, None);
        assert_eq!(settings.log_format, LogFormat::Text);
        assert_eq!(settings, TelemetrySettings::default());
    }

    #[test]
    fn otel_endpoint_variable_enables_export_and_overrides_the_file() {
        let section = TelemetrySection {
            endpoint: "http://file:4318".into(),
            ..TelemetrySection::default()
        };
        let settings = section
            .settings(with_env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_SERVICE_NAME", "caregate-a"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ]))
            .unwrap();
        assert_eq!(
            settings.otlp_endpoint.as_deref(),
            Some("http://collector:4318")
        );
        assert_eq!(settings.service_name, "caregate-a");
        assert!((settings.sampling_ratio - 0.25).abs() < f64::EPSILON);
    }

    #[test]
    fn otel_sdk_disabled_wins() {
        let section = TelemetrySection {
            enabled: true,
            ..TelemetrySection::default()
        };
        let settings = section
            .settings(with_env(&[("OTEL_SDK_DISABLED", "true")]))
            .unwrap();
        assert_eq!(settings.otlp_endpoint, None);
    }

    #[test]
    fn grpc_is_refused_with_the_key_named() {
        let section = TelemetrySection {
            protocol: "grpc".into(),
            ..TelemetrySection::default()
        };
        let error = section.settings(|_| None).unwrap_err();
        assert_eq!(error.key, "telemetry.protocol");
    }

    #[test]
    fn sampling_ratio_outside_zero_to_one_is_refused() {
        let section = TelemetrySection {
            sampling_ratio: 1.5,
            ..TelemetrySection::default()
        };
        assert_eq!(
            section.settings(|_| None).unwrap_err().key,
            "telemetry.sampling_ratio"
        );
        let error = TelemetrySection::default()
            .settings(with_env(&[("OTEL_TRACES_SAMPLER_ARG", "half")]))
            .unwrap_err();
        assert_eq!(error.key, "OTEL_TRACES_SAMPLER_ARG");
    }

    #[test]
    fn enabled_export_needs_an_http_url() {
        let section = TelemetrySection {
            enabled: true,
            endpoint: "collector:4318".into(),
            ..TelemetrySection::default()
        };
        assert_eq!(
            section.settings(|_| None).unwrap_err().key,
            "telemetry.endpoint"
        );
    }
}
