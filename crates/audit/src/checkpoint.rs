//! Signed checkpoints (signed tree heads, RFC 9162 §4.10): the log's size and root at a moment,
//! signed with the gateway's Ed25519 key, in a text form another organisation can keep as a
//! witness (DOMAIN.md B2 `T2`).
//!
//! **Format.** A checkpoint is a C2SP signed note (<https://c2sp.org/signed-note>) whose text
//! follows C2SP tlog-checkpoint (<https://c2sp.org/tlog-checkpoint>):
//!
//! ```text
//! caregate.example/audit            <- origin: the log id, also the signing key's name
//! 1042                              <- tree size, decimal, no leading zeros
//! 3Jz9...base64 root...=            <- RFC 9162 root at that size, standard base64
//! timestamp 2025-03-28T09:30:00Z    <- extension line: when the log signed it (RFC 3339, UTC)
//!
//! — caregate.example/audit AbCd...base64(key id ‖ Ed25519 signature)...
//! ```
//!
//! The signature covers the note text (the four lines, each newline-terminated) per the signed-
//! note spec's Ed25519 type: the key id is the first four bytes of
//! `SHA-256(key name ‖ 0x0A ‖ 0x01 ‖ public key)`. Following that spec, a verifier ignores
//! signature lines from keys it does not know (witness cosignatures), rejects the note if a line
//! from its key fails, and requires at least one valid line from its key. The timestamp
//! extension line is caregate's (tlog-checkpoint allows extension lines); every caregate
//! checkpoint has exactly one.
//!
//! Keys come from PKCS#8 (PEM or DER) through aws-lc-rs, the project's one crypto provider.

use std::fmt;
use std::num::NonZeroU64;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime, UtcOffset};

use crate::merkle::{Hash, sha256};

/// Signed-note signature type byte for Ed25519 (c2sp.org/signed-note, "Signature types").
const ED25519_TYPE: u8 = 0x01;
/// Length of an Ed25519 public key and of a signature.
const ED25519_PUBLIC_KEY_LEN: usize = 32;
const ED25519_SIGNATURE_LEN: usize = 64;
/// The signature line prefix: em dash (U+2014) and a space.
const SIGNATURE_PREFIX: &str = "\u{2014} ";
/// The extension line carrying the signing time.
const TIMESTAMP_PREFIX: &str = "timestamp ";
/// Bounds on what we parse: the signed-note spec asks verifiers to accept at least 16
/// signatures; a checkpoint with that many Ed25519 lines is well under 4 KiB.
pub const MAX_NOTE_BYTES: usize = 16 * 1024;
pub const MAX_SIGNATURES: usize = 32;

/// A tree head: the log `log_id` had `size` events with Merkle root `root` at `timestamp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's origin line, e.g. `caregate.example-ics.nhs.uk/audit`. Non-empty, no spaces,
    /// no `+`, printable (it doubles as the signing key's name).
    pub log_id: String,
    /// Number of events (leaves) covered: sequence numbers `1..=size`.
    pub size: u64,
    /// RFC 9162 root of the first `size` leaves.
    pub root: Hash,
    /// When the log signed it. Written in UTC (with any fraction of a second it has); parsed
    /// from any RFC 3339 offset.
    pub timestamp: OffsetDateTime,
}

impl Checkpoint {
    /// The note text that is signed: origin, size, root and timestamp lines.
    pub fn note_text(&self) -> Result<String, CheckpointError> {
        if !is_valid_key_name(&self.log_id) {
            return Err(CheckpointError::InvalidLogId);
        }
        let timestamp = self
            .timestamp
            .to_offset(UtcOffset::UTC)
            .format(&Rfc3339)
            .map_err(|_| CheckpointError::UnencodableTimestamp)?;
        Ok(format!(
            "{}\n{}\n{}\n{TIMESTAMP_PREFIX}{timestamp}\n",
            self.log_id,
            self.size,
            BASE64.encode(self.root.as_bytes()),
        ))
    }

