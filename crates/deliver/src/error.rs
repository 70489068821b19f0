//! Why delivery could not start or an operation failed. Messages name partners and files, never
//! patient data.

use caregate_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("delivery to partner {partner}: {reason}")]
    Config { partner: String, reason: String },
    #[error("delivery to partner {partner}: cannot read {path}: {reason}")]
    File {
        partner: String,
        path: String,
        reason: String,
    },
    #[error("delivery to partner {partner}: cannot build the HTTPS client: {reason}")]
    Client { partner: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why an inbox request was refused (mapped to responses by the gateway).
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// The cursor is not one this gateway issued.
    #[error("the cursor is not valid")]
    BadCursor,
    #[error(transparent)]
    Store(#[from] StoreError),
}
