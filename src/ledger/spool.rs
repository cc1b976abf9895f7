//! The spool of a PostgreSQL ledger: a SQLite file under `data_dir`
//! (`tollgate-spool.sqlite3`) that holds each request's record from the
//! moment it is recorded until PostgreSQL has committed it.
//!
//! A thread of its own writes records as they are queued, in one
//! transaction per batch (whatever queued while the last one committed),
//! so SQLite never blocks the async runtime. The file is in WAL mode with
//! `synchronous = NORMAL`: a commit is in the operating system's page
//! cache when it returns, which a killed process does not lose (a power
//! cut may). The shipper reads the oldest records, and removes them once
//! PostgreSQL committed them.

use std::borrow::Cow;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, params};
use time::{Date, OffsetDateTime};

use super::store::saturating_sums;
use super::{ByKey, DAY, Row, Totals, add_cost, sqlite_schema};

/// The spool's schema (`sqlite_schema`): records, then their inbound API
/// (records spooled before it are `unknown`), then this replica's spend
/// per key and day, which outlives the records shipped.
const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS spool (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         id TEXT NOT NULL,
         request_id TEXT NOT NULL,
         day TEXT NOT NULL,
         key TEXT NOT NULL,
         model TEXT NOT NULL,
         deployment TEXT NOT NULL,
         input_tokens INTEGER NOT NULL,
         output_tokens INTEGER NOT NULL,
         cost_nano_usd INTEGER NOT NULL,
         recorded_at_us INTEGER NOT NULL
     );",
    "ALTER TABLE spool ADD COLUMN api TEXT NOT NULL DEFAULT 'unknown';",
    "CREATE TABLE own_spend (
         key TEXT NOT NULL,
         day TEXT NOT NULL,
         cost_nano_usd INTEGER NOT NULL,
         PRIMARY KEY (key, day)
     );",
];

pub(super) const FILE: &str = "tollgate-spool.sqlite3";

/// Adds a record's cost to this replica's spend of its key and day.
static OWN_UPSERT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO own_spend (key, day, cost_nano_usd) VALUES (?1, ?2, ?3)
         ON CONFLICT (key, day) DO UPDATE SET {}",
        saturating_sums(&["cost_nano_usd"])
    )
});

/// How long the writer waits before trying a failed write again.
const RETRY: Duration = Duration::from_millis(200);

/// The most a flush waits for queued records to reach the file.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// One request's spend, as PostgreSQL keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 32 hex digits, unique across the fleet: the record's key, so a
    /// record shipped twice is stored once.
    pub id: String,
    /// The request's `x-request-id`, which a client may reuse.
    pub request_id: String,
    pub row: Row,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_nano_usd: u64,
    pub recorded_at: OffsetDateTime,
}

pub struct Spool {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    path: PathBuf,
}

struct Shared {
    db: Mutex<Connection>,
    queue: Mutex<Queue>,
    /// Wakes the writer: records were queued, or the spool is closing.
    wake: Condvar,
    /// Wakes whoever waits for the queue to be written.
    written: Condvar,
}

struct Queue {
    records: Vec<Record>,
    /// The writer holds records taken from the queue and not yet
    /// committed.
    writing: bool,
    closing: bool,
    /// The last commit failed: its records wait here for the next one.
    failing: bool,
    /// Record ids are this process's random prefix and a count: unique
    /// within the process by the count, across processes by the prefix.
    prefix: u64,
    count: u64,
}

fn sql(e: rusqlite::Error) -> String {
    format!("ledger spool: {e}")
}

/// Counts are stored as SQLite integers, which stop at `i64::MAX`.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A random 64-bit prefix for this process's record ids. `RandomState`
/// is keyed from the operating system's random source, unlike `fastrand`
/// (seeded from the clock); the process id and time are mixed in too.
fn random_prefix() -> u64 {
    std::hash::RandomState::new().hash_one((std::process::id(), std::time::SystemTime::now()))
}

