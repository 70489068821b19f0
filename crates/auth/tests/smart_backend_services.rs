//! End-to-end checks of the token endpoint logic and bearer verification: DOMAIN.md B2 row B5
//! (hostile JWTs), SMART Backend Services, RFC 7523, RFC 8725, RFC 8705 and RFC 6750.
//!
//! Partners sign with `caregate_testkit::keys::PartnerKey`, an aws-lc-rs signer independent of the
//! `jsonwebtoken` verifier under test. Time is a manual clock, so expiry needs no waiting.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use caregate_auth::{
    AssertionRejection, AuthConfig, AuthSetupError, Authority, BearerError, ClientRegistration,
    Clock, Interaction, JWT_BEARER_ASSERTION_TYPE, ScopeRejection, SigningKey, TokenError,
    TokenRequest, TokenResponse, certificate_thumbprint,
};
use caregate_testkit::keys::{KeyAlg, PartnerKey, hmac_token, unix_now, unsigned_token};
use jsonwebtoken::jwk::JwkSet;
use serde_json::{Value, json};

const ENDPOINT: &str = "https://gateway.test:8443/auth/token";
const ISSUER: &str = "https://gateway.test:8443";
const PARTNER_A: &str = "partner-a";
const PARTNER_B: &str = "partner-b";
const A_SCOPES: &str = "system/Observation.cruds system/Patient.rs";

/// Partner keys are costly to generate, so every test shares one set.
struct Keys {
    /// partner-a, registered with `alg: RS384`.
    a_rsa: PartnerKey,
    /// partner-a, registered without `alg`, so RS384 and RS512 may use it.
    a_rsa_any: PartnerKey,
    a_es384: PartnerKey,
    a_es256: PartnerKey,
    /// partner-b's only key; partner-b is bound to a client certificate.
    b_es384: PartnerKey,
    /// Registered nowhere.
    stranger: PartnerKey,
    /// The gateway's signing key, as a PEM so a peer node can load the same key.
    gateway_pem: String,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    a_rsa: PartnerKey::generate_rs384("a-rsa"),
    a_rsa_any: PartnerKey::generate_rs384("a-rsa-any"),
    a_es384: PartnerKey::generate_es384("a-ec384"),
    a_es256: PartnerKey::generate_es256("a-ec256"),
    b_es384: PartnerKey::generate_es384("b-ec384"),
    stranger: PartnerKey::generate_rs384("a-rsa"),
    gateway_pem: PartnerKey::generate_es256("gateway").private_pem(),
});

fn b_cert() -> String {
    certificate_thumbprint(b"partner-b client certificate DER")
}

#[derive(Debug)]
struct ManualClock(AtomicU64);

