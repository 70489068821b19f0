//! Push delivery against real HTTPS partner endpoints (issue 4, DOMAIN.md B2 F5/F6).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use caregate_audit::Action;
use caregate_deliver::keys::idempotency_key;
use caregate_deliver::policy::RULE_CONSENT_WITHDRAWN;
use caregate_deliver::{StoredDecisionPolicy, operations, spawn};
use caregate_store::Store;
use caregate_store::delivery::{DeliveryChannel, ReplaySelector};
use caregate_testkit::partner_server::{Mode, PartnerServer, Received};
use common::*;

const PATIENTS: [&str; 3] = ["9434765919", "9434765870", "9000000009"];

/// Every record arrives once from the partner's point of view (deduplicated by key), and for each
/// patient the first arrivals are in commit order.
fn assert_once_in_patient_order(received: &[Received], expected_keys: &BTreeSet<String>) {
    let mut first_seen: Vec<&Received> = Vec::new();
    let mut seen = BTreeSet::new();
    for request in received.iter().filter(|r| r.accepted()) {
        let key = request
            .key
            .clone()
            .expect("every push carries an idempotency key");
        if seen.insert(key) {
            first_seen.push(request);
        }
    }
    assert_eq!(&seen, expected_keys, "every allowed record, and only those");
    let mut last: HashMap<String, u64> = HashMap::new();
    for request in first_seen {
        let (patient, n) = decode(&request.body);
        if let Some(previous) = last.insert(patient, n) {
            assert!(
                previous < n,
                "record {n} overtook {previous} for one patient"
            );
        }
    }
}

#[tokio::test]
async fn f5_partner_down_then_failing_then_back_gets_everything_once_in_patient_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let partner = PartnerServer::start().await;
    partner.set_mode(Mode::Down);
    let mut keys = BTreeSet::new();
    for n in 0..30u32 {
        let patient = PATIENTS[n as usize % PATIENTS.len()];
        let seq = commit(
            store.as_ref(),
            &format!("obs-{n}"),
            patient,
            n,
            &["trust-rx1"],
        )
        .await;
        keys.insert(idempotency_key(seq, "trust-rx1"));
    }
    let handle = spawn(
        store.clone(),
        Arc::new(StoredDecisionPolicy::new()),
        vec![push_to(dir.path(), "trust-rx1", &partner)],
        fast_config(),
        std::future::pending(),
    )
    .unwrap();

    // Down: connections refused; the queue holds everything and records the failure.
    wait_for("a failure while the partner is down", || async {
        status_of(store.as_ref(), "trust-rx1")
            .await
            .is_some_and(|s| s.last_failure.is_some() && s.pending == 30)
    })
    .await;
    // Failing with 503: requests arrive and are refused; nothing counts as delivered.
    partner.set_mode(Mode::Fail(503));
    assert!(
        partner
            .wait_until(PATIENCE, |received| received.len() >= 3)
            .await
    );
    assert_eq!(
        status_of(store.as_ref(), "trust-rx1")
            .await
            .unwrap()
            .pending,
        30
    );
    // Back: everything drains.
    partner.set_mode(Mode::Accept);
    wait_for("all delivered", || async {
        status_of(store.as_ref(), "trust-rx1")
            .await
            .is_some_and(|s| s.delivered == 30 && s.pending == 0)
    })
    .await;
    handle.shutdown().await;
    assert_once_in_patient_order(&partner.received(), &keys);
    let status = operations::status(store.as_ref(), Some("trust-rx1"))
        .await
        .unwrap();
    assert_eq!(status[0].oldest_pending_age_secs, None);
    assert_eq!(status[0].status.dead, 0);
}

