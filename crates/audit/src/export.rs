//! Audit events for other tools: CSV rows (RFC 4180) and FHIR R4 `AuditEvent` resources for
//! NDJSON (DOMAIN.md `AUD-1`, `AUD-2`). One event at a time, so callers stream exports of any
//! size with bounded memory.
//!
//! **CSV.** RFC 4180: CRLF line ends, a header row, fields quoted when they hold `,`, `"`, CR or
//! LF, quotes doubled. Cells are also defused against spreadsheet formula injection (OWASP "CSV
//! Injection"): a cell starting with `=`, `+`, `-`, `@`, TAB or CR gets a leading `'`, so a
//! spreadsheet shows it as text instead of evaluating it. Partner-controlled text (client ids,
//! request ids) reaches these cells.
//!
//! **FHIR.** Written from the R4 AuditEvent definitions (<https://hl7.org/fhir/R4/auditevent.html>)
//! in the manner of IHE BALP: RESTful interactions are type `rest` with a `restful-interaction`
//! subtype; token requests are DICOM 110114 "User Authentication"; exports are DICOM 110106
//! "Export"; IG officers' searches and reviews are DICOM 110101 "Audit Log Used". The requesting
//! organisation is the agent with `requestor = true`, identified by its ODS code; the gateway is
//! the `source.observer`; the record is an entity (`Type/id` reference) and the patient is an
//! entity with role 1 "Patient", identified by NHS number.

use serde_json::{Map, Value, json};
use time::format_description::well_known::Rfc3339;

use crate::report::is_break_glass;
use crate::{Action, AuditEvent, Outcome};

/// Why an event could not be exported. Carries no event content.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("audit event {seq} has a timestamp that cannot be written as RFC 3339")]
    Timestamp { seq: u64 },
}

fn rfc3339(seq: u64, event: &AuditEvent) -> Result<String, ExportError> {
    event
        .recorded
        .format(&Rfc3339)
        .map_err(|_| ExportError::Timestamp { seq })
}

/// The serde name of an enum value (`bundle-submit`), as the event JSON spells it.
fn name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(name)) => name,
        _ => String::new(),
    }
}

/// CSV columns, in order.
pub const CSV_COLUMNS: [&str; 19] = [
    "seq",
    "recorded",
    "request_id",
    "action",
    "outcome",
    "status",
    "partner_id",
    "ods_code",
    "client_id",
    "remote_addr",
    "resource_type",
    "resource_id",
    "version_id",
    "patient",
    "purpose_of_use",
    "break_glass",
    "policy_version",
    "rule_ids",
    "detail",
];

/// The CSV header line (with its CRLF).
pub fn csv_header() -> String {
    let mut line = CSV_COLUMNS.join(",");
    line.push_str("\r\n");
    line
}

/// One CSV cell: defused against formula injection, then quoted if RFC 4180 needs it.
pub fn csv_cell(value: &str, out: &mut String) {
    let defuse = value
        .chars()
        .next()
        .is_some_and(|first| matches!(first, '=' | '+' | '-' | '@' | '\t' | '\r'));
    let quote =
        defuse && value.contains(['"', ',', '\r', '\n']) || value.contains(['"', ',', '\r', '\n']);
    if quote {
        out.push('"');
    }
    if defuse {
        out.push('\'');
    }
    for c in value.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    if quote {
        out.push('"');
    }
}

