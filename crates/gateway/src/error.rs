//! The one classifier: every failure the edge can answer with is an [`ApiError`], and each variant
//! maps to exactly one HTTP status and one `OperationOutcome` issue code. Internal detail (store
//! errors, I/O) goes to the log with the request id; the partner sees a fixed message and the id.

use axum::response::{IntoResponse, Response};
use caregate_fhir::validate::{Rejection, RejectionKind};
use caregate_fhir::{Issue, IssueCode, OperationOutcome};
use http::{HeaderValue, StatusCode, header};

/// The FHIR JSON media type.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// A failure answered to the client.
#[derive(Debug)]
pub enum ApiError {
    /// Input failed parsing, schema or rules: 400 (structure) or 422 (business rule).
    Rejected(Rejection),
    /// A request the gateway does not support (route, method, parameter): 400 or 404.
    NotSupported {
        status: StatusCode,
        message: &'static str,
    },
    /// Body larger than the configured limit: 413.
    PayloadTooLarge { limit: usize },
    /// Content-Type is not FHIR JSON: 415.
    UnsupportedMediaType,
    /// Missing or invalid bearer token: 401 with `WWW-Authenticate`.
    Unauthorized {
        www_authenticate: String,
        message: String,
    },
    /// Authenticated, but the token's scopes or the client certificate do not cover this: 403.
    Forbidden { message: String },
    /// Nothing there (or nothing the caller may see — no existence oracle): 404.
    NotFound,
    /// `POST` create with an id that already exists for this partner: 409.
    Conflict { message: &'static str },
    /// `If-Match` does not name the current version: 412.
    PreconditionFailed,
    /// The request took longer than the configured timeout: 503 (the work may not have happened).
    Timeout,
    /// The store cannot commit right now (disk full, busy, failed): 503 with `Retry-After`.
    Unavailable { retry_after_secs: u32 },
    /// A bug or an unexpected failure: 500 with a correlation id only.
    Internal,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Rejected(r) => match r.kind {
                RejectionKind::BusinessRule => StatusCode::UNPROCESSABLE_ENTITY,
                RejectionKind::Structure | RejectionKind::NotSupported => StatusCode::BAD_REQUEST,
            },
            Self::NotSupported { status, .. } => *status,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Self::Timeout | Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `OperationOutcome` sent to the client.
    pub fn outcome(&self) -> OperationOutcome {
        let single =
            |code, message: String| OperationOutcome::single(Issue::request(code, message));
        match self {
            Self::Rejected(r) => r.outcome.clone(),
            Self::NotSupported { message, .. } => single(IssueCode::NotSupported, (*message).into()),
            Self::PayloadTooLarge { limit } => {
                single(IssueCode::TooLong, format!("request body exceeds the limit of {limit} bytes"))
            }
            Self::UnsupportedMediaType => single(
                IssueCode::NotSupported,
                "Content-Type must be application/fhir+json or application/json".into(),
            ),
            Self::Unauthorized { message, .. } => single(IssueCode::Login, message.clone()),
            Self::Forbidden { message } => single(IssueCode::Forbidden, message.clone()),
            Self::NotFound => single(IssueCode::NotFound, "no such resource".into()),
            Self::Conflict { message } => single(IssueCode::Conflict, (*message).into()),
            Self::PreconditionFailed => single(
                IssueCode::Conflict,
                "If-Match does not name the current version of the resource".into(),
            ),
            Self::Timeout => single(
                IssueCode::Timeout,
                "the request did not complete in time; it may be retried with the same X-Request-Id".into(),
            ),
            Self::Unavailable { .. } => single(
                IssueCode::Transient,
                "the gateway cannot store records right now; nothing was stored, retry later".into(),
            ),
            Self::Internal => single(
                IssueCode::Exception,
                "internal error; quote the X-Request-Id of this response to the operators".into(),
            ),
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> Self {
        Self::Rejected(rejection)
    }
}

impl From<caregate_store::StoreError> for ApiError {
    fn from(error: caregate_store::StoreError) -> Self {
        use caregate_store::StoreError;
        match error {
            StoreError::Conflict => Self::Conflict {
                message: "a resource with this id already exists",
            },
            StoreError::PreconditionFailed => Self::PreconditionFailed,
            StoreError::Unavailable(reason) => {
                tracing::warn!(%reason, "store unavailable");
                Self::Unavailable {
                    retry_after_secs: 5,
                }
            }
            StoreError::Failed(reason) => {
                tracing::error!(%reason, "store failed; refusing writes");
                Self::Unavailable {
                    retry_after_secs: 60,
                }
            }
        }
    }
}

/// A FHIR JSON response with the given status and body.
pub fn fhir_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = (status, bytes).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = fhir_response(self.status(), &self.outcome().to_json());
        let headers = response.headers_mut();
        match &self {
            Self::Unauthorized {
                www_authenticate, ..
            } => {
                if let Ok(value) = HeaderValue::from_str(www_authenticate) {
                    headers.insert(header::WWW_AUTHENTICATE, value);
                }
            }
            Self::Unavailable { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            Self::Timeout => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1u32));
            }
            _ => {}
        }
        response
    }
}
