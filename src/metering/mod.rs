//! Metering: usage from what the upstream reported, estimated from what
//! passed through when it reported nothing, priced, and recorded exactly
//! once per request — in the metrics, the log and the spend ledger — when
//! it ends or when the client goes away.

pub mod budget;
pub mod cost;
pub mod estimate;
pub mod usage;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntGauge};

use crate::ledger::{Ledger, Row, Totals};
use crate::limits::Limits;
use crate::metrics::{Metrics, NONE};
use crate::openai::{ResponseView, Usage};
use budget::Reservation;
use cost::Rate;

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

/// Who a metered request belongs to.
pub struct MeterLabels {
    pub request_id: String,
    pub alias: String,
    /// The key's name, or `none` without keys.
    pub key: String,
}

/// The deployment an attempt went to, and what its tokens cost.
pub struct Serving {
    pub deployment: String,
    pub backend: String,
    pub rate: Rate,
    /// Counts the attempt against the deployment while it lives, and
    /// learns its usage.
    pub lease: Box<dyn Settle>,
}

/// What the deployment that served a request learns once its usage is
/// known (health's lease on it, held by the meter until then).
pub trait Settle: Send + Sync {
    /// `input` and `output` tokens were served; `reported` when the count
    /// is the upstream's own, not an estimate. `admitted` is the prompt
    /// estimate the deployment's quota took at admission.
    fn settle(&self, admitted: u64, usage: &Usage, reported: bool);
}

/// What a request is charged against: the ledger, the key's budget
/// reservation (released once the cost is recorded), the alias's per-token
/// deployments for counterfactual costs, and the key's rate limits (which
/// took the prompt estimate at admission and take the rest at the end).
pub struct Charges {
    pub ledger: Arc<Ledger>,
    pub reservation: Option<Reservation>,
    pub counterfactuals: Arc<[(String, Rate)]>,
    pub limits: Option<Arc<Limits>>,
}

/// Meters one client request across its upstream attempts, and records it
/// exactly once: when it ends, or when the client goes away (dropped).
pub struct Meter {
    metrics: Arc<Metrics>,
    labels: MeterLabels,
    charges: Charges,
    started: Instant,
    prompt_estimate: u64,
    /// The attempt in flight or answering; `None` between attempts.
    serving: Option<Serving>,
    /// The backend of the last attempt, for the request's labels.
    last_backend: Option<String>,
    /// An upstream answered (its body or first chunk arrived).
    answered: bool,
    usage: Option<Usage>,
    output_chars: usize,
    last_chunk_sent: Option<Instant>,
    between_tokens: Option<Histogram>,
    upstream_since: Option<Instant>,
    upstream_wait: Duration,
    recorded: bool,
    _in_flight: InFlight,
}

impl Meter {
    pub fn new(
        metrics: Arc<Metrics>,
        labels: MeterLabels,
        charges: Charges,
        started: Instant,
        prompt_estimate: u64,
        in_flight: InFlight,
    ) -> Self {
        Self {
            metrics,
            labels,
            charges,
            started,
            prompt_estimate,
            serving: None,
            last_backend: None,
            answered: false,
            usage: None,
            output_chars: 0,
            last_chunk_sent: None,
            between_tokens: None,
            upstream_since: None,
            upstream_wait: Duration::ZERO,
            recorded: false,
            _in_flight: in_flight,
        }
    }

    /// An upstream call starts.
    pub fn begin_attempt(&mut self, serving: Serving) {
        self.last_backend = Some(serving.backend.clone());
        self.serving = Some(serving);
        self.upstream_since = Some(Instant::now());
    }

    /// The attempt failed before anything reached the client: nothing was
    /// generated, so it costs nothing; the next attempt may start.
    pub fn attempt_failed(&mut self) {
        self.upstream_done();
        self.serving = None;
    }

    /// The upstream answered: its whole body, or its first chunk.
    pub fn attempt_answered(&mut self) {
        self.answered = true;
    }

