//! The FHIR R4 layer of caregate: everything needed to turn untrusted bytes from a partner into a
//! [`ValidatedResource`] or an [`OperationOutcome`] that says what is wrong and where.
//!
//! The pipeline for one resource is, in order:
//! 1. [`json::parse_strict`] — bytes to a JSON value under FHIR JSON rules the plain parser misses
//!    (duplicate keys, nesting depth, BOM policy, invalid UTF-8);
//! 2. [`schema::SchemaRegistry`] — the project's JSON Schema for the resource type, compiled once;
//! 3. [`rules`] — the UK and FHIR rules a schema cannot express (NHS number Modulus 11 and ranges,
//!    ODS code format, identifier system normalisation, empty values, references);
//! 4. [`validate::Validator`] ties the three together and is the only way to build a
//!    [`ValidatedResource`].
//!
//! Architecture invariant: this crate does no I/O. Schemas are compiled into the binary.

pub mod bundle;
pub mod identifier;
pub mod json;
pub mod nhs_number;
pub mod ods;
pub mod outcome;
pub mod resource;
pub mod rules;
pub mod schema;
pub mod validate;

pub use outcome::{Issue, IssueCode, OperationOutcome, Severity};
pub use resource::{ResourceType, ValidatedResource};
pub use validate::Validator;
