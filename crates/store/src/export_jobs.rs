//! The durable registry of FHIR Bulk Data `$export` jobs (issue 5): one row per job, so a
//! job's status URL outlives the process that started it and answers on any instance sharing
//! the store (cluster mode).
//!
//! A row holds what the status, manifest, cancel and file routes need — owner partner, feed,
//! the kick-off parameters, state, progress, key version, the opt-out position applied, the
//! manifest (files and release report, JSON the store does not interpret), a partner-safe error,
//! times, and the instance running it — and never patient data: the manifest carries counts and
//! file names only, and the error is a fixed sentence chosen by the gateway.
//!
//! **States.** `in-progress` → `complete` | `failed` (only from `in-progress`: a job cancelled
//! meanwhile stays cancelled), and `in-progress` | `complete` | `failed` → `cancelled` (a DELETE).
//! An instance marks its own `in-progress` jobs `failed` at start-up
//! ([`ExportJobs::fail_interrupted_export_jobs`]): an export does not survive its process.
//!
//! **Retention.** A job that ended (complete, failed or cancelled) is kept until its retention
//! ends, then removed ([`ExportJobs::expired_export_jobs`], [`ExportJobs::remove_expired_export_job`]):
//! the gateway's sweep removes the job's files first, then the row, with a delete that re-checks
//! expiry in its `WHERE`, so several instances sweeping at once each remove a job at most once
//! between them and none of them fails. A job still `in-progress` whose row has not been written
//! for as long is expired too (its instance stopped and never came back to mark it failed).
//!
//! **Not the log.** Job rows are bookkeeping, not records: they take no sequence number and no
//! log lock, and carry no audit event (the requests that change them are audited by the edge).
//! Every write is still durable before it returns, like every other store write.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::StoreError;

/// Where an export job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportJobState {
    InProgress,
    Complete,
    Failed,
    /// Deleted by its owner (`DELETE` on the status URL): answered as if it never existed.
    Cancelled,
}

impl ExportJobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "in-progress",
            Self::Complete => "complete",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "in-progress" => Some(Self::InProgress),
            "complete" => Some(Self::Complete),
            "failed" => Some(Self::Failed),
            "cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }
}

/// How far a running export has got (for `X-Progress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExportProgress {
    /// Log entries read so far.
    pub scanned: u64,
    /// Records written so far.
    pub written: u64,
}

/// A new job, as the kick-off records it (state `in-progress`, no progress yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewExportJob {
    /// The export id (also the directory name of its files).
    pub id: String,
    /// The partner that kicked it off: the only one that may see it.
    pub owner: String,
    pub feed: String,
    /// The kick-off request URL, as the manifest's `request` repeats it.
    pub request: String,
    /// `_type`: the resource types asked for (`None`: all the feed carries).
    pub types: Option<Vec<String>>,
    /// `_since`.
    pub since: Option<OffsetDateTime>,
    /// The feed key version the export pseudonymises with.
    pub key_version: u32,
    /// The opt-out position applied (e.g. `applied`, `exempt NDOO-3`).
    pub opt_outs: String,
    /// The kick-off time (the manifest's `transactionTime`).
    pub created_at: OffsetDateTime,
    /// The instance that runs it.
    pub instance_id: String,
}

/// One stored job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportJob {
    pub id: String,
    pub owner: String,
    pub feed: String,
    pub request: String,
    pub types: Option<Vec<String>>,
    pub since: Option<OffsetDateTime>,
    pub state: ExportJobState,
    pub progress: ExportProgress,
    pub key_version: u32,
    pub opt_outs: String,
    /// The manifest (JSON), once complete.
    pub manifest: Option<String>,
    /// A sentence safe to show the owner, once failed.
    pub error: Option<String>,
    pub created_at: OffsetDateTime,
    /// When the running instance last reported progress (or the row last changed).
    pub updated_at: OffsetDateTime,
    pub finished_at: Option<OffsetDateTime>,
    pub instance_id: String,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportJobEnd {
    /// The export's manifest (JSON).
    Complete { manifest: String },
    /// A sentence safe to show the owner (the detail belongs in the logs).
    Failed { error: String },
}

