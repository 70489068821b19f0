//! FHIR Bulk Data Access `$export` (<https://hl7.org/fhir/uv/bulkdata/export.html>) over the
//! pseudonymised feeds (`caregate_feeds`, issue 5).
//!
//! - Kick-off: `GET /fhir/$export` (system level) or `GET /fhir/Group/{feed}/$export` — each feed
//!   is modelled as a Group whose members are the feed's population, so a consumer with several
//!   feeds names one by the Group id; the system-level form picks the one named by `_feed`, else
//!   the caller's only feed, else the caller's feed marked `system_export` in its definition (so
//!   clients that know only `GET /$export` work). `Prefer` is parsed as a list (`respond-async, handling=lenient`).
//!   Answers 202 with `Content-Location`.
//! - Status: `GET /fhir/$export-status/{id}`: 202 with `X-Progress` and `Retry-After` while
//!   running; 200 with the manifest (an `extension` names the feed, the key version and carries
//!   the release report); 500 with an OperationOutcome if it failed. `DELETE` cancels.
//! - Files: `GET /fhir/$export-file/{id}/{file}`; the name must be one the manifest lists.
//!
//! **Jobs are kept in the store** (`caregate_store::export_jobs`), not in memory: the status,
//! manifest, DELETE and file routes read the job row, so they answer after a restart and on any
//! instance sharing the store (cluster mode; the files must then be on the shared
//! `[feeds] export_dir`). The process running an export keeps only its live counters and
//! cancel switch ([`ExportControl`]) and writes its progress to the row every
//! [`PROGRESS_INTERVAL`]; that write also tells it when the job was cancelled on another
//! instance. An export does not survive its process: at start-up an instance marks its own
//! unfinished jobs failed ([`recover_interrupted`]) and the status answers 500 with
//! [`INTERRUPTED`] — resuming would need the blocking export's in-flight state (its open files,
//! its disclosure-control pass), so a new kick-off is the simple correct answer.
//!
//! **Retention.** A finished job (complete, failed or cancelled) is kept for `[feeds]
//! export_retention_secs` after it ended (default 24 h); the complete status says until when
//! (`Expires`). After it the job is gone: its status, manifest and files answer 404 with an
//! OperationOutcome at once (each request checks the job's age, whatever the sweep has done), and
//! the sweep ([`BulkExports::sweep_expired`], at start-up and every [`sweep_interval`]) deletes
//! its files and then its row — the row's delete re-checks expiry in the store, so instances
//! sweeping the shared store and export directory at once remove each job once (one audit event,
//! `export-expiry`), and a file already gone is not an error. 404 rather than 410 Gone: the Bulk
//! Data IG (v2) asks for 404 with an OperationOutcome on a status URL after a DELETE, and an
//! expired job is answered the same way; a 410 would also tell a caller that a job id once
//! existed, which the no-existence-oracle rule below forbids (the row is gone, so another
//! partner's expired job could not be told apart anyway).
//!
//! Only the job's owner (the feed's consumer partner that kicked it off) sees a job or its files;
//! anyone else gets 404, the same as for a job that does not exist (no existence oracle, OWASP
//! API1). A cancelled job is gone (404). Export ids are generated and validated before any path is
//! built. The export runs in a background task on a blocking thread.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use caregate_auth::scope::Interaction;
use caregate_feeds::definition::OptOuts;
use caregate_feeds::export::{
    ExportControl, ExportManifest, export_dir, new_export_id, valid_export_id,
};
use caregate_feeds::runner::{ExportJob, Start};
use caregate_feeds::{FeedDefinition, FeedPolicy, KeyFile};
use caregate_fhir::validate::{Rejection, RejectionKind};
use caregate_fhir::{Issue, IssueCode, OperationOutcome};
use caregate_store::export_jobs::{
    ExportExpiry, ExportJob as StoredJob, ExportJobEnd, ExportJobState, ExportProgress,
    NewExportJob,
};
use caregate_store::{Store, StoreError, Submission};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::app::{Caller, SharedState};
use crate::error::{ApiError, fhir_response};

/// Seconds a client should wait between status polls.
const RETRY_AFTER_SECS: u32 = 1;

/// How often a running export writes its progress to its job row (and learns whether it was
/// cancelled elsewhere).
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// An in-progress job whose row has not been touched for this long is answered as failed: the
/// instance running it stopped (and has not restarted to say so, e.g. a cluster scaled down).
const STALE_AFTER: Duration = Duration::from_secs(60);

