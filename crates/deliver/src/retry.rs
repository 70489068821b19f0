//! Retry timing and the per-destination circuit breaker. Pure: time is passed in.
//!
//! Backoff is exponential with *full jitter* (a uniformly random wait in `[0, min(cap, base·2ⁿ)]`),
//! which spreads the retries of many records after an outage instead of sending them in waves.
//! The breaker stops a destination's worker from hammering a partner that is down: after
//! `failures` consecutive failed attempts it *opens* for `open_for`; then one *half-open* probe is
//! let through, and its result closes the breaker or opens it again.

use std::time::{Duration, Instant};

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The upper bound of the wait after `attempts` failed attempts (1 = the first failure).
    pub fn ceiling(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << exponent).min(self.cap)
    }

    /// The wait after `attempts` failed attempts, given a uniform random `unit` in `[0, 1)`.
    pub fn delay(&self, attempts: u32, unit: f64) -> Duration {
        self.ceiling(attempts).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// A uniform random number in `[0, 1)` from the system's CSPRNG (0 if it fails: retry at once,
/// still bounded by the breaker).
pub fn random_unit() -> f64 {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return 0.0;
    }
    // 53 random bits, the precision of an f64 mantissa.
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// How long it stays open before a probe.
    pub open_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is allowed; `probing` once it has been let through.
    HalfOpen {
        probing: bool,
    },
}

/// How many attempts the worker may start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Up to the destination's concurrency.
    Full,
    /// Exactly one (the half-open probe).
    Probe,
    /// None before this instant.
    WaitUntil(Instant),
    /// None until the probe in flight ends.
    WaitForProbe,
}

/// One destination's circuit breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: State,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: State::Closed { failures: 0 },
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }

    /// What may start at `now`. A `Probe` answer marks the probe as taken.
    pub fn permit(&mut self, now: Instant) -> Permit {
        match self.state {
            State::Closed { .. } => Permit::Full,
            State::Open { until } if now < until => Permit::WaitUntil(until),
            State::Open { .. } | State::HalfOpen { probing: false } => {
                self.state = State::HalfOpen { probing: true };
                Permit::Probe
            }
            State::HalfOpen { probing: true } => Permit::WaitForProbe,
        }
    }

    /// The partner answered (2xx, or a permanent 4xx: it is up, the record is the problem).
    pub fn on_success(&mut self) {
        self.state = State::Closed { failures: 0 };
    }

    /// A transport failure, timeout, 408, 429 or 5xx. Returns true if this opened the breaker.
    pub fn on_failure(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed { failures } if failures + 1 < self.config.failures.max(1) => {
                self.state = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            State::Open { .. } => false,
            State::Closed { .. } | State::HalfOpen { .. } => {
                self.state = State::Open {
                    until: now + self.config.open_for,
                };
                true
            }
        }
    }

    /// The attempt ended without telling anything about the partner (e.g. withheld).
    pub fn on_neutral(&mut self) {
        if let State::HalfOpen { probing: true } = self.state {
            self.state = State::HalfOpen { probing: false };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BACKOFF: Backoff = Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(60),
    };

    #[test]
    fn backoff_doubles_then_caps() {
        assert_eq!(BACKOFF.ceiling(1), Duration::from_millis(100));
        assert_eq!(BACKOFF.ceiling(2), Duration::from_millis(200));
        assert_eq!(BACKOFF.ceiling(4), Duration::from_millis(800));
        assert_eq!(BACKOFF.ceiling(20), Duration::from_secs(60));
        assert_eq!(BACKOFF.ceiling(u32::MAX), Duration::from_secs(60));
    }

    proptest! {
        #[test]
        fn full_jitter_stays_within_zero_and_the_ceiling(attempts in 0u32..100, unit in 0.0f64..1.0) {
            let delay = BACKOFF.delay(attempts, unit);
            prop_assert!(delay <= BACKOFF.ceiling(attempts));
            prop_assert!(delay <= BACKOFF.cap);
        }
    }

    #[test]
    fn random_unit_is_in_range() {
        for _ in 0..1000 {
            let unit = random_unit();
            assert!((0.0..1.0).contains(&unit));
        }
    }

    #[test]
    fn f6_breaker_opens_after_consecutive_failures_and_probes_once() {
        let config = BreakerConfig {
            failures: 3,
            open_for: Duration::from_secs(10),
        };
        let mut breaker = Breaker::new(config);
        let start = Instant::now();
        assert!(!breaker.on_failure(start));
        breaker.on_success();
        assert!(!breaker.on_failure(start));
        assert!(!breaker.on_failure(start));
        assert!(breaker.on_failure(start), "third consecutive failure opens");
        assert_eq!(
            breaker.permit(start + Duration::from_secs(5)),
            Permit::WaitUntil(start + config.open_for)
        );
        let later = start + Duration::from_secs(11);
        assert_eq!(breaker.permit(later), Permit::Probe);
        assert_eq!(breaker.permit(later), Permit::WaitForProbe);
        assert!(breaker.on_failure(later), "a failed probe opens again");
        let much_later = later + Duration::from_secs(11);
        assert_eq!(breaker.permit(much_later), Permit::Probe);
        breaker.on_success();
        assert_eq!(breaker.permit(much_later), Permit::Full);
        assert!(!breaker.is_open());
    }

    #[test]
    fn a_neutral_probe_lets_another_probe_through() {
        let mut breaker = Breaker::new(BreakerConfig {
            failures: 1,
            open_for: Duration::ZERO,
        });
        let now = Instant::now();
        breaker.on_failure(now);
        assert_eq!(breaker.permit(now), Permit::Probe);
        breaker.on_neutral();
        assert_eq!(breaker.permit(now), Permit::Probe);
    }
}
