//! Feed pseudonymisation over arbitrary valid records (issue 9, issue 5's DOMAIN.md `PSEU-1`):
//! untrusted bytes are validated as the gateway's intake does, and every record it would store
//! (a single resource, a stored Bundle, each entry of a transaction/batch Bundle) is transformed
//! for every shipped feed in `policies/feeds/` as an export does (`Transformer::apply` with the
//! store's indexed NHS number and the submitting partner).
//!
//! Input: byte 0 picks the submitting partner (bits 0-1) and whether the store indexed an NHS
//! number for the record (bit 2 clear: yes, as it does for every record with one); the rest is
//! the body.
//!
//! Properties beyond "no panic":
//! - **no identifier of the input leaves**: no NHS number (of an NHS-number identifier, a
//!   reference by one, or the indexed one), no name (family, given, prefix, suffix, text of a
//!   HumanName; ≥ 4 characters with a letter and no digit, so a name cannot be a fragment of a
//!   date or a pseudonym) and no full UK postcode (with or without its space) of the input
//!   appears in any string of the output. Arbitrary input may hold the same text in elements a
//!   feed keeps on purpose (a coding's `display` reading "Hypertension" when the family name is
//!   "Hypertension"), so the check is differential: the record is transformed again with the
//!   identifying elements of one kind replaced, and a string found in the first output but not in
//!   the second came from an identifying element — a leak;
//! - the output has the input's `resourceType`, a 26-character base32 `id`, and no `meta` or
//!   `contained`; the transform is deterministic;
//! - pseudonyms are per feed: the patient pseudonym of one feed never appears in another's output
//!   (unless the input itself holds that text in an element a feed keeps).
#![no_main]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::LazyLock;

use caregate_feeds::transform::{RecordContext, Transformer};
use caregate_feeds::{FeedDefinition, FeedKey};
use caregate_fhir::bundle::ValidatedBundle;
use caregate_fhir::identifier::NHS_NUMBER;
use caregate_fhir::validate::{Validated, ValidatorConfig};
use caregate_fhir::{ValidatedResource, Validator};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use time::macros::date;

static FEEDS: LazyLock<Vec<(FeedDefinition, FeedKey)>> = LazyLock::new(|| {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/feeds");
    let definitions = FeedDefinition::load_dir(&dir).expect("the shipped feed definitions load");
    assert!(!definitions.is_empty(), "no feed definitions shipped");
    definitions
        .into_iter()
        .enumerate()
        .map(|(n, definition)| {
            let secret = [u8::try_from(n).unwrap_or(0) ^ 0x5a; 32];
            let key = FeedKey::from_secret(&definition.id, 1, &secret);
            (definition, key)
        })
        .collect()
});

static VALIDATOR: LazyLock<Validator> = LazyLock::new(|| {
    let config = ValidatorConfig {
        max_bundle_entries: 20,
        ..ValidatorConfig::default()
    };
    Validator::new(config).expect("the built-in schemas compile")
});

const PARTNERS: [&str; 4] = ["gp-a81001", "trust-rx1", "pharmacy-fa123", "council-qe1"];

/// The kinds of identifying element checked, each replaced on its own for the second output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NhsNumber,
    Name,
    Postcode,
}

/// Replacements that cannot contain a secret of their kind.
const NAME_STANDIN: &str = "~~~~";
const NHS_STANDINS: [&str; 2] = ["9434765919", "9876544322"];
const POSTCODE_STANDINS: [&str; 2] = ["ZZ99 3VZ", "ZZ99 3WZ"];

fn digits(text: &str) -> String {
    text.chars().filter(char::is_ascii_digit).collect()
}

fn is_nhs_identifier(object: &serde_json::Map<String, Value>) -> bool {
    object.get("system").and_then(Value::as_str) == Some(NHS_NUMBER)
}

/// A name worth looking for: long enough not to occur by chance, with a letter and no digit.
fn name_secret(text: &str) -> Option<String> {
    let text = text.trim();
    (text.chars().count() >= 4
        && text.chars().any(char::is_alphabetic)
        && !text.chars().any(|c| c.is_ascii_digit()))
    .then(|| text.to_owned())
}

/// A full UK postcode (outward and inward code), normalised to upper case without spaces.
fn postcode_secret(text: &str) -> Option<String> {
    let compact: String = text
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    let bytes = compact.as_bytes();
    let n = bytes.len();
    if !(5..=7).contains(&n) || !compact.is_ascii() {
        return None;
    }
    let (outward, inward) = compact.split_at(n - 3);
    let inward = inward.as_bytes();
    let outward_ok = outward.as_bytes()[0].is_ascii_alphabetic()
        && outward.bytes().all(|b| b.is_ascii_alphanumeric())
        && outward.bytes().any(|b| b.is_ascii_digit());
    let inward_ok = inward[0].is_ascii_digit()
        && inward[1].is_ascii_alphabetic()
        && inward[2].is_ascii_alphabetic();
    (outward_ok && inward_ok).then_some(compact)
}

