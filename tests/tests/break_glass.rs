//! Break-glass (emergency) access end to end (DOMAIN.md `LR-2`, `POU`), through the real binary
//! with the shipped policy bundle: `POST /fhir/Patient/$break-glass` discloses a patient's records
//! to an A&E trust with no relationship where its agreement permits break-glass (`LR-2`), each
//! disclosure audited with the emergency purpose of use so that it waits in the IG officers'
//! review queue; a dissent (`CONSENT-DISSENT`) and a sensitive code (`SENS-1`) still withhold; a
//! partner whose agreement does not permit break-glass gets nothing; the request must carry a
//! reason and an emergency purpose; only the named patient's records are ever disclosed.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};

use caregate_e2e::{
    Gateway, Options, Reply, TestPartner, binary, client_trusting, default_partners, workspace_root,
};
use caregate_testkit::keys::PartnerKey;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const PATIENT: &str = "9434765919";
/// Another patient, whose records must never appear in an answer about [`PATIENT`].
const OTHER_PATIENT: &str = "4000000004";
const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
const REASON: &str = "unconscious in ED after a road traffic collision, no history available";

/// The shipped bundle; the GP, the A&E trust, a second GP, a council (whose social-care agreement
/// does not permit break-glass) and the ICB's IG function (ig-officer role, for the audit API).
fn gateway() -> Gateway {
    let mut partners = default_partners();
    partners.push(TestPartner::new(
        "council-e08000012",
        "609",
        "council",
        &["system/*.rs"],
        PartnerKey::generate_es256("council-1"),
    ));
    partners.push(TestPartner::new(
        "icb-qe1",
        "QE1",
        "icb",
        &["system/AuditEvent.rs"],
        PartnerKey::generate_es256("icb-ig-1"),
    ));
    let policies = workspace_root().join("policies");
    Gateway::start_configured(Options {
        partners,
        extra_toml: format!("[policy]\ndir = \"{}\"\n", policies.display()),
        partner_extra: vec![("icb-qe1".into(), "roles = [\"ig-officer\"]".into())],
        ..Options::default()
    })
}

/// A record from the policy test cases, without its id (the gateway assigns one).
fn record(name: &str) -> Value {
    let path = workspace_root().join("policies/tests/records").join(name);
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    value.as_object_mut().unwrap().remove("id");
    value
}

/// Submit `body` as `partner`, expecting 201.
async fn submit(gw: &Gateway, partner: &str, body: &Value) {
    let token = gw.token(partner).await;
    let path = format!("/fhir/{}", body["resourceType"].as_str().unwrap());
    let reply = gw.post(&path, &token, body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
}

fn parameters(patient: &str, reason: Option<&str>, purpose: Option<(&str, &str)>) -> Value {
    let mut parameter = vec![json!({
        "name": "patient",
        "valueIdentifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": patient }
    })];
    if let Some(reason) = reason {
        parameter.push(json!({ "name": "reason", "valueString": reason }));
    }
    if let Some((system, code)) = purpose {
        parameter.push(json!({
            "name": "purposeOfUse",
            "valueCoding": { "system": system, "code": code }
        }));
    }
    json!({ "resourceType": "Parameters", "parameter": parameter })
}

async fn break_glass(gw: &Gateway, partner: &str, body: &Value) -> Reply {
    let token = gw.token(partner).await;
    gw.post("/fhir/Patient/$break-glass", &token, body).await
}

/// A well-formed emergency request for `patient`.
async fn emergency(gw: &Gateway, partner: &str, patient: &str) -> Reply {
    let reply = break_glass(
        gw,
        partner,
        &parameters(patient, Some(REASON), Some((ACT_REASON, "ETREAT"))),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["resourceType"], "Bundle");
    assert_eq!(reply.body["type"], "searchset");
    reply
}

/// The disclosed resources (`search.mode = match`) of an answer.
fn disclosed(reply: &Reply) -> Vec<Value> {
    let resources: Vec<Value> = reply.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["search"]["mode"] == "match")
        .map(|entry| entry["resource"].clone())
        .collect();
    assert_eq!(
        reply.body["total"].as_u64(),
        Some(resources.len() as u64),
        "{}",
        reply.body
    );
    resources
}

