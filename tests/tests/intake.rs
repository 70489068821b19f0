//! End-to-end FHIR intake over real TLS against the real binary: create, update, read, Bundles,
//! idempotent retries, and a clear OperationOutcome for every kind of bad input.

use caregate_e2e::{Gateway, observation, patient};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test]
async fn create_then_read_returns_the_durable_record() {
    let gw = Gateway::start();
    let token = gw.token("gp-a81001").await;
    let created = gw
        .post("/fhir/Patient", &token, &patient("9434765919"))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(created.body["meta"]["versionId"], "1");
    assert!(
        created
            .header("location")
            .ends_with(&format!("/fhir/Patient/{id}/_history/1"))
    );
    assert_eq!(created.header("etag"), "W/\"1\"");

    let read = gw
        .send(
            Method::GET,
            &format!("/fhir/Patient/{id}"),
            Some(&token),
            None,
            &[],
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body["identifier"][0]["value"], "9434765919");
    assert_eq!(read.body["meta"]["versionId"], "1");

    // Another partner cannot see it, and gets the same answer as for a missing record (API1).
    let other = gw.token("trust-rx1").await;
    let hidden = gw
        .send(
            Method::GET,
            &format!("/fhir/Patient/{id}"),
            Some(&other),
            None,
            &[],
        )
        .await;
    let missing = gw
        .send(
            Method::GET,
            "/fhir/Patient/does-not-exist",
            Some(&other),
            None,
            &[],
        )
        .await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);
    assert_eq!(hidden.body, missing.body);
}

#[tokio::test]
async fn update_versions_and_identical_update_is_unchanged() {
    let gw = Gateway::start();
    let token = gw.token("trust-rx1").await;
    let mut resource = observation("9434765919", 120.0);
    resource["id"] = json!("bp-1");
    let body = resource.to_string().into_bytes();
    let first = gw
        .send(
            Method::PUT,
            "/fhir/Observation/bp-1",
            Some(&token),
            Some(body.clone()),
            &[],
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let again = gw
        .send(
            Method::PUT,
            "/fhir/Observation/bp-1",
            Some(&token),
            Some(body),
            &[],
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(
        again.header("etag"),
        "W/\"1\"",
        "identical content does not make a new version"
    );

    resource["valueQuantity"]["value"] = json!(135);
    let body = resource.to_string().into_bytes();
    let stale = gw
        .send(
            Method::PUT,
            "/fhir/Observation/bp-1",
            Some(&token),
            Some(body.clone()),
            &[("if-match", "W/\"7\"")],
        )
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    let second = gw
        .send(
            Method::PUT,
            "/fhir/Observation/bp-1",
            Some(&token),
            Some(body),
            &[("if-match", "W/\"1\"")],
        )
        .await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.body["meta"]["versionId"], "2");

    let mismatch = gw
        .send(
            Method::PUT,
            "/fhir/Observation/other",
            Some(&token),
            Some(resource.to_string().into_bytes()),
            &[],
        )
        .await;
    assert_eq!(mismatch.status, StatusCode::BAD_REQUEST);
    assert_eq!(mismatch.body["issue"][0]["expression"][0], "Observation.id");
}

#[tokio::test]
async fn retried_submissions_do_not_duplicate() {
    let gw = Gateway::start();
    let token = gw.token("gp-a81001").await;
    let body = observation("9434765919", 118.0).to_string().into_bytes();
    // Same X-Request-Id: the original result comes back.
    let headers = [("x-request-id", "gp-a81001-msg-0001")];
    let first = gw
        .send(
            Method::POST,
            "/fhir/Observation",
            Some(&token),
            Some(body.clone()),
            &headers,
        )
        .await;
    let retry = gw
        .send(
            Method::POST,
            "/fhir/Observation",
            Some(&token),
            Some(body.clone()),
            &headers,
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(first.header("location"), retry.header("location"));
    assert_eq!(retry.header("x-idempotent-replay"), "true");
    assert_eq!(retry.header("x-request-id"), "gp-a81001-msg-0001");

    // Same content without a request id: also the original result.
    let a = gw
        .send(
            Method::POST,
            "/fhir/Observation",
            Some(&token),
            Some(body.clone()),
            &[],
        )
        .await;
    let b = gw
        .send(
            Method::POST,
            "/fhir/Observation",
            Some(&token),
            Some(body),
            &[],
        )
        .await;
    assert_eq!(a.header("location"), b.header("location"));

    // If-None-Exist on a business identifier.
    let mut with_identifier = patient("9434765919");
    with_identifier["identifier"]
        .as_array_mut()
        .unwrap()
        .push(json!({"system": "https://riverside.example/mrn", "value": "MRN-77"}));
    let conditional = [(
        "if-none-exist",
        "identifier=https://riverside.example/mrn|MRN-77",
    )];
    let bytes = with_identifier.to_string().into_bytes();
    let created = gw
        .send(
            Method::POST,
            "/fhir/Patient",
            Some(&token),
            Some(bytes.clone()),
            &conditional,
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let mut changed = with_identifier.clone();
    changed["gender"] = json!("other");
    let existing = gw
        .send(
            Method::POST,
            "/fhir/Patient",
            Some(&token),
            Some(changed.to_string().into_bytes()),
            &conditional,
        )
        .await;
    assert_eq!(existing.status, StatusCode::OK);
    assert_eq!(existing.body["id"], created.body["id"]);
}

#[tokio::test]
async fn transaction_is_all_or_nothing_and_resolves_urn_references() {
    let gw = Gateway::start();
    let token = gw.token("trust-rx1").await;
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            { "fullUrl": "urn:uuid:4c5f6a1e-0000-4000-8000-000000000001",
              "resource": patient("9434765919"),
              "request": { "method": "POST", "url": "Patient" } },
            { "fullUrl": "urn:uuid:4c5f6a1e-0000-4000-8000-000000000002",
              "resource": {
                "resourceType": "Encounter", "status": "finished",
                "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER" },
                "subject": { "reference": "urn:uuid:4c5f6a1e-0000-4000-8000-000000000001" } },
              "request": { "method": "POST", "url": "Encounter" } }
        ]
    });
    let ok = gw.post("/fhir", &token, &bundle).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(ok.body["type"], "transaction-response");
    let patient_location = ok.body["entry"][0]["response"]["location"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        ok.body["entry"][1]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("201")
    );
    let encounter_location = ok.body["entry"][1]["response"]["location"]
        .as_str()
        .unwrap();
    let encounter_path = encounter_location.split("/_history").next().unwrap();
    let encounter = gw
        .send(
            Method::GET,
            &format!("/fhir/{encounter_path}"),
            Some(&token),
            None,
            &[],
        )
        .await;
    let patient_ref = patient_location.split("/_history").next().unwrap();
    assert_eq!(
        encounter.body["subject"]["reference"], patient_ref,
        "urn:uuid rewritten to the assigned id"
    );

    // One bad entry: nothing is written, and the outcome points into the Bundle.
    bundle["entry"][1]["resource"]["status"] = json!("not-a-status");
    bundle["entry"][0]["resource"]["identifier"][0]["value"] = json!("9434765911");
    let bad = gw.post("/fhir", &token, &bundle).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.body);
    let expressions: Vec<&str> = bad.body["issue"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["expression"][0].as_str())
        .collect();
    assert!(
        expressions.contains(&"Bundle.entry[1].resource.ofType(Encounter).status"),
        "{expressions:?}"
    );
}

