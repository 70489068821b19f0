//! The embedded store: one SQLite file (`<data dir>/caregate.db`) behind the [`Store`] trait.
//!
//! **Group commit.** One dedicated writer thread owns the only write connection. [`Store::submit`]
//! queues the submission with a reply channel and waits. The writer blocks for the first queued
//! request, then takes whatever else is already queued (up to [`SqliteOptions::max_batch`])
//! without waiting for more, opens one `BEGIN IMMEDIATE` transaction, applies each request inside
//! its own `SAVEPOINT` (a request refused with `Conflict` or `PreconditionFailed` is rolled back to
//! its savepoint alone; the others go on), and `COMMIT`s once. With `journal_mode=WAL` and
//! `synchronous=FULL` that commit is the single fsync the whole batch shares; only after it
//! returns does the writer answer the batch, so an `Ok` always means durable (DESIGN.md invariant
//! 1). Under load, batches grow by themselves: requests arriving during one fsync ride the next.
//!
//! **Fail-stop.** Disk full, a busy or locked database and out-of-memory abort the batch with
//! nothing written and answer [`StoreError::Unavailable`] (503 and retry; the store recovers once
//! space is freed, DOMAIN.md B2 F3). An I/O error (including a failed fsync), corruption, or any
//! unexpected failure of `BEGIN`/`COMMIT` answers [`StoreError::Failed`] and *poisons* the store:
//! every later write is refused with `Failed` at once, because after a failed fsync the kernel may
//! have dropped the dirty pages and a later "successful" commit would acknowledge data that is
//! not there (PostgreSQL's "fsyncgate" rule, DOMAIN.md B2 F4). Only a restart clears it.
//!
//! Reads use a small pool of read-only connections on the blocking thread pool; under WAL they
//! never wait for the writer. Dropping the store lets the writer finish and commit everything
//! already queued; [`SqliteStore::close`] also waits for that to happen.
//!
//! The schema uses plain table names (`log`, `current_versions`, `identifiers`,
//! `idempotency_keys`, `audit_events`, `cursors`) so IG officers can open the file with any SQLite
//! tool. Timestamps are RFC 3339 text in UTC with exactly six fractional digits, so they also sort
//! and compare correctly as text.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use caregate_audit::checkpoint::{
    Checkpoint, CheckpointSchedule, CheckpointSigner, SignedCheckpoint,
};
use caregate_audit::event_hash::{canonical_event_bytes, event_leaf_hash};
use caregate_audit::{AuditEvent, Frontier};
use rusqlite::config::DbConfig;
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior, params,
};
use serde::Serialize;
use time::format_description::BorrowedFormatItem;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{
    AuditPage, AuditQuery, AuditReview, EntryOutcome, EntryReceipt, LogEntry, Receipt, RecordWrite,
    Seq, Store, StoreError, StoredAuditEvent, Submission, WriteMode,
};

#[path = "sqlite_query.rs"]
mod query;
pub use query::AuditReader;

#[path = "sqlite_delivery.rs"]
mod delivery;

#[path = "sqlite_export_jobs.rs"]
mod export_jobs;

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "caregate.db";

/// How long a connection waits for a lock held by another process (e.g. an IG officer's
/// `sqlite3` shell) before the operation fails with `SQLITE_BUSY` (→ `Unavailable`).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Queued requests per unit of `max_batch`. Beyond that, `submit` waits for room (backpressure)
/// rather than letting the queue grow without bound.
const QUEUE_BATCHES: usize = 4;

/// Timestamps as stored: UTC, microseconds, fixed width, so text order is time order.
const TIMESTAMP_FORMAT: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// Schema migrations; step `i` takes `PRAGMA user_version` from `i` to `i + 1`. Append new steps;
/// never edit a released one.
const MIGRATIONS: &[&str] = &[
    SCHEMA_V1,
    query::SCHEMA_V2,
    delivery::SCHEMA_DELIVERY,
    export_jobs::SCHEMA_EXPORT_JOBS,
];

const SCHEMA_V1: &str = "
-- The committed log: every version of every record, in commit order. seq is never reused.
CREATE TABLE log (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    partner       TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    version_id    INTEGER NOT NULL,
    content       BLOB    NOT NULL,
    content_hash  BLOB    NOT NULL,
    nhs_number    TEXT,
    decision      BLOB,
    committed_at  TEXT    NOT NULL,
    UNIQUE (partner, resource_type, id, version_id)
);
CREATE INDEX log_by_nhs_number ON log (nhs_number, seq) WHERE nhs_number IS NOT NULL;

-- The current version of each resource; ids are scoped to the partner that sent them.
CREATE TABLE current_versions (
    partner       TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    version_id    INTEGER NOT NULL,
    seq           INTEGER NOT NULL REFERENCES log (seq),
    content_hash  BLOB    NOT NULL,
    PRIMARY KEY (partner, resource_type, id)
) WITHOUT ROWID;

-- Business identifier tokens (system|value) of current versions, for conditional create.
-- The first resource to claim a token keeps it while its current version carries it.
CREATE TABLE identifiers (
    partner       TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    token         TEXT NOT NULL,
    id            TEXT NOT NULL,
    PRIMARY KEY (partner, resource_type, token)
) WITHOUT ROWID;
CREATE INDEX identifiers_by_resource ON identifiers (partner, resource_type, id);

-- The first receipt given for each (partner, idempotency key).
CREATE TABLE idempotency_keys (
    partner    TEXT NOT NULL,
    key        TEXT NOT NULL,
    receipt    TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (partner, key)
) WITHOUT ROWID;

-- Audit events in commit order; event holds the full AuditEvent as JSON, the other columns are
-- copies for querying.
CREATE TABLE audit_events (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded      TEXT NOT NULL,
    request_id    TEXT NOT NULL,
    partner_id    TEXT,
    action        TEXT NOT NULL,
    outcome       TEXT NOT NULL,
    resource_type TEXT,
    resource_id   TEXT,
    patient       TEXT,
    -- The canonical JSON of the AuditEvent (caregate_audit::event_hash), hashed as stored.
    event         TEXT NOT NULL,
    -- RFC 9162 leaf hash of (seq, event): the Merkle tree over these is the tamper evidence.
    leaf_hash     BLOB NOT NULL
);
CREATE INDEX audit_events_by_patient ON audit_events (patient, seq) WHERE patient IS NOT NULL;
CREATE INDEX audit_events_by_recorded ON audit_events (recorded);
CREATE INDEX audit_events_by_partner ON audit_events (partner_id, seq);

-- The audit Merkle tree's compact frontier after the last committed event (one row).
CREATE TABLE audit_tree (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    size     INTEGER NOT NULL,
    frontier BLOB    NOT NULL
);

-- Signed checkpoints (signed tree heads) over the audit log, in C2SP signed-note text.
CREATE TABLE audit_checkpoints (
    size       INTEGER PRIMARY KEY,
    checkpoint TEXT    NOT NULL,
    created_at TEXT    NOT NULL
);

-- Each reader's durable position in the log.
CREATE TABLE cursors (
    reader TEXT    PRIMARY KEY,
    seq    INTEGER NOT NULL
) WITHOUT ROWID;
";

const INSERT_LOG: &str = "INSERT INTO log (partner, resource_type, id, version_id, content, \
     content_hash, nhs_number, decision, committed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";
const UPSERT_CURRENT: &str = "INSERT INTO current_versions (partner, resource_type, id, \
     version_id, seq, content_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
     ON CONFLICT (partner, resource_type, id) DO UPDATE SET version_id = excluded.version_id, \
     seq = excluded.seq, content_hash = excluded.content_hash";
// Two statements rather than a join with `log`: SQLite marks that join to be re-prepared every
// time its parameters are bound (`log` has a partial index; measured with
// `StatementStatus::RePrepare`), ~10 % of the writer's time in `sqlite3Reprepare`. The commit time
// is needed only when the receipt reports the current version (`Unchanged`, `Existing`).
const SELECT_CURRENT: &str = "SELECT version_id, seq, content_hash FROM current_versions \
     WHERE partner = ?1 AND resource_type = ?2 AND id = ?3";
const SELECT_COMMITTED_AT: &str = "SELECT committed_at FROM log WHERE seq = ?1";
const DELETE_IDENTIFIERS: &str =
    "DELETE FROM identifiers WHERE partner = ?1 AND resource_type = ?2 AND id = ?3";
const INSERT_IDENTIFIER: &str = "INSERT INTO identifiers (partner, resource_type, token, id) \
     VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING";
const SELECT_IDENTIFIED: &str =
    "SELECT id FROM identifiers WHERE partner = ?1 AND resource_type = ?2 AND token = ?3";
