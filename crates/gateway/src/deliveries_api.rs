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
//! **Admin.** [`admin_routes`] gives `GET /deliveries/status`, `GET /deliveries/dead-letters`
//! and `POST /deliveries/replay` as a router to merge into the admin listener (which does the
//! operators' authentication).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
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
/// `inbox`, certificate paths resolved against the config file's directory.
pub fn destinations(config: &Config) -> Vec<DestinationConfig> {
    let base = config
        .path
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .to_owned();
    let resolve = |path: &Option<std::path::PathBuf>| {
        path.as_ref().map(|path| {
            if path.is_absolute() {
                path.clone()
            } else {
                base.join(path)
            }
        })
    };
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
            destination.tls = PushTls {
                ca_cert: resolve(&section.ca_cert),
                client_cert: resolve(&section.client_cert),
                client_key: resolve(&section.client_key),
            };
            if let Some(secs) = section.timeout_secs {
                destination.timeout = Duration::from_secs(secs.max(1));
            }
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

/// Operators' delivery API, to merge into the admin router (which authenticates operators):
/// - `GET /deliveries/status[?partner=ID]` — queue depth, oldest undelivered age, last failure;
/// - `GET /deliveries/dead-letters[?partner=ID&after=ID&limit=N]`;
/// - `POST /deliveries/replay` with `{"id": N}` or `{"partner": "ID"}` — audited.
pub fn admin_routes<S: Clone + Send + Sync + 'static>(store: Arc<dyn Store>) -> Router<S> {
    Router::new()
        .route("/deliveries/status", get(admin_status))
        .route("/deliveries/dead-letters", get(admin_dead_letters))
        .route("/deliveries/replay", post(admin_replay))
        .with_state(AdminDeliveries { store })
}

#[derive(Debug, Deserialize)]
struct PartnerFilter {
    partner: Option<String>,
    after: Option<i64>,
    limit: Option<usize>,
}

fn admin_failure(error: caregate_deliver::DeliverError) -> Response {
    tracing::warn!(%error, "admin delivery request failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": "the store cannot answer right now" })),
    )
        .into_response()
}

async fn admin_status(
    State(admin): State<AdminDeliveries>,
    Query(filter): Query<PartnerFilter>,
) -> Response {
    match operations::status(admin.store.as_ref(), filter.partner.as_deref()).await {
        Ok(report) => Json(json!({ "destinations": report })).into_response(),
        Err(error) => admin_failure(error),
    }
}

async fn admin_dead_letters(
    State(admin): State<AdminDeliveries>,
    Query(filter): Query<PartnerFilter>,
) -> Response {
    let limit = filter.limit.unwrap_or(100);
    match operations::dead_letters(
        admin.store.as_ref(),
        filter.partner.as_deref(),
        filter.after.unwrap_or(0),
        limit,
    )
    .await
    {
        Ok(letters) => {
            let next = (letters.len() >= limit.clamp(1, operations::MAX_DEAD_LETTERS))
                .then(|| letters.last().map(|letter| letter.id))
                .flatten();
            Json(json!({ "dead_letters": letters, "next_after": next })).into_response()
        }
        Err(error) => admin_failure(error),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    id: Option<i64>,
    partner: Option<String>,
}

async fn admin_replay(
    State(admin): State<AdminDeliveries>,
    ctx: Option<Extension<RequestCtx>>,
    Json(request): Json<ReplayRequest>,
) -> Response {
    let selector = match (request.id, request.partner) {
        (Some(id), None) => ReplaySelector::One(id),
        (None, Some(partner)) => ReplaySelector::Partner(partner),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": "give exactly one of id or partner" })),
            )
                .into_response();
        }
    };
    let (request_id, operator) = match &ctx {
        Some(Extension(ctx)) => (
            ctx.request_id.to_string(),
            ctx.actor()
                .client_id
                .unwrap_or_else(|| "admin-api".to_owned()),
        ),
        None => (uuid::Uuid::new_v4().to_string(), "admin-api".to_owned()),
    };
    match operations::replay(admin.store.as_ref(), selector, &request_id, &operator).await {
        Ok(replayed) => Json(json!({ "replayed": replayed })).into_response(),
        Err(error) => admin_failure(error),
    }
}
