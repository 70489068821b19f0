//! The pure transform: one committed resource in, its pseudonymised form for one feed out.
//!
//! - **Pseudonyms** are HMAC-SHA-256 under the feed's key over `feed ‖ domain ‖ normalised
//!   identifier`, truncated to 128 bits and encoded as lowercase RFC 4648 base32 without padding
//!   (26 characters). Not base64url: FHIR ids allow `[A-Za-z0-9\-\.]{1,64}`, no `_`.
//!   The feed id is inside the MAC too, so even a key mistakenly shared between feeds does not
//!   link them (DOMAIN.md `PSEU-2`).
//! - **The patient** of a record is its NHS number when known (the record's indexed NHS number,
//!   the Patient's NHS identifier, or a `subject`/`patient` reference by NHS identifier), else the
//!   submitter-scoped local Patient id. The Patient resource's id is that patient's pseudonym, and
//!   every reference to the patient is rewritten to `Patient/<pseudonym>`, so Encounter → Patient
//!   joins inside the feed, across submitters, without an NHS number.
//! - **Other ids** are pseudonyms of `submitter|Type|id` (ids are scoped per partner), so
//!   references between one submitter's resources still join.
//! - **Default-deny**: see [`crate::definition`]. Even a `keep` rewrites what it copies when it
//!   meets an NHS-number identifier or a literal reference, so a careless `keep` on `subject`
//!   cannot release the NHS number.
//!
//! No I/O and no clock: the export's transaction date comes in [`RecordContext::as_of`].
//!
//! **Cost** (issue 5: ≤ 5 µs for 2 KB, ≤ 40 µs for 8 KB; BENCHMARKS.md): the transform works in
//! place on the parsed resource ([`Transformer::apply_owned`]; the export owns each entry it
//! parses), so a kept element is never copied, a month is a truncation and a shifted date a
//! rewrite of its first ten bytes. Pseudonyms are MAC'd from parts (no formatting) from a key
//! whose HMAC pads are hashed once per transformer. Lookups scan an object's few keys rather than
//! hash them (`field`). Output, key order included, is pinned by `tests/golden.rs`.

use caregate_fhir::identifier::{NHS_NUMBER, ODS_ORGANIZATION_CODE, ODS_SITE_CODE};
use serde_json::{Map, Value};
use time::{Date, Month};

use crate::definition::{Action, BirthDateRule, DateRule, FeedDefinition, Node, PostcodeRule};
use crate::keys::FeedKey;

/// The extension carrying a generalised age (`birth_date = "age-band"`), `valueString` such as
/// `40-44` or `90+`.
pub const AGE_BAND_EXTENSION: &str = "https://caregate.example/fhir/StructureDefinition/age-band";

/// The identifier system of pseudonymised identifiers in a feed: `<base>/<feed id>`.
pub const PSEUDONYM_SYSTEM_BASE: &str = "https://caregate.example/fhir/Id/pseudonym";

/// Largest per-patient date shift, in days either way.
const MAX_SHIFT_DAYS: u32 = 180;

/// Bytes of HMAC kept in a pseudonym (≥ 128 bits, issue 5).
const PSEUDONYM_BYTES: usize = 16;

/// What the transform needs to know about the record besides its content.
#[derive(Debug, Clone, Copy)]
pub struct RecordContext<'a> {
    /// The submitting partner (ids are scoped per partner).
    pub partner: &'a str,
    /// The NHS number the store indexed for the record, if any.
    pub nhs_number: Option<&'a str>,
    /// The date ages are computed at (the export's transaction time).
    pub as_of: Date,
}

/// The quasi-identifiers a released Patient carries (DOMAIN.md `KANON`): `*` where the feed
/// releases nothing for that part.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuasiIdentifiers {
    /// Birth year or age band as released.
    pub age: String,
    pub sex: String,
    /// Postcode district or sector as released.
    pub area: String,
}

/// One transformed record.
#[derive(Debug, Clone, PartialEq)]
pub struct Transformed {
    pub resource: Value,
    /// The patient's pseudonym, when the record is about a known patient.
    pub patient: Option<String>,
    /// For Patients: the quasi-identifiers released.
    pub quasi_identifiers: Option<QuasiIdentifiers>,
    /// Elements removed by `redact` rules.
    pub redactions: u32,
}

/// The patient a record is about.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PatientIdentity {
    Nhs(String),
    Local(String),
}