const SELECT_RECEIPT: &str = "SELECT receipt FROM idempotency_keys WHERE partner = ?1 AND key = ?2";
const INSERT_RECEIPT: &str =
    "INSERT INTO idempotency_keys (partner, key, receipt, created_at) VALUES (?1, ?2, ?3, ?4)";
const INSERT_AUDIT: &str = "INSERT INTO audit_events (seq, recorded, request_id, partner_id, \
     action, outcome, resource_type, resource_id, patient, event, leaf_hash) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
const SAVE_AUDIT_TREE: &str = "INSERT INTO audit_tree (id, size, frontier) VALUES (1, ?1, ?2) \
     ON CONFLICT (id) DO UPDATE SET size = excluded.size, frontier = excluded.frontier";
const INSERT_CHECKPOINT: &str =
    "INSERT INTO audit_checkpoints (size, checkpoint, created_at) VALUES (?1, ?2, ?3)";
const UPSERT_CURSOR: &str = "INSERT INTO cursors (reader, seq) VALUES (?1, ?2) \
     ON CONFLICT (reader) DO UPDATE SET seq = excluded.seq";
const SAVEPOINT_REQUEST: &str = "SAVEPOINT request";
const RELEASE_REQUEST: &str = "RELEASE request";
const ROLLBACK_REQUEST: &str = "ROLLBACK TO request";
const LOG_COLUMNS: &str = "l.seq, l.partner, l.resource_type, l.id, l.version_id, l.content, \
     l.content_hash, l.nhs_number, l.decision, l.committed_at";

/// Tuning for [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The most submissions one commit (one fsync) may carry.
    pub max_batch: usize,
    /// Read-only connections kept for `read_*` and `load_cursor`.
    pub read_connections: usize,
    /// Who signs checkpoints of the audit log, and how often. `None`: the Merkle tree is kept
    /// (every event has its leaf hash) but no checkpoints are signed.
    pub audit_signing: Option<AuditSigning>,
}

/// The audit log's checkpoint signer and schedule.
#[derive(Debug, Clone)]
pub struct AuditSigning {
    pub signer: Arc<CheckpointSigner>,
    pub schedule: CheckpointSchedule,
}

impl SqliteOptions {
    /// Default for [`SqliteOptions::max_batch`].
    pub const fn default_max_batch() -> usize {
        512
    }

    /// Default for [`SqliteOptions::read_connections`].
    pub const fn default_read_connections() -> usize {
        4
    }
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            max_batch: Self::default_max_batch(),
            read_connections: Self::default_read_connections(),
            audit_signing: None,
        }
    }
}

/// Counters that show batching at work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Submissions the writer has taken from the queue (cursor saves not included).
    pub submissions: u64,
    /// Transactions committed (each one fsync), including cursor-only ones.
    pub commits: u64,
}

/// The embedded SQLite store. See the module docs for group commit and the fail-stop rule.
pub struct SqliteStore {
    path: PathBuf,
    // Field order is drop order: read connections close before the writer is told to stop.
    readers: Arc<ReadPool>,
    jobs: mpsc::Sender<Job>,
    writer: JoinHandle<()>,
    health: Arc<Health>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("stats", &self.stats())
            .field("poisoned", &self.health.poisoned.get().is_some())
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Open (creating if needed) `dir/caregate.db`, bring its schema up to date and start the
    /// writer thread. Blocking: call it at startup, not on a request path.
    pub fn open(dir: &Path, options: SqliteOptions) -> Result<Self, StoreError> {
        Self::open_with(dir, options, |_| Ok(()))
    }

    /// [`SqliteStore::open`], with a hook that may adjust the write connection before use
    /// (tests use it to impose a size limit and provoke `SQLITE_FULL`).
    fn open_with(
        dir: &Path,
        options: SqliteOptions,
        prepare_writer: impl FnOnce(&Connection) -> rusqlite::Result<()>,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|error| {
            StoreError::Failed(format!("cannot create the data directory: {error}"))
        })?;
        let path = dir.join(DATABASE_FILE);
        let mut conn = open_writer(&path).map_err(opening_error)?;
        prepare_writer(&conn).map_err(|error| opening_error(error.into()))?;
        migrate(&mut conn).map_err(opening_error)?;

        let read_connections = options.read_connections.max(1);
        let idle = (0..read_connections)
            .map(|_| open_reader(&path))
            .collect::<Result<Vec<_>, _>>()
            .map_err(opening_error)?;
        let readers = Arc::new(ReadPool {
            path: path.clone(),
            idle: Mutex::new(idle),
            permits: Arc::new(Semaphore::new(read_connections)),
        });

