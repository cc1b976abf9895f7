//! What a replica learned of the fleet's budgets at its last exchange,
//! kept in its ledger's `data_dir` so that a replica restarted while Redis
//! is away takes the share it had rather than a new one.
//!
//! The file is a journal, one JSON record a line. Each record gives the
//! day, the replicas and whether Redis was away, and the keys whose share
//! moved since the record before it (`null`: a key no longer kept); the
//! state is the records applied in order to nothing, so the first one
//! names every key. A write appends one record of what moved and syncs
//! it: it costs what moved, not what is kept. When the records after the
//! first outgrow it, the file is written whole instead, as one record: to
//! a temporary file, synced, and renamed over the last. A reader so finds
//! the state of one write or another, never half of one: a last line that
//! does not parse (a process killed while appending it) is dropped, and
//! the state is the one before it. A file with anything else it cannot
//! read (another line, another format) is ignored whole.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::Date;
use time::macros::format_description;

pub const FILE: &str = "tollgate-fleet-share.json";

/// The format this gateway writes; a file of another is not read, but for
/// the one before it.
const VERSION: u32 = 2;
/// The format before this one: one record of every key, replaced whole. A
/// file of it alone is read as this one's first line, so that a replica
/// upgraded while Redis is away keeps the share it had.
const BEFORE: u32 = 1;

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

/// What is known now, as `Keeper::take` takes it: `Remembered`'s day,
/// replicas and degraded, and of its keys what may have moved.
#[derive(Debug)]
pub struct Update {
    pub day: Date,
    pub replicas: u64,
    pub degraded: bool,
    pub keys: Shares,
}

#[derive(Debug)]
pub enum Shares {
    /// Every key kept: one not named is no longer.
    Every(BTreeMap<String, KeyShare>),
    /// The keys that may have moved since the last update, and no other
    /// (`None`: no longer kept).
    Moved(Vec<(String, Option<KeyShare>)>),
}

/// One line of the file. `keys` is what moved since the line before.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record<K> {
    version: u32,
    day: String,
    replicas: u64,
    degraded: bool,
    keys: K,
}

type Moves = BTreeMap<String, Option<KeyShare>>;

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
    replay(&text).map_err(|why| ignored(&path, &why)).ok()
}

/// The records of `text` applied in order to nothing.
fn replay(text: &[u8]) -> Result<Remembered, String> {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    let mut state: Option<Remembered> = None;
    for (at, line) in lines.iter().enumerate() {
        let (header, moves) = match parse(line, lines.len() == 1) {
            Ok(record) => record,
            // Appended by a process killed before it finished.
            Err(_) if at > 0 && at + 1 == lines.len() => break,
            Err(why) => return Err(format!("line {}: {why}", at + 1)),
        };
        let state = match &mut state {
            Some(state) => {
                state.day = header.day;
                state.replicas = header.replicas;
                state.degraded = header.degraded;
                state
            }
            None => state.insert(header),
        };
        for (key, share) in moves {
            match share {
                Some(share) => state.keys.insert(key, share),
                None => state.keys.remove(&key),
            };
        }
    }
    state.ok_or_else(|| "no record".to_owned())
}

/// One line's day, replicas and degraded (with no keys), and the keys it
/// says moved; `alone`: the file's only line.
fn parse(line: &[u8], alone: bool) -> Result<(Remembered, Moves), String> {
    let record = serde_json::from_slice::<Record<Moves>>(line).map_err(|e| e.to_string())?;
    if record.version != VERSION && !(record.version == BEFORE && alone) {
        return Err(format!("format version {}, not {VERSION}", record.version));
    }
    let day = Date::parse(&record.day, DAY).map_err(|e| format!("day: {e}"))?;
    if record.replicas == 0 {
        return Err("no replicas".into());
    }
    let header = Remembered {
        day,
        replicas: record.replicas,
        degraded: record.degraded,
        keys: BTreeMap::new(),
    };
    Ok((header, record.keys))
}

fn ignored(path: &Path, why: &str) {
    tracing::warn!(
        file = %path.display(),
        error = why,
        "the fleet's budgets remembered from the last exchange cannot be read; they are ignored, and budgeted requests wait for Redis"
    );
}

/// Keeps the file in a data_dir up to what it takes: one writer at a
/// time, the only one of the file.
pub struct Keeper {
    dir: PathBuf,
    /// What the file is to hold, as last taken.
    state: Option<Remembered>,
    /// Of `state`, what the file does not hold yet.
    unwritten: Unwritten,
    /// The file as this keeper last wrote it whole, to append to; `None`
    /// when it did not, or an append failed: the next write is whole.
    file: Option<Appending>,
}

