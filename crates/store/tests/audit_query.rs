//! IG officers' queries over the audit log (DOMAIN.md `IGQ`), on SQLite and PostgreSQL: filters,
//! keyset paging, break-glass selection, and review marks that are themselves audited (`LR-2`).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

mod support;

use std::num::NonZeroU64;
use std::sync::Arc;

use caregate_audit::checkpoint::{CheckpointSchedule, CheckpointSigner};
use caregate_audit::{Action, Actor, AuditEvent, Entity, Outcome};
use caregate_store::sqlite::AuditSigning;
use caregate_store::{AuditQuery, AuditReview, Store, StoreError, Submission};
use support::{Backend, Sqlite, TestOptions};
use time::OffsetDateTime;
use time::macros::datetime;

const PATIENT_A: &str = "9434765919";
const PATIENT_B: &str = "4000000004";

fn event(
    partner: &str,
    action: Action,
    outcome: Outcome,
    patient: Option<&str>,
    day: u8,
    purpose: Option<&str>,
) -> AuditEvent {
    let mut event = AuditEvent::new(
        format!("req-{partner}-{day}"),
        Actor {
            partner_id: Some(partner.into()),
            ods_code: Some("A81001".into()),
            ..Actor::default()
        },
        action,
        outcome,
    );
    event.recorded = datetime!(2026-01-01 10:00 UTC) + time::Duration::days(day.into());
    event.patient = patient.map(str::to_owned);
    event.purpose_of_use = purpose.map(str::to_owned);
    event.entity = Some(Entity {
        resource_type: "Observation".into(),
        id: format!("o{day}"),
        version_id: Some(1),
        content_hash: None,
    });
    event
}

/// 10 events: seq 1..=10.
fn fixture() -> Vec<AuditEvent> {
    use Action::*;
    use Outcome::*;
    vec![
        event("gp-a", Create, Success, Some(PATIENT_A), 1, Some("TREAT")),
        event("trust-b", Read, Success, Some(PATIENT_A), 2, Some("TREAT")),
        event("trust-b", Read, Success, Some(PATIENT_A), 3, Some("ETREAT")),
        event("pharm-c", Read, Rejected, Some(PATIENT_A), 4, None),
        event("gp-a", Create, Success, Some(PATIENT_B), 5, None),
        event("trust-b", Read, Success, Some(PATIENT_B), 6, Some("BTG")),
        event("gp-a", TokenRequest, Success, None, 7, None),
        event("trust-b", Read, Success, Some(PATIENT_A), 8, Some("TREAT")),
        event("trust-b", Read, Failed, Some(PATIENT_A), 9, None),
        event("gp-a", Update, Success, Some(PATIENT_A), 10, None),
    ]
}

fn signer() -> Arc<CheckpointSigner> {
    Arc::new(CheckpointSigner::generate("caregate.test/audit").unwrap())
}

backend_tests!(
    igq_filters_combine_with_and,
    igq_keyset_paging_visits_every_event_once,
    lr_2_break_glass_queue_and_audited_reviews,
);

async fn open<B: Backend>(backend: &B, signer: &Arc<CheckpointSigner>) -> B::Store {
    backend
        .open_with(TestOptions {
            audit_signing: Some(AuditSigning {
                signer: signer.clone(),
                schedule: CheckpointSchedule {
                    every_events: NonZeroU64::new(3).unwrap(),
                    every: time::Duration::seconds(3600),
                },
            }),
            ..TestOptions::default()
        })
        .await
}

async fn store_with_fixture<B: Backend>(backend: &B, signer: &Arc<CheckpointSigner>) -> B::Store {
    let store = open(backend, signer).await;
    for event in fixture() {
        store
            .submit(Submission {
                partner: event.actor.partner_id.clone().unwrap(),
                idempotency_key: None,
                records: vec![],
                audit: vec![event],
            })
            .await
            .unwrap();
    }
    store
}

async fn seqs(store: &impl Store, query: AuditQuery) -> Vec<i64> {
    let page = store.query_audit(&query).await.unwrap();
    page.events.iter().map(|e| e.seq).collect()
}

async fn igq_filters_combine_with_and<B: Backend>(backend: B) {
    let store = store_with_fixture(&backend, &signer()).await;
    let patient = |p: &str| AuditQuery {
        patient: Some(p.into()),
        ..AuditQuery::default()
    };
    assert_eq!(
        seqs(&store, patient(PATIENT_A)).await,
        [1, 2, 3, 4, 8, 9, 10]
    );
    assert_eq!(seqs(&store, patient(PATIENT_B)).await, [5, 6]);
    assert_eq!(
        seqs(
            &store,
            AuditQuery {
                partner: Some("trust-b".into()),
                action: Some(Action::Read),
                outcome: Some(Outcome::Success),
                ..patient(PATIENT_A)
            }
        )
        .await,
        [2, 3, 8]
    );
    // `from` is inclusive, `to` exclusive.
    assert_eq!(
        seqs(
            &store,
            AuditQuery {
                from: Some(datetime!(2026-01-03 10:00 UTC)),
                to: Some(datetime!(2026-01-09 10:00 UTC)),
                ..patient(PATIENT_A)
            }
        )
        .await,
        [2, 3, 4]
    );
    assert_eq!(
        seqs(
            &store,
            AuditQuery {
                outcome: Some(Outcome::Failed),
                ..AuditQuery::default()
            }
        )
        .await,
        [9]
    );
    assert!(seqs(&store, patient("9999999999")).await.is_empty());
    B::close(store).await;
}

