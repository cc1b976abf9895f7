//! Live state of one deployment and of one alias: latency and
//! output-length estimates, 429 cooldowns, spillover saturation.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::circuit::Circuit;
use super::quota::DeploymentQuota;

/// Weight of the newest sample in the moving averages.
const EWMA_ALPHA: f64 = 0.2;

fn ewma(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(old.map_or(sample, |old| old + EWMA_ALPHA * (sample - old)))
}

/// Live state of one deployment.
#[derive(Default)]
pub struct DeploymentLive {
    pub in_flight: AtomicU64,
    pub circuit: Circuit,
    /// Spillover: whether the deployment takes new traffic (hysteresis).
    pub saturated: AtomicBool,
    /// Its rate limits and what the upstream says is left.
    pub quota: DeploymentQuota,
    estimates: Mutex<Estimates>,
    /// The last upstream failure, for the reasons plans and 503s give.
    last_failure: Mutex<Option<String>>,
}

#[derive(Default, Clone, Copy)]
struct Estimates {
    ttft_ms: Option<f64>,
    total_ms: Option<f64>,
    /// After a 429 with `retry-after`, not used until then.
    cooled_until: Option<Instant>,
}

impl DeploymentLive {
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
        let ms = elapsed.as_secs_f64() * 1000.0;
        let mut e = self.estimates();
        if stream {
            e.ttft_ms = ewma(e.ttft_ms, ms);
        } else {
            e.total_ms = ewma(e.total_ms, ms);
        }
    }

    pub fn cool_down(&self, until: Instant) {
        let mut e = self.estimates();
        e.cooled_until = Some(e.cooled_until.map_or(until, |old| old.max(until)));
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
        self.estimates()
            .cooled_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|left| !left.is_zero())
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
