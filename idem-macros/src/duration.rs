//! Duration literals: `"24h"`, `"30s"`, `"500ms"`, `"1h30m"`.
//!
//! Input:  `ttl = "1h30m"`
//! Output: `5_400_000` milliseconds, or an error message for the literal's span.

/// The longest duration accepted: 100 years. Anything longer is almost surely a
/// typo, and would overflow clock arithmetic in some backends.
pub const MAX_MS: u128 = 100 * 365 * 24 * 60 * 60 * 1000;

const UNITS: &str = "ms, s, m, h, d";

/// Parses a duration literal into milliseconds.
pub fn parse_ms(text: &str) -> Result<u64, String> {
    if text.is_empty() {
        return Err(format!(
            "empty duration: expected a number and a unit ({UNITS}), e.g. \"24h\", \"30s\" or \"1h30m\""
        ));
    }
    let bytes = text.as_bytes();
    let mut total: u128 = 0;
    let mut i = 0;
    let mut last_rank = usize::MAX;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(format!(
                "invalid duration \"{text}\": expected a number at `{}`; write e.g. \"24h\" or \"1h30m\"",
                &text[start..]
            ));
        }
        let number: u128 = text[start..i].parse().map_err(|_| too_long(text))?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit = &text[unit_start..i];
        let (rank, factor) = match unit {
            "d" => (0, 86_400_000u128),
            "h" => (1, 3_600_000),
            "m" => (2, 60_000),
            "s" => (3, 1_000),
            "ms" => (4, 1),
            "" => {
                return Err(format!(
                    "invalid duration \"{text}\": missing unit after `{}`; expected one of {UNITS}",
                    &text[start..i]
                ))
            }
            other => {
                return Err(format!(
                    "invalid duration \"{text}\": unknown unit `{other}`; expected one of {UNITS}"
                ))
            }
        };
        if last_rank != usize::MAX && rank <= last_rank {
            return Err(format!(
                "invalid duration \"{text}\": units must go from largest to smallest, each once (e.g. \"1h30m\")"
            ));
        }
        last_rank = rank;
        total = number
            .checked_mul(factor)
            .and_then(|v| v.checked_add(total))
            .filter(|v| *v <= MAX_MS)
            .ok_or_else(|| too_long(text))?;
    }
    if total == 0 {
        return Err(format!(
            "duration \"{text}\" is zero; it must be greater than zero"
        ));
    }
    Ok(total as u64)
}

fn too_long(text: &str) -> String {
    format!("duration \"{text}\" is too long: at most 100 years (\"36500d\") is allowed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        assert_eq!(parse_ms("500ms"), Ok(500));
        assert_eq!(parse_ms("30s"), Ok(30_000));
        assert_eq!(parse_ms("2m"), Ok(120_000));
        assert_eq!(parse_ms("24h"), Ok(86_400_000));
        assert_eq!(parse_ms("1d"), Ok(86_400_000));
        assert_eq!(parse_ms("1h30m"), Ok(5_400_000));
        assert_eq!(parse_ms("1d2h3m4s5ms"), Ok(93_784_005));
        assert_eq!(parse_ms("36500d"), Ok(MAX_MS as u64));
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "", "h", "10", "10x", "1.5h", " 1h", "1h ", "30m1h", "1h1h", "-1s", "1H",
        ] {
            assert!(parse_ms(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_ms("0s").unwrap_err().contains("zero"));
        assert!(parse_ms("0h0m").unwrap_err().contains("zero"));
        assert!(parse_ms("36501d").unwrap_err().contains("too long"));
        assert!(parse_ms("99999999999999999999999999999999999999999d")
            .unwrap_err()
            .contains("too long"));
    }
}
