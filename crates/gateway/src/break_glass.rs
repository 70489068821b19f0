//! Break-glass (emergency) access (DOMAIN.md `LR-2`, `POU`): `POST /fhir/Patient/$break-glass`.
//!
//! An emergency clinician's system — an authenticated partner, e.g. an acute trust's A&E — asks
//! for the records caregate holds about one patient that it would not normally receive. The
//! request says why: a purpose of use (v3 ActReason `ETREAT` or `BTG`) and a free-text reason.
//! Every record held for the patient is decided again, now, under the current policy and consent
//! state with a [`BreakGlass`] request naming the caller; only those the policy lets the caller
//! have are returned. Break-glass adds one permit (`LR-2`, where the agreement says
//! `break_glass_permitted`); it lifts no forbid — a dissent (`CONSENT-DISSENT`) or a sensitive
//! code (`SENS-1`) still withholds. The rule ids decide, never this module.
//!
//! **Shape.** A FHIR operation on the Patient type, not on an instance: ids are scoped per
//! partner, so the caller cannot name another partner's `Patient/{id}`; the patient is named by
//! NHS number, the identifier every partner shares. `POST` with a `Parameters` body, because the
//! reason is free text that must not travel in a URL (URLs end up in proxy and access logs):
//!
//! ```json
//! { "resourceType": "Parameters", "parameter": [
//!   { "name": "patient", "valueIdentifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9434765919" } },
//!   { "name": "reason", "valueString": "unconscious in ED, no history available" },
//!   { "name": "purposeOfUse", "valueCoding": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "ETREAT" } } ] }
//! ```
//!
//! The answer is a `searchset` Bundle of the disclosed records (each with `meta.source` naming the
//! submitting partner, as the inbox does); an `OperationOutcome` entry (`search.mode = outcome`)
//! warns when the answer may be incomplete. A patient with no records, or none the caller may
//! have, gives an empty Bundle: a partner whose agreements do not permit break-glass gets nothing,
//! not an error, so the answer does not say whether records exist.
//!
//! **Authorisation.** The token must carry `system/*.rs` (or wider; the SMART v1 `system/*.read`
//! is the same): the records are of any type. The requester is always the token's partner.
//!
//! **Audit.** Each disclosed record is an audited `read` carrying the purpose of use, the policy
//! version, the rule ids that allowed it and the reason; the request itself is one more event
//! with the patient, the purpose and the rules that withheld. Because the purpose is `ETREAT` or
//! `BTG` every one of them lands in the IG officers' review queue (`is_break_glass`), even when
//! nothing was disclosed (an emergency request for a patient with no records is still looked
//! at). All are committed before the response leaves. The reason is kept in the events' `detail`
//! and is never logged; neither is the NHS number.

use std::collections::{BTreeMap, BTreeSet};

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::response::Response;
use axum::routing::post;
use caregate_audit::{Action, AuditEvent, Entity, Outcome};
use caregate_auth::ScopeSet;
use caregate_fhir::identifier::{NHS_NUMBER, normalise_system};
use caregate_fhir::nhs_number::{NhsNumber, NhsNumberPolicy};
use caregate_fhir::validate::{Rejection, RejectionKind};
use caregate_fhir::{Issue, IssueCode, OperationOutcome, Severity};
use caregate_policy::{ACT_REASON, BreakGlass, Decision, PartnerId};
use caregate_store::{AuditQuery, LogEntry, Store, StoredAuditEvent, Submission};
use http::{HeaderMap, StatusCode};
use serde_json::{Map, Value, json};
use time::format_description::well_known::Rfc3339;

use crate::app::{Caller, SharedState};
use crate::context::{Audited, RequestCtx};
use crate::error::{ApiError, fhir_response};
use crate::policy_stage::PolicyStage;

/// The operation's path.
pub const PATH: &str = "/fhir/Patient/$break-glass";

/// The scope a caller needs: read and search on every resource type.
pub const REQUIRED_SCOPE: &str = "system/*.rs";

/// The longest reason accepted, in characters: room for a clinician's sentence or two, not a
/// clinical note.
pub const MAX_REASON_CHARS: usize = 1_000;

/// The most records one answer holds; more are left out with a warning in the Bundle.
pub const MAX_RECORDS: usize = 1_000;

/// The most audit events scanned to find a patient's records (bounds the work per request).
const MAX_EVENTS_SCANNED: usize = 50_000;

/// The break-glass route, for the partner listener's router.
pub fn routes() -> Router<SharedState> {
    Router::new().route(PATH, post(break_glass))
}

/// The emergency purposes of use (v3 ActReason; DOMAIN.md `POU`). `BTG` is where the audit crate
/// and the IG console expect it (`caregate_audit::report::BREAK_GLASS_PURPOSES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmergencyPurpose {
    /// `ETREAT`: emergency treatment.
    EmergencyTreatment,
    /// `BTG`: break the glass.
    BreakTheGlass,
}