impl Clock for ManualClock {
    fn now_unix(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl ManualClock {
    fn advance(&self, seconds: u64) {
        self.0.fetch_add(seconds, Ordering::SeqCst);
    }
}

struct Fixture {
    authority: Authority,
    clock: Arc<ManualClock>,
}

fn jwks(keys: &[&PartnerKey]) -> JwkSet {
    serde_json::from_value(PartnerKey::jwks(keys)).expect("testkit JWKS parses")
}

fn registrations() -> Vec<ClientRegistration> {
    let keys = &*KEYS;
    let mut a_jwks = jwks(&[&keys.a_rsa, &keys.a_rsa_any, &keys.a_es384, &keys.a_es256]);
    a_jwks.keys[1].common.key_algorithm = None;
    vec![
        ClientRegistration {
            client_id: PARTNER_A.into(),
            jwks: a_jwks,
            allowed_scopes: A_SCOPES.split(' ').map(str::to_owned).collect(),
            cert_thumbprint: None,
        },
        ClientRegistration {
            client_id: PARTNER_B.into(),
            jwks: jwks(&[&keys.b_es384]),
            allowed_scopes: vec!["system/*.rs".into()],
            cert_thumbprint: Some(b_cert()),
        },
    ]
}

fn fixture_with(config: AuthConfig) -> Fixture {
    let registrations = registrations();
    let signing_key = SigningKey::from_pkcs8_pem(&KEYS.gateway_pem).expect("gateway key loads");
    // Read the time only once the keys exist, so assertions signed next are not "from the future".
    let clock = Arc::new(ManualClock(AtomicU64::new(unix_now() as u64)));
    let authority = Authority::new(config, registrations, signing_key)
        .expect("valid registrations")
        .with_clock(clock.clone());
    Fixture { authority, clock }
}

fn fixture() -> Fixture {
    fixture_with(AuthConfig::new(ENDPOINT, ISSUER))
}

fn request(assertion: &str, scope: &str) -> TokenRequest {
    TokenRequest {
        grant_type: Some("client_credentials".into()),
        client_assertion_type: Some(JWT_BEARER_ASSERTION_TYPE.into()),
        client_assertion: Some(assertion.into()),
        scope: Some(scope.into()),
    }
}

fn claims_for(client_id: &str) -> Value {
    PartnerKey::assertion_claims(client_id, ENDPOINT)
}

fn with(mut claims: Value, field: &str, value: Value) -> Value {
    claims[field] = value;
    claims
}

fn now() -> i64 {
    unix_now()
}

impl Fixture {
    fn token(&self, assertion: &str) -> Result<TokenResponse, TokenError> {
        self.authority
            .issue_token(&request(assertion, "system/Observation.rs"), None)
    }

    /// Asserts the assertion is refused as `invalid_client` (401) for `expected`, and that the
    /// error body does not echo the assertion.
    fn assert_rejected(&self, assertion: &str, expected: AssertionRejection) {
        let error = self
            .token(assertion)
            .expect_err("assertion must be refused");
        assert_eq!(error, TokenError::InvalidClient(expected));
        assert_eq!(error.status(), 401);
        assert_eq!(error.error_code(), "invalid_client");
        let body = error.to_json().to_string();
        for part in assertion.split('.').filter(|part| part.len() > 8) {
            assert!(!body.contains(part), "error body echoes the assertion");
        }
    }
}

// --- Accepted assertions -------------------------------------------------------------------

#[test]
fn smart_accepts_rs384_assertion() {
    let f = fixture();
    let response = f
        .token(&KEYS.a_rsa.sign_assertion(PARTNER_A, ENDPOINT))
        .expect("accepted");
    assert_eq!(response.token_type, "Bearer");
    assert_eq!(response.expires_in, 300);
    assert_eq!(response.scope, "system/Observation.rs");
}

#[test]
fn smart_accepts_es384_assertion() {
    let f = fixture();
    assert!(
        f.token(&KEYS.a_es384.sign_assertion(PARTNER_A, ENDPOINT))
            .is_ok()
    );
}

#[test]
fn smart_accepts_es256_assertion() {
    let f = fixture();
    assert!(
        f.token(&KEYS.a_es256.sign_assertion(PARTNER_A, ENDPOINT))
            .is_ok()
    );
}

#[test]
fn nhs_accepts_rs512_assertion_with_key_registered_without_alg() {
    let f = fixture();
    let assertion = KEYS
        .a_rsa_any
        .sign_claims(&claims_for(PARTNER_A), &json!({"alg": "RS512"}));
    assert!(f.token(&assertion).is_ok());
}

#[test]
fn f9_accepts_assertion_expired_within_leeway_and_skewed_iat() {
    let f = fixture();
    let claims = with(claims_for(PARTNER_A), "exp", json!(now() - 10));
    assert!(
        f.token(&KEYS.a_es384.sign_claims(&claims, &json!({})))
            .is_ok()
    );
    let claims = with(claims_for(PARTNER_A), "iat", json!(now() + 20));
    assert!(
        f.token(&KEYS.a_es384.sign_claims(&claims, &json!({})))
            .is_ok()
    );
}

#[test]
fn rfc7523_accepts_single_element_audience_array_and_fractional_dates() {
    let f = fixture();
    let claims = with(claims_for(PARTNER_A), "aud", json!([ENDPOINT]));
    let claims = with(claims, "exp", json!(now() as f64 + 100.5));
    assert!(
        f.token(&KEYS.a_es256.sign_claims(&claims, &json!({})))
            .is_ok()
    );
}

#[test]
fn rfc8725_accepts_absent_typ() {
    let f = fixture();
    let assertion = KEYS
        .a_es256
        .sign_claims(&claims_for(PARTNER_A), &json!({"typ": null}));
    assert!(f.token(&assertion).is_ok());
}

// --- RFC 8725 §2.1 / §3.1: algorithms --------------------------------------------------------

#[test]
fn rfc8725_rejects_alg_none() {
    let f = fixture();
    for alg in ["none", "None", "NONE", ""] {
        let assertion = unsigned_token(
            &json!({"alg": alg, "typ": "JWT", "kid": "a-rsa"}),
            &claims_for(PARTNER_A),
        );
        f.assert_rejected(&assertion, AssertionRejection::AlgorithmNotAllowed);
    }
    let no_alg = unsigned_token(
        &json!({"typ": "JWT", "kid": "a-rsa"}),
        &claims_for(PARTNER_A),
    );
    f.assert_rejected(&no_alg, AssertionRejection::AlgorithmNotAllowed);
}

#[test]
fn rfc8725_rejects_hs256_signed_with_rsa_public_key() {
    let f = fixture();
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": "a-rsa"});
    let public_pem = KEYS.a_rsa.public_pem();
    let jwk = KEYS.a_rsa.jwk().to_string();
    for secret in [
        public_pem.as_bytes(),
        public_pem.trim_end().as_bytes(),
        jwk.as_bytes(),
    ] {
        let forged = hmac_token(secret, &header, &claims_for(PARTNER_A));
        f.assert_rejected(&forged, AssertionRejection::AlgorithmNotAllowed);
    }
    for alg in ["HS384", "HS512"] {
        let header = json!({"alg": alg, "typ": "JWT", "kid": "a-rsa"});
        let forged = hmac_token(public_pem.as_bytes(), &header, &claims_for(PARTNER_A));
        f.assert_rejected(&forged, AssertionRejection::AlgorithmNotAllowed);
    }
}

#[test]
fn rfc8725_rejects_algorithms_off_the_allow_list() {
    let f = fixture();
    for alg in ["RS256", "PS256", "PS384", "PS512", "EdDSA", "ES512"] {
        let assertion = KEYS
            .a_rsa_any
            .sign_claims(&claims_for(PARTNER_A), &json!({"alg": alg}));
        f.assert_rejected(&assertion, AssertionRejection::AlgorithmNotAllowed);
    }
}

#[test]
fn rfc8725_rejects_key_of_wrong_family_or_curve_for_alg() {
    let f = fixture();
    let claims = claims_for(PARTNER_A);
    // ES256 header naming the P-384 key, and ES384 naming the P-256 key.
    let p384_as_es256 = KEYS.a_es384.sign_claims(&claims, &json!({"alg": "ES256"}));
    f.assert_rejected(&p384_as_es256, AssertionRejection::KeyAlgorithmMismatch);
    let p256_as_es384 = KEYS.a_es256.sign_claims(&claims, &json!({"alg": "ES384"}));
    f.assert_rejected(&p256_as_es384, AssertionRejection::KeyAlgorithmMismatch);
    // An EC signature claiming an RSA key, and RS384 naming an EC key.
    let ec_claiming_rsa = KEYS
        .a_es384
        .sign_claims(&claims, &json!({"alg": "ES384", "kid": "a-rsa"}));
    f.assert_rejected(&ec_claiming_rsa, AssertionRejection::KeyAlgorithmMismatch);
    let rs_claiming_ec = KEYS.a_rsa.sign_claims(&claims, &json!({"kid": "a-ec384"}));
    f.assert_rejected(&rs_claiming_ec, AssertionRejection::KeyAlgorithmMismatch);
}

#[test]
fn rfc7517_honours_the_registered_jwk_alg() {
    let f = fixture();
    // a-rsa is registered with alg RS384, so a valid RS512 signature by it is refused.
    let assertion = KEYS
        .a_rsa
        .sign_claims(&claims_for(PARTNER_A), &json!({"alg": "RS512"}));
    f.assert_rejected(&assertion, AssertionRejection::KeyAlgorithmMismatch);
}

// --- Header and key selection ----------------------------------------------------------------

#[test]
fn rfc7515_rejects_unknown_or_missing_kid() {
    let f = fixture();
    let unknown = KEYS
        .a_es384
        .sign_claims(&claims_for(PARTNER_A), &json!({"kid": "no-such-key"}));
    f.assert_rejected(&unknown, AssertionRejection::UnknownKey);
    let missing = KEYS
        .a_es384
        .sign_claims(&claims_for(PARTNER_A), &json!({"kid": null}));
    f.assert_rejected(&missing, AssertionRejection::MissingKeyId);
}

#[test]
fn rfc7523_rejects_kid_of_another_client() {
    let f = fixture();
    // partner-b's key and kid, claiming to be partner-a.
    let assertion = KEYS.b_es384.sign_assertion(PARTNER_A, ENDPOINT);
    f.assert_rejected(&assertion, AssertionRejection::UnknownKey);
    // partner-a's key and kid, claiming to be partner-b.
    let assertion = KEYS.a_es384.sign_assertion(PARTNER_B, ENDPOINT);
    f.assert_rejected(&assertion, AssertionRejection::UnknownKey);
}

#[test]
fn rfc7515_rejects_signature_by_unregistered_key_under_a_known_kid() {
    let f = fixture();
    // The stranger's key is also called "a-rsa".
    let assertion = KEYS.stranger.sign_assertion(PARTNER_A, ENDPOINT);
    f.assert_rejected(&assertion, AssertionRejection::BadSignature);
}

#[test]
fn rfc8725_ignores_jku_x5u_and_embedded_jwk_and_fetches_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
    let f = fixture();
    let mut attacker_jwk = KEYS.stranger.jwk();
    attacker_jwk["kid"] = json!("attacker");
    // Signed by the stranger, pointing at the stranger's keys three ways.
    let headers = [
        json!({"kid": "attacker", "jku": url}),
        json!({"kid": "attacker", "x5u": url}),
        json!({"kid": "attacker", "jwk": attacker_jwk}),
    ];
    for header in headers {
        let assertion = KEYS.stranger.sign_claims(&claims_for(PARTNER_A), &header);
        f.assert_rejected(&assertion, AssertionRejection::UnknownKey);
    }
    // An embedded JWK under a registered kid does not replace the registered key.
    let mut embedded = KEYS.stranger.jwk();
    embedded["kid"] = json!("a-rsa");
    let assertion = KEYS.stranger.sign_claims(
        &claims_for(PARTNER_A),
        &json!({"jwk": embedded, "jku": url}),
    );
    f.assert_rejected(&assertion, AssertionRejection::BadSignature);
    // Nobody connected to the advertised key URL.
    assert_eq!(
        listener.accept().map_err(|error| error.kind()).err(),
        Some(std::io::ErrorKind::WouldBlock)
    );
}

#[test]
fn rfc8725_rejects_typ_other_than_jwt_and_crit() {
    let f = fixture();
    for typ in ["at+jwt", "JOSE", "dpop+jwt"] {
        let assertion = KEYS
            .a_es384
            .sign_claims(&claims_for(PARTNER_A), &json!({"typ": typ}));
        f.assert_rejected(&assertion, AssertionRejection::WrongType);
    }
    let assertion = KEYS
        .a_es384
        .sign_claims(&claims_for(PARTNER_A), &json!({"crit": ["exp"]}));
    f.assert_rejected(&assertion, AssertionRejection::CriticalHeader);
}

#[test]
fn rfc7515_rejects_tampered_claims() {
    let f = fixture();
    let assertion = KEYS.a_es384.sign_assertion(PARTNER_A, ENDPOINT);
    let mut parts: Vec<&str> = assertion.split('.').collect();
    let other = KEYS.a_es384.sign_claims(
        &with(claims_for(PARTNER_A), "scope", json!("x")),
        &json!({}),
    );
    parts[1] = other.split('.').nth(1).expect("claims part");
    f.assert_rejected(&parts.join("."), AssertionRejection::BadSignature);
}

// --- Claims ----------------------------------------------------------------------------------

#[test]
fn rfc7523_rejects_expired_assertion() {
    let f = fixture();
    let claims = with(claims_for(PARTNER_A), "exp", json!(now() - 120));
    f.assert_rejected(
        &KEYS.a_es384.sign_claims(&claims, &json!({})),
        AssertionRejection::Expired,
    );
}

#[test]
fn rfc7523_rejects_assertion_once_the_clock_passes_exp() {
    let f = fixture();
    let assertion = KEYS.a_es384.sign_assertion(PARTNER_A, ENDPOINT);
    // Past exp (now + 240 s) and the 30 s leeway, with a margin for the wall clock moving on.
    f.clock.advance(240 + 30 + 5);
    f.assert_rejected(&assertion, AssertionRejection::Expired);
}

#[test]
fn smart_rejects_exp_more_than_five_minutes_ahead() {
    let f = fixture();
    for exp in [now() + 3600, now() + 300 + 31, i64::MAX] {
        let claims = with(claims_for(PARTNER_A), "exp", json!(exp));
        f.assert_rejected(
            &KEYS.a_es384.sign_claims(&claims, &json!({})),
            AssertionRejection::LifetimeTooLong,
        );
    }
    let claims = with(claims_for(PARTNER_A), "exp", json!(1e300));
    f.assert_rejected(
        &KEYS.a_es384.sign_claims(&claims, &json!({})),
        AssertionRejection::LifetimeTooLong,
    );
    let missing = claims_for(PARTNER_A).as_object().map(|claims| {
        let mut claims = claims.clone();
        claims.remove("exp");
        Value::Object(claims)
    });
    let missing = KEYS
        .a_es384
        .sign_claims(&missing.expect("object"), &json!({}));
    f.assert_rejected(&missing, AssertionRejection::MissingExpiry);
}

#[test]
fn rfc7519_rejects_future_nbf_and_iat() {
    let f = fixture();
    let claims = with(claims_for(PARTNER_A), "nbf", json!(now() + 120));
    f.assert_rejected(
        &KEYS.a_es384.sign_claims(&claims, &json!({})),
        AssertionRejection::NotYetValid,
    );
    let claims = with(claims_for(PARTNER_A), "iat", json!(now() + 120));
    f.assert_rejected(
        &KEYS.a_es384.sign_claims(&claims, &json!({})),
        AssertionRejection::IssuedInFuture,
    );
}

#[test]
fn rfc7519_rejects_claims_of_the_wrong_type() {
    let f = fixture();
    for (field, value) in [
        ("exp", json!("soon")),
        ("exp", json!(-5)),
        ("jti", json!(7)),
        ("sub", json!(["partner-a"])),
    ] {
        let claims = with(claims_for(PARTNER_A), field, value);
        f.assert_rejected(
            &KEYS.a_es384.sign_claims(&claims, &json!({})),
            AssertionRejection::Malformed,
        );
    }
}

#[test]
fn rfc7523_rejects_wrong_aud() {
    let f = fixture();
    let wrong = [
        json!("https://evil.example/auth/token"),
        json!(format!("{ENDPOINT}/")),
        json!(ISSUER),
        json!([ENDPOINT, "https://evil.example/auth/token"]),
        json!([]),
        Value::Null,
    ];
    for aud in wrong {
        let claims = with(claims_for(PARTNER_A), "aud", aud);
        f.assert_rejected(
            &KEYS.a_es384.sign_claims(&claims, &json!({})),
            AssertionRejection::WrongAudience,
        );
    }
}

#[test]
fn rfc7523_rejects_wrong_iss_or_sub() {
    let f = fixture();
    let claims = with(claims_for(PARTNER_A), "sub", json!(PARTNER_B));
    f.assert_rejected(
        &KEYS.a_es384.sign_claims(&claims, &json!({})),
        AssertionRejection::IssuerSubjectMismatch,
    );
    let claims = with(claims_for(PARTNER_A), "sub", Value::Null);
    f.assert_rejected(
        &KEYS.a_es384.sign_claims(&claims, &json!({})),
        AssertionRejection::IssuerSubjectMismatch,
    );
    let claims = with(claims_for(PARTNER_A), "iss", json!("unregistered"));
    f.assert_rejected(
        &KEYS.a_es384.sign_claims(&claims, &json!({})),
        AssertionRejection::UnknownKey,
    );
}

#[test]
fn rfc7523_rejects_missing_or_oversized_jti() {
    let f = fixture();
    for jti in [Value::Null, json!(""), json!("j".repeat(257))] {
        let claims = with(claims_for(PARTNER_A), "jti", jti);
        f.assert_rejected(
            &KEYS.a_es384.sign_claims(&claims, &json!({})),
            AssertionRejection::MissingJti,
        );
    }
}

#[test]
fn rfc7523_rejects_replayed_jti() {
    let f = fixture();
    let assertion = KEYS.a_es384.sign_assertion(PARTNER_A, ENDPOINT);
    assert!(f.token(&assertion).is_ok());
    f.assert_rejected(&assertion, AssertionRejection::Replayed);
    // A new assertion reusing the jti is a replay too, even with another key of the client.
    let claims = with(claims_for(PARTNER_A), "jti", json!("fixed-jti"));
    assert!(
        f.token(&KEYS.a_es384.sign_claims(&claims, &json!({})))
            .is_ok()
    );
    f.assert_rejected(
        &KEYS.a_es256.sign_claims(&claims, &json!({})),
        AssertionRejection::Replayed,
    );
}

#[test]
fn rfc7523_jti_uniqueness_is_per_client() {
    let f = fixture();
    let a = with(claims_for(PARTNER_A), "jti", json!("shared"));
    let b = with(claims_for(PARTNER_B), "jti", json!("shared"));
    assert!(f.token(&KEYS.a_es384.sign_claims(&a, &json!({}))).is_ok());
    let b_request = request(
        &KEYS.b_es384.sign_claims(&b, &json!({})),
        "system/Patient.r",
    );
    assert!(f.authority.issue_token(&b_request, Some(&b_cert())).is_ok());
}

#[test]
fn b5_refuses_rather_than_grows_when_replay_cache_is_full() {
    let mut config = AuthConfig::new(ENDPOINT, ISSUER);
    config.replay_cache_capacity = 1;
    let f = fixture_with(config);
    assert!(
        f.token(&KEYS.a_es384.sign_assertion(PARTNER_A, ENDPOINT))
            .is_ok()
    );
    let error = f
        .token(&KEYS.a_es384.sign_assertion(PARTNER_A, ENDPOINT))
        .expect_err("full");
    assert!(matches!(error, TokenError::TemporarilyUnavailable(_)));
    assert_eq!(
        (error.status(), error.error_code()),
        (503, "temporarily_unavailable")
    );
    // Once the remembered assertion has expired, its slot is reused.
    f.clock.advance(240 + 30 + 5);
    let later = f.clock.now_unix();
    let claims = with(claims_for(PARTNER_A), "iat", json!(later));
    let claims = with(claims, "exp", json!(later + 240));
    assert!(
        f.token(&KEYS.a_es384.sign_claims(&claims, &json!({})))
            .is_ok()
    );
}

// --- Size and garbage ------------------------------------------------------------------------

#[test]
fn b5_rejects_1mb_token_before_parsing() {
    let f = fixture();
    let huge = "A".repeat(1024 * 1024);
    f.assert_rejected(&huge, AssertionRejection::TooLarge);
    // A well-formed, validly signed assertion padded past the bound is refused the same way.
    let padded = with(
        claims_for(PARTNER_A),
        "padding",
        json!("p".repeat(1024 * 1024)),
    );
    f.assert_rejected(
        &KEYS.a_es384.sign_claims(&padded, &json!({})),
        AssertionRejection::TooLarge,
    );
}

#[test]
fn b5_rejects_garbage_assertions() {
    let f = fixture();
    let header_not_json = format!("{}.e30.sig", "bm90IGpzb24");
    for garbage in [
        "garbage",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "..",
        "e30.e30.",
        "eyJhbGciOiJFUzM4NCJ9..",
        "éèê.ü.ö",
        header_not_json.as_str(),
    ] {
        let error = f.token(garbage).expect_err("garbage refused");
        assert!(
            matches!(error, TokenError::InvalidClient(_)),
            "{garbage}: {error:?}"
        );
        assert_eq!(error.status(), 401);
    }
    // Valid header, claims not JSON.
    let header = KEYS.a_es384.sign_assertion(PARTNER_A, ENDPOINT);
    let header = header.split('.').next().expect("header");
    f.assert_rejected(
        &format!("{header}.bm90IGpzb24.c2ln"),
        AssertionRejection::Malformed,
    );
    // A duplicated header member.
    let duplicate = r#"{"alg":"ES384","kid":"a-ec384","alg":"none"}"#;
    let duplicate = format!("{}.e30.c2ln", base64_url(duplicate.as_bytes()));
    f.assert_rejected(&duplicate, AssertionRejection::Malformed);
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

mod garbage_properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Any string at all is either a valid assertion or an `invalid_client` 401.
        #[test]
        fn b5_arbitrary_assertions_are_invalid_client(input in "[A-Za-z0-9_.=+/-]{0,300}|\\PC{0,100}") {
            let f = fixture();
            let error = f.token(&input).expect_err("random input is never a valid assertion");
            prop_assert!(matches!(error, TokenError::InvalidClient(_)));
            prop_assert_eq!(error.status(), 401);
        }
    }
}

