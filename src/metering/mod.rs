//! Metering: usage from what the upstream reported, estimated from what
//! passed through when it reported nothing, priced, and recorded exactly
//! once per request — in the metrics, the log and the spend ledger — when
//! it ends or when the client goes away.

pub mod budget;
pub mod cost;
pub mod estimate;
mod image;
pub mod key_series;
pub mod prefix;
pub mod prompt;
pub mod usage;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use prometheus::{Histogram, IntGauge};

use crate::config::Licence;
use crate::error::GatewayError;
use crate::ledger::{Ledger, Row, Totals};
use crate::licence::LicenceBook;
use crate::limits::Limits;
use crate::metrics::series::{self, DeploymentSeries};
use crate::metrics::{Metrics, NONE};
use crate::openai::{ResponseView, Usage, UsageBound, UsageFault};
use crate::traces::{AttemptFacts, Outcome, RequestTrace};
use budget::Reservation;
use cost::{Counterfactual, Rate};
use key_series::OTHER_KEYS;
use prompt::PromptTokens;

/// HTTP status recorded for a response the client abandoned (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;

/// Output tokens are charged to rate limits in steps of this many as a
/// stream goes: a few atomic updates per answer, not one per chunk.
const CHARGE_STEP: u64 = 16;

/// What the meter reads from one response object or stream chunk.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed {
    /// Usage as the upstream reported it, or why it is not believed.
    pub usage: Option<Result<Usage, UsageFault>>,
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
    /// The inbound API's name (`Api::name`).
    pub api: &'static str,
    pub alias: String,
    /// The key's name, or `none` without keys.
    pub key: String,
    /// The key has series of its own (`key_series`); else its cost is
    /// counted under `(other)`.
    pub key_in_metrics: bool,
    /// The end user's hash (`licence::hll::hash`), when the request names
    /// one.
    pub user: Option<u64>,
}

/// The deployment an attempt went to, and what its tokens cost.
pub struct Serving {
    pub deployment: String,
    pub backend: String,
    pub rate: Rate,
    /// What a believable usage report holds at most.
    pub believable: UsageBound,
    /// The most output tokens, over all its answers, an upstream that
    /// honours the limit it was sent generates; `None` when it was sent
    /// none.
    pub output_limit: Option<u64>,
    pub licence: Option<Licence>,
    /// Counts the attempt against the deployment while it lives, and
    /// learns its usage.
    pub lease: Box<dyn Settle>,
    /// The deployment's series, kept with the snapshot.
    pub series: Arc<DeploymentSeries>,
}

/// What the deployment that served a request learns once its usage is
/// known (health's lease on it, held by the meter until then).
pub trait Settle: Send + Sync {
    /// About `tokens` more output tokens were generated, by `now`.
    fn generated(&self, tokens: u64, now: Instant);

    /// The request used `usage`; `reported` when the count is the
    /// upstream's own, not an estimate. `charged` is what its quota took
    /// so far: the prompt estimate at admission and output as generated.
    fn settle(&self, charged: u64, usage: &Usage, reported: bool, now: Instant);
}

/// What a request is charged against: the ledger, the key's budget
/// reservation (released once the cost is recorded), the alias's per-token
/// deployments for counterfactual costs, and the key's rate limits (which
/// took the prompt estimate at admission, take output as it is generated,
/// and settle to the actual usage at the end).
pub struct Charges {
    pub ledger: Arc<Ledger>,
    pub reservation: Option<Reservation>,
    pub counterfactuals: Arc<[Counterfactual]>,
    pub limits: Option<Arc<Limits>>,
    /// What each licence served, and the users of Llama's.
    pub licence: Arc<LicenceBook>,
}

