//! Bundles (<http://hl7.org/fhir/R4/bundle.html>, <http://hl7.org/fhir/R4/http.html#transaction>).
//!
//! - `transaction` and `batch`: each entry is a request (`POST Type` or `PUT Type/id`) validated
//!   on its own; a transaction is all-or-nothing, a batch answers entry by entry.
//! - `message`, `document`, `collection`: the Bundle is one record, stored whole; every entry is
//!   validated (the leading `MessageHeader` or `Composition` gets the rules walk only, since
//!   caregate does not accept those types on their own).
//!
//! `urn:uuid:` references must resolve to an entry's `fullUrl` in the same Bundle; in a
//! transaction they are rewritten to the ids assigned on commit.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use serde_json::Value;

use crate::outcome::{Issue, IssueCode, IssueSink};
use crate::resource::{ResourceType, ValidatedResource};
use crate::rules::check_resource;
use crate::validate::{Rejection, RejectionKind, Validator};

/// `Bundle.type` values caregate handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleType {
    Transaction,
    Batch,
    Message,
    Document,
    Collection,
}

impl BundleType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transaction => "transaction",
            Self::Batch => "batch",
            Self::Message => "message",
            Self::Document => "document",
            Self::Collection => "collection",
        }
    }

    /// True for the types whose entries are requests processed one by one.
    pub fn is_request_bundle(self) -> bool {
        matches!(self, Self::Transaction | Self::Batch)
    }
}

/// `Bundle.entry.request.method` values caregate accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Post,
    Put,
}

/// A parsed `Bundle.entry.request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRequest {
    pub method: Method,
    pub resource_type: ResourceType,
    /// The id in `PUT Type/id`.
    pub id: Option<String>,
    /// `request.ifNoneExist` (conditional create), e.g. `identifier=system|value`.
    pub if_none_exist: Option<String>,
    /// `request.ifMatch` (version-aware update), e.g. `W/"3"`.
    pub if_match: Option<String>,
}

/// One entry of a request Bundle after validation.
#[derive(Debug, Clone)]
pub struct ValidatedEntry {
    pub full_url: Option<String>,
    pub request: Option<EntryRequest>,
    /// The validated resource, or this entry's own outcome (batch entries fail independently).
    pub result: Result<ValidatedResource, Rejection>,
}

/// A Bundle after validation.
#[derive(Debug, Clone)]
pub enum ValidatedBundle {
    /// `transaction` or `batch`: entries to process as requests.
    Requests {
        bundle_type: BundleType,
        entries: Vec<ValidatedEntry>,
    },
    /// `message`, `document` or `collection`: one record, stored whole.
    Stored {
        bundle_type: BundleType,
        resource: ValidatedResource,
    },
}

fn reject(kind: RejectionKind, issue: Issue) -> Rejection {
    Rejection::new(kind, vec![issue])
}

pub(crate) fn validate_bundle(
    validator: &Validator,
    value: Value,
) -> Result<ValidatedBundle, Rejection> {
    let config = validator.config();
    // The Bundle's own shape first (its entries' resources are checked one by one below).
    let mut sink = IssueSink::new(config.max_issues);
    validator
        .schemas()
        .validate(ResourceType::Bundle, &value, &mut sink);
    if !sink.is_empty() {
        return Err(Rejection::new(RejectionKind::Structure, sink.finish()));
    }
    let bundle_type = match value.get("type").and_then(Value::as_str) {
        Some("transaction") => BundleType::Transaction,
        Some("batch") => BundleType::Batch,
        Some("message") => BundleType::Message,
        Some("document") => BundleType::Document,
        Some("collection") => BundleType::Collection,
        _ => {
            return Err(reject(
                RejectionKind::NotSupported,
                Issue::error(
                    IssueCode::NotSupported,
                    "Bundle.type",
                    "accepted Bundle types are transaction, batch, message, document and collection",
                ),
            ));
        }
    };
    let entries = value
        .get("entry")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if entries.len() > config.max_bundle_entries {
        return Err(reject(
            RejectionKind::Structure,
            Issue::error(
                IssueCode::TooCostly,
                "Bundle.entry",
                format!(
                    "a Bundle may have at most {} entries",
                    config.max_bundle_entries
                ),
            ),
        ));
    }
    if bundle_type.is_request_bundle() {
        validate_request_bundle(validator, bundle_type, value)
    } else {
        validate_stored_bundle(validator, bundle_type, value)
    }
}

