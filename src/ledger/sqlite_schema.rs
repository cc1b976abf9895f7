//! The schemas of the SQLite files (the ledger and the spool): numbered
//! steps, and `PRAGMA user_version` counts those applied. Steps run in
//! one transaction, so a file is never left half migrated, and a file a
//! newer gateway migrated is refused rather than misread.

use rusqlite::Connection;

/// Applies the steps past the file's version, oldest first. A step is
/// never changed once released, only followed; the first ones create
/// tables with `IF NOT EXISTS`, as files from before versioning have them.
pub fn migrate(db: &mut Connection, steps: &[&str]) -> Result<(), String> {
    let sql = |e: rusqlite::Error| format!("schema migration: {e}");
    let tx = db.transaction().map_err(sql)?;
    let version: usize = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql)?;
    if version > steps.len() {
        return Err(format!(
            "schema version {version} is newer than this gateway knows ({}); run a newer tollgate or another data_dir",
            steps.len()
        ));
    }
    for step in &steps[version..] {
        tx.execute_batch(step).map_err(sql)?;
    }
    tx.pragma_update(None, "user_version", steps.len())
        .map_err(sql)?;
    tx.commit().map_err(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: &[&str] = &[
        "CREATE TABLE IF NOT EXISTS t (a INTEGER NOT NULL);",
        "ALTER TABLE t ADD COLUMN b TEXT NOT NULL DEFAULT 'x';",
    ];

    #[test]
    fn applies_each_step_once_and_refuses_a_newer_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        // A file from before versioning: the first step's table, version 0.
        let mut db = Connection::open(&path).unwrap();
        db.execute_batch("CREATE TABLE t (a INTEGER NOT NULL); INSERT INTO t VALUES (1);")
            .unwrap();
        migrate(&mut db, STEPS).unwrap();
        migrate(&mut db, STEPS).unwrap();
        let b: String = db.query_row("SELECT b FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(b, "x");
        let error = migrate(&mut db, &STEPS[..1]).unwrap_err();
        assert!(error.contains("schema version 2 is newer"), "{error}");
    }

    #[test]
    fn a_failing_step_leaves_the_file_as_it_was() {
        let mut db = Connection::open_in_memory().unwrap();
        let broken = [STEPS[0], "ALTER TABLE missing ADD COLUMN c TEXT;"];
        assert!(migrate(&mut db, &broken).is_err());
        let version: i64 = db
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 0);
        let tables: i64 = db
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 0);
    }
}
