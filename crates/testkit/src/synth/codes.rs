//! The terminology the generator uses, in one place so the module docs' table and the code
//! cannot drift apart. Every code is listed with its source in the table in [`super`].

/// SNOMED CT (<http://snomed.info/sct>).
pub(crate) const SNOMED: &str = "http://snomed.info/sct";
/// NHS Dictionary of medicines and devices.
pub(crate) const DMD: &str = "https://dmd.nhs.uk";
pub(crate) const LOINC: &str = "http://loinc.org";
pub(crate) const UCUM: &str = "http://unitsofmeasure.org";

/// A code and its display.
pub(crate) type Code = (&'static str, &'static str);

pub(crate) const BLOOD_PRESSURE: Code = ("75367002", "Blood pressure");
pub(crate) const SYSTOLIC: Code = ("271649006", "Systolic blood pressure");
pub(crate) const DIASTOLIC: Code = ("271650006", "Diastolic blood pressure");
pub(crate) const HBA1C: Code = (
    "999791000000106",
    "Haemoglobin A1c level - International Federation of Clinical Chemistry and Laboratory Medicine standardised",
);
pub(crate) const HBA1C_LOINC: Code = (
    "59261-8",
    "Hemoglobin A1c/Hemoglobin.total in Blood by IFCC protocol",
);
pub(crate) const TYPE_1_OPT_OUT: Code = (
    "827241000000103",
    "Dissent from secondary use of general practitioner patient identifiable data",
);

/// Long-term conditions a GP codes as problems: (code, display, minimum age, share of patients
/// at or above that age).
pub(crate) const PROBLEMS: [(&str, &str, u32, f64); 6] = [
    (
        "38341003",
        "Hypertensive disorder, systemic arterial",
        40,
        0.25,
    ),
    ("44054006", "Diabetes mellitus type 2", 40, 0.10),
    ("195967001", "Asthma", 0, 0.08),
    ("13645005", "Chronic obstructive lung disease", 45, 0.05),
    ("49436004", "Atrial fibrillation", 65, 0.08),
    ("35489007", "Depressive disorder", 16, 0.08),
];
/// Index of type 2 diabetes in [`PROBLEMS`] (it brings HbA1c results).
pub(crate) const DIABETES: usize = 1;

/// Sexual-health diagnoses (the RCGP sensitive dataset's "sexually transmitted diseases",
/// DOMAIN.md `SENS-1`).
pub(crate) const SENSITIVE: [Code; 3] = [
    ("105629000", "Chlamydial infection"),
    ("15628003", "Gonorrhea"),
    ("86406008", "Human immunodeficiency virus infection"),
];

/// Acute antibiotics (dm+d VMPs).
pub(crate) const ANTIBIOTICS: [(&str, &str, &str, u32, &str); 4] = [
    (
        "39732411000001106",
        "Amoxicillin 500mg capsules",
        "One capsule three times a day for 5 days",
        15,
        "capsule",
    ),
    (
        "41946511000001109",
        "Clarithromycin 500mg tablets",
        "One tablet twice a day for 5 days",
        10,
        "tablet",
    ),
    (
        "41948311000001104",
        "Doxycycline 100mg capsules",
        "Two capsules on the first day, then one capsule daily for 4 days",
        6,
        "capsule",
    ),
    (
        "39687811000001107",
        "Ciprofloxacin 500mg tablets",
        "One tablet twice a day for 3 days",
        6,
        "tablet",
    ),
];

/// Vaccines (dm+d): influenza (AMP), pneumococcal conjugate (VMP), COVID-19 mRNA (AMP).
pub(crate) const INFLUENZA_VACCINE: Code = (
    "11278411000001109",
    "Influenza vaccine (split virion, inactivated) suspension for injection 0.5ml pre-filled syringes (Pfizer Ltd)",
);
pub(crate) const PNEUMOCOCCAL_VACCINE: Code = (
    "10245211000001108",
    "Pneumococcal polysaccharide conjugated vaccine (adsorbed) suspension for injection 0.5ml pre-filled syringes",
);
pub(crate) const COVID_VACCINE: Code = (
    "39115611000001103",
    "Comirnaty COVID-19 mRNA Vaccine 30micrograms/0.3ml dose concentrate for dispersion for injection multidose vials (Pfizer Ltd)",
);

pub(crate) const EMERGENCY_VISIT: Code = ("4525004", "Emergency department patient visit");
pub(crate) const AE_SERVICE: Code = ("310000008", "Accident and Emergency service");
pub(crate) const HOSPITAL_ADMISSION: Code = ("32485007", "Hospital admission");
pub(crate) const DISCHARGE_SUMMARY: Code = ("373942005", "Discharge summary");
/// Hospital diagnoses: (code, display, admitted?).
pub(crate) const HOSPITAL_DIAGNOSES: [(&str, &str, bool); 5] = [
    ("29857009", "Chest pain", false),
    ("233604007", "Pneumonia", true),
    ("5913000", "Fracture of neck of femur", true),
    ("22298006", "Myocardial infarction", true),
    ("59282003", "Pulmonary embolism", true),
];

pub(crate) const SOCIAL_CARE_ASSESSMENT: Code =
    ("710824005", "Assessment of health and social care needs");
pub(crate) const CARE_PLAN: Code = ("734163000", "Care plan");
