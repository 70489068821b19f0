//! FHIR Bulk Data `$export` end to end (issue 5): the real binary over TLS, a SMART token for the
//! ICB, records with stored policy decisions in the log, NDJSON that parses as FHIR R4 and
//! carries no NHS number; another partner cannot see the job or its files (BOLA → 404). Jobs are
//! kept in the store: a completed export's manifest and files are served after the gateway is
//! killed and restarted, and an export that was running when the gateway died answers failed.
//! Retention: with `[feeds] export_retention_secs` of a few seconds and an `export_dir`, the
//! complete status says when the files expire (`Expires`), `caregate feed report --config`
//! finds the export there, and after expiry the status and files answer 404 OperationOutcomes,
//! the files are deleted, the removal is audited, and a fresh export still works.
//!
//! The policy stage does not yet write decisions at intake, so the test commits records with
//! decisions straight into the data directory's store (as intake will) while the gateway is
//! stopped, then starts it.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::process::Command;
use std::time::Duration;

use caregate_e2e::{Gateway, Options, TestPartner, binary, default_partners, workspace_root};
use caregate_store::sqlite::{SqliteOptions, SqliteStore};
use caregate_store::{RecordWrite, Store, Submission, WriteMode};
use caregate_testkit::keys::PartnerKey;
use serde_json::{Value, json};

const FEED: &str = "icb-qe1-population-health";
const NHS: &str = "9434765919";
const NHS_2: &str = "9876544322";
const OPTED_OUT: &str = "4000000004";

fn record(resource: Value, nhs: &str, included: bool) -> RecordWrite {
    let content = resource.to_string().into_bytes();
    RecordWrite {
        resource_type: resource["resourceType"].as_str().unwrap().into(),
        id: resource["id"].as_str().unwrap().into(),
        mode: WriteMode::Create,
        content_hash: aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &content).as_ref().try_into().unwrap(),
        content,
        nhs_number: Some(nhs.into()),
        identifiers: Vec::new(),
        decision: Some(json!({ "feeds": [{ "feed": FEED, "recipient": "icb-qe1", "agreement": "dsa-icb-population-health", "included": included, "rule_ids": [], "reasons": [] }] }).to_string().into_bytes()),
    }
}