// --- The rest of the token request -----------------------------------------------------------

#[test]
fn rfc6749_grant_type_and_assertion_type_rules() {
    let f = fixture();
    let assertion = KEYS.a_es384.sign_assertion(PARTNER_A, ENDPOINT);
    let mut missing_grant = request(&assertion, "system/Observation.r");
    missing_grant.grant_type = None;
    let error = f
        .authority
        .issue_token(&missing_grant, None)
        .expect_err("refused");
    assert_eq!(
        (error.error_code(), error.status()),
        ("invalid_request", 400)
    );

    let mut wrong_grant = request(&assertion, "system/Observation.r");
    wrong_grant.grant_type = Some("authorization_code".into());
    let error = f
        .authority
        .issue_token(&wrong_grant, None)
        .expect_err("refused");
    assert_eq!(error, TokenError::UnsupportedGrantType);
    assert_eq!(
        (error.error_code(), error.status()),
        ("unsupported_grant_type", 400)
    );

    let mut wrong_type = request(&assertion, "system/Observation.r");
    wrong_type.client_assertion_type =
        Some("urn:ietf:params:oauth:client-assertion-type:saml2-bearer".into());
    let error = f
        .authority
        .issue_token(&wrong_type, None)
        .expect_err("refused");
    assert_eq!(
        error,
        TokenError::InvalidClient(AssertionRejection::UnsupportedAssertionType)
    );

    let mut no_assertion = request("", "system/Observation.r");
    no_assertion.client_assertion = None;
    let error = f
        .authority
        .issue_token(&no_assertion, None)
        .expect_err("refused");
    assert_eq!(
        error,
        TokenError::InvalidClient(AssertionRejection::Missing)
    );
    assert_eq!(error.status(), 401);
}

