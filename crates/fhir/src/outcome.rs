//! `OperationOutcome`: how caregate tells a partner what went wrong and where.
//!
//! Every issue carries a `severity`, a `code` from the closed FHIR IssueType value set
//! (<http://hl7.org/fhir/R4/valueset-issue-type.html>) and, where the fault has a location, a FHIRPath
//! `expression` such as `Patient.identifier[0].value`
//! (<http://hl7.org/fhir/R4/operationoutcome-definitions.html#OperationOutcome.issue.expression>).
//!
//! Diagnostics are written for the submitting partner: they name the rule and the location, never echo
//! a patient identifier back (an outcome may be logged or forwarded).

use serde::Serialize;
use serde_json::{Value, json};

/// `OperationOutcome.issue.severity` (<http://hl7.org/fhir/R4/valueset-issue-severity.html>).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

/// The subset of `OperationOutcome.issue.code` (FHIR IssueType) that caregate emits. Closed on
/// purpose: adding a code is a visible API change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IssueCode {
    Invalid,
    Structure,
    Required,
    Value,
    Invariant,
    Security,
    Login,
    Expired,
    Forbidden,
    Processing,
    NotSupported,
    Duplicate,
    NotFound,
    TooLong,
    CodeInvalid,
    BusinessRule,
    Conflict,
    Transient,
    Exception,
    Timeout,
    Throttled,
    TooCostly,
    Informational,
}

impl IssueCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Structure => "structure",
            Self::Required => "required",
            Self::Value => "value",
            Self::Invariant => "invariant",
            Self::Security => "security",
            Self::Login => "login",
            Self::Expired => "expired",
            Self::Forbidden => "forbidden",
            Self::Processing => "processing",
            Self::NotSupported => "not-supported",
            Self::Duplicate => "duplicate",
            Self::NotFound => "not-found",
            Self::TooLong => "too-long",
            Self::CodeInvalid => "code-invalid",
            Self::BusinessRule => "business-rule",
            Self::Conflict => "conflict",
            Self::Transient => "transient",
            Self::Exception => "exception",
            Self::Timeout => "timeout",
            Self::Throttled => "throttled",
            Self::TooCostly => "too-costly",
            Self::Informational => "informational",
        }
    }
}

/// One `OperationOutcome.issue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: Severity,
    pub code: IssueCode,
    /// Human-readable detail for the partner's integration engineer. Never contains patient data.
    pub diagnostics: String,
    /// FHIRPath locations of the fault; empty when the fault is the whole request.
    pub expression: Vec<String>,
}

impl Issue {
    /// An error-severity issue at `expression`.
    pub fn error(
        code: IssueCode,
        expression: impl Into<String>,
        diagnostics: impl Into<String>,
    ) -> Self {
        let expression = expression.into();
        Self {
            severity: Severity::Error,
            code,
            diagnostics: diagnostics.into(),
            expression: if expression.is_empty() {
                Vec::new()
            } else {
                vec![expression]
            },
        }
    }

    /// An error-severity issue about the request as a whole (no location).
    pub fn request(code: IssueCode, diagnostics: impl Into<String>) -> Self {
        Self::error(code, "", diagnostics)
    }

    /// An informational issue, used for success outcomes.
    pub fn information(diagnostics: impl Into<String>) -> Self {
        Self {
            severity: Severity::Information,
            code: IssueCode::Informational,
            diagnostics: diagnostics.into(),
            expression: Vec::new(),
        }
    }

    /// The same issue with every expression prefixed, used when a resource is validated inside a
    /// Bundle entry: `Patient.id` becomes `Bundle.entry[3].resource.ofType(Patient).id`.
    pub fn rebased(mut self, prefix: &str) -> Self {
        for expression in &mut self.expression {
            *expression = rebase_expression(prefix, expression);
        }
        self
    }

    /// This issue as FHIR JSON.
    pub fn to_json(&self) -> Value {
        let mut issue = json!({
            "severity": self.severity,
            "code": self.code.as_str(),
        });
        if !self.diagnostics.is_empty() {
            issue["diagnostics"] = Value::String(self.diagnostics.clone());
        }
        if !self.expression.is_empty() {
            issue["expression"] = json!(self.expression);
        }
        issue
    }
}

