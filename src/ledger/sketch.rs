//! The ledger's licence tables, beside spend: per calendar month (UTC,
//! `YYYY-MM`), the HyperLogLog registers of the end users served by
//! `llama` deployments (merged register by register, the larger, so
//! every replica and every run adds to one sketch), what each licence
//! served, and the EU multimodal refusals. In SQLite, also requests per
//! hour and model, for the hourly peak `tollgate simulate --from-ledger`
//! reads; PostgreSQL has it from its records' `recorded_at`.
//!
//! The licence module writes here every flush interval, from a task of its
//! own; `tollgate licence-report` and `simulate --from-ledger` read here
//! through a [`Reader`], which never starts a gateway's ledger.

use std::path::Path;
use std::sync::{Arc, PoisonError};

use rusqlite::{Connection, OptionalExtension, params};
use time::{Date, OffsetDateTime};

use super::store::{self, Store};
use super::{DAY, Ledger, Storage, Totals};
use crate::config::postgres_url;
use crate::config::{LedgerBackend, LedgerSettings};

/// One month as the ledger holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LicenceMonth {
    /// `YYYY-MM`.
    pub month: String,
    /// The sketch's registers; empty when no llama deployment served.
    pub registers: Vec<u8>,
    /// Per licence name (`Licence::NAMES`).
    pub served: Vec<(String, Totals)>,
    pub eu_refusals: u64,
}

impl LicenceMonth {
    /// Adds what `other` holds: counts summed, registers by maximum.
    pub fn absorb(&mut self, other: &LicenceMonth) {
        for (licence, totals) in &other.served {
            match self.served.iter_mut().find(|(l, _)| l == licence) {
                Some((_, mine)) => mine.add(totals),
                None => self.served.push((licence.clone(), *totals)),
            }
        }
        self.served.sort_by(|a, b| a.0.cmp(&b.0));
        self.eu_refusals = self.eu_refusals.saturating_add(other.eu_refusals);
        if self.registers.len() < other.registers.len() {
            self.registers.resize(other.registers.len(), 0);
        }
        for (mine, theirs) in self.registers.iter_mut().zip(&other.registers) {
            *mine = (*mine).max(*theirs);
        }
    }
}

/// Requests one model served in one hour (hours since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourCount {
    pub hour: i64,
    pub model: String,
    pub requests: u64,
}

/// A model's traffic over some days: sums, and its busiest hour.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelTraffic {
    pub model: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub peak_hour_requests: u64,
}

fn sql(e: rusqlite::Error) -> String {
    format!("ledger database: {e}")
}

fn pg(e: &tokio_postgres::Error) -> String {
    format!("the ledger's PostgreSQL: {}", crate::error::chain(e))
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn count(v: i64) -> u64 {
    v.max(0) as u64
}

/// Registers merged by maximum; a stored value of another length (none
/// yet) is replaced.
fn merge(stored: Option<Vec<u8>>, registers: &[u8]) -> Vec<u8> {
    match stored {
        Some(mut stored) if stored.len() == registers.len() => {
            for (s, r) in stored.iter_mut().zip(registers) {
                *s = (*s).max(*r);
            }
            stored
        }
        _ => registers.to_vec(),
    }
}

impl Ledger {
    /// Adds this replica's counts since the last write (`months`) and
    /// hours to the ledger, all or nothing, and returns those months as
    /// the ledger now holds them (every replica's, with PostgreSQL).
    /// `None`: the ledger is in memory only, and keeps none of it.
    pub async fn write_licence(
        self: &Arc<Self>,
        months: Vec<LicenceMonth>,
        hours: Vec<HourCount>,
    ) -> Result<Option<Vec<LicenceMonth>>, String> {
        match &self.storage {
            Storage::Memory => Ok(None),
            Storage::Sqlite(_) => self
                .with_sqlite(move |db| sqlite_write(db, &months, &hours))
                .await
                .map(Some),
            Storage::Postgres(postgres) => {
                let client = postgres.client().await?;
                postgres_write(&client, &months).await.map(Some)
            }
        }
    }

    /// Runs `work` on the SQLite ledger's connection, off the async
    /// runtime (SQLite blocks).
    async fn with_sqlite<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&mut Connection) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let ledger = self.clone();
        tokio::task::spawn_blocking(move || {
            let Storage::Sqlite(store) = &ledger.storage else {
                return Err("the ledger is not in SQLite".to_owned());
            };
            let mut store = store.lock().unwrap_or_else(PoisonError::into_inner);
            work(store.connection())
        })
        .await
        .map_err(|e| format!("ledger task: {e}"))?
    }

    /// What the ledger holds of `month` (every month without one).
    pub async fn licence_months(
        self: &Arc<Self>,
        month: Option<String>,
    ) -> Result<Vec<LicenceMonth>, String> {
        match &self.storage {
            Storage::Memory => Ok(Vec::new()),
            Storage::Sqlite(_) => {
                self.with_sqlite(move |db| sqlite_months(db, month.as_deref()))
                    .await
            }
            Storage::Postgres(postgres) => {
                let client = postgres.client().await?;
                postgres_months(&client, month.as_deref()).await
            }
        }
    }
}

