//! Shared inputs for caregate benchmarks.
