//! The policy bundle: the files in `policies/`, loaded, checked and compiled once.
//!
//! | File | Holds |
//! |---|---|
//! | `caregate.cedarschema` | the Cedar vocabulary: partners, agreements, the decision context |
//! | `*.cedar` | the IG rules, one `@id` per policy, optional `@rule` and `@reason` |
//! | `ics.toml` | the ICS model: partner organisations and analytics feeds |
//! | `agreements.toml` | data-sharing agreements, first-class objects with dates and status |
//! | `sensitive-codes/*.toml` | versioned sensitive code lists (`SENS-1`, `SENS-2`, `SENS-3`) |
//!
//! Loading is all-or-nothing: any malformed file, unknown key, dangling reference, Cedar parse
//! error or Cedar validation error (strict mode, warnings included) refuses the bundle with the
//! file, line and a readable message, so a typo is an error at load and never a silent deny.
//! The bundle's version is the SHA-256 of exactly the files it loaded, in a canonical order.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use caregate_fhir::ResourceType;
use caregate_fhir::ods::OdsCode;
use cedar_policy::{
    Authorizer, Effect, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;
use serde::{Deserialize, Serialize};
use time::Date;

use crate::codes::{CodeIndex, CodeListFile, SensitiveCodeList};
use crate::error::PolicyError;
use crate::evaluation::{AnswerMemo, ScopeSlices};
use crate::partner::{PartnerId, PartnerKind, PartnerRef};

pub(crate) const SCHEMA_FILE: &str = "caregate.cedarschema";
pub(crate) const ICS_FILE: &str = "ics.toml";
pub(crate) const AGREEMENTS_FILE: &str = "agreements.toml";
pub(crate) const CODES_DIR: &str = "sensitive-codes";

/// The purposes an agreement can cover; each is a Cedar action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Purpose {
    /// Individual (direct) care, including break-glass access (`NDOO-2`, `CLDC`).
    #[serde(rename = "direct-care")]
    DirectCare,
    /// Purposes beyond individual care: planning, population health, research (`NDOO-1`).
    #[serde(rename = "secondary-use")]
    SecondaryUse,
}

impl Purpose {
    pub const ALL: [Purpose; 2] = [Purpose::DirectCare, Purpose::SecondaryUse];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::DirectCare => "direct-care",
            Self::SecondaryUse => "secondary-use",
        }
    }
}

impl FromStr for Purpose {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|purpose| purpose.as_str() == s)
            .ok_or_else(|| PolicyError::Invalid {
                file: PathBuf::new(),
                line: 0,
                column: 0,
                message: format!("unknown purpose '{s}' (direct-care or secondary-use)"),
            })
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An agreement's status. Only `active` agreements carry flows (`DSA-REVOKED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgreementStatus {
    Active,
    Suspended,
    Revoked,
}

impl AgreementStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Revoked => "revoked",
        }
    }
}

/// A partner organisation as the IG model sees it.
#[derive(Debug, Clone)]
pub struct Partner {
    pub id: PartnerId,
    pub name: String,
    pub ods: OdsCode,
    pub kind: PartnerKind,
    /// Sensitive categories this organisation is cleared to receive (with a relationship).
    pub sensitive_allowed: BTreeSet<String>,
    pub(crate) uid: EntityUid,
}

impl Partner {
    pub fn reference(&self) -> PartnerRef {
        PartnerRef {
            id: self.id.clone(),
            ods: self.ods.clone(),
            kind: self.kind,
        }
    }
}

/// A data-sharing agreement.
#[derive(Debug, Clone)]
pub struct Agreement {
    pub id: String,
    pub title: String,
    pub status: AgreementStatus,
    pub legal_basis: String,
    pub purposes: BTreeSet<Purpose>,
    pub resource_types: BTreeSet<String>,
    pub parties: BTreeSet<PartnerId>,
    /// First day in force.
    pub in_force_from: Date,
    /// Last day in force (inclusive).
    pub in_force_until: Date,
    pub break_glass_permitted: bool,
    /// Whether NDOO and the NHS-number check apply to secondary use under this agreement; `false`
    /// only with a recorded exemption (`NDOO-2`, `NDOO-3`, `NDOO-7`).
    pub ndoo_applies: bool,
    pub ndoo_exemption: Option<String>,
    pub(crate) uid: EntityUid,
}

