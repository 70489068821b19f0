//! Conformance of caregate's schemas over real, published FHIR data: every official R4 example and
//! every UK Core example of a resource type caregate accepts must pass its schema (and each supported
//! resource inside a Bundle must pass its own), apart from the few known exceptions listed below,
//! each with the reason.
//!
//! The corpora are not part of the repository. Point `CAREGATE_CORPORA` at the folder holding
//! `fhir-r4/` and `uk-core/` (CI does); without it this test says it is skipped and passes, so a
//! fresh clone's `cargo test` needs nothing outside the checkout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use caregate_fhir::outcome::IssueSink;
use caregate_fhir::resource::ResourceType;
use caregate_fhir::schema::SchemaRegistry;
use serde_json::Value;

/// Example folders checked, relative to `CAREGATE_CORPORA`.
const FOLDERS: &[&str] = &["fhir-r4/examples", "uk-core/examples"];

/// Examples that fail caregate's schemas on purpose, with why. Each must still fail: an entry that
/// starts passing is reported, so this list cannot silently go stale.
const KNOWN_EXCEPTIONS: &[(&str, &str)] = &[];

#[test]
fn corpora_examples_pass_caregate_schemas() {
    let Some(root) = std::env::var_os("CAREGATE_CORPORA").map(PathBuf::from) else {
        eprintln!("CAREGATE_CORPORA is not set: corpora conformance test skipped");
        return;
    };
    let registry = SchemaRegistry::builtin().expect("schemas compile");

    let mut checked = 0usize;
    let mut failures: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for folder in FOLDERS {
        for path in json_files(&root.join(folder)) {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let value = read_json(&path);
            let issues = validate_example(&registry, &value, &mut checked);
            if !issues.is_empty() {
                failures.insert(name, issues);
            }
        }
    }

    let mut report = String::new();
    for (name, issues) in &failures {
        if !KNOWN_EXCEPTIONS.iter().any(|(known, _)| known == name) {
            report.push_str(&format!("\n{name}:\n  {}", issues.join("\n  ")));
        }
    }
    for (known, reason) in KNOWN_EXCEPTIONS {
        if !failures.contains_key(*known) {
            report.push_str(&format!(
                "\n{known}: listed as a known exception ({reason}) but passes"
            ));
        }
    }
    assert!(report.is_empty(), "schema conformance failures:{report}");
    // Guard against a vacuous pass (wrong folder, nothing matched).
    assert!(
        checked >= 150,
        "only {checked} resources were checked under {}",
        root.display()
    );
    eprintln!(
        "corpora conformance: {checked} resources checked, {} known exceptions",
        failures.len()
    );
}

/// Validate one example file's resource (and, for a Bundle, every entry of a supported type).
/// Returns the issues as `code expression: diagnostics` lines.
fn validate_example(registry: &SchemaRegistry, value: &Value, checked: &mut usize) -> Vec<String> {
    let Some(type_name) = value.get("resourceType").and_then(Value::as_str) else {
        return vec!["no resourceType".to_owned()];
    };
    let Ok(resource_type) = ResourceType::from_str(type_name) else {
        return Vec::new();
    };
    let mut sink = IssueSink::new(64);
    registry.validate(resource_type, value, &mut sink);
    *checked += 1;
    if resource_type == ResourceType::Bundle {
        let entries = value
            .get("entry")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (index, entry) in entries.iter().enumerate() {
            let Some(resource) = entry.get("resource") else {
                continue;
            };
            let Some(entry_type) = resource.get("resourceType").and_then(Value::as_str) else {
                continue;
            };
            let mut entry_sink = IssueSink::new(64);
            if registry.validate_by_name(entry_type, resource, &mut entry_sink) {
                *checked += 1;
                for issue in entry_sink.finish() {
                    sink.push(issue.rebased(&format!("Bundle.entry[{index}].resource")));
                }
            }
        }
    }
    sink.finish()
        .into_iter()
        .map(|issue| {
            format!(
                "{} {}: {}",
                issue.code.as_str(),
                issue.expression.join(", "),
                issue.diagnostics
            )
        })
        .collect()
}

fn json_files(folder: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(folder)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", folder.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    files
}

/// Read a JSON file, dropping a UTF-8 byte order mark (some published examples start with one).
fn read_json(path: &Path) -> Value {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    serde_json::from_slice(text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}
