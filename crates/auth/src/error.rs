//! The closed sets of errors the auth stage returns, and how each reaches the wire.
//!
//! - [`TokenError`]: the token endpoint's RFC 6749 §5.2 error response. Every problem with the
//!   client assertion is `invalid_client` (401), as SMART Backend Services ("Response") and
//!   DOMAIN.md B2 row B5 require; the precise [`AssertionRejection`] is kept for audit and logs.
//! - [`BearerError`]: RFC 6750 §3 `WWW-Authenticate` challenges for resource requests.
//! - [`AuthSetupError`]: configuration problems found when the [`crate::Authority`] is built.
//!
//! Descriptions are fixed strings: nothing from a token or assertion is ever echoed.

/// Why a client assertion failed to authenticate the client (RFC 7523 §3, RFC 8725).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssertionRejection {
    /// No `client_assertion` parameter.
    Missing,
    /// `client_assertion_type` absent or not `urn:ietf:params:oauth:client-assertion-type:jwt-bearer`.
    UnsupportedAssertionType,
    /// Longer than the configured bound; not parsed at all (DOMAIN.md B2 row B2).
    TooLarge,
    /// Not a compact JWS with a JSON header and claims of the expected types.
    Malformed,
    /// `alg` not one of RS384, RS512, ES384, ES256 (RFC 8725 §3.1): this includes `none` and HS*.
    AlgorithmNotAllowed,
    /// `typ` present and not `JWT` (RFC 8725 §3.11).
    WrongType,
    /// A `crit` header parameter: we understand no extensions (RFC 7515 §4.1.11).
    CriticalHeader,
    /// No `kid` header parameter (SMART Backend Services requires it).
    MissingKeyId,
    /// `iss` names no registered client, or `kid` names no key in that client's JWKS.
    UnknownKey,
    /// The key named by `kid` is of another type or curve than `alg` needs, or is registered
    /// for a different `alg` (RFC 8725 §2.1 key/algorithm confusion).
    KeyAlgorithmMismatch,
    /// The signature does not verify.
    BadSignature,
    /// `iss` and `sub` are not both the client id (RFC 7523 §3 items 1-2).
    IssuerSubjectMismatch,
    /// `aud` is not exactly the token endpoint (RFC 7523 §3 item 3).
    WrongAudience,
    /// No `exp` (RFC 7523 §3 item 4).
    MissingExpiry,
    /// `exp` has passed, leeway included.
    Expired,
    /// `exp` is further ahead than the maximum assertion lifetime (five minutes in SMART).
    LifetimeTooLong,
    /// `nbf` is in the future beyond the leeway.
    NotYetValid,
    /// `iat` is in the future beyond the leeway.
    IssuedInFuture,
    /// No `jti`, or an unreasonably long one.
    MissingJti,
    /// This client already used this `jti` (RFC 7523 §3 item 7).
    Replayed,
    /// The client is registered with a certificate (RFC 8705 §2) and the TLS client certificate
    /// presented is missing or different.
    CertificateMismatch,
}