        let max_batch = options.max_batch.max(1);
        let health = Arc::new(Health::default());
        let (jobs, queue) = mpsc::channel(max_batch.saturating_mul(QUEUE_BATCHES));
        let tree = AuditTree::load(&conn, options.audit_signing.clone()).map_err(opening_error)?;
        let (stop_checkpointer, checkpointer_stop) = std::sync::mpsc::channel();
        let checkpointer = Checkpointer::open(&path, checkpointer_stop).map_err(opening_error)?;
        let checkpointer = std::thread::Builder::new()
            .name("caregate-store-checkpointer".to_owned())
            .spawn(move || checkpointer.run())
            .map_err(|error| {
                StoreError::Failed(format!("cannot start the store checkpoint thread: {error}"))
            })?;
        let writer = Writer {
            conn,
            queue,
            max_batch,
            health: Arc::clone(&health),
            tree,
            checkpointer: Some((stop_checkpointer, checkpointer)),
        };
        let writer = std::thread::Builder::new()
            .name("caregate-store-writer".to_owned())
            .spawn(move || writer.run())
            .map_err(|error| {
                StoreError::Failed(format!("cannot start the store writer thread: {error}"))
            })?;
        tracing::info!(path = %path.display(), max_batch, read_connections, "store opened");
        Ok(Self {
            path,
            jobs,
            writer,
            readers,
            health,
        })
    }

    /// Submissions taken and commits made so far.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            submissions: self.health.submissions.load(Ordering::Relaxed),
            commits: self.health.commits.load(Ordering::Relaxed),
        }
    }

    /// Total time the writer spent in batch transactions (statements and fsync), for metrics.
    pub fn commit_time(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.health.commit_nanos.load(Ordering::Relaxed))
    }

    /// Whether the store has fail-stopped (it refuses every write until restart), for readiness.
    pub fn has_failed(&self) -> bool {
        self.health.poisoned.get().is_some()
    }

    /// Stop taking requests, let the writer commit everything already queued, and wait for it to
    /// exit. When this returns, every queued submission has been answered and nothing
    /// acknowledged can be lost. Errors if the writer thread died or the store had failed
    /// (poisoned), so a shutdown can report it.
    pub async fn close(self) -> Result<(), StoreError> {
        let Self {
            jobs,
            writer,
            readers,
            path,
            health,
        } = self;
        drop(readers);
        drop(jobs);
        let joined = tokio::task::spawn_blocking(move || writer.join())
            .await
            .map_err(|_| StoreError::Failed("the store writer could not be joined".to_owned()))?;
        joined.map_err(|_| StoreError::Failed("the store writer thread panicked".to_owned()))?;
        tracing::info!(path = %path.display(), "store closed");
        health.check()
    }

    /// Send one request to the writer and wait for its answer (after the commit).
    async fn request(&self, work: Work) -> Result<Answer, StoreError> {
        self.health.check()?;
        let (reply, answer) = oneshot::channel();
        if self.jobs.send(Job { work, reply }).await.is_err() {
            return Err(self.health.poison("the store writer has stopped"));
        }
        match answer.await {
            Ok(answer) => answer,
            Err(_) => Err(self
                .health
                .poison("the store writer stopped without answering")),
        }
    }

    /// Run `read` on a pooled read-only connection on the blocking thread pool.
    async fn read<T, F>(&self, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, Fault> + Send + 'static,
    {
        let permit = Arc::clone(&self.readers.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the read pool is closed".to_owned()))?;
        let pool = Arc::clone(&self.readers);
        let health = Arc::clone(&self.health);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = pool
                .take()
                .map_err(|fault| fault.into_store_error(&health))?;
            let result = read(&conn);
            pool.give_back(conn);
            result.map_err(|fault| fault.into_store_error(&health))
        })
        .await
        .map_err(|_| StoreError::Unavailable("a store read task failed".to_owned()))?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn submit(&self, submission: Submission) -> Result<Receipt, StoreError> {
        // The audit events' canonical JSON and query columns are encoded here, on the submitting
        // task, so the one writer thread spends its time on the statements alone.
        let audit = encode_audit(&submission.audit)
            .map_err(|fault| fault.into_store_error(&self.health))?;
        let work = Work::Submit(Box::new(EncodedSubmission { submission, audit }));
        match self.request(work).await? {
            Answer::Receipt(receipt) => Ok(receipt),
            Answer::CursorSaved
            | Answer::Reviewed(_)
            | Answer::Delivery(_)
            | Answer::ExportJob(_) => Err(StoreError::Failed(
                "the store writer answered a different request".to_owned(),
            )),
        }
    }

    async fn read_log(&self, after: Seq, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {LOG_COLUMNS} FROM log l WHERE l.seq > ?1 ORDER BY l.seq LIMIT ?2"
            ))?;
            let rows = statement.query_map(params![after, limit], RawLogEntry::from_row)?;
            rows.map(|row| row?.into_entry()).collect()
        })
        .await
    }

    async fn read_current(
        &self,
        partner: &str,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<LogEntry>, StoreError> {
        let key = (partner.to_owned(), resource_type.to_owned(), id.to_owned());
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {LOG_COLUMNS} FROM current_versions c JOIN log l ON l.seq = c.seq \
                 WHERE c.partner = ?1 AND c.resource_type = ?2 AND c.id = ?3"
            ))?;
            statement
                .query_row(params![key.0, key.1, key.2], RawLogEntry::from_row)
                .optional()?
                .map(RawLogEntry::into_entry)
                .transpose()
        })
        .await
    }

    async fn read_audit(
        &self,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<StoredAuditEvent>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT seq, event FROM audit_events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = statement.query_map(params![after, limit], |row| {
                Ok((row.get::<_, Seq>(0)?, row.get::<_, String>(1)?))
            })?;
            rows.map(|row| {
                let (seq, json) = row?;
                let event = serde_json::from_str(&json).map_err(|error| {
                    // serde's message may quote a value (a patient's NHS number): keep only
                    // where the fault is.
                    Fault::Corrupt(format!(
                        "audit event {seq} is not a valid AuditEvent (line {}, column {})",
                        error.line(),
                        error.column()
                    ))
                })?;
                Ok(StoredAuditEvent { seq, event })
            })
            .collect()
        })
        .await
    }

    async fn load_cursor(&self, reader: &str) -> Result<Seq, StoreError> {
        let reader = reader.to_owned();
        self.read(move |conn| {
            let seq = conn
                .prepare_cached("SELECT seq FROM cursors WHERE reader = ?1")?
                .query_row(params![reader], |row| row.get::<_, Seq>(0))
                .optional()?;
            Ok(seq.unwrap_or(0))
        })
        .await
    }

    /// Goes through the writer, so it shares a batch's fsync and is durable when it returns.
    async fn save_cursor(&self, reader: &str, seq: Seq) -> Result<(), StoreError> {
        let work = Work::SaveCursor {
            reader: reader.to_owned(),
            seq,
        };
        match self.request(work).await? {
            Answer::CursorSaved => Ok(()),
            Answer::Receipt(_)
            | Answer::Reviewed(_)
            | Answer::Delivery(_)
            | Answer::ExportJob(_) => Err(StoreError::Failed(
                "the store writer answered a different request".to_owned(),
            )),
        }
    }

    async fn query_audit(&self, query: &AuditQuery) -> Result<AuditPage, StoreError> {
        let query = query.clone();
        self.read(move |conn| query::query_audit(conn, &query))
            .await
    }

    async fn audit_event(
        &self,
        seq: Seq,
    ) -> Result<Option<(StoredAuditEvent, Option<AuditReview>)>, StoreError> {
        self.read(move |conn| query::audit_event(conn, seq)).await
    }

    async fn review_audit(
        &self,
        review: AuditReview,
        audit: AuditEvent,
    ) -> Result<AuditReview, StoreError> {
        match self.request(Work::Review { review, audit }).await? {
            Answer::Reviewed(review) => Ok(review),
            Answer::Receipt(_)
            | Answer::CursorSaved
            | Answer::Delivery(_)
            | Answer::ExportJob(_) => Err(StoreError::Failed(
                "the store writer answered a different request".to_owned(),
            )),
        }
    }

    // --- Delivery (issue 4): bodies in sqlite_delivery.rs. ---

    async fn enqueue_deliveries(
        &self,
        reader: &str,
        through: Seq,
        rows: Vec<crate::delivery::NewDelivery>,
    ) -> Result<u64, StoreError> {
        let reader = reader.to_owned();
        self.delivery_count(delivery::DeliveryWork::Enqueue {
            reader,
            through,
            rows,
        })
        .await
    }

    async fn claim_deliveries(
        &self,
        partner: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<crate::delivery::PendingDelivery>, StoreError> {
        self.delivery_claim(partner, limit, lease).await
    }

    async fn finish_delivery(
        &self,
        id: crate::delivery::DeliveryId,
        result: crate::delivery::DeliveryResult,
        audit: Vec<AuditEvent>,
    ) -> Result<bool, StoreError> {
        self.delivery_finish(id, result, audit).await
    }

    async fn inbox_page(
        &self,
        partner: &str,
        after: Seq,
        limit: usize,
    ) -> Result<crate::delivery::InboxPage, StoreError> {
        let partner = partner.to_owned();
        self.read(move |conn| delivery::inbox_page(conn, &partner, after, limit))
            .await
    }

    async fn ack_inbox(
        &self,
        partner: &str,
        through: Seq,
        template: AuditEvent,
    ) -> Result<u64, StoreError> {
        let partner = partner.to_owned();
        self.delivery_count(delivery::DeliveryWork::AckInbox {
            partner,
            through,
            template,
        })
        .await
    }

    async fn delivery_status(
        &self,
        partner: Option<&str>,
    ) -> Result<Vec<crate::delivery::DestinationStatus>, StoreError> {
        let partner = partner.map(str::to_owned);
        self.read(move |conn| delivery::status(conn, partner.as_deref()))
            .await
    }

    async fn dead_letters(
        &self,
        partner: Option<&str>,
        after: crate::delivery::DeliveryId,
        limit: usize,
    ) -> Result<Vec<crate::delivery::DeadLetter>, StoreError> {
        let partner = partner.map(str::to_owned);
        self.read(move |conn| delivery::dead_letters(conn, partner.as_deref(), after, limit))
            .await
    }

    async fn replay_dead_letters(
        &self,
        selector: crate::delivery::ReplaySelector,
        audit: AuditEvent,
    ) -> Result<u64, StoreError> {
        self.delivery_count(delivery::DeliveryWork::Replay { selector, audit })
            .await
    }
}

/// Shared between the store handle, the writer and read tasks.
#[derive(Debug, Default)]
struct Health {
    /// Set once, on the first durability failure or corruption; never cleared.
    poisoned: OnceLock<String>,
    submissions: AtomicU64,
    commits: AtomicU64,
    /// Time spent in batch transactions (statements and the `COMMIT`'s fsync), for metrics.
    commit_nanos: AtomicU64,
}

/// Run `work`, adding its duration to `total`.
fn timed<T>(total: &AtomicU64, work: impl FnOnce() -> T) -> T {
    let started = std::time::Instant::now();
    let result = work();
    let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    total.fetch_add(nanos, Ordering::Relaxed);
    result
}

impl Health {
    fn check(&self) -> Result<(), StoreError> {
        match self.poisoned.get() {
            Some(reason) => Err(StoreError::Failed(reason.clone())),
            None => Ok(()),
        }
    }

    /// Stop all further writes and return the error to answer with.
    fn poison(&self, reason: impl Into<String>) -> StoreError {
        let reason = reason.into();
        if self.poisoned.set(reason.clone()).is_ok() {
            tracing::error!(
                reason = %reason,
                "store failed; refusing all further writes until restart (fail-stop)"
            );
        }
        StoreError::Failed(self.poisoned.get().cloned().unwrap_or(reason))
    }
}

/// How a SQLite error affects the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Severity {
    /// Nothing was written and a retry may succeed (disk full, busy, locked, out of memory).
    Transient,
    /// Durability or integrity is in doubt (I/O error, failed fsync, corruption): fail-stop.
    Fatal,
    /// Anything else: confined to the statement that raised it.
    Local,
}

fn severity(error: &rusqlite::Error) -> Severity {
    match error {
        // Stored values that do not fit the schema: the file was damaged or edited.
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => Severity::Fatal,
        _ => match error.sqlite_error_code() {
            Some(
                ErrorCode::DiskFull
                | ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::OutOfMemory,
            ) => Severity::Transient,
            Some(
                ErrorCode::SystemIoFailure | ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase,
            ) => Severity::Fatal,
            _ => Severity::Local,
        },
    }
}

