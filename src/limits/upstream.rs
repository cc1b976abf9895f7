//! What an upstream says of its own quota, on every response (success or
//! error): OpenAI and Groq send `x-ratelimit-remaining-requests`,
//! `x-ratelimit-remaining-tokens` and `x-ratelimit-reset-requests` /
//! `-tokens` as durations (`1s`, `6m0s`, `2m59.56s`, `120ms`); Together
//! sends `x-ratelimit-remaining`, `x-tokenlimit-remaining` and
//! `x-ratelimit-reset` (seconds). Reading is lenient: a value that does not
//! parse is ignored.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::go_duration;

/// No reset is believed further away than this: a bad header must not
/// bench a deployment for longer.
const MAX_RESET: Duration = Duration::from_secs(3600);
/// Plain numbers above this are unix times, not seconds to wait.
const UNIX_TIME_FLOOR: f64 = 1_000_000_000.0;

/// The headers read, each with its place in [`Found`].
const NAMES: [&str; 7] = [
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset",
    "x-ratelimit-remaining-tokens",
    "x-tokenlimit-remaining",
    "x-ratelimit-reset-tokens",
];
const REMAINING_REQUESTS: usize = 0;
const REMAINING: usize = 1;
const RESET_REQUESTS: usize = 2;
const RESET: usize = 3;
const REMAINING_TOKENS: usize = 4;
const TOKENLIMIT_REMAINING: usize = 5;
const RESET_TOKENS: usize = 6;

/// The first value of each of [`NAMES`] a response carries.
type Found<'h> = [Option<&'h [u8]>; NAMES.len()];
/// The lengths of the shortest and the longest of [`NAMES`].
const SHORTEST: usize = 17;
const LONGEST: usize = 30;

/// What is left of one upstream limit, and when it resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    pub left: u64,
    /// `None` when the upstream did not say.
    pub reset_in: Option<Duration>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamQuota {
    pub requests: Option<Remaining>,
    pub tokens: Option<Remaining>,
}

impl UpstreamQuota {
    /// The quota a response's header fields (name, value) report; `None`
    /// when they report none. The fields are walked once, their names
    /// compared in any case, and only those as long as a name read and
    /// starting `x-`: most responses carry none of them.
    pub fn from_fields<'h>(fields: impl IntoIterator<Item = (&'h [u8], &'h [u8])>) -> Option<Self> {
        let mut found: Found<'_> = [None; NAMES.len()];
        for (name, value) in fields {
            if !(SHORTEST..=LONGEST).contains(&name.len()) || !name[..2].eq_ignore_ascii_case(b"x-")
            {
                continue;
            }
            if let Some(at) = NAMES
                .iter()
                .position(|n| name.eq_ignore_ascii_case(n.as_bytes()))
            {
                found[at].get_or_insert(value);
            }
        }
        if found.iter().all(Option::is_none) {
            return None;
        }
        let quota = Self {
            requests: remaining(
                &found,
                &[REMAINING_REQUESTS, REMAINING],
                &[RESET_REQUESTS, RESET],
            ),
            tokens: remaining(
                &found,
                &[REMAINING_TOKENS, TOKENLIMIT_REMAINING],
                &[RESET_TOKENS],
            ),
        };
        (quota != Self::default()).then_some(quota)
    }
}

/// The first of `names` that holds a usable value.
fn first<T>(found: &Found<'_>, names: &[usize], parse: impl Fn(&str) -> Option<T>) -> Option<T> {
    names.iter().find_map(|&at| {
        found[at]
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| parse(v.trim()))
    })
}

fn remaining(found: &Found<'_>, left: &[usize], reset: &[usize]) -> Option<Remaining> {
    Some(Remaining {
        left: first(found, left, parse_count)?,
        reset_in: first(found, reset, parse_reset),
    })
}

/// A count; a fractional one (some proxies send `12.0`) is floored.
fn parse_count(value: &str) -> Option<u64> {
    value.parse::<u64>().ok().or_else(|| {
        let n = value.parse::<f64>().ok()?;
        (n.is_finite() && n >= 0.0).then(|| n.floor() as u64)
    })
}

