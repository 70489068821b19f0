//! The consent/IG decision over arbitrary records (issue 9; DESIGN invariants 2 and 3): untrusted
//! bytes are validated exactly as the gateway's intake does (`Validator::validate_bytes`, no type
//! named by the URL), and every record that passes — a single resource, a stored Bundle, or each
//! entry of a transaction/batch Bundle — is decided under the shipped bundle in `policies/` with
//! consent state chosen by the fuzzer, the way `gateway::policy_stage::PolicyStage::decide` does
//! (learn what the record itself says, then `decide`).
//!
//! Input: a 12-byte header, then the body.
//! - byte 0: submitter (index into the bundle's partners)
//! - byte 1: flags — 0x01 the patient is on the NDOO list, 0x02 on the Type 1 list, 0x04 the NDOO
//!   list was never loaded, 0x08 a registered GP is noted, 0x10 break-glass is requested,
//!   0x20 the record itself was committed earlier (observed, and recorded if it is a Consent),
//!   0x40 a bad NDOO file is offered after the good one (must leave the good one in force)
//! - byte 2: NDOO list age in hours (0..=71; the cache allows 24)
//! - byte 3: registered GP (index into the GP partners); byte 4: break-glass requester
//! - bytes 5-6: care-team bitmask over the partners
//! - bytes 7-8: the decision date, days after 2024-06-01 (0..=1199)
//! - byte 9: number of Consents (0..=3) from bytes 10-11 and the high bits of the others: for each,
//!   the actor partner, permit/deny, by ODS code or partner kind, active or inactive
//!
//! Properties beyond "no panic" (those of `crates/policy/tests/invariants.rs`, plus):
//! - SENS-1: a record with a sensitive code goes only to partners cleared for every category found
//!   that are the registered GP or in the care team, and never into a feed;
//! - NDOO-1/NDOO-6/T1-1: NDOO patients, any patient while the NDOO cache is not fresh, and Type 1
//!   patients' GP-sourced records are never in a secondary-use feed;
//! - CONSENT-DISSENT: never delivered to a partner the patient's consent denies;
//! - every delivery names an agreement in force listing both parties, never the submitter itself,
//!   and a partner is either delivered to or withheld, not both;
//! - break-glass is flagged only when requested;
//! - `decide` is deterministic, its JSON round-trips, and neither the stored decision nor the
//!   explanation contains the patient's NHS number.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use caregate_fhir::bundle::ValidatedBundle;
use caregate_fhir::validate::{Validated, ValidatorConfig};
use caregate_fhir::{ResourceType, ValidatedResource, Validator};
use caregate_policy::{
    BreakGlass, ConsentFor, ConsentRegistry, Decision, NdooFreshness, PARTNER_KIND_SYSTEM, Partner,
    PartnerKind, PolicyBundle, RecordFacts, decide, explain,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use time::Duration;
use time::macros::datetime;

const HEADER: usize = 12;
const ODS: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const NDOO_MAX_AGE_HOURS: i64 = 24;

static BUNDLE: LazyLock<PolicyBundle> = LazyLock::new(|| {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    PolicyBundle::load(&dir).expect("the shipped policy bundle loads")
});

static VALIDATOR: LazyLock<Validator> = LazyLock::new(|| {
    let config = ValidatorConfig {
        max_bundle_entries: 20,
        ..ValidatorConfig::default()
    };
    Validator::new(config).expect("the built-in schemas compile")
});

/// The consent state the fuzzer chose (see the module docs).
struct State {
    submitter: usize,
    flags: u8,
    ndoo_age_hours: i64,
    registered_gp: usize,
    break_glass: usize,
    care_team: u16,
    day: i64,
    consents: Vec<(usize, bool, bool, bool)>,
}

impl State {
    fn parse(header: &[u8]) -> State {
        let consents = (0..usize::from(header[9] % 4))
            .map(|n| {
                let bits = header[10 + n.min(1)] >> (4 * (n / 2));
                (
                    usize::from(header[9] >> 2) + n * 7,
                    bits & 1 != 0,
                    bits & 2 != 0,
                    bits & 4 == 0,
                )
            })
            .collect();
        State {
            submitter: usize::from(header[0]),
            flags: header[1],
            ndoo_age_hours: i64::from(header[2] % 72),
            registered_gp: usize::from(header[3]),
            break_glass: usize::from(header[4]),
            care_team: u16::from_le_bytes([header[5], header[6]]),
            day: i64::from(u16::from_le_bytes([header[7], header[8]]) % 1200),
            consents,
        }
    }

    fn flag(&self, bit: u8) -> bool {
        self.flags & bit != 0
    }
}

fn consent(
    nhs_number: &str,
    partner: &Partner,
    permit: bool,
    by_kind: bool,
    active: bool,
) -> Value {
    let actor = if by_kind {
        json!({"system": PARTNER_KIND_SYSTEM, "value": partner.kind.as_str()})
    } else {
        json!({"system": ODS, "value": partner.ods.as_str()})
    };
    json!({
        "resourceType": "Consent", "id": format!("cn-{}", partner.id.as_str()),
        "status": if active { "active" } else { "inactive" },
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs_number}},
        "dateTime": "2024-01-01",
        "provision": {"type": if permit { "permit" } else { "deny" }, "actor": [{
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
            "reference": {"identifier": actor}}]}
    })
}

