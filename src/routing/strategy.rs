//! The strategies that order the deployments policy and health kept. Each
//! gives every deployment a score (shown by explain) and a reason, kept as
//! numbers and turned into text only when explain shows it.

use std::cell::OnceCell;
use std::fmt;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Instant;

use super::facts::RequestFacts;
use crate::config::{RoutingSettings, Spillover, Strategy};
use crate::health::DeploymentLive;
use crate::state::PlanRow;

/// A deployment still in the running, with what the strategies read.
pub struct Contender<'a> {
    pub index: usize,
    pub row: &'a PlanRow,
    /// The backend's load, read at most once per plan: the strategies and
    /// affinity each ask for it.
    pub load: OnceCell<Option<f64>>,
}

impl<'a> Contender<'a> {
    pub fn new(index: usize, row: &'a PlanRow) -> Self {
        Self {
            index,
            row,
            load: OnceCell::new(),
        }
    }

    pub fn live(&self) -> &'a DeploymentLive {
        &self.row.live
    }

    /// The backend's load now (`BackendLive::load`), read once.
    pub fn load(&self, now: Instant) -> Option<f64> {
        *self
            .load
            .get_or_init(|| self.row.backend_live.load_of(self.row.load, now))
    }
}

/// A strategy's verdict on one option: its place, score and reason, or
/// that it is dropped (spillover's price cap).
pub struct Ranked {
    pub index: usize,
    pub score: f64,
    pub reason: Why,
    /// Why, as a closed set for the routing-decisions metric.
    pub label: &'static str,
    pub dropped: bool,
}

pub struct Inputs<'a> {
    pub strategy: Strategy,
    pub facts: &'a RequestFacts,
    pub settings: &'a RoutingSettings,
    /// Expected completion tokens: the requested max, else the alias's
    /// observed mean, else the configured default.
    pub expected_output: u64,
    /// The lowest `tier` among all of the alias's deployments.
    pub first_tier: u32,
    /// The deployment the request's session is bound to, and the share
    /// of its prompt that deployment is expected to read from its cache.
    pub bound: Option<(usize, f64)>,
    pub now: Instant,
}

/// The strategy's verdicts, one per option in the options' order, and
/// the order they go in. The order is sorted, not the verdicts: a
/// position is a few bytes, a verdict with its reason about a hundred.
pub struct Ranking {
    pub ranked: Vec<Ranked>,
    /// Positions in `ranked`, best first; dropped ones come last.
    pub order: Vec<usize>,
}

/// Orders the options, best first; dropped ones come last.
pub fn rank(options: &[Contender<'_>], inputs: &Inputs<'_>, rng: &mut fastrand::Rng) -> Ranking {
    let mut ranking = match inputs.strategy {
        Strategy::Cost => by_cost(options, inputs),
        Strategy::Latency => by_latency(options, inputs, rng),
        Strategy::Spillover(spill) => by_spillover(options, inputs, spill),
        Strategy::Weighted => by_weight(options, rng),
    };
    let Ranking { ranked, order } = &mut ranking;
    if ranked.iter().any(|r| r.dropped) {
        order.sort_by_key(|&p| ranked[p].dropped);
    }
    ranking
}

/// `x` as an integer in the order of [`f64::total_cmp`].
fn sortable(x: f64) -> u64 {
    let bits = x.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | 1 << 63
    }
}

/// `ranked` in the order of `key` (of a verdict and its position), lowest
/// first. Each key sorts as one 64-bit word, the option's position in its
/// lowest bits, so keys that differ only there (a relative 2^-42 for
/// 1,024 options) are equal and keep config order; one word sorts faster
/// than two.
fn lowest_first(ranked: Vec<Ranked>, mut key: impl FnMut(usize, &Ranked) -> f64) -> Ranking {
    let bits = usize::BITS - ranked.len().saturating_sub(1).leading_zeros();
    let mut keys: Vec<u64> = ranked
        .iter()
        .enumerate()
        .map(|(p, r)| sortable(key(p, r)) >> bits << bits | p as u64)
        .collect();
    keys.sort_unstable();
    let mask = (1u64 << bits) - 1;
    let order = keys.into_iter().map(|k| (k & mask) as usize).collect();
    Ranking { ranked, order }
}

