//! The canonical chat answer as a Messages `message`, whole or as the
//! Messages event stream: `message_start`, then per content block
//! `content_block_start`, its deltas and `content_block_stop` (a `ping`
//! after the first block starts), then `message_delta` with the stop
//! reason and usage, and `message_stop`.

use bytes::{Bytes, BytesMut};
use jiter::PartialMode;
use serde::Serialize;
use serde_json::{Value, json};

use super::super::canonical::{Completion, Finish, Sink, put_named_event};
use crate::error::{ErrorShape, GatewayError};
use crate::openai::Usage;

/// Anthropic's `stop_reason` and `stop_sequence` for how the canonical
/// answer finished.
fn stop(finish: &Finish, stops: &[String]) -> (&'static str, Option<String>) {
    match finish.reason.as_deref() {
        Some("length") => ("max_tokens", None),
        Some("tool_calls") => ("tool_use", None),
        Some("content_filter") => ("refusal", None),
        _ => match finish.stop_string.as_ref().filter(|s| stops.contains(s)) {
            Some(sequence) => ("stop_sequence", Some(sequence.clone())),
            None => ("end_turn", None),
        },
    }
}

/// Anthropic's usage: input excludes what was read from or written to the
/// cache, which are reported apart when the upstream reported them.
#[derive(Debug, Serialize)]
struct MessageUsage {
    input_tokens: u64,
    output_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_read_input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_creation_input_tokens: Option<u64>,
}

impl From<Usage> for MessageUsage {
    fn from(usage: Usage) -> Self {
        let reported = usage.prompt_tokens_details.is_some();
        let (read, written) = (usage.cached_tokens(), usage.cache_write_tokens());
        Self {
            input_tokens: usage.prompt_tokens - read - written,
            output_tokens: usage.completion_tokens,
            cache_read_input_tokens: reported.then_some(read),
            cache_creation_input_tokens: reported.then_some(written),
        }
    }
}

/// A Messages id from the canonical one.
fn message_id(id: &str) -> String {
    let id = id.strip_prefix("chatcmpl-").unwrap_or(id);
    if id.is_empty() {
        format!("msg_{}", crate::id::random())
    } else {
        format!("msg_{id}")
    }
}

/// A whole `chat.completion` as a Messages `message`.
pub fn message(body: &[u8], backend: &str, stops: &[String]) -> Result<Bytes, GatewayError> {
    let completion = Completion::read(body, backend)?;
    let choice = completion.choices.first();
    let mut content = Vec::new();
    if let Some(answer) = choice.and_then(|c| c.message.as_ref()) {
        if let Some(thinking) = answer.reasoning() {
            // No upstream signs its reasoning; the signature is empty.
            content.push(json!({"type": "thinking", "thinking": thinking, "signature": ""}));
        }
        if let Some(text) = answer.content.as_deref().filter(|t| !t.is_empty()) {
            content.push(json!({"type": "text", "text": text}));
        }
        for call in answer.tool_calls.iter().flatten() {
            content.push(json!({"type": "tool_use", "id": call.id,
                "name": call.function.name, "input": tool_input(&call.function.arguments)}));
        }
    }
    let (stop_reason, stop_sequence) = stop(&Finish::of(choice), stops);
    let message = json!({
        "id": message_id(completion.id.as_deref().unwrap_or_default()),
        "type": "message",
        "role": "assistant",
        "model": completion.model.as_deref().unwrap_or_default(),
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": MessageUsage::from(completion.usage()),
    });
    Ok(serde_json::to_vec(&message)
        .expect("JSON values serialise")
        .into())
}

/// A tool call's arguments as `input`: an object, or `{}` for none. A
/// call cut short (at `max_tokens`) is read as far as it goes, as the
/// Anthropic SDKs read a streamed one (`{"city": "Par` is `{}`); text
/// that is no JSON object at all is kept as a string rather than lost.
fn tool_input(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return json!({});
    }
    if let Ok(input) = serde_json::from_str(arguments) {
        return input;
    }
    match jiter::JsonValue::parse_with_config(arguments.as_bytes(), false, PartialMode::On) {
        Ok(partial @ jiter::JsonValue::Object(_)) => value_of(&partial),
        _ => Value::String(arguments.to_owned()),
    }
}