/// Meters one client request across its upstream attempts, and records it
/// exactly once: when it ends, or when the client goes away (dropped).
pub struct Meter {
    metrics: Arc<Metrics>,
    labels: MeterLabels,
    charges: Charges,
    started: Instant,
    prompt: PromptTokens,
    /// The attempt in flight or answering; `None` between attempts.
    serving: Option<Serving>,
    /// A hedge: a second attempt in flight beside `serving`. Boxed, as is
    /// `cancelled`: rare, and the meter is moved along the request path.
    hedge: Option<Box<Serving>>,
    /// The attempt that lost a hedge, cancelled before its first byte: the
    /// upstream had the prompt, so it is charged the prompt, estimated.
    cancelled: Option<Box<Serving>>,
    /// The backend of the last attempt, for the request's labels.
    last_backend: Option<String>,
    /// Upstream attempts begun.
    attempts: usize,
    /// Why the request failed (the error's label), if it did.
    error: Option<&'static str>,
    /// The request's span and its attempts', when traces are exported.
    trace: Option<RequestTrace>,
    /// An upstream answered (its body or first chunk arrived).
    answered: bool,
    usage: Option<Usage>,
    /// An upstream's usage report was not believed (counted and logged
    /// once per request).
    usage_rejected: bool,
    output_chars: usize,
    /// Upstream chunks that carried output: each is at least a token.
    text_chunks: u64,
    /// Output tokens charged to the rate limits so far.
    charged_output: u64,
    first_chunk_sent: Option<Instant>,
    last_chunk_sent: Option<Instant>,
    between_tokens: Option<Histogram>,
    /// Chunks sent at the same instant as the one before them (read from
    /// the upstream together), whose zero gaps are not recorded yet.
    same_instant: u64,
    upstream_since: Option<Instant>,
    upstream_wait: Duration,
    /// What the request used is charged.
    settled: bool,
    recorded: bool,
    _in_flight: InFlight,
}

/// What a request used and cost.
struct Used {
    usage: Usage,
    estimated: bool,
    /// The serving deployment's cost, when the ledger has a row for it.
    serving_nano: Option<u64>,
    /// All the request cost: with a hedge's losers' prompts.
    cost_nano: u64,
}

impl Meter {
    pub fn new(
        metrics: Arc<Metrics>,
        labels: MeterLabels,
        charges: Charges,
        started: Instant,
        prompt: PromptTokens,
        in_flight: InFlight,
        trace: Option<RequestTrace>,
    ) -> Self {
        Self {
            metrics,
            labels,
            charges,
            started,
            prompt,
            serving: None,
            hedge: None,
            cancelled: None,
            last_backend: None,
            attempts: 0,
            error: None,
            trace,
            answered: false,
            usage: None,
            usage_rejected: false,
            output_chars: 0,
            text_chunks: 0,
            charged_output: 0,
            first_chunk_sent: None,
            last_chunk_sent: None,
            between_tokens: None,
            same_instant: 0,
            upstream_since: None,
            upstream_wait: Duration::ZERO,
            settled: false,
            recorded: false,
            _in_flight: in_flight,
        }
    }

    pub fn request_id(&self) -> &str {
        &self.labels.request_id
    }

    /// An upstream call starts. Returns the headers that carry its trace
    /// upstream: none unless traces are exported.
    pub fn begin_attempt(
        &mut self,
        serving: Serving,
        provider: &'static str,
        upstream_model: &str,
        began: Instant,
    ) -> HeaderMap {
        let headers = self.trace_attempt(&serving, provider, upstream_model, false);
        self.last_backend = Some(serving.backend.clone());
        self.serving = Some(serving);
        self.upstream_since = Some(began);
        headers
    }

    /// A hedge starts: a second upstream call beside the one in flight.
    pub fn begin_hedge(
        &mut self,
        serving: Serving,
        provider: &'static str,
        upstream_model: &str,
    ) -> HeaderMap {
        let headers = self.trace_attempt(&serving, provider, upstream_model, true);
        self.hedge = Some(Box::new(serving));
        headers
    }

    fn trace_attempt(
        &mut self,
        serving: &Serving,
        provider: &'static str,
        upstream_model: &str,
        hedge: bool,
    ) -> HeaderMap {
        self.attempts += 1;
        match &mut self.trace {
            Some(trace) => trace.begin_attempt(
                AttemptFacts {
                    provider,
                    upstream_model,
                    deployment: &serving.deployment,
                    number: self.attempts,
                },
                hedge,
            ),
            None => HeaderMap::new(),
        }
    }

