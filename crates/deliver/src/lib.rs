//! Delivery to partners (DESIGN.md "deliver", issue 4): every record the policy routes to a
//! partner reaches it — pushed to its FHIR endpoint or held in its inbox — in per-patient order,
//! retried, never lost, and only if consent still allows it when it leaves.
//!
//! The path of one record:
//! 1. **fan-out** ([`fanout`]) follows the committed log with a durable cursor and writes one
//!    delivery row per destination named in the record's stored decision
//!    ([`DeliveryPolicy::destinations`]), in the same commit as the cursor move;
//! 2. **push** ([`push`]): one worker per push destination claims due rows (per-patient order,
//!    leases for crash safety), re-checks consent ([`DeliveryPolicy::recheck`]), POSTs with an
//!    idempotency key, and records delivered / retry (backoff with full jitter) / dead letter /
//!    withheld together with its audit event; a circuit breaker per destination ([`retry`]);
//! 3. **inbox** ([`inbox`]): partners that pull get pages of their rows, re-checked at serving
//!    time, and acknowledge them;
//! 4. **operations** ([`operations`]): status, dead letters, replay.
//!
//! Architecture invariants:
//! - a delivery row is created in the same commit as the fan-out cursor move past its record, and
//!   leaves `pending` only in the same commit as its audit event: at-least-once, never lost;
//! - every attempt of one record to one partner carries the same idempotency key ([`keys`]);
//! - a record is sent or served only after [`DeliveryPolicy::recheck`] allowed it at that moment;
//! - records go only to the configured endpoint, never to a URL from a record, and redirects are
//!   not followed (SSRF);
//! - no patient identifier or record content in logs: rows are named by sequence number.

pub mod config;
pub mod error;
mod events;
pub mod fanout;
pub mod inbox;
pub mod keys;
pub mod operations;
pub mod policy;
pub mod push;
pub mod retry;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use caregate_store::Store;
use caregate_store::delivery::DeliveryChannel;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

pub use config::{DeliveryConfig, DestinationConfig, PushTls};
pub use error::{DeliverError, InboxError};
pub use inbox::{Inbox, InboxCursor};
pub use policy::{DeliveryPolicy, Recheck, StoredDecisionPolicy};

use crate::fanout::Fanout;
use crate::push::{PushDestination, Worker};

/// The running delivery stage.
#[derive(Debug)]
pub struct DeliveryHandle {
    stop: watch::Sender<bool>,
    wake: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl DeliveryHandle {
    /// Tell the fan-out reader that new records were committed (it also polls).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Stop every task and wait for them: no new attempt starts, and the attempts in flight
    /// finish and record their results (each bounded by its destination's timeout).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// Stop every task and wait at most `grace` for the attempts in flight to finish and record
    /// their results (graceful shutdown: the store must still be open meanwhile). What is still
    /// running then is aborted: those rows stay pending under a lease and are sent again (same
    /// idempotency key) after the next start. Returns whether everything finished in time.
    pub async fn shutdown_within(self, grace: std::time::Duration) -> bool {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        let mut drained = true;
        for mut task in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                drained = false;
                task.abort();
                let _ = task.await;
            }
        }
        if drained {
            tracing::info!("delivery stopped: every attempt in flight was recorded");
        } else {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "delivery stopped: grace period over; unfinished attempts will be retried after restart"
            );
        }
        drained
    }
}

/// Validate every destination and build the push clients (reads certificate files). Call at
/// start-up: errors name the partner.
pub fn build_destinations(
    destinations: Vec<DestinationConfig>,
) -> Result<Vec<(DestinationConfig, Option<PushDestination>)>, DeliverError> {
    destinations
        .into_iter()
        .map(|destination| match destination.channel {
            DeliveryChannel::Push => {
                let push = PushDestination::build(destination.clone())?;
                Ok((destination, Some(push)))
            }
            DeliveryChannel::Inbox => {
                destination.validate()?;
                Ok((destination, None))
            }
        })
        .collect()
}

/// Start the fan-out reader and one push worker per push destination. They run until `shutdown`
/// resolves or [`DeliveryHandle::shutdown`] is called. Inbox destinations need no task: the
/// gateway serves them through [`Inbox`]. Must be called inside a tokio runtime.
pub fn spawn(
    store: Arc<dyn Store>,
    policy: Arc<dyn DeliveryPolicy>,
    destinations: Vec<DestinationConfig>,
    config: DeliveryConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<DeliveryHandle, DeliverError> {
    let built = build_destinations(destinations)?;
    let (stop, stopped) = watch::channel(false);
    let wake = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    let mut channels = HashMap::new();
    let mut push_wake = HashMap::new();
    for (destination, push) in built {
        channels.insert(destination.partner.clone(), destination.channel);
        if let Some(push) = push {
            let notify = Arc::new(Notify::new());
            push_wake.insert(destination.partner.clone(), Arc::clone(&notify));
            let worker = Arc::new(Worker {
                destination: push,
                store: Arc::clone(&store),
                policy: Arc::clone(&policy),
                config: config.clone(),
                wake: notify,
            });
            tasks.push(tokio::spawn(worker.run(stopped.clone())));
        }
    }
    let fanout = Fanout {
        store,
        policy,
        channels,
        batch: config.fanout_batch,
        poll_interval: config.poll_interval,
        coalesce: config.fanout_coalesce,
        push_wake,
        wake: Arc::clone(&wake),
    };
    tasks.push(tokio::spawn(fanout.run(stopped)));
    let on_shutdown = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = on_shutdown.send(true);
    });
    Ok(DeliveryHandle { stop, wake, tasks })
}
