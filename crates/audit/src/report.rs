//! What IG officers ask of the audit log (DOMAIN.md `IGQ`): which accesses were break-glass and
//! need review (`LR-2`), and the subject-access report for one patient — who submitted, received,
//! viewed or exported records about them, when, and why (UK GDPR Art 15(1)(c): the recipients or
//! categories of recipient).
//!
//! Pure functions over events the store has read; the store pages them in, so a report is built
//! from a stream with bounded memory ([`SarBuilder`] keeps at most [`MAX_SAR_ENTRIES`] rows and
//! one summary per organisation).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::{Action, AuditEvent, Outcome};

/// Purposes of use that mean emergency access ("break the glass"): v3 ActReason `ETREAT`
/// (emergency treatment) and `BTG` (DOMAIN.md `POU`; where `BTG` is defined is unverified). Such
/// accesses alert the organisation's privacy officer, who reviews them (`LR-2`).
pub const BREAK_GLASS_PURPOSES: [&str; 2] = ["ETREAT", "BTG"];

/// Whether `event` records a break-glass access.
pub fn is_break_glass(event: &AuditEvent) -> bool {
    event
        .purpose_of_use
        .as_deref()
        .is_some_and(|purpose| BREAK_GLASS_PURPOSES.contains(&purpose))
}

/// The most rows one subject-access report holds; a patient with more events is reported with
/// `truncated` set and the officer is pointed at the CSV export, which streams.
pub const MAX_SAR_ENTRIES: usize = 50_000;

/// The most organisations summarised (bounded by the partner registry in practice).
const MAX_ORGANISATIONS: usize = 10_000;

/// What an event meant for the patient, in the report's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activity {
    /// The organisation sent a record about the patient (create, update, Bundle).
    Submitted,
    /// The organisation received or viewed a record about the patient.
    Received,
    /// An IG officer exported audit events about the patient.
    Exported,
    /// An IG officer searched the audit trail about the patient or reviewed an access.
    AuditViewed,
    /// An attempt that was refused or failed: nothing was disclosed.
    Attempted,
    /// Anything else recorded against the patient.
    Other,
}

impl Activity {
    /// The activity an event stands for.
    pub fn of(event: &AuditEvent) -> Self {
        if event.outcome != Outcome::Success {
            return Self::Attempted;
        }
        match event.action {
            Action::Create | Action::Update | Action::BundleSubmit => Self::Submitted,
            Action::Read => Self::Received,
            Action::Export => Self::Exported,
            Action::AuditQuery | Action::Review => Self::AuditViewed,
            // A delivery is the destination receiving the record (issue 4).
            Action::Deliver => Self::Received,
            Action::TokenRequest
            | Action::Metadata
            | Action::Request
            | Action::Withhold
            | Action::DeliveryReplay
            | Action::PolicyReload
            | Action::ExportExpiry => Self::Other,
        }
    }

    /// Plain words for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Submitted => "sent a record",
            Self::Received => "received or viewed a record",
            Self::Exported => "exported audit records",
            Self::AuditViewed => "looked at the access log",
            Self::Attempted => "attempted access (refused or failed; nothing disclosed)",
            Self::Other => "other",
        }
    }
}

/// Who acted, as the report names them: the partner id, or the IG officer's client id.
fn organisation_name(event: &AuditEvent) -> String {
    event
        .actor
        .partner_id
        .clone()
        .or_else(|| event.actor.client_id.clone())
        .unwrap_or_else(|| "(unauthenticated)".to_owned())
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SarEntry {
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub recorded: OffsetDateTime,
    pub organisation: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ods_code: Option<String>,
    pub activity: Activity,
    pub action: Action,
    pub outcome: Outcome,
    /// `Type/id` of the record concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose_of_use: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rule_ids: Vec<String>,
    pub break_glass: bool,
}

/// What one organisation did with the patient's records, in one activity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrganisationSummary {
    pub organisation: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ods_code: Option<String>,
    pub events: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub first: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last: OffsetDateTime,
}

/// The subject-access report for one patient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubjectAccessReport {
    /// The patient's NHS number (the report goes to the patient or their representative).
    pub patient: String,
    #[serde(with = "time::serde::rfc3339")]
    pub generated: OffsetDateTime,
    /// Organisations that received or viewed records about the patient (the recipients).
    pub recipients: Vec<OrganisationSummary>,
    /// Organisations that sent records about the patient.
    pub sources: Vec<OrganisationSummary>,
    /// Every event about the patient, oldest first (at most [`MAX_SAR_ENTRIES`]).
    pub entries: Vec<SarEntry>,
    /// Events counted in total (may exceed `entries.len()` when truncated).
    pub total_events: u64,
    pub truncated: bool,
}

