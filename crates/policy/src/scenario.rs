//! Table-driven policy tests: `policies/tests/*.toml`, each `[[case]]` a record, a submitting
//! partner, a consent state and the expected decision with rule ids. Shared by the crate's own
//! test and `caregate policy test [DIR]`.
//!
//! A case:
//! ```toml
//! [[case]]
//! name = "discharge summary goes to the registered GP, not another GP"
//! rules = ["LR-1"]                       # the rules this case proves (coverage)
//! submitter = "trust-rx1"
//! record = "records/discharge-summary.json"   # or: resource = '''{ ...inline FHIR... }'''
//! now = "2025-06-01T12:00:00Z"           # optional; default [defaults].now
//! break_glass = { requester = "gp-b82002", reason = "unconscious in A&E" }   # optional
//! [case.consent]                         # optional; everything defaults to "nothing known"
//! registered_gp = "A81001"               # as if a Patient resource had named it
//! care_team = ["trust-r1z"]              # partners with an open Encounter/EpisodeOfCare
//! ndoo = false                           # patient is on the NDOO list
//! ndoo_loaded = "2025-06-01T06:00:00Z"   # or "never"; default: one hour before `now`
//! ndoo_max_age_hours = 24
//! type1 = false                          # on the loaded Type 1 list
//! consents = [{ submitter = "gp-a81001", record = "records/consent.json" }]
//! [case.expect]
//! deliver = ["gp-a81001"]                # exactly these partners receive it
//! delivered_under = [{ partner = "gp-a81001", agreement = "dsa-ics-direct-care", rule = "LR-1" }]
//! withhold = [{ partner = "gp-b82002", rule = "LR-1" }]
//! feeds = ["icb-qe1-population-health"]  # exactly these feeds include it
//! feeds_withheld = [{ feed = "icb-qe1-population-health", rule = "NDOO-1" }]
//! break_glass = false
//! ```

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use caregate_fhir::bundle::ValidatedBundle;
use caregate_fhir::validate::{Validated, ValidatorConfig};
use caregate_fhir::{ValidatedResource, Validator};
use serde::Deserialize;
use time::{Duration, OffsetDateTime};

use crate::bundle::{PolicyBundle, line_column};
use crate::consent::{ConsentRegistry, fhir_instant};
use crate::decision::{Decision, decide};
use crate::facts::{BreakGlass, RecordFacts};
use crate::partner::PartnerId;

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    /// The test file, relative to the tests directory.
    pub file: String,
    pub name: String,
    /// The rules the case claims to prove.
    pub rules: Vec<String>,
    pub passed: bool,
    /// What did not match (empty when passed).
    pub failures: Vec<String>,
}

/// All cases of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyTestReport {
    pub cases: Vec<CaseResult>,
}

