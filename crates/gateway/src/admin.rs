//! The IG officers' listener (DOMAIN.md `IGQ`, `LR-2`, `AUD-*`): a JSON audit API and the web
//! console ([`crate::console`]), served on a separate address (`[admin]`) with the same TLS.
//!
//! **Who may use it.** IG officers configured as `[[ig_officer]]` sign in with a password (Argon2id
//! PHC hash) and get a server-side session: a random 256-bit id in a `__Host-` cookie (`Secure`,
//! `HttpOnly`, `SameSite=Strict`), ending after `session_idle_secs` idle or `session_max_secs`
//! in all. Every state-changing form carries a per-session CSRF token (the sign-in form a
//! double-submit token). The JSON API also accepts a SMART bearer token of a partner with
//! `roles = ["ig-officer"]` and scope `system/AuditEvent.rs`. Anyone else: 401 (no credentials) or
//! 403 (credentials without the role or scope); console pages redirect to the sign-in page.
//!
//! **Audited.** [`admin_edge`] plays the partner edge's role here: every request to this listener
//! — sign-ins (failed ones too), searches, views, exports, reviews, verification — leaves exactly
//! one audit event in the same store and chain, with the officer (client id `ig-officer/<name>`,
//! their ODS code) or the partner as actor and the patient searched for, if any. A review is
//! written in the same commit as its own event.
//!
//! **Operators' APIs.** The same principals run delivery operations
//! (`/admin/deliveries/{status,dead-letters,replay}`, see `crate::deliveries_api`) and load the
//! National Data Opt-out list (`GET`/`PUT /admin/consent/ndoo`); on a console session, a request
//! that changes state needs the session's CSRF token in `X-CSRF-Token`.
//!
//! **Not audited:** `/livez`, `/readyz` and `/metrics` (`crate::telemetry`, `crate::metrics`),
//! which carry no patient data and answer without credentials.
//!
//! Architecture invariant: nothing here logs a patient identifier; error messages never echo a
//! submitted NHS number.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHash, PasswordVerifier as _};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, RawQuery, Request, State};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use caregate_audit::report::{SarBuilder, is_break_glass};
use caregate_audit::{Action, Actor, Entity, export};
use caregate_auth::scope::Interaction;
use caregate_fhir::nhs_number::{NhsNumber, NhsNumberPolicy};
use caregate_fhir::validate::{Rejection, RejectionKind};
use caregate_fhir::{Issue, IssueCode, OperationOutcome};
use caregate_store::sqlite::{AuditVerification, verify_audit};
use caregate_store::{AuditPage, AuditQuery, AuditReview, Seq, StoreError, Submission};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use time::OffsetDateTime;

use crate::app::{Caller, SharedState};
use crate::config::{Config, IgOfficer, PartnerRole};
use crate::console::{Viewer, pages};
use crate::context::{Audited, RequestCtx};
use crate::error::ApiError;
use crate::runtime::AUDIT_PUBLIC_KEY_FILE;
use crate::server::ConnInfo;

const SESSION_COOKIE: &str = "__Host-caregate-session";
const LOGIN_COOKIE: &str = "__Host-caregate-login";
/// Sessions held at once; the oldest is dropped beyond this.
const MAX_SESSIONS: usize = 1_000;
/// Concurrent password verifications (Argon2id is deliberately expensive: bound the CPU).
const LOGIN_CONCURRENCY: usize = 2;
/// Admin request bodies are small forms and JSON.
const MAX_ADMIN_BODY: usize = 64 * 1024;
const MAX_NOTE_CHARS: usize = 1_000;
/// The largest NDOO list accepted: about 2.7 million NHS numbers (12 bytes a line with CRLF),
/// far above an ICS's opted-out population.
const MAX_NDOO_BODY: usize = 32 * 1024 * 1024;
/// The scope a partner's token needs for the audit API.
const AUDIT_SCOPE_TYPE: &str = "AuditEvent";
const SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// What the admin listener needs beyond the partner app's state.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub officers: Vec<IgOfficer>,
    /// The data directory, for chain verification.
    pub data_dir: PathBuf,
    /// With the PostgreSQL store: verification checks this instance's chain in the database.
    pub postgres: Option<crate::config::PostgresSettings>,
    /// The audit log id, named as the `source.observer` of exported FHIR AuditEvents.
    pub log_id: String,
    pub nhs_number_policy: NhsNumberPolicy,
    pub session_idle: Duration,
    pub session_max: Duration,
}

impl AdminSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            officers: config.ig_officers.clone(),
            data_dir: config.data_dir.clone(),
            postgres: match &config.store {
                crate::config::StoreSettings::Postgres(pg) => Some(pg.clone()),
                crate::config::StoreSettings::Sqlite => None,
            },
            log_id: config.audit.log_id.clone(),
            nhs_number_policy: config.nhs_number_policy(),
            session_idle: Duration::from_secs(config.admin.session_idle_secs),
            session_max: Duration::from_secs(config.admin.session_max_secs),
        }
    }
}

#[derive(Debug)]
struct AdminState {
    app: SharedState,
    settings: AdminSettings,
    sessions: Sessions,
    login_permits: tokio::sync::Semaphore,
}

type Admin = Arc<AdminState>;

/// The admin listener's router: the JSON audit API under `/admin/audit`, the console under
/// `/console`. `settings` carries what the partner app's state does not (officers, data dir).
pub fn admin_router(state: SharedState, settings: AdminSettings) -> Router {
    let admin = Arc::new(AdminState {
        app: state,
        sessions: Sessions::new(settings.session_idle, settings.session_max),
        settings,
        login_permits: tokio::sync::Semaphore::new(LOGIN_CONCURRENCY),
    });
    Router::new()
        .route("/admin/audit/events", get(api_events))
        .route("/admin/audit/events/{seq}", get(api_event))
        .route("/admin/audit/sar", get(api_sar))
        .route("/admin/audit/sar.txt", get(api_sar_text))
        .route("/admin/audit/export.csv", get(api_export_csv))
        .route("/admin/audit/export.ndjson", get(api_export_ndjson))
        .route("/admin/audit/reviews", post(api_review))
        .route("/admin/audit/verify", get(api_verify))
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console", get(console_search))
        .route(
            "/console/login",
            get(console_login_form).post(console_login),
        )
        .route("/console/logout", post(console_logout))
        .route("/console/events/{seq}", get(console_event))
        .route(
            "/console/reviews",
            get(console_reviews).post(console_review),
        )
        .route("/console/sar", get(console_sar))
        .route("/console/verify", get(console_verify))
        .merge(operations_routes(&admin))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_ADMIN_BODY))
        .layer(from_fn_with_state(admin.clone(), admin_edge))
        // Probes and metrics sit outside `admin_edge` (added after its layer): unauthenticated,
        // not audited. They disclose no patient data — process health, and aggregate counts
        // labelled by route template, stage, rule, partner or feed — and orchestrators and
        // Prometheus scrape them every few seconds (ARCHITECTURE.md "Observability").
        .route("/livez", get(crate::telemetry::livez))
        .route("/readyz", get(crate::telemetry::readyz))
        .route("/metrics", get(crate::metrics::prometheus_text))
        .with_state(admin)
}

