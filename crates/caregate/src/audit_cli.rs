//! `caregate audit …`: what an IG officer runs on a data directory (or a copy of one): verify the
//! tamper evidence, export a checkpoint, search the log, and build a subject-access report
//! (DOMAIN.md `IGQ`). Reads open the database read-only, so they are safe beside a running
//! gateway (WAL). Also `caregate ig-password`, which hashes an officer's password for the config.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use caregate_audit::report::{SarBuilder, is_break_glass};
use caregate_audit::verify::Finding;
use caregate_audit::{Action, Outcome, export};
use caregate_audit::{CheckpointVerifier, SignedCheckpoint};
use caregate_fhir::nhs_number::{NhsNumber, NhsNumberPolicy};
use caregate_gateway::runtime::AUDIT_PUBLIC_KEY_FILE;
use caregate_store::sqlite::{AuditReader, verify_audit};
use caregate_store::{AuditQuery, StoredAuditEvent};
use clap::{Subcommand, ValueEnum};
use std::io::Write as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Verify the audit log offline: recompute the RFC 9162 Merkle tree over every event, check
    /// each recorded leaf, every signed checkpoint and the query columns. Exits 1 if anything was
    /// altered, 0 if the log verifies.
    Verify {
        /// The data directory (or a copy of it).
        #[arg(long, required_unless_present = "config", conflicts_with = "config")]
        data: Option<PathBuf>,
        /// With `store.backend = "postgres"`: verify every instance's chain in the database the
        /// config names (each under its log id `audit.log_id/<instance>`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The log's public key as `LOG_ID BASE64` (default: the data directory's
        /// audit-public-key.txt — pass the key from elsewhere when the directory is not trusted).
        #[arg(long)]
        public_key: Option<String>,
        /// Checkpoints held by a witness (signed-note files); the log must match each of them.
        #[arg(long = "from", value_name = "CHECKPOINT")]
        from: Vec<PathBuf>,
    },
    /// Print the newest signed checkpoint, to hand to another organisation as a witness.
    Checkpoint {
        #[arg(long)]
        data: PathBuf,
    },
    /// Search the audit log: every filter is optional and they combine; oldest first.
    Search {
        /// The data directory (or a copy of it).
        #[arg(long)]
        data: PathBuf,
        /// The patient's NHS number.
        #[arg(long)]
        patient: Option<String>,
        /// The acting partner's id.
        #[arg(long)]
        partner: Option<String>,
        /// Recorded at or after (YYYY-MM-DD or RFC 3339, UTC).
        #[arg(long)]
        from: Option<String>,
        /// Recorded before (RFC 3339), or on or before the day (YYYY-MM-DD).
        #[arg(long)]
        to: Option<String>,
        /// create, read, update, bundle-submit, token-request, metadata, request, review,
        /// audit-query or export.
        #[arg(long)]
        action: Option<String>,
        /// success, rejected or failed.
        #[arg(long)]
        outcome: Option<String>,
        /// Only break-glass accesses (purpose of use ETREAT or BTG).
        #[arg(long)]
        break_glass: bool,
        #[arg(long, value_enum, default_value_t = SearchFormat::Table)]
        format: SearchFormat,
    },
    /// The subject-access report for one patient: who sent, received or viewed their records,
    /// when and why (UK GDPR Art 15(1)(c)).
    Sar {
        #[arg(long)]
        data: PathBuf,
        /// The patient's NHS number.
        #[arg(long)]
        patient: String,
        #[arg(long, value_enum, default_value_t = SarFormat::Text)]
        format: SarFormat,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SearchFormat {
    Table,
    Csv,
    Ndjson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SarFormat {
    Text,
    Json,
    Csv,
    Ndjson,
}

pub(crate) fn run(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify {
            data,
            config,
            public_key,
            from,
        } => match (data, config) {
            (_, Some(config)) => {
                crate::db_cli::verify_configured(&config, public_key.as_deref(), &from)
            }
            (Some(data), None) => verify(&data, public_key.as_deref(), &from),
            (None, None) => bail!("pass --data DIR or --config FILE"),
        },
        AuditCommand::Checkpoint { data } => checkpoint(&data),
        AuditCommand::Search {
            data,
            patient,
            partner,
            from,
            to,
            action,
            outcome,
            break_glass,
            format,
        } => {
            let query = AuditQuery {
                patient: patient.as_deref().map(parse_patient).transpose()?,
                partner,
                from: from
                    .as_deref()
                    .map(|t| parse_instant("--from", t, false))
                    .transpose()?,
                to: to
                    .as_deref()
                    .map(|t| parse_instant("--to", t, true))
                    .transpose()?,
                action: action
                    .as_deref()
                    .map(|a| parse_name::<Action>("--action", a))
                    .transpose()?,
                outcome: outcome
                    .as_deref()
                    .map(|o| parse_name::<Outcome>("--outcome", o))
                    .transpose()?,
                break_glass_only: break_glass,
                ..AuditQuery::default()
            };
            search(&data, query, format)
        }
        AuditCommand::Sar {
            data,
            patient,
            format,
        } => sar(&data, &parse_patient(&patient)?, format),
    }
}

/// A valid NHS number (spaces allowed), or a clear refusal that does not echo the input.
fn parse_patient(text: &str) -> anyhow::Result<String> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    NhsNumber::parse(&compact, &NhsNumberPolicy::default())
        .map(|number| number.as_str().to_owned())
        .map_err(|e| anyhow::anyhow!("--patient is not a valid NHS number: {e}"))
}

