//! A small synthetic ICS day replayed against the real binary over TLS: every record the
//! generator makes for the example ICS's partners is accepted (the seed of `caregate demo`,
//! issue 7).

use caregate_e2e::{Gateway, TestPartner};
use caregate_testkit::keys::PartnerKey;
use caregate_testkit::synth::{PARTNERS, Summary, SynthConfig, records};
use reqwest::{Method, StatusCode};

/// The example ICS's submitting partners with the scopes `deploy/example/caregate.toml` gives
/// them (and fresh keys).
fn example_partners() -> Vec<TestPartner> {
    PARTNERS
        .iter()
        .map(|partner| {
            let (kind, scopes): (&str, &[&str]) = match partner.id {
                "trust-rx1" => ("trust", &["system/*.cruds"]),
                "pharmacy-fa123" => (
                    "pharmacy",
                    &[
                        "system/MedicationDispense.cru",
                        "system/MedicationRequest.rs",
                    ],
                ),
                "council-e08000012" => (
                    "council",
                    &[
                        "system/CarePlan.cru",
                        "system/RelatedPerson.cru",
                        "system/Consent.cru",
                        "system/Patient.rs",
                    ],
                ),
                _ => ("gp", &["system/*.cruds"]),
            };
            TestPartner::new(
                partner.id,
                partner.ods_code,
                kind,
                scopes,
                PartnerKey::generate_es256(&format!("{}-key", partner.id)),
            )
        })
        .collect()
}

#[tokio::test]
async fn synth_day_of_30_patients_is_accepted_record_for_record() {
    let gw = Gateway::start_with(example_partners(), "");
    let mut tokens = Vec::new();
    for partner in PARTNERS {
        tokens.push((partner.id, gw.token(partner.id).await));
    }
    let mut config = SynthConfig::new(2026, 30);
    // Make sure the rare kinds (Type 1, dissent, sensitive) appear in a 30-patient day.
    config.type1_share = 0.2;
    config.dissent_share = 0.2;
    config.sensitive_share = 0.2;
    let mut summary = Summary::default();
    for record in records(&config) {
        let token = tokens
            .iter()
            .find(|(id, _)| *id == record.partner_id)
            .map(|(_, token)| token.as_str())
            .expect("a token for every partner");
        let reply = gw
            .send(
                Method::POST,
                &record.path(),
                Some(token),
                Some(record.body.clone().into_bytes()),
                &[],
            )
            .await;
        assert!(
            reply.status == StatusCode::CREATED || reply.status == StatusCode::OK,
            "{} from {} answered {}: {}\n{}",
            record.resource_type,
            record.partner_id,
            reply.status,
            reply.body,
            record.body
        );
        summary.add(&record);
    }
    assert_eq!(summary.by_type().get("Patient"), Some(&30), "{summary}");
    assert_eq!(summary.by_partner().len(), PARTNERS.len(), "{summary}");
}
