//! caregate's own JSON Schemas for the FHIR R4 resources it accepts, compiled once into a
//! [`SchemaRegistry`], and the mapping of schema failures to `OperationOutcome` issues.
//!
//! The schemas live in `schemas/` at the workspace root (one `<Type>.schema.json` per
//! [`ResourceType`] plus the shared `datatypes.schema.json`) and are compiled into the binary with
//! `include_str!`, so validation needs no file or network access. They are written for caregate from
//! the FHIR R4 (4.0.1) element definitions, with closed content: an element the specification does
//! not define is an error, as in strict R4 parsers.
//!
//! Architecture invariant: a diagnostic built here never contains the instance value (it may be an
//! NHS number or a name). Messages are made from the kind of failure and facts of the schema only:
//! element names, expected types, allowed codes.

use std::collections::HashMap;
use std::str::FromStr;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::paths::{Location, LocationSegment};
use jsonschema::{Draft, PatternCache, PatternOptions, Registry, ValidationError, Validator};
use serde_json::Value;

use crate::outcome::{Issue, IssueCode, IssueSink};
use crate::resource::ResourceType;

/// The base URI every schema's `$id` is under. `.invalid` (RFC 2606) so it can never be fetched.
const SCHEMA_BASE: &str = "https://caregate.invalid/schemas/r4/";

/// File name and text of the shared data type definitions.
const DATATYPES: (&str, &str) = (
    "datatypes.schema.json",
    include_str!("../../../schemas/datatypes.schema.json"),
);

/// At most this many allowed codes are listed in an "expected one of" diagnostic.
const MAX_LISTED_CODES: usize = 24;

/// File name and text of the schema for `resource_type`. A `match` so that adding a
/// [`ResourceType`] without a schema fails to compile.
fn schema_source(resource_type: ResourceType) -> (&'static str, &'static str) {
    macro_rules! schema {
        ($name:literal) => {
            (
                concat!($name, ".schema.json"),
                include_str!(concat!("../../../schemas/", $name, ".schema.json")),
            )
        };
    }
    match resource_type {
        ResourceType::Patient => schema!("Patient"),
        ResourceType::RelatedPerson => schema!("RelatedPerson"),
        ResourceType::Encounter => schema!("Encounter"),
        ResourceType::EpisodeOfCare => schema!("EpisodeOfCare"),
        ResourceType::Observation => schema!("Observation"),
        ResourceType::Condition => schema!("Condition"),
        ResourceType::Procedure => schema!("Procedure"),
        ResourceType::AllergyIntolerance => schema!("AllergyIntolerance"),
        ResourceType::MedicationRequest => schema!("MedicationRequest"),
        ResourceType::MedicationDispense => schema!("MedicationDispense"),
        ResourceType::MedicationStatement => schema!("MedicationStatement"),
        ResourceType::Immunization => schema!("Immunization"),
        ResourceType::DiagnosticReport => schema!("DiagnosticReport"),
        ResourceType::DocumentReference => schema!("DocumentReference"),
        ResourceType::CarePlan => schema!("CarePlan"),
        ResourceType::ServiceRequest => schema!("ServiceRequest"),
        ResourceType::Flag => schema!("Flag"),
        ResourceType::Consent => schema!("Consent"),
        ResourceType::Bundle => schema!("Bundle"),
    }
}

