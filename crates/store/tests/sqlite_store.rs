//! Behaviour of the embedded SQLite store through the `Store` trait: write modes, per-partner
//! scoping, all-or-nothing submissions, idempotency, group commit, durability across reopen,
//! cursors and paging.

use std::collections::HashSet;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use caregate_audit::{Action, Actor, AuditEvent, Entity, Outcome};
use caregate_store::sqlite::{DATABASE_FILE, SqliteOptions, SqliteStore};
use caregate_store::{
    EntryOutcome, Receipt, RecordWrite, Store, StoreError, Submission, WriteMode,
};
use rusqlite::config::DbConfig;

const NHS_NUMBER: &str = "9434765919";

fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(dir, SqliteOptions::default()).expect("store opens")
}

/// A stand-in for SHA-256 (the store only compares hashes): deterministic, 32 bytes.
fn hash(content: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (lane, chunk) in out.chunks_mut(8).enumerate() {
        let mut hasher = DefaultHasher::new();
        (lane, content).hash(&mut hasher);
        chunk.copy_from_slice(&hasher.finish().to_le_bytes());
    }
    out
}

fn record(id: &str, mode: WriteMode, body: &str) -> RecordWrite {
    RecordWrite {
        resource_type: "Observation".into(),
        id: id.into(),
        mode,
        content: body.as_bytes().to_vec(),
        content_hash: hash(body.as_bytes()),
        nhs_number: Some(NHS_NUMBER.into()),
        identifiers: Vec::new(),
        decision: None,
    }
}

fn event(partner: &str, request_id: &str, record: &RecordWrite) -> AuditEvent {
    let actor = Actor {
        partner_id: Some(partner.into()),
        ..Actor::default()
    };
    let mut event = AuditEvent::new(request_id, actor, Action::Create, Outcome::Success);
    event.entity = Some(Entity {
        resource_type: record.resource_type.clone(),
        id: record.id.clone(),
        version_id: None,
        content_hash: None,
    });
    event.patient = record.nhs_number.clone();
    event
}

/// One submission from `partner` carrying `records`, with one audit event per record.
fn submission(partner: &str, request_id: &str, records: Vec<RecordWrite>) -> Submission {
    let audit = records
        .iter()
        .map(|record| event(partner, request_id, record))
        .collect();
    Submission {
        partner: partner.into(),
        idempotency_key: None,
        records,
        audit,
    }
}

fn single(partner: &str, id: &str, mode: WriteMode, body: &str) -> Submission {
    submission(partner, &format!("req-{id}"), vec![record(id, mode, body)])
}

fn update(if_match: Option<i64>) -> WriteMode {
    WriteMode::Update { if_match }
}

async fn log_len(store: &SqliteStore) -> usize {
    store.read_log(0, 10_000).await.expect("log reads").len()
}

/// A plain connection to the store's file, as any SQLite tool would open. It skips the
/// checkpoint on close, like the store's own connections (see `skip_checkpoint_on_close`).
fn raw_connection(dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join(DATABASE_FILE)).expect("database opens");
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .expect("connection configures");
    conn
}

/// Hold SQLite's write lock from another connection, as an IG officer's shell could. The store's
/// writer blocks in `BEGIN IMMEDIATE` (within its busy timeout) until the lock is released, so
/// requests queued meanwhile are bound to share the next batch.
fn hold_write_lock(dir: &Path) -> rusqlite::Connection {
    let conn = raw_connection(dir);
    conn.execute_batch("BEGIN IMMEDIATE")
        .expect("write lock taken");
    conn
}

