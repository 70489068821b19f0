//! The console's pages. Each function takes plain data and returns the page's HTML; every value
//! goes through [`escape`].

use std::fmt::Write as _;

use caregate_audit::report::{SubjectAccessReport, is_break_glass};
use caregate_audit::{Action, AuditEvent, Outcome};
use caregate_store::sqlite::AuditVerification;
use caregate_store::{AuditReview, Seq, StoredAuditEvent};
use time::format_description::well_known::Rfc3339;

use super::{Viewer, escape, layout, query_value};

/// Actions an officer can filter on, with their labels.
pub const ACTIONS: [(Action, &str, &str); 10] = [
    (Action::Read, "read", "Read (record viewed or received)"),
    (Action::Create, "create", "Create (record sent)"),
    (Action::Update, "update", "Update (record changed)"),
    (Action::BundleSubmit, "bundle-submit", "Bundle submitted"),
    (
        Action::TokenRequest,
        "token-request",
        "Access token request",
    ),
    (Action::Metadata, "metadata", "Capability / discovery"),
    (Action::Request, "request", "Other request"),
    (Action::AuditQuery, "audit-query", "Audit log searched"),
    (Action::Export, "export", "Audit export"),
    (Action::Review, "review", "Break-glass review"),
];

const OUTCOMES: [(Outcome, &str, &str); 3] = [
    (Outcome::Success, "success", "Success"),
    (Outcome::Rejected, "rejected", "Refused (caller's error)"),
    (Outcome::Failed, "failed", "Failed (gateway error)"),
];

fn action_name(action: Action) -> &'static str {
    ACTIONS
        .iter()
        .find(|(a, _, _)| *a == action)
        .map_or("?", |(_, name, _)| name)
}

fn outcome_name(outcome: Outcome) -> &'static str {
    OUTCOMES
        .iter()
        .find(|(o, _, _)| *o == outcome)
        .map_or("?", |(_, name, _)| name)
}

fn timestamp(event: &AuditEvent) -> String {
    event
        .recorded
        .format(&Rfc3339)
        .unwrap_or_else(|_| event.recorded.unix_timestamp().to_string())
}

/// The search form's fields as the officer typed them (echoed back, escaped).
#[derive(Debug, Clone, Default)]
pub struct SearchForm {
    pub patient: String,
    pub partner: String,
    pub from: String,
    pub to: String,
    pub action: String,
    pub outcome: String,
    pub break_glass: bool,
}

impl SearchForm {
    /// The form as a query string (without `?`), for export links and the next page.
    pub fn query_string(&self) -> String {
        let mut parts = Vec::new();
        for (key, value) in [
            ("patient", &self.patient),
            ("partner", &self.partner),
            ("from", &self.from),
            ("to", &self.to),
            ("action", &self.action),
            ("outcome", &self.outcome),
        ] {
            if !value.is_empty() {
                parts.push(format!("{key}={}", query_value(value)));
            }
        }
        if self.break_glass {
            parts.push("break_glass=true".to_owned());
        }
        parts.join("&")
    }
}

fn text_input(out: &mut String, id: &str, label: &str, value: &str, kind: &str, hint: &str) {
    let _ = write!(
        out,
        "<div><label for=\"{id}\">{label}</label><input id=\"{id}\" name=\"{id}\" type=\"{kind}\" \
         value=\"{}\" aria-describedby=\"{id}-hint\"><small id=\"{id}-hint\">{hint}</small></div>",
        escape(value)
    );
}

fn select(out: &mut String, id: &str, label: &str, value: &str, options: &[(&str, &str)]) {
    let _ = write!(
        out,
        "<div><label for=\"{id}\">{label}</label><select id=\"{id}\" name=\"{id}\"><option value=\"\">Any</option>"
    );
    for (name, text) in options {
        let selected = if *name == value { " selected" } else { "" };
        let _ = write!(out, "<option value=\"{name}\"{selected}>{text}</option>");
    }
    out.push_str("</select></div>");
}