/// The audit log's actor for a job removed at the end of its retention.
pub const RETENTION_ACTOR: &str = "system/export-retention";

/// Expired jobs read from the store per sweep round.
const SWEEP_BATCH: usize = 500;

/// The longest time between two sweeps (expiry itself is exact: see the module docs).
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(300);

/// How often the sweep runs for `retention`: a tenth of it, between 1 s and 5 minutes, so the
/// files of an expired job are deleted within that long after it expired.
pub fn sweep_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), MAX_SWEEP_INTERVAL)
}

/// What is expired at `now` under `retention`: jobs that ended before `now - retention`, and
/// jobs still in progress without a progress write for as long (and for at least
/// [`STALE_AFTER`], so a tiny retention never touches a live export).
pub fn expiry_at(now: OffsetDateTime, retention: Duration) -> ExportExpiry {
    let retention = time::Duration::try_from(retention).unwrap_or(time::Duration::MAX);
    let silent = time::Duration::try_from(STALE_AFTER)
        .unwrap_or(time::Duration::MAX)
        .max(retention);
    ExportExpiry {
        finished_before: now.saturating_sub(retention),
        silent_before: now.saturating_sub(silent),
    }
}

/// HTTP-date (RFC 9110 §5.6.7, IMF-fixdate) for `Expires`.
const HTTP_DATE: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
);

/// The status of a job whose process stopped while it ran (set at start-up).
pub const INTERRUPTED: &str = "the export was interrupted by a restart; kick off a new export";

/// The status of a job that failed (the cause goes to the logs, not to the client).
const FAILED: &str = "the export failed; kick off a new one";

/// The status of an in-progress job whose instance stopped reporting (see [`STALE_AFTER`]).
const STOPPED: &str = "the gateway instance running the export stopped; kick off a new export";

/// The answer for a listed file that is not on this instance's disk.
const FILE_ELSEWHERE: &str = "the export file is not available on this gateway instance \
     (in a cluster, the export directory must be shared by every instance); kick off a new export";

/// The feeds the gateway serves, where their exports are written, and the exports running in
/// this process (their live counters and cancel switches; the jobs themselves are in the store).
pub struct BulkExports {
    definitions: Vec<Arc<FeedDefinition>>,
    key_file: PathBuf,
    /// Exports are written under `<export_root>/feeds/<feed>/<id>/`.
    export_root: PathBuf,
    policy: Arc<dyn FeedPolicy>,
    /// This instance's id, recorded with the jobs it runs.
    instance_id: String,
    /// How long a finished job and its files are kept (`[feeds] export_retention_secs`).
    retention: Duration,
    running: Mutex<HashMap<String, Arc<ExportControl>>>,
}

impl std::fmt::Debug for BulkExports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkExports")
            .field("feeds", &self.definitions.len())
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

impl BulkExports {
    pub fn new(
        definitions: Vec<FeedDefinition>,
        key_file: PathBuf,
        export_root: PathBuf,
        policy: Arc<dyn FeedPolicy>,
        instance_id: String,
        retention: Duration,
    ) -> Self {
        BulkExports {
            definitions: definitions.into_iter().map(Arc::new).collect(),
            key_file,
            export_root,
            policy,
            instance_id,
            retention,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// The live counters of a job running in this process.
    fn running(&self, id: &str) -> Result<Option<Arc<ExportControl>>, ApiError> {
        Ok(self
            .running
            .lock()
            .map_err(|_| ApiError::Internal)?
            .get(id)
            .cloned())
    }

    fn finished_running(&self, id: &str) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(id);
        }
    }

    /// The caller's job: 404 for an invalid id, a missing, cancelled or expired job, or another
    /// partner's (BOLA: the same answer, so no existence oracle).
    async fn job(
        &self,
        store: &dyn Store,
        id: &str,
        caller: &Caller,
    ) -> Result<StoredJob, ApiError> {
        if !valid_export_id(id) {
            return Err(ApiError::NotFound);
        }
        store
            .export_job(id)
            .await?
            .filter(|job| job.owner == caller.partner.id && job.state != ExportJobState::Cancelled)
            .filter(|job| !self.expiry_now().covers(job))
            .ok_or(ApiError::NotFound)
    }

    fn expiry_now(&self) -> ExportExpiry {
        expiry_at(OffsetDateTime::now_utc(), self.retention)
    }

