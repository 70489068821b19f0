//! The shipped feed definitions load, match the feeds declared in `policies/ics.toml`, and bad
//! definitions fail with file, line and field.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use caregate_feeds::FeedDefinition;
use caregate_feeds::definition::OptOuts;

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

#[derive(Debug, serde::Deserialize)]
struct Ics {
    #[serde(default)]
    feed: Vec<IcsFeed>,
}

#[derive(Debug, serde::Deserialize)]
struct IcsFeed {
    id: String,
    recipient: String,
}

#[test]
fn every_shipped_definition_names_a_feed_declared_in_ics_toml() {
    let definitions = FeedDefinition::load_dir(&policies().join("feeds")).unwrap();
    assert!(definitions.len() >= 2);
    let ics: Ics =
        toml::from_str(&std::fs::read_to_string(policies().join("ics.toml")).unwrap()).unwrap();
    let declared: BTreeMap<_, _> = ics
        .feed
        .iter()
        .map(|f| (f.id.as_str(), f.recipient.as_str()))
        .collect();
    for definition in &definitions {
        assert_eq!(
            declared.get(definition.id.as_str()).copied(),
            Some(definition.consumer.as_str()),
            "{} must be declared in ics.toml with the same recipient",
            definition.id
        );
        assert!(
            definition.k >= 8,
            "SDC-1: {} releases classes smaller than 8",
            definition.id
        );
        assert_eq!(definition.opt_outs, OptOuts::Applied);
    }
    assert!(
        definitions
            .iter()
            .any(|d| d.id == "icb-qe1-population-health")
    );
}

fn parse(text: &str) -> Result<FeedDefinition, caregate_feeds::definition::DefinitionError> {
    FeedDefinition::parse(Path::new("feeds/feed-a.toml"), text)
}

const MINIMAL: &str = r#"id = "feed-a"
title = "A"
consumer = "icb-qe1"
purpose = "planning"
legal_basis = "Art 6(1)(e)"
k = 8

[resources.Patient]
gender = "keep"
"#;

#[test]
fn a_minimal_definition_parses() {
    let definition = parse(MINIMAL).unwrap();
    assert!(definition.rules("Patient").is_some());
    assert!(definition.rules("Observation").is_none());
    assert!(definition.digest.starts_with("sha256:"));
}

#[test]
fn unknown_key_names_file_and_line() {
    let error = parse(&MINIMAL.replace("k = 8", "k = 8\nkk = 9")).unwrap_err();
    assert_eq!(error.line, Some(7), "{error}");
    assert!(
        error.to_string().starts_with("feeds/feed-a.toml:7"),
        "{error}"
    );
    assert!(error.message.contains("kk"), "{error}");
}

#[test]
fn unknown_action_is_an_error() {
    let error = parse(&MINIMAL.replace("gender = \"keep\"", "gender = \"publish\"")).unwrap_err();
    assert_eq!(error.line, Some(9), "{error}");
}

#[test]
fn ndoo_3_exemption_needs_a_recorded_legal_basis_and_evidence() {
    let exempt = format!("{MINIMAL}\n[opt_out]\nexemption = \"NDOO-3\"\n");
    let error = parse(&exempt).unwrap_err();
    assert_eq!(error.field.as_deref(), Some("exemption"), "{error}");
    assert_eq!(error.line, Some(12), "{error}");

    let recorded = format!(
        "{MINIMAL}\n[opt_out]\nexemption = \"NDOO-3\"\nlegal_basis = \"s251 CAG 21/CAG/0001\"\nevidence = \"approval letter 2025-01-10\"\n"
    );
    let definition = parse(&recorded).unwrap();
    assert!(matches!(definition.opt_outs, OptOuts::Exempt { ref rule, .. } if rule == "NDOO-3"));

    let invented = format!(
        "{MINIMAL}\n[opt_out]\nexemption = \"because\"\nlegal_basis = \"x\"\nevidence = \"y\"\n"
    );
    assert!(parse(&invented).is_err());
}

#[test]
fn k_below_two_and_reserved_elements_are_refused() {
    assert_eq!(
        parse(&MINIMAL.replace("k = 8", "k = 1"))
            .unwrap_err()
            .field
            .as_deref(),
        Some("k")
    );
    let error = parse(&MINIMAL.replace("gender = \"keep\"", "meta = \"keep\"")).unwrap_err();
    assert!(error.message.contains("never released"), "{error}");
    assert!(parse(&MINIMAL.replace("Patient", "Bundle")).is_err());
    assert!(parse(&MINIMAL.replace("Patient", "Appointment")).is_err());
    assert!(
        parse(&MINIMAL.replace("id = \"feed-a\"", "id = \"feed-b\"")).is_err(),
        "id must match the file name"
    );
}

#[test]
fn the_shipped_bundle_names_one_system_export_feed_per_consumer_with_several() {
    let definitions = FeedDefinition::load_dir(&policies().join("feeds")).unwrap();
    let mut per_consumer: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for definition in &definitions {
        let entry = per_consumer.entry(&definition.consumer).or_default();
        entry.0 += 1;
        entry.1 += usize::from(definition.system_export);
    }
    for (consumer, (feeds, defaults)) in per_consumer {
        if feeds > 1 {
            assert_eq!(defaults, 1, "{consumer} receives {feeds} feeds");
        }
    }
}

#[test]
fn two_system_export_feeds_for_one_consumer_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let with_default = MINIMAL.replace("k = 8", "k = 8\nsystem_export = true");
    std::fs::write(dir.path().join("feed-a.toml"), &with_default).unwrap();
    std::fs::write(
        dir.path().join("feed-b.toml"),
        with_default.replace("\"feed-a\"", "\"feed-b\""),
    )
    .unwrap();
    let error = FeedDefinition::load_dir(dir.path()).unwrap_err();
    assert_eq!(error.field.as_deref(), Some("system_export"), "{error}");
    assert!(error.file.ends_with("feed-b.toml"), "{error}");
    assert!(error.message.contains("feed-a"), "{error}");

    // One default per consumer is fine.
    std::fs::write(
        dir.path().join("feed-b.toml"),
        MINIMAL.replace("\"feed-a\"", "\"feed-b\""),
    )
    .unwrap();
    let definitions = FeedDefinition::load_dir(dir.path()).unwrap();
    assert_eq!(definitions.iter().filter(|d| d.system_export).count(), 1);
}
