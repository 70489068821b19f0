//! The SQLite side of the Bulk export job registry ([`crate::export_jobs`]): the `export_jobs`
//! table, written only through the store's single writer thread ([`ExportJobWork`], so a write
//! is durable when it returns, like every other) and read on the read pool.
//!
//! A child module of [`super`] (declared there with `#[path]`) so it shares the store's private
//! helpers (timestamps, `Fault`, the writer's request queue) without widening their visibility.

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{Answer, BatchClock, Fault, SqliteStore, Work, parse_timestamp, timestamp_text};
use crate::StoreError;
use crate::export_jobs::{
    ExportExpiry, ExportJob, ExportJobEnd, ExportJobState, ExportJobs, ExportProgress,
    NewExportJob, count_param, expired_condition, types_from_text, types_text,
};

/// Schema step: the export job registry.
pub(super) const SCHEMA_EXPORT_JOBS: &str = "
-- One row per Bulk Data $export job: see caregate_store::export_jobs. No patient data.
CREATE TABLE export_jobs (
    id          TEXT    PRIMARY KEY,
    owner       TEXT    NOT NULL,
    feed        TEXT    NOT NULL,
    request     TEXT    NOT NULL,
    -- _type, comma-separated (NULL: every type the feed carries), and _since.
    types       TEXT,
    since       TEXT,
    state       TEXT    NOT NULL
                CHECK (state IN ('in-progress', 'complete', 'failed', 'cancelled')),
    scanned     INTEGER NOT NULL DEFAULT 0,
    written     INTEGER NOT NULL DEFAULT 0,
    key_version INTEGER NOT NULL,
    opt_outs    TEXT    NOT NULL,
    -- The manifest (JSON: files and release report), once complete.
    manifest    TEXT,
    error       TEXT,
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    finished_at TEXT,
    instance_id TEXT    NOT NULL
);
CREATE INDEX export_jobs_running ON export_jobs (instance_id) WHERE state = 'in-progress';
";

const JOB_COLUMNS: &str = "id, owner, feed, request, types, since, state, scanned, written, \
     key_version, opt_outs, manifest, error, created_at, updated_at, finished_at, instance_id";

const INSERT_JOB: &str = "INSERT INTO export_jobs (id, owner, feed, request, types, since, \
     state, key_version, opt_outs, created_at, updated_at, instance_id) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'in-progress', ?7, ?8, ?9, ?10, ?11)";

/// Writer requests for the job registry.
pub(super) enum ExportJobWork {
    Create(NewExportJob),
    Progress {
        id: String,
        progress: ExportProgress,
    },
    Finish {
        id: String,
        end: ExportJobEnd,
    },
    Cancel {
        id: String,
    },
    FailInterrupted {
        instance_id: String,
        error: String,
    },
    /// Delete a row if it is still expired (the retention sweep).
    RemoveExpired {
        id: String,
        expiry: ExportExpiry,
    },
}

/// The writer's answers to [`ExportJobWork`].
pub(super) enum ExportJobAnswer {
    Changed(bool),
    Cancelled(Option<ExportJobState>),
    Failed(Vec<ExportJob>),
}

/// A row's columns as stored, converted by [`RawJob::into_job`] outside rusqlite's closure.
struct RawJob {
    id: String,
    owner: String,
    feed: String,
    request: String,
    types: Option<String>,
    since: Option<String>,
    state: String,
    scanned: i64,
    written: i64,
    key_version: i64,
    opt_outs: String,
    manifest: Option<String>,
    error: Option<String>,
    created_at: String,
    updated_at: String,
    finished_at: Option<String>,
    instance_id: String,
}

