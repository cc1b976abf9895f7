//! The failover loop: the plan's deployments in order, each call bounded
//! by its backend's first-byte timeout, until one answers or a failure may
//! not be retried. Nothing is retried once the client has a byte: a
//! stream's first chunk is read here, before the response starts; so a
//! hedge, too, goes out only before it.

use std::pin::{Pin, pin};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use prometheus::IntCounter;

use super::admit::Admission;
use super::{Failure, RequestCtx, hedge};
use crate::boxed;
use crate::config::{Backend, BackendKind, Deployment, RoutingSettings};
use crate::error::GatewayError;
use crate::health::Attempt;
use crate::limits::Refused;
use crate::metering::budget::affordable_output;
use crate::metering::usage::{self, ChunkFacts, StreamReader};
use crate::metering::{Meter, Observed, Serving};
use crate::metrics::{NONE, series};
use crate::openai::InboundRequest;
use crate::providers::{Chunk, ChunkStream, UpstreamCall, UpstreamReply};
use crate::routing::RequestFacts;
use crate::state::{AppState, Resolved, Snapshot};
use crate::store::Denied;

/// What came back from an upstream before the client saw anything.
pub enum Ready {
    /// A whole response, checked to be JSON, with what the meter needs.
    Complete(Bytes, Observed),
    /// The first chunk, read, and the rest of the stream, with the reader
    /// that read the first and reads the rest.
    Stream(Chunk, ChunkFacts, ChunkStream, StreamReader),
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
    pub meter: Box<Meter>,
    pub reply: Ready,
    /// The upstream was asked for its usage so far in every chunk.
    pub running_usage: bool,
}

/// One deployment being tried: admitted by its circuit and its rate
/// limits, with the output limit it is sent with.
struct Leg<'s> {
    index: usize,
    deployment: &'s Deployment,
    backend: &'s Backend,
    resolved: &'s Resolved,
    attempt: Attempt,
    /// When its rate limits admitted it: the upstream's time starts then.
    admitted: Instant,
    max_tokens: Option<u32>,
    running_usage: bool,
}

impl<'s> Leg<'s> {
    fn serving(&self, snapshot: &Snapshot, model: usize, request: &InboundRequest) -> Serving {
        Serving {
            deployment: self.deployment.name.clone(),
            backend: self.backend.name.clone(),
            rate: self.resolved.rate,
            believable: request.usage_bound(self.deployment.context_window),
            output_limit: self
                .max_tokens
                .or(request.max_output_tokens())
                .map(|limit| u64::from(limit) * u64::from(request.generations())),
            licence: self.deployment.licence,
            lease: Box::new(snapshot.lease(model, self.index)),
            series: self.resolved.series.clone(),
        }
    }

    fn provider(&self) -> &'static str {
        provider_name(self.backend.kind)
    }

    /// Where its call goes, apart from the leg, which lives on to learn
    /// how the call ended.
    fn to(&self) -> Target<'s> {
        Target {
            backend: self.backend,
            resolved: self.resolved,
            upstream_model: &self.deployment.upstream_model,
            max_tokens: self.max_tokens,
            running_usage: self.running_usage,
        }
    }
}

/// The upstream one call goes to.
#[derive(Clone, Copy)]
struct Target<'s> {
    backend: &'s Backend,
    resolved: &'s Resolved,
    upstream_model: &'s str,
    max_tokens: Option<u32>,
    running_usage: bool,
}

/// The leg that answered, and its answer.
struct Answer<'s> {
    backend: &'s Backend,
    deployment: &'s Deployment,
    reply: Ready,
    running_usage: bool,
}

