//! Feed definitions (`policies/feeds/*.toml`): who receives a feed, why, under which legal
//! basis, and what each element of each resource type becomes.
//!
//! Parse, then validate without I/O, then compile: [`FeedDefinition::parse`] turns one file's
//! text into a validated definition whose per-type rules are already compiled into path tries
//! ([`ElementRules`]). Unknown keys are errors (`deny_unknown_fields`), and every error names the
//! file, the line and the field, so a typo never silently widens a feed.
//!
//! Default-deny: an element no rule mentions is dropped, so a new field in the input cannot leak
//! (issue 5). The rule of the longest matching path wins: `code = "keep"` with
//! `"code.text" = "redact"` keeps the codings and removes the free text.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use caregate_fhir::ResourceType;
use serde::Deserialize;

/// The smallest k a definition may ask for. SDC-1 (NHS Digital, HES/ECDS since 2018) suppresses
/// sub-national counts 1–7, so the shipped definitions use k = 8; 2 is the floor below which
/// "k-anonymity" means nothing.
pub const MIN_K: u32 = 2;

/// What happens to an element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Copy the element (and everything under it that no more specific rule mentions).
    Keep,
    /// Leave it out (the default for anything no rule mentions; stating it documents intent).
    Drop,
    /// Replace identifiers by keyed pseudonyms; rewrite references to pseudonymous ids.
    Pseudonym,
    /// Coarsen: birth date to year or age band, other dates to month or a per-patient shift,
    /// postcode to district or sector. Anything that cannot be generalised is dropped.
    Generalise,
    /// Remove free text that can carry names (narrative, notes, display strings), counted in
    /// the release report.
    Redact,
}

/// How `birthDate` is generalised (DOMAIN.md `GEN`: DoB → year).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BirthDateRule {
    /// `birthDate` becomes the year (`1980`), still a valid FHIR `date`.
    #[default]
    Year,
    /// `birthDate` is removed and a 5-year age band at the export's transaction time is
    /// carried in the extension [`crate::transform::AGE_BAND_EXTENSION`] (`40-44`, `90+`).
    AgeBand,
}

/// How other dates and dateTimes are generalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DateRule {
    /// `2024-03-15T10:00:00Z` → `2024-03` (DOMAIN.md `GEN`: event dates → month).
    #[default]
    Month,
    /// Shifted by a per-patient offset of −180…+180 days derived from the feed key, keeping
    /// intervals within one patient's record exact.
    Shift,
}

/// How postcodes are generalised (DOMAIN.md `GEN`: ICO — district ≈ 8,600 households, sector
/// ≈ 2,600; the outward code does not identify a property).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PostcodeRule {
    /// The outward code: `LS1 4AP` → `LS1`.
    #[default]
    District,
    /// Outward code and the inward digit: `LS1 4AP` → `LS1 4`.
    Sector,
}

/// Generalisation settings of one feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Generalisation {
    pub birth_date: BirthDateRule,
    pub dates: DateRule,
    pub postcode: PostcodeRule,
}

/// The National Data Opt-out / Type 1 position of a feed (DOMAIN.md `NDOO-1`, `NDOO-7`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptOuts {
    /// The default: opted-out patients (NDOO, Type 1 for GP-sourced data) are left out before
    /// pseudonymisation.
    Applied,
    /// The feed is exempt under `rule` (`NDOO-2` or `NDOO-3`), with the recorded legal basis and
    /// the evidence the controller saw (e.g. the CAG approval reference).
    Exempt {
        rule: String,
        legal_basis: String,
        evidence: String,
    },
}

/// A validated feed definition.
#[derive(Debug, Clone)]
pub struct FeedDefinition {
    pub id: String,
    pub title: String,
    /// The partner id (OAuth client id) of the only organisation that may download the feed.
    pub consumer: String,
    pub purpose: String,
    pub legal_basis: String,
    pub opt_outs: OptOuts,
    /// The minimum equivalence-class size released (KANON, SDC-1).
    pub k: u32,
    /// Write `.ndjson.gz` instead of `.ndjson`.
    pub gzip: bool,
    /// The feed a system-level `$export` without `_feed` builds when its consumer receives several
    /// feeds (Bulk Data clients that only know `GET /$export`); at most one per consumer.
    pub system_export: bool,
    pub generalise: Generalisation,
    /// Per resource type (FHIR spelling), the compiled element rules.
    pub resources: BTreeMap<String, ElementRules>,
    /// `sha256:<hex>` of the file's bytes: a changed definition is rebuilt from the log's start.
    pub digest: String,
}

impl FeedDefinition {
    /// The rules for `resource_type`, or `None` if the feed does not carry that type.
    pub fn rules(&self, resource_type: &str) -> Option<&ElementRules> {
        self.resources.get(resource_type)
    }

    /// Resource types the feed carries, in name order.
    pub fn resource_types(&self) -> impl Iterator<Item = &str> {
        self.resources.keys().map(String::as_str)
    }
}