/// The transform for one feed and key version. Cheap to build; build one per export.
pub struct Transformer<'a> {
    definition: &'a FeedDefinition,
    /// Keyed once here: each MAC starts from a copy of this key's HMAC state (inner and outer
    /// pads already hashed), never from the secret.
    key: aws_lc_rs::hmac::Key,
    /// `caregate-feeds/v1\0 ‖ feed id ‖ \0`, the start of every pseudonym's MAC input.
    pseudonym_prefix: Vec<u8>,
    pseudonym_system: String,
}

impl std::fmt::Debug for Transformer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transformer")
            .field("feed", &self.definition.id)
            .finish_non_exhaustive()
    }
}

/// Pseudonymise one resource for a feed: `None` if the feed does not carry its type (or it is
/// not a resource). Ages are computed at today's date (UTC); exports use [`Transformer`] with
/// their transaction time instead.
pub fn pseudonymise(resource: &Value, definition: &FeedDefinition, key: &FeedKey) -> Option<Value> {
    let context = RecordContext {
        partner: "",
        nhs_number: None,
        as_of: time::OffsetDateTime::now_utc().date(),
    };
    Transformer::new(definition, key)
        .apply(resource, &context)
        .map(|transformed| transformed.resource)
}

impl<'a> Transformer<'a> {
    pub fn new(definition: &'a FeedDefinition, key: &FeedKey) -> Self {
        let mut pseudonym_prefix = b"caregate-feeds/v1\0".to_vec();
        pseudonym_prefix.extend_from_slice(definition.id.as_bytes());
        pseudonym_prefix.push(0);
        Transformer {
            definition,
            key: key.hmac_key(),
            pseudonym_prefix,
            pseudonym_system: format!("{PSEUDONYM_SYSTEM_BASE}/{}", definition.id),
        }
    }

    /// Append the feed's pseudonym of `value` in `domain` to `out`. `value` comes in parts so
    /// callers need not format it: the MAC input is `prefix ‖ domain ‖ \0 ‖ parts…`.
    fn push_token(&self, domain: &str, value: &[&str], out: &mut String) {
        let mut context = aws_lc_rs::hmac::Context::with_key(&self.key);
        context.update(&self.pseudonym_prefix);
        context.update(domain.as_bytes());
        context.update(b"\0");
        for part in value {
            context.update(part.as_bytes());
        }
        let tag = context.sign();
        push_base32(&tag.as_ref()[..PSEUDONYM_BYTES], out);
    }

    /// The feed's pseudonym of `value` in `domain`.
    fn token(&self, domain: &str, value: &str) -> String {
        let mut out = String::with_capacity(PSEUDONYM_CHARS);
        self.push_token(domain, &[value], &mut out);
        out
    }

    fn patient_token(&self, patient: &PatientIdentity) -> String {
        match patient {
            PatientIdentity::Nhs(number) => self.token("nhs-number", number),
            PatientIdentity::Local(local) => self.token("local", local),
        }
    }

    /// Append the pseudonym of `partner|resource_type|id` (ids are scoped per partner).
    fn push_local_token(&self, partner: &str, resource_type: &str, id: &str, out: &mut String) {
        self.push_token("local", &[partner, "|", resource_type, "|", id], out);
    }

    /// The patient pseudonym for an NHS number (for tests and IG re-identification requests).
    pub fn nhs_number_pseudonym(&self, nhs_number: &str) -> String {
        self.token("nhs-number", &normalise_nhs_number(nhs_number))
    }

    /// Per-patient date shift in days, −180…+180, from the key.
    fn shift_days(&self, patient: Option<&PatientIdentity>) -> i64 {
        let basis: [&[u8]; 2] = match patient {
            Some(PatientIdentity::Nhs(number)) => [b"nhs|", number.as_bytes()],
            Some(PatientIdentity::Local(local)) => [b"local|", local.as_bytes()],
            None => [b"none", b""],
        };
        let mut context = aws_lc_rs::hmac::Context::with_key(&self.key);
        context.update(b"caregate-feeds/date-shift\0");
        for part in basis {
            context.update(part);
        }
        let tag = context.sign();
        let bytes = tag.as_ref();
        let value = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        i64::from(value % (2 * MAX_SHIFT_DAYS + 1)) - i64::from(MAX_SHIFT_DAYS)
    }