async fn igq_keyset_paging_visits_every_event_once<B: Backend>(backend: B) {
    let store = store_with_fixture(&backend, &signer()).await;
    let mut query = AuditQuery {
        patient: Some(PATIENT_A.into()),
        limit: 3,
        ..AuditQuery::default()
    };
    let mut pages = Vec::new();
    loop {
        let page = store.query_audit(&query).await.unwrap();
        pages.push(page.events.iter().map(|e| e.seq).collect::<Vec<_>>());
        match page.next {
            Some(next) => query.after_seq = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, [vec![1, 2, 3], vec![4, 8, 9], vec![10]]);

    // An exact multiple of the page size ends without an empty extra page.
    let page = store
        .query_audit(&AuditQuery {
            patient: Some(PATIENT_B.into()),
            limit: 2,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.events.len(), 2);
    assert_eq!(page.next, None);
    B::close(store).await;
}

async fn lr_2_break_glass_queue_and_audited_reviews<B: Backend>(backend: B) {
    let signer = signer();
    let store = store_with_fixture(&backend, &signer).await;
    let queue = AuditQuery {
        break_glass_only: true,
        unreviewed_only: true,
        ..AuditQuery::default()
    };
    assert_eq!(seqs(&store, queue.clone()).await, [3, 6]);

    let mut review_event = AuditEvent::new(
        "req-review",
        Actor {
            client_id: Some("ig-officer/alice".into()),
            ..Actor::default()
        },
        Action::Review,
        Outcome::Success,
    );
    review_event.patient = Some(PATIENT_A.into());
    let review = AuditReview {
        seq: 3,
        reviewer: "alice".into(),
        reviewed_at: OffsetDateTime::UNIX_EPOCH,
        note: "A&E attendance confirmed".into(),
    };
    let stored = store
        .review_audit(review.clone(), review_event.clone())
        .await
        .unwrap();
    assert_eq!(stored.reviewer, "alice");
    assert!(stored.reviewed_at > OffsetDateTime::UNIX_EPOCH);

    assert_eq!(seqs(&store, queue.clone()).await, [6]);
    let all_break_glass = store
        .query_audit(&AuditQuery {
            break_glass_only: true,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        all_break_glass
            .events
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        [3, 6]
    );
    assert_eq!(all_break_glass.reviews, std::slice::from_ref(&stored));
    let (detail, detail_review) = store.audit_event(3).await.unwrap().unwrap();
    assert_eq!(detail.event.purpose_of_use.as_deref(), Some("ETREAT"));
    assert_eq!(detail_review, Some(stored));

    // The review is an audit event itself, in the same chain.
    let reviews = seqs(
        &store,
        AuditQuery {
            action: Some(Action::Review),
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(reviews, [11]);

    // Reviewing twice, or a missing event, is refused and writes nothing.
    let twice = store
        .review_audit(review.clone(), review_event.clone())
        .await;
    assert!(matches!(twice, Err(StoreError::Conflict)), "{twice:?}");
    let missing = store
        .review_audit(AuditReview { seq: 999, ..review }, review_event)
        .await;
    assert!(
        matches!(missing, Err(StoreError::PreconditionFailed)),
        "{missing:?}"
    );
    assert_eq!(store.read_audit(0, 100).await.unwrap().len(), 11);
    assert!(store.audit_event(999).await.unwrap().is_none());
    B::close(store).await;

    let verifier = caregate_audit::CheckpointVerifier::from_public_key_base64(
        signer.log_id(),
        &signer.public_key_base64(),
    )
    .unwrap();
    let verification = backend.verify(&verifier).await;
    assert!(verification.is_ok(), "{verification:?}");
}

#[tokio::test]
async fn page_size_is_capped() {
    assert_eq!(AuditQuery::default().page_size(), AuditQuery::DEFAULT_LIMIT);
    let huge = AuditQuery {
        limit: 1_000_000,
        ..AuditQuery::default()
    };
    assert_eq!(huge.page_size(), AuditQuery::MAX_LIMIT);
}

#[tokio::test]
async fn igq_patient_query_uses_the_patient_index() {
    let backend = Sqlite::new().unwrap();
    let store = store_with_fixture(&backend, &signer()).await;
    store.close().await.unwrap();
    let conn = rusqlite::Connection::open(backend.dir.path().join("caregate.db")).unwrap();
    let plan: Vec<String> = conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT seq, event FROM audit_events WHERE patient = ?1 \
             AND recorded >= ?2 AND recorded < ?3 ORDER BY seq LIMIT ?4",
        )
        .unwrap()
        .query_map(rusqlite::params![PATIENT_A, "a", "b", 10], |row| {
            row.get::<_, String>(3)
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        plan.iter()
            .any(|step| step.contains("audit_events_by_patient")),
        "{plan:?}"
    );
    let plan: Vec<String> = conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT seq, event FROM audit_events WHERE \
             purpose_of_use IN ('ETREAT', 'BTG') ORDER BY seq LIMIT 10",
        )
        .unwrap()
        .query_map([], |row| row.get::<_, String>(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        plan.iter()
            .any(|step| step.contains("audit_events_break_glass")),
        "{plan:?}"
    );
}
