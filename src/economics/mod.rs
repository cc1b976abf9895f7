//! `tollgate simulate`: what a traffic profile costs under a config —
//! each deployment policy allows, the alias's configured strategy
//! (spillover sends the peak above self-hosted capacity to the API tier),
//! all on the cheapest per-token API, all self-hosted — and the traffic at
//! which self-hosting breaks even with each API.
//!
//! Money is integer pico-dollars throughout (prices are micro-dollars per
//! million tokens, which is pico-dollars per token, as metering has them),
//! rounded half up to the cent only when shown.

mod model;
mod profile;
mod report;

pub use profile::{Profile, Traffic, from_ledger};
pub use report::Simulation;

use crate::config::{Backend, Config, Deployment, Strategy};
use crate::metering::cost::Rate;
use crate::openai::Endpoint;
use crate::routing::{PolicyScope, RequestFacts};
use model::{PICO_PER_MICRO, Pool, Sizing, peak_milli, spilled};
use report::{AliasCost, BreakEven, Choice, DeploymentCost, Refused, StrategyCost, Usd};

/// Prices `profile` under `config`.
pub fn simulate(config: &Config, profile: &Profile) -> Simulation {
    let mut deployments = Vec::new();
    let mut aliases = Vec::new();
    for traffic in &profile.traffic {
        let model = config
            .models
            .iter()
            .find(|m| m.alias == traffic.alias)
            .expect("a checked profile names the config's models");
        let alias = Alias::new(config, profile, traffic, &model.deployments);
        deployments.extend(alias.deployment_costs());
        aliases.push(alias.summary(model.strategy));
    }
    Simulation {
        days: profile.days,
        max_utilisation: profile.max_utilisation,
        deployments,
        aliases,
    }
}

/// One deployment policy allows for the alias's traffic.
struct Candidate<'a> {
    deployment: &'a Deployment,
    backend: &'a Backend,
    priced: Priced,
}

enum Priced {
    /// Pico-dollars one request of the profile's mean size costs.
    PerToken {
        request_pico: u128,
    },
    SelfHosted {
        sizing: Sizing,
    },
}

/// An alias's traffic and the deployments that may serve it.
struct Alias<'a> {
    traffic: &'a Traffic,
    profile: &'a Profile,
    region: Option<String>,
    options: Vec<Candidate<'a>>,
    refused: Vec<Refused>,
}

impl<'a> Alias<'a> {
    fn new(
        config: &'a Config,
        profile: &'a Profile,
        traffic: &'a Traffic,
        deployments: &'a [Deployment],
    ) -> Self {
        let region = traffic
            .region
            .clone()
            .or_else(|| config.policy.default_region.clone());
        // Policy as for a chat request of the mean size from the region.
        let facts = RequestFacts {
            endpoint: Endpoint::Chat,
            region: region.clone(),
            input_tokens: traffic.input_tokens,
            max_output_tokens: Some(traffic.output_tokens),
            ..RequestFacts::default()
        };
        let scope = PolicyScope::of(&config.policy, &facts);
        let mut options = Vec::new();
        let mut refused = Vec::new();
        for deployment in deployments {
            let backend = config
                .backends
                .iter()
                .find(|b| b.name == deployment.backend)
                .expect("a valid config's deployments name its backends");
            if let Err((rule, reason)) = scope.check(deployment, backend) {
                refused.push(Refused {
                    deployment: deployment.name.clone(),
                    rule: rule.name(),
                    reason,
                });
                continue;
            }
            let priced = match backend.self_hosted {
                Some(pool) => Priced::SelfHosted {
                    sizing: Sizing {
                        pool: Pool {
                            gpus: pool.gpus,
                            gpu_hour_micro_usd: (pool.gpu_hour_usd * 1e6).round() as u128,
                            throughput: pool.throughput_tokens_per_second,
                        },
                        fixed_pico: profile
                            .fixed
                            .iter()
                            .filter(|f| f.backend == backend.name)
                            .map(|f| u128::from(f.monthly_micro_usd) * PICO_PER_MICRO)
                            .sum(),
                        days: profile.days,
                        max_utilisation: profile.max_utilisation,
                        tokens_per_request: traffic.tokens_per_request(),
                        peak_to_mean_milli: traffic.peak_to_mean_milli,
                    },
                },
                None => {
                    let rate = Rate::of(deployment, backend);
                    Priced::PerToken {
                        request_pico: u128::from(traffic.input_tokens) * u128::from(rate.input)
                            + u128::from(traffic.output_tokens) * u128::from(rate.output),
                    }
                }
            };
            options.push(Candidate {
                deployment,
                backend,
                priced,
            });
        }
        Self {
            traffic,
            profile,
            region,
            options,
            refused,
        }
    }