/// A definition error, naming where: `file:line: field: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DefinitionError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefinitionFile {
    id: String,
    title: String,
    consumer: String,
    purpose: String,
    legal_basis: String,
    k: u32,
    #[serde(default)]
    gzip: bool,
    #[serde(default)]
    system_export: bool,
    #[serde(default)]
    opt_out: OptOutSection,
    #[serde(default)]
    generalise: Generalisation,
    resources: BTreeMap<String, BTreeMap<String, Action>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OptOutSection {
    exemption: Option<String>,
    legal_basis: Option<String>,
    evidence: Option<String>,
}

/// Element names and choice elements (`value[x]`) as FHIR spells them.
fn valid_segment(segment: &str) -> bool {
    let name = segment.strip_suffix("[x]").unwrap_or(segment);
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase()) && chars.all(|c| c.is_ascii_alphanumeric())
}

/// Elements the transform itself owns: `id` is always a pseudonym, `resourceType` always kept,
/// `meta` (versions, source, profiles, security labels of the source system) never released.
const RESERVED: [&str; 4] = ["id", "resourceType", "meta", "contained"];

impl FeedDefinition {
    /// Read and validate one definition file.
    pub fn load(path: &Path) -> Result<FeedDefinition, DefinitionError> {
        let text = std::fs::read_to_string(path).map_err(|e| DefinitionError {
            file: path.to_owned(),
            line: None,
            field: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Every `*.toml` in `dir`, sorted by file name; the first error stops the load.
    pub fn load_dir(dir: &Path) -> Result<Vec<FeedDefinition>, DefinitionError> {
        let error = |message: String| DefinitionError {
            file: dir.to_owned(),
            line: None,
            field: None,
            message,
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| error(format!("cannot read: {e}")))? {
            let path = entry
                .map_err(|e| error(format!("cannot read: {e}")))?
                .path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                paths.push(path);
            }
        }
        paths.sort();
        let mut definitions: Vec<FeedDefinition> = Vec::with_capacity(paths.len());
        for path in paths {
            let definition = Self::load(&path)?;
            if definitions.iter().any(|d| d.id == definition.id) {
                return Err(DefinitionError {
                    file: path,
                    line: None,
                    field: Some("id".into()),
                    message: format!("feed {} is defined twice", definition.id),
                });
            }
            if definition.system_export
                && let Some(other) = definitions
                    .iter()
                    .find(|d| d.system_export && d.consumer == definition.consumer)
            {
                return Err(DefinitionError {
                    file: path,
                    line: None,
                    field: Some("system_export".into()),
                    message: format!(
                        "feed {} is already the system-level export of consumer {}; only one feed per consumer may be",
                        other.id, definition.consumer
                    ),
                });
            }
            definitions.push(definition);
        }
        Ok(definitions)
    }

    /// Validate one definition's text (no I/O). `path` is only used in errors.
    pub fn parse(path: &Path, text: &str) -> Result<FeedDefinition, DefinitionError> {
        let error = |field: &str, message: String| DefinitionError {
            file: path.to_owned(),
            line: line_of(text, field),
            field: Some(field.to_owned()),
            message,
        };
        let file: DefinitionFile = toml::from_str(text).map_err(|e| DefinitionError {
            file: path.to_owned(),
            line: e.span().map(|span| line_at(text, span.start)),
            field: None,
            message: e.message().to_owned(),
        })?;
        if !valid_feed_id(&file.id) {
            return Err(error(
                "id",
                "must be 1-64 lowercase letters, digits and '-'".into(),
            ));
        }
        if let Some(stem) = path.file_stem().and_then(|s| s.to_str())
            && stem != file.id
        {
            return Err(error(
                "id",
                format!("must match the file name ({stem}.toml)"),
            ));
        }
        for (field, value) in [
            ("title", &file.title),
            ("consumer", &file.consumer),
            ("purpose", &file.purpose),
            ("legal_basis", &file.legal_basis),
        ] {
            if value.trim().is_empty() {
                return Err(error(field, "must not be empty".into()));
            }
        }
        if file.k < MIN_K {
            return Err(error("k", format!("must be at least {MIN_K}")));
        }
        let opt_outs = match file.opt_out.exemption {
            None => {
                if file.opt_out.legal_basis.is_some() || file.opt_out.evidence.is_some() {
                    return Err(error(
                        "opt_out",
                        "legal_basis and evidence belong to an exemption; name it".into(),
                    ));
                }
                OptOuts::Applied
            }
            Some(rule) => {
                if rule != "NDOO-2" && rule != "NDOO-3" {
                    return Err(error(
                        "exemption",
                        "must be NDOO-2 (e.g. COPI, specific consent) or NDOO-3 (s251 with CAG exemption)"
                            .into(),
                    ));
                }
                let legal_basis = file.opt_out.legal_basis.unwrap_or_default();
                let evidence = file.opt_out.evidence.unwrap_or_default();
                if legal_basis.trim().is_empty() || evidence.trim().is_empty() {
                    return Err(error(
                        "exemption",
                        "an opt-out exemption needs a recorded legal_basis and evidence".into(),
                    ));
                }
                OptOuts::Exempt {
                    rule,
                    legal_basis,
                    evidence,
                }
            }
        };
        if file.resources.is_empty() {
            return Err(error("resources", "name at least one resource type".into()));
        }
        let mut resources = BTreeMap::new();
        for (type_name, rules) in file.resources {
            let field = format!("resources.{type_name}");
            match ResourceType::from_str(&type_name) {
                Ok(ResourceType::Bundle) => {
                    return Err(error(
                        &type_name,
                        format!("{field}: Bundles are never exported; name the types inside"),
                    ));
                }
                Ok(_) => {}
                Err(_) => {
                    return Err(error(
                        &type_name,
                        format!("{field}: not a resource type caregate accepts"),
                    ));
                }
            }
            let mut compiled = ElementRules::default();
            for (element, action) in rules {
                let segments: Vec<&str> = element.split('.').collect();
                if let Some(bad) = segments.iter().find(|s| !valid_segment(s)) {
                    return Err(error(
                        &element,
                        format!("{field}.{element}: '{bad}' is not a FHIR element name"),
                    ));
                }
                if RESERVED.contains(&segments[0]) {
                    return Err(error(
                        &element,
                        format!(
                            "{field}.{element}: the transform owns this element (ids are always pseudonyms; meta and contained are never released)"
                        ),
                    ));
                }
                compiled.insert(&segments, action);
            }
            resources.insert(type_name, compiled);
        }
        Ok(FeedDefinition {
            id: file.id,
            title: file.title,
            consumer: file.consumer,
            purpose: file.purpose,
            legal_basis: file.legal_basis,
            opt_outs,
            k: file.k,
            gzip: file.gzip,
            system_export: file.system_export,
            generalise: file.generalise,
            resources,
            digest: digest(text.as_bytes()),
        })
    }
}

/// Feed ids appear in paths, reader names and file names: keep them boring.
pub fn valid_feed_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
}

fn digest(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    format!("sha256:{}", hex::encode(digest.as_ref()))
}

/// 1-based line of a byte offset.
fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The first line that assigns `key` (bare or quoted), for errors found after parsing.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let quoted = format!("\"{key}\"");
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            let rest = line
                .strip_prefix(&quoted)
                .or_else(|| line.strip_prefix(key))
                .or_else(|| {
                    line.strip_prefix('[')
                        .and_then(|l| l.strip_suffix(']'))
                        .filter(|l| l.ends_with(key))
                        .map(|_| "=")
                });
            rest.is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|index| index + 1)
}

