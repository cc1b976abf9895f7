//! What both inbound APIs read of the canonical answer: a whole OpenAI
//! chat completion, or its chunks, seen through borrowed views; and the
//! one state machine that turns chunks into content blocks (Messages) or
//! output items (Responses): which block is open, when it closes, and how
//! the stream ended. Each API writes its own events through a [`Sink`].
//! Reasoning (vLLM's `reasoning_content` or `reasoning`, Bedrock's
//! `reasoningContent` as its provider writes it) is a block of its own,
//! never text.

use std::borrow::Cow;

use bytes::{BufMut, BytesMut};
use serde::Deserialize;
use serde_json::Value;

use crate::error::GatewayError;
use crate::openai::{ReportedUsage, Usage};

/// A whole `chat.completion`, the fields the translations read.
#[derive(Debug, Deserialize)]
pub struct Completion<'a> {
    #[serde(borrow, default)]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub model: Option<Cow<'a, str>>,
    #[serde(default)]
    pub choices: Vec<Choice>,
    #[serde(default)]
    pub usage: Option<ReportedUsage>,
}

#[derive(Debug, Deserialize)]
pub struct Choice {
    #[serde(default)]
    pub message: Option<Answer>,
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// vLLM's matched stop string (or token id) when `finish_reason` is
    /// `stop`.
    #[serde(default)]
    pub stop_reason: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Answer {
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Debug, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub function: Function,
}

#[derive(Debug, Deserialize)]
pub struct Function {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

impl Answer {
    /// The model's reasoning, under either name vLLM has given it.
    pub fn reasoning(&self) -> Option<&str> {
        self.reasoning_content
            .as_deref()
            .or(self.reasoning.as_deref())
            .filter(|r| !r.is_empty())
    }
}

impl Completion<'_> {
    /// Reads a completion body; the provider checked it is JSON, so a
    /// body that does not fit is the upstream's fault.
    pub fn read<'a>(body: &'a [u8], backend: &str) -> Result<Completion<'a>, GatewayError> {
        serde_json::from_slice(body).map_err(|e| GatewayError::upstream_protocol(backend, e))
    }

    pub fn usage(&self) -> Usage {
        self.usage
            .as_ref()
            .and_then(|u| u.read().ok())
            .unwrap_or_default()
    }
}

/// One `chat.completion.chunk`, the fields the translations read.
#[derive(Debug, Deserialize)]
struct ChunkView<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Vec<ChoiceDelta<'a>>,
}

#[derive(Debug, Deserialize)]
struct ChoiceDelta<'a> {
    #[serde(borrow, default)]
    delta: Option<DeltaView<'a>>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    stop_reason: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct DeltaView<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

#[derive(Debug, Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    id: Option<String>,
    #[serde(borrow, default)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Debug, Deserialize)]
struct FunctionDelta<'a> {
    #[serde(default)]
    name: Option<String>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
}

/// How the answer ended, as the canonical chunks said it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Finish {
    /// OpenAI's `finish_reason`: `stop`, `length`, `tool_calls`,
    /// `content_filter`; `None` when the stream never said.
    pub reason: Option<String>,
    /// The stop string vLLM reports having matched.
    pub stop_string: Option<String>,
}

impl Finish {
    pub fn of(choice: Option<&Choice>) -> Self {
        choice.map_or_else(Self::default, |c| {
            Self::new(&c.finish_reason, &c.stop_reason)
        })
    }

    fn new(reason: &Option<String>, stop_reason: &Option<Value>) -> Self {
        Self {
            reason: reason.clone(),
            stop_string: match stop_reason {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            },
        }
    }
}

/// What an API writes for each step of the canonical stream. `index` is
/// the block's (item's) position in the answer, from 0.
pub trait Sink {
    /// Before the first block: the answer's id and model.
    fn start(&mut self, out: &mut BytesMut, id: &str, model: &str);
    fn open_reasoning(&mut self, out: &mut BytesMut, index: usize);
    fn reasoning(&mut self, out: &mut BytesMut, index: usize, text: &str);
    fn open_text(&mut self, out: &mut BytesMut, index: usize);
    fn text(&mut self, out: &mut BytesMut, index: usize, text: &str);
    fn open_tool(&mut self, out: &mut BytesMut, index: usize, id: &str, name: &str);
    fn arguments(&mut self, out: &mut BytesMut, index: usize, arguments: &str);
    /// Closes a block: `last` when the answer ended with it (how it
    /// ended is then known), else another block follows.
    fn close(&mut self, out: &mut BytesMut, index: usize, last: Option<&Finish>);
    /// After the last block closed.
    fn finish(&mut self, out: &mut BytesMut, finish: &Finish, usage: Usage);
    /// The stream failed after it started, having used `usage`; nothing
    /// follows.
    fn error(&mut self, out: &mut BytesMut, error: &GatewayError, usage: Usage);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Nothing,
    Reasoning,
    Text,
    /// The tool call with this canonical `index`.
    Tool(u32),
}

