//! Backfill and export: a feed is a reader of the committed log. One export streams the log from
//! a position (0 = rebuild from the start of the retained log) up to its transaction time, keeps
//! the current version of each resource the policy lets into the feed, transforms it, and writes
//! NDJSON per resource type under `<data_dir>/feeds/<feed>/<export-id>/`, then applies disclosure
//! control (DOMAIN.md `KANON`, `SDC-1`) and writes `manifest.json` last (its presence means the
//! export is complete).
//!
//! Memory is bounded by one page of the log plus one small entry per released patient (their
//! quasi-identifiers, for k-anonymity); resources go straight to disk. Two passes: the first
//! writes `<Type>.part` files (`<patient pseudonym>\t<json>` per line); once every class size is
//! known, the second drops suppressed patients' records, coarsens generalised Patients, and writes
//! the final files.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead as _, BufReader, BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use caregate_store::{LogEntry, Seq, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::definition::{FeedDefinition, OptOuts};
use crate::keys::FeedKey;
use crate::policy::FeedPolicy;
use crate::transform::{
    QuasiIdentifiers, RecordContext, Transformer, coarsen_patient, coarser_quasi_identifiers,
};

/// Log entries read per page.
const PAGE: usize = 500;

/// The manifest's file name inside an export directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The store reader name of a feed's cursor.
pub fn reader_name(feed: &str) -> String {
    format!("feed:{feed}")
}

/// Export ids are generated (UUID v4, 32 lowercase hex digits) and checked before any path is
/// built from one, so a request cannot name a file outside the export directory.
pub fn new_export_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Whether `id` is an export id this module could have generated.
pub fn valid_export_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The directory of one export.
pub fn export_dir(data_dir: &Path, feed: &str, export_id: &str) -> PathBuf {
    data_dir.join("feeds").join(feed).join(export_id)
}

/// The output file name of a resource type.
pub fn file_name(resource_type: &str, gzip: bool) -> String {
    if gzip {
        format!("{resource_type}.ndjson.gz")
    } else {
        format!("{resource_type}.ndjson")
    }
}

/// The synchronous view of the log an export reads (the gateway adapts its async `Store`).
pub trait LogSource {
    /// Entries with `seq > after`, oldest first, at most `limit`.
    fn read_log(&self, after: Seq, limit: usize) -> Result<Vec<LogEntry>, StoreError>;
    /// Whether `entry` is still the current version of its resource.
    fn is_current(&self, entry: &LogEntry) -> Result<bool, StoreError>;
}

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportRequest<'a> {
    pub definition: &'a FeedDefinition,
    pub key: &'a FeedKey,
    pub export_id: String,
    /// `_type`: only these resource types (`None`: every type the feed carries).
    pub types: Option<BTreeSet<String>>,
    /// `_since`: only resources committed at or after this instant.
    pub since: Option<OffsetDateTime>,
    /// Start after this log position (0 = rebuild from the start of the retained log).
    pub after_seq: Seq,
    /// Entries committed after this instant are left for the next export.
    pub transaction_time: OffsetDateTime,
    /// The export directory (created; must not exist yet).
    pub directory: PathBuf,
}

/// Shared with whoever polls the export: progress, and a cancel switch.
#[derive(Debug, Default)]
pub struct ExportControl {
    cancelled: AtomicBool,
    scanned: AtomicU64,
    written: AtomicU64,
}

impl ExportControl {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Log entries read so far.
    pub fn scanned(&self) -> u64 {
        self.scanned.load(Ordering::Relaxed)
    }

    /// Records written to the first pass so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("reading the log: {0}")]
    Store(#[from] StoreError),
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("the export was cancelled")]
    Cancelled,
}

/// One output file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportFile {
    pub resource_type: String,
    pub file_name: String,
    pub count: u64,
}

/// The release report (DOMAIN.md `KANON`, `SDC-1`): what was released and what disclosure
/// control did. It holds counts and class-size histograms only, never a quasi-identifier value,
/// so it can travel with the data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseReport {
    /// The configured k.
    pub k: u32,
    /// The quasi-identifiers equivalence classes are formed on.
    pub quasi_identifiers: Vec<String>,
    /// Rows released per resource type.
    pub rows: BTreeMap<String, u64>,
    /// Patients released.
    pub patients: u64,
    /// Number of equivalence classes released.
    pub equivalence_classes: u64,
    /// Class size → number of classes of that size (released classes only).
    pub class_sizes: BTreeMap<u64, u64>,
    /// The smallest released class (`None` when no Patient was released).
    pub minimum_k: Option<u64>,
    /// Patients whose postcode was generalised one level further to reach k.
    pub generalised_patients: u64,
    /// Patients suppressed because even the coarser class was smaller than k.
    pub suppressed_patients: u64,
    /// Records of suppressed patients left out.
    pub suppressed_records: u64,
    /// Free-text elements removed by `redact` rules.
    pub redactions: u64,
    /// Records the policy decision kept out of the feed (opt-outs, agreements, sensitive codes).
    pub excluded_by_policy: u64,
    /// Records left out by the export-time re-check (e.g. an opt-out list loaded since intake).
    pub excluded_at_export: u64,
    /// Records that were not valid JSON (should be none: the log holds validated records).
    pub unreadable: u64,
    /// Which opt-out position applied, in words (every export says which, issue 5).
    pub opt_outs: String,
    /// The disclosure-control rule followed.
    pub rule: String,
}

