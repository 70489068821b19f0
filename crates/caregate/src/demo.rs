//! `caregate demo`: a day in the example ICS, end to end, in one command (issue 7).
//!
//! 1. A data directory (`--data DIR`, kept; else a temporary one) and a copy of the shipped example
//!    config (`deploy/example/caregate.toml`) adapted to it: loopback on a free port, two partners
//!    switched to push delivery at simulated HTTPS endpoints started here (`crates/testkit`'s
//!    partner server), the synthetic population's National Data Opt-out list, and the shipped
//!    feed definitions with a fresh pseudonymisation key per feed.
//! 2. `caregate serve` (this executable) on that config, as a separate process.
//! 3. The day's traffic from the seeded generator (`caregate synth`), each partner with its own
//!    SMART token, patients in parallel and each patient's records in order; plus a few broken
//!    requests that must be refused with an `OperationOutcome`.
//! 4. Inbox users (the GP practices and the council) page through `$inbox` and acknowledge; the
//!    push partners receive; the ICB's analytics consumer runs a Bulk Data `$export` per feed and
//!    downloads the NDJSON.
//! 5. The gateway is stopped (SIGTERM) and the data directory is read back: deliveries per
//!    partner against the stored decisions, withholdings by rule, opt-outs kept out of the feeds,
//!    and the audit chain verified — the same checks `caregate audit verify` and
//!    `caregate deliveries status` make.
//!
//! Each check prints `ok` or `FAILED`; the exit status is 0 only if all of them held.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use caregate_feeds::export::{latest_export, render_report};
use caregate_feeds::transform::Transformer;
use caregate_feeds::{FeedDefinition, KeyFile};
use caregate_policy::Decision;
use caregate_store::Store as _;
use caregate_store::sqlite::{SqliteOptions, SqliteStore};
use caregate_testkit::partner_server::PartnerServer;
use caregate_testkit::synth::{
    SynthConfig, SynthPatient, SynthRecord, ndoo_list, records_by_patient,
};
use serde_json::{Value, json};

use crate::launch::{GatewayProcess, LoadedConfig, PartnerCredentials};

/// Partners the demo switches to push delivery (the others collect from their inbox).
const PUSH_PARTNERS: [&str; 2] = ["trust-rx1", "pharmacy-fa123"];
/// The analytics consumer of the shipped feeds.
const ANALYTICS: &str = "icb-qe1";
/// How long the traffic may take to settle (deliveries drained) before the demo gives up.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Keep the data directory here (created if missing; must be empty) for inspection with
    /// `caregate audit verify --data DIR`, `caregate deliveries status --data DIR`,
    /// `caregate feed report FEED --data DIR`. Default: a temporary directory, removed at the end.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The example configuration to start from. Default: deploy/example/caregate.toml (in the
    /// current directory's checkout, else in the checkout this binary was built from).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Patients in the synthetic population (at least 20).
    #[arg(long, default_value_t = 1000)]
    patients: usize,
    /// Seed of the synthetic day: same seed, same records.
    #[arg(long, default_value_t = 20_261_123)]
    seed: u64,
    /// Patients submitted in parallel.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
}

/// The outcome of one check.
#[derive(Debug)]
struct Check {
    name: String,
    ok: bool,
    detail: String,
}

#[derive(Debug, Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.0.push(Check {
            name: name.into(),
            ok,
            detail: detail.into(),
        });
    }

    fn all_ok(&self) -> bool {
        self.0.iter().all(|check| check.ok)
    }
}

fn default_config() -> PathBuf {
    let local = PathBuf::from("deploy/example/caregate.toml");
    if local.exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/example/caregate.toml")
}

pub(crate) fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.patients < 20 {
        bail!("--patients must be at least 20 (the feeds' disclosure control needs a population)");
    }
    if args.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run_async(args))
}

/// Blank the progress line and return to its start.
#[allow(clippy::print_stdout, reason = "progress is the command's output")]
fn clear_progress() {
    print!("\r{:76}\r", "");
    let _ = std::io::stdout().flush();
}

