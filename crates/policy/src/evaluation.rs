//! How [`crate::decide`] asks Cedar, and how it avoids asking the same question twice.
//!
//! A decision has three steps (see `decision.rs`): Rust reduces the record and the patient's
//! consent state to the facts Cedar reads; Cedar answers "may this partner receive this record
//! under this agreement for this purpose?" for each partner and candidate agreement; Rust turns
//! the answers into a [`crate::Decision`]. This module owns the middle step, and three things
//! make it cheap without changing any answer:
//!
//! 1. **[`Situation`]: every fact Cedar sees, and nothing else.** The Cedar context is built
//!    *from* the situation only, and the enumeration of partners and candidate agreements reads
//!    only the situation and the bundle. So Cedar's answers for a record are a pure function of
//!    (bundle, situation), which is what makes step 3 sound.
//! 2. **Scope slices.** A Cedar policy whose scope (`principal in PartnerKind::"pharmacy"`,
//!    `action == Action::"secondary-use"`, …) does not match a (partner, purpose, agreement)
//!    triple is unsatisfied and raises no error for that triple: Cedar evaluates the scope first
//!    and `&&` short-circuits. Scopes read only the entity hierarchy, which is static for a
//!    bundle, so at load each triple gets the [`PolicySet`] of the policies whose scope matches
//!    it — about half of the bundle — and Cedar evaluates only those. Further, a forbid with
//!    an unconstrained principal whose conditions never read `principal` (the agreement's
//!    status, dates, resource types; the opt-outs) holds for every partner or for none, so per
//!    record these *shared forbids* are asked once per (purpose, agreement), and each triple's
//!    slice holds only its other policies; the two answers combine into exactly the slice's
//!    answer. A candidate agreement after the most relevant one is skipped when a shared forbid
//!    holds (it could not allow, and only the most relevant one's forbids are reported).
//! 3. **[`AnswerMemo`].** Many records share a situation (same submitter, record type, registered
//!    GP, no personal consent choices, same day), so the bundle keeps the answers of recent
//!    situations (bounded; a full memo is emptied). A memo entry holds only the Cedar answers;
//!    everything else in a decision (time, break-glass reason, NDOO cache age) is added per call.
//!
//! The crate's tests compare this path with a frozen copy of the straightforward evaluation (one
//! full `is_authorized` per partner × agreement, no memo) over random records and consent states.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use cedar_policy::{
    ActionConstraint, Context, Decision as CedarDecision, Effect, Entities, EntityUid, Policy,
    PolicyId, PolicySet, PrincipalConstraint, Request, ResourceConstraint, RestrictedExpression,
};
use time::{Date, OffsetDateTime};

use crate::bundle::{Agreement, AgreementStatus, Partner, PolicyBundle, Purpose, date_number};
use crate::consent::{ConsentFor, ConsentView};
use crate::decision::{RULE_NO_PERMIT, RULE_NO_RELATIONSHIP, RULE_POLICY_ERROR};
use crate::error::PolicyError;
use crate::facts::RecordFacts;

/// How many situations the memo keeps before it is emptied. A few thousand entries of a few KB
/// each: bounded memory, and enough for the distinct situations of a day's typical traffic.
const MEMO_CAPACITY: usize = 4096;

/// Every fact the Cedar context holds for one record, in canonical form (sorted sets, partners
/// by index in [`PolicyBundle::partners`]). Holds no patient identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Situation {
    pub(crate) today: Date,
    /// The submitter, if it is a partner of the bundle (else no context can be built).
    pub(crate) submitter: Option<usize>,
    /// Sorted, unique (the record's type and every Bundle entry's type).
    pub(crate) resource_types: Vec<String>,
    /// Sorted, unique.
    pub(crate) sensitive_categories: Vec<String>,
    pub(crate) medication_related: bool,
    pub(crate) gp_sourced: bool,
    pub(crate) has_nhs_number: bool,
    /// `""` when unknown, as Cedar sees it.
    pub(crate) registered_gp_ods: String,
    /// Partner indices, sorted and unique (Cedar sets are sets).
    pub(crate) care_team: Vec<usize>,
    pub(crate) dissent_from: Vec<usize>,
    pub(crate) consent_to: Vec<usize>,
    pub(crate) ndoo_opted_out: bool,
    pub(crate) type1_opted_out: bool,
    pub(crate) ndoo_cache_fresh: bool,
    pub(crate) break_glass_requester: Option<usize>,
}

