//! Delivery operations through the real binary (issues 4 and 3): the `[delivery]` section, the
//! operators' admin API (status, dead letters, replay; the National Data Opt-out list), the CLI
//! refusing to write beside a running gateway, push over mTLS with the gateway-wide identity,
//! SIGTERM waiting for the push in flight, and a consent withdrawal between intake and delivery
//! under the shipped policy bundle.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::path::Path;
use std::time::Duration;

use caregate_audit::{Action, Actor, AuditEvent, Outcome};
use caregate_deliver::keys::idempotency_key;
use caregate_e2e::{Gateway, Options, TestPartner, default_partners, workspace_root};
use caregate_store::sqlite::{SqliteOptions, SqliteStore};
use caregate_store::{Store as _, Submission};
use caregate_testkit::keys::PartnerKey;
use caregate_testkit::partner_server::{Mode, PartnerServer, TestCa};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(60);

/// Fast delivery timings, so retries after an outage happen within a test's patience.
const FAST_DELIVERY: &str = "[delivery]\npoll_interval_ms = 50\nbackoff_base_ms = 50\nbackoff_max_secs = 1\nbreaker_failures = 3\nbreaker_open_secs = 1\n";

/// An IG partner system: its tokens may use the admin API (`roles = ["ig-officer"]`). `icb-qe1`
/// is in the shipped policy's ICS model, so it also works with `[policy]`.
fn ig_partner() -> TestPartner {
    TestPartner::new(
        "icb-qe1",
        "QE1",
        "icb",
        &["system/AuditEvent.rs"],
        PartnerKey::generate_es256("icb-ig-key-1"),
    )
}

fn partners_with_ig() -> Vec<TestPartner> {
    let mut partners = default_partners();
    partners.push(ig_partner());
    partners
}

fn push_line(partner: &PartnerServer) -> String {
    format!(
        "delivery = {{ mode = \"push\", endpoint = \"{}\", ca_cert = \"partner-ca.pem\", timeout_secs = 10 }}",
        partner.base_url()
    )
}

fn ig_role() -> (String, String) {
    ("icb-qe1".into(), "roles = [\"ig-officer\"]".into())
}