/// Rebase `Type.rest` onto `prefix` (which already ends in the resource, e.g.
/// `Bundle.entry[0].resource`): the type name becomes `ofType(Type)` as FHIRPath requires.
fn rebase_expression(prefix: &str, expression: &str) -> String {
    match expression.split_once('.') {
        Some((root, rest)) if starts_upper(root) => format!("{prefix}.ofType({root}).{rest}"),
        None if starts_upper(expression) => format!("{prefix}.ofType({expression})"),
        _ => format!("{prefix}.{expression}"),
    }
}

fn starts_upper(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_uppercase())
}

/// A FHIR `OperationOutcome` resource.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OperationOutcome {
    pub issues: Vec<Issue>,
}

impl OperationOutcome {
    pub fn new(issues: Vec<Issue>) -> Self {
        Self { issues }
    }

    /// An outcome with one issue.
    pub fn single(issue: Issue) -> Self {
        Self {
            issues: vec![issue],
        }
    }

    /// True when any issue is an error or fatal.
    pub fn has_errors(&self) -> bool {
        self.issues
            .iter()
            .any(|i| matches!(i.severity, Severity::Error | Severity::Fatal))
    }

    /// The outcome as a FHIR resource.
    pub fn to_json(&self) -> Value {
        let issues: Vec<Value> = if self.issues.is_empty() {
            // FHIR requires at least one issue (OperationOutcome.issue 1..*).
            vec![Issue::information("All OK").to_json()]
        } else {
            self.issues.iter().map(Issue::to_json).collect()
        };
        json!({ "resourceType": "OperationOutcome", "issue": issues })
    }
}

impl From<Issue> for OperationOutcome {
    fn from(issue: Issue) -> Self {
        Self::single(issue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebases_expressions_into_bundle_entries() {
        let issue = Issue::error(IssueCode::Value, "Patient.identifier[0].value", "bad")
            .rebased("Bundle.entry[2].resource");
        assert_eq!(
            issue.expression,
            vec!["Bundle.entry[2].resource.ofType(Patient).identifier[0].value"]
        );
    }

    #[test]
    fn empty_outcome_still_has_one_issue() {
        let json = OperationOutcome::default().to_json();
        assert_eq!(json["issue"][0]["code"], "informational");
    }

    #[test]
    fn issue_json_carries_severity_code_and_expression() {
        let json = Issue::error(IssueCode::Required, "Patient.gender", "missing").to_json();
        assert_eq!(
            json,
            json!({"severity":"error","code":"required","diagnostics":"missing","expression":["Patient.gender"]})
        );
    }
}

/// Collects issues up to a bound, so invalid input costs about as much as valid input: once
/// `limit` issues are held, further ones are counted, not stored, and [`IssueSink::finish`] adds
/// one `too-costly` issue saying how many were left out.
#[derive(Debug)]
pub struct IssueSink {
    issues: Vec<Issue>,
    limit: usize,
    dropped: usize,
}

impl IssueSink {
    /// Default bound on issues reported for one request.
    pub const DEFAULT_LIMIT: usize = 32;

    pub fn new(limit: usize) -> Self {
        Self {
            issues: Vec::new(),
            limit: limit.max(1),
            dropped: 0,
        }
    }

    pub fn push(&mut self, issue: Issue) {
        if self.issues.len() < self.limit {
            self.issues.push(issue);
        } else {
            self.dropped += 1;
        }
    }

    /// True once the bound is reached: callers may stop walking.
    pub fn is_full(&self) -> bool {
        self.issues.len() >= self.limit
    }

    pub fn is_empty(&self) -> bool {
        self.issues.is_empty()
    }

    pub fn len(&self) -> usize {
        self.issues.len()
    }

    /// The issues collected, with a closing note if any were dropped.
    pub fn finish(mut self) -> Vec<Issue> {
        if self.dropped > 0 || self.is_full() {
            self.issues.push(Issue {
                severity: Severity::Error,
                code: IssueCode::TooCostly,
                diagnostics: format!(
                    "validation stopped after {} issues; {} more were not reported",
                    self.limit, self.dropped
                ),
                expression: Vec::new(),
            });
        }
        self.issues
    }
}

impl Default for IssueSink {
    fn default() -> Self {
        Self::new(Self::DEFAULT_LIMIT)
    }
}