fn validate_request_bundle(
    validator: &Validator,
    bundle_type: BundleType,
    value: Value,
) -> Result<ValidatedBundle, Rejection> {
    let Value::Object(mut bundle) = value else {
        return Err(reject(
            RejectionKind::Structure,
            Issue::request(IssueCode::Structure, "Bundle must be an object"),
        ));
    };
    let entries = match bundle.remove("entry") {
        Some(Value::Array(entries)) => entries,
        _ => Vec::new(),
    };
    let full_urls: HashSet<String> = entries
        .iter()
        .filter_map(|e| e.get("fullUrl").and_then(Value::as_str).map(str::to_owned))
        .collect();
    let mut validated = Vec::with_capacity(entries.len());
    for (index, mut entry) in entries.into_iter().enumerate() {
        let prefix = format!("Bundle.entry[{index}]");
        let full_url = entry
            .get("fullUrl")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let request = parse_request(entry.get("request"), &prefix);
        let resource = entry.as_object_mut().and_then(|e| e.remove("resource"));
        let result = match (request, resource) {
            (Err(rejection), _) => Err(rejection),
            (Ok(_), None) => Err(reject(
                RejectionKind::Structure,
                Issue::error(
                    IssueCode::Required,
                    format!("{prefix}.resource"),
                    "POST and PUT entries need a resource",
                ),
            )),
            (Ok(request), Some(resource)) => {
                let checked =
                    validate_entry_resource(validator, resource, &request, &prefix, &full_urls);
                validated.push(ValidatedEntry {
                    full_url,
                    request: Some(request),
                    result: checked,
                });
                continue;
            }
        };
        validated.push(ValidatedEntry {
            full_url,
            request: None,
            result,
        });
    }
    if bundle_type == BundleType::Transaction {
        // All-or-nothing: every entry's issues together, or none.
        let mut sink = IssueSink::new(validator.config().max_issues);
        let mut kind = RejectionKind::BusinessRule;
        for entry in &validated {
            if let Err(rejection) = &entry.result {
                if rejection.kind != RejectionKind::BusinessRule {
                    kind = RejectionKind::Structure;
                }
                for issue in &rejection.outcome.issues {
                    sink.push(issue.clone());
                }
            }
        }
        if !sink.is_empty() {
            return Err(Rejection::new(kind, sink.finish()));
        }
    }
    Ok(ValidatedBundle::Requests {
        bundle_type,
        entries: validated,
    })
}

fn validate_entry_resource(
    validator: &Validator,
    resource: Value,
    request: &EntryRequest,
    prefix: &str,
    full_urls: &HashSet<String>,
) -> Result<ValidatedResource, Rejection> {
    let rebase = |mut rejection: Rejection| {
        rejection.outcome.issues = rejection
            .outcome
            .issues
            .into_iter()
            .map(|i| i.rebased(&format!("{prefix}.resource")))
            .collect();
        rejection
    };
    let resource_type = validator.resource_type_of(&resource, &format!("{prefix}.resource"))?;
    if resource_type == ResourceType::Bundle {
        return Err(reject(
            RejectionKind::NotSupported,
            Issue::error(
                IssueCode::NotSupported,
                format!("{prefix}.resource"),
                "a Bundle entry cannot itself be a Bundle",
            ),
        ));
    }
    if resource_type != request.resource_type {
        return Err(reject(
            RejectionKind::Structure,
            Issue::error(
                IssueCode::Invalid,
                format!("{prefix}.request.url"),
                format!(
                    "request.url names {} but the resource is a {resource_type}",
                    request.resource_type
                ),
            ),
        ));
    }
    if let (Method::Put, Some(id)) = (request.method, &request.id)
        && resource.get("id").and_then(Value::as_str) != Some(id.as_str())
    {
        return Err(reject(
            RejectionKind::Structure,
            Issue::error(
                IssueCode::Invalid,
                format!("{prefix}.resource.id"),
                "for PUT, resource.id must equal the id in request.url",
            ),
        ));
    }
    let (resource, facts) = validator
        .validate_resource_with_facts(resource, resource_type)
        .map_err(rebase)?;
    for (reference, expression) in &facts.bundle_references {
        if !full_urls.contains(reference) {
            let issue = Issue::error(
                IssueCode::NotFound,
                expression.clone(),
                "urn: reference does not match the fullUrl of any entry in this Bundle",
            )
            .rebased(&format!("{prefix}.resource"));
            return Err(Rejection::new(RejectionKind::BusinessRule, vec![issue]));
        }
    }
    Ok(resource)
}