    /// Remove every expired job: its files first (already gone is fine), then its row if it is
    /// still expired — so of several instances sweeping at once exactly one removes a job, and
    /// audits it. A job running in this process is left to its runner; a job whose files cannot
    /// be deleted keeps its row (still answered 404) and is tried again next sweep. Returns the
    /// jobs this call removed. Stops early once `stopping` is set.
    pub async fn sweep_expired(
        &self,
        store: &dyn Store,
        stopping: Option<&tokio::sync::watch::Receiver<bool>>,
    ) -> Result<usize, StoreError> {
        let mut removed = 0;
        loop {
            let expiry = self.expiry_now();
            let jobs = store.expired_export_jobs(expiry, SWEEP_BATCH).await?;
            let listed = jobs.len();
            let mut progressed = false;
            for job in jobs {
                if stopping.is_some_and(|stop| *stop.borrow()) {
                    return Ok(removed);
                }
                if self.running(&job.id).ok().flatten().is_some() {
                    continue;
                }
                match tokio::fs::remove_dir_all(self.directory(&job)).await {
                    Ok(()) => {}
                    // Another instance's sweep, a DELETE, or an export that wrote nothing.
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => {
                        tracing::warn!(export = %job.id, feed = %job.feed, %error, "bulk export: the files of an expired export could not be deleted; retried at the next sweep");
                        continue;
                    }
                }
                if !store.remove_expired_export_job(&job.id, expiry).await? {
                    continue;
                }
                progressed = true;
                removed += 1;
                tracing::info!(export = %job.id, feed = %job.feed, state = job.state.as_str(), "bulk export expired: files deleted, job removed");
                audit_expiry(store, &job, self.retention).await;
            }
            if listed < SWEEP_BATCH || !progressed {
                return Ok(removed);
            }
        }
    }

    fn directory(&self, job: &StoredJob) -> PathBuf {
        export_dir(&self.export_root, &job.feed, &job.id)
    }
}

/// The audit event of a job removed at the end of its retention (written on its own; a failure
/// to write it is logged, as the files are already gone).
async fn audit_expiry(store: &dyn Store, job: &StoredJob, retention: Duration) {
    let mut event = caregate_audit::AuditEvent::new(
        uuid::Uuid::new_v4().to_string(),
        caregate_audit::Actor {
            client_id: Some(RETENTION_ACTOR.to_owned()),
            ..Default::default()
        },
        caregate_audit::Action::ExportExpiry,
        caregate_audit::Outcome::Success,
    );
    event.detail = Some(
        format!(
            "bulk export {} of feed {} (owner {}, {}) expired after {} s: files deleted, job removed",
            job.id,
            job.feed,
            job.owner,
            job.state.as_str(),
            retention.as_secs()
        )
        .chars()
        .take(500)
        .collect(),
    );
    let submission = Submission {
        partner: String::new(),
        idempotency_key: None,
        records: Vec::new(),
        audit: vec![event],
    };
    if let Err(error) = store.submit(submission).await {
        tracing::error!(export = %job.id, %error, "bulk export: the expiry could not be audited");
    }
}

/// At start-up: mark this instance's unfinished jobs failed ([`INTERRUPTED`]) — their process
/// died with them — and remove their partial files.
pub async fn recover_interrupted(
    store: &dyn Store,
    instance_id: &str,
    export_root: &FsPath,
) -> Result<usize, caregate_store::StoreError> {
    let jobs = store
        .fail_interrupted_export_jobs(instance_id, INTERRUPTED)
        .await?;
    for job in &jobs {
        let directory = export_dir(export_root, &job.feed, &job.id);
        match tokio::fs::remove_dir_all(&directory).await {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(export = %job.id, feed = %job.feed, %error, "bulk export: partial files of an interrupted export not removed");
            }
        }
        tracing::warn!(export = %job.id, feed = %job.feed, "bulk export interrupted by a restart; marked failed");
    }
    Ok(jobs.len())
}

