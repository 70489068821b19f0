//! The gateway's configuration file (TOML): parse strictly, validate without I/O, then build.
//!
//! Unknown keys are errors (`deny_unknown_fields`), so a typo never silently falls back to a
//! default. Every error names the file, the line and the field. Relative paths inside the file are
//! resolved against the file's own directory, so a config and its keys can travel together.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use caregate_fhir::nhs_number::NhsNumberPolicy;
use caregate_fhir::ods::OdsCode;
use serde::Deserialize;

/// The whole configuration file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub server: ServerSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub validation: ValidationSection,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default, rename = "partner")]
    pub partners: Vec<PartnerSection>,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default, rename = "ig_officer")]
    pub ig_officers: Vec<IgOfficerSection>,
    #[serde(default)]
    pub feeds: FeedsSection,
    pub policy: Option<PolicySection>,
    #[serde(default)]
    pub delivery: DeliveryStageSection,
    /// `[telemetry]`: OTLP export, log format (issue 8; `crate::telemetry`).
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetrySection,
    /// `[store]`: the embedded SQLite store (default) or a shared PostgreSQL (issue 8).
    #[serde(default)]
    pub store: StoreSection,
}

/// Which store holds the committed log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// The embedded SQLite store in `server.data_dir` (one gateway process).
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by several gateway instances.
    Postgres,
}

/// `[store]`, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    #[serde(default)]
    pub backend: StoreBackend,
    pub postgres: Option<PostgresSection>,
}

/// A PostgreSQL connection string. It may carry a password, so it is never printed: `Debug`
/// shows a placeholder, and nothing logs it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL itself, to pass to the driver (only).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

/// `[store.postgres]`, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// `postgres://user:password@host:port/db` or a libpq `key=value` string. Prefer `url_file`.
    pub url: Option<DatabaseUrl>,
    /// A file holding the URL (e.g. a mounted secret), read at start. Relative to the config.
    pub url_file: Option<PathBuf>,
    /// This instance's id: unique among instances sharing the database, stable across restarts.
    pub instance_id: Option<String>,
    #[serde(default = "caregate_store::postgres::PostgresOptions::default_max_batch")]
    pub max_batch: usize,
    #[serde(default = "caregate_store::postgres::PostgresOptions::default_read_connections")]
    pub read_connections: usize,
    /// How long start-up waits for the instance id to be released by a previous process, in
    /// seconds.
    #[serde(default = "default_instance_lock_wait_secs")]
    pub instance_lock_wait_secs: u64,
    /// TLS to the database (libpq `sslmode` meanings). Unset: `verify-full` if `ca_file` is set
    /// or any host in the URL is not loopback, `disable` if every host is loopback or a unix
    /// socket (decided at start, when the URL is read).
    pub tls: Option<PostgresTlsMode>,
    /// PEM file of the CA certificate(s) that issued the database's certificate, for
    /// `verify-full`. Relative to the config.
    pub ca_file: Option<PathBuf>,
}

/// `store.postgres.tls`, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PostgresTlsMode {
    /// No TLS (loopback, a unix socket).
    Disable,
    /// Encrypted, but the server's certificate is not checked: no protection against an active
    /// attacker posing as the database.
    Require,
    /// Encrypted; the certificate must chain to `ca_file` and name the host in the URL.
    VerifyFull,
}

impl From<PostgresTlsMode> for caregate_store::postgres::TlsMode {
    fn from(mode: PostgresTlsMode) -> Self {
        match mode {
            PostgresTlsMode::Disable => Self::Disable,
            PostgresTlsMode::Require => Self::Require,
            PostgresTlsMode::VerifyFull => Self::VerifyFull,
        }
    }
}

fn default_instance_lock_wait_secs() -> u64 {
    caregate_store::postgres::PostgresOptions::default_instance_lock_wait().as_secs()
}

/// Where the PostgreSQL URL comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrlSource {
    Inline(DatabaseUrl),
    /// Resolved against the config file's directory; read by [`PostgresSettings::url`].
    File(PathBuf),
}

/// `[store.postgres]` after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSettings {
    pub url: DatabaseUrlSource,
    pub instance_id: String,
    pub max_batch: usize,
    pub read_connections: usize,
    pub instance_lock_wait: Duration,
    /// `None`: decided by the URL's hosts (see [`PostgresSection::tls`]).
    pub tls: Option<caregate_store::postgres::TlsMode>,
    /// Resolved against the config file's directory; read by [`PostgresSettings::tls`].
    pub ca_file: Option<PathBuf>,
}

impl PostgresSettings {
    /// The connection URL (reads `url_file` now; surrounding whitespace is dropped). The error
    /// names the file, never its contents.
    pub fn url(&self) -> Result<DatabaseUrl, String> {
        match &self.url {
            DatabaseUrlSource::Inline(url) => Ok(url.clone()),
            DatabaseUrlSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!(
                        "cannot read store.postgres.url_file {}: {e}",
                        path.display()
                    )
                })?;
                let url = text.trim();
                if url.is_empty() {
                    return Err(format!(
                        "store.postgres.url_file {} is empty",
                        path.display()
                    ));
                }
                Ok(DatabaseUrl(url.to_owned()))
            }
        }
    }

    /// The TLS settings for every connection to the database (reads `ca_file` now). Errors name
    /// the field and the file.
    pub fn tls(&self) -> Result<caregate_store::postgres::PostgresTls, String> {
        use caregate_store::postgres::{CaCertificates, PostgresTls};
        let ca = match &self.ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    format!("cannot read store.postgres.ca_file {}: {e}", path.display())
                })?;
                Some(
                    CaCertificates::from_pem(&pem)
                        .map_err(|e| format!("store.postgres.ca_file {}: {e}", path.display()))?,
                )
            }
        };
        PostgresTls::new(self.tls, ca).map_err(|e| format!("store.postgres.tls: {e}"))
    }

    /// The store options for this instance (without audit signing and TLS, see
    /// [`PostgresSettings::tls`]).
    pub fn options(&self) -> caregate_store::postgres::PostgresOptions {
        let mut options = caregate_store::postgres::PostgresOptions::new(self.instance_id.clone());
        options.max_batch = self.max_batch;
        options.read_connections = self.read_connections;
        options.instance_lock_wait = self.instance_lock_wait;
        options
    }
}

/// `[store]` after validation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreSettings {
    #[default]
    Sqlite,
    Postgres(PostgresSettings),
}

/// The delivery stage's tuning (`[delivery]`, `caregate_deliver::DeliveryConfig`), shared by every
/// destination, and the defaults partners' `[partner.delivery]` tables may override. Every default
/// is the engine's own, so an absent section changes nothing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryStageSection {
    /// How often the fan-out reader and push workers look for work nobody announced, in ms.
    pub poll_interval_ms: u64,
    /// Log entries the fan-out reader routes per commit.
    pub fanout_batch: usize,
    /// After new commits, the fan-out reader waits this long before routing them, in ms.
    pub fanout_coalesce_ms: u64,
    /// First retry waits up to this long (full jitter), doubling per failure, in ms.
    pub backoff_base_ms: u64,
    /// … never more than this, in seconds.
    pub backoff_max_secs: u64,
    /// Consecutive failures that open a destination's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker waits before one probe, in seconds.
    pub breaker_open_secs: u64,
    /// A record older than this (since commit) becomes a dead letter instead of being sent, in
    /// seconds. Default 4 days, below MESH's 5-day expiry.
    pub max_age_secs: u64,
    /// Transient failures after which a record becomes a dead letter; absent: no limit (age only).
    pub max_attempts: Option<u32>,
    /// Bytes of a partner's rejection kept with a dead letter.
    pub response_keep_bytes: usize,
    /// A claimed record is leased for the request timeout plus this margin, in seconds.
    pub lease_margin_secs: u64,
    /// Default per-request timeout of a push (connect + send + answer), in seconds.
    pub timeout_secs: u64,
    /// Default number of attempts in flight at once per partner.
    pub concurrency: usize,
    /// Default PEM CA bundle for partners' server certificates (absent: the system roots).
    pub ca_cert: Option<PathBuf>,
    /// Gateway-wide mTLS identity presented to push endpoints: PEM certificate chain…
    pub client_cert: Option<PathBuf>,
    /// … and its PEM private key. A partner's own `client_cert`/`client_key` replace both.
    pub client_key: Option<PathBuf>,
}