/// A secondary-use feed: one recipient, one agreement.
#[derive(Debug, Clone)]
pub struct Feed {
    pub id: String,
    pub title: String,
    pub recipient: PartnerId,
    pub agreement: String,
}

/// What a Cedar policy means to an IG officer: its rule id and reason.
#[derive(Debug, Clone)]
pub(crate) struct RuleInfo {
    pub(crate) rule_id: String,
    pub(crate) reason: String,
    pub(crate) effect: Effect,
}

/// The loaded, validated and compiled bundle. Immutable; share it behind an `Arc` and swap the
/// `Arc` to hot-reload.
pub struct PolicyBundle {
    pub(crate) version: String,
    /// The whole policy set; decisions use `scope_slices`, the reference evaluation in the
    /// equivalence tests uses this.
    #[cfg(test)]
    pub(crate) policies: PolicySet,
    pub(crate) entities: Entities,
    pub(crate) authorizer: Authorizer,
    pub(crate) partners: Vec<Partner>,
    pub(crate) partner_index: HashMap<PartnerId, usize>,
    pub(crate) agreements: Vec<Agreement>,
    pub(crate) agreement_index: HashMap<String, usize>,
    pub(crate) feeds: Vec<Feed>,
    pub(crate) code_lists: Vec<SensitiveCodeList>,
    pub(crate) code_index: CodeIndex,
    pub(crate) rules: HashMap<PolicyId, RuleInfo>,
    pub(crate) actions: [EntityUid; 2],
    pub(crate) ics_name: String,
    /// Per (partner, purpose, agreement), the policies whose scope matches (`evaluation.rs`).
    pub(crate) scope_slices: ScopeSlices,
    /// Cedar's answers for recent situations (`evaluation.rs`); starts empty with each load.
    pub(crate) answer_memo: AnswerMemo,
}

impl fmt::Debug for PolicyBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyBundle")
            .field("version", &self.version)
            .field("partners", &self.partners.len())
            .field("agreements", &self.agreements.len())
            .field("feeds", &self.feeds.len())
            .field("policies", &self.rules.len())
            .field("code_lists", &self.code_lists.len())
            .finish_non_exhaustive()
    }
}

