//! The audit log's tamper evidence as the store keeps it (DOMAIN.md B2 `T1`, `T2`): every event
//! gets its RFC 9162 leaf in the same commit, checkpoints are signed on schedule, and offline
//! verification detects an edited, deleted or truncated event and an edited query column.
//!
//! The untouched-log test runs on both backends; the tampering tests edit the SQLite file
//! directly (their PostgreSQL twins, editing rows with SQL, are in `postgres_store.rs`).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

mod support;

use std::num::NonZeroU64;
use std::path::Path;
use std::sync::Arc;

use caregate_audit::checkpoint::{CheckpointSchedule, CheckpointSigner};
use caregate_audit::{Action, Actor, AuditEvent, Outcome};
use caregate_store::sqlite::{AuditSigning, SqliteOptions, SqliteStore, verify_audit};
use caregate_store::{Store, Submission};
use support::{Backend, TestOptions};

fn signer() -> Arc<CheckpointSigner> {
    Arc::new(CheckpointSigner::generate("caregate.test/audit").unwrap())
}

fn options(signer: &Arc<CheckpointSigner>) -> SqliteOptions {
    SqliteOptions {
        audit_signing: Some(AuditSigning {
            signer: signer.clone(),
            schedule: CheckpointSchedule {
                every_events: NonZeroU64::new(5).unwrap(),
                every: time::Duration::seconds(3600),
            },
        }),
        ..SqliteOptions::default()
    }
}

fn event(n: usize) -> AuditEvent {
    let mut event = AuditEvent::new(
        format!("req-{n}"),
        Actor::default(),
        Action::Read,
        Outcome::Success,
    );
    event.patient = Some("9434765919".into());
    event
}

async fn write_events(dir: &Path, signer: &Arc<CheckpointSigner>, count: usize) {
    let store = SqliteStore::open(dir, options(signer)).unwrap();
    for n in 0..count {
        store
            .submit(Submission {
                partner: "gp".into(),
                idempotency_key: None,
                records: vec![],
                audit: vec![event(n)],
            })
            .await
            .unwrap();
    }
    store.close().await.unwrap();
}

fn sql(dir: &Path, statement: &str) {
    let conn = rusqlite::Connection::open(dir.join("caregate.db")).unwrap();
    conn.execute_batch(statement).unwrap();
}

backend_tests!(t1_untouched_log_verifies_against_its_checkpoints);

async fn t1_untouched_log_verifies_against_its_checkpoints<B: Backend>(backend: B) {
    let signer = signer();
    for count in [12, 3] {
        // Reopening continues the same tree.
        let store = backend
            .open_with(TestOptions {
                audit_signing: options(&signer).audit_signing,
                ..TestOptions::default()
            })
            .await;
        for n in 0..count {
            store
                .submit(Submission {
                    partner: "gp".into(),
                    idempotency_key: None,
                    records: vec![],
                    audit: vec![event(n)],
                })
                .await
                .unwrap();
        }
        B::close(store).await;
    }
    let result = backend.verify(&signer.verifier()).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(result.report.events, 15);
    assert_eq!(result.report.tree_size, 15);
    assert!(result.report.checkpoints_matched >= 3, "{result:?}");
    assert!(
        result
            .latest_checkpoint
            .unwrap()
            .starts_with("caregate.test/audit\n")
    );
}

#[tokio::test]
async fn t1_edited_event_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let signer = signer();
    write_events(dir.path(), &signer, 10).await;
    sql(
        dir.path(),
        "UPDATE audit_events SET event = replace(event, '\"read\"', '\"create\"') WHERE seq = 4",
    );
    let result = verify_audit(dir.path(), &signer.verifier(), &[]).unwrap();
    assert!(!result.is_ok());
    assert_eq!(result.report.first_bad_seq, Some(4));
}

/// Found by the `audit_verify` fuzz target: a recorded leaf of the wrong length was silently
/// replaced by the recomputed one and the log reported as verified.
#[tokio::test]
async fn t1_malformed_recorded_leaf_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let signer = signer();
    write_events(dir.path(), &signer, 10).await;
    sql(
        dir.path(),
        "UPDATE audit_events SET leaf_hash = x'0102030405060708090a0b0c0d0e0f10' WHERE seq = 1",
    );
    let result = verify_audit(dir.path(), &signer.verifier(), &[]).unwrap();
    assert!(!result.is_ok(), "{result:?}");
    assert_eq!(result.report.first_bad_seq, Some(1));
}