    /// Parses note text (the part before the signatures). The result is unauthenticated until a
    /// [`CheckpointVerifier`] has checked the signature.
    fn parse_note_text(text: &str) -> Result<Self, CheckpointError> {
        let Some(body) = text.strip_suffix('\n') else {
            return Err(malformed(0, "the note text does not end with a newline"));
        };
        let lines: Vec<&str> = body.split('\n').collect();
        let [origin, size, root, timestamp] = lines.as_slice() else {
            return Err(malformed(
                0,
                "the note text is not exactly origin, size, root and timestamp lines",
            ));
        };
        if !is_valid_key_name(origin) {
            return Err(malformed(
                1,
                "the origin is empty or has a space, '+' or control",
            ));
        }
        let size = parse_size(size).ok_or_else(|| {
            malformed(
                2,
                "the tree size is not a decimal number without leading zeros",
            )
        })?;
        let root = BASE64
            .decode(root)
            .ok()
            .and_then(|bytes| Hash::from_slice(&bytes))
            .filter(|hash| BASE64.encode(hash.as_bytes()) == *root)
            .ok_or_else(|| malformed(3, "the root is not canonical base64 of 32 bytes"))?;
        let timestamp = timestamp
            .strip_prefix(TIMESTAMP_PREFIX)
            .and_then(|text| OffsetDateTime::parse(text, &Rfc3339).ok())
            .ok_or_else(|| malformed(4, "the timestamp line is not 'timestamp <RFC 3339>'"))?;
        Ok(Self {
            log_id: (*origin).to_owned(),
            size,
            root,
            timestamp,
        })
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let canonical = text == "0" || (!text.starts_with('0') && !text.is_empty());
    if canonical && text.bytes().all(|byte| byte.is_ascii_digit()) {
        text.parse().ok()
    } else {
        None
    }
}

/// Key names (and so origins): non-empty, no Unicode whitespace, no `+`, no control characters
/// (c2sp.org/signed-note "Format").
fn is_valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '+')
}

/// The signed-note key id of an Ed25519 key.
fn key_id(key_name: &str, public_key: &[u8]) -> [u8; 4] {
    let hash = sha256(&[key_name.as_bytes(), b"\n", &[ED25519_TYPE], public_key]);
    let mut id = [0u8; 4];
    for (dst, src) in id.iter_mut().zip(hash.as_bytes()) {
        *dst = *src;
    }
    id
}

/// One signature line of a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteSignature {
    pub key_name: String,
    pub key_id: [u8; 4],
    /// The signature bytes after the key id.
    pub signature: Vec<u8>,
}

/// A checkpoint as text with its signature lines: what the store persists and exports and what
/// a witness keeps. Its content is unauthenticated until [`CheckpointVerifier::verify`] accepts
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    checkpoint: Checkpoint,
    /// The exact signed text, as received: verification is over these bytes.
    note_text: String,
    signatures: Vec<NoteSignature>,
}

impl SignedCheckpoint {
    /// Parses the text form (note text, blank line, signature lines).
    pub fn parse(text: &str) -> Result<Self, CheckpointError> {
        if text.len() > MAX_NOTE_BYTES {
            return Err(malformed(0, "the checkpoint is larger than 16 KiB"));
        }
        if text.chars().any(|c| c < ' ' && c != '\n') {
            return Err(malformed(0, "the checkpoint contains a control character"));
        }
        // The text ends at the last blank line (c2sp.org/signed-note "Format"): the first
        // newline of the last "\n\n" ends the text, the second is the separator.
        let Some(split) = text.rfind("\n\n") else {
            return Err(malformed(
                0,
                "no blank line separates the text from the signatures",
            ));
        };
        let (note_text, rest) = text.split_at(split + 1);
        let signature_block = &rest[1..];
        let checkpoint = Checkpoint::parse_note_text(note_text)?;
        let text_lines = note_text.matches('\n').count();

        if signature_block.is_empty() {
            return Err(malformed(0, "the checkpoint has no signature lines"));
        }
        let Some(signature_block) = signature_block.strip_suffix('\n') else {
            return Err(malformed(0, "the checkpoint does not end with a newline"));
        };
        let mut signatures = Vec::new();
        for (i, line) in signature_block.split('\n').enumerate() {
            let line_number = text_lines + 2 + i;
            if signatures.len() == MAX_SIGNATURES {
                return Err(malformed(line_number, "more than 32 signature lines"));
            }
            signatures.push(parse_signature_line(line).ok_or_else(|| {
                malformed(
                    line_number,
                    "not a signature line ('— <key name> <base64>')",
                )
            })?);
        }
        Ok(Self {
            checkpoint,
            note_text: note_text.to_owned(),
            signatures,
        })
    }

