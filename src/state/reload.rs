//! Swapping the config while serving. A candidate (the config file, or a
//! text sent to `POST /admin/reload`) is parsed and validated whole; an
//! invalid one changes nothing, and neither does an empty one or one that
//! drops every key or the admin token without saying so
//! (`server.allow_anonymous`): a truncated or half-written file never
//! switches auth off. A reload that changes who may call what is logged
//! as a warning. A valid one becomes a new snapshot, swapped
//! in atomically: requests in flight finish on the snapshot they loaded,
//! new ones use the new one, and live state carries over by name.
//!
//! Triggers: the file changing (its directory is watched, so Kubernetes
//! ConfigMap updates, which swap a symlink, are seen; the directory's
//! other files are not; a directory swapped through a link or replaced,
//! as release deploys do, is found within a second and watched anew),
//! SIGHUP (the binary calls [`Reloader::reload_file`]), and the admin
//! endpoint.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use serde::Serialize;

use super::AppState;
use super::Snapshot;
use crate::config::{self, Config, ConfigDiff, Problem};
use crate::health::engine;

/// Reads an environment variable for config validation.
pub type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// File events closer together than this make one reload.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// How often the watched directory is checked to still be the one the
/// config's path leads to.
const DIRECTORY_CHECK: Duration = Duration::from_secs(1);

/// What a reload did.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    /// The candidate became the running config.
    pub applied: bool,
    pub dry_run: bool,
    /// The running config's version after the reload.
    pub version: String,
    pub diff: ConfigDiff,
    /// Changes that take effect only after a restart.
    pub restart_needed: Vec<String>,
}

/// Why a candidate was refused.
#[derive(Debug)]
pub enum ReloadError {
    /// The candidate is invalid: every problem, with its path.
    Invalid(Vec<Problem>),
    /// There is no file to reload from, or it cannot be read.
    NoFile(String),
}

pub struct Reloader {
    env: Env,
    file: Option<PathBuf>,
    /// One reload at a time.
    lock: Mutex<()>,
    /// The version of the file text last tried, valid or not: the watch
    /// retries only when the file really changed.
    last_tried: Mutex<Option<String>>,
    scrapers: Mutex<engine::Scrapers>,
    started: ReadAtStart,
}

impl Reloader {
    pub fn new(
        env: Env,
        file: Option<PathBuf>,
        scrapers: engine::Scrapers,
        started: ReadAtStart,
    ) -> Self {
        Self {
            env,
            file,
            started,
            lock: Mutex::new(()),
            last_tried: Mutex::new(None),
            scrapers: Mutex::new(scrapers),
        }
    }
}

/// Reads the config file once it holds still: the same size and
/// modification time before and after the read, so a file being written is
/// not taken half-way. Gives up and returns the last read after a few
/// tries; validation then judges it.
fn read_settled(path: &Path) -> std::io::Result<String> {
    let stamp = |path: &Path| std::fs::metadata(path).map(|m| (m.len(), m.modified().ok()));
    let mut text = String::new();
    for _ in 0..5 {
        let before = stamp(path)?;
        text = std::fs::read_to_string(path)?;
        if stamp(path)? == before {
            break;
        }
        std::thread::sleep(DEBOUNCE);
    }
    Ok(text)
}

