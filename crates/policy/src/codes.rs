//! Sensitive code lists (`policies/sensitive-codes/*.toml`, DOMAIN `SENS-1`, `SENS-2`, `SENS-3`).
//!
//! Each file is one category (fertility, sexual health, …) with a version and a source, listing
//! `(system, code)` pairs: SNOMED CT concept ids and FHIR security labels. A record containing any
//! of them anywhere is in that category; the Cedar rule `SENS-1` then decides who may receive it.
//! Matching is exact on the concept id: caregate has no terminology server, so subsumption
//! (descendants of a listed concept) is **not** applied — the IG lead lists every concept they
//! want covered. That limit is stated in `policies/README.md`.

use std::collections::HashMap;

use serde::Deserialize;

/// One versioned category list, as loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SensitiveCodeList {
    /// The category name policies and partners use (`sexual-health`).
    pub category: String,
    /// The list's own version (the IG sign-off), kept beside the bundle hash.
    pub version: String,
    /// Where the list comes from (DOMAIN ids, refsets, local IG decisions).
    pub source: String,
    /// The codes, `(system, code)`.
    pub codes: Vec<(String, String)>,
}

/// The file format of one list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CodeListFile {
    pub(crate) category: String,
    pub(crate) version: String,
    pub(crate) source: String,
    #[serde(default)]
    pub(crate) description: Option<String>,
    #[serde(rename = "code")]
    pub(crate) codes: Vec<CodeEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CodeEntry {
    pub(crate) system: String,
    pub(crate) code: String,
    pub(crate) display: String,
}

/// Every listed code, indexed by system then code, to the categories it belongs to (index into
/// the bundle's lists). Built once at load.
#[derive(Debug, Clone, Default)]
pub(crate) struct CodeIndex {
    by_system: HashMap<String, HashMap<String, Vec<usize>>>,
}

impl CodeIndex {
    pub(crate) fn build(lists: &[SensitiveCodeList]) -> Self {
        let mut by_system: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
        for (index, list) in lists.iter().enumerate() {
            for (system, code) in &list.codes {
                let categories = by_system
                    .entry(system.clone())
                    .or_default()
                    .entry(code.clone())
                    .or_default();
                if !categories.contains(&index) {
                    categories.push(index);
                }
            }
        }
        Self { by_system }
    }

    /// The categories `(system, code)` belongs to.
    pub(crate) fn lookup(&self, system: &str, code: &str) -> &[usize] {
        self.by_system
            .get(system)
            .and_then(|codes| codes.get(code))
            .map_or(&[], Vec::as_slice)
    }
}
