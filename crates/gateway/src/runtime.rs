//! Start-up and shutdown: build every stage from a validated [`Config`], bind, serve until told
//! to stop, drain. Start-up fails fast with a message naming what is wrong; nothing is served
//! until every piece is ready.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use caregate_audit::checkpoint::{CheckpointSchedule, CheckpointSigner};
use caregate_auth::{AuthConfig, Authority, ClientRegistration, SigningKey};
use caregate_fhir::Validator;
use caregate_fhir::json::JsonLimits;
use caregate_fhir::rules::RulesConfig;
use caregate_fhir::validate::ValidatorConfig;
use caregate_store::postgres::PostgresStore;
use caregate_store::sqlite::{AuditSigning, SqliteOptions, SqliteStore};
use tokio::net::TcpListener;

use crate::app::{AppState, router};
use crate::config::Config;
use crate::{server, tls};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot open the data directory {path}: {reason}")]
    Store { path: String, reason: String },
    #[error("built-in schemas failed to compile: {0}")]
    Schema(String),
    #[error("partner registry: {0}")]
    Partners(String),
    #[error("token signing key {path}: {reason}")]
    SigningKey { path: String, reason: String },
    #[error("{0}")]
    Policy(String),
    #[error("audit signing key {path}: {reason}")]
    AuditKey { path: String, reason: String },
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error(transparent)]
    DataDir(#[from] LockError),
    #[error("delivery: {0}")]
    Delivery(String),
}

/// The lock file in the data directory: a running gateway holds an exclusive advisory lock on it
/// (`flock`), and commands that write to the store offline take it too.
pub const DATA_DIR_LOCK_FILE: &str = "caregate.lock";

/// Why a data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process — a running gateway, or an offline command — holds the lock.
    #[error(
        "the data directory {path} is in use by another caregate process{holder} (it holds {lock_file})"
    )]
    InUse {
        path: String,
        /// ` (pid N)` when the holder wrote its process id, else empty.
        holder: String,
        lock_file: String,
    },
    #[error("cannot lock the data directory {path}: {reason}")]
    Io { path: String, reason: String },
}

/// An exclusive lock on a data directory, held for as long as this value lives. The operating
/// system releases it when the process ends however it ends (SIGKILL included), so unlike a pid
/// file it can never be left stale; the pid written into the file only names the holder.
///
/// Why: one SQLite data directory has one store writer, which keeps the audit Merkle tree's
/// frontier in memory. A second writer — `caregate deliveries replay` run beside a live gateway —
/// would append to the chain from a stale view of the tree.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

/// Take the data directory's lock (creating the directory and the lock file if needed), or say
/// who holds it.
pub fn lock_data_dir(dir: &std::path::Path) -> Result<DataDirLock, LockError> {
    use std::io::{Read as _, Seek as _, Write as _};
    let io_error = |e: std::io::Error| LockError::Io {
        path: dir.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(io_error)?;
    let path = dir.join(DATA_DIR_LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_error)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = text
                .trim()
                .parse::<u32>()
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            return Err(LockError::InUse {
                path: dir.display().to_string(),
                holder,
                lock_file: path.display().to_string(),
            });
        }
        Err(std::fs::TryLockError::Error(error)) => return Err(io_error(error)),
    }
    // Informational only: the lock, not the text, is what excludes.
    let _ = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    Ok(DataDirLock { _file: file })
}

/// What a started gateway tells its caller.
#[derive(Debug, Clone)]
pub struct Started {
    pub local_addr: SocketAddr,
    pub base_url: String,
    /// Where the dev-mode certificate was written (trust it in clients), if in dev mode.
    pub dev_certificate_path: Option<std::path::PathBuf>,
    /// The IG officers' admin listener (`https://localhost:<port>`), when `[admin]` is enabled.
    pub admin_url: Option<String>,
}

/// Build the validator a config implies (also used by `caregate validate`).
pub fn validator_for(config: &Config) -> Result<Validator, StartError> {
    Validator::new(ValidatorConfig {
        json: JsonLimits {
            max_depth: config.limits.max_json_depth,
        },
        rules: RulesConfig {
            nhs_number: config.nhs_number_policy(),
            allowed_reference_bases: config.validation.allowed_reference_bases.clone(),
        },
        max_bundle_entries: config.limits.max_bundle_entries,
        ..ValidatorConfig::default()
    })
    .map_err(|e| StartError::Schema(e.to_string()))
}

/// File names in the data directory for the dev-mode audit key.
pub const DEV_AUDIT_KEY_FILE: &str = "audit-signing-key.pem";
/// The audit log's public key (base64) and log id, written at start so `caregate audit verify`
/// can check checkpoints offline.
pub const AUDIT_PUBLIC_KEY_FILE: &str = "audit-public-key.txt";