/// Everything about a finished export (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportManifest {
    pub export_id: String,
    pub feed: String,
    pub consumer: String,
    /// The key version that produced every file of this export.
    pub key_version: u32,
    pub definition_digest: String,
    #[serde(with = "time::serde::rfc3339")]
    pub transaction_time: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    pub types: Option<BTreeSet<String>>,
    /// Log positions covered: `(after_seq, through_seq]`.
    pub after_seq: Seq,
    pub through_seq: Seq,
    pub files: Vec<ExportFile>,
    pub report: ReleaseReport,
}

impl ExportManifest {
    /// Read an export's manifest.
    pub fn load(directory: &Path) -> std::io::Result<ExportManifest> {
        let bytes = std::fs::read(directory.join(MANIFEST_FILE))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }
}

/// The newest complete export of `feed` (by transaction time), if any.
pub fn latest_export(data_dir: &Path, feed: &str) -> std::io::Result<Option<ExportManifest>> {
    let dir = data_dir.join("feeds").join(feed);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut latest: Option<ExportManifest> = None;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if !name.to_str().is_some_and(valid_export_id) {
            continue;
        }
        if let Ok(manifest) = ExportManifest::load(&entry.path())
            && latest
                .as_ref()
                .is_none_or(|l| manifest.transaction_time > l.transaction_time)
        {
            latest = Some(manifest);
        }
    }
    Ok(latest)
}

fn opt_out_statement(definition: &FeedDefinition) -> String {
    match &definition.opt_outs {
        OptOuts::Applied => "applied: National Data Opt-out and Type 1 opt-outs (GP-sourced data) \
                             excluded before pseudonymisation (NDOO-1, NDOO-7, T1-1)"
            .to_owned(),
        OptOuts::Exempt {
            rule,
            legal_basis,
            evidence,
        } => format!("exempt under {rule}: {legal_basis}; evidence: {evidence}"),
    }
}

const SDC_RULE: &str = "k-anonymity on the released quasi-identifiers; classes smaller than k are \
    generalised one postcode level, then suppressed. With k >= 8 no released class has 1-7 members \
    (SDC-1: NHS Digital HES/ECDS disclosure control since September 2018 suppresses sub-national \
    counts of 1-7)";

enum Sink {
    Plain(BufWriter<File>),
    Gzip(flate2::write::GzEncoder<BufWriter<File>>),
}

impl Sink {
    fn create(path: &Path, gzip: bool) -> std::io::Result<Sink> {
        let file = BufWriter::new(File::create_new(path)?);
        Ok(if gzip {
            Sink::Gzip(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::default(),
            ))
        } else {
            Sink::Plain(file)
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Plain(w) => w.write_all(bytes),
            Sink::Gzip(w) => w.write_all(bytes),
        }
    }

    fn finish(self) -> std::io::Result<()> {
        let mut file = match self {
            Sink::Plain(w) => w,
            Sink::Gzip(w) => w.finish()?,
        };
        file.flush()?;
        file.get_ref().sync_all()
    }
}

/// Run one export. Blocking: call it from a blocking thread (`spawn_blocking`) or the CLI.
/// On failure or cancellation the export directory is removed.
pub fn run_export(
    source: &dyn LogSource,
    policy: &dyn FeedPolicy,
    request: &ExportRequest<'_>,
    control: &ExportControl,
) -> Result<ExportManifest, ExportError> {
    std::fs::create_dir_all(request.directory.parent().unwrap_or_else(|| Path::new(".")))?;
    std::fs::create_dir(&request.directory)?;
    let result = export_into(source, policy, request, control);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&request.directory);
    }
    result
}

fn part_path(directory: &Path, resource_type: &str) -> PathBuf {
    directory.join(format!(".{resource_type}.part"))
}