impl PolicyBundle {
    /// Load the bundle in `dir`: read, check, compile. See the module docs for the files.
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let files = BundleFiles::read(dir)?;
        Self::from_files(&files)
    }

    /// `sha256:<hex>` over the loaded files in canonical order.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn ics_name(&self) -> &str {
        &self.ics_name
    }

    pub fn partners(&self) -> &[Partner] {
        &self.partners
    }

    pub fn partner(&self, id: &PartnerId) -> Option<&Partner> {
        self.partner_index
            .get(id)
            .map(|&index| &self.partners[index])
    }

    pub fn agreements(&self) -> &[Agreement] {
        &self.agreements
    }

    pub fn agreement(&self, id: &str) -> Option<&Agreement> {
        self.agreement_index
            .get(id)
            .map(|&index| &self.agreements[index])
    }

    pub fn feeds(&self) -> &[Feed] {
        &self.feeds
    }

    pub fn code_lists(&self) -> &[SensitiveCodeList] {
        &self.code_lists
    }

    /// Every rule id the Cedar policies use, sorted (for coverage checks and documentation).
    pub fn rule_ids(&self) -> BTreeSet<String> {
        self.rules
            .values()
            .map(|rule| rule.rule_id.clone())
            .collect()
    }

    pub(crate) fn action(&self, purpose: Purpose) -> &EntityUid {
        match purpose {
            Purpose::DirectCare => &self.actions[0],
            Purpose::SecondaryUse => &self.actions[1],
        }
    }

    fn from_files(files: &BundleFiles) -> Result<Self, PolicyError> {
        let schema_text = files.get(SCHEMA_FILE)?;
        let schema = Schema::from_cedarschema_str(schema_text)
            .map(|(schema, _warnings)| schema)
            .map_err(|error| diagnostic_error(SCHEMA_FILE, schema_text, &error))?;

        let (policies, rules) = load_policies(files, &schema)?;

        let ics_text = files.get(ICS_FILE)?;
        let ics: IcsFile = parse_toml(ICS_FILE, ics_text)?;
        let code_lists = load_code_lists(files)?;
        let categories: HashSet<&str> = code_lists
            .iter()
            .map(|list| list.category.as_str())
            .collect();
        let partners = build_partners(&ics, ics_text, &categories)?;
        let partner_index: HashMap<PartnerId, usize> = partners
            .iter()
            .enumerate()
            .map(|(index, partner)| (partner.id.clone(), index))
            .collect();

        let agreements_text = files.get(AGREEMENTS_FILE)?;
        let agreements_file: AgreementsFile = parse_toml(AGREEMENTS_FILE, agreements_text)?;
        let agreements = build_agreements(agreements_file, agreements_text, &partner_index)?;
        let agreement_index: HashMap<String, usize> = agreements
            .iter()
            .enumerate()
            .map(|(index, agreement)| (agreement.id.clone(), index))
            .collect();
        let feeds = build_feeds(ics.feeds, ics_text, &partner_index, &agreement_index)?;

        let entities = build_entities(&partners, &agreements, &schema)?;
        let actions = [action_uid("direct-care")?, action_uid("secondary-use")?];
        let code_index = CodeIndex::build(&code_lists);
        let scope_slices =
            ScopeSlices::build(&policies, &entities, &partners, &agreements, &actions)?;
        Ok(Self {
            version: files.version(),
            #[cfg(test)]
            policies,
            entities,
            authorizer: Authorizer::new(),
            partners,
            partner_index,
            agreements,
            agreement_index,
            feeds,
            code_lists,
            code_index,
            rules,
            actions,
            ics_name: ics.ics.name,
            scope_slices,
            answer_memo: AnswerMemo::default(),
        })
    }
}

/// The bundle's files, read into memory in canonical order (relative path, `/`-separated).
struct BundleFiles {
    files: BTreeMap<String, String>,
}