impl AssertionRejection {
    /// A stable code for logs and audit.
    pub fn code(self) -> &'static str {
        match self {
            Self::Missing => "assertion_missing",
            Self::UnsupportedAssertionType => "assertion_type_unsupported",
            Self::TooLarge => "assertion_too_large",
            Self::Malformed => "assertion_malformed",
            Self::AlgorithmNotAllowed => "alg_not_allowed",
            Self::WrongType => "typ_not_jwt",
            Self::CriticalHeader => "crit_not_supported",
            Self::MissingKeyId => "kid_missing",
            Self::UnknownKey => "key_unknown",
            Self::KeyAlgorithmMismatch => "key_alg_mismatch",
            Self::BadSignature => "signature_invalid",
            Self::IssuerSubjectMismatch => "iss_sub_mismatch",
            Self::WrongAudience => "aud_wrong",
            Self::MissingExpiry => "exp_missing",
            Self::Expired => "expired",
            Self::LifetimeTooLong => "exp_too_far_ahead",
            Self::NotYetValid => "nbf_in_future",
            Self::IssuedInFuture => "iat_in_future",
            Self::MissingJti => "jti_missing",
            Self::Replayed => "jti_replayed",
            Self::CertificateMismatch => "cert_mismatch",
        }
    }

    /// The `error_description` sent to the client.
    pub fn description(self) -> &'static str {
        match self {
            Self::Missing => "client_assertion is required",
            Self::UnsupportedAssertionType => {
                "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            }
            Self::TooLarge => "client assertion is too large",
            Self::Malformed => "client assertion is not a well-formed signed JWT",
            Self::AlgorithmNotAllowed => {
                "client assertion alg must be one of RS384, RS512, ES384, ES256"
            }
            Self::WrongType => "client assertion typ must be JWT",
            Self::CriticalHeader => "client assertion uses unsupported critical header parameters",
            Self::MissingKeyId => "client assertion header must carry a kid",
            Self::UnknownKey => "no registered key matches the client assertion",
            Self::KeyAlgorithmMismatch => "the registered key does not support the assertion's alg",
            Self::BadSignature => "client assertion signature is invalid",
            Self::IssuerSubjectMismatch => {
                "client assertion iss and sub must both be the client id"
            }
            Self::WrongAudience => "client assertion aud must be the token endpoint URL",
            Self::MissingExpiry => "client assertion must carry exp",
            Self::Expired => "client assertion has expired",
            Self::LifetimeTooLong => "client assertion exp is too far in the future",
            Self::NotYetValid => "client assertion is not yet valid",
            Self::IssuedInFuture => "client assertion iat is in the future",
            Self::MissingJti => "client assertion must carry a jti",
            Self::Replayed => "client assertion jti has already been used",
            Self::CertificateMismatch => "client certificate does not match the registration",
        }
    }
}

/// Why the requested scope was refused (`invalid_scope`, RFC 6749 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeRejection {
    /// No `scope` parameter, or an empty one.
    Missing,
    /// Not SMART `system/` scopes (see [`crate::ScopeError`]).
    Malformed,
    /// Asks for more than the client's registration allows.
    NotAllowed,
}

impl ScopeRejection {
    /// The `error_description` sent to the client.
    pub fn description(self) -> &'static str {
        match self {
            Self::Missing => "scope is required",
            Self::Malformed => "scope must be SMART system/ scopes",
            Self::NotAllowed => "requested scope exceeds the scope registered for this client",
        }
    }
}

/// A token endpoint error (RFC 6749 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// `invalid_request` (400): a required parameter other than the assertion is missing. The
    /// description is a fixed string so the HTTP edge can use this variant for form errors too.
    #[error("invalid_request: {0}")]
    InvalidRequest(&'static str),
    /// `invalid_client` (401): client authentication failed.
    #[error("invalid_client: {}", .0.description())]
    InvalidClient(AssertionRejection),
    /// `unsupported_grant_type` (400): only `client_credentials` is offered.
    #[error("unsupported_grant_type: grant_type must be client_credentials")]
    UnsupportedGrantType,
    /// `invalid_scope` (400).
    #[error("invalid_scope: {}", .0.description())]
    InvalidScope(ScopeRejection),
    /// `temporarily_unavailable` (503): the replay cache is full of live entries, and accepting
    /// more assertions would mean either unbounded memory or forgetting `jti`s still valid.
    #[error("temporarily_unavailable: {0}")]
    TemporarilyUnavailable(&'static str),
}

impl TokenError {
    /// The HTTP status: 401 for `invalid_client`, 503 for `temporarily_unavailable`, else 400.
    pub fn status(&self) -> u16 {
        match self {
            Self::InvalidClient(_) => 401,
            Self::TemporarilyUnavailable(_) => 503,
            Self::InvalidRequest(_) | Self::UnsupportedGrantType | Self::InvalidScope(_) => 400,
        }
    }

    /// The RFC 6749 §5.2 `error` code.
    pub fn error_code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidClient(_) => "invalid_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::InvalidScope(_) => "invalid_scope",
            Self::TemporarilyUnavailable(_) => "temporarily_unavailable",
        }
    }

    /// The `error_description`: a fixed string, never token contents.
    pub fn description(&self) -> &'static str {
        match self {
            Self::InvalidRequest(description) | Self::TemporarilyUnavailable(description) => {
                description
            }
            Self::InvalidClient(rejection) => rejection.description(),
            Self::UnsupportedGrantType => "grant_type must be client_credentials",
            Self::InvalidScope(rejection) => rejection.description(),
        }
    }

    /// The JSON error body (RFC 6749 §5.2).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.error_code(), "error_description": self.description() })
    }
}

