//! A built-in backend for demos and load tests: it answers like an
//! OpenAI-compatible server with deterministic text, a configured time to
//! first token and speed, exact usage, and an optional failure rate. Asked
//! for `reasoning_effort`, it reasons first, as vLLM's reasoning parsers
//! answer: `reasoning_content` before the content, all of it output tokens.
//! With `prefix_cache_blocks`, it keeps a prefix cache as vLLM does: the
//! prompt's leading blocks it served before (prompts and the answers it
//! generated to them) are read from the cache, which shortens the time to
//! first token by their share of the prompt and is reported as
//! `prompt_tokens_details.cached_tokens`. With `slow_fraction`, that share
//! of its answers wait `slow_ttft_ms` for their first token: the slow tail
//! that hedging is measured against. Offered tools, it calls one as a
//! tool-calling model does, with arguments that fit the tool's schema;
//! asked for JSON (`response_format`), it answers JSON that fits, as
//! guided decoding does.

use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream;
use serde_json::{Value, json};

use super::{Chunk, Provider, UpstreamCall, UpstreamReply};
use crate::boxed;
use crate::config::{Backend, SimulatedSpec};
use crate::error::GatewayError;
use crate::metering::estimate;
use crate::metering::prefix::{self, PrefixCache};
use crate::openai::*;

const WORDS: &[&str] = &[
    "the", "gateway", "routes", "each", "request", "to", "a", "backend", "that", "serves", "it",
    "well", "and", "meters", "every", "token", "into", "cost", "while", "llama", "answers",
    "quickly", "from", "busy", "gpus",
];

pub struct Simulated {
    name: String,
    spec: SimulatedSpec,
    cache: Option<PrefixCache>,
}

impl Simulated {
    pub fn new(backend: &Backend) -> Self {
        let blocks = backend.simulated.prefix_cache_blocks;
        Self {
            name: backend.name.clone(),
            spec: backend.simulated,
            cache: (blocks > 0).then(|| PrefixCache::new(blocks)),
        }
    }

    /// Prompt tokens read from the prefix cache, when it has one; the
    /// prompt and its answer are in the cache from then on.
    fn cached_tokens(&self, request: &InboundRequest, answer: &Answer) -> Option<u64> {
        let cache = self.cache.as_ref()?;
        let reply = answer.text(answer.reasoning..answer.tokens());
        let (blocks, prompt) = prefix::conversation(request, &reply);
        let cached = cache.matched(&blocks[..prompt]).tokens;
        cache.serve(&blocks);
        Some(cached.min(answer.usage.prompt_tokens))
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
        if let TypedRequest::Embedding(embedding) = &call.request.typed {
            tokio::time::sleep(self.spec.ttft).await;
            let usage = Usage::new(estimate::prompt_tokens(call.request).estimate, 0);
            let vectors = vectors(&embedding.input, embedding.dimensions);
            let format = embedding.encoding_format.unwrap_or(EncodingFormat::Float);
            return Ok(UpstreamReply::Complete(
                embeddings(call.upstream_model, &vectors, format, usage).into(),
            ));
        }
        let request = call.request;
        // As vLLM: when the gateway asks, or the client did.
        let running_usage =
            call.running_usage || (request.include_usage() && request.asks_running_usage());
        let mut answer = Answer::new(&self.spec, call);
        let slow = self.spec.slow_fraction > 0.0 && fastrand::f64() < self.spec.slow_fraction;
        let mut ttft = if slow {
            self.spec.slow_ttft
        } else {
            self.spec.ttft
        };
        let prompt = answer.usage.prompt_tokens;
        if let Some(cached) = self.cached_tokens(request, &answer) {
            answer.usage.prompt_tokens_details = Some(PromptTokensDetails {
                cached_tokens: cached,
                cache_write_tokens: 0,
            });
            // Prefill is the time to first token; cached tokens skip it.
            ttft = ttft.mul_f64((prompt - cached) as f64 / prompt.max(1) as f64);
        }
        if !answer.streaming {
            tokio::time::sleep(ttft + answer.per_token * (answer.tokens() as u32 - 1)).await;
            return Ok(UpstreamReply::Complete(answer.complete()));
        }
        tokio::time::sleep(ttft).await;
        // Step i is the i-th word, a chunk for each answer, as vLLM sends
        // them; after the words, each answer's finish chunk, then the
        // usage chunk, as an OpenAI server sends them.
        let answers = answer.answers as usize;
        let total = (answer.tokens() + 1) * answers + 1;
        let chunks = stream::unfold((answer, 0), move |(answer, k)| async move {
            if k >= total {
                return None;
            }
            let (step, index) = (k / answers, k % answers);
            if index == 0 && step > 0 && step < answer.tokens() {
                tokio::time::sleep(answer.per_token).await;
            }
            let chunk = if k + 1 == total {
                answer.usage_chunk()
            } else {
                let chunk = answer.for_answer(answer.chunk(step), index);
                if running_usage {
                    // Its answer's count, as vLLM gives each choice's.
                    let generated = (step + 1).min(answer.tokens()) as u64;
                    with_usage_so_far(&chunk, answer.usage.prompt_tokens, generated)
                } else {
                    chunk
                }
            };
            Some((Ok(chunk), (answer, k + 1)))
        });
        Ok(UpstreamReply::Stream(chunks.boxed()))
    }
}

