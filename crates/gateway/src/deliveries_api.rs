//! The HTTP side of delivery (issue 4): the partner inbox as FHIR, the operators' JSON API, and
//! the mapping from the gateway's configuration to delivery destinations.
//!
//! **Inbox.** `GET /fhir/$inbox?cursor=…&_count=…` and `POST /fhir/$inbox/ack?cursor=…`. Named as
//! a FHIR *operation* on the system level (`$` prefix, <http://hl7.org/fhir/R4/operations.html>):
//! it is not a search on one resource type but a server-defined action over everything routed to
//! the caller, like `$export`; the `ack` sub-path keeps acknowledgement a separate, non-idempotent
//! POST. The page is a `searchset` Bundle (oldest first) whose `next` link carries an opaque
//! cursor; a non-empty page always has one, an empty page has none (the inbox is drained).
//! Acknowledging a cursor releases everything up to it; a page not acknowledged is served again
//! from `GET /fhir/$inbox` without a cursor (see `caregate_deliver::inbox`).
//!
//! **Authorisation.** The caller's access token must carry `system/*.rs` (or wider, e.g.
//! `system/*.cruds`): an inbox holds records of any type, so a narrower scope cannot cover it.
//! The inbox is always the caller's own — the partner id comes from the token, never from the
//! request — and a partner whose delivery mode is not `inbox` gets 403.
//!
//! **Admin.** [`admin_routes`] gives `GET /admin/deliveries/status`,
//! `GET /admin/deliveries/dead-letters` and `POST /admin/deliveries/replay`; `crate::admin` merges
//! them into the admin listener behind its authentication (IG officers' sessions with CSRF for the
//! POST, or partners with the `ig-officer` role) and its audit-per-request edge.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, Query, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use caregate_audit::Action;
use caregate_auth::ScopeSet;
use caregate_deliver::inbox::{DEFAULT_PAGE, MAX_PAGE};
use caregate_deliver::{DestinationConfig, Inbox, InboxCursor, InboxError, PushTls, operations};
use caregate_store::Store;
use caregate_store::delivery::ReplaySelector;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;

use crate::app::{Caller, SharedState};
use crate::config::{Config, DeliveryMode};
use crate::context::RequestCtx;
use crate::error::{ApiError, fhir_response};

/// The delivery destinations the configuration implies: one per partner whose mode is `push` or
/// `inbox`. A partner's own `ca_cert`, `timeout_secs` and `concurrency` replace the `[delivery]`
/// defaults; its own `client_cert`/`client_key` pair replaces the gateway-wide mTLS identity
/// (paths were resolved against the config file's directory when it was loaded).
pub fn destinations(config: &Config) -> Vec<DestinationConfig> {
    let defaults = &config.delivery;
    config
        .partners
        .iter()
        .filter_map(|partner| {
            let section = &partner.delivery;
            let mut destination = match section.mode {
                DeliveryMode::Push => DestinationConfig::push(
                    &partner.id,
                    section.endpoint.as_deref().unwrap_or_default(),
                ),
                DeliveryMode::Inbox => DestinationConfig::inbox(&partner.id),
                DeliveryMode::None => return None,
            };
            let (client_cert, client_key) = match (&section.client_cert, &section.client_key) {
                (Some(cert), Some(key)) => (Some(cert.clone()), Some(key.clone())),
                _ => (defaults.client_cert.clone(), defaults.client_key.clone()),
            };
            destination.tls = PushTls {
                ca_cert: section.ca_cert.clone().or_else(|| defaults.ca_cert.clone()),
                client_cert,
                client_key,
            };
            destination.timeout = section
                .timeout_secs
                .map_or(defaults.timeout, Duration::from_secs);
            destination.concurrency = section.concurrency.unwrap_or(defaults.concurrency);
            Some(destination)
        })
        .collect()
}

