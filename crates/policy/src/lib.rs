//! caregate's consent and information-governance (IG) decision core (issue 3).
//!
//! For every accepted record: which partners may receive it, which are withheld and why, and
//! which secondary-use feeds may include it — under the partners' data-sharing agreements, the
//! ICS's IG rules and the patient's own choices. The pieces:
//! - [`PolicyBundle`] — the files in `policies/` (Cedar schema and policies, the ICS model,
//!   agreements, sensitive code lists), validated and compiled once; its version is a content
//!   hash kept in every decision;
//! - [`ConsentRegistry`] — National Data Opt-out cache, Type 1 opt-outs, FHIR Consent, care
//!   relationships, in memory; read per patient through a [`ConsentView`];
//! - [`RecordFacts`] — what the policy needs from a [`caregate_fhir::ValidatedResource`];
//! - [`decide`] → [`Decision`] (Cedar's answers memoised per situation; [`decide_uncached`]
//!   always asks Cedar), and [`explain`] in words an IG officer understands;
//! - [`run_policy_tests`] — the table-driven cases in `policies/tests/*.toml`.
//!
//! Architecture invariant: this crate does no I/O except reading the bundle and test files it
//! is pointed at; [`decide`] is pure and deterministic (the bundle's memo of Cedar answers is
//! invisible in its results: `decision::equivalence` proves it).
//! Architecture invariant: no patient identifier appears in an error, a `Debug` output or an
//! explanation.

mod bundle;
mod codes;
mod consent;
mod decision;
mod error;
mod evaluation;
mod facts;
mod partner;
mod scenario;

pub use bundle::{Agreement, AgreementStatus, Feed, Partner, PolicyBundle, Purpose};
pub use codes::SensitiveCodeList;
pub use consent::{
    CareRelationship, ConsentActor, ConsentDirective, ConsentEffect, ConsentFor, ConsentRegistry,
    ConsentView, ListLoad, NdooCache, NdooFreshness, PARTNER_KIND_SYSTEM, PatientConsent,
};
pub use decision::{
    Decision, Delivery, FeedDecision, RULE_BREAK_GLASS, RULE_NO_AGREEMENT, RULE_NO_PERMIT,
    RULE_NO_RELATIONSHIP, RULE_POLICY_ERROR, Withheld, decide, decide_uncached, explain,
};
pub use error::{ConsentError, PolicyError};
pub use facts::{
    ACT_REASON, BreakGlass, CareEpisode, Coding, MissingReason, RecordFacts, SNOMED_CT,
    TYPE_1_OPT_OUT_CODE,
};
pub use partner::{InvalidPartnerId, InvalidPartnerKind, PartnerId, PartnerKind, PartnerRef};
pub use scenario::{CaseResult, PolicyTestReport, run_policy_tests};