fn error_box(out: &mut String, error: Option<&str>) {
    if let Some(error) = error {
        let _ = write!(
            out,
            "<div class=\"error\" role=\"alert\"><p>{}</p></div>",
            escape(error)
        );
    }
}

/// One page of results.
#[derive(Debug)]
pub struct Results<'a> {
    pub events: &'a [StoredAuditEvent],
    pub reviews: &'a [AuditReview],
    pub next: Option<Seq>,
}

fn events_table(out: &mut String, caption: &str, results: &Results<'_>) {
    if results.events.is_empty() {
        out.push_str("<p class=\"notice\">No events match.</p>");
        return;
    }
    let _ = write!(
        out,
        "<table><caption>{}</caption><thead><tr>\
         <th scope=\"col\">Seq</th><th scope=\"col\">Recorded (UTC)</th><th scope=\"col\">Who</th>\
         <th scope=\"col\">Action</th><th scope=\"col\">Outcome</th><th scope=\"col\">Record</th>\
         <th scope=\"col\">Patient</th><th scope=\"col\">Purpose</th><th scope=\"col\">Review</th>\
         </tr></thead><tbody>",
        escape(caption)
    );
    for stored in results.events {
        let event = &stored.event;
        let break_glass = is_break_glass(event);
        let who = event
            .actor
            .partner_id
            .as_deref()
            .or(event.actor.client_id.as_deref())
            .unwrap_or("(unauthenticated)");
        let ods = event
            .actor
            .ods_code
            .as_deref()
            .map(|ods| format!(" <small>ODS {}</small>", escape(ods)))
            .unwrap_or_default();
        let record = event
            .entity
            .as_ref()
            .map(|e| format!("{}/{}", e.resource_type, e.id))
            .unwrap_or_default();
        let purpose = match (&event.purpose_of_use, break_glass) {
            (Some(purpose), true) => format!(
                "{} <span class=\"tag warn\">break-glass</span>",
                escape(purpose)
            ),
            (Some(purpose), false) => escape(purpose),
            (None, _) => String::new(),
        };
        let review = match results.reviews.iter().find(|r| r.seq == stored.seq) {
            Some(review) => format!(
                "<span class=\"tag ok\">reviewed</span> by {}",
                escape(&review.reviewer)
            ),
            None if break_glass => "<span class=\"tag warn\">awaiting review</span>".to_owned(),
            None => String::new(),
        };
        let _ = write!(
            out,
            "<tr{}><td><a href=\"/console/events/{seq}\">{seq}</a></td><td>{}</td><td>{}{ods}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{purpose}</td><td>{review}</td></tr>",
            if break_glass { " class=\"bg\"" } else { "" },
            escape(&timestamp(event)),
            escape(who),
            action_name(event.action),
            outcome_name(event.outcome),
            escape(&record),
            escape(event.patient.as_deref().unwrap_or("")),
            seq = stored.seq,
        );
    }
    out.push_str("</tbody></table>");
}

