//! The decide stage: the consent/IG policy (`caregate_policy`) wired into the gateway.
//!
//! - At intake, every validated record gets a [`Decision`] (recipients, withheld with reasons,
//!   feeds, policy version) that is committed with it.
//! - After the commit, what the record says about consent and care relationships (registered
//!   GP, open Encounters, Type 1 codes, FHIR `Consent`) is learned by the consent registry.
//! - At delivery and export time, the decision is made again from the stored record against the
//!   current consent state and policy version (DESIGN.md invariant 2), through the
//!   [`DeliveryPolicy`] and [`FeedPolicy`] adapters.
//! - The bundle is hot-reloaded on SIGHUP (and on demand): a bundle that fails validation is
//!   refused and the old one stays in force.
//!
//! The consent registry lives in memory and is rebuilt at start-up by replaying the committed
//! log, so it holds only what committed records said; the NDOO and Type 1 lists are files under
//! `[policy]`, re-read on reload.

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use caregate_deliver::{DeliveryPolicy, Recheck};
use caregate_feeds::FeedPolicy;
use caregate_fhir::validate::Validated;
use caregate_fhir::{ValidatedResource, Validator};
use caregate_policy::{
    ConsentRegistry, Decision, PartnerId, PartnerKind, PartnerRef, PolicyBundle, RecordFacts,
    decide,
};
use caregate_store::{LogEntry, Store};
use time::OffsetDateTime;

use crate::config::{Config, Partner};

/// Why the policy stage could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum PolicyStageError {
    #[error("policy bundle: {0}")]
    Bundle(String),
    #[error("{path}: {reason}")]
    List { path: String, reason: String },
    #[error(
        "partner `{0}` is configured but not in the policy bundle's ICS model (policies/ics.toml)"
    )]
    UnknownPartner(String),
    #[error("replaying the log to rebuild consent state: {0}")]
    Replay(String),
}

/// The policy bundle and consent registry shared by intake, delivery and export.
#[derive(Debug)]
pub struct PolicyStage {
    dir: PathBuf,
    ndoo_list: Option<PathBuf>,
    type1_list: Option<PathBuf>,
    bundle: RwLock<Arc<PolicyBundle>>,
    consent: RwLock<ConsentRegistry>,
    validator: Arc<Validator>,
    partners: Vec<(String, PartnerRef)>,
}

fn partner_ref(partner: &Partner) -> Option<PartnerRef> {
    Some(PartnerRef {
        id: PartnerId::parse(&partner.id).ok()?,
        ods: partner.ods_code.clone(),
        kind: PartnerKind::ALL
            .into_iter()
            .find(|k| k.as_str() == partner.kind.as_str())?,
    })
}

impl PolicyStage {
    /// Load the bundle and lists named by `[policy]` (None when the section is absent).
    pub fn load(
        config: &Config,
        validator: Arc<Validator>,
    ) -> Result<Option<Self>, PolicyStageError> {
        let Some(section) = &config.policy else {
            return Ok(None);
        };
        let bundle = PolicyBundle::load(&section.dir)
            .map_err(|e| PolicyStageError::Bundle(e.to_string()))?;
        let mut partners = Vec::with_capacity(config.partners.len());
        for partner in &config.partners {
            let reference = partner_ref(partner)
                .filter(|r| bundle.partner(&r.id).is_some())
                .ok_or_else(|| PolicyStageError::UnknownPartner(partner.id.clone()))?;
            partners.push((partner.id.clone(), reference));
        }
        let max_age = time::Duration::days(i64::from(section.ndoo_max_age_days));
        let stage = Self {
            dir: section.dir.clone(),
            ndoo_list: section.ndoo_list.clone(),
            type1_list: section.type1_list.clone(),
            bundle: RwLock::new(Arc::new(bundle)),
            consent: RwLock::new(ConsentRegistry::new(max_age)),
            validator,
            partners,
        };
        stage.load_lists()?;
        tracing::info!(version = %stage.version(), "policy bundle loaded");
        Ok(Some(stage))
    }

