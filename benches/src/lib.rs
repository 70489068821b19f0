//! Shared, deterministic inputs for caregate's benchmarks (`benches/benches/*.rs`).
//!
//! Everything is built in code, so the benchmarks run on a fresh clone: no file outside the
//! repository is read. The inputs are UK-shaped FHIR R4 resources of the sizes the performance
//! targets are stated for (compact JSON, as partners send it):
//!
//! | Input | Resource | Size | Expected result |
//! |---|---|---|---|
//! | `2kb_valid` | blood-pressure Observation (SNOMED CT + LOINC, two components, NHS-number subject) | ~2 KB | valid |
//! | `8kb_valid` | Patient with UK Core extensions, several names, addresses, telecoms and contacts | ~8 KB | valid |
//! | `*_invalid_schema` | the same, with a UK-format date (2 KB) or an unknown element (8 KB) | | 400 structure |
//! | `*_invalid_nhs_number` | the same, with an NHS number failing Modulus 11 | | 422 business rule |
//! | `*_malformed` | the same, with a duplicated key | | 400 structure (strict parser) |
//!
//! The unit tests pin the sizes and the expected outcomes, so the benchmarks keep measuring what
//! their names say. NHS numbers are from the test range (starting with 9), never real ones.

use aws_lc_rs::digest;
use caregate_audit::{Action, Actor, AuditEvent, Entity, Outcome};
use caregate_fhir::validate::{RejectionKind, Validated};
use caregate_fhir::{ValidatedResource, Validator};
use caregate_store::{RecordWrite, Submission, WriteMode};
use serde_json::{Value, json};

/// A test-range NHS number that passes Modulus 11 (NHS Digital's documentation example).
pub const TEST_NHS_NUMBER: &str = "9434765919";

/// [`TEST_NHS_NUMBER`] with its check digit changed: fails Modulus 11 (DOMAIN.md `NHSNO`).
pub const NHS_NUMBER_FAILING_MODULUS_11: &str = "9434765918";

/// The NHS number identifier system (<https://fhir.nhs.uk/Id/nhs-number>).
const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const SDS_USER_SYSTEM: &str = "https://fhir.nhs.uk/Id/sds-user-id";
const SNOMED_CT: &str = "http://snomed.info/sct";
const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";

/// What validating an [`Input`] must give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Valid,
    Rejected(RejectionKind),
}

/// One benchmark input: its benchmark id, its bytes and the result validation must give.
#[derive(Debug, Clone)]
pub struct Input {
    /// The benchmark id within the `validate` group, e.g. `2kb_valid`.
    pub name: &'static str,
    pub bytes: Vec<u8>,
    pub expected: Expected,
}

/// Every validation input, valid ones first.
pub fn inputs() -> Vec<Input> {
    let observation = blood_pressure_observation();
    let patient = patient_record();
    let structure = Expected::Rejected(RejectionKind::Structure);
    let business_rule = Expected::Rejected(RejectionKind::BusinessRule);
    vec![
        Input {
            name: "2kb_valid",
            bytes: compact(&observation),
            expected: Expected::Valid,
        },
        Input {
            name: "8kb_valid",
            bytes: compact(&patient),
            expected: Expected::Valid,
        },
        Input {
            name: "2kb_invalid_schema",
            bytes: compact(&observation_with_uk_format_date(observation.clone())),
            expected: structure,
        },
        Input {
            name: "8kb_invalid_schema",
            bytes: compact(&patient_with_unknown_element(patient.clone())),
            expected: structure,
        },
        Input {
            name: "2kb_invalid_nhs_number",
            bytes: compact(&with_nhs_number(
                observation.clone(),
                NHS_NUMBER_FAILING_MODULUS_11,
            )),
            expected: business_rule,
        },
        Input {
            name: "8kb_invalid_nhs_number",
            bytes: compact(&with_nhs_number(
                patient.clone(),
                NHS_NUMBER_FAILING_MODULUS_11,
            )),
            expected: business_rule,
        },
        Input {
            name: "2kb_malformed",
            bytes: with_duplicate_key(&compact(&observation)),
            expected: structure,
        },
        Input {
            name: "8kb_malformed",
            bytes: with_duplicate_key(&compact(&patient)),
            expected: structure,
        },
    ]
}

