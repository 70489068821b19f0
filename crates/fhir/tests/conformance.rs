//! Conformance of the whole validator (strict JSON → schema → UK rules) over real FHIR data from
//! outside the project: the official R4 examples, the UK Core examples, NHS API examples and a
//! Synthea bulk export (see ../shared/corpora/README.md).
//!
//! The corpus folder comes from `CAREGATE_CORPORA`. Without it the test says it is skipped and
//! passes (a fresh clone has no corpora); `.ci/run` sets it and fails if the folder is missing.
//!
//! Every resource of a supported type must be accepted, except the ones listed in [`EXPECTED`],
//! each rejected for a stated reason by the rule that should reject it.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use caregate_fhir::validate::ValidatorConfig;
use caregate_fhir::{ResourceType, Validator};

/// Files (relative to the corpora folder) that must be rejected, the rule, and the expression
/// of the first issue.
const EXPECTED: &[(&str, &str, &str)] = &[
    // NHSNO: UK Core's baby example carries 9912003890, which fails Modulus 11 (corpora README).
    (
        "uk-core/examples/UKCore-Patient-BabyPatient-Example.json",
        "NHSNO: 9912003890 fails Modulus 11",
        "Patient.identifier[0].value",
    ),
    // A bare id is not a FHIR reference (Type/id is required): the example refers to another example by file name.
    (
        "uk-core/examples/UKCore-MedicationDispense-Amoxicillin-Example.json",
        "reference without a type",
        "MedicationDispense.authorizingPrescription[0].reference",
    ),
    (
        "uk-core/examples/UKCore-MedicationDispense-CiprofloxacinIV-Example.json",
        "reference without a type",
        "MedicationDispense.authorizingPrescription[0].reference",
    ),
    (
        "uk-core/examples/UKCore-MedicationDispense-CiprofloxacinOral-Example.json",
        "reference without a type",
        "MedicationDispense.authorizingPrescription[0].reference",
    ),
    // urn:uuid references taken out of the Bundle that resolved them cannot be resolved alone.
    (
        "uk-core/examples/UKCore-Observation-Lab-Albumin-Example.json",
        "urn:uuid reference outside a Bundle",
        "Observation.performer[0].reference",
    ),
    (
        "uk-core/examples/Extension-UKCore-MedicationChangeSummary-Example.json",
        "urn:uuid reference outside a Bundle",
        "MedicationStatement.medicationReference.reference",
    ),
    (
        "nhs-apis/immunisation/specification/components/examples/Immunization/GET-Immunization.json",
        "urn:uuid reference outside a Bundle",
        "Immunization.patient.reference",
    ),
    // A template placeholder, not a reference.
    (
        "nhs-apis/immunisation/specification/components/examples/Immunization/completed_covid_immunization_event_filtered_for_search.json",
        "placeholder text as reference",
        "Immunization.patient.reference",
    ),
    // OWASP API7: attachments hosted on other servers are refused unless their base is allow-listed.
    (
        "fhir-r4/examples/documentreference-example.json",
        "absolute attachment URL",
        "DocumentReference.content[0].attachment.url",
    ),
    (
        "uk-core/examples/UKCore-DocumentReference-CarePlanReportPDF-Example.json",
        "absolute attachment URL",
        "DocumentReference.content[0].attachment.url",
    ),
    // A collection whose entries are List resources, a type the gateway does not accept.
    (
        "uk-core/examples/UKCore-Bundle-AllergyList-Example.json",
        "entry of an unsupported type",
        "Bundle.entry[0].resource.resourceType",
    ),
    // searchset Bundles are server responses, not submissions.
    (
        "uk-core/examples/UKCore-Bundle-Sn-NoAllergyData-Example.json",
        "searchset is a response",
        "Bundle.type",
    ),
    (
        "nhs-apis/pds/specification/components/examples/CoverageSearch.json",
        "searchset is a response",
        "Bundle.type",
    ),
    (
        "nhs-apis/pds/sandbox/mocks/Minimal_PatientSearch.json",
        "searchset is a response",
        "Bundle.type",
    ),
    (
        "nhs-apis/pds/sandbox/mocks/PatientCompoundName.json",
        "searchset is a response",
        "Bundle.type",
    ),
    (
        "nhs-apis/pds/sandbox/mocks/PatientSearch-Jayne-Smyth.json",
        "searchset is a response",
        "Bundle.type",
    ),
    (
        "nhs-apis/pds/sandbox/mocks/PatientSearch.json",
        "searchset is a response",
        "Bundle.type",
    ),
    (
        "nhs-apis/pds/sandbox/mocks/Personal_Details_RelatedPersonBundle.json",
        "searchset is a response",
        "Bundle.type",
    ),
    (
        "nhs-apis/pds/sandbox/mocks/Referenced_RelatedPersonBundle.json",
        "searchset is a response",
        "Bundle.type",
    ),
    (
        "nhs-apis/pds/sandbox/mocks/RelatedPersonBundle.json",
        "searchset is a response",
        "Bundle.type",
    ),
    (
        "nhs-apis/pds/sandbox/mocks/Sensitive_PatientSearch.json",
        "searchset is a response",
        "Bundle.type",
    ),
];

fn corpora() -> Option<PathBuf> {
    std::env::var_os("CAREGATE_CORPORA").map(PathBuf::from)
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("json" | "ndjson")
        ) {
            out.push(path);
        }
    }
}