/// The log id this gateway signs its audit checkpoints under: `audit.log_id`, and with the
/// PostgreSQL store `audit.log_id/<instance_id>`, since every instance keeps its own chain and a
/// witness's checkpoint must say which one it pins.
pub fn audit_log_id(config: &Config) -> String {
    match &config.store {
        crate::config::StoreSettings::Sqlite => config.audit.log_id.clone(),
        crate::config::StoreSettings::Postgres(pg) => {
            instance_log_id(&config.audit.log_id, &pg.instance_id)
        }
    }
}

/// The log id of instance `instance_id`'s audit chain in a cluster whose base id is `base`.
pub fn instance_log_id(base: &str, instance_id: &str) -> String {
    format!("{}/{instance_id}", base.trim_end_matches('/'))
}

/// How often an instance on the shared PostgreSQL log looks for records committed by the other
/// instances to learn consent from (the staleness bound of `PolicyStage::spawn_log_tail`).
pub const CONSENT_TAIL_INTERVAL: Duration = Duration::from_millis(250);

/// The store the gateway runs on: concrete, for what the `Store` trait does not cover (metrics,
/// readiness, closing).
#[derive(Debug, Clone)]
enum OpenedStore {
    Sqlite(Arc<SqliteStore>),
    Postgres(Arc<PostgresStore>),
}

impl OpenedStore {
    /// Open the configured store: SQLite in the data directory, or connect to PostgreSQL (which
    /// applies pending migrations and takes this instance's id).
    async fn open(config: &Config, signing: AuditSigning) -> Result<Self, StartError> {
        match &config.store {
            crate::config::StoreSettings::Sqlite => {
                let options = SqliteOptions {
                    audit_signing: Some(signing),
                    ..SqliteOptions::default()
                };
                let store = SqliteStore::open(&config.data_dir, options).map_err(|e| {
                    StartError::Store {
                        path: config.data_dir.display().to_string(),
                        reason: e.to_string(),
                    }
                })?;
                Ok(Self::Sqlite(Arc::new(store)))
            }
            crate::config::StoreSettings::Postgres(pg) => {
                let store_error = |reason: String| StartError::Store {
                    path: format!("(PostgreSQL, instance {})", pg.instance_id),
                    reason,
                };
                let url = pg.url().map_err(store_error)?;
                let mut options = pg.options();
                options.tls = pg.tls().map_err(store_error)?;
                options.audit_signing = Some(signing);
                // The URL is never logged: it may carry a password.
                let store = PostgresStore::connect(url.expose(), options)
                    .await
                    .map_err(|e| store_error(e.to_string()))?;
                Ok(Self::Postgres(Arc::new(store)))
            }
        }
    }

    fn shared(&self) -> Arc<dyn caregate_store::Store> {
        match self {
            Self::Sqlite(store) => store.clone(),
            Self::Postgres(store) => store.clone(),
        }
    }

    /// Close once nothing else holds the store (see the end of [`run`]).
    async fn close(self) {
        let closed = match self {
            Self::Sqlite(store) => match Arc::try_unwrap(store) {
                Ok(store) => Some(store.close().await),
                Err(_) => None,
            },
            Self::Postgres(store) => match Arc::try_unwrap(store) {
                Ok(store) => Some(store.close().await),
                Err(_) => None,
            },
        };
        match closed {
            Some(Ok(())) => {}
            Some(Err(error)) => tracing::error!(%error, "the store did not close cleanly"),
            None => tracing::info!(
                "the store is still in use by connections past the grace; it closes with the process"
            ),
        }
    }
}