/// Poll every future once (each queues its request with the writer), run `then`, then drive them
/// all to completion. Runs unconstrained by tokio's cooperative budget so the first pass really
/// reaches every future.
async fn queue_all_then<F: Future>(futures: Vec<F>, then: impl FnOnce()) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let mut then = Some(then);
    tokio::task::unconstrained(std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if let Some(then) = then.take() {
            then();
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }))
    .await;
    outputs.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn create_then_update_then_unchanged_update() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());

    let created = store
        .submit(single("gp-a", "obs-1", WriteMode::Create, r#"{"v":1}"#))
        .await
        .unwrap();
    let first = &created.entries[0];
    assert_eq!(
        (first.outcome, first.version_id, first.seq),
        (EntryOutcome::Created, 1, 1)
    );
    assert!(!created.replayed);

    let unchanged = store
        .submit(single("gp-a", "obs-1", update(None), r#"{"v":1}"#))
        .await
        .unwrap();
    let same = &unchanged.entries[0];
    assert_eq!(
        (same.outcome, same.version_id, same.seq),
        (EntryOutcome::Unchanged, 1, 1)
    );
    assert_eq!(
        same.last_updated, first.last_updated,
        "the current version's time"
    );
    assert_eq!(
        log_len(&store).await,
        1,
        "an unchanged update appends nothing"
    );

    let updated = store
        .submit(single("gp-a", "obs-1", update(None), r#"{"v":2}"#))
        .await
        .unwrap();
    let second = &updated.entries[0];
    assert_eq!(
        (second.outcome, second.version_id, second.seq),
        (EntryOutcome::Updated, 2, 2)
    );

    let current = store
        .read_current("gp-a", "Observation", "obs-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((current.version_id, current.seq), (2, 2));
    assert_eq!(current.content, br#"{"v":2}"#);
    assert_eq!(current.committed_at, second.last_updated);
    assert_eq!(
        store
            .read_current("gp-a", "Observation", "nope")
            .await
            .unwrap(),
        None
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn create_of_an_existing_id_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .submit(single("gp-a", "obs-1", WriteMode::Create, "a"))
        .await
        .unwrap();
    let again = store
        .submit(single("gp-a", "obs-1", WriteMode::Create, "b"))
        .await;
    assert!(matches!(again, Err(StoreError::Conflict)), "{again:?}");
    assert_eq!(log_len(&store).await, 1);
    assert_eq!(store.read_audit(0, 100).await.unwrap().len(), 1);
    store.close().await.unwrap();
}

#[tokio::test]
async fn update_of_a_missing_resource_creates_version_1_unless_if_match_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let guarded = store
        .submit(single("gp-a", "obs-1", update(Some(1)), "a"))
        .await;
    assert!(
        matches!(guarded, Err(StoreError::PreconditionFailed)),
        "{guarded:?}"
    );

    let created = store
        .submit(single("gp-a", "obs-1", update(None), "a"))
        .await
        .unwrap();
    assert_eq!(created.entries[0].outcome, EntryOutcome::Created);
    assert_eq!(created.entries[0].version_id, 1);
    store.close().await.unwrap();
}

#[tokio::test]
async fn if_match_must_name_the_current_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .submit(single("gp-a", "obs-1", WriteMode::Create, "a"))
        .await
        .unwrap();
    store
        .submit(single("gp-a", "obs-1", update(None), "b"))
        .await
        .unwrap();

    let stale = store
        .submit(single("gp-a", "obs-1", update(Some(1)), "c"))
        .await;
    assert!(
        matches!(stale, Err(StoreError::PreconditionFailed)),
        "{stale:?}"
    );
    // The precondition is judged before the content: a stale If-Match with unchanged content
    // still fails.
    let stale_same = store
        .submit(single("gp-a", "obs-1", update(Some(1)), "b"))
        .await;
    assert!(
        matches!(stale_same, Err(StoreError::PreconditionFailed)),
        "{stale_same:?}"
    );

    let fresh = store
        .submit(single("gp-a", "obs-1", update(Some(2)), "c"))
        .await
        .unwrap();
    assert_eq!(fresh.entries[0].outcome, EntryOutcome::Updated);
    assert_eq!(fresh.entries[0].version_id, 3);
    store.close().await.unwrap();
}

#[tokio::test]
async fn conditional_create_returns_the_resource_that_holds_the_identifier() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let token = "https://fhir.nhs.uk/Id/lab-result|LR-42".to_owned();
    let conditional = || WriteMode::CreateIfNoneExist {
        identifier: token.clone(),
    };

    let mut first = record("obs-1", conditional(), "a");
    first.identifiers = vec![token.clone()];
    let created = store
        .submit(submission("gp-a", "req-1", vec![first]))
        .await
        .unwrap();
    assert_eq!(created.entries[0].outcome, EntryOutcome::Created);

    let mut retry = record("obs-2", conditional(), "a");
    retry.identifiers = vec![token.clone()];
    let existing = store
        .submit(submission("gp-a", "req-2", vec![retry]))
        .await
        .unwrap();
    let entry = &existing.entries[0];
    assert_eq!(entry.outcome, EntryOutcome::Existing);
    assert_eq!(
        (entry.id.as_str(), entry.version_id, entry.seq),
        ("obs-1", 1, 1)
    );
    assert_eq!(entry.last_updated, created.entries[0].last_updated);
    assert_eq!(
        log_len(&store).await,
        1,
        "a matched conditional create writes nothing"
    );

    // Identifiers are per partner, like ids.
    let mut other_partner = record("obs-1", conditional(), "a");
    other_partner.identifiers = vec![token.clone()];
    let theirs = store
        .submit(submission("trust-b", "req-3", vec![other_partner]))
        .await
        .unwrap();
    assert_eq!(theirs.entries[0].outcome, EntryOutcome::Created);

    // A conditional create whose identifier is new but whose id is taken is still a create.
    let clash = store
        .submit(single(
            "gp-a",
            "obs-1",
            WriteMode::CreateIfNoneExist {
                identifier: "urn:other|1".into(),
            },
            "z",
        ))
        .await;
    assert!(matches!(clash, Err(StoreError::Conflict)), "{clash:?}");
    store.close().await.unwrap();
}

#[tokio::test]
async fn ids_are_scoped_per_partner() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = store
        .submit(single("gp-a", "1", WriteMode::Create, "from a"))
        .await
        .unwrap();
    let b = store
        .submit(single("trust-b", "1", WriteMode::Create, "from b"))
        .await
        .unwrap();
    assert_eq!(a.entries[0].outcome, EntryOutcome::Created);
    assert_eq!(b.entries[0].outcome, EntryOutcome::Created);
    assert_eq!(b.entries[0].version_id, 1);

    let a_current = store
        .read_current("gp-a", "Observation", "1")
        .await
        .unwrap()
        .unwrap();
    let b_current = store
        .read_current("trust-b", "Observation", "1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a_current.content, b"from a");
    assert_eq!(b_current.content, b"from b");
    assert_eq!(
        (a_current.partner.as_str(), b_current.partner.as_str()),
        ("gp-a", "trust-b")
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn transaction_with_one_conflicting_record_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .submit(single("gp-a", "taken", WriteMode::Create, "x"))
        .await
        .unwrap();

    let transaction = submission(
        "gp-a",
        "req-tx",
        vec![
            record("new-1", WriteMode::Create, "1"),
            record("taken", WriteMode::Create, "2"),
            record("new-2", WriteMode::Create, "3"),
        ],
    );
    let refused = store.submit(transaction).await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");

    assert_eq!(log_len(&store).await, 1);
    assert_eq!(
        store
            .read_current("gp-a", "Observation", "new-1")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.read_audit(0, 100).await.unwrap().len(),
        1,
        "nor its audit events"
    );
    // The same ids are still free.
    let retried = submission(
        "gp-a",
        "req-tx2",
        vec![record("new-1", WriteMode::Create, "1")],
    );
    assert!(store.submit(retried).await.is_ok());
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_refused_submission_does_not_affect_the_rest_of_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .submit(single("gp-a", "taken", WriteMode::Create, "x"))
        .await
        .unwrap();
    let before = store.stats();

    let lock = hold_write_lock(dir.path());
    let results = queue_all_then(
        vec![
            store.submit(single("gp-a", "ok-1", WriteMode::Create, "1")),
            store.submit(single("gp-a", "taken", WriteMode::Create, "2")),
            store.submit(single("gp-a", "ok-2", WriteMode::Create, "3")),
        ],
        move || lock.execute_batch("ROLLBACK").unwrap(),
    )
    .await;

    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(results[1], Err(StoreError::Conflict)),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
    let after = store.stats();
    assert_eq!(after.submissions - before.submissions, 3);
    assert!(
        after.commits - before.commits <= 2,
        "{before:?} → {after:?}"
    );
    let ids: Vec<_> = store
        .read_log(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|entry| entry.id)
        .collect();
    assert_eq!(ids, ["taken", "ok-1", "ok-2"]);
    assert_eq!(store.read_audit(0, 100).await.unwrap().len(), 3);
    store.close().await.unwrap();
}

#[tokio::test]
async fn idempotent_retry_replays_the_receipt_writes_no_record_but_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut first = single("gp-a", "obs-1", WriteMode::Create, "a");
    first.idempotency_key = Some("key-1".into());
    let retry = Submission {
        audit: vec![event("gp-a", "req-retry", &first.records[0])],
        ..first.clone()
    };

    let receipt = store.submit(first).await.unwrap();
    let replayed = store.submit(retry).await.unwrap();
    assert!(replayed.replayed);
    assert_eq!(
        replayed,
        Receipt {
            replayed: true,
            ..receipt.clone()
        }
    );
    assert_eq!(log_len(&store).await, 1);
    let audit = store.read_audit(0, 100).await.unwrap();
    let requests: Vec<_> = audit
        .iter()
        .map(|stored| stored.event.request_id.as_str())
        .collect();
    assert_eq!(
        requests,
        ["req-obs-1", "req-retry"],
        "AUD-3: the retry is audited too"
    );

    // The key is the partner's own: another partner's identical key is a different submission.
    let mut other = single("trust-b", "obs-1", WriteMode::Create, "a");
    other.idempotency_key = Some("key-1".into());
    assert!(!store.submit(other).await.unwrap().replayed);
    store.close().await.unwrap();
}

#[tokio::test]
async fn identical_idempotent_submissions_in_one_batch_write_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut original = single("gp-a", "obs-1", WriteMode::Create, "a");
    original.idempotency_key = Some("key-1".into());

    let lock = hold_write_lock(dir.path());
    let results = queue_all_then(
        (0..10).map(|_| store.submit(original.clone())).collect(),
        move || lock.execute_batch("ROLLBACK").unwrap(),
    )
    .await;

    let receipts: Vec<Receipt> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        receipts.iter().filter(|receipt| !receipt.replayed).count(),
        1
    );
    assert!(
        receipts
            .iter()
            .all(|receipt| receipt.entries == receipts[0].entries)
    );
    assert_eq!(log_len(&store).await, 1);
    assert_eq!(store.read_audit(0, 100).await.unwrap().len(), 10);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_submitters_get_distinct_seqs_and_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..200 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let id = format!("obs-{n}");
            store
                .submit(single("gp-a", &id, WriteMode::Create, &id))
                .await
        });
    }
    let mut seqs = HashSet::new();
    while let Some(joined) = tasks.join_next().await {
        let receipt = joined.unwrap().unwrap();
        assert!(seqs.insert(receipt.entries[0].seq), "seq given twice");
    }
    assert_eq!(seqs.len(), 200);
    assert_eq!(seqs.iter().copied().max(), Some(200));

    let stats = store.stats();
    eprintln!("200 concurrent submitters: {stats:?}");
    assert_eq!(stats.submissions, 200);
    assert!(
        stats.commits < stats.submissions,
        "no batching happened: {stats:?}"
    );
    assert_eq!(log_len(&store).await, 200);
    assert_eq!(store.read_audit(0, 1_000).await.unwrap().len(), 200);
    Arc::into_inner(store).unwrap().close().await.unwrap();
}

