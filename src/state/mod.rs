//! What the gateway holds while it runs: the current config snapshot
//! (swapped whole on reload), the live state that outlives snapshots, the
//! metrics, the spend ledger and budgets.

mod plan_table;
mod reload;
mod shared;
mod snapshot;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

use crate::config::{Config, LedgerSettings, StateSettings};
use crate::health::{LiveState, engine};
use crate::ledger::Ledger;
use crate::licence::{self, LicenceBook};
use crate::metering::budget::{self, Budgets, Period};
use crate::metering::key_series::{KeySeries, OTHER_KEYS};
use crate::metrics::Metrics;
use crate::store::Fleet;
use crate::traces::Traces;

pub use plan_table::{Offers, PlanRow};
pub use reload::{Env, ReloadError, ReloadReport, watch};
pub use shared::{Sharing, exchange, share};
pub use snapshot::{Resolved, Snapshot};

pub struct AppState {
    pub snapshot: ArcSwap<Snapshot>,
    /// What routing has learned, by name; outlives any one snapshot.
    pub live: LiveState,
    pub metrics: Arc<Metrics>,
    /// Spend per day, key, model and deployment; durable with a data_dir,
    /// shared by the fleet with PostgreSQL.
    pub ledger: Arc<Ledger>,
    pub budgets: Arc<Budgets>,
    /// Budgets, limits and upstream pressure shared with the other
    /// replicas (`[state] backend = "redis"`).
    pub fleet: Option<Arc<Fleet>>,
    /// The exporter of request spans (`[tracing]`); `None`: off.
    pub traces: Option<Traces>,
    /// Which keys have series of their own in `/metrics`.
    pub key_series: ArcSwap<KeySeries>,
    /// What each licence served this month and the users of Llama's,
    /// written to the ledger every flush interval.
    pub licence: Arc<LicenceBook>,
    /// Held by a `/metrics` scrape: each clears the live-state gauges
    /// before setting them, so another encoding meanwhile would miss them.
    pub scrape: tokio::sync::Mutex<()>,
    /// Config reloads, and the engine scrapers of the current snapshot.
    reloader: reload::Reloader,
    draining: AtomicBool,
    /// Wakes the streams still open when the shutdown grace period runs
    /// out, so that each ends in its API's shape and is metered.
    closing: Arc<Notify>,
    /// The grace period has run out: what waits for `closing` from now on
    /// would never hear it.
    closed: AtomicBool,
}

/// How a gateway finds its config again when it reloads.
pub struct GatewayOptions {
    /// Reads the environment variables a config names.
    pub env: Env,
    /// The config file: watched, and read again on SIGHUP and
    /// `POST /admin/reload` without a body.
    pub config_file: Option<PathBuf>,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            env: Arc::new(|name| std::env::var(name).ok()),
            config_file: None,
        }
    }
}

impl AppState {
    /// Opens the ledger, builds the first snapshot and starts scraping its
    /// engines' load metrics; call it inside the Tokio runtime.
    pub fn new(config: Config, options: GatewayOptions) -> Result<Self, String> {
        if config.offline {
            return Err(
                "the config was validated without its secrets (offline); serving needs them read"
                    .into(),
            );
        }
        let ledger = Ledger::start(&config.ledger)?;
        let metrics = Arc::new(Metrics::new());
        take_up_warnings(&config, &metrics);
        metrics.state_replicas.set(1);
        let fleet = match &config.state {
            StateSettings::Memory => None,
            StateSettings::Redis(settings) => Some(Arc::new(Fleet::connect(
                settings,
                own_ledger(&config.ledger, &ledger),
                metrics.state_degraded.clone(),
                metrics.state_replicas.clone(),
                &metrics.state_admissions,
            )?)),
        };
        let traces = config.tracing.as_ref().map(Traces::start).transpose()?;
        let book = Arc::new(LicenceBook::default());
        licence::spawn_writer(&book, &ledger, config.ledger.flush_interval);
        let live = LiveState::default();
        if let Some(fleet) = &fleet {
            live.share_limits(fleet.clone());
        }
        let snapshot = Snapshot::build(config, &live)?;
        let scrapers = engine::spawn(&snapshot.config.backends, &snapshot.live().backends);
        let started = reload::ReadAtStart::of(&snapshot.config);
        metrics.set_config_version(&snapshot.config.version);
        let key_series = KeySeries::of(&snapshot.config, |key| {
            budget::spent_in(&ledger, key, Period::Monthly, budget::today())
        });
        Ok(Self {
            key_series: ArcSwap::from_pointee(key_series),
            snapshot: ArcSwap::from_pointee(snapshot),
            live,
            metrics,
            ledger,
            budgets: Arc::default(),
            fleet,
            traces,
            licence: book,
            scrape: tokio::sync::Mutex::new(()),
            reloader: reload::Reloader::new(options.env, options.config_file, scrapers, started),
            draining: AtomicBool::new(false),
            closing: Arc::default(),
            closed: AtomicBool::new(false),
        })
    }

    /// Chooses again which keys have series of their own, from this
    /// month's spend (the fleet's, when shared), and removes the cost
    /// series of keys that no longer have theirs: `/metrics` stays within
    /// `top_keys` + the opted-in keys however spend moves.
    pub fn refresh_key_series(&self) {
        let snapshot = self.snapshot.load();
        let today = budget::today();
        let series = KeySeries::of(&snapshot.config, |key| {
            self.fleet
                .as_ref()
                .and_then(|fleet| fleet.spent(key, Period::Monthly, today))
                .unwrap_or_else(|| budget::spent_in(&self.ledger, key, Period::Monthly, today))
        });
        if let KeySeries::Only(keys) = &series {
            self.metrics
                .remove_key_series(|key| key != OTHER_KEYS && !keys.contains(key));
        }
        self.key_series.store(Arc::new(series));
    }

    /// From now on `/readyz` answers 503, so load balancers stop sending.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Resolves once the shutdown grace period has run out; made when a
    /// stream starts, so that it hears of it whenever it next waits.
    pub fn grace_over(&self) -> OwnedNotified {
        self.closing.clone().notified_owned()
    }

    /// The shutdown grace period ran out: every open stream ends now.
    pub fn end_streams(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.closing.notify_waiters();
    }

    /// Whether the shutdown grace period has run out.
    pub fn streams_ended(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A ledger kept in a data_dir (SQLite, or PostgreSQL's spool), which
/// keeps this replica's own spend across restarts: the fleet keeps what it
/// learns of budgets beside it, for a restart while Redis is away.
fn own_ledger(settings: &LedgerSettings, ledger: &Arc<Ledger>) -> Option<(PathBuf, Arc<Ledger>)> {
    let dir = settings.data_dir.as_ref()?;
    Some((dir.clone(), ledger.clone()))
}

/// What `tollgate check` warns of in a config the gateway serves (a key
/// or token short enough to guess, a way for an EU user to reach a
/// multimodal Llama, a Llama model id without its licence), logged and
/// counted whenever a config is taken up, so that an alert can see it.
fn take_up_warnings(config: &Config, metrics: &Metrics) {
    for warning in &config.warnings {
        tracing::warn!(%warning, "config warning (`tollgate check` lists them all)");
    }
    metrics
        .config_warnings
        .set(i64::try_from(config.warnings.len()).unwrap_or(i64::MAX));
}
