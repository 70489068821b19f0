//! Synthetic care traffic for a small English Integrated Care System: a seeded, reproducible
//! population and the FHIR R4 records its GP practices, acute trust, pharmacy and council submit
//! (issue 7). Used by tests, `caregate synth`, `caregate bench` and, later, `caregate demo`.
//!
//! - **Reproducible:** the same [`SynthConfig`] gives byte-identical records on every machine
//!   (SplitMix64, see `rng.rs`; no clock, no hash-map order, integers only).
//! - **Streaming:** [`records`] is an iterator holding one patient's records at a time, so a
//!   benchmark population costs the same memory as a test one. [`MAX_PATIENTS`] bounds a
//!   population (distinct test NHS numbers run out beyond it).
//! - **Valid:** every record passes the gateway's validator with default settings (tested).
//! - **Never real people:** NHS numbers come only from the `999` test range with correct
//!   Modulus 11 check digits; names are drawn from short lists of common words; telephone numbers
//!   are Ofcom's drama range (01632 960xxx); there are no postcodes; organisations are the example
//!   ICS's partners (`deploy/example/caregate.toml`), and identifier systems sit under `.example`.
//!
//! Each record names the partner that submits it ([`SynthRecord::partner_id`]), one of
//! [`PARTNERS`]; they match the example configuration's ids, ODS codes and scopes.
//!
//! What a patient generates (shares are per patient; the day is [`SynthConfig::day`]):
//!
//! | Partner | Records |
//! |---|---|
//! | registered GP (`gp-a81001` or `gp-b82002`) | `Patient` (registration, `generalPractitioner` by ODS identifier); `Condition` problems by age; blood pressure `Observation` (panel with systolic/diastolic components) for most adults; HbA1c `Observation` for people with type 2 diabetes; acute antibiotic `MedicationRequest`s; `Immunization`s; the Type 1 opt-out `Observation`; a sexual-health `Condition` for the sensitive share; a dissent `Consent` (`provision.type = deny`, naming the trust or the council) |
//! | `trust-rx1` | A&E `Encounter` (class `EMER`); for some, an admission `Encounter` (`IMP`), an `encounter-diagnosis` `Condition` and a discharge summary `DocumentReference` with the letter inline as base64 `attachment.data` |
//! | `pharmacy-fa123` | `MedicationDispense` for most prescriptions, pointing at the prescription by identifier |
//! | `council-e08000012` | for older people, a social-care assessment `CarePlan` and often a carer as `RelatedPerson` |
//!
//! The National Data Opt-out is held on Spine, not in records: [`ndoo_list`] gives the NHS numbers
//! of the opted-out share, one per line as the NDOO service returns them (DOMAIN.md `NDOO-6`).
//!
//! ## Codes used
//!
//! Only codes whose identity was checked against a published source are used (the UK Core
//! examples in `../shared/corpora/uk-core`, DOMAIN.md, the QOF HbA1c cluster, LOINC's own page);
//! chronic-disease medicines are not prescribed because their dm+d ids were not verified.
//!
//! | System | Code | Meaning | Used for | Source |
//! |---|---|---|---|---|
//! | SNOMED CT | 75367002 | Blood pressure | BP panel | UK Core examples |
//! | SNOMED CT | 271649006 / 271650006 | Systolic / Diastolic blood pressure | BP components | issue 7, README |
//! | SNOMED CT | 999791000000106 | Haemoglobin A1c level - IFCC standardised | HbA1c (mmol/mol) | QOF cluster IFCCHBAM_COD |
//! | LOINC | 59261-8 | Hemoglobin A1c/Hemoglobin.total in Blood by IFCC protocol | HbA1c second coding | loinc.org |
//! | SNOMED CT | 827241000000103 | Dissent from secondary use of GP patient identifiable data | Type 1 opt-out | DOMAIN.md `T1-1` |
//! | SNOMED CT | 38341003, 44054006, 195967001, 13645005, 49436004, 35489007 | Hypertension, type 2 diabetes, asthma, COPD, atrial fibrillation, depressive disorder | GP problems | SNOMED CT International |
//! | SNOMED CT | 105629000, 15628003, 86406008 | Chlamydial infection, gonorrhoea, HIV infection | sensitive share (DOMAIN.md `SENS-1`) | SNOMED CT International |
//! | dm+d | 39732411000001106, 41946511000001109, 41948311000001104, 39687811000001107 | Amoxicillin 500mg capsules, Clarithromycin 500mg tablets, Doxycycline 100mg capsules, Ciprofloxacin 500mg tablets | prescriptions, dispensing | UK Core examples |
//! | dm+d | 11278411000001109, 10245211000001108, 39115611000001103 | influenza, pneumococcal, COVID-19 vaccines | immunisations | UK Core examples |
//! | SNOMED CT | 4525004, 310000008, 32485007 | Emergency department patient visit, A&E service, Hospital admission | trust encounters | SNOMED CT International, UK Core examples |
//! | SNOMED CT | 29857009, 233604007, 5913000, 22298006, 59282003 | Chest pain, pneumonia, fractured neck of femur, myocardial infarction, pulmonary embolism | hospital diagnoses | SNOMED CT International, UK Core examples |
//! | SNOMED CT | 373942005 | Discharge summary | DocumentReference.type | UK Core examples |
//! | SNOMED CT | 710824005, 734163000 | Assessment of health and social care needs, Care plan | council CarePlan | SNOMED CT International, UK Core examples |
//! | LOINC | 59284-0 | Patient Consent | Consent.category | FHIR R4 consent-category |