    /// The hedge answered first: it serves the request, and the first
    /// attempt is cancelled when [`attempt_answered`](Self::attempt_answered)
    /// is called.
    pub fn hedge_won(&mut self) {
        let hedge = self.hedge.take().map(|hedge| *hedge);
        self.hedge = std::mem::replace(&mut self.serving, hedge).map(Box::new);
        self.last_backend = self.serving.as_ref().map(|s| s.backend.clone());
        if let Some(trace) = &mut self.trace {
            trace.hedge_won();
        }
    }

    /// The hedge failed with `error` before its first byte; the first
    /// attempt goes on.
    pub fn hedge_failed(&mut self, error: &GatewayError) {
        self.hedge = None;
        if let Some(trace) = &mut self.trace {
            trace.hedge_failed(error.label(), error.message().to_owned());
        }
    }

    /// The attempt failed with `error` before anything reached the client:
    /// nothing was generated, so it costs nothing; the next attempt may
    /// start.
    /// A hedge still in flight becomes the attempt.
    pub fn attempt_failed(&mut self, error: &GatewayError) {
        let now = Instant::now();
        self.upstream_done(now);
        self.serving = self.hedge.take().map(|hedge| *hedge);
        if let Some(serving) = &self.serving {
            self.last_backend = Some(serving.backend.clone());
            self.upstream_since = Some(now);
        }
        if let Some(trace) = &mut self.trace {
            trace.attempt_failed(error.label(), error.message().to_owned());
        }
    }

    /// The upstream answered (its whole body, or its first chunk) as the
    /// model `model` names, read only when the request is traced.
    /// A hedge still in flight is cancelled.
    pub fn attempt_answered(&mut self, model: impl FnOnce() -> Option<String>) {
        self.answered = true;
        if let Some(loser) = self.hedge.take() {
            self.cancelled = Some(loser);
            if let Some(trace) = &mut self.trace {
                trace.hedge_cancelled();
            }
        }
        if let Some(trace) = &mut self.trace
            && let Some(model) = model()
        {
            trace.answered_by(model);
        }
    }

    /// The request failed with `error` (its label), after its meter was
    /// made: recorded with it when it finishes.
    pub fn failed(&mut self, error: &'static str) {
        self.error = Some(error);
    }

    /// The upstream is done sending (the whole body, or the stream's end).
    pub fn upstream_done(&mut self, now: Instant) {
        if let Some(since) = self.upstream_since.take() {
            self.upstream_wait += now.saturating_duration_since(since);
        }
    }

    /// What an upstream answer or chunk, read at `now`, says of usage.
    pub fn observe(&mut self, observed: Observed, now: Instant) {
        match observed.usage {
            Some(Ok(usage)) => {
                let bound = self
                    .serving
                    .as_ref()
                    .map_or(UsageBound::NONE, |s| s.believable);
                if usage.fits(bound) {
                    self.usage = Some(usage);
                } else {
                    self.reject_usage(UsageFault::OverContextWindow);
                }
            }
            Some(Err(fault)) => self.reject_usage(fault),
            None => {}
        }
        if observed.text_chars > 0 {
            self.output_chars += observed.text_chars;
            self.text_chunks += 1;
            self.charge_generated(now);
        }
    }

    /// An upstream's usage is not believed: the request's usage is then
    /// estimated, as if none had been reported.
    fn reject_usage(&mut self, fault: UsageFault) {
        self.usage = None;
        if std::mem::replace(&mut self.usage_rejected, true) {
            return;
        }
        let backend = self.last_backend.as_deref().unwrap_or(NONE);
        self.metrics
            .usage_rejected
            .with_label_values(&[backend, fault.label()])
            .inc();
        tracing::warn!(
            request_id = self.labels.request_id,
            backend,
            reason = fault.describe(),
            "the upstream's usage report is not believable; the request's usage is estimated"
        );
    }

