//! Delivery rows through the `Store` trait (issue 4), on SQLite and PostgreSQL: enqueueing with the
//! fan-out cursor, due heads per order key, leases, retries, dead letters and replay, the inbox
//! and its acknowledgement, and the per-destination status.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

mod support;

use std::time::Duration;

use caregate_audit::{Action, Actor, AuditEvent, Outcome};
use caregate_store::delivery::{
    DeliveryChannel, DeliveryResult, NewDelivery, PendingDelivery, ReplaySelector,
};
use caregate_store::{Store, WriteMode};
use support::{Backend, NHS_NUMBER, single};

backend_tests!(
    fan_out_rows_are_created_once_with_the_cursor,
    a_row_is_due_only_after_the_earlier_rows_of_its_order_key,
    dead_letters_are_listed_replayed_and_counted,
    inbox_rows_are_paged_and_acknowledged_with_one_audit_event_each,
);

fn deliver_event(id: i64) -> AuditEvent {
    AuditEvent::new(
        format!("deliver-{id}"),
        Actor {
            partner_id: Some("trust-b".into()),
            ..Actor::default()
        },
        Action::Deliver,
        Outcome::Success,
    )
}

fn row(seq: i64, partner: &str, channel: DeliveryChannel, key: &str) -> NewDelivery {
    NewDelivery {
        seq,
        partner: partner.into(),
        channel,
        order_key: key.into(),
    }
}

/// Four records (seq 1..=4) routed: trust-b gets 1 and 2 (one patient) and 3 (another) pushed;
/// pharm-c gets 4 in its inbox.
async fn routed<B: Backend>(backend: &B) -> B::Store {
    let store = backend.open().await;
    for n in 1..=4 {
        let id = format!("obs-{n}");
        store
            .submit(single("gp-a", &id, WriteMode::Create, &id))
            .await
            .unwrap();
    }
    let rows = vec![
        row(1, "trust-b", DeliveryChannel::Push, "k1"),
        row(2, "trust-b", DeliveryChannel::Push, "k1"),
        row(3, "trust-b", DeliveryChannel::Push, "k2"),
        row(4, "pharm-c", DeliveryChannel::Inbox, "k3"),
    ];
    assert_eq!(
        store
            .enqueue_deliveries("deliver-fanout", 4, rows)
            .await
            .unwrap(),
        4
    );
    store
}

fn seqs(rows: &[PendingDelivery]) -> Vec<i64> {
    rows.iter().map(|row| row.entry.seq).collect()
}

async fn fan_out_rows_are_created_once_with_the_cursor<B: Backend>(backend: B) {
    let store = routed(&backend).await;
    assert_eq!(store.load_cursor("deliver-fanout").await.unwrap(), 4);
    // A fan-out reader restarted before its cursor moved routes the same rows again: no copies.
    let again = vec![row(3, "trust-b", DeliveryChannel::Push, "k2")];
    assert_eq!(
        store
            .enqueue_deliveries("deliver-fanout", 4, again)
            .await
            .unwrap(),
        0
    );
    let status = store.delivery_status(None).await.unwrap();
    let partners: Vec<_> = status
        .iter()
        .map(|s| (s.partner.as_str(), s.pending))
        .collect();
    assert_eq!(partners, [("pharm-c", 1), ("trust-b", 3)]);
    assert!(status[1].oldest_pending_committed_at.is_some());
    B::close(store).await;
}

async fn a_row_is_due_only_after_the_earlier_rows_of_its_order_key<B: Backend>(backend: B) {
    let store = routed(&backend).await;
    let lease = Duration::from_secs(60);
    let first = store.claim_deliveries("trust-b", 10, lease).await.unwrap();
    assert_eq!(
        seqs(&first),
        [1, 3],
        "seq 2 waits behind seq 1 (same patient)"
    );
    assert_eq!(first[0].attempts, 0);
    assert_eq!(first[0].channel, DeliveryChannel::Push);
    assert_eq!(first[0].entry.nhs_number.as_deref(), Some(NHS_NUMBER));
    assert!(
        store
            .claim_deliveries("trust-b", 10, lease)
            .await
            .unwrap()
            .is_empty(),
        "leased rows are not claimed again"
    );

    // A retry due now releases the lease; the row is claimed again with its attempt counted.
    let retry = DeliveryResult::Retry {
        status: Some(503),
        error: "service unavailable".into(),
        next_attempt_at: time::OffsetDateTime::now_utc() - time::Duration::seconds(1),
    };
    assert!(
        store
            .finish_delivery(first[0].id, retry, Vec::new())
            .await
            .unwrap()
    );
    let again = store.claim_deliveries("trust-b", 10, lease).await.unwrap();
    assert_eq!(seqs(&again), [1]);
    assert_eq!(again[0].attempts, 1);

    let delivered = DeliveryResult::Delivered { status: Some(201) };
    assert!(
        store
            .finish_delivery(again[0].id, delivered.clone(), vec![deliver_event(1)])
            .await
            .unwrap()
    );
    assert!(
        !store
            .finish_delivery(again[0].id, delivered, vec![deliver_event(1)])
            .await
            .unwrap(),
        "a row no longer pending is not finished twice"
    );
    let next = store.claim_deliveries("trust-b", 10, lease).await.unwrap();
    assert_eq!(seqs(&next), [2], "the patient's next record is due now");
    let audit = store.read_audit(0, 100).await.unwrap();
    let delivers = audit
        .iter()
        .filter(|stored| stored.event.action == Action::Deliver)
        .count();
    assert_eq!(
        delivers, 1,
        "only the finish that changed the row is audited"
    );
    B::close(store).await;
}

