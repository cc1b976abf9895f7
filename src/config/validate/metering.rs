//! Validation of what metering reads: `[ledger]` and key budgets.

use std::path::PathBuf;
use std::time::Duration;

use super::super::schema::{RawConfig, RawKey};
use super::super::types::*;
use super::Validator;

const DEFAULT_FLUSH_INTERVAL_MS: u64 = 1_000;

impl Validator<'_> {
    pub(super) fn ledger(&mut self, raw: &RawConfig) -> LedgerSettings {
        let l = &raw.ledger;
        let flush_ms = l.flush_interval_ms.unwrap_or(DEFAULT_FLUSH_INTERVAL_MS);
        if !(10..=60_000).contains(&flush_ms) {
            self.problem(
                "ledger.flush_interval_ms",
                "must be between 10 and 60000: a crash loses up to this much spend",
            );
        }
        if l.data_dir.as_deref().is_some_and(|d| d.trim().is_empty()) {
            self.problem(
                "ledger.data_dir",
                "must name a directory; leave it out to keep spend in memory only",
            );
        }
        LedgerSettings {
            data_dir: l.data_dir.as_deref().map(PathBuf::from),
            flush_interval: Duration::from_millis(flush_ms),
        }
    }

    pub(super) fn budget(&mut self, i: usize, k: &RawKey) -> Budget {
        let mut usd = |field: &str, value: Option<f64>| {
            let value = value?;
            if !value.is_finite() || !(0.0..=1_000_000_000.0).contains(&value) {
                self.problem(
                    format!("keys[{i}].{field}"),
                    "must be an amount in USD between 0 and 1000000000",
                );
                return None;
            }
            Some((value * 1e9).round() as u64)
        };
        Budget {
            daily_nano_usd: usd("budget_daily_usd", k.budget_daily_usd),
            monthly_nano_usd: usd("budget_monthly_usd", k.budget_monthly_usd),
        }
    }
}