impl RawJob {
    /// [`JOB_COLUMNS`], in order.
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            owner: row.get(1)?,
            feed: row.get(2)?,
            request: row.get(3)?,
            types: row.get(4)?,
            since: row.get(5)?,
            state: row.get(6)?,
            scanned: row.get(7)?,
            written: row.get(8)?,
            key_version: row.get(9)?,
            opt_outs: row.get(10)?,
            manifest: row.get(11)?,
            error: row.get(12)?,
            created_at: row.get(13)?,
            updated_at: row.get(14)?,
            finished_at: row.get(15)?,
            instance_id: row.get(16)?,
        })
    }

    fn into_job(self) -> Result<ExportJob, Fault> {
        let corrupt = |what: &str| Fault::Corrupt(format!("an export job has an invalid {what}"));
        Ok(ExportJob {
            state: ExportJobState::parse(&self.state).ok_or_else(|| corrupt("state"))?,
            progress: ExportProgress {
                scanned: u64::try_from(self.scanned).map_err(|_| corrupt("progress"))?,
                written: u64::try_from(self.written).map_err(|_| corrupt("progress"))?,
            },
            key_version: u32::try_from(self.key_version).map_err(|_| corrupt("key version"))?,
            since: self.since.as_deref().map(parse_timestamp).transpose()?,
            created_at: parse_timestamp(&self.created_at)?,
            updated_at: parse_timestamp(&self.updated_at)?,
            finished_at: self
                .finished_at
                .as_deref()
                .map(parse_timestamp)
                .transpose()?,
            types: types_from_text(self.types),
            id: self.id,
            owner: self.owner,
            feed: self.feed,
            request: self.request,
            opt_outs: self.opt_outs,
            manifest: self.manifest,
            error: self.error,
            instance_id: self.instance_id,
        })
    }
}

fn select_job(conn: &Connection, id: &str) -> Result<Option<ExportJob>, Fault> {
    let raw = conn
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM export_jobs WHERE id = ?1"
        ))?
        .query_row(params![id], RawJob::from_row)
        .optional()?;
    raw.map(RawJob::into_job).transpose()
}

