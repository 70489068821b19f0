//! Merkle tree hashing for the audit log, as RFC 9162 §2.1 defines it (the same tree as RFC 6962
//! §2.1, so standard transparency-log tooling and witnesses agree with our roots).
//!
//! - Leaves and nodes are domain-separated (§2.1.1): `leaf = SHA-256(0x00 ‖ data)`,
//!   `node = SHA-256(0x01 ‖ left ‖ right)`, so no leaf can pose as an interior node (the
//!   second-preimage forgery DOMAIN.md B1 "Verifiable logs" warns of).
//! - `MTH` of `n > 1` leaves splits at `k`, the largest power of two smaller than `n` (§2.1.1);
//!   the empty tree's root is `SHA-256("")`.
//! - Inclusion proofs follow §2.1.3.1 (generation) and §2.1.3.2 (verification); consistency proofs
//!   follow §2.1.4.1 and §2.1.4.2. Both are O(log n) hashes.
//!
//! [`Frontier`] is what the store keeps: the roots of the perfect subtrees covering the leaves so
//! far (at most 64 hashes), enough to append a leaf and compute the root at any size without
//! holding the leaves. [`ProofBuilder`] produces a proof from a stream of leaves with the same
//! bounded memory, so a proof for a witness never needs the whole log in memory.
//!
//! Architecture invariant: this module is pure computation; SHA-256 comes from aws-lc-rs, the
//! project's one crypto provider.

use std::fmt;
use std::ops::Range;

use aws_lc_rs::digest;

/// Length in bytes of a SHA-256 hash.
pub const HASH_LEN: usize = 32;

/// Domain-separation prefix of a leaf hash (RFC 9162 §2.1.1).
const LEAF_PREFIX: u8 = 0x00;
/// Domain-separation prefix of an interior node hash (RFC 9162 §2.1.1).
const NODE_PREFIX: u8 = 0x01;

/// A SHA-256 hash: a leaf, an interior node or a tree root.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash([u8; HASH_LEN]);

impl Hash {
    /// Wraps 32 bytes.
    pub const fn from_bytes(bytes: [u8; HASH_LEN]) -> Self {
        Self(bytes)
    }

    /// Wraps a slice, if it is exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; HASH_LEN]>::try_from(bytes).ok().map(Self)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; HASH_LEN] {
        &self.0
    }

    /// Lower-case hex, as reports and the store's text columns show hashes.
    pub fn to_hex(&self) -> String {
        use fmt::Write as _;
        let mut out = String::with_capacity(HASH_LEN * 2);
        for byte in self.0 {
            // Writing to a String cannot fail.
            let _ = write!(out, "{byte:02x}");
        }
        out
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(text: &str) -> Option<Self> {
        let digits = text.as_bytes();
        if digits.len() != HASH_LEN * 2 {
            return None;
        }
        let mut out = [0u8; HASH_LEN];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let high = char::from(pair[0]).to_digit(16)?;
            let low = char::from(pair[1]).to_digit(16)?;
            *byte = u8::try_from(high * 16 + low).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_hex())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl AsRef<[u8]> for Hash {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<[u8; HASH_LEN]> for Hash {
    fn from(bytes: [u8; HASH_LEN]) -> Self {
        Self(bytes)
    }
}

/// SHA-256 over the concatenation of `parts`, without building the concatenation.
pub(crate) fn sha256(parts: &[&[u8]]) -> Hash {
    let mut context = digest::Context::new(&digest::SHA256);
    for part in parts {
        context.update(part);
    }
    let digest = context.finish();
    let mut out = [0u8; HASH_LEN];
    // SHA-256 output is always 32 bytes; `zip` keeps this panic-free regardless.
    for (dst, src) in out.iter_mut().zip(digest.as_ref()) {
        *dst = *src;
    }
    Hash(out)
}

/// The root of the empty tree: `SHA-256("")` (RFC 9162 §2.1.1).
pub fn empty_root() -> Hash {
    sha256(&[])
}

/// The hash of one leaf: `SHA-256(0x00 ‖ data)` (RFC 9162 §2.1.1).
pub fn leaf_hash(data: &[u8]) -> Hash {
    sha256(&[&[LEAF_PREFIX], data])
}

/// A leaf hash over `parts` concatenated, without copying them into one buffer.
pub(crate) fn leaf_hash_parts(parts: &[&[u8]]) -> Hash {
    let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
    all.push(&[LEAF_PREFIX]);
    all.extend_from_slice(parts);
    sha256(&all)
}

/// The hash of an interior node: `SHA-256(0x01 ‖ left ‖ right)` (RFC 9162 §2.1.1).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[NODE_PREFIX], &left.0, &right.0])
}

/// The largest power of two strictly smaller than `n`, for `n >= 2` (RFC 9162 §2.1.1's `k`).
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2, "a tree of fewer than two leaves has no split");
    1 << (63 - (n - 1).leading_zeros())
}