/// The background sweep: [`BulkExports::sweep_expired`] every [`sweep_interval`] until
/// `stopping` is set (the task then ends, releasing its store handle so the store can close).
pub fn spawn_sweeper(
    exports: Arc<BulkExports>,
    store: Arc<dyn Store>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let interval = sweep_interval(exports.retention);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            if let Err(error) = exports.sweep_expired(store.as_ref(), Some(&stopping)).await {
                tracing::warn!(%error, "bulk export: the retention sweep failed; retried at the next");
            }
        }
    })
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
/// rotation applies without a restart), this instance's interrupted jobs marked failed
/// ([`recover_interrupted`]), expired jobs swept once and then by a background task (returned,
/// to be awaited after `stopping` is set). The feed policy reads the decisions stored with
/// records.
pub async fn attach(
    app: Router,
    config: &crate::config::Config,
    policy: Option<Arc<dyn caregate_feeds::FeedPolicy>>,
    store: &Arc<dyn Store>,
    instance_id: &str,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<(Router, Option<tokio::task::JoinHandle<()>>), String> {
    let Some(dir) = &config.feeds.definitions else {
        return Ok((app, None));
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
    let export_root = config
        .feeds
        .export_dir
        .clone()
        .unwrap_or_else(|| config.data_dir.clone());
    // A failure here is not fatal: a job of this instance still marked in progress is answered
    // as failed anyway (it is not running in this process; see `status`).
    if let Err(error) = recover_interrupted(store.as_ref(), instance_id, &export_root).await {
        tracing::warn!(%error, "bulk export: interrupted jobs could not be marked failed");
    }
    let exports = Arc::new(BulkExports::new(
        definitions,
        key_file,
        export_root,
        policy,
        instance_id.to_owned(),
        config.feeds.export_retention(),
    ));
    // Expired jobs go at start-up too (a gateway down for longer than the retention); a failure
    // is not fatal: expired jobs are answered 404 anyway, and the background sweep retries.
    match exports.sweep_expired(store.as_ref(), None).await {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "bulk export: expired exports removed at start-up"),
        Err(error) => tracing::warn!(%error, "bulk export: the start-up retention sweep failed"),
    }
    let sweeper = spawn_sweeper(exports.clone(), store.clone(), stopping);
    Ok((app.layer(Extension(exports)), Some(sweeper)))
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
        (None, several) => match several.iter().find(|d| d.system_export) {
            Some(default) => *default,
            None => {
                return Err(bad_request(
                    "this client receives several feeds and none is marked system_export: name one with _feed or GET /fhir/Group/{feed}/$export",
                ));
            }
        },
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
    // The request as the manifest repeats it, rebuilt from the parameters this server acts on,
    // so nothing else a client put in the query string is kept in the job row.
    let kept: Vec<(&str, &str)> = params
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "_type" | "_since" | "_feed" | "_outputFormat"))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let path = request_path(definition, group.is_some());
    let request = match serde_urlencoded::to_string(&kept) {
        Ok(query) if !query.is_empty() => format!("{}{path}?{query}", state.base_url),
        _ => format!("{}{path}", state.base_url),
    };
    let transaction_time = OffsetDateTime::now_utc();
    let control = Arc::new(ExportControl::default());
    let opt_outs = match &definition.opt_outs {
        OptOuts::Applied => "applied".to_owned(),
        OptOuts::Exempt { rule, .. } => format!("exempt {rule}"),
    };
    // Registered as running here before the row exists, so a status that finds the row in
    // progress and no live job here knows the job is not running here (see `status`).
    exports
        .running
        .lock()
        .map_err(|_| ApiError::Internal)?
        .insert(id.clone(), control.clone());
    let created = state
        .store
        .create_export_job(NewExportJob {
            id: id.clone(),
            owner: caller.partner.id.clone(),
            feed: definition.id.clone(),
            request,
            types: types.as_ref().map(|t| t.iter().cloned().collect()),
            since,
            key_version: key.version,
            opt_outs,
            created_at: transaction_time,
            instance_id: exports.instance_id.clone(),
        })
        .await;
    if let Err(error) = created {
        exports.finished_running(&id);
        return Err(error.into());
    }
    let export_job = ExportJob {
        definition: definition.clone(),
        key,
        data_dir: exports.export_root.clone(),
        export_id: id.clone(),
        types,
        since,
        start: Start::Rebuild,
        transaction_time,
    };
    let store = state.store.clone();
    // The feed stage's span: feed id, records released and outcome (no content, no ids).
    let span = tracing::info_span!(
        target: crate::telemetry::STAGE_TARGET,
        "feed",
        feed = %definition.id,
        files = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let run = run_job(store, exports.clone(), export_job, control);
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

fn progress(control: &ExportControl) -> ExportProgress {
    ExportProgress {
        scanned: control.scanned(),
        written: control.written(),
    }
}

/// Run one export in this process: progress to the job row every [`PROGRESS_INTERVAL`] (a job
/// cancelled on any instance stops here), then its end. A job cancelled meanwhile keeps no files.
async fn run_job(
    store: Arc<dyn Store>,
    exports: Arc<BulkExports>,
    job: ExportJob,
    control: Arc<ExportControl>,
) {
    let id = job.export_id.clone();
    let feed = job.definition.id.clone();
    let directory = export_dir(&job.data_dir, &feed, &id);
    let export =
        caregate_feeds::runner::run(store.clone(), exports.policy.clone(), job, control.clone());
    tokio::pin!(export);
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let outcome = loop {
        tokio::select! {
            outcome = &mut export => break outcome,
            _ = tick.tick() => match store.export_job_progress(&id, progress(&control)).await {
                Ok(true) => {}
                Ok(false) => control.cancel(),
                Err(error) => tracing::warn!(export = %id, %error, "bulk export: progress not recorded"),
            },
        }
    };
    let span = tracing::Span::current();
    let end = match outcome {
        Ok(manifest) => match serde_json::to_string(&manifest) {
            Ok(json) => {
                span.record("files", manifest.files.len());
                span.record("outcome", "ok");
                crate::metrics::global().feed_export(
                    &feed,
                    "ok",
                    Some(manifest.transaction_time.unix_timestamp() as f64),
                );
                ExportJobEnd::Complete { manifest: json }
            }
            Err(error) => {
                tracing::error!(export = %id, %feed, %error, "bulk export: the manifest does not serialise");
                ExportJobEnd::Failed {
                    error: FAILED.to_owned(),
                }
            }
        },
        Err(error) => {
            span.record("outcome", "failed");
            crate::metrics::global().feed_export(&feed, "failed", None);
            tracing::warn!(export = %id, %feed, %error, "bulk export failed");
            ExportJobEnd::Failed {
                error: FAILED.to_owned(),
            }
        }
    };
    let failed = matches!(end, ExportJobEnd::Failed { .. });
    match store.finish_export_job(&id, end).await {
        // A failed export's partial files are never served: they go now, not at expiry.
        Ok(true) if failed => {
            let _ = tokio::fs::remove_dir_all(&directory).await;
        }
        Ok(true) => {}
        // Cancelled while it ran (here or on another instance): its files go.
        Ok(false) => {
            let _ = tokio::fs::remove_dir_all(&directory).await;
        }
        // The row stays in progress; with this process no longer running it, `status` answers
        // it as failed, and the next start-up marks it so.
        Err(error) => {
            tracing::error!(export = %id, %feed, %error, "bulk export: the job's end was not recorded");
        }
    }
    exports.finished_running(&id);
}

fn request_path(definition: &FeedDefinition, group: bool) -> String {
    if group {
        format!("/fhir/Group/{}/$export", definition.id)
    } else {
        "/fhir/$export".to_owned()
    }
}

fn failed_outcome(message: &str) -> Response {
    // Bulk Data: a failed export's status is a 5xx with an OperationOutcome.
    fhir_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &OperationOutcome::single(Issue::request(IssueCode::Exception, message)).to_json(),
    )
}

