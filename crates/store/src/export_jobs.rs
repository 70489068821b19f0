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

/// A stored count.
pub(crate) fn count_param(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}
