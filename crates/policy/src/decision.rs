//! `decide`: which partners may receive a record, which are withheld and why, which feeds may
//! include it — pure and deterministic over (record facts, consent view, bundle, time).
//!
//! How one decision is made:
//! 1. Rust reduces the inputs to one Cedar context per record (`Situation` in the schema): the
//!    record's types, sensitive categories, medication-relatedness, GP-sourcing; the patient's
//!    registered GP, care team, per-partner Consent outcome, opt-outs; the NDOO cache freshness;
//!    the break-glass requester. Everything that needs a walk, a sort or clock arithmetic is done
//!    here (see `policies/README.md`, "What Cedar does not express").
//! 2. For each partner with an agreement for direct care (except the submitter), Cedar is asked
//!    "may this partner receive, for direct care, under this agreement?" for each of its candidate
//!    agreements, the most relevant first; the first Allow wins and names the agreement. If none
//!    allows, the forbids that fired under the most relevant agreement are the withheld reasons.
//! 3. For each feed, Cedar is asked the same for secondary use under the feed's agreement.
//!
//! Fail closed: an evaluation error in any policy is a deny (`POLICY-ERROR`), never skipped.
//!
//! Step 2 is where the time goes (one Cedar evaluation per partner × candidate agreement); how it
//! is kept cheap without changing an answer — a situation built once per record, policies sliced
//! by scope per triple, a per-bundle memo of answers per situation — is in `evaluation.rs`.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::bundle::{PolicyBundle, Purpose};
use crate::consent::{ConsentView, NdooFreshness};
use crate::evaluation::{Answers, PartnerAnswer, Situation, answers};
use crate::facts::RecordFacts;
use crate::partner::PartnerId;

#[cfg(test)]
mod equivalence;
#[cfg(test)]
mod reference;

/// Rule id when direct care is denied because no permit applied: no legitimate relationship.
pub const RULE_NO_RELATIONSHIP: &str = "LR-1";
/// Rule id of the break-glass permit (DOMAIN `LR-2`): deliveries relying on it are flagged.
pub const RULE_BREAK_GLASS: &str = "LR-2";
/// Rule id when secondary use is denied with no forbid firing (should not happen with the
/// shipped bundle, which permits secondary use and restricts it by forbids).
pub const RULE_NO_PERMIT: &str = "NO-PERMIT";
/// Rule id when Cedar itself failed (fail closed).
pub const RULE_POLICY_ERROR: &str = "POLICY-ERROR";
/// Rule id when a break-glass requester has no agreement at all for direct care.
pub const RULE_NO_AGREEMENT: &str = "DSA-NONE";

/// The decision for one record, kept with it by the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The bundle version (`sha256:…`) the decision was made under.
    pub policy_version: String,
    #[serde(with = "time::serde::rfc3339")]
    pub decided_at: OffsetDateTime,
    /// The resource type decided on.
    pub resource_type: String,
    pub submitter: PartnerId,
    /// Sensitive categories found in the record (`SENS-1`).
    pub sensitive_categories: Vec<String>,
    pub deliver_to: Vec<Delivery>,
    pub withheld: Vec<Withheld>,
    pub feeds: Vec<FeedDecision>,
    /// A delivery relied on break-glass (`LR-2`): flag for IG review.
    pub break_glass: bool,
    /// The clinician's stated reason, when break-glass was requested.
    pub break_glass_reason: Option<String>,
}

/// The record may go to `partner` under `agreement`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub partner: PartnerId,
    pub agreement: String,
    pub purpose: Purpose,
    /// The rules that permitted it.
    pub rule_ids: Vec<String>,
    /// `rule_reasons[i]` explains `rule_ids[i]`.
    pub rule_reasons: Vec<String>,
    pub break_glass: bool,
}

/// The record must not go to `partner`, because of `rule_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withheld {
    pub partner: PartnerId,
    /// The agreement the flow was judged under, if any covered it.
    pub agreement: Option<String>,
    pub rule_id: String,
    pub reason: String,
}

/// Whether the record may enter a secondary-use feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedDecision {
    pub feed: String,
    pub recipient: PartnerId,
    pub agreement: String,
    pub included: bool,
    /// Permitting rules when included, the forbidding rules otherwise.
    pub rule_ids: Vec<String>,
    pub reasons: Vec<String>,
}

impl Decision {
    /// Partners the record may be delivered to.
    pub fn recipients(&self) -> impl Iterator<Item = &PartnerId> {
        self.deliver_to.iter().map(|delivery| &delivery.partner)
    }