#[tokio::test]
async fn f6_hanging_partner_is_retried_with_the_same_key_and_does_not_hold_up_another() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let hanging = PartnerServer::start().await;
    hanging.set_mode(Mode::Hang);
    let healthy = PartnerServer::start().await;
    let mut hanging_dest = push_to(dir.path(), "trust-rx1", &hanging);
    hanging_dest.timeout = std::time::Duration::from_millis(300);
    let mut healthy_keys = BTreeSet::new();
    let mut hanging_keys = BTreeSet::new();
    for n in 0..10u32 {
        let patient = PATIENTS[n as usize % PATIENTS.len()];
        let seq = commit(
            store.as_ref(),
            &format!("obs-{n}"),
            patient,
            n,
            &["trust-rx1", "pharmacy-fa123"],
        )
        .await;
        healthy_keys.insert(idempotency_key(seq, "pharmacy-fa123"));
        hanging_keys.insert(idempotency_key(seq, "trust-rx1"));
    }
    let handle = spawn(
        store.clone(),
        Arc::new(StoredDecisionPolicy::new()),
        vec![
            hanging_dest,
            push_to(dir.path(), "pharmacy-fa123", &healthy),
        ],
        fast_config(),
        std::future::pending(),
    )
    .unwrap();
    wait_for("the healthy partner has everything", || async {
        status_of(store.as_ref(), "pharmacy-fa123")
            .await
            .is_some_and(|s| s.delivered == 10)
    })
    .await;
    assert_once_in_patient_order(&healthy.received(), &healthy_keys);
    // The hanging partner was asked again after timeouts: repeats carry the same key.
    assert!(
        hanging
            .wait_until(PATIENCE, |received| {
                let keys: BTreeSet<_> = received.iter().filter_map(|r| r.key.clone()).collect();
                received.len() > keys.len()
            })
            .await,
        "a timed-out record is retried with its key"
    );
    hanging.set_mode(Mode::Accept);
    wait_for("the recovered partner has everything", || async {
        status_of(store.as_ref(), "trust-rx1")
            .await
            .is_some_and(|s| s.delivered == 10)
    })
    .await;
    handle.shutdown().await;
    assert_once_in_patient_order(&hanging.received(), &hanging_keys);
}

#[tokio::test]
async fn permanent_rejection_becomes_a_dead_letter_with_the_answer_and_replay_delivers_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let partner = PartnerServer::start().await;
    partner.set_mode(Mode::Reject(422));
    let first = commit(store.as_ref(), "obs-1", PATIENTS[0], 1, &["trust-rx1"]).await;
    let second = commit(store.as_ref(), "obs-2", PATIENTS[1], 2, &["trust-rx1"]).await;
    let handle = spawn(
        store.clone(),
        Arc::new(StoredDecisionPolicy::new()),
        vec![push_to(dir.path(), "trust-rx1", &partner)],
        fast_config(),
        std::future::pending(),
    )
    .unwrap();
    wait_for("two dead letters", || async {
        status_of(store.as_ref(), "trust-rx1")
            .await
            .is_some_and(|s| s.dead == 2)
    })
    .await;
    // A permanent rejection is not retried: one request per record.
    assert_eq!(partner.received().len(), 2);
    let dead = operations::dead_letters(store.as_ref(), Some("trust-rx1"), 0, 100)
        .await
        .unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(
        dead.iter().map(|d| d.seq).collect::<Vec<_>>(),
        [first, second]
    );
    for letter in &dead {
        assert_eq!(letter.status, Some(422));
        assert_eq!(letter.channel, DeliveryChannel::Push);
        assert_eq!(letter.resource_type, "Observation");
        assert!(
            letter.response.contains("rejected by the test partner"),
            "{}",
            letter.response
        );
    }
    assert!(
        operations::dead_letters(store.as_ref(), Some("gp-a81001"), 0, 100)
            .await
            .unwrap()
            .is_empty(),
        "filtered by partner"
    );

    partner.set_mode(Mode::Accept);
    let replayed = operations::replay(
        store.as_ref(),
        ReplaySelector::One(dead[0].id),
        "replay-1",
        "ops",
    )
    .await
    .unwrap();
    assert_eq!(replayed, 1);
    assert!(
        partner
            .wait_until(PATIENCE, |received| received.iter().any(|r| r.accepted()
                && r.key.as_deref()
                    == Some(idempotency_key(first, "trust-rx1").as_str())))
            .await
    );
    let replayed = operations::replay(
        store.as_ref(),
        ReplaySelector::Partner("trust-rx1".into()),
        "replay-2",
        "ops",
    )
    .await
    .unwrap();
    assert_eq!(replayed, 1, "only the one still dead");
    wait_for("both delivered after replay", || async {
        status_of(store.as_ref(), "trust-rx1")
            .await
            .is_some_and(|s| s.delivered == 2 && s.dead == 0)
    })
    .await;
    handle.shutdown().await;
    let audit = store.read_audit(0, 1000).await.unwrap();
    let replays = audit
        .iter()
        .filter(|e| e.event.action == Action::DeliveryReplay)
        .count();
    assert_eq!(replays, 2, "each replay is audited");
}

