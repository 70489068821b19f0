//! Test support shared by caregate's crates, end-to-end tests and benchmarks.

pub mod keys;
pub mod nats;
pub mod partner_server;
pub mod postgres;
pub mod synth;