/// Builds a [`SubjectAccessReport`] from events pushed in sequence order.
#[derive(Debug)]
pub struct SarBuilder {
    patient: String,
    generated: OffsetDateTime,
    summaries: BTreeMap<(Activity, String), OrganisationSummary>,
    entries: Vec<SarEntry>,
    total_events: u64,
    truncated: bool,
}

impl SarBuilder {
    pub fn new(patient: impl Into<String>, generated: OffsetDateTime) -> Self {
        Self {
            patient: patient.into(),
            generated,
            summaries: BTreeMap::new(),
            entries: Vec::new(),
            total_events: 0,
            truncated: false,
        }
    }

    /// Add one event. Events about another patient are ignored (the query should not send them).
    pub fn push(&mut self, seq: u64, event: &AuditEvent) {
        if event.patient.as_deref() != Some(self.patient.as_str()) {
            return;
        }
        self.total_events += 1;
        let activity = Activity::of(event);
        let organisation = organisation_name(event);
        if matches!(activity, Activity::Submitted | Activity::Received) {
            let key = (activity, organisation.clone());
            if let Some(summary) = self.summaries.get_mut(&key) {
                summary.events += 1;
                summary.first = summary.first.min(event.recorded);
                summary.last = summary.last.max(event.recorded);
            } else if self.summaries.len() < MAX_ORGANISATIONS {
                self.summaries.insert(
                    key,
                    OrganisationSummary {
                        organisation: organisation.clone(),
                        ods_code: event.actor.ods_code.clone(),
                        events: 1,
                        first: event.recorded,
                        last: event.recorded,
                    },
                );
            } else {
                self.truncated = true;
            }
        }
        if self.entries.len() >= MAX_SAR_ENTRIES {
            self.truncated = true;
            return;
        }
        self.entries.push(SarEntry {
            seq,
            recorded: event.recorded,
            organisation,
            ods_code: event.actor.ods_code.clone(),
            activity,
            action: event.action,
            outcome: event.outcome,
            resource: event
                .entity
                .as_ref()
                .map(|entity| format!("{}/{}", entity.resource_type, entity.id)),
            purpose_of_use: event.purpose_of_use.clone(),
            policy_version: event.policy_version.clone(),
            rule_ids: event.rule_ids.clone(),
            break_glass: is_break_glass(event),
        });
    }

    pub fn finish(self) -> SubjectAccessReport {
        let mut recipients = Vec::new();
        let mut sources = Vec::new();
        for ((activity, _), summary) in self.summaries {
            match activity {
                Activity::Received => recipients.push(summary),
                _ => sources.push(summary),
            }
        }
        SubjectAccessReport {
            patient: self.patient,
            generated: self.generated,
            recipients,
            sources,
            entries: self.entries,
            total_events: self.total_events,
            truncated: self.truncated,
        }
    }
}

/// An NHS number as people write it: `943 476 5919`.
fn spaced_nhs_number(number: &str) -> String {
    if number.len() == 10 && number.bytes().all(|b| b.is_ascii_digit()) {
        format!("{} {} {}", &number[..3], &number[3..6], &number[6..])
    } else {
        number.to_owned()
    }
}

