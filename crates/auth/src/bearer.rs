//! Access tokens: what the gateway signs, and what a verified one grants.
//!
//! An access token is a JWT in the RFC 9068 profile: header `alg: ES256`, `typ: at+jwt`, our
//! `kid`; claims `iss`, `sub` (the client id), `aud` (our issuer), `exp`, `iat`, `jti`, `scope`
//! and, for certificate-bound clients, `cnf: {"x5t#S256": ...}` (RFC 8705 §3.1). The explicit
//! `typ` keeps an access token from being accepted as a client assertion and vice versa
//! (RFC 8725 §3.11).

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::error::BearerError;
use crate::scope::{Interaction, ScopeSet};

/// The `typ` of our access tokens (RFC 9068 §2.1).
pub(crate) const ACCESS_TOKEN_TYPE: &str = "at+jwt";

/// RFC 8705 §3.1 certificate thumbprint: base64url (no padding) SHA-256 of the certificate's
/// DER. The HTTP edge computes this for the TLS client certificate and passes it to
/// [`crate::Authority::issue_token`] and [`crate::Authority::verify_bearer`].
pub fn certificate_thumbprint(certificate_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, certificate_der))
}

/// The confirmation claim (RFC 7800 §3.1, RFC 8705 §3.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Confirmation {
    #[serde(rename = "x5t#S256")]
    pub(crate) x5t_s256: String,
}

/// The claims of an access token.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct AccessTokenClaims {
    pub(crate) iss: String,
    pub(crate) sub: String,
    pub(crate) aud: String,
    pub(crate) exp: u64,
    pub(crate) iat: u64,
    pub(crate) jti: String,
    pub(crate) scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cnf: Option<Confirmation>,
}

/// What a verified access token grants. Only [`crate::Authority::verify_bearer`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessGrant {
    pub(crate) client_id: String,
    pub(crate) scopes: ScopeSet,
    pub(crate) expires_at: u64,
    pub(crate) jti: String,
    pub(crate) cert_thumbprint: Option<String>,
}

impl AccessGrant {
    /// The client (partner) id the token was issued to.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The granted scopes.
    pub fn scopes(&self) -> &ScopeSet {
        &self.scopes
    }

    /// When the token expires, in Unix seconds.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// The token's `jti`, for audit.
    pub fn jti(&self) -> &str {
        &self.jti
    }

    /// The certificate the token is bound to (RFC 8705), if any.
    pub fn cert_thumbprint(&self) -> Option<&str> {
        self.cert_thumbprint.as_deref()
    }

    /// `Ok` if the scopes permit `interaction` on `resource_type`, else the 403
    /// `insufficient_scope` error (RFC 6750 §3.1).
    pub fn authorize(
        &self,
        resource_type: &str,
        interaction: Interaction,
    ) -> Result<(), BearerError> {
        if self.scopes.allows(resource_type, interaction) {
            Ok(())
        } else {
            Err(BearerError::InsufficientScope)
        }
    }
}

/// The bearer cache key: a digest, so the cache holds no usable tokens.
pub(crate) fn cache_key(token: &str) -> [u8; 32] {
    let mut key = [0u8; 32];
    key.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    key
}
