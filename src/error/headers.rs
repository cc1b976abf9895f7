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

/// `retry-after` and `retry-after-ms`, each rounded up: a client that
/// waits as told is never early.
pub fn retry(headers: &mut HeaderMap, after: Duration) {
    headers.insert(header::RETRY_AFTER, HeaderValue::from(whole_seconds(after)));
    let ms = u64::try_from(after.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    headers.insert("retry-after-ms", HeaderValue::from(ms));
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
    let names = match (shape, limit) {
        (ErrorShape::OpenAi, Limit::Requests) => [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        (ErrorShape::OpenAi, Limit::Tokens) => [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
        (ErrorShape::Anthropic, Limit::Requests) => [
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-requests-reset",
        ],
        (ErrorShape::Anthropic, Limit::Tokens) => [
            "anthropic-ratelimit-tokens-limit",
            "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-tokens-reset",
        ],
    };
    names.map(HeaderName::from_static)
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
