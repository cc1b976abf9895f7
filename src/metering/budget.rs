//! Budgets per key, daily and monthly (UTC). A request is admitted only if
//! what the key has spent, plus what requests in flight have reserved,
//! plus the most this request can cost fits every budget; that worst case
//! stays reserved until the request's actual cost is in the ledger. A
//! request without `max_tokens` is given one upstream, as many tokens as
//! its reservation pays for ([`affordable_output`]), and a stream that
//! reaches its reservation is ended. So requests running at once cannot
//! overrun a budget, whatever their number, by more than what the usage
//! reported exceeds the gateway's estimates.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use foldhash::HashMap;
use time::Date;

use super::cost::Rate;
use crate::config::Key;
use crate::error::GatewayError;
use crate::ledger::Ledger;

/// How long a request refused for what requests in flight hold is told
/// to wait: they end, and free it, in about that time.
const HELD_RETRY: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Budgets {
    /// Nano-dollars reserved per key by requests in flight.
    reserved: Mutex<HashMap<String, u64>>,
}

/// A request's worst-case cost, held against its key's budgets until it
/// is dropped — after the actual cost has been recorded.
pub struct Reservation {
    budgets: Arc<Budgets>,
    key: String,
    nano_usd: u64,
}

impl Reservation {
    pub fn nano_usd(&self) -> u64 {
        self.nano_usd
    }
}

/// The most output tokens `nano_usd` pays for at `rate`, after a prompt of
/// `prompt` tokens: `u64::MAX` when output is free.
pub fn affordable_output(rate: &Rate, prompt: u64, nano_usd: u64) -> u64 {
    let prompt_cost = u128::from(prompt) * u128::from(rate.input);
    let left = (u128::from(nano_usd) * 1000).saturating_sub(prompt_cost);
    match rate.output {
        0 => u64::MAX,
        price => u64::try_from(left / u128::from(price)).unwrap_or(u64::MAX),
    }
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

    /// Reserves the worst case of a request against `key`'s budgets, or
    /// refuses with 429 `insufficient_quota` naming the budget and when it
    /// resets. `worst_case` is given what the budgets have left after
    /// spend and reservations, and says what the request may cost: sized
    /// under the same lock as the check, so requests admitted at once
    /// cannot each count on the same dollars.
    pub fn admit(
        self: &Arc<Self>,
        ledger: &Ledger,
        key: &Key,
        today: Date,
        worst_case: impl FnOnce(u64) -> u64,
    ) -> Result<Reservation, GatewayError> {
        let mut reserved = self.lock();
        let held = reserved.get(&key.name).copied().unwrap_or(0);
        let periods = [Period::Daily, Period::Monthly].map(|period| {
            period.limit(key).map(|limit| {
                let (from, to) = period.bounds(today);
                (period, limit, ledger.spent(&key.name, from, to))
            })
        });
        let available = periods
            .iter()
            .flatten()
            .map(|&(_, limit, spent)| limit.saturating_sub(spent).saturating_sub(held))
            .min()
            .unwrap_or(u64::MAX);
        let estimate = worst_case(available);
        for &(period, limit, spent) in periods.iter().flatten() {
            if spent.saturating_add(held).saturating_add(estimate) <= limit {
                continue;
            }
            if spent.saturating_add(estimate) <= limit {
                return Err(GatewayError::budget_held(
                    format!(
                        "what is left of key \"{}\"'s {} budget of {} is reserved by its requests in \
                         flight ({} of it; {} spent), and this request may cost up to {}; retry \
                         after {} s, as they end",
                        key.name,
                        period.name(),
                        dollars(limit),
                        dollars(held),
                        dollars(spent),
                        dollars(estimate),
                        HELD_RETRY.as_secs(),
                    ),
                    HELD_RETRY,
                ));
            }
            return Err(GatewayError::budget_exhausted(format!(
                "key \"{}\" has used {} of its {} budget of {}, and this request may cost up to {}; \
                 the budget resets at {} 00:00 UTC",
                key.name,
                dollars(spent),
                period.name(),
                dollars(limit),
                dollars(estimate),
                period.resets(today),
            )));
        }
        let held = reserved.entry(key.name.clone()).or_default();
        *held = held.saturating_add(estimate);
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
    fn reservations_hold_budget_until_dropped_and_refusals_say_when_it_frees_or_resets() {
        let (ledger, budgets) = (Ledger::open(None).unwrap(), Arc::new(Budgets::default()));
        let today = date!(2026 - 11 - 28);
        let k = key(Some(1_000), None);
        spend(&ledger, today, 400);
        spend(&ledger, date!(2026 - 11 - 27), 10_000);
        let first = budgets.admit(&ledger, &k, today, |_| 300).unwrap();
        let second = budgets.admit(&ledger, &k, today, |_| 300).unwrap();
        // It would fit but for what the first two hold: retry shortly.
        let held = budgets.admit(&ledger, &k, today, |_| 300).err().unwrap();
        assert_eq!(held.status(), 429);
        assert_eq!(held.code(), Some("budget_held"));
        assert_eq!(held.wait(), Some(HELD_RETRY));
        assert!(!held.kind().client_should_not_retry());
        assert!(
            held.message()
                .contains("reserved by its requests in flight"),
            "{}",
            held.message()
        );
        // It would not fit even then: final until the budget resets.
        let refused = budgets.admit(&ledger, &k, today, |_| 700).err().unwrap();
        assert_eq!(refused.status(), 429);
        assert_eq!(refused.code(), Some("insufficient_quota"));
        assert!(refused.kind().client_should_not_retry());
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
        let third = budgets.admit(&ledger, &k, today, |_| 300).unwrap();
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
        let refused = budgets.admit(&ledger, &k, today, |_| 500).err().unwrap();
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
        assert!(budgets.admit(&ledger, &k, today, |_| 400).is_ok());
        assert_eq!(
            Period::Monthly.bounds(date!(2028 - 02 - 10)).1,
            date!(2028 - 02 - 29)
        );
    }

    #[test]
    fn the_worst_case_is_sized_from_what_is_left_after_spend_and_reservations() {
        let (ledger, budgets) = (Ledger::open(None).unwrap(), Arc::new(Budgets::default()));
        let today = date!(2026 - 11 - 28);
        let k = key(Some(1_000), Some(5_000));
        spend(&ledger, today, 100);
        let mut seen = Vec::new();
        let first = budgets
            .admit(&ledger, &k, today, |left| {
                seen.push(left);
                left / 2
            })
            .unwrap();
        assert_eq!(first.nano_usd(), 450);
        let _second = budgets
            .admit(&ledger, &k, today, |left| {
                seen.push(left);
                left
            })
            .unwrap();
        assert_eq!(seen, [900, 450], "the daily budget is the smaller");
        assert!(budgets.admit(&ledger, &k, today, |_| 1).is_err());
    }

    #[test]
    fn a_reservation_pays_for_output_after_the_prompt() {
        let rate = Rate {
            input: 1_000_000,
            cached_input: 0,
            output: 2_000_000,
            per_token: true,
        };
        // 10 prompt tokens cost 10,000 nano-dollars; each output token 2,000.
        assert_eq!(affordable_output(&rate, 10, 30_000), 10);
        assert_eq!(affordable_output(&rate, 10, 31_999), 10);
        assert_eq!(affordable_output(&rate, 10, 5_000), 0);
        let free = Rate { output: 0, ..rate };
        assert_eq!(affordable_output(&free, 10, 0), u64::MAX);
        assert_eq!(rate.estimate_nano_usd(10, 10), 30_000);
    }
}
