//! The writer task: group commit, sequence numbers under the log lock, the instance's audit
//! tree. See the module docs of [`super`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use caregate_audit::checkpoint::{Checkpoint, SignedCheckpoint};
use caregate_audit::event_hash::{canonical_event_bytes, event_leaf_hash};
use caregate_audit::{AuditEvent, Frontier};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement, Transaction};

use super::delivery::{self, DeliveryAnswer, DeliveryWork};
use super::query::apply_review;
use super::{Fault, Health, INSTANCE_LOCK_CLASS, LOCK_CLASS, LOG_LOCK, Severity, connect_client};
use crate::sqlite::AuditSigning;
use crate::{
    AuditReview, EntryOutcome, EntryReceipt, Receipt, RecordWrite, Seq, StoreError, Submission,
    WriteMode,
};

/// One request to the writer.
pub(super) struct Job {
    pub(super) work: Work,
    pub(super) reply: oneshot::Sender<Result<Answer, StoreError>>,
}

pub(super) enum Work {
    Submit(Submission),
    SaveCursor {
        reader: String,
        seq: Seq,
    },
    Review {
        review: AuditReview,
        audit: AuditEvent,
    },
    Delivery(DeliveryWork),
}

impl Work {
    /// Whether this request may append to the log or the audit log, and so needs the log lock
    /// and sequence numbers.
    fn appends(&self) -> bool {
        match self {
            Self::Submit(_) | Self::Review { .. } => true,
            Self::SaveCursor { .. } => false,
            Self::Delivery(work) => work.appends(),
        }
    }
}

pub(super) enum Answer {
    Receipt(Receipt),
    CursorSaved,
    Reviewed(AuditReview),
    Delivery(DeliveryAnswer),
}

/// Statements prepared once per writer connection. Without them every statement is parsed
/// again on each use: one more round trip per statement, each inside the log lock.
#[derive(Default)]
pub(super) struct Statements(Mutex<HashMap<String, Statement>>);