fn in_progress(progress: ExportProgress) -> Response {
    let mut response = StatusCode::ACCEPTED.into_response();
    let text = format!(
        "scanned {} log entries, {} records written",
        progress.scanned, progress.written
    );
    if let Ok(value) = HeaderValue::from_str(&text) {
        response.headers_mut().insert("x-progress", value);
    }
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    response
}

/// The stored manifest of a complete job.
fn manifest_of(job: &StoredJob) -> Result<ExportManifest, ApiError> {
    let text = job.manifest.as_deref().ok_or(ApiError::Internal)?;
    serde_json::from_str(text).map_err(|error| {
        tracing::error!(export = %job.id, %error, "bulk export: the stored manifest does not parse");
        ApiError::Internal
    })
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
    // Looked at before the row: a job running here is registered before its row exists and
    // unregistered after its end is recorded, so "in progress, not running here" is reliable.
    let live = exports.running(&id)?;
    let job = exports.job(state.store.as_ref(), &id, &caller).await?;
    match job.state {
        ExportJobState::InProgress => {
            if let Some(control) = live {
                return Ok(in_progress(progress(&control)));
            }
            if job.instance_id == exports.instance_id {
                // Ours, yet not running in this process: it died before its end was recorded.
                return Ok(failed_outcome(INTERRUPTED));
            }
            let silent = OffsetDateTime::now_utc() - job.updated_at;
            if silent > STALE_AFTER {
                return Ok(failed_outcome(STOPPED));
            }
            Ok(in_progress(job.progress))
        }
        ExportJobState::Failed | ExportJobState::Cancelled => {
            Ok(failed_outcome(job.error.as_deref().unwrap_or(FAILED)))
        }
        ExportJobState::Complete => {
            let manifest = manifest_of(&job)?;
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
            // Bulk Data: "the server MAY return an Expires header indicating when the files
            // listed will no longer be available" — the end of the job's retention.
            if let Some(value) = expires(&job, exports.retention) {
                response.headers_mut().insert(header::EXPIRES, value);
            }
            Ok(response)
        }
    }
}