/// `MTH(D[n])`, the Merkle Tree Hash of a list of leaf hashes (RFC 9162 §2.1.1).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves {
        [] => empty_root(),
        [single] => *single,
        _ => {
            // A slice length always fits in u64, and k < len fits back in usize.
            let k = split_point(leaves.len() as u64) as usize;
            let (left, right) = leaves.split_at(k);
            node_hash(&root(left), &root(right))
        }
    }
}

/// Why a [`Frontier`] could not be restored from stored parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrontierError {
    /// A frontier of `size` leaves holds one hash per set bit of `size`.
    #[error("a frontier of {size} leaves must hold {expected} hashes, not {found}")]
    WrongNodeCount {
        size: u64,
        expected: u32,
        found: usize,
    },
    /// The byte form is 8 bytes of size followed by whole 32-byte hashes.
    #[error("a stored frontier is not 8 size bytes followed by 32-byte hashes")]
    Malformed,
}

/// The right edge of a growing tree: one root per perfect subtree, largest first, as in the
/// binary expansion of the size (a tree of 6 leaves holds the roots of leaves 0–3 and 4–5).
///
/// Appending is amortised O(1) hashes and memory is at most 64 hashes, so the store can keep one
/// and update it in the same transaction that writes events; [`Frontier::root`] gives `MTH` of
/// everything appended so far (RFC 9162 §2.1.1), by folding the subtree roots right to left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// Perfect-subtree roots, largest (leftmost) first; `nodes.len() == size.count_ones()`.
    nodes: Vec<Hash>,
}

impl Frontier {
    /// The frontier of the empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Restores a frontier from its size and subtree roots (as [`Frontier::nodes`] returned them).
    pub fn from_parts(size: u64, nodes: Vec<Hash>) -> Result<Self, FrontierError> {
        let expected = size.count_ones();
        if nodes.len() != expected as usize {
            return Err(FrontierError::WrongNodeCount {
                size,
                expected,
                found: nodes.len(),
            });
        }
        Ok(Self { size, nodes })
    }

    /// Number of leaves appended.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The perfect-subtree roots, largest first.
    pub fn nodes(&self) -> &[Hash] {
        &self.nodes
    }

    /// Appends one leaf hash.
    pub fn append(&mut self, leaf: Hash) {
        let mut node = leaf;
        let mut size = self.size;
        // Each trailing one bit of the old size is a perfect subtree of the same height as
        // `node`: merge them, as binary addition carries.
        while size & 1 == 1 {
            match self.nodes.pop() {
                Some(left) => node = node_hash(&left, &node),
                None => break, // unreachable while nodes.len() == size.count_ones()
            }
            size >>= 1;
        }
        self.nodes.push(node);
        self.size += 1;
    }

    /// `MTH` of all leaves appended so far.
    pub fn root(&self) -> Hash {
        let mut from_right = self.nodes.iter().rev();
        match from_right.next() {
            None => empty_root(),
            Some(last) => from_right.fold(*last, |acc, left| node_hash(left, &acc)),
        }
    }

