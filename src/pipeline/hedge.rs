//! TTFT hedging: when an alias's first deployment has sent no first byte
//! after its wait (fixed, or a quantile of the deployment's recent first
//! bytes), the same request also goes to the next deployment in the plan
//! whose worst case fits the alias's allowance; the first to answer
//! serves it and the other is cancelled. The allowance bounds what a
//! hedge adds: a key with a budget reserves it beside the first attempt's
//! worst case, so a budget holds with hedging as without.

use std::time::Duration;

use crate::config::{Deployment, Hedge, HedgeAfter};
use crate::health::DeploymentLive;
use crate::metering::budget::affordable_output;
use crate::metering::cost::Rate;
use crate::openai::InboundRequest;
use crate::routing::{ExplainedHedge, Plan, RequestFacts};
use crate::state::Snapshot;

/// How long the first attempt waits for its first byte before a hedge
/// goes out; `None` while the deployment has too few first bytes measured
/// for a quantile.
pub fn wait(hedge: &Hedge, first: &DeploymentLive, stream: bool) -> Option<Duration> {
    match hedge.after {
        HedgeAfter::Fixed(after) => Some(after),
        HedgeAfter::Quantile(q) => first.first_bytes.quantile(stream, q),
    }
}

/// What a hedge may cost: the alias's allowance, within what the key's
/// budget reservation holds for a hedge when the key has a budget.
pub fn allowance(hedge: &Hedge, reserved: Option<u64>) -> u64 {
    reserved.map_or(hedge.max_extra_nano_usd, |held| {
        held.min(hedge.max_extra_nano_usd)
    })
}

/// A hedge that fits its allowance at a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fit {
    /// The output limit it is sent with: `None` for the request's own.
    pub max_tokens: Option<u32>,
    /// Its worst case: the prompt and that limit at the deployment's
    /// prices.
    pub worst_nano_usd: u64,
}

/// Whether a hedge at `deployment` fits `allowance`. A request with
/// `max_tokens` fits when its worst case there does; one without is given
/// the output limit the allowance pays for in each of its answers, within
/// what the context window leaves (a hedge that wins may then end at
/// `length` where the first deployment would have gone on).
pub fn fit(
    request: &InboundRequest,
    facts: &RequestFacts,
    deployment: &Deployment,
    rate: &Rate,
    allowance: u64,
) -> Option<Fit> {
    let prompt = request.prompt_ceiling(facts.input_tokens_most, deployment.context_window);
    let ceiling = request.output_ceiling(deployment.context_window, facts.window_tokens());
    let generations = request.generations();
    let limit = match request.max_output_tokens() {
        Some(_) => ceiling,
        None => affordable_output(rate, prompt, allowance, generations).min(ceiling),
    };
    let worst_nano_usd =
        rate.estimate_nano_usd(prompt, limit.saturating_mul(u64::from(generations)));
    if limit == 0 || worst_nano_usd > allowance {
        return None;
    }
    let max_tokens = (request.max_output_tokens().is_none() && limit < ceiling)
        .then(|| u32::try_from(limit).unwrap_or(u32::MAX));
    Some(Fit {
        max_tokens,
        worst_nano_usd,
    })
}

/// The alias's hedge as `explain` shows it for a request: the wait now,
/// and the deployment a hedge would go to at the full allowance (a key's
/// budget may leave it less).
pub fn explain(
    snapshot: &Snapshot,
    request: &InboundRequest,
    model: usize,
    facts: &RequestFacts,
    plan: &Plan,
) -> Option<ExplainedHedge> {
    let config = &snapshot.config.models[model];
    let hedge = config.hedge.as_ref()?;
    let mut order = plan.order();
    let first = order.next()?;
    let after = wait(hedge, &snapshot.resolved(model, first).health, facts.stream);
    let to = order.find_map(|i| {
        let rate = &snapshot.resolved(model, i).rate;
        fit(
            request,
            facts,
            &config.deployments[i],
            rate,
            hedge.max_extra_nano_usd,
        )
        .map(|fit| (i, fit))
    });
    Some(ExplainedHedge {
        after_ms: after.map(|d| d.as_secs_f64() * 1000.0),
        after_quantile: match hedge.after {
            HedgeAfter::Quantile(q) => Some(q),
            HedgeAfter::Fixed(_) => None,
        },
        max_extra_usd: hedge.max_extra_nano_usd as f64 / 1e9,
        to: to.map(|(i, _)| config.deployments[i].name.clone()),
        worst_usd: to.map(|(_, fit)| fit.worst_nano_usd as f64 / 1e9),
    })
}