/// The partner inbox routes, for the FHIR router. They need an [`Inbox`] as a request extension
/// (`.layer(Extension(inbox))` on the router); without one they answer 404.
pub fn inbox_routes() -> Router<SharedState> {
    Router::new()
        .route("/fhir/$inbox", get(inbox_page))
        .route("/fhir/$inbox/ack", post(inbox_ack))
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    cursor: Option<String>,
    #[serde(rename = "_count")]
    count: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AckQuery {
    cursor: Option<String>,
}

const NO_INBOX: ApiError = ApiError::NotSupported {
    status: StatusCode::NOT_FOUND,
    message: "no such endpoint (see /fhir/metadata)",
};

/// Scope and mode checks shared by both inbox handlers.
fn authorise(caller: &Caller) -> Result<(), ApiError> {
    let needed = ScopeSet::parse("system/*.rs").map_err(|_| ApiError::Internal)?;
    if !needed.is_subset_of(caller.grant.scopes()) {
        return Err(ApiError::Forbidden {
            message: "the inbox needs the system/*.rs scope".into(),
        });
    }
    if caller.partner.delivery.mode != DeliveryMode::Inbox {
        return Err(ApiError::Forbidden {
            message: "this partner receives records by push, not through an inbox".into(),
        });
    }
    Ok(())
}

fn bad_cursor() -> ApiError {
    ApiError::NotSupported {
        status: StatusCode::BAD_REQUEST,
        message: "the cursor is not one this server issued",
    }
}

fn inbox_error(error: InboxError) -> ApiError {
    match error {
        InboxError::BadCursor => bad_cursor(),
        InboxError::Store(error) => error.into(),
    }
}

async fn inbox_page(
    State(state): State<SharedState>,
    Extension(ctx): Extension<RequestCtx>,
    caller: Caller,
    inbox: Option<Extension<Inbox>>,
    Query(query): Query<PageQuery>,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::Read);
    let Some(Extension(inbox)) = inbox else {
        return Err(NO_INBOX);
    };
    authorise(&caller)?;
    let cursor = query
        .cursor
        .as_deref()
        .map(InboxCursor::decode)
        .transpose()
        .map_err(inbox_error)?;
    let count = match query.count.as_deref() {
        None => DEFAULT_PAGE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or(ApiError::NotSupported {
                status: StatusCode::BAD_REQUEST,
                message: "_count must be a whole number from 1 to 500",
            })?,
    };
    let page = inbox
        .page(&caller.partner.id, cursor, count)
        .await
        .map_err(inbox_error)?;
    ctx.set_detail(format!(
        "inbox page: {} records, {} withheld",
        page.entries.len(),
        page.withheld
    ));
    let base = format!("{}/fhir/$inbox", state.base_url);
    let mut links = vec![json!({
        "relation": "self",
        "url": match cursor {
            Some(cursor) => format!("{base}?cursor={}&_count={count}", cursor.encode()),
            None => format!("{base}?_count={count}"),
        }
    })];
    if let Some(next) = page.next {
        links.push(json!({
            "relation": "next",
            "url": format!("{base}?cursor={}&_count={count}", next.encode())
        }));
    }
    let mut entries = Vec::with_capacity(page.entries.len());
    for entry in &page.entries {
        let mut resource: Value = serde_json::from_slice(&entry.content).map_err(|error| {
            tracing::error!(%error, seq = entry.seq, "stored content is not JSON");
            ApiError::Internal
        })?;
        if let Value::Object(map) = &mut resource {
            let meta = map.entry("meta").or_insert_with(|| json!({}));
            if let Value::Object(meta) = meta {
                meta.insert(
                    "versionId".into(),
                    Value::String(entry.version_id.to_string()),
                );
                if let Ok(at) = entry.committed_at.format(&Rfc3339) {
                    meta.insert("lastUpdated".into(), Value::String(at));
                }
                // Ids are scoped to the submitting partner: say whose id this is.
                meta.insert(
                    "source".into(),
                    Value::String(format!("urn:caregate:partner:{}", entry.partner)),
                );
            }
        }
        entries.push(json!({ "resource": resource, "search": { "mode": "match" } }));
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries,
    });
    // Every record disclosed in the page is an access to that patient's record: one audit event
    // each, with the request's own event, committed before the page leaves (no unaudited
    // disclosure; the acknowledgement later records the delivery).
    let mut audit: Vec<caregate_audit::AuditEvent> = page
        .entries
        .iter()
        .map(|entry| {
            let mut event = caregate_audit::AuditEvent::new(
                ctx.request_id.to_string(),
                ctx.actor(),
                Action::Read,
                caregate_audit::Outcome::Success,
            );
            event.entity = Some(caregate_audit::Entity {
                resource_type: entry.resource_type.clone(),
                id: entry.id.clone(),
                version_id: Some(entry.version_id),
                content_hash: Some(hex::encode(entry.content_hash)),
            });
            event.patient = entry.nhs_number.clone();
            event.detail = Some(format!(
                "served in an inbox page; submitted by {}",
                entry.partner
            ));
            event
        })
        .collect();
    audit.push(ctx.audit_event(200));
    state
        .store
        .submit(caregate_store::Submission {
            partner: caller.partner.id.clone(),
            idempotency_key: None,
            records: Vec::new(),
            audit,
        })
        .await?;
    let mut response = fhir_response(StatusCode::OK, &bundle);
    response.extensions_mut().insert(crate::context::Audited);
    Ok(response)
}

