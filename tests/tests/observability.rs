//! Observability end to end (issue 8): the probes and the Prometheus endpoint on the admin
//! listener, and OTLP export of the request and stage spans to a collector — a tiny HTTP server
//! this test runs — with the gateway serving on unharmed when the collector is down or hangs.
//! No patient identifier may appear in the metrics or in the exported spans.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a broken test set-up"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use caregate_e2e::{Gateway, Options, patient, workspace_root};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

const NHS: &str = "9434765919";
const OTHER_NHS: &str = "9434765870";

async fn admin_get(gw: &Gateway, path: &str) -> (StatusCode, String) {
    let url = format!("{}{path}", gw.admin_url.as_deref().unwrap());
    let response = gw.client.get(url).send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

/// Wait (bounded) until `check` holds.
async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn probes_answer_and_metrics_count_requests_without_identifiers() {
    let gw = Gateway::start_configured(Options {
        partners: caregate_e2e::default_partners(),
        extra_toml: policy_toml(),
        ..Options::default()
    });
    let (status, body) = admin_get(&gw, "/livez").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = admin_get(&gw, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"ready\""), "{body}");

    let token = gw.token("gp-a81001").await;
    let reply = gw.post("/fhir/Patient", &token, &patient(NHS)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    let rejected = gw
        .post(
            "/fhir/Patient",
            &token,
            &serde_json::json!({"resourceType": "Patient", "identifier": 1}),
        )
        .await;
    assert_eq!(rejected.status, StatusCode::BAD_REQUEST);

    let (status, text) = admin_get(&gw, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for expected in [
        "caregate_http_requests_total{method=\"POST\",route=\"/fhir/{resource_type}\",status_class=\"2xx\"} 1",
        "caregate_http_requests_total{method=\"POST\",route=\"/fhir/{resource_type}\",status_class=\"4xx\"} 1",
        "caregate_http_request_duration_seconds_count{route=\"/fhir/{resource_type}\",status_class=\"2xx\"} 1",
        "caregate_stage_duration_seconds_count{stage=\"auth\"}",
        "caregate_stage_duration_seconds_count{stage=\"validate\"} 2",
        "caregate_stage_duration_seconds_count{stage=\"commit\"}",
        "caregate_stage_duration_seconds_count{stage=\"decide\"} 1",
        "caregate_policy_decisions_total{rule=",
        "caregate_store_commits_total",
        "caregate_store_failed 0",
    ] {
        assert!(text.contains(expected), "missing {expected}:\n{text}");
    }
    assert!(!text.contains(NHS), "an NHS number in /metrics:\n{text}");

    // The probes and the scrape need no credentials; the audit API beside them still does.
    let (status, _) = admin_get(&gw, "/admin/audit/events").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// A minimal OTLP/HTTP collector: answers 200 to every POST and keeps the bodies per path.
#[derive(Default)]
struct Collector {
    traces: AtomicUsize,
    metrics: AtomicUsize,
    bodies: Mutex<Vec<Vec<u8>>>,
    /// Set: drop every connection, kept-alive ones included (the collector is "down").
    down: std::sync::atomic::AtomicBool,
}

async fn serve_collector(listener: TcpListener, collector: Arc<Collector>) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let collector = collector.clone();
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 16 * 1024];
            loop {
                // One request per connection is enough for this collector; keep-alive requests
                // are handled by looping over complete requests in the buffer.
                let head_end = loop {
                    if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buffer.len() < head_end + length {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                    }
                }
                if collector.down.load(Ordering::SeqCst) {
                    return;
                }
                let body = buffer[head_end..head_end + length].to_vec();
                if head.starts_with("post /v1/traces") {
                    collector.traces.fetch_add(1, Ordering::SeqCst);
                    collector.bodies.lock().await.push(body);
                } else if head.starts_with("post /v1/metrics") {
                    collector.metrics.fetch_add(1, Ordering::SeqCst);
                }
                buffer.drain(..head_end + length);
                let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                if socket.write_all(answer).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The shipped policy bundle, so that the decide stage runs.
fn policy_toml() -> String {
    format!(
        "[policy]\ndir = \"{}\"\n",
        workspace_root().join("policies").display()
    )
}

fn with_telemetry(endpoint: &str) -> Options {
    Options {
        extra_toml: format!(
            "{}\n[telemetry]\nenabled = true\nendpoint = \"{endpoint}\"\nservice_name = \"caregate-e2e\"\nmetrics_interval_secs = 1\nexport_timeout_secs = 2\n",
            policy_toml()
        ),
        partners: caregate_e2e::default_partners(),
        ..Options::default()
    }
}

#[tokio::test]
async fn stage_spans_reach_the_otlp_collector_and_requests_go_on_when_it_is_down() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let collector = Arc::new(Collector::default());
    let server = tokio::spawn(serve_collector(listener, collector.clone()));
    let gw = Gateway::start_configured(with_telemetry(&format!("http://{address}")));

    let token = gw.token("gp-a81001").await;
    let reply = gw.post("/fhir/Patient", &token, &patient(NHS)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);

    let stages: [&[u8]; 4] = [
        b"auth",
        b"validate",
        b"commit",
        b"POST /fhir/{resource_type}",
    ];
    wait_for("the request's spans at the collector", async || {
        let bodies = collector.bodies.lock().await;
        stages
            .iter()
            .all(|stage| bodies.iter().any(|b| contains(b, stage)))
    })
    .await;
    wait_for("metrics at the collector", async || {
        collector.metrics.load(Ordering::SeqCst) > 0
    })
    .await;
    {
        let bodies = collector.bodies.lock().await;
        assert!(
            bodies.iter().any(|b| contains(b, b"caregate-e2e")),
            "service.name is the configured one"
        );
        assert!(
            !bodies.iter().any(|b| contains(b, NHS.as_bytes())),
            "an NHS number in an exported span"
        );
    }

    // The collector goes away: requests are answered as before, promptly.
    collector.down.store(true, Ordering::SeqCst);
    server.abort();
    let _ = server.await;
    for _ in 0..5 {
        let started = Instant::now();
        let reply = gw.post("/fhir/Patient", &token, &patient(OTHER_NHS)).await;
        assert!(reply.status.is_success(), "{:?}", reply.body);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    let (status, _) = admin_get(&gw, "/readyz").await;
    assert_eq!(status, StatusCode::OK);
    wait_for("the failed export to be counted", async || {
        admin_get(&gw, "/metrics")
            .await
            .1
            .contains("caregate_telemetry_export_failures_total{signal=\"traces\"}")
            && admin_get(&gw, "/metrics")
                .await
                .1
                .contains("caregate_telemetry_export_failures_total{signal=\"metrics\"}")
    })
    .await;
}

#[tokio::test]
async fn a_collector_that_never_answers_does_not_slow_requests() {
    // Accepts connections and reads nothing: every export hangs until its timeout.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let holder = held.clone();
    let server = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            holder.lock().await.push(socket);
        }
    });
    let gw = Gateway::start_configured(with_telemetry(&format!("http://{address}")));
    let token = gw.token("gp-a81001").await;
    let started = Instant::now();
    for _ in 0..20 {
        let reply = gw.post("/fhir/Patient", &token, &patient(NHS)).await;
        assert!(reply.status.is_success(), "{:?}", reply.body);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "20 creates took {:?} with a hanging collector",
        started.elapsed()
    );
    let (status, _) = admin_get(&gw, "/livez").await;
    assert_eq!(status, StatusCode::OK);
    // A graceful stop still ends promptly: the final flush is bounded by the export timeout.
    let mut gw = gw;
    let stopping = Instant::now();
    assert!(gw.terminate().await, "clean exit");
    assert!(
        stopping.elapsed() < Duration::from_secs(20),
        "SIGTERM took {:?} with a hanging collector",
        stopping.elapsed()
    );
    server.abort();
}

