//! IG officers' side of the SQLite audit log (DOMAIN.md `IGQ`, `LR-2`): filtered, keyset-paged
//! queries, and review marks for break-glass events.
//!
//! A child module of [`super`] (declared there with `#[path]`) so it shares the store's private
//! helpers (timestamps, `Fault`, the audit insert) without widening their visibility.
//!
//! **Indexes.** Every filter is served by an index on `(column, seq)` or a partial index, so a
//! page costs about `limit` index steps plus the rows it returns, however large the log grows:
//! the patient query (DOMAIN.md `IGQ`, target p95 ≤ 100 ms at 10 million events, see
//! `benches/benches/audit_query.rs`) walks `audit_events_by_patient` in `seq` order and checks
//! the time range on the few rows it finds. Break-glass events are found through a partial index
//! on a generated column (`purpose_of_use`, computed from the hashed event JSON, so nothing new is
//! written per event and the canonical bytes are untouched).

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

use super::{
    BatchClock, DATABASE_FILE, Fault, MIGRATIONS, insert_audit, open_reader, opening_error,
    parse_timestamp, serde_name, timestamp_text,
};
use crate::{AuditPage, AuditQuery, AuditReview, Seq, StoreError, StoredAuditEvent};
use caregate_audit::{AuditEvent, Frontier};

/// Schema step 2: the break-glass column and index, an action index, and review marks.
/// `BREAK_GLASS_CONDITION` must stay word for word the partial index's `WHERE` for SQLite to use it.
pub(super) const SCHEMA_V2: &str = "
-- The purpose of use, read from the hashed event (not stored twice).
ALTER TABLE audit_events ADD COLUMN purpose_of_use TEXT
    GENERATED ALWAYS AS (json_extract(event, '$.purpose_of_use')) VIRTUAL;
-- Break-glass accesses (DOMAIN.md LR-2): a small partial index, the privacy officer's queue.
CREATE INDEX audit_events_break_glass ON audit_events (seq)
    WHERE purpose_of_use IN ('ETREAT', 'BTG');
CREATE INDEX audit_events_by_action ON audit_events (action, seq);

-- Break-glass events an IG officer has reviewed; at most one review per event. The review is
-- itself an audit event (action `review`) written in the same commit.
CREATE TABLE audit_reviews (
    seq         INTEGER PRIMARY KEY REFERENCES audit_events (seq),
    reviewer    TEXT NOT NULL,
    reviewed_at TEXT NOT NULL,
    note        TEXT NOT NULL
);
";

/// The break-glass filter, exactly as the partial index states it.
const BREAK_GLASS_CONDITION: &str = "purpose_of_use IN ('ETREAT', 'BTG')";

/// A read-only view of a data directory's audit log, for offline tools (`caregate audit search`,
/// `caregate audit sar`). Safe beside a running gateway: WAL readers never block its writer.
#[derive(Debug)]
pub struct AuditReader {
    conn: Connection,
}

impl AuditReader {
    /// Open `dir/caregate.db` read-only. The schema must be current (a gateway of this version
    /// has started on it at least once).
    pub fn open(dir: &std::path::Path) -> Result<Self, StoreError> {
        let path = dir.join(DATABASE_FILE);
        if !path.exists() {
            return Err(StoreError::Failed(format!(
                "no caregate database at {}",
                path.display()
            )));
        }
        let conn = open_reader(&path).map_err(opening_error)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(|error| opening_error(error.into()))?;
        if usize::try_from(version).ok() != Some(MIGRATIONS.len()) {
            return Err(StoreError::Failed(format!(
                "the database is at schema version {version}, this build reads version {}; start this version of caregate on it once to upgrade it",
                MIGRATIONS.len()
            )));
        }
        Ok(Self { conn })
    }

    /// One page of events matching `query`.
    pub fn query(&self, query: &AuditQuery) -> Result<AuditPage, StoreError> {
        query_audit(&self.conn, query).map_err(opening_error)
    }
}

