//! The SQLite side of delivery (issue 4): the `deliveries` table, written only through the store's
//! single writer thread ([`DeliveryWork`]) and read on the read pool. See [`crate::delivery`] for
//! the life of a row.
//!
//! A child module of [`super`] (declared there with `#[path]`) so it shares the store's private
//! helpers (timestamps, `Fault`, the audit insert, the log row reader) without widening their
//! visibility.
//!
//! **Due rows.** [`CLAIM_DUE`] walks `deliveries_pending` (partner, seq) in `seq` order and keeps a
//! row only if no earlier pending row of the same destination has the same order key (a probe of
//! `deliveries_pending_by_key`), so a claim costs about as many index steps as rows it skips
//! before finding `limit` due heads. The PostgreSQL twin is the same query with
//! `FOR UPDATE SKIP LOCKED` in place of the lease check.

use std::time::Duration;

use caregate_audit::{AuditEvent, Entity, Frontier};
use rusqlite::{Connection, Row, params};
use time::OffsetDateTime;

use super::{
    Answer, BatchClock, Fault, LOG_COLUMNS, RawLogEntry, SqliteStore, UPSERT_CURSOR, Work,
    insert_audit, parse_timestamp, timestamp_text,
};
use crate::delivery::{
    DeadLetter, DeliveryChannel, DeliveryFailure, DeliveryId, DeliveryResult, DestinationStatus,
    InboxPage, NewDelivery, PendingDelivery, ReplaySelector,
};
use crate::{Seq, StoreError};

/// Schema step: delivery rows (outbox, inbox and dead letters in one table, by state).
pub(super) const SCHEMA_DELIVERY: &str = "
-- One row per (committed log entry, destination partner): see caregate_store::delivery.
CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    seq             INTEGER NOT NULL REFERENCES log (seq),
    partner         TEXT    NOT NULL,
    channel         TEXT    NOT NULL CHECK (channel IN ('push', 'inbox')),
    -- Rows with the same (partner, order_key) are delivered in seq order. A digest, not an id.
    order_key       TEXT    NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'delivered', 'dead', 'withheld')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      TEXT    NOT NULL,
    next_attempt_at TEXT    NOT NULL,
    -- A claimed row is not claimed again before this (a crash mid-attempt lets it expire).
    lease_until     TEXT,
    finished_at     TEXT,
    last_status     INTEGER,
    last_error      TEXT,
    last_error_at   TEXT,
    -- The partner's answer when the row became a dead letter (truncated).
    response        BLOB,
    UNIQUE (seq, partner)
);
CREATE INDEX deliveries_pending ON deliveries (partner, seq) WHERE state = 'pending';
CREATE INDEX deliveries_pending_by_key ON deliveries (partner, order_key, seq)
    WHERE state = 'pending';
CREATE INDEX deliveries_dead ON deliveries (id) WHERE state = 'dead';
CREATE INDEX deliveries_failures ON deliveries (partner, last_error_at)
    WHERE last_error_at IS NOT NULL;
";

const INSERT_DELIVERY: &str = "INSERT INTO deliveries (seq, partner, channel, order_key, state, \
     created_at, next_attempt_at) VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5) \
     ON CONFLICT (seq, partner) DO NOTHING";

/// Due push heads of one destination (see the module docs). `?1` partner, `?2` now, `?3` limit.
const CLAIM_DUE: &str = "SELECT d.id FROM deliveries d \
     WHERE d.partner = ?1 AND d.state = 'pending' AND d.channel = 'push' \
       AND d.next_attempt_at <= ?2 AND (d.lease_until IS NULL OR d.lease_until <= ?2) \
       AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.partner = d.partner \
           AND e.order_key = d.order_key AND e.state = 'pending' AND e.seq < d.seq) \
     ORDER BY d.seq LIMIT ?3";

const LEASE: &str = "UPDATE deliveries SET lease_until = ?2 WHERE id = ?1";

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

