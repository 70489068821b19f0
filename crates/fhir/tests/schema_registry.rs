//! The schema registry over small inline resources: every supported type's minimal valid form passes,
//! and each kind of schema fault gives the right `IssueCode`, a FHIRPath expression rooted at the
//! resource type, and a diagnostic that never repeats the submitted value.

use std::sync::OnceLock;

use caregate_fhir::outcome::{Issue, IssueCode, IssueSink};
use caregate_fhir::resource::ResourceType;
use caregate_fhir::schema::SchemaRegistry;
use serde_json::{Value, json};

/// A valid NHS number (Modulus 11) used as the "sensitive value" in leak tests.
const NHS_NUMBER: &str = "9434765919";

fn registry() -> &'static SchemaRegistry {
    static REGISTRY: OnceLock<SchemaRegistry> = OnceLock::new();
    REGISTRY.get_or_init(|| SchemaRegistry::builtin().expect("built-in schemas compile"))
}

fn issues(resource_type: ResourceType, value: &Value) -> Vec<Issue> {
    let mut sink = IssueSink::default();
    registry().validate(resource_type, value, &mut sink);
    sink.finish()
}

/// The single issue a faulty resource must produce.
fn single_issue(resource_type: ResourceType, value: &Value) -> Issue {
    let mut found = issues(resource_type, value);
    assert_eq!(found.len(), 1, "expected exactly one issue, got {found:#?}");
    found.remove(0)
}

fn minimal(resource_type: ResourceType) -> Value {
    let subject = json!({"reference": "Patient/example"});
    let concept = json!({"text": "something"});
    let mut value = match resource_type {
        ResourceType::Patient => json!({}),
        ResourceType::RelatedPerson => json!({"patient": subject}),
        ResourceType::Encounter => json!({"status": "finished", "class": {"code": "AMB"}}),
        ResourceType::EpisodeOfCare => json!({"status": "active", "patient": subject}),
        ResourceType::Observation => json!({"status": "final", "code": concept}),
        ResourceType::Condition => json!({"subject": subject}),
        ResourceType::Procedure => json!({"status": "completed", "subject": subject}),
        ResourceType::AllergyIntolerance => json!({"patient": subject}),
        ResourceType::MedicationRequest => json!({
            "status": "active", "intent": "order", "medicationCodeableConcept": concept, "subject": subject
        }),
        ResourceType::MedicationDispense => {
            json!({"status": "completed", "medicationReference": {"reference": "#med"}})
        }
        ResourceType::MedicationStatement => json!({
            "status": "active", "medicationCodeableConcept": concept, "subject": subject
        }),
        ResourceType::Immunization => json!({
            "status": "completed", "vaccineCode": concept, "patient": subject,
            "occurrenceDateTime": "2024-10-01T10:15:00+01:00"
        }),
        ResourceType::DiagnosticReport => json!({"status": "final", "code": concept}),
        ResourceType::DocumentReference => json!({
            "status": "current", "content": [{"attachment": {"contentType": "application/pdf"}}]
        }),
        ResourceType::CarePlan => json!({"status": "active", "intent": "plan", "subject": subject}),
        ResourceType::ServiceRequest => {
            json!({"status": "active", "intent": "order", "subject": subject})
        }
        ResourceType::Flag => json!({"status": "active", "code": concept, "subject": subject}),
        ResourceType::Consent => {
            json!({"status": "active", "scope": concept, "category": [concept]})
        }
        ResourceType::Bundle => json!({"type": "collection"}),
    };
    value["resourceType"] = json!(resource_type.as_str());
    value
}

#[test]
fn schema_minimal_resource_of_every_type_passes() {
    for &resource_type in ResourceType::ALL {
        let found = issues(resource_type, &minimal(resource_type));
        assert!(found.is_empty(), "{resource_type}: {found:#?}");
    }
}

#[test]
fn schema_every_type_rejects_an_empty_object() {
    for &resource_type in ResourceType::ALL {
        let found = issues(resource_type, &json!({}));
        assert!(
            found.iter().any(|i| i.code == IssueCode::Required
                && i.expression == [format!("{resource_type}.resourceType")]),
            "{resource_type}: {found:#?}"
        );
    }
}

