//! The bytes of an audit event that the Merkle log commits to, and its leaf hash.
//!
//! **Canonical form.** An event is hashed as compact JSON with every object's keys sorted by
//! their UTF-8 bytes, no insignificant whitespace, and serde_json's own number and string
//! rendering. The sorting is done here, explicitly, rather than by relying on
//! `serde_json::Map` being a `BTreeMap`: that holds only while no crate in the build enables
//! serde_json's `preserve_order` feature, and features unify across the workspace (at the time of
//! writing `cedar-policy-core` does enable it, so `serde_json::to_value` keeps struct field order
//! in a full build). The form matches RFC 8785 (JCS) for our events, whose keys are ASCII and
//! whose numbers are integers.
//!
//! Changing this form changes every leaf hash and breaks verification of stored logs; the golden
//! test below pins it.
//!
//! **Leaf.** `leaf = SHA-256(0x00 ‖ seq as 8 bytes big-endian ‖ canonical event)` — the RFC 9162
//! §2.1.1 leaf hash of the sequence number and the event together, so an event moved to another
//! position (a reorder, or a deletion with renumbering) no longer matches its leaf.
//!
//! **Storage.** The store should keep the canonical bytes themselves as the event's stored form;
//! verification then hashes the stored bytes verbatim ([`CanonicalEvent`]), so any change to a
//! stored byte is detected, including fields this version of [`AuditEvent`] does not know.

use serde_json::Value;

use crate::AuditEvent;
use crate::merkle::{Hash, leaf_hash_parts};

/// Why an event has no canonical form. Carries no event content (events may hold NHS numbers).
#[derive(Debug, thiserror::Error)]
pub enum EventEncodingError {
    /// The event could not be rendered as JSON (e.g. a timestamp outside RFC 3339's years).
    #[error("the audit event could not be encoded as JSON")]
    Encode(#[source] serde_json::Error),
    /// Stored event bytes are not JSON.
    #[error("the stored audit event is not valid JSON (line {line}, column {column})")]
    NotJson { line: usize, column: usize },
}

/// The canonical bytes of an event (see the module docs).
pub fn canonical_event_bytes(event: &AuditEvent) -> Result<Vec<u8>, EventEncodingError> {
    let value = serde_json::to_value(event).map_err(EventEncodingError::Encode)?;
    canonical_json(&value)
}

/// The canonical form of stored event JSON, keeping every field it holds (known to
/// [`AuditEvent`] or not), for stores that kept a non-canonical rendering.
pub fn canonicalize_event_json(stored: &[u8]) -> Result<Vec<u8>, EventEncodingError> {
    let value: Value =
        serde_json::from_slice(stored).map_err(|error| EventEncodingError::NotJson {
            line: error.line(),
            column: error.column(),
        })?;
    canonical_json(&value)
}

/// Compact JSON with object keys sorted by their UTF-8 bytes.
pub fn canonical_json(value: &Value) -> Result<Vec<u8>, EventEncodingError> {
    let mut out = Vec::new();
    write_canonical(value, &mut out)?;
    Ok(out)
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) -> Result<(), EventEncodingError> {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|(a, _), (b, _)| a.as_bytes().cmp(b.as_bytes()));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).map_err(EventEncodingError::Encode)?;
                out.push(b':');
                write_canonical(value, out)?;
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        // Scalars have one rendering in serde_json's compact writer.
        scalar => serde_json::to_writer(&mut *out, scalar).map_err(EventEncodingError::Encode)?,
    }
    Ok(())
}

/// The Merkle leaf of the event with sequence number `seq` whose canonical bytes are `canonical`.
pub fn event_leaf_hash(seq: u64, canonical: &[u8]) -> Hash {
    leaf_hash_parts(&[&seq.to_be_bytes(), canonical])
}

/// Something that can be hashed into the audit log's leaf at a sequence number: an
/// [`AuditEvent`], or stored bytes already in canonical form ([`CanonicalEvent`]).
pub trait AuditLeaf {
    /// The leaf hash of this event at `seq`.
    fn audit_leaf_hash(&self, seq: u64) -> Result<Hash, EventEncodingError>;
}

impl AuditLeaf for AuditEvent {
    fn audit_leaf_hash(&self, seq: u64) -> Result<Hash, EventEncodingError> {
        Ok(event_leaf_hash(seq, &canonical_event_bytes(self)?))
    }
}

