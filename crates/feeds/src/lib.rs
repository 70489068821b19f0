//! Pseudonymised secondary-use feeds (issue 5): ICB analytics get linked, longitudinal data
//! about their population without names, addresses or NHS numbers, and without anyone who
//! opted out, served as FHIR Bulk Data NDJSON.
//!
//! - [`definition`]: `policies/feeds/*.toml`, validated at load; default-deny element rules.
//! - [`keys`]: per-feed, versioned HMAC keys in a 0600 key file (DOMAIN.md `PSEU-2`).
//! - [`transform`]: the pure transform ([`pseudonymise`], [`transform::Transformer`]).
//! - [`policy`]: [`FeedPolicy`], the interface to the policy stage's stored decisions.
//! - [`export`]: a feed as a reader of the committed log: NDJSON per type, disclosure control
//!   (DOMAIN.md `KANON`, `SDC-1`) and the release report.
//!
//! Architecture invariants: the transform does no I/O; no key, pseudonym input or patient value
//! is logged or put in an error; an element no rule mentions never leaves.

pub mod definition;
pub mod export;
pub mod keys;
pub mod nats;
pub mod policy;
pub mod runner;
pub mod transform;

pub use definition::FeedDefinition;
pub use keys::{FeedKey, KeyFile};
pub use policy::{DecisionFeedPolicy, FeedPolicy};
pub use transform::pseudonymise;
