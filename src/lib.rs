//! tollgate: an OpenAI-compatible gateway in front of self-hosted and
//! managed Llama backends. `main.rs` is a thin CLI over this library, so
//! tests start the gateway in-process.
//!
//! No `unsafe` but where a module says why it is sound (`boxed`).
#![deny(unsafe_code)]

pub mod boxed;
pub mod config;
pub mod economics;
pub mod error;
pub mod framing;
pub mod gather;
pub mod health;
pub mod id;
pub mod inbound;
pub mod ledger;
pub mod licence;
pub mod limits;
pub mod logging;
pub mod metering;
pub mod metrics;
pub mod openai;
pub mod pipeline;
pub mod providers;
pub mod redact;
pub mod routing;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
pub mod traces;

pub use server::Gateway;
