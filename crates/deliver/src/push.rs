//! Push: one worker task per destination, sending records to the partner's FHIR endpoint.
//!
//! Each worker claims *due heads* from the store (the oldest pending record of each patient whose
//! retry time has come, see [`caregate_store::delivery`]) and runs up to the destination's
//! concurrency of attempts at once, each with the destination's timeout. A record that fails is
//! retried later with backoff; until it succeeds or becomes a dead letter, later records for the
//! same patient wait behind it, while other patients' records go on (a failing head blocks only
//! its own patient's queue). A partner that keeps failing opens the destination's breaker, which
//! stops the worker from claiming more until a probe succeeds. Workers share nothing but the store
//! and the async runtime, so a slow or hanging partner costs other partners nothing but the
//! sockets it holds (DOMAIN.md B2 F6).
//!
//! **Why POST.** Each record is sent as a FHIR create (`POST {base}/{type}`), never PUT: ids are
//! scoped to the partner that submitted them (ARCHITECTURE.md), so two GP practices' `Patient/1`
//! are different patients and a PUT to the same id at the destination would overwrite one with the
//! other. Repeats are recognised by the `X-Request-Id` idempotency key instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use caregate_audit::{Action, Outcome};
use caregate_store::Store;
use caregate_store::delivery::{DeliveryResult, PendingDelivery};
use reqwest::{Client, StatusCode};
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::config::{DeliveryConfig, DestinationConfig};
use crate::error::DeliverError;
use crate::events;
use crate::keys::idempotency_key;
use crate::policy::{DeliveryPolicy, Recheck};
use crate::retry::{Breaker, Permit, random_unit};

/// How long a row waits when the delivery-time check answered [`Recheck::NotYet`].
const NOT_YET_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// A push destination ready to run: its validated config and its HTTPS client.
#[derive(Debug, Clone)]
pub struct PushDestination {
    pub config: DestinationConfig,
    endpoint: String,
    client: Client,
}

impl PushDestination {
    /// Validate and build the client (reads the certificate files named in the config).
    pub fn build(config: DestinationConfig) -> Result<Self, DeliverError> {
        config.validate()?;
        let partner = config.partner.clone();
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|error| DeliverError::File {
                partner: partner.clone(),
                path: path.display().to_string(),
                reason: error.to_string(),
            })
        };
        let client_error = |reason: String| DeliverError::Client {
            partner: partner.clone(),
            reason,
        };
        let mut builder = Client::builder()
            // Never follow a redirect: records go to the configured endpoint only (SSRF).
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .pool_max_idle_per_host(config.concurrency);
        if let Some(path) = &config.tls.ca_cert {
            let certificates = reqwest::Certificate::from_pem_bundle(&read(path)?)
                .map_err(|error| client_error(format!("CA certificate: {error}")))?;
            builder = builder.tls_certs_only(certificates);
        }
        if let (Some(cert), Some(key)) = (&config.tls.client_cert, &config.tls.client_key) {
            let cert_pem = read(cert)?;
            let key_pem = read(key)?;
            check_client_identity(&cert_pem, &key_pem).map_err(|reason| DeliverError::File {
                partner: partner.clone(),
                path: format!("{} / {}", cert.display(), key.display()),
                reason,
            })?;
            let mut pem = cert_pem;
            pem.push(b'\n');
            pem.extend(key_pem);
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|error| client_error(format!("client certificate: {error}")))?;
            builder = builder.identity(identity);
        }
        let client = builder
            .build()
            .map_err(|error| client_error(error.to_string()))?;
        let endpoint = config
            .endpoint
            .as_deref()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_owned();
        Ok(Self {
            config,
            endpoint,
            client,
        })
    }
}

/// Check a client certificate chain and its key (mTLS) before use, so a wrong file is named at
/// start-up rather than found as a failed handshake at the partner: the chain must hold at least
/// one certificate, the key file exactly one private key (PKCS#8, SEC1 or PKCS#1), and the key
/// must be the one the first certificate certifies. PEM is read with `rustls-pki-types`.
pub fn check_client_identity(cert_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("the client certificate file is not valid PEM: {error}"))?;
    if chain.is_empty() {
        return Err("the client certificate file holds no CERTIFICATE block".to_owned());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| match error {
        rustls_pki_types::pem::Error::NoItemsFound => {
            "the client key file holds no private key (PKCS#8, SEC1 or PKCS#1 PEM)".to_owned()
        }
        other => format!("the client key file is not valid PEM: {other}"),
    })?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|error| match error {
        rustls::Error::InconsistentKeys(_) => {
            "the client key does not belong to the first certificate of the chain".to_owned()
        }
        other => format!("the client certificate or key cannot be used: {other}"),
    })?;
    Ok(())
}

/// How an attempt bears on the partner's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// The partner answered (2xx, or a permanent rejection).
    Up,
    /// Transport failure, timeout, 408, 429 or 5xx.
    Down,
    /// Nothing was sent (withheld, expired) or the result could not be recorded.
    Unknown,
}

