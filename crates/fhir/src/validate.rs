//! The validator: the only way to turn untrusted bytes into a [`ValidatedResource`] or
//! [`ValidatedBundle`], or else a [`Rejection`] carrying the `OperationOutcome`.
//!
//! Order, cheapest first: strict JSON ([`crate::json`]), resource type, JSON Schema
//! ([`crate::schema`]), then the UK and FHIR rules ([`crate::rules`]) in one walk. Schema failures
//! are structural (HTTP 400); rule failures are business rules (HTTP 422), as the FHIR RESTful API
//! distinguishes them (<http://hl7.org/fhir/R4/http.html#create>).

use std::str::FromStr;

use serde_json::Value;

use crate::bundle::{self, ValidatedBundle};
use crate::json::{JsonLimits, parse_strict};
use crate::outcome::{Issue, IssueCode, IssueSink, OperationOutcome};
use crate::resource::{ResourceType, ValidatedResource};
use crate::rules::{RuleFacts, RulesConfig, check_resource};
use crate::schema::{SchemaError, SchemaRegistry};

/// What a rejection is, which decides the HTTP status at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionKind {
    /// Not parseable, or not the shape FHIR R4 and our schemas require (400).
    Structure,
    /// Well-formed, but breaks a UK or FHIR business rule (422).
    BusinessRule,
    /// A resource type or interaction caregate does not accept (400, `not-supported`).
    NotSupported,
}

/// Why input was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: RejectionKind,
    pub outcome: OperationOutcome,
}

impl Rejection {
    pub(crate) fn new(kind: RejectionKind, issues: Vec<Issue>) -> Self {
        Self {
            kind,
            outcome: OperationOutcome::new(issues),
        }
    }
}

/// Limits and rule settings for validation.
#[derive(Debug, Clone)]
pub struct ValidatorConfig {
    pub json: JsonLimits,
    pub rules: RulesConfig,
    /// Maximum entries in one Bundle.
    pub max_bundle_entries: usize,
    /// Maximum issues reported for one request.
    pub max_issues: usize,
}

impl Default for ValidatorConfig {
    fn default() -> Self {
        Self {
            json: JsonLimits::default(),
            rules: RulesConfig::default(),
            max_bundle_entries: 1_000,
            max_issues: IssueSink::DEFAULT_LIMIT,
        }
    }
}

/// A submission after validation: one resource, or a Bundle.
#[derive(Debug, Clone)]
pub enum Validated {
    Resource(ValidatedResource),
    Bundle(ValidatedBundle),
}

/// Validates submissions. Build once (schemas are compiled here) and share.
#[derive(Debug)]
pub struct Validator {
    schemas: SchemaRegistry,
    config: ValidatorConfig,
}

impl Validator {
    pub fn new(config: ValidatorConfig) -> Result<Self, SchemaError> {
        Ok(Self {
            schemas: SchemaRegistry::builtin()?,
            config,
        })
    }

    pub fn config(&self) -> &ValidatorConfig {
        &self.config
    }

    pub(crate) fn schemas(&self) -> &SchemaRegistry {
        &self.schemas
    }

    /// Parse bytes strictly.
    pub fn parse(&self, bytes: &[u8]) -> Result<Value, Rejection> {
        parse_strict(bytes, &self.config.json)
            .map_err(|issue| Rejection::new(RejectionKind::Structure, vec![issue]))
    }

    /// Validate bytes as a submission. `expected` is the type named by the URL, if any.
    pub fn validate_bytes(
        &self,
        bytes: &[u8],
        expected: Option<ResourceType>,
    ) -> Result<Validated, Rejection> {
        let value = self.parse(bytes)?;
        self.validate_value(value, expected)
    }

    /// Validate a parsed value as a submission.
    pub fn validate_value(
        &self,
        value: Value,
        expected: Option<ResourceType>,
    ) -> Result<Validated, Rejection> {
        let resource_type = self.resource_type_of(&value, "")?;
        if let Some(expected) = expected
            && expected != resource_type
        {
            return Err(Rejection::new(
                RejectionKind::Structure,
                vec![Issue::error(
                    IssueCode::Invalid,
                    format!("{resource_type}.resourceType"),
                    format!("the URL names {expected} but the body is a {resource_type}"),
                )],
            ));
        }
        if resource_type == ResourceType::Bundle {
            bundle::validate_bundle(self, value).map(Validated::Bundle)
        } else {
            self.validate_resource(value, resource_type)
                .map(Validated::Resource)
        }
    }