/// The operators' APIs, behind [`require_operator`]: delivery status, dead letters and replay
/// (`crate::deliveries_api`), and the National Data Opt-out list (upload and status).
fn operations_routes(admin: &Admin) -> Router<Admin> {
    crate::deliveries_api::admin_routes::<Admin>(admin.app.store.clone())
        .route(
            "/admin/consent/ndoo",
            get(api_ndoo_status)
                .put(api_ndoo_upload)
                .layer(DefaultBodyLimit::max(MAX_NDOO_BODY)),
        )
        .route("/admin/policy/reload", post(api_policy_reload))
        .route_layer(from_fn_with_state(admin.clone(), require_operator))
}

async fn not_found() -> ApiError {
    ApiError::NotSupported {
        status: StatusCode::NOT_FOUND,
        message: "no such admin endpoint",
    }
}

// ---------------------------------------------------------------------------------------------
// The edge: request id, context, timeout, security headers, and the audit phase.

/// The officer acting in this request, when a console session (not a partner token) is used.
#[derive(Debug, Clone, Default)]
struct OfficerSlot(Arc<Mutex<Option<Actor>>>);

impl OfficerSlot {
    fn set(&self, actor: Actor) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(actor);
    }

    fn get(&self) -> Option<Actor> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn officer_actor(officer: &IgOfficer, remote: Option<&str>) -> Actor {
    Actor {
        partner_id: None,
        ods_code: Some(officer.ods_code.to_string()),
        client_id: Some(format!("ig-officer/{}", officer.username)),
        remote_addr: remote.map(str::to_owned),
    }
}

async fn admin_edge(State(admin): State<Admin>, mut request: Request, next: Next) -> Response {
    let conn = request.extensions().get::<ConnInfo>().cloned();
    let request_id = uuid::Uuid::new_v4().to_string();
    let ctx = RequestCtx::new(
        request_id.clone(),
        false,
        conn.as_ref().map(|c| c.remote),
        conn.and_then(|c| c.client_cert_thumbprint),
    );
    let officer = OfficerSlot::default();
    request.extensions_mut().insert(ctx.clone());
    request.extensions_mut().insert(officer.clone());
    let timeout = Duration::from_secs(admin.app.limits.request_timeout_secs);
    let response = match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    };
    let mut response = if response.extensions().get::<Audited>().is_some() {
        response
    } else {
        let mut event = ctx.audit_event(response.status().as_u16());
        if let Some(actor) = officer.get() {
            event.actor = Actor {
                remote_addr: event.actor.remote_addr.clone(),
                ..actor
            };
        }
        let submission = Submission {
            partner: submission_partner(&event.actor),
            idempotency_key: None,
            records: Vec::new(),
            audit: vec![event],
        };
        match admin.app.store.submit(submission).await {
            Ok(_) => response,
            Err(error) => {
                tracing::error!(request_id = %request_id, %error, "admin audit write failed; refusing the response");
                ApiError::from(error).into_response()
            }
        }
    };
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert("x-request-id", value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

fn submission_partner(actor: &Actor) -> String {
    actor
        .partner_id
        .clone()
        .or_else(|| actor.client_id.clone())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Sessions and tokens.

#[derive(Debug)]
struct Session {
    username: String,
    csrf: String,
    created: Instant,
    seen: Instant,
}

/// Server-side sessions, keyed by the SHA-256 of the cookie value (a memory dump does not yield
/// usable cookies).
#[derive(Debug)]
struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    idle: Duration,
    max: Duration,
}

fn random_token() -> Result<String, ApiError> {
    use aws_lc_rs::rand::SecureRandom as _;
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ApiError::Internal)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn session_key(id: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_bytes()).as_ref())
}

fn same_token(a: &str, b: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

impl Sessions {
    fn new(idle: Duration, max: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            idle,
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new session for `username`: (cookie value, CSRF token).
    fn create(&self, username: &str) -> Result<(String, String), ApiError> {
        let id = random_token()?;
        let csrf = random_token()?;
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| !self.expired(s, now));
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            session_key(&id),
            Session {
                username: username.to_owned(),
                csrf: csrf.clone(),
                created: now,
                seen: now,
            },
        );
        Ok((id, csrf))
    }

    fn expired(&self, session: &Session, now: Instant) -> bool {
        now.duration_since(session.seen) > self.idle
            || now.duration_since(session.created) > self.max
    }

    /// The session's (username, CSRF token), refreshing its idle timer.
    fn get(&self, id: &str) -> Option<(String, String)> {
        let now = Instant::now();
        let key = session_key(id);
        let mut map = self.lock();
        let expired = self.expired(map.get(&key)?, now);
        if expired {
            map.remove(&key);
            return None;
        }
        let session = map.get_mut(&key)?;
        session.seen = now;
        Some((session.username.clone(), session.csrf.clone()))
    }

    fn remove(&self, id: &str) {
        self.lock().remove(&session_key(id));
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn set_cookie(response: &mut Response, name: &str, value: &str, max_age: Option<u64>) {
    let age = max_age
        .map(|secs| format!("; Max-Age={secs}"))
        .unwrap_or_default();
    let text = format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict{age}");
    if let Ok(value) = HeaderValue::from_str(&text) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
}

/// A signed-in officer (from the session cookie).
#[derive(Debug, Clone)]
struct Officer {
    officer: IgOfficer,
    csrf: String,
    session: String,
}

impl Officer {
    fn viewer(&self) -> Viewer<'_> {
        Viewer {
            username: &self.officer.username,
            name: &self.officer.name,
            ods_code: self.officer.ods_code.as_str(),
            csrf: &self.csrf,
        }
    }
}

/// The officer of the request's session cookie, if it names a live session; recorded as the
/// request's actor.
fn session_officer(parts: &Parts, admin: &AdminState) -> Option<Officer> {
    let id = cookie(&parts.headers, SESSION_COOKIE)?;
    let (username, csrf) = admin.sessions.get(id)?;
    let officer = admin
        .settings
        .officers
        .iter()
        .find(|o| o.username == username)?
        .clone();
    if let Some(slot) = parts.extensions.get::<OfficerSlot>() {
        let remote = parts
            .extensions
            .get::<RequestCtx>()
            .and_then(|ctx| ctx.remote)
            .map(|r| r.ip().to_string());
        slot.set(officer_actor(&officer, remote.as_deref()));
    }
    Some(Officer {
        officer,
        csrf,
        session: id.to_owned(),
    })
}

/// Who is calling the JSON API: an officer's session or an IG partner's bearer token.
#[derive(Debug, Clone)]
enum ApiPrincipal {
    Officer(Officer),
    Partner(String),
}

impl ApiPrincipal {
    fn reviewer(&self) -> String {
        match self {
            Self::Officer(officer) => officer.officer.username.clone(),
            Self::Partner(id) => id.clone(),
        }
    }
}

impl FromRequestParts<Admin> for ApiPrincipal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, admin: &Admin) -> Result<Self, ApiError> {
        if parts.headers.contains_key(header::AUTHORIZATION) {
            let caller = Caller::from_request_parts(parts, &admin.app).await?;
            if !caller.partner.roles.contains(&PartnerRole::IgOfficer) {
                return Err(ApiError::Forbidden {
                    message: "the audit API is for IG officers: this partner does not have the ig-officer role".into(),
                });
            }
            caller.require(AUDIT_SCOPE_TYPE, Interaction::Search)?;
            caller.require(AUDIT_SCOPE_TYPE, Interaction::Read)?;
            return Ok(Self::Partner(caller.partner.id.clone()));
        }
        match session_officer(parts, admin) {
            Some(officer) => Ok(Self::Officer(officer)),
            None => Err(ApiError::Unauthorized {
                www_authenticate: "Bearer realm=\"caregate-admin\"".into(),
                message: "sign in at /console/login, or send a bearer token of a partner with the ig-officer role".into(),
            }),
        }
    }
}

