//! Delivery isolation (issue 4, DOMAIN.md B2 F6): one partner's commit-to-receipt latency with a
//! second partner healthy (baseline) and with the second partner hanging on every request.
//!
//! Each record is routed to both partners and committed alone; the time measured is from the
//! commit returning to the healthy partner's HTTPS endpoint having the record. The scenarios are
//! interleaved in rounds on one running engine (the other partner's mode is switched between
//! phases), so load from elsewhere on the machine falls on all of them alike. Pass criterion: p50
//! and p95 with the other partner hanging stay within 2× the baseline.
//!
//! `cargo bench -p caregate-benches --bench delivery` (a custom harness: prints a table).

#![allow(clippy::print_stdout, reason = "a benchmark prints its report")]
#![allow(clippy::unwrap_used, reason = "benchmark set-up")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use caregate_audit::{Action, Actor, AuditEvent, Outcome};
use caregate_deliver::keys::idempotency_key;
use caregate_deliver::retry::{Backoff, BreakerConfig};
use caregate_deliver::{DeliveryConfig, DestinationConfig, StoredDecisionPolicy, spawn};
use caregate_store::sqlite::{SqliteOptions, SqliteStore};
use caregate_store::{RecordWrite, Store, Submission, WriteMode};
use caregate_testkit::partner_server::{Mode, PartnerServer};

/// Records per phase; each scenario gets `ROUNDS` phases.
const RECORDS: u32 = 40;
const ROUNDS: u32 = 5;
const SCENARIOS: [(&str, Mode); 3] = [
    ("baseline (other partner accepting)", Mode::Accept),
    ("other partner hanging", Mode::Hang),
    ("other partner down (connection refused)", Mode::Down),
];

fn destination(dir: &std::path::Path, partner: &str, server: &PartnerServer) -> DestinationConfig {
    let ca = dir.join(format!("{partner}.pem"));
    std::fs::write(&ca, server.ca_pem()).unwrap();
    let mut destination = DestinationConfig::push(partner, &server.base_url());
    destination.tls.ca_cert = Some(ca);
    destination.timeout = Duration::from_secs(5);
    destination
}

async fn run() -> Vec<Vec<Duration>> {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let measured = PartnerServer::start().await;
    let other = PartnerServer::start().await;
    let config = DeliveryConfig {
        poll_interval: Duration::from_millis(200),
        backoff: Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        },
        breaker: BreakerConfig {
            failures: 5,
            open_for: Duration::from_secs(2),
        },
        ..DeliveryConfig::default()
    };
    let handle = spawn(
        store.clone(),
        Arc::new(StoredDecisionPolicy::new()),
        vec![
            destination(dir.path(), "measured", &measured),
            destination(dir.path(), "other", &other),
        ],
        config,
        std::future::pending(),
    )
    .unwrap();
    let mut latencies = vec![Vec::new(); SCENARIOS.len()];
    for n in 0..RECORDS * ROUNDS * SCENARIOS.len() as u32 {
        let scenario = (n / RECORDS) as usize % SCENARIOS.len();
        if n % RECORDS == 0 {
            other.set_mode(SCENARIOS[scenario].1);
        }
        let patient = format!("94347659{:02}", n % 50);
        let content = format!(
            "{{\"resourceType\":\"Observation\",\"status\":\"final\",\"valueQuantity\":{{\"value\":{n}}}}}"
        );
        let mut hash = [0u8; 32];
        hash[..4].copy_from_slice(&n.to_be_bytes());
        let receipt = store
            .submit(Submission {
                partner: "gp".into(),
                idempotency_key: None,
                records: vec![RecordWrite {
                    resource_type: "Observation".into(),
                    id: format!("o{n}"),
                    mode: WriteMode::Create,
                    content: content.into_bytes(),
                    content_hash: hash,
                    nhs_number: Some(patient),
                    identifiers: Vec::new(),
                    decision: Some(
                        br#"{"deliver_to":[{"partner":"measured"},{"partner":"other"}]}"#.to_vec(),
                    ),
                }],
                audit: vec![AuditEvent::new(
                    format!("r{n}"),
                    Actor::default(),
                    Action::Create,
                    Outcome::Success,
                )],
            })
            .await
            .unwrap();
        let started = Instant::now();
        handle.wake();
        let key = idempotency_key(receipt.entries[0].seq, "measured");
        let arrived = measured
            .wait_until(Duration::from_secs(60), |received| {
                received
                    .iter()
                    .any(|r| r.key.as_deref() == Some(key.as_str()))
            })
            .await;
        assert!(arrived, "record {n} never arrived");
        latencies[scenario].push(started.elapsed());
    }
    handle.shutdown().await;
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for ((name, _), mut latencies) in SCENARIOS.iter().zip(runtime.block_on(run())) {
        latencies.sort();
        rows.push((
            *name,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.95),
            percentile(&latencies, 0.99),
        ));
    }
    let (_, base_p50, base_p95, _) = rows[0];
    println!(
        "delivery isolation: {} records per scenario in {ROUNDS} interleaved rounds, commit -> healthy partner receipt",
        RECORDS * ROUNDS
    );
    println!("| scenario | p50 | p95 | p99 | p50 / baseline | p95 / baseline |");
    println!("|---|---|---|---|---|---|");
    for (name, p50, p95, p99) in &rows {
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2}x | {:.2}x |",
            p50.as_secs_f64() * 1e3,
            p95.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            p50.as_secs_f64() / base_p50.as_secs_f64(),
            p95.as_secs_f64() / base_p95.as_secs_f64(),
        );
    }
}