/// Why one piece of store work failed, before it is mapped to a [`StoreError`].
#[derive(Debug, thiserror::Error)]
enum Fault {
    /// The caller's precondition does not hold (`Conflict`, `PreconditionFailed`).
    #[error("{0}")]
    Refused(StoreError),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Stored data that cannot be what this code wrote.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A value could not be encoded for storage; nothing about the file is wrong.
    #[error("cannot encode for storage: {0}")]
    Encode(String),
    /// This process cannot do what the store needs (WAL refused, a poisoned pool lock).
    #[error("{0}")]
    Internal(String),
}

impl Fault {
    fn severity(&self) -> Severity {
        match self {
            Self::Refused(_) | Self::Encode(_) | Self::Internal(_) => Severity::Local,
            Self::Sqlite(error) => severity(error),
            Self::Corrupt(_) => Severity::Fatal,
        }
    }

    /// The answer for a failure confined to one request (or one read).
    fn into_store_error(self, health: &Health) -> StoreError {
        match (self.severity(), self) {
            (_, Self::Refused(error)) => error,
            (Severity::Fatal, fault) => health.poison(fault.to_string()),
            (Severity::Transient | Severity::Local, fault) => {
                StoreError::Unavailable(fault.to_string())
            }
        }
    }

    /// The answer for every request of a batch that could not commit. An unexpected failure of
    /// `BEGIN`/`COMMIT` leaves durability unknown, so it is fatal too.
    fn into_batch_error(self, health: &Health) -> StoreError {
        match self.severity() {
            Severity::Transient => StoreError::Unavailable(self.to_string()),
            Severity::Fatal | Severity::Local => health.poison(self.to_string()),
        }
    }
}

/// A copy of an error for each request of a failed batch (`StoreError` is not `Clone`).
fn duplicate(error: &StoreError) -> StoreError {
    match error {
        StoreError::Conflict => StoreError::Conflict,
        StoreError::PreconditionFailed => StoreError::PreconditionFailed,
        StoreError::Unavailable(reason) => StoreError::Unavailable(reason.clone()),
        StoreError::Failed(reason) => StoreError::Failed(reason.clone()),
    }
}

fn opening_error(fault: Fault) -> StoreError {
    match fault.severity() {
        Severity::Transient => StoreError::Unavailable(fault.to_string()),
        Severity::Fatal | Severity::Local => StoreError::Failed(fault.to_string()),
    }
}

/// Every connection skips the checkpoint SQLite runs when a WAL connection closes; the writer
/// checkpoints explicitly when it finishes, so exactly one thread does it, at a known time. (That
/// close path deadlocked in SQLite 3.51.1, bundled by rusqlite 0.38, when two connections closed
/// on different threads at once — rusqlite issue #1860, fixed in 3.51.2. The workspace now uses
/// rusqlite 0.41 with SQLite 3.54.1; the explicit checkpoint is kept as the simpler design.)
fn skip_checkpoint_on_close(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
    Ok(())
}

fn open_writer(path: &Path) -> Result<Connection, Fault> {
    let conn = Connection::open(path)?;
    skip_checkpoint_on_close(&conn)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Fault::Internal(format!(
            "the database refused WAL mode (journal_mode is {mode})"
        )));
    }
    // FULL: in WAL mode every commit fsyncs the WAL, so a commit survives power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Each request runs in its own SAVEPOINT; their statement journals stay in memory instead of
    // a temporary file written on every request (profiled: ~9 % of the writer's time).
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // The writer's look-ups (current versions, identifiers, idempotency keys) and index inserts
    // land on random pages of growing B-trees; SQLite's default 2 MiB cache re-reads them from
    // the WAL or the file on nearly every request. Negative: KiB.
    conn.pragma_update(None, "cache_size", WRITER_CACHE_SIZE)?;
    // Checkpoints run on their own thread ([`Checkpointer`]) between commits; the writer checkpoints
    // only as a backstop when the WAL has grown this large (pages), which also lets the WAL file
    // restart from its beginning under sustained load.
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)?;
    Ok(conn)
}

/// The write connection's page cache for `PRAGMA cache_size` (negative: KiB, so 32 MiB).
const WRITER_CACHE_SIZE: i64 = -32 * 1024;

/// The writer's own checkpoint threshold (pages): a backstop behind the [`Checkpointer`].
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 8_000;

/// How often the [`Checkpointer`] copies committed WAL frames into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Copies committed pages from the WAL into the database file (`PRAGMA wal_checkpoint(PASSIVE)`)
/// on its own connection and thread, so the writer spends its time on commits. A passive
/// checkpoint never blocks the writer or readers and only copies what is committed; durability
/// does not depend on it (a commit is durable once its WAL frames are fsynced). Stops when its
/// channel is closed (the writer, before its final checkpoint at shutdown).
struct Checkpointer {
    conn: Connection,
    stop: std::sync::mpsc::Receiver<()>,
}

impl Checkpointer {
    fn open(path: &Path, stop: std::sync::mpsc::Receiver<()>) -> Result<Self, Fault> {
        let conn = Connection::open(path)?;
        skip_checkpoint_on_close(&conn)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Ok(Self { conn, stop })
    }

    fn run(self) {
        let mut failing = false;
        loop {
            match self.stop.recv_timeout(CHECKPOINT_EVERY) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let result = self
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                    row.get::<_, i64>(0)
                });
            match result {
                Ok(_) => failing = false,
                // Said once per run of failures (e.g. a full disk); the WAL keeps everything
                // committed and the writer's backstop tries again.
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "background WAL checkpoint failed");
                }
                Err(_) => {}
            }
        }
    }
}

fn open_reader(path: &Path) -> Result<Connection, Fault> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    skip_checkpoint_on_close(&conn)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// Stands in for a recorded leaf hash that is not 32 bytes long, so the verifier reports the event
/// as altered (`LeafMismatch`): no event's leaf hash is all zeros in practice (SHA-256 preimage).
pub(crate) const DAMAGED_LEAF: caregate_audit::Hash = caregate_audit::Hash::from_bytes([0; 32]);

/// The result of [`verify_audit`]: the Merkle verification, plus events whose query columns
/// disagree with the hashed event (an edit to a copied column the hash does not cover).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerification {
    pub report: caregate_audit::VerifyReport,
    /// Sequence numbers whose `patient`, `partner_id`, `action`, `outcome`, `request_id`,
    /// `resource_type` or `resource_id` column differs from the hashed event (first 100).
    pub column_mismatches: Vec<Seq>,
    pub column_mismatches_total: u64,
    /// The newest stored checkpoint, in signed-note text (to hand to a witness).
    pub latest_checkpoint: Option<String>,
}

impl AuditVerification {
    pub fn is_ok(&self) -> bool {
        self.report.is_ok() && self.column_mismatches_total == 0
    }
}

