//! Property tests of the two promises the decision core makes (DESIGN invariants 2 and 3):
//! - `sens_1_never_delivered_to_a_partner_the_rule_does_not_allow`: a record with a sensitive code
//!   goes only to a partner cleared for every category in it that is the patient's registered GP
//!   or in their care team, and never into a feed;
//! - `ndoo_1_t1_1_opted_out_patients_never_in_secondary_use`: an NDOO patient (or any patient
//!   while the NDOO cache is stale) and a Type 1 patient's GP-sourced record are never in a feed;
//! - and a patient's active dissent from a partner is never overridden (`CONSENT-DISSENT`).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::path::Path;
use std::sync::OnceLock;

use caregate_fhir::validate::{Validated, ValidatorConfig};
use caregate_fhir::{ValidatedResource, Validator};
use caregate_policy::{BreakGlass, ConsentRegistry, PolicyBundle, RecordFacts, decide};
use proptest::prelude::*;
use serde_json::{Value, json};
use time::Duration;
use time::macros::datetime;

const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";
const ODS: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const PATIENT: &str = "9434765919";

fn bundle() -> &'static PolicyBundle {
    static BUNDLE: OnceLock<PolicyBundle> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        PolicyBundle::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")).unwrap()
    })
}

fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| Validator::new(ValidatorConfig::default()).unwrap())
}

fn validate(value: Value) -> ValidatedResource {
    match validator().validate_value(value, None).unwrap() {
        Validated::Resource(resource) => resource,
        Validated::Bundle(_) => panic!("single resources only"),
    }
}

fn subject() -> Value {
    json!({"reference": "Patient/p1", "identifier": {"system": NHS, "value": PATIENT}})
}

/// (system, code) pairs: a sensitive one from each list, and harmless ones.
const CODES: &[(&str, &str)] = &[
    ("http://snomed.info/sct", "105629000"),
    ("http://snomed.info/sct", "52637005"),
    ("http://snomed.info/sct", "93461009"),
    ("http://snomed.info/sct", "386639001"),
    ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "SDV"),
    ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "STD"),
    ("http://snomed.info/sct", "75367002"),
    ("http://snomed.info/sct", "38341003"),
];

/// Where in the record the code goes.
#[derive(Debug, Clone, Copy)]
enum Place {
    Code,
    Contained,
    Extension,
    Security,
}

