//! Several gateway instances on one PostgreSQL database (issue 8, "Several instances"): a
//! hermetic PostgreSQL, three `caregate serve` processes (distinct instance ids, each its own data
//! directory, the same partners, keys and policy), clients spreading submissions across them and
//! retrying on another instance when one fails, one instance SIGKILLed under load and restarted.
//! At the end every acknowledged record is in the log exactly once, every record the policy
//! allowed to the push partner arrived there (one idempotency key each), and `caregate audit
//! verify --config` verifies every instance's chain.
//!
//! Skipped (with a message) where the PostgreSQL binaries are not installed.

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "test set-up: a failure is a broken test; the skip message is printed"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use caregate_deliver::keys::idempotency_key;
use caregate_e2e::{Gateway, Options, TestPartner, binary, workspace_root};
use caregate_store::Store as _;
use caregate_store::postgres::{PostgresOptions, PostgresStore};
use caregate_testkit::keys::{KeyAlg, PartnerKey};
use caregate_testkit::partner_server::PartnerServer;
use caregate_testkit::postgres::{SKIPPED_NO_POSTGRES, shared};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

const INSTANCES: usize = 3;
const SUBMISSIONS: usize = 150;
const WORKERS: usize = 6;
/// Submissions acknowledged before one instance is killed.
const KILL_AFTER: usize = 40;
const PATIENCE: Duration = Duration::from_secs(120);
const PUSH_PARTNER: &str = "gp-a81001";
const SUBMITTER: &str = "trust-rx1";
const LOG_ID: &str = "e2e-ics/audit";

/// The same two partners (same keys) for every instance.
struct Keys {
    gp: String,
    trust: String,
}

impl Keys {
    fn new() -> Self {
        Self {
            gp: PartnerKey::generate_es384("gp-key-1").private_pem(),
            trust: PartnerKey::generate_es384("trust-key-1").private_pem(),
        }
    }

    fn partners(&self) -> Vec<TestPartner> {
        vec![
            TestPartner::new(
                PUSH_PARTNER,
                "A81001",
                "gp",
                &["system/*.cruds"],
                PartnerKey::from_private_pem("gp-key-1", KeyAlg::Es384, &self.gp).unwrap(),
            ),
            TestPartner::new(
                SUBMITTER,
                "RX1",
                "trust",
                &["system/*.cruds"],
                PartnerKey::from_private_pem("trust-key-1", KeyAlg::Es384, &self.trust).unwrap(),
            ),
        ]
    }

    fn trust_key(&self) -> PartnerKey {
        PartnerKey::from_private_pem("trust-key-1", KeyAlg::Es384, &self.trust).unwrap()
    }
}

fn instance_options(
    keys: &Keys,
    instance: usize,
    url: &str,
    audit_key_pem: &str,
    partner: &PartnerServer,
) -> Options {
    let policies = workspace_root().join("policies");
    Options {
        partners: keys.partners(),
        extra_toml: format!(
            "[policy]\ndir = \"{}\"\n\n[audit]\nlog_id = \"{LOG_ID}\"\nsigning_key = \"audit-key.pem\"\ncheckpoint_every_events = 50\ncheckpoint_every_secs = 1\n\n\
             [delivery]\npoll_interval_ms = 50\nbackoff_base_ms = 50\nbackoff_max_secs = 1\nlease_margin_secs = 1\n\n\
             [store]\nbackend = \"postgres\"\n\n[store.postgres]\nurl_file = \"db-url\"\ninstance_id = \"gw-{instance}\"\nmax_batch = 64\n",
            policies.display()
        ),
        partner_extra: vec![
            (
                PUSH_PARTNER.into(),
                format!(
                    "delivery = {{ mode = \"push\", endpoint = \"{}\", ca_cert = \"partner-ca.pem\", timeout_secs = 1 }}",
                    partner.base_url()
                ),
            ),
            // The submitter may also use the admin API (its chain verification).
            (SUBMITTER.into(), "roles = [\"ig-officer\"]".into()),
        ],
        files: vec![
            ("partner-ca.pem".into(), partner.ca_pem().to_owned()),
            ("db-url".into(), format!("{url}\n")),
            ("audit-key.pem".into(), audit_key_pem.to_owned()),
        ],
        ..Options::default()
    }
}

fn record(name: &str) -> Value {
    let path = workspace_root().join("policies/tests/records").join(name);
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    value.as_object_mut().unwrap().remove("id");
    value
}

/// Where clients reach one instance right now (it changes when the instance restarts).
#[derive(Clone)]
struct Endpoint {
    base_url: String,
    client: Client,
    generation: u64,
}

struct Cluster {
    endpoints: RwLock<Vec<Endpoint>>,
    trust_key: PartnerKey,
    /// Cached tokens per instance and generation.
    tokens: tokio::sync::Mutex<BTreeMap<(usize, u64), String>>,
    acknowledged: AtomicUsize,
}

