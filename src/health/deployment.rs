//! Live state of one deployment and of one alias: latency, output-length
//! and prompt-cache estimates, 429 cooldowns, spillover saturation, the
//! prompt prefixes it served.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::circuit::{Circuit, CircuitView};
use super::first_byte::FirstBytes;
use super::flags::LiveFlags;
use super::quota::{DeploymentQuota, LeftFor};
use crate::limits::UpstreamQuota;
use crate::metering::prefix::PrefixCache;
use crate::openai::Usage;

/// Weight of the newest sample in the moving averages.
const EWMA_ALPHA: f64 = 0.2;

/// The cooldown after an upstream's 429 that says no wait (Bedrock's
/// throttling never does), doubled for each such 429 in a row, at most
/// `2^UNSAID_DOUBLINGS` times: from 1 s to 8 s, as the OpenAI SDKs back
/// off.
const UNSAID_WAIT: Duration = Duration::from_secs(1);
const UNSAID_DOUBLINGS: u32 = 3;

fn ewma(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(old.map_or(sample, |old| old + EWMA_ALPHA * (sample - old)))
}

/// Live state of one deployment.
pub struct DeploymentLive {
    pub in_flight: AtomicU64,
    pub circuit: Circuit,
    /// Spillover: whether the deployment takes new traffic (hysteresis).
    pub saturated: AtomicBool,
    /// Its rate limits and what the upstream says is left.
    pub quota: DeploymentQuota,
    /// Prefix affinity: the prompt blocks it was last sent.
    pub prefix: PrefixCache,
    /// Recent times to a first byte, for hedging at a quantile of them.
    pub first_bytes: FirstBytes,
    estimates: Mutex<Estimates>,
    /// What the router checks of every candidate on every request: the
    /// circuit's and the quota's flags, and whether a 429 cooldown may be
    /// running (`LiveFlags::COOLING`: the estimates are locked only then).
    pub flags: LiveFlags,
    /// The last upstream failure, for the reasons plans and 503s give.
    last_failure: Mutex<Option<String>>,
    /// What upstreams said of the deployment changed here since the fleet
    /// was last told.
    pressure_changed: AtomicBool,
    /// When the newest pressure taken up from another replica was
    /// published, on the store's clock.
    pressure_seen_at: AtomicU64,
    /// 429s in a row that said no wait, since it last answered.
    unsaid_waits: AtomicU32,
}

/// What upstreams said of a deployment's capacity, as one replica shares
/// it with the others: each part for as long as it lasts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pressure {
    /// A 429's `retry-after` cooldown.
    pub cooling: Option<Duration>,
    /// `x-ratelimit-remaining-requests`, until it resets.
    pub requests: Option<LeftFor>,
    /// `x-ratelimit-remaining-tokens`, until it resets.
    pub tokens: Option<LeftFor>,
    /// The circuit is open.
    pub open: Option<Duration>,
}

#[derive(Default, Clone, Copy)]
struct Estimates {
    ttft_ms: Option<f64>,
    total_ms: Option<f64>,
    /// Share of prompt tokens the upstream reported read from its cache.
    cache_hit: Option<f64>,
    /// After a 429 with `retry-after`, not used until then.
    cooled_until: Option<Instant>,
    /// When the last backoff after a 429 that said no wait began.
    backoff_began: Option<Instant>,
}

impl Default for DeploymentLive {
    fn default() -> Self {
        Self::new(LiveFlags::default())
    }
}

impl DeploymentLive {
    /// Live state that keeps its flags in `flags`.
    pub fn new(flags: LiveFlags) -> Self {
        Self {
            in_flight: AtomicU64::default(),
            circuit: Circuit::new(flags.clone()),
            saturated: AtomicBool::default(),
            quota: DeploymentQuota::new(flags.clone()),
            prefix: PrefixCache::default(),
            first_bytes: FirstBytes::default(),
            estimates: Mutex::default(),
            flags,
            last_failure: Mutex::default(),
            pressure_changed: AtomicBool::default(),
            pressure_seen_at: AtomicU64::default(),
            unsaid_waits: AtomicU32::default(),
        }
    }