    /// A byte form for storage: size as 8 bytes big-endian, then the subtree roots.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.nodes.len() * HASH_LEN);
        out.extend_from_slice(&self.size.to_be_bytes());
        for node in &self.nodes {
            out.extend_from_slice(node.as_bytes());
        }
        out
    }

    /// Parses [`Frontier::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FrontierError> {
        let (size, rest) = bytes
            .split_first_chunk::<8>()
            .ok_or(FrontierError::Malformed)?;
        let chunks = rest.chunks_exact(HASH_LEN);
        if !chunks.remainder().is_empty() {
            return Err(FrontierError::Malformed);
        }
        let nodes = chunks.filter_map(Hash::from_slice).collect();
        Self::from_parts(u64::from_be_bytes(*size), nodes)
    }
}

/// Why a proof could not be produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// An inclusion proof was asked for a leaf the tree does not have.
    #[error("leaf index {index} is outside a tree of {size} leaves")]
    IndexOutOfRange { index: u64, size: u64 },
    /// A consistency proof was asked from a larger tree to a smaller one.
    #[error("cannot prove a tree of {old_size} leaves consistent with a smaller one of {new_size}")]
    OldSizeTooLarge { old_size: u64, new_size: u64 },
    /// A [`ProofBuilder`] was given a different number of leaves from the tree size it was built
    /// for.
    #[error("the proof is for a tree of {expected} leaves but {found} were given")]
    WrongLeafCount { expected: u64, found: u64 },
}

/// The leaf ranges whose `MTH`s make up `PATH(index, D[size])` (RFC 9162 §2.1.3.1), in proof
/// order (leaf to root). Requires `index < size`.
fn inclusion_ranges(index: u64, size: u64) -> Vec<Range<u64>> {
    let mut ranges = Vec::new();
    let (mut lo, mut hi, mut m) = (0, size, index);
    // Walk from the root down; the proof lists siblings from the leaf up, hence the reverse.
    while hi - lo > 1 {
        let k = split_point(hi - lo);
        if m < k {
            // PATH(m, D[0:k]) : MTH(D[k:n])
            ranges.push(lo + k..hi);
            hi = lo + k;
        } else {
            // PATH(m - k, D[k:n]) : MTH(D[0:k])
            ranges.push(lo..lo + k);
            lo += k;
            m -= k;
        }
    }
    ranges.reverse();
    ranges
}

/// The leaf ranges whose `MTH`s make up `PROOF(old, D[new])` (RFC 9162 §2.1.4.1), in proof
/// order. Requires `0 < old < new`. The ranges are disjoint, so a stream of leaves feeds each
/// leaf to at most one of them.
fn consistency_ranges(old: u64, new: u64) -> Vec<Range<u64>> {
    let mut ranges = Vec::new();
    // SUBPROOF(m, D[lo:hi], b), unrolled: each step recurses into one half and appends the
    // other half's MTH after the recursion's output, hence collecting then reversing.
    let (mut lo, mut hi, mut m, mut b) = (0, new, old, true);
    loop {
        let n = hi - lo;
        if m == n {
            // SUBPROOF(m, D[m], true) = {}; SUBPROOF(m, D[m], false) = {MTH(D[m])}.
            if !b {
                ranges.push(lo..hi);
            }
            break;
        }
        let k = split_point(n);
        if m <= k {
            // SUBPROOF(m, D[0:k], b) : MTH(D[k:n])
            ranges.push(lo + k..hi);
            hi = lo + k;
        } else {
            // SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])
            ranges.push(lo..lo + k);
            lo += k;
            m -= k;
            b = false;
        }
    }
    ranges.reverse();
    ranges
}

