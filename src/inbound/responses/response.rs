//! The canonical chat answer as a Responses `response`, whole or as the
//! Responses event stream: `response.created`, `response.in_progress`,
//! per output item `response.output_item.added`, its content part and
//! deltas, their `.done` events and `response.output_item.done`, then
//! `response.completed` (or `response.incomplete` at the output limit;
//! for a stream that failed, an `error` event and `response.failed`),
//! every event numbered by `sequence_number`. The `.done` events and the
//! last event repeat the whole output, as the protocol defines them: the
//! text and arguments streamed are kept for them.

use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value, json};

use super::super::canonical::{Completion, Finish, Sink, put_named_event};
use crate::error::GatewayError;
use crate::openai::{Usage, unix_now};

/// A Responses id from the canonical one.
fn response_id(id: &str) -> String {
    let id = id.strip_prefix("chatcmpl-").unwrap_or(id);
    if id.is_empty() {
        format!("resp_{}", crate::id::random())
    } else {
        format!("resp_{id}")
    }
}

fn item_id(prefix: &str) -> String {
    format!("{prefix}_{}", crate::id::random())
}

fn usage_object(usage: Usage) -> Value {
    json!({
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_tokens(),
            "cache_write_tokens": usage.cache_write_tokens(),
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    })
}

/// `status` and `incomplete_details` for how the canonical answer ended.
fn status(finish: &Finish) -> (&'static str, Value) {
    match finish.reason.as_deref() {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

/// The `response` object, with the members the request repeats.
struct Envelope<'a> {
    id: &'a str,
    created_at: u64,
    model: &'a str,
    echo: &'a Map<String, Value>,
}

impl Envelope<'_> {
    fn object(
        &self,
        status: &str,
        incomplete: Value,
        output: &[Value],
        usage: Option<Usage>,
    ) -> Value {
        let mut object = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": output,
            "previous_response_id": null,
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "usage": usage.map(usage_object),
        });
        let members = object.as_object_mut().expect("an object");
        members.extend(self.echo.iter().map(|(k, v)| (k.clone(), v.clone())));
        object
    }
}

fn message_item(id: &str, status: &str, text: Option<&str>) -> Value {
    let content: Vec<Value> = text
        .map(|text| json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []}))
        .into_iter()
        .collect();
    json!({"id": id, "type": "message", "status": status, "role": "assistant", "content": content})
}

fn reasoning_item(id: &str, status: &str, text: Option<&str>) -> Value {
    let content: Vec<Value> = text
        .map(|text| json!({"type": "reasoning_text", "text": text}))
        .into_iter()
        .collect();
    json!({"id": id, "type": "reasoning", "status": status, "summary": [], "content": content})
}

fn call_item(id: &str, status: &str, call_id: &str, name: &str, arguments: &str) -> Value {
    json!({"id": id, "type": "function_call", "status": status,
        "call_id": call_id, "name": name, "arguments": arguments})
}

/// A whole `chat.completion` as a `response`.
pub fn response(
    body: &[u8],
    backend: &str,
    echo: &Map<String, Value>,
) -> Result<Bytes, GatewayError> {
    let completion = Completion::read(body, backend)?;
    let choice = completion.choices.first();
    let mut output = Vec::new();
    if let Some(answer) = choice.and_then(|c| c.message.as_ref()) {
        if let Some(reasoning) = answer.reasoning() {
            output.push(reasoning_item(&item_id("rs"), "completed", Some(reasoning)));
        }
        if let Some(text) = answer.content.as_deref().filter(|t| !t.is_empty()) {
            output.push(message_item(&item_id("msg"), "completed", Some(text)));
        }
        for call in answer.tool_calls.iter().flatten() {
            let f = &call.function;
            output.push(call_item(
                &item_id("fc"),
                "completed",
                &call.id,
                &f.name,
                &f.arguments,
            ));
        }
    }
    let (status, incomplete) = status(&Finish::of(choice));
    if status == "incomplete"
        && let Some(last) = output.last_mut()
    {
        last["status"] = status.into();
    }
    let envelope = Envelope {
        id: &response_id(completion.id.as_deref().unwrap_or_default()),
        created_at: unix_now(),
        model: completion.model.as_deref().unwrap_or_default(),
        echo,
    };
    let object = envelope.object(status, incomplete, &output, Some(completion.usage()));
    Ok(serde_json::to_vec(&object)
        .expect("JSON values serialise")
        .into())
}