/// What a candidate takes away from the gateway's protection: every key,
/// the admin token or the metrics token, where the running config has them,
/// or the keys a paid backend needs on the address the gateway listens on
/// ([`config::open_to_network`]). A reload never does that by accident:
/// only a candidate with `server.allow_anonymous = true`.
fn weakened_access(old: &Config, new: &Config) -> Vec<Problem> {
    if new.server.allow_anonymous {
        return Vec::new();
    }
    let mut problems = Vec::new();
    if !old.keys.is_empty() && new.keys.is_empty() {
        problems.push(Problem::new(
            "keys",
            format!(
                "the candidate has no [[keys]], so anyone who can reach the gateway could use it \
                 (the running config has {}); if that is meant, set server.allow_anonymous = true",
                old.keys.len()
            ),
        ));
    } else if let Some(open) = config::open_to_network(new, old.server.listen) {
        // The running address: `serve --listen` may override the file's.
        problems.push(open);
    }
    if old.admin.token_sha256.is_some() && new.admin.token_sha256.is_none() {
        problems.push(Problem::new(
            "admin.token_env",
            "the candidate drops the admin token, which turns the admin API off; \
                      if that is meant, set server.allow_anonymous = true",
        ));
    }
    if old.metrics.token_sha256.is_some() && new.metrics.token_sha256.is_none() {
        problems.push(Problem::new(
            "metrics.token_env",
            "the candidate drops the metrics token, which opens /metrics (key names \
                      and spend) to anyone; if that is meant, set server.allow_anonymous = true",
        ));
    }
    problems
}

/// Where a candidate narrows whom the Llama licence's EU rule covers, while
/// it still guards a multimodal Llama deployment: a region of
/// `policy.eu_regions` left out, or an EU `policy.default_region` dropped
/// or moved out of the EU. A file cut short before its `[policy]` does
/// both, and users in the EU would then reach those deployments: such a
/// change is applied by a restart, never by a reload.
fn narrowed_eu_rule(old: &Config, new: &Config) -> Vec<Problem> {
    let (was, now) = (&old.policy, &new.policy);
    let guarded = |c: &Config| {
        c.policy.llama_eu_multimodal_block
            && c.models
                .iter()
                .flat_map(|m| &m.deployments)
                .any(|d| d.is_llama() && d.multimodal)
    };
    if !guarded(old) || !guarded(new) {
        return Vec::new();
    }
    let takes = "; users in the EU could then reach multimodal Llama deployments, so a \
                 reload does not do it: if that is meant, restart the gateway with this config";
    let mut problems = Vec::new();
    let dropped: Vec<&str> = was
        .eu_regions
        .iter()
        .filter(|r| !now.is_eu(r))
        .map(String::as_str)
        .collect();
    if !dropped.is_empty() {
        problems.push(Problem::new(
            "policy.eu_regions",
            format!(
                "the candidate no longer treats \"{}\" as the EU{takes}",
                dropped.join("\", \"")
            ),
        ));
    }
    if let Some(region) = was.default_region.as_deref().filter(|r| was.is_eu(r))
        && !now.default_region.as_deref().is_some_and(|r| now.is_eu(r))
    {
        problems.push(Problem::new(
            "policy.default_region",
            format!(
                "the candidate {} the default region \"{region}\", an EU one, so requests that \
                 name no region are no longer from the EU{takes}",
                if now.default_region.is_some() {
                    "changes"
                } else {
                    "drops"
                }
            ),
        ));
    }
    problems
}

/// Who may call what, as a reload changes it: keys added, removed or
/// changed (their models, region, limits or secret), and the admin token.
fn access_changes(diff: &ConfigDiff, old: &Config, new: &Config) -> Vec<String> {
    let mut changes = Vec::new();
    let keys = &diff.keys;
    for (what, names) in [
        ("keys added", &keys.added),
        ("keys removed", &keys.removed),
        ("keys changed", &keys.changed),
    ] {
        if !names.is_empty() {
            changes.push(format!("{what}: {}", names.join(", ")));
        }
    }
    if old.keys.is_empty() != new.keys.is_empty() {
        changes.push(if new.keys.is_empty() {
            "no keys: every caller is let in".to_owned()
        } else {
            "keys required: callers without a key are refused".to_owned()
        });
    }
    match (old.admin.token_sha256, new.admin.token_sha256) {
        (Some(_), None) => changes.push("the admin API is off".into()),
        (None, Some(_)) => changes.push("the admin API is on".into()),
        (Some(a), Some(b)) if a != b => changes.push("the admin token changed".into()),
        _ => {}
    }
    match (old.metrics.token_sha256, new.metrics.token_sha256) {
        (Some(_), None) => changes.push("/metrics is open to anyone".into()),
        (None, Some(_)) => changes.push("/metrics needs a token".into()),
        (Some(a), Some(b)) if a != b => changes.push("the metrics token changed".into()),
        _ => {}
    }
    changes
}

