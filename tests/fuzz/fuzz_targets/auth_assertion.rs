//! Client assertions and bearer tokens (DOMAIN.md B2 row B5; RFC 7523, RFC 8725) into one
//! `caregate_auth::Authority`, built once with freshly generated keys.
//!
//! Input: byte 0 picks the mode, the rest is the payload.
//! - mode 0: the payload (as text) is the `client_assertion` of an otherwise well-formed token
//!   request. The partner keys are generated at start-up, so no input can carry a valid
//!   signature: the request must be refused, and never with a panic.
//! - mode 1: the payload is a bearer token; it must be refused (the gateway's signing key is
//!   generated at start-up too), with or without a client certificate thumbprint.
//! - mode 2: the payload is JSON `{"h": header overrides, "c": claims, "s": scope, "k": 0|1,
//!   "t": thumbprint, "now": unix seconds}`; the target signs the claims with the chosen partner
//!   key, so the fuzzer reaches the claim checks (`iss`/`sub`/`aud`/`exp`/`nbf`/`iat`/`jti`),
//!   the replay cache, the certificate binding and the scope rules. If a token is issued it must
//!   verify as a bearer for that same client, and a corrupted copy must not.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use caregate_auth::{
    AuthConfig, Authority, CLIENT_CREDENTIALS, ClientRegistration, Clock,
    JWT_BEARER_ASSERTION_TYPE, SigningKey, TokenRequest,
};
use caregate_testkit::keys::PartnerKey;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const TOKEN_ENDPOINT: &str = "https://caregate.test/auth/token";
/// A fixed "now" (2027-01-15) so runs are reproducible; mode 2 may move it.
const BASE_NOW: u64 = 1_800_000_000;
/// The thumbprint the bound client's certificate has.
const BOUND_THUMBPRINT: &str = "q1Yp0vD2V0rZ4X1oQ3m6t9yJmE3n8gQvNq0Jz7m0u2A";

#[derive(Debug)]
struct InputClock(AtomicU64);

impl Clock for InputClock {
    fn now_unix(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

struct Fixture {
    authority: Authority,
    clock: Arc<InputClock>,
    keys: [PartnerKey; 2],
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let keys = [
        PartnerKey::generate_es256("gp-key-1"),
        PartnerKey::generate_es384("trust-key-1"),
    ];
    let registration = |id: &str, key: &PartnerKey, scopes: &[&str], thumbprint: Option<&str>| {
        ClientRegistration {
            client_id: id.to_owned(),
            jwks: serde_json::from_value(PartnerKey::jwks(&[key])).expect("a JWKS"),
            allowed_scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            cert_thumbprint: thumbprint.map(str::to_owned),
        }
    };
    let clients = vec![
        registration("gp-a81001", &keys[0], &["system/*.cruds"], None),
        registration(
            "trust-rx1",
            &keys[1],
            &["system/Patient.r", "system/Observation.cru"],
            Some(BOUND_THUMBPRINT),
        ),
    ];
    let mut config = AuthConfig::new(TOKEN_ENDPOINT, "https://caregate.test");
    // Small enough for the fuzzer to fill, so the "cache full" path runs too.
    config.replay_cache_capacity = 256;
    config.bearer_cache_capacity = 64;
    let clock = Arc::new(InputClock(AtomicU64::new(BASE_NOW)));
    let authority = Authority::new(
        config,
        clients,
        SigningKey::generate().expect("signing key"),
    )
    .expect("a valid authority")
    .with_clock(clock.clone());
    Fixture {
        authority,
        clock,
        keys,
    }
});

fn token_request(assertion: String, scope: Option<String>) -> TokenRequest {
    TokenRequest {
        grant_type: Some(CLIENT_CREDENTIALS.to_owned()),
        client_assertion_type: Some(JWT_BEARER_ASSERTION_TYPE.to_owned()),
        client_assertion: Some(assertion),
        scope,
    }
}

fuzz_target!(|data: &[u8]| {
    let fixture = &*FIXTURE;
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(payload).into_owned();
    fixture.clock.0.store(BASE_NOW, Ordering::Relaxed);
    match mode % 3 {
        0 => {
            for thumbprint in [None, Some(BOUND_THUMBPRINT)] {
                let request = token_request(text.clone(), Some("system/Patient.r".to_owned()));
                let result = fixture.authority.issue_token(&request, thumbprint);
                assert!(result.is_err(), "an unsigned-by-us assertion was accepted");
            }
        }
        1 => {
            for thumbprint in [None, Some(BOUND_THUMBPRINT)] {
                let result = fixture.authority.verify_bearer(&text, thumbprint);
                assert!(result.is_err(), "a forged bearer token was accepted");
            }
        }
        _ => {
            let Ok(spec) = serde_json::from_slice::<Value>(payload) else {
                return;
            };
            let key_index = usize::from(spec["k"].as_u64() == Some(1));
            let key = &fixture.keys[key_index];
            let header = spec.get("h").cloned().unwrap_or_else(|| json!({}));
            let claims = spec.get("c").cloned().unwrap_or(Value::Null);
            if let Some(now) = spec["now"].as_u64() {
                fixture.clock.0.store(now, Ordering::Relaxed);
            }
            let scope = spec["s"].as_str().map(str::to_owned);
            let thumbprint = spec["t"].as_str();
            let assertion = key.sign_claims(&claims, &header);
            let request = token_request(assertion, scope);
            if let Ok(response) = fixture.authority.issue_token(&request, thumbprint) {
                let grant = fixture
                    .authority
                    .verify_bearer(&response.access_token, thumbprint)
                    .expect("a token just issued verifies on the same connection");
                assert_eq!(Some(grant.client_id()), claims["iss"].as_str());
                let mut forged = response.access_token.clone();
                let last = forged.pop().expect("non-empty token");
                forged.push(if last == 'A' { 'B' } else { 'A' });
                assert!(
                    fixture
                        .authority
                        .verify_bearer(&forged, thumbprint)
                        .is_err(),
                    "a token with a corrupted signature was accepted"
                );
            }
        }
    }
});
