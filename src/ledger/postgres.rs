//! The ledger in PostgreSQL, shared by every replica: one record per
//! request (`ledger_records`), shipped from the local spool in batches, one
//! multi-row `INSERT … ON CONFLICT DO NOTHING` per flush interval, so a
//! batch sent again after a failure is stored once.
//!
//! A task of its own does all of it, never the request path. At its first
//! contact with the database it migrates the schema, ships what an earlier
//! run left in the spool, and loads the fleet's spend this month for
//! budgets; then it ships every flush interval. While the database cannot
//! be reached, records wait in the spool (an ERROR is logged once per
//! outage) and are shipped, oldest first, when it answers. Every wait is
//! bounded: connecting, each statement, each whole operation.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use time::{Date, OffsetDateTime};
use tokio::time::MissedTickBehavior;
use tokio_postgres::config::Host;
use tokio_postgres::types::ToSql;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::spool::{Record, Spool};
use super::{ByKey, Ledger, Row, Storage, Totals, add_cost, migrations};
use crate::config::Secret;
use crate::config::postgres_url::{self, PostgresTarget};
use crate::error;
use crate::tls::ClientTls;

/// Connecting, and waiting for a pooled connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Set on every connection: the server cancels a statement past it.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most any one operation (a batch, a query) may take, whatever the
/// server or the network does.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections: one for the shipper, the rest for `/admin/spend`.
const POOL_SIZE: usize = 4;
/// Records per `INSERT`: one statement of eleven array parameters.
const BATCH: usize = 5_000;

const INSERT: &str = "
    INSERT INTO ledger_records (id, request_id, day, key, model, deployment,
                                input_tokens, output_tokens, cost_nano_usd, recorded_at, api)
    SELECT id::uuid, request_id, day, key, model, deployment,
           input_tokens, output_tokens, cost_nano_usd, recorded_at, api
    FROM unnest($1::text[], $2::text[], $3::date[], $4::text[], $5::text[], $6::text[],
                $7::int8[], $8::int8[], $9::int8[], $10::timestamptz[], $11::text[])
         AS r(id, request_id, day, key, model, deployment,
              input_tokens, output_tokens, cost_nano_usd, recorded_at, api)
    ON CONFLICT (id) DO NOTHING";

/// Sums of bigints are numerics in PostgreSQL; each stops at `i64::MAX`,
/// as the SQLite ledger's do. Text is ordered as bytes (`COLLATE "C"`),
/// as the SQLite ledger's rows are.
const REPORT: &str = "
    SELECT day, key, model, deployment, api, count(*),
           least(sum(input_tokens), 9223372036854775807)::int8,
           least(sum(output_tokens), 9223372036854775807)::int8,
           least(sum(cost_nano_usd), 9223372036854775807)::int8
    FROM ledger_records
    WHERE ($1::text IS NULL OR key = $1)
      AND ($2::date IS NULL OR day >= $2)
      AND ($3::date IS NULL OR day <= $3)
    GROUP BY day, key, model, deployment, api
    ORDER BY day, key COLLATE \"C\", model COLLATE \"C\", deployment COLLATE \"C\",
             api COLLATE \"C\"";

const SPENT_BY_KEY: &str = "
    SELECT key, day, least(sum(cost_nano_usd), 9223372036854775807)::int8
    FROM ledger_records
    WHERE day >= $1
    GROUP BY key, day";

pub struct Postgres {
    pool: Pool,
    spool: Arc<Spool>,
    /// The database as logs name it: user, host, port and database, never
    /// the password.
    target: String,
    /// The newest record an earlier run left in the spool: shipped before
    /// the fleet's totals are read, so that they hold it.
    earlier_through: Option<i64>,
    shipping: tokio::sync::Mutex<Shipping>,
}

#[derive(Default)]
struct Shipping {
    /// The schema is migrated and the fleet's totals are loaded.
    ready: bool,
}

