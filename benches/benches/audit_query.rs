//! The IG officer's patient query at scale (issue 6, DOMAIN.md `IGQ`): one patient's events over
//! twelve months, from an audit log of 10 million events. Target: p95 ≤ 100 ms.
//!
//! Set-up builds `audit_events` directly in one transaction (the store's schema, created by
//! `SqliteStore::open`, then a bulk insert of canonical event JSON with every query column filled
//! as the store fills them; leaf hashes are placeholders, so the store itself would refuse to open
//! it — the benchmark reads it through `AuditReader`, the same query code the gateway runs). Events
//! are spread evenly over 2025; 90 % name one of `events / 100` patients (≈ 90 events each, picked
//! by a fixed LCG), 1 % are break-glass. The database is kept between runs under
//! `$CAREGATE_BENCH_DATA_DIR` (else cargo's `target/tmp`), keyed by its size.
//!
//! `CAREGATE_BENCH_AUDIT_EVENTS` overrides the size (default 10,000,000). Besides criterion's
//! estimate, the bench prints p50/p95/p99 over 2,000 queries for random patients.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use caregate_audit::event_hash::canonical_event_bytes;
use caregate_audit::{Action, Actor, AuditEvent, Entity, Outcome};
use caregate_store::AuditQuery;
use caregate_store::sqlite::{AuditReader, DATABASE_FILE, SqliteOptions, SqliteStore};
use criterion::{Criterion, criterion_group, criterion_main};
use time::macros::datetime;

const DEFAULT_EVENTS: u64 = 10_000_000;