#[derive(Default)]
struct Unwritten {
    keys: Moves,
    /// The day, replicas or degraded moved.
    header: bool,
}

struct Appending {
    file: File,
    /// The length of the first line, and of the lines after it.
    first: u64,
    after: u64,
}

impl Keeper {
    /// The keeper of the file in `dir`, which holds `state` (as `read`
    /// found it).
    pub fn new(dir: PathBuf, state: Option<Remembered>) -> Self {
        Self {
            dir,
            state,
            unwritten: Unwritten::default(),
            file: None,
        }
    }

    pub fn path(&self) -> PathBuf {
        path(&self.dir)
    }

    /// Whether what the file is to hold says Redis was away.
    pub fn degraded(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.degraded)
    }

    /// Takes up what is known now; whether the file no longer holds it.
    /// Costs what `update` names.
    pub fn take(&mut self, update: Update) -> bool {
        let header = (update.day, update.replicas, update.degraded);
        self.unwritten.header |= self.state.is_none();
        let state = self.state.get_or_insert_with(|| Remembered {
            day: update.day,
            replicas: update.replicas,
            degraded: update.degraded,
            keys: BTreeMap::new(),
        });
        if (state.day, state.replicas, state.degraded) != header {
            (state.day, state.replicas, state.degraded) = header;
            self.unwritten.header = true;
        }
        let unwritten = &mut self.unwritten.keys;
        match update.keys {
            Shares::Every(keys) => {
                for (key, share) in &keys {
                    if state.keys.get(key) != Some(share) {
                        unwritten.insert(key.clone(), Some(*share));
                    }
                }
                for key in state.keys.keys() {
                    if !keys.contains_key(key) {
                        unwritten.insert(key.clone(), None);
                    }
                }
                state.keys = keys;
            }
            Shares::Moved(moved) => {
                for (key, share) in moved {
                    let was = match share {
                        Some(share) => state.keys.insert(key.clone(), share),
                        None => state.keys.remove(&key),
                    };
                    if was != share {
                        unwritten.insert(key, share);
                    }
                }
            }
        }
        self.unwritten.header || !self.unwritten.keys.is_empty()
    }

    /// Brings the file up to what was taken: appends what moved, or
    /// writes it whole when the appended lines would outgrow the first or
    /// this keeper has not written it whole since it started.
    pub fn write(&mut self) -> std::io::Result<()> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        if !self.unwritten.header && self.unwritten.keys.is_empty() {
            return Ok(());
        }
        // Taken out until it is written: a write that fails (or panics)
        // leaves the next one to write the file whole.
        let appending = match self.file.take() {
            Some(mut appending) => {
                let line = to_line(state, &self.unwritten.keys)?;
                let after = appending.after + line.len() as u64;
                if after <= appending.first {
                    appending.file.write_all(&line)?;
                    appending.file.sync_data()?;
                    appending.after = after;
                    appending
                } else {
                    self.write_whole(state)?
                }
            }
            None => self.write_whole(state)?,
        };
        self.file = Some(appending);
        self.unwritten = Unwritten::default();
        Ok(())
    }

    /// Replaces the file with one line of `state`, and keeps it open to
    /// append to: after the rename, the temporary file is that file.
    fn write_whole(&self, state: &Remembered) -> std::io::Result<Appending> {
        let line = to_line(state, &state.keys)?;
        let temporary = self.dir.join(format!("{FILE}.tmp"));
        let mut file = File::create(&temporary)?;
        file.write_all(&line)?;
        file.sync_all()?;
        std::fs::rename(&temporary, self.path())?;
        Ok(Appending {
            file,
            first: line.len() as u64,
            after: 0,
        })
    }
}

/// A line of `state`'s day, replicas and degraded, and of `keys`.
fn to_line<K: Serialize>(state: &Remembered, keys: &K) -> std::io::Result<Vec<u8>> {
    let record = Record {
        version: VERSION,
        day: state.day.format(DAY).map_err(std::io::Error::other)?,
        replicas: state.replicas,
        degraded: state.degraded,
        keys,
    };
    let mut line = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
    line.push(b'\n');
    Ok(line)
}

/// Writes `remembered` whole in `dir`, as a keeper that took it.
#[cfg(test)]
pub fn write(dir: &Path, remembered: &Remembered) -> std::io::Result<()> {
    let mut keeper = Keeper::new(dir.to_owned(), None);
    keeper.take(Update {
        day: remembered.day,
        replicas: remembered.replicas,
        degraded: remembered.degraded,
        keys: Shares::Every(remembered.keys.clone()),
    });
    keeper.write()
}

#[cfg(test)]
mod tests {
    use time::macros::date;

    use super::*;

