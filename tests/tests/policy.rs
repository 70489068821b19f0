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

/// Hot reload: a bundle that fails validation is refused on SIGHUP and the previous one stays in
/// force (decisions keep its version); a valid change is taken on the next SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reload_refuses_a_broken_bundle_and_takes_a_valid_one() {
    let bundle = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(workspace_root().join("policies")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, bundle.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let codes = bundle.path().join("sensitive-codes");
    std::fs::create_dir(&codes).unwrap();
    for entry in std::fs::read_dir(workspace_root().join("policies/sensitive-codes")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, codes.join(path.file_name().unwrap())).unwrap();
    }
    let mut gw = Gateway::start_configured(Options {
        partners: default_partners(),
        extra_toml: format!("[policy]\ndir = \"{}\"\n", bundle.path().display()),
        ..Options::default()
    });
    let hup = |gw: &Gateway| {
        let pid = gw.pid().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    let trust = gw.token("trust-rx1").await;
    let submit = |n: u32| {
        let mut obs = record("observation-bp.json");
        obs["valueQuantity"] = json!({"value": 100 + n, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"});
        obs
    };
    assert_eq!(
        gw.post("/fhir/Observation", &trust, &submit(1))
            .await
            .status,
        StatusCode::CREATED
    );

    // Break a policy file: refused, the old bundle decides the next record.
    let cedar = bundle.path().join("20-direct-care.cedar");
    let good = std::fs::read_to_string(&cedar).unwrap();
    std::fs::write(&cedar, good.replacen("principal", "princpal", 1)).unwrap();
    hup(&gw);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        gw.post("/fhir/Observation", &trust, &submit(2))
            .await
            .status,
        StatusCode::CREATED
    );

    // A valid change (a comment) is a new version.
    std::fs::write(&cedar, format!("{good}\n// reviewed by the ICS IG group\n")).unwrap();
    hup(&gw);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let created = gw.post("/fhir/Observation", &trust, &submit(3)).await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert!(gw.terminate().await);
    let store =
        caregate_store::sqlite::SqliteStore::open(&gw.data_dir(), Default::default()).unwrap();
    use caregate_store::Store as _;
    let versions: Vec<String> = store
        .read_audit(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event.action == caregate_audit::Action::Create)
        .filter_map(|e| e.event.policy_version)
        .collect();
    let reloads: Vec<caregate_audit::Outcome> = store
        .read_audit(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event.action == caregate_audit::Action::PolicyReload)
        .map(|e| e.event.outcome)
        .collect();
    store.close().await.unwrap();
    assert_eq!(versions.len(), 3, "{versions:?}");
    assert_eq!(
        reloads,
        vec![
            caregate_audit::Outcome::Failed,
            caregate_audit::Outcome::Success
        ],
        "both reload attempts are audited"
    );
    assert_eq!(
        versions[0], versions[1],
        "the broken bundle was refused: the old version decided"
    );
    assert_ne!(
        versions[0],
        *versions.last().unwrap(),
        "the valid change was taken"
    );
}

/// `IGQ`: the subject-access report lists exactly the organisations that received the patient's
/// records — here the registered GP, which pulled them from its inbox — and not the GP that
/// received nothing, nor the trust that only sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn igq_subject_access_report_lists_exactly_the_recipients() {
    let mut gw = gateway();
    let trust = gw.token("trust-rx1").await;
    gw.post(
        "/fhir/Patient",
        &trust,
        &record("patient-registration.json"),
    )
    .await;
    gw.post(
        "/fhir/DocumentReference",
        &trust,
        &record("discharge-summary.json"),
    )
    .await;
    assert_eq!(inbox(&gw, "gp-a81001", 2).await.len(), 2);
    assert!(inbox(&gw, "gp-b82002", 0).await.is_empty());
    // The GP acknowledges the page: from then on the records count as delivered to it.
    let gp = gw.token("gp-a81001").await;
    let page = gw
        .send(Method::GET, "/fhir/$inbox?_count=50", Some(&gp), None, &[])
        .await;
    let next = page.body["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .and_then(|l| l["url"].as_str())
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
    let ack = gw
        .send(
            Method::POST,
            &format!("/fhir/$inbox/ack?cursor={cursor}"),
            Some(&gp),
            None,
            &[],
        )
        .await;
    assert!(ack.status.is_success(), "{}", ack.body);
    assert!(gw.terminate().await);
    let output = std::process::Command::new(caregate_e2e::binary())
        .args([
            "audit",
            "sar",
            "--format",
            "json",
            "--patient",
            "9434765919",
            "--data",
        ])
        .arg(gw.data_dir())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let recipients: Vec<&str> = report["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["organisation"].as_str())
        .collect();
    assert_eq!(recipients, vec!["gp-a81001"], "{report}");
    let sources: Vec<&str> = report["sources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["organisation"].as_str())
        .collect();
    assert_eq!(sources, vec!["trust-rx1"], "{report}");
}
