//! The facts about one record that the decision needs, read once from the validated resource.
//!
//! [`RecordFacts::from_resource`] walks the whole JSON tree once: the resource itself, its
//! `contained` resources, extensions at any depth, `meta.security` labels and, for a stored
//! Bundle (`message`, `document`, `collection`), every entry. Any object with a string `system`
//! and a string `code` counts as a coding (Coding, and Quantity, whose UCUM codes never match a
//! sensitive list). That is deliberately wider than "the `code` element": DOMAIN `SENS-1` and the
//! Rec under A2 ask that a sensitive code *anywhere* withholds the whole resource.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use caregate_fhir::identifier::{NHS_NUMBER, ODS_ORGANIZATION_CODE};
use caregate_fhir::nhs_number::{NhsNumber, NhsNumberPolicy};
use caregate_fhir::ods::OdsCode;
use caregate_fhir::{ResourceType, ValidatedResource};
use serde_json::Value;

use crate::partner::{PartnerId, PartnerRef};

/// SNOMED CT's system URI (DOMAIN `SCT`).
pub const SNOMED_CT: &str = "http://snomed.info/sct";

/// SNOMED CT 827241000000103 |Dissent from secondary use of general practitioner patient
/// identifiable data| — the Type 1 opt-out as GP systems record it (DOMAIN `T1-1`).
pub const TYPE_1_OPT_OUT_CODE: &str = "827241000000103";

/// The v3 ActReason system that carries purpose-of-use labels in `meta.security` (DOMAIN `POU`).
pub const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

/// Resource types that carry no clinical content of their own: they do not stop a Bundle from
/// being "medication-related".
const NEUTRAL_TYPES: &[&str] = &[
    "Patient",
    "Organization",
    "Practitioner",
    "PractitionerRole",
    "Location",
    "Medication",
    "MessageHeader",
];

/// A coding found in the record: `(system, code)`. Codes are not patient identifiers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Coding {
    pub system: String,
    pub code: String,
}

/// An Encounter or EpisodeOfCare the record is: evidence of a care relationship between the
/// submitting partner and the patient (`LR-1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CareEpisode {
    /// `Encounter/<id>` or `EpisodeOfCare/<id>`: a later version with the same key closes it.
    pub key: String,
    /// Status is one of the open ones and there is no `period.end` (an end date, past or
    /// planned, closes the relationship: fail towards not sharing).
    pub open: bool,
}

/// A break-glass (emergency) request: a partner asks for access without an established
/// relationship, giving a reason (DOMAIN `LR-2`, `POU` ETREAT). Allowed only where the agreement
/// permits it, and always flagged for IG review.
#[derive(Clone, PartialEq, Eq)]
pub struct BreakGlass {
    pub requester: PartnerId,
    /// Free text from the clinician; kept with the decision, never logged.
    pub reason: String,
}

impl fmt::Debug for BreakGlass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakGlass")
            .field("requester", &self.requester)
            .finish_non_exhaustive()
    }
}

/// Break-glass needs a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a break-glass request needs a non-empty reason (LR-2)")]
pub struct MissingReason;

impl BreakGlass {
    pub fn new(requester: PartnerId, reason: &str) -> Result<Self, MissingReason> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(MissingReason);
        }
        Ok(Self {
            requester,
            reason: reason.to_owned(),
        })
    }
}

/// What the policy needs to know about one record. `Debug` shows no patient identifier.
#[derive(Clone)]
pub struct RecordFacts {
    pub(crate) resource_type: ResourceType,
    pub(crate) resource_types: BTreeSet<String>,
    pub(crate) nhs_number: Option<NhsNumber>,
    pub(crate) codings: BTreeSet<Coding>,
    pub(crate) registered_gp: Option<OdsCode>,
    pub(crate) medication_related: bool,
    pub(crate) submitter: PartnerRef,
    pub(crate) care_episode: Option<CareEpisode>,
    pub(crate) break_glass: Option<BreakGlass>,
    pub(crate) purpose_of_use: Vec<String>,
}

impl fmt::Debug for RecordFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordFacts")
            .field("resource_type", &self.resource_type)
            .field("resource_types", &self.resource_types)
            .field("has_nhs_number", &self.nhs_number.is_some())
            .field("codings", &self.codings.len())
            .field("medication_related", &self.medication_related)
            .field("submitter", &self.submitter.id)
            .field("break_glass", &self.break_glass.is_some())
            .finish_non_exhaustive()
    }
}

