//! The fan-out reader: follows the committed log with its own durable cursor and turns each entry
//! into one delivery row per destination its stored decision names (DESIGN.md "one log, many
//! readers"). Rows and the cursor move in one commit, and row creation is idempotent on
//! `(seq, partner)`, so a crash between any two steps neither loses nor duplicates a delivery.
//!
//! Several gateway instances sharing one PostgreSQL log each run a fan-out reader over the same
//! cursor: the store only moves a cursor forward (`GREATEST`), and each step first catches up
//! with the shared cursor, so an instance skips what another already routed instead of redoing
//! it. Two instances routing the same batch at once both enqueue it; the rows are idempotent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use caregate_store::Store;
use caregate_store::delivery::{DeliveryChannel, NewDelivery};
use tokio::sync::{Notify, watch};

use crate::keys::order_key;
use crate::policy::DeliveryPolicy;

/// The fan-out reader's cursor name.
pub const FANOUT_READER: &str = "deliver-fanout";

pub(crate) struct Fanout {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) policy: Arc<dyn DeliveryPolicy>,
    /// Destinations by partner id; partners not here (or with mode `none`) receive nothing.
    pub(crate) channels: HashMap<String, DeliveryChannel>,
    pub(crate) batch: usize,
    pub(crate) poll_interval: Duration,
    /// Wait after a wake-up before routing, to batch many intake commits into one.
    pub(crate) coalesce: Duration,
    /// Told about new work: push workers by partner.
    pub(crate) push_wake: HashMap<String, Arc<Notify>>,
    /// Woken by the gateway after commits (and by tests).
    pub(crate) wake: Arc<Notify>,
}

impl Fanout {
    /// One step: route the next batch of log entries. Returns how many entries were read.
    pub(crate) async fn step(&self, cursor: &mut i64) -> Result<usize, caregate_store::StoreError> {
        // Another instance may have routed further (cluster mode); never go back.
        let shared = self.store.load_cursor(FANOUT_READER).await?;
        if shared > *cursor {
            *cursor = shared;
        }
        let entries = self.store.read_log(*cursor, self.batch.max(1)).await?;
        let Some(last) = entries.last().map(|entry| entry.seq) else {
            return Ok(0);
        };
        let mut rows = Vec::new();
        for entry in &entries {
            for partner in self.policy.destinations(entry) {
                match self.channels.get(&partner) {
                    Some(&channel) => rows.push(NewDelivery {
                        seq: entry.seq,
                        partner,
                        channel,
                        order_key: order_key(entry),
                    }),
                    None => tracing::warn!(
                        seq = entry.seq,
                        partner = %partner,
                        "decision names a partner with no delivery configured; not delivered"
                    ),
                }
            }
        }
        let woken: Vec<String> = rows.iter().map(|row| row.partner.clone()).collect();
        self.store
            .enqueue_deliveries(FANOUT_READER, last, rows)
            .await?;
        *cursor = last;
        for partner in woken {
            if let Some(wake) = self.push_wake.get(&partner) {
                wake.notify_one();
            }
        }
        Ok(entries.len())
    }

    pub(crate) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut cursor = loop {
            match self.store.load_cursor(FANOUT_READER).await {
                Ok(cursor) => break cursor,
                Err(error) => {
                    tracing::warn!(%error, "delivery fan-out cannot read its cursor; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(self.poll_interval * 10) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        };
        tracing::info!(cursor, "delivery fan-out started");
        let mut trouble = 0u32;
        while !*shutdown.borrow() {
            let pause = match self.step(&mut cursor).await {
                Ok(read) if read >= self.batch.max(1) => continue,
                Ok(_) => {
                    trouble = 0;
                    self.poll_interval
                }
                Err(error) => {
                    trouble = trouble.saturating_add(1);
                    tracing::warn!(%error, "delivery fan-out failed; retrying");
                    self.poll_interval.saturating_mul(trouble.min(20))
                }
            };
            tokio::select! {
                () = self.wake.notified() => {
                    // More commits are likely on their way (under load one per fsync): let them
                    // land, then route them all in one commit.
                    if !self.coalesce.is_zero() {
                        tokio::select! {
                            () = tokio::time::sleep(self.coalesce) => {}
                            _ = shutdown.changed() => {}
                        }
                    }
                }
                () = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
        tracing::info!("delivery fan-out stopped");
    }
}
