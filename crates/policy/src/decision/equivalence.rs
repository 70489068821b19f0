//! Equivalence of the fast path with the straightforward evaluation: [`crate::decide`] (memo,
//! scope slices) and [`crate::decide_uncached`] (scope slices) must give exactly the decision
//! [`super::reference::decide`] gives — the same partners, agreements, rule ids, reasons and
//! feeds — for random records (every shipped test record), submitters (including one unknown to
//! the bundle), dates around every agreement boundary, consent states and break-glass requests.
//! One bundle serves every case, so the memo is exercised across many different situations.

#![allow(
    clippy::unwrap_used,
    reason = "test set-up: a failure is a broken fixture"
)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use caregate_fhir::bundle::ValidatedBundle;
use caregate_fhir::validate::{Validated, ValidatorConfig};
use caregate_fhir::{ValidatedResource, Validator};
use proptest::prelude::*;
use serde_json::{Value, json};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use super::{Decision, reference};
use crate::bundle::PolicyBundle;
use crate::consent::{ConsentRegistry, PARTNER_KIND_SYSTEM};
use crate::facts::{BreakGlass, RecordFacts};
use crate::partner::{PartnerId, PartnerKind, PartnerRef};
use crate::{decide, decide_uncached};

const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";
const ODS: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const PATIENT: &str = "9434765919";

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

fn bundle() -> &'static PolicyBundle {
    static BUNDLE: OnceLock<PolicyBundle> = OnceLock::new();
    BUNDLE.get_or_init(|| PolicyBundle::load(&policies()).unwrap())
}

fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| Validator::new(ValidatorConfig::default()).unwrap())
}

fn resource(validated: Validated) -> Option<ValidatedResource> {
    match validated {
        Validated::Resource(resource) => Some(resource),
        Validated::Bundle(ValidatedBundle::Stored { resource, .. }) => Some(resource),
        Validated::Bundle(_) => None,
    }
}

