//! The consent/IG decision for one typical record under the shipped bundle (issue 3's target:
//! ≤ 20 µs median). Inputs: a blood-pressure Observation from the acute trust about a patient
//! whose registered GP is known, and a Patient registration; the bundle is `policies/`.
//!
//! - `observation_from_trust`: `decide` as the gateway calls it. The record's situation (every
//!   fact Cedar sees) repeats, so after the first iteration Cedar's answers come from the
//!   bundle's memo: the cost of a record like ones decided recently.
//! - `observation_from_trust_uncached`: `decide_uncached`, which always asks Cedar: the cost of
//!   a situation not seen before (the memo's miss path).

use std::path::Path;

use caregate_fhir::Validator;
use caregate_fhir::validate::{Validated, ValidatorConfig};
use caregate_policy::{
    ConsentRegistry, PartnerId, PolicyBundle, RecordFacts, decide, decide_uncached,
};
use criterion::{Criterion, criterion_group, criterion_main};

fn load(validator: &Validator, path: &Path) -> caregate_fhir::ValidatedResource {
    let bytes = std::fs::read(path).expect("policy test record");
    match validator
        .validate_bytes(&bytes, None)
        .expect("valid record")
    {
        Validated::Resource(resource) => resource,
        Validated::Bundle(_) => panic!("expected a single resource"),
    }
}

fn decision(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let bundle = PolicyBundle::load(&root).expect("the shipped bundle loads");
    let validator = Validator::new(ValidatorConfig::default()).expect("schemas");
    let trust = bundle
        .partner(&PartnerId::parse("trust-rx1").expect("id"))
        .expect("trust in the ICS model")
        .reference();
    let registration = load(
        &validator,
        &root.join("tests/records/patient-registration.json"),
    );
    let observation = load(&validator, &root.join("tests/records/observation-bp.json"));
    let mut consent = ConsentRegistry::new(time::Duration::days(28));
    consent.observe(&RecordFacts::from_resource(&registration, &trust));
    let now = time::OffsetDateTime::now_utc();

    let mut group = c.benchmark_group("decide");
    group.bench_function("observation_from_trust", |b| {
        b.iter(|| {
            let facts = RecordFacts::from_resource(&observation, &trust);
            decide(&facts, &consent.view(facts.nhs_number()), &bundle, now)
        })
    });
    group.bench_function("observation_from_trust_uncached", |b| {
        b.iter(|| {
            let facts = RecordFacts::from_resource(&observation, &trust);
            decide_uncached(&facts, &consent.view(facts.nhs_number()), &bundle, now)
        })
    });
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
