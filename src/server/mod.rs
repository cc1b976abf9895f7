//! Inbound HTTP: the routes, the listeners, admin handlers and graceful
//! shutdown. A completion request is handed to `pipeline`.

mod admin;
mod cors;
mod front;
mod http1;
mod http2;
mod listen;
mod metrics_page;
mod request_id;

pub use listen::bind;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use tokio::net::TcpListener;

use crate::config::{Config, Endpoints};
use crate::error::{ErrorShape, GatewayError};
use crate::inbound::Api;
use crate::openai::{Endpoint, ModelEntry, ModelList};
use crate::pipeline::respond::json_response;
use crate::pipeline::{self, admit, auth};
use crate::routing::REGION;
use crate::state::{self, AppState, Snapshot};
use request_id::RequestId;

pub use crate::state::GatewayOptions;

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
        Ok(Self {
            state: Arc::new(AppState::new(config, options)?),
        })
    }

    /// The shared state, for reloading from outside (SIGHUP).
    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    fn router(&self) -> Router {
        // Clients that join a base URL ending in "/" to a path write a
        // trailing slash; it names the same route.
        let api = INFERENCE
            .iter()
            .map(|&(path, api)| (path, inference(api)))
            .chain([
                ("/v1/messages/count_tokens", post(count_tokens)),
                ("/v1/models", get(models)),
            ]);
        let router = api.fold(Router::new(), |router, (path, handler)| {
            router
                .route(path, handler.clone())
                .route(&format!("{path}/"), handler)
        });
        router
            .route("/v1/models/{*id}", get(model))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/admin/explain", post(admin::explain_plan))
            .route("/admin/spend", get(admin::spend))
            .route("/admin/licence", get(admin::licence))
            .route("/admin/status", get(admin::status))
            .route("/admin/reload", post(admin::reload))
            .route("/admin/config", get(admin::active_config))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
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
        let _watch = state::watch(&self.state).map_err(std::io::Error::other)?;
        let sharing = state::share(&self.state);
        let state = self.state.clone();
        let front = front::Front::new(self.state.clone(), self.router());
        let drained = listen::accept_until(listener, front, async move {
            shutdown.await;
            state.start_draining();
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutting down: draining requests in flight"
            );
        })
        .await;
        let mut drained = std::pin::pin!(drained);
        if tokio::time::timeout(grace, &mut drained).await.is_err() {
            tracing::warn!("grace period over: ending the streams still open");
            // Each stream writes its API's error event and is metered
            // before the ledger closes; what is still open after that is
            // closed.
            self.state.end_streams();
            if tokio::time::timeout(LAST_EVENTS, drained).await.is_err() {
                tracing::warn!("closing the connections still open");
            }
        }
        drop(sharing);
        // The last spend and token charges reach the fleet.
        state::exchange(&self.state).await;
        if let Err(e) = self.state.licence.write(&self.state.ledger).await {
            tracing::error!(error = %e, "could not write the last licence counts to the ledger");
        }
        self.state.ledger.close().await;
        if let Some(traces) = &self.state.traces {
            traces.close().await;
        }
        Ok(())
    }
}

/// How long streams ended at the end of the shutdown grace period have
/// to send their last events.
const LAST_EVENTS: std::time::Duration = std::time::Duration::from_secs(1);

/// Anthropic's Messages API.
const MESSAGES: &str = "/v1/messages";

/// The paths of the inference endpoints and the API each serves.
const INFERENCE: [(&str, Api); 5] = [
    ("/v1/chat/completions", Api::OpenAi(Endpoint::Chat)),
    ("/v1/completions", Api::OpenAi(Endpoint::Completions)),
    ("/v1/embeddings", Api::OpenAi(Endpoint::Embeddings)),
    (MESSAGES, Api::Messages),
    ("/v1/responses", Api::Responses),
];

/// `POST` to an inference endpoint from a browser (every other client's
/// goes straight to the pipeline, in `front.rs`): the pipeline, for a
/// client of `api`. The request is taken apart, not extracted from: its
/// headers and id move to the pipeline where extractors would copy them.
fn inference(api: Api) -> MethodRouter<Arc<AppState>> {
    post(
        move |State(app): State<Arc<AppState>>, request: axum::extract::Request| {
            let (mut parts, body) = request.into_parts();
            let id = parts
                .extensions
                .remove::<RequestId>()
                .map_or_else(crate::id::random, |RequestId(id)| id);
            pipeline::handle(app, id, api, parts.headers, body)
        },
    )
}

