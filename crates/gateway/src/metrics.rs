//! Metrics (issue 8): one set of OpenTelemetry instruments, read by two exporters — Prometheus
//! text at `GET /metrics` on the admin listener (always), and OTLP when `[telemetry]` enables it.
//!
//! Every metric name is a [`Metric`] variant; the emission points are the typed methods of
//! [`Metrics`]. Labels hold only bounded, non-identifying values: route templates, status
//! classes, stage names, policy rule ids, partner and feed ids. Never a patient identifier.
//!
//! Where each one comes from:
//! - requests by route and status class, and their latency: the partner edge ([`crate::app`]);
//! - latency per stage: [`StageTimer`], a `tracing` layer timing every span under
//!   [`crate::telemetry::STAGE_TARGET`] (so the histogram and the trace measure the same thing);
//! - decisions by rule id: the intake's decide step ([`crate::fhir_api`]);
//! - store commits, commit time and batch size: the SQLite store's counters, sampled every second;
//! - delivery queue depth and lag per partner: `Store::delivery_status`, sampled every
//!   `telemetry.sample_interval_secs` (a query over the delivery table: not run per scrape);
//! - feed exports by outcome and the time of each feed's last export: [`crate::bulk_export`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use tracing::Subscriber;
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::telemetry::TelemetrySettings;

/// Every metric caregate exports, by its Prometheus name (counters get `_total` appended by the
/// exporter, histograms `_bucket`/`_sum`/`_count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    HttpRequests,
    HttpRequestDuration,
    StageDuration,
    PolicyDecisions,
    StoreSubmissions,
    StoreCommits,
    StoreCommitTime,
    StoreBatchSize,
    StoreFailed,
    DeliveryQueueDepth,
    DeliveryLag,
    DeliveryDead,
    FeedExports,
    FeedLastExport,
    TelemetryExportFailures,
    TelemetrySpansExported,
}

impl Metric {
    pub const ALL: [Metric; 16] = [
        Metric::HttpRequests,
        Metric::HttpRequestDuration,
        Metric::StageDuration,
        Metric::PolicyDecisions,
        Metric::StoreSubmissions,
        Metric::StoreCommits,
        Metric::StoreCommitTime,
        Metric::StoreBatchSize,
        Metric::StoreFailed,
        Metric::DeliveryQueueDepth,
        Metric::DeliveryLag,
        Metric::DeliveryDead,
        Metric::FeedExports,
        Metric::FeedLastExport,
        Metric::TelemetryExportFailures,
        Metric::TelemetrySpansExported,
    ];

    /// The instrument name (OpenTelemetry) and, after the exporter's suffixes, the Prometheus one.
    pub const fn name(self) -> &'static str {
        match self {
            Metric::HttpRequests => "caregate_http_requests",
            Metric::HttpRequestDuration => "caregate_http_request_duration_seconds",
            Metric::StageDuration => "caregate_stage_duration_seconds",
            Metric::PolicyDecisions => "caregate_policy_decisions",
            Metric::StoreSubmissions => "caregate_store_submissions",
            Metric::StoreCommits => "caregate_store_commits",
            Metric::StoreCommitTime => "caregate_store_commit_seconds",
            Metric::StoreBatchSize => "caregate_store_batch_size",
            Metric::StoreFailed => "caregate_store_failed",
            Metric::DeliveryQueueDepth => "caregate_delivery_queue_depth",
            Metric::DeliveryLag => "caregate_delivery_lag_seconds",
            Metric::DeliveryDead => "caregate_delivery_dead_letters",
            Metric::FeedExports => "caregate_feed_exports",
            Metric::FeedLastExport => "caregate_feed_last_export_timestamp_seconds",
            Metric::TelemetryExportFailures => "caregate_telemetry_export_failures",
            Metric::TelemetrySpansExported => "caregate_telemetry_spans_exported",
        }
    }
}

/// Latency buckets in seconds: 250 µs to 30 s (a validation is sub-millisecond, a commit a few
/// milliseconds, a push or an export seconds).
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_25, 0.0005, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];
/// Submissions per commit.
const BATCH_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Values sampled from the store by [`spawn_sampler`], read by the observable instruments.
#[derive(Debug, Default)]
struct Sampled {
    store_submissions: u64,
    store_commits: u64,
    store_commit_seconds: f64,
    store_failed: bool,
    /// Per partner: (pending rows, seconds since the oldest pending row committed, dead letters).
    delivery: BTreeMap<String, (u64, f64, u64)>,
    /// Per feed: Unix time of the last successful export's transaction time.
    feed_last_export: BTreeMap<String, f64>,
}