/// The checkpoint signer: the configured key, or in dev mode one generated once and kept in the
/// data directory. Writes the public key beside the database for offline verification.
fn audit_signing(config: &Config) -> Result<AuditSigning, StartError> {
    let key_error = |path: &std::path::Path, reason: String| StartError::AuditKey {
        path: path.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(|e| StartError::Store {
        path: config.data_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let log_id = audit_log_id(config);
    let signer = match &config.audit.signing_key {
        Some(path) => {
            let pem = std::fs::read_to_string(path).map_err(|e| key_error(path, e.to_string()))?;
            CheckpointSigner::from_pkcs8_pem(log_id, &pem)
                .map_err(|e| key_error(path, e.to_string()))?
        }
        None => {
            let path = config.data_dir.join(DEV_AUDIT_KEY_FILE);
            if path.exists() {
                let pem =
                    std::fs::read_to_string(&path).map_err(|e| key_error(&path, e.to_string()))?;
                CheckpointSigner::from_pkcs8_pem(log_id, &pem)
                    .map_err(|e| key_error(&path, e.to_string()))?
            } else {
                let signer = CheckpointSigner::generate(log_id)
                    .map_err(|e| key_error(&path, e.to_string()))?;
                let pem = signer
                    .to_pkcs8_pem()
                    .map_err(|e| key_error(&path, e.to_string()))?;
                write_private(&path, &pem).map_err(|e| key_error(&path, e.to_string()))?;
                signer
            }
        }
    };
    if config.audit.signing_key.is_none() {
        tracing::warn!(
            "DEV MODE: the audit checkpoint key is kept in the data directory; configure audit.signing_key for production"
        );
    }
    let public = config.data_dir.join(AUDIT_PUBLIC_KEY_FILE);
    std::fs::write(
        &public,
        format!("{} {}\n", signer.log_id(), signer.public_key_base64()),
    )
    .map_err(|e| key_error(&public, e.to_string()))?;
    let every_events = std::num::NonZeroU64::new(config.audit.checkpoint_every_events)
        .unwrap_or(std::num::NonZeroU64::MIN);
    let every = time::Duration::seconds(
        i64::try_from(config.audit.checkpoint_every_secs).unwrap_or(i64::MAX),
    );
    Ok(AuditSigning {
        signer: Arc::new(signer),
        schedule: CheckpointSchedule {
            every_events,
            every,
        },
    })
}

fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

/// Reload the policy bundle and opt-out lists on SIGHUP; a bundle that fails validation is
/// refused with a clear log line and the previous one stays in force.
/// It ends when `stopping` turns true (so it lets go of the store at shutdown).
fn spawn_reload_on_sighup(
    stage: Arc<crate::policy_stage::PolicyStage>,
    store: Arc<dyn caregate_store::Store>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; policy reload needs a restart");
            return;
        };
        loop {
            tokio::select! {
                signal = hangup.recv() => if signal.is_none() { break },
                _ = stopping.wait_for(|stop| *stop) => break,
            }
            let (outcome, version, detail) = match stage.reload() {
                Ok(version) => {
                    tracing::info!(%version, "policy reloaded");
                    (
                        caregate_audit::Outcome::Success,
                        version,
                        "policy bundle reloaded".to_owned(),
                    )
                }
                Err(error) => {
                    tracing::error!(%error, "policy reload refused; the previous bundle stays in force");
                    (
                        caregate_audit::Outcome::Failed,
                        stage.version(),
                        format!("reload refused: {error}"),
                    )
                }
            };
            // Every policy reload is an audited administrative action (issue 6).
            let mut event = caregate_audit::AuditEvent::new(
                uuid::Uuid::new_v4().to_string(),
                caregate_audit::Actor {
                    client_id: Some("operator/SIGHUP".to_owned()),
                    ..Default::default()
                },
                caregate_audit::Action::PolicyReload,
                outcome,
            );
            event.policy_version = Some(version);
            event.detail = Some(detail.chars().take(500).collect());
            let submission = caregate_store::Submission {
                partner: String::new(),
                idempotency_key: None,
                records: Vec::new(),
                audit: vec![event],
            };
            if let Err(error) = store.submit(submission).await {
                tracing::error!(%error, "the policy reload could not be audited");
            }
        }
    });
}

/// What `/readyz` checks (crate::telemetry::Readiness). The store is held weakly so that it can
/// still be closed at shutdown.
fn readiness(
    store: &OpenedStore,
    policy: Option<Arc<crate::policy_stage::PolicyStage>>,
    stopping: &tokio::sync::watch::Receiver<bool>,
) -> Arc<crate::telemetry::Readiness> {
    fn failure(failed: Option<bool>) -> Option<String> {
        match failed {
            Some(true) => Some("failed".to_owned()),
            Some(false) => None,
            None => Some("closed".to_owned()),
        }
    }
    let store_failure: Box<dyn Fn() -> Option<String> + Send + Sync> = match store {
        OpenedStore::Sqlite(store) => {
            let store = Arc::downgrade(store);
            Box::new(move || failure(store.upgrade().map(|s| s.has_failed())))
        }
        OpenedStore::Postgres(store) => {
            let store = Arc::downgrade(store);
            Box::new(move || failure(store.upgrade().map(|s| s.has_failed())))
        }
    };
    Arc::new(crate::telemetry::Readiness {
        store_failure,
        policy,
        stopping: stopping.clone(),
    })
}

