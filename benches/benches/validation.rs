//! Validation hot path: untrusted bytes to a `ValidatedResource` or a `Rejection`.
//!
//! Groups (criterion ids are `group/input`), each with `Throughput::Bytes` of the input:
//! - `validate/*` — `Validator::validate_bytes`, the whole intake check (strict parse, JSON Schema,
//!   UK rules), for the valid and invalid inputs of `caregate_benches::inputs()`;
//! - `parse_strict/*` — `caregate_fhir::json::parse_strict` alone, the first step of the above;
//! - `serde_json_from_slice/*` — plain `serde_json::from_slice::<Value>`, the floor the strict
//!   parser is compared against.
//!
//! Each routine's result is dropped inside the timed loop: freeing the parsed tree is part of the
//! cost of a request. Targets (BENCHMARKS.md) are reported against, never asserted here.

use std::hint::black_box;

use caregate_benches::{Expected, Input, inputs, outcome};
use caregate_fhir::Validator;
use caregate_fhir::json::{JsonLimits, parse_strict};
use caregate_fhir::validate::ValidatorConfig;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::Value;

fn throughput(input: &Input) -> Throughput {
    Throughput::Bytes(u64::try_from(input.bytes.len()).expect("inputs are a few KB"))
}

fn validate(c: &mut Criterion) {
    let validator = Validator::new(ValidatorConfig::default()).expect("built-in schemas compile");
    let mut group = c.benchmark_group("validate");
    for input in inputs() {
        // Measure only what the name says: an input that stopped failing (or passing) for its
        // intended reason would make the number meaningless.
        assert_eq!(
            outcome(&validator, &input.bytes),
            input.expected,
            "{}",
            input.name
        );
        group.throughput(throughput(&input));
        group.bench_function(input.name, |b| {
            b.iter(|| validator.validate_bytes(black_box(&input.bytes), None));
        });
    }
    group.finish();
}

/// The valid inputs, named by size only (`2kb`, `8kb`).
fn valid_inputs() -> Vec<(&'static str, Input)> {
    inputs()
        .into_iter()
        .filter(|input| input.expected == Expected::Valid)
        .map(|input| {
            let size = input
                .name
                .split_once('_')
                .map_or(input.name, |(size, _)| size);
            (size, input)
        })
        .collect()
}

fn parse(c: &mut Criterion) {
    let limits = JsonLimits::default();
    let mut group = c.benchmark_group("parse_strict");
    for (size, input) in valid_inputs() {
        group.throughput(throughput(&input));
        group.bench_function(size, |b| {
            b.iter(|| parse_strict(black_box(&input.bytes), &limits));
        });
    }
    group.finish();

    let mut group = c.benchmark_group("serde_json_from_slice");
    for (size, input) in valid_inputs() {
        group.throughput(throughput(&input));
        group.bench_function(size, |b| {
            b.iter(|| serde_json::from_slice::<Value>(black_box(&input.bytes)));
        });
    }
    group.finish();
}

criterion_group!(benches, validate, parse);
criterion_main!(benches);
