//! Inbound HTTP: the routes, the shared state, and graceful shutdown.

mod admin;
mod auth;
mod completions;
mod explain;
mod listen;
mod metrics_page;
mod reload;
mod request_id;
mod sse;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::error::GatewayError;
use crate::ledger::{self, Ledger};
use crate::metering::budget::Budgets;
use crate::metrics::Metrics;
use crate::openai::{Endpoint, ModelEntry, ModelList};
use crate::routing::{LiveState, engine};
use crate::snapshot::Snapshot;
use request_id::RequestId;

pub use explain::{ExplainRequest, explain};
pub use reload::{Env, ReloadError, ReloadReport};

pub struct AppState {
    pub snapshot: ArcSwap<Snapshot>,
    /// What routing has learned, by name; outlives any one snapshot.
    pub live: LiveState,
    pub metrics: Arc<Metrics>,
    /// Spend per day, key, model and deployment; durable with a data_dir.
    pub ledger: Arc<Ledger>,
    pub budgets: Arc<Budgets>,
    /// Config reloads, and the engine scrapers of the current snapshot.
    reloader: reload::Reloader,
    draining: AtomicBool,
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

/// A gateway ready to serve: its state and its routes.
pub struct Gateway {
    state: Arc<AppState>,
}

impl Gateway {
    /// Builds the gateway and starts scraping its engines' load metrics;
    /// call it inside the Tokio runtime. Reloads read the process
    /// environment and need a config text (no file).
    pub fn new(config: Config) -> Result<Self, String> {
        Self::with_options(config, GatewayOptions::default())
    }

    pub fn with_options(config: Config, options: GatewayOptions) -> Result<Self, String> {
        let ledger = Arc::new(Ledger::open(config.ledger.data_dir.as_deref())?);
        if ledger.is_durable() {
            ledger::spawn_flusher(&ledger, config.ledger.flush_interval);
        } else {
            tracing::warn!("no [ledger] data_dir: spend is kept in memory and lost on restart");
        }
        let live = LiveState::default();
        let snapshot = Snapshot::build(config, &live)?;
        let scrapers = engine::spawn(&snapshot.config.backends, &snapshot.live().backends);
        let metrics = Arc::new(Metrics::new());
        metrics.set_config_version(&snapshot.config.version);
        Ok(Self {
            state: Arc::new(AppState {
                snapshot: ArcSwap::from_pointee(snapshot),
                live,
                metrics,
                ledger,
                budgets: Arc::default(),
                reloader: reload::Reloader::new(options.env, options.config_file, scrapers),
                draining: AtomicBool::new(false),
            }),
        })
    }

    /// The shared state, for reloading from outside (SIGHUP).
    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/admin/explain", post(admin::explain_plan))
            .route("/admin/spend", get(admin::spend))
            .route("/admin/reload", post(admin::reload))
            .route("/admin/config", get(admin::active_config))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(axum::middleware::from_fn(request_id::tag))
            .with_state(self.state.clone())
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets
    /// requests and streams in flight finish for up to the configured grace
    /// period, and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let grace = self.state.snapshot.load().config.server.shutdown_grace;
        // Held while serving: dropping it stops the watch.
        let _watch = reload::watch(&self.state).map_err(std::io::Error::other)?;
        let state = self.state.clone();
        let drained = listen::accept_until(listener, self.router(), async move {
            shutdown.await;
            state.draining.store(true, Ordering::SeqCst);
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutting down: draining requests in flight"
            );
        })
        .await;
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!("grace period over: closing the connections still open");
        }
        if let Err(e) = self.state.ledger.flush() {
            tracing::error!(error = %e, "could not write the last spend to the ledger");
        }
        Ok(())
    }
}

async fn chat_completions(
    State(app): State<Arc<AppState>>,
    Extension(RequestId(id)): Extension<RequestId>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    completions::handle(app, id, Endpoint::Chat, headers, body).await
}

async fn completions(
    State(app): State<Arc<AppState>>,
    Extension(RequestId(id)): Extension<RequestId>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    completions::handle(app, id, Endpoint::Completions, headers, body).await
}

/// The aliases the caller's key may use, in OpenAI's list shape.
async fn models(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let snapshot = app.snapshot.load_full();
    match auth::authenticate(&snapshot, &headers) {
        Ok(key) => {
            let list = ModelList {
                object: "list",
                data: snapshot
                    .aliases_for(key)
                    .map(|id| ModelEntry {
                        id,
                        object: "model",
                        created: snapshot.created,
                        owned_by: "tollgate",
                    })
                    .collect(),
            };
            json_response(
                StatusCode::OK,
                serde_json::to_vec(&list).expect("model lists serialise"),
            )
        }
        Err(e) => e.into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready while serving; 503 once draining, so load balancers stop sending.
async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    if app.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics_page::render(&app),
    )
        .into_response()
}

async fn not_found(uri: Uri) -> Response {
    GatewayError::not_found(uri.path()).into_response()
}

async fn method_not_allowed() -> Response {
    GatewayError::method_not_allowed().into_response()
}

fn json_response(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    let mut response = (status, body.into()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