async fn count_tokens(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    pipeline::count_tokens(&app, &headers, body).await
}

/// The models the caller's key may use in its region, in OpenAI's list
/// shape.
async fn models(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let snapshot = app.snapshot.load_full();
    match servable(&snapshot, &headers) {
        Ok(aliases) => {
            let list = ModelList {
                object: "list",
                data: aliases
                    .into_iter()
                    .map(|id| model_entry(&snapshot, id))
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

/// One model the caller may use (`client.models.retrieve`), or 404
/// `model_not_found` as for a request to it.
async fn model(
    State(app): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let snapshot = app.snapshot.load_full();
    let aliases = match servable(&snapshot, &headers) {
        Ok(aliases) => aliases,
        Err(e) => return e.into_response(),
    };
    // The one way the path can be refused: its percent-escapes decode to
    // bytes that are not UTF-8, which no alias is.
    let Ok(Path(id)) = id else {
        return GatewayError::bad_request(
            "the model id in the path is not UTF-8 once its %-escapes are decoded; send an id that GET /v1/models lists",
            Some("model".into()),
        )
        .into_response();
    };
    let id = id.trim_end_matches('/');
    if aliases.contains(&id) {
        json_response(
            StatusCode::OK,
            serde_json::to_vec(&model_entry(&snapshot, id)).expect("models serialise"),
        )
    } else {
        GatewayError::unknown_model(id, &aliases).into_response()
    }
}

fn servable<'s>(snapshot: &'s Snapshot, headers: &HeaderMap) -> Result<Vec<&'s str>, GatewayError> {
    let key = auth::authenticate(snapshot, headers)?;
    let region = headers.get(&REGION).map(HeaderValue::as_bytes);
    admit::servable_models(snapshot, key, region)
}

/// An alias as a model object, with the endpoints its deployments serve.
fn model_entry<'s>(snapshot: &Snapshot, id: &'s str) -> ModelEntry<'s> {
    let deployments = snapshot
        .model_index(id)
        .map_or(&[][..], |m| &snapshot.config.models[m].deployments[..]);
    let endpoints = Endpoints::NAMES
        .iter()
        .copied()
        .filter(|name| {
            deployments
                .iter()
                .any(|d| d.endpoints.names().any(|n| n == *name))
        })
        .collect();
    ModelEntry {
        id,
        object: "model",
        created: snapshot.created,
        owned_by: "tollgate",
        endpoints,
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready while serving; 503 once draining, so load balancers stop sending.
async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    if app.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn metrics(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = auth::authenticate_metrics(&app.snapshot.load(), &headers) {
        return e.into_response();
    }
    let page = {
        let _scrape = app.scrape.lock().await;
        metrics_page::render(&app)
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        page,
    )
        .into_response()
}

/// Names the request as its line did, without the query, which may hold
/// a secret; a CONNECT's target is an authority, not a path.
async fn not_found(method: Method, uri: Uri) -> Response {
    let target = match uri.path() {
        "" => uri.authority().map_or("", |authority| authority.as_str()),
        path => path,
    };
    GatewayError::not_found(&format!("{method} {target}")).into_response_in(error_shape(&uri))
}

async fn method_not_allowed(
    State(app): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
) -> Response {
    // Without an admin token the admin paths do not exist, whatever the
    // method: a 405 would tell a scanner they do.
    if uri.path().starts_with("/admin/") && app.snapshot.load().config.admin.token_sha256.is_none()
    {
        return not_found(method, uri).await;
    }
    GatewayError::method_not_allowed().into_response_in(error_shape(&uri))
}

/// The error shape of the API a path belongs to: Anthropic's SDKs read
/// Anthropic's under `/v1/messages` (and its batches, which the gateway
/// does not serve), OpenAI's everywhere else.
fn error_shape(uri: &Uri) -> ErrorShape {
    let under_messages = uri
        .path()
        .strip_prefix(MESSAGES)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    if under_messages {
        ErrorShape::Anthropic
    } else {
        ErrorShape::OpenAi
    }
}