/// One CSV line (with its CRLF) for the event at `seq`.
pub fn csv_row(seq: u64, event: &AuditEvent) -> Result<String, ExportError> {
    let entity = event.entity.as_ref();
    let cells: [String; 19] = [
        seq.to_string(),
        rfc3339(seq, event)?,
        event.request_id.clone(),
        name(&event.action),
        name(&event.outcome),
        event.status.map(|s| s.to_string()).unwrap_or_default(),
        event.actor.partner_id.clone().unwrap_or_default(),
        event.actor.ods_code.clone().unwrap_or_default(),
        event.actor.client_id.clone().unwrap_or_default(),
        event.actor.remote_addr.clone().unwrap_or_default(),
        entity.map(|e| e.resource_type.clone()).unwrap_or_default(),
        entity.map(|e| e.id.clone()).unwrap_or_default(),
        entity
            .and_then(|e| e.version_id)
            .map(|v| v.to_string())
            .unwrap_or_default(),
        event.patient.clone().unwrap_or_default(),
        event.purpose_of_use.clone().unwrap_or_default(),
        if is_break_glass(event) {
            "true"
        } else {
            "false"
        }
        .to_owned(),
        event.policy_version.clone().unwrap_or_default(),
        event.rule_ids.join(" "),
        event.detail.clone().unwrap_or_default(),
    ];
    let mut line = String::with_capacity(256);
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        csv_cell(cell, &mut line);
    }
    line.push_str("\r\n");
    Ok(line)
}

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const AUDIT_EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const RESTFUL_INTERACTION: &str = "http://hl7.org/fhir/restful-interaction";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const SOURCE_TYPE: &str = "http://terminology.hl7.org/CodeSystem/security-source-type";
const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
const NHS_NUMBER: &str = "https://fhir.nhs.uk/Id/nhs-number";
const ODS: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({ "system": system, "code": code, "display": display })
}

/// `type`, `subtype` and `action` (C/R/U/D/E) for an action.
fn classify(action: Action) -> (Value, Option<Value>, &'static str) {
    let rest = || coding(AUDIT_EVENT_TYPE, "rest", "RESTful Operation");
    let interaction = |code: &str, display: &str| Some(coding(RESTFUL_INTERACTION, code, display));
    match action {
        Action::Create => (rest(), interaction("create", "create"), "C"),
        Action::Update => (rest(), interaction("update", "update"), "U"),
        Action::Read => (rest(), interaction("read", "read"), "R"),
        // A Bundle may hold any interaction; FHIR codes the whole as execute.
        Action::BundleSubmit => (rest(), interaction("transaction", "transaction"), "E"),
        Action::Metadata => (rest(), interaction("capabilities", "capabilities"), "R"),
        Action::Request => (rest(), None, "E"),
        Action::TokenRequest => (
            coding(DCM, "110114", "User Authentication"),
            Some(coding(DCM, "110122", "Login")),
            "E",
        ),
        Action::Export => (coding(DCM, "110106", "Export"), None, "R"),
        Action::AuditQuery => (coding(DCM, "110101", "Audit Log Used"), None, "R"),
        Action::Review => (coding(DCM, "110101", "Audit Log Used"), None, "U"),
        // Delivery (issue 4): data leaving the gateway for a partner, or held back.
        Action::Deliver | Action::Withhold => (coding(DCM, "110106", "Export"), None, "E"),
        Action::DeliveryReplay | Action::PolicyReload => (rest(), None, "E"),
        // Retention: the gateway deleted an expired export's files.
        Action::ExportExpiry => (rest(), None, "D"),
    }
}

/// `outcome`: 0 success, 4 minor failure (the caller's fault), 8 serious failure (ours).
fn outcome_code(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Success => "0",
        Outcome::Rejected => "4",
        Outcome::Failed => "8",
    }
}

fn detail(kind: &str, value: &str) -> Value {
    json!({ "type": kind, "valueString": value })
}

