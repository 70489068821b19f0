//! The straightforward evaluation, frozen as it was before `evaluation.rs` made it fast: one
//! full Cedar `is_authorized` over the whole policy set per partner × candidate agreement, the
//! context built per record, no scope slices, no memo. The equivalence tests compare
//! [`crate::decide`] with this over random records and consent states; do not "optimise" it.

use std::collections::BTreeSet;

use cedar_policy::{
    Context, Decision as CedarDecision, Effect, EntityUid, Request, RestrictedExpression,
};
use time::OffsetDateTime;

use super::{
    Decision, Delivery, FeedDecision, RULE_BREAK_GLASS, RULE_NO_AGREEMENT, RULE_NO_PERMIT,
    RULE_NO_RELATIONSHIP, RULE_POLICY_ERROR, Withheld,
};
use crate::bundle::{Agreement, AgreementStatus, Partner, PolicyBundle, Purpose, date_number};
use crate::consent::{ConsentFor, ConsentView, NdooFreshness};
use crate::facts::RecordFacts;

/// The per-record facts Cedar sees, plus what Rust needs to explain them.
struct Situation {
    context: Option<Context>,
    ndoo: NdooFreshness,
}

/// Decide who may receive `record`. Pure: the same inputs give the same decision.
pub(super) fn decide(
    record: &RecordFacts,
    consent: &ConsentView<'_>,
    bundle: &PolicyBundle,
    now: OffsetDateTime,
) -> Decision {
    let sensitive = sensitive_categories(record, bundle);
    let situation = situation(record, consent, bundle, &sensitive, now);
    let mut decision = Decision {
        policy_version: bundle.version().to_owned(),
        decided_at: now,
        resource_type: record.resource_type().as_str().to_owned(),
        submitter: record.submitter().id.clone(),
        sensitive_categories: sensitive.iter().cloned().collect(),
        deliver_to: Vec::new(),
        withheld: Vec::new(),
        feeds: Vec::new(),
        break_glass: false,
        break_glass_reason: record.break_glass().map(|request| request.reason.clone()),
    };
    let today = now.date();

    for partner in bundle.partners() {
        if partner.id == record.submitter().id {
            continue;
        }
        let requested_break_glass = record
            .break_glass()
            .is_some_and(|request| request.requester == partner.id);
        let candidates = candidate_agreements(bundle, partner, record, Purpose::DirectCare, today);
        if candidates.is_empty() {
            if requested_break_glass {
                decision.withheld.push(Withheld {
                    partner: partner.id.clone(),
                    agreement: None,
                    rule_id: RULE_NO_AGREEMENT.to_owned(),
                    reason: "no data-sharing agreement covers this organisation for direct care"
                        .to_owned(),
                });
            }
            continue;
        }
        let mut first_denial: Option<(&Agreement, Outcome)> = None;
        let mut delivered = false;
        for agreement in candidates {
            let outcome = evaluate(bundle, &situation, partner, Purpose::DirectCare, agreement);
            if outcome.allowed {
                let break_glass = outcome.rule_ids.iter().all(|rule| rule == RULE_BREAK_GLASS);
                decision.break_glass |= break_glass;
                decision.deliver_to.push(Delivery {
                    partner: partner.id.clone(),
                    agreement: agreement.id.clone(),
                    purpose: Purpose::DirectCare,
                    rule_ids: outcome.rule_ids,
                    rule_reasons: outcome.reasons,
                    break_glass,
                });
                delivered = true;
                break;
            }
            if first_denial.is_none() {
                first_denial = Some((agreement, outcome));
            }
        }
        if !delivered && let Some((agreement, outcome)) = first_denial {
            for (rule_id, reason) in outcome.rule_ids.into_iter().zip(outcome.reasons) {
                decision.withheld.push(Withheld {
                    partner: partner.id.clone(),
                    agreement: Some(agreement.id.clone()),
                    rule_id,
                    reason,
                });
            }
        }
    }

    for feed in bundle.feeds() {
        let (Some(partner), Some(agreement)) = (
            bundle.partner(&feed.recipient),
            bundle.agreement(&feed.agreement),
        ) else {
            continue;
        };
        let outcome = evaluate(
            bundle,
            &situation,
            partner,
            Purpose::SecondaryUse,
            agreement,
        );
        decision.feeds.push(FeedDecision {
            feed: feed.id.clone(),
            recipient: partner.id.clone(),
            agreement: agreement.id.clone(),
            included: outcome.allowed,
            rule_ids: outcome.rule_ids,
            reasons: outcome.reasons,
        });
    }
    decision
}