    fn share(n: u64) -> KeyShare {
        KeyShare {
            fleet: [20_000_000 + n, 50_000_000 + n, 1_000],
            counted: [10_000_000, 30_000_000 + n],
            settled: [5_000, 5_000],
        }
    }

    fn remembered(keys: u64) -> Remembered {
        Remembered {
            day: date!(2026 - 12 - 07),
            replicas: 3,
            degraded: true,
            keys: (0..keys).map(|n| (format!("key-{n}"), share(n))).collect(),
        }
    }

    /// What `keeper` takes as what moved since `from`, to be `to`.
    fn moved(from: &Remembered, to: &Remembered) -> Update {
        let mut keys: Vec<(String, Option<KeyShare>)> = (to.keys.iter())
            .filter(|(key, share)| from.keys.get(*key) != Some(share))
            .map(|(key, share)| (key.clone(), Some(*share)))
            .collect();
        keys.extend(
            (from.keys.keys())
                .filter(|key| !to.keys.contains_key(*key))
                .map(|key| (key.clone(), None)),
        );
        Update {
            day: to.day,
            replicas: to.replicas,
            degraded: to.degraded,
            keys: Shares::Moved(keys),
        }
    }

    fn every(to: &Remembered) -> Update {
        Update {
            day: to.day,
            replicas: to.replicas,
            degraded: to.degraded,
            keys: Shares::Every(to.keys.clone()),
        }
    }

    fn file(dir: &Path) -> Vec<u8> {
        std::fs::read(path(dir)).unwrap()
    }

    fn lines(dir: &Path) -> usize {
        file(dir).iter().filter(|&&b| b == b'\n').count()
    }