    /// The text form: note text, a blank line, one line per signature.
    pub fn to_text(&self) -> String {
        let mut out = String::with_capacity(self.note_text.len() + 120 * self.signatures.len());
        out.push_str(&self.note_text);
        out.push('\n');
        for signature in &self.signatures {
            let mut blob = Vec::with_capacity(4 + signature.signature.len());
            blob.extend_from_slice(&signature.key_id);
            blob.extend_from_slice(&signature.signature);
            out.push_str(SIGNATURE_PREFIX);
            out.push_str(&signature.key_name);
            out.push(' ');
            out.push_str(&BASE64.encode(&blob));
            out.push('\n');
        }
        out
    }

    /// The checkpoint this note claims, **not yet authenticated**: for display and for choosing
    /// which checkpoints to verify, never for trusting a root.
    pub fn unverified(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The signature lines (the log's, and any witnesses' cosignatures).
    pub fn signatures(&self) -> &[NoteSignature] {
        &self.signatures
    }

    /// Adds a signature line (e.g. a witness's cosignature over the same text).
    pub fn add_signature(&mut self, signature: NoteSignature) {
        self.signatures.push(signature);
    }
}

impl fmt::Display for SignedCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

fn parse_signature_line(line: &str) -> Option<NoteSignature> {
    let rest = line.strip_prefix(SIGNATURE_PREFIX)?;
    let (key_name, blob) = rest.split_once(' ')?;
    if !is_valid_key_name(key_name) {
        return None;
    }
    let blob = BASE64.decode(blob).ok()?;
    let (key_id, signature) = blob.split_first_chunk::<4>()?;
    if signature.is_empty() {
        return None;
    }
    Some(NoteSignature {
        key_name: key_name.to_owned(),
        key_id: *key_id,
        signature: signature.to_vec(),
    })
}

fn malformed(line: usize, reason: &'static str) -> CheckpointError {
    CheckpointError::Malformed { line, reason }
}

/// Why a checkpoint could not be encoded, parsed, signed or verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The text is not a well-formed checkpoint note. `line` is 1-based; 0 means the whole note.
    #[error("malformed checkpoint (line {line}): {reason}")]
    Malformed { line: usize, reason: &'static str },
    /// The log id cannot be an origin line and key name.
    #[error("the log id must be non-empty, without spaces, '+' or control characters")]
    InvalidLogId,
    /// The timestamp is outside what RFC 3339 can express.
    #[error("the checkpoint timestamp cannot be written in RFC 3339")]
    UnencodableTimestamp,
    /// A signer was asked to sign another log's checkpoint.
    #[error("the signer is for another log")]
    SignerLogMismatch,
    /// The checkpoint's origin is not the log the verifier is for.
    #[error("the checkpoint is from another log")]
    OriginMismatch,
    /// No signature line from the verifier's key.
    #[error("the checkpoint carries no signature from the log's key")]
    NoSignatureFromKey,
    /// A signature line from the verifier's key does not verify: forged or altered.
    #[error("the checkpoint's signature does not verify: it was altered or forged")]
    BadSignature,
    /// The signing operation itself failed.
    #[error("signing the checkpoint failed")]
    SigningFailed,
}

/// Why a key could not be loaded or made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The PEM text has no `PRIVATE KEY` block, or its body is not base64.
    #[error("the key file is not a PEM 'PRIVATE KEY' block")]
    NotPem,
    /// The PKCS#8 document is not an Ed25519 private key aws-lc-rs accepts.
    #[error("the key is not a PKCS#8 Ed25519 private key: {0}")]
    Rejected(String),
    /// A public key is not 32 bytes of (base64) Ed25519 key.
    #[error("the public key is not a 32-byte Ed25519 key in base64")]
    BadPublicKey,
    /// The log id cannot be a key name.
    #[error("the log id must be non-empty, without spaces, '+' or control characters")]
    InvalidLogId,
    /// Key generation or export failed.
    #[error("the key could not be generated or exported")]
    Unspecified,
}

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