#[tokio::test]
async fn t1_deleted_event_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let signer = signer();
    write_events(dir.path(), &signer, 10).await;
    sql(dir.path(), "DELETE FROM audit_events WHERE seq = 7");
    let result = verify_audit(dir.path(), &signer.verifier(), &[]).unwrap();
    assert!(!result.is_ok());
    assert_eq!(result.report.first_bad_seq, Some(7));
}

#[tokio::test]
async fn t1_truncation_is_detected_by_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let signer = signer();
    write_events(dir.path(), &signer, 10).await;
    // Checkpoints were signed at sizes 1 and 6; removing events 5.. cuts into the size-6 one.
    sql(dir.path(), "DELETE FROM audit_events WHERE seq > 4");
    let result = verify_audit(dir.path(), &signer.verifier(), &[]).unwrap();
    assert!(
        !result.is_ok(),
        "the size-6 checkpoint proves events 5 and 6 existed"
    );
}

#[tokio::test]
async fn t1_edited_query_column_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let signer = signer();
    write_events(dir.path(), &signer, 3).await;
    sql(
        dir.path(),
        "UPDATE audit_events SET patient = '4000000004' WHERE seq = 2",
    );
    let result = verify_audit(dir.path(), &signer.verifier(), &[]).unwrap();
    assert!(!result.is_ok());
    assert_eq!(result.column_mismatches, vec![2]);
}

#[tokio::test]
async fn t2_checkpoint_from_another_key_or_a_fork_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let signer = signer();
    write_events(dir.path(), &signer, 5).await;
    // A witness kept the size-5 checkpoint; the operator then rewrites history and re-signs.
    let witnessed = caregate_store::sqlite::latest_audit_checkpoint(dir.path())
        .unwrap()
        .unwrap();
    let witnessed = caregate_audit::SignedCheckpoint::parse(&witnessed).unwrap();
    sql(
        dir.path(),
        "UPDATE audit_events SET event = replace(event, 'req-2', 'req-X'), leaf_hash = leaf_hash WHERE seq = 3; DELETE FROM audit_checkpoints;",
    );
    let result = verify_audit(dir.path(), &signer.verifier(), &[witnessed]).unwrap();
    assert!(
        !result.is_ok(),
        "the witness's checkpoint no longer matches"
    );
    // A checkpoint verified with the wrong key does not count as attestation.
    let other = CheckpointSigner::generate("caregate.test/audit").unwrap();
    let result = verify_audit(dir.path(), &other.verifier(), &[]).unwrap();
    assert_eq!(result.report.checkpoints_matched, 0);
}

#[tokio::test]
async fn tampered_tree_state_stops_the_store_from_opening() {
    let dir = tempfile::tempdir().unwrap();
    let signer = signer();
    write_events(dir.path(), &signer, 4).await;
    sql(dir.path(), "DELETE FROM audit_events WHERE seq = 4");
    let error = SqliteStore::open(dir.path(), options(&signer)).unwrap_err();
    assert!(error.to_string().contains("audit"), "{error}");
}

#[tokio::test]
async fn t1_reordered_events_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let signer = signer();
    write_events(dir.path(), &signer, 8).await;
    // Swap two events' contents (and their recorded leaves) directly in the file.
    sql(
        dir.path(),
        "CREATE TEMP TABLE swap AS SELECT seq, event, leaf_hash, request_id FROM audit_events WHERE seq IN (3, 4);
         UPDATE audit_events SET
           event = (SELECT event FROM swap WHERE swap.seq = 7 - audit_events.seq),
           leaf_hash = (SELECT leaf_hash FROM swap WHERE swap.seq = 7 - audit_events.seq),
           request_id = (SELECT request_id FROM swap WHERE swap.seq = 7 - audit_events.seq)
         WHERE seq IN (3, 4);",
    );
    let result = verify_audit(dir.path(), &signer.verifier(), &[]).unwrap();
    assert!(!result.is_ok(), "{result:?}");
    // The exact event is named (recorded leaves), and the signed checkpoint over 1..=6 no
    // longer matches (it names the range from the last good checkpoint).
    assert!(
        result
            .report
            .findings
            .contains(&caregate_audit::verify::Finding::LeafMismatch { seq: 3 }),
        "{result:?}"
    );
    assert!(result.report.first_bad_seq.is_some_and(|seq| seq <= 3));
}
