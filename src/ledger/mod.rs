//! The spend ledger: requests, tokens and USD per day, key, model and
//! deployment. Per-key totals live in memory for budgets. Where spend is
//! kept depends on `[ledger]`:
//!
//! - no `data_dir`: in memory only; a restart loses it;
//! - `backend = "sqlite"` (the default): daily totals in SQLite under
//!   `data_dir`, written about once a second (`ledger.flush_interval_ms`),
//!   so a crash loses at most that much and a restart restores every total
//!   (`store`);
//! - `backend = "postgres"`: one record per request in a database every
//!   replica shares, through a local spool that holds each record from the
//!   moment it is recorded until the database has it (`spool`, `postgres`,
//!   `migrations`); `/admin/spend` answers from the database, for the fleet.

mod migrations;
mod postgres;
mod sketch;
mod spool;
mod sqlite_schema;
mod store;
mod writable;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use foldhash::HashMap;
use serde::Serialize;
use time::Date;
use time::macros::format_description;

use crate::config::{LedgerBackend, LedgerSettings, Secret};
use postgres::Postgres;
use store::Store;

pub use sketch::{HourCount, LicenceMonth, ModelTraffic, Reader, hour_of};
pub use writable::unwritable;

/// The years a report may ask about: from 1970, where the system clock
/// that dates every row starts (`from=1970-01-01` is "from the start"),
/// to 9999, the last a day written `YYYY-MM-DD` holds. A year outside is
/// a typo (`0206` for `2026`), never a day the ledger has.
pub const YEARS: std::ops::RangeInclusive<i32> = 1970..=9999;

/// How a day is written in SQLite: `2026-11-28`.
const DAY: &[time::format_description::BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]");

/// One row of the ledger: a day (UTC) and who spent on what, through
/// which inbound API.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Row {
    pub day: Date,
    pub key: String,
    pub model: String,
    pub deployment: String,
    /// `chat`, `completions`, `embeddings`, `messages` or `responses`;
    /// [`UNKNOWN_API`] for spend recorded before the ledger kept it.
    pub api: Cow<'static, str>,
}

/// The API of spend recorded before the ledger kept it.
pub const UNKNOWN_API: &str = "unknown";

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
    pub fn add(&mut self, other: &Totals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cost_nano_usd = self.cost_nano_usd.saturating_add(other.cost_nano_usd);
    }
}

/// Nano-dollars per key, by day: what budgets read.
type ByKey = HashMap<String, BTreeMap<Date, u64>>;

/// Nano-dollars `key` spent from `from` to `to`, both included.
fn sum_of(by_key: &ByKey, key: &str, from: Date, to: Date) -> u64 {
    by_key.get(key).map_or(0, |days| {
        days.range(from..=to)
            .fold(0, |sum: u64, (_, cost)| sum.saturating_add(*cost))
    })
}

/// Adds `cost` to `key`'s `day`; the key is cloned only when first seen,
/// not per request.
fn add_cost(by_key: &mut ByKey, key: &str, day: Date, cost: u64) {
    match by_key.get_mut(key) {
        Some(days) => {
            let sum = days.entry(day).or_default();
            *sum = sum.saturating_add(cost);
        }
        None => {
            by_key.insert(key.to_owned(), BTreeMap::from([(day, cost)]));
        }
    }
}

pub struct Ledger {
    state: Mutex<State>,
    storage: Storage,
    /// The last write out (a SQLite flush or a PostgreSQL shipment)
    /// failed, and spend waits in memory or in the spool for the next one.
    failing: AtomicBool,
}

/// Where spend is kept beyond this process's memory.
enum Storage {
    /// Nowhere: no `data_dir`.
    Memory,
    /// Daily totals in this replica's SQLite file.
    Sqlite(Mutex<Store>),
    /// Records in the fleet's PostgreSQL, through the local spool.
    Postgres(Postgres),
}