impl Cluster {
    fn endpoint(&self, index: usize) -> Endpoint {
        self.endpoints.read().unwrap()[index].clone()
    }

    async fn token(&self, index: usize, endpoint: &Endpoint) -> Option<String> {
        if let Some(token) = self.tokens.lock().await.get(&(index, endpoint.generation)) {
            return Some(token.clone());
        }
        let token_url = format!("{}/auth/token", endpoint.base_url);
        let assertion = self.trust_key.sign_assertion(SUBMITTER, &token_url);
        let response = endpoint
            .client
            .post(&token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion.as_str()),
                ("scope", "system/*.cruds"),
            ])
            .send()
            .await
            .ok()?;
        if response.status() != StatusCode::OK {
            return None;
        }
        let body: Value = response.json().await.ok()?;
        let token = body["access_token"].as_str()?.to_owned();
        self.tokens
            .lock()
            .await
            .insert((index, endpoint.generation), token.clone());
        Some(token)
    }

    /// Submit one record until some instance acknowledges it, moving to the next instance on a
    /// connection failure or a 5xx; the same `X-Request-Id` makes a retry of a request that did
    /// commit answer with the first receipt. Returns the resource id.
    async fn submit(&self, n: usize, body: &Value) -> String {
        let request_id = format!("cluster-doc-{n}");
        let mut index = n % INSTANCES;
        for _ in 0..400 {
            let endpoint = self.endpoint(index);
            let Some(token) = self.token(index, &endpoint).await else {
                index = (index + 1) % INSTANCES;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let sent = endpoint
                .client
                .post(format!("{}/fhir/DocumentReference", endpoint.base_url))
                .bearer_auth(&token)
                .header("content-type", "application/fhir+json")
                .header("x-request-id", &request_id)
                .body(body.to_string())
                .send()
                .await;
            let response = match sent {
                Ok(response) => response,
                Err(_) => {
                    index = (index + 1) % INSTANCES;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            match status {
                StatusCode::CREATED | StatusCode::OK => {
                    self.acknowledged.fetch_add(1, Ordering::SeqCst);
                    return body["id"].as_str().unwrap().to_owned();
                }
                StatusCode::UNAUTHORIZED => {
                    self.tokens
                        .lock()
                        .await
                        .remove(&(index, endpoint.generation));
                }
                status if status.is_server_error() => {
                    index = (index + 1) % INSTANCES;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                status => panic!("submission {n}: unexpected {status}: {body}"),
            }
        }
        panic!("submission {n} was never acknowledged")
    }
}

fn endpoint_of(gateway: &Gateway, generation: u64) -> Endpoint {
    Endpoint {
        base_url: gateway.base_url.clone(),
        client: gateway.client.clone(),
        generation,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_one_sigkilled_nothing_acknowledged_lost_everything_allowed_delivered() {
    let Some(pg) = shared() else {
        println!("{SKIPPED_NO_POSTGRES}");
        return;
    };
    let url = pg.create_database().unwrap();
    let partner = PartnerServer::start().await;
    let keys = Keys::new();
    let audit_key_pem = caregate_audit::CheckpointSigner::generate(LOG_ID.to_owned())
        .unwrap()
        .to_pkcs8_pem()
        .unwrap();

    // Start the instances one after another (each start is blocking: it waits for the ready
    // line). The first applies the migrations; `caregate db migrate` is run against it below.
    let mut gateways = Vec::with_capacity(INSTANCES);
    for instance in 0..INSTANCES {
        let options = instance_options(&keys, instance, &url, &audit_key_pem, &partner);
        gateways.push(
            tokio::task::spawn_blocking(move || Gateway::start_configured(options))
                .await
                .unwrap(),
        );
    }
    let migrate = std::process::Command::new(binary())
        .args(["db", "migrate", "--config"])
        .arg(&gateways[0].config_path)
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "db migrate: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&migrate.stdout).contains("127.0.0.1"),
        "the database URL is not printed"
    );

    // The patient's registration goes to instance 0 only; the others learn the registered GP
    // from the shared log (the consent log tail), so their decisions route the discharge
    // summaries to the GP too.
    let cluster = Arc::new(Cluster {
        endpoints: RwLock::new(gateways.iter().map(|g| endpoint_of(g, 0)).collect()),
        trust_key: keys.trust_key(),
        tokens: tokio::sync::Mutex::new(BTreeMap::new()),
        acknowledged: AtomicUsize::new(0),
    });
    let trust0 = gateways[0].token(SUBMITTER).await;
    let registration = gateways[0]
        .post(
            "/fhir/Patient",
            &trust0,
            &record("patient-registration.json"),
        )
        .await;
    assert_eq!(
        registration.status,
        StatusCode::CREATED,
        "{}",
        registration.body
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Clients spread the submissions over the instances.
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let cluster = Arc::clone(&cluster);
        let next = Arc::clone(&next);
        workers.spawn(async move {
            let mut acknowledged = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= SUBMISSIONS {
                    return acknowledged;
                }
                let mut body = record("discharge-summary.json");
                body["content"][0]["attachment"]["title"] = json!(format!("Discharge summary {n}"));
                let id = cluster.submit(n, &body).await;
                acknowledged.push((n, id));
            }
        });
    }

    // Under load, SIGKILL instance 1 and restart it on the same data directory.
    while cluster.acknowledged.load(Ordering::SeqCst) < KILL_AFTER {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut victim = gateways.remove(1);
    victim.kill();
    let acknowledged_at_kill = cluster.acknowledged.load(Ordering::SeqCst);
    assert!(
        acknowledged_at_kill < SUBMISSIONS,
        "killed under load ({acknowledged_at_kill} acknowledged)"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = tokio::task::spawn_blocking(move || {
        victim.launch();
        victim
    })
    .await
    .unwrap();
    cluster.endpoints.write().unwrap()[1] = endpoint_of(&victim, 1);
    gateways.insert(1, victim);

    let mut acknowledged: BTreeMap<usize, String> = BTreeMap::new();
    while let Some(done) = workers.join_next().await {
        acknowledged.extend(done.unwrap());
    }
    assert_eq!(acknowledged.len(), SUBMISSIONS);

    // Every instance stops (gracefully) before the log and the chains are checked.
    // First wait for delivery: compute what the stored decisions allowed to the push partner.
    let reader = PostgresStore::connect(&url, PostgresOptions::new("e2e-reader"))
        .await
        .unwrap();
    let mut log = Vec::new();
    let mut after = 0;
    loop {
        let page = reader.read_log(after, 500).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        log.extend(page);
    }
    let mut documents: BTreeMap<String, usize> = BTreeMap::new();
    let mut titles = BTreeSet::new();
    let mut expected_keys = BTreeSet::new();
    for entry in &log {
        let decision: Value = entry
            .decision
            .as_deref()
            .map(|d| serde_json::from_slice(d).unwrap())
            .unwrap_or(Value::Null);
        let allowed = decision["deliver_to"]
            .as_array()
            .is_some_and(|to| to.iter().any(|d| d["partner"] == PUSH_PARTNER));
        if entry.resource_type == "DocumentReference" && entry.partner == SUBMITTER {
            *documents.entry(entry.id.clone()).or_default() += 1;
            let content: Value = serde_json::from_slice(&entry.content).unwrap();
            assert!(
                titles.insert(
                    content["content"][0]["attachment"]["title"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                ),
                "one submission, one log entry"
            );
            assert!(
                allowed,
                "every discharge summary is routed to the registered GP, whichever instance decided it (seq {})",
                entry.seq
            );
        }
        if allowed {
            expected_keys.insert(idempotency_key(entry.seq, PUSH_PARTNER));
        }
    }
    assert_eq!(
        documents.len(),
        SUBMISSIONS,
        "no extra records from retries"
    );
    for (n, id) in &acknowledged {
        assert_eq!(
            documents.get(id),
            Some(&1),
            "acknowledged submission {n} is in the log exactly once"
        );
    }
    reader.close().await.unwrap();

    let delivered = partner
        .wait_until(PATIENCE, |received| {
            received
                .iter()
                .filter(|r| r.accepted())
                .filter_map(|r| r.key.clone())
                .collect::<BTreeSet<_>>()
                .is_superset(&expected_keys)
        })
        .await;
    let received: BTreeSet<String> = partner.accepted_keys().into_iter().collect();
    assert!(
        delivered,
        "every allowed record arrived: {} of {}",
        received.intersection(&expected_keys).count(),
        expected_keys.len()
    );
    assert_eq!(
        received, expected_keys,
        "nothing else arrived (repeats carry the same key)"
    );

    // Each instance's admin API verifies its own chain in the database.
    for gateway in &gateways {
        let token = gateway.token(SUBMITTER).await;
        let admin = gateway.admin_url.clone().unwrap();
        let response = gateway
            .client
            .get(format!("{admin}/admin/audit/verify"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["result"], "VERIFIED", "{body}");
    }
    for gateway in &mut gateways {
        assert!(gateway.terminate().await, "a clean shutdown");
    }
    let verify = std::process::Command::new(binary())
        .args(["audit", "verify", "--config"])
        .arg(&gateways[0].config_path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "audit verify: {report}\n{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    for instance in 0..INSTANCES {
        assert!(
            report.contains(&format!("instance:     gw-{instance}")),
            "{report}"
        );
    }
    assert!(report.contains("result:       VERIFIED"), "{report}");
    println!(
        "cluster: {SUBMISSIONS} acknowledged ({acknowledged_at_kill} before the SIGKILL), {} log entries, {} delivered to {PUSH_PARTNER}\n{report}",
        log.len(),
        expected_keys.len()
    );
}