/// The search page: the form, and the results when a search was made.
pub fn search(
    viewer: &Viewer<'_>,
    form: &SearchForm,
    results: Option<&Results<'_>>,
    error: Option<&str>,
) -> String {
    let mut body = String::new();
    error_box(&mut body, error);
    body.push_str(
        "<form class=\"search\" method=\"get\" action=\"/console\" role=\"search\" aria-label=\"Search audit events\">",
    );
    text_input(
        &mut body,
        "patient",
        "NHS number",
        &form.patient,
        "text",
        "10 digits",
    );
    text_input(
        &mut body,
        "partner",
        "Partner id",
        &form.partner,
        "text",
        "e.g. trust-rx1",
    );
    text_input(
        &mut body,
        "from",
        "From (UTC)",
        &form.from,
        "text",
        "YYYY-MM-DD or RFC 3339",
    );
    text_input(
        &mut body,
        "to",
        "To (UTC, inclusive day)",
        &form.to,
        "text",
        "YYYY-MM-DD or RFC 3339",
    );
    let actions: Vec<(&str, &str)> = ACTIONS.iter().map(|(_, n, t)| (*n, *t)).collect();
    select(&mut body, "action", "Action", &form.action, &actions);
    let outcomes: Vec<(&str, &str)> = OUTCOMES.iter().map(|(_, n, t)| (*n, *t)).collect();
    select(&mut body, "outcome", "Outcome", &form.outcome, &outcomes);
    let _ = write!(
        body,
        "<div><input id=\"break_glass\" name=\"break_glass\" type=\"checkbox\" value=\"true\"{}> \
         <label for=\"break_glass\" style=\"display:inline\">Break-glass only</label></div>\
         <div><button type=\"submit\">Search</button></div></form>",
        if form.break_glass { " checked" } else { "" }
    );
    if let Some(results) = results {
        let query = form.query_string();
        let _ = write!(
            body,
            "<p><a class=\"button secondary\" href=\"/admin/audit/export.csv?{q}\">Export CSV</a> \
             <a class=\"button secondary\" href=\"/admin/audit/export.ndjson?{q}\">Export FHIR AuditEvent NDJSON</a></p>",
            q = escape(&query)
        );
        events_table(&mut body, "Matching audit events, oldest first", results);
        if let Some(next) = results.next {
            let separator = if query.is_empty() { "" } else { "&" };
            let _ = write!(
                body,
                "<p><a href=\"/console?{}{separator}after={next}\">Next page</a></p>",
                escape(&query)
            );
        }
    }
    layout("Search audit events", Some(viewer), &body)
}

/// One event with its decision explanation and review.
pub fn event(
    viewer: &Viewer<'_>,
    stored: &StoredAuditEvent,
    review: Option<&AuditReview>,
) -> String {
    let event = &stored.event;
    let mut body = String::from("<dl>");
    let mut row = |term: &str, value: &str| {
        let _ = write!(body, "<dt>{term}</dt><dd>{}</dd>", escape(value));
    };
    row("Sequence number", &stored.seq.to_string());
    row("Recorded (UTC)", &timestamp(event));
    row("Request id", &event.request_id);
    row("Action", action_name(event.action));
    row("Outcome", outcome_name(event.outcome));
    if let Some(status) = event.status {
        row("HTTP status", &status.to_string());
    }
    row(
        "Partner",
        event.actor.partner_id.as_deref().unwrap_or("(none)"),
    );
    row("ODS code", event.actor.ods_code.as_deref().unwrap_or(""));
    row("Client id", event.actor.client_id.as_deref().unwrap_or(""));
    row(
        "Remote address",
        event.actor.remote_addr.as_deref().unwrap_or(""),
    );
    if let Some(entity) = &event.entity {
        let version = entity
            .version_id
            .map(|v| format!(" (version {v})"))
            .unwrap_or_default();
        row(
            "Record",
            &format!("{}/{}{version}", entity.resource_type, entity.id),
        );
        if let Some(hash) = &entity.content_hash {
            row("Content SHA-256", hash);
        }
    }
    row(
        "Patient (NHS number)",
        event.patient.as_deref().unwrap_or(""),
    );
    row(
        "Purpose of use",
        event.purpose_of_use.as_deref().unwrap_or("(not stated)"),
    );
    row("Detail", event.detail.as_deref().unwrap_or(""));
    body.push_str("</dl><h2>Decision explanation</h2>");
    match (&event.policy_version, event.rule_ids.is_empty()) {
        (None, true) => body.push_str(
            "<p>No policy decision is recorded with this event (requests before the policy stage, \
             or not about a record).</p>",
        ),
        (version, _) => {
            let _ = write!(
                body,
                "<p>Policy version: <strong>{}</strong></p>",
                escape(version.as_deref().unwrap_or("(not recorded)"))
            );
            if event.rule_ids.is_empty() {
                body.push_str("<p>No rules fired.</p>");
            } else {
                body.push_str("<p>Rules that fired:</p><ul>");
                for rule in &event.rule_ids {
                    let _ = write!(body, "<li><code>{}</code></li>", escape(rule));
                }
                body.push_str("</ul>");
            }
        }
    }
    if is_break_glass(event) {
        body.push_str("<h2>Break-glass review</h2>");
        match review {
            Some(review) => review_summary(&mut body, review),
            None => review_form(&mut body, viewer.csrf, stored.seq),
        }
    }
    layout(&format!("Audit event {}", stored.seq), Some(viewer), &body)
}