#[test]
fn smart_scope_must_be_present_system_and_within_registration() {
    let f = fixture();
    let cases = [
        (None, ScopeRejection::Missing),
        (Some("   "), ScopeRejection::Missing),
        (Some("patient/Observation.rs"), ScopeRejection::Malformed),
        (Some("user/*.cruds"), ScopeRejection::Malformed),
        (
            Some("system/Observation.rs?category=laboratory"),
            ScopeRejection::Malformed,
        ),
        (Some("system/Condition.r"), ScopeRejection::NotAllowed),
        (Some("system/*.rs"), ScopeRejection::NotAllowed),
        (
            Some("system/Patient.rs system/Patient.c"),
            ScopeRejection::NotAllowed,
        ),
    ];
    for (scope, expected) in cases {
        let mut req = request(&KEYS.a_es384.sign_assertion(PARTNER_A, ENDPOINT), "");
        req.scope = scope.map(str::to_owned);
        let error = f
            .authority
            .issue_token(&req, None)
            .expect_err("scope refused");
        assert_eq!(error, TokenError::InvalidScope(expected), "{scope:?}");
        assert_eq!((error.error_code(), error.status()), ("invalid_scope", 400));
    }
}

#[test]
fn smart_grants_exactly_the_requested_subset() {
    let f = fixture();
    for scope in [
        "system/Observation.c",
        "system/Patient.read",
        "system/Observation.cruds system/Patient.s",
    ] {
        let req = request(&KEYS.a_es384.sign_assertion(PARTNER_A, ENDPOINT), scope);
        let response = f.authority.issue_token(&req, None).expect("granted");
        assert_eq!(response.scope, scope);
        let grant = f
            .authority
            .verify_bearer(&response.access_token, None)
            .expect("valid bearer");
        assert_eq!(grant.scopes().to_string(), scope);
    }
}

