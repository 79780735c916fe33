//! The one duration grammar of the command line, the Helm values and `--retry-schedule`:
//! whole numbers with units `d`, `h`, `m`, `s`, `ms`, largest first, run together
//! (`90s`, `1m30s`, `5d`, `200ms`). Only integers, so every value is exact; no spaces, no signs.

use std::time::Duration;

/// The units, largest first, with their length in milliseconds.
const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// Parses a duration such as `30s`, `1m30s` or `5d`. The error says what is wrong, for a flag's
/// or a schedule item's message.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Err("it is empty".into());
    }
    let mut rest = text;
    let mut total: u64 = 0;
    // Index into UNITS of the last unit used: each part must use a smaller one.
    let mut last_unit: Option<usize> = None;
    while !rest.is_empty() {
        let digits_end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (digits, after) = rest.split_at(digits_end);
        if digits.is_empty() {
            return Err(if last_unit.is_none() {
                "it must start with a whole number, e.g. \"5m\"".into()
            } else {
                format!("{rest:?} must start with a whole number")
            });
        }
        let unit_end = after.find(|c: char| c.is_ascii_digit()).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        let Some(index) = UNITS.iter().position(|(name, _)| *name == unit) else {
            return Err(if unit.is_empty() {
                "it has no unit; use d, h, m, s or ms".into()
            } else {
                format!("unknown unit {unit:?}; use d, h, m, s or ms")
            });
        };
        if last_unit.is_some_and(|last| index <= last) {
            return Err("units must go from largest to smallest, each once, like \"1h30m\"".into());
        }
        last_unit = Some(index);
        let value: u64 = digits.parse().map_err(|_| "the number is too large".to_string())?;
        total = value
            .checked_mul(UNITS[index].1)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(|| "the number is too large".to_string())?;
        rest = next;
    }
    Ok(Duration::from_millis(total))
}

/// Parses a duration for a command-line flag: the error names the value and the grammar.
pub fn parse_flag_duration(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|reason| format!("{text:?} is not a duration like 30s, 1m30s, 24h or 5d: {reason}"))
}

/// Writes a duration in the grammar, in the largest unit that represents it exactly
/// (`300000ms` → `5m`; `90s` stays `90s`). Sub-millisecond durations are not representable and
/// are written in Rust's debug form.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{d:?}");
    }
    let millis = d.as_millis();
    // Days only when whole: `24h` reads better as `1d`, but `36h` stays `36h`.
    UNITS
        .iter()
        .find(|(_, per)| millis.is_multiple_of(u128::from(*per)))
        .map(|(unit, per)| format!("{}{unit}", millis / u128::from(*per)))
        .expect("every whole millisecond count is a multiple of 1 ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn every_unit_and_compounds() {
        for (text, want) in [
            ("0s", secs(0)),
            ("200ms", Duration::from_millis(200)),
            ("30s", secs(30)),
            ("90s", secs(90)),
            ("1m30s", secs(90)),
            ("5m", secs(300)),
            ("24h", secs(86_400)),
            ("5d", secs(5 * 86_400)),
            ("1d12h", secs(36 * 3600)),
            ("1h0m5s250ms", Duration::from_millis(3_605_250)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn refusals_say_why() {
        for (text, why) in [
            ("", "empty"),
            ("5", "no unit"),
            ("s", "whole number"),
            ("-5s", "whole number"),
            ("1.5h", "unknown unit \".\""),
            ("5 s", "unknown unit"),
            ("5S", "unknown unit"),
            ("5w", "unknown unit \"w\""),
            ("30s1m", "largest to smallest"),
            ("1m1m", "largest to smallest"),
            ("1m30", "no unit"),
            ("99999999999999999999s", "too large"),
            ("18446744073709551615h", "too large"),
            ("213503982335d", "too large"),
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains(why), "{text:?}: {err}");
        }
        let flag = parse_flag_duration("10x").unwrap_err();
        assert!(flag.starts_with("\"10x\" is not a duration like 30s"), "{flag}");
    }

    #[test]
    fn format_is_the_largest_exact_unit_and_parses_back() {
        for (d, text) in [
            (secs(0), "0s"),
            (Duration::from_millis(1500), "1500ms"),
            (secs(90), "90s"),
            (secs(300), "5m"),
            (secs(36_000), "10h"),
            (secs(86_400), "1d"),
            (secs(36 * 3600), "36h"),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_nanos(1500)), "1.5µs");
    }
}