/// The output item being streamed.
enum Current {
    Reasoning {
        id: String,
        text: String,
    },
    Text {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

impl Current {
    /// The item as the response lists it, with `status`.
    fn item(&self, status: &str) -> Value {
        match self {
            Self::Reasoning { id, text } => reasoning_item(id, status, Some(text)),
            Self::Text { id, text } => message_item(id, status, Some(text)),
            Self::Call {
                id,
                call_id,
                name,
                arguments,
            } => call_item(id, status, call_id, name, arguments),
        }
    }
}

/// Writes the Responses event stream.
pub struct ResponsesSink {
    echo: Map<String, Value>,
    id: String,
    model: String,
    created_at: u64,
    sequence: u64,
    current: Option<Current>,
    /// The items done so far, for `response.completed`.
    output: Vec<Value>,
}

impl ResponsesSink {
    pub fn new(echo: Map<String, Value>) -> Self {
        Self {
            echo,
            id: String::new(),
            model: String::new(),
            created_at: unix_now(),
            sequence: 0,
            current: None,
            output: Vec::new(),
        }
    }

    fn envelope(&self) -> Envelope<'_> {
        Envelope {
            id: &self.id,
            created_at: self.created_at,
            model: &self.model,
            echo: &self.echo,
        }
    }

    /// Writes `event` (an object without its number) as the next event.
    fn event(&mut self, out: &mut BytesMut, name: &str, mut event: Value) {
        event["type"] = name.into();
        event["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        put_named_event(
            out,
            name,
            &serde_json::to_vec(&event).expect("JSON values serialise"),
        );
    }

    /// An output item and its one content part, both announced empty.
    fn open_item(&mut self, out: &mut BytesMut, index: usize, id: &str, item: Value, part: Value) {
        self.event(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        self.event(
            out,
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
        );
    }
}

impl Sink for ResponsesSink {
    fn start(&mut self, out: &mut BytesMut, id: &str, model: &str) {
        self.id = response_id(id);
        self.model = model.to_owned();
        let response = self
            .envelope()
            .object("in_progress", Value::Null, &[], None);
        self.event(out, "response.created", json!({"response": response}));
        self.event(out, "response.in_progress", json!({"response": response}));
    }

    fn open_reasoning(&mut self, out: &mut BytesMut, index: usize) {
        let id = item_id("rs");
        let item = reasoning_item(&id, "in_progress", None);
        let part = json!({"type": "reasoning_text", "text": ""});
        self.open_item(out, index, &id, item, part);
        self.current = Some(Current::Reasoning {
            id,
            text: String::new(),
        });
    }

    fn reasoning(&mut self, out: &mut BytesMut, index: usize, delta: &str) {
        let Some(Current::Reasoning { id, text }) = &mut self.current else {
            return;
        };
        text.push_str(delta);
        let event =
            json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta});
        self.event(out, "response.reasoning_text.delta", event);
    }

    fn open_text(&mut self, out: &mut BytesMut, index: usize) {
        let id = item_id("msg");
        let item = message_item(&id, "in_progress", None);
        let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
        self.open_item(out, index, &id, item, part);
        self.current = Some(Current::Text {
            id,
            text: String::new(),
        });
    }

    fn text(&mut self, out: &mut BytesMut, index: usize, delta: &str) {
        let Some(Current::Text { id, text }) = &mut self.current else {
            return;
        };
        text.push_str(delta);
        let event = json!({"item_id": id, "output_index": index, "content_index": 0,
            "delta": delta, "logprobs": []});
        self.event(out, "response.output_text.delta", event);
    }