// --- RFC 8705 certificate binding ------------------------------------------------------------

#[test]
fn rfc8705_bound_client_must_present_its_certificate() {
    let f = fixture();
    let wrong = certificate_thumbprint(b"someone else's certificate");
    for presented in [None, Some(wrong.as_str())] {
        let req = request(
            &KEYS.b_es384.sign_assertion(PARTNER_B, ENDPOINT),
            "system/Patient.r",
        );
        let error = f
            .authority
            .issue_token(&req, presented)
            .expect_err("refused");
        assert_eq!(
            error,
            TokenError::InvalidClient(AssertionRejection::CertificateMismatch)
        );
    }
}

#[test]
fn rfc8705_token_carries_cnf_and_bearer_must_match_it() {
    let f = fixture();
    let cert = b_cert();
    let req = request(
        &KEYS.b_es384.sign_assertion(PARTNER_B, ENDPOINT),
        "system/Patient.r",
    );
    let response = f.authority.issue_token(&req, Some(&cert)).expect("granted");
    let claims = decode_claims(&response.access_token);
    assert_eq!(claims["cnf"], json!({ "x5t#S256": cert }));

    let grant = f
        .authority
        .verify_bearer(&response.access_token, Some(&cert))
        .expect("bound ok");
    assert_eq!(grant.cert_thumbprint(), Some(cert.as_str()));
    let other = certificate_thumbprint(b"another certificate");
    // Refused whether or not the signature check is served from the cache.
    for presented in [None, Some(other.as_str())] {
        assert_eq!(
            f.authority.verify_bearer(&response.access_token, presented),
            Err(BearerError::CertificateMismatch)
        );
    }
    let fresh = fixture();
    assert_eq!(
        fresh.authority.verify_bearer(&response.access_token, None),
        Err(BearerError::CertificateMismatch)
    );
}