/// Why a bearer access token was refused (RFC 6750 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BearerError {
    /// No access token in the request: the challenge carries no error code (RFC 6750 §3.1).
    #[error("no access token")]
    Missing,
    /// Longer than the configured bound; not parsed.
    #[error("access token is too large")]
    TooLarge,
    /// Not a compact JWS of the expected shape.
    #[error("access token is malformed")]
    Malformed,
    /// Not ES256 with `typ: at+jwt` and our `kid` (RFC 9068 §4, RFC 8725 §3.1, §3.11).
    #[error("access token was not issued by this gateway")]
    NotOurs,
    /// Signature does not verify with our key.
    #[error("access token signature is invalid")]
    BadSignature,
    /// `iss` or `aud` is not this gateway, or `sub` is not a registered client.
    #[error("access token was not issued for this gateway")]
    WrongIssuerOrAudience,
    /// `exp` has passed (leeway included), or `iat` is in the future.
    #[error("access token has expired")]
    Expired,
    /// Certificate-bound token (RFC 8705 §3) presented without the certificate it is bound to.
    #[error("access token is bound to a different client certificate")]
    CertificateMismatch,
    /// The token is valid but its scopes do not cover the request (403, RFC 6750 §3.1).
    #[error("access token scope does not permit this request")]
    InsufficientScope,
}

impl BearerError {
    /// 401, or 403 for [`BearerError::InsufficientScope`] (RFC 6750 §3.1).
    pub fn status(&self) -> u16 {
        match self {
            Self::InsufficientScope => 403,
            _ => 401,
        }
    }

    /// The RFC 6750 §3.1 `error` code; none when the request carried no token.
    pub fn error_code(&self) -> Option<&'static str> {
        match self {
            Self::Missing => None,
            Self::InsufficientScope => Some("insufficient_scope"),
            _ => Some("invalid_token"),
        }
    }

    /// The `WWW-Authenticate` response header value (RFC 6750 §3). Descriptions are fixed
    /// strings without quotes or backslashes, so they need no escaping.
    pub fn www_authenticate(&self) -> String {
        match self.error_code() {
            None => "Bearer realm=\"caregate\"".to_owned(),
            Some(code) => {
                format!("Bearer realm=\"caregate\", error=\"{code}\", error_description=\"{self}\"")
            }
        }
    }
}

/// A configuration problem found while building the [`crate::Authority`]. These go to the
/// operator at start-up, so they name the client and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthSetupError {
    /// A problem with [`crate::AuthConfig`].
    #[error("auth config: {0}")]
    Config(&'static str),
    /// A problem with a client registration as a whole.
    #[error("client {client_id:?}: {reason}")]
    Client {
        /// The registration's client id.
        client_id: String,
        /// What is wrong.
        reason: String,
    },
    /// A problem with one key in a client's JWKS.
    #[error("client {client_id:?}, key {kid:?}: {reason}")]
    Key {
        /// The registration's client id.
        client_id: String,
        /// The key's `kid`, or `#<index>` when it has none.
        kid: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The gateway's own signing key could not be generated or loaded.
    #[error("signing key: {0}")]
    SigningKey(&'static str),
}
