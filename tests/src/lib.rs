//! Harness for end-to-end tests: start the real `caregate` binary on a random port with TLS and a
//! generated config, talk to it as partners do (SMART token, then FHIR over HTTPS), kill it,
//! restart it, and look at its data directory.
//!
//! The binary is built once per test process with the same cargo that runs the tests (or taken
//! from `CAREGATE_BIN` if set).

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use caregate_testkit::keys::PartnerKey;
use reqwest::header::HeaderMap;
use reqwest::{Client, StatusCode};
use serde_json::Value;
use tempfile::TempDir;

/// The workspace root (this package lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Path to the `caregate` binary, building it on first use.
pub fn binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Ok(path) = std::env::var("CAREGATE_BIN") {
                return PathBuf::from(path);
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--quiet", "-p", "caregate", "--bin", "caregate"])
                .current_dir(workspace_root())
                .status()
                .expect("cargo can be run to build the caregate binary");
            assert!(status.success(), "building the caregate binary failed");
            let target = std::env::var("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| workspace_root().join("target"));
            target.join("debug").join("caregate")
        })
        .clone()
}

/// A partner registered in the generated config, with its private key.
#[derive(Debug)]
pub struct TestPartner {
    pub id: String,
    pub ods_code: String,
    pub kind: String,
    pub scopes: Vec<String>,
    pub key: PartnerKey,
}

impl TestPartner {
    pub fn new(id: &str, ods_code: &str, kind: &str, scopes: &[&str], key: PartnerKey) -> Self {
        Self {
            id: id.into(),
            ods_code: ods_code.into(),
            kind: kind.into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            key,
        }
    }
}

/// The default partners: a GP practice (ES384), an acute trust (RS384), a pharmacy (ES256) with
/// only medication scopes.
pub fn default_partners() -> Vec<TestPartner> {
    vec![
        TestPartner::new(
            "gp-a81001",
            "A81001",
            "gp",
            &["system/*.cruds"],
            PartnerKey::generate_es384("gp-key-1"),
        ),
        TestPartner::new(
            "trust-rx1",
            "RX1",
            "trust",
            &["system/*.cruds"],
            PartnerKey::generate_rs384("trust-key-1"),
        ),
        TestPartner::new(
            "pharmacy-fa123",
            "FA123",
            "pharmacy",
            &[
                "system/MedicationDispense.cru",
                "system/MedicationRequest.r",
            ],
            PartnerKey::generate_es256("pharmacy-key-1"),
        ),
    ]
}

/// A running gateway process.
#[derive(Debug)]
pub struct Gateway {
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub partners: Vec<TestPartner>,
    pub base_url: String,
    pub client: Client,
    /// The CA certificate clients trust when the config names its own TLS certificate.
    pub trust_pem: Option<Vec<u8>>,
    /// The IG officers' admin listener, when enabled.
    pub admin_url: Option<String>,
    child: Option<Child>,
}

/// Everything a test can vary about the generated configuration.
#[derive(Debug, Default)]
pub struct Options {
    pub partners: Vec<TestPartner>,
    /// Lines for the `[limits]` section.
    pub limits_toml: String,
    /// Whole extra sections (e.g. `[tls]`), with paths relative to the config's directory.
    pub extra_toml: String,
    /// `(partner id, TOML line)` added to that partner's table.
    pub partner_extra: Vec<(String, String)>,
    /// Files written beside the config (certificates, keys).
    pub files: Vec<(String, String)>,
    /// The CA to trust instead of the dev certificate.
    pub trust_pem: Option<Vec<u8>>,
    /// The whole `[admin]` section; `None`: the admin listener on a free port.
    pub admin_toml: Option<String>,
}

impl Gateway {
    /// Start a gateway with the default partners.
    pub fn start() -> Self {
        Self::start_with(default_partners(), "")
    }

    /// Start a gateway with these partners and extra TOML appended to the `[limits]` section.
    pub fn start_with(partners: Vec<TestPartner>, limits_toml: &str) -> Self {
        Self::start_configured(Options {
            partners,
            limits_toml: limits_toml.into(),
            ..Options::default()
        })
    }