impl Situation {
    pub(crate) fn new(
        record: &RecordFacts,
        consent: &ConsentView<'_>,
        bundle: &PolicyBundle,
        sensitive: &BTreeSet<String>,
        now: OffsetDateTime,
    ) -> Self {
        let index = |id| bundle.partner_index.get(id).copied();
        // The registered GP: this record's Patient.generalPractitioner, else what the registry
        // knows.
        let registered_gp = record.registered_gp().or(consent.registered_gp());
        let mut care_team: Vec<usize> = consent.care_team().filter_map(index).collect();
        care_team.sort_unstable();
        care_team.dedup();
        let mut dissent_from = Vec::new();
        let mut consent_to = Vec::new();
        for (position, partner) in bundle.partners().iter().enumerate() {
            match consent.consent_for(&partner.reference(), now) {
                ConsentFor::None => {}
                ConsentFor::Permit => consent_to.push(position),
                ConsentFor::Deny => dissent_from.push(position),
            }
        }
        Self {
            today: now.date(),
            submitter: index(&record.submitter().id),
            resource_types: record.resource_types().map(str::to_owned).collect(),
            sensitive_categories: sensitive.iter().cloned().collect(),
            medication_related: record.medication_related(),
            gp_sourced: record.gp_sourced(),
            has_nhs_number: record.nhs_number().is_some(),
            registered_gp_ods: registered_gp.map_or(String::new(), |ods| ods.as_str().to_owned()),
            care_team,
            dissent_from,
            consent_to,
            ndoo_opted_out: consent.ndoo_opted_out(),
            type1_opted_out: consent.type1_opted_out() || record.carries_type1_opt_out(),
            ndoo_cache_fresh: consent.ndoo_cache().freshness(now)
                == crate::consent::NdooFreshness::Fresh,
            break_glass_requester: record
                .break_glass()
                .and_then(|request| index(&request.requester)),
        }
    }

    /// The Cedar context (`Situation` in `caregate.cedarschema`), built from these facts only.
    fn context(&self, bundle: &PolicyBundle) -> Option<Context> {
        let strings = |values: &[String]| {
            RestrictedExpression::new_set(
                values
                    .iter()
                    .map(|value| RestrictedExpression::new_string(value.clone())),
            )
        };
        let partner_set = |indices: &[usize]| {
            RestrictedExpression::new_set(
                indices
                    .iter()
                    .filter_map(|&index| bundle.partners.get(index))
                    .map(|partner| RestrictedExpression::new_entity_uid(partner.uid.clone())),
            )
        };
        let submitter = bundle.partners.get(self.submitter?)?.uid.clone();
        let break_glass: Vec<usize> = self.break_glass_requester.into_iter().collect();
        let record = RestrictedExpression::new_record([
            ("resource_types".to_owned(), strings(&self.resource_types)),
            (
                "sensitive_categories".to_owned(),
                strings(&self.sensitive_categories),
            ),
            (
                "medication_related".to_owned(),
                RestrictedExpression::new_bool(self.medication_related),
            ),
            (
                "gp_sourced".to_owned(),
                RestrictedExpression::new_bool(self.gp_sourced),
            ),
            (
                "has_nhs_number".to_owned(),
                RestrictedExpression::new_bool(self.has_nhs_number),
            ),
        ])
        .ok()?;
        let patient = RestrictedExpression::new_record([
            (
                "registered_gp_ods".to_owned(),
                RestrictedExpression::new_string(self.registered_gp_ods.clone()),
            ),
            ("care_team".to_owned(), partner_set(&self.care_team)),
            ("dissent_from".to_owned(), partner_set(&self.dissent_from)),
            ("consent_to".to_owned(), partner_set(&self.consent_to)),
            (
                "ndoo_opted_out".to_owned(),
                RestrictedExpression::new_bool(self.ndoo_opted_out),
            ),
            (
                "type1_opted_out".to_owned(),
                RestrictedExpression::new_bool(self.type1_opted_out),
            ),
        ])
        .ok()?;
        Context::from_pairs([
            (
                "today".to_owned(),
                RestrictedExpression::new_long(date_number(self.today)),
            ),
            (
                "submitter".to_owned(),
                RestrictedExpression::new_entity_uid(submitter),
            ),
            ("record".to_owned(), record),
            ("patient".to_owned(), patient),
            (
                "ndoo_cache_fresh".to_owned(),
                RestrictedExpression::new_bool(self.ndoo_cache_fresh),
            ),
            (
                "break_glass_requesters".to_owned(),
                partner_set(&break_glass),
            ),
        ])
        .ok()
    }

