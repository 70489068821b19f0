//! The [`Authority`]: the token endpoint's logic and bearer verification, with no I/O.
//!
//! Order of checks for a token request (SMART Backend Services "Authorization server obligations",
//! RFC 7523 §3, RFC 8725 §3):
//!
//! 1. `grant_type` is `client_credentials`, `client_assertion_type` is jwt-bearer;
//! 2. the assertion is no longer than `max_token_bytes` — before any decoding;
//! 3. header: an allowed `alg`, `typ` absent or `JWT`, no `crit`, a `kid`;
//! 4. the key: `kid` in the JWKS of the client the claimed `iss` names, of the `alg`'s family;
//! 5. the signature, then `iss` = `sub` = client id, `aud`, `exp`, `nbf`, `iat`, `jti`;
//! 6. the client certificate, if the registration binds one (RFC 8705 §2);
//! 7. the `jti` replay check, recorded atomically, only now so forged assertions cannot burn
//!    a client's `jti`s;
//! 8. the scope, then the access token is signed.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::Serialize;

use crate::assertion::{
    AssertionClaims, AssertionRules, CLIENT_CREDENTIALS, CheckedAssertion, ClaimedIssuer,
    JWT_BEARER_ASSERTION_TYPE, TokenRequest, parse_header,
};
use crate::bearer::{ACCESS_TOKEN_TYPE, AccessGrant, AccessTokenClaims, Confirmation, cache_key};
use crate::cache::{ExpiringCache, InsertNew};
use crate::config::{AuthConfig, ClientRegistration};
use crate::error::{AssertionRejection, AuthSetupError, BearerError, ScopeRejection, TokenError};
use crate::keys::{SigningKey, VerifyingKey, assertion_algorithm};
use crate::scope::{ScopeError, ScopeSet};

/// Longest accepted access-token lifetime; longer is almost surely a unit mistake.
const MAX_ACCESS_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// SMART Backend Services: an assertion's `exp` is "no more than five minutes in the future".
const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
/// DOMAIN.md B2 row F9 tolerates ±5 minutes of skew; more than that is misconfiguration.
const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Upper bound for `max_token_bytes`.
const MAX_TOKEN_BYTES_LIMIT: usize = 64 * 1024;

/// The source of the current time, so expiry can be tested without waiting.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Seconds since the Unix epoch.
    fn now_unix(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs())
    }
}

/// A successful token response (RFC 6749 §5.1).
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct TokenResponse {
    /// The signed access token.
    pub access_token: String,
    /// Always `Bearer` (RFC 6750).
    pub token_type: &'static str,
    /// Lifetime in seconds.
    pub expires_in: u64,
    /// The granted scopes, space-delimited: exactly those requested.
    pub scope: String,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"[redacted]")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish()
    }
}

/// A registration after validation.
#[derive(Debug)]
struct Client {
    keys: HashMap<String, VerifyingKey>,
    allowed_scopes: ScopeSet,
    cert_thumbprint: Option<String>,
}

/// Authenticates SMART Backend Services clients, issues access tokens and verifies them.
/// Shared by reference (e.g. in an `Arc`) across requests; every method takes `&self`.
pub struct Authority {
    config: AuthConfig,
    leeway: u64,
    clients: HashMap<String, Client>,
    signing_key: SigningKey,
    replay: ExpiringCache<(String, String), ()>,
    bearers: ExpiringCache<[u8; 32], Arc<AccessGrant>>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("token_endpoint", &self.config.token_endpoint)
            .field("issuer", &self.config.issuer)
            .field("clients", &self.clients.len())
            .field("kid", &self.signing_key.kid())
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Validates the configuration and every registration, without I/O.
    pub fn new(
        config: AuthConfig,
        clients: Vec<ClientRegistration>,
        signing_key: SigningKey,
    ) -> Result<Authority, AuthSetupError> {
        validate_config(&config)?;
        let mut registered = HashMap::with_capacity(clients.len());
        for registration in clients {
            let client_id = registration.client_id.clone();
            let client = validate_client(registration)?;
            if registered.insert(client_id.clone(), client).is_some() {
                return Err(AuthSetupError::Client {
                    client_id,
                    reason: "registered more than once".to_owned(),
                });
            }
        }
        Ok(Authority {
            leeway: config.leeway.as_secs(),
            replay: ExpiringCache::new(config.replay_cache_capacity),
            bearers: ExpiringCache::new(config.bearer_cache_capacity),
            config,
            clients: registered,
            signing_key,
            clock: Arc::new(SystemClock),
        })
    }

