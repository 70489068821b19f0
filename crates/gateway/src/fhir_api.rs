//! FHIR RESTful intake (<http://hl7.org/fhir/R4/http.html>): create, update, read, and Bundles
//! (`transaction`, `batch`, and stored `message`/`document`/`collection`).
//!
//! Every write follows the same path: bounded body read → validation → a [`Submission`] holding
//! the records and this request's audit event → `Store::submit`, which returns only once durable →
//! the response. Retries are safe: the same `X-Request-Id`, the same create content, or the same
//! update content return the original result instead of writing again.

use std::collections::HashMap;
use std::str::FromStr;

use aws_lc_rs::digest;
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use caregate_audit::{Action, AuditEvent, Entity, Outcome};
use caregate_auth::scope::Interaction;
use caregate_fhir::bundle::{BundleType, EntryRequest, Method, ValidatedBundle, is_fhir_id};
use caregate_fhir::validate::{Rejection, RejectionKind, Validated};
use caregate_fhir::{Issue, IssueCode, OperationOutcome, ResourceType, ValidatedResource};
use caregate_store::{EntryOutcome, EntryReceipt, Receipt, RecordWrite, Submission, WriteMode};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt as _, Limited};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::Instrument as _;

use crate::app::{AppState, Caller, SharedState};
use crate::context::{Audited, RequestCtx};
use crate::error::{ApiError, FHIR_JSON, fhir_response};

/// Read the request body as FHIR JSON: the media type is checked first (415), then the size,
/// from `Content-Length` before reading anything and while streaming otherwise (413), so an
/// oversized body is never buffered whole.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    match media_type.as_deref() {
        Some("application/fhir+json" | "application/json") => {}
        _ => return Err(ApiError::UnsupportedMediaType),
    }
    read_limited(headers, body, limit).await
}

/// Read a body of any media type under `limit` bytes.
pub(crate) async fn read_limited(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge { limit })
        }
        Err(error) => {
            // The client went away or sent a malformed chunked body. (This reader is the only
            // size limit on raw bodies: axum's `DefaultBodyLimit` applies to its extractors only.)
            tracing::debug!(%error, "request body could not be read");
            Err(ApiError::NotSupported {
                status: StatusCode::BAD_REQUEST,
                message: "the request body could not be read",
            })
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

fn resource_type_from_path(name: &str) -> Result<ResourceType, ApiError> {
    match ResourceType::from_str(name) {
        Ok(ResourceType::Bundle) | Err(_) => Err(ApiError::NotSupported {
            status: StatusCode::NOT_FOUND,
            message: "this resource type is not accepted at this endpoint (see /fhir/metadata)",
        }),
        Ok(resource_type) => Ok(resource_type),
    }
}

/// `Prefer: return=...` (<http://hl7.org/fhir/R4/http.html#ops>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Return {
    Representation,
    Minimal,
    OperationOutcome,
}

fn prefer_return(headers: &HeaderMap) -> Return {
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if prefer.contains("return=minimal") {
        Return::Minimal
    } else if prefer.contains("return=OperationOutcome") {
        Return::OperationOutcome
    } else {
        Return::Representation
    }
}

/// A record ready to commit, and the resource as it will be shown back.
struct Prepared {
    write: RecordWrite,
    resource: ValidatedResource,
    /// The policy version and the rule ids that fired, for the audit event.
    policy: Option<(String, Vec<String>)>,
}

/// Give the record its id, take its canonical bytes, and decide under the consent/IG policy
/// (the decision is committed with the record; no policy configured → no decision, and the record
/// goes to no partner and no feed).
fn prepare(
    state: &AppState,
    submitter: &str,
    mut resource: ValidatedResource,
    id: &str,
    mode: WriteMode,
) -> Prepared {
    resource.clear_server_meta();
    resource.set_id(id);
    let decision = state
        .policy
        .as_ref()
        .and_then(|policy| policy.decide(&resource, submitter));
    let policy = decision.as_ref().map(|d| {
        let mut rules: Vec<String> = d
            .deliver_to
            .iter()
            .flat_map(|r| r.rule_ids.iter().cloned())
            .chain(d.withheld.iter().map(|w| w.rule_id.clone()))
            .chain(d.feeds.iter().flat_map(|f| f.rule_ids.iter().cloned()))
            .collect();
        rules.sort();
        rules.dedup();
        crate::metrics::global().decision(&rules);
        (d.policy_version.clone(), rules)
    });
    let decision = decision.and_then(|d| serde_json::to_vec(&d).ok());
    let content = resource.canonical_bytes();
    let write = RecordWrite {
        resource_type: resource.resource_type().as_str().to_owned(),
        id: id.to_owned(),
        mode,
        content_hash: sha256(&content),
        content,
        nhs_number: resource.nhs_number().map(|n| n.as_str().to_owned()),
        identifiers: resource.identifiers().to_vec(),
        decision,
    };
    Prepared {
        write,
        resource,
        policy,
    }
}