    /// Whether `agreement` is the most relevant kind for this record: in force today and
    /// covering the submitter and every resource type. Only orders the candidates; Cedar
    /// re-checks everything.
    fn relevant(&self, bundle: &PolicyBundle, agreement: &Agreement) -> bool {
        agreement.status == AgreementStatus::Active
            && agreement.in_force_from <= self.today
            && self.today <= agreement.in_force_until
            && self
                .submitter
                .and_then(|index| bundle.partners.get(index))
                .is_some_and(|submitter| agreement.parties.contains(&submitter.id))
            && self
                .resource_types
                .iter()
                .all(|resource_type| agreement.resource_types.contains(resource_type))
    }
}

/// A rule that fired, as (rule id, reason) — before the NDOO-6 detail, sorting and
/// de-duplication, which depend on the call (see `decision.rs`).
pub(crate) type Fired = Vec<(String, String)>;

/// What Cedar answered for one partner's direct-care flow.
#[derive(Debug)]
pub(crate) enum PartnerAnswer {
    /// A break-glass requester with no direct-care agreement at all.
    NoAgreement { partner: usize },
    /// Allowed under `agreement` by the permits in `fired`.
    Allowed {
        partner: usize,
        agreement: usize,
        fired: Fired,
    },
    /// Denied under every candidate; `fired` are the forbids under the most relevant one.
    Denied {
        partner: usize,
        agreement: usize,
        fired: Fired,
    },
}

/// What Cedar answered for one feed.
#[derive(Debug)]
pub(crate) struct FeedAnswer {
    pub(crate) feed: usize,
    pub(crate) partner: usize,
    pub(crate) agreement: usize,
    pub(crate) allowed: bool,
    pub(crate) fired: Fired,
}

/// Cedar's answers for one situation, in the order the decision lists them.
#[derive(Debug)]
pub(crate) struct Answers {
    pub(crate) partners: Vec<PartnerAnswer>,
    pub(crate) feeds: Vec<FeedAnswer>,
}