#[tokio::test]
async fn json_logs_carry_trace_ids_and_no_nhs_number_at_debug() {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Command, Stdio};
    let mut gw = Gateway::start_configured(Options {
        partners: caregate_e2e::default_partners(),
        extra_toml: format!("{}\n[telemetry]\nlog_format = \"json\"\n", policy_toml()),
        ..Options::default()
    });
    assert!(gw.terminate().await);
    // The same config and data again, logging everything at debug into a file.
    let log = gw.dir.path().join("debug.log");
    let mut child = Command::new(caregate_e2e::binary())
        .args(["serve", "--config"])
        .arg(&gw.config_path)
        .env("CAREGATE_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base_url = lines
        .by_ref()
        .map(Result::unwrap)
        .find_map(|line| {
            line.strip_prefix("caregate listening on ")
                .map(str::to_owned)
        })
        .unwrap();
    std::thread::spawn(move || for _ in lines {});
    let pem = std::fs::read(gw.data_dir().join("dev-certificate.pem")).unwrap();
    let client = caregate_e2e::client_trusting(&pem);
    let partner = gw.partner("gp-a81001");
    let token_url = format!("{base_url}/auth/token");
    let assertion = partner.key.sign_assertion(&partner.id, &token_url);
    let token: serde_json::Value = client
        .post(&token_url)
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
            ("scope", partner.scopes.join(" ").as_str()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let response = client
        .post(format!("{base_url}/fhir/Patient"))
        .bearer_auth(token["access_token"].as_str().unwrap())
        .header("content-type", "application/fhir+json")
        .body(patient(NHS).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let _ = child.kill();
    let _ = child.wait();

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(NHS), "an NHS number in the debug log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let traced = lines
        .iter()
        .find(|line| line["span"].is_string() && line["trace_id"].is_string())
        .unwrap_or_else(|| panic!("no log line inside a traced span:\n{text}"));
    assert_eq!(traced["trace_id"].as_str().unwrap().len(), 32, "{traced}");
    assert_eq!(traced["span_id"].as_str().unwrap().len(), 16, "{traced}");
    gw.kill();
}

/// Commit one Observation routed to `to` straight into a stopped gateway's store (as
/// `tests/delivery.rs` does), so that the push worker has something to deliver.
async fn commit_routed_record(data: &std::path::Path, to: &str) {
    use caregate_store::Store as _;
    let store = caregate_store::sqlite::SqliteStore::open(
        data,
        caregate_store::sqlite::SqliteOptions::default(),
    )
    .unwrap();
    let content = serde_json::json!({
        "resourceType": "Observation", "status": "final",
        "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": NHS } },
        "valueQuantity": { "value": 1 }
    });
    let decision = serde_json::json!({ "deliver_to": [{ "partner": to }] });
    store
        .submit(caregate_store::Submission {
            partner: "gp-a81001".into(),
            idempotency_key: None,
            records: vec![caregate_store::RecordWrite {
                resource_type: "Observation".into(),
                id: "obs-1".into(),
                mode: caregate_store::WriteMode::Create,
                content: content.to_string().into_bytes(),
                content_hash: [7u8; 32],
                nhs_number: Some(NHS.into()),
                identifiers: Vec::new(),
                decision: Some(decision.to_string().into_bytes()),
            }],
            audit: vec![caregate_audit::AuditEvent::new(
                "obs-1",
                caregate_audit::Actor::default(),
                caregate_audit::Action::Create,
                caregate_audit::Outcome::Success,
            )],
        })
        .await
        .unwrap();
    store.close().await.unwrap();
}

