//! Rate limits: requests and tokens per minute, per key (`[[keys]] rpm`,
//! `tpm`) and per deployment (the provider's quota), each a [`gcra`]
//! limit; and what upstreams say of their own quota in their
//! `x-ratelimit-*` headers (`upstream`), whose durations are Go's
//! ([`go_duration`], also how the gateway writes its own).
//!
//! Tokens are taken at admission from the prompt estimate; output tokens
//! are charged as they are generated ([`Limits::charge`]), and the
//! request's actual usage settles the difference when it ends
//! ([`Limits::settle`]). Charges may pass the quota: the limit is then in
//! debt, and refuses requests until the debt is paid off, with a wait that
//! covers it.

mod gcra;
pub mod go_duration;
mod upstream;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use crate::config::PerMinute;
use gcra::Gcra;

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
    /// When the limit is full again: its whole quota free, debt paid off.
    pub full_in: Duration,
}

impl Refused {
    /// What is left of the limit now: less than the request needed.
    pub fn remaining(&self) -> u64 {
        gcra::room(self.per_minute, self.full_in)
    }
}

/// A fleet's shared rate limits (Redis): admission there is the
/// pipeline's; what this module sends it is the tokens charged after.
pub trait SharedTokens: Send + Sync {
    /// Where the shared state of `owner` (`key:NAME`, `deployment:NAME`)
    /// lives.
    fn home(&self, owner: &str) -> String;

    /// Charges (`delta` > 0) or refunds tokens to the shared cell `field`
    /// of `home`; dropped while the shared store is away (the local
    /// buckets, which count every charge, enforce then).
    fn tokens(&self, home: &str, field: &str, per_minute: u32, delta: i64);
}

/// The request and token limits of one key or deployment. Kept in live
/// state by name, so they survive a reload; a limit is rebuilt only when
/// its quota changes.
#[derive(Default)]
pub struct Limits {
    requests: Bucket,
    tokens: Bucket,
    /// Where charged tokens go when the fleet shares its limits.
    shared: ArcSwapOption<Shared>,
}

struct Shared {
    sink: Arc<dyn SharedTokens>,
    /// Named once per quota, not per request.
    cells: Arc<SharedCells>,
}

/// What admission in a shared store needs of a limit: where its owner's
/// state lives, and its cells there (a field and its per-minute quota).
/// A changed quota is a new cell, as it is a new bucket here.
pub struct SharedCells {
    pub home: String,
    pub requests: Option<(String, u32)>,
    pub tokens: Option<(String, u32)>,
}

impl Limits {
    /// Applies the configured quota; an unchanged one keeps its state.
    /// Whether anything changed.
    pub fn configure(&self, quota: PerMinute) -> bool {
        let requests = self.requests.configure(quota.requests);
        self.tokens.configure(quota.tokens) || requests
    }

    /// From now on, tokens charged after admission also go to the fleet's
    /// shared cells of `owner`, named for the quota as configured: call
    /// it again after [`configure`](Self::configure).
    pub fn share(&self, sink: Arc<dyn SharedTokens>, owner: String) {
        let cell = |bucket: &Bucket, limit: Limit| {
            bucket
                .per_minute()
                .map(|pm| (format!("{}:{pm}", limit.name()), pm.get()))
        };
        let cells = Arc::new(SharedCells {
            home: sink.home(&owner),
            requests: cell(&self.requests, Limit::Requests),
            tokens: cell(&self.tokens, Limit::Tokens),
        });
        self.shared.store(Some(Arc::new(Shared { sink, cells })));
    }

    /// The shared cells admission takes from; `None` when not shared.
    pub fn shared_cells(&self) -> Option<Arc<SharedCells>> {
        self.shared.load().as_ref().map(|s| s.cells.clone())
    }

    /// Whether there is a limit at all.
    pub fn is_limited(&self) -> bool {
        self.requests.set.load(Ordering::Acquire) || self.tokens.set.load(Ordering::Acquire)
    }

    /// Whether there is a limit on tokens, which a request settles to
    /// what it used.
    pub fn limits_tokens(&self) -> bool {
        self.tokens.set.load(Ordering::Acquire)
    }

    /// Sends `delta` tokens to the shared token cell, if there is one and
    /// the store answers.
    fn to_shared(&self, delta: i64) {
        if !self.limits_tokens() {
            return;
        }
        let shared = self.shared.load();
        if let Some((s, (field, per_minute))) = shared
            .as_ref()
            .and_then(|s| Some((s, s.cells.tokens.as_ref()?)))
        {
            s.sink.tokens(&s.cells.home, field, *per_minute, delta);
        }
    }

