//! A plan: every deployment of the alias, kept or dropped with a reason a
//! person can read, and the kept ones in the order they will be tried.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::affinity::{self, Binding};
use super::facts::RequestFacts;
use super::policy::{self, Rule};
use super::strategy::{self, Contender, Inputs, Ranking, Timing, Why};
use crate::config::{Affinity, Key, Strategy};
use crate::error::GatewayError;
use crate::health::{CircuitView, DeploymentLive};
use crate::state::Snapshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanStatus {
    /// At least one deployment may be tried.
    Ready,
    /// Policy leaves no deployment (451).
    Blocked,
    /// Health or capacity leaves none (503).
    Unavailable,
    /// Each deployment policy allows is rate limited: cooling down after
    /// an upstream's 429, or at its quota (429, as the upstreams would).
    RateLimited,
}

#[derive(Debug, Clone)]
pub struct Candidate {
    /// Index into the model's deployments.
    pub deployment: usize,
    pub kept: bool,
    /// Why, in words when displayed (explain).
    pub reason: Why,
    pub score: Option<f64>,
    /// The policy rule that dropped it.
    pub rule: Option<Rule>,
    /// When it may be usable again (open circuit, 429 cooldown, quota).
    pub retry_in: Option<Duration>,
    /// Dropped as rate limited: cooling down after a 429, or at its quota.
    pub limited: bool,
    /// The strategy's reason as a closed set, for metrics.
    pub label: &'static str,
}

impl Candidate {
    /// A deployment policy or health dropped, and why.
    fn dropped(
        deployment: usize,
        reason: String,
        rule: Option<Rule>,
        retry_in: Option<Duration>,
    ) -> Self {
        Self {
            deployment,
            kept: false,
            reason: Why::Text(reason),
            score: None,
            rule,
            retry_in,
            limited: false,
            label: "dropped",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub model: usize,
    pub strategy: &'static str,
    pub status: PlanStatus,
    /// Completion tokens the request is expected to generate.
    pub expected_output: u64,
    /// The kept deployments in the order they will be tried, then the
    /// dropped ones in config order.
    pub candidates: Vec<Candidate>,
    /// What affinity bound the request to, for an alias with affinity.
    pub affinity: Option<Binding>,
}

impl Plan {
    /// Deployments to try, in order.
    pub fn order(&self) -> impl Iterator<Item = usize> + '_ {
        self.candidates
            .iter()
            .take_while(|c| c.kept)
            .map(|c| c.deployment)
    }

    pub fn http_status(&self) -> u16 {
        match self.status {
            PlanStatus::Ready => 200,
            PlanStatus::Blocked => 451,
            PlanStatus::Unavailable => 503,
            PlanStatus::RateLimited => 429,
        }
    }

    /// The policy rules that dropped deployments, each once.
    pub fn rules(&self) -> Vec<Rule> {
        let mut rules: Vec<Rule> = self.candidates.iter().filter_map(|c| c.rule).collect();
        rules.sort_unstable();
        rules.dedup();
        rules
    }

    /// Whether every deployment policy allows that the plan dropped was
    /// dropped as rate limited: none is out for another reason.
    pub fn dropped_only_as_rate_limited(&self) -> bool {
        only_rate_limited(&self.candidates)
    }

    /// The soonest a dropped deployment may be usable again.
    pub fn retry_after(&self) -> Duration {
        self.retry_after_with(None)
    }

    /// The same, counting a deployment skipped at attempt time that has
    /// room again after `skipped`.
    pub fn retry_after_with(&self, skipped: Option<Duration>) -> Duration {
        self.candidates
            .iter()
            .filter_map(|c| c.retry_in)
            .chain(skipped)
            .min()
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_secs(1))
    }