#[tokio::test]
async fn batch_answers_entry_by_entry() {
    let gw = Gateway::start();
    let token = gw.token("gp-a81001").await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            { "resource": observation("9434765919", 121.0), "request": { "method": "POST", "url": "Observation" } },
            { "resource": patient("9912003890"), "request": { "method": "POST", "url": "Patient" } },
            { "resource": observation("9434765919", 122.0), "request": { "method": "DELETE", "url": "Observation/x" } }
        ]
    });
    let reply = gw.post("/fhir", &token, &bundle).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["type"], "batch-response");
    let statuses: Vec<&str> = reply.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert!(statuses[0].starts_with("201"), "{statuses:?}");
    assert!(
        statuses[1].starts_with("422"),
        "NHSNO: 9912003890 fails Modulus 11: {statuses:?}"
    );
    assert!(
        statuses[2].starts_with("400"),
        "DELETE is not supported: {statuses:?}"
    );
    assert_eq!(
        reply.body["entry"][1]["response"]["outcome"]["issue"][0]["code"],
        "value"
    );
}

#[tokio::test]
async fn message_bundle_is_stored_whole() {
    let gw = Gateway::start();
    let token = gw.token("trust-rx1").await;
    let message = json!({
        "resourceType": "Bundle",
        "type": "message",
        "timestamp": "2026-11-20T10:00:00Z",
        "entry": [
            { "fullUrl": "urn:uuid:9d1c0a7e-0000-4000-8000-000000000001",
              "resource": { "resourceType": "MessageHeader",
                "eventCoding": { "system": "https://fhir.nhs.uk/CodeSystem/message-event", "code": "discharge-summary" },
                "source": { "endpoint": "https://trust.example/fhir" } } },
            { "fullUrl": "urn:uuid:9d1c0a7e-0000-4000-8000-000000000002", "resource": patient("9434765919") }
        ]
    });
    let reply = gw.post("/fhir", &token, &message).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert!(reply.header("location").contains("/fhir/Bundle/"));
}

