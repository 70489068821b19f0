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
            json!({
                "type": t.as_str(),
                "interaction": interactions,
                "versioning": "versioned-update",
                "readHistory": false,
                "updateCreate": true,
                "conditionalCreate": *t != ResourceType::Bundle,
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
            })
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
