//! Hugging Face TGI. Chat goes to its OpenAI-compatible Messages API
//! (`/v1/chat/completions`) through `OpenAiCompat`, with TGI's quirks
//! mended; legacy completions go to its native `/generate` and
//! `/generate_stream`, asked for `details` so usage is exact, and come
//! back as OpenAI `text_completion` objects and chunks. `reasoning_effort`,
//! which TGI would ignore, is refused.

use std::sync::LazyLock;

use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use memchr::memmem::Finder;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::http::{self, Caps, ErrorReply, HttpClient, Target};
use super::openai_compat::OpenAiCompat;
use super::sse;
use super::translate::{ChunkMapper, Chunks, map_chunks};
use super::{Chunk, ChunkStream, Provider, UpstreamCall, UpstreamReply};
use crate::boxed;
use crate::config::Backend;
use crate::error::GatewayError;
use crate::openai::scan::member_values;
use crate::openai::{CompletionRequest, Endpoint, Prompt, ResponseIdentity, TypedRequest, Usage};

/// What TGI's Messages API would ignore without a word: the answer would
/// not be the one asked for.
const REASONING_EFFORT: &str = "reasoning_effort";

pub struct Tgi {
    name: String,
    /// `{root}/generate` and `{root}/generate_stream`, parsed once.
    generate: Target,
    generate_stream: Target,
    chat: OpenAiCompat,
    client: HttpClient,
    caps: Caps,
}

impl Tgi {
    pub fn new(backend: &Backend) -> Result<Self, String> {
        let root = backend
            .base_url
            .as_ref()
            .ok_or("a tgi backend needs a base_url")?
            .as_str()
            .trim_end_matches('/')
            .to_owned();
        let client = http::client(backend)?;
        Ok(Self {
            name: backend.name.clone(),
            chat: OpenAiCompat::with_base_url(backend, &format!("{root}/v1"), client.clone())?,
            generate: http::target(&backend.name, &format!("{root}/generate"))?,
            generate_stream: http::target(&backend.name, &format!("{root}/generate_stream"))?,
            client,
            caps: Caps::of(backend),
        })
    }

    async fn call(&self, call: UpstreamCall<'_>) -> Result<UpstreamReply, GatewayError> {
        let TypedRequest::Completion(completion) = &call.request.typed else {
            if let TypedRequest::Chat(chat) = &call.request.typed
                && chat
                    .extra
                    .get(REASONING_EFFORT)
                    .is_some_and(|v| !v.is_null())
            {
                return Err(GatewayError::parameter_unsupported(
                    format!(
                        "TGI's Messages API takes no `{REASONING_EFFORT}`; leave it out, or use a model whose deployments support it"
                    ),
                    REASONING_EFFORT,
                ));
            }
            return Ok(match self.chat.send(call).await? {
                UpstreamReply::Stream(chunks) => UpstreamReply::Stream(mend_chat_stream(chunks)),
                complete => complete,
            });
        };
        let streaming = call.request.stream();
        let body =
            serde_json::to_vec(&generate_request(completion, call.max_tokens)?).map_err(|e| {
                GatewayError::internal(format!("cannot encode a generate request: {e}"))
            })?;
        let url = if streaming {
            &self.generate_stream
        } else {
            &self.generate
        };
        let mut request = http::post_json(url, body);
        http::tag(&mut request, &call);
        let response = http::send(&self.name, &self.client, request, call.quota).await?;
        if !response.status.is_success() {
            return Err(ErrorReply::read(response).await.into_error(&self.name));
        }
        let identity = ResponseIdentity::new("cmpl", call.upstream_model);
        if streaming {
            let events = sse::sse_data(&self.name, self.caps, response.body).boxed();
            let mapper = GenerateMapper {
                backend: self.name.clone(),
                identity,
                finished: false,
            };
            return Ok(UpstreamReply::Stream(map_chunks(events, mapper)));
        }
        // TGI counts the prompt in this header on the generate route.
        let prompt_tokens = response
            .fields
            .get_str("x-prompt-tokens")
            .and_then(|v| v.parse::<u64>().ok());
        let bytes = http::read_body(&self.name, self.caps, response).await?;
        let generated: Generated = serde_json::from_slice(&bytes).map_err(|e| {
            GatewayError::upstream_protocol(
                &self.name,
                format_args!("not a generate response: {e}"),
            )
        })?;
        let details = generated.details.ok_or_else(|| {
            GatewayError::upstream_protocol(&self.name, "the generate response has no details")
        })?;
        let prompt_tokens = (!details.prefill.is_empty())
            .then_some(details.prefill.len() as u64)
            .or(prompt_tokens);
        let json = identity.text_completion(
            &generated.generated_text,
            Some(finish_reason(&details.finish_reason)),
            prompt_tokens.map(|p| Usage::new(p, details.generated_tokens)),
        );
        Ok(UpstreamReply::Complete(json.into()))
    }
}

