//! The cluster store (issue 8): the [`Store`] trait on PostgreSQL, shared by several stateless
//! gateway instances. Same semantics as [`crate::sqlite::SqliteStore`] for every trait method;
//! the store test suite runs against both (`crates/store/tests/`).
//!
//! **Group commit.** As in SQLite, one writer task per instance owns the only write connection.
//! [`Store::submit`] queues the request with a reply channel; the writer takes the first queued
//! request and whatever else is already queued (up to [`PostgresOptions::max_batch`]), runs them
//! in one transaction, each in its own `SAVEPOINT` (a refused request is rolled back alone), and
//! `COMMIT`s once with `synchronous_commit = on`, so the commit returns only after PostgreSQL has
//! flushed its WAL: one WAL flush for the whole batch. Only then are the requests answered.
//!
//! **One total order across instances.** Log and audit sequence numbers are assigned by the
//! writer from `MAX(seq)` while its transaction holds a transaction-level advisory lock
//! ([`LOG_LOCK`]), taken at `BEGIN` by every batch that appends (submissions, reviews, delivery
//! results, inbox acks, replays) and released by `COMMIT`. So a transaction that took seq `n`
//! has committed (its rows visible) before any other transaction can take `n + 1`: sequence order
//! *is* commit order, and a reader following `seq > cursor` never skips a row that commits late —
//! the classic `BIGSERIAL` pitfall (a sequence hands out 7 and 8; 8 commits first; a reader moves
//! its cursor past 8 and never sees 7). The numbers are also gapless (a rolled-back request gives
//! its numbers back), exactly like SQLite's single writer. The price is that appending batches
//! of different instances commit one after another; each batch still carries many requests, so
//! throughput scales with batch size rather than with instances. ARCHITECTURE.md discusses the
//! alternative (readers bounded by the lowest in-flight seq).
//!
//! **Audit: one Merkle log per instance.** Every event row carries the `instance_id` of the
//! instance that wrote it and its leaf index in that instance's RFC 9162 tree (`leaf_seq`, from 1,
//! contiguous); the leaf hash is `H(0x00 ‖ leaf_seq ‖ event)`. Each instance keeps its own
//! frontier (`audit_trees`) and signs its own checkpoints (`audit_checkpoints`, keyed by
//! instance). The global `seq` is what readers and IG queries see; [`verify_audit`] checks every
//! instance's chain. An instance id is held by one live process at a time (a session advisory
//! lock on the writer connection), so two processes can never extend the same chain.
//!
//! **Failures.** A request refused by its precondition rolls back to its savepoint. Connection
//! loss, deadlocks, serialization failures and resource exhaustion abort the batch with
//! [`StoreError::Unavailable`] (nothing acknowledged; the writer reconnects and reloads its audit
//! tree from the database before the next batch, since a `COMMIT` cut off mid-way may or may not
//! have happened — a retry with the same idempotency key finds out). Corruption reported by the
//! server (`XX001`, `XX002`), an I/O error (`58030`), or stored data this code cannot have written
//! poisons the store (fail-stop), as in SQLite. A `COMMIT` that returned is durable: PostgreSQL
//! itself stops (PANIC) rather than continue after a failed WAL fsync.
//!
//! **TLS** ([`tls`]): every connection — writer, readers, migrations, audit verification —
//! is opened by [`connect_client`] with the [`PostgresTls`] settings resolved against the URL's
//! hosts: `disable`, `require` or `verify-full` with libpq's meaning, rustls on aws-lc-rs.
//! Without a mode, `verify-full` unless every host is loopback or a unix socket, so a database on
//! another host is never reached in clear by default.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use caregate_audit::AuditEvent;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, Row};

use crate::sqlite::{AuditSigning, StoreStats};
use crate::{
    AuditPage, AuditQuery, AuditReview, LogEntry, Receipt, Seq, Store, StoreError,
    StoredAuditEvent, Submission,
};

mod delivery;
mod query;
mod schema;
mod tls;
mod verify;
mod writer;

pub use tls::{CaCertificates, PostgresTls, PostgresTlsError, TlsMode};

pub use verify::{
    InstanceVerification, PostgresAuditVerification, audit_instances, verify_audit, verify_instance,
};