/// The input named `name`. Panics on an unknown name: a benchmark asking for one is a typo.
pub fn input(name: &str) -> Input {
    inputs()
        .into_iter()
        .find(|input| input.name == name)
        .unwrap_or_else(|| panic!("no benchmark input named {name}"))
}

/// What validating `bytes` gave, in the terms of [`Expected`].
pub fn outcome(validator: &Validator, bytes: &[u8]) -> Expected {
    match validator.validate_bytes(bytes, None) {
        Ok(_) => Expected::Valid,
        Err(rejection) => Expected::Rejected(rejection.kind),
    }
}

/// Compact JSON, as the benchmarks feed it to the parser.
pub fn compact(value: &Value) -> Vec<u8> {
    // Serialising a `Value` cannot fail: its keys are strings and its numbers finite.
    serde_json::to_vec(value).expect("a serde_json::Value always serialises")
}

/// A ~2 KB blood-pressure Observation as a GP system sends it: UK Core profile, SNOMED CT and
/// LOINC codings, systolic and diastolic components in mm[Hg], the patient by reference and NHS
/// number, the performing clinician (SDS user id) and practice (ODS code).
pub fn blood_pressure_observation() -> Value {
    json!({
        "resourceType": "Observation",
        "id": "bp-20240523-0930",
        "meta": {
            "profile": ["https://fhir.hl7.org.uk/StructureDefinition/UKCore-Observation"]
        },
        "identifier": [{
            "system": "https://fhir.example-gp.nhs.uk/Id/observation",
            "value": "3f2a7c1e-5b8d-4e0f-9a6b-2c1d8e7f4a90"
        }],
        "status": "final",
        "category": [{
            "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs",
                "display": "Vital Signs"
            }]
        }],
        "code": {
            "coding": [
                {"system": SNOMED_CT, "code": "75367002", "display": "Blood pressure"},
                {"system": LOINC, "code": "85354-9", "display": "Blood pressure panel with all children optional"}
            ],
            "text": "Blood pressure"
        },
        "subject": {
            "reference": "Patient/9000000009",
            "type": "Patient",
            "identifier": {"system": NHS_NUMBER_SYSTEM, "value": TEST_NHS_NUMBER}
        },
        "encounter": {"reference": "Encounter/enc-20240523-01"},
        "effectiveDateTime": "2024-05-23T09:30:00+01:00",
        "issued": "2024-05-23T09:41:12.345+01:00",
        "performer": [
            {
                "reference": "Practitioner/G8133438",
                "identifier": {"system": SDS_USER_SYSTEM, "value": "555086689106"},
                "display": "Dr Amelia Hughes"
            },
            {
                "type": "Organization",
                "identifier": {"system": ODS_SYSTEM, "value": "Y12345"},
                "display": "Riverside Medical Practice"
            }
        ],
        "bodySite": {
            "coding": [{"system": SNOMED_CT, "code": "368209003", "display": "Right upper arm structure"}]
        },
        "method": {
            "coding": [{"system": SNOMED_CT, "code": "37931006", "display": "Auscultation"}]
        },
        "component": [
            {
                "code": {
                    "coding": [
                        {"system": SNOMED_CT, "code": "271649006", "display": "Systolic blood pressure"},
                        {"system": LOINC, "code": "8480-6", "display": "Systolic blood pressure"}
                    ]
                },
                "valueQuantity": {"value": 138, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}
            },
            {
                "code": {
                    "coding": [
                        {"system": SNOMED_CT, "code": "271650006", "display": "Diastolic blood pressure"},
                        {"system": LOINC, "code": "8462-4", "display": "Diastolic blood pressure"}
                    ]
                },
                "valueQuantity": {"value": 86, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}
            }
        ]
    })
}