/// What one request's attempts have come to so far.
struct Tried<'s> {
    app: &'s AppState,
    ctx: &'s RequestCtx,
    model: usize,
    alias: &'s str,
    settings: &'s RoutingSettings,
    stream: bool,
    /// The budget's reservation bounds this stream, so the meter counts
    /// its output as the upstream does, chunk by chunk, where the upstream
    /// can say (vLLM's running usage); with one answer, whose count is the
    /// stream's.
    running_usage: bool,
    attempts: usize,
    /// The last failure that may be retried, and its backend.
    last_error: Option<(GatewayError, &'s str)>,
    /// A failure that may not be: the request ends with it, unless a hedge
    /// in flight beside it answers.
    fatal: Option<(GatewayError, &'s str)>,
    /// The soonest a deployment skipped at its quota has room again.
    skipped: Option<Duration>,
    /// A deployment was skipped as its half-open circuit's one probe was
    /// taken by another request.
    probing: bool,
    /// The deployment the last retriable failure was on, and its reason:
    /// a failover once the request goes on to another deployment.
    failing_over: Option<(&'s str, &'static str)>,
}

/// Tries the plan's deployments in order. A half-open circuit whose probe
/// another request took is skipped, not failed; so is a deployment at its
/// quota. Every outcome teaches the deployment's circuit and latency
/// estimate, and every response's `x-ratelimit-*` headers its quota. An
/// alias with a hedge sends the request, once, to a second deployment
/// beside a first that is slow to its first byte ([`hedge`]).
pub async fn attempt<'s>(
    app: &'s AppState,
    ctx: &'s RequestCtx,
    request: &InboundRequest,
    admission: &Admission,
    mut meter: Box<Meter>,
) -> Result<Served<'s>, Failure> {
    let snapshot = &*ctx.snapshot;
    let (model, facts, plan) = (admission.model, &admission.facts, &admission.plan);
    let config = &snapshot.config.models[model];
    let prompt = facts.input_tokens;
    let mut tried = Tried {
        app,
        ctx,
        model,
        alias: &config.alias,
        settings: &snapshot.config.routing,
        stream: facts.stream,
        running_usage: facts.stream
            && request.generations() == 1
            && meter.reserved_nano_usd().is_some(),
        attempts: 0,
        last_error: None,
        fatal: None,
        skipped: None,
        probing: false,
        failing_over: None,
    };
    let max_attempts = tried.settings.max_attempts;
    let mut hedged = None;
    for (position, index) in plan.order().enumerate() {
        if tried.attempts == max_attempts || tried.fatal.is_some() {
            break;
        }
        if hedged == Some(index) {
            continue;
        }
        let deployment = &config.deployments[index];
        let resolved = snapshot.resolved(model, index);
        let Ok(max_tokens) = output_limit(request, facts, deployment, resolved, &meter) else {
            continue;
        };
        let Some(first) = tried.leg(index, max_tokens, prompt).await else {
            continue;
        };
        tried.moved_on();
        tried.attempts += 1;
        let headers = meter.begin_attempt(
            first.serving(snapshot, model, request),
            first.provider(),
            &first.deployment.upstream_model,
            first.admitted,
        );
        let mut call = pin!(call_upstream(
            app,
            first.to(),
            request,
            &ctx.request_id,
            headers,
        ));
        let wait = match &config.hedge {
            Some(h) if hedged.is_none() && tried.attempts < max_attempts => {
                hedge::wait(h, &first.resolved.health, facts.stream).map(|wait| (h, wait))
            }
            _ => None,
        };
        let answered = match wait {
            None => call.await,
            Some((h, wait)) => match tokio::time::timeout(wait, call.as_mut()).await {
                Ok(answered) => answered,
                Err(_) => {
                    // No first byte yet: a hedge, if a deployment after this
                    // one fits the allowance.
                    let allowance = hedge::allowance(h, meter.reserved_for_hedge());
                    let rest = plan.order().skip(position + 1);
                    match tried.hedge_leg(rest, request, facts, allowance).await {
                        None => {
                            tried.hedged("over_allowance");
                            call.await
                        }
                        Some(second) => {
                            hedged = Some(second.index);
                            tried.attempts += 1;
                            let headers = meter.begin_hedge(
                                second.serving(snapshot, model, request),
                                second.provider(),
                                &second.deployment.upstream_model,
                            );
                            // Boxed, as is the race: a hedge is rare, and the
                            // request's future stays small.
                            let mut hedge_call = boxed::pinned(|| {
                                call_upstream(app, second.to(), request, &ctx.request_id, headers)
                            });
                            let won = boxed::pinned(|| {
                                tried.race((first, call), (second, hedge_call.as_mut()), &mut meter)
                            })
                            .await;
                            match won {
                                Some(answer) => return Ok(tried.served(answer, meter)),
                                None => continue,
                            }
                        }
                    }
                }
            },
        };
        match answered {
            Ok(reply) => {
                let answer = tried.answered(first, reply, &mut meter);
                return Ok(tried.served(answer, meter));
            }
            Err(error) => {
                meter.attempt_failed(&error);
                tried.failed(first, error);
            }
        }
    }
    let Tried {
        alias,
        attempts,
        last_error,
        fatal,
        skipped,
        probing,
        ..
    } = tried;
    let (error, backend) = fatal.or(last_error).unwrap_or_else(|| {
        let wait = plan.retry_after_with(skipped);
        // As the plan would have answered had it seen those quotas full.
        let error = if skipped.is_some() && !probing && plan.dropped_only_as_rate_limited() {
            GatewayError::deployments_rate_limited(alias, "each was at its quota when tried", wait)
        } else {
            GatewayError::no_deployment_available(
                alias,
                "each was at its quota, or its circuit's one probe was taken, when tried",
                wait,
            )
        };
        (error, NONE)
    });
    Err(Failure::after_attempts(
        error, alias, backend, attempts, meter,
    ))
}