    fn estimates(&self) -> std::sync::MutexGuard<'_, Estimates> {
        self.estimates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Expected time to first token (streams) or to the whole answer, in
    /// milliseconds; `None` until measured.
    pub fn expected_latency_ms(&self, stream: bool) -> Option<f64> {
        let e = *self.estimates();
        if stream { e.ttft_ms } else { e.total_ms }
    }

    pub fn record_latency(&self, stream: bool, elapsed: Duration) {
        self.first_bytes.record(stream, elapsed);
        let ms = elapsed.as_secs_f64() * 1000.0;
        let mut e = self.estimates();
        if stream {
            e.ttft_ms = ewma(e.ttft_ms, ms);
        } else {
            e.total_ms = ewma(e.total_ms, ms);
        }
    }

    /// The share of a prompt it is expected to read from its cache, from
    /// the usage it reported; `None` until it reported some.
    pub fn expected_cache_hit(&self) -> Option<f64> {
        self.estimates().cache_hit
    }

    pub fn record_cache_hit(&self, usage: &Usage) {
        if usage.prompt_tokens > 0 {
            let share = usage.cached_tokens() as f64 / usage.prompt_tokens as f64;
            let mut e = self.estimates();
            e.cache_hit = ewma(e.cache_hit, share);
        }
    }

    /// An upstream's 429, to a request sent at `sent`, that said to wait
    /// `said`: the deployment cools for that long. One that said no wait
    /// cools it for 1 s, then for twice the last for each such 429 in a
    /// row, up to 8 s. It adds nothing while the deployment cools already
    /// or is at its quota until a known time, nor when its request was
    /// sent before the last backoff began: requests in flight together
    /// meet the same throttling. Returns how long the client is to wait.
    pub fn rate_limited(&self, said: Option<Duration>, sent: Instant, now: Instant) -> Duration {
        let backoff = |streak: u32| UNSAID_WAIT * (1 << streak.min(UNSAID_DOUBLINGS));
        let wait = match said {
            Some(wait) => wait,
            None => {
                if let Some(left) = self.cooling_for(now) {
                    return left;
                }
                // Its quota keeps it out until then: what the upstream said
                // is left (`x-ratelimit-*`, read from the 429 too), or the
                // configured one.
                if let Some((_, Some(reset))) = self.quota.blocked(0, now) {
                    return reset;
                }
                let mut e = self.estimates();
                let streak = self.unsaid_waits.load(Ordering::Relaxed);
                if streak > 0 && e.backoff_began.is_some_and(|began| sent < began) {
                    return backoff(streak - 1);
                }
                e.backoff_began = Some(now);
                self.unsaid_waits.store(streak + 1, Ordering::Relaxed);
                backoff(streak)
            }
        };
        self.cool_down(now + wait);
        wait
    }

    /// It answered: the next 429 that says no wait starts over at 1 s.
    pub fn answered(&self) {
        if self.unsaid_waits.load(Ordering::Relaxed) != 0 {
            self.unsaid_waits.store(0, Ordering::Relaxed);
        }
    }

    pub fn cool_down(&self, until: Instant) {
        let mut e = self.estimates();
        e.cooled_until = Some(e.cooled_until.map_or(until, |old| old.max(until)));
        self.flags.put(LiveFlags::COOLING, true);
        self.pressure_changed.store(true, Ordering::Release);
    }

    /// Records what an upstream response's `x-ratelimit-*` headers said.
    pub fn observe_quota(&self, reported: &UpstreamQuota, now: Instant) {
        self.quota.observe(reported, now);
        self.pressure_changed.store(true, Ordering::Release);
    }

    /// The circuit opened here.
    pub fn circuit_opened(&self) {
        self.pressure_changed.store(true, Ordering::Release);
    }

    /// What upstreams said of the deployment, if it changed since the
    /// last call.
    pub fn take_pressure(&self, now: Instant) -> Option<Pressure> {
        if !self.pressure_changed.swap(false, Ordering::AcqRel) {
            return None;
        }
        let (requests, tokens) = self.quota.upstream(now);
        Some(Pressure {
            cooling: self.cooling_for(now),
            requests,
            tokens,
            open: match self.circuit.view(now) {
                CircuitView::Open { probe_in, .. } => Some(probe_in),
                _ => None,
            },
        })
    }