impl Statements {
    fn cached(&self, sql: &str) -> Result<Option<Statement>, Fault> {
        Ok(self.lock()?.get(sql).cloned())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Statement>>, Fault> {
        self.0
            .lock()
            .map_err(|_| Fault::Internal("the statement cache is poisoned".to_owned()))
    }

    /// Forget every statement (a new connection; or a statement failed, e.g. after another
    /// instance migrated the schema and a cached plan no longer fits).
    fn clear(&self) {
        if let Ok(mut statements) = self.0.lock() {
            statements.clear();
        }
    }
}

/// A transaction (or a request's savepoint) with the writer's prepared statements.
pub(super) struct Tx<'a, 't> {
    tx: &'a Transaction<'t>,
    statements: &'a Statements,
}

impl Tx<'_, '_> {
    async fn statement(&self, sql: &str) -> Result<Statement, Fault> {
        if let Some(statement) = self.statements.cached(sql)? {
            return Ok(statement);
        }
        let statement = self.tx.prepare(sql).await?;
        self.statements
            .lock()?
            .insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    pub(super) async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Fault> {
        let statement = self.statement(sql).await?;
        Ok(self.tx.execute(&statement, params).await?)
    }

    pub(super) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Fault> {
        let statement = self.statement(sql).await?;
        Ok(self.tx.query(&statement, params).await?)
    }

    /// Run `steps` pipelined: every statement is sent before the first answer is awaited
    /// (tokio-postgres writes queued requests in order, and the server runs them in that order),
    /// so the whole list costs one round trip instead of one each. Statements are prepared
    /// first (cached after the connection's first batch) so none can overtake another. Each
    /// step's rows in order, or the first failure in order (after it, the transaction is
    /// aborted and the later steps fail too; the caller rolls back its savepoint).
    pub(super) async fn pipeline(&self, steps: &[Step<'_>]) -> Result<Vec<Vec<Row>>, Fault> {
        first_failure(self.pipeline_results(steps).await?)
    }

    /// [`Self::pipeline`], with every step's own result (`Err` only if a statement could not be
    /// prepared, before anything was sent).
    async fn pipeline_results(&self, steps: &[Step<'_>]) -> Result<Vec<StepResult>, Fault> {
        let mut prepared = Vec::with_capacity(steps.len());
        for step in steps {
            prepared.push(self.statement(step.sql).await?);
        }
        let params: Vec<Vec<&(dyn ToSql + Sync)>> = steps
            .iter()
            .map(|step| {
                step.params
                    .iter()
                    .map(|param| &**param as &(dyn ToSql + Sync))
                    .collect()
            })
            .collect();
        let mut pending: Vec<QueryFuture<'_>> = prepared
            .iter()
            .zip(&params)
            .map(|(statement, params)| {
                Box::pin(self.tx.query(statement, params.as_slice())) as QueryFuture<'_>
            })
            .collect();
        Ok(in_order(&mut pending).await)
    }

    pub(super) async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Fault> {
        let statement = self.statement(sql).await?;
        Ok(self.tx.query_opt(&statement, params).await?)
    }
}

type StepResult = Result<Vec<Row>, tokio_postgres::Error>;

/// Every step's rows, or the first failure in order.
fn first_failure(results: Vec<StepResult>) -> Result<Vec<Vec<Row>>, Fault> {
    results
        .into_iter()
        .map(|result| result.map_err(Fault::from))
        .collect()
}

type QueryFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;

/// Drive `futures` to completion, polling them in index order, so the first poll of each (which
/// queues its statement on the connection) happens in that order; every result, in order.
async fn in_order(futures: &mut [QueryFuture<'_>]) -> Vec<Result<Vec<Row>, tokio_postgres::Error>> {
    let mut results: Vec<Option<Result<Vec<Row>, tokio_postgres::Error>>> =
        futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (future, result) in futures.iter_mut().zip(results.iter_mut()) {
            if result.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *result = Some(value),
                    Poll::Pending => done = false,
                }
            }
        }
        if done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    results.into_iter().flatten().collect()
}

/// One statement of a pipeline, with its parameters (owned or borrowed from the request).
pub(super) struct Step<'a> {
    sql: &'static str,
    params: Vec<Box<dyn ToSql + Sync + Send + 'a>>,
}

impl<'a> Step<'a> {
    pub(super) fn new(sql: &'static str, params: Vec<Box<dyn ToSql + Sync + Send + 'a>>) -> Self {
        Self { sql, params }
    }
}

const SAVEPOINT: &str = "SAVEPOINT request";
const RELEASE: &str = "RELEASE SAVEPOINT request";

/// The commit time of one batch: the database server's clock (one clock for every instance),
/// read after the log lock was taken, so commit times follow `seq` order.
pub(super) struct BatchClock {
    pub(super) at: OffsetDateTime,
}

/// What a request appends with: the next sequence numbers and this instance's audit tree. Each
/// request works on a copy, kept or dropped with its savepoint.
#[derive(Clone)]
pub(super) struct Appender {
    pub(super) instance_id: Arc<str>,
    /// The last log seq taken (committed or earlier in this batch).
    pub(super) log_seq: Seq,
    /// The last audit seq taken.
    pub(super) audit_seq: Seq,
    pub(super) frontier: Frontier,
    /// False in batches that did not take the log lock: appending there is a bug.
    locked: bool,
}

impl Appender {
    fn next_log_seq(&mut self) -> Result<Seq, Fault> {
        if !self.locked {
            return Err(Fault::Internal(
                "a log append outside the log lock".to_owned(),
            ));
        }
        self.log_seq += 1;
        Ok(self.log_seq)
    }
}

/// This instance's audit Merkle tree: frontier after the last commit, last signed checkpoint.
pub(super) struct AuditTree {
    frontier: Frontier,
    last_checkpoint: Option<Checkpoint>,
    signing: Option<AuditSigning>,
}

impl AuditTree {
    /// Load the tree state written by this instance's last commit. The frontier must cover
    /// exactly the instance's events present: anything else means the tables were edited.
    pub(super) async fn load(
        client: &Client,
        instance_id: &str,
        signing: Option<AuditSigning>,
    ) -> Result<Self, Fault> {
        let saved = client
            .query_opt(
                "SELECT frontier FROM audit_trees WHERE instance_id = $1",
                &[&instance_id],
            )
            .await?;
        let frontier = match saved {
            Some(row) => Frontier::from_bytes(&row.try_get::<_, Vec<u8>>(0)?).map_err(|_| {
                Fault::Corrupt("the stored audit tree frontier is invalid".to_owned())
            })?,
            None => Frontier::new(),
        };
        let events: i64 = client
            .query_one(
                "SELECT COALESCE(MAX(leaf_seq), 0) FROM audit_events WHERE instance_id = $1",
                &[&instance_id],
            )
            .await?
            .try_get(0)?;
        if u64::try_from(events).ok() != Some(frontier.size()) {
            return Err(Fault::Corrupt(format!(
                "the audit tree of instance {instance_id} does not cover its audit events; \
                 run `caregate audit verify`"
            )));
        }
        let last = client
            .query_opt(
                "SELECT checkpoint FROM audit_checkpoints WHERE instance_id = $1 \
                 ORDER BY size DESC LIMIT 1",
                &[&instance_id],
            )
            .await?;
        let last_checkpoint = match last {
            Some(row) => Some(
                SignedCheckpoint::parse(&row.try_get::<_, String>(0)?)
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

    /// Sign and insert a checkpoint for `frontier` when the schedule says one is due or, with
    /// `seal`, whenever it covers events the last checkpoint does not (at a clean shutdown, so
    /// every event written is attested, as SQLite does).
    async fn sign_checkpoint(
        &self,
        tx: &Transaction<'_>,
        instance_id: &str,
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
        tx.execute(
            "INSERT INTO audit_checkpoints (instance_id, size, checkpoint, created_at) \
             VALUES ($1, $2, $3, $4)",
            &[
                &instance_id,
                &i64::try_from(checkpoint.size).unwrap_or(i64::MAX),
                &signed.to_text(),
                &clock.at,
            ],
        )
        .await?;
        Ok(Some(checkpoint))
    }
}

/// Take this instance's id for the life of the writer connection (a session advisory lock), so
/// no second process extends the same audit chain. Waits up to `wait` for a previous holder.
pub(super) async fn lock_instance(
    client: &Client,
    instance_id: &str,
    wait: Duration,
) -> Result<(), Fault> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let taken: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&INSTANCE_LOCK_CLASS, &instance_id],
            )
            .await?
            .try_get(0)?;
        if taken {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Fault::Internal(format!(
                "instance id {instance_id} is in use by another running gateway; every \
                 instance needs its own id"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The owner of the write connection; a task that runs until every sender is gone.
pub(super) struct Writer {
    pub(super) config: super::Endpoint,
    pub(super) client: Client,
    pub(super) instance_id: String,
    pub(super) queue: mpsc::Receiver<Job>,
    pub(super) max_batch: usize,
    pub(super) health: Arc<Health>,
    pub(super) tree: AuditTree,
    pub(super) statements: Statements,
    /// Set after a batch failed: the connection may be gone and a `COMMIT` cut off mid-way may
    /// have happened, so reconnect if needed and reload the tree before the next batch.
    pub(super) stale: bool,
}

impl Writer {
    pub(super) async fn run(mut self) {
        // `recv` returns None only once every sender is dropped and the queue is empty, so
        // everything queued before shutdown is still committed and answered.
        while let Some(first) = self.queue.recv().await {
            let mut batch = Vec::with_capacity(self.max_batch.min(64));
            batch.push(first);
            while batch.len() < self.max_batch {
                match self.queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.commit_batch(batch).await;
        }
        self.seal_audit().await;
        // Give the instance id back at once rather than when the server notices the
        // connection is gone.
        if let Err(error) = self
            .client
            .execute(
                "SELECT pg_advisory_unlock($1, hashtext($2))",
                &[&INSTANCE_LOCK_CLASS, &self.instance_id],
            )
            .await
        {
            tracing::debug!(error = %error, "instance lock not released explicitly");
        }
        tracing::debug!("postgres store writer finished");
    }

    /// At a clean shutdown, sign a checkpoint over every audit event this instance wrote since
    /// its last one, so an offline verification finds its whole chain attested. Skipped once
    /// poisoned or after a failed batch (the tree in memory may be behind the database).
    async fn seal_audit(&mut self) {
        if self.health.check().is_err() || self.stale || self.tree.signing.is_none() {
            return;
        }
        let result = async {
            let tx = self.client.transaction().await?;
            let at = tx
                .query_one("SELECT clock_timestamp()", &[])
                .await?
                .try_get(0)?;
            let checkpoint = self
                .tree
                .sign_checkpoint(
                    &tx,
                    &self.instance_id,
                    &self.tree.frontier,
                    &BatchClock { at },
                    true,
                )
                .await?;
            tx.commit().await?;
            Ok::<_, Fault>(checkpoint)
        }
        .await;
        match result {
            Ok(Some(checkpoint)) => {
                tracing::debug!(
                    size = checkpoint.size,
                    "audit checkpoint signed at shutdown"
                );
                self.tree.last_checkpoint = Some(checkpoint);
            }
            Ok(None) => {}
            Err(fault) => tracing::warn!(error = %fault, "audit checkpoint at shutdown failed"),
        }
    }

    /// Reconnect (taking the instance id again) and reload the audit tree.
    async fn refresh(&mut self) -> Result<(), Fault> {
        if self.client.is_closed() {
            let client =
                connect_client(&self.config, &format!("writer {}", self.instance_id)).await?;
            lock_instance(&client, &self.instance_id, Duration::from_secs(5)).await?;
            self.client = client;
        }
        self.statements.clear();
        let signing = self.tree.signing.clone();
        self.tree = AuditTree::load(&self.client, &self.instance_id, signing).await?;
        self.stale = false;
        Ok(())
    }

    async fn commit_batch(&mut self, batch: Vec<Job>) {
        let (works, replies): (Vec<Work>, Vec<_>) =
            batch.into_iter().map(|job| (job.work, job.reply)).unzip();
        let submissions = works
            .iter()
            .filter(|work| matches!(work, Work::Submit(_)))
            .count();
        self.health
            .submissions
            .fetch_add(submissions as u64, Ordering::Relaxed);

        let result = match self.health.check() {
            Err(error) => Err(error),
            Ok(()) => {
                let refreshed = if self.stale {
                    self.refresh().await
                } else {
                    Ok(())
                };
                match refreshed {
                    Err(fault) => Err(fault.into_batch_error(&self.health)),
                    Ok(()) => {
                        let instance: Arc<str> = Arc::from(self.instance_id.as_str());
                        let started = std::time::Instant::now();
                        let applied = apply_batch(
                            &mut self.client,
                            &self.statements,
                            &works,
                            &mut self.tree,
                            instance,
                        )
                        .await;
                        self.health.commit_nanos.fetch_add(
                            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
                            Ordering::Relaxed,
                        );
                        match applied {
                            Ok(answers) => {
                                self.health.commits.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(requests = works.len(), "store batch committed");
                                Ok(answers)
                            }
                            Err(fault) => {
                                self.stale = true;
                                let error = fault.into_batch_error(&self.health);
                                tracing::warn!(
                                    requests = works.len(),
                                    error = %error,
                                    "store batch not committed; nothing acknowledged"
                                );
                                Err(error)
                            }
                        }
                    }
                }
            }
        };
        match result {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(answer);
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(duplicate(&error)));
                }
            }
        }
    }
}

/// A copy of an error for each request of a failed batch.
fn duplicate(error: &StoreError) -> StoreError {
    match error {
        StoreError::Conflict => StoreError::Conflict,
        StoreError::PreconditionFailed => StoreError::PreconditionFailed,
        StoreError::Unavailable(reason) => StoreError::Unavailable(reason.clone()),
        StoreError::Failed(reason) => StoreError::Failed(reason.clone()),
    }
}

/// One transaction for the whole batch, one savepoint per request (as in SQLite). `Err` means
/// nothing of the batch is acknowledged; `Ok` holds each request's answer after `COMMIT`.
async fn apply_batch(
    client: &mut Client,
    statements: &Statements,
    works: &[Work],
    tree: &mut AuditTree,
    instance_id: Arc<str>,
) -> Result<Vec<Result<Answer, StoreError>>, Fault> {
    let appends = works.iter().any(Work::appends);
    let tx = client.transaction().await?;
    let mut appender = Appender {
        instance_id: Arc::clone(&instance_id),
        log_seq: 0,
        audit_seq: 0,
        frontier: tree.frontier.clone(),
        locked: appends,
    };
    let request = Tx {
        tx: &tx,
        statements,
    };
    let clock = if appends {
        // Held until COMMIT: sequence order is commit order across instances. The read is sent
        // with the lock request (one round trip); the server runs it once the lock is held.
        let mut rows = request
            .pipeline(&[
                Step::new(
                    "SELECT pg_advisory_xact_lock($1, $2)",
                    vec![Box::new(LOCK_CLASS), Box::new(LOG_LOCK)],
                ),
                Step::new(
                    "SELECT clock_timestamp(), \
                       (SELECT COALESCE(MAX(seq), 0) FROM log), \
                       (SELECT COALESCE(MAX(seq), 0) FROM audit_events)",
                    Vec::new(),
                ),
            ])
            .await?;
        let row = rows
            .pop()
            .and_then(|rows| rows.into_iter().next())
            .ok_or_else(|| Fault::Internal("the sequence query returned no row".to_owned()))?;
        appender.log_seq = row.try_get(1)?;
        appender.audit_seq = row.try_get(2)?;
        BatchClock {
            at: row.try_get(0)?,
        }
    } else {
        let row = tx.query_one("SELECT clock_timestamp()", &[]).await?;
        BatchClock {
            at: row.try_get(0)?,
        }
    };

    let mut answers = Vec::with_capacity(works.len());
    // The results of a submission's first pipeline, sent behind the previous submission's last
    // one (see `apply_submission`).
    let mut prefetched = None;
    for (index, work) in works.iter().enumerate() {
        let next = match works.get(index + 1) {
            Some(Work::Submit(next)) => Some(next),
            _ => None,
        };
        let mut attempt = appender.clone();
        // A submission opens and releases its savepoint inside its own pipelines; other work
        // does it here.
        let applied = match work {
            Work::Submit(submission) => {
                match apply_submission(
                    &request,
                    submission,
                    prefetched.take(),
                    next,
                    &clock,
                    &mut attempt,
                )
                .await
                {
                    Ok((receipt, next_results)) => {
                        prefetched = next_results;
                        Ok(Answer::Receipt(receipt))
                    }
                    Err(fault) => Err(fault),
                }
            }
            other => {
                request
                    .pipeline(&[Step::new(SAVEPOINT, Vec::new())])
                    .await?;
                match apply_work(&request, other, &clock, &mut attempt).await {
                    Ok(answer) => request
                        .pipeline(&[Step::new(RELEASE, Vec::new())])
                        .await
                        .map(|_| answer),
                    Err(fault) => Err(fault),
                }
            }
        };
        match applied {
            Ok(answer) => {
                appender = attempt;
                answers.push(Ok(answer));
            }
            Err(fault) => {
                if fault.severity() != Severity::Local {
                    return Err(fault);
                }
                if matches!(fault, Fault::Postgres(_)) {
                    statements.clear();
                }
                // The savepoint is open: every path that fails after opening it has not
                // released it (the release is the last step of the last pipeline, and nothing
                // fallible runs after that pipeline succeeded).
                tx.batch_execute("ROLLBACK TO SAVEPOINT request; RELEASE SAVEPOINT request")
                    .await?;
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
    let frontier = appender.frontier;
    let checkpoint = if frontier.size() != tree.frontier.size() {
        // Prepared once (a plain `execute` with SQL text parses it again: two round trips).
        request
            .pipeline(&[Step::new(
                "INSERT INTO audit_trees (instance_id, size, frontier) VALUES ($1, $2, $3) \
                 ON CONFLICT (instance_id) DO UPDATE SET size = excluded.size, \
                 frontier = excluded.frontier",
                vec![
                    Box::new(&*instance_id),
                    Box::new(i64::try_from(frontier.size()).unwrap_or(i64::MAX)),
                    Box::new(frontier.to_bytes()),
                ],
            )])
            .await?;
        tree.sign_checkpoint(&tx, &instance_id, &frontier, &clock, false)
            .await?
    } else {
        None
    };
    tx.commit().await?;
    tree.frontier = frontier;
    if let Some(checkpoint) = checkpoint {
        tree.last_checkpoint = Some(checkpoint);
    }
    Ok(answers)
}

async fn apply_work(
    tx: &Tx<'_, '_>,
    work: &Work,
    clock: &BatchClock,
    appender: &mut Appender,
) -> Result<Answer, Fault> {
    match work {
        Work::Submit(submission) => apply_submission(tx, submission, None, None, clock, appender)
            .await
            .map(|(receipt, _)| Answer::Receipt(receipt)),
        Work::SaveCursor { reader, seq } => {
            save_cursor(tx, reader, *seq).await?;
            Ok(Answer::CursorSaved)
        }
        Work::Review { review, audit } => apply_review(tx, review, audit, clock, appender)
            .await
            .map(Answer::Reviewed),
        Work::Delivery(work) => delivery::apply(tx, work, clock, appender)
            .await
            .map(Answer::Delivery),
    }
}

/// Cursors only move forward: several instances run the same readers (the delivery fan-out),
/// and one that saves an older position after another saved a newer one must not move the
/// shared cursor back (that would only repeat work, but repeat all of it).
pub(super) async fn save_cursor(tx: &Tx<'_, '_>, reader: &str, seq: Seq) -> Result<(), Fault> {
    tx.execute(
        "INSERT INTO cursors (reader, seq) VALUES ($1, $2) \
         ON CONFLICT (reader) DO UPDATE SET seq = GREATEST(cursors.seq, excluded.seq)",
        &[&reader, &seq],
    )
    .await?;
    Ok(())
}

const SELECT_RECEIPT: &str = "SELECT receipt FROM idempotency_keys WHERE partner = $1 AND key = $2";

const SELECT_CURRENT: &str = "SELECT c.version_id, c.seq, c.content_hash, l.committed_at \
     FROM current_versions c JOIN log l ON l.seq = c.seq \
     WHERE c.partner = $1 AND c.resource_type = $2 AND c.id = $3";

const SELECT_IDENTIFIER: &str = "SELECT id FROM identifiers \
     WHERE partner = $1 AND resource_type = $2 AND token = $3";

/// A submission in a few round trips: its savepoint, its idempotency key and its first record's
/// current state in one pipeline; each further record's reads sent behind the previous
/// record's writes (the server runs them in order, so the reads see those writes); the last
/// record's writes, the audit events, the receipt and the savepoint's release in the last one,
/// followed by the `next` submission's first pipeline (its savepoint and reads run after this
/// release, so they see everything before). All reads happen under the log lock, as before.
///
/// `prefetched`: the results of this submission's first pipeline, if the previous submission
/// sent it. The second value returned: the `next` submission's, sent only if every step of
/// this one's last pipeline succeeded (if one failed, the steps behind it failed too; the
/// caller rolls this one back and the next sends its own).
async fn apply_submission(
    tx: &Tx<'_, '_>,
    submission: &Submission,
    prefetched: Option<Vec<StepResult>>,
    next: Option<&Submission>,
    clock: &BatchClock,
    appender: &mut Appender,
) -> Result<(Receipt, Option<Vec<StepResult>>), Fault> {
    let partner = submission.partner.as_str();
    let (first, receipt_reads) = first_steps(submission);
    let results = match prefetched {
        Some(results) => results,
        None => tx.pipeline_results(&first).await?,
    };
    if results.len() != first.len() {
        return Err(Fault::Internal(
            "a prefetched pipeline does not fit its submission".to_owned(),
        ));
    }
    let mut rows = first_failure(results)?;
    // The savepoint's (empty) answer, then the receipt read, then the first record's reads.
    let mut first_record = Some(rows.split_off(1 + receipt_reads));
    let mut pending = Vec::new();
    if let Some(row) = rows
        .into_iter()
        .nth(1)
        .and_then(|rows| rows.into_iter().next())
    {
        let json: String = row.try_get(0)?;
        let mut receipt: Receipt = serde_json::from_str(&json)
            .map_err(|_| Fault::Corrupt("a stored idempotency receipt is not valid".to_owned()))?;
        receipt.replayed = true;
        // The retry is itself an access: audited even though nothing else is written.
        audit_steps(&submission.audit, appender, &mut pending)?;
        let next_results = finish(tx, pending, next).await?;
        return Ok((receipt, next_results));
    }
    let mut entries = Vec::with_capacity(submission.records.len());
    for record in &submission.records {
        let rows = match first_record.take() {
            Some(rows) => rows,
            None => flush(tx, &mut pending, record_reads(partner, record)).await?,
        };
        entries.push(apply_record(tx, &mut pending, partner, record, rows, clock, appender).await?);
    }
    audit_steps(&submission.audit, appender, &mut pending)?;
    let receipt = Receipt {
        entries,
        replayed: false,
    };
    if let Some(key) = &submission.idempotency_key {
        let json = serde_json::to_string(&receipt)
            .map_err(|error| Fault::Encode(format!("receipt: {error}")))?;
        pending.push(Step::new(
            "INSERT INTO idempotency_keys (partner, key, receipt, created_at) \
             VALUES ($1, $2, $3, $4)",
            vec![
                Box::new(partner),
                Box::new(key.as_str()),
                Box::new(json),
                Box::new(clock.at),
            ],
        ));
    }
    let next_results = finish(tx, pending, next).await?;
    Ok((receipt, next_results))
}

/// A submission's first pipeline: its savepoint, its idempotency key read (if it has a key;
/// the count of those reads is returned) and its first record's reads.
fn first_steps(submission: &Submission) -> (Vec<Step<'_>>, usize) {
    let partner = submission.partner.as_str();
    let mut steps = vec![Step::new(SAVEPOINT, Vec::new())];
    let mut receipt_reads = 0;
    if let Some(key) = &submission.idempotency_key {
        steps.push(Step::new(
            SELECT_RECEIPT,
            vec![Box::new(partner), Box::new(key.as_str())],
        ));
        receipt_reads = 1;
    }
    if let Some(record) = submission.records.first() {
        steps.extend(record_reads(partner, record));
    }
    (steps, receipt_reads)
}

/// A submission's last pipeline: its queued writes and its savepoint's release, then the
/// `next` submission's first pipeline, whose results are returned if all of this one's steps
/// succeeded. Nothing fallible may follow this in the submission: its savepoint is released.
async fn finish<'a>(
    tx: &Tx<'_, '_>,
    mut pending: Vec<Step<'a>>,
    next: Option<&'a Submission>,
) -> Result<Option<Vec<StepResult>>, Fault> {
    pending.push(Step::new(RELEASE, Vec::new()));
    let own = pending.len();
    if let Some(next) = next {
        pending.extend(first_steps(next).0);
    }
    let mut results = tx.pipeline_results(&pending).await?;
    let next_results = results.split_off(own.min(results.len()));
    first_failure(results)?;
    Ok(next.map(|_| next_results))
}

/// Send the queued writes `pending` and then `reads` in one pipeline; the rows of `reads`.
async fn flush<'a>(
    tx: &Tx<'_, '_>,
    pending: &mut Vec<Step<'a>>,
    reads: Vec<Step<'a>>,
) -> Result<Vec<Vec<Row>>, Fault> {
    let writes = pending.len();
    pending.extend(reads);
    let steps = std::mem::take(pending);
    let mut rows = tx.pipeline(&steps).await?;
    Ok(rows.split_off(writes))
}

/// What [`apply_record`] reads: the record's current version and, for a conditional create,
/// the resource its identifier names.
fn record_reads<'a>(partner: &'a str, record: &'a RecordWrite) -> Vec<Step<'a>> {
    let resource_type = record.resource_type.as_str();
    let mut reads = vec![Step::new(
        SELECT_CURRENT,
        vec![
            Box::new(partner),
            Box::new(resource_type),
            Box::new(record.id.as_str()),
        ],
    )];
    if let WriteMode::CreateIfNoneExist { identifier } = &record.mode {
        reads.push(Step::new(
            SELECT_IDENTIFIER,
            vec![
                Box::new(partner),
                Box::new(resource_type),
                Box::new(identifier.as_str()),
            ],
        ));
    }
    reads
}

/// The current version of a resource, as the writer needs it.
struct Current {
    version_id: i64,
    seq: Seq,
    content_hash: [u8; 32],
    committed_at: OffsetDateTime,
}

impl Current {
    fn from_rows(rows: Option<Vec<Row>>) -> Result<Option<Self>, Fault> {
        rows.and_then(|rows| rows.into_iter().next())
            .map(|row| {
                let hash: Vec<u8> = row.try_get(2)?;
                Ok(Self {
                    version_id: row.try_get(0)?,
                    seq: row.try_get(1)?,
                    content_hash: super::hash32(&hash, "content hash")?,
                    committed_at: row.try_get(3)?,
                })
            })
            .transpose()
    }

    fn receipt(self, resource_type: &str, id: &str, outcome: EntryOutcome) -> EntryReceipt {
        EntryReceipt {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            version_id: self.version_id,
            seq: self.seq,
            outcome,
            last_updated: self.committed_at,
        }
    }
}

/// Apply one record's write mode (ids scoped to `partner`), given the rows of its
/// [`record_reads`]; queue its writes on `pending` if it changes anything.
async fn apply_record<'a>(
    tx: &Tx<'_, '_>,
    pending: &mut Vec<Step<'a>>,
    partner: &'a str,
    record: &'a RecordWrite,
    rows: Vec<Vec<Row>>,
    clock: &BatchClock,
    appender: &mut Appender,
) -> Result<EntryReceipt, Fault> {
    let resource_type = record.resource_type.as_str();
    let mut rows = rows.into_iter();
    let current = Current::from_rows(rows.next())?;
    match (&record.mode, current) {
        (WriteMode::Create, Some(_)) => Err(Fault::Refused(StoreError::Conflict)),
        (WriteMode::Create, None) => append(
            pending,
            partner,
            record,
            1,
            EntryOutcome::Created,
            clock,
            appender,
        ),
        (WriteMode::CreateIfNoneExist { .. }, current) => {
            let matched = rows.next().and_then(|rows| rows.into_iter().next());
            if let Some(row) = matched {
                let id: String = row.try_get(0)?;
                let existing_rows = flush(
                    tx,
                    pending,
                    vec![Step::new(
                        SELECT_CURRENT,
                        vec![
                            Box::new(partner),
                            Box::new(resource_type),
                            Box::new(id.clone()),
                        ],
                    )],
                )
                .await?;
                let existing =
                    Current::from_rows(existing_rows.into_iter().next())?.ok_or_else(|| {
                        Fault::Corrupt("an identifier names a resource with no version".to_owned())
                    })?;
                return Ok(existing.receipt(resource_type, &id, EntryOutcome::Existing));
            }
            if current.is_some() {
                return Err(Fault::Refused(StoreError::Conflict));
            }
            append(
                pending,
                partner,
                record,
                1,
                EntryOutcome::Created,
                clock,
                appender,
            )
        }
        (WriteMode::Update { if_match: Some(_) }, None) => {
            Err(Fault::Refused(StoreError::PreconditionFailed))
        }
        (WriteMode::Update { if_match: None }, None) => append(
            pending,
            partner,
            record,
            1,
            EntryOutcome::Created,
            clock,
            appender,
        ),
        (WriteMode::Update { if_match }, Some(current)) => {
            // The precondition is judged before the content (FHIR: If-Match mismatch is 412).
            if if_match.is_some_and(|version| version != current.version_id) {
                return Err(Fault::Refused(StoreError::PreconditionFailed));
            }
            if current.content_hash == record.content_hash {
                return Ok(current.receipt(resource_type, &record.id, EntryOutcome::Unchanged));
            }
            let next = current.version_id + 1;
            append(
                pending,
                partner,
                record,
                next,
                EntryOutcome::Updated,
                clock,
                appender,
            )
        }
    }
}

/// Queue a version's append to the log, making it current, with its identifier tokens.
fn append<'a>(
    pending: &mut Vec<Step<'a>>,
    partner: &'a str,
    record: &'a RecordWrite,
    version_id: i64,
    outcome: EntryOutcome,
    clock: &BatchClock,
    appender: &mut Appender,
) -> Result<EntryReceipt, Fault> {
    let (resource_type, id) = (record.resource_type.as_str(), record.id.as_str());
    let seq = appender.next_log_seq()?;
    let content_hash: &[u8] = &record.content_hash;
    pending.push(Step::new(
        "INSERT INTO log (seq, partner, resource_type, id, version_id, content, content_hash, \
         nhs_number, decision, committed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        vec![
            Box::new(seq),
            Box::new(partner),
            Box::new(resource_type),
            Box::new(id),
            Box::new(version_id),
            Box::new(&record.content),
            Box::new(content_hash),
            Box::new(&record.nhs_number),
            Box::new(&record.decision),
            Box::new(clock.at),
        ],
    ));
    pending.push(Step::new(
        "INSERT INTO current_versions (partner, resource_type, id, version_id, seq, content_hash) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (partner, resource_type, id) DO UPDATE SET version_id = excluded.version_id, \
         seq = excluded.seq, content_hash = excluded.content_hash",
        vec![
            Box::new(partner),
            Box::new(resource_type),
            Box::new(id),
            Box::new(version_id),
            Box::new(seq),
            Box::new(content_hash),
        ],
    ));
    pending.push(Step::new(
        "DELETE FROM identifiers WHERE partner = $1 AND resource_type = $2 AND id = $3",
        vec![Box::new(partner), Box::new(resource_type), Box::new(id)],
    ));
    if !record.identifiers.is_empty() {
        // One statement for every token (duplicates ignored, as one insert each did).
        pending.push(Step::new(
            "INSERT INTO identifiers (partner, resource_type, token, id) \
             SELECT $1, $2, token, $4 FROM UNNEST($3::text[]) AS t(token) \
             ON CONFLICT DO NOTHING",
            vec![
                Box::new(partner),
                Box::new(resource_type),
                Box::new(&record.identifiers),
                Box::new(id),
            ],
        ));
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

const INSERT_AUDIT: &str = "INSERT INTO audit_events (seq, instance_id, leaf_seq, recorded, \
     request_id, partner_id, action, outcome, resource_type, resource_id, patient, event, \
     leaf_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

/// Insert `events` with the next global sequence numbers and this instance's next leaf indexes,
/// each with its RFC 9162 leaf hash, appending the leaves to the appender's frontier.
pub(super) async fn insert_audit(
    tx: &Tx<'_, '_>,
    events: &[AuditEvent],
    appender: &mut Appender,
) -> Result<(), Fault> {
    let mut steps = Vec::with_capacity(events.len());
    audit_steps(events, appender, &mut steps)?;
    if !steps.is_empty() {
        tx.pipeline(&steps).await?;
    }
    Ok(())
}

/// Queue the inserts of [`insert_audit`] on `pending`, advancing the appender.
fn audit_steps<'a>(
    events: &'a [AuditEvent],
    appender: &mut Appender,
    pending: &mut Vec<Step<'a>>,
) -> Result<(), Fault> {
    if events.is_empty() {
        return Ok(());
    }
    if !appender.locked {
        return Err(Fault::Internal(
            "an audit append outside the log lock".to_owned(),
        ));
    }
    for event in events {
        let canonical = canonical_event_bytes(event)
            .map_err(|error| Fault::Encode(format!("audit event: {error}")))?;
        let json = String::from_utf8(canonical)
            .map_err(|_| Fault::Encode("audit event is not UTF-8".to_owned()))?;
        // Leaf indexes are the instance tree's positions + 1, so they must be contiguous.
        let leaf_seq = appender.frontier.size() + 1;
        let leaf = event_leaf_hash(leaf_seq, json.as_bytes());
        let seq = appender.audit_seq + 1;
        let entity = event.entity.as_ref();
        let leaf_bytes: Vec<u8> = leaf.as_bytes().to_vec();
        pending.push(Step::new(
            INSERT_AUDIT,
            vec![
                Box::new(seq),
                Box::new(appender.instance_id.to_string()),
                Box::new(
                    i64::try_from(leaf_seq)
                        .map_err(|_| Fault::Corrupt("audit sequence overflow".to_owned()))?,
                ),
                Box::new(&event.recorded),
                Box::new(&event.request_id),
                Box::new(&event.actor.partner_id),
                Box::new(serde_name(&event.action)?),
                Box::new(serde_name(&event.outcome)?),
                Box::new(entity.map(|entity| entity.resource_type.as_str())),
                Box::new(entity.map(|entity| entity.id.as_str())),
                Box::new(&event.patient),
                Box::new(json),
                Box::new(leaf_bytes),
            ],
        ));
        appender.audit_seq = seq;
        appender.frontier.append(leaf);
    }
    Ok(())
}

/// The serde name of a unit enum variant (`bundle-submit`), as in the event JSON.
pub(super) fn serde_name<T: Serialize>(value: &T) -> Result<String, Fault> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => Ok(name),
        _ => Err(Fault::Encode(
            "an audit enum is not a plain name".to_owned(),
        )),
    }
}
