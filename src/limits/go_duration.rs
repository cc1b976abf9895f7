//! Durations as Go writes them (`1h2m3.5s`, `6m0s`, `2m59.56s`, `120ms`):
//! OpenAI's `x-ratelimit-reset-*` headers give them so. Read from
//! upstreams (`upstream`), written on the gateway's own 429s.

use std::fmt::Write;
use std::time::Duration;

/// Each unit, with its length in seconds.
const UNITS: [(&str, f64); 7] = [
    ("h", 3600.0),
    ("m", 60.0),
    ("s", 1.0),
    ("ms", 1e-3),
    ("us", 1e-6),
    ("µs", 1e-6),
    ("ns", 1e-9),
];

/// `6m0s`, `2m59.56s`, `7.66s`, `120ms`, `1h30m`, `500us`.
pub fn parse(value: &str) -> Option<Duration> {
    let mut total = 0.0;
    let mut rest = value;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let (_, seconds) = UNITS.iter().find(|(name, _)| *name == &rest[..unit])?;
        rest = &rest[unit..];
        total += number * seconds;
    }
    (!value.is_empty() && total.is_finite()).then(|| Duration::from_secs_f64(total))
}

/// `wait` as Go and OpenAI write it (`250ms`, `7.66s`, `6m0s`, `1h0m0s`),
/// rounded up to the millisecond: a client that waits it out is never
/// early.
pub fn format(wait: Duration) -> String {
    let ms = wait.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (hours, ms) = (ms / 3_600_000, ms % 3_600_000);
    let (minutes, ms) = (ms / 60_000, ms % 60_000);
    let (seconds, ms) = (ms / 1000, ms % 1000);
    let mut text = String::new();
    if hours > 0 {
        let _ = write!(text, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(text, "{minutes}m");
    }
    let _ = write!(text, "{seconds}");
    if ms > 0 {
        let fraction = format!("{ms:03}");
        let _ = write!(text, ".{}", fraction.trim_end_matches('0'));
    }
    text.push('s');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn written_as_openai_writes_them_and_read_back_alike() {
        for (wait, text) in [
            (ms(1000), "1s"),
            (ms(360_000), "6m0s"),
            (ms(179_560), "2m59.56s"),
            (ms(7660), "7.66s"),
            (ms(250), "250ms"),
            (ms(60_500), "1m0.5s"),
            (ms(3_600_000), "1h0m0s"),
            (ms(5_430_007), "1h30m30.007s"),
            (Duration::ZERO, "0s"),
        ] {
            assert_eq!(format(wait), text);
            assert_eq!(parse(text), Some(wait), "{text}");
        }
    }

    #[test]
    fn written_rounded_up_to_the_millisecond() {
        assert_eq!(format(Duration::from_nanos(1)), "1ms");
        assert_eq!(format(Duration::from_micros(59_999_001)), "1m0s");
        assert_eq!(format(Duration::from_micros(999_001)), "1s");
    }

    #[test]
    fn read_in_every_unit_and_nothing_else() {
        assert_eq!(parse("500us"), Some(Duration::from_micros(500)));
        assert_eq!(parse("500µs"), Some(Duration::from_micros(500)));
        assert_eq!(parse("1h30m"), Some(ms(5_400_000)));
        for bad in ["", "soon", "5 minutes", "1x", "s", "1.2.3s"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