/// The settings read once at start, as the gateway started with them:
/// a candidate is compared with these, not with the config before it, so
/// a change still waiting for a restart is still named, and one undone is
/// not.
pub struct ReadAtStart {
    /// As written: `serve --listen` may have overridden the running value.
    listen: serde_json::Value,
    shutdown_grace: Duration,
    ledger: config::LedgerSettings,
    sections: [Option<serde_json::Value>; 3],
}

const SECTIONS_READ_AT_START: [&str; 3] = ["state", "logging", "tracing"];

impl ReadAtStart {
    pub fn of(config: &Config) -> Self {
        Self {
            listen: config.document["server"]["listen"].clone(),
            shutdown_grace: config.server.shutdown_grace,
            ledger: config.ledger.clone(),
            sections: SECTIONS_READ_AT_START.map(|s| config.document.get(s).cloned()),
        }
    }

    /// What `new` sets otherwise than the gateway runs, by field.
    fn restart_needed(&self, new: &Config) -> Vec<String> {
        let new = Self::of(new);
        let mut fields = Vec::new();
        if self.listen != new.listen {
            fields.push("server.listen".to_owned());
        }
        if self.shutdown_grace != new.shutdown_grace {
            fields.push("server.shutdown_grace_ms".to_owned());
        }
        let (a, b) = (&self.ledger, &new.ledger);
        if a.backend != b.backend
            || a.data_dir != b.data_dir
            || a.flush_interval != b.flush_interval
        {
            fields.push("ledger".to_owned());
        }
        for ((section, a), b) in SECTIONS_READ_AT_START
            .iter()
            .zip(&self.sections)
            .zip(&new.sections)
        {
            if a != b {
                fields.push((*section).to_owned());
            }
        }
        fields
    }
}

impl AppState {
    /// Validates `text` (or the config file when `None`) and, unless
    /// `dry_run`, swaps it in.
    pub fn reload(&self, text: Option<String>, dry_run: bool) -> Result<ReloadReport, ReloadError> {
        let reloader = &self.reloader;
        let _one_at_a_time = reloader.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let from_file = text.is_none();
        let text = match text {
            Some(text) => text,
            None => {
                let path = reloader.file.as_ref().ok_or_else(|| {
                    ReloadError::NoFile(
                        "the gateway was not started from a config file; send the candidate config as the body".into(),
                    )
                })?;
                read_settled(path).map_err(|e| {
                    ReloadError::NoFile(format!("cannot read {}: {e}", path.display()))
                })?
            }
        };
        let current = self.snapshot.load_full();
        let invalid = |problems: Vec<Problem>| {
            // A dry run only checks a candidate; the alert on refused
            // reloads is for changes that were meant to apply.
            if !dry_run {
                self.metrics
                    .config_reloads
                    .with_label_values(&["invalid"])
                    .inc();
            }
            for problem in &problems {
                tracing::error!(problem = %problem, "config reload refused; the running config stays");
            }
            ReloadError::Invalid(problems)
        };
        if text.trim().is_empty() {
            return Err(invalid(vec![Problem::new(
                "",
                "the candidate config is empty, as a truncated or half-written file is; \
                          send or save the whole config",
            )]));
        }
        let mut config = config::parse(&text, &*reloader.env).map_err(|p| invalid(p.0))?;
        let mut weakened = weakened_access(&current.config, &config);
        weakened.extend(narrowed_eu_rule(&current.config, &config));
        if !weakened.is_empty() {
            config::locate(&text, &mut weakened);
            return Err(invalid(weakened));
        }
        let report = |applied: bool, config: &Config| ReloadReport {
            applied,
            dry_run,
            version: if applied {
                config.version.clone()
            } else {
                current.config.version.clone()
            },
            diff: config::diff(&current.config, config),
            restart_needed: reloader.started.restart_needed(config),
        };
        if dry_run || (from_file && config.version == current.config.version) {
            return Ok(report(false, &config));
        }
        // The listener stays where it is until a restart.
        config.server.listen = current.config.server.listen;
        let snapshot = Snapshot::rebuild(config, &self.live, Some(&current))
            .map_err(|e| invalid(vec![Problem::new("", e)]))?;
        let done = report(true, &snapshot.config);
        let access = access_changes(&done.diff, &current.config, &snapshot.config);
        let scrapers = engine::spawn(&snapshot.config.backends, &snapshot.live().backends);
        self.snapshot.store(Arc::new(snapshot));
        self.refresh_key_series();
        // The old scrapers stop as they drop.
        *reloader
            .scrapers
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = scrapers;
        self.metrics
            .config_reloads
            .with_label_values(&["applied"])
            .inc();
        self.metrics.set_config_version(&done.version);
        tracing::info!(
            version = done.version,
            from = current.config.version,
            changes = %serde_json::to_string(&done.diff).unwrap_or_default(),
            "config reloaded"
        );
        if !access.is_empty() {
            tracing::warn!(changes = %access.join("; "), "the reload changes who may call the gateway");
        }
        super::take_up_warnings(&self.snapshot.load().config, &self.metrics);
        if !done.restart_needed.is_empty() {
            tracing::warn!(fields = ?done.restart_needed, "these changes take effect after a restart");
        }
        Ok(done)
    }

