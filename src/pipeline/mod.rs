//! One inference request's path (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`; `/v1/messages` and `/v1/responses`
//! translated), as named steps:
//!
//! 1. [`auth::authenticate`]: the API key (when keys are configured).
//! 2. [`read_body`]: the body, up to `server.max_body_bytes` (413), then
//!    parsed as the endpoint's request (400 naming the bad field); an
//!    inbound API other than OpenAI's is translated into the canonical
//!    chat request here ([`Api::parse`]).
//! 3. [`admit::admit`]: the alias (404), the key's permission (403), the
//!    region (403), the request's facts and the plan: 451 when policy
//!    leaves no deployment, 503 when health leaves none. `tollgate
//!    explain` and `POST /admin/explain` decide through the same function.
//! 4. [`admit::reserve`]: the key's rate limits (429 with `retry-after`)
//!    and budget (429).
//! 5. [`attempt::attempt`]: the plan's deployments in order, up to
//!    `routing.max_attempts`, each call bounded by the backend's
//!    first-byte timeout; a retriable failure before the client saw a
//!    byte moves on to the next deployment. An alias with a hedge also
//!    sends a request that is slow to its first byte to the next
//!    deployment that fits its allowance ([`hedge`]).
//! 6. [`respond::respond`]: the whole body, or a stream forwarded chunk
//!    by chunk ([`stream::SseBody`]), metered exactly once when it ends or
//!    the client goes away; translated back into the client's API after
//!    the meter has read it.
//!
//! The config snapshot is loaded once, before step 1, and used to the end.

pub mod admit;
pub mod attempt;
pub mod auth;
pub mod hedge;
pub mod respond;
pub mod stream;

use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;

use crate::boxed;
use crate::config::ServerConfig;
use crate::error::{ErrorShape, GatewayError};
use crate::gather::gather;
use crate::inbound::Api;
use crate::licence;
use crate::metering::key_series::OTHER_KEYS;
use crate::metering::{Charges, InFlight, Meter, MeterLabels};
use crate::metrics::NONE;
use crate::openai::Endpoint;
use crate::routing::{PlanStatus, REGION, Rule, SESSION};
use crate::state::{AppState, Snapshot};
use crate::traces::{Outcome, RequestTrace};
use admit::Refusal;

pub const CONFIG_VERSION_HEADER: HeaderName = HeaderName::from_static("x-tollgate-config-version");

/// What one request carries down the pipeline.
pub struct RequestCtx {
    pub request_id: String,
    pub started: Instant,
    pub snapshot: Arc<Snapshot>,
}

/// Serves one completion request; every answer, success or error, says
/// which config served it.
pub async fn handle(
    app: Arc<AppState>,
    request_id: String,
    api: Api,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let ctx = RequestCtx {
        request_id,
        started: Instant::now(),
        snapshot: app.snapshot.load_full(),
    };
    let in_flight = InFlight::new(&app.metrics.in_flight);
    let mut trace = app
        .traces
        .as_ref()
        .map(|traces| traces.request(&headers, ctx.started, operation(api.endpoint())));
    let mut response = match serve(&app, &ctx, api, &headers, body, in_flight, &mut trace).await {
        Ok(response) => response,
        Err(failure) => failure.respond(&app, &ctx, trace, api),
    };
    if let Some(version) = &ctx.snapshot.version_header {
        response
            .headers_mut()
            .insert(CONFIG_VERSION_HEADER, version.clone());
    }
    response
}