/// Ask Cedar everything a decision needs about `situation`.
pub(crate) fn answers(bundle: &PolicyBundle, situation: &Situation) -> Answers {
    let context = situation.context(bundle);
    let mut shared = SharedForbids::new(bundle, context.as_ref());
    let mut partners = Vec::new();
    for (partner_index, partner) in bundle.partners.iter().enumerate() {
        if situation.submitter == Some(partner_index) {
            continue;
        }
        let candidates = candidate_agreements(bundle, partner, situation, Purpose::DirectCare);
        if candidates.is_empty() {
            if situation.break_glass_requester == Some(partner_index) {
                partners.push(PartnerAnswer::NoAgreement {
                    partner: partner_index,
                });
            }
            continue;
        }
        let mut first_denial: Option<(usize, Verdict)> = None;
        let mut allowed = None;
        for (position, agreement) in candidates.into_iter().enumerate() {
            // The most relevant candidate is always asked in full: its forbids are the reasons
            // if nothing allows. A later one only matters if it allows, which it cannot if a
            // forbid that holds for every partner holds.
            if position > 0 && shared.blocks(&partner.uid, Purpose::DirectCare, agreement) {
                continue;
            }
            let verdict = evaluate(
                bundle,
                context.as_ref(),
                &mut shared,
                partner_index,
                Purpose::DirectCare,
                agreement,
            );
            if verdict.allowed {
                allowed = Some(PartnerAnswer::Allowed {
                    partner: partner_index,
                    agreement,
                    fired: verdict.fired,
                });
                break;
            }
            if first_denial.is_none() {
                first_denial = Some((agreement, verdict));
            }
        }
        match (allowed, first_denial) {
            (Some(answer), _) => partners.push(answer),
            (None, Some((agreement, verdict))) => partners.push(PartnerAnswer::Denied {
                partner: partner_index,
                agreement,
                fired: verdict.fired,
            }),
            (None, None) => {}
        }
    }

    let mut feeds = Vec::new();
    for (feed_index, feed) in bundle.feeds.iter().enumerate() {
        let (Some(&partner), Some(&agreement)) = (
            bundle.partner_index.get(&feed.recipient),
            bundle.agreement_index.get(&feed.agreement),
        ) else {
            continue;
        };
        let verdict = evaluate(
            bundle,
            context.as_ref(),
            &mut shared,
            partner,
            Purpose::SecondaryUse,
            agreement,
        );
        feeds.push(FeedAnswer {
            feed: feed_index,
            partner,
            agreement,
            allowed: verdict.allowed,
            fired: verdict.fired,
        });
    }
    Answers { partners, feeds }
}

/// Agreements (indices) that could carry the flow partner ← record for `purpose`: the recipient
/// is a party and the purpose is listed. The most relevant first, then the others; bundle (id)
/// order within each group.
fn candidate_agreements(
    bundle: &PolicyBundle,
    partner: &Partner,
    situation: &Situation,
    purpose: Purpose,
) -> Vec<usize> {
    let mut candidates: Vec<usize> = bundle
        .agreements
        .iter()
        .enumerate()
        .filter(|(_, agreement)| {
            agreement.purposes.contains(&purpose) && agreement.parties.contains(&partner.id)
        })
        .map(|(index, _)| index)
        .collect();
    // Stable: keeps id order within each group.
    candidates.sort_by_key(|&index| {
        !bundle
            .agreements
            .get(index)
            .is_some_and(|agreement| situation.relevant(bundle, agreement))
    });
    candidates
}

/// One Cedar answer: allowed or not, and the rules behind it.
struct Verdict {
    allowed: bool,
    fired: Fired,
}

