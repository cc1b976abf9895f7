//! What a replica learned of the fleet's budgets at its last exchange,
//! kept in its ledger's `data_dir` so that a replica restarted while Redis
//! is away takes the share it had rather than a new one. One small JSON
//! file, replaced whole: written to a temporary file, synced, and renamed
//! over the last, so a reader finds the old or the new, never half of one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::Date;
use time::macros::format_description;

pub const FILE: &str = "tollgate-fleet-share.json";

/// The format this gateway writes; a file of another is not read.
const VERSION: u32 = 1;

const DAY: &[time::format_description::BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]");

/// The fleet as one exchange left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    /// The UTC day of the exchange: its spend is that day's and month's.
    pub day: Date,
    /// Replicas seen in the minute before it.
    pub replicas: u64,
    /// Redis did not answer when this was written: nothing this replica
    /// spent since reached the fleet's counts but `KeyShare::settled`.
    pub degraded: bool,
    pub keys: BTreeMap<String, KeyShare>,
}

/// One budgeted key, as of the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyShare {
    /// The fleet's spend on the day and in the month, and what its
    /// requests held, in nano-dollars.
    pub fleet: [u64; 3],
    /// Of this replica's ledger, the day's and the month's spend that the
    /// fleet's counts held: what the ledger has beyond it was spent since.
    pub counted: [u64; 2],
    /// Of the day's and the month's spend since, what settlement calls
    /// added to the fleet's counts before the next exchange.
    pub settled: [u64; 2],
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    version: u32,
    day: String,
    replicas: u64,
    degraded: bool,
    keys: BTreeMap<String, KeyShare>,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// What the file in `dir` holds; `None` when there is none, or (with a
/// warning) when it cannot be read as one this gateway wrote.
pub fn read(dir: &Path) -> Option<Remembered> {
    let path = path(dir);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            ignored(&path, &e.to_string());
            return None;
        }
    };
    let parsed = serde_json::from_slice::<Wire>(&text)
        .map_err(|e| e.to_string())
        .and_then(|wire| {
            if wire.version != VERSION {
                return Err(format!("format version {}, not {VERSION}", wire.version));
            }
            let day = Date::parse(&wire.day, DAY).map_err(|e| format!("day: {e}"))?;
            if wire.replicas == 0 {
                return Err("no replicas".into());
            }
            Ok(Remembered {
                day,
                replicas: wire.replicas,
                degraded: wire.degraded,
                keys: wire.keys,
            })
        });
    parsed.map_err(|why| ignored(&path, &why)).ok()
}

fn ignored(path: &Path, why: &str) {
    tracing::warn!(
        file = %path.display(),
        error = why,
        "the fleet's budgets remembered from the last exchange cannot be read; they are ignored, and budgeted requests wait for Redis"
    );
}

/// Replaces the file in `dir` with `remembered`.
pub fn write(dir: &Path, remembered: &Remembered) -> std::io::Result<()> {
    let wire = Wire {
        version: VERSION,
        day: remembered.day.format(DAY).unwrap_or_default(),
        replicas: remembered.replicas,
        degraded: remembered.degraded,
        keys: remembered.keys.clone(),
    };
    let text = serde_json::to_vec(&wire).map_err(std::io::Error::other)?;
    let path = path(dir);
    let temporary = dir.join(format!("{FILE}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&temporary, &path)
}

#[cfg(test)]
mod tests {
    use time::macros::date;

    use super::*;

    fn remembered() -> Remembered {
        Remembered {
            day: date!(2026 - 12 - 07),
            replicas: 3,
            degraded: true,
            keys: BTreeMap::from([(
                "team".to_owned(),
                KeyShare {
                    fleet: [20_000_000, 50_000_000, 1_000],
                    counted: [10_000_000, 30_000_000],
                    settled: [5_000, 5_000],
                },
            )]),
        }
    }

    #[test]
    fn what_is_written_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None, "nothing written yet");
        write(dir.path(), &remembered()).unwrap();
        assert_eq!(read(dir.path()), Some(remembered()));
        let mut later = remembered();
        later.replicas = 2;
        write(dir.path(), &later).unwrap();
        assert_eq!(read(dir.path()), Some(later), "replaced whole");
    }

    #[test]
    fn a_file_cut_short_or_not_ours_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &remembered()).unwrap();
        let whole = std::fs::read(path(dir.path())).unwrap();
        for cut in [0, 1, whole.len() / 2, whole.len() - 1] {
            std::fs::write(path(dir.path()), &whole[..cut]).unwrap();
            assert_eq!(read(dir.path()), None, "cut at {cut}");
        }
        for text in [
            "\u{0}\u{ff}garbage".as_bytes(),
            br#"{"version":2,"day":"2026-12-07","replicas":1,"degraded":false,"keys":{}}"#,
            br#"{"version":1,"day":"2026-13-40","replicas":1,"degraded":false,"keys":{}}"#,
            br#"{"version":1,"day":"2026-12-07","replicas":0,"degraded":false,"keys":{}}"#,
            br#"{"version":1,"day":"2026-12-07","replicas":1,"degraded":false,"keys":{"k":{"fleet":[-1,0,0],"counted":[0,0],"settled":[0,0]}}}"#,
            br#"{"version":1,"day":"2026-12-07","replicas":1,"degraded":false,"keys":{"k":{"fleet":[0,0],"counted":[0,0],"settled":[0,0]}}}"#,
        ] {
            std::fs::write(path(dir.path()), text).unwrap();
            assert_eq!(read(dir.path()), None, "{}", String::from_utf8_lossy(text));
        }
    }
}