    /// The gateway ends the stream at the request's budget reservation,
    /// its output counted by the upstream (`running`) or estimated.
    #[cold]
    pub fn cut_at_reservation(&self, running: bool) {
        let backend = self.last_backend.as_deref().unwrap_or(NONE);
        let counted = if running { "upstream" } else { "gateway" };
        self.metrics
            .streams_cut
            .with_label_values(&[&self.labels.alias, backend, counted])
            .inc();
        tracing::info!(
            request_id = self.labels.request_id,
            backend,
            counted,
            "stream ended: its cost reached the key's budget reservation"
        );
    }

    /// Output generated so far, estimated from its text: at least a token
    /// a chunk.
    fn generated_estimate(&self) -> u64 {
        estimate::tokens_for_chars(self.output_chars).max(self.text_chunks)
    }

    /// [`generated_estimate`](Self::generated_estimate), and no more than
    /// the limit the upstream was sent, unless it sent more chunks of text
    /// than that, each a token at least: what the request is charged.
    fn generated_tokens(&self) -> u64 {
        let estimate = self.generated_estimate();
        match self.serving.as_ref().and_then(|s| s.output_limit) {
            Some(limit) => estimate.min(limit).max(self.text_chunks),
            None => estimate,
        }
    }

    /// Charges output tokens to the key's and the deployment's token
    /// limits as they are generated, so a long answer holds back the next
    /// request before it ends.
    fn charge_generated(&mut self, now: Instant) {
        let generated = self.generated_estimate();
        let due = generated.saturating_sub(self.charged_output);
        if due < CHARGE_STEP {
            return;
        }
        self.charged_output = generated;
        if let Some(limits) = &self.charges.limits {
            limits.charge(due, now);
        }
        if let Some(serving) = &self.serving {
            serving.lease.generated(due, now);
        }
    }

    /// Nano-dollars the request's budget reservation holds for its first
    /// attempt (the rest is a hedge's), if its key has a budget.
    pub fn reserved_nano_usd(&self) -> Option<u64> {
        self.charges
            .reservation
            .as_ref()
            .map(Reservation::first_nano_usd)
    }

    /// Nano-dollars the reservation holds for a hedge, if its key has a
    /// budget.
    pub fn reserved_for_hedge(&self) -> Option<u64> {
        self.charges
            .reservation
            .as_ref()
            .map(Reservation::hedge_nano_usd)
    }

    /// Whether a chunk of `observed` output takes the request past its
    /// budget reservation: the prompt of a hedge's cancelled attempt, the
    /// most its prompt can be (as reserved: within the context window of
    /// the deployment serving it), the output passed through
    /// and this chunk's would cost more than it holds. The stream then
    /// ends before the chunk, so a budget is never overrun by a request
    /// that generates past what was reserved for it, while an upstream
    /// that stops at the limit it was sent ends its stream itself, with
    /// its own usage. The output is counted as the fewest tokens it can
    /// be (a token a chunk, and a token each 16 bytes), so that text
    /// denser than the estimate's 4 bytes a token is not cut before its
    /// limit. `running`: the upstream was asked for its usage so far in
    /// every chunk, so the prompt and output are its counts, not the
    /// gateway's.
    #[inline(always)]
    pub fn passes_reservation(&self, observed: &Observed, running: bool) -> bool {
        self.charges.reservation.is_some() && self.passes_reserved(observed, running)
    }

    /// [`passes_reservation`](Self::passes_reservation), for a request
    /// that holds one: out of line, as most requests hold none.
    #[inline(never)]
    fn passes_reserved(&self, observed: &Observed, running: bool) -> bool {
        let (Some(reservation), Some(serving), 1..) = (
            &self.charges.reservation,
            &self.serving,
            observed.text_chars,
        ) else {
            return false;
        };
        let (prompt, output) = match &observed.usage {
            Some(Ok(usage)) if running => (usage.prompt_tokens, usage.completion_tokens),
            _ => (
                self.prompt.most.min(serving.believable.prompt),
                (self.text_chunks + 1).max(estimate::fewest_tokens_for_chars(
                    self.output_chars + observed.text_chars,
                )),
            ),
        };
        let cost = serving.rate.estimate_nano_usd(prompt, output);
        cost.saturating_add(self.cancelled_cost()) > reservation.nano_usd()
    }