async fn serve(
    app: &AppState,
    ctx: &RequestCtx,
    api: Api,
    headers: &HeaderMap,
    body: Body,
    in_flight: InFlight,
    trace: &mut Option<RequestTrace>,
) -> Result<Response, Failure> {
    let snapshot = &*ctx.snapshot;
    let key = auth::authenticate(snapshot, headers)?;
    let bytes = read_body(headers, body, &snapshot.config.server).await?;
    let (request, reply) = api
        .parse(bytes)
        .map_err(|e| compressed(headers).unwrap_or(e))?;
    if let Some(trace) = trace {
        trace.requested(request.model());
    }
    let region = headers.get(&REGION).map(HeaderValue::as_bytes);
    let session = headers.get(&SESSION).map(HeaderValue::as_bytes);
    let admission = admit::admit(snapshot, &request, key, region, session)
        .map_err(|refusal| Failure::refused(app, snapshot, refusal))?;
    admit::remember_prefix(snapshot, app.fleet.as_deref(), &admission);
    let alias = snapshot.config.models[admission.model].alias.as_str();
    let first = &admission.plan.candidates[0];
    let labels = [alias, admission.plan.strategy, first.label];
    snapshot
        .resolved(admission.model, first.deployment)
        .series
        .routing_decision(first.label, || {
            app.metrics.routing_decisions.with_label_values(&labels)
        });
    let (limits, reservation) = admit::reserve(app, snapshot, key, &request, &admission)
        .await
        .map_err(|error| Failure::before_upstream(error, alias))?;
    // Boxed: the meter (680 B) goes down the attempts and into the
    // response's body, and a move of the box copies 8.
    let meter = boxed::built(|| {
        Meter::new(
            app.metrics.clone(),
            MeterLabels {
                request_id: ctx.request_id.clone(),
                api: api.name(),
                alias: alias.to_owned(),
                key: key.map_or(NONE, |k| k.name.as_str()).to_owned(),
                key_in_metrics: key
                    .is_none_or(|k| app.key_series.load().label(&k.name) != OTHER_KEYS),
                user: licence::end_user(&request, headers, &snapshot.config.licence),
            },
            Charges {
                ledger: app.ledger.clone(),
                reservation,
                counterfactuals: snapshot.counterfactuals(admission.model).clone(),
                limits,
                licence: app.licence.clone(),
            },
            ctx.started,
            admission.facts.prompt(),
            in_flight,
            trace.take(),
        )
    });
    let served = attempt::attempt(app, ctx, &request, &admission, meter).await?;
    let attribution = snapshot.config.licence.attribution_header;
    Ok(respond::respond(app, &request, served, reply, attribution))
}

/// A request that ends in an error, and the labels it is recorded under.
pub struct Failure {
    error: GatewayError,
    alias: String,
    backend: String,
    /// Upstream attempts made before giving up; `None` before routing.
    attempts: Option<usize>,
    /// Records the request once upstreams were tried.
    meter: Option<Box<Meter>>,
}

impl From<GatewayError> for Failure {
    /// A failure before the model was known.
    fn from(error: GatewayError) -> Self {
        Self {
            error,
            alias: NONE.to_owned(),
            backend: NONE.to_owned(),
            attempts: None,
            meter: None,
        }
    }
}

impl Failure {
    /// Routed, refused before any upstream was tried.
    fn before_upstream(error: GatewayError, alias: &str) -> Self {
        Self {
            error,
            alias: alias.to_owned(),
            backend: NONE.to_owned(),
            attempts: Some(0),
            meter: None,
        }
    }

    /// Not admitted; policy refusals count the rules that applied.
    fn refused(app: &AppState, snapshot: &Snapshot, refusal: Refusal) -> Self {
        let Refusal { error, model, plan } = refusal;
        let Some(model) = model else {
            return error.into();
        };
        let alias = snapshot.config.models[model].alias.as_str();
        if let Some(plan) = plan.filter(|p| p.status == PlanStatus::Blocked) {
            for rule in plan.rules() {
                if rule == Rule::LlamaEuMultimodal {
                    app.licence.eu_refused();
                }
                app.metrics
                    .policy_blocks
                    .with_label_values(&[alias, rule.name()])
                    .inc();
            }
        }
        Self::before_upstream(error, alias)
    }

    /// After attempts upstream: the meter records it.
    pub fn after_attempts(
        error: GatewayError,
        alias: &str,
        backend: &str,
        attempts: usize,
        meter: Box<Meter>,
    ) -> Self {
        Self {
            error,
            alias: alias.to_owned(),
            backend: backend.to_owned(),
            attempts: Some(attempts),
            meter: Some(meter),
        }
    }

    /// Answers the error, and records the request: through its meter once
    /// it has one, else here (with its trace, if traced).
    fn respond(
        self,
        app: &AppState,
        ctx: &RequestCtx,
        trace: Option<RequestTrace>,
        api: Api,
    ) -> Response {
        let shape = api.error_shape();
        let Self {
            error,
            alias,
            backend,
            attempts,
            meter,
        } = self;
        let error = api.name_params(error);
        let status = error.status_in(shape).as_u16();
        let metrics = &app.metrics;
        metrics
            .errors
            .with_label_values(&[&alias, error.label()])
            .inc();
        tracing::info!(request_id = ctx.request_id, api = api.name(), alias, backend, status, kind = error.label(), error = %error.message(), "request failed");
        match meter {
            Some(mut meter) => {
                meter.failed(error.label());
                meter.finish(status);
            }
            None => {
                metrics.record_request(
                    None,
                    api.name(),
                    &alias,
                    &backend,
                    status,
                    ctx.started.elapsed(),
                );
                if let Some(trace) = trace {
                    trace.finish(&Outcome::refused(status, error.label()));
                }
            }
        }
        let mut response = error.into_response_in(shape);
        // Once routing ran, every answer says how many attempts it took
        // (0 for a refusal) and, after one, which backend answered last.
        if let Some(attempts) = attempts {
            respond::set_served_by(
                &mut response,
                (backend != NONE).then_some(&*backend),
                attempts,
            );
        }
        response
    }
}

