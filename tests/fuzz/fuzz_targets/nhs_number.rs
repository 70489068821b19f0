//! NHS numbers: `NhsNumber::parse` against an independent reference written here from the NHS
//! Data Dictionary definition (DOMAIN.md `NHSNO`, B2 row B4), under two policies: the default
//! (test numbers allowed) and production (test numbers refused, Scottish CHI accepted as an extra
//! range to exercise `extra_ranges`).
//!
//! The reference: exactly ten ASCII digits; weights 10 down to 2 on the first nine; remainder
//! `sum % 11`; check digit `11 - remainder`, where 11 means 0 and 10 means invalid; not all ten
//! digits the same; and the whole number inside an accepted range.
#![no_main]

use caregate_fhir::nhs_number::{
    ENGLAND_WALES_IOM_RANGES, NhsNumber, NhsNumberPolicy, SCOTTISH_CHI_RANGE, TEST_RANGE,
};
use libfuzzer_sys::fuzz_target;

fn reference_accepts(s: &str, policy: &NhsNumberPolicy) -> bool {
    let bytes = s.as_bytes();
    if bytes.len() != 10 || !bytes.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let digit = |i: usize| u32::from(bytes[i] - b'0');
    let sum: u32 = (0..9).map(|i| digit(i) * (10 - i as u32)).sum();
    let check = match 11 - sum % 11 {
        11 => 0,
        10 => return false,
        c => c,
    };
    if check != digit(9) {
        return false;
    }
    if bytes.iter().all(|&b| b == bytes[0]) {
        return false;
    }
    let number: u64 = s.parse().unwrap_or(u64::MAX);
    let inside = |(first, last): (u64, u64)| first <= number && number <= last;
    ENGLAND_WALES_IOM_RANGES.into_iter().any(inside)
        || policy.extra_ranges.iter().copied().any(inside)
        || (policy.allow_test_numbers && inside(TEST_RANGE))
}

fuzz_target!(|data: &[u8]| {
    // Raw bytes as text, and also the bytes read as ten decimal digits so that the fuzzer reaches
    // the Modulus 11 arithmetic often (random strings are almost never ten digits).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let digits: String = data
        .iter()
        .take(10)
        .map(|b| char::from(b'0' + b % 10))
        .collect();
    let policies = [
        NhsNumberPolicy::default(),
        NhsNumberPolicy {
            allow_test_numbers: false,
            extra_ranges: vec![SCOTTISH_CHI_RANGE],
        },
    ];
    for candidate in [text, digits.as_str()] {
        for policy in &policies {
            let parsed = NhsNumber::parse(candidate, policy);
            assert_eq!(
                parsed.is_ok(),
                reference_accepts(candidate, policy),
                "parse and reference disagree ({:?})",
                parsed.err()
            );
            if let Ok(number) = parsed {
                assert_eq!(number.as_str(), candidate);
                // Redacting Debug: the number never appears in logs.
                assert!(!format!("{number:?}").contains(candidate));
            }
        }
    }
});
