//! `caregate keys …` and `caregate feed …`: per-feed pseudonymisation keys (DOMAIN.md `PSEU-2`)
//! and offline exports and release reports of pseudonymised feeds (issue 5).
//!
//! The key file comes from `--key-file`, else the `CAREGATE_FEED_KEYS` environment variable, else
//! the config's `[feeds] key_file`. Secrets are never printed: `keys list` shows fingerprints.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use caregate_feeds::export::{
    ExportControl, ExportManifest, export_dir, latest_export, new_export_id, render_report,
    valid_export_id,
};
use caregate_feeds::runner::{ExportJob, Start};
use caregate_feeds::{DecisionFeedPolicy, FeedDefinition, KeyFile};
use caregate_gateway::config::Config;
use clap::{Args, Subcommand};
use time::format_description::well_known::Rfc3339;

/// Where the key file is.
#[derive(Debug, Args)]
pub(crate) struct KeyFileArgs {
    /// The feed key file (mode 0600). Overrides the config's `[feeds] key_file`.
    #[arg(long, env = "CAREGATE_FEED_KEYS")]
    key_file: Option<PathBuf>,
    /// The gateway's configuration file, for `[feeds] key_file`.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl KeyFileArgs {
    fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.key_file {
            return Ok(path.clone());
        }
        let Some(config) = &self.config else {
            bail!(
                "name the key file: --key-file, CAREGATE_FEED_KEYS, or --config with [feeds] key_file"
            );
        };
        let config = Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
        config
            .feeds
            .key_file
            .context("the configuration has no [feeds] key_file")
    }
}

/// Where a feed's exports are: `--config` (its `[feeds] export_dir`, else its data directory)
/// or `--data DIR` (the directory holding `feeds/`: the data directory or the export directory).
#[derive(Debug, Args)]
pub(crate) struct ExportsArgs {
    /// The directory holding `feeds/<feed>/<export-id>/`: the data directory, or `[feeds]
    /// export_dir` when the gateway sets one.
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    data: Option<PathBuf>,
    /// The gateway's configuration file: exports are read from its `[feeds] export_dir`, else
    /// its data directory.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl ExportsArgs {
    fn root(&self) -> anyhow::Result<PathBuf> {
        match (&self.data, &self.config) {
            (Some(data), _) => Ok(data.clone()),
            (None, Some(config)) => {
                let config = Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(export_root(&config))
            }
            (None, None) => bail!("name the exports: --config FILE or --data DIR"),
        }
    }
}

