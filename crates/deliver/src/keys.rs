//! Stable keys derived from a delivery: the idempotency key a partner sees, and the ordering key.

use aws_lc_rs::digest;
use caregate_store::{LogEntry, Seq};

/// The idempotency key sent as `X-Request-Id` with every attempt of one record to one partner:
/// the same across retries, restarts and replays, different for every (record, partner), so the
/// partner can drop repeats. A digest, so it tells the partner nothing about our log.
pub fn idempotency_key(seq: Seq, partner: &str) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(b"caregate-delivery\0");
    context.update(&seq.to_be_bytes());
    context.update(partner.as_bytes());
    let digest = context.finish();
    format!("cgd-{}", hex::encode(&digest.as_ref()[..20]))
}

/// The ordering key: records about one patient go to a partner in commit order. Without an NHS
/// number the record's own identity is the key (versions of one resource stay in order). A
/// digest, so the delivery table carries no identifier in clear; it is never logged either.
pub fn order_key(entry: &LogEntry) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    match &entry.nhs_number {
        Some(nhs_number) => {
            context.update(b"patient\0");
            context.update(nhs_number.as_bytes());
        }
        None => {
            context.update(b"resource\0");
            for part in [&entry.partner, &entry.resource_type, &entry.id] {
                context.update(part.as_bytes());
                context.update(b"\0");
            }
        }
    }
    hex::encode(&context.finish().as_ref()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_key_is_stable_distinct_and_a_valid_request_id() {
        let key = idempotency_key(42, "trust-rx1");
        assert_eq!(key, idempotency_key(42, "trust-rx1"));
        assert_ne!(key, idempotency_key(43, "trust-rx1"));
        assert_ne!(key, idempotency_key(42, "gp-a81001"));
        assert!(key.len() <= 128);
        assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    }
}