/// A console page's officer; anyone else is sent to the sign-in page.
struct ConsoleOfficer(Officer);

impl FromRequestParts<Admin> for ConsoleOfficer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, admin: &Admin) -> Result<Self, Response> {
        session_officer(parts, admin)
            .map(ConsoleOfficer)
            .ok_or_else(|| Redirect::to("/console/login").into_response())
    }
}

// ---------------------------------------------------------------------------------------------
// Query parameters.

/// The search parameters, as sent (forms send empty strings for empty fields).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchParams {
    patient: Option<String>,
    partner: Option<String>,
    from: Option<String>,
    to: Option<String>,
    action: Option<String>,
    outcome: Option<String>,
    break_glass: Option<String>,
    unreviewed: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn parse_flag(name: &str, value: &Option<String>) -> Result<bool, String> {
    match non_empty(value) {
        None | Some("false") => Ok(false),
        Some("true" | "on") => Ok(true),
        Some(_) => Err(format!("{name}: expected true or false")),
    }
}

/// `YYYY-MM-DD` (a whole UTC day; as `to`, the day is included) or an RFC 3339 date-time.
fn parse_instant(name: &str, text: &str, end_of_day: bool) -> Result<OffsetDateTime, String> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(at);
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(text, format)
        .map_err(|_| format!("{name}: expected a date (YYYY-MM-DD) or an RFC 3339 date-time"))?;
    let day = if end_of_day {
        date.next_day()
            .ok_or_else(|| format!("{name}: date out of range"))?
    } else {
        date
    };
    Ok(day.midnight().assume_utc())
}

fn parse_enum<T: serde::de::DeserializeOwned>(name: &str, text: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| format!("{name}: not a known value"))
}

fn parse_patient(text: &str, policy: &NhsNumberPolicy) -> Result<String, String> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    NhsNumber::parse(&compact, policy)
        .map(|n| n.as_str().to_owned())
        .map_err(|e| format!("patient: not a valid NHS number — {e}"))
}

/// Parse a raw query string into an [`AuditQuery`] and the form to echo back.
fn parse_search(
    raw: Option<&str>,
    policy: &NhsNumberPolicy,
) -> Result<(AuditQuery, pages::SearchForm), String> {
    let params: SearchParams = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| format!("query parameters: {e}"))?;
    let form = pages::SearchForm {
        patient: non_empty(&params.patient).unwrap_or("").to_owned(),
        partner: non_empty(&params.partner).unwrap_or("").to_owned(),
        from: non_empty(&params.from).unwrap_or("").to_owned(),
        to: non_empty(&params.to).unwrap_or("").to_owned(),
        action: non_empty(&params.action).unwrap_or("").to_owned(),
        outcome: non_empty(&params.outcome).unwrap_or("").to_owned(),
        break_glass: parse_flag("break_glass", &params.break_glass).unwrap_or(false),
    };
    let query = AuditQuery {
        patient: non_empty(&params.patient)
            .map(|p| parse_patient(p, policy))
            .transpose()?,
        partner: non_empty(&params.partner).map(str::to_owned),
        from: non_empty(&params.from)
            .map(|t| parse_instant("from", t, false))
            .transpose()?,
        to: non_empty(&params.to)
            .map(|t| parse_instant("to", t, true))
            .transpose()?,
        action: non_empty(&params.action)
            .map(|a| parse_enum("action", a))
            .transpose()?,
        outcome: non_empty(&params.outcome)
            .map(|o| parse_enum("outcome", o))
            .transpose()?,
        break_glass_only: parse_flag("break_glass", &params.break_glass)?,
        unreviewed_only: parse_flag("unreviewed", &params.unreviewed)?,
        after_seq: non_empty(&params.after)
            .map(|a| {
                a.parse::<Seq>()
                    .map_err(|_| "after: expected a sequence number".to_owned())
            })
            .transpose()?,
        limit: non_empty(&params.limit)
            .map(|l| {
                l.parse::<usize>()
                    .map_err(|_| "limit: expected a number".to_owned())
            })
            .transpose()?
            .unwrap_or(0),
    };
    if let (Some(from), Some(to)) = (query.from, query.to)
        && from >= to
    {
        return Err("from must be before to".to_owned());
    }
    Ok((query, form))
}

fn bad_request(message: String) -> ApiError {
    ApiError::Rejected(Rejection {
        kind: RejectionKind::Structure,
        outcome: OperationOutcome::single(Issue::request(IssueCode::Value, message)),
    })
}

// ---------------------------------------------------------------------------------------------
// Shared operations.

fn note_query(ctx: &RequestCtx, action: Action, query: &AuditQuery) {
    ctx.set_action(action);
    ctx.set_patient(query.patient.as_deref());
}

