//! What operators do with deliveries, for the CLI (`caregate deliveries …`) and the admin API:
//! queue depth and lag per destination, the dead letters, and replaying them.

use caregate_audit::{Action, Actor, AuditEvent, Outcome};
use caregate_store::Store;
use caregate_store::delivery::{DeadLetter, DeliveryId, DestinationStatus, ReplaySelector};
use serde::Serialize;
use time::OffsetDateTime;

use crate::error::DeliverError;

/// The most dead letters one listing returns.
pub const MAX_DEAD_LETTERS: usize = 1000;

/// One destination's status, with the age of its oldest undelivered record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusReport {
    #[serde(flatten)]
    pub status: DestinationStatus,
    /// Seconds since the oldest undelivered record was committed.
    pub oldest_pending_age_secs: Option<i64>,
}

/// Status of every destination with delivery rows (or one).
pub async fn status(
    store: &dyn Store,
    partner: Option<&str>,
) -> Result<Vec<StatusReport>, DeliverError> {
    let now = OffsetDateTime::now_utc();
    Ok(store
        .delivery_status(partner)
        .await?
        .into_iter()
        .map(|status| StatusReport {
            oldest_pending_age_secs: status
                .oldest_pending_committed_at
                .map(|at| (now - at).whole_seconds().max(0)),
            status,
        })
        .collect())
}

/// Dead letters after `after`, oldest first.
pub async fn dead_letters(
    store: &dyn Store,
    partner: Option<&str>,
    after: DeliveryId,
    limit: usize,
) -> Result<Vec<DeadLetter>, DeliverError> {
    Ok(store
        .dead_letters(partner, after, limit.clamp(1, MAX_DEAD_LETTERS))
        .await?)
}

/// Whether `id` names a dead letter now (an operator's replay of anything else is refused).
pub async fn is_dead_letter(store: &dyn Store, id: DeliveryId) -> Result<bool, DeliverError> {
    let Some(after) = id.checked_sub(1) else {
        return Ok(false);
    };
    Ok(store
        .dead_letters(None, after, 1)
        .await?
        .first()
        .is_some_and(|letter| letter.id == id))
}

/// What a replay does, in words for the audit event (no patient data: ids and partner ids).
pub fn describe(selector: &ReplaySelector) -> String {
    match selector {
        ReplaySelector::One(id) => format!("replay dead letter {id}"),
        ReplaySelector::Partner(partner) => format!("replay dead letters of {partner}"),
    }
}

/// Put dead letters back in the queue; audited as `delivery-replay` by `operator` (the command
/// line). The delivery keeps its idempotency key, so a partner that did receive it drops the
/// repeat.
pub async fn replay(
    store: &dyn Store,
    selector: ReplaySelector,
    request_id: &str,
    operator: &str,
) -> Result<u64, DeliverError> {
    let actor = Actor {
        client_id: Some(operator.to_owned()),
        ..Actor::default()
    };
    let event = AuditEvent::new(request_id, actor, Action::DeliveryReplay, Outcome::Success);
    replay_audited(store, selector, event).await
}

/// Put dead letters back in the queue with `event` — the operator's request, e.g. an admin API
/// call's own audit event — written in the same commit. The action becomes `delivery-replay`;
/// a missing detail is filled with [`describe`]; a partner selector names the partner.
pub async fn replay_audited(
    store: &dyn Store,
    selector: ReplaySelector,
    mut event: AuditEvent,
) -> Result<u64, DeliverError> {
    event.action = Action::DeliveryReplay;
    if event.detail.is_none() {
        event.detail = Some(describe(&selector));
    }
    if let ReplaySelector::Partner(partner) = &selector
        && event.actor.partner_id.is_none()
    {
        event.actor.partner_id = Some(partner.clone());
    }
    Ok(store.replay_dead_letters(selector, event).await?)
}