fn review_summary(body: &mut String, review: &AuditReview) {
    let at = review.reviewed_at.format(&Rfc3339).unwrap_or_default();
    let _ = write!(
        body,
        "<p><span class=\"tag ok\">reviewed</span> by {} at {}</p><p>Note: {}</p>",
        escape(&review.reviewer),
        escape(&at),
        escape(&review.note)
    );
}

fn review_form(body: &mut String, csrf: &str, seq: Seq) {
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/console/reviews\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"seq\" value=\"{seq}\">\
         <label for=\"note-{seq}\">Review note for event {seq} (e.g. the attendance record checked)</label>\
         <textarea id=\"note-{seq}\" name=\"note\" rows=\"2\" maxlength=\"1000\" required></textarea>\
         <button type=\"submit\">Mark event {seq} as reviewed</button></form>",
        escape(csrf)
    );
}

/// The break-glass review queue.
pub fn reviews(
    viewer: &Viewer<'_>,
    awaiting: &[StoredAuditEvent],
    next: Option<Seq>,
    message: Option<&str>,
) -> String {
    let mut body = String::from(
        "<p>Emergency (break-glass) accesses — purpose of use ETREAT or BTG — must be reviewed \
         against attendance records by the organisation's privacy officer (DOMAIN LR-2). Marking an \
         event reviewed is itself recorded in the audit log.</p>",
    );
    if let Some(message) = message {
        let _ = write!(
            body,
            "<p class=\"notice\" role=\"status\">{}</p>",
            escape(message)
        );
    }
    if awaiting.is_empty() {
        body.push_str("<p class=\"notice\">No break-glass accesses are awaiting review.</p>");
    } else {
        let _ = write!(
            body,
            "<table><caption>Break-glass accesses awaiting review, oldest first</caption><thead><tr>\
             <th scope=\"col\">Seq</th><th scope=\"col\">Recorded (UTC)</th><th scope=\"col\">Who</th>\
             <th scope=\"col\">Record</th><th scope=\"col\">Patient</th><th scope=\"col\">Purpose</th>\
             <th scope=\"col\">Mark reviewed</th></tr></thead><tbody>"
        );
        for stored in awaiting {
            let event = &stored.event;
            let record = event
                .entity
                .as_ref()
                .map(|e| format!("{}/{}", e.resource_type, e.id))
                .unwrap_or_default();
            let mut form = String::new();
            review_form(&mut form, viewer.csrf, stored.seq);
            let _ = write!(
                body,
                "<tr class=\"bg\"><td><a href=\"/console/events/{seq}\">{seq}</a></td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{form}</td></tr>",
                escape(&timestamp(event)),
                escape(event.actor.partner_id.as_deref().unwrap_or("")),
                escape(&record),
                escape(event.patient.as_deref().unwrap_or("")),
                escape(event.purpose_of_use.as_deref().unwrap_or("")),
                seq = stored.seq,
            );
        }
        body.push_str("</tbody></table>");
        if let Some(next) = next {
            let _ = write!(
                body,
                "<p><a href=\"/console/reviews?after={next}\">More awaiting review</a></p>"
            );
        }
    }
    layout("Break-glass reviews", Some(viewer), &body)
}

