//! What the router learns while serving, kept outside the config snapshot
//! and keyed by name, so it survives a config reload for every deployment,
//! backend and alias whose name persists: requests in flight, latency
//! estimates, circuits, 429 cooldowns, spillover state, engine load, and
//! the rate limiters of deployments and keys.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::circuit::Circuit;
use super::engine::EngineSignals;
use super::quota::DeploymentQuota;
use axum::http::StatusCode;

use crate::config::{Backend, Config, RoutingSettings};
use crate::error::{ErrorSource, GatewayError};
use crate::limits::Limits;
use crate::openai::Usage;

/// Weight of the newest sample in the moving averages.
const EWMA_ALPHA: f64 = 0.2;

/// The registry the snapshot takes its live entries from.
#[derive(Default)]
pub struct LiveState {
    inner: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    deployments: HashMap<String, Arc<DeploymentLive>>,
    backends: HashMap<String, Arc<BackendLive>>,
    aliases: HashMap<String, Arc<AliasLive>>,
    keys: HashMap<String, Arc<Limits>>,
}

/// The live entries for one config, in the config's order.
pub struct LiveView {
    /// Per model, per deployment.
    pub deployments: Vec<Vec<Arc<DeploymentLive>>>,
    pub backends: Vec<Arc<BackendLive>>,
    pub aliases: Vec<Arc<AliasLive>>,
    /// Per key, its rate limits.
    pub keys: Vec<Arc<Limits>>,
}

impl LiveState {
    /// The entries for `config`: existing ones for names that persist, new
    /// ones for new names. Names the config no longer has are forgotten.
    pub fn view(&self, config: &Config) -> LiveView {
        let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let old = std::mem::take(&mut *guard);
        let view = LiveView {
            deployments: config
                .models
                .iter()
                .map(|m| {
                    m.deployments
                        .iter()
                        .map(|d| reuse(&old.deployments, &d.name))
                        .collect()
                })
                .collect(),
            backends: config
                .backends
                .iter()
                .map(|b| reuse(&old.backends, &b.name))
                .collect(),
            aliases: config
                .models
                .iter()
                .map(|m| reuse(&old.aliases, &m.alias))
                .collect(),
            keys: config
                .keys
                .iter()
                .map(|k| reuse(&old.keys, &k.name))
                .collect(),
        };
        for (model, live) in config.models.iter().zip(&view.deployments) {
            for (d, l) in model.deployments.iter().zip(live) {
                l.quota.configure(d.limits);
                guard.deployments.insert(d.name.clone(), l.clone());
            }
        }
        for (k, l) in config.keys.iter().zip(&view.keys) {
            l.configure(k.limits);
            guard.keys.insert(k.name.clone(), l.clone());
        }
        for (b, l) in config.backends.iter().zip(&view.backends) {
            guard.backends.insert(b.name.clone(), l.clone());
        }
        for (m, l) in config.models.iter().zip(&view.aliases) {
            guard.aliases.insert(m.alias.clone(), l.clone());
        }
        view
    }
}

fn reuse<T: Default>(map: &HashMap<String, Arc<T>>, name: &str) -> Arc<T> {
    map.get(name).cloned().unwrap_or_default()
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
}

#[derive(Default, Clone, Copy)]
struct Estimates {
    ttft_ms: Option<f64>,
    total_ms: Option<f64>,
    /// After a 429 with `retry-after`, not used until then.
    cooled_until: Option<Instant>,
}

fn ewma(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(old.map_or(sample, |old| old + EWMA_ALPHA * (sample - old)))
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

    /// How much longer a 429 cooldown lasts, if one does.
    pub fn cooling_for(&self, now: Instant) -> Option<Duration> {
        self.estimates()
            .cooled_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|left| !left.is_zero())
    }
}

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

/// Counts a request against its deployment and backend for as long as it
/// lives: from the upstream call until the response has been sent.
pub struct Lease {
    deployment: Arc<DeploymentLive>,
    backend: Arc<BackendLive>,
    alias: Arc<AliasLive>,
}

