//! `caregate deliveries …`: operators' view of delivery to partners (issue 4), on a data directory.
//!
//! `status` and `dead-letters` only read. `replay` writes (and audits) through its own store
//! writer, so it runs only with the gateway stopped: it takes the data directory's lock
//! (`caregate_gateway::runtime::lock_data_dir`, the one a running gateway holds) and refuses while
//! a gateway holds it, pointing at the admin API (`POST /admin/deliveries/replay`), which goes
//! through the gateway's own writer — two processes appending to one audit chain would each hold
//! a stale view of the Merkle tree.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use caregate_deliver::operations;
use caregate_store::delivery::ReplaySelector;
use caregate_store::sqlite::{SqliteOptions, SqliteStore};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum DeliveriesCommand {
    /// Queue depth, age of the oldest undelivered record, and last failure per destination.
    Status {
        /// The data directory.
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// Only this partner.
        #[arg(long)]
        partner: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List dead letters (records a partner rejected for good, or too old to send), oldest first.
    DeadLetters {
        #[arg(long, default_value = "data")]
        data: PathBuf,
        #[arg(long)]
        partner: Option<String>,
        /// Continue after this dead-letter id.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back in the queue: one by id, or all of a partner's. Audited. Refused
    /// while a gateway runs on the data directory: use the admin API
    /// (`POST /admin/deliveries/replay`) then.
    Replay {
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// The dead letter's id (from `dead-letters`).
        #[arg(conflicts_with = "partner", required_unless_present = "partner")]
        id: Option<i64>,
        /// Every dead letter of this partner.
        #[arg(long)]
        partner: Option<String>,
    },
}

pub(crate) fn run(command: DeliveriesCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match command {
            DeliveriesCommand::Status {
                data,
                partner,
                json,
            } => status(&data, partner.as_deref(), json).await,
            DeliveriesCommand::DeadLetters {
                data,
                partner,
                after,
                limit,
                json,
            } => dead_letters(&data, partner.as_deref(), after, limit, json).await,
            DeliveriesCommand::Replay { data, id, partner } => {
                let selector = match (id, partner) {
                    (Some(id), None) => ReplaySelector::One(id),
                    (None, Some(partner)) => ReplaySelector::Partner(partner),
                    _ => bail!("give a dead-letter id or --partner"),
                };
                replay(&data, selector).await
            }
        }
    })
}

fn open(data: &Path) -> anyhow::Result<SqliteStore> {
    if !data.join(caregate_store::sqlite::DATABASE_FILE).exists() {
        bail!("no caregate database in {}", data.display());
    }
    SqliteStore::open(data, SqliteOptions::default())
        .with_context(|| format!("cannot open the store in {}", data.display()))
}

#[allow(clippy::print_stdout, reason = "the report is the command's output")]
async fn status(data: &Path, partner: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let store = open(data)?;
    let report = operations::status(&store, partner).await?;
    store.close().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    if report.is_empty() {
        println!("no deliveries");
    }
    for destination in &report {
        let status = &destination.status;
        println!(
            "{}: pending {}, delivered {}, dead letters {}, withheld {}",
            status.partner, status.pending, status.delivered, status.dead, status.withheld
        );
        if let Some(age) = destination.oldest_pending_age_secs {
            println!("  oldest undelivered: {age} s");
        }
        if let Some(failure) = &status.last_failure {
            let status = failure
                .status
                .map_or_else(|| "-".to_owned(), |status| status.to_string());
            println!(
                "  last failure: {} status {status}: {}",
                failure.at, failure.error
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stdout, reason = "the listing is the command's output")]
async fn dead_letters(
    data: &Path,
    partner: Option<&str>,
    after: i64,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let store = open(data)?;
    let letters = operations::dead_letters(&store, partner, after, limit).await?;
    store.close().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&letters)?);
        return Ok(ExitCode::SUCCESS);
    }
    if letters.is_empty() {
        println!("no dead letters");
    }
    for letter in &letters {
        let status = letter
            .status
            .map_or_else(|| "-".to_owned(), |status| status.to_string());
        println!(
            "{} partner {} {} (log seq {}), {} attempts, status {status}, dead since {}: {}",
            letter.id,
            letter.partner,
            letter.resource_type,
            letter.seq,
            letter.attempts,
            letter.dead_at,
            letter.error
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stdout, reason = "the count is the command's output")]
async fn replay(data: &Path, selector: ReplaySelector) -> anyhow::Result<ExitCode> {
    if !data.join(caregate_store::sqlite::DATABASE_FILE).exists() {
        bail!("no caregate database in {}", data.display());
    }
    // Held until the replay is written and the store closed: a gateway starting meanwhile waits
    // for nothing and refuses to start, rather than sharing the audit chain.
    let _lock = match caregate_gateway::runtime::lock_data_dir(data) {
        Ok(lock) => lock,
        Err(caregate_gateway::runtime::LockError::InUse { holder, .. }) => {
            let body = match &selector {
                ReplaySelector::One(id) => format!("{{\"id\": {id}}}"),
                ReplaySelector::Partner(partner) => format!("{{\"partner\": \"{partner}\"}}"),
            };
            bail!(
                "{} is in use by a running gateway{holder}; nothing was replayed. \
                 Replay through its admin API instead: POST /admin/deliveries/replay with {body} \
                 on the admin listener ([admin] listen), as a signed-in IG officer or with the token \
                 of a partner with the ig-officer role",
                data.display()
            );
        }
        Err(error) => {
            return Err(error).context("cannot make sure no gateway is using the data directory");
        }
    };
    let store = open(data)?;
    let request_id = uuid::Uuid::new_v4().to_string();
    let operator = std::env::var("USER").unwrap_or_else(|_| "cli".to_owned());
    let replayed = operations::replay(&store, selector, &request_id, &operator).await?;
    store.close().await?;
    println!("{replayed} dead letters queued again");
    Ok(if replayed == 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