fn pem_to_der(pem: &str) -> Result<Vec<u8>, KeyError> {
    let start = pem.find(PEM_BEGIN).ok_or(KeyError::NotPem)? + PEM_BEGIN.len();
    let end = pem[start..].find(PEM_END).ok_or(KeyError::NotPem)? + start;
    let body: String = pem[start..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    BASE64.decode(body).map_err(|_| KeyError::NotPem)
}

fn der_to_pem(der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let mut out = String::with_capacity(body.len() + 80);
    out.push_str(PEM_BEGIN);
    out.push('\n');
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(PEM_END);
    out.push('\n');
    out
}

/// The log's checkpoint signer: an Ed25519 key named by the log id.
pub struct CheckpointSigner {
    log_id: String,
    key_pair: Ed25519KeyPair,
    key_id: [u8; 4],
}

impl fmt::Debug for CheckpointSigner {
    // Never the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("log_id", &self.log_id)
            .field("public_key", &self.public_key_base64())
            .finish_non_exhaustive()
    }
}

impl CheckpointSigner {
    /// A signer from a PKCS#8 PEM `PRIVATE KEY` (as `openssl genpkey -algorithm ed25519` writes).
    pub fn from_pkcs8_pem(log_id: impl Into<String>, pem: &str) -> Result<Self, KeyError> {
        Self::from_pkcs8_der(log_id, &pem_to_der(pem)?)
    }

    /// A signer from PKCS#8 DER (v1 or v2).
    pub fn from_pkcs8_der(log_id: impl Into<String>, der: &[u8]) -> Result<Self, KeyError> {
        let key_pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|rejected| KeyError::Rejected(rejected.to_string()))?;
        Self::with_key_pair(log_id.into(), key_pair)
    }

    /// A signer with a fresh key (persist it with [`CheckpointSigner::to_pkcs8_pem`]).
    pub fn generate(log_id: impl Into<String>) -> Result<Self, KeyError> {
        let key_pair = Ed25519KeyPair::generate().map_err(|_| KeyError::Unspecified)?;
        Self::with_key_pair(log_id.into(), key_pair)
    }

    fn with_key_pair(log_id: String, key_pair: Ed25519KeyPair) -> Result<Self, KeyError> {
        if !is_valid_key_name(&log_id) {
            return Err(KeyError::InvalidLogId);
        }
        let key_id = key_id(&log_id, key_pair.public_key().as_ref());
        Ok(Self {
            log_id,
            key_pair,
            key_id,
        })
    }

    /// The private key as PKCS#8 v2 PEM, to write to a file only the gateway can read.
    pub fn to_pkcs8_pem(&self) -> Result<String, KeyError> {
        let der: aws_lc_rs::encoding::Pkcs8V2Der<'static> =
            self.key_pair.as_der().map_err(|_| KeyError::Unspecified)?;
        Ok(der_to_pem(der.as_ref()))
    }

    /// The log id (origin line and key name).
    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    /// The 32-byte Ed25519 public key in standard base64, for witnesses and `audit verify`.
    pub fn public_key_base64(&self) -> String {
        BASE64.encode(self.key_pair.public_key().as_ref())
    }

    /// The verifier for this signer's checkpoints.
    pub fn verifier(&self) -> CheckpointVerifier {
        let mut public_key = [0u8; ED25519_PUBLIC_KEY_LEN];
        for (dst, src) in public_key
            .iter_mut()
            .zip(self.key_pair.public_key().as_ref())
        {
            *dst = *src;
        }
        CheckpointVerifier {
            log_id: self.log_id.clone(),
            public_key,
            key_id: self.key_id,
        }
    }

    /// Signs a checkpoint of this signer's log.
    pub fn sign(&self, checkpoint: &Checkpoint) -> Result<SignedCheckpoint, CheckpointError> {
        if checkpoint.log_id != self.log_id {
            return Err(CheckpointError::SignerLogMismatch);
        }
        let note_text = checkpoint.note_text()?;
        let signature = self
            .key_pair
            .try_sign(note_text.as_bytes())
            .map_err(|_| CheckpointError::SigningFailed)?;
        // Re-parse what we render, so what is stored is exactly what verifiers will read
        // (including the timestamp's UTC normalisation).
        let checkpoint = Checkpoint::parse_note_text(&note_text)?;
        Ok(SignedCheckpoint {
            checkpoint,
            note_text,
            signatures: vec![NoteSignature {
                key_name: self.log_id.clone(),
                key_id: self.key_id,
                signature: signature.as_ref().to_vec(),
            }],
        })
    }
}

