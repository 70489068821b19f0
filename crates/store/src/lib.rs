//! The committed log: caregate's spine (DESIGN.md "one log, many readers").
//!
//! Intake appends a [`Submission`] (records + audit events, all-or-nothing); delivery, feeds and
//! audit queries read the log by sequence number with their own durable cursors. The [`Store`]
//! trait is the only storage interface the rest of the system sees; [`sqlite::SqliteStore`] is the
//! embedded default, and the cluster mode adds PostgreSQL behind the same trait.
//!
//! Architecture invariant: `Store::submit` returns `Ok` only after the submission is durable
//! (fsync'd); a 2xx to a partner is sent only after that.

use async_trait::async_trait;
use caregate_audit::AuditEvent;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub mod sqlite;

/// A position in the committed log. Starts at 1; 0 means "before the first entry".
pub type Seq = i64;

/// How a record write treats an existing resource with the same (partner, type, id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteMode {
    /// FHIR create: the id is new (server-assigned).
    Create,
    /// FHIR conditional create: if a resource of this type from this partner already carries the
    /// identifier token (`system|value`), nothing is written and the existing one is returned.
    CreateIfNoneExist { identifier: String },
    /// FHIR update (update-as-create allowed). `if_match` carries the `If-Match` version, if sent.
    Update { if_match: Option<i64> },
}

/// One resource to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordWrite {
    pub resource_type: String,
    /// Logical id. Ids are scoped to the submitting partner: two partners may both hold `Patient/1`.
    pub id: String,
    pub mode: WriteMode,
    /// Canonical JSON of the resource, without the server-assigned `meta.versionId` and
    /// `meta.lastUpdated` (the store holds those as columns).
    pub content: Vec<u8>,
    /// SHA-256 of `content`.
    pub content_hash: [u8; 32],
    /// NHS number of the patient the record is about, if known (indexed for IG queries).
    pub nhs_number: Option<String>,
    /// Business identifiers as `system|value` tokens (indexed for conditional create).
    pub identifiers: Vec<String>,
    /// The routing decision kept with the record (JSON). `None` until the policy stage exists
    /// for this record: readers treat it as "not yet decided" and deliver nothing.
    pub decision: Option<Vec<u8>>,
}

/// Everything one request commits, atomically.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// The submitting partner's id.
    pub partner: String,
    /// Retrying a submission with the same key returns the first receipt instead of writing again.
    pub idempotency_key: Option<String>,
    /// Written all-or-nothing (a FHIR transaction); may be empty (an audit-only submission).
    pub records: Vec<RecordWrite>,
    /// Audit events written in the same commit. Each record's event should already be here.
    pub audit: Vec<AuditEvent>,
}

/// What happened to one record of a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryOutcome {
    /// A new resource (version 1).
    Created,
    /// A new version of an existing resource.
    Updated,
    /// An update whose content equals the current version: nothing written.
    Unchanged,
    /// A conditional create that matched an existing resource: nothing written.
    Existing,
}

/// The committed state of one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryReceipt {
    pub resource_type: String,
    pub id: String,
    pub version_id: i64,
    /// The log position of this version (for `Unchanged`/`Existing`: of the current version).
    pub seq: Seq,
    pub outcome: EntryOutcome,
    #[serde(with = "time::serde::rfc3339")]
    pub last_updated: OffsetDateTime,
}

/// The result of a committed submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// One per record, in submission order.
    pub entries: Vec<EntryReceipt>,
    /// True when this receipt is the stored answer to an earlier submission with the same
    /// idempotency key (nothing was written this time, not even the audit events' records).
    pub replayed: bool,
}

/// One entry of the committed log, as readers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub seq: Seq,
    pub partner: String,
    pub resource_type: String,
    pub id: String,
    pub version_id: i64,
    pub content: Vec<u8>,
    pub content_hash: [u8; 32],
    pub nhs_number: Option<String>,
    pub decision: Option<Vec<u8>>,
    pub committed_at: OffsetDateTime,
}

/// An audit event with the sequence number the store gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAuditEvent {
    pub seq: Seq,
    pub event: AuditEvent,
}

/// Why a store operation failed. The edge maps these to responses: `Conflict` and
/// `PreconditionFailed` are the caller's (409/412); `Unavailable` is 503 with `Retry-After`;
/// `Failed` is fail-stop (the store refuses all further writes, PostgreSQL-style, DOMAIN.md F4).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A `Create` for an id that already exists for this partner.
    #[error("a resource with this id already exists")]
    Conflict,
    /// `If-Match` named a version that is not the current one.
    #[error("the resource's current version is not the one given in If-Match")]
    PreconditionFailed,
    /// Temporarily unable to commit (disk full, database busy); nothing was written.
    #[error("the store cannot commit right now: {0}")]
    Unavailable(String),
    /// A durability failure (fsync/IO error) or corruption: the store has stopped taking writes.
    #[error("the store failed and has stopped taking writes: {0}")]
    Failed(String),
}

/// The storage interface. Implementations must be safe to share between all request tasks.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Commit a submission atomically and durably, group-committed with concurrent submissions.
    /// Returns only once the data is on stable storage.
    async fn submit(&self, submission: Submission) -> Result<Receipt, StoreError>;

    /// Log entries with `seq > after`, oldest first, at most `limit`.
    async fn read_log(&self, after: Seq, limit: usize) -> Result<Vec<LogEntry>, StoreError>;

    /// The current version of a resource held for `partner`, if any.
    async fn read_current(
        &self,
        partner: &str,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<LogEntry>, StoreError>;

    /// Audit events with `seq > after`, oldest first, at most `limit`.
    async fn read_audit(
        &self,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<StoredAuditEvent>, StoreError>;

    /// A reader's durable cursor (0 if it has none yet).
    async fn load_cursor(&self, reader: &str) -> Result<Seq, StoreError>;

    /// Move a reader's durable cursor.
    async fn save_cursor(&self, reader: &str, seq: Seq) -> Result<(), StoreError>;
}
