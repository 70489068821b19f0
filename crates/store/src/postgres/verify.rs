//! Verification of the cluster's audit logs (the PostgreSQL twin of
//! [`crate::sqlite::verify_audit`]): one RFC 9162 Merkle log per instance, each checked against
//! its own signed checkpoints, streaming events in leaf order.

use caregate_audit::event_hash::CanonicalEvent;
use caregate_audit::{AuditEvent, CheckpointVerifier, Hash, LogVerifier, SignedCheckpoint};
use tokio_postgres::Client;

use super::writer::serde_name;
use super::{Endpoint, PostgresTls, connect_client, opening_error};
use crate::sqlite::AuditVerification;
use crate::{Seq, StoreError};

/// The result of [`verify_audit`]: one verification per instance that has written events or
/// checkpoints, in instance id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresAuditVerification {
    pub instances: Vec<InstanceVerification>,
}

impl PostgresAuditVerification {
    /// True when every instance's chain verifies.
    pub fn is_ok(&self) -> bool {
        self.instances.iter().all(InstanceVerification::is_ok)
    }

    /// Events over all instances.
    pub fn events(&self) -> u64 {
        self.instances
            .iter()
            .map(|instance| instance.verification.report.events)
            .sum()
    }
}

/// One instance's chain. In `verification`, sequence numbers in the Merkle report (findings,
/// `first_bad_seq`) are the instance's leaf indexes; `column_mismatches` are global `seq`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceVerification {
    pub instance_id: String,
    pub verification: AuditVerification,
    /// The global `seq` of the first bad event (the report's `first_bad_seq` translated), when
    /// that event still exists.
    pub first_bad_seq: Option<Seq>,
}

impl InstanceVerification {
    pub fn is_ok(&self) -> bool {
        self.verification.is_ok()
    }
}

/// Verify every instance's audit chain in the database at `url` (over `tls`): recompute every leaf and
/// compare it with the recorded one, check leaf indexes are contiguous from 1, check every stored
/// checkpoint and every `extra` one (a witness's; matched to an instance by nothing but its
/// signature, so pass those of one instance at a time with [`verify_instance`]) is signed by
/// `verifier`'s key and matches the recomputed tree, and check the query columns.
/// Instances signing under different log ids need one call of [`verify_instance`] each.
pub async fn verify_audit(
    url: &str,
    tls: &PostgresTls,
    verifier: &CheckpointVerifier,
) -> Result<PostgresAuditVerification, StoreError> {
    let client = connect(url, tls).await?;
    let mut instances = Vec::new();
    for instance in instance_ids(&client).await? {
        instances.push(verify_on(&client, &instance, verifier, &[]).await?);
    }
    Ok(PostgresAuditVerification { instances })
}

/// The ids of every instance that has written audit events or checkpoints, in order (to verify
/// each with its own log id through [`verify_instance`]).
pub async fn audit_instances(url: &str, tls: &PostgresTls) -> Result<Vec<String>, StoreError> {
    let client = connect(url, tls).await?;
    instance_ids(&client).await
}