/// Build the subject-access report for `patient`, paging through the store.
async fn build_sar(
    admin: &AdminState,
    patient: String,
) -> Result<caregate_audit::report::SubjectAccessReport, StoreError> {
    let mut builder = SarBuilder::new(patient.clone(), OffsetDateTime::now_utc());
    let mut query = AuditQuery {
        patient: Some(patient),
        limit: AuditQuery::MAX_LIMIT,
        ..AuditQuery::default()
    };
    let mut pages = 0usize;
    loop {
        let page = admin.app.store.query_audit(&query).await?;
        for stored in &page.events {
            builder.push(u64::try_from(stored.seq).unwrap_or(0), &stored.event);
        }
        pages += 1;
        // MAX_SAR_ENTRIES bounds the rows kept; stop reading well past it.
        match page.next {
            Some(next)
                if pages * AuditQuery::MAX_LIMIT <= 2 * caregate_audit::report::MAX_SAR_ENTRIES =>
            {
                query.after_seq = Some(next);
            }
            _ => break,
        }
    }
    Ok(builder.finish())
}

#[derive(Debug)]
enum ReviewError {
    Api(ApiError),
}

impl From<ApiError> for ReviewError {
    fn from(error: ApiError) -> Self {
        Self::Api(error)
    }
}

/// Mark `seq` reviewed: the review and its own audit event in one commit (`LR-2`).
async fn record_review(
    admin: &AdminState,
    ctx: &RequestCtx,
    actor: Option<Actor>,
    reviewer: String,
    seq: Seq,
    note: &str,
    status: StatusCode,
) -> Result<AuditReview, ReviewError> {
    ctx.set_action(Action::Review);
    ctx.set_entity(Entity {
        resource_type: "AuditEvent".into(),
        id: seq.to_string(),
        version_id: None,
        content_hash: None,
    });
    let note = note.trim();
    if note.is_empty() || note.chars().count() > MAX_NOTE_CHARS {
        return Err(bad_request(format!(
            "note: 1 to {MAX_NOTE_CHARS} characters are required"
        ))
        .into());
    }
    let Some((stored, _)) = admin
        .app
        .store
        .audit_event(seq)
        .await
        .map_err(ApiError::from)?
    else {
        return Err(ApiError::NotFound.into());
    };
    ctx.set_patient(stored.event.patient.as_deref());
    if !is_break_glass(&stored.event) {
        return Err(ApiError::Conflict {
            message: "only break-glass events (purpose ETREAT or BTG) are reviewed",
        }
        .into());
    }
    let mut event = ctx.audit_event(status.as_u16());
    if let Some(actor) = actor {
        event.actor = Actor {
            remote_addr: event.actor.remote_addr.clone(),
            ..actor
        };
    }
    let review = AuditReview {
        seq,
        reviewer,
        reviewed_at: OffsetDateTime::now_utc(),
        note: note.to_owned(),
    };
    match admin.app.store.review_audit(review, event).await {
        Ok(review) => Ok(review),
        Err(StoreError::Conflict) => Err(ApiError::Conflict {
            message: "this event has already been reviewed",
        }
        .into()),
        Err(StoreError::PreconditionFailed) => Err(ApiError::NotFound.into()),
        Err(error) => Err(ApiError::from(error).into()),
    }
}

async fn run_verification(admin: &AdminState) -> Result<AuditVerification, String> {
    let data_dir = admin.settings.data_dir.clone();
    if let Some(pg) = &admin.settings.postgres {
        // This instance's chain (its key and log id are in its data directory); `caregate audit
        // verify --config` checks every instance's.
        let text = tokio::fs::read_to_string(data_dir.join(AUDIT_PUBLIC_KEY_FILE))
            .await
            .map_err(|_| {
                "the audit log's public key file is missing from the data directory".to_owned()
            })?;
        let mut parts = text.split_whitespace();
        let (Some(log_id), Some(key)) = (parts.next(), parts.next()) else {
            return Err("the audit log's public key file is not `LOG_ID BASE64`".to_owned());
        };
        let verifier = caregate_audit::CheckpointVerifier::from_public_key_base64(log_id, key)
            .map_err(|e| format!("the audit log's public key is not valid: {e}"))?;
        let url = pg.url()?;
        let tls = pg.tls()?;
        return caregate_store::postgres::verify_instance(
            url.expose(),
            &tls,
            &pg.instance_id,
            &verifier,
            &[],
        )
        .await
        .map(|instance| instance.verification)
        .map_err(|e| {
            tracing::error!(error = %e, "audit verification could not run");
            "the audit log could not be read for verification".to_owned()
        });
    }
    tokio::task::spawn_blocking(move || {
        let key_path = data_dir.join(AUDIT_PUBLIC_KEY_FILE);
        let text = std::fs::read_to_string(&key_path).map_err(|_| {
            "the audit log's public key file is missing from the data directory".to_owned()
        })?;
        let mut parts = text.split_whitespace();
        let (Some(log_id), Some(key)) = (parts.next(), parts.next()) else {
            return Err("the audit log's public key file is not `LOG_ID BASE64`".to_owned());
        };
        let verifier = caregate_audit::CheckpointVerifier::from_public_key_base64(log_id, key)
            .map_err(|e| format!("the audit log's public key is not valid: {e}"))?;
        verify_audit(&data_dir, &verifier, &[]).map_err(|e| {
            tracing::error!(error = %e, "audit verification could not run");
            "the audit log could not be read for verification".to_owned()
        })
    })
    .await
    .map_err(|_| "the verification task failed".to_owned())?
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn event_json(
    stored: &caregate_store::StoredAuditEvent,
    review: Option<&AuditReview>,
) -> serde_json::Value {
    serde_json::json!({
        "seq": stored.seq,
        "event": stored.event,
        "break_glass": is_break_glass(&stored.event),
        "review": review,
    })
}

fn page_json(page: &AuditPage) -> serde_json::Value {
    let events: Vec<_> = page
        .events
        .iter()
        .map(|stored| event_json(stored, page.reviews.iter().find(|r| r.seq == stored.seq)))
        .collect();
    serde_json::json!({ "events": events, "next": page.next })
}

fn verification_json(verification: &AuditVerification) -> serde_json::Value {
    let report = &verification.report;
    serde_json::json!({
        "result": if verification.is_ok() { "VERIFIED" } else { "FAILED" },
        "events": report.events,
        "tree_size": report.tree_size,
        "root": report.root.to_hex(),
        "checkpoints_given": report.checkpoints_given,
        "checkpoints_matched": report.checkpoints_matched,
        "attested_size": report.attested_size,
        "first_bad_seq": report.first_bad_seq,
        "findings": report.findings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "findings_total": report.findings_total,
        "column_mismatches": verification.column_mismatches,
        "latest_checkpoint": verification.latest_checkpoint,
    })
}

// ---------------------------------------------------------------------------------------------
// The JSON API.

async fn api_events(
    _principal: ApiPrincipal,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (query, _) =
        parse_search(raw.as_deref(), &admin.settings.nhs_number_policy).map_err(bad_request)?;
    note_query(&ctx, Action::AuditQuery, &query);
    let page = admin.app.store.query_audit(&query).await?;
    Ok(json_response(StatusCode::OK, &page_json(&page)))
}

async fn api_event(
    _principal: ApiPrincipal,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    Path(seq): Path<String>,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::AuditQuery);
    let seq: Seq = seq
        .parse()
        .map_err(|_| bad_request("the event id must be a sequence number".into()))?;
    let (stored, review) = admin
        .app
        .store
        .audit_event(seq)
        .await?
        .ok_or(ApiError::NotFound)?;
    ctx.set_patient(stored.event.patient.as_deref());
    Ok(json_response(
        StatusCode::OK,
        &event_json(&stored, review.as_ref()),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SarParams {
    patient: Option<String>,
}

fn sar_patient(raw: Option<&str>, policy: &NhsNumberPolicy) -> Result<Option<String>, String> {
    let params: SarParams = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| format!("query parameters: {e}"))?;
    non_empty(&params.patient)
        .map(|p| parse_patient(p, policy))
        .transpose()
}

async fn api_sar_report(
    admin: &AdminState,
    ctx: &RequestCtx,
    raw: Option<&str>,
) -> Result<caregate_audit::report::SubjectAccessReport, ApiError> {
    ctx.set_action(Action::AuditQuery);
    let patient = sar_patient(raw, &admin.settings.nhs_number_policy)
        .map_err(bad_request)?
        .ok_or_else(|| bad_request("patient: an NHS number is required".into()))?;
    ctx.set_patient(Some(&patient));
    Ok(build_sar(admin, patient).await?)
}

async fn api_sar(
    _principal: ApiPrincipal,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let report = api_sar_report(&admin, &ctx, raw.as_deref()).await?;
    let body = serde_json::to_value(&report).map_err(|_| ApiError::Internal)?;
    Ok(json_response(StatusCode::OK, &body))
}

async fn api_sar_text(
    _principal: ApiPrincipal,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let report = api_sar_report(&admin, &ctx, raw.as_deref()).await?;
    let mut response = report.to_text().into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"subject-access-report.txt\""),
    );
    Ok(response)
}

