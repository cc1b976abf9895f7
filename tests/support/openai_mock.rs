//! The OpenAI-compatible protocol of the mock upstream (vLLM, OpenAI,
//! Together, Groq): `POST …/chat/completions`, `POST …/completions` and
//! `POST …/embeddings` under any prefix, answered in vLLM's shapes. A
//! request with tools gets one canned tool call.

use bytes::Bytes;
use hyper::Method;
use hyper::http::request::Parts;
use serde_json::{Value, json};

use super::mock::{Rejection, Route};
use super::vision::Vision;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// `flags`: what the mock reads of `body`, read once for the request.
pub fn route(
    canned: &Canned,
    parts: &Parts,
    body: &[u8],
    flags: &Flags,
) -> Result<Route, Rejection> {
    let path = parts.uri.path();
    if parts.method == Method::POST && path.ends_with("/embeddings") {
        return embeddings(body);
    }
    let endpoint = if parts.method != Method::POST {
        None
    } else if path.ends_with("/chat/completions") {
        Some(Endpoint::Chat)
    } else if path.ends_with("/completions") {
        Some(Endpoint::Completions)
    } else {
        None
    };
    let Some(endpoint) = endpoint else {
        return Err(Rejection::new(
            404,
            &[],
            json!({"error": {"message": format!("no route for {path}"), "type": "invalid_request_error", "param": null, "code": null}}),
        ));
    };
    if let Some(field) = flags.out_of_range() {
        return Err(Rejection::new(
            400,
            &[],
            json!({"error": {"message": format!("Invalid '{field}': expected an integer from 1 to 128."), "type": "invalid_request_error", "param": field, "code": "invalid_value"}}),
        ));
    }
    if let Err(message) = flags.image_tokens(Vision::Llama4) {
        return Err(Rejection::new(
            400,
            &[],
            json!({"error": {"message": message, "type": "BadRequestError", "param": null, "code": 400}}),
        ));
    }
    Ok(Route {
        streaming: flags.streaming(),
        json: canned.json(endpoint, flags).clone(),
        headers: Vec::new(),
        events: canned.stream(endpoint, flags),
        content_type: "text/event-stream",
    })
}

/// The `dimensions` of an embedding when the request sets none.
pub const EMBEDDING_DIMENSIONS: usize = 4;

