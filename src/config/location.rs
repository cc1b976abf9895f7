//! Where in a config's text a problem's path is written: the line and
//! column of its key (or, for an element of a list, of the element), or,
//! for a path the text does not write (a missing field, a default), of
//! the nearest table or list above it that the text writes. Found only for
//! problems and warnings about to be reported, in the text's parse or by
//! parsing it again: a valid config of 100,000 keys pays nothing for it.

use std::fmt;

use serde::Serialize;

use toml::de::{DeArray, DeTable};

use super::Problem;

/// A place in the config text, both counted from 1; the column in
/// characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Location {
    pub line: usize,
    pub column: usize,
    /// False for the place of what holds a path the text does not write.
    #[serde(skip_serializing_if = "is_true")]
    pub written: bool,
}

fn is_true(written: &bool) -> bool {
    *written
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.written {
            f.write_str("not written: it goes under ")?;
        }
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// The offsets at which the lines of a text start, to place many offsets
/// with one pass over the text.
pub(super) struct Lines<'t> {
    text: &'t str,
    starts: Vec<usize>,
}

impl<'t> Lines<'t> {
    pub(super) fn new(text: &'t str) -> Self {
        let starts = std::iter::once(0)
            .chain(memchr::memchr_iter(b'\n', text.as_bytes()).map(|at| at + 1))
            .collect();
        Self { text, starts }
    }

    pub(super) fn at(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|&start| start <= offset);
        let start = self.starts[line - 1];
        let column = self
            .text
            .get(start..offset)
            .map_or(1, |before| before.chars().count() + 1);
        Location {
            line,
            column,
            written: true,
        }
    }

    /// The place of `offset`, as [`offset_of`] gives it.
    fn of(&self, (offset, written): (usize, bool)) -> Location {
        Location {
            written,
            ..self.at(offset)
        }
    }
}

/// Gives each problem not yet placed the place of its path in `text`; a
/// path that is not written there (its value is a default, or missing)
/// stays without one.
pub fn locate(text: &str, problems: &mut [Problem]) {
    if !problems.iter().any(unplaced) {
        return;
    }
    if let Ok(document) = DeTable::parse(text) {
        place(text, document.get_ref(), problems);
    }
}

/// As [`locate`], in `document` parsed from `text` already, whole or but
/// for some tables (a path in those stays unplaced).
pub(super) fn place(text: &str, document: &DeTable<'_>, problems: &mut [Problem]) {
    if !problems.iter().any(unplaced) {
        return;
    }
    let lines = Lines::new(text);
    for problem in problems.iter_mut().filter(|p| unplaced(p)) {
        problem.at = offset_of(document, &problem.path).map(|at| lines.of(at));
    }
}

/// Places the problems in `[[keys]]` tables by parsing only the tables
/// they are in: the text of a config of 100,000 keys takes about 0.4 s to
/// parse again, one key's table microseconds. A key is found as the
/// text's `index`-th `[[keys]]` header, its table running to the next
/// header but its own sub-tables'. Returns whether a problem in `keys`
/// is left that only a parse of the whole text can place: one whose key
/// is not written so (an inline array of tables), or `keys` itself. One
/// whose key's table is found but does not write its path (a missing
/// field) has no place there either.
pub(super) fn place_in_keys(text: &str, problems: &mut [Problem]) -> bool {
    let in_keys = |p: &Problem| unplaced(p) && p.path.starts_with("keys");
    if !problems.iter().any(in_keys) {
        return false;
    }
    let (mut tables, lines) = (None, Lines::new(text));
    let mut left = false;
    for problem in problems.iter_mut().filter(|p| unplaced(p)) {
        if problem.path == "keys" {
            left = true;
            continue;
        }
        let Some((index, rest)) = key_of(&problem.path) else {
            continue;
        };
        let tables = tables.get_or_insert_with(|| key_tables(text));
        let table = tables
            .get(index)
            .and_then(|&(start, end)| Some((start, DeTable::parse(&text[start..end]).ok()?)));
        let Some((start, table)) = table else {
            left = true;
            continue;
        };
        problem.at = offset_of(table.get_ref(), &format!("keys[0]{rest}"))
            .map(|(at, written)| lines.of((start + at, written)));
    }
    left
}

/// `keys[12].budget` as 12 and `.budget`.
fn key_of(path: &str) -> Option<(usize, &str)> {
    let (index, rest) = path.strip_prefix("keys[")?.split_once(']')?;
    Some((index.parse().ok()?, rest))
}

/// Where each `[[keys]]` table starts and ends in `text`, in order.
fn key_tables(text: &str) -> Vec<(usize, usize)> {
    let mut tables: Vec<(usize, usize)> = Vec::new();
    let mut open = None;
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', text.as_bytes())
        .map(|at| at + 1)
        .chain(std::iter::once(text.len()))
    {
        let line = text[start..end].trim();
        let line = line
            .split_once('#')
            .map_or(line, |(before, _)| before.trim_end());
        if line.starts_with('[') {
            let own = line.starts_with("[keys.") || line.starts_with("[[keys.");
            if !own {
                tables.extend(open.take().map(|open| (open, start)));
            }
            if line == "[[keys]]" {
                open = Some(start);
            }
        }
        start = end;
    }
    tables.extend(open.map(|open| (open, text.len())));
    tables
}

fn unplaced(problem: &Problem) -> bool {
    problem.at.is_none() && !problem.path.is_empty()
}

/// One step of a path: `name` or `[index]`.
enum Step<'p> {
    Key(&'p str),
    Index(usize),
}

