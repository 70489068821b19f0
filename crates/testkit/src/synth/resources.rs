//! The FHIR R4 resources of one synthetic patient, built as JSON. Shapes follow the R4 base
//! resources and UK Core conventions (NHS number identifier, ODS organisation identifiers,
//! SNOMED CT and dm+d codings); every one passes caregate's validator.

use std::collections::VecDeque;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use time::Date;

use super::codes::{self, Code, DMD, LOINC, SNOMED, UCUM};
use super::rng::SplitMix64;
use super::{
    COUNCIL_609, Gender, PHARMACY_FA123, SynthConfig, SynthPartner, SynthPatient, SynthRecord,
    TRUST_RX1,
};

const NHS_NUMBER: &str = "https://fhir.nhs.uk/Id/nhs-number";
const ODS: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const CONDITION_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
const CONDITION_VERIFICATION: &str = "http://terminology.hl7.org/CodeSystem/condition-ver-status";
const CONDITION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/condition-category";
const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const ROLE_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-RoleCode";
const PARTICIPATION_TYPE: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
const CONSENT_SCOPE: &str = "http://terminology.hl7.org/CodeSystem/consentscope";
const XHTML_OPEN: &str = "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>";
const XHTML_CLOSE: &str = "</p></div>";

const GIVEN_FEMALE: [&str; 12] = [
    "Amelia", "Olivia", "Isla", "Ava", "Mia", "Grace", "Sophie", "Ruby", "Ella", "Freya",
    "Margaret", "Joan",
];
const GIVEN_MALE: [&str; 12] = [
    "Oliver", "George", "Harry", "Noah", "Jack", "Leo", "Arthur", "Oscar", "Charlie", "Alfie",
    "Brian", "Kenneth",
];
const FAMILY: [&str; 16] = [
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Patel",
    "Robinson", "Wright", "Thompson", "Evans", "Walker", "Khan", "Hughes",
];
const STREETS: [&str; 8] = [
    "Mill Lane",
    "Church Street",
    "Station Road",
    "Victoria Road",
    "Park Avenue",
    "High Street",
    "Queen Street",
    "Orchard Close",
];

/// Builds one patient's records in order.
struct Builder<'a> {
    config: &'a SynthConfig,
    patient: &'a SynthPatient,
    rng: SplitMix64,
    out: &'a mut VecDeque<SynthRecord>,
    serial: u32,
}

/// Append every record of `patient` to `out`.
pub(crate) fn patient_records(
    config: &SynthConfig,
    patient: &SynthPatient,
    rng: SplitMix64,
    out: &mut VecDeque<SynthRecord>,
) {
    let mut builder = Builder {
        config,
        patient,
        rng,
        out,
        serial: 0,
    };
    builder.all();
}

fn coding(system: &str, (code, display): Code) -> Value {
    json!({ "system": system, "code": code, "display": display })
}

fn concept(system: &str, code: Code) -> Value {
    json!({ "coding": [coding(system, code)] })
}

fn ods_reference(partner: &SynthPartner) -> Value {
    json!({ "identifier": { "system": ODS, "value": partner.ods_code } })
}