#[test]
fn schema_missing_required_element_is_required_at_its_path() {
    let mut observation = minimal(ResourceType::Observation);
    observation.as_object_mut().unwrap().remove("status");
    let issue = single_issue(ResourceType::Observation, &observation);
    assert_eq!(issue.code, IssueCode::Required);
    assert_eq!(issue.expression, ["Observation.status"]);
    assert!(
        issue.diagnostics.contains("'status'"),
        "{}",
        issue.diagnostics
    );
}

#[test]
fn schema_missing_required_element_inside_backbone_has_indexed_path() {
    let patient = json!({"resourceType": "Patient", "communication": [
        {"language": {"text": "English"}}, {"preferred": true}
    ]});
    let issue = single_issue(ResourceType::Patient, &patient);
    assert_eq!(issue.code, IssueCode::Required);
    assert_eq!(issue.expression, ["Patient.communication[1].language"]);
}

#[test]
fn schema_unknown_element_is_structure_and_named() {
    let patient = json!({"resourceType": "Patient", "favouriteColour": "blue"});
    let issue = single_issue(ResourceType::Patient, &patient);
    assert_eq!(issue.code, IssueCode::Structure);
    assert_eq!(issue.expression, ["Patient.favouriteColour"]);
    assert_eq!(issue.diagnostics, "unknown element 'favouriteColour'");
}

#[test]
fn schema_unknown_element_inside_a_data_type_is_rejected() {
    let patient = json!({"resourceType": "Patient", "identifier": [
        {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": NHS_NUMBER, "checkDigit": "9"}
    ]});
    let issue = single_issue(ResourceType::Patient, &patient);
    assert_eq!(issue.code, IssueCode::Structure);
    assert_eq!(issue.expression, ["Patient.identifier[0].checkDigit"]);
}

#[test]
fn schema_bad_date_is_value_naming_the_fhir_type() {
    let patient = json!({"resourceType": "Patient", "birthDate": "1990-13-01"});
    let issue = single_issue(ResourceType::Patient, &patient);
    assert_eq!(issue.code, IssueCode::Value);
    assert_eq!(issue.expression, ["Patient.birthDate"]);
    assert_eq!(
        issue.diagnostics,
        "value does not match the FHIR date format"
    );
}

#[test]
fn schema_date_time_without_time_zone_is_rejected() {
    let mut observation = minimal(ResourceType::Observation);
    observation["effectiveDateTime"] = json!("2024-03-01T10:00:00");
    let issue = single_issue(ResourceType::Observation, &observation);
    assert_eq!(issue.code, IssueCode::Value);
    assert_eq!(issue.expression, ["Observation.effectiveDateTime"]);
    assert!(
        issue.diagnostics.contains("dateTime"),
        "{}",
        issue.diagnostics
    );
}

#[test]
fn schema_partial_dates_are_accepted() {
    for date in ["1990", "1990-07", "1990-07-14"] {
        let patient = json!({"resourceType": "Patient", "birthDate": date});
        assert!(issues(ResourceType::Patient, &patient).is_empty(), "{date}");
    }
}

#[test]
fn schema_bad_enum_code_lists_the_allowed_codes() {
    let patient = json!({"resourceType": "Patient", "gender": "F"});
    let issue = single_issue(ResourceType::Patient, &patient);
    assert_eq!(issue.code, IssueCode::Value);
    assert_eq!(issue.expression, ["Patient.gender"]);
    assert_eq!(
        issue.diagnostics,
        "expected one of: male, female, other, unknown"
    );
}

#[test]
fn schema_wrong_type_is_value() {
    let patient = json!({"resourceType": "Patient", "active": "yes"});
    let issue = single_issue(ResourceType::Patient, &patient);
    assert_eq!(issue.code, IssueCode::Value);
    assert_eq!(issue.expression, ["Patient.active"]);
    assert_eq!(issue.diagnostics, "expected FHIR boolean (a JSON boolean)");
}

#[test]
fn schema_wrong_choice_type_name_is_an_unknown_element() {
    let mut observation = minimal(ResourceType::Observation);
    observation["valueText"] = json!("high");
    let issue = single_issue(ResourceType::Observation, &observation);
    assert_eq!(issue.code, IssueCode::Structure);
    assert_eq!(issue.expression, ["Observation.valueText"]);
    assert_eq!(issue.diagnostics, "unknown element 'valueText'");
}

#[test]
fn schema_simple_quantity_choice_uses_the_quantity_name() {
    let mut request = minimal(ResourceType::MedicationRequest);
    request["dosageInstruction"] =
        json!([{"doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet"}}]}]);
    assert!(issues(ResourceType::MedicationRequest, &request).is_empty());
    request["dosageInstruction"] =
        json!([{"doseAndRate": [{"doseSimpleQuantity": {"value": 1, "unit": "tablet"}}]}]);
    let issue = single_issue(ResourceType::MedicationRequest, &request);
    assert_eq!(issue.code, IssueCode::Structure);
}