async fn inbox_ack(
    Extension(ctx): Extension<RequestCtx>,
    caller: Caller,
    inbox: Option<Extension<Inbox>>,
    Query(query): Query<AckQuery>,
) -> Result<Response, ApiError> {
    let Some(Extension(inbox)) = inbox else {
        return Err(NO_INBOX);
    };
    authorise(&caller)?;
    let cursor = query
        .cursor
        .as_deref()
        .ok_or(ApiError::NotSupported {
            status: StatusCode::BAD_REQUEST,
            message: "cursor is required (from the next link of the last page read)",
        })
        .and_then(|text| InboxCursor::decode(text).map_err(inbox_error))?;
    let acknowledged = inbox
        .acknowledge(&caller.partner.id, cursor, &ctx.request_id, ctx.actor())
        .await
        .map_err(inbox_error)?;
    ctx.set_detail(format!("inbox acknowledged: {acknowledged} records"));
    let outcome = json!({
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": "information",
            "code": "informational",
            "diagnostics": format!("{acknowledged} records acknowledged")
        }]
    });
    Ok(fhir_response(StatusCode::OK, &outcome))
}

/// State of the admin delivery routes.
#[derive(Debug, Clone)]
struct AdminDeliveries {
    store: Arc<dyn Store>,
}

/// The operator acting in an admin request: set by the admin listener's authentication
/// (`crate::admin`) before these handlers run — an IG officer signed in to the console, or a
/// partner system with the `ig-officer` role. Recorded as the actor of the request's audit event.
#[derive(Debug, Clone)]
pub struct Operator(pub caregate_audit::Actor);

/// Operators' delivery API, merged into the admin listener behind its authentication (every
/// request audited by the admin edge):
/// - `GET /admin/deliveries/status[?partner=ID]` — queue depth, oldest undelivered age, last failure;
/// - `GET /admin/deliveries/dead-letters[?partner=ID&after=ID&limit=N]`;
/// - `POST /admin/deliveries/replay` with `{"id": N}` or `{"partner": "ID"}` — the replay and its
///   audit event in one commit.
pub fn admin_routes<S: Clone + Send + Sync + 'static>(store: Arc<dyn Store>) -> Router<S> {
    Router::new()
        .route("/admin/deliveries/status", get(admin_status))
        .route("/admin/deliveries/dead-letters", get(admin_dead_letters))
        .route("/admin/deliveries/replay", post(admin_replay))
        .with_state(AdminDeliveries { store })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusParams {
    partner: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterParams {
    partner: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

/// 400 with an OperationOutcome naming what is wrong (never echoing record data).
fn bad_request(message: String) -> ApiError {
    ApiError::Rejected(caregate_fhir::validate::Rejection {
        kind: caregate_fhir::validate::RejectionKind::Structure,
        outcome: caregate_fhir::OperationOutcome::single(caregate_fhir::Issue::request(
            caregate_fhir::IssueCode::Value,
            message,
        )),
    })
}

/// A partner id as the configuration allows them (`[[partner]] id`).
fn partner_param(value: Option<&str>) -> Result<Option<String>, ApiError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(id)
            if id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            Ok(Some(id.to_owned()))
        }
        Some(_) => Err(bad_request(
            "partner: expected a partner id (1-64 letters, digits, '-' or '_')".into(),
        )),
    }
}

fn query<T: serde::de::DeserializeOwned + Default>(raw: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|error| bad_request(format!("query parameters: {error}")))
}

