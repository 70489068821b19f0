//! Loading the bundle: the shipped one loads; malformed ones are refused with file, line and a
//! readable message; defence-in-depth rules fire when an agreement is misconfigured.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::path::{Path, PathBuf};

use caregate_policy::{PolicyBundle, PolicyError, run_policy_tests};

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

/// A copy of the shipped bundle (without tests) in a temporary directory, to break on purpose.
fn copy_bundle() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(shipped()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let codes = dir.path().join("sensitive-codes");
    std::fs::create_dir(&codes).unwrap();
    for entry in std::fs::read_dir(shipped().join("sensitive-codes")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, codes.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} does not contain {from}");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

fn load_error(dir: &Path) -> (String, usize, String) {
    match PolicyBundle::load(dir) {
        Ok(_) => panic!("the broken bundle loaded"),
        Err(PolicyError::Invalid {
            file,
            line,
            message,
            ..
        }) => (file.display().to_string(), line, message),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

#[test]
fn shipped_bundle_loads_with_a_content_hash_version() {
    let bundle = PolicyBundle::load(&shipped()).unwrap();
    assert!(bundle.version().starts_with("sha256:"));
    assert_eq!(bundle.version().len(), "sha256:".len() + 64);
    assert_eq!(bundle.partners().len(), 9);
    assert_eq!(bundle.code_lists().len(), 5);
    // The same files give the same version.
    let copy = copy_bundle();
    assert_eq!(
        PolicyBundle::load(copy.path()).unwrap().version(),
        bundle.version()
    );
}

#[test]
fn version_changes_when_a_code_list_changes() {
    let copy = copy_bundle();
    let before = PolicyBundle::load(copy.path())
        .unwrap()
        .version()
        .to_owned();
    edit(
        copy.path(),
        "sensitive-codes/fertility.toml",
        "2025-06.1",
        "2025-06.2",
    );
    assert_ne!(PolicyBundle::load(copy.path()).unwrap().version(), before);
}

#[test]
fn misspelt_attribute_in_a_policy_is_an_error_at_load_with_file_and_line() {
    let copy = copy_bundle();
    edit(
        copy.path(),
        "30-consent.cedar",
        "context.patient.dissent_from",
        "context.patient.dissented_from",
    );
    let (file, line, message) = load_error(copy.path());
    assert_eq!(file, "30-consent.cedar");
    assert_eq!(line, 9, "{message}");
    assert!(message.contains("dissented_from"), "{message}");
}

#[test]
fn cedar_syntax_error_names_file_and_line() {
    let copy = copy_bundle();
    edit(
        copy.path(),
        "40-partner-kinds.cedar",
        "unless { context.record.medication_related };",
        "unless { context.record.medication_related ;",
    );
    let (file, line, _) = load_error(copy.path());
    assert_eq!(file, "40-partner-kinds.cedar");
    assert_eq!(line, 6);
}

#[test]
fn policy_without_id_or_with_unknown_annotation_is_refused() {
    let copy = copy_bundle();
    edit(copy.path(), "30-consent.cedar", "@reason(", "@reasn(");
    let (file, _, message) = load_error(copy.path());
    assert_eq!(file, "30-consent.cedar");
    assert!(message.contains("@reasn"), "{message}");
}

#[test]
fn malformed_toml_names_file_and_line() {
    let copy = copy_bundle();
    edit(
        copy.path(),
        "agreements.toml",
        "break_glass_permitted = true",
        "break_glass_permited = true",
    );
    let (file, line, message) = load_error(copy.path());
    assert_eq!(file, "agreements.toml");
    assert_eq!(line, 20, "{message}");
    assert!(message.contains("break_glass_permited"), "{message}");
}

#[test]
fn agreement_naming_an_unknown_party_is_refused() {
    let copy = copy_bundle();
    edit(
        copy.path(),
        "agreements.toml",
        "\"pharmacy-fa123\"]",
        "\"pharmacy-zz999\"]",
    );
    let (file, line, message) = load_error(copy.path());
    assert_eq!(file, "agreements.toml");
    assert!(line > 0);
    assert!(message.contains("pharmacy-zz999"), "{message}");
}

#[test]
fn sens_2_code_list_rejects_a_non_concept_id() {
    let copy = copy_bundle();
    edit(
        copy.path(),
        "sensitive-codes/fertility.toml",
        "code = \"8619003\"",
        "code = \"86190x3\"",
    );
    let (file, line, _) = load_error(copy.path());
    assert_eq!(file, "sensitive-codes/fertility.toml");
    assert_eq!(line, 14);
}

#[test]
fn ndoo_exemption_must_be_stated() {
    let copy = copy_bundle();
    edit(
        copy.path(),
        "agreements.toml",
        "ndoo_applies = true",
        "ndoo_applies = false",
    );
    let (_, _, message) = load_error(copy.path());
    assert!(message.contains("NDOO-2"), "{message}");
}

/// Defence-in-depth rules: misconfigure an agreement and check the Cedar forbid still holds.
#[test]
fn icb_no_direct_care_and_sc_direct_care_only_and_dsa_purpose_hold_when_agreements_are_wrong() {
    let copy = copy_bundle();
    // The ICB added to the direct-care agreement by mistake; a feed for the council; a feed
    // pointing at a direct-care agreement.
    edit(
        copy.path(),
        "agreements.toml",
        "parties = [\"gp-a81001\", \"gp-b82002\", \"gp-c83003\", \"trust-rx1\", \"trust-r1z\"]",
        "parties = [\"gp-a81001\", \"gp-b82002\", \"gp-c83003\", \"trust-rx1\", \"trust-r1z\", \"icb-qe1\", \"council-e08000012\"]",
    );
    edit(
        copy.path(),
        "agreements.toml",
        "purposes = [\"direct-care\"]",
        "purposes = [\"direct-care\", \"secondary-use\"]",
    );
    let mut ics = std::fs::read_to_string(copy.path().join("ics.toml")).unwrap();
    ics.push_str("\n[[feed]]\nid = \"council-research\"\ntitle = \"wrong\"\nrecipient = \"council-e08000012\"\nagreement = \"dsa-ics-direct-care\"\n\n[[feed]]\nid = \"icb-wrong-agreement\"\ntitle = \"wrong\"\nrecipient = \"icb-qe1\"\nagreement = \"dsa-social-care\"\n");
    std::fs::write(copy.path().join("ics.toml"), ics).unwrap();
    let tests = copy.path().join("tests");
    std::fs::create_dir(&tests).unwrap();
    std::fs::create_dir(tests.join("records")).unwrap();
    std::fs::copy(
        shipped().join("tests/records/observation-bp.json"),
        tests.join("records/observation-bp.json"),
    )
    .unwrap();
    std::fs::copy(
        shipped().join("tests/records/careplan.json"),
        tests.join("records/careplan.json"),
    )
    .unwrap();
    std::fs::write(
        tests.join("defence.toml"),
        r#"
[[case]]
name = "icb in a direct-care agreement still gets nothing for direct care"
rules = ["ICB-NO-DIRECT-CARE"]
submitter = "trust-rx1"
record = "records/observation-bp.json"
[case.consent]
care_team = ["icb-qe1"]
[case.expect]
deliver = []
withhold = [{ partner = "icb-qe1", rule = "ICB-NO-DIRECT-CARE" }]
feeds_withheld = [{ feed = "council-research", rule = "SC-DIRECT-CARE-ONLY" }]

[[case]]
name = "a feed pointing at an agreement without secondary use is excluded"
rules = ["DSA-PURPOSE"]
submitter = "trust-rx1"
record = "records/careplan.json"
[case.expect]
feeds_withheld = [{ feed = "icb-wrong-agreement", rule = "DSA-PURPOSE" }]

[[case]]
name = "a wrong expectation is reported as a failure"
submitter = "trust-rx1"
record = "records/observation-bp.json"
[case.expect]
deliver = ["gp-a81001"]
"#,
    )
    .unwrap();
    let bundle = PolicyBundle::load(copy.path()).unwrap();
    let report = run_policy_tests(&tests, &bundle);
    assert_eq!(report.cases.len(), 3);
    assert!(report.cases[0].passed, "{}", report.table());
    assert!(report.cases[1].passed, "{}", report.table());
    assert!(!report.cases[2].passed);
    assert!(report.table().ends_with("2 passed, 1 failed"));
}
