//! The `caregate` command: serve the gateway, validate FHIR files offline, get a token.

mod bench;
mod demo;
mod launch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use caregate_fhir::validate::{Validated, ValidatorConfig};
use caregate_fhir::{OperationOutcome, Validator};
use caregate_gateway::config::Config;
use caregate_testkit::keys::{KeyAlg, PartnerKey};
use clap::{Parser, Subcommand};

mod audit_cli;
mod db_cli;
mod deliveries_cli;
mod feeds_cli;
mod policy_cli;

/// caregate — a FHIR R4 gateway that lets GP practices, trusts, pharmacies and councils in an
/// Integrated Care System share care records safely: authenticated, validated, durable, audited.
#[derive(Debug, Parser)]
#[command(name = "caregate", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A day in the example ICS, end to end: starts the gateway on the embedded store with the
    /// shipped example config and policies, simulated push partners, inbox users and an analytics
    /// consumer; replays a synthetic day; prints a report (accepted/refused, deliveries per
    /// partner, withholdings by rule, feed release reports, audit verification). Exits 0 only if
    /// every check held. `--data DIR` keeps the data directory for the other commands.
    Demo(demo::DemoArgs),
    /// Serve the gateway over HTTPS with the given configuration file.
    ///
    /// Prints `caregate listening on <URL>` to standard output once it accepts connections.
    /// Stops gracefully on SIGTERM or Ctrl-C: in-flight requests finish; every acknowledged
    /// record is already durable.
    Serve {
        /// The configuration file (TOML); see deploy/example/caregate.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate FHIR JSON files offline (files, directories, .json and .ndjson), printing the same
    /// OperationOutcome the gateway would answer for each invalid one. Exits 1 if any is invalid.
    Validate {
        /// Files or directories to validate.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Use the limits and rules of this configuration file instead of the defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print only invalid files and the summary.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Get an access token for a partner: sign a SMART client assertion with the partner's
    /// private key and exchange it at the gateway's token endpoint. Prints the token response.
    Token {
        /// The gateway's configuration file (to find the partner and its key id).
        #[arg(long, short)]
        config: PathBuf,
        /// The partner id (also the OAuth client id).
        #[arg(long)]
        partner: String,
        /// The partner's private key (PKCS#8 PEM). Default: keys/<partner>.key.pem beside the config.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Scopes to ask for. Default: all the partner's registered scopes.
        #[arg(long)]
        scope: Option<String>,
        /// The gateway's base URL. Default: the config's public_url, or https://localhost:<port>.
        #[arg(long)]
        url: Option<String>,
        /// A PEM certificate to trust for the gateway (e.g. the dev certificate in the data dir).
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// Print only the access token (for shell use: TOKEN=$(caregate token ... --raw)).
        #[arg(long)]
        raw: bool,
    },
    /// The consent/IG policy bundle: check it, run its tests, explain a decision.
    Policy {
        #[command(subcommand)]
        command: policy_cli::PolicyCommand,
    },
    /// Consent state: install a new National Data Opt-out list.
    Consent {
        #[command(subcommand)]
        command: policy_cli::ConsentCommand,
    },
    /// The PostgreSQL store (`[store] backend = "postgres"`): `db migrate --config FILE`.
    Db {
        #[command(subcommand)]
        command: db_cli::DbCommand,
    },
    /// Audit log checks for IG officers: verify the tamper evidence offline, export a checkpoint.
    Audit {
        #[command(subcommand)]
        command: audit_cli::AuditCommand,
    },
    /// Per-feed pseudonymisation keys: `keys new|list|rotate FEED` (a 0600 key file).
    Keys {
        #[command(subcommand)]
        command: feeds_cli::KeysCommand,
    },
    /// Pseudonymised feeds: `feed export FEED`, `feed report FEED --data DIR`.
    Feed {
        #[command(subcommand)]
        command: feeds_cli::FeedCommand,
    },
    /// Read an IG officer's password from standard input and print its Argon2id PHC hash, for
    /// `password_hash` in an `[[ig_officer]]` table.
    IgPassword,
    /// Delivery to partners: queue status, dead letters, replay.
    Deliveries {
        #[command(subcommand)]
        command: deliveries_cli::DeliveriesCommand,
    },
    /// Generate a signing key pair for a partner's client: writes `<ID>.key.pem` (private, keep
    /// it with the partner, mode 0600) and `<ID>.jwks.json` (public, register it in the config).
    PartnerKey {
        /// The partner id.
        #[arg(long)]
        partner: String,
        /// Signature algorithm: ES384 (default), RS384 or ES256.
        #[arg(long, default_value = "ES384")]
        alg: String,
        /// Output directory.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Generate a synthetic ICS population and its care records (test NHS numbers only):
    /// `<OUT>/<partner>/<Type>.ndjson` per submitting partner and resource type, or
    /// `<OUT>/requests.ndjson` (one HTTP request per line, for replay), and `<OUT>/ndoo.txt` (the
    /// National Data Opt-out list, one NHS number per line). The same seed gives the same bytes.
    Synth {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Population size (at most 900000).
        #[arg(long, default_value_t = 100)]
        patients: usize,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// `ndjson` (resources) or `requests` (partner, method, path, body per line).
        #[arg(long, default_value = "ndjson", value_parser = ["ndjson", "requests"])]
        format: String,
        /// Share of patients on the National Data Opt-out list.
        #[arg(long, default_value_t = 0.05)]
        ndoo_share: f64,
        /// Share with a Type 1 opt-out coded by their GP.
        #[arg(long, default_value_t = 0.03)]
        type1_share: f64,
        /// Share with a dissent Consent (provision.type = deny).
        #[arg(long, default_value_t = 0.03)]
        dissent_share: f64,
        /// Share with a sexual-health diagnosis.
        #[arg(long, default_value_t = 0.03)]
        sensitive_share: f64,
        /// Pad smaller records with a narrative to about this many bytes.
        #[arg(long)]
        pad_to: Option<usize>,
    },
    /// End-to-end load benchmark on loopback: start the gateway (or use --url), get partner
    /// tokens with the example config's demo keys, drive synthetic records over TLS keep-alive
    /// connections, and report throughput and latency beside a bare TLS endpoint and the disk's
    /// fsync latency. Exits 1 if the gateway answered any 5xx or dropped a connection.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Validate {
            paths,
            config,
            quiet,
        } => validate(&paths, config.as_deref(), quiet),
        Command::Token {
            config,
            partner,
            key,
            scope,
            url,
            ca_cert,
            raw,
        } => token(&config, &partner, key, scope, url, ca_cert, raw),
        Command::PartnerKey { partner, alg, out } => partner_key(&partner, &alg, &out),
        Command::Deliveries { command } => deliveries_cli::run(command),
        Command::Synth {
            seed,
            patients,
            out,
            format,
            ndoo_share,
            type1_share,
            dissent_share,
            sensitive_share,
            pad_to,
        } => synth(
            caregate_testkit::synth::SynthConfig {
                seed,
                patients,
                ndoo_share,
                type1_share,
                dissent_share,
                sensitive_share,
                pad_to_bytes: pad_to,
                ..caregate_testkit::synth::SynthConfig::default()
            },
            &out,
            &format,
        ),
        Command::Bench(args) => bench::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Audit { command } => audit_cli::run(command),
        Command::Db { command } => db_cli::run(command),
        Command::Policy { command } => policy_cli::run_policy(command),
        Command::Consent { command } => policy_cli::run_consent(command),
        Command::Keys { command } => feeds_cli::keys(command),
        Command::Feed { command } => feeds_cli::feed(command),
        Command::IgPassword => audit_cli::ig_password(),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("caregate: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Logging and telemetry for `serve`: the log format from `[telemetry] log_format` (text, with
/// colours only on a terminal, or JSON lines carrying trace and span ids), filtered by
/// `CAREGATE_LOG`; the OpenTelemetry layers (request and stage spans, stage latency metrics)
/// under their own filter, so `CAREGATE_LOG=warn` does not switch off traces or metrics.
/// Returns the telemetry to shut down (flush) once the runtime has stopped.
fn init_logging(
    settings: &caregate_gateway::telemetry::TelemetrySettings,
) -> anyhow::Result<caregate_gateway::telemetry::Telemetry> {
    use caregate_gateway::telemetry::{JsonWithTrace, LogFormat, Telemetry};
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAREGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let telemetry = Telemetry::init(settings)?;
    let json = JsonWithTrace::new();
    let logs = match settings.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colours only on a terminal: a log redirected to a file stays plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .event_format(json.clone())
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(telemetry.layers())
        .init();
    json.bind_current();
    if telemetry.exporting() {
        tracing::info!(
            service = %settings.service_name,
            sampling_ratio = settings.sampling_ratio,
            "exporting traces and metrics over OTLP/HTTP"
        );
    }
    Ok(telemetry)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    // Outside the runtime: the OTLP client is a blocking one on the exporter's own threads.
    let telemetry = init_logging(&config.telemetry)?;
    let served = runtime()?.block_on(async move {
        // Listen for SIGTERM and SIGINT before anything is served, so a signal right after the
        // ready line is a graceful stop, never the default (immediate) termination.
        use tokio::signal::unix::{SignalKind, signal};
        let signals =
            signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)));
        let shutdown = async move {
            let (mut term, mut interrupt) = match signals {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM/SIGINT");
                    std::future::pending::<()>().await;
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = interrupt.recv() => tracing::info!("interrupt received"),
            }
        };
        caregate_gateway::runtime::run(config, shutdown, |started| {
            #[allow(clippy::print_stdout, reason = "the ready line is the CLI's output")]
            {
                if let Some(path) = &started.dev_certificate_path {
                    println!("dev certificate (trust it in clients): {}", path.display());
                }
                if let Some(url) = &started.admin_url {
                    println!("caregate admin listening on {url}");
                }
                println!("caregate listening on {}", started.base_url);
            }
        })
        .await
    });
    // Flush what is queued for the collector (bounded by the export timeout).
    telemetry.shutdown();
    served?;
    Ok(ExitCode::SUCCESS)
}