/// A call to the admin listener: (status, request id, JSON body).
async fn admin(
    gw: &Gateway,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> (StatusCode, String, Value) {
    let url = format!("{}{path}", gw.admin_url.as_deref().unwrap());
    let mut request = gw.client.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some((content_type, bytes)) = body {
        request = request.header("content-type", content_type).body(bytes);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.unwrap_or_default();
    (
        status,
        request_id,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn replay(gw: &Gateway, token: &str, body: &Value) -> (StatusCode, String, Value) {
    admin(
        gw,
        Method::POST,
        "/admin/deliveries/replay",
        Some(token),
        Some(("application/json", body.to_string().into_bytes())),
    )
    .await
}

/// Poll the admin status of one destination until `check` holds.
async fn wait_for_status(gw: &Gateway, token: &str, partner: &str, check: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, _, body) = admin(
            gw,
            Method::GET,
            &format!("/admin/deliveries/status?partner={partner}"),
            Some(token),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let destination = &body["destinations"][0];
        if check(destination) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out; last status {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run the `caregate` CLI: (exit code, stdout, stderr).
fn caregate(args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(caregate_e2e::binary())
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn stopped_store(gw: &mut Gateway) -> SqliteStore {
    assert!(gw.terminate().await, "caregate exits 0 after SIGTERM");
    SqliteStore::open(&gw.data_dir(), SqliteOptions::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_over_the_admin_api_audited_and_the_cli_refuses_while_running()
 {
    let partner = PartnerServer::start().await;
    partner.set_mode(Mode::Reject(422));
    let mut gw = Gateway::start_configured(Options {
        partners: partners_with_ig(),
        extra_toml: FAST_DELIVERY.into(),
        partner_extra: vec![("trust-rx1".into(), push_line(&partner)), ig_role()],
        files: vec![("partner-ca.pem".into(), partner.ca_pem().to_owned())],
        ..Options::default()
    });
    gw.kill();
    let seqs = caregate_e2e::commit_routed_observations(&gw.data_dir(), 2, &["trust-rx1"]).await;
    gw.launch();
    let ig = gw.token("icb-qe1").await;
    let gp = gw.token("gp-a81001").await;
    let mut admin_requests = Vec::new();

    // The admin listener's authentication applies.
    let (status, id, _) = admin(&gw, Method::GET, "/admin/deliveries/status", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    admin_requests.push(id);
    let (status, id, body) = admin(
        &gw,
        Method::GET,
        "/admin/deliveries/dead-letters",
        Some(&gp),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    admin_requests.push(id);
    let (status, id, body) = replay(&gw, &gp, &json!({ "partner": "trust-rx1" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    admin_requests.push(id);

    wait_for_status(&gw, &ig, "trust-rx1", |d| d["dead"] == 2).await;
    let (status, id, body) = admin(
        &gw,
        Method::GET,
        "/admin/deliveries/dead-letters?partner=trust-rx1&limit=10",
        Some(&ig),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    admin_requests.push(id);
    let letters = body["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2, "{body}");
    assert_eq!(letters[0]["seq"], seqs[0]);
    assert_eq!(letters[0]["status"], 422);
    assert!(
        letters[0]["response"]
            .as_str()
            .unwrap()
            .contains("rejected by the test partner")
    );
    assert!(
        !body.to_string().contains("9434765919"),
        "no record content in the listing"
    );
    let first_id = letters[0]["id"].as_i64().unwrap();

    // Bad input: each a clear 400.
    for path in [
        "/admin/deliveries/dead-letters?limit=0",
        "/admin/deliveries/dead-letters?after=-3",
        "/admin/deliveries/dead-letters?partnr=trust-rx1",
        "/admin/deliveries/status?partner=no%20such",
    ] {
        let (status, id, body) = admin(&gw, Method::GET, path, Some(&ig), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(body["issue"][0]["diagnostics"].is_string(), "{body}");
        admin_requests.push(id);
    }
    for bad in [
        json!({}),
        json!({ "id": 1, "partner": "trust-rx1" }),
        json!({ "ids": [1] }),
    ] {
        let (status, id, body) = replay(&gw, &ig, &bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        admin_requests.push(id);
    }
    let (status, id, _) = replay(&gw, &ig, &json!({ "id": first_id + 1000 })).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not a dead letter");
    admin_requests.push(id);

    // The offline command refuses to write beside the running gateway and says what to do.
    let data = gw.data_dir();
    let data = data.to_str().unwrap();
    let (code, _, err) = caregate(&[
        "deliveries",
        "replay",
        "--data",
        data,
        &first_id.to_string(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("in use by a running gateway"), "{err}");
    assert!(err.contains("POST /admin/deliveries/replay"), "{err}");
    assert!(err.contains(&format!("{{\"id\": {first_id}}}")), "{err}");

    // Replay one by id, then the rest by partner, over the admin API.
    partner.set_mode(Mode::Accept);
    let (status, replay_one, body) = replay(&gw, &ig, &json!({ "id": first_id })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["replayed"], 1);
    let first_key = idempotency_key(seqs[0], "trust-rx1");
    assert!(
        partner
            .wait_until(PATIENCE, |received| received.iter().any(
                |r| r.accepted() && r.key.as_deref() == Some(first_key.as_str())
            ))
            .await
    );
    let (status, replay_partner, body) = replay(&gw, &ig, &json!({ "partner": "trust-rx1" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["replayed"], 1, "only the one still dead");
    wait_for_status(&gw, &ig, "trust-rx1", |d| {
        d["delivered"] == 2 && d["dead"] == 0 && d["pending"] == 0
    })
    .await;

    let store = stopped_store(&mut gw).await;
    let events = store.read_audit(0, 100_000).await.unwrap();
    for request_id in admin_requests.iter().chain([&replay_one, &replay_partner]) {
        let count = events
            .iter()
            .filter(|e| &e.event.request_id == request_id)
            .count();
        assert_eq!(
            count, 1,
            "admin request {request_id}: exactly one audit event"
        );
    }
    let replays: Vec<_> = events
        .iter()
        .filter(|e| e.event.action == Action::DeliveryReplay && e.event.outcome == Outcome::Success)
        .map(|e| &e.event)
        .collect();
    assert_eq!(replays.len(), 2, "{replays:?}");
    assert_eq!(replays[0].request_id, replay_one);
    assert_eq!(replays[0].actor.partner_id.as_deref(), Some("icb-qe1"));
    assert_eq!(
        replays[0].detail.as_deref(),
        Some(format!("replay dead letter {first_id}").as_str())
    );
    assert_eq!(
        replays[1].detail.as_deref(),
        Some("replay dead letters of trust-rx1")
    );
    store.close().await.unwrap();

    // With the gateway stopped the command runs (nothing is dead any more: exit 1).
    let (code, out, err) = caregate(&[
        "deliveries",
        "replay",
        "--data",
        data,
        "--partner",
        "trust-rx1",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("0 dead letters queued again"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_the_push_in_flight_and_records_it() {
    let partner = PartnerServer::start().await;
    let mut gw = Gateway::start_configured(Options {
        partners: default_partners(),
        extra_toml: FAST_DELIVERY.into(),
        partner_extra: vec![("trust-rx1".into(), push_line(&partner))],
        files: vec![("partner-ca.pem".into(), partner.ca_pem().to_owned())],
        ..Options::default()
    });
    gw.kill();
    let seqs = caregate_e2e::commit_routed_observations(&gw.data_dir(), 1, &["trust-rx1"]).await;
    partner.set_mode(Mode::Delay(Duration::from_secs(3)));
    gw.launch();
    assert!(
        partner
            .wait_until(PATIENCE, |received| !received.is_empty())
            .await,
        "the push started"
    );
    // The partner is still answering when the gateway is told to stop: the attempt must finish
    // and be recorded as delivered before the process exits, not be sent again after a restart.
    let store = stopped_store(&mut gw).await;
    let status = store.delivery_status(Some("trust-rx1")).await.unwrap();
    assert_eq!(
        (status[0].delivered, status[0].pending),
        (1, 0),
        "{status:?}"
    );
    let events = store.read_audit(0, 10_000).await.unwrap();
    let key = idempotency_key(seqs[0], "trust-rx1");
    assert!(
        events
            .iter()
            .any(|e| e.event.action == Action::Deliver && e.event.request_id == key),
        "the delivery is audited"
    );
    store.close().await.unwrap();
    assert_eq!(partner.received().len(), 1, "sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_over_mtls_uses_the_gateway_wide_client_certificate() {
    let client_ca = TestCa::new("caregate client CA");
    let identity = client_ca.issue_client("caregate.example-ics.nhs.uk");
    let partner = PartnerServer::start_with(Some(client_ca.pem())).await;
    let mut gw = Gateway::start_configured(Options {
        partners: default_partners(),
        extra_toml: format!(
            "{FAST_DELIVERY}client_cert = \"client-cert.pem\"\nclient_key = \"client-key.pem\"\n"
        ),
        partner_extra: vec![("trust-rx1".into(), push_line(&partner))],
        files: vec![
            ("partner-ca.pem".into(), partner.ca_pem().to_owned()),
            ("client-cert.pem".into(), identity.cert_pem.clone()),
            ("client-key.pem".into(), identity.key_pem.clone()),
        ],
        ..Options::default()
    });
    gw.kill();
    let seqs = caregate_e2e::commit_routed_observations(&gw.data_dir(), 2, &["trust-rx1"]).await;
    gw.launch();
    let keys: Vec<String> = seqs
        .iter()
        .map(|seq| idempotency_key(*seq, "trust-rx1"))
        .collect();
    assert!(
        partner
            .wait_until(PATIENCE, |received| received
                .iter()
                .filter(|r| r.accepted())
                .count()
                >= 2)
            .await,
        "delivered over mTLS"
    );
    let mut accepted = partner.accepted_keys();
    accepted.sort();
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(accepted, expected);
    assert_eq!(partner.handshake_failures(), 0);
    gw.kill();

    // A key that is not the certificate's: refused at start-up, naming the partner and files.
    let other = client_ca.issue_client("someone else");
    std::fs::write(gw.dir.path().join("client-key.pem"), &other.key_pem).unwrap();
    let output = std::process::Command::new(caregate_e2e::binary())
        .args(["serve", "--config"])
        .arg(&gw.config_path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        err.contains("trust-rx1") && err.contains("does not belong"),
        "{err}"
    );
}

fn policy_record(name: &str) -> Value {
    let path = workspace_root().join("policies/tests/records").join(name);
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    value.as_object_mut().unwrap().remove("id");
    value
}

/// DESIGN.md invariant 2 with the shipped policy: the GP's Observation is allowed at intake for
/// the trust (care relationship, `LR-1`) whose push endpoint is down; the patient then dissents
/// from sharing with the trust (a FHIR Consent, provision deny for ODS RX1, submitted by the GP);
/// when the trust comes back the record is not delivered, and a Withhold event names
/// `CONSENT-DISSENT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_dissent_after_intake_stops_the_push_and_the_withhold_event_names_the_rule() {
    let partner = PartnerServer::start().await;
    partner.set_mode(Mode::Down);
    let policies = workspace_root().join("policies");
    let mut gw = Gateway::start_configured(Options {
        partners: partners_with_ig(),
        extra_toml: format!(
            "{FAST_DELIVERY}\n[policy]\ndir = \"{}\"\n",
            policies.display()
        ),
        partner_extra: vec![("trust-rx1".into(), push_line(&partner)), ig_role()],
        files: vec![("partner-ca.pem".into(), partner.ca_pem().to_owned())],
        ..Options::default()
    });
    let gp = gw.token("gp-a81001").await;
    let trust = gw.token("trust-rx1").await;
    let ig = gw.token("icb-qe1").await;
    let registration = gw
        .post(
            "/fhir/Patient",
            &gp,
            &policy_record("patient-registration.json"),
        )
        .await;
    assert_eq!(
        registration.status,
        StatusCode::CREATED,
        "{}",
        registration.body
    );
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
    let observation = gw
        .post(
            "/fhir/Observation",
            &gp,
            &policy_record("observation-bp.json"),
        )
        .await;
    assert_eq!(
        observation.status,
        StatusCode::CREATED,
        "{}",
        observation.body
    );

    // Allowed at intake: queued for the trust, which is down.
    wait_for_status(&gw, &ig, "trust-rx1", |d| {
        d["pending"] == 1 && d["last_failure"].is_object()
    })
    .await;

    // The patient's dissent from sharing with the trust, recorded by the GP.
    let dissent = gw
        .post(
            "/fhir/Consent",
            &gp,
            &policy_record("consent-dissent-trust-rx1.json"),
        )
        .await;
    assert_eq!(dissent.status, StatusCode::CREATED, "{}", dissent.body);

    // The trust comes back: the record is withheld, not sent.
    partner.set_mode(Mode::Accept);
    wait_for_status(&gw, &ig, "trust-rx1", |d| {
        d["withheld"] == 1 && d["pending"] == 0
    })
    .await;
    assert!(
        partner.accepted_keys().is_empty(),
        "the trust received nothing: {:?}",
        partner.received()
    );

    let (status, _, body) = admin(
        &gw,
        Method::GET,
        "/admin/audit/events?action=withhold&partner=trust-rx1",
        Some(&ig),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{body}");
    let event = &events[0]["event"];
    assert_eq!(event["rule_ids"], json!(["CONSENT-DISSENT"]), "{event}");
    assert_eq!(event["patient"], "9434765919");
    assert_eq!(event["entity"]["resource_type"], "Observation");
    assert!(
        event["detail"]
            .as_str()
            .unwrap()
            .starts_with("withheld at delivery:"),
        "{event}"
    );
    assert!(gw.terminate().await);
}

/// The feed decision stored with the Observation committed at `seq`: (included, rule ids).
fn feed_decision(entry: &caregate_store::LogEntry) -> (bool, Vec<String>) {
    let decision: Value = serde_json::from_slice(entry.decision.as_deref().unwrap()).unwrap();
    let feed = decision["feeds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feed"] == "icb-qe1-population-health")
        .unwrap()
        .clone();
    (
        feed["included"].as_bool().unwrap(),
        serde_json::from_value(feed["rule_ids"].clone()).unwrap(),
    )
}

/// `NDOO-1`/`NDOO-6`: an uploaded list is validated whole, installed and applied at once (the
/// next decision reads it), reported without NHS numbers, and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndoo_1_list_uploaded_over_the_admin_api_applies_at_once_and_is_audited() {
    let policies = workspace_root().join("policies");
    let mut gw = Gateway::start_configured(Options {
        partners: partners_with_ig(),
        extra_toml: format!(
            "[policy]\ndir = \"{}\"\nndoo_list = \"ndoo.txt\"\n",
            policies.display()
        ),
        partner_extra: vec![ig_role()],
        files: vec![("ndoo.txt".into(), "9000000009\n".into())],
        ..Options::default()
    });
    let ig = gw.token("icb-qe1").await;
    let trust = gw.token("trust-rx1").await;
    let gp = gw.token("gp-a81001").await;
    let ndoo = "/admin/consent/ndoo";

    let (status, _, body) = admin(&gw, Method::GET, ndoo, Some(&ig), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["entries"], 1);
    assert_eq!(body["state"], "fresh");
    assert_eq!(body["stale"], false);
    assert_eq!(body["max_age_days"], 28);
    assert!(body["loaded_at"].is_string());
    assert!(!body.to_string().contains("9000000009"), "{body}");

    // Before the upload the patient is not opted out: the Observation enters the ICB feed.
    let before = gw
        .post(
            "/fhir/Observation",
            &trust,
            &policy_record("observation-bp.json"),
        )
        .await;
    assert_eq!(before.status, StatusCode::CREATED, "{}", before.body);

    // Refused uploads change nothing and never echo a number.
    let put = |token: String, content_type: &'static str, text: &'static str| {
        let gw = &gw;
        async move {
            admin(
                gw,
                Method::PUT,
                ndoo,
                Some(&token),
                Some((content_type, text.as_bytes().to_vec())),
            )
            .await
        }
    };
    let (status, _, body) = put(ig.clone(), "text/plain", "9434765919\n9434765918\n").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(message.contains("line 2"), "{message}");
    assert!(!message.contains("9434765918"), "{message}");
    let (status, _, _) = put(ig.clone(), "application/json", "9434765919\n").await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, _, _) = put(gp.clone(), "text/plain", "9434765919\n").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "partners without the role");
    let (status, _, body) = admin(&gw, Method::GET, ndoo, Some(&ig), None).await;
    assert_eq!(
        (status, body["entries"].clone()),
        (StatusCode::OK, json!(1))
    );

    // The new list, in the national service's format (CRLF, a blank line).
    let list = "9434765919\r\n\r\n9000000009\r\n";
    let (status, upload_id, body) = put(ig.clone(), "text/plain", list).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["entries"], 2);
    assert_eq!(body["state"], "fresh");
    assert_eq!(
        std::fs::read_to_string(gw.dir.path().join("ndoo.txt")).unwrap(),
        list,
        "installed as the configured ndoo_list (survives a restart)"
    );

    // Applied at once: the next decision excludes the patient from secondary use (NDOO-1).
    let mut again = policy_record("observation-bp.json");
    again["effectiveDateTime"] = json!("2025-05-31T10:00:00Z");
    let after = gw.post("/fhir/Observation", &trust, &again).await;
    assert_eq!(after.status, StatusCode::CREATED, "{}", after.body);

    let store = stopped_store(&mut gw).await;
    let observations: Vec<_> = store
        .read_log(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|entry| entry.resource_type == "Observation")
        .collect();
    assert_eq!(observations.len(), 2);
    assert!(feed_decision(&observations[0]).0, "before the upload");
    let (included, rules) = feed_decision(&observations[1]);
    assert!(!included, "after the upload");
    assert!(rules.contains(&"NDOO-1".to_owned()), "{rules:?}");

    let events = store.read_audit(0, 100_000).await.unwrap();
    let uploads: Vec<_> = events
        .iter()
        .map(|e| &e.event)
        .filter(|e| e.action == Action::PolicyReload)
        .collect();
    assert_eq!(
        uploads.len(),
        3,
        "each upload that reached the handler is one policy-reload event: {uploads:?}"
    );
    let accepted = uploads.iter().find(|e| e.request_id == upload_id).unwrap();
    assert_eq!(accepted.outcome, Outcome::Success);
    assert_eq!(accepted.actor.partner_id.as_deref(), Some("icb-qe1"));
    assert_eq!(
        accepted.detail.as_deref(),
        Some("NDOO list installed and applied: 2 NHS numbers")
    );
    assert!(
        uploads.iter().any(|e| e.outcome == Outcome::Rejected
            && e.detail.as_deref().unwrap_or("").contains("line 2")),
        "{uploads:?}"
    );
    for event in &events {
        let text = serde_json::to_string(&event.event).unwrap();
        assert!(
            !text.contains("9434765918"),
            "a refused number was recorded: {text}"
        );
    }
    store.close().await.unwrap();
}

/// A PHC hash with small Argon2id parameters, so debug-build sign-ins stay quick.
fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let params = argon2::Params::new(256, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"caregate-e2e-salt").unwrap();
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// The value of the first hidden `csrf` field of a console page.
fn hidden_csrf(html: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = html.find(marker).expect("a CSRF field") + marker.len();
    let end = start + html[start..].find('"').unwrap();
    html[start..end].to_owned()
}

/// An IG officer's console session: cookies kept by hand, the session's CSRF token.
struct OfficerSession {
    base: String,
    client: reqwest::Client,
    cookies: Vec<(String, String)>,
}

impl OfficerSession {
    async fn send(&mut self, request: reqwest::RequestBuilder) -> (StatusCode, String) {
        let cookie = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let request = if cookie.is_empty() {
            request
        } else {
            request.header(reqwest::header::COOKIE, cookie)
        };
        let response = request.send().await.unwrap();
        for value in response.headers().get_all(reqwest::header::SET_COOKIE) {
            let text = value.to_str().unwrap();
            let pair = text.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            self.cookies.retain(|(k, _)| k != name);
            if !value.is_empty() {
                self.cookies.push((name.to_owned(), value.to_owned()));
            }
        }
        let status = response.status();
        (status, response.text().await.unwrap_or_default())
    }

    /// Sign in as `alice`; returns the session's CSRF token (from a console page).
    async fn sign_in(gw: &Gateway, password: &str) -> (Self, String) {
        let pem = std::fs::read(gw.data_dir().join("dev-certificate.pem")).unwrap();
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let mut session = Self {
            base: gw.admin_url.clone().unwrap(),
            client,
            cookies: Vec::new(),
        };
        let (_, form) = session
            .send(
                session
                    .client
                    .get(format!("{}/console/login", session.base)),
            )
            .await;
        let login_csrf = hidden_csrf(&form);
        let (status, _) = session
            .send(
                session
                    .client
                    .post(format!("{}/console/login", session.base))
                    .form(&[
                        ("csrf", login_csrf.as_str()),
                        ("username", "alice"),
                        ("password", password),
                    ]),
            )
            .await;
        assert_eq!(status, StatusCode::SEE_OTHER, "signed in");
        let (status, page) = session
            .send(
                session
                    .client
                    .get(format!("{}/console/reviews", session.base)),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let csrf = hidden_csrf(&page);
        (session, csrf)
    }

    async fn replay(&mut self, id: i64, csrf: Option<&str>) -> (StatusCode, String) {
        let mut request = self
            .client
            .post(format!("{}/admin/deliveries/replay", self.base))
            .header("content-type", "application/json")
            .body(json!({ "id": id }).to_string());
        if let Some(csrf) = csrf {
            request = request.header("x-csrf-token", csrf);
        }
        self.send(request).await
    }
}

/// One emergency access in the audit log, so the console's review queue shows a form carrying
/// the session's CSRF token (the console exposes the token only in its forms).
async fn seed_break_glass(data: &Path) {
    let store = SqliteStore::open(data, SqliteOptions::default()).unwrap();
    let mut event = AuditEvent::new(
        "req-btg",
        Actor {
            partner_id: Some("trust-rx1".into()),
            ods_code: Some("RX1".into()),
            ..Actor::default()
        },
        Action::Read,
        Outcome::Success,
    );
    event.purpose_of_use = Some("ETREAT".into());
    event.entity = Some(caregate_audit::Entity {
        resource_type: "Patient".into(),
        id: "p1".into(),
        version_id: Some(1),
        content_hash: None,
    });
    store
        .submit(Submission {
            partner: "trust-rx1".into(),
            idempotency_key: None,
            records: vec![],
            audit: vec![event],
        })
        .await
        .unwrap();
    store.close().await.unwrap();
}

/// On a console session (an ambient cookie), a state-changing operators' request needs the
/// session's CSRF token; reads do not. The replay's audit event names the officer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn officer_session_replay_needs_the_csrf_token_and_names_the_officer() {
    const PASSWORD: &str = "correct horse battery staple";
    let partner = PartnerServer::start().await;
    partner.set_mode(Mode::Reject(422));
    let mut gw = Gateway::start_configured(Options {
        partners: default_partners(),
        extra_toml: format!(
            "{FAST_DELIVERY}\n[[ig_officer]]\nusername = \"alice\"\npassword_hash = \"{}\"\nname = \"Alice Example\"\nods_code = \"QWO\"\n",
            cheap_hash(PASSWORD)
        ),
        partner_extra: vec![("trust-rx1".into(), push_line(&partner))],
        files: vec![("partner-ca.pem".into(), partner.ca_pem().to_owned())],
        ..Options::default()
    });
    gw.kill();
    caregate_e2e::commit_routed_observations(&gw.data_dir(), 1, &["trust-rx1"]).await;
    seed_break_glass(&gw.data_dir()).await;
    gw.launch();
    let (mut officer, csrf) = OfficerSession::sign_in(&gw, PASSWORD).await;
    let id = loop {
        let (status, body) = officer
            .send(officer.client.get(format!(
                "{}/admin/deliveries/dead-letters?partner=trust-rx1",
                officer.base
            )))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        if let Some(id) = body["dead_letters"][0]["id"].as_i64() {
            break id;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (status, body) = officer.replay(id, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("X-CSRF-Token"), "{body}");
    let (status, _) = officer.replay(id, Some("forged")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = officer
        .send(
            officer
                .client
                .put(format!("{}/admin/consent/ndoo", officer.base))
                .header("content-type", "text/plain")
                .body("9434765919\n"),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "no CSRF token: {body}");

    partner.set_mode(Mode::Accept);
    let (status, body) = officer.replay(id, Some(&csrf)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        partner
            .wait_until(PATIENCE, |received| received.iter().any(|r| r.accepted()))
            .await
    );

    let store = stopped_store(&mut gw).await;
    let events = store.read_audit(0, 100_000).await.unwrap();
    let replays: Vec<_> = events
        .iter()
        .map(|e| &e.event)
        .filter(|e| e.action == Action::DeliveryReplay && e.outcome == Outcome::Success)
        .collect();
    assert_eq!(replays.len(), 1, "{replays:?}");
    assert_eq!(
        replays[0].actor.client_id.as_deref(),
        Some("ig-officer/alice")
    );
    assert_eq!(replays[0].actor.ods_code.as_deref(), Some("QWO"));
    assert_eq!(replays[0].status, Some(200));
    store.close().await.unwrap();
}

/// Issue 3: the policy bundle hot-reloads by an admin call as well as SIGHUP. A broken bundle is
/// refused with its file named and the bundle in force stays; a valid change is a new version;
/// partners without the operator role cannot reload; every attempt is an audited event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reload_over_the_admin_api_refuses_a_broken_bundle_and_takes_a_valid_one() {
    let bundle = tempfile::tempdir().unwrap();
    for (from, to) in [
        (
            workspace_root().join("policies"),
            bundle.path().to_path_buf(),
        ),
        (
            workspace_root().join("policies/sensitive-codes"),
            bundle.path().join("sensitive-codes"),
        ),
    ] {
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(&from).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
            }
        }
    }
    let mut gw = Gateway::start_configured(Options {
        partners: partners_with_ig(),
        extra_toml: format!("[policy]\ndir = \"{}\"\n", bundle.path().display()),
        partner_extra: vec![ig_role()],
        ..Options::default()
    });
    let ig = gw.token("icb-qe1").await;
    let gp = gw.token("gp-a81001").await;
    let reload = "/admin/policy/reload";

    let (status, _, body) = admin(&gw, Method::POST, reload, Some(&ig), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let first = body["version"].as_str().unwrap().to_owned();
    assert!(first.starts_with("sha256:"), "{body}");

    let cedar = bundle.path().join("20-direct-care.cedar");
    let good = std::fs::read_to_string(&cedar).unwrap();
    std::fs::write(&cedar, good.replacen("principal", "princpal", 1)).unwrap();
    let (status, _, body) = admin(&gw, Method::POST, reload, Some(&ig), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["reloaded"], false);
    assert_eq!(body["version"], first.as_str(), "the bundle in force stays");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("20-direct-care.cedar"),
        "{body}"
    );

    let (status, _, _) = admin(&gw, Method::POST, reload, Some(&gp), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "partners without the role");

    std::fs::write(&cedar, format!("{good}\n// reviewed by the ICS IG group\n")).unwrap();
    let (status, _, body) = admin(&gw, Method::POST, reload, Some(&ig), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = body["version"].as_str().unwrap();
    assert_ne!(second, first, "a changed bundle is a new version");

    let store = stopped_store(&mut gw).await;
    let reloads: Vec<_> = store
        .read_audit(0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .filter(|e| e.action == Action::PolicyReload)
        .collect();
    assert_eq!(reloads.len(), 3, "{reloads:?}");
    assert_eq!(
        reloads
            .iter()
            .filter(|e| e.outcome == caregate_audit::Outcome::Success)
            .count(),
        2
    );
    store.close().await.unwrap();
}
