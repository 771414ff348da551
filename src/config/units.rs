//! Durations (`"500ms"`, `"30s"`, `"7d"`) and sizes (`"64KiB"`, `"1GiB"`, `"10MB"`, or a
//! plain number of bytes) as written in the config file.

use std::time::Duration;

use bytesize::ByteSize;
use toml::Value;

const DURATION_EXAMPLES: &str = r#"like "500ms", "30s", "5m", "2h" or "7d""#;
const SIZE_EXAMPLES: &str = r#"like "64KiB", "256KiB", "1GiB", "10MB", or a number of bytes"#;

/// Reads a duration; the error says what was found and what is accepted.
pub fn duration(value: &Value) -> Result<Duration, String> {
    match value {
        Value::String(text) => humantime::parse_duration(text)
            .map_err(|_| format!("{text:?} is not a duration {DURATION_EXAMPLES}")),
        Value::Integer(n) => Err(format!(
            "{n} has no unit; write a duration {DURATION_EXAMPLES}"
        )),
        other => Err(format!(
            "expected a duration {DURATION_EXAMPLES}, found a {}",
            other.type_str()
        )),
    }
}

/// Reads a size in bytes; the error says what was found and what is accepted.
pub fn size(value: &Value) -> Result<u64, String> {
    match value {
        Value::String(text) => {
            size_text(text).ok_or_else(|| format!("{text:?} is not a size {SIZE_EXAMPLES}"))
        }
        Value::Integer(n) => {
            u64::try_from(*n).map_err(|_| format!("{n} is negative; a size is {SIZE_EXAMPLES}"))
        }
        other => Err(format!(
            "expected a size {SIZE_EXAMPLES}, found a {}",
            other.type_str()
        )),
    }
}

/// `bytesize` takes anything that starts with a number and ends with a unit it knows, and
/// saturates on overflow; this admits only `<digits>[.<digits>][ ]<unit>` that fits.
fn size_text(text: &str) -> Option<u64> {
    let number_end = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(number_end);
    let unit = unit.strip_prefix(' ').unwrap_or(unit);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, "0"));
    let digits_only = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_only(whole)
        || !digits_only(fraction)
        || !unit.bytes().all(|b| b.is_ascii_alphabetic())
    {
        return None;
    }
    match text.parse::<ByteSize>() {
        Ok(ByteSize(bytes)) if bytes < u64::MAX => Some(bytes),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::String(s.into())
    }

    #[test]
    fn durations() {
        assert_eq!(duration(&text("500ms")), Ok(Duration::from_millis(500)));
        assert_eq!(duration(&text("30s")), Ok(Duration::from_secs(30)));
        assert_eq!(duration(&text("5m")), Ok(Duration::from_secs(300)));
        assert_eq!(duration(&text("2h")), Ok(Duration::from_secs(7200)));
        assert_eq!(duration(&text("7d")), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(duration(&text("1h 30m")), Ok(Duration::from_secs(5400)));
        assert_eq!(
            duration(&text("10")),
            Err(r#""10" is not a duration like "500ms", "30s", "5m", "2h" or "7d""#.into())
        );
        assert!(duration(&text("soon")).is_err());
        assert!(duration(&text("-1s")).is_err());
        assert!(duration(&text("")).is_err());
        assert!(duration(&Value::Integer(30))
            .unwrap_err()
            .starts_with("30 has no unit"));
        assert!(duration(&Value::Boolean(true))
            .unwrap_err()
            .ends_with("found a boolean"));
    }

    #[test]
    fn sizes() {
        assert_eq!(size(&text("64KiB")), Ok(64 * 1024));
        assert_eq!(size(&text("256KiB")), Ok(256 * 1024));
        assert_eq!(size(&text("1GiB")), Ok(1 << 30));
        assert_eq!(size(&text("10MB")), Ok(10_000_000));
        assert_eq!(size(&text("10 MB")), Ok(10_000_000));
        assert_eq!(size(&text("1.5KiB")), Ok(1536));
        assert_eq!(size(&text("4096")), Ok(4096));
        assert_eq!(size(&Value::Integer(4096)), Ok(4096));
        for garbage in [
            "",
            "KiB",
            "1.KiB",
            ".5KiB",
            "1.2.3KiB",
            "1 GiB ",
            " 1GiB",
            "1  GiB",
            "1GiB!",
            "1e3",
            "1 lots",
            "99999999999PiB",
        ] {
            assert!(size(&text(garbage)).is_err(), "{garbage:?}");
        }
        assert!(size(&Value::Integer(-1)).unwrap_err().contains("negative"));
        assert!(size(&Value::Float(1.5))
            .unwrap_err()
            .ends_with("found a float"));
    }
}
