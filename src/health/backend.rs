//! Live state of one backend: requests in flight, tokens served, and the
//! engine's own load signals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::{Backend, SelfHosted};

/// Live state of one backend (one inference server or API account).
pub struct BackendLive {
    pub in_flight: AtomicU64,
    engine: Mutex<Option<EngineSignals>>,
    /// The engine's prefix cache per served model, as last scraped, and
    /// when.
    prefix_caches: Mutex<(Vec<ModelCache>, Option<Instant>)>,
    /// A self-hosted backend's GPU-hours, accrued since the gateway first
    /// had it as self-hosted.
    gpu_hours: Mutex<GpuHours>,
    /// Tokens the backend has computed: input and output, less the prompt
    /// tokens its engine read from its prefix cache.
    pub tokens_served: AtomicU64,
}

impl Default for BackendLive {
    fn default() -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            engine: Mutex::new(None),
            prefix_caches: Mutex::default(),
            gpu_hours: Mutex::new(GpuHours {
                accrued: Accrued::default(),
                pool: None,
                at: Instant::now(),
            }),
            tokens_served: AtomicU64::new(0),
        }
    }
}

/// What a self-hosted pool has cost and could have served so far, each
/// moment at the price and throughput in force then: a reload that
/// changes them changes what accrues from then on, not what accrued.
struct GpuHours {
    accrued: Accrued,
    /// The pool as the config has it now; `None` while the backend is not
    /// self-hosted.
    pool: Option<SelfHosted>,
    /// Accrued up to here.
    at: Instant,
}

/// A self-hosted pool's fixed cost so far, and the tokens it could have
/// computed in that time flat out.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Accrued {
    pub usd: f64,
    pub capacity_tokens: f64,
}

impl GpuHours {
    fn accrue(&mut self, now: Instant) {
        let seconds = now.saturating_duration_since(self.at).as_secs_f64();
        if let Some(pool) = self.pool {
            self.accrued.usd += pool.gpu_hour_usd * f64::from(pool.gpus) * seconds / 3600.0;
            self.accrued.capacity_tokens += pool.throughput_tokens_per_second * seconds;
        }
        self.at = self.at.max(now);
    }
}

impl BackendLive {
    /// Takes the pool a config gives the backend, `now`: what accrued
    /// until now is at the pool it had.
    pub fn configure(&self, pool: Option<SelfHosted>, now: Instant) {
        let mut hours = self
            .gpu_hours
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        hours.accrue(now);
        hours.pool = pool;
    }

    /// What the pool has cost, and could have computed, up to `now`.
    pub fn accrued(&self, now: Instant) -> Accrued {
        let mut hours = self
            .gpu_hours
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        hours.accrue(now);
        hours.accrued
    }

    /// Takes a scrape's load signals.
    pub fn set_engine(&self, signals: EngineSignals) {
        *self.engine.lock().unwrap_or_else(PoisonError::into_inner) = Some(signals);
    }

    /// Takes a scrape's prefix caches, read `at`. A model's hit rate is
    /// that of the prompt tokens looked up since the last scrape that
    /// saw any.
    pub fn set_prefix_caches(&self, mut caches: Vec<ModelCache>, at: Instant) {
        let mut last = self
            .prefix_caches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for cache in &mut caches {
            let Some(now) = cache.counters else { continue };
            let before = last
                .0
                .iter()
                .find(|c| c.model == cache.model)
                .and_then(|c| c.counters.map(|counters| (counters, c.rate)));
            let (queried, found) = match before {
                Some((c, _)) => (now.queries - c.queries, now.hits - c.hits),
                None => (now.queries, now.hits),
            };
            cache.rate = if queried > 0.0 && found >= 0.0 {
                Some((found / queried).min(1.0))
            } else if queried == 0.0 {
                before.and_then(|(_, rate)| rate)
            } else {
                // The counters went back: the engine restarted.
                None
            };
        }
        *last = (caches, Some(at));
    }

    /// The prefix-cache hit rate of the engine's `model`, unless the last
    /// scrape is older than `max_age`.
    pub fn prefix_hit_rate(&self, model: &str, now: Instant, max_age: Duration) -> Option<f64> {
        let last = self
            .prefix_caches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let at = last.1?;
        if now.saturating_duration_since(at) > max_age {
            return None;
        }
        last.0.iter().find(|c| c.model == model)?.rate
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
        self.load_of(LoadBasis::of(backend), now)
    }