impl PolicyTestReport {
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|case| case.passed).count()
    }

    pub fn failed(&self) -> usize {
        self.cases.len() - self.passed()
    }

    /// Rule ids named by passing cases.
    pub fn rules_covered(&self) -> BTreeSet<&str> {
        self.cases
            .iter()
            .filter(|case| case.passed)
            .flat_map(|case| case.rules.iter().map(String::as_str))
            .collect()
    }

    /// A pass/fail table, failures spelled out, ending in the line `N passed, M failed`.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for case in &self.cases {
            let verdict = if case.passed { "PASS" } else { "FAIL" };
            let _ = writeln!(
                out,
                "{verdict}  {:<28} {:<24} {}",
                case.file,
                case.rules.join(","),
                case.name
            );
            for failure in &case.failures {
                let _ = writeln!(out, "        - {failure}");
            }
        }
        let _ = write!(out, "{} passed, {} failed", self.passed(), self.failed());
        out
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default)]
    defaults: Defaults,
    #[serde(rename = "case", default)]
    cases: Vec<Case>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    now: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    rules: Vec<String>,
    submitter: String,
    record: Option<String>,
    resource: Option<String>,
    now: Option<String>,
    break_glass: Option<BreakGlassEntry>,
    #[serde(default)]
    consent: ConsentState,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakGlassEntry {
    requester: String,
    reason: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsentState {
    registered_gp: Option<String>,
    #[serde(default)]
    care_team: Vec<String>,
    #[serde(default)]
    ndoo: bool,
    ndoo_loaded: Option<String>,
    ndoo_max_age_hours: Option<i64>,
    #[serde(default)]
    type1: bool,
    #[serde(default)]
    consents: Vec<ConsentEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsentEntry {
    submitter: String,
    record: Option<String>,
    resource: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    deliver: Option<Vec<String>>,
    #[serde(default)]
    delivered_under: Vec<DeliveredUnder>,
    #[serde(default)]
    withhold: Vec<WithholdEntry>,
    feeds: Option<Vec<String>>,
    #[serde(default)]
    feeds_withheld: Vec<FeedWithheld>,
    break_glass: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveredUnder {
    partner: String,
    agreement: Option<String>,
    rule: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WithholdEntry {
    partner: String,
    rule: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedWithheld {
    feed: String,
    rule: String,
}

/// Default `now` for cases that name none.
const DEFAULT_NOW: &str = "2025-06-01T12:00:00Z";

/// Run every `*.toml` in `dir` (sorted) against `bundle`. A file that cannot be read or parsed
/// is reported as one failed case naming the file and line.
pub fn run_policy_tests(dir: &Path, bundle: &PolicyBundle) -> PolicyTestReport {
    let mut report = PolicyTestReport::default();
    let validator = match Validator::new(ValidatorConfig::default()) {
        Ok(validator) => validator,
        Err(error) => {
            report.cases.push(file_failure(
                dir,
                &format!("cannot build the FHIR validator: {error}"),
            ));
            return report;
        }
    };
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
            .collect(),
        Err(error) => {
            report.cases.push(file_failure(
                dir,
                &format!("cannot read the tests directory: {error}"),
            ));
            return report;
        }
    };
    files.sort();
    for path in files {
        let file_name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("?")
            .to_owned();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) => {
                report
                    .cases
                    .push(file_failure(&path, &format!("cannot read: {error}")));
                continue;
            }
        };
        let file: CaseFile = match toml::from_str(&text) {
            Ok(file) => file,
            Err(error) => {
                let (line, column) = error
                    .span()
                    .map_or((0, 0), |span| line_column(&text, span.start));
                report.cases.push(file_failure(
                    &path,
                    &format!("{file_name}:{line}:{column}: {}", error.message()),
                ));
                continue;
            }
        };
        let default_now = file.defaults.now.as_deref().unwrap_or(DEFAULT_NOW);
        for case in &file.cases {
            let failures = match run_case(dir, case, default_now, bundle, &validator) {
                Ok(decision) => check(case, &decision),
                Err(message) => vec![message],
            };
            report.cases.push(CaseResult {
                file: file_name.clone(),
                name: case.name.clone(),
                rules: case.rules.clone(),
                passed: failures.is_empty(),
                failures,
            });
        }
    }
    report
}

fn file_failure(path: &Path, message: &str) -> CaseResult {
    CaseResult {
        file: path.display().to_string(),
        name: "(file)".to_owned(),
        rules: Vec::new(),
        passed: false,
        failures: vec![message.to_owned()],
    }
}

fn load_resource(
    dir: &Path,
    file: Option<&str>,
    inline: Option<&str>,
    validator: &Validator,
) -> Result<ValidatedResource, String> {
    let bytes = match (file, inline) {
        (Some(file), None) => {
            std::fs::read(dir.join(file)).map_err(|error| format!("cannot read {file}: {error}"))?
        }
        (None, Some(inline)) => inline.as_bytes().to_vec(),
        _ => {
            return Err(
                "give exactly one of `record` (a file) or `resource` (inline JSON)".to_owned(),
            );
        }
    };
    match validator.validate_bytes(&bytes, None) {
        Ok(Validated::Resource(resource)) => Ok(resource),
        Ok(Validated::Bundle(ValidatedBundle::Stored { resource, .. })) => Ok(resource),
        Ok(Validated::Bundle(ValidatedBundle::Requests { .. })) => Err(
            "a transaction or batch Bundle is decided entry by entry; give one entry".to_owned(),
        ),
        Err(rejection) => {
            let issues: Vec<String> = rejection
                .outcome
                .issues
                .iter()
                .map(|issue| format!("{} at {}", issue.diagnostics, issue.expression.join(", ")))
                .collect();
            Err(format!(
                "the record does not validate: {}",
                issues.join("; ")
            ))
        }
    }
}

fn instant(text: &str) -> Result<OffsetDateTime, String> {
    fhir_instant(text, false).ok_or_else(|| format!("'{text}' is not a date-time"))
}

fn partner(bundle: &PolicyBundle, id: &str) -> Result<PartnerId, String> {
    PartnerId::parse(id)
        .ok()
        .filter(|id| bundle.partner(id).is_some())
        .ok_or_else(|| format!("'{id}' is not a partner in the bundle"))
}

fn run_case(
    dir: &Path,
    case: &Case,
    default_now: &str,
    bundle: &PolicyBundle,
    validator: &Validator,
) -> Result<Decision, String> {
    let now = instant(case.now.as_deref().unwrap_or(default_now))?;
    let submitter_id = partner(bundle, &case.submitter)?;
    let submitter = bundle
        .partner(&submitter_id)
        .map(|partner| partner.reference())
        .ok_or("unknown submitter")?;
    let resource = load_resource(
        dir,
        case.record.as_deref(),
        case.resource.as_deref(),
        validator,
    )?;
    let mut facts = RecordFacts::from_resource(&resource, &submitter);
    if let Some(request) = &case.break_glass {
        let requester = partner(bundle, &request.requester)?;
        let break_glass =
            BreakGlass::new(requester, &request.reason).map_err(|error| error.to_string())?;
        facts = facts.with_break_glass(break_glass);
    }

    let state = &case.consent;
    let max_age = Duration::hours(state.ndoo_max_age_hours.unwrap_or(24));
    let mut registry = ConsentRegistry::new(max_age);
    let nhs_number = facts.nhs_number().cloned();
    let needs_number =
        state.ndoo || state.type1 || state.registered_gp.is_some() || !state.care_team.is_empty();
    if needs_number && nhs_number.is_none() {
        return Err("the consent state needs a record with an NHS number".to_owned());
    }
    let listed = |on_list: bool| match (&nhs_number, on_list) {
        (Some(number), true) => format!("{}\n", number.as_str()),
        _ => String::new(),
    };
    match state.ndoo_loaded.as_deref() {
        Some("never") => {}
        Some(loaded) => {
            registry
                .load_ndoo(&listed(state.ndoo), instant(loaded)?)
                .map_err(|error| error.to_string())?;
        }
        None => {
            registry
                .load_ndoo(&listed(state.ndoo), now - Duration::hours(1))
                .map_err(|error| error.to_string())?;
        }
    }
    registry
        .load_type1(&listed(state.type1))
        .map_err(|error| error.to_string())?;
    if let Some(number) = &nhs_number {
        if let Some(ods) = &state.registered_gp {
            let ods = caregate_fhir::ods::OdsCode::parse(ods).map_err(|error| error.to_string())?;
            registry.note_registered_gp(number, &ods);
        }
        for (index, member) in state.care_team.iter().enumerate() {
            registry.note_relationship(
                number,
                &partner(bundle, member)?,
                &format!("EpisodeOfCare/case-{index}"),
                true,
            );
        }
    }
    for entry in &state.consents {
        let consent = load_resource(
            dir,
            entry.record.as_deref(),
            entry.resource.as_deref(),
            validator,
        )?;
        registry
            .record_consent(&consent, &partner(bundle, &entry.submitter)?)
            .map_err(|error| format!("the Consent was refused: {error}"))?;
    }
    // As the gateway does: learn from the record itself, then decide.
    registry.observe(&facts);
    let view = registry.view(facts.nhs_number());
    Ok(decide(&facts, &view, bundle, now))
}

fn check(case: &Case, decision: &Decision) -> Vec<String> {
    let mut failures = Vec::new();
    let expect = &case.expect;
    if let Some(deliver) = &expect.deliver {
        let expected: BTreeSet<&str> = deliver.iter().map(String::as_str).collect();
        let actual: BTreeSet<&str> = decision.recipients().map(PartnerId::as_str).collect();
        if expected != actual {
            failures.push(format!("delivered to {actual:?}, expected {expected:?}"));
        }
    }
    for under in &expect.delivered_under {
        let found = decision.deliver_to.iter().any(|delivery| {
            delivery.partner.as_str() == under.partner
                && under
                    .agreement
                    .as_ref()
                    .is_none_or(|agreement| *agreement == delivery.agreement)
                && under
                    .rule
                    .as_ref()
                    .is_none_or(|rule| delivery.rule_ids.contains(rule))
        });
        if !found {
            failures.push(format!(
                "no delivery to {} under {} by rule {}",
                under.partner,
                under.agreement.as_deref().unwrap_or("any agreement"),
                under.rule.as_deref().unwrap_or("any")
            ));
        }
    }
    for withhold in &expect.withhold {
        let found = decision.withheld.iter().any(|withheld| {
            withheld.partner.as_str() == withhold.partner && withheld.rule_id == withhold.rule
        });
        if !found {
            let actual: Vec<&str> = decision
                .withheld
                .iter()
                .filter(|withheld| withheld.partner.as_str() == withhold.partner)
                .map(|withheld| withheld.rule_id.as_str())
                .collect();
            failures.push(format!(
                "expected {} withheld by {}, found rules {actual:?}",
                withhold.partner, withhold.rule
            ));
        }
    }
    if let Some(feeds) = &expect.feeds {
        let expected: BTreeSet<&str> = feeds.iter().map(String::as_str).collect();
        let actual: BTreeSet<&str> = decision.included_feeds().collect();
        if expected != actual {
            failures.push(format!(
                "included in feeds {actual:?}, expected {expected:?}"
            ));
        }
    }
    for withheld in &expect.feeds_withheld {
        let found = decision.feeds.iter().any(|feed| {
            feed.feed == withheld.feed && !feed.included && feed.rule_ids.contains(&withheld.rule)
        });
        if !found {
            failures.push(format!(
                "expected feed {} to exclude the record by {}",
                withheld.feed, withheld.rule
            ));
        }
    }
    if let Some(break_glass) = expect.break_glass
        && decision.break_glass != break_glass
    {
        failures.push(format!(
            "break_glass is {}, expected {break_glass}",
            decision.break_glass
        ));
    }
    failures
}