#[test]
fn corpora_supported_types_validate_except_listed() {
    let Some(root) = corpora() else {
        eprintln!("conformance skipped: CAREGATE_CORPORA is not set");
        return;
    };
    assert!(
        root.is_dir(),
        "CAREGATE_CORPORA={} is not a directory",
        root.display()
    );
    let validator = Validator::new(ValidatorConfig::default()).expect("schemas compile");
    let mut all = Vec::new();
    for sub in [
        "fhir-r4/examples",
        "uk-core/examples",
        "nhs-apis",
        "synthea-bulk-10",
    ] {
        files(&root.join(sub), &mut all);
    }
    let (mut accepted, mut skipped) = (0usize, 0usize);
    let mut rejected: Vec<(String, String)> = Vec::new();
    for path in &all {
        let bytes = std::fs::read(path).expect("read corpus file");
        let relative = path
            .strip_prefix(&root)
            .unwrap_or(path)
            .display()
            .to_string();
        let units: Vec<(String, &[u8])> = if relative.ends_with(".ndjson") {
            bytes
                .split(|&b| b == b'\n')
                .enumerate()
                .filter(|(_, l)| !l.is_empty())
                .map(|(n, l)| (format!("{relative}:{}", n + 1), l))
                .collect()
        } else {
            vec![(relative.clone(), bytes.as_slice())]
        };
        for (name, unit) in units {
            // Only resources of a type the gateway accepts are in scope; others are skipped.
            let text = String::from_utf8_lossy(unit);
            let type_name =
                serde_json::from_str::<serde_json::Value>(text.trim_start_matches('\u{feff}'))
                    .ok()
                    .and_then(|v| {
                        v.get("resourceType")
                            .and_then(|t| t.as_str())
                            .map(str::to_owned)
                    });
            let Some(type_name) = type_name else {
                skipped += 1; // not JSON (some NHS API files are YAML-ish templates) or no type
                continue;
            };
            if ResourceType::from_str(&type_name).is_err() {
                skipped += 1;
                continue;
            }
            match validator.validate_bytes(unit, None) {
                Ok(_) => accepted += 1,
                Err(rejection) => {
                    let first = rejection.outcome.issues.first().map(|i| {
                        format!("{} {:?} {}", i.code.as_str(), i.expression, i.diagnostics)
                    });
                    rejected.push((name, first.unwrap_or_default()));
                }
            }
        }
    }
    eprintln!(
        "conformance: {accepted} accepted, {} rejected, {skipped} skipped (unsupported type)",
        rejected.len()
    );
    let unexpected: Vec<&(String, String)> = rejected
        .iter()
        .filter(|(name, _)| !EXPECTED.iter().any(|(file, _, _)| file == name))
        .collect();
    for (name, issue) in &unexpected {
        eprintln!("UNEXPECTED REJECTION {name}: {issue}");
    }
    assert!(
        unexpected.is_empty(),
        "{} supported resources were rejected unexpectedly",
        unexpected.len()
    );
    for (file, reason, expression) in EXPECTED {
        let found = rejected.iter().find(|(name, _)| name == file);
        let (_, issue) = found.unwrap_or_else(|| panic!("{file} should be rejected ({reason})"));
        assert!(
            issue.contains(expression),
            "{file}: expected an issue at {expression}, got {issue}"
        );
    }
    assert!(
        accepted > 1000,
        "the corpora should hold over a thousand supported resources"
    );
}

/// The NHS numbers the issue names: `9000000015` (in a PDS search mock) and `9912003890` are
/// rejected by the NHSNO rule when their Patient is submitted; `9434765919` is accepted.
#[test]
fn nhsno_corpus_numbers_are_judged_by_modulus_11() {
    let Some(root) = corpora() else {
        eprintln!("conformance skipped: CAREGATE_CORPORA is not set");
        return;
    };
    let validator = Validator::new(ValidatorConfig::default()).expect("schemas compile");
    let read = |relative: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(root.join(relative)).expect("corpus file");
        serde_json::from_str(text.trim_start_matches('\u{feff}')).expect("json")
    };
    let search = read("nhs-apis/pds/sandbox/mocks/PatientCompoundName.json");
    let patient = search["entry"]
        .as_array()
        .and_then(|entries| entries.iter().find(|e| e["resource"]["id"] == "9000000015"))
        .map(|e| e["resource"].clone())
        .expect("the PDS mock holds patient 9000000015");
    for (number, valid) in [
        ("9000000015", false),
        ("9912003890", false),
        ("9434765919", true),
    ] {
        let mut candidate = patient.clone();
        candidate["identifier"][0]["value"] = serde_json::Value::String(number.to_owned());
        candidate["id"] = serde_json::Value::String("p1".to_owned());
        let result = validator.validate_value(candidate, None);
        match (valid, result) {
            (true, Ok(_)) => {}
            (false, Err(rejection)) => {
                let issue = &rejection.outcome.issues[0];
                assert!(issue.diagnostics.contains("NHSNO"), "{number}: {issue:?}");
                assert_eq!(
                    issue.expression,
                    vec!["Patient.identifier[0].value".to_owned()]
                );
            }
            (true, Err(rejection)) => {
                panic!("{number} should be accepted: {:?}", rejection.outcome)
            }
            (false, Ok(_)) => panic!("{number} should be rejected"),
        }
    }
}