/// `chunk` with the usage so far, `generated` output tokens, as vLLM's
/// `continuous_usage_stats` adds it to every chunk.
fn with_usage_so_far(chunk: &Chunk, prompt: u64, generated: u64) -> Chunk {
    let object = chunk.strip_suffix(b"}").expect("a chunk is a JSON object");
    let usage = format!(
        r#","usage":{{"prompt_tokens":{prompt},"total_tokens":{},"completion_tokens":{generated}}}}}"#,
        prompt + generated
    );
    [object, usage.as_bytes()].concat().into()
}

impl Provider for Simulated {
    fn send<'a>(
        &'a self,
        call: UpstreamCall<'a>,
    ) -> BoxFuture<'a, Result<UpstreamReply, GatewayError>> {
        boxed::pinned(|| self.call(call))
    }
}

/// The length of a simulated embedding when the request sets no
/// `dimensions`.
const DIMENSIONS: u32 = 16;

/// One unit vector per input, the same for the same input every time.
fn vectors(input: &Prompt, dimensions: Option<u32>) -> Vec<Vec<f32>> {
    let seeds: Vec<u64> = match input {
        Prompt::Text(text) => vec![seed(text)],
        Prompt::Texts(texts) => texts.iter().map(seed).collect(),
        Prompt::Tokens(ids) => vec![seed(ids)],
        Prompt::TokenBatches(batches) => batches.iter().map(seed).collect(),
    };
    let dimensions = dimensions.unwrap_or(DIMENSIONS) as usize;
    seeds
        .into_iter()
        .map(|seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            let vector: Vec<f32> = (0..dimensions).map(|_| rng.f32() - 0.5).collect();
            let norm = vector
                .iter()
                .map(|x| x * x)
                .sum::<f32>()
                .sqrt()
                .max(f32::EPSILON);
            vector.into_iter().map(|x| x / norm).collect()
        })
        .collect()
}

fn seed(input: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(input)
}

/// `json`, an object of one choice, with that choice once for each index
/// in `indices`: the simulator's own output, for a request of several
/// answers.
fn renumbered(json: &[u8], indices: std::ops::Range<usize>) -> Bytes {
    let mut object: serde_json::Value =
        serde_json::from_slice(json).expect("the simulator writes JSON");
    let choice = object["choices"][0].take();
    object["choices"] = indices
        .map(|index| {
            let mut choice = choice.clone();
            choice["index"] = index.into();
            choice
        })
        .collect();
    serde_json::to_vec(&object)
        .expect("values serialise")
        .into()
}