#[test]
fn rfc8705_unbound_client_gets_no_cnf() {
    let f = fixture();
    let response = f
        .token(&KEYS.a_es384.sign_assertion(PARTNER_A, ENDPOINT))
        .expect("granted");
    assert!(decode_claims(&response.access_token).get("cnf").is_none());
    let any_cert = certificate_thumbprint(b"any");
    assert!(
        f.authority
            .verify_bearer(&response.access_token, Some(&any_cert))
            .is_ok()
    );
}

// --- Access tokens and bearer verification ---------------------------------------------------

fn decode_claims(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').nth(1).expect("claims part");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("json")
}

fn decode_header(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').next().expect("header part");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("json")
}

fn issued(f: &Fixture) -> TokenResponse {
    f.token(&KEYS.a_es384.sign_assertion(PARTNER_A, ENDPOINT))
        .expect("granted")
}

#[test]
fn rfc9068_access_token_shape() {
    let f = fixture();
    let token = issued(&f).access_token;
    let header = decode_header(&token);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["typ"], "at+jwt");
    let jwks = f.authority.jwks();
    assert_eq!(header["kid"], jwks["keys"][0]["kid"]);
    let claims = decode_claims(&token);
    assert_eq!(claims["iss"], ISSUER);
    assert_eq!(claims["aud"], ISSUER);
    assert_eq!(claims["sub"], PARTNER_A);
    assert_eq!(claims["scope"], "system/Observation.rs");
    let exp = claims["exp"].as_u64().expect("exp");
    let iat = claims["iat"].as_u64().expect("iat");
    assert_eq!(exp - iat, 300);
    assert!(claims["jti"].as_str().is_some_and(|jti| !jti.is_empty()));
}

#[test]
fn rfc6750_bearer_yields_grant_and_cache_hit_returns_same_grant() {
    let f = fixture();
    let token = issued(&f).access_token;
    let first = f.authority.verify_bearer(&token, None).expect("valid");
    assert_eq!(first.client_id(), PARTNER_A);
    assert!(first.scopes().allows("Observation", Interaction::Read));
    assert!(!first.scopes().allows("Observation", Interaction::Create));
    assert_eq!(
        first.authorize("Observation", Interaction::Create),
        Err(BearerError::InsufficientScope)
    );
    let second = f.authority.verify_bearer(&token, None).expect("valid");
    assert!(
        Arc::ptr_eq(&first, &second),
        "second call must be served from the cache"
    );
}

#[test]
fn rfc6750_expired_bearer_is_rejected_on_cache_hit_and_miss() {
    let f = fixture();
    let token = issued(&f).access_token;
    assert!(f.authority.verify_bearer(&token, None).is_ok());
    f.clock.advance(300 + 30 + 1);
    assert_eq!(
        f.authority.verify_bearer(&token, None),
        Err(BearerError::Expired)
    );
    // A peer node that never saw the token reaches the same answer through the signature path.
    let peer = fixture();
    peer.clock.advance(300 + 30 + 1);
    assert_eq!(
        peer.authority.verify_bearer(&token, None),
        Err(BearerError::Expired)
    );
}

#[test]
fn cluster_peer_with_same_signing_key_verifies_tokens() {
    let f = fixture();
    let token = issued(&f).access_token;
    let peer = fixture();
    assert_eq!(
        peer.authority
            .verify_bearer(&token, None)
            .expect("valid")
            .client_id(),
        PARTNER_A
    );
}