    /// Counts a request the fleet's shared limits admitted (one request,
    /// `tokens` of prompt) in this process's own buckets too, taken or
    /// not: should the store go away, this replica's own limits go on
    /// from what it used.
    pub fn mirror(&self, tokens: u64, now: Instant) {
        self.requests.charge(1, now);
        self.tokens.charge(tokens, now);
    }

    /// Takes one request and `tokens` (the prompt estimate), or neither.
    pub fn admit(&self, tokens: u64, now: Instant) -> Result<(), Refused> {
        self.requests
            .take(1, now)
            .map_err(|wait| self.refused(Limit::Requests, wait, now))?;
        self.tokens.take(tokens, now).map_err(|wait| {
            // Both or neither: the request's cell goes back.
            self.requests.refund(1, now);
            self.refused(Limit::Tokens, wait, now)
        })
    }

    /// Whether a request of `tokens` would be admitted now, without
    /// taking anything.
    pub fn check(&self, tokens: u64, now: Instant) -> Result<(), Refused> {
        self.requests
            .check(1, now)
            .map_err(|wait| self.refused(Limit::Requests, wait, now))?;
        self.tokens
            .check(tokens, now)
            .map_err(|wait| self.refused(Limit::Tokens, wait, now))
    }

    /// The refusal of `limit` at `now`. Only a refusal reads the bucket's
    /// state a second time, to say what is left of it.
    fn refused(&self, limit: Limit, wait: Option<Duration>, now: Instant) -> Refused {
        let bucket = match limit {
            Limit::Requests => &self.requests,
            Limit::Tokens => &self.tokens,
        };
        Refused {
            limit,
            per_minute: bucket.per_minute().map_or(0, NonZeroU32::get),
            wait,
            full_in: bucket.full_in(now),
        }
    }

    /// Whether `tokens` can ever fit the token limit; if not, its `tpm`.
    pub fn fits(&self, tokens: u64) -> Result<(), u32> {
        match self.tokens.per_minute() {
            Some(tpm) if u64::from(tpm.get()) < tokens => Err(tpm.get()),
            _ => Ok(()),
        }
    }

    /// Charges `tokens` being generated: served, so charged even past the
    /// quota, as debt.
    pub fn charge(&self, tokens: u64, now: Instant) {
        self.to_shared(i64::try_from(tokens).unwrap_or(i64::MAX));
        self.tokens.charge(tokens, now);
    }

    /// Settles a request that was charged `charged` tokens (its prompt
    /// estimate and the output charged as it came) and used `used`.
    pub fn settle(&self, charged: u64, used: u64, now: Instant) {
        let delta = i64::try_from(used)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(charged).unwrap_or(i64::MAX));
        if delta == 0 {
            return;
        }
        self.to_shared(delta);
        if used > charged {
            self.tokens.charge(used - charged, now);
        } else {
            self.tokens.refund(charged - used, now);
        }
    }
}

/// A limit that may be replaced by a reload; empty means no limit.
#[derive(Default)]
struct Bucket {
    limit: ArcSwapOption<Gcra>,
    /// Whether `limit` holds one: most keys and deployments have no limit
    /// of a kind, and this is cheaper to read than the swap.
    set: AtomicBool,
}

impl Bucket {
    fn per_minute(&self) -> Option<NonZeroU32> {
        self.with(None, |g| Some(g.per_minute()))
    }

    fn configure(&self, per_minute: Option<NonZeroU32>) -> bool {
        if self.per_minute() == per_minute {
            return false;
        }
        self.limit
            .store(per_minute.map(|per_minute| Arc::new(Gcra::new(per_minute, Instant::now()))));
        self.set.store(per_minute.is_some(), Ordering::Release);
        true
    }

    /// Runs `f` on the limit, if there is one.
    fn with<T>(&self, none: T, f: impl FnOnce(&Gcra) -> T) -> T {
        if !self.set.load(Ordering::Acquire) {
            return none;
        }
        self.limit.load().as_deref().map_or(none, f)
    }

    fn full_in(&self, now: Instant) -> Duration {
        self.with(Duration::ZERO, |g| g.full_in(now))
    }

    fn check(&self, n: u64, now: Instant) -> Result<(), Option<Duration>> {
        self.with(Ok(()), |g| g.check(n, now))
    }