#[tokio::test]
async fn invariant_2_consent_withdrawn_between_intake_and_delivery_stops_it_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let partner = PartnerServer::start().await;
    let withdrawn = commit(store.as_ref(), "obs-1", PATIENTS[0], 1, &["trust-rx1"]).await;
    let allowed = commit(store.as_ref(), "obs-2", PATIENTS[1], 2, &["trust-rx1"]).await;
    let policy = Arc::new(StoredDecisionPolicy::new());
    // Consent withdrawn after the record was accepted, before delivery.
    policy.withdraw(PATIENTS[0]);
    let handle = spawn(
        store.clone(),
        policy,
        vec![push_to(dir.path(), "trust-rx1", &partner)],
        fast_config(),
        std::future::pending(),
    )
    .unwrap();
    wait_for("one delivered, one withheld", || async {
        status_of(store.as_ref(), "trust-rx1")
            .await
            .is_some_and(|s| s.delivered == 1 && s.withheld == 1 && s.pending == 0)
    })
    .await;
    handle.shutdown().await;
    let keys: Vec<_> = partner
        .received()
        .into_iter()
        .filter_map(|r| r.key)
        .collect();
    assert_eq!(keys, [idempotency_key(allowed, "trust-rx1")]);
    let audit = store.read_audit(0, 1000).await.unwrap();
    let withheld: Vec<_> = audit
        .iter()
        .filter(|e| e.event.action == Action::Withhold)
        .collect();
    assert_eq!(withheld.len(), 1);
    let event = &withheld[0].event;
    assert_eq!(event.rule_ids, [RULE_CONSENT_WITHDRAWN]);
    assert_eq!(event.actor.partner_id.as_deref(), Some("trust-rx1"));
    assert_eq!(event.patient.as_deref(), Some(PATIENTS[0]));
    assert_eq!(event.request_id, idempotency_key(withdrawn, "trust-rx1"));
    assert!(
        event
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("withdrew consent")
    );
    let delivered = audit
        .iter()
        .filter(|e| e.event.action == Action::Deliver)
        .count();
    assert_eq!(delivered, 1, "the delivery itself is audited");
}