    fn open_tool(&mut self, out: &mut BytesMut, index: usize, call_id: &str, name: &str) {
        let id = item_id("fc");
        let item = call_item(&id, "in_progress", call_id, name, "");
        self.event(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        self.current = Some(Current::Call {
            id,
            call_id: call_id.to_owned(),
            name: name.to_owned(),
            arguments: String::new(),
        });
    }

    fn arguments(&mut self, out: &mut BytesMut, index: usize, delta: &str) {
        let Some(Current::Call { id, arguments, .. }) = &mut self.current else {
            return;
        };
        arguments.push_str(delta);
        let event = json!({"item_id": id, "output_index": index, "delta": delta});
        self.event(out, "response.function_call_arguments.delta", event);
    }

    fn close(&mut self, out: &mut BytesMut, index: usize, last: Option<&Finish>) {
        // The item the answer was cut in is incomplete, as the answer is.
        let done = match last.map(|finish| status(finish).0) {
            Some("incomplete") => "incomplete",
            _ => "completed",
        };
        let Some(current) = self.current.take() else {
            return;
        };
        match &current {
            Current::Reasoning { id, text } => {
                self.event(
                    out,
                    "response.reasoning_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                );
                let part = json!({"type": "reasoning_text", "text": text});
                self.event(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
            }
            Current::Text { id, text } => {
                self.event(
                    out,
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0,
                        "text": text, "logprobs": []}),
                );
                let part =
                    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                self.event(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
            }
            Current::Call {
                id,
                name,
                arguments,
                ..
            } => {
                self.event(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "name": name, "arguments": arguments}),
                );
            }
        }
        let item = current.item(done);
        self.event(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        self.output.push(item);
    }

    fn finish(&mut self, out: &mut BytesMut, finish: &Finish, usage: Usage) {
        let (status, incomplete) = status(finish);
        let response = self
            .envelope()
            .object(status, incomplete, &self.output, Some(usage));
        let name = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.event(out, name, json!({"response": response}));
    }

    /// The `error` event, then `response.failed`, as OpenAI ends a
    /// response that fails: the response `failed`, with an `error` whose
    /// `code` is one the Responses API defines, the output so far (the
    /// item cut short `incomplete`) and the usage.
    fn error(&mut self, out: &mut BytesMut, error: &GatewayError, usage: Usage) {
        let event = json!({"code": error.code(), "message": error.message(),
            "param": error.param_name()});
        self.event(out, "error", event);
        let mut output = std::mem::take(&mut self.output);
        output.extend(self.current.take().map(|cut| cut.item("incomplete")));
        let mut response = self
            .envelope()
            .object("failed", Value::Null, &output, Some(usage));
        let code = match error.status() {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_exceeded",
            _ => "server_error",
        };
        response["error"] = json!({"code": code, "message": error.message()});
        self.event(out, "response.failed", json!({"response": response}));
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::canonical::testing::{self, Answer};
    use super::*;

    #[test]
    fn an_answer_cut_at_its_limit_is_incomplete_and_so_is_its_last_item() {
        let body = json!({"id": "chatcmpl-7", "model": "m", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "partial"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}});
        let echo = Map::new();
        let out: Value =
            serde_json::from_slice(&response(body.to_string().as_bytes(), "b", &echo).unwrap())
                .unwrap();
        assert_eq!(out["id"], "resp_7");
        assert_eq!(out["status"], "incomplete");
        assert_eq!(
            out["incomplete_details"],
            json!({"reason": "max_output_tokens"})
        );
        assert_eq!(out["output"][0]["status"], "incomplete");
        assert_eq!(out["usage"]["total_tokens"], 21);
    }

    /// The answer a Responses client reads from the stream's deltas,
    /// checking that the events are numbered in order, that each item
    /// opens, streams and closes in turn, and that each `.done` event and
    /// the last event repeat what was streamed.
    fn reassemble(events: &[(String, Value)]) -> Answer {
        for (n, (name, event)) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], n, "{events:?}");
            assert_eq!(event["type"], name.as_str());
        }
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names[..2],
            ["response.created", "response.in_progress"],
            "{names:?}"
        );
        assert_eq!(names.last(), Some(&"response.completed"), "{names:?}");
        let mut answer = Answer::default();
        let mut items = Vec::new();
        // The open item's index, id and what its deltas have said.
        let mut open: Option<(usize, String, String)> = None;
        for (name, event) in &events[2..events.len() - 1] {
            let delta = || event["delta"].as_str().unwrap();
            match name.as_str() {
                "response.output_item.added" => {
                    assert!(open.is_none(), "an item opened inside another: {names:?}");
                    assert_eq!(event["output_index"], items.len());
                    let item = &event["item"];
                    if item["type"] == "function_call" {
                        let (call, name) = (&item["call_id"], &item["name"]);
                        answer.tools.push((
                            call.as_str().unwrap().into(),
                            name.as_str().unwrap().into(),
                            String::new(),
                        ));
                    }
                    open = Some((
                        items.len(),
                        item["id"].as_str().unwrap().into(),
                        String::new(),
                    ));
                }
                "response.content_part.added" | "response.content_part.done" => {}
                "response.reasoning_text.delta"
                | "response.output_text.delta"
                | "response.function_call_arguments.delta" => {
                    let (index, id, said) = open.as_mut().expect("a delta in an open item");
                    assert_eq!(
                        (&event["output_index"], &event["item_id"]),
                        (&json!(index), &json!(id))
                    );
                    said.push_str(delta());
                    match name.as_str() {
                        "response.reasoning_text.delta" => answer.thinking += delta(),
                        "response.output_text.delta" => answer.text += delta(),
                        _ => answer.tools.last_mut().unwrap().2 += delta(),
                    }
                }
                "response.reasoning_text.done" | "response.output_text.done" => {
                    assert_eq!(event["text"], open.as_ref().unwrap().2.as_str());
                }
                "response.function_call_arguments.done" => {
                    assert_eq!(event["arguments"], open.as_ref().unwrap().2.as_str());
                }
                "response.output_item.done" => {
                    let (index, id, _) = open.take().expect("an open item done");
                    assert_eq!(
                        (&event["output_index"], &event["item"]["id"]),
                        (&json!(index), &json!(id))
                    );
                    assert_eq!(event["item"]["status"], "completed");
                    items.push(event["item"].clone());
                }
                other => panic!("{other} inside the response: {names:?}"),
            }
        }
        assert!(open.is_none(), "an item left open: {names:?}");
        let last = &events[events.len() - 1].1["response"];
        assert_eq!(last["output"], Value::Array(items), "{names:?}");
        answer
    }

    #[test]
    fn random_streams_reassemble_to_the_answer_they_carry() {
        let mut rng = fastrand::Rng::with_seed(19);
        for _ in 0..500 {
            let (chunks, expected) = testing::stream(&mut rng);
            let sink = ResponsesSink::new(Map::new());
            let events = testing::translate(sink, &chunks, Usage::new(5, 3));
            assert_eq!(reassemble(&events), expected, "{chunks:?}");
        }
    }
}