    fn take(&self, n: u64, now: Instant) -> Result<(), Option<Duration>> {
        self.with(Ok(()), |g| g.take(n, now))
    }

    fn charge(&self, n: u64, now: Instant) {
        self.with((), |g| g.charge(n, now));
    }

    fn refund(&self, n: u64, now: Instant) {
        self.with((), |g| g.refund(n, now));
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
        let now = Instant::now();
        assert_eq!(limits.admit(10_000, now), Ok(()));
        assert_eq!(limits.admit(10_000, now), Ok(()));
        let refused = limits.admit(1, now).unwrap_err();
        assert_eq!((refused.limit, refused.per_minute), (Limit::Requests, 2));
        assert_eq!(refused.wait, Some(Duration::from_secs(30)));
        assert_eq!(refused.full_in, Duration::from_secs(60));
        assert_eq!(refused.remaining(), 0);
        assert_eq!(limits.check(1, now), Err(refused), "seen without taking");
    }

    #[test]
    fn tokens_are_taken_at_admission_charged_as_generated_and_settled_at_the_end() {
        let limits = Limits::default();
        limits.configure(quota(0, 1000));
        let now = Instant::now();
        assert_eq!(limits.admit(100, now), Ok(()));
        limits.charge(400, now);
        // 300 prompt tokens where 100 were estimated, and 500 generated.
        limits.settle(500, 800, now);
        assert_eq!(limits.admit(200, now), Ok(()), "exactly what is left");
        let refused = limits.admit(10, now).unwrap_err();
        assert_eq!((refused.limit, refused.per_minute), (Limit::Tokens, 1000));
        assert_eq!(refused.wait, Some(Duration::from_millis(600)));
        // 800 + 200 of 1000 taken: full in a minute, and nothing left.
        assert_eq!(refused.full_in, Duration::from_secs(60));
        assert_eq!(refused.remaining(), 0);
        assert_eq!(
            limits.fits(1001),
            Err(1000),
            "more than a minute's quota never fits"
        );
        assert_eq!(limits.admit(1001, now).unwrap_err().wait, None);
    }

    #[test]
    fn a_refused_token_limit_takes_no_request_either() {
        let limits = Limits::default();
        limits.configure(quota(1, 100));
        let now = Instant::now();
        assert_eq!(limits.admit(101, now).unwrap_err().limit, Limit::Tokens);
        assert_eq!(
            limits.admit(100, now),
            Ok(()),
            "the request slot is still free"
        );
    }

    #[test]
    fn a_refusal_says_what_is_left_and_when_the_limit_is_full_again() {
        let limits = Limits::default();
        limits.configure(quota(0, 1000));
        let now = Instant::now();
        limits.admit(700, now).unwrap();
        let refused = limits.admit(400, now).unwrap_err();
        assert_eq!(refused.remaining(), 300, "less than the request needs");
        assert_eq!(refused.wait, Some(Duration::from_secs(6)));
        assert_eq!(refused.full_in, Duration::from_secs(42));
    }

    #[test]
    fn usage_past_the_quota_is_debt_and_the_wait_covers_it() {
        let limits = Limits::default();
        limits.configure(quota(0, 300));
        let now = Instant::now();
        limits.admit(50, now).unwrap();
        // A long answer: 3,000 tokens, ten minutes of the key's quota.
        limits.settle(50, 3_050, now);
        let refused = limits.admit(50, now).unwrap_err();
        let wait = refused.wait.unwrap();
        assert_eq!(wait, Duration::from_secs(560));
        assert_eq!(refused.full_in, Duration::from_secs(610), "the debt too");
        assert!(
            limits
                .admit(50, now + wait - Duration::from_secs(1))
                .is_err()
        );
        assert_eq!(limits.admit(50, now + wait), Ok(()));
    }

    #[test]
    fn an_unchanged_quota_keeps_its_state_and_a_new_one_starts_afresh() {
        let limits = Limits::default();
        limits.configure(quota(1, 0));
        let now = Instant::now();
        limits.admit(0, now).unwrap();
        limits.configure(quota(1, 0));
        assert!(limits.admit(0, now).is_err(), "same quota, same bucket");
        limits.configure(quota(5, 0));
        assert_eq!(limits.admit(0, now), Ok(()), "a new quota, a new bucket");
        limits.configure(PerMinute::default());
        for _ in 0..100 {
            assert_eq!(limits.admit(1 << 40, now), Ok(()), "no limit");
        }
    }
}