#[derive(Debug, Clone, Copy)]
enum ExportFormat {
    Csv,
    Ndjson,
}

/// Stream every event matching `query`, one store page at a time (bounded memory). A store
/// failure mid-stream ends the body with an error, so the client sees a truncated transfer rather
/// than a short file that looks complete.
fn export_body(admin: Admin, query: AuditQuery, format: ExportFormat) -> Body {
    struct Cursor {
        admin: Admin,
        query: AuditQuery,
        header: bool,
        done: bool,
    }
    let start = Cursor {
        admin,
        query: AuditQuery {
            limit: AuditQuery::MAX_LIMIT,
            ..query
        },
        header: matches!(format, ExportFormat::Csv),
        done: false,
    };
    let stream = futures_util::stream::unfold(start, move |mut cursor| async move {
        if cursor.done {
            return None;
        }
        let mut chunk = String::new();
        if cursor.header {
            chunk.push_str(&export::csv_header());
            cursor.header = false;
        }
        let page = match cursor.admin.app.store.query_audit(&cursor.query).await {
            Ok(page) => page,
            Err(error) => {
                tracing::error!(%error, "audit export stopped: the store could not be read");
                cursor.done = true;
                return Some((Err(std::io::Error::other("audit export failed")), cursor));
            }
        };
        for stored in &page.events {
            let seq = u64::try_from(stored.seq).unwrap_or(0);
            let line = match format {
                ExportFormat::Csv => export::csv_row(seq, &stored.event),
                ExportFormat::Ndjson => {
                    export::ndjson_line(seq, &stored.event, &cursor.admin.settings.log_id)
                }
            };
            match line {
                Ok(line) => chunk.push_str(&line),
                Err(error) => {
                    tracing::error!(%error, "audit export stopped");
                    cursor.done = true;
                    return Some((Err(std::io::Error::other("audit export failed")), cursor));
                }
            }
        }
        match page.next {
            Some(next) => cursor.query.after_seq = Some(next),
            None => cursor.done = true,
        }
        Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), cursor))
    });
    Body::from_stream(stream)
}

async fn api_export(
    admin: Admin,
    ctx: RequestCtx,
    raw: Option<String>,
    format: ExportFormat,
) -> Result<Response, ApiError> {
    let (query, _) =
        parse_search(raw.as_deref(), &admin.settings.nhs_number_policy).map_err(bad_request)?;
    note_query(&ctx, Action::Export, &query);
    ctx.set_detail(match format {
        ExportFormat::Csv => "csv",
        ExportFormat::Ndjson => "fhir-ndjson",
    });
    let (content_type, file) = match format {
        ExportFormat::Csv => (
            "text/csv; charset=utf-8",
            "attachment; filename=\"caregate-audit.csv\"",
        ),
        ExportFormat::Ndjson => (
            "application/fhir+ndjson",
            "attachment; filename=\"caregate-audit.ndjson\"",
        ),
    };
    let mut response = export_body(admin, query, format).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static(file));
    Ok(response)
}

async fn api_export_csv(
    _principal: ApiPrincipal,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    api_export(admin, ctx, raw, ExportFormat::Csv).await
}

async fn api_export_ndjson(
    _principal: ApiPrincipal,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    api_export(admin, ctx, raw, ExportFormat::Ndjson).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewRequest {
    seq: Seq,
    note: String,
}

async fn api_review(
    principal: ApiPrincipal,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::Review);
    let actor = match &principal {
        // A session cookie is ambient: require the CSRF token too (a bearer token is not).
        ApiPrincipal::Officer(officer) => {
            let sent = headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !same_token(sent, &officer.csrf) {
                return Err(ApiError::Forbidden {
                    message: "a session-authenticated POST needs the X-CSRF-Token header".into(),
                });
            }
            Some(officer_actor(&officer.officer, None))
        }
        ApiPrincipal::Partner(_) => None,
    };
    let request: ReviewRequest = serde_json::from_slice(&body).map_err(|_| {
        bad_request("the body must be JSON {\"seq\": <number>, \"note\": \"...\"}".into())
    })?;
    match record_review(
        &admin,
        &ctx,
        actor,
        principal.reviewer(),
        request.seq,
        &request.note,
        StatusCode::CREATED,
    )
    .await
    {
        Ok(review) => {
            let body = serde_json::to_value(&review).map_err(|_| ApiError::Internal)?;
            let mut response = json_response(StatusCode::CREATED, &body);
            response.extensions_mut().insert(Audited);
            Ok(response)
        }
        Err(ReviewError::Api(error)) => Err(error),
    }
}