    /// [`BackendLive::load`], of what it reads of the backend's config.
    pub fn load_of(&self, basis: LoadBasis, now: Instant) -> Option<f64> {
        let capacity = basis.max_concurrency.map(f64::from);
        // Read only against a capacity: the router asks every candidate,
        // and most per-token backends have none.
        let mut load = capacity.map(|c| self.in_flight.load(Ordering::Relaxed) as f64 / c);
        let engine = basis
            .engine_max_age
            .and_then(|max_age| self.engine(now, max_age));
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

/// What a backend's load is measured against, of its config.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadBasis {
    pub max_concurrency: Option<u32>,
    /// How old the engine's signals may be: three scrape intervals.
    pub engine_max_age: Option<Duration>,
}

impl LoadBasis {
    pub fn of(backend: &Backend) -> Self {
        Self {
            max_concurrency: backend.max_concurrency,
            engine_max_age: backend.engine_metrics.as_ref().map(|m| m.interval * 3),
        }
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

/// vLLM's prefix cache for one model it serves (its `model_name`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCache {
    pub model: String,
    /// Its counters, as scraped (cumulative).
    pub counters: Option<PrefixCounters>,
    /// Share of the prompt tokens looked up in the prefix cache that were
    /// found there, over the last scrape interval.
    pub rate: Option<f64>,
}

/// vLLM's prefix-cache counters: prompt tokens looked up, and found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixCounters {
    pub hits: f64,
    pub queries: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_hours_accrue_at_the_pool_in_force_and_a_reload_does_not_reprice_them() {
        let live = BackendLive::default();
        let start = Instant::now();
        let pool = |gpu_hour_usd| SelfHosted {
            gpu_hour_usd,
            gpus: 2,
            throughput_tokens_per_second: 1000.0,
        };
        let after = |seconds| start + Duration::from_secs(seconds);
        live.configure(Some(pool(3.6)), start);
        let first = live.accrued(after(3600));
        assert_eq!(first.usd, 7.2);
        assert_eq!(first.capacity_tokens, 3_600_000.0);
        // Ten times the price from the second hour: the first stays.
        live.configure(Some(pool(36.0)), after(3600));
        assert_eq!(live.accrued(after(7200)).usd, 7.2 + 72.0);
        // Per-token for an hour: nothing accrues.
        live.configure(None, after(7200));
        live.configure(Some(pool(3.6)), after(10_800));
        let last = live.accrued(after(14_400));
        assert_eq!(last.usd, 7.2 + 72.0 + 7.2);
        assert_eq!(last.capacity_tokens, 3.0 * 3_600_000.0);
        // An instant read out of order takes nothing back.
        assert_eq!(live.accrued(after(10)), last);
    }

    #[test]
    fn the_prefix_hit_rate_is_per_model_over_the_last_interval() {
        let live = BackendLive::default();
        let at = Instant::now();
        let cache = |model: &str, hits, queries| ModelCache {
            model: model.into(),
            counters: Some(PrefixCounters { hits, queries }),
            rate: None,
        };
        let rate =
            |live: &BackendLive, model| live.prefix_hit_rate(model, at, Duration::from_secs(1));
        live.set_prefix_caches(vec![cache("m", 100.0, 1000.0), cache("n", 0.0, 0.0)], at);
        assert_eq!(rate(&live, "m"), Some(0.1), "since the engine started");
        assert_eq!(rate(&live, "n"), None, "nothing looked up yet");
        live.set_prefix_caches(vec![cache("m", 1000.0, 2000.0), cache("n", 5.0, 10.0)], at);
        assert_eq!((rate(&live, "m"), rate(&live, "n")), (Some(0.9), Some(0.5)));
        live.set_prefix_caches(vec![cache("m", 1000.0, 2000.0)], at);
        assert_eq!(
            rate(&live, "m"),
            Some(0.9),
            "nothing looked up: the last rate stands"
        );
        assert_eq!(rate(&live, "n"), None, "no longer served");
        live.set_prefix_caches(vec![cache("m", 10.0, 20.0)], at);
        assert_eq!(
            rate(&live, "m"),
            None,
            "a restarted engine's counters start again"
        );
        live.set_prefix_caches(vec![cache("m", 20.0, 30.0)], at);
        assert_eq!(
            live.prefix_hit_rate("m", at + Duration::from_secs(2), Duration::from_secs(1)),
            None,
            "stale"
        );
    }
}
