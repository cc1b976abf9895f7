//! Validation of what routing reads: `[routing]`, `[policy]`, `[admin]`,
//! each alias's strategy, and the self-hosted and load settings of
//! backends.

use std::time::Duration;

use super::super::schema::{RawBackend, RawConfig, RawHedge, RawModel, RawSpillover};
use super::super::types::*;
use super::{MAX_PREFIX_BLOCKS, MAX_WAIT_MS, Validator};

const DEFAULT_MAX_ATTEMPTS: u32 = 3;
const DEFAULT_CIRCUIT_FAILURES: u32 = 5;
const DEFAULT_CIRCUIT_COOLDOWN_MS: u64 = 30_000;
const DEFAULT_EXPLORATION: f64 = 0.05;
const DEFAULT_OUTPUT_TOKENS: u32 = 256;
const DEFAULT_SCRAPE_INTERVAL_MS: u64 = 2_000;
const DEFAULT_HIGH_LOAD: f64 = 0.85;
const DEFAULT_LOW_LOAD: f64 = 0.7;
const DEFAULT_AFFINITY_EPSILON: f64 = 0.25;
/// About 260k prompt tokens per deployment: a large vLLM replica's cache.
const DEFAULT_PREFIX_BLOCKS: u32 = 16_384;

impl Validator<'_> {
    pub(super) fn routing(&mut self, raw: &RawConfig) -> RoutingSettings {
        let r = &raw.routing;
        let max_attempts = r.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if !(1..=10).contains(&max_attempts) {
            self.problem("routing.max_attempts", "must be between 1 and 10");
        }
        let circuit_failures = r.circuit_failures.unwrap_or(DEFAULT_CIRCUIT_FAILURES);
        if !(1..=1000).contains(&circuit_failures) {
            self.problem("routing.circuit_failures", "must be between 1 and 1000");
        }
        let cooldown = r.circuit_cooldown_ms.unwrap_or(DEFAULT_CIRCUIT_COOLDOWN_MS);
        if !(1..=MAX_WAIT_MS).contains(&cooldown) {
            self.problem(
                "routing.circuit_cooldown_ms",
                "must be between 1 and 3600000 (one hour)",
            );
        }
        let exploration = r.exploration.unwrap_or(DEFAULT_EXPLORATION);
        if !(0.0..=0.5).contains(&exploration) {
            self.problem(
                "routing.exploration",
                "must be between 0.0 and 0.5 (a share of requests)",
            );
        }
        let default_output_tokens = r.default_output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS);
        if default_output_tokens == 0 {
            self.problem("routing.default_output_tokens", "must be greater than 0");
        }
        let affinity_epsilon = r.affinity_epsilon.unwrap_or(DEFAULT_AFFINITY_EPSILON);
        if !(0.01..=10.0).contains(&affinity_epsilon) {
            self.problem(
                "routing.affinity_epsilon",
                "must be between 0.01 and 10: a bound deployment takes sessions up to \
                 (1 + affinity_epsilon) × the mean load (0.25 is 25% over the mean)",
            );
        }
        let prefix_blocks = r.prefix_blocks.unwrap_or(DEFAULT_PREFIX_BLOCKS);
        if !(1..=MAX_PREFIX_BLOCKS).contains(&prefix_blocks) {
            self.problem(
                "routing.prefix_blocks",
                format!("must be between 1 and {MAX_PREFIX_BLOCKS}"),
            );
        }
        RoutingSettings {
            max_attempts: max_attempts as usize,
            circuit_failures,
            circuit_cooldown: Duration::from_millis(cooldown),
            exploration,
            default_output_tokens,
            affinity_epsilon,
            prefix_blocks,
        }
    }

    pub(super) fn policy(&mut self, raw: &RawConfig) -> Policy {
        let p = &raw.policy;
        let eu_regions = match &p.eu_regions {
            Some(regions) => self.regions("policy.eu_regions", regions),
            None => vec!["eu".into()],
        };
        let default_region = p
            .default_region
            .as_ref()
            .map(|r| self.region("policy.default_region".into(), r));
        let mut residency: Vec<Residency> = Vec::new();
        for (i, rule) in p.residency.iter().enumerate() {
            let at = format!("policy.residency[{i}]");
            let request_region = self.region(format!("{at}.request_region"), &rule.request_region);
            if residency.iter().any(|r| r.request_region == request_region) {
                self.problem(
                    format!("{at}.request_region"),
                    format!(
                        "\"{}\" already has a residency rule; merge their backend_regions",
                        rule.request_region
                    ),
                );
            }
            if rule.backend_regions.is_empty() {
                self.problem(
                    format!("{at}.backend_regions"),
                    "lists no regions; name the backend regions that may serve these requests",
                );
            }
            let backend_regions =
                self.regions(&format!("{at}.backend_regions"), &rule.backend_regions);
            residency.push(Residency {
                request_region,
                backend_regions,
            });
        }
        Policy {
            eu_regions,
            llama_eu_multimodal_block: p.llama_eu_multimodal_block.unwrap_or(true),
            default_region,
            residency,
        }
    }

    /// A region as every comparison sees it: lowercase, so `"EU"` in the
    /// config, a header or explain is the region `"eu"`.
    pub(super) fn region(&mut self, path: String, region: &str) -> String {
        if region.trim().is_empty() {
            self.problem(path, "must not be empty");
        } else if !is_region(region) {
            self.problem(
                path,
                format!("\"{region}\" may use only letters, digits, - and _"),
            );
        }
        region.to_ascii_lowercase()
    }

    fn regions(&mut self, path: &str, regions: &[String]) -> Vec<String> {
        regions
            .iter()
            .enumerate()
            .map(|(i, r)| self.region(format!("{path}[{i}]"), r))
            .collect()
    }

    pub(super) fn admin(&mut self, raw: &RawConfig) -> Admin {
        Admin {
            token_sha256: self.token("admin.token_env", raw.admin.token_env.as_ref()),
        }
    }

    pub(super) fn metrics(&mut self, raw: &RawConfig) -> MetricsAccess {
        let top_keys = raw.metrics.top_keys.unwrap_or(DEFAULT_TOP_KEYS as u32);
        if top_keys > MAX_TOP_KEYS {
            self.problem(
                "metrics.top_keys",
                format!(
                    "must be at most {MAX_TOP_KEYS}; opt single keys in with keys[].metrics = true"
                ),
            );
        }
        MetricsAccess {
            token_sha256: self.token("metrics.token_env", raw.metrics.token_env.as_ref()),
            top_keys: top_keys.min(MAX_TOP_KEYS) as usize,
        }
    }

    /// The digest of the token held by environment variable `var`.
    fn token(&mut self, path: &str, var: Option<&String>) -> Option<[u8; 32]> {
        self.credential(path.into(), var?)
    }

    pub(super) fn self_hosted(
        &mut self,
        i: usize,
        b: &RawBackend,
        kind: BackendKind,
    ) -> Option<SelfHosted> {
        let at = |field: &str| format!("backends[{i}].{field}");
        let (gpu_hour_usd, gpus) = match (b.gpu_hour_usd, b.gpus) {
            (None, None) => {
                if b.throughput_tokens_per_second.is_some() {
                    self.problem(
                        at("throughput_tokens_per_second"),
                        "only a self-hosted backend (with gpu_hour_usd and gpus) takes this",
                    );
                }
                return None;
            }
            (Some(usd), Some(gpus)) => (usd, gpus),
            _ => {
                self.problem(
                    format!("backends[{i}]"),
                    "a self-hosted backend needs both gpu_hour_usd and gpus",
                );
                return None;
            }
        };
        if matches!(kind, BackendKind::Together | BackendKind::Groq) {
            self.problem(
                at("gpu_hour_usd"),
                "a managed API is priced per token on its deployments, not by GPU-hour",
            );
        }
        if !gpu_hour_usd.is_finite() || !(0.0..=10_000.0).contains(&gpu_hour_usd) {
            self.problem(
                at("gpu_hour_usd"),
                "must be USD per GPU-hour between 0 and 10000",
            );
        }
        if !(1..=100_000).contains(&gpus) {
            self.problem(at("gpus"), "must be between 1 and 100000");
        }
        let Some(throughput) = b.throughput_tokens_per_second else {
            self.problem(
                at("throughput_tokens_per_second"),
                "a self-hosted backend needs the tokens per second it processes flat out \
                 (input and output together), to turn GPU-hours into a price per token",
            );
            return None;
        };
        if !throughput.is_finite() || !(1.0..=100_000_000.0).contains(&throughput) {
            self.problem(
                at("throughput_tokens_per_second"),
                "must be between 1 and 100000000",
            );
        }
        Some(SelfHosted {
            gpu_hour_usd,
            gpus,
            throughput_tokens_per_second: throughput,
        })
    }

    /// vLLM and TGI servers are scraped by default; any backend can be
    /// scraped by giving `engine_metrics.url`.
    pub(super) fn engine_metrics(
        &mut self,
        i: usize,
        b: &RawBackend,
        kind: BackendKind,
        base_url: Option<&url::Url>,
    ) -> Option<EngineMetrics> {
        let at = |field: &str| format!("backends[{i}].engine_metrics.{field}");
        let raw = b.engine_metrics.clone().unwrap_or_default();
        let interval_ms = raw.interval_ms.unwrap_or(DEFAULT_SCRAPE_INTERVAL_MS);
        if !(100..=MAX_WAIT_MS).contains(&interval_ms) {
            self.problem(at("interval_ms"), "must be between 100 and 3600000");
        }
        if !raw.enabled.unwrap_or(true) {
            return None;
        }
        let url = match (&raw.url, kind, base_url) {
            (Some(_), BackendKind::Simulated, _) => {
                self.problem(at("url"), "a simulated backend has no engine to scrape");
                return None;
            }
            (Some(text), _, _) => self.url(at("url"), text)?,
            // The engine serves /metrics at its root, beside /v1.
            (None, BackendKind::Vllm | BackendKind::Tgi, Some(base)) => {
                base.join("/metrics").ok()?
            }
            (None, _, _) => return None,
        };
        Some(EngineMetrics {
            url,
            interval: Duration::from_millis(interval_ms),
        })
    }

    pub(super) fn strategy(&mut self, i: usize, m: &RawModel) -> Strategy {
        let at = |field: &str| format!("models[{i}].{field}");
        let name = m.strategy.as_deref().unwrap_or("cost");
        let strategy = match name {
            "cost" => Strategy::Cost,
            "latency" => Strategy::Latency,
            "weighted" => Strategy::Weighted,
            "spillover" => {
                Strategy::Spillover(self.spillover(i, &m.spillover.clone().unwrap_or_default()))
            }
            other => {
                self.problem(
                    at("strategy"),
                    format!(
                        "unknown strategy \"{other}\"; expected one of: {}",
                        Strategy::NAMES.join(", ")
                    ),
                );
                Strategy::Cost
            }
        };
        if m.spillover.is_some() && name != "spillover" {
            self.problem(
                at("spillover"),
                "only a model with strategy = \"spillover\" takes this table",
            );
        }
        strategy
    }

    /// An alias with a self-hosted deployment keeps sessions together by
    /// default: its engines' prefix caches are per replica. Per-token APIs
    /// cache per account across their own fleet, and an alias's per-token
    /// deployments are usually different providers chosen by price or
    /// latency, so those aliases leave affinity off unless asked.
    /// `backends` maps each backend name to whether it is self-hosted.
    pub(super) fn affinity(
        &mut self,
        i: usize,
        m: &RawModel,
        backends: &foldhash::HashMap<&str, bool>,
    ) -> Affinity {
        let Some(name) = m.affinity.as_deref() else {
            let self_hosted = m
                .deployments
                .iter()
                .any(|d| backends.get(d.backend.as_str()) == Some(&true));
            return if self_hosted {
                Affinity::Session
            } else {
                Affinity::None
            };
        };
        Affinity::parse(name).unwrap_or_else(|| {
            self.problem(
                format!("models[{i}].affinity"),
                format!(
                    "unknown affinity \"{name}\"; expected one of: {}",
                    Affinity::NAMES.join(", ")
                ),
            );
            Affinity::None
        })
    }

    /// An alias's hedge: a wait, fixed or a quantile of measured first
    /// bytes, and the allowance that bounds what it may add to a request.
    pub(super) fn hedge(&mut self, i: usize, m: &RawModel, h: &RawHedge) -> Option<Hedge> {
        let at = |field: &str| format!("models[{i}].hedge.{field}");
        if m.deployments.len() < 2 {
            self.problem(
                format!("models[{i}].hedge"),
                "a hedge goes to a second deployment; add one, or remove the hedge",
            );
        }
        let after = match (h.after_ms, h.after_quantile) {
            (Some(ms), None) if (1..=MAX_WAIT_MS).contains(&ms) => {
                HedgeAfter::Fixed(Duration::from_millis(ms))
            }
            (Some(_), None) => {
                self.problem(at("after_ms"), "must be between 1 and 3600000");
                return None;
            }
            (None, Some(q)) if (0.5..=0.999).contains(&q) => HedgeAfter::Quantile(q),
            (None, Some(_)) => {
                self.problem(
                    at("after_quantile"),
                    "must be between 0.5 and 0.999, e.g. 0.95 to hedge the slowest 5% of first bytes",
                );
                return None;
            }
            _ => {
                self.problem(
                    format!("models[{i}].hedge"),
                    "give exactly one of after_ms (a fixed wait) or after_quantile (of the deployment's measured first bytes)",
                );
                return None;
            }
        };
        let Some(usd) = h.max_extra_usd_per_request else {
            self.problem(
                at("max_extra_usd_per_request"),
                "required: the most a hedge may add to a request's cost, e.g. 0.01",
            );
            return None;
        };
        if !usd.is_finite() || !(0.0..=1_000.0).contains(&usd) {
            self.problem(
                at("max_extra_usd_per_request"),
                "must be an amount in USD between 0 and 1000",
            );
            return None;
        }
        Some(Hedge {
            after,
            max_extra_nano_usd: (usd * 1e9).round() as u64,
        })
    }

    fn spillover(&mut self, i: usize, s: &RawSpillover) -> Spillover {
        let at = |field: &str| format!("models[{i}].spillover.{field}");
        let high_load = s.high_load.unwrap_or(DEFAULT_HIGH_LOAD);
        let low_load = s.low_load.unwrap_or(DEFAULT_LOW_LOAD.min(high_load));
        if !(0.05..=1.0).contains(&high_load) {
            self.problem(at("high_load"), "must be between 0.05 and 1.0");
        }
        if !(0.0..=1.0).contains(&low_load) || low_load > high_load {
            self.problem(
                at("low_load"),
                "must be between 0.0 and high_load, so traffic does not flap",
            );
        }
        if let Some(cap) = s.price_cap_usd_per_mtok
            && (!cap.is_finite() || cap < 0.0)
        {
            self.problem(
                at("price_cap_usd_per_mtok"),
                "must be a price in USD per million output tokens, 0 or more",
            );
        }
        Spillover {
            high_load,
            low_load,
            price_cap_usd_per_mtok: s.price_cap_usd_per_mtok,
        }
    }
}