async fn api_verify(
    _principal: ApiPrincipal,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::AuditQuery);
    ctx.set_detail("verify");
    match run_verification(&admin).await {
        Ok(verification) => Ok(json_response(
            StatusCode::OK,
            &verification_json(&verification),
        )),
        Err(message) => {
            tracing::error!(%message, "audit verification failed to run");
            Err(ApiError::Internal)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The operators' APIs: deliveries (crate::deliveries_api) and the NDOO list.

/// Authenticate an operators' API request as the JSON API does ([`ApiPrincipal`]); a request
/// that changes state on a console session must also carry the session's CSRF token (a bearer
/// token is not ambient, so it needs none). The acting operator rides on as
/// [`Operator`](crate::deliveries_api::Operator) for handlers that write their own audit event.
async fn require_operator(State(admin): State<Admin>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let principal = match ApiPrincipal::from_request_parts(&mut parts, &admin).await {
        Ok(principal) => principal,
        Err(error) => return error.into_response(),
    };
    let actor = match &principal {
        ApiPrincipal::Officer(officer) => {
            if !matches!(parts.method, http::Method::GET | http::Method::HEAD) {
                let sent = parts
                    .headers
                    .get("x-csrf-token")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if !same_token(sent, &officer.csrf) {
                    return ApiError::Forbidden {
                        message: "a session-authenticated request that changes state needs the X-CSRF-Token header".into(),
                    }
                    .into_response();
                }
            }
            let remote = parts
                .extensions
                .get::<RequestCtx>()
                .and_then(|ctx| ctx.remote)
                .map(|r| r.ip().to_string());
            officer_actor(&officer.officer, remote.as_deref())
        }
        ApiPrincipal::Partner(_) => parts
            .extensions
            .get::<RequestCtx>()
            .map(RequestCtx::actor)
            .unwrap_or_default(),
    };
    parts
        .extensions
        .insert(crate::deliveries_api::Operator(actor));
    next.run(Request::from_parts(parts, body)).await
}

fn policy_stage(admin: &AdminState) -> Result<Arc<crate::policy_stage::PolicyStage>, ApiError> {
    admin.app.policy.clone().ok_or(ApiError::Conflict {
        message: "no [policy] is configured: there is no consent registry to load a list into",
    })
}

/// `POST /admin/policy/reload`: load the policy bundle from `[policy] dir` again, as SIGHUP does
/// (issue 3: "hot-reload atomically (SIGHUP and … an admin call)"). A bundle that fails validation
/// is refused with its file, line and message, and the bundle in force stays; either way the
/// request is one audited `policy-reload` event naming the version in force afterwards.
async fn api_policy_reload(
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::PolicyReload);
    let stage = policy_stage(&admin)?;
    let reloading = std::sync::Arc::clone(&stage);
    let result = tokio::task::spawn_blocking(move || reloading.reload())
        .await
        .map_err(|_| ApiError::Internal)?;
    match result {
        Ok(version) => {
            tracing::info!(%version, "policy reloaded (admin API)");
            ctx.set_detail(format!("policy bundle reloaded: {version}"));
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({ "reloaded": true, "version": version }),
            ))
        }
        Err(error) => {
            tracing::error!(%error, "policy reload refused (admin API); the previous bundle stays in force");
            let message: String = format!("reload refused: {error}")
                .chars()
                .take(500)
                .collect();
            ctx.set_detail(message.clone());
            Ok(json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({
                    "reloaded": false,
                    "version": stage.version(),
                    "error": message,
                }),
            ))
        }
    }
}

/// `GET /admin/consent/ndoo`: the NDOO cache's size, load time, maximum age and freshness.
async fn api_ndoo_status(
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
) -> Result<Response, ApiError> {
    ctx.set_action(Action::Metadata);
    ctx.set_detail("NDOO list status");
    let status = policy_stage(&admin)?.ndoo_status(OffsetDateTime::now_utc());
    let body = serde_json::to_value(&status).map_err(|_| ApiError::Internal)?;
    Ok(json_response(StatusCode::OK, &body))
}

