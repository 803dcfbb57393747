//! Human-written durations (`"250ms"`, `"30s"`, `"10m"`, `"1h"`) and sizes (`"64KiB"`, `"1MiB"`).

use std::time::Duration;

/// A duration or size that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("invalid duration {0:?}: expected a number and a unit (ms, s, m, h, d), like \"30s\"")]
    InvalidDuration(String),
    #[error("duration {0:?} is out of range")]
    DurationOutOfRange(String),
    #[error(
        "invalid size {0:?}: expected a whole number and a unit (B, KiB, MiB, GiB, KB, MB, GB), like \"1MiB\""
    )]
    InvalidSize(String),
    #[error("size {0:?} is out of range")]
    SizeOutOfRange(String),
}

/// Parses `"<number><unit>"` where unit is ms, s, m, h or d.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let expected = || UnitError::InvalidDuration(text.to_owned());
    if number.is_empty() || unit.is_empty() {
        return Err(expected());
    }
    let value: f64 = number.parse().map_err(|_| expected())?;
    let seconds_per_unit = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(expected()),
    };
    let seconds = value * seconds_per_unit;
    if !seconds.is_finite() || seconds > 10.0 * 365.0 * 86400.0 {
        return Err(UnitError::DurationOutOfRange(text.to_owned()));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses `"<number><unit>"` where unit is B, KiB, MiB, GiB (binary) or KB, MB, GB (decimal).
/// A bare number is bytes.
pub(crate) fn parse_size(text: &str) -> Result<u64, UnitError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let expected = || UnitError::InvalidSize(text.to_owned());
    if number.is_empty() {
        return Err(expected());
    }
    let value: u64 = number.parse().map_err(|_| expected())?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(expected()),
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| UnitError::SizeOutOfRange(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["", "30", "s", "30 parsecs", "-1s", "1e9h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("512"), Ok(512));
        for bad in ["", "MiB", "1.5MiB", "1 parsec", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
