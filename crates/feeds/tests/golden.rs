//! Pinned transform output: pseudonyms must not change for existing feeds (a consumer joins
//! this month's export to last month's by them), nor generalised dates, age bands, postcodes or
//! what is redacted. Fixed inputs, fixed keys, fixed `as_of`; every shipped definition plus the
//! variants an operator can choose (`dates = "shift"`, `postcode = "sector"`), compared byte for
//! byte with the files in `tests/golden/`.
//!
//! Key order is part of those bytes, and it depends on the build: serde_json keeps insertion
//! order when any crate in the build enables its `preserve_order` feature (cedar-policy-core
//! does, so the gateway's exports are written that way) and sorts keys otherwise (this crate
//! tested alone). Each has its own pinned file; run both:
//! `cargo nextest run -p caregate-feeds --test golden` and the same with
//! `--features serde_json/preserve_order`.
//!
//! A deliberate change of output is a new key version or a new feed, never an edit of these
//! files. To write them after adding inputs, run both with `CAREGATE_BLESS=1` and review the
//! diff: existing lines must not change.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use caregate_feeds::transform::{RecordContext, Transformed, Transformer};
use caregate_feeds::{FeedDefinition, FeedKey};
use serde_json::{Value, json};
use time::macros::date;

const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";
const ODS: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

fn feeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/feeds")
}