    /// Transform one resource; `None` if the feed does not carry its type. Works on a copy; a
    /// caller that owns the parsed resource (an export) should use [`Self::apply_owned`].
    pub fn apply(&self, resource: &Value, context: &RecordContext<'_>) -> Option<Transformed> {
        let input = resource.as_object()?;
        let resource_type = field(input, "resourceType")?.as_str()?;
        let root = &self.definition.rules(resource_type)?.root;
        // A top-level element the walk would only drop or count as redacted is copied as
        // `null` (same key, same place): the copy costs what can be released.
        let copy = input
            .iter()
            .map(|(key, value)| {
                let value = if reads_value(root, key) {
                    value.clone()
                } else {
                    Value::Null
                };
                (key.clone(), value)
            })
            .collect();
        self.apply_owned(Value::Object(copy), context)
    }

    /// Transform one resource in place, consuming it: what the feed releases stays where it
    /// lies (kept elements are not copied), the rest is removed. The same output as
    /// [`Self::apply`].
    pub fn apply_owned(&self, resource: Value, context: &RecordContext<'_>) -> Option<Transformed> {
        let Value::Object(mut map) = resource else {
            return None;
        };
        let resource_type = field(&map, "resourceType")?.as_str()?;
        let rules = self.definition.rules(resource_type)?;
        // `resourceType` is released as it is, after the walk. Its string is taken out now (no
        // copy); the walk then drops the emptied element, unless a rule mentions it
        // (`"resource[x]"`): that walk must see the string, as it did every other element.
        let type_name = if rules.root.child("resourceType").is_some() {
            resource_type.to_owned()
        } else {
            match field_mut(&mut map, "resourceType") {
                Some(Value::String(name)) => std::mem::take(name),
                _ => return None,
            }
        };
        let resource_type = type_name.as_str();
        let patient = patient_identity(resource_type, &map, context);
        let patient_token = patient.as_ref().map(|p| self.patient_token(p));
        let own_id = match (&patient_token, resource_type) {
            (Some(token), "Patient") => token.clone(),
            _ => {
                let mut own_id = String::with_capacity(PSEUDONYM_CHARS);
                let id = field(&map, "id").and_then(Value::as_str).unwrap_or("");
                self.push_local_token(context.partner, resource_type, id, &mut own_id);
                own_id
            }
        };
        let mut walk = Walk {
            transformer: self,
            context,
            patient: patient.as_ref(),
            patient_token: patient_token.as_deref(),
            shift: None,
            redactions: 0,
        };
        walk.object(&mut map, &rules.root, None);
        let redactions = walk.redactions;
        let is_patient = resource_type == "Patient";
        // After the released elements, in this order (no rule can name `id`: it is reserved).
        // Key order is part of the output's bytes when serde_json keeps insertion order.
        map.insert("resourceType".into(), Value::String(type_name));
        map.insert("id".into(), Value::String(own_id));
        let resource = Value::Object(map);
        let quasi_identifiers = is_patient.then(|| quasi_identifiers(&resource));
        Some(Transformed {
            resource,
            patient: patient_token,
            quasi_identifiers,
            redactions,
        })
    }
}

/// Whether transforming a resource reads the value of its top-level element `key`: the
/// elements the patient is found in, the type and id, and those a rule may release. The others
/// are dropped or counted as redacted, whatever they hold.
fn reads_value(root: &Node, key: &str) -> bool {
    if matches!(
        key,
        "resourceType" | "id" | "identifier" | "subject" | "patient" | "beneficiary"
    ) {
        return true;
    }
    let child = root.child(key);
    match child {
        Some(child) if !child.children.is_empty() => true,
        _ => matches!(
            root.action_for(key, child),
            Some(Action::Keep | Action::Pseudonym | Action::Generalise)
        ),
    }
}

/// Characters of a pseudonym: 128 bits in base32.
const PSEUDONYM_CHARS: usize = (PSEUDONYM_BYTES * 8).div_ceil(5);

/// Append lowercase RFC 4648 base32, no padding.
fn push_base32(bytes: &[u8], out: &mut String) {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    out.reserve((bytes.len() * 8).div_ceil(5));
    let mut buffer = 0u32;
    let mut bits = 0u32;
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
}

/// Lowercase RFC 4648 base32, no padding.
#[cfg(test)]
fn base32(bytes: &[u8]) -> String {
    let mut out = String::new();
    push_base32(bytes, &mut out);
    out
}

/// NHS numbers are compared as their 10 digits (spaces and hyphens are presentation).
fn normalise_nhs_number(value: &str) -> String {
    value.chars().filter(char::is_ascii_digit).collect()
}

