//! Whether `serve` could keep its ledger where `[ledger] data_dir` says,
//! found by `tollgate check` without leaving anything behind: `serve`
//! creates the directory, and every missing one above it, and opens its
//! SQLite file there read-write, with the journal files SQLite makes
//! beside it. A directory that does not exist is not made: the nearest
//! one that does must take new entries.

use std::fs::{Metadata, OpenOptions};
use std::io::ErrorKind;
use std::path::Path;

use crate::config::{LedgerBackend, LedgerSettings, Problem};

/// What to do when the user `serve` runs as may not write there.
const GRANT: &str = "the ledger is kept there: give the user `serve` runs as write access, \
                     or set data_dir to a directory that user can write in";

/// What would stop `serve`, run as this process's user, from writing the
/// ledger `settings` describe; `None` for a ledger in memory.
pub fn unwritable(settings: &LedgerSettings) -> Option<Problem> {
    let dir = settings.data_dir.as_deref()?;
    let file = match settings.backend {
        LedgerBackend::Sqlite => super::store::FILE,
        LedgerBackend::Postgres { .. } => super::spool::FILE,
    };
    Some(Problem::new("ledger.data_dir", fault(dir, file)?))
}

fn fault(dir: &Path, file: &str) -> Option<String> {
    let (at, meta) = match nearest(dir) {
        Ok(found) => found,
        Err(fault) => return Some(format!("{fault}; {GRANT}")),
    };
    let missing = || format!("{} does not exist and cannot be created", dir.display());
    if !meta.is_dir() {
        let not_directory = format!("{} is not a directory", at.display());
        let fault = if at == dir {
            not_directory
        } else {
            format!("{}: {not_directory}", missing())
        };
        return Some(format!(
            "{fault}; set data_dir to a directory, or to a path where one can be made"
        ));
    }
    let fault = if at == dir {
        new_entry(dir).and_then(|()| open_files(dir, file))
    } else {
        new_entry(at).map_err(|e| format!("{}: {e}", missing()))
    };
    fault.err().map(|fault| format!("{fault}; {GRANT}"))
}

/// The nearest of `dir` and the directories above it that exists: what
/// `create_dir_all` makes the missing ones in ("" is the working
/// directory).
fn nearest(dir: &Path) -> Result<(&Path, Metadata), String> {
    for at in dir.ancestors() {
        let at = if at.as_os_str().is_empty() {
            Path::new(".")
        } else {
            at
        };
        match std::fs::metadata(at) {
            Ok(meta) => return Ok((at, meta)),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {}
            Err(e) => return Err(format!("cannot read {}: {e}", at.display())),
        }
    }
    // Only a working directory that was removed gets here.
    Err(format!(
        "no directory on the way to {} exists",
        dir.display()
    ))
}

/// Makes and removes a file in `dir`, as `serve` makes its SQLite files
/// (or the directories that hold them) there.
fn new_entry(dir: &Path) -> Result<(), String> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let probe = dir.join(format!(".tollgate-check-{}-{nanos}", std::process::id()));
    let cannot = |e: std::io::Error| format!("cannot create files in {}: {e}", dir.display());
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(cannot)?;
    std::fs::remove_file(&probe).map_err(cannot)
}

/// Opens, read-write as SQLite does, the ledger's file and its journal
/// files that already exist, changing nothing in them.
fn open_files(dir: &Path, file: &str) -> Result<(), String> {
    for name in ["", "-wal", "-shm"].map(|suffix| format!("{file}{suffix}")) {
        let path = dir.join(name);
        match OpenOptions::new().read(true).write(true).open(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(format!("cannot open {} to write: {e}", path.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn settings(dir: &Path) -> LedgerSettings {
        LedgerSettings {
            backend: LedgerBackend::Sqlite,
            data_dir: Some(dir.to_owned()),
            flush_interval: std::time::Duration::from_secs(1),
        }
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        entries
    }

    #[test]
    fn a_directory_that_is_or_can_be_made_passes_and_is_left_as_it_was() {
        let root = tempfile::tempdir().unwrap();
        let existing = root.path().join("ledger");
        std::fs::create_dir(&existing).unwrap();
        std::fs::write(existing.join(super::super::store::FILE), "").unwrap();
        let before = entries(&existing);
        assert_eq!(unwritable(&settings(&existing)), None);
        assert_eq!(entries(&existing), before);
        let missing = root.path().join("a/b/ledger");
        assert_eq!(unwritable(&settings(&missing)), None);
        assert_eq!(entries(root.path()), [existing], "nothing made");
        let memory = LedgerSettings {
            data_dir: None,
            ..settings(root.path())
        };
        assert_eq!(unwritable(&memory), None);
    }

    #[test]
    fn a_file_in_the_way_is_named() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("file");
        std::fs::write(&file, "").unwrap();
        let message = |dir: &Path| {
            let problem = unwritable(&settings(dir)).expect("refused");
            assert_eq!(problem.path, "ledger.data_dir");
            problem.message
        };
        assert!(
            message(&file).starts_with(&format!("{} is not a directory;", file.display())),
            "{}",
            message(&file)
        );
        let under = file.join("ledger");
        assert!(
            message(&under).starts_with(&format!(
                "{} does not exist and cannot be created: {} is not a directory;",
                under.display(),
                file.display()
            )),
            "{}",
            message(&under)
        );
    }

    #[test]
    fn a_directory_or_a_ledger_file_this_user_cannot_write_is_named() {
        use std::fs::Permissions;
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ledger");
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join(super::super::store::FILE);
        std::fs::write(&file, "").unwrap();
        std::fs::set_permissions(&file, Permissions::from_mode(0o444)).unwrap();
        let refused = |dir: &Path| unwritable(&settings(dir)).map(|p| p.message);
        let refused_file = refused(&dir);
        std::fs::set_permissions(&dir, Permissions::from_mode(0o555)).unwrap();
        let refused_dir = refused(&dir);
        let refused_below = refused(&dir.join("below"));
        // Permissions do not bind a privileged user (root): nothing to see.
        let privileged = std::fs::write(dir.join("probe"), "").is_ok();
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        if privileged {
            return;
        }
        let starts = |got: Option<String>, expected: String| {
            let got = got.expect("refused");
            assert!(got.starts_with(&expected), "{got}");
        };
        starts(
            refused_file,
            format!("cannot open {} to write: ", file.display()),
        );
        starts(
            refused_dir,
            format!("cannot create files in {}: ", dir.display()),
        );
        starts(
            refused_below,
            format!(
                "{}/below does not exist and cannot be created: cannot create files in {}: ",
                dir.display(),
                dir.display()
            ),
        );
        assert_eq!(entries(&dir), [file], "nothing left behind");
    }
}
