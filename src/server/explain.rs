//! Explain: the routing plan for a request, without sending it anywhere.
//! Shared by `tollgate explain` (a fresh gateway's state) and
//! `POST /admin/explain` (the live state).

use std::time::Instant;

use serde::Deserialize;
use serde_json::Value;

use super::completions;
use crate::error::GatewayError;
use crate::openai::{Endpoint, InboundRequest};
use crate::routing::{self, Explained, RequestFacts};
use crate::snapshot::Snapshot;

/// The body of `POST /admin/explain`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    /// A chat or legacy completions request, as a client would send it.
    pub request: Value,
    /// The request's region; defaults to the key's, then the policy's.
    #[serde(default)]
    pub region: Option<String>,
    /// The name of the key the request would come with.
    #[serde(default)]
    pub key: Option<String>,
}

pub fn explain(snapshot: &Snapshot, ask: &ExplainRequest) -> Result<Explained, GatewayError> {
    let endpoint = if ask.request.get("messages").is_some() {
        Endpoint::Chat
    } else if ask.request.get("prompt").is_some() {
        Endpoint::Completions
    } else {
        return Err(GatewayError::bad_request(
            "`request` must be a chat request (with `messages`) or a completions request (with `prompt`)",
            Some("request".into()),
        ));
    };
    let key = match &ask.key {
        None => None,
        Some(name) => Some(snapshot.key_named(name).ok_or_else(|| {
            GatewayError::bad_request(format!("no key named \"{name}\""), Some("key".into()))
        })?),
    };
    let bytes = serde_json::to_vec(&ask.request).expect("JSON values serialise");
    let request = InboundRequest::parse(endpoint, bytes.into())?;
    let model = completions::resolve(snapshot, key, request.model())?;
    let region = ask
        .region
        .clone()
        .or_else(|| key.and_then(|k| k.region.clone()))
        .or_else(|| snapshot.config.policy.default_region.clone());
    let facts = RequestFacts::of(&request, region);
    let plan = routing::plan(
        snapshot,
        model,
        &facts,
        Instant::now(),
        &mut fastrand::Rng::new(),
    );
    Ok(plan.explain(snapshot))
}
