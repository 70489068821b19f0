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
    let log_id = config.audit.log_id.clone();
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
fn spawn_reload_on_sighup(
    stage: Arc<crate::policy_stage::PolicyStage>,
    store: Arc<dyn caregate_store::Store>,
) {
    tokio::spawn(async move {
        let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; policy reload needs a restart");
            return;
        };
        while hangup.recv().await.is_some() {
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

/// Run the gateway until `shutdown` resolves. `on_ready` is called once it is accepting.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(&Started),
) -> Result<(), StartError> {
    let server_tls = tls::server_config(&config.tls)?;
    let validator = validator_for(&config)?;
    let options = SqliteOptions {
        audit_signing: Some(audit_signing(&config)?),
        ..SqliteOptions::default()
    };
    let store =
        Arc::new(
            SqliteStore::open(&config.data_dir, options).map_err(|e| StartError::Store {
                path: config.data_dir.display().to_string(),
                reason: e.to_string(),
            })?,
        );
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
                let learned = stage
                    .replay(&*store)
                    .await
                    .map_err(|e| StartError::Policy(e.to_string()))?;
                tracing::info!(
                    records = learned,
                    "consent state rebuilt from the committed log"
                );
                spawn_reload_on_sighup(Arc::clone(&stage), store.clone());
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
    let (admin_url, shutdown) = {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let admin_url = if config.admin.enabled {
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
            );
            let mut stopped = stopped;
            tokio::spawn(server::serve(
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
            Some(format!("https://localhost:{}", admin_addr.port()))
        } else {
            None
        };
        let shutdown = async move {
            shutdown.await;
            let _ = stop.send(true);
        };
        (admin_url, shutdown)
    };
    // --- Delivery (issue 4): fan-out + push workers, and the partner inbox. ---
    // The policy here reads only the decision stored with each record; the consent/IG engine
    // (crates/policy) replaces it to re-check consent at delivery time (DESIGN.md invariant 2).
    // Delivery stops when the partner listener is told to stop; anything in flight is sent again
    // (same idempotency key) after the next start.
    let (app, shutdown) = {
        let policy: Arc<dyn caregate_deliver::DeliveryPolicy> = match &policy {
            Some(stage) => Arc::new(crate::policy_stage::SharedPolicy(Arc::clone(stage))),
            None => Arc::new(caregate_deliver::StoredDecisionPolicy::new()),
        };
        let store: Arc<dyn caregate_store::Store> = store.clone();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        caregate_deliver::spawn(
            Arc::clone(&store),
            Arc::clone(&policy),
            crate::deliveries_api::destinations(&config),
            caregate_deliver::DeliveryConfig::default(),
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
        )
        .map_err(|e| StartError::Partners(e.to_string()))?;
        let inbox = caregate_deliver::Inbox::new(store, policy);
        let shutdown = async move {
            shutdown.await;
            let _ = stop.send(true);
        };
        (router(state).layer(axum::Extension(inbox)), shutdown)
    };
    // Pseudonymised feeds (issue 5): Bulk Data $export when [feeds] is configured.
    let feed_policy: Option<Arc<dyn caregate_feeds::FeedPolicy>> = policy
        .as_ref()
        .map(|stage| Arc::new(crate::policy_stage::SharedPolicy(Arc::clone(stage))) as _);
    let app =
        crate::bulk_export::attach(app, &config, feed_policy).map_err(StartError::Partners)?;
    let started = Started {
        local_addr,
        base_url,
        dev_certificate_path,
        admin_url,
    };
    on_ready(&started);
    tracing::info!(address = %local_addr, partners = config.partners.len(), "caregate is serving");
    server::serve(
        listener,
        server_tls.config,
        app,
        config.limits.clone(),
        config.shutdown_grace,
        shutdown,
    )
    .await;
    Ok(())
}
