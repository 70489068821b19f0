//! Errors of the policy crate. None of them carries a patient identifier: loaders report line
//! numbers, never the offending NHS number.

use std::path::PathBuf;

/// The policy bundle could not be loaded. The old bundle stays in force (the caller keeps it).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is malformed or breaks a bundle rule. `line` and `column` are 1-based; 0 when the
    /// problem is the file as a whole.
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A file the bundle needs is missing.
    #[error("{file}: missing from the policy bundle")]
    Missing { file: PathBuf },
    /// Cedar refused the assembled entities (a bug in the bundle's partner or agreement files that
    /// the per-file checks did not catch).
    #[error("policy entities rejected by the schema: {message}")]
    Entities { message: String },
}

/// A consent input was refused. Messages name the element or line, never the patient.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsentError {
    #[error("not a Consent resource")]
    NotAConsent,
    #[error("Consent.patient does not carry an NHS number identifier")]
    NoPatient,
    #[error("Consent.status is missing or not a FHIR R4 Consent status")]
    BadStatus,
    #[error("Consent.provision.type must be 'permit' or 'deny'")]
    NoProvisionType,
    #[error(
        "Consent.provision.actor names no organisation caregate can match (an ODS code identifier or a partner kind)"
    )]
    NoActor,
    #[error("{element} is not a valid FHIR dateTime")]
    BadDate { element: &'static str },
    #[error("line {line}: not a valid NHS number ({reason})")]
    BadListLine { line: usize, reason: String },
}
