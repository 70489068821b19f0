//! The NHS number as a type: a value of [`NhsNumber`] exists only if the string passed every rule
//! ("parse, don't validate", CONVENTIONS.md habit 6).
//!
//! Rules, in the order they are checked (DOMAIN.md `NHSNO`, test matrix row B4):
//! 1. exactly 10 ASCII digits — no spaces or hyphens (`943 476 5919` is a display form, not a
//!    value), no other Unicode digits;
//! 2. Modulus 11: digits 1–9 weighted 10..2, summed, `r = sum mod 11`, `check = 11 − r`; 11 means
//!    0 and 10 means no valid number has that prefix; the check must equal digit 10
//!    (<https://archive.datadictionary.nhs.uk/DD%20Release%20August%202021/attributes/nhs_number.html>);
//! 3. a single repeated digit (`0000000000`, `4444444444` …) is never issued, although every
//!    repdigit passes Modulus 11;
//! 4. the number must sit in an issuing range the deployment accepts ([`NhsNumberPolicy`]). The
//!    ranges are secondary-source facts (DOMAIN.md marks them **[P]**), so they are configuration,
//!    not constants buried in code.
//!
//! An NHS number is patient data: [`NhsNumber`] has a redacting `Debug`, no `Display`, and no error
//! in this module ever echoes the input.

use std::fmt;

/// England, Wales and Isle of Man issuing ranges accepted by default (DOMAIN.md `NHSNO`, ranges
/// **[P]**), inclusive.
pub const ENGLAND_WALES_IOM_RANGES: [(u64, u64); 2] = [
    (4_000_000_000, 4_999_999_999),
    (6_000_000_000, 7_999_999_999),
];

/// Numbers starting with 9: NHS Digital test data and the 999 test-only range. Accepted only
/// when [`NhsNumberPolicy::allow_test_numbers`] is set.
pub const TEST_RANGE: (u64, u64) = (9_000_000_000, 9_999_999_999);

/// Scottish CHI numbers (DDMMYY + 4 digits). Not NHS numbers; add to
/// [`NhsNumberPolicy::extra_ranges`] only if a flow is agreed to carry them in the NHS number
/// system.
pub const SCOTTISH_CHI_RANGE: (u64, u64) = (101_000_000, 3_112_999_999);

/// Northern Ireland Health and Care numbers. Not NHS numbers; see [`SCOTTISH_CHI_RANGE`].
pub const NORTHERN_IRELAND_HC_RANGE: (u64, u64) = (3_200_000_001, 3_999_999_999);

/// Which issuing ranges this deployment accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NhsNumberPolicy {
    /// Accept numbers starting with 9 (test data). Defaults to `true` so that test packs work
    /// out of the box; **set `false` in production** so that test patients cannot reach live
    /// records or feeds.
    pub allow_test_numbers: bool,
    /// Further inclusive `(first, last)` ranges to accept on top of
    /// [`ENGLAND_WALES_IOM_RANGES`], e.g. [`SCOTTISH_CHI_RANGE`] or the 3xx English range
    /// once confirmed against PDS.
    pub extra_ranges: Vec<(u64, u64)>,
}

impl Default for NhsNumberPolicy {
    fn default() -> Self {
        Self {
            allow_test_numbers: true,
            extra_ranges: Vec::new(),
        }
    }
}

impl NhsNumberPolicy {
    fn accepts(&self, number: u64) -> Result<(), NhsNumberError> {
        let within = |&(first, last): &(u64, u64)| (first..=last).contains(&number);
        if ENGLAND_WALES_IOM_RANGES.iter().any(within) || self.extra_ranges.iter().any(within) {
            return Ok(());
        }
        if within(&TEST_RANGE) {
            return if self.allow_test_numbers {
                Ok(())
            } else {
                Err(NhsNumberError::TestNumberNotAccepted)
            };
        }
        Err(NhsNumberError::OutsideIssuingRanges)
    }
}