impl Postgres {
    /// The pool for the database at `url` (nothing is connected yet) and
    /// the spool in `data_dir`, with the spend per key and day the spool
    /// holds, and this replica's.
    pub fn open(url: &Secret, data_dir: &Path) -> Result<(Self, ByKey, ByKey), String> {
        let PostgresTarget { mut config, tls } = postgres_url::read(url.expose())
            .map_err(|e| format!("the ledger's PostgreSQL URL {e}"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tollgate");
        }
        // Options the URL gives come last, and win.
        let timeout = format!("-c statement_timeout={}", STATEMENT_TIMEOUT.as_millis());
        let options = match config.get_options() {
            Some(theirs) => format!("{timeout} {theirs}"),
            None => timeout,
        };
        config.options(options);
        let target = target(&config);
        let manager = Manager::from_config(
            config,
            connector(&tls)?,
            ManagerConfig {
                // A query on each checkout: a connection the server closed
                // while it was down is found out before it is used.
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| format!("the ledger's PostgreSQL pool: {e}"))?;
        let spool = Spool::open(data_dir)?;
        let earlier_through = spool.last_seq()?;
        let unshipped = spool.spent_by_key()?;
        let own = spool.own_by_key(OffsetDateTime::now_utc().date())?;
        let postgres = Self {
            pool,
            spool: Arc::new(spool),
            target,
            earlier_through,
            shipping: tokio::sync::Mutex::default(),
        };
        Ok((postgres, unshipped, own))
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Ships the spool, preparing first if this gateway has not yet
    /// reached the database; logs the first failure of an outage, and the
    /// end of one.
    async fn ship(&self, ledger: &Ledger) {
        let mut shipping = self.shipping.lock().await;
        let result = async {
            if !shipping.ready {
                self.prepare(ledger).await?;
                shipping.ready = true;
            }
            self.ship_spool(None).await
        }
        .await;
        // The ledger's failing flag: its ERROR is logged once per outage.
        let failing = &ledger.failing;
        match result {
            Ok(shipped) if failing.swap(false, Ordering::Relaxed) => {
                tracing::info!(
                    database = %self.target,
                    shipped,
                    "the ledger's PostgreSQL answers again; spooled spend is shipped"
                );
            }
            Ok(_) => {}
            Err(e) if !failing.swap(true, Ordering::Relaxed) => {
                tracing::error!(
                    database = %self.target,
                    error = %e,
                    spool = %self.spool.path().display(),
                    "cannot ship spend to the ledger's PostgreSQL: it waits in the spool and is \
                     shipped when the database answers"
                );
            }
            Err(_) => {}
        }
    }

    /// Migrates the schema, ships what an earlier run left in the spool,
    /// then hands the fleet's spend this month to the ledger for budgets.
    /// Nothing this run recorded is shipped before that read, so the
    /// ledger adds it without counting any of it twice.
    async fn prepare(&self, ledger: &Ledger) -> Result<(), String> {
        let mut client = self.client().await?;
        let migrated = bounded(migrations::apply(&mut client))
            .await?
            .map_err(|e| error::chain(&e))?;
        drop(client);
        for migration in &migrated.applied {
            tracing::info!(
                version = migration.version,
                name = migration.name,
                "applied a ledger migration"
            );
        }
        if let Some(version) = migrated.newer {
            tracing::warn!(
                version,
                "the ledger's schema is newer than this gateway knows; shipping to it as it is"
            );
        }
        let replayed = match self.earlier_through {
            Some(through) => self.ship_spool(Some(through)).await?,
            None => 0,
        };
        let today = OffsetDateTime::now_utc().date();
        let month = today.replace_day(1).unwrap_or(today);
        ledger.load_fleet_totals(self.spent_by_key_since(month).await?);
        tracing::info!(
            database = %self.target,
            replayed,
            "the ledger's PostgreSQL is ready; budgets count the fleet's spend this month"
        );
        Ok(())
    }

    /// Ships the spool's records, oldest first, in batches, each removed
    /// from the spool once the database committed it; only those up to
    /// `through` if given. Returns how many were shipped.
    async fn ship_spool(&self, through: Option<i64>) -> Result<usize, String> {
        let mut shipped = 0;
        loop {
            let spool = self.spool.clone();
            let batch = blocking(move || spool.oldest(BATCH, through)).await?;
            let Some(&(last, _)) = batch.last() else {
                return Ok(shipped);
            };
            let client = self.client().await?;
            bounded(insert(&client, &batch))
                .await?
                .map_err(|e| error::chain(&e))?;
            drop(client);
            let spool = self.spool.clone();
            blocking(move || spool.remove_through(last)).await?;
            shipped += batch.len();
            if batch.len() < BATCH {
                return Ok(shipped);
            }
        }
    }

    pub(super) async fn client(&self) -> Result<deadpool_postgres::Client, String> {
        bounded(self.pool.get()).await?.map_err(pool_error)
    }

    /// The fleet's rows, as `Ledger::report` gives them.
    pub async fn report(
        &self,
        key: Option<&str>,
        from: Option<Date>,
        to: Option<Date>,
    ) -> Result<Vec<(Row, Totals)>, String> {
        let client = self.client().await?;
        let rows = bounded(async {
            let statement = client.prepare_cached(REPORT).await?;
            client.query(&statement, &[&key, &from, &to]).await
        })
        .await?
        .map_err(|e| error::chain(&e))?;
        let count = |i: usize, r: &tokio_postgres::Row| r.get::<_, i64>(i).max(0) as u64;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    Row {
                        day: r.get(0),
                        key: r.get(1),
                        model: r.get(2),
                        deployment: r.get(3),
                        api: Cow::Owned(r.get(4)),
                    },
                    Totals {
                        requests: count(5, r),
                        input_tokens: count(6, r),
                        output_tokens: count(7, r),
                        cost_nano_usd: count(8, r),
                    },
                )
            })
            .collect())
    }

    async fn spent_by_key_since(&self, from: Date) -> Result<ByKey, String> {
        let client = self.client().await?;
        let rows = bounded(client.query(SPENT_BY_KEY, &[&from]))
            .await?
            .map_err(|e| error::chain(&e))?;
        let mut by_key = ByKey::default();
        for r in &rows {
            let key: &str = r.get(0);
            add_cost(&mut by_key, key, r.get(1), r.get::<_, i64>(2).max(0) as u64);
        }
        Ok(by_key)
    }

    /// The gateway stops: whatever is queued goes to the spool, and the
    /// spool to the database if it answers in time. What is left stays in
    /// the spool for the next gateway started on this data_dir.
    pub async fn close(&self, ledger: &Ledger) {
        let spool = self.spool.clone();
        if let Err(e) = blocking(move || spool.wait_written()).await {
            tracing::error!(error = %e, "could not write the last spend to the ledger's spool");
        }
        if tokio::time::timeout(OPERATION_TIMEOUT, self.ship(ledger))
            .await
            .is_err()
        {
            tracing::warn!("the last shipment to the ledger's PostgreSQL did not finish in time");
        }
        let spool = self.spool.clone();
        match blocking(move || spool.len()).await {
            Ok(0) => {}
            Ok(records) => tracing::warn!(
                records,
                spool = %self.spool.path().display(),
                "spend not yet in PostgreSQL stays in the spool; a gateway started on this \
                 data_dir ships it"
            ),
            Err(e) => tracing::error!(error = %e, "cannot read the ledger's spool"),
        }
    }
}

