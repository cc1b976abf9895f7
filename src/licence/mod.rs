//! The Llama licence's bookkeeping, per calendar month (UTC): the distinct
//! end users served by `llama` deployments (a HyperLogLog sketch, `hll`),
//! the requests, tokens and spend each licence served, and the requests
//! refused by the EU multimodal rule; and requests per hour and model,
//! for `simulate --from-ledger`'s hourly peak.
//!
//! A request adds to the month in memory with relaxed atomics (no lock,
//! no allocation); the hour count takes one short lock. Every flush
//! interval a task of its own writes what was added since the last write
//! to the ledger (`ledger::sketch`), which keeps it across restarts and,
//! with PostgreSQL, for the fleet; the ledger's registers come back and
//! are merged in, as are the fleet's through Redis when state is shared.

pub mod hll;
mod report;

pub use report::{MonthReport, Report, parse_month};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use foldhash::HashMap;
use time::{Date, OffsetDateTime};
use tokio::time::MissedTickBehavior;

use axum::http::{HeaderMap, HeaderValue};

use crate::config::{Licence, LicenceSettings};
use crate::ledger::{HourCount, Ledger, LicenceMonth, Totals, hour_of};
use crate::openai::{InboundRequest, Usage};
use hll::Sketch;

/// What one licence served in a month, counted as requests end.
#[derive(Default)]
struct Served {
    requests: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    cost_nano_usd: AtomicU64,
}

impl Served {
    fn add(&self, usage: &Usage, cost_nano_usd: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.input_tokens
            .fetch_add(usage.prompt_tokens, Ordering::Relaxed);
        self.output_tokens
            .fetch_add(usage.completion_tokens, Ordering::Relaxed);
        self.cost_nano_usd
            .fetch_add(cost_nano_usd, Ordering::Relaxed);
    }

    fn totals(&self) -> Totals {
        Totals {
            requests: self.requests.load(Ordering::Relaxed),
            input_tokens: self.input_tokens.load(Ordering::Relaxed),
            output_tokens: self.output_tokens.load(Ordering::Relaxed),
            cost_nano_usd: self.cost_nano_usd.load(Ordering::Relaxed),
        }
    }
}

/// One calendar month in memory: what this process counted, and how
/// much of it the ledger already has.
pub struct Month {
    /// `YYYY-MM`.
    name: String,
    /// When the next month starts, in Unix seconds.
    ends: i64,
    users: Sketch,
    served: [Served; Licence::NAMES.len()],
    eu_refusals: AtomicU64,
    /// The counts as last written to the ledger.
    written: Mutex<(Vec<Totals>, u64)>,
}

impl Month {
    fn of(now: OffsetDateTime) -> Self {
        let date = now.date();
        let first = date.replace_day(1).unwrap_or(date);
        let next = first
            .checked_add(time::Duration::days(i64::from(
                first.month().length(first.year()),
            )))
            .unwrap_or(Date::MAX);
        Self {
            name: month_name(first),
            ends: next.midnight().assume_utc().unix_timestamp(),
            users: Sketch::default(),
            served: Default::default(),
            eu_refusals: AtomicU64::new(0),
            written: Mutex::new((vec![Totals::default(); Licence::NAMES.len()], 0)),
        }
    }

    fn written(&self) -> MutexGuard<'_, (Vec<Totals>, u64)> {
        self.written.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What was counted here and is not yet in the ledger, with every
    /// register (they merge by maximum, so sending them again is no harm).
    fn unwritten(&self) -> LicenceMonth {
        let written = self.written();
        let served = self
            .served
            .iter()
            .zip(&written.0)
            .zip(Licence::NAMES)
            .filter_map(|((served, written), name)| {
                let now = served.totals();
                let delta = Totals {
                    requests: now.requests - written.requests,
                    input_tokens: now.input_tokens - written.input_tokens,
                    output_tokens: now.output_tokens - written.output_tokens,
                    cost_nano_usd: now.cost_nano_usd - written.cost_nano_usd,
                };
                (delta != Totals::default()).then(|| ((*name).to_owned(), delta))
            })
            .collect();
        let registers = self.users.registers();
        LicenceMonth {
            month: self.name.clone(),
            registers: if registers.iter().all(|&r| r == 0) {
                Vec::new()
            } else {
                registers
            },
            served,
            eu_refusals: self.eu_refusals.load(Ordering::Relaxed) - written.1,
        }
    }