impl BundleFiles {
    fn read(dir: &Path) -> Result<Self, PolicyError> {
        let mut names: Vec<String> = vec![
            SCHEMA_FILE.to_owned(),
            ICS_FILE.to_owned(),
            AGREEMENTS_FILE.to_owned(),
        ];
        for entry in read_dir_sorted(dir)? {
            if entry.ends_with(".cedar") {
                names.push(entry);
            }
        }
        let codes_dir = dir.join(CODES_DIR);
        if codes_dir.is_dir() {
            for entry in read_dir_sorted(&codes_dir)? {
                if entry.ends_with(".toml") {
                    names.push(format!("{CODES_DIR}/{entry}"));
                }
            }
        }
        let mut files = BTreeMap::new();
        for name in names {
            let path = dir.join(&name);
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    return Err(PolicyError::Missing {
                        file: PathBuf::from(name),
                    });
                }
                Err(source) => {
                    return Err(PolicyError::Read {
                        file: PathBuf::from(name),
                        source,
                    });
                }
            };
            files.insert(name, text);
        }
        Ok(Self { files })
    }

    fn get(&self, name: &str) -> Result<&str, PolicyError> {
        self.files
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| PolicyError::Missing {
                file: PathBuf::from(name),
            })
    }

    /// SHA-256 over, for each file in canonical order: path, NUL, length (u64 big-endian),
    /// content. Path and length framing make the hash unambiguous.
    fn version(&self) -> String {
        let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for (name, text) in &self.files {
            context.update(name.as_bytes());
            context.update(&[0]);
            context.update(&(text.len() as u64).to_be_bytes());
            context.update(text.as_bytes());
        }
        format!("sha256:{}", hex::encode(context.finish().as_ref()))
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<String>, PolicyError> {
    let read_error = |source| PolicyError::Read {
        file: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        if entry.file_type().map_err(read_error)?.is_file()
            && let Some(name) = entry.file_name().to_str()
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// 1-based line and column of a byte offset.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |tail| tail.chars().count())
        + 1;
    (line, column)
}

/// The line where `needle` (a quoted value) first appears, for errors found after parsing.
fn line_of(text: &str, needle: &str) -> usize {
    let quoted = format!("\"{needle}\"");
    text.lines()
        .position(|line| line.contains(&quoted))
        .map_or(0, |index| index + 1)
}

fn invalid(file: &str, line: usize, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        file: PathBuf::from(file),
        line,
        column: usize::from(line > 0),
        message: message.into(),
    }
}

/// A Cedar diagnostic as a located error: the first labelled span gives line and column; the
/// message joins the error, its labels and its help.
fn diagnostic_error(file: &str, text: &str, error: &(dyn Diagnostic + '_)) -> PolicyError {
    let mut message = error.to_string();
    let mut location = (0, 0);
    if let Some(labels) = error.labels() {
        for (index, label) in labels.enumerate() {
            if index == 0 {
                location = line_column(text, label.offset());
            }
            if let Some(label_text) = label.label() {
                message.push_str(&format!(" ({label_text})"));
            }
        }
    }
    if let Some(help) = error.help() {
        message.push_str(&format!("; help: {help}"));
    }
    let mut related_messages = Vec::new();
    if let Some(related) = error.related() {
        for inner in related {
            related_messages.push(inner.to_string());
            if location == (0, 0)
                && let Some(mut labels) = inner.labels()
                && let Some(label) = labels.next()
            {
                location = line_column(text, label.offset());
            }
        }
    }
    if !related_messages.is_empty() {
        message.push_str(&format!(": {}", related_messages.join("; ")));
    }
    PolicyError::Invalid {
        file: PathBuf::from(file),
        line: location.0,
        column: location.1,
        message,
    }
}

/// Annotations a policy may carry. Anything else is a typo and refused.
const ANNOTATIONS: &[&str] = &["id", "rule", "reason"];

fn load_policies(
    files: &BundleFiles,
    schema: &Schema,
) -> Result<(PolicySet, HashMap<PolicyId, RuleInfo>), PolicyError> {
    let mut policies = PolicySet::new();
    let mut rules = HashMap::new();
    // Which file (and its text) each policy came from, to locate validation errors.
    let mut origin: HashMap<PolicyId, &str> = HashMap::new();
    for (name, text) in files
        .files
        .iter()
        .filter(|(name, _)| name.ends_with(".cedar"))
    {
        let parsed =
            PolicySet::from_str(text).map_err(|error| diagnostic_error(name, text, &error))?;
        if parsed.templates().next().is_some() {
            return Err(invalid(
                name,
                0,
                "policy templates are not used in caregate bundles",
            ));
        }
        for policy in parsed.policies() {
            let line = policy
                .annotation("id")
                .map_or(0, |id| annotation_line(text, id));
            for (key, _) in policy.annotations() {
                if !ANNOTATIONS.contains(&key) {
                    return Err(invalid(
                        name,
                        line,
                        format!("unknown annotation @{key} (allowed: @id, @rule, @reason)"),
                    ));
                }
            }
            let Some(id) = policy.annotation("id") else {
                return Err(invalid(
                    name,
                    line,
                    "every policy needs an @id(\"...\") annotation",
                ));
            };
            let policy_id = PolicyId::new(id);
            if rules.contains_key(&policy_id) {
                return Err(invalid(
                    name,
                    line,
                    format!("duplicate policy @id(\"{id}\")"),
                ));
            }
            let rule_id = policy.annotation("rule").unwrap_or(id).to_owned();
            let reason = policy.annotation("reason").unwrap_or(id).to_owned();
            rules.insert(
                policy_id.clone(),
                RuleInfo {
                    rule_id,
                    reason,
                    effect: policy.effect(),
                },
            );
            origin.insert(policy_id.clone(), name.as_str());
            policies
                .add(policy.new_id(policy_id))
                .map_err(|error| invalid(name, line, error.to_string()))?;
        }
    }
    if rules.is_empty() {
        return Err(invalid("*.cedar", 0, "the bundle has no Cedar policies"));
    }
    let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
    if let Some(error) = result.validation_errors().next() {
        let file = origin.get(error.policy_id()).copied().unwrap_or("*.cedar");
        let text = files.files.get(file).map_or("", String::as_str);
        return Err(diagnostic_error(file, text, error));
    }
    if let Some(warning) = result.validation_warnings().next() {
        let file = origin
            .get(warning.policy_id())
            .copied()
            .unwrap_or("*.cedar");
        let text = files.files.get(file).map_or("", String::as_str);
        return Err(diagnostic_error(file, text, warning));
    }
    Ok((policies, rules))
}

/// The line of `@id("<id>")` in a policy file (the public Cedar API does not expose a policy's
/// span; the annotation is where an IG officer looks anyway).
fn annotation_line(text: &str, id: &str) -> usize {
    let needle = format!("\"{id}\"");
    text.lines()
        .position(|line| line.contains("@id") && line.contains(&needle))
        .map_or(0, |index| index + 1)
}

fn parse_toml<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, PolicyError> {
    toml::from_str(text).map_err(|error| {
        let (line, column) = error
            .span()
            .map_or((0, 0), |span| line_column(text, span.start));
        PolicyError::Invalid {
            file: PathBuf::from(file),
            line,
            column,
            message: error.message().to_owned(),
        }
    })
}

fn load_code_lists(files: &BundleFiles) -> Result<Vec<SensitiveCodeList>, PolicyError> {
    let mut lists: Vec<SensitiveCodeList> = Vec::new();
    let prefix = format!("{CODES_DIR}/");
    for (name, text) in files
        .files
        .iter()
        .filter(|(name, _)| name.starts_with(&prefix))
    {
        let file: CodeListFile = parse_toml(name, text)?;
        if file.category.is_empty()
            || !file
                .category
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'-')
        {
            return Err(invalid(
                name,
                line_of(text, &file.category),
                "category must be lower-case letters and '-'",
            ));
        }
        if lists.iter().any(|list| list.category == file.category) {
            return Err(invalid(
                name,
                line_of(text, &file.category),
                format!("category '{}' is defined twice", file.category),
            ));
        }
        if file.version.trim().is_empty() || file.source.trim().is_empty() {
            return Err(invalid(name, 0, "a code list needs a version and a source"));
        }
        if file.codes.is_empty() {
            return Err(invalid(name, 0, "a code list needs at least one [[code]]"));
        }
        let _ = &file.description;
        let mut codes = Vec::with_capacity(file.codes.len());
        for entry in file.codes {
            let line = line_of(text, &entry.code);
            if entry.system.trim().is_empty()
                || entry.code.trim().is_empty()
                || entry.display.trim().is_empty()
            {
                return Err(invalid(
                    name,
                    line,
                    "each code needs a system, a code and a display",
                ));
            }
            if entry.system == crate::facts::SNOMED_CT && !is_sctid(&entry.code) {
                return Err(invalid(
                    name,
                    line,
                    format!(
                        "'{}' is not a SNOMED CT concept id (6-18 digits, no leading zero)",
                        entry.code
                    ),
                ));
            }
            codes.push((entry.system, entry.code));
        }
        lists.push(SensitiveCodeList {
            category: file.category,
            version: file.version,
            source: file.source,
            codes,
        });
    }
    Ok(lists)
}

/// SNOMED CT ids are 6–18 digits without a leading zero (the check digit is Verhoeff; not
/// checked here). Description ids are not valid codes (DOMAIN `SCT`); their partition
/// identifier (second- and third-last digits) ends in 1, concept ids end in 0.
fn is_sctid(code: &str) -> bool {
    let digits_ok = (6..=18).contains(&code.len())
        && code.bytes().all(|b| b.is_ascii_digit())
        && !code.starts_with('0');
    let bytes = code.as_bytes();
    digits_ok && bytes.len() >= 3 && bytes[bytes.len() - 2] == b'0'
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IcsFile {
    ics: IcsHeader,
    #[serde(rename = "partner")]
    partners: Vec<PartnerEntry>,
    #[serde(rename = "feed", default)]
    feeds: Vec<FeedEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IcsHeader {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartnerEntry {
    id: String,
    name: String,
    ods_code: String,
    kind: String,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    sensitive_allowed: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedEntry {
    id: String,
    title: String,
    recipient: String,
    agreement: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgreementsFile {
    #[serde(rename = "agreement")]
    agreements: Vec<AgreementEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgreementEntry {
    id: String,
    title: String,
    status: AgreementStatus,
    legal_basis: String,
    purposes: Vec<Purpose>,
    resource_types: Vec<String>,
    parties: Vec<String>,
    in_force_from: toml::value::Datetime,
    in_force_until: toml::value::Datetime,
    #[serde(default)]
    break_glass_permitted: bool,
    #[serde(default = "default_ndoo_applies")]
    ndoo_applies: bool,
    #[serde(default)]
    ndoo_exemption: Option<String>,
    #[serde(default)]
    notes: Option<String>,
}

fn default_ndoo_applies() -> bool {
    true
}

fn build_partners(
    ics: &IcsFile,
    text: &str,
    categories: &HashSet<&str>,
) -> Result<Vec<Partner>, PolicyError> {
    let mut partners: Vec<Partner> = Vec::with_capacity(ics.partners.len());
    for entry in &ics.partners {
        let line = line_of(text, &entry.id);
        let id = PartnerId::parse(&entry.id)
            .map_err(|error| invalid(ICS_FILE, line, error.to_string()))?;
        if partners.iter().any(|partner| partner.id == id) {
            return Err(invalid(
                ICS_FILE,
                line,
                format!("partner '{id}' is defined twice"),
            ));
        }
        let ods = OdsCode::parse(&entry.ods_code).map_err(|error| {
            invalid(ICS_FILE, line_of(text, &entry.ods_code), error.to_string())
        })?;
        let kind = PartnerKind::from_str(&entry.kind)
            .map_err(|error| invalid(ICS_FILE, line_of(text, &entry.kind), error.to_string()))?;
        let _ = &entry.service;
        for category in &entry.sensitive_allowed {
            if !categories.contains(category.as_str()) {
                return Err(invalid(
                    ICS_FILE,
                    line_of(text, category),
                    format!(
                        "partner '{id}' is cleared for '{category}', which no sensitive-codes/*.toml list defines"
                    ),
                ));
            }
        }
        partners.push(Partner {
            uid: entity_uid("Partner", id.as_str())?,
            id,
            name: entry.name.clone(),
            ods,
            kind,
            sensitive_allowed: entry.sensitive_allowed.iter().cloned().collect(),
        });
    }
    partners.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(partners)
}

fn toml_date(file: &str, line: usize, value: &toml::value::Datetime) -> Result<Date, PolicyError> {
    let (Some(date), None) = (value.date, value.time) else {
        return Err(invalid(
            file,
            line,
            "agreement dates are plain dates, e.g. 2025-04-01",
        ));
    };
    let month =
        time::Month::try_from(date.month).map_err(|_| invalid(file, line, "invalid month"))?;
    Date::from_calendar_date(i32::from(date.year), month, date.day)
        .map_err(|error| invalid(file, line, format!("invalid date: {error}")))
}

fn build_agreements(
    file: AgreementsFile,
    text: &str,
    partner_index: &HashMap<PartnerId, usize>,
) -> Result<Vec<Agreement>, PolicyError> {
    let mut agreements: Vec<Agreement> = Vec::with_capacity(file.agreements.len());
    for entry in file.agreements {
        let line = line_of(text, &entry.id);
        let _ = &entry.notes;
        if entry.id.is_empty()
            || !entry
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid(
                AGREEMENTS_FILE,
                line,
                "an agreement id is lower-case letters, digits and '-'",
            ));
        }
        if agreements.iter().any(|agreement| agreement.id == entry.id) {
            return Err(invalid(
                AGREEMENTS_FILE,
                line,
                format!("agreement '{}' is defined twice", entry.id),
            ));
        }
        if entry.legal_basis.trim().is_empty() {
            return Err(invalid(
                AGREEMENTS_FILE,
                line,
                format!("agreement '{}' must state its legal basis", entry.id),
            ));
        }
        if entry.purposes.is_empty() || entry.resource_types.is_empty() || entry.parties.len() < 2 {
            return Err(invalid(
                AGREEMENTS_FILE,
                line,
                format!(
                    "agreement '{}' needs purposes, resource_types and at least two parties",
                    entry.id
                ),
            ));
        }
        for resource_type in &entry.resource_types {
            let known = ResourceType::from_str(resource_type).is_ok()
                || [
                    "Composition",
                    "MessageHeader",
                    "Medication",
                    "Organization",
                    "Practitioner",
                ]
                .contains(&resource_type.as_str());
            if !known {
                return Err(invalid(
                    AGREEMENTS_FILE,
                    line_of(text, resource_type),
                    format!("'{resource_type}' is not a resource type caregate handles"),
                ));
            }
        }
        let mut parties = BTreeSet::new();
        for party in &entry.parties {
            let id = PartnerId::parse(party).ok().filter(|id| partner_index.contains_key(id)).ok_or_else(|| {
                invalid(
                    AGREEMENTS_FILE,
                    line_of(text, party),
                    format!("agreement '{}' names party '{party}', which is not a partner in ics.toml", entry.id),
                )
            })?;
            parties.insert(id);
        }
        let in_force_from = toml_date(AGREEMENTS_FILE, line, &entry.in_force_from)?;
        let in_force_until = toml_date(AGREEMENTS_FILE, line, &entry.in_force_until)?;
        if in_force_until < in_force_from {
            return Err(invalid(
                AGREEMENTS_FILE,
                line,
                format!("agreement '{}' ends before it starts", entry.id),
            ));
        }
        if !entry.ndoo_applies
            && entry
                .ndoo_exemption
                .as_deref()
                .is_none_or(|text| text.trim().is_empty())
        {
            return Err(invalid(
                AGREEMENTS_FILE,
                line,
                format!(
                    "agreement '{}' sets ndoo_applies = false without an ndoo_exemption stating the basis (NDOO-2, NDOO-3)",
                    entry.id
                ),
            ));
        }
        agreements.push(Agreement {
            uid: entity_uid("Agreement", &entry.id)?,
            id: entry.id,
            title: entry.title,
            status: entry.status,
            legal_basis: entry.legal_basis,
            purposes: entry.purposes.into_iter().collect(),
            resource_types: entry.resource_types.into_iter().collect(),
            parties,
            in_force_from,
            in_force_until,
            break_glass_permitted: entry.break_glass_permitted,
            ndoo_applies: entry.ndoo_applies,
            ndoo_exemption: entry.ndoo_exemption,
        });
    }
    agreements.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(agreements)
}

fn build_feeds(
    entries: Vec<FeedEntry>,
    text: &str,
    partner_index: &HashMap<PartnerId, usize>,
    agreement_index: &HashMap<String, usize>,
) -> Result<Vec<Feed>, PolicyError> {
    let mut feeds: Vec<Feed> = Vec::with_capacity(entries.len());
    for entry in entries {
        let line = line_of(text, &entry.id);
        if feeds.iter().any(|feed| feed.id == entry.id) {
            return Err(invalid(
                ICS_FILE,
                line,
                format!("feed '{}' is defined twice", entry.id),
            ));
        }
        let recipient = PartnerId::parse(&entry.recipient)
            .ok()
            .filter(|id| partner_index.contains_key(id))
            .ok_or_else(|| {
                invalid(
                    ICS_FILE,
                    line,
                    format!("feed '{}' names an unknown recipient", entry.id),
                )
            })?;
        if !agreement_index.contains_key(&entry.agreement) {
            return Err(invalid(
                ICS_FILE,
                line_of(text, &entry.agreement),
                format!("feed '{}' names an unknown agreement", entry.id),
            ));
        }
        feeds.push(Feed {
            id: entry.id,
            title: entry.title,
            recipient,
            agreement: entry.agreement,
        });
    }
    feeds.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(feeds)
}

pub(crate) fn entity_uid(type_name: &str, id: &str) -> Result<EntityUid, PolicyError> {
    let type_name = EntityTypeName::from_str(type_name).map_err(|error| PolicyError::Entities {
        message: error.to_string(),
    })?;
    Ok(EntityUid::from_type_name_and_id(
        type_name,
        EntityId::new(id),
    ))
}

fn action_uid(name: &str) -> Result<EntityUid, PolicyError> {
    entity_uid("Action", name)
}

/// `yyyymmdd` as a Cedar Long: readable in policies and comparable.
pub(crate) fn date_number(date: Date) -> i64 {
    i64::from(date.year()) * 10_000
        + i64::from(u8::from(date.month())) * 100
        + i64::from(date.day())
}

fn string_set<'a>(values: impl IntoIterator<Item = &'a str>) -> RestrictedExpression {
    RestrictedExpression::new_set(
        values
            .into_iter()
            .map(|value| RestrictedExpression::new_string(value.to_owned())),
    )
}

fn build_entities(
    partners: &[Partner],
    agreements: &[Agreement],
    schema: &Schema,
) -> Result<Entities, PolicyError> {
    let entity_error = |error: &dyn fmt::Display| PolicyError::Entities {
        message: error.to_string(),
    };
    let mut entities = Vec::new();
    for kind in PartnerKind::ALL {
        entities.push(Entity::new_no_attrs(
            entity_uid("PartnerKind", kind.as_str())?,
            HashSet::new(),
        ));
    }
    for partner in partners {
        let attrs = HashMap::from([
            (
                "name".to_owned(),
                RestrictedExpression::new_string(partner.name.clone()),
            ),
            (
                "ods".to_owned(),
                RestrictedExpression::new_string(partner.ods.as_str().to_owned()),
            ),
            (
                "kind".to_owned(),
                RestrictedExpression::new_string(partner.kind.as_str().to_owned()),
            ),
            (
                "sensitive_allowed".to_owned(),
                string_set(partner.sensitive_allowed.iter().map(String::as_str)),
            ),
        ]);
        let parents = HashSet::from([entity_uid("PartnerKind", partner.kind.as_str())?]);
        entities.push(
            Entity::new(partner.uid.clone(), attrs, parents)
                .map_err(|error| entity_error(&error))?,
        );
    }
    let partner_uid: HashMap<&PartnerId, &EntityUid> = partners
        .iter()
        .map(|partner| (&partner.id, &partner.uid))
        .collect();
    for agreement in agreements {
        let parties = agreement
            .parties
            .iter()
            .filter_map(|party| partner_uid.get(party))
            .map(|uid| RestrictedExpression::new_entity_uid((*uid).clone()));
        let attrs = HashMap::from([
            (
                "title".to_owned(),
                RestrictedExpression::new_string(agreement.title.clone()),
            ),
            (
                "status".to_owned(),
                RestrictedExpression::new_string(agreement.status.as_str().to_owned()),
            ),
            (
                "legal_basis".to_owned(),
                RestrictedExpression::new_string(agreement.legal_basis.clone()),
            ),
            (
                "purposes".to_owned(),
                string_set(agreement.purposes.iter().map(|purpose| purpose.as_str())),
            ),
            (
                "resource_types".to_owned(),
                string_set(agreement.resource_types.iter().map(String::as_str)),
            ),
            ("parties".to_owned(), RestrictedExpression::new_set(parties)),
            (
                "in_force_from".to_owned(),
                RestrictedExpression::new_long(date_number(agreement.in_force_from)),
            ),
            (
                "in_force_until".to_owned(),
                RestrictedExpression::new_long(date_number(agreement.in_force_until)),
            ),
            (
                "break_glass_permitted".to_owned(),
                RestrictedExpression::new_bool(agreement.break_glass_permitted),
            ),
            (
                "ndoo_applies".to_owned(),
                RestrictedExpression::new_bool(agreement.ndoo_applies),
            ),
        ]);
        entities.push(
            Entity::new(agreement.uid.clone(), attrs, HashSet::new())
                .map_err(|error| entity_error(&error))?,
        );
    }
    Entities::from_entities(entities, Some(schema)).map_err(|error| entity_error(&error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
    }

    #[test]
    fn sctid_shape() {
        assert!(is_sctid("8098009"));
        assert!(is_sctid("827241000000103"));
        assert!(!is_sctid("0123456"));
        assert!(!is_sctid("12345"));
        // a description id (partition 01)
        assert!(!is_sctid("1234567011"));
    }
}
