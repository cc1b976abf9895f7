//! The SQLite file behind the ledger: one table of daily totals, added to
//! with upserts.

use std::borrow::Cow;
use std::path::Path;
use std::sync::LazyLock;

use foldhash::HashMap;
use rusqlite::{Connection, params};
use time::Date;

use super::{DAY, Row, Totals, sqlite_schema};

pub(super) const FILE: &str = "tollgate-ledger.sqlite3";

/// The schema's steps (`sqlite_schema`): daily totals, then the inbound
/// API in each row's key (a table rebuilt, since SQLite cannot change a
/// primary key; earlier rows' API is unknown), then the licence tables
/// and requests per hour (`sketch`).
const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS spend (
         day TEXT NOT NULL,
         key TEXT NOT NULL,
         model TEXT NOT NULL,
         deployment TEXT NOT NULL,
         requests INTEGER NOT NULL,
         input_tokens INTEGER NOT NULL,
         output_tokens INTEGER NOT NULL,
         cost_nano_usd INTEGER NOT NULL,
         PRIMARY KEY (day, key, model, deployment)
     );",
    "CREATE TABLE spend_by_api (
         day TEXT NOT NULL,
         key TEXT NOT NULL,
         model TEXT NOT NULL,
         deployment TEXT NOT NULL,
         api TEXT NOT NULL,
         requests INTEGER NOT NULL,
         input_tokens INTEGER NOT NULL,
         output_tokens INTEGER NOT NULL,
         cost_nano_usd INTEGER NOT NULL,
         PRIMARY KEY (day, key, model, deployment, api)
     );
     INSERT INTO spend_by_api
         SELECT day, key, model, deployment, 'unknown', requests, input_tokens,
                output_tokens, cost_nano_usd
         FROM spend;
     DROP TABLE spend;
     ALTER TABLE spend_by_api RENAME TO spend;",
    include_str!("sqlite_licence.sql"),
];

pub(super) const COUNTS: [&str; 4] = ["requests", "input_tokens", "output_tokens", "cost_nano_usd"];

/// The `SET` of an upsert that adds `columns` to the stored ones, each
/// sum saturating at `i64::MAX`: SQLite turns an integer sum that
/// overflows into a float, which no later read takes as a count.
pub(super) fn saturating_sums(columns: &[&str]) -> String {
    let sums: Vec<String> = columns
        .iter()
        .map(|c| {
            format!(
                "{c} = CASE WHEN {c} > {max} - excluded.{c} THEN {max} ELSE {c} + excluded.{c} END",
                max = i64::MAX
            )
        })
        .collect();
    sums.join(", ")
}

/// Adds a row's counts to the stored ones.
static UPSERT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO spend (day, key, model, deployment, api, {})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (day, key, model, deployment, api) DO UPDATE SET {}",
        COUNTS.join(", "),
        saturating_sums(&COUNTS)
    )
});

pub struct Store {
    connection: Connection,
}

fn sql(e: rusqlite::Error) -> String {
    format!("ledger database: {e}")
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create ledger directory {}: {e}", dir.display()))?;
        let path = dir.join(FILE);
        let mut connection = Connection::open(&path)
            .map_err(|e| format!("cannot open ledger {}: {e}", path.display()))?;
        // WAL: a flush never blocks readers, and a crash mid-write leaves
        // the last committed flush intact.
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .map_err(sql)?;
        sqlite_schema::migrate(&mut connection, SCHEMA)
            .map_err(|e| format!("ledger {}: {e}", path.display()))?;
        // Counts that an earlier gateway let overflow into floats are
        // made integers again (a float past `i64::MAX` casts to it).
        for c in COUNTS {
            connection
                .execute(
                    &format!("UPDATE spend SET {c} = CAST(MAX({c}, 0) AS INTEGER) WHERE typeof({c}) = 'real'"),
                    [],
                )
                .map_err(sql)?;
        }
        Ok(Self { connection })
    }

    pub(super) fn connection(&mut self) -> &mut Connection {
        &mut self.connection
    }

    pub fn load(&self) -> Result<Vec<(Row, Totals)>, String> {
        let mut statement = self
            .connection
            .prepare(
                "SELECT day, key, model, deployment, api, requests, input_tokens, output_tokens, cost_nano_usd FROM spend",
            )
            .map_err(sql)?;
        let rows = statement
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Row {
                        day: Date::MIN,
                        key: r.get(1)?,
                        model: r.get(2)?,
                        deployment: r.get(3)?,
                        api: Cow::Owned(r.get(4)?),
                    },
                    Totals {
                        requests: r.get::<_, i64>(5)?.max(0) as u64,
                        input_tokens: r.get::<_, i64>(6)?.max(0) as u64,
                        output_tokens: r.get::<_, i64>(7)?.max(0) as u64,
                        cost_nano_usd: r.get::<_, i64>(8)?.max(0) as u64,
                    },
                ))
            })
            .map_err(sql)?;
        rows.map(|row| {
            let (day, mut row, totals) = row.map_err(sql)?;
            row.day = Date::parse(&day, DAY)
                .map_err(|e| format!("ledger database: bad day {day:?}: {e}"))?;
            Ok((row, totals))
        })
        .collect()
    }

    /// Adds the pending totals to the stored ones, all or nothing.
    pub fn add(&mut self, pending: &HashMap<Row, Totals>) -> Result<(), String> {
        let tx = self.connection.transaction().map_err(sql)?;
        {
            let mut upsert = tx.prepare_cached(&UPSERT).map_err(sql)?;
            for (row, t) in pending {
                let day = row.day.format(DAY).map_err(|e| e.to_string())?;
                let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                upsert
                    .execute(params![
                        day,
                        row.key,
                        row.model,
                        row.deployment,
                        row.api,
                        int(t.requests),
                        int(t.input_tokens),
                        int(t.output_tokens),
                        int(t.cost_nano_usd),
                    ])
                    .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)
    }
}
