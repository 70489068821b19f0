//! What only the PostgreSQL store promises (issue 8), against the hermetic server from
//! `caregate_testkit::postgres`: several instances on one database keep one total log order that
//! cursor readers follow without missing a late commit, delivery claims with `SKIP LOCKED` never
//! hand a row to two instances, migrations apply once when instances start together, an instance
//! id is held by one process at a time, and each instance's audit chain verifies and names an
//! edited or deleted event. Each test prints a skip message and passes when the PostgreSQL
//! binaries are not installed.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

mod support;

use std::collections::{BTreeSet, HashSet};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use caregate_audit::checkpoint::{CheckpointSchedule, CheckpointSigner};
use caregate_audit::{Action, Actor, AuditEvent, Outcome};
use caregate_store::delivery::{DeliveryChannel, DeliveryResult, NewDelivery};
use caregate_store::postgres::{
    PostgresOptions, PostgresStore, PostgresTls, migrate, verify_audit, verify_instance,
};
use caregate_store::sqlite::AuditSigning;
use caregate_store::{Store, StoreError, WriteMode};
use support::{Backend, Postgres, TestOptions, audit_only, single};

fn cluster() -> Option<Postgres> {
    Postgres::new()
}

fn signing(signer: &Arc<CheckpointSigner>) -> TestOptions {
    TestOptions {
        audit_signing: Some(AuditSigning {
            signer: Arc::clone(signer),
            schedule: CheckpointSchedule {
                every_events: NonZeroU64::new(5).unwrap(),
                every: time::Duration::seconds(3600),
            },
        }),
        ..TestOptions::default()
    }
}