/// The process's instruments. Built once ([`install`] or lazily by [`global`]).
pub struct Metrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    requests: Counter<u64>,
    request_duration: Histogram<f64>,
    stage_duration: Histogram<f64>,
    decisions: Counter<u64>,
    batch_size: Histogram<f64>,
    feed_exports: Counter<u64>,
    export_failures: Counter<u64>,
    spans_exported: Counter<u64>,
    sampled: Arc<Mutex<Sampled>>,
    /// Milliseconds since `epoch` of the sampler's last tick (0: no sampler running).
    heartbeat_ms: AtomicU64,
    epoch: Instant,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// Install the process's metrics (called once by [`crate::telemetry::Telemetry::init`] before
/// anything records). Later calls, or a call after [`global`] built the default, are ignored.
pub fn install(metrics: Metrics) {
    if GLOBAL.set(metrics).is_err() {
        tracing::debug!("metrics already installed");
    }
}

/// The process's metrics; without [`install`], Prometheus only (the gateway started in process,
/// e.g. by the demo).
pub fn global() -> &'static Metrics {
    GLOBAL.get_or_init(|| {
        Metrics::new(&TelemetrySettings::default()).unwrap_or_else(|_| Metrics::bare())
    })
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Metrics {
    /// The instruments, the Prometheus reader, and an OTLP reader when export is configured.
    pub fn new(settings: &TelemetrySettings) -> Result<Self, String> {
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .build()
            .map_err(|e| e.to_string())?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(settings.service_name.clone())
            .build();
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(prometheus);
        if let Some(endpoint) = &settings.otlp_endpoint {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_http_client(
                    crate::telemetry::http_client(settings.export_timeout)
                        .map_err(|e| e.to_string())?,
                )
                .with_endpoint(format!("{endpoint}/v1/metrics"))
                .with_timeout(settings.export_timeout)
                .build()
                .map_err(|e| e.to_string())?;
            builder = builder.with_reader(
                PeriodicReader::builder(CountingMetricExporter { inner: exporter })
                    .with_interval(settings.metrics_interval)
                    .build(),
            );
        }
        Ok(Self::with_provider(builder.build(), registry))
    }

    /// Instruments that record nowhere but `/metrics` is still well-formed (only if the
    /// Prometheus exporter itself could not be built).
    fn bare() -> Self {
        Self::with_provider(
            SdkMeterProvider::builder().build(),
            prometheus::Registry::new(),
        )
    }

    fn with_provider(provider: SdkMeterProvider, registry: prometheus::Registry) -> Self {
        let meter = provider.meter("caregate");
        let sampled = Arc::new(Mutex::new(Sampled::default()));
        register_observers(&meter, &sampled);
        Self {
            requests: meter
                .u64_counter(Metric::HttpRequests.name())
                .with_description("Requests to the partner listener, by route template and status class")
                .build(),
            request_duration: meter
                .f64_histogram(Metric::HttpRequestDuration.name())
                .with_description("Request latency at the partner edge (audit phase included), seconds")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            stage_duration: meter
                .f64_histogram(Metric::StageDuration.name())
                .with_description("Latency of each stage span (auth, validate, decide, commit, deliver, feed), seconds")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            decisions: meter
                .u64_counter(Metric::PolicyDecisions.name())
                .with_description("Policy decisions at intake, by the rule ids that fired")
                .build(),
            batch_size: meter
                .f64_histogram(Metric::StoreBatchSize.name())
                .with_description("Submissions per store commit (one fsync), averaged over each second")
                .with_boundaries(BATCH_BUCKETS.to_vec())
                .build(),
            feed_exports: meter
                .u64_counter(Metric::FeedExports.name())
                .with_description("Bulk $export runs by feed and outcome")
                .build(),
            export_failures: meter
                .u64_counter(Metric::TelemetryExportFailures.name())
                .with_description("OTLP exports that failed (the telemetry was dropped)")
                .build(),
            spans_exported: meter
                .u64_counter(Metric::TelemetrySpansExported.name())
                .with_description("Spans accepted by the OTLP collector")
                .build(),
            provider,
            registry,
            sampled,
            heartbeat_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// One request answered by the partner listener.
    pub fn request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let labels = [
            KeyValue::new("method", method.to_owned()),
            KeyValue::new("route", route.to_owned()),
            KeyValue::new("status_class", status_class(status)),
        ];
        self.requests.add(1, &labels);
        self.request_duration
            .record(elapsed.as_secs_f64(), &labels[1..]);
    }

    /// One stage span closed after `elapsed`.
    pub fn stage(&self, stage: &'static str, elapsed: Duration) {
        self.stage_duration
            .record(elapsed.as_secs_f64(), &[KeyValue::new("stage", stage)]);
    }

    /// The rule ids one intake decision fired (deduplicated by the caller).
    pub fn decision(&self, rule_ids: &[String]) {
        if rule_ids.is_empty() {
            self.decisions.add(1, &[KeyValue::new("rule", "(none)")]);
        }
        for rule in rule_ids {
            self.decisions
                .add(1, &[KeyValue::new("rule", rule.clone())]);
        }
    }

    /// One Bulk export finished (`outcome`: `ok` or `failed`); `transaction_time` of a successful
    /// one sets the feed's last-export time.
    pub fn feed_export(&self, feed: &str, outcome: &'static str, transaction_time: Option<f64>) {
        self.feed_exports.add(
            1,
            &[
                KeyValue::new("feed", feed.to_owned()),
                KeyValue::new("outcome", outcome),
            ],
        );
        if let Some(at) = transaction_time {
            self.sampled().feed_last_export.insert(feed.to_owned(), at);
        }
    }

    pub(crate) fn export_failure(&self, signal: &'static str) {
        self.export_failures
            .add(1, &[KeyValue::new("signal", signal)]);
    }

    pub(crate) fn spans_exported(&self, spans: usize) {
        self.spans_exported.add(spans as u64, &[]);
    }

    fn sampled(&self) -> std::sync::MutexGuard<'_, Sampled> {
        self.sampled.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The store's counters (cumulative) and fail-stop state; records the batch size of the
    /// commits since the previous call.
    pub fn store_sample(
        &self,
        submissions: u64,
        commits: u64,
        commit_time: Duration,
        failed: bool,
    ) {
        let mut sampled = self.sampled();
        let new_commits = commits.saturating_sub(sampled.store_commits);
        let new_submissions = submissions.saturating_sub(sampled.store_submissions);
        if new_commits > 0 && sampled.store_commits > 0 {
            self.batch_size
                .record(new_submissions as f64 / new_commits as f64, &[]);
        }
        sampled.store_submissions = submissions;
        sampled.store_commits = commits;
        sampled.store_commit_seconds = commit_time.as_secs_f64();
        sampled.store_failed = failed;
    }

    /// Delivery status per destination, as `Store::delivery_status` reports it.
    pub fn delivery_sample(&self, status: &[caregate_store::delivery::DestinationStatus]) {
        let now = time::OffsetDateTime::now_utc();
        let delivery = status
            .iter()
            .map(|s| {
                let lag = s
                    .oldest_pending_committed_at
                    .map(|at| (now - at).as_seconds_f64().max(0.0))
                    .unwrap_or(0.0);
                (s.partner.clone(), (s.pending, lag, s.dead))
            })
            .collect();
        self.sampled().delivery = delivery;
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn render(&self) -> String {
        use prometheus::Encoder as _;
        let mut text = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut text) {
            tracing::warn!(%error, "metrics could not be rendered");
        }
        String::from_utf8(text).unwrap_or_default()
    }

    fn beat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heartbeat_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// Time since the sampler's last tick; `None` if no sampler runs.
    pub fn heartbeat_age(&self) -> Option<Duration> {
        match self.heartbeat_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }

    /// Push what is pending over OTLP and stop (bounded by the export timeout).
    pub(crate) fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::debug!(%error, "metrics exporter shutdown");
        }
    }
}