fn patient_identity(
    resource_type: &str,
    input: &Map<String, Value>,
    context: &RecordContext<'_>,
) -> Option<PatientIdentity> {
    if let Some(number) = context.nhs_number {
        return Some(PatientIdentity::Nhs(normalise_nhs_number(number)));
    }
    if resource_type == "Patient" {
        let from_identifier = field(input, "identifier")
            .and_then(Value::as_array)
            .and_then(|ids| ids.iter().find_map(nhs_identifier_value));
        return Some(match from_identifier {
            Some(number) => PatientIdentity::Nhs(number),
            None => PatientIdentity::Local(format!(
                "{}|Patient|{}",
                context.partner,
                field(input, "id").and_then(Value::as_str).unwrap_or("")
            )),
        });
    }
    for element in ["subject", "patient", "beneficiary"] {
        let Some(reference) = field(input, element).and_then(Value::as_object) else {
            continue;
        };
        if let Some(number) = field(reference, "identifier").and_then(nhs_identifier_value) {
            return Some(PatientIdentity::Nhs(number));
        }
        if let Some(id) = field(reference, "reference")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("Patient/"))
        {
            let id = id.split('/').next().unwrap_or(id);
            return Some(PatientIdentity::Local(format!(
                "{}|Patient|{id}",
                context.partner
            )));
        }
    }
    None
}

/// The NHS number of an Identifier with the NHS number system.
fn nhs_identifier_value(identifier: &Value) -> Option<String> {
    nhs_identifier_number(identifier.as_object()?)
}

/// The NHS number of an Identifier (as a map) with the NHS number system.
fn nhs_identifier_number(identifier: &Map<String, Value>) -> Option<String> {
    (field(identifier, "system")?.as_str()? == NHS_NUMBER)
        .then(|| field(identifier, "value").and_then(Value::as_str))
        .flatten()
        .map(normalise_nhs_number)
}

fn is_organisation_system(system: &str) -> bool {
    system == ODS_ORGANIZATION_CODE || system == ODS_SITE_CODE
}

/// One resource's walk. Every method takes an element in place and answers whether it is
/// released: `true` with the element rewritten where it lies, `false` for the caller to remove
/// it (its content is then unspecified).
struct Walk<'t, 'c> {
    transformer: &'t Transformer<'t>,
    context: &'c RecordContext<'c>,
    patient: Option<&'c PatientIdentity>,
    patient_token: Option<&'c str>,
    shift: Option<i64>,
    redactions: u32,
}

impl Walk<'_, '_> {
    fn object(&mut self, map: &mut Map<String, Value>, node: &Node, inherited: Option<Action>) {
        let mut age_band = None;
        map.retain(|key, value| {
            let child = node.child(key);
            let action = node.action_for(key, child).or(inherited);
            match child {
                Some(child) if !child.children.is_empty() => {
                    self.structural(key, value, child, action)
                }
                _ => match action {
                    None | Some(Action::Drop) => false,
                    Some(Action::Generalise)
                        if key == "birthDate"
                            && self.transformer.definition.generalise.birth_date
                                == BirthDateRule::AgeBand =>
                    {
                        age_band = value
                            .as_str()
                            .and_then(|b| age_band_at(b, self.context.as_of));
                        false
                    }
                    Some(action) => self.leaf(action, key, value),
                },
            }
        });
        if let Some(band) = age_band {
            let extension = serde_json::json!({ "url": AGE_BAND_EXTENSION, "valueString": band });
            match field_mut(map, "extension").and_then(Value::as_array_mut) {
                Some(extensions) => extensions.push(extension),
                None => {
                    map.insert("extension".into(), Value::Array(vec![extension]));
                }
            }
        }
    }

    /// An element with more specific rules below it.
    fn structural(
        &mut self,
        key: &str,
        value: &mut Value,
        node: &Node,
        action: Option<Action>,
    ) -> bool {
        match value {
            Value::Object(map) => {
                self.object(map, node, action);
                !map.is_empty()
            }
            Value::Array(items) => {
                items.retain_mut(|item| self.structural(key, item, node, action));
                !items.is_empty()
            }
            primitive => match action {
                None | Some(Action::Drop) => false,
                Some(action) => self.leaf(action, key, primitive),
            },
        }
    }

    fn leaf(&mut self, action: Action, key: &str, value: &mut Value) -> bool {
        match action {
            Action::Drop => false,
            Action::Redact => {
                self.redactions += 1;
                false
            }
            Action::Keep => self.keep(key, value),
            Action::Pseudonym => self.pseudonym(key, value),
            Action::Generalise => self.generalise(key, value),
        }
    }