/// The subject-access report page: a form, and the report when one was asked for.
pub fn sar(
    viewer: &Viewer<'_>,
    patient: &str,
    report: Option<&SubjectAccessReport>,
    error: Option<&str>,
) -> String {
    let mut body = String::from(
        "<p>Who sent, received or viewed records about one patient, when and why — for a subject \
         access request (UK GDPR Art 15(1)(c); answer within one month).</p>",
    );
    error_box(&mut body, error);
    body.push_str("<form class=\"search\" method=\"get\" action=\"/console/sar\">");
    text_input(
        &mut body,
        "patient",
        "NHS number",
        patient,
        "text",
        "10 digits",
    );
    body.push_str("<div><button type=\"submit\">Build report</button></div></form>");
    if let Some(report) = report {
        let q = format!("patient={}", query_value(&report.patient));
        let _ = write!(
            body,
            "<p><a class=\"button secondary\" href=\"/admin/audit/sar.txt?{q}\">Download as text</a> \
             <a class=\"button secondary\" href=\"/admin/audit/export.csv?{q}\">Export CSV</a> \
             <a class=\"button secondary\" href=\"/admin/audit/export.ndjson?{q}\">Export FHIR NDJSON</a></p>\
             <h2>Organisations that received or viewed these records</h2>",
            q = escape(&q)
        );
        summary_table(&mut body, &report.recipients, "Recipients");
        body.push_str("<h2>Organisations that sent records about this patient</h2>");
        summary_table(&mut body, &report.sources, "Sources");
        let _ = write!(
            body,
            "<h2>Full report ({} events)</h2><pre>{}</pre>",
            report.total_events,
            escape(&report.to_text())
        );
    }
    layout("Subject access report", Some(viewer), &body)
}

fn summary_table(
    body: &mut String,
    rows: &[caregate_audit::report::OrganisationSummary],
    caption: &str,
) {
    if rows.is_empty() {
        body.push_str("<p>None.</p>");
        return;
    }
    let _ = write!(
        body,
        "<table><caption>{caption}</caption><thead><tr><th scope=\"col\">Organisation</th>\
         <th scope=\"col\">ODS code</th><th scope=\"col\">Events</th><th scope=\"col\">First</th>\
         <th scope=\"col\">Last</th></tr></thead><tbody>"
    );
    for row in rows {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&row.organisation),
            escape(row.ods_code.as_deref().unwrap_or("")),
            row.events,
            escape(&row.first.format(&Rfc3339).unwrap_or_default()),
            escape(&row.last.format(&Rfc3339).unwrap_or_default()),
        );
    }
    body.push_str("</tbody></table>");
}

/// The chain verification page.
pub fn verify(viewer: &Viewer<'_>, result: Result<&AuditVerification, &str>) -> String {
    let mut body = String::new();
    match result {
        Err(error) => error_box(&mut body, Some(error)),
        Ok(verification) => {
            let report = &verification.report;
            if verification.is_ok() {
                body.push_str(
                    "<p class=\"notice\" role=\"status\"><span class=\"tag ok\">VERIFIED</span> \
                     The audit log matches its Merkle tree and every signed checkpoint.</p>",
                );
            } else {
                body.push_str(
                    "<div class=\"error\" role=\"alert\"><p><span class=\"tag bad\">FAILED</span> \
                     The audit log was altered. Keep a copy of the data directory and escalate.</p></div>",
                );
            }
            body.push_str("<dl>");
            let mut row = |term: &str, value: String| {
                let _ = write!(body, "<dt>{term}</dt><dd>{}</dd>", escape(&value));
            };
            row("Events", report.events.to_string());
            row("Tree size", report.tree_size.to_string());
            row("Root hash", report.root.to_hex());
            row(
                "Checkpoints",
                format!(
                    "{} matched of {} stored",
                    report.checkpoints_matched, report.checkpoints_given
                ),
            );
            row(
                "Attested",
                format!(
                    "events 1 to {} are proven by a signed checkpoint",
                    report.attested_size
                ),
            );
            if let Some(seq) = report.first_bad_seq {
                row("First bad event", seq.to_string());
            }
            body.push_str("</dl>");
            if !report.findings.is_empty() || !verification.column_mismatches.is_empty() {
                body.push_str("<h2>Findings</h2><ul>");
                for finding in &report.findings {
                    let _ = write!(body, "<li>{}</li>", escape(&finding.to_string()));
                }
                for seq in &verification.column_mismatches {
                    let _ = write!(
                        body,
                        "<li>event {seq}: a query column differs from the signed event</li>"
                    );
                }
                body.push_str("</ul>");
            }
            if let Some(checkpoint) = &verification.latest_checkpoint {
                let _ = write!(
                    body,
                    "<h2>Latest signed checkpoint</h2><p>Hand this to another organisation as a witness.</p><pre>{}</pre>",
                    escape(checkpoint)
                );
            }
        }
    }
    layout("Chain verification", Some(viewer), &body)
}