impl EmergencyPurpose {
    /// The code as it is stored in audit events.
    pub fn code(self) -> &'static str {
        match self {
            Self::EmergencyTreatment => "ETREAT",
            Self::BreakTheGlass => "BTG",
        }
    }

    fn from_code(code: &str) -> Option<Self> {
        match code {
            "ETREAT" => Some(Self::EmergencyTreatment),
            "BTG" => Some(Self::BreakTheGlass),
            _ => None,
        }
    }
}

/// A validated break-glass request. `Debug` shows neither the patient nor the reason.
#[derive(Clone, PartialEq, Eq)]
pub struct BreakGlassRequest {
    pub patient: NhsNumber,
    /// Trimmed, non-empty, at most [`MAX_REASON_CHARS`] characters. Never log it.
    pub reason: String,
    pub purpose: EmergencyPurpose,
}

impl std::fmt::Debug for BreakGlassRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakGlassRequest")
            .field("patient", &self.patient)
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

/// One issue found in the `Parameters` body, and whether it is structural (400) or a business
/// rule (422, the NHS number's Modulus 11 and ranges, as for records).
struct Found {
    issues: Vec<Issue>,
    business_rule_only: bool,
}

impl Found {
    fn new() -> Self {
        Self {
            issues: Vec::new(),
            business_rule_only: true,
        }
    }

    fn structure(&mut self, code: IssueCode, expression: String, diagnostics: &str) {
        self.business_rule_only = false;
        self.issues
            .push(Issue::error(code, expression, diagnostics));
    }

    fn business_rule(&mut self, code: IssueCode, expression: String, diagnostics: String) {
        self.issues
            .push(Issue::error(code, expression, diagnostics));
    }

    fn into_rejection(self) -> Rejection {
        Rejection {
            kind: if self.business_rule_only {
                RejectionKind::BusinessRule
            } else {
                RejectionKind::Structure
            },
            outcome: OperationOutcome::new(self.issues),
        }
    }
}

const PATIENT: &str = "patient";
const REASON: &str = "reason";
const PURPOSE: &str = "purposeOfUse";

/// Read the operation's `Parameters` body. Every problem is reported at once, each with its
/// issue code and FHIRPath location; diagnostics never repeat a value from the input.
pub fn parse_request(
    value: &Value,
    nhs_policy: &NhsNumberPolicy,
) -> Result<BreakGlassRequest, Rejection> {
    let mut found = Found::new();
    if value.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        found.structure(
            IssueCode::Invalid,
            "Parameters.resourceType".into(),
            "the body must be a FHIR Parameters resource",
        );
        return Err(found.into_rejection());
    }
    let Some(parameters) = value.get("parameter").and_then(Value::as_array) else {
        found.structure(
            IssueCode::Required,
            "Parameters.parameter".into(),
            "the patient, reason and purposeOfUse parameters are required",
        );
        return Err(found.into_rejection());
    };

    // name → (index, parameter); unknown and repeated names are refused, not ignored: a request
    // that discloses records must mean exactly one thing.
    let mut named: BTreeMap<&str, (usize, &Map<String, Value>)> = BTreeMap::new();
    for (index, parameter) in parameters.iter().enumerate() {
        let at = format!("Parameters.parameter[{index}]");
        let Some(parameter) = parameter.as_object() else {
            found.structure(IssueCode::Structure, at, "a parameter must be an object");
            continue;
        };
        match parameter.get("name").and_then(Value::as_str) {
            Some(name @ (PATIENT | REASON | PURPOSE)) => {
                if named.insert(name, (index, parameter)).is_some() {
                    found.structure(
                        IssueCode::Invalid,
                        format!("{at}.name"),
                        "this parameter is given more than once",
                    );
                }
            }
            Some(_) => found.structure(
                IssueCode::NotSupported,
                format!("{at}.name"),
                "unknown parameter: $break-glass takes patient, reason and purposeOfUse",
            ),
            None => found.structure(
                IssueCode::Required,
                format!("{at}.name"),
                "a parameter needs a name",
            ),
        }
    }

    let patient = match named.get(PATIENT) {
        None => {
            found.structure(
                IssueCode::Required,
                "Parameters.parameter".into(),
                "the patient parameter (valueIdentifier with the NHS number system) is required",
            );
            None
        }
        Some(&(index, parameter)) => patient(index, parameter, nhs_policy, &mut found),
    };
    let reason = match named.get(REASON) {
        None => {
            found.structure(
                IssueCode::Required,
                "Parameters.parameter".into(),
                "the reason parameter (valueString) is required: break-glass needs the clinician's reason (LR-2)",
            );
            None
        }
        Some(&(index, parameter)) => reason(index, parameter, &mut found),
    };
    let purpose = match named.get(PURPOSE) {
        None => {
            found.structure(
                IssueCode::Required,
                "Parameters.parameter".into(),
                "the purposeOfUse parameter (valueCoding, v3 ActReason ETREAT or BTG) is required",
            );
            None
        }
        Some(&(index, parameter)) => purpose(index, parameter, &mut found),
    };
    match (patient, reason, purpose) {
        (Some(patient), Some(reason), Some(purpose)) if found.issues.is_empty() => {
            Ok(BreakGlassRequest {
                patient,
                reason,
                purpose,
            })
        }
        _ => Err(found.into_rejection()),
    }
}