/// The FHIR R4 `AuditEvent` for the event at `seq`. `observer` names this gateway (the audit
/// log id) as the `source.observer`.
pub fn fhir_audit_event(
    seq: u64,
    event: &AuditEvent,
    observer: &str,
) -> Result<Value, ExportError> {
    let (kind, subtype, action) = classify(event.action);
    let mut resource = Map::new();
    resource.insert("resourceType".into(), json!("AuditEvent"));
    resource.insert("id".into(), json!(seq.to_string()));
    resource.insert("type".into(), kind);
    if let Some(subtype) = subtype {
        resource.insert("subtype".into(), json!([subtype]));
    }
    resource.insert("action".into(), json!(action));
    resource.insert("recorded".into(), json!(rfc3339(seq, event)?));
    resource.insert("outcome".into(), json!(outcome_code(event.outcome)));
    let mut outcome_desc = Vec::new();
    if let Some(status) = event.status {
        outcome_desc.push(format!("HTTP {status}"));
    }
    if let Some(detail) = &event.detail {
        outcome_desc.push(detail.clone());
    }
    if !outcome_desc.is_empty() {
        resource.insert("outcomeDesc".into(), json!(outcome_desc.join("; ")));
    }
    if let Some(purpose) = &event.purpose_of_use {
        resource.insert(
            "purposeOfEvent".into(),
            json!([{ "coding": [{ "system": ACT_REASON, "code": purpose }] }]),
        );
    }

    // The requesting organisation (or IG officer): who asked.
    let actor = &event.actor;
    let mut who = Map::new();
    if let Some(ods) = &actor.ods_code {
        who.insert("identifier".into(), json!({ "system": ODS, "value": ods }));
    }
    let display = actor
        .partner_id
        .clone()
        .or_else(|| actor.client_id.clone())
        .unwrap_or_else(|| "unauthenticated".to_owned());
    who.insert("display".into(), json!(display));
    let mut requestor = Map::new();
    requestor.insert(
        "type".into(),
        json!({ "coding": [coding(DCM, "110153", "Source Role ID")] }),
    );
    requestor.insert("who".into(), Value::Object(who));
    if let Some(client_id) = &actor.client_id {
        requestor.insert("altId".into(), json!(client_id));
    }
    requestor.insert("requestor".into(), json!(true));
    if let Some(address) = &actor.remote_addr {
        requestor.insert("network".into(), json!({ "address": address, "type": "2" }));
    }
    let server = json!({
        "type": { "coding": [coding(DCM, "110152", "Destination Role ID")] },
        "who": { "display": observer },
        "requestor": false
    });
    resource.insert("agent".into(), json!([Value::Object(requestor), server]));
    resource.insert(
        "source".into(),
        json!({
            "observer": { "display": observer },
            "type": [coding(SOURCE_TYPE, "4", "Application Server")]
        }),
    );

    let mut entities = Vec::new();
    if let Some(entity) = &event.entity {
        let reference = match entity.version_id {
            Some(version) => format!("{}/{}/_history/{version}", entity.resource_type, entity.id),
            None => format!("{}/{}", entity.resource_type, entity.id),
        };
        let mut what = json!({
            "what": { "reference": reference },
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "role": coding(OBJECT_ROLE, "4", "Domain Resource"),
        });
        if let Some(hash) = &entity.content_hash
            && let Some(object) = what.as_object_mut()
        {
            object.insert("detail".into(), json!([detail("content-sha256", hash)]));
        }
        entities.push(what);
    }
    if let Some(patient) = &event.patient {
        entities.push(json!({
            "what": { "identifier": { "system": NHS_NUMBER, "value": patient } },
            "type": coding(ENTITY_TYPE, "1", "Person"),
            "role": coding(OBJECT_ROLE, "1", "Patient"),
        }));
    }
    // The request itself, carrying the decision's explanation.
    let mut details = vec![detail("request-id", &event.request_id)];
    if let Some(version) = &event.policy_version {
        details.push(detail("policy-version", version));
    }
    if !event.rule_ids.is_empty() {
        details.push(detail("rule-ids", &event.rule_ids.join(" ")));
    }
    entities.push(json!({
        "what": { "identifier": { "value": event.request_id } },
        "type": coding(ENTITY_TYPE, "2", "System Object"),
        "detail": details,
    }));
    resource.insert("entity".into(), Value::Array(entities));
    Ok(Value::Object(resource))
}