impl<T: AuditLeaf + ?Sized> AuditLeaf for &T {
    fn audit_leaf_hash(&self, seq: u64) -> Result<Hash, EventEncodingError> {
        (**self).audit_leaf_hash(seq)
    }
}

/// Stored event bytes, hashed verbatim (they should be what [`canonical_event_bytes`] produced
/// when the event was written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalEvent<B>(pub B);

impl<B: AsRef<[u8]>> AuditLeaf for CanonicalEvent<B> {
    fn audit_leaf_hash(&self, seq: u64) -> Result<Hash, EventEncodingError> {
        Ok(event_leaf_hash(seq, self.0.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Action, Actor, Entity, Outcome};
    use time::macros::datetime;

    fn golden_event() -> AuditEvent {
        AuditEvent {
            recorded: datetime!(2025-03-28 09:30:00.25 UTC),
            request_id: "req-7".into(),
            actor: Actor {
                partner_id: Some("acute-trust".into()),
                ods_code: Some("RXX".into()),
                client_id: None,
                remote_addr: None,
            },
            action: Action::Read,
            outcome: Outcome::Success,
            status: Some(200),
            entity: Some(Entity {
                resource_type: "Patient".into(),
                id: "p1".into(),
                version_id: Some(3),
                content_hash: None,
            }),
            patient: Some("9434765919".into()),
            purpose_of_use: Some("TREAT".into()),
            policy_version: None,
            rule_ids: vec!["LR-1".into()],
            detail: None,
        }
    }

    /// Pins the canonical form and the leaf: if this changes, stored logs stop verifying.
    #[test]
    fn canonical_form_and_leaf_are_stable() {
        let bytes = canonical_event_bytes(&golden_event()).unwrap();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            concat!(
                r#"{"action":"read","actor":{"ods_code":"RXX","partner_id":"acute-trust"},"#,
                r#""entity":{"id":"p1","resource_type":"Patient","version_id":3},"#,
                r#""outcome":"success","patient":"9434765919","purpose_of_use":"TREAT","#,
                r#""recorded":"2025-03-28T09:30:00.25Z","request_id":"req-7","#,
                r#""rule_ids":["LR-1"],"status":200}"#
            )
        );
        let mut preimage = vec![0x00];
        preimage.extend_from_slice(&7u64.to_be_bytes());
        preimage.extend_from_slice(&bytes);
        assert_eq!(
            event_leaf_hash(7, &bytes),
            crate::merkle::sha256(&[&preimage])
        );
        assert_eq!(
            golden_event().audit_leaf_hash(7).unwrap(),
            event_leaf_hash(7, &bytes)
        );
    }

    #[test]
    fn canonical_json_sorts_keys_whatever_the_insertion_order() {
        // Build the map in reverse order: with serde_json's `preserve_order` on, the map keeps
        // this order, and the canonical writer must still sort.
        let mut map = serde_json::Map::new();
        map.insert("z".into(), Value::from(1));
        map.insert(
            "a".into(),
            serde_json::json!({"y": [true, null], "b": "é\n"}),
        );
        let bytes = canonical_json(&Value::Object(map)).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"a":{"b":"é\n","y":[true,null]},"z":1}"#
        );
    }

    #[test]
    fn stored_json_canonicalises_to_the_same_bytes() {
        let event = golden_event();
        let pretty = serde_json::to_vec_pretty(&event).unwrap();
        assert_eq!(
            canonicalize_event_json(&pretty).unwrap(),
            canonical_event_bytes(&event).unwrap()
        );
        let stored = CanonicalEvent(canonical_event_bytes(&event).unwrap());
        assert_eq!(
            stored.audit_leaf_hash(1).unwrap(),
            event.audit_leaf_hash(1).unwrap()
        );
    }

    #[test]
    fn the_leaf_binds_the_sequence_number() {
        let event = golden_event();
        assert_ne!(
            event.audit_leaf_hash(1).unwrap(),
            event.audit_leaf_hash(2).unwrap()
        );
    }

    #[test]
    fn errors_do_not_echo_event_content() {
        let error = canonicalize_event_json(br#"{"patient":"9434765919""#).unwrap_err();
        let message = error.to_string();
        assert!(!message.contains("9434765919"), "{message}");
        assert!(message.contains("line 1"), "{message}");
    }
}