    #[test]
    fn what_is_written_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None, "nothing written yet");
        let mut keeper = Keeper::new(dir.path().to_owned(), None);
        let first = remembered(3);
        assert!(keeper.take(every(&first)));
        keeper.write().unwrap();
        assert_eq!(read(dir.path()), Some(first.clone()));
        // A key moved, one is no longer kept, one is new, and Redis is
        // back: one line more.
        let mut later = first.clone();
        later.degraded = false;
        later.keys.get_mut("key-1").unwrap().settled = [0, 0];
        later.keys.remove("key-2");
        later.keys.insert("new".into(), share(7));
        assert!(keeper.take(moved(&first, &later)));
        keeper.write().unwrap();
        assert_eq!(read(dir.path()), Some(later.clone()));
        assert_eq!(lines(dir.path()), 2);
        // Nothing moved, or only back to what the file holds: nothing
        // to write.
        assert!(!keeper.take(moved(&later, &later)));
        assert!(!keeper.take(every(&later)));
        // The day and replicas alone.
        let mut next_day = later.clone();
        next_day.day = date!(2026 - 12 - 08);
        next_day.replicas = 1;
        assert!(keeper.take(moved(&later, &next_day)));
        keeper.write().unwrap();
        assert_eq!(read(dir.path()), Some(next_day));
    }

    #[test]
    fn a_write_of_one_key_moved_among_many_appends_that_key_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut keeper = Keeper::new(dir.path().to_owned(), None);
        let many = remembered(10_000);
        keeper.take(every(&many));
        keeper.write().unwrap();
        let whole = file(dir.path());
        let mut later = many.clone();
        later.keys.get_mut("key-5000").unwrap().fleet[0] += 1;
        assert!(keeper.take(moved(&many, &later)));
        keeper.write().unwrap();
        let after = file(dir.path());
        assert!(
            after.starts_with(&whole),
            "the file as it was: {} bytes, then {}",
            whole.len(),
            after.len()
        );
        let appended = after.len() - whole.len();
        assert!(
            appended < 200,
            "{appended} bytes appended, of a file of {}",
            whole.len()
        );
        assert_eq!(read(dir.path()), Some(later.clone()));
        // Every key taken (after an exchange that read every one), of
        // which one moved: that one is appended.
        let mut reread = later.clone();
        reread.keys.get_mut("key-7").unwrap().fleet[2] = 0;
        assert!(keeper.take(every(&reread)));
        keeper.write().unwrap();
        let appended = file(dir.path()).len() - after.len();
        assert!(appended < 200, "{appended} bytes appended");
        assert_eq!(read(dir.path()), Some(reread));
    }

    #[test]
    fn once_the_appended_lines_would_outgrow_the_first_the_file_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut keeper = Keeper::new(dir.path().to_owned(), None);
        let mut state = remembered(4);
        keeper.take(every(&state));
        keeper.write().unwrap();
        let first = file(dir.path()).len();
        let mut most = 0;
        for n in 0..40 {
            let before = state.clone();
            state.keys.get_mut("key-2").unwrap().fleet[0] += n;
            keeper.take(moved(&before, &state));
            keeper.write().unwrap();
            assert_eq!(read(dir.path()), Some(state.clone()), "write {n}");
            let length = file(dir.path()).len();
            assert!(
                length <= 2 * first,
                "{length} bytes of a first line of {first}"
            );
            most = most.max(lines(dir.path()));
            if n > 10 && lines(dir.path()) == 1 {
                assert!(most > 2, "lines were appended before");
                return;
            }
        }
        panic!("never written whole again");
    }

    #[test]
    fn a_last_line_cut_anywhere_leaves_the_state_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut keeper = Keeper::new(dir.path().to_owned(), None);
        let a = remembered(3);
        let mut b = a.clone();
        b.keys.get_mut("key-0").unwrap().fleet[0] += 1;
        b.degraded = false;
        let mut c = b.clone();
        c.keys.remove("key-1");
        c.replicas = 2;
        let mut ends = Vec::new();
        for update in [every(&a), moved(&a, &b), moved(&b, &c)] {
            keeper.take(update);
            keeper.write().unwrap();
            ends.push(file(dir.path()).len());
        }
        assert_eq!(lines(dir.path()), 3);
        let whole = file(dir.path());
        for cut in ends[0]..=whole.len() {
            std::fs::write(path(dir.path()), &whole[..cut]).unwrap();
            // A line is whole without its newline.
            let expected = if cut + 1 >= ends[2] {
                &c
            } else if cut + 1 >= ends[1] {
                &b
            } else {
                &a
            };
            assert_eq!(read(dir.path()).as_ref(), Some(expected), "cut at {cut}");
        }
        // A keeper that did not write the file writes it whole: nothing is
        // appended after a line cut short.
        std::fs::write(path(dir.path()), &whole[..ends[1] + 5]).unwrap();
        let found = read(dir.path()).unwrap();
        assert_eq!(found, b);
        let mut keeper = Keeper::new(dir.path().to_owned(), Some(found));
        keeper.take(moved(&b, &c));
        keeper.write().unwrap();
        assert_eq!(lines(dir.path()), 1);
        assert_eq!(read(dir.path()), Some(c));
    }

    #[test]
    fn a_file_cut_in_its_first_line_edited_or_not_ours_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &remembered(1)).unwrap();
        let whole = file(dir.path());
        for cut in [0, 1, whole.len() / 2, whole.len() - 2] {
            std::fs::write(path(dir.path()), &whole[..cut]).unwrap();
            assert_eq!(read(dir.path()), None, "cut at {cut}");
        }
        let good = r#"{"version":2,"day":"2026-12-07","replicas":1,"degraded":false,"keys":{}}"#;
        for text in [
            "\u{0}\u{ff}garbage".to_owned(),
            good.replace("\"version\":2", "\"version\":3"),
            good.replace("12-07", "13-40"),
            good.replace("\"replicas\":1", "\"replicas\":0"),
            good.replace(
                "{}}",
                r#"{"k":{"fleet":[-1,0,0],"counted":[0,0],"settled":[0,0]}}}"#,
            ),
            good.replace(
                "{}}",
                r#"{"k":{"fleet":[0,0],"counted":[0,0],"settled":[0,0]}}}"#,
            ),
            // The format before this one is a file of one record.
            format!(
                "{}\n{good}\n",
                good.replace("\"version\":2", "\"version\":1")
            ),
            // A line that does not parse, with lines after it.
            format!("{good}\n{{\"version\":2,\n{good}\n"),
            format!("{good}\n\n{good}\n"),
            format!("{good}\n{}\n{good}\n", good.replace("12-07", "12-32")),
        ] {
            std::fs::write(path(dir.path()), &text).unwrap();
            assert_eq!(read(dir.path()), None, "{text}");
        }
    }

    #[test]
    fn a_file_of_the_format_before_is_read_and_then_written_anew() {
        let dir = tempfile::tempdir().unwrap();
        // As the gateway before this one wrote it: one object, no newline.
        let before = r#"{"version":1,"day":"2026-12-07","replicas":3,"degraded":true,"keys":{"key-0":{"fleet":[20000000,50000000,1000],"counted":[10000000,30000000],"settled":[5000,5000]}}}"#;
        std::fs::write(path(dir.path()), before).unwrap();
        let state = remembered(1);
        assert_eq!(read(dir.path()), Some(state.clone()));
        let mut keeper = Keeper::new(dir.path().to_owned(), Some(state.clone()));
        let mut later = state.clone();
        later.degraded = false;
        assert!(keeper.take(moved(&state, &later)));
        keeper.write().unwrap();
        assert!(
            file(dir.path()).starts_with(b"{\"version\":2,"),
            "written whole, anew"
        );
        assert_eq!(read(dir.path()), Some(later));
    }
}