    /// Copy, but never an NHS number or a raw reference (rewritten on the way) nor free text
    /// (`text`, `div`: CodeableConcept text, narrative, annotations are written about one person)
    /// unless a more specific rule names it.
    fn keep(&mut self, key: &str, value: &mut Value) -> bool {
        match value {
            Value::Object(map)
                if field(map, "reference").is_some() || looks_like_patient_identifier(map) =>
            {
                self.pseudonym(key, value)
            }
            Value::Object(map) => {
                map.retain(|k, v| {
                    if k == "text" || k == "div" {
                        self.redactions += 1;
                        return false;
                    }
                    self.keep(k, v)
                });
                !map.is_empty()
            }
            Value::Array(items) => {
                items.retain_mut(|v| self.keep(key, v));
                !items.is_empty()
            }
            _ => true,
        }
    }

    fn pseudonym(&mut self, key: &str, value: &mut Value) -> bool {
        match value {
            Value::Array(items) => {
                items.retain_mut(|v| self.pseudonym(key, v));
                !items.is_empty()
            }
            Value::Object(map)
                if field(map, "reference").is_some() || field(map, "identifier").is_some() =>
            {
                self.reference(map)
            }
            Value::Object(map) => self.identifier(map),
            Value::String(text) => {
                let mut token = String::with_capacity(PSEUDONYM_CHARS);
                self.transformer.push_token(key, &[text.trim()], &mut token);
                *text = token;
                true
            }
            _ => false,
        }
    }

    /// A Reference: to the record's patient → `Patient/<patient pseudonym>`; to another
    /// resource → `Type/<pseudonym>`; organisations by ODS code are kept (not personal data);
    /// `display` never survives (it can carry a name).
    fn reference(&mut self, map: &mut Map<String, Value>) -> bool {
        let transformer = self.transformer;
        let mut output = Map::new();
        if let Some(reference) = field(map, "reference").and_then(Value::as_str) {
            let mut parts = reference.split('/');
            if let (Some(resource_type), Some(id)) = (parts.next(), parts.next())
                && !reference.contains(':')
                && resource_type
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_uppercase())
            {
                let mut rewritten =
                    String::with_capacity(resource_type.len() + 1 + PSEUDONYM_CHARS);
                rewritten.push_str(resource_type);
                rewritten.push('/');
                match (resource_type, self.patient, self.patient_token) {
                    ("Patient", Some(PatientIdentity::Nhs(_)), Some(token)) => {
                        rewritten.push_str(token);
                    }
                    _ => transformer.push_local_token(
                        self.context.partner,
                        resource_type,
                        id,
                        &mut rewritten,
                    ),
                }
                output.insert("reference".into(), Value::String(rewritten));
            }
            // `#contained`, `urn:uuid:` and absolute URLs point outside the feed: dropped.
        } else if let Some(identifier) = field_mut(map, "identifier").and_then(Value::as_object_mut)
        {
            if let Some(number) = nhs_identifier_number(identifier) {
                let mut rewritten = String::with_capacity("Patient/".len() + PSEUDONYM_CHARS);
                rewritten.push_str("Patient/");
                match (self.patient, self.patient_token) {
                    // Usually the record's own patient: that pseudonym is already made.
                    (Some(PatientIdentity::Nhs(patient)), Some(token)) if *patient == number => {
                        rewritten.push_str(token);
                    }
                    _ => transformer.push_token("nhs-number", &[&number], &mut rewritten),
                }
                output.insert("reference".into(), Value::String(rewritten));
            } else if self.identifier(identifier) {
                output.insert(
                    "identifier".into(),
                    Value::Object(std::mem::take(identifier)),
                );
            }
        }
        if output.is_empty() {
            return false;
        }
        if let Some(kind) = field_mut(map, "type")
            && let Value::String(kind) = kind
        {
            output.insert("type".into(), Value::String(std::mem::take(kind)));
        }
        *map = output;
        true
    }

    /// An Identifier: organisations kept; anything else → the feed's pseudonym system. The
    /// result is `{system, value}` in that order.
    fn identifier(&mut self, map: &mut Map<String, Value>) -> bool {
        let Some(value) = field(map, "value").and_then(Value::as_str) else {
            return false;
        };
        let system = field(map, "system").and_then(Value::as_str).unwrap_or("");
        let pseudonym = (!is_organisation_system(system)).then(|| {
            let mut token = String::with_capacity(PSEUDONYM_CHARS);
            if system == NHS_NUMBER {
                self.transformer.push_token(
                    "nhs-number",
                    &[&normalise_nhs_number(value)],
                    &mut token,
                );
            } else {
                self.transformer
                    .push_token("identifier", &[system, "|", value.trim()], &mut token);
            }
            token
        });
        map.retain(|key, _| key == "system" || key == "value");
        let in_order = map.len() == 2 && map.keys().next().is_some_and(|key| key == "system");
        if !in_order {
            // `value` before `system` (kept order), or no `system`: rebuilt in released order.
            let system = field_mut(map, "system").map(std::mem::take);
            let value = field_mut(map, "value").map(std::mem::take);
            map.clear();
            map.insert("system".into(), system.unwrap_or_default());
            map.insert("value".into(), value.unwrap_or_default());
        }
        if let Some(token) = pseudonym {
            if let Some(slot) = field_mut(map, "system") {
                *slot = Value::String(self.transformer.pseudonym_system.clone());
            }
            if let Some(slot) = field_mut(map, "value") {
                *slot = Value::String(token);
            }
        }
        true
    }

    fn generalise(&mut self, key: &str, value: &mut Value) -> bool {
        let generalise = self.transformer.definition.generalise;
        match value {
            Value::String(text) => match key {
                "birthDate" => truncate_date(text, 4),
                "postalCode" => match generalise_postcode(text, generalise.postcode) {
                    Some(area) => {
                        *text = area;
                        true
                    }
                    None => false,
                },
                _ => match generalise.dates {
                    DateRule::Month => truncate_date(text, 7),
                    DateRule::Shift => {
                        let days = match self.shift {
                            Some(days) => days,
                            None => {
                                let days = self.transformer.shift_days(self.patient);
                                self.shift = Some(days);
                                days
                            }
                        };
                        shift_date_in_place(text, days)
                    }
                },
            },
            Value::Object(map) => {
                map.retain(|k, v| self.generalise(k, v));
                !map.is_empty()
            }
            Value::Array(items) => {
                items.retain_mut(|v| self.generalise(key, v));
                !items.is_empty()
            }
            _ => false,
        }
    }
}

