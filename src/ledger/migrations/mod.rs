//! The ledger's schema in PostgreSQL: numbered migrations, embedded in
//! the binary, applied in order when a gateway first reaches the
//! database. `schema_migrations` lists those applied. All of it happens in
//! one transaction that first takes a transaction-scoped advisory lock, so
//! replicas starting at once take turns: the first migrates, the others
//! find it done.

use tokio_postgres::Client;

pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    sql: &'static str,
}

/// Oldest first; a version is never changed once released, only followed.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "records",
        sql: include_str!("0001_records.sql"),
    },
    Migration {
        version: 2,
        name: "api",
        sql: include_str!("0002_api.sql"),
    },
    Migration {
        version: 3,
        name: "licence",
        sql: include_str!("0003_licence.sql"),
    },
];

/// The advisory lock migrations hold: "tollgate" in ASCII.
const LOCK: i64 = 0x746f_6c6c_6761_7465;

/// What a gateway found and did.
pub struct Migrated {
    /// The migrations this gateway applied (none when another had).
    pub applied: Vec<&'static Migration>,
    /// The database's version, if newer than any this gateway knows
    /// (a newer gateway migrated it).
    pub newer: Option<i32>,
}

pub async fn apply(client: &mut Client) -> Result<Migrated, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({LOCK});
         CREATE TABLE IF NOT EXISTS schema_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await?;
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            &[],
        )
        .await?
        .get(0);
    let mut applied = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        tx.batch_execute(migration.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await?;
        applied.push(migration);
    }
    tx.commit().await?;
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    Ok(Migrated {
        applied,
        newer: (current > known).then_some(current),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_from_one_and_each_has_its_sql() {
        for (i, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version, i as i32 + 1, "{}", migration.name);
            assert!(!migration.sql.trim().is_empty(), "{}", migration.name);
        }
    }
}