#[tokio::test]
async fn push_attempts_are_deliver_spans_and_queue_metrics_per_partner() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let collector = Arc::new(Collector::default());
    let server = tokio::spawn(serve_collector(listener, collector.clone()));
    let partner = caregate_testkit::partner_server::PartnerServer::start().await;
    let mut gw = Gateway::start_configured(Options {
        partners: caregate_e2e::default_partners(),
        partner_extra: vec![(
            "trust-rx1".into(),
            format!(
                "delivery = {{ mode = \"push\", endpoint = \"{}\", ca_cert = \"partner-ca.pem\", timeout_secs = 1 }}",
                partner.base_url()
            ),
        )],
        files: vec![("partner-ca.pem".into(), partner.ca_pem().to_owned())],
        extra_toml: format!(
            "[telemetry]\nenabled = true\nendpoint = \"http://{address}\"\nsample_interval_secs = 1\nexport_timeout_secs = 2\n"
        ),
        ..Options::default()
    });
    gw.kill();
    commit_routed_record(&gw.data_dir(), "trust-rx1").await;
    gw.launch();
    assert!(
        partner
            .wait_until(Duration::from_secs(60), |received| !received.is_empty())
            .await,
        "the record was pushed"
    );
    wait_for("the deliver span at the collector", async || {
        let bodies = collector.bodies.lock().await;
        bodies
            .iter()
            .any(|b| contains(b, b"deliver") && contains(b, b"trust-rx1"))
    })
    .await;
    assert!(
        !collector
            .bodies
            .lock()
            .await
            .iter()
            .any(|b| contains(b, NHS.as_bytes()) || contains(b, b"obs-1")),
        "a patient identifier or record id in an exported span"
    );
    wait_for(
        "deliver latency and the sampled queue in /metrics",
        async || {
            let text = admin_get(&gw, "/metrics").await.1;
            text.contains("caregate_stage_duration_seconds_count{stage=\"deliver\"}")
                && text.contains("caregate_delivery_queue_depth{partner=\"trust-rx1\"}")
        },
    )
    .await;
    server.abort();
}

const FEED: &str = "icb-qe1-population-health";

