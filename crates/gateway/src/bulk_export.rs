//! FHIR Bulk Data Access `$export` (<https://hl7.org/fhir/uv/bulkdata/export.html>) over the
//! pseudonymised feeds (`caregate_feeds`, issue 5).
//!
//! - Kick-off: `GET /fhir/$export` (system level) or `GET /fhir/Group/{feed}/$export` — each feed
//!   is modelled as a Group whose members are the feed's population, so a consumer with several
//!   feeds names one by the Group id; the system-level form picks the caller's only feed or the
//!   one named by `_feed`. `Prefer` is parsed as a list (`respond-async, handling=lenient`).
//!   Answers 202 with `Content-Location`.
//! - Status: `GET /fhir/$export-status/{id}`: 202 with `X-Progress` and `Retry-After` while
//!   running; 200 with the manifest (an `extension` names the feed, the key version and carries
//!   the release report); 500 with an OperationOutcome if it failed. `DELETE` cancels.
//! - Files: `GET /fhir/$export-file/{id}/{file}`; the name must be one the manifest lists.
//!
//! Only the feed's consumer partner sees a job or its files; anyone else gets 404, the same as for
//! a job that does not exist (no existence oracle, OWASP API1). Export ids are generated and
//! validated before any path is built. The export runs in a background task on a blocking thread.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use caregate_auth::scope::Interaction;
use caregate_feeds::export::{
    ExportControl, ExportManifest, export_dir, new_export_id, valid_export_id,
};
use caregate_feeds::runner::{ExportJob, Start};
use caregate_feeds::{FeedDefinition, FeedPolicy, KeyFile};
use caregate_fhir::validate::{Rejection, RejectionKind};
use caregate_fhir::{Issue, IssueCode, OperationOutcome};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::app::{Caller, SharedState};
use crate::error::{ApiError, fhir_response};

/// Seconds a client should wait between status polls.
const RETRY_AFTER_SECS: u32 = 1;

/// The feeds the gateway serves, and the export jobs in flight. Jobs live in memory: after a
/// restart a client kicks off again (completed exports stay on disk for `caregate feed report`).
pub struct BulkExports {
    definitions: Vec<Arc<FeedDefinition>>,
    key_file: PathBuf,
    data_dir: PathBuf,
    policy: Arc<dyn FeedPolicy>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

impl std::fmt::Debug for BulkExports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkExports")
            .field("feeds", &self.definitions.len())
            .finish_non_exhaustive()
    }
}

