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
use caregate_audit::{Action, AuditEvent, Outcome};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub mod delivery;
pub mod export_jobs;
pub mod postgres;
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

/// A search of the audit log for IG officers (DOMAIN.md `IGQ`). Every filter is optional and they
/// combine with AND; results come oldest first, one page at a time (keyset paging on `seq`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditQuery {
    /// The patient's NHS number (already validated by the caller).
    pub patient: Option<String>,
    /// The acting partner's id.
    pub partner: Option<String>,
    /// Events recorded at or after this instant.
    pub from: Option<OffsetDateTime>,
    /// Events recorded before this instant.
    pub to: Option<OffsetDateTime>,
    pub action: Option<Action>,
    pub outcome: Option<Outcome>,
    /// Only break-glass accesses (purpose of use `ETREAT` or `BTG`, DOMAIN.md `LR-2`).
    pub break_glass_only: bool,
    /// Only events nobody has reviewed yet (with `break_glass_only`: the review queue).
    pub unreviewed_only: bool,
    /// Continue after this sequence number (the previous page's `next`).
    pub after_seq: Option<Seq>,
    /// Page size; the store caps it at [`AuditQuery::MAX_LIMIT`] (0 means the default).
    pub limit: usize,
}

impl AuditQuery {
    /// The largest page a store returns.
    pub const MAX_LIMIT: usize = 1_000;
    /// The page size when `limit` is 0.
    pub const DEFAULT_LIMIT: usize = 100;

    /// The page size actually used.
    pub fn page_size(&self) -> usize {
        match self.limit {
            0 => Self::DEFAULT_LIMIT,
            n => n.min(Self::MAX_LIMIT),
        }
    }
}

/// A break-glass event marked as reviewed by an IG officer (DOMAIN.md `LR-2`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReview {
    /// The reviewed event.
    pub seq: Seq,
    /// Who reviewed it (the officer's username or the partner id).
    pub reviewer: String,
    /// Set by the store at commit.
    #[serde(with = "time::serde::rfc3339")]
    pub reviewed_at: OffsetDateTime,
    pub note: String,
}

/// One page of an [`AuditQuery`].
#[derive(Debug, Clone, PartialEq)]
pub struct AuditPage {
    pub events: Vec<StoredAuditEvent>,
    /// The reviews of events on this page, if any were reviewed.
    pub reviews: Vec<AuditReview>,
    /// Pass as `after_seq` for the next page; `None` on the last page.
    pub next: Option<Seq>,
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
/// Bulk export jobs are kept through the [`export_jobs::ExportJobs`] part of it.
#[async_trait]
pub trait Store: export_jobs::ExportJobs + Send + Sync + std::fmt::Debug + 'static {
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

    /// One page of audit events matching `query`, oldest first.
    async fn query_audit(&self, query: &AuditQuery) -> Result<AuditPage, StoreError>;

    /// One audit event by sequence number, with its review if it has one.
    async fn audit_event(
        &self,
        seq: Seq,
    ) -> Result<Option<(StoredAuditEvent, Option<AuditReview>)>, StoreError>;

    /// Mark event `review.seq` as reviewed, durably, in the same commit as `audit` (the review is
    /// itself an audited action). `Conflict` if it was already reviewed; `PreconditionFailed` if
    /// there is no such event. `review.reviewed_at` is replaced by the commit time.
    async fn review_audit(
        &self,
        review: AuditReview,
        audit: AuditEvent,
    ) -> Result<AuditReview, StoreError>;

    // --- Delivery (issue 4): delivery rows, inbox, dead letters. See [`delivery`]. ---

    /// Create delivery rows (idempotent on `(seq, partner)`) and move `reader`'s cursor to
    /// `through`, in one commit: a crash leaves either both or neither. Returns the rows created.
    async fn enqueue_deliveries(
        &self,
        reader: &str,
        through: Seq,
        rows: Vec<delivery::NewDelivery>,
    ) -> Result<u64, StoreError>;

    /// Claim up to `limit` due push rows for `partner`, oldest first: pending, retry time reached,
    /// not leased, and no earlier pending row with the same order key. Each is leased for `lease`
    /// (not claimed again until it ends or the lease runs out, e.g. after a crash).
    async fn claim_deliveries(
        &self,
        partner: &str,
        limit: usize,
        lease: std::time::Duration,
    ) -> Result<Vec<delivery::PendingDelivery>, StoreError>;

    /// Record how an attempt on a pending row ended, with its audit events, in one commit.
    /// Returns false (and writes nothing) if the row was no longer pending.
    async fn finish_delivery(
        &self,
        id: delivery::DeliveryId,
        result: delivery::DeliveryResult,
        audit: Vec<AuditEvent>,
    ) -> Result<bool, StoreError>;

    /// Pending inbox rows of `partner` with `seq > after`, oldest first, at most `limit`.
    async fn inbox_page(
        &self,
        partner: &str,
        after: Seq,
        limit: usize,
    ) -> Result<delivery::InboxPage, StoreError>;

    /// Mark `partner`'s pending inbox rows with `seq <= through` delivered, writing for each one
    /// a copy of `template` naming its record and patient, in one commit. Returns how many.
    async fn ack_inbox(
        &self,
        partner: &str,
        through: Seq,
        template: AuditEvent,
    ) -> Result<u64, StoreError>;

    /// Queue depth, lag and last failure per destination (one destination if `partner` is set).
    async fn delivery_status(
        &self,
        partner: Option<&str>,
    ) -> Result<Vec<delivery::DestinationStatus>, StoreError>;

    /// Dead letters with `id > after`, oldest first, at most `limit`.
    async fn dead_letters(
        &self,
        partner: Option<&str>,
        after: delivery::DeliveryId,
        limit: usize,
    ) -> Result<Vec<delivery::DeadLetter>, StoreError>;

    /// Put dead letters back in the queue (pending, due now, attempts reset), with `audit` (the
    /// operator's action) in the same commit. Returns how many.
    async fn replay_dead_letters(
        &self,
        selector: delivery::ReplaySelector,
        audit: AuditEvent,
    ) -> Result<u64, StoreError>;
}
