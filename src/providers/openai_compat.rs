//! OpenAI-compatible upstreams: vLLM, Together, Groq and any server that
//! speaks the OpenAI API. The client's request goes up with only `model`,
//! `stream_options` and the credential changed; responses come back as the
//! bytes received, one SSE event at a time.

use std::sync::LazyLock;

use axum::http::HeaderValue;
use axum::http::header::AUTHORIZATION;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use memchr::memmem::Finder;

use super::http::{self, Caps, ErrorReply, HttpClient, Target};
use super::sse;
use super::{Provider, UpstreamCall, UpstreamReply};
use crate::boxed;
use crate::config::{Backend, BackendKind};
use crate::error::GatewayError;
use serde_json::{Map, Value};

use crate::openai::{ChatRequest, Endpoint, TOOL_ERROR, TypedRequest};

pub struct OpenAiCompat {
    name: String,
    kind: BackendKind,
    /// Parsed once: `{base_url}/chat/completions`, `{base_url}/completions`
    /// and `{base_url}/embeddings`.
    chat_url: Target,
    completions_url: Target,
    embeddings_url: Target,
    auth: Option<HeaderValue>,
    client: HttpClient,
    caps: Caps,
}

impl OpenAiCompat {
    pub fn new(backend: &Backend) -> Result<Self, String> {
        let base_url = backend
            .base_url
            .as_ref()
            .ok_or("an OpenAI-compatible backend needs a base_url")?
            .as_str();
        Self::with_base_url(backend, base_url, http::client(backend)?)
    }

    /// For servers whose OpenAI-compatible API lives below their own
    /// base URL (TGI's `/v1`), sharing that server's connection pool.
    pub fn with_base_url(
        backend: &Backend,
        base_url: &str,
        client: HttpClient,
    ) -> Result<Self, String> {
        let base = base_url.trim_end_matches('/');
        let endpoint = |endpoint: Endpoint| {
            http::target(&backend.name, &format!("{base}/{}", endpoint.path()))
        };
        Ok(Self {
            name: backend.name.clone(),
            kind: backend.kind,
            chat_url: endpoint(Endpoint::Chat)?,
            completions_url: endpoint(Endpoint::Completions)?,
            embeddings_url: endpoint(Endpoint::Embeddings)?,
            auth: http::bearer(backend)?,
            client,
            caps: Caps::of(backend),
        })
    }

    async fn call(&self, call: UpstreamCall<'_>) -> Result<UpstreamReply, GatewayError> {
        let streaming = call.request.stream();
        // Ask for usage on every stream so it can be metered. Together's API
        // has no stream_options and reports usage on the last chunk anyway;
        // non-streaming calls must not carry it (vLLM rejects that).
        let options = (streaming && self.kind != BackendKind::Together).then(|| {
            let mut options = call.request.upstream_stream_options();
            if call.running_usage {
                options.set_continuous_usage();
            }
            options
        });
        // OpenAI's chat API takes `max_completion_tokens` (its reasoning
        // models refuse `max_tokens`); the others take `max_tokens`.
        let limit_field = match (self.kind, call.request.endpoint()) {
            (BackendKind::Openai, Endpoint::Chat) => "max_completion_tokens",
            _ => "max_tokens",
        };
        let mut body = call.request.to_upstream_json(
            call.upstream_model,
            options.as_ref(),
            call.max_tokens.map(|limit| (limit_field, limit)),
        );
        if call.request.translated
            && let TypedRequest::Chat(chat) = &call.request.typed
        {
            body = translated_body(body, chat, limit_field);
        }
        let url = match call.request.endpoint() {
            Endpoint::Chat => &self.chat_url,
            Endpoint::Completions => &self.completions_url,
            Endpoint::Embeddings => &self.embeddings_url,
        };
        let mut request = http::post_json(url, body);
        http::tag(&mut request, &call);
        if let Some(auth) = &self.auth {
            request.fields.push((AUTHORIZATION, auth.clone()));
        }
        let response = http::send(&self.name, &self.client, request, call.quota).await?;
        if !response.status.is_success() {
            return Err(ErrorReply::read(response).await.into_error(&self.name));
        }
        if !streaming {
            let bytes = http::read_body(&self.name, self.caps, response).await?;
            return Ok(UpstreamReply::Complete(normalise(self.kind, bytes)));
        }
        let events = sse::sse_data(&self.name, self.caps, response.body);
        // Only Together's chunks are rewritten; the others pass with no
        // adapter to poll for each.
        let events = if self.kind == BackendKind::Together {
            events
                .map_ok(|data| normalise(BackendKind::Together, data))
                .boxed()
        } else {
            events.boxed()
        };
        Ok(UpstreamReply::Stream(events))
    }
}

impl Provider for OpenAiCompat {
    fn send<'a>(
        &'a self,
        call: UpstreamCall<'a>,
    ) -> BoxFuture<'a, Result<UpstreamReply, GatewayError>> {
        boxed::pinned(|| self.call(call))
    }
}

/// A translated chat body as this upstream takes it: its limit under
/// `limit_field` (OpenAI's reasoning models refuse `max_tokens`), and its
/// tool messages without the gateway's error marker, which is no chat
/// member. Re-encoded only when either applies.
fn translated_body(body: Vec<u8>, chat: &ChatRequest, limit_field: &str) -> Vec<u8> {
    let rename = limit_field != "max_tokens"
        && chat.max_tokens.is_some()
        && chat.max_completion_tokens.is_none();
    let marked = chat
        .messages
        .iter()
        .any(|m| m.extra.contains_key(TOOL_ERROR));
    if !rename && !marked {
        return body;
    }
    let Ok(mut object) = serde_json::from_slice::<Map<String, Value>>(&body) else {
        return body;
    };
    if rename && let Some(limit) = object.remove("max_tokens") {
        object.insert(limit_field.into(), limit);
    }
    if let Some(Value::Array(messages)) = object.get_mut("messages") {
        for message in messages.iter_mut().filter_map(Value::as_object_mut) {
            message.remove(TOOL_ERROR);
        }
    }
    serde_json::to_vec(&object).expect("JSON values serialise")
}

/// Together ends with `finish_reason: "eos"`, which OpenAI clients do not
/// know; it becomes `"stop"`. Only objects that contain it are re-encoded.
fn normalise<B: AsRef<[u8]> + From<Vec<u8>>>(kind: BackendKind, body: B) -> B {
    static EOS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""eos""#));
    if kind != BackendKind::Together || EOS.find(body.as_ref()).is_none() {
        return body;
    }
    let Ok(mut object) = serde_json::from_slice::<serde_json::Value>(body.as_ref()) else {
        return body;
    };
    let choices = object.get_mut("choices").and_then(|c| c.as_array_mut());
    for choice in choices.into_iter().flatten() {
        if choice.get("finish_reason").and_then(|f| f.as_str()) == Some("eos") {
            choice["finish_reason"] = "stop".into();
        }
    }
    serde_json::to_vec(&object).map_or(body, B::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn together_eos_becomes_stop() {
        let chunk = br#"{"choices":[{"index":0,"delta":{},"finish_reason":"eos"}]}"#.to_vec();
        let out: serde_json::Value =
            serde_json::from_slice(&normalise(BackendKind::Together, chunk.clone())).unwrap();
        assert_eq!(out["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            normalise(BackendKind::Vllm, chunk.clone()),
            chunk,
            "others are untouched"
        );
    }
}