impl BulkExports {
    pub fn new(
        definitions: Vec<FeedDefinition>,
        key_file: PathBuf,
        data_dir: PathBuf,
        policy: Arc<dyn FeedPolicy>,
    ) -> Self {
        BulkExports {
            definitions: definitions.into_iter().map(Arc::new).collect(),
            key_file,
            data_dir,
            policy,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    fn job(&self, id: &str, caller: &Caller) -> Result<Arc<Job>, ApiError> {
        if !valid_export_id(id) {
            return Err(ApiError::NotFound);
        }
        let jobs = self.jobs.lock().map_err(|_| ApiError::Internal)?;
        jobs.get(id)
            .filter(|job| job.owner == caller.partner.id)
            .cloned()
            .ok_or(ApiError::NotFound)
    }
}

#[derive(Debug)]
struct Job {
    id: String,
    owner: String,
    feed: String,
    request: String,
    control: Arc<ExportControl>,
    state: Mutex<JobState>,
}

#[derive(Debug, Clone)]
enum JobState {
    Running,
    Done(Box<ExportManifest>),
    Failed,
}

/// The Bulk Data routes; the handlers need an `Extension<Arc<BulkExports>>` (added by the runtime
/// when `[feeds]` is configured; without it every route answers 404).
pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/fhir/$export", get(kick_off_system))
        .route("/fhir/Group/{group}/$export", get(kick_off_group))
        .route("/fhir/$export-status/{id}", get(status).delete(cancel))
        .route("/fhir/$export-file/{id}/{file}", get(file))
}

/// Add the Bulk Data service to the app when `[feeds]` is configured: definitions loaded and
/// validated now (start-up fails on a bad one), the key file read at each kick-off (so a
/// rotation applies without a restart). The feed policy reads the decisions stored with records.
pub fn attach(
    app: Router,
    config: &crate::config::Config,
    policy: Option<Arc<dyn caregate_feeds::FeedPolicy>>,
) -> Result<Router, String> {
    let Some(dir) = &config.feeds.definitions else {
        return Ok(app);
    };
    let definitions =
        FeedDefinition::load_dir(dir).map_err(|e| format!("feed definitions: {e}"))?;
    let key_file = std::env::var_os("CAREGATE_FEED_KEYS")
        .map(PathBuf::from)
        .or_else(|| config.feeds.key_file.clone())
        .ok_or("[feeds] needs key_file (or CAREGATE_FEED_KEYS)")?;
    let mut decision_policy = caregate_feeds::DecisionFeedPolicy::new();
    for definition in &definitions {
        if matches!(
            definition.opt_outs,
            caregate_feeds::definition::OptOuts::Exempt { .. }
        ) {
            decision_policy = decision_policy.with_exemption(&definition.id);
        }
    }
    // With the consent/IG policy configured, opt-outs are re-checked at export time; without it
    // only the decisions stored with records count.
    let policy: Arc<dyn caregate_feeds::FeedPolicy> = match policy {
        Some(policy) => policy,
        None => Arc::new(decision_policy),
    };
    let exports = BulkExports::new(definitions, key_file, config.data_dir.clone(), policy);
    Ok(app.layer(Extension(Arc::new(exports))))
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::Rejected(Rejection {
        kind: RejectionKind::Structure,
        outcome: OperationOutcome::single(Issue::request(IssueCode::Value, message)),
    })
}

fn not_configured() -> ApiError {
    ApiError::NotSupported {
        status: StatusCode::NOT_FOUND,
        message: "bulk export is not configured on this gateway",
    }
}

/// Whether `Prefer` (a comma-separated list, possibly repeated) asks for `respond-async`.
pub fn prefers_respond_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| {
            token
                .split(';')
                .next()
                .is_some_and(|name| name.trim().eq_ignore_ascii_case("respond-async"))
        })
}

/// Decoded query parameters (bounded by the edge's header limits).
fn parameters(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|_| bad_request("the query string is not valid"))
}

async fn kick_off_system(
    State(state): State<SharedState>,
    exports: Option<Extension<Arc<BulkExports>>>,
    caller: Caller,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    kick_off(&state, exports, caller, &headers, query, None).await
}

async fn kick_off_group(
    State(state): State<SharedState>,
    exports: Option<Extension<Arc<BulkExports>>>,
    caller: Caller,
    headers: HeaderMap,
    Path(group): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    kick_off(&state, exports, caller, &headers, query, Some(group)).await
}