    /// The supported type named by `value.resourceType`; `path` prefixes expressions.
    pub(crate) fn resource_type_of(
        &self,
        value: &Value,
        path: &str,
    ) -> Result<ResourceType, Rejection> {
        let at = |element: &str| {
            if path.is_empty() {
                element.to_owned()
            } else {
                format!("{path}.{element}")
            }
        };
        let Some(object) = value.as_object() else {
            return Err(Rejection::new(
                RejectionKind::Structure,
                vec![Issue::error(
                    IssueCode::Structure,
                    path,
                    "a FHIR resource must be a JSON object",
                )],
            ));
        };
        match object.get("resourceType") {
            None => Err(Rejection::new(
                RejectionKind::Structure,
                vec![Issue::error(IssueCode::Required, at("resourceType"), "resourceType is required")],
            )),
            Some(Value::String(name)) => ResourceType::from_str(name).map_err(|_| {
                let known = self.schemas_name_is_fhir(name);
                Rejection::new(
                    RejectionKind::NotSupported,
                    vec![Issue::error(
                        IssueCode::NotSupported,
                        at("resourceType"),
                        if known {
                            "this resource type is not accepted by this gateway (see /fhir/metadata)"
                        } else {
                            "unknown resource type (see /fhir/metadata for the accepted types)"
                        },
                    )],
                )
            }),
            Some(_) => Err(Rejection::new(
                RejectionKind::Structure,
                vec![Issue::error(IssueCode::Value, at("resourceType"), "resourceType must be a string")],
            )),
        }
    }

    fn schemas_name_is_fhir(&self, name: &str) -> bool {
        name.chars().next().is_some_and(|c| c.is_ascii_uppercase())
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric())
    }

    /// Validate one non-Bundle resource: schema (and contained resources' schemas), then rules.
    pub fn validate_resource(
        &self,
        value: Value,
        resource_type: ResourceType,
    ) -> Result<ValidatedResource, Rejection> {
        let (resource, facts) = self.validate_resource_with_facts(value, resource_type)?;
        if let Some((_, expression)) = facts.bundle_references.first() {
            return Err(Rejection::new(
                RejectionKind::BusinessRule,
                vec![Issue::error(
                    IssueCode::NotFound,
                    expression.clone(),
                    "a urn: reference can only be resolved inside a Bundle; use Type/id or a logical identifier",
                )],
            ));
        }
        Ok(resource)
    }

    /// As [`Self::validate_resource`], also returning the rule facts (urn references are left for
    /// the Bundle validator to resolve).
    pub(crate) fn validate_resource_with_facts(
        &self,
        mut value: Value,
        resource_type: ResourceType,
    ) -> Result<(ValidatedResource, RuleFacts), Rejection> {
        let mut sink = IssueSink::new(self.config.max_issues);
        self.schemas.validate(resource_type, &value, &mut sink);
        if let Some(Value::Array(contained)) = value.get("contained") {
            for (index, inner) in contained.iter().enumerate() {
                if sink.is_full() {
                    break;
                }
                let Some(name) = inner.get("resourceType").and_then(Value::as_str) else {
                    continue;
                };
                if name == "Bundle" {
                    sink.push(Issue::error(
                        IssueCode::Structure,
                        format!("{resource_type}.contained[{index}]"),
                        "a Bundle cannot be a contained resource",
                    ));
                    continue;
                }
                let mut inner_sink = IssueSink::new(self.config.max_issues);
                if self.schemas.validate_by_name(name, inner, &mut inner_sink) {
                    let prefix = format!("{resource_type}.contained[{index}]");
                    for issue in inner_sink.finish() {
                        if issue.code != IssueCode::TooCostly {
                            sink.push(issue.rebased(&prefix));
                        }
                    }
                }
            }
        }
        if !sink.is_empty() {
            return Err(Rejection::new(RejectionKind::Structure, sink.finish()));
        }
        let facts = check_resource(
            &mut value,
            resource_type.as_str(),
            &self.config.rules,
            &mut sink,
        );
        if !sink.is_empty() {
            return Err(Rejection::new(RejectionKind::BusinessRule, sink.finish()));
        }
        let resource = ValidatedResource {
            resource_type,
            value,
            nhs_number: facts.nhs_number.clone(),
            identifiers: facts.identifiers.clone(),
        };
        Ok((resource, facts))
    }
}
