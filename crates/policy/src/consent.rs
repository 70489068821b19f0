//! Consent state: what the patient has chosen and who cares for them, held in memory.
//!
//! The registry is pure data plus loaders over text the caller has already read; the store
//! persists its inputs (NDOO file, Consent resources, relationship events) and rebuilds it by
//! replaying them. What it holds:
//! - the National Data Opt-out list, as a **cache** with its load time and a maximum age
//!   (`NDOO-5`, `NDOO-6`): when older than allowed, secondary use fails closed;
//! - Type 1 opt-outs (`T1-1`): loaded as a list, or noted when GP-sourced data carries
//!   SNOMED CT 827241000000103;
//! - FHIR `Consent` resources: dissent from, or consent to, sharing with one partner (by ODS
//!   code) or a kind of partner. For each partner the newest applicable one wins (by
//!   `Consent.dateTime`, then order of arrival); `inactive`, `rejected`, `entered-in-error`,
//!   `draft`, `proposed` and out-of-period ones do not apply; a later version of the same Consent
//!   (same id from the same partner) replaces the earlier one, which is how a withdrawal arrives;
//! - care relationships (`LR-1`): the registered GP (`Patient.generalPractitioner`) and open
//!   Encounters/EpisodeOfCare each partner submitted.

use std::collections::{HashMap, HashSet};

use caregate_fhir::identifier::ODS_ORGANIZATION_CODE;
use caregate_fhir::nhs_number::NhsNumber;
use caregate_fhir::ods::OdsCode;
use caregate_fhir::{ResourceType, ValidatedResource};
use serde_json::Value;
use time::{Date, Duration, Month, OffsetDateTime, PrimitiveDateTime, Time};

use crate::error::ConsentError;
use crate::facts::{RecordFacts, permissive_nhs_policy};
use crate::partner::{PartnerId, PartnerKind, PartnerRef};

/// The identifier system a Consent actor uses to name a *kind* of organisation rather than one
/// organisation, e.g. `{"system": "urn:caregate:partner-kind", "value": "council"}` for "all
/// council social care". A specific organisation is named by its ODS code identifier.
pub const PARTNER_KIND_SYSTEM: &str = "urn:caregate:partner-kind";

/// Whom a Consent provision is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentActor {
    /// One organisation, by ODS code.
    Organisation(OdsCode),
    /// Every partner of a kind.
    Kind(PartnerKind),
}

/// `Consent.provision.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentEffect {
    Permit,
    Deny,
}

/// One Consent, reduced to what the policy uses. Holds no patient identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentDirective {
    /// `<submitter>/<Consent.id>`: a later version replaces it.
    pub key: Option<String>,
    /// `Consent.status == active`.
    pub active: bool,
    pub effect: ConsentEffect,
    pub actors: Vec<ConsentActor>,
    /// `Consent.provision.period`; `None` = open.
    pub starts: Option<OffsetDateTime>,
    pub ends: Option<OffsetDateTime>,
    /// `Consent.dateTime` (when the choice was recorded); newest wins.
    pub recorded: Option<OffsetDateTime>,
    /// Arrival order, the tie-break after `recorded`.
    pub sequence: u64,
}

impl ConsentDirective {
    /// Active and within its period at `now`.
    pub fn applies_at(&self, now: OffsetDateTime) -> bool {
        self.active
            && self.starts.is_none_or(|start| start <= now)
            && self.ends.is_none_or(|end| now < end)
    }

    fn names(&self, partner: &PartnerRef) -> bool {
        self.actors.iter().any(|actor| match actor {
            ConsentActor::Organisation(ods) => *ods == partner.ods,
            ConsentActor::Kind(kind) => *kind == partner.kind,
        })
    }
}

/// A care relationship: `partner` submitted an Encounter/EpisodeOfCare for the patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CareRelationship {
    pub partner: PartnerId,
    /// `Encounter/<id>` etc.
    pub key: String,
    pub open: bool,
}