async fn kick_off(
    state: &SharedState,
    exports: Option<Extension<Arc<BulkExports>>>,
    caller: Caller,
    headers: &HeaderMap,
    query: Option<String>,
    group: Option<String>,
) -> Result<Response, ApiError> {
    let Some(Extension(exports)) = exports else {
        return Err(not_configured());
    };
    if !prefers_respond_async(headers) {
        return Err(bad_request(
            "Bulk Data export requires the header Prefer: respond-async",
        ));
    }
    let params = parameters(query.as_deref())?;
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(format) = param("_outputFormat")
        && !matches!(
            format,
            "application/fhir+ndjson" | "application/ndjson" | "ndjson"
        )
    {
        return Err(bad_request("_outputFormat must be application/fhir+ndjson"));
    }
    let own: Vec<&Arc<FeedDefinition>> = exports
        .definitions
        .iter()
        .filter(|d| d.consumer == caller.partner.id)
        .collect();
    let wanted = group.as_deref().or(param("_feed"));
    let definition = match (wanted, own.as_slice()) {
        (Some(id), _) => own
            .iter()
            .find(|d| d.id == id)
            .copied()
            .ok_or(ApiError::NotFound)?,
        (None, [only]) => *only,
        (None, []) => return Err(ApiError::NotFound),
        (None, _) => {
            return Err(bad_request(
                "this client receives several feeds: name one with _feed or GET /fhir/Group/{feed}/$export",
            ));
        }
    };
    let types = match param("_type") {
        None => None,
        Some(list) => {
            let mut types = BTreeSet::new();
            for name in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if definition.rules(name).is_none() {
                    return Err(bad_request(
                        format!("_type: the feed does not carry {name}").replace('\n', " "),
                    ));
                }
                types.insert(name.to_owned());
            }
            Some(types)
        }
    };
    for resource_type in definition.resource_types() {
        if types.as_ref().is_none_or(|t| t.contains(resource_type)) {
            caller.require(resource_type, Interaction::Read)?;
        }
    }
    let since = match param("_since") {
        None => None,
        Some(text) => Some(
            OffsetDateTime::parse(text, &Rfc3339)
                .map_err(|_| bad_request("_since must be a FHIR instant"))?,
        ),
    };
    let key = KeyFile::open(&exports.key_file)
        .and_then(|file| file.current(&definition.id).cloned())
        .map_err(|error| {
            // The key error names files and feeds only, never a secret.
            tracing::error!(feed = %definition.id, %error, "bulk export: no usable feed key");
            ApiError::Internal
        })?;
    let id = new_export_id();
    let request = match &query {
        Some(query) => format!(
            "{}{}?{query}",
            state.base_url,
            request_path(definition, group.is_some())
        ),
        None => format!(
            "{}{}",
            state.base_url,
            request_path(definition, group.is_some())
        ),
    };
    let transaction_time = OffsetDateTime::now_utc();
    let control = Arc::new(ExportControl::default());
    let job = Arc::new(Job {
        id: id.clone(),
        owner: caller.partner.id.clone(),
        feed: definition.id.clone(),
        request,
        control: control.clone(),
        state: Mutex::new(JobState::Running),
    });
    exports
        .jobs
        .lock()
        .map_err(|_| ApiError::Internal)?
        .insert(id.clone(), job.clone());
    let export_job = ExportJob {
        definition: definition.clone(),
        key,
        data_dir: exports.data_dir.clone(),
        export_id: id.clone(),
        types,
        since,
        start: Start::Rebuild,
        transaction_time,
    };
    let store = state.store.clone();
    let policy = exports.policy.clone();
    // The feed stage's span: feed id, records released and outcome (no content, no ids).
    let span = tracing::info_span!(
        target: crate::telemetry::STAGE_TARGET,
        "feed",
        feed = %definition.id,
        files = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let run = async move {
        let outcome = caregate_feeds::runner::run(store, policy, export_job, control).await;
        let span = tracing::Span::current();
        let next = match outcome {
            Ok(manifest) => {
                span.record("files", manifest.files.len());
                span.record("outcome", "ok");
                crate::metrics::global().feed_export(
                    &job.feed,
                    "ok",
                    Some(manifest.transaction_time.unix_timestamp() as f64),
                );
                JobState::Done(Box::new(manifest))
            }
            Err(error) => {
                span.record("outcome", "failed");
                crate::metrics::global().feed_export(&job.feed, "failed", None);
                tracing::warn!(export = %job.id, feed = %job.feed, %error, "bulk export failed");
                JobState::Failed
            }
        };
        if let Ok(mut state) = job.state.lock() {
            *state = next;
        }
    };
    tokio::spawn(tracing::Instrument::instrument(run, span));
    let location = format!("{}/fhir/$export-status/{id}", state.base_url);
    let mut response = StatusCode::ACCEPTED.into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response
            .headers_mut()
            .insert(header::CONTENT_LOCATION, value);
    }
    Ok(response)
}

fn request_path(definition: &FeedDefinition, group: bool) -> String {
    if group {
        format!("/fhir/Group/{}/$export", definition.id)
    } else {
        "/fhir/$export".to_owned()
    }
}

