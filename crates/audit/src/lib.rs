//! Audit events: one for every request (allowed or denied, authenticated or not) and one for every
//! record committed, written in the same store commit as the change they record (DOMAIN.md `AUD-3`:
//! failed and rejected calls are recorded in the same detail; ordering is by the store's sequence
//! number, not the wall clock).
//!
//! Tamper evidence (DOMAIN.md B1 "Verifiable logs", B2 `T1`/`T2`): events are the leaves of an
//! RFC 9162 Merkle tree ([`merkle`]) keyed by sequence number ([`event_hash`]); the store signs
//! checkpoints of the tree ([`checkpoint`]) and anyone holding the public key can verify a whole
//! log, or two checkpoints' consistency, offline ([`verify`]).
//!
//! Architecture invariant: this crate does no I/O; the store persists events, leaves and
//! checkpoints.

pub mod checkpoint;
pub mod event_hash;
pub mod export;
pub mod merkle;
pub mod report;
pub mod verify;

pub use checkpoint::{Checkpoint, CheckpointSigner, CheckpointVerifier, SignedCheckpoint};
pub use merkle::{Frontier, Hash};
pub use verify::{LogVerifier, VerifyReport, verify_log};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Who acted. Every field is optional because unauthenticated requests are audited too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The partner id from the registry, once authenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partner_id: Option<String>,
    /// The partner's ODS code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ods_code: Option<String>,
    /// The OAuth client id presented (may be unknown to the registry on a failed attempt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The peer address of the connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_addr: Option<String>,
}

/// What was done. Names follow FHIR interactions where one fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// `POST /auth/token`: a client asked for an access token.
    TokenRequest,
    /// A FHIR create.
    Create,
    /// A FHIR update.
    Update,
    /// A FHIR read.
    Read,
    /// A Bundle submission (batch, transaction or message) as a whole.
    BundleSubmit,
    /// A capability or other non-patient request.
    Metadata,
    /// A request that did not reach a FHIR interaction (bad route, bad auth, bad framing).
    Request,
    /// An IG officer marked a break-glass event as reviewed (DOMAIN.md `LR-2`).
    Review,
    /// An IG officer searched or viewed the audit log (or a subject-access report).
    AuditQuery,
    /// An IG officer exported audit events (CSV or FHIR `AuditEvent` NDJSON).
    Export,
    /// A record was delivered to a partner (pushed and accepted, or acknowledged from its inbox);
    /// outcome `failed` when it became a dead letter. The actor is the destination partner.
    Deliver,
    /// A record routed to a partner at intake was not delivered: consent or policy no longer
    /// allows it (DESIGN.md invariant 2). `rule_ids` and `detail` say why.
    Withhold,
    /// An operator put dead letters back in the delivery queue.
    DeliveryReplay,
    /// The consent/IG policy bundle was reloaded (or a reload was refused).
    PolicyReload,
    /// A finished Bulk Data export reached the end of its retention (`[feeds]
    /// export_retention_secs`): its files were deleted and its job removed. The actor is
    /// `system/export-retention`; `detail` names the export, its feed and its owner partner.
    ExportExpiry,
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Success,
    /// The caller's fault (4xx).
    Rejected,
    /// Our fault or an unavailable dependency (5xx).
    Failed,
}

impl Outcome {
    /// The outcome implied by an HTTP status code.
    pub fn from_status(status: u16) -> Self {
        match status {
            200..=399 => Self::Success,
            400..=499 => Self::Rejected,
            _ => Self::Failed,
        }
    }
}

/// The record an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    pub resource_type: String,
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_id: Option<i64>,
    /// Hex SHA-256 of the stored canonical content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
}

/// One audit event. The store assigns its sequence number on commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    #[serde(with = "time::serde::rfc3339")]
    pub recorded: OffsetDateTime,
    /// The request id (echoed to the client as `X-Request-Id`), joining all events of one request.
    pub request_id: String,
    pub actor: Actor,
    pub action: Action,
    pub outcome: Outcome,
    /// HTTP status returned for the request, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity: Option<Entity>,
    /// NHS number of the patient concerned. Stored for IG queries; never logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose_of_use: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule_ids: Vec<String>,
    /// A short machine-oriented detail (e.g. the OperationOutcome issue codes). No patient data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl AuditEvent {
    /// A new event stamped now.
    pub fn new(
        request_id: impl Into<String>,
        actor: Actor,
        action: Action,
        outcome: Outcome,
    ) -> Self {
        Self {
            recorded: OffsetDateTime::now_utc(),
            request_id: request_id.into(),
            actor,
            action,
            outcome,
            status: None,
            entity: None,
            patient: None,
            purpose_of_use: None,
            policy_version: None,
            rule_ids: Vec::new(),
            detail: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aud_3_outcome_follows_status_class() {
        assert_eq!(Outcome::from_status(201), Outcome::Success);
        assert_eq!(Outcome::from_status(401), Outcome::Rejected);
        assert_eq!(Outcome::from_status(503), Outcome::Failed);
    }

    #[test]
    fn event_round_trips_through_json() {
        let mut event =
            AuditEvent::new("req-1", Actor::default(), Action::Create, Outcome::Success);
        event.entity = Some(Entity {
            resource_type: "Patient".into(),
            id: "p1".into(),
            version_id: Some(1),
            content_hash: None,
        });
        let json = serde_json::to_string(&event).unwrap();
        let back: AuditEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, event);
    }
}