/// `POST /v1/embeddings` as vLLM answers it: one vector per input, floats
/// or base64 of little-endian `f32`s, and usage with no completion count.
/// A body OpenAI's API refuses (no `input`, an empty one, `stream`, an
/// unknown `encoding_format`) is a 400.
fn embeddings(body: &[u8]) -> Result<Route, Rejection> {
    let refuse = |message: &str| {
        Rejection::new(
            400,
            &[],
            json!({"error": {"message": message, "type": "invalid_request_error", "param": "input", "code": null}}),
        )
    };
    let request: Value =
        serde_json::from_slice(body).map_err(|_| refuse("the body is not JSON"))?;
    if request.get("stream").is_some() {
        return Err(refuse("embeddings do not stream"));
    }
    let inputs: Vec<usize> = match &request["input"] {
        Value::String(text) => vec![text.len().div_ceil(4)],
        Value::Array(items) if !items.is_empty() => match &items[0] {
            Value::Array(_) => items
                .iter()
                .map(|i| i.as_array().map_or(0, Vec::len))
                .collect(),
            Value::Number(_) => vec![items.len()],
            _ => items
                .iter()
                .map(|i| i.as_str().map_or(0, |t| t.len().div_ceil(4)))
                .collect(),
        },
        _ => return Err(refuse("`input` must be a string, strings, or token arrays")),
    };
    let dimensions = request["dimensions"]
        .as_u64()
        .map_or(EMBEDDING_DIMENSIONS, |d| d as usize);
    let vector: Vec<f32> = (0..dimensions).map(|i| i as f32 / 10.0).collect();
    let embedding = match request["encoding_format"].as_str() {
        None | Some("float") => json!(vector),
        Some("base64") => {
            use base64::Engine as _;
            let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
            json!(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        Some(_) => return Err(refuse("`encoding_format` must be \"float\" or \"base64\"")),
    };
    let prompt_tokens: usize = inputs.iter().sum();
    let data: Vec<Value> = (0..inputs.len())
        .map(|index| json!({"object": "embedding", "index": index, "embedding": embedding}))
        .collect();
    Ok(Route {
        streaming: false,
        json: Bytes::from(
            json!({"id": "embd-mock", "object": "list", "created": 1_700_000_000, "model": CANNED_MODEL,
                "data": data, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0}})
            .to_string(),
        ),
        headers: Vec::new(),
        events: Vec::new(),
        content_type: "application/json",
    })
}

/// The part of a request body the mock reads to decide how to answer.
#[derive(Default, serde::Deserialize)]
pub struct Flags {
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    stream_options: Option<Value>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    n: Option<Value>,
    #[serde(default)]
    best_of: Option<Value>,
    #[serde(default)]
    prompt: Option<Value>,
    /// Read for images only when the request has one.
    #[serde(default)]
    messages: Option<Box<serde_json::value::RawValue>>,
    /// vLLM's per-request settings of the model's processor.
    #[serde(default)]
    mm_processor_kwargs: Option<Value>,
}

impl Flags {
    pub fn parse(body: &[u8]) -> Self {
        serde_json::from_slice(body).unwrap_or_default()
    }

    pub fn streaming(&self) -> bool {
        self.stream == Some(true)
    }

    /// The request offers tools: the canned answer calls one.
    pub fn tools(&self) -> bool {
        self.tools.as_ref().is_some_and(|t| !t.is_empty())
    }

    /// The output limit the request sets, if any.
    pub fn max_tokens(&self) -> Option<usize> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// How many answers the request asks to be generated: `n`, or legacy
    /// completions' `best_of`, billed in full, for each prompt of a batch.
    pub fn generations(&self) -> usize {
        let each = [&self.n, &self.best_of]
            .into_iter()
            .filter_map(|v| v.as_ref()?.as_u64())
            .max()
            .map_or(1, |n| n as usize);
        let prompts = match &self.prompt {
            // Strings, or arrays of token ids: a batch. Token ids alone
            // are one prompt.
            Some(Value::Array(items)) if !items.first().is_some_and(Value::is_number) => {
                items.len().max(1)
            }
            _ => 1,
        };
        each * prompts
    }

    /// The count OpenAI's API refuses, if any: `n` and `best_of` are
    /// integers from 1 to 128.
    fn out_of_range(&self) -> Option<&'static str> {
        [("n", &self.n), ("best_of", &self.best_of)]
            .into_iter()
            .find(|(_, v)| {
                v.as_ref().is_some_and(|v| {
                    !v.is_null() && !v.as_u64().is_some_and(|n| (1..=128).contains(&n))
                })
            })
            .map(|(field, _)| field)
    }

    /// The bytes of the text of the request's messages.
    pub fn text_bytes(&self) -> u64 {
        let messages: Vec<Value> = self
            .messages
            .as_deref()
            .and_then(|m| serde_json::from_str(m.get()).ok())
            .unwrap_or_default();
        let content = messages.iter().map(|m| &m["content"]);
        let texts = content.flat_map(|c| match c {
            Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
            text => text.as_str().into_iter().collect::<Vec<_>>(),
        });
        texts.map(|t| t.len() as u64).sum()
    }

    /// The prompt tokens of the request's images, as vLLM serving a model
    /// with `vision` counts them; `Err` says which image it could not load.
    pub fn image_tokens(&self, vision: Vision) -> Result<u64, String> {
        let Some(messages) = self.messages.as_deref().map(|m| m.get()) else {
            return Ok(0);
        };
        if !messages.contains("\"image_url\"") {
            return Ok(0);
        }
        let messages: Vec<Value> = serde_json::from_str(messages).unwrap_or_default();
        let parts = messages
            .iter()
            .filter_map(|m| m["content"].as_array())
            .flatten()
            .filter(|p| p["type"] == "image_url");
        let mut tokens = 0;
        for part in parts {
            let url = part["image_url"]["url"]
                .as_str()
                .or(part["image_url"].as_str())
                .unwrap_or("");
            // The mock reaches no network: a URL's image is taken to be a
            // 12-megapixel photo.
            let fetched =
                (url.starts_with("http://") || url.starts_with("https://")).then_some((4032, 3024));
            let (width, height) = fetched
                .or_else(|| image_size(url))
                .ok_or_else(|| format!("Failed to load image {url:.40}"))?;
            let max_pixels = self
                .mm_processor_kwargs
                .as_ref()
                .and_then(|kwargs| kwargs["max_pixels"].as_f64());
            tokens += vision.image_tokens_within(width, height, max_pixels);
        }
        Ok(tokens)
    }

    /// The prompt tokens of the request's WAV audio, as an audio model
    /// served by vLLM counts them: Qwen2-Audio's encoder makes a token of
    /// each 40 ms.
    pub fn audio_tokens(&self) -> u64 {
        use base64::Engine as _;
        const TOKENS_PER_SECOND: f64 = 25.0;
        let Some(messages) = self.messages.as_deref().map(|m| m.get()) else {
            return 0;
        };
        if !messages.contains("\"input_audio\"") {
            return 0;
        }
        let messages: Vec<Value> = serde_json::from_str(messages).unwrap_or_default();
        let clips = messages
            .iter()
            .filter_map(|m| m["content"].as_array())
            .flatten()
            .filter(|p| p["type"] == "input_audio")
            .filter_map(|p| p["input_audio"]["data"].as_str());
        clips
            .filter_map(|data| base64::engine::general_purpose::STANDARD.decode(data).ok())
            .filter(|wav| wav.len() > WAV_HEADER)
            .map(|wav| {
                let byte_rate = u32::from_le_bytes(wav[28..32].try_into().unwrap()).max(1);
                let seconds = (wav.len() - WAV_HEADER) as f64 / f64::from(byte_rate);
                (seconds * TOKENS_PER_SECOND).ceil() as u64
            })
            .sum()
    }

    pub fn include_usage(&self) -> bool {
        self.stream_option("include_usage")
    }

    /// vLLM's `continuous_usage_stats`, which it honours only with
    /// `include_usage`.
    pub fn running_usage(&self) -> bool {
        self.include_usage() && self.stream_option("continuous_usage_stats")
    }

    fn stream_option(&self, name: &str) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.get(name))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// vLLM's `continuous_usage_stats`: every chunk with choices carries the