/// Counts failed metric pushes in `caregate_telemetry_export_failures_total{signal="metrics"}`
/// (with the same rate-limited warning as spans).
#[derive(Debug)]
struct CountingMetricExporter<E> {
    inner: E,
}

impl<E: opentelemetry_sdk::metrics::exporter::PushMetricExporter>
    opentelemetry_sdk::metrics::exporter::PushMetricExporter for CountingMetricExporter<E>
{
    async fn export(
        &self,
        metrics: &opentelemetry_sdk::metrics::data::ResourceMetrics,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let result = self.inner.export(metrics).await;
        if let Err(error) = &result {
            crate::telemetry::export_failed("metrics", error);
        }
        result
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> opentelemetry_sdk::metrics::Temporality {
        self.inner.temporality()
    }
}

/// `GET /metrics` (admin listener): the Prometheus text exposition.
pub async fn prometheus_text() -> axum::response::Response {
    use axum::response::IntoResponse as _;
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        global().render(),
    )
        .into_response()
}

fn lock(sampled: &Mutex<Sampled>) -> std::sync::MutexGuard<'_, Sampled> {
    sampled.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Observable instruments reading the sampled values (they are read at each scrape or OTLP push;
/// the store is not queried then).
fn register_observers(meter: &Meter, sampled: &Arc<Mutex<Sampled>>) {
    let s = Arc::clone(sampled);
    meter
        .u64_observable_counter(Metric::StoreSubmissions.name())
        .with_description("Submissions taken by the store writer")
        .with_callback(move |o| o.observe(lock(&s).store_submissions, &[]))
        .build();
    let s = Arc::clone(sampled);
    meter
        .u64_observable_counter(Metric::StoreCommits.name())
        .with_description("Store transactions committed (each one fsync)")
        .with_callback(move |o| o.observe(lock(&s).store_commits, &[]))
        .build();
    let s = Arc::clone(sampled);
    meter
        .f64_observable_counter(Metric::StoreCommitTime.name())
        .with_description("Time spent committing, fsync included, seconds")
        .with_callback(move |o| o.observe(lock(&s).store_commit_seconds, &[]))
        .build();
    let s = Arc::clone(sampled);
    meter
        .u64_observable_gauge(Metric::StoreFailed.name())
        .with_description("1 once the store has fail-stopped (writes refused until restart)")
        .with_callback(move |o| o.observe(u64::from(lock(&s).store_failed), &[]))
        .build();
    let s = Arc::clone(sampled);
    meter
        .u64_observable_gauge(Metric::DeliveryQueueDepth.name())
        .with_description("Delivery rows not yet delivered, per destination partner")
        .with_callback(move |o| {
            for (partner, (pending, _, _)) in &lock(&s).delivery {
                o.observe(*pending, &[KeyValue::new("partner", partner.clone())]);
            }
        })
        .build();
    let s = Arc::clone(sampled);
    meter
        .f64_observable_gauge(Metric::DeliveryLag.name())
        .with_description("Age of the oldest undelivered record, per destination partner, seconds")
        .with_callback(move |o| {
            for (partner, (_, lag, _)) in &lock(&s).delivery {
                o.observe(*lag, &[KeyValue::new("partner", partner.clone())]);
            }
        })
        .build();
    let s = Arc::clone(sampled);
    meter
        .u64_observable_gauge(Metric::DeliveryDead.name())
        .with_description("Dead letters waiting for an operator, per destination partner")
        .with_callback(move |o| {
            for (partner, (_, _, dead)) in &lock(&s).delivery {
                o.observe(*dead, &[KeyValue::new("partner", partner.clone())]);
            }
        })
        .build();
    let s = Arc::clone(sampled);
    meter
        .f64_observable_gauge(Metric::FeedLastExport.name())
        .with_description("Transaction time of each feed's last successful export, Unix seconds (lag: time() minus this)")
        .with_callback(move |o| {
            for (feed, at) in &lock(&s).feed_last_export {
                o.observe(*at, &[KeyValue::new("feed", feed.clone())]);
            }
        })
        .build();
}

/// What the sampler reads from a concrete store besides the `Store` trait (both backends).
pub trait SampledStore: caregate_store::Store {
    fn stats(&self) -> caregate_store::sqlite::StoreStats;
    fn commit_time(&self) -> Duration;
    fn has_failed(&self) -> bool;
}

impl SampledStore for caregate_store::sqlite::SqliteStore {
    fn stats(&self) -> caregate_store::sqlite::StoreStats {
        Self::stats(self)
    }
    fn commit_time(&self) -> Duration {
        Self::commit_time(self)
    }
    fn has_failed(&self) -> bool {
        Self::has_failed(self)
    }
}

impl SampledStore for caregate_store::postgres::PostgresStore {
    fn stats(&self) -> caregate_store::sqlite::StoreStats {
        Self::stats(self)
    }
    fn commit_time(&self) -> Duration {
        Self::commit_time(self)
    }
    fn has_failed(&self) -> bool {
        Self::has_failed(self)
    }
}

/// Sample the store: its counters every second (cheap atomics; also the liveness heartbeat) and
/// the delivery status every `every` (a query). Holds the store weakly, so the runtime can still
/// close it at shutdown; ends when `stopping` turns true or the store is gone.
pub fn spawn_sampler<S: SampledStore>(
    store: std::sync::Weak<S>,
    every: Duration,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let metrics = global();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_delivery: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopping.wait_for(|stop| *stop) => break,
            }
            let Some(store) = store.upgrade() else { break };
            metrics.beat();
            let stats = store.stats();
            metrics.store_sample(
                stats.submissions,
                stats.commits,
                store.commit_time(),
                store.has_failed(),
            );
            if last_delivery.is_none_or(|at| at.elapsed() >= every) {
                last_delivery = Some(Instant::now());
                match store.delivery_status(None).await {
                    Ok(status) => metrics.delivery_sample(&status),
                    Err(error) => {
                        tracing::debug!(%error, "delivery status could not be sampled")
                    }
                }
            }
        }
    });
}