/// Every shipped test record (Consents included: they are records too).
fn records() -> &'static [ValidatedResource] {
    static RECORDS: OnceLock<Vec<ValidatedResource>> = OnceLock::new();
    RECORDS.get_or_init(|| {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(policies().join("tests/records"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        paths.sort();
        paths
            .iter()
            .filter_map(|path| {
                let bytes = std::fs::read(path).unwrap();
                resource(validator().validate_bytes(&bytes, None).unwrap())
            })
            .collect()
    })
}

fn consent(effect: &str, actor: Value, active: bool, recorded_day: i64) -> ValidatedResource {
    let recorded = datetime!(2024-06-01 00:00 UTC) + Duration::days(recorded_day);
    let value = json!({
        "resourceType": "Consent", "id": format!("cn-{recorded_day}-{effect}"),
        "status": if active { "active" } else { "inactive" },
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": "Patient/p1", "identifier": {"system": NHS, "value": PATIENT}},
        "dateTime": recorded.date().to_string(),
        "provision": {"type": effect, "actor": [{
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
            "reference": {"identifier": actor}}]}
    });
    resource(validator().validate_value(value, None).unwrap()).unwrap()
}

/// Days that matter to the shipped agreements (first and last days, and the days either side).
const BOUNDARY_DAYS: &[OffsetDateTime] = &[
    datetime!(2023-03-31 23:59 UTC),
    datetime!(2023-04-01 00:00 UTC),
    datetime!(2024-03-31 12:00 UTC),
    datetime!(2024-04-01 00:00 UTC),
    datetime!(2024-09-30 23:59 UTC),
    datetime!(2024-10-01 00:00 UTC),
    datetime!(2025-03-31 23:59 UTC),
    datetime!(2025-04-01 00:00 UTC),
    datetime!(2028-03-31 23:59 UTC),
    datetime!(2028-04-01 00:00 UTC),
];

#[derive(Debug, Clone)]
struct Case {
    record: usize,
    /// An index into the bundle's partners, or past the end: a submitter the bundle lacks.
    submitter: usize,
    submitter_kind: usize,
    registered_gp: Option<usize>,
    care_team: Vec<bool>,
    ndoo_listed: bool,
    /// `None`: never loaded.
    ndoo_age_hours: Option<i64>,
    type1_listed: bool,
    /// (partner, permit, by kind, active, recorded day)
    consents: Vec<(usize, bool, bool, bool, i64)>,
    break_glass: Option<usize>,
    now: OffsetDateTime,
}

fn case() -> impl Strategy<Value = Case> {
    let partners = bundle().partners().len();
    let now = prop_oneof![
        proptest::sample::select(BOUNDARY_DAYS),
        (0i64..(6 * 365 * 24))
            .prop_map(|hours| datetime!(2023-01-01 00:00 UTC) + Duration::hours(hours)),
    ];
    (
        (
            0..records().len(),
            0..=partners,
            0..PartnerKind::ALL.len(),
            proptest::option::of(0..partners),
            proptest::collection::vec(proptest::bool::weighted(0.2), partners),
            any::<bool>(),
        ),
        (
            proptest::option::of(0i64..72),
            proptest::bool::weighted(0.2),
            proptest::collection::vec(
                (
                    0..partners,
                    any::<bool>(),
                    any::<bool>(),
                    proptest::bool::weighted(0.8),
                    0i64..400,
                ),
                0..4,
            ),
            proptest::option::of(0..=partners),
            now,
        ),
    )
        .prop_map(
            |(
                (record, submitter, submitter_kind, registered_gp, care_team, ndoo_listed),
                (ndoo_age_hours, type1_listed, consents, break_glass, now),
            )| Case {
                record,
                submitter,
                submitter_kind,
                registered_gp,
                care_team,
                ndoo_listed,
                ndoo_age_hours,
                type1_listed,
                consents,
                break_glass,
                now,
            },
        )
}

fn submitter(case: &Case) -> PartnerRef {
    let partners = bundle().partners();
    match partners.get(case.submitter) {
        Some(partner) if case.submitter_kind == 0 => partner.reference(),
        Some(partner) => PartnerRef {
            kind: PartnerKind::ALL[case.submitter_kind],
            ..partner.reference()
        },
        None => PartnerRef {
            id: PartnerId::parse("not-in-the-ics").unwrap(),
            ods: caregate_fhir::ods::OdsCode::parse("Y99999").unwrap(),
            kind: PartnerKind::ALL[case.submitter_kind],
        },
    }
}

/// The same case decided three ways; all three must agree exactly.
fn check(case: &Case) -> Result<(), TestCaseError> {
    let bundle = bundle();
    let partners = bundle.partners();
    let submitter = submitter(case);
    let mut facts = RecordFacts::from_resource(&records()[case.record], &submitter);
    if let Some(requester) = case.break_glass {
        let requester = partners.get(requester).map_or_else(
            || PartnerId::parse("not-in-the-ics").unwrap(),
            |partner| partner.id.clone(),
        );
        facts = facts.with_break_glass(BreakGlass::new(requester, "emergency").unwrap());
    }
    let mut registry = ConsentRegistry::new(Duration::hours(24));
    if let Some(age) = case.ndoo_age_hours {
        let listed = if case.ndoo_listed {
            format!("{PATIENT}\n")
        } else {
            String::new()
        };
        registry
            .load_ndoo(&listed, case.now - Duration::hours(age))
            .unwrap();
    }
    if case.type1_listed {
        registry.load_type1(&format!("{PATIENT}\n")).unwrap();
    }
    if let Some(nhs) = facts.nhs_number().cloned() {
        if let Some(gp) = case.registered_gp.and_then(|index| partners.get(index)) {
            registry.note_registered_gp(&nhs, &gp.ods);
        }
        for (index, member) in case.care_team.iter().enumerate() {
            if *member {
                registry.note_relationship(&nhs, &partners[index].id, "EpisodeOfCare/e", true);
            }
        }
    }
    for (index, permit, by_kind, active, day) in &case.consents {
        let partner = &partners[*index];
        let actor = if *by_kind {
            json!({"system": PARTNER_KIND_SYSTEM, "value": partner.kind.as_str()})
        } else {
            json!({"system": ODS, "value": partner.ods.as_str()})
        };
        let effect = if *permit { "permit" } else { "deny" };
        registry
            .record_consent(&consent(effect, actor, *active, *day), &partners[0].id)
            .unwrap();
    }
    registry.observe(&facts);
    let view = registry.view(facts.nhs_number());

    let expected = reference::decide(&facts, &view, bundle, case.now);
    let memoised_first = decide(&facts, &view, bundle, case.now);
    let memoised_again = decide(&facts, &view, bundle, case.now);
    let uncached = decide_uncached(&facts, &view, bundle, case.now);
    prop_assert_eq!(
        &uncached,
        &expected,
        "decide_uncached differs from the reference"
    );
    prop_assert_eq!(
        &memoised_first,
        &expected,
        "decide differs from the reference"
    );
    prop_assert_eq!(&memoised_again, &expected, "a memoised decision differs");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn fast_decide_equals_the_straightforward_evaluation(case in case()) {
        check(&case)?;
    }
}

/// Every shipped record from every partner on every boundary day, no consent choices: the
/// common situations, exhaustively.
#[test]
fn fast_decide_equals_the_straightforward_evaluation_for_every_record_submitter_and_day() {
    let partners = bundle().partners().len();
    for record in 0..records().len() {
        for submitter in 0..=partners {
            for &now in BOUNDARY_DAYS {
                let case = Case {
                    record,
                    submitter,
                    submitter_kind: 0,
                    registered_gp: Some(0),
                    care_team: vec![false; partners],
                    ndoo_listed: false,
                    ndoo_age_hours: Some(1),
                    type1_listed: false,
                    consents: Vec::new(),
                    break_glass: None,
                    now,
                };
                if let Err(error) = check(&case) {
                    panic!("{case:?}: {error}");
                }
            }
        }
    }
}

#[test]
fn the_memo_is_keyed_by_situation_not_by_time_of_day() {
    let bundle = PolicyBundle::load(&policies()).unwrap();
    let trust = bundle.partners()[0].reference();
    let facts = RecordFacts::from_resource(&records()[0], &trust);
    let registry = ConsentRegistry::new(Duration::hours(24));
    let view = registry.view(facts.nhs_number());
    let now = datetime!(2025-06-01 12:00 UTC);
    let first = decide(&facts, &view, &bundle, now);
    assert_eq!(bundle.answer_memo.len(), 1);
    // The same situation an hour later: answered from the memo, stamped with its own time.
    let later = decide(&facts, &view, &bundle, now + Duration::hours(1));
    assert_eq!(bundle.answer_memo.len(), 1);
    assert_eq!(later.decided_at, now + Duration::hours(1));
    assert_eq!(
        Decision {
            decided_at: now,
            ..later
        },
        first
    );
    // Another day is another situation (agreements start and end on days).
    let _ = decide(&facts, &view, &bundle, now + Duration::days(1));
    assert_eq!(bundle.answer_memo.len(), 2);
}