/// How many of `count` output words a chat request's `reasoning_effort`
/// spends reasoning: a quarter, half or three quarters for low, medium
/// and high, leaving at least one word of answer.
fn reasoning_share(extra: &serde_json::Map<String, serde_json::Value>, count: usize) -> usize {
    let quarters = match extra.get("reasoning_effort").and_then(|e| e.as_str()) {
        Some("low") => 1,
        Some("medium") => 2,
        Some("high") => 3,
        _ => 0,
    };
    (count * quarters / 4).min(count.saturating_sub(1))
}

/// Everything about one simulated answer, decided up front.
struct Answer {
    endpoint: Endpoint,
    streaming: bool,
    identity: ResponseIdentity,
    /// What the answer says, a token a piece: words (each after the first
    /// of the reasoning and of the answer with its space), a call's
    /// arguments, or JSON.
    pieces: Vec<String>,
    said: Said,
    /// The first `reasoning` pieces are reasoning, the rest the answer.
    reasoning: usize,
    finish_reason: &'static str,
    /// How many answers come back (`n`, for each of a batch's prompts):
    /// each the same words.
    answers: u32,
    usage: Usage,
    per_token: Duration,
}

/// What a simulated answer is.
enum Said {
    Words,
    /// A call of the tool `name`: the pieces are its arguments.
    Call {
        id: String,
        name: String,
    },
    /// JSON that fits the format the request asked for.
    Json,
}

impl Answer {
    fn new(spec: &SimulatedSpec, call: UpstreamCall<'_>) -> Self {
        let prompt_tokens = estimate::prompt_tokens(call.request).estimate;
        let limit = call
            .request
            .max_output_tokens()
            .or(call.max_tokens)
            .unwrap_or(u32::MAX)
            .max(1) as usize;
        let (answers, generations) = (call.request.answers(), call.request.generations());
        // The same prompt always gets the same words.
        let seed = prompt_tokens as usize + call.upstream_model.len();
        let word = |i: usize| WORDS[(seed + i * 7) % WORDS.len()];
        let structured = match &call.request.typed {
            TypedRequest::Chat(chat) => structured(chat, &word),
            _ => None,
        };
        let (said, mut pieces, reasoning, cut) = match structured {
            Some((said, text)) => {
                let pieces = pieces(&text);
                let cut = pieces.len() > limit;
                (said, pieces, 0, cut)
            }
            None => {
                let count = (spec.completion_tokens as usize).min(limit);
                let reasoning = match &call.request.typed {
                    TypedRequest::Chat(chat) => reasoning_share(&chat.extra, count),
                    _ => 0,
                };
                let pieces = (0..count)
                    .map(|i| {
                        // A space before each word but the first of the
                        // reasoning and of the answer.
                        if i == 0 || i == reasoning {
                            word(i).to_owned()
                        } else {
                            format!(" {}", word(i))
                        }
                    })
                    .collect();
                (
                    Said::Words,
                    pieces,
                    reasoning,
                    count < spec.completion_tokens as usize,
                )
            }
        };
        pieces.truncate(limit);
        let endpoint = call.request.endpoint();
        Self {
            endpoint,
            streaming: call.request.stream(),
            identity: ResponseIdentity::new(
                if endpoint == Endpoint::Chat {
                    "chatcmpl-sim"
                } else {
                    "cmpl-sim"
                },
                call.upstream_model,
            ),
            finish_reason: match (cut, &said) {
                (true, _) => "length",
                (false, Said::Call { .. }) => "tool_calls",
                (false, _) => "stop",
            },
            answers,
            // `best_of` beyond `n` is generated and billed, not returned.
            usage: Usage::new(prompt_tokens, pieces.len() as u64 * u64::from(generations)),
            per_token: Duration::from_secs_f64(1.0 / spec.tokens_per_second),
            pieces,
            said,
            reasoning,
        }
    }

    /// The output tokens of one answer.
    fn tokens(&self) -> usize {
        self.pieces.len()
    }

