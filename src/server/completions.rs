//! The request pipeline for `/v1/chat/completions` and `/v1/completions`.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;

use super::AppState;
use super::auth;
use super::sse::{self, ChunkFacts, SseBody, SseParams};
use crate::config::{Backend, Budget, Deployment, Key};
use crate::error::GatewayError;
use crate::metering::{Charges, InFlight, Meter, MeterLabels, Observed, Serving, budget};
use crate::metrics::NONE;
use crate::openai::{Endpoint, InboundRequest};
use crate::providers::{Chunk, ChunkStream, UpstreamCall, UpstreamReply};
use crate::routing::{self, Attempt, DeploymentQuota, PlanStatus, RequestFacts};
use crate::snapshot::Snapshot;

const BACKEND_HEADER: HeaderName = HeaderName::from_static("x-tollgate-backend");
const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("x-tollgate-attempts");
const CONFIG_VERSION_HEADER: HeaderName = HeaderName::from_static("x-tollgate-config-version");
/// Tells nginx-style proxies in front not to buffer a stream.
const ACCEL_BUFFERING_HEADER: HeaderName = HeaderName::from_static("x-accel-buffering");

/// What one request carries down the pipeline.
struct RequestCtx {
    request_id: String,
    started: Instant,
    snapshot: Arc<Snapshot>,
    in_flight: InFlight,
}

/// Serves one completion request:
///
/// 1. (The `request_id` middleware took the client's `x-request-id` or
///    made one.)
/// 2. Load the config snapshot, once; the request uses it to the end.
/// 3. Authenticate the API key (when keys are configured).
/// 4. Read the body, refusing one over `server.max_body_bytes` (413).
/// 5. Parse it as the endpoint's request (400 naming the bad field).
/// 6. Resolve the model alias (404) and check the key may use it (403).
/// 7. Read the request's facts (region, modality, size, tools) and plan
///    the deployments to try (`routing::plan`): 451 when policy leaves
///    none, 503 when health (circuits, cooldowns, quotas) leaves none.
/// 8. Admit the request against the key's rate limits (a request and its
///    prompt estimate; 429 with `retry-after`) and budget (429).
/// 9. For each deployment, up to `routing.max_attempts`, take a request
///    and the prompt estimate from its quota (at its quota: skipped, not
///    failed), call the provider and wait, within the backend's
///    first-byte timeout, for the whole body or the first stream chunk; a
///    retriable failure moves on to the next deployment, every outcome
///    teaches the deployment's circuit, and every response's
///    `x-ratelimit-*` headers its quota.
/// 10. Answer: the body, or an SSE stream that forwards chunks as they
///     arrive (`sse::SseBody`).
/// 11. Meter usage, latency and status exactly once, at the end of the
///     response or when the client goes away (`metering::Meter`), and
///     charge the key's and deployment's token limits the rest.
pub async fn handle(
    app: Arc<AppState>,
    request_id: String,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let ctx = RequestCtx {
        request_id: request_id.clone(),
        started: Instant::now(),
        snapshot: app.snapshot.load_full(),
        in_flight: InFlight::new(&app.metrics.in_flight),
    };
    let version = HeaderValue::from_str(&ctx.snapshot.config.version).ok();
    let mut response = match serve(&app, ctx, endpoint, &headers, body).await {
        Ok(response) => response,
        Err(failure) => {
            let Failure {
                error,
                alias,
                backend,
                started,
                attempts,
                meter,
            } = failure;
            let status = error.status.as_u16();
            let metrics = &app.metrics;
            metrics
                .errors
                .with_label_values(&[&alias, error.label()])
                .inc();
            tracing::info!(request_id, alias, backend, status, kind = error.label(), error = %error.message, "request failed");
            match meter {
                Some(mut meter) => meter.finish(status),
                None => metrics.record_request(&alias, &backend, status, started.elapsed()),
            }
            let mut response = error.into_response();
            // Once routing ran, every answer says how many attempts it took
            // (0 for a refusal) and, after one, which backend answered last.
            if alias != NONE {
                set_served_by(
                    &mut response,
                    (backend != NONE).then_some(&*backend),
                    attempts,
                );
            }
            response
        }
    };
    // Which config served the request: what a reload changed, per answer.
    if let Some(version) = version {
        response
            .headers_mut()
            .insert(CONFIG_VERSION_HEADER, version);
    }
    response
}

/// An error answer and the labels it is recorded under.
struct Failure {
    error: GatewayError,
    alias: String,
    backend: String,
    started: Instant,
    /// Upstream attempts made before giving up.
    attempts: usize,
    /// Records the request once upstreams were tried.
    meter: Option<Meter>,
}

