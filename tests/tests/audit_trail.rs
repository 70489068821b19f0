//! Invariant 4 (DESIGN.md), as far as intake goes: every request — allowed or denied,
//! authenticated or not — leaves an audit event, written durably before its response; failed
//! calls are recorded in the same detail (DOMAIN.md `AUD-3`), and no event is written twice.

use std::collections::HashMap;

use caregate_audit::{Action, Outcome};
use caregate_e2e::{Gateway, patient};
use caregate_store::Store as _;
use caregate_store::sqlite::{SqliteOptions, SqliteStore};
use reqwest::Method;

#[tokio::test]
async fn aud_3_every_request_is_audited_once_with_its_outcome() {
    let mut gw = Gateway::start();
    let token = gw.token("gp-a81001").await;
    let body = |nhs: &str| Some(patient(nhs).to_string().into_bytes());
    let mut sent: Vec<(&str, u16)> = Vec::new();
    type Case<'a> = (&'a str, Option<&'a str>, Method, &'a str, Option<Vec<u8>>);
    let cases: Vec<Case<'_>> = vec![
        (
            "req-created",
            Some(&token),
            Method::POST,
            "/fhir/Patient",
            body("9434765919"),
        ),
        (
            "req-no-token",
            None,
            Method::POST,
            "/fhir/Patient",
            body("9434765919"),
        ),
        (
            "req-bad-nhs",
            Some(&token),
            Method::POST,
            "/fhir/Patient",
            body("9434765918"),
        ),
        (
            "req-not-found",
            Some(&token),
            Method::GET,
            "/fhir/Patient/missing",
            None,
        ),
        ("req-metadata", None, Method::GET, "/fhir/metadata", None),
        (
            "req-no-route",
            Some(&token),
            Method::GET,
            "/admin/secrets",
            None,
        ),
    ];
    for (request_id, bearer, method, path, payload) in cases {
        let reply = gw
            .send(
                method,
                path,
                bearer,
                payload,
                &[("x-request-id", request_id)],
            )
            .await;
        sent.push((request_id, reply.status.as_u16()));
    }
    assert!(gw.terminate().await, "caregate exits 0 after SIGTERM");

    let store = SqliteStore::open(&gw.data_dir(), SqliteOptions::default()).unwrap();
    let events = store.read_audit(0, 10_000).await.unwrap();
    let mut by_request: HashMap<String, Vec<_>> = HashMap::new();
    for stored in &events {
        by_request
            .entry(stored.event.request_id.clone())
            .or_default()
            .push(stored.event.clone());
    }
    for (request_id, status) in &sent {
        let events = by_request
            .get(*request_id)
            .unwrap_or_else(|| panic!("{request_id} was not audited"));
        assert_eq!(
            events.len(),
            1,
            "{request_id}: exactly one event, got {events:?}"
        );
        let event = &events[0];
        let expected = Outcome::from_status(*status);
        assert_eq!(event.outcome, expected, "{request_id}");
        if let Some(recorded) = event.status {
            assert_eq!(recorded, *status, "{request_id}");
        }
    }
    let created = &by_request["req-created"][0];
    assert_eq!(created.action, Action::Create);
    assert_eq!(created.actor.partner_id.as_deref(), Some("gp-a81001"));
    assert_eq!(created.actor.ods_code.as_deref(), Some("A81001"));
    assert_eq!(created.patient.as_deref(), Some("9434765919"));
    assert!(
        created
            .entity
            .as_ref()
            .is_some_and(|e| e.resource_type == "Patient" && e.content_hash.is_some())
    );
    let rejected = &by_request["req-bad-nhs"][0];
    assert_eq!(
        (rejected.outcome, rejected.status),
        (Outcome::Rejected, Some(422))
    );
    assert_eq!(
        rejected.actor.partner_id.as_deref(),
        Some("gp-a81001"),
        "the failed call names who made it"
    );
    let anonymous = &by_request["req-no-token"][0];
    assert_eq!(
        (anonymous.outcome, anonymous.status),
        (Outcome::Rejected, Some(401))
    );
    assert!(anonymous.actor.remote_addr.is_some());
    // Token requests are audited too, with the client id they claimed.
    assert!(events.iter().any(|e| e.event.action == Action::TokenRequest
        && e.event.actor.client_id.as_deref() == Some("gp-a81001")
        && e.event.outcome == Outcome::Success));
}

/// DOMAIN.md B2 `T1` end to end: the audit log a real gateway wrote verifies offline with
/// `caregate audit verify`, and an edit made directly in the database is detected.
#[tokio::test]
async fn t1_audit_verify_passes_then_detects_a_direct_edit() {
    let mut gw = Gateway::start();
    let token = gw.token("gp-a81001").await;
    for _ in 0..5 {
        gw.post("/fhir/Patient", &token, &patient("9434765919"))
            .await;
    }
    assert!(gw.terminate().await);
    let data = gw.data_dir();
    let verify = || {
        std::process::Command::new(caregate_e2e::binary())
            .args(["audit", "verify", "--data"])
            .arg(&data)
            .output()
            .expect("run caregate audit verify")
    };
    let clean = verify();
    let stdout = String::from_utf8_lossy(&clean.stdout).to_string();
    assert!(
        clean.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(stdout.contains("VERIFIED"), "{stdout}");

    let conn = rusqlite::Connection::open(data.join("caregate.db")).unwrap();
    conn.execute(
        "UPDATE audit_events SET event = replace(event, 'success', 'rejected') WHERE seq = 3",
        [],
    )
    .unwrap();
    drop(conn);
    let tampered = verify();
    let stdout = String::from_utf8_lossy(&tampered.stdout).to_string();
    assert_eq!(tampered.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("first bad:    event 3"), "{stdout}");
}