/// Verifies checkpoints of one log against its Ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointVerifier {
    log_id: String,
    public_key: [u8; ED25519_PUBLIC_KEY_LEN],
    key_id: [u8; 4],
}

impl CheckpointVerifier {
    /// A verifier for the log `log_id` with a raw 32-byte Ed25519 public key.
    pub fn new(log_id: impl Into<String>, public_key: &[u8]) -> Result<Self, KeyError> {
        let log_id = log_id.into();
        if !is_valid_key_name(&log_id) {
            return Err(KeyError::InvalidLogId);
        }
        let public_key = <[u8; ED25519_PUBLIC_KEY_LEN]>::try_from(public_key)
            .map_err(|_| KeyError::BadPublicKey)?;
        let key_id = key_id(&log_id, &public_key);
        Ok(Self {
            log_id,
            public_key,
            key_id,
        })
    }

    /// A verifier from the base64 public key [`CheckpointSigner::public_key_base64`] prints.
    pub fn from_public_key_base64(
        log_id: impl Into<String>,
        public_key: &str,
    ) -> Result<Self, KeyError> {
        let bytes = BASE64
            .decode(public_key.trim())
            .map_err(|_| KeyError::BadPublicKey)?;
        Self::new(log_id, &bytes)
    }

    /// The log this verifier is for.
    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    /// Checks the checkpoint is this log's and signed by its key; returns the authenticated
    /// checkpoint. Signatures from other keys (witnesses) are ignored, per the signed-note spec.
    pub fn verify(&self, signed: &SignedCheckpoint) -> Result<Checkpoint, CheckpointError> {
        if signed.checkpoint.log_id != self.log_id {
            return Err(CheckpointError::OriginMismatch);
        }
        let key = UnparsedPublicKey::new(&signature::ED25519, &self.public_key);
        let mut verified = false;
        for line in &signed.signatures {
            if line.key_name != self.log_id || line.key_id != self.key_id {
                continue;
            }
            if line.signature.len() != ED25519_SIGNATURE_LEN
                || key
                    .verify(signed.note_text.as_bytes(), &line.signature)
                    .is_err()
            {
                return Err(CheckpointError::BadSignature);
            }
            verified = true;
        }
        if verified {
            Ok(signed.checkpoint.clone())
        } else {
            Err(CheckpointError::NoSignatureFromKey)
        }
    }

    /// Parses and verifies the text form.
    pub fn verify_text(&self, text: &str) -> Result<Checkpoint, CheckpointError> {
        self.verify(&SignedCheckpoint::parse(text)?)
    }
}

/// When the store should sign the next checkpoint: after `every_events` new events, or once
/// `every` has passed since the last checkpoint with at least one new event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointSchedule {
    pub every_events: NonZeroU64,
    pub every: Duration,
}

