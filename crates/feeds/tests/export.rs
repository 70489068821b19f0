//! Export from a log: opted-out patients never appear (NDOO-7, T1-1), disclosure control reaches
//! k (KANON, SDC-1), old versions are not exported, the manifest names the key version.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::Path;

use caregate_feeds::export::{
    ExportControl, ExportManifest, ExportRequest, LogSource, new_export_id, run_export,
};
use caregate_feeds::{DecisionFeedPolicy, FeedDefinition, FeedKey};
use caregate_store::{LogEntry, Seq, StoreError};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;

const FEED: &str = "icb-qe1-population-health";

struct MemoryLog(Vec<LogEntry>);

impl LogSource for MemoryLog {
    fn read_log(&self, after: Seq, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        Ok(self
            .0
            .iter()
            .filter(|e| e.seq > after)
            .take(limit)
            .cloned()
            .collect())
    }
    fn is_current(&self, entry: &LogEntry) -> Result<bool, StoreError> {
        Ok(!self.0.iter().any(|e| {
            e.partner == entry.partner
                && e.resource_type == entry.resource_type
                && e.id == entry.id
                && e.seq > entry.seq
        }))
    }
}

fn decision(feed_included: bool) -> Vec<u8> {
    // The shape of caregate_policy::Decision's `feeds` (crates/policy/src/decision.rs).
    json!({ "policy_version": "sha256:test", "feeds": [
        { "feed": FEED, "recipient": "icb-qe1", "agreement": "dsa-icb-population-health", "included": feed_included, "rule_ids": [], "reasons": [] },
        { "feed": "icb-qe1-risk-stratification", "recipient": "icb-qe1", "agreement": "dsa-icb-risk-stratification", "included": false, "rule_ids": ["DSA-REVOKED"], "reasons": [] }
    ]}).to_string().into_bytes()
}

struct Builder {
    entries: Vec<LogEntry>,
}

impl Builder {
    fn push(&mut self, partner: &str, resource: Value, nhs: &str, included: bool) {
        let seq = self.entries.len() as Seq + 1;
        let resource_type = resource["resourceType"].as_str().unwrap().to_owned();
        let id = resource["id"].as_str().unwrap().to_owned();
        let version_id = 1 + self
            .entries
            .iter()
            .filter(|e| e.id == id && e.resource_type == resource_type)
            .count() as i64;
        self.entries.push(LogEntry {
            seq,
            partner: partner.into(),
            resource_type,
            id,
            version_id,
            content: resource.to_string().into_bytes(),
            content_hash: [0; 32],
            nhs_number: Some(nhs.into()),
            decision: Some(decision(included)),
            committed_at: datetime!(2025-06-01 09:00 UTC) + time::Duration::seconds(seq),
        });
    }

    /// `n` patients in one district and age band, each with an encounter.
    fn population(&mut self, prefix: &str, n: usize, postcode: &str, birth: &str) {
        for i in 0..n {
            let nhs = format!("{prefix}{i:04}");
            self.push("gp-a81001", json!({ "resourceType": "Patient", "id": format!("p{nhs}"), "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs }], "gender": "male", "birthDate": birth, "address": [{ "postalCode": postcode, "line": ["1 High Street"] }] }), &nhs, true);
            self.push("trust-rx1", json!({ "resourceType": "Encounter", "id": format!("e{nhs}"), "status": "finished", "class": { "code": "EMER" }, "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs } } }), &nhs, true);
        }
    }
}

fn run(
    log: &MemoryLog,
    policy: &DecisionFeedPolicy,
    dir: &Path,
    gzip: bool,
) -> (ExportManifest, Vec<Value>) {
    let mut definition = FeedDefinition::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../policies/feeds/{FEED}.toml")),
    )
    .unwrap();
    definition.gzip = gzip;
    let key = FeedKey::from_secret(FEED, 3, &[4; 32]);
    let export_id = new_export_id();
    let request = ExportRequest {
        definition: &definition,
        key: &key,
        export_id: export_id.clone(),
        types: None,
        since: None,
        after_seq: 0,
        transaction_time: OffsetDateTime::now_utc(),
        directory: dir.join(&export_id),
    };
    let manifest = run_export(log, policy, &request, &ExportControl::default()).unwrap();
    let mut resources = Vec::new();
    for file in &manifest.files {
        let bytes = std::fs::read(dir.join(&export_id).join(&file.file_name)).unwrap();
        let text = if gzip {
            let mut text = String::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_string(&mut text)
                .unwrap();
            text
        } else {
            String::from_utf8(bytes).unwrap()
        };
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len() as u64, file.count);
        resources.extend(lines);
    }
    (manifest, resources)
}

#[test]
fn ndoo_7_opted_out_patients_never_appear_in_a_secondary_use_feed() {
    let mut log = Builder {
        entries: Vec::new(),
    };
    log.population("999000", 10, "LS1 4AP", "1980-01-01");
    // Opted out at intake: the decision says not included (NDOO or Type 1 for GP data).
    log.push("gp-a81001", json!({ "resourceType": "Patient", "id": "out", "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990001111" }], "gender": "male", "birthDate": "1980-01-01" }), "9990001111", false);
    log.push("trust-rx1", json!({ "resourceType": "Encounter", "id": "e-out", "status": "finished", "class": { "code": "EMER" }, "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990001111" } } }), "9990001111", false);
    // Opted out after intake: the export-time list catches it.
    let late = "9990000003";
    let log = MemoryLog(log.entries);
    let dir = tempfile::tempdir().unwrap();
    let policy = DecisionFeedPolicy::new().with_opt_outs([late.to_owned()]);
    let (manifest, resources) = run(&log, &policy, dir.path(), false);

