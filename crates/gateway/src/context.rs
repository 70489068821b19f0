//! The per-request context: request id, connection facts, and the audit draft that the stages
//! fill in as the request moves through them. The edge creates it for every request and turns it
//! into exactly one audit event at the end (unless the handler wrote its event in its own commit).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use caregate_audit::{Action, Actor, AuditEvent, Entity, Outcome};

use crate::config::Partner;

/// Response extension: the request's audit event was written in the same commit as its records,
/// so the edge must not write another.
#[derive(Debug, Clone, Copy)]
pub struct Audited;

#[derive(Debug, Default)]
struct Draft {
    actor: Actor,
    action: Option<Action>,
    entity: Option<Entity>,
    patient: Option<String>,
    detail: Option<String>,
}

/// Shared by the edge, the auth extractor and the handlers of one request.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    pub request_id: Arc<str>,
    /// Set when the client sent `X-Request-Id` (used as the idempotency key).
    pub client_request_id: bool,
    pub remote: Option<SocketAddr>,
    pub client_cert_thumbprint: Option<String>,
    draft: Arc<Mutex<Draft>>,
}

impl RequestCtx {
    pub fn new(
        request_id: String,
        client_request_id: bool,
        remote: Option<SocketAddr>,
        client_cert_thumbprint: Option<String>,
    ) -> Self {
        let draft = Draft {
            actor: Actor {
                remote_addr: remote.map(|r| r.ip().to_string()),
                ..Actor::default()
            },
            ..Draft::default()
        };
        Self {
            request_id: request_id.into(),
            client_request_id,
            remote,
            client_cert_thumbprint,
            draft: Arc::new(Mutex::new(draft)),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Draft) -> R) -> R {
        // A panic elsewhere cannot leave the draft half-written in a way that matters: recover.
        let mut draft = self.draft.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut draft)
    }

    /// The caller is this authenticated partner.
    pub fn set_partner(&self, partner: &Partner) {
        self.with(|d| {
            d.actor.partner_id = Some(partner.id.clone());
            d.actor.ods_code = Some(partner.ods_code.to_string());
            d.actor.client_id = Some(partner.id.clone());
        });
    }

    /// The client id claimed by an (possibly failed) token request, bounded in length.
    pub fn set_client_id(&self, client_id: &str) {
        let bounded: String = client_id.chars().take(64).collect();
        self.with(|d| d.actor.client_id = Some(bounded));
    }

    pub fn set_action(&self, action: Action) {
        self.with(|d| d.action = Some(action));
    }

    pub fn set_entity(&self, entity: Entity) {
        self.with(|d| d.entity = Some(entity));
    }

    pub fn set_patient(&self, nhs_number: Option<&str>) {
        self.with(|d| d.patient = nhs_number.map(str::to_owned));
    }

    pub fn set_detail(&self, detail: impl Into<String>) {
        self.with(|d| d.detail = Some(detail.into()));
    }

    pub fn partner_id(&self) -> Option<String> {
        self.with(|d| d.actor.partner_id.clone())
    }

    pub fn actor(&self) -> Actor {
        self.with(|d| d.actor.clone())
    }

    /// The audit event for this request, ending with `status`.
    pub fn audit_event(&self, status: u16) -> AuditEvent {
        self.with(|d| {
            let mut event = AuditEvent::new(
                self.request_id.to_string(),
                d.actor.clone(),
                d.action.unwrap_or(Action::Request),
                Outcome::from_status(status),
            );
            event.status = Some(status);
            event.entity = d.entity.clone();
            event.patient = d.patient.clone();
            event.detail = d.detail.clone();
            event
        })
    }
}
