//! The token endpoint's form: arbitrary bytes as an `application/x-www-form-urlencoded` body,
//! decoded as the gateway decodes it (serde_urlencoded into `TokenRequest`), then handed to an
//! `Authority` (DOMAIN.md B2 rows B2 and B5). Duplicate fields must be refused by the decoder,
//! and whatever decodes must be refused without a panic (no key can sign for the fuzzer), with
//! an RFC 6749 error body.
#![no_main]

use std::sync::LazyLock;

use caregate_auth::{AuthConfig, Authority, ClientRegistration, SigningKey, TokenRequest};
use caregate_testkit::keys::PartnerKey;
use libfuzzer_sys::fuzz_target;

static AUTHORITY: LazyLock<Authority> = LazyLock::new(|| {
    let key = PartnerKey::generate_es256("gp-key-1");
    let client = ClientRegistration {
        client_id: "gp-a81001".to_owned(),
        jwks: serde_json::from_value(PartnerKey::jwks(&[&key])).expect("a JWKS"),
        allowed_scopes: vec!["system/*.cruds".to_owned()],
        cert_thumbprint: None,
    };
    Authority::new(
        AuthConfig::new("https://caregate.test/auth/token", "https://caregate.test"),
        vec![client],
        SigningKey::generate().expect("signing key"),
    )
    .expect("a valid authority")
});

fuzz_target!(|data: &[u8]| {
    let Ok(request) = serde_urlencoded::from_bytes::<TokenRequest>(data) else {
        return;
    };
    let result = AUTHORITY.issue_token(&request, None);
    assert!(
        result.is_err(),
        "a token was issued without a valid signature"
    );
    if let Err(error) = result {
        // The wire form is RFC 6749 §5.2 and nothing more. (That it never echoes the assertion
        // holds by type: descriptions are `&'static str`. An earlier substring check here fired
        // on an assertion that happened to be a piece of the fixed description text.)
        assert!(matches!(error.status(), 400 | 401 | 503));
        let body = error.to_json();
        let object = body.as_object().expect("an object");
        assert!(
            object
                .keys()
                .all(|k| k == "error" || k == "error_description")
        );
        assert!(
            object["error"]
                .as_str()
                .is_some_and(|code| !code.is_empty())
        );
    }
});