/// A ~8 KB Patient as a PDS-backed system holds it: UK Core profile and extensions (ethnic
/// category, birth sex, interpreter, contact preference), a verified NHS number, usual and
/// maiden names, home/temporary/billing addresses, several telecoms, next-of-kin contacts,
/// languages, a link to a merged record, and the registered GP practice by ODS code.
pub fn patient_record() -> Value {
    let ukcore_extension =
        |name: &str| format!("https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-{name}");
    let codeable = |system: &str, code: &str, display: &str| json!({"coding": [{"system": system, "code": code, "display": display}]});
    let address = |use_: &str, lines: &[&str], city: &str, district: &str, postcode: &str| {
        json!({
            "use": use_,
            "type": "both",
            "line": lines,
            "city": city,
            "district": district,
            "postalCode": postcode,
            "country": "GBR",
            "period": {"start": "2019-04-01"}
        })
    };
    let contact = |relationship: (&str, &str), family: &str, given: &[&str], phone: &str| {
        json!({
            "relationship": [
                codeable("http://terminology.hl7.org/CodeSystem/v2-0131", relationship.0, relationship.1),
                codeable(
                    "https://fhir.hl7.org.uk/CodeSystem/UKCore-AdditionalRelatedPersonRole",
                    "Personal",
                    "Personal relationship with the patient"
                )
            ],
            "name": {"use": "usual", "family": family, "given": given, "prefix": ["Mrs"]},
            "telecom": [
                {"system": "phone", "value": phone, "use": "mobile", "rank": 1},
                {"system": "email", "value": format!("{}.{}@example.co.uk", given[0].to_lowercase(), family.to_lowercase()), "use": "home"}
            ],
            "address": {
                "use": "home",
                "line": ["14 Orchard Close", "Hedge End"],
                "city": "Southampton",
                "district": "Hampshire",
                "postalCode": "SO30 4FE",
                "country": "GBR"
            },
            "gender": "female",
            "period": {"start": "2021-09-14"}
        })
    };

    json!({
        "resourceType": "Patient",
        "id": "9000000009",
        "meta": {
            "versionId": "7",
            "lastUpdated": "2024-05-20T14:03:27.000+00:00",
            "profile": ["https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"],
            "security": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                "code": "U",
                "display": "unrestricted"
            }]
        },
        "extension": [
            {
                "url": ukcore_extension("EthnicCategory"),
                "valueCodeableConcept": codeable(
                    "https://fhir.hl7.org.uk/CodeSystem/UKCore-EthnicCategoryEngland",
                    "A",
                    "White - British"
                )
            },
            {
                "url": ukcore_extension("BirthSex"),
                "valueCodeableConcept": codeable(
                    "http://hl7.org/fhir/administrative-gender",
                    "female",
                    "Female"
                )
            },
            {
                "url": ukcore_extension("ResidentialStatus"),
                "valueCodeableConcept": codeable(
                    "https://fhir.hl7.org.uk/CodeSystem/UKCore-ResidentialStatus",
                    "H",
                    "UK Resident"
                )
            },
            {
                "url": ukcore_extension("ContactPreference"),
                "extension": [
                    {
                        "url": "PreferredWrittenCommunicationFormat",
                        "valueCodeableConcept": codeable(
                            "https://fhir.hl7.org.uk/CodeSystem/UKCore-PreferredWrittenCommunicationFormat",
                            "12",
                            "Large print"
                        )
                    },
                    {
                        "url": "PreferredContactMethod",
                        "valueCodeableConcept": codeable(
                            "https://fhir.hl7.org.uk/CodeSystem/UKCore-PreferredContactMethod",
                            "3",
                            "Telephone"
                        )
                    },
                    {"url": "PreferredContactTimes", "valueString": "Weekday mornings before 11:00"}
                ]
            },
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-interpreterRequired",
                "valueBoolean": false
            }
        ],
        "identifier": [
            {
                "extension": [{
                    "url": ukcore_extension("NHSNumberVerificationStatus"),
                    "valueCodeableConcept": codeable(
                        "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland",
                        "01",
                        "Number present and verified"
                    )
                }],
                "system": NHS_NUMBER_SYSTEM,
                "value": TEST_NHS_NUMBER
            },
            {
                "use": "secondary",
                "type": codeable("http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical record number"),
                "system": "https://fhir.example-trust.nhs.uk/Id/hospital-number",
                "value": "RHM0045521",
                "assigner": {"identifier": {"system": ODS_SYSTEM, "value": "RHM"}, "display": "University Hospital Southampton"}
            },
            {
                "use": "secondary",
                "type": codeable("http://terminology.hl7.org/CodeSystem/v2-0203", "PI", "Patient internal identifier"),
                "system": "https://fhir.example-ics.nhs.uk/Id/shared-care-record",
                "value": "HIOW-000731946",
                "period": {"start": "2020-03-02"},
                "assigner": {"identifier": {"system": ODS_SYSTEM, "value": "QRL"}, "display": "Hampshire and Isle of Wight ICB"}
            }
        ],
        "active": true,
        "name": [
            {
                "use": "usual",
                "family": "Whitfield-Harper",
                "given": ["Eleanor", "Margaret"],
                "prefix": ["Mrs"],
                "period": {"start": "1984-06-16"}
            },
            {
                "use": "maiden",
                "family": "Harper",
                "given": ["Eleanor", "Margaret"],
                "period": {"start": "1958-02-11", "end": "1984-06-15"}
            },
            {
                "use": "nickname",
                "given": ["Nell"]
            }
        ],
        "telecom": [
            {"system": "phone", "value": "023 8012 3456", "use": "home", "rank": 2},
            {"system": "phone", "value": "07700 900123", "use": "mobile", "rank": 1},
            {"system": "phone", "value": "023 8098 7654", "use": "work", "period": {"start": "2010-01-04", "end": "2018-12-31"}},
            {"system": "email", "value": "eleanor.whitfield-harper@example.co.uk", "use": "home"},
            {"system": "sms", "value": "07700 900123", "use": "mobile"}
        ],
        "gender": "female",
        "birthDate": "1958-02-11",
        "_birthDate": {
            "extension": [{
                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                "valueDateTime": "1958-02-11T06:42:00+00:00"
            }]
        },
        "deceasedBoolean": false,
        "address": [
            address("home", &["Flat 3", "27 Portswood Road", "Portswood"], "Southampton", "Hampshire", "SO17 2ES"),
            address("temp", &["Rose Cottage", "Lyndhurst Road", "Brockenhurst"], "Brockenhurst", "Hampshire", "SO42 7RH"),
            address("billing", &["PO Box 1234"], "Southampton", "Hampshire", "SO15 1AA"),
            address("old", &["112 Shirley High Street", "Shirley"], "Southampton", "Hampshire", "SO15 3FP"),
            address("old", &["9 Winchester Road", "Bassett"], "Southampton", "Hampshire", "SO16 7HS")
        ],
        "maritalStatus": codeable("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "W", "Widowed"),
        "multipleBirthBoolean": false,
        "contact": [
            contact(("N", "Next-of-Kin"), "Whitfield", &["Sarah", "Jane"], "07700 900456"),
            contact(("C", "Emergency Contact"), "Okafor", &["Grace"], "07700 900789"),
            contact(("U", "Unknown"), "Patel", &["Priya", "Anjali"], "07700 900321")
        ],
        "communication": [
            {
                "language": codeable("https://fhir.hl7.org.uk/CodeSystem/UKCore-HumanLanguage", "en", "English"),
                "preferred": true
            },
            {
                "language": codeable("https://fhir.hl7.org.uk/CodeSystem/UKCore-HumanLanguage", "cy", "Welsh"),
                "preferred": false
            }
        ],
        "generalPractitioner": [
            {
                "type": "Organization",
                "identifier": {"system": ODS_SYSTEM, "value": "Y12345"},
                "display": "Riverside Medical Practice"
            },
            {
                "type": "Practitioner",
                "identifier": {"system": SDS_USER_SYSTEM, "value": "555086689106"},
                "display": "Dr Amelia Hughes"
            }
        ],
        "link": [{
            "other": {"reference": "Patient/legacy-RHM0045521", "display": "Record merged from the trust PAS"},
            "type": "seealso"
        }],
        "managingOrganization": {
            "type": "Organization",
            "identifier": {"system": ODS_SYSTEM, "value": "Y12345"},
            "display": "Riverside Medical Practice"
        }
    })
}