/// One page of events matching `query`, with the reviews of those events.
pub(super) fn query_audit(conn: &Connection, query: &AuditQuery) -> Result<AuditPage, Fault> {
    let mut conditions: Vec<String> = Vec::new();
    let mut values: Vec<SqlValue> = Vec::new();
    let mut bind = |condition: &str, value: SqlValue, values: &mut Vec<SqlValue>| {
        values.push(value);
        conditions.push(condition.replace('?', &format!("?{}", values.len())));
    };
    if let Some(patient) = &query.patient {
        bind("patient = ?", SqlValue::Text(patient.clone()), &mut values);
    }
    if let Some(partner) = &query.partner {
        bind(
            "partner_id = ?",
            SqlValue::Text(partner.clone()),
            &mut values,
        );
    }
    if let Some(from) = query.from {
        bind(
            "recorded >= ?",
            SqlValue::Text(timestamp_text(from)?),
            &mut values,
        );
    }
    if let Some(to) = query.to {
        bind(
            "recorded < ?",
            SqlValue::Text(timestamp_text(to)?),
            &mut values,
        );
    }
    if let Some(action) = &query.action {
        bind(
            "action = ?",
            SqlValue::Text(serde_name(action)?),
            &mut values,
        );
    }
    if let Some(outcome) = &query.outcome {
        bind(
            "outcome = ?",
            SqlValue::Text(serde_name(outcome)?),
            &mut values,
        );
    }
    if let Some(after) = query.after_seq {
        bind("seq > ?", SqlValue::Integer(after), &mut values);
    }
    if query.break_glass_only {
        conditions.push(BREAK_GLASS_CONDITION.to_owned());
    }
    if query.unreviewed_only {
        conditions.push(
            "NOT EXISTS (SELECT 1 FROM audit_reviews r WHERE r.seq = audit_events.seq)".to_owned(),
        );
    }
    let limit = query.page_size();
    // One row more than the page, to know whether there is a next page.
    values.push(SqlValue::Integer(
        i64::try_from(limit + 1).unwrap_or(i64::MAX),
    ));
    let where_clause = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT seq, event FROM audit_events {where_clause} ORDER BY seq LIMIT ?{}",
        values.len()
    );
    let mut statement = conn.prepare_cached(&sql)?;
    let rows = statement.query_map(params_from_iter(values), |row| {
        Ok((row.get::<_, Seq>(0)?, row.get::<_, String>(1)?))
    })?;
    let mut events = Vec::with_capacity(limit.min(64));
    let mut more = false;
    for row in rows {
        let (seq, json) = row?;
        if events.len() == limit {
            more = true;
            break;
        }
        events.push(parse_event(seq, &json)?);
    }
    let next = if more {
        events.last().map(|event| event.seq)
    } else {
        None
    };
    let reviews = match (events.first(), events.last()) {
        (Some(first), Some(last)) => reviews_between(conn, first.seq, last.seq)?,
        _ => Vec::new(),
    };
    Ok(AuditPage {
        events,
        reviews,
        next,
    })
}

/// One event and its review.
pub(super) fn audit_event(
    conn: &Connection,
    seq: Seq,
) -> Result<Option<(StoredAuditEvent, Option<AuditReview>)>, Fault> {
    let json = conn
        .prepare_cached("SELECT event FROM audit_events WHERE seq = ?1")?
        .query_row(params![seq], |row| row.get::<_, String>(0))
        .optional()?;
    let Some(json) = json else {
        return Ok(None);
    };
    let event = parse_event(seq, &json)?;
    let review = reviews_between(conn, seq, seq)?.into_iter().next();
    Ok(Some((event, review)))
}

fn reviews_between(conn: &Connection, first: Seq, last: Seq) -> Result<Vec<AuditReview>, Fault> {
    let mut statement = conn.prepare_cached(
        "SELECT seq, reviewer, reviewed_at, note FROM audit_reviews \
         WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq",
    )?;
    let rows = statement.query_map(params![first, last], |row| {
        Ok((
            row.get::<_, Seq>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
        ))
    })?;
    rows.map(|row| {
        let (seq, reviewer, reviewed_at, note) = row?;
        Ok(AuditReview {
            seq,
            reviewer,
            reviewed_at: parse_timestamp(&reviewed_at)?,
            note,
        })
    })
    .collect()
}

/// Parse stored event JSON. serde's message may quote a value (an NHS number): keep only where
/// the fault is.
fn parse_event(seq: Seq, json: &str) -> Result<StoredAuditEvent, Fault> {
    let event = serde_json::from_str(json).map_err(|error| {
        Fault::Corrupt(format!(
            "audit event {seq} is not a valid AuditEvent (line {}, column {})",
            error.line(),
            error.column()
        ))
    })?;
    Ok(StoredAuditEvent { seq, event })
}

/// Write a review mark and the review's own audit event (writer thread, inside the batch's
/// savepoint).
pub(super) fn apply_review(
    conn: &Connection,
    review: &AuditReview,
    audit: &AuditEvent,
    clock: &BatchClock,
    frontier: &mut Frontier,
) -> Result<AuditReview, Fault> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM audit_events WHERE seq = ?1")?
        .query_row(params![review.seq], |_| Ok(()))
        .optional()?;
    if exists.is_none() {
        return Err(Fault::Refused(StoreError::PreconditionFailed));
    }
    let reviewed = conn
        .prepare_cached("SELECT 1 FROM audit_reviews WHERE seq = ?1")?
        .query_row(params![review.seq], |_| Ok(()))
        .optional()?;
    if reviewed.is_some() {
        return Err(Fault::Refused(StoreError::Conflict));
    }
    conn.prepare_cached(
        "INSERT INTO audit_reviews (seq, reviewer, reviewed_at, note) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        review.seq,
        review.reviewer,
        clock.text,
        review.note
    ])?;
    insert_audit(conn, std::slice::from_ref(audit), frontier)?;
    Ok(AuditReview {
        reviewed_at: clock.at,
        ..review.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_2_break_glass_condition_matches_the_audit_crate_and_the_index() {
        for purpose in caregate_audit::report::BREAK_GLASS_PURPOSES {
            assert!(BREAK_GLASS_CONDITION.contains(&format!("'{purpose}'")));
        }
        assert!(SCHEMA_V2.contains(&format!("WHERE {BREAK_GLASS_CONDITION};")));
    }
}
