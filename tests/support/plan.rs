//! Plan-level test helpers: snapshots built from a config with no
//! network and no environment, explain answers as JSON, plans made with a
//! seeded random source.

use std::time::Instant;

use serde_json::{Value, json};
use tollgate::health::LiveState;
use tollgate::pipeline::admit::{ExplainRequest, explain};
use tollgate::routing::{self, Plan, RequestFacts};
use tollgate::state::Snapshot;

use super::config::{Backend, Config};

pub fn snapshot(config: &Config) -> Snapshot {
    let config = tollgate::config::parse(&config.to_toml(), &|_| None)
        .unwrap_or_else(|problems| panic!("invalid test config:\n{problems}"));
    Snapshot::build(config, &LiveState::default()).expect("snapshot builds")
}

/// A simulated backend (no network) in `region`.
pub fn sim(name: &str, region: &str) -> Backend {
    Backend::simulated(name).set("region", region)
}

/// A backend that plans name but nothing calls, for engine signals set by
/// hand.
pub fn never_called(name: &str, kind: &str) -> Backend {
    Backend::new(name, kind, "http://127.0.0.1:9/v1")
}

pub fn ask(request: Value, region: Option<&str>, key: Option<&str>) -> ExplainRequest {
    ExplainRequest {
        request,
        api: None,
        region: region.map(str::to_owned),
        key: key.map(str::to_owned),
        session: None,
    }
}

/// `explain` as JSON, for a chat request to `alias` with `messages`.
pub fn explained(snapshot: &Snapshot, alias: &str, messages: Value, region: Option<&str>) -> Value {
    let request = json!({"model": alias, "messages": messages});
    explained_request(snapshot, request, region)
}

pub fn explained_request(snapshot: &Snapshot, request: Value, region: Option<&str>) -> Value {
    let plan = explain(snapshot, &ask(request, region, None)).expect("explainable");
    serde_json::to_value(plan).unwrap()
}

pub fn image(text: &str) -> Value {
    json!([{"role": "user", "content": [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]}])
}

pub fn kept(explained: &Value) -> Vec<&str> {
    explained["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kept"] == true)
        .map(|c| c["deployment"].as_str().unwrap())
        .collect()
}

/// A plan for model `model` of the snapshot with a seeded random source.
pub fn plan_at(snapshot: &Snapshot, model: usize, facts: &RequestFacts, now: Instant) -> Plan {
    routing::plan(
        snapshot,
        model,
        facts,
        now,
        &mut fastrand::Rng::with_seed(1),
    )
}

/// The deployment names of a plan, in the order they would be tried.
pub fn order(snapshot: &Snapshot, plan: &Plan) -> Vec<String> {
    let deployments = &snapshot.config.models[plan.model].deployments;
    plan.order().map(|i| deployments[i].name.clone()).collect()
}

pub fn text_facts(input_tokens: u64, max_output_tokens: u64) -> RequestFacts {
    RequestFacts {
        input_tokens,
        max_output_tokens: Some(max_output_tokens),
        ..RequestFacts::default()
    }
}

/// A plan as `explain` prints it, as JSON.
pub fn explain_json(snapshot: &Snapshot, plan: &Plan) -> Value {
    serde_json::to_value(plan.explain(snapshot)).expect("plans serialise")
}
