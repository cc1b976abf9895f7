//! What the benches that drive a gateway share: their knobs from the
//! environment, percentiles of what they measured, and the cost the
//! gateway metered.

#![allow(dead_code, reason = "each bench uses a different part of it")]

use std::str::FromStr;
use std::time::Duration;

/// The number in environment variable `name`, else `default`.
pub fn env_number<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (nearest rank) of `sorted`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// What the gateway metered for `alias` on `deployments`, summed over
/// them, from its `/metrics` page.
pub fn metered_cost(metrics: &str, alias: &str, deployments: impl Iterator<Item = String>) -> f64 {
    deployments
        .filter_map(|deployment| {
            crate::support::gateway::metric(
                metrics,
                "tollgate_cost_usd_total",
                &[
                    ("alias", alias),
                    ("deployment", &deployment),
                    ("key", "none"),
                ],
            )
        })
        .sum()
}