    let key = FeedKey::from_secret(FEED, 3, &[4; 32]);
    let definition = FeedDefinition::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../policies/feeds/{FEED}.toml")),
    )
    .unwrap();
    let transformer = caregate_feeds::transform::Transformer::new(&definition, &key);
    let text = resources.iter().map(Value::to_string).collect::<String>();
    for opted_out in ["9990001111", late] {
        let pseudonym = transformer.nhs_number_pseudonym(opted_out);
        assert!(
            !text.contains(&pseudonym),
            "{opted_out} appears in the feed"
        );
    }
    assert_eq!(manifest.report.excluded_by_policy, 2);
    assert_eq!(manifest.report.excluded_at_export, 2);
    assert_eq!(manifest.report.rows.get("Patient"), Some(&9));
    assert!(manifest.report.opt_outs.starts_with("applied"));
    assert_eq!(manifest.key_version, 3);
}

#[test]
fn kanon_small_classes_are_generalised_then_suppressed() {
    let mut log = Builder {
        entries: Vec::new(),
    };
    log.population("999100", 9, "LS1 4AP", "1980-01-01"); // a class of 9: released
    log.population("999200", 5, "LS2 7AA", "1950-01-01"); // 5 + 4 share LS after coarsening: 9
    log.population("999300", 4, "LS6 1BB", "1950-01-01");
    log.population("999400", 3, "YO1 7HH", "1950-01-01"); // 3 even at YO: suppressed
    let log = MemoryLog(log.entries);
    let dir = tempfile::tempdir().unwrap();
    let (manifest, resources) = run(&log, &DecisionFeedPolicy::new(), dir.path(), true);
    let report = &manifest.report;
    assert_eq!(report.k, 8);
    assert_eq!(report.generalised_patients, 9);
    assert_eq!(report.suppressed_patients, 3);
    assert_eq!(
        report.suppressed_records, 6,
        "the suppressed patients' encounters go too"
    );
    assert_eq!(report.minimum_k, Some(9));
    assert_eq!(report.class_sizes.values().sum::<u64>(), 2);
    assert!(
        report.class_sizes.keys().all(|&size| size >= 8),
        "SDC-1: no class of 1-7"
    );
    let areas: BTreeSet<String> = resources
        .iter()
        .filter_map(|r| {
            r.pointer("/address/0/postalCode")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(areas, BTreeSet::from(["LS".to_owned(), "LS1".to_owned()]));
    assert_eq!(manifest.files.iter().map(|f| f.count).sum::<u64>(), 36);
    assert!(
        manifest
            .files
            .iter()
            .all(|f| f.file_name.ends_with(".ndjson.gz"))
    );
}

#[test]
fn only_the_current_version_is_exported_and_the_manifest_is_written_last() {
    let mut log = Builder {
        entries: Vec::new(),
    };
    log.population("999500", 8, "LS1 4AP", "1980-01-01");
    let updated = json!({ "resourceType": "Encounter", "id": "e9995000000", "status": "cancelled", "class": { "code": "EMER" }, "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9995000000" } } });
    log.push("trust-rx1", updated, "9995000000", true);
    let log = MemoryLog(log.entries);
    let dir = tempfile::tempdir().unwrap();
    let (manifest, resources) = run(&log, &DecisionFeedPolicy::new(), dir.path(), false);
    let encounters: Vec<&Value> = resources
        .iter()
        .filter(|r| r["resourceType"] == "Encounter")
        .collect();
    assert_eq!(encounters.len(), 8);
    assert_eq!(
        encounters
            .iter()
            .filter(|e| e["status"] == "cancelled")
            .count(),
        1
    );
    assert_eq!(manifest.through_seq, 17);
    let loaded = ExportManifest::load(&dir.path().join(&manifest.export_id)).unwrap();
    assert_eq!(loaded, manifest);
    assert!(caregate_feeds::export::render_report(&manifest).contains("minimum k = 8"));
}