fn export_into(
    source: &dyn LogSource,
    policy: &dyn FeedPolicy,
    request: &ExportRequest<'_>,
    control: &ExportControl,
) -> Result<ExportManifest, ExportError> {
    let definition = request.definition;
    let transformer = Transformer::new(definition, request.key);
    let as_of = request.transaction_time.date();
    let mut parts: BTreeMap<String, BufWriter<File>> = BTreeMap::new();
    let mut patients: HashMap<String, QuasiIdentifiers> = HashMap::new();
    let mut report = ReleaseReport {
        k: definition.k,
        quasi_identifiers: vec!["age".into(), "sex".into(), "postcode area".into()],
        rows: BTreeMap::new(),
        patients: 0,
        equivalence_classes: 0,
        class_sizes: BTreeMap::new(),
        minimum_k: None,
        generalised_patients: 0,
        suppressed_patients: 0,
        suppressed_records: 0,
        redactions: 0,
        excluded_by_policy: 0,
        excluded_at_export: 0,
        unreadable: 0,
        opt_outs: opt_out_statement(definition),
        rule: SDC_RULE.to_owned(),
    };

    // Pass 1: stream the log.
    let mut after = request.after_seq;
    let mut through = request.after_seq;
    'log: loop {
        if control.is_cancelled() {
            return Err(ExportError::Cancelled);
        }
        let page = source.read_log(after, PAGE)?;
        if page.is_empty() {
            break;
        }
        for entry in page {
            after = entry.seq;
            if entry.committed_at > request.transaction_time {
                break 'log;
            }
            through = entry.seq;
            control.scanned.fetch_add(1, Ordering::Relaxed);
            let resource_type = entry.resource_type.as_str();
            if definition.rules(resource_type).is_none()
                || request
                    .types
                    .as_ref()
                    .is_some_and(|types| !types.contains(resource_type))
                || request
                    .since
                    .is_some_and(|since| entry.committed_at < since)
            {
                continue;
            }
            if !policy.feeds(&entry).contains(&definition.id) {
                report.excluded_by_policy += 1;
                continue;
            }
            if !policy.still_included(&entry, &definition.id) {
                report.excluded_at_export += 1;
                continue;
            }
            if !source.is_current(&entry)? {
                continue;
            }
            let Ok(mut value) = serde_json::from_slice::<Value>(&entry.content) else {
                report.unreadable += 1;
                continue;
            };
            if let Some(map) = value.as_object_mut() {
                map.insert("id".into(), Value::String(entry.id.clone()));
            }
            let context = RecordContext {
                partner: &entry.partner,
                nhs_number: entry.nhs_number.as_deref(),
                as_of,
            };
            let Some(transformed) = transformer.apply_owned(value, &context) else {
                continue;
            };
            let patient = transformed.patient.unwrap_or_else(|| "-".to_owned());
            if resource_type == "Patient" {
                // Several submitters may hold the same person: release one Patient per pseudonym.
                if patients.contains_key(&patient) {
                    continue;
                }
                if let Some(qi) = transformed.quasi_identifiers {
                    patients.insert(patient.clone(), qi);
                }
            }
            report.redactions += u64::from(transformed.redactions);
            let writer = match parts.get_mut(resource_type) {
                Some(writer) => writer,
                None => {
                    let file = File::create_new(part_path(&request.directory, resource_type))?;
                    parts
                        .entry(resource_type.to_owned())
                        .or_insert(BufWriter::new(file))
                }
            };
            writer.write_all(patient.as_bytes())?;
            writer.write_all(b"\t")?;
            serde_json::to_writer(&mut *writer, &transformed.resource)
                .map_err(std::io::Error::other)?;
            writer.write_all(b"\n")?;
            control.written.fetch_add(1, Ordering::Relaxed);
        }
    }
    for (_, mut writer) in std::mem::take(&mut parts) {
        writer.flush()?;
    }

    // Disclosure control: classes on the configured generalisation, then one level coarser for
    // the patients in small classes, then suppression.
    let k = u64::from(definition.k);
    let mut level0: HashMap<&QuasiIdentifiers, u64> = HashMap::new();
    for qi in patients.values() {
        *level0.entry(qi).or_default() += 1;
    }
    let coarser: HashMap<&str, QuasiIdentifiers> = patients
        .iter()
        .filter(|(_, qi)| level0.get(qi).copied().unwrap_or(0) < k)
        .map(|(patient, qi)| (patient.as_str(), coarser_quasi_identifiers(qi)))
        .collect();
    let mut level1: HashMap<&QuasiIdentifiers, u64> = HashMap::new();
    for qi in coarser.values() {
        *level1.entry(qi).or_default() += 1;
    }
    let suppressed: HashSet<&str> = coarser
        .iter()
        .filter(|(_, qi)| level1.get(qi).copied().unwrap_or(0) < k)
        .map(|(patient, _)| *patient)
        .collect();
    let generalised: HashSet<&str> = coarser
        .keys()
        .copied()
        .filter(|patient| !suppressed.contains(patient))
        .collect();
    for size in level0
        .values()
        .chain(level1.values())
        .copied()
        .filter(|&size| size >= k)
    {
        *report.class_sizes.entry(size).or_default() += 1;
        report.equivalence_classes += 1;
    }
    report.minimum_k = report.class_sizes.keys().next().copied();
    report.generalised_patients = generalised.len() as u64;
    report.suppressed_patients = suppressed.len() as u64;
    report.patients = (patients.len() as u64).saturating_sub(report.suppressed_patients);

    // Pass 2: final files.
    let mut files = Vec::new();
    let types: Vec<String> = definition
        .resource_types()
        .filter(|t| part_path(&request.directory, t).exists())
        .map(str::to_owned)
        .collect();
    for resource_type in types {
        if control.is_cancelled() {
            return Err(ExportError::Cancelled);
        }
        let part = part_path(&request.directory, &resource_type);
        let name = file_name(&resource_type, definition.gzip);
        let mut sink = Sink::create(&request.directory.join(&name), definition.gzip)?;
        let mut count = 0u64;
        for line in BufReader::new(File::open(&part)?).lines() {
            let line = line?;
            let Some((patient, json)) = line.split_once('\t') else {
                continue;
            };
            if suppressed.contains(patient) {
                report.suppressed_records += 1;
                continue;
            }
            if resource_type == "Patient" && generalised.contains(patient) {
                let mut value: Value = serde_json::from_str(json).map_err(std::io::Error::other)?;
                coarsen_patient(&mut value);
                let json = serde_json::to_string(&value).map_err(std::io::Error::other)?;
                sink.write_all(json.as_bytes())?;
            } else {
                sink.write_all(json.as_bytes())?;
            }
            sink.write_all(b"\n")?;
            count += 1;
        }
        sink.finish()?;
        std::fs::remove_file(&part)?;
        report.rows.insert(resource_type.clone(), count);
        files.push(ExportFile {
            resource_type,
            file_name: name,
            count,
        });
    }

    let manifest = ExportManifest {
        export_id: request.export_id.clone(),
        feed: definition.id.clone(),
        consumer: definition.consumer.clone(),
        key_version: request.key.version,
        definition_digest: definition.digest.clone(),
        transaction_time: request.transaction_time,
        since: request.since,
        types: request.types.clone(),
        after_seq: request.after_seq,
        through_seq: through,
        files,
        report,
    };
    let temporary = request.directory.join(".manifest.json.tmp");
    let mut file = File::create_new(&temporary)?;
    serde_json::to_writer_pretty(&mut file, &manifest).map_err(std::io::Error::other)?;
    file.sync_all()?;
    std::fs::rename(&temporary, request.directory.join(MANIFEST_FILE))?;
    Ok(manifest)
}