impl Spool {
    pub fn open(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create ledger directory {}: {e}", dir.display()))?;
        let path = dir.join(FILE);
        let mut db = Connection::open(&path)
            .map_err(|e| format!("cannot open ledger spool {}: {e}", path.display()))?;
        // AUTOINCREMENT: sequence numbers never go back, even once every
        // record is removed, so the records of an earlier run stay below
        // the mark taken at start (`last_seq`). The busy timeout lets
        // someone read the file (sqlite3, a test) without failing a write.
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;",
        )
        .map_err(sql)?;
        sqlite_schema::migrate(&mut db, SCHEMA)
            .map_err(|e| format!("ledger spool {}: {e}", path.display()))?;
        let shared = Arc::new(Shared {
            db: Mutex::new(db),
            queue: Mutex::new(Queue {
                records: Vec::new(),
                writing: false,
                closing: false,
                failing: false,
                prefix: random_prefix(),
                count: 0,
            }),
            wake: Condvar::new(),
            written: Condvar::new(),
        });
        let writer = {
            let shared = shared.clone();
            let path = path.clone();
            std::thread::Builder::new()
                .name("ledger-spool".into())
                .spawn(move || shared.write_until_closed(&path))
                .map_err(|e| format!("cannot start the ledger spool's writer: {e}"))?
        };
        Ok(Self {
            shared,
            writer: Some(writer),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer's last commit failed: records wait in memory.
    pub fn write_failing(&self) -> bool {
        self.shared.queue().failing
    }

    /// Queues a request's record; the writer has it in the file within
    /// moments.
    pub fn push(&self, request_id: &str, row: Row, totals: &Totals) {
        let mut queue = self.shared.queue();
        let id = format!("{:016x}{:016x}", queue.prefix, queue.count);
        queue.count += 1;
        queue.records.push(Record {
            id,
            request_id: request_id.to_owned(),
            row,
            input_tokens: totals.input_tokens,
            output_tokens: totals.output_tokens,
            cost_nano_usd: totals.cost_nano_usd,
            recorded_at: OffsetDateTime::now_utc(),
        });
        drop(queue);
        self.shared.wake.notify_one();
    }

    /// Waits, within `FLUSH_WAIT`, until every queued record is in the
    /// file.
    pub fn wait_written(&self) -> Result<(), String> {
        let queue = self.shared.queue();
        let (queue, waited) = self
            .shared
            .written
            .wait_timeout_while(queue, FLUSH_WAIT, |q| !q.records.is_empty() || q.writing)
            .unwrap_or_else(PoisonError::into_inner);
        if waited.timed_out() {
            return Err(format!(
                "{} records are not yet in the spool {} after {} s",
                queue.records.len(),
                self.path.display(),
                FLUSH_WAIT.as_secs()
            ));
        }
        Ok(())
    }

    /// The sequence number of the newest record in the file.
    pub fn last_seq(&self) -> Result<Option<i64>, String> {
        self.shared
            .db()
            .query_row("SELECT max(seq) FROM spool", [], |r| r.get(0))
            .map_err(sql)
    }

    pub fn len(&self) -> Result<u64, String> {
        self.shared
            .db()
            .query_row("SELECT count(*) FROM spool", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(sql)
    }

    /// Nano-dollars per key and day in the file's records.
    pub fn spent_by_key(&self) -> Result<ByKey, String> {
        self.sums("SELECT key, day, sum(cost_nano_usd) FROM spool GROUP BY key, day")
    }

    /// Nano-dollars per key and day this replica recorded, shipped or not,
    /// since the first day of last month (older days are forgotten here).
    pub fn own_by_key(&self, today: Date) -> Result<ByKey, String> {
        let oldest = today
            .replace_day(1)
            .ok()
            .and_then(|first| first.previous_day())
            .and_then(|last| last.replace_day(1).ok())
            .unwrap_or(today)
            .format(DAY)
            .map_err(|e| e.to_string())?;
        self.shared
            .db()
            .execute("DELETE FROM own_spend WHERE day < ?1", [oldest])
            .map_err(sql)?;
        self.sums("SELECT key, day, cost_nano_usd FROM own_spend")
    }

    /// Nano-dollars per key and day, as `query` selects them.
    fn sums(&self, query: &str) -> Result<ByKey, String> {
        let db = self.shared.db();
        let mut statement = db.prepare(query).map_err(sql)?;
        let rows = statement
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(sql)?;
        let mut by_key = ByKey::default();
        for row in rows {
            let (key, day, cost) = row.map_err(sql)?;
            add_cost(&mut by_key, &key, parse_day(&day)?, cost.max(0) as u64);
        }
        Ok(by_key)
    }

    /// Up to `limit` of the oldest records, with their sequence numbers,
    /// only those up to `through` if given.
    pub fn oldest(&self, limit: usize, through: Option<i64>) -> Result<Vec<(i64, Record)>, String> {
        let db = self.shared.db();
        let mut statement = db
            .prepare_cached(
                "SELECT seq, id, request_id, day, key, model, deployment, input_tokens,
                        output_tokens, cost_nano_usd, recorded_at_us, api
                 FROM spool WHERE seq <= ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(sql)?;
        let rows = statement
            .query_map(
                params![through.unwrap_or(i64::MAX), int(limit as u64)],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(10)?,
                        Record {
                            id: r.get(1)?,
                            request_id: r.get(2)?,
                            row: Row {
                                day: Date::MIN,
                                key: r.get(4)?,
                                model: r.get(5)?,
                                deployment: r.get(6)?,
                                api: Cow::Owned(r.get(11)?),
                            },
                            input_tokens: r.get::<_, i64>(7)?.max(0) as u64,
                            output_tokens: r.get::<_, i64>(8)?.max(0) as u64,
                            cost_nano_usd: r.get::<_, i64>(9)?.max(0) as u64,
                            recorded_at: OffsetDateTime::UNIX_EPOCH,
                        },
                    ))
                },
            )
            .map_err(sql)?;
        rows.map(|row| {
            let (seq, day, micros, mut record) = row.map_err(sql)?;
            record.row.day = parse_day(&day)?;
            record.recorded_at =
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
                    .map_err(|e| format!("ledger spool: bad time {micros}: {e}"))?;
            Ok((seq, record))
        })
        .collect()
    }

    /// Removes the records up to `seq`: PostgreSQL has them.
    pub fn remove_through(&self, seq: i64) -> Result<(), String> {
        self.shared
            .db()
            .execute("DELETE FROM spool WHERE seq <= ?1", [seq])
            .map(drop)
            .map_err(sql)
    }
}

fn parse_day(day: &str) -> Result<Date, String> {
    Date::parse(day, DAY).map_err(|e| format!("ledger spool: bad day {day:?}: {e}"))
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The writer: takes what is queued and commits it, until the spool
    /// closes with nothing left to write. A failed write keeps its
    /// records at the front of the queue and is tried again.
    fn write_until_closed(&self, path: &Path) {
        loop {
            let batch = {
                let queue = self.queue();
                let mut queue = self
                    .wake
                    .wait_while(queue, |q| q.records.is_empty() && !q.closing)
                    .unwrap_or_else(PoisonError::into_inner);
                if queue.records.is_empty() {
                    return;
                }
                queue.writing = true;
                std::mem::take(&mut queue.records)
            };
            let result = self.append(&batch);
            let mut queue = self.queue();
            queue.writing = false;
            match result {
                Ok(()) => {
                    queue.failing = false;
                    drop(queue);
                    self.written.notify_all();
                }
                Err(e) => {
                    let closing = queue.closing;
                    if !queue.failing || closing {
                        tracing::error!(
                            error = %e,
                            spool = %path.display(),
                            records = batch.len() + queue.records.len(),
                            "cannot write spend to the ledger's spool; keeping it in memory and retrying"
                        );
                        queue.failing = true;
                    }
                    let newer = std::mem::replace(&mut queue.records, batch);
                    queue.records.extend(newer);
                    drop(queue);
                    if closing {
                        // Closing: the records are lost with the process,
                        // as logged; waiting would hold the exit up.
                        self.written.notify_all();
                        return;
                    }
                    std::thread::sleep(RETRY);
                }
            }
        }
    }

    fn append(&self, records: &[Record]) -> Result<(), String> {
        let mut db = self.db();
        let tx = db.transaction().map_err(sql)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO spool (id, request_id, day, key, model, deployment, input_tokens,
                                        output_tokens, cost_nano_usd, recorded_at_us, api)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )
                .map_err(sql)?;
            let mut own = tx.prepare_cached(&OWN_UPSERT).map_err(sql)?;
            for r in records {
                let day = r.row.day.format(DAY).map_err(|e| e.to_string())?;
                own.execute(params![r.row.key, day, int(r.cost_nano_usd)])
                    .map_err(sql)?;
                let micros = r.recorded_at.unix_timestamp_nanos() / 1_000;
                insert
                    .execute(params![
                        r.id,
                        r.request_id,
                        day,
                        r.row.key,
                        r.row.model,
                        r.row.deployment,
                        int(r.input_tokens),
                        int(r.output_tokens),
                        int(r.cost_nano_usd),
                        i64::try_from(micros).unwrap_or(i64::MAX),
                        r.row.api,
                    ])
                    .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)
    }
}