/// Two patients' records in the feed, committed into a stopped gateway's store.
async fn seed_feed(data: &std::path::Path) {
    use caregate_store::Store as _;
    let store = caregate_store::sqlite::SqliteStore::open(
        data,
        caregate_store::sqlite::SqliteOptions::default(),
    )
    .unwrap();
    let decision = serde_json::json!({ "feeds": [{ "feed": FEED, "recipient": "icb-qe1", "agreement": "dsa-icb-population-health", "included": true, "rule_ids": [], "reasons": [] }] });
    let records = [NHS, OTHER_NHS]
        .iter()
        .enumerate()
        .map(|(i, nhs)| {
            let content = serde_json::json!({ "resourceType": "Patient", "id": format!("p{i}"), "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs }], "gender": "female", "birthDate": "1970-04-01" }).to_string().into_bytes();
            caregate_store::RecordWrite {
                resource_type: "Patient".into(),
                id: format!("p{i}"),
                mode: caregate_store::WriteMode::Create,
                content_hash: [u8::try_from(i).unwrap(); 32],
                content,
                nhs_number: Some((*nhs).into()),
                identifiers: Vec::new(),
                decision: Some(decision.to_string().into_bytes()),
            }
        })
        .collect();
    store
        .submit(caregate_store::Submission {
            partner: "gp-a81001".into(),
            idempotency_key: None,
            records,
            audit: Vec::new(),
        })
        .await
        .unwrap();
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_bulk_export_is_a_feed_span_and_counted_per_feed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let collector = Arc::new(Collector::default());
    let server = tokio::spawn(serve_collector(listener, collector.clone()));
    let mut partners = caregate_e2e::default_partners();
    partners.push(caregate_e2e::TestPartner::new(
        "icb-qe1",
        "QE1",
        "icb",
        &["system/*.rs"],
        caregate_testkit::keys::PartnerKey::generate_es256("icb-qe1-1"),
    ));
    // The shipped definition with k = 2 (a two-patient population; the shipped k is 8).
    let definitions = workspace_root().join("policies/feeds");
    let mut gw = Gateway::start_configured(Options {
        partners,
        extra_toml: format!(
            "[feeds]\ndefinitions = \"{}\"\nkey_file = \"feed-keys.toml\"\n\n[telemetry]\nenabled = true\nendpoint = \"http://{address}\"\nexport_timeout_secs = 2\n",
            definitions.display()
        ),
        ..Options::default()
    });
    assert!(gw.terminate().await);
    let feeds = gw.dir.path().join("feeds");
    std::fs::create_dir(&feeds).unwrap();
    let shipped = std::fs::read_to_string(definitions.join(format!("{FEED}.toml"))).unwrap();
    std::fs::write(
        feeds.join(format!("{FEED}.toml")),
        shipped.replace("\nk = 8\n", "\nk = 2\n"),
    )
    .unwrap();
    let config = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(
        &gw.config_path,
        config.replace(&definitions.display().to_string(), "feeds"),
    )
    .unwrap();
    seed_feed(&gw.data_dir()).await;
    let status = std::process::Command::new(caregate_e2e::binary())
        .args(["keys", "new", FEED, "--key-file"])
        .arg(gw.dir.path().join("feed-keys.toml"))
        .status()
        .unwrap();
    assert!(status.success());
    gw.launch();

    let token = gw.token("icb-qe1").await;
    let kick_off = gw
        .client
        .get(format!(
            "{}/fhir/Group/{FEED}/$export?_type=Patient",
            gw.base_url
        ))
        .bearer_auth(&token)
        .header("Prefer", "respond-async")
        .header("Accept", "application/fhir+json")
        .send()
        .await
        .unwrap();
    assert_eq!(kick_off.status(), 202);
    wait_for("the export to be counted", async || {
        admin_get(&gw, "/metrics").await.1.contains(&format!(
            "caregate_feed_exports_total{{feed=\"{FEED}\",outcome=\"ok\"}} 1"
        ))
    })
    .await;
    let text = admin_get(&gw, "/metrics").await.1;
    assert!(
        text.contains("caregate_stage_duration_seconds_count{stage=\"feed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("caregate_feed_last_export_timestamp_seconds{feed="),
        "{text}"
    );
    wait_for("the feed span at the collector", async || {
        let bodies = collector.bodies.lock().await;
        bodies
            .iter()
            .any(|b| contains(b, b"feed") && contains(b, FEED.as_bytes()))
    })
    .await;
    assert!(
        !collector
            .bodies
            .lock()
            .await
            .iter()
            .any(|b| contains(b, NHS.as_bytes()) || contains(b, OTHER_NHS.as_bytes())),
        "an NHS number in an exported span"
    );
    server.abort();
}
