//! Where in a config's text a problem's path is written: the line and
//! column of its key (or, for an element of a list, of the element). Found
//! only for problems and warnings about to be reported, in the text's
//! parse or by parsing it again: a valid config of 100,000 keys pays
//! nothing for it.

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
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        Location { line, column }
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
        problem.at = offset_of(document, &problem.path).map(|at| lines.at(at));
    }
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
/// element it ends in.
fn offset_of(document: &DeTable<'_>, path: &str) -> Option<usize> {
    let (mut table, mut array): (_, Option<&DeArray<'_>>) = (Some(document), None);
    let mut offset = None;
    for step in steps(path)? {
        let value = match step {
            Step::Key(key) => {
                let (key, value) = table?.get_key_value(key)?;
                offset = Some(key.span().start);
                value
            }
            Step::Index(index) => {
                let value = array?.get(index)?;
                offset = Some(value.span().start);
                value
            }
        };
        (table, array) = (value.get_ref().as_table(), value.get_ref().as_array());
    }
    offset
}

#[cfg(test)]
mod tests {
    use super::*;

    fn located(text: &str, path: &str) -> Option<(usize, usize)> {
        let mut problems = [Problem::new(path, "")];
        locate(text, &mut problems);
        problems[0].at.map(|at| (at.line, at.column))
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
    fn a_path_not_written_in_the_text_has_no_place() {
        let text = "[server]\nlisten = \"x\"\n[[keys]]\nname = \"a\"\n";
        for path in [
            "server.max_body_bytes",
            "keys[1]",
            "keys[0].region",
            "keys[0].name[0]",
            "ledger.data_dir",
            "server.listen.port",
            "keys[x]",
            "keys.name",
        ] {
            assert_eq!(located(text, path), None, "{path}");
        }
    }

    #[test]
    fn columns_count_characters() {
        let lines = Lines::new("a = \"é\"\nb\n");
        assert_eq!(lines.at(0), Location { line: 1, column: 1 });
        assert_eq!(lines.at(7), Location { line: 1, column: 7 });
        assert_eq!(lines.at(9), Location { line: 2, column: 1 });
    }
}
