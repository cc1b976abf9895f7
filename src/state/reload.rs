//! Swapping the config while serving. A candidate (the config file, or a
//! text sent to `POST /admin/reload`) is parsed and validated whole; an
//! invalid one changes nothing. A valid one becomes a new snapshot, swapped
//! in atomically: requests in flight finish on the snapshot they loaded,
//! new ones use the new one, and live state carries over by name.
//!
//! Triggers: the file changing (its directory is watched, so Kubernetes
//! ConfigMap updates, which swap a symlink, are seen), SIGHUP (the binary
//! calls [`Reloader::reload_file`]), and the admin endpoint.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
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
}

impl Reloader {
    pub fn new(env: Env, file: Option<PathBuf>, scrapers: engine::Scrapers) -> Self {
        Self {
            env,
            file,
            lock: Mutex::new(()),
            last_tried: Mutex::new(None),
            scrapers: Mutex::new(scrapers),
        }
    }
}

/// The settings read once at start.
fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let mut fields = Vec::new();
    // As written: `serve --listen` may have overridden the running value.
    let listen = |c: &Config| c.document["server"]["listen"].clone();
    if listen(old) != listen(new) {
        fields.push("server.listen".to_owned());
    }
    if old.server.shutdown_grace != new.server.shutdown_grace {
        fields.push("server.shutdown_grace_ms".to_owned());
    }
    if old.ledger.data_dir != new.ledger.data_dir
        || old.ledger.flush_interval != new.ledger.flush_interval
    {
        fields.push("ledger".to_owned());
    }
    fields
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
                std::fs::read_to_string(path).map_err(|e| {
                    ReloadError::NoFile(format!("cannot read {}: {e}", path.display()))
                })?
            }
        };
        let current = self.snapshot.load_full();
        let invalid = |problems: Vec<Problem>| {
            self.metrics
                .config_reloads
                .with_label_values(&["invalid"])
                .inc();
            for problem in &problems {
                tracing::error!(problem = %problem, "config reload refused; the running config stays");
            }
            ReloadError::Invalid(problems)
        };
        let mut config = config::parse(&text, &*reloader.env).map_err(|p| invalid(p.0))?;
        let report = |applied: bool, config: &Config| ReloadReport {
            applied,
            dry_run,
            version: if applied {
                config.version.clone()
            } else {
                current.config.version.clone()
            },
            diff: config::diff(&current.config, config),
            restart_needed: restart_needed(&current.config, config),
        };
        if dry_run || (from_file && config.version == current.config.version) {
            return Ok(report(false, &config));
        }
        // The listener stays where it is until a restart.
        config.server.listen = current.config.server.listen;
        let snapshot = Snapshot::rebuild(config, &self.live, Some(&current)).map_err(|e| {
            invalid(vec![Problem {
                path: String::new(),
                message: e,
            }])
        })?;
        let done = report(true, &snapshot.config);
        let scrapers = engine::spawn(&snapshot.config.backends, &snapshot.live().backends);
        self.snapshot.store(Arc::new(snapshot));
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

/// Watches the config file's directory and reloads when anything in it
/// changes; stops when the returned watcher is dropped or the gateway is.
pub fn watch(app: &Arc<AppState>) -> Result<Option<RecommendedWatcher>, String> {
    let Some(file) = app.reloader.file.clone() else {
        return Ok(None);
    };
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Opening and reading are events too, and the reload itself reads
        // the file: reacting to them would reload forever. Closing a file
        // that was written is a change.
        let change = |kind: &EventKind| match kind {
            EventKind::Access(access) => *access == AccessKind::Close(AccessMode::Write),
            _ => true,
        };
        if event.is_ok_and(|e| change(&e.kind)) {
            // A reload is pending already when the channel is full.
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    let app: Weak<AppState> = Arc::downgrade(app);
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // An editor's save or a ConfigMap swap is several events: let
            // them settle, then reload once.
            tokio::time::sleep(DEBOUNCE).await;
            let _ = rx.try_recv();
            let Some(app) = app.upgrade() else { return };
            // Parsing and building touch the disk and spawn nothing slow,
            // but keep them off the async workers anyway.
            let _ = tokio::task::spawn_blocking(move || app.reload_file(false)).await;
        }
    });
    tracing::info!(file = %file.display(), "watching the config file for changes");
    Ok(Some(watcher))
}