/// When a job is past its retention (see the module docs). Instants, not durations, so the
/// caller decides the clock (the gateway's) and a sweep and its deletes agree on one cut-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportExpiry {
    /// A job that ended (complete, failed or cancelled) before this instant is expired.
    pub finished_before: OffsetDateTime,
    /// A job still `in-progress` whose row was last written before this instant is expired.
    pub silent_before: OffsetDateTime,
}

impl ExportExpiry {
    /// Whether `job` is expired under this cut-off (the test the store's queries make).
    pub fn covers(&self, job: &ExportJob) -> bool {
        match (job.state, job.finished_at) {
            (ExportJobState::InProgress, _) => job.updated_at < self.silent_before,
            (_, Some(finished)) => finished < self.finished_before,
            // An ended job always has `finished_at`; without one, its last change stands in.
            (_, None) => job.updated_at < self.finished_before,
        }
    }
}

/// The job registry. Every `Store` is one (`Store: ExportJobs`), so the gateway reaches it
/// through the same `Arc<dyn Store>`.
#[async_trait]
pub trait ExportJobs: Send + Sync {
    /// Record a new job, `in-progress`. `Conflict` if the id is taken.
    async fn create_export_job(&self, job: NewExportJob) -> Result<(), StoreError>;

    /// The job with this id, whatever its state or owner (the caller checks ownership).
    async fn export_job(&self, id: &str) -> Result<Option<ExportJob>, StoreError>;

    /// Record the progress of an `in-progress` job (and that its instance is alive). False if
    /// the job is no longer in progress — e.g. cancelled from another instance — so the runner
    /// should stop.
    async fn export_job_progress(
        &self,
        id: &str,
        progress: ExportProgress,
    ) -> Result<bool, StoreError>;

    /// End an `in-progress` job. False (and nothing written) if it was not in progress.
    async fn finish_export_job(&self, id: &str, end: ExportJobEnd) -> Result<bool, StoreError>;

    /// Cancel a job that is not cancelled yet; returns the state it had (`None`: no such job, or
    /// already cancelled).
    async fn cancel_export_job(&self, id: &str) -> Result<Option<ExportJobState>, StoreError>;

    /// At start-up: mark every `in-progress` job of `instance_id` `failed` with `error` (its
    /// process died with it). Returns the jobs so marked, so their partial files can go.
    async fn fail_interrupted_export_jobs(
        &self,
        instance_id: &str,
        error: &str,
    ) -> Result<Vec<ExportJob>, StoreError>;

    /// Up to `limit` jobs expired under `expiry`, longest-expired first, whatever their owner.
    /// Nothing is changed: the caller removes each job's files, then
    /// [`remove_expired_export_job`](Self::remove_expired_export_job).
    async fn expired_export_jobs(
        &self,
        expiry: ExportExpiry,
        limit: usize,
    ) -> Result<Vec<ExportJob>, StoreError>;

    /// Delete the row of job `id` if it is (still) expired under `expiry`. True if this call
    /// deleted it; false if it is gone (another sweeper was first) or not expired (e.g. a job
    /// that reported progress meanwhile), so exactly one of several concurrent sweepers sees true.
    async fn remove_expired_export_job(
        &self,
        id: &str,
        expiry: ExportExpiry,
    ) -> Result<bool, StoreError>;
}

/// `_type` as stored: comma-separated (resource type names contain no comma).
pub(crate) fn types_text(types: Option<&[String]>) -> Option<String> {
    types.map(|types| types.join(","))
}

pub(crate) fn types_from_text(text: Option<String>) -> Option<Vec<String>> {
    text.map(|text| {
        text.split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

/// The `WHERE` condition of an expired job, shared by both backends: the ended-before cut-off
/// is parameter `finished`, the silent-since cut-off `silent` (placeholders differ by backend).
pub(crate) fn expired_condition(finished: &str, silent: &str) -> String {
    format!(
        "((state <> 'in-progress' AND COALESCE(finished_at, updated_at) < {finished}) \
         OR (state = 'in-progress' AND updated_at < {silent}))"
    )
}

/// A stored count.
pub(crate) fn count_param(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}