async fn seed(data: &std::path::Path) {
    let store = SqliteStore::open(data, SqliteOptions::default()).unwrap();
    let mut records = Vec::new();
    for (i, (nhs, included)) in [(NHS, true), (NHS_2, true), (OPTED_OUT, false)]
        .into_iter()
        .enumerate()
    {
        records.push(record(json!({ "resourceType": "Patient", "id": format!("p{i}"), "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs }], "name": [{ "family": "Smith" }], "gender": "female", "birthDate": "1970-04-01", "address": [{ "line": ["1 High St"], "postalCode": "LS1 4AP" }] }), nhs, included));
        records.push(record(json!({ "resourceType": "Observation", "id": format!("o{i}"), "status": "final", "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "75367002" }] }, "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs } }, "effectiveDateTime": "2025-03-04T10:00:00Z", "valueQuantity": { "value": 120, "unit": "mmHg" } }), nhs, included));
    }
    store
        .submit(Submission {
            partner: "gp-a81001".into(),
            idempotency_key: None,
            records,
            audit: Vec::new(),
        })
        .await
        .unwrap();
    store.close().await.unwrap();
}

/// A gateway serving the shipped feed (with k = 2) to the ICB, over three seeded patients.
async fn feed_gateway() -> Gateway {
    feed_gateway_with("").await
}

/// [`feed_gateway`] with more `[feeds]` keys.
async fn feed_gateway_with(feeds_toml: &str) -> Gateway {
    let mut partners = default_partners();
    partners.push(TestPartner::new(
        "icb-qe1",
        "QE1",
        "icb",
        &["system/*.rs"],
        PartnerKey::generate_es256("icb-qe1-1"),
    ));
    let definitions = workspace_root().join("policies/feeds");
    let mut gw = Gateway::start_configured(Options {
        partners,
        extra_toml: format!(
            "[feeds]\ndefinitions = \"{}\"\nkey_file = \"feed-keys.toml\"\n{feeds_toml}",
            definitions.display()
        ),
        ..Options::default()
    });
    assert!(gw.terminate().await);
    seed(&gw.data_dir()).await;
    // The shipped definition with k = 2 (a two-patient test population; the shipped k is 8).
    let feeds = gw.dir.path().join("feeds");
    std::fs::create_dir(&feeds).unwrap();
    let shipped = std::fs::read_to_string(definitions.join(format!("{FEED}.toml"))).unwrap();
    std::fs::write(
        feeds.join(format!("{FEED}.toml")),
        shipped.replace("\nk = 8\n", "\nk = 2\n"),
    )
    .unwrap();
    let config = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(
        &gw.config_path,
        config.replace(&definitions.display().to_string(), "feeds"),
    )
    .unwrap();
    let keys = gw.dir.path().join("feed-keys.toml");
    let status = Command::new(binary())
        .args(["keys", "new", FEED, "--key-file"])
        .arg(&keys)
        .status()
        .unwrap();
    assert!(status.success());
    gw.launch();
    gw
}

/// Kick off an export of the feed; returns the status URL.
async fn kick_off(gw: &Gateway, token: &str) -> String {
    let kick_off = gw
        .client
        .get(format!(
            "{}/fhir/Group/{FEED}/$export?_type=Patient,Observation",
            gw.base_url
        ))
        .bearer_auth(token)
        .header("Prefer", "respond-async, handling=lenient")
        .header("Accept", "application/fhir+json")
        .send()
        .await
        .unwrap();
    assert_eq!(kick_off.status(), 202);
    kick_off.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// Poll the status URL until the export completes; returns the manifest.
async fn wait_for_manifest(gw: &Gateway, token: &str, status_url: &str) -> Value {
    loop {
        let response = gw
            .client
            .get(status_url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            202 => {
                assert!(response.headers().contains_key("x-progress"));
                assert!(response.headers().contains_key("retry-after"));
                // Wait on the condition (the job's state), polling briefly rather than for the
                // advertised Retry-After, so the test does not depend on timing.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            200 => break response.json().await.unwrap(),
            other => panic!("status {other}: {}", response.text().await.unwrap()),
        }
    }
}

/// Each output's (type, count, body), downloaded with `token`.
async fn download(gw: &Gateway, token: &str, manifest: &Value) -> Vec<(String, u64, String)> {
    let mut files = Vec::new();
    for output in manifest["output"].as_array().unwrap() {
        let response = gw
            .client
            .get(output["url"].as_str().unwrap())
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        files.push((
            output["type"].as_str().unwrap().to_owned(),
            output["count"].as_u64().unwrap(),
            response.text().await.unwrap(),
        ));
    }
    files.sort();
    files
}

/// The same URL on the restarted gateway (it listens on a new port).
fn moved(url: &str, old_base: &str, new_base: &str) -> String {
    url.replacen(old_base, new_base, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_export_over_tls_gives_pseudonymised_fhir_ndjson() {
    let gw = feed_gateway().await;
    let token = gw.token("icb-qe1").await;
    let status_url = kick_off(&gw, &token).await;

    // Another partner cannot see the job (BOLA): 404, as for a job that does not exist.
    let gp_token = gw.token("gp-a81001").await;
    let other = gw
        .client
        .get(&status_url)
        .bearer_auth(&gp_token)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);

    let manifest = wait_for_manifest(&gw, &token, &status_url).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    assert_eq!(
        manifest["extension"]["https://caregate.example/fhir/bulk/key-version"],
        1
    );
    let outputs = manifest["output"].as_array().unwrap();
    assert!(!outputs.is_empty());

    let validator = caregate_fhir_validator();
    let mut seen = 0;
    for output in outputs {
        let url = output["url"].as_str().unwrap();
        let denied = gw
            .client
            .get(url)
            .bearer_auth(&gp_token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            denied.status(),
            404,
            "another partner must not download the file"
        );
        let body = gw
            .client
            .get(url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            !body.contains(NHS)
                && !body.contains(NHS_2)
                && !body.contains(OPTED_OUT)
                && !body.contains("Smith")
                && !body.contains("LS1 4AP")
                && !body.contains("1970-04-01"),
            "{body}"
        );
        for line in body.lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            assert_eq!(resource["resourceType"], output["type"]);
            validator(line.as_bytes());
            seen += 1;
        }
        assert_eq!(
            body.lines().count() as u64,
            output["count"].as_u64().unwrap()
        );
    }
    // The opted-out patient is not in the feed; k = 8 suppresses a population of one.
    let report = &manifest["extension"]["https://caregate.example/fhir/bulk/release-report"];
    assert_eq!(report["excluded_by_policy"], 2);
    assert_eq!(report["minimum_k"], 2);
    assert_eq!(seen, 4);

    // Traversal and unknown names are 404s; DELETE cancels and the job is gone.
    let traversal = gw
        .client
        .get(format!(
            "{}/fhir/$export-file/{}/..%2F..%2Fcaregate.db",
            gw.base_url,
            status_url.rsplit('/').next().unwrap()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(traversal.status(), 404);
    let deleted = gw
        .client
        .delete(&status_url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 202);
    assert_eq!(
        gw.client
            .get(&status_url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Without Prefer: respond-async the kick-off is refused.
    let refused = gw
        .client
        .get(format!("{}/fhir/$export?_feed={FEED}", gw.base_url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_export_is_served_after_the_gateway_is_killed_and_restarted() {
    let mut gw = feed_gateway().await;
    let token = gw.token("icb-qe1").await;
    let status_url = kick_off(&gw, &token).await;
    let before = wait_for_manifest(&gw, &token, &status_url).await;
    let files_before = download(&gw, &token, &before).await;
    assert!(!files_before.is_empty());
    assert!(
        files_before
            .iter()
            .all(|(_, count, body)| *count > 0 && !body.is_empty())
    );

    // SIGKILL: nothing of the job can have been saved at shutdown.
    let old_base = gw.base_url.clone();
    gw.kill();
    gw.launch();
    let token = gw.token("icb-qe1").await;
    let status_url = moved(&status_url, &old_base, &gw.base_url);
    let response = gw
        .client
        .get(&status_url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "the status URL outlives the process"
    );
    let after: Value = response.json().await.unwrap();
    for field in [
        "transactionTime",
        "request",
        "requiresAccessToken",
        "extension",
    ] {
        assert_eq!(after[field], before[field], "{field}");
    }
    assert!(
        after["output"][0]["url"]
            .as_str()
            .unwrap()
            .starts_with(&gw.base_url),
        "file URLs name the gateway that answers"
    );
    assert_eq!(download(&gw, &token, &after).await, files_before);

    // Ownership still holds after the restart (BOLA: 404, as for a job that does not exist).
    let gp_token = gw.token("gp-a81001").await;
    let other = gw
        .client
        .get(&status_url)
        .bearer_auth(&gp_token)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let denied = gw
        .client
        .get(after["output"][0]["url"].as_str().unwrap())
        .bearer_auth(&gp_token)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 404);

    // A file the manifest lists but this instance's disk lacks (an export directory not shared
    // in a cluster) is a clear OperationOutcome, not a failure of the gateway.
    let id = status_url.rsplit('/').next().unwrap();
    let directory = gw.data_dir().join("feeds").join(FEED).join(id);
    std::fs::remove_dir_all(&directory).unwrap();
    let missing = gw
        .client
        .get(after["output"][0]["url"].as_str().unwrap())
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let outcome: Value = missing.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "not-found");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("not available on this gateway instance"),
        "{outcome}"
    );

    // DELETE after the restart: the job is gone, here and after another restart.
    let deleted = gw
        .client
        .delete(&status_url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 202);
    let old_base = gw.base_url.clone();
    assert!(gw.terminate().await);
    gw.launch();
    let token = gw.token("icb-qe1").await;
    let gone = gw
        .client
        .get(moved(&status_url, &old_base, &gw.base_url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_running_when_the_gateway_died_answers_failed_after_restart() {
    let mut gw = feed_gateway().await;
    let token = gw.token("icb-qe1").await;
    let base = gw.base_url.clone();
    gw.kill();
    // What a gateway killed mid-export leaves: its job row in progress (instance "local", the
    // SQLite gateway's) and a partial output file. An export cannot be made slow enough to kill
    // deterministically, so the row is written as the dead process would have left it.
    let id = "0123456789abcdef0123456789abcdef";
    let conn = rusqlite::Connection::open(gw.data_dir().join("caregate.db")).unwrap();
    conn.execute(
        "INSERT INTO export_jobs (id, owner, feed, request, state, scanned, written, key_version, \
         opt_outs, created_at, updated_at, instance_id) VALUES (?1, 'icb-qe1', ?2, ?3, \
         'in-progress', 500, 12, 1, 'applied', '2026-01-01T00:00:00.000000Z', \
         '2026-01-01T00:00:01.000000Z', 'local')",
        rusqlite::params![id, FEED, format!("{base}/fhir/Group/{FEED}/$export")],
    )
    .unwrap();
    drop(conn);
    let partial = gw.data_dir().join("feeds").join(FEED).join(id);
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(
        partial.join("Patient.ndjson"),
        "{\"resourceType\":\"Patient\"",
    )
    .unwrap();

    gw.launch();
    let token_after = gw.token("icb-qe1").await;
    let status_url = format!("{}/fhir/$export-status/{id}", gw.base_url);
    let response = gw
        .client
        .get(&status_url)
        .bearer_auth(&token_after)
        .send()
        .await
        .unwrap();
    // Bulk Data: a failed export's status is a 5xx with an OperationOutcome.
    assert_eq!(response.status(), 500);
    let outcome: Value = response.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "exception");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("interrupted by a restart; kick off a new export"),
        "{outcome}"
    );
    assert!(
        !partial.exists(),
        "the partial files of the interrupted export are removed"
    );
    let file = gw
        .client
        .get(format!(
            "{}/fhir/$export-file/{id}/Patient.ndjson",
            gw.base_url
        ))
        .bearer_auth(&token_after)
        .send()
        .await
        .unwrap();
    assert_eq!(file.status(), 404);
    // Another partner still cannot see it.
    let gp_token = gw.token("gp-a81001").await;
    let other = gw
        .client
        .get(&status_url)
        .bearer_auth(&gp_token)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    // A new export runs and completes alongside.
    let status_url = kick_off(&gw, &token_after).await;
    wait_for_manifest(&gw, &token_after, &status_url).await;
    drop(token);

    // The start-up marked it failed in the store (not only answered so).
    assert!(gw.terminate().await);
    let conn = rusqlite::Connection::open(gw.data_dir().join("caregate.db")).unwrap();
    let (state, error, finished): (String, String, Option<String>) = conn
        .query_row(
            "SELECT state, error, finished_at FROM export_jobs WHERE id = ?1",
            [id],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .unwrap();
    assert_eq!(state, "failed");
    assert!(error.contains("interrupted by a restart"), "{error}");
    assert!(finished.is_some());
}

/// Every output line is valid FHIR R4 for caregate's own validator (the definitions keep the
/// elements FHIR requires) and its id is a 26-character pseudonym.
fn caregate_fhir_validator() -> impl Fn(&[u8]) {
    let validator =
        caregate_fhir::Validator::new(caregate_fhir::validate::ValidatorConfig::default()).unwrap();
    move |bytes: &[u8]| {
        if let Err(rejection) = validator.validate_bytes(bytes, None) {
            panic!("not valid FHIR: {:?}", rejection.outcome);
        }
        let value: Value = serde_json::from_slice(bytes).unwrap();
        assert!(
            value["id"]
                .as_str()
                .is_some_and(|id| id.len() == 26 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        );
    }
}

/// Poll `url` until it answers `status` (within `within`); returns the last response's body.
async fn wait_for_status(
    gw: &Gateway,
    token: &str,
    url: &str,
    status: u16,
    within: Duration,
) -> Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let response = gw.client.get(url).bearer_auth(token).send().await.unwrap();
        if response.status().as_u16() == status {
            return response.json().await.unwrap_or(Value::Null);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{url} still answers {} after {within:?}",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_not_found_outcome(body: &Value) {
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    assert_eq!(body["issue"][0]["code"], "not-found", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_export_is_gone_and_a_fresh_one_still_works() {
    const RETENTION_SECS: i64 = 3;
    let mut gw = feed_gateway_with(&format!(
        "export_dir = \"exports\"\nexport_retention_secs = {RETENTION_SECS}\n"
    ))
    .await;
    let token = gw.token("icb-qe1").await;
    let exports = gw.dir.path().join("exports");
    let status_url = kick_off(&gw, &token).await;
    let id = status_url.rsplit('/').next().unwrap().to_owned();
    let manifest = wait_for_manifest(&gw, &token, &status_url).await;
    let directory = exports.join("feeds").join(FEED).join(&id);
    assert!(
        directory.is_dir(),
        "the export is written under [feeds] export_dir"
    );

    // The complete status carries when its files stop being available.
    let complete = gw
        .client
        .get(&status_url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(complete.status(), 200);
    let expires = complete.headers()["expires"].to_str().unwrap().to_owned();
    let expires_at = time::PrimitiveDateTime::parse(
        &expires,
        time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        ),
    )
    .unwrap()
    .assume_utc();
    let ahead = expires_at - time::OffsetDateTime::now_utc();
    assert!(
        ahead > -time::Duration::seconds(1) && ahead <= time::Duration::seconds(RETENTION_SECS),
        "Expires {expires} is the end of the {RETENTION_SECS} s retention"
    );
    let files = download(&gw, &token, &manifest).await;
    assert!(!files.is_empty());

    // `feed report --config` reads the export directory the gateway writes to.
    let report = Command::new(binary())
        .args(["feed", "report", FEED, "--export", &id, "--config"])
        .arg(&gw.config_path)
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    assert!(!report.stdout.is_empty());

    // After the retention: status and files are 404 OperationOutcomes, the files are deleted.
    let body = wait_for_status(&gw, &token, &status_url, 404, Duration::from_secs(15)).await;
    assert_not_found_outcome(&body);
    for output in manifest["output"].as_array().unwrap() {
        let response = gw
            .client
            .get(output["url"].as_str().unwrap())
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
        assert_not_found_outcome(&response.json().await.unwrap());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while directory.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the sweep deletes an expired export's files"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deleted = gw
        .client
        .delete(&status_url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 404, "an expired job cannot be deleted");

    // A fresh export still works; a DELETE on it removes its files at once.
    let fresh_url = kick_off(&gw, &token).await;
    let fresh = wait_for_manifest(&gw, &token, &fresh_url).await;
    assert_eq!(download(&gw, &token, &fresh).await.len(), files.len());
    let fresh_id = fresh_url.rsplit('/').next().unwrap().to_owned();
    let fresh_dir = exports.join("feeds").join(FEED).join(&fresh_id);
    assert!(fresh_dir.is_dir());
    let deleted = gw
        .client
        .delete(&fresh_url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 202);
    assert!(
        !fresh_dir.exists(),
        "a DELETE removes a complete export's files at once"
    );

    // One more, left to expire while the gateway is down (killed at once, so its sweep cannot
    // have run): the start-up sweep removes it.
    let last_url = kick_off(&gw, &token).await;
    wait_for_manifest(&gw, &token, &last_url).await;
    gw.kill();
    let last_id = last_url.rsplit('/').next().unwrap().to_owned();
    let last_dir = exports.join("feeds").join(FEED).join(&last_id);
    assert!(last_dir.is_dir());
    tokio::time::sleep(Duration::from_secs(RETENTION_SECS as u64 + 1)).await;
    let old_base = gw.base_url.clone();
    gw.launch();
    assert!(
        !last_dir.exists(),
        "an export that expired while the gateway was down is deleted at start-up"
    );
    let token = gw.token("icb-qe1").await;
    let last_url = moved(&last_url, &old_base, &gw.base_url);
    let body = wait_for_status(&gw, &token, &last_url, 404, Duration::from_secs(1)).await;
    assert_not_found_outcome(&body);
    assert!(gw.terminate().await);

    // Each removal is one audit event by the retention sweep, naming the export.
    let store = SqliteStore::open(&gw.data_dir(), SqliteOptions::default()).unwrap();
    let query = caregate_store::AuditQuery {
        action: Some(caregate_audit::Action::ExportExpiry),
        limit: 100,
        ..Default::default()
    };
    let events: Vec<_> = store
        .query_audit(&query)
        .await
        .unwrap()
        .events
        .into_iter()
        .map(|stored| stored.event)
        .collect();
    store.close().await.unwrap();
    assert_eq!(events.len(), 3, "{events:?}");
    for event in &events {
        assert_eq!(
            event.actor.client_id.as_deref(),
            Some("system/export-retention")
        );
    }
    for export in [&id, &fresh_id, &last_id] {
        assert_eq!(
            events
                .iter()
                .filter(|e| e.detail.as_deref().unwrap().contains(export.as_str()))
                .count(),
            1,
            "{export} is removed once: {events:?}"
        );
    }
}

/// A consumer with two feeds: the plain system-level `GET /fhir/$export` (all that Bulk Data
/// clients such as SMART's bulk-data-client know) builds the feed marked `system_export`;
/// the other is reached with `_feed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_level_export_builds_the_consumers_system_export_feed() {
    const OTHER: &str = "icb-qe1-risk-stratification";
    let mut gw = feed_gateway().await;
    assert!(gw.terminate().await);
    let shipped = workspace_root().join("policies/feeds");
    std::fs::copy(
        shipped.join(format!("{OTHER}.toml")),
        gw.dir.path().join("feeds").join(format!("{OTHER}.toml")),
    )
    .unwrap();
    let status = Command::new(binary())
        .args(["keys", "new", OTHER, "--key-file"])
        .arg(gw.dir.path().join("feed-keys.toml"))
        .status()
        .unwrap();
    assert!(status.success());
    gw.launch();
    let token = gw.token("icb-qe1").await;

    let mut jobs = Vec::new();
    for query in ["", "?_feed=icb-qe1-risk-stratification"] {
        let kick_off = gw
            .client
            .get(format!("{}/fhir/$export{query}", gw.base_url))
            .bearer_auth(&token)
            .header("Prefer", "respond-async")
            .header("Accept", "application/fhir+json")
            .send()
            .await
            .unwrap();
        assert_eq!(kick_off.status(), 202, "{query}");
        let status_url = kick_off.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_owned();
        wait_for_manifest(&gw, &token, &status_url).await;
        jobs.push(status_url.rsplit('/').next().unwrap().to_owned());
    }
    let conn = rusqlite::Connection::open(gw.data_dir().join("caregate.db")).unwrap();
    let feed_of = |id: &str| -> String {
        conn.query_row("SELECT feed FROM export_jobs WHERE id = ?1", [id], |row| {
            row.get(0)
        })
        .unwrap()
    };
    assert_eq!(feed_of(&jobs[0]), FEED);
    assert_eq!(feed_of(&jobs[1]), OTHER);
}