fn date_string(date: Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

impl Builder<'_> {
    fn all(&mut self) {
        let gp = self.patient.gp;
        self.registration();
        let problems = self.problems();
        if self.patient.age >= 18 && self.rng.chance(0.6) {
            self.blood_pressure();
        }
        if problems.contains(&codes::DIABETES) {
            self.hba1c();
        }
        let mut prescriptions = Vec::new();
        if self.rng.chance(0.3) {
            prescriptions.push(self.prescription());
        }
        self.immunisations(!problems.is_empty());
        if self.patient.type1 {
            self.type1_opt_out();
        }
        if self.patient.sensitive {
            self.sensitive_condition();
        }
        if self.patient.dissent {
            self.dissent(&gp);
        }
        let attends = if self.patient.age >= 75 { 0.3 } else { 0.12 };
        if self.rng.chance(attends) {
            self.hospital_episode();
        }
        for prescription in prescriptions {
            if self.rng.chance(0.8) {
                self.dispense(&prescription);
            }
        }
        let social_care = if self.patient.age >= 70 { 0.25 } else { 0.01 };
        if self.rng.chance(social_care) {
            self.social_care();
        }
    }

    /// A business identifier for the next record of `partner`, unique in the population and
    /// across seeds: `(system, value)`.
    fn identifier(&mut self, partner: &SynthPartner) -> (String, String) {
        self.serial += 1;
        (
            format!("https://{}.northshire-ics.example/Id/record", partner.id),
            format!(
                "{:016x}-{:06}-{:03}",
                self.config.seed, self.patient.index, self.serial
            ),
        )
    }

    /// A time on the day, between 08:00 and 18:59, as a FHIR dateTime.
    fn time_on_day(&mut self) -> String {
        let minutes = self.rng.range(8 * 60, 19 * 60 - 1);
        format!(
            "{}T{:02}:{:02}:00Z",
            date_string(self.config.day),
            minutes / 60,
            minutes % 60
        )
    }

    /// A date `up_to_years` back from the day (never before birth).
    fn date_in_past(&mut self, up_to_years: u32) -> String {
        let lived = (self.config.day - self.patient.birth_date)
            .whole_days()
            .max(1);
        let back = (self.rng.below(u64::from(up_to_years.max(1)) * 365) as i64).min(lived - 1);
        date_string(self.config.day.saturating_sub(time::Duration::days(back)))
    }

    fn subject(&self) -> Value {
        json!({ "identifier": { "system": NHS_NUMBER, "value": self.patient.nhs_number } })
    }

    /// Finish `resource`: add `identifier` first, pad, serialise, queue.
    fn emit(&mut self, partner: &SynthPartner, resource_type: &'static str, mut resource: Value) {
        let (system, value) = self.identifier(partner);
        let own = json!({ "system": system, "value": value });
        if let Some(object) = resource.as_object_mut() {
            match object.get_mut("identifier").and_then(Value::as_array_mut) {
                Some(identifiers) => identifiers.push(own),
                None => {
                    object.insert("identifier".into(), json!([own]));
                }
            }
        }
        let mut body = resource.to_string();
        if let Some(target) = self.config.pad_to_bytes
            && body.len() < target
        {
            body = pad(resource, target, &mut self.rng);
        }
        self.out.push_back(SynthRecord {
            partner_id: partner.id,
            resource_type,
            body,
            record_id: value,
        });
    }

    fn registration(&mut self) {
        let patient = self.patient;
        let given = match patient.gender {
            Gender::Female => *self.rng.pick(&GIVEN_FEMALE),
            Gender::Male => *self.rng.pick(&GIVEN_MALE),
        };
        let family = *self.rng.pick(&FAMILY);
        let house = self.rng.range(1, 180);
        let street = *self.rng.pick(&STREETS);
        let phone = format!("01632 960{:03}", self.rng.below(1000));
        let gp = patient.gp;
        self.emit(
            &gp,
            "Patient",
            json!({
                "resourceType": "Patient",
                "identifier": [{ "system": NHS_NUMBER, "value": patient.nhs_number }],
                "active": true,
                "name": [{ "use": "official", "family": family, "given": [given] }],
                "telecom": [{ "system": "phone", "value": phone, "use": "home" }],
                "gender": patient.gender.as_str(),
                "birthDate": date_string(patient.birth_date),
                "address": [{ "use": "home", "line": [format!("{house} {street}")], "city": "Northshire" }],
                "generalPractitioner": [ods_reference(&gp)],
            }),
        );
    }

    /// Long-term problems by age; returns the indexes into [`codes::PROBLEMS`].
    fn problems(&mut self) -> Vec<usize> {
        let mut found = Vec::new();
        for (index, &(code, display, min_age, share)) in codes::PROBLEMS.iter().enumerate() {
            if self.patient.age >= min_age && self.rng.chance(share) {
                found.push(index);
                let onset = self.date_in_past(15);
                let recorded = self.time_on_day();
                let gp = self.patient.gp;
                let resource = json!({
                    "resourceType": "Condition",
                    "clinicalStatus": concept(CONDITION_CLINICAL, ("active", "Active")),
                    "verificationStatus": concept(CONDITION_VERIFICATION, ("confirmed", "Confirmed")),
                    "category": [concept(CONDITION_CATEGORY, ("problem-list-item", "Problem List Item"))],
                    "code": concept(SNOMED, (code, display)),
                    "subject": self.subject(),
                    "onsetDateTime": onset,
                    "recordedDate": recorded,
                    "asserter": ods_reference(&gp),
                });
                self.emit(&gp, "Condition", resource);
            }
        }
        found
    }

    fn blood_pressure(&mut self) {
        let systolic = self.rng.range(100, 175);
        let diastolic = self.rng.range(60, 100).min(systolic - 30);
        let when = self.time_on_day();
        let gp = self.patient.gp;
        let quantity = |value: u64| json!({ "value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]" });
        let resource = json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [concept(OBSERVATION_CATEGORY, ("vital-signs", "Vital Signs"))],
            "code": concept(SNOMED, codes::BLOOD_PRESSURE),
            "subject": self.subject(),
            "effectiveDateTime": when,
            "performer": [ods_reference(&gp)],
            "component": [
                { "code": concept(SNOMED, codes::SYSTOLIC), "valueQuantity": quantity(systolic) },
                { "code": concept(SNOMED, codes::DIASTOLIC), "valueQuantity": quantity(diastolic) },
            ],
        });
        self.emit(&gp, "Observation", resource);
    }

    fn hba1c(&mut self) {
        let value = self.rng.range(42, 95);
        let when = self.time_on_day();
        let gp = self.patient.gp;
        let resource = json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [concept(OBSERVATION_CATEGORY, ("laboratory", "Laboratory"))],
            "code": { "coding": [coding(SNOMED, codes::HBA1C), coding(LOINC, codes::HBA1C_LOINC)] },
            "subject": self.subject(),
            "effectiveDateTime": when,
            "valueQuantity": { "value": value, "unit": "mmol/mol", "system": UCUM, "code": "mmol/mol" },
            "referenceRange": [{ "high": { "value": 47, "unit": "mmol/mol", "system": UCUM, "code": "mmol/mol" } }],
        });
        self.emit(&gp, "Observation", resource);
    }

    /// An acute antibiotic prescription; returns what the pharmacy needs to dispense it.
    fn prescription(&mut self) -> Prescription {
        let &(code, display, dosage, quantity, unit) = self.rng.pick(&codes::ANTIBIOTICS);
        let when = self.time_on_day();
        let gp = self.patient.gp;
        let resource = json!({
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "courseOfTherapyType": concept(
                "http://terminology.hl7.org/CodeSystem/medicationrequest-course-of-therapy",
                ("acute", "Short course (acute) therapy"),
            ),
            "medicationCodeableConcept": concept(DMD, (code, display)),
            "subject": self.subject(),
            "authoredOn": when,
            "requester": ods_reference(&gp),
            "dosageInstruction": [{ "text": dosage }],
            "dispenseRequest": { "quantity": { "value": quantity, "unit": unit } },
        });
        self.emit(&gp, "MedicationRequest", resource);
        let identifier = self
            .out
            .back()
            .map(|record| record.record_id.clone())
            .unwrap_or_default();
        Prescription {
            gp,
            identifier,
            medication: (code, display),
            dosage,
            quantity,
            unit,
        }
    }

    fn dispense(&mut self, prescription: &Prescription) {
        let when = self.time_on_day();
        let prescription_system = format!(
            "https://{}.northshire-ics.example/Id/record",
            prescription.gp.id
        );
        let resource = json!({
            "resourceType": "MedicationDispense",
            "status": "completed",
            "medicationCodeableConcept": concept(DMD, prescription.medication),
            "subject": self.subject(),
            "performer": [{ "actor": ods_reference(&PHARMACY_FA123) }],
            "authorizingPrescription": [{
                "reference": format!(
                    "MedicationRequest?identifier={prescription_system}|{}",
                    prescription.identifier
                ),
            }],
            "quantity": { "value": prescription.quantity, "unit": prescription.unit },
            "whenHandedOver": when,
            "dosageInstruction": [{ "text": prescription.dosage }],
        });
        self.emit(&PHARMACY_FA123, "MedicationDispense", resource);
    }

    fn immunisations(&mut self, long_term_condition: bool) {
        let age = self.patient.age;
        let mut vaccines = Vec::new();
        if (age >= 65 || long_term_condition) && self.rng.chance(0.5) {
            vaccines.push(codes::INFLUENZA_VACCINE);
        }
        if age >= 65 && self.rng.chance(0.1) {
            vaccines.push(codes::PNEUMOCOCCAL_VACCINE);
        }
        if age >= 18 && self.rng.chance(0.15) {
            vaccines.push(codes::COVID_VACCINE);
        }
        for vaccine in vaccines {
            let when = self.time_on_day();
            let lot = format!("SYN{:05}", self.rng.below(100_000));
            let gp = self.patient.gp;
            let resource = json!({
                "resourceType": "Immunization",
                "status": "completed",
                "vaccineCode": concept(DMD, vaccine),
                "patient": self.subject(),
                "occurrenceDateTime": when,
                "primarySource": true,
                "lotNumber": lot,
                "performer": [{ "actor": ods_reference(&gp) }],
            });
            self.emit(&gp, "Immunization", resource);
        }
    }

    /// The Type 1 opt-out as GP systems code it (DOMAIN.md `T1-1`).
    fn type1_opt_out(&mut self) {
        let when = self.time_on_day();
        let gp = self.patient.gp;
        let resource = json!({
            "resourceType": "Observation",
            "status": "final",
            "code": concept(SNOMED, codes::TYPE_1_OPT_OUT),
            "subject": self.subject(),
            "effectiveDateTime": when,
            "performer": [ods_reference(&gp)],
        });
        self.emit(&gp, "Observation", resource);
    }

    fn sensitive_condition(&mut self) {
        let code = *self.rng.pick(&codes::SENSITIVE);
        let onset = self.date_in_past(3);
        let recorded = self.time_on_day();
        let gp = self.patient.gp;
        let resource = json!({
            "resourceType": "Condition",
            "clinicalStatus": concept(CONDITION_CLINICAL, ("active", "Active")),
            "verificationStatus": concept(CONDITION_VERIFICATION, ("confirmed", "Confirmed")),
            "category": [concept(CONDITION_CATEGORY, ("problem-list-item", "Problem List Item"))],
            "code": concept(SNOMED, code),
            "subject": self.subject(),
            "onsetDateTime": onset,
            "recordedDate": recorded,
        });
        self.emit(&gp, "Condition", resource);
    }

    /// The patient tells their GP they do not want their record shared with the trust or the
    /// council: a `Consent` denying that organisation (read by the policy's consent registry).
    fn dissent(&mut self, gp: &SynthPartner) {
        let denied = if self.rng.chance(0.5) {
            TRUST_RX1
        } else {
            COUNCIL_609
        };
        let when = self.time_on_day();
        let resource = json!({
            "resourceType": "Consent",
            "status": "active",
            "scope": concept(CONSENT_SCOPE, ("patient-privacy", "Privacy Consent")),
            "category": [concept(LOINC, ("59284-0", "Patient Consent"))],
            "patient": self.subject(),
            "dateTime": when,
            "organization": [ods_reference(gp)],
            "provision": {
                "type": "deny",
                "actor": [{
                    "role": concept(PARTICIPATION_TYPE, ("IRCP", "information recipient")),
                    "reference": ods_reference(&denied),
                }],
            },
        });
        self.emit(gp, "Consent", resource);
    }

    /// An A&E attendance; for the serious diagnoses, an admission, a diagnosis and a discharge
    /// summary.
    fn hospital_episode(&mut self) {
        let &(code, display, admitted) = self.rng.pick(&codes::HOSPITAL_DIAGNOSES);
        let arrival = self.rng.range(0, 20 * 60);
        let day = date_string(self.config.day);
        let stamp = |minutes: u64| format!("{day}T{:02}:{:02}:00Z", minutes / 60, minutes % 60);
        let left_ae = arrival + self.rng.range(60, 230);
        let ae = json!({
            "resourceType": "Encounter",
            "status": "finished",
            "class": { "system": ACT_CODE, "code": "EMER", "display": "emergency" },
            "type": [concept(SNOMED, codes::EMERGENCY_VISIT)],
            "serviceType": concept(SNOMED, codes::AE_SERVICE),
            "subject": self.subject(),
            "period": { "start": stamp(arrival), "end": stamp(left_ae) },
            "reasonCode": [concept(SNOMED, (code, display))],
            "serviceProvider": ods_reference(&TRUST_RX1),
        });
        self.emit(&TRUST_RX1, "Encounter", ae);
        if !admitted {
            return;
        }
        let days = self.rng.range(1, 9) as i64;
        let discharged = self.config.day.saturating_add(time::Duration::days(days));
        let discharge_time = format!(
            "{}T{:02}:00:00Z",
            date_string(discharged),
            self.rng.range(10, 17)
        );
        let admission = json!({
            "resourceType": "Encounter",
            "status": "finished",
            "class": { "system": ACT_CODE, "code": "IMP", "display": "inpatient encounter" },
            "type": [concept(SNOMED, codes::HOSPITAL_ADMISSION)],
            "subject": self.subject(),
            "period": { "start": stamp(left_ae), "end": discharge_time.clone() },
            "serviceProvider": ods_reference(&TRUST_RX1),
        });
        self.emit(&TRUST_RX1, "Encounter", admission);
        let admission_ref = self.last_reference("Encounter");
        let diagnosis = json!({
            "resourceType": "Condition",
            "clinicalStatus": concept(CONDITION_CLINICAL, ("active", "Active")),
            "verificationStatus": concept(CONDITION_VERIFICATION, ("confirmed", "Confirmed")),
            "category": [concept(CONDITION_CATEGORY, ("encounter-diagnosis", "Encounter Diagnosis"))],
            "code": concept(SNOMED, (code, display)),
            "subject": self.subject(),
            "encounter": { "reference": admission_ref.clone() },
            "recordedDate": stamp(left_ae),
            "asserter": ods_reference(&TRUST_RX1),
        });
        self.emit(&TRUST_RX1, "Condition", diagnosis);
        let letter = format!(
            "Northshire University Hospitals NHS Trust - discharge summary\n\
             Admitted {admitted_on} via the emergency department. Diagnosis: {display}.\n\
             Discharged {discharged_on} to usual residence after {days} day(s).\n\
             Actions for GP: review in two weeks; medicines reconciled on the ward.\n",
            admitted_on = date_string(self.config.day),
            discharged_on = date_string(discharged),
        );
        let summary = json!({
            "resourceType": "DocumentReference",
            "status": "current",
            "docStatus": "final",
            "type": concept(SNOMED, codes::DISCHARGE_SUMMARY),
            "subject": self.subject(),
            "date": discharge_time,
            "author": [ods_reference(&TRUST_RX1)],
            "custodian": ods_reference(&TRUST_RX1),
            "description": "Discharge summary",
            "content": [{
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "language": "en-GB",
                    "data": STANDARD.encode(letter.as_bytes()),
                    "size": letter.len(),
                    "title": "Discharge summary",
                },
            }],
            "context": { "encounter": [{ "reference": admission_ref }] },
        });
        self.emit(&TRUST_RX1, "DocumentReference", summary);
    }

    /// `Type?identifier=system|value` for the last record queued.
    fn last_reference(&self, resource_type: &str) -> String {
        let partner = self.out.back().map_or("", |record| record.partner_id);
        let value = self
            .out
            .back()
            .map_or("", |record| record.record_id.as_str());
        format!(
            "{resource_type}?identifier=https://{partner}.northshire-ics.example/Id/record|{value}"
        )
    }

    fn social_care(&mut self) {
        let start = self.date_in_past(1);
        let created = self.time_on_day();
        let hours = self.rng.range(2, 14);
        let plan = json!({
            "resourceType": "CarePlan",
            "status": "active",
            "intent": "plan",
            "category": [concept(SNOMED, codes::SOCIAL_CARE_ASSESSMENT), concept(SNOMED, codes::CARE_PLAN)],
            "title": "Adult social care support plan",
            "description": format!(
                "Care Act 2014 needs assessment completed. Home care {hours} hours a week: \
                 personal care, meals and medication prompts."
            ),
            "subject": self.subject(),
            "period": { "start": start },
            "created": created,
            "author": ods_reference(&COUNCIL_609),
        });
        self.emit(&COUNCIL_609, "CarePlan", plan);
        if self.rng.chance(0.6) {
            let (code, display) = *self.rng.pick(&[
                ("DAU", "daughter"),
                ("SON", "son"),
                ("SPS", "spouse"),
                ("FRND", "unrelated friend"),
            ]);
            let given = *self.rng.pick(&GIVEN_FEMALE);
            let family = *self.rng.pick(&FAMILY);
            let phone = format!("01632 960{:03}", self.rng.below(1000));
            let carer = json!({
                "resourceType": "RelatedPerson",
                "active": true,
                "patient": self.subject(),
                "relationship": [
                    concept(ROLE_CODE, (code, display)),
                    { "text": "Unpaid carer" },
                ],
                "name": [{ "family": family, "given": [given] }],
                "telecom": [{ "system": "phone", "value": phone, "use": "mobile" }],
            });
            self.emit(&COUNCIL_609, "RelatedPerson", carer);
        }
    }
}