/// After a commit: let the consent registry learn from what committed.
fn learn<'a>(
    state: &AppState,
    submitter: &str,
    resources: impl IntoIterator<Item = &'a ValidatedResource>,
) {
    if let Some(policy) = &state.policy {
        for resource in resources {
            policy.observe_committed(resource, submitter);
        }
    }
}

/// A create ignores any client id and server `meta`; what is left keys retries of the same
/// create when the client sends no `X-Request-Id`.
fn create_content_key(resource: &mut ValidatedResource) -> String {
    resource.clear_id();
    resource.clear_server_meta();
    format!(
        "POST {} sha256:{}",
        resource.resource_type(),
        hex::encode(sha256(&resource.canonical_bytes()))
    )
}

/// The validate stage: strict JSON, schema, FHIR/UK rules (`caregate_fhir::Validator`). Its span
/// names the expected type and the body size only.
#[tracing::instrument(
    target = "caregate::stage",
    name = "validate",
    skip_all,
    fields(resource_type = expected.map(|t| t.as_str()), bytes = bytes.len(), outcome)
)]
fn validate(
    state: &AppState,
    bytes: &[u8],
    expected: Option<ResourceType>,
) -> Result<Validated, Rejection> {
    let result = state.validator.validate_bytes(bytes, expected);
    let outcome = match &result {
        Ok(_) => "valid",
        Err(rejection) => match rejection.kind {
            RejectionKind::Structure => "invalid",
            RejectionKind::BusinessRule => "business-rule",
            RejectionKind::NotSupported => "not-supported",
        },
    };
    tracing::Span::current().record("outcome", outcome);
    result
}

/// The commit stage: one `Store::submit`, which returns only once durable. Its span holds the
/// counts of records and audit events and the outcome.
#[tracing::instrument(
    target = "caregate::stage",
    name = "commit",
    skip_all,
    fields(records = submission.records.len(), audit_events = submission.audit.len(), outcome)
)]
async fn commit(
    store: &dyn caregate_store::Store,
    submission: Submission,
) -> Result<Receipt, caregate_store::StoreError> {
    let result = store.submit(submission).await;
    let outcome = match &result {
        Ok(receipt) if receipt.replayed => "replayed",
        Ok(_) => "committed",
        Err(_) => "failed",
    };
    tracing::Span::current().record("outcome", outcome);
    result
}

/// Commit one prepared record with its audit event, let the consent registry learn from it, and
/// answer as FHIR asks for a single-resource write.
async fn commit_one(
    state: &AppState,
    ctx: &RequestCtx,
    caller: &Caller,
    headers: &HeaderMap,
    prepared: Prepared,
    action: Action,
    idempotency_key: Option<String>,
) -> Result<Response, ApiError> {
    let event = record_event(ctx, action, &prepared);
    let submission = Submission {
        partner: caller.partner.id.clone(),
        idempotency_key,
        records: vec![prepared.write],
        audit: vec![event],
    };
    let receipt = commit(&*state.store, submission).await?;
    learn(state, &caller.partner.id, [&prepared.resource]);
    let entry = single_receipt(&receipt)?;
    Ok(resource_response(
        state,
        entry,
        receipt.replayed,
        prepared.resource,
        prefer_return(headers),
    ))
}

/// The audit event for one committed record, written in the same commit.
fn record_event(ctx: &RequestCtx, action: Action, prepared: &Prepared) -> AuditEvent {
    let write = &prepared.write;
    let mut event = AuditEvent::new(
        ctx.request_id.to_string(),
        ctx.actor(),
        action,
        Outcome::Success,
    );
    event.entity = Some(Entity {
        resource_type: write.resource_type.clone(),
        id: write.id.clone(),
        version_id: None,
        content_hash: Some(hex::encode(write.content_hash)),
    });
    event.patient = write.nhs_number.clone();
    if let Some((version, rules)) = &prepared.policy {
        event.policy_version = Some(version.clone());
        event.rule_ids = rules.clone();
    }
    event
}

