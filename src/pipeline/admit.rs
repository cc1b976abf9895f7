//! Admission: what a request may have before anything is sent upstream.
//! [`admit`] resolves the alias, checks the key may use it, settles the
//! region, reads the request's facts and plans it; the live pipeline,
//! `tollgate explain` and `POST /admin/explain` all decide through it, so
//! what explain says is what the gateway does. [`reserve`] then takes the
//! request from the key's rate limits and budget (serving only).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

use crate::config::{Budget, Key, OnUnavailable};
use crate::error::{GatewayError, echo};
use crate::inbound::Api;
use crate::limits::{Limits, Refused};
use crate::metering::budget::{self, Reservation};
use crate::openai::{Endpoint, InboundRequest};
use crate::routing::{self, Explained, Plan, PlanStatus, RequestFacts};
use crate::state::{AppState, Snapshot};
use crate::store::{Denied, Fleet};

/// How long a request refused because the shared state is away is told
/// to wait: the replica retries Redis about this often.
pub const STATE_RETRY: Duration = Duration::from_secs(1);

/// A request admitted: the model it resolved to, its facts and its plan,
/// with at least one deployment to try.
pub struct Admission {
    pub model: usize,
    pub facts: RequestFacts,
    pub plan: Plan,
}

/// Why a request is not admitted, with how far it got: the model (for
/// the labels it is recorded under) and the plan, when policy or health
/// left nothing to try (451, 503).
pub struct Refusal {
    pub error: GatewayError,
    pub model: Option<usize>,
    pub plan: Option<Box<Plan>>,
}

impl From<GatewayError> for Refusal {
    fn from(error: GatewayError) -> Self {
        Self {
            error,
            model: None,
            plan: None,
        }
    }
}

/// Decides a parsed request: 404 for an unknown model, 403 for a model
/// the key may not use or a region it may not choose, 451 when policy
/// leaves no deployment, 503 when health leaves none. `region` is what
/// the request asks for (the `x-tollgate-region` header, or explain's
/// `region`); `session`, its `x-session-id` (or explain's `session`).
pub fn admit(
    snapshot: &Snapshot,
    request: &InboundRequest,
    key: Option<&Key>,
    region: Option<&[u8]>,
    session: Option<&[u8]>,
) -> Result<Admission, Refusal> {
    let model = resolve(snapshot, key, request.model())?;
    let region =
        routing::region(region, key, &snapshot.config.policy).map_err(|error| Refusal {
            error,
            model: Some(model),
            plan: None,
        })?;
    let affinity = snapshot.config.models[model].affinity;
    let facts = RequestFacts::of(request, region).with_affinity(request, affinity, session);
    endpoint_served(snapshot, model, facts.endpoint)
        .and_then(|()| context_fits(snapshot, model, request, &facts))
        .map_err(|error| Refusal {
            error,
            model: Some(model),
            plan: None,
        })?;
    let plan = routing::plan(
        snapshot,
        model,
        &facts,
        Instant::now(),
        &mut fastrand::Rng::new(),
    );
    if plan.status == PlanStatus::Ready {
        return Ok(Admission { model, facts, plan });
    }
    Err(Refusal {
        error: routing::refusal(snapshot, &plan, &facts, key),
        model: Some(model),
        plan: Some(Box::new(plan)),
    })
}

/// With prefix affinity, the deployment tried first is taken to hold the
/// prompt's blocks from now on, so the next turn of the conversation
/// finds them there; with a fleet, the blocks are queued for the other
/// replicas too.
pub fn remember_prefix(snapshot: &Snapshot, fleet: Option<&Fleet>, admission: &Admission) {
    if let Some(first) = admission.plan.order().next()
        && !admission.facts.blocks.is_empty()
    {
        let live = &snapshot.resolved(admission.model, first).health;
        live.prefix.serve(&admission.facts.blocks);
        if let Some(fleet) = fleet {
            let deployment = &snapshot.config.models[admission.model].deployments[first];
            fleet.routed_prefix(&deployment.name, &admission.facts.blocks);
        }
    }
}