/// The one `value[x]` a parameter must carry, by its expected key; any other `value[x]` or a
/// missing one is an issue at the parameter.
fn value_of<'p>(
    index: usize,
    parameter: &'p Map<String, Value>,
    key: &str,
    found: &mut Found,
) -> Option<&'p Value> {
    let at = format!("Parameters.parameter[{index}]");
    let others = parameter.keys().any(|k| k.starts_with("value") && k != key);
    match parameter.get(key) {
        Some(value) if !others => Some(value),
        _ => {
            found.structure(
                IssueCode::Structure,
                format!("{at}.{key}"),
                &format!("this parameter must carry exactly one value, as {key}"),
            );
            None
        }
    }
}

fn patient(
    index: usize,
    parameter: &Map<String, Value>,
    nhs_policy: &NhsNumberPolicy,
    found: &mut Found,
) -> Option<NhsNumber> {
    let identifier = value_of(index, parameter, "valueIdentifier", found)?;
    let at = format!("Parameters.parameter[{index}].valueIdentifier");
    let system = identifier.get("system").and_then(Value::as_str);
    let system = system.map(|s| normalise_system(s).unwrap_or(s));
    if system != Some(NHS_NUMBER) {
        found.structure(
            IssueCode::Value,
            format!("{at}.system"),
            "the patient must be identified by NHS number (system https://fhir.nhs.uk/Id/nhs-number)",
        );
        return None;
    }
    let Some(value) = identifier.get("value").and_then(Value::as_str) else {
        found.structure(
            IssueCode::Required,
            format!("{at}.value"),
            "the NHS number is required",
        );
        return None;
    };
    match NhsNumber::parse(value, nhs_policy) {
        Ok(number) => Some(number),
        Err(error) => {
            // The error's words name the rule, never the number.
            found.business_rule(IssueCode::Value, format!("{at}.value"), error.to_string());
            None
        }
    }
}

fn reason(index: usize, parameter: &Map<String, Value>, found: &mut Found) -> Option<String> {
    let value = value_of(index, parameter, "valueString", found)?;
    let at = format!("Parameters.parameter[{index}].valueString");
    let Some(text) = value.as_str() else {
        found.structure(IssueCode::Structure, at, "the reason must be a string");
        return None;
    };
    let text = text.trim();
    if text.is_empty() {
        found.structure(
            IssueCode::Required,
            at,
            "the reason must not be empty: break-glass needs the clinician's reason (LR-2)",
        );
        return None;
    }
    if text.chars().count() > MAX_REASON_CHARS {
        found.structure(
            IssueCode::TooLong,
            at,
            &format!("the reason must be at most {MAX_REASON_CHARS} characters"),
        );
        return None;
    }
    Some(text.to_owned())
}

fn purpose(
    index: usize,
    parameter: &Map<String, Value>,
    found: &mut Found,
) -> Option<EmergencyPurpose> {
    let coding = value_of(index, parameter, "valueCoding", found)?;
    let at = format!("Parameters.parameter[{index}].valueCoding");
    if coding.get("system").and_then(Value::as_str) != Some(ACT_REASON) {
        found.structure(
            IssueCode::Value,
            format!("{at}.system"),
            "the purpose of use must be coded in http://terminology.hl7.org/CodeSystem/v3-ActReason",
        );
        return None;
    }
    let code = coding.get("code").and_then(Value::as_str).unwrap_or("");
    let purpose = EmergencyPurpose::from_code(code);
    if purpose.is_none() {
        found.structure(
            IssueCode::CodeInvalid,
            format!("{at}.code"),
            "break-glass needs an emergency purpose of use: ETREAT or BTG",
        );
    }
    purpose
}

/// A record a partner submitted: the key its current version is read by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RecordKey {
    partner: String,
    resource_type: String,
    id: String,
}

/// The record an audit event says was written (created or updated), if it says so.
fn written_record(event: &AuditEvent) -> Option<RecordKey> {
    if !matches!(event.action, Action::Create | Action::Update) || event.outcome != Outcome::Success
    {
        return None;
    }
    let entity = event.entity.as_ref()?;
    Some(RecordKey {
        partner: event.actor.partner_id.clone()?,
        resource_type: entity.resource_type.clone(),
        id: entity.id.clone(),
    })
}