/// Cedar's answer for one triple: the shared forbids' answer (asked once per record and
/// agreement) combined with the answer of the triple's other policies — exactly the answer of
/// the whole scope slice, since Cedar decides policy by policy: a satisfied forbid denies and
/// names every satisfied forbid; otherwise a satisfied permit allows and names every one.
fn evaluate(
    bundle: &PolicyBundle,
    context: Option<&Context>,
    shared: &mut SharedForbids<'_>,
    partner: usize,
    purpose: Purpose,
    agreement: usize,
) -> Verdict {
    let failed = |detail: &str| Verdict {
        allowed: false,
        fired: vec![(
            RULE_POLICY_ERROR.to_owned(),
            format!("the policy could not be evaluated ({detail}); withheld to fail closed"),
        )],
    };
    let Some(context) = context else {
        return failed("the decision context could not be built");
    };
    let (Some(principal), Some(resource), Some(policies)) = (
        bundle.partners.get(partner),
        bundle.agreements.get(agreement),
        bundle.scope_slices.get(partner, purpose, agreement),
    ) else {
        return failed("the request could not be built");
    };
    let shared_answer = match shared.answer(&principal.uid, purpose, agreement) {
        SharedAnswer::Answered { fired, error } => (fired, error),
        SharedAnswer::Unasked => return failed("the request could not be built"),
    };
    let request = match Request::new(
        principal.uid.clone(),
        bundle.action(purpose).clone(),
        resource.uid.clone(),
        context.clone(),
        None,
    ) {
        Ok(request) => request,
        Err(_) => return failed("the request could not be built"),
    };
    let response = bundle
        .authorizer
        .is_authorized(&request, policies, &bundle.entities);
    if shared_answer.1 || response.diagnostics().errors().next().is_some() {
        return failed("a policy raised an evaluation error");
    }
    let own_allowed = response.decision() == CedarDecision::Allow;
    let own = |effect: Effect| -> Fired {
        response
            .diagnostics()
            .reason()
            .filter_map(|policy_id| bundle.rules.get(policy_id))
            .filter(|rule| rule.effect == effect)
            .map(|rule| (rule.rule_id.clone(), rule.reason.clone()))
            .collect()
    };
    let mut forbids = shared_answer.0;
    if !own_allowed {
        forbids.extend(own(Effect::Forbid));
    }
    if !forbids.is_empty() {
        return Verdict {
            allowed: false,
            fired: forbids,
        };
    }
    if own_allowed {
        return Verdict {
            allowed: true,
            fired: own(Effect::Permit),
        };
    }
    Verdict {
        allowed: false,
        fired: vec![match purpose {
            Purpose::DirectCare => (
                RULE_NO_RELATIONSHIP.to_owned(),
                "no legitimate relationship: not the patient's registered GP, no open care relationship, no patient consent, no permitted break-glass request".to_owned(),
            ),
            Purpose::SecondaryUse => (RULE_NO_PERMIT.to_owned(), "no policy permits this secondary use".to_owned()),
        }],
    }
}

/// What the shared forbids of one (purpose, agreement) said for this record.
#[derive(Clone)]
enum SharedAnswer {
    /// The request could not be built (no context, or Cedar refused it).
    Unasked,
    /// The satisfied forbids, and whether any shared forbid raised an error.
    Answered { fired: Fired, error: bool },
}

/// Per record: the answer of the forbids that hold for every partner or for none, asked of
/// Cedar at most once per (purpose, agreement).
struct SharedForbids<'a> {
    bundle: &'a PolicyBundle,
    context: Option<&'a Context>,
    /// `[purpose][agreement]`, flattened; `None` until asked.
    answers: Vec<Option<SharedAnswer>>,
}

impl<'a> SharedForbids<'a> {
    fn new(bundle: &'a PolicyBundle, context: Option<&'a Context>) -> Self {
        Self {
            bundle,
            context,
            answers: vec![None; Purpose::ALL.len() * bundle.agreements.len()],
        }
    }

    /// True only if a shared forbid was satisfied: the flow is then denied for every partner.
    fn blocks(&mut self, principal: &EntityUid, purpose: Purpose, agreement: usize) -> bool {
        matches!(
            self.answer(principal, purpose, agreement),
            SharedAnswer::Answered { fired, .. } if !fired.is_empty()
        )
    }

    /// The shared forbids' answer; `principal` only fills the request (they never read it).
    fn answer(
        &mut self,
        principal: &EntityUid,
        purpose: Purpose,
        agreement: usize,
    ) -> SharedAnswer {
        let slot = purpose_index(purpose) * self.bundle.agreements.len() + agreement;
        if let Some(Some(answer)) = self.answers.get(slot) {
            return answer.clone();
        }
        let answer = self.ask(principal, purpose, agreement);
        if let Some(entry) = self.answers.get_mut(slot) {
            *entry = Some(answer.clone());
        }
        answer
    }