    /// Re-read the opt-out lists (the NDOO list's load time is its file's modification time: the
    /// moment the cleaned list came from the national service, `NDOO-5`, `NDOO-6`).
    fn load_lists(&self) -> Result<(), PolicyStageError> {
        let list_error = |path: &PathBuf, reason: String| PolicyStageError::List {
            path: path.display().to_string(),
            reason,
        };
        let mut consent = self.consent.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(path) = &self.ndoo_list {
            let text =
                std::fs::read_to_string(path).map_err(|e| list_error(path, e.to_string()))?;
            let loaded_at = std::fs::metadata(path)
                .and_then(|m| m.modified())
                .map(OffsetDateTime::from)
                .unwrap_or_else(|_| OffsetDateTime::now_utc());
            let load = consent
                .load_ndoo(&text, loaded_at)
                .map_err(|e| list_error(path, e.to_string()))?;
            tracing::info!(entries = load.entries, "NDOO list loaded");
        }
        if let Some(path) = &self.type1_list {
            let text =
                std::fs::read_to_string(path).map_err(|e| list_error(path, e.to_string()))?;
            let load = consent
                .load_type1(&text)
                .map_err(|e| list_error(path, e.to_string()))?;
            tracing::info!(entries = load.entries, "Type 1 opt-out list loaded");
        }
        Ok(())
    }

    /// Reload the bundle and the lists; on any error the previous ones stay in force.
    pub fn reload(&self) -> Result<String, PolicyStageError> {
        let bundle =
            PolicyBundle::load(&self.dir).map_err(|e| PolicyStageError::Bundle(e.to_string()))?;
        for (id, reference) in &self.partners {
            if bundle.partner(&reference.id).is_none() {
                return Err(PolicyStageError::UnknownPartner(id.clone()));
            }
        }
        self.load_lists()?;
        let version = bundle.version().to_owned();
        *self.bundle.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(bundle);
        Ok(version)
    }

    /// The version of the bundle in force.
    pub fn version(&self) -> String {
        self.bundle().version().to_owned()
    }