/// Everything held for one patient. No identifier inside: the NHS number is the map key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatientConsent {
    pub registered_gp: Option<OdsCode>,
    pub consents: Vec<ConsentDirective>,
    pub relationships: Vec<CareRelationship>,
    /// Type 1 opt-out seen in GP-sourced data (`T1-1`).
    pub type1_noted: bool,
}

/// The NDOO cache's age rule (`NDOO-6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NdooCache {
    /// When the current list was loaded; `None`: never.
    pub loaded_at: Option<OffsetDateTime>,
    pub max_age: Duration,
}

/// How fresh the NDOO cache is at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NdooFreshness {
    Fresh,
    NeverLoaded,
    Stale { age: Duration, max_age: Duration },
}

impl NdooCache {
    pub fn freshness(&self, now: OffsetDateTime) -> NdooFreshness {
        match self.loaded_at {
            None => NdooFreshness::NeverLoaded,
            Some(loaded_at) => {
                let age = now - loaded_at;
                if age <= self.max_age {
                    NdooFreshness::Fresh
                } else {
                    NdooFreshness::Stale {
                        age,
                        max_age: self.max_age,
                    }
                }
            }
        }
    }
}

/// The consent registry. Build once, feed it, read it through [`ConsentRegistry::view`].
#[derive(Clone)]
pub struct ConsentRegistry {
    ndoo: HashSet<NhsNumber>,
    ndoo_cache: NdooCache,
    type1: HashSet<NhsNumber>,
    patients: HashMap<NhsNumber, PatientConsent>,
    sequence: u64,
}

impl std::fmt::Debug for ConsentRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Counts only: the keys are NHS numbers.
        f.debug_struct("ConsentRegistry")
            .field("ndoo_entries", &self.ndoo.len())
            .field("ndoo_cache", &self.ndoo_cache)
            .field("type1_entries", &self.type1.len())
            .field("patients", &self.patients.len())
            .finish()
    }
}

/// What [`ConsentRegistry::load_ndoo`] loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListLoad {
    pub entries: usize,
}

impl ConsentRegistry {
    /// An empty registry whose NDOO cache may be at most `ndoo_max_age` old.
    pub fn new(ndoo_max_age: Duration) -> Self {
        Self {
            ndoo: HashSet::new(),
            ndoo_cache: NdooCache {
                loaded_at: None,
                max_age: ndoo_max_age,
            },
            type1: HashSet::new(),
            patients: HashMap::new(),
            sequence: 0,
        }
    }

    /// Replace the NDOO list with `text` (one NHS number per line, LF or CRLF, blank lines
    /// ignored — the national service's format, `NDOO-6`), loaded at `loaded_at`. A bad line
    /// rejects the whole file and leaves the old list (and its age) in force.
    pub fn load_ndoo(
        &mut self,
        text: &str,
        loaded_at: OffsetDateTime,
    ) -> Result<ListLoad, ConsentError> {
        let numbers = parse_number_list(text)?;
        let entries = numbers.len();
        self.ndoo = numbers;
        self.ndoo_cache.loaded_at = Some(loaded_at);
        Ok(ListLoad { entries })
    }

    /// Replace the loaded Type 1 opt-out list (same format). Type 1 opt-outs noted from GP data
    /// are kept.
    pub fn load_type1(&mut self, text: &str) -> Result<ListLoad, ConsentError> {
        let numbers = parse_number_list(text)?;
        let entries = numbers.len();
        self.type1 = numbers;
        Ok(ListLoad { entries })
    }

    pub fn ndoo_cache(&self) -> NdooCache {
        self.ndoo_cache
    }

    /// Record a FHIR Consent submitted by `submitter`. A Consent with the same id from the same
    /// submitter replaces the earlier one (that is how a withdrawal or correction arrives).
    pub fn record_consent(
        &mut self,
        resource: &ValidatedResource,
        submitter: &PartnerId,
    ) -> Result<(), ConsentError> {
        if resource.resource_type() != ResourceType::Consent {
            return Err(ConsentError::NotAConsent);
        }
        let nhs_number = resource
            .nhs_number()
            .ok_or(ConsentError::NoPatient)?
            .clone();
        let mut directive = parse_consent(resource.value())?;
        directive.key = resource.id().map(|id| format!("{submitter}/{id}"));
        self.sequence += 1;
        directive.sequence = self.sequence;
        let patient = self.patients.entry(nhs_number).or_default();
        if let Some(key) = &directive.key {
            patient
                .consents
                .retain(|existing| existing.key.as_ref() != Some(key));
        }
        patient.consents.push(directive);
        Ok(())
    }