#[derive(Default)]
struct State {
    /// Every row's totals, which `/admin/spend` answers from; `None` with
    /// PostgreSQL, which answers for the fleet instead.
    totals: Option<BTreeMap<Row, Totals>>,
    /// Spend per key, by day, for budgets: looked up by the key's name and
    /// summed over a range of days, with nothing allocated per request.
    by_key: ByKey,
    /// SQLite: recorded but not yet written.
    pending: HashMap<Row, Totals>,
    /// PostgreSQL, until the fleet's totals are loaded: what this process
    /// recorded, to add to them (`Ledger::load_fleet_totals`).
    since_start: Option<ByKey>,
    /// PostgreSQL: what this replica recorded, by key and day, in this
    /// run and the earlier ones on its spool (`by_key` is the fleet's).
    own: Option<ByKey>,
}

impl State {
    /// Rows are cloned only when first seen, not per request.
    fn add(&mut self, row: &Row, totals: &Totals) {
        let cost = totals.cost_nano_usd;
        add_cost(&mut self.by_key, &row.key, row.day, cost);
        if let Some(since_start) = &mut self.since_start {
            add_cost(since_start, &row.key, row.day, cost);
        }
        if let Some(own) = &mut self.own {
            add_cost(own, &row.key, row.day, cost);
        }
        if let Some(all) = &mut self.totals {
            match all.get_mut(row) {
                Some(existing) => existing.add(totals),
                None => {
                    all.insert(row.clone(), *totals);
                }
            }
        }
    }
}