/// The idempotency key for a request: the client's `X-Request-Id` scoped to method and path, or
/// a content-derived key the caller supplies.
fn idempotency_key(
    ctx: &RequestCtx,
    method: &str,
    path: &str,
    fallback: Option<String>,
) -> Option<String> {
    if ctx.client_request_id {
        Some(format!("{method} {path} rid:{}", ctx.request_id))
    } else {
        fallback
    }
}

fn parse_if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    match headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) {
        None => Ok(None),
        Some(value) => parse_etag(value).map(Some).ok_or(ApiError::NotSupported {
            status: StatusCode::BAD_REQUEST,
            message: "If-Match must be a version ETag such as W/\"3\"",
        }),
    }
}

fn parse_etag(value: &str) -> Option<i64> {
    value
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .ok()
}

/// `If-None-Exist: identifier=system|value` → the identifier token. Other search parameters are
/// not supported (400), since caregate does not offer search.
fn parse_if_none_exist(value: &str) -> Result<String, ApiError> {
    let query = value.trim_start_matches('?');
    let token = query
        .strip_prefix("identifier=")
        .filter(|t| !t.contains('&') && t.contains('|'));
    match token {
        Some(token) => {
            let (system, value) = token.split_once('|').unwrap_or(("", token));
            let system = caregate_fhir::identifier::normalise_system(system).unwrap_or(system);
            Ok(format!("{system}|{value}"))
        }
        None => Err(ApiError::NotSupported {
            status: StatusCode::BAD_REQUEST,
            message: "If-None-Exist supports only identifier=system|value",
        }),
    }
}

fn http_date(at: OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    at.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .unwrap_or_default()
}

fn instant(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

fn status_for(outcome: EntryOutcome) -> StatusCode {
    match outcome {
        EntryOutcome::Created => StatusCode::CREATED,
        EntryOutcome::Updated | EntryOutcome::Unchanged | EntryOutcome::Existing => StatusCode::OK,
    }
}

/// Render the response for one committed resource.
fn resource_response(
    state: &AppState,
    receipt: &EntryReceipt,
    replayed: bool,
    mut resource: ValidatedResource,
    prefer: Return,
) -> Response {
    let status = status_for(receipt.outcome);
    resource.set_id(&receipt.id);
    resource.set_meta(
        &receipt.version_id.to_string(),
        &instant(receipt.last_updated),
    );
    let body = match prefer {
        Return::Representation => resource.into_value(),
        Return::OperationOutcome => {
            OperationOutcome::single(Issue::information(match receipt.outcome {
                EntryOutcome::Created => "created",
                EntryOutcome::Updated => "updated",
                EntryOutcome::Unchanged => "unchanged: the content equals the current version",
                EntryOutcome::Existing => {
                    "an existing resource matched If-None-Exist; nothing was created"
                }
            }))
            .to_json()
        }
        Return::Minimal => Value::Null,
    };
    let mut response = if body.is_null() {
        status.into_response()
    } else {
        fhir_response(status, &body)
    };
    let headers = response.headers_mut();
    let location = format!(
        "{}/fhir/{}/{}/_history/{}",
        state.base_url, receipt.resource_type, receipt.id, receipt.version_id
    );
    if let Ok(value) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, value.clone());
        headers.insert(header::CONTENT_LOCATION, value);
    }
    if let Ok(value) = HeaderValue::from_str(&format!("W/\"{}\"", receipt.version_id)) {
        headers.insert(header::ETAG, value);
    }
    if let Ok(value) = HeaderValue::from_str(&http_date(receipt.last_updated)) {
        headers.insert(header::LAST_MODIFIED, value);
    }
    if replayed {
        headers.insert("x-idempotent-replay", HeaderValue::from_static("true"));
    }
    response.extensions_mut().insert(Audited);
    response
}

fn single_receipt(receipt: &Receipt) -> Result<&EntryReceipt, ApiError> {
    receipt.entries.first().ok_or_else(|| {
        tracing::error!("store returned a receipt without entries");
        ApiError::Internal
    })
}