#[test]
fn rfc8725_bearer_must_be_es256_at_jwt_signed_by_our_key() {
    let f = fixture();
    let token = issued(&f).access_token;
    let claims = decode_claims(&token);
    let kid = f.authority.jwks()["keys"][0]["kid"].clone();
    let header = json!({"alg": "ES256", "typ": "at+jwt", "kid": kid});

    // Another P-256 key posing as ours.
    let impostor = PartnerKey::generate_es256("x").sign_claims(&claims, &header);
    assert_eq!(
        f.authority.verify_bearer(&impostor, None),
        Err(BearerError::BadSignature)
    );
    // alg none, HS256 keyed with our public JWK, a client assertion used as a bearer.
    let none = unsigned_token(
        &json!({"alg": "none", "typ": "at+jwt", "kid": kid}),
        &claims,
    );
    assert_eq!(
        f.authority.verify_bearer(&none, None),
        Err(BearerError::NotOurs)
    );
    let hs = hmac_token(
        f.authority.jwks().to_string().as_bytes(),
        &json!({"alg": "HS256", "typ": "at+jwt", "kid": kid}),
        &claims,
    );
    assert_eq!(
        f.authority.verify_bearer(&hs, None),
        Err(BearerError::NotOurs)
    );
    let assertion = KEYS.a_es256.sign_assertion(PARTNER_A, ENDPOINT);
    assert_eq!(
        f.authority.verify_bearer(&assertion, None),
        Err(BearerError::NotOurs)
    );
    // Tampered scope.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[1] = base64_url(
        with(claims.clone(), "scope", json!("system/*.cruds"))
            .to_string()
            .as_bytes(),
    );
    assert_eq!(
        f.authority.verify_bearer(&parts.join("."), None),
        Err(BearerError::BadSignature)
    );
}

#[test]
fn rfc6750_bearer_issued_elsewhere_or_for_unknown_client_is_rejected() {
    let keys = &*KEYS;
    let f = fixture();
    let kid = f.authority.jwks()["keys"][0]["kid"].clone();
    let header = json!({"alg": "ES256", "typ": "at+jwt", "kid": kid});
    // The gateway key, reloaded as a testkit key, lets us sign arbitrary access-token claims.
    let gateway =
        PartnerKey::from_private_pem("gw", KeyAlg::Es256, &keys.gateway_pem).expect("pem");
    let base = decode_claims(&issued(&f).access_token);
    for (field, value) in [
        ("iss", json!("https://other.example")),
        ("aud", json!("https://other.example")),
        ("sub", json!("unregistered")),
    ] {
        let token = gateway.sign_claims(&with(base.clone(), field, value), &header);
        assert_eq!(
            f.authority.verify_bearer(&token, None),
            Err(BearerError::WrongIssuerOrAudience)
        );
    }
    let stale = with(base.clone(), "exp", json!(now() - 100));
    assert_eq!(
        f.authority
            .verify_bearer(&gateway.sign_claims(&stale, &header), None),
        Err(BearerError::Expired)
    );
    let bad_scope = with(base, "scope", json!("patient/*.read"));
    assert_eq!(
        f.authority
            .verify_bearer(&gateway.sign_claims(&bad_scope, &header), None),
        Err(BearerError::Malformed)
    );
}

#[test]
fn b5_bearer_size_bound_and_garbage() {
    let f = fixture();
    assert_eq!(
        f.authority.verify_bearer(&"A".repeat(1024 * 1024), None),
        Err(BearerError::TooLarge)
    );
    for garbage in ["", "x", "a.b.c", "e30.e30.e30"] {
        let error = f
            .authority
            .verify_bearer(garbage, None)
            .expect_err("refused");
        assert_eq!(error.status(), 401);
    }
}

