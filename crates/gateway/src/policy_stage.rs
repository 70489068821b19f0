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
//!
//! With several instances on one PostgreSQL database ([`PolicyStage::spawn_log_tail`]), each
//! instance also follows the log from where its start-up replay ended and learns from records
//! committed by the others, so a dissent `Consent` sent to instance A governs decisions on
//! instance B within one tail poll (plus the read). Records this instance already learned from
//! at commit are recognised by content and not applied twice; a version that is no longer the
//! current one when the tail reaches it is skipped, so a lagging tail never brings back an older
//! consent, registered GP or care episode. A delivery-time re-check that would withhold a record
//! its stored decision allowed, on an instance whose tail has not yet reached that record, answers
//! [`Recheck::NotYet`] (asked again shortly) instead of withholding it for good.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use caregate_deliver::{DeliveryPolicy, Recheck};
use caregate_feeds::FeedPolicy;
use caregate_fhir::validate::Validated;
use caregate_fhir::{ValidatedResource, Validator};
use caregate_policy::{
    ConsentRegistry, Decision, PartnerId, PartnerKind, PartnerRef, PolicyBundle, RecordFacts,
    decide,
};
use caregate_store::{LogEntry, Seq, Store};
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
    #[error("the configuration has no [policy] ndoo_list to install the list as")]
    NoNdooList,
    /// The uploaded list is not a valid NDOO list; nothing changed. The message names the line,
    /// never the number on it.
    #[error("the NDOO list was refused: {0}")]
    NdooRefused(String),
    #[error("cannot install the NDOO list as {path}: {reason}")]
    NdooInstall { path: String, reason: String },
}

/// The National Data Opt-out cache as operators see it: how many, since when, how fresh —
/// never the NHS numbers (`NDOO-6`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NdooStatus {
    /// A `[policy] ndoo_list` file is configured (uploads are installed there).
    pub configured: bool,
    /// NHS numbers in the list in force; `None` before any list was loaded.
    pub entries: Option<usize>,
    /// When the list in force was obtained (its file's modification time).
    #[serde(with = "time::serde::rfc3339::option")]
    pub loaded_at: Option<OffsetDateTime>,
    /// `[policy] ndoo_max_age_days`.
    pub max_age_days: i64,
    /// Seconds since `loaded_at`.
    pub age_secs: Option<i64>,
    /// Secondary-use flows fail closed (`NDOO-6`): never loaded, or older than the maximum age.
    pub stale: bool,
    /// `fresh`, `stale` or `never-loaded`.
    pub state: &'static str,
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
    /// Entries of the NDOO list in force (the registry keeps only the set, keyed by NHS number).
    ndoo_entries: std::sync::Mutex<Option<usize>>,
    /// One NDOO installation at a time (they share the staging file).
    ndoo_install: std::sync::Mutex<()>,
    /// The content hash of the version the registry last learned from, per (partner, type, id),
    /// for the resource types whose later versions replace what earlier ones said (see
    /// [`supersedable`]): lets the log tail skip what the commit path already applied.
    /// Each with when it was noted: once the tail has read the whole log from a moment on,
    /// what was noted before that moment can never be met again and is dropped.
    learned: std::sync::Mutex<HashMap<RecordKey, ([u8; 32], std::time::Instant)>>,
    /// `learned` is kept only when a log tail will use it ([`Self::track_for_log_tail`]).
    tracking: std::sync::atomic::AtomicBool,
    /// The last log position the start-up replay read (where the log tail starts).
    replayed_through: AtomicI64,
    /// How far the log tail has learned; `i64::MAX` while no tail runs (one instance: the
    /// commit path alone keeps the registry current).
    tail_through: AtomicI64,
}

/// (partner, resource type, id): one resource's identity in the log.
type RecordKey = (String, String, String);

/// Resource types whose newer version replaces what the older one told the registry (a Consent
/// withdrawn, a registered GP changed, an episode closed). Other records only add facts that
/// never go away (a Type 1 code), so learning from them twice changes nothing.
fn supersedable(resource_type: &str) -> bool {
    matches!(
        resource_type,
        "Consent" | "Patient" | "Encounter" | "EpisodeOfCare"
    )
}