    /// Reloads from the config file, logging the outcome (file watch and
    /// SIGHUP have no one else to tell). Unless `always`, a file whose text
    /// was already tried is left alone: the watch also sees touches and other
    /// files in the directory changing.
    pub fn reload_file(&self, always: bool) {
        if !always
            && let Some(path) = &self.reloader.file
            && let Ok(text) = std::fs::read_to_string(path)
        {
            let version = config::version(&text);
            let mut last = self
                .reloader
                .last_tried
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.as_deref() == Some(version.as_str()) {
                return;
            }
            *last = Some(version);
        }
        match self.reload(None, false) {
            Ok(report) if !report.applied => {
                tracing::debug!(version = report.version, "config file unchanged");
            }
            Ok(_) | Err(ReloadError::Invalid(_)) => {}
            Err(ReloadError::NoFile(e)) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["invalid"])
                    .inc();
                tracing::error!(error = e, "config reload failed");
            }
        }
    }
}

/// Whether a change to the entries `paths` of the config file's directory
/// `dir` can change the file: they name it, or the entry of `dir` its
/// symlink goes through (a Kubernetes ConfigMap's
/// `tollgate.toml -> ..data/tollgate.toml`, where an update swaps
/// `..data`), read at each such event as an update may retarget it. Other
/// files beside the config (a log, a database) change nothing, and waking
/// the runtime for each of their writes would take CPU from requests. An
/// event that names no path (the kernel's queue overflowed) may hide any
/// change.
fn concerns(paths: &[PathBuf], file: &Path, dir: &Path) -> bool {
    let names = || paths.iter().filter_map(|path| path.file_name());
    if paths.is_empty() || names().any(|name| Some(name) == file.file_name()) {
        return true;
    }
    let Ok(target) = std::fs::read_link(file) else {
        return false;
    };
    // Relative or absolute, the first entry of `dir` on the link's way.
    let through = dir.join(target);
    let Some(Component::Normal(through)) = through.strip_prefix(dir).ok().and_then(|inside| {
        inside
            .components()
            .find(|c| !matches!(c, Component::CurDir))
    }) else {
        return false;
    };
    names().any(|name| name == through)
}

/// Whether `event` may have changed what the config file holds, whole.
/// Opening and reading are events too, and the reload itself reads the
/// file: reacting to them would reload forever. A write, or a file made
/// by opening it, is a writer at work: what it has written so far may
/// parse and still be half the file, however long the writer pauses, so
/// the change is when it closes the file. A rename, a link made, a file
/// removed or its metadata changed, is whole as it happens.
fn change(event: &notify::Event) -> bool {
    match event.kind {
        EventKind::Access(access) => access == AccessKind::Close(AccessMode::Write),
        EventKind::Modify(ModifyKind::Data(_)) => false,
        EventKind::Create(_) => !event.paths.iter().all(|path| opened_anew(path)),
        _ => true,
    }
}

