//! OpenTelemetry traces (`[tracing] otlp_endpoint`): one span per request
//! and one per upstream attempt, with the GenAI semantic conventions'
//! attributes and tollgate's own, exported over OTLP/HTTP in batches by a
//! thread of the SDK's. A client's W3C `traceparent` is continued, and each
//! attempt's is sent upstream. Off, nothing here runs.

use std::time::{Duration, Instant, SystemTime};

use axum::http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span};

/// The longest one export to the collector may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// Where spans go: the collector's traces URL, `…/v1/traces`.
    pub traces_url: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// The share of traces started here that are sampled; a client's
    /// `traceparent` decides for the traces it continues.
    pub sample_ratio: f64,
}

/// The gateway's tracer and the exporter behind it.
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl Traces {
    /// Starts the exporter. Spans are sent in batches (the SDK's
    /// `OTEL_BSP_*` variables tune them), with the headers of
    /// `OTEL_EXPORTER_OTLP_HEADERS`.
    pub fn start(settings: &TracingSettings) -> Result<Self, String> {
        let exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(settings.traces_url.as_str())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("tracing.otlp_endpoint: cannot start the OTLP exporter: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("tollgate");
        Ok(Self {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// The trace of a request for `operation` (`gen_ai.operation.name`:
    /// `chat`, `text_completion`) that came with `headers` and started at
    /// `started`, continuing the client's `traceparent` when it sent one.
    pub fn request(
        &self,
        headers: &HeaderMap,
        started: Instant,
        operation: &'static str,
    ) -> RequestTrace {
        let parent = self.propagator.extract(&HeaderExtractor(headers));
        let span = self
            .tracer
            .span_builder(operation)
            .with_kind(SpanKind::Server)
            .with_start_time(system_time(started))
            .with_attributes([KeyValue::new("gen_ai.operation.name", operation)])
            .start_with_context(&self.tracer, &parent);
        RequestTrace(Box::new(Spans {
            tracer: self.tracer.clone(),
            cx: parent.with_span(span),
            attempt: None,
            hedge: None,
            operation,
        }))
    }

    /// Sends the spans still queued; waits for the collector up to the
    /// export timeout.
    pub async fn close(&self) {
        let provider = self.provider.clone();
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "could not send the last spans to the OTLP collector");
        }
    }
}

/// One upstream attempt.
pub struct AttemptFacts<'a> {
    /// `gen_ai.provider.name`.
    pub provider: &'static str,
    /// The model the deployment is asked for.
    pub upstream_model: &'a str,
    pub deployment: &'a str,
    /// 1 for the first attempt.
    pub number: usize,
}

/// How a request ended, for its span and its last attempt's.
pub struct Outcome<'a> {
    pub status: u16,
    /// The gateway's label for the failure (`error.type`), if it failed.
    pub error: Option<&'static str>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The token counts are the gateway's estimate.
    pub estimated: bool,
    pub cost_nano_usd: u64,
    pub deployment: Option<&'a str>,
    pub backend: Option<&'a str>,
    pub attempts: usize,
}

impl Outcome<'_> {
    /// A request refused before any upstream was tried.
    pub fn refused(status: u16, error: &'static str) -> Self {
        Self {
            status,
            error: Some(error),
            input_tokens: 0,
            output_tokens: 0,
            estimated: false,
            cost_nano_usd: 0,
            deployment: None,
            backend: None,
            attempts: 0,
        }
    }
}

/// A request's span and its attempt in flight: boxed, so that a request
/// that is not traced carries one null pointer where they would be (the
/// meter holding them is moved along the request path).
pub struct RequestTrace(Box<Spans>);

struct Spans {
    tracer: SdkTracer,
    /// The request's span, the parent of its attempts'.
    cx: Context,
    attempt: Option<Span>,
    /// A hedge's attempt, in flight beside `attempt`.
    hedge: Option<Span>,
    operation: &'static str,
}

impl RequestTrace {
    /// The client asked for `model` (an alias): the span is named after it.
    pub fn requested(&self, model: &str) {
        let span = self.0.cx.span();
        span.update_name(format!("{} {model}", self.0.operation));
        span.set_attribute(KeyValue::new("gen_ai.request.model", model.to_owned()));
    }