    /// Replaces the clock (tests, simulations of skew).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Authority {
        self.clock = clock;
        self
    }

    /// The gateway's public JWKS (RFC 7517 §5), for peers that verify its access tokens.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": [self.signing_key.public_jwk()] })
    }

    /// Handles a token request. `client_cert_thumbprint` is the RFC 8705 thumbprint of the TLS
    /// client certificate, if one was presented (see [`crate::certificate_thumbprint`]).
    pub fn issue_token(
        &self,
        request: &TokenRequest,
        client_cert_thumbprint: Option<&str>,
    ) -> Result<TokenResponse, TokenError> {
        let result = self.try_issue_token(request, client_cert_thumbprint);
        if let Err(error) = &result {
            tracing::debug!(%error, "token request refused");
        }
        result
    }

    fn try_issue_token(
        &self,
        request: &TokenRequest,
        client_cert_thumbprint: Option<&str>,
    ) -> Result<TokenResponse, TokenError> {
        match request.grant_type.as_deref() {
            None => return Err(TokenError::InvalidRequest("grant_type is required")),
            Some(CLIENT_CREDENTIALS) => {}
            Some(_) => return Err(TokenError::UnsupportedGrantType),
        }
        if request.client_assertion_type.as_deref() != Some(JWT_BEARER_ASSERTION_TYPE) {
            return Err(TokenError::InvalidClient(
                AssertionRejection::UnsupportedAssertionType,
            ));
        }
        let assertion = request
            .client_assertion
            .as_deref()
            .filter(|assertion| !assertion.is_empty())
            .ok_or(TokenError::InvalidClient(AssertionRejection::Missing))?;
        let now = self.clock.now_unix();
        let (client_id, client, checked) = self
            .authenticate(assertion, now)
            .map_err(TokenError::InvalidClient)?;

        if let Some(expected) = &client.cert_thumbprint
            && client_cert_thumbprint != Some(expected.as_str())
        {
            return Err(TokenError::InvalidClient(
                AssertionRejection::CertificateMismatch,
            ));
        }

        // The assertion stays acceptable until exp + leeway, so it is remembered that long.
        let remember_until = checked.exp.saturating_add(self.leeway);
        match self
            .replay
            .insert_new((client_id.to_owned(), checked.jti), (), remember_until, now)
        {
            Ok(InsertNew::Inserted) => {}
            Ok(InsertNew::Present) => {
                return Err(TokenError::InvalidClient(AssertionRejection::Replayed));
            }
            Err(_) => {
                tracing::warn!("jti replay cache is full of live entries; refusing token requests");
                return Err(TokenError::TemporarilyUnavailable(
                    "too many recent token requests; retry shortly",
                ));
            }
        }

        let requested = match request.scope.as_deref().map(ScopeSet::parse) {
            None | Some(Err(ScopeError::Empty)) => {
                return Err(TokenError::InvalidScope(ScopeRejection::Missing));
            }
            Some(Err(_)) => return Err(TokenError::InvalidScope(ScopeRejection::Malformed)),
            Some(Ok(scopes)) => scopes,
        };
        if !requested.is_subset_of(&client.allowed_scopes) {
            return Err(TokenError::InvalidScope(ScopeRejection::NotAllowed));
        }

        self.sign_access_token(
            client_id,
            &requested,
            client.cert_thumbprint.as_deref(),
            now,
        )
    }

    /// Steps 2-5: the assertion names a registered client and key and is validly signed.
    fn authenticate(
        &self,
        assertion: &str,
        now: u64,
    ) -> Result<(&str, &Client, CheckedAssertion), AssertionRejection> {
        if assertion.len() > self.config.max_token_bytes {
            return Err(AssertionRejection::TooLarge);
        }
        let header = parse_header(assertion).ok_or(AssertionRejection::Malformed)?;
        let alg = header
            .alg
            .as_deref()
            .and_then(assertion_algorithm)
            .ok_or(AssertionRejection::AlgorithmNotAllowed)?;
        if header
            .typ
            .as_deref()
            .is_some_and(|typ| !typ.eq_ignore_ascii_case("JWT"))
        {
            return Err(AssertionRejection::WrongType);
        }
        if header.crit.is_some() {
            return Err(AssertionRejection::CriticalHeader);
        }
        let kid = header.kid.ok_or(AssertionRejection::MissingKeyId)?;

        // Unverified, and used only to choose whose keys to try.
        let claimed: ClaimedIssuer = jsonwebtoken::dangerous::insecure_decode_claims(assertion)
            .map_err(|_| AssertionRejection::Malformed)?;
        let (client_id, client) = claimed
            .iss
            .as_deref()
            .and_then(|iss| self.clients.get_key_value(iss))
            .ok_or(AssertionRejection::UnknownKey)?;
        let key = client
            .keys
            .get(&kid)
            .ok_or(AssertionRejection::UnknownKey)?;
        let decoding_key = key
            .for_algorithm(alg)
            .ok_or(AssertionRejection::KeyAlgorithmMismatch)?;

        let claims: AssertionClaims =
            jsonwebtoken::decode(assertion, decoding_key, &signature_only(alg))
                .map_err(|error| match error.kind() {
                    ErrorKind::InvalidSignature => AssertionRejection::BadSignature,
                    _ => AssertionRejection::Malformed,
                })?
                .claims;
        let checked = claims.check(&AssertionRules {
            client_id,
            token_endpoint: &self.config.token_endpoint,
            now,
            leeway: self.leeway,
            max_lifetime: self.config.max_assertion_lifetime.as_secs(),
        })?;
        Ok((client_id.as_str(), client, checked))
    }

    fn sign_access_token(
        &self,
        client_id: &str,
        scopes: &ScopeSet,
        cert_thumbprint: Option<&str>,
        now: u64,
    ) -> Result<TokenResponse, TokenError> {
        let expires_in = self.config.access_token_ttl.as_secs();
        let claims = AccessTokenClaims {
            iss: self.config.issuer.clone(),
            sub: client_id.to_owned(),
            aud: self.config.issuer.clone(),
            exp: now.saturating_add(expires_in),
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: scopes.to_string(),
            cnf: cert_thumbprint.map(|thumbprint| Confirmation {
                x5t_s256: thumbprint.to_owned(),
            }),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some(ACCESS_TOKEN_TYPE.to_owned());
        header.kid = Some(self.signing_key.kid().to_owned());
        let access_token = jsonwebtoken::encode(&header, &claims, self.signing_key.encoding())
            .map_err(|_| TokenError::TemporarilyUnavailable("could not sign the access token"))?;
        tracing::debug!(client_id, scope = %claims.scope, "access token issued");
        Ok(TokenResponse {
            access_token,
            token_type: "Bearer",
            expires_in,
            scope: claims.scope,
        })
    }

    /// Verifies a bearer access token (RFC 6750) issued by this gateway or a peer holding the
    /// same signing key. The signature is checked once per token; later calls hit a cache keyed
    /// by the token's SHA-256, which still re-checks `exp` and the certificate binding.
    pub fn verify_bearer(
        &self,
        token: &str,
        client_cert_thumbprint: Option<&str>,
    ) -> Result<Arc<AccessGrant>, BearerError> {
        if token.len() > self.config.max_token_bytes {
            return Err(BearerError::TooLarge);
        }
        if token.is_empty() {
            return Err(BearerError::Malformed);
        }
        let now = self.clock.now_unix();
        let key = cache_key(token);
        let grant = match self.bearers.get(&key, now) {
            Some(grant) => grant,
            None => {
                let grant = Arc::new(self.verify_access_token(token, now)?);
                // A full cache only costs a signature check next time.
                let _ = self.bearers.insert(
                    key,
                    Arc::clone(&grant),
                    grant.expires_at.saturating_add(self.leeway),
                    now,
                );
                grant
            }
        };
        if grant.expires_at.saturating_add(self.leeway) < now {
            return Err(BearerError::Expired);
        }
        if let Some(bound) = grant.cert_thumbprint.as_deref()
            && client_cert_thumbprint != Some(bound)
        {
            return Err(BearerError::CertificateMismatch);
        }
        Ok(grant)
    }

    fn verify_access_token(&self, token: &str, now: u64) -> Result<AccessGrant, BearerError> {
        let header = parse_header(token).ok_or(BearerError::Malformed)?;
        let ours = header.alg.as_deref() == Some("ES256")
            && header.typ.as_deref().is_some_and(|typ| {
                typ.eq_ignore_ascii_case(ACCESS_TOKEN_TYPE)
                    || typ.eq_ignore_ascii_case("application/at+jwt")
            })
            && header.kid.as_deref() == Some(self.signing_key.kid())
            && header.crit.is_none();
        if !ours {
            return Err(BearerError::NotOurs);
        }
        let claims: AccessTokenClaims = jsonwebtoken::decode(
            token,
            self.signing_key.decoding(),
            &signature_only(Algorithm::ES256),
        )
        .map_err(|error| match error.kind() {
            ErrorKind::InvalidSignature => BearerError::BadSignature,
            _ => BearerError::Malformed,
        })?
        .claims;
        if claims.iss != self.config.issuer
            || claims.aud != self.config.issuer
            || !self.clients.contains_key(&claims.sub)
        {
            return Err(BearerError::WrongIssuerOrAudience);
        }
        if claims.exp.saturating_add(self.leeway) < now
            || claims.iat > now.saturating_add(self.leeway)
        {
            return Err(BearerError::Expired);
        }
        let scopes = ScopeSet::parse(&claims.scope).map_err(|_| BearerError::Malformed)?;
        Ok(AccessGrant {
            client_id: claims.sub,
            scopes,
            expires_at: claims.exp,
            jti: claims.jti,
            cert_thumbprint: claims.cnf.map(|cnf| cnf.x5t_s256),
        })
    }
}

