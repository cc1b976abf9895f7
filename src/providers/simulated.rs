//! A built-in backend for demos and load tests: it answers like an
//! OpenAI-compatible server with deterministic text, a configured time to
//! first token and speed, exact usage, and an optional failure rate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream;

use super::{Chunk, Provider, UpstreamCall, UpstreamReply};
use crate::config::{Backend, SimulatedSpec};
use crate::error::GatewayError;
use crate::metering::estimate;
use crate::openai::*;

const WORDS: &[&str] = &[
    "the", "gateway", "routes", "each", "request", "to", "a", "backend", "that", "serves", "it",
    "well", "and", "meters", "every", "token", "into", "cost", "while", "llama", "answers",
    "quickly", "from", "busy", "gpus",
];

pub struct Simulated {
    name: String,
    spec: SimulatedSpec,
}

impl Simulated {
    pub fn new(backend: &Backend) -> Self {
        Self {
            name: backend.name.clone(),
            spec: backend.simulated,
        }
    }

    async fn call(&self, call: UpstreamCall<'_>) -> Result<UpstreamReply, GatewayError> {
        if self.spec.failure_rate > 0.0 && fastrand::f64() < self.spec.failure_rate {
            tokio::time::sleep(self.spec.ttft).await;
            return Err(GatewayError::upstream_status(
                &self.name,
                StatusCode::SERVICE_UNAVAILABLE,
                br#"{"error":{"message":"simulated failure","type":"server_error"}}"#,
                None,
            ));
        }
        let answer = Answer::new(&self.spec, call);
        if !answer.streaming {
            tokio::time::sleep(self.spec.ttft + answer.per_token * (answer.words.len() as u32 - 1))
                .await;
            return Ok(UpstreamReply::Complete(answer.complete()));
        }
        tokio::time::sleep(self.spec.ttft).await;
        // Chunk i is the i-th word; after the words, the finish chunk and
        // the usage chunk, as an OpenAI server sends them.
        let total = answer.words.len() + 2;
        let chunks = stream::unfold((answer, 0), move |(answer, i)| async move {
            if i >= total {
                return None;
            }
            if i > 0 && i < answer.words.len() {
                tokio::time::sleep(answer.per_token).await;
            }
            let chunk = answer.chunk(i);
            Some((Ok(chunk), (answer, i + 1)))
        });
        Ok(UpstreamReply::Stream(chunks.boxed()))
    }
}

impl Provider for Simulated {
    fn send<'a>(
        &'a self,
        call: UpstreamCall<'a>,
    ) -> BoxFuture<'a, Result<UpstreamReply, GatewayError>> {
        Box::pin(self.call(call))
    }
}

/// Everything about one simulated answer, decided up front.
struct Answer {
    endpoint: Endpoint,
    streaming: bool,
    id: String,
    created: u64,
    model: String,
    words: Vec<&'static str>,
    finish_reason: &'static str,
    usage: Usage,
    per_token: Duration,
}

impl Answer {
    fn new(spec: &SimulatedSpec, call: UpstreamCall<'_>) -> Self {
        let prompt_tokens = estimate::prompt_tokens(call.request);
        let limit = call.request.max_output_tokens().unwrap_or(u32::MAX).max(1);
        let count = spec.completion_tokens.min(limit) as usize;
        // The same prompt always gets the same words.
        let seed = prompt_tokens as usize + call.upstream_model.len();
        let words = (0..count)
            .map(|i| WORDS[(seed + i * 7) % WORDS.len()])
            .collect();
        let endpoint = call.request.endpoint();
        Self {
            endpoint,
            streaming: call.request.stream(),
            id: format!(
                "{}-sim{}",
                if endpoint == Endpoint::Chat {
                    "chatcmpl"
                } else {
                    "cmpl"
                },
                crate::id::random()
            ),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: call.upstream_model.to_owned(),
            words,
            finish_reason: if spec.completion_tokens > limit {
                "length"
            } else {
                "stop"
            },
            usage: Usage::new(prompt_tokens, count as u64),
            per_token: Duration::from_secs_f64(1.0 / spec.tokens_per_second),
        }
    }

    /// Word i as it appears in the text: a space before all but the first.
    fn piece(&self, i: usize) -> String {
        if i == 0 {
            self.words[0].to_owned()
        } else {
            format!(" {}", self.words[i])
        }
    }

    fn complete(&self) -> Bytes {
        let text: String = (0..self.words.len()).map(|i| self.piece(i)).collect();
        let json = match self.endpoint {
            Endpoint::Chat => serde_json::to_vec(&ChatCompletion {
                id: &self.id,
                object: "chat.completion",
                created: self.created,
                model: &self.model,
                choices: [ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant",
                        content: &text,
                        refusal: None,
                    },
                    logprobs: None,
                    finish_reason: self.finish_reason,
                }],
                usage: self.usage,
            }),
            Endpoint::Completions => {
                serde_json::to_vec(&self.text_completion(&text, Some(self.finish_reason), true))
            }
        };
        Bytes::from(json.expect("responses serialise"))
    }

    fn chunk(&self, i: usize) -> Chunk {
        let n = self.words.len();
        let piece = (i < n).then(|| self.piece(i));
        let finish = (i == n).then_some(self.finish_reason);
        let usage_only = i == n + 1;
        let json = match self.endpoint {
            Endpoint::Chat => serde_json::to_vec(&ChatChunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: if usage_only {
                    Vec::new()
                } else {
                    vec![ChunkChoice {
                        index: 0,
                        delta: Delta {
                            role: (i == 0).then_some("assistant"),
                            content: piece.as_deref(),
                        },
                        logprobs: None,
                        finish_reason: finish,
                    }]
                },
                usage: usage_only.then_some(self.usage),
            }),
            Endpoint::Completions if usage_only => serde_json::to_vec(&TextCompletion {
                choices: Vec::new(),
                ..self.text_completion("", None, true)
            }),
            Endpoint::Completions => serde_json::to_vec(&self.text_completion(
                piece.as_deref().unwrap_or(""),
                finish,
                false,
            )),
        };
        json.expect("chunks serialise")
    }

    fn text_completion<'a>(
        &'a self,
        text: &'a str,
        finish: Option<&'static str>,
        usage: bool,
    ) -> TextCompletion<'a> {
        TextCompletion {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.model,
            choices: vec![TextChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: finish,
            }],
            usage: usage.then_some(self.usage),
        }
    }
}
