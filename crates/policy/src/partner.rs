//! Who the policy talks about: partner organisations of the ICS, as the decision core sees them.
//!
//! The gateway keeps its own partner registry (keys, scopes, delivery endpoints); the policy bundle
//! keeps the IG view of the same organisations (`policies/ics.toml`: kind, ODS code, which sensitive
//! categories they are cleared for). Both use the same [`PartnerId`], and the gateway checks at
//! start-up that every configured partner exists in the bundle.

use std::fmt;
use std::str::FromStr;

use caregate_fhir::ods::OdsCode;
use serde::{Deserialize, Serialize};

/// A partner's stable id, e.g. `gp-a81001`: lower-case ASCII letters, digits and `-`, 1–64
/// characters. Not patient data, so it may appear in logs and errors.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PartnerId(String);

/// Why a string is not a [`PartnerId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a partner id must be 1-64 characters of a-z, 0-9 and '-'")]
pub struct InvalidPartnerId;

impl PartnerId {
    /// Parse a partner id.
    pub fn parse(s: &str) -> Result<Self, InvalidPartnerId> {
        let valid = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidPartnerId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PartnerId {
    type Err = InvalidPartnerId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for PartnerId {
    type Error = InvalidPartnerId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<PartnerId> for String {
    fn from(id: PartnerId) -> Self {
        id.0
    }
}

impl fmt::Display for PartnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The kind of organisation, as in the gateway's partner registry (`kind = "gp"` …). Policies
/// address kinds as Cedar groups (`principal in PartnerKind::"pharmacy"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartnerKind {
    /// A GP practice (primary care).
    Gp,
    /// An NHS trust: acute, mental-health or community.
    Trust,
    /// A community pharmacy.
    Pharmacy,
    /// A local authority (adult social care).
    Council,
    /// The Integrated Care Board, as a consumer of secondary-use (analytics) feeds.
    Icb,
}

impl PartnerKind {
    /// Every kind, in declaration order.
    pub const ALL: [PartnerKind; 5] = [
        PartnerKind::Gp,
        PartnerKind::Trust,
        PartnerKind::Pharmacy,
        PartnerKind::Council,
        PartnerKind::Icb,
    ];

    /// The kind as configuration and policies spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gp => "gp",
            Self::Trust => "trust",
            Self::Pharmacy => "pharmacy",
            Self::Council => "council",
            Self::Icb => "icb",
        }
    }

    /// Words for explanations.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Gp => "GP practice",
            Self::Trust => "NHS trust",
            Self::Pharmacy => "community pharmacy",
            Self::Council => "council social care",
            Self::Icb => "Integrated Care Board",
        }
    }
}

impl FromStr for PartnerKind {
    type Err = InvalidPartnerKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or(InvalidPartnerKind)
    }
}

impl fmt::Display for PartnerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a [`PartnerKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a partner kind is one of gp, trust, pharmacy, council, icb")]
pub struct InvalidPartnerKind;

/// The submitting (or requesting) partner, as the gateway's auth stage identified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartnerRef {
    pub id: PartnerId,
    pub ods: OdsCode,
    pub kind: PartnerKind,
}