    fn days(&self) -> u128 {
        u128::from(self.profile.days)
    }

    fn month_tokens(&self) -> u128 {
        self.traffic.tokens_per_day() * self.days()
    }

    fn per_token(&self) -> impl Iterator<Item = (&Candidate<'a>, u128)> {
        self.options.iter().filter_map(|o| match o.priced {
            Priced::PerToken { request_pico } => Some((o, request_pico)),
            Priced::SelfHosted { .. } => None,
        })
    }

    fn self_hosted(&self) -> impl Iterator<Item = (&Candidate<'a>, &Sizing)> {
        self.options.iter().filter_map(|o| match &o.priced {
            Priced::SelfHosted { sizing } => Some((o, sizing)),
            Priced::PerToken { .. } => None,
        })
    }

    /// The cheapest per-token deployment for this traffic, among those
    /// `keep` allows.
    fn cheapest_api(&self, keep: impl Fn(&Deployment) -> bool) -> Option<(&Candidate<'a>, u128)> {
        self.per_token()
            .filter(|(o, _)| keep(o.deployment))
            .min_by_key(|(_, pico)| *pico)
    }

    fn deployment_costs(&self) -> Vec<DeploymentCost> {
        let requests = u128::from(self.traffic.requests_per_day);
        self.options
            .iter()
            .map(|o| {
                let (month, sized) = match &o.priced {
                    Priced::PerToken { request_pico } => {
                        (request_pico * requests * self.days(), None)
                    }
                    Priced::SelfHosted { sizing } => {
                        (sizing.month_pico(u64::from(sizing.pool.gpus)), Some(sizing))
                    }
                };
                DeploymentCost::new(
                    self.traffic,
                    o.deployment,
                    o.backend,
                    month,
                    self.month_tokens(),
                    sized.map(|s| self.pool_facts(s, &o.backend.name)),
                    self.profile,
                )
            })
            .collect()
    }

    fn pool_facts(&self, sizing: &Sizing, backend: &str) -> report::PoolFacts {
        let mean = self.traffic.tokens_per_day();
        let flat_out = sizing.pool.capacity(sizing.pool.gpus, 1.0);
        report::PoolFacts {
            gpus: sizing.pool.gpus,
            gpus_needed: sizing.pool.gpus_needed(
                peak_milli(mean, self.traffic.peak_to_mean_milli),
                self.profile.max_utilisation,
            ),
            utilisation: if flat_out == 0 {
                0.0
            } else {
                mean as f64 / flat_out as f64
            },
            fixed: self
                .profile
                .fixed
                .iter()
                .filter(|f| f.backend == backend)
                .cloned()
                .collect(),
        }
    }

    fn summary(&self, strategy: Strategy) -> AliasCost {
        let all_api = self.cheapest_api(|_| true).map(|(o, request)| Choice {
            deployment: o.deployment.name.clone(),
            gpus: None,
            cost: Usd::period(
                request * u128::from(self.traffic.requests_per_day) * self.days(),
                self.profile.days,
            ),
        });
        let all_self_hosted = self
            .self_hosted()
            .map(|(o, sizing)| {
                let gpus = sizing
                    .gpus_for(self.traffic.requests_per_day)
                    .max(u64::from(sizing.pool.gpus));
                (o, gpus, sizing.month_pico(gpus))
            })
            .min_by_key(|(_, _, month)| *month);
        let break_even = match all_self_hosted.and_then(|(o, ..)| {
            self.self_hosted()
                .find(|(s, _)| s.deployment.name == o.deployment.name)
        }) {
            Some((_, sizing)) => self
                .per_token()
                .map(|(o, request)| {
                    let found = sizing.break_even(request);
                    BreakEven {
                        deployment: o.deployment.name.clone(),
                        requests_per_day: found.from,
                        cheaper_between: found.earlier,
                    }
                })
                .collect(),
            None => Vec::new(),
        };
        AliasCost {
            alias: self.traffic.alias.clone(),
            region: self.region.clone(),
            requests_per_day: self.traffic.requests_per_day,
            input_tokens: self.traffic.input_tokens,
            output_tokens: self.traffic.output_tokens,
            peak_to_mean: self.traffic.peak_to_mean_milli as f64 / profile::MILLI as f64,
            strategy: strategy.name(),
            configured: self.configured(strategy),
            all_api,
            all_self_hosted: all_self_hosted.map(|(o, gpus, month)| Choice {
                deployment: o.deployment.name.clone(),
                gpus: Some(gpus),
                cost: Usd::period(month, self.profile.days),
            }),
            break_even,
            refused: self.refused.clone(),
        }
    }