/// usage so far, its choice's completion tokens generated by then (the
/// role chunk none; a chunk of text or tool-call arguments one more), as
/// vLLM's `serving_chat.py` and `serving_completion.py` write it.
fn with_running_usage(events: Vec<Bytes>) -> Vec<Bytes> {
    let parse = |event: &Bytes| -> Option<Value> {
        let text = std::str::from_utf8(event).ok()?;
        serde_json::from_str(text.trim_end().strip_prefix("data: ")?).ok()
    };
    let last = events
        .iter()
        .rev()
        .find_map(|e| {
            parse(e)
                .map(|v| v["usage"].clone())
                .filter(Value::is_object)
        })
        .expect("the usage chunk");
    let (prompt, most) = (
        last["prompt_tokens"].as_u64().unwrap(),
        last["completion_tokens"].as_u64().unwrap(),
    );
    let mut generated = std::collections::HashMap::<u64, u64>::new();
    events
        .into_iter()
        .map(|event| {
            let Some(mut chunk) = parse(&event) else {
                return event;
            };
            let Some(choice) = chunk["choices"].get(0).cloned() else {
                return event;
            };
            let delta = choice.get("delta").unwrap_or(&choice);
            let said = ["content", "text"]
                .iter()
                .any(|k| delta[*k].as_str().is_some_and(|t| !t.is_empty()))
                || delta.get("tool_calls").is_some();
            let count = generated
                .entry(choice["index"].as_u64().unwrap_or(0))
                .or_default();
            *count = (*count + u64::from(said)).min(most);
            chunk["usage"] = json!({"prompt_tokens": prompt, "total_tokens": prompt + *count, "completion_tokens": *count});
            Bytes::from(format!("data: {chunk}\n\n"))
        })
        .collect()
}

/// A canonical WAV file's header: RIFF, its `fmt ` chunk, the `data`
/// chunk's head.
const WAV_HEADER: usize = 44;

/// A WAV file of `seconds` of silence, 8-bit mono at `rate` samples a
/// second.
pub fn wav(seconds: u32, rate: u32) -> Vec<u8> {
    let data = seconds * rate;
    let mut wav = Vec::with_capacity(WAV_HEADER + data as usize);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1u16.to_le_bytes()); // mono
    wav.extend_from_slice(&rate.to_le_bytes());
    wav.extend_from_slice(&rate.to_le_bytes()); // bytes a second
    wav.extend_from_slice(&1u16.to_le_bytes()); // bytes a frame
    wav.extend_from_slice(&8u16.to_le_bytes()); // bits a sample
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data.to_le_bytes());
    wav.resize(WAV_HEADER + data as usize, 128);
    wav
}