/// `POST /fhir/{type}`: create.
pub(crate) async fn create(
    State(state): State<SharedState>,
    Path(type_name): Path<String>,
    Extension(ctx): Extension<RequestCtx>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::Create);
    let resource_type = resource_type_from_path(&type_name)?;
    caller.require(resource_type.as_str(), Interaction::Create)?;
    let bytes = read_body(&headers, body, state.limits.max_body_bytes).await?;
    let Validated::Resource(mut resource) = validate(&state, &bytes, Some(resource_type))? else {
        return Err(ApiError::Internal);
    };
    ctx.set_patient(resource.nhs_number().map(|n| n.as_str()));
    let mode = match headers.get("if-none-exist").and_then(|v| v.to_str().ok()) {
        Some(value) => WriteMode::CreateIfNoneExist {
            identifier: parse_if_none_exist(value)?,
        },
        None => WriteMode::Create,
    };
    let content_key = create_content_key(&mut resource);
    let id = uuid::Uuid::new_v4().to_string();
    let prepared = prepare(&state, &caller.partner.id, resource, &id, mode);
    let key = idempotency_key(&ctx, "POST", resource_type.as_str(), Some(content_key));
    commit_one(
        &state,
        &ctx,
        &caller,
        &headers,
        prepared,
        Action::Create,
        key,
    )
    .await
}

/// `PUT /fhir/{type}/{id}`: update (or create with a client-chosen id).
pub(crate) async fn update(
    State(state): State<SharedState>,
    Path((type_name, id)): Path<(String, String)>,
    Extension(ctx): Extension<RequestCtx>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::Update);
    let resource_type = resource_type_from_path(&type_name)?;
    caller.require(resource_type.as_str(), Interaction::Update)?;
    if !is_fhir_id(&id) {
        return Err(ApiError::NotSupported {
            status: StatusCode::BAD_REQUEST,
            message: "the id in the URL is not a valid FHIR id",
        });
    }
    let if_match = parse_if_match(&headers)?;
    let bytes = read_body(&headers, body, state.limits.max_body_bytes).await?;
    let Validated::Resource(resource) = validate(&state, &bytes, Some(resource_type))? else {
        return Err(ApiError::Internal);
    };
    if resource.id() != Some(id.as_str()) {
        return Err(ApiError::Rejected(Rejection {
            kind: RejectionKind::Structure,
            outcome: OperationOutcome::single(Issue::error(
                IssueCode::Invalid,
                format!("{resource_type}.id"),
                "for update, the resource's id must equal the id in the URL",
            )),
        }));
    }
    ctx.set_patient(resource.nhs_number().map(|n| n.as_str()));
    let prepared = prepare(
        &state,
        &caller.partner.id,
        resource,
        &id,
        WriteMode::Update { if_match },
    );
    let key = idempotency_key(&ctx, "PUT", &format!("{resource_type}/{id}"), None);
    commit_one(
        &state,
        &ctx,
        &caller,
        &headers,
        prepared,
        Action::Update,
        key,
    )
    .await
}

/// `GET /fhir/{type}/{id}`: read back a record this partner submitted. Other partners' records
/// are not visible here (they are delivered under policy); asking for one is a 404, the same as
/// for a record that does not exist, so there is no existence oracle (OWASP API1).
pub(crate) async fn read(
    State(state): State<SharedState>,
    Path((type_name, id)): Path<(String, String)>,
    Extension(ctx): Extension<RequestCtx>,
    caller: Caller,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::Read);
    let resource_type = resource_type_from_path(&type_name).or_else(|e| {
        if type_name == "Bundle" {
            Ok(ResourceType::Bundle)
        } else {
            Err(e)
        }
    })?;
    caller.require(resource_type.as_str(), Interaction::Read)?;
    if !is_fhir_id(&id) {
        return Err(ApiError::NotFound);
    }
    let entry = state
        .store
        .read_current(&caller.partner.id, resource_type.as_str(), &id)
        .await?
        .ok_or(ApiError::NotFound)?;
    ctx.set_entity(Entity {
        resource_type: entry.resource_type.clone(),
        id: entry.id.clone(),
        version_id: Some(entry.version_id),
        content_hash: Some(hex::encode(entry.content_hash)),
    });
    ctx.set_patient(entry.nhs_number.as_deref());
    let mut value: Value = serde_json::from_slice(&entry.content).map_err(|error| {
        tracing::error!(%error, "stored content is not JSON");
        ApiError::Internal
    })?;
    if let Value::Object(map) = &mut value {
        let meta = map.entry("meta").or_insert_with(|| json!({}));
        if let Value::Object(meta) = meta {
            meta.insert(
                "versionId".into(),
                Value::String(entry.version_id.to_string()),
            );
            meta.insert(
                "lastUpdated".into(),
                Value::String(instant(entry.committed_at)),
            );
        }
    }
    let mut response = fhir_response(StatusCode::OK, &value);
    if let Ok(etag) = HeaderValue::from_str(&format!("W/\"{}\"", entry.version_id)) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    if let Ok(modified) = HeaderValue::from_str(&http_date(entry.committed_at)) {
        response
            .headers_mut()
            .insert(header::LAST_MODIFIED, modified);
    }
    Ok(response)
}