/// A schema file that failed to load or compile. Only possible if a schema in `schemas/` is
/// broken, which the unit tests catch; the file is named so the fault is quick to find.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schema {file} is not valid JSON")]
    Json {
        file: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("schema {file} has no string $id")]
    MissingId { file: &'static str },
    #[error("schema {file} could not be registered: {message}")]
    Register { file: &'static str, message: String },
    #[error("schema {file} did not compile: {message}")]
    Compile { file: &'static str, message: String },
}

/// Every resource schema, compiled once. Cheap to share (`Arc` it); validation takes `&self`.
pub struct SchemaRegistry {
    validators: HashMap<ResourceType, Validator>,
    /// The schema documents by `$id`, kept to explain failures (which primitive a pattern belongs
    /// to, which choice element a `oneOf` stands for).
    documents: HashMap<String, Value>,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("resource_types", &self.validators.len())
            .finish_non_exhaustive()
    }
}

impl SchemaRegistry {
    /// Compile the schemas built into the binary.
    pub fn builtin() -> Result<SchemaRegistry, SchemaError> {
        let (datatypes_file, datatypes_text) = DATATYPES;
        let datatypes = parse_schema(datatypes_file, datatypes_text)?;
        let datatypes_id = schema_id(datatypes_file, &datatypes)?;
        let registry = Registry::new()
            .add(&datatypes_id, datatypes.clone())
            .and_then(|builder| builder.prepare())
            .map_err(|e| SchemaError::Register {
                file: datatypes_file,
                message: e.to_string(),
            })?;
        // One cache so each FHIR primitive's pattern compiles once, not once per resource type.
        let patterns = PatternCache::new();

        let mut validators = HashMap::with_capacity(ResourceType::ALL.len());
        let mut documents = HashMap::with_capacity(ResourceType::ALL.len() + 1);
        for &resource_type in ResourceType::ALL {
            let (file, text) = schema_source(resource_type);
            let schema = parse_schema(file, text)?;
            let id = schema_id(file, &schema)?;
            let validator = jsonschema::options()
                .with_draft(Draft::Draft202012)
                .with_registry(&registry)
                // Linear-time matching: the FHIR primitive patterns need no backtracking.
                .with_pattern_options(PatternOptions::regex())
                .with_pattern_cache(patterns.clone())
                .should_validate_formats(false)
                .build(&schema)
                .map_err(|e| SchemaError::Compile {
                    file,
                    message: e.to_string(),
                })?;
            validators.insert(resource_type, validator);
            documents.insert(id, schema);
        }
        documents.insert(datatypes_id, datatypes);
        Ok(SchemaRegistry {
            validators,
            documents,
        })
    }

    /// Validate `value` against the schema of `resource_type`, pushing one issue per fault into
    /// `sink` (until it is full). Expressions are rooted at the resource type:
    /// `Patient.identifier[0].value`.
    pub fn validate(&self, resource_type: ResourceType, value: &Value, sink: &mut IssueSink) {
        let Some(validator) = self.validators.get(&resource_type) else {
            // Unreachable: `builtin` compiles a schema for every type.
            sink.push(Issue::request(
                IssueCode::Exception,
                "no schema is available for this resource type",
            ));
            return;
        };
        // Fast path: a valid resource costs one walk and no allocation for errors.
        if validator.is_valid(value) {
            return;
        }
        let root = resource_type.as_str();
        for error in validator.iter_errors(value) {
            if sink.is_full() {
                break;
            }
            self.report(root, &error, sink);
        }
    }

    /// As [`SchemaRegistry::validate`], by FHIR type name. Returns false (and pushes nothing) when
    /// caregate has no schema for `type_name`.
    pub fn validate_by_name(&self, type_name: &str, value: &Value, sink: &mut IssueSink) -> bool {
        match ResourceType::from_str(type_name) {
            Ok(resource_type) => {
                self.validate(resource_type, value, sink);
                true
            }
            Err(_) => false,
        }
    }

    /// Turn one schema failure into issues. Never reads the failing value.
    fn report(&self, root: &str, error: &ValidationError<'_>, sink: &mut IssueSink) {
        let path = fhir_path(root, error.instance_path());
        match error.kind() {
            ValidationErrorKind::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                sink.push(Issue::error(
                    IssueCode::Required,
                    format!("{path}.{name}"),
                    format!("missing required element '{name}'"),
                ));
            }
            ValidationErrorKind::AdditionalProperties { unexpected }
            | ValidationErrorKind::UnevaluatedProperties { unexpected } => {
                for name in unexpected {
                    if sink.is_full() {
                        return;
                    }
                    sink.push(unknown_element(&path, name));
                }
            }
            ValidationErrorKind::Type { kind } => {
                let expected = match kind {
                    TypeKind::Single(json_type) => json_type.as_str().to_owned(),
                    TypeKind::Multiple(types) => types
                        .iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(" or "),
                };
                let message = match self.datatype_of(error) {
                    Some(datatype) => format!("expected FHIR {datatype} (a JSON {expected})"),
                    None => format!("expected a JSON {expected}"),
                };
                sink.push(Issue::error(IssueCode::Value, path, message));
            }
            ValidationErrorKind::Pattern { .. } => {
                let message = match self.datatype_of(error) {
                    Some(datatype) => format!("value does not match the FHIR {datatype} format"),
                    None => "value does not match the required format".to_owned(),
                };
                sink.push(Issue::error(IssueCode::Value, path, message));
            }
            ValidationErrorKind::Format { format } => {
                sink.push(Issue::error(
                    IssueCode::Value,
                    path,
                    format!("value does not match the {format} format"),
                ));
            }
            ValidationErrorKind::Enum { options } => {
                sink.push(Issue::error(
                    IssueCode::Value,
                    path,
                    expected_codes(options),
                ));
            }
            ValidationErrorKind::Constant { expected_value } => {
                let message = match expected_value.as_str() {
                    Some(expected) => format!("expected '{expected}'"),
                    None => "value is not the one this element requires".to_owned(),
                };
                sink.push(Issue::error(IssueCode::Value, path, message));
            }
            ValidationErrorKind::Minimum { limit }
            | ValidationErrorKind::ExclusiveMinimum { limit } => {
                let message = match self.datatype_of(error) {
                    Some(datatype) => format!("value is out of range for FHIR {datatype}"),
                    None => format!("value must not be below {limit}"),
                };
                sink.push(Issue::error(IssueCode::Value, path, message));
            }
            ValidationErrorKind::Maximum { limit }
            | ValidationErrorKind::ExclusiveMaximum { limit } => {
                let message = match self.datatype_of(error) {
                    Some(datatype) => format!("value is out of range for FHIR {datatype}"),
                    None => format!("value must not be above {limit}"),
                };
                sink.push(Issue::error(IssueCode::Value, path, message));
            }
            ValidationErrorKind::MinItems { .. } => {
                sink.push(Issue::error(
                    IssueCode::Invalid,
                    path,
                    "array must not be empty (FHIR JSON omits empty arrays)",
                ));
            }
            ValidationErrorKind::OneOfNotValid { context } => {
                let choice = self.choice_title(error);
                sink.push(missing_choice(&path, choice.as_deref(), context));
            }
            ValidationErrorKind::OneOfMultipleValid { .. } => {
                let message = match self.choice_title(error) {
                    Some(choice) => format!("only one form of {choice} may be present"),
                    None => "more than one alternative form is present".to_owned(),
                };
                sink.push(Issue::error(IssueCode::Invalid, path, message));
            }
            ValidationErrorKind::AnyOf { .. } => {
                sink.push(Issue::error(
                    IssueCode::Invalid,
                    path,
                    "value matches none of the forms allowed here",
                ));
            }
            other => {
                sink.push(Issue::error(
                    IssueCode::Invalid,
                    path,
                    format!("value breaks the schema rule '{}'", keyword_name(other)),
                ));
            }
        }
    }

    /// The schema node an error's keyword sits in, looked up by its absolute keyword location
    /// (`<$id>#/json/pointer/keyword`).
    fn keyword_parent<'s, 'e>(
        &'s self,
        error: &'e ValidationError<'_>,
    ) -> Option<(&'e str, &'e str, &'s Value)> {
        let location = error.absolute_keyword_location()?.as_str();
        let (document, pointer) = location.split_once('#')?;
        let (parent, _keyword) = pointer.rsplit_once('/')?;
        let file = document.strip_prefix(SCHEMA_BASE)?;
        let node = self.documents.get(document)?.pointer(parent)?;
        Some((file, parent, node))
    }

    /// The FHIR data type whose definition raised `error`, if it was one of the shared
    /// definitions (`datatypes.schema.json#/$defs/<Type>/<keyword>`).
    fn datatype_of(&self, error: &ValidationError<'_>) -> Option<String> {
        let (file, parent, _) = self.keyword_parent(error)?;
        if file != DATATYPES.0 {
            return None;
        }
        let name = parent.strip_prefix("/$defs/")?;
        (!name.contains('/')).then(|| name.to_owned())
    }

    /// The `title` of the schema holding a failed `oneOf`: the choice element, e.g. `value[x]`.
    fn choice_title(&self, error: &ValidationError<'_>) -> Option<String> {
        let (_, _, node) = self.keyword_parent(error)?;
        node.get("title")?.as_str().map(str::to_owned)
    }
}

