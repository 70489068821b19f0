//! The IG officers' console in a real browser (issue 6): headless Chromium driven over WebDriver
//! (chromedriver) signs in, searches by NHS number, and finds the events a real submission made.
//! Screenshots are kept in `target/test-artefacts/` for a person to look at.
//!
//! Needs Debian's `chromium` and `chromium-driver`; `.ci/test` installs them in CI. Without them
//! the test says it is skipped — except in CI (`CI` set), where it fails.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use argon2::password_hash::{PasswordHasher as _, SaltString};
use caregate_e2e::{Gateway, Options, default_partners, patient, workspace_root};
use reqwest::StatusCode;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

fn cheap_hash(password: &str) -> String {
    let params = argon2::Params::new(256, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"caregate-browser-salt").unwrap();
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

struct Driver {
    child: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let mut ready = false;
        for _ in 0..200 {
            if let Ok(reply) = http.get(format!("{base}/status")).send().await
                && reply.status().is_success()
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ready, "chromedriver did not start");
        let profile = tempfile::tempdir().unwrap().keep();
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--window-size=1280,900", format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let reply: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = reply["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("{reply}"))
            .to_owned();
        Self {
            child,
            base,
            session,
            http,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.http.request(method.clone(), url);
        if method != reqwest::Method::GET {
            request = request.json(&body);
        }
        let reply: Value = request.send().await.unwrap().json().await.unwrap();
        assert!(reply["value"].get("error").is_none(), "{path}: {reply}");
        reply["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap()
            .to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", Value::Null)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let png = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

fn artefacts() -> PathBuf {
    workspace_root().join("target/test-artefacts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn igq_console_in_headless_chromium_signs_in_and_finds_a_patients_events() {
    if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have chromium and chromium-driver installed"
        );
        eprintln!(
            "console browser test skipped: install Debian's chromium and chromium-driver to run it"
        );
        return;
    }
    let gw = Gateway::start_configured(Options {
        partners: default_partners(),
        extra_toml: format!(
            "[[ig_officer]]\nusername = \"alice\"\npassword_hash = \"{}\"\nname = \"Alice Example\"\nods_code = \"QWO\"\n",
            cheap_hash(PASSWORD)
        ),
        ..Options::default()
    });
    let token = gw.token("gp-a81001").await;
    assert_eq!(
        gw.post("/fhir/Patient", &token, &patient("9434765919"))
            .await
            .status,
        StatusCode::CREATED
    );
    let admin = gw.admin_url.clone().expect("admin listener");

    let browser = Driver::start().await;
    browser.go(&format!("{admin}/console/login")).await;
    browser
        .screenshot(&artefacts().join("console-login.png"))
        .await;
    browser.type_into("#username", "alice").await;
    browser
        .type_into("#password", &format!("{PASSWORD}\u{E007}"))
        .await;
    // Wait for the signed-in search page.
    let mut page = String::new();
    for _ in 0..100 {
        page = browser.source().await;
        if page.contains("id=\"patient\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        page.contains("id=\"patient\""),
        "signed in to the search form: {page}"
    );
    browser.type_into("#patient", "9434765919\u{E007}").await;
    for _ in 0..100 {
        page = browser.source().await;
        if page.contains("gp-a81001") && page.contains("<table") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser
        .screenshot(&artefacts().join("console-search.png"))
        .await;
    assert!(page.contains("<table"), "a results table: {page}");
    assert!(
        page.contains("gp-a81001"),
        "the submitting partner's event is listed: {page}"
    );
    assert!(page.contains("create"), "{page}");
}