#[tokio::test]
async fn records_without_a_decision_or_for_unconfigured_partners_are_not_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let partner = PartnerServer::start().await;
    commit(
        store.as_ref(),
        "obs-1",
        PATIENTS[0],
        1,
        &["unknown-partner"],
    )
    .await;
    let last = commit(store.as_ref(), "obs-2", PATIENTS[0], 2, &["trust-rx1"]).await;
    let handle = spawn(
        store.clone(),
        Arc::new(StoredDecisionPolicy::new()),
        vec![push_to(dir.path(), "trust-rx1", &partner)],
        fast_config(),
        std::future::pending(),
    )
    .unwrap();
    wait_for("delivered", || async {
        status_of(store.as_ref(), "trust-rx1")
            .await
            .is_some_and(|s| s.delivered == 1)
    })
    .await;
    handle.shutdown().await;
    assert_eq!(
        store
            .load_cursor(caregate_deliver::fanout::FANOUT_READER)
            .await
            .unwrap(),
        last
    );
    assert_eq!(store.delivery_status(None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn push_destination_needs_an_https_endpoint() {
    let mut destination =
        caregate_deliver::DestinationConfig::push("trust-rx1", "http://example.test/fhir");
    assert!(destination.validate().is_err());
    destination.endpoint = Some("https://example.test/fhir".into());
    assert!(destination.validate().is_ok());
    destination.tls.client_key = Some("key.pem".into());
    assert!(
        destination.validate().is_err(),
        "a key without a certificate"
    );
}

/// Write a client identity issued by `ca` into `dir` and point `destination` at it.
fn with_client_identity(
    dir: &std::path::Path,
    destination: &mut caregate_deliver::DestinationConfig,
    identity: &caregate_testkit::partner_server::IssuedCert,
) {
    let cert = dir.join("client-cert.pem");
    let key = dir.join("client-key.pem");
    std::fs::write(&cert, &identity.cert_pem).unwrap();
    std::fs::write(&key, &identity.key_pem).unwrap();
    destination.tls.client_cert = Some(cert);
    destination.tls.client_key = Some(key);
}

#[tokio::test]
async fn mtls_partner_requiring_a_client_certificate_refuses_without_one_and_accepts_with_it() {
    use caregate_testkit::partner_server::TestCa;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let client_ca = TestCa::new("caregate client CA");
    let partner = PartnerServer::start_with(Some(client_ca.pem())).await;
    let seq = commit(store.as_ref(), "obs-1", PATIENTS[0], 1, &["trust-rx1"]).await;

    // Without a client certificate: the partner refuses the handshake; the record stays queued.
    let handle = spawn(
        store.clone(),
        Arc::new(StoredDecisionPolicy::new()),
        vec![push_to(dir.path(), "trust-rx1", &partner)],
        fast_config(),
        std::future::pending(),
    )
    .unwrap();
    assert!(
        partner.wait_for_handshake_failures(PATIENCE, 2).await,
        "the partner refused handshakes without a client certificate"
    );
    wait_for("the failure recorded", || async {
        status_of(store.as_ref(), "trust-rx1")
            .await
            .is_some_and(|s| s.last_failure.is_some() && s.pending == 1)
    })
    .await;
    handle.shutdown().await;
    assert!(partner.received().is_empty(), "nothing got through");

    // With the certificate the partner trusts: delivered, once, with the same key.
    let mut destination = push_to(dir.path(), "trust-rx1", &partner);
    with_client_identity(
        dir.path(),
        &mut destination,
        &client_ca.issue_client("caregate"),
    );
    let handle = spawn(
        store.clone(),
        Arc::new(StoredDecisionPolicy::new()),
        vec![destination],
        fast_config(),
        std::future::pending(),
    )
    .unwrap();
    wait_for("delivered over mTLS", || async {
        status_of(store.as_ref(), "trust-rx1")
            .await
            .is_some_and(|s| s.delivered == 1 && s.pending == 0)
    })
    .await;
    handle.shutdown().await;
    assert_eq!(partner.accepted_keys(), [idempotency_key(seq, "trust-rx1")]);
}

#[tokio::test]
async fn mtls_client_identity_files_are_checked_at_start_with_clear_errors() {
    use caregate_testkit::partner_server::TestCa;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("caregate client CA");
    let good = ca.issue_client("caregate");
    let other = ca.issue_client("someone else");
    let start = |cert: &str, key: &str| {
        let mut destination =
            caregate_deliver::DestinationConfig::push("trust-rx1", "https://localhost:1/fhir");
        with_client_identity(
            dir.path(),
            &mut destination,
            &caregate_testkit::partner_server::IssuedCert {
                cert_pem: cert.to_owned(),
                key_pem: key.to_owned(),
            },
        );
        caregate_deliver::build_destinations(vec![destination])
            .map(|_| ())
            .map_err(|error| error.to_string())
    };
    assert_eq!(start(&good.cert_pem, &good.key_pem), Ok(()));
    let mismatch = start(&good.cert_pem, &other.key_pem).unwrap_err();
    assert!(
        mismatch.contains("trust-rx1") && mismatch.contains("does not belong"),
        "{mismatch}"
    );
    let no_cert = start("not a certificate\n", &good.key_pem).unwrap_err();
    assert!(no_cert.contains("no CERTIFICATE"), "{no_cert}");
    let no_key = start(&good.cert_pem, &good.cert_pem).unwrap_err();
    assert!(no_key.contains("no private key"), "{no_key}");
    assert!(
        no_key.contains("client-key.pem"),
        "names the file: {no_key}"
    );
}

#[tokio::test]
async fn graceful_shutdown_waits_for_the_attempt_in_flight_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let partner = PartnerServer::start().await;
    partner.set_mode(Mode::Delay(std::time::Duration::from_millis(1500)));
    commit(store.as_ref(), "obs-1", PATIENTS[0], 1, &["trust-rx1"]).await;
    let handle = spawn(
        store.clone(),
        Arc::new(StoredDecisionPolicy::new()),
        vec![push_to(dir.path(), "trust-rx1", &partner)],
        fast_config(),
        std::future::pending(),
    )
    .unwrap();
    assert!(partner.wait_until(PATIENCE, |r| !r.is_empty()).await);
    // The partner is still answering: shutting down now must wait for it and record the result.
    assert!(handle.shutdown_within(PATIENCE).await, "drained in time");
    let status = status_of(store.as_ref(), "trust-rx1").await.unwrap();
    assert_eq!((status.delivered, status.pending), (1, 0), "{status:?}");
    assert_eq!(partner.received().len(), 1);
}

#[tokio::test]
async fn graceful_shutdown_is_bounded_by_the_grace_and_leaves_the_row_pending() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let partner = PartnerServer::start().await;
    partner.set_mode(Mode::Hang);
    commit(store.as_ref(), "obs-1", PATIENTS[0], 1, &["trust-rx1"]).await;
    let mut destination = push_to(dir.path(), "trust-rx1", &partner);
    destination.timeout = std::time::Duration::from_secs(60);
    let handle = spawn(
        store.clone(),
        Arc::new(StoredDecisionPolicy::new()),
        vec![destination],
        fast_config(),
        std::future::pending(),
    )
    .unwrap();
    assert!(partner.wait_until(PATIENCE, |r| !r.is_empty()).await);
    let started = std::time::Instant::now();
    assert!(
        !handle
            .shutdown_within(std::time::Duration::from_millis(300))
            .await,
        "a hanging attempt cannot finish"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the grace bounds the wait, not the 60 s timeout"
    );
    let status = status_of(store.as_ref(), "trust-rx1").await.unwrap();
    assert_eq!(
        (status.delivered, status.pending),
        (0, 1),
        "sent again after restart"
    );
}