/// A reset: a Go-style duration (`1h2m3.5s`, `120ms`), plain seconds, or
/// a unix time in seconds; at most an hour.
pub(super) fn parse_reset(value: &str) -> Option<Duration> {
    let wait = match value.parse::<f64>() {
        Ok(n) if !n.is_finite() || n < 0.0 => return None,
        Ok(at) if at >= UNIX_TIME_FLOOR => (UNIX_EPOCH + Duration::from_secs_f64(at))
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
        Ok(secs) => Duration::from_secs_f64(secs),
        Err(_) => go_duration::parse(value)?,
    };
    Some(wait.min(MAX_RESET))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(fields: &[(&str, &str)]) -> Option<UpstreamQuota> {
        UpstreamQuota::from_fields(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn the_names_span_the_lengths_compared() {
        let lengths = NAMES.map(str::len);
        assert_eq!(lengths.iter().min(), Some(&SHORTEST));
        assert_eq!(lengths.iter().max(), Some(&LONGEST));
    }

    fn ms(ms: u64) -> Option<Duration> {
        Some(Duration::from_millis(ms))
    }

    #[test]
    fn resets_are_go_durations_or_seconds() {
        assert_eq!(parse_reset("1s"), ms(1000));
        assert_eq!(parse_reset("6m0s"), ms(360_000));
        assert_eq!(parse_reset("2m59.56s"), ms(179_560));
        assert_eq!(parse_reset("7.66s"), ms(7660));
        assert_eq!(parse_reset("120ms"), ms(120));
        assert_eq!(parse_reset("1h30m"), ms(3_600_000), "capped at an hour");
        assert_eq!(parse_reset("2"), ms(2000));
        assert_eq!(parse_reset("0.25"), ms(250));
        let in_a_minute = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        let wait = parse_reset(&in_a_minute.to_string()).unwrap();
        assert!(
            (Duration::from_secs(58)..=Duration::from_secs(60)).contains(&wait),
            "{wait:?}"
        );
        for bad in ["", "soon", "5 minutes", "-1", "1x", "s"] {
            assert_eq!(parse_reset(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn openai_and_groq_headers() {
        let quota = quota(&[
            ("x-ratelimit-limit-requests", "14400"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "2m59.56s"),
            ("x-ratelimit-remaining-tokens", "5800"),
            ("x-ratelimit-reset-tokens", "7.66s"),
        ])
        .unwrap();
        assert_eq!(
            quota.requests,
            Some(Remaining {
                left: 0,
                reset_in: ms(179_560)
            })
        );
        assert_eq!(
            quota.tokens,
            Some(Remaining {
                left: 5800,
                reset_in: ms(7660)
            })
        );
    }

    #[test]
    fn together_headers() {
        let quota = quota(&[
            ("x-ratelimit-remaining", "9"),
            ("x-ratelimit-reset", "1"),
            ("x-tokenlimit-remaining", "1200.0"),
        ])
        .unwrap();
        assert_eq!(
            quota.requests,
            Some(Remaining {
                left: 9,
                reset_in: ms(1000)
            })
        );
        assert_eq!(
            quota.tokens,
            Some(Remaining {
                left: 1200,
                reset_in: None
            })
        );
    }

    #[test]
    fn no_or_unreadable_headers_report_nothing() {
        assert_eq!(quota(&[]), None);
        assert_eq!(quota(&[("content-type", "application/json")]), None);
        assert_eq!(
            quota(&[
                ("x-ratelimit-remaining-requests", "lots"),
                ("x-ratelimit-reset-requests", "1s"),
            ]),
            None
        );
    }

    #[test]
    fn names_are_read_in_any_case() {
        let quota = quota(&[
            ("X-RateLimit-Remaining-Requests", "3"),
            ("X-RATELIMIT-RESET-REQUESTS", "1s"),
        ])
        .unwrap();
        assert_eq!(
            quota.requests,
            Some(Remaining {
                left: 3,
                reset_in: ms(1000)
            })
        );
    }

    #[test]
    fn a_header_sent_twice_counts_as_first_sent() {
        let quota = quota(&[
            ("content-type", "application/json"),
            ("x-ratelimit-remaining", "7"),
            ("x-ratelimit-remaining", "9"),
            ("x-ratelimit-reset", "soon"),
            ("x-ratelimit-reset", "2"),
        ])
        .unwrap();
        assert_eq!(
            quota.requests,
            Some(Remaining {
                left: 7,
                reset_in: None
            }),
            "the first value is read, as a lookup by name reads it"
        );
        assert_eq!(quota.tokens, None);
    }
}
