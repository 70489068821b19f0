//! The ODS code as a type (DOMAIN.md `ODS`): 1–9 characters, ASCII upper-case letters and digits
//! (<https://digital.nhs.uk/developer/guides-and-documentation/building-healthcare-software/organisations-and-services>).
//!
//! Deliberately nothing more: ODS publishes that no structure may be derived from a code (a GP
//! practice code's first letter is not a region, a trust is not always `R..`), so [`OdsCode`] offers
//! no accessors beyond the string. Organisation codes are not patient data, so `Display` is fine.

use std::fmt;
use std::str::FromStr;

/// Longest ODS code (branch surgeries such as `K81003001`).
pub const MAX_LEN: usize = 9;

/// A syntactically valid ODS organisation or site code.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OdsCode(String);

/// Why a string is not an ODS code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OdsCodeError {
    #[error("ODS code is empty (ODS)")]
    Empty,
    #[error("ODS code is longer than 9 characters (ODS)")]
    TooLong,
    #[error("ODS code must be upper case (ODS)")]
    LowerCase,
    #[error("ODS code may contain only the letters A-Z and digits 0-9 (ODS)")]
    InvalidCharacter,
}

impl OdsCode {
    /// Parse an ODS code. Lower case is rejected rather than upper-cased: the code is an
    /// identifier, and silently changing identifiers hides sender bugs.
    pub fn parse(s: &str) -> Result<Self, OdsCodeError> {
        if s.is_empty() {
            return Err(OdsCodeError::Empty);
        }
        if let Some(bad) = s
            .bytes()
            .find(|b| !(b.is_ascii_uppercase() || b.is_ascii_digit()))
        {
            return Err(if bad.is_ascii_lowercase() {
                OdsCodeError::LowerCase
            } else {
                OdsCodeError::InvalidCharacter
            });
        }
        if s.len() > MAX_LEN {
            return Err(OdsCodeError::TooLong);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for OdsCode {
    type Err = OdsCodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for OdsCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for OdsCode {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ods_accepts_published_examples() {
        // Branch surgery, pharmacy, social-care site, trust, GP practice (DOMAIN.md `ODS`).
        for code in ["K81003001", "FVR79", "VLAXL", "RA4", "Y12345", "A"] {
            assert_eq!(
                OdsCode::parse(code).map(|c| c.to_string()),
                Ok(code.to_owned())
            );
        }
    }

    #[test]
    fn ods_rejects_empty() {
        assert_eq!(OdsCode::parse(""), Err(OdsCodeError::Empty));
    }

    #[test]
    fn ods_rejects_more_than_nine_characters() {
        assert_eq!(OdsCode::parse("K810030011"), Err(OdsCodeError::TooLong));
    }

    #[test]
    fn ods_rejects_lower_case() {
        assert_eq!(OdsCode::parse("ra4"), Err(OdsCodeError::LowerCase));
    }

    #[test]
    fn ods_rejects_punctuation_space_and_unicode() {
        for code in ["RA 4", "RA-4", " RA4", "RA4\n", "RÄ4", "RA４"] {
            assert_eq!(
                OdsCode::parse(code),
                Err(OdsCodeError::InvalidCharacter),
                "{code:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn ods_accepts_exactly_one_to_nine_upper_alphanumerics(s in "\\PC{0,12}|[A-Z0-9]{0,11}") {
            let expected = (1..=9).contains(&s.len())
                && s.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
            prop_assert_eq!(OdsCode::parse(&s).is_ok(), expected);
        }
    }
}