#[test]
fn schema_two_forms_of_one_choice_element_give_one_issue() {
    let patient = json!({"resourceType": "Patient", "deceasedBoolean": true,
        "deceasedDateTime": "2024-01-01T00:00:00Z"});
    let issue = single_issue(ResourceType::Patient, &patient);
    assert_eq!(issue.code, IssueCode::Invalid);
    assert_eq!(issue.expression, ["Patient"]);
    assert_eq!(
        issue.diagnostics,
        "only one form of deceased[x] may be present"
    );
}

#[test]
fn schema_missing_required_choice_element_is_one_required_issue() {
    let mut request = minimal(ResourceType::MedicationRequest);
    request
        .as_object_mut()
        .unwrap()
        .remove("medicationCodeableConcept");
    let issue = single_issue(ResourceType::MedicationRequest, &request);
    assert_eq!(issue.code, IssueCode::Required);
    assert_eq!(issue.expression, ["MedicationRequest.medication"]);
    assert_eq!(
        issue.diagnostics,
        "missing required element: one of medicationCodeableConcept, medicationReference"
    );
}

#[test]
fn schema_empty_array_is_invalid() {
    let patient = json!({"resourceType": "Patient", "name": []});
    let issue = single_issue(ResourceType::Patient, &patient);
    assert_eq!(issue.code, IssueCode::Invalid);
    assert_eq!(issue.expression, ["Patient.name"]);
}

#[test]
fn schema_resource_type_must_match_the_schema() {
    let issue = single_issue(
        ResourceType::Patient,
        &json!({"resourceType": "Practitioner"}),
    );
    assert_eq!(issue.code, IssueCode::Value);
    assert_eq!(issue.expression, ["Patient.resourceType"]);
    assert_eq!(issue.diagnostics, "expected 'Patient'");
}

#[test]
fn schema_primitive_extension_siblings_are_accepted_and_checked() {
    let patient = json!({"resourceType": "Patient", "birthDate": "1990-07-14",
        "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
            "valueDateTime": "1990-07-14T08:30:00+01:00"}]},
        "name": [{"given": ["Ann", "Marie"], "_given": [null, {"id": "g2"}]}]});
    assert!(issues(ResourceType::Patient, &patient).is_empty());

    let patient = json!({"resourceType": "Patient", "_birthDate": {"value": "x"}});
    let issue = single_issue(ResourceType::Patient, &patient);
    assert_eq!(issue.code, IssueCode::Structure);
    assert_eq!(issue.expression, ["Patient.birthDate.value"]);
}

#[test]
fn schema_extension_requires_url_and_checks_its_value() {
    let patient = json!({"resourceType": "Patient", "extension": [{"valueString": "x"}]});
    let issue = single_issue(ResourceType::Patient, &patient);
    assert_eq!(issue.code, IssueCode::Required);
    assert_eq!(issue.expression, ["Patient.extension[0].url"]);

    let patient = json!({"resourceType": "Patient", "extension": [
        {"url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-EthnicCategory",
         "valueCodeableConcept": {"coding": [{"code": "A", "system": "not a uri"}]}}]});
    let issue = single_issue(ResourceType::Patient, &patient);
    assert_eq!(issue.code, IssueCode::Value);
    assert_eq!(
        issue.expression,
        ["Patient.extension[0].valueCodeableConcept.coding[0].system"]
    );
    assert_eq!(
        issue.diagnostics,
        "value does not match the FHIR uri format"
    );
}

#[test]
fn schema_contained_accepts_any_resource_type_but_needs_one() {
    let mut dispense = minimal(ResourceType::MedicationDispense);
    dispense["contained"] =
        json!([{"resourceType": "Medication", "id": "med", "code": {"text": "x"}}]);
    assert!(issues(ResourceType::MedicationDispense, &dispense).is_empty());

    dispense["contained"] = json!([{"id": "med"}]);
    let issue = single_issue(ResourceType::MedicationDispense, &dispense);
    assert_eq!(issue.code, IssueCode::Required);
    assert_eq!(
        issue.expression,
        ["MedicationDispense.contained[0].resourceType"]
    );
}

