//! Delivery through the real binary (issue 4): records committed with a routing decision reach
//! push partners across a SIGKILL of the gateway, and inbox partners page and acknowledge over
//! HTTPS, each seeing only its own inbox.
//!
//! The records are committed into the data directory while the gateway is stopped (intake does
//! not yet attach policy decisions), then the gateway is started on it.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::collections::BTreeSet;
use std::time::Duration;

use caregate_deliver::keys::idempotency_key;
use caregate_e2e::{Gateway, Options, TestPartner, default_partners};
use caregate_testkit::keys::PartnerKey;
use caregate_testkit::partner_server::PartnerServer;
use reqwest::{Method, StatusCode};

const PATIENCE: Duration = Duration::from_secs(90);

fn accepted_keys(server: &PartnerServer) -> BTreeSet<String> {
    server.accepted_keys().into_iter().collect()
}

#[tokio::test]
async fn f5_gateway_sigkilled_mid_delivery_restarts_and_every_record_arrives() {
    let partner = PartnerServer::start().await;
    let mut gateway = Gateway::start_configured(Options {
        partners: default_partners(),
        partner_extra: vec![(
            "trust-rx1".into(),
            format!(
                "delivery = {{ mode = \"push\", endpoint = \"{}\", ca_cert = \"partner-ca.pem\", timeout_secs = 1 }}",
                partner.base_url()
            ),
        )],
        files: vec![("partner-ca.pem".into(), partner.ca_pem().to_owned())],
        ..Options::default()
    });
    gateway.kill();
    let seqs =
        caregate_e2e::commit_routed_observations(&gateway.data_dir(), 200, &["trust-rx1"]).await;
    let expected: BTreeSet<String> = seqs
        .iter()
        .map(|seq| idempotency_key(*seq, "trust-rx1"))
        .collect();

    gateway.launch();
    assert!(
        partner
            .wait_until(PATIENCE, |received| received.len() >= 20)
            .await,
        "deliveries started"
    );
    gateway.kill(); // SIGKILL
    let before = accepted_keys(&partner);
    assert!(before.len() < expected.len(), "killed mid-delivery");

    gateway.launch();
    let done = partner
        .wait_until(PATIENCE, |received| {
            received
                .iter()
                .filter(|r| r.accepted())
                .filter_map(|r| r.key.clone())
                .collect::<BTreeSet<_>>()
                == expected
        })
        .await;
    assert!(
        done,
        "every record arrived after the restart (at-least-once)"
    );
    assert!(
        accepted_keys(&partner).is_subset(&expected),
        "repeats carry the same key"
    );
}

fn inbox_partners() -> Vec<TestPartner> {
    let mut partners = default_partners();
    partners.push(TestPartner::new(
        "council-sc1",
        "SC1",
        "council",
        &["system/*.rs"],
        PartnerKey::generate_es256("council-key-1"),
    ));
    partners
}

#[tokio::test]
async fn inbox_pages_acknowledges_and_never_shows_another_partners_records() {
    let mut gateway = Gateway::start_configured(Options {
        partners: inbox_partners(),
        partner_extra: vec![
            (
                "council-sc1".into(),
                "delivery = { mode = \"inbox\" }".into(),
            ),
            ("trust-rx1".into(), "delivery = { mode = \"inbox\" }".into()),
        ],
        ..Options::default()
    });
    gateway.kill();
    caregate_e2e::commit_routed_observations(&gateway.data_dir(), 5, &["council-sc1"]).await;
    gateway.launch();
    let council = gateway.token("council-sc1").await;
    let trust = gateway.token("trust-rx1").await;

    // Wait for the fan-out to route the records.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let first = loop {
        let page = gateway
            .send(
                Method::GET,
                "/fhir/$inbox?_count=2",
                Some(&council),
                None,
                &[],
            )
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        if page.body["entry"].as_array().is_some_and(|e| e.len() == 2) {
            break page;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "records never reached the inbox"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(first.body["resourceType"], "Bundle");
    assert_eq!(first.body["type"], "searchset");
    let values: Vec<_> = first.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["valueQuantity"]["value"].as_u64().unwrap())
        .collect();
    assert_eq!(values, [0, 1]);
    let next = first.body["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .expect("a next link")["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let cursor = next
        .split("cursor=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_owned();

    // Never acknowledged: the same page again.
    let again = gateway
        .send(
            Method::GET,
            "/fhir/$inbox?_count=2",
            Some(&council),
            None,
            &[],
        )
        .await;
    assert_eq!(again.body["entry"], first.body["entry"]);

    // BOLA: the trust sees nothing of the council's, and cannot acknowledge it.
    let other = gateway
        .send(
            Method::GET,
            "/fhir/$inbox?_count=50",
            Some(&trust),
            None,
            &[],
        )
        .await;
    assert_eq!(other.status, StatusCode::OK);
    assert!(
        other.body["entry"].as_array().is_none_or(Vec::is_empty),
        "{}",
        other.body
    );
    let stolen = gateway
        .send(
            Method::POST,
            &format!("/fhir/$inbox/ack?cursor={cursor}"),
            Some(&trust),
            None,
            &[],
        )
        .await;
    assert_eq!(stolen.status, StatusCode::OK);
    assert!(
        stolen.body["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .starts_with("0 ")
    );
    let still = gateway
        .send(
            Method::GET,
            "/fhir/$inbox?_count=2",
            Some(&council),
            None,
            &[],
        )
        .await;
    assert_eq!(still.body["entry"], first.body["entry"]);

    // A partner without the inbox scope, or on push, is refused.
    let gp = gateway.token("pharmacy-fa123").await;
    let refused = gateway
        .send(Method::GET, "/fhir/$inbox", Some(&gp), None, &[])
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);

    // Acknowledge: the next read starts after the acknowledged page.
    let ack = gateway
        .send(
            Method::POST,
            &format!("/fhir/$inbox/ack?cursor={cursor}"),
            Some(&council),
            None,
            &[],
        )
        .await;
    assert_eq!(ack.status, StatusCode::OK, "{}", ack.body);
    let after = gateway
        .send(
            Method::GET,
            "/fhir/$inbox?_count=2",
            Some(&council),
            None,
            &[],
        )
        .await;
    let values: Vec<_> = after.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["valueQuantity"]["value"].as_u64().unwrap())
        .collect();
    assert_eq!(values, [2, 3]);
    let bad = gateway
        .send(
            Method::GET,
            "/fhir/$inbox?cursor=forged",
            Some(&council),
            None,
            &[],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}