fn sqlite_write(
    db: &mut Connection,
    months: &[LicenceMonth],
    hours: &[HourCount],
) -> Result<Vec<LicenceMonth>, String> {
    let tx = db.transaction().map_err(sql)?;
    for m in months {
        if !m.registers.is_empty() {
            let stored: Option<Vec<u8>> = tx
                .query_row(
                    "SELECT registers FROM licence_users WHERE month = ?1",
                    [&m.month],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql)?;
            tx.execute(
                "INSERT INTO licence_users (month, registers) VALUES (?1, ?2)
                 ON CONFLICT (month) DO UPDATE SET registers = excluded.registers",
                params![m.month, merge(stored, &m.registers)],
            )
            .map_err(sql)?;
        }
        for (licence, t) in &m.served {
            tx.execute(
                &format!(
                    "INSERT INTO licence_served (month, licence, requests, input_tokens, output_tokens, cost_nano_usd)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (month, licence) DO UPDATE SET {}",
                    store::saturating_sums(&store::COUNTS)
                ),
                params![m.month, licence, int(t.requests), int(t.input_tokens), int(t.output_tokens), int(t.cost_nano_usd)],
            )
            .map_err(sql)?;
        }
        if m.eu_refusals > 0 {
            tx.execute(
                &format!(
                    "INSERT INTO licence_refusals (month, eu_multimodal) VALUES (?1, ?2)
                     ON CONFLICT (month) DO UPDATE SET {}",
                    store::saturating_sums(&["eu_multimodal"])
                ),
                params![m.month, int(m.eu_refusals)],
            )
            .map_err(sql)?;
        }
    }
    for h in hours {
        tx.execute(
            &format!(
                "INSERT INTO traffic_hours (hour, model, requests) VALUES (?1, ?2, ?3)
                 ON CONFLICT (hour, model) DO UPDATE SET {}",
                store::saturating_sums(&["requests"])
            ),
            params![h.hour, h.model, int(h.requests)],
        )
        .map_err(sql)?;
    }
    tx.commit().map_err(sql)?;
    months
        .iter()
        .map(|m| {
            Ok(sqlite_months(db, Some(&m.month))?
                .pop()
                .unwrap_or_else(|| LicenceMonth {
                    month: m.month.clone(),
                    ..LicenceMonth::default()
                }))
        })
        .collect()
}

/// The month named `name` in `months`, added if missing.
fn entry(months: &mut Vec<LicenceMonth>, name: String) -> &mut LicenceMonth {
    let i = match months.iter().position(|m| m.month == name) {
        Some(i) => i,
        None => {
            months.push(LicenceMonth {
                month: name,
                ..LicenceMonth::default()
            });
            months.len() - 1
        }
    };
    &mut months[i]
}

/// Every month (or `month`) the tables name, oldest first.
fn sqlite_months(db: &Connection, month: Option<&str>) -> Result<Vec<LicenceMonth>, String> {
    let mut months: Vec<LicenceMonth> = Vec::new();
    let filter = "WHERE ?1 IS NULL OR month = ?1";
    let mut users = db
        .prepare(&format!(
            "SELECT month, registers FROM licence_users {filter}"
        ))
        .map_err(sql)?;
    for row in users
        .query_map([month], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .map_err(sql)?
    {
        let (name, registers) = row.map_err(sql)?;
        entry(&mut months, name).registers = registers;
    }
    let mut served = db
        .prepare(&format!(
            "SELECT month, licence, requests, input_tokens, output_tokens, cost_nano_usd FROM licence_served {filter} ORDER BY licence"
        ))
        .map_err(sql)?;
    for row in served
        .query_map([month], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                Totals {
                    requests: count(r.get(2)?),
                    input_tokens: count(r.get(3)?),
                    output_tokens: count(r.get(4)?),
                    cost_nano_usd: count(r.get(5)?),
                },
            ))
        })
        .map_err(sql)?
    {
        let (name, licence, totals) = row.map_err(sql)?;
        entry(&mut months, name).served.push((licence, totals));
    }
    let mut refusals = db
        .prepare(&format!(
            "SELECT month, eu_multimodal FROM licence_refusals {filter}"
        ))
        .map_err(sql)?;
    for row in refusals
        .query_map([month], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })
        .map_err(sql)?
    {
        let (name, eu) = row.map_err(sql)?;
        entry(&mut months, name).eu_refusals = count(eu);
    }
    months.sort_by(|a, b| a.month.cmp(&b.month));
    Ok(months)
}