/// `POST /fhir`: a Bundle — `transaction` (all-or-nothing), `batch` (entry by entry), or a
/// `message`/`document`/`collection` stored whole as one Bundle record.
pub(crate) async fn submit_bundle(
    State(state): State<SharedState>,
    Extension(ctx): Extension<RequestCtx>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::BundleSubmit);
    let bytes = read_body(&headers, body, state.limits.max_body_bytes).await?;
    let Validated::Bundle(bundle) = validate(&state, &bytes, Some(ResourceType::Bundle))? else {
        return Err(ApiError::Internal);
    };
    match bundle {
        ValidatedBundle::Requests {
            bundle_type: BundleType::Transaction,
            entries,
        } => transaction(&state, &ctx, &caller, &bytes, entries).await,
        ValidatedBundle::Requests { entries, .. } => {
            Ok(batch(&state, &ctx, &caller, entries).await)
        }
        ValidatedBundle::Stored { resource, .. } => {
            caller.require("Bundle", Interaction::Create)?;
            ctx.set_patient(resource.nhs_number().map(|n| n.as_str()));
            let mut resource = resource;
            let content_key = create_content_key(&mut resource);
            let id = uuid::Uuid::new_v4().to_string();
            let prepared = prepare(&state, &caller.partner.id, resource, &id, WriteMode::Create);
            let key = idempotency_key(&ctx, "POST", "", Some(content_key));
            commit_one(
                &state,
                &ctx,
                &caller,
                &headers,
                prepared,
                Action::Create,
                key,
            )
            .await
        }
    }
}

/// Check scopes and assign ids for one request entry.
fn plan_entry(caller: &Caller, request: &EntryRequest) -> Result<(String, WriteMode), ApiError> {
    let type_name = request.resource_type.as_str();
    match request.method {
        Method::Post => {
            caller.require(type_name, Interaction::Create)?;
            let mode = match &request.if_none_exist {
                Some(query) => WriteMode::CreateIfNoneExist {
                    identifier: parse_if_none_exist(query)?,
                },
                None => WriteMode::Create,
            };
            Ok((uuid::Uuid::new_v4().to_string(), mode))
        }
        Method::Put => {
            caller.require(type_name, Interaction::Update)?;
            let if_match = match &request.if_match {
                Some(etag) => Some(parse_etag(etag).ok_or(ApiError::NotSupported {
                    status: StatusCode::BAD_REQUEST,
                    message: "request.ifMatch must be a version ETag such as W/\"3\"",
                })?),
                None => None,
            };
            Ok((
                request.id.clone().unwrap_or_default(),
                WriteMode::Update { if_match },
            ))
        }
    }
}

async fn transaction(
    state: &SharedState,
    ctx: &RequestCtx,
    caller: &Caller,
    body: &[u8],
    entries: Vec<caregate_fhir::bundle::ValidatedEntry>,
) -> Result<Response, ApiError> {
    // Plan every entry (scopes, ids) before writing anything: all-or-nothing.
    let mut planned = Vec::with_capacity(entries.len());
    let mut references = HashMap::new();
    for entry in entries {
        let (Some(request), Ok(resource)) = (entry.request, entry.result) else {
            return Err(ApiError::Internal);
        };
        let (id, mode) = plan_entry(caller, &request)?;
        if let Some(full_url) = entry.full_url {
            references.insert(full_url, format!("{}/{id}", request.resource_type));
        }
        planned.push((resource, id, mode));
    }
    let mut prepared = Vec::with_capacity(planned.len());
    let mut audit = Vec::with_capacity(planned.len() + 1);
    for (mut resource, id, mode) in planned {
        resource.rewrite_references(&references);
        let action = if matches!(mode, WriteMode::Update { .. }) {
            Action::Update
        } else {
            Action::Create
        };
        let p = prepare(state, &caller.partner.id, resource, &id, mode);
        audit.push(record_event(ctx, action, &p));
        prepared.push(p);
    }
    let mut request_event = ctx.audit_event(200);
    request_event.detail = Some(format!("transaction of {} entries", prepared.len()));
    audit.push(request_event);
    let records = prepared.iter().map(|p| p.write.clone()).collect();
    let submission = Submission {
        partner: caller.partner.id.clone(),
        idempotency_key: idempotency_key(
            ctx,
            "POST",
            "",
            Some(format!(
                "POST transaction sha256:{}",
                hex::encode(sha256(body))
            )),
        ),
        records,
        audit,
    };
    let receipt = commit(&*state.store, submission).await?;
    learn(
        state,
        &caller.partner.id,
        prepared.iter().map(|p| &p.resource),
    );
    let entries: Vec<Value> = receipt
        .entries
        .iter()
        .map(|e| json!({ "response": entry_response(e) }))
        .collect();
    let mut response = fhir_response(
        StatusCode::OK,
        &json!({ "resourceType": "Bundle", "type": "transaction-response", "entry": entries }),
    );
    if receipt.replayed {
        response
            .headers_mut()
            .insert("x-idempotent-replay", HeaderValue::from_static("true"));
    }
    response.extensions_mut().insert(Audited);
    Ok(response)
}