fn read_event(n: usize) -> AuditEvent {
    let mut event = AuditEvent::new(
        format!("req-{n}"),
        Actor {
            partner_id: Some("gp".into()),
            ..Actor::default()
        },
        Action::Read,
        Outcome::Success,
    );
    event.patient = Some("9434765919".into());
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_readers_following_the_log_see_every_commit_exactly_once_in_order() {
    let Some(cluster) = cluster() else { return };
    const INSTANCES: usize = 3;
    const PER_INSTANCE: usize = 80;
    let total = INSTANCES * PER_INSTANCE;
    let mut stores = Vec::new();
    for n in 0..INSTANCES {
        stores.push(Arc::new(
            cluster
                .open_instance(&format!("gw-{n}"), TestOptions::default())
                .await,
        ));
    }

    // A reader follows the log by cursor while the instances write, like the delivery fan-out.
    let reader_store = Arc::new(
        cluster
            .open_instance("reader", TestOptions::default())
            .await,
    );
    let reader = {
        let store = Arc::clone(&reader_store);
        tokio::spawn(async move {
            let mut cursor = 0;
            let mut seen = Vec::with_capacity(total);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while seen.len() < total {
                assert!(tokio::time::Instant::now() < deadline, "reader timed out");
                let page = store.read_log(cursor, 17).await.unwrap();
                if page.is_empty() {
                    // Poll the condition (new rows), as a fan-out reader does.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                for entry in page {
                    // Sequence numbers are gapless, so a row seen out of turn would show as a
                    // jump here: the reader would have moved its cursor past a later commit.
                    assert_eq!(
                        entry.seq,
                        cursor + 1,
                        "the reader skipped or repeated a row"
                    );
                    cursor = entry.seq;
                    seen.push(entry.id);
                }
            }
            seen
        })
    };

    let mut writers = tokio::task::JoinSet::new();
    for (n, store) in stores.iter().enumerate() {
        for k in 0..PER_INSTANCE {
            let store = Arc::clone(store);
            writers.spawn(async move {
                let id = format!("obs-{n}-{k}");
                let receipt = store
                    .submit(single(&format!("gp-{n}"), &id, WriteMode::Create, &id))
                    .await
                    .unwrap();
                (id, receipt.entries[0].seq)
            });
        }
    }
    let mut acknowledged = HashSet::new();
    let mut seqs = BTreeSet::new();
    while let Some(joined) = writers.join_next().await {
        let (id, seq) = joined.unwrap();
        assert!(seqs.insert(seq), "seq {seq} given twice");
        acknowledged.insert(id);
    }
    assert_eq!(seqs.len(), total);
    assert_eq!(seqs.last().copied(), Some(i64::try_from(total).unwrap()));

    let seen = reader.await.unwrap();
    assert_eq!(seen.len(), total);
    assert_eq!(
        seen.iter().cloned().collect::<HashSet<_>>(),
        acknowledged,
        "every acknowledged record is seen exactly once"
    );
    let batched: u64 = stores.iter().map(|store| store.stats().commits).sum();
    eprintln!("{total} submissions over {INSTANCES} instances in {batched} commits");

    // The audit log has one total order too, with every instance's events.
    let audit = reader_store.read_audit(0, 10_000).await.unwrap();
    let audit_seqs: Vec<i64> = audit.iter().map(|stored| stored.seq).collect();
    assert_eq!(
        audit_seqs,
        (1..=i64::try_from(total).unwrap()).collect::<Vec<_>>()
    );
    for store in stores {
        Arc::into_inner(store).unwrap().close().await.unwrap();
    }
    Arc::into_inner(reader_store)
        .unwrap()
        .close()
        .await
        .unwrap();
    let verification = verify_audit(
        &cluster.url,
        &PostgresTls::by_host(),
        &CheckpointSigner::generate("caregate.test/audit")
            .unwrap()
            .verifier(),
    )
    .await
    .unwrap();
    assert!(verification.is_ok(), "{verification:?}");
    assert_eq!(verification.events(), u64::try_from(total).unwrap());
    assert_eq!(verification.instances.len(), INSTANCES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_locked_claims_never_hand_one_delivery_row_to_two_instances() {
    let Some(cluster) = cluster() else { return };
    let stores: Vec<Arc<PostgresStore>> = {
        let mut stores = Vec::new();
        for n in 0..3 {
            stores.push(Arc::new(
                cluster
                    .open_instance(&format!("gw-{n}"), TestOptions::default())
                    .await,
            ));
        }
        stores
    };
    const ROWS: i64 = 90;
    for n in 0..ROWS {
        let id = format!("obs-{n}");
        stores[0]
            .submit(single("gp-a", &id, WriteMode::Create, &id))
            .await
            .unwrap();
    }
    // 30 patients with 3 records each: only one row per patient is due at a time.
    let rows = (1..=ROWS)
        .map(|seq| NewDelivery {
            seq,
            partner: "trust-b".into(),
            channel: DeliveryChannel::Push,
            order_key: format!("patient-{}", seq % 30),
        })
        .collect();
    assert_eq!(
        stores[1]
            .enqueue_deliveries("deliver-fanout", ROWS, rows)
            .await
            .unwrap(),
        u64::try_from(ROWS).unwrap()
    );

    let mut workers = tokio::task::JoinSet::new();
    for store in &stores {
        let store = Arc::clone(store);
        workers.spawn(async move {
            let mut delivered = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                assert!(tokio::time::Instant::now() < deadline, "worker timed out");
                let claimed = store
                    .claim_deliveries("trust-b", 4, Duration::from_secs(300))
                    .await
                    .unwrap();
                if claimed.is_empty() {
                    let status = store.delivery_status(Some("trust-b")).await.unwrap();
                    if status.first().is_none_or(|status| status.pending == 0) {
                        break;
                    }
                    // Other instances hold the heads; poll again as a push worker does.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                for row in claimed {
                    let mut event = AuditEvent::new(
                        format!("deliver-{}", row.id),
                        Actor::default(),
                        Action::Deliver,
                        Outcome::Success,
                    );
                    event.patient = row.entry.nhs_number.clone();
                    let finished = store
                        .finish_delivery(
                            row.id,
                            DeliveryResult::Delivered { status: Some(201) },
                            vec![event],
                        )
                        .await
                        .unwrap();
                    assert!(finished, "a claimed row was finished by someone else");
                    delivered.push((row.id, row.entry.seq));
                }
            }
            delivered
        });
    }
    let mut all = Vec::new();
    while let Some(joined) = workers.join_next().await {
        all.extend(joined.unwrap());
    }
    let ids: HashSet<_> = all.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), all.len(), "a row was delivered twice");
    assert_eq!(all.len(), usize::try_from(ROWS).unwrap());
    let status = stores[0].delivery_status(Some("trust-b")).await.unwrap();
    assert_eq!((status[0].pending, status[0].delivered), (0, 90));
    for store in stores {
        Arc::into_inner(store).unwrap().close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_once_when_instances_start_together() {
    let Some(cluster) = cluster() else { return };
    let (a, b, c) = tokio::join!(
        cluster.open_instance("gw-a", TestOptions::default()),
        cluster.open_instance("gw-b", TestOptions::default()),
        cluster.open_instance("gw-c", TestOptions::default()),
    );
    for store in [a, b, c] {
        store.close().await.unwrap();
    }
    let again = cluster.open_instance("gw-a", TestOptions::default()).await;
    again.close().await.unwrap();
    // `caregate db migrate` on an up-to-date database changes nothing.
    assert_eq!(
        migrate(&cluster.url, &PostgresTls::by_host())
            .await
            .unwrap(),
        2
    );
    let client = cluster.client().await;
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_cursor_never_moves_back_when_instances_save_it_out_of_order() {
    let Some(cluster) = cluster() else { return };
    let a = cluster.open_instance("gw-a", TestOptions::default()).await;
    let b = cluster.open_instance("gw-b", TestOptions::default()).await;
    a.save_cursor("deliver-fanout", 40).await.unwrap();
    // Instance b routed less far when it saved (it read the log before a moved on).
    b.save_cursor("deliver-fanout", 25).await.unwrap();
    assert_eq!(a.load_cursor("deliver-fanout").await.unwrap(), 40);
    assert_eq!(b.load_cursor("deliver-fanout").await.unwrap(), 40);
    // The same holds for the cursor that moves with enqueued rows.
    b.enqueue_deliveries("deliver-fanout", 30, Vec::new())
        .await
        .unwrap();
    assert_eq!(a.load_cursor("deliver-fanout").await.unwrap(), 40);
    b.save_cursor("deliver-fanout", 41).await.unwrap();
    assert_eq!(a.load_cursor("deliver-fanout").await.unwrap(), 41);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_id_is_held_by_one_running_store_at_a_time() {
    let Some(cluster) = cluster() else { return };
    let first = cluster.open_instance("gw-a", TestOptions::default()).await;
    let second = PostgresStore::connect(
        &cluster.url,
        PostgresOptions {
            instance_lock_wait: Duration::from_millis(300),
            ..PostgresOptions::new("gw-a")
        },
    )
    .await;
    let error = second.unwrap_err();
    assert!(error.to_string().contains("in use"), "{error}");
    first.close().await.unwrap();
    // Closing gives the id back at once.
    let reopened = cluster.open_instance("gw-a", TestOptions::default()).await;
    reopened.close().await.unwrap();
}

/// Two instances write interleaved audit events (7 each, checkpoints every 5).
async fn two_instance_audit(cluster: &Postgres, signer: &Arc<CheckpointSigner>) {
    let a = cluster.open_instance("gw-a", signing(signer)).await;
    let b = cluster.open_instance("gw-b", signing(signer)).await;
    for n in 0..14 {
        let store = if n % 2 == 0 { &a } else { &b };
        store.submit(audit_only("gp", read_event(n))).await.unwrap();
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1_every_instance_chain_verifies_against_its_own_checkpoints() {
    let Some(cluster) = cluster() else { return };
    let signer = Arc::new(CheckpointSigner::generate("caregate.test/audit").unwrap());
    two_instance_audit(&cluster, &signer).await;
    let result = verify_audit(&cluster.url, &PostgresTls::by_host(), &signer.verifier())
        .await
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(result.events(), 14);
    let ids: Vec<_> = result
        .instances
        .iter()
        .map(|i| i.instance_id.as_str())
        .collect();
    assert_eq!(ids, ["gw-a", "gw-b"]);
    for instance in &result.instances {
        assert_eq!(instance.verification.report.tree_size, 7);
        assert!(
            instance.verification.report.checkpoints_matched >= 2,
            "{instance:?}"
        );
    }
    // A checkpoint from another key does not attest anything.
    let other = CheckpointSigner::generate("caregate.test/audit").unwrap();
    let result = verify_audit(&cluster.url, &PostgresTls::by_host(), &other.verifier())
        .await
        .unwrap();
    assert!(
        result
            .instances
            .iter()
            .all(|i| i.verification.report.checkpoints_matched == 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1_an_edited_event_is_named_by_its_global_seq() {
    let Some(cluster) = cluster() else { return };
    let signer = Arc::new(CheckpointSigner::generate("caregate.test/audit").unwrap());
    two_instance_audit(&cluster, &signer).await;
    // Global seq 8 is gw-b's 4th event (b wrote seqs 2, 4, 6, 8, ...).
    let client = cluster.client().await;
    client
        .execute(
            "UPDATE audit_events SET event = replace(event, '\"read\"', '\"create\"') \
             WHERE seq = 8",
            &[],
        )
        .await
        .unwrap();
    let result = verify_audit(&cluster.url, &PostgresTls::by_host(), &signer.verifier())
        .await
        .unwrap();
    assert!(!result.is_ok());
    let a = &result.instances[0];
    let b = &result.instances[1];
    assert!(a.is_ok(), "the other instance's chain is untouched: {a:?}");
    assert_eq!(
        b.verification.report.first_bad_seq,
        Some(4),
        "leaf index in gw-b's tree"
    );
    assert_eq!(b.first_bad_seq, Some(8), "global seq");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1_a_deleted_event_is_detected_and_stops_its_instance_from_opening() {
    let Some(cluster) = cluster() else { return };
    let signer = Arc::new(CheckpointSigner::generate("caregate.test/audit").unwrap());
    two_instance_audit(&cluster, &signer).await;
    let client = cluster.client().await;
    // gw-a's last event (its leaf 7) is global seq 13.
    client
        .execute("DELETE FROM audit_events WHERE seq = 13", &[])
        .await
        .unwrap();
    let result = verify_instance(
        &cluster.url,
        &PostgresTls::by_host(),
        "gw-a",
        &signer.verifier(),
        &[],
    )
    .await
    .unwrap();
    assert!(
        result.verification.report.tree_size == 6 || !result.is_ok(),
        "{result:?}"
    );
    let opened = PostgresStore::connect(&cluster.url, PostgresOptions::new("gw-a")).await;
    match opened {
        Err(StoreError::Failed(reason)) => assert!(reason.contains("audit"), "{reason}"),
        other => panic!("the store opened over a damaged chain: {other:?}"),
    }
    // The other instance is unaffected.
    let b = cluster.open_instance("gw-b", signing(&signer)).await;
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_close_signs_a_checkpoint_over_every_audit_event() {
    let Some(cluster) = cluster() else { return };
    let signer = Arc::new(CheckpointSigner::generate("caregate.test/seal").unwrap());
    // Due only every 1000 events or hourly: without the seal at close, events 2..=3 would stay
    // unattested after this short run.
    let options = TestOptions {
        audit_signing: Some(AuditSigning {
            signer: Arc::clone(&signer),
            schedule: CheckpointSchedule {
                every_events: NonZeroU64::new(1000).unwrap(),
                every: time::Duration::seconds(3600),
            },
        }),
        ..TestOptions::default()
    };
    let store = cluster.open_instance("gw-a", options).await;
    for n in 0..3 {
        store.submit(audit_only("gp", read_event(n))).await.unwrap();
    }
    store.close().await.unwrap();
    let result = verify_instance(
        &cluster.url,
        &PostgresTls::by_host(),
        "gw-a",
        &signer.verifier(),
        &[],
    )
    .await
    .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(result.verification.report.attested_size, 3, "{result:?}");
}

/// The server process serving `instance`'s writer connection.
async fn writer_pid(client: &tokio_postgres::Client, instance: &str) -> Option<i32> {
    client
        .query_opt(
            "SELECT pid FROM pg_stat_activity \
             WHERE application_name = $1 AND datname = current_database()",
            &[&format!("caregate writer {instance}")],
        )
        .await
        .unwrap()
        .map(|row| row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_writer_connection_answers_unavailable_then_the_writer_reconnects() {
    let Some(cluster) = cluster() else { return };
    let store = cluster.open_instance("gw-a", TestOptions::default()).await;
    store
        .submit(single("gp-a", "obs-1", WriteMode::Create, "1"))
        .await
        .unwrap();
    let admin = cluster.client().await;
    let pid = writer_pid(&admin, "gw-a")
        .await
        .expect("the writer is connected");
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while writer_pid(&admin, "gw-a").await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backend did not exit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Nothing is acknowledged over a broken connection, and the store is not poisoned...
    let lost = store
        .submit(single("gp-a", "obs-2", WriteMode::Create, "2"))
        .await;
    assert!(matches!(lost, Err(StoreError::Unavailable(_))), "{lost:?}");
    // ...the retry reconnects (taking the instance id again) and commits.
    let retried = store
        .submit(single("gp-a", "obs-2", WriteMode::Create, "2"))
        .await
        .unwrap();
    assert_eq!(retried.entries[0].seq, 2);
    let ids: Vec<_> = store
        .read_log(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|entry| entry.id)
        .collect();
    assert_eq!(ids, ["obs-1", "obs-2"]);
    assert!(writer_pid(&admin, "gw-a").await.is_some());
    store.close().await.unwrap();
    let reopened = cluster.open_instance("gw-a", TestOptions::default()).await;
    assert_eq!(reopened.read_audit(0, 10).await.unwrap().len(), 2);
    reopened.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f4_stored_data_this_code_cannot_have_written_stops_all_writes() {
    let Some(cluster) = cluster() else { return };
    let store = cluster.open_instance("gw-a", TestOptions::default()).await;
    store
        .submit(single("gp-a", "obs-1", WriteMode::Create, "1"))
        .await
        .unwrap();
    let admin = cluster.client().await;
    admin
        .execute("UPDATE log SET content_hash = '\\x00' WHERE seq = 1", &[])
        .await
        .unwrap();
    let read = store.read_current("gp-a", "Observation", "obs-1").await;
    assert!(matches!(read, Err(StoreError::Failed(_))), "{read:?}");
    let write = store
        .submit(single("gp-a", "obs-2", WriteMode::Create, "2"))
        .await;
    assert!(matches!(write, Err(StoreError::Failed(_))), "{write:?}");
    let closed = store.close().await;
    assert!(matches!(closed, Err(StoreError::Failed(_))), "{closed:?}");
}