impl Drop for Spool {
    /// Writes what is queued, then stops the writer.
    fn drop(&mut self) {
        self.shared.queue().closing = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use time::macros::date;

    use super::*;

    use crate::ledger::UNKNOWN_API;
    use crate::ledger::tests::spend;

    fn row(key: &str) -> Row {
        crate::ledger::tests::row(date!(2026 - 11 - 28), key)
    }

    #[test]
    fn records_are_kept_in_order_until_removed_and_survive_a_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.push("req-1", row("a"), &spend(100));
        spool.push("req-1", row("a"), &spend(u64::MAX));
        spool.push("req-2", row("b"), &spend(7));
        spool.wait_written().unwrap();
        let all = spool.oldest(10, None).unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "in order");
        let ids: std::collections::HashSet<&str> = all.iter().map(|(_, r)| r.id.as_str()).collect();
        assert_eq!(
            ids.len(),
            3,
            "a reused request id still gets its own record id"
        );
        assert!(all.iter().all(|(_, r)| r.id.len() == 32));
        let (_, first) = &all[0];
        assert_eq!(
            (first.request_id.as_str(), first.cost_nano_usd),
            ("req-1", 100)
        );
        assert_eq!(all[1].1.cost_nano_usd, i64::MAX as u64, "as stored");
        assert_eq!(spool.oldest(1, None).unwrap().len(), 1);
        assert_eq!(spool.oldest(10, Some(all[1].0)).unwrap().len(), 2);
        spool.remove_through(all[0].0).unwrap();
        let mark = spool.last_seq().unwrap();
        drop(spool);

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.len().unwrap(), 2);
        assert_eq!(spool.last_seq().unwrap(), mark);
        let by_key = spool.spent_by_key().unwrap();
        assert_eq!(by_key["b"][&date!(2026 - 11 - 28)], 7);
        spool.remove_through(mark.unwrap()).unwrap();
        spool.push("req-3", row("a"), &spend(1));
        spool.wait_written().unwrap();
        let (seq, record) = &spool.oldest(10, None).unwrap()[0];
        assert!(Some(*seq) > mark, "sequence numbers never go back");
        assert_ne!(
            record.id[..16],
            all[0].1.id[..16],
            "another process, another prefix"
        );
    }

    #[test]
    fn this_replicas_spend_outlives_its_records_shipped_until_last_month_ends() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let on = |day, key| crate::ledger::tests::row(day, key);
        spool.push("r", on(date!(2026 - 10 - 31), "a"), &spend(1));
        spool.push("r", on(date!(2026 - 11 - 01), "a"), &spend(2));
        spool.push("r", on(date!(2026 - 12 - 07), "a"), &spend(3));
        spool.push("r", on(date!(2026 - 12 - 07), "a"), &spend(u64::MAX));
        spool.push("r", on(date!(2026 - 12 - 07), "b"), &spend(5));
        spool.wait_written().unwrap();
        spool
            .remove_through(spool.last_seq().unwrap().unwrap())
            .unwrap();
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert!(spool.spent_by_key().unwrap().is_empty(), "all shipped");
        let own = spool.own_by_key(date!(2026 - 12 - 07)).unwrap();
        assert_eq!(
            own["a"].iter().map(|(d, n)| (*d, *n)).collect::<Vec<_>>(),
            [
                (date!(2026 - 11 - 01), 2),
                (date!(2026 - 12 - 07), i64::MAX as u64)
            ],
            "from the first of last month, each day's sum stopping at i64::MAX"
        );
        assert_eq!(own["b"][&date!(2026 - 12 - 07)], 5);
    }

    #[test]
    fn records_an_older_gateway_spooled_are_shipped_with_their_api_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let db = Connection::open(dir.path().join(FILE)).unwrap();
        db.execute_batch(SCHEMA[0]).unwrap();
        db.execute(
            "INSERT INTO spool (id, request_id, day, key, model, deployment, input_tokens,
                                output_tokens, cost_nano_usd, recorded_at_us)
             VALUES ('00000000000000010000000000000000', 'old', '2026-11-28', 'a', 'm', 'm/b',
                     10, 5, 100, 0)",
            [],
        )
        .unwrap();
        drop(db);
        let spool = Spool::open(dir.path()).unwrap();
        spool.push("new", row("a"), &spend(7));
        spool.wait_written().unwrap();
        let apis: Vec<(String, String)> = spool
            .oldest(10, None)
            .unwrap()
            .into_iter()
            .map(|(_, r)| (r.request_id, r.row.api.into_owned()))
            .collect();
        assert_eq!(
            apis,
            [
                ("old".to_owned(), UNKNOWN_API.to_owned()),
                ("new".to_owned(), "chat".to_owned())
            ]
        );
    }
}