impl RecordFacts {
    /// Read the facts from a validated resource submitted by `submitter`. `now` is not needed:
    /// whether an Encounter's `period.end` is past is judged when the registry notes it.
    pub fn from_resource(resource: &ValidatedResource, submitter: &PartnerRef) -> Self {
        let value = resource.value();
        let resource_type = resource.resource_type();
        let mut walk = Walk::default();
        walk.resource(value, true);
        let mut resource_types = BTreeSet::new();
        resource_types.insert(resource_type.as_str().to_owned());
        resource_types.extend(walk.entry_types.iter().cloned());

        let nhs_number = resource
            .nhs_number()
            .cloned()
            .or_else(|| walk.entry_nhs_number.take());
        let registered_gp = walk.registered_gp.take();
        let medication_related = if resource_type == ResourceType::Bundle {
            !walk.entry_types.is_empty()
                && walk.entry_medication.iter().all(|&related| related)
                && walk.entry_medication.iter().any(|&related| related)
        } else {
            is_medication_related(resource_type.as_str(), value)
        };
        let care_episode = care_episode(resource_type, resource.id(), value);
        let purpose_of_use = walk
            .codings
            .iter()
            .filter(|coding| coding.system == ACT_REASON)
            .map(|coding| coding.code.clone())
            .collect();
        Self {
            resource_type,
            resource_types,
            nhs_number,
            codings: walk.codings,
            registered_gp,
            medication_related,
            submitter: submitter.clone(),
            care_episode,
            break_glass: None,
            purpose_of_use,
        }
    }

    /// The same facts with a break-glass request attached (the gateway takes it from the
    /// request's purpose of use and reason).
    #[must_use]
    pub fn with_break_glass(mut self, break_glass: BreakGlass) -> Self {
        self.break_glass = Some(break_glass);
        self
    }

    pub fn resource_type(&self) -> ResourceType {
        self.resource_type
    }

    /// The top-level type plus every Bundle entry's type.
    pub fn resource_types(&self) -> impl Iterator<Item = &str> {
        self.resource_types.iter().map(String::as_str)
    }

    /// The patient's NHS number. Never log it.
    pub fn nhs_number(&self) -> Option<&NhsNumber> {
        self.nhs_number.as_ref()
    }

    pub fn codings(&self) -> impl Iterator<Item = &Coding> {
        self.codings.iter()
    }

    /// `Patient.generalPractitioner`'s ODS code, when the record is (or contains) a Patient.
    pub fn registered_gp(&self) -> Option<&OdsCode> {
        self.registered_gp.as_ref()
    }

    pub fn medication_related(&self) -> bool {
        self.medication_related
    }

    pub fn submitter(&self) -> &PartnerRef {
        &self.submitter
    }

    pub fn care_episode(&self) -> Option<&CareEpisode> {
        self.care_episode.as_ref()
    }

    pub fn break_glass(&self) -> Option<&BreakGlass> {
        self.break_glass.as_ref()
    }

    /// v3 ActReason codes found in `meta.security` (e.g. `ETREAT`), for the audit trail.
    pub fn purpose_of_use(&self) -> &[String] {
        &self.purpose_of_use
    }

    /// The record was submitted by a GP practice ("GP-sourced" in `T1-1`).
    pub fn gp_sourced(&self) -> bool {
        self.submitter.kind == crate::partner::PartnerKind::Gp
    }

    /// The record itself carries the Type 1 opt-out code (`T1-1`); it counts only in GP-sourced
    /// data, where the GP practice recorded it.
    pub fn carries_type1_opt_out(&self) -> bool {
        self.gp_sourced()
            && self
                .codings
                .iter()
                .any(|coding| coding.system == SNOMED_CT && coding.code == TYPE_1_OPT_OUT_CODE)
    }
}

/// A record is medication-related (for `PHARM-MED-ONLY`) when it is a medication resource, or an
/// AllergyIntolerance whose category includes `medication` (a pharmacist needs drug allergies to
/// dispense safely).
fn is_medication_related(resource_type: &str, value: &Value) -> bool {
    match resource_type {
        "MedicationRequest" | "MedicationDispense" | "MedicationStatement" | "Medication" => true,
        "AllergyIntolerance" => {
            value
                .get("category")
                .and_then(Value::as_array)
                .is_some_and(|categories| {
                    categories
                        .iter()
                        .any(|category| category.as_str() == Some("medication"))
                })
        }
        _ => false,
    }
}