    /// The month's cost under the alias's strategy.
    fn configured(&self, strategy: Strategy) -> StrategyCost {
        match strategy {
            Strategy::Spillover(spill) => {
                let cap = spill
                    .price_cap_usd_per_mtok
                    .map(|usd| (usd * 1e6).round() as u64);
                let api = self.cheapest_api(|d| {
                    cap.is_none_or(|cap| d.price.output_micro_usd_per_mtok <= cap)
                });
                self.fill_self_hosted_first(|_| spill.high_load, api)
            }
            Strategy::Cost => {
                // The router's marginal price of a self-hosted token is the
                // pool's full-load price times its load: it takes traffic
                // until that passes the cheapest API's price for the same
                // request.
                let api = self.cheapest_api(|_| true);
                self.fill_self_hosted_first(
                    |o| match api {
                        Some((_, request)) => {
                            let full = u128::from(Rate::of(o.deployment, o.backend).output)
                                * u128::from(self.traffic.tokens_per_request());
                            if full == 0 {
                                1.0
                            } else {
                                (request as f64 / full as f64).min(1.0)
                            }
                        }
                        None => 1.0,
                    },
                    api,
                )
            }
            Strategy::Weighted => self.weighted(),
            Strategy::Latency => StrategyCost::unmodelled(
                "latency routes by measured speed, which a profile does not give; compare all_api and all_self_hosted",
            ),
        }
    }

    /// Self-hosted pools take traffic up to `load` of their throughput;
    /// what the peak puts above that goes to `api`, or is unserved
    /// without one.
    fn fill_self_hosted_first(
        &self,
        load: impl Fn(&Candidate<'a>) -> f64,
        api: Option<(&Candidate<'a>, u128)>,
    ) -> StrategyCost {
        let mut pools_month = 0;
        let mut capacity = 0;
        let mut backends: Vec<&str> = Vec::new();
        for (o, sizing) in self.self_hosted() {
            capacity += sizing.pool.capacity(sizing.pool.gpus, load(o));
            // A backend serving several deployments is paid for once.
            if !backends.contains(&o.backend.name.as_str()) {
                backends.push(&o.backend.name);
                pools_month += sizing.month_pico(u64::from(sizing.pool.gpus));
            }
        }
        let mean = self.traffic.tokens_per_day();
        let over = spilled(mean, self.traffic.peak_to_mean_milli, capacity);
        let per_request = u128::from(self.traffic.tokens_per_request());
        let (spill_month, spilled_to, unserved) = match api {
            Some((o, request)) if over > 0 => (
                over * request * self.days() / per_request,
                Some(o.deployment.name.clone()),
                0,
            ),
            Some(_) => (0, None, 0),
            None => (0, None, over),
        };
        StrategyCost {
            cost: Some(Usd::period(pools_month + spill_month, self.profile.days)),
            spilled_tokens_per_day: over - unserved,
            spilled_to,
            unserved_tokens_per_day: unserved,
            note: None,
        }
    }

    /// Each deployment its share by weight, whatever its load.
    fn weighted(&self) -> StrategyCost {
        let total: u128 = self
            .options
            .iter()
            .map(|o| u128::from(o.deployment.weight))
            .sum();
        let mut month = 0;
        let mut backends: Vec<&str> = Vec::new();
        for o in &self.options {
            match &o.priced {
                Priced::PerToken { request_pico } => {
                    month += request_pico
                        * u128::from(self.traffic.requests_per_day)
                        * u128::from(o.deployment.weight)
                        * self.days()
                        / total;
                }
                Priced::SelfHosted { sizing } => {
                    if !backends.contains(&o.backend.name.as_str()) {
                        backends.push(&o.backend.name);
                        month += sizing.month_pico(u64::from(sizing.pool.gpus));
                    }
                }
            }
        }
        StrategyCost {
            cost: (total > 0).then(|| Usd::period(month, self.profile.days)),
            spilled_tokens_per_day: 0,
            spilled_to: None,
            unserved_tokens_per_day: 0,
            note: None,
        }
    }
}