/// The writer's answers to [`DeliveryWork`].
pub(super) enum DeliveryAnswer {
    Count(u64),
    Claimed(Vec<PendingDelivery>),
    Finished(bool),
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn count(changed: usize) -> u64 {
    u64::try_from(changed).unwrap_or(u64::MAX)
}

/// A pending row: [`LOG_COLUMNS`] then [`PENDING_COLUMNS`].
fn pending_from_row(
    row: &Row<'_>,
) -> rusqlite::Result<(RawLogEntry, DeliveryId, String, String, i64)> {
    Ok((
        RawLogEntry::from_row(row)?,
        row.get(10)?,
        row.get(11)?,
        row.get(12)?,
        row.get(13)?,
    ))
}

fn into_pending(
    (raw, id, partner, channel, attempts): (RawLogEntry, DeliveryId, String, String, i64),
) -> Result<PendingDelivery, Fault> {
    let channel = DeliveryChannel::parse(&channel)
        .ok_or_else(|| Fault::Corrupt("a delivery row has an unknown channel".to_owned()))?;
    Ok(PendingDelivery {
        id,
        partner,
        channel,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        entry: raw.into_entry()?,
    })
}

fn select_pending(conn: &Connection, id: DeliveryId) -> Result<PendingDelivery, Fault> {
    let row = conn
        .prepare_cached(&format!(
            "SELECT {LOG_COLUMNS}, {PENDING_COLUMNS} FROM deliveries d JOIN log l ON l.seq = d.seq \
             WHERE d.id = ?1"
        ))?
        .query_row(params![id], pending_from_row)?;
    into_pending(row)
}

/// Apply one delivery request inside the writer's transaction (its own savepoint).
pub(super) fn apply(
    conn: &Connection,
    work: &DeliveryWork,
    clock: &BatchClock,
    frontier: &mut Frontier,
) -> Result<Answer, Fault> {
    let answer = match work {
        DeliveryWork::Enqueue {
            reader,
            through,
            rows,
        } => {
            let mut insert = conn.prepare_cached(INSERT_DELIVERY)?;
            let mut created = 0u64;
            for row in rows {
                created += count(insert.execute(params![
                    row.seq,
                    row.partner,
                    row.channel.as_str(),
                    row.order_key,
                    clock.text,
                ])?);
            }
            conn.prepare_cached(UPSERT_CURSOR)?
                .execute(params![reader, through])?;
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
            let until = timestamp_text(until)?;
            let ids = conn
                .prepare_cached(CLAIM_DUE)?
                .query_map(params![partner, clock.text, limit_param(*limit)], |row| {
                    row.get::<_, DeliveryId>(0)
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let mut lease = conn.prepare_cached(LEASE)?;
            let mut claimed = Vec::with_capacity(ids.len());
            for id in ids {
                lease.execute(params![id, until])?;
                claimed.push(select_pending(conn, id)?);
            }
            DeliveryAnswer::Claimed(claimed)
        }
        DeliveryWork::Finish { id, result, audit } => {
            let changed = finish(conn, *id, result, clock)?;
            if changed {
                insert_audit(conn, audit, frontier)?;
            }
            DeliveryAnswer::Finished(changed)
        }
        DeliveryWork::AckInbox {
            partner,
            through,
            template,
        } => DeliveryAnswer::Count(ack_inbox(
            conn, partner, *through, template, clock, frontier,
        )?),
        DeliveryWork::Replay { selector, audit } => {
            let changed = match selector {
                ReplaySelector::One(id) => conn
                    .prepare_cached(
                        "UPDATE deliveries SET state = 'pending', attempts = 0, \
                         next_attempt_at = ?2, lease_until = NULL, finished_at = NULL, \
                         response = NULL WHERE id = ?1 AND state = 'dead'",
                    )?
                    .execute(params![id, clock.text])?,
                ReplaySelector::Partner(partner) => conn
                    .prepare_cached(
                        "UPDATE deliveries SET state = 'pending', attempts = 0, \
                         next_attempt_at = ?2, lease_until = NULL, finished_at = NULL, \
                         response = NULL WHERE partner = ?1 AND state = 'dead'",
                    )?
                    .execute(params![partner, clock.text])?,
            };
            insert_audit(conn, std::slice::from_ref(audit), frontier)?;
            DeliveryAnswer::Count(count(changed))
        }
    };
    Ok(Answer::Delivery(answer))
}

fn finish(
    conn: &Connection,
    id: DeliveryId,
    result: &DeliveryResult,
    clock: &BatchClock,
) -> Result<bool, Fault> {
    let changed = match result {
        DeliveryResult::Delivered { status } => conn
            .prepare_cached(
                "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, \
                 finished_at = ?2, last_status = ?3, lease_until = NULL \
                 WHERE id = ?1 AND state = 'pending'",
            )?
            .execute(params![id, clock.text, status])?,
        DeliveryResult::Retry {
            status,
            error,
            next_attempt_at,
        } => conn
            .prepare_cached(
                "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?3, \
                 last_status = ?4, last_error = ?5, last_error_at = ?2, lease_until = NULL \
                 WHERE id = ?1 AND state = 'pending'",
            )?
            .execute(params![
                id,
                clock.text,
                timestamp_text(*next_attempt_at)?,
                status,
                error
            ])?,
        DeliveryResult::Dead {
            status,
            error,
            response,
        } => conn
            .prepare_cached(
                "UPDATE deliveries SET state = 'dead', attempts = attempts + 1, finished_at = ?2, \
                 last_status = ?3, last_error = ?4, last_error_at = ?2, response = ?5, \
                 lease_until = NULL WHERE id = ?1 AND state = 'pending'",
            )?
            .execute(params![id, clock.text, status, error, response])?,
        DeliveryResult::Withheld { rule_id, reason } => conn
            .prepare_cached(
                "UPDATE deliveries SET state = 'withheld', finished_at = ?2, last_error = ?3, \
                 lease_until = NULL WHERE id = ?1 AND state = 'pending'",
            )?
            .execute(params![
                id,
                clock.text,
                format!("withheld ({rule_id}): {reason}")
            ])?,
    };
    Ok(changed > 0)
}

fn ack_inbox(
    conn: &Connection,
    partner: &str,
    through: Seq,
    template: &AuditEvent,
    clock: &BatchClock,
    frontier: &mut Frontier,
) -> Result<u64, Fault> {
    let acked = conn
        .prepare_cached(
            "SELECT d.id, l.resource_type, l.id, l.version_id, l.content_hash, l.nhs_number \
             FROM deliveries d JOIN log l ON l.seq = d.seq \
             WHERE d.partner = ?1 AND d.state = 'pending' AND d.channel = 'inbox' AND d.seq <= ?2 \
             ORDER BY d.seq",
        )?
        .query_map(params![partner, through], |row| {
            Ok((
                row.get::<_, DeliveryId>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, [u8; 32]>(4)?,
                row.get::<_, Option<String>>(5)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut mark = conn.prepare_cached(
        "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, finished_at = ?2 \
         WHERE id = ?1",
    )?;
    let mut events = Vec::with_capacity(acked.len());
    for (id, resource_type, resource_id, version_id, content_hash, nhs_number) in &acked {
        mark.execute(params![id, clock.text])?;
        let mut event = template.clone();
        event.entity = Some(Entity {
            resource_type: resource_type.clone(),
            id: resource_id.clone(),
            version_id: Some(*version_id),
            content_hash: Some(content_hash.iter().map(|b| format!("{b:02x}")).collect()),
        });
        event.patient = nhs_number.clone();
        events.push(event);
    }
    insert_audit(conn, &events, frontier)?;
    Ok(count(acked.len()))
}

/// Pending inbox rows after `after`, one more than asked to learn whether more follow.
pub(super) fn inbox_page(
    conn: &Connection,
    partner: &str,
    after: Seq,
    limit: usize,
) -> Result<InboxPage, Fault> {
    let mut rows = conn
        .prepare_cached(&format!(
            "SELECT {LOG_COLUMNS}, {PENDING_COLUMNS} FROM deliveries d JOIN log l ON l.seq = d.seq \
             WHERE d.partner = ?1 AND d.state = 'pending' AND d.channel = 'inbox' AND d.seq > ?2 \
             ORDER BY d.seq LIMIT ?3"
        ))?
        .query_map(
            params![partner, after, limit_param(limit.saturating_add(1))],
            pending_from_row,
        )?
        .map(|row| into_pending(row?))
        .collect::<Result<Vec<_>, _>>()?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    Ok(InboxPage { rows, more })
}

pub(super) fn status(
    conn: &Connection,
    partner: Option<&str>,
) -> Result<Vec<DestinationStatus>, Fault> {
    let mut statement = conn.prepare_cached(
        "SELECT d.partner, \
           SUM(d.state = 'pending'), SUM(d.state = 'delivered'), SUM(d.state = 'dead'), \
           SUM(d.state = 'withheld'), MIN(CASE WHEN d.state = 'pending' THEN l.committed_at END) \
         FROM deliveries d JOIN log l ON l.seq = d.seq WHERE (?1 IS NULL OR d.partner = ?1) \
         GROUP BY d.partner ORDER BY d.partner",
    )?;
    let rows = statement
        .query_map(params![partner], |row| {
            Ok((
                row.get::<_, String>(0)?,
                [
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, i64>(4)?,
                ],
                row.get::<_, Option<String>>(5)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut last_failure = conn.prepare_cached(
        "SELECT last_error_at, last_status, last_error FROM deliveries \
         WHERE partner = ?1 AND last_error_at IS NOT NULL ORDER BY last_error_at DESC LIMIT 1",
    )?;
    let to_u64 = |n: i64| u64::try_from(n).unwrap_or(0);
    rows.into_iter()
        .map(|(partner, [pending, delivered, dead, withheld], oldest)| {
            let failure = last_failure
                .query_map(params![partner], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, Option<u16>>(1)?,
                        row.get::<_, Option<String>>(2)?,
                    ))
                })?
                .next()
                .transpose()?
                .map(|(at, status, error)| {
                    Ok::<_, Fault>(DeliveryFailure {
                        at: parse_timestamp(&at)?,
                        status,
                        error: error.unwrap_or_default(),
                    })
                })
                .transpose()?;
            Ok(DestinationStatus {
                partner,
                pending: to_u64(pending),
                delivered: to_u64(delivered),
                dead: to_u64(dead),
                withheld: to_u64(withheld),
                oldest_pending_committed_at: oldest.as_deref().map(parse_timestamp).transpose()?,
                last_failure: failure,
            })
        })
        .collect()
}

pub(super) fn dead_letters(
    conn: &Connection,
    partner: Option<&str>,
    after: DeliveryId,
    limit: usize,
) -> Result<Vec<DeadLetter>, Fault> {
    let mut statement = conn.prepare_cached(
        "SELECT d.id, d.seq, d.partner, d.channel, l.resource_type, d.attempts, d.last_status, \
           d.last_error, d.response, l.committed_at, d.finished_at \
         FROM deliveries d JOIN log l ON l.seq = d.seq \
         WHERE d.state = 'dead' AND d.id > ?1 AND (?3 IS NULL OR d.partner = ?3) \
         ORDER BY d.id LIMIT ?2",
    )?;
    let rows = statement
        .query_map(params![after, limit_param(limit), partner], |row| {
            Ok((
                row.get::<_, DeliveryId>(0)?,
                row.get::<_, Seq>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, i64>(5)?,
                row.get::<_, Option<u16>>(6)?,
                row.get::<_, Option<String>>(7)?,
                row.get::<_, Option<Vec<u8>>>(8)?,
                row.get::<_, String>(9)?,
                row.get::<_, Option<String>>(10)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(
            |(
                id,
                seq,
                partner,
                channel,
                resource_type,
                attempts,
                status,
                error,
                response,
                committed,
                dead,
            )| {
                Ok(DeadLetter {
                    id,
                    seq,
                    partner,
                    channel: DeliveryChannel::parse(&channel).ok_or_else(|| {
                        Fault::Corrupt("a delivery row has an unknown channel".to_owned())
                    })?,
                    resource_type,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    status,
                    error: error.unwrap_or_default(),
                    response: String::from_utf8_lossy(&response.unwrap_or_default()).into_owned(),
                    committed_at: parse_timestamp(&committed)?,
                    dead_at: match dead {
                        Some(text) => parse_timestamp(&text)?,
                        None => OffsetDateTime::UNIX_EPOCH,
                    },
                })
            },
        )
        .collect()
}

/// The `Store` delivery methods, called from the trait impl in [`super`].
impl SqliteStore {
    async fn delivery_request(&self, work: DeliveryWork) -> Result<DeliveryAnswer, StoreError> {
        match self.request(Work::Delivery(work)).await? {
            Answer::Delivery(answer) => Ok(answer),
            _ => Err(StoreError::Failed(
                "the store writer answered a different request".to_owned(),
            )),
        }
    }

    pub(super) async fn delivery_count(&self, work: DeliveryWork) -> Result<u64, StoreError> {
        match self.delivery_request(work).await? {
            DeliveryAnswer::Count(n) => Ok(n),
            _ => Err(mismatch()),
        }
    }

    pub(super) async fn delivery_claim(
        &self,
        partner: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        let work = DeliveryWork::Claim {
            partner: partner.to_owned(),
            limit,
            lease,
        };
        match self.delivery_request(work).await? {
            DeliveryAnswer::Claimed(rows) => Ok(rows),
            _ => Err(mismatch()),
        }
    }

    pub(super) async fn delivery_finish(
        &self,
        id: DeliveryId,
        result: DeliveryResult,
        audit: Vec<AuditEvent>,
    ) -> Result<bool, StoreError> {
        match self
            .delivery_request(DeliveryWork::Finish { id, result, audit })
            .await?
        {
            DeliveryAnswer::Finished(changed) => Ok(changed),
            _ => Err(mismatch()),
        }
    }
}

fn mismatch() -> StoreError {
    StoreError::Failed("the store writer answered a different request".to_owned())
}