#[tokio::test]
async fn requests_queued_during_one_commit_share_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let lock = hold_write_lock(dir.path());
    let submissions = (0..200)
        .map(|n| {
            let id = format!("obs-{n}");
            store.submit(single("gp-a", &id, WriteMode::Create, &id))
        })
        .collect();
    let results =
        queue_all_then(submissions, move || lock.execute_batch("ROLLBACK").unwrap()).await;
    assert!(results.iter().all(Result::is_ok));

    // The writer may have taken the first request alone before the rest arrived; everything else
    // was queued while it waited, so at most two commits (two fsyncs) carried all 200.
    let stats = store.stats();
    eprintln!("200 requests queued behind one commit: {stats:?}");
    assert_eq!(stats.submissions, 200);
    assert!(stats.commits <= 2, "{stats:?}");
    store.close().await.unwrap();
}

#[tokio::test]
async fn max_batch_bounds_each_commit() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        max_batch: 8,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(dir.path(), options).unwrap();
    let lock = hold_write_lock(dir.path());
    let submissions = (0..40)
        .map(|n| {
            let id = format!("obs-{n}");
            store.submit(single("gp-a", &id, WriteMode::Create, &id))
        })
        .collect();
    let results =
        queue_all_then(submissions, move || lock.execute_batch("ROLLBACK").unwrap()).await;
    assert!(results.iter().all(Result::is_ok));
    let stats = store.stats();
    assert!(
        stats.commits >= 5,
        "40 requests in batches of at most 8: {stats:?}"
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn invariant_1_acknowledged_submissions_survive_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut with_decision = record(
        "obs-1",
        WriteMode::Create,
        r#"{"resourceType":"Observation"}"#,
    );
    with_decision.decision = Some(br#"{"allow":["trust-b"]}"#.to_vec());
    let first = store
        .submit(submission("gp-a", "req-1", vec![with_decision.clone()]))
        .await
        .unwrap();
    let second = store
        .submit(single("trust-b", "enc-1", WriteMode::Create, "{}"))
        .await
        .unwrap();
    let audit_only = Submission {
        partner: "gp-a".into(),
        idempotency_key: None,
        records: Vec::new(),
        audit: vec![AuditEvent::new(
            "req-denied",
            Actor::default(),
            Action::Read,
            Outcome::Rejected,
        )],
    };
    assert!(store.submit(audit_only).await.unwrap().entries.is_empty());
    let log_before = store.read_log(0, 100).await.unwrap();
    let audit_before = store.read_audit(0, 100).await.unwrap();
    store.close().await.unwrap();

    let store = open(dir.path());
    let log = store.read_log(0, 100).await.unwrap();
    assert_eq!(log, log_before);
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].seq, first.entries[0].seq);
    assert_eq!(log[0].committed_at, first.entries[0].last_updated);
    assert_eq!(log[0].content_hash, with_decision.content_hash);
    assert_eq!(log[0].decision, with_decision.decision);
    assert_eq!(log[0].nhs_number.as_deref(), Some(NHS_NUMBER));
    assert_eq!(log[1].seq, second.entries[0].seq);

    let audit = store.read_audit(0, 100).await.unwrap();
    assert_eq!(audit, audit_before);
    let requests: Vec<_> = audit
        .iter()
        .map(|stored| stored.event.request_id.as_str())
        .collect();
    assert_eq!(requests, ["req-1", "req-enc-1", "req-denied"]);
    assert_eq!(audit[0].event.patient.as_deref(), Some(NHS_NUMBER));

    // State carried over too, and log positions are never reused.
    let again = store
        .submit(single("gp-a", "obs-1", WriteMode::Create, "x"))
        .await;
    assert!(matches!(again, Err(StoreError::Conflict)), "{again:?}");
    let next = store
        .submit(single("gp-a", "obs-2", WriteMode::Create, "y"))
        .await
        .unwrap();
    assert_eq!(next.entries[0].seq, 3);
    store.close().await.unwrap();
}