/// 400 when no deployment of the model serves the request's endpoint (an
/// embeddings request to a chat model, or the reverse), whatever policy
/// and health say.
fn endpoint_served(
    snapshot: &Snapshot,
    model: usize,
    endpoint: Endpoint,
) -> Result<(), GatewayError> {
    let config = &snapshot.config.models[model];
    if config
        .deployments
        .iter()
        .any(|d| routing::serves(d, endpoint))
    {
        return Ok(());
    }
    let serving: Vec<&str> = snapshot
        .config
        .models
        .iter()
        .filter(|m| m.deployments.iter().any(|d| routing::serves(d, endpoint)))
        .map(|m| m.alias.as_str())
        .collect();
    Err(GatewayError::bad_request(
        format!(
            "model \"{}\" does not serve {}; {}",
            config.alias,
            endpoint.name(),
            if serving.is_empty() {
                "no model here does".to_owned()
            } else {
                format!("models that do: {}", serving.join(", "))
            }
        ),
        Some("model".into()),
    ))
}

/// 400 `context_length_exceeded` when the prompt estimate and the output
/// asked for fit no deployment of the model, whatever policy and health
/// say: no deployment could serve it, and the client must shorten it.
fn context_fits(
    snapshot: &Snapshot,
    model: usize,
    request: &InboundRequest,
    facts: &RequestFacts,
) -> Result<(), GatewayError> {
    let window = snapshot.config.models[model]
        .deployments
        .iter()
        .map(|d| d.context_window)
        .max()
        .unwrap_or(0);
    let (prompt, output) = (facts.window_tokens(), facts.max_output_tokens);
    if prompt.saturating_add(output.unwrap_or(0)) <= u64::from(window) {
        return Ok(());
    }
    let param = match request.endpoint() {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
        Endpoint::Embeddings => "input",
    };
    Err(GatewayError::context_length_exceeded(
        window, prompt, output, param,
    ))
}

/// The aliases `key` may use that some deployment may serve, on some
/// endpoint, in the caller's region (`region` as `x-tollgate-region` asks for it, settled as
/// for a request): `/v1/models` lists them. An alias that policy leaves
/// nothing in that region (a multimodal Llama, asked from the EU) could
/// only answer 451, so it is left out.
pub fn servable_models<'s>(
    snapshot: &'s Snapshot,
    key: Option<&'s Key>,
    region: Option<&[u8]>,
) -> Result<Vec<&'s str>, GatewayError> {
    let region = routing::region(region, key, &snapshot.config.policy)?;
    // A text request to any of the endpoints.
    let asks: Vec<RequestFacts> = [Endpoint::Chat, Endpoint::Completions, Endpoint::Embeddings]
        .into_iter()
        .map(|endpoint| RequestFacts {
            endpoint,
            region: region.clone(),
            ..RequestFacts::default()
        })
        .collect();
    Ok(snapshot
        .aliases_for(key)
        .filter(|alias| {
            snapshot.model_index(alias).is_some_and(|model| {
                asks.iter()
                    .any(|facts| routing::policy_allows(snapshot, model, facts))
            })
        })
        .collect())
}

/// The index of the requested model, which the key must be allowed.
fn resolve(snapshot: &Snapshot, key: Option<&Key>, alias: &str) -> Result<usize, GatewayError> {
    let model = snapshot.model_index(alias).ok_or_else(|| {
        let known: Vec<&str> = snapshot.aliases_for(key).collect();
        GatewayError::unknown_model(alias, &known)
    })?;
    match key {
        Some(key) if !key.models.allows(alias) => {
            Err(GatewayError::model_not_allowed(alias, &key.name))
        }
        _ => Ok(model),
    }
}