    /// What a hedge's cancelled attempt costs: its prompt, estimated.
    fn cancelled_cost(&self) -> u64 {
        self.cancelled
            .as_ref()
            .map_or(0, |c| c.rate.estimate_nano_usd(self.prompt.estimate, 0))
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The usage reported so far, else the estimate of what passed.
    pub fn usage_so_far(&self) -> Usage {
        self.usage
            .unwrap_or_else(|| Usage::new(self.prompt.estimate, self.generated_tokens()))
    }

    /// A stream chunk was sent to the client at `now`: time to first
    /// token, then the time between tokens. Inlined into its one caller,
    /// on every chunk's path: called, it costs a stream 0.3k instructions.
    #[inline(always)]
    pub fn chunk_sent(&mut self, now: Instant) {
        match self.last_chunk_sent.replace(now) {
            None => {
                self.first_chunk_sent = Some(now);
                let labels = [
                    self.labels.alias.as_str(),
                    self.last_backend.as_deref().unwrap_or(NONE),
                ];
                let series = self.serving.as_ref().map(|s| &*s.series);
                let m = &self.metrics;
                series::record(
                    series.map(|s| &s.time_to_first_token),
                    || m.time_to_first_token.with_label_values(&labels),
                    |h| h.observe((now - self.started).as_secs_f64()),
                );
                // Taken once per stream, not once per chunk.
                series::record(
                    series.map(|s| &s.time_between_tokens),
                    || m.time_between_tokens.with_label_values(&labels),
                    |h| self.between_tokens = Some(h.clone()),
                );
            }
            Some(previous) if previous == now => self.same_instant += 1,
            Some(previous) => {
                if let Some(histogram) = &self.between_tokens {
                    histogram.observe((now - previous).as_secs_f64());
                }
            }
        }
    }

    /// Records the zero gaps of the chunks sent together since the last
    /// call, in one update of the histogram rather than one each (an
    /// update is four atomic operations).
    pub fn record_gaps(&mut self) {
        let gaps = std::mem::take(&mut self.same_instant);
        if let (Some(histogram), 1..) = (&self.between_tokens, gaps) {
            let local = histogram.local();
            for _ in 0..gaps {
                local.observe(0.0);
            }
            local.flush();
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
                Usage::new(self.prompt.estimate, self.generated_tokens()),
                true,
            ),
            None if status == CLIENT_CLOSED && self.serving.is_some() => {
                (Usage::new(self.prompt.estimate, 0), true)
            }
            None => (Usage::default(), false),
        }
    }

    /// Settles a request that holds its key's budget or a limit on its
    /// tokens before the last bytes of its answer go out, so a client that
    /// sends its next request as soon as it has this one's answer finds
    /// this one's cost spent, not still held. Other requests settle as
    /// they are recorded, after their last bytes.
    pub fn settle_held(&mut self, status: u16) {
        if self.charges.reservation.is_some()
            || (self.charges.limits.as_ref()).is_some_and(|limits| limits.limits_tokens())
        {
            let used = self.used(status);
            self.charge(&used, Instant::now());
        }
    }

    /// What the request used and cost.
    fn used(&self, status: u16) -> Used {
        let (usage, estimated) = self.final_usage(status);
        let hedge_nano: u64 = self.losers().map(|(_, cost)| cost).sum();
        let serving_nano = (self.serving.as_ref())
            .filter(|_| usage.total_tokens > 0 || hedge_nano > 0)
            .map(|serving| serving.rate.cost_nano_usd(&usage));
        Used {
            usage,
            estimated,
            serving_nano,
            cost_nano: serving_nano.unwrap_or(0) + hedge_nano,
        }
    }