fn range_root(leaves: &[Hash], range: &Range<u64>) -> Hash {
    // Ranges come from the tree size, which is leaves.len(), so they are in bounds.
    let (start, end) = (range.start as usize, range.end as usize);
    leaves.get(start..end).map_or_else(empty_root, root)
}

/// The inclusion proof (audit path) of leaf `index` in the tree of all `leaves`
/// (RFC 9162 §2.1.3.1).
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Result<Vec<Hash>, ProofError> {
    let size = leaves.len() as u64;
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    Ok(inclusion_ranges(index, size)
        .iter()
        .map(|range| range_root(leaves, range))
        .collect())
}

/// The consistency proof between the tree of the first `old_size` leaves and the tree of all
/// `leaves` (RFC 9162 §2.1.4.1). Empty when `old_size` is 0 or equals the size: every tree
/// extends the empty tree and itself.
pub fn consistency_proof(leaves: &[Hash], old_size: u64) -> Result<Vec<Hash>, ProofError> {
    let new_size = leaves.len() as u64;
    if old_size > new_size {
        return Err(ProofError::OldSizeTooLarge { old_size, new_size });
    }
    if old_size == 0 || old_size == new_size {
        return Ok(Vec::new());
    }
    Ok(consistency_ranges(old_size, new_size)
        .iter()
        .map(|range| range_root(leaves, range))
        .collect())
}

/// Verifies that `leaf` is leaf `index` of the tree of `size` leaves whose root is `root`, by the
/// algorithm of RFC 9162 §2.1.3.2.
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    // Step 1.
    if index >= size {
        return false;
    }
    // Steps 2 and 3 (`fn` is a keyword, hence `f`).
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    // Step 4.
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    // Step 5.
    s == 0 && r == *root
}

/// Verifies that the tree of `new_size` leaves with root `new_root` extends the tree of
/// `old_size` leaves with root `old_root`, by the algorithm of RFC 9162 §2.1.4.2.
///
/// The RFC's algorithm covers `0 < old_size < new_size`. For the edge cases this function
/// requires an empty proof, and: equal sizes need equal roots; an old size of 0 needs the old
/// root to be the empty tree's root (stricter than transparency-dev/merkle, which ignores it).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    if old_size == 0 {
        return proof.is_empty() && *old_root == empty_root();
    }
    // Step 1.
    let Some((first, rest)) = proof.split_first() else {
        return false;
    };
    // Step 2: if old_size is a power of two, the old root is itself the first path element.
    let (seed, path) = if old_size.is_power_of_two() {
        (*old_root, proof)
    } else {
        (*first, rest)
    };
    // Step 3.
    let (mut f, mut s) = (old_size - 1, new_size - 1);
    // Step 4.
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    // Step 5.
    let (mut fr, mut sr) = (seed, seed);
    // Step 6.
    for c in path {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    // Step 7.
    fr == *old_root && sr == *new_root && s == 0
}

/// Builds an inclusion or consistency proof from the leaves streamed in order, holding only one
/// [`Frontier`] per proof element (O(log² n) memory), so the CLI can prove a checkpoint to a
/// witness straight from the database.
#[derive(Debug, Clone)]
pub struct ProofBuilder {
    size: u64,
    /// Each proof element's leaf range and the frontier accumulating it, in proof order.
    parts: Vec<(Range<u64>, Frontier)>,
    /// Indices into `parts`, by range start.
    by_start: Vec<usize>,
    cursor: usize,
    pushed: u64,
}

impl ProofBuilder {
    /// A builder for the inclusion proof of leaf `index` in a tree of `size` leaves.
    pub fn inclusion(index: u64, size: u64) -> Result<Self, ProofError> {
        if index >= size {
            return Err(ProofError::IndexOutOfRange { index, size });
        }
        Ok(Self::over(size, inclusion_ranges(index, size)))
    }

