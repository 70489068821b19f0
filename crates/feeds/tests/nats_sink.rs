//! The NATS JetStream sink (issue 8) against a real `nats-server -js` started by the test: every
//! line of an export arrives once, in file order, with the manifest last; publishing the same
//! export again stores nothing twice (message-id deduplication); a server that is not there is a
//! clear error, not a hang.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use caregate_feeds::export::ExportManifest;
use caregate_feeds::nats::{NatsSink, SinkError, SinkOptions, stream_name};
use caregate_testkit::nats::{NatsServer, SKIPPED_NO_NATS};
use serde_json::json;

const FEED: &str = "icb-qe1-population-health";
const EXPORT: &str = "0123456789abcdef0123456789abcdef";

/// An export directory as `run_export` leaves it: NDJSON files (one gzipped) and the manifest.
fn export_dir(dir: &Path) -> ExportManifest {
    let patients = [
        json!({ "resourceType": "Patient", "id": "p1", "gender": "female" }),
        json!({ "resourceType": "Patient", "id": "p2", "gender": "male" }),
        json!({ "resourceType": "Patient", "id": "p3", "gender": "female" }),
    ];
    let text: String = patients.iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(dir.join("Patient.ndjson"), text).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for n in 1..=2 {
        writeln!(
            gz,
            "{}",
            json!({ "resourceType": "Observation", "id": format!("o{n}"), "status": "final", "subject": { "reference": "Patient/p1" } })
        )
        .unwrap();
    }
    std::fs::write(dir.join("Observation.ndjson.gz"), gz.finish().unwrap()).unwrap();
    let manifest = json!({
        "export_id": EXPORT, "feed": FEED, "consumer": "icb-qe1", "key_version": 3,
        "definition_digest": "sha256:test", "transaction_time": "2026-11-23T10:00:00Z",
        "since": null, "types": null, "after_seq": 0, "through_seq": 9,
        "files": [
            { "resource_type": "Patient", "file_name": "Patient.ndjson", "count": 3 },
            { "resource_type": "Observation", "file_name": "Observation.ndjson.gz", "count": 2 }
        ],
        "report": {
            "k": 8, "quasi_identifiers": ["age", "sex", "postcode area"],
            "rows": { "Patient": 3, "Observation": 2 }, "patients": 3, "equivalence_classes": 1,
            "class_sizes": { "3": 1 }, "minimum_k": 3, "generalised_patients": 0,
            "suppressed_patients": 0, "suppressed_records": 0, "redactions": 0,
            "excluded_by_policy": 0, "excluded_at_export": 0, "unreadable": 0,
            "opt_outs": "applied", "rule": "test"
        }
    });
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    serde_json::from_value(manifest).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_gets_every_line_once_in_order_and_a_repeat_is_deduplicated() {
    let Some(server) = NatsServer::start() else {
        eprintln!("{SKIPPED_NO_NATS}");
        return;
    };
    let server = server.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = export_dir(dir.path());
    let sink = NatsSink::connect(&server.url(), SinkOptions::default())
        .await
        .unwrap();

    let first = sink.publish_export(dir.path(), &manifest).await.unwrap();
    assert_eq!(first.stream, stream_name(FEED));
    assert_eq!(
        (first.stored, first.duplicates),
        (6, 0),
        "5 lines + manifest"
    );

    // Read the stream back: subjects, payloads and message ids in publishing order.
    let mut stream = sink.ensure_stream(FEED).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 6);
    assert_eq!(
        info.config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    let mut seen = Vec::new();
    for seq in 1..=6 {
        let message = stream.get_raw_message(seq).await.unwrap();
        let id = message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .unwrap()
            .to_string();
        assert_eq!(
            message
                .headers
                .get("Caregate-Key-Version")
                .unwrap()
                .as_str(),
            "3"
        );
        seen.push((message.subject.to_string(), id, message.payload.clone()));
    }
    let subjects: Vec<&str> = seen.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "caregate.feed.icb-qe1-population-health.Patient",
            "caregate.feed.icb-qe1-population-health.Patient",
            "caregate.feed.icb-qe1-population-health.Patient",
            "caregate.feed.icb-qe1-population-health.Observation",
            "caregate.feed.icb-qe1-population-health.Observation",
            "caregate.feed.icb-qe1-population-health.manifest",
        ]
    );
    assert_eq!(seen[0].1, format!("{EXPORT}/Patient/1"));
    assert_eq!(seen[4].1, format!("{EXPORT}/Observation/2"));
    let second_patient: serde_json::Value = serde_json::from_slice(&seen[1].2).unwrap();
    assert_eq!(second_patient["id"], "p2");
    let observation: serde_json::Value = serde_json::from_slice(&seen[3].2).unwrap();
    assert_eq!(
        observation["id"], "o1",
        "gzip files are published decompressed"
    );
    let published_manifest: ExportManifest = serde_json::from_slice(&seen[5].2).unwrap();
    assert_eq!(published_manifest, manifest);

    // Publishing the same export again (a retry after a crash) stores nothing new.
    let again = sink.publish_export(dir.path(), &manifest).await.unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 6));
    assert_eq!(stream.info().await.unwrap().state.messages, 6);
}

#[tokio::test]
async fn no_server_is_a_clear_error_and_a_bad_feed_id_is_refused() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        NatsSink::connect(&url, SinkOptions::default()),
    )
    .await
    .expect("connect gives up instead of hanging");
    match result {
        Err(SinkError::Connect { url: named, .. }) => assert_eq!(named, url),
        other => panic!("expected a connect error, got {other:?}"),
    }

    let Some(server) = NatsServer::start() else {
        eprintln!("{SKIPPED_NO_NATS}");
        return;
    };
    let server = server.unwrap();
    let sink = NatsSink::connect(&server.url(), SinkOptions::default())
        .await
        .unwrap();
    assert!(matches!(
        sink.ensure_stream("bad.feed").await,
        Err(SinkError::FeedId(_))
    ));
}
