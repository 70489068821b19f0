//! The PostgreSQL side of the Bulk export job registry ([`crate::export_jobs`]), shared by every
//! instance: a job kicked off on one instance answers its status on any other.
//!
//! Job rows are not part of the log (no sequence number, no log lock, no audit event), so they
//! do not queue behind the writer's group commit: each change is one autocommitted statement on a
//! shared connection, durable when it returns (`synchronous_commit = on` on every connection).
//! Changes that depend on the current state (`finish`, `cancel`, progress) say so in their
//! `WHERE`, so two instances racing on one job (a DELETE on B while A finishes) leave exactly one
//! of the transitions.

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio_postgres::{Client, Row};

use crate::StoreError;
use crate::export_jobs::{
    ExportExpiry, ExportJob, ExportJobEnd, ExportJobState, ExportJobs, ExportProgress,
    NewExportJob, count_param, expired_condition, types_from_text, types_text,
};
use crate::postgres::{Fault, PostgresStore};

/// Schema step: the export job registry (the SQLite table with PostgreSQL types).
pub(super) const SCHEMA_EXPORT_JOBS: &str = "
-- One row per Bulk Data $export job: see caregate_store::export_jobs. No patient data.
CREATE TABLE export_jobs (
    id          TEXT        PRIMARY KEY,
    owner       TEXT        NOT NULL,
    feed        TEXT        NOT NULL,
    request     TEXT        NOT NULL,
    -- _type, comma-separated (NULL: every type the feed carries), and _since.
    types       TEXT,
    since       TIMESTAMPTZ,
    state       TEXT        NOT NULL
                CHECK (state IN ('in-progress', 'complete', 'failed', 'cancelled')),
    scanned     BIGINT      NOT NULL DEFAULT 0,
    written     BIGINT      NOT NULL DEFAULT 0,
    key_version BIGINT      NOT NULL,
    opt_outs    TEXT        NOT NULL,
    -- The manifest (JSON text: files and release report), once complete.
    manifest    TEXT,
    error       TEXT,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    instance_id TEXT        NOT NULL
);
CREATE INDEX export_jobs_running ON export_jobs (instance_id) WHERE state = 'in-progress';
";

const JOB_COLUMNS: &str = "j.id, j.owner, j.feed, j.request, j.types, j.since, j.state, \
     j.scanned, j.written, j.key_version, j.opt_outs, j.manifest, j.error, j.created_at, \
     j.updated_at, j.finished_at, j.instance_id";

/// A job from [`JOB_COLUMNS`].
fn job_from_row(row: &Row) -> Result<ExportJob, Fault> {
    let corrupt = |what: &str| Fault::Corrupt(format!("an export job has an invalid {what}"));
    let state: String = row.try_get(6)?;
    let scanned: i64 = row.try_get(7)?;
    let written: i64 = row.try_get(8)?;
    let key_version: i64 = row.try_get(9)?;
    Ok(ExportJob {
        id: row.try_get(0)?,
        owner: row.try_get(1)?,
        feed: row.try_get(2)?,
        request: row.try_get(3)?,
        types: types_from_text(row.try_get(4)?),
        since: row.try_get::<_, Option<OffsetDateTime>>(5)?,
        state: ExportJobState::parse(&state).ok_or_else(|| corrupt("state"))?,
        progress: ExportProgress {
            scanned: u64::try_from(scanned).map_err(|_| corrupt("progress"))?,
            written: u64::try_from(written).map_err(|_| corrupt("progress"))?,
        },
        key_version: u32::try_from(key_version).map_err(|_| corrupt("key version"))?,
        opt_outs: row.try_get(10)?,
        manifest: row.try_get(11)?,
        error: row.try_get(12)?,
        created_at: row.try_get::<_, OffsetDateTime>(13)?,
        updated_at: row.try_get::<_, OffsetDateTime>(14)?,
        finished_at: row.try_get::<_, Option<OffsetDateTime>>(15)?,
        instance_id: row.try_get(16)?,
    })
}

async fn create(client: &Client, job: &NewExportJob) -> Result<(), Fault> {
    let inserted = client
        .execute(
            "INSERT INTO export_jobs (id, owner, feed, request, types, since, state, key_version, \
             opt_outs, created_at, updated_at, instance_id) \
             VALUES ($1, $2, $3, $4, $5, $6, 'in-progress', $7, $8, $9, now(), $10) \
             ON CONFLICT (id) DO NOTHING",
            &[
                &job.id,
                &job.owner,
                &job.feed,
                &job.request,
                &types_text(job.types.as_deref()),
                &job.since,
                &i64::from(job.key_version),
                &job.opt_outs,
                &job.created_at,
                &job.instance_id,
            ],
        )
        .await?;
    if inserted == 0 {
        return Err(Fault::Refused(StoreError::Conflict));
    }
    Ok(())
}

async fn select(client: &Client, id: &str) -> Result<Option<ExportJob>, Fault> {
    client
        .query_opt(
            &format!("SELECT {JOB_COLUMNS} FROM export_jobs j WHERE j.id = $1"),
            &[&id],
        )
        .await?
        .as_ref()
        .map(job_from_row)
        .transpose()
}

async fn progress(client: &Client, id: &str, progress: ExportProgress) -> Result<bool, Fault> {
    let changed = client
        .execute(
            "UPDATE export_jobs SET scanned = $2, written = $3, updated_at = now() \
             WHERE id = $1 AND state = 'in-progress'",
            &[
                &id,
                &count_param(progress.scanned),
                &count_param(progress.written),
            ],
        )
        .await?;
    Ok(changed > 0)
}