    /// Start a gateway from full options.
    pub fn start_configured(options: Options) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let admin = options
            .admin_toml
            .clone()
            .unwrap_or_else(|| "[admin]\nlisten = \"127.0.0.1:0\"".to_owned());
        let mut toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\nshutdown_grace_secs = 10\n\n[limits]\n{}\n\n{admin}\n\n{}\n\n",
            options.limits_toml, options.extra_toml
        );
        for partner in &options.partners {
            let jwks_path = dir.path().join(format!("{}.jwks.json", partner.id));
            std::fs::write(&jwks_path, PartnerKey::jwks(&[&partner.key]).to_string())
                .expect("write jwks");
            let scopes: Vec<String> = partner.scopes.iter().map(|s| format!("\"{s}\"")).collect();
            let extra = options
                .partner_extra
                .iter()
                .filter(|(id, _)| *id == partner.id)
                .map(|(_, line)| format!("{line}\n"))
                .collect::<String>();
            toml.push_str(&format!(
                "[[partner]]\nid = \"{}\"\nname = \"{}\"\nods_code = \"{}\"\nkind = \"{}\"\nscopes = [{}]\njwks_file = \"{}.jwks.json\"\n{extra}\n",
                partner.id,
                partner.id,
                partner.ods_code,
                partner.kind,
                scopes.join(", "),
                partner.id
            ));
        }
        for (name, contents) in &options.files {
            std::fs::write(dir.path().join(name), contents).expect("write file");
        }
        let config_path = dir.path().join("caregate.toml");
        std::fs::write(&config_path, toml).expect("write config");
        let mut gateway = Self {
            dir,
            config_path,
            partners: options.partners,
            base_url: String::new(),
            client: Client::new(),
            trust_pem: options.trust_pem,
            admin_url: None,
            child: None,
        };
        gateway.launch();
        gateway
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Start the process (again) on the same config and data directory.
    pub fn launch(&mut self) {
        let mut child = Command::new(binary())
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("CAREGATE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn caregate");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut base_url = None;
        let mut admin_url = None;
        let mut cert = None;
        for line in lines.by_ref() {
            let line = line.expect("read stdout");
            if let Some(path) = line.strip_prefix("dev certificate (trust it in clients): ") {
                cert = Some(PathBuf::from(path));
            }
            if let Some(url) = line.strip_prefix("caregate admin listening on ") {
                admin_url = Some(url.to_owned());
            }
            if let Some(url) = line.strip_prefix("caregate listening on ") {
                base_url = Some(url.to_owned());
                break;
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let base_url = base_url.expect("the gateway printed its address");
        let trust = match (&self.trust_pem, cert) {
            (Some(pem), _) => pem.clone(),
            (None, Some(path)) => std::fs::read(path).expect("read dev certificate"),
            (None, None) => panic!(
                "no certificate to trust: the gateway is not in dev mode and no trust_pem was given"
            ),
        };
        self.client = client_trusting(&trust);
        self.base_url = base_url;
        self.admin_url = admin_url;
        self.child = Some(child);
    }

    /// The gateway process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL the process and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM the process and wait (asynchronously, so this test's own client connections keep
    /// being served while the gateway drains them) for it to exit; true if it exited with 0.
    pub async fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..600 {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    pub fn partner(&self, id: &str) -> &TestPartner {
        self.partners
            .iter()
            .find(|p| p.id == id)
            .expect("known partner")
    }

    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.base_url)
    }

    /// POST a form to the token endpoint.
    pub async fn token_request(&self, form: &[(&str, &str)]) -> (StatusCode, Value) {
        let response = self
            .client
            .post(self.token_url())
            .form(form)
            .send()
            .await
            .expect("token request");
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// A token request with this assertion and scope.
    pub async fn exchange(&self, assertion: &str, scope: &str) -> (StatusCode, Value) {
        self.token_request(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("scope", scope),
        ])
        .await
    }

    /// Get an access token for a partner with all its scopes.
    pub async fn token(&self, partner_id: &str) -> String {
        let partner = self.partner(partner_id);
        let assertion = partner.key.sign_assertion(&partner.id, &self.token_url());
        let (status, body) = self.exchange(&assertion, &partner.scopes.join(" ")).await;
        assert_eq!(status, StatusCode::OK, "token for {partner_id}: {body}");
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    /// Send a request with a bearer token and a FHIR JSON body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base_url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/fhir+json")
                .body(body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("request sent");
        Reply::from(response).await
    }

    /// POST a JSON value.
    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Reply {
        self.send(
            reqwest::Method::POST,
            path,
            Some(token),
            Some(body.to_string().into_bytes()),
            &[],
        )
        .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    async fn from(response: reqwest::Response) -> Self {
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Self {
            status,
            headers,
            body,
        }
    }

    /// The first issue's code of an OperationOutcome body.
    pub fn issue_code(&self) -> &str {
        self.body["issue"][0]["code"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// A client that trusts exactly this PEM certificate (and speaks HTTP/1.1 and HTTP/2).
pub fn client_trusting(cert_pem: &[u8]) -> Client {
    let cert = reqwest::Certificate::from_pem(cert_pem).expect("PEM certificate");
    Client::builder()
        .tls_certs_only([cert])
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A valid Patient with a test-range NHS number.
pub fn patient(nhs_number: &str) -> Value {
    serde_json::json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs_number }],
        "name": [{ "family": "Smith", "given": ["Jane"] }],
        "gender": "female",
        "birthDate": "1970-01-01"
    })
}

/// A valid Observation (blood pressure style) about a patient by NHS number.
pub fn observation(nhs_number: &str, value: f64) -> Value {
    serde_json::json!({
        "resourceType": "Observation",
        "status": "final",
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "271649006", "display": "Systolic blood pressure" }] },
        "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs_number } },
        "effectiveDateTime": "2026-11-20T09:30:00Z",
        "valueQuantity": { "value": value, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]" }
    })
}

