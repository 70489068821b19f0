//! `caregate db migrate --config FILE` and the PostgreSQL side of `caregate audit verify
//! --config FILE` (issue 8: several gateway instances on one PostgreSQL database).
//!
//! The database URL comes from the config's `[store.postgres]` (`url` or `url_file`) and is never
//! printed: it may carry a password.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use caregate_audit::{CheckpointSigner, CheckpointVerifier};
use caregate_gateway::config::{Config, PostgresSettings, StoreSettings};
use caregate_gateway::runtime::{AUDIT_PUBLIC_KEY_FILE, instance_log_id};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum DbCommand {
    /// Apply pending schema migrations to the PostgreSQL database named by the config's
    /// `[store.postgres]` (a deploy step before rolling out a new version; instances also apply
    /// them at start, under a lock).
    Migrate {
        #[arg(long)]
        config: std::path::PathBuf,
    },
}

pub(crate) fn run(command: DbCommand) -> anyhow::Result<ExitCode> {
    match command {
        DbCommand::Migrate { config } => migrate(&config),
    }
}

fn postgres_settings(config: &Config) -> anyhow::Result<&PostgresSettings> {
    match &config.store {
        StoreSettings::Postgres(pg) => Ok(pg),
        StoreSettings::Sqlite => bail!(
            "{}: store.backend is \"sqlite\"; this command needs store.backend = \"postgres\"",
            config.path.display()
        ),
    }
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    Ok(runtime.block_on(future))
}

#[allow(
    clippy::print_stdout,
    reason = "the schema version is the command's output"
)]
fn migrate(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let pg = postgres_settings(&config)?;
    let url = pg.url().map_err(anyhow::Error::msg)?;
    let tls = pg.tls().map_err(anyhow::Error::msg)?;
    let version = block_on(caregate_store::postgres::migrate(url.expose(), &tls))?
        .context("migration failed")?;
    println!("schema version {version}: up to date");
    Ok(ExitCode::SUCCESS)
}

/// The public key checkpoints are verified with: `--public-key` (`LOG_ID BASE64`; only the key
/// is used), else the one of the configured `audit.signing_key`, else this instance's
/// `audit-public-key.txt` (dev mode: each instance has its own key, so only instances sharing
/// it verify).
fn public_key(config: &Config, given: Option<&str>) -> anyhow::Result<String> {
    if let Some(text) = given {
        let mut parts = text.split_whitespace();
        let (Some(_log_id), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
            bail!("the public key must be given as `LOG_ID BASE64`");
        };
        return Ok(key.to_owned());
    }
    if let Some(path) = &config.audit.signing_key {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read audit.signing_key {}", path.display()))?;
        let signer = CheckpointSigner::from_pkcs8_pem(config.audit.log_id.clone(), &pem)
            .map_err(|e| anyhow::anyhow!("audit.signing_key {}: {e}", path.display()))?;
        return Ok(signer.public_key_base64());
    }
    let path = config.data_dir.join(AUDIT_PUBLIC_KEY_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (or pass --public-key)", path.display()))?;
    match text.split_whitespace().nth(1) {
        Some(key) => Ok(key.to_owned()),
        None => bail!("{}: expected `LOG_ID BASE64`", path.display()),
    }
}

/// `caregate audit verify --config FILE`: the store the config names — the SQLite data
/// directory, or every instance's chain in the PostgreSQL database.
pub(crate) fn verify_configured(
    config_path: &Path,
    given_key: Option<&str>,
    from: &[std::path::PathBuf],
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    match &config.store {
        StoreSettings::Sqlite => crate::audit_cli::verify(&config.data_dir, given_key, from),
        StoreSettings::Postgres(_) if !from.is_empty() => {
            bail!("--from (witness checkpoints) is not supported for the PostgreSQL store yet")
        }
        StoreSettings::Postgres(_) => verify_cluster(&config, given_key),
    }
}

/// Verify every instance's audit chain in the cluster's database, each against its own log id
/// (`audit.log_id/<instance>`). Exits 1 if any chain fails.
#[allow(clippy::print_stdout, reason = "the report is the command's output")]
fn verify_cluster(config: &Config, given_key: Option<&str>) -> anyhow::Result<ExitCode> {
    let pg = postgres_settings(config)?;
    let url = pg.url().map_err(anyhow::Error::msg)?;
    let tls = pg.tls().map_err(anyhow::Error::msg)?;
    let key = public_key(config, given_key)?;
    let base = config.audit.log_id.clone();
    let results = block_on(async move {
        let mut results = Vec::new();
        for instance in caregate_store::postgres::audit_instances(url.expose(), &tls).await? {
            let verifier =
                CheckpointVerifier::from_public_key_base64(instance_log_id(&base, &instance), &key)
                    .map_err(|e| anyhow::anyhow!("public key: {e}"))?;
            results.push(
                caregate_store::postgres::verify_instance(
                    url.expose(),
                    &tls,
                    &instance,
                    &verifier,
                    &[],
                )
                .await?,
            );
        }
        anyhow::Ok(results)
    })??;
    if results.is_empty() {
        println!("no instance has written audit events yet");
    }
    let mut ok = true;
    for instance in &results {
        let report = &instance.verification.report;
        println!("instance:     {}", instance.instance_id);
        println!("  events:     {}", report.events);
        println!(
            "  tree size:  {} (root {})",
            report.tree_size,
            report.root.to_hex()
        );
        println!(
            "  checkpoints: {} matched of {} given; events 1..={} attested",
            report.checkpoints_matched, report.checkpoints_given, report.attested_size
        );
        for finding in &report.findings {
            println!("  FINDING:    {finding}");
        }
        if report.findings_total > report.findings.len() as u64 {
            println!(
                "  FINDING:    … and {} more",
                report.findings_total - report.findings.len() as u64
            );
        }
        for seq in &instance.verification.column_mismatches {
            println!("  FINDING:    event {seq}: a query column differs from the signed event");
        }
        if instance.is_ok() {
            println!("  result:     VERIFIED");
        } else {
            ok = false;
            if let Some(seq) = instance.first_bad_seq {
                println!("  first bad:  event {seq} (global seq)");
            }
            println!("  result:     FAILED — the audit log was altered");
        }
    }
    if ok {
        println!("result:       VERIFIED ({} instances)", results.len());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("result:       FAILED");
        Ok(ExitCode::from(1))
    }
}
