//! Offline verification of an audit log against its signed checkpoints (DOMAIN.md B2 `T1`, `T2`).
//!
//! [`LogVerifier`] takes events one at a time in sequence order, recomputes each leaf
//! ([`crate::event_hash`]), appends it to a [`Frontier`] and, whenever the tree reaches a
//! checkpoint's size, compares the recomputed root with the signed one (RFC 9162 §2.1.1, §4.10).
//! It holds only the frontier, the checkpoints and a bounded list of findings, so the CLI can
//! stream any number of events from SQLite through it.
//!
//! What each kind of tampering looks like:
//!
//! | Tampering | Finding |
//! |---|---|
//! | an event row deleted | [`Finding::SequenceGap`] naming the first missing sequence number |
//! | events reordered (in an export) or a row duplicated | [`Finding::SequenceGap`] / [`Finding::SequenceOutOfOrder`] |
//! | an event edited in place | [`Finding::CheckpointMismatch`] for the first checkpoint covering it (the range of sequence numbers it proves); with recorded leaf hashes, also [`Finding::LeafMismatch`] naming the exact event |
//! | the log truncated, or rolled back to an older state | [`Finding::LogShorterThanCheckpoint`] (a witness's checkpoint is beyond the log's end) |
//! | a rolled-back log that has grown again (a fork) | [`Finding::CheckpointMismatch`] against the witness's checkpoint |
//! | a forged or altered checkpoint | [`Finding::CheckpointRejected`] |
//! | two validly signed checkpoints for one size with different roots | [`Finding::ConflictingCheckpoints`]: the log key signed a fork |
//!
//! Events after the last verified checkpoint are not yet attested: truncating them is not
//! detectable until the next checkpoint exists ([`VerifyReport::unattested_events`]); the
//! checkpoint schedule bounds that window.
//!
//! No finding carries event content: findings name sequence numbers and sizes only.

use std::fmt;

use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointVerifier, SignedCheckpoint};
use crate::event_hash::AuditLeaf;
use crate::merkle::{Frontier, Hash, verify_consistency, verify_inclusion};

/// At most this many findings are kept in a report (the rest are counted), so a badly damaged
/// log cannot exhaust memory.
pub const MAX_FINDINGS: usize = 100;

/// One thing verification found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Sequence numbers jump: events `expected..found` are missing (deleted), or later events
    /// were moved ahead of them.
    SequenceGap { expected: u64, found: u64 },
    /// A sequence number at or below one already seen: a duplicate or a reorder.
    SequenceOutOfOrder { expected: u64, found: u64 },
    /// The event at `seq` could not be encoded (so it cannot be checked).
    UnencodableEvent { seq: u64 },
    /// The event at `seq` does not hash to the leaf recorded for it: the event (or the recorded
    /// leaf) was altered.
    LeafMismatch { seq: u64 },
    /// The tree recomputed from the events differs from the signed checkpoint of
    /// `checkpoint_size` events: an event in `first_unproven_seq..=checkpoint_size` was altered,
    /// or the checkpoint comes from a fork of the log. `recorded_leaves_match` says whether the
    /// recorded leaf hashes (if any were given) match the checkpoint; if they do, the
    /// [`Finding::LeafMismatch`] findings name the altered events exactly.
    CheckpointMismatch {
        checkpoint_size: u64,
        first_unproven_seq: u64,
        recorded_leaves_match: Option<bool>,
    },
    /// A signed checkpoint covers more events than the log holds: the log was truncated or
    /// rolled back after the checkpoint was signed.
    LogShorterThanCheckpoint { checkpoint_size: u64, log_size: u64 },
    /// A checkpoint beyond a sequence break cannot be checked (the tree is incomplete).
    CheckpointNotChecked { checkpoint_size: u64 },
    /// The checkpoint at `position` in the given list failed signature or origin checks.
    CheckpointRejected {
        position: usize,
        error: CheckpointError,
    },
    /// Two validly signed checkpoints give different roots for the same size: the log's key
    /// signed two histories.
    ConflictingCheckpoints { size: u64 },
}

