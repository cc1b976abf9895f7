//! Metering: usage from what the upstream reported, estimated from what
//! passed through when it reported nothing, recorded exactly once per
//! response, when it ends or when the client goes away.

pub mod estimate;

use std::sync::Arc;
use std::time::Instant;

use prometheus::IntGauge;

use crate::metrics::Metrics;
use crate::openai::{ResponseView, Usage};
use crate::routing::Lease;

/// HTTP status recorded for a response the client abandoned (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;

/// What the meter reads from one response object or stream chunk.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed {
    pub usage: Option<Usage>,
    /// Generated text, for estimating usage the upstream did not report.
    pub text_chars: usize,
}

impl Observed {
    pub fn of(view: &ResponseView<'_>) -> Self {
        Self {
            usage: view.usage(),
            text_chars: view.text_chars(),
        }
    }
}

/// Who a metered response belongs to.
pub struct MeterLabels {
    pub request_id: String,
    pub alias: String,
    pub backend: String,
}

pub struct Meter {
    metrics: Arc<Metrics>,
    labels: MeterLabels,
    started: Instant,
    prompt_estimate: u64,
    usage: Option<Usage>,
    output_chars: usize,
    first_chunk: bool,
    recorded: bool,
    _in_flight: InFlight,
    /// Held until the response is over: the deployment's in-flight count.
    lease: Lease,
}

impl Meter {
    pub fn new(
        metrics: Arc<Metrics>,
        labels: MeterLabels,
        started: Instant,
        prompt_estimate: u64,
        in_flight: InFlight,
        lease: Lease,
    ) -> Self {
        Self {
            metrics,
            labels,
            started,
            prompt_estimate,
            usage: None,
            output_chars: 0,
            first_chunk: false,
            recorded: false,
            _in_flight: in_flight,
            lease,
        }
    }

    pub fn observe(&mut self, observed: Observed) {
        if let Some(usage) = observed.usage {
            self.usage = Some(usage);
        }
        self.output_chars += observed.text_chars;
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Marks the first chunk sent to the client (time to first token).
    pub fn first_chunk_sent(&mut self) {
        if !self.first_chunk {
            self.first_chunk = true;
            self.metrics
                .time_to_first_token
                .with_label_values(&[&self.labels.alias, &self.labels.backend])
                .observe(self.started.elapsed().as_secs_f64());
        }
    }

    /// Records the response once; later calls and the drop do nothing.
    pub fn finish(&mut self, status: u16) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let (usage, estimated) = match self.usage {
            Some(usage) => {
                self.lease.record_output_tokens(usage.completion_tokens);
                (usage, "false")
            }
            None => (
                Usage::new(
                    self.prompt_estimate,
                    estimate::tokens_for_chars(self.output_chars),
                ),
                "true",
            ),
        };
        let MeterLabels {
            request_id,
            alias,
            backend,
        } = &self.labels;
        let tokens = &self.metrics.tokens;
        tokens
            .with_label_values(&[alias, backend, "input", estimated])
            .inc_by(usage.prompt_tokens);
        tokens
            .with_label_values(&[alias, backend, "output", estimated])
            .inc_by(usage.completion_tokens);
        let elapsed = self.started.elapsed();
        self.metrics.record_request(alias, backend, status, elapsed);
        tracing::info!(
            request_id,
            alias,
            backend,
            status,
            duration_ms = elapsed.as_millis() as u64,
            input_tokens = usage.prompt_tokens,
            output_tokens = usage.completion_tokens,
            estimated = self.usage.is_none(),
            "request done"
        );
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.finish(CLIENT_CLOSED);
    }
}

/// Counts a request in `tollgate_requests_in_flight` while it lives.
pub struct InFlight(IntGauge);

impl InFlight {
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