/// Ships the ledger's spool every `every` from a Tokio task, first at
/// once, until the ledger is dropped.
pub fn spawn_shipper(ledger: &Arc<Ledger>, every: Duration) {
    let ledger = Arc::downgrade(ledger);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(ledger) = ledger.upgrade() else {
                return;
            };
            if let Storage::Postgres(postgres) = &ledger.storage {
                postgres.ship(&ledger).await;
            }
        }
    });
}

/// One statement for the whole batch: each column an array parameter.
async fn insert(
    client: &deadpool_postgres::Client,
    batch: &[(i64, Record)],
) -> Result<u64, tokio_postgres::Error> {
    let records = batch.iter().map(|(_, r)| r);
    let text = |f: fn(&Record) -> &str| records.clone().map(f).collect::<Vec<_>>();
    let int = |f: fn(&Record) -> u64| {
        records
            .clone()
            .map(|r| i64::try_from(f(r)).unwrap_or(i64::MAX))
            .collect::<Vec<_>>()
    };
    let ids = text(|r| &r.id);
    let request_ids = text(|r| &r.request_id);
    let days: Vec<Date> = records.clone().map(|r| r.row.day).collect();
    let keys = text(|r| &r.row.key);
    let models = text(|r| &r.row.model);
    let deployments = text(|r| &r.row.deployment);
    let input = int(|r| r.input_tokens);
    let output = int(|r| r.output_tokens);
    let cost = int(|r| r.cost_nano_usd);
    let at: Vec<OffsetDateTime> = records.clone().map(|r| r.recorded_at).collect();
    let apis = text(|r| &r.row.api);
    let params: [&(dyn ToSql + Sync); 11] = [
        &ids,
        &request_ids,
        &days,
        &keys,
        &models,
        &deployments,
        &input,
        &output,
        &cost,
        &at,
        &apis,
    ];
    let statement = client.prepare_cached(INSERT).await?;
    client.execute(&statement, &params).await
}

/// Waits for `operation` at most `OPERATION_TIMEOUT`.
async fn bounded<T>(operation: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(OPERATION_TIMEOUT, operation)
        .await
        .map_err(|_| format!("no answer within {} s", OPERATION_TIMEOUT.as_secs()))
}

/// Runs spool work (SQLite, which blocks) off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("ledger spool task: {e}"))?
}

/// TLS for connections whose `sslmode` requires it, verified against
/// its roots, with its identity; the others never use it.
pub(super) fn connector(tls: &ClientTls) -> Result<MakeRustlsConnect, String> {
    let config = tls.config().map_err(|e| format!("the ledger's TLS: {e}"))?;
    Ok(MakeRustlsConnect::new(config))
}

fn pool_error(e: PoolError) -> String {
    match e {
        PoolError::Backend(e) => error::chain(&e),
        PoolError::Timeout(_) => format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()),
        other => other.to_string(),
    }
}

/// `user@host:port/database`, for logs.
fn target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => String::new(),
    };
    format!(
        "{}@{host}:{}/{}",
        config.get_user().unwrap_or_default(),
        config.get_ports().first().copied().unwrap_or(5432),
        config.get_dbname().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_name_the_database_without_its_password() {
        let config: tokio_postgres::Config = "postgres://tollgate:hunter2@db.internal:6432/spend"
            .parse()
            .unwrap();
        assert_eq!(target(&config), "tollgate@db.internal:6432/spend");
    }
}