impl Finding {
    /// The earliest sequence number this finding shows to be bad, where it names one.
    pub fn first_bad_seq(&self) -> Option<u64> {
        match *self {
            Self::SequenceGap { expected, .. } | Self::SequenceOutOfOrder { expected, .. } => {
                Some(expected)
            }
            Self::UnencodableEvent { seq } | Self::LeafMismatch { seq } => Some(seq),
            // With authenticated recorded leaves, the leaf mismatches are exact; otherwise the
            // range's start is the best bound.
            Self::CheckpointMismatch {
                recorded_leaves_match: Some(true),
                ..
            } => None,
            Self::CheckpointMismatch {
                first_unproven_seq, ..
            } => Some(first_unproven_seq),
            Self::LogShorterThanCheckpoint { log_size, .. } => Some(log_size + 1),
            Self::CheckpointNotChecked { .. }
            | Self::CheckpointRejected { .. }
            | Self::ConflictingCheckpoints { .. } => None,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SequenceGap { expected, found } => write!(
                f,
                "sequence gap: expected event {expected}, found {found} (events deleted or reordered)"
            ),
            Self::SequenceOutOfOrder { expected, found } => write!(
                f,
                "sequence out of order: expected event {expected}, found {found} (duplicated or reordered)"
            ),
            Self::UnencodableEvent { seq } => write!(f, "event {seq} cannot be encoded"),
            Self::LeafMismatch { seq } => {
                write!(
                    f,
                    "event {seq} does not match its recorded leaf hash (altered)"
                )
            }
            Self::CheckpointMismatch {
                checkpoint_size,
                first_unproven_seq,
                ..
            } => write!(
                f,
                "the log does not match the signed checkpoint at size {checkpoint_size}: an event \
                 in {first_unproven_seq}..={checkpoint_size} was altered, or the checkpoint is \
                 from a fork"
            ),
            Self::LogShorterThanCheckpoint {
                checkpoint_size,
                log_size,
            } => write!(
                f,
                "the log ends at event {log_size} but a signed checkpoint covers {checkpoint_size} \
                 events (truncated or rolled back)"
            ),
            Self::CheckpointNotChecked { checkpoint_size } => write!(
                f,
                "the checkpoint at size {checkpoint_size} could not be checked after a sequence break"
            ),
            Self::CheckpointRejected { position, error } => {
                write!(f, "checkpoint #{position} rejected: {error}")
            }
            Self::ConflictingCheckpoints { size } => write!(
                f,
                "two signed checkpoints disagree on the root at size {size} (the log key signed a fork)"
            ),
        }
    }
}

/// The outcome of verifying a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Events read.
    pub events: u64,
    /// Length of the contiguous run of events from sequence number 1 that the tree covers.
    pub tree_size: u64,
    /// Root of that tree.
    pub root: Hash,
    /// Checkpoints given, and how many were authentic and matched the log.
    pub checkpoints_given: usize,
    pub checkpoints_matched: usize,
    /// The largest size proven by a matching checkpoint (0 if none).
    pub attested_size: u64,
    /// The first [`MAX_FINDINGS`] findings, in the order found.
    pub findings: Vec<Finding>,
    /// All findings, including those not kept.
    pub findings_total: u64,
    /// The earliest bad sequence number over all findings (kept or not).
    pub first_bad_seq: Option<u64>,
}

impl VerifyReport {
    /// True when nothing is wrong. (A log with no checkpoints is "ok" but unattested: check
    /// [`VerifyReport::unattested_events`].)
    pub fn is_ok(&self) -> bool {
        self.findings_total == 0
    }

    /// Events beyond the last matching checkpoint: consistent, but not yet provable.
    pub fn unattested_events(&self) -> u64 {
        self.events.saturating_sub(self.attested_size)
    }
}