/// Verify the audit log in `dir` offline, streaming events in sequence order (memory: the tree
/// frontier, the checkpoints and a bounded list of findings): recompute every leaf and compare it
/// with the recorded one, check sequence numbers are contiguous, check every stored checkpoint and
/// every `extra` checkpoint (e.g. one a witness kept) is signed by `verifier`'s key and matches
/// the recomputed tree, and check the query columns against the hashed events.
pub fn verify_audit(
    dir: &Path,
    verifier: &caregate_audit::CheckpointVerifier,
    extra: &[SignedCheckpoint],
) -> Result<AuditVerification, StoreError> {
    let path = dir.join(DATABASE_FILE);
    if !path.exists() {
        return Err(StoreError::Failed(format!(
            "no caregate database at {}",
            path.display()
        )));
    }
    let conn = open_reader(&path).map_err(opening_error)?;
    let fail =
        |error: rusqlite::Error| StoreError::Failed(format!("reading the audit log: {error}"));
    let mut checkpoints = Vec::new();
    let mut latest_checkpoint = None;
    {
        let mut statement = conn
            .prepare("SELECT checkpoint FROM audit_checkpoints ORDER BY size")
            .map_err(fail)?;
        let rows = statement
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(fail)?;
        for text in rows {
            let text = text.map_err(fail)?;
            // An unparseable stored checkpoint is itself a finding: hand it to the verifier as
            // missing rather than failing the whole run.
            if let Ok(signed) = SignedCheckpoint::parse(&text) {
                checkpoints.push(signed);
            }
            latest_checkpoint = Some(text);
        }
    }
    checkpoints.extend(extra.iter().cloned());
    let mut log = caregate_audit::LogVerifier::new(&checkpoints, verifier);
    let mut column_mismatches = Vec::new();
    let mut column_mismatches_total = 0u64;
    let mut statement = conn
        .prepare(
            "SELECT seq, event, leaf_hash, patient, partner_id, action, outcome, request_id, \
             resource_type, resource_id FROM audit_events ORDER BY seq",
        )
        .map_err(fail)?;
    let mut rows = statement.query([]).map_err(fail)?;
    while let Some(row) = rows.next().map_err(fail)? {
        let seq: i64 = row.get(0).map_err(fail)?;
        let event: String = row.get(1).map_err(fail)?;
        let leaf: Vec<u8> = row.get(2).map_err(fail)?;
        let seq_u = u64::try_from(seq).unwrap_or(0);
        let canonical = caregate_audit::event_hash::CanonicalEvent(event.as_bytes());
        // A recorded leaf that is not a hash at all (wrong length) was damaged: it must be named
        // like any other altered leaf, never silently replaced by the recomputed one.
        let recorded = caregate_audit::Hash::from_slice(&leaf).unwrap_or(DAMAGED_LEAF);
        log.push_with_recorded_leaf(seq_u, &canonical, recorded);
        let columns: [Option<String>; 7] = [
            row.get(3).map_err(fail)?,
            row.get(4).map_err(fail)?,
            row.get(5).map_err(fail)?,
            row.get(6).map_err(fail)?,
            row.get(7).map_err(fail)?,
            row.get(8).map_err(fail)?,
            row.get(9).map_err(fail)?,
        ];
        if !columns_match(&event, &columns) {
            column_mismatches_total += 1;
            if column_mismatches.len() < 100 {
                column_mismatches.push(seq);
            }
        }
    }
    Ok(AuditVerification {
        report: log.finish(),
        column_mismatches,
        column_mismatches_total,
        latest_checkpoint,
    })
}

/// Whether the copied query columns equal the fields of the hashed event JSON.
fn columns_match(event: &str, columns: &[Option<String>; 7]) -> bool {
    let Ok(event) = serde_json::from_str::<AuditEvent>(event) else {
        return false;
    };
    let entity = event.entity.as_ref();
    let expected: [Option<String>; 7] = [
        event.patient.clone(),
        event.actor.partner_id.clone(),
        serde_name(&event.action).ok(),
        serde_name(&event.outcome).ok(),
        Some(event.request_id.clone()),
        entity.map(|e| e.resource_type.clone()),
        entity.map(|e| e.id.clone()),
    ];
    &expected == columns
}

/// The newest signed checkpoint stored in `dir`, if any (signed-note text).
pub fn latest_audit_checkpoint(dir: &Path) -> Result<Option<String>, StoreError> {
    let conn = open_reader(&dir.join(DATABASE_FILE)).map_err(opening_error)?;
    conn.query_row(
        "SELECT checkpoint FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
        [],
        |row| row.get::<_, String>(0),
    )
    .optional()
    .map_err(|error| StoreError::Failed(format!("reading audit checkpoints: {error}")))
}

/// Bring the schema to the newest version, one transaction per step. The version is read inside
/// each step's write transaction, so two processes opening the same file cannot both apply it.
fn migrate(conn: &mut Connection) -> Result<(), Fault> {
    let known = MIGRATIONS.len();
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
        let step = usize::try_from(current)
            .ok()
            .filter(|version| *version <= known)
            .ok_or_else(|| {
                Fault::Corrupt(format!(
                    "schema version {current} is not one this build knows (0..={known})"
                ))
            })?;
        let Some(sql) = MIGRATIONS.get(step) else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", current + 1)?;
        tx.commit()?;
        tracing::info!(version = current + 1, "store schema migrated");
    }
}

/// Idle read-only connections, with a semaphore so a task only takes one when one is free.
#[derive(Debug)]
struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReadPool {
    /// An idle connection, or a new one if a panicked read lost its connection.
    fn take(&self) -> Result<Connection, Fault> {
        let idle = self
            .idle
            .lock()
            .map_err(|_| Fault::Internal("the read connection pool is poisoned".to_owned()))?
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => open_reader(&self.path),
        }
    }

    fn give_back(&self, conn: Connection) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
    }
}

/// One request to the writer.
struct Job {
    work: Work,
    reply: oneshot::Sender<Result<Answer, StoreError>>,
}

enum Work {
    Submit(Box<EncodedSubmission>),
    SaveCursor {
        reader: String,
        seq: Seq,
    },
    /// A review mark and the review's own audit event ([`query::apply_review`]).
    Review {
        review: AuditReview,
        audit: AuditEvent,
    },
    /// Delivery rows, inbox and dead letters ([`delivery::apply`]).
    Delivery(delivery::DeliveryWork),
    /// The Bulk export job registry ([`export_jobs::apply`]).
    ExportJob(export_jobs::ExportJobWork),
}

enum Answer {
    Receipt(Receipt),
    CursorSaved,
    Reviewed(AuditReview),
    Delivery(delivery::DeliveryAnswer),
    ExportJob(export_jobs::ExportJobAnswer),
}

/// The commit time of one batch, as a value and as stored.
struct BatchClock {
    at: OffsetDateTime,
    text: String,
}

impl BatchClock {
    fn now() -> Result<Self, Fault> {
        let now = OffsetDateTime::now_utc();
        // Truncated to what is stored, so receipts equal what readers later see.
        let at = now
            .replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
            .map_err(|error| Fault::Encode(error.to_string()))?;
        Ok(Self {
            at,
            text: timestamp_text(at)?,
        })
    }
}

fn timestamp_text(at: OffsetDateTime) -> Result<String, Fault> {
    at.to_offset(UtcOffset::UTC)
        .format(TIMESTAMP_FORMAT)
        .map_err(|error| Fault::Encode(format!("timestamp: {error}")))
}

fn parse_timestamp(text: &str) -> Result<OffsetDateTime, Fault> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|_| Fault::Corrupt("a stored timestamp is not RFC 3339".to_owned()))
}

/// The writer's view of the audit Merkle tree: its frontier after the last commit, the last
/// signed checkpoint, and the signer (if any).
struct AuditTree {
    frontier: Frontier,
    last_checkpoint: Option<Checkpoint>,
    signing: Option<AuditSigning>,
}

impl AuditTree {
    /// Load the tree state written by the last commit. The frontier must cover exactly the
    /// events present: anything else means the tables were edited outside caregate.
    fn load(conn: &Connection, signing: Option<AuditSigning>) -> Result<Self, Fault> {
        let saved: Option<(i64, Vec<u8>)> = conn
            .query_row(
                "SELECT size, frontier FROM audit_tree WHERE id = 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let frontier = match saved {
            Some((_, bytes)) => Frontier::from_bytes(&bytes).map_err(|_| {
                Fault::Corrupt("the stored audit tree frontier is invalid".to_owned())
            })?,
            None => Frontier::new(),
        };
        let events: i64 = conn.query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM audit_events",
            [],
            |row| row.get(0),
        )?;
        if u64::try_from(events).ok() != Some(frontier.size()) {
            return Err(Fault::Corrupt(
                "the audit tree does not cover the audit events present; run `caregate audit verify`"
                    .to_owned(),
            ));
        }
        let last_checkpoint = match conn
            .query_row(
                "SELECT checkpoint FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
                [],
                |row| row.get::<_, String>(0),
            )
            .optional()?
        {
            Some(text) => Some(
                SignedCheckpoint::parse(&text)
                    .map_err(|_| Fault::Corrupt("a stored audit checkpoint is invalid".to_owned()))?
                    .unverified()
                    .clone(),
            ),
            None => None,
        };
        Ok(Self {
            frontier,
            last_checkpoint,
            signing,
        })
    }

    /// Sign and insert a checkpoint for `frontier` if the schedule says one is due.
    fn checkpoint_if_due(
        &self,
        conn: &Connection,
        frontier: &Frontier,
        clock: &BatchClock,
    ) -> Result<Option<Checkpoint>, Fault> {
        self.sign_checkpoint(conn, frontier, clock, false)
    }

    /// Sign and insert a checkpoint for `frontier` when it is due or, with `seal`, whenever it
    /// covers events the last checkpoint does not (at a clean shutdown, so that every event
    /// written is attested by a signed checkpoint).
    fn sign_checkpoint(
        &self,
        conn: &Connection,
        frontier: &Frontier,
        clock: &BatchClock,
        seal: bool,
    ) -> Result<Option<Checkpoint>, Fault> {
        let Some(signing) = &self.signing else {
            return Ok(None);
        };
        let newer = frontier.size() > self.last_checkpoint.as_ref().map_or(0, |last| last.size);
        let due = if seal {
            newer
        } else {
            signing
                .schedule
                .is_due(self.last_checkpoint.as_ref(), frontier.size(), clock.at)
        };
        if !due {
            return Ok(None);
        }
        let checkpoint = Checkpoint {
            log_id: signing.signer.log_id().to_owned(),
            size: frontier.size(),
            root: frontier.root(),
            timestamp: clock.at,
        };
        let signed = signing
            .signer
            .sign(&checkpoint)
            .map_err(|error| Fault::Encode(format!("audit checkpoint: {error}")))?;
        conn.prepare_cached(INSERT_CHECKPOINT)?.execute(params![
            i64::try_from(checkpoint.size).unwrap_or(i64::MAX),
            signed.to_text(),
            clock.text
        ])?;
        Ok(Some(checkpoint))
    }
}

