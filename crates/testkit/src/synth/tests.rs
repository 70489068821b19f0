//! The generator's promises: valid, reproducible, streaming, shaped as configured.

use std::collections::{BTreeSet, HashSet};
use std::str::FromStr as _;

use caregate_fhir::validate::ValidatorConfig;
use caregate_fhir::{ResourceType, Validator};

use super::*;

fn validator() -> Validator {
    Validator::new(ValidatorConfig::default()).expect("built-in schemas compile")
}

fn assert_all_valid(config: &SynthConfig, validator: &Validator) -> usize {
    let mut count = 0;
    for record in records(config) {
        let expected = ResourceType::from_str(record.resource_type).expect("a supported type");
        if let Err(rejection) = validator.validate_bytes(record.body.as_bytes(), Some(expected)) {
            panic!(
                "seed {} {} from {} rejected: {}\n{}",
                config.seed,
                record.resource_type,
                record.partner_id,
                serde_json::to_string_pretty(&rejection.outcome.to_json()).unwrap_or_default(),
                record.body
            );
        }
        count += 1;
    }
    count
}

#[test]
fn synth_every_record_passes_the_gateway_validator() {
    let validator = validator();
    let mut total = 0;
    for seed in [1, 2, 3, 42, 2026, u64::MAX] {
        let mut config = SynthConfig::new(seed, 60);
        // Raise the rare shares so the rare record kinds are exercised too.
        config.type1_share = 0.2;
        config.dissent_share = 0.2;
        config.sensitive_share = 0.2;
        total += assert_all_valid(&config, &validator);
    }
    assert!(total >= 300, "only {total} records generated");
}

#[test]
fn synth_padded_records_pass_the_validator_and_reach_the_size() {
    let validator = validator();
    for target in [2_048, 8_192] {
        let mut config = SynthConfig::new(7, 25);
        config.pad_to_bytes = Some(target);
        assert_all_valid(&config, &validator);
        for record in records(&config) {
            assert!(
                record.body.len() >= target - 8 && record.body.len() <= target + 64
                    || record.body.len() > target,
                "{} is {} bytes for target {target}",
                record.resource_type,
                record.body.len()
            );
        }
    }
}

#[test]
fn synth_same_seed_gives_identical_bytes_and_different_seeds_differ() {
    let render = |seed: u64| -> Vec<String> {
        records(&SynthConfig::new(seed, 40))
            .map(|record| record.request_line())
            .collect()
    };
    assert_eq!(render(11), render(11));
    assert_ne!(render(11), render(12));
    let ndoo = |seed: u64| ndoo_list(&SynthConfig::new(seed, 2_000)).collect::<Vec<_>>();
    assert_eq!(ndoo(5), ndoo(5));
    assert_ne!(ndoo(5), ndoo(6));
}

#[test]
fn synth_covers_every_partner_and_resource_kind() {
    let mut summary = Summary::default();
    for record in records(&SynthConfig::new(3, 400)) {
        summary.add(&record);
    }
    let partners: BTreeSet<&str> = summary.by_partner().into_keys().collect();
    assert_eq!(
        partners,
        PARTNERS.iter().map(|p| p.id).collect::<BTreeSet<_>>()
    );
    let types: BTreeSet<&str> = summary.by_type().into_keys().collect();
    for expected in [
        "CarePlan",
        "Condition",
        "Consent",
        "DocumentReference",
        "Encounter",
        "Immunization",
        "MedicationDispense",
        "MedicationRequest",
        "Observation",
        "Patient",
        "RelatedPerson",
    ] {
        assert!(types.contains(expected), "no {expected} in {types:?}");
    }
    // Each partner submits only what its scopes in deploy/example/caregate.toml allow.
    for (partner, resource_type, _) in summary.rows() {
        let allowed = match partner {
            "pharmacy-fa123" => resource_type == "MedicationDispense",
            "council-e08000012" => {
                ["CarePlan", "RelatedPerson", "Consent"].contains(&resource_type)
            }
            _ => true,
        };
        assert!(allowed, "{partner} may not submit {resource_type}");
    }
}

#[test]
fn synth_nhs_numbers_are_unique_test_numbers_with_valid_check_digits() {
    let mut seen = HashSet::new();
    for patient in patients(&SynthConfig::new(9, 5_000)) {
        let digits: Vec<u8> = patient.nhs_number.bytes().map(|b| b - b'0').collect();
        assert!(patient.nhs_number.starts_with("999"));
        let nine: [u8; 9] = digits[..9].try_into().expect("ten digits");
        assert_eq!(check_digit(&nine), Some(digits[9]));
        assert!(seen.insert(patient.nhs_number));
        assert!(patient.birth_date < SynthConfig::default().day);
    }
}

#[test]
fn synth_shares_shape_the_population() {
    let mut config = SynthConfig::new(4, 4_000);
    config.ndoo_share = 0.1;
    let opted_out = ndoo_list(&config).count();
    assert!(
        (300..500).contains(&opted_out),
        "{opted_out} of 4000 at 10 %"
    );
    config.ndoo_share = 1.0;
    assert_eq!(ndoo_list(&config).count(), 4_000);
    config.ndoo_share = 0.0;
    assert_eq!(ndoo_list(&config).count(), 0);

    let mut config = SynthConfig::new(4, 500);
    config.type1_share = 1.0;
    config.dissent_share = 1.0;
    let type1 = records(&config)
        .filter(|r| r.body.contains(codes::TYPE_1_OPT_OUT.0))
        .count();
    let consents = records(&config)
        .filter(|r| r.resource_type == "Consent" && r.body.contains("\"deny\""))
        .count();
    assert_eq!((type1, consents), (500, 500));
}

#[test]
fn synth_record_id_appears_exactly_once_in_its_body() {
    for record in records(&SynthConfig::new(8, 50)) {
        assert_eq!(
            record.body.matches(&record.record_id).count(),
            1,
            "{}",
            record.body
        );
    }
}

#[test]
fn synth_streams_without_building_the_population() {
    // The largest population: taking a few records must not generate the rest.
    let config = SynthConfig::new(1, MAX_PATIENTS);
    assert_eq!(records(&config).take(1_000).count(), 1_000);
    assert_eq!(patients(&config).size_hint().0, MAX_PATIENTS);
}

#[test]
fn synth_config_refuses_impossible_settings() {
    assert!(matches!(
        SynthConfig::new(1, MAX_PATIENTS + 1).validate(),
        Err(SynthError::TooManyPatients { .. })
    ));
    let config = SynthConfig {
        ndoo_share: 1.5,
        ..SynthConfig::default()
    };
    assert!(config.validate().is_err());
    assert_eq!(records(&config).count(), 0);
}

#[test]
fn synth_records_by_patient_are_the_same_records_in_the_same_order() {
    let config = SynthConfig::new(7, 40);
    let flat: Vec<SynthRecord> = records(&config).collect();
    let grouped: Vec<(SynthPatient, Vec<SynthRecord>)> = records_by_patient(&config).collect();
    assert_eq!(grouped.len(), 40);
    for (patient, records) in &grouped {
        assert!(
            !records.is_empty(),
            "patient {} has no records",
            patient.index
        );
        for record in records {
            assert!(
                record.body.contains(&patient.nhs_number),
                "a record grouped under patient {} does not name them",
                patient.index
            );
        }
    }
    let regrouped: Vec<SynthRecord> = grouped.into_iter().flat_map(|(_, r)| r).collect();
    assert_eq!(flat, regrouped);
}