/// Incremental verifier: [`LogVerifier::push`] each event in sequence order, then
/// [`LogVerifier::finish`].
#[derive(Debug)]
pub struct LogVerifier {
    /// Authentic checkpoints by size (ascending), deduplicated.
    checkpoints: Vec<Checkpoint>,
    next_checkpoint: usize,
    checkpoints_given: usize,
    checkpoints_matched: usize,
    attested_size: u64,
    /// The tree of recomputed leaves.
    computed: Frontier,
    /// The tree of recorded leaves (the recomputed leaf where none was recorded).
    recorded: Frontier,
    recorded_given: bool,
    expected_seq: u64,
    /// Set at the first sequence break: the tree stops there.
    broken: bool,
    events: u64,
    findings: Vec<Finding>,
    findings_total: u64,
    first_bad_seq: Option<u64>,
}

impl LogVerifier {
    /// A verifier for the log `verifier` is for; `checkpoints` in any order. Checkpoints that
    /// fail their signature or origin check are reported and otherwise ignored.
    pub fn new(checkpoints: &[SignedCheckpoint], verifier: &CheckpointVerifier) -> Self {
        let mut this = Self {
            checkpoints: Vec::new(),
            next_checkpoint: 0,
            checkpoints_given: checkpoints.len(),
            checkpoints_matched: 0,
            attested_size: 0,
            computed: Frontier::new(),
            recorded: Frontier::new(),
            recorded_given: false,
            expected_seq: 1,
            broken: false,
            events: 0,
            findings: Vec::new(),
            findings_total: 0,
            first_bad_seq: None,
        };
        let mut authentic = Vec::with_capacity(checkpoints.len());
        for (position, signed) in checkpoints.iter().enumerate() {
            match verifier.verify(signed) {
                Ok(checkpoint) => authentic.push(checkpoint),
                Err(error) => this.report(Finding::CheckpointRejected { position, error }),
            }
        }
        authentic.sort_by(|a, b| a.size.cmp(&b.size).then_with(|| a.root.cmp(&b.root)));
        authentic
            .dedup_by(|later, earlier| later.size == earlier.size && later.root == earlier.root);
        for pair in authentic.windows(2) {
            if let [a, b] = pair
                && a.size == b.size
            {
                this.report(Finding::ConflictingCheckpoints { size: a.size });
            }
        }
        this.checkpoints = authentic;
        // Checkpoints of the empty log are checked before any event arrives.
        this.check_checkpoints();
        this
    }

    /// Feeds the event with sequence number `seq`.
    pub fn push<E: AuditLeaf + ?Sized>(&mut self, seq: u64, event: &E) {
        self.push_inner(seq, event, None);
    }

    /// Feeds the event with sequence number `seq` together with the leaf hash the store recorded
    /// for it when it was written. A mismatch names the altered event exactly; the recorded
    /// leaves are themselves checked against the checkpoints.
    pub fn push_with_recorded_leaf<E: AuditLeaf + ?Sized>(
        &mut self,
        seq: u64,
        event: &E,
        recorded_leaf: Hash,
    ) {
        self.recorded_given = true;
        self.push_inner(seq, event, Some(recorded_leaf));
    }

    fn push_inner<E: AuditLeaf + ?Sized>(&mut self, seq: u64, event: &E, recorded: Option<Hash>) {
        self.events += 1;
        if seq != self.expected_seq {
            let expected = self.expected_seq;
            if seq > expected {
                self.report(Finding::SequenceGap {
                    expected,
                    found: seq,
                });
                self.expected_seq = seq.saturating_add(1);
            } else {
                self.report(Finding::SequenceOutOfOrder {
                    expected,
                    found: seq,
                });
            }
            self.broken = true;
        } else {
            self.expected_seq = seq.saturating_add(1);
        }

        let Ok(computed) = event.audit_leaf_hash(seq) else {
            self.report(Finding::UnencodableEvent { seq });
            self.broken = true;
            return;
        };
        if let Some(recorded) = recorded
            && recorded != computed
        {
            self.report(Finding::LeafMismatch { seq });
        }
        if self.broken {
            return;
        }
        self.computed.append(computed);
        self.recorded.append(recorded.unwrap_or(computed));
        self.check_checkpoints();
    }

