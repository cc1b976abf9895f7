//! A deployment's quota as the router sees it: its own limits (`rpm`,
//! `tpm`, the provider's quota) and what the upstream's `x-ratelimit-*`
//! headers last reported. A deployment at its
//! quota is skipped until it has room again, never failed.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::flags::LiveFlags;
use crate::config::PerMinute;
use crate::limits::{Limits, Refused, Remaining, UpstreamQuota};

/// How long an upstream's remaining count holds when it sends no reset.
const DEFAULT_UPSTREAM_RESET: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct DeploymentQuota {
    pub limits: Limits,
    state: Mutex<State>,
    /// Whether limits are configured (`LiveFlags::LIMITED`) and whether an
    /// upstream ever reported what is left (`REPORTED`): most deployments
    /// have neither, and the router asks every candidate on every request.
    flags: LiveFlags,
}

#[derive(Default)]
struct State {
    /// What the upstream reported, until it resets.
    requests: Option<Left>,
    tokens: Option<Left>,
}

/// What an upstream says is left, and for how long that holds.
pub type LeftFor = (u64, Duration);

#[derive(Clone, Copy)]
struct Left {
    left: u64,
    until: Instant,
}

impl Left {
    fn of(remaining: Remaining, now: Instant) -> Self {
        Self {
            left: remaining.left,
            until: now + remaining.reset_in.unwrap_or(DEFAULT_UPSTREAM_RESET),
        }
    }

    /// What is left, while it holds.
    fn at(self, now: Instant) -> Option<LeftFor> {
        let reset_in = self.until.checked_duration_since(now)?;
        (!reset_in.is_zero()).then_some((self.left, reset_in))
    }
}

impl DeploymentQuota {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A quota that keeps its flags in `flags`.
    pub fn new(flags: LiveFlags) -> Self {
        Self {
            limits: Limits::default(),
            state: Mutex::default(),
            flags,
        }
    }

    /// Applies the configured quota (a reload).
    pub fn configure(&self, quota: PerMinute) {
        self.limits.configure(quota);
        let limited = quota.requests.is_some() || quota.tokens.is_some();
        self.flags.put(LiveFlags::LIMITED, limited);
    }

    /// Takes a request and its estimated `tokens` from the deployment's
    /// quota, at attempt time; an admission counts against what the
    /// upstream last said was left.
    pub fn admit(&self, tokens: u64, now: Instant) -> Result<(), Refused> {
        self.limits.admit(tokens, now)?;
        self.count_upstream(tokens);
        Ok(())
    }

    /// Counts a request admitted elsewhere (by the fleet's shared limits)
    /// against what the upstream last said was left.
    pub fn count_upstream(&self, tokens: u64) {
        if !self.flags.is_set(LiveFlags::REPORTED) {
            return;
        }
        let mut guard = self.state();
        let state = &mut *guard;
        for (left, used) in [(&mut state.requests, 1), (&mut state.tokens, tokens)] {
            if let Some(left) = left {
                left.left = left.left.saturating_sub(used);
            }
        }
    }

    /// Records what an upstream response's headers said is left.
    pub fn observe(&self, upstream: &UpstreamQuota, now: Instant) {
        if upstream.requests.is_none() && upstream.tokens.is_none() {
            return;
        }
        let mut state = self.state();
        self.flags.put(LiveFlags::REPORTED, true);
        if let Some(requests) = upstream.requests {
            state.requests = Some(Left::of(requests, now));
        }
        if let Some(tokens) = upstream.tokens {
            state.tokens = Some(Left::of(tokens, now));
        }
    }

    /// What the upstream last reported left, while it holds: requests and
    /// tokens, each with how long until it resets.
    pub fn upstream(&self, now: Instant) -> (Option<LeftFor>, Option<LeftFor>) {
        let state = self.state();
        (
            state.requests.and_then(|l| l.at(now)),
            state.tokens.and_then(|l| l.at(now)),
        )
    }

    /// Why a request of about `tokens` input tokens cannot go to the
    /// deployment now, and when it may (`None`: not by waiting).
    pub fn blocked(&self, tokens: u64, now: Instant) -> Option<(String, Option<Duration>)> {
        if let Err(tpm) = self.limits.fits(tokens) {
            return Some((
                format!(
                    "the request's estimated {tokens} input tokens exceed its tpm quota of {tpm}"
                ),
                None,
            ));
        }
        if let Err(Refused {
            limit,
            per_minute,
            wait: Some(left),
            ..
        }) = self.limits.check(tokens, now)
        {
            return Some((
                format!(
                    "at its {} quota of {per_minute}; next slot in {} ms",
                    limit.name(),
                    left.as_millis()
                ),
                Some(left),
            ));
        }
        if !self.flags.is_set(LiveFlags::REPORTED) {
            return None;
        }
        let state = self.state();
        if let Some((0, reset_in)) = state.requests.and_then(|l| l.at(now)) {
            return Some((
                format!(
                    "upstream reports no requests left; resets in {} ms",
                    reset_in.as_millis()
                ),
                Some(reset_in),
            ));
        }
        if let Some((left, reset_in)) = state.tokens.and_then(|l| l.at(now))
            && left < tokens
        {
            return Some((
                format!(
                    "upstream reports {left} tokens left, fewer than the request's estimated {tokens}; resets in {} ms",
                    reset_in.as_millis()
                ),
                Some(reset_in),
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    #[test]
    fn a_deployment_at_its_quota_is_blocked_until_the_next_slot() {
        let quota = DeploymentQuota::default();
        quota.configure(PerMinute {
            requests: NonZeroU32::new(1),
            tokens: None,
        });
        let now = Instant::now();
        assert!(quota.blocked(10, now).is_none());
        quota.admit(10, now).unwrap();
        let (reason, retry) = quota.blocked(10, now).unwrap();
        assert!(
            reason.starts_with("at its rpm quota of 1; next slot in"),
            "{reason}"
        );
        assert!(retry.unwrap() > Duration::from_secs(59));
        assert!(quota.blocked(10, now + Duration::from_secs(61)).is_none());
        quota.configure(PerMinute {
            requests: NonZeroU32::new(100),
            tokens: None,
        });
        assert!(quota.blocked(10, now).is_none(), "a raised quota has room");
    }

    #[test]
    fn upstream_counts_block_until_they_reset_and_admissions_lower_them() {
        let quota = DeploymentQuota::default();
        let now = Instant::now();
        quota.observe(
            &UpstreamQuota {
                requests: Some(Remaining {
                    left: 1,
                    reset_in: Some(Duration::from_secs(2)),
                }),
                tokens: Some(Remaining {
                    left: 500,
                    reset_in: None,
                }),
            },
            now,
        );
        let (reason, _) = quota.blocked(600, now).unwrap();
        assert!(
            reason.starts_with(
                "upstream reports 500 tokens left, fewer than the request's estimated 600"
            ),
            "{reason}"
        );
        assert!(quota.blocked(600, now + DEFAULT_UPSTREAM_RESET).is_none());
        quota.admit(100, now).unwrap();
        let (reason, retry) = quota.blocked(100, now).unwrap();
        assert!(
            reason.starts_with("upstream reports no requests left; resets in"),
            "{reason}"
        );
        assert_eq!(retry, Some(Duration::from_secs(2)));
        assert!(quota.blocked(100, now + Duration::from_secs(2)).is_none());
    }
}