fn check(resource: &ValidatedResource, state: &State) {
    let bundle = &*BUNDLE;
    let partners = bundle.partners();
    let gps: Vec<&Partner> = partners
        .iter()
        .filter(|p| p.kind == PartnerKind::Gp)
        .collect();
    let submitter = &partners[state.submitter % partners.len()];
    let now = datetime!(2024-06-01 12:00 UTC) + Duration::days(state.day);

    let mut facts = RecordFacts::from_resource(resource, &submitter.reference());
    let requester = state
        .flag(0x10)
        .then(|| &partners[state.break_glass % partners.len()]);
    if let Some(requester) = requester {
        facts = facts.with_break_glass(
            BreakGlass::new(requester.id.clone(), "emergency department attendance")
                .expect("a reason is given"),
        );
    }
    let nhs = facts.nhs_number().map(|n| n.as_str().to_owned());

    let mut registry = ConsentRegistry::new(Duration::hours(NDOO_MAX_AGE_HOURS));
    let listed = match (&nhs, state.flag(0x01)) {
        (Some(number), true) => format!("{number}\r\n\n9434765919\n"),
        _ => "9434765919\n".to_owned(),
    };
    if !state.flag(0x04) {
        let loaded = now - Duration::hours(state.ndoo_age_hours);
        registry
            .load_ndoo(&listed, loaded)
            .expect("a well-formed NDOO list loads");
        if state.flag(0x40) {
            // NDOO-6: a bad file is refused whole and the old list stays in force.
            assert!(
                registry
                    .load_ndoo("9434765919\nnot a number\n", now)
                    .is_err()
            );
            assert_eq!(registry.ndoo_cache().loaded_at, Some(loaded));
        }
    }
    if state.flag(0x02)
        && let Some(number) = &nhs
    {
        registry
            .load_type1(&format!("{number}\n"))
            .expect("a well-formed Type 1 list loads");
    }
    if let Some(number) = facts.nhs_number().cloned() {
        if state.flag(0x08) && !gps.is_empty() {
            registry.note_registered_gp(&number, &gps[state.registered_gp % gps.len()].ods);
        }
        for (index, partner) in partners.iter().enumerate().take(16) {
            if state.care_team & (1 << index) != 0 {
                registry.note_relationship(&number, &partner.id, "EpisodeOfCare/fuzz", true);
            }
        }
        for &(actor, permit, by_kind, active) in &state.consents {
            let actor = &partners[actor % partners.len()];
            let value = consent(number.as_str(), actor, permit, by_kind, active);
            let Ok(Validated::Resource(resource)) = VALIDATOR.validate_value(value, None) else {
                panic!("the harness's Consent does not validate");
            };
            registry
                .record_consent(&resource, &partners[0].id)
                .expect("the harness's Consent is recorded");
        }
    }
    if state.flag(0x20) {
        // The record was committed before: learn from it as `observe_committed` does. A Consent
        // the registry cannot use is refused (the gateway logs it); it must not panic.
        registry.observe(&facts);
        if resource.resource_type() == ResourceType::Consent {
            let _ = registry.record_consent(resource, &submitter.id);
        }
    }
    // PolicyStage::decide learns what the record itself says before deciding.
    if facts.registered_gp().is_some()
        || facts.care_episode().is_some()
        || facts.carries_type1_opt_out()
    {
        registry.observe(&facts);
    }
    let view = registry.view(facts.nhs_number());
    let decision = decide(&facts, &view, bundle, now);

    // Pure and deterministic; the stored form round-trips.
    assert_eq!(
        decision,
        decide(&facts, &view, bundle, now),
        "decide is not deterministic"
    );
    let stored = serde_json::to_string(&decision).expect("a decision serialises");
    let back: Decision = serde_json::from_str(&stored).expect("a stored decision parses");
    assert_eq!(back, decision, "a stored decision does not round-trip");
    assert_eq!(decision.policy_version, bundle.version());
    assert_eq!(decision.submitter, submitter.id);
    // No patient identifier in the stored decision or the explanation.
    let explanation = explain(&decision);
    if let Some(number) = &nhs
        && !bundle.version().contains(number.as_str())
    {
        assert!(
            !stored.contains(number.as_str()),
            "NHS number in a stored decision"
        );
        assert!(
            !explanation.contains(number.as_str()),
            "NHS number in an explanation"
        );
    }

    // SENS-1.
    if !decision.sensitive_categories.is_empty() {
        for delivery in &decision.deliver_to {
            let partner = bundle.partner(&delivery.partner).expect("a known partner");
            let cleared = decision
                .sensitive_categories
                .iter()
                .all(|category| partner.sensitive_allowed.contains(category));
            let registered_gp =
                partner.kind == PartnerKind::Gp && view.registered_gp() == Some(&partner.ods);
            let care_team = view.care_team().any(|id| *id == partner.id);
            assert!(
                cleared && (registered_gp || care_team),
                "SENS-1: {} received a record in {:?} (cleared {cleared}, registered GP \
                 {registered_gp}, care team {care_team})",
                partner.id.as_str(),
                decision.sensitive_categories
            );
        }
        assert_eq!(
            decision.included_feeds().count(),
            0,
            "SENS-1: a sensitive record in a feed"
        );
    }
    // NDOO-1, NDOO-6, T1-1.
    let ndoo_fresh = view.ndoo_cache().freshness(now) == NdooFreshness::Fresh;
    if view.ndoo_opted_out() || !ndoo_fresh || (view.type1_opted_out() && facts.gp_sourced()) {
        assert_eq!(
            decision.included_feeds().count(),
            0,
            "an opted-out patient (or a stale NDOO cache) in a secondary-use feed"
        );
    }
    for delivery in &decision.deliver_to {
        let partner = bundle.partner(&delivery.partner).expect("a known partner");
        // CONSENT-DISSENT.
        assert_ne!(
            view.consent_for(&partner.reference(), now),
            ConsentFor::Deny,
            "delivered to {} against the patient's dissent",
            partner.id.as_str()
        );
        assert_ne!(
            delivery.partner, submitter.id,
            "delivered back to the submitter"
        );
        let agreement = bundle
            .agreement(&delivery.agreement)
            .expect("a delivery names a known agreement");
        assert!(
            agreement.parties.contains(&delivery.partner)
                && agreement.parties.contains(&submitter.id),
            "agreement {} does not list both parties",
            agreement.id
        );
        assert!(
            agreement.in_force_from <= now.date() && now.date() <= agreement.in_force_until,
            "agreement {} not in force",
            agreement.id
        );
        assert!(
            !decision
                .withheld
                .iter()
                .any(|withheld| withheld.partner == delivery.partner),
            "{} both delivered to and withheld",
            partner.id.as_str()
        );
    }
    assert!(
        !decision.break_glass || requester.is_some(),
        "break-glass flagged without a request"
    );
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let (header, body) = data.split_at(HEADER);
    let state = State::parse(header);
    match VALIDATOR.validate_bytes(body, None) {
        Err(_) => {}
        Ok(Validated::Resource(resource)) => check(&resource, &state),
        Ok(Validated::Bundle(ValidatedBundle::Stored { resource, .. })) => check(&resource, &state),
        Ok(Validated::Bundle(ValidatedBundle::Requests { entries, .. })) => {
            for entry in entries {
                if let Ok(resource) = &entry.result {
                    check(resource, &state);
                }
            }
        }
    }
});
