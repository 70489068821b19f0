//! Reads of the log and the audit log, IG officers' audit queries (DOMAIN.md `IGQ`) and review
//! marks (`LR-2`) on PostgreSQL. Same filters, paging and indexes as `sqlite_query.rs`.

use caregate_audit::AuditEvent;
use tokio_postgres::Client;

use super::writer::{Appender, BatchClock, Tx, insert_audit, serde_name};
use super::{Fault, LOG_COLUMNS, Params, limit_param, log_entry, param_refs};
use crate::{AuditPage, AuditQuery, AuditReview, LogEntry, Seq, StoreError, StoredAuditEvent};

/// The break-glass filter, exactly as the partial index states it.
const BREAK_GLASS_CONDITION: &str = "purpose_of_use IN ('ETREAT', 'BTG')";

pub(super) async fn read_log(
    client: &Client,
    after: Seq,
    limit: usize,
) -> Result<Vec<LogEntry>, Fault> {
    let rows = client
        .query(
            &format!("SELECT {LOG_COLUMNS} FROM log l WHERE l.seq > $1 ORDER BY l.seq LIMIT $2"),
            &[&after, &limit_param(limit)],
        )
        .await?;
    rows.iter().map(|row| log_entry(row, 0)).collect()
}

pub(super) async fn read_current(
    client: &Client,
    partner: &str,
    resource_type: &str,
    id: &str,
) -> Result<Option<LogEntry>, Fault> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {LOG_COLUMNS} FROM current_versions c JOIN log l ON l.seq = c.seq \
                 WHERE c.partner = $1 AND c.resource_type = $2 AND c.id = $3"
            ),
            &[&partner, &resource_type, &id],
        )
        .await?;
    row.map(|row| log_entry(&row, 0)).transpose()
}

pub(super) async fn read_audit(
    client: &Client,
    after: Seq,
    limit: usize,
) -> Result<Vec<StoredAuditEvent>, Fault> {
    let rows = client
        .query(
            "SELECT seq, event FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&after, &limit_param(limit)],
        )
        .await?;
    rows.iter()
        .map(|row| parse_event(row.try_get(0)?, &row.try_get::<_, String>(1)?))
        .collect()
}

pub(super) async fn load_cursor(client: &Client, reader: &str) -> Result<Seq, Fault> {
    let row = client
        .query_opt("SELECT seq FROM cursors WHERE reader = $1", &[&reader])
        .await?;
    Ok(match row {
        Some(row) => row.try_get(0)?,
        None => 0,
    })
}

/// One page of events matching `query`, with the reviews of those events.
pub(super) async fn query_audit(client: &Client, query: &AuditQuery) -> Result<AuditPage, Fault> {
    let mut conditions: Vec<String> = Vec::new();
    let mut params: Params = Vec::new();
    let mut bind = |condition: &str,
                    value: Box<dyn tokio_postgres::types::ToSql + Sync + Send>,
                    params: &mut Params| {
        params.push(value);
        conditions.push(condition.replace('?', &format!("${}", params.len())));
    };
    if let Some(patient) = &query.patient {
        bind("patient = ?", Box::new(patient.clone()), &mut params);
    }
    if let Some(partner) = &query.partner {
        bind("partner_id = ?", Box::new(partner.clone()), &mut params);
    }
    if let Some(from) = query.from {
        bind("recorded >= ?", Box::new(from), &mut params);
    }
    if let Some(to) = query.to {
        bind("recorded < ?", Box::new(to), &mut params);
    }
    if let Some(action) = &query.action {
        bind("action = ?", Box::new(serde_name(action)?), &mut params);
    }
    if let Some(outcome) = &query.outcome {
        bind("outcome = ?", Box::new(serde_name(outcome)?), &mut params);
    }
    if let Some(after) = query.after_seq {
        bind("seq > ?", Box::new(after), &mut params);
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
    params.push(Box::new(limit_param(limit + 1)));
    let where_clause = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT seq, event FROM audit_events {where_clause} ORDER BY seq LIMIT ${}",
        params.len()
    );
    let rows = client.query(&sql, &param_refs(&params)).await?;
    let mut events = Vec::with_capacity(limit.min(64));
    let mut more = false;
    for row in &rows {
        if events.len() == limit {
            more = true;
            break;
        }
        events.push(parse_event(row.try_get(0)?, &row.try_get::<_, String>(1)?)?);
    }
    let next = if more {
        events.last().map(|event| event.seq)
    } else {
        None
    };
    let reviews = match (events.first(), events.last()) {
        (Some(first), Some(last)) => reviews_between(client, first.seq, last.seq).await?,
        _ => Vec::new(),
    };
    Ok(AuditPage {
        events,
        reviews,
        next,
    })
}

/// One event and its review.
pub(super) async fn audit_event(
    client: &Client,
    seq: Seq,
) -> Result<Option<(StoredAuditEvent, Option<AuditReview>)>, Fault> {
    let row = client
        .query_opt("SELECT event FROM audit_events WHERE seq = $1", &[&seq])
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let event = parse_event(seq, &row.try_get::<_, String>(0)?)?;
    let review = reviews_between(client, seq, seq).await?.into_iter().next();
    Ok(Some((event, review)))
}

async fn reviews_between(
    client: &Client,
    first: Seq,
    last: Seq,
) -> Result<Vec<AuditReview>, Fault> {
    let rows = client
        .query(
            "SELECT seq, reviewer, reviewed_at, note FROM audit_reviews \
             WHERE seq BETWEEN $1 AND $2 ORDER BY seq",
            &[&first, &last],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(AuditReview {
                seq: row.try_get(0)?,
                reviewer: row.try_get(1)?,
                reviewed_at: row.try_get(2)?,
                note: row.try_get(3)?,
            })
        })
        .collect()
}

/// Parse stored event JSON. serde's message may quote a value (an NHS number): keep only where
/// the fault is.
pub(super) fn parse_event(seq: Seq, json: &str) -> Result<StoredAuditEvent, Fault> {
    let event = serde_json::from_str(json).map_err(|error| {
        Fault::Corrupt(format!(
            "audit event {seq} is not a valid AuditEvent (line {}, column {})",
            error.line(),
            error.column()
        ))
    })?;
    Ok(StoredAuditEvent { seq, event })
}

/// Write a review mark and the review's own audit event (writer, inside the request's
/// savepoint).
pub(super) async fn apply_review(
    tx: &Tx<'_, '_>,
    review: &AuditReview,
    audit: &AuditEvent,
    clock: &BatchClock,
    appender: &mut Appender,
) -> Result<AuditReview, Fault> {
    let exists = tx
        .query_opt("SELECT 1 FROM audit_events WHERE seq = $1", &[&review.seq])
        .await?;
    if exists.is_none() {
        return Err(Fault::Refused(StoreError::PreconditionFailed));
    }
    let reviewed = tx
        .query_opt("SELECT 1 FROM audit_reviews WHERE seq = $1", &[&review.seq])
        .await?;
    if reviewed.is_some() {
        return Err(Fault::Refused(StoreError::Conflict));
    }
    tx.execute(
        "INSERT INTO audit_reviews (seq, reviewer, reviewed_at, note) VALUES ($1, $2, $3, $4)",
        &[&review.seq, &review.reviewer, &clock.at, &review.note],
    )
    .await?;
    insert_audit(tx, std::slice::from_ref(audit), appender).await?;
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
        assert!(
            super::super::schema::MIGRATIONS
                .iter()
                .any(|step| { step.contains(&format!("WHERE {BREAK_GLASS_CONDITION};")) })
        );
    }
}