fn record(kind: usize, code: (&str, &str), place: Place) -> Value {
    let coding = json!({"system": code.0, "code": code.1});
    let mut value = match kind {
        0 => {
            json!({"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}, "subject": subject()})
        }
        1 => {
            json!({"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order", "medicationCodeableConcept": {"text": "x"}, "subject": subject()})
        }
        2 => {
            json!({"resourceType": "CarePlan", "id": "c1", "status": "active", "intent": "plan", "subject": subject()})
        }
        3 => {
            json!({"resourceType": "Flag", "id": "f1", "status": "active", "code": {"text": "x"}, "subject": subject()})
        }
        _ => {
            json!({"resourceType": "Condition", "id": "d1", "code": {"text": "x"}, "subject": subject()})
        }
    };
    let map = value.as_object_mut().unwrap();
    match place {
        Place::Code if map.contains_key("code") => {
            map.insert("code".into(), json!({"coding": [coding]}));
        }
        Place::Contained | Place::Code => {
            map.insert(
                "contained".into(),
                json!([{"resourceType": "Condition", "id": "k1", "code": {"coding": [coding]}, "subject": subject()}]),
            );
            map.insert(
                "extension".into(),
                json!([{"url": "https://example.org/ref", "valueReference": {"reference": "#k1"}}]),
            );
        }
        Place::Extension => {
            map.insert("extension".into(), json!([{"url": "https://example.org/x", "valueCodeableConcept": {"coding": [coding]}}]));
        }
        Place::Security => {
            map.insert("meta".into(), json!({"security": [coding]}));
        }
    }
    value
}

fn consent(effect: &str, actor: Value, status: &str) -> Value {
    json!({
        "resourceType": "Consent", "id": format!("cn-{}", actor["value"].as_str().unwrap_or("x")), "status": status,
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": subject(), "dateTime": "2025-01-01",
        "provision": {"type": effect, "actor": [{
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
            "reference": {"identifier": actor}}]}
    })
}

#[derive(Debug, Clone)]
struct Scenario {
    kind: usize,
    code: usize,
    place: u8,
    submitter: usize,
    registered_gp: Option<usize>,
    care_team: Vec<bool>,
    ndoo: bool,
    ndoo_age_hours: i64,
    type1: bool,
    consents: Vec<(usize, bool, bool)>,
    break_glass: Option<usize>,
    now_day: i64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        0usize..5,
        0usize..CODES.len(),
        0u8..4,
        0usize..9,
        proptest::option::of(0usize..3),
        proptest::collection::vec(any::<bool>(), 9),
        any::<bool>(),
        0i64..72,
        any::<bool>(),
        proptest::collection::vec((0usize..9, any::<bool>(), any::<bool>()), 0..4),
        proptest::option::of(0usize..9),
        -400i64..800,
    )
        .prop_map(
            |(
                kind,
                code,
                place,
                submitter,
                registered_gp,
                care_team,
                ndoo,
                ndoo_age_hours,
                type1,
                consents,
                break_glass,
                now_day,
            )| Scenario {
                kind,
                code,
                place,
                submitter,
                registered_gp,
                care_team,
                ndoo,
                ndoo_age_hours,
                type1,
                consents,
                break_glass,
                now_day,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn sens_1_ndoo_1_t1_1_invariants_hold_for_random_records_and_consent(s in scenario()) {
        let bundle = bundle();
        let partners = bundle.partners();
        let gps: Vec<_> = partners.iter().filter(|p| p.kind == caregate_policy::PartnerKind::Gp).collect();
        let now = datetime!(2025-06-01 12:00 UTC) + Duration::days(s.now_day);
        let place = [Place::Code, Place::Contained, Place::Extension, Place::Security][usize::from(s.place)];
        let resource = validate(record(s.kind, CODES[s.code], place));
        let submitter = partners[s.submitter].reference();
        let mut facts = RecordFacts::from_resource(&resource, &submitter);
        if let Some(requester) = s.break_glass {
            facts = facts.with_break_glass(BreakGlass::new(partners[requester].id.clone(), "emergency").unwrap());
        }
        let nhs = facts.nhs_number().unwrap().clone();

        let mut registry = ConsentRegistry::new(Duration::hours(24));
        let listed = if s.ndoo { format!("{PATIENT}\n") } else { String::new() };
        registry.load_ndoo(&listed, now - Duration::hours(s.ndoo_age_hours)).unwrap();
        if s.type1 {
            registry.load_type1(&format!("{PATIENT}\n")).unwrap();
        }
        let registered = s.registered_gp.map(|index| gps[index]);
        if let Some(gp) = registered {
            registry.note_registered_gp(&nhs, &gp.ods);
        }
        for (index, member) in s.care_team.iter().enumerate() {
            if *member {
                registry.note_relationship(&nhs, &partners[index].id, "EpisodeOfCare/e", true);
            }
        }
        for (index, permit, by_kind) in &s.consents {
            let partner = &partners[*index];
            let actor = if *by_kind {
                json!({"system": caregate_policy::PARTNER_KIND_SYSTEM, "value": partner.kind.as_str()})
            } else {
                json!({"system": ODS, "value": partner.ods.as_str()})
            };
            let effect = if *permit { "permit" } else { "deny" };
            registry.record_consent(&validate(consent(effect, actor, "active")), &partners[0].id).unwrap();
        }
        registry.observe(&facts);
        let view = registry.view(Some(&nhs));
        let decision = decide(&facts, &view, bundle, now);

        // SENS-1: only cleared partners with a relationship; never a feed.
        if !decision.sensitive_categories.is_empty() {
            for delivery in &decision.deliver_to {
                let partner = bundle.partner(&delivery.partner).unwrap();
                let cleared = decision.sensitive_categories.iter().all(|c| partner.sensitive_allowed.contains(c));
                let registered_gp = registered.is_some_and(|gp| gp.id == partner.id);
                let care_team = view.care_team().any(|id| *id == partner.id);
                prop_assert!(cleared && (registered_gp || care_team), "SENS-1 broken: {:?} got {:?}", partner.id, decision.sensitive_categories);
            }
            prop_assert_eq!(decision.included_feeds().count(), 0, "SENS-1: sensitive record in a feed");
        }
        // NDOO-1, NDOO-6, T1-1: opted-out patients never in a secondary-use feed.
        let stale = s.ndoo_age_hours > 24;
        if s.ndoo || stale || (s.type1 && facts.gp_sourced()) {
            prop_assert_eq!(decision.included_feeds().count(), 0, "opted-out patient in a feed");
        }
        // CONSENT-DISSENT: never delivered to a partner the newest consent denies.
        for delivery in &decision.deliver_to {
            let partner = bundle.partner(&delivery.partner).unwrap();
            prop_assert_ne!(view.consent_for(&partner.reference(), now), caregate_policy::ConsentFor::Deny);
        }
        // Every delivery names an agreement in force that lists both parties.
        for delivery in &decision.deliver_to {
            let agreement = bundle.agreement(&delivery.agreement).unwrap();
            prop_assert!(agreement.parties.contains(&delivery.partner) && agreement.parties.contains(&submitter.id));
            prop_assert!(agreement.in_force_from <= now.date() && now.date() <= agreement.in_force_until);
        }
        // Break-glass is flagged only when a break-glass was requested.
        prop_assert!(!decision.break_glass || s.break_glass.is_some());
    }
}