mod codes;
mod nhs_number;
mod resources;
mod rng;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use time::{Date, Month};

pub use nhs_number::{MAX_PATIENTS, check_digit};

use nhs_number::NhsNumberDealer;
use rng::SplitMix64;

/// The kind of an ICS partner, as the gateway's config names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PartnerKind {
    Gp,
    Trust,
    Pharmacy,
    Council,
}

/// A submitting partner of the example ICS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthPartner {
    /// The partner id (OAuth client id) in `deploy/example/caregate.toml`.
    pub id: &'static str,
    pub ods_code: &'static str,
    pub kind: PartnerKind,
}

/// The example ICS's partners that submit records (the ICB only reads).
pub const PARTNERS: [SynthPartner; 5] =
    [GP_A81001, GP_B82002, TRUST_RX1, PHARMACY_FA123, COUNCIL_609];

pub(crate) const GP_A81001: SynthPartner = SynthPartner {
    id: "gp-a81001",
    ods_code: "A81001",
    kind: PartnerKind::Gp,
};
pub(crate) const GP_B82002: SynthPartner = SynthPartner {
    id: "gp-b82002",
    ods_code: "B82002",
    kind: PartnerKind::Gp,
};
pub(crate) const TRUST_RX1: SynthPartner = SynthPartner {
    id: "trust-rx1",
    ods_code: "RX1",
    kind: PartnerKind::Trust,
};
pub(crate) const PHARMACY_FA123: SynthPartner = SynthPartner {
    id: "pharmacy-fa123",
    ods_code: "FA123",
    kind: PartnerKind::Pharmacy,
};
pub(crate) const COUNCIL_609: SynthPartner = SynthPartner {
    id: "council-e08000012",
    ods_code: "609",
    kind: PartnerKind::Council,
};

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Same seed, same records, byte for byte.
    pub seed: u64,
    /// Population size, at most [`MAX_PATIENTS`].
    pub patients: usize,
    /// Share of patients on the National Data Opt-out list (about 5 % nationally in 2024).
    pub ndoo_share: f64,
    /// Share with a Type 1 opt-out coded by their GP.
    pub type1_share: f64,
    /// Share who dissent from sharing with one partner (a `Consent` with `provision.type = deny`).
    pub dissent_share: f64,
    /// Share with a sexual-health diagnosis in their GP record.
    pub sensitive_share: f64,
    /// When set, records smaller than this many bytes get a narrative (`text`) that brings them
    /// to it, for benchmarks with fixed record sizes. Larger records are left as they are.
    pub pad_to_bytes: Option<usize>,
    /// The day the traffic happens on.
    pub day: Date,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            patients: 100,
            ndoo_share: 0.05,
            type1_share: 0.03,
            dissent_share: 0.03,
            sensitive_share: 0.03,
            pad_to_bytes: None,
            day: Date::from_calendar_date(2026, Month::November, 20).unwrap_or(Date::MIN),
        }
    }
}

