//! `caregate audit …`: offline checks an IG officer runs on a data directory (or a copy of one).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use caregate_audit::verify::Finding;
use caregate_audit::{CheckpointVerifier, SignedCheckpoint};
use caregate_gateway::runtime::AUDIT_PUBLIC_KEY_FILE;
use caregate_store::sqlite::verify_audit;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Verify the audit log offline: recompute the RFC 9162 Merkle tree over every event, check
    /// each recorded leaf, every signed checkpoint and the query columns. Exits 1 if anything was
    /// altered, 0 if the log verifies.
    Verify {
        /// The data directory (or a copy of it).
        #[arg(long)]
        data: PathBuf,
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
}

pub(crate) fn run(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify {
            data,
            public_key,
            from,
        } => verify(&data, public_key.as_deref(), &from),
        AuditCommand::Checkpoint { data } => checkpoint(&data),
    }
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

#[allow(clippy::print_stdout, reason = "the report is the command's output")]
fn verify(data: &Path, public_key: Option<&str>, from: &[PathBuf]) -> anyhow::Result<ExitCode> {
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