/// A value jiter read, as serde_json's.
fn value_of(value: &jiter::JsonValue<'_>) -> Value {
    use jiter::JsonValue as J;
    match value {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Int(i) => Value::from(*i),
        J::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        J::Str(s) => Value::String(s.to_string()),
        J::Array(items) => items.iter().map(value_of).collect(),
        J::Object(members) => members
            .iter()
            .map(|(name, value)| (name.to_string(), value_of(value)))
            .collect(),
    }
}

/// Writes the Messages event stream.
pub struct MessagesSink {
    stops: Vec<String>,
    /// The prompt's estimate, for `message_start` (the upstream's count
    /// comes with `message_delta`).
    input_estimate: u64,
    pinged: bool,
}

impl MessagesSink {
    pub fn new(stops: Vec<String>, input_estimate: u64) -> Self {
        Self {
            stops,
            input_estimate,
            pinged: false,
        }
    }
}

fn event(out: &mut BytesMut, name: &str, value: &Value) {
    put_named_event(
        out,
        name,
        &serde_json::to_vec(value).expect("JSON values serialise"),
    );
}

impl Sink for MessagesSink {
    fn start(&mut self, out: &mut BytesMut, id: &str, model: &str) {
        event(
            out,
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": message_id(id), "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.input_estimate, "output_tokens": 0}}}),
        );
    }

    fn open_reasoning(&mut self, out: &mut BytesMut, index: usize) {
        let block = json!({"type": "thinking", "thinking": "", "signature": ""});
        self.open(out, index, block);
    }

    fn reasoning(&mut self, out: &mut BytesMut, index: usize, text: &str) {
        event(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "thinking_delta", "thinking": text}}),
        );
    }

    fn open_text(&mut self, out: &mut BytesMut, index: usize) {
        self.open(out, index, json!({"type": "text", "text": ""}));
    }

    fn text(&mut self, out: &mut BytesMut, index: usize, text: &str) {
        event(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "text_delta", "text": text}}),
        );
    }

    fn open_tool(&mut self, out: &mut BytesMut, index: usize, id: &str, name: &str) {
        self.open(
            out,
            index,
            json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
        );
    }

    fn arguments(&mut self, out: &mut BytesMut, index: usize, arguments: &str) {
        event(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": arguments}}),
        );
    }

    fn close(&mut self, out: &mut BytesMut, index: usize, _last: Option<&Finish>) {
        event(
            out,
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        );
    }

    fn finish(&mut self, out: &mut BytesMut, finish: &Finish, usage: Usage) {
        let (stop_reason, stop_sequence) = stop(finish, &self.stops);
        event(
            out,
            "message_delta",
            &json!({"type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": MessageUsage::from(usage)}),
        );
        event(out, "message_stop", &json!({"type": "message_stop"}));
    }

    fn error(&mut self, out: &mut BytesMut, error: &GatewayError, _usage: Usage) {
        put_named_event(out, "error", &error.body_json_in(ErrorShape::Anthropic));
    }
}