/// The shipped definitions and operator-selectable variants, with a name for each.
fn definitions() -> Vec<(&'static str, FeedDefinition)> {
    let path = feeds_dir().join("icb-qe1-population-health.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let shift_sector = text
        .replace("dates = \"month\"", "dates = \"shift\"")
        .replace("postcode = \"district\"", "postcode = \"sector\"");
    assert_ne!(shift_sector, text, "the variant must differ from the file");
    vec![
        (
            "population-health",
            FeedDefinition::parse(&path, &text).unwrap(),
        ),
        (
            "population-health+shift+sector",
            FeedDefinition::parse(&path, &shift_sector).unwrap(),
        ),
        (
            // A choice pattern that matches `resourceType` itself: the walk sees it like any
            // other element, and it is still released as it was.
            "population-health+resource[x]",
            FeedDefinition::parse(
                &path,
                &text.replace(
                    "[resources.Observation]\n",
                    "[resources.Observation]\n\"resource[x]\" = \"pseudonym\"\n",
                ),
            )
            .unwrap(),
        ),
        (
            "risk-stratification",
            FeedDefinition::load(&feeds_dir().join("icb-qe1-risk-stratification.toml")).unwrap(),
        ),
    ]
}

/// Inputs touching every branch of the transform: NHS and local patients, references of every
/// shape, identifiers (NHS, ODS, local), `keep` meeting references and NHS identifiers, free
/// text, choice elements, dates of every precision, postcodes valid and not, numbers.
fn inputs() -> Vec<(&'static str, Option<&'static str>, Value)> {
    vec![
        (
            "patient-nhs",
            None,
            json!({
                "resourceType": "Patient", "id": "p1",
                "meta": { "versionId": "3", "source": "gp-a81001" },
                "text": { "status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Jane Smith</div>" },
                "contained": [{ "resourceType": "Patient", "id": "c1", "name": [{ "family": "Smith" }] }],
                "extension": [{ "url": "https://example.net/ethnicity", "valueString": "A" }],
                "identifier": [
                    { "system": NHS, "value": "943 476 5919" },
                    { "system": "https://gp-a81001.example/Id/mrn", "value": " MRN-0001 " },
                    { "system": ODS, "value": "A81001" }
                ],
                "active": true,
                "name": [{ "use": "official", "family": "Smith", "given": ["Jane", "Ann"] }],
                "telecom": [{ "system": "phone", "value": "01632 960123" }],
                "gender": "female", "birthDate": "1980-06-01",
                "deceasedDateTime": "2025-01-15T08:30:00+00:00",
                "address": [
                    { "line": ["1 High Street"], "city": "Leeds", "postalCode": "ls1 4ap", "text": "1 High Street, Leeds" },
                    { "postalCode": "12345" },
                    { "postalCode": "SW1A1AA", "use": "old" }
                ],
                "generalPractitioner": [{ "identifier": { "system": ODS, "value": "A81001" }, "display": "Dr Who" }]
            }),
        ),
        (
            "patient-local",
            None,
            json!({
                "resourceType": "Patient", "id": "local-7",
                "identifier": [{ "system": "https://gp-a81001.example/Id/mrn", "value": "MRN-0007" }],
                "gender": "male", "birthDate": "1931",
                "deceasedBoolean": false,
                "address": [{ "postalCode": "M1 1AE" }]
            }),
        ),
        (
            "patient-old",
            Some("9434765919"),
            json!({
                "resourceType": "Patient", "id": "p2",
                "gender": "unknown", "birthDate": "1920-12-31",
                "extension": [{ "url": "https://example.net/x", "valueCode": "y" }],
                "address": [{ "postalCode": "EC1A 1BB" }]
            }),
        ),
        (
            "observation-panel",
            None,
            json!({
                "resourceType": "Observation", "id": "obs-1", "status": "final",
                "identifier": [{ "system": "https://gp-a81001.example/Id/record", "value": "0000000000000001-000001-001" }],
                "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs", "display": "Vital Signs" }] }],
                "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "75367002", "display": "Blood pressure" }], "text": "BP for Jane" },
                "subject": { "identifier": { "system": NHS, "value": "9434765919" }, "display": "Jane Smith" },
                "encounter": { "reference": "Encounter/enc-9" },
                "effectiveDateTime": "2025-03-04T10:00:00Z", "issued": "2025-03-04T10:05:00Z",
                "performer": [{ "identifier": { "system": ODS, "value": "A81001" } }],
                "note": [{ "text": "Patient seemed well; spoke to her daughter on 01632 960123." }],
                "interpretation": [{ "coding": [{ "code": "N" }], "text": "normal for Jane",
                    "extension": [{ "url": "https://example.net/who", "valueReference": { "reference": "Patient/p1", "display": "Jane" } },
                                  { "url": "https://example.net/nhs", "valueIdentifier": { "system": NHS, "value": "9434765919" } }] }],
                "referenceRange": [{ "low": { "value": 90.5, "unit": "mmHg" }, "high": { "value": 140 }, "text": "adult range" }],
                "component": [
                    { "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "271649006" }], "text": "free text" },
                      "valueQuantity": { "value": 120, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]" } },
                    { "code": { "coding": [{ "code": "271650006" }] }, "valueQuantity": { "value": -0.25, "comparator": "<" } },
                    { "code": { "coding": [{ "code": "x" }] }, "valueString": "Jane said hello", "valueBoolean": true },
                    { "code": { "coding": [{ "code": "y" }] }, "valueInteger": 12345678901234_i64 }
                ]
            }),
        ),
        (
            "observation-string",
            Some("9434765919"),
            json!({
                "resourceType": "Observation", "id": "obs-2", "status": "amended",
                "code": { "coding": [{ "code": "z" }] },
                "subject": { "reference": "Patient/p1" },
                "effectivePeriod": { "start": "2024-02-29", "end": "2024-03" },
                "valueString": "private words",
                "dataAbsentReason": { "text": "asked not to say" }
            }),
        ),
        (
            "encounter",
            None,
            json!({
                "resourceType": "Encounter", "id": "enc-9", "status": "finished",
                "text": { "status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">A&amp;E</div>" },
                "identifier": [{ "system": "https://trust.example/Id/visit", "value": "V1" }, { "value": "no-system" }, { "system": "x" },
                               { "use": "usual", "value": " V2 ", "system": "https://trust.example/Id/visit", "period": { "start": "2025-01-01" } }],
                "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER" },
                "type": [{ "coding": [{ "code": "50849002" }], "text": "seen by Dr X" }, { "text": "only text" }],
                "priority": { "coding": [{ "code": "UR" }] },
                "subject": { "reference": "Patient/p1", "type": "Patient", "display": "Jane" },
                "participant": [{ "individual": { "reference": "Practitioner/dr1" } }],
                "period": { "start": "2025-03-04T09:58:12.123+01:00", "end": "2025-03-05" },
                "reasonCode": [{ "coding": [{ "code": "1" }], "text": "reason" }],
                "hospitalization": { "admitSource": { "coding": [{ "code": "gp" }] }, "dischargeDisposition": { "text": "home" }, "origin": { "reference": "Location/l1" } },
                "serviceProvider": { "identifier": { "system": ODS, "value": "RA4" }, "display": "Trust" },
                "partOf": { "reference": "Encounter/enc-0/_history/2" }
            }),
        ),
        (
            "condition",
            None,
            json!({
                "resourceType": "Condition", "id": "cond-1",
                "clinicalStatus": { "coding": [{ "code": "active" }] },
                "category": [{ "coding": [{ "code": "problem-list-item" }] }],
                "severity": { "coding": [{ "code": "24484000" }] },
                "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "38341003" }], "text": "Jane's BP" },
                "subject": { "reference": "Patient/local-7" },
                "encounter": { "reference": "urn:uuid:0c8a8a2e-1111-2222-3333-444455556666" },
                "onsetDateTime": "2024-02-29T23:59:59Z",
                "abatementString": "resolved",
                "recordedDate": "2024",
                "note": [{ "text": "x" }, { "text": "y" }]
            }),
        ),
        (
            "medication-request",
            None,
            json!({
                "resourceType": "MedicationRequest", "id": "mr-1", "status": "active", "intent": "order",
                "medicationCodeableConcept": { "coding": [{ "code": "322236009" }], "text": "Paracetamol for Jane" },
                "subject": { "identifier": { "system": NHS, "value": "9434-765-919" } },
                "encounter": { "reference": "#enc" },
                "authoredOn": "2025-12-31",
                "requester": { "reference": "Practitioner/dr1", "display": "Dr Who" },
                "dosageInstruction": [
                    { "text": "two at night", "timing": { "repeat": { "frequency": 1, "period": 1, "periodUnit": "d" } }, "route": { "coding": [{ "code": "26643006" }], "text": "oral" },
                      "doseAndRate": [{ "doseQuantity": { "value": 2 } }] },
                    { "patientInstruction": "with food" }
                ],
                "dispenseRequest": { "quantity": { "value": 32 }, "expectedSupplyDuration": { "value": 16, "unit": "d" }, "performer": { "reference": "Organization/o1" } }
            }),
        ),
        (
            "medication-request-ref",
            None,
            json!({
                "resourceType": "MedicationRequest", "id": "mr-2", "status": "active", "intent": "plan",
                "medicationReference": { "reference": "Medication/med-1", "display": "Para" },
                "subject": { "reference": "Patient/p1" },
                "authoredOn": "2025-01"
            }),
        ),
        (
            "medication-dispense",
            None,
            json!({
                "resourceType": "MedicationDispense", "id": "md-1", "status": "completed",
                "medicationCodeableConcept": { "coding": [{ "code": "1" }] },
                "subject": { "identifier": { "system": "https://other.example/Id/patient", "value": "P9" } },
                "authorizingPrescription": [{ "reference": "MedicationRequest/mr-1" }, { "identifier": { "system": "https://gp.example/Id/rx", "value": "RX1" } }, { "reference": "http://other.example/fhir/MedicationRequest/9" }],
                "performer": [{ "actor": { "reference": "Practitioner/ph1" } }, { "actor": { "identifier": { "system": ODS, "value": "FVR79" } } }, { "actor": { "identifier": { "value": "RA4", "use": "official", "system": ODS } } }, { "function": { "text": "x" } }],
                "quantity": { "value": 28 }, "daysSupply": { "value": 28 },
                "whenPrepared": "2025-03-01T12:00:00Z", "whenHandedOver": "not a date"
            }),
        ),
        (
            "immunization",
            None,
            json!({
                "resourceType": "Immunization", "id": "imm-1", "status": "completed",
                "vaccineCode": { "coding": [{ "code": "1119349007" }], "text": "COVID" },
                "patient": { "reference": "Patient/p5" },
                "occurrenceString": "last spring",
                "primarySource": true,
                "doseQuantity": { "value": 0.5, "unit": "mL" },
                "protocolApplied": [{ "doseNumberPositiveInt": 2, "series": "x", "targetDisease": [{ "coding": [{ "code": "840539006" }] }] }]
            }),
        ),
        (
            "careplan",
            Some("9434765919"),
            json!({
                "resourceType": "CarePlan", "id": "cp-1", "status": "active", "intent": "plan",
                "category": [{ "coding": [{ "code": "assess-plan" }], "text": "Jane's plan" }],
                "subject": { "reference": "Patient/p1" },
                "period": { "start": "2025-01-01" },
                "created": "2024-12-24T10:00:00Z",
                "title": "Plan for Jane", "description": "words"
            }),
        ),
        (
            "document-reference",
            None,
            json!({
                "resourceType": "DocumentReference", "id": "doc-1", "status": "current", "docStatus": "final",
                "type": { "coding": [{ "code": "371531000" }], "text": "Letter" },
                "subject": { "reference": "Patient/local-7" },
                "date": "2025-03-04T10:00:00Z",
                "content": [{ "attachment": { "contentType": "text/plain", "data": "TGV0dGVy", "title": "Letter to Jane" }, "format": { "code": "urn:x" } }],
                "context": { "encounter": [{ "reference": "Encounter/enc-9" }], "period": { "start": "2025-03-04T10:00:00Z" } },
                "description": "to Jane"
            }),
        ),
        (
            "procedure-no-patient",
            None,
            json!({
                "resourceType": "Procedure", "status": "completed",
                "code": { "coding": [{ "code": "80146002" }] },
                "performedPeriod": { "start": "2019-07-01T00:00:00Z" }
            }),
        ),
        (
            "not-carried",
            None,
            json!({ "resourceType": "Consent", "id": "c1", "status": "active" }),
        ),
        ("not-a-resource", None, json!(["Patient"])),
    ]
}