/// Commit `count` Observations from `gp-a81001` straight into a stopped gateway's store (`data`),
/// alternating two patients, each with a stored decision routing it to `to` — what delivery
/// reads when no `[policy]` is configured. Returns their log positions.
pub async fn commit_routed_observations(
    data: &std::path::Path,
    count: u32,
    to: &[&str],
) -> Vec<caregate_store::Seq> {
    use caregate_audit::{Action, Actor, AuditEvent, Outcome};
    use caregate_store::sqlite::{SqliteOptions, SqliteStore};
    use caregate_store::{RecordWrite, Store as _, Submission, WriteMode};
    let store = SqliteStore::open(data, SqliteOptions::default()).expect("the store opens");
    let mut seqs = Vec::new();
    for n in 0..count {
        let patient = ["9434765919", "9434765870"][n as usize % 2];
        let content = serde_json::json!({
            "resourceType": "Observation", "status": "final",
            "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": patient } },
            "valueQuantity": { "value": n }
        });
        let decision = serde_json::json!({
            "deliver_to": to.iter().map(|p| serde_json::json!({ "partner": p })).collect::<Vec<_>>()
        });
        let mut hash = [0u8; 32];
        hash[..4].copy_from_slice(&n.to_be_bytes());
        let receipt = store
            .submit(Submission {
                partner: "gp-a81001".into(),
                idempotency_key: None,
                records: vec![RecordWrite {
                    resource_type: "Observation".into(),
                    id: format!("obs-{n}"),
                    mode: WriteMode::Create,
                    content: content.to_string().into_bytes(),
                    content_hash: hash,
                    nhs_number: Some(patient.into()),
                    identifiers: Vec::new(),
                    decision: Some(decision.to_string().into_bytes()),
                }],
                audit: vec![AuditEvent::new(
                    format!("seed-{n}"),
                    Actor::default(),
                    Action::Create,
                    Outcome::Success,
                )],
            })
            .await
            .expect("the seed records commit");
        seqs.push(receipt.entries[0].seq);
    }
    store.close().await.expect("the store closes");
    seqs
}