/// Where the gateway writes exports: `[feeds] export_dir`, else the data directory.
fn export_root(config: &Config) -> PathBuf {
    config
        .feeds
        .export_dir
        .clone()
        .unwrap_or_else(|| config.data_dir.clone())
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Create version 1 of a feed's key.
    New {
        feed: String,
        #[command(flatten)]
        file: KeyFileArgs,
    },
    /// List key versions (feed, version, created, fingerprint; never the secret).
    List {
        #[command(flatten)]
        file: KeyFileArgs,
    },
    /// Start a new key version: later exports use it (and say so in their manifest);
    /// pseudonyms under the new version do not link to the old ones.
    Rotate {
        feed: String,
        #[command(flatten)]
        file: KeyFileArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum FeedCommand {
    /// Print the release report of a feed's newest export (or of --export ID).
    Report {
        feed: String,
        #[command(flatten)]
        exports: ExportsArgs,
        #[arg(long)]
        export: Option<String>,
    },
    /// Publish a finished export (the newest, or --export ID) to NATS JetStream: one message per
    /// NDJSON line on `caregate.feed.<FEED>.<ResourceType>`, then the manifest, each acknowledged
    /// and deduplicated by message id (publishing again stores nothing twice).
    Publish {
        feed: String,
        #[command(flatten)]
        exports: ExportsArgs,
        /// The NATS server URL, e.g. nats://127.0.0.1:4222.
        #[arg(long)]
        nats: String,
        #[arg(long)]
        export: Option<String>,
    },
    /// Build an export of a feed from the committed log, offline (stop the gateway first).
    Export {
        feed: String,
        /// The gateway's configuration file (data directory, definitions, key file).
        #[arg(long, short)]
        config: PathBuf,
        /// Rebuild from the start of the retained log instead of continuing from the cursor.
        #[arg(long)]
        rebuild: bool,
        /// A National Data Opt-out list (one NHS number per line) re-checked at export time.
        #[arg(long)]
        opt_outs: Option<PathBuf>,
    },
}

#[allow(
    clippy::print_stdout,
    reason = "the listing and report are the command's output"
)]
pub(crate) fn keys(command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::New { feed, file } => {
            let path = file.path()?;
            let info = KeyFile::open(&path)?.create(&feed)?;
            println!(
                "created {} key version {} (fingerprint {}) in {}",
                info.feed,
                info.version,
                info.fingerprint,
                path.display()
            );
        }
        KeysCommand::Rotate { feed, file } => {
            let path = file.path()?;
            let info = KeyFile::open(&path)?.rotate(&feed)?;
            println!(
                "rotated {} to key version {} (fingerprint {}); the next export uses it",
                info.feed, info.version, info.fingerprint
            );
        }
        KeysCommand::List { file } => {
            let path = file.path()?;
            for row in KeyFile::open(&path)?.list() {
                println!(
                    "{:<40} v{:<4} {} {}{}",
                    row.feed,
                    row.version,
                    row.created.format(&Rfc3339).unwrap_or_default(),
                    row.fingerprint,
                    if row.current { "  current" } else { "" }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(
    clippy::print_stdout,
    reason = "the listing and report are the command's output"
)]
pub(crate) fn feed(command: FeedCommand) -> anyhow::Result<ExitCode> {
    match command {
        FeedCommand::Report {
            feed,
            exports,
            export,
        } => {
            let manifest = find_export(&exports.root()?, &feed, export.as_deref())?;
            print!("{}", render_report(&manifest));
            Ok(ExitCode::SUCCESS)
        }
        FeedCommand::Publish {
            feed,
            exports,
            nats,
            export,
        } => {
            let data = exports.root()?;
            let manifest = find_export(&data, &feed, export.as_deref())?;
            let directory = export_dir(&data, &feed, &manifest.export_id);
            let report = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?
                .block_on(async {
                    let sink = caregate_feeds::nats::NatsSink::connect(
                        &nats,
                        caregate_feeds::nats::SinkOptions::default(),
                    )
                    .await?;
                    sink.publish_export(&directory, &manifest).await
                })?;
            println!(
                "published export {} of {feed} (key version {}) to stream {}: {} messages stored, {} already there",
                manifest.export_id,
                manifest.key_version,
                report.stream,
                report.stored,
                report.duplicates
            );
            Ok(ExitCode::SUCCESS)
        }
        FeedCommand::Export {
            feed,
            config,
            rebuild,
            opt_outs,
        } => export(&feed, &config, rebuild, opt_outs.as_deref()),
    }
}

#[allow(
    clippy::print_stdout,
    reason = "the listing and report are the command's output"
)]
fn export(
    feed: &str,
    config: &Path,
    rebuild: bool,
    opt_outs: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let definitions = config
        .feeds
        .definitions
        .as_deref()
        .context("the configuration has no [feeds] definitions")?;
    let definition = FeedDefinition::load_dir(definitions)?
        .into_iter()
        .find(|d| d.id == feed)
        .with_context(|| format!("no definition for feed {feed}"))?;
    let key_path = KeyFileArgs {
        key_file: std::env::var_os("CAREGATE_FEED_KEYS").map(PathBuf::from),
        config: None,
    }
    .path()
    .or_else(|_| {
        config
            .feeds
            .key_file
            .clone()
            .context("no key file: set [feeds] key_file or CAREGATE_FEED_KEYS")
    })?;
    let key = KeyFile::open(&key_path)?.current(feed)?.clone();
    let mut policy = DecisionFeedPolicy::new();
    if let Some(path) = opt_outs {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        policy = policy.with_opt_outs(text.lines().map(str::to_owned));
    }
    if matches!(
        definition.opt_outs,
        caregate_feeds::definition::OptOuts::Exempt { .. }
    ) {
        policy = policy.with_exemption(feed);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let manifest = runtime.block_on(async {
        let store = caregate_store::sqlite::SqliteStore::open(
            &config.data_dir,
            caregate_store::sqlite::SqliteOptions::default(),
        )
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", config.data_dir.display()))?;
        let store: Arc<dyn caregate_store::Store> = Arc::new(store);
        let job = ExportJob {
            definition: Arc::new(definition),
            key,
            // Beside the gateway's exports, where `feed report --config` looks.
            data_dir: export_root(&config),
            export_id: new_export_id(),
            types: None,
            since: None,
            start: if rebuild {
                Start::Rebuild
            } else {
                Start::Incremental
            },
            transaction_time: time::OffsetDateTime::now_utc(),
        };
        caregate_feeds::runner::run(
            store,
            Arc::new(policy),
            job,
            Arc::new(ExportControl::default()),
        )
        .await
        .map_err(anyhow::Error::from)
    })?;
    println!(
        "{}",
        export_dir(&export_root(&config), feed, &manifest.export_id).display()
    );
    print!("{}", render_report(&manifest));
    Ok(ExitCode::SUCCESS)
}

/// A feed's complete export: `export` by id, or the newest.
fn find_export(data: &Path, feed: &str, export: Option<&str>) -> anyhow::Result<ExportManifest> {
    match export {
        Some(id) if valid_export_id(id) => ExportManifest::load(&export_dir(data, feed, id))
            .with_context(|| format!("no complete export {id} of {feed}")),
        Some(_) => bail!("an export id is 32 hexadecimal digits"),
        None => latest_export(data, feed)?
            .with_context(|| format!("{feed} has no complete export in {}", data.display())),
    }
}