impl CheckpointSchedule {
    /// Whether a checkpoint is due for a log of `size` events at `now`, given the last one
    /// signed (if any). A log that has not grown needs no new checkpoint; an empty log's first
    /// checkpoint is due at once, so a witness can pin the log from its start.
    pub fn is_due(&self, last: Option<&Checkpoint>, size: u64, now: OffsetDateTime) -> bool {
        match last {
            None => true,
            Some(last) if size <= last.size => false,
            Some(last) => {
                size - last.size >= self.every_events.get() || now - last.timestamp >= self.every
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::leaf_hash;
    use time::macros::datetime;

    const LOG: &str = "caregate.example/audit";

    fn checkpoint(size: u64) -> Checkpoint {
        Checkpoint {
            log_id: LOG.into(),
            size,
            root: leaf_hash(&size.to_be_bytes()),
            timestamp: datetime!(2025-03-28 09:30:00 UTC),
        }
    }

    fn signer() -> CheckpointSigner {
        CheckpointSigner::generate(LOG).unwrap()
    }

    #[test]
    fn checkpoint_round_trips_through_text() {
        let signer = signer();
        let signed = signer.sign(&checkpoint(1042)).unwrap();
        let text = signed.to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], LOG);
        assert_eq!(lines[1], "1042");
        assert_eq!(lines[2], BASE64.encode(checkpoint(1042).root.as_bytes()));
        assert_eq!(lines[3], "timestamp 2025-03-28T09:30:00Z");
        assert_eq!(lines[4], "");
        assert!(lines[5].starts_with("\u{2014} caregate.example/audit "));
        assert_eq!(lines.len(), 6);

        let parsed = SignedCheckpoint::parse(&text).unwrap();
        assert_eq!(parsed, signed);
        assert_eq!(parsed.to_text(), text);
        assert_eq!(signer.verifier().verify(&parsed).unwrap(), checkpoint(1042));
    }

    #[test]
    fn timestamps_are_signed_in_utc() {
        let mut local = checkpoint(1);
        local.timestamp = datetime!(2025-06-01 10:00:00 +01:00);
        let signed = signer().sign(&local).unwrap();
        assert!(
            signed
                .to_text()
                .contains("timestamp 2025-06-01T09:00:00Z\n")
        );
        assert_eq!(signed.unverified().timestamp, local.timestamp);
    }

    /// DOMAIN.md B2 T2: a checkpoint altered after signing is rejected, whichever line changed.
    #[test]
    fn t2_tampered_size_root_timestamp_or_origin_is_rejected() {
        let signer = signer();
        let text = signer.sign(&checkpoint(1042)).unwrap().to_text();
        let verifier = signer.verifier();
        let root_line = BASE64.encode(checkpoint(1042).root.as_bytes());
        let other_root = BASE64.encode(leaf_hash(b"other").as_bytes());
        let cases = [
            ("size", text.replacen("\n1042\n", "\n1041\n", 1)),
            ("root", text.replacen(&root_line, &other_root, 1)),
            ("timestamp", text.replacen("09:30:00Z", "09:31:00Z", 1)),
        ];
        for (what, tampered) in cases {
            assert_ne!(tampered, text, "{what} was not changed");
            assert_eq!(
                verifier.verify_text(&tampered),
                Err(CheckpointError::BadSignature),
                "{what}"
            );
        }
        // Another origin: not this log's checkpoint at all.
        let moved = text.replace(LOG, "elsewhere.example/audit");
        assert_eq!(
            verifier.verify_text(&moved),
            Err(CheckpointError::OriginMismatch)
        );
    }

    #[test]
    fn t2_tampered_signature_is_rejected() {
        let signer = signer();
        let signed = signer.sign(&checkpoint(7)).unwrap();
        let mut tampered = signed.clone();
        let mut line = tampered.signatures[0].clone();
        line.signature[10] ^= 0x01;
        tampered.signatures = vec![line];
        assert_eq!(
            signer.verifier().verify(&tampered),
            Err(CheckpointError::BadSignature)
        );
        // Reparsed from text too.
        assert_eq!(
            signer.verifier().verify_text(&tampered.to_text()),
            Err(CheckpointError::BadSignature)
        );
    }

    #[test]
    fn t2_checkpoint_signed_by_another_key_is_rejected() {
        let forger = signer();
        let forged = forger.sign(&checkpoint(7)).unwrap();
        let honest = signer();
        // Same log id, different key: the key id differs, so the line is an unknown key's.
        assert_eq!(
            honest.verifier().verify(&forged),
            Err(CheckpointError::NoSignatureFromKey)
        );
        // A forger who also copies the honest key id gets a failed signature.
        let mut copied = forged.clone();
        copied.signatures[0].key_id = honest.verifier().key_id;
        assert_eq!(
            honest.verifier().verify(&copied),
            Err(CheckpointError::BadSignature)
        );
    }

    #[test]
    fn witness_cosignatures_are_ignored_but_kept() {
        let signer = signer();
        let mut signed = signer.sign(&checkpoint(3)).unwrap();
        signed.add_signature(NoteSignature {
            key_name: "witness.example".into(),
            key_id: [1, 2, 3, 4],
            signature: vec![9; 72],
        });
        let reparsed = SignedCheckpoint::parse(&signed.to_text()).unwrap();
        assert_eq!(reparsed.signatures().len(), 2);
        assert_eq!(signer.verifier().verify(&reparsed).unwrap(), checkpoint(3));
    }

    #[test]
    fn verifier_from_printed_public_key() {
        let signer = signer();
        let verifier =
            CheckpointVerifier::from_public_key_base64(LOG, &signer.public_key_base64()).unwrap();
        assert_eq!(verifier, signer.verifier());
        assert_eq!(
            CheckpointVerifier::from_public_key_base64(LOG, "AAAA"),
            Err(KeyError::BadPublicKey)
        );
    }

    #[test]
    fn pkcs8_pem_round_trip_signs_with_the_same_key() {
        let signer = signer();
        let pem = signer.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let loaded = CheckpointSigner::from_pkcs8_pem(LOG, &pem).unwrap();
        assert_eq!(loaded.public_key_base64(), signer.public_key_base64());
        let signed = loaded.sign(&checkpoint(5)).unwrap();
        assert!(signer.verifier().verify(&signed).is_ok());
        assert!(!format!("{loaded:?}").contains(&pem[30..60]));
    }

    #[test]
    fn pkcs8_v1_pem_as_openssl_writes_it_is_accepted() {
        // RFC 8410 §10.3's example Ed25519 private key (PKCS#8 v1, the form
        // `openssl genpkey -algorithm ed25519` writes).
        let pem = "-----BEGIN PRIVATE KEY-----\n\
                   MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
                   -----END PRIVATE KEY-----\n";
        let signer = CheckpointSigner::from_pkcs8_pem(LOG, pem).unwrap();
        // RFC 8410 §10.1's example public key is the matching one.
        assert_eq!(
            signer.public_key_base64(),
            BASE64.encode([
                0x19, 0xbf, 0x44, 0x09, 0x69, 0x84, 0xcd, 0xfe, 0x85, 0x41, 0xba, 0xc1, 0x67, 0xdc,
                0x3b, 0x96, 0xc8, 0x50, 0x86, 0xaa, 0x30, 0xb6, 0xb6, 0xcb, 0x0c, 0x5c, 0x38, 0xad,
                0x70, 0x31, 0x66, 0xe1,
            ])
        );
    }

    #[test]
    fn key_errors() {
        assert_eq!(
            CheckpointSigner::from_pkcs8_pem(LOG, "not a key").unwrap_err(),
            KeyError::NotPem
        );
        let bad = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(matches!(
            CheckpointSigner::from_pkcs8_pem(LOG, bad),
            Err(KeyError::Rejected(_))
        ));
        assert_eq!(
            CheckpointSigner::generate("has space").unwrap_err(),
            KeyError::InvalidLogId
        );
        assert_eq!(
            signer().sign(&Checkpoint {
                log_id: "other.example".into(),
                ..checkpoint(1)
            }),
            Err(CheckpointError::SignerLogMismatch)
        );
    }

    /// Interoperability with the signed-note reference implementation: the key, text and
    /// signature from golang.org/x/mod/sumdb/note's `note_test.go` (values only). Ed25519 is
    /// deterministic, so our key id and signature must match byte for byte.
    #[test]
    fn signed_note_reference_vector() {
        // "PRIVATE+KEY+PeterNeumann+c74f20a3+" then base64(0x01 ‖ seed).
        let private = BASE64
            .decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")
            .unwrap();
        let key_pair = Ed25519KeyPair::from_seed_unchecked(&private[1..]).unwrap();
        let public = BASE64
            .decode("ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")
            .unwrap();
        assert_eq!(key_pair.public_key().as_ref(), &public[1..]);
        assert_eq!(
            key_id("PeterNeumann", &public[1..]),
            [0xc7, 0x4f, 0x20, 0xa3]
        );

        let text = "If you think cryptography is the answer to your problem,\n\
                    then you don't know what your problem is.\n";
        let mut blob = key_id("PeterNeumann", &public[1..]).to_vec();
        blob.extend_from_slice(key_pair.sign(text.as_bytes()).as_ref());
        assert_eq!(
            BASE64.encode(&blob),
            "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
        );
    }

    #[test]
    fn parse_errors_name_the_line() {
        let signer = signer();
        let text = signer.sign(&checkpoint(12)).unwrap().to_text();
        let cases: [(String, usize); 6] = [
            (text.replacen("\n12\n", "\n012\n", 1), 2),
            (text.replacen("\n12\n", "\n-1\n", 1), 2),
            (text.replacen("timestamp ", "time ", 1), 4),
            (text.replacen("\u{2014} ", "- ", 1), 6),
            (text.replacen(LOG, "a+b", 1), 1),
            (text.replacen("\n\n", "\nextra\n\n", 1), 0),
        ];
        for (bad, line) in cases {
            match SignedCheckpoint::parse(&bad) {
                Err(CheckpointError::Malformed { line: found, .. }) => {
                    assert_eq!(found, line, "{bad}");
                }
                other => panic!("expected a malformed error for {bad:?}, got {other:?}"),
            }
        }
        assert!(matches!(
            SignedCheckpoint::parse(&text.replacen('\n', "\r", 1)),
            Err(CheckpointError::Malformed { line: 0, .. })
        ));
        let unsigned = &text[..text.find("\n\n").unwrap() + 2];
        assert_eq!(
            SignedCheckpoint::parse(unsigned),
            Err(malformed(0, "the checkpoint has no signature lines"))
        );
        assert!(matches!(
            SignedCheckpoint::parse(&text[..text.len() - 1]),
            Err(CheckpointError::Malformed { line: 0, .. })
        ));
        assert!(matches!(
            SignedCheckpoint::parse(&"x".repeat(MAX_NOTE_BYTES + 1)),
            Err(CheckpointError::Malformed { line: 0, .. })
        ));
    }

    #[test]
    fn schedule_is_due_by_count_or_time_once_the_log_has_grown() {
        let schedule = CheckpointSchedule {
            every_events: NonZeroU64::new(100).unwrap(),
            every: Duration::seconds(60),
        };
        let last = checkpoint(1000);
        let t = last.timestamp;
        assert!(schedule.is_due(None, 0, t));
        assert!(!schedule.is_due(Some(&last), 1000, t + Duration::hours(1)));
        assert!(!schedule.is_due(Some(&last), 1099, t + Duration::seconds(59)));
        assert!(schedule.is_due(Some(&last), 1100, t));
        assert!(schedule.is_due(Some(&last), 1001, t + Duration::seconds(60)));
    }
}