fn care_episode(
    resource_type: ResourceType,
    id: Option<&str>,
    value: &Value,
) -> Option<CareEpisode> {
    let open_statuses: &[&str] = match resource_type {
        ResourceType::Encounter => &["planned", "arrived", "triaged", "in-progress", "onleave"],
        ResourceType::EpisodeOfCare => &["planned", "waitlist", "active", "onhold"],
        _ => return None,
    };
    let id = id?;
    let status = value.get("status").and_then(Value::as_str).unwrap_or("");
    let ended = value
        .get("period")
        .and_then(|period| period.get("end"))
        .is_some_and(|end| !end.is_null());
    Some(CareEpisode {
        key: format!("{}/{id}", resource_type.as_str()),
        open: open_statuses.contains(&status) && !ended,
    })
}

/// One pass over the JSON tree.
#[derive(Default)]
struct Walk {
    codings: BTreeSet<Coding>,
    entry_types: BTreeSet<String>,
    /// For each non-neutral Bundle entry: is it medication-related?
    entry_medication: Vec<bool>,
    registered_gp: Option<OdsCode>,
    entry_nhs_number: Option<NhsNumber>,
}

impl Walk {
    /// A resource (top level or Bundle entry). `top` is false inside a Bundle entry.
    fn resource(&mut self, value: &Value, top: bool) {
        let resource_type = value
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("");
        if resource_type == "Patient" {
            self.patient(value);
        }
        if !top {
            self.entry_types.insert(resource_type.to_owned());
            if !NEUTRAL_TYPES.contains(&resource_type) {
                self.entry_medication
                    .push(is_medication_related(resource_type, value));
            }
            if self.entry_nhs_number.is_none() {
                self.entry_nhs_number = subject_nhs_number(resource_type, value);
            }
        }
        if resource_type == "Bundle"
            && let Some(Value::Array(entries)) = value.get("entry")
        {
            for entry in entries {
                if let Some(inner) = entry.get("resource") {
                    self.resource(inner, false);
                }
            }
            // Bundle-level fields (meta.security, identifier) still count.
            if let Value::Object(map) = value {
                for (key, child) in map {
                    if key != "entry" {
                        self.any(child);
                    }
                }
            }
            return;
        }
        self.any(value);
    }

    /// Any value: record codings at every depth (contained resources, extensions, meta.security).
    fn any(&mut self, value: &Value) {
        match value {
            Value::Object(map) => {
                if let (Some(Value::String(system)), Some(Value::String(code))) =
                    (map.get("system"), map.get("code"))
                {
                    self.codings.insert(Coding {
                        system: system.clone(),
                        code: code.clone(),
                    });
                }
                for child in map.values() {
                    self.any(child);
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.any(item);
                }
            }
            _ => {}
        }
    }

    fn patient(&mut self, value: &Value) {
        if self.registered_gp.is_none() {
            self.registered_gp = value
                .get("generalPractitioner")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|reference| reference.get("identifier"))
                .filter(|identifier| {
                    identifier.get("system").and_then(Value::as_str) == Some(ODS_ORGANIZATION_CODE)
                })
                .filter_map(|identifier| identifier.get("value").and_then(Value::as_str))
                .find_map(|code| OdsCode::from_str(code).ok());
        }
        if self.entry_nhs_number.is_none() {
            self.entry_nhs_number = value
                .get("identifier")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find_map(nhs_number_of_identifier);
        }
    }
}

/// The NHS number of an entry's `subject`/`patient`/`beneficiary` reference identifier. The
/// validator already checked every such number, so any accepted range is fine here.
fn subject_nhs_number(resource_type: &str, value: &Value) -> Option<NhsNumber> {
    if resource_type == "Patient" {
        return None;
    }
    ["subject", "patient", "beneficiary"]
        .iter()
        .filter_map(|key| value.get(*key))
        .filter_map(|reference| reference.get("identifier"))
        .find_map(nhs_number_of_identifier)
}

fn nhs_number_of_identifier(identifier: &Value) -> Option<NhsNumber> {
    if identifier.get("system").and_then(Value::as_str) != Some(NHS_NUMBER) {
        return None;
    }
    let value = identifier.get("value").and_then(Value::as_str)?;
    NhsNumber::parse(value, &permissive_nhs_policy()).ok()
}

/// Validation already applied the deployment's range policy; here any valid number is accepted.
pub(crate) fn permissive_nhs_policy() -> NhsNumberPolicy {
    NhsNumberPolicy {
        allow_test_numbers: true,
        extra_ranges: vec![(0, 9_999_999_999)],
    }
}
