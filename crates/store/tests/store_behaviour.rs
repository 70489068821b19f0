//! Behaviour of every store through the `Store` trait, run against SQLite and PostgreSQL
//! (`backend_tests!`): write modes, per-partner scoping, all-or-nothing submissions, idempotency,
//! group commit, durability across reopen, cursors and paging.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

mod support;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use caregate_audit::{Action, Actor, AuditEvent, Outcome};
use caregate_store::{EntryOutcome, Receipt, Store, StoreError, Submission, WriteMode};
use support::{
    Backend, NHS_NUMBER, TestOptions, event, log_len, queue_all_then, record, single, submission,
    update,
};

backend_tests!(
    create_then_update_then_unchanged_update,
    create_of_an_existing_id_is_a_conflict,
    update_of_a_missing_resource_creates_version_1_unless_if_match_is_sent,
    if_match_must_name_the_current_version,
    conditional_create_returns_the_resource_that_holds_the_identifier,
    ids_are_scoped_per_partner,
    transaction_with_one_conflicting_record_writes_nothing,
    a_refused_submission_does_not_affect_the_rest_of_its_batch,
    idempotent_retry_replays_the_receipt_writes_no_record_but_is_audited,
    identical_idempotent_submissions_in_one_batch_write_once,
    two_hundred_concurrent_submitters_get_distinct_seqs_and_share_commits,
    requests_queued_during_one_commit_share_the_next,
    max_batch_bounds_each_commit,
    invariant_1_acknowledged_submissions_survive_close_and_reopen,
    close_commits_requests_already_queued_even_if_their_caller_left,
    cursors_are_durable_across_reopen,
    read_log_and_read_audit_page_by_seq,
);

async fn create_then_update_then_unchanged_update<B: Backend>(backend: B) {
    let store = backend.open().await;

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
    B::close(store).await;
}

async fn create_of_an_existing_id_is_a_conflict<B: Backend>(backend: B) {
    let store = backend.open().await;
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
    B::close(store).await;
}

async fn update_of_a_missing_resource_creates_version_1_unless_if_match_is_sent<B: Backend>(
    backend: B,
) {
    let store = backend.open().await;
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
    B::close(store).await;
}

async fn if_match_must_name_the_current_version<B: Backend>(backend: B) {
    let store = backend.open().await;
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
    B::close(store).await;
}

async fn conditional_create_returns_the_resource_that_holds_the_identifier<B: Backend>(backend: B) {
    let store = backend.open().await;
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
    B::close(store).await;
}

async fn ids_are_scoped_per_partner<B: Backend>(backend: B) {
    let store = backend.open().await;
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
    B::close(store).await;
}

async fn transaction_with_one_conflicting_record_writes_nothing<B: Backend>(backend: B) {
    let store = backend.open().await;
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
    B::close(store).await;
}

async fn a_refused_submission_does_not_affect_the_rest_of_its_batch<B: Backend>(backend: B) {
    let store = backend.open().await;
    store
        .submit(single("gp-a", "taken", WriteMode::Create, "x"))
        .await
        .unwrap();
    let before = B::stats(&store);

    let lock = backend.hold_commits().await;
    let results = queue_all_then(
        vec![
            store.submit(single("gp-a", "ok-1", WriteMode::Create, "1")),
            store.submit(single("gp-a", "taken", WriteMode::Create, "2")),
            store.submit(single("gp-a", "ok-2", WriteMode::Create, "3")),
        ],
        move || lock.release(),
    )
    .await;

    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(results[1], Err(StoreError::Conflict)),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
    let after = B::stats(&store);
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
    B::close(store).await;
}

async fn idempotent_retry_replays_the_receipt_writes_no_record_but_is_audited<B: Backend>(
    backend: B,
) {
    let store = backend.open().await;
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
    B::close(store).await;
}