    /// The pieces in `range`, as their text reads.
    fn text(&self, range: std::ops::Range<usize>) -> String {
        self.pieces[range].concat()
    }

    fn complete(&self) -> Bytes {
        let reasoning = self.text(0..self.reasoning);
        let answer = self.text(self.reasoning..self.tokens());
        let finish = self.finish_reason;
        let one = match (self.endpoint, &self.said) {
            (Endpoint::Chat, Said::Call { id, name }) => {
                let message = json!({"role": "assistant", "content": null, "tool_calls": [{
                    "id": id, "type": "function",
                    "function": {"name": name, "arguments": answer},
                }]});
                self.identity
                    .chat_completion(&message, finish, None, self.usage)
            }
            (Endpoint::Chat, _) => {
                let message = AssistantMessage {
                    role: "assistant",
                    content: &answer,
                    refusal: None,
                    reasoning_content: (self.reasoning > 0).then_some(reasoning.as_str()),
                };
                self.identity
                    .chat_completion(&message, finish, None, self.usage)
            }
            (Endpoint::Completions | Endpoint::Embeddings, _) => {
                self.identity
                    .text_completion(&answer, Some(finish), Some(self.usage))
            }
        };
        match self.answers {
            1 => Bytes::from(one),
            answers => renumbered(&one, 0..answers as usize),
        }
    }

    /// `chunk`, of answer 0, as answer `index`'s.
    fn for_answer(&self, chunk: Chunk, index: usize) -> Chunk {
        match self.answers {
            1 => chunk,
            _ => renumbered(&chunk, index..index + 1),
        }
    }

    fn usage_chunk(&self) -> Chunk {
        self.identity.usage_chunk(self.endpoint, self.usage).into()
    }

    /// Piece i's chunk, or after the pieces (`i` is their count) the finish
    /// chunk.
    fn chunk(&self, i: usize) -> Chunk {
        let n = self.tokens();
        let piece = self.pieces.get(i).map(String::as_str);
        let finish = (i == n).then_some(self.finish_reason);
        match (self.endpoint, &self.said) {
            // A call's first chunk names it; each chunk after carries a
            // piece of its arguments, as vLLM's tool parsers stream them.
            (Endpoint::Chat, Said::Call { id, name }) => {
                let delta = match (i, piece) {
                    (0, Some(piece)) => json!({"role": "assistant", "tool_calls": [{
                        "index": 0, "id": id, "type": "function",
                        "function": {"name": name, "arguments": piece},
                    }]}),
                    (_, Some(piece)) => {
                        json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                    }
                    (_, None) => json!({}),
                };
                self.identity.chat_chunk(&delta, finish).into()
            }
            (Endpoint::Chat, _) => {
                let reasoning = i < self.reasoning;
                let delta = Delta {
                    role: (i == 0).then_some("assistant"),
                    content: piece.filter(|_| !reasoning),
                    reasoning_content: piece.filter(|_| reasoning),
                };
                self.identity.chat_chunk(&delta, finish).into()
            }
            (Endpoint::Completions | Endpoint::Embeddings, _) => self
                .identity
                .text_completion(piece.unwrap_or(""), finish, None)
                .into(),
        }
    }
}

/// Bytes of a call's arguments, or of JSON, a token stands for, as for
/// text.
const BYTES_PER_PIECE: usize = estimate::CHARS_PER_TOKEN;

/// What a model asked for more than words answers, and its text: a call
/// of the tools `chat` offers, as a tool-calling model makes one (the
/// function `tool_choice` names; with `required`, the first tool; with
/// `auto`, the default, the first tool unless the conversation ends with
/// a tool's result, which it answers in words, so that an agent's loop
/// ends; none with `none`), with arguments that fill in the tool's
/// `parameters`; else JSON in the `response_format` asked for, as guided
/// decoding writes it.
fn structured(chat: &ChatRequest, word: &dyn Fn(usize) -> &'static str) -> Option<(Said, String)> {
    if let Some(call) = tool_call(chat, word) {
        return Some(call);
    }
    let format = chat.extra.get("response_format")?;
    let schema = match format.get("type")?.as_str()? {
        "json_schema" => format.get("json_schema")?.get("schema")?.clone(),
        "json_object" => json!({"type": "object", "properties": {"answer": {"type": "string"}}}),
        _ => return None,
    };
    Some((Said::Json, fill(&schema, word, 0).to_string()))
}