    /// `delta` (from [`Month::unwritten`]) is in the ledger now.
    fn wrote(&self, delta: &LicenceMonth) {
        let mut written = self.written();
        for (licence, totals) in &delta.served {
            if let Some(i) = Licence::NAMES.iter().position(|n| n == licence) {
                written.0[i].add(totals);
            }
        }
        written.1 += delta.eu_refusals;
    }
}

/// `YYYY-MM`.
pub fn month_name(date: Date) -> String {
    format!("{:04}-{:02}", date.year(), u8::from(date.month()))
}

/// Requests per model and hour, not yet written.
type Hours = HashMap<String, BTreeMap<i64, u64>>;

pub struct LicenceBook {
    current: ArcSwap<Month>,
    /// Months that ended here before all they counted was written.
    ended: Mutex<Vec<Arc<Month>>>,
    hours: Mutex<Hours>,
}

impl Default for LicenceBook {
    fn default() -> Self {
        Self {
            current: ArcSwap::from_pointee(Month::of(OffsetDateTime::now_utc())),
            ended: Mutex::default(),
            hours: Mutex::default(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LicenceBook {
    /// Runs `count` on the month now: the current one, with no lock and
    /// no reference count taken, unless it has ended.
    fn counting(&self, now: OffsetDateTime, count: impl FnOnce(&Month)) {
        let current = self.current.load();
        if now.unix_timestamp() < current.ends {
            count(&current);
        } else {
            count(&self.month(now));
        }
    }

    /// The month now, started the first time it is asked for.
    fn month(&self, now: OffsetDateTime) -> Arc<Month> {
        let current = self.current.load_full();
        if now.unix_timestamp() < current.ends {
            return current;
        }
        let mut ended = lock(&self.ended);
        // Another request may have started it meanwhile.
        let current = self.current.load_full();
        if now.unix_timestamp() < current.ends {
            return current;
        }
        let next = Arc::new(Month::of(now));
        ended.push(self.current.swap(next.clone()));
        next
    }

    /// A request to `model` was served, with `usage` costing
    /// `cost_nano_usd`: counted in its hour (for the hourly peak) and,
    /// when its deployment names a licence, in what that licence served;
    /// `user`, the [`hll::hash`] of its end user, among the month's users
    /// when the licence is Llama's, at `now`.
    pub fn served(
        &self,
        model: &str,
        licence: Option<Licence>,
        user: Option<u64>,
        usage: &Usage,
        cost_nano_usd: u64,
        now: OffsetDateTime,
    ) {
        self.count_hour(model, hour_of(now));
        let Some(licence) = licence else { return };
        self.counting(now, |month| {
            month.served[licence as usize].add(usage, cost_nano_usd);
            if let (Licence::Llama, Some(user)) = (licence, user) {
                month.users.add(user);
            }
        });
    }

    /// A request was refused by the EU multimodal Llama rule.
    pub fn eu_refused(&self) {
        self.counting(OffsetDateTime::now_utc(), |month| {
            month.eu_refusals.fetch_add(1, Ordering::Relaxed);
        });
    }

    fn count_hour(&self, model: &str, hour: i64) {
        let mut hours = lock(&self.hours);
        match hours.get_mut(model) {
            Some(by_hour) => *by_hour.entry(hour).or_default() += 1,
            None => {
                hours.insert(model.to_owned(), BTreeMap::from([(hour, 1)]));
            }
        }
    }

    /// Distinct end users of Llama deployments this month, as far as this
    /// replica knows (its own, the ledger's and the fleet's).
    pub fn monthly_active_users(&self) -> u64 {
        self.month(OffsetDateTime::now_utc()).users.estimate()
    }

    /// This month's name and registers, to merge with the fleet's.
    pub fn registers(&self) -> (String, Vec<u8>) {
        let month = self.month(OffsetDateTime::now_utc());
        (month.name.clone(), month.users.registers())
    }

    /// Takes in registers of `month` from elsewhere (the ledger, the
    /// fleet); a month no longer held is left to the ledger.
    pub fn merge(&self, month: &str, registers: &[u8]) {
        let current = self.current.load();
        if current.name == month {
            current.users.merge(registers);
        }
        for ended in lock(&self.ended).iter().filter(|m| m.name == month) {
            ended.users.merge(registers);
        }
    }

    fn months(&self) -> Vec<Arc<Month>> {
        let current = self.month(OffsetDateTime::now_utc());
        let mut months = lock(&self.ended).clone();
        months.push(current);
        months
    }

    /// Writes what was counted since the last write to the ledger, and
    /// merges the registers it holds. On failure everything stays to be
    /// written next time.
    pub async fn write(&self, ledger: &Arc<Ledger>) -> Result<(), String> {
        let months = self.months();
        let deltas: Vec<LicenceMonth> = months.iter().map(|m| m.unwritten()).collect();
        let hours: Vec<HourCount> = std::mem::take(&mut *lock(&self.hours))
            .into_iter()
            .flat_map(|(model, by_hour)| {
                by_hour.into_iter().map(move |(hour, requests)| HourCount {
                    hour,
                    model: model.clone(),
                    requests,
                })
            })
            .collect();
        match ledger.write_licence(deltas.clone(), hours.clone()).await {
            // Kept nowhere but here: counted on, never marked written.
            Ok(None) => Ok(()),
            Ok(Some(stored)) => {
                for ((month, delta), stored) in months.iter().zip(&deltas).zip(&stored) {
                    month.wrote(delta);
                    month.users.merge(&stored.registers);
                }
                // An ended month stays until all it counted is written.
                lock(&self.ended).retain(|m| {
                    let left = m.unwritten();
                    !left.served.is_empty() || left.eu_refusals > 0
                });
                Ok(())
            }
            Err(e) => {
                let mut pending = lock(&self.hours);
                for h in hours {
                    *pending
                        .entry(h.model)
                        .or_default()
                        .entry(h.hour)
                        .or_default() += h.requests;
                }
                Err(e)
            }
        }
    }

    /// Every month the ledger holds (or `month`), with what this replica
    /// counted and has not yet written added in.
    pub async fn report(
        &self,
        ledger: &Arc<Ledger>,
        month: Option<&str>,
    ) -> Result<Vec<LicenceMonth>, String> {
        let mut months = ledger.licence_months(month.map(str::to_owned)).await?;
        for held in self.months() {
            if month.is_some_and(|m| m != held.name) {
                continue;
            }
            let unwritten = held.unwritten();
            match months.iter_mut().find(|m| m.month == held.name) {
                Some(stored) => stored.absorb(&unwritten),
                None => months.push(unwritten),
            }
        }
        months.retain(|m| !m.registers.is_empty() || !m.served.is_empty() || m.eu_refusals > 0);
        if let Some(name) = month.filter(|_| months.is_empty()) {
            months.push(LicenceMonth {
                month: name.to_owned(),
                ..LicenceMonth::default()
            });
        }
        months.sort_by(|a, b| a.month.cmp(&b.month));
        Ok(months)
    }
}

/// The [`hll::hash`] of a request's end user: the `licence.user_header`
/// header, set by the operator's proxy, else the body's `user`, else its
/// `safety_identifier` (which OpenAI asks clients to send in place of
/// `user`); `None` when none names one. The body is the client's own
/// word, so it counts only without the header. Of a header given more
/// than once, the last counts, as a proxy that appends adds its own last;
/// an empty one names no one.
pub fn end_user(
    request: &InboundRequest,
    headers: &HeaderMap,
    settings: &LicenceSettings,
) -> Option<u64> {
    let header = settings.user_header.as_ref().and_then(|name| {
        headers
            .get_all(name)
            .iter()
            .next_back()
            .map(HeaderValue::as_bytes)
            .filter(|v| !v.is_empty())
    });
    let named = header.or_else(|| {
        request
            .user()
            .or_else(|| request.text_member("safety_identifier"))
            .map(str::as_bytes)
    })?;
    Some(hll::hash(named))
}

/// Writes the book to the ledger every `every`, until the book is dropped;
/// an error is logged once until a write succeeds again.
pub fn spawn_writer(book: &Arc<LicenceBook>, ledger: &Arc<Ledger>, every: Duration) {
    let book: Weak<LicenceBook> = Arc::downgrade(book);
    // Weak: the ledger's last flush happens when the gateway drops it.
    let ledger: Weak<Ledger> = Arc::downgrade(ledger);
    drop(tokio::spawn(async move {
        // The first write waits an interval: a PostgreSQL ledger migrates
        // its schema at its first contact meanwhile.
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            ticks.tick().await;
            let (Some(book), Some(ledger)) = (book.upgrade(), ledger.upgrade()) else {
                return;
            };
            match book.write(&ledger).await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::error!(error = %e, "cannot write the licence counts to the ledger; they are kept in memory and written when it answers");
                }
                Err(_) => {}
            }
        }
    }));
}