fn entry_response(receipt: &EntryReceipt) -> Value {
    let status = status_for(receipt.outcome);
    json!({
        "status": format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")),
        "location": format!("{}/{}/_history/{}", receipt.resource_type, receipt.id, receipt.version_id),
        "etag": format!("W/\"{}\"", receipt.version_id),
        "lastModified": instant(receipt.last_updated),
    })
}

fn failed_entry(error: &ApiError) -> Value {
    let status = error.status();
    json!({ "response": {
        "status": format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")),
        "outcome": error.outcome().to_json(),
    }})
}

async fn batch(
    state: &SharedState,
    ctx: &RequestCtx,
    caller: &Caller,
    entries: Vec<caregate_fhir::bundle::ValidatedEntry>,
) -> Response {
    // Each valid entry is its own submission; they are submitted together so they share the
    // store's group commit rather than paying one fsync each.
    let mut slots: Vec<Option<Value>> = vec![None; entries.len()];
    let mut pending = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let outcome = match (entry.request, entry.result) {
            (_, Err(rejection)) => Err(ApiError::Rejected(rejection)),
            (None, Ok(_)) => Err(ApiError::Internal),
            (Some(request), Ok(resource)) => {
                plan_entry(caller, &request).map(|(id, mode)| (resource, id, mode))
            }
        };
        match outcome {
            Err(error) => slots[index] = Some(failed_entry(&error)),
            Ok((mut resource, id, mode)) => {
                let content_key =
                    matches!(mode, WriteMode::Create).then(|| create_content_key(&mut resource));
                let action = if matches!(mode, WriteMode::Update { .. }) {
                    Action::Update
                } else {
                    Action::Create
                };
                let p = prepare(state, &caller.partner.id, resource, &id, mode);
                let event = record_event(ctx, action, &p);
                let key = if ctx.client_request_id {
                    Some(format!("POST batch rid:{}#{index}", ctx.request_id))
                } else {
                    content_key
                };
                let submission = Submission {
                    partner: caller.partner.id.clone(),
                    idempotency_key: key,
                    records: vec![p.write],
                    audit: vec![event],
                };
                let store = state.store.clone();
                let resource = p.resource;
                pending.push((
                    index,
                    resource,
                    tokio::spawn(
                        async move { commit(&*store, submission).await }.in_current_span(),
                    ),
                ));
            }
        }
    }
    for (index, resource, handle) in pending {
        slots[index] = Some(match handle.await {
            Ok(Ok(receipt)) => match receipt.entries.first() {
                Some(entry) => {
                    learn(state, &caller.partner.id, [&resource]);
                    json!({ "response": entry_response(entry) })
                }
                None => failed_entry(&ApiError::Internal),
            },
            Ok(Err(error)) => failed_entry(&ApiError::from(error)),
            Err(_) => failed_entry(&ApiError::Internal),
        });
    }
    let entries: Vec<Value> = slots.into_iter().map(Option::unwrap_or_default).collect();
    let mut response = fhir_response(
        StatusCode::OK,
        &json!({ "resourceType": "Bundle", "type": "batch-response", "entry": entries }),
    );
    // The batch request as a whole is audited by the edge; each entry's record event was written
    // with its record.
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}