fn image_size(url: &str) -> Option<(usize, usize)> {
    use base64::Engine as _;
    let (_, data) = url.strip_prefix("data:")?.split_once(";base64,")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .ok()?;
    let size = imagesize::blob_size(&bytes).ok()?;
    Some((size.width, size.height))
}

/// Canned answers, built once per mock, in vLLM's shapes.
pub struct Canned {
    chat_json: Bytes,
    completion_json: Bytes,
    /// The answer to a request with tools: one call of `get_weather`.
    tool_json: Bytes,
    /// role chunk, content chunks, finish chunk, usage chunk, `[DONE]`.
    chat_stream: Vec<Bytes>,
    completion_stream: Vec<Bytes>,
    /// role chunk, tool call chunks, finish chunk, usage chunk, `[DONE]`.
    tool_stream: Vec<Bytes>,
}

pub const CANNED_MODEL: &str = "mock-model";
pub const CANNED_PROMPT_TOKENS: u64 = 11;
/// What Llama 3.1's chat template adds around one user message: its
/// system block with the dates, the message's markers, the answer's
/// header (36 tokens for "Hello", counted with Meta's tokenizer).
pub const LLAMA3_TEMPLATE_TOKENS: u64 = 35;
/// The text of each token of a canned or generated answer: 4 bytes, as
/// the gateway estimates a token.
pub const WORD: &str = "tok ";
/// The tool call every mock answers a request with tools with.
pub const TOOL_CALL_ID: &str = "call_mock";
pub const TOOL_NAME: &str = "get_weather";
/// `{"city":"Paris"}`, in the pieces a stream sends it in.
pub const TOOL_ARGUMENTS: [&str; 2] = ["{\"city\":", "\"Paris\"}"];

impl Canned {
    /// `chunks` tokens in each of `choices` answers, as vLLM streams them:
    /// a step's chunks one per answer, each naming its `index`; usage
    /// counts every answer's tokens. A request with tools gets one answer,
    /// a call of `get_weather` with `TOOL_ARGUMENTS`. Usage counts
    /// `prompt` tokens of prompt.
    pub fn new(chunks: usize, choices: usize, prompt: u64) -> Self {
        let arguments = TOOL_ARGUMENTS.map(str::to_owned).to_vec();
        Self::calling(chunks, choices, prompt, false, WORD, arguments)
    }