fn render() -> String {
    let mut out = String::new();
    for (name, definition) in definitions() {
        // The same secret for every feed: the feed id inside the MAC separates them.
        let key = FeedKey::from_secret(&definition.id, 1, &[7; 32]);
        let transformer = Transformer::new(&definition, &key);
        writeln!(
            out,
            "{name} nhs-number-pseudonym {}",
            transformer.nhs_number_pseudonym("943 476 5919")
        )
        .unwrap();
        for (input, nhs_number, resource) in inputs() {
            let context = RecordContext {
                partner: "gp-a81001",
                nhs_number,
                as_of: date!(2025 - 06 - 01),
            };
            let line = render_one(transformer.apply(&resource, &context));
            // The export's path (the transform consumes the resource) gives the same bytes.
            assert_eq!(
                render_one(transformer.apply_owned(resource, &context)),
                line,
                "{name} {input}: apply_owned differs from apply"
            );
            writeln!(out, "{name} {input} {line}").unwrap();
        }
    }
    out
}

fn render_one(transformed: Option<Transformed>) -> String {
    match transformed {
        None => "none".to_owned(),
        Some(t) => {
            let qi = t
                .quasi_identifiers
                .map(|q| format!("{}|{}|{}", q.age, q.sex, q.area));
            format!(
                "patient={:?} qi={:?} redactions={} {}",
                t.patient,
                qi,
                t.redactions,
                serde_json::to_string(&t.resource).unwrap()
            )
        }
    }
}

#[test]
fn transform_output_is_pinned() {
    let preserve_order = serde_json::from_str::<Value>(r#"{"b":0,"a":0}"#)
        .unwrap()
        .to_string()
        .starts_with(r#"{"b""#);
    let file = if preserve_order {
        "tests/golden/transform.preserve_order.txt"
    } else {
        "tests/golden/transform.txt"
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let actual = render();
    if std::env::var_os("CAREGATE_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap();
    for (i, (a, e)) in actual.lines().zip(expected.lines()).enumerate() {
        assert_eq!(a, e, "line {} of {} differs", i + 1, path.display());
    }
    assert_eq!(actual.lines().count(), expected.lines().count());
}
