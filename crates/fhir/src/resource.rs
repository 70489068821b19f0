//! The resource types caregate accepts, and the validated resource that only
//! [`crate::Validator`] can construct.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

use crate::nhs_number::NhsNumber;

macro_rules! resource_types {
    ($($variant:ident),+ $(,)?) => {
        /// A FHIR R4 resource type caregate accepts for intake. Anything else is `not-supported`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ResourceType { $($variant),+ }

        impl ResourceType {
            /// Every supported type, in declaration order.
            pub const ALL: &'static [ResourceType] = &[$(ResourceType::$variant),+];

            /// The type name as FHIR spells it.
            pub fn as_str(self) -> &'static str {
                match self { $(ResourceType::$variant => stringify!($variant)),+ }
            }
        }

        impl FromStr for ResourceType {
            type Err = UnsupportedResourceType;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $(stringify!($variant) => Ok(ResourceType::$variant),)+
                    _ => Err(UnsupportedResourceType),
                }
            }
        }
    };
}

resource_types!(
    Patient,
    RelatedPerson,
    Encounter,
    EpisodeOfCare,
    Observation,
    Condition,
    Procedure,
    AllergyIntolerance,
    MedicationRequest,
    MedicationDispense,
    MedicationStatement,
    Immunization,
    DiagnosticReport,
    DocumentReference,
    CarePlan,
    ServiceRequest,
    Flag,
    Consent,
    Bundle,
);

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The type name is not one caregate accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("resource type is not supported by this gateway")]
pub struct UnsupportedResourceType;

/// A resource that passed the schema and every UK rule. Only [`crate::Validator`] constructs one
/// ("parse, don't validate"). Its `Debug` shows the type and id only: the content carries patient
/// identifiers, which never go to logs.
#[derive(Clone)]
pub struct ValidatedResource {
    pub(crate) resource_type: ResourceType,
    pub(crate) value: Value,
    pub(crate) nhs_number: Option<NhsNumber>,
    pub(crate) identifiers: Vec<String>,
}

impl fmt::Debug for ValidatedResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidatedResource")
            .field("resource_type", &self.resource_type)
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl ValidatedResource {
    pub fn resource_type(&self) -> ResourceType {
        self.resource_type
    }

    /// The logical id as submitted (`Resource.id`), if any.
    pub fn id(&self) -> Option<&str> {
        self.value.get("id").and_then(Value::as_str)
    }

    /// The resource, normalised (legacy identifier systems rewritten to the current URIs).
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The NHS number of the patient this resource is about, where the resource states it: a
    /// Patient's own identifier, or the `subject`/`patient`/`beneficiary` reference's logical
    /// identifier. Never log it.
    pub fn nhs_number(&self) -> Option<&NhsNumber> {
        self.nhs_number.as_ref()
    }

    /// The resource's business identifiers as `system|value` tokens (as used by FHIR search and
    /// `If-None-Exist`).
    pub fn identifiers(&self) -> &[String] {
        &self.identifiers
    }

    /// Set the logical id (the server assigns one on create), keeping `meta` untouched.
    pub fn set_id(&mut self, id: &str) {
        if let Value::Object(map) = &mut self.value {
            map.insert("id".to_owned(), Value::String(id.to_owned()));
        }
    }

    /// Set `meta.versionId` and `meta.lastUpdated`, as the server does on commit.
    pub fn set_meta(&mut self, version_id: &str, last_updated: &str) {
        if let Value::Object(map) = &mut self.value {
            let meta = map
                .entry("meta")
                .or_insert_with(|| Value::Object(serde_json::Map::new()));
            if let Value::Object(meta) = meta {
                meta.insert("versionId".to_owned(), Value::String(version_id.to_owned()));
                meta.insert(
                    "lastUpdated".to_owned(),
                    Value::String(last_updated.to_owned()),
                );
            }
        }
    }

    /// Remove the server-assigned `meta.versionId` and `meta.lastUpdated` a client may have sent
    /// (the server owns them), dropping `meta` if nothing else is left in it.
    pub fn clear_server_meta(&mut self) {
        if let Value::Object(map) = &mut self.value {
            let now_empty = match map.get_mut("meta") {
                Some(Value::Object(meta)) => {
                    meta.remove("versionId");
                    meta.remove("lastUpdated");
                    meta.is_empty()
                }
                _ => false,
            };
            if now_empty {
                map.remove("meta");
            }
        }
    }

    /// Remove `id` (a create ignores any id the client sent).
    pub fn clear_id(&mut self) {
        if let Value::Object(map) = &mut self.value {
            map.remove("id");
        }
    }

    /// Canonical bytes of the resource: keys sorted (serde_json's map is ordered), no whitespace.
    /// The content hash is taken over these.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.value).unwrap_or_default()
    }

    pub fn into_value(self) -> Value {
        self.value
    }
}
