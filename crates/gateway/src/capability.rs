//! Discovery: the FHIR `CapabilityStatement` (`GET /fhir/metadata`) and the SMART configuration
//! (`/.well-known/smart-configuration`). Both list exactly what this gateway supports and are
//! readable without a token, so clients can find the token endpoint.

use axum::extract::State;
use axum::response::Response;
use caregate_audit::Action;
use caregate_fhir::ResourceType;
use http::StatusCode;
use serde_json::{Value, json};

use crate::app::SharedState;
use crate::context::RequestCtx;
use crate::error::fhir_response;

/// `GET /fhir/metadata`.
pub(crate) async fn metadata(
    State(state): State<SharedState>,
    axum::extract::Extension(ctx): axum::extract::Extension<RequestCtx>,
) -> Response {
    ctx.set_action(Action::Metadata);
    fhir_response(StatusCode::OK, &capability_statement(&state.base_url))
}

/// The CapabilityStatement for a gateway at `base_url`.
pub fn capability_statement(base_url: &str) -> Value {
    let resources: Vec<Value> = ResourceType::ALL
        .iter()
        .map(|t| {
            let mut interactions = vec![json!({"code": "create"}), json!({"code": "read"})];
            if *t != ResourceType::Bundle {
                interactions.push(json!({"code": "update"}));
            }
            let mut resource = json!({
                "type": t.as_str(),
                "interaction": interactions,
                "versioning": "versioned-update",
                "readHistory": false,
                "updateCreate": true,
                "conditionalCreate": *t != ResourceType::Bundle,
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
            });
            if *t == ResourceType::Patient {
                resource["operation"] = json!([break_glass_operation(base_url)]);
            }
            resource
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "publisher": "caregate",
        "kind": "instance",
        "software": { "name": "caregate", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "caregate FHIR R4 data-sharing gateway", "url": format!("{base_url}/fhir") },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/json"],
        "rest": [{
            "mode": "server",
            "documentation": "Create and update records (one resource, or a transaction/batch Bundle at the base); read back your own submissions. Conditional create supports If-None-Exist: identifier=system|value only.",
            "security": {
                "cors": false,
                "service": [{ "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"
                }]}],
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{ "url": "token", "valueUri": format!("{base_url}/auth/token") }]
                }]
            },
            "resource": resources,
            "interaction": [{ "code": "transaction" }, { "code": "batch" }],
        }]
    })
}

/// The break-glass operation on the Patient type (DOMAIN.md `LR-2`; see `crate::break_glass`).
/// caregate serves no OperationDefinition resources: the parameters are described here.
fn break_glass_operation(base_url: &str) -> Value {
    json!({
        "name": "break-glass",
        "definition": format!("{base_url}/fhir/OperationDefinition/Patient-break-glass"),
        "documentation": format!(
            "Emergency (break-glass) access: POST {} with a Parameters body: patient (valueIdentifier, \
             system https://fhir.nhs.uk/Id/nhs-number), reason (valueString, required, at most {} characters) and \
             purposeOfUse (valueCoding, system http://terminology.hl7.org/CodeSystem/v3-ActReason, code ETREAT or BTG). \
             Needs the {} scope. Returns a searchset Bundle of the records held about the patient that the \
             consent/IG policy allows the caller under break-glass (LR-2, where its agreement permits it; \
             dissent and sensitive-data rules still apply). Every disclosure is audited and reviewed by IG officers.",
            crate::break_glass::PATH,
            crate::break_glass::MAX_REASON_CHARS,
            crate::break_glass::REQUIRED_SCOPE
        )
    })
}

/// `GET /.well-known/smart-configuration`
/// (<http://hl7.org/fhir/smart-app-launch/conformance.html>).
pub(crate) async fn smart_configuration(
    State(state): State<SharedState>,
    axum::extract::Extension(ctx): axum::extract::Extension<RequestCtx>,
) -> Response {
    ctx.set_action(Action::Metadata);
    let body = json!({
        "token_endpoint": format!("{}/auth/token", state.base_url),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384", "RS512", "ES256"],
        "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.cu"],
        "capabilities": ["client-confidential-asymmetric"],
    });
    let mut response = fhir_response(StatusCode::OK, &body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