    /// The upstream is done sending (the whole body, or the stream's end).
    pub fn upstream_done(&mut self) {
        if let Some(since) = self.upstream_since.take() {
            self.upstream_wait += since.elapsed();
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

    /// A stream chunk was sent to the client at `now`: time to first
    /// token, then the time between tokens.
    pub fn chunk_sent(&mut self, now: Instant) {
        match self.last_chunk_sent.replace(now) {
            None => {
                let labels = [
                    self.labels.alias.as_str(),
                    self.last_backend.as_deref().unwrap_or(NONE),
                ];
                self.metrics
                    .time_to_first_token
                    .with_label_values(&labels)
                    .observe((now - self.started).as_secs_f64());
                // Looked up once per stream, not once per chunk.
                self.between_tokens =
                    Some(self.metrics.time_between_tokens.with_label_values(&labels));
            }
            Some(previous) => {
                if let Some(histogram) = &self.between_tokens {
                    histogram.observe((now - previous).as_secs_f64());
                }
            }
        }
    }

    /// What the request used: the upstream's count; else, once an upstream
    /// answered, an estimate from what passed through; else, for a client
    /// that left while an upstream was working, the prompt estimate;
    /// else nothing (a failed upstream generated nothing).
    fn final_usage(&self, status: u16) -> (Usage, bool) {
        match self.usage {
            Some(usage) => (usage, false),
            None if self.answered => (
                Usage::new(
                    self.prompt_estimate,
                    estimate::tokens_for_chars(self.output_chars),
                ),
                true,
            ),
            None if status == CLIENT_CLOSED && self.serving.is_some() => {
                (Usage::new(self.prompt_estimate, 0), true)
            }
            None => (Usage::default(), false),
        }
    }

    /// Records the request once; later calls and the drop do nothing.
    pub fn finish(&mut self, status: u16) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        self.upstream_done();
        let (usage, estimated) = self.final_usage(status);
        let backend = self.last_backend.as_deref().unwrap_or(NONE);
        let MeterLabels {
            request_id,
            alias,
            key,
        } = &self.labels;
        let m = &self.metrics;
        let estimated_label = if estimated { "true" } else { "false" };
        for (direction, tokens) in [
            ("input", usage.prompt_tokens),
            ("output", usage.completion_tokens),
        ] {
            if tokens > 0 {
                m.tokens
                    .with_label_values(&[alias, backend, direction, estimated_label])
                    .inc_by(tokens);
            }
        }
        let mut cost_nano = 0;
        if let Some(serving) = &self.serving
            && usage.total_tokens > 0
        {
            cost_nano = serving.rate.cost_nano_usd(&usage);
            m.cost
                .with_label_values(&[alias, &serving.deployment, key])
                .inc_by(cost_nano as f64 / 1e9);
            for (deployment, rate) in self.charges.counterfactuals.iter() {
                m.counterfactual_cost
                    .with_label_values(&[alias, deployment])
                    .inc_by(rate.cost_nano_usd(&usage) as f64 / 1e9);
            }
            serving
                .lease
                .settle(self.prompt_estimate, &usage, !estimated);
            if let Some(limits) = &self.charges.limits {
                limits.settle(
                    self.prompt_estimate,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                );
            }
            self.charges.ledger.record(
                Row {
                    day: budget::today(),
                    key: key.clone(),
                    model: alias.clone(),
                    deployment: serving.deployment.clone(),
                },
                Totals {
                    requests: 1,
                    input_tokens: usage.prompt_tokens,
                    output_tokens: usage.completion_tokens,
                    cost_nano_usd: cost_nano,
                },
            );
        }
        // Only now, with the cost in the ledger, may the budget be freed.
        self.charges.reservation = None;
        let elapsed = self.started.elapsed();
        m.record_request(alias, backend, status, elapsed);
        m.gateway_overhead
            .with_label_values(&[alias])
            .observe(elapsed.saturating_sub(self.upstream_wait).as_secs_f64());
        tracing::info!(
            request_id,
            alias,
            key,
            backend,
            deployment = self
                .serving
                .as_ref()
                .map_or(NONE, |s| s.deployment.as_str()),
            status,
            duration_ms = elapsed.as_millis() as u64,
            input_tokens = usage.prompt_tokens,
            output_tokens = usage.completion_tokens,
            estimated,
            cost_usd = cost_nano as f64 / 1e9,
            "request done"
        );
    }
}

impl Meter {
    /// Records the request as [`finish`](Self::finish) does, from a task of
    /// its own that runs once the current one yields: the response's last
    /// bytes are written first, and the access-log line, metrics and ledger
    /// row (a tenth of a streamed request's CPU) do not hold them up. Should
    /// that task never run (the runtime is stopping), dropping it records
    /// the request all the same.
    pub fn finish_after_response(self, status: u16) {
        let ended = Ended(self, status);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(async move { drop(ended) })),
            Err(_) => drop(ended),
        }
    }
}

/// A meter whose request ended with a status, recorded when dropped.
struct Ended(Meter, u16);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.finish(self.1);
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