/// The identifying strings of the record, per kind.
#[derive(Default)]
struct Secrets {
    nhs: BTreeSet<String>,
    names: BTreeSet<String>,
    postcodes: BTreeSet<String>,
}

impl Secrets {
    fn collect(value: &Value, secrets: &mut Secrets) {
        match value {
            Value::Object(object) => {
                if is_nhs_identifier(object)
                    && let Some(number) = object.get("value").and_then(Value::as_str)
                {
                    let number = digits(number);
                    if number.len() == 10 {
                        secrets.nhs.insert(number);
                    }
                }
                for (key, child) in object {
                    match (key.as_str(), child) {
                        ("name", Value::Array(names)) => {
                            for name in names {
                                Self::human_name(name, secrets);
                            }
                        }
                        ("name", name @ Value::Object(_)) => Self::human_name(name, secrets),
                        ("postalCode", Value::String(code)) => {
                            if let Some(code) = postcode_secret(code) {
                                secrets.postcodes.insert(code);
                            }
                        }
                        ("reference", Value::String(reference)) => {
                            if let Some((_, number)) = reference.split_once("nhs-number|") {
                                let number = digits(number);
                                if number.len() == 10 {
                                    secrets.nhs.insert(number);
                                }
                            }
                        }
                        _ => {}
                    }
                    Self::collect(child, secrets);
                }
            }
            Value::Array(items) => {
                for item in items {
                    Self::collect(item, secrets);
                }
            }
            _ => {}
        }
    }

    fn human_name(name: &Value, secrets: &mut Secrets) {
        let Some(name) = name.as_object() else { return };
        for part in ["family", "text", "given", "prefix", "suffix"] {
            match name.get(part) {
                Some(Value::String(text)) => secrets.names.extend(name_secret(text)),
                Some(Value::Array(items)) => secrets.names.extend(
                    items
                        .iter()
                        .filter_map(Value::as_str)
                        .filter_map(name_secret),
                ),
                _ => {}
            }
        }
    }

    /// The forms a secret of `kind` may take in output text.
    fn forms(&self, kind: Kind) -> Vec<String> {
        match kind {
            Kind::NhsNumber => self
                .nhs
                .iter()
                .flat_map(|n| [n.clone(), format!("{} {} {}", &n[..3], &n[3..6], &n[6..])])
                .collect(),
            Kind::Name => self.names.iter().cloned().collect(),
            Kind::Postcode => self
                .postcodes
                .iter()
                .flat_map(|p| {
                    [
                        p.clone(),
                        format!("{} {}", &p[..p.len() - 3], &p[p.len() - 3..]),
                    ]
                })
                .collect(),
        }
    }
}

fn nhs_standin(secrets: &Secrets) -> &'static str {
    NHS_STANDINS
        .into_iter()
        .find(|s| !secrets.nhs.contains(*s))
        .unwrap_or(NHS_STANDINS[0])
}

/// `value` with the identifying elements of `kind` replaced by stand-ins.
fn replace(value: &Value, kind: Kind, secrets: &Secrets) -> Value {
    let nhs_standin = nhs_standin(secrets);
    let postcode_standin = POSTCODE_STANDINS
        .into_iter()
        .find(|s| postcode_secret(s).is_none_or(|p| !secrets.postcodes.contains(&p)))
        .unwrap_or(POSTCODE_STANDINS[0]);
    fn walk(value: &mut Value, kind: Kind, nhs: &str, postcode: &str, secrets: &Secrets) {
        match value {
            Value::Object(object) => {
                if kind == Kind::NhsNumber
                    && is_nhs_identifier(object)
                    && object.contains_key("value")
                {
                    object.insert("value".into(), Value::String(nhs.to_owned()));
                }
                for (key, child) in object.iter_mut() {
                    match (kind, key.as_str(), &mut *child) {
                        (Kind::Name, "name", Value::Array(names)) => {
                            names.iter_mut().for_each(blank_name);
                        }
                        (Kind::Name, "name", name @ Value::Object(_)) => blank_name(name),
                        (Kind::Postcode, "postalCode", Value::String(code)) => {
                            *code = postcode.to_owned();
                        }
                        (Kind::NhsNumber, "reference", Value::String(reference)) => {
                            for number in &secrets.nhs {
                                *reference = reference.replace(number.as_str(), nhs);
                            }
                        }
                        _ => {}
                    }
                    walk(child, kind, nhs, postcode, secrets);
                }
            }
            Value::Array(items) => {
                for item in items {
                    walk(item, kind, nhs, postcode, secrets);
                }
            }
            _ => {}
        }
    }
    fn blank_name(name: &mut Value) {
        let Some(name) = name.as_object_mut() else {
            return;
        };
        for part in ["family", "text", "given", "prefix", "suffix"] {
            match name.get_mut(part) {
                Some(Value::String(text)) => *text = NAME_STANDIN.to_owned(),
                Some(Value::Array(items)) => {
                    for item in items.iter_mut().filter(|item| item.is_string()) {
                        *item = Value::String(NAME_STANDIN.to_owned());
                    }
                }
                _ => {}
            }
        }
    }
    let mut value = value.clone();
    walk(&mut value, kind, nhs_standin, postcode_standin, secrets);
    value
}