    /// Charges what the request used, once: to the ledger and the licence
    /// book, the key's rate limits and budget, and the leases of the
    /// deployments it ran on.
    fn charge(&mut self, used: &Used, now: Instant) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let Used {
            usage, estimated, ..
        } = used;
        let charged = self.prompt.estimate.saturating_add(self.charged_output);
        if let Some(limits) = &self.charges.limits {
            limits.settle(charged, usage.total_tokens, now);
        }
        let prompt = Usage::new(self.prompt.estimate, 0);
        for (loser, _) in self.losers() {
            loser
                .lease
                .settle(self.prompt.estimate, &prompt, false, now);
        }
        if let Some(serving) = &self.serving {
            serving.lease.settle(charged, usage, !estimated, now);
            if used.serving_nano.is_some() {
                // One clock read for the ledger's day and the licence's hour.
                let now = time::OffsetDateTime::now_utc();
                let MeterLabels {
                    request_id,
                    api,
                    alias,
                    key,
                    user,
                    ..
                } = &self.labels;
                self.charges.ledger.record_request(
                    request_id,
                    Row {
                        day: now.date(),
                        key: key.clone(),
                        model: alias.clone(),
                        deployment: serving.deployment.clone(),
                        api: Cow::Borrowed(api),
                    },
                    Totals {
                        requests: 1,
                        input_tokens: usage.prompt_tokens,
                        output_tokens: usage.completion_tokens,
                        cost_nano_usd: used.cost_nano,
                    },
                );
                self.charges.licence.served(
                    alias,
                    serving.licence,
                    *user,
                    usage,
                    used.cost_nano,
                    now,
                );
            }
        }
        // Only now, with the cost in the ledger, may the budget be freed.
        if let Some(reservation) = self.charges.reservation.take() {
            reservation.settle(used.cost_nano);
        }
    }

    /// A hedge's loser, and a hedge the client left in flight, had the
    /// prompt: each is charged it, estimated, to its own deployment in the
    /// metrics and to the request's one record in the ledger. Each, with
    /// what it cost.
    fn losers(&self) -> impl Iterator<Item = (&Serving, u64)> {
        let prompt = Usage::new(self.prompt.estimate, 0);
        (self.cancelled.iter().chain(&self.hedge))
            .map(move |loser| (&**loser, loser.rate.cost_nano_usd(&prompt)))
    }

    /// The key as the cost metrics name it.
    fn key_label(&self) -> &str {
        if self.labels.key_in_metrics {
            &self.labels.key
        } else {
            OTHER_KEYS
        }
    }

    /// The tokens the request used, in the metrics.
    fn record_tokens(&self, usage: &Usage, estimated: bool) {
        let backend = self.last_backend.as_deref().unwrap_or(NONE);
        let MeterLabels { api, alias, .. } = &self.labels;
        let m = &self.metrics;
        let series = self.serving.as_ref().map(|s| &*s.series);
        let estimated_label = if estimated { "true" } else { "false" };
        for (output, direction, tokens) in [
            (false, "input", usage.prompt_tokens),
            (true, "output", usage.completion_tokens),
        ] {
            if tokens > 0 {
                series::record(
                    series.and_then(|s| s.tokens(api, output, estimated)),
                    || {
                        let labels = [api, alias.as_str(), backend, direction, estimated_label];
                        m.tokens.with_label_values(&labels)
                    },
                    |c| c.inc_by(tokens),
                );
            }
        }
        for (kind, tokens) in [
            ("read", usage.cached_tokens()),
            ("write", usage.cache_write_tokens()),
        ] {
            if tokens > 0 {
                m.prompt_cache_tokens
                    .with_label_values(&[alias.as_str(), backend, kind])
                    .inc_by(tokens);
            }
        }
    }

    /// Records the request once; later calls and the drop do nothing.
    pub fn finish(&mut self, status: u16) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        // One clock read for the request's end: its duration, and the
        // limits and quotas it settles.
        let now = Instant::now();
        self.record_gaps();
        self.upstream_done(now);
        let used = self.used(status);
        let Used {
            usage,
            estimated,
            serving_nano,
            cost_nano,
        } = used;
        self.record_tokens(&usage, estimated);
        self.charge(&used, now);
        let backend = self.last_backend.as_deref().unwrap_or(NONE);
        let MeterLabels {
            request_id,
            api,
            alias,
            key,
            key_in_metrics,
            ..
        } = &self.labels;
        let m = &self.metrics;
        for (loser, cost) in self.losers() {
            series::record(
                loser.series.tokens(api, false, true),
                || {
                    m.tokens.with_label_values(&[
                        api,
                        alias.as_str(),
                        &loser.backend,
                        "input",
                        "true",
                    ])
                },
                |c| c.inc_by(self.prompt.estimate),
            );
            m.cost
                .with_label_values(&[alias.as_str(), &loser.deployment, self.key_label()])
                .inc_by(cost as f64 / 1e9);
        }
        if let (Some(serving), Some(serving_nano)) = (&self.serving, serving_nano) {
            series::record(
                (!*key_in_metrics).then_some(&serving.series.cost_other_keys),
                || {
                    m.cost
                        .with_label_values(&[alias, &serving.deployment, self.key_label()])
                },
                |c| c.inc_by(serving_nano as f64 / 1e9),
            );
            for c in self.charges.counterfactuals.iter() {
                series::record(
                    Some(&c.series),
                    || {
                        m.counterfactual_cost
                            .with_label_values(&[alias, &c.deployment])
                    },
                    |s| s.inc_by(c.rate.cost_nano_usd(&usage) as f64 / 1e9),
                );
            }
        }
        let elapsed = now.saturating_duration_since(self.started);
        let series = self.serving.as_ref().map(|s| &*s.series);
        m.record_request(series, api, alias, backend, status, elapsed);
        series::record(
            series.map(|s| &s.gateway_overhead),
            || m.gateway_overhead.with_label_values(&[alias]),
            |h| h.observe(elapsed.saturating_sub(self.upstream_wait).as_secs_f64()),
        );
        let deployment = self.serving.as_ref().map(|s| s.deployment.as_str());
        tracing::info!(
            request_id,
            api,
            alias,
            key,
            backend,
            deployment = deployment.unwrap_or(NONE),
            status,
            attempts = self.attempts,
            duration_ms = elapsed.as_millis() as u64,
            upstream_ms = self.upstream_wait.as_millis() as u64,
            first_token_ms = self
                .first_chunk_sent
                .map(|t| (t - self.started).as_millis() as u64),
            input_tokens = usage.prompt_tokens,
            output_tokens = usage.completion_tokens,
            estimated,
            cost_usd = cost_nano as f64 / 1e9,
            hedge_cancelled = self.cancelled.as_ref().map(|c| c.deployment.as_str()),
            error = self.error,
            "request done"
        );
        if let Some(trace) = self.trace.take() {
            trace.finish(&Outcome {
                status,
                error: self.error,
                input_tokens: usage.prompt_tokens,
                output_tokens: usage.completion_tokens,
                estimated,
                cost_nano_usd: cost_nano,
                deployment,
                backend: self.last_backend.as_deref(),
                attempts: self.attempts,
            });
        }
    }
}

