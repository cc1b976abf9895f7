//! The spend ledger: requests, tokens and USD per day, key, model and
//! deployment. Totals live in memory for budgets and `/admin/spend`; new
//! spend is written to SQLite under `ledger.data_dir` about once a second
//! (`ledger.flush_interval_ms`), so a crash loses at most that much and a
//! restart restores every total.

mod store;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use foldhash::HashMap;
use serde::Serialize;
use time::Date;

use store::Store;

/// One row of the ledger: a day (UTC) and who spent on what.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Row {
    pub day: Date,
    pub key: String,
    pub model: String,
    pub deployment: String,
}

/// Spend is held in nano-dollars: exact integer sums, and room for
/// 9 billion USD in an i64 column, per row (one key, model and deployment
/// for one day). Sums saturate rather than wrap; with every request's
/// usage bounded by its deployment's context window, a row reaches the
/// bound only after billions of dollars in one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_nano_usd: u64,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cost_nano_usd = self.cost_nano_usd.saturating_add(other.cost_nano_usd);
    }
}

pub struct Ledger {
    state: Mutex<State>,
    /// `None`: spend is kept in memory only (no `[ledger]` in the config).
    store: Option<Mutex<Store>>,
}

#[derive(Default)]
struct State {
    totals: BTreeMap<Row, Totals>,
    /// Spend per key, by day, for budgets: looked up by the key's name and
    /// summed over a range of days, with nothing allocated per request.
    by_key: HashMap<String, BTreeMap<Date, u64>>,
    /// Recorded but not yet written.
    pending: HashMap<Row, Totals>,
}

impl State {
    /// Rows and keys are cloned only when first seen, not per request.
    fn add(&mut self, row: Row, totals: Totals) {
        let cost = totals.cost_nano_usd;
        match self.by_key.get_mut(row.key.as_str()) {
            Some(days) => {
                let day = days.entry(row.day).or_default();
                *day = day.saturating_add(cost);
            }
            None => {
                self.by_key
                    .insert(row.key.clone(), BTreeMap::from([(row.day, cost)]));
            }
        }
        match self.totals.get_mut(&row) {
            Some(existing) => existing.add(&totals),
            None => {
                self.totals.insert(row, totals);
            }
        }
    }
}

impl Ledger {
    /// Opens (or creates) the ledger in `data_dir` and loads its totals;
    /// without a directory, a ledger in memory.
    pub fn open(data_dir: Option<&Path>) -> Result<Self, String> {
        let mut state = State::default();
        let store = match data_dir {
            None => None,
            Some(dir) => {
                let store = Store::open(dir)?;
                for (row, totals) in store.load()? {
                    state.add(row, totals);
                }
                Some(Mutex::new(store))
            }
        };
        Ok(Self {
            state: Mutex::new(state),
            store,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn record(&self, row: Row, totals: Totals) {
        let mut state = self.state();
        if self.store.is_some() {
            match state.pending.get_mut(&row) {
                Some(pending) => pending.add(&totals),
                None => {
                    state.pending.insert(row.clone(), totals);
                }
            }
        }
        state.add(row, totals);
    }

    /// Nano-dollars a key spent from `from` to `to`, both included.
    pub fn spent(&self, key: &str, from: Date, to: Date) -> u64 {
        self.state().by_key.get(key).map_or(0, |days| {
            days.range(from..=to)
                .fold(0, |sum: u64, (_, cost)| sum.saturating_add(*cost))
        })
    }

    /// The rows, optionally for one key and a date range (both ends
    /// included), in day order.
    pub fn rows(
        &self,
        key: Option<&str>,
        from: Option<Date>,
        to: Option<Date>,
    ) -> Vec<(Row, Totals)> {
        self.state()
            .totals
            .iter()
            .filter(|(row, _)| {
                key.is_none_or(|k| row.key == k)
                    && from.is_none_or(|f| row.day >= f)
                    && to.is_none_or(|t| row.day <= t)
            })
            .map(|(row, totals)| (row.clone(), *totals))
            .collect()
    }

    /// Writes what was recorded since the last flush, in one transaction.
    /// On failure the spend stays pending and the next flush retries it.
    pub fn flush(&self) -> Result<(), String> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let pending = std::mem::take(&mut self.state().pending);
        if pending.is_empty() {
            return Ok(());
        }
        let result = store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(&pending);
        if result.is_err() {
            let mut state = self.state();
            for (row, totals) in pending {
                state.pending.entry(row).or_default().add(&totals);
            }
        }
        result
    }

    pub fn is_durable(&self) -> bool {
        self.store.is_some()
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "could not write the last spend to the ledger");
        }
    }
}