async fn serve(
    app: &AppState,
    ctx: RequestCtx,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Failure> {
    let started = ctx.started;
    let fail = |alias: &str| {
        let alias = alias.to_owned();
        move |error| Failure {
            error,
            alias,
            backend: NONE.to_owned(),
            started,
            attempts: 0,
            meter: None,
        }
    };
    let snapshot = ctx.snapshot.clone();
    let key = auth::authenticate(&snapshot, headers).map_err(fail(NONE))?;
    let limit = snapshot.config.server.max_body_bytes;
    let bytes = read_body(headers, body, limit).await.map_err(fail(NONE))?;
    let request = InboundRequest::parse(endpoint, bytes).map_err(fail(NONE))?;
    let model_index = resolve(&snapshot, key, request.model()).map_err(fail(NONE))?;
    let model = &snapshot.config.models[model_index];
    let alias = model.alias.as_str();
    let region = routing::region(headers, key, &snapshot.config.policy).map_err(fail(alias))?;
    let facts = RequestFacts::of(&request, region);
    let plan = routing::plan(
        &snapshot,
        model_index,
        &facts,
        Instant::now(),
        &mut fastrand::Rng::new(),
    );
    let metrics = &app.metrics;
    match plan.status {
        PlanStatus::Ready => {
            let first = &plan.candidates[0];
            metrics
                .routing_decisions
                .with_label_values(&[alias, plan.strategy, first.label])
                .inc();
        }
        PlanStatus::Blocked => {
            for rule in plan.rules() {
                metrics
                    .policy_blocks
                    .with_label_values(&[alias, rule.name()])
                    .inc();
            }
            return Err(fail(alias)(routing::refusal(&snapshot, &plan, &facts, key)));
        }
        PlanStatus::Unavailable => {
            return Err(fail(alias)(routing::refusal(&snapshot, &plan, &facts, key)));
        }
    }
    let key_limits = match key {
        Some(key) => {
            let limits = snapshot.key_limits(key);
            limits.admit(facts.input_tokens).map_err(|refused| {
                metrics
                    .rate_limited
                    .with_label_values(&["key", &key.name, refused.limit.name()])
                    .inc();
                fail(alias)(GatewayError::key_rate_limited(
                    &key.name,
                    &refused,
                    facts.input_tokens,
                ))
            })?;
            Some(limits.clone())
        }
        None => None,
    };
    // The estimate is what the dearest deployment in the plan would charge
    // for the prompt and the expected (or requested maximum) output.
    let estimate = plan
        .order()
        .map(|i| {
            snapshot
                .rate(model_index, i)
                .estimate_nano_usd(facts.input_tokens, plan.expected_output)
        })
        .max()
        .unwrap_or(0);
    let reservation = match key {
        Some(key) if key.budget != Budget::default() => Some(
            app.budgets
                .admit(&app.ledger, key, estimate, budget::today())
                .map_err(fail(alias))?,
        ),
        _ => None,
    };
    let mut meter = Meter::new(
        metrics.clone(),
        MeterLabels {
            request_id: ctx.request_id.clone(),
            alias: alias.to_owned(),
            key: key.map_or(NONE, |k| k.name.as_str()).to_owned(),
        },
        Charges {
            ledger: app.ledger.clone(),
            reservation,
            counterfactuals: snapshot.counterfactuals(model_index).clone(),
            limits: key_limits,
        },
        started,
        facts.input_tokens,
        ctx.in_flight,
    );

    let settings = &snapshot.config.routing;
    let mut attempts = 0;
    let mut last_error = None;
    // The soonest a deployment skipped at its quota has room again.
    let mut skipped: Option<Duration> = None;
    for index in plan.order() {
        if attempts == settings.max_attempts {
            break;
        }
        let deployment = &model.deployments[index];
        let live = snapshot.deployment_live(model_index, index);
        // A half-open circuit whose probe another request took is skipped,
        // not failed; so is a deployment at its quota (the attempt, dropped,
        // frees the probe).
        let Some(attempt) = Attempt::begin(live) else {
            continue;
        };
        if let Err(refused) = live.quota.admit(facts.input_tokens, Instant::now()) {
            metrics
                .rate_limited
                .with_label_values(&["deployment", &deployment.name, refused.limit.name()])
                .inc();
            if let Some(wait) = refused.wait {
                skipped = Some(skipped.map_or(wait, |s| s.min(wait)));
            }
            continue;
        }
        attempts += 1;
        let (backend, _) = snapshot.backend(deployment);
        meter.begin_attempt(Serving {
            deployment: deployment.name.clone(),
            backend: backend.name.clone(),
            rate: snapshot.rate(model_index, index),
            lease: snapshot.lease(model_index, index),
        });
        match call(
            app,
            &ctx.request_id,
            &snapshot,
            &request,
            deployment,
            &live.quota,
        )
        .await
        {
            Ok(reply) => {
                attempt.succeeded(facts.stream);
                meter.attempt_answered();
                let served = Served {
                    backend,
                    attempts,
                    meter,
                };
                return Ok(respond(&request, served, reply));
            }
            Err(error) => {
                attempt.failed(&error, settings);
                meter.attempt_failed();
                if !error.retriable {
                    return Err(Failure {
                        error,
                        alias: alias.to_owned(),
                        backend: backend.name.clone(),
                        started,
                        attempts,
                        meter: Some(meter),
                    });
                }
                metrics
                    .failovers
                    .with_label_values(&[alias, &deployment.name, error.label()])
                    .inc();
                tracing::warn!(
                    request_id = ctx.request_id, alias, deployment = deployment.name, error = %error.message,
                    "upstream failed before the first byte; trying the next deployment"
                );
                last_error = Some((error, backend.name.clone()));
            }
        }
    }
    let (error, backend) = last_error.unwrap_or_else(|| {
        (
            GatewayError::no_deployment_available(alias, plan.retry_after_with(skipped)),
            NONE.to_owned(),
        )
    });
    Err(Failure {
        error,
        alias: alias.to_owned(),
        backend,
        started,
        attempts,
        meter: Some(meter),
    })
}

/// What came back from an upstream before the client saw anything.
enum Ready {
    /// A whole response, checked to be JSON, with what the meter needs.
    Complete(Bytes, Observed),
    /// The first chunk, read, and the rest of the stream.
    Stream(Chunk, ChunkFacts, ChunkStream),
}

/// One upstream call, bounded by the backend's first-byte timeout: the
/// whole body, or the first stream chunk peeked so a failure can still
/// become an HTTP error or a failover.
async fn call(
    app: &AppState,
    request_id: &str,
    snapshot: &Snapshot,
    request: &InboundRequest,
    deployment: &Deployment,
    quota: &DeploymentQuota,
) -> Result<Ready, GatewayError> {
    let (backend, provider) = snapshot.backend(deployment);
    let reported = OnceLock::new();
    let call = UpstreamCall {
        request,
        upstream_model: &deployment.upstream_model,
        request_id,
        quota: &reported,
    };
    let first_byte = backend.timeouts.first_byte;
    let result = tokio::time::timeout(first_byte, async {
        match provider.send(call).await? {
            UpstreamReply::Complete(body) => {
                let observed = Observed::of(&sse::read_view(&backend.name, &body)?);
                Ok(Ready::Complete(body, observed))
            }
            UpstreamReply::Stream(mut stream) => match stream.next().await {
                Some(Ok(first)) => {
                    // Its identity names a usage chunk the gateway may write.
                    let facts = sse::read_chunk(&backend.name, &first, request.include_usage())?;
                    Ok(Ready::Stream(first, facts, stream))
                }
                Some(Err(error)) => Err(error),
                None => Err(GatewayError::upstream_protocol(
                    &backend.name,
                    "the stream ended before any chunk",
                )),
            },
        }
    })
    .await
    .unwrap_or_else(|_| Err(GatewayError::upstream_timeout(&backend.name, first_byte)));
    if let Some(reported) = reported.get() {
        quota.observe(reported, Instant::now());
    }
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.label(),
    };
    app.metrics
        .upstream_attempts
        .with_label_values(&[&backend.name, outcome])
        .inc();
    result
}