/// Takes an admitted request from its key's rate limits (a request and its
/// prompt estimate; 429 with `retry-after`) and budget (429), reserving
/// what the request asks of it ([`ask`]). With a shared store that is one
/// call to it; while it is away, this replica's own limits and its share
/// of the budget, or 503, as `[state] on_unavailable` says. Returns the
/// key's limits, to be settled with the tokens really used, and the
/// budget reservation.
pub async fn reserve(
    app: &AppState,
    snapshot: &Snapshot,
    key: Option<&Key>,
    request: &InboundRequest,
    admission: &Admission,
) -> Result<(Option<Arc<Limits>>, Option<Reservation>), GatewayError> {
    let Some(key) = key else {
        return Ok((None, None));
    };
    let tokens = admission.facts.input_tokens;
    let limits = snapshot.key_limits(key);
    let budgeted = key.budget != Budget::default();
    let today = budget::today();
    let rate_limited = |refused: &Refused| {
        app.metrics
            .rate_limited
            .with_label_values(&[
                "key",
                app.key_series.load().label(&key.name),
                refused.limit.name(),
            ])
            .inc();
        GatewayError::key_rate_limited(&key.name, refused, tokens)
    };
    let fleet = app.fleet.as_ref();
    let ask = budgeted.then(|| ask(snapshot, request, admission));
    // A hedge's allowance is asked for beside the first attempt's worst
    // case, and held for the hedge out of what the budget grants beyond it.
    let hedged = |reservation: Reservation| match ask {
        Some(ask) => reservation.with_hedge(ask.want - hedge_allowance(snapshot, admission)),
        None => reservation,
    };
    if let Some(fleet) = fleet
        && (budgeted || limits.is_limited())
        && let Some(cells) = limits.shared_cells()
    {
        let budget = ask.map(|ask| (key, ask, today));
        match fleet.admit(&cells, tokens, budget).await {
            Ok(admitted) => {
                limits.mirror(tokens, Instant::now());
                let reservation = admitted.reservation.map(|(id, nano_usd)| {
                    hedged(Reservation::shared(&key.name, nano_usd, fleet.clone(), id))
                });
                return Ok((Some(limits.clone()), reservation));
            }
            Err(Denied::Rate(refused)) => return Err(rate_limited(&refused)),
            Err(Denied::Budget {
                period,
                limit,
                spent,
                held,
                needed,
            }) => {
                return Err(budget::refusal(
                    &key.name, period, limit, spent, held, needed, today,
                ));
            }
            Err(Denied::Unavailable) if fleet.on_unavailable == OnUnavailable::Refuse => {
                return Err(GatewayError::state_unavailable(STATE_RETRY));
            }
            Err(Denied::Unavailable) => {}
        }
    }
    limits
        .admit(tokens, Instant::now())
        .map_err(|refused| rate_limited(&refused))?;
    let reservation = if let Some(ask) = ask {
        let reservation = app
            .budgets
            .admit(key, today, ask, |period, limit| match fleet {
                Some(fleet) => fleet
                    .local_budget(&key.name, period, limit, today)
                    .ok_or_else(|| GatewayError::fleet_spend_unknown(&key.name, STATE_RETRY)),
                None => Ok((
                    limit,
                    budget::spent_in(&app.ledger, &key.name, period, today),
                )),
            })?;
        Some(hedged(match fleet {
            Some(fleet) => reservation.reported_to(fleet.clone()),
            None => reservation,
        }))
    } else {
        None
    };
    Ok((Some(limits.clone()), reservation))
}

/// What a request asks of its key's budget: the most it can cost on the
/// dearest deployment of its plan — the most its prompt can be there
/// ([`prompt_ceiling`](InboundRequest::prompt_ceiling)) and its
/// [`output_ceiling`](InboundRequest::output_ceiling) in each of its
/// [`generations`](InboundRequest::generations) — with a hedge's allowance
/// beside it, and, without `max_tokens` (the gateway then sets the output
/// limit a reservation pays for), the least: its prompt and one output
/// token an answer on any of them.
pub fn ask(snapshot: &Snapshot, request: &InboundRequest, admission: &Admission) -> budget::Ask {
    let facts = &admission.facts;
    let deployments = &snapshot.config.models[admission.model].deployments;
    let generations = u64::from(request.generations());
    let (mut want, mut floor) = (0, 0);
    for i in admission.plan.order() {
        let rate = snapshot.resolved(admission.model, i).rate;
        let window = deployments[i].context_window;
        let prompt = request.prompt_ceiling(facts.input_tokens_most, window);
        let output = request.output_ceiling(window, facts.window_tokens()).max(1);
        want = want.max(rate.estimate_nano_usd(prompt, output.saturating_mul(generations)));
        floor = floor.max(rate.estimate_nano_usd(prompt, generations));
    }
    if request.max_output_tokens().is_some() {
        floor = want;
    }
    budget::Ask {
        want: want.saturating_add(hedge_allowance(snapshot, admission)),
        floor,
    }
}