impl Meter {
    /// The meter of a request answered with `status`, to be recorded as
    /// [`finish`](Self::finish) does when the response's body lets it go:
    /// once the server has written the body's last bytes, so the
    /// access-log line, metrics and ledger row (a tenth of a streamed
    /// request's CPU) do not hold them up. A request that holds its key's
    /// budget or a limit on its tokens is charged now ([`settle_held`](Self::settle_held)).
    pub fn ended(mut self: Box<Self>, status: u16) -> Ended {
        self.settle_held(status);
        Ended(self, status)
    }
}

/// A meter whose request ended with a status, recorded when dropped.
pub struct Ended(Box<Meter>, u16);

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

#[cfg(test)]
pub mod testing {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use time::Date;

    use super::budget::{Reservation, SharedSpend};
    use super::*;

    /// A deployment with no health to tell.
    struct Unleased;

    impl Settle for Unleased {
        fn generated(&self, _: u64, _: Instant) {}
        fn settle(&self, _: u64, _: &Usage, _: bool, _: Instant) {}
    }

    /// A meter at $1 per Mtok in and $10 out, holding `reservation` and
    /// `limits`.
    pub fn meter_charging(
        reservation: Option<Reservation>,
        limits: Option<Arc<Limits>>,
    ) -> (Arc<Metrics>, Arc<Ledger>, Box<Meter>) {
        let metrics = Arc::new(Metrics::new());
        let ledger = Arc::new(Ledger::open(None).unwrap());
        let mut meter = Box::new(Meter::new(
            metrics.clone(),
            MeterLabels {
                request_id: "r".into(),
                api: "chat",
                alias: "a".into(),
                key: "k".into(),
                key_in_metrics: true,
                user: None,
            },
            Charges {
                ledger: ledger.clone(),
                reservation,
                counterfactuals: Arc::new([]),
                limits,
                licence: Arc::default(),
            },
            std::time::Instant::now(),
            PromptTokens {
                estimate: 10,
                most: 10,
            },
            InFlight::new(&metrics.in_flight),
            None,
        ));
        meter.begin_attempt(
            Serving {
                deployment: "a/b".into(),
                backend: "b".into(),
                rate: Rate {
                    input: 1_000,
                    output: 10_000,
                    ..Rate::default()
                },
                believable: UsageBound::new(8192, 1, 1),
                output_limit: None,
                licence: None,
                lease: Box::new(Unleased),
                series: Arc::default(),
            },
            "simulated",
            "m",
            std::time::Instant::now(),
        );
        meter.attempt_answered(|| None);
        (metrics, ledger, meter)
    }