    fn bundle(&self) -> Arc<PolicyBundle> {
        self.bundle
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn reference(&self, partner_id: &str) -> Option<&PartnerRef> {
        self.partners
            .iter()
            .find(|(id, _)| id == partner_id)
            .map(|(_, r)| r)
    }

    /// The decision for a record `submitter` is submitting now.
    pub fn decide(&self, resource: &ValidatedResource, submitter: &str) -> Option<Decision> {
        let reference = self.reference(submitter)?;
        let facts = RecordFacts::from_resource(resource, reference);
        // What this very record says (a Patient's registered GP, an open Encounter, a Type 1 code)
        // counts for its own decision, so it is learned first (a short write lock, only when there
        // is something to learn); the decision itself runs under a shared lock.
        if facts.registered_gp().is_some()
            || facts.care_episode().is_some()
            || facts.carries_type1_opt_out()
        {
            self.consent
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .observe(&facts);
        }
        let bundle = self.bundle();
        let consent = self.consent.read().unwrap_or_else(PoisonError::into_inner);
        Some(decide(
            &facts,
            &consent.view(facts.nhs_number()),
            &bundle,
            OffsetDateTime::now_utc(),
        ))
    }

    /// Learn from a committed record (call after the commit succeeded).
    pub fn observe_committed(&self, resource: &ValidatedResource, submitter: &str) {
        let Some(reference) = self.reference(submitter) else {
            return;
        };
        let facts = RecordFacts::from_resource(resource, reference);
        let mut consent = self.consent.write().unwrap_or_else(PoisonError::into_inner);
        consent.observe(&facts);
        if resource.resource_type() == caregate_fhir::ResourceType::Consent
            && let Err(error) = consent.record_consent(resource, &reference.id)
        {
            tracing::warn!(%error, "a committed Consent was not applied to the consent registry");
        }
    }

    /// Rebuild the consent registry from the committed log (start-up).
    pub async fn replay(&self, store: &dyn Store) -> Result<u64, PolicyStageError> {
        let mut after = 0;
        let mut seen = 0u64;
        loop {
            let page = store
                .read_log(after, 500)
                .await
                .map_err(|e| PolicyStageError::Replay(e.to_string()))?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for entry in &page {
                if let Some(resource) = self.revalidate(entry) {
                    self.observe_committed(&resource, &entry.partner);
                    seen += 1;
                }
            }
        }
        Ok(seen)
    }

    /// The stored record as a validated resource again (it passed validation at intake).
    fn revalidate(&self, entry: &LogEntry) -> Option<ValidatedResource> {
        let value: serde_json::Value = serde_json::from_slice(&entry.content).ok()?;
        match self.validator.validate_value(value, None) {
            Ok(Validated::Resource(resource)) => Some(resource),
            Ok(Validated::Bundle(caregate_fhir::bundle::ValidatedBundle::Stored {
                resource,
                ..
            })) => Some(resource),
            _ => None,
        }
    }

    /// The decision for a stored record, made now.
    fn decide_again(&self, entry: &LogEntry) -> Option<Decision> {
        let resource = self.revalidate(entry)?;
        self.decide(&resource, &entry.partner)
    }
}

fn stored_decision(entry: &LogEntry) -> Option<Decision> {
    serde_json::from_slice(entry.decision.as_deref()?).ok()
}

/// Delivery re-checks every record against current consent and policy before sending.
impl DeliveryPolicy for PolicyStage {
    fn destinations(&self, entry: &LogEntry) -> Vec<String> {
        stored_decision(entry)
            .map(|d| {
                d.deliver_to
                    .iter()
                    .map(|r| r.partner.as_str().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn recheck(&self, entry: &LogEntry, partner: &str) -> Recheck {
        let Some(now) = self.decide_again(entry) else {
            return Recheck::Withheld {
                rule_id: caregate_policy::RULE_POLICY_ERROR.to_owned(),
                reason: "the record could not be re-evaluated under the current policy".to_owned(),
            };
        };
        if now.deliver_to.iter().any(|d| d.partner.as_str() == partner) {
            return Recheck::Allowed;
        }
        match now.withheld.iter().find(|w| w.partner.as_str() == partner) {
            Some(withheld) => Recheck::Withheld {
                rule_id: withheld.rule_id.clone(),
                reason: withheld.reason.clone(),
            },
            None => Recheck::Withheld {
                rule_id: caregate_policy::RULE_NO_PERMIT.to_owned(),
                reason: "the current policy no longer permits this recipient".to_owned(),
            },
        }
    }
}

/// Feeds re-check opt-outs (e.g. an NDOO list loaded since intake) at export time.
impl FeedPolicy for PolicyStage {
    fn feeds(&self, entry: &LogEntry) -> Vec<String> {
        stored_decision(entry)
            .map(|d| {
                d.feeds
                    .iter()
                    .filter(|f| f.included)
                    .map(|f| f.feed.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn still_included(&self, entry: &LogEntry, feed: &str) -> bool {
        self.decide_again(entry)
            .is_some_and(|d| d.feeds.iter().any(|f| f.feed == feed && f.included))
    }
}

/// Adapter so one `Arc<PolicyStage>` serves as both trait objects.
#[derive(Debug, Clone)]
pub struct SharedPolicy(pub Arc<PolicyStage>);

impl DeliveryPolicy for SharedPolicy {
    fn destinations(&self, entry: &LogEntry) -> Vec<String> {
        self.0.destinations(entry)
    }
    fn recheck(&self, entry: &LogEntry, partner: &str) -> Recheck {
        self.0.recheck(entry, partner)
    }
}

impl FeedPolicy for SharedPolicy {
    fn feeds(&self, entry: &LogEntry) -> Vec<String> {
        FeedPolicy::feeds(&*self.0, entry)
    }
    fn still_included(&self, entry: &LogEntry, feed: &str) -> bool {
        self.0.still_included(entry, feed)
    }
}