async fn status(
    State(state): State<SharedState>,
    exports: Option<Extension<Arc<BulkExports>>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let Some(Extension(exports)) = exports else {
        return Err(not_configured());
    };
    let job = exports.job(&id, &caller)?;
    let current = job.state.lock().map_err(|_| ApiError::Internal)?.clone();
    match current {
        JobState::Running => {
            let mut response = StatusCode::ACCEPTED.into_response();
            let progress = format!(
                "scanned {} log entries, {} records written",
                job.control.scanned(),
                job.control.written()
            );
            if let Ok(value) = HeaderValue::from_str(&progress) {
                response.headers_mut().insert("x-progress", value);
            }
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            Ok(response)
        }
        JobState::Failed => Ok(fhir_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &OperationOutcome::single(Issue::request(
                IssueCode::Exception,
                "the export failed; kick off a new one",
            ))
            .to_json(),
        )),
        JobState::Done(manifest) => {
            let output: Vec<serde_json::Value> = manifest
                .files
                .iter()
                .map(|f| {
                    serde_json::json!({
                        "type": f.resource_type,
                        "url": format!("{}/fhir/$export-file/{}/{}", state.base_url, job.id, f.file_name),
                        "count": f.count,
                    })
                })
                .collect();
            let body = serde_json::json!({
                "transactionTime": manifest.transaction_time.format(&Rfc3339).unwrap_or_default(),
                "request": job.request,
                "requiresAccessToken": true,
                "output": output,
                "error": [],
                "extension": {
                    "https://caregate.example/fhir/bulk/feed": manifest.feed,
                    "https://caregate.example/fhir/bulk/key-version": manifest.key_version,
                    "https://caregate.example/fhir/bulk/release-report": manifest.report,
                },
            });
            let bytes = serde_json::to_vec(&body).map_err(|_| ApiError::Internal)?;
            let mut response = (StatusCode::OK, bytes).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(response)
        }
    }
}

async fn cancel(
    exports: Option<Extension<Arc<BulkExports>>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let Some(Extension(exports)) = exports else {
        return Err(not_configured());
    };
    let job = exports.job(&id, &caller)?;
    job.control.cancel();
    exports
        .jobs
        .lock()
        .map_err(|_| ApiError::Internal)?
        .remove(&job.id);
    if matches!(
        *job.state.lock().map_err(|_| ApiError::Internal)?,
        JobState::Done(_)
    ) {
        let directory = export_dir(&exports.data_dir, &job.feed, &job.id);
        let _ = tokio::fs::remove_dir_all(directory).await;
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

async fn file(
    exports: Option<Extension<Arc<BulkExports>>>,
    caller: Caller,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let Some(Extension(exports)) = exports else {
        return Err(not_configured());
    };
    let job = exports.job(&id, &caller)?;
    let manifest = match &*job.state.lock().map_err(|_| ApiError::Internal)? {
        JobState::Done(manifest) => manifest.clone(),
        _ => return Err(ApiError::NotFound),
    };
    // Only names the manifest lists: never a path built from the request.
    let listed = manifest
        .files
        .iter()
        .find(|f| f.file_name == name)
        .ok_or(ApiError::NotFound)?;
    let path = export_dir(&exports.data_dir, &job.feed, &job.id).join(&listed.file_name);
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::NotFound)?;
    let stream = futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt as _;
        let mut buffer = vec![0u8; 64 * 1024];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(n) => {
                buffer.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buffer)), file))
            }
            Err(error) => Some((Err(error), file)),
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let content_type = if listed.file_name.ends_with(".gz") {
        "application/gzip"
    } else {
        "application/fhir+ndjson"
    };
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefer_is_parsed_as_a_list() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "prefer",
            HeaderValue::from_static("handling=lenient, respond-async"),
        );
        assert!(prefers_respond_async(&headers));
        headers.insert(
            "prefer",
            HeaderValue::from_static("respond-async, handling=lenient"),
        );
        assert!(prefers_respond_async(&headers));
        headers.insert("prefer", HeaderValue::from_static("return=minimal"));
        assert!(!prefers_respond_async(&headers));
        headers.insert("prefer", HeaderValue::from_static("respond-asynchronously"));
        assert!(!prefers_respond_async(&headers));
    }
}
