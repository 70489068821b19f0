//! caregate-auth: SMART Backend Services authentication for the gateway.
//!
//! Partners authenticate with the OAuth 2.0 client-credentials grant and a signed JWT client
//! assertion ("private key JWT"): SMART App Launch 2.0 "Backend Services"
//! (<http://hl7.org/fhir/smart-app-launch/backend-services.html>), RFC 7523 and RFC 6749 §4.4,
//! hardened as RFC 8725 (JWT BCP) asks — see DOMAIN.md B1 "JWT" and B2 row B5. The gateway
//! answers with a short-lived ES256 access token (RFC 9068 profile), optionally bound to the
//! partner's TLS client certificate (RFC 8705), and later verifies it on each FHIR request.
//!
//! Code map:
//! - [`config`]: [`AuthConfig`] and [`ClientRegistration`], plain data;
//! - [`Authority`] (`authority`): validation at start-up, [`Authority::issue_token`] and
//!   [`Authority::verify_bearer`];
//! - `assertion`: the token request and the client assertion's header and claims;
//! - `keys`: the gateway's [`SigningKey`] and partners' registered keys;
//! - `bearer`: access-token claims and the [`AccessGrant`] a verified token yields;
//! - [`scope`]: SMART `system/` scopes;
//! - `cache`: the bounded, expiring maps behind `jti` replay detection and bearer caching;
//! - `error`: the closed error sets and their RFC 6749 / RFC 6750 wire forms.
//!
//! Architecture Invariant: this crate makes no network requests. Keys come only from
//! registrations; `jku`, `x5u`, `jwk` and `x5c` header parameters are ignored.
//!
//! Architecture Invariant: no token, assertion or key material appears in an error description,
//! a `Debug` output or a log line.

mod assertion;
mod authority;
mod bearer;
mod cache;
pub mod config;
mod error;
mod keys;
pub mod scope;

pub use assertion::{CLIENT_CREDENTIALS, JWT_BEARER_ASSERTION_TYPE, TokenRequest};
pub use authority::{Authority, Clock, SystemClock, TokenResponse};
pub use bearer::{AccessGrant, certificate_thumbprint};
pub use config::{AuthConfig, ClientRegistration};
pub use error::{AssertionRejection, AuthSetupError, BearerError, ScopeRejection, TokenError};
pub use keys::SigningKey;
pub use scope::{Interaction, ScopeError, ScopeSet};
