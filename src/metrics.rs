//! Every Prometheus metric the gateway exports, declared once, in a registry
//! of its own. Label values come from config names and closed sets only.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub const REQUESTS_TOTAL: &str = "tollgate_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "tollgate_request_duration_seconds";
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "tollgate_time_to_first_token_seconds";
pub const TOKENS_TOTAL: &str = "tollgate_tokens_total";
pub const UPSTREAM_ATTEMPTS_TOTAL: &str = "tollgate_upstream_attempts_total";
pub const REQUESTS_IN_FLIGHT: &str = "tollgate_requests_in_flight";

/// Label value for "no alias" or "no backend" (the request never got there).
pub const NONE: &str = "none";

/// Latency buckets from 5 ms to 2 minutes: LLM calls span that range.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 120.0,
];

pub struct Metrics {
    registry: Registry,
    /// Requests answered, by alias, backend and HTTP status.
    pub requests: IntCounterVec,
    /// From the request's arrival to the last byte sent.
    pub request_duration: HistogramVec,
    /// From the request's arrival to the first streamed chunk sent.
    pub time_to_first_token: HistogramVec,
    /// Tokens by direction (`input`/`output`) and whether they were counted
    /// by the upstream or estimated by the gateway.
    pub tokens: IntCounterVec,
    /// Calls to upstreams by outcome (`ok`, or an error label).
    pub upstream_attempts: IntCounterVec,
    pub in_flight: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                REQUESTS_TOTAL,
                "Client requests answered, by model alias, backend and HTTP status.",
            ),
            &["alias", "backend", "status"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                REQUEST_DURATION_SECONDS,
                "Time from a request's arrival to its last byte sent.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["alias", "backend"],
        )
        .expect("valid metric");
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                TIME_TO_FIRST_TOKEN_SECONDS,
                "Time from a streaming request's arrival to its first chunk sent to the client.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["alias", "backend"],
        )
        .expect("valid metric");
        let tokens = IntCounterVec::new(
            Opts::new(
                TOKENS_TOTAL,
                "Tokens metered, by direction (input, output) and whether estimated.",
            ),
            &["alias", "backend", "direction", "estimated"],
        )
        .expect("valid metric");
        let upstream_attempts = IntCounterVec::new(
            Opts::new(
                UPSTREAM_ATTEMPTS_TOTAL,
                "Calls made to upstream backends, by outcome.",
            ),
            &["backend", "outcome"],
        )
        .expect("valid metric");
        let in_flight = IntGauge::new(
            REQUESTS_IN_FLIGHT,
            "Client requests being served right now.",
        )
        .expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(tokens.clone()),
            Box::new(upstream_attempts.clone()),
            Box::new(in_flight.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            request_duration,
            time_to_first_token,
            tokens,
            upstream_attempts,
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