    /// Starts an attempt's span, or a hedge's beside it; returns the
    /// headers (`traceparent`, `tracestate`) that carry it upstream.
    pub fn begin_attempt(&mut self, attempt: AttemptFacts<'_>, hedge: bool) -> HeaderMap {
        let span = self
            .0
            .tracer
            .span_builder(format!("{} {}", self.0.operation, attempt.upstream_model))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("gen_ai.operation.name", self.0.operation),
                KeyValue::new("gen_ai.provider.name", attempt.provider),
                KeyValue::new("gen_ai.request.model", attempt.upstream_model.to_owned()),
                KeyValue::new("tollgate.deployment", attempt.deployment.to_owned()),
                KeyValue::new("tollgate.attempt", attempt.number as i64),
                KeyValue::new("tollgate.hedge", hedge),
            ])
            .start_with_context(&self.0.tracer, &self.0.cx);
        let mut headers = HeaderMap::new();
        TraceContextPropagator::new().inject_context(
            &Context::new().with_remote_span_context(span.span_context().clone()),
            &mut HeaderInjector(&mut headers),
        );
        if hedge {
            self.0.hedge = Some(span);
        } else {
            self.0.attempt = Some(span);
        }
        headers
    }

    /// The hedge answered first: its span is the attempt's from now on.
    pub fn hedge_won(&mut self) {
        let spans = &mut *self.0;
        std::mem::swap(&mut spans.attempt, &mut spans.hedge);
    }

    /// The hedge's attempt failed, as [`attempt_failed`](Self::attempt_failed)
    /// says.
    pub fn hedge_failed(&mut self, error: &'static str, message: String) {
        if let Some(span) = self.0.hedge.take() {
            fail(span, error, message);
        }
    }

    /// The attempt beside the one that answered is cancelled.
    pub fn hedge_cancelled(&mut self) {
        if let Some(mut span) = self.0.hedge.take() {
            span.set_attribute(KeyValue::new("tollgate.cancelled", true));
            span.end();
        }
    }

    /// The upstream answered as `model`.
    pub fn answered_by(&mut self, model: String) {
        let model = KeyValue::new("gen_ai.response.model", model);
        if let Some(span) = &mut self.0.attempt {
            span.set_attribute(model.clone());
        }
        self.0.cx.span().set_attribute(model);
    }

    /// The attempt in flight failed with `error` (the gateway's label) and
    /// `message`.
    /// A hedge in flight becomes the attempt.
    pub fn attempt_failed(&mut self, error: &'static str, message: String) {
        if let Some(span) = self.0.attempt.take() {
            fail(span, error, message);
        }
        self.0.attempt = self.0.hedge.take();
    }

    /// Ends the attempt still open, then the request's span.
    pub fn finish(mut self, outcome: &Outcome<'_>) {
        let usage = [
            KeyValue::new("gen_ai.usage.input_tokens", outcome.input_tokens as i64),
            KeyValue::new("gen_ai.usage.output_tokens", outcome.output_tokens as i64),
            KeyValue::new("tollgate.usage.estimated", outcome.estimated),
            KeyValue::new("tollgate.cost_usd", outcome.cost_nano_usd as f64 / 1e9),
        ];
        self.hedge_cancelled();
        if let Some(mut span) = self.0.attempt.take() {
            span.set_attributes(usage.clone());
            if let Some(error) = outcome.error {
                span.set_attribute(KeyValue::new("error.type", error));
                span.set_status(Status::error(error));
            }
            span.end();
        }
        let span = self.0.cx.span();
        span.set_attributes(usage);
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(outcome.status),
        ));
        span.set_attribute(KeyValue::new("tollgate.attempts", outcome.attempts as i64));
        for (name, value) in [
            ("tollgate.deployment", outcome.deployment),
            ("tollgate.backend", outcome.backend),
        ] {
            if let Some(value) = value {
                span.set_attribute(KeyValue::new(name, value.to_owned()));
            }
        }
        if let Some(error) = outcome.error {
            span.set_attribute(KeyValue::new("error.type", error));
            // A server span's error is the server's: 5xx, not the client's 4xx.
            if outcome.status >= 500 {
                span.set_status(Status::error(error));
            }
        }
        span.end();
    }
}

/// Ends an attempt's span as failed with `error` (the gateway's label).
fn fail(mut span: Span, error: &'static str, message: String) {
    span.set_attribute(KeyValue::new("error.type", error));
    span.set_status(Status::error(message));
    span.end();
}

/// The wall-clock time of `instant`.
fn system_time(instant: Instant) -> SystemTime {
    SystemTime::now() - instant.elapsed()
}