/// A `jsonwebtoken` validation that checks only the signature with exactly `alg`: the claims
/// are checked by our own code, with our clock and our rules.
fn signature_only(alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    validation
}

fn validate_config(config: &AuthConfig) -> Result<(), AuthSetupError> {
    let fail = |reason| Err(AuthSetupError::Config(reason));
    if config.token_endpoint.trim().is_empty()
        || config.token_endpoint.contains(char::is_whitespace)
    {
        return fail("token_endpoint must be a URL");
    }
    if config.issuer.trim().is_empty() {
        return fail("issuer must not be empty");
    }
    if config.access_token_ttl.as_secs() == 0 || config.access_token_ttl > MAX_ACCESS_TOKEN_TTL {
        return fail("access_token_ttl must be between 1 s and 1 hour");
    }
    if config.max_assertion_lifetime.as_secs() == 0
        || config.max_assertion_lifetime > MAX_ASSERTION_LIFETIME
    {
        return fail("max_assertion_lifetime must be between 1 s and 5 minutes (SMART)");
    }
    if config.leeway > MAX_LEEWAY {
        return fail("leeway must be at most 5 minutes");
    }
    if config.max_token_bytes == 0 || config.max_token_bytes > MAX_TOKEN_BYTES_LIMIT {
        return fail("max_token_bytes must be between 1 and 65536");
    }
    if config.replay_cache_capacity == 0 || config.bearer_cache_capacity == 0 {
        return fail("cache capacities must be at least 1");
    }
    Ok(())
}

