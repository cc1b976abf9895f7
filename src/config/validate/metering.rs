//! Validation of what metering reads of a key: its budgets.

use super::super::schema::RawKey;
use super::super::types::*;
use super::Validator;

impl Validator<'_> {
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
