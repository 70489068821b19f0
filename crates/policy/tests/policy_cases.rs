//! Runs the shipped table-driven policy cases (`policies/tests/*.toml`) against the shipped
//! bundle, prints the pass/fail table ending in `N passed, M failed`, and checks that every rule
//! the bundle defines is proved by at least one passing case.

use std::path::{Path, PathBuf};

use caregate_policy::{PolicyBundle, run_policy_tests};

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

/// Rules the shipped agreements cannot trigger (defence in depth); `tests/defence_in_depth.rs`
/// proves each against a modified copy of the bundle.
const DEFENCE_IN_DEPTH: &[&str] = &["DSA-PURPOSE", "ICB-NO-DIRECT-CARE", "SC-DIRECT-CARE-ONLY"];

#[test]
fn shipped_policy_cases_all_pass_and_cover_every_rule() {
    let bundle = match PolicyBundle::load(&policies()) {
        Ok(bundle) => bundle,
        Err(error) => panic!("the shipped bundle does not load: {error}"),
    };
    let report = run_policy_tests(&policies().join("tests"), &bundle);
    #[allow(
        clippy::print_stdout,
        reason = "the table is the test's output for humans"
    )]
    {
        println!("{}", report.table());
    }
    assert!(
        report.cases.len() >= 40,
        "at least 40 cases ship with the bundle"
    );
    assert_eq!(report.failed(), 0, "{}", report.table());
    let covered = report.rules_covered();
    let missing: Vec<String> = bundle
        .rule_ids()
        .into_iter()
        .filter(|rule| {
            !covered.contains(rule.as_str()) && !DEFENCE_IN_DEPTH.contains(&rule.as_str())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "rules with no passing case: {missing:?}"
    );
}