/// The release report as text, for `caregate feed report`.
pub fn render_report(manifest: &ExportManifest) -> String {
    use std::fmt::Write as _;
    let r = &manifest.report;
    let mut out = String::new();
    let _ = writeln!(out, "feed {} → {}", manifest.feed, manifest.consumer);
    let _ = writeln!(
        out,
        "export {} at {} (key version {})",
        manifest.export_id,
        manifest
            .transaction_time
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        manifest.key_version
    );
    let _ = writeln!(
        out,
        "log positions ({}, {}]",
        manifest.after_seq, manifest.through_seq
    );
    let _ = writeln!(out, "opt-outs: {}", r.opt_outs);
    let _ = writeln!(out, "rows:");
    for (resource_type, count) in &r.rows {
        let _ = writeln!(out, "  {resource_type:<20} {count}");
    }
    let _ = writeln!(out, "patients released: {}", r.patients);
    let _ = writeln!(out, "quasi-identifiers: {}", r.quasi_identifiers.join(", "));
    let _ = writeln!(
        out,
        "equivalence classes: {} (configured k = {}, minimum k = {})",
        r.equivalence_classes,
        r.k,
        r.minimum_k
            .map_or_else(|| "-".to_owned(), |k| k.to_string())
    );
    let _ = writeln!(out, "class sizes (size: classes):");
    for (size, classes) in &r.class_sizes {
        let _ = writeln!(out, "  {size}: {classes}");
    }
    let _ = writeln!(
        out,
        "generalised further: {} patients",
        r.generalised_patients
    );
    let _ = writeln!(
        out,
        "suppressed: {} patients, {} records",
        r.suppressed_patients, r.suppressed_records
    );
    let _ = writeln!(out, "redacted free-text elements: {}", r.redactions);
    let _ = writeln!(
        out,
        "excluded by policy: {}; at export: {}",
        r.excluded_by_policy, r.excluded_at_export
    );
    let _ = writeln!(out, "rule: {}", r.rule);
    out
}