async fn finish(client: &Client, id: &str, end: &ExportJobEnd) -> Result<bool, Fault> {
    let (state, manifest, error) = match end {
        ExportJobEnd::Complete { manifest } => (ExportJobState::Complete, Some(manifest), None),
        ExportJobEnd::Failed { error } => (ExportJobState::Failed, None, Some(error)),
    };
    let changed = client
        .execute(
            "UPDATE export_jobs SET state = $2, manifest = $3, error = $4, updated_at = now(), \
             finished_at = now() WHERE id = $1 AND state = 'in-progress'",
            &[&id, &state.as_str(), &manifest, &error],
        )
        .await?;
    Ok(changed > 0)
}

async fn cancel(client: &Client, id: &str) -> Result<Option<ExportJobState>, Fault> {
    // The old state comes from the locked row the update replaces (`RETURNING` sees new values).
    let row = client
        .query_opt(
            "UPDATE export_jobs j SET state = 'cancelled', updated_at = now(), \
             finished_at = COALESCE(j.finished_at, now()) \
             FROM (SELECT id, state FROM export_jobs WHERE id = $1 FOR UPDATE) old \
             WHERE j.id = old.id AND old.state <> 'cancelled' RETURNING old.state",
            &[&id],
        )
        .await?;
    match row {
        None => Ok(None),
        Some(row) => {
            let state: String = row.try_get(0)?;
            ExportJobState::parse(&state)
                .map(Some)
                .ok_or_else(|| Fault::Corrupt("an export job has an invalid state".to_owned()))
        }
    }
}

async fn fail_interrupted(
    client: &Client,
    instance_id: &str,
    error: &str,
) -> Result<Vec<ExportJob>, Fault> {
    let rows = client
        .query(
            &format!(
                "UPDATE export_jobs j SET state = 'failed', error = $2, updated_at = now(), \
                 finished_at = now() WHERE j.instance_id = $1 AND j.state = 'in-progress' \
                 RETURNING {JOB_COLUMNS}"
            ),
            &[&instance_id, &error],
        )
        .await?;
    let mut jobs = rows
        .iter()
        .map(job_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    jobs.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(jobs)
}

async fn select_expired(
    client: &Client,
    expiry: ExportExpiry,
    limit: usize,
) -> Result<Vec<ExportJob>, Fault> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    // Unqualified column names in the condition resolve to the one table `j`.
    client
        .query(
            &format!(
                "SELECT {JOB_COLUMNS} FROM export_jobs j WHERE {} \
                 ORDER BY COALESCE(j.finished_at, j.updated_at), j.id LIMIT $3",
                expired_condition("$1", "$2")
            ),
            &[&expiry.finished_before, &expiry.silent_before, &limit],
        )
        .await?
        .iter()
        .map(job_from_row)
        .collect()
}

/// One autocommitted conditional `DELETE`: of several instances sweeping at once, the row lock
/// lets exactly one delete it; the others re-check the `WHERE`, find no row and answer false.
async fn remove_expired(client: &Client, id: &str, expiry: ExportExpiry) -> Result<bool, Fault> {
    let removed = client
        .execute(
            &format!(
                "DELETE FROM export_jobs WHERE id = $1 AND {}",
                expired_condition("$2", "$3")
            ),
            &[&id, &expiry.finished_before, &expiry.silent_before],
        )
        .await?;
    Ok(removed > 0)
}

#[async_trait]
impl ExportJobs for PostgresStore {
    async fn create_export_job(&self, job: NewExportJob) -> Result<(), StoreError> {
        self.health.check()?;
        let client = self.reader().await?;
        self.answer(create(&client, &job).await)
    }

    async fn export_job(&self, id: &str) -> Result<Option<ExportJob>, StoreError> {
        let client = self.reader().await?;
        self.answer(select(&client, id).await)
    }

    async fn export_job_progress(
        &self,
        id: &str,
        update: ExportProgress,
    ) -> Result<bool, StoreError> {
        self.health.check()?;
        let client = self.reader().await?;
        self.answer(progress(&client, id, update).await)
    }

    async fn finish_export_job(&self, id: &str, end: ExportJobEnd) -> Result<bool, StoreError> {
        self.health.check()?;
        let client = self.reader().await?;
        self.answer(finish(&client, id, &end).await)
    }

    async fn cancel_export_job(&self, id: &str) -> Result<Option<ExportJobState>, StoreError> {
        self.health.check()?;
        let client = self.reader().await?;
        self.answer(cancel(&client, id).await)
    }

    async fn fail_interrupted_export_jobs(
        &self,
        instance_id: &str,
        error: &str,
    ) -> Result<Vec<ExportJob>, StoreError> {
        self.health.check()?;
        let client = self.reader().await?;
        self.answer(fail_interrupted(&client, instance_id, error).await)
    }

    async fn expired_export_jobs(
        &self,
        expiry: ExportExpiry,
        limit: usize,
    ) -> Result<Vec<ExportJob>, StoreError> {
        let client = self.reader().await?;
        self.answer(select_expired(&client, expiry, limit).await)
    }

    async fn remove_expired_export_job(
        &self,
        id: &str,
        expiry: ExportExpiry,
    ) -> Result<bool, StoreError> {
        self.health.check()?;
        let client = self.reader().await?;
        self.answer(remove_expired(&client, id, expiry).await)
    }
}