/// Why a string is not an NHS number. The messages say what is wrong and name the rule; they
/// never contain the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NhsNumberError {
    #[error("NHS number must be 10 digits with no spaces or hyphens (NHSNO)")]
    ContainsSeparator,
    #[error("NHS number must use the ASCII digits 0-9 only, not other Unicode digits (NHSNO)")]
    NonAsciiDigit,
    #[error("NHS number must contain only the digits 0-9 (NHSNO)")]
    NotDigits,
    #[error("NHS number must be exactly 10 digits, found {0} (NHSNO)")]
    WrongLength(usize),
    #[error(
        "NHS number fails the Modulus 11 check: no valid number has these first nine digits (NHSNO)"
    )]
    CheckDigitTen,
    #[error("NHS number fails the Modulus 11 check (NHSNO)")]
    CheckDigitMismatch,
    #[error("NHS number is a single repeated digit, which is never issued (NHSNO)")]
    RepeatedDigit,
    #[error(
        "NHS number is a test number (starts with 9), which this deployment does not accept (NHSNO)"
    )]
    TestNumberNotAccepted,
    #[error(
        "NHS number is outside the issuing ranges this deployment accepts; Scottish CHI and Northern Ireland H&C numbers are not NHS numbers (NHSNO)"
    )]
    OutsideIssuingRanges,
}

/// A valid NHS number: 10 ASCII digits that pass Modulus 11, are not a repdigit and sit in a range
/// the [`NhsNumberPolicy`] accepts. Never log it: `Debug` prints `NhsNumber(***)`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NhsNumber(String);

impl NhsNumber {
    /// Parse `s` under `policy` (rules in the module docs, in that order).
    pub fn parse(s: &str, policy: &NhsNumberPolicy) -> Result<Self, NhsNumberError> {
        let digits = ascii_digits(s)?;
        let check = modulus_11_check(&digits[..9]).ok_or(NhsNumberError::CheckDigitTen)?;
        if check != digits[9] {
            return Err(NhsNumberError::CheckDigitMismatch);
        }
        if digits.iter().all(|&d| d == digits[0]) {
            return Err(NhsNumberError::RepeatedDigit);
        }
        let number = digits.iter().fold(0_u64, |n, &d| n * 10 + u64::from(d));
        policy.accepts(number)?;
        Ok(Self(s.to_owned()))
    }

    /// The 10 digits, for the wire and for storage. Never for logs.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Patient identifiers never appear in logs (CONVENTIONS.md habit 8).
        f.write_str("NhsNumber(***)")
    }
}

/// The digit values of `s`, or why `s` is not 10 ASCII digits. Character errors come before the
/// length error so that `943 476 5919` is reported as "no spaces", which is the fix the sender
/// needs.
fn ascii_digits(s: &str) -> Result<[u8; 10], NhsNumberError> {
    let mut digits = [0_u8; 10];
    let mut count = 0_usize;
    for c in s.chars() {
        match c {
            '0'..='9' => {
                if let Some(slot) = digits.get_mut(count) {
                    *slot = c as u8 - b'0';
                }
                count += 1;
            }
            ' ' | '-' | '\u{00a0}' | '\t' => return Err(NhsNumberError::ContainsSeparator),
            c if c.is_numeric() => return Err(NhsNumberError::NonAsciiDigit),
            _ => return Err(NhsNumberError::NotDigits),
        }
    }
    if count == 10 {
        Ok(digits)
    } else {
        Err(NhsNumberError::WrongLength(count))
    }
}