/// Flushes the ledger every `every` on a thread of its own (SQLite blocks),
/// until the ledger is dropped.
pub fn spawn_flusher(ledger: &Arc<Ledger>, every: Duration) {
    if !ledger.is_durable() {
        return;
    }
    let ledger: Weak<Ledger> = Arc::downgrade(ledger);
    std::thread::Builder::new()
        .name("ledger-flush".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(every);
                let Some(ledger) = ledger.upgrade() else { return };
                match ledger.flush() {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        tracing::error!(error = %e, "cannot write spend to the ledger; keeping it in memory and retrying");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        })
        .expect("a thread can be spawned");
}

#[cfg(test)]
mod tests {
    use time::macros::date;

    use super::*;

    fn row(day: Date, key: &str) -> Row {
        Row {
            day,
            key: key.into(),
            model: "m".into(),
            deployment: "m/b".into(),
        }
    }

    fn spend(nano: u64) -> Totals {
        Totals {
            requests: 1,
            input_tokens: 10,
            output_tokens: 5,
            cost_nano_usd: nano,
        }
    }

    #[test]
    fn totals_survive_a_restart_and_only_flushed_spend_is_lost_in_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(Some(dir.path())).unwrap();
        ledger.record(row(date!(2026 - 11 - 27), "a"), spend(100));
        ledger.record(row(date!(2026 - 11 - 28), "a"), spend(50));
        ledger.record(row(date!(2026 - 11 - 28), "a"), spend(50));
        ledger.record(row(date!(2026 - 11 - 28), "b"), spend(7));
        ledger.flush().unwrap();
        // Recorded after the last flush, then a crash: this is lost.
        ledger.record(row(date!(2026 - 11 - 28), "a"), spend(1));
        std::mem::forget(ledger);

        let ledger = Ledger::open(Some(dir.path())).unwrap();
        assert_eq!(
            ledger.spent("a", date!(2026 - 11 - 28), date!(2026 - 11 - 28)),
            100
        );
        assert_eq!(
            ledger.spent("a", date!(2026 - 11 - 1), date!(2026 - 11 - 30)),
            200
        );
        let rows = ledger.rows(Some("a"), Some(date!(2026 - 11 - 28)), None);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1.requests, 2);
        assert_eq!(ledger.rows(None, None, None).len(), 3);
        drop(ledger);
        // A clean drop flushes.
        let ledger = Ledger::open(Some(dir.path())).unwrap();
        ledger.record(row(date!(2026 - 11 - 28), "b"), spend(3));
        drop(ledger);
        let ledger = Ledger::open(Some(dir.path())).unwrap();
        assert_eq!(
            ledger.spent("b", date!(2026 - 11 - 28), date!(2026 - 11 - 28)),
            10
        );
    }

    #[test]
    fn sums_saturate_in_memory_and_on_disk_and_the_ledger_always_opens_again() {
        let dir = tempfile::tempdir().unwrap();
        let day = date!(2026 - 11 - 28);
        let huge = Totals {
            requests: 1,
            input_tokens: u64::MAX,
            output_tokens: u64::MAX,
            cost_nano_usd: u64::MAX,
        };
        for _ in 0..2 {
            let ledger = Ledger::open(Some(dir.path())).unwrap();
            ledger.record(row(day, "a"), huge);
            ledger.record(row(day, "a"), huge);
            ledger.record(row(date!(2026 - 11 - 29), "a"), huge);
            assert_eq!(ledger.spent("a", day, date!(2026 - 11 - 30)), u64::MAX);
            ledger.flush().unwrap();
        }
        let ledger = Ledger::open(Some(dir.path())).unwrap();
        let rows = ledger.rows(Some("a"), Some(day), Some(day));
        assert_eq!(rows[0].1.requests, 4);
        assert_eq!(rows[0].1.cost_nano_usd, i64::MAX as u64, "as stored");
    }

    #[test]
    fn a_ledger_whose_counts_overflowed_into_floats_opens_with_them_made_integers() {
        let dir = tempfile::tempdir().unwrap();
        drop(Ledger::open(Some(dir.path())).unwrap());
        // What an earlier gateway wrote when a sum overflowed: SQLite
        // stored a float.
        let db = rusqlite::Connection::open(dir.path().join("tollgate-ledger.sqlite3")).unwrap();
        db.execute(
            "INSERT INTO spend VALUES ('2026-11-28', 'a', 'm', 'm/b', 2, 10, 3.6893488147419103e19, 3.6893488147419103e19)",
            [],
        )
        .unwrap();
        drop(db);
        let ledger = Ledger::open(Some(dir.path())).unwrap();
        let rows = ledger.rows(None, None, None);
        assert_eq!(rows[0].1.output_tokens, i64::MAX as u64);
        assert_eq!(rows[0].1.requests, 2);
        ledger.record(row(date!(2026 - 11 - 28), "a"), spend(5));
        ledger.flush().unwrap();
    }
}