    /// Note a care relationship event: `partner` opened (or, with `open == false`, closed) the
    /// episode `key` for the patient.
    pub fn note_relationship(
        &mut self,
        nhs_number: &NhsNumber,
        partner: &PartnerId,
        key: &str,
        open: bool,
    ) {
        let patient = self.patients.entry(nhs_number.clone()).or_default();
        patient
            .relationships
            .retain(|existing| !(existing.partner == *partner && existing.key == key));
        if open {
            patient.relationships.push(CareRelationship {
                partner: partner.clone(),
                key: key.to_owned(),
                open,
            });
        }
    }

    /// Note the patient's registered GP practice (from `Patient.generalPractitioner`).
    pub fn note_registered_gp(&mut self, nhs_number: &NhsNumber, ods: &OdsCode) {
        self.patients
            .entry(nhs_number.clone())
            .or_default()
            .registered_gp = Some(ods.clone());
    }

    /// Note a Type 1 opt-out recorded by the patient's GP (`T1-1`).
    pub fn note_type1(&mut self, nhs_number: &NhsNumber) {
        self.patients
            .entry(nhs_number.clone())
            .or_default()
            .type1_noted = true;
    }

    /// Learn what an accepted record says about consent and relationships: registered GP from a
    /// Patient, Type 1 from GP-sourced data, care relationships from Encounter/EpisodeOfCare. The
    /// gateway calls this after intake and before [`crate::decide`]. Consent resources go through
    /// [`Self::record_consent`], which can refuse them.
    pub fn observe(&mut self, facts: &RecordFacts) {
        let Some(nhs_number) = facts.nhs_number() else {
            return;
        };
        if let Some(ods) = facts.registered_gp() {
            self.note_registered_gp(nhs_number, ods);
        }
        if facts.carries_type1_opt_out() {
            self.note_type1(nhs_number);
        }
        if let Some(episode) = facts.care_episode() {
            self.note_relationship(
                nhs_number,
                &facts.submitter().id,
                &episode.key,
                episode.open,
            );
        }
    }

    /// The consent state of one patient (or of an unidentified record, `None`).
    pub fn view(&self, nhs_number: Option<&NhsNumber>) -> ConsentView<'_> {
        let patient = nhs_number.and_then(|number| self.patients.get(number));
        ConsentView {
            patient,
            ndoo_opted_out: nhs_number.is_some_and(|number| self.ndoo.contains(number)),
            type1_opted_out: nhs_number.is_some_and(|number| self.type1.contains(number))
                || patient.is_some_and(|state| state.type1_noted),
            ndoo_cache: self.ndoo_cache,
        }
    }
}

/// One patient's consent state as [`crate::decide`] reads it. Carries no identifier.
#[derive(Debug, Clone, Copy)]
pub struct ConsentView<'a> {
    patient: Option<&'a PatientConsent>,
    ndoo_opted_out: bool,
    type1_opted_out: bool,
    ndoo_cache: NdooCache,
}

/// The consent that applies to one partner at one time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentFor {
    None,
    Permit,
    Deny,
}

impl<'a> ConsentView<'a> {
    pub fn ndoo_opted_out(&self) -> bool {
        self.ndoo_opted_out
    }

    pub fn type1_opted_out(&self) -> bool {
        self.type1_opted_out
    }

    pub fn ndoo_cache(&self) -> NdooCache {
        self.ndoo_cache
    }

