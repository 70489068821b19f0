//! The token request and its client assertion (RFC 7523 §2.2, §3; SMART Backend Services).
//!
//! The assertion is read in two passes. Before the signature is checked only the JOSE header and
//! the claimed `iss` are looked at, and only to choose the key: the header must name an allowed
//! `alg` and a `kid`, and the key is looked up in the JWKS of the client `iss` names. After the
//! signature verifies, every claim is checked against [`AssertionRules`].

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use crate::error::AssertionRejection;

/// The only `client_assertion_type` SMART Backend Services use (RFC 7523 §2.2).
pub const JWT_BEARER_ASSERTION_TYPE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The only grant type offered (RFC 6749 §4.4).
pub const CLIENT_CREDENTIALS: &str = "client_credentials";
/// Longest `jti` remembered; longer ones are refused so the replay cache stays small.
const MAX_JTI_LEN: usize = 256;

/// The token request form fields (RFC 6749 §4.4.2), exactly as received.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
pub struct TokenRequest {
    /// Must be `client_credentials`.
    pub grant_type: Option<String>,
    /// Must be [`JWT_BEARER_ASSERTION_TYPE`].
    pub client_assertion_type: Option<String>,
    /// The signed client assertion.
    pub client_assertion: Option<String>,
    /// Space-delimited SMART `system/` scopes.
    pub scope: Option<String>,
}

impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The assertion is a credential until it expires: never print it.
        f.debug_struct("TokenRequest")
            .field("grant_type", &self.grant_type)
            .field("client_assertion_type", &self.client_assertion_type)
            .field(
                "client_assertion",
                &self.client_assertion.as_ref().map(|_| "[redacted]"),
            )
            .field("scope", &self.scope)
            .finish()
    }
}

/// The JOSE header members we act on (RFC 7515 §4.1). Others, including `jku`, `x5u`, `jwk` and
/// `x5c`, are ignored: keys come only from registrations (RFC 8725 §3.10).
#[derive(Debug, Deserialize)]
pub(crate) struct JoseHeader {
    pub(crate) alg: Option<String>,
    pub(crate) typ: Option<String>,
    pub(crate) kid: Option<String>,
    pub(crate) crit: Option<serde::de::IgnoredAny>,
}

/// Decodes the header of a compact JWS: exactly three dot-separated parts, the first base64url
/// JSON. Duplicate members make the JSON invalid here (RFC 7515 §4 allows rejecting them).
pub(crate) fn parse_header(token: &str) -> Option<JoseHeader> {
    let mut parts = token.split('.');
    let header = parts.next()?;
    if parts.count() != 2 {
        return None;
    }
    let json = URL_SAFE_NO_PAD.decode(header).ok()?;
    serde_json::from_slice(&json).ok()
}

/// The unverified `iss`, read only to find the client whose keys may verify the assertion.
#[derive(Deserialize)]
pub(crate) struct ClaimedIssuer {
    pub(crate) iss: Option<String>,
}

/// A JSON `aud`: one string or an array (RFC 7519 §4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The client assertion's claims, read after the signature verified.
#[derive(Deserialize)]
pub(crate) struct AssertionClaims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<f64>,
    nbf: Option<f64>,
    iat: Option<f64>,
    jti: Option<String>,
}

/// The limits an assertion's claims must meet, all times in Unix seconds.
pub(crate) struct AssertionRules<'a> {
    pub(crate) client_id: &'a str,
    pub(crate) token_endpoint: &'a str,
    pub(crate) now: u64,
    pub(crate) leeway: u64,
    pub(crate) max_lifetime: u64,
}

/// What a verified assertion tells us.
#[derive(Debug)]
pub(crate) struct CheckedAssertion {
    pub(crate) jti: String,
    pub(crate) exp: u64,
}

impl AssertionClaims {
    pub(crate) fn check(
        self,
        rules: &AssertionRules<'_>,
    ) -> Result<CheckedAssertion, AssertionRejection> {
        if self.iss.as_deref() != Some(rules.client_id)
            || self.sub.as_deref() != Some(rules.client_id)
        {
            return Err(AssertionRejection::IssuerSubjectMismatch);
        }
        // Exactly one audience, the token endpoint: an assertion also addressed to another
        // server could be replayed there (RFC 8725 §3.9).
        let audience_ok = match &self.aud {
            Some(Audience::One(aud)) => aud == rules.token_endpoint,
            Some(Audience::Many(auds)) => auds.len() == 1 && auds[0] == rules.token_endpoint,
            None => false,
        };
        if !audience_ok {
            return Err(AssertionRejection::WrongAudience);
        }
        let exp = numeric_date(self.exp)?.ok_or(AssertionRejection::MissingExpiry)?;
        if exp.saturating_add(rules.leeway) < rules.now {
            return Err(AssertionRejection::Expired);
        }
        if exp
            > rules
                .now
                .saturating_add(rules.max_lifetime)
                .saturating_add(rules.leeway)
        {
            return Err(AssertionRejection::LifetimeTooLong);
        }
        let latest_start = rules.now.saturating_add(rules.leeway);
        if numeric_date(self.nbf)?.is_some_and(|nbf| nbf > latest_start) {
            return Err(AssertionRejection::NotYetValid);
        }
        if numeric_date(self.iat)?.is_some_and(|iat| iat > latest_start) {
            return Err(AssertionRejection::IssuedInFuture);
        }
        let jti = self
            .jti
            .filter(|jti| !jti.is_empty() && jti.len() <= MAX_JTI_LEN)
            .ok_or(AssertionRejection::MissingJti)?;
        Ok(CheckedAssertion { jti, exp })
    }
}

/// A NumericDate (RFC 7519 §2): non-negative seconds, possibly fractional.
fn numeric_date(value: Option<f64>) -> Result<Option<u64>, AssertionRejection> {
    match value {
        None => Ok(None),
        // `as` saturates for huge values, which the range checks then refuse.
        Some(seconds) if seconds.is_finite() && seconds >= 0.0 => Ok(Some(seconds as u64)),
        Some(_) => Err(AssertionRejection::Malformed),
    }
}
