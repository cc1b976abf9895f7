//! The failover loop: the plan's deployments in order, each call bounded
//! by its backend's first-byte timeout, until one answers or a failure may
//! not be retried. Nothing is retried once the client has a byte: a
//! stream's first chunk is read here, before the response starts.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;

use super::admit::{Admission, output_ceiling};
use super::{Failure, RequestCtx};
use crate::config::{Backend, BackendKind, Deployment};
use crate::error::GatewayError;
use crate::health::Attempt;
use crate::limits::Refused;
use crate::metering::budget::affordable_output;
use crate::metering::usage::{self, ChunkFacts};
use crate::metering::{Meter, Observed, Serving};
use crate::metrics::NONE;
use crate::openai::InboundRequest;
use crate::providers::{Chunk, ChunkStream, UpstreamCall, UpstreamReply};
use crate::state::{AppState, Resolved};
use crate::store::Denied;

/// What came back from an upstream before the client saw anything.
pub enum Ready {
    /// A whole response, checked to be JSON, with what the meter needs.
    Complete(Bytes, Observed),
    /// The first chunk, read, and the rest of the stream.
    Stream(Chunk, ChunkFacts, ChunkStream),
}

impl Ready {
    /// The response, or the stream's first chunk.
    fn first_bytes(&self) -> &[u8] {
        match self {
            Ready::Complete(body, _) => body,
            Ready::Stream(first, ..) => first,
        }
    }
}

/// `gen_ai.provider.name` for a backend: the OpenTelemetry GenAI
/// conventions' name where they have one, else the backend's kind.
fn provider_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Bedrock => "aws.bedrock",
        BackendKind::Openai => "openai",
        BackendKind::Groq => "groq",
        BackendKind::Together => "together_ai",
        BackendKind::Vllm => "vllm",
        BackendKind::Tgi => "tgi",
        BackendKind::Simulated => "simulated",
    }
}

/// The answer of the deployment that served a request.
pub struct Served<'s> {
    pub backend: &'s Backend,
    pub deployment: &'s Deployment,
    pub attempts: usize,
    pub meter: Meter,
    pub reply: Ready,
}

/// Tries the plan's deployments in order. A half-open circuit whose probe
/// another request took is skipped, not failed; so is a deployment at its
/// quota. Every outcome teaches the deployment's circuit and latency
/// estimate, and every response's `x-ratelimit-*` headers its quota.
pub async fn attempt<'s>(
    app: &AppState,
    ctx: &'s RequestCtx,
    request: &InboundRequest,
    admission: &Admission,
    mut meter: Meter,
) -> Result<Served<'s>, Failure> {
    let snapshot = &*ctx.snapshot;
    let (model, facts, plan) = (admission.model, &admission.facts, &admission.plan);
    let config = &snapshot.config.models[model];
    let alias = config.alias.as_str();
    let settings = &snapshot.config.routing;
    let metrics = &app.metrics;
    let mut attempts = 0;
    let mut last_error = None;
    // The soonest a deployment skipped at its quota has room again.
    let mut skipped: Option<Duration> = None;
    for index in plan.order() {
        if attempts == settings.max_attempts {
            break;
        }
        let deployment = &config.deployments[index];
        let resolved = snapshot.resolved(model, index);
        let Ok(max_tokens) =
            output_limit(request, facts.input_tokens, deployment, resolved, &meter)
        else {
            continue;
        };
        let Some(attempt) = Attempt::begin(&resolved.health) else {
            continue;
        };
        if let Err(refused) = admit_deployment(app, resolved, facts.input_tokens).await {
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
        let backend = snapshot.backend(resolved.backend);
        let trace = meter.begin_attempt(
            Serving {
                deployment: deployment.name.clone(),
                backend: backend.name.clone(),
                rate: resolved.rate,
                context_window: u64::from(deployment.context_window),
                licence: deployment.licence,
                lease: Box::new(snapshot.lease(model, index)),
            },
            provider_name(backend.kind),
            &deployment.upstream_model,
        );
        let call = UpstreamCall {
            request,
            upstream_model: &deployment.upstream_model,
            request_id: &ctx.request_id,
            quota: &OnceLock::new(),
            max_tokens,
            trace: &trace,
        };
        // A stream that may be cut at its reservation needs its identity
        // to write the last chunk.
        let identity = request.include_usage() || meter.reserved_nano_usd().is_some();
        match call_upstream(app, backend, resolved, call, identity).await {
            Ok(reply) => {
                attempt.succeeded(facts.stream);
                meter.attempt_answered(|| usage::answering_model(reply.first_bytes()));
                return Ok(Served {
                    backend,
                    deployment,
                    attempts,
                    meter,
                    reply,
                });
            }
            Err(error) => {
                attempt.failed(&error, settings);
                meter.attempt_failed(&error);
                if !error.retriable() {
                    return Err(Failure::after_attempts(
                        error,
                        alias,
                        &backend.name,
                        attempts,
                        meter,
                    ));
                }
                metrics
                    .failovers
                    .with_label_values(&[alias, &deployment.name, error.label()])
                    .inc();
                tracing::warn!(
                    request_id = ctx.request_id, alias, deployment = deployment.name, error = %error.message(),
                    "upstream failed before the first byte; trying the next deployment"
                );
                last_error = Some((error, backend.name.as_str()));
            }
        }
    }
    let (error, backend) = last_error.unwrap_or_else(|| {
        (
            GatewayError::no_deployment_available(
                alias,
                "each was at its quota, or its circuit's one probe was taken, when tried",
                plan.retry_after_with(skipped),
            ),
            NONE,
        )
    });
    Err(Failure::after_attempts(
        error, alias, backend, attempts, meter,
    ))
}