/// The owner of the write connection; runs on its own thread until every sender is gone.
struct Writer {
    conn: Connection,
    queue: mpsc::Receiver<Job>,
    max_batch: usize,
    health: Arc<Health>,
    tree: AuditTree,
    /// The background checkpoint thread, stopped before the final checkpoint at shutdown.
    checkpointer: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl Writer {
    fn run(mut self) {
        // `blocking_recv` returns None only once every sender is dropped *and* the queue is
        // empty, so everything queued before shutdown is still committed and answered.
        while let Some(first) = self.queue.blocking_recv() {
            let mut batch = Vec::with_capacity(self.max_batch.min(64));
            batch.push(first);
            while batch.len() < self.max_batch {
                match self.queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
        }
        if let Some((stop, thread)) = self.checkpointer.take() {
            drop(stop);
            let _ = thread.join();
        }
        self.seal_audit();
        self.checkpoint();
        tracing::debug!("store writer finished");
    }

    /// At a clean shutdown, sign a checkpoint over every audit event written since the last one,
    /// so an offline `caregate audit verify` finds the whole log attested. Skipped once poisoned.
    fn seal_audit(&mut self) {
        if self.health.check().is_err() {
            return;
        }
        let result = BatchClock::now().and_then(|clock| {
            self.tree
                .sign_checkpoint(&self.conn, &self.tree.frontier, &clock, true)
        });
        match result {
            Ok(Some(checkpoint)) => {
                tracing::debug!(
                    size = checkpoint.size,
                    "audit checkpoint signed at shutdown"
                );
                self.tree.last_checkpoint = Some(checkpoint);
            }
            Ok(None) => {}
            Err(fault) => {
                tracing::warn!(error = %fault, "audit checkpoint at shutdown failed");
            }
        }
    }

    /// Copy the WAL into the database file and empty it, so that after a clean shutdown
    /// `caregate.db` alone holds everything (for IG officers who copy just that file). Not needed
    /// for durability: a WAL left behind is replayed on the next open. Skipped once poisoned, so a
    /// failing disk is not written again.
    fn checkpoint(&self) {
        if self.health.check().is_err() {
            return;
        }
        let result = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                row.get::<_, i64>(0)
            });
        match result {
            Ok(0) => {}
            Ok(_) => tracing::debug!("store checkpoint at shutdown found readers; WAL kept"),
            Err(error) => tracing::warn!(error = %error, "store checkpoint at shutdown failed"),
        }
    }

    fn commit_batch(&mut self, batch: Vec<Job>) {
        let (works, replies): (Vec<Work>, Vec<_>) =
            batch.into_iter().map(|job| (job.work, job.reply)).unzip();
        let submissions = works
            .iter()
            .filter(|work| matches!(work, Work::Submit(_)))
            .count();
        self.health
            .submissions
            .fetch_add(submissions as u64, Ordering::Relaxed);

        let answers = match self.health.check() {
            Err(error) => works.iter().map(|_| Err(duplicate(&error))).collect(),
            Ok(()) => match timed(&self.health.commit_nanos, || {
                apply_batch(&mut self.conn, &works, &mut self.tree)
            }) {
                Ok(answers) => {
                    self.health.commits.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(requests = works.len(), "store batch committed");
                    answers
                }
                Err(fault) => {
                    let error = fault.into_batch_error(&self.health);
                    if matches!(error, StoreError::Unavailable(_)) {
                        tracing::warn!(
                            requests = works.len(),
                            error = %error,
                            "store batch not committed; nothing written"
                        );
                    }
                    works.iter().map(|_| Err(duplicate(&error))).collect()
                }
            },
        };
        for (reply, answer) in replies.into_iter().zip(answers) {
            // The caller may have gone (client disconnected); what committed stays committed.
            let _ = reply.send(answer);
        }
    }
}

/// One transaction for the whole batch, one savepoint per request. `Err` means nothing of the
/// batch was committed; `Ok` holds each request's answer, in order, after a successful `COMMIT`.
/// The audit tree advances only with what committed: each request works on a copy of the
/// frontier that is kept with its savepoint, and the batch's frontier (and checkpoint, when one
/// is due) is written in the same transaction and adopted only after `COMMIT`.
fn apply_batch(
    conn: &mut Connection,
    works: &[Work],
    tree: &mut AuditTree,
) -> Result<Vec<Result<Answer, StoreError>>, Fault> {
    let clock = BatchClock::now()?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut frontier = tree.frontier.clone();
    let mut answers = Vec::with_capacity(works.len());
    for work in works {
        // The savepoint statements are prepared once and cached (rusqlite's `Savepoint` parses
        // its SQL on every use); if anything below fails, dropping `tx` rolls everything back.
        tx.prepare_cached(SAVEPOINT_REQUEST)?.execute([])?;
        let mut attempt = frontier.clone();
        match apply_work(&tx, work, &clock, &mut attempt) {
            Ok(answer) => {
                tx.prepare_cached(RELEASE_REQUEST)?.execute([])?;
                frontier = attempt;
                answers.push(Ok(answer));
            }
            Err(fault) => {
                // Transient/fatal errors (and anything after which SQLite has already rolled the
                // transaction back) end the batch; the rest roll back this request only.
                if fault.severity() != Severity::Local || tx.is_autocommit() {
                    return Err(fault);
                }
                tx.prepare_cached(ROLLBACK_REQUEST)?.execute([])?;
                tx.prepare_cached(RELEASE_REQUEST)?.execute([])?;
                if !matches!(fault, Fault::Refused(_)) {
                    tracing::warn!(error = %fault, "store request rolled back");
                }
                answers.push(Err(match fault {
                    Fault::Refused(error) => error,
                    other => StoreError::Unavailable(other.to_string()),
                }));
            }
        }
    }
    let checkpoint = if frontier.size() != tree.frontier.size() {
        tx.prepare_cached(SAVE_AUDIT_TREE)?.execute(params![
            i64::try_from(frontier.size()).unwrap_or(i64::MAX),
            frontier.to_bytes()
        ])?;
        tree.checkpoint_if_due(&tx, &frontier, &clock)?
    } else {
        None
    };
    tx.commit()?;
    tree.frontier = frontier;
    if let Some(checkpoint) = checkpoint {
        tree.last_checkpoint = Some(checkpoint);
    }
    Ok(answers)
}

fn apply_work(
    conn: &Connection,
    work: &Work,
    clock: &BatchClock,
    frontier: &mut Frontier,
) -> Result<Answer, Fault> {
    match work {
        Work::Submit(submission) => {
            apply_submission(conn, submission, clock, frontier).map(Answer::Receipt)
        }
        Work::SaveCursor { reader, seq } => {
            conn.prepare_cached(UPSERT_CURSOR)?
                .execute(params![reader, seq])?;
            Ok(Answer::CursorSaved)
        }
        Work::Review { review, audit } => {
            query::apply_review(conn, review, audit, clock, frontier).map(Answer::Reviewed)
        }
        Work::Delivery(work) => delivery::apply(conn, work, clock, frontier),
        Work::ExportJob(work) => export_jobs::apply(conn, work, clock),
    }
}

/// A submission with its audit events already encoded ([`encode_audit`]).
struct EncodedSubmission {
    submission: Submission,
    audit: Vec<EncodedAudit>,
}