/// A regular file with one name: made by opening it, where a symlink or
/// a hard link made to a file is whole as it appears.
fn opened_anew(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .is_ok_and(|meta| meta.file_type().is_file() && meta.nlink() == 1)
}

/// The directory `dir` leads to, through any link, as the disk knows it:
/// a directory swapped through a link, or moved away and made anew, is
/// another, and a watch, which holds the one it was given, must move.
fn identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Watches the config file's directory and reloads when the file, or the
/// link it goes through, changes, or the directory's path comes to lead
/// to another directory; stops when the returned watcher is dropped or
/// the gateway is.
pub fn watch(app: &Arc<AppState>) -> Result<Option<Arc<Mutex<RecommendedWatcher>>>, String> {
    let Some(file) = app.reloader.file.clone() else {
        return Ok(None);
    };
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let tx_for_checks = tx.clone();
    let (watched, watched_dir) = (file.clone(), dir.clone());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| change(&e) && concerns(&e.paths, &watched, &watched_dir)) {
            // A reload is pending already when the channel is full.
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    let watcher = Arc::new(Mutex::new(watcher));
    let (held, swapped) = (Arc::downgrade(&watcher), tx_for_checks);
    tokio::spawn(async move {
        let mut watching = identity(&dir);
        let mut every = tokio::time::interval(DIRECTORY_CHECK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let Some(watcher) = held.upgrade() else {
                return;
            };
            let now = identity(&dir);
            if now.is_none() || now == watching {
                continue;
            }
            let mut watcher = watcher.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = watcher.unwatch(&dir);
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "the config's directory was replaced: watching the new one");
                    watching = now;
                    let _ = swapped.try_send(());
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config's new directory; retrying");
                }
            }
        }
    });
    let app: Weak<AppState> = Arc::downgrade(app);
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // An editor's save or a ConfigMap swap is several events, and a
            // file may be written in parts: reload once nothing has changed
            // for the debounce interval.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let Some(app) = app.upgrade() else { return };
            // Parsing and building touch the disk and spawn nothing slow,
            // but keep them off the async workers anyway.
            let _ = tokio::task::spawn_blocking(move || app.reload_file(false)).await;
        }
    });
    tracing::info!(file = %file.display(), "watching the config file for changes");
    Ok(Some(watcher))
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn a_change_concerns_the_config_when_it_names_the_file_or_the_entry_its_link_goes_through() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let file = dir.join("tollgate.toml");
        let changed = |names: &[&str]| {
            let paths: Vec<PathBuf> = names.iter().map(|name| dir.join(name)).collect();
            concerns(&paths, &file, dir)
        };
        std::fs::write(&file, "").unwrap();
        assert!(changed(&["tollgate.toml"]));
        assert!(changed(&[]), "an overflow may hide any change");
        assert!(!changed(&["access.log"]));
        assert!(!changed(&["..data"]), "no link, so nothing goes through it");

        let absolute = dir.join("..data").join("tollgate.toml");
        let links = [
            PathBuf::from("..data/tollgate.toml"),
            PathBuf::from("./..data/tollgate.toml"),
            absolute,
        ];
        for target in links {
            std::fs::remove_file(&file).unwrap();
            symlink(&target, &file).unwrap();
            assert!(changed(&["..data_tmp", "..data"]), "{target:?}");
            assert!(!changed(&["..2026_12_06_v2", "access.log"]), "{target:?}");
        }
        std::fs::remove_file(&file).unwrap();
        symlink("../elsewhere/tollgate.toml", &file).unwrap();
        assert!(
            !changed(&["elsewhere"]),
            "out of the directory: not watched"
        );
    }
}
