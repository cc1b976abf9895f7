//! Every Prometheus metric the gateway exports, declared once, in a registry
//! of its own. Label values come from config names and closed sets only —
//! never raw client input. docs/metrics.md lists each.

use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Label value for "no alias", "no backend" or "no key" (the request never
/// got that far, or the gateway has no keys).
pub const NONE: &str = "none";

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

pub struct Metrics {
    registry: Registry,
    names: Vec<String>,
    /// Client requests answered, by alias, backend and HTTP status.
    pub requests: IntCounterVec,
    pub upstream_attempts: IntCounterVec,
    pub failovers: IntCounterVec,
    pub errors: IntCounterVec,
    pub request_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub time_between_tokens: HistogramVec,
    pub gateway_overhead: HistogramVec,
    pub tokens: IntCounterVec,
    pub cost: CounterVec,
    pub counterfactual_cost: CounterVec,
    pub selfhosted_cost: CounterVec,
    pub selfhosted_effective_price: GaugeVec,
    pub selfhosted_utilization: GaugeVec,
    pub budget_remaining: GaugeVec,
    pub budget_limit: GaugeVec,
    pub policy_blocks: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub routing_decisions: IntCounterVec,
    pub circuit_state: GaugeVec,
    pub backend_load: GaugeVec,
    pub engine_requests_waiting: GaugeVec,
    pub engine_requests_running: GaugeVec,
    pub engine_kv_cache_usage: GaugeVec,
    pub config_reloads: IntCounterVec,
    pub config_info: GaugeVec,
    pub in_flight: IntGauge,
}

/// Declares metrics into one registry, remembering their names.
struct Declare(Registry, std::cell::RefCell<Vec<String>>);

impl Declare {
    fn add<C: Collector + Clone + 'static>(&self, collector: C) -> C {
        self.1.borrow_mut().extend(
            collector
                .desc()
                .into_iter()
                .map(|desc| desc.fq_name.clone()),
        );
        self.0
            .register(Box::new(collector.clone()))
            .expect("metric names are unique");
        collector
    }

    fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn usd(&self, name: &str, help: &str, labels: &[&str]) -> CounterVec {
        self.add(CounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.add(GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn histogram(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        self.add(
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid metric"),
        )
    }
}

impl Metrics {
    pub fn new() -> Self {
        let d = Declare(Registry::new(), Default::default());
        let requests = d.counter(
            "tollgate_requests_total",
            "Client requests answered, by model alias, backend and HTTP status.",
            &["alias", "backend", "status"],
        );
        let upstream_attempts = d.counter(
            "tollgate_upstream_attempts_total",
            "Calls made to upstream backends, by outcome (ok, or an error kind).",
            &["backend", "outcome"],
        );
        let failovers = d.counter(
            "tollgate_failovers_total",
            "Requests moved on from a deployment to the next one, by the error kind that caused it.",
            &["alias", "deployment", "reason"],
        );
        let errors = d.counter(
            "tollgate_errors_total",
            "Error answers to clients, by kind.",
            &["alias", "kind"],
        );
        let request_duration = d.histogram(
            "tollgate_request_duration_seconds",
            "Time from a request's arrival to its last byte sent.",
            &["alias", "backend"],
            LATENCY_BUCKETS,
        );
        let time_to_first_token = d.histogram(
            "tollgate_time_to_first_token_seconds",
            "Time from a streaming request's arrival to its first chunk sent to the client.",
            &["alias", "backend"],
            LATENCY_BUCKETS,
        );
        let time_between_tokens = d.histogram(
            "tollgate_time_between_tokens_seconds",
            "Time between consecutive chunks of a stream sent to the client.",
            &["alias", "backend"],
            GAP_BUCKETS,
        );
        let gateway_overhead = d.histogram(
            "tollgate_gateway_overhead_seconds",
            "Time the gateway itself added to a request: total time minus time waiting on upstreams.",
            &["alias"],
            OVERHEAD_BUCKETS,
        );
        let tokens = d.counter(
            "tollgate_tokens_total",
            "Tokens metered, by direction (input, output) and whether the gateway estimated them.",
            &["alias", "backend", "direction", "estimated"],
        );
        let cost = d.usd(
            "tollgate_cost_usd_total",
            "Cost of the tokens served, in USD: list prices for APIs, the full-load amortised price for self-hosted backends.",
            &["alias", "deployment", "key"],
        );
        let counterfactual_cost = d.usd(
            "tollgate_counterfactual_cost_usd_total",
            "What the tokens served for an alias would have cost on each of its priced deployments, in USD.",
            &["alias", "deployment"],
        );
        let selfhosted_cost = d.usd(
            "tollgate_selfhosted_cost_usd_total",
            "Fixed cost of self-hosted backends accrued while the gateway ran (GPU-hours), in USD.",
            &["backend"],
        );
        let selfhosted_effective_price = d.gauge(
            "tollgate_selfhosted_effective_usd_per_mtok",
            "Fixed cost of a self-hosted backend divided by the tokens it served, per million tokens.",
            &["backend"],
        );
        let selfhosted_utilization = d.gauge(
            "tollgate_selfhosted_utilization_ratio",
            "Tokens a self-hosted backend served as a share of its configured full-load throughput.",
            &["backend"],
        );
        let budget_remaining = d.gauge(
            "tollgate_budget_remaining_usd",
            "What is left of a key's budget in the current period, in USD.",
            &["key", "period"],
        );
        let budget_limit = d.gauge(
            "tollgate_budget_limit_usd",
            "A key's budget for the period, in USD.",
            &["key", "period"],
        );
        let policy_blocks = d.counter(
            "tollgate_policy_blocks_total",
            "Requests refused because policy left no deployment (451), by rule.",
            &["alias", "rule"],
        );
        let rate_limited = d.counter(
            "tollgate_rate_limited_total",
            "Requests a rate limit held back: a key's (refused with 429) or a deployment's (skipped), by rpm or tpm.",
            &["scope", "name", "limit"],
        );
        let routing_decisions = d.counter(
            "tollgate_routing_decisions_total",
            "Deployments chosen first by the router, by strategy and reason.",
            &["alias", "strategy", "reason"],
        );
        let circuit_state = d.gauge(
            "tollgate_circuit_state",
            "Circuit breaker state per deployment: 1 for the current state (closed, half_open, open).",
            &["deployment", "state"],
        );
        let backend_load = d.gauge(
            "tollgate_backend_load_ratio",
            "A backend's load as a share of its capacity, as the router sees it.",
            &["backend"],
        );
        let engine_requests_waiting = d.gauge(
            "tollgate_engine_requests_waiting",
            "Requests queued in the inference engine, from its metrics.",
            &["backend"],
        );
        let engine_requests_running = d.gauge(
            "tollgate_engine_requests_running",
            "Requests in the inference engine's running batch, from its metrics.",
            &["backend"],
        );
        let engine_kv_cache_usage = d.gauge(
            "tollgate_engine_kv_cache_usage_ratio",
            "Share of the inference engine's KV cache in use, from its metrics.",
            &["backend"],
        );
        let config_reloads = d.counter(
            "tollgate_config_reloads_total",
            "Config reloads, by result (applied, invalid).",
            &["result"],
        );
        let config_info = d.gauge(
            "tollgate_config_info",
            "The active config: 1, with its version (a hash of its content) as a label.",
            &["version"],
        );
        let in_flight = d.add(
            IntGauge::new(
                "tollgate_requests_in_flight",
                "Client requests being served right now.",
            )
            .expect("valid metric"),
        );
        // Both outcomes exist from the start, so `increase()` sees the
        // first failure after a restart.
        for result in ["applied", "invalid"] {
            config_reloads.with_label_values(&[result]);
        }
        Self {
            registry: d.0,
            names: d.1.into_inner(),
            requests,
            upstream_attempts,
            failovers,
            errors,
            request_duration,
            time_to_first_token,
            time_between_tokens,
            gateway_overhead,
            tokens,
            cost,
            counterfactual_cost,
            selfhosted_cost,
            selfhosted_effective_price,
            selfhosted_utilization,
            budget_remaining,
            budget_limit,
            policy_blocks,
            rate_limited,
            routing_decisions,
            circuit_state,
            backend_load,
            engine_requests_waiting,
            engine_requests_running,
            engine_kv_cache_usage,
            config_reloads,
            config_info,
            in_flight,
        }
    }

    pub fn record_request(
        &self,
        alias: &str,
        backend: &str,
        status: u16,
        elapsed: std::time::Duration,
    ) {
        self.requests
            .with_label_values(&[alias, backend, &status.to_string()])
            .inc();
        self.request_duration
            .with_label_values(&[alias, backend])
            .observe(elapsed.as_secs_f64());
    }

    /// Marks `version` as the active config.
    pub fn set_config_version(&self, version: &str) {
        self.config_info.reset();
        self.config_info.with_label_values(&[version]).set(1.0);
    }

    /// The names of every metric family, for checks that a dashboard or an
    /// alert only asks for what exists.
    pub fn names(&self) -> &[String] {
        &self.names
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