impl Default for DeliveryStageSection {
    fn default() -> Self {
        let engine = caregate_deliver::DeliveryConfig::default();
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            poll_interval_ms: millis(engine.poll_interval),
            fanout_batch: engine.fanout_batch,
            fanout_coalesce_ms: millis(engine.fanout_coalesce),
            backoff_base_ms: millis(engine.backoff.base),
            backoff_max_secs: engine.backoff.cap.as_secs(),
            breaker_failures: engine.breaker.failures,
            breaker_open_secs: engine.breaker.open_for.as_secs(),
            max_age_secs: engine.max_age.as_secs(),
            max_attempts: engine.max_attempts,
            response_keep_bytes: engine.response_keep_bytes,
            lease_margin_secs: engine.lease_margin.as_secs(),
            timeout_secs: caregate_deliver::DeliveryConfig::default_timeout().as_secs(),
            concurrency: caregate_deliver::DeliveryConfig::default_concurrency(),
            ca_cert: None,
            client_cert: None,
            client_key: None,
        }
    }
}

/// `[delivery]` after validation: the engine's tuning and the per-partner defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliverySettings {
    pub engine: caregate_deliver::DeliveryConfig,
    pub timeout: Duration,
    pub concurrency: usize,
    /// Paths resolved against the config file's directory.
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Bounds of `[delivery]` and `[partner.delivery]` values (checked at load, named in errors).
const MAX_PUSH_TIMEOUT_SECS: u64 = 600;
const MAX_PUSH_CONCURRENCY: usize = 256;

/// The consent/IG policy (`caregate_policy`). Without this section no decision is made: records
/// are accepted and stored but go to no partner and no feed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// The policy bundle directory (`policies/` in the repository).
    pub dir: PathBuf,
    /// The cleaned National Data Opt-out list (one NHS number per line). Its modification time
    /// is taken as the time it was obtained (`NDOO-6`).
    pub ndoo_list: Option<PathBuf>,
    /// A Type 1 opt-out list, one NHS number per line (`T1-1`).
    pub type1_list: Option<PathBuf>,
    /// How old the NDOO list may be before secondary-use flows fail closed, in days.
    #[serde(default = "default_ndoo_max_age_days")]
    pub ndoo_max_age_days: u32,
}

fn default_ndoo_max_age_days() -> u32 {
    28
}

/// Pseudonymised feeds (issue 5, `caregate_feeds`): where the definitions and the per-feed key
/// file are. The key file may instead be named by the `CAREGATE_FEED_KEYS` environment variable
/// (for a secret manager); it must never sit in the data directory's database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedsSection {
    /// Directory of feed definitions (`*.toml`); feeds are off when unset.
    pub definitions: Option<PathBuf>,
    /// The feed key file (mode 0600).
    pub key_file: Option<PathBuf>,
    /// Where exports are written (`<export_dir>/feeds/<feed>/<export-id>/`); default the data
    /// directory. In cluster mode a directory every instance shares, so any instance can serve
    /// the files of an export another one ran.
    pub export_dir: Option<PathBuf>,
    /// How long a finished Bulk Data export (complete, failed or cancelled) is kept, in
    /// seconds: after it, its files are deleted, its job row removed and its status URL answers
    /// 404. The complete status carries it as `Expires`. Default 24 hours; 1 second to 30 days.
    pub export_retention_secs: u64,
}

impl FeedsSection {
    /// The default [`FeedsSection::export_retention_secs`]: 24 hours.
    pub const DEFAULT_EXPORT_RETENTION_SECS: u64 = 24 * 60 * 60;
    /// The longest retention accepted: patient-derived files must not linger indefinitely.
    pub const MAX_EXPORT_RETENTION_SECS: u64 = 30 * 24 * 60 * 60;

    /// [`FeedsSection::export_retention_secs`] as a duration.
    pub fn export_retention(&self) -> Duration {
        Duration::from_secs(self.export_retention_secs)
    }
}

impl Default for FeedsSection {
    fn default() -> Self {
        Self {
            definitions: None,
            key_file: None,
            export_dir: None,
            export_retention_secs: Self::DEFAULT_EXPORT_RETENTION_SECS,
        }
    }
}

/// The IG officers' listener: the audit API and web console (`crate::admin`), HTTPS with the same
/// TLS configuration as the partner listener, on its own address so it can be firewalled apart.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    pub enabled: bool,
    /// Address of the admin listener. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// A console session ends after this long without a request, in seconds.
    pub session_idle_secs: u64,
    /// A console session ends this long after login whatever happens, in seconds.
    pub session_max_secs: u64,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8444)),
            session_idle_secs: 900,
            session_max_secs: 8 * 3600,
        }
    }
}

/// An IG officer who may sign in to the console (`[[ig_officer]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IgOfficerSection {
    pub username: String,
    /// Argon2id PHC string (`$argon2id$v=19$m=...`), e.g. from `caregate ig-password`.
    pub password_hash: String,
    pub name: String,
    /// ODS code of the officer's organisation.
    pub ods_code: String,
}

/// An IG officer after validation.
#[derive(Debug, Clone)]
pub struct IgOfficer {
    pub username: String,
    pub password_hash: String,
    pub name: String,
    pub ods_code: OdsCode,
}

/// Extra rights a partner's tokens carry beyond their FHIR scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartnerRole {
    /// May use the admin audit API (with scope `system/AuditEvent.rs`).
    IgOfficer,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on, e.g. `127.0.0.1:8443`. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The base URL partners use to reach this gateway (no trailing slash), e.g.
    /// `https://caregate.example.nhs.uk`. The token endpoint's `aud` is `{public_url}/auth/token`.
    /// Defaults to `https://localhost:{port}`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Data directory for the embedded store. Relative to the config file.
    pub data_dir: PathBuf,
    /// How long graceful shutdown waits for in-flight requests, in seconds.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
}

fn default_shutdown_grace_secs() -> u64 {
    30
}