/// One NDJSON line (with its LF) for the event at `seq`.
pub fn ndjson_line(seq: u64, event: &AuditEvent, observer: &str) -> Result<String, ExportError> {
    let mut line = fhir_audit_event(seq, event, observer)?.to_string();
    line.push('\n');
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Actor, Entity};
    use time::macros::datetime;

    fn read_event() -> AuditEvent {
        let mut event = AuditEvent::new(
            "req-7",
            Actor {
                partner_id: Some("trust-rx1".into()),
                ods_code: Some("RX1".into()),
                client_id: Some("trust-rx1".into()),
                remote_addr: Some("10.0.0.7".into()),
            },
            Action::Read,
            Outcome::Success,
        );
        event.recorded = datetime!(2026-01-05 09:30:00.25 UTC);
        event.status = Some(200);
        event.entity = Some(Entity {
            resource_type: "Observation".into(),
            id: "o1".into(),
            version_id: Some(2),
            content_hash: None,
        });
        event.patient = Some("9434765919".into());
        event.purpose_of_use = Some("ETREAT".into());
        event.policy_version = Some("2026-01".into());
        event.rule_ids = vec!["LR-2".into()];
        event
    }

    #[test]
    fn aud_1_csv_snapshot() {
        let mut out = csv_header();
        out.push_str(&csv_row(7, &read_event()).unwrap());
        insta::assert_snapshot!(out);
    }

    #[test]
    fn csv_injection_cells_are_defused_and_quoted() {
        let cases = [
            (
                "=HYPERLINK(\"http://x\")",
                "\"'=HYPERLINK(\"\"http://x\"\")\"",
            ),
            ("+1", "'+1"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("plain", "plain"),
            ("a,b", "\"a,b\""),
            ("line\nbreak", "\"line\nbreak\""),
            ("", ""),
            ("9434765919", "9434765919"),
        ];
        for (input, expected) in cases {
            let mut out = String::new();
            csv_cell(input, &mut out);
            assert_eq!(out, expected, "{input:?}");
        }
    }

    #[test]
    fn csv_rows_have_one_cell_per_column_even_with_hostile_text() {
        let mut event = read_event();
        event.request_id = "=cmd|' /C calc'!A0,\"x\"".into();
        event.detail = Some("a\r\nb".into());
        let row = csv_row(1, &event).unwrap();
        assert!(row.contains("\"'=cmd|' /C calc'!A0,\"\"x\"\"\""), "{row}");
        assert!(row.ends_with("\r\n"));
    }

    #[test]
    fn aud_2_fhir_audit_event_snapshot() {
        // Keys sorted: serde_json's map order depends on which features the build unifies
        // (`preserve_order` arrives with cedar-policy in a workspace build).
        insta::with_settings!({ sort_maps => true }, {
            insta::assert_json_snapshot!(fhir_audit_event(7, &read_event(), "caregate/audit").unwrap());
        });
    }

    #[test]
    fn aud_1_every_action_has_type_action_and_a_requestor() {
        for action in [
            Action::TokenRequest,
            Action::Create,
            Action::Update,
            Action::Read,
            Action::BundleSubmit,
            Action::Metadata,
            Action::Request,
            Action::Review,
            Action::AuditQuery,
            Action::Export,
        ] {
            let event = AuditEvent::new("r", Actor::default(), action, Outcome::Failed);
            let resource = fhir_audit_event(1, &event, "gw").unwrap();
            assert!(resource["type"]["code"].is_string(), "{action:?}");
            assert!(
                ["C", "R", "U", "D", "E"].contains(&resource["action"].as_str().unwrap()),
                "{action:?}"
            );
            assert_eq!(resource["outcome"], "8");
            assert_eq!(resource["agent"][0]["requestor"], true);
            assert_eq!(resource["source"]["observer"]["display"], "gw");
            let line = ndjson_line(1, &event, "gw").unwrap();
            assert_eq!(line.matches('\n').count(), 1);
        }
    }
}
