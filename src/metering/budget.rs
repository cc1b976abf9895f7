//! Budgets per key, daily and monthly (UTC). A request is admitted only if
//! what the key has spent, plus what requests in flight have reserved,
//! plus this request's estimate fits every budget; the estimate stays
//! reserved until the request's actual cost is in the ledger. So requests
//! running at once cannot overrun a budget by more than one estimate.

use std::sync::{Arc, Mutex, PoisonError};

use foldhash::HashMap;
use time::Date;

use crate::config::Key;
use crate::error::GatewayError;
use crate::ledger::Ledger;

#[derive(Default)]
pub struct Budgets {
    /// Nano-dollars reserved per key by requests in flight.
    reserved: Mutex<HashMap<String, u64>>,
}

/// A request's estimated cost, held against its key's budgets until it
/// is dropped — after the actual cost has been recorded.
pub struct Reservation {
    budgets: Arc<Budgets>,
    key: String,
    nano_usd: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut reserved = self.budgets.lock();
        if let Some(held) = reserved.get_mut(&self.key) {
            *held = held.saturating_sub(self.nano_usd);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Daily,
    Monthly,
}

impl Period {
    pub fn name(self) -> &'static str {
        match self {
            Self::Daily => "daily",
            Self::Monthly => "monthly",
        }
    }

    /// The first and last day of the period containing `today`.
    pub fn bounds(self, today: Date) -> (Date, Date) {
        match self {
            Self::Daily => (today, today),
            Self::Monthly => {
                let first = today.replace_day(1).expect("day 1 exists");
                let last = first
                    .replace_day(today.month().length(today.year()))
                    .expect("the month's last day exists");
                (first, last)
            }
        }
    }

    /// When the period after `today`'s begins.
    fn resets(self, today: Date) -> Date {
        let (_, last) = self.bounds(today);
        last.next_day().unwrap_or(last)
    }

    /// The key's budget for this period, in nano-dollars.
    pub fn limit(self, key: &Key) -> Option<u64> {
        match self {
            Self::Daily => key.budget.daily_nano_usd,
            Self::Monthly => key.budget.monthly_nano_usd,
        }
    }
}

pub fn usd(nano: u64) -> f64 {
    nano as f64 / 1e9
}

/// `$200`, `$0.005`, `$0.004905`: to the micro-dollar, without trailing
/// zeros.
fn dollars(nano: u64) -> String {
    let text = format!("{:.6}", usd(nano));
    format!("${}", text.trim_end_matches('0').trim_end_matches('.'))
}

impl Budgets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.reserved.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves `estimate` nano-dollars against `key`'s budgets, or refuses
    /// with 429 `insufficient_quota` naming the budget and when it resets.
    pub fn admit(
        self: &Arc<Self>,
        ledger: &Ledger,
        key: &Key,
        estimate: u64,
        today: Date,
    ) -> Result<Reservation, GatewayError> {
        let mut reserved = self.lock();
        let held = reserved.get(&key.name).copied().unwrap_or(0);
        for period in [Period::Daily, Period::Monthly] {
            let Some(limit) = period.limit(key) else {
                continue;
            };
            let (from, to) = period.bounds(today);
            let spent = ledger.spent(&key.name, from, to);
            if spent + held + estimate > limit {
                return Err(GatewayError::budget_exhausted(format!(
                    "key \"{}\" has used {} of its {} budget of {}{}, and this request may cost up to {}; \
                     the budget resets at {} 00:00 UTC",
                    key.name,
                    dollars(spent),
                    period.name(),
                    dollars(limit),
                    if held > 0 {
                        format!(" ({} more is held by requests in flight)", dollars(held))
                    } else {
                        String::new()
                    },
                    dollars(estimate),
                    period.resets(today),
                )));
            }
        }
        *reserved.entry(key.name.clone()).or_default() += estimate;
        Ok(Reservation {
            budgets: self.clone(),
            key: key.name.clone(),
            nano_usd: estimate,
        })
    }

    /// What is left of `key`'s budget for `period`, if it has one.
    pub fn remaining(
        &self,
        ledger: &Ledger,
        key: &Key,
        period: Period,
        today: Date,
    ) -> Option<u64> {
        let limit = period.limit(key)?;
        let (from, to) = period.bounds(today);
        Some(limit.saturating_sub(ledger.spent(&key.name, from, to)))
    }
}

pub fn today() -> Date {
    time::OffsetDateTime::now_utc().date()
}

#[cfg(test)]
mod tests {
    use time::macros::date;

    use super::*;
    use crate::config::{AllowedModels, Budget};
    use crate::ledger::{Row, Totals};

    fn key(daily: Option<u64>, monthly: Option<u64>) -> Key {
        Key {
            name: "k".into(),
            sha256: [0; 32],
            models: AllowedModels::All,
            region: None,
            region_header: false,
            budget: Budget {
                daily_nano_usd: daily,
                monthly_nano_usd: monthly,
            },
            limits: Default::default(),
        }
    }

    fn spend(ledger: &Ledger, day: Date, nano: u64) {
        ledger.record(
            Row {
                day,
                key: "k".into(),
                model: "m".into(),
                deployment: "d".into(),
            },
            Totals {
                cost_nano_usd: nano,
                ..Totals::default()
            },
        );
    }

    #[test]
    fn reservations_hold_budget_until_dropped_and_refusals_say_when_it_resets() {
        let (ledger, budgets) = (Ledger::open(None).unwrap(), Arc::new(Budgets::default()));
        let today = date!(2026 - 11 - 28);
        let k = key(Some(1_000), None);
        spend(&ledger, today, 400);
        spend(&ledger, date!(2026 - 11 - 27), 10_000);
        let first = budgets.admit(&ledger, &k, 300, today).unwrap();
        let second = budgets.admit(&ledger, &k, 300, today).unwrap();
        let refused = budgets.admit(&ledger, &k, 300, today).err().unwrap();
        assert_eq!(refused.status(), 429);
        assert_eq!(refused.code(), Some("insufficient_quota"));
        assert!(
            refused.message().contains("daily budget"),
            "{}",
            refused.message()
        );
        assert!(
            refused.message().contains("2026-11-29 00:00 UTC"),
            "{}",
            refused.message()
        );
        drop(first);
        let third = budgets.admit(&ledger, &k, 300, today).unwrap();
        drop((second, third));
        assert_eq!(
            budgets.remaining(&ledger, &k, Period::Daily, today),
            Some(600)
        );
    }

    #[test]
    fn monthly_budgets_count_the_calendar_month() {
        let (ledger, budgets) = (Ledger::open(None).unwrap(), Arc::new(Budgets::default()));
        let k = key(None, Some(1_000));
        spend(&ledger, date!(2026 - 10 - 31), 900);
        spend(&ledger, date!(2026 - 11 - 1), 600);
        let today = date!(2026 - 11 - 30);
        let refused = budgets.admit(&ledger, &k, 500, today).err().unwrap();
        assert!(
            refused.message().contains("monthly budget"),
            "{}",
            refused.message()
        );
        assert!(
            refused.message().contains("2026-12-01"),
            "{}",
            refused.message()
        );
        assert!(budgets.admit(&ledger, &k, 400, today).is_ok());
        assert_eq!(
            Period::Monthly.bounds(date!(2028 - 02 - 10)).1,
            date!(2028 - 02 - 29)
        );
    }
}
