//! `caregate policy …` and `caregate consent …`: what an IG officer runs to check, test and read
//! the consent/IG policy bundle, and how an operator installs a new National Data Opt-out list.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use caregate_fhir::validate::{Validated, ValidatorConfig};
use caregate_fhir::{ResourceType, Validator};
use caregate_gateway::config::Config;
use caregate_policy::{
    ConsentRegistry, PartnerId, PolicyBundle, RecordFacts, decide, explain, run_policy_tests,
};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Load and validate the bundle (Cedar schema and policies, ICS model, agreements, code
    /// lists); prints its version. Exits 1 with file, line and message if anything is wrong.
    Check {
        /// The bundle directory.
        #[arg(long, default_value = "policies")]
        dir: PathBuf,
    },
    /// Run the table-driven policy tests; prints a pass/fail table ending in `N passed, M failed`.
    Test {
        /// The test directory (default: `<dir>/tests`).
        tests: Option<PathBuf>,
        #[arg(long, default_value = "policies")]
        dir: PathBuf,
    },
    /// Decide on one FHIR record as if `--partner` submitted it now, and explain every rule that
    /// fired, in words. Consent state: only what the record itself says (no registry).
    Explain {
        /// The record (FHIR JSON).
        record: PathBuf,
        /// The submitting partner's id.
        #[arg(long)]
        partner: String,
        #[arg(long, default_value = "policies")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConsentCommand {
    /// Check a cleaned National Data Opt-out list (one NHS number per line, as the national service
    /// returns it) and install it as the configured `[policy] ndoo_list`, atomically. The running
    /// gateway takes it on SIGHUP.
    LoadNdoo {
        /// The list received from the national service.
        file: PathBuf,
        /// The gateway's configuration (names the installed list's path).
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn load(dir: &Path) -> anyhow::Result<PolicyBundle> {
    PolicyBundle::load(dir).map_err(|e| anyhow::anyhow!("{e}"))
}

#[allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "reports are the commands' output"
)]
pub(crate) fn run_policy(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check { dir } => {
            let bundle = match load(&dir) {
                Ok(bundle) => bundle,
                Err(error) => {
                    eprintln!("caregate: {error}");
                    return Ok(ExitCode::from(1));
                }
            };
            println!(
                "{}: valid — {} partners, {} agreements, {} feeds, {} sensitive code lists, {} rule ids",
                dir.display(),
                bundle.partners().len(),
                bundle.agreements().len(),
                bundle.feeds().len(),
                bundle.code_lists().len(),
                bundle.rule_ids().len()
            );
            println!("version: {}", bundle.version());
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Test { tests, dir } => {
            let bundle = load(&dir)?;
            let tests = tests.unwrap_or_else(|| dir.join("tests"));
            let report = run_policy_tests(&tests, &bundle);
            print!("{}", report.table());
            Ok(if report.failed() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        PolicyCommand::Explain {
            record,
            partner,
            dir,
        } => {
            let bundle = load(&dir)?;
            let id = PartnerId::parse(&partner)
                .map_err(|_| anyhow::anyhow!("--partner: not a partner id"))?;
            let submitter = bundle
                .partner(&id)
                .with_context(|| {
                    format!(
                        "--partner: `{partner}` is not in {}/ics.toml",
                        dir.display()
                    )
                })?
                .reference();
            let bytes = std::fs::read(&record)
                .with_context(|| format!("cannot read {}", record.display()))?;
            let validator = Validator::new(ValidatorConfig::default())?;
            let resource = match validator.validate_bytes(&bytes, None) {
                Ok(Validated::Resource(resource)) => resource,
                Ok(Validated::Bundle(caregate_fhir::bundle::ValidatedBundle::Stored {
                    resource,
                    ..
                })) => resource,
                Ok(Validated::Bundle(_)) => bail!(
                    "{}: a transaction or batch Bundle is decided entry by entry; explain one entry",
                    record.display()
                ),
                Err(rejection) => bail!(
                    "{}: not a valid record: {}",
                    record.display(),
                    serde_json::to_string_pretty(&rejection.outcome.to_json())?
                ),
            };
            let facts = RecordFacts::from_resource(&resource, &submitter);
            let mut consent = ConsentRegistry::new(time::Duration::days(28));
            consent.observe(&facts);
            if resource.resource_type() == ResourceType::Consent {
                let _ = consent.record_consent(&resource, &submitter.id);
            }
            let decision = decide(
                &facts,
                &consent.view(facts.nhs_number()),
                &bundle,
                time::OffsetDateTime::now_utc(),
            );
            print!("{}", explain(&decision));
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[allow(clippy::print_stdout, reason = "the result is the command's output")]
pub(crate) fn run_consent(command: ConsentCommand) -> anyhow::Result<ExitCode> {
    match command {
        ConsentCommand::LoadNdoo { file, config } => {
            let config = Config::load(&config)?;
            let target = config
                .policy
                .as_ref()
                .and_then(|p| p.ndoo_list.clone())
                .context("the configuration has no [policy] ndoo_list to install the list as")?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            // The same parser the gateway uses: one bad line refuses the whole file (NDOO-5, NDOO-6).
            let mut check = ConsentRegistry::new(time::Duration::days(28));
            let load = check
                .load_ndoo(&text, time::OffsetDateTime::now_utc())
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let staging = target.with_extension("incoming");
            std::fs::write(&staging, &text)
                .with_context(|| format!("cannot write {}", staging.display()))?;
            std::fs::rename(&staging, &target)
                .with_context(|| format!("cannot install {}", target.display()))?;
            println!(
                "installed {} NHS numbers as {}",
                load.entries,
                target.display()
            );
            println!("send SIGHUP to the gateway to apply it (kill -HUP <pid>)");
            Ok(ExitCode::SUCCESS)
        }
    }
}