/// The sensitive categories of the record's codings, sorted.
fn sensitive_categories(record: &RecordFacts, bundle: &PolicyBundle) -> BTreeSet<String> {
    let mut categories = BTreeSet::new();
    for coding in record.codings() {
        for &index in bundle.code_index.lookup(&coding.system, &coding.code) {
            if let Some(list) = bundle.code_lists.get(index) {
                categories.insert(list.category.clone());
            }
        }
    }
    categories
}

/// Agreements that could carry the flow partner ← record for `purpose`: the recipient is a party
/// and the purpose is listed. The most relevant first: in force and covering every resource type
/// of the record, then the others; by id within each group. Cedar re-checks everything.
fn candidate_agreements<'b>(
    bundle: &'b PolicyBundle,
    partner: &Partner,
    record: &RecordFacts,
    purpose: Purpose,
    today: time::Date,
) -> Vec<&'b Agreement> {
    let mut candidates: Vec<&Agreement> = bundle
        .agreements()
        .iter()
        .filter(|agreement| {
            agreement.purposes.contains(&purpose) && agreement.parties.contains(&partner.id)
        })
        .collect();
    candidates.sort_by_key(|agreement| {
        let relevant = agreement.status == AgreementStatus::Active
            && agreement.in_force_from <= today
            && today <= agreement.in_force_until
            && agreement.parties.contains(&record.submitter().id)
            && record
                .resource_types()
                .all(|resource_type| agreement.resource_types.contains(resource_type));
        !relevant
    });
    candidates
}

/// One Cedar answer, translated to rule ids and reasons.
struct Outcome {
    allowed: bool,
    rule_ids: Vec<String>,
    reasons: Vec<String>,
}

fn evaluate(
    bundle: &PolicyBundle,
    situation: &Situation,
    partner: &Partner,
    purpose: Purpose,
    agreement: &Agreement,
) -> Outcome {
    let failed = |detail: &str| Outcome {
        allowed: false,
        rule_ids: vec![RULE_POLICY_ERROR.to_owned()],
        reasons: vec![format!(
            "the policy could not be evaluated ({detail}); withheld to fail closed"
        )],
    };
    let Some(context) = situation.context.clone() else {
        return failed("the decision context could not be built");
    };
    let request = match Request::new(
        partner.uid.clone(),
        bundle.action(purpose).clone(),
        agreement.uid.clone(),
        context,
        None,
    ) {
        Ok(request) => request,
        Err(_) => return failed("the request could not be built"),
    };
    let response = bundle
        .authorizer
        .is_authorized(&request, &bundle.policies, &bundle.entities);
    if response.diagnostics().errors().next().is_some() {
        return failed("a policy raised an evaluation error");
    }
    let allowed = response.decision() == CedarDecision::Allow;
    let mut fired: Vec<(String, String)> = response
        .diagnostics()
        .reason()
        .filter_map(|policy_id| bundle.rules.get(policy_id))
        .filter(|rule| {
            rule.effect
                == if allowed {
                    Effect::Permit
                } else {
                    Effect::Forbid
                }
        })
        .map(|rule| {
            (
                rule.rule_id.clone(),
                reason_with_detail(&rule.rule_id, &rule.reason, situation),
            )
        })
        .collect();
    if fired.is_empty() && !allowed {
        fired.push(match purpose {
            Purpose::DirectCare => (
                RULE_NO_RELATIONSHIP.to_owned(),
                "no legitimate relationship: not the patient's registered GP, no open care relationship, no patient consent, no permitted break-glass request".to_owned(),
            ),
            Purpose::SecondaryUse => (RULE_NO_PERMIT.to_owned(), "no policy permits this secondary use".to_owned()),
        });
    }
    fired.sort();
    fired.dedup_by(|a, b| a.0 == b.0);
    let (rule_ids, reasons) = fired.into_iter().unzip();
    Outcome {
        allowed,
        rule_ids,
        reasons,
    }
}

/// NDOO-6 says *why* the cache failed: its age against the allowed maximum.
fn reason_with_detail(rule_id: &str, reason: &str, situation: &Situation) -> String {
    if rule_id != "NDOO-6" {
        return reason.to_owned();
    }
    match situation.ndoo {
        NdooFreshness::Fresh => reason.to_owned(),
        NdooFreshness::NeverLoaded => {
            format!("{reason} (no National Data Opt-out list has been loaded)")
        }
        NdooFreshness::Stale { age, max_age } => format!(
            "{reason} (the list was loaded {} hours ago; the maximum allowed is {} hours)",
            age.whole_hours(),
            max_age.whole_hours()
        ),
    }
}

