//! The generator's random numbers: SplitMix64 (Steele, Lea and Flood, "Fast splittable
//! pseudorandom number generators", OOPSLA 2014), written here rather than taken from `rand`.
//!
//! Why our own: the synthetic data must be byte-identical for a seed across machines, Rust
//! versions and dependency upgrades, because tests and BENCHMARKS.md name seeds. `rand`'s `StdRng`
//! is documented as not reproducible across versions, and `rand_chacha` would be a dependency for
//! ten lines of arithmetic. SplitMix64 passes BigCrush, has a 2^64 period, and — what matters here
//! — its mixing function derives independent streams from `(seed, index)`, so patient *n*'s
//! records can be generated without generating patients 0..n first. Not for cryptography.

/// A SplitMix64 stream.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

/// The SplitMix64 increment (the golden ratio in 64-bit fixed point).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective 64-bit mixer.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// An independent stream for item `index` of the stream family `seed` (e.g. one patient).
    pub(crate) fn for_item(seed: u64, stream: u64, index: u64) -> Self {
        Self::new(mix(
            mix(seed ^ stream.wrapping_mul(GAMMA)).wrapping_add(index)
        ))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix(self.state)
    }

    /// Uniform in `0..bound` (`bound > 0`), by Lemire's multiply-shift; the bias is below
    /// 2^-32 for the small bounds used here, which is irrelevant for synthetic data.
    pub(crate) fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound.max(1))) >> 64) as u64
    }

    /// Uniform in `low..=high`.
    pub(crate) fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high.saturating_sub(low).saturating_add(1))
    }

    /// True with probability `p` (clamped to 0..=1).
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        // 53 random bits as a float in [0, 1).
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < p.clamp(0.0, 1.0)
    }

    /// One item of a non-empty slice.
    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        let index = self.below(items.len() as u64) as usize;
        &items[index.min(items.len().saturating_sub(1))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_reference_vector() {
        // Reference output of the C implementation (Vigna, prng.di.unimi.it) for seed 1234567.
        let mut rng = SplitMix64::new(1_234_567);
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(
            first,
            vec![
                6_457_827_717_110_365_317,
                3_203_168_211_198_807_973,
                9_817_491_932_198_370_423
            ]
        );
    }

    #[test]
    fn below_stays_in_bounds() {
        let mut rng = SplitMix64::new(7);
        assert!((0..10_000).all(|_| rng.below(7) < 7));
        assert!((0..1_000).all(|_| (3..=5).contains(&rng.range(3, 5))));
    }
}
