//! The module map holds: no module imports one above it on the request
//! path (docs/architecture.md states the order), and the files of a
//! module import each other without cycles. Read from the sources, so a
//! change that breaks the layering fails here, not in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top to bottom, as docs/architecture.md gives it; a module may use the
/// ones after it. Modules of one rank do not use each other.
const ORDER: &[&[&str]] = &[
    &["server", "economics"],
    &["pipeline"],
    &["routing"],
    &["state"],
    &["store"],
    &["health"],
    &["providers"],
    &["metering"],
    &["licence"],
    &["ledger", "metrics"],
    &["inbound"],
    &["openai"],
    &["error"],
    &["limits"],
    &["config"],
    &[
        "id", "logging", "traces", "framing", "gather", "tls", "redact", "boxed",
    ],
];

fn rank(module: &str) -> usize {
    ORDER
        .iter()
        .position(|rank| rank.contains(&module))
        .unwrap_or_else(|| panic!("module `{module}` is not in ORDER (and docs/architecture.md)"))
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its unit tests, which may reach anywhere.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// The names that follow `prefix::` in `code`, and those inside a
/// `prefix::{…}` group.
fn paths_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let word = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices(prefix) {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            names.extend(group.split(',').map(|p| word(p.trim())));
        } else {
            names.insert(word(rest));
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

/// What a folder's `mod.rs` re-exports: each name, to the file it is in.
fn reexports(dir: &Path) -> BTreeMap<String, PathBuf> {
    let Ok(text) = std::fs::read_to_string(dir.join("mod.rs")) else {
        return BTreeMap::new();
    };
    let mut names = BTreeMap::new();
    for line in text.lines() {
        let Some(path) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((file, items)) = path.split_once("::") else {
            continue;
        };
        let items = items
            .trim_end_matches(';')
            .trim_matches(|c| c == '{' || c == '}');
        for item in items.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            names.insert(item.to_owned(), dir.join(format!("{file}.rs")));
        }
    }
    names
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module a file belongs to (`None` for lib.rs, main.rs).
fn module_of(file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src()).unwrap();
    let mut parts = relative.components();
    let first = parts.next()?.as_os_str().to_str()?.to_owned();
    if parts.next().is_some() {
        Some(first)
    } else {
        let stem = first.strip_suffix(".rs")?;
        (!matches!(stem, "lib" | "main")).then(|| stem.to_owned())
    }
}

#[test]
fn no_module_imports_one_above_it() {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let modules = paths_after(&code(file), "crate::")
            .into_iter()
            .filter(|name| name.starts_with(|c: char| c.is_ascii_lowercase()));
        for used in modules {
            if used != module && rank(&used) <= rank(&module) {
                wrong.push(format!(
                    "{}: `{module}` uses `crate::{used}`",
                    file.strip_prefix(src()).unwrap().display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the order of docs/architecture.md:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_files_of_a_module_import_each_other_without_cycles() {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    // A file `dir/x.rs` uses `super::y` for its sibling `dir/y.rs`, and
    // `super::Name` for the sibling that `dir/mod.rs` re-exports it from.
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for file in &files {
        let dir = file.parent().unwrap();
        if file.file_name().unwrap() == "mod.rs" {
            continue;
        }
        let reexported = reexports(dir);
        for used in paths_after(&code(file), "super::") {
            let sibling = dir.join(format!("{used}.rs"));
            let folder = dir.join(&used).join("mod.rs");
            let target = match reexported.get(&used) {
                Some(file) => file.clone(),
                None if sibling.exists() => sibling,
                None => folder,
            };
            if target.exists() && target != *file {
                edges.entry(file.clone()).or_default().insert(target);
            }
        }
    }
    fn visit(
        at: &PathBuf,
        edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        path: &mut Vec<PathBuf>,
        done: &mut BTreeSet<PathBuf>,
    ) {
        if let Some(start) = path.iter().position(|p| p == at) {
            let cycle: Vec<String> = path[start..]
                .iter()
                .chain([at])
                .map(|p| p.strip_prefix(src()).unwrap().display().to_string())
                .collect();
            panic!("files import each other in a cycle: {}", cycle.join(" -> "));
        }
        if !done.insert(at.clone()) {
            return;
        }
        path.push(at.clone());
        for next in edges.get(at).into_iter().flatten() {
            visit(next, edges, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for file in edges.keys() {
        visit(file, &edges, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_order_here_is_the_order_the_docs_state() {
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .unwrap();
    let stated: String = ORDER
        .iter()
        .filter(|rank| !rank.contains(&"id"))
        .map(|rank| rank.join(" / "))
        .collect::<Vec<_>>()
        .join(" → ");
    assert!(
        docs.contains(&stated),
        "docs/architecture.md should state the order `{stated}`"
    );
}
