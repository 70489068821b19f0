//! The audit events delivery writes, in the same commit as the state change they record. The
//! actor is the destination partner, so an IG officer searching by partner finds what it was sent
//! or denied; the request id is the delivery's idempotency key, joining every attempt.

use caregate_audit::{Action, Actor, AuditEvent, Entity, Outcome};
use caregate_store::LogEntry;

use crate::keys::idempotency_key;

fn entity(entry: &LogEntry) -> Entity {
    Entity {
        resource_type: entry.resource_type.clone(),
        id: entry.id.clone(),
        version_id: Some(entry.version_id),
        content_hash: Some(hex::encode(entry.content_hash)),
    }
}

/// An event about delivering `entry` to `partner`.
pub(crate) fn delivery_event(
    entry: &LogEntry,
    partner: &str,
    action: Action,
    outcome: Outcome,
) -> AuditEvent {
    let actor = Actor {
        partner_id: Some(partner.to_owned()),
        ..Actor::default()
    };
    let mut event = AuditEvent::new(idempotency_key(entry.seq, partner), actor, action, outcome);
    event.entity = Some(entity(entry));
    event.patient = entry.nhs_number.clone();
    event
}

/// `entry` was withheld from `partner` at delivery time.
pub(crate) fn withheld(entry: &LogEntry, partner: &str, rule_id: &str, reason: &str) -> AuditEvent {
    let mut event = delivery_event(entry, partner, Action::Withhold, Outcome::Success);
    event.rule_ids = vec![rule_id.to_owned()];
    event.detail = Some(format!("withheld at delivery: {reason}"));
    event
}