/// A date in the UK display form (`23/05/2024 09:30`), a common integration bug; FHIR's
/// `dateTime` is ISO 8601, so the schema's pattern rejects it.
fn observation_with_uk_format_date(mut observation: Value) -> Value {
    observation["effectiveDateTime"] = json!("23/05/2024 09:30");
    observation
}

/// `surname` in a HumanName, which R4 spells `family`: an element the schema does not define.
fn patient_with_unknown_element(mut patient: Value) -> Value {
    if let Some(name) = patient["name"][0].as_object_mut() {
        let family = name.remove("family").unwrap_or(Value::Null);
        name.insert("surname".to_owned(), family);
    }
    patient
}

/// Replace the patient's NHS number (a Patient's own identifier, or another resource's
/// `subject.identifier`).
fn with_nhs_number(mut resource: Value, nhs_number: &str) -> Value {
    let identifier = if resource["resourceType"] == "Patient" {
        &mut resource["identifier"][0]
    } else {
        &mut resource["subject"]["identifier"]
    };
    identifier["value"] = json!(nhs_number);
    resource
}

/// The compact JSON with its top-level `resourceType` member repeated, unchanged. A lenient
/// parser accepts it (last one wins); the strict one refuses it (RFC 8259 §4). serde_json writes
/// keys in sorted order, so the duplicate sits past most of the document and the parser reads
/// nearly all of it before it can refuse.
fn with_duplicate_key(json: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(json).expect("serde_json writes UTF-8");
    let value: Value = serde_json::from_str(text).expect("the input is JSON");
    let member = format!("\"resourceType\":{}", value["resourceType"]);
    assert!(text.contains(&member), "the input has a resourceType");
    text.replacen(&member, &format!("{member},{member}"), 1)
        .into_bytes()
}

