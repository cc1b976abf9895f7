//! Every Prometheus metric the gateway exports, declared once in
//! [`METRICS`]: registration, the typed handles in [`Metrics`],
//! `docs/metrics.md` and the observability test all derive from it. Label
//! values come from config names and closed sets only — never raw client
//! input.

pub mod series;

use std::collections::HashMap;

use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

pub use series::DeploymentSeries;

/// The label sets of a family's series, by label name.
fn series(family: &impl Collector) -> Vec<HashMap<String, String>> {
    family
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| {
            m.get_label()
                .iter()
                .map(|l| (l.name().to_owned(), l.value().to_owned()))
                .collect()
        })
        .collect()
}

fn by_ref(labels: &HashMap<String, String>) -> HashMap<&str, &str> {
    labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Label value for "no alias", "no backend" or "no key" (the request never
/// got that far, or the gateway has no keys); config refuses it as a name.
pub use crate::config::NONE;

/// One metric family: what `/metrics` exports and the docs describe.
#[derive(Debug)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub labels: &'static [Label],
    /// Upper bounds of the buckets; a histogram has them, nothing else does.
    pub buckets: &'static [f64],
}

/// The Prometheus type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The type as the text format's `# TYPE` line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A label and where its values come from, so the docs can show that each
/// set is bounded.
#[derive(Debug)]
pub struct Label {
    pub name: &'static str,
    pub values: &'static str,
}

const fn label(name: &'static str, values: &'static str) -> Label {
    Label { name, values }
}

const ALIAS: Label = label(
    "alias",
    "a model alias from config; `none` when the request was refused before its model was known",
);
const API: Label = label(
    "api",
    "the inbound API: `chat`, `completions`, `embeddings`, `messages` or `responses`",
);
const BACKEND: Label = label(
    "backend",
    "a backend name from config; `none` when no backend was called",
);
const DEPLOYMENT: Label = label(
    "deployment",
    "a deployment name from config (by default `alias/backend`)",
);
const KEY: Label = label(
    "key",
    "a key name from config, for keys with series of their own (`keys[].metrics = true`, or \
     among the `[metrics] top_keys` by spend this month); `(other)` for the rest; `none` when \
     the gateway has no keys",
);
const PERIOD: Label = label("period", "`daily` or `monthly`");

/// Latency buckets from 5 ms to 2 minutes: LLM calls span that range.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 120.0,
];
/// Gaps between streamed tokens: 1 ms to 5 s.
const GAP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// The gateway's own time: 10 µs to 1 s.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
    1.0,
];

/// A handle a [`MetricDef`] can build; its Rust type decides the family's
/// Prometheus type, so the table cannot disagree with the field.
trait Handle: Collector + Clone + 'static {
    const KIND: Kind;
    fn build(def: &MetricDef) -> prometheus::Result<Self>;
}

impl MetricDef {
    /// Name, help and labels: labels reach even an unlabelled handle, which
    /// then refuses to build.
    fn opts(&self) -> Opts {
        Opts::new(self.name, self.help)
            .variable_labels(self.labels.iter().map(|l| l.name.to_owned()).collect())
    }

    fn label_names(&self) -> Vec<&'static str> {
        self.labels.iter().map(|l| l.name).collect()
    }
}

impl Handle for IntCounterVec {
    const KIND: Kind = Kind::Counter;
    fn build(def: &MetricDef) -> prometheus::Result<Self> {
        Self::new(def.opts(), &def.label_names())
    }
}

/// Counts dollars, which come in fractions.
impl Handle for CounterVec {
    const KIND: Kind = Kind::Counter;
    fn build(def: &MetricDef) -> prometheus::Result<Self> {
        Self::new(def.opts(), &def.label_names())
    }
}

impl Handle for GaugeVec {
    const KIND: Kind = Kind::Gauge;
    fn build(def: &MetricDef) -> prometheus::Result<Self> {
        Self::new(def.opts(), &def.label_names())
    }
}

impl Handle for HistogramVec {
    const KIND: Kind = Kind::Histogram;
    fn build(def: &MetricDef) -> prometheus::Result<Self> {
        let opts = HistogramOpts::from(def.opts()).buckets(def.buckets.to_vec());
        Self::new(opts, &def.label_names())
    }
}

