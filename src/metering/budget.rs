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

/// What a request asks of its key's budgets: the most it may cost, and
/// the least it can run on — the same unless the gateway may cap its
/// output (no `max_tokens`), when it is the prompt and one output token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub want: u64,
    pub floor: u64,
}

/// Where the spend a reservation pays for goes when the fleet shares its
/// budgets: to the shared store, which releases the reservation there.
pub trait SharedSpend: Send + Sync {
    /// `key` spent `nano_usd` on `day`; `reservation` is the shared
    /// reservation it settles, if it was made in the shared store, and
    /// `held` what the request held.
    fn spent(&self, key: &str, reservation: Option<&str>, held: u64, nano_usd: u64, day: Date);
}

/// A request's worst-case cost, held against its key's budgets until
/// [`Reservation::settle`] is given the actual cost (recorded first).
pub struct Reservation {
    key: String,
    nano_usd: u64,
    /// Held in this process.
    local: Option<Arc<Budgets>>,
    /// Shared by the fleet, with the reservation's id when it was made in
    /// the shared store.
    shared: Option<(Arc<dyn SharedSpend>, Option<String>)>,
    /// The part of `nano_usd` held for a hedge, beside the first
    /// attempt's worst case.
    hedge: u64,
    settled: bool,
}

impl Reservation {
    /// A reservation made in the fleet's shared store under `id`.
    pub fn shared(key: &str, nano_usd: u64, sink: Arc<dyn SharedSpend>, id: String) -> Self {
        Self {
            key: key.to_owned(),
            nano_usd,
            local: None,
            shared: Some((sink, Some(id))),
            hedge: 0,
            settled: false,
        }
    }

    /// All the reservation holds.
    pub fn nano_usd(&self) -> u64 {
        self.nano_usd
    }

    /// What the first attempt may spend: the rest is the hedge's.
    pub fn first_nano_usd(&self) -> u64 {
        self.nano_usd - self.hedge
    }

    /// What a hedge may spend.
    pub fn hedge_nano_usd(&self) -> u64 {
        self.hedge
    }

    /// Of a reservation asked for `first` and a hedge's allowance beside
    /// it, what is beyond `first` is the hedge's: a budget that could not
    /// hold both holds the first attempt's whole, and a hedge only in what
    /// is left.
    pub fn with_hedge(mut self, first: u64) -> Self {
        self.hedge = self.nano_usd.saturating_sub(first);
        self
    }

    /// A reservation made here while the fleet's store was away: its
    /// spend is still the fleet's, sent when the store answers again.
    pub fn reported_to(mut self, sink: Arc<dyn SharedSpend>) -> Self {
        self.shared = Some((sink, None));
        self
    }

    /// The request cost `nano_usd` (already in the ledger): the budget is
    /// freed, and a fleet's shared spend is told.
    pub fn settle(mut self, nano_usd: u64) {
        self.release(nano_usd);
    }

    fn release(&mut self, nano_usd: u64) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        // The spend is queued for the fleet before the hold is released:
        // an admission in between counts the request twice, never not at
        // all.
        if let Some((sink, id)) = &self.shared {
            sink.spent(&self.key, id.as_deref(), self.nano_usd, nano_usd, today());
        }
        if let Some(budgets) = &self.local {
            let mut reserved = budgets.lock();
            if let Some(held) = reserved.get_mut(&self.key) {
                *held = held.saturating_sub(self.nano_usd);
            }
        }
    }
}

/// A reservation dropped unsettled (the request never reached the meter)
/// spent nothing.
impl Drop for Reservation {
    fn drop(&mut self) {
        self.release(0);
    }
}