/// Sums stop at `i64::MAX`, as the spend ledger's do.
const PG_SERVED: &str = "
    INSERT INTO licence_served AS s (month, licence, requests, input_tokens, output_tokens, cost_nano_usd)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (month, licence) DO UPDATE SET
        requests = least(s.requests::numeric + excluded.requests, 9223372036854775807)::int8,
        input_tokens = least(s.input_tokens::numeric + excluded.input_tokens, 9223372036854775807)::int8,
        output_tokens = least(s.output_tokens::numeric + excluded.output_tokens, 9223372036854775807)::int8,
        cost_nano_usd = least(s.cost_nano_usd::numeric + excluded.cost_nano_usd, 9223372036854775807)::int8";

const PG_REFUSALS: &str = "
    INSERT INTO licence_refusals AS r (month, eu_multimodal) VALUES ($1, $2)
    ON CONFLICT (month) DO UPDATE SET
        eu_multimodal = least(r.eu_multimodal::numeric + excluded.eu_multimodal, 9223372036854775807)::int8";

async fn postgres_write(
    client: &tokio_postgres::Client,
    months: &[LicenceMonth],
) -> Result<Vec<LicenceMonth>, String> {
    // The row is made first and then locked, so replicas writing one
    // month at once take turns and each merges what the other wrote.
    client.batch_execute("BEGIN").await.map_err(|e| pg(&e))?;
    let written = async {
        for m in months {
            if !m.registers.is_empty() {
                client
                    .execute(
                        "INSERT INTO licence_users (month, registers) VALUES ($1, $2) ON CONFLICT (month) DO NOTHING",
                        &[&m.month, &m.registers],
                    )
                    .await?;
                let stored: Vec<u8> = client
                    .query_one("SELECT registers FROM licence_users WHERE month = $1 FOR UPDATE", &[&m.month])
                    .await?
                    .get(0);
                client
                    .execute(
                        "UPDATE licence_users SET registers = $2 WHERE month = $1",
                        &[&m.month, &merge(Some(stored), &m.registers)],
                    )
                    .await?;
            }
            for (licence, t) in &m.served {
                client
                    .execute(
                        PG_SERVED,
                        &[&m.month, licence, &int(t.requests), &int(t.input_tokens), &int(t.output_tokens), &int(t.cost_nano_usd)],
                    )
                    .await?;
            }
            if m.eu_refusals > 0 {
                client.execute(PG_REFUSALS, &[&m.month, &int(m.eu_refusals)]).await?;
            }
        }
        client.batch_execute("COMMIT").await
    }
    .await;
    if let Err(e) = written {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(pg(&e));
    }
    let mut stored = Vec::new();
    for m in months {
        let mut found = postgres_months(client, Some(&m.month)).await?;
        stored.push(found.pop().unwrap_or_else(|| LicenceMonth {
            month: m.month.clone(),
            ..LicenceMonth::default()
        }));
    }
    Ok(stored)
}

async fn postgres_months(
    client: &tokio_postgres::Client,
    month: Option<&str>,
) -> Result<Vec<LicenceMonth>, String> {
    let filter = "WHERE $1::text IS NULL OR month = $1";
    let mut months: Vec<LicenceMonth> = Vec::new();
    for r in client
        .query(
            &format!("SELECT month, registers FROM licence_users {filter}"),
            &[&month],
        )
        .await
        .map_err(|e| pg(&e))?
    {
        entry(&mut months, r.get(0)).registers = r.get(1);
    }
    for r in client
        .query(
            &format!("SELECT month, licence, requests, input_tokens, output_tokens, cost_nano_usd FROM licence_served {filter} ORDER BY licence COLLATE \"C\""),
            &[&month],
        )
        .await
        .map_err(|e| pg(&e))?
    {
        entry(&mut months, r.get(0)).served.push((
            r.get(1),
            Totals {
                requests: count(r.get(2)),
                input_tokens: count(r.get(3)),
                output_tokens: count(r.get(4)),
                cost_nano_usd: count(r.get(5)),
            },
        ));
    }
    for r in client
        .query(
            &format!("SELECT month, eu_multimodal FROM licence_refusals {filter}"),
            &[&month],
        )
        .await
        .map_err(|e| pg(&e))?
    {
        entry(&mut months, r.get(0)).eu_refusals = count(r.get(1));
    }
    months.sort_by(|a, b| a.month.cmp(&b.month));
    Ok(months)
}