fn apply_submission(
    conn: &Connection,
    encoded: &EncodedSubmission,
    clock: &BatchClock,
    frontier: &mut Frontier,
) -> Result<Receipt, Fault> {
    let EncodedSubmission { submission, audit } = encoded;
    let partner = submission.partner.as_str();
    if let Some(key) = &submission.idempotency_key {
        let stored = conn
            .prepare_cached(SELECT_RECEIPT)?
            .query_row(params![partner, key], |row| row.get::<_, String>(0))
            .optional()?;
        if let Some(json) = stored {
            let mut receipt: Receipt = serde_json::from_str(&json).map_err(|_| {
                Fault::Corrupt("a stored idempotency receipt is not valid".to_owned())
            })?;
            receipt.replayed = true;
            // The retry is itself an access: it is audited even though nothing else is written.
            insert_encoded_audit(conn, &submission.audit, audit, frontier)?;
            return Ok(receipt);
        }
    }

    let entries = submission
        .records
        .iter()
        .map(|record| apply_record(conn, partner, record, clock))
        .collect::<Result<Vec<_>, _>>()?;
    insert_encoded_audit(conn, &submission.audit, audit, frontier)?;
    let receipt = Receipt {
        entries,
        replayed: false,
    };
    if let Some(key) = &submission.idempotency_key {
        let json = serde_json::to_string(&receipt)
            .map_err(|error| Fault::Encode(format!("receipt: {error}")))?;
        conn.prepare_cached(INSERT_RECEIPT)?
            .execute(params![partner, key, json, clock.text])?;
    }
    Ok(receipt)
}

/// The current version of a resource, as the writer needs it.
struct Current {
    version_id: i64,
    seq: Seq,
    content_hash: [u8; 32],
}

impl Current {
    /// The receipt naming this version as it stands (its commit time read from the log).
    fn receipt(
        self,
        conn: &Connection,
        resource_type: &str,
        id: &str,
        outcome: EntryOutcome,
    ) -> Result<EntryReceipt, Fault> {
        let committed_at = conn
            .prepare_cached(SELECT_COMMITTED_AT)?
            .query_row(params![self.seq], |row| row.get::<_, String>(0))
            .optional()?
            .ok_or_else(|| Fault::Corrupt("a current version names no log row".to_owned()))?;
        Ok(EntryReceipt {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            version_id: self.version_id,
            seq: self.seq,
            outcome,
            last_updated: parse_timestamp(&committed_at)?,
        })
    }
}

fn current_version(
    conn: &Connection,
    partner: &str,
    resource_type: &str,
    id: &str,
) -> Result<Option<Current>, Fault> {
    Ok(conn
        .prepare_cached(SELECT_CURRENT)?
        .query_row(params![partner, resource_type, id], |row| {
            Ok(Current {
                version_id: row.get(0)?,
                seq: row.get(1)?,
                content_hash: row.get(2)?,
            })
        })
        .optional()?)
}

/// Apply one record's write mode (ids scoped to `partner`) and append it if it changes anything.
fn apply_record(
    conn: &Connection,
    partner: &str,
    record: &RecordWrite,
    clock: &BatchClock,
) -> Result<EntryReceipt, Fault> {
    let resource_type = record.resource_type.as_str();
    let current = current_version(conn, partner, resource_type, &record.id)?;
    match (&record.mode, current) {
        (WriteMode::Create, Some(_)) => Err(Fault::Refused(StoreError::Conflict)),
        (WriteMode::Create, None) => append(conn, partner, record, 1, EntryOutcome::Created, clock),
        (WriteMode::CreateIfNoneExist { identifier }, current) => {
            let matched = conn
                .prepare_cached(SELECT_IDENTIFIED)?
                .query_row(params![partner, resource_type, identifier], |row| {
                    row.get::<_, String>(0)
                })
                .optional()?;
            if let Some(id) = matched {
                let existing =
                    current_version(conn, partner, resource_type, &id)?.ok_or_else(|| {
                        Fault::Corrupt("an identifier names a resource with no version".to_owned())
                    })?;
                return existing.receipt(conn, resource_type, &id, EntryOutcome::Existing);
            }
            if current.is_some() {
                return Err(Fault::Refused(StoreError::Conflict));
            }
            append(conn, partner, record, 1, EntryOutcome::Created, clock)
        }
        (WriteMode::Update { if_match: Some(_) }, None) => {
            Err(Fault::Refused(StoreError::PreconditionFailed))
        }
        (WriteMode::Update { if_match: None }, None) => {
            append(conn, partner, record, 1, EntryOutcome::Created, clock)
        }
        (WriteMode::Update { if_match }, Some(current)) => {
            // The precondition is judged before the content (FHIR: If-Match mismatch is 412).
            if if_match.is_some_and(|version| version != current.version_id) {
                return Err(Fault::Refused(StoreError::PreconditionFailed));
            }
            if current.content_hash == record.content_hash {
                return current.receipt(conn, resource_type, &record.id, EntryOutcome::Unchanged);
            }
            let next = current.version_id + 1;
            append(conn, partner, record, next, EntryOutcome::Updated, clock)
        }
    }
}

/// Append a version to the log and make it current, with its identifier tokens.
fn append(
    conn: &Connection,
    partner: &str,
    record: &RecordWrite,
    version_id: i64,
    outcome: EntryOutcome,
    clock: &BatchClock,
) -> Result<EntryReceipt, Fault> {
    let (resource_type, id) = (record.resource_type.as_str(), record.id.as_str());
    conn.prepare_cached(INSERT_LOG)?.execute(params![
        partner,
        resource_type,
        id,
        version_id,
        record.content,
        record.content_hash,
        record.nhs_number,
        record.decision,
        clock.text,
    ])?;
    let seq = conn.last_insert_rowid();
    conn.prepare_cached(UPSERT_CURRENT)?.execute(params![
        partner,
        resource_type,
        id,
        version_id,
        seq,
        record.content_hash
    ])?;
    // A created resource had no current version, so no identifier row can name it yet.
    if outcome != EntryOutcome::Created {
        conn.prepare_cached(DELETE_IDENTIFIERS)?
            .execute(params![partner, resource_type, id])?;
    }
    let mut insert_identifier = conn.prepare_cached(INSERT_IDENTIFIER)?;
    for token in &record.identifiers {
        insert_identifier.execute(params![partner, resource_type, token, id])?;
    }
    Ok(EntryReceipt {
        resource_type: resource_type.to_owned(),
        id: id.to_owned(),
        version_id,
        seq,
        outcome,
        last_updated: clock.at,
    })
}

/// An audit event's canonical JSON (what its leaf hash covers) and the query columns that are
/// not plain copies of its fields, encoded before the event reaches the writer.
struct EncodedAudit {
    json: String,
    recorded: String,
    action: String,
    outcome: String,
}

/// Encode `events` for [`insert_encoded_audit`]. Needs no connection: the submitting task runs it.
fn encode_audit(events: &[AuditEvent]) -> Result<Vec<EncodedAudit>, Fault> {
    events
        .iter()
        .map(|event| {
            let canonical = canonical_event_bytes(event)
                .map_err(|error| Fault::Encode(format!("audit event: {error}")))?;
            let json = String::from_utf8(canonical)
                .map_err(|_| Fault::Encode("audit event is not UTF-8".to_owned()))?;
            Ok(EncodedAudit {
                json,
                recorded: timestamp_text(event.recorded)?,
                action: serde_name(&event.action)?,
                outcome: serde_name(&event.outcome)?,
            })
        })
        .collect()
}

/// Insert `events` with the next sequence numbers, each with its RFC 9162 leaf hash, appending
/// the leaves to `frontier` (the caller keeps or discards it with the savepoint).
fn insert_audit(
    conn: &Connection,
    events: &[AuditEvent],
    frontier: &mut Frontier,
) -> Result<(), Fault> {
    if events.is_empty() {
        return Ok(());
    }
    insert_encoded_audit(conn, events, &encode_audit(events)?, frontier)
}

/// [`insert_audit`] for events already encoded (`encoded[i]` is `events[i]`).
fn insert_encoded_audit(
    conn: &Connection,
    events: &[AuditEvent],
    encoded: &[EncodedAudit],
    frontier: &mut Frontier,
) -> Result<(), Fault> {
    if events.is_empty() {
        return Ok(());
    }
    if events.len() != encoded.len() {
        return Err(Fault::Internal(
            "audit events and their encodings differ in number".to_owned(),
        ));
    }
    let mut insert = conn.prepare_cached(INSERT_AUDIT)?;
    for (event, encoded) in events.iter().zip(encoded) {
        // Sequence numbers are the tree's leaf indexes + 1, so they must be contiguous.
        let seq = frontier.size() + 1;
        let leaf = event_leaf_hash(seq, encoded.json.as_bytes());
        let entity = event.entity.as_ref();
        insert.execute(params![
            i64::try_from(seq).map_err(|_| Fault::Corrupt("audit sequence overflow".to_owned()))?,
            encoded.recorded,
            event.request_id,
            event.actor.partner_id,
            encoded.action,
            encoded.outcome,
            entity.map(|entity| entity.resource_type.as_str()),
            entity.map(|entity| entity.id.as_str()),
            event.patient,
            encoded.json,
            leaf.as_bytes().as_slice(),
        ])?;
        frontier.append(leaf);
    }
    Ok(())
}