/// Apply one registry request inside the writer's transaction (its own savepoint).
pub(super) fn apply(
    conn: &Connection,
    work: &ExportJobWork,
    clock: &BatchClock,
) -> Result<Answer, Fault> {
    let answer = match work {
        ExportJobWork::Create(job) => {
            if select_job(conn, &job.id)?.is_some() {
                return Err(Fault::Refused(StoreError::Conflict));
            }
            let since = job.since.map(timestamp_text).transpose()?;
            conn.prepare_cached(INSERT_JOB)?.execute(params![
                job.id,
                job.owner,
                job.feed,
                job.request,
                types_text(job.types.as_deref()),
                since,
                i64::from(job.key_version),
                job.opt_outs,
                timestamp_text(job.created_at)?,
                clock.text,
                job.instance_id,
            ])?;
            ExportJobAnswer::Changed(true)
        }
        ExportJobWork::Progress { id, progress } => {
            let changed = conn
                .prepare_cached(
                    "UPDATE export_jobs SET scanned = ?2, written = ?3, updated_at = ?4 \
                     WHERE id = ?1 AND state = 'in-progress'",
                )?
                .execute(params![
                    id,
                    count_param(progress.scanned),
                    count_param(progress.written),
                    clock.text
                ])?;
            ExportJobAnswer::Changed(changed > 0)
        }
        ExportJobWork::Finish { id, end } => {
            let (state, manifest, error) = match end {
                ExportJobEnd::Complete { manifest } => {
                    (ExportJobState::Complete, Some(manifest), None)
                }
                ExportJobEnd::Failed { error } => (ExportJobState::Failed, None, Some(error)),
            };
            let changed = conn
                .prepare_cached(
                    "UPDATE export_jobs SET state = ?2, manifest = ?3, error = ?4, \
                     updated_at = ?5, finished_at = ?5 WHERE id = ?1 AND state = 'in-progress'",
                )?
                .execute(params![id, state.as_str(), manifest, error, clock.text])?;
            ExportJobAnswer::Changed(changed > 0)
        }
        ExportJobWork::Cancel { id } => {
            let before = select_job(conn, id)?
                .map(|job| job.state)
                .filter(|state| *state != ExportJobState::Cancelled);
            if before.is_some() {
                conn.prepare_cached(
                    "UPDATE export_jobs SET state = 'cancelled', updated_at = ?2, \
                     finished_at = COALESCE(finished_at, ?2) WHERE id = ?1",
                )?
                .execute(params![id, clock.text])?;
            }
            ExportJobAnswer::Cancelled(before)
        }
        ExportJobWork::FailInterrupted { instance_id, error } => {
            let ids: Vec<String> = conn
                .prepare_cached(
                    "SELECT id FROM export_jobs WHERE instance_id = ?1 AND state = 'in-progress' \
                     ORDER BY created_at, id",
                )?
                .query_map(params![instance_id], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut failed = Vec::with_capacity(ids.len());
            for id in ids {
                conn.prepare_cached(
                    "UPDATE export_jobs SET state = 'failed', error = ?2, updated_at = ?3, \
                     finished_at = ?3 WHERE id = ?1",
                )?
                .execute(params![id, error, clock.text])?;
                if let Some(job) = select_job(conn, &id)? {
                    failed.push(job);
                }
            }
            ExportJobAnswer::Failed(failed)
        }
        ExportJobWork::RemoveExpired { id, expiry } => {
            let removed = conn
                .prepare_cached(&format!(
                    "DELETE FROM export_jobs WHERE id = ?1 AND {}",
                    expired_condition("?2", "?3")
                ))?
                .execute(params![
                    id,
                    timestamp_text(expiry.finished_before)?,
                    timestamp_text(expiry.silent_before)?,
                ])?;
            ExportJobAnswer::Changed(removed > 0)
        }
    };
    Ok(Answer::ExportJob(answer))
}

impl SqliteStore {
    async fn export_job_request(&self, work: ExportJobWork) -> Result<ExportJobAnswer, StoreError> {
        match self.request(Work::ExportJob(work)).await? {
            Answer::ExportJob(answer) => Ok(answer),
            _ => Err(mismatch()),
        }
    }

    async fn export_job_changed(&self, work: ExportJobWork) -> Result<bool, StoreError> {
        match self.export_job_request(work).await? {
            ExportJobAnswer::Changed(changed) => Ok(changed),
            _ => Err(mismatch()),
        }
    }
}

#[async_trait]
impl ExportJobs for SqliteStore {
    async fn create_export_job(&self, job: NewExportJob) -> Result<(), StoreError> {
        self.export_job_changed(ExportJobWork::Create(job))
            .await
            .map(drop)
    }

    async fn export_job(&self, id: &str) -> Result<Option<ExportJob>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| select_job(conn, &id)).await
    }

    async fn export_job_progress(
        &self,
        id: &str,
        progress: ExportProgress,
    ) -> Result<bool, StoreError> {
        self.export_job_changed(ExportJobWork::Progress {
            id: id.to_owned(),
            progress,
        })
        .await
    }

    async fn finish_export_job(&self, id: &str, end: ExportJobEnd) -> Result<bool, StoreError> {
        self.export_job_changed(ExportJobWork::Finish {
            id: id.to_owned(),
            end,
        })
        .await
    }

    async fn cancel_export_job(&self, id: &str) -> Result<Option<ExportJobState>, StoreError> {
        match self
            .export_job_request(ExportJobWork::Cancel { id: id.to_owned() })
            .await?
        {
            ExportJobAnswer::Cancelled(before) => Ok(before),
            _ => Err(mismatch()),
        }
    }

    async fn fail_interrupted_export_jobs(
        &self,
        instance_id: &str,
        error: &str,
    ) -> Result<Vec<ExportJob>, StoreError> {
        let work = ExportJobWork::FailInterrupted {
            instance_id: instance_id.to_owned(),
            error: error.to_owned(),
        };
        match self.export_job_request(work).await? {
            ExportJobAnswer::Failed(jobs) => Ok(jobs),
            _ => Err(mismatch()),
        }
    }

    async fn expired_export_jobs(
        &self,
        expiry: ExportExpiry,
        limit: usize,
    ) -> Result<Vec<ExportJob>, StoreError> {
        self.read(move |conn| select_expired(conn, expiry, limit))
            .await
    }

    async fn remove_expired_export_job(
        &self,
        id: &str,
        expiry: ExportExpiry,
    ) -> Result<bool, StoreError> {
        self.export_job_changed(ExportJobWork::RemoveExpired {
            id: id.to_owned(),
            expiry,
        })
        .await
    }
}

fn select_expired(
    conn: &Connection,
    expiry: ExportExpiry,
    limit: usize,
) -> Result<Vec<ExportJob>, Fault> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let raws = conn
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM export_jobs WHERE {} \
             ORDER BY COALESCE(finished_at, updated_at), id LIMIT ?3",
            expired_condition("?1", "?2")
        ))?
        .query_map(
            params![
                timestamp_text(expiry.finished_before)?,
                timestamp_text(expiry.silent_before)?,
                limit
            ],
            RawJob::from_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    raws.into_iter().map(RawJob::into_job).collect()
}

fn mismatch() -> StoreError {
    StoreError::Failed("the store writer answered a different request".to_owned())
}