    /// Whether pressure published at `at` is newer than any taken up.
    pub fn newer_pressure(&self, at: u64) -> bool {
        self.pressure_seen_at.fetch_max(at, Ordering::AcqRel) < at
    }

    /// Takes up what another replica learned of the deployment.
    pub fn apply_pressure(&self, p: &Pressure, now: Instant) {
        if let Some(cooling) = p.cooling {
            let mut e = self.estimates();
            let until = now + cooling;
            e.cooled_until = Some(e.cooled_until.map_or(until, |old| old.max(until)));
            self.flags.put(LiveFlags::COOLING, true);
        }
        let remaining = |r: Option<LeftFor>| {
            r.map(|(left, reset_in)| crate::limits::Remaining {
                left,
                reset_in: Some(reset_in),
            })
        };
        if p.requests.is_some() || p.tokens.is_some() {
            self.quota.observe(
                &UpstreamQuota {
                    requests: remaining(p.requests),
                    tokens: remaining(p.tokens),
                },
                now,
            );
        }
        if let Some(open) = p.open {
            self.circuit.open_until(now + open);
        }
    }

    pub fn record_failure(&self, message: &str) {
        *self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(message.to_owned());
    }

    pub fn last_failure(&self) -> Option<String> {
        self.last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How much longer a 429 cooldown lasts, if one does.
    pub fn cooling_for(&self, now: Instant) -> Option<Duration> {
        if !self.flags.is_set(LiveFlags::COOLING) {
            return None;
        }
        let mut e = self.estimates();
        let left = e
            .cooled_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|left| !left.is_zero());
        if left.is_none() {
            // Over: cleared under the lock a new cooldown is set under.
            e.cooled_until = None;
            self.flags.put(LiveFlags::COOLING, false);
        }
        left
    }
}

/// Live state of one alias.
#[derive(Default)]
pub struct AliasLive {
    mean_output_tokens: Mutex<Option<f64>>,
}

impl AliasLive {
    pub fn mean_output_tokens(&self) -> Option<f64> {
        *self
            .mean_output_tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn record_output_tokens(&self, tokens: u64) {
        let mut mean = self
            .mean_output_tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *mean = ewma(*mean, tokens as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each 429 to a request sent once the cooldown before it is over.
    #[test]
    fn a_429_that_says_no_wait_backs_off_from_1_s_to_8_s_and_starts_over_once_it_answers() {
        let d = DeploymentLive::default();
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..5 {
            let wait = d.rate_limited(None, now, now);
            assert_eq!(d.cooling_for(now), Some(wait));
            waits.push(wait.as_secs());
            now += wait;
        }
        assert_eq!(waits, [1, 2, 4, 8, 8]);
        // One that says how long counts as neither.
        let said = Some(Duration::from_millis(300));
        assert_eq!(d.rate_limited(said, now, now), Duration::from_millis(300));
        now += Duration::from_secs(1);
        assert_eq!(d.rate_limited(None, now, now), Duration::from_secs(8));
        now += Duration::from_secs(8);
        d.answered();
        assert_eq!(d.rate_limited(None, now, now), Duration::from_secs(1));
    }

    #[test]
    fn a_burst_of_429s_that_say_no_wait_is_one_backoff() {
        // Requests in flight together meet the same throttling, whenever
        // their answers come.
        let d = DeploymentLive::default();
        let sent = Instant::now();
        let first = sent + Duration::from_millis(50);
        assert_eq!(d.rate_limited(None, sent, first), Duration::from_secs(1));
        for ms in [0, 10, 400] {
            let at = first + Duration::from_millis(ms);
            assert_eq!(
                d.rate_limited(None, sent, at),
                Duration::from_millis(1000 - ms)
            );
        }
        let late = first + Duration::from_secs(3);
        assert_eq!(d.rate_limited(None, sent, late), Duration::from_secs(1));
        assert_eq!(d.cooling_for(late), None, "nothing new of the upstream");
        // One sent after the backoff began is the next step.
        let probe = first + Duration::from_secs(1);
        assert_eq!(d.rate_limited(None, probe, late), Duration::from_secs(2));
    }
}