/// What [`find_records`] found.
#[derive(Debug, Default)]
struct FoundRecords {
    keys: BTreeSet<RecordKey>,
    /// More records, or more events, than one answer covers.
    truncated: bool,
}

/// Every record written about `patient`, found through the audit trail's patient index (each
/// committed record has a `create`/`update` event naming its patient, in the same commit), so
/// the `Store` trait needs no new query.
async fn find_records(store: &dyn Store, patient: &str) -> Result<FoundRecords, ApiError> {
    let mut found = FoundRecords::default();
    let mut scanned = 0usize;
    for action in [Action::Create, Action::Update] {
        let mut query = AuditQuery {
            patient: Some(patient.to_owned()),
            action: Some(action),
            outcome: Some(Outcome::Success),
            limit: AuditQuery::MAX_LIMIT,
            ..AuditQuery::default()
        };
        loop {
            let page = store.query_audit(&query).await?;
            scanned += page.events.len();
            collect_keys(&page.events, &mut found);
            match page.next {
                Some(next) if scanned < MAX_EVENTS_SCANNED && !found.truncated => {
                    query.after_seq = Some(next);
                }
                Some(_) => {
                    found.truncated = true;
                    break;
                }
                None => break,
            }
        }
    }
    Ok(found)
}

fn collect_keys(events: &[StoredAuditEvent], found: &mut FoundRecords) {
    for stored in events {
        if let Some(key) = written_record(&stored.event) {
            if found.keys.len() >= MAX_RECORDS && !found.keys.contains(&key) {
                found.truncated = true;
                return;
            }
            found.keys.insert(key);
        }
    }
}

/// The decision for a stored record under a break-glass request, made now against the policy and
/// consent state in force (`None`: it could not be re-evaluated, and is withheld).
fn decide(policy: &PolicyStage, entry: &LogEntry, request: &BreakGlass) -> Option<Decision> {
    policy.decide_break_glass(entry, request)
}

/// How one held record was judged for the caller.
enum Judged<'e> {
    /// Disclosed, under these rules and this policy version.
    Disclosed {
        entry: &'e LogEntry,
        rule_ids: Vec<String>,
        policy_version: String,
    },
    /// Withheld under these rules.
    Withheld { rule_ids: Vec<String> },
    /// Could not be decided: withheld (fail closed).
    Undecided,
}

fn judge<'e>(entry: &'e LogEntry, decision: Option<Decision>, caller: &str) -> Judged<'e> {
    let Some(decision) = decision else {
        return Judged::Undecided;
    };
    if let Some(delivery) = decision
        .deliver_to
        .iter()
        .find(|delivery| delivery.partner.as_str() == caller)
    {
        return Judged::Disclosed {
            entry,
            rule_ids: delivery.rule_ids.clone(),
            policy_version: decision.policy_version.clone(),
        };
    }
    let mut rule_ids: Vec<String> = decision
        .withheld
        .iter()
        .filter(|withheld| withheld.partner.as_str() == caller)
        .map(|withheld| withheld.rule_id.clone())
        .collect();
    if rule_ids.is_empty() {
        rule_ids.push(caregate_policy::RULE_NO_PERMIT.to_owned());
    }
    Judged::Withheld { rule_ids }
}

/// The reason as the audit trail keeps it: control characters (line breaks, tabs) become spaces,
/// so a stored reason cannot forge lines in an export.
fn audit_reason(reason: &str) -> String {
    reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The audit event for one disclosed record.
fn disclosure_event(
    ctx: &RequestCtx,
    request: &BreakGlassRequest,
    entry: &LogEntry,
    rule_ids: &[String],
    policy_version: &str,
) -> AuditEvent {
    let mut event = AuditEvent::new(
        ctx.request_id.to_string(),
        ctx.actor(),
        Action::Read,
        Outcome::Success,
    );
    event.status = Some(200);
    event.entity = Some(Entity {
        resource_type: entry.resource_type.clone(),
        id: entry.id.clone(),
        version_id: Some(entry.version_id),
        content_hash: Some(hex::encode(entry.content_hash)),
    });
    event.patient = Some(request.patient.as_str().to_owned());
    event.purpose_of_use = Some(request.purpose.code().to_owned());
    event.policy_version = Some(policy_version.to_owned());
    event.rule_ids = rule_ids.to_vec();
    event.detail = Some(format!(
        "break-glass disclosure of a record submitted by {}; reason: {}",
        entry.partner,
        audit_reason(&request.reason)
    ));
    event
}

/// The record as disclosed: server `meta` restored, `meta.source` naming the submitter (ids are
/// scoped per partner).
fn disclosed_resource(entry: &LogEntry) -> Result<Value, ApiError> {
    let mut resource: Value = serde_json::from_slice(&entry.content).map_err(|error| {
        tracing::error!(%error, seq = entry.seq, "stored content is not JSON");
        ApiError::Internal
    })?;
    if let Value::Object(map) = &mut resource
        && let Value::Object(meta) = map.entry("meta").or_insert_with(|| json!({}))
    {
        meta.insert(
            "versionId".into(),
            Value::String(entry.version_id.to_string()),
        );
        if let Ok(at) = entry.committed_at.format(&Rfc3339) {
            meta.insert("lastUpdated".into(), Value::String(at));
        }
        meta.insert(
            "source".into(),
            Value::String(format!("urn:caregate:partner:{}", entry.partner)),
        );
    }
    Ok(resource)
}

/// The answer: a `searchset` Bundle of the disclosed records, with a warning entry when it may be
/// incomplete.
fn searchset(base_url: &str, resources: Vec<Value>, warnings: &[Warning]) -> Value {
    let total = resources.len();
    let mut entries: Vec<Value> = resources
        .into_iter()
        .map(|resource| json!({ "resource": resource, "search": { "mode": "match" } }))
        .collect();
    if !warnings.is_empty() {
        let issues = warnings
            .iter()
            .map(|&(code, diagnostics)| Issue {
                severity: Severity::Warning,
                code,
                diagnostics: diagnostics.to_owned(),
                expression: Vec::new(),
            })
            .collect();
        entries.push(json!({
            "resource": OperationOutcome::new(issues).to_json(),
            "search": { "mode": "outcome" }
        }));
    }
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": [{ "relation": "self", "url": format!("{base_url}{PATH}") }],
        "entry": entries,
    })
}