/// Unlabelled: a definition with labels fails here, when `Metrics` is built.
impl Handle for IntGauge {
    const KIND: Kind = Kind::Gauge;
    fn build(def: &MetricDef) -> prometheus::Result<Self> {
        Self::with_opts(def.opts())
    }
}

fn register<H: Handle>(registry: &Registry, def: &MetricDef) -> H {
    let handle = H::build(def).unwrap_or_else(|e| panic!("{}: {e}", def.name));
    registry
        .register(Box::new(handle.clone()))
        .unwrap_or_else(|e| panic!("{}: {e}", def.name));
    handle
}

/// Declares each metric once — its field in `Metrics`, its type and its
/// entry in `METRICS` — and registers the fields in table order.
macro_rules! metrics {
    ($(
        $field:ident: $ty:ty {
            name: $name:literal,
            help: $help:literal,
            labels: [$($label:expr),* $(,)?],
            $(buckets: $buckets:expr,)?
        }
    )*) => {
        /// Every metric family the gateway exports.
        pub const METRICS: &[MetricDef] = &[$(
            MetricDef {
                name: $name,
                kind: <$ty as Handle>::KIND,
                help: $help,
                labels: &[$($label),*],
                buckets: metrics!(@buckets $($buckets)?),
            },
        )*];

        /// Typed handles to every metric, in a registry of their own.
        pub struct Metrics {
            registry: Registry,
            $(#[doc = $help] pub $field: $ty,)*
        }

        impl Metrics {
            fn register_all(registry: Registry) -> Self {
                let mut defs = METRICS.iter();
                $(
                    let def = defs.next().expect("one entry per field");
                    let $field = register::<$ty>(&registry, def);
                )*
                Self { registry, $($field),* }
            }
        }
    };
    (@buckets) => { &[] };
    (@buckets $buckets:expr) => { $buckets };
}

metrics! {
    requests: IntCounterVec {
        name: "tollgate_requests_total",
        help: "Client requests answered, by inbound API, model alias, backend and HTTP status.",
        labels: [
            API,
            ALIAS,
            BACKEND,
            label(
                "status",
                "the HTTP status answered; `499` when the client went away first",
            ),
        ],
    }
    upstream_attempts: IntCounterVec {
        name: "tollgate_upstream_attempts_total",
        help: "Calls made to upstream backends, by outcome (ok, or an error kind).",
        labels: [BACKEND, label("outcome", "`ok`, or an error kind as for `kind`")],
    }
    failovers: IntCounterVec {
        name: "tollgate_failovers_total",
        help: "Requests moved on from a deployment to the next one, by the error kind that caused it.",
        labels: [
            ALIAS,
            DEPLOYMENT,
            label("reason", "the error kind that moved the request on, as for `kind`"),
        ],
    }
    hedges: IntCounterVec {
        name: "tollgate_hedges_total",
        help: "Requests whose first deployment had sent no first byte when the alias's hedge wait ran out, by outcome.",
        labels: [
            ALIAS,
            label("outcome", "`hedge_won`, `first_won`, `both_failed`, or `over_allowance` (no deployment left in the plan fit `max_extra_usd_per_request`, so none was sent)"),
        ],
    }
    errors: IntCounterVec {
        name: "tollgate_errors_total",
        help: "Error answers to clients, by kind.",
        labels: [
            ALIAS,
            label(
                "kind",
                "an error kind from the fixed set in `ErrorKind::label` (`src/error/kind.rs`), \
                 e.g. `bad_request`, `rate_limited`, `budget_exhausted`, `budget_held`, `upstream_error`, \
                 `upstream_timeout`, `no_deployment`",
            ),
        ],
    }
    request_duration: HistogramVec {
        name: "tollgate_request_duration_seconds",
        help: "Time from a request's arrival to its last byte sent.",
        labels: [ALIAS, BACKEND],
        buckets: LATENCY_BUCKETS,
    }
    time_to_first_token: HistogramVec {
        name: "tollgate_time_to_first_token_seconds",
        help: "Time from a streaming request's arrival to its first chunk sent to the client.",
        labels: [ALIAS, BACKEND],
        buckets: LATENCY_BUCKETS,
    }
    time_between_tokens: HistogramVec {
        name: "tollgate_time_between_tokens_seconds",
        help: "Time between consecutive chunks of a stream sent to the client.",
        labels: [ALIAS, BACKEND],
        buckets: GAP_BUCKETS,
    }
    gateway_overhead: HistogramVec {
        name: "tollgate_gateway_overhead_seconds",
        help: "Time the gateway itself added to a request: total time minus time waiting on upstreams.",
        labels: [ALIAS],
        buckets: OVERHEAD_BUCKETS,
    }
    tokens: IntCounterVec {
        name: "tollgate_tokens_total",
        help: "Tokens metered, by inbound API, direction (input, output) and whether the gateway estimated them.",
        labels: [
            API,
            ALIAS,
            BACKEND,
            label("direction", "`input` or `output`"),
            label(
                "estimated",
                "`true` when the upstream reported no usage and the gateway estimated it, \
                 else `false`",
            ),
        ],
    }
    prompt_cache_tokens: IntCounterVec {
        name: "tollgate_prompt_cache_tokens_total",
        help: "Prompt tokens the upstream reported read from its prompt cache or written to it (both also counted as input in tollgate_tokens_total).",
        labels: [
            ALIAS,
            BACKEND,
            label(
                "access",
                "`read` (served from the cache) or `write` (written to it)",
            ),
        ],
    }
    usage_rejected: IntCounterVec {
        name: "tollgate_usage_rejected_total",
        help: "Upstream usage reports the gateway did not believe and estimated instead, by reason.",
        labels: [
            BACKEND,
            label(
                "reason",
                "`not_a_count` (negative, fractional or not a number), `missing` (no prompt or \
                 completion count) or `over_context_window` (more than the deployment holds)",
            ),
        ],
    }
    streams_cut: IntCounterVec {
        name: "tollgate_streams_cut_at_reservation_total",
        help: "Streams the gateway ended before their upstream did, at the key's budget reservation, by how their output was counted.",
        labels: [
            ALIAS,
            BACKEND,
            label(
                "counted",
                "`upstream` (vLLM's own count of each chunk) or `gateway` (the fewest tokens \
                 the text can be: a token a chunk, a token each 16 bytes): an upstream that \
                 ignores the limit it was sent, or one that honours it and sent text in runs \
                 of one character, denser than 16 bytes a token, cut before that limit",
            ),
        ],
    }
    cost: CounterVec {
        name: "tollgate_cost_usd_total",
        help: "Cost of the tokens served, in USD: list prices for APIs, the full-load amortised price for self-hosted backends.",
        labels: [ALIAS, DEPLOYMENT, KEY],
    }
    counterfactual_cost: CounterVec {
        name: "tollgate_counterfactual_cost_usd_total",
        help: "What the tokens served for an alias would have cost on each of its priced deployments, in USD.",
        labels: [ALIAS, DEPLOYMENT],
    }
    selfhosted_cost: CounterVec {
        name: "tollgate_selfhosted_cost_usd_total",
        help: "Fixed cost of self-hosted backends accrued while the gateway ran (GPU-hours), in USD.",
        labels: [BACKEND],
    }
    selfhosted_effective_price: GaugeVec {
        name: "tollgate_selfhosted_effective_usd_per_mtok",
        help: "Fixed cost of a self-hosted backend divided by the tokens it served, per million tokens.",
        labels: [BACKEND],
    }
    selfhosted_utilization: GaugeVec {
        name: "tollgate_selfhosted_utilization_ratio",
        help: "Tokens a self-hosted backend served as a share of its configured full-load throughput.",
        labels: [BACKEND],
    }
    budget_remaining: GaugeVec {
        name: "tollgate_budget_remaining_usd",
        help: "What is left of a key's budget in the current period, in USD: with shared state, of the fleet's spend as of the last exchange with Redis, when that exchange was in the current day (`daily`) or month (`monthly`); otherwise of this replica's ledger.",
        labels: [KEY, PERIOD],
    }
    budget_limit: GaugeVec {
        name: "tollgate_budget_limit_usd",
        help: "A key's budget for the period, in USD.",
        labels: [KEY, PERIOD],
    }
    policy_blocks: IntCounterVec {
        name: "tollgate_policy_blocks_total",
        help: "Requests refused because policy left no deployment (451), by rule.",
        labels: [
            ALIAS,
            label(
                "rule",
                "a policy rule (`Rule::name` in `src/routing/policy.rs`): `residency`, \
                 `llama_eu_multimodal`, `endpoint`, `modality`, `context_window`, `tools`",
            ),
        ],
    }
    rate_limited: IntCounterVec {
        name: "tollgate_rate_limited_total",
        help: "Requests a rate limit held back: a key's (refused with 429) or a deployment's (skipped), by rpm or tpm.",
        labels: [
            label("scope", "`key` or `deployment`"),
            label("name", "the key's or the deployment's name from config"),
            label("limit", "`rpm` or `tpm`"),
        ],
    }
    routing_decisions: IntCounterVec {
        name: "tollgate_routing_decisions_total",
        help: "Deployments chosen first by the router, by strategy and reason.",
        labels: [
            ALIAS,
            label(
                "strategy",
                "the alias's routing strategy: `cost`, `latency`, `spillover` or `weighted`",
            ),
            label(
                "reason",
                "why the router put that deployment first, from the fixed set in \
                 `src/routing/strategy.rs`, e.g. `cheapest`, `fastest`, `exploring`, \
                 `first_tier`, `overflow`, `affinity` (the session's deployment, put first over the \
                 cost, latency or weighted choice; spillover keeps its tier's reason)",
            ),
        ],
    }
    circuit_state: GaugeVec {
        name: "tollgate_circuit_state",
        help: "Circuit breaker state per deployment: 1 for the current state (closed, half_open, open).",
        labels: [DEPLOYMENT, label("state", "`closed`, `half_open` or `open`")],
    }
    backend_load: GaugeVec {
        name: "tollgate_backend_load_ratio",
        help: "A backend's load as a share of its capacity, as the router sees it.",
        labels: [BACKEND],
    }
    engine_requests_waiting: GaugeVec {
        name: "tollgate_engine_requests_waiting",
        help: "Requests queued in the inference engine, from its metrics.",
        labels: [BACKEND],
    }
    engine_requests_running: GaugeVec {
        name: "tollgate_engine_requests_running",
        help: "Requests in the inference engine's running batch, from its metrics.",
        labels: [BACKEND],
    }
    engine_kv_cache_usage: GaugeVec {
        name: "tollgate_engine_kv_cache_usage_ratio",
        help: "Share of the inference engine's KV cache in use, from its metrics.",
        labels: [BACKEND],
    }
    engine_prefix_cache_hit_ratio: GaugeVec {
        name: "tollgate_engine_prefix_cache_hit_ratio",
        help: "Share of the prompt tokens the inference engine looked up in its prefix cache that it found there for a deployment's upstream model (vLLM's model_name), over its last scrape interval (vLLM's prefix_cache_hits_total / prefix_cache_queries_total).",
        labels: [BACKEND, DEPLOYMENT],
    }
    config_reloads: IntCounterVec {
        name: "tollgate_config_reloads_total",
        help: "Config reloads, by result (applied, invalid).",
        labels: [label("result", "`applied` or `invalid`")],
    }
    config_info: GaugeVec {
        name: "tollgate_config_info",
        help: "The active config: 1, with its version (a hash of its content) as a label.",
        labels: [label(
            "version",
            "the active config's version, a hash of its content; one series at a time",
        )],
    }
    config_warnings: IntGauge {
        name: "tollgate_config_warnings",
        help: "What `tollgate check` warns of in the active config (a key or token short enough to guess, a way for a user in the EU to reach a multimodal Llama, a Llama model without its licence): how many warnings. The log's `config warning` lines name each.",
        labels: [],
    }
    state_degraded: IntGauge {
        name: "tollgate_state_degraded",
        help: "1 while Redis, the fleet's shared state, does not answer and this replica serves on its own limits and budget share (or refuses, as configured); 0 otherwise or in memory mode.",
        labels: [],
    }
    state_replicas: IntGauge {
        name: "tollgate_state_replicas",
        help: "Replicas seen in the last minute through the shared state (1 in memory mode).",
        labels: [],
    }
    state_admissions: IntCounterVec {
        name: "tollgate_state_admissions_total",
        help: "Admissions against a key's or deployment's shared limits and budget in Redis mode, by where they were decided: `credit` (from what this replica took ahead from the fleet's limits and budget, without a round trip) or `redis` (in a call of the admission script).",
        labels: [label("from", "`credit` or `redis`")],
    }
    ledger_write_failing: IntGauge {
        name: "tollgate_ledger_write_failing",
        help: "1 while spend cannot be written where it belongs (the SQLite ledger, the spool, or the fleet's PostgreSQL) and waits in memory or in the spool for the next try; 0 otherwise.",
        labels: [],
    }
    licence_mau: IntGauge {
        name: "tollgate_licence_monthly_active_users",
        help: "Distinct end users (`licence.user_header`, else OpenAI `user` or `safety_identifier`, or Anthropic `metadata.user_id`) served by `licence = \"llama\"` deployments this calendar month (UTC): a HyperLogLog estimate, standard error 0.81%, merged across the fleet through the ledger and Redis.",
        labels: [],
    }
    licence_mau_alert: IntGauge {
        name: "tollgate_licence_mau_alert_users",
        help: "The monthly active users at which the licence alert fires: `licence.mau_threshold` (the Llama licence's 700 million by default) times `licence.mau_alert_fraction`.",
        labels: [],
    }
    in_flight: IntGauge {
        name: "tollgate_requests_in_flight",
        help: "Client requests being served right now.",
        labels: [],
    }
}

// Checked when compiling, so a histogram never falls back to the client
// library's default buckets.
const _: () = {
    let mut i = 0;
    while i < METRICS.len() {
        let def = &METRICS[i];
        assert!(
            matches!(def.kind, Kind::Histogram) != def.buckets.is_empty(),
            "a histogram has buckets, and only a histogram"
        );
        i += 1;
    }
};

impl Metrics {
    pub fn new() -> Self {
        let metrics = Self::register_all(Registry::new());
        // Both outcomes exist from the start, so `increase()` sees the
        // first failure after a restart.
        for result in ["applied", "invalid"] {
            metrics.config_reloads.with_label_values(&[result]);
        }
        metrics
    }

    /// Records a request answered with `status`, through the series of
    /// the deployment that served it, if one did.
    pub fn record_request(
        &self,
        series: Option<&DeploymentSeries>,
        api: &str,
        alias: &str,
        backend: &str,
        status: u16,
        elapsed: std::time::Duration,
    ) {
        series::record(
            series.and_then(|s| s.requests(api, status)),
            || {
                let mut status_text = itoa::Buffer::new();
                let status = status_text.format(status);
                self.requests
                    .with_label_values(&[api, alias, backend, status])
            },
            IntCounter::inc,
        );
        series::record(
            series.map(|s| &s.request_duration),
            || self.request_duration.with_label_values(&[alias, backend]),
            |h| h.observe(elapsed.as_secs_f64()),
        );
    }

    /// Removes the series that name a key `gone` says has no series of
    /// its own any more: its cost and its rate-limit refusals.
    pub fn remove_key_series(&self, gone: impl Fn(&str) -> bool) {
        for labels in series(&self.cost) {
            if labels.get("key").is_some_and(|key| gone(key)) {
                let _ = self.cost.remove(&by_ref(&labels));
            }
        }
        for labels in series(&self.rate_limited) {
            let key = (labels.get("scope").map(String::as_str) == Some("key"))
                .then(|| labels.get("name"))
                .flatten();
            if key.is_some_and(|key| gone(key)) {
                let _ = self.rate_limited.remove(&by_ref(&labels));
            }
        }
    }

    /// Marks `version` as the active config.
    pub fn set_config_version(&self, version: &str) {
        self.config_info.reset();
        self.config_info.with_label_values(&[version]).set(1.0);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