    pub fn registered_gp(&self) -> Option<&'a OdsCode> {
        self.patient.and_then(|state| state.registered_gp.as_ref())
    }

    /// Partners with an open care relationship.
    pub fn care_team(&self) -> impl Iterator<Item = &'a PartnerId> + use<'a> {
        self.patient
            .into_iter()
            .flat_map(|state| state.relationships.iter())
            .filter(|relationship| relationship.open)
            .map(|relationship| &relationship.partner)
    }

    /// The newest Consent applying to `partner` at `now`. Ties (same `dateTime`) go to the later
    /// arrival; a permit and a deny recorded at the same instant resolve to deny.
    pub fn consent_for(&self, partner: &PartnerRef, now: OffsetDateTime) -> ConsentFor {
        let Some(state) = self.patient else {
            return ConsentFor::None;
        };
        let newest = state
            .consents
            .iter()
            .filter(|consent| consent.applies_at(now) && consent.names(partner))
            .max_by(|a, b| {
                a.recorded
                    .cmp(&b.recorded)
                    .then_with(|| {
                        (a.effect == ConsentEffect::Deny).cmp(&(b.effect == ConsentEffect::Deny))
                    })
                    .then_with(|| a.sequence.cmp(&b.sequence))
            });
        match newest.map(|consent| consent.effect) {
            None => ConsentFor::None,
            Some(ConsentEffect::Permit) => ConsentFor::Permit,
            Some(ConsentEffect::Deny) => ConsentFor::Deny,
        }
    }
}

fn parse_number_list(text: &str) -> Result<HashSet<NhsNumber>, ConsentError> {
    let policy = permissive_nhs_policy();
    let mut numbers = HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let number =
            NhsNumber::parse(line, &policy).map_err(|error| ConsentError::BadListLine {
                line: index + 1,
                reason: error.to_string(),
            })?;
        numbers.insert(number);
    }
    Ok(numbers)
}

/// Reduce a Consent resource to a directive (`key` and `sequence` are set by the caller).
fn parse_consent(value: &Value) -> Result<ConsentDirective, ConsentError> {
    let status = value
        .get("status")
        .and_then(Value::as_str)
        .ok_or(ConsentError::BadStatus)?;
    let active = match status {
        "active" => true,
        "draft" | "proposed" | "rejected" | "inactive" | "entered-in-error" => false,
        _ => return Err(ConsentError::BadStatus),
    };
    let provision = value
        .get("provision")
        .ok_or(ConsentError::NoProvisionType)?;
    let effect = match provision.get("type").and_then(Value::as_str) {
        Some("permit") => ConsentEffect::Permit,
        Some("deny") => ConsentEffect::Deny,
        _ => return Err(ConsentError::NoProvisionType),
    };
    let actors: Vec<ConsentActor> = provision
        .get("actor")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|actor| actor.get("reference")?.get("identifier"))
        .filter_map(|identifier| {
            let system = identifier.get("system")?.as_str()?;
            let value = identifier.get("value")?.as_str()?;
            match system {
                ODS_ORGANIZATION_CODE => OdsCode::parse(value).ok().map(ConsentActor::Organisation),
                PARTNER_KIND_SYSTEM => value.parse().ok().map(ConsentActor::Kind),
                _ => None,
            }
        })
        .collect();
    if actors.is_empty() {
        return Err(ConsentError::NoActor);
    }
    let period = provision.get("period");
    let starts = optional_instant(
        period.and_then(|p| p.get("start")),
        false,
        "Consent.provision.period.start",
    )?;
    let ends = optional_instant(
        period.and_then(|p| p.get("end")),
        true,
        "Consent.provision.period.end",
    )?;
    let recorded = optional_instant(value.get("dateTime"), false, "Consent.dateTime")?;
    Ok(ConsentDirective {
        key: None,
        active,
        effect,
        actors,
        starts,
        ends,
        recorded,
        sequence: 0,
    })
}

fn optional_instant(
    value: Option<&Value>,
    end_of_period: bool,
    element: &'static str,
) -> Result<Option<OffsetDateTime>, ConsentError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => fhir_instant(text, end_of_period)
            .map(Some)
            .ok_or(ConsentError::BadDate { element }),
        Some(_) => Err(ConsentError::BadDate { element }),
    }
}

