//! What the delivery stage keeps in the store (issue 4, DESIGN.md "deliver"): one *delivery row*
//! per (committed log entry, destination partner).
//!
//! A row is born `pending` when the fan-out reader routes a log entry to a partner, and ends
//! `delivered` (the partner answered 2xx, or acknowledged it in its inbox), `dead` (rejected for
//! good, or too old: a *dead letter*, kept with the partner's answer and replayable) or `withheld`
//! (consent or policy no longer allows it at delivery time). One table with a state column, not an
//! outbox table plus a dead-letter table plus an inbox table: a row changes state in place, so no
//! transition copies data between tables where a crash could lose or duplicate it, and a replay is
//! one `UPDATE`.
//!
//! Rows for one destination and one *order key* (the patient) are delivered in `seq` order: a row
//! is *due* only when no earlier row with the same key is still pending. On PostgreSQL several
//! gateway instances claim due rows with `FOR UPDATE SKIP LOCKED`; a claimed row stays pending, so
//! the same rule keeps per-patient order across instances.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{LogEntry, Seq};

/// A delivery row's id (assigned in `seq` order by the fan-out reader).
pub type DeliveryId = i64;

/// How a destination receives records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryChannel {
    /// Pushed over HTTPS to the partner's FHIR endpoint.
    Push,
    /// Held until the partner pulls and acknowledges it.
    Inbox,
}

impl DeliveryChannel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Push => "push",
            Self::Inbox => "inbox",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "push" => Some(Self::Push),
            "inbox" => Some(Self::Inbox),
            _ => None,
        }
    }
}

/// Where a delivery row is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryState {
    Pending,
    Delivered,
    /// A dead letter: kept with the partner's answer; an operator may replay it.
    Dead,
    /// Not sent: consent or policy no longer allows it (recorded in the audit log).
    Withheld,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
            Self::Withheld => "withheld",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(Self::Pending),
            "delivered" => Some(Self::Delivered),
            "dead" => Some(Self::Dead),
            "withheld" => Some(Self::Withheld),
            _ => None,
        }
    }
}

/// A row the fan-out reader creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    pub seq: Seq,
    /// The destination partner.
    pub partner: String,
    pub channel: DeliveryChannel,
    /// Rows with the same key (and destination) are delivered in `seq` order. An opaque digest,
    /// never a patient identifier in clear.
    pub order_key: String,
}

/// A pending row with the log entry it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDelivery {
    pub id: DeliveryId,
    pub partner: String,
    pub channel: DeliveryChannel,
    /// Attempts made before this one.
    pub attempts: u32,
    pub entry: LogEntry,
}

/// How one attempt ended (or why no attempt is made).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryResult {
    /// The partner has it.
    Delivered { status: Option<u16> },
    /// Try again at `next_attempt_at`. `error` is a short text without patient data.
    Retry {
        status: Option<u16>,
        error: String,
        next_attempt_at: OffsetDateTime,
    },
    /// Give up: a dead letter, with the partner's (already truncated) answer.
    Dead {
        status: Option<u16>,
        error: String,
        response: Vec<u8>,
    },
    /// Not allowed any more.
    Withheld { rule_id: String, reason: String },
}

/// The last failure seen for a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryFailure {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub status: Option<u16>,
    pub error: String,
}

/// Counters and lag for one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestinationStatus {
    pub partner: String,
    /// Rows not yet delivered (queue depth), including those waiting for a retry.
    pub pending: u64,
    pub delivered: u64,
    pub dead: u64,
    pub withheld: u64,
    /// Commit time of the oldest record not yet delivered.
    #[serde(with = "time::serde::rfc3339::option")]
    pub oldest_pending_committed_at: Option<OffsetDateTime>,
    pub last_failure: Option<DeliveryFailure>,
}

/// One dead letter, as operators see it. Holds no record content: the resource is named by type
/// and log position only (ids may carry patient identifiers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub id: DeliveryId,
    pub seq: Seq,
    pub partner: String,
    pub channel: DeliveryChannel,
    pub resource_type: String,
    pub attempts: u32,
    pub status: Option<u16>,
    pub error: String,
    /// The partner's answer, truncated by the delivery stage; lossy UTF-8.
    pub response: String,
    #[serde(with = "time::serde::rfc3339")]
    pub committed_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub dead_at: OffsetDateTime,
}

/// Which dead letters to put back in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplaySelector {
    One(DeliveryId),
    Partner(String),
}

/// One page of a partner's inbox: pending inbox rows after a position, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxPage {
    pub rows: Vec<PendingDelivery>,
    /// More rows follow the last one on this page.
    pub more: bool,
}