/// Why a [`SynthConfig`] cannot be generated.
#[derive(Debug, Clone, PartialEq)]
pub enum SynthError {
    TooManyPatients { asked: usize },
    ShareOutOfRange { name: &'static str, value: f64 },
}

impl fmt::Display for SynthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooManyPatients { asked } => write!(
                f,
                "{asked} patients asked for; the 999 test range holds at most {MAX_PATIENTS} distinct NHS numbers"
            ),
            Self::ShareOutOfRange { name, value } => {
                write!(f, "{name} must be between 0 and 1, not {value}")
            }
        }
    }
}

impl std::error::Error for SynthError {}

impl SynthConfig {
    /// A config with this seed and population, other settings default.
    pub fn new(seed: u64, patients: usize) -> Self {
        Self {
            seed,
            patients,
            ..Self::default()
        }
    }

    /// Check the settings before generating.
    pub fn validate(&self) -> Result<(), SynthError> {
        if self.patients > MAX_PATIENTS {
            return Err(SynthError::TooManyPatients {
                asked: self.patients,
            });
        }
        for (name, value) in [
            ("ndoo_share", self.ndoo_share),
            ("type1_share", self.type1_share),
            ("dissent_share", self.dissent_share),
            ("sensitive_share", self.sensitive_share),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(SynthError::ShareOutOfRange { name, value });
            }
        }
        Ok(())
    }
}

/// Administrative sex as FHIR codes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gender {
    Female,
    Male,
}

impl Gender {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Female => "female",
            Self::Male => "male",
        }
    }
}

/// One synthetic person and the choices that shape their records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthPatient {
    /// Position in the population (0-based).
    pub index: u64,
    /// A `999` test-range NHS number, unique in the population.
    pub nhs_number: String,
    /// The registered practice.
    pub gp: SynthPartner,
    pub gender: Gender,
    pub birth_date: Date,
    pub age: u32,
    pub ndoo: bool,
    pub type1: bool,
    pub dissent: bool,
    pub sensitive: bool,
}

/// Stream ids that keep the per-patient random streams independent.
const PATIENT_STREAM: u64 = 1;
const EVENT_STREAM: u64 = 2;

/// The population, in order.
#[derive(Debug, Clone)]
pub struct Patients {
    config: SynthConfig,
    dealer: NhsNumberDealer,
    next: u64,
}

/// The population of `config` (an empty iterator when `config` does not validate).
pub fn patients(config: &SynthConfig) -> Patients {
    let mut config = config.clone();
    if config.validate().is_err() {
        config.patients = 0;
    }
    Patients {
        dealer: NhsNumberDealer::new(config.seed),
        config,
        next: 0,
    }
}

impl Iterator for Patients {
    type Item = SynthPatient;

    fn next(&mut self) -> Option<SynthPatient> {
        if self.next >= self.config.patients as u64 {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let nhs_number = self.dealer.deal()?;
        let mut rng = SplitMix64::for_item(self.config.seed, PATIENT_STREAM, index);
        // A rough English age pyramid: a fifth under 18, a fifth 65 and over.
        let age = match rng.below(100) {
            0..20 => rng.range(0, 17),
            20..80 => rng.range(18, 64),
            _ => rng.range(65, 99),
        } as u32;
        let day_of_year = rng.below(365) as i64;
        let birth_date = self
            .config
            .day
            .replace_year(self.config.day.year() - age as i32 - 1)
            .unwrap_or(self.config.day)
            .saturating_add(time::Duration::days(day_of_year));
        let c = &self.config;
        Some(SynthPatient {
            index,
            nhs_number,
            gp: if rng.chance(0.55) {
                GP_A81001
            } else {
                GP_B82002
            },
            gender: if rng.chance(0.5) {
                Gender::Female
            } else {
                Gender::Male
            },
            birth_date,
            age,
            ndoo: rng.chance(c.ndoo_share),
            type1: rng.chance(c.type1_share),
            dissent: rng.chance(c.dissent_share),
            sensitive: age >= 16 && rng.chance(c.sensitive_share),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.config.patients as u64).saturating_sub(self.next) as usize;
        (left, Some(left))
    }
}

/// The NHS numbers of the population's National Data Opt-out share, one per item, in
/// population order (write them one per line, LF endings, for `ndoo.txt`).
pub fn ndoo_list(config: &SynthConfig) -> impl Iterator<Item = String> + use<> {
    patients(config)
        .filter(|patient| patient.ndoo)
        .map(|patient| patient.nhs_number)
}

/// One record as a partner submits it: `POST /fhir/{resource_type}` with `body`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthRecord {
    /// The submitting partner's id (its OAuth client id).
    pub partner_id: &'static str,
    pub resource_type: &'static str,
    /// The resource, compact JSON.
    pub body: String,
    /// The value of the record's own business identifier, unique across populations and seeds.
    /// It appears exactly once in `body`; load generators replace it to make each request a new
    /// record.
    pub record_id: String,
}

impl SynthRecord {
    /// The HTTP method (every synthetic record is a create).
    pub fn method(&self) -> &'static str {
        "POST"
    }