/// The sign-in page.
pub fn login(csrf: &str, error: Option<&str>) -> String {
    let mut body = String::new();
    error_box(&mut body, error);
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/console/login\" style=\"max-width:22rem\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <p><label for=\"username\">Username</label>\
         <input id=\"username\" name=\"username\" autocomplete=\"username\" required autofocus></p>\
         <p><label for=\"password\">Password</label>\
         <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required></p>\
         <p><button type=\"submit\">Sign in</button></p></form>\
         <p>For information governance officers. Every sign-in and every search is recorded in the audit log.</p>",
        escape(csrf)
    );
    layout("Sign in", None, &body)
}

/// A readable error page.
pub fn error(viewer: Option<&Viewer<'_>>, title: &str, message: &str) -> String {
    let body = format!(
        "<div class=\"error\" role=\"alert\"><p>{}</p></div><p><a href=\"/console\">Back to search</a></p>",
        escape(message)
    );
    layout(title, viewer, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use caregate_audit::{Actor, Entity};

    fn viewer() -> Viewer<'static> {
        Viewer {
            username: "alice",
            name: "Alice <IG>",
            ods_code: "A81001",
            csrf: "tok\"en",
        }
    }

    fn hostile_event() -> StoredAuditEvent {
        let mut event = AuditEvent::new(
            "<script>alert(1)</script>",
            Actor {
                client_id: Some("\"><img src=x onerror=alert(1)>".into()),
                ..Actor::default()
            },
            Action::Read,
            Outcome::Success,
        );
        event.purpose_of_use = Some("BTG".into());
        event.rule_ids = vec!["<b>rule</b>".into()];
        event.policy_version = Some("v'1".into());
        event.entity = Some(Entity {
            resource_type: "Observation".into(),
            id: "<x>".into(),
            version_id: None,
            content_hash: None,
        });
        StoredAuditEvent { seq: 3, event }
    }

    #[test]
    fn every_value_is_escaped() {
        let stored = hostile_event();
        let pages = [
            search(
                &viewer(),
                &SearchForm {
                    partner: "\"><script>".into(),
                    ..SearchForm::default()
                },
                Some(&Results {
                    events: std::slice::from_ref(&stored),
                    reviews: &[],
                    next: Some(3),
                }),
                Some("<bad>"),
            ),
            event(&viewer(), &stored, None),
            reviews(&viewer(), std::slice::from_ref(&stored), None, Some("<ok>")),
            error(Some(&viewer()), "Oops", "<script>"),
        ];
        for page in pages {
            assert!(!page.contains("<script>"), "{page}");
            assert!(!page.contains("<img"), "{page}");
            assert!(!page.contains("<b>rule"), "{page}");
            assert!(!page.contains("tok\"en"), "{page}");
        }
    }

    #[test]
    fn lr_2_break_glass_event_offers_the_review_form_with_the_csrf_token() {
        let page = event(&viewer(), &hostile_event(), None);
        assert!(page.contains("action=\"/console/reviews\""));
        assert!(page.contains("name=\"csrf\" value=\"tok&quot;en\""));
        assert!(page.contains("Rules that fired"));
    }

    #[test]
    fn controls_have_labels() {
        let page = search(&viewer(), &SearchForm::default(), None, None);
        for id in [
            "patient",
            "partner",
            "from",
            "to",
            "action",
            "outcome",
            "break_glass",
        ] {
            assert!(page.contains(&format!("<label for=\"{id}\"")), "{id}");
            assert!(page.contains(&format!("id=\"{id}\"")), "{id}");
        }
    }
}
