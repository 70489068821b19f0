//! The PostgreSQL schema and its versioned migrations, applied at connect.
//!
//! `schema_migrations` lists the steps applied. [`migrate`] runs in one transaction under a
//! transaction-level advisory lock ([`super::MIGRATION_LOCK`]): when several instances start at
//! once, one applies the pending steps and the others wait, then find nothing to do. PostgreSQL's
//! DDL is transactional, so a step is applied whole or not at all. Append new steps to
//! [`MIGRATIONS`]; never edit a released one.
//!
//! The tables mirror the SQLite schema (same names, so the same SQL works for IG officers), with
//! PostgreSQL types (`BYTEA`, `TIMESTAMPTZ`) and the cluster's additions: `instance_id` and
//! `leaf_seq` on every audit event, and the audit tree and checkpoints kept per instance.

use tokio_postgres::Client;

use super::{Fault, LOCK_CLASS, MIGRATION_LOCK};

/// Schema steps; step `i` brings the schema from version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2];

/// Step 2: the Bulk export job registry (`export_jobs`, issue 5), kept with its queries in
/// [`export_jobs`].
const SCHEMA_V2: &str = export_jobs::SCHEMA_EXPORT_JOBS;

// The registry's queries (`postgres/export_jobs.rs`), declared here beside its migration step so
// the connection code in `postgres.rs` stays as it is; still a descendant of `postgres`, so it
// uses the store's private read connections and fault mapping.
#[path = "export_jobs.rs"]
pub(super) mod export_jobs;

const SCHEMA_V1: &str = "
-- The committed log: every version of every record, in commit order (see the module docs of
-- caregate_store::postgres for how seq is assigned). seq is never reused.
CREATE TABLE log (
    seq           BIGINT      PRIMARY KEY,
    partner       TEXT        NOT NULL,
    resource_type TEXT        NOT NULL,
    id            TEXT        NOT NULL,
    version_id    BIGINT      NOT NULL,
    content       BYTEA       NOT NULL,
    content_hash  BYTEA       NOT NULL,
    nhs_number    TEXT,
    decision      BYTEA,
    committed_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (partner, resource_type, id, version_id)
);
CREATE INDEX log_by_nhs_number ON log (nhs_number, seq) WHERE nhs_number IS NOT NULL;

-- The current version of each resource; ids are scoped to the partner that sent them.
CREATE TABLE current_versions (
    partner       TEXT   NOT NULL,
    resource_type TEXT   NOT NULL,
    id            TEXT   NOT NULL,
    version_id    BIGINT NOT NULL,
    seq           BIGINT NOT NULL REFERENCES log (seq),
    content_hash  BYTEA  NOT NULL,
    PRIMARY KEY (partner, resource_type, id)
);

-- Business identifier tokens (system|value) of current versions, for conditional create.
CREATE TABLE identifiers (
    partner       TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    token         TEXT NOT NULL,
    id            TEXT NOT NULL,
    PRIMARY KEY (partner, resource_type, token)
);
CREATE INDEX identifiers_by_resource ON identifiers (partner, resource_type, id);

-- The first receipt given for each (partner, idempotency key).
CREATE TABLE idempotency_keys (
    partner    TEXT        NOT NULL,
    key        TEXT        NOT NULL,
    receipt    TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (partner, key)
);

-- Audit events of every instance in one commit order (seq, what readers and IG queries see).
-- Each instance's events form its own RFC 9162 Merkle log: leaf_seq is the event's position in
-- its instance's tree (from 1, contiguous) and leaf_hash = H(0x00 || leaf_seq || event).
CREATE TABLE audit_events (
    seq            BIGINT      PRIMARY KEY,
    instance_id    TEXT        NOT NULL,
    leaf_seq       BIGINT      NOT NULL,
    recorded       TIMESTAMPTZ NOT NULL,
    request_id     TEXT        NOT NULL,
    partner_id     TEXT,
    action         TEXT        NOT NULL,
    outcome        TEXT        NOT NULL,
    resource_type  TEXT,
    resource_id    TEXT,
    patient        TEXT,
    -- The canonical JSON of the AuditEvent, hashed as stored (TEXT, not JSONB: JSONB would
    -- reorder keys and change the bytes).
    event          TEXT        NOT NULL,
    leaf_hash      BYTEA       NOT NULL,
    -- The purpose of use, read from the hashed event (DOMAIN.md LR-2 break-glass queue).
    purpose_of_use TEXT GENERATED ALWAYS AS ((event::jsonb) ->> 'purpose_of_use') STORED,
    UNIQUE (instance_id, leaf_seq)
);
CREATE INDEX audit_events_by_patient ON audit_events (patient, seq) WHERE patient IS NOT NULL;
CREATE INDEX audit_events_by_recorded ON audit_events (recorded);
CREATE INDEX audit_events_by_partner ON audit_events (partner_id, seq);
CREATE INDEX audit_events_by_action ON audit_events (action, seq);
CREATE INDEX audit_events_break_glass ON audit_events (seq)
    WHERE purpose_of_use IN ('ETREAT', 'BTG');

