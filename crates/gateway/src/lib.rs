//! caregate's HTTP surface: the TLS edge and its limits, the SMART Backend Services token
//! endpoint, and the FHIR intake endpoints.
//!
//! Architecture invariants:
//! - only this crate renders wire errors (OperationOutcome / OAuth JSON), through [`error`];
//! - a 2xx for a write is sent only after `Store::submit` returned, i.e. after the commit is durable;
//! - every request produces exactly one request audit event (see [`app`]);
//! - no patient identifier appears in a log line or in an error sent to a partner.

pub mod admin;
pub mod app;
pub mod break_glass;
pub mod bulk_export;
pub mod capability;
pub mod config;
pub mod console;
pub mod context;
pub mod deliveries_api;
pub mod error;
pub mod fhir_api;
pub mod metrics;
pub mod policy_stage;
pub mod runtime;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod token;