/// The most output tokens `nano_usd` pays for at `rate` in each of
/// `generations` answers to one prompt of `prompt` tokens (billed once):
/// `u64::MAX` when output is free.
pub fn affordable_output(rate: &Rate, prompt: u64, nano_usd: u64, generations: u32) -> u64 {
    let prompt_cost = u128::from(prompt) * u128::from(rate.input);
    let left = (u128::from(nano_usd) * 1000).saturating_sub(prompt_cost);
    match rate.output {
        0 => u64::MAX,
        price => u64::try_from(left / u128::from(price) / u128::from(generations.max(1)))
            .unwrap_or(u64::MAX),
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
/// zeros; an amount under a micro-dollar to the nano-dollar
/// (`$0.000000105`), so a request's least cost never reads as `$0`.
fn dollars(nano: u64) -> String {
    let places = if nano < 1_000 { 9 } else { 6 };
    let text = format!("{:.places$}", usd(nano));
    format!("${}", text.trim_end_matches('0').trim_end_matches('.'))
}

impl Budgets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.reserved.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves what a request asks of `key`'s budgets — `ask.want`, or
    /// as much of it as the budgets have left when that is at least
    /// `ask.floor` — or refuses ([`refusal`]). `budget(period, limit)` says
    /// what the period's limit and spend are taken to be: the key's own
    /// and the ledger's, or a replica's share of the fleet's while the
    /// shared store is away (or why there is none). Sized under the same
    /// lock as the check, so requests admitted at once cannot each count
    /// on the same dollars.
    pub fn admit(
        self: &Arc<Self>,
        key: &Key,
        today: Date,
        ask: Ask,
        budget: impl Fn(Period, u64) -> Result<(u64, u64), GatewayError>,
    ) -> Result<Reservation, GatewayError> {
        let mut reserved = self.lock();
        let held = reserved.get(&key.name).copied().unwrap_or(0);
        let mut available = u64::MAX;
        for period in [Period::Daily, Period::Monthly] {
            let Some(limit) = period.limit(key) else {
                continue;
            };
            let (limit, spent) = budget(period, limit)?;
            if spent.saturating_add(held).saturating_add(ask.floor) > limit {
                return Err(refusal(
                    &key.name, period, limit, spent, held, ask.floor, today,
                ));
            }
            available = available.min(limit - spent - held);
        }
        let nano_usd = ask.want.min(available);
        let entry = reserved.entry(key.name.clone()).or_default();
        *entry = entry.saturating_add(nano_usd);
        Ok(Reservation {
            key: key.name.clone(),
            nano_usd,
            local: Some(self.clone()),
            shared: None,
            hedge: 0,
            settled: false,
        })
    }
}

/// What a request's least reservation is made of, for a refusal's reader:
/// a prompt can cost more than its length suggests.
const NEEDED: &str = " (its prompt at the most it can be, a token a byte of its text or a whole \
                       context window with audio, video or files, and its output, at the dearest \
                       deployment it may be sent to)";

/// 429 for a request that needs `needed` of a `period` budget of `limit`,
/// of which `spent` is spent and `held` reserved by requests in flight:
/// `budget_held` (retry shortly) when it would fit once they end,
/// `insufficient_quota` (final until the budget resets) when not.
pub fn refusal(
    key: &str,
    period: Period,
    limit: u64,
    spent: u64,
    held: u64,
    needed: u64,
    today: Date,
) -> GatewayError {
    if spent.saturating_add(needed) <= limit {
        return GatewayError::budget_held(
            format!(
                "what is left of key \"{key}\"'s {} budget of {} is reserved by its requests in \
                 flight ({} of it; {} spent), and this request needs at least {} reserved{NEEDED}; \
                 retry after {} s, as they end",
                period.name(),
                dollars(limit),
                dollars(held),
                dollars(spent),
                dollars(needed),
                HELD_RETRY.as_secs(),
            ),
            HELD_RETRY,
        );
    }
    GatewayError::budget_exhausted(format!(
        "key \"{key}\" has used {} of its {} budget of {}, and this request needs at least {} \
         reserved{NEEDED}; the budget resets at {} 00:00 UTC",
        dollars(spent),
        period.name(),
        dollars(limit),
        dollars(needed),
        period.resets(today),
    ))
}

/// What `key` spent in the `period` containing `today`, as the ledger
/// has it.
pub fn spent_in(ledger: &Ledger, key: &str, period: Period, today: Date) -> u64 {
    let (from, to) = period.bounds(today);
    ledger.spent(key, from, to)
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
            metrics: false,
        }
    }

    fn spend(ledger: &Ledger, day: Date, nano: u64) {
        ledger.record(
            Row {
                day,
                key: "k".into(),
                model: "m".into(),
                deployment: "d".into(),
                api: "chat".into(),
            },
            Totals {
                cost_nano_usd: nano,
                ..Totals::default()
            },
        );
    }

    fn admit(
        budgets: &Arc<Budgets>,
        ledger: &Ledger,
        k: &Key,
        today: Date,
        cost: u64,
    ) -> Result<Reservation, GatewayError> {
        let ask = Ask {
            want: cost,
            floor: cost,
        };
        budgets.admit(k, today, ask, |period, limit| {
            Ok((limit, spent_in(ledger, &k.name, period, today)))
        })
    }

    #[test]
    fn reservations_hold_budget_until_dropped_and_refusals_say_when_it_frees_or_resets() {
        let (ledger, budgets) = (Ledger::open(None).unwrap(), Arc::new(Budgets::default()));
        let today = date!(2026 - 11 - 28);
        let k = key(Some(1_000), None);
        spend(&ledger, today, 400);
        spend(&ledger, date!(2026 - 11 - 27), 10_000);
        let first = admit(&budgets, &ledger, &k, today, 300).unwrap();
        let second = admit(&budgets, &ledger, &k, today, 300).unwrap();
        // It would fit but for what the first two hold: retry shortly.
        let held = admit(&budgets, &ledger, &k, today, 300).err().unwrap();
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
        let refused = admit(&budgets, &ledger, &k, today, 700).err().unwrap();
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
        let third = admit(&budgets, &ledger, &k, today, 300).unwrap();
        drop((second, third));
        assert_eq!(spent_in(&ledger, "k", Period::Daily, today), 400);
        assert!(
            admit(&budgets, &ledger, &k, today, 600).is_ok(),
            "every reservation is released"
        );
    }

    #[test]
    fn monthly_budgets_count_the_calendar_month() {
        let (ledger, budgets) = (Ledger::open(None).unwrap(), Arc::new(Budgets::default()));
        let k = key(None, Some(1_000));
        spend(&ledger, date!(2026 - 10 - 31), 900);
        spend(&ledger, date!(2026 - 11 - 1), 600);
        let today = date!(2026 - 11 - 30);
        let refused = admit(&budgets, &ledger, &k, today, 500).err().unwrap();
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
        assert!(admit(&budgets, &ledger, &k, today, 400).is_ok());
        assert_eq!(
            Period::Monthly.bounds(date!(2028 - 02 - 10)).1,
            date!(2028 - 02 - 29)
        );
    }

    #[test]
    fn a_request_that_may_be_capped_gets_what_is_left_down_to_its_floor() {
        let (ledger, budgets) = (Ledger::open(None).unwrap(), Arc::new(Budgets::default()));
        let today = date!(2026 - 11 - 28);
        let k = key(Some(1_000), Some(5_000));
        spend(&ledger, today, 100);
        let ask = |want, floor| {
            let own = |period, limit| Ok((limit, spent_in(&ledger, "k", period, today)));
            budgets.admit(&k, today, Ask { want, floor }, own)
        };
        assert_eq!(ask(450, 10).unwrap().nano_usd(), 450);
        let first = ask(450, 10).unwrap();
        let second = ask(10_000, 10).unwrap();
        assert_eq!(second.nano_usd(), 450, "what the daily budget has left");
        assert_eq!(ask(10_000, 1).err().unwrap().code(), Some("budget_held"));
        second.settle(200);
        // The ledger has the 200 now (the meter records before settling).
        spend(&ledger, today, 200);
        assert_eq!(ask(10_000, 10).unwrap().nano_usd(), 250);
        drop(first);
    }

    #[test]
    fn a_reservation_is_held_until_its_spend_is_queued_for_the_fleet() {
        /// Sees what the key holds when its spend arrives.
        struct Watch(Arc<Budgets>, Mutex<Option<u64>>);
        impl SharedSpend for Watch {
            fn spent(&self, key: &str, _: Option<&str>, _: u64, _: u64, _: Date) {
                *self.1.lock().unwrap() = self.0.lock().get(key).copied();
            }
        }
        let (ledger, budgets) = (Ledger::open(None).unwrap(), Arc::new(Budgets::default()));
        let today = date!(2026 - 11 - 28);
        let watch = Arc::new(Watch(budgets.clone(), Mutex::new(None)));
        let reservation = admit(&budgets, &ledger, &key(Some(1_000), None), today, 300)
            .unwrap()
            .reported_to(watch.clone());
        reservation.settle(100);
        assert_eq!(
            *watch.1.lock().unwrap(),
            Some(300),
            "an admission between the two counts the request twice, never not at all"
        );
        assert_eq!(budgets.lock().get("k"), Some(&0));
    }

    #[test]
    fn a_shared_reservation_reports_its_spend_once_settled_or_dropped() {
        #[derive(Default)]
        struct Sink(Mutex<Vec<(String, Option<String>, u64)>>);
        impl SharedSpend for Sink {
            fn spent(&self, key: &str, reservation: Option<&str>, _: u64, nano_usd: u64, _: Date) {
                self.0
                    .lock()
                    .unwrap()
                    .push((key.into(), reservation.map(Into::into), nano_usd));
            }
        }
        let sink = Arc::new(Sink::default());
        Reservation::shared("k", 500, sink.clone(), "r1".into()).settle(120);
        drop(Reservation::shared("k", 500, sink.clone(), "r2".into()));
        assert_eq!(
            *sink.0.lock().unwrap(),
            [
                ("k".into(), Some("r1".into()), 120),
                ("k".into(), Some("r2".into()), 0)
            ]
        );
    }

    #[test]
    fn a_reservation_pays_for_output_after_the_prompt() {
        let rate = Rate {
            input: 1_000_000,
            cached_input: 0,
            cache_write: 0,
            output: 2_000_000,
            per_token: true,
        };
        // 10 prompt tokens cost 10,000 nano-dollars; each output token 2,000.
        assert_eq!(affordable_output(&rate, 10, 30_000, 1), 10);
        assert_eq!(affordable_output(&rate, 10, 31_999, 1), 10);
        assert_eq!(affordable_output(&rate, 10, 5_000, 1), 0);
        // Three answers share what is left after the one prompt.
        assert_eq!(affordable_output(&rate, 10, 30_000, 3), 3);
        assert_eq!(affordable_output(&rate, 10, 31_999, 3), 3);
        let free = Rate { output: 0, ..rate };
        assert_eq!(affordable_output(&free, 10, 0, 1), u64::MAX);
        assert_eq!(affordable_output(&free, 10, 0, 3), u64::MAX);
        assert_eq!(rate.estimate_nano_usd(10, 10), 30_000);
    }
}