fn json_ok(body: &Value) -> Response {
    let mut response = (StatusCode::OK, body.to_string()).into_response();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn deliver_error(error: caregate_deliver::DeliverError) -> ApiError {
    match error {
        caregate_deliver::DeliverError::Store(error) => error.into(),
        other => {
            tracing::error!(error = %other, "admin delivery request failed");
            ApiError::Internal
        }
    }
}

fn operator_of(operator: Option<Extension<Operator>>) -> Result<caregate_audit::Actor, ApiError> {
    // Defence in depth: these routes are only mounted behind the admin authentication.
    operator
        .map(|Extension(Operator(actor))| actor)
        .ok_or_else(|| ApiError::Forbidden {
            message: "the delivery API is served on the admin listener only".into(),
        })
}

async fn admin_status(
    State(admin): State<AdminDeliveries>,
    Extension(ctx): Extension<RequestCtx>,
    operator: Option<Extension<Operator>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::Metadata);
    ctx.set_detail("delivery status");
    operator_of(operator)?;
    let params: StatusParams = query(raw.as_deref())?;
    let partner = partner_param(params.partner.as_deref())?;
    let report = operations::status(admin.store.as_ref(), partner.as_deref())
        .await
        .map_err(deliver_error)?;
    Ok(json_ok(&json!({ "destinations": report })))
}

async fn admin_dead_letters(
    State(admin): State<AdminDeliveries>,
    Extension(ctx): Extension<RequestCtx>,
    operator: Option<Extension<Operator>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::Metadata);
    ctx.set_detail("delivery dead letters");
    operator_of(operator)?;
    let params: DeadLetterParams = query(raw.as_deref())?;
    let partner = partner_param(params.partner.as_deref())?;
    let after = match params
        .after
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        None => 0,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|after| *after >= 0)
            .ok_or_else(|| bad_request("after: expected a dead-letter id (0 or more)".into()))?,
    };
    let limit = match params
        .limit
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        None => 100,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=operations::MAX_DEAD_LETTERS).contains(limit))
            .ok_or_else(|| {
                bad_request(format!(
                    "limit: expected a number from 1 to {}",
                    operations::MAX_DEAD_LETTERS
                ))
            })?,
    };
    let letters = operations::dead_letters(admin.store.as_ref(), partner.as_deref(), after, limit)
        .await
        .map_err(deliver_error)?;
    ctx.set_detail(format!("delivery dead letters: {} listed", letters.len()));
    let next = (letters.len() >= limit)
        .then(|| letters.last().map(|letter| letter.id))
        .flatten();
    Ok(json_ok(
        &json!({ "dead_letters": letters, "next_after": next }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    id: Option<i64>,
    partner: Option<String>,
}

async fn admin_replay(
    State(admin): State<AdminDeliveries>,
    Extension(ctx): Extension<RequestCtx>,
    operator: Option<Extension<Operator>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::DeliveryReplay);
    let actor = operator_of(operator)?;
    let usage =
        "the body must be JSON {\"id\": <dead-letter id>} or {\"partner\": \"<partner id>\"}";
    let request: ReplayRequest =
        serde_json::from_slice(&body).map_err(|_| bad_request(usage.into()))?;
    let selector = match (request.id, partner_param(request.partner.as_deref())?) {
        (Some(id), None) => ReplaySelector::One(id),
        (None, Some(partner)) => ReplaySelector::Partner(partner),
        _ => {
            return Err(bad_request(format!(
                "give exactly one of id or partner: {usage}"
            )));
        }
    };
    ctx.set_detail(operations::describe(&selector));
    if let ReplaySelector::One(id) = selector
        && !operations::is_dead_letter(admin.store.as_ref(), id)
            .await
            .map_err(deliver_error)?
    {
        ctx.set_detail(format!("replay dead letter {id}: not a dead letter"));
        return Err(ApiError::NotFound);
    }
    // The request's own audit event, written in the same commit as the replay.
    let mut event = ctx.audit_event(StatusCode::OK.as_u16());
    event.actor = caregate_audit::Actor {
        remote_addr: event.actor.remote_addr.clone(),
        ..actor
    };
    let replayed = operations::replay_audited(admin.store.as_ref(), selector, event)
        .await
        .map_err(deliver_error)?;
    let mut response = json_ok(&json!({ "replayed": replayed }));
    response.extensions_mut().insert(crate::context::Audited);
    Ok(response)
}