/// Objects with more keys than this are searched through the map's own index.
const SCANNED_KEYS: usize = 16;

/// `map.get(key)`. FHIR objects hold a handful of keys; when serde_json keeps order (its
/// `preserve_order` feature, which cedar-policy-core enables in the gateway's build) every `get`
/// hashes the key with SipHash, which costs more than comparing a few short strings.
fn field<'m>(map: &'m Map<String, Value>, key: &str) -> Option<&'m Value> {
    if map.len() > SCANNED_KEYS {
        return map.get(key);
    }
    map.iter().find_map(|(k, v)| (k == key).then_some(v))
}

/// `map.get_mut(key)`, as [`field`].
fn field_mut<'m>(map: &'m mut Map<String, Value>, key: &str) -> Option<&'m mut Value> {
    if map.len() > SCANNED_KEYS {
        return map.get_mut(key);
    }
    map.iter_mut().find_map(|(k, v)| (k == key).then_some(v))
}

fn looks_like_patient_identifier(map: &Map<String, Value>) -> bool {
    field(map, "system").and_then(Value::as_str) == Some(NHS_NUMBER)
}

/// `(year, month, day, rest)` of a FHIR date/dateTime with day precision.
fn split_full_date(text: &str) -> Option<(i32, u8, u8, &str)> {
    let bytes = text.as_bytes();
    if bytes.len() < 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let year = text.get(0..4)?.parse().ok()?;
    let month = text.get(5..7)?.parse().ok()?;
    let day = text.get(8..10)?.parse().ok()?;
    Some((year, month, day, text.get(10..)?))
}

/// Whether `text` is a FHIR date of any precision (`YYYY`, `YYYY-MM`, `YYYY-MM-DD…`).
fn date_prefix_ok(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() >= 4
        && bytes[..4].iter().all(u8::is_ascii_digit)
        && (bytes.len() == 4
            || (bytes.len() >= 7 && bytes[4] == b'-' && bytes[5..7].iter().all(u8::is_ascii_digit)))
}

/// `2024-03-15T10:00:00Z` → `2024-03`; a year stays a year; not a date → `None` (dropped).
pub fn date_to_month(text: &str) -> Option<String> {
    let mut month = text.to_owned();
    truncate_date(&mut month, 7).then_some(month)
}

/// The year of a birth date (DOMAIN.md `GEN`).
pub fn birth_year(text: &str) -> Option<String> {
    let mut year = text.to_owned();
    truncate_date(&mut year, 4).then_some(year)
}

