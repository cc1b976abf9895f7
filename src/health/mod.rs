//! Live state of the fleet, learned while serving and kept outside the
//! config snapshot, keyed by name, so it survives a reload for every
//! deployment, backend and alias whose name persists (`live`): requests in
//! flight (`lease`), latency and output-length estimates and 429
//! cooldowns (`deployment`), circuit breakers (`circuit`), upstream quotas
//! and deployment rate limits (`quota`), and engine load scraped from vLLM
//! and TGI (`engine`, into `backend`). Routing reads it; attempts and the
//! meter write it.

mod backend;
mod circuit;
mod deployment;
pub mod engine;
mod lease;
mod live;
mod quota;

pub use backend::{BackendLive, EngineSignals};
pub use circuit::CircuitView;
pub use deployment::{AliasLive, DeploymentLive, Pressure};
pub use lease::{Attempt, Lease};
pub use live::{LiveState, LiveView};
pub use quota::DeploymentQuota;
