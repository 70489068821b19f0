//! The decide stage end to end (issue 3): with the shipped policy bundle, a record's decision is
//! made at intake, committed with it, and delivery follows it — the registered GP receives a
//! discharge summary, another GP does not (`LR-1`), and a sexual-health record is withheld from
//! everyone the sensitive rule does not allow (`SENS-1`).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::time::Duration;

use caregate_e2e::{Gateway, Options, TestPartner, default_partners, workspace_root};
use caregate_testkit::keys::PartnerKey;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn gateway() -> Gateway {
    let mut partners = default_partners();
    partners.push(TestPartner::new(
        "gp-b82002",
        "B82002",
        "gp",
        &["system/*.cruds"],
        PartnerKey::generate_es384("gp-b-1"),
    ));
    partners.push(TestPartner::new(
        "gp-c83003",
        "C83003",
        "gp",
        &["system/*.cruds"],
        PartnerKey::generate_es384("gp-c-1"),
    ));
    let policies = workspace_root().join("policies");
    Gateway::start_configured(Options {
        partners,
        extra_toml: format!("[policy]\ndir = \"{}\"\n", policies.display()),
        ..Options::default()
    })
}

fn record(name: &str) -> Value {
    let path = workspace_root().join("policies/tests/records").join(name);
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    value.as_object_mut().unwrap().remove("id");
    value
}

/// Resource types (and codes) in a partner's inbox, polling until `want` entries are there or
/// the bound is reached.
async fn inbox(gw: &Gateway, partner: &str, want: usize) -> Vec<Value> {
    let token = gw.token(partner).await;
    let mut entries = Vec::new();
    for _ in 0..100 {
        let reply = gw
            .send(
                Method::GET,
                "/fhir/$inbox?_count=50",
                Some(&token),
                None,
                &[],
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        entries = reply.body["entry"].as_array().cloned().unwrap_or_default();
        if entries.len() >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    entries.into_iter().map(|e| e["resource"].clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lr_1_discharge_summary_reaches_the_registered_gp_only() {
    let gw = gateway();
    let trust = gw.token("trust-rx1").await;
    let registration = gw
        .post(
            "/fhir/Patient",
            &trust,
            &record("patient-registration.json"),
        )
        .await;
    assert_eq!(
        registration.status,
        StatusCode::CREATED,
        "{}",
        registration.body
    );
    let summary = gw
        .post(
            "/fhir/DocumentReference",
            &trust,
            &record("discharge-summary.json"),
        )
        .await;
    assert_eq!(summary.status, StatusCode::CREATED, "{}", summary.body);

    let received = inbox(&gw, "gp-a81001", 2).await;
    let types: Vec<&str> = received
        .iter()
        .filter_map(|r| r["resourceType"].as_str())
        .collect();
    assert!(
        types.contains(&"DocumentReference"),
        "the registered GP receives the summary: {types:?}"
    );
    let other = inbox(&gw, "gp-b82002", 0).await;
    assert!(other.is_empty(), "another GP receives nothing: {other:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sens_1_sensitive_record_is_withheld_from_the_care_team_trust() {
    let gw = gateway();
    let gp = gw.token("gp-a81001").await;
    let trust = gw.token("trust-rx1").await;
    let other_gp = gw.token("gp-c83003").await;
    gw.post("/fhir/Patient", &gp, &record("patient-registration.json"))
        .await;
    // The trust has the patient in an open Encounter: a care relationship (LR-1).
    let encounter = json!({
        "resourceType": "Encounter", "status": "in-progress",
        "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP" },
        "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9434765919" } }
    });
    assert_eq!(
        gw.post("/fhir/Encounter", &trust, &encounter).await.status,
        StatusCode::CREATED
    );
    // An ordinary record and one with a sexual-health code in a contained resource.
    let ordinary = record("observation-bp.json");
    let mut sensitive = record("observation-bp.json");
    sensitive["contained"] = json!([{
        "resourceType": "Condition", "id": "c1",
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "15628003", "display": "Gonorrhoea" }] },
        "subject": { "reference": "Patient/p1" }
    }]);
    sensitive["status"] = json!("amended");
    assert_eq!(
        gw.post("/fhir/Observation", &other_gp, &ordinary)
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        gw.post("/fhir/Observation", &other_gp, &sensitive)
            .await
            .status,
        StatusCode::CREATED
    );

    // The registered GP gets both (it is cleared for the category); the trust only the ordinary one.
    let at_gp = inbox(&gw, "gp-a81001", 3).await;
    let gp_observations = at_gp
        .iter()
        .filter(|r| r["resourceType"] == "Observation")
        .count();
    assert_eq!(gp_observations, 2, "{at_gp:?}");
    let at_trust = inbox(&gw, "trust-rx1", 1).await;
    let statuses: Vec<&str> = at_trust
        .iter()
        .filter(|r| r["resourceType"] == "Observation")
        .filter_map(|r| r["status"].as_str())
        .collect();
    assert_eq!(
        statuses,
        vec!["final"],
        "SENS-1: the sensitive record is withheld from the trust"
    );
}
