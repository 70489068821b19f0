//! The FHIR and UK rules a JSON Schema cannot express, checked in one walk over a resource.
//!
//! | Rule | Source | Issue code |
//! |---|---|---|
//! | no `{}`, `[]`, `""`/whitespace-only strings; `null` only as an array item, never an array of only `null`s | FHIR JSON <http://hl7.org/fhir/R4/json.html> | `invalid` (`value` for strings) |
//! | legacy identifier systems rewritten to the current URI | DOMAIN.md `URI` | — (normalisation) |
//! | NHS-number identifiers pass Modulus 11, repdigit and range policy | DOMAIN.md `NHSNO`, B4 | `value` |
//! | ODS identifiers are 1–9 upper-case alphanumerics | DOMAIN.md `ODS` | `value` |
//! | a resource states at most one NHS number for its patient | UK Core Patient (`identifier:nhsNumber` 0..1) | `business-rule` |
//! | `Reference.reference` is `Type/id[/_history/vid]`, `Type?identifier=system|value`, `#id` of a contained resource, `urn:uuid:`/`urn:oid:`, or an absolute URL on an allowed base | FHIR <http://hl7.org/fhir/R4/references.html> | `value`, `not-found` |
//! | no absolute references or attachment URLs to other servers | OWASP API7 (SSRF), DOMAIN.md B9 | `security` |
//!
//! The walk also gathers [`RuleFacts`] (the patient's NHS number, business identifiers, and
//! `urn:` references the Bundle validator must resolve), so the resource is read once.
//!
//! Diagnostics name the rule and the FHIRPath location; they never contain a value from the
//! resource.

use std::fmt::{self, Write as _};

use serde_json::{Map, Value};

use crate::identifier::{self, normalise_system};
use crate::json::{SERDE_JSON_RECURSION_LIMIT, is_element_name, is_type_name};
use crate::nhs_number::{NhsNumber, NhsNumberPolicy};
use crate::ods::OdsCode;
use crate::outcome::{Issue, IssueCode, IssueSink};

/// Deployment settings for the rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RulesConfig {
    /// Which NHS number ranges are accepted (set `allow_test_numbers: false` in production).
    pub nhs_number: NhsNumberPolicy,
    /// Absolute base URLs (e.g. `https://fhir.example-ics.nhs.uk/R4`) that references and
    /// attachment URLs may point into. Empty: no absolute URL is accepted. A base must be an
    /// `http(s)://` URL with a host; anything else is ignored.
    pub allowed_reference_bases: Vec<String>,
}

/// What the walk learned about the resource, for the stages after validation. `Debug` redacts
/// the identifiers: they include the NHS number.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RuleFacts {
    /// The patient's NHS number: a Patient's own NHS-number identifier, or for other types the
    /// NHS-number identifier of the `subject`, `patient` or `beneficiary` reference.
    pub nhs_number: Option<NhsNumber>,
    /// The resource's top-level `identifier[]` as `system|value` tokens (systems normalised;
    /// identifiers without both a system and a value are left out, as they identify nothing).
    pub identifiers: Vec<String>,
    /// `(reference, expression)` for every `urn:uuid:`/`urn:oid:` reference: these must resolve
    /// to a `fullUrl` inside the enclosing Bundle.
    pub bundle_references: Vec<(String, String)>,
}

impl fmt::Debug for RuleFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleFacts")
            .field("nhs_number", &self.nhs_number)
            .field(
                "identifiers",
                &format_args!("[{} redacted]", self.identifiers.len()),
            )
            .field("bundle_references", &self.bundle_references)
            .finish()
    }
}

/// Check `value` (a resource of `resource_type`) against the rules in the module docs, pushing
/// issues into `sink` until it is full, and normalise identifier systems in place.
pub fn check_resource(
    value: &mut Value,
    resource_type: &str,
    config: &RulesConfig,
    sink: &mut IssueSink,
) -> RuleFacts {
    let mut walker = Walker {
        config,
        sink,
        is_patient: resource_type == "Patient",
        facts: RuleFacts::default(),
    };
    let ids = match value {
        Value::Object(map) => contained_ids(map),
        _ => Vec::new(),
    };
    let mut path = String::with_capacity(128);
    path.push_str(resource_type);
    let place = Place {
        key: "",
        in_array: false,
        role: Role::Resource,
    };
    walker.walk(
        value,
        &mut path,
        0,
        place,
        &Scope {
            contained_ids: &ids,
            in_contained: false,
        },
    );
    walker.facts
}

/// Element names whose objects are Attachments (or hold an Attachment's `url`).
const ATTACHMENT_ELEMENTS: [&str; 4] = ["attachment", "presentedForm", "photo", "content"];

/// What the parent knows about the value being visited.
#[derive(Debug, Clone, Copy)]
struct Place<'k> {
    /// The property the value sits under (for array items, the array's property).
    key: &'k str,
    in_array: bool,
    role: Role,
}

