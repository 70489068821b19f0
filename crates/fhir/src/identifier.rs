//! Identifier system URIs for the NHS identifiers caregate handles, and the mapping from the legacy
//! `fhir.nhs.net` forms still sent by older GP Connect and Spine integrations (DOMAIN.md `URI`).
//!
//! FHIR compares `Identifier.system` as an exact string
//! (<http://hl7.org/fhir/R4/datatypes.html#Identifier>), so a record sent with a legacy system would
//! not match a search on the current one. Intake rewrites legacy systems to the current URI once,
//! so everything downstream (search tokens, dedup keys, policy) sees one spelling.

/// NHS number (<https://fhir.nhs.uk/Id/nhs-number>).
pub const NHS_NUMBER: &str = "https://fhir.nhs.uk/Id/nhs-number";
/// ODS organisation code (DOMAIN.md `ODS`).
pub const ODS_ORGANIZATION_CODE: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// ODS site code.
pub const ODS_SITE_CODE: &str = "https://fhir.nhs.uk/Id/ods-site-code";
/// Spine Directory Service user id.
pub const SDS_USER_ID: &str = "https://fhir.nhs.uk/Id/sds-user-id";
/// Spine Directory Service role profile id.
pub const SDS_ROLE_PROFILE_ID: &str = "https://fhir.nhs.uk/Id/sds-role-profile-id";

/// Legacy system → current system. The SDS user id appears both with and without `/Id/`
/// (gpconnect issue 422, cited in DOMAIN.md `URI`).
const LEGACY_SYSTEMS: [(&str, &str); 6] = [
    ("http://fhir.nhs.net/Id/nhs-number", NHS_NUMBER),
    (
        "http://fhir.nhs.net/Id/ods-organization-code",
        ODS_ORGANIZATION_CODE,
    ),
    ("http://fhir.nhs.net/Id/ods-site-code", ODS_SITE_CODE),
    ("http://fhir.nhs.net/sds-user-id", SDS_USER_ID),
    ("http://fhir.nhs.net/Id/sds-user-id", SDS_USER_ID),
    (
        "http://fhir.nhs.net/Id/sds-role-profile-id",
        SDS_ROLE_PROFILE_ID,
    ),
];

/// The current URI for a legacy identifier system, or `None` when `system` is not a known legacy
/// form (including when it is already current). Matching is exact, as FHIR's is: a near miss is
/// left for the schema and the rules to judge, not guessed at.
pub fn normalise_system(system: &str) -> Option<&'static str> {
    // Cheap pre-filter: every legacy form lives on fhir.nhs.net.
    if !system.starts_with("http://fhir.nhs.net/") {
        return None;
    }
    LEGACY_SYSTEMS
        .iter()
        .find(|(legacy, _)| *legacy == system)
        .map(|(_, current)| *current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_legacy_systems_map_to_current() {
        let cases = [
            ("http://fhir.nhs.net/Id/nhs-number", NHS_NUMBER),
            (
                "http://fhir.nhs.net/Id/ods-organization-code",
                ODS_ORGANIZATION_CODE,
            ),
            ("http://fhir.nhs.net/Id/ods-site-code", ODS_SITE_CODE),
            ("http://fhir.nhs.net/sds-user-id", SDS_USER_ID),
            ("http://fhir.nhs.net/Id/sds-user-id", SDS_USER_ID),
            (
                "http://fhir.nhs.net/Id/sds-role-profile-id",
                SDS_ROLE_PROFILE_ID,
            ),
        ];
        for (legacy, current) in cases {
            assert_eq!(normalise_system(legacy), Some(current), "{legacy}");
        }
    }

    #[test]
    fn uri_current_and_unknown_systems_are_left_alone() {
        for system in [
            NHS_NUMBER,
            ODS_ORGANIZATION_CODE,
            ODS_SITE_CODE,
            SDS_USER_ID,
            SDS_ROLE_PROFILE_ID,
            "http://snomed.info/sct",
            "http://fhir.nhs.net/Id/unknown",
            "HTTP://FHIR.NHS.NET/Id/nhs-number",
            "http://fhir.nhs.net/Id/nhs-number/",
            "",
        ] {
            assert_eq!(normalise_system(system), None, "{system}");
        }
    }

    #[test]
    fn uri_current_systems_are_https_on_fhir_nhs_uk() {
        for system in [
            NHS_NUMBER,
            ODS_ORGANIZATION_CODE,
            ODS_SITE_CODE,
            SDS_USER_ID,
            SDS_ROLE_PROFILE_ID,
        ] {
            assert!(system.starts_with("https://fhir.nhs.uk/Id/"), "{system}");
        }
    }
}