    /// Feeds the record may enter.
    pub fn included_feeds(&self) -> impl Iterator<Item = &str> {
        self.feeds
            .iter()
            .filter(|feed| feed.included)
            .map(|feed| feed.feed.as_str())
    }
}

/// Decide who may receive `record`. Pure: the same inputs give the same decision.
///
/// Cedar's answers for the record's situation (every fact the Cedar context holds) are kept in a
/// bounded memo in the bundle, so a record whose situation was decided recently does not ask
/// Cedar again; the result is the same as [`decide_uncached`]'s.
pub fn decide(
    record: &RecordFacts,
    consent: &ConsentView<'_>,
    bundle: &PolicyBundle,
    now: OffsetDateTime,
) -> Decision {
    let sensitive = sensitive_categories(record, bundle);
    let situation = Situation::new(record, consent, bundle, &sensitive, now);
    let answers = bundle
        .answer_memo
        .get_or_compute(situation, |situation| answers(bundle, situation));
    decision(&answers, record, consent, bundle, sensitive, now)
}

/// [`decide`] without the bundle's memo: always asks Cedar. The same decision; for measuring
/// the cost of a situation not seen before, and for checking the memo.
pub fn decide_uncached(
    record: &RecordFacts,
    consent: &ConsentView<'_>,
    bundle: &PolicyBundle,
    now: OffsetDateTime,
) -> Decision {
    let sensitive = sensitive_categories(record, bundle);
    let situation = Situation::new(record, consent, bundle, &sensitive, now);
    let answers = answers(bundle, &situation);
    decision(&answers, record, consent, bundle, sensitive, now)
}