/// In the order of their scores, lowest first.
fn by_score(ranked: Vec<Ranked>) -> Ranking {
    lowest_first(ranked, |_, r| r.score)
}

/// Why a deployment is where it is in a plan.
#[derive(Debug, Clone)]
pub enum Why {
    Cost {
        usd: f64,
        priced: Priced,
        /// The expected share of the prompt read from the bound
        /// deployment's cache.
        hit: Option<f64>,
    },
    Latency(Timing),
    /// Tried first, out of the latency order, to measure it again.
    Exploring(Timing),
    Spill {
        tier: u32,
        load: Option<f64>,
        saturated: bool,
    },
    OverCap {
        tier: u32,
        price: f64,
        cap: f64,
    },
    Weight {
        weight: u32,
        total: u32,
    },
    /// Dropped by policy or health, already in words.
    Text(String),
}

/// What the latency strategy knows of a deployment.
#[derive(Debug, Clone, Copy)]
pub enum Timing {
    Expected { ms: f64, stream: bool },
    Unmeasured,
}

impl fmt::Display for Timing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Expected { ms, stream } => write!(
                f,
                "expected {ms:.0} ms {}",
                if *stream {
                    "to first token"
                } else {
                    "to the whole answer"
                }
            ),
            Self::Unmeasured => f.write_str("not measured yet: tried first to measure it"),
        }
    }
}

/// How an expected cost was priced.
#[derive(Debug, Clone, Copy)]
pub enum Priced {
    SelfHosted { load: f64, per_mtok: f64 },
    List { input: f64, output: f64 },
}

impl fmt::Display for Priced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SelfHosted { load, per_mtok } => write!(
                f,
                "self-hosted at {:.0}% load: ${per_mtok:.4}/Mtok marginal",
                load * 100.0
            ),
            Self::List { input, output } => {
                write!(f, "{input} input + {output} output tokens at list price")
            }
        }
    }
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cost { usd, priced, hit } => {
                write!(f, "expected ${usd:.6} ({priced}")?;
                if let Some(hit) = hit {
                    write!(
                        f,
                        "; the session's deployment, {:.0}% of the prompt expected from its cache",
                        hit * 100.0
                    )?;
                }
                f.write_str(")")
            }
            Self::Latency(timing) => timing.fmt(f),
            Self::Exploring(timing) => write!(f, "exploring ({timing})"),
            Self::Spill {
                tier,
                load,
                saturated,
            } => {
                write!(f, "tier {tier}, ")?;
                match load {
                    Some(l) => write!(f, "load {l:.2}")?,
                    None => f.write_str("load unknown")?,
                }
                f.write_str(if *saturated {
                    ": saturated, overflow goes on"
                } else {
                    ": taking traffic"
                })
            }
            Self::OverCap { tier, price, cap } => write!(
                f,
                "tier {tier}: ${price}/Mtok output is over the price cap of ${cap}"
            ),
            Self::Weight { weight, total } => write!(f, "weight {weight} of {total}"),
            Self::Text(text) => f.write_str(text),
        }
    }
}