fn timestamp(at: OffsetDateTime) -> String {
    // Events were parsed from RFC 3339, so they format back; the fallback is never expected.
    at.format(&Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

fn summary_line(out: &mut String, summary: &OrganisationSummary, noun: &str) {
    let ods = summary
        .ods_code
        .as_deref()
        .map(|ods| format!(" (ODS {ods})"))
        .unwrap_or_default();
    let plural = match (summary.events, noun) {
        (1, _) => "",
        (_, "access") => "es",
        _ => "s",
    };
    let _ = writeln!(
        out,
        "  - {}{ods}: {} {noun}{plural}, {} to {}",
        summary.organisation,
        summary.events,
        timestamp(summary.first),
        timestamp(summary.last)
    );
}

impl SubjectAccessReport {
    /// The report as plain text, for an IG officer to check and send.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Subject access report: who has sent, received or viewed records about NHS number {}",
            spaced_nhs_number(&self.patient)
        );
        let _ = writeln!(
            out,
            "Generated {} from caregate's audit log ({} events).",
            timestamp(self.generated),
            self.total_events
        );
        if self.truncated {
            let _ = writeln!(
                out,
                "NOTE: the list below is incomplete (more than {MAX_SAR_ENTRIES} events); use the CSV export for every event."
            );
        }
        out.push('\n');
        out.push_str("Organisations that received or viewed these records:\n");
        if self.recipients.is_empty() {
            out.push_str("  (none)\n");
        }
        for summary in &self.recipients {
            summary_line(&mut out, summary, "access");
        }
        out.push('\n');
        out.push_str("Organisations that sent records about this patient:\n");
        if self.sources.is_empty() {
            out.push_str("  (none)\n");
        }
        for summary in &self.sources {
            summary_line(&mut out, summary, "submission");
        }
        out.push('\n');
        out.push_str("Every recorded event, oldest first:\n");
        if self.entries.is_empty() {
            out.push_str("  (none)\n");
        }
        for entry in &self.entries {
            let ods = entry
                .ods_code
                .as_deref()
                .map(|ods| format!(" ({ods})"))
                .unwrap_or_default();
            let _ = write!(
                out,
                "  #{} {} {}{ods} {}",
                entry.seq,
                timestamp(entry.recorded),
                entry.organisation,
                entry.activity.describe()
            );
            if let Some(resource) = &entry.resource {
                let _ = write!(out, " [{resource}]");
            }
            if let Some(purpose) = &entry.purpose_of_use {
                let _ = write!(out, "; purpose {purpose}");
            }
            if entry.break_glass {
                out.push_str(" (EMERGENCY ACCESS)");
            }
            if let Some(version) = &entry.policy_version {
                let _ = write!(out, "; policy {version}");
            }
            if !entry.rule_ids.is_empty() {
                let _ = write!(out, "; rules {}", entry.rule_ids.join(", "));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Actor, Entity};
    use time::macros::datetime;

    fn event(partner: &str, ods: &str, action: Action, outcome: Outcome, minute: u8) -> AuditEvent {
        let mut event = AuditEvent::new(
            format!("req-{minute}"),
            Actor {
                partner_id: Some(partner.into()),
                ods_code: Some(ods.into()),
                ..Actor::default()
            },
            action,
            outcome,
        );
        event.recorded = datetime!(2026-01-05 09:00 UTC) + time::Duration::minutes(minute.into());
        event.patient = Some("9434765919".into());
        event.entity = Some(Entity {
            resource_type: "Observation".into(),
            id: format!("o{minute}"),
            version_id: Some(1),
            content_hash: None,
        });
        event
    }

    fn sample() -> SubjectAccessReport {
        let mut builder = SarBuilder::new("9434765919", datetime!(2026-02-01 12:00 UTC));
        builder.push(
            1,
            &event("gp-a81001", "A81001", Action::Create, Outcome::Success, 0),
        );
        let mut read = event("trust-rx1", "RX1", Action::Read, Outcome::Success, 5);
        read.purpose_of_use = Some("ETREAT".into());
        read.policy_version = Some("2026-01".into());
        read.rule_ids = vec!["LR-2".into(), "BTG-1".into()];
        builder.push(2, &read);
        builder.push(
            3,
            &event(
                "pharmacy-fa123",
                "FA123",
                Action::Read,
                Outcome::Rejected,
                6,
            ),
        );
        builder.push(
            4,
            &event("trust-rx1", "RX1", Action::Read, Outcome::Success, 9),
        );
        let mut other = event("gp-a81001", "A81001", Action::Read, Outcome::Success, 10);
        other.patient = Some("4000000004".into());
        builder.push(5, &other);
        builder.finish()
    }

    #[test]
    fn igq_recipients_are_exactly_the_organisations_that_received_records() {
        let report = sample();
        let recipients: Vec<_> = report
            .recipients
            .iter()
            .map(|r| (r.organisation.as_str(), r.events))
            .collect();
        assert_eq!(recipients, [("trust-rx1", 2)]);
        let sources: Vec<_> = report
            .sources
            .iter()
            .map(|r| r.organisation.as_str())
            .collect();
        assert_eq!(sources, ["gp-a81001"]);
        assert_eq!(
            report.total_events, 4,
            "the other patient's event is not included"
        );
        assert_eq!(report.entries[2].activity, Activity::Attempted);
        assert!(report.entries[1].break_glass);
    }

    #[test]
    fn lr_2_etreat_and_btg_are_break_glass_treat_is_not() {
        let mut event = event("trust-rx1", "RX1", Action::Read, Outcome::Success, 0);
        for (purpose, expected) in [("ETREAT", true), ("BTG", true), ("TREAT", false)] {
            event.purpose_of_use = Some(purpose.into());
            assert_eq!(is_break_glass(&event), expected, "{purpose}");
        }
        event.purpose_of_use = None;
        assert!(!is_break_glass(&event));
    }

    #[test]
    fn igq_text_report_snapshot() {
        insta::assert_snapshot!(sample().to_text());
    }

    #[test]
    fn igq_json_report_snapshot() {
        insta::assert_json_snapshot!(sample());
    }

    #[test]
    fn report_is_bounded() {
        let mut builder = SarBuilder::new("9434765919", datetime!(2026-02-01 12:00 UTC));
        let read = event("trust-rx1", "RX1", Action::Read, Outcome::Success, 0);
        for seq in 0..(MAX_SAR_ENTRIES as u64 + 5) {
            builder.push(seq, &read);
        }
        let report = builder.finish();
        assert!(report.truncated);
        assert_eq!(report.entries.len(), MAX_SAR_ENTRIES);
        assert_eq!(report.recipients[0].events, MAX_SAR_ENTRIES as u64 + 5);
    }
}
