//! Test-range NHS numbers for synthetic patients: `999` followed by six digits and a Modulus 11
//! check digit (NHS Data Dictionary, "NHS Number"; DOMAIN.md `NHSNO`).
//!
//! Numbers are drawn without repetition: a walk over the 10^6 six-digit suffixes with a stride
//! coprime to 10^6 visits each suffix once, starting at a seed-dependent place. Suffixes whose
//! check digit would be 10 (no valid number has that prefix) are skipped, which leaves about
//! 909,000 distinct numbers: [`MAX_PATIENTS`] caps a population below that.

/// The largest population with distinct NHS numbers (about 10/11 of 10^6, rounded down).
pub const MAX_PATIENTS: usize = 900_000;

const SUFFIXES: u64 = 1_000_000;
/// Coprime to 10^6 (neither even nor a multiple of 5), so the walk is a permutation.
const STRIDE: u64 = 370_373;

/// The Modulus 11 check digit for nine digits, or `None` when it would be 10.
pub fn check_digit(first_nine: &[u8; 9]) -> Option<u8> {
    let sum: u32 = first_nine
        .iter()
        .zip((2..=10u32).rev())
        .map(|(digit, weight)| u32::from(*digit) * weight)
        .sum();
    match 11 - sum % 11 {
        11 => Some(0),
        10 => None,
        check => u8::try_from(check).ok(),
    }
}

/// Deals out distinct test-range NHS numbers in a seed-dependent order.
#[derive(Debug, Clone)]
pub(crate) struct NhsNumberDealer {
    next: u64,
    visited: u64,
}

impl NhsNumberDealer {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            next: super::rng::mix(seed) % SUFFIXES,
            visited: 0,
        }
    }

    /// The next number, or `None` once every suffix was visited.
    pub(crate) fn deal(&mut self) -> Option<String> {
        while self.visited < SUFFIXES {
            let suffix = self.next;
            self.next = (self.next + STRIDE) % SUFFIXES;
            self.visited += 1;
            let mut digits = [9u8, 9, 9, 0, 0, 0, 0, 0, 0];
            let mut rest = suffix;
            for slot in digits[3..].iter_mut().rev() {
                *slot = (rest % 10) as u8;
                rest /= 10;
            }
            // 999999999x would be a repdigit only with check 9; it is skipped like check 10.
            if let Some(check) = check_digit(&digits)
                && !(suffix == SUFFIXES - 1 && check == 9)
            {
                let mut number = String::with_capacity(10);
                for digit in digits.iter().chain(std::iter::once(&check)) {
                    number.push(char::from(b'0' + digit));
                }
                return Some(number);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn nhsno_check_digit_matches_data_dictionary_example() {
        // 943 476 5919 is the NHS Data Dictionary's worked example.
        assert_eq!(check_digit(&[9, 4, 3, 4, 7, 6, 5, 9, 1]), Some(9));
    }

    #[test]
    fn nhsno_dealer_never_repeats_and_never_uses_check_digit_ten() {
        let mut dealer = NhsNumberDealer::new(42);
        let mut seen = HashSet::new();
        for _ in 0..50_000 {
            let number = dealer.deal().expect("numbers left");
            assert!(number.starts_with("999") && number.len() == 10);
            let digits: Vec<u8> = number.bytes().map(|b| b - b'0').collect();
            let nine: [u8; 9] = digits[..9].try_into().expect("nine digits");
            assert_eq!(check_digit(&nine), Some(digits[9]));
            assert!(seen.insert(number));
        }
    }

    #[test]
    fn nhsno_dealer_has_room_for_max_patients() {
        let mut dealer = NhsNumberDealer::new(1);
        let count = std::iter::from_fn(|| dealer.deal()).count();
        assert!(count >= MAX_PATIENTS, "{count}");
    }
}