impl Provider for Tgi {
    fn send<'a>(
        &'a self,
        call: UpstreamCall<'a>,
    ) -> BoxFuture<'a, Result<UpstreamReply, GatewayError>> {
        boxed::pinned(|| self.call(call))
    }
}

/// TGI's Messages API stream, mended: its usage-only chunk has an empty
/// `id` (it gets the stream's), and its mid-stream error puts the status
/// in `http_status_code` (copied to `code`, where the gateway reads it).
/// Chunks are parsed until one gives the stream's id; after that, only
/// those with an error or an empty id.
fn mend_chat_stream(chunks: ChunkStream) -> ChunkStream {
    static ERROR: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"error\""));
    static ID: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"id\""));
    let mut stream_id: Option<String> = None;
    chunks
        .map_ok(move |chunk| {
            let may_need_mending = stream_id.is_none()
                || ERROR.find(&chunk).is_some()
                || member_values(&ID, &chunk).any(|id| id.starts_with(b"\"\""));
            if !may_need_mending {
                return chunk;
            }
            let Ok(mut value) = serde_json::from_slice::<Value>(&chunk) else {
                return chunk;
            };
            if let Some(error) = value.get_mut("error").and_then(Value::as_object_mut) {
                if let Some(status) = error.get("http_status_code").cloned() {
                    error.insert("code".into(), status);
                    return Chunk::from(value.to_string());
                }
                return chunk;
            }
            match (value.get("id").and_then(Value::as_str), &stream_id) {
                (Some(""), Some(id)) => {
                    value["id"] = Value::String(id.clone());
                    Chunk::from(value.to_string())
                }
                (Some(id), None) => {
                    stream_id = Some(id.to_owned());
                    chunk
                }
                _ => chunk,
            }
        })
        .boxed()
}

#[derive(Debug, Serialize)]
struct GenerateRequest<'a> {
    inputs: &'a str,
    parameters: Parameters,
}

#[derive(Debug, Serialize)]
struct Parameters {
    /// Without it TGI reports no token counts.
    details: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_new_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop: Vec<String>,
}

fn bad(message: &str, param: &str) -> GatewayError {
    GatewayError::bad_request(message, Some(param.to_owned()))
}

fn generate_request(
    c: &CompletionRequest,
    max_tokens: Option<u32>,
) -> Result<GenerateRequest<'_>, GatewayError> {
    let inputs = match &c.prompt {
        Prompt::Text(text) => text.as_str(),
        Prompt::Texts(texts) if texts.len() == 1 => texts[0].as_str(),
        _ => {
            return Err(bad(
                "TGI's generate API takes one prompt, as text; send `prompt` as a single string",
                "prompt",
            ));
        }
    };
    if c.extra
        .get("n")
        .and_then(Value::as_u64)
        .is_some_and(|n| n != 1)
    {
        return Err(bad(
            "TGI returns one choice per request; leave `n` out or set it to 1",
            "n",
        ));
    }
    let number = |field: &str| c.extra.get(field).and_then(Value::as_f64);
    let stop = match c.extra.get("stop") {
        Some(Value::String(stop)) => vec![stop.clone()],
        Some(Value::Array(stops)) => stops
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    Ok(GenerateRequest {
        inputs,
        parameters: Parameters {
            details: true,
            max_new_tokens: c.max_tokens.or(max_tokens),
            // TGI refuses temperature 0 and top_p 1; both mean "no
            // change" in OpenAI's terms, which is TGI's default.
            temperature: number("temperature").filter(|t| *t > 0.0),
            top_p: number("top_p").filter(|p| *p > 0.0 && *p < 1.0),
            seed: c.extra.get("seed").and_then(Value::as_u64),
            frequency_penalty: number("frequency_penalty"),
            stop,
        },
    })
}

#[derive(Debug, Deserialize)]
struct Generated {
    generated_text: String,
    #[serde(default)]
    details: Option<Details>,
}