#[tokio::test]
async fn max_attempts_turns_repeated_transient_failures_into_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let partner = PartnerServer::start().await;
    partner.set_mode(Mode::Fail(503));
    commit(store.as_ref(), "obs-1", PATIENTS[0], 1, &["trust-rx1"]).await;
    let config = caregate_deliver::DeliveryConfig {
        max_attempts: Some(3),
        ..fast_config()
    };
    let handle = spawn(
        store.clone(),
        Arc::new(StoredDecisionPolicy::new()),
        vec![push_to(dir.path(), "trust-rx1", &partner)],
        config,
        std::future::pending(),
    )
    .unwrap();
    wait_for("a dead letter after three attempts", || async {
        status_of(store.as_ref(), "trust-rx1")
            .await
            .is_some_and(|s| s.dead == 1)
    })
    .await;
    handle.shutdown().await;
    assert_eq!(partner.received().len(), 3, "exactly max_attempts requests");
    let dead = operations::dead_letters(store.as_ref(), None, 0, 10)
        .await
        .unwrap();
    assert_eq!(dead[0].status, Some(503));
    assert!(
        dead[0].error.starts_with("gave up after 3 attempts"),
        "{}",
        dead[0].error
    );
    assert!(
        operations::is_dead_letter(store.as_ref(), dead[0].id)
            .await
            .unwrap()
    );
    assert!(
        !operations::is_dead_letter(store.as_ref(), dead[0].id + 1)
            .await
            .unwrap()
    );
}