/// Parse `Bundle.entry.request` of a transaction or batch entry.
fn parse_request(request: Option<&Value>, prefix: &str) -> Result<EntryRequest, Rejection> {
    let Some(request) = request else {
        return Err(reject(
            RejectionKind::Structure,
            Issue::error(
                IssueCode::Required,
                format!("{prefix}.request"),
                "transaction and batch entries need a request",
            ),
        ));
    };
    let method = match request.get("method").and_then(Value::as_str) {
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        _ => {
            return Err(reject(
                RejectionKind::NotSupported,
                Issue::error(
                    IssueCode::NotSupported,
                    format!("{prefix}.request.method"),
                    "only POST (create) and PUT (update) entries are accepted",
                ),
            ));
        }
    };
    let url = request.get("url").and_then(Value::as_str).unwrap_or("");
    let url_error = |message: &str| {
        reject(
            RejectionKind::Structure,
            Issue::error(IssueCode::Value, format!("{prefix}.request.url"), message),
        )
    };
    if url.contains('?') {
        return Err(reject(
            RejectionKind::NotSupported,
            Issue::error(
                IssueCode::NotSupported,
                format!("{prefix}.request.url"),
                "conditional URLs are not supported; use request.ifNoneExist",
            ),
        ));
    }
    let mut parts = url.split('/');
    let type_name = parts.next().unwrap_or("");
    let id = parts.next().map(str::to_owned);
    if parts.next().is_some() {
        return Err(url_error(
            "request.url must be `Type` (POST) or `Type/id` (PUT)",
        ));
    }
    let resource_type = ResourceType::from_str(type_name).map_err(|_| {
        reject(
            RejectionKind::NotSupported,
            Issue::error(
                IssueCode::NotSupported,
                format!("{prefix}.request.url"),
                "resource type in request.url is not accepted by this gateway",
            ),
        )
    })?;
    match (method, &id) {
        (Method::Post, Some(_)) => {
            return Err(url_error("POST entries name only the type: `Type`"));
        }
        (Method::Put, None) => return Err(url_error("PUT entries name the resource: `Type/id`")),
        (Method::Put, Some(id)) if !is_fhir_id(id) => {
            return Err(url_error("the id in request.url is not a valid FHIR id"));
        }
        _ => {}
    }
    let text = |name: &str| request.get(name).and_then(Value::as_str).map(str::to_owned);
    Ok(EntryRequest {
        method,
        resource_type,
        id,
        if_none_exist: text("ifNoneExist"),
        if_match: text("ifMatch"),
    })
}

