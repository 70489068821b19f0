//! Which committed records a feed may include: the small interface the gateway implements with
//! the policy stage, and [`DecisionFeedPolicy`], which reads the decision stored with each record.
//!
//! The decision JSON is the policy crate's `Decision` (`crates/policy/src/decision.rs`); the only
//! part read here is `feeds: [{ "feed": <id>, "included": <bool>, … }]`. Opted-out patients
//! (NDOO, Type 1 for GP-sourced data) are already `included: false` there (DOMAIN.md `NDOO-7`:
//! applied before pseudonymisation). A record without a decision is not in any feed: fail closed.

use std::collections::{BTreeMap, HashSet};

use caregate_store::LogEntry;
use serde::Deserialize;

/// The interface the export uses to ask the policy about a record.
pub trait FeedPolicy: Send + Sync + 'static {
    /// Feeds this committed record may be included in (from its stored decision).
    fn feeds(&self, entry: &LogEntry) -> Vec<String /* feed id */>;
    /// Re-check at export time (e.g. an NDOO list loaded since intake); false = leave it out.
    fn still_included(&self, entry: &LogEntry, feed: &str) -> bool;
}

#[derive(Debug, Deserialize)]
struct StoredDecision {
    #[serde(default)]
    feeds: Vec<StoredFeedDecision>,
}

#[derive(Debug, Deserialize)]
struct StoredFeedDecision {
    feed: String,
    included: bool,
}

/// Reads each record's stored decision, and re-checks the National Data Opt-out at export time
/// against the latest list (DOMAIN.md `NDOO-5`: the cached list is refreshed between intake and
/// export), except for feeds with a recorded exemption.
#[derive(Debug, Default, Clone)]
pub struct DecisionFeedPolicy {
    /// NHS numbers (10 digits) on the current opt-out list.
    opted_out: HashSet<String>,
    /// Feed id → whether it holds a recorded NDOO exemption (`NDOO-2`/`NDOO-3`).
    exempt: BTreeMap<String, bool>,
}

impl DecisionFeedPolicy {
    /// No export-time opt-out list: the stored decisions alone.
    pub fn new() -> Self {
        Self::default()
    }

    /// Use this opt-out list at export time (one NHS number per item, as `ndoo.txt` holds them).
    pub fn with_opt_outs(mut self, nhs_numbers: impl IntoIterator<Item = String>) -> Self {
        self.opted_out = nhs_numbers
            .into_iter()
            .map(|n| n.chars().filter(char::is_ascii_digit).collect())
            .collect();
        self
    }

    /// Feed `feed` holds a recorded exemption: the export-time list is not applied to it.
    pub fn with_exemption(mut self, feed: &str) -> Self {
        self.exempt.insert(feed.to_owned(), true);
        self
    }
}

impl FeedPolicy for DecisionFeedPolicy {
    fn feeds(&self, entry: &LogEntry) -> Vec<String> {
        let Some(bytes) = &entry.decision else {
            return Vec::new();
        };
        match serde_json::from_slice::<StoredDecision>(bytes) {
            Ok(decision) => decision
                .feeds
                .into_iter()
                .filter(|feed| feed.included)
                .map(|feed| feed.feed)
                .collect(),
            // An unreadable decision is no permission.
            Err(_) => Vec::new(),
        }
    }

    fn still_included(&self, entry: &LogEntry, feed: &str) -> bool {
        if self.exempt.get(feed).copied().unwrap_or(false) {
            return true;
        }
        match &entry.nhs_number {
            Some(number) => {
                let digits: String = number.chars().filter(char::is_ascii_digit).collect();
                !self.opted_out.contains(&digits)
            }
            None => true,
        }
    }
}
