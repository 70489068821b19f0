//! The PostgreSQL side of delivery (issue 4): the `deliveries` table, written through the
//! writer and read on the read connections. See [`crate::delivery`] for the life of a row and
//! `sqlite_delivery.rs` for the SQLite twin.
//!
//! **Claims across instances.** [`CLAIM_DUE`] is SQLite's due-head query plus
//! `FOR UPDATE OF d SKIP LOCKED`: a row another instance is claiming (or finishing) right now is
//! skipped rather than waited for, and the lease written in the same transaction keeps it from
//! being claimed again after that transaction commits (PostgreSQL re-checks the `WHERE` clause on
//! the newest row version when it locks a row, so a lease committed meanwhile is seen). A claimed
//! row stays `pending`, so the order rule (no earlier pending row with the same order key) holds
//! across instances too.

use std::time::Duration;

use caregate_audit::{AuditEvent, Entity};
use time::OffsetDateTime;
use tokio_postgres::{Client, Row};

use super::writer::{Appender, BatchClock, Tx, insert_audit, save_cursor};
use super::{Fault, LOG_COLUMNS, hash32, limit_param, log_entry};
use crate::Seq;
use crate::delivery::{
    DeadLetter, DeliveryChannel, DeliveryFailure, DeliveryId, DeliveryResult, DestinationStatus,
    InboxPage, NewDelivery, PendingDelivery, ReplaySelector,
};

/// Due push heads of one destination. `$1` partner, `$2` now, `$3` limit.
const CLAIM_DUE: &str = "SELECT d.id FROM deliveries d \
     WHERE d.partner = $1 AND d.state = 'pending' AND d.channel = 'push' \
       AND d.next_attempt_at <= $2 AND (d.lease_until IS NULL OR d.lease_until <= $2) \
       AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.partner = d.partner \
           AND e.order_key = d.order_key AND e.state = 'pending' AND e.seq < d.seq) \
     ORDER BY d.seq LIMIT $3 \
     FOR UPDATE OF d SKIP LOCKED";

/// Columns after [`LOG_COLUMNS`] in every query that returns a [`PendingDelivery`].
const PENDING_COLUMNS: &str = "d.id, d.partner, d.channel, d.attempts";

/// Writer requests for delivery.
pub(super) enum DeliveryWork {
    Enqueue {
        reader: String,
        through: Seq,
        rows: Vec<NewDelivery>,
    },
    Claim {
        partner: String,
        limit: usize,
        lease: Duration,
    },
    Finish {
        id: DeliveryId,
        result: DeliveryResult,
        audit: Vec<AuditEvent>,
    },
    AckInbox {
        partner: String,
        through: Seq,
        template: AuditEvent,
    },
    Replay {
        selector: ReplaySelector,
        audit: AuditEvent,
    },
}

impl DeliveryWork {
    /// Whether this request writes audit events (and so needs the log lock).
    pub(super) fn appends(&self) -> bool {
        match self {
            Self::Enqueue { .. } | Self::Claim { .. } => false,
            Self::Finish { audit, .. } => !audit.is_empty(),
            Self::AckInbox { .. } | Self::Replay { .. } => true,
        }
    }
}

/// The writer's answers to [`DeliveryWork`].
pub(super) enum DeliveryAnswer {
    Count(u64),
    Claimed(Vec<PendingDelivery>),
    Finished(bool),
}

fn pending(row: &Row) -> Result<PendingDelivery, Fault> {
    let channel: String = row.try_get(12)?;
    let attempts: i32 = row.try_get(13)?;
    Ok(PendingDelivery {
        entry: log_entry(row, 0)?,
        id: row.try_get(10)?,
        partner: row.try_get(11)?,
        channel: DeliveryChannel::parse(&channel)
            .ok_or_else(|| Fault::Corrupt("a delivery row has an unknown channel".to_owned()))?,
        attempts: u32::try_from(attempts).unwrap_or(0),
    })
}