/// Every NHS number a resource names (its own identifiers and its subject's or patient's).
fn nhs_numbers(resource: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let mut identifiers: Vec<&Value> = resource["identifier"]
        .as_array()
        .map(|ids| ids.iter().collect())
        .unwrap_or_default();
    for key in ["subject", "patient"] {
        identifiers.push(&resource[key]["identifier"]);
    }
    for identifier in identifiers {
        if identifier["system"] == "https://fhir.nhs.uk/Id/nhs-number" {
            found.push(identifier["value"].as_str().unwrap().to_owned());
        }
    }
    found
}

/// Audit events from the admin API, as the IG officers' partner sees them.
async fn audit_events(gw: &Gateway, query: &str) -> Vec<Value> {
    let token = gw.token("icb-qe1").await;
    let admin = gw.admin_url.clone().unwrap();
    let response = gw
        .client
        .get(format!("{admin}/admin/audit/events?{query}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["events"].as_array().unwrap().clone()
}

/// Break-glass events (`break_glass=true`) about `patient` that `partner` caused.
async fn break_glass_events(gw: &Gateway, patient: &str, partner: &str) -> Vec<Value> {
    audit_events(
        gw,
        &format!("break_glass=true&unreviewed=true&patient={patient}&partner={partner}"),
    )
    .await
    .into_iter()
    .inspect(|listed| assert_eq!(listed["break_glass"], true, "{listed}"))
    .map(|listed| listed["event"].clone())
    .collect()
}

fn rule_ids(event: &Value) -> Vec<&str> {
    event["rule_ids"]
        .as_array()
        .map(|rules| rules.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lr_2_emergency_request_discloses_only_that_patients_records_and_flags_each_for_review() {
    let gw = gateway();
    // The GP's records about the patient, and one about someone else.
    submit(&gw, "gp-a81001", &record("patient-registration.json")).await;
    submit(&gw, "gp-a81001", &record("observation-bp.json")).await;
    submit(
        &gw,
        "gp-a81001",
        &caregate_e2e::observation(OTHER_PATIENT, 120.0),
    )
    .await;

    // The A&E trust has no relationship with the patient: break-glass under the shared care
    // record agreement (break_glass_permitted) discloses both of the patient's records.
    let reply = emergency(&gw, "trust-rx1", PATIENT).await;
    let resources = disclosed(&reply);
    let mut types: Vec<&str> = resources
        .iter()
        .map(|r| r["resourceType"].as_str().unwrap())
        .collect();
    types.sort_unstable();
    assert_eq!(types, ["Observation", "Patient"], "{}", reply.body);
    for resource in &resources {
        // BOLA: only the named patient's records, whoever holds others.
        assert_eq!(nhs_numbers(resource), [PATIENT], "{resource}");
        assert_eq!(resource["meta"]["source"], "urn:caregate:partner:gp-a81001");
        assert!(resource["meta"]["versionId"].is_string(), "{resource}");
    }
    let text = reply.body.to_string();
    assert!(!text.contains(OTHER_PATIENT), "{text}");

    // Each disclosure is an audited break-glass read (LR-2) awaiting review, plus the request's
    // own event; all carry the purpose of use and keep the reason.
    let events = break_glass_events(&gw, PATIENT, "trust-rx1").await;
    let reads: Vec<&Value> = events.iter().filter(|e| e["entity"].is_object()).collect();
    assert_eq!(reads.len(), 2, "{events:?}");
    for read in &reads {
        assert_eq!(read["action"], "read");
        assert_eq!(read["outcome"], "success");
        assert_eq!(read["purpose_of_use"], "ETREAT");
        assert_eq!(rule_ids(read), ["LR-2"], "{read}");
        assert!(
            read["policy_version"]
                .as_str()
                .unwrap()
                .starts_with("sha256:")
        );
        assert!(read["detail"].as_str().unwrap().contains(REASON), "{read}");
    }
    let requests: Vec<&Value> = events.iter().filter(|e| e["entity"].is_null()).collect();
    assert_eq!(requests.len(), 1, "{events:?}");
    assert_eq!(requests[0]["status"], 200);
    assert!(
        requests[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("break-glass request: 2 records disclosed"),
        "{}",
        requests[0]
    );
    // Nothing about the other patient was read.
    assert!(
        break_glass_events(&gw, OTHER_PATIENT, "trust-rx1")
            .await
            .is_empty()
    );

    // The same request with BTG is flagged the same way.
    let reply = break_glass(
        &gw,
        "trust-rx1",
        &parameters(PATIENT, Some(REASON), Some((ACT_REASON, "BTG"))),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(disclosed(&reply).len(), 2);
    let btg = audit_events(&gw, &format!("break_glass=true&patient={PATIENT}")).await;
    assert!(
        btg.iter().any(|e| e["event"]["purpose_of_use"] == "BTG"),
        "{btg:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lr_2_request_needs_a_reason_and_an_emergency_purpose() {
    let gw = gateway();
    submit(&gw, "gp-a81001", &record("observation-bp.json")).await;
    let cases = [
        // (body, issue code, expression)
        (
            parameters(PATIENT, None, Some((ACT_REASON, "ETREAT"))),
            "required",
            "Parameters.parameter",
        ),
        (
            parameters(PATIENT, Some("   "), Some((ACT_REASON, "ETREAT"))),
            "required",
            "Parameters.parameter[1].valueString",
        ),
        (
            parameters(PATIENT, Some(REASON), None),
            "required",
            "Parameters.parameter",
        ),
        (
            parameters(PATIENT, Some(REASON), Some((ACT_REASON, "TREAT"))),
            "code-invalid",
            "Parameters.parameter[2].valueCoding.code",
        ),
        (
            parameters(
                PATIENT,
                Some(REASON),
                Some(("http://snomed.info/sct", "ETREAT")),
            ),
            "value",
            "Parameters.parameter[2].valueCoding.system",
        ),
        (
            json!({ "resourceType": "Patient" }),
            "invalid",
            "Parameters.resourceType",
        ),
    ];
    for (body, code, expression) in cases {
        let reply = break_glass(&gw, "trust-rx1", &body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.body
        );
        assert_eq!(reply.body["resourceType"], "OperationOutcome");
        let issues = reply.body["issue"].as_array().unwrap();
        assert!(
            issues
                .iter()
                .any(|i| i["code"] == code && i["expression"][0] == expression),
            "{body}: {}",
            reply.body
        );
        // Neither the patient nor the reason comes back in an error.
        let text = reply.body.to_string();
        assert!(
            !text.contains(PATIENT) && !text.contains("road traffic"),
            "{text}"
        );
    }
    // An invalid NHS number is a business rule (422), named without its digits.
    let reply = break_glass(
        &gw,
        "trust-rx1",
        &parameters("9434765918", Some(REASON), Some((ACT_REASON, "ETREAT"))),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.body
    );
    assert_eq!(
        reply.body["issue"][0]["expression"][0],
        "Parameters.parameter[0].valueIdentifier.value"
    );
    assert!(!reply.body.to_string().contains("9434765918"));
    // Nothing was disclosed by any of them.
    assert!(
        break_glass_events(&gw, PATIENT, "trust-rx1")
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lr_2_needs_the_system_read_scope() {
    let gw = gateway();
    submit(&gw, "gp-a81001", &record("medication-request.json")).await;
    // The pharmacy's token carries only medication scopes.
    let reply = break_glass(
        &gw,
        "pharmacy-fa123",
        &parameters(PATIENT, Some(REASON), Some((ACT_REASON, "ETREAT"))),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    assert_eq!(reply.issue_code(), "forbidden");
    assert!(reply.body.to_string().contains("system/*.rs"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lr_2_partner_whose_agreement_does_not_permit_break_glass_gets_nothing() {
    let gw = gateway();
    submit(&gw, "gp-a81001", &record("patient-registration.json")).await;
    // The council is party to the social-care agreement, which covers Patient records but does
    // not permit break-glass: no permit applies (LR-1), so nothing is disclosed.
    let reply = emergency(&gw, "council-e08000012", PATIENT).await;
    assert!(disclosed(&reply).is_empty(), "{}", reply.body);
    // The trust, under an agreement that permits it, gets the same record.
    let reply = emergency(&gw, "trust-rx1", PATIENT).await;
    assert_eq!(disclosed(&reply).len(), 1, "{}", reply.body);
    // The council's attempt is still a break-glass event for review, naming why it got nothing.
    let events = break_glass_events(&gw, PATIENT, "council-e08000012").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0]["entity"].is_null());
    assert!(rule_ids(&events[0]).contains(&"LR-1"), "{}", events[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_dissent_still_withholds_under_break_glass() {
    let gw = gateway();
    submit(&gw, "gp-a81001", &record("observation-bp.json")).await;
    let before = emergency(&gw, "trust-rx1", PATIENT).await;
    assert_eq!(disclosed(&before).len(), 1, "{}", before.body);
    // The patient dissents from sharing with the trust (FHIR Consent, recorded by the GP).
    submit(&gw, "gp-a81001", &record("consent-dissent-trust-rx1.json")).await;
    let after = emergency(&gw, "trust-rx1", PATIENT).await;
    assert!(disclosed(&after).is_empty(), "{}", after.body);
    let events = break_glass_events(&gw, PATIENT, "trust-rx1").await;
    let last = events.last().unwrap();
    assert!(last["entity"].is_null());
    assert!(rule_ids(last).contains(&"CONSENT-DISSENT"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sens_1_sensitive_record_is_still_withheld_under_break_glass() {
    let gw = gateway();
    submit(&gw, "gp-a81001", &record("observation-bp.json")).await;
    submit(&gw, "gp-a81001", &record("sexual-health-contained.json")).await;
    let reply = emergency(&gw, "trust-rx1", PATIENT).await;
    let resources = disclosed(&reply);
    assert_eq!(resources.len(), 1, "{}", reply.body);
    assert!(resources[0].get("contained").is_none(), "{}", reply.body);
    assert!(!reply.body.to_string().contains("105629000"));
    let events = break_glass_events(&gw, PATIENT, "trust-rx1").await;
    let request = events.iter().find(|e| e["entity"].is_null()).unwrap();
    assert!(rule_ids(request).contains(&"SENS-1"), "{request}");
    assert!(rule_ids(request).contains(&"LR-2"), "{request}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lr_2_patient_with_no_records_gets_an_empty_bundle_and_the_request_is_audited() {
    let gw = gateway();
    submit(&gw, "gp-a81001", &record("observation-bp.json")).await;
    let reply = emergency(&gw, "trust-rx1", OTHER_PATIENT).await;
    assert!(disclosed(&reply).is_empty(), "{}", reply.body);
    let events = break_glass_events(&gw, OTHER_PATIENT, "trust-rx1").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["purpose_of_use"], "ETREAT");
    assert_eq!(events[0]["patient"], OTHER_PATIENT);
    let detail = events[0]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("break-glass request: 0 records disclosed"),
        "{detail}"
    );
    assert!(detail.contains(REASON), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capability_statement_advertises_break_glass_on_patient() {
    let gw = gateway();
    let reply = gw
        .send(Method::GET, "/fhir/metadata", None, None, &[])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let patient = reply.body["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Patient")
        .unwrap()
        .clone();
    assert_eq!(patient["operation"][0]["name"], "break-glass", "{patient}");
}

/// A gateway process started on an existing config with its log (at `debug`) going to a file,
/// killed when dropped.
struct LoggingGateway {
    child: Child,
    base_url: String,
    client: reqwest::Client,
}

impl LoggingGateway {
    fn start(gw: &Gateway, log: &std::path::Path) -> Self {
        let mut child = Command::new(binary())
            .args(["serve", "--config"])
            .arg(&gw.config_path)
            .env("CAREGATE_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let base_url = lines
            .by_ref()
            .map(Result::unwrap)
            .find_map(|line| {
                line.strip_prefix("caregate listening on ")
                    .map(str::to_owned)
            })
            .unwrap();
        std::thread::spawn(move || for _ in lines {});
        let pem = std::fs::read(gw.data_dir().join("dev-certificate.pem")).unwrap();
        Self {
            child,
            base_url,
            client: client_trusting(&pem),
        }
    }
}

impl Drop for LoggingGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lr_2_neither_the_nhs_number_nor_the_reason_is_logged() {
    let mut gw = gateway();
    submit(&gw, "gp-a81001", &record("observation-bp.json")).await;
    assert!(gw.terminate().await);
    let trust = gw.partner("trust-rx1");
    let log = gw.dir.path().join("debug.log");
    let logging = LoggingGateway::start(&gw, &log);
    let token_url = format!("{}/auth/token", logging.base_url);
    let assertion = trust.key.sign_assertion(&trust.id, &token_url);
    let token: Value = logging
        .client
        .post(&token_url)
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
            ("scope", "system/*.cruds"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap();
    let url = format!("{}/fhir/Patient/$break-glass", logging.base_url);
    for body in [
        parameters(PATIENT, Some(REASON), Some((ACT_REASON, "ETREAT"))),
        parameters(PATIENT, Some(REASON), Some((ACT_REASON, "TREAT"))),
    ] {
        let status = logging
            .client
            .post(&url)
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .status();
        assert!(status == StatusCode::OK || status == StatusCode::BAD_REQUEST);
    }
    drop(logging);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("break-glass request answered"), "{text}");
    assert!(
        !text.contains(PATIENT),
        "the NHS number is in the log:\n{text}"
    );
    assert!(
        !text.contains("road traffic"),
        "the reason is in the log:\n{text}"
    );
}
