//! At-least-once across a crash: the delivery process is SIGKILLed in the middle of deliveries,
//! restarted on the same data directory, and the partner ends up with every record (repeats carry
//! the same idempotency key, so the partner drops them).
//!
//! The delivery process is this test binary itself, re-run with `delivery_child_process` as the
//! only test and its inputs in environment variables, so the kill hits a real separate process
//! that holds the SQLite file, the leases and the open HTTPS requests.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;

use caregate_deliver::keys::idempotency_key;
use caregate_deliver::{DestinationConfig, StoredDecisionPolicy, spawn};
use caregate_testkit::partner_server::PartnerServer;
use common::*;

const CHILD_DIR: &str = "CAREGATE_DELIVER_CHILD_DIR";
const CHILD_ENDPOINT: &str = "CAREGATE_DELIVER_CHILD_ENDPOINT";
const CHILD_CA: &str = "CAREGATE_DELIVER_CHILD_CA";

/// The delivery process (does nothing unless started by the crash test).
#[tokio::test]
async fn delivery_child_process() {
    let (Ok(dir), Ok(endpoint), Ok(ca)) = (
        std::env::var(CHILD_DIR),
        std::env::var(CHILD_ENDPOINT),
        std::env::var(CHILD_CA),
    ) else {
        return;
    };
    let store = open_store(Path::new(&dir));
    let mut destination = DestinationConfig::push("trust-rx1", &endpoint);
    destination.tls.ca_cert = Some(ca.into());
    destination.timeout = std::time::Duration::from_secs(2);
    // One at a time, so the kill lands between deliveries of one queue.
    destination.concurrency = 1;
    let _handle = spawn(
        store,
        Arc::new(StoredDecisionPolicy::new()),
        vec![destination],
        fast_config(),
        std::future::pending(),
    )
    .unwrap();
    std::future::pending::<()>().await;
}

fn start_child(dir: &Path, server: &PartnerServer, ca: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "delivery_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_ENDPOINT, server.base_url())
        .env(CHILD_CA, ca)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn f5_sigkill_mid_delivery_then_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = PartnerServer::start().await;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, server.ca_pem()).unwrap();
    let mut expected = BTreeSet::new();
    {
        let store = open_store(&data);
        for n in 0..60u32 {
            let patient = ["9434765919", "9434765870"][n as usize % 2];
            let seq = commit(
                store.as_ref(),
                &format!("obs-{n}"),
                patient,
                n,
                &["trust-rx1"],
            )
            .await;
            expected.insert(idempotency_key(seq, "trust-rx1"));
        }
        Arc::into_inner(store).unwrap().close().await.unwrap();
    }

    let mut child = start_child(&data, &server, &ca);
    assert!(
        server
            .wait_until(PATIENCE, |received| received.len() >= 10)
            .await,
        "deliveries started"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before_restart: BTreeSet<_> = server.accepted_keys().into_iter().collect();
    assert!(
        before_restart.len() < expected.len(),
        "killed in the middle ({} of {} delivered)",
        before_restart.len(),
        expected.len()
    );

    let mut child = start_child(&data, &server, &ca);
    let done = server
        .wait_until(PATIENCE, |received| {
            let keys: BTreeSet<_> = received
                .iter()
                .filter(|r| r.accepted())
                .filter_map(|r| r.key.clone())
                .collect();
            keys == expected
        })
        .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(done, "every record arrived after the restart");
    for key in server.accepted_keys() {
        assert!(expected.contains(&key), "repeats carry a known key");
    }
    // Per patient, first arrivals are in commit order.
    let mut seen = BTreeSet::new();
    let mut last = std::collections::HashMap::new();
    for request in server.received().iter().filter(|r| r.accepted()) {
        if seen.insert(request.key.clone()) {
            let (patient, n) = decode(&request.body);
            if let Some(previous) = last.insert(patient, n) {
                assert!(previous < n, "record {n} overtook {previous}");
            }
        }
    }
}