fn status_param(status: Option<u16>) -> Option<i32> {
    status.map(i32::from)
}

fn status_value(status: Option<i32>) -> Option<u16> {
    status.and_then(|status| u16::try_from(status).ok())
}

/// Apply one delivery request inside the writer's transaction (its own savepoint).
pub(super) async fn apply(
    tx: &Tx<'_, '_>,
    work: &DeliveryWork,
    clock: &BatchClock,
    appender: &mut Appender,
) -> Result<DeliveryAnswer, Fault> {
    Ok(match work {
        DeliveryWork::Enqueue {
            reader,
            through,
            rows,
        } => {
            let mut created = 0u64;
            for row in rows {
                created += tx
                    .execute(
                        "INSERT INTO deliveries (seq, partner, channel, order_key, state, \
                         created_at, next_attempt_at) VALUES ($1, $2, $3, $4, 'pending', $5, $5) \
                         ON CONFLICT (seq, partner) DO NOTHING",
                        &[
                            &row.seq,
                            &row.partner,
                            &row.channel.as_str(),
                            &row.order_key,
                            &clock.at,
                        ],
                    )
                    .await?;
            }
            save_cursor(tx, reader, *through).await?;
            DeliveryAnswer::Count(created)
        }
        DeliveryWork::Claim {
            partner,
            limit,
            lease,
        } => {
            let until = clock.at
                + time::Duration::try_from(*lease)
                    .map_err(|_| Fault::Encode("lease too long".to_owned()))?;
            let ids: Vec<DeliveryId> = tx
                .query(CLAIM_DUE, &[partner, &clock.at, &limit_param(*limit)])
                .await?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
            if ids.is_empty() {
                return Ok(DeliveryAnswer::Claimed(Vec::new()));
            }
            tx.execute(
                "UPDATE deliveries SET lease_until = $2 WHERE id = ANY($1)",
                &[&ids, &until],
            )
            .await?;
            let rows = tx
                .query(
                    &format!(
                        "SELECT {LOG_COLUMNS}, {PENDING_COLUMNS} FROM deliveries d \
                         JOIN log l ON l.seq = d.seq WHERE d.id = ANY($1) ORDER BY d.seq"
                    ),
                    &[&ids],
                )
                .await?;
            DeliveryAnswer::Claimed(rows.iter().map(pending).collect::<Result<_, _>>()?)
        }
        DeliveryWork::Finish { id, result, audit } => {
            let changed = finish(tx, *id, result, clock).await?;
            if changed {
                insert_audit(tx, audit, appender).await?;
            }
            DeliveryAnswer::Finished(changed)
        }
        DeliveryWork::AckInbox {
            partner,
            through,
            template,
        } => DeliveryAnswer::Count(
            ack_inbox(tx, partner, *through, template, clock, appender).await?,
        ),
        DeliveryWork::Replay { selector, audit } => {
            let changed = match selector {
                ReplaySelector::One(id) => {
                    tx.execute(
                        "UPDATE deliveries SET state = 'pending', attempts = 0, \
                         next_attempt_at = $2, lease_until = NULL, finished_at = NULL, \
                         response = NULL WHERE id = $1 AND state = 'dead'",
                        &[id, &clock.at],
                    )
                    .await?
                }
                ReplaySelector::Partner(partner) => {
                    tx.execute(
                        "UPDATE deliveries SET state = 'pending', attempts = 0, \
                         next_attempt_at = $2, lease_until = NULL, finished_at = NULL, \
                         response = NULL WHERE partner = $1 AND state = 'dead'",
                        &[partner, &clock.at],
                    )
                    .await?
                }
            };
            insert_audit(tx, std::slice::from_ref(audit), appender).await?;
            DeliveryAnswer::Count(changed)
        }
    })
}