/// `YYYY-MM-DD` (a whole UTC day; as `--to` the day is included) or RFC 3339.
fn parse_instant(name: &str, text: &str, end_of_day: bool) -> anyhow::Result<OffsetDateTime> {
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(at);
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(text, format)
        .map_err(|_| anyhow::anyhow!("{name}: expected YYYY-MM-DD or an RFC 3339 date-time"))?;
    let day = if end_of_day {
        date.next_day().context("date out of range")?
    } else {
        date
    };
    Ok(day.midnight().assume_utc())
}

fn parse_name<T: serde::de::DeserializeOwned>(name: &str, text: &str) -> anyhow::Result<T> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| anyhow::anyhow!("{name}: `{text}` is not a known value"))
}

/// Walk every page of `query`, oldest first (one page in memory at a time).
fn for_each_event(
    reader: &AuditReader,
    mut query: AuditQuery,
    mut visit: impl FnMut(&StoredAuditEvent) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    query.limit = AuditQuery::MAX_LIMIT;
    loop {
        let page = reader.query(&query)?;
        for stored in &page.events {
            visit(stored)?;
        }
        match page.next {
            Some(next) => query.after_seq = Some(next),
            None => return Ok(()),
        }
    }
}

fn seq_u64(stored: &StoredAuditEvent) -> u64 {
    u64::try_from(stored.seq).unwrap_or(0)
}

fn table_row(stored: &StoredAuditEvent) -> String {
    let event = &stored.event;
    let who = event
        .actor
        .partner_id
        .as_deref()
        .or(event.actor.client_id.as_deref())
        .unwrap_or("-");
    let record = event
        .entity
        .as_ref()
        .map(|e| format!("{}/{}", e.resource_type, e.id))
        .unwrap_or_else(|| "-".to_owned());
    let purpose = match (&event.purpose_of_use, is_break_glass(event)) {
        (Some(p), true) => format!("{p}!"),
        (Some(p), false) => p.clone(),
        (None, _) => "-".to_owned(),
    };
    format!(
        "{:>8}  {:<27}  {:<20}  {:<13}  {:<8}  {:<30}  {:<10}  {}",
        stored.seq,
        event.recorded.format(&Rfc3339).unwrap_or_default(),
        who,
        serde_name(&event.action),
        serde_name(&event.outcome),
        record,
        event.patient.as_deref().unwrap_or("-"),
        purpose
    )
}

/// The serde name of an audit enum value (`bundle-submit`), for the table.
fn serde_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "?".to_owned(),
    }
}

fn write_events(
    reader: &AuditReader,
    query: AuditQuery,
    format: SearchFormat,
    log_id: &str,
) -> anyhow::Result<u64> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut count = 0u64;
    match format {
        SearchFormat::Table => writeln!(
            out,
            "{:>8}  {:<27}  {:<20}  {:<13}  {:<8}  {:<30}  {:<10}  PURPOSE (! = break-glass)",
            "SEQ", "RECORDED", "WHO", "ACTION", "OUTCOME", "RECORD", "PATIENT"
        )?,
        SearchFormat::Csv => out.write_all(export::csv_header().as_bytes())?,
        SearchFormat::Ndjson => {}
    }
    for_each_event(reader, query, |stored| {
        count += 1;
        match format {
            SearchFormat::Table => writeln!(out, "{}", table_row(stored))?,
            SearchFormat::Csv => {
                out.write_all(export::csv_row(seq_u64(stored), &stored.event)?.as_bytes())?
            }
            SearchFormat::Ndjson => out.write_all(
                export::ndjson_line(seq_u64(stored), &stored.event, log_id)?.as_bytes(),
            )?,
        }
        Ok(())
    })?;
    out.flush()?;
    Ok(count)
}

/// The log id named in the data directory's public key file (the FHIR export's observer).
fn log_id(data: &Path) -> String {
    std::fs::read_to_string(data.join(AUDIT_PUBLIC_KEY_FILE))
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "caregate".to_owned())
}

fn search(data: &Path, query: AuditQuery, format: SearchFormat) -> anyhow::Result<ExitCode> {
    let reader = AuditReader::open(data)?;
    let count = write_events(&reader, query, format, &log_id(data))?;
    if format == SearchFormat::Table {
        eprintln!("{count} events");
    }
    Ok(ExitCode::SUCCESS)
}