type Call<'c> = Pin<&'c mut (dyn Future<Output = Result<Ready, GatewayError>> + Send + 'c)>;

impl<'s> Tried<'s> {
    /// The deployment at `index` as a leg, if its circuit and its rate
    /// limits admit an attempt now; one at its quota is skipped, and the
    /// soonest it has room again noted.
    async fn leg(&mut self, index: usize, max_tokens: Option<u32>, prompt: u64) -> Option<Leg<'s>> {
        let snapshot = &*self.ctx.snapshot;
        let resolved = snapshot.resolved(self.model, index);
        let deployment = &snapshot.config.models[self.model].deployments[index];
        let Some(attempt) = Attempt::begin(&resolved.health) else {
            self.probing = true;
            return None;
        };
        let admitted = match admit_deployment(self.app, resolved, prompt, attempt.started()).await {
            Ok(admitted) => admitted,
            Err(refused) => {
                self.app
                    .metrics
                    .rate_limited
                    .with_label_values(&["deployment", &deployment.name, refused.limit.name()])
                    .inc();
                if let Some(wait) = refused.wait {
                    self.skipped = Some(self.skipped.map_or(wait, |s| s.min(wait)));
                }
                return None;
            }
        };
        let backend = snapshot.backend(resolved.backend);
        Some(Leg {
            index,
            deployment,
            backend,
            resolved,
            attempt,
            admitted,
            max_tokens,
            running_usage: self.running_usage && backend.kind.reports_running_usage(),
        })
    }

    /// The first of `rest` whose worst case fits `allowance` and that
    /// admits an attempt now, as a hedge's leg.
    async fn hedge_leg(
        &mut self,
        rest: impl Iterator<Item = usize>,
        request: &InboundRequest,
        facts: &RequestFacts,
        allowance: u64,
    ) -> Option<Leg<'s>> {
        let snapshot = &*self.ctx.snapshot;
        for index in rest {
            let rate = &snapshot.resolved(self.model, index).rate;
            let deployment = &snapshot.config.models[self.model].deployments[index];
            if let Some(fit) = hedge::fit(request, facts, deployment, rate, allowance)
                && let Some(leg) = self.leg(index, fit.max_tokens, facts.input_tokens).await
            {
                return Some(leg);
            }
        }
        None
    }

    /// A leg failed before the client saw a byte: its deployment learns of
    /// it, and a failure that may be retried moves the request on.
    fn failed(&mut self, leg: Leg<'s>, mut error: GatewayError) {
        leg.attempt.failed(&mut error, self.settings);
        let backend = leg.backend.name.as_str();
        if !error.retriable() {
            self.fatal = Some((error, backend));
            return;
        }
        tracing::warn!(
            request_id = self.ctx.request_id, alias = self.alias, deployment = leg.deployment.name, error = %error.message(),
            "upstream failed before the first byte"
        );
        self.failing_over = Some((&leg.deployment.name, error.label()));
        self.last_error = Some((error, backend));
    }

    /// The request goes on to another deployment: the failure before, if
    /// any, was a failover. A last failure, with nothing after it, is none.
    fn moved_on(&mut self) {
        if let Some((deployment, reason)) = self.failing_over.take() {
            self.app
                .metrics
                .failovers
                .with_label_values(&[self.alias, deployment, reason])
                .inc();
        }
    }

    fn hedged(&self, outcome: &'static str) {
        self.app
            .metrics
            .hedges
            .with_label_values(&[self.alias, outcome])
            .inc();
    }

    /// The first attempt and its hedge, both in flight: the first to
    /// answer serves the request and the other is cancelled; a failure
    /// leaves the other to go on alone.
    async fn race(
        &mut self,
        (first, mut first_call): (Leg<'s>, Call<'_>),
        (second, mut second_call): (Leg<'s>, Call<'_>),
        meter: &mut Meter,
    ) -> Option<Answer<'s>> {
        let (mut first, mut second) = (Some(first), Some(second));
        loop {
            tokio::select! {
                answered = &mut first_call, if first.is_some() => {
                    let leg = first.take().expect("polled only while in flight");
                    match answered {
                        Ok(reply) => {
                            if let Some(loser) = second.take() {
                                loser.attempt.cancelled(self.stream);
                            }
                            self.hedged("first_won");
                            return Some(self.answered(leg, reply, meter));
                        }
                        Err(error) => {
                            meter.attempt_failed(&error);
                            self.failed(leg, error);
                            // The hedge in flight goes on with the request.
                            if second.is_some() && self.fatal.is_none() {
                                self.moved_on();
                            }
                        }
                    }
                }
                answered = &mut second_call, if second.is_some() => {
                    let leg = second.take().expect("polled only while in flight");
                    match answered {
                        Ok(reply) => {
                            if let Some(loser) = first.take() {
                                loser.attempt.cancelled(self.stream);
                                meter.hedge_won();
                            }
                            self.hedged("hedge_won");
                            return Some(self.answered(leg, reply, meter));
                        }
                        // Once the first failed, the hedge is the attempt.
                        Err(error) if first.is_none() => {
                            meter.attempt_failed(&error);
                            self.failed(leg, error);
                        }
                        // The first, in flight, goes on as it was: no failover.
                        Err(error) => {
                            meter.hedge_failed(&error);
                            self.failed(leg, error);
                            self.failing_over = None;
                        }
                    }
                }
            }
            if first.is_none() && second.is_none() {
                self.hedged("both_failed");
                return None;
            }
        }
    }

    /// A leg answered: its deployment and the meter learn of it.
    fn answered(&self, leg: Leg<'s>, reply: Ready, meter: &mut Meter) -> Answer<'s> {
        leg.attempt.succeeded(self.stream);
        meter.attempt_answered(|| usage::answering_model(reply.first_bytes()));
        Answer {
            backend: leg.backend,
            deployment: leg.deployment,
            reply,
            running_usage: leg.running_usage,
        }
    }

    fn served(self, answer: Answer<'s>, meter: Box<Meter>) -> Served<'s> {
        Served {
            backend: answer.backend,
            deployment: answer.deployment,
            attempts: self.attempts,
            meter,
            reply: answer.reply,
            running_usage: answer.running_usage,
        }
    }
}

/// Takes an attempt begun at `began` from its deployment's rate limits:
/// the fleet's shared ones when there is a store that answers, else this
/// replica's own. Admitted, it says when: the upstream's time starts then.
async fn admit_deployment(
    app: &AppState,
    resolved: &Resolved,
    tokens: u64,
    began: Instant,
) -> Result<Instant, Refused> {
    let quota = &resolved.health.quota;
    if let Some(fleet) = &app.fleet
        && let Some(cells) = quota.limits.shared_cells()
        && quota.limits.is_limited()
    {
        match fleet.admit(&cells, tokens, None).await {
            Ok(_) | Err(Denied::Budget { .. }) => {
                let now = Instant::now();
                quota.limits.mirror(tokens, now);
                quota.count_upstream(tokens);
                return Ok(now);
            }
            Err(Denied::Rate(refused)) => return Err(refused),
            Err(Denied::Unavailable) => {
                let now = Instant::now();
                return quota.admit(tokens, now).map(|()| now);
            }
        }
    }
    quota.admit(tokens, began).map(|()| began)
}

/// The output limit the gateway sets for an attempt at `deployment`: for a
/// request without `max_tokens` whose key has a budget, as many tokens as
/// the reservation pays for in each of its answers at the deployment's
/// prices, within its [`output_ceiling`](InboundRequest::output_ceiling).
/// `Err` when the reservation cannot pay for one (a dearer deployment than
/// the one it was sized on): not tried.
fn output_limit(
    request: &InboundRequest,
    facts: &RequestFacts,
    deployment: &Deployment,
    resolved: &Resolved,
    meter: &Meter,
) -> Result<Option<u32>, ()> {
    let (None, Some(reserved)) = (request.max_output_tokens(), meter.reserved_nano_usd()) else {
        return Ok(None);
    };
    let prompt = request.prompt_ceiling(facts.input_tokens_most, deployment.context_window);
    let limit = affordable_output(&resolved.rate, prompt, reserved, request.generations())
        .min(request.output_ceiling(deployment.context_window, facts.window_tokens()));
    match u32::try_from(limit) {
        Ok(0) => Err(()),
        Ok(limit) => Ok(Some(limit)),
        Err(_) => Ok(Some(u32::MAX)),
    }
}

/// One upstream call, bounded by the backend's first-byte timeout: the
/// whole body, or the first stream chunk peeked so a failure can still
/// become an HTTP error or a failover. `trace` carries its span upstream.
async fn call_upstream(
    app: &AppState,
    to: Target<'_>,
    request: &InboundRequest,
    request_id: &str,
    trace: HeaderMap,
) -> Result<Ready, GatewayError> {
    let Target {
        backend,
        resolved,
        upstream_model,
        max_tokens,
        running_usage,
    } = to;
    let reported = OnceLock::new();
    let call = UpstreamCall {
        request,
        upstream_model,
        request_id,
        quota: &reported,
        max_tokens,
        running_usage,
        trace: &trace,
    };
    let first_byte = backend.timeouts.first_byte;
    let result = tokio::time::timeout(first_byte, async {
        match resolved.provider.send(call).await? {
            UpstreamReply::Complete(body) => {
                let observed = Observed::of(&usage::read_view(&backend.name, &body)?);
                Ok(Ready::Complete(body, observed))
            }
            UpstreamReply::Stream(mut stream) => match stream.next().await {
                Some(Ok(first)) => {
                    let mut reader = StreamReader::default();
                    let facts = reader.read(&backend.name, &first)?;
                    Ok(Ready::Stream(first, facts, stream, reader))
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
    let (slot, outcome) = match &result {
        Ok(_) => (Some(&resolved.series.upstream_ok), "ok"),
        Err(e) => (None, e.label()),
    };
    series::record(
        slot,
        || {
            let labels = [backend.name.as_str(), outcome];
            app.metrics.upstream_attempts.with_label_values(&labels)
        },
        IntCounter::inc,
    );
    result
}