/// The serde name of a unit enum variant (`bundle-submit`), as in the event JSON.
fn serde_name<T: Serialize>(value: &T) -> Result<String, Fault> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => Ok(name),
        _ => Err(Fault::Encode(
            "an audit enum is not a plain name".to_owned(),
        )),
    }
}

/// A `log` row as read, before its timestamp is parsed.
struct RawLogEntry {
    entry: LogEntry,
    committed_at: String,
}

impl RawLogEntry {
    /// Columns in [`LOG_COLUMNS`] order.
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            entry: LogEntry {
                seq: row.get(0)?,
                partner: row.get(1)?,
                resource_type: row.get(2)?,
                id: row.get(3)?,
                version_id: row.get(4)?,
                content: row.get(5)?,
                content_hash: row.get(6)?,
                nhs_number: row.get(7)?,
                decision: row.get(8)?,
                committed_at: OffsetDateTime::UNIX_EPOCH,
            },
            committed_at: row.get(9)?,
        })
    }

    fn into_entry(self) -> Result<LogEntry, Fault> {
        Ok(LogEntry {
            committed_at: parse_timestamp(&self.committed_at)?,
            ..self.entry
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caregate_audit::{Action, Actor, Outcome};
    use rusqlite::ffi;

    fn sqlite_error(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)
    }

    fn submission(id: &str, content: Vec<u8>) -> Submission {
        let mut hash = [0u8; 32];
        hash[..content.len().min(32)].copy_from_slice(&content[..content.len().min(32)]);
        hash[31] = u8::try_from(content.len() % 251).unwrap();
        Submission {
            partner: "gp-a".into(),
            idempotency_key: None,
            records: vec![RecordWrite {
                resource_type: "Observation".into(),
                id: id.into(),
                mode: WriteMode::Create,
                content,
                content_hash: hash,
                nhs_number: None,
                identifiers: Vec::new(),
                decision: None,
            }],
            audit: vec![AuditEvent::new(
                format!("req-{id}"),
                Actor::default(),
                Action::Create,
                Outcome::Success,
            )],
        }
    }

    #[test]
    fn f4_io_errors_and_corruption_are_fatal_full_and_busy_are_transient() {
        for code in [
            ffi::SQLITE_IOERR,
            ffi::SQLITE_IOERR_FSYNC,
            ffi::SQLITE_IOERR_WRITE,
            ffi::SQLITE_CORRUPT,
            ffi::SQLITE_NOTADB,
        ] {
            assert_eq!(
                severity(&sqlite_error(code)),
                Severity::Fatal,
                "code {code}"
            );
        }
        for code in [
            ffi::SQLITE_FULL,
            ffi::SQLITE_BUSY,
            ffi::SQLITE_LOCKED,
            ffi::SQLITE_NOMEM,
        ] {
            assert_eq!(
                severity(&sqlite_error(code)),
                Severity::Transient,
                "code {code}"
            );
        }
        assert_eq!(
            severity(&sqlite_error(ffi::SQLITE_CONSTRAINT_UNIQUE)),
            Severity::Local
        );
    }

    #[test]
    fn f4_unexpected_commit_failure_poisons_but_a_local_request_failure_does_not() {
        let health = Health::default();
        let local = Fault::Sqlite(sqlite_error(ffi::SQLITE_TOOBIG)).into_store_error(&health);
        assert!(matches!(local, StoreError::Unavailable(_)));
        assert!(health.check().is_ok());

        let full = Fault::Sqlite(sqlite_error(ffi::SQLITE_FULL)).into_batch_error(&health);
        assert!(matches!(full, StoreError::Unavailable(_)));
        assert!(health.check().is_ok());

        let commit = Fault::Sqlite(sqlite_error(ffi::SQLITE_IOERR_FSYNC)).into_batch_error(&health);
        assert!(matches!(commit, StoreError::Failed(_)));
        assert!(matches!(health.check(), Err(StoreError::Failed(_))));
    }

    #[tokio::test]
    async fn f3_disk_full_answers_unavailable_writes_nothing_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        // A database limited to 64 pages of 4 KiB behaves like a nearly full disk: SQLite answers
        // SQLITE_FULL exactly as it does for ENOSPC.
        let store = SqliteStore::open_with(dir.path(), SqliteOptions::default(), |conn| {
            conn.pragma_update(None, "max_page_count", 64)
        })
        .unwrap();

        store
            .submit(submission("small-1", b"{}".to_vec()))
            .await
            .unwrap();
        let too_big = store
            .submit(submission("big", vec![b'x'; 1024 * 1024]))
            .await;
        assert!(
            matches!(too_big, Err(StoreError::Unavailable(_))),
            "{too_big:?}"
        );
        let after = store.submit(submission("small-2", b"{ }".to_vec())).await;
        assert!(
            after.is_ok(),
            "the store recovers once there is room: {after:?}"
        );

        let log = store.read_log(0, 10).await.unwrap();
        let ids: Vec<_> = log.iter().map(|entry| entry.id.as_str()).collect();
        assert_eq!(ids, ["small-1", "small-2"]);
        let audit = store.read_audit(0, 10).await.unwrap();
        assert_eq!(
            audit.len(),
            2,
            "the refused submission's audit event was not written"
        );
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn f4_poisoned_store_refuses_every_write_but_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        store
            .submit(submission("before", b"{}".to_vec()))
            .await
            .unwrap();

        // What the writer does on SQLITE_IOERR_FSYNC at COMMIT.
        let error =
            Fault::Sqlite(sqlite_error(ffi::SQLITE_IOERR_FSYNC)).into_batch_error(&store.health);
        assert!(matches!(error, StoreError::Failed(_)));

        let after = store.submit(submission("after", b"{ }".to_vec())).await;
        assert!(matches!(after, Err(StoreError::Failed(_))), "{after:?}");
        let cursor = store.save_cursor("deliver", 1).await;
        assert!(matches!(cursor, Err(StoreError::Failed(_))), "{cursor:?}");
        assert_eq!(store.read_log(0, 10).await.unwrap().len(), 1);
        let closed = store.close().await;
        assert!(matches!(closed, Err(StoreError::Failed(_))), "{closed:?}");
    }

    #[test]
    fn stored_timestamps_are_fixed_width_utc_and_sort_as_text() {
        let whole = time::macros::datetime!(2025-03-01 12:00:00 +01:00);
        let later = time::macros::datetime!(2025-03-01 11:00:00.5 UTC);
        let whole_text = timestamp_text(whole).unwrap();
        let later_text = timestamp_text(later).unwrap();
        assert_eq!(whole_text, "2025-03-01T11:00:00.000000Z");
        assert_eq!(later_text, "2025-03-01T11:00:00.500000Z");
        assert!(whole_text < later_text);
        assert_eq!(parse_timestamp(&later_text).unwrap(), later);
    }

    #[test]
    fn newer_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let opened = SqliteStore::open(dir.path(), SqliteOptions::default());
        assert!(matches!(opened, Err(StoreError::Failed(_))), "{opened:?}");
    }

    #[test]
    fn open_applies_the_schema_once_and_sets_durable_pragmas() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for _ in 0..2 {
            let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
            runtime.block_on(store.close()).unwrap();
        }
        let conn = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(usize::try_from(version).unwrap(), MIGRATIONS.len());
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal", "WAL is persistent in the file");
    }

    #[test]
    fn a_clean_close_signs_a_checkpoint_over_every_audit_event() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Arc::new(CheckpointSigner::generate("caregate.test/seal").unwrap());
        let options = SqliteOptions {
            audit_signing: Some(AuditSigning {
                signer: signer.clone(),
                // Due only every 1000 events or hourly: without the seal, events 2..=3 would
                // stay unattested after this short run.
                schedule: CheckpointSchedule {
                    every_events: std::num::NonZeroU64::new(1000).unwrap(),
                    every: time::Duration::seconds(3600),
                },
            }),
            ..SqliteOptions::default()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = SqliteStore::open(dir.path(), options).unwrap();
        for n in 0..3 {
            runtime
                .block_on(store.submit(submission(&format!("o{n}"), vec![b'x'; 40 + n])))
                .unwrap();
        }
        runtime.block_on(store.close()).unwrap();
        let verification = verify_audit(dir.path(), &signer.verifier(), &[]).unwrap();
        assert!(verification.is_ok(), "{verification:?}");
        assert_eq!(verification.report.events, 3);
        assert_eq!(verification.report.attested_size, 3, "{verification:?}");
    }
}