-- Each instance's Merkle tree frontier after its last committed event.
CREATE TABLE audit_trees (
    instance_id TEXT   PRIMARY KEY,
    size        BIGINT NOT NULL,
    frontier    BYTEA  NOT NULL
);

-- Signed checkpoints (signed tree heads) of each instance's log, in C2SP signed-note text.
CREATE TABLE audit_checkpoints (
    instance_id TEXT        NOT NULL,
    size        BIGINT      NOT NULL,
    checkpoint  TEXT        NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (instance_id, size)
);

-- Break-glass events an IG officer has reviewed; at most one review per event.
CREATE TABLE audit_reviews (
    seq         BIGINT      PRIMARY KEY REFERENCES audit_events (seq),
    reviewer    TEXT        NOT NULL,
    reviewed_at TIMESTAMPTZ NOT NULL,
    note        TEXT        NOT NULL
);

-- Each reader's durable position in the log, shared by all instances.
CREATE TABLE cursors (
    reader TEXT   PRIMARY KEY,
    seq    BIGINT NOT NULL
);

-- One row per (committed log entry, destination partner): see caregate_store::delivery.
-- Claimed with FOR UPDATE SKIP LOCKED, so each row is attempted by one instance at a time.
CREATE TABLE deliveries (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seq             BIGINT      NOT NULL REFERENCES log (seq),
    partner         TEXT        NOT NULL,
    channel         TEXT        NOT NULL CHECK (channel IN ('push', 'inbox')),
    order_key       TEXT        NOT NULL,
    state           TEXT        NOT NULL
                    CHECK (state IN ('pending', 'delivered', 'dead', 'withheld')),
    attempts        INTEGER     NOT NULL DEFAULT 0,
    created_at      TIMESTAMPTZ NOT NULL,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    lease_until     TIMESTAMPTZ,
    finished_at     TIMESTAMPTZ,
    last_status     INTEGER,
    last_error      TEXT,
    last_error_at   TIMESTAMPTZ,
    response        BYTEA,
    UNIQUE (seq, partner)
);
CREATE INDEX deliveries_pending ON deliveries (partner, seq) WHERE state = 'pending';
CREATE INDEX deliveries_pending_by_key ON deliveries (partner, order_key, seq)
    WHERE state = 'pending';
CREATE INDEX deliveries_dead ON deliveries (id) WHERE state = 'dead';
CREATE INDEX deliveries_failures ON deliveries (partner, last_error_at)
    WHERE last_error_at IS NOT NULL;
";

/// Bring the schema to the newest version (see the module docs).
pub(super) async fn migrate(client: &mut Client) -> Result<(), Fault> {
    let known = MIGRATIONS.len();
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&LOCK_CLASS, &MIGRATION_LOCK],
    )
    .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER     PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let current: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await?
        .try_get(0)?;
    let start = usize::try_from(current)
        .ok()
        .filter(|version| *version <= known)
        .ok_or_else(|| {
            Fault::Corrupt(format!(
                "schema version {current} is not one this build knows (0..={known})"
            ))
        })?;
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(start) {
        tx.batch_execute(sql).await?;
        let version = i32::try_from(step + 1)
            .map_err(|_| Fault::Internal("too many schema steps".to_owned()))?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await?;
        tracing::info!(version, "postgres store schema migrated");
    }
    tx.commit().await?;
    Ok(())
}