/// What a hedge may add to a request's cost: its alias's allowance, when
/// the plan has a second deployment to hedge to.
fn hedge_allowance(snapshot: &Snapshot, admission: &Admission) -> u64 {
    match &snapshot.config.models[admission.model].hedge {
        Some(hedge) if admission.plan.order().nth(1).is_some() => hedge.max_extra_nano_usd,
        _ => 0,
    }
}

/// The inbound APIs `explain` reads a request of.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestApi {
    Chat,
    Completions,
    Embeddings,
    Messages,
    Responses,
}

/// The body of `POST /admin/explain`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    /// A request body, as a client would send it.
    pub request: Value,
    /// The API `request` is written for; by default, told by its
    /// members: `messages` chat, `prompt` legacy completions, `input`
    /// embeddings. A Messages or Responses body needs `"api"`.
    #[serde(default)]
    pub api: Option<RequestApi>,
    /// The region the request asks for, as `x-tollgate-region` would.
    #[serde(default)]
    pub region: Option<String>,
    /// The request's session, as `x-session-id` would give it.
    #[serde(default)]
    pub session: Option<String>,
    /// The name of the key the request would come with.
    #[serde(default)]
    pub key: Option<String>,
}

/// The plan [`admit`] makes for a request, without sending it anywhere: a
/// plan (with its status, 200, 451 or 503), or the error the gateway would
/// answer before planning. Shared by `tollgate explain` (a fresh gateway's
/// state) and `POST /admin/explain` (the live state).
pub fn explain(snapshot: &Snapshot, ask: &ExplainRequest) -> Result<Explained, GatewayError> {
    let has = |member| ask.request.get(member).is_some();
    let api = match ask.api {
        Some(RequestApi::Chat) => Api::OpenAi(Endpoint::Chat),
        Some(RequestApi::Completions) => Api::OpenAi(Endpoint::Completions),
        Some(RequestApi::Embeddings) => Api::OpenAi(Endpoint::Embeddings),
        Some(RequestApi::Messages) => Api::Messages,
        Some(RequestApi::Responses) => Api::Responses,
        None if has("messages") => Api::OpenAi(Endpoint::Chat),
        None if has("prompt") => Api::OpenAi(Endpoint::Completions),
        None if has("input") => Api::OpenAi(Endpoint::Embeddings),
        None => {
            return Err(GatewayError::bad_request(
                "`request` must be a chat request (with `messages`), a completions request (with `prompt`) \
                 or an embeddings request (with `input`); for a Messages or Responses request, say \
                 `\"api\": \"messages\"` or `\"api\": \"responses\"`",
                Some("request".into()),
            ));
        }
    };
    let key = match &ask.key {
        None => None,
        Some(name) => Some(snapshot.key_named(name).ok_or_else(|| {
            GatewayError::bad_request(
                format!("no key named \"{}\"", echo(name)),
                Some("key".into()),
            )
        })?),
    };
    let bytes = serde_json::to_vec(&ask.request).expect("JSON values serialise");
    let (request, _) = api.parse(bytes.into())?;
    let region = ask.region.as_deref().map(str::as_bytes);
    let session = ask.session.as_deref().map(str::as_bytes);
    match admit(snapshot, &request, key, region, session) {
        Ok(admission) => {
            let mut explained = admission.plan.explain(snapshot);
            explained.hedge = super::hedge::explain(
                snapshot,
                &request,
                admission.model,
                &admission.facts,
                &admission.plan,
            );
            Ok(explained)
        }
        Err(Refusal {
            plan: Some(plan), ..
        }) => Ok(plan.explain(snapshot)),
        Err(refusal) => Err(refusal.error),
    }
}