    fn ask(&self, principal: &EntityUid, purpose: Purpose, agreement: usize) -> SharedAnswer {
        let (Some(context), Some(resource), Some(forbids)) = (
            self.context,
            self.bundle.agreements.get(agreement),
            self.bundle.scope_slices.shared_forbids(purpose, agreement),
        ) else {
            return SharedAnswer::Unasked;
        };
        let Ok(request) = Request::new(
            principal.clone(),
            self.bundle.action(purpose).clone(),
            resource.uid.clone(),
            context.clone(),
            None,
        ) else {
            return SharedAnswer::Unasked;
        };
        let response =
            self.bundle
                .authorizer
                .is_authorized(&request, forbids, &self.bundle.entities);
        // Only forbids in the set: every reason is a forbid that was satisfied.
        SharedAnswer::Answered {
            fired: response
                .diagnostics()
                .reason()
                .filter_map(|policy_id| self.bundle.rules.get(policy_id))
                .filter(|rule| rule.effect == Effect::Forbid)
                .map(|rule| (rule.rule_id.clone(), rule.reason.clone()))
                .collect(),
            error: response.diagnostics().errors().next().is_some(),
        }
    }
}

fn purpose_index(purpose: Purpose) -> usize {
    match purpose {
        Purpose::DirectCare => 0,
        Purpose::SecondaryUse => 1,
    }
}

/// For each (partner, purpose, agreement), the policies whose scope matches it; and for each
/// (purpose, agreement), the forbids whose answer is the same for every partner.
pub(crate) struct ScopeSlices {
    agreements: usize,
    sets: Vec<PolicySet>,
    /// `[purpose][agreement]`: forbids with an unconstrained principal scope whose conditions
    /// never read `principal` (checked on the policy's JSON form at load), scope matching.
    shared_forbids: Vec<PolicySet>,
}

impl ScopeSlices {
    pub(crate) fn build(
        policies: &PolicySet,
        entities: &Entities,
        partners: &[Partner],
        agreements: &[Agreement],
        actions: &[EntityUid; 2],
    ) -> Result<Self, PolicyError> {
        // Forbids that hold for every partner or for none: an unconstrained principal scope, and
        // conditions that never read `principal`. Asked once per record and agreement
        // (`shared_forbids`), so left out of the per-triple sets.
        let shared: Vec<PolicyId> = policies
            .policies()
            .filter(|policy| {
                policy.effect() == Effect::Forbid
                    && policy.principal_constraint() == PrincipalConstraint::Any
                    && !reads_principal(policy)
            })
            .map(|policy| policy.id().clone())
            .collect();
        let is_shared = |policy: &Policy| shared.contains(policy.id());
        let mut sets = Vec::with_capacity(partners.len() * Purpose::ALL.len() * agreements.len());
        for partner in partners {
            for purpose in Purpose::ALL {
                let action = match purpose {
                    Purpose::DirectCare => &actions[0],
                    Purpose::SecondaryUse => &actions[1],
                };
                for agreement in agreements {
                    let matching = policies.policies().filter(|policy| {
                        !is_shared(policy)
                            && scope_matches(policy, entities, &partner.uid, action, &agreement.uid)
                    });
                    sets.push(
                        PolicySet::from_policies(matching.cloned()).map_err(|error| {
                            PolicyError::Entities {
                                message: format!("could not index the policies by scope: {error}"),
                            }
                        })?,
                    );
                }
            }
        }
        let mut shared_forbids = Vec::with_capacity(Purpose::ALL.len() * agreements.len());
        for action in actions {
            for agreement in agreements {
                let forbids = policies.policies().filter(|policy| {
                    is_shared(policy)
                        // The principal is unconstrained, so any uid stands in for it here.
                        && scope_matches(policy, entities, &agreement.uid, action, &agreement.uid)
                });
                shared_forbids.push(PolicySet::from_policies(forbids.cloned()).map_err(
                    |error| PolicyError::Entities {
                        message: format!("could not index the policies by scope: {error}"),
                    },
                )?);
            }
        }
        Ok(Self {
            agreements: agreements.len(),
            sets,
            shared_forbids,
        })
    }