/// Everything a worker shares with its attempts.
pub(crate) struct Worker {
    pub(crate) destination: PushDestination,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) policy: Arc<dyn DeliveryPolicy>,
    pub(crate) config: DeliveryConfig,
    pub(crate) wake: Arc<Notify>,
}

impl Worker {
    /// How long a claimed row is leased: the attempt's timeout plus time to record it.
    fn lease(&self) -> Duration {
        self.destination.config.timeout + self.config.lease_margin
    }

    /// Run until `shutdown` turns true, then stop claiming and let the attempts in flight finish
    /// and record their results (each is bounded by the destination's timeout; the caller bounds
    /// the whole drain by the shutdown grace and aborts what is left, whose leases then expire
    /// and which are sent again, with the same idempotency key, after a restart).
    pub(crate) async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let partner = self.destination.config.partner.clone();
        let concurrency = self.destination.config.concurrency.max(1);
        let mut breaker = Breaker::new(self.config.breaker);
        let mut in_flight: JoinSet<Health> = JoinSet::new();
        let mut store_trouble = 0u32;
        tracing::info!(partner = %partner, "push delivery worker started");
        while !*shutdown.borrow() {
            let now = Instant::now();
            let room = concurrency.saturating_sub(in_flight.len());
            let (limit, wait_until) = match breaker.permit(now) {
                Permit::Full => (room, None),
                Permit::Probe => (usize::from(room > 0), None),
                Permit::WaitUntil(until) => (0, Some(until)),
                Permit::WaitForProbe => (0, None),
            };
            let mut claimed = 0;
            if limit > 0 {
                match self
                    .store
                    .claim_deliveries(&partner, limit, self.lease())
                    .await
                {
                    Ok(rows) => {
                        store_trouble = 0;
                        claimed = rows.len();
                        for row in rows {
                            let worker = Arc::clone(&self);
                            in_flight.spawn(async move { worker.attempt(row).await });
                        }
                    }
                    Err(error) => {
                        store_trouble = store_trouble.saturating_add(1);
                        tracing::warn!(partner = %partner, %error, "cannot claim deliveries");
                    }
                }
                if claimed == 0 && limit == 1 && breaker.is_open() {
                    // The probe found nothing due: let the next round probe again.
                    breaker.on_neutral();
                }
            }
            // Sleep until something can change: an attempt ends, new work is announced, the poll
            // interval passes, or the breaker's wait ends. Loop at once if a full claim suggests
            // more is due.
            let full_claim = limit > 0 && claimed == limit && in_flight.len() < concurrency;
            if full_claim {
                continue;
            }
            let mut pause = self.config.poll_interval;
            if store_trouble > 0 {
                pause = pause.saturating_mul(store_trouble.min(20));
            }
            if let Some(until) = wait_until {
                pause = until
                    .saturating_duration_since(now)
                    .min(pause.max(Duration::from_millis(1)));
            }
            tokio::select! {
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    match done {
                        Ok(Health::Up) => breaker.on_success(),
                        Ok(Health::Down) => {
                            if breaker.on_failure(Instant::now()) {
                                tracing::warn!(partner = %partner, "partner failing; circuit breaker open");
                            }
                        }
                        Ok(Health::Unknown) => breaker.on_neutral(),
                        Err(error) => {
                            tracing::error!(partner = %partner, %error, "a delivery attempt panicked");
                            breaker.on_neutral();
                        }
                    }
                }
                () = self.wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
        if !in_flight.is_empty() {
            tracing::info!(
                partner = %partner,
                in_flight = in_flight.len(),
                "push delivery worker stopping: waiting for attempts in flight"
            );
        }
        while let Some(done) = in_flight.join_next().await {
            if let Err(error) = done {
                tracing::error!(partner = %partner, %error, "a delivery attempt panicked");
            }
        }
        tracing::info!(partner = %partner, "push delivery worker stopped");
    }