/// Client-certificate policy for the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificates are requested.
    #[default]
    None,
    /// Requested and verified if presented; partners with a bound certificate must present it.
    Optional,
    /// Every connection must present a certificate issued by `client_ca`.
    Required,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain. When both `cert` and `key` are absent the gateway runs in dev mode
    /// with a generated self-signed certificate (and says so loudly).
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: Option<PathBuf>,
    /// PEM bundle of CAs that issue partner client certificates (needed unless `client_auth` is none).
    pub client_ca: Option<PathBuf>,
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// Edge limits. Defaults follow Envoy's edge guidance where it applies (DOMAIN.md B1).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_body_bytes: usize,
    pub max_json_depth: usize,
    pub max_header_bytes: usize,
    pub request_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub header_read_timeout_secs: u64,
    pub tls_handshake_timeout_secs: u64,
    pub max_connections: usize,
    pub max_bundle_entries: usize,
    pub http2_max_concurrent_streams: u32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            max_json_depth: 64,
            max_header_bytes: 16 * 1024,
            request_timeout_secs: 30,
            idle_timeout_secs: 60,
            header_read_timeout_secs: 10,
            tls_handshake_timeout_secs: 10,
            max_connections: 10_000,
            max_bundle_entries: 1_000,
            http2_max_concurrent_streams: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Lifetime of issued access tokens, in seconds (at most 3600).
    pub access_token_ttl_secs: u64,
    /// Allowed clock skew when checking `exp`/`nbf`/`iat`, in seconds.
    pub clock_leeway_secs: u64,
    /// PKCS#8 PEM ES256 key that signs access tokens. Absent: an ephemeral key per process
    /// (tokens do not survive a restart, and several instances cannot share them).
    pub signing_key: Option<PathBuf>,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            access_token_ttl_secs: 300,
            clock_leeway_secs: 30,
            signing_key: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationSection {
    /// Accept NHS numbers from the test ranges (starting 9). Set false in production.
    pub allow_test_nhs_numbers: bool,
    /// Absolute reference bases that are accepted (anything else absolute is refused, OWASP API7).
    pub allowed_reference_bases: Vec<String>,
}

impl Default for ValidationSection {
    fn default() -> Self {
        Self {
            allow_test_nhs_numbers: true,
            allowed_reference_bases: Vec::new(),
        }
    }
}

/// The audit log's tamper evidence (RFC 9162 Merkle tree with signed checkpoints).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// The log's name in its checkpoints (no spaces or `+`), e.g. `caregate.example-ics.nhs.uk/audit`.
    pub log_id: String,
    /// PKCS#8 PEM Ed25519 key that signs checkpoints. Absent: dev mode — a key is generated once
    /// and kept in the data directory (`audit-signing-key.pem`), which protects against nothing
    /// an attacker with the data directory cannot also do. Keep the production key elsewhere.
    pub signing_key: Option<PathBuf>,
    /// Sign a checkpoint after this many new events…
    pub checkpoint_every_events: u64,
    /// …or this many seconds after the last one, whichever comes first.
    pub checkpoint_every_secs: u64,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            log_id: "caregate/audit".to_owned(),
            signing_key: None,
            checkpoint_every_events: 1000,
            checkpoint_every_secs: 60,
        }
    }
}

/// Organisation kinds in an ICS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartnerKind {
    Gp,
    Trust,
    Pharmacy,
    Council,
    Icb,
}

impl PartnerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gp => "gp",
            Self::Trust => "trust",
            Self::Pharmacy => "pharmacy",
            Self::Council => "council",
            Self::Icb => "icb",
        }
    }
}

/// How records reach a partner (used by the delivery stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// Pushed to the partner's FHIR endpoint.
    Push,
    /// Held for the partner to pull.
    #[default]
    Inbox,
    /// The partner receives nothing (submit-only or analytics consumers of feeds).
    None,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySection {
    #[serde(default)]
    pub mode: DeliveryMode,
    /// The partner's FHIR base URL for push delivery.
    pub endpoint: Option<String>,
    /// Push: PEM CA bundle that issues the partner's server certificate (default: system roots).
    /// Paths are relative to the config file.
    pub ca_cert: Option<PathBuf>,
    /// Push over mTLS: our PEM client certificate chain for this partner, with `client_key`.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Push: per-request timeout in seconds (default `[delivery] timeout_secs`).
    pub timeout_secs: Option<u64>,
    /// Push: attempts in flight at once (default `[delivery] concurrency`).
    pub concurrency: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerSection {
    /// Stable id; also the OAuth client id.
    pub id: String,
    /// Human-readable organisation name.
    pub name: String,
    /// ODS code of the organisation.
    pub ods_code: String,
    pub kind: PartnerKind,
    /// SMART scopes the partner may be granted, e.g. `system/Observation.cru`.
    pub scopes: Vec<String>,
    /// Path to a JWKS file with the partner's public keys (relative to the config file).
    pub jwks_file: Option<PathBuf>,
    /// Inline JWKS (`{ keys = [ { kty = "EC", ... } ] }`).
    pub jwks: Option<toml::Value>,
    /// Base64url SHA-256 thumbprint of the partner's client certificate (RFC 8705), binding it.
    pub client_cert_sha256: Option<String>,
    #[serde(default)]
    pub delivery: DeliverySection,
    /// Extra rights, e.g. `["ig-officer"]` for the admin audit API.
    #[serde(default)]
    pub roles: Vec<PartnerRole>,
}

/// A configuration error, naming where it is.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A partner after validation.
#[derive(Debug, Clone)]
pub struct Partner {
    pub id: String,
    pub name: String,
    pub ods_code: OdsCode,
    pub kind: PartnerKind,
    pub scopes: Vec<String>,
    pub jwks: serde_json::Value,
    pub client_cert_sha256: Option<String>,
    pub delivery: DeliverySection,
    pub roles: Vec<PartnerRole>,
}

/// The validated configuration the gateway is built from.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listen: SocketAddr,
    pub public_url: Option<String>,
    pub data_dir: PathBuf,
    pub shutdown_grace: Duration,
    pub tls: TlsSection,
    pub limits: LimitsSection,
    pub auth: AuthSection,
    pub validation: ValidationSection,
    pub audit: AuditSection,
    pub partners: Vec<Partner>,
    pub admin: AdminSection,
    pub ig_officers: Vec<IgOfficer>,
    /// Paths resolved against the config file's directory.
    pub feeds: FeedsSection,
    pub policy: Option<PolicySection>,
    /// `[delivery]`, validated.
    pub delivery: DeliverySettings,
    /// `[telemetry]`, validated, with the standard `OTEL_*` variables applied.
    pub telemetry: crate::telemetry::TelemetrySettings,
    /// `[store]`, validated.
    pub store: StoreSettings,
}

impl Config {
    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: None,
            field: None,
            message: format!("cannot read the file: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parse and validate configuration text that came from `path` (used for relative paths and
    /// error messages). Reads JWKS files named by partners.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| line_of(text, span.start));
            ConfigError {
                file: path.to_owned(),
                line,
                field: None,
                message: e.message().trim().to_owned(),
            }
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_owned();
        Validator {
            path,
            text,
            base: &base,
        }
        .validate(file)
    }

    /// The public base URL (no trailing slash), given the address actually bound.
    pub fn public_url_for(&self, bound: SocketAddr) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("https://localhost:{}", bound.port()),
        }
    }

    /// The NHS number policy implied by the validation section.
    pub fn nhs_number_policy(&self) -> NhsNumberPolicy {
        NhsNumberPolicy {
            allow_test_numbers: self.validation.allow_test_nhs_numbers,
            ..NhsNumberPolicy::default()
        }
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
    base: &'a Path,
}