fn content_hash(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref());
    out
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
            ndoo_entries: std::sync::Mutex::new(None),
            ndoo_install: std::sync::Mutex::new(()),
            learned: std::sync::Mutex::new(HashMap::new()),
            tracking: std::sync::atomic::AtomicBool::new(false),
            replayed_through: AtomicI64::new(0),
            tail_through: AtomicI64::new(i64::MAX),
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
            *self
                .ndoo_entries
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(load.entries);
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

    /// Install `text` as the National Data Opt-out list and apply it at once — what
    /// `caregate consent load-ndoo FILE` followed by SIGHUP does: the same parser refuses the whole
    /// list on one bad line (nothing changes then), the file named by `[policy] ndoo_list` is
    /// replaced atomically (written beside it, fsync'd, renamed), and the consent registry takes
    /// the new list with the file's modification time as its load time (`NDOO-6`), as a restart
    /// would. Blocking (file I/O): call it off the async runtime's threads.
    pub fn install_ndoo(&self, text: &str) -> Result<NdooStatus, PolicyStageError> {
        let target = self
            .ndoo_list
            .as_ref()
            .ok_or(PolicyStageError::NoNdooList)?;
        let install_error = |reason: String| PolicyStageError::NdooInstall {
            path: target.display().to_string(),
            reason,
        };
        let max_age = self.ndoo_cache().max_age;
        ConsentRegistry::new(max_age)
            .load_ndoo(text, OffsetDateTime::now_utc())
            .map_err(|e| PolicyStageError::NdooRefused(e.to_string()))?;
        let _one_at_a_time = self
            .ndoo_install
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let staging = target.with_extension("incoming");
        {
            use std::io::Write as _;
            let mut file =
                std::fs::File::create(&staging).map_err(|e| install_error(e.to_string()))?;
            file.write_all(text.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| install_error(e.to_string()))?;
        }
        // Rename and load under the registry's write lock, so a SIGHUP reload reading the file
        // at the same moment cannot leave the registry holding the older list.
        let mut consent = self.consent.write().unwrap_or_else(PoisonError::into_inner);
        std::fs::rename(&staging, target).map_err(|e| install_error(e.to_string()))?;
        if let Some(parent) = target.parent()
            && let Ok(directory) = std::fs::File::open(parent)
        {
            // The rename is durable once the directory is; a failure here is not fatal (the
            // list is in place and applied), so it is only logged.
            if let Err(error) = directory.sync_all() {
                tracing::warn!(%error, "cannot fsync the NDOO list's directory");
            }
        }
        let loaded_at = std::fs::metadata(target)
            .and_then(|m| m.modified())
            .map(OffsetDateTime::from)
            .unwrap_or_else(|_| OffsetDateTime::now_utc());
        let load = consent
            .load_ndoo(text, loaded_at)
            .map_err(|e| PolicyStageError::NdooRefused(e.to_string()))?;
        drop(consent);
        *self
            .ndoo_entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(load.entries);
        tracing::info!(entries = load.entries, "NDOO list installed and applied");
        Ok(self.ndoo_status(OffsetDateTime::now_utc()))
    }

    fn ndoo_cache(&self) -> caregate_policy::NdooCache {
        self.consent
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .ndoo_cache()
    }

    /// The NDOO cache's size and freshness at `now` (no NHS numbers).
    pub fn ndoo_status(&self, now: OffsetDateTime) -> NdooStatus {
        let cache = self.ndoo_cache();
        let entries = *self
            .ndoo_entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let state = match cache.freshness(now) {
            caregate_policy::NdooFreshness::Fresh => "fresh",
            caregate_policy::NdooFreshness::Stale { .. } => "stale",
            caregate_policy::NdooFreshness::NeverLoaded => "never-loaded",
        };
        NdooStatus {
            configured: self.ndoo_list.is_some(),
            entries,
            loaded_at: cache.loaded_at,
            max_age_days: cache.max_age.whole_days(),
            age_secs: cache.loaded_at.map(|at| (now - at).whole_seconds().max(0)),
            stale: state != "fresh",
            state,
        }
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

    /// The decision for a record `submitter` is submitting now. (The decide stage's span: the
    /// resource type and submitting partner only.)
    #[tracing::instrument(
        target = "caregate::stage",
        name = "decide",
        skip_all,
        fields(resource_type = resource.resource_type().as_str(), partner = submitter)
    )]
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
        let resource_type = resource.resource_type().as_str();
        if self.tracking.load(Ordering::Relaxed)
            && supersedable(resource_type)
            && let Some(id) = resource.id()
        {
            let key = (
                submitter.to_owned(),
                resource_type.to_owned(),
                id.to_owned(),
            );
            let hash = content_hash(&resource.canonical_bytes());
            self.learned
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key, (hash, std::time::Instant::now()));
        }
        let mut consent = self.consent.write().unwrap_or_else(PoisonError::into_inner);
        self.observe_locked(&mut consent, resource, submitter);
    }

    /// [`Self::observe_committed`] with the registry already locked.
    fn observe_locked(
        &self,
        consent: &mut ConsentRegistry,
        resource: &ValidatedResource,
        submitter: &str,
    ) {
        let Some(reference) = self.reference(submitter) else {
            return;
        };
        let facts = RecordFacts::from_resource(resource, reference);
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
                    self.remember(entry);
                    self.observe_committed(&resource, &entry.partner);
                    seen += 1;
                }
            }
        }
        self.replayed_through.store(after, Ordering::Release);
        Ok(seen)
    }

    /// Note that the registry learned from `entry` (a supersedable type's current content).
    fn remember(&self, entry: &LogEntry) {
        if self.tracking.load(Ordering::Relaxed) && supersedable(&entry.resource_type) {
            self.learned
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(
                    (
                        entry.partner.clone(),
                        entry.resource_type.clone(),
                        entry.id.clone(),
                    ),
                    (entry.content_hash, std::time::Instant::now()),
                );
        }
    }

    /// Keep what the registry learns by content, for [`Self::spawn_log_tail`]; call before
    /// [`Self::replay`] (with one instance, nothing needs it).
    pub fn track_for_log_tail(&self) {
        self.tracking.store(true, Ordering::Relaxed);
    }

    /// Drop what was noted before `moment`, once the tail has read everything committed by then.
    fn forget_learned_before(&self, moment: std::time::Instant) {
        self.learned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, (_, at)| *at >= moment);
    }

    /// Learn from one page of log entries read by the tail: skip what was already learned (by
    /// content) and versions that are no longer current, then apply the rest under one write
    /// lock, in log order, so decisions never see half a page. Returns how many were applied.
    pub async fn learn_from_log(
        &self,
        store: &dyn Store,
        page: &[LogEntry],
    ) -> Result<u64, caregate_store::StoreError> {
        let mut apply = Vec::with_capacity(page.len());
        for (index, entry) in page.iter().enumerate() {
            if supersedable(&entry.resource_type) {
                let key = (
                    entry.partner.clone(),
                    entry.resource_type.clone(),
                    entry.id.clone(),
                );
                let known = self
                    .learned
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&key)
                    .map(|(hash, _)| *hash);
                if known == Some(entry.content_hash) {
                    continue;
                }
                // A later version in this page, or already in the log, replaces this one.
                let later_in_page = page[index + 1..].iter().any(|other| {
                    other.partner == entry.partner
                        && other.resource_type == entry.resource_type
                        && other.id == entry.id
                });
                if later_in_page {
                    continue;
                }
                let current = store
                    .read_current(&entry.partner, &entry.resource_type, &entry.id)
                    .await?;
                if current.is_some_and(|current| current.seq != entry.seq) {
                    continue;
                }
            }
            if let Some(resource) = self.revalidate(entry) {
                apply.push((entry, resource));
            }
        }
        let mut consent = self.consent.write().unwrap_or_else(PoisonError::into_inner);
        for (entry, resource) in &apply {
            self.remember(entry);
            self.observe_locked(&mut consent, resource, &entry.partner);
        }
        Ok(apply.len() as u64)
    }

    /// Follow the committed log from where the start-up replay ended and learn from every record
    /// (those of other instances sharing the database, in practice), polling every `every`; ends
    /// when `stopping` turns true. The staleness of one instance's consent state about another's
    /// commits is at most `every` plus one read. A failed read is retried at the next poll.
    pub fn spawn_log_tail(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        every: std::time::Duration,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let stage = Arc::clone(self);
        stage.tail_through.store(
            stage.replayed_through.load(Ordering::Acquire),
            Ordering::Release,
        );
        tokio::spawn(async move {
            let mut after: Seq = stage.replayed_through.load(Ordering::Acquire);
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopping.wait_for(|stop| *stop) => break,
                }
                loop {
                    // Everything committed before this read starts is in what it returns (seq
                    // order is commit order), so once it reaches the end of the log, what was
                    // learned before it can never be met again.
                    let started = std::time::Instant::now();
                    let page = match store.read_log(after, 500).await {
                        Ok(page) => page,
                        Err(error) => {
                            tracing::warn!(%error, "consent log tail: the log could not be read; retrying");
                            break;
                        }
                    };
                    let Some(last) = page.last().map(|entry| entry.seq) else {
                        stage.forget_learned_before(started);
                        break;
                    };
                    match stage.learn_from_log(&*store, &page).await {
                        Ok(applied) => {
                            if applied > 0 {
                                tracing::debug!(
                                    applied,
                                    through = last,
                                    "consent log tail learned"
                                );
                            }
                            after = last;
                            stage.tail_through.store(after, Ordering::Release);
                        }
                        Err(error) => {
                            tracing::warn!(%error, "consent log tail: a record could not be checked; retrying");
                            break;
                        }
                    }
                    if page.len() < 500 {
                        stage.forget_learned_before(started);
                        break;
                    }
                }
            }
        })
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

    /// The decision for a stored record under a break-glass request (`LR-2`), made now against
    /// the bundle and consent state in force; `None` if the record cannot be re-evaluated.
    pub fn decide_break_glass(
        &self,
        entry: &LogEntry,
        request: &caregate_policy::BreakGlass,
    ) -> Option<Decision> {
        let resource = self.revalidate(entry)?;
        let reference = self.reference(&entry.partner)?;
        let facts =
            RecordFacts::from_resource(&resource, reference).with_break_glass(request.clone());
        let bundle = self.bundle();
        let consent = self.consent.read().unwrap_or_else(PoisonError::into_inner);
        Some(decide(
            &facts,
            &consent.view(facts.nhs_number()),
            &bundle,
            OffsetDateTime::now_utc(),
        ))
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
        // Allowed at intake but not by what this instance knows now, and it has not yet learned
        // the log as far as this record: another instance may have committed what allowed it
        // (a care episode, a registered GP). Ask again once the log tail has caught up.
        if entry.seq > self.tail_through.load(Ordering::Acquire)
            && self.destinations(entry).iter().any(|p| p == partner)
        {
            return Recheck::NotYet;
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

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test set-up: a failure is a broken test"
    )]

    use std::path::Path;

    use caregate_store::sqlite::{SqliteOptions, SqliteStore};
    use caregate_store::{RecordWrite, Submission, WriteMode};
    use serde_json::{Value, json};

    use super::*;

    fn stage() -> Arc<PolicyStage> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[validation]\nallow_test_nhs_numbers = true\n\n[policy]\ndir = \"{}\"\n",
            root.join("policies").display()
        );
        for (id, ods, kind) in [
            ("gp-a81001", "A81001", "gp"),
            ("gp-b82002", "B82002", "gp"),
            ("trust-rx1", "RX1", "trust"),
        ] {
            text.push_str(&format!(
                "\n[[partner]]\nid = \"{id}\"\nname = \"{id}\"\nods_code = \"{ods}\"\nkind = \"{kind}\"\nscopes = [\"system/*.cruds\"]\njwks = {{ keys = [] }}\n"
            ));
        }
        let config = Config::parse(Path::new("/etc/caregate/caregate.toml"), &text).unwrap();
        let validator = Arc::new(crate::runtime::validator_for(&config).unwrap());
        let stage = PolicyStage::load(&config, validator).unwrap().unwrap();
        stage.track_for_log_tail();
        Arc::new(stage)
    }

    fn patient(gp: &str) -> Value {
        json!({
            "resourceType": "Patient",
            "id": "p1",
            "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9434765919" }],
            "generalPractitioner": [{ "identifier": {
                "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": gp } }]
        })
    }

    fn validated(stage: &PolicyStage, value: &Value) -> ValidatedResource {
        match stage.validator.validate_value(value.clone(), None).unwrap() {
            Validated::Resource(resource) => resource,
            other => panic!("not a single resource: {other:?}"),
        }
    }

    /// Commit `value` as trust-rx1's resource (an update of its id) and return its log entry.
    async fn commit(store: &SqliteStore, stage: &PolicyStage, value: &Value) -> LogEntry {
        let resource = validated(stage, value);
        let content = resource.canonical_bytes();
        let receipt = store
            .submit(Submission {
                partner: "trust-rx1".into(),
                idempotency_key: None,
                records: vec![RecordWrite {
                    resource_type: resource.resource_type().as_str().to_owned(),
                    id: resource.id().unwrap().to_owned(),
                    mode: WriteMode::Update { if_match: None },
                    content_hash: content_hash(&content),
                    content,
                    nhs_number: resource.nhs_number().map(|n| n.as_str().to_owned()),
                    identifiers: Vec::new(),
                    decision: None,
                }],
                audit: Vec::new(),
            })
            .await
            .unwrap();
        let seq = receipt.entries[0].seq;
        store.read_log(seq - 1, 1).await.unwrap().remove(0)
    }

    /// Who a discharge summary about the patient goes to now.
    fn summary_recipients(stage: &PolicyStage) -> Vec<String> {
        let summary = json!({
            "resourceType": "DocumentReference",
            "status": "current",
            "type": { "coding": [{ "system": "http://snomed.info/sct", "code": "373942005" }] },
            "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9434765919" } },
            "date": "2025-05-30T16:00:00Z",
            "content": [{ "attachment": { "contentType": "text/plain", "title": "Discharge summary" } }]
        });
        let decision = stage
            .decide(&validated(stage, &summary), "trust-rx1")
            .unwrap();
        decision
            .deliver_to
            .iter()
            .map(|d| d.partner.as_str().to_owned())
            .filter(|p| p.starts_with("gp-"))
            .collect()
    }

    #[tokio::test]
    async fn the_log_tail_learns_other_instances_commits_and_never_brings_back_an_older_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        let writer = stage();
        let v1 = commit(&store, &writer, &patient("A81001")).await;
        let v2 = commit(&store, &writer, &patient("B82002")).await;

        // An instance that learned nothing at commit learns both, in order, from the log.
        let other = stage();
        assert!(summary_recipients(&other).is_empty());
        let applied = other
            .learn_from_log(&store, &[v1.clone(), v2.clone()])
            .await
            .unwrap();
        assert_eq!(applied, 1, "the superseded version in the page is skipped");
        assert_eq!(summary_recipients(&other), ["gp-b82002"]);

        // The committing instance learned v2 at commit; its tail, lagging, meets v1 afterwards
        // (a page that ends before v2) and must not go back to the old GP.
        let local = stage();
        local.observe_committed(&validated(&local, &patient("B82002")), "trust-rx1");
        assert_eq!(local.learn_from_log(&store, &[v1]).await.unwrap(), 0);
        assert_eq!(summary_recipients(&local), ["gp-b82002"]);
        // … and v2 itself is recognised as already learned.
        assert_eq!(local.learn_from_log(&store, &[v2]).await.unwrap(), 0);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_dissent_committed_through_another_instance_governs_decisions_once_the_tail_reads_it()
    {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        let a = stage();
        let registration = commit(&store, &a, &patient("A81001")).await;
        let b = stage();
        b.learn_from_log(&store, &[registration]).await.unwrap();
        assert_eq!(summary_recipients(&b), ["gp-a81001"]);

        // Through instance A: the patient dissents from sharing with their GP practice.
        let dissent: Value = serde_json::from_str(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../policies/tests/records/consent-dissent-trust-rx1.json"),
            )
            .unwrap()
            .replace("\"RX1\"", "\"A81001\""),
        )
        .unwrap();
        let dissent = commit(&store, &a, &dissent).await;
        assert_eq!(
            summary_recipients(&b),
            ["gp-a81001"],
            "B has not read it yet"
        );
        assert_eq!(
            b.learn_from_log(&store, std::slice::from_ref(&dissent))
                .await
                .unwrap(),
            1
        );
        assert!(summary_recipients(&b).is_empty(), "B honours A's dissent");
        // Read again (a restarted tail, a replayed page): nothing changes, nothing is duplicated.
        assert_eq!(b.learn_from_log(&store, &[dissent]).await.unwrap(), 0);
        assert!(summary_recipients(&b).is_empty());
        store.close().await.unwrap();
    }
}
