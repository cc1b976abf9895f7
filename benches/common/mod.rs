//! What the benches that drive a gateway share: their knobs from the environment, and
//! percentiles of what they measured.

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
