//! The application: shared state, the routes, and the edge middleware. This module is the one
//! place that knows the order of the stages for a request:
//!
//! 1. **edge** ([`edge`]) — request id, per-request context, the request timeout, and, after the
//!    handler, the audit phase that runs for every request, failed ones too;
//! 2. **auth** ([`Caller`] extractor) — bearer token verified (cached) and bound to a partner;
//! 3. **handler** ([`crate::fhir_api`], [`crate::token`], [`crate::capability`]) — bounded body
//!    read, validation, and the durable commit of record + audit event before any 2xx.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use caregate_auth::scope::Interaction;
use caregate_auth::{AccessGrant, Authority};
use caregate_fhir::Validator;
use caregate_store::{Store, Submission};
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};

use crate::config::{LimitsSection, Partner};
use crate::context::{Audited, RequestCtx};
use crate::error::ApiError;
use crate::server::ConnInfo;
use crate::{capability, fhir_api, token};

/// Everything a request handler needs, shared by all requests.
#[derive(Debug)]
pub struct AppState {
    pub validator: Validator,
    pub store: Arc<dyn Store>,
    pub authority: Authority,
    pub partners: HashMap<String, Arc<Partner>>,
    /// Public base URL, no trailing slash (e.g. `https://localhost:8443`).
    pub base_url: String,
    pub limits: LimitsSection,
    /// The consent/IG policy; `None` when `[policy]` is not configured.
    pub policy: Option<Arc<crate::policy_stage::PolicyStage>>,
}

pub type SharedState = Arc<AppState>;