impl MessagesSink {
    fn open(&mut self, out: &mut BytesMut, index: usize, block: Value) {
        event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        if !self.pinged {
            self.pinged = true;
            event(out, "ping", &json!({"type": "ping"}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::canonical::testing::{self, Answer, chunk, named_events};
    use super::*;

    #[test]
    fn a_tool_calls_input_is_an_object_whole_cut_short_or_empty() {
        let cases = [
            (
                r#"{"city": "Paris", "days": [1, 2]}"#,
                json!({"city": "Paris", "days": [1, 2]}),
            ),
            ("", json!({})),
            // Cut at max_tokens: as far as it goes, as the SDKs read a
            // streamed call.
            (r#"{"city":"#, json!({})),
            (
                r#"{"city": "Paris", "days": [1, 2"#,
                json!({"city": "Paris", "days": [1, 2]}),
            ),
            (
                r#"{"at": {"lat": 1.5, "lon": "#,
                json!({"at": {"lat": 1.5}}),
            ),
            // No JSON object at all: kept, not lost.
            ("Paris", json!("Paris")),
            (r#"["Paris"]"#, json!(["Paris"])),
        ];
        for (arguments, input) in cases {
            assert_eq!(tool_input(arguments), input, "{arguments}");
        }
    }

    /// The events for canonical `chunks`, asked with `stops`.
    fn run(chunks: &[Value], stops: &[&str], usage: Usage) -> Vec<(String, Value)> {
        let stops = stops.iter().map(|s| s.to_string()).collect();
        testing::translate(MessagesSink::new(stops, 7), chunks, usage)
    }

    #[test]
    fn text_then_a_tool_call_is_two_blocks_in_anthropics_order() {
        let chunks = [
            chunk(json!({"role": "assistant", "content": ""}), None),
            chunk(json!({"content": "I'll check."}), None),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
                None,
            ),
            chunk(json!({}), Some("tool_calls")),
        ];
        let ours = run(&chunks, &[], Usage::new(20, 9));
        let reference = named_events(include_str!(
            "../../../tests/fixtures/anthropic/tool_use_response.sse"
        ));
        let collapse = |events: &[(String, Value)]| {
            let mut names: Vec<String> = events.iter().map(|(n, _)| n.clone()).collect();
            names.dedup();
            names
        };
        assert_eq!(collapse(&ours), collapse(&reference));
        assert_eq!(ours[0].1["message"]["id"], "msg_1");
        assert_eq!(ours[0].1["message"]["usage"]["input_tokens"], 7);
        assert_eq!(ours[4].1, json!({"type": "content_block_stop", "index": 0}));
        assert_eq!(ours[5].1["content_block"]["id"], "call_1");
        assert_eq!(ours[5].1["index"], 1);
        let last = &ours[ours.len() - 2].1;
        assert_eq!(last["delta"]["stop_reason"], "tool_use");
        assert_eq!(
            last["usage"],
            json!({"input_tokens": 20, "output_tokens": 9})
        );
    }

    #[test]
    fn parallel_calls_are_whole_blocks_however_an_upstream_numbers_or_interleaves_them() {
        // A chunk of tool-call deltas, each (index, id, name, arguments).
        let deltas = |calls: &[(u32, Option<&str>, Option<&str>, &str)]| {
            let calls: Vec<Value> = calls
                .iter()
                .map(|&(index, id, name, arguments)| {
                    let mut call = json!({"index": index, "function": {"arguments": arguments}});
                    if let Some(id) = id {
                        call["id"] = json!(id);
                    }
                    if let Some(name) = name {
                        call["function"]["name"] = json!(name);
                    }
                    call
                })
                .collect();
            chunk(json!({ "tool_calls": calls }), None)
        };
        let tools = |mut chunks: Vec<Value>| {
            chunks.push(chunk(json!({}), Some("tool_calls")));
            let answer = reassemble(&run(&chunks, &[], Usage::new(5, 3)));
            let tools: Vec<String> = answer
                .tools
                .iter()
                .map(|(id, name, arguments)| format!("{id} {name} {arguments}"))
                .collect();
            tools
        };
        // Both calls begun in one chunk, their arguments in later ones.
        let interleaved = vec![
            deltas(&[(0, Some("a"), Some("f"), ""), (1, Some("b"), Some("g"), "")]),
            deltas(&[(0, None, None, "{\"x\":")]),
            deltas(&[(1, None, None, "{\"y\":2}")]),
            deltas(&[(0, None, None, "1}")]),
        ];
        assert_eq!(tools(interleaved), ["a f {\"x\":1}", "b g {\"y\":2}"]);
        // Ollama numbers every call of a parallel batch 0; the id tells
        // them apart, there and among the calls held.
        let same_index = vec![
            deltas(&[(0, Some("a"), Some("f"), "{}")]),
            deltas(&[(0, Some("b"), Some("g"), "[2]")]),
        ];
        assert_eq!(tools(same_index), ["a f {}", "b g [2]"]);
        let held_twice = vec![
            deltas(&[(0, Some("a"), Some("f"), "")]),
            deltas(&[(1, Some("b"), Some("g"), "[1]")]),
            deltas(&[(1, Some("c"), Some("h"), "[2]")]),
            deltas(&[(0, Some("a"), None, "{}")]),
        ];
        assert_eq!(tools(held_twice), ["a f {}", "b g [1]", "c h [2]"]);
    }

    #[test]
    fn stop_reasons_follow_how_the_answer_ended() {
        let text = chunk(json!({"content": "hi"}), None);
        let stop_reason = |finish: Value, stops: &[&str]| {
            let ours = run(&[text.clone(), finish], stops, Usage::default());
            ours[ours.len() - 2].1["delta"].clone()
        };
        let vllm_stop = json!({"id": "c", "choices": [{"index": 0, "delta": {},
            "finish_reason": "stop", "stop_reason": "END"}]});
        assert_eq!(
            stop_reason(vllm_stop, &["END"]),
            json!({"stop_reason": "stop_sequence", "stop_sequence": "END"})
        );
        let length = chunk(json!({}), Some("length"));
        assert_eq!(stop_reason(length, &[])["stop_reason"], "max_tokens");
        let stop = chunk(json!({}), Some("stop"));
        assert_eq!(stop_reason(stop, &["END"])["stop_reason"], "end_turn");
    }

    #[test]
    fn cached_prompt_tokens_are_reported_apart() {
        let usage = |details: Value| {
            let body = json!({"id": "chatcmpl-9", "model": "m", "choices": [{"index": 0,
                "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 2, "total_tokens": 102,
                    "prompt_tokens_details": details}});
            let message: Value =
                serde_json::from_slice(&message(body.to_string().as_bytes(), "b", &[]).unwrap())
                    .unwrap();
            assert_eq!(message["id"], "msg_9");
            message["usage"].clone()
        };
        assert_eq!(
            usage(json!({"cached_tokens": 60})),
            json!({"input_tokens": 40, "output_tokens": 2, "cache_read_input_tokens": 60,
                "cache_creation_input_tokens": 0})
        );
        // Bedrock's cache writes, as its translation reports them.
        assert_eq!(
            usage(json!({"cached_tokens": 60, "cache_write_tokens": 30})),
            json!({"input_tokens": 10, "output_tokens": 2, "cache_read_input_tokens": 60,
                "cache_creation_input_tokens": 30})
        );
        assert_eq!(
            usage(Value::Null),
            json!({"input_tokens": 100, "output_tokens": 2})
        );
    }

    /// The answer a Messages client reads from `events`, checking that
    /// they follow the Messages stream's order.
    fn reassemble(events: &[(String, Value)]) -> Answer {
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.first(), Some(&"message_start"), "{names:?}");
        assert_eq!(
            names[names.len() - 2..],
            ["message_delta", "message_stop"],
            "{names:?}"
        );
        let mut answer = Answer::default();
        let mut open: Option<(u64, String)> = None;
        let mut blocks = 0;
        for (name, event) in &events[1..events.len() - 2] {
            match name.as_str() {
                "ping" => {}
                "content_block_start" => {
                    assert!(open.is_none(), "a block opened inside another: {events:?}");
                    assert_eq!(event["index"], blocks, "{events:?}");
                    let block = &event["content_block"];
                    let kind = block["type"].as_str().unwrap().to_owned();
                    if kind == "tool_use" {
                        let (id, name) = (&block["id"], &block["name"]);
                        answer.tools.push((
                            id.as_str().unwrap().into(),
                            name.as_str().unwrap().into(),
                            String::new(),
                        ));
                    }
                    open = Some((blocks, kind));
                    blocks += 1;
                }
                "content_block_delta" => {
                    let (index, kind) = open.as_ref().expect("a delta in an open block");
                    assert_eq!(event["index"], *index);
                    let delta = &event["delta"];
                    match (kind.as_str(), delta["type"].as_str().unwrap()) {
                        ("thinking", "thinking_delta") => {
                            answer.thinking += delta["thinking"].as_str().unwrap();
                        }
                        ("text", "text_delta") => answer.text += delta["text"].as_str().unwrap(),
                        ("tool_use", "input_json_delta") => {
                            answer.tools.last_mut().unwrap().2 +=
                                delta["partial_json"].as_str().unwrap();
                        }
                        other => panic!("a {other:?} delta: {events:?}"),
                    }
                }
                "content_block_stop" => {
                    let (index, _) = open.take().expect("a stop of an open block");
                    assert_eq!(event["index"], index);
                }
                other => panic!("{other} inside the message: {events:?}"),
            }
        }
        assert!(open.is_none(), "a block left open: {events:?}");
        answer
    }

    #[test]
    fn random_streams_reassemble_to_the_answer_they_carry() {
        let mut rng = fastrand::Rng::with_seed(17);
        for _ in 0..500 {
            let (chunks, expected) = testing::stream(&mut rng);
            let events = run(&chunks, &[], Usage::new(5, 3));
            assert_eq!(reassemble(&events), expected, "{chunks:?}");
            let stop = &events[events.len() - 2].1["delta"]["stop_reason"];
            let tools = !expected.tools.is_empty();
            assert_eq!(stop, if tools { "tool_use" } else { "end_turn" });
        }
    }
}
