//! NHS numbers (England, Wales and the Isle of Man).
//!
//! An NHS number is ten digits, the last being a modulus 11 check digit over the first nine. Senders
//! commonly format it as `944 930 5552` or `944-930-5552`, so [`normalise_nhs_number`] strips
//! those separators before anything else looks at it; [`is_valid_nhs_number`] then applies the
//! check digit. The check catches every single-digit error and most transpositions, which is why
//! the UK Core NHS number identifier must not be emitted without it: a mistyped number would
//! otherwise attach clinical data to a different, real patient.
//!
//! Only the check digit is verified here, not allocation ranges (e.g. `999` test numbers).

/// Strips ASCII spaces and hyphens; returns the ten digits, or `None` if what remains is not
/// exactly ten ASCII digits. Does not check the check digit (see [`is_valid_nhs_number`]).
pub fn normalise_nhs_number(s: &str) -> Option<String> {
    let digits: String = s.chars().filter(|c| *c != ' ' && *c != '-').collect();
    if digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()) {
        Some(digits)
    } else {
        None
    }
}

/// `true` if `s` (after [`normalise_nhs_number`]) is ten digits whose tenth is the modulus 11
/// check digit of the first nine: weights 10 down to 2, check = 11 - (sum mod 11), where 11 means
/// 0 and 10 means the number can never be valid.
pub fn is_valid_nhs_number(s: &str) -> bool {
    let Some(n) = normalise_nhs_number(s) else {
        return false;
    };
    let d: Vec<u32> = n.bytes().map(|b| u32::from(b - b'0')).collect();
    let sum: u32 = d[..9]
        .iter()
        .zip((2..=10u32).rev())
        .map(|(digit, weight)| digit * weight)
        .sum();
    let check = match 11 - (sum % 11) {
        11 => 0,
        10 => return false,
        c => c,
    };
    check == d[9]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_examples() {
        for n in ["9449305552", "9434765919", "4010232137"] {
            assert!(is_valid_nhs_number(n), "{n}");
        }
    }

    #[test]
    fn formatted_input_is_normalised_and_valid() {
        assert_eq!(
            normalise_nhs_number("944 930 5552").as_deref(),
            Some("9449305552")
        );
        assert_eq!(
            normalise_nhs_number("944-930-5552").as_deref(),
            Some("9449305552")
        );
        assert!(is_valid_nhs_number("944 930 5552"));
        assert!(is_valid_nhs_number("944-930-5552"));
    }

    #[test]
    fn wrong_check_digit_and_transposition_are_invalid() {
        assert!(!is_valid_nhs_number("9449305553"));
        assert!(!is_valid_nhs_number("9449305525"));
        assert!(!is_valid_nhs_number("4910232137"));
    }

    #[test]
    fn check_value_ten_is_never_valid() {
        // 000000040: only the eighth digit (weight 3) is non-zero: sum 12, 12 mod 11 = 1,
        // check = 11 - 1 = 10, so no tenth digit can make it valid.
        for last in 0..=9 {
            let n = format!("000000040{last}");
            assert!(!is_valid_nhs_number(&n), "{n}");
        }
    }

    #[test]
    fn malformed_is_invalid() {
        for s in [
            "",
            "944930555",
            "94493055521",
            "944930555a",
            "944.930.5552",
            "９４４９３０５５５２",
            "944_930_5552",
        ] {
            assert!(!is_valid_nhs_number(s), "{s:?}");
        }
        assert_eq!(normalise_nhs_number("94493055"), None);
    }

    #[test]
    fn check_digit_eleven_maps_to_zero() {
        // 000000000 -> sum 0 -> 11 - 0 = 11 -> check 0.
        assert!(is_valid_nhs_number("0000000000"));
        // 123456789: sum 210, 210 mod 11 = 1 -> check 10: never valid.
        assert!(!is_valid_nhs_number("1234567890"));
    }
}
