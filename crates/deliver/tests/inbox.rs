//! Inbox paging, acknowledgement, consent at serving time, and isolation between partners.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

mod common;

use std::sync::Arc;

use caregate_audit::{Action, Actor};
use caregate_deliver::inbox::Inbox;
use caregate_deliver::policy::RULE_CONSENT_WITHDRAWN;
use caregate_deliver::{DestinationConfig, InboxCursor, StoredDecisionPolicy, spawn};
use caregate_store::Store;
use common::*;

async fn inbox_with_records(
    store: &Arc<caregate_store::sqlite::SqliteStore>,
    policy: Arc<StoredDecisionPolicy>,
    records: &[(&str, &str, &[&str])],
) -> Inbox {
    for (n, (id, patient, to)) in records.iter().enumerate() {
        commit(store.as_ref(), id, patient, n as u32, to).await;
    }
    let handle = spawn(
        store.clone(),
        policy.clone(),
        vec![
            DestinationConfig::inbox("council-sc1"),
            DestinationConfig::inbox("trust-rx1"),
        ],
        fast_config(),
        std::future::pending(),
    )
    .unwrap();
    let total: usize = records.iter().map(|(_, _, to)| to.len()).sum();
    wait_for("fan-out", || async {
        let rows: u64 = store
            .delivery_status(None)
            .await
            .unwrap()
            .iter()
            .map(|s| s.pending)
            .sum();
        rows == total as u64
    })
    .await;
    handle.shutdown().await;
    Inbox::new(store.clone(), policy)
}

fn ids(page: &caregate_deliver::inbox::ServedPage) -> Vec<&str> {
    page.entries.iter().map(|e| e.id.as_str()).collect()
}

#[tokio::test]
async fn pages_in_order_unacknowledged_page_comes_back_acknowledged_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let records: Vec<(String, &str, &[&str])> = (0..5)
        .map(|n| (format!("obs-{n}"), "9434765919", &["council-sc1"][..]))
        .collect();
    let records: Vec<_> = records
        .iter()
        .map(|(id, p, to)| (id.as_str(), *p, *to))
        .collect();
    let inbox = inbox_with_records(&store, Arc::new(StoredDecisionPolicy::new()), &records).await;

    let first = inbox.page("council-sc1", None, 2).await.unwrap();
    assert_eq!(ids(&first), ["obs-0", "obs-1"]);
    let next = first.next.expect("a non-empty page has a cursor");
    let second = inbox.page("council-sc1", Some(next), 2).await.unwrap();
    assert_eq!(ids(&second), ["obs-2", "obs-3"]);

    // A partner that never acknowledges gets the same first page again.
    let again = inbox.page("council-sc1", None, 2).await.unwrap();
    assert_eq!(again, first);

    // Acknowledge the first page: it is not served again, and is audited per record.
    let acked = inbox
        .acknowledge("council-sc1", next, "req-ack-1", Actor::default())
        .await
        .unwrap();
    assert_eq!(acked, 2);
    let after_ack = inbox.page("council-sc1", None, 2).await.unwrap();
    assert_eq!(ids(&after_ack), ["obs-2", "obs-3"]);
    // Acknowledging again changes nothing.
    assert_eq!(
        inbox
            .acknowledge("council-sc1", next, "req-ack-2", Actor::default())
            .await
            .unwrap(),
        0
    );
    let last = inbox.page("council-sc1", second.next, 2).await.unwrap();
    assert_eq!(ids(&last), ["obs-4"]);
    let drained = inbox.page("council-sc1", last.next, 2).await.unwrap();
    assert!(drained.entries.is_empty());
    assert_eq!(drained.next, None, "an empty page ends the walk");
    inbox
        .acknowledge(
            "council-sc1",
            last.next.unwrap(),
            "req-ack-3",
            Actor::default(),
        )
        .await
        .unwrap();
    assert!(
        inbox
            .page("council-sc1", None, 10)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    let status = status_of(store.as_ref(), "council-sc1").await.unwrap();
    assert_eq!((status.pending, status.delivered), (0, 5));

    let audit = store.read_audit(0, 1000).await.unwrap();
    let delivered: Vec<_> = audit
        .iter()
        .filter(|e| e.event.action == Action::Deliver)
        .collect();
    assert_eq!(
        delivered.len(),
        5,
        "one audit event per acknowledged record"
    );
    assert!(delivered.iter().all(|e| {
        e.event.actor.partner_id.as_deref() == Some("council-sc1")
            && e.event.patient.as_deref() == Some("9434765919")
    }));
}

#[tokio::test]
async fn bola_one_partner_never_sees_or_acknowledges_another_partners_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let inbox = inbox_with_records(
        &store,
        Arc::new(StoredDecisionPolicy::new()),
        &[
            ("for-council", "9434765919", &["council-sc1"]),
            ("for-trust", "9434765870", &["trust-rx1"]),
            ("for-both", "9000000009", &["council-sc1", "trust-rx1"]),
        ],
    )
    .await;
    let council = inbox.page("council-sc1", None, 10).await.unwrap();
    assert_eq!(ids(&council), ["for-council", "for-both"]);
    let trust = inbox.page("trust-rx1", None, 10).await.unwrap();
    assert_eq!(ids(&trust), ["for-trust", "for-both"]);
    // The trust acknowledges with the council's cursor: only the trust's own rows move.
    inbox
        .acknowledge(
            "trust-rx1",
            council.next.unwrap(),
            "req-x",
            Actor::default(),
        )
        .await
        .unwrap();
    assert_eq!(inbox.page("council-sc1", None, 10).await.unwrap(), council);
    assert!(
        inbox
            .page("trust-rx1", None, 10)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    // A partner with no inbox rows sees nothing at all.
    assert!(
        inbox
            .page("gp-a81001", None, 10)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
}

#[tokio::test]
async fn invariant_2_inbox_withholds_a_record_whose_consent_was_withdrawn() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let policy = Arc::new(StoredDecisionPolicy::new());
    let inbox = inbox_with_records(
        &store,
        policy.clone(),
        &[
            ("obs-0", "9434765919", &["council-sc1"]),
            ("obs-1", "9434765870", &["council-sc1"]),
            ("obs-2", "9434765919", &["council-sc1"]),
        ],
    )
    .await;
    policy.withdraw("9434765919");
    let page = inbox.page("council-sc1", None, 1).await.unwrap();
    assert_eq!(
        ids(&page),
        ["obs-1"],
        "the page fills past withheld records"
    );
    assert_eq!(page.withheld, 1);
    let rest = inbox.page("council-sc1", page.next, 10).await.unwrap();
    assert!(rest.entries.is_empty());
    assert_eq!(rest.withheld, 1);
    let status = status_of(store.as_ref(), "council-sc1").await.unwrap();
    assert_eq!((status.pending, status.withheld), (1, 2));
    let audit = store.read_audit(0, 1000).await.unwrap();
    let withheld: Vec<_> = audit
        .iter()
        .filter(|e| e.event.action == Action::Withhold)
        .collect();
    assert_eq!(withheld.len(), 2);
    assert!(
        withheld
            .iter()
            .all(|e| e.event.rule_ids == [RULE_CONSENT_WITHDRAWN])
    );
}

#[tokio::test]
async fn a_forged_cursor_is_refused() {
    assert!(InboxCursor::decode("not-a-cursor").is_err());
}