fn events_wanted() -> u64 {
    std::env::var("CAREGATE_BENCH_AUDIT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_EVENTS)
}

fn data_dir(events: u64) -> PathBuf {
    std::env::var_os("CAREGATE_BENCH_DATA_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from)
        .join(format!("audit-query-{events}"))
}

/// A fixed 64-bit LCG (Knuth MMIX), so every run builds the same log.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

/// A test-range NHS number (starting 9) for patient `n`, with a valid Modulus 11 check digit.
fn nhs_number(n: u64) -> String {
    let mut base = 900_000_000 + n;
    loop {
        let digits: Vec<u64> = base
            .to_string()
            .bytes()
            .map(|b| u64::from(b - b'0'))
            .collect();
        let sum: u64 = digits.iter().zip((2..=10).rev()).map(|(d, w)| d * w).sum();
        let check = (11 - sum % 11) % 11;
        if check != 10 {
            return format!("{base}{check}");
        }
        base += 1_000_000;
    }
}

const PARTNERS: [(&str, &str); 4] = [
    ("gp-a81001", "A81001"),
    ("trust-rx1", "RX1"),
    ("pharmacy-fa123", "FA123"),
    ("council-00k", "00K"),
];

fn build(dir: &Path, events: u64) {
    let marker = dir.join("complete");
    if marker.exists() {
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = SqliteStore::open(dir, SqliteOptions::default()).expect("schema");
    runtime.block_on(store.close()).expect("close");

    let started = Instant::now();
    let mut conn = rusqlite::Connection::open(dir.join(DATABASE_FILE)).expect("open");
    conn.pragma_update(None, "synchronous", "OFF")
        .expect("pragma");
    conn.pragma_update(None, "cache_size", -512_000)
        .expect("pragma");
    let patients = (events / 100).max(1);
    let year_us: u64 = 365 * 24 * 3600 * 1_000_000;
    let start = datetime!(2025-01-01 00:00 UTC);
    let mut rng = Lcg(6);
    let tx = conn.transaction().expect("transaction");
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO audit_events (seq, recorded, request_id, partner_id, action, outcome, \
                 resource_type, resource_id, patient, event, leaf_hash) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .expect("prepare");
        let leaf = [0u8; 32];
        for seq in 1..=events {
            let offset = year_us * (seq - 1) / events;
            let recorded =
                start + time::Duration::microseconds(i64::try_from(offset).expect("fits"));
            let (partner, ods) = PARTNERS[(rng.next() % 4) as usize];
            let roll = rng.next() % 100;
            let patient = (roll < 90).then(|| nhs_number(rng.next() % patients));
            let action = match roll {
                0..=59 => Action::Read,
                60..=89 => Action::Create,
                _ => Action::TokenRequest,
            };
            let mut event = AuditEvent::new(
                format!("req-{seq}"),
                Actor {
                    partner_id: Some(partner.into()),
                    ods_code: Some(ods.into()),
                    client_id: Some(partner.into()),
                    remote_addr: Some("10.0.0.1".into()),
                },
                action,
                Outcome::Success,
            );
            event.recorded = recorded;
            event.status = Some(200);
            event.patient = patient.clone();
            if patient.is_some() {
                event.entity = Some(Entity {
                    resource_type: "Observation".into(),
                    id: format!("o{seq}"),
                    version_id: Some(1),
                    content_hash: None,
                });
                event.purpose_of_use = Some(if roll == 0 { "ETREAT" } else { "TREAT" }.into());
                event.policy_version = Some("2025-01".into());
                event.rule_ids = vec!["NDOO-2".into()];
            }
            let json = String::from_utf8(canonical_event_bytes(&event).expect("canonical"))
                .expect("utf-8");
            let recorded_text = recorded
                .format(time::macros::format_description!(
                    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
                ))
                .expect("timestamp");
            let action_name = match action {
                Action::Read => "read",
                Action::Create => "create",
                _ => "token-request",
            };
            insert
                .execute(rusqlite::params![
                    i64::try_from(seq).expect("fits"),
                    recorded_text,
                    event.request_id,
                    partner,
                    action_name,
                    "success",
                    event.entity.as_ref().map(|e| e.resource_type.clone()),
                    event.entity.as_ref().map(|e| e.id.clone()),
                    patient,
                    json,
                    leaf.as_slice(),
                ])
                .expect("insert");
            if seq % 1_000_000 == 0 {
                eprintln!(
                    "audit_query: {seq} events inserted ({:?})",
                    started.elapsed()
                );
            }
        }
    }
    tx.commit().expect("commit");
    conn.execute_batch("ANALYZE; PRAGMA wal_checkpoint(TRUNCATE);")
        .expect("analyze");
    drop(conn);
    std::fs::write(&marker, b"").expect("marker");
    eprintln!(
        "audit_query: built {events} events in {:?}",
        started.elapsed()
    );
}

fn patient_query(patient: String) -> AuditQuery {
    AuditQuery {
        patient: Some(patient),
        from: Some(datetime!(2025-01-01 00:00 UTC)),
        to: Some(datetime!(2026-01-01 00:00 UTC)),
        limit: AuditQuery::MAX_LIMIT,
        ..AuditQuery::default()
    }
}

fn percentiles(reader: &AuditReader, patients: u64) {
    let mut rng = Lcg(42);
    let mut times: Vec<Duration> = Vec::with_capacity(2_000);
    let mut found = 0usize;
    for _ in 0..2_000 {
        let query = patient_query(nhs_number(rng.next() % patients));
        let start = Instant::now();
        let page = reader.query(&query).expect("query");
        times.push(start.elapsed());
        found += page.events.len();
    }
    times.sort();
    let at = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)];
    eprintln!(
        "audit_query: patient query over 12 months, 2000 random patients: mean {:.1} events; p50 {:?}, p95 {:?}, p99 {:?}, max {:?}",
        found as f64 / 2_000.0,
        at(50),
        at(95),
        at(99),
        times[times.len() - 1]
    );
}

fn bench(c: &mut Criterion) {
    let events = events_wanted();
    let dir = data_dir(events);
    build(&dir, events);
    let reader = AuditReader::open(&dir).expect("reader");
    let patients = (events / 100).max(1);
    percentiles(&reader, patients);

    let mut group = c.benchmark_group("audit_query");
    let mut rng = Lcg(7);
    group.bench_function(format!("patient_12_months/{events}_events"), |b| {
        b.iter(|| {
            let query = patient_query(nhs_number(rng.next() % patients));
            reader.query(&query).expect("query")
        });
    });
    let mut after = 0i64;
    group.bench_function(format!("break_glass_page/{events}_events"), |b| {
        b.iter(|| {
            let page = reader
                .query(&AuditQuery {
                    break_glass_only: true,
                    after_seq: Some(after),
                    ..AuditQuery::default()
                })
                .expect("query");
            after = page.next.unwrap_or(0);
            page
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