/// Builds store [`Submission`]s the way the gateway's create path does (canonical content,
/// SHA-256, NHS number and identifiers from validation, one audit event in the same commit), from
/// the 2 KB Observation, each with a fresh id so that `Create` never conflicts.
#[derive(Debug, Clone)]
pub struct SubmissionFactory {
    template: ValidatedResource,
    partner: String,
    next_id: u64,
}

impl SubmissionFactory {
    /// A factory for `partner`'s submissions. Ids start at `first_id`.
    pub fn new(validator: &Validator, partner: &str, first_id: u64) -> Self {
        let bytes = compact(&blood_pressure_observation());
        let template = match validator.validate_bytes(&bytes, None) {
            Ok(Validated::Resource(resource)) => resource,
            other => panic!("the 2 KB Observation must validate as one resource: {other:?}"),
        };
        Self {
            template,
            partner: partner.to_owned(),
            next_id: first_id,
        }
    }

    /// The next submission: one Observation create with its audit event.
    pub fn next_submission(&mut self) -> Submission {
        let id = format!("bench-obs-{:012}", self.next_id);
        self.next_id += 1;
        let mut resource = self.template.clone();
        resource.clear_server_meta();
        resource.set_id(&id);
        let content = resource.canonical_bytes();
        let write = RecordWrite {
            resource_type: resource.resource_type().as_str().to_owned(),
            id: id.clone(),
            mode: WriteMode::Create,
            content_hash: sha256(&content),
            content,
            nhs_number: resource.nhs_number().map(|n| n.as_str().to_owned()),
            identifiers: resource.identifiers().to_vec(),
            decision: None,
        };
        let actor = Actor {
            partner_id: Some(self.partner.clone()),
            ods_code: Some("Y12345".to_owned()),
            client_id: Some(format!("{}-client", self.partner)),
            remote_addr: Some("192.0.2.10:52100".to_owned()),
        };
        let mut event =
            AuditEvent::new(format!("req-{id}"), actor, Action::Create, Outcome::Success);
        event.status = Some(201);
        event.entity = Some(Entity {
            resource_type: write.resource_type.clone(),
            id: id.clone(),
            version_id: None,
            content_hash: Some(hex::encode(write.content_hash)),
        });
        event.patient = write.nhs_number.clone();
        Submission {
            partner: self.partner.clone(),
            idempotency_key: Some(format!("POST /fhir/Observation rid:req-{id}")),
            records: vec![write],
            audit: vec![event],
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use caregate_fhir::json::{JsonLimits, parse_strict};
    use caregate_fhir::validate::ValidatorConfig;

    use super::*;

    fn validator() -> Validator {
        Validator::new(ValidatorConfig::default()).expect("built-in schemas compile")
    }

    #[test]
    fn inputs_have_the_sizes_their_names_state() {
        // "about 2 KB" and "about 8 KB": within 10% of 2,048 and 8,192 bytes.
        for input in inputs() {
            let target = if input.name.starts_with("2kb") {
                2_048
            } else {
                8_192
            };
            let len = input.bytes.len();
            println!("{}: {len} bytes", input.name);
            assert!(
                len.abs_diff(target) * 10 <= target,
                "{} is {len} bytes, not about {target}",
                input.name
            );
        }
    }

    #[test]
    fn inputs_validate_as_expected() {
        let validator = validator();
        for input in inputs() {
            let got = validator.validate_bytes(&input.bytes, None);
            let outcome = match &got {
                Ok(_) => Expected::Valid,
                Err(rejection) => Expected::Rejected(rejection.kind),
            };
            assert_eq!(outcome, input.expected, "{}: {got:?}", input.name);
        }
    }

    #[test]
    fn invalid_inputs_fail_for_the_intended_reason() {
        let validator = validator();
        let diagnostics = |name: &str| match validator.validate_bytes(&input(name).bytes, None) {
            Err(rejection) => format!("{:?}", rejection.outcome),
            Ok(_) => panic!("{name} validated"),
        };
        assert!(diagnostics("2kb_invalid_schema").contains("effectiveDateTime"));
        assert!(diagnostics("8kb_invalid_schema").contains("surname"));
        assert!(diagnostics("2kb_invalid_nhs_number").contains("Modulus 11"));
        assert!(diagnostics("8kb_invalid_nhs_number").contains("Modulus 11"));
        assert!(
            diagnostics("2kb_malformed")
                .to_lowercase()
                .contains("duplicate")
        );
    }

    #[test]
    fn malformed_inputs_are_valid_json_to_a_lenient_parser() {
        // The duplicate key is the only fault: serde_json (last one wins) accepts the bytes.
        for name in ["2kb_malformed", "8kb_malformed"] {
            let bytes = input(name).bytes;
            assert!(serde_json::from_slice::<Value>(&bytes).is_ok(), "{name}");
            assert!(
                parse_strict(&bytes, &JsonLimits::default()).is_err(),
                "{name}"
            );
        }
    }

    #[test]
    fn submissions_carry_fresh_ids_and_the_patient() {
        let mut factory = SubmissionFactory::new(&validator(), "gp-bench", 1);
        let first = factory.next_submission();
        let second = factory.next_submission();
        assert_ne!(first.records[0].id, second.records[0].id);
        assert_eq!(
            first.records[0].nhs_number.as_deref(),
            Some(TEST_NHS_NUMBER)
        );
        assert_eq!(first.audit.len(), 1);
        let len = first.records[0].content.len();
        assert!(
            len.abs_diff(2_048) * 10 <= 2_048,
            "record content is {len} bytes"
        );
    }
}