/// Run the gateway until `shutdown` resolves. `on_ready` is called once it is accepting.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(&Started),
) -> Result<(), StartError> {
    let server_tls = tls::server_config(&config.tls)?;
    let validator = validator_for(&config)?;
    // One gateway per data directory, and no offline writer beside it (see `DataDirLock`);
    // held until `run` returns.
    let _data_dir_lock = lock_data_dir(&config.data_dir)?;
    // Everything that must stop at shutdown watches this; it turns true when `shutdown` resolves.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    let opened = OpenedStore::open(&config, audit_signing(&config)?).await?;
    let store = opened.shared();
    // Metrics (crate::metrics): the store's counters and delivery queues, sampled.
    match &opened {
        OpenedStore::Sqlite(sqlite) => crate::metrics::spawn_sampler(
            Arc::downgrade(sqlite),
            config.telemetry.sample_interval,
            stopping.clone(),
        ),
        OpenedStore::Postgres(postgres) => crate::metrics::spawn_sampler(
            Arc::downgrade(postgres),
            config.telemetry.sample_interval,
            stopping.clone(),
        ),
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| StartError::Bind {
            addr: config.listen,
            reason: e.to_string(),
        })?;
    let local_addr = listener.local_addr().map_err(|e| StartError::Bind {
        addr: config.listen,
        reason: e.to_string(),
    })?;
    let base_url = config.public_url_for(local_addr);

    let signing_key = match &config.auth.signing_key {
        Some(path) => {
            let pem = std::fs::read_to_string(path).map_err(|e| StartError::SigningKey {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            SigningKey::from_pkcs8_pem(&pem).map_err(|e| StartError::SigningKey {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?
        }
        None => SigningKey::generate().map_err(|e| StartError::SigningKey {
            path: "(generated)".into(),
            reason: e.to_string(),
        })?,
    };
    let mut clients = Vec::with_capacity(config.partners.len());
    for partner in &config.partners {
        let jwks = serde_json::from_value(partner.jwks.clone()).map_err(|e| {
            StartError::Partners(format!("partner {}: JWKS is not valid: {e}", partner.id))
        })?;
        clients.push(ClientRegistration {
            client_id: partner.id.clone(),
            jwks,
            allowed_scopes: partner.scopes.clone(),
            cert_thumbprint: partner.client_cert_sha256.clone(),
        });
    }
    let mut auth_config = AuthConfig::new(format!("{base_url}/auth/token"), base_url.clone());
    auth_config.access_token_ttl = Duration::from_secs(config.auth.access_token_ttl_secs);
    auth_config.leeway = Duration::from_secs(config.auth.clock_leeway_secs);
    let authority = Authority::new(auth_config, clients, signing_key)
        .map_err(|e| StartError::Partners(e.to_string()))?;

    let dev_certificate_path = match &server_tls.dev_certificate_pem {
        Some(pem) => {
            let path = config.data_dir.join("dev-certificate.pem");
            std::fs::write(&path, pem).map_err(|e| StartError::Store {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            tracing::warn!(
                certificate = %path.display(),
                "DEV MODE: no TLS certificate configured; serving a generated self-signed certificate. Do not use in production."
            );
            Some(path)
        }
        None => None,
    };

    let partners: HashMap<_, _> = config
        .partners
        .iter()
        .map(|p| (p.id.clone(), Arc::new(p.clone())))
        .collect();
    // The decide stage (issue 3): bundle, opt-out lists, and the consent registry rebuilt from
    // the committed log; hot-reloaded on SIGHUP.
    let policy =
        match crate::policy_stage::PolicyStage::load(&config, Arc::new(validator_for(&config)?))
            .map_err(|e| StartError::Policy(e.to_string()))?
        {
            Some(stage) => {
                let stage = Arc::new(stage);
                if matches!(opened, OpenedStore::Postgres(_)) {
                    stage.track_for_log_tail();
                }
                let learned = stage
                    .replay(&*store)
                    .await
                    .map_err(|e| StartError::Policy(e.to_string()))?;
                tracing::info!(
                    records = learned,
                    "consent state rebuilt from the committed log"
                );
                spawn_reload_on_sighup(Arc::clone(&stage), store.clone(), stopping.clone());
                // Several instances share the PostgreSQL log: learn from the others' commits too.
                if matches!(opened, OpenedStore::Postgres(_)) {
                    stage.spawn_log_tail(store.clone(), CONSENT_TAIL_INTERVAL, stopping.clone());
                }
                Some(stage)
            }
            None => {
                tracing::warn!(
                    "no [policy] configured: records are stored but delivered to no one"
                );
                None
            }
        };
    let state = Arc::new(AppState {
        policy: policy.clone(),
        validator,
        store: store.clone(),
        authority,
        partners,
        base_url: base_url.clone(),
        limits: config.limits.clone(),
    });
    // The IG officers' listener (crate::admin): its own address, the same TLS, served beside the
    // partner listener; it starts draining when the partner listener is told to stop.
    let (admin_url, admin_task) = if config.admin.enabled {
        let admin_listener =
            TcpListener::bind(config.admin.listen)
                .await
                .map_err(|e| StartError::Bind {
                    addr: config.admin.listen,
                    reason: e.to_string(),
                })?;
        let admin_addr = admin_listener.local_addr().map_err(|e| StartError::Bind {
            addr: config.admin.listen,
            reason: e.to_string(),
        })?;
        let admin_app = crate::admin::admin_router(
            state.clone(),
            crate::admin::AdminSettings::from_config(&config),
        )
        .layer(axum::Extension(readiness(
            &opened,
            policy.clone(),
            &stopping,
        )));
        let mut stopped = stopping.clone();
        let task = tokio::spawn(server::serve(
            admin_listener,
            server_tls.config.clone(),
            admin_app,
            config.limits.clone(),
            config.shutdown_grace,
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
        ));
        tracing::info!(address = %admin_addr, officers = config.ig_officers.len(), "admin listener is serving");
        (
            Some(format!("https://localhost:{}", admin_addr.port())),
            Some(task),
        )
    } else {
        (None, None)
    };
    // --- Delivery (issue 4): fan-out + push workers, and the partner inbox. ---
    // The policy re-checks consent and policy at delivery time (DESIGN.md invariant 2) when
    // `[policy]` is configured; without it, only the decision stored with each record counts.
    // At shutdown the workers stop claiming, and the attempts in flight finish and are recorded
    // (bounded by the shutdown grace) before the store is closed.
    let (app, delivery) = {
        let policy: Arc<dyn caregate_deliver::DeliveryPolicy> = match &policy {
            Some(stage) => Arc::new(crate::policy_stage::SharedPolicy(Arc::clone(stage))),
            None => Arc::new(caregate_deliver::StoredDecisionPolicy::new()),
        };
        let store = store.clone();
        let mut stopped = stopping.clone();
        let delivery = caregate_deliver::spawn(
            Arc::clone(&store),
            Arc::clone(&policy),
            crate::deliveries_api::destinations(&config),
            config.delivery.engine.clone(),
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
        )
        .map_err(|e| StartError::Delivery(e.to_string()))?;
        let inbox = caregate_deliver::Inbox::new(store, policy);
        (router(state).layer(axum::Extension(inbox)), delivery)
    };
    // Pseudonymised feeds (issue 5): Bulk Data $export when [feeds] is configured.
    let feed_policy: Option<Arc<dyn caregate_feeds::FeedPolicy>> = policy
        .as_ref()
        .map(|stage| Arc::new(crate::policy_stage::SharedPolicy(Arc::clone(stage))) as _);
    // Export jobs are kept in the store under this instance's id (cluster mode: its PostgreSQL
    // instance id; one SQLite file has one instance).
    let instance_id = match &config.store {
        crate::config::StoreSettings::Postgres(pg) => pg.instance_id.clone(),
        crate::config::StoreSettings::Sqlite => "local".to_owned(),
    };
    let (app, export_sweeper) = crate::bulk_export::attach(
        app,
        &config,
        feed_policy,
        &store,
        &instance_id,
        stopping.clone(),
    )
    .await
    .map_err(StartError::Partners)?;
    let started = Started {
        local_addr,
        base_url,
        dev_certificate_path,
        admin_url,
    };
    on_ready(&started);
    tracing::info!(address = %local_addr, partners = config.partners.len(), "caregate is serving");
    // Shutdown: the partner listener drains its requests while delivery drains its attempts in
    // flight, both from the same moment and within the same grace.
    let grace = config.shutdown_grace;
    let mut draining = stopping.clone();
    let delivery_drain = async move {
        let _ = draining.wait_for(|stop| *stop).await;
        delivery.shutdown_within(grace).await
    };
    let ((), _) = tokio::join!(
        server::serve(
            listener,
            server_tls.config,
            app,
            config.limits.clone(),
            grace,
            shutdown,
        ),
        delivery_drain
    );
    if let Some(task) = admin_task {
        // The admin listener drains within the same grace; it has had it by now.
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    if let Some(task) = export_sweeper {
        // The export retention sweep stops at its next job once told to stop.
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    // Close the store (the writer finishes its queue, the WAL is checkpointed) once nothing else
    // holds it; a connection still running past the grace keeps it open until the process ends,
    // which loses nothing (every acknowledged write is already durable).
    drop(store);
    opened.close().await;
    Ok(())
}