fn sar(data: &Path, patient: &str, format: SarFormat) -> anyhow::Result<ExitCode> {
    let reader = AuditReader::open(data)?;
    let query = AuditQuery {
        patient: Some(patient.to_owned()),
        ..AuditQuery::default()
    };
    match format {
        SarFormat::Csv => {
            write_events(&reader, query, SearchFormat::Csv, &log_id(data))?;
        }
        SarFormat::Ndjson => {
            write_events(&reader, query, SearchFormat::Ndjson, &log_id(data))?;
        }
        SarFormat::Text | SarFormat::Json => {
            let mut builder = SarBuilder::new(patient, OffsetDateTime::now_utc());
            for_each_event(&reader, query, |stored| {
                builder.push(seq_u64(stored), &stored.event);
                Ok(())
            })?;
            let report = builder.finish();
            let text = if format == SarFormat::Text {
                report.to_text()
            } else {
                let mut json = serde_json::to_string_pretty(&report)?;
                json.push('\n');
                json
            };
            std::io::stdout().lock().write_all(text.as_bytes())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `caregate ig-password`: read a password from standard input (one line) and print its Argon2id
/// PHC string (RFC 9106 parameters as the argon2 crate's defaults: m=19 MiB, t=2, p=1).
pub(crate) fn ig_password() -> anyhow::Result<ExitCode> {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    use aws_lc_rs::rand::SecureRandom as _;
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.chars().count() < 12 {
        bail!("the password must be at least 12 characters");
    }
    if password.len() > 1024 {
        bail!("the password must be at most 1024 bytes");
    }
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| anyhow::anyhow!("no randomness available for the salt"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    let hash = argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
    std::io::stdout()
        .lock()
        .write_all(format!("{hash}\n").as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn verifier(data: &Path, public_key: Option<&str>) -> anyhow::Result<CheckpointVerifier> {
    let text = match public_key {
        Some(text) => text.to_owned(),
        None => {
            let path = data.join(AUDIT_PUBLIC_KEY_FILE);
            std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {} (or pass --public-key)", path.display()))?
        }
    };
    let mut parts = text.split_whitespace();
    let (Some(log_id), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
        bail!("the public key must be given as `LOG_ID BASE64`");
    };
    CheckpointVerifier::from_public_key_base64(log_id, key)
        .map_err(|e| anyhow::anyhow!("public key: {e}"))
}

/// Verify the audit log in `data` with its own public key, for reports: whether it held, and a
/// one-line summary (events, checkpoints, or the first bad sequence number).
pub(crate) fn verify_quiet(data: &Path) -> anyhow::Result<(bool, String)> {
    let verifier = verifier(data, None)?;
    let result = verify_audit(data, &verifier, &[])?;
    let report = &result.report;
    let summary = if result.is_ok() {
        format!(
            "chain intact: {} events, root {}, {} signed checkpoints matched, events 1..={} attested",
            report.events,
            report.root.to_hex(),
            report.checkpoints_matched,
            report.attested_size
        )
    } else {
        format!(
            "{} findings; first bad sequence number {:?}; {} column mismatches",
            report.findings_total, report.first_bad_seq, result.column_mismatches_total
        )
    };
    Ok((result.is_ok(), summary))
}

#[allow(clippy::print_stdout, reason = "the report is the command's output")]
pub(crate) fn verify(
    data: &Path,
    public_key: Option<&str>,
    from: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let verifier = verifier(data, public_key)?;
    let mut witnessed = Vec::with_capacity(from.len());
    for path in from {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        witnessed.push(
            SignedCheckpoint::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        );
    }
    let result = verify_audit(data, &verifier, &witnessed)?;
    let report = &result.report;
    println!("audit log:    {}", data.display());
    println!("events:       {}", report.events);
    println!(
        "tree size:    {} (root {})",
        report.tree_size,
        report.root.to_hex()
    );
    println!(
        "checkpoints:  {} matched of {} given",
        report.checkpoints_matched, report.checkpoints_given
    );
    println!(
        "attested:     events 1..={} are proven by a signed checkpoint",
        report.attested_size
    );
    if report.unattested_events() > 0 {
        println!(
            "unattested:   {} newer events (covered by the next checkpoint)",
            report.unattested_events()
        );
    }
    for finding in &report.findings {
        println!("FINDING:      {}", describe(finding));
    }
    if report.findings_total > report.findings.len() as u64 {
        println!(
            "FINDING:      … and {} more",
            report.findings_total - report.findings.len() as u64
        );
    }
    for seq in &result.column_mismatches {
        println!("FINDING:      event {seq}: a query column differs from the signed event");
    }
    if result.is_ok() {
        println!("result:       VERIFIED");
        Ok(ExitCode::SUCCESS)
    } else {
        if let Some(seq) = report.first_bad_seq {
            println!("first bad:    event {seq}");
        }
        println!("result:       FAILED — the audit log was altered");
        Ok(ExitCode::from(1))
    }
}

fn describe(finding: &Finding) -> String {
    finding.to_string()
}

#[allow(
    clippy::print_stdout,
    reason = "the checkpoint is the command's output"
)]
fn checkpoint(data: &Path) -> anyhow::Result<ExitCode> {
    match caregate_store::sqlite::latest_audit_checkpoint(data)? {
        Some(text) => {
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        None => bail!("{}: no checkpoint has been signed yet", data.display()),
    }
}
