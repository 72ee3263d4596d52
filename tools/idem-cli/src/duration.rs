//! Durations as the attribute writes them (`"1d"`, `"1h30m"`: `ms s m h d`,
//! largest unit first, each once, at most 100 years), so `--window` takes
//! the very text of the function's `window = ".."`.

use std::time::Duration;

/// The longest duration the attribute accepts: 100 years.
const MAX_MS: u128 = 100 * 365 * 24 * 60 * 60 * 1000;

/// Parses `text` the way `#[idempotent(window = "..")]` does.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let invalid = |why: &str| format!("invalid duration {text:?}: {why}");
    let mut rest = text;
    let mut total: u128 = 0;
    let mut last_rank = None;
    if rest.is_empty() {
        return Err(invalid(
            "expected a number and a unit (ms, s, m, h, d), e.g. 1d",
        ));
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(invalid("expected a number"));
        }
        let number: u128 = rest[..digits].parse().map_err(|_| invalid("too long"))?;
        rest = &rest[digits..];
        let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (rank, factor) = match &rest[..letters] {
            "d" => (0, 86_400_000),
            "h" => (1, 3_600_000),
            "m" => (2, 60_000),
            "s" => (3, 1_000),
            "ms" => (4, 1),
            "" => return Err(invalid("missing unit (ms, s, m, h, d)")),
            other => return Err(invalid(&format!("unknown unit `{other}` (ms, s, m, h, d)"))),
        };
        if last_rank.is_some_and(|last| rank <= last) {
            return Err(invalid(
                "units go from largest to smallest, each once (e.g. 1h30m)",
            ));
        }
        last_rank = Some(rank);
        rest = &rest[letters..];
        total = number
            .checked_mul(factor)
            .and_then(|v| v.checked_add(total))
            .filter(|v| *v <= MAX_MS)
            .ok_or_else(|| invalid("longer than 100 years"))?;
    }
    if total == 0 {
        return Err(invalid("it must be greater than zero"));
    }
    Ok(Duration::from_millis(total as u64))
}

/// `d` for people: `1d2h`, `3m4s`, `250ms`, `0s`.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let mut secs = ms / 1000;
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_attribute_accepts() {
        assert_eq!(parse("1d").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        for bad in ["", "1", "h", "30m1h", "1x", "0s", "1m1m", "40000d"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prints_for_people() {
        assert_eq!(human(Duration::from_millis(90_061_000)), "1d1h1m1s");
        assert_eq!(human(Duration::from_millis(20)), "20ms");
        assert_eq!(human(Duration::ZERO), "0s");
    }
}