/// Where a value sits relative to the facts gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The root object of the checked resource.
    Resource,
    /// An item of the resource's top-level `identifier`.
    Identifier,
    /// The resource's top-level `subject`, `patient` or `beneficiary` Reference.
    PatientReference,
    /// That Reference's logical `identifier`.
    PatientReferenceIdentifier,
    Other,
}

impl Role {
    fn of_child(self, key: &str) -> Role {
        match (self, key) {
            (Role::Resource, "identifier") => Role::Identifier,
            (Role::Resource, "subject" | "patient" | "beneficiary") => Role::PatientReference,
            (Role::PatientReference, "identifier") => Role::PatientReferenceIdentifier,
            _ => Role::Other,
        }
    }
}

/// The resource whose `contained` list `#id` references resolve against.
#[derive(Debug)]
struct Scope<'a> {
    contained_ids: &'a [String],
    /// Inside a contained resource, where `#` alone means the container.
    in_contained: bool,
}

struct Walker<'c, 's> {
    config: &'c RulesConfig,
    sink: &'s mut IssueSink,
    is_patient: bool,
    facts: RuleFacts,
}

impl Walker<'_, '_> {
    fn report(&mut self, code: IssueCode, expression: &str, diagnostics: impl Into<String>) {
        self.sink.push(Issue::error(code, expression, diagnostics));
    }

    /// Visit `value` at `path`, inside `depth` arrays and objects.
    fn walk(
        &mut self,
        value: &mut Value,
        path: &mut String,
        depth: usize,
        place: Place<'_>,
        scope: &Scope<'_>,
    ) {
        if self.sink.is_full() {
            return;
        }
        if matches!(value, Value::Array(_) | Value::Object(_))
            && depth >= SERDE_JSON_RECURSION_LIMIT
        {
            // The parser never produces this; a Value built in code might. Stop rather than risk
            // the stack.
            self.report(
                IssueCode::Structure,
                path,
                format!("nesting is deeper than {SERDE_JSON_RECURSION_LIMIT}"),
            );
            return;
        }
        match value {
            Value::Null if !place.in_array => self.report(
                IssueCode::Invalid,
                path,
                "null is only allowed as an array item (FHIR JSON); omit the property instead",
            ),
            Value::String(s) if s.trim().is_empty() => self.report(
                IssueCode::Value,
                path,
                "string is empty or whitespace only (FHIR JSON); omit the property instead",
            ),
            Value::Array(items) if items.is_empty() => self.report(
                IssueCode::Invalid,
                path,
                "array is empty (FHIR JSON); omit the property instead",
            ),
            Value::Array(items) if items.iter().all(Value::is_null) => self.report(
                IssueCode::Invalid,
                path,
                "array holds only nulls (FHIR JSON): a null item needs a value in the matching \
                 primitive extension array",
            ),
            Value::Array(items) => {
                let item_place = Place {
                    in_array: true,
                    ..place
                };
                for (index, item) in items.iter_mut().enumerate() {
                    let len = path.len();
                    // Writing to a String cannot fail.
                    let _ = write!(path, "[{index}]");
                    self.walk(item, path, depth + 1, item_place, scope);
                    path.truncate(len);
                }
            }
            Value::Object(map) if map.is_empty() => self.report(
                IssueCode::Invalid,
                path,
                "object is empty (FHIR JSON); omit the property instead",
            ),
            Value::Object(map) => self.walk_object(map, path, depth, place, scope),
            Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {}
        }
    }

    fn walk_object(
        &mut self,
        map: &mut Map<String, Value>,
        path: &mut String,
        depth: usize,
        place: Place<'_>,
        scope: &Scope<'_>,
    ) {
        // A resource nested in this one: contained resources share the container's scope;
        // any other (Bundle.entry.resource, Parameters.parameter.resource) has its own.
        let own_ids;
        let scope = match map.get("resourceType") {
            Some(Value::String(_)) if place.role != Role::Resource => {
                if place.key == "contained" {
                    &Scope {
                        contained_ids: scope.contained_ids,
                        in_contained: true,
                    }
                } else {
                    own_ids = contained_ids(map);
                    &Scope {
                        contained_ids: &own_ids,
                        in_contained: false,
                    }
                }
            }
            _ => scope,
        };

        // DOMAIN.md `URI`: legacy systems become the current URI, before any check reads them.
        if let Some(Value::String(system)) = map.get_mut("system")
            && let Some(current) = normalise_system(system)
        {
            *system = current.to_owned();
        }
        match (map.get("system"), map.get("value")) {
            (Some(Value::String(system)), Some(Value::String(value))) => {
                self.check_identifier(system, value, path, place.role);
            }
            // A number or object where an NHS number or ODS code belongs would otherwise skip
            // the checks below if the schema let it through.
            (Some(Value::String(system)), Some(_)) if is_checked_system(system) => self.report(
                IssueCode::Value,
                &format!("{path}.value"),
                "identifier value must be a string",
            ),
            _ => {}
        }
        if let Some(Value::String(reference)) = map.get("reference") {
            self.check_reference(reference, path, scope);
        }
        if ATTACHMENT_ELEMENTS.contains(&place.key)
            && let Some(Value::String(url)) = map.get("url")
        {
            self.check_attachment_url(url, path);
        }

        for (key, child) in map.iter_mut() {
            if self.sink.is_full() {
                return;
            }
            let len = path.len();
            push_key(path, key);
            let child_place = Place {
                key: key.as_str(),
                in_array: false,
                role: place.role.of_child(key),
            };
            self.walk(child, path, depth + 1, child_place, scope);
            path.truncate(len);
        }
    }

