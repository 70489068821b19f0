//! Strict JSON: `caregate_fhir::json::parse_strict` under several depth limits (DOMAIN.md B2 row
//! B3: depth, duplicate keys, invalid UTF-8, BOMs, huge numbers).
//!
//! Properties beyond "no panic" (and no stack overflow, which libFuzzer reports as a crash):
//! - monotonic in the limit: accepted under a limit ⇒ accepted, as the same value, under every
//!   larger limit; refused under a limit ⇒ refused under every smaller one;
//! - an accepted value's nesting depth is within the limit;
//! - an accepted value re-serialises (serde_json) and re-parses to the same value, unless it holds
//!   a U+FEFF inside a string: the input may spell it `\uFEFF`, and serde_json writes the raw
//!   character, which the BOM policy refuses by design (json.rs module docs).
#![no_main]

use caregate_fhir::json::{JsonLimits, parse_strict};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const LIMITS: [usize; 5] = [1, 2, 8, 64, 127];

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn holds_bom(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\u{FEFF}'),
        Value::Array(items) => items.iter().any(holds_bom),
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| k.contains('\u{FEFF}') || holds_bom(v)),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut accepted: Option<(usize, Value)> = None;
    for max_depth in LIMITS {
        let limits = JsonLimits { max_depth };
        match (parse_strict(data, &limits), &accepted) {
            (Ok(value), None) => {
                assert!(
                    depth(&value) <= max_depth,
                    "depth {} > {max_depth}",
                    depth(&value)
                );
                if !holds_bom(&value) {
                    let text = serde_json::to_vec(&value).expect("a Value serialises");
                    let again = parse_strict(&text, &limits)
                        .expect("re-serialised accepted value must parse under the same limit");
                    assert_eq!(again, value, "re-parse changed the value");
                }
                accepted = Some((max_depth, value));
            }
            (Ok(value), Some((_, first))) => assert_eq!(&value, first, "limit changed the value"),
            (Err(_), Some((first_limit, _))) => {
                panic!("accepted under depth {first_limit} but refused under {max_depth}")
            }
            (Err(issue), None) => assert!(!issue.diagnostics.is_empty()),
        }
    }
});
