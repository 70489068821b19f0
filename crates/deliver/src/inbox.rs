//! Inbox: records held for partners that pull (`mode = "inbox"`), served a page at a time and
//! released when the partner acknowledges them (MESH-style store-and-forward, DOMAIN.md B1:
//! at-least-once, rows kept until acknowledged).
//!
//! Protocol, rendered as FHIR by the gateway (`GET /fhir/$inbox`, `POST /fhir/$inbox/ack`):
//! - A page lists pending records after a position, oldest first. Without a cursor the position
//!   is "everything not yet acknowledged", so an unacknowledged page comes back again.
//! - A non-empty page carries the cursor of its last record: use it to fetch the next page and to
//!   acknowledge everything up to it. An empty page has no cursor: the inbox is drained.
//! - Acknowledging marks the caller's records up to the cursor delivered (each with an audit
//!   event); they are never served again.
//!
//! Every query is scoped to the caller's partner id: a cursor is only a position, so one partner
//! can never read or acknowledge another's records whatever cursor it sends (OWASP API1).
//! Consent is checked again before each record is served; a record no longer allowed is withheld
//! for good and audited, and the page goes on without it.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caregate_audit::{Action, Actor, AuditEvent, Outcome};
use caregate_store::delivery::DeliveryResult;
use caregate_store::{LogEntry, Seq, Store};

use crate::error::InboxError;
use crate::events;
use crate::policy::{DeliveryPolicy, Recheck};

/// Records per page when the caller does not say (`_count`).
pub const DEFAULT_PAGE: usize = 50;
/// The most records one page may hold.
pub const MAX_PAGE: usize = 500;

const CURSOR_PREFIX: &str = "inbox1:";

/// An opaque inbox position (base64url of a versioned sequence number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxCursor(Seq);

impl InboxCursor {
    pub fn encode(self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{}", self.0))
    }

    pub fn decode(text: &str) -> Result<Self, InboxError> {
        if text.len() > 64 {
            return Err(InboxError::BadCursor);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| InboxError::BadCursor)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| InboxError::BadCursor)?;
        let seq = text
            .strip_prefix(CURSOR_PREFIX)
            .and_then(|seq| seq.parse::<Seq>().ok())
            .filter(|seq| *seq > 0)
            .ok_or(InboxError::BadCursor)?;
        Ok(Self(seq))
    }

    pub fn seq(self) -> Seq {
        self.0
    }
}

/// One page as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedPage {
    /// The records allowed now, oldest first.
    pub entries: Vec<LogEntry>,
    /// The position after this page, when it was not empty (see the module docs).
    pub next: Option<InboxCursor>,
    /// How many records of this page were withheld at serving time.
    pub withheld: usize,
}

/// The inbox service the gateway's handlers call.
#[derive(Clone)]
pub struct Inbox {
    store: Arc<dyn Store>,
    policy: Arc<dyn DeliveryPolicy>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

impl Inbox {
    pub fn new(store: Arc<dyn Store>, policy: Arc<dyn DeliveryPolicy>) -> Self {
        Self { store, policy }
    }

    /// A page of `partner`'s inbox after `cursor` (from the start of what is unacknowledged when
    /// `None`), with at most `count` records (clamped to 1..=[`MAX_PAGE`]).
    pub async fn page(
        &self,
        partner: &str,
        cursor: Option<InboxCursor>,
        count: usize,
    ) -> Result<ServedPage, InboxError> {
        let count = count.clamp(1, MAX_PAGE);
        let mut after = cursor.map_or(0, InboxCursor::seq);
        let mut entries = Vec::new();
        let mut withheld = 0;
        // Withheld records leave holes; read on until the page is full or the inbox ends.
        loop {
            let page = self
                .store
                .inbox_page(partner, after, count - entries.len())
                .await?;
            let mut not_yet = false;
            for row in page.rows {
                let recheck = self.policy.recheck(&row.entry, partner);
                if recheck == Recheck::NotYet {
                    // End the page before it: an acknowledgement covers everything up to its
                    // cursor, so nothing after an unserved row may be served yet.
                    not_yet = true;
                    break;
                }
                after = row.entry.seq;
                match recheck {
                    Recheck::NotYet => {}
                    Recheck::Allowed => entries.push(row.entry),
                    Recheck::Withheld { rule_id, reason } => {
                        let event = events::withheld(&row.entry, partner, &rule_id, &reason);
                        tracing::info!(partner = %partner, seq = row.entry.seq, rule_id = %rule_id, "inbox record withheld at delivery time");
                        self.store
                            .finish_delivery(
                                row.id,
                                DeliveryResult::Withheld { rule_id, reason },
                                vec![event],
                            )
                            .await?;
                        withheld += 1;
                    }
                }
            }
            if not_yet || !page.more || entries.len() >= count {
                break;
            }
        }
        let next = (after > cursor.map_or(0, InboxCursor::seq)).then_some(InboxCursor(after));
        Ok(ServedPage {
            entries,
            next,
            withheld,
        })
    }

    /// Acknowledge `partner`'s records up to `cursor`; each becomes delivered with an audit event
    /// (request id `request_id`). Returns how many were acknowledged now.
    pub async fn acknowledge(
        &self,
        partner: &str,
        cursor: InboxCursor,
        request_id: &str,
        actor: Actor,
    ) -> Result<u64, InboxError> {
        let mut template = AuditEvent::new(request_id, actor, Action::Deliver, Outcome::Success);
        template.actor.partner_id = Some(partner.to_owned());
        template.detail = Some("acknowledged from the inbox".to_owned());
        Ok(self
            .store
            .ack_inbox(partner, cursor.seq(), template)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_anything_else() {
        let cursor = InboxCursor(12345);
        assert_eq!(InboxCursor::decode(&cursor.encode()).unwrap(), cursor);
        for bad in ["", "12345", "aW5ib3gxOi0x", "!!!", &"A".repeat(100)] {
            assert!(InboxCursor::decode(bad).is_err(), "{bad}");
        }
    }
}