/// A warning in the answer: (issue code, words).
type Warning = (IssueCode, &'static str);

const INCOMPLETE_UNDECIDED: Warning = (
    IssueCode::Processing,
    "some records could not be evaluated under the current policy and were withheld; this answer may be incomplete",
);
const INCOMPLETE_TRUNCATED: Warning = (
    IssueCode::TooCostly,
    "this patient has more records than one answer holds; this answer is incomplete",
);

/// `POST /fhir/Patient/$break-glass`.
async fn break_glass(
    State(state): State<SharedState>,
    Extension(ctx): Extension<RequestCtx>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::Read);
    // Refused requests are audited by the edge with this detail (no reason, no patient: neither
    // was validated).
    ctx.set_detail("break-glass request refused");
    let needed = ScopeSet::parse(REQUIRED_SCOPE).map_err(|_| ApiError::Internal)?;
    if !needed.is_subset_of(caller.grant.scopes()) {
        return Err(ApiError::Forbidden {
            message: format!("break-glass needs the {REQUIRED_SCOPE} scope"),
        });
    }
    let Some(policy) = state.policy.as_ref() else {
        return Err(ApiError::NotSupported {
            status: StatusCode::NOT_IMPLEMENTED,
            message: "break-glass needs the consent/IG policy, which this gateway does not run",
        });
    };
    let bytes = crate::fhir_api::read_body(&headers, body, state.limits.max_body_bytes).await?;
    let value = state.validator.parse(&bytes)?;
    let request = parse_request(&value, &state.validator.config().rules.nhs_number)?;
    ctx.set_patient(Some(request.patient.as_str()));
    let requester = PartnerId::parse(&caller.partner.id).map_err(|_| ApiError::Internal)?;
    let break_glass = BreakGlass::new(requester, &request.reason).map_err(|_| {
        ApiError::Rejected(Rejection {
            kind: RejectionKind::Structure,
            outcome: OperationOutcome::single(Issue::request(
                IssueCode::Required,
                "the reason must not be empty",
            )),
        })
    })?;

    let found = find_records(state.store.as_ref(), request.patient.as_str()).await?;
    let mut held = Vec::with_capacity(found.keys.len());
    for key in &found.keys {
        let entry = state
            .store
            .read_current(&key.partner, &key.resource_type, &key.id)
            .await?;
        // The current version must still be about this patient (a later update may have moved
        // the record to another NHS number): only this patient's records, ever.
        if let Some(entry) = entry
            && entry.nhs_number.as_deref() == Some(request.patient.as_str())
        {
            held.push(entry);
        }
    }
    held.sort_by_key(|entry| entry.seq);

    let mut resources = Vec::new();
    let mut audit = Vec::new();
    let mut withheld = 0usize;
    let mut undecided = 0usize;
    let mut request_rules = BTreeSet::new();
    let mut policy_version = None;
    for entry in &held {
        match judge(
            entry,
            decide(policy, entry, &break_glass),
            &caller.partner.id,
        ) {
            Judged::Disclosed {
                entry,
                rule_ids,
                policy_version: version,
            } => {
                resources.push(disclosed_resource(entry)?);
                audit.push(disclosure_event(&ctx, &request, entry, &rule_ids, &version));
                request_rules.extend(rule_ids);
                policy_version = Some(version);
            }
            Judged::Withheld { rule_ids } => {
                withheld += 1;
                request_rules.extend(rule_ids);
            }
            Judged::Undecided => {
                undecided += 1;
                request_rules.insert(caregate_policy::RULE_POLICY_ERROR.to_owned());
            }
        }
    }
    let disclosed = resources.len();
    let mut warnings = Vec::new();
    if undecided > 0 {
        warnings.push(INCOMPLETE_UNDECIDED);
    }
    if found.truncated {
        warnings.push(INCOMPLETE_TRUNCATED);
    }
    let bundle = searchset(&state.base_url, resources, &warnings);

    // The request's own event: the patient, the purpose (so it is in the review queue even when
    // nothing was disclosed), the rules that allowed and withheld, and the reason.
    let mut event = ctx.audit_event(200);
    event.purpose_of_use = Some(request.purpose.code().to_owned());
    event.policy_version = policy_version.or_else(|| Some(policy.version()));
    event.rule_ids = request_rules.into_iter().collect();
    event.detail = Some(format!(
        "break-glass request: {disclosed} records disclosed, {withheld} withheld by policy, {undecided} not evaluated{}; reason: {}",
        if found.truncated {
            ", more not searched"
        } else {
            ""
        },
        audit_reason(&request.reason)
    ));
    audit.push(event);
    state
        .store
        .submit(Submission {
            partner: caller.partner.id.clone(),
            idempotency_key: None,
            records: Vec::new(),
            audit,
        })
        .await?;
    // Counts and ids only: never the patient or the reason.
    tracing::info!(
        request_id = %ctx.request_id,
        partner = %caller.partner.id,
        purpose = request.purpose.code(),
        disclosed,
        withheld,
        undecided,
        "break-glass request answered"
    );
    let mut response = fhir_response(StatusCode::OK, &bundle);
    response.extensions_mut().insert(Audited);
    Ok(response)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    const NHS: &str = "9434765919";

    fn policy() -> NhsNumberPolicy {
        NhsNumberPolicy {
            allow_test_numbers: true,
            extra_ranges: Vec::new(),
        }
    }

    fn parameters(parameters: Value) -> Value {
        json!({ "resourceType": "Parameters", "parameter": parameters })
    }

    fn patient_parameter(value: &str) -> Value {
        json!({ "name": "patient", "valueIdentifier": { "system": NHS_NUMBER, "value": value } })
    }

    fn reason_parameter(text: &str) -> Value {
        json!({ "name": "reason", "valueString": text })
    }

    fn purpose_parameter(system: &str, code: &str) -> Value {
        json!({ "name": "purposeOfUse", "valueCoding": { "system": system, "code": code } })
    }

    fn valid() -> Value {
        parameters(json!([
            patient_parameter(NHS),
            reason_parameter("  unconscious in ED, no history  "),
            purpose_parameter(ACT_REASON, "ETREAT"),
        ]))
    }

    /// (issue code, expression) of every issue.
    fn issues(rejection: &Rejection) -> Vec<(&'static str, String)> {
        rejection
            .outcome
            .issues
            .iter()
            .map(|issue| (issue.code.as_str(), issue.expression.join(",")))
            .collect()
    }

    #[test]
    fn lr_2_valid_request_is_read_with_a_trimmed_reason() {
        let request = parse_request(&valid(), &policy()).unwrap();
        assert_eq!(request.patient.as_str(), NHS);
        assert_eq!(request.reason, "unconscious in ED, no history");
        assert_eq!(request.purpose, EmergencyPurpose::EmergencyTreatment);
        let debug = format!("{request:?}");
        assert!(
            !debug.contains(NHS) && !debug.contains("unconscious"),
            "{debug}"
        );
    }

    #[test]
    fn pou_btg_is_an_emergency_purpose_and_legacy_nhs_system_is_normalised() {
        let body = parameters(json!([
            { "name": "patient", "valueIdentifier": { "system": "http://fhir.nhs.net/Id/nhs-number", "value": NHS } },
            reason_parameter("cardiac arrest"),
            purpose_parameter(ACT_REASON, "BTG"),
        ]));
        let request = parse_request(&body, &policy()).unwrap();
        assert_eq!(request.purpose.code(), "BTG");
    }

    #[test]
    fn lr_2_missing_reason_is_required_at_the_parameters() {
        let body = parameters(json!([
            patient_parameter(NHS),
            purpose_parameter(ACT_REASON, "ETREAT"),
        ]));
        let rejection = parse_request(&body, &policy()).unwrap_err();
        assert_eq!(rejection.kind, RejectionKind::Structure);
        assert_eq!(
            issues(&rejection),
            [("required", "Parameters.parameter".to_owned())]
        );
        assert!(rejection.outcome.issues[0].diagnostics.contains("reason"));
    }

    #[test]
    fn lr_2_blank_or_overlong_reason_is_refused_at_its_value() {
        let blank = parameters(json!([
            patient_parameter(NHS),
            reason_parameter(" \n\t "),
            purpose_parameter(ACT_REASON, "ETREAT"),
        ]));
        let rejection = parse_request(&blank, &policy()).unwrap_err();
        assert_eq!(
            issues(&rejection),
            [("required", "Parameters.parameter[1].valueString".to_owned())]
        );
        let long = parameters(json!([
            patient_parameter(NHS),
            reason_parameter(&"x".repeat(MAX_REASON_CHARS + 1)),
            purpose_parameter(ACT_REASON, "ETREAT"),
        ]));
        let rejection = parse_request(&long, &policy()).unwrap_err();
        assert_eq!(
            issues(&rejection),
            [("too-long", "Parameters.parameter[1].valueString".to_owned())]
        );
    }

    #[test]
    fn pou_wrong_purpose_code_or_system_is_refused() {
        let treat = parameters(json!([
            patient_parameter(NHS),
            reason_parameter("r"),
            purpose_parameter(ACT_REASON, "TREAT"),
        ]));
        let rejection = parse_request(&treat, &policy()).unwrap_err();
        assert_eq!(rejection.kind, RejectionKind::Structure);
        assert_eq!(
            issues(&rejection),
            [(
                "code-invalid",
                "Parameters.parameter[2].valueCoding.code".to_owned()
            )]
        );
        let system = parameters(json!([
            patient_parameter(NHS),
            reason_parameter("r"),
            purpose_parameter("http://snomed.info/sct", "ETREAT"),
        ]));
        assert_eq!(
            issues(&parse_request(&system, &policy()).unwrap_err()),
            [(
                "value",
                "Parameters.parameter[2].valueCoding.system".to_owned()
            )]
        );
        let as_string = parameters(json!([
            patient_parameter(NHS),
            reason_parameter("r"),
            { "name": "purposeOfUse", "valueString": "ETREAT" },
        ]));
        assert_eq!(
            issues(&parse_request(&as_string, &policy()).unwrap_err()),
            [(
                "structure",
                "Parameters.parameter[2].valueCoding".to_owned()
            )]
        );
    }

    #[test]
    fn nhsno_invalid_patient_is_a_business_rule_and_not_echoed() {
        let body = parameters(json!([
            patient_parameter("9434765918"),
            reason_parameter("r"),
            purpose_parameter(ACT_REASON, "ETREAT"),
        ]));
        let rejection = parse_request(&body, &policy()).unwrap_err();
        assert_eq!(rejection.kind, RejectionKind::BusinessRule);
        assert_eq!(
            issues(&rejection),
            [(
                "value",
                "Parameters.parameter[0].valueIdentifier.value".to_owned()
            )]
        );
        let text = rejection.outcome.to_json().to_string();
        assert!(!text.contains("9434765918"), "{text}");
    }

    #[test]
    fn every_problem_is_reported_at_once_and_unknown_or_repeated_names_are_refused() {
        let body = parameters(json!([
            { "name": "patient", "valueIdentifier": { "system": "urn:other", "value": NHS } },
            reason_parameter("a"),
            reason_parameter("b"),
            { "name": "_count", "valueInteger": 5 },
        ]));
        let rejection = parse_request(&body, &policy()).unwrap_err();
        let found = issues(&rejection);
        assert!(
            found.contains(&("invalid", "Parameters.parameter[2].name".to_owned())),
            "{found:?}"
        );
        assert!(
            found.contains(&("not-supported", "Parameters.parameter[3].name".to_owned())),
            "{found:?}"
        );
        assert!(
            found.contains(&(
                "value",
                "Parameters.parameter[0].valueIdentifier.system".to_owned()
            )),
            "{found:?}"
        );
        assert!(
            found.contains(&("required", "Parameters.parameter".to_owned())),
            "purposeOfUse is missing: {found:?}"
        );
        let not_parameters = json!({ "resourceType": "Patient" });
        assert_eq!(
            issues(&parse_request(&not_parameters, &policy()).unwrap_err()),
            [("invalid", "Parameters.resourceType".to_owned())]
        );
    }

    fn stored(action: Action, partner: &str, resource_type: &str, id: &str) -> StoredAuditEvent {
        let mut event = AuditEvent::new(
            "r",
            caregate_audit::Actor {
                partner_id: Some(partner.into()),
                ..caregate_audit::Actor::default()
            },
            action,
            Outcome::Success,
        );
        event.entity = Some(Entity {
            resource_type: resource_type.into(),
            id: id.into(),
            version_id: None,
            content_hash: None,
        });
        StoredAuditEvent { seq: 1, event }
    }

    #[test]
    fn records_are_found_once_per_submitter_type_and_id_from_writes_only() {
        let events = [
            stored(Action::Create, "gp-a81001", "Observation", "1"),
            stored(Action::Update, "gp-a81001", "Observation", "1"),
            // Ids are scoped per partner: the same id from another partner is another record.
            stored(Action::Create, "trust-rx1", "Observation", "1"),
            // A read names a record but is not one written.
            stored(Action::Read, "trust-rx1", "Patient", "9"),
        ];
        let mut found = FoundRecords::default();
        collect_keys(&events, &mut found);
        let keys: Vec<(&str, &str)> = found
            .keys
            .iter()
            .map(|k| (k.partner.as_str(), k.id.as_str()))
            .collect();
        assert_eq!(keys, [("gp-a81001", "1"), ("trust-rx1", "1")]);
        assert!(!found.truncated);
    }

    fn entry() -> LogEntry {
        LogEntry {
            seq: 7,
            partner: "gp-a81001".into(),
            resource_type: "Observation".into(),
            id: "o1".into(),
            version_id: 2,
            content: br#"{"resourceType":"Observation","id":"o1","status":"final"}"#.to_vec(),
            content_hash: [0; 32],
            nhs_number: Some(NHS.into()),
            decision: None,
            committed_at: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn decision(json: Value) -> Decision {
        let mut base = json!({
            "policy_version": "sha256:test",
            "decided_at": "2026-11-23T00:00:00Z",
            "resource_type": "Observation",
            "submitter": "gp-a81001",
            "sensitive_categories": [],
            "deliver_to": [],
            "withheld": [],
            "feeds": [],
            "break_glass": false,
            "break_glass_reason": null
        });
        if let (Value::Object(base), Value::Object(extra)) = (&mut base, json) {
            base.extend(extra);
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn lr_2_only_a_delivery_to_the_caller_discloses() {
        let entry = entry();
        let allowed = decision(json!({ "deliver_to": [{
            "partner": "trust-rx1", "agreement": "dsa", "purpose": "direct-care",
            "rule_ids": ["LR-2"], "rule_reasons": ["break-glass"], "break_glass": true
        }], "break_glass": true }));
        assert!(matches!(
            judge(&entry, Some(allowed.clone()), "trust-rx1"),
            Judged::Disclosed { ref rule_ids, .. } if rule_ids == &["LR-2"]
        ));
        // A delivery to someone else is not a disclosure to the caller.
        assert!(matches!(
            judge(&entry, Some(allowed), "trust-r1z"),
            Judged::Withheld { ref rule_ids } if rule_ids == &["NO-PERMIT"]
        ));
        let dissent = decision(json!({ "withheld": [{
            "partner": "trust-rx1", "agreement": "dsa", "rule_id": "CONSENT-DISSENT", "reason": "dissent"
        }] }));
        assert!(matches!(
            judge(&entry, Some(dissent), "trust-rx1"),
            Judged::Withheld { ref rule_ids } if rule_ids == &["CONSENT-DISSENT"]
        ));
        assert!(matches!(
            judge(&entry, None, "trust-rx1"),
            Judged::Undecided
        ));
    }

    #[test]
    fn lr_2_disclosure_event_is_a_break_glass_read_keeping_the_reason() {
        let ctx = RequestCtx::new("req-1".into(), false, None, None);
        let request = parse_request(&valid(), &policy()).unwrap();
        let mut request = request;
        request.reason = "line one\r\nline two".into();
        let event = disclosure_event(
            &ctx,
            &request,
            &entry(),
            &["LR-2".to_owned()],
            "sha256:test",
        );
        assert!(caregate_audit::report::is_break_glass(&event));
        assert_eq!(event.action, Action::Read);
        assert_eq!(event.patient.as_deref(), Some(NHS));
        assert_eq!(event.rule_ids, ["LR-2"]);
        assert_eq!(event.entity.as_ref().unwrap().version_id, Some(2));
        let detail = event.detail.unwrap();
        assert!(detail.ends_with("reason: line one  line two"), "{detail}");
    }

    #[test]
    fn searchset_counts_matches_and_warns_in_an_outcome_entry() {
        let resource = disclosed_resource(&entry()).unwrap();
        assert_eq!(resource["meta"]["versionId"], "2");
        assert_eq!(resource["meta"]["source"], "urn:caregate:partner:gp-a81001");
        let bundle = searchset("https://gw", vec![resource], &[INCOMPLETE_UNDECIDED]);
        assert_eq!(bundle["type"], "searchset");
        assert_eq!(bundle["total"], 1);
        assert_eq!(bundle["entry"][0]["search"]["mode"], "match");
        assert_eq!(bundle["entry"][1]["search"]["mode"], "outcome");
        assert_eq!(
            bundle["entry"][1]["resource"]["issue"][0]["severity"],
            "warning"
        );
        let empty = searchset("https://gw", Vec::new(), &[]);
        assert_eq!(empty["total"], 0);
        assert_eq!(empty["entry"], json!([]));
    }
}