    /// A builder for the consistency proof from `old_size` to `new_size` leaves.
    pub fn consistency(old_size: u64, new_size: u64) -> Result<Self, ProofError> {
        if old_size > new_size {
            return Err(ProofError::OldSizeTooLarge { old_size, new_size });
        }
        let ranges = if old_size == 0 || old_size == new_size {
            Vec::new()
        } else {
            consistency_ranges(old_size, new_size)
        };
        Ok(Self::over(new_size, ranges))
    }

    fn over(size: u64, ranges: Vec<Range<u64>>) -> Self {
        let mut by_start: Vec<usize> = (0..ranges.len()).collect();
        by_start.sort_by_key(|&i| ranges.get(i).map_or(0, |range| range.start));
        Self {
            size,
            parts: ranges
                .into_iter()
                .map(|range| (range, Frontier::new()))
                .collect(),
            by_start,
            cursor: 0,
            pushed: 0,
        }
    }

    /// Feeds the next leaf hash (leaves must come in tree order, starting at index 0).
    pub fn push(&mut self, leaf: Hash) {
        let position = self.pushed;
        self.pushed += 1;
        while let Some(&part) = self.by_start.get(self.cursor) {
            let Some((range, frontier)) = self.parts.get_mut(part) else {
                break;
            };
            if position >= range.end {
                self.cursor += 1;
                continue;
            }
            if range.contains(&position) {
                frontier.append(leaf);
            }
            break;
        }
    }