/// `PUT /admin/consent/ndoo` with `text/plain`, one NHS number per line (the national service's
/// format, as `caregate consent load-ndoo` takes): validated whole, installed as the configured
/// `[policy] ndoo_list` and applied at once (`NDOO-5`, `NDOO-6`). Audited as a policy reload; the
/// answer and the audit detail carry counts and line numbers, never an NHS number.
async fn api_ndoo_upload(
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    use crate::policy_stage::PolicyStageError;
    ctx.set_action(Action::PolicyReload);
    ctx.set_detail("NDOO list upload");
    let stage = policy_stage(&admin)?;
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if media_type.as_deref() != Some("text/plain") {
        ctx.set_detail("NDOO list upload refused: not text/plain");
        return Err(ApiError::NotSupported {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: "Content-Type must be text/plain: one NHS number per line",
        });
    }
    let Ok(text) = String::from_utf8(body.to_vec()) else {
        ctx.set_detail("NDOO list upload refused: not UTF-8");
        return Err(bad_request("the list must be UTF-8 text".into()));
    };
    let result = tokio::task::spawn_blocking(move || stage.install_ndoo(&text))
        .await
        .map_err(|_| ApiError::Internal)?;
    match result {
        Ok(status) => {
            ctx.set_detail(format!(
                "NDOO list installed and applied: {} NHS numbers",
                status.entries.unwrap_or(0)
            ));
            let body = serde_json::to_value(&status).map_err(|_| ApiError::Internal)?;
            Ok(json_response(StatusCode::OK, &body))
        }
        Err(PolicyStageError::NdooRefused(reason)) => {
            ctx.set_detail(format!("NDOO list upload refused: {reason}"));
            Err(bad_request(format!(
                "the NDOO list was refused, the previous list stays in force: {reason}"
            )))
        }
        Err(PolicyStageError::NoNdooList) => {
            ctx.set_detail("NDOO list upload refused: no [policy] ndoo_list configured");
            Err(ApiError::Conflict {
                message: "the configuration has no [policy] ndoo_list to install the list as",
            })
        }
        Err(error) => {
            tracing::error!(%error, "the NDOO list could not be installed");
            ctx.set_detail("NDOO list upload failed: the list could not be written");
            Err(ApiError::Internal)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The console.

fn html(status: StatusCode, page: String) -> Response {
    let mut response = (status, page).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

fn console_error(officer: Option<&Officer>, error: &ApiError) -> Response {
    let status = error.status();
    let message = match error {
        ApiError::NotFound => "There is no audit event with that number.".to_owned(),
        ApiError::Unavailable { .. } | ApiError::Timeout => {
            "The audit log cannot be read right now; try again in a minute.".to_owned()
        }
        ApiError::Internal => {
            "Something went wrong; the operators can find it by the X-Request-Id of this page."
                .to_owned()
        }
        other => other
            .outcome()
            .to_json()
            .pointer("/issue/0/diagnostics")
            .and_then(|v| v.as_str())
            .unwrap_or("The request could not be completed.")
            .to_owned(),
    };
    let title = status.canonical_reason().unwrap_or("Error");
    html(
        status,
        pages::error(officer.map(Officer::viewer).as_ref(), title, &message),
    )
}

async fn console_search(
    ConsoleOfficer(officer): ConsoleOfficer,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    RawQuery(raw): RawQuery,
) -> Response {
    let viewer = officer.viewer();
    let searched = raw.as_deref().is_some_and(|q| !q.is_empty());
    if !searched {
        ctx.set_detail("console");
        return html(
            StatusCode::OK,
            pages::search(&viewer, &pages::SearchForm::default(), None, None),
        );
    }
    let (query, form) = match parse_search(raw.as_deref(), &admin.settings.nhs_number_policy) {
        Ok(parsed) => parsed,
        Err(message) => {
            let form = pages::SearchForm::default();
            return html(
                StatusCode::BAD_REQUEST,
                pages::search(&viewer, &form, None, Some(&message)),
            );
        }
    };
    note_query(&ctx, Action::AuditQuery, &query);
    match admin.app.store.query_audit(&query).await {
        Ok(page) => html(
            StatusCode::OK,
            pages::search(
                &viewer,
                &form,
                Some(&pages::Results {
                    events: &page.events,
                    reviews: &page.reviews,
                    next: page.next,
                }),
                None,
            ),
        ),
        Err(error) => console_error(Some(&officer), &ApiError::from(error)),
    }
}

async fn console_event(
    ConsoleOfficer(officer): ConsoleOfficer,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    Path(seq): Path<String>,
) -> Response {
    ctx.set_action(Action::AuditQuery);
    let Ok(seq) = seq.parse::<Seq>() else {
        return console_error(Some(&officer), &ApiError::NotFound);
    };
    match admin.app.store.audit_event(seq).await {
        Ok(Some((stored, review))) => {
            ctx.set_patient(stored.event.patient.as_deref());
            html(
                StatusCode::OK,
                pages::event(&officer.viewer(), &stored, review.as_ref()),
            )
        }
        Ok(None) => console_error(Some(&officer), &ApiError::NotFound),
        Err(error) => console_error(Some(&officer), &ApiError::from(error)),
    }
}

async fn console_reviews(
    ConsoleOfficer(officer): ConsoleOfficer,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    RawQuery(raw): RawQuery,
) -> Response {
    ctx.set_action(Action::AuditQuery);
    ctx.set_detail("break-glass review queue");
    let (mut query, _) = match parse_search(raw.as_deref(), &admin.settings.nhs_number_policy) {
        Ok(parsed) => parsed,
        Err(message) => return console_error(Some(&officer), &bad_request(message)),
    };
    query.break_glass_only = true;
    query.unreviewed_only = true;
    match admin.app.store.query_audit(&query).await {
        Ok(page) => html(
            StatusCode::OK,
            pages::reviews(&officer.viewer(), &page.events, page.next, None),
        ),
        Err(error) => console_error(Some(&officer), &ApiError::from(error)),
    }
}

#[derive(Debug, Deserialize)]
struct ReviewForm {
    csrf: String,
    seq: String,
    note: String,
}

async fn console_review(
    ConsoleOfficer(officer): ConsoleOfficer,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    body: Bytes,
) -> Response {
    ctx.set_action(Action::Review);
    let Ok(form) = serde_urlencoded::from_bytes::<ReviewForm>(&body) else {
        return console_error(
            Some(&officer),
            &bad_request("the review form was incomplete".into()),
        );
    };
    if !same_token(&form.csrf, &officer.csrf) {
        return console_error(
            Some(&officer),
            &ApiError::Forbidden {
                message: "The form has expired or did not come from this console. Reload the page and try again.".into(),
            },
        );
    }
    let Ok(seq) = form.seq.parse::<Seq>() else {
        return console_error(Some(&officer), &ApiError::NotFound);
    };
    let actor = officer_actor(&officer.officer, None);
    match record_review(
        &admin,
        &ctx,
        Some(actor),
        officer.officer.username.clone(),
        seq,
        &form.note,
        StatusCode::SEE_OTHER,
    )
    .await
    {
        Ok(_) => {
            let mut response = Redirect::to(&format!("/console/events/{seq}")).into_response();
            response.extensions_mut().insert(Audited);
            response
        }
        Err(ReviewError::Api(error)) => console_error(Some(&officer), &error),
    }
}

async fn console_sar(
    ConsoleOfficer(officer): ConsoleOfficer,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    RawQuery(raw): RawQuery,
) -> Response {
    let viewer = officer.viewer();
    let typed = serde_urlencoded::from_str::<SarParams>(raw.as_deref().unwrap_or(""))
        .ok()
        .and_then(|p| p.patient)
        .unwrap_or_default();
    let patient = match sar_patient(raw.as_deref(), &admin.settings.nhs_number_policy) {
        Ok(Some(patient)) => patient,
        Ok(None) => {
            ctx.set_detail("console");
            return html(StatusCode::OK, pages::sar(&viewer, "", None, None));
        }
        Err(message) => {
            return html(
                StatusCode::BAD_REQUEST,
                pages::sar(&viewer, &typed, None, Some(&message)),
            );
        }
    };
    ctx.set_action(Action::AuditQuery);
    ctx.set_patient(Some(&patient));
    ctx.set_detail("subject access report");
    match build_sar(&admin, patient.clone()).await {
        Ok(report) => html(
            StatusCode::OK,
            pages::sar(&viewer, &patient, Some(&report), None),
        ),
        Err(error) => console_error(Some(&officer), &ApiError::from(error)),
    }
}

async fn console_verify(
    ConsoleOfficer(officer): ConsoleOfficer,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
) -> Response {
    ctx.set_action(Action::AuditQuery);
    ctx.set_detail("verify");
    let result = run_verification(&admin).await;
    html(
        StatusCode::OK,
        pages::verify(&officer.viewer(), result.as_ref().map_err(String::as_str)),
    )
}

async fn console_login_form(
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    request: Request,
) -> Response {
    ctx.set_detail("console sign-in page");
    let (parts, _) = request.into_parts();
    if session_officer(&parts, &admin).is_some() {
        return Redirect::to("/console").into_response();
    }
    let token = match random_token() {
        Ok(token) => token,
        Err(error) => return console_error(None, &error),
    };
    let mut response = html(StatusCode::OK, pages::login(&token, None));
    set_cookie(&mut response, LOGIN_COOKIE, &token, Some(3600));
    response
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    csrf: String,
    username: String,
    password: String,
}

async fn console_login(
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    axum::Extension(slot): axum::Extension<OfficerSlot>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    ctx.set_detail("console sign-in");
    let refuse = |status: StatusCode, message: &str| {
        let token = random_token().unwrap_or_default();
        let mut response = html(status, pages::login(&token, Some(message)));
        set_cookie(&mut response, LOGIN_COOKIE, &token, Some(3600));
        response
    };
    let Ok(form) = serde_urlencoded::from_bytes::<LoginForm>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "Enter your username and password.");
    };
    ctx.set_client_id(&format!("ig-officer/{}", form.username));
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !same_token(&form.csrf, expected) {
        return refuse(
            StatusCode::FORBIDDEN,
            "The sign-in form has expired. Please try again.",
        );
    }
    if form.username.len() > 64 || form.password.len() > 1024 {
        return refuse(StatusCode::UNAUTHORIZED, "Wrong username or password.");
    }
    let officer = admin
        .settings
        .officers
        .iter()
        .find(|o| o.username == form.username)
        .cloned();
    // An unknown user is checked against a configured hash too, so timing does not reveal which
    // usernames exist.
    let Some(hash) = officer
        .as_ref()
        .or(admin.settings.officers.first())
        .map(|o| o.password_hash.clone())
    else {
        return refuse(StatusCode::UNAUTHORIZED, "Wrong username or password.");
    };
    let Ok(_permit) = admin.login_permits.acquire().await else {
        return console_error(None, &ApiError::Internal);
    };
    let password = form.password;
    let verified = tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash).is_ok_and(|hash| {
            Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        })
    })
    .await
    .unwrap_or(false);
    let officer = match officer {
        Some(officer) if verified => officer,
        _ => {
            tracing::info!(request_id = %ctx.request_id, "console sign-in refused");
            return refuse(StatusCode::UNAUTHORIZED, "Wrong username or password.");
        }
    };
    let remote = ctx.remote.map(|r| r.ip().to_string());
    slot.set(officer_actor(&officer, remote.as_deref()));
    let (session, _) = match admin.sessions.create(&officer.username) {
        Ok(created) => created,
        Err(error) => return console_error(None, &error),
    };
    let mut response = Redirect::to("/console").into_response();
    set_cookie(&mut response, SESSION_COOKIE, &session, None);
    set_cookie(&mut response, LOGIN_COOKIE, "", Some(0));
    response
}