/// Progress on one line, rewritten in place.
#[allow(clippy::print_stdout, reason = "progress is the command's output")]
fn progress(line: &str) {
    print!("\r    {line:<70}");
    let _ = std::io::stdout().flush();
}

#[allow(clippy::print_stdout, reason = "the report is the command's output")]
async fn run_async(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started_at = Instant::now();
    let config_path = args.config.clone().unwrap_or_else(default_config);
    let (data, _temporary) = match &args.data {
        Some(dir) => {
            if dir.exists()
                && std::fs::read_dir(dir)
                    .with_context(|| format!("cannot read {}", dir.display()))?
                    .next()
                    .is_some()
            {
                bail!(
                    "{} is not empty: give --data a new or empty directory",
                    dir.display()
                );
            }
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            (dir.canonicalize()?, None)
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("caregate-demo-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let synth = SynthConfig::new(args.seed, args.patients);
    synth.validate().map_err(|e| anyhow::anyhow!("{e}"))?;

    println!("caregate demo: a day in the example ICS");
    println!(
        "  config {}, seed {}, {} patients, data directory {}{}",
        config_path.display(),
        args.seed,
        args.patients,
        data.display(),
        if args.data.is_some() {
            " (kept)"
        } else {
            " (temporary)"
        }
    );

    // 1. Simulated partners and the demo's config.
    println!("\n[1/6] simulated partners and configuration");
    let mut config = LoadedConfig::load(&config_path)?;
    let policy_dir = config
        .value
        .get("policy")
        .and_then(|p| p.get("dir"))
        .and_then(toml::Value::as_str)
        .map(PathBuf::from)
        .context("the example config has no [policy] dir")?;
    let partners_dir = data.join("partners");
    std::fs::create_dir_all(&partners_dir)?;
    let mut push = BTreeMap::new();
    for id in PUSH_PARTNERS {
        let server = PartnerServer::start().await;
        let ca = partners_dir.join(format!("{id}-ca.pem"));
        std::fs::write(&ca, server.ca_pem())?;
        let mut delivery = toml::Table::new();
        delivery.insert("mode".into(), "push".into());
        delivery.insert("endpoint".into(), server.base_url().into());
        delivery.insert("ca_cert".into(), ca.display().to_string().into());
        config
            .partner_mut(id)?
            .insert("delivery".into(), toml::Value::Table(delivery));
        println!("    {id}: push endpoint {}", server.base_url());
        push.insert(id, server);
    }
    let inbox_users: Vec<String> = config
        .partners()
        .iter()
        .filter(|p| {
            p.get("delivery")
                .and_then(|d| d.get("mode"))
                .and_then(toml::Value::as_str)
                == Some("inbox")
        })
        .filter_map(|p| p.get("id").and_then(toml::Value::as_str).map(str::to_owned))
        .collect();
    println!("    inbox users: {}", inbox_users.join(", "));
    let ndoo: BTreeSet<String> = ndoo_list(&synth).collect();
    let ndoo_path = data.join("ndoo.txt");
    let mut ndoo_text: String = ndoo.iter().map(|n| format!("{n}\n")).collect();
    if ndoo_text.is_empty() {
        ndoo_text.push('\n');
    }
    std::fs::write(&ndoo_path, ndoo_text)?;
    println!(
        "    National Data Opt-out list: {} patients ({})",
        ndoo.len(),
        ndoo_path.display()
    );
    let definitions = policy_dir.join("feeds");
    let key_file = data.join("feed-keys.toml");
    let mut feeds = Vec::new();
    for entry in std::fs::read_dir(&definitions)
        .with_context(|| format!("cannot read {}", definitions.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml")
            && let Some(feed) = path.file_stem().and_then(|s| s.to_str())
        {
            feeds.push(feed.to_owned());
        }
    }
    feeds.sort();
    for feed in &feeds {
        let info = KeyFile::open(&key_file)?.create(feed)?;
        println!(
            "    feed {feed}: key version {} (fingerprint {})",
            info.version, info.fingerprint
        );
    }
    {
        let table = config.table_mut("policy")?;
        table.insert("ndoo_list".into(), ndoo_path.display().to_string().into());
    }
    {
        let table = config.table_mut("feeds")?;
        table.insert(
            "definitions".into(),
            definitions.display().to_string().into(),
        );
        table.insert("key_file".into(), key_file.display().to_string().into());
    }
    {
        let server = config.table_mut("server")?;
        server.insert("listen".into(), "127.0.0.1:0".into());
        server.insert("data_dir".into(), data.display().to_string().into());
    }
    // The admin listener (on by default) gets a free port too, beside any running gateway.
    config
        .table_mut("admin")?
        .insert("listen".into(), "127.0.0.1:0".into());
    let demo_config = data.join("caregate-demo.toml");
    config.write(&demo_config)?;
    let log = data.join("caregate.log");
    println!("    config: {}", demo_config.display());

    // 2. The gateway.
    println!("\n[2/6] starting the gateway");
    let gateway = {
        let (config, log) = (demo_config.clone(), log.clone());
        tokio::task::spawn_blocking(move || GatewayProcess::spawn(&config, "info", Some(&log)))
            .await??
    };
    println!(
        "    caregate serve: {} (pid {}, log {})",
        gateway.base_url,
        gateway.pid(),
        log.display()
    );
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&gateway.cert_pem)?])
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut tokens = BTreeMap::new();
    for partner in config.partners() {
        let Some(id) = partner.get("id").and_then(toml::Value::as_str) else {
            continue;
        };
        let credentials = PartnerCredentials::load(&config, id)?;
        tokens.insert(
            id.to_owned(),
            credentials.token(&client, &gateway.base_url).await?,
        );
    }
    println!(
        "    {} partners signed in (SMART Backend Services)",
        tokens.len()
    );

    // 3. The day's traffic.
    println!("\n[3/6] the day's records");
    let population: Vec<(SynthPatient, Vec<SynthRecord>)> = records_by_patient(&synth).collect();
    let total: usize = population.iter().map(|(_, records)| records.len()).sum();
    let sent = submit_day(
        &client,
        &gateway.base_url,
        &tokens,
        population
            .iter()
            .map(|(_, records)| records.clone())
            .collect(),
        args.parallel,
        total,
    )
    .await;
    println!();
    let mut checks = Checks::default();
    checks.add(
        "every synthetic record accepted",
        sent.accepted == total as u64,
        format!(
            "{} of {total} accepted{}",
            sent.accepted,
            sent.first_failure
                .as_deref()
                .map_or(String::new(), |f| format!("; first failure: {f}"))
        ),
    );
    let broken = submit_broken(&client, &gateway.base_url, &tokens).await?;
    checks.add(
        "every broken request refused with an OperationOutcome",
        broken.refused == broken.sent,
        format!("{} of {} refused", broken.refused, broken.sent),
    );

    // 4. Recipients collect; the analytics consumer exports.
    println!("\n[4/6] deliveries (push and inbox)");
    let collected = settle(&client, &gateway.base_url, &tokens, &inbox_users, &push).await?;
    println!();
    println!("\n[5/6] analytics consumer: Bulk Data $export");
    let analytics_token = tokens
        .get(ANALYTICS)
        .with_context(|| format!("the example config has no partner {ANALYTICS}"))?;
    let all_nhs: Vec<&str> = population
        .iter()
        .map(|(patient, _)| patient.nhs_number.as_str())
        .collect();
    let mut exports = Vec::new();
    for feed in &feeds {
        let exported = bulk_export(&client, &gateway.base_url, analytics_token, feed).await?;
        let leaked = all_nhs
            .iter()
            .filter(|nhs| exported.text.contains(**nhs))
            .count();
        checks.add(
            format!("feed {feed}: exported, no NHS number in the NDJSON"),
            leaked == 0,
            format!(
                "{} NDJSON lines in {} files; {leaked} NHS numbers found",
                exported.lines, exported.files
            ),
        );
        println!(
            "    {feed}: {} rows in {} files",
            exported.lines, exported.files
        );
        exports.push((feed.clone(), exported));
    }

    // 5. Stop, then read the data directory back.
    println!("\n[6/6] stopping the gateway; reading the data directory back");
    let clean = tokio::task::spawn_blocking(move || gateway.stop(Duration::from_secs(60))).await?;
    checks.add(
        "the gateway stopped cleanly on SIGTERM",
        clean,
        if clean { "exit 0" } else { "it did not exit 0" },
    );
    let store = SqliteStore::open(&data, SqliteOptions::default())
        .with_context(|| format!("cannot open the store in {}", data.display()))?;
    let facts = read_back(&store, &population).await?;
    let statuses = store
        .delivery_status(None)
        .await
        .context("cannot read the delivery status")?;
    store.close().await.context("cannot close the store")?;

    // Deliveries: every record the policy allowed to a configured recipient is delivered (or
    // withheld at delivery time, with its audit event), nothing is pending or dead.
    println!("\nReport");
    println!(
        "  Records: {} accepted, {} refused (broken requests)",
        sent.accepted, broken.refused
    );
    if let Some(example) = &broken.example {
        println!("    example OperationOutcome (unknown element): {example}");
    }
    println!("  Deliveries per partner:");
    println!(
        "    {:<20} {:<6} {:>8} {:>9} {:>10} {:>8} {:>5} {:>9}",
        "partner", "mode", "allowed", "delivered", "withheld*", "pending", "dead", "received"
    );
    let mut delivery_ok = true;
    for status in &statuses {
        let mode = if push.contains_key(status.partner.as_str()) {
            "push"
        } else {
            "inbox"
        };
        let allowed = facts
            .allowed
            .get(status.partner.as_str())
            .copied()
            .unwrap_or(0);
        let received = collected.get(status.partner.as_str()).copied().unwrap_or(0);
        let row_ok = status.pending == 0
            && status.dead == 0
            && status.delivered + status.withheld == allowed
            && received == status.delivered;
        delivery_ok &= row_ok;
        println!(
            "    {:<20} {:<6} {:>8} {:>9} {:>10} {:>8} {:>5} {:>9}{}",
            status.partner,
            mode,
            allowed,
            status.delivered,
            status.withheld,
            status.pending,
            status.dead,
            received,
            if row_ok { "" } else { "  <- mismatch" }
        );
    }
    println!("    (* withheld at delivery time by a re-check under the current consent state)");
    checks.add(
        "every allowed record delivered once, none pending or dead",
        delivery_ok && !statuses.is_empty(),
        "allowed = delivered + withheld-at-delivery; received by the partner = delivered",
    );
    println!("  Withheld at intake, by rule (record × recipient):");
    for (rule, count) in &facts.withheld_by_rule {
        println!("    {rule:<28} {count}");
    }
    checks.add(
        "records with sensitive codes withheld (SENS-1)",
        facts.sensitive_patients == 0
            || facts.withheld_by_rule.keys().any(|r| r.starts_with("SENS")),
        format!(
            "{} patients with a sensitive code",
            facts.sensitive_patients
        ),
    );
    checks.add(
        "no National Data Opt-out patient's record let into a feed at intake (NDOO-1)",
        facts.ndoo_in_feed == 0,
        format!(
            "{} records of {} NDOO patients; {} GP-sourced records of Type 1 patients decided before their opt-out code arrived (removed at export)",
            facts.ndoo_records,
            ndoo.len(),
            facts.type1_in_feed_at_intake
        ),
    );
    for (feed, exported) in &exports {
        let (found, others, released) =
            opted_out_in_export(&definitions, &key_file, feed, exported, &population)?;
        // The recomputed pseudonyms must find the patients who were released, or the search
        // proves nothing.
        checks.add(
            format!("feed {feed}: no opted-out patient in the export (NDOO-7, T1-1)"),
            found == 0 && others == released,
            format!(
                "pseudonyms recomputed with the feed key: {found} opted-out patients found; {others} of {released} released Patients matched"
            ),
        );
    }
    println!("  Feeds:");
    for (feed, _) in &exports {
        match latest_export(&data, feed)? {
            Some(manifest) => {
                for line in render_report(&manifest).lines() {
                    println!("    {line}");
                }
            }
            None => checks.add(
                format!("feed {feed}: export on disk"),
                false,
                "no complete export",
            ),
        }
    }
    let audit = crate::audit_cli::verify_quiet(&data)?;
    checks.add("audit chain verified", audit.0, audit.1.clone());
    println!("  Audit: {}", audit.1);
    println!("  Files:");
    println!(
        "    store and audit log   {}",
        data.join("caregate.db").display()
    );
    println!("    feed NDJSON           {}", data.join("feeds").display());
    println!("    gateway log           {}", log.display());
    println!("    config used           {}", demo_config.display());

    println!("\nChecks");
    for check in &checks.0 {
        println!(
            "  [{}] {} — {}",
            if check.ok { "ok" } else { "FAILED" },
            check.name,
            check.detail
        );
    }
    println!(
        "\n{} in {:.1} s{}",
        if checks.all_ok() {
            "all checks held"
        } else {
            "SOME CHECKS FAILED"
        },
        started_at.elapsed().as_secs_f64(),
        match &args.data {
            Some(dir) => format!(
                "; inspect with: caregate audit verify --data {0}; caregate deliveries status --data {0}",
                dir.display()
            ),
            None => String::new(),
        }
    );
    Ok(if checks.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What the day's submissions came to.
#[derive(Debug, Default)]
struct Sent {
    accepted: u64,
    first_failure: Option<String>,
}

/// The `OperationOutcome` in a refusal, in one line: code, location, diagnostics.
fn outcome_summary(body: &Value) -> Option<String> {
    if body["resourceType"] != "OperationOutcome" {
        return None;
    }
    let issue = body["issue"].get(0)?;
    let location = issue["expression"]
        .get(0)
        .or_else(|| issue["location"].get(0))
        .and_then(Value::as_str)
        .unwrap_or("-");
    Some(format!(
        "{} at {location}: {}",
        issue["code"].as_str().unwrap_or("?"),
        issue["diagnostics"]
            .as_str()
            .or_else(|| issue["details"]["text"].as_str())
            .unwrap_or("")
    ))
}

/// Submit every patient's records, `parallel` patients at a time, each patient's in order.
async fn submit_day(
    client: &reqwest::Client,
    base_url: &str,
    tokens: &BTreeMap<String, String>,
    patients: Vec<Vec<SynthRecord>>,
    parallel: usize,
    total: usize,
) -> Sent {
    let queue = Arc::new(std::sync::Mutex::new(
        patients
            .into_iter()
            .collect::<std::collections::VecDeque<_>>(),
    ));
    let done = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        let (queue, done, accepted, failure) = (
            Arc::clone(&queue),
            Arc::clone(&done),
            Arc::clone(&accepted),
            Arc::clone(&failure),
        );
        let (client, base_url, tokens) = (client.clone(), base_url.to_owned(), tokens.clone());
        workers.spawn(async move {
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some(records) = next else { break };
                for record in records {
                    let outcome = submit_one(&client, &base_url, &tokens, &record).await;
                    done.fetch_add(1, Ordering::Relaxed);
                    match outcome {
                        Ok(()) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => {
                            if let Ok(mut first) = failure.lock() {
                                first.get_or_insert(error);
                            }
                        }
                    }
                }
            }
        });
    }
    let ticker = {
        let (done, accepted) = (Arc::clone(&done), Arc::clone(&accepted));
        tokio::spawn(async move {
            loop {
                progress(&format!(
                    "submitted {}/{total}, accepted {}",
                    done.load(Ordering::Relaxed),
                    accepted.load(Ordering::Relaxed)
                ));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    while workers.join_next().await.is_some() {}
    ticker.abort();
    progress(&format!(
        "submitted {}/{total}, accepted {}",
        done.load(Ordering::Relaxed),
        accepted.load(Ordering::Relaxed)
    ));
    Sent {
        accepted: accepted.load(Ordering::Relaxed),
        first_failure: failure.lock().ok().and_then(|mut f| f.take()),
    }
}

async fn submit_one(
    client: &reqwest::Client,
    base_url: &str,
    tokens: &BTreeMap<String, String>,
    record: &SynthRecord,
) -> Result<(), String> {
    let token = tokens
        .get(record.partner_id)
        .ok_or_else(|| format!("no token for {}", record.partner_id))?;
    let response = client
        .post(format!("{base_url}{}", record.path()))
        .bearer_auth(token)
        .header("Content-Type", "application/fhir+json")
        .body(record.body.clone())
        .send()
        .await
        .map_err(|e| format!("{} {}: {e}", record.partner_id, record.resource_type))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    Err(format!(
        "{} {} answered {status}: {}",
        record.partner_id,
        record.resource_type,
        outcome_summary(&body).unwrap_or_default()
    ))
}

/// Broken requests and what came of them.
#[derive(Debug)]
struct Broken {
    sent: usize,
    refused: usize,
    example: Option<String>,
}

/// Requests a careless integration might send; each must be refused with an `OperationOutcome`
/// naming the problem, and nothing stored.
#[allow(clippy::print_stdout, reason = "the report is the command's output")]
async fn submit_broken(
    client: &reqwest::Client,
    base_url: &str,
    tokens: &BTreeMap<String, String>,
) -> anyhow::Result<Broken> {
    let token = tokens
        .get("gp-a81001")
        .context("the example config has no partner gp-a81001")?;
    let cases: [(&str, &str, String); 3] = [
        (
            "an element FHIR R4 does not define",
            "Observation",
            json!({
                "resourceType": "Observation",
                "status": "final",
                "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "75367002" }] },
                "colour": "blue"
            })
            .to_string(),
        ),
        (
            "an NHS number that fails its check digit",
            "Patient",
            json!({
                "resourceType": "Patient",
                "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9434765918" }],
                "gender": "female"
            })
            .to_string(),
        ),
        (
            "truncated JSON",
            "Patient",
            "{\"resourceType\":\"Patient\",\"gender\":".to_owned(),
        ),
    ];
    let mut refused = 0;
    let mut example = None;
    for (what, resource_type, body) in &cases {
        let response = client
            .post(format!("{base_url}/fhir/{resource_type}"))
            .bearer_auth(token)
            .header("Content-Type", "application/fhir+json")
            .body(body.clone())
            .send()
            .await?;
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        let summary = outcome_summary(&answer);
        let ok = status.is_client_error() && summary.is_some();
        if ok {
            refused += 1;
        }
        println!(
            "    broken request ({what}): {status} {}",
            summary.as_deref().unwrap_or("(no OperationOutcome)")
        );
        if example.is_none() && ok {
            example = Some(serde_json::to_string(&answer)?);
        }
    }
    Ok(Broken {
        sent: cases.len(),
        refused,
        example,
    })
}

/// Collect everything: inbox users page and acknowledge until their inboxes stay empty, push
/// partners receive; done when nothing new arrived for three seconds. Returns the records each
/// recipient holds (push: distinct idempotency keys the partner accepted).
async fn settle(
    client: &reqwest::Client,
    base_url: &str,
    tokens: &BTreeMap<String, String>,
    inbox_users: &[String],
    push: &BTreeMap<&str, PartnerServer>,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut collected: BTreeMap<String, u64> = BTreeMap::new();
    let started = Instant::now();
    let mut last_total = u64::MAX;
    let mut quiet_since = Instant::now();
    loop {
        for user in inbox_users {
            let token = tokens
                .get(user)
                .with_context(|| format!("no token for {user}"))?;
            let count = drain_inbox(client, base_url, token)
                .await
                .with_context(|| format!("inbox of {user}"))?;
            *collected.entry(user.clone()).or_default() += count;
        }
        for (id, server) in push {
            let keys: HashSet<String> = server.accepted_keys().into_iter().collect();
            collected.insert((*id).to_owned(), keys.len() as u64);
        }
        let total: u64 = collected.values().sum();
        progress(
            &collected
                .iter()
                .map(|(id, n)| format!("{id} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        if total != last_total {
            last_total = total;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_secs(3) {
            return Ok(collected);
        }
        if started.elapsed() > SETTLE_LIMIT {
            return Ok(collected);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Read and acknowledge one partner's inbox until a page comes back empty; returns the records
/// read.
async fn drain_inbox(client: &reqwest::Client, base_url: &str, token: &str) -> anyhow::Result<u64> {
    let mut read = 0;
    loop {
        let response = client
            .get(format!("{base_url}/fhir/$inbox?_count=200"))
            .bearer_auth(token)
            .send()
            .await?;
        let status = response.status();
        let page: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "$inbox answered {status}: {}",
                outcome_summary(&page).unwrap_or_default()
            );
        }
        let entries = page["entry"].as_array().map_or(0, Vec::len);
        if entries == 0 {
            return Ok(read);
        }
        let next = page["link"]
            .as_array()
            .and_then(|links| links.iter().find(|l| l["relation"] == "next"))
            .and_then(|l| l["url"].as_str())
            .context("a non-empty inbox page without a next link")?;
        let cursor = next
            .split(['?', '&'])
            .find_map(|pair| pair.strip_prefix("cursor="))
            .context("the next link carries no cursor")?;
        let ack = client
            .post(format!("{base_url}/fhir/$inbox/ack?cursor={cursor}"))
            .bearer_auth(token)
            .send()
            .await?;
        if !ack.status().is_success() {
            bail!("$inbox/ack answered {}", ack.status());
        }
        read += entries as u64;
    }
}

/// One feed's export as its consumer downloaded it.
#[derive(Debug)]
struct Exported {
    files: usize,
    lines: u64,
    text: String,
}

/// Count opted-out patients visible in an export: a National Data Opt-out patient's pseudonym
/// anywhere, or a Type 1 patient's GP-sourced registration (their `Patient`). The pseudonyms are
/// recomputed here with the feed's key, as an IG officer answering a re-identification request
/// would.
fn opted_out_in_export(
    definitions: &Path,
    key_file: &Path,
    feed: &str,
    exported: &Exported,
    population: &[(SynthPatient, Vec<SynthRecord>)],
) -> anyhow::Result<(usize, usize, usize)> {
    let definition = FeedDefinition::load(&definitions.join(format!("{feed}.toml")))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let keys = KeyFile::open(key_file)?;
    let key = keys.current(feed)?;
    let transformer = Transformer::new(&definition, key);
    let patients: Vec<&str> = exported
        .text
        .lines()
        .filter(|line| line.contains("\"resourceType\":\"Patient\""))
        .collect();
    let (mut opted_out, mut others) = (0, 0);
    for (patient, _) in population {
        let pseudonym = transformer.nhs_number_pseudonym(&patient.nhs_number);
        let registered = patients.iter().any(|line| line.contains(&pseudonym));
        if patient.ndoo && exported.text.contains(&pseudonym) || patient.type1 && registered {
            opted_out += 1;
        } else if registered {
            others += 1;
        }
    }
    Ok((opted_out, others, patients.len()))
}

/// Kick off `Group/{feed}/$export`, poll it, download every file.
async fn bulk_export(
    client: &reqwest::Client,
    base_url: &str,
    token: &str,
    feed: &str,
) -> anyhow::Result<Exported> {
    let kick_off = client
        .get(format!("{base_url}/fhir/Group/{feed}/$export"))
        .bearer_auth(token)
        .header("Prefer", "respond-async")
        .header("Accept", "application/fhir+json")
        .send()
        .await?;
    if kick_off.status() != 202 {
        let status = kick_off.status();
        let body: Value = kick_off.json().await.unwrap_or(Value::Null);
        bail!(
            "$export of {feed} answered {status}: {}",
            outcome_summary(&body).unwrap_or_default()
        );
    }
    let status_url = kick_off
        .headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .context("$export answered 202 without Content-Location")?
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    let manifest: Value = loop {
        let response = client.get(&status_url).bearer_auth(token).send().await?;
        match response.status().as_u16() {
            202 if Instant::now() < deadline => {
                progress(&format!(
                    "{feed}: {}",
                    response
                        .headers()
                        .get("x-progress")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("in progress")
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            200 => break response.json().await?,
            other => bail!("export status of {feed} answered {other}"),
        }
    };
    clear_progress();
    let mut exported = Exported {
        files: 0,
        lines: 0,
        text: String::new(),
    };
    for output in manifest["output"].as_array().into_iter().flatten() {
        let url = output["url"]
            .as_str()
            .context("a manifest output without url")?;
        let response = client.get(url).bearer_auth(token).send().await?;
        if !response.status().is_success() {
            bail!(
                "downloading an export file of {feed} answered {}",
                response.status()
            );
        }
        let text = response.text().await?;
        exported.files += 1;
        exported.lines += text.lines().filter(|l| !l.trim().is_empty()).count() as u64;
        exported.text.push_str(&text);
    }
    Ok(exported)
}

/// What the committed log says about the day.
#[derive(Debug, Default)]
struct Facts {
    /// Records the intake decision allowed to each partner.
    allowed: BTreeMap<String, u64>,
    /// Record × recipient withholdings at intake, by rule id.
    withheld_by_rule: BTreeMap<String, u64>,
    sensitive_patients: usize,
    /// Records of National Data Opt-out patients, and how many of them an intake decision let
    /// into a feed (must be 0: the list is loaded before the day starts).
    ndoo_records: u64,
    ndoo_in_feed: u64,
    /// GP-sourced records of Type 1 patients an intake decision let into a feed: those decided
    /// before the practice's opt-out code arrived; the export-time re-check removes them.
    type1_in_feed_at_intake: u64,
}

async fn read_back(
    store: &SqliteStore,
    population: &[(SynthPatient, Vec<SynthRecord>)],
) -> anyhow::Result<Facts> {
    let by_nhs: BTreeMap<&str, &SynthPatient> = population
        .iter()
        .map(|(patient, _)| (patient.nhs_number.as_str(), patient))
        .collect();
    let mut facts = Facts {
        sensitive_patients: population.iter().filter(|(p, _)| p.sensitive).count(),
        ..Facts::default()
    };
    let mut after = 0;
    loop {
        let entries = store.read_log(after, 500).await?;
        let Some(last) = entries.last() else { break };
        after = last.seq;
        for entry in &entries {
            let Some(bytes) = &entry.decision else {
                continue;
            };
            let decision: Decision = serde_json::from_slice(bytes).with_context(|| {
                format!("the decision stored at seq {} is unreadable", entry.seq)
            })?;
            for delivery in &decision.deliver_to {
                *facts
                    .allowed
                    .entry(delivery.partner.to_string())
                    .or_default() += 1;
            }
            for withheld in &decision.withheld {
                *facts
                    .withheld_by_rule
                    .entry(withheld.rule_id.clone())
                    .or_default() += 1;
            }
            let Some(patient) = entry.nhs_number.as_deref().and_then(|n| by_nhs.get(n)) else {
                continue;
            };
            let in_feed = decision.feeds.iter().any(|feed| feed.included);
            if patient.ndoo {
                facts.ndoo_records += 1;
                facts.ndoo_in_feed += u64::from(in_feed);
            } else if patient.type1 && entry.partner.starts_with("gp-") {
                facts.type1_in_feed_at_intake += u64::from(in_feed);
            }
        }
    }
    Ok(facts)
}