/// Times every span under [`crate::telemetry::STAGE_TARGET`] from creation to close and records
/// it in `caregate_stage_duration_seconds{stage=<span name>}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimer;

struct Started(Instant);

impl<S> tracing_subscriber::Layer<S> for StageTimer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, _attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Started(Instant::now()));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id)
            && span.metadata().target() == crate::telemetry::STAGE_TARGET
            && let Some(Started(at)) = span.extensions().get::<Started>()
        {
            global().stage(span.metadata().name(), at.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(&TelemetrySettings::default()).unwrap()
    }

    #[test]
    fn request_counter_renders_by_route_and_status_class() {
        let m = metrics();
        m.request(
            "POST",
            "/fhir/{resource_type}",
            201,
            Duration::from_millis(3),
        );
        m.request(
            "POST",
            "/fhir/{resource_type}",
            422,
            Duration::from_millis(1),
        );
        let text = m.render();
        assert!(
            text.contains(
                "caregate_http_requests_total{method=\"POST\",route=\"/fhir/{resource_type}\",status_class=\"2xx\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("status_class=\"4xx\"} 1"), "{text}");
        assert!(
            text.contains("caregate_http_request_duration_seconds_bucket{route=\"/fhir/{resource_type}\",status_class=\"2xx\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE caregate_http_requests_total counter"),
            "{text}"
        );
    }

    #[test]
    fn stage_decision_store_delivery_and_feed_metrics_render() {
        let m = metrics();
        m.stage("commit", Duration::from_millis(4));
        m.decision(&["LR-1".to_owned(), "SENS-1".to_owned()]);
        m.store_sample(10, 2, Duration::from_millis(8), false);
        m.store_sample(30, 4, Duration::from_millis(12), false);
        m.delivery_sample(&[caregate_store::delivery::DestinationStatus {
            partner: "gp-a81001".into(),
            pending: 3,
            delivered: 1,
            dead: 0,
            withheld: 0,
            oldest_pending_committed_at: Some(
                time::OffsetDateTime::now_utc() - time::Duration::seconds(90),
            ),
            last_failure: None,
        }]);
        m.feed_export("analytics", "ok", Some(1_700_000_000.0));
        let text = m.render();
        for expected in [
            "caregate_stage_duration_seconds_count{stage=\"commit\"} 1",
            "caregate_policy_decisions_total{rule=\"LR-1\"} 1",
            "caregate_policy_decisions_total{rule=\"SENS-1\"} 1",
            "caregate_store_submissions_total 30",
            "caregate_store_commits_total 4",
            "caregate_store_batch_size_count 1",
            "caregate_store_batch_size_sum 10",
            "caregate_store_failed 0",
            "caregate_delivery_queue_depth{partner=\"gp-a81001\"} 3",
            "caregate_feed_exports_total{feed=\"analytics\",outcome=\"ok\"} 1",
            "caregate_feed_last_export_timestamp_seconds{feed=\"analytics\"} 1700000000",
        ] {
            assert!(text.contains(expected), "missing {expected}:\n{text}");
        }
        let lag = text
            .lines()
            .find(|l| l.starts_with("caregate_delivery_lag_seconds{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap();
        assert!((89.0..200.0).contains(&lag), "{lag}");
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(201), "2xx");
        assert_eq!(status_class(404), "4xx");
        assert_eq!(status_class(503), "5xx");
    }

    #[test]
    fn metric_names_are_unique_and_prefixed() {
        let mut names: Vec<_> = Metric::ALL.iter().map(|m| m.name()).collect();
        assert!(names.iter().all(|n| n.starts_with("caregate_")));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Metric::ALL.len());
    }
}
