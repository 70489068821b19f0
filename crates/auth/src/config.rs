//! Settings of the auth stage and the partner registrations it trusts.
//!
//! Both are plain data: [`crate::Authority::new`] validates them without I/O and refuses to start
//! on anything doubtful (CONVENTIONS.md habit 9). Key material is registered, never fetched:
//! there is no `jwks_uri` here, so the gateway makes no outbound request for keys (DOMAIN.md B2
//! row B5).

use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;

/// Access-token lifetime: SMART Backend Services recommends no more than five minutes.
pub const DEFAULT_ACCESS_TOKEN_TTL: Duration = Duration::from_secs(300);
/// Furthest `exp` may lie ahead of now in a client assertion: five minutes (SMART Backend
/// Services "Authentication JWT"; NHS signed-JWT authentication).
pub const DEFAULT_MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
/// Clock-skew allowance for `exp`, `nbf` and `iat` (DOMAIN.md B2 row F9).
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Longest assertion or bearer token accepted; anything longer is refused unparsed.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Most live `(client, jti)` pairs remembered for replay detection.
pub const DEFAULT_REPLAY_CACHE_CAPACITY: usize = 100_000;
/// Most verified bearer tokens remembered.
pub const DEFAULT_BEARER_CACHE_CAPACITY: usize = 10_000;

/// Settings of the token endpoint and bearer verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// The token endpoint URL, compared exactly with an assertion's `aud` (RFC 7523 §3 item 3),
    /// e.g. `https://gateway.example:8443/auth/token`.
    pub token_endpoint: String,
    /// `iss` and `aud` of the access tokens this gateway issues.
    pub issuer: String,
    /// Lifetime of issued access tokens.
    pub access_token_ttl: Duration,
    /// Furthest ahead an assertion's `exp` may be.
    pub max_assertion_lifetime: Duration,
    /// Clock-skew allowance.
    pub leeway: Duration,
    /// Longest assertion or bearer token accepted, checked before any parsing.
    pub max_token_bytes: usize,
    /// Bound on the `jti` replay cache; when full of live entries the endpoint answers
    /// `temporarily_unavailable` rather than grow or forget.
    pub replay_cache_capacity: usize,
    /// Bound on the verified-bearer cache; when full, tokens are verified without caching.
    pub bearer_cache_capacity: usize,
}

impl AuthConfig {
    /// Settings with the given endpoint and issuer and the defaults above for everything else.
    pub fn new(token_endpoint: impl Into<String>, issuer: impl Into<String>) -> Self {
        Self {
            token_endpoint: token_endpoint.into(),
            issuer: issuer.into(),
            access_token_ttl: DEFAULT_ACCESS_TOKEN_TTL,
            max_assertion_lifetime: DEFAULT_MAX_ASSERTION_LIFETIME,
            leeway: DEFAULT_LEEWAY,
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            replay_cache_capacity: DEFAULT_REPLAY_CACHE_CAPACITY,
            bearer_cache_capacity: DEFAULT_BEARER_CACHE_CAPACITY,
        }
    }
}

/// A partner registered as a SMART Backend Services client.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientRegistration {
    /// The client id, which is the partner id; an assertion's `iss` and `sub`.
    pub client_id: String,
    /// The partner's public keys. Every key needs a `kid`; RSA keys (2048-8192 bits) serve RS384
    /// and RS512, EC P-384 keys ES384 and P-256 keys ES256.
    pub jwks: JwkSet,
    /// The most the client may ask for, as SMART `system/` scopes.
    pub allowed_scopes: Vec<String>,
    /// base64url SHA-256 of the client certificate's DER (RFC 8705 §3.1). When set, the client
    /// must present that certificate, and its tokens are bound to it.
    pub cert_thumbprint: Option<String>,
}