async fn finish(
    tx: &Tx<'_, '_>,
    id: DeliveryId,
    result: &DeliveryResult,
    clock: &BatchClock,
) -> Result<bool, Fault> {
    let changed = match result {
        DeliveryResult::Delivered { status } => {
            tx.execute(
                "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, \
                 finished_at = $2, last_status = $3, lease_until = NULL \
                 WHERE id = $1 AND state = 'pending'",
                &[&id, &clock.at, &status_param(*status)],
            )
            .await?
        }
        DeliveryResult::Retry {
            status,
            error,
            next_attempt_at,
        } => {
            tx.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = $3, \
                 last_status = $4, last_error = $5, last_error_at = $2, lease_until = NULL \
                 WHERE id = $1 AND state = 'pending'",
                &[
                    &id,
                    &clock.at,
                    next_attempt_at,
                    &status_param(*status),
                    error,
                ],
            )
            .await?
        }
        DeliveryResult::Dead {
            status,
            error,
            response,
        } => {
            tx.execute(
                "UPDATE deliveries SET state = 'dead', attempts = attempts + 1, finished_at = $2, \
                 last_status = $3, last_error = $4, last_error_at = $2, response = $5, \
                 lease_until = NULL WHERE id = $1 AND state = 'pending'",
                &[&id, &clock.at, &status_param(*status), error, response],
            )
            .await?
        }
        DeliveryResult::Withheld { rule_id, reason } => {
            tx.execute(
                "UPDATE deliveries SET state = 'withheld', finished_at = $2, last_error = $3, \
                 lease_until = NULL WHERE id = $1 AND state = 'pending'",
                &[&id, &clock.at, &format!("withheld ({rule_id}): {reason}")],
            )
            .await?
        }
    };
    Ok(changed > 0)
}

async fn ack_inbox(
    tx: &Tx<'_, '_>,
    partner: &str,
    through: Seq,
    template: &AuditEvent,
    clock: &BatchClock,
    appender: &mut Appender,
) -> Result<u64, Fault> {
    let acked = tx
        .query(
            "SELECT d.id, l.resource_type, l.id, l.version_id, l.content_hash, l.nhs_number \
             FROM deliveries d JOIN log l ON l.seq = d.seq \
             WHERE d.partner = $1 AND d.state = 'pending' AND d.channel = 'inbox' \
               AND d.seq <= $2 \
             ORDER BY d.seq FOR UPDATE OF d",
            &[&partner, &through],
        )
        .await?;
    let mut events = Vec::with_capacity(acked.len());
    for row in &acked {
        let id: DeliveryId = row.try_get(0)?;
        let content_hash: Vec<u8> = row.try_get(4)?;
        let content_hash = hash32(&content_hash, "content hash")?;
        tx.execute(
            "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, \
             finished_at = $2 WHERE id = $1",
            &[&id, &clock.at],
        )
        .await?;
        let mut event = template.clone();
        event.entity = Some(Entity {
            resource_type: row.try_get(1)?,
            id: row.try_get(2)?,
            version_id: Some(row.try_get(3)?),
            content_hash: Some(content_hash.iter().map(|b| format!("{b:02x}")).collect()),
        });
        event.patient = row.try_get(5)?;
        events.push(event);
    }
    insert_audit(tx, &events, appender).await?;
    Ok(u64::try_from(acked.len()).unwrap_or(u64::MAX))
}

/// Pending inbox rows after `after`, one more than asked to learn whether more follow.
pub(super) async fn inbox_page(
    client: &Client,
    partner: &str,
    after: Seq,
    limit: usize,
) -> Result<InboxPage, Fault> {
    let rows = client
        .query(
            &format!(
                "SELECT {LOG_COLUMNS}, {PENDING_COLUMNS} FROM deliveries d \
                 JOIN log l ON l.seq = d.seq \
                 WHERE d.partner = $1 AND d.state = 'pending' AND d.channel = 'inbox' \
                   AND d.seq > $2 \
                 ORDER BY d.seq LIMIT $3"
            ),
            &[&partner, &after, &limit_param(limit.saturating_add(1))],
        )
        .await?;
    let mut rows = rows.iter().map(pending).collect::<Result<Vec<_>, _>>()?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    Ok(InboxPage { rows, more })
}

