//! The IG officers' admin listener end to end (DOMAIN.md `IGQ`, `LR-2`, `AUD-*`): sign-in,
//! sessions and CSRF, the audit API for officers and for partners with the ig-officer role,
//! searches that find what real submissions recorded, audited break-glass reviews, and chain
//! verification — over real TLS against the real binary.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use argon2::password_hash::{PasswordHasher as _, SaltString};
use caregate_audit::{Action, Actor, AuditEvent, Entity, Outcome};
use caregate_e2e::{Gateway, Options, TestPartner, default_partners, patient};
use caregate_store::sqlite::{SqliteOptions, SqliteStore};
use caregate_store::{Store as _, Submission};
use caregate_testkit::keys::PartnerKey;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Client, StatusCode, redirect};
use serde_json::Value;

const PASSWORD: &str = "correct horse battery staple";
const NHS: &str = "9434765919";

/// A PHC hash with small Argon2id parameters, so debug-build sign-ins stay quick.
fn cheap_hash(password: &str) -> String {
    let params = argon2::Params::new(256, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"caregate-e2e-salt").unwrap();
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

fn start() -> Gateway {
    let mut partners = default_partners();
    partners.push(TestPartner::new(
        "icb-ig",
        "QWO",
        "icb",
        &["system/AuditEvent.rs"],
        PartnerKey::generate_es256("icb-ig-key-1"),
    ));
    Gateway::start_configured(Options {
        partners,
        extra_toml: format!(
            "[[ig_officer]]\nusername = \"alice\"\npassword_hash = \"{}\"\nname = \"Alice Example\"\nods_code = \"QWO\"\n",
            cheap_hash(PASSWORD)
        ),
        partner_extra: vec![("icb-ig".into(), "roles = [\"ig-officer\"]".into())],
        ..Options::default()
    })
}

/// A browser-like client for the admin listener: trusts the dev certificate, does not follow
/// redirects (the tests look at them), keeps cookies by hand.
struct Browser {
    base: String,
    client: Client,
    cookies: Vec<(String, String)>,
}

struct Page {
    status: StatusCode,
    location: String,
    body: String,
}

impl Browser {
    fn new(gw: &Gateway) -> Self {
        let pem = std::fs::read(gw.data_dir().join("dev-certificate.pem")).unwrap();
        let client = Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
            .redirect(redirect::Policy::none())
            .build()
            .unwrap();
        Self {
            base: gw.admin_url.clone().expect("the admin listener is enabled"),
            client,
            cookies: Vec::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(&mut self, request: reqwest::RequestBuilder) -> Page {
        let request = if self.cookies.is_empty() {
            request
        } else {
            request.header(COOKIE, self.cookie_header())
        };
        let response = request.send().await.unwrap();
        for value in response.headers().get_all(SET_COOKIE) {
            let text = value.to_str().unwrap();
            let (pair, attributes) = text.split_once(';').unwrap_or((text, ""));
            assert!(attributes.contains("Secure"), "{text}");
            assert!(attributes.contains("HttpOnly"), "{text}");
            assert!(attributes.contains("SameSite=Strict"), "{text}");
            let (name, value) = pair.split_once('=').unwrap();
            self.cookies.retain(|(k, _)| k != name);
            if !value.is_empty() {
                self.cookies.push((name.to_owned(), value.to_owned()));
            }
        }
        Page {
            status: response.status(),
            location: response
                .headers()
                .get(LOCATION)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default(),
            body: response.text().await.unwrap(),
        }
    }

    async fn get(&mut self, path: &str) -> Page {
        let request = self.client.get(format!("{}{path}", self.base));
        self.send(request).await
    }

    async fn post_form(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let request = self.client.post(format!("{}{path}", self.base)).form(form);
        self.send(request).await
    }

    async fn get_json(&mut self, path: &str) -> (StatusCode, Value) {
        let page = self.get(path).await;
        (
            page.status,
            serde_json::from_str(&page.body).unwrap_or(Value::Null),
        )
    }

    async fn sign_in(&mut self, password: &str) -> Page {
        let form = self.get("/console/login").await;
        assert_eq!(form.status, StatusCode::OK);
        let csrf = hidden_csrf(&form.body);
        self.post_form(
            "/console/login",
            &[
                ("csrf", &csrf),
                ("username", "alice"),
                ("password", password),
            ],
        )
        .await
    }
}

fn hidden_csrf(html: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = html.find(marker).expect("a CSRF field") + marker.len();
    let end = start + html[start..].find('"').unwrap();
    html[start..end].to_owned()
}

#[tokio::test]
async fn igq_console_and_api_require_sign_in_and_refuse_a_wrong_password() {
    let gw = start();
    let mut browser = Browser::new(&gw);
    let page = browser.get("/console").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.location, "/console/login");
    let (status, body) = browser.get_json("/admin/audit/events").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["resourceType"], "OperationOutcome");

    let refused = browser.sign_in("wrong password").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(refused.body.contains("Wrong username or password"));
    assert_eq!(browser.get("/console").await.status, StatusCode::SEE_OTHER);

    // A sign-in without the form's CSRF token is refused even with the right password.
    let forged = browser
        .post_form(
            "/console/login",
            &[
                ("csrf", "forged"),
                ("username", "alice"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);

    let signed_in = browser.sign_in(PASSWORD).await;
    assert_eq!(
        signed_in.status,
        StatusCode::SEE_OTHER,
        "{}",
        signed_in.body
    );
    let console = browser.get("/console").await;
    assert_eq!(console.status, StatusCode::OK);
    assert!(console.body.contains("Alice Example"));
}

#[tokio::test]
async fn igq_search_by_patient_finds_what_a_submission_recorded_and_the_sar_names_the_recipient() {
    let gw = start();
    let token = gw.token("gp-a81001").await;
    let created = gw.post("/fhir/Patient", &token, &patient(NHS)).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let read = gw
        .send(
            reqwest::Method::GET,
            &format!("/fhir/Patient/{id}"),
            Some(&token),
            None,
            &[],
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);

    let mut browser = Browser::new(&gw);
    assert_eq!(
        browser.sign_in(PASSWORD).await.status,
        StatusCode::SEE_OTHER
    );
    let (status, body) = browser
        .get_json(&format!("/admin/audit/events?patient={NHS}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = body["events"].as_array().unwrap();
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e["event"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["create", "read"], "{body}");
    assert!(
        events
            .iter()
            .all(|e| e["event"]["actor"]["partner_id"] == "gp-a81001")
    );

    let page = browser.get(&format!("/console?patient={NHS}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body.contains(&format!("Patient/{id}")),
        "{}",
        page.body
    );
    assert!(page.body.contains("Export CSV"));

    let (status, sar) = browser
        .get_json(&format!("/admin/audit/sar?patient={NHS}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{sar}");
    let recipients: Vec<&str> = sar["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["organisation"].as_str().unwrap())
        .collect();
    assert_eq!(recipients, ["gp-a81001"]);

    let csv = browser
        .get(&format!("/admin/audit/export.csv?patient={NHS}"))
        .await;
    assert_eq!(csv.status, StatusCode::OK);
    assert!(csv.body.starts_with("seq,recorded,"));
    // The GP's create and read; the officer's own searches about the patient are listed too.
    assert_eq!(
        csv.body
            .lines()
            .filter(|l| l.contains(",gp-a81001,"))
            .count(),
        2,
        "{}",
        csv.body
    );
    assert!(
        csv.body
            .contains(",audit-query,success,200,,QWO,ig-officer/alice,")
    );
    let ndjson = browser
        .get(&format!("/admin/audit/export.ndjson?patient={NHS}"))
        .await;
    let first: Value = serde_json::from_str(ndjson.body.lines().next().unwrap()).unwrap();
    assert_eq!(first["resourceType"], "AuditEvent");
    assert_eq!(first["action"], "C");

    // An invalid NHS number gets a clear refusal that does not echo it.
    let (status, outcome) = browser
        .get_json("/admin/audit/events?patient=9434765918")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let text = outcome.to_string();
    assert!(text.contains("not a valid NHS number"), "{text}");
    assert!(!text.contains("9434765918"), "{text}");
}

#[tokio::test]
async fn igq_partner_tokens_need_the_ig_officer_role_and_verify_reports_verified() {
    let gw = start();
    let gp = gw.token("gp-a81001").await;
    let ig = gw.token("icb-ig").await;
    let admin = gw.admin_url.clone().unwrap();
    let get = |token: String, path: &str| {
        let request = gw.client.get(format!("{admin}{path}")).bearer_auth(token);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, body) = get(gp, "/admin/audit/events").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["issue"][0]["code"], "forbidden");
    let (status, body) = get(ig.clone(), "/admin/audit/events?action=token-request").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!body["events"].as_array().unwrap().is_empty());
    let (status, body) = get(ig, "/admin/audit/verify").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["result"], "VERIFIED", "{body}");
}

#[tokio::test]
async fn lr_2_review_marking_needs_csrf_and_is_audited() {
    let mut gw = start();
    // Before the policy stage sets purposes of use, put one emergency access in the log directly,
    // with the gateway stopped (one writer per database). One request first: the binary installs
    // its SIGTERM handler only once it serves (a SIGTERM straight after the ready line kills it).
    let _ = gw.token("gp-a81001").await;
    assert!(gw.terminate().await);
    {
        let store = SqliteStore::open(&gw.data_dir(), SqliteOptions::default()).unwrap();
        let mut event = AuditEvent::new(
            "req-btg",
            Actor {
                partner_id: Some("trust-rx1".into()),
                ods_code: Some("RX1".into()),
                ..Actor::default()
            },
            Action::Read,
            Outcome::Success,
        );
        event.patient = Some(NHS.into());
        event.purpose_of_use = Some("ETREAT".into());
        event.entity = Some(Entity {
            resource_type: "Patient".into(),
            id: "p1".into(),
            version_id: Some(1),
            content_hash: None,
        });
        store
            .submit(Submission {
                partner: "trust-rx1".into(),
                idempotency_key: None,
                records: vec![],
                audit: vec![event],
            })
            .await
            .unwrap();
        store.close().await.unwrap();
    }
    let before = count_events(&gw).await;
    gw.launch();
    let mut browser = Browser::new(&gw);
    let mut requests = 0u64;
    browser.sign_in(PASSWORD).await;
    requests += 2;
    let queue = browser.get("/console/reviews").await;
    requests += 1;
    assert!(
        queue.body.contains("req-btg") || queue.body.contains("Patient/p1"),
        "{}",
        queue.body
    );
    let seq = {
        let (_, body) = browser
            .get_json("/admin/audit/events?break_glass=true")
            .await;
        requests += 1;
        body["events"][0]["seq"].as_i64().unwrap().to_string()
    };

    // Without the CSRF token: refused, nothing marked.
    let forged = browser
        .post_form("/console/reviews", &[("seq", &seq), ("note", "x")])
        .await;
    requests += 1;
    assert_eq!(forged.status, StatusCode::BAD_REQUEST);
    let forged = browser
        .post_form(
            "/console/reviews",
            &[("csrf", "nope"), ("seq", &seq), ("note", "x")],
        )
        .await;
    requests += 1;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let api_forged = {
        let request = browser
            .client
            .post(format!("{}/admin/audit/reviews", browser.base))
            .header("content-type", "application/json")
            .body(format!("{{\"seq\": {seq}, \"note\": \"x\"}}"));
        browser.send(request).await
    };
    requests += 1;
    assert_eq!(api_forged.status, StatusCode::FORBIDDEN);

    let csrf = hidden_csrf(&queue.body);
    let marked = browser
        .post_form(
            "/console/reviews",
            &[
                ("csrf", &csrf),
                ("seq", &seq),
                ("note", "ED attendance confirmed"),
            ],
        )
        .await;
    requests += 1;
    assert_eq!(marked.status, StatusCode::SEE_OTHER, "{}", marked.body);
    let again = browser
        .post_form(
            "/console/reviews",
            &[("csrf", &csrf), ("seq", &seq), ("note", "twice")],
        )
        .await;
    requests += 1;
    assert_eq!(again.status, StatusCode::CONFLICT);

    let (_, detail) = browser
        .get_json(&format!("/admin/audit/events/{seq}"))
        .await;
    requests += 1;
    assert_eq!(detail["review"]["reviewer"], "alice");
    let (_, reviews) = browser.get_json("/admin/audit/events?action=review").await;
    requests += 1;
    // The refused attempts are recorded too; the one that succeeded carries the patient.
    let recorded: Vec<&Value> = reviews["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["event"])
        .collect();
    let outcomes: Vec<&str> = recorded
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["rejected", "rejected", "rejected", "success", "rejected"]
    );
    let review = recorded[3];
    assert_eq!(
        review["actor"]["client_id"], "ig-officer/alice",
        "{reviews}"
    );
    assert_eq!(review["actor"]["ods_code"], "QWO");
    assert_eq!(review["patient"], NHS);
    let empty = browser.get("/console/reviews").await;
    requests += 1;
    assert!(
        empty
            .body
            .contains("No break-glass accesses are awaiting review")
    );

    // Every admin request left exactly one event.
    assert_eq!(audit_count(&mut gw).await, before + requests);
}

/// Stop the gateway and count the audit events in its data directory.
async fn audit_count(gw: &mut Gateway) -> u64 {
    assert!(gw.terminate().await);
    count_events(gw).await
}

/// The audit events in a stopped gateway's data directory.
async fn count_events(gw: &Gateway) -> u64 {
    let store = SqliteStore::open(&gw.data_dir(), SqliteOptions::default()).unwrap();
    let count = store.read_audit(0, 1_000_000).await.unwrap().len() as u64;
    store.close().await.unwrap();
    count
}

fn caregate(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(caregate_e2e::binary())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn igq_cli_searches_a_live_gateway_and_builds_the_sar() {
    let gw = start();
    let token = gw.token("gp-a81001").await;
    let created = gw.post("/fhir/Patient", &token, &patient(NHS)).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let data = gw.data_dir();
    let data = data.to_str().unwrap();

    let (code, out, err) = caregate(
        &[
            "audit",
            "search",
            "--data",
            data,
            "--patient",
            "943 476 5919",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("gp-a81001") && out.contains("create"), "{out}");
    assert!(err.contains("1 events"), "{err}");

    let (code, out, _) = caregate(
        &[
            "audit",
            "search",
            "--data",
            data,
            "--action",
            "token-request",
            "--format",
            "csv",
        ],
        None,
    );
    assert_eq!(code, 0);
    assert!(out.starts_with("seq,recorded,"), "{out}");
    assert_eq!(out.lines().count(), 2, "{out}");

    let (code, out, _) = caregate(&["audit", "sar", "--data", data, "--patient", NHS], None);
    assert_eq!(code, 0);
    assert!(out.contains("Organisations that sent records about this patient:\n  - gp-a81001 (ODS A81001): 1 submission,"), "{out}");

    let (code, _, err) = caregate(
        &["audit", "sar", "--data", data, "--patient", "9434765918"],
        None,
    );
    assert_eq!(code, 2);
    assert!(err.contains("--patient is not a valid NHS number"), "{err}");
    assert!(!err.contains("9434765918"), "{err}");

    let (code, out, err) = caregate(&["ig-password"], Some(&format!("{PASSWORD}\n")));
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{out}");
    let (code, _, err) = caregate(&["ig-password"], Some("short\n"));
    assert_eq!(code, 2);
    assert!(err.contains("at least 12 characters"), "{err}");
}