    /// The proof, once exactly the tree's leaves have been pushed.
    pub fn finish(self) -> Result<Vec<Hash>, ProofError> {
        if self.pushed != self.size {
            return Err(ProofError::WrongLeafCount {
                expected: self.size,
                found: self.pushed,
            });
        }
        Ok(self
            .parts
            .iter()
            .map(|(_, frontier)| frontier.root())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(text: &str) -> Hash {
        Hash::from_hex(text).unwrap()
    }

    // Test vectors: the RFC 6962 reference data of transparency-dev/merkle,
    // `testonly/constants.go` (`LeafInputs`, `RootHashes`, `NodeHashes`) and
    // `proof/verify_test.go` (`inclusionProofs`, `consistencyProofs`; leaf numbers there are
    // 1-based), https://github.com/transparency-dev/merkle. Values only; no code was taken.
    const LEAF_INPUTS: [&[u8]; 8] = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ];

    /// Roots of the trees of the first 0..=8 leaves.
    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    /// (leaf index, tree size, proof).
    const INCLUSION: [(u64, u64, &[&str]); 4] = [
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];

    /// (old size, new size, proof).
    const CONSISTENCY: [(u64, u64, &[&str]); 4] = [
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            7,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];

    fn vector_leaves() -> Vec<Hash> {
        LEAF_INPUTS.iter().map(|data| leaf_hash(data)).collect()
    }

    fn hashes(texts: &[&str]) -> Vec<Hash> {
        texts.iter().map(|text| hex(text)).collect()
    }

    /// Leaves for property tests: distinct per index.
    fn synthetic_leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    /// An independent, deliberately naive MTH: build every level bottom-up, carrying an odd
    /// node up unchanged. For RFC 6962 trees this equals the recursive definition.
    fn naive_root(leaves: &[Hash]) -> Hash {
        if leaves.is_empty() {
            return empty_root();
        }
        let mut level = leaves.to_vec();
        while level.len() > 1 {
            level = level
                .chunks(2)
                .map(|pair| match pair {
                    [left, right] => node_hash(left, right),
                    [odd] => *odd,
                    _ => unreachable!(),
                })
                .collect();
        }
        level[0]
    }

    #[test]
    fn rfc6962_empty_tree_root_is_sha256_of_nothing() {
        assert_eq!(empty_root(), hex(ROOTS[0]));
        assert_eq!(root(&[]), hex(ROOTS[0]));
        assert_eq!(Frontier::new().root(), hex(ROOTS[0]));
    }

    #[test]
    fn rfc6962_reference_roots_for_every_prefix_of_the_eight_leaves() {
        let leaves = vector_leaves();
        let mut frontier = Frontier::new();
        for size in 0..=8 {
            let prefix = &leaves[..size];
            assert_eq!(root(prefix), hex(ROOTS[size]), "root at size {size}");
            assert_eq!(frontier.root(), hex(ROOTS[size]), "frontier at size {size}");
            assert_eq!(naive_root(prefix), hex(ROOTS[size]), "naive at size {size}");
            if let Some(leaf) = leaves.get(size) {
                frontier.append(*leaf);
            }
        }
    }

    #[test]
    fn rfc6962_reference_inclusion_proofs() {
        let leaves = vector_leaves();
        for (index, size, expected) in INCLUSION {
            let prefix = &leaves[..size as usize];
            let expected = hashes(expected);
            assert_eq!(
                inclusion_proof(prefix, index).unwrap(),
                expected,
                "{index}/{size}"
            );
            let root = hex(ROOTS[size as usize]);
            assert!(verify_inclusion(
                &leaves[index as usize],
                index,
                size,
                &expected,
                &root
            ));
        }
        // A one-leaf tree: the proof is empty and the leaf is the root.
        assert!(verify_inclusion(&leaves[0], 0, 1, &[], &hex(ROOTS[1])));
    }

    #[test]
    fn rfc6962_reference_consistency_proofs() {
        let leaves = vector_leaves();
        for (old, new, expected) in CONSISTENCY {
            let prefix = &leaves[..new as usize];
            let expected = hashes(expected);
            assert_eq!(
                consistency_proof(prefix, old).unwrap(),
                expected,
                "{old}->{new}"
            );
            let (old_root, new_root) = (hex(ROOTS[old as usize]), hex(ROOTS[new as usize]));
            assert!(verify_consistency(
                old, new, &old_root, &new_root, &expected
            ));
            assert!(!verify_consistency(
                old, new, &new_root, &old_root, &expected
            ));
        }
    }

    #[test]
    fn consistency_edge_cases() {
        let empty = empty_root();
        let one = hex(ROOTS[1]);
        assert!(verify_consistency(0, 0, &empty, &empty, &[]));
        assert!(verify_consistency(0, 1, &empty, &one, &[]));
        assert!(
            !verify_consistency(0, 1, &one, &one, &[]),
            "old root must be the empty root"
        );
        assert!(verify_consistency(1, 1, &one, &one, &[]));
        assert!(!verify_consistency(1, 1, &one, &empty, &[]));
        assert!(
            !verify_consistency(1, 1, &one, &one, &[empty]),
            "non-empty proof"
        );
        assert!(!verify_consistency(2, 1, &one, &one, &[]), "time travel");
        assert!(
            !verify_consistency(1, 2, &one, &hex(ROOTS[2]), &[]),
            "empty proof"
        );
        assert_eq!(
            consistency_proof(&vector_leaves()[..2], 3),
            Err(ProofError::OldSizeTooLarge {
                old_size: 3,
                new_size: 2
            })
        );
    }

    #[test]
    fn inclusion_rejects_out_of_range_indices() {
        let leaf = leaf_hash(b"x");
        for (index, size) in [(0, 0), (1, 0), (1, 1), (2, 1)] {
            assert!(!verify_inclusion(&leaf, index, size, &[], &leaf));
        }
        assert_eq!(
            inclusion_proof(&[leaf], 1),
            Err(ProofError::IndexOutOfRange { index: 1, size: 1 })
        );
    }

    #[test]
    fn leaf_and_node_hashes_are_domain_separated() {
        // A node over two leaves must differ from a leaf over their concatenation.
        let (a, b) = (leaf_hash(b"a"), leaf_hash(b"b"));
        let mut concatenated = a.as_bytes().to_vec();
        concatenated.extend_from_slice(b.as_bytes());
        assert_ne!(node_hash(&a, &b), leaf_hash(&concatenated));
        assert_ne!(node_hash(&a, &b), sha256(&[&concatenated]));
    }

    #[test]
    fn frontier_round_trips_through_bytes_and_rejects_bad_forms() {
        let mut frontier = Frontier::new();
        for leaf in synthetic_leaves(13) {
            frontier.append(leaf);
        }
        assert_eq!(frontier.nodes().len(), 3); // 13 = 0b1101
        let restored = Frontier::from_bytes(&frontier.to_bytes()).unwrap();
        assert_eq!(restored, frontier);
        assert_eq!(restored.root(), root(&synthetic_leaves(13)));

        let mut short = frontier.to_bytes();
        short.pop();
        assert_eq!(Frontier::from_bytes(&short), Err(FrontierError::Malformed));
        assert_eq!(Frontier::from_bytes(&[0; 7]), Err(FrontierError::Malformed));
        assert!(matches!(
            Frontier::from_parts(13, frontier.nodes()[..2].to_vec()),
            Err(FrontierError::WrongNodeCount {
                size: 13,
                expected: 3,
                found: 2
            })
        ));
    }

    #[test]
    fn proof_builder_rejects_the_wrong_number_of_leaves() {
        let mut builder = ProofBuilder::consistency(3, 5).unwrap();
        for leaf in synthetic_leaves(4) {
            builder.push(leaf);
        }
        assert_eq!(
            builder.finish(),
            Err(ProofError::WrongLeafCount {
                expected: 5,
                found: 4
            })
        );
    }

    #[test]
    fn hash_hex_round_trips() {
        let hash = hex(ROOTS[8]);
        assert_eq!(hash.to_hex(), ROOTS[8]);
        assert_eq!(Hash::from_hex(&ROOTS[8].to_uppercase()), Some(hash));
        assert_eq!(Hash::from_hex("zz"), None);
        assert_eq!(Hash::from_hex(&"g".repeat(64)), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn frontier_and_recursive_root_agree_with_the_naive_tree(n in 0u64..200) {
            let leaves = synthetic_leaves(n);
            let mut frontier = Frontier::new();
            for leaf in &leaves {
                frontier.append(*leaf);
            }
            prop_assert_eq!(frontier.size(), n);
            prop_assert_eq!(frontier.nodes().len() as u32, n.count_ones());
            prop_assert_eq!(frontier.root(), naive_root(&leaves));
            prop_assert_eq!(root(&leaves), naive_root(&leaves));
        }

        #[test]
        fn every_inclusion_proof_verifies_and_any_alteration_fails(
            size in 1u64..100,
            index_seed in any::<u64>(),
            flip in any::<(usize, u8)>(),
        ) {
            let leaves = synthetic_leaves(size);
            let index = index_seed % size;
            let tree_root = root(&leaves);
            let proof = inclusion_proof(&leaves, index).unwrap();
            let leaf = leaves[index as usize];
            prop_assert!(verify_inclusion(&leaf, index, size, &proof, &tree_root));

            // The streaming builder agrees.
            let mut builder = ProofBuilder::inclusion(index, size).unwrap();
            for leaf in &leaves {
                builder.push(*leaf);
            }
            prop_assert_eq!(&builder.finish().unwrap(), &proof);

            // Altered leaf.
            let other = leaf_hash(b"not in the tree");
            prop_assert!(!verify_inclusion(&other, index, size, &proof, &tree_root));
            // Altered index (any other index in range, and out of range).
            for wrong in [index.wrapping_sub(1), index + 1, index ^ 2] {
                if wrong != index && wrong < size && leaves[wrong as usize] != leaf {
                    prop_assert!(!verify_inclusion(&leaf, wrong, size, &proof, &tree_root));
                }
            }
            prop_assert!(!verify_inclusion(&leaf, size, size, &proof, &tree_root));
            // Altered size.
            prop_assert!(!verify_inclusion(&leaf, index, size * 2, &proof, &tree_root));
            // Altered root.
            prop_assert!(!verify_inclusion(&leaf, index, size, &proof, &empty_root()));
            // Altered proof: a flipped bit, a dropped element, an extra element.
            if !proof.is_empty() {
                let mut flipped = proof.clone();
                let at = flip.0 % flipped.len();
                let mut bytes = *flipped[at].as_bytes();
                bytes[flip.1 as usize % HASH_LEN] ^= 1;
                flipped[at] = Hash::from_bytes(bytes);
                prop_assert!(!verify_inclusion(&leaf, index, size, &flipped, &tree_root));
                prop_assert!(!verify_inclusion(
                    &leaf, index, size, &proof[..proof.len() - 1], &tree_root
                ));
            }
            let mut longer = proof.clone();
            longer.push(tree_root);
            prop_assert!(!verify_inclusion(&leaf, index, size, &longer, &tree_root));
        }

        #[test]
        fn altered_consistency_proofs_fail(
            old in 1u64..80,
            extra in 1u64..80,
            flip in any::<(usize, u8)>(),
        ) {
            let new = old + extra;
            let leaves = synthetic_leaves(new);
            let (old_root, new_root) = (root(&leaves[..old as usize]), root(&leaves));
            let proof = consistency_proof(&leaves, old).unwrap();
            prop_assert!(verify_consistency(old, new, &old_root, &new_root, &proof));

            let mut flipped = proof.clone();
            let at = flip.0 % flipped.len();
            let mut bytes = *flipped[at].as_bytes();
            bytes[flip.1 as usize % HASH_LEN] ^= 1;
            flipped[at] = Hash::from_bytes(bytes);
            prop_assert!(!verify_consistency(old, new, &old_root, &new_root, &flipped));
            prop_assert!(!verify_consistency(
                old, new, &old_root, &new_root, &proof[..proof.len() - 1]
            ));
            let mut longer = proof.clone();
            longer.push(new_root);
            prop_assert!(!verify_consistency(old, new, &old_root, &new_root, &longer));
            prop_assert!(!verify_consistency(old + 1, new, &old_root, &new_root, &proof));
            // (Not `new + 1`: the path shape alone does not always fix the size, e.g. 5 and 6
            // share it after a one-leaf old tree; the signed checkpoint binds size and root.)
            prop_assert!(!verify_consistency(old, new * 2, &old_root, &new_root, &proof));
        }
    }

    /// Every pair of sizes up to 64: the proof verifies, matches the streaming builder, and
    /// fails against a tampered old or new root (a forked log).
    #[test]
    fn consistency_proofs_between_every_pair_of_sizes_up_to_64() {
        let leaves = synthetic_leaves(64);
        let roots: Vec<Hash> = (0..=64).map(|n| root(&leaves[..n])).collect();
        let forked_leaves: Vec<Hash> = {
            let mut forked = leaves.clone();
            forked[0] = leaf_hash(b"forked");
            forked
        };
        for new in 0..=64u64 {
            let prefix = &leaves[..new as usize];
            for old in 0..=new {
                let proof = consistency_proof(prefix, old).unwrap();
                let (old_root, new_root) = (roots[old as usize], roots[new as usize]);
                assert!(
                    verify_consistency(old, new, &old_root, &new_root, &proof),
                    "{old} -> {new}"
                );
                let mut builder = ProofBuilder::consistency(old, new).unwrap();
                for leaf in prefix {
                    builder.push(*leaf);
                }
                assert_eq!(builder.finish().unwrap(), proof, "builder {old} -> {new}");
                if old > 0 {
                    let forked_old = root(&forked_leaves[..old as usize]);
                    assert!(
                        !verify_consistency(old, new, &forked_old, &new_root, &proof),
                        "forked old root {old} -> {new}"
                    );
                    let forked_new = root(&forked_leaves[..new as usize]);
                    assert!(
                        !verify_consistency(old, new, &old_root, &forked_new, &proof),
                        "forked new root {old} -> {new}"
                    );
                }
            }
        }
    }
}