    /// The request path.
    pub fn path(&self) -> String {
        format!("/fhir/{}", self.resource_type)
    }

    /// One line for replay: `{"partner":…,"method":"POST","path":…,"body":{…}}`.
    pub fn request_line(&self) -> String {
        format!(
            "{{\"partner\":\"{}\",\"method\":\"{}\",\"path\":\"{}\",\"body\":{}}}",
            self.partner_id,
            self.method(),
            self.path(),
            self.body
        )
    }
}

/// The care records of a population, patient by patient, in submission order.
#[derive(Debug, Clone)]
pub struct Records {
    patients: Patients,
    pending: VecDeque<SynthRecord>,
}

/// The records of `config`'s population (an empty iterator when `config` does not validate).
pub fn records(config: &SynthConfig) -> Records {
    Records {
        patients: patients(config),
        pending: VecDeque::new(),
    }
}

impl Iterator for Records {
    type Item = SynthRecord;

    fn next(&mut self) -> Option<SynthRecord> {
        loop {
            if let Some(record) = self.pending.pop_front() {
                return Some(record);
            }
            let patient = self.patients.next()?;
            let rng = SplitMix64::for_item(self.patients.config.seed, EVENT_STREAM, patient.index);
            resources::patient_records(&self.patients.config, &patient, rng, &mut self.pending);
        }
    }
}

/// The records of `config`'s population grouped by patient, in submission order: for senders
/// that run patients concurrently but keep each patient's records in order (a dissent `Consent`
/// before the records it governs).
pub fn records_by_patient(
    config: &SynthConfig,
) -> impl Iterator<Item = (SynthPatient, Vec<SynthRecord>)> + use<> {
    let patients = patients(config);
    let seed = patients.config.seed;
    let event_config = patients.config.clone();
    patients.map(move |patient| {
        let rng = SplitMix64::for_item(seed, EVENT_STREAM, patient.index);
        let mut out = VecDeque::new();
        resources::patient_records(&event_config, &patient, rng, &mut out);
        (patient, Vec::from(out))
    })
}

/// Counts per partner and resource type, for reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    counts: BTreeMap<(&'static str, &'static str), u64>,
    bytes: u64,
}

impl Summary {
    pub fn add(&mut self, record: &SynthRecord) {
        *self
            .counts
            .entry((record.partner_id, record.resource_type))
            .or_default() += 1;
        self.bytes += record.body.len() as u64;
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Total body bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// `(partner, resource type, count)`, sorted.
    pub fn rows(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        self.counts.iter().map(|(&(p, t), &n)| (p, t, n))
    }

    /// Counts per resource type.
    pub fn by_type(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for (&(_, resource_type), &n) in &self.counts {
            *out.entry(resource_type).or_default() += n;
        }
        out
    }

    /// Counts per partner.
    pub fn by_partner(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for (&(partner, _), &n) in &self.counts {
            *out.entry(partner).or_default() += n;
        }
        out
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<20} {:<20} {:>9}",
            "partner", "resource type", "records"
        )?;
        for (partner, resource_type, n) in self.rows() {
            writeln!(f, "{partner:<20} {resource_type:<20} {n:>9}")?;
        }
        writeln!(f)?;
        for (resource_type, n) in self.by_type() {
            writeln!(f, "{resource_type:<41} {n:>9}")?;
        }
        write!(
            f,
            "{:<41} {:>9}  ({} bytes)",
            "total",
            self.total(),
            self.bytes
        )
    }
}

#[cfg(test)]
mod tests;