/// Every string in a JSON value, keys included.
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(text) => out.push(text.clone()),
        Value::Array(items) => items.iter().for_each(|item| strings(item, out)),
        Value::Object(object) => {
            for (key, child) in object {
                out.push(key.clone());
                strings(child, out);
            }
        }
        _ => {}
    }
}

fn contains(haystack: &[String], needle: &str) -> bool {
    haystack.iter().any(|text| text.contains(needle))
}

fn check(resource: &ValidatedResource, selector: u8) {
    let partner = PARTNERS[usize::from(selector & 3)];
    let indexed = resource
        .nhs_number()
        .map(|n| n.as_str().to_owned())
        .filter(|_| selector & 4 == 0);
    let input = resource.value();
    let mut secrets = Secrets::default();
    Secrets::collect(input, &mut secrets);
    if let Some(number) = &indexed {
        secrets.nhs.insert(digits(number));
    }
    let as_of = date!(2026 - 06 - 01);
    let context = RecordContext {
        partner,
        nhs_number: indexed.as_deref(),
        as_of,
    };
    let mut patient_pseudonyms: Vec<(usize, String)> = Vec::new();
    let mut outputs: Vec<(usize, Vec<String>)> = Vec::new();

    for (index, (definition, key)) in FEEDS.iter().enumerate() {
        let transformer = Transformer::new(definition, key);
        let Some(out) = transformer.apply(input, &context) else {
            assert!(
                definition
                    .rules(resource.resource_type().as_str())
                    .is_none(),
                "feed {} carries {} but the transform released nothing",
                definition.id,
                resource.resource_type()
            );
            continue;
        };
        assert_eq!(
            Some(out.clone()),
            transformer.apply(input, &context),
            "the transform is not deterministic"
        );
        let object = out
            .resource
            .as_object()
            .expect("a transformed resource is an object");
        assert_eq!(
            object.get("resourceType").and_then(Value::as_str),
            Some(resource.resource_type().as_str())
        );
        let id = object.get("id").and_then(Value::as_str).expect("an id");
        assert!(
            id.len() == 26 && id.bytes().all(|b| matches!(b, b'a'..=b'z' | b'2'..=b'7')),
            "the output id is not a pseudonym"
        );
        assert!(!object.contains_key("meta"), "meta released");
        assert!(
            !object.contains_key("contained"),
            "contained resources released"
        );

        let mut found = Vec::new();
        strings(&out.resource, &mut found);
        for kind in [Kind::NhsNumber, Kind::Name, Kind::Postcode] {
            let forms = secrets.forms(kind);
            let leaked: Vec<&String> = forms.iter().filter(|s| contains(&found, s)).collect();
            if leaked.is_empty() {
                continue;
            }
            // Differential: does the string still appear with this kind's elements replaced?
            let replaced = replace(input, kind, &secrets);
            let context_again = RecordContext {
                nhs_number: match kind {
                    Kind::NhsNumber => indexed.as_ref().map(|_| nhs_standin(&secrets)),
                    _ => indexed.as_deref(),
                },
                ..context
            };
            let mut found_again = Vec::new();
            if let Some(again) = transformer.apply(&replaced, &context_again) {
                strings(&again.resource, &mut found_again);
            }
            for secret in leaked {
                assert!(
                    contains(&found_again, secret),
                    "feed {}: a {kind:?} of the input ({} characters) leaves in the output",
                    definition.id,
                    secret.len()
                );
            }
        }
        if let Some(pseudonym) = out.patient {
            patient_pseudonyms.push((index, pseudonym));
        }
        outputs.push((index, found));
    }
    // PSEU-2: a patient pseudonym of one feed never appears in another feed's output — unless the
    // input itself carries that text where a feed keeps it (a coding's display, say).
    let mut input_strings = Vec::new();
    strings(input, &mut input_strings);
    for (feed, pseudonym) in &patient_pseudonyms {
        if contains(&input_strings, pseudonym) {
            continue;
        }
        for (other, found) in &outputs {
            if other != feed {
                assert!(
                    !contains(found, pseudonym),
                    "a patient pseudonym links two feeds"
                );
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match VALIDATOR.validate_bytes(body, None) {
        Err(_) => {}
        Ok(Validated::Resource(resource)) => check(&resource, selector),
        Ok(Validated::Bundle(ValidatedBundle::Stored { resource, .. })) => {
            check(&resource, selector)
        }
        Ok(Validated::Bundle(ValidatedBundle::Requests { entries, .. })) => {
            for entry in entries {
                if let Ok(resource) = &entry.result {
                    check(resource, selector);
                }
            }
        }
    }
});
