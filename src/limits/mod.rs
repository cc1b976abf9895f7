//! Rate limits: requests and tokens per minute, per key (`[[keys]] rpm`,
//! `tpm`) and per deployment (the provider's quota), counted with
//! `governor`; and what upstreams say of their own quota in their
//! `x-ratelimit-*` headers (`upstream`).
//!
//! Tokens are taken at admission from the prompt estimate, and the rest
//! (prompt beyond the estimate, and the completion) when the request ends
//! ([`Limits::settle`]). `governor` cannot refund, nor go below empty: a
//! prompt the estimate overrated is not given back, and a request that
//! used more than is left empties the bucket but leaves no debt beyond.

mod upstream;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::PerMinute;

pub use upstream::{Remaining, UpstreamQuota};

/// Which of the two limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
}

impl Limit {
    /// `rpm` or `tpm`, as the config names it (and the metric label).
    pub fn name(self) -> &'static str {
        match self {
            Self::Requests => "rpm",
            Self::Tokens => "tpm",
        }
    }

    /// What the limit counts, for messages.
    pub fn unit(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

/// A limit said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub limit: Limit,
    pub per_minute: u32,
    /// When the request would fit; `None` when it never can (it asks for
    /// more tokens than the whole minute's quota).
    pub wait: Option<Duration>,
}

/// The request and token limits of one key or deployment. Kept in live
/// state by name, so they survive a reload; a limiter is rebuilt only when
/// its quota changes.
#[derive(Default)]
pub struct Limits {
    requests: Bucket,
    tokens: Bucket,
}

impl Limits {
    /// Applies the configured quota; an unchanged one keeps its state.
    /// Whether anything changed.
    pub fn configure(&self, quota: PerMinute) -> bool {
        let requests = self.requests.configure(quota.requests);
        self.tokens.configure(quota.tokens) || requests
    }

    /// Takes one request and `tokens` (the prompt estimate). When the
    /// token limit refuses, the request's cell stays spent: `governor`
    /// cannot give it back.
    pub fn admit(&self, tokens: u64) -> Result<(), Refused> {
        self.requests.take(1).map_err(|wait| Refused {
            limit: Limit::Requests,
            per_minute: self.requests.per_minute().map_or(0, NonZeroU32::get),
            wait,
        })?;
        self.tokens.take(tokens).map_err(|wait| Refused {
            limit: Limit::Tokens,
            per_minute: self.tokens.per_minute().map_or(0, NonZeroU32::get),
            wait,
        })
    }

    /// Whether `tokens` can ever fit the token limit.
    pub fn fits(&self, tokens: u64) -> Result<(), Refused> {
        match self.tokens.per_minute() {
            Some(tpm) if u64::from(tpm.get()) < tokens => Err(Refused {
                limit: Limit::Tokens,
                per_minute: tpm.get(),
                wait: None,
            }),
            _ => Ok(()),
        }
    }

    /// Charges what the request used beyond the `admitted` estimate: the
    /// prompt's excess and the completion. The request was served, so a
    /// refusal is ignored: the bucket is emptied and later requests wait.
    pub fn settle(&self, admitted: u64, prompt: u64, completion: u64) {
        let rest = prompt.saturating_sub(admitted) + completion;
        self.tokens.drain(rest);
    }
}

/// One `governor` limiter and the quota it was built for.
struct Gcra {
    per_minute: NonZeroU32,
    limiter: DefaultDirectRateLimiter,
}

/// A limiter that may be replaced by a reload; empty means no limit.
#[derive(Default)]
struct Bucket(ArcSwapOption<Gcra>);

impl Bucket {
    fn per_minute(&self) -> Option<NonZeroU32> {
        self.0.load().as_ref().map(|g| g.per_minute)
    }

    fn configure(&self, per_minute: Option<NonZeroU32>) -> bool {
        if self.per_minute() == per_minute {
            return false;
        }
        self.0.store(per_minute.map(|per_minute| {
            Arc::new(Gcra {
                per_minute,
                limiter: RateLimiter::direct(Quota::per_minute(per_minute)),
            })
        }));
        true
    }

    /// Takes `n` cells, or says how long until they fit (`None`: never).
    fn take(&self, n: u64) -> Result<(), Option<Duration>> {
        let guard = self.0.load();
        let (Some(gcra), Some(n)) = (
            guard.as_ref(),
            NonZeroU32::new(n.min(u64::from(u32::MAX)) as u32),
        ) else {
            return Ok(());
        };
        match gcra.limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(
                not_until
                    .earliest_possible()
                    .saturating_duration_since(Instant::now()),
            )),
            Err(_) => Err(None),
        }
    }

    /// Takes up to `n` cells, as many as are there.
    fn drain(&self, n: u64) {
        let guard = self.0.load();
        let Some(gcra) = guard.as_ref() else {
            return;
        };
        let mut rest = n;
        let mut step = n.min(u64::from(gcra.per_minute.get()));
        while rest > 0 && step > 0 {
            let cells = NonZeroU32::new(step as u32).expect("step is positive");
            if matches!(gcra.limiter.check_n(cells), Ok(Ok(()))) {
                rest -= step;
                step = step.min(rest);
            } else {
                step /= 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(rpm: u32, tpm: u32) -> PerMinute {
        PerMinute {
            requests: NonZeroU32::new(rpm),
            tokens: NonZeroU32::new(tpm),
        }
    }

    #[test]
    fn requests_past_the_quota_wait_for_the_next_slot() {
        let limits = Limits::default();
        limits.configure(quota(2, 0));
        assert_eq!(limits.admit(10_000), Ok(()));
        assert_eq!(limits.admit(10_000), Ok(()));
        let refused = limits.admit(1).unwrap_err();
        assert_eq!((refused.limit, refused.per_minute), (Limit::Requests, 2));
        let wait = refused.wait.expect("a slot frees");
        assert!(
            (Duration::from_secs(29)..=Duration::from_secs(30)).contains(&wait),
            "{wait:?}"
        );
    }

    #[test]
    fn tokens_are_taken_at_admission_and_settled_at_the_end() {
        let limits = Limits::default();
        limits.configure(quota(0, 1000));
        assert_eq!(limits.admit(100), Ok(()));
        // 300 prompt tokens where 100 were estimated, and 500 generated.
        limits.settle(100, 300, 500);
        assert_eq!(limits.admit(200), Ok(()), "exactly what is left");
        let refused = limits.admit(10).unwrap_err();
        assert_eq!((refused.limit, refused.per_minute), (Limit::Tokens, 1000));
        assert!(refused.wait.is_some());
        assert_eq!(
            limits.fits(1001).unwrap_err().wait,
            None,
            "more than a minute's quota never fits"
        );
        assert_eq!(limits.admit(1001).unwrap_err().wait, None);
    }

    #[test]
    fn settling_more_than_is_left_empties_the_bucket() {
        let limits = Limits::default();
        limits.configure(quota(0, 1000));
        limits.settle(0, 0, 5000);
        assert!(limits.admit(1).is_err());
    }

    #[test]
    fn an_unchanged_quota_keeps_its_state_and_a_new_one_starts_afresh() {
        let limits = Limits::default();
        limits.configure(quota(1, 0));
        limits.admit(0).unwrap();
        limits.configure(quota(1, 0));
        assert!(limits.admit(0).is_err(), "same quota, same bucket");
        limits.configure(quota(5, 0));
        assert_eq!(limits.admit(0), Ok(()), "a new quota, a new bucket");
        limits.configure(PerMinute::default());
        for _ in 0..100 {
            assert_eq!(limits.admit(1 << 40), Ok(()), "no limit");
        }
    }
}