/// `POST /v1/messages/count_tokens`: the gateway's estimate of the
/// prompt's tokens (`{"input_tokens": N}`), the one routing and budgets
/// use, for a key that may use the model. Nothing is sent upstream.
pub async fn count_tokens(app: &AppState, headers: &HeaderMap, body: Body) -> Response {
    let snapshot = app.snapshot.load_full();
    let counted = async {
        let key = auth::authenticate(&snapshot, headers)?;
        let bytes = read_body(headers, body, &snapshot.config.server).await?;
        let (request, _) = Api::Messages
            .parse(with_max_tokens(bytes))
            .map_err(|e| compressed(headers).unwrap_or(e))?;
        let region = headers.get(&REGION).map(HeaderValue::as_bytes);
        admit::admit(&snapshot, &request, key, region, None)
            .map(|admission| admission.facts.input_tokens)
            .map_err(|refusal| refusal.error)
    };
    match counted.await {
        Ok(tokens) => respond::json_response(
            axum::http::StatusCode::OK,
            format!("{{\"input_tokens\":{tokens}}}"),
        ),
        Err(error) => error.into_response_in(ErrorShape::Anthropic),
    }
}

/// A count_tokens body, which has no `max_tokens`, as a Messages request.
fn with_max_tokens(bytes: Bytes) -> Bytes {
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes) {
        Ok(mut body) => {
            body.entry("max_tokens").or_insert(1.into());
            serde_json::to_vec(&body)
                .expect("JSON values serialise")
                .into()
        }
        Err(_) => bytes,
    }
}

/// `gen_ai.operation.name` of a request to `endpoint`.
fn operation(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Chat => "chat",
        Endpoint::Completions => "text_completion",
        Endpoint::Embeddings => "embeddings",
    }
}

/// The refusal of a body sent compressed (a `Content-Encoding` but
/// `identity`), which the gateway does not decode. Asked only of a body
/// that did not parse, which a compressed one never does: a request that
/// parses pays no header lookup for it.
pub fn compressed(headers: &HeaderMap) -> Option<GatewayError> {
    headers
        .get(header::CONTENT_ENCODING)
        .filter(|coding| {
            !coding
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"identity")
        })
        .map(|coding| {
            GatewayError::unsupported_encoding(&String::from_utf8_lossy(coding.as_bytes()))
        })
}

/// The request body, refused (413) over `server.max_body_bytes`, whether
/// declared or sent, and (408) when it takes longer than
/// `server.body_timeout_ms` to arrive.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    server: &ServerConfig,
) -> Result<Bytes, GatewayError> {
    let limit = server.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(GatewayError::payload_too_large(limit));
    }
    let body = http_body_util::Limited::new(body, limit);
    let mut read = std::pin::pin!(gather(body, declared.unwrap_or(0)));
    // A body that came with its request head is read at once, without the
    // cost of a timer.
    let read = match std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
        Poll::Ready(read) => read,
        Poll::Pending => tokio::time::timeout(server.body_timeout, read)
            .await
            .map_err(|_| GatewayError::body_timeout(server.body_timeout))?,
    };
    read.map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            return GatewayError::payload_too_large(limit);
        }
        // The server's own reasons, which name no client bytes, under
        // axum's wrapping.
        let said = std::iter::successors(Some(&*e as &dyn std::error::Error), |e| e.source())
            .find_map(|e| e.downcast_ref::<std::io::Error>());
        let (why, fix) = match said {
            Some(why) if why.kind() == std::io::ErrorKind::InvalidData => (
                why,
                "send the body in valid chunks, or whole with a Content-Length",
            ),
            Some(why) if why.kind() == std::io::ErrorKind::UnexpectedEof => {
                (why, "send as many bytes as the Content-Length says")
            }
            _ => return GatewayError::bad_request("the request body could not be read", None),
        };
        GatewayError::bad_request(
            format!("the request body could not be read: {why}; {fix}"),
            None,
        )
    })
}