fn parse_schema(file: &'static str, text: &str) -> Result<Value, SchemaError> {
    serde_json::from_str(text).map_err(|source| SchemaError::Json { file, source })
}

fn schema_id(file: &'static str, schema: &Value) -> Result<String, SchemaError> {
    schema
        .get("$id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or(SchemaError::MissingId { file })
}

/// FHIRPath for a JSON Pointer into a resource: `/identifier/0/value` under `Patient` becomes
/// `Patient.identifier[0].value`. A primitive's extension sibling `_birthDate` is reported as the
/// element itself (`Patient.birthDate`), as FHIRPath has no `_` names.
fn fhir_path(root: &str, location: &Location) -> String {
    let mut path = String::with_capacity(root.len() + location.as_str().len() + 8);
    path.push_str(root);
    for segment in location.iter() {
        match segment {
            LocationSegment::Property(name) => {
                path.push('.');
                path.push_str(name.strip_prefix('_').unwrap_or(&name));
            }
            LocationSegment::Index(index) => {
                path.push('[');
                path.push_str(&index.to_string());
                path.push(']');
            }
        }
    }
    path
}

/// One issue for an element the schema does not define. The name is echoed only when it looks like
/// a FHIR element name, so a partner's misplaced data (say, an NHS number used as a key) is never
/// reflected back.
fn unknown_element(path: &str, name: &str) -> Issue {
    let plausible = name.len() <= 64
        && name
            .strip_prefix('_')
            .unwrap_or(name)
            .chars()
            .enumerate()
            .all(|(i, c)| {
                if i == 0 {
                    c.is_ascii_alphabetic()
                } else {
                    c.is_ascii_alphanumeric()
                }
            });
    if plausible && !name.is_empty() {
        Issue::error(
            IssueCode::Structure,
            format!("{path}.{name}"),
            format!("unknown element '{name}'"),
        )
    } else {
        Issue::error(
            IssueCode::Structure,
            path,
            "unknown element whose name is not a valid FHIR element name",
        )
    }
}

/// "expected one of: …" from an `enum` keyword's allowed codes (a schema fact).
fn expected_codes(options: &Value) -> String {
    let codes: Vec<&str> = options
        .as_array()
        .map(|codes| codes.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if codes.is_empty() {
        return "value is not one of the allowed codes".to_owned();
    }
    let mut message = String::from("expected one of: ");
    message.push_str(&codes[..codes.len().min(MAX_LISTED_CODES)].join(", "));
    if codes.len() > MAX_LISTED_CODES {
        message.push_str(", …");
    }
    message
}

/// A failed `oneOf`. For a required choice element (`medication[x]`) every branch fails only by
/// a missing property: that is reported as one `required` issue naming the allowed forms.
fn missing_choice(
    path: &str,
    choice: Option<&str>,
    context: &[Vec<ValidationError<'static>>],
) -> Issue {
    let mut forms = Vec::with_capacity(context.len());
    for branch in context {
        for error in branch {
            match error.kind() {
                ValidationErrorKind::Required { property } => {
                    forms.push(property.as_str().unwrap_or_default());
                }
                _ => {
                    let message = match choice {
                        Some(choice) => {
                            format!("value matches none of the allowed forms of {choice}")
                        }
                        None => "value matches none of the forms allowed here".to_owned(),
                    };
                    return Issue::error(IssueCode::Invalid, path, message);
                }
            }
        }
    }
    let element = choice
        .map(|c| c.trim_end_matches("[x]"))
        .unwrap_or_default();
    let expression = if element.is_empty() {
        path.to_owned()
    } else {
        format!("{path}.{element}")
    };
    Issue::error(
        IssueCode::Required,
        expression,
        format!("missing required element: one of {}", forms.join(", ")),
    )
}

/// The JSON Schema keyword behind an error kind this module has no specific message for.
fn keyword_name(kind: &ValidationErrorKind) -> &'static str {
    match kind {
        ValidationErrorKind::AdditionalItems { .. } => "additionalItems",
        ValidationErrorKind::Contains => "contains",
        ValidationErrorKind::ContentEncoding { .. } | ValidationErrorKind::FromUtf8 { .. } => {
            "contentEncoding"
        }
        ValidationErrorKind::ContentMediaType { .. } => "contentMediaType",
        ValidationErrorKind::FalseSchema => "false",
        ValidationErrorKind::MaxItems { .. } => "maxItems",
        ValidationErrorKind::MaxLength { .. } => "maxLength",
        ValidationErrorKind::MinLength { .. } => "minLength",
        ValidationErrorKind::MaxProperties { .. } => "maxProperties",
        ValidationErrorKind::MinProperties { .. } => "minProperties",
        ValidationErrorKind::MultipleOf { .. } => "multipleOf",
        ValidationErrorKind::Not { .. } => "not",
        ValidationErrorKind::PropertyNames { .. } => "propertyNames",
        ValidationErrorKind::UnevaluatedItems { .. } => "unevaluatedItems",
        ValidationErrorKind::UniqueItems => "uniqueItems",
        _ => "schema evaluation",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fhir_path_indexes_arrays_and_drops_the_primitive_extension_underscore() {
        let location = Location::new().join("name").join(0).join("_given").join(1);
        assert_eq!(fhir_path("Patient", &location), "Patient.name[0].given[1]");
        assert_eq!(fhir_path("Patient", &Location::new()), "Patient");
    }

    #[test]
    fn registry_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<SchemaRegistry>();
    }

    #[test]
    fn unknown_element_names_only_plausible_element_names() {
        assert_eq!(
            unknown_element("Patient", "foo").expression,
            ["Patient.foo"]
        );
        let issue = unknown_element("Patient", "9434765919");
        assert_eq!(issue.expression, ["Patient"]);
        assert!(!issue.diagnostics.contains("9434765919"));
    }
}
