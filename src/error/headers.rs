//! The headers of a refusal that tell a client when to come back: the
//! wait, as `retry-after` (whole seconds) and `retry-after-ms` (which the
//! official SDKs read first), and, when a key's rate limit refused, that
//! limit as its API's clients read it: OpenAI's `x-ratelimit-*` or
//! Anthropic's `anthropic-ratelimit-*`. Answers that succeed carry none.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::ErrorShape;
use crate::limits::{Limit, Refused, go_duration};

pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// The names a limit is told in: its quota, what is left and when it is
/// full again, for each API's clients and each kind of limit.
pub const LIMIT_HEADERS: [[HeaderName; 3]; 4] = [
    [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ],
    [
        HeaderName::from_static("anthropic-ratelimit-requests-limit"),
        HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
        HeaderName::from_static("anthropic-ratelimit-requests-reset"),
    ],
    [
        HeaderName::from_static("anthropic-ratelimit-tokens-limit"),
        HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
    ],
];

/// `retry-after` and `retry-after-ms`, each rounded up: a client that
/// waits as told is never early.
pub fn retry(headers: &mut HeaderMap, after: Duration) {
    headers.insert(header::RETRY_AFTER, HeaderValue::from(whole_seconds(after)));
    let ms = u64::try_from(after.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    headers.insert(RETRY_AFTER_MS, HeaderValue::from(ms));
}

/// The limit that refused: its quota, what is left of it, and when it is
/// full again — a duration for OpenAI clients, a time (RFC 3339, to the
/// second) for Anthropic's, as each API writes it.
pub fn limit(headers: &mut HeaderMap, refused: &Refused, shape: ErrorShape) {
    let [limit, remaining, reset] = names(shape, refused.limit);
    headers.insert(limit, HeaderValue::from(refused.per_minute));
    headers.insert(remaining, HeaderValue::from(refused.remaining()));
    let at = match shape {
        ErrorShape::OpenAi => Some(go_duration::format(refused.full_in)),
        ErrorShape::Anthropic => timestamp_after(refused.full_in),
    };
    if let Some(value) = at.and_then(|at| HeaderValue::try_from(at).ok()) {
        headers.insert(reset, value);
    }
}

/// The limit's, remaining's and reset's header names.
fn names(shape: ErrorShape, limit: Limit) -> [HeaderName; 3] {
    let api = match shape {
        ErrorShape::OpenAi => 0,
        ErrorShape::Anthropic => 2,
    };
    let kind = match limit {
        Limit::Requests => 0,
        Limit::Tokens => 1,
    };
    LIMIT_HEADERS[api + kind].clone()
}

fn whole_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// The time `wait` from now, in RFC 3339, rounded up to the second.
fn timestamp_after(wait: Duration) -> Option<String> {
    let since_epoch = SystemTime::now()
        .checked_add(wait)?
        .duration_since(UNIX_EPOCH)
        .ok()?;
    let seconds = i64::try_from(whole_seconds(since_epoch)).ok()?;
    OffsetDateTime::from_unix_timestamp(seconds)
        .ok()?
        .format(&Rfc3339)
        .ok()
}
