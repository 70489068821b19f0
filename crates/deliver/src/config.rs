//! What the delivery stage is built from: the destinations (one per partner that receives
//! records) and the engine's tuning. The gateway turns its validated configuration into these;
//! building a [`Destination`] reads certificate files, so it happens once at start-up.

use std::path::PathBuf;
use std::time::Duration;

use caregate_store::delivery::DeliveryChannel;

use crate::error::DeliverError;
use crate::retry::{Backoff, BreakerConfig};

/// TLS material for push: whom to trust and who we are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushTls {
    /// PEM CA bundle that issues the partner's server certificate. `None`: the platform's roots.
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate chain for mTLS, with `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// Where and how one partner receives records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationConfig {
    /// The partner id from the registry.
    pub partner: String,
    pub channel: DeliveryChannel,
    /// For push: the partner's FHIR base URL (`https://…`, no trailing slash needed). Records are
    /// only ever sent here: never to a URL found in a record (SSRF).
    pub endpoint: Option<String>,
    pub tls: PushTls,
    /// Per-request timeout for this partner (connect + send + response).
    pub timeout: Duration,
    /// Attempts in flight at once for this partner (records of different patients).
    pub concurrency: usize,
}

impl DestinationConfig {
    /// A push destination with the default timeout and concurrency.
    pub fn push(partner: &str, endpoint: &str) -> Self {
        Self {
            partner: partner.to_owned(),
            channel: DeliveryChannel::Push,
            endpoint: Some(endpoint.trim_end_matches('/').to_owned()),
            tls: PushTls::default(),
            timeout: DeliveryConfig::default_timeout(),
            concurrency: DeliveryConfig::default_concurrency(),
        }
    }

    /// An inbox destination.
    pub fn inbox(partner: &str) -> Self {
        Self {
            partner: partner.to_owned(),
            channel: DeliveryChannel::Inbox,
            endpoint: None,
            tls: PushTls::default(),
            timeout: DeliveryConfig::default_timeout(),
            concurrency: DeliveryConfig::default_concurrency(),
        }
    }

    /// Check without I/O: push needs an `https` endpoint; a client key needs a certificate.
    pub fn validate(&self) -> Result<(), DeliverError> {
        let invalid = |reason: &str| DeliverError::Config {
            partner: self.partner.clone(),
            reason: reason.to_owned(),
        };
        if self.channel == DeliveryChannel::Push {
            let endpoint = self
                .endpoint
                .as_deref()
                .ok_or_else(|| invalid("push delivery needs an endpoint"))?;
            let url = reqwest::Url::parse(endpoint)
                .map_err(|_| invalid("the endpoint is not a valid URL"))?;
            if url.scheme() != "https" {
                return Err(invalid("the endpoint must be an https URL"));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(invalid("the endpoint must not have a query or fragment"));
            }
        }
        if self.tls.client_cert.is_some() != self.tls.client_key.is_some() {
            return Err(invalid("client_cert and client_key must be given together"));
        }
        if self.concurrency == 0 {
            return Err(invalid("concurrency must be at least 1"));
        }
        Ok(())
    }
}

/// The engine's tuning, shared by every destination.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryConfig {
    /// How often readers look for new work when nothing woke them.
    pub poll_interval: Duration,
    /// Log entries the fan-out reader takes per commit.
    pub fanout_batch: usize,
    /// After being told of new commits, the fan-out reader waits this long before routing, so one
    /// of its commits carries the records of many intake commits instead of one each (the store
    /// has one writer: every fan-out commit is an fsync intake cannot use). Zero: route at once.
    pub fanout_coalesce: Duration,
    pub backoff: Backoff,
    pub breaker: BreakerConfig,
    /// Records older than this (since commit) become dead letters instead of being sent.
    /// Default 4 days: below MESH's 5-day expiry (DOMAIN.md B1), so operators see dead letters
    /// while the sender could still be told.
    pub max_age: Duration,
    /// Attempts (transport failures, timeouts, 408, 429, 5xx) after which a record becomes a dead
    /// letter although it is younger than `max_age`. `None` (the default): only age, or a
    /// permanent rejection, makes a dead letter.
    pub max_attempts: Option<u32>,
    /// Bytes of a partner's rejection kept with a dead letter.
    pub response_keep_bytes: usize,
    /// A claimed record is leased for its destination's timeout plus this margin (time to record
    /// the result). After a crash, leased records are sent again once the lease runs out.
    pub lease_margin: Duration,
}

impl DeliveryConfig {
    pub const fn default_timeout() -> Duration {
        Duration::from_secs(30)
    }

    pub const fn default_concurrency() -> usize {
        4
    }

    pub const fn default_max_age() -> Duration {
        Duration::from_secs(4 * 24 * 3600)
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            fanout_batch: 256,
            fanout_coalesce: Duration::from_millis(20),
            backoff: Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(300),
            },
            breaker: BreakerConfig {
                failures: 5,
                open_for: Duration::from_secs(30),
            },
            max_age: Self::default_max_age(),
            max_attempts: None,
            response_keep_bytes: 4096,
            lease_margin: Duration::from_secs(10),
        }
    }
}