/// A FHIR `dateTime` as an instant: full date-times as given; a partial date (`YYYY`,
/// `YYYY-MM`, `YYYY-MM-DD`) as the start of that period, or — for the end of a period — the
/// start of the next one (a period ending on a date includes that whole day).
pub(crate) fn fhir_instant(text: &str, end_of_period: bool) -> Option<OffsetDateTime> {
    if text.len() > 10 {
        return OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok();
    }
    let mut parts = text.split('-');
    let year: i32 = parts.next()?.parse().ok()?;
    let month: Option<u8> = parts.next().map(str::parse).transpose().ok()?;
    let day: Option<u8> = parts.next().map(str::parse).transpose().ok()?;
    if parts.next().is_some() {
        return None;
    }
    let start_month = Month::try_from(month.unwrap_or(1)).ok()?;
    let start = Date::from_calendar_date(year, start_month, day.unwrap_or(1)).ok()?;
    let date = if !end_of_period {
        start
    } else if day.is_some() {
        start.next_day()?
    } else if month.is_some() {
        let next = start_month.next();
        let next_year = if next == Month::January {
            year + 1
        } else {
            year
        };
        Date::from_calendar_date(next_year, next, 1).ok()?
    } else {
        Date::from_calendar_date(year + 1, Month::January, 1).ok()?
    };
    Some(PrimitiveDateTime::new(date, Time::MIDNIGHT).assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fhir_instant_partial_dates() {
        let start = fhir_instant("2025-03", false).map(|t| t.date());
        assert_eq!(start, Date::from_calendar_date(2025, Month::March, 1).ok());
        let end = fhir_instant("2025-12", true).map(|t| t.date());
        assert_eq!(end, Date::from_calendar_date(2026, Month::January, 1).ok());
        let end = fhir_instant("2025-03-31", true).map(|t| t.date());
        assert_eq!(end, Date::from_calendar_date(2025, Month::April, 1).ok());
        assert!(fhir_instant("2025-02-30", false).is_none());
        assert!(fhir_instant("2025-06-01T10:00:00Z", false).is_some());
    }

    #[test]
    fn lr_1_closing_an_episode_ends_the_care_relationship() {
        let mut registry = ConsentRegistry::new(Duration::days(1));
        let number = NhsNumber::parse("9434765919", &permissive_nhs_policy()).unwrap();
        let trust = PartnerId::parse("trust-rx1").unwrap();
        registry.note_relationship(&number, &trust, "Encounter/e1", true);
        registry.note_relationship(&number, &trust, "Encounter/e2", true);
        registry.note_relationship(&number, &trust, "Encounter/e1", false);
        assert_eq!(registry.view(Some(&number)).care_team().count(), 1);
        registry.note_relationship(&number, &trust, "Encounter/e2", false);
        assert_eq!(registry.view(Some(&number)).care_team().count(), 0);
    }

    #[test]
    fn ndoo_6_cache_age_against_maximum() {
        let cache = NdooCache {
            loaded_at: Some(OffsetDateTime::UNIX_EPOCH),
            max_age: Duration::hours(24),
        };
        assert_eq!(
            cache.freshness(OffsetDateTime::UNIX_EPOCH + Duration::hours(24)),
            NdooFreshness::Fresh
        );
        assert!(matches!(
            cache.freshness(OffsetDateTime::UNIX_EPOCH + Duration::hours(25)),
            NdooFreshness::Stale { .. }
        ));
        let never = NdooCache {
            loaded_at: None,
            max_age: Duration::hours(24),
        };
        assert_eq!(
            never.freshness(OffsetDateTime::UNIX_EPOCH),
            NdooFreshness::NeverLoaded
        );
    }

    #[test]
    fn ndoo_6_bad_line_rejects_whole_list_without_echoing_number() {
        let mut registry = ConsentRegistry::new(Duration::days(1));
        let error = registry
            .load_ndoo("9434765919\n9434765918\n", OffsetDateTime::UNIX_EPOCH)
            .err();
        let Some(ConsentError::BadListLine { line, reason }) = error else {
            panic!("expected a bad line error");
        };
        assert_eq!(line, 2);
        assert!(!reason.contains("9434765918"));
        assert_eq!(registry.ndoo_cache().loaded_at, None);
    }
}