/// Where a request was served, and its meter.
struct Served<'s> {
    backend: &'s Backend,
    attempts: usize,
    meter: Meter,
}

fn respond(request: &InboundRequest, served: Served<'_>, reply: Ready) -> Response {
    let Served {
        backend,
        attempts,
        mut meter,
    } = served;
    let mut response = match reply {
        Ready::Complete(body, observed) => {
            meter.upstream_done();
            meter.observe(observed);
            meter.finish_after_response(200);
            super::json_response(StatusCode::OK, body)
        }
        Ready::Stream(first, facts, upstream) => {
            let body = SseBody::new(SseParams {
                first: (first, facts),
                upstream,
                idle: backend.timeouts.idle,
                backend: backend.name.clone(),
                endpoint: request.endpoint(),
                include_usage: request.include_usage(),
                meter,
            });
            let mut response = Response::new(Body::from_stream(body));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            headers.insert(ACCEL_BUFFERING_HEADER, HeaderValue::from_static("no"));
            response
        }
    };
    set_served_by(&mut response, Some(&backend.name), attempts);
    response
}

/// `x-tollgate-backend` and `x-tollgate-attempts`.
fn set_served_by(response: &mut Response, backend: Option<&str>, attempts: usize) {
    let headers = response.headers_mut();
    if let Some(value) = backend.and_then(|b| HeaderValue::from_str(b).ok()) {
        headers.insert(BACKEND_HEADER, value);
    }
    headers.insert(ATTEMPTS_HEADER, HeaderValue::from(attempts));
}

async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(GatewayError::payload_too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            GatewayError::payload_too_large(limit)
        } else {
            GatewayError::bad_request("the request body could not be read", None)
        }
    })
}

/// The index of the requested model, which the key must be allowed.
pub(super) fn resolve(
    snapshot: &Snapshot,
    key: Option<&Key>,
    alias: &str,
) -> Result<usize, GatewayError> {
    let model = snapshot.model_index(alias).ok_or_else(|| {
        let known: Vec<&str> = snapshot.aliases_for(key).collect();
        GatewayError::unknown_model(alias, &known)
    })?;
    match key {
        Some(key) if !key.models.allows(alias) => {
            Err(GatewayError::model_not_allowed(alias, &key.name))
        }
        _ => Ok(model),
    }
}