fn tool_call(chat: &ChatRequest, word: &dyn Fn(usize) -> &'static str) -> Option<(Said, String)> {
    if !chat.has_tools() {
        return None;
    }
    let tools: Vec<Value> = serde_json::from_str(chat.tools.as_deref()?.get()).ok()?;
    let function = |tool: &Value| tool.get("function").cloned();
    let chosen = match chat.extra.get("tool_choice") {
        Some(Value::String(choice)) if choice == "none" => return None,
        Some(Value::String(choice)) if choice == "required" => tools.first().and_then(function),
        Some(Value::Object(choice)) => {
            let name = choice.get("function")?.get("name")?;
            tools
                .iter()
                .filter_map(function)
                .find(|function| function.get("name") == Some(name))
        }
        _ if chat.messages.last().is_some_and(|m| m.role == "tool") => return None,
        _ => tools.first().and_then(function),
    }?;
    let name = chosen.get("name")?.as_str()?.to_owned();
    let parameters = chosen.get("parameters").unwrap_or(&Value::Null);
    let arguments = match fill(parameters, word, 0) {
        arguments @ Value::Object(_) => arguments,
        _ => json!({}),
    };
    let id = format!("call_sim-{}", crate::id::random());
    Some((Said::Call { id, name }, arguments.to_string()))
}

/// How deep `fill` follows a schema's objects and arrays.
const MAX_DEPTH: usize = 8;

/// A value that fits `schema`, as guided decoding writes one: an enum's
/// first value, a word for a string, `1`, `1.5` or `true`, an array of
/// one item, an object with every property; the first of `anyOf` or
/// `oneOf`, the first type of several.
fn fill(schema: &Value, word: &dyn Fn(usize) -> &'static str, depth: usize) -> Value {
    if let Some(first) = schema.get("enum").and_then(|e| e.as_array()?.first()) {
        return first.clone();
    }
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    let alternatives = ["anyOf", "oneOf"]
        .iter()
        .find_map(|key| schema.get(*key)?.as_array()?.first());
    if let Some(first) = alternatives {
        return fill(first, word, depth);
    }
    let kind = match schema.get("type") {
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|k| *k != "null"),
        Some(kind) => kind.as_str(),
        None if schema.get("properties").is_some() => Some("object"),
        None => None,
    };
    match kind {
        Some("string") => json!(word(depth)),
        Some("integer") => json!(1),
        Some("number") => json!(1.5),
        Some("boolean") => json!(true),
        Some("array") if depth < MAX_DEPTH => match schema.get("items") {
            Some(items) => json!([fill(items, word, depth + 1)]),
            None => json!([]),
        },
        Some("object") if depth < MAX_DEPTH => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let object: serde_json::Map<String, Value> = properties
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(i, (name, property))| {
                    (name.clone(), fill(property, &|j| word(i + j), depth + 1))
                })
                .collect();
            Value::Object(object)
        }
        Some("array") => json!([]),
        Some("object") => json!({}),
        _ => Value::Null,
    }
}

/// `text` in pieces of at most `BYTES_PER_PIECE` bytes, cut between
/// characters.
fn pieces(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut piece = String::new();
    for c in text.chars() {
        if piece.len() + c.len_utf8() > BYTES_PER_PIECE && !piece.is_empty() {
            pieces.push(std::mem::take(&mut piece));
        }
        piece.push(c);
    }
    if !piece.is_empty() {
        pieces.push(piece);
    }
    pieces
}