/// Collect the files to validate: files as given, directories recursively (*.json, *.ndjson),
/// in a stable order.
fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut stack = vec![path.clone()];
            while let Some(dir) = stack.pop() {
                let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
                    .with_context(|| format!("cannot read directory {}", dir.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .collect();
                entries.sort();
                for entry in entries {
                    if entry.is_dir() {
                        stack.push(entry);
                    } else if matches!(
                        entry.extension().and_then(|e| e.to_str()),
                        Some("json" | "ndjson")
                    ) {
                        files.push(entry);
                    }
                }
            }
        } else if path.exists() {
            files.push(path.clone());
        } else {
            bail!("{}: no such file or directory", path.display());
        }
    }
    Ok(files)
}

#[allow(
    clippy::print_stdout,
    reason = "validation results are the command's output"
)]
fn validate(paths: &[PathBuf], config: Option<&Path>, quiet: bool) -> anyhow::Result<ExitCode> {
    let validator = match config {
        Some(path) => caregate_gateway::runtime::validator_for(&Config::load(path)?)?,
        None => Validator::new(ValidatorConfig::default())?,
    };
    let (mut valid, mut invalid) = (0usize, 0usize);
    for file in collect_files(paths)? {
        let bytes =
            std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let is_ndjson = file.extension().and_then(|e| e.to_str()) == Some("ndjson");
        let units: Vec<(String, &[u8])> = if is_ndjson {
            bytes
                .split(|&b| b == b'\n')
                .enumerate()
                .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
                .map(|(n, line)| (format!("{}:{}", file.display(), n + 1), line))
                .collect()
        } else {
            vec![(file.display().to_string(), bytes.as_slice())]
        };
        for (name, unit) in units {
            match validator.validate_bytes(unit, None) {
                Ok(validated) => {
                    valid += 1;
                    if !quiet {
                        let kind = match &validated {
                            Validated::Resource(r) => r.resource_type().to_string(),
                            Validated::Bundle(_) => "Bundle".to_owned(),
                        };
                        println!("ok       {name} ({kind})");
                    }
                }
                Err(rejection) => {
                    invalid += 1;
                    println!("INVALID  {name}");
                    print_outcome(&rejection.outcome);
                }
            }
        }
    }
    println!("{valid} valid, {invalid} invalid");
    Ok(if invalid == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[allow(
    clippy::print_stdout,
    reason = "validation results are the command's output"
)]
fn print_outcome(outcome: &OperationOutcome) {
    let text = serde_json::to_string_pretty(&outcome.to_json()).unwrap_or_default();
    for line in text.lines() {
        println!("         {line}");
    }
}

#[allow(clippy::print_stdout, reason = "the token is the command's output")]
fn token(
    config_path: &Path,
    partner_id: &str,
    key: Option<PathBuf>,
    scope: Option<String>,
    url: Option<String>,
    ca_cert: Option<PathBuf>,
    raw: bool,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let partner = config
        .partners
        .iter()
        .find(|p| p.id == partner_id)
        .with_context(|| {
            format!(
                "{}: no partner with id `{partner_id}`",
                config_path.display()
            )
        })?;
    let key_path = key.unwrap_or_else(|| {
        config_path
            .parent()
            .unwrap_or(Path::new("."))
            .join("keys")
            .join(format!("{partner_id}.key.pem"))
    });
    let pem = std::fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read key {}", key_path.display()))?;
    let jwk = partner
        .jwks
        .get("keys")
        .and_then(|k| k.as_array())
        .and_then(|k| k.first())
        .with_context(|| {
            format!(
                "{}: partner `{partner_id}` has no keys",
                config_path.display()
            )
        })?;
    let kid = jwk
        .get("kid")
        .and_then(|v| v.as_str())
        .context("the partner's first key has no kid")?;
    let alg = jwk
        .get("alg")
        .and_then(|v| v.as_str())
        .context("the partner's first key has no alg")?;
    let alg = key_alg(alg)
        .with_context(|| format!("{}: partner `{partner_id}`", config_path.display()))?;
    let signer = PartnerKey::from_private_pem(kid, alg, &pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?;
    let base = url
        .unwrap_or_else(|| config.public_url_for(config.listen))
        .trim_end_matches('/')
        .to_owned();
    let token_url = format!("{base}/auth/token");
    let assertion = signer.sign_assertion(partner_id, &token_url);
    let scope = scope.unwrap_or_else(|| partner.scopes.join(" "));

    let mut client = reqwest::Client::builder();
    if let Some(ca) = ca_cert {
        let pem = std::fs::read(&ca).with_context(|| format!("cannot read {}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{} is not a PEM certificate", ca.display()))?;
        client = client.add_root_certificate(cert);
    }
    let client = client.build().context("cannot build the HTTPS client")?;
    let response = runtime()?.block_on(async {
        let response = client
            .post(&token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion.as_str()),
                ("scope", scope.as_str()),
            ])
            .send()
            .await
            .with_context(|| format!("cannot reach {token_url}"))?;
        let status = response.status();
        let body: serde_json::Value = response
            .json()
            .await
            .context("the token response is not JSON")?;
        anyhow::Ok((status, body))
    })?;
    let (status, body) = response;
    if !status.is_success() {
        bail!("token request refused ({status}): {body}");
    }
    if raw {
        println!(
            "{}",
            body.get("access_token")
                .and_then(|t| t.as_str())
                .unwrap_or_default()
        );
    } else {
        println!("{}", serde_json::to_string_pretty(&body)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn key_alg(name: &str) -> anyhow::Result<KeyAlg> {
    Ok(match name {
        "RS384" => KeyAlg::Rs384,
        "ES384" => KeyAlg::Es384,
        "ES256" => KeyAlg::Es256,
        other => bail!("key algorithm `{other}` is not supported here (use RS384, ES384 or ES256)"),
    })
}

#[allow(
    clippy::print_stdout,
    reason = "the written paths are the command's output"
)]
fn partner_key(partner: &str, alg: &str, out: &Path) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if partner.is_empty()
        || !partner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("--partner must be letters, digits, '-' or '_'");
    }
    let kid = format!("{partner}-{}", time::OffsetDateTime::now_utc().date());
    let key = match key_alg(alg)? {
        KeyAlg::Rs384 => PartnerKey::generate_rs384(&kid),
        KeyAlg::Es384 => PartnerKey::generate_es384(&kid),
        KeyAlg::Es256 => PartnerKey::generate_es256(&kid),
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let private = out.join(format!("{partner}.key.pem"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .with_context(|| {
            format!(
                "cannot create {} (it must not exist already)",
                private.display()
            )
        })?;
    file.write_all(key.private_pem().as_bytes())?;
    let public = out.join(format!("{partner}.jwks.json"));
    std::fs::write(
        &public,
        serde_json::to_string_pretty(&PartnerKey::jwks(&[&key]))?,
    )
    .with_context(|| format!("cannot write {}", public.display()))?;
    println!("private key: {}", private.display());
    println!("public JWKS: {}", public.display());
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stdout, reason = "the summary is the command's output")]
fn synth(
    config: caregate_testkit::synth::SynthConfig,
    out: &Path,
    format: &str,
) -> anyhow::Result<ExitCode> {
    use std::collections::HashMap;
    use std::io::{BufWriter, Write as _};

    use caregate_testkit::synth::{Summary, ndoo_list, records};

    config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let create = |path: &Path| -> anyhow::Result<BufWriter<std::fs::File>> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(BufWriter::new(file))
    };
    let mut summary = Summary::default();
    let mut files: HashMap<(&str, &str), BufWriter<std::fs::File>> = HashMap::new();
    let mut requests = if format == "requests" {
        Some(create(&out.join("requests.ndjson"))?)
    } else {
        None
    };
    for record in records(&config) {
        summary.add(&record);
        let writer = match requests.as_mut() {
            Some(writer) => {
                writer.write_all(record.request_line().as_bytes())?;
                writer.write_all(b"\n")?;
                continue;
            }
            None => match files.entry((record.partner_id, record.resource_type)) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => entry.insert(create(
                    &out.join(record.partner_id)
                        .join(format!("{}.ndjson", record.resource_type)),
                )?),
            },
        };
        writer.write_all(record.body.as_bytes())?;
        writer.write_all(b"\n")?;
    }
    for (_, mut writer) in files {
        writer.flush()?;
    }
    if let Some(mut writer) = requests {
        writer.flush()?;
    }
    let mut ndoo = create(&out.join("ndoo.txt"))?;
    let mut opted_out = 0usize;
    for nhs_number in ndoo_list(&config) {
        ndoo.write_all(nhs_number.as_bytes())?;
        ndoo.write_all(b"\n")?;
        opted_out += 1;
    }
    ndoo.flush()?;
    println!(
        "synthetic ICS day: seed {}, {} patients, {} on the NDOO list -> {}",
        config.seed,
        config.patients,
        opted_out,
        out.display()
    );
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}