    /// `path` is the Identifier (or any object with a `system` and a `value`).
    fn check_identifier(&mut self, system: &str, value: &str, path: &str, role: Role) {
        if role == Role::Identifier {
            self.facts.identifiers.push(format!("{system}|{value}"));
        }
        match system {
            identifier::NHS_NUMBER => match NhsNumber::parse(value, &self.config.nhs_number) {
                Ok(number) => {
                    let about_patient = match role {
                        Role::Identifier => self.is_patient,
                        Role::PatientReferenceIdentifier => !self.is_patient,
                        _ => false,
                    };
                    if about_patient {
                        self.record_nhs_number(number, path);
                    }
                }
                Err(err) => {
                    self.report(IssueCode::Value, &format!("{path}.value"), err.to_string())
                }
            },
            identifier::ODS_ORGANIZATION_CODE | identifier::ODS_SITE_CODE => {
                if let Err(err) = OdsCode::parse(value) {
                    self.report(IssueCode::Value, &format!("{path}.value"), err.to_string());
                }
            }
            _ => {}
        }
    }

    /// Two different NHS numbers for one patient would let a consent or opt-out check run on
    /// one number while the record is filed under the other.
    fn record_nhs_number(&mut self, number: NhsNumber, path: &str) {
        match &self.facts.nhs_number {
            None => self.facts.nhs_number = Some(number),
            Some(first) if *first == number => {}
            Some(_) => self.report(
                IssueCode::BusinessRule,
                &format!("{path}.value"),
                "resource states more than one NHS number for its patient; only one is allowed \
                 (NHSNO)",
            ),
        }
    }

    /// `path` is the Reference; its `reference` is checked (FHIR references page; OWASP API7).
    fn check_reference(&mut self, reference: &str, path: &str, scope: &Scope<'_>) {
        let expression = format!("{path}.reference");
        if let Some(id) = reference.strip_prefix('#') {
            if id.is_empty() {
                if !scope.in_contained {
                    self.report(
                        IssueCode::NotFound,
                        &expression,
                        "reference \"#\" means the containing resource and is only valid inside \
                         a contained resource",
                    );
                }
            } else if !scope.contained_ids.iter().any(|contained| contained == id) {
                self.report(
                    IssueCode::NotFound,
                    &expression,
                    "internal reference does not match the id of any contained resource",
                );
            }
        } else if let Some(uuid) = reference.strip_prefix("urn:uuid:") {
            if is_uuid(uuid) {
                self.facts
                    .bundle_references
                    .push((reference.to_owned(), expression));
            } else {
                self.report(
                    IssueCode::Value,
                    &expression,
                    "urn:uuid reference is not a lower-case RFC 4122 UUID",
                );
            }
        } else if let Some(oid) = reference.strip_prefix("urn:oid:") {
            if is_oid(oid) {
                self.facts
                    .bundle_references
                    .push((reference.to_owned(), expression));
            } else {
                self.report(
                    IssueCode::Value,
                    &expression,
                    "urn:oid reference is not a valid OID",
                );
            }
        } else if has_authority(reference) {
            match self.within_allowed_base(reference) {
                Some(rest) if is_relative_reference(rest) => {}
                Some(_) => self.report(
                    IssueCode::Value,
                    &expression,
                    "absolute reference must be an allowed base followed by Type/id",
                ),
                None => self.report(
                    IssueCode::Security,
                    &expression,
                    "absolute references to other servers are not accepted (OWASP API7)",
                ),
            }
        } else if !is_relative_reference(reference)
            && !is_identifier_conditional_reference(reference)
        {
            self.report(
                IssueCode::Value,
                &expression,
                "reference must be Type/id, Type?identifier=system|value, #id, urn:uuid:, \
                 urn:oid: or an absolute URL on an allowed server",
            );
        }
    }

    /// `path` is an Attachment: its `url` must not point at another server (OWASP API7).
    fn check_attachment_url(&mut self, url: &str, path: &str) {
        if has_authority(url) && self.within_allowed_base(url).is_none() {
            self.report(
                IssueCode::Security,
                &format!("{path}.url"),
                "attachment URLs on other servers are not accepted (OWASP API7)",
            );
        }
    }

