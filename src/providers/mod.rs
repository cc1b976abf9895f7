//! Upstream protocols, one module each. Every provider takes an OpenAI
//! request and returns OpenAI response bytes or chunks: translation lives
//! in the provider, never elsewhere.

mod bedrock;
mod exchange;
pub(crate) mod http;
mod http1;
mod openai_compat;
mod pool;
mod simulated;
mod sse;
mod tgi;
mod translate;

use std::sync::{Arc, OnceLock};

use axum::http::HeaderMap;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::config::{Backend, BackendKind};
use crate::error::GatewayError;
use crate::limits::UpstreamQuota;
use crate::openai::InboundRequest;

/// One attempt at one deployment.
pub struct UpstreamCall<'a> {
    pub request: &'a InboundRequest,
    pub upstream_model: &'a str,
    pub request_id: &'a str,
    /// Where the upstream's `x-ratelimit-*` headers are put, from any
    /// response, success or error (`http::send`).
    pub quota: &'a OnceLock<UpstreamQuota>,
    /// The output limit the gateway sets when the client set none: what a
    /// key's budget reservation pays for. Sent as the upstream's own limit.
    pub max_tokens: Option<u32>,
    /// Ask the upstream for its usage so far in every stream chunk (its
    /// kind [reports running usage](BackendKind::reports_running_usage)).
    pub running_usage: bool,
    /// The attempt's trace context (`traceparent`, `tracestate`): empty
    /// unless traces are exported.
    pub trace: &'a HeaderMap,
}

/// A successful upstream answer, already in the OpenAI shape of the
/// endpoint that was called.
pub enum UpstreamReply {
    /// A whole response object (non-streaming).
    Complete(Bytes),
    /// The JSON of each stream chunk, in order; the end of the stream is
    /// the end of the iterator (no `[DONE]` item).
    Stream(ChunkStream),
}

/// One stream chunk's JSON: for an OpenAI-compatible upstream, most often a
/// slice of the bytes read from it.
pub type Chunk = Bytes;
pub type ChunkStream = BoxStream<'static, Result<Chunk, GatewayError>>;

pub trait Provider: Send + Sync {
    /// Sends the request and resolves once the upstream answered: with its
    /// whole body, or with a stream whose chunks arrive as the upstream
    /// sends them. Timeouts are the caller's (`pipeline::attempt`).
    fn send<'a>(
        &'a self,
        call: UpstreamCall<'a>,
    ) -> BoxFuture<'a, Result<UpstreamReply, GatewayError>>;
}

/// The one place a backend kind is matched to its protocol.
pub fn build(backend: &Backend) -> Result<Arc<dyn Provider>, String> {
    Ok(match backend.kind {
        BackendKind::Vllm | BackendKind::Together | BackendKind::Groq | BackendKind::Openai => {
            Arc::new(openai_compat::OpenAiCompat::new(backend)?)
        }
        BackendKind::Tgi => Arc::new(tgi::Tgi::new(backend)?),
        BackendKind::Bedrock => Arc::new(bedrock::Bedrock::new(backend)?),
        BackendKind::Simulated => Arc::new(simulated::Simulated::new(backend)),
    })
}