/// Build the router.
pub fn router(state: SharedState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    Router::new()
        .route("/auth/token", post(token::token))
        .route(
            "/.well-known/smart-configuration",
            get(capability::smart_configuration),
        )
        .route(
            "/fhir/.well-known/smart-configuration",
            get(capability::smart_configuration),
        )
        .route("/fhir/metadata", get(capability::metadata))
        .route("/fhir", post(fhir_api::submit_bundle))
        .route("/fhir/{resource_type}", post(fhir_api::create))
        .route(
            "/fhir/{resource_type}/{id}",
            put(fhir_api::update).get(fhir_api::read),
        )
        // Partner inbox (issue 4): `/fhir/$inbox`, `/fhir/$inbox/ack`.
        .merge(crate::deliveries_api::inbox_routes())
        .merge(crate::bulk_export::routes())
        // Emergency access (LR-2): `POST /fhir/Patient/$break-glass`.
        .merge(crate::break_glass::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are read through `fhir_api::read_body`, which enforces the configured limit and
        // answers 413 with an OperationOutcome; axum's own limit is set just above it.
        .layer(DefaultBodyLimit::max(body_limit.saturating_add(1)))
        .layer(from_fn_with_state(state.clone(), edge))
        // Liveness for load balancers: outside the edge, so it is neither audited nor timed.
        .route("/health", get(|| async { "ok" }))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotSupported {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint (see /fhir/metadata)",
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::NotSupported {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: "this method is not supported on this endpoint (see /fhir/metadata)",
    }
}

/// `X-Request-Id` values we accept from clients: short, printable, no separators that could
/// smuggle into logs.
fn valid_request_id(value: &str) -> bool {
    (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The request's trace and metrics, around everything else: one `request` span (the stages'
/// spans are its children) named by the route template, never the raw path (ids in paths may be
/// patient identifiers); the request counter and latency once the response is final.
async fn edge(state: State<SharedState>, request: Request, next: Next) -> Response {
    use tracing::Instrument as _;
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "(unmatched)".to_owned());
    let span = tracing::info_span!(
        target: crate::telemetry::REQUEST_TARGET,
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    let response = edge_phases(state, request, next)
        .instrument(span.clone())
        .await;
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
    crate::metrics::global().request(method.as_str(), &route, status, started.elapsed());
    response
}

/// The edge middleware: request id, context, timeout, and the audit phase.
async fn edge_phases(
    State(state): State<SharedState>,
    mut request: Request,
    next: Next,
) -> Response {
    let conn = request.extensions().get::<ConnInfo>().cloned();
    let supplied = request
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let (request_id, bad_request_id) = match supplied {
        Some(id) if valid_request_id(&id) => (id, false),
        Some(_) => (uuid::Uuid::new_v4().to_string(), true),
        None => (uuid::Uuid::new_v4().to_string(), false),
    };
    let started = std::time::Instant::now();
    let method = request.method().clone();
    // The route template, never the raw path: ids in paths may be patient identifiers.
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "(unmatched)".to_owned());
    let ctx = RequestCtx::new(
        request_id.clone(),
        !bad_request_id && request.headers().contains_key("x-request-id"),
        conn.as_ref().map(|c| c.remote),
        conn.and_then(|c| c.client_cert_thumbprint),
    );
    request.extensions_mut().insert(ctx.clone());

    let response = if bad_request_id {
        ApiError::Rejected(caregate_fhir::validate::Rejection {
            kind: caregate_fhir::validate::RejectionKind::Structure,
            outcome: caregate_fhir::OperationOutcome::single(caregate_fhir::Issue::request(
                caregate_fhir::IssueCode::Value,
                "X-Request-Id must be 1-128 characters of letters, digits, '-', '_', '.' or ':'",
            )),
        })
        .into_response()
    } else {
        let timeout = Duration::from_secs(state.limits.request_timeout_secs);
        match tokio::time::timeout(timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => {
                tracing::warn!(request_id = %ctx.request_id, "request timed out");
                ApiError::Timeout.into_response()
            }
        }
    };

    // The audit phase: every request gets exactly one event. Handlers that committed records
    // wrote theirs in the same commit; the rest are written here, before the response leaves, so
    // there is no unaudited access (DOMAIN.md B2 T3).
    let mut response = if response.extensions().get::<Audited>().is_some() {
        response
    } else {
        let event = ctx.audit_event(response.status().as_u16());
        let submission = Submission {
            partner: ctx.partner_id().unwrap_or_default(),
            idempotency_key: None,
            records: Vec::new(),
            audit: vec![event],
        };
        match state.store.submit(submission).await {
            Ok(_) => response,
            Err(error) => {
                tracing::error!(request_id = %ctx.request_id, %error, "audit write failed; refusing the response");
                ApiError::from(error).into_response()
            }
        }
    };
    tracing::debug!(
        request_id = %ctx.request_id,
        %method,
        %route,
        status = response.status().as_u16(),
        partner = ctx.partner_id().as_deref().unwrap_or("-"),
        elapsed_us = started.elapsed().as_micros() as u64,
        "request"
    );
    if let Ok(value) = HeaderValue::from_str(&ctx.request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An authenticated caller: a verified bearer token bound to a registered partner.
#[derive(Debug, Clone)]
pub struct Caller {
    pub grant: Arc<AccessGrant>,
    pub partner: Arc<Partner>,
}

impl Caller {
    /// Require that the token's scopes allow `interaction` on `resource_type` (403 otherwise).
    pub fn require(&self, resource_type: &str, interaction: Interaction) -> Result<(), ApiError> {
        if self.grant.scopes().allows(resource_type, interaction) {
            Ok(())
        } else {
            Err(ApiError::Forbidden {
                message: format!(
                    "the access token's scopes do not allow {} on {resource_type}",
                    interaction_name(interaction)
                ),
            })
        }
    }
}

fn interaction_name(interaction: Interaction) -> &'static str {
    match interaction {
        Interaction::Create => "create",
        Interaction::Read => "read",
        Interaction::Update => "update",
        Interaction::Delete => "delete",
        Interaction::Search => "search",
    }
}

const BEARER_CHALLENGE: &str = "Bearer realm=\"caregate\"";

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        // The auth stage's span: the partner id (an organisation, not a patient) and the outcome.
        let span = tracing::info_span!(
            target: crate::telemetry::STAGE_TARGET,
            "auth",
            partner = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let caller = span.in_scope(|| authenticate(parts, state));
        match &caller {
            Ok(caller) => {
                span.record("partner", caller.partner.id.as_str());
                span.record("outcome", "ok");
            }
            Err(error) => {
                span.record("outcome", error.status().as_u16());
            }
        }
        caller
    }
}

/// Verify the bearer token and bind it to a registered partner (the auth stage).
fn authenticate(parts: &mut Parts, state: &SharedState) -> Result<Caller, ApiError> {
    let ctx = parts.extensions.get::<RequestCtx>().cloned();
    let thumbprint = ctx.as_ref().and_then(|c| c.client_cert_thumbprint.clone());
    let token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or_else(|| ApiError::Unauthorized {
            www_authenticate: BEARER_CHALLENGE.to_owned(),
            message: "a bearer access token is required (see /.well-known/smart-configuration)"
                .into(),
        })?;
    let grant = state
        .authority
        .verify_bearer(token, thumbprint.as_deref())
        .map_err(|error| ApiError::Unauthorized {
            www_authenticate: error.www_authenticate(),
            message: error.to_string(),
        })?;
    let partner = state
        .partners
        .get(grant.client_id())
        .cloned()
        .ok_or_else(|| ApiError::Unauthorized {
            www_authenticate: BEARER_CHALLENGE.to_owned(),
            message: "the token's client is no longer registered".into(),
        })?;
    if let Some(ctx) = &ctx {
        ctx.set_partner(&partner);
    }
    Ok(Caller { grant, partner })
}
