//! Shared set-up for delivery tests: a store in a temp dir, records with decisions, partner
//! endpoints, and bounded waits on conditions.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use caregate_audit::{Action, Actor, AuditEvent, Outcome};
use caregate_deliver::retry::{Backoff, BreakerConfig};
use caregate_deliver::{DeliveryConfig, DestinationConfig};
use caregate_store::delivery::DestinationStatus;
use caregate_store::sqlite::{SqliteOptions, SqliteStore};
use caregate_store::{RecordWrite, Seq, Store, Submission, WriteMode};
use caregate_testkit::partner_server::PartnerServer;

/// How long any test waits for a condition before failing.
pub(crate) const PATIENCE: Duration = Duration::from_secs(60);

pub(crate) fn open_store(dir: &Path) -> Arc<SqliteStore> {
    Arc::new(SqliteStore::open(dir, SqliteOptions::default()).unwrap())
}

/// Fast timings so tests finish quickly; nothing asserts on them.
pub(crate) fn fast_config() -> DeliveryConfig {
    DeliveryConfig {
        poll_interval: Duration::from_millis(20),
        fanout_batch: 16,
        backoff: Backoff {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(200),
        },
        breaker: BreakerConfig {
            failures: 3,
            open_for: Duration::from_millis(100),
        },
        lease_margin: Duration::from_millis(500),
        ..DeliveryConfig::default()
    }
}

/// A push destination for `server`, trusting its CA (written into `dir`).
pub(crate) fn push_to(dir: &Path, partner: &str, server: &PartnerServer) -> DestinationConfig {
    let ca = dir.join(format!("{partner}-ca.pem"));
    std::fs::write(&ca, server.ca_pem()).unwrap();
    let mut destination = DestinationConfig::push(partner, &server.base_url());
    destination.tls.ca_cert = Some(ca);
    destination.timeout = Duration::from_secs(2);
    destination
}

/// An Observation about `nhs_number` whose `valueQuantity.value` is `n` (to check order).
pub(crate) fn observation(nhs_number: &str, n: u32) -> Vec<u8> {
    serde_json::json!({
        "resourceType": "Observation",
        "status": "final",
        "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs_number } },
        "valueQuantity": { "value": n }
    })
    .to_string()
    .into_bytes()
}

/// Commit one Observation from `gp-a81001` routed to `deliver_to`. Returns its log position.
pub(crate) async fn commit(
    store: &dyn Store,
    id: &str,
    nhs_number: &str,
    n: u32,
    deliver_to: &[&str],
) -> Seq {
    let decision = serde_json::json!({
        "policy_version": "sha256:test",
        "deliver_to": deliver_to.iter().map(|partner| serde_json::json!({
            "partner": partner, "agreement": "dsa-test", "purpose": "direct-care",
            "rule_ids": ["LR-1"], "rule_reasons": ["registered GP"], "break_glass": false
        })).collect::<Vec<_>>(),
        "withheld": []
    });
    let content = observation(nhs_number, n);
    let mut hash = [0u8; 32];
    hash[..4].copy_from_slice(&n.to_be_bytes());
    hash[4..4 + id.len().min(28)].copy_from_slice(&id.as_bytes()[..id.len().min(28)]);
    let receipt = store
        .submit(Submission {
            partner: "gp-a81001".into(),
            idempotency_key: None,
            records: vec![RecordWrite {
                resource_type: "Observation".into(),
                id: id.into(),
                mode: WriteMode::Create,
                content,
                content_hash: hash,
                nhs_number: Some(nhs_number.into()),
                identifiers: Vec::new(),
                decision: Some(decision.to_string().into_bytes()),
            }],
            audit: vec![AuditEvent::new(
                format!("req-{id}"),
                Actor::default(),
                Action::Create,
                Outcome::Success,
            )],
        })
        .await
        .unwrap();
    receipt.entries[0].seq
}

/// Poll `check` until it is true or [`PATIENCE`] passes (a bounded wait on a condition).
pub(crate) async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn status_of(store: &dyn Store, partner: &str) -> Option<DestinationStatus> {
    store
        .delivery_status(Some(partner))
        .await
        .unwrap()
        .into_iter()
        .next()
}

/// The value `n` and NHS number of a received Observation body.
pub(crate) fn decode(body: &[u8]) -> (String, u64) {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    (
        json["subject"]["identifier"]["value"]
            .as_str()
            .unwrap()
            .to_owned(),
        json["valueQuantity"]["value"].as_u64().unwrap(),
    )
}