    fn get(&self, partner: usize, purpose: Purpose, agreement: usize) -> Option<&PolicySet> {
        if agreement >= self.agreements {
            return None;
        }
        self.sets.get(
            (partner * Purpose::ALL.len() + purpose_index(purpose)) * self.agreements + agreement,
        )
    }

    fn shared_forbids(&self, purpose: Purpose, agreement: usize) -> Option<&PolicySet> {
        if agreement >= self.agreements {
            return None;
        }
        self.shared_forbids
            .get(purpose_index(purpose) * self.agreements + agreement)
    }
}

/// Whether the policy's conditions mention the `principal` variable anywhere (in Cedar's JSON
/// policy format a variable is `{"Var": "principal"}`). When the JSON form cannot be produced,
/// assume it does.
fn reads_principal(policy: &Policy) -> bool {
    fn mentions(value: &serde_json::Value) -> bool {
        match value {
            serde_json::Value::Object(map) => map.iter().any(|(key, child)| {
                (key == "Var" && child.as_str() == Some("principal")) || mentions(child)
            }),
            serde_json::Value::Array(items) => items.iter().any(mentions),
            _ => false,
        }
    }
    policy
        .to_json()
        .map_or(true, |json| json.get("conditions").is_none_or(mentions))
}

/// `child in ancestor`, as Cedar evaluates it over the bundle's entities.
fn is_in(entities: &Entities, child: &EntityUid, ancestor: &EntityUid) -> bool {
    child == ancestor || entities.is_ancestor_of(ancestor, child)
}

/// Whether the policy's scope holds for the triple (the scope is evaluated before the
/// conditions, so a policy whose scope fails is unsatisfied and raises no error).
fn scope_matches(
    policy: &Policy,
    entities: &Entities,
    principal: &EntityUid,
    action: &EntityUid,
    resource: &EntityUid,
) -> bool {
    let principal_ok = match policy.principal_constraint() {
        PrincipalConstraint::Any => true,
        PrincipalConstraint::In(group) => is_in(entities, principal, &group),
        PrincipalConstraint::Eq(uid) => *principal == uid,
        PrincipalConstraint::Is(type_name) => *principal.type_name() == type_name,
        PrincipalConstraint::IsIn(type_name, group) => {
            *principal.type_name() == type_name && is_in(entities, principal, &group)
        }
    };
    let action_ok = match policy.action_constraint() {
        ActionConstraint::Any => true,
        ActionConstraint::In(groups) => groups.iter().any(|group| is_in(entities, action, group)),
        ActionConstraint::Eq(uid) => *action == uid,
    };
    let resource_ok = match policy.resource_constraint() {
        ResourceConstraint::Any => true,
        ResourceConstraint::In(group) => is_in(entities, resource, &group),
        ResourceConstraint::Eq(uid) => *resource == uid,
        ResourceConstraint::Is(type_name) => *resource.type_name() == type_name,
        ResourceConstraint::IsIn(type_name, group) => {
            *resource.type_name() == type_name && is_in(entities, resource, &group)
        }
    };
    principal_ok && action_ok && resource_ok
}

/// Cedar's answers for recent situations, per bundle (a reloaded bundle starts empty).
#[derive(Default)]
pub(crate) struct AnswerMemo {
    answers: Mutex<HashMap<Situation, Arc<Answers>>>,
}

impl AnswerMemo {
    /// The answers for `situation`, from the memo or computed (outside the lock) and kept.
    pub(crate) fn get_or_compute(
        &self,
        situation: Situation,
        compute: impl FnOnce(&Situation) -> Answers,
    ) -> Arc<Answers> {
        if let Some(answers) = self
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&situation)
        {
            return Arc::clone(answers);
        }
        let answers = Arc::new(compute(&situation));
        let mut memo = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        if memo.len() >= MEMO_CAPACITY {
            memo.clear();
        }
        memo.insert(situation, Arc::clone(&answers));
        answers
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use time::Duration;
    use time::macros::date;