/// Expected USD for this request on this option, and how it was priced:
/// the metered cost of the expected usage at the deployment's rate, with
/// the expected cache hit read at the cached price on the deployment the
/// session is bound to (another has not seen the session's prefix). Self-
/// hosted GPUs are paid for by the hour whether used or not, so their
/// marginal token is that rate (the pool's full-load amortised price)
/// scaled by load: free when idle, the full price when saturated.
#[inline]
pub fn expected_cost(option: &Contender<'_>, inputs: &Inputs<'_>) -> (f64, Priced, Option<f64>) {
    let (input, output) = (inputs.facts.input_tokens, inputs.expected_output);
    let hit = inputs
        .bound
        .filter(|(bound, _)| *bound == option.index)
        .map(|(_, hit)| hit);
    // In floating point: a ranking needs no exact pico-dollars, and u128
    // to f64 (the metered cost's type) is a library call.
    let cached = hit.map_or(0.0, |hit| (input as f64 * hit).round());
    let row = option.row;
    let pico = (input as f64 - cached) * row.input_price
        + cached * row.cached_input_price
        + output as f64 * row.output_price;
    // A multiplication: a division's latency would hold up every option.
    let usd = pico * 1e-12;
    if row.self_hosted {
        let load = option.load(inputs.now).unwrap_or(0.0).clamp(0.0, 1.0);
        let per_mtok = row.output_price * 1e-6 * load;
        (usd * load, Priced::SelfHosted { load, per_mtok }, hit)
    } else {
        let priced = Priced::List {
            input: input as f64,
            output: output as f64,
        };
        (usd, priced, hit)
    }
}