fn validate_client(registration: ClientRegistration) -> Result<Client, AuthSetupError> {
    let ClientRegistration {
        client_id,
        jwks,
        allowed_scopes,
        cert_thumbprint,
    } = registration;
    let fail = |reason: String| AuthSetupError::Client {
        client_id: client_id.clone(),
        reason,
    };
    if client_id.is_empty() {
        return Err(fail("client_id must not be empty".to_owned()));
    }
    if jwks.keys.is_empty() {
        return Err(fail("the JWKS has no keys".to_owned()));
    }
    let mut keys = HashMap::with_capacity(jwks.keys.len());
    for (index, jwk) in jwks.keys.iter().enumerate() {
        let (kid, key) = VerifyingKey::from_jwk(&client_id, index, jwk)?;
        if keys.insert(kid.clone(), key).is_some() {
            return Err(AuthSetupError::Key {
                client_id,
                kid,
                reason: "kid is used twice",
            });
        }
    }
    let allowed_scopes =
        ScopeSet::parse(&allowed_scopes.join(" ")).map_err(|error| fail(error.to_string()))?;
    let is_sha256 =
        |thumbprint: &String| URL_SAFE_NO_PAD.decode(thumbprint).map(|d| d.len()) == Ok(32);
    if cert_thumbprint
        .as_ref()
        .is_some_and(|thumbprint| !is_sha256(thumbprint))
    {
        return Err(fail(
            "cert_thumbprint must be a base64url SHA-256 digest".to_owned(),
        ));
    }
    Ok(Client {
        keys,
        allowed_scopes,
        cert_thumbprint,
    })
}