    /// One attempt on one claimed row, recorded in the store before it returns. (The deliver
    /// stage's span: destination partner, resource type and attempt number — no record ids.)
    #[tracing::instrument(
        target = "caregate::stage",
        name = "deliver",
        skip_all,
        fields(partner = %row.partner, resource_type = %row.entry.resource_type, attempt = row.attempts + 1)
    )]
    async fn attempt(&self, row: PendingDelivery) -> Health {
        let partner = self.destination.config.partner.as_str();
        let entry = &row.entry;
        let age = OffsetDateTime::now_utc() - entry.committed_at;
        if age > self.config.max_age {
            let event = events::delivery_event(entry, partner, Action::Deliver, Outcome::Failed);
            let result = DeliveryResult::Dead {
                status: None,
                error: "expired: older than the delivery maximum age".to_owned(),
                response: Vec::new(),
            };
            self.record(&row, result, vec![event]).await;
            return Health::Unknown;
        }
        let recheck = self.policy.recheck(entry, partner);
        if recheck == Recheck::NotYet {
            let result = DeliveryResult::Retry {
                status: None,
                error: "consent state on this instance not yet current; checking again".to_owned(),
                next_attempt_at: OffsetDateTime::now_utc() + NOT_YET_DELAY,
            };
            self.record(&row, result, Vec::new()).await;
            return Health::Unknown;
        }
        if let Recheck::Withheld { rule_id, reason } = recheck {
            let event = events::withheld(entry, partner, &rule_id, &reason);
            tracing::info!(partner = %partner, seq = entry.seq, rule_id = %rule_id, "delivery withheld at delivery time");
            self.record(
                &row,
                DeliveryResult::Withheld { rule_id, reason },
                vec![event],
            )
            .await;
            return Health::Unknown;
        }
        let (result, health) = self.send(&row).await;
        let events = match &result {
            DeliveryResult::Delivered { status } => {
                let mut event =
                    events::delivery_event(entry, partner, Action::Deliver, Outcome::Success);
                event.status = *status;
                event.detail = Some("pushed".to_owned());
                vec![event]
            }
            DeliveryResult::Dead { status, error, .. } => {
                let mut event =
                    events::delivery_event(entry, partner, Action::Deliver, Outcome::Failed);
                event.status = *status;
                // `error` is our own short text (status, attempts, transport failure kind).
                event.detail = Some(format!("dead letter: {error}"));
                vec![event]
            }
            DeliveryResult::Retry { .. } | DeliveryResult::Withheld { .. } => Vec::new(),
        };
        if self.record(&row, result, events).await {
            health
        } else {
            Health::Unknown
        }
    }

    /// Store the result; false if it could not be (the lease will expire and the row be retried).
    async fn record(
        &self,
        row: &PendingDelivery,
        result: DeliveryResult,
        audit: Vec<caregate_audit::AuditEvent>,
    ) -> bool {
        match self.store.finish_delivery(row.id, result, audit).await {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(partner = %row.partner, seq = row.entry.seq, %error, "cannot record a delivery attempt");
                false
            }
        }
    }

    /// Send one record and classify the answer.
    async fn send(&self, row: &PendingDelivery) -> (DeliveryResult, Health) {
        let entry = &row.entry;
        let url = format!("{}/{}", self.destination.endpoint, entry.resource_type);
        let request = self
            .destination
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/fhir+json")
            .header(reqwest::header::ACCEPT, "application/fhir+json")
            .header("x-request-id", idempotency_key(entry.seq, &row.partner))
            .body(entry.content.clone());
        let attempts = row.attempts.saturating_add(1);
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                // reqwest's message names the URL (our configured endpoint) and the cause; no
                // record data is in it.
                let kind = if error.is_timeout() {
                    "timed out"
                } else if error.is_connect() {
                    "cannot connect"
                } else {
                    "request failed"
                };
                return (
                    self.retry(attempts, None, kind.to_owned(), None),
                    Health::Down,
                );
            }
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        if status.is_success() {
            return (
                DeliveryResult::Delivered {
                    status: Some(status.as_u16()),
                },
                Health::Up,
            );
        }
        let transient = status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS;
        if transient {
            let error = format!("partner answered {}", status.as_u16());
            return (
                self.retry(attempts, Some(status.as_u16()), error, retry_after),
                Health::Down,
            );
        }
        // A permanent rejection (4xx other than 408/429, or an unexpected 1xx/3xx): keep what the
        // partner said, bounded, for the operator.
        let body = read_bounded(response, self.config.response_keep_bytes).await;
        (
            DeliveryResult::Dead {
                status: Some(status.as_u16()),
                error: format!("partner rejected the record with {}", status.as_u16()),
                response: body,
            },
            Health::Up,
        )
    }

    /// A transient failure: try again after a backoff, or — once `max_attempts` is reached —
    /// give up and keep it as a dead letter.
    fn retry(
        &self,
        attempts: u32,
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    ) -> DeliveryResult {
        if self
            .config
            .max_attempts
            .is_some_and(|max| attempts >= max.max(1))
        {
            return DeliveryResult::Dead {
                status,
                error: format!("gave up after {attempts} attempts: {error}"),
                response: Vec::new(),
            };
        }
        let mut delay = self.config.backoff.delay(attempts, random_unit());
        if let Some(asked) = retry_after {
            delay = delay.max(asked.min(self.config.backoff.cap));
        }
        let next_attempt_at = OffsetDateTime::now_utc() + delay;
        DeliveryResult::Retry {
            status,
            error,
            next_attempt_at,
        }
    }
}

/// `Retry-After` in seconds (the HTTP-date form is ignored: backoff applies).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// At most `limit` bytes of a response body; the rest is never read.
async fn read_bounded(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}