fn by_cost(options: &[Contender<'_>], inputs: &Inputs<'_>) -> Ranking {
    let ranked: Vec<Ranked> = options
        .iter()
        .map(|o| {
            let (usd, priced, hit) = expected_cost(o, inputs);
            Ranked {
                index: o.index,
                score: usd,
                reason: Why::Cost { usd, priced, hit },
                label: "cheapest",
                dropped: false,
            }
        })
        .collect();
    by_score(ranked)
}

fn by_latency(options: &[Contender<'_>], inputs: &Inputs<'_>, rng: &mut fastrand::Rng) -> Ranking {
    let ranked: Vec<Ranked> = options
        .iter()
        .map(
            |o| match o.live().expected_latency_ms(inputs.facts.stream) {
                Some(ms) => Ranked {
                    index: o.index,
                    score: ms,
                    reason: Why::Latency(Timing::Expected {
                        ms,
                        stream: inputs.facts.stream,
                    }),
                    label: "fastest",
                    dropped: false,
                },
                // Unmeasured goes first, so it gets measured.
                None => Ranked {
                    index: o.index,
                    score: 0.0,
                    reason: Why::Latency(Timing::Unmeasured),
                    label: "unmeasured",
                    dropped: false,
                },
            },
        )
        .collect();
    let mut ranking = by_score(ranked);
    let Ranking { ranked, order } = &mut ranking;
    if order.len() > 1 && rng.f64() < inputs.settings.exploration {
        // A share of requests tries another deployment first, so one that
        // was slow, or has recovered, is measured again.
        let explored = order.remove(rng.usize(1..order.len()));
        order.insert(0, explored);
        let explored = &mut ranked[explored];
        if let Why::Latency(timing) = explored.reason {
            explored.reason = Why::Exploring(timing);
        }
        explored.label = "exploring";
    }
    ranking
}

fn by_spillover(options: &[Contender<'_>], inputs: &Inputs<'_>, spill: Spillover) -> Ranking {
    // The cap spares the alias's first tier as configured, not the first
    // tier still standing: an outage of the self-hosted tier must not lift
    // the cost ceiling.
    let first_tier = inputs.first_tier;
    let (keys, ranked): (Vec<(f64, u64)>, Vec<Ranked>) = options
        .iter()
        .map(|o| {
            let load = o.load(inputs.now);
            let saturated = update_saturation(o.live(), load, spill);
            let (usd, _, _) = expected_cost(o, inputs);
            let tier = o.row.tier;
            let output_price = o.row.output_usd_per_mtok;
            let over_cap = tier > first_tier
                && spill
                    .price_cap_usd_per_mtok
                    .is_some_and(|cap| output_price > cap);
            let reason = if over_cap {
                Why::OverCap {
                    tier,
                    price: output_price,
                    cap: spill.price_cap_usd_per_mtok.unwrap_or_default(),
                }
            } else {
                Why::Spill {
                    tier,
                    load,
                    saturated,
                }
            };
            let label = match (over_cap, saturated) {
                (true, _) => "over_price_cap",
                (false, true) => "saturated",
                (false, false) if tier == first_tier => "first_tier",
                (false, false) => "overflow",
            };
            let ranked = Ranked {
                index: o.index,
                score: load.unwrap_or(0.0),
                reason,
                label,
                dropped: over_cap,
            };
            let group = u64::from(saturated) << 32 | u64::from(tier);
            ((usd, group), ranked)
        })
        .unzip();
    // Deployments taking traffic first, by tier, cheapest first within a
    // tier; saturated ones stay in the plan as a last resort. Sorted by
    // cost, then stably by the group (saturation, tier): one group, as
    // usual, is one run the stable sort only reads.
    let mut ranking = lowest_first(ranked, |p, _| keys[p].0);
    ranking.order.sort_by_key(|&p| keys[p].1);
    ranking
}

/// Hysteresis: a deployment stops taking traffic at `high_load` and takes
/// it again only below `low_load`. Unknown load never saturates.
pub fn saturated(live: &DeploymentLive, load: Option<f64>, spill: Spillover) -> bool {
    let was = live.saturated.load(AtomicOrdering::Relaxed);
    match load {
        None => false,
        Some(l) if was => l >= spill.low_load,
        Some(l) => l >= spill.high_load,
    }
}

/// [`saturated`], remembered for the next decision.
fn update_saturation(live: &DeploymentLive, load: Option<f64>, spill: Spillover) -> bool {
    let was = live.saturated.load(AtomicOrdering::Relaxed);
    let now = saturated(live, load, spill);
    if now != was {
        live.saturated.store(now, AtomicOrdering::Relaxed);
    }
    now
}

/// A weighted random order (Efraimidis–Spirakis): each deployment comes
/// first with probability weight / total weight.
fn by_weight(options: &[Contender<'_>], rng: &mut fastrand::Rng) -> Ranking {
    let total: u32 = options.iter().map(|o| o.row.weight).sum();
    let ranked = options
        .iter()
        .map(|o| Ranked {
            index: o.index,
            score: f64::from(o.row.weight),
            reason: Why::Weight {
                weight: o.row.weight,
                total,
            },
            label: "weighted",
            dropped: false,
        })
        .collect();
    // The highest u^(1/weight) first: in the order of its log,
    // ln(u) / weight, which spares an exponential per option.
    lowest_first(ranked, |_, r| -(rng.f64().ln() / r.score))
}

#[cfg(test)]
mod tests {
    use super::{Ranked, Timing, Why, lowest_first, sortable};

    #[test]
    fn lowest_first_keeps_config_order_among_equal_keys() {
        let keys = [0.5, 0.25, 0.5, f64::INFINITY, 0.0, 0.25];
        let ranked = (0..keys.len())
            .map(|index| Ranked {
                index,
                score: 0.0,
                reason: Why::Latency(Timing::Unmeasured),
                label: "",
                dropped: false,
            })
            .collect();
        let ranking = lowest_first(ranked, |p, _| keys[p]);
        assert_eq!(ranking.order, [4, 1, 5, 0, 2, 3]);
    }

    #[test]
    fn sortable_keeps_the_order_of_total_cmp() {
        let values = [
            3.5,
            -0.0,
            0.0,
            f64::INFINITY,
            -2.25,
            1e-300,
            f64::NEG_INFINITY,
            3.5,
            -1e300,
            0.001,
        ];
        for a in values {
            for b in values {
                assert_eq!(sortable(a).cmp(&sortable(b)), a.total_cmp(&b), "{a} {b}");
            }
        }
    }
}