/// Advisory lock keys (`pg_advisory_*lock(int4, int4)`): the first half is caregate's class so
/// other applications sharing the database do not collide with us.
const LOCK_CLASS: i32 = 0x0CA2_E6A7;
/// Serialises appending transactions across instances (see the module docs).
const LOG_LOCK: i32 = 1;
/// The log lock's key pair, `pg_advisory_lock(LOG_LOCK_KEY[0], LOG_LOCK_KEY[1])`: an operator
/// (or a test) holding it pauses every instance's appends, e.g. for a consistent `pg_dump`
/// boundary. Reads go on.
pub const LOG_LOCK_KEY: [i32; 2] = [LOCK_CLASS, LOG_LOCK];
/// Serialises schema migrations when several instances start at once.
const MIGRATION_LOCK: i32 = 2;
/// Second key of an instance's session lock: `hashtext(instance_id)` is the other half, under
/// this class.
const INSTANCE_LOCK_CLASS: i32 = 0x0CA2_E6A8;

/// Queued requests per unit of `max_batch` (backpressure, as in SQLite).
const QUEUE_BATCHES: usize = 4;

/// Columns of a [`LogEntry`], in [`log_entry`] order.
const LOG_COLUMNS: &str = "l.seq, l.partner, l.resource_type, l.id, l.version_id, l.content, \
     l.content_hash, l.nhs_number, l.decision, l.committed_at";

/// Tuning and identity for [`PostgresStore`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// This gateway instance's id: names its audit chain. Must be stable across restarts of the
    /// same instance and unique among instances sharing the database (e.g. the pod name of a
    /// StatefulSet, or the host name).
    pub instance_id: String,
    /// The most requests one commit may carry.
    pub max_batch: usize,
    /// Connections kept for reads (each is shared by concurrent reads: queries are pipelined).
    pub read_connections: usize,
    /// Who signs this instance's checkpoints, and how often. Use a log id that names the
    /// instance (`<ics>/audit/<instance_id>`) so a witness's checkpoint says which chain it pins.
    pub audit_signing: Option<AuditSigning>,
    /// How long [`PostgresStore::connect`] waits for the instance id to be free (a previous
    /// process of this instance whose connection the server has not yet dropped).
    pub instance_lock_wait: Duration,
    /// TLS for every connection of the store (default: by host, see [`PostgresTls::by_host`]).
    pub tls: PostgresTls,
}

impl PostgresOptions {
    /// Defaults for instance `instance_id`.
    pub fn new(instance_id: impl Into<String>) -> Self {
        Self {
            instance_id: instance_id.into(),
            max_batch: Self::default_max_batch(),
            read_connections: Self::default_read_connections(),
            audit_signing: None,
            instance_lock_wait: Self::default_instance_lock_wait(),
            tls: PostgresTls::by_host(),
        }
    }

    /// Default for [`PostgresOptions::instance_lock_wait`].
    pub const fn default_instance_lock_wait() -> Duration {
        Duration::from_secs(15)
    }

    /// Default for [`PostgresOptions::max_batch`].
    pub const fn default_max_batch() -> usize {
        512
    }

    /// Default for [`PostgresOptions::read_connections`].
    pub const fn default_read_connections() -> usize {
        2
    }
}

/// Apply pending schema migrations to the database at `url` (over `tls`) and return the schema
/// version (for `caregate db migrate`, run before rolling out a new version;
/// [`PostgresStore::connect`] does the same at start).
pub async fn migrate(url: &str, tls: &PostgresTls) -> Result<usize, StoreError> {
    let endpoint = Endpoint::new(url, tls)?;
    let mut client = connect_client(&endpoint, "migrate")
        .await
        .map_err(opening_error)?;
    schema::migrate(&mut client).await.map_err(opening_error)?;
    Ok(schema::MIGRATIONS.len())
}

/// The PostgreSQL store. See the module docs.
pub struct PostgresStore {
    instance_id: String,
    readers: Arc<ReadPool>,
    jobs: mpsc::Sender<writer::Job>,
    writer: JoinHandle<()>,
    health: Arc<Health>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("instance_id", &self.instance_id)
            .field("stats", &self.stats())
            .field("poisoned", &self.health.poisoned.get().is_some())
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connect to `url` (a `postgres://` URL or libpq `key=value` string) with
    /// [`PostgresOptions::tls`], apply pending schema migrations, take this instance's id, load
    /// its audit tree and start the writer task.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let config = Endpoint::new(url, &options.tls)?;
        if options.instance_id.is_empty() || options.instance_id.len() > 200 {
            return Err(StoreError::Failed(
                "the instance id must be 1 to 200 characters".to_owned(),
            ));
        }
        let mut client = connect_client(&config, &format!("writer {}", options.instance_id))
            .await
            .map_err(opening_error)?;
        schema::migrate(&mut client).await.map_err(opening_error)?;
        writer::lock_instance(&client, &options.instance_id, options.instance_lock_wait)
            .await
            .map_err(opening_error)?;
        let tree =
            writer::AuditTree::load(&client, &options.instance_id, options.audit_signing.clone())
                .await
                .map_err(opening_error)?;