/// The ledger a config names, opened to be read by a command, never
/// written to by a gateway's machinery (no flusher, no spool).
pub enum Reader {
    Sqlite(Store),
    Postgres(tokio_postgres::Client),
}

impl Reader {
    /// Opens the SQLite file in `data_dir`, or connects to PostgreSQL
    /// (inside the Tokio runtime).
    pub async fn open(settings: &LedgerSettings) -> Result<Self, String> {
        match (&settings.backend, settings.data_dir.as_deref()) {
            (LedgerBackend::Sqlite, Some(dir)) => Ok(Self::Sqlite(open_existing(dir)?)),
            (LedgerBackend::Sqlite, None) => Err(
                "the config's ledger has no data_dir: it is kept in memory by a running gateway and cannot be read; set [ledger] data_dir".into(),
            ),
            (LedgerBackend::Postgres { url: Some(url) }, _) => {
                let target = postgres_url::read(url.expose())
                    .map_err(|e| format!("the ledger's PostgreSQL URL {e}"))?;
                let (client, connection) = target
                    .config
                    .connect(super::postgres::connector(&target.tls)?)
                    .await
                    .map_err(|e| pg(&e))?;
                tokio::spawn(connection);
                Ok(Self::Postgres(client))
            }
            (LedgerBackend::Postgres { url: None }, _) => {
                Err("the ledger's PostgreSQL URL was not read; set the variable [ledger] url_env names".into())
            }
        }
    }

    pub async fn licence_months(
        &mut self,
        month: Option<&str>,
    ) -> Result<Vec<LicenceMonth>, String> {
        match self {
            Self::Sqlite(store) => sqlite_months(store.connection(), month),
            Self::Postgres(client) => postgres_months(client, month).await,
        }
    }

    /// Each model's traffic from `from` (a UTC day) on, with its busiest
    /// hour.
    pub async fn traffic(&mut self, from: Date) -> Result<Vec<ModelTraffic>, String> {
        match self {
            Self::Sqlite(store) => sqlite_traffic(store.connection(), from),
            Self::Postgres(client) => postgres_traffic(client, from).await,
        }
    }
}

fn open_existing(dir: &Path) -> Result<Store, String> {
    if !dir.join(store::FILE).exists() {
        return Err(format!(
            "no ledger in {}: a gateway with this [ledger] data_dir writes one there",
            dir.display()
        ));
    }
    Store::open(dir)
}

fn sqlite_traffic(db: &Connection, from: Date) -> Result<Vec<ModelTraffic>, String> {
    let day = from.format(DAY).map_err(|e| e.to_string())?;
    let first_hour = from.midnight().assume_utc().unix_timestamp() / 3600;
    let mut statement = db
        .prepare(
            "SELECT s.model, sum(s.requests), sum(s.input_tokens), sum(s.output_tokens),
                    coalesce((SELECT max(h.requests) FROM traffic_hours h WHERE h.model = s.model AND h.hour >= ?2), 0)
             FROM spend s WHERE s.day >= ?1 GROUP BY s.model ORDER BY s.model",
        )
        .map_err(sql)?;
    let rows = statement
        .query_map(params![day, first_hour], |r| {
            Ok(ModelTraffic {
                model: r.get(0)?,
                requests: count(r.get(1)?),
                input_tokens: count(r.get(2)?),
                output_tokens: count(r.get(3)?),
                peak_hour_requests: count(r.get(4)?),
            })
        })
        .map_err(sql)?;
    rows.map(|r| r.map_err(sql)).collect()
}

async fn postgres_traffic(
    client: &tokio_postgres::Client,
    from: Date,
) -> Result<Vec<ModelTraffic>, String> {
    let rows = client
        .query(
            "WITH hours AS (
                 SELECT model, date_trunc('hour', recorded_at) AS hour, count(*) AS requests,
                        sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens
                 FROM ledger_records WHERE day >= $1 GROUP BY 1, 2)
             SELECT model, sum(requests)::int8,
                    least(sum(input_tokens), 9223372036854775807)::int8,
                    least(sum(output_tokens), 9223372036854775807)::int8,
                    max(requests)::int8
             FROM hours GROUP BY model ORDER BY model COLLATE \"C\"",
            &[&from],
        )
        .await
        .map_err(|e| pg(&e))?;
    Ok(rows
        .iter()
        .map(|r| ModelTraffic {
            model: r.get(0),
            requests: count(r.get(1)),
            input_tokens: count(r.get(2)),
            output_tokens: count(r.get(3)),
            peak_hour_requests: count(r.get(4)),
        })
        .collect())
}

/// The hour (since the Unix epoch) `at` falls in.
pub fn hour_of(at: OffsetDateTime) -> i64 {
    at.unix_timestamp().div_euclid(3600)
}