    /// Compares every checkpoint of the current tree size with the recomputed root.
    fn check_checkpoints(&mut self) {
        let size = self.computed.size();
        while let Some(checkpoint) = self.checkpoints.get(self.next_checkpoint) {
            if checkpoint.size > size {
                break;
            }
            self.next_checkpoint += 1;
            if checkpoint.root == self.computed.root() {
                self.checkpoints_matched += 1;
                self.attested_size = self.attested_size.max(checkpoint.size);
            } else {
                let recorded_leaves_match = self
                    .recorded_given
                    .then(|| checkpoint.root == self.recorded.root());
                let finding = Finding::CheckpointMismatch {
                    checkpoint_size: checkpoint.size,
                    first_unproven_seq: self.attested_size + 1,
                    recorded_leaves_match,
                };
                self.report(finding);
            }
        }
    }

    fn report(&mut self, finding: Finding) {
        if let Some(seq) = finding.first_bad_seq() {
            self.first_bad_seq = Some(self.first_bad_seq.map_or(seq, |first| first.min(seq)));
        }
        self.findings_total += 1;
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(finding);
        }
    }

    /// Ends the stream: checkpoints beyond the log's end are reported as truncation.
    pub fn finish(mut self) -> VerifyReport {
        let remaining: Vec<u64> = self
            .checkpoints
            .get(self.next_checkpoint..)
            .unwrap_or_default()
            .iter()
            .map(|checkpoint| checkpoint.size)
            .collect();
        let log_size = self.computed.size();
        for checkpoint_size in remaining {
            if self.broken {
                self.report(Finding::CheckpointNotChecked { checkpoint_size });
            } else {
                self.report(Finding::LogShorterThanCheckpoint {
                    checkpoint_size,
                    log_size,
                });
            }
        }
        VerifyReport {
            events: self.events,
            tree_size: log_size,
            root: self.computed.root(),
            checkpoints_given: self.checkpoints_given,
            checkpoints_matched: self.checkpoints_matched,
            attested_size: self.attested_size,
            findings: self.findings,
            findings_total: self.findings_total,
            first_bad_seq: self.first_bad_seq,
        }
    }
}

/// Verifies a whole log: `events` as `(sequence number, event)` in the order stored, against
/// the log's signed `checkpoints`. Memory is bounded by the checkpoints, not the events.
pub fn verify_log<I, E>(
    events: I,
    checkpoints: &[SignedCheckpoint],
    verifier: &CheckpointVerifier,
) -> VerifyReport
where
    I: IntoIterator<Item = (u64, E)>,
    E: AuditLeaf,
{
    let mut log = LogVerifier::new(checkpoints, verifier);
    for (seq, event) in events {
        log.push(seq, &event);
    }
    log.finish()
}

/// Why two checkpoints are not consistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsistencyError {
    #[error("the checkpoints are from different logs")]
    DifferentLogs,
    #[error("the older checkpoint ({old_size} events) is larger than the newer ({new_size})")]
    OlderIsLarger { old_size: u64, new_size: u64 },
    /// The newer log does not extend the older one: a fork, or a rewritten history.
    #[error(
        "the log at {new_size} events does not extend the log at {old_size} events (a fork or rewrite)"
    )]
    NotConsistent { old_size: u64, new_size: u64 },
}

/// For witnesses: proves that `new` extends `old` (both already verified with a
/// [`CheckpointVerifier`]) with an RFC 9162 §2.1.4 consistency proof, e.g. one the CLI made with
/// [`crate::merkle::ProofBuilder::consistency`].
pub fn verify_consistency_between(
    old: &Checkpoint,
    new: &Checkpoint,
    proof: &[Hash],
) -> Result<(), ConsistencyError> {
    if old.log_id != new.log_id {
        return Err(ConsistencyError::DifferentLogs);
    }
    if old.size > new.size {
        return Err(ConsistencyError::OlderIsLarger {
            old_size: old.size,
            new_size: new.size,
        });
    }
    if verify_consistency(old.size, new.size, &old.root, &new.root, proof) {
        Ok(())
    } else {
        Err(ConsistencyError::NotConsistent {
            old_size: old.size,
            new_size: new.size,
        })
    }
}

