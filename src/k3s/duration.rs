//! Go `time.ParseDuration` syntax, which kube-apiserver uses for duration flags.

use std::time::Duration;

/// Parses a Go duration such as `24h`, `24h0m0s`, `1h30m` or `1.5h`.
///
/// Returns `None` for anything Go would reject, including a bare number other than `0`
/// and units Go does not know (`d`, `w`). Negative durations are rejected too, since no
/// kube-apiserver lifetime flag accepts them.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let text = text.strip_prefix('+').unwrap_or(text);
    if text == "0" {
        return Some(Duration::ZERO);
    }
    if text.is_empty() {
        return None;
    }
    let mut rest = text;
    let mut total_nanos: f64 = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..number_len];
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit_nanos = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total_nanos += value * unit_nanos;
    }
    if !total_nanos.is_finite() || total_nanos > u64::MAX as f64 {
        return None;
    }
    Some(Duration::from_nanos(total_nanos.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equivalent_spellings_are_equal() {
        let day = Some(Duration::from_secs(86_400));
        assert_eq!(parse_go_duration("24h"), day);
        assert_eq!(parse_go_duration("24h0m0s"), day);
        assert_eq!(parse_go_duration("1440m"), day);
        assert_eq!(parse_go_duration("23h60m"), day);
    }

    #[test]
    fn fractions_and_small_units_parse() {
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
    }

    #[test]
    fn go_rejections_are_rejected() {
        for text in ["", "24", "1d", "h", "1.2.3h", "-1h", "24 h", "1w"] {
            assert_eq!(parse_go_duration(text), None, "{text}");
        }
    }
}