    /// The shared store's side of a reservation: what it was told spent.
    #[derive(Default)]
    pub struct Sink(pub Mutex<Vec<u64>>);

    impl SharedSpend for Sink {
        fn spent(&self, _: &str, _: Option<&str>, _: u64, nano_usd: u64, _: Date) {
            self.0.lock().unwrap().push(nano_usd);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::sync::Arc;

    use super::budget::{Reservation, today};
    use super::testing::{Sink, meter_charging};
    use crate::config::PerMinute;
    use crate::limits::Limits;

    #[test]
    fn a_whole_answer_that_holds_a_budget_or_a_token_limit_is_charged_before_it_goes_out() {
        let requests = |metrics: &crate::metrics::Metrics| {
            metrics
                .requests
                .with_label_values(&["chat", "a", "b", "200"])
                .get()
        };
        // Its prompt estimated at 10 tokens, at 1,000 pico-dollars each.
        let sink = Arc::new(Sink::default());
        let reservation = Reservation::shared("k", 1_000, sink.clone(), "r".into());
        let (metrics, ledger, meter) = meter_charging(Some(reservation), None);
        let ended = meter.ended(200);
        assert_eq!(*sink.0.lock().unwrap(), [10]);
        assert_eq!(ledger.spent("k", today(), today()), 10);
        assert_eq!(requests(&metrics), 0, "recorded as the server lets it go");
        drop(ended);
        assert_eq!(requests(&metrics), 1);
        assert_eq!(*sink.0.lock().unwrap(), [10], "charged once");
        assert_eq!(ledger.spent("k", today(), today()), 10);

        // Holding no budget, nor a limit on tokens, it is charged once its
        // last bytes are written.
        for rpm in [None, Some(5)] {
            let limits = Limits::default();
            limits.configure(PerMinute {
                requests: rpm.and_then(NonZeroU32::new),
                tokens: None,
            });
            let (_, ledger, meter) = meter_charging(None, Some(Arc::new(limits)));
            let ended = meter.ended(200);
            assert_eq!(ledger.spent("k", today(), today()), 0, "rpm {rpm:?}");
            drop(ended);
            assert_eq!(ledger.spent("k", today(), today()), 10);
        }
        // A limit on tokens is settled to what the request used before.
        let limits = Limits::default();
        limits.configure(PerMinute {
            requests: None,
            tokens: NonZeroU32::new(1_000),
        });
        let (_, ledger, meter) = meter_charging(None, Some(Arc::new(limits)));
        let ended = meter.ended(200);
        assert_eq!(ledger.spent("k", today(), today()), 10);
        drop(ended);
    }
}