    /// The part of `url` after an allowed base and its `/`. Matching is exact and stops at a
    /// path boundary, so `https://a.nhs.uk.evil.example` and `https://a.nhs.uk@evil.example`
    /// do not match the base `https://a.nhs.uk`.
    fn within_allowed_base<'u>(&self, url: &'u str) -> Option<&'u str> {
        self.config.allowed_reference_bases.iter().find_map(|base| {
            let base = base.trim_end_matches('/');
            if !is_usable_base(base) {
                return None;
            }
            url.strip_prefix(base)?.strip_prefix('/')
        })
    }
}

/// Systems whose identifier values this module checks.
fn is_checked_system(system: &str) -> bool {
    matches!(
        system,
        identifier::NHS_NUMBER | identifier::ODS_ORGANIZATION_CODE | identifier::ODS_SITE_CODE
    )
}

/// Append `.key` to the path. A key that is not a FHIR element name is not echoed (it could hold
/// data); the schema reports it.
fn push_key(path: &mut String, key: &str) {
    path.push('.');
    if is_element_name(key) {
        path.push_str(key);
    } else {
        path.push_str("`?`");
    }
}

/// The ids of the `contained` resources of a resource.
fn contained_ids(resource: &Map<String, Value>) -> Vec<String> {
    match resource.get("contained") {
        Some(Value::Array(contained)) => contained
            .iter()
            .filter_map(|c| c.get("id").and_then(Value::as_str))
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// `scheme://…`: a URL naming a server. Any scheme counts (file://, ftp://, gopher:// are SSRF
/// vectors as much as http://); only http(s) can ever match an allowed base.
fn has_authority(s: &str) -> bool {
    match s.split_once("://") {
        Some((scheme, _)) => {
            let mut bytes = scheme.bytes();
            bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
                && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        }
        None => false,
    }
}

/// `http(s)://host…` with a non-empty host.
fn is_usable_base(base: &str) -> bool {
    let rest = base
        .strip_prefix("https://")
        .or_else(|| base.strip_prefix("http://"));
    rest.is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
}

/// `Type/id` or `Type/id/_history/vid` (FHIR references page; id per
/// <http://hl7.org/fhir/R4/datatypes.html#id>).
fn is_relative_reference(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(resource_type), Some(id)) = (parts.next(), parts.next()) else {
        return false;
    };
    if !is_type_name(resource_type) || !is_id(id) {
        return false;
    }
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => true,
        (Some("_history"), Some(version), None) => is_id(version),
        _ => false,
    }
}

/// FHIR `id`: `[A-Za-z0-9\-\.]{1,64}`.
fn is_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A conditional reference by business identifier, `Type?identifier=system|value`
/// (<http://hl7.org/fhir/R4/http.html#trules>, as bulk exports such as Synthea's use them). It names
/// the target logically, like `Reference.identifier`, and nothing is fetched to resolve it. Other
/// search parameters are not accepted: they would need a search the gateway does not offer.
fn is_identifier_conditional_reference(reference: &str) -> bool {
    let Some((type_name, query)) = reference.split_once('?') else {
        return false;
    };
    let Some(token) = query.strip_prefix("identifier=") else {
        return false;
    };
    let Some((system, value)) = token.split_once('|') else {
        return false;
    };
    is_type_name(type_name)
        && !value.is_empty()
        && !token.contains('&')
        && !system.chars().any(char::is_whitespace)
        && !value.chars().any(char::is_whitespace)
}

