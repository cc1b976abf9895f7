//! OpenAI-compatible upstreams: vLLM, Together, Groq and any server that
//! speaks the OpenAI API. The client's request goes up with only `model`,
//! `stream_options` and the credential changed; responses come back as the
//! bytes received, one SSE event at a time.

use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use reqwest::{Client, StatusCode};

use super::{Provider, UpstreamCall, UpstreamReply};
use crate::config::{Backend, BackendKind};
use crate::error::GatewayError;

/// Error bodies larger than this are cut: they only feed a message.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub struct OpenAiCompat {
    name: String,
    kind: BackendKind,
    base_url: String,
    auth: Option<HeaderValue>,
    client: Client,
}

impl OpenAiCompat {
    pub fn new(backend: &Backend) -> Result<Self, String> {
        let base_url = backend
            .base_url
            .as_ref()
            .ok_or("an OpenAI-compatible backend needs a base_url")?
            .as_str()
            .trim_end_matches('/')
            .to_owned();
        let auth = backend
            .credential
            .as_ref()
            .map(|secret| {
                let mut value = HeaderValue::try_from(format!("Bearer {}", secret.expose()))
                    .map_err(|_| {
                        format!(
                            "the credential of backend \"{}\" is not a valid header value",
                            backend.name
                        )
                    })?;
                value.set_sensitive(true);
                Ok::<_, String>(value)
            })
            .transpose()?;
        let client = Client::builder()
            .connect_timeout(backend.timeouts.connect)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| {
                format!(
                    "cannot build the HTTP client for backend \"{}\": {e}",
                    backend.name
                )
            })?;
        Ok(Self {
            name: backend.name.clone(),
            kind: backend.kind,
            base_url,
            auth,
            client,
        })
    }

    async fn call(&self, call: UpstreamCall<'_>) -> Result<UpstreamReply, GatewayError> {
        let streaming = call.request.stream();
        // Ask for usage on every stream so it can be metered. Together's API
        // has no stream_options and reports usage on the last chunk anyway;
        // non-streaming calls must not carry it (vLLM rejects that).
        let options = (streaming && self.kind != BackendKind::Together)
            .then(|| call.request.upstream_stream_options());
        let body = call
            .request
            .to_upstream_json(call.upstream_model, options.as_ref());
        let url = format!("{}/{}", self.base_url, call.request.endpoint().path());
        let mut request = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header("x-request-id", call.request_id)
            .body(body);
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.status_error(response).await);
        }
        if !streaming {
            let bytes = response
                .bytes()
                .await
                .map_err(|e| self.transport_error(&e))?;
            return Ok(UpstreamReply::Complete(self.normalise(bytes)));
        }
        let name = self.name.clone();
        let kind = self.kind;
        let events = response
            .bytes_stream()
            .eventsource()
            .try_take_while(|event| std::future::ready(Ok(event.data != "[DONE]")))
            .map(move |event| match event {
                Ok(event) => Ok(normalise(kind, Bytes::from(event.data))),
                Err(EventStreamError::Transport(_)) => Err(GatewayError::upstream_broken(&name)),
                Err(e) => Err(GatewayError::upstream_protocol(&name, e)),
            })
            // An SSE comment or keep-alive has no data; it is not a chunk.
            .try_filter(|chunk| std::future::ready(!chunk.is_empty()));
        Ok(UpstreamReply::Stream(events.boxed()))
    }

    fn transport_error(&self, e: &reqwest::Error) -> GatewayError {
        if e.is_connect() {
            GatewayError::upstream_connect(&self.name)
        } else if e.is_body() || e.is_decode() {
            GatewayError::upstream_broken(&self.name)
        } else {
            let mut error = GatewayError::upstream_connect(&self.name);
            error.message = format!(
                "request to backend \"{}\" failed before a response",
                self.name
            );
            error
        }
    }

    async fn status_error(&self, response: reqwest::Response) -> GatewayError {
        let status =
            StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let mut body = Vec::new();
        let mut chunks = response.bytes_stream();
        while let Some(Ok(chunk)) = chunks.next().await {
            body.extend_from_slice(&chunk[..chunk.len().min(MAX_ERROR_BODY - body.len())]);
            if body.len() >= MAX_ERROR_BODY {
                break;
            }
        }
        GatewayError::upstream_status(&self.name, status, &body, retry_after)
    }

    fn normalise(&self, body: Bytes) -> Bytes {
        normalise(self.kind, body)
    }
}

impl Provider for OpenAiCompat {
    fn send<'a>(
        &'a self,
        call: UpstreamCall<'a>,
    ) -> BoxFuture<'a, Result<UpstreamReply, GatewayError>> {
        Box::pin(self.call(call))
    }
}

/// Together ends with `finish_reason: "eos"`, which OpenAI clients do not
/// know; it becomes `"stop"`. Only objects that contain it are re-encoded.
fn normalise(kind: BackendKind, body: Bytes) -> Bytes {
    const EOS: &[u8] = br#""eos""#;
    if kind != BackendKind::Together || !body.windows(EOS.len()).any(|w| w == EOS) {
        return body;
    }
    let Ok(mut object) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return body;
    };
    let choices = object.get_mut("choices").and_then(|c| c.as_array_mut());
    for choice in choices.into_iter().flatten() {
        if choice.get("finish_reason").and_then(|f| f.as_str()) == Some("eos") {
            choice["finish_reason"] = "stop".into();
        }
    }
    serde_json::to_vec(&object).map_or(body, Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn together_eos_becomes_stop() {
        let chunk =
            Bytes::from_static(br#"{"choices":[{"index":0,"delta":{},"finish_reason":"eos"}]}"#);
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