/// What a dispensing pharmacy copies from a prescription.
struct Prescription {
    gp: SynthPartner,
    identifier: String,
    medication: Code,
    dosage: &'static str,
    quantity: u32,
    unit: &'static str,
}

/// Narrative sentences for padding: a GP-style consultation note.
const NOTE_SENTENCES: [&str; 6] = [
    "Seen in clinic today.",
    "History taken and examination performed.",
    "Discussed the plan and safety-netting advice; patient understands.",
    "Observations within expected limits for age.",
    "Follow up with the practice if symptoms persist or worsen.",
    "Medication reviewed; no changes today.",
];

/// `resource` with a generated narrative that brings its compact JSON to about `target` bytes.
fn pad(mut resource: Value, target: usize, rng: &mut SplitMix64) -> String {
    let Some(object) = resource.as_object_mut() else {
        return resource.to_string();
    };
    object.insert(
        "text".into(),
        json!({ "status": "generated", "div": format!("{XHTML_OPEN}{XHTML_CLOSE}") }),
    );
    let empty = resource.to_string().len();
    let mut filler = String::with_capacity(target.saturating_sub(empty) + 80);
    while filler.len() + empty < target {
        let sentence: &&str = rng.pick(&NOTE_SENTENCES);
        filler.push_str(sentence);
        filler.push(' ');
    }
    filler.truncate(target.saturating_sub(empty).max(1));
    let filler = filler.trim_end();
    let filler = if filler.is_empty() { "Note." } else { filler };
    if let Some(object) = resource.as_object_mut() {
        object.insert(
            "text".into(),
            json!({ "status": "generated", "div": format!("{XHTML_OPEN}{filler}{XHTML_CLOSE}") }),
        );
    }
    resource.to_string()
}
