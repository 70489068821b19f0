//! Pseudonymising one resource for a feed (issue 5 targets: ≤ 5 µs for 2 KB, ≤ 40 µs for 8 KB).
//! The input is an already-parsed `serde_json::Value` (the export parses each log entry once).
//! `<size>` transforms a borrowed resource (`Transformer::apply`, which copies it first);
//! `<size>/owned` is the export's path: it owns the parsed entry and the transform consumes it
//! (`Transformer::apply_owned`). Both include dropping the output; the copy made for
//! `/owned` in setup is not timed.

use std::hint::black_box;
use std::path::Path;

use caregate_feeds::transform::{RecordContext, Transformer};
use caregate_feeds::{FeedDefinition, FeedKey};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

fn observation(components: usize) -> Value {
    let component = |i: usize| {
        json!({
            "code": { "coding": [{ "system": "http://snomed.info/sct", "code": format!("27164{i:04}"), "display": "Systolic blood pressure" }], "text": "free text" },
            "valueQuantity": { "value": 120 + i, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]" }
        })
    };
    json!({
        "resourceType": "Observation", "id": "obs-1", "status": "final",
        "identifier": [{ "system": "https://gp-a81001.northshire-ics.example/Id/record", "value": "0000000000000001-000001-001" }],
        "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs", "display": "Vital Signs" }] }],
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "75367002", "display": "Blood pressure" }] },
        "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9434765919" }, "display": "Jane Smith" },
        "effectiveDateTime": "2025-03-04T10:00:00Z", "issued": "2025-03-04T10:05:00Z",
        "performer": [{ "identifier": { "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "A81001" } }],
        "note": [{ "text": "Patient seemed well; spoke to her daughter on 01632 960123." }],
        "component": (0..components).map(component).collect::<Vec<_>>(),
    })
}

fn bench(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policies/feeds/icb-qe1-population-health.toml");
    // A definition that no longer loads must fail the bench loudly, not skip it.
    let definition = match FeedDefinition::load(&path) {
        Ok(definition) => definition,
        Err(error) => panic!("the shipped feed definition does not load: {error}"),
    };
    let key = FeedKey::from_secret(&definition.id, 1, &[7; 32]);
    let transformer = Transformer::new(&definition, &key);
    let context = RecordContext {
        partner: "gp-a81001",
        nhs_number: Some("9434765919"),
        as_of: time::macros::date!(2025 - 06 - 01),
    };
    let mut group = c.benchmark_group("feeds/pseudonymise");
    for (name, target) in [("2KB", 2048), ("8KB", 8192)] {
        let mut components = 1;
        while observation(components).to_string().len() < target {
            components += 1;
        }
        let resource = observation(components);
        group.bench_function(name, |b| {
            b.iter(|| transformer.apply(black_box(&resource), &context))
        });
        group.bench_function(format!("{name}/owned"), |b| {
            b.iter_batched(
                || resource.clone(),
                |resource| {
                    black_box(transformer.apply_owned(black_box(resource), &context));
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
