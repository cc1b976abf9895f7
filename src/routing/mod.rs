//! Turns a request into a plan: every deployment of its alias, kept or
//! dropped with a reason, and the kept ones in the order to try them.
//!
//! Policy filters run first (`policy`: residency, the Llama licence in the
//! EU, modality, context window, tools), then health (circuits, 429
//! cooldowns and quotas, read from `health`), then the alias's strategy
//! orders what is left (`strategy`: cost, latency, spillover, weighted),
//! and `affinity` puts the deployment the request's session is bound to
//! first (`session`: which session a request is).

mod affinity;
mod facts;
mod plan;
mod policy;
mod session;
mod strategy;

pub use affinity::Binding;
pub use facts::{REGION, RequestFacts, region};
pub use plan::{
    Candidate, Explained, ExplainedHedge, Plan, PlanStatus, plan, policy_allows, refusal,
};
pub use policy::{Rule, Scope as PolicyScope, serves};
pub use session::{SESSION, Session, SessionSource};
pub use strategy::Why;