/// Cut a FHIR date to its first `len` characters (4: the year, 7: the month), in place; a date
/// already coarser stays as it is. `false` if `text` is not a date (it is then dropped).
fn truncate_date(text: &mut String, len: usize) -> bool {
    if !date_prefix_ok(text) {
        return false;
    }
    // The first 7 bytes (or all 4) are ASCII digits and '-', so `len` is a char boundary.
    text.truncate(len);
    true
}

/// Shift a date or dateTime by `days`, keeping its precision and time of day. Dates coarser
/// than a day are dropped: an unshifted month beside shifted days would reveal the offset.
pub fn shift_date(text: &str, days: i64) -> Option<String> {
    let mut shifted = text.to_owned();
    shift_date_in_place(&mut shifted, days).then_some(shifted)
}

/// [`shift_date`] in place: the shifted `YYYY-MM-DD` is always 10 characters, like the
/// 10 bytes it replaces, so the time of day after it stays where it is.
fn shift_date_in_place(text: &mut String, days: i64) -> bool {
    let Some(shifted) = shifted_day(text, days) else {
        return false;
    };
    let mut day = [0u8; 10];
    let digits = |out: &mut [u8], mut value: u32| {
        for slot in out.iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    digits(&mut day[0..4], shifted.year().unsigned_abs());
    day[4] = b'-';
    digits(&mut day[5..7], u32::from(u8::from(shifted.month())));
    day[7] = b'-';
    digits(&mut day[8..10], u32::from(shifted.day()));
    // `split_full_date` checked that byte 10 is a char boundary; `day` is ASCII.
    text.replace_range(..10, std::str::from_utf8(&day).unwrap_or_default());
    true
}

/// The day of a day-precision date shifted by `days`, within years 1–9999.
fn shifted_day(text: &str, days: i64) -> Option<Date> {
    let (year, month, day, _) = split_full_date(text)?;
    let date = Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()?;
    let shifted = date.checked_add(time::Duration::days(days))?;
    (1..=9999).contains(&shifted.year()).then_some(shifted)
}

/// The 5-year age band at `as_of` of someone born on `birth_date` (`90+` top-coded); with only
/// a birth year, the age reached in `as_of`'s year.
pub fn age_band_at(birth_date: &str, as_of: Date) -> Option<String> {
    let age = match split_full_date(birth_date) {
        Some((year, month, day, _)) => {
            let born = Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()?;
            let mut age = as_of.year() - born.year();
            if (as_of.month() as u8, as_of.day()) < (born.month() as u8, born.day()) {
                age -= 1;
            }
            age
        }
        None => as_of.year() - birth_year(birth_date)?.parse::<i32>().ok()?,
    };
    if age < 0 {
        return None;
    }
    Some(if age >= 90 {
        "90+".to_owned()
    } else {
        let low = age - age % 5;
        format!("{low}-{}", low + 4)
    })
}

/// The outward and inward codes of a UK postcode, normalised (`ls14ap` → `("LS1", "4AP")`).
fn split_postcode(text: &str) -> Option<(String, String)> {
    let compact: String = text
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if !(5..=7).contains(&compact.len()) || !compact.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    let (outward, inward) = compact.split_at(compact.len() - 3);
    let inward_ok = {
        let b = inward.as_bytes();
        b[0].is_ascii_digit() && b[1].is_ascii_alphabetic() && b[2].is_ascii_alphabetic()
    };
    let outward_ok = outward
        .as_bytes()
        .first()
        .is_some_and(u8::is_ascii_alphabetic)
        && outward.bytes().any(|b| b.is_ascii_digit());
    (inward_ok && outward_ok).then(|| (outward.to_owned(), inward.to_owned()))
}

/// Postcode → district (`LS1`) or sector (`LS1 4`); an already-generalised district or sector
/// passes at its own level or coarser; anything else is dropped.
pub fn generalise_postcode(text: &str, rule: PostcodeRule) -> Option<String> {
    split_postcode(text).map(|(outward, inward)| match rule {
        PostcodeRule::District => outward,
        PostcodeRule::Sector => format!("{outward} {}", &inward[..1]),
    })
}

/// One step coarser, for disclosure control: sector → district → area (`LS1 4` → `LS1` → `LS`).
pub fn coarser_area(area: &str) -> Option<String> {
    if let Some((district, _)) = area.split_once(' ') {
        return Some(district.to_owned());
    }
    let letters: String = area.chars().take_while(char::is_ascii_alphabetic).collect();
    (!letters.is_empty() && letters.len() < area.len()).then_some(letters)
}

/// The quasi-identifiers a transformed Patient releases.
fn quasi_identifiers(patient: &Value) -> QuasiIdentifiers {
    let star = || "*".to_owned();
    let age_band = patient
        .get("extension")
        .and_then(Value::as_array)
        .and_then(|extensions| {
            extensions
                .iter()
                .find(|e| e.get("url").and_then(Value::as_str) == Some(AGE_BAND_EXTENSION))
        })
        .and_then(|e| e.get("valueString").and_then(Value::as_str));
    let age = age_band
        .or_else(|| patient.get("birthDate").and_then(Value::as_str))
        .map_or_else(star, str::to_owned);
    let sex = patient
        .get("gender")
        .and_then(Value::as_str)
        .map_or_else(star, str::to_owned);
    let area = patient
        .get("address")
        .and_then(Value::as_array)
        .and_then(|addresses| addresses.iter().find_map(|a| a.get("postalCode")?.as_str()))
        .map_or_else(star, str::to_owned);
    QuasiIdentifiers { age, sex, area }
}

/// Rewrite a released Patient's postcodes one level coarser (disclosure control).
pub(crate) fn coarsen_patient(patient: &mut Value) {
    let Some(addresses) = patient.get_mut("address").and_then(Value::as_array_mut) else {
        return;
    };
    for address in addresses.iter_mut() {
        let Some(map) = address.as_object_mut() else {
            continue;
        };
        let coarser = map
            .get("postalCode")
            .and_then(Value::as_str)
            .and_then(coarser_area);
        match coarser {
            Some(area) => {
                map.insert("postalCode".into(), Value::String(area));
            }
            None => {
                map.remove("postalCode");
            }
        }
    }
    addresses.retain(|address| address.as_object().is_some_and(|m| !m.is_empty()));
    if addresses.is_empty()
        && let Some(map) = patient.as_object_mut()
    {
        map.remove("address");
    }
}

/// The released quasi-identifiers after [`coarsen_patient`].
pub(crate) fn coarser_quasi_identifiers(qi: &QuasiIdentifiers) -> QuasiIdentifiers {
    QuasiIdentifiers {
        age: qi.age.clone(),
        sex: qi.sex.clone(),
        area: if qi.area == "*" {
            qi.area.clone()
        } else {
            coarser_area(&qi.area).unwrap_or_else(|| "*".to_owned())
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn pseudonyms_are_fhir_ids() {
        assert_eq!(base32(b"foobar"), "mzxw6ytboi");
        assert_eq!(base32(&[0xff; 16]).len(), 26);
    }

    #[test]
    fn gen_dates_to_month_and_birth_date_to_year() {
        assert_eq!(
            date_to_month("2024-03-15T10:00:00Z").as_deref(),
            Some("2024-03")
        );
        assert_eq!(date_to_month("2024").as_deref(), Some("2024"));
        assert_eq!(date_to_month("not a date"), None);
        assert_eq!(birth_year("1980-02-29").as_deref(), Some("1980"));
    }

    #[test]
    fn gen_postcode_to_district_or_sector() {
        assert_eq!(
            generalise_postcode("ls1 4ap", PostcodeRule::District).as_deref(),
            Some("LS1")
        );
        assert_eq!(
            generalise_postcode("SW1A 1AA", PostcodeRule::Sector).as_deref(),
            Some("SW1A 1")
        );
        assert_eq!(generalise_postcode("12345", PostcodeRule::District), None);
        assert_eq!(coarser_area("SW1A 1").as_deref(), Some("SW1A"));
        assert_eq!(coarser_area("SW1A").as_deref(), Some("SW"));
        assert_eq!(coarser_area("SW"), None);
    }

    #[test]
    fn date_shift_keeps_precision_and_time() {
        assert_eq!(
            shift_date("2024-02-28T10:00:00Z", 2).as_deref(),
            Some("2024-03-01T10:00:00Z")
        );
        assert_eq!(shift_date("2024-01-01", -1).as_deref(), Some("2023-12-31"));
        assert_eq!(shift_date("2024-01", 5), None);
    }

    #[test]
    fn age_bands_are_five_years_and_top_coded() {
        assert_eq!(
            age_band_at("1980-06-01", date!(2025 - 05 - 31)).as_deref(),
            Some("40-44")
        );
        assert_eq!(
            age_band_at("1980-06-01", date!(2025 - 06 - 01)).as_deref(),
            Some("45-49")
        );
        assert_eq!(
            age_band_at("1920-01-01", date!(2025 - 01 - 01)).as_deref(),
            Some("90+")
        );
        assert_eq!(age_band_at("2030-01-01", date!(2025 - 01 - 01)), None);
    }
}