/// A tool call whose deltas came while another call's block was open.
/// Both APIs write a block's deltas between its start and its stop, and
/// one block at a time, so a call that an upstream interleaves with the
/// open one is kept whole and written once that block closes.
struct Held {
    index: u32,
    /// As the upstream gave it, if it has yet.
    id: Option<String>,
    name: Option<String>,
    arguments: String,
}

/// The canonical stream, turned into one API's events by its sink.
pub struct Translator<S> {
    sink: S,
    started: bool,
    open: Open,
    /// The open tool call's id as the upstream gave it, which tells a
    /// next call it gives the same `index` (Ollama numbers every parallel
    /// call 0) from more of this one.
    open_id: Option<String>,
    held: Vec<Held>,
    /// Blocks opened so far: the next block's index.
    blocks: usize,
    finish: Finish,
    done: bool,
}

impl<S: Sink> Translator<S> {
    pub fn new(sink: S) -> Self {
        Self {
            sink,
            started: false,
            open: Open::Nothing,
            open_id: None,
            held: Vec::new(),
            blocks: 0,
            finish: Finish::default(),
            done: false,
        }
    }

    /// One canonical chunk, which the meter has already read. A chunk the
    /// views cannot read carries nothing to translate (usage-only chunks
    /// included): the meter judged it.
    pub fn chunk(&mut self, out: &mut BytesMut, chunk: &[u8]) {
        let Ok(view) = serde_json::from_slice::<ChunkView<'_>>(chunk) else {
            return;
        };
        if !self.started {
            self.started = true;
            let id = view.id.as_deref().unwrap_or_default();
            let model = view.model.as_deref().unwrap_or_default();
            self.sink.start(out, id, model);
        }
        let Some(choice) = view.choices.into_iter().next() else {
            return;
        };
        if let Some(delta) = choice.delta {
            let reasoning = delta.reasoning_content.or(delta.reasoning);
            if let Some(text) = reasoning.as_deref().filter(|t| !t.is_empty()) {
                if self.open != Open::Reasoning {
                    self.switch(out, Open::Reasoning, None);
                }
                self.sink.reasoning(out, self.blocks - 1, text);
            }
            if let Some(text) = delta.content.as_deref().filter(|t| !t.is_empty()) {
                if self.open != Open::Text {
                    self.switch(out, Open::Text, None);
                }
                self.sink.text(out, self.blocks - 1, text);
            }
            for call in delta.tool_calls.into_iter().flatten() {
                let index = call.index.unwrap_or(0);
                let (name, arguments) = call
                    .function
                    .map_or((None, None), |f| (f.name, f.arguments));
                let arguments = arguments.as_deref().filter(|a| !a.is_empty());
                let another = named_apart(call.id.as_deref(), self.open_id.as_deref());
                match self.open {
                    Open::Tool(open) if open == index && !another => {}
                    Open::Tool(open) if open != index => {
                        self.hold(index, call.id, name, arguments);
                        continue;
                    }
                    _ => {
                        let id = call.id.clone().unwrap_or_else(new_call_id);
                        self.switch(out, Open::Tool(index), Some((&id, name.as_deref())));
                        self.open_id = call.id;
                    }
                }
                if let Some(arguments) = arguments {
                    self.sink.arguments(out, self.blocks - 1, arguments);
                }
            }
        }
        if choice.finish_reason.is_some() {
            self.finish = Finish::new(&choice.finish_reason, &choice.stop_reason);
        }
    }

    /// Keeps a delta of a call that is not the open one: more of the last
    /// call held with its `index`, unless the two name different ids.
    fn hold(
        &mut self,
        index: u32,
        id: Option<String>,
        name: Option<String>,
        arguments: Option<&str>,
    ) {
        let same = self.held.iter_mut().rev().find(|held| held.index == index);
        let held = match same {
            Some(held) if !named_apart(id.as_deref(), held.id.as_deref()) => held,
            _ => {
                self.held.push(Held {
                    index,
                    id: None,
                    name: None,
                    arguments: String::new(),
                });
                self.held.last_mut().expect("just pushed")
            }
        };
        held.id = held.id.take().or(id);
        held.name = held.name.take().or(name);
        held.arguments.push_str(arguments.unwrap_or_default());
    }

    /// Closes the open block and opens `next`.
    fn switch(&mut self, out: &mut BytesMut, next: Open, tool: Option<(&str, Option<&str>)>) {
        self.close(out, false);
        let index = self.blocks;
        self.blocks += 1;
        self.open = next;
        match (next, tool) {
            (_, Some((id, name))) => self
                .sink
                .open_tool(out, index, id, name.unwrap_or_default()),
            (Open::Reasoning, None) => self.sink.open_reasoning(out, index),
            _ => self.sink.open_text(out, index),
        }
    }

    /// Closes the open block, then writes each held call as a block of
    /// its own; the last block closed is the answer's last when `last`.
    fn close(&mut self, out: &mut BytesMut, last: bool) {
        if self.open != Open::Nothing {
            let finish = (last && self.held.is_empty()).then_some(&self.finish);
            self.sink.close(out, self.blocks - 1, finish);
            self.open = Open::Nothing;
        }
        let held = std::mem::take(&mut self.held);
        let count = held.len();
        for (n, call) in held.into_iter().enumerate() {
            let index = self.blocks;
            self.blocks += 1;
            let id = call.id.unwrap_or_else(new_call_id);
            let name = call.name.as_deref().unwrap_or_default();
            self.sink.open_tool(out, index, &id, name);
            if !call.arguments.is_empty() {
                self.sink.arguments(out, index, &call.arguments);
            }
            let finish = (last && n + 1 == count).then_some(&self.finish);
            self.sink.close(out, index, finish);
        }
    }

    /// The canonical stream ended normally, having used `usage`.
    pub fn end(&mut self, out: &mut BytesMut, usage: Usage) {
        if self.done {
            return;
        }
        self.done = true;
        self.start_unnamed(out);
        self.close(out, true);
        self.sink.finish(out, &self.finish, usage);
    }

    /// The canonical stream failed, having used `usage`.
    pub fn fail(&mut self, out: &mut BytesMut, error: &GatewayError, usage: Usage) {
        if !self.done {
            self.done = true;
            self.start_unnamed(out);
            self.sink.error(out, error, usage);
        }
    }

    /// Starts the answer, unless a chunk has, for a stream that ends before
    /// any chunk named it.
    fn start_unnamed(&mut self, out: &mut BytesMut) {
        if !self.started {
            self.started = true;
            self.sink.start(out, "", "");
        }
    }
}