        let read_connections = options.read_connections.max(1);
        let mut reader_config = config.clone();
        if reader_config.config.get_application_name().is_none() {
            reader_config
                .config
                .application_name(format!("caregate reader {}", options.instance_id));
        }
        let mut clients = Vec::with_capacity(read_connections);
        for _ in 0..read_connections {
            clients.push(Arc::new(
                connect_client(&reader_config, "reader")
                    .await
                    .map_err(opening_error)?,
            ));
        }
        let readers = Arc::new(ReadPool {
            config: reader_config,
            clients: Mutex::new(clients),
            next: AtomicUsize::new(0),
        });

        let max_batch = options.max_batch.max(1);
        let health = Arc::new(Health::default());
        let (jobs, queue) = mpsc::channel(max_batch.saturating_mul(QUEUE_BATCHES));
        let writer = writer::Writer {
            config,
            client,
            instance_id: options.instance_id.clone(),
            queue,
            max_batch,
            health: Arc::clone(&health),
            tree,
            statements: writer::Statements::default(),
            stale: false,
        };
        let writer = tokio::spawn(writer.run());
        tracing::info!(
            instance_id = %options.instance_id,
            max_batch,
            read_connections,
            "postgres store opened"
        );
        Ok(Self {
            instance_id: options.instance_id,
            readers,
            jobs,
            writer,
            health,
        })
    }

    /// This instance's id.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Submissions taken and commits made so far by this instance.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            submissions: self.health.submissions.load(Ordering::Relaxed),
            commits: self.health.commits.load(Ordering::Relaxed),
        }
    }

    /// Total time the writer spent in batch transactions (statements and commit), for metrics.
    pub fn commit_time(&self) -> Duration {
        Duration::from_nanos(self.health.commit_nanos.load(Ordering::Relaxed))
    }

    /// True once the store has failed (poisoned) and refuses writes until restart.
    pub fn has_failed(&self) -> bool {
        self.health.poisoned.get().is_some()
    }

    /// Stop taking requests, let the writer commit everything already queued, release the
    /// instance id and wait for the writer to exit. Errors if the writer died or the store had
    /// failed (poisoned).
    pub async fn close(self) -> Result<(), StoreError> {
        let Self {
            jobs,
            writer,
            readers,
            health,
            instance_id,
        } = self;
        drop(readers);
        drop(jobs);
        writer
            .await
            .map_err(|_| StoreError::Failed("the store writer task failed".to_owned()))?;
        tracing::info!(instance_id = %instance_id, "postgres store closed");
        health.check()
    }

    /// Send one request to the writer and wait for its answer (after the commit).
    async fn request(&self, work: writer::Work) -> Result<writer::Answer, StoreError> {
        self.health.check()?;
        let (reply, answer) = oneshot::channel();
        if self.jobs.send(writer::Job { work, reply }).await.is_err() {
            return Err(self.health.poison("the store writer has stopped"));
        }
        match answer.await {
            Ok(answer) => answer,
            Err(_) => Err(self
                .health
                .poison("the store writer stopped without answering")),
        }
    }

    /// A read connection (reconnected if it was lost).
    async fn reader(&self) -> Result<Arc<Client>, StoreError> {
        self.readers
            .get()
            .await
            .map_err(|fault| fault.into_store_error(&self.health))
    }

    /// The answer for a read's result (a fatal fault poisons, as in SQLite).
    fn answer<T>(&self, result: Result<T, Fault>) -> Result<T, StoreError> {
        result.map_err(|fault| fault.into_store_error(&self.health))
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn submit(&self, submission: Submission) -> Result<Receipt, StoreError> {
        match self.request(writer::Work::Submit(submission)).await? {
            writer::Answer::Receipt(receipt) => Ok(receipt),
            _ => Err(mismatch()),
        }
    }

    async fn read_log(&self, after: Seq, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        let client = self.reader().await?;
        self.answer(query::read_log(&client, after, limit).await)
    }

    async fn read_current(
        &self,
        partner: &str,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<LogEntry>, StoreError> {
        let client = self.reader().await?;
        self.answer(query::read_current(&client, partner, resource_type, id).await)
    }

    async fn read_audit(
        &self,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<StoredAuditEvent>, StoreError> {
        let client = self.reader().await?;
        self.answer(query::read_audit(&client, after, limit).await)
    }

    async fn load_cursor(&self, reader: &str) -> Result<Seq, StoreError> {
        let client = self.reader().await?;
        self.answer(query::load_cursor(&client, reader).await)
    }

    async fn save_cursor(&self, reader: &str, seq: Seq) -> Result<(), StoreError> {
        let work = writer::Work::SaveCursor {
            reader: reader.to_owned(),
            seq,
        };
        match self.request(work).await? {
            writer::Answer::CursorSaved => Ok(()),
            _ => Err(mismatch()),
        }
    }

    async fn query_audit(&self, query: &AuditQuery) -> Result<AuditPage, StoreError> {
        let client = self.reader().await?;
        self.answer(query::query_audit(&client, query).await)
    }

    async fn audit_event(
        &self,
        seq: Seq,
    ) -> Result<Option<(StoredAuditEvent, Option<AuditReview>)>, StoreError> {
        let client = self.reader().await?;
        self.answer(query::audit_event(&client, seq).await)
    }

    async fn review_audit(
        &self,
        review: AuditReview,
        audit: AuditEvent,
    ) -> Result<AuditReview, StoreError> {
        match self.request(writer::Work::Review { review, audit }).await? {
            writer::Answer::Reviewed(review) => Ok(review),
            _ => Err(mismatch()),
        }
    }

    async fn enqueue_deliveries(
        &self,
        reader: &str,
        through: Seq,
        rows: Vec<crate::delivery::NewDelivery>,
    ) -> Result<u64, StoreError> {
        let work = delivery::DeliveryWork::Enqueue {
            reader: reader.to_owned(),
            through,
            rows,
        };
        self.delivery_count(work).await
    }

    async fn claim_deliveries(
        &self,
        partner: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<crate::delivery::PendingDelivery>, StoreError> {
        let work = delivery::DeliveryWork::Claim {
            partner: partner.to_owned(),
            limit,
            lease,
        };
        match self.request(writer::Work::Delivery(work)).await? {
            writer::Answer::Delivery(delivery::DeliveryAnswer::Claimed(rows)) => Ok(rows),
            _ => Err(mismatch()),
        }
    }

    async fn finish_delivery(
        &self,
        id: crate::delivery::DeliveryId,
        result: crate::delivery::DeliveryResult,
        audit: Vec<AuditEvent>,
    ) -> Result<bool, StoreError> {
        let work = delivery::DeliveryWork::Finish { id, result, audit };
        match self.request(writer::Work::Delivery(work)).await? {
            writer::Answer::Delivery(delivery::DeliveryAnswer::Finished(changed)) => Ok(changed),
            _ => Err(mismatch()),
        }
    }

    async fn inbox_page(
        &self,
        partner: &str,
        after: Seq,
        limit: usize,
    ) -> Result<crate::delivery::InboxPage, StoreError> {
        let client = self.reader().await?;
        self.answer(delivery::inbox_page(&client, partner, after, limit).await)
    }

    async fn ack_inbox(
        &self,
        partner: &str,
        through: Seq,
        template: AuditEvent,
    ) -> Result<u64, StoreError> {
        let work = delivery::DeliveryWork::AckInbox {
            partner: partner.to_owned(),
            through,
            template,
        };
        self.delivery_count(work).await
    }

    async fn delivery_status(
        &self,
        partner: Option<&str>,
    ) -> Result<Vec<crate::delivery::DestinationStatus>, StoreError> {
        let client = self.reader().await?;
        self.answer(delivery::status(&client, partner).await)
    }

    async fn dead_letters(
        &self,
        partner: Option<&str>,
        after: crate::delivery::DeliveryId,
        limit: usize,
    ) -> Result<Vec<crate::delivery::DeadLetter>, StoreError> {
        let client = self.reader().await?;
        self.answer(delivery::dead_letters(&client, partner, after, limit).await)
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

impl PostgresStore {
    async fn delivery_count(&self, work: delivery::DeliveryWork) -> Result<u64, StoreError> {
        match self.request(writer::Work::Delivery(work)).await? {
            writer::Answer::Delivery(delivery::DeliveryAnswer::Count(n)) => Ok(n),
            _ => Err(mismatch()),
        }
    }
}

fn mismatch() -> StoreError {
    StoreError::Failed("the store writer answered a different request".to_owned())
}

/// Where and how to connect: the parsed URL, its `sslmode` set by the resolved TLS mode, and the
/// connector for that mode. Built once; every (re)connection uses it.
#[derive(Debug, Clone)]
struct Endpoint {
    config: Config,
    connector: tls::Connector,
}

impl Endpoint {
    fn new(url: &str, tls: &PostgresTls) -> Result<Self, StoreError> {
        // tokio-postgres's parse errors name the option, never echo the URL (which may hold a
        // password).
        let mut config: Config = url
            .parse()
            .map_err(|error| StoreError::Failed(format!("invalid PostgreSQL URL: {error}")))?;
        let connector = tls
            .resolve(&mut config)
            .map_err(|error| StoreError::Failed(error.to_string()))?;
        Ok(Self { config, connector })
    }
}

/// Open one connection and drive it on its own task. Every connection commits synchronously
/// (the server default, set explicitly so a server-wide `off` cannot weaken invariant 1).
/// `role` names the connection in `pg_stat_activity` (`caregate <role>`), so operators see which
/// connections are writers.
async fn connect_client(endpoint: &Endpoint, role: &str) -> Result<Client, Fault> {
    let mut config = endpoint.config.clone();
    if config.get_application_name().is_none() {
        config.application_name(format!("caregate {role}"));
    }
    let client = endpoint
        .connector
        .connect(&config)
        .await
        .map_err(Fault::Connect)?;
    client
        .batch_execute("SET synchronous_commit = on; SET TIME ZONE 'UTC'")
        .await?;
    Ok(client)
}

/// Read connections, shared round-robin (a `Client` pipelines concurrent queries).
#[derive(Debug)]
struct ReadPool {
    config: Endpoint,
    clients: Mutex<Vec<Arc<Client>>>,
    next: AtomicUsize,
}

impl ReadPool {
    async fn get(&self) -> Result<Arc<Client>, Fault> {
        let (slot, client) = {
            let clients = self
                .clients
                .lock()
                .map_err(|_| Fault::Internal("the read pool is poisoned".to_owned()))?;
            let slot = self.next.fetch_add(1, Ordering::Relaxed) % clients.len().max(1);
            (slot, clients.get(slot).cloned())
        };
        match client {
            Some(client) if !client.is_closed() => Ok(client),
            _ => {
                let fresh = Arc::new(connect_client(&self.config, "reader").await?);
                let mut clients = self
                    .clients
                    .lock()
                    .map_err(|_| Fault::Internal("the read pool is poisoned".to_owned()))?;
                if let Some(entry) = clients.get_mut(slot) {
                    *entry = Arc::clone(&fresh);
                }
                Ok(fresh)
            }
        }
    }
}

/// Shared between the store handle and the writer.
#[derive(Debug, Default)]
struct Health {
    /// Set once, on corruption or an I/O error reported by the server; never cleared.
    poisoned: OnceLock<String>,
    submissions: AtomicU64,
    commits: AtomicU64,
    /// Nanoseconds the writer spent in batch transactions (statements and `COMMIT`).
    commit_nanos: AtomicU64,
}

impl Health {
    fn check(&self) -> Result<(), StoreError> {
        match self.poisoned.get() {
            Some(reason) => Err(StoreError::Failed(reason.clone())),
            None => Ok(()),
        }
    }

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

/// How a failure affects the store (as in SQLite).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Severity {
    /// Nothing was acknowledged and a retry may succeed.
    Transient,
    /// Integrity is in doubt: fail-stop.
    Fatal,
    /// Confined to the request that raised it.
    Local,
}

/// `error` and its sources, `: `-separated.
fn error_chain(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn severity(error: &tokio_postgres::Error) -> Severity {
    severity_of(error.code().map(tokio_postgres::error::SqlState::code))
}

/// The severity of a SQLSTATE (`None`: no server error, the connection broke or a value did not
/// convert).
fn severity_of(code: Option<&str>) -> Severity {
    let Some(code) = code else {
        return Severity::Transient;
    };
    match code.get(..2) {
        // Connection exception, insufficient resources (disk full, out of memory, too many
        // connections), transaction rollback (deadlock, serialization), operator intervention
        // (shutdown, cancel).
        Some("08" | "53" | "40" | "57") => Severity::Transient,
        _ if code == "55P03" => Severity::Transient,
        // Internal error (data or index corrupted), system error (I/O).
        Some("XX" | "58") => Severity::Fatal,
        _ => Severity::Local,
    }
}

/// Why one piece of store work failed, before it is mapped to a [`StoreError`].
#[derive(Debug, thiserror::Error)]
enum Fault {
    /// The caller's precondition does not hold (`Conflict`, `PreconditionFailed`).
    #[error("{0}")]
    Refused(StoreError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A connection could not be opened. The message carries the causes (tokio-postgres's own
    /// says only "error performing TLS handshake" or "db error"): the TLS failure, or the
    /// server's refusal (`pg_hba.conf`, authentication). No row data can be in them.
    #[error("cannot connect to PostgreSQL: {}", error_chain(.0))]
    Connect(tokio_postgres::Error),
    /// Stored data that cannot be what this code wrote.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A value could not be encoded for storage.
    #[error("cannot encode for storage: {0}")]
    Encode(String),
    /// This process cannot do what the store needs.
    #[error("{0}")]
    Internal(String),
}

impl Fault {
    fn severity(&self) -> Severity {
        match self {
            Self::Refused(_) | Self::Encode(_) | Self::Internal(_) => Severity::Local,
            Self::Postgres(error) | Self::Connect(error) => severity(error),
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

    /// The answer for every request of a batch that did not commit (or whose `COMMIT` outcome
    /// is unknown): nothing is acknowledged, so only corruption and I/O errors poison.
    fn into_batch_error(self, health: &Health) -> StoreError {
        match self.severity() {
            Severity::Fatal => health.poison(self.to_string()),
            Severity::Transient | Severity::Local => StoreError::Unavailable(self.to_string()),
        }
    }
}

fn opening_error(fault: Fault) -> StoreError {
    match fault.severity() {
        Severity::Transient => StoreError::Unavailable(fault.to_string()),
        Severity::Fatal | Severity::Local => StoreError::Failed(fault.to_string()),
    }
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// A stored 32-byte hash.
fn hash32(bytes: &[u8], what: &str) -> Result<[u8; 32], Fault> {
    <[u8; 32]>::try_from(bytes)
        .map_err(|_| Fault::Corrupt(format!("a stored {what} is not 32 bytes")))
}

/// A [`LogEntry`] from [`LOG_COLUMNS`] starting at column `first`.
fn log_entry(row: &Row, first: usize) -> Result<LogEntry, Fault> {
    let content_hash: Vec<u8> = row.try_get(first + 6)?;
    Ok(LogEntry {
        seq: row.try_get(first)?,
        partner: row.try_get(first + 1)?,
        resource_type: row.try_get(first + 2)?,
        id: row.try_get(first + 3)?,
        version_id: row.try_get(first + 4)?,
        content: row.try_get(first + 5)?,
        content_hash: hash32(&content_hash, "content hash")?,
        nhs_number: row.try_get(first + 7)?,
        decision: row.try_get(first + 8)?,
        committed_at: row.try_get::<_, OffsetDateTime>(first + 9)?,
    })
}

/// Parameters of a dynamically built query.
type Params = Vec<Box<dyn ToSql + Sync + Send>>;

fn param_refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|param| param.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f4_server_corruption_and_io_errors_are_fatal_contention_and_resources_transient() {
        for code in ["XX001", "XX002", "58030"] {
            assert_eq!(severity_of(Some(code)), Severity::Fatal, "{code}");
        }
        // Connection failure, disk full, out of memory, too many connections, deadlock,
        // serialization failure, admin shutdown, lock not available; and a broken connection.
        for code in [
            "08006", "53100", "53200", "53300", "40P01", "40001", "57P01", "55P03",
        ] {
            assert_eq!(severity_of(Some(code)), Severity::Transient, "{code}");
        }
        assert_eq!(severity_of(None), Severity::Transient);
        // A unique or check violation is the request's own problem.
        for code in ["23505", "23514", "22001"] {
            assert_eq!(severity_of(Some(code)), Severity::Local, "{code}");
        }
    }

    #[test]
    fn lock_keys_are_distinct() {
        assert_ne!(LOG_LOCK, MIGRATION_LOCK);
        assert_ne!(LOCK_CLASS, INSTANCE_LOCK_CLASS);
    }
}