#[test]
fn schema_bundle_checks_its_own_structure_only() {
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{
        "fullUrl": "urn:uuid:4f1c2a4e-8d8a-4a61-9b1e-1d0c7d1f0a10",
        "resource": {"resourceType": "Patient", "anything": "is left to the Patient schema"},
        "request": {"method": "POST", "url": "Patient"}
    }]});
    assert!(issues(ResourceType::Bundle, &bundle).is_empty());

    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{
        "resource": {"resourceType": "Patient"}, "request": {"method": "SEND", "url": "Patient"}
    }]});
    let issue = single_issue(ResourceType::Bundle, &bundle);
    assert_eq!(issue.code, IssueCode::Value);
    assert_eq!(issue.expression, ["Bundle.entry[0].request.method"]);
    assert_eq!(
        issue.diagnostics,
        "expected one of: GET, HEAD, POST, PUT, DELETE, PATCH"
    );
}

#[test]
fn schema_bundle_is_a_resource_not_a_domain_resource() {
    // FHIR R4 Bundle derives from Resource: no text, contained or extension.
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "text": {
        "status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"}});
    let issue = single_issue(ResourceType::Bundle, &bundle);
    assert_eq!(issue.code, IssueCode::Structure);
    assert_eq!(issue.expression, ["Bundle.text"]);
}

#[test]
fn schema_bundle_type_is_required() {
    let issue = single_issue(ResourceType::Bundle, &json!({"resourceType": "Bundle"}));
    assert_eq!(issue.code, IssueCode::Required);
    assert_eq!(issue.expression, ["Bundle.type"]);
}

#[test]
fn schema_diagnostics_never_echo_the_submitted_value() {
    let patient = json!({
        "resourceType": "Patient",
        "id": format!("{NHS_NUMBER}/x"),
        "gender": NHS_NUMBER,
        "birthDate": NHS_NUMBER,
        "active": NHS_NUMBER,
        "identifier": [{"value": 9434765919u64, "use": NHS_NUMBER}],
        "name": [{"family": ["Smith"], "use": "Smith"}],
        "telecom": [{"rank": 0}],
        NHS_NUMBER: "misplaced",
        "deceasedBoolean": false,
        "deceasedDateTime": NHS_NUMBER,
    });
    let found = issues(ResourceType::Patient, &patient);
    assert!(found.len() >= 9, "{found:#?}");
    for issue in &found {
        for text in std::iter::once(&issue.diagnostics).chain(&issue.expression) {
            assert!(!text.contains(NHS_NUMBER), "value echoed: {issue:?}");
            assert!(!text.contains("Smith"), "value echoed: {issue:?}");
        }
    }
    // The misplaced key is reported at the resource without naming it.
    assert!(
        found
            .iter()
            .any(|i| i.code == IssueCode::Structure && i.expression == ["Patient"])
    );
}

#[test]
fn schema_issue_collection_stops_when_the_sink_is_full() {
    let identifiers: Vec<Value> = (0..100).map(|_| json!({"bogus": true})).collect();
    let patient = json!({"resourceType": "Patient", "identifier": identifiers});
    let mut sink = IssueSink::new(5);
    registry().validate(ResourceType::Patient, &patient, &mut sink);
    assert!(sink.is_full());
    let found = sink.finish();
    assert_eq!(found.len(), 6);
    assert_eq!(found[5].code, IssueCode::TooCostly);
}

#[test]
fn schema_validate_by_name_reports_unsupported_types() {
    let mut sink = IssueSink::default();
    let practitioner = json!({"resourceType": "Practitioner"});
    assert!(!registry().validate_by_name("Practitioner", &practitioner, &mut sink));
    assert!(sink.is_empty());
    assert!(registry().validate_by_name("Patient", &json!({"resourceType": "Patient"}), &mut sink));
    assert!(sink.is_empty());
}

#[test]
fn schema_integer_ranges_are_enforced() {
    let patient = json!({"resourceType": "Patient", "telecom": [{"rank": 0}]});
    let issue = single_issue(ResourceType::Patient, &patient);
    assert_eq!(issue.code, IssueCode::Value);
    assert_eq!(issue.expression, ["Patient.telecom[0].rank"]);
    assert_eq!(
        issue.diagnostics,
        "value is out of range for FHIR positiveInt"
    );
}
