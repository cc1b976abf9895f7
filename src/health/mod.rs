//! Live state of the fleet, learned while serving and kept outside the
//! config snapshot, keyed by name, so it survives a reload for every
//! deployment, backend and alias whose name persists (`live`): requests in
//! flight (`lease`), latency and output-length estimates and 429
//! cooldowns (`deployment`), the recent times to a first byte that
//! hedging reads a quantile of (`first_byte`), circuit breakers (`circuit`), upstream quotas
//! and deployment rate limits (`quota`), the flags of these the router
//! checks on every request, side by side (`flags`), and engine load scraped from vLLM
//! and TGI (`engine`, into `backend`). Routing reads it; attempts and the
//! meter write it.

mod backend;
mod circuit;
mod deployment;
pub mod engine;
mod first_byte;
mod flags;
mod lease;
mod live;
mod quota;

pub use backend::{BackendLive, EngineSignals, LoadBasis};
pub use circuit::CircuitView;
pub use deployment::{AliasLive, DeploymentLive, Pressure};
pub use first_byte::FirstBytes;
pub use flags::LiveFlags;
pub use lease::{Attempt, Lease};
pub use live::{LiveState, LiveView};
pub use quota::DeploymentQuota;
