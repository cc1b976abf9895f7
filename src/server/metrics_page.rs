//! `GET /metrics`: the gauges that describe live state (circuits, load,
//! engine signals, self-hosted cost, budgets, the ledger's writes) are
//! set from it at scrape time, then every metric is encoded. Which keys
//! have series of their own is chosen again first (`key_series`).

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::health::CircuitView;
use crate::metering::budget::{self, Period};
use crate::state::AppState;

pub fn render(app: &AppState) -> String {
    refresh(app);
    app.metrics.encode()
}

fn refresh(app: &AppState) {
    app.refresh_key_series();
    let key_series = app.key_series.load();
    let snapshot = app.snapshot.load();
    let m = &app.metrics;
    let now = Instant::now();
    // Reset first, so names a reload removed disappear.
    for gauges in [
        &m.circuit_state,
        &m.backend_load,
        &m.engine_requests_waiting,
        &m.engine_requests_running,
        &m.engine_kv_cache_usage,
        &m.engine_prefix_cache_hit_ratio,
        &m.selfhosted_effective_price,
        &m.selfhosted_utilization,
        &m.budget_remaining,
        &m.budget_limit,
    ] {
        gauges.reset();
    }
    let config = &snapshot.config;
    for (i, (model, deployments)) in config
        .models
        .iter()
        .zip(&snapshot.live().deployments)
        .enumerate()
    {
        for (j, (deployment, live)) in model.deployments.iter().zip(deployments).enumerate() {
            let current = live.circuit.view(now).name();
            for state in CircuitView::NAMES {
                m.circuit_state
                    .with_label_values(&[&deployment.name, state])
                    .set(f64::from(u8::from(state == current)));
            }
            // A deployment is its backend's engine serving its upstream
            // model: vLLM counts each served model's prefix cache apart.
            let resolved = snapshot.resolved(i, j);
            let backend = &config.backends[resolved.backend];
            if let Some(rate) = backend.engine_metrics.as_ref().and_then(|e| {
                resolved.backend_health.prefix_hit_rate(
                    &deployment.upstream_model,
                    now,
                    e.interval * 3,
                )
            }) {
                m.engine_prefix_cache_hit_ratio
                    .with_label_values(&[&backend.name, &deployment.name])
                    .set(rate);
            }
        }
    }
    for (backend, live) in config.backends.iter().zip(&snapshot.live().backends) {
        let name = backend.name.as_str();
        if let Some(load) = live.load(backend, now) {
            m.backend_load.with_label_values(&[name]).set(load);
        }
        if let Some(signals) = backend
            .engine_metrics
            .as_ref()
            .and_then(|e| live.engine(now, e.interval * 3))
        {
            m.engine_requests_waiting
                .with_label_values(&[name])
                .set(signals.waiting);
            m.engine_requests_running
                .with_label_values(&[name])
                .set(signals.running);
            if let Some(kv) = signals.kv_cache {
                m.engine_kv_cache_usage.with_label_values(&[name]).set(kv);
            }
        }
        if backend.self_hosted.is_some() {
            // GPU-hours are paid whether used or not: the cost accrues with
            // time, from when the gateway first had this backend.
            let accrued = live.accrued(now);
            let counter = m.selfhosted_cost.with_label_values(&[name]);
            if accrued.usd > counter.get() {
                counter.inc_by(accrued.usd - counter.get());
            }
            let tokens = live.tokens_served.load(Ordering::Relaxed) as f64;
            if tokens > 0.0 {
                m.selfhosted_effective_price
                    .with_label_values(&[name])
                    .set(accrued.usd / tokens * 1e6);
            }
            if accrued.capacity_tokens > 0.0 {
                m.selfhosted_utilization
                    .with_label_values(&[name])
                    .set(tokens / accrued.capacity_tokens);
            }
        }
    }
    m.ledger_write_failing
        .set(i64::from(app.ledger.write_failing()));
    let users = app.licence.monthly_active_users();
    m.licence_mau.set(i64::try_from(users).unwrap_or(i64::MAX));
    let alert = config.licence.alert_users();
    m.licence_mau_alert
        .set(i64::try_from(alert).unwrap_or(i64::MAX));
    let today = budget::today();
    for key in &config.keys {
        if key_series.label(&key.name) != key.name {
            continue;
        }
        for period in [Period::Daily, Period::Monthly] {
            let Some(limit) = period.limit(key) else {
                continue;
            };
            // The fleet's spend as of the last exchange, when shared.
            let spent = app
                .fleet
                .as_ref()
                .and_then(|fleet| fleet.spent(&key.name, period, today))
                .unwrap_or_else(|| budget::spent_in(&app.ledger, &key.name, period, today));
            m.budget_remaining
                .with_label_values(&[&key.name, period.name()])
                .set(budget::usd(limit.saturating_sub(spent)));
            m.budget_limit
                .with_label_values(&[&key.name, period.name()])
                .set(budget::usd(limit));
        }
    }
}