    /// `new`, with a request with tools answered by a call as long as the
    /// answer: its arguments `{"q":"tok tok …"}`, streamed a token a chunk.
    /// `limited`: the answers end at the request's output limit, and
    /// their `finish_reason` is `length`.
    /// `word` is each token's text.
    pub fn generated(
        chunks: usize,
        choices: usize,
        prompt: u64,
        limited: bool,
        word: &str,
    ) -> Self {
        let mut arguments = vec![r#"{"q":""#.to_owned()];
        arguments.extend(std::iter::repeat_n(word.to_owned(), chunks));
        arguments.push(r#""}"#.to_owned());
        Self::calling(chunks, choices, prompt, limited, word, arguments)
    }

    fn calling(
        chunks: usize,
        choices: usize,
        prompt: u64,
        limited: bool,
        word: &str,
        arguments: Vec<String>,
    ) -> Self {
        let (stop, tool_calls) = if limited {
            ("length", "length")
        } else {
            ("stop", "tool_calls")
        };
        let usage_of = |choices: usize| {
            let completion = (chunks * choices) as u64;
            json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
        };
        let usage = usage_of(choices);
        let text = word.repeat(chunks);
        let event = |v: Value| Bytes::from(format!("data: {v}\n\n"));
        let done = Bytes::from_static(b"data: [DONE]\n\n");
        let chat_chunk = |index: usize, delta: Value, finish: Value| {
            event(
                json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": CANNED_MODEL,
                "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}]}),
            )
        };
        let each = |chunk: &dyn Fn(usize) -> Bytes| (0..choices).map(chunk).collect::<Vec<_>>();
        let mut chat_stream =
            each(&|i| chat_chunk(i, json!({"role": "assistant", "content": ""}), Value::Null));
        for _ in 0..chunks {
            chat_stream.extend(each(&|i| {
                chat_chunk(i, json!({"content": word}), Value::Null)
            }));
        }
        chat_stream.extend(each(&|i| chat_chunk(i, json!({}), json!(stop))));
        let usage_chunk = |usage: &Value| {
            event(
                json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": CANNED_MODEL, "choices": [], "usage": usage}),
            )
        };
        chat_stream.push(usage_chunk(&usage));
        chat_stream.push(done.clone());
        let text_chunk = |index: usize, text: &str, finish: Value| {
            event(
                json!({"id": "cmpl-mock", "object": "text_completion", "created": 1_700_000_000, "model": CANNED_MODEL,
                "choices": [{"index": index, "text": text, "logprobs": null, "finish_reason": finish}]}),
            )
        };
        let mut completion_stream = Vec::new();
        for _ in 0..chunks {
            completion_stream.extend(each(&|i| text_chunk(i, word, Value::Null)));
        }
        completion_stream.extend(each(&|i| text_chunk(i, "", json!("length"))));
        completion_stream.push(event(json!({"id": "cmpl-mock", "object": "text_completion", "created": 1_700_000_000, "model": CANNED_MODEL, "choices": [], "usage": usage})));
        completion_stream.push(done.clone());
        let one_answer = usage_of(1);
        let mut tool_stream = vec![chat_chunk(
            0,
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        )];
        tool_stream.push(chat_chunk(
            0,
            json!({"tool_calls": [{"index": 0, "id": TOOL_CALL_ID, "type": "function", "function": {"name": TOOL_NAME, "arguments": ""}}]}),
            Value::Null,
        ));
        for piece in &arguments {
            tool_stream.push(chat_chunk(
                0,
                json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
                Value::Null,
            ));
        }
        tool_stream.push(chat_chunk(0, json!({}), json!(tool_calls)));
        tool_stream.push(usage_chunk(&one_answer));
        tool_stream.push(done);
        let answers =
            |answer: &dyn Fn(usize) -> Value| (0..choices).map(answer).collect::<Vec<_>>();
        Self {
            tool_json: Bytes::from(
                json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000, "model": CANNED_MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                        {"id": TOOL_CALL_ID, "type": "function", "function": {"name": TOOL_NAME, "arguments": arguments.concat()}}]},
                        "logprobs": null, "finish_reason": tool_calls}],
                    "usage": one_answer})
                .to_string(),
            ),
            tool_stream,
            chat_json: Bytes::from(
                json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000, "model": CANNED_MODEL,
                    "choices": answers(&|i| json!({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": stop})),
                    "usage": usage})
                .to_string(),
            ),
            completion_json: Bytes::from(
                json!({"id": "cmpl-mock", "object": "text_completion", "created": 1_700_000_000, "model": CANNED_MODEL,
                    "choices": answers(&|i| json!({"index": i, "text": text, "logprobs": null, "finish_reason": "length"})),
                    "usage": usage})
                .to_string(),
            ),
            chat_stream,
            completion_stream,
        }
    }

    pub fn json(&self, endpoint: Endpoint, flags: &Flags) -> &Bytes {
        match endpoint {
            Endpoint::Chat if flags.tools() => &self.tool_json,
            Endpoint::Chat => &self.chat_json,
            Endpoint::Completions => &self.completion_json,
        }
    }

    /// The canned stream; the usage chunk only when the request asked,
    /// and the usage so far in every chunk when it asked for that too.
    pub fn stream(&self, endpoint: Endpoint, flags: &Flags) -> Vec<Bytes> {
        let include_usage = flags.include_usage();
        let all = match endpoint {
            Endpoint::Chat if flags.tools() => &self.tool_stream,
            Endpoint::Chat => &self.chat_stream,
            Endpoint::Completions => &self.completion_stream,
        };
        let usage_at = all.len() - 2;
        let events = all
            .iter()
            .enumerate()
            .filter(|(i, _)| include_usage || *i != usage_at)
            .map(|(_, e)| e.clone());
        if flags.running_usage() {
            with_running_usage(events.collect())
        } else {
            events.collect()
        }
    }
}