#[tokio::test]
async fn bad_input_gets_a_located_operation_outcome() {
    let gw = Gateway::start();
    let token = gw.token("gp-a81001").await;
    let post =
        |body: Vec<u8>| gw.send(Method::POST, "/fhir/Patient", Some(&token), Some(body), &[]);

    // NHSNO: check digit, and the accepted test number.
    for bad in ["9912003890", "9000000015", "9434765918", "1111111111"] {
        let reply = post(patient(bad).to_string().into_bytes()).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {}",
            reply.body
        );
        assert_eq!(
            reply.body["issue"][0]["expression"][0],
            "Patient.identifier[0].value"
        );
        assert!(
            !reply.body.to_string().contains(bad),
            "the NHS number is not echoed back"
        );
    }

    // Duplicate keys are rejected, not "last wins".
    let dup = br#"{"resourceType":"Patient","gender":"male","gender":"female"}"#.to_vec();
    let reply = post(dup).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.issue_code(), "structure");

    // 10,000-deep nesting.
    let deep = format!(
        "{{\"resourceType\":\"Patient\",\"extension\":{}{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let reply = post(deep.into_bytes()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.issue_code(), "structure");

    // Invalid UTF-8.
    let mut bytes = br#"{"resourceType":"Patient","gender":"ma"#.to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(br#"le"}"#);
    let reply = post(bytes).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);

    // Unknown element, empty string, absolute reference.
    let mut unknown = patient("9434765919");
    unknown["favouriteColour"] = json!("blue");
    let reply = post(unknown.to_string().into_bytes()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.body["issue"][0]["expression"][0],
        "Patient.favouriteColour"
    );
    let mut empty = patient("9434765919");
    empty["name"][0]["family"] = json!("");
    assert!(
        post(empty.to_string().into_bytes())
            .await
            .status
            .is_client_error()
    );
    let mut ssrf = observation("9434765919", 1.0);
    ssrf["subject"] = json!({"reference": "https://attacker.example/Patient/1"});
    let reply = gw
        .send(
            Method::POST,
            "/fhir/Observation",
            Some(&token),
            Some(ssrf.to_string().into_bytes()),
            &[],
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.body
    );

    // Wrong media type, wrong type in URL, unsupported type.
    let reply = gw
        .client
        .post(format!("{}/fhir/Patient", gw.base_url))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body(patient("9434765919").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let reply = gw
        .send(
            Method::POST,
            "/fhir/Observation",
            Some(&token),
            Some(patient("9434765919").to_string().into_bytes()),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = gw
        .send(
            Method::POST,
            "/fhir/Basic",
            Some(&token),
            Some(b"{}".to_vec()),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.issue_code(), "not-supported");
}

#[tokio::test]
async fn oversized_body_gets_413_before_it_is_read() {
    let gw = Gateway::start_with(caregate_e2e::default_partners(), "max_body_bytes = 65536");
    let token = gw.token("gp-a81001").await;
    let mut big = patient("9434765919");
    big["name"][0]["family"] = Value::String("x".repeat(70_000));
    let reply = gw.post("/fhir/Patient", &token, &big).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.issue_code(), "too-long");
}

#[tokio::test]
async fn scopes_and_tokens_are_enforced() {
    let gw = Gateway::start();
    // No token: 401 with a challenge.
    let reply = gw
        .send(
            Method::POST,
            "/fhir/Patient",
            None,
            Some(patient("9434765919").to_string().into_bytes()),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.header("www-authenticate").starts_with("Bearer"));
    assert_eq!(reply.issue_code(), "login");
    // The pharmacy may dispense but not create patients.
    let token = gw.token("pharmacy-fa123").await;
    let reply = gw
        .post("/fhir/Patient", &token, &patient("9434765919"))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.issue_code(), "forbidden");
    // Capability discovery needs no token and lists the token endpoint.
    let reply = gw
        .send(Method::GET, "/fhir/metadata", None, None, &[])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["resourceType"], "CapabilityStatement");
    let types: Vec<&str> = reply.body["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.len(), 19);
}

#[tokio::test]
async fn http2_is_negotiated_by_alpn() {
    let gw = Gateway::start();
    let response = gw
        .client
        .get(format!("{}/fhir/metadata", gw.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let http1 = caregate_e2e::client_trusting(
        &std::fs::read(gw.data_dir().join("dev-certificate.pem")).unwrap(),
    );
    let response = http1
        .get(format!("{}/fhir/metadata", gw.base_url))
        .version(reqwest::Version::HTTP_11)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}