async fn instance_ids(client: &Client) -> Result<Vec<String>, StoreError> {
    let rows = client
        .query(
            "SELECT instance_id FROM audit_trees \
             UNION SELECT DISTINCT instance_id FROM audit_events \
             UNION SELECT DISTINCT instance_id FROM audit_checkpoints \
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(|error| reading(&error))?;
    rows.iter()
        .map(|row| row.try_get(0).map_err(|error| reading(&error)))
        .collect()
}

/// Verify one instance's chain, with `extra` checkpoints (e.g. ones a witness kept).
pub async fn verify_instance(
    url: &str,
    tls: &PostgresTls,
    instance_id: &str,
    verifier: &CheckpointVerifier,
    extra: &[SignedCheckpoint],
) -> Result<InstanceVerification, StoreError> {
    let client = connect(url, tls).await?;
    verify_on(&client, instance_id, verifier, extra).await
}

async fn connect(url: &str, tls: &PostgresTls) -> Result<Client, StoreError> {
    let endpoint = Endpoint::new(url, tls)?;
    connect_client(&endpoint, "audit verify")
        .await
        .map_err(opening_error)
}

fn reading(error: &tokio_postgres::Error) -> StoreError {
    StoreError::Failed(format!("reading the audit log: {error}"))
}

async fn verify_on(
    client: &Client,
    instance_id: &str,
    verifier: &CheckpointVerifier,
    extra: &[SignedCheckpoint],
) -> Result<InstanceVerification, StoreError> {
    let mut checkpoints = Vec::new();
    let mut latest_checkpoint = None;
    let rows = client
        .query(
            "SELECT checkpoint FROM audit_checkpoints WHERE instance_id = $1 ORDER BY size",
            &[&instance_id],
        )
        .await
        .map_err(|error| reading(&error))?;
    for row in rows {
        let text: String = row.try_get(0).map_err(|error| reading(&error))?;
        // An unparseable stored checkpoint is itself a finding: hand it over as missing.
        if let Ok(signed) = SignedCheckpoint::parse(&text) {
            checkpoints.push(signed);
        }
        latest_checkpoint = Some(text);
    }
    checkpoints.extend(extra.iter().cloned());
    let mut log = LogVerifier::new(&checkpoints, verifier);
    let mut column_mismatches = Vec::new();
    let mut column_mismatches_total = 0u64;
    // Keyset pages in leaf order: memory stays bounded however long the chain is.
    let mut after: i64 = 0;
    loop {
        let rows = client
            .query(
                "SELECT seq, leaf_seq, event, leaf_hash, patient, partner_id, action, outcome, \
                 request_id, resource_type, resource_id FROM audit_events \
                 WHERE instance_id = $1 AND leaf_seq > $2 ORDER BY leaf_seq LIMIT 5000",
                &[&instance_id, &after],
            )
            .await
            .map_err(|error| reading(&error))?;
        let Some(last) = rows.last() else { break };
        after = last.try_get(1).map_err(|error| reading(&error))?;
        for row in &rows {
            let fetch = || -> Result<_, tokio_postgres::Error> {
                Ok((
                    row.try_get::<_, Seq>(0)?,
                    row.try_get::<_, i64>(1)?,
                    row.try_get::<_, String>(2)?,
                    row.try_get::<_, Vec<u8>>(3)?,
                    [
                        row.try_get::<_, Option<String>>(4)?,
                        row.try_get::<_, Option<String>>(5)?,
                        row.try_get::<_, Option<String>>(6)?,
                        row.try_get::<_, Option<String>>(7)?,
                        row.try_get::<_, Option<String>>(8)?,
                        row.try_get::<_, Option<String>>(9)?,
                        row.try_get::<_, Option<String>>(10)?,
                    ],
                ))
            };
            let (seq, leaf_seq, event, leaf, columns) = fetch().map_err(|error| reading(&error))?;
            let leaf_seq = u64::try_from(leaf_seq).unwrap_or(0);
            let canonical = CanonicalEvent(event.as_bytes());
            // A recorded leaf of the wrong length was damaged: named, never replaced.
            let recorded = Hash::from_slice(&leaf).unwrap_or(crate::sqlite::DAMAGED_LEAF);
            log.push_with_recorded_leaf(leaf_seq, &canonical, recorded);
            if !columns_match(&event, &columns) {
                column_mismatches_total += 1;
                if column_mismatches.len() < 100 {
                    column_mismatches.push(seq);
                }
            }
        }
    }
    let report = log.finish();
    let first_bad_seq = match report.first_bad_seq.and_then(|bad| i64::try_from(bad).ok()) {
        Some(bad) => client
            .query_opt(
                "SELECT seq FROM audit_events WHERE instance_id = $1 AND leaf_seq = $2",
                &[&instance_id, &bad],
            )
            .await
            .map_err(|error| reading(&error))?
            .map(|row| row.try_get::<_, Seq>(0))
            .transpose()
            .map_err(|error| reading(&error))?,
        None => None,
    };
    Ok(InstanceVerification {
        instance_id: instance_id.to_owned(),
        verification: AuditVerification {
            report,
            column_mismatches,
            column_mismatches_total,
            latest_checkpoint,
        },
        first_bad_seq,
    })
}

/// Whether the copied query columns equal the fields of the hashed event JSON.
fn columns_match(event: &str, columns: &[Option<String>; 7]) -> bool {
    let Ok(event) = serde_json::from_str::<AuditEvent>(event) else {
        return false;
    };
    let entity = event.entity.as_ref();
    let expected: [Option<String>; 7] = [
        event.patient.clone(),
        event.actor.partner_id.clone(),
        serde_name(&event.action).ok(),
        serde_name(&event.outcome).ok(),
        Some(event.request_id.clone()),
        entity.map(|e| e.resource_type.clone()),
        entity.map(|e| e.id.clone()),
    ];
    &expected == columns
}
