//! Live state of one backend: requests in flight, tokens served, and the
//! engine's own load signals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::Backend;

/// Live state of one backend (one inference server or API account).
pub struct BackendLive {
    pub in_flight: AtomicU64,
    engine: Mutex<Option<EngineSignals>>,
    /// When the gateway first had this backend: a self-hosted backend's
    /// fixed cost accrues from then.
    pub since: Instant,
    /// Tokens (input and output) the backend has served.
    pub tokens_served: AtomicU64,
}

impl Default for BackendLive {
    fn default() -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            engine: Mutex::new(None),
            since: Instant::now(),
            tokens_served: AtomicU64::new(0),
        }
    }
}

impl BackendLive {
    pub fn set_engine(&self, signals: EngineSignals) {
        *self.engine.lock().unwrap_or_else(PoisonError::into_inner) = Some(signals);
    }

    /// The engine's last signals, unless they are older than `max_age`: a
    /// failed scrape makes them stale, never the backend down.
    pub fn engine(&self, now: Instant, max_age: Duration) -> Option<EngineSignals> {
        let signals = *self.engine.lock().unwrap_or_else(PoisonError::into_inner);
        signals.filter(|s| now.saturating_duration_since(s.at) <= max_age)
    }

    /// Load as a share of capacity (1.0 = full), from requests in flight
    /// against `max_concurrency` and the engine's own queue and KV cache;
    /// `None` when neither is known.
    pub fn load(&self, backend: &Backend, now: Instant) -> Option<f64> {
        let capacity = backend.max_concurrency.map(f64::from);
        let in_flight = self.in_flight.load(Ordering::Relaxed) as f64;
        let mut load = capacity.map(|c| in_flight / c);
        let engine = backend
            .engine_metrics
            .as_ref()
            .and_then(|m| self.engine(now, m.interval * 3));
        if let Some(e) = engine {
            let mut engine_load = e.kv_cache.unwrap_or(0.0);
            if let Some(c) = capacity {
                engine_load = engine_load.max((e.running + e.waiting) / c);
            }
            if e.waiting > 0.0 {
                // Requests queue only when the engine cannot admit more.
                engine_load = engine_load.max(1.0);
            }
            load = Some(load.map_or(engine_load, |l| l.max(engine_load)));
        }
        load
    }
}

/// An engine's load, from its own metrics page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineSignals {
    /// Requests queued, not yet scheduled.
    pub waiting: f64,
    /// Requests in the running batch.
    pub running: f64,
    /// Share of the KV cache in use, 0.0 to 1.0 (vLLM only).
    pub kv_cache: Option<f64>,
    pub at: Instant,
}