pub(super) async fn status(
    client: &Client,
    partner: Option<&str>,
) -> Result<Vec<DestinationStatus>, Fault> {
    let rows = client
        .query(
            "SELECT d.partner, \
               COUNT(*) FILTER (WHERE d.state = 'pending'), \
               COUNT(*) FILTER (WHERE d.state = 'delivered'), \
               COUNT(*) FILTER (WHERE d.state = 'dead'), \
               COUNT(*) FILTER (WHERE d.state = 'withheld'), \
               MIN(l.committed_at) FILTER (WHERE d.state = 'pending') \
             FROM deliveries d JOIN log l ON l.seq = d.seq \
             WHERE ($1::TEXT IS NULL OR d.partner = $1) \
             GROUP BY d.partner ORDER BY d.partner",
            &[&partner],
        )
        .await?;
    let to_u64 = |n: i64| u64::try_from(n).unwrap_or(0);
    let mut statuses = Vec::with_capacity(rows.len());
    for row in &rows {
        let partner: String = row.try_get(0)?;
        let failure = client
            .query_opt(
                "SELECT last_error_at, last_status, last_error FROM deliveries \
                 WHERE partner = $1 AND last_error_at IS NOT NULL \
                 ORDER BY last_error_at DESC LIMIT 1",
                &[&partner],
            )
            .await?
            .map(|failure| {
                Ok::<_, Fault>(DeliveryFailure {
                    at: failure.try_get(0)?,
                    status: status_value(failure.try_get(1)?),
                    error: failure.try_get::<_, Option<String>>(2)?.unwrap_or_default(),
                })
            })
            .transpose()?;
        statuses.push(DestinationStatus {
            partner,
            pending: to_u64(row.try_get(1)?),
            delivered: to_u64(row.try_get(2)?),
            dead: to_u64(row.try_get(3)?),
            withheld: to_u64(row.try_get(4)?),
            oldest_pending_committed_at: row.try_get::<_, Option<OffsetDateTime>>(5)?,
            last_failure: failure,
        });
    }
    Ok(statuses)
}

pub(super) async fn dead_letters(
    client: &Client,
    partner: Option<&str>,
    after: DeliveryId,
    limit: usize,
) -> Result<Vec<DeadLetter>, Fault> {
    let rows = client
        .query(
            "SELECT d.id, d.seq, d.partner, d.channel, l.resource_type, d.attempts, \
               d.last_status, d.last_error, d.response, l.committed_at, d.finished_at \
             FROM deliveries d JOIN log l ON l.seq = d.seq \
             WHERE d.state = 'dead' AND d.id > $1 AND ($3::TEXT IS NULL OR d.partner = $3) \
             ORDER BY d.id LIMIT $2",
            &[&after, &limit_param(limit), &partner],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let channel: String = row.try_get(3)?;
            let attempts: i32 = row.try_get(5)?;
            Ok(DeadLetter {
                id: row.try_get(0)?,
                seq: row.try_get(1)?,
                partner: row.try_get(2)?,
                channel: DeliveryChannel::parse(&channel).ok_or_else(|| {
                    Fault::Corrupt("a delivery row has an unknown channel".to_owned())
                })?,
                resource_type: row.try_get(4)?,
                attempts: u32::try_from(attempts).unwrap_or(0),
                status: status_value(row.try_get(6)?),
                error: row.try_get::<_, Option<String>>(7)?.unwrap_or_default(),
                response: String::from_utf8_lossy(
                    &row.try_get::<_, Option<Vec<u8>>>(8)?.unwrap_or_default(),
                )
                .into_owned(),
                committed_at: row.try_get(9)?,
                dead_at: row
                    .try_get::<_, Option<OffsetDateTime>>(10)?
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            })
        })
        .collect()
}
