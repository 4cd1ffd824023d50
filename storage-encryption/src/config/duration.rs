//! Go `time.Duration` strings (`3s`, `1m30s`, `500ms`, `1.5s`, `2h`), the
//! form the kms `timeout` field uses, and the one duration grammar of every
//! atrest command-line flag (through `cli-kit`).

use std::time::Duration;

/// Why a duration string was refused. The messages never quote the text: it
/// may come from a file that also holds keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Nothing but whitespace.
    #[error("empty duration")]
    Empty,
    /// Not a sequence of numbers with units.
    #[error("invalid duration: expected numbers with units, e.g. 3s, 1m30s, 500ms")]
    Invalid,
    /// A number without a unit (only `0` may go without one).
    #[error("missing unit in duration (ns, us, ms, s, m or h)")]
    MissingUnit,
    /// A unit Go does not know.
    #[error("unknown unit in duration (use ns, us, ms, s, m or h)")]
    UnknownUnit,
    /// More than Go's `time.Duration` holds (about 292 years).
    #[error("duration out of range")]
    OutOfRange,
    /// Below zero.
    #[error("duration is negative")]
    Negative,
}

/// Parses a Go duration string (`time.ParseDuration`): numbers (with an
/// optional fraction) each followed by a unit `ns`, `us`/`µs`, `ms`, `s`, `m`
/// or `h`, e.g. `1m30s`, `1.5s`; a bare `0` is zero. Negative durations are
/// refused (a KMS timeout or a flag interval is never negative).
pub fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let (negative, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(DurationError::Invalid);
    }
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(num_end);
        if number.is_empty() || number == "." {
            return Err(DurationError::Invalid);
        }
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(DurationError::MissingUnit),
            _ => return Err(DurationError::UnknownUnit),
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| DurationError::Invalid)?
        };
        let mut frac_nanos: u128 = 0;
        let mut scale: u128 = 1;
        for c in frac.chars() {
            let digit = c.to_digit(10).ok_or(DurationError::Invalid)?;
            if scale < 1_000_000_000_000_000_000 {
                frac_nanos = frac_nanos * 10 + u128::from(digit);
                scale *= 10;
            }
        }
        total_nanos = whole
            .checked_mul(unit_nanos)
            .and_then(|w| w.checked_add(frac_nanos * unit_nanos / scale))
            .and_then(|w| total_nanos.checked_add(w))
            .filter(|n| *n <= i64::MAX as u128)
            .ok_or(DurationError::OutOfRange)?;
        rest = next;
    }
    if negative && total_nanos > 0 {
        return Err(DurationError::Negative);
    }
    let secs = (total_nanos / 1_000_000_000) as u64;
    let nanos = (total_nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// Formats like Go's `Duration.String()`: `3s`, `1m30s`, `1h0m0s`, `500ms`.
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", trim_fraction(nanos, 1_000));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", trim_fraction(nanos, 1_000_000));
    }
    let total_secs = d.as_secs();
    let (h, m, s) = (total_secs / 3600, (total_secs / 60) % 60, total_secs % 60);
    let secs = trim_fraction(
        u128::from(s) * 1_000_000_000 + u128::from(d.subsec_nanos()),
        1_000_000_000,
    );
    match (h, m) {
        (0, 0) => format!("{secs}s"),
        (0, m) => format!("{m}m{secs}s"),
        (h, m) => format!("{h}h{m}m{secs}s"),
    }
}

/// `value / unit` as a decimal with trailing zeros trimmed.
fn trim_fraction(value: u128, unit: u128) -> String {
    let whole = value / unit;
    let frac = value % unit;
    if frac == 0 {
        return whole.to_string();
    }
    let width = unit.ilog10() as usize;
    let digits = format!("{frac:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_forms() {
        assert_eq!(parse_go_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert!(parse_go_duration("3").is_err());
        assert!(parse_go_duration("-1s").is_err());
        assert!(parse_go_duration("3x").is_err());
        assert!(parse_go_duration("").is_err());
    }

    #[test]
    fn formats_like_go() {
        for (d, s) in [
            (Duration::from_secs(3), "3s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1500), "1.5s"),
        ] {
            assert_eq!(format_go_duration(d), s);
            assert_eq!(parse_go_duration(s), Ok(d));
        }
    }
}