impl Validator<'_> {
    fn error(&self, field: &str, needle: Option<&str>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.to_owned(),
            line: needle.and_then(|n| self.find_line(n)),
            field: Some(field.to_owned()),
            message: message.into(),
        }
    }

    /// Best-effort line of the first occurrence of `needle` (a value or key), for messages about
    /// values that parsed but failed validation.
    fn find_line(&self, needle: &str) -> Option<usize> {
        self.text
            .find(needle)
            .map(|offset| line_of(self.text, offset))
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base.join(path)
        }
    }

    fn validate(&self, file: ConfigFile) -> Result<Config, ConfigError> {
        let retention = file.feeds.export_retention_secs;
        if !(1..=FeedsSection::MAX_EXPORT_RETENTION_SECS).contains(&retention) {
            return Err(ConfigError {
                file: self.path.to_owned(),
                line: self.key_line("feeds", "export_retention_secs"),
                field: Some("feeds.export_retention_secs".to_owned()),
                message: format!(
                    "must be between 1 and {} seconds (30 days): finished exports' files are \
                     deleted after it (default {}, 24 hours)",
                    FeedsSection::MAX_EXPORT_RETENTION_SECS,
                    FeedsSection::DEFAULT_EXPORT_RETENTION_SECS
                ),
            });
        }
        let limits = &file.limits;
        if limits.max_json_depth == 0 || limits.max_json_depth > 100 {
            return Err(self.error(
                "limits.max_json_depth",
                Some("max_json_depth"),
                "must be between 1 and 100",
            ));
        }
        if limits.max_body_bytes < 1024 {
            return Err(self.error(
                "limits.max_body_bytes",
                Some("max_body_bytes"),
                "must be at least 1024",
            ));
        }
        if limits.max_header_bytes < 8192 {
            return Err(self.error(
                "limits.max_header_bytes",
                Some("max_header_bytes"),
                "must be at least 8192 (the HTTP/1.1 parser's minimum buffer)",
            ));
        }
        if limits.max_connections == 0 {
            return Err(self.error(
                "limits.max_connections",
                Some("max_connections"),
                "must be at least 1",
            ));
        }
        if file.auth.access_token_ttl_secs == 0 || file.auth.access_token_ttl_secs > 3600 {
            return Err(self.error(
                "auth.access_token_ttl_secs",
                Some("access_token_ttl_secs"),
                "must be between 1 and 3600 seconds",
            ));
        }
        if let Some(url) = &file.server.public_url
            && !url.starts_with("https://")
        {
            return Err(self.error("server.public_url", Some(url), "must be an https:// URL"));
        }
        let mut tls = file.tls.clone();
        match (&tls.cert, &tls.key) {
            (Some(_), None) => {
                return Err(self.error("tls.key", Some("cert"), "`cert` is set but `key` is not"));
            }
            (None, Some(_)) => {
                return Err(self.error("tls.cert", Some("key"), "`key` is set but `cert` is not"));
            }
            _ => {}
        }
        if tls.client_auth != ClientAuth::None && tls.client_ca.is_none() {
            return Err(self.error(
                "tls.client_ca",
                Some("client_auth"),
                "client certificates are requested but no `client_ca` is configured",
            ));
        }
        tls.cert = tls.cert.map(|p| self.resolve(&p));
        tls.key = tls.key.map(|p| self.resolve(&p));
        tls.client_ca = tls.client_ca.map(|p| self.resolve(&p));
        let mut audit = file.audit.clone();
        if audit.log_id.is_empty()
            || audit.log_id.len() > 200
            || audit
                .log_id
                .chars()
                .any(|c| c.is_whitespace() || c == '+' || c.is_control())
        {
            return Err(self.error(
                "audit.log_id",
                Some("log_id"),
                "must be 1-200 printable characters without spaces or '+'",
            ));
        }
        if audit.checkpoint_every_events == 0 || audit.checkpoint_every_secs == 0 {
            return Err(self.error(
                "audit",
                Some("checkpoint_every"),
                "checkpoint intervals must be at least 1",
            ));
        }
        audit.signing_key = audit.signing_key.map(|p| self.resolve(&p));
        let mut auth = file.auth.clone();
        auth.signing_key = auth.signing_key.map(|p| self.resolve(&p));

        let mut partners: Vec<Partner> = Vec::with_capacity(file.partners.len());
        for (index, section) in file.partners.into_iter().enumerate() {
            let field = |name: &str| format!("partner[{index}].{name}");
            let id_ok = !section.id.is_empty()
                && section.id.len() <= 64
                && section
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !id_ok {
                return Err(self.error(
                    &field("id"),
                    Some(&section.id),
                    "must be 1-64 characters of letters, digits, '-' or '_'",
                ));
            }
            if partners.iter().any(|p| p.id == section.id) {
                return Err(self.error(&field("id"), Some(&section.id), "duplicate partner id"));
            }
            let ods_code = OdsCode::parse(&section.ods_code).map_err(|e| {
                self.error(
                    &field("ods_code"),
                    Some(&section.ods_code),
                    format!("not a valid ODS code: {e}"),
                )
            })?;
            if section.scopes.is_empty() {
                return Err(self.error(
                    &field("scopes"),
                    Some(&section.id),
                    "at least one scope is required",
                ));
            }
            for scope in &section.scopes {
                if let Err(e) = caregate_auth::scope::ScopeSet::parse(scope) {
                    return Err(self.error(
                        &field("scopes"),
                        Some(scope),
                        format!("invalid scope `{scope}`: {e}"),
                    ));
                }
            }
            let jwks = match (&section.jwks_file, &section.jwks) {
                (Some(_), Some(_)) => {
                    return Err(self.error(
                        &field("jwks"),
                        Some(&section.id),
                        "give `jwks` or `jwks_file`, not both",
                    ));
                }
                (None, None) => {
                    return Err(self.error(
                        &field("jwks_file"),
                        Some(&section.id),
                        "a JWKS (`jwks_file` or `jwks`) is required",
                    ));
                }
                (Some(file_path), None) => {
                    let resolved = self.resolve(file_path);
                    let text = std::fs::read_to_string(&resolved).map_err(|e| {
                        self.error(
                            &field("jwks_file"),
                            Some(&file_path.to_string_lossy()),
                            format!("cannot read {}: {e}", resolved.display()),
                        )
                    })?;
                    serde_json::from_str::<serde_json::Value>(&text).map_err(|e| {
                        self.error(
                            &field("jwks_file"),
                            Some(&file_path.to_string_lossy()),
                            format!("{} is not JSON: {e}", resolved.display()),
                        )
                    })?
                }
                (None, Some(inline)) => serde_json::to_value(inline).map_err(|e| {
                    self.error(
                        &field("jwks"),
                        Some(&section.id),
                        format!("cannot convert to JSON: {e}"),
                    )
                })?,
            };
            if section.delivery.mode == DeliveryMode::Push {
                match &section.delivery.endpoint {
                    Some(endpoint) if endpoint.starts_with("https://") => {}
                    Some(endpoint) => {
                        return Err(self.error(
                            &field("delivery.endpoint"),
                            Some(endpoint),
                            "must be an https:// URL",
                        ));
                    }
                    None => {
                        return Err(self.error(
                            &field("delivery.endpoint"),
                            Some(&section.id),
                            "push delivery needs an endpoint",
                        ));
                    }
                }
            }
            self.validate_partner_delivery(index, &section.id, &section.delivery)?;
            let mut delivery = section.delivery;
            delivery.ca_cert = delivery.ca_cert.map(|p| self.resolve(&p));
            delivery.client_cert = delivery.client_cert.map(|p| self.resolve(&p));
            delivery.client_key = delivery.client_key.map(|p| self.resolve(&p));
            partners.push(Partner {
                id: section.id,
                name: section.name,
                ods_code,
                kind: section.kind,
                scopes: section.scopes,
                jwks,
                client_cert_sha256: section.client_cert_sha256,
                delivery,
                roles: section.roles,
            });
        }
        let delivery = self.validate_delivery(&file.delivery)?;
        let ig_officers = self.validate_ig_officers(file.ig_officers)?;
        if file.admin.enabled
            && file.admin.listen == file.server.listen
            && file.admin.listen.port() != 0
        {
            return Err(self.error(
                "admin.listen",
                Some("[admin]"),
                "must differ from server.listen",
            ));
        }
        if file.admin.session_idle_secs == 0
            || file.admin.session_max_secs < file.admin.session_idle_secs
        {
            return Err(self.error(
                "admin.session_idle_secs",
                Some("session_"),
                "must be at least 1 and at most admin.session_max_secs",
            ));
        }

        // The standard OpenTelemetry variables override `[telemetry]` (OTel SDK configuration).
        let telemetry = file
            .telemetry
            .settings(|name| std::env::var(name).ok())
            .map_err(|e| {
                let key = e.key.strip_prefix("telemetry.").unwrap_or(&e.key);
                ConfigError {
                    file: self.path.to_owned(),
                    line: self.key_line("telemetry", key),
                    field: Some(e.key.clone()),
                    message: e.message.clone(),
                }
            })?;

        let store = self.validate_store(file.store)?;

        Ok(Config {
            path: self.path.to_owned(),
            listen: file.server.listen,
            public_url: file
                .server
                .public_url
                .map(|u| u.trim_end_matches('/').to_owned()),
            data_dir: self.resolve(&file.server.data_dir),
            shutdown_grace: Duration::from_secs(file.server.shutdown_grace_secs),
            tls,
            limits: file.limits,
            auth,
            validation: file.validation,
            audit,
            partners,
            admin: file.admin,
            ig_officers,
            feeds: FeedsSection {
                definitions: file.feeds.definitions.as_deref().map(|p| self.resolve(p)),
                key_file: file.feeds.key_file.as_deref().map(|p| self.resolve(p)),
                export_dir: file.feeds.export_dir.as_deref().map(|p| self.resolve(p)),
                export_retention_secs: file.feeds.export_retention_secs,
            },
            policy: file.policy.map(|policy| PolicySection {
                dir: self.resolve(&policy.dir),
                ndoo_list: policy.ndoo_list.as_deref().map(|p| self.resolve(p)),
                type1_list: policy.type1_list.as_deref().map(|p| self.resolve(p)),
                ndoo_max_age_days: policy.ndoo_max_age_days,
            }),
            delivery,
            telemetry,
            store,
        })
    }

    fn validate_store(&self, section: StoreSection) -> Result<StoreSettings, ConfigError> {
        use caregate_store::postgres::TlsMode;
        let line = |key: &str| self.key_line("store.postgres", key);
        let at = |field: &str, key: &str, message: &str| ConfigError {
            file: self.path.to_owned(),
            line: line(key).or_else(|| self.find_line("[store.postgres]")),
            field: Some(field.to_owned()),
            message: message.to_owned(),
        };
        match (section.backend, section.postgres) {
            (StoreBackend::Sqlite, None) => Ok(StoreSettings::Sqlite),
            (StoreBackend::Sqlite, Some(_)) => Err(at(
                "store.postgres",
                "",
                "is only used with store.backend = \"postgres\"",
            )),
            (StoreBackend::Postgres, None) => Err(ConfigError {
                file: self.path.to_owned(),
                line: self.key_line("store", "backend"),
                field: Some("store.postgres".to_owned()),
                message: "store.backend = \"postgres\" needs a [store.postgres] section with url or url_file and instance_id".to_owned(),
            }),
            (StoreBackend::Postgres, Some(pg)) => {
                let url = match (pg.url, pg.url_file) {
                    (Some(url), None) if !url.0.trim().is_empty() => DatabaseUrlSource::Inline(url),
                    (Some(_), None) => return Err(at("store.postgres.url", "url", "must not be empty")),
                    (None, Some(path)) => DatabaseUrlSource::File(self.resolve(&path)),
                    (None, None) => {
                        return Err(at("store.postgres.url", "", "set url or url_file"));
                    }
                    (Some(_), Some(_)) => {
                        return Err(at(
                            "store.postgres.url_file",
                            "url_file",
                            "set url or url_file, not both",
                        ));
                    }
                };
                let Some(instance_id) = pg.instance_id else {
                    return Err(at(
                        "store.postgres.instance_id",
                        "",
                        "is required: a name unique among the instances sharing the database, e.g. the host or pod name",
                    ));
                };
                if instance_id.is_empty()
                    || instance_id.len() > 200
                    || !instance_id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                {
                    return Err(at(
                        "store.postgres.instance_id",
                        "instance_id",
                        "must be 1 to 200 characters of A-Z, a-z, 0-9, '-', '_' or '.'",
                    ));
                }
                if pg.max_batch == 0 || pg.max_batch > 10_000 {
                    return Err(at(
                        "store.postgres.max_batch",
                        "max_batch",
                        "must be between 1 and 10000",
                    ));
                }
                if pg.read_connections == 0 || pg.read_connections > 64 {
                    return Err(at(
                        "store.postgres.read_connections",
                        "read_connections",
                        "must be between 1 and 64",
                    ));
                }
                // Whether the database is local is known only when the URL is read (it may be in
                // a file); what does not depend on it is checked here.
                let tls = pg.tls.map(caregate_store::postgres::TlsMode::from);
                match tls {
                    Some(TlsMode::VerifyFull) if pg.ca_file.is_none() => {
                        return Err(at(
                            "store.postgres.ca_file",
                            "tls",
                            "is required with tls = \"verify-full\": the PEM file of the CA \
                             certificate(s) that issued the database's certificate",
                        ));
                    }
                    Some(mode @ (TlsMode::Disable | TlsMode::Require)) if pg.ca_file.is_some() => {
                        return Err(at(
                            "store.postgres.ca_file",
                            "ca_file",
                            &format!(
                                "is only used with tls = \"verify-full\"; tls = \"{mode}\" \
                                 does not check the database's certificate"
                            ),
                        ));
                    }
                    _ => {}
                }
                Ok(StoreSettings::Postgres(PostgresSettings {
                    url,
                    instance_id,
                    max_batch: pg.max_batch,
                    read_connections: pg.read_connections,
                    instance_lock_wait: Duration::from_secs(pg.instance_lock_wait_secs),
                    tls,
                    ca_file: pg.ca_file.as_deref().map(|path| self.resolve(path)),
                }))
            }
        }
    }

    /// Line of `key = …` inside the `[section]` table (not in another table that happens to use
    /// the same key), for errors about values that parsed but failed validation.
    fn key_line(&self, section: &str, key: &str) -> Option<usize> {
        let header = format!("[{section}]");
        let mut inside = false;
        for (index, line) in self.text.lines().enumerate() {
            let trimmed = line.trim_start();
            if trimmed.starts_with('[') {
                inside = trimmed.trim_end() == header
                    || trimmed.split('#').next().map(str::trim_end) == Some(header.as_str());
                continue;
            }
            if inside
                && let Some(rest) = trimmed.strip_prefix(key)
                && rest.trim_start().starts_with('=')
            {
                return Some(index + 1);
            }
        }
        None
    }

    fn delivery_error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.to_owned(),
            line: self.key_line("delivery", key),
            field: Some(format!("delivery.{key}")),
            message: message.into(),
        }
    }

    /// `[delivery]`: every number within bounds that keep the engine sane, mTLS files in pairs.
    fn validate_delivery(
        &self,
        section: &DeliveryStageSection,
    ) -> Result<DeliverySettings, ConfigError> {
        let range = |key: &str, value: u64, min: u64, max: u64, unit: &str| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(self.delivery_error(key, format!("must be between {min} and {max} {unit}")))
            }
        };
        range(
            "poll_interval_ms",
            section.poll_interval_ms,
            10,
            60_000,
            "milliseconds",
        )?;
        range(
            "fanout_batch",
            u64::try_from(section.fanout_batch).unwrap_or(u64::MAX),
            1,
            10_000,
            "log entries",
        )?;
        range(
            "fanout_coalesce_ms",
            section.fanout_coalesce_ms,
            0,
            1_000,
            "milliseconds",
        )?;
        range(
            "backoff_base_ms",
            section.backoff_base_ms,
            1,
            3_600_000,
            "milliseconds",
        )?;
        range(
            "backoff_max_secs",
            section.backoff_max_secs,
            1,
            86_400,
            "seconds",
        )?;
        if section.backoff_max_secs.saturating_mul(1000) < section.backoff_base_ms {
            return Err(self.delivery_error(
                "backoff_max_secs",
                "must not be shorter than backoff_base_ms",
            ));
        }
        range(
            "breaker_failures",
            u64::from(section.breaker_failures),
            1,
            1_000,
            "failures",
        )?;
        range(
            "breaker_open_secs",
            section.breaker_open_secs,
            1,
            3_600,
            "seconds",
        )?;
        // At least a minute; at most 30 days (MESH keeps messages 5 days: older is no use).
        range(
            "max_age_secs",
            section.max_age_secs,
            60,
            30 * 86_400,
            "seconds",
        )?;
        if let Some(max) = section.max_attempts {
            range("max_attempts", u64::from(max), 1, 1_000_000, "attempts")?;
        }
        range(
            "response_keep_bytes",
            u64::try_from(section.response_keep_bytes).unwrap_or(u64::MAX),
            0,
            1024 * 1024,
            "bytes",
        )?;
        range(
            "lease_margin_secs",
            section.lease_margin_secs,
            1,
            3_600,
            "seconds",
        )?;
        range(
            "timeout_secs",
            section.timeout_secs,
            1,
            MAX_PUSH_TIMEOUT_SECS,
            "seconds",
        )?;
        range(
            "concurrency",
            u64::try_from(section.concurrency).unwrap_or(u64::MAX),
            1,
            MAX_PUSH_CONCURRENCY as u64,
            "attempts",
        )?;
        match (&section.client_cert, &section.client_key) {
            (Some(_), None) => {
                return Err(self.delivery_error(
                    "client_cert",
                    "`client_cert` is set but `client_key` is not",
                ));
            }
            (None, Some(_)) => {
                return Err(self
                    .delivery_error("client_key", "`client_key` is set but `client_cert` is not"));
            }
            _ => {}
        }
        let engine = caregate_deliver::DeliveryConfig {
            poll_interval: Duration::from_millis(section.poll_interval_ms),
            fanout_batch: section.fanout_batch,
            fanout_coalesce: Duration::from_millis(section.fanout_coalesce_ms),
            backoff: caregate_deliver::retry::Backoff {
                base: Duration::from_millis(section.backoff_base_ms),
                cap: Duration::from_secs(section.backoff_max_secs),
            },
            breaker: caregate_deliver::retry::BreakerConfig {
                failures: section.breaker_failures,
                open_for: Duration::from_secs(section.breaker_open_secs),
            },
            max_age: Duration::from_secs(section.max_age_secs),
            max_attempts: section.max_attempts,
            response_keep_bytes: section.response_keep_bytes,
            lease_margin: Duration::from_secs(section.lease_margin_secs),
        };
        Ok(DeliverySettings {
            engine,
            timeout: Duration::from_secs(section.timeout_secs),
            concurrency: section.concurrency,
            ca_cert: section.ca_cert.as_deref().map(|p| self.resolve(p)),
            client_cert: section.client_cert.as_deref().map(|p| self.resolve(p)),
            client_key: section.client_key.as_deref().map(|p| self.resolve(p)),
        })
    }

    /// `[partner.delivery]`: bounds and mTLS pairs (the endpoint is checked by the caller).
    fn validate_partner_delivery(
        &self,
        index: usize,
        id: &str,
        section: &DeliverySection,
    ) -> Result<(), ConfigError> {
        let field = |name: &str| format!("partner[{index}].delivery.{name}");
        if let Some(secs) = section.timeout_secs
            && !(1..=MAX_PUSH_TIMEOUT_SECS).contains(&secs)
        {
            return Err(self.error(
                &field("timeout_secs"),
                Some(id),
                format!("must be between 1 and {MAX_PUSH_TIMEOUT_SECS} seconds"),
            ));
        }
        if let Some(concurrency) = section.concurrency
            && !(1..=MAX_PUSH_CONCURRENCY).contains(&concurrency)
        {
            return Err(self.error(
                &field("concurrency"),
                Some(id),
                format!("must be between 1 and {MAX_PUSH_CONCURRENCY}"),
            ));
        }
        match (&section.client_cert, &section.client_key) {
            (Some(_), None) => Err(self.error(
                &field("client_key"),
                Some(id),
                "`client_cert` is set but `client_key` is not",
            )),
            (None, Some(_)) => Err(self.error(
                &field("client_cert"),
                Some(id),
                "`client_key` is set but `client_cert` is not",
            )),
            _ => Ok(()),
        }
    }

    fn validate_ig_officers(
        &self,
        sections: Vec<IgOfficerSection>,
    ) -> Result<Vec<IgOfficer>, ConfigError> {
        let mut officers: Vec<IgOfficer> = Vec::with_capacity(sections.len());
        for (index, section) in sections.into_iter().enumerate() {
            let field = |name: &str| format!("ig_officer[{index}].{name}");
            let username_ok = (1..=64).contains(&section.username.len())
                && section
                    .username
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !username_ok {
                return Err(self.error(
                    &field("username"),
                    Some(&section.username),
                    "must be 1-64 characters of letters, digits, '-', '_' or '.'",
                ));
            }
            if officers.iter().any(|o| o.username == section.username) {
                return Err(self.error(
                    &field("username"),
                    Some(&section.username),
                    "duplicate IG officer username",
                ));
            }
            match argon2::PasswordHash::new(&section.password_hash) {
                Ok(hash) if hash.algorithm.as_str() == "argon2id" && hash.hash.is_some() => {}
                _ => {
                    return Err(self.error(
                        &field("password_hash"),
                        Some(&section.username),
                        "must be an Argon2id PHC string ($argon2id$v=19$...); make one with `caregate ig-password`",
                    ));
                }
            }
            let ods_code = OdsCode::parse(&section.ods_code).map_err(|e| {
                self.error(
                    &field("ods_code"),
                    Some(&section.ods_code),
                    format!("not a valid ODS code: {e}"),
                )
            })?;
            officers.push(IgOfficer {
                username: section.username,
                password_hash: section.password_hash,
                name: section.name,
                ods_code,
            });
        }
        Ok(officers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:0"
data_dir = "data"

[[partner]]
id = "gp-a81001"
name = "Riverside Practice"
ods_code = "A81001"
kind = "gp"
scopes = ["system/*.cru"]
jwks = { keys = [] }
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/caregate/caregate.toml"), text)
    }

    #[test]
    fn export_retention_defaults_to_a_day_and_is_bounded() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.feeds.export_retention(), Duration::from_secs(86_400));
        let with = |value: &str| format!("{MINIMAL}\n[feeds]\nexport_retention_secs = {value}\n");
        let config = parse(&with("2")).unwrap();
        assert_eq!(config.feeds.export_retention_secs, 2);
        for bad in ["0", "2592001"] {
            let err = parse(&with(bad)).unwrap_err();
            let shown = err.to_string();
            assert_eq!(
                err.field.as_deref(),
                Some("feeds.export_retention_secs"),
                "{shown}"
            );
            assert!(
                shown.starts_with("/etc/caregate/caregate.toml:") && err.line.is_some(),
                "{shown}"
            );
            assert!(shown.contains("between 1 and 2592000 seconds"), "{shown}");
        }
        // A negative value is a type error, naming the file and the line.
        let err = parse(&with("-1")).unwrap_err();
        assert!(err.line.is_some(), "{err}");
    }

    #[test]
    fn minimal_config_resolves_paths_against_the_file() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.data_dir, Path::new("/etc/caregate/data"));
        assert_eq!(config.partners[0].ods_code.as_str(), "A81001");
        assert_eq!(config.limits.max_json_depth, 64);
    }

    #[test]
    fn unknown_key_is_an_error_naming_file_and_line() {
        let text = MINIMAL.replace("kind = \"gp\"", "kind = \"gp\"\nscope = [\"x\"]");
        let err = parse(&text).unwrap_err();
        let shown = err.to_string();
        assert!(shown.starts_with("/etc/caregate/caregate.toml:"), "{shown}");
        assert!(shown.contains("unknown field `scope`"), "{shown}");
        assert_eq!(err.line, Some(11), "{shown}");
    }

    #[test]
    fn ods_invalid_partner_code_names_the_field() {
        let err = parse(&MINIMAL.replace("A81001\"", "A8-1001\"")).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("partner[0].ods_code"));
        assert_eq!(err.line, Some(9));
    }

    #[test]
    fn wrong_kind_is_rejected() {
        let err = parse(&MINIMAL.replace("\"gp\"", "\"hospital\"")).unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `hospital`"),
            "{err}"
        );
    }

    #[test]
    fn bad_scope_is_rejected() {
        let err = parse(&MINIMAL.replace("system/*.cru", "patient/*.read")).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("partner[0].scopes"));
    }

    #[test]
    fn telemetry_section_parses_and_a_wrong_key_names_its_line() {
        let text = format!(
            "{MINIMAL}\n[telemetry]\nenabled = true\nendpoint = \"http://collector:4318\"\nservice_name = \"caregate-a\"\nsampling_ratio = 0.5\nlog_format = \"json\"\n"
        );
        let config = parse(&text).unwrap();
        // The OTEL_* variables may be set where tests run; only assert what they cannot change.
        assert_eq!(
            config.telemetry.log_format,
            crate::telemetry::LogFormat::Json
        );
        assert!(parse(MINIMAL).unwrap().telemetry.max_queue_size > 0);
        let wrong = format!("{MINIMAL}\n[telemetry]\nendpiont = \"http://x\"\n");
        let err = parse(&wrong).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `endpiont`"),
            "{err}"
        );
        assert_eq!(err.line, Some(15), "{err}");
        let bad = format!("{MINIMAL}\n[telemetry]\nsampling_ratio = 2.0\n");
        let err = parse(&bad).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("telemetry.sampling_ratio"));
        assert_eq!(err.line, Some(15), "{err}");
    }

    #[test]
    fn store_section_defaults_to_sqlite_and_postgres_is_strict() {
        assert_eq!(parse(MINIMAL).unwrap().store, StoreSettings::Sqlite);
        let text = format!(
            "{MINIMAL}\n[store]\nbackend = \"postgres\"\n[store.postgres]\nurl_file = \"secrets/db-url\"\ninstance_id = \"gw-0\"\nmax_batch = 64\n"
        );
        let StoreSettings::Postgres(pg) = parse(&text).unwrap().store else {
            panic!("expected postgres");
        };
        assert_eq!(
            pg.url,
            DatabaseUrlSource::File(PathBuf::from("/etc/caregate/secrets/db-url"))
        );
        assert_eq!(pg.instance_id, "gw-0");
        assert_eq!(pg.max_batch, 64);
        assert_eq!(pg.instance_lock_wait, Duration::from_secs(15));

        let typo = format!(
            "{MINIMAL}\n[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgres://u:hunter2@db/caregate\"\ninstance = \"gw-0\"\n"
        );
        let err = parse(&typo).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `instance`"),
            "{err}"
        );
        assert_eq!(err.line, Some(18), "{err}");

        let missing = format!(
            "{MINIMAL}\n[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgres://u:hunter2@db/caregate\"\n"
        );
        let err = parse(&missing).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("store.postgres.instance_id"));
        assert!(!err.to_string().contains("hunter2"), "{err}");

        let both = format!(
            "{MINIMAL}\n[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgres://db\"\nurl_file = \"x\"\ninstance_id = \"a\"\n"
        );
        let err = parse(&both).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("store.postgres.url_file"));
        assert_eq!(err.line, Some(18), "{err}");

        let bad_id = format!(
            "{MINIMAL}\n[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgres://db\"\ninstance_id = \"gw 0\"\n"
        );
        let err = parse(&bad_id).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("store.postgres.instance_id"));
        assert_eq!(err.line, Some(18), "{err}");

        let orphan = format!("{MINIMAL}\n[store.postgres]\nurl = \"postgres://db\"\n");
        let err = parse(&orphan).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("store.postgres"));

        let needs = format!("{MINIMAL}\n[store]\nbackend = \"postgres\"\n");
        let err = parse(&needs).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("store.postgres"));
        assert_eq!(err.line, Some(15), "{err}");
        let config = parse(&typo.replace("instance =", "instance_id =")).unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn store_postgres_tls_modes_and_ca_file() {
        use caregate_store::postgres::TlsMode;
        let section = |extra: &str| {
            format!(
                "{MINIMAL}\n[store]\nbackend = \"postgres\"\n[store.postgres]\nurl_file = \"db-url\"\ninstance_id = \"gw-0\"\n{extra}"
            )
        };
        let postgres = |text: &str| match parse(text).unwrap().store {
            StoreSettings::Postgres(pg) => pg,
            StoreSettings::Sqlite => panic!("expected postgres"),
        };
        // Unset: decided by the URL's hosts when it is read.
        let pg = postgres(&section(""));
        assert_eq!((pg.tls, pg.ca_file), (None, None));
        let pg = postgres(&section("tls = \"verify-full\"\nca_file = \"pg/ca.pem\"\n"));
        assert_eq!(pg.tls, Some(TlsMode::VerifyFull));
        assert_eq!(
            pg.ca_file,
            Some(PathBuf::from("/etc/caregate/pg/ca.pem")),
            "relative to the config file"
        );
        assert_eq!(
            postgres(&section("tls = \"require\"\n")).tls,
            Some(TlsMode::Require)
        );
        assert_eq!(
            postgres(&section("tls = \"disable\"\n")).tls,
            Some(TlsMode::Disable)
        );
        // A CA file alone means verify-full (checked when connecting).
        assert_eq!(postgres(&section("ca_file = \"ca.pem\"\n")).tls, None);

        // libpq's other modes are not offered; the error names the line and the choices.
        let err = parse(&section("tls = \"verify-ca\"\n")).unwrap_err();
        assert!(err.to_string().contains("verify-full"), "{err}");
        assert_eq!(err.line, Some(19), "{err}");
        let err = parse(&section("tls = \"verify-full\"\n")).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("store.postgres.ca_file"));
        assert_eq!(err.line, Some(19), "{err}");
        for mode in ["disable", "require"] {
            let err = parse(&section(&format!(
                "tls = \"{mode}\"\nca_file = \"ca.pem\"\n"
            )))
            .unwrap_err();
            assert_eq!(err.field.as_deref(), Some("store.postgres.ca_file"));
            assert_eq!(err.line, Some(20), "{err}");
            assert!(err.to_string().contains(mode), "{err}");
        }
    }

    #[test]
    fn store_postgres_ca_file_errors_name_the_field_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let settings = |ca_file: PathBuf| PostgresSettings {
            url: DatabaseUrlSource::Inline(DatabaseUrl("host=db".to_owned())),
            instance_id: "gw-0".to_owned(),
            max_batch: 1,
            read_connections: 1,
            instance_lock_wait: Duration::from_secs(1),
            tls: Some(caregate_store::postgres::TlsMode::VerifyFull),
            ca_file: Some(ca_file),
        };
        let missing = dir.path().join("missing.pem");
        let err = settings(missing.clone()).tls().unwrap_err();
        assert!(
            err.starts_with("cannot read store.postgres.ca_file")
                && err.contains(&missing.display().to_string()),
            "{err}"
        );
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let err = settings(not_pem.clone()).tls().unwrap_err();
        assert!(
            err.starts_with("store.postgres.ca_file")
                && err.contains(&not_pem.display().to_string())
                && err.contains("no CERTIFICATE"),
            "{err}"
        );
        let ca = caregate_testkit::partner_server::TestCa::new("config test CA");
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        let tls = settings(good).tls().unwrap();
        assert_eq!(
            tls.mode(),
            Some(caregate_store::postgres::TlsMode::VerifyFull)
        );
    }

    #[test]
    fn push_delivery_needs_https_endpoint() {
        let text = format!(
            "{MINIMAL}\n[partner.delivery]\nmode = \"push\"\nendpoint = \"http://gp.example\"\n"
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("partner[0].delivery.endpoint"));
    }

    #[test]
    fn delivery_section_absent_keeps_the_engine_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(
            config.delivery.engine,
            caregate_deliver::DeliveryConfig::default()
        );
        assert_eq!(
            config.delivery.timeout,
            caregate_deliver::DeliveryConfig::default_timeout()
        );
        assert_eq!(
            config.delivery.concurrency,
            caregate_deliver::DeliveryConfig::default_concurrency()
        );
        assert_eq!(config.delivery.client_cert, None);
    }

    #[test]
    fn delivery_section_sets_every_knob() {
        let text = format!(
            "{MINIMAL}\n[delivery]\npoll_interval_ms = 50\nfanout_batch = 32\nfanout_coalesce_ms = 5\nbackoff_base_ms = 200\n\
             backoff_max_secs = 60\nbreaker_failures = 3\nbreaker_open_secs = 5\nmax_age_secs = 86400\n\
             max_attempts = 12\nresponse_keep_bytes = 1024\nlease_margin_secs = 4\ntimeout_secs = 9\n\
             concurrency = 2\nclient_cert = \"tls/client.pem\"\nclient_key = \"tls/client-key.pem\"\n"
        );
        let config = parse(&text).unwrap();
        let engine = &config.delivery.engine;
        assert_eq!(engine.poll_interval, Duration::from_millis(50));
        assert_eq!(engine.fanout_batch, 32);
        assert_eq!(engine.fanout_coalesce, Duration::from_millis(5));
        assert_eq!(engine.backoff.base, Duration::from_millis(200));
        assert_eq!(engine.backoff.cap, Duration::from_secs(60));
        assert_eq!(engine.breaker.failures, 3);
        assert_eq!(engine.breaker.open_for, Duration::from_secs(5));
        assert_eq!(engine.max_age, Duration::from_secs(86_400));
        assert_eq!(engine.max_attempts, Some(12));
        assert_eq!(engine.response_keep_bytes, 1024);
        assert_eq!(engine.lease_margin, Duration::from_secs(4));
        assert_eq!(config.delivery.timeout, Duration::from_secs(9));
        assert_eq!(config.delivery.concurrency, 2);
        assert_eq!(
            config.delivery.client_cert.as_deref(),
            Some(Path::new("/etc/caregate/tls/client.pem"))
        );
    }

    #[test]
    fn delivery_section_errors_name_the_field_and_line() {
        let unknown = parse(&format!("{MINIMAL}\n[delivery]\nbackof_base_ms = 5\n")).unwrap_err();
        assert!(
            unknown
                .to_string()
                .contains("unknown field `backof_base_ms`"),
            "{unknown}"
        );
        assert_eq!(unknown.line, Some(15), "{unknown}");

        // `timeout_secs` also appears in [limits]; the line is the one in [delivery].
        let text = format!(
            "{MINIMAL}\n[limits]\nrequest_timeout_secs = 30\n\n[delivery]\ntimeout_secs = 0\n"
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("delivery.timeout_secs"));
        assert_eq!(err.line, Some(18), "{err}");
        assert!(err.to_string().contains("between 1 and 600"), "{err}");

        let err = parse(&format!(
            "{MINIMAL}\n[delivery]\nbackoff_base_ms = 5000\nbackoff_max_secs = 2\n"
        ))
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("delivery.backoff_max_secs"));
        assert!(err.to_string().contains("backoff_base_ms"), "{err}");

        for (key, value) in [
            ("breaker_failures", "0"),
            ("max_attempts", "0"),
            ("poll_interval_ms", "1"),
            ("max_age_secs", "5"),
            ("concurrency", "0"),
        ] {
            let err = parse(&format!("{MINIMAL}\n[delivery]\n{key} = {value}\n")).unwrap_err();
            assert_eq!(err.field, Some(format!("delivery.{key}")), "{err}");
            assert_eq!(err.line, Some(15), "{err}");
        }

        let err = parse(&format!(
            "{MINIMAL}\n[delivery]\nclient_cert = \"client.pem\"\n"
        ))
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("delivery.client_cert"));
        assert!(err.to_string().contains("`client_key` is not"), "{err}");
    }

    #[test]
    fn partner_delivery_overrides_are_checked_and_paths_resolved() {
        let push = "[partner.delivery]\nmode = \"push\"\nendpoint = \"https://gp.example/fhir\"\n";
        let err = parse(&format!("{MINIMAL}\n{push}concurrency = 0\n")).unwrap_err();
        assert_eq!(
            err.field.as_deref(),
            Some("partner[0].delivery.concurrency")
        );
        let err = parse(&format!("{MINIMAL}\n{push}client_key = \"k.pem\"\n")).unwrap_err();
        assert_eq!(
            err.field.as_deref(),
            Some("partner[0].delivery.client_cert")
        );
        let err = parse(&format!("{MINIMAL}\n{push}timeout_secs = 601\n")).unwrap_err();
        assert_eq!(
            err.field.as_deref(),
            Some("partner[0].delivery.timeout_secs")
        );
        let config = parse(&format!(
            "{MINIMAL}\n{push}client_cert = \"c.pem\"\nclient_key = \"k.pem\"\nconcurrency = 8\n"
        ))
        .unwrap();
        let delivery = &config.partners[0].delivery;
        assert_eq!(
            delivery.client_cert.as_deref(),
            Some(Path::new("/etc/caregate/c.pem"))
        );
        assert_eq!(delivery.concurrency, Some(8));
    }
}