/// Proves that `event` is the event with sequence number `seq` in the log `checkpoint` (already
/// verified) describes, with an RFC 9162 §2.1.3 inclusion proof. False also when the event
/// cannot be encoded.
pub fn verify_event_inclusion<E: AuditLeaf + ?Sized>(
    checkpoint: &Checkpoint,
    seq: u64,
    event: &E,
    proof: &[Hash],
) -> bool {
    let Some(index) = seq.checked_sub(1) else {
        return false;
    };
    event
        .audit_leaf_hash(seq)
        .is_ok_and(|leaf| verify_inclusion(&leaf, index, checkpoint.size, proof, &checkpoint.root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::CheckpointSigner;
    use crate::event_hash::{CanonicalEvent, canonical_event_bytes};
    use crate::merkle::{ProofBuilder, inclusion_proof};
    use crate::{Action, Actor, AuditEvent, Outcome};
    use time::OffsetDateTime;
    use time::macros::datetime;

    const LOG: &str = "caregate.example/audit";

    fn event(n: u64) -> AuditEvent {
        let mut event = AuditEvent::new(
            format!("req-{n}"),
            Actor {
                partner_id: Some("acute-trust".into()),
                ..Actor::default()
            },
            Action::Read,
            Outcome::Success,
        );
        event.recorded = datetime!(2025-03-28 09:30:00 UTC) + time::Duration::seconds(n as i64);
        event.patient = Some("9434765919".into());
        event
    }

    /// A log of `n` events as the store would hold it: (seq, canonical bytes, recorded leaf).
    struct Fixture {
        signer: CheckpointSigner,
        rows: Vec<(u64, Vec<u8>, Hash)>,
    }

    impl Fixture {
        fn new(n: u64) -> Self {
            let rows = (1..=n)
                .map(|seq| {
                    let bytes = canonical_event_bytes(&event(seq)).unwrap();
                    let leaf = CanonicalEvent(&bytes).audit_leaf_hash(seq).unwrap();
                    (seq, bytes, leaf)
                })
                .collect();
            Self {
                signer: CheckpointSigner::generate(LOG).unwrap(),
                rows,
            }
        }

        /// Signed checkpoints at the given sizes over the untampered rows.
        fn checkpoints(&self, sizes: &[u64]) -> Vec<SignedCheckpoint> {
            sizes
                .iter()
                .map(|&size| self.checkpoint_over(&self.rows, size))
                .collect()
        }

        fn checkpoint_over(&self, rows: &[(u64, Vec<u8>, Hash)], size: u64) -> SignedCheckpoint {
            let mut frontier = Frontier::new();
            for (_, _, leaf) in rows.iter().take(size as usize) {
                frontier.append(*leaf);
            }
            self.signer
                .sign(&Checkpoint {
                    log_id: LOG.into(),
                    size,
                    root: frontier.root(),
                    timestamp: OffsetDateTime::UNIX_EPOCH,
                })
                .unwrap()
        }

        fn verify(
            &self,
            rows: &[(u64, Vec<u8>, Hash)],
            checkpoints: &[SignedCheckpoint],
        ) -> VerifyReport {
            verify_log(
                rows.iter()
                    .map(|(seq, bytes, _)| (*seq, CanonicalEvent(bytes.as_slice()))),
                checkpoints,
                &self.signer.verifier(),
            )
        }

        fn verify_with_recorded_leaves(
            &self,
            rows: &[(u64, Vec<u8>, Hash)],
            checkpoints: &[SignedCheckpoint],
        ) -> VerifyReport {
            let mut log = LogVerifier::new(checkpoints, &self.signer.verifier());
            for (seq, bytes, leaf) in rows {
                log.push_with_recorded_leaf(*seq, &CanonicalEvent(bytes), *leaf);
            }
            log.finish()
        }
    }

    fn modified(bytes: &[u8]) -> Vec<u8> {
        String::from_utf8(bytes.to_vec())
            .unwrap()
            .replace("9434765919", "9434765870")
            .into_bytes()
    }

    #[test]
    fn an_untouched_log_verifies_against_every_checkpoint() {
        let fixture = Fixture::new(40);
        let checkpoints = fixture.checkpoints(&[0, 1, 16, 17, 40]);
        let report = fixture.verify(&fixture.rows, &checkpoints);
        assert!(report.is_ok(), "{:?}", report.findings);
        assert_eq!(report.events, 40);
        assert_eq!(report.tree_size, 40);
        assert_eq!(report.checkpoints_matched, 5);
        assert_eq!(report.attested_size, 40);
        assert_eq!(report.unattested_events(), 0);
        assert_eq!(report.first_bad_seq, None);

        // AuditEvent values hash the same as their canonical bytes.
        let from_events = verify_log(
            (1..=40).map(|seq| (seq, event(seq))),
            &checkpoints,
            &fixture.signer.verifier(),
        );
        assert!(from_events.is_ok());
        assert_eq!(from_events.root, report.root);
    }

    #[test]
    fn t1_deleted_event_is_named() {
        let fixture = Fixture::new(20);
        let checkpoints = fixture.checkpoints(&[10, 20]);
        let mut rows = fixture.rows.clone();
        rows.remove(6); // seq 7
        let report = fixture.verify(&rows, &checkpoints);
        assert_eq!(report.first_bad_seq, Some(7));
        assert_eq!(
            report.findings,
            vec![
                Finding::SequenceGap {
                    expected: 7,
                    found: 8
                },
                Finding::CheckpointNotChecked {
                    checkpoint_size: 10
                },
                Finding::CheckpointNotChecked {
                    checkpoint_size: 20
                },
            ]
        );
    }

    #[test]
    fn t1_deleted_event_with_renumbering_is_caught_by_the_checkpoint() {
        let fixture = Fixture::new(20);
        let checkpoints = fixture.checkpoints(&[5, 10, 20]);
        let mut rows = fixture.rows.clone();
        rows.remove(6);
        for (i, row) in rows.iter_mut().enumerate() {
            row.0 = i as u64 + 1;
        }
        let report = fixture.verify(&rows, &checkpoints);
        assert_eq!(report.first_bad_seq, Some(6));
        assert_eq!(
            report.findings[0],
            Finding::CheckpointMismatch {
                checkpoint_size: 10,
                first_unproven_seq: 6,
                recorded_leaves_match: None
            }
        );
    }

    #[test]
    fn t1_modified_event_is_bounded_by_checkpoints_and_named_by_recorded_leaves() {
        let fixture = Fixture::new(20);
        let checkpoints = fixture.checkpoints(&[8, 16, 20]);
        let mut rows = fixture.rows.clone();
        rows[11].1 = modified(&rows[11].1); // seq 12

        let report = fixture.verify(&rows, &checkpoints);
        assert_eq!(report.first_bad_seq, Some(9));
        assert_eq!(report.checkpoints_matched, 1);
        assert_eq!(
            report.findings,
            vec![
                Finding::CheckpointMismatch {
                    checkpoint_size: 16,
                    first_unproven_seq: 9,
                    recorded_leaves_match: None
                },
                Finding::CheckpointMismatch {
                    checkpoint_size: 20,
                    first_unproven_seq: 9,
                    recorded_leaves_match: None
                },
            ]
        );

        // With the leaves the store recorded at write time, the exact event is named, and the
        // recorded leaves are shown authentic by the checkpoints.
        let report = fixture.verify_with_recorded_leaves(&rows, &checkpoints);
        assert_eq!(report.first_bad_seq, Some(12));
        assert_eq!(report.findings[0], Finding::LeafMismatch { seq: 12 });
        assert_eq!(
            report.findings[1],
            Finding::CheckpointMismatch {
                checkpoint_size: 16,
                first_unproven_seq: 9,
                recorded_leaves_match: Some(true)
            }
        );

        // An attacker who also rewrites the recorded leaf is still caught by the checkpoint.
        rows[11].2 = CanonicalEvent(&rows[11].1).audit_leaf_hash(12).unwrap();
        let report = fixture.verify_with_recorded_leaves(&rows, &checkpoints);
        assert_eq!(report.first_bad_seq, Some(9));
        assert_eq!(
            report.findings[0],
            Finding::CheckpointMismatch {
                checkpoint_size: 16,
                first_unproven_seq: 9,
                recorded_leaves_match: Some(false)
            }
        );
    }

    #[test]
    fn t1_reordered_events_are_named() {
        let fixture = Fixture::new(10);
        let checkpoints = fixture.checkpoints(&[10]);

        // Rows delivered out of order (an export edited by hand).
        let mut rows = fixture.rows.clone();
        rows.swap(3, 4); // seq 5 before seq 4
        let report = fixture.verify(&rows, &checkpoints);
        assert_eq!(report.first_bad_seq, Some(4));
        assert_eq!(
            report.findings[..2],
            [
                Finding::SequenceGap {
                    expected: 4,
                    found: 5
                },
                Finding::SequenceOutOfOrder {
                    expected: 6,
                    found: 4
                },
            ]
        );

        // Contents swapped between two sequence numbers (rows edited in SQLite).
        let mut rows = fixture.rows.clone();
        let (a, b) = (rows[3].1.clone(), rows[4].1.clone());
        rows[3].1 = b;
        rows[4].1 = a;
        let report = fixture.verify_with_recorded_leaves(&rows, &checkpoints);
        assert_eq!(report.first_bad_seq, Some(4));
        assert_eq!(report.findings[0], Finding::LeafMismatch { seq: 4 });
        assert_eq!(report.findings[1], Finding::LeafMismatch { seq: 5 });
    }

    #[test]
    fn t1_truncated_log_is_named() {
        let fixture = Fixture::new(20);
        let checkpoints = fixture.checkpoints(&[10, 20]);
        let report = fixture.verify(&fixture.rows[..15], &checkpoints);
        assert_eq!(report.first_bad_seq, Some(16));
        assert_eq!(
            report.findings,
            vec![Finding::LogShorterThanCheckpoint {
                checkpoint_size: 20,
                log_size: 15
            }]
        );
        assert_eq!(report.attested_size, 10);
        assert_eq!(report.unattested_events(), 5);
    }

    #[test]
    fn t1_truncation_after_the_last_checkpoint_is_visible_only_as_unattested() {
        let fixture = Fixture::new(20);
        let checkpoints = fixture.checkpoints(&[10]);
        let report = fixture.verify(&fixture.rows[..15], &checkpoints);
        assert!(report.is_ok());
        assert_eq!(report.unattested_events(), 5);
    }

    #[test]
    fn t2_rolled_back_log_is_detected_by_a_witness_checkpoint() {
        let fixture = Fixture::new(20);
        // A witness holds the checkpoint at 20; the database is restored to a backup of 12
        // events.
        let witness = fixture.checkpoints(&[20]);
        let report = fixture.verify(&fixture.rows[..12], &witness);
        assert_eq!(report.first_bad_seq, Some(13));
        assert_eq!(
            report.findings,
            vec![Finding::LogShorterThanCheckpoint {
                checkpoint_size: 20,
                log_size: 12
            }]
        );
    }

    #[test]
    fn t2_forked_log_is_detected() {
        let fixture = Fixture::new(20);
        let witness = fixture.checkpoints(&[16]);
        // Rolled back to 12 events, then different events written from 13 on, and the log
        // re-signed its new history (an insider with the key).
        let mut forked = fixture.rows[..12].to_vec();
        for seq in 13..=20 {
            let bytes = modified(&canonical_event_bytes(&event(seq)).unwrap());
            let leaf = CanonicalEvent(&bytes).audit_leaf_hash(seq).unwrap();
            forked.push((seq, bytes, leaf));
        }
        let resigned = fixture.checkpoint_over(&forked, 20);

        // The forked log verifies against its own new checkpoint...
        assert!(
            fixture
                .verify(&forked, std::slice::from_ref(&resigned))
                .is_ok()
        );
        // ...but not against the witness's.
        let report = fixture.verify(&forked, &[witness[0].clone(), resigned.clone()]);
        assert_eq!(
            report.findings,
            vec![Finding::CheckpointMismatch {
                checkpoint_size: 16,
                first_unproven_seq: 1,
                recorded_leaves_match: None
            }]
        );
        // And the witness can show the two signed checkpoints are inconsistent without the log.
        let verifier = fixture.signer.verifier();
        let old = verifier.verify(&witness[0]).unwrap();
        let new = verifier.verify(&resigned).unwrap();
        let mut builder = ProofBuilder::consistency(16, 20).unwrap();
        for (_, _, leaf) in &forked {
            builder.push(*leaf);
        }
        assert_eq!(
            verify_consistency_between(&old, &new, &builder.finish().unwrap()),
            Err(ConsistencyError::NotConsistent {
                old_size: 16,
                new_size: 20
            })
        );

        // Two signed checkpoints of one size with different roots are a fork by themselves.
        let forked_16 = fixture.checkpoint_over(&forked, 16);
        let report = fixture.verify(&fixture.rows, &[witness[0].clone(), forked_16]);
        assert!(
            report
                .findings
                .contains(&Finding::ConflictingCheckpoints { size: 16 })
        );
    }

    #[test]
    fn t2_forged_checkpoint_is_rejected() {
        let fixture = Fixture::new(10);
        let forger = CheckpointSigner::generate(LOG).unwrap();
        let forged = forger
            .sign(&Checkpoint {
                log_id: LOG.into(),
                size: 10,
                root: Hash::from_bytes([7; 32]),
                timestamp: OffsetDateTime::UNIX_EPOCH,
            })
            .unwrap();
        let report = fixture.verify(&fixture.rows, &[forged]);
        assert_eq!(
            report.findings,
            vec![Finding::CheckpointRejected {
                position: 0,
                error: CheckpointError::NoSignatureFromKey
            }]
        );
        assert_eq!(report.checkpoints_matched, 0);
    }

    #[test]
    fn consistency_between_honest_checkpoints_verifies() {
        let fixture = Fixture::new(30);
        let signed = fixture.checkpoints(&[11, 30]);
        let verifier = fixture.signer.verifier();
        let old = verifier.verify(&signed[0]).unwrap();
        let new = verifier.verify(&signed[1]).unwrap();
        let mut builder = ProofBuilder::consistency(11, 30).unwrap();
        for (_, _, leaf) in &fixture.rows {
            builder.push(*leaf);
        }
        let proof = builder.finish().unwrap();
        assert_eq!(verify_consistency_between(&old, &new, &proof), Ok(()));
        assert_eq!(
            verify_consistency_between(&new, &old, &proof),
            Err(ConsistencyError::OlderIsLarger {
                old_size: 30,
                new_size: 11
            })
        );
    }

    #[test]
    fn event_inclusion_in_a_checkpoint() {
        let fixture = Fixture::new(9);
        let checkpoint = fixture
            .signer
            .verifier()
            .verify(&fixture.checkpoints(&[9])[0])
            .unwrap();
        let leaves: Vec<Hash> = fixture.rows.iter().map(|row| row.2).collect();
        let proof = inclusion_proof(&leaves, 4).unwrap();
        assert!(verify_event_inclusion(&checkpoint, 5, &event(5), &proof));
        assert!(!verify_event_inclusion(&checkpoint, 6, &event(5), &proof));
        assert!(!verify_event_inclusion(&checkpoint, 5, &event(6), &proof));
        assert!(!verify_event_inclusion(&checkpoint, 0, &event(5), &proof));
    }

    #[test]
    fn findings_are_bounded_and_carry_no_event_content() {
        let fixture = Fixture::new(1);
        let rows: Vec<(u64, Vec<u8>, Hash)> = (0..500)
            .map(|i| (i * 2 + 1, fixture.rows[0].1.clone(), fixture.rows[0].2))
            .collect();
        let report = fixture.verify(&rows, &[]);
        assert_eq!(report.findings.len(), MAX_FINDINGS);
        assert_eq!(report.findings_total, 499);
        assert_eq!(report.first_bad_seq, Some(2));
        for finding in &report.findings {
            assert!(!finding.to_string().contains("9434765919"));
        }
    }
}