/// One resource type's element rules, as a trie over path segments.
#[derive(Debug, Clone, Default)]
pub struct ElementRules {
    pub(crate) root: Node,
}

/// A path segment: an element name, or a choice element (`value[x]` matches `valueQuantity`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Exact(String),
    Choice(String),
}

impl Segment {
    fn matches(&self, key: &str) -> bool {
        match self {
            Segment::Exact(name) => name == key,
            Segment::Choice(prefix) => key
                .strip_prefix(prefix.as_str())
                .and_then(|rest| rest.chars().next())
                .is_some_and(|c| c.is_ascii_uppercase()),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Node {
    pub(crate) action: Option<Action>,
    pub(crate) children: Vec<(Segment, Node)>,
}

impl Node {
    /// The child for a JSON key; an exact name wins over a choice pattern.
    pub(crate) fn child(&self, key: &str) -> Option<&Node> {
        self.children
            .iter()
            .find(|(segment, _)| matches!(segment, Segment::Exact(name) if name == key))
            .or_else(|| {
                self.children
                    .iter()
                    .find(|(segment, _)| segment.matches(key))
            })
            .map(|(_, node)| node)
    }

    /// The action for a key: its own node's, else a matching choice pattern's (so
    /// `"medication[x]" = "keep"` still applies beside `"medicationCodeableConcept.text"`).
    pub(crate) fn action_for(&self, key: &str, child: Option<&Node>) -> Option<Action> {
        child.and_then(|c| c.action).or_else(|| {
            self.children
                .iter()
                .find(|(segment, node)| {
                    matches!(segment, Segment::Choice(_))
                        && segment.matches(key)
                        && node.action.is_some()
                })
                .and_then(|(_, node)| node.action)
        })
    }
}

impl ElementRules {
    fn insert(&mut self, segments: &[&str], action: Action) {
        let mut node = &mut self.root;
        for segment in segments {
            let segment = match segment.strip_suffix("[x]") {
                Some(prefix) => Segment::Choice(prefix.to_owned()),
                None => Segment::Exact((*segment).to_owned()),
            };
            let index = match node.children.iter().position(|(s, _)| *s == segment) {
                Some(index) => index,
                None => {
                    node.children.push((segment, Node::default()));
                    node.children.len() - 1
                }
            };
            node = &mut node.children[index].1;
        }
        node.action = Some(action);
    }
}