/// FHIR `uuid` after `urn:uuid:`: lower-case `8-4-4-4-12` hex.
fn is_uuid(s: &str) -> bool {
    let groups = [8, 4, 4, 4, 12];
    let mut parts = s.split('-');
    groups.iter().all(|&len| {
        parts.next().is_some_and(|part| {
            part.len() == len
                && part
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    }) && parts.next().is_none()
}

/// FHIR `oid` after `urn:oid:`: `[0-2](\.(0|[1-9][0-9]*))+`.
fn is_oid(s: &str) -> bool {
    let mut arcs = s.split('.');
    let first_ok = arcs
        .next()
        .is_some_and(|arc| matches!(arc, "0" | "1" | "2"));
    let mut rest = 0;
    let rest_ok = arcs.all(|arc| {
        rest += 1;
        !arc.is_empty()
            && arc.bytes().all(|b| b.is_ascii_digit())
            && (arc == "0" || !arc.starts_with('0'))
    });
    first_ok && rest_ok && rest > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";
    const VALID: &str = "9434765919";
    const OTHER_VALID: &str = "9876544322";
    const BAD_CHECK: &str = "9434765918";

    struct Checked {
        issues: Vec<Issue>,
        facts: RuleFacts,
        value: Value,
    }

    fn check_with(mut value: Value, config: &RulesConfig) -> Checked {
        let resource_type = value["resourceType"]
            .as_str()
            .unwrap_or("Unknown")
            .to_owned();
        let mut sink = IssueSink::default();
        let facts = check_resource(&mut value, &resource_type, config, &mut sink);
        let issues = sink.finish();
        for issue in &issues {
            for number in [VALID, OTHER_VALID, BAD_CHECK] {
                assert!(
                    !issue.diagnostics.contains(number),
                    "diagnostics leak: {issue:?}"
                );
                assert!(
                    !issue.expression.iter().any(|e| e.contains(number)),
                    "{issue:?}"
                );
            }
        }
        Checked {
            issues,
            facts,
            value,
        }
    }

    fn check(value: Value) -> Checked {
        check_with(value, &RulesConfig::default())
    }

    fn with_bases(bases: &[&str]) -> RulesConfig {
        RulesConfig {
            allowed_reference_bases: bases.iter().map(|b| (*b).to_owned()).collect(),
            ..RulesConfig::default()
        }
    }

    /// The single issue, asserting its code and expression.
    fn only_issue(checked: &Checked, code: IssueCode, expression: &str) -> Issue {
        assert_eq!(checked.issues.len(), 1, "{:#?}", checked.issues);
        let issue = checked.issues[0].clone();
        assert_eq!(
            (issue.code, issue.expression.clone()),
            (code, vec![expression.to_owned()])
        );
        issue
    }

    fn patient_with_nhs_number(value: &str) -> Value {
        json!({"resourceType": "Patient", "identifier": [
            {"system": "https://example.org/mrn", "value": "MRN1"},
            {"system": NHS, "value": value}
        ]})
    }

    #[test]
    fn rules_accept_a_clean_resource_without_issues() {
        let checked = check(json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]},
            "subject": {"reference": "Patient/p-1", "identifier": {"system": NHS, "value": VALID}},
            "performer": [{"reference": "Organization/RA4/_history/2"}],
        }));
        assert_eq!(checked.issues, vec![]);
    }

    #[test]
    fn nhsno_patient_identifier_failing_modulus_11_is_rejected() {
        let checked = check(patient_with_nhs_number(BAD_CHECK));
        let issue = only_issue(&checked, IssueCode::Value, "Patient.identifier[1].value");
        assert_eq!(
            issue.diagnostics,
            "NHS number fails the Modulus 11 check (NHSNO)"
        );
        assert_eq!(checked.facts.nhs_number, None);
    }

    #[test]
    fn nhsno_check_digit_ten_and_format_rejected_in_resources() {
        for bad in ["1234567890", "943 476 5919", "943476591"] {
            let checked = check(patient_with_nhs_number(bad));
            let issue = only_issue(&checked, IssueCode::Value, "Patient.identifier[1].value");
            assert!(issue.diagnostics.contains("NHSNO"), "{issue:?}");
        }
    }

    #[test]
    fn nhsno_identifier_value_must_be_a_string() {
        let checked = check(json!({"resourceType": "Patient", "identifier": [
            {"system": NHS, "value": 9_434_765_919_u64}]}));
        only_issue(&checked, IssueCode::Value, "Patient.identifier[0].value");
        assert_eq!(checked.facts.nhs_number, None);
    }

    #[test]
    fn nhsno_test_number_rejected_under_production_policy() {
        let production = RulesConfig {
            nhs_number: NhsNumberPolicy {
                allow_test_numbers: false,
                extra_ranges: Vec::new(),
            },
            ..RulesConfig::default()
        };
        let checked = check_with(patient_with_nhs_number(VALID), &production);
        let issue = only_issue(&checked, IssueCode::Value, "Patient.identifier[1].value");
        assert!(issue.diagnostics.contains("test number"), "{issue:?}");
    }

    #[test]
    fn nhsno_fact_from_patient_identifier() {
        let checked = check(patient_with_nhs_number(VALID));
        assert_eq!(checked.issues, vec![]);
        assert_eq!(
            checked.facts.nhs_number.as_ref().map(NhsNumber::as_str),
            Some(VALID)
        );
        assert_eq!(
            checked.facts.identifiers,
            vec![
                "https://example.org/mrn|MRN1".to_owned(),
                format!("{NHS}|{VALID}")
            ]
        );
    }

    #[test]
    fn nhsno_facts_debug_redacts_identifiers() {
        let checked = check(patient_with_nhs_number(VALID));
        let debug = format!("{:?}", checked.facts);
        assert!(!debug.contains(VALID) && !debug.contains("MRN1"), "{debug}");
        assert!(debug.contains("[2 redacted]"), "{debug}");
    }

    #[test]
    fn nhsno_fact_from_subject_patient_or_beneficiary_reference() {
        for (resource_type, element) in [
            ("Observation", "subject"),
            ("AllergyIntolerance", "patient"),
            ("Coverage", "beneficiary"),
        ] {
            let checked = check(json!({
                "resourceType": resource_type,
                (element): {"identifier": {"system": NHS, "value": VALID}},
                "identifier": [{"system": "https://example.org/id", "value": "X1"}],
            }));
            assert_eq!(checked.issues, vec![]);
            assert_eq!(
                checked.facts.nhs_number.as_ref().map(NhsNumber::as_str),
                Some(VALID)
            );
            assert_eq!(
                checked.facts.identifiers,
                vec!["https://example.org/id|X1".to_owned()]
            );
        }
    }

    #[test]
    fn nhsno_fact_ignores_other_people_and_contained_resources() {
        let checked = check(json!({
            "resourceType": "Observation",
            "performer": [{"identifier": {"system": NHS, "value": VALID}}],
            "contained": [{"resourceType": "Patient", "id": "p",
                           "identifier": [{"system": NHS, "value": OTHER_VALID}]}],
        }));
        assert_eq!(checked.issues, vec![]);
        assert_eq!(checked.facts.nhs_number, None);
        assert_eq!(checked.facts.identifiers, Vec::<String>::new());
    }

    #[test]
    fn nhsno_two_different_numbers_for_one_patient_rejected() {
        let mut patient = patient_with_nhs_number(VALID);
        patient["identifier"][0] = json!({"system": NHS, "value": OTHER_VALID});
        let checked = check(patient);
        only_issue(
            &checked,
            IssueCode::BusinessRule,
            "Patient.identifier[1].value",
        );
        assert_eq!(
            checked.facts.nhs_number.as_ref().map(NhsNumber::as_str),
            Some(OTHER_VALID)
        );
    }

    #[test]
    fn uri_legacy_nhs_net_system_is_normalised() {
        let checked = check(json!({"resourceType": "Patient", "identifier": [
            {"system": "http://fhir.nhs.net/Id/nhs-number", "value": VALID}],
            "generalPractitioner": [{"identifier":
                {"system": "http://fhir.nhs.net/Id/ods-organization-code", "value": "Y12345"}}],
        }));
        assert_eq!(checked.issues, vec![]);
        assert_eq!(checked.value["identifier"][0]["system"], NHS);
        assert_eq!(
            checked.value["generalPractitioner"][0]["identifier"]["system"],
            identifier::ODS_ORGANIZATION_CODE
        );
        assert_eq!(checked.facts.identifiers, vec![format!("{NHS}|{VALID}")]);
        assert!(checked.facts.nhs_number.is_some());
    }

    #[test]
    fn uri_legacy_system_value_is_checked_after_normalisation() {
        let checked = check(json!({"resourceType": "Patient", "identifier": [
            {"system": "http://fhir.nhs.net/Id/nhs-number", "value": BAD_CHECK}]}));
        only_issue(&checked, IssueCode::Value, "Patient.identifier[0].value");
    }

    #[test]
    fn ods_identifier_value_must_be_an_ods_code() {
        let checked = check(json!({"resourceType": "Patient", "managingOrganization":
            {"identifier": {"system": identifier::ODS_ORGANIZATION_CODE, "value": "ra4"}}}));
        let issue = only_issue(
            &checked,
            IssueCode::Value,
            "Patient.managingOrganization.identifier.value",
        );
        assert!(issue.diagnostics.contains("(ODS)"), "{issue:?}");

        let checked = check(
            json!({"resourceType": "Encounter", "location": [{"location":
            {"identifier": {"system": identifier::ODS_SITE_CODE, "value": "K810030011"}}}]}),
        );
        only_issue(
            &checked,
            IssueCode::Value,
            "Encounter.location[0].location.identifier.value",
        );
    }

    #[test]
    fn fhir_json_rejects_empty_object() {
        let checked = check(json!({"resourceType": "Patient", "meta": {}}));
        only_issue(&checked, IssueCode::Invalid, "Patient.meta");
    }

    #[test]
    fn fhir_json_rejects_empty_array() {
        let checked = check(json!({"resourceType": "Patient", "name": [{"given": []}]}));
        only_issue(&checked, IssueCode::Invalid, "Patient.name[0].given");
    }

    #[test]
    fn fhir_json_rejects_empty_and_whitespace_strings() {
        for blank in ["", "   ", "\t\n"] {
            let checked = check(json!({"resourceType": "Patient", "name": [{"family": blank}]}));
            only_issue(&checked, IssueCode::Value, "Patient.name[0].family");
        }
    }

    #[test]
    fn fhir_json_rejects_null_outside_arrays() {
        let checked = check(json!({"resourceType": "Patient", "gender": null}));
        only_issue(&checked, IssueCode::Invalid, "Patient.gender");
    }

    #[test]
    fn fhir_json_accepts_null_items_in_primitive_arrays() {
        let checked = check(json!({"resourceType": "Patient", "name": [{
            "given": ["Ann", null],
            "_given": [null, {"extension": [{"url": "https://example.org/x", "valueString": "y"}]}]
        }]}));
        assert_eq!(checked.issues, vec![]);
    }

    #[test]
    fn fhir_json_rejects_array_of_only_nulls() {
        let checked = check(json!({"resourceType": "Patient", "name": [{"given": [null, null]}]}));
        only_issue(&checked, IssueCode::Invalid, "Patient.name[0].given");
    }

    #[test]
    fn reference_relative_forms_accepted_and_malformed_rejected() {
        for good in ["Patient/123", "Patient/a.b-C", "Patient/1/_history/2"] {
            let checked =
                check(json!({"resourceType": "Observation", "subject": {"reference": good}}));
            assert_eq!(checked.issues, vec![], "{good}");
        }
        for bad in [
            "patient/1",
            "P/1",
            "Patient/",
            "Patient/1/2",
            "Patient/1/_history/",
            "Patient/a_b",
            "Patient?identifier=x",
            "javascript:alert(1)",
            "urn:foo:1",
        ] {
            let checked =
                check(json!({"resourceType": "Observation", "subject": {"reference": bad}}));
            only_issue(&checked, IssueCode::Value, "Observation.subject.reference");
        }
        let long = format!("Patient/{}", "a".repeat(65));
        let checked = check(json!({"resourceType": "Observation", "subject": {"reference": long}}));
        only_issue(&checked, IssueCode::Value, "Observation.subject.reference");
    }

    #[test]
    fn reference_internal_must_match_a_contained_id() {
        let observation = |reference: &str| {
            json!({"resourceType": "Observation",
                   "contained": [{"resourceType": "Patient", "id": "p1"},
                                 {"resourceType": "Practitioner", "id": "dr",
                                  "extension": [{"url": "https://example.org/x",
                                                 "valueReference": {"reference": "#p1"}}]}],
                   "subject": {"reference": reference}})
        };
        assert_eq!(check(observation("#p1")).issues, vec![]);
        let checked = check(observation("#p2"));
        only_issue(
            &checked,
            IssueCode::NotFound,
            "Observation.subject.reference",
        );
        let checked = check(observation("#"));
        only_issue(
            &checked,
            IssueCode::NotFound,
            "Observation.subject.reference",
        );
    }

    #[test]
    fn reference_hash_alone_allowed_inside_contained() {
        let checked = check(json!({"resourceType": "Observation",
            "contained": [{"resourceType": "Provenance", "id": "prov",
                           "target": [{"reference": "#"}]}]}));
        assert_eq!(checked.issues, vec![]);
    }

    #[test]
    fn reference_urn_uuid_and_oid_recorded_for_bundle() {
        let uuid = "urn:uuid:9a0c1f1e-5b4f-4c3a-8d2e-0123456789ab";
        let checked = check(json!({"resourceType": "Observation",
            "subject": {"reference": uuid},
            "performer": [{"reference": "urn:oid:2.16.840.1.113883"}]}));
        assert_eq!(checked.issues, vec![]);
        let mut recorded = checked.facts.bundle_references.clone();
        recorded.sort();
        assert_eq!(
            recorded,
            vec![
                (
                    "urn:oid:2.16.840.1.113883".to_owned(),
                    "Observation.performer[0].reference".to_owned()
                ),
                (uuid.to_owned(), "Observation.subject.reference".to_owned()),
            ]
        );
        for bad in [
            "urn:uuid:9A0C1F1E-5B4F-4C3A-8D2E-0123456789AB",
            "urn:uuid:9a0c1f1e5b4f4c3a8d2e0123456789ab",
            "urn:uuid:9a0c1f1e-5b4f-4c3a-8d2e-0123456789ab-0",
            "urn:oid:3.1",
            "urn:oid:1",
            "urn:oid:1.02",
            "urn:oid:1..2",
        ] {
            let checked =
                check(json!({"resourceType": "Observation", "subject": {"reference": bad}}));
            only_issue(&checked, IssueCode::Value, "Observation.subject.reference");
        }
    }

    #[test]
    fn api7_absolute_reference_rejected() {
        for url in [
            "https://evil.example/Patient/1",
            "http://169.254.169.254/latest/meta-data",
            "HTTPS://fhir.example.nhs.uk/R4/Patient/1",
            "file:///etc/passwd",
            "ftp://internal/Patient/1",
        ] {
            let checked = check_with(
                json!({"resourceType": "Observation", "subject": {"reference": url}}),
                &with_bases(&["https://fhir.example.nhs.uk/R4"]),
            );
            let issue = only_issue(
                &checked,
                IssueCode::Security,
                "Observation.subject.reference",
            );
            assert!(
                issue.diagnostics.contains("not accepted (OWASP API7)"),
                "{issue:?}"
            );
        }
    }

    #[test]
    fn api7_base_prefix_tricks_rejected() {
        let config = with_bases(&["https://fhir.example.nhs.uk", "https:/", ""]);
        for url in [
            "https://fhir.example.nhs.uk.evil.example/Patient/1",
            "https://fhir.example.nhs.uk@evil.example/Patient/1",
            "https://fhir.example.nhs.uk:8443/Patient/1",
            "https://evil.example/Patient/1",
        ] {
            let checked = check_with(
                json!({"resourceType": "Observation", "subject": {"reference": url}}),
                &config,
            );
            only_issue(
                &checked,
                IssueCode::Security,
                "Observation.subject.reference",
            );
        }
    }

    #[test]
    fn api7_absolute_reference_within_allowed_base_accepted() {
        let config = with_bases(&["https://fhir.example.nhs.uk/R4/"]);
        let checked = check_with(
            json!({"resourceType": "Observation",
                   "subject": {"reference": "https://fhir.example.nhs.uk/R4/Patient/1"}}),
            &config,
        );
        assert_eq!(checked.issues, vec![]);
        let checked = check_with(
            json!({"resourceType": "Observation",
                   "subject": {"reference": "https://fhir.example.nhs.uk/R4/metadata?x=1"}}),
            &config,
        );
        only_issue(&checked, IssueCode::Value, "Observation.subject.reference");
    }

    #[test]
    fn api7_attachment_url_to_other_server_rejected() {
        let config = with_bases(&["https://fhir.example.nhs.uk/R4"]);
        let document = |url: &str| {
            json!({"resourceType": "DocumentReference",
                   "content": [{"attachment": {"contentType": "application/pdf", "url": url}}]})
        };
        let checked = check_with(document("http://10.0.0.1/letter.pdf"), &config);
        only_issue(
            &checked,
            IssueCode::Security,
            "DocumentReference.content[0].attachment.url",
        );
        for fine in [
            "https://fhir.example.nhs.uk/R4/Binary/b1",
            "Binary/b1",
            "urn:uuid:x",
        ] {
            assert_eq!(check_with(document(fine), &config).issues, vec![], "{fine}");
        }
        let checked = check(
            json!({"resourceType": "Patient", "photo": [{"url": "https://x.example/a.png"}]}),
        );
        only_issue(&checked, IssueCode::Security, "Patient.photo[0].url");
        let checked = check(json!({"resourceType": "DiagnosticReport",
            "presentedForm": [{"url": "gopher://x.example/1"}]}));
        only_issue(
            &checked,
            IssueCode::Security,
            "DiagnosticReport.presentedForm[0].url",
        );
        // Extension URLs are canonical names, not locations to fetch.
        let checked = check(json!({"resourceType": "Patient",
            "extension": [{"url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-EthnicCategory",
                           "valueString": "x"}]}));
        assert_eq!(checked.issues, vec![]);
    }

    #[test]
    fn rules_bundle_entries_resolve_contained_references_in_their_own_resource() {
        let checked = check(
            json!({"resourceType": "Bundle", "type": "collection", "entry": [
                {"fullUrl": "urn:uuid:9a0c1f1e-5b4f-4c3a-8d2e-0123456789ab",
                 "resource": {"resourceType": "Observation",
                              "contained": [{"resourceType": "Patient", "id": "p"}],
                              "subject": {"reference": "#p"}}},
                {"resource": {"resourceType": "Observation", "subject": {"reference": "#p"}}}
            ]}),
        );
        only_issue(
            &checked,
            IssueCode::NotFound,
            "Bundle.entry[1].resource.subject.reference",
        );
    }

    #[test]
    fn rules_stop_when_the_sink_is_full() {
        let many: Vec<Value> = (0..1000).map(|_| json!({"family": ""})).collect();
        let mut value = json!({"resourceType": "Patient", "name": many});
        let mut sink = IssueSink::new(5);
        check_resource(&mut value, "Patient", &RulesConfig::default(), &mut sink);
        let issues = sink.finish();
        assert_eq!(issues.len(), 6);
        assert_eq!(issues[5].code, IssueCode::TooCostly);
        assert_eq!(issues[4].expression, vec!["Patient.name[4].family"]);
    }

    #[test]
    fn rules_do_not_recurse_beyond_the_parser_depth() {
        let result = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(|| {
                let mut value = json!("leaf");
                for _ in 0..1000 {
                    value = json!([value]);
                }
                let mut resource = json!({"resourceType": "Basic", "extension": value});
                let mut sink = IssueSink::default();
                check_resource(&mut resource, "Basic", &RulesConfig::default(), &mut sink);
                let issues = sink.finish();
                // Dismantle iteratively: dropping a 1000-deep Value recursively is the hazard
                // serde_stacker warns about.
                let mut next = resource["extension"].take();
                while let Value::Array(mut items) = next {
                    next = items.pop().unwrap_or(Value::Null);
                }
                issues
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(result.len(), 1);
        assert_eq!(result[0].code, IssueCode::Structure);
    }

    #[test]
    fn rules_non_element_keys_are_not_echoed_in_paths() {
        let checked = check(json!({"resourceType": "Patient", (VALID): ""}));
        only_issue(&checked, IssueCode::Value, "Patient.`?`");
    }

    #[test]
    fn conditional_identifier_reference_is_accepted_other_searches_are_not() {
        assert!(is_identifier_conditional_reference(
            "Location?identifier=https://github.com/synthetichealth/synthea|0c1ec5f5"
        ));
        assert!(!is_identifier_conditional_reference("Patient?name=smith"));
        assert!(!is_identifier_conditional_reference(
            "Patient?identifier=sys|1&name=x"
        ));
        assert!(!is_identifier_conditional_reference(
            "Patient?identifier=no-bar"
        ));
        assert!(!is_identifier_conditional_reference(
            "patient?identifier=s|v"
        ));
    }
}
