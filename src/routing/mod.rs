//! Turns a request into a plan: every deployment of its alias, kept or
//! dropped with a reason, and the kept ones in the order to try them.
//!
//! Policy filters run first (`policy`: residency, the Llama licence in the
//! EU, modality, context window, tools), then health (`circuit`, 429
//! cooldowns, rate limits in `quota`), then the alias's strategy orders
//! what is left (`strategy`: cost, latency, spillover, weighted). What
//! routing learns while serving lives in `live`, outside the config
//! snapshot, keyed by name; engine load comes from scraping vLLM and TGI
//! (`engine`).

mod circuit;
pub mod engine;
mod facts;
mod live;
mod plan;
mod policy;
mod quota;
mod strategy;

pub use circuit::CircuitView;
pub use facts::{REGION_HEADER, RequestFacts, region};
pub use live::{AliasLive, Attempt, BackendLive, DeploymentLive, Lease, LiveState, LiveView};
pub use plan::{Candidate, Explained, Plan, PlanStatus, plan, refusal};
pub use policy::Rule;
pub use quota::DeploymentQuota;
pub use strategy::Why;