    use super::*;

    fn situation(day: i64) -> Situation {
        Situation {
            today: date!(2025 - 06 - 01) + Duration::days(day),
            submitter: Some(0),
            resource_types: vec!["Observation".to_owned()],
            sensitive_categories: Vec::new(),
            medication_related: false,
            gp_sourced: false,
            has_nhs_number: true,
            registered_gp_ods: "A81001".to_owned(),
            care_team: Vec::new(),
            dissent_from: Vec::new(),
            consent_to: Vec::new(),
            ndoo_opted_out: false,
            type1_opted_out: false,
            ndoo_cache_fresh: true,
            break_glass_requester: None,
        }
    }

    fn nothing() -> Answers {
        Answers {
            partners: Vec::new(),
            feeds: Vec::new(),
        }
    }

    #[test]
    fn shared_forbids_are_the_ones_that_never_read_the_principal() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        let Ok(bundle) = PolicyBundle::load(&root) else {
            panic!("the shipped bundle loads");
        };
        let Some(&agreement) = bundle.agreement_index.get("dsa-ics-direct-care") else {
            panic!("the shipped bundle has the ICS direct-care agreement");
        };
        let ids = |purpose| -> BTreeSet<String> {
            bundle
                .scope_slices
                .shared_forbids(purpose, agreement)
                .into_iter()
                .flat_map(PolicySet::policies)
                .filter_map(|policy| policy.annotation("id").map(str::to_owned))
                .collect()
        };
        let direct_care = ids(Purpose::DirectCare);
        for id in [
            "DSA-REVOKED",
            "DSA-NOT-YET",
            "DSA-EXPIRED",
            "DSA-PURPOSE-DIRECT-CARE",
            "DSA-RESOURCE-TYPE",
        ] {
            assert!(direct_care.contains(id), "{id} is shared: {direct_care:?}");
        }
        for id in [
            "DSA-PARTY",
            "CONSENT-DISSENT",
            "SENS-1",
            "PHARM-MED-ONLY",
            "NDOO-1",
            "DSA-PURPOSE-SECONDARY-USE",
        ] {
            assert!(
                !direct_care.contains(id),
                "{id} is not shared: {direct_care:?}"
            );
        }
        let secondary_use = ids(Purpose::SecondaryUse);
        for id in [
            "NDOO-1",
            "NDOO-6",
            "SEC-NO-NHS-NUMBER",
            "T1-1",
            "DSA-EXPIRED",
        ] {
            assert!(
                secondary_use.contains(id),
                "{id} is shared: {secondary_use:?}"
            );
        }
        assert!(!secondary_use.contains("SC-DIRECT-CARE-ONLY"));
    }

    #[test]
    fn memo_answers_a_seen_situation_without_computing_and_stays_bounded() {
        let memo = AnswerMemo::default();
        let mut computed = 0;
        let days = i64::try_from(MEMO_CAPACITY).unwrap_or(i64::MAX) + 10;
        for day in 0..days {
            let _ = memo.get_or_compute(situation(day), |_| {
                computed += 1;
                nothing()
            });
            assert!(memo.len() <= MEMO_CAPACITY);
        }
        assert_eq!(computed, days);
        let _ = memo.get_or_compute(situation(days - 1), |_| {
            computed += 1;
            nothing()
        });
        assert_eq!(computed, days, "a seen situation is not computed again");
        let mut other = situation(days - 1);
        other.care_team.push(3);
        let _ = memo.get_or_compute(other, |_| {
            computed += 1;
            nothing()
        });
        assert_eq!(computed, days + 1, "any fact Cedar sees is part of the key");
    }
}