/// `models[1].deployments[0].backend` as its steps; `None` for a path
/// not written in that notation.
fn steps(path: &str) -> Option<Vec<Step<'_>>> {
    let mut steps = Vec::new();
    for part in path.split('.') {
        let (key, mut indices) = part.split_at(part.find('[').unwrap_or(part.len()));
        steps.push(Step::Key(key));
        while let Some(rest) = indices.strip_prefix('[') {
            let (index, after) = rest.split_once(']')?;
            steps.push(Step::Index(index.parse().ok()?));
            indices = after;
        }
        if !indices.is_empty() {
            return None;
        }
    }
    Some(steps)
}

/// The offset in the text of the key `path` ends in, or of the list
/// element it ends in, and `true`; for a path the text does not write,
/// of the nearest key or element above it that it writes, and `false`.
fn offset_of(document: &DeTable<'_>, path: &str) -> Option<(usize, bool)> {
    let (mut table, mut array): (_, Option<&DeArray<'_>>) = (Some(document), None);
    let mut offset = None;
    for step in steps(path)? {
        let found = match step {
            Step::Key(key) => table
                .and_then(|table| table.get_key_value(key))
                .map(|(key, value)| (key.span().start, value)),
            Step::Index(index) => array
                .and_then(|array| array.get(index))
                .map(|value| (value.span().start, value)),
        };
        let Some((at, value)) = found else {
            return offset.map(|at| (at, false));
        };
        offset = Some(at);
        (table, array) = (value.get_ref().as_table(), value.get_ref().as_array());
    }
    offset.map(|at| (at, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where `path` is written in `text`: its line and column.
    fn located(text: &str, path: &str) -> Option<(usize, usize)> {
        placed(text, path)
            .filter(|at| at.written)
            .map(|at| (at.line, at.column))
    }

    fn placed(text: &str, path: &str) -> Option<Location> {
        let mut problems = [Problem::new(path, "")];
        locate(text, &mut problems);
        problems[0].at
    }

    #[test]
    fn a_path_is_placed_at_its_key_or_its_element_however_the_toml_writes_it() {
        let text = "\
[server]
listen = \"x\"

[[keys]]
name = \"a\"

[[keys]]
name = \"b\"
models = [\"m\",
  \"nope\"]
budget = { daily_usd = -1 }
state.url = \"u\"
";
        assert_eq!(located(text, "server"), Some((1, 2)));
        assert_eq!(located(text, "server.listen"), Some((2, 1)));
        assert_eq!(located(text, "keys[0]"), Some((4, 1)));
        assert_eq!(located(text, "keys[1].name"), Some((8, 1)));
        assert_eq!(located(text, "keys[1].models[1]"), Some((10, 3)));
        assert_eq!(located(text, "keys[1].budget.daily_usd"), Some((11, 12)));
        assert_eq!(located(text, "keys[1].state.url"), Some((12, 7)));
    }

    #[test]
    fn a_path_not_written_is_placed_under_what_holds_it_if_anything_does() {
        let text = "[server]\nlisten = \"x\"\n[[keys]]\nname = \"a\"\n";
        for (path, under) in [
            ("server.max_body_bytes", Some((1, 2))),
            ("keys[1]", Some((3, 3))),
            ("keys[0].region", Some((3, 1))),
            ("keys[0].name[0]", Some((4, 1))),
            ("server.listen.port", Some((2, 1))),
            ("ledger.data_dir", None),
            ("keys[x]", None),
            ("keys.name", Some((3, 3))),
        ] {
            let at = placed(text, path);
            assert!(at.is_none_or(|at| !at.written), "{path}");
            assert_eq!(at.map(|at| (at.line, at.column)), under, "{path}");
        }
        let mut problem = Problem::new("keys[0].region", "is required here");
        locate(text, std::slice::from_mut(&mut problem));
        assert_eq!(
            problem.to_string(),
            "keys[0].region: is required here (not written: it goes under line 3, column 1)"
        );
    }

    #[test]
    fn a_problem_in_a_key_is_placed_from_its_table_alone_as_from_the_whole_text() {
        let text = "\
[server]
listen = \"x\"

[[keys]]
name = \"a\"
[keys.budget]
daily_usd = -1

[[backends]]
name = \"b\"

  [[keys]]  # the second
name = \"b\"
models = [\"m\",
  \"nope\"]
[[keys.extra]]
x = 1

[[keys]]
name = \"c\"
budget = { daily_usd = -1 }
";
        for path in [
            "keys[0]",
            "keys[0].name",
            "keys[0].budget.daily_usd",
            "keys[1]",
            "keys[1].name",
            "keys[1].models[1]",
            "keys[1].extra[0].x",
            "keys[2].budget.daily_usd",
            "keys[2].region",
            "keys[3].name",
        ] {
            let mut problems = [Problem::new(path, "")];
            let left = place_in_keys(text, &mut problems);
            // Only a key with no table of its own is left for the whole text.
            assert_eq!(left, path == "keys[3].name", "{path}");
            if !left {
                assert_eq!(problems[0].at, placed(text, path), "{path}");
            }
        }
        let inline = "keys = [{ name = \"a\" }]\n";
        let mut problems = [Problem::new("keys[0].name", "")];
        assert!(place_in_keys(inline, &mut problems));
        assert_eq!(problems[0].at, None);
    }

    #[test]
    fn columns_count_characters() {
        let lines = Lines::new("a = \"é\"\nb\n");
        let at = |offset| {
            let at = lines.at(offset);
            (at.line, at.column)
        };
        assert_eq!(at(0), (1, 1));
        assert_eq!(at(7), (1, 7));
        assert_eq!(at(9), (2, 1));
    }
}