async fn dead_letters_are_listed_replayed_and_counted<B: Backend>(backend: B) {
    let store = routed(&backend).await;
    let lease = Duration::from_secs(60);
    let claimed = store.claim_deliveries("trust-b", 10, lease).await.unwrap();
    let dead = DeliveryResult::Dead {
        status: Some(400),
        error: "rejected".into(),
        response: b"bad request".to_vec(),
    };
    assert!(
        store
            .finish_delivery(claimed[0].id, dead, vec![deliver_event(1)])
            .await
            .unwrap()
    );
    let withheld = DeliveryResult::Withheld {
        rule_id: "ndoo".into(),
        reason: "opted out".into(),
    };
    assert!(
        store
            .finish_delivery(claimed[1].id, withheld, Vec::new())
            .await
            .unwrap()
    );
    // The dead letter releases its patient's queue.
    let next = store.claim_deliveries("trust-b", 10, lease).await.unwrap();
    assert_eq!(seqs(&next), [2]);

    let letters = store.dead_letters(None, 0, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        (letter.seq, letter.attempts, letter.status),
        (1, 1, Some(400))
    );
    assert_eq!(
        (letter.error.as_str(), letter.response.as_str()),
        ("rejected", "bad request")
    );
    assert_eq!(letter.resource_type, "Observation");
    assert!(
        store
            .dead_letters(Some("pharm-c"), 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .dead_letters(None, letter.id, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let status = store.delivery_status(Some("trust-b")).await.unwrap();
    assert_eq!(status.len(), 1);
    let trust = &status[0];
    assert_eq!(
        (trust.pending, trust.delivered, trust.dead, trust.withheld),
        (1, 0, 1, 1)
    );
    let failure = trust.last_failure.as_ref().unwrap();
    assert_eq!(
        (failure.status, failure.error.as_str()),
        (Some(400), "rejected")
    );

    let replay = AuditEvent::new(
        "req-replay",
        Actor::default(),
        Action::DeliveryReplay,
        Outcome::Success,
    );
    assert_eq!(
        store
            .replay_dead_letters(ReplaySelector::One(letter.id), replay.clone())
            .await
            .unwrap(),
        1
    );
    assert!(store.dead_letters(None, 0, 10).await.unwrap().is_empty());
    assert_eq!(
        store
            .replay_dead_letters(ReplaySelector::Partner("trust-b".into()), replay)
            .await
            .unwrap(),
        0
    );
    let status = store.delivery_status(Some("trust-b")).await.unwrap();
    assert_eq!((status[0].pending, status[0].dead), (2, 0));
    let audit = store.read_audit(0, 100).await.unwrap();
    let replays = audit
        .iter()
        .filter(|stored| stored.event.action == Action::DeliveryReplay)
        .count();
    assert_eq!(
        replays, 2,
        "every replay request is audited, even one that found nothing"
    );
    B::close(store).await;
}

async fn inbox_rows_are_paged_and_acknowledged_with_one_audit_event_each<B: Backend>(backend: B) {
    let store = routed(&backend).await;
    assert!(
        store
            .claim_deliveries("pharm-c", 10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty(),
        "inbox rows are never pushed"
    );
    let page = store.inbox_page("pharm-c", 0, 10).await.unwrap();
    assert_eq!(seqs(&page.rows), [4]);
    assert!(!page.more);
    assert_eq!(page.rows[0].channel, DeliveryChannel::Inbox);
    assert_eq!(page.rows[0].entry.content, b"obs-4");
    assert!(
        store
            .inbox_page("pharm-c", 4, 10)
            .await
            .unwrap()
            .rows
            .is_empty()
    );
    assert!(store.inbox_page("pharm-c", 0, 0).await.unwrap().more);

    let template = AuditEvent::new(
        "req-ack",
        Actor {
            partner_id: Some("pharm-c".into()),
            ..Actor::default()
        },
        Action::Deliver,
        Outcome::Success,
    );
    assert_eq!(
        store
            .ack_inbox("pharm-c", 4, template.clone())
            .await
            .unwrap(),
        1
    );
    assert!(
        store
            .inbox_page("pharm-c", 0, 10)
            .await
            .unwrap()
            .rows
            .is_empty()
    );
    assert_eq!(store.ack_inbox("pharm-c", 4, template).await.unwrap(), 0);

    let audit = store.read_audit(0, 100).await.unwrap();
    let acks: Vec<_> = audit
        .iter()
        .filter(|stored| stored.event.request_id == "req-ack")
        .collect();
    assert_eq!(acks.len(), 1);
    let entity = acks[0].event.entity.as_ref().unwrap();
    assert_eq!(
        (
            entity.resource_type.as_str(),
            entity.id.as_str(),
            entity.version_id
        ),
        ("Observation", "obs-4", Some(1))
    );
    assert_eq!(acks[0].event.patient.as_deref(), Some(NHS_NUMBER));
    let status = store.delivery_status(Some("pharm-c")).await.unwrap();
    assert_eq!((status[0].pending, status[0].delivered), (0, 1));
    B::close(store).await;
}