fn situation(
    record: &RecordFacts,
    consent: &ConsentView<'_>,
    bundle: &PolicyBundle,
    sensitive: &BTreeSet<String>,
    now: OffsetDateTime,
) -> Situation {
    let ndoo = consent.ndoo_cache().freshness(now);
    let context = build_context(record, consent, bundle, sensitive, now, ndoo);
    Situation { context, ndoo }
}

fn build_context(
    record: &RecordFacts,
    consent: &ConsentView<'_>,
    bundle: &PolicyBundle,
    sensitive: &BTreeSet<String>,
    now: OffsetDateTime,
    ndoo: NdooFreshness,
) -> Option<Context> {
    let strings = |values: &mut dyn Iterator<Item = &str>| {
        RestrictedExpression::new_set(
            values
                .map(|value| RestrictedExpression::new_string(value.to_owned()))
                .collect::<Vec<_>>(),
        )
    };
    let partner_set = |uids: Vec<EntityUid>| {
        RestrictedExpression::new_set(uids.into_iter().map(RestrictedExpression::new_entity_uid))
    };

    // The registered GP: this record's Patient.generalPractitioner, else what the registry knows.
    let registered_gp = record.registered_gp().or(consent.registered_gp());
    let care_team: Vec<EntityUid> = consent
        .care_team()
        .filter_map(|id| bundle.partner(id))
        .map(|partner| partner.uid.clone())
        .collect();
    let mut dissent_from = Vec::new();
    let mut consent_to = Vec::new();
    for partner in bundle.partners() {
        match consent.consent_for(&partner.reference(), now) {
            ConsentFor::None => {}
            ConsentFor::Permit => consent_to.push(partner.uid.clone()),
            ConsentFor::Deny => dissent_from.push(partner.uid.clone()),
        }
    }
    let break_glass: Vec<EntityUid> = record
        .break_glass()
        .and_then(|request| bundle.partner(&request.requester))
        .map(|partner| partner.uid.clone())
        .into_iter()
        .collect();
    let submitter = bundle.partner(&record.submitter().id)?.uid.clone();

    let record_expr = RestrictedExpression::new_record([
        (
            "resource_types".to_owned(),
            strings(&mut record.resource_types()),
        ),
        (
            "sensitive_categories".to_owned(),
            strings(&mut sensitive.iter().map(String::as_str)),
        ),
        (
            "medication_related".to_owned(),
            RestrictedExpression::new_bool(record.medication_related()),
        ),
        (
            "gp_sourced".to_owned(),
            RestrictedExpression::new_bool(record.gp_sourced()),
        ),
        (
            "has_nhs_number".to_owned(),
            RestrictedExpression::new_bool(record.nhs_number().is_some()),
        ),
    ])
    .ok()?;
    let patient_expr = RestrictedExpression::new_record([
        (
            "registered_gp_ods".to_owned(),
            RestrictedExpression::new_string(
                registered_gp.map_or(String::new(), |ods| ods.as_str().to_owned()),
            ),
        ),
        ("care_team".to_owned(), partner_set(care_team)),
        ("dissent_from".to_owned(), partner_set(dissent_from)),
        ("consent_to".to_owned(), partner_set(consent_to)),
        (
            "ndoo_opted_out".to_owned(),
            RestrictedExpression::new_bool(consent.ndoo_opted_out()),
        ),
        (
            "type1_opted_out".to_owned(),
            RestrictedExpression::new_bool(
                consent.type1_opted_out() || record.carries_type1_opt_out(),
            ),
        ),
    ])
    .ok()?;
    Context::from_pairs([
        (
            "today".to_owned(),
            RestrictedExpression::new_long(date_number(now.date())),
        ),
        (
            "submitter".to_owned(),
            RestrictedExpression::new_entity_uid(submitter),
        ),
        ("record".to_owned(), record_expr),
        ("patient".to_owned(), patient_expr),
        (
            "ndoo_cache_fresh".to_owned(),
            RestrictedExpression::new_bool(ndoo == NdooFreshness::Fresh),
        ),
        (
            "break_glass_requesters".to_owned(),
            partner_set(break_glass),
        ),
    ])
    .ok()
}