#[tokio::test]
async fn close_commits_requests_already_queued_even_if_their_caller_left() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let lock = hold_write_lock(dir.path());
    let mut pending = Box::pin(store.submit(single("gp-a", "obs-1", WriteMode::Create, "a")));
    let queued =
        std::future::poll_fn(|cx| Poll::Ready(pending.as_mut().poll(cx).is_pending())).await;
    assert!(
        queued,
        "the writer is held behind the lock, so the request waits in the queue"
    );
    // The caller gives up (client disconnected, request timed out) while the request is queued.
    drop(pending);
    lock.execute_batch("ROLLBACK").unwrap();
    store.close().await.unwrap();

    let store = open(dir.path());
    assert_eq!(log_len(&store).await, 1);
    assert_eq!(store.read_audit(0, 10).await.unwrap().len(), 1);
    store.close().await.unwrap();
}

#[tokio::test]
async fn cursors_are_durable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.load_cursor("deliver/trust-b").await.unwrap(), 0);
    store.save_cursor("deliver/trust-b", 7).await.unwrap();
    store
        .save_cursor("feed/population-health", 3)
        .await
        .unwrap();
    store.save_cursor("deliver/trust-b", 9).await.unwrap();
    assert_eq!(store.load_cursor("deliver/trust-b").await.unwrap(), 9);
    store.close().await.unwrap();

    let store = open(dir.path());
    assert_eq!(store.load_cursor("deliver/trust-b").await.unwrap(), 9);
    assert_eq!(
        store.load_cursor("feed/population-health").await.unwrap(),
        3
    );
    assert_eq!(
        store.stats().submissions,
        0,
        "cursor saves are not submissions"
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn read_log_and_read_audit_page_by_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for n in 0..25 {
        let id = format!("obs-{n}");
        store
            .submit(single("gp-a", &id, WriteMode::Create, &id))
            .await
            .unwrap();
    }
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let page = store.read_log(after, 10).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        pages.push(page.iter().map(|entry| entry.seq).collect::<Vec<_>>());
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
    assert_eq!(pages.concat(), (1..=25).collect::<Vec<i64>>());
    assert_eq!(store.read_log(0, 0).await.unwrap(), Vec::new());

    let audit = store.read_audit(20, 10).await.unwrap();
    let seqs: Vec<_> = audit.iter().map(|stored| stored.seq).collect();
    assert_eq!(seqs, [21, 22, 23, 24, 25]);
    store.close().await.unwrap();
}

#[tokio::test]
async fn ig_officers_can_query_the_audit_table_with_plain_sql() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .submit(single("gp-a", "obs-1", WriteMode::Create, "a"))
        .await
        .unwrap();
    store.close().await.unwrap();
    let wal = dir.path().join(format!("{DATABASE_FILE}-wal"));
    let wal_len = std::fs::metadata(wal).map_or(0, |wal| wal.len());
    assert_eq!(
        wal_len, 0,
        "after a clean close the database file alone holds everything"
    );

    let conn = raw_connection(dir.path());
    let (partner, action, outcome, resource): (String, String, String, String) = conn
        .query_row(
            "SELECT partner_id, action, outcome, resource_type || '/' || resource_id \
             FROM audit_events WHERE patient = ?1",
            [NHS_NUMBER],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        (
            partner.as_str(),
            action.as_str(),
            outcome.as_str(),
            resource.as_str()
        ),
        ("gp-a", "create", "success", "Observation/obs-1")
    );
}