/// Whether two tool-call deltas name different calls: both give an id,
/// and the ids differ.
fn named_apart(a: Option<&str>, b: Option<&str>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a != b)
}

/// An id for a tool call whose upstream gave it none.
fn new_call_id() -> String {
    format!("call_{}", crate::id::random())
}

/// An SSE event with its `event:` line, as both inbound APIs write them.
pub fn put_named_event(out: &mut BytesMut, name: &str, json: &[u8]) {
    out.reserve(name.len() + json.len() + 16);
    out.put_slice(b"event: ");
    out.put_slice(name.as_bytes());
    out.put_slice(b"\ndata: ");
    out.put_slice(json);
    out.put_slice(b"\n\n");
}

/// Canonical streams for the inbound APIs' tests, random ones among
/// them, and the named events a sink writes for them.
#[cfg(test)]
pub mod testing {
    use bytes::BytesMut;
    use serde_json::{Value, json};

    use super::{Sink, Translator};
    use crate::openai::Usage;

    /// The events `sink` writes for `chunks` and a stream that ended having
    /// used `usage`, each as its name and its data.
    pub fn translate(sink: impl Sink, chunks: &[Value], usage: Usage) -> Vec<(String, Value)> {
        let mut translator = Translator::new(sink);
        let mut out = BytesMut::new();
        for chunk in chunks {
            translator.chunk(&mut out, chunk.to_string().as_bytes());
        }
        translator.end(&mut out, usage);
        named_events(std::str::from_utf8(&out).unwrap())
    }