/// When `job`'s files stop being available, as an HTTP-date.
fn expires(job: &StoredJob, retention: Duration) -> Option<HeaderValue> {
    let ended = job.finished_at.unwrap_or(job.updated_at);
    let at = ended.saturating_add(time::Duration::try_from(retention).ok()?);
    let text = at.to_offset(time::UtcOffset::UTC).format(HTTP_DATE).ok()?;
    HeaderValue::from_str(&text).ok()
}

async fn cancel(
    State(state): State<SharedState>,
    exports: Option<Extension<Arc<BulkExports>>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let Some(Extension(exports)) = exports else {
        return Err(not_configured());
    };
    let job = exports.job(state.store.as_ref(), &id, &caller).await?;
    // A job running elsewhere learns of it at its next progress write and removes its files.
    let before = state
        .store
        .cancel_export_job(&job.id)
        .await?
        .ok_or(ApiError::NotFound)?;
    if let Some(control) = exports.running(&job.id)? {
        control.cancel();
    }
    if before != ExportJobState::InProgress {
        let _ = tokio::fs::remove_dir_all(exports.directory(&job)).await;
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

async fn file(
    State(state): State<SharedState>,
    exports: Option<Extension<Arc<BulkExports>>>,
    caller: Caller,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let Some(Extension(exports)) = exports else {
        return Err(not_configured());
    };
    let job = exports.job(state.store.as_ref(), &id, &caller).await?;
    if job.state != ExportJobState::Complete {
        return Err(ApiError::NotFound);
    }
    let manifest = manifest_of(&job)?;
    // Only names the manifest lists: never a path built from the request.
    let listed = manifest
        .files
        .iter()
        .find(|f| f.file_name == name)
        .ok_or(ApiError::NotFound)?;
    let path = exports.directory(&job).join(&listed.file_name);
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(error) => {
            // Listed but absent: the export directory is not shared with the instance that
            // wrote it, or the files were removed. Said plainly, without the path.
            tracing::warn!(export = %job.id, feed = %job.feed, %error, "bulk export: a listed file is not on this instance");
            return Ok(fhir_response(
                StatusCode::NOT_FOUND,
                &OperationOutcome::single(Issue::request(IssueCode::NotFound, FILE_ELSEWHERE))
                    .to_json(),
            ));
        }
    };
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

    #[test]
    fn expiry_and_expires_follow_the_retention() {
        let now = OffsetDateTime::from_unix_timestamp(1_760_000_000).unwrap();
        let day = Duration::from_secs(86_400);
        let expiry = expiry_at(now, day);
        assert_eq!(expiry.finished_before, now - time::Duration::DAY);
        assert_eq!(expiry.silent_before, now - time::Duration::DAY);
        // A tiny retention never expires a live export (one that wrote progress within a minute).
        let tiny = expiry_at(now, Duration::from_secs(2));
        assert_eq!(tiny.finished_before, now - time::Duration::seconds(2));
        assert_eq!(tiny.silent_before, now - time::Duration::seconds(60));
        assert_eq!(sweep_interval(day), Duration::from_secs(300));
        assert_eq!(
            sweep_interval(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
        assert_eq!(
            sweep_interval(Duration::from_secs(600)),
            Duration::from_secs(60)
        );

        let job = StoredJob {
            id: "0".repeat(32),
            owner: "icb".to_owned(),
            feed: "feed".to_owned(),
            request: String::new(),
            types: None,
            since: None,
            state: ExportJobState::Complete,
            progress: ExportProgress::default(),
            key_version: 1,
            opt_outs: "applied".to_owned(),
            manifest: None,
            error: None,
            created_at: now,
            updated_at: now,
            finished_at: Some(now),
            instance_id: "local".to_owned(),
        };
        // 2025-10-09T08:53:20Z + 1 day.
        assert_eq!(
            expires(&job, day).unwrap().to_str().unwrap(),
            "Fri, 10 Oct 2025 08:53:20 GMT"
        );
        assert!(!expiry.covers(&job));
        assert!(expiry_at(now + time::Duration::DAY + time::Duration::SECOND, day).covers(&job));
    }
}