#[derive(Debug, Deserialize)]
struct Details {
    finish_reason: String,
    generated_tokens: u64,
    /// The prompt's tokens (filled only when asked for).
    #[serde(default)]
    prefill: Vec<Value>,
    /// On the last stream event: the prompt's length in tokens.
    #[serde(default)]
    input_length: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct StreamEvent {
    token: Token,
    #[serde(default)]
    details: Option<Details>,
}

#[derive(Debug, Deserialize)]
struct Token {
    text: String,
    #[serde(default)]
    special: bool,
}

/// TGI's finish reasons as OpenAI's.
fn finish_reason(tgi: &str) -> &'static str {
    match tgi {
        "length" => "length",
        // eos_token, stop_sequence
        _ => "stop",
    }
}

/// `/generate_stream` events → `text_completion` chunks; the last event's
/// details become the finish reason and a usage-only chunk.
struct GenerateMapper {
    backend: String,
    identity: ResponseIdentity,
    finished: bool,
}

/// TGI's error body, sent as an event in place of a token.
#[derive(Debug, Deserialize)]
struct TgiError {
    /// Marks an error event; `upstream_status` reads the message from
    /// the raw body.
    #[serde(rename = "error")]
    _message: String,
    #[serde(default)]
    error_type: String,
}

impl ChunkMapper for GenerateMapper {
    type Event = Chunk;

    fn map(&mut self, data: Chunk, out: &mut Chunks) {
        if let Ok(error) = serde_json::from_slice::<TgiError>(&data) {
            // The statuses TGI's router gives each error type.
            let status = match error.error_type.as_str() {
                "overloaded" => 429,
                "validation" | "template_error" | "tool_error" => 422,
                "generation" => 424,
                _ => 500,
            };
            let status = axum::http::StatusCode::from_u16(status).expect("a valid status");
            out.push(Err(GatewayError::upstream_status(
                &self.backend,
                status,
                &data,
                None,
            )));
            return;
        }
        let event: StreamEvent = match serde_json::from_slice(&data) {
            Ok(event) => event,
            Err(e) => {
                out.push(Err(GatewayError::upstream_protocol(
                    &self.backend,
                    format_args!("not a generate_stream event: {e}"),
                )));
                return;
            }
        };
        let text = if event.token.special {
            ""
        } else {
            &event.token.text
        };
        let Some(details) = event.details else {
            out.push(Ok(self.identity.text_completion(text, None, None).into()));
            return;
        };
        self.finished = true;
        let last =
            self.identity
                .text_completion(text, Some(finish_reason(&details.finish_reason)), None);
        out.push(Ok(last.into()));
        if let Some(prompt) = details.input_length {
            let usage = Usage::new(prompt, details.generated_tokens);
            out.push(Ok(self
                .identity
                .usage_chunk(Endpoint::Completions, usage)
                .into()));
        }
    }

    fn end(&mut self) -> Result<(), GatewayError> {
        if self.finished {
            Ok(())
        } else {
            Err(GatewayError::upstream_broken(&self.backend))
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::stream;
    use serde_json::json;

    use super::*;

    #[test]
    fn openai_sampling_values_tgi_refuses_mean_its_defaults() {
        let request: CompletionRequest = serde_json::from_value(json!({"model": "m",
            "prompt": ["only one"], "temperature": 0, "top_p": 1.0, "seed": 7, "stop": ["a", "b"]}))
        .unwrap();
        let body = serde_json::to_value(generate_request(&request, None).unwrap()).unwrap();
        assert_eq!(
            body,
            json!({"inputs": "only one", "parameters": {"details": true, "seed": 7, "stop": ["a", "b"]}})
        );
    }

    #[tokio::test]
    async fn the_chat_stream_is_mended() {
        let chunks = [
            r#"{"id":"c1","choices":[{"delta":{"content":"x"}}]}"#,
            r#"{"id": "c1", "choices":[{"delta":{"tool_calls":[{"id":"","index":0}]}}]}"#,
            r#"{"id":"c1","choices":[{"delta":{"content":"\"id\":\"\""}}]}"#,
            r#"{"id" : "","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
            r#"{"error":{"message":"bad","http_status_code":422}}"#,
        ];
        let upstream = stream::iter(chunks.map(|c| Ok(Chunk::from_static(c.as_bytes())))).boxed();
        let out: Vec<Chunk> = mend_chat_stream(upstream)
            .map(|c| c.unwrap())
            .collect()
            .await;
        // Chunks with nothing to mend go on as they came.
        for i in 0..3 {
            assert_eq!(out[i], chunks[i].as_bytes(), "{}", chunks[i]);
        }
        let json = |i: usize| serde_json::from_slice::<Value>(&out[i]).unwrap();
        assert_eq!(json(3)["id"], "c1");
        assert_eq!(json(4)["error"]["code"], 422);
    }
}