#[derive(Debug, Deserialize)]
struct LogoutForm {
    csrf: String,
}

async fn console_logout(
    ConsoleOfficer(officer): ConsoleOfficer,
    State(admin): State<Admin>,
    axum::Extension(ctx): axum::Extension<RequestCtx>,
    body: Bytes,
) -> Response {
    ctx.set_detail("console sign-out");
    let csrf_ok = serde_urlencoded::from_bytes::<LogoutForm>(&body)
        .is_ok_and(|form| same_token(&form.csrf, &officer.csrf));
    if !csrf_ok {
        return console_error(
            Some(&officer),
            &ApiError::Forbidden {
                message: "The form has expired or did not come from this console. Reload the page and try again.".into(),
            },
        );
    }
    admin.sessions.remove(&officer.session);
    let mut response = Redirect::to("/console/login").into_response();
    set_cookie(&mut response, SESSION_COOKIE, "", Some(0));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> NhsNumberPolicy {
        NhsNumberPolicy::default()
    }

    #[test]
    fn igq_search_parameters_parse_with_clear_errors() {
        let (query, form) = parse_search(
            Some("patient=943+476+5919&partner=trust-rx1&from=2026-01-01&to=2026-01-31&action=read&outcome=success&break_glass=on&after=7&limit=50"),
            &policy(),
        )
        .unwrap();
        assert_eq!(query.patient.as_deref(), Some("9434765919"));
        assert_eq!(query.action, Some(Action::Read));
        assert_eq!(
            query.to,
            Some(time::macros::datetime!(2026-02-01 00:00 UTC))
        );
        assert!(query.break_glass_only);
        assert_eq!(query.after_seq, Some(7));
        assert_eq!(form.partner, "trust-rx1");

        let bad_nhs = parse_search(Some("patient=9434765918"), &policy()).unwrap_err();
        assert!(
            bad_nhs.starts_with("patient: not a valid NHS number"),
            "{bad_nhs}"
        );
        assert!(
            !bad_nhs.contains("9434765918"),
            "never echo the number: {bad_nhs}"
        );
        assert!(
            parse_search(Some("action=delete-everything"), &policy())
                .unwrap_err()
                .starts_with("action:")
        );
        assert!(
            parse_search(Some("from=yesterday"), &policy())
                .unwrap_err()
                .starts_with("from:")
        );
        assert!(
            parse_search(Some("patinet=1"), &policy())
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(parse_search(Some("from=2026-02-01&to=2026-01-01"), &policy()).is_err());
        // Empty form fields are absent.
        let (empty, _) = parse_search(Some("patient=&action=&break_glass="), &policy()).unwrap();
        assert_eq!(empty, AuditQuery::default());
    }

    #[test]
    fn sessions_expire_when_idle_and_tokens_are_random() {
        let sessions = Sessions::new(Duration::from_millis(0), Duration::from_secs(60));
        let (id, csrf) = sessions.create("alice").unwrap();
        assert_eq!(id.len(), 43, "256 bits, base64url");
        assert_ne!(id, csrf);
        std::thread::sleep(Duration::from_millis(2));
        assert!(sessions.get(&id).is_none());

        let sessions = Sessions::new(Duration::from_secs(60), Duration::from_secs(60));
        let (id, _) = sessions.create("alice").unwrap();
        assert_eq!(sessions.get(&id).map(|(u, _)| u).as_deref(), Some("alice"));
        sessions.remove(&id);
        assert!(sessions.get(&id).is_none());
        assert!(sessions.get("forged").is_none());
    }

    #[test]
    fn cookies_are_found_among_several_headers() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("__Host-caregate-session=xyz"),
        );
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("xyz"));
        assert_eq!(cookie(&headers, "b"), Some("2"));
        assert_eq!(cookie(&headers, "c"), None);
    }
}