impl Lease {
    pub fn new(
        deployment: Arc<DeploymentLive>,
        backend: Arc<BackendLive>,
        alias: Arc<AliasLive>,
    ) -> Self {
        deployment.in_flight.fetch_add(1, Ordering::Relaxed);
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            deployment,
            backend,
            alias,
        }
    }

    /// Counts the tokens served by the backend, and teaches the alias how
    /// long its answers run (for cost estimates) when the count is the
    /// upstream's own.
    pub fn record_tokens(&self, input: u64, output: u64, reported: bool) {
        self.backend
            .tokens_served
            .fetch_add(input + output, Ordering::Relaxed);
        if reported {
            self.alias.record_output_tokens(output);
        }
    }

    /// Charges the deployment's token quota what the request used beyond
    /// the `admitted` prompt estimate.
    pub fn settle_quota(&self, admitted: u64, usage: &Usage) {
        self.deployment.quota.limits.settle(admitted, usage);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.deployment.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One try at one deployment, admitted by its circuit. It ends in
/// [`Attempt::succeeded`] or [`Attempt::failed`]; dropped otherwise (the
/// client left first), it frees a half-open circuit's probe slot.
pub struct Attempt {
    deployment: Option<Arc<DeploymentLive>>,
    probe: bool,
    started: Instant,
}

impl Attempt {
    /// `None` when the deployment's circuit does not admit a request now.
    pub fn begin(deployment: &Arc<DeploymentLive>) -> Option<Self> {
        let started = Instant::now();
        let probe = deployment.circuit.admit(started)?;
        Some(Self {
            deployment: Some(deployment.clone()),
            probe,
            started,
        })
    }

    fn take(&mut self) -> Arc<DeploymentLive> {
        self.deployment.take().expect("an attempt ends once")
    }

    /// The upstream answered (the first chunk, or the whole body): the
    /// circuit closes and the latency counts.
    pub fn succeeded(mut self, stream: bool) {
        let d = self.take();
        d.circuit.on_success();
        d.record_latency(stream, self.started.elapsed());
    }

    /// The upstream failed before the client saw a byte. A 429 cools the
    /// deployment for its `retry-after`; other upstream failures count
    /// against the circuit; an upstream that rejected the request itself
    /// (a 4xx) is healthy.
    pub fn failed(mut self, error: &GatewayError, settings: &RoutingSettings) {
        let d = self.take();
        let now = Instant::now();
        match error.source {
            ErrorSource::Upstream if error.status == StatusCode::TOO_MANY_REQUESTS => {
                if let Some(after) = error.retry_after {
                    d.cool_down(now + after);
                }
                d.circuit.on_abandon(self.probe);
            }
            ErrorSource::Upstream => d.circuit.on_failure(self.probe, now, settings),
            ErrorSource::Client | ErrorSource::Internal => d.circuit.on_success(),
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(d) = &self.deployment {
            d.circuit.on_abandon(self.probe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(key_rpm: u32, deployment_rpm: u32) -> Config {
        let text = format!(
            "{}rpm = {deployment_rpm}\n\n[[keys]]\nname = \"web\"\nsha256 = \"{}\"\nmodels = [\"*\"]\nrpm = {key_rpm}\n",
            crate::config::tests::MINIMAL,
            "ab".repeat(32)
        );
        crate::config::parse(&text, &|_| None).expect("valid")
    }

    #[test]
    fn rate_limiters_survive_a_reload_for_the_same_name_until_their_quota_changes() {
        let live = LiveState::default();
        let first = live.view(&config(1, 1));
        first.keys[0].admit(0).unwrap();
        first.deployments[0][0].quota.limits.admit(0).unwrap();

        let same = live.view(&config(1, 1));
        assert!(Arc::ptr_eq(&first.keys[0], &same.keys[0]));
        assert!(same.keys[0].admit(0).is_err(), "the key's minute goes on");
        assert!(
            same.deployments[0][0].quota.limits.admit(0).is_err(),
            "so does the deployment's"
        );

        let raised = live.view(&config(5, 1));
        assert_eq!(raised.keys[0].admit(0), Ok(()), "a new quota starts afresh");
        assert!(raised.deployments[0][0].quota.limits.admit(0).is_err());
    }
}