/// Why `/admin/spend` has no answer: the fleet's database is unreachable.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl Ledger {
    /// Opens the ledger `settings` describe and starts writing it out
    /// every flush interval. Never waits for PostgreSQL: it is reached
    /// from a task of its own, and spend waits in the spool until then.
    pub fn start(settings: &LedgerSettings) -> Result<Arc<Self>, String> {
        let ledger = match (&settings.backend, settings.data_dir.as_deref()) {
            (LedgerBackend::Sqlite, data_dir) => Self::open(data_dir)?,
            (LedgerBackend::Postgres { url: Some(url) }, Some(data_dir)) => {
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err("the PostgreSQL ledger is started inside the Tokio runtime".into());
                }
                Self::open_postgres(url, data_dir)?
            }
            (LedgerBackend::Postgres { .. }, _) => {
                return Err(
                    "the ledger's PostgreSQL needs its URL read and a data_dir for its spool"
                        .into(),
                );
            }
        };
        let ledger = Arc::new(ledger);
        match &ledger.storage {
            Storage::Memory => {
                tracing::warn!("no [ledger] data_dir: spend is kept in memory and lost on restart");
            }
            Storage::Sqlite(_) => spawn_flusher(&ledger, settings.flush_interval),
            Storage::Postgres(_) => postgres::spawn_shipper(&ledger, settings.flush_interval),
        }
        Ok(ledger)
    }

    /// Opens (or creates) the SQLite ledger in `data_dir` and loads its
    /// totals; without a directory, a ledger in memory.
    pub fn open(data_dir: Option<&Path>) -> Result<Self, String> {
        let mut state = State {
            totals: Some(BTreeMap::new()),
            ..State::default()
        };
        let storage = match data_dir {
            None => Storage::Memory,
            Some(dir) => {
                let store = Store::open(dir)?;
                for (row, totals) in store.load()? {
                    state.add(&row, &totals);
                }
                Storage::Sqlite(Mutex::new(store))
            }
        };
        Ok(Self {
            state: Mutex::new(state),
            storage,
            failing: AtomicBool::new(false),
        })
    }

    /// Opens the spool in `data_dir` for the PostgreSQL at `url`. Until
    /// the fleet's totals are loaded, budgets count what the spool holds
    /// (spend of an earlier run not yet shipped) and what is recorded.
    fn open_postgres(url: &Secret, data_dir: &Path) -> Result<Self, String> {
        let (postgres, unshipped, own) = Postgres::open(url, data_dir)?;
        let state = State {
            by_key: unshipped,
            since_start: Some(ByKey::default()),
            own: Some(own),
            ..State::default()
        };
        Ok(Self {
            state: Mutex::new(state),
            storage: Storage::Postgres(postgres),
            failing: AtomicBool::new(false),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records one request's spend. `request_id` goes with it into
    /// PostgreSQL, as a column: clients may reuse it, so it is not the
    /// record's key.
    pub fn record_request(&self, request_id: &str, row: Row, totals: Totals) {
        let mut state = self.state();
        state.add(&row, &totals);
        match &self.storage {
            Storage::Memory => {}
            Storage::Sqlite(_) => match state.pending.get_mut(&row) {
                Some(pending) => pending.add(&totals),
                None => {
                    state.pending.insert(row, totals);
                }
            },
            Storage::Postgres(postgres) => {
                drop(state);
                postgres.spool().push(request_id, row, &totals);
            }
        }
    }

    /// Records spend with no request behind it, for tests.
    #[cfg(test)]
    pub fn record(&self, row: Row, totals: Totals) {
        self.record_request("test", row, totals);
    }

    /// Nano-dollars a key spent from `from` to `to`, both included.
    pub fn spent(&self, key: &str, from: Date, to: Date) -> u64 {
        sum_of(&self.state().by_key, key, from, to)
    }

    /// Of `spent`, what this replica recorded (with PostgreSQL, shipped or
    /// not, since the first day of last month), durably where the ledger
    /// is: kept across restarts in a data_dir.
    pub fn own_spent(&self, key: &str, from: Date, to: Date) -> u64 {
        let state = self.state();
        sum_of(state.own.as_ref().unwrap_or(&state.by_key), key, from, to)
    }

    /// The fleet's spend per key and day is known: budgets count it, and
    /// what this process recorded since it started (none of which the
    /// database held when the fleet's totals were read).
    fn load_fleet_totals(&self, mut fleet: ByKey) {
        let mut state = self.state();
        for (key, days) in state.since_start.take().unwrap_or_default() {
            for (day, cost) in days {
                add_cost(&mut fleet, &key, day, cost);
            }
        }
        state.by_key = fleet;
    }

    /// The rows `/admin/spend` shows, optionally for one key and a date
    /// range (both ends included), in day order: from memory, or with
    /// PostgreSQL the whole fleet's, from the database.
    pub async fn report(
        &self,
        key: Option<&str>,
        from: Option<Date>,
        to: Option<Date>,
    ) -> Result<Vec<(Row, Totals)>, Unavailable> {
        match &self.storage {
            Storage::Postgres(postgres) => {
                postgres.report(key, from, to).await.map_err(Unavailable)
            }
            Storage::Memory | Storage::Sqlite(_) => Ok(self.rows(key, from, to)),
        }
    }

    fn rows(&self, key: Option<&str>, from: Option<Date>, to: Option<Date>) -> Vec<(Row, Totals)> {
        self.state()
            .totals
            .iter()
            .flatten()
            .filter(|(row, _)| {
                key.is_none_or(|k| row.key == k)
                    && from.is_none_or(|f| row.day >= f)
                    && to.is_none_or(|t| row.day <= t)
            })
            .map(|(row, totals)| (row.clone(), *totals))
            .collect()
    }

    /// Writes what was recorded and not yet written: SQLite's totals in
    /// one transaction (on failure they stay pending and the next flush
    /// retries them); with PostgreSQL, the records still queued for the
    /// spool.
    pub fn flush(&self) -> Result<(), String> {
        let store = match &self.storage {
            Storage::Memory => return Ok(()),
            Storage::Postgres(postgres) => return postgres.spool().wait_written(),
            Storage::Sqlite(store) => store,
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

    /// Spend cannot be written where it belongs: the SQLite file, the
    /// spool, or the fleet's PostgreSQL keep failing, and it waits in
    /// memory or in the spool (`tollgate_ledger_write_failing`).
    pub fn write_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
            || matches!(&self.storage, Storage::Postgres(p) if p.spool().write_failing())
    }

    /// Writes out what is left when the gateway stops: a flush, and with
    /// PostgreSQL one last shipment of the spool, bounded in time.
    pub async fn close(&self) {
        match &self.storage {
            Storage::Postgres(postgres) => postgres.close(self).await,
            Storage::Memory | Storage::Sqlite(_) => {
                if let Err(e) = self.flush() {
                    tracing::error!(error = %e, "could not write the last spend to the ledger");
                }
            }
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "could not write the last spend to the ledger");
        }
    }
}

/// Flushes a SQLite ledger every `every` on a thread of its own (SQLite
/// blocks), until the ledger is dropped.
fn spawn_flusher(ledger: &Arc<Ledger>, every: Duration) {
    let ledger: Weak<Ledger> = Arc::downgrade(ledger);
    std::thread::Builder::new()
        .name("ledger-flush".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(ledger) = ledger.upgrade() else { return };
                match ledger.flush() {
                    Ok(()) => ledger.failing.store(false, Ordering::Relaxed),
                    Err(e) => {
                        if !ledger.failing.swap(true, Ordering::Relaxed) {
                            tracing::error!(error = %e, "cannot write spend to the ledger; keeping it in memory and retrying");
                        }
                    }
                }
            }
        })
        .expect("a thread can be spawned");
}