#[test]
fn rfc6750_www_authenticate_challenges() {
    assert_eq!(
        BearerError::Missing.www_authenticate(),
        r#"Bearer realm="caregate""#
    );
    assert_eq!(
        BearerError::Expired.www_authenticate(),
        r#"Bearer realm="caregate", error="invalid_token", error_description="access token has expired""#
    );
    assert_eq!(BearerError::InsufficientScope.status(), 403);
    assert!(
        BearerError::InsufficientScope
            .www_authenticate()
            .contains(r#"error="insufficient_scope""#)
    );
}

#[test]
fn rfc6749_5_2_error_body() {
    let error = TokenError::InvalidClient(AssertionRejection::Expired);
    assert_eq!(
        error.to_json(),
        json!({"error": "invalid_client", "error_description": "client assertion has expired"})
    );
}

#[test]
fn token_request_and_response_debug_redact_credentials() {
    let f = fixture();
    let assertion = KEYS.a_es384.sign_assertion(PARTNER_A, ENDPOINT);
    let req = request(&assertion, "system/Observation.r");
    assert!(!format!("{req:?}").contains(&assertion));
    let response = f.authority.issue_token(&req, None).expect("granted");
    assert!(!format!("{response:?}").contains(&response.access_token));
    assert!(!format!("{:?}", f.authority).contains("BEGIN"));
}

// --- Setup validation ------------------------------------------------------------------------

fn setup_with(registration: ClientRegistration) -> Result<Authority, AuthSetupError> {
    let key = SigningKey::generate().expect("key");
    Authority::new(AuthConfig::new(ENDPOINT, ISSUER), vec![registration], key)
}

fn registration(jwks: Value) -> ClientRegistration {
    ClientRegistration {
        client_id: "partner-x".into(),
        jwks: serde_json::from_value(jwks).expect("jwks json"),
        allowed_scopes: vec!["system/Observation.rs".into()],
        cert_thumbprint: None,
    }
}

fn key_error(jwks: Value) -> (String, String) {
    match setup_with(registration(jwks)) {
        Err(AuthSetupError::Key { client_id, kid, .. }) => (client_id, kid),
        other => panic!("expected a key error, got {other:?}"),
    }
}

#[test]
fn setup_rejects_unusable_registered_keys_naming_client_and_kid() {
    let good_ec = KEYS.a_es384.jwk();
    let mut no_kid = good_ec.clone();
    no_kid.as_object_mut().expect("object").remove("kid");
    assert_eq!(
        key_error(json!({"keys": [no_kid]})),
        ("partner-x".into(), "#0".into())
    );

    let oct = json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"});
    assert_eq!(key_error(json!({"keys": [oct]})).1, "hmac");

    let short_rsa = json!({"kty": "RSA", "kid": "short", "n": "AQAB", "e": "AQAB"});
    assert_eq!(key_error(json!({"keys": [short_rsa]})).1, "short");

    let mut off_curve = good_ec.clone();
    off_curve["kid"] = json!("off-curve");
    off_curve["y"] = off_curve["x"].clone();
    assert_eq!(key_error(json!({"keys": [off_curve]})).1, "off-curve");

    let mut short_coordinate = good_ec.clone();
    short_coordinate["kid"] = json!("short-x");
    short_coordinate["x"] = json!("AQAB");
    assert_eq!(key_error(json!({"keys": [short_coordinate]})).1, "short-x");

    let mut p521 = good_ec.clone();
    p521["kid"] = json!("p521");
    p521["crv"] = json!("P-521");
    assert_eq!(key_error(json!({"keys": [p521]})).1, "p521");

    let mut rs256 = KEYS.a_rsa.jwk();
    rs256["alg"] = json!("RS256");
    assert_eq!(key_error(json!({"keys": [rs256]})).1, "a-rsa");

    let mut mismatched = good_ec.clone();
    mismatched["alg"] = json!("ES256");
    assert_eq!(key_error(json!({"keys": [mismatched]})).1, "a-ec384");

    let mut encryption = good_ec.clone();
    encryption["use"] = json!("enc");
    assert_eq!(key_error(json!({"keys": [encryption]})).1, "a-ec384");

    let okp = json!({"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
    assert_eq!(key_error(json!({"keys": [okp]})).1, "ed");

    assert_eq!(
        key_error(json!({"keys": [good_ec.clone(), good_ec]})).1,
        "a-ec384"
    );
}

#[test]
fn setup_rejects_bad_client_registrations() {
    let jwks = PartnerKey::jwks(&[&KEYS.a_es384]);
    let mut bad_scope = registration(jwks.clone());
    bad_scope.allowed_scopes = vec!["patient/*.read".into()];
    assert!(matches!(
        setup_with(bad_scope),
        Err(AuthSetupError::Client { .. })
    ));

    let mut no_scope = registration(jwks.clone());
    no_scope.allowed_scopes = vec![];
    assert!(matches!(
        setup_with(no_scope),
        Err(AuthSetupError::Client { .. })
    ));

    assert!(matches!(
        setup_with(registration(json!({"keys": []}))),
        Err(AuthSetupError::Client { .. })
    ));

    let mut bad_thumbprint = registration(jwks.clone());
    bad_thumbprint.cert_thumbprint = Some("not a digest".into());
    assert!(matches!(
        setup_with(bad_thumbprint),
        Err(AuthSetupError::Client { .. })
    ));

    let key = SigningKey::generate().expect("key");
    let twice = vec![registration(jwks.clone()), registration(jwks)];
    let error =
        Authority::new(AuthConfig::new(ENDPOINT, ISSUER), twice, key).expect_err("duplicate");
    assert!(error.to_string().contains("partner-x"));
}

#[test]
fn setup_rejects_unsafe_config() {
    let mut configs = Vec::new();
    let mut long_assertions = AuthConfig::new(ENDPOINT, ISSUER);
    long_assertions.max_assertion_lifetime = Duration::from_secs(3600);
    configs.push(long_assertions);
    configs.push(AuthConfig::new("", ISSUER));
    configs.push(AuthConfig::new(ENDPOINT, ""));
    let mut no_bound = AuthConfig::new(ENDPOINT, ISSUER);
    no_bound.max_token_bytes = 0;
    configs.push(no_bound);
    let mut huge_leeway = AuthConfig::new(ENDPOINT, ISSUER);
    huge_leeway.leeway = Duration::from_secs(3600);
    configs.push(huge_leeway);
    for config in configs {
        let key = SigningKey::generate().expect("key");
        assert!(matches!(
            Authority::new(config, vec![], key),
            Err(AuthSetupError::Config(_))
        ));
    }
}

#[test]
fn signing_key_loads_pkcs8_pem_and_publishes_rfc7638_kid() {
    let key = SigningKey::from_pkcs8_pem(&KEYS.gateway_pem).expect("loads");
    let again = SigningKey::from_pkcs8_pem(&KEYS.gateway_pem).expect("loads");
    assert_eq!(key.kid(), again.kid());
    let jwk = key.public_jwk();
    assert_eq!(
        (
            jwk["kty"].as_str(),
            jwk["crv"].as_str(),
            jwk["alg"].as_str()
        ),
        (Some("EC"), Some("P-256"), Some("ES256"))
    );
    assert_eq!(jwk["kid"], key.kid());
    assert!(jwk.get("d").is_none());
    assert_ne!(SigningKey::generate().expect("key").kid(), key.kid());

    assert!(matches!(
        SigningKey::from_pkcs8_pem(&KEYS.a_es384.private_pem()),
        Err(AuthSetupError::SigningKey(_))
    ));
    assert!(matches!(
        SigningKey::from_pkcs8_pem("nope"),
        Err(AuthSetupError::SigningKey(_))
    ));
}