/// The decision from Cedar's answers, plus what is particular to this call: the time, the
/// break-glass reason and the NDOO cache's age.
fn decision(
    answers: &Answers,
    record: &RecordFacts,
    consent: &ConsentView<'_>,
    bundle: &PolicyBundle,
    sensitive: BTreeSet<String>,
    now: OffsetDateTime,
) -> Decision {
    let ndoo = consent.ndoo_cache().freshness(now);
    let partner_id = |index: usize| bundle.partners.get(index).map(|partner| partner.id.clone());
    let agreement_id = |index: usize| {
        bundle
            .agreements
            .get(index)
            .map(|agreement| agreement.id.clone())
    };
    let mut decision = Decision {
        policy_version: bundle.version().to_owned(),
        decided_at: now,
        resource_type: record.resource_type().as_str().to_owned(),
        submitter: record.submitter().id.clone(),
        sensitive_categories: sensitive.into_iter().collect(),
        deliver_to: Vec::new(),
        withheld: Vec::new(),
        feeds: Vec::new(),
        break_glass: false,
        break_glass_reason: record.break_glass().map(|request| request.reason.clone()),
    };
    for answer in &answers.partners {
        match answer {
            PartnerAnswer::NoAgreement { partner } => {
                let Some(partner) = partner_id(*partner) else {
                    continue;
                };
                decision.withheld.push(Withheld {
                    partner,
                    agreement: None,
                    rule_id: RULE_NO_AGREEMENT.to_owned(),
                    reason: "no data-sharing agreement covers this organisation for direct care"
                        .to_owned(),
                });
            }
            PartnerAnswer::Allowed {
                partner,
                agreement,
                fired,
            } => {
                let (Some(partner), Some(agreement)) =
                    (partner_id(*partner), agreement_id(*agreement))
                else {
                    continue;
                };
                let (rule_ids, rule_reasons) = explained(fired, ndoo);
                let break_glass = rule_ids.iter().all(|rule| rule == RULE_BREAK_GLASS);
                decision.break_glass |= break_glass;
                decision.deliver_to.push(Delivery {
                    partner,
                    agreement,
                    purpose: Purpose::DirectCare,
                    rule_ids,
                    rule_reasons,
                    break_glass,
                });
            }
            PartnerAnswer::Denied {
                partner,
                agreement,
                fired,
            } => {
                let (Some(partner), Some(agreement)) =
                    (partner_id(*partner), agreement_id(*agreement))
                else {
                    continue;
                };
                let (rule_ids, reasons) = explained(fired, ndoo);
                for (rule_id, reason) in rule_ids.into_iter().zip(reasons) {
                    decision.withheld.push(Withheld {
                        partner: partner.clone(),
                        agreement: Some(agreement.clone()),
                        rule_id,
                        reason,
                    });
                }
            }
        }
    }
    for answer in &answers.feeds {
        let (Some(feed), Some(recipient), Some(agreement)) = (
            bundle.feeds.get(answer.feed),
            partner_id(answer.partner),
            agreement_id(answer.agreement),
        ) else {
            continue;
        };
        let (rule_ids, reasons) = explained(&answer.fired, ndoo);
        decision.feeds.push(FeedDecision {
            feed: feed.id.clone(),
            recipient,
            agreement,
            included: answer.allowed,
            rule_ids,
            reasons,
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

/// The rules that fired, in words for this call (NDOO-6 says how old the list is), sorted, one
/// per rule id: `(rule_ids, reasons)`.
fn explained(fired: &[(String, String)], ndoo: NdooFreshness) -> (Vec<String>, Vec<String>) {
    let mut fired: Vec<(String, String)> = fired
        .iter()
        .map(|(rule_id, reason)| (rule_id.clone(), reason_with_detail(rule_id, reason, ndoo)))
        .collect();
    fired.sort();
    fired.dedup_by(|a, b| a.0 == b.0);
    fired.into_iter().unzip()
}

/// NDOO-6 says *why* the cache failed: its age against the allowed maximum.
fn reason_with_detail(rule_id: &str, reason: &str, ndoo: NdooFreshness) -> String {
    if rule_id != "NDOO-6" {
        return reason.to_owned();
    }
    match ndoo {
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

/// The decision in words an IG officer understands.
pub fn explain(decision: &Decision) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Decision for a {} record submitted by {}, made {} under policy bundle {}.",
        decision.resource_type,
        decision.submitter,
        decision
            .decided_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        decision.policy_version
    );
    if decision.sensitive_categories.is_empty() {
        let _ = writeln!(
            out,
            "The record contains no code from the sensitive code lists."
        );
    } else {
        let _ = writeln!(
            out,
            "The record contains sensitive codes ({}): it is withheld, as a whole, from everyone the policy does not explicitly allow (SENS-1).",
            decision.sensitive_categories.join(", ")
        );
    }
    let _ = writeln!(out);
    if decision.deliver_to.is_empty() {
        let _ = writeln!(out, "Shared for direct care with: nobody.");
    } else {
        let _ = writeln!(out, "Shared for direct care with:");
        for delivery in &decision.deliver_to {
            let _ = writeln!(
                out,
                "  - {} under agreement {}, because:",
                delivery.partner, delivery.agreement
            );
            for (rule, reason) in delivery.rule_ids.iter().zip(&delivery.rule_reasons) {
                let _ = writeln!(out, "      [{rule}] {reason}");
            }
            if delivery.break_glass {
                let _ = writeln!(
                    out,
                    "      This is emergency (break-glass) access: it is flagged for IG review."
                );
            }
        }
    }
    if !decision.withheld.is_empty() {
        let _ = writeln!(out, "Withheld from:");
        let mut current: Option<&PartnerId> = None;
        for withheld in &decision.withheld {
            if current != Some(&withheld.partner) {
                current = Some(&withheld.partner);
                match &withheld.agreement {
                    Some(agreement) => {
                        let _ = writeln!(
                            out,
                            "  - {} (judged under agreement {agreement}), because:",
                            withheld.partner
                        );
                    }
                    None => {
                        let _ = writeln!(out, "  - {}, because:", withheld.partner);
                    }
                }
            }
            let _ = writeln!(out, "      [{}] {}", withheld.rule_id, withheld.reason);
        }
    }
    if !decision.feeds.is_empty() {
        let _ = writeln!(out, "Secondary-use (analytics) feeds:");
        for feed in &decision.feeds {
            let verdict = if feed.included {
                "included"
            } else {
                "excluded"
            };
            let _ = writeln!(
                out,
                "  - {} for {}: {verdict} (agreement {}), because:",
                feed.feed, feed.recipient, feed.agreement
            );
            for (rule, reason) in feed.rule_ids.iter().zip(&feed.reasons) {
                let _ = writeln!(out, "      [{rule}] {reason}");
            }
        }
    }
    if decision.break_glass {
        let _ = writeln!(
            out,
            "\nBREAK-GLASS: at least one delivery relied on emergency access (LR-2). Stated reason: {}. The organisation's Privacy Officer must review it.",
            decision
                .break_glass_reason
                .as_deref()
                .unwrap_or("(none given)")
        );
    } else if decision.break_glass_reason.is_some() {
        let _ = writeln!(
            out,
            "\nBreak-glass was requested but not needed or not permitted; see above."
        );
    }
    out
}