#[cfg(test)]
mod tests {
    use time::macros::date;

    use super::*;

    pub(super) fn row(day: Date, key: &str) -> Row {
        Row {
            day,
            key: key.into(),
            model: "m".into(),
            deployment: "m/b".into(),
            api: "chat".into(),
        }
    }

    pub(super) fn spend(nano: u64) -> Totals {
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
            "INSERT INTO spend VALUES ('2026-11-28', 'a', 'm', 'm/b', 'chat', 2, 10, 3.6893488147419103e19, 3.6893488147419103e19)",
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

    #[test]
    fn a_ledger_from_before_the_api_label_opens_with_its_spend_kept_under_unknown() {
        let dir = tempfile::tempdir().unwrap();
        // The file as gateways without the API label wrote it.
        let db = rusqlite::Connection::open(dir.path().join("tollgate-ledger.sqlite3")).unwrap();
        db.execute_batch(
            "CREATE TABLE spend (
                 day TEXT NOT NULL, key TEXT NOT NULL, model TEXT NOT NULL,
                 deployment TEXT NOT NULL, requests INTEGER NOT NULL,
                 input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
                 cost_nano_usd INTEGER NOT NULL,
                 PRIMARY KEY (day, key, model, deployment));
             INSERT INTO spend VALUES ('2026-11-28', 'a', 'm', 'm/b', 3, 30, 15, 900);",
        )
        .unwrap();
        drop(db);
        let ledger = Ledger::open(Some(dir.path())).unwrap();
        let day = date!(2026 - 11 - 28);
        assert_eq!(ledger.spent("a", day, day), 900);
        // The same day, key, model and deployment through Messages is a
        // row of its own, beside the unknown one.
        let mut messages = row(day, "a");
        messages.api = "messages".into();
        ledger.record(messages, spend(100));
        ledger.flush().unwrap();
        drop(ledger);
        let ledger = Ledger::open(Some(dir.path())).unwrap();
        let rows = ledger.rows(Some("a"), None, None);
        let apis: Vec<(&str, u64)> = rows
            .iter()
            .map(|(row, t)| (&*row.api, t.cost_nano_usd))
            .collect();
        assert_eq!(apis, [("messages", 100), (UNKNOWN_API, 900)]);
        assert_eq!(ledger.spent("a", day, day), 1000);
    }
}