async fn identical_idempotent_submissions_in_one_batch_write_once<B: Backend>(backend: B) {
    let store = backend.open().await;
    let mut original = single("gp-a", "obs-1", WriteMode::Create, "a");
    original.idempotency_key = Some("key-1".into());

    let lock = backend.hold_commits().await;
    let results = queue_all_then(
        (0..10).map(|_| store.submit(original.clone())).collect(),
        move || lock.release(),
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
    B::close(store).await;
}

async fn two_hundred_concurrent_submitters_get_distinct_seqs_and_share_commits<B: Backend>(
    backend: B,
) {
    let store = Arc::new(backend.open().await);
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

    let stats = B::stats(&store);
    eprintln!("200 concurrent submitters: {stats:?}");
    assert_eq!(stats.submissions, 200);
    assert!(
        stats.commits < stats.submissions,
        "no batching happened: {stats:?}"
    );
    assert_eq!(log_len(&*store).await, 200);
    assert_eq!(store.read_audit(0, 1_000).await.unwrap().len(), 200);
    B::close(Arc::into_inner(store).unwrap()).await;
}

async fn requests_queued_during_one_commit_share_the_next<B: Backend>(backend: B) {
    let store = backend.open().await;
    let lock = backend.hold_commits().await;
    let submissions = (0..200)
        .map(|n| {
            let id = format!("obs-{n}");
            store.submit(single("gp-a", &id, WriteMode::Create, &id))
        })
        .collect();
    let results = queue_all_then(submissions, move || lock.release()).await;
    assert!(results.iter().all(Result::is_ok));

    // The writer may have taken the first request alone before the rest arrived; everything else
    // was queued while it waited, so at most two commits (two fsyncs) carried all 200.
    let stats = B::stats(&store);
    eprintln!("200 requests queued behind one commit: {stats:?}");
    assert_eq!(stats.submissions, 200);
    assert!(stats.commits <= 2, "{stats:?}");
    B::close(store).await;
}

async fn max_batch_bounds_each_commit<B: Backend>(backend: B) {
    let store = backend
        .open_with(TestOptions {
            max_batch: Some(8),
            ..TestOptions::default()
        })
        .await;
    let lock = backend.hold_commits().await;
    let submissions = (0..40)
        .map(|n| {
            let id = format!("obs-{n}");
            store.submit(single("gp-a", &id, WriteMode::Create, &id))
        })
        .collect();
    let results = queue_all_then(submissions, move || lock.release()).await;
    assert!(results.iter().all(Result::is_ok));
    let stats = B::stats(&store);
    assert!(
        stats.commits >= 5,
        "40 requests in batches of at most 8: {stats:?}"
    );
    B::close(store).await;
}

async fn invariant_1_acknowledged_submissions_survive_close_and_reopen<B: Backend>(backend: B) {
    let store = backend.open().await;
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
    B::close(store).await;

    let store = backend.open().await;
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
    B::close(store).await;
}

async fn close_commits_requests_already_queued_even_if_their_caller_left<B: Backend>(backend: B) {
    let store = backend.open().await;
    let lock = backend.hold_commits().await;
    let mut pending = Box::pin(store.submit(single("gp-a", "obs-1", WriteMode::Create, "a")));
    let queued =
        std::future::poll_fn(|cx| Poll::Ready(pending.as_mut().poll(cx).is_pending())).await;
    assert!(
        queued,
        "the writer is held behind the lock, so the request waits in the queue"
    );
    // The caller gives up (client disconnected, request timed out) while the request is queued.
    drop(pending);
    lock.release();
    B::close(store).await;

    let store = backend.open().await;
    assert_eq!(log_len(&store).await, 1);
    assert_eq!(store.read_audit(0, 10).await.unwrap().len(), 1);
    B::close(store).await;
}

async fn cursors_are_durable_across_reopen<B: Backend>(backend: B) {
    let store = backend.open().await;
    assert_eq!(store.load_cursor("deliver/trust-b").await.unwrap(), 0);
    store.save_cursor("deliver/trust-b", 7).await.unwrap();
    store
        .save_cursor("feed/population-health", 3)
        .await
        .unwrap();
    store.save_cursor("deliver/trust-b", 9).await.unwrap();
    assert_eq!(store.load_cursor("deliver/trust-b").await.unwrap(), 9);
    B::close(store).await;

    let store = backend.open().await;
    assert_eq!(store.load_cursor("deliver/trust-b").await.unwrap(), 9);
    assert_eq!(
        store.load_cursor("feed/population-health").await.unwrap(),
        3
    );
    assert_eq!(
        B::stats(&store).submissions,
        0,
        "cursor saves are not submissions"
    );
    B::close(store).await;
}

async fn read_log_and_read_audit_page_by_seq<B: Backend>(backend: B) {
    let store = backend.open().await;
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
    B::close(store).await;
}