    /// The plan as `tollgate explain` and `POST /admin/explain` print it.
    pub fn explain(&self, snapshot: &Snapshot) -> Explained {
        let model = &snapshot.config.models[self.model];
        Explained {
            model: model.alias.clone(),
            strategy: self.strategy,
            status: self.http_status(),
            chosen: self
                .order()
                .next()
                .map(|i| model.deployments[i].name.clone()),
            candidates: self
                .candidates
                .iter()
                .map(|c| {
                    let d = &model.deployments[c.deployment];
                    ExplainedCandidate {
                        deployment: d.name.clone(),
                        backend: d.backend.clone(),
                        kept: c.kept,
                        reason: c.reason.to_string(),
                        score: c.score,
                    }
                })
                .collect(),
            affinity: self.affinity.map(|b| ExplainedAffinity {
                mode: b.mode.name(),
                session: b.session.to_string(),
                bound: b.bound.map(|i| model.deployments[i].name.clone()),
                first: b.bound.is_some() && b.bound == self.order().next(),
                moved: b.moved,
                prefix_tokens: (b.mode == Affinity::Prefix).then_some(b.matched.tokens),
            }),
            hedge: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Explained {
    pub model: String,
    pub strategy: &'static str,
    pub status: u16,
    pub chosen: Option<String>,
    pub candidates: Vec<ExplainedCandidate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<ExplainedAffinity>,
    /// The alias's hedge, as it stands for this request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hedge: Option<ExplainedHedge>,
}

/// When a request would be hedged, and where to.
#[derive(Debug, Serialize)]
pub struct ExplainedHedge {
    /// The wait for the first deployment's first byte, in milliseconds:
    /// fixed, or its `after_quantile` of the recent first bytes; `None`
    /// while too few are measured (no hedge is sent then).
    pub after_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_quantile: Option<f64>,
    pub max_extra_usd: f64,
    /// The deployment a hedge would go to: the first after the chosen one
    /// whose worst case fits the allowance.
    pub to: Option<String>,
    /// That worst case: the prompt and the output limit there.
    pub worst_usd: Option<f64>,
}

/// The session a request is and the deployment it is bound to.
#[derive(Debug, Serialize)]
pub struct ExplainedAffinity {
    pub mode: &'static str,
    /// Where the session came from and its hash.
    pub session: String,
    pub bound: Option<String>,
    /// Whether the bound deployment is tried first (under `cost`, a
    /// per-token deployment cheaper even after the bound one's expected
    /// cache hit goes first).
    pub first: bool,
    /// The session's own deployment was saturated or at its load bound.
    pub moved: bool,
    /// Prefix affinity: prompt tokens the bound deployment served last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_tokens: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ExplainedCandidate {
    pub deployment: String,
    pub backend: String,
    pub kept: bool,
    pub reason: String,
    pub score: Option<f64>,
}

/// Plans one request for the model at index `model` of the snapshot.
pub fn plan(
    snapshot: &Snapshot,
    model: usize,
    facts: &RequestFacts,
    now: Instant,
    rng: &mut fastrand::Rng,
) -> Plan {
    let config = &snapshot.config;
    let m = &config.models[model];
    let rows = snapshot.plan_table(model);
    let mut dropped = Vec::new();
    let mut contenders = Vec::with_capacity(rows.len());
    let mut blocked_by_policy = 0;
    let scope = policy::Scope::of(&config.policy, facts);
    for (index, row) in rows.iter().enumerate() {
        // The common case from the row alone: policy admits it and its
        // live state has nothing set.
        if !scope.admits(row) {
            let deployment = &m.deployments[index];
            let backend = snapshot.backend(snapshot.resolved(model, index).backend);
            if let Err((rule, reason)) = scope.check(deployment, backend) {
                blocked_by_policy += 1;
                let reason = format!("policy {}: {reason}", rule.name());
                dropped.push(Candidate::dropped(index, reason, Some(rule), None));
                continue;
            }
        }
        if row.flags.get() != 0
            && let Some(candidate) = unhealthy(index, &row.live, facts, now)
        {
            dropped.push(candidate);
            continue;
        }
        contenders.push(Contender::new(index, row));
    }
    let binding = facts
        .session
        .filter(|_| m.affinity != Affinity::None)
        .map(|session| {
            affinity::bind(
                &contenders,
                m.affinity,
                session,
                &facts.blocks,
                m.strategy,
                config.routing.affinity_epsilon,
                now,
            )
        });
    let bound = binding.and_then(|b| b.bound);

    let inputs = Inputs {
        strategy: m.strategy,
        facts,
        settings: &config.routing,
        expected_output: facts.max_output_tokens.unwrap_or_else(|| {
            snapshot
                .alias_live(model)
                .mean_output_tokens()
                .map_or(u64::from(config.routing.default_output_tokens), |m| {
                    m.round() as u64
                })
        }),
        now,
        first_tier: rows.iter().map(|r| r.tier).min().unwrap_or(0),
        bound: bound.and_then(|index| {
            let hit = match binding.map(|b| b.matched) {
                Some(matched) if m.affinity == Affinity::Prefix => {
                    Some((matched.tokens as f64 / facts.input_tokens.max(1) as f64).min(1.0))
                }
                _ => rows[index].live.expected_cache_hit(),
            };
            hit.map(|hit| (index, hit))
        }),
    };
    let mut ranking = strategy::rank(&contenders, &inputs, rng);
    if let Some(bound) = bound {
        put_first(&mut ranking, bound, m.strategy, &contenders);
    }
    let Ranking { mut ranked, order } = ranking;
    let mut candidates = Vec::with_capacity(m.deployments.len());
    candidates.extend(order.into_iter().map(|p| {
        let r = &mut ranked[p];
        Candidate {
            deployment: r.index,
            kept: !r.dropped,
            reason: std::mem::replace(&mut r.reason, Why::Latency(Timing::Unmeasured)),
            score: Some(r.score),
            rule: None,
            retry_in: None,
            limited: false,
            label: r.label,
        }
    }));
    let kept = candidates.iter().filter(|c| c.kept).count();
    candidates.extend(dropped);
    if candidates.len() > kept + 1 {
        candidates[kept..].sort_by_key(|c| c.deployment);
    }
    let status = if kept > 0 {
        PlanStatus::Ready
    } else if blocked_by_policy == m.deployments.len() {
        PlanStatus::Blocked
    } else if only_rate_limited(&candidates) {
        PlanStatus::RateLimited
    } else {
        PlanStatus::Unavailable
    };
    Plan {
        model,
        strategy: m.strategy.name(),
        status,
        expected_output: inputs.expected_output,
        candidates,
        affinity: binding,
    }
}

/// Whether each of `candidates` dropped for anything but policy was dropped
/// as rate limited.
fn only_rate_limited(candidates: &[Candidate]) -> bool {
    candidates
        .iter()
        .filter(|c| !c.kept && c.rule.is_none())
        .all(|c| c.limited)
}

/// The deployment at `index` dropped for its health (an open or probing
/// circuit, a 429 cooldown, its quota), if it is.
fn unhealthy(
    index: usize,
    live: &DeploymentLive,
    facts: &RequestFacts,
    now: Instant,
) -> Option<Candidate> {
    let drop = |reason, retry_in| Some(Candidate::dropped(index, reason, None, retry_in));
    let last = || {
        live.last_failure()
            .map(|message| format!(" (the last: {message})"))
            .unwrap_or_default()
    };
    let limited = |reason, retry_in| {
        Some(Candidate {
            limited: true,
            ..Candidate::dropped(index, reason, None, retry_in)
        })
    };
    match live.circuit.view(now) {
        CircuitView::Open { failures, probe_in } => {
            return drop(
                format!(
                    "circuit open after {failures} consecutive failures{}; probe in {} ms",
                    last(),
                    probe_in.as_millis()
                ),
                Some(probe_in),
            );
        }
        CircuitView::HalfOpen { probing: true } => {
            return drop(
                "circuit half-open: its probe request is in flight".into(),
                None,
            );
        }
        CircuitView::Closed | CircuitView::HalfOpen { probing: false } => {}
    }
    if let Some(left) = live.cooling_for(now) {
        return limited(
            format!(
                "rate limited upstream{}: cooling down for {} ms more (retry-after)",
                last(),
                left.as_millis()
            ),
            Some(left),
        );
    }
    // A request its quota can never hold is not held back by a rate.
    match live.quota.blocked(facts.input_tokens, now)? {
        (reason, None) => drop(reason, None),
        (reason, retry_in) => limited(reason, retry_in),
    }
}

/// Puts the bound deployment first, unless the strategy dropped it. Under
/// `cost` it goes first when it and the cheapest are both self-hosted, or
/// when its expected cost, its expected cache hit counted, is no more
/// than the cheapest's. Its metric reason is `affinity`, except under
/// spillover, which keeps its tier's.
fn put_first(
    ranking: &mut Ranking,
    bound: usize,
    strategy: Strategy,
    contenders: &[Contender<'_>],
) {
    let Ranking { ranked, order } = ranking;
    let Some(at) = order
        .iter()
        .position(|&p| ranked[p].index == bound && !ranked[p].dropped)
    else {
        return;
    };
    let self_hosted = |index: usize| {
        contenders
            .iter()
            .any(|c| c.index == index && c.row.self_hosted)
    };
    let (first, chosen) = (&ranked[order[0]], &ranked[order[at]]);
    let takes_first = match strategy {
        Strategy::Cost => {
            (self_hosted(first.index) && self_hosted(bound)) || chosen.score <= first.score
        }
        Strategy::Latency | Strategy::Spillover(_) | Strategy::Weighted => true,
    };
    if takes_first {
        // Spillover binds within the tier it chose, so the tier's reason
        // (`first_tier`, `overflow`) still says why; elsewhere the session
        // overrode the strategy's first choice.
        let label = match strategy {
            Strategy::Spillover(_) => first.label,
            Strategy::Cost | Strategy::Latency | Strategy::Weighted => "affinity",
        };
        let chosen = order.remove(at);
        ranked[chosen].label = label;
        order.insert(0, chosen);
    }
}

/// Whether policy lets some deployment of `model` serve the request.
pub fn policy_allows(snapshot: &Snapshot, model: usize, facts: &RequestFacts) -> bool {
    let config = &snapshot.config;
    let scope = policy::Scope::of(&config.policy, facts);
    config.models[model]
        .deployments
        .iter()
        .enumerate()
        .any(|(i, d)| {
            let backend = snapshot.backend(snapshot.resolved(model, i).backend);
            scope.check(d, backend).is_ok()
        })
}

/// The error for a plan that has nothing to try: 451 naming the rules and
/// what would make the request servable, or 429 or 503 with
/// `retry-after`.
pub fn refusal(
    snapshot: &Snapshot,
    plan: &Plan,
    facts: &RequestFacts,
    key: Option<&Key>,
) -> GatewayError {
    let alias = &snapshot.config.models[plan.model].alias;
    if matches!(
        plan.status,
        PlanStatus::Unavailable | PlanStatus::RateLimited
    ) {
        let deployments = &snapshot.config.models[plan.model].deployments;
        let why: Vec<String> = plan
            .candidates
            .iter()
            .map(|c| format!("{}: {}", deployments[c.deployment].name, c.reason))
            .collect();
        let refuse = match plan.status {
            PlanStatus::RateLimited => GatewayError::deployments_rate_limited,
            _ => GatewayError::no_deployment_available,
        };
        return refuse(alias, &why.join("; "), plan.retry_after());
    }
    let policy = &snapshot.config.policy;
    let why: Vec<String> = plan
        .rules()
        .into_iter()
        .map(|rule| rule.explain(policy, facts))
        .collect();
    let others: Vec<&str> = snapshot
        .aliases_for(key)
        .filter(|other| other != alias)
        .filter(|other| {
            snapshot
                .model_index(other)
                .is_some_and(|i| policy_allows(snapshot, i, facts))
        })
        .collect();
    let mut remedies = Vec::new();
    if !others.is_empty() {
        remedies.push(format!(
            "use a model that can serve it: {}",
            others.join(", ")
        ));
    }
    if facts.has_media() && policy_allows(snapshot, plan.model, &facts.text_only()) {
        remedies.push("send text only".into());
    }
    let remedy = if remedies.is_empty() {
        "No other model this key may use can serve it either.".to_owned()
    } else {
        format!("To be served, {}.", remedies.join(", or "))
    };
    GatewayError::policy_blocked(format!(
        "model \"{alias}\" cannot serve this request: {}. {remedy}",
        why.join("; ")
    ))
}