/// Takes an attempt from its deployment's rate limits: the fleet's shared
/// ones when there is a store that answers, else this replica's own.
async fn admit_deployment(app: &AppState, resolved: &Resolved, tokens: u64) -> Result<(), Refused> {
    let quota = &resolved.health.quota;
    if let Some(fleet) = &app.fleet
        && let Some(cells) = quota.limits.shared_cells()
        && quota.limits.is_limited()
    {
        match fleet.admit(&cells, tokens, None).await {
            Ok(_) | Err(Denied::Budget { .. }) => {
                quota.limits.mirror(tokens, Instant::now());
                quota.count_upstream(tokens);
                return Ok(());
            }
            Err(Denied::Rate(refused)) => return Err(refused),
            Err(Denied::Unavailable) => {}
        }
    }
    quota.admit(tokens, Instant::now())
}

/// The output limit the gateway sets for an attempt at `deployment`: for a
/// request without `max_tokens` whose key has a budget, as many tokens as
/// the reservation pays for at the deployment's prices, within its
/// [`output_ceiling`]. `Err` when the reservation cannot pay for one (a
/// dearer deployment than the one it was sized on): not tried.
fn output_limit(
    request: &InboundRequest,
    prompt: u64,
    deployment: &Deployment,
    resolved: &Resolved,
    meter: &Meter,
) -> Result<Option<u32>, ()> {
    let (None, Some(reserved)) = (request.max_output_tokens(), meter.reserved_nano_usd()) else {
        return Ok(None);
    };
    let limit = affordable_output(&resolved.rate, prompt, reserved)
        .min(output_ceiling(request, deployment, prompt));
    match u32::try_from(limit) {
        Ok(0) => Err(()),
        Ok(limit) => Ok(Some(limit)),
        Err(_) => Ok(Some(u32::MAX)),
    }
}

/// One upstream call, bounded by the backend's first-byte timeout: the
/// whole body, or the first stream chunk peeked so a failure can still
/// become an HTTP error or a failover. `identity`: the first chunk's is
/// read, for chunks the gateway may write.
async fn call_upstream(
    app: &AppState,
    backend: &Backend,
    resolved: &Resolved,
    call: UpstreamCall<'_>,
    identity: bool,
) -> Result<Ready, GatewayError> {
    let reported = call.quota;
    let first_byte = backend.timeouts.first_byte;
    let result = tokio::time::timeout(first_byte, async {
        match resolved.provider.send(call).await? {
            UpstreamReply::Complete(body) => {
                let observed = Observed::of(&usage::read_view(&backend.name, &body)?);
                Ok(Ready::Complete(body, observed))
            }
            UpstreamReply::Stream(mut stream) => match stream.next().await {
                Some(Ok(first)) => {
                    // Its identity names a usage chunk the gateway may write.
                    let facts = usage::read_chunk(&backend.name, &first, identity)?;
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
        resolved.health.observe_quota(reported, Instant::now());
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