/// FHIR `id`: 1-64 of `[A-Za-z0-9\-\.]` (<http://hl7.org/fhir/R4/datatypes.html#id>).
pub fn is_fhir_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn validate_stored_bundle(
    validator: &Validator,
    bundle_type: BundleType,
    mut value: Value,
) -> Result<ValidatedBundle, Rejection> {
    let config = validator.config();
    let mut sink = IssueSink::new(config.max_issues);
    let mut structural = false;
    let full_urls: HashSet<String> = value
        .get("entry")
        .and_then(Value::as_array)
        .map(|entries| {
            entries
                .iter()
                .filter_map(|e| e.get("fullUrl").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut nhs_number = None;
    let header = match bundle_type {
        BundleType::Message => Some("MessageHeader"),
        BundleType::Document => Some("Composition"),
        _ => None,
    };
    if let Some(Value::Array(entries)) = value.get_mut("entry") {
        if let Some(header) = header
            && entries
                .first()
                .and_then(|e| e.get("resource"))
                .and_then(|r| r.get("resourceType"))
                .and_then(Value::as_str)
                != Some(header)
        {
            sink.push(Issue::error(
                IssueCode::Structure,
                "Bundle.entry[0].resource",
                format!(
                    "a {} Bundle must start with a {header}",
                    bundle_type.as_str()
                ),
            ));
            structural = true;
        }
        for (index, entry) in entries.iter_mut().enumerate() {
            if sink.is_full() {
                break;
            }
            let prefix = format!("Bundle.entry[{index}].resource");
            let Some(resource) = entry.get_mut("resource") else {
                continue;
            };
            let name = resource
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if index == 0 && header == Some(name.as_str()) {
                // Not a type we accept on its own: FHIR JSON and UK rules only.
                let mut inner = IssueSink::new(config.max_issues);
                let facts = check_resource(resource, &name, &config.rules, &mut inner);
                push_rebased(&mut sink, inner, &prefix);
                check_urns(&facts.bundle_references, &full_urls, &prefix, &mut sink);
                continue;
            }
            match validator.resource_type_of(resource, &prefix) {
                Ok(ResourceType::Bundle) => {
                    sink.push(Issue::error(
                        IssueCode::NotSupported,
                        prefix.clone(),
                        "a Bundle entry cannot itself be a Bundle",
                    ));
                }
                Ok(resource_type) => {
                    match validator.validate_resource_with_facts(resource.take(), resource_type) {
                        Ok((validated, facts)) => {
                            check_urns(&facts.bundle_references, &full_urls, &prefix, &mut sink);
                            if nhs_number.is_none() {
                                nhs_number = validated.nhs_number.clone();
                            }
                            *resource = validated.value;
                        }
                        Err(rejection) => {
                            structural |= rejection.kind != RejectionKind::BusinessRule;
                            for issue in rejection.outcome.issues {
                                sink.push(issue.rebased(&prefix));
                            }
                        }
                    }
                }
                Err(rejection) => {
                    structural = true;
                    for issue in rejection.outcome.issues {
                        sink.push(issue);
                    }
                }
            }
        }
    }
    if !sink.is_empty() {
        let kind = if structural {
            RejectionKind::Structure
        } else {
            RejectionKind::BusinessRule
        };
        return Err(Rejection::new(kind, sink.finish()));
    }
    let identifiers = match value.get("identifier") {
        Some(identifier) => token_of(identifier).into_iter().collect(),
        None => Vec::new(),
    };
    Ok(ValidatedBundle::Stored {
        bundle_type,
        resource: ValidatedResource {
            resource_type: ResourceType::Bundle,
            value,
            nhs_number,
            identifiers,
        },
    })
}

fn push_rebased(sink: &mut IssueSink, inner: IssueSink, prefix: &str) {
    for issue in inner.finish() {
        if issue.code != IssueCode::TooCostly {
            sink.push(issue.rebased(prefix));
        }
    }
}

fn check_urns(
    references: &[(String, String)],
    full_urls: &HashSet<String>,
    prefix: &str,
    sink: &mut IssueSink,
) {
    for (reference, expression) in references {
        if !full_urls.contains(reference) {
            sink.push(
                Issue::error(
                    IssueCode::NotFound,
                    expression.clone(),
                    "urn: reference does not match the fullUrl of any entry in this Bundle",
                )
                .rebased(prefix),
            );
        }
    }
}

fn token_of(identifier: &Value) -> Option<String> {
    let system = identifier.get("system").and_then(Value::as_str)?;
    let value = identifier.get("value").and_then(Value::as_str)?;
    Some(format!("{system}|{value}"))
}

impl ValidatedResource {
    /// Rewrite every `reference` that is a key of `map` (e.g. `urn:uuid:…` → `Patient/abc`), as a
    /// transaction's commit requires.
    pub fn rewrite_references(&mut self, map: &HashMap<String, String>) {
        fn walk(value: &mut Value, map: &HashMap<String, String>) {
            match value {
                Value::Object(object) => {
                    for (key, child) in object.iter_mut() {
                        if key == "reference"
                            && let Value::String(reference) = child
                            && let Some(target) = map.get(reference.as_str())
                        {
                            *reference = target.clone();
                        } else {
                            walk(child, map);
                        }
                    }
                }
                Value::Array(items) => items.iter_mut().for_each(|item| walk(item, map)),
                _ => {}
            }
        }
        walk(&mut self.value, map);
    }
}