/// The Modulus 11 check digit for the first nine digits, or `None` when it would be 10.
fn modulus_11_check(first_nine: &[u8]) -> Option<u8> {
    let sum: u32 = first_nine
        .iter()
        .zip((2..=10).rev())
        .map(|(&digit, weight)| u32::from(digit) * weight)
        .sum();
    match 11 - sum % 11 {
        11 => Some(0),
        10 => None,
        check => u8::try_from(check).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<NhsNumber, NhsNumberError> {
        NhsNumber::parse(s, &NhsNumberPolicy::default())
    }

    #[test]
    fn nhsno_accepts_valid_test_number() {
        assert_eq!(
            parse("9434765919").map(|n| n.as_str().to_owned()),
            Ok("9434765919".into())
        );
        assert!(parse("9876544322").is_ok());
    }

    #[test]
    fn nhsno_accepts_england_range() {
        assert!(parse("4000000004").is_ok());
    }

    #[test]
    fn nhsno_rejects_check_digit_mismatch() {
        for s in ["9434765918", "9876544321", "9912003890", "9000000015"] {
            assert_eq!(
                parse(s).err(),
                Some(NhsNumberError::CheckDigitMismatch),
                "{s}"
            );
        }
    }

    #[test]
    fn nhsno_rejects_check_digit_ten() {
        for prefix in ["123456789", "999000000"] {
            for last in 0..=9 {
                let s = format!("{prefix}{last}");
                assert_eq!(parse(&s).err(), Some(NhsNumberError::CheckDigitTen), "{s}");
            }
        }
    }

    #[test]
    fn nhsno_rejects_repdigits_although_they_pass_modulus_11() {
        for d in '0'..='9' {
            let s: String = std::iter::repeat_n(d, 10).collect();
            assert_eq!(modulus_11_check(&[d as u8 - b'0'; 9]), Some(d as u8 - b'0'));
            let policy = NhsNumberPolicy {
                allow_test_numbers: true,
                extra_ranges: vec![(0, 9_999_999_999)],
            };
            assert_eq!(
                NhsNumber::parse(&s, &policy).err(),
                Some(NhsNumberError::RepeatedDigit),
                "{s}"
            );
        }
    }

    #[test]
    fn nhsno_rejects_separators() {
        for s in [
            "943 476 5919",
            "943-476-5919",
            "9434765919 ",
            " 9434765919",
            "943\u{a0}4765919",
        ] {
            assert_eq!(
                parse(s).err(),
                Some(NhsNumberError::ContainsSeparator),
                "{s:?}"
            );
        }
    }

    #[test]
    fn nhsno_rejects_unicode_digits() {
        // Arabic-Indic and fullwidth forms of 9434765919.
        for s in ["٩٤٣٤٧٦٥٩١٩", "９４３４７６５９１９", "943476591\u{0669}"] {
            assert_eq!(parse(s).err(), Some(NhsNumberError::NonAsciiDigit), "{s}");
        }
    }

    #[test]
    fn nhsno_rejects_other_characters() {
        for s in ["94347659x9", "+434765919", "9434765919\n", "0x34765919"] {
            assert_eq!(parse(s).err(), Some(NhsNumberError::NotDigits), "{s:?}");
        }
    }

    #[test]
    fn nhsno_rejects_wrong_length() {
        assert_eq!(
            parse("943476591").err(),
            Some(NhsNumberError::WrongLength(9))
        );
        assert_eq!(
            parse("94347659190").err(),
            Some(NhsNumberError::WrongLength(11))
        );
        assert_eq!(parse("").err(), Some(NhsNumberError::WrongLength(0)));
    }

    #[test]
    fn nhsno_rejects_test_numbers_when_not_allowed() {
        let production = NhsNumberPolicy {
            allow_test_numbers: false,
            extra_ranges: Vec::new(),
        };
        assert_eq!(
            NhsNumber::parse("9434765919", &production).err(),
            Some(NhsNumberError::TestNumberNotAccepted)
        );
        assert!(NhsNumber::parse("4000000004", &production).is_ok());
    }

    #[test]
    fn nhsno_rejects_chi_and_hc_ranges_by_default() {
        // The first number in each range that passes Modulus 11.
        let chi = first_valid_in(SCOTTISH_CHI_RANGE);
        let hc = first_valid_in(NORTHERN_IRELAND_HC_RANGE);
        for s in [&chi, &hc] {
            assert_eq!(parse(s).err(), Some(NhsNumberError::OutsideIssuingRanges));
        }
        let policy = NhsNumberPolicy {
            allow_test_numbers: false,
            extra_ranges: vec![SCOTTISH_CHI_RANGE, NORTHERN_IRELAND_HC_RANGE],
        };
        assert!(NhsNumber::parse(&chi, &policy).is_ok());
        assert!(NhsNumber::parse(&hc, &policy).is_ok());
    }

    #[test]
    fn nhsno_rejects_unissued_ranges() {
        let five = first_valid_in((5_000_000_000, 5_999_999_999));
        assert_eq!(
            parse(&five).err(),
            Some(NhsNumberError::OutsideIssuingRanges)
        );
    }

    #[test]
    fn nhsno_debug_redacts_and_errors_do_not_echo() {
        let n = parse("9434765919").unwrap();
        assert_eq!(format!("{n:?}"), "NhsNumber(***)");
        assert_eq!(format!("{:?}", Some(&n)), "Some(NhsNumber(***))");
        for s in ["9434765918", "943 476 5919", "94347659190", "1234567890"] {
            let message = parse(s).unwrap_err().to_string();
            assert!(
                !message.contains(s) && !message.contains("9434765"),
                "{message}"
            );
        }
    }

    fn first_valid_in((first, last): (u64, u64)) -> String {
        (first..=last)
            .map(|n| format!("{n:010}"))
            .find(|s| reference_is_valid_shape(s))
            .unwrap()
    }

    /// Independent reference for Modulus 11 + repdigit, written straight from the data dictionary
    /// text without sharing code with the implementation.
    fn reference_is_valid_shape(s: &str) -> bool {
        if s.len() != 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        let d: Vec<u32> = s.chars().map(|c| c.to_digit(10).unwrap()).collect();
        let mut sum = 0;
        for (position, digit) in d[..9].iter().enumerate() {
            sum += digit * (10 - position as u32);
        }
        let mut check = 11 - (sum % 11);
        if check == 11 {
            check = 0;
        }
        if check == 10 || check != d[9] {
            return false;
        }
        !d.iter().all(|&x| x == d[0])
    }

    fn reference_accepts(s: &str, allow_test: bool) -> bool {
        if !reference_is_valid_shape(s) {
            return false;
        }
        let first = s.as_bytes()[0];
        first == b'4' || first == b'6' || first == b'7' || (first == b'9' && allow_test)
    }

    /// The valid number with this nine-digit prefix, if the prefix has one.
    fn complete(prefix: &str) -> Option<String> {
        (0..=9)
            .map(|d| format!("{prefix}{d}"))
            .find(|s| reference_is_valid_shape(s))
    }

    proptest! {
        #[test]
        fn nhsno_parse_agrees_with_reference(s in "[0-9]{10}", allow_test in any::<bool>()) {
            let policy = NhsNumberPolicy { allow_test_numbers: allow_test, extra_ranges: Vec::new() };
            prop_assert_eq!(NhsNumber::parse(&s, &policy).is_ok(), reference_accepts(&s, allow_test));
        }

        #[test]
        fn nhsno_valid_numbers_round_trip(prefix in "[4679][0-9]{8}") {
            if let Some(s) = complete(&prefix) {
                let n = NhsNumber::parse(&s, &NhsNumberPolicy::default());
                prop_assert_eq!(n.map(|n| n.as_str().to_owned()), Ok(s));
            }
        }

        #[test]
        fn nhsno_parse_agrees_with_reference_on_any_string(s in "[0-9 \\-]{0,12}|\\PC{0,12}") {
            let accepted = NhsNumber::parse(&s, &NhsNumberPolicy::default()).is_ok();
            prop_assert_eq!(accepted, reference_accepts(&s, true));
        }
    }
}
