//! FHIR intake: untrusted bytes through `Validator::validate_bytes` — strict JSON, the resource
//! type, the JSON Schema, the UK rules and Bundle handling — exactly as the gateway's handlers call
//! it (DOMAIN.md B2 rows B1 and B3).
//!
//! Input: byte 0 picks the type the URL would name (none, as `caregate validate` and the Bundle
//! endpoint do, or one of the supported types); the rest is the body.
//!
//! Properties beyond "no panic":
//! - a rejection always carries at least one error issue, and no more than the configured bound
//!   plus one (the "too many issues" note);
//! - an accepted resource has the type the URL named and a matching `resourceType`;
//! - an accepted resource's canonical bytes (what the store hashes and keeps) validate again as
//!   the same value — a record the gateway accepted can be read back and resubmitted.
#![no_main]

use std::sync::LazyLock;

use caregate_fhir::validate::{Validated, ValidatorConfig};
use caregate_fhir::{ResourceType, ValidatedResource, Validator};
use libfuzzer_sys::fuzz_target;

static VALIDATOR: LazyLock<Validator> = LazyLock::new(|| {
    let config = ValidatorConfig {
        // Small enough that the fuzzer reaches the bounds quickly.
        max_bundle_entries: 50,
        max_issues: 20,
        ..ValidatorConfig::default()
    };
    Validator::new(config).expect("the built-in schemas compile")
});

fn check_roundtrip(resource: &ValidatedResource) {
    let bytes = resource.canonical_bytes();
    match VALIDATOR.validate_bytes(&bytes, Some(resource.resource_type())) {
        Ok(Validated::Resource(again)) => assert_eq!(
            again.value(),
            resource.value(),
            "re-validating canonical bytes changed the resource"
        ),
        Ok(Validated::Bundle(_)) => {
            assert_eq!(resource.resource_type(), ResourceType::Bundle);
        }
        Err(rejection) => panic!(
            "an accepted {} is refused when its canonical bytes are resubmitted: {:?}",
            resource.resource_type(),
            rejection.outcome.issues
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let types = ResourceType::ALL;
    let expected = match usize::from(selector) % (types.len() + 1) {
        0 => None,
        n => Some(types[n - 1]),
    };
    let max_issues = VALIDATOR.config().max_issues;
    match VALIDATOR.validate_bytes(body, expected) {
        Err(rejection) => {
            assert!(
                rejection.outcome.has_errors(),
                "a rejection without an error issue"
            );
            assert!(
                rejection.outcome.issues.len() <= max_issues + 1,
                "{} issues for a bound of {max_issues}",
                rejection.outcome.issues.len()
            );
        }
        Ok(Validated::Resource(resource)) => {
            if let Some(expected) = expected {
                assert_eq!(resource.resource_type(), expected);
            }
            assert_eq!(
                resource.value()["resourceType"].as_str(),
                Some(resource.resource_type().as_str())
            );
            check_roundtrip(&resource);
        }
        Ok(Validated::Bundle(bundle)) => {
            if let Some(expected) = expected {
                assert_eq!(expected, ResourceType::Bundle);
            }
            match bundle {
                caregate_fhir::bundle::ValidatedBundle::Requests { entries, .. } => {
                    assert!(entries.len() <= VALIDATOR.config().max_bundle_entries);
                    for entry in entries {
                        if let Ok(resource) = &entry.result {
                            check_roundtrip(resource);
                        }
                    }
                }
                caregate_fhir::bundle::ValidatedBundle::Stored { resource, .. } => {
                    assert_eq!(resource.resource_type(), ResourceType::Bundle);
                }
            }
        }
    }
});