    /// Each `event: <name>` / `data: <json>` event of `sse`.
    pub fn named_events(sse: &str) -> Vec<(String, Value)> {
        sse.split_terminator("\n\n")
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap().to_owned();
                let data = data.strip_prefix("data: ").unwrap();
                (name, serde_json::from_str(data).unwrap())
            })
            .collect()
    }

    /// A canonical chunk with one choice.
    pub fn chunk(delta: Value, finish: Option<&str>) -> Value {
        json!({"id": "chatcmpl-1", "model": "m", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }

    /// Random text of `count` words that need escaping in JSON, or not.
    fn words(rng: &mut fastrand::Rng, count: std::ops::Range<usize>) -> String {
        const WORDS: &[&str] = &[
            "I",
            " think",
            " \"quoted\"",
            "\n",
            " é",
            " {\"a\":",
            "1}",
            " 😀",
        ];
        (0..rng.usize(count))
            .map(|_| WORDS[rng.usize(..WORDS.len())])
            .collect()
    }

    /// `text` cut into one to four pieces at character boundaries.
    fn pieces(rng: &mut fastrand::Rng, text: &str) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        let mut cuts: Vec<usize> = (0..rng.usize(0..4))
            .map(|_| rng.usize(0..=chars.len()))
            .collect();
        cuts.extend([0, chars.len()]);
        cuts.sort_unstable();
        cuts.windows(2)
            .map(|w| chars[w[0]..w[1]].iter().collect())
            .collect()
    }

    /// What a canonical answer holds, as a client reassembles it.
    #[derive(Debug, Default, PartialEq)]
    pub struct Answer {
        pub thinking: String,
        pub text: String,
        /// Each tool call's id, name and arguments.
        pub tools: Vec<(String, String, String)>,
    }

    /// A random canonical stream: reasoning (under either of vLLM's
    /// names), then text, then tool calls, each cut into random deltas (a
    /// tool call's id and name in its first), one call after another or
    /// interleaved, after a role-only delta and with empty ones between;
    /// and the answer it holds.
    pub fn stream(rng: &mut fastrand::Rng) -> (Vec<Value>, Answer) {
        let mut answer = Answer {
            thinking: if rng.bool() {
                words(rng, 1..6)
            } else {
                String::new()
            },
            text: if rng.u8(..4) > 0 {
                words(rng, 1..8)
            } else {
                String::new()
            },
            tools: Vec::new(),
        };
        for n in 0..rng.usize(0..3) {
            let arguments = words(rng, 0..5);
            answer
                .tools
                .push((format!("call_{n}"), format!("tool_{n}"), arguments));
        }
        let mut chunks = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
        let reasoning = ["reasoning_content", "reasoning"][rng.usize(..2)];
        for piece in pieces(rng, &answer.thinking) {
            chunks.push(chunk(json!({ reasoning: piece }), None));
        }
        for piece in pieces(rng, &answer.text) {
            chunks.push(chunk(json!({"content": piece}), None));
            if rng.u8(..5) == 0 {
                chunks.push(chunk(json!({}), None));
            }
        }
        // Each call's deltas, in order; its id and name in its first.
        let mut calls: Vec<std::collections::VecDeque<Value>> = Vec::new();
        for (index, (id, name, arguments)) in answer.tools.iter().enumerate() {
            let deltas = pieces(rng, arguments)
                .into_iter()
                .enumerate()
                .map(|(n, piece)| {
                    let mut call = json!({"index": index, "function": {"arguments": piece}});
                    if n == 0 {
                        call["id"] = json!(id);
                        call["type"] = json!("function");
                        call["function"]["name"] = json!(name);
                    }
                    call
                });
            calls.push(deltas.collect());
        }
        // One call after another, or, as some servers send parallel calls,
        // interleaved: each call begins after the one before it has, and
        // a chunk may carry deltas of several.
        let interleaved = rng.bool();
        let mut begun = 0;
        loop {
            let live: Vec<usize> = (0..calls.len())
                .filter(|&i| !calls[i].is_empty() && i <= begun)
                .collect();
            if live.is_empty() {
                break;
            }
            let mut deltas = Vec::new();
            for _ in 0..if interleaved { rng.usize(1..3) } else { 1 } {
                let i = if interleaved {
                    live[rng.usize(..live.len())]
                } else {
                    live[0]
                };
                if let Some(delta) = calls[i].pop_front() {
                    begun = begun.max(i + 1);
                    deltas.push(delta);
                }
            }
            chunks.push(chunk(json!({"tool_calls": deltas}), None));
        }
        let finish = if answer.tools.is_empty() {
            "stop"
        } else {
            "tool_calls"
        };
        chunks.push(chunk(json!({}), Some(finish)));
        chunks.push(json!({"id": "chatcmpl-1", "model": "m", "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}));
        (chunks, answer)
    }
}
