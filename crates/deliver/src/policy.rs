//! The policy as delivery sees it: who a committed record goes to, and whether that still holds
//! when it is about to leave (DESIGN.md invariant 2: a record reaches a partner only if the policy
//! allowed it at intake **and** consent still allows it at delivery).
//!
//! The gateway implements [`DeliveryPolicy`] with the consent/IG policy engine; this crate does
//! not depend on it. [`StoredDecisionPolicy`] reads only the decision stored with the record and a
//! list of withdrawn consents — what the tests and the engine-less gateway use.

use std::collections::HashSet;
use std::sync::RwLock;

use caregate_store::LogEntry;
use serde::Deserialize;

/// The answer of a delivery-time check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recheck {
    Allowed,
    /// Do not send. `rule_id` and `reason` go to the audit event; neither may hold patient data.
    Withheld {
        rule_id: String,
        reason: String,
    },
    /// This instance cannot tell yet: its consent state has not caught up with the log as far as
    /// this record (several instances on one database). Neither sent nor withheld; asked again
    /// shortly, the row stays pending, so per-patient order holds.
    NotYet,
}

/// What delivery needs from the policy. Implementations must be cheap and must not block for
/// long: they are called on the async runtime for every record sent or served.
pub trait DeliveryPolicy: Send + Sync + 'static {
    /// Destinations (partner ids) chosen at intake for this committed record, from its stored
    /// decision. None when the record carries no decision (nothing is delivered).
    fn destinations(&self, entry: &LogEntry) -> Vec<String>;

    /// Re-evaluate at delivery time against current consent and policy version.
    fn recheck(&self, entry: &LogEntry, partner: &str) -> Recheck;
}

/// Rule id when the stored decision does not (or no longer) list the destination.
pub const RULE_NOT_IN_DECISION: &str = "DELIVER-NOT-IN-DECISION";
/// Rule id when the patient's consent was withdrawn after intake.
pub const RULE_CONSENT_WITHDRAWN: &str = "CONSENT-WITHDRAWN";

/// The part of the policy crate's `Decision` JSON delivery reads: `deliver_to` is a list of
/// objects with a `partner` field (matches `caregate_policy::decision::Decision`, which
/// serialises `PartnerId` as a plain string). Other fields are ignored.
#[derive(Debug, Deserialize)]
struct StoredDecision {
    #[serde(default)]
    deliver_to: Vec<StoredDelivery>,
}

#[derive(Debug, Deserialize)]
struct StoredDelivery {
    partner: String,
}

/// Partners listed in a stored decision. A missing or unreadable decision routes nothing (fail
/// closed); the caller logs it by sequence number only.
pub fn decision_destinations(entry: &LogEntry) -> Option<Vec<String>> {
    let bytes = entry.decision.as_deref()?;
    let decision: StoredDecision = serde_json::from_slice(bytes).ok()?;
    Some(
        decision
            .deliver_to
            .into_iter()
            .map(|delivery| delivery.partner)
            .collect(),
    )
}

/// Delivers what the stored decision says, unless the record's patient is on the withdrawal list.
#[derive(Debug, Default)]
pub struct StoredDecisionPolicy {
    /// NHS numbers whose consent to sharing was withdrawn after intake.
    withdrawn: RwLock<HashSet<String>>,
}

impl StoredDecisionPolicy {
    pub fn new() -> Self {
        Self::default()
    }

    /// Withdraw consent for a patient: records about them not yet delivered are withheld.
    pub fn withdraw(&self, nhs_number: &str) {
        if let Ok(mut withdrawn) = self.withdrawn.write() {
            withdrawn.insert(nhs_number.to_owned());
        }
    }

    fn is_withdrawn(&self, nhs_number: &str) -> bool {
        // A poisoned lock fails closed: treat every patient as withdrawn.
        self.withdrawn
            .read()
            .map_or(true, |withdrawn| withdrawn.contains(nhs_number))
    }
}

impl DeliveryPolicy for StoredDecisionPolicy {
    fn destinations(&self, entry: &LogEntry) -> Vec<String> {
        decision_destinations(entry).unwrap_or_default()
    }

    fn recheck(&self, entry: &LogEntry, partner: &str) -> Recheck {
        let listed = decision_destinations(entry)
            .is_some_and(|partners| partners.iter().any(|p| p == partner));
        if !listed {
            return Recheck::Withheld {
                rule_id: RULE_NOT_IN_DECISION.to_owned(),
                reason: "the record's stored decision does not list this partner".to_owned(),
            };
        }
        if entry
            .nhs_number
            .as_deref()
            .is_some_and(|nhs_number| self.is_withdrawn(nhs_number))
        {
            return Recheck::Withheld {
                rule_id: RULE_CONSENT_WITHDRAWN.to_owned(),
                reason: "the patient withdrew consent to sharing after the record was accepted"
                    .to_owned(),
            };
        }
        Recheck::Allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    fn entry(decision: Option<&str>, nhs_number: Option<&str>) -> LogEntry {
        LogEntry {
            seq: 1,
            partner: "gp-a81001".into(),
            resource_type: "Observation".into(),
            id: "o1".into(),
            version_id: 1,
            content: b"{}".to_vec(),
            content_hash: [0; 32],
            nhs_number: nhs_number.map(str::to_owned),
            decision: decision.map(|d| d.as_bytes().to_vec()),
            committed_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn destinations_follow_the_policy_decision_shape() {
        let decision = r#"{"policy_version":"sha256:x","deliver_to":[
            {"partner":"trust-rx1","agreement":"dsa-1","purpose":"direct-care","rule_ids":["LR-1"],
             "rule_reasons":["x"],"break_glass":false},
            {"partner":"pharmacy-fa123","agreement":"dsa-2"}],"withheld":[]}"#;
        let policy = StoredDecisionPolicy::new();
        assert_eq!(
            policy.destinations(&entry(Some(decision), None)),
            ["trust-rx1", "pharmacy-fa123"]
        );
    }

    #[test]
    fn invariant_2_no_or_bad_decision_routes_nowhere() {
        let policy = StoredDecisionPolicy::new();
        assert!(policy.destinations(&entry(None, None)).is_empty());
        assert!(
            policy
                .destinations(&entry(Some("not json"), None))
                .is_empty()
        );
    }

    #[test]
    fn invariant_2_withdrawal_after_intake_withholds() {
        let decision = r#"{"deliver_to":[{"partner":"trust-rx1"}]}"#;
        let policy = StoredDecisionPolicy::new();
        let record = entry(Some(decision), Some("9434765919"));
        assert_eq!(policy.recheck(&record, "trust-rx1"), Recheck::Allowed);
        assert!(matches!(
            policy.recheck(&record, "someone-else"),
            Recheck::Withheld { rule_id, .. } if rule_id == RULE_NOT_IN_DECISION
        ));
        policy.withdraw("9434765919");
        assert!(matches!(
            policy.recheck(&record, "trust-rx1"),
            Recheck::Withheld { rule_id, .. } if rule_id == RULE_CONSENT_WITHDRAWN
        ));
    }
}
