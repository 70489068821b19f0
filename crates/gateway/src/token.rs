//! `POST /auth/token`: the SMART Backend Services token endpoint
//! (<http://hl7.org/fhir/smart-app-launch/backend-services.html>). The form is read here; every
//! rule about the assertion lives in `caregate_auth`. Errors follow RFC 6749 §5.2 (JSON `error`
//! and `error_description`), not OperationOutcome, because OAuth clients expect that shape.

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use caregate_audit::Action;
use caregate_auth::TokenRequest;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::json;

use crate::app::SharedState;
use crate::context::RequestCtx;
use crate::error::ApiError;
use crate::fhir_api::read_limited;

#[derive(Debug, Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    client_assertion_type: Option<String>,
    client_assertion: Option<String>,
    scope: Option<String>,
}

fn oauth_json(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

pub(crate) async fn token(
    State(state): State<SharedState>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    ctx.set_action(Action::TokenRequest);
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
        .unwrap_or(false);
    if !form_type {
        return oauth_json(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "error_description": "the token request must be application/x-www-form-urlencoded"}),
        );
    }
    let bytes = match read_limited(&headers, body, state.limits.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(error @ ApiError::PayloadTooLarge { .. }) => return error.into_response(),
        Err(_) => {
            return oauth_json(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_request", "error_description": "the request body could not be read"}),
            );
        }
    };
    let form: TokenForm = match serde_urlencoded::from_bytes(&bytes) {
        Ok(form) => form,
        Err(_) => {
            return oauth_json(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_request", "error_description": "the form could not be parsed (duplicate or malformed fields)"}),
            );
        }
    };
    let request = TokenRequest {
        grant_type: form.grant_type,
        client_assertion_type: form.client_assertion_type,
        client_assertion: form.client_assertion,
        scope: form.scope,
    };
    if let Some(client_id) = claimed_client_id(&request) {
        ctx.set_client_id(&client_id);
    }
    match state
        .authority
        .issue_token(&request, ctx.client_cert_thumbprint.as_deref())
    {
        Ok(response) => {
            if let Some(partner) = state.partners.get(&response_client(&request)) {
                ctx.set_partner(partner);
            }
            let body = serde_json::to_value(&response).unwrap_or_default();
            oauth_json(StatusCode::OK, body)
        }
        Err(error) => {
            ctx.set_detail(error.error_code());
            let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST);
            let mut response = oauth_json(status, error.to_json());
            if status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"caregate\", error=\"invalid_client\""),
                );
            }
            response
        }
    }
}

fn response_client(request: &TokenRequest) -> String {
    claimed_client_id(request).unwrap_or_default()
}

/// The `iss` an assertion claims, read WITHOUT verification, for the audit trail of the attempt
/// only (a failed attempt is recorded with the client id it claimed). Bounded: large or malformed
/// assertions yield nothing.
fn claimed_client_id(request: &TokenRequest) -> Option<String> {
    use base64::Engine as _;
    let assertion = request.client_assertion.as_deref()?;
    if assertion.len() > 8 * 1024 {
        return None;
    }
    let payload = assertion.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims
        .get("iss")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
}
