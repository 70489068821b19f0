//! The RFC 8725 / SMART Backend Services matrix (DOMAIN.md B2 `B5`) against the real server:
//! every bad client assertion at `/auth/token` and every bad bearer at a FHIR endpoint gets 401,
//! and the server keeps serving (no panic, no hang).

use caregate_e2e::{Gateway, patient};
use caregate_testkit::keys::{PartnerKey, hmac_token, unix_now, unsigned_token};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn claims(gw: &Gateway, client: &str) -> Value {
    PartnerKey::assertion_claims(client, &gw.token_url())
}

#[tokio::test]
async fn b5_every_bad_assertion_gets_401_invalid_client() {
    let gw = Gateway::start();
    let gp = gw.partner("gp-a81001");
    let trust = gw.partner("trust-rx1");
    let scope = "system/Observation.c";
    let with = |field: &str, value: Value| {
        let mut c = claims(&gw, "gp-a81001");
        c[field] = value;
        c
    };
    let now = unix_now();
    let cases: Vec<(&str, String)> = vec![
        (
            "alg none",
            unsigned_token(
                &json!({"alg": "none", "typ": "JWT", "kid": gp.key.kid()}),
                &claims(&gw, "gp-a81001"),
            ),
        ),
        (
            "HS256 signed with the RSA public key (key confusion)",
            hmac_token(
                trust.key.public_pem().as_bytes(),
                &json!({"alg": "HS256", "typ": "JWT", "kid": trust.key.kid()}),
                &claims(&gw, "trust-rx1"),
            ),
        ),
        (
            "expired",
            gp.key
                .sign_claims(&with("exp", json!(now - 600)), &json!({})),
        ),
        (
            "exp more than 5 minutes ahead",
            gp.key
                .sign_claims(&with("exp", json!(now + 3600)), &json!({})),
        ),
        (
            "future nbf",
            gp.key
                .sign_claims(&with("nbf", json!(now + 600)), &json!({})),
        ),
        (
            "wrong aud",
            gp.key.sign_claims(
                &with("aud", json!("https://elsewhere.example/token")),
                &json!({}),
            ),
        ),
        (
            "wrong iss",
            gp.key
                .sign_claims(&with("iss", json!("trust-rx1")), &json!({})),
        ),
        (
            "unknown kid",
            gp.key
                .sign_claims(&claims(&gw, "gp-a81001"), &json!({"kid": "no-such-key"})),
        ),
        (
            "kid of another client",
            trust.key.sign_claims(&claims(&gw, "gp-a81001"), &json!({})),
        ),
        (
            "unregistered client",
            gp.key.sign_claims(&claims(&gw, "stranger"), &json!({})),
        ),
        ("garbage", "not.a.jwt".to_owned()),
        ("1 MB token", "a".repeat(1024 * 1024)),
    ];
    for (name, assertion) in &cases {
        let (status, body) = gw.exchange(assertion, scope).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {body}");
        assert_eq!(body["error"], "invalid_client", "{name}");
        assert!(
            !body.to_string().contains(assertion.as_str()) || assertion.len() < 10,
            "{name}: assertion echoed"
        );
    }

    // Replayed jti: the first use succeeds, the second is refused.
    let assertion = gp.key.sign_assertion("gp-a81001", &gw.token_url());
    assert_eq!(gw.exchange(&assertion, scope).await.0, StatusCode::OK);
    let (status, body) = gw.exchange(&assertion, scope).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "replayed jti: {body}");

    // Scope beyond the registration.
    let pharmacy = gw.partner("pharmacy-fa123");
    let assertion = pharmacy
        .key
        .sign_assertion("pharmacy-fa123", &gw.token_url());
    let (status, body) = gw.exchange(&assertion, "system/Patient.c").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_scope");

    // Wrong grant type.
    let (status, body) = gw.token_request(&[("grant_type", "password")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Still serving after all that.
    let token = gw.token("gp-a81001").await;
    assert_eq!(
        gw.post("/fhir/Patient", &token, &patient("9434765919"))
            .await
            .status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn b5_bad_bearer_tokens_get_401_with_a_challenge() {
    let gw = Gateway::start();
    let good = gw.token("gp-a81001").await;
    let gp = gw.partner("gp-a81001");
    let assertion = gp.key.sign_assertion("gp-a81001", &gw.token_url());
    let mut tampered = good.clone();
    tampered.pop();
    tampered.push(if good.ends_with('A') { 'B' } else { 'A' });
    let cases: Vec<(&str, String)> = vec![
        ("garbage", "garbage".into()),
        ("a client assertion used as a bearer", assertion),
        (
            "alg none",
            unsigned_token(
                &json!({"alg": "none", "typ": "at+jwt"}),
                &json!({"sub": "gp-a81001", "scope": "system/*.cruds"}),
            ),
        ),
        ("tampered signature", tampered),
        ("oversized (10 KB)", "a".repeat(10 * 1024)),
    ];
    let body = patient("9434765919").to_string().into_bytes();
    for (name, token) in &cases {
        let reply = gw
            .send(
                Method::POST,
                "/fhir/Patient",
                Some(token),
                Some(body.clone()),
                &[],
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "{name}: {}",
            reply.body
        );
        assert!(
            reply
                .header("www-authenticate")
                .starts_with("Bearer realm=\"caregate\""),
            "{name}"
        );
        assert_eq!(reply.issue_code(), "login", "{name}");
    }
    let reply = gw
        .send(Method::POST, "/fhir/Patient", Some(&good), Some(body), &[])
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
}
