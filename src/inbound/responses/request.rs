//! A Responses request (`POST /v1/responses`) as the canonical OpenAI chat
//! request. The gateway keeps no state, so a request must carry its whole
//! conversation: what needs a stored response or OpenAI's own servers
//! (`previous_response_id`, `store: true`, `conversation`, `background`,
//! item references, file ids, built-in tools) is a 400 that says so, and
//! so is an image or file where chat holds only text (a function call's
//! output, a system turn): never dropped unseen.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{GatewayError, echo};
use crate::openai::{PartExample, TextOrParts, read_json};

#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    pub model: String,
    pub input: Input,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub safety_identifier: Option<String>,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub text: Option<TextConfig>,
    #[serde(default)]
    pub reasoning: Option<Reasoning>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// `input`: a user message's text, or the conversation's items. Read by the
/// value's type, so that a wrong item is named by its path.
pub type Input = TextOrParts<Item>;

impl PartExample for Item {
    const PARTS: &'static str = "input items";
    const EXAMPLE: &'static str = r#"{"role":"user","content":"..."}"#;
}

/// One input item. A message may come without `type`; the other kinds
/// are told apart by it.
#[derive(Debug, Deserialize)]
pub struct Item {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub arguments: Option<String>,
    #[serde(default)]
    pub output: Option<Content>,
}

/// An input item's content.
pub type Content = TextOrParts<Part>;

impl PartExample for Part {
    const EXAMPLE: &'static str = r#"{"type":"input_text","text":"..."}"#;
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    InputText {
        text: String,
    },
    OutputText {
        text: String,
    },
    Refusal {
        refusal: String,
    },
    InputImage {
        #[serde(default)]
        image_url: Option<String>,
        #[serde(default)]
        detail: Option<String>,
    },
    /// Read only to be refused by name: the translation carries no files.
    InputFile {},
    /// A `reasoning` item's content, as the gateway's own answers give it:
    /// a client that sends its output back sends this too.
    ReasoningText {},
}

#[derive(Debug, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct TextConfig {
    #[serde(default)]
    pub format: Option<Value>,
}

/// `reasoning`: its effort goes upstream as chat's `reasoning_effort`.
/// A summary cannot be asked of a chat upstream; the reasoning comes back
/// whole, as the `reasoning` item's `reasoning_text` content.
#[derive(Debug, Deserialize)]
pub struct Reasoning {
    #[serde(default)]
    pub effort: Option<String>,
    #[serde(default)]
    pub summary: Option<String>,
}

/// Members that ask for nothing the gateway would have to do.
const IGNORED: &[&str] = &["service_tier", "prompt_cache_key", "truncation", "include"];

/// Members that need state a stateless gateway does not keep.
const STATEFUL: &[&str] = &["conversation", "background", "prompt"];

/// The canonical chat body of a Responses request, and the members the
/// response object repeats.
pub fn to_chat(body: &[u8]) -> Result<(Vec<u8>, Map<String, Value>), GatewayError> {
    let request: ResponsesRequest = read_json(body)?;
    refuse_state(&request)?;
    let mut messages = Vec::new();
    if let Some(instructions) = &request.instructions {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    match &request.input {
        Input::Parts(items) if items.is_empty() => {
            return Err(GatewayError::bad_request(
                "`input` is empty; send at least one message",
                Some("input".into()),
            ));
        }
        Input::Text(text) => messages.push(json!({"role": "user", "content": text})),
        Input::Parts(items) => {
            for (i, item) in items.iter().enumerate() {
                push_item(&mut messages, item, i)?;
            }
        }
    }
    let mut chat = Map::new();
    chat.insert("model".into(), request.model.clone().into());
    chat.insert("messages".into(), messages.into());
    if let Some(max) = request.max_output_tokens {
        chat.insert("max_tokens".into(), max.into());
    }
    if let Some(tools) = &request.tools {
        chat.insert("tools".into(), chat_tools(tools)?);
    }
    if let Some(choice) = &request.tool_choice {
        chat.insert("tool_choice".into(), chat_tool_choice(choice)?);
    }
    for (name, value) in [
        ("temperature", request.temperature),
        ("top_p", request.top_p),
    ] {
        if let Some(value) = value {
            chat.insert(name.into(), value.into());
        }
    }
    if let Some(parallel) = request.parallel_tool_calls {
        chat.insert("parallel_tool_calls".into(), parallel.into());
    }
    for (name, value) in [
        ("user", &request.user),
        ("safety_identifier", &request.safety_identifier),
    ] {
        if let Some(value) = value {
            chat.insert(name.into(), value.clone().into());
        }
    }
    if let Some(format) = request.text.as_ref().and_then(|t| t.format.as_ref())
        && let Some(format) = response_format(format)?
    {
        chat.insert("response_format".into(), format);
    }
    if let Some(effort) = request.reasoning.as_ref().and_then(|r| r.effort.as_ref()) {
        chat.insert("reasoning_effort".into(), effort.clone().into());
    }
    if request.stream == Some(true) {
        chat.insert("stream".into(), true.into());
        // The answer's usage is part of `response.completed`.
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let bytes = serde_json::to_vec(&chat).expect("JSON values serialise");
    Ok((bytes, echoed(request)))
}

fn refuse_state(request: &ResponsesRequest) -> Result<(), GatewayError> {
    let stateless = |what: &str, param: &str| {
        Err(GatewayError::bad_request(
            format!(
                "{what}: this gateway's Responses API keeps no state; send the whole conversation in `input` instead"
            ),
            Some(param.to_owned()),
        ))
    };
    if request.previous_response_id.is_some() {
        return stateless(
            "`previous_response_id` continues a stored response",
            "previous_response_id",
        );
    }
    if request.store == Some(true) {
        return stateless(
            "`store: true` keeps the response to retrieve later; set `store: false`",
            "store",
        );
    }
    for (name, value) in &request.other {
        if value.is_null() || IGNORED.contains(&name.as_str()) {
            continue;
        }
        if STATEFUL.contains(&name.as_str()) {
            return stateless(&format!("`{name}` needs server-side state"), name);
        }
        return Err(GatewayError::bad_request(
            format!(
                "`{}` is not a Responses parameter this gateway serves; leave it out",
                echo(name)
            ),
            Some(name.clone()),
        ));
    }
    Ok(())
}

/// `text.format` as chat's `response_format`: `None` for plain text.
/// Responses puts a JSON schema's name, schema and strictness beside its
/// type; chat nests them under `json_schema`.
fn response_format(format: &Value) -> Result<Option<Value>, GatewayError> {
    let bad = |message: &str| {
        Err(GatewayError::bad_request(
            message,
            Some("text.format".into()),
        ))
    };
    match format["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let Some(fields) = format.as_object() else {
                return bad("`text.format` must be an object");
            };
            if !fields.get("schema").is_some_and(Value::is_object) {
                return bad("`text.format.schema` must be a JSON Schema object");
            }
            if !fields.get("name").is_some_and(Value::is_string) {
                return bad("`text.format.name` must be a string naming the format");
            }
            let schema: Map<String, Value> = fields
                .iter()
                .filter(|(k, _)| k.as_str() != "type")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => bad("`text.format.type` must be \"text\", \"json_schema\" or \"json_object\""),
    }
}

/// One input item onto the canonical messages.
fn push_item(out: &mut Vec<Value>, item: &Item, i: usize) -> Result<(), GatewayError> {
    let at = |field: &str| Some(format!("input[{i}]{field}"));
    let missing = |field: &str| {
        GatewayError::bad_request(
            format!("input item {i} has no `{field}`"),
            at(&format!(".{field}")),
        )
    };
    match item.kind.as_deref().unwrap_or("message") {
        "message" => {
            let role = item.role.as_deref().ok_or_else(|| missing("role"))?;
            let content = item.content.as_ref().ok_or_else(|| missing("content"))?;
            let role = match role {
                "user" | "assistant" | "system" => role,
                // Not every upstream knows `developer`; it is a system turn.
                "developer" => "system",
                _ => {
                    return Err(GatewayError::bad_request(
                        format!("unknown role `{}`", echo(role)),
                        at(".role"),
                    ));
                }
            };
            out.push(json!({"role": role, "content": chat_content(content, role, i)?}));
        }
        "function_call" => {
            let call = json!({
                "id": item.call_id.as_deref().ok_or_else(|| missing("call_id"))?,
                "type": "function",
                "function": {
                    "name": item.name.as_deref().ok_or_else(|| missing("name"))?,
                    "arguments": item.arguments.as_deref().unwrap_or("{}"),
                },
            });
            // Calls made together are one assistant turn.
            match out.last_mut() {
                Some(last) if last["role"] == "assistant" => {
                    if !last["tool_calls"].is_array() {
                        last["tool_calls"] = json!([]);
                    }
                    last["tool_calls"]
                        .as_array_mut()
                        .expect("just made an array")
                        .push(call);
                }
                _ => out.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        "function_call_output" => {
            let call_id = item.call_id.as_deref().ok_or_else(|| missing("call_id"))?;
            let output = match item.output.as_ref().ok_or_else(|| missing("output"))? {
                Content::Text(text) => text.clone(),
                Content::Parts(parts) => {
                    text_of(parts, "tool", |j| format!("input[{i}].output[{j}]"))?
                }
            };
            out.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
        }
        // A model's reasoning from an earlier answer; the canonical request
        // has no place for it.
        "reasoning" => {}
        "item_reference" => {
            return Err(GatewayError::bad_request(
                "an `item_reference` names a stored item: this gateway's Responses API keeps no state; send the item itself",
                at(""),
            ));
        }
        other => {
            return Err(GatewayError::bad_request(
                format!(
                    "input items of type `{}` are not served by this gateway; it serves `message`, `function_call` and `function_call_output`",
                    echo(other)
                ),
                at(".type"),
            ));
        }
    }
    Ok(())
}

/// The text of `parts`, for a chat message of `role`, which holds only
/// text. An image or file in them would never reach the model, so it is a
/// 400 at `at(j)` saying where to send it instead.
fn text_of(
    parts: &[Part],
    role: &str,
    at: impl Fn(usize) -> String,
) -> Result<String, GatewayError> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        match part {
            Part::InputText { text: t } | Part::OutputText { text: t } => text.push_str(t),
            Part::Refusal { refusal } => text.push_str(refusal),
            // Reasoning is left out, as a `reasoning` item is.
            Part::ReasoningText {} => {}
            Part::InputImage { .. } => {
                let (place, after) = match role {
                    "tool" => (
                        "a `function_call_output`",
                        " after the function call outputs",
                    ),
                    _ => ("this message", ""),
                };
                return Err(GatewayError::bad_request(
                    format!(
                        "an `input_image` in {place} cannot reach the model: it becomes a chat \
                         `{role}` message, which holds only text; send the image in a `message` \
                         item with role `user`{after}"
                    ),
                    Some(at(j)),
                ));
            }
            Part::InputFile {} => return Err(file_refused(at(j))),
        }
    }
    Ok(text)
}

fn file_refused(at: String) -> GatewayError {
    GatewayError::bad_request(
        "an `input_file` cannot reach the model: this gateway's Responses API carries no \
         files; send the file's content as `input_text`",
        Some(at),
    )
}

/// A message's content as chat content: text, or parts with images.
fn chat_content(content: &Content, role: &str, i: usize) -> Result<Value, GatewayError> {
    let at = |j| format!("input[{i}].content[{j}]");
    let parts = match content {
        Content::Text(text) => return Ok(text.clone().into()),
        Content::Parts(parts) => parts,
    };
    if role != "user" {
        return text_of(parts, role, at).map(Value::from);
    }
    let mut out = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        out.push(match part {
            Part::InputText { text } | Part::OutputText { text } => {
                json!({"type": "text", "text": text})
            }
            Part::Refusal { refusal } => json!({"type": "text", "text": refusal}),
            Part::InputImage {
                image_url: Some(url),
                detail,
                ..
            } => {
                let mut image = json!({"url": url});
                if let Some(detail) = detail {
                    image["detail"] = detail.clone().into();
                }
                json!({"type": "image_url", "image_url": image})
            }
            Part::InputImage { .. } => {
                return Err(GatewayError::bad_request(
                    "an `input_image` needs an `image_url` (a URL or a data URL): this gateway keeps no files to name by `file_id`",
                    Some(at(j)),
                ));
            }
            Part::InputFile {} => return Err(file_refused(at(j))),
            Part::ReasoningText {} => {
                return Err(GatewayError::bad_request(
                    "a `reasoning_text` part is a model's reasoning: send it in a `reasoning` item, not a user message",
                    Some(at(j)),
                ));
            }
        });
    }
    Ok(out.into())
}

fn chat_tools(tools: &[Tool]) -> Result<Value, GatewayError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let name = tool.name.as_deref().filter(|_| tool.kind == "function");
        let Some(name) = name else {
            return Err(GatewayError::bad_request(
                format!(
                    "tool type `{}` is built into OpenAI's servers; this gateway serves `function` tools only",
                    echo(&tool.kind)
                ),
                Some(format!("tools[{i}]")),
            ));
        };
        let mut function = json!({"name": name});
        if let Some(description) = &tool.description {
            function["description"] = description.clone().into();
        }
        if let Some(parameters) = &tool.parameters {
            function["parameters"] = parameters.clone();
        }
        if let Some(strict) = tool.strict {
            function["strict"] = strict.into();
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(out.into())
}

fn chat_tool_choice(choice: &Value) -> Result<Value, GatewayError> {
    match choice {
        Value::String(mode) if matches!(mode.as_str(), "auto" | "none" | "required") => {
            Ok(choice.clone())
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            match o.get("name").and_then(Value::as_str) {
                Some(name) => Ok(json!({"type": "function", "function": {"name": name}})),
                None => Err(GatewayError::bad_request(
                    "`tool_choice` of type `function` needs a `name`",
                    Some("tool_choice".into()),
                )),
            }
        }
        _ => Err(GatewayError::bad_request(
            "`tool_choice` must be \"auto\", \"none\", \"required\" or {\"type\":\"function\",\"name\":...}",
            Some("tool_choice".into()),
        )),
    }
}

/// The request's members that the response object repeats.
fn echoed(request: ResponsesRequest) -> Map<String, Value> {
    let mut echo = Map::new();
    echo.insert("instructions".into(), request.instructions.into());
    echo.insert("max_output_tokens".into(), request.max_output_tokens.into());
    echo.insert(
        "metadata".into(),
        request.metadata.unwrap_or_default().into(),
    );
    echo.insert(
        "parallel_tool_calls".into(),
        request.parallel_tool_calls.unwrap_or(true).into(),
    );
    echo.insert("temperature".into(), request.temperature.into());
    echo.insert(
        "tool_choice".into(),
        request.tool_choice.unwrap_or_else(|| "auto".into()),
    );
    let tools: Vec<Value> = request
        .tools
        .unwrap_or_default()
        .into_iter()
        .map(|t| {
            json!({"type": "function", "name": t.name, "description": t.description,
                "parameters": t.parameters, "strict": t.strict})
        })
        .collect();
    echo.insert("tools".into(), tools.into());
    echo.insert("top_p".into(), request.top_p.into());
    if let Some(format) = request.text.and_then(|t| t.format) {
        echo.insert("text".into(), json!({"format": format}));
    }
    if let Some(reasoning) = request.reasoning {
        echo.insert(
            "reasoning".into(),
            json!({"effort": reasoning.effort, "summary": reasoning.summary}),
        );
    }
    echo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Value, GatewayError> {
        let (bytes, _) = to_chat(body.to_string().as_bytes())?;
        Ok(serde_json::from_slice(&bytes).unwrap())
    }

    #[test]
    fn reasoning_sent_back_is_left_out_and_a_wrong_part_is_named() {
        let reasoning = json!({"type": "reasoning", "id": "rs_1", "summary": [],
            "content": [{"type": "reasoning_text", "text": "Thinking"}], "status": "completed"});
        let out = chat(json!({"model": "m", "input": [
            {"role": "user", "content": "Hi"},
            reasoning,
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"},
                {"type": "reasoning_text", "text": "Thinking"}]},
            {"role": "user", "content": "More"}]}))
        .unwrap();
        assert_eq!(
            out["messages"],
            json!([{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "More"}])
        );

        let wrong = |input: Value| {
            let error = chat(json!({"model": "m", "input": input})).unwrap_err();
            (
                error.param_name().unwrap().to_owned(),
                error.message().to_owned(),
            )
        };
        let (param, message) = wrong(json!([{"role": "user", "content": "Hi"},
            {"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]));
        assert_eq!(param, "input[1].content[0]");
        assert!(
            message.contains("`input_file` cannot reach the model")
                && message.contains("input_text"),
            "{message}"
        );
        let (param, message) =
            wrong(json!([{"role": "user", "content": [{"type": "input_video"}]}]));
        assert_eq!(param, "input[0].content[0].type");
        assert!(
            message.contains("unknown variant `input_video`"),
            "{message}"
        );
        let (param, message) = wrong(json!(5));
        assert_eq!(param, "input");
        assert!(
            message.contains("a string, or an array of input items such as"),
            "{message}"
        );
        let (param, message) =
            wrong(json!([{"role": "user", "content": [{"type": "reasoning_text", "text": "x"}]}]));
        assert_eq!(param, "input[0].content[0]");
        assert!(message.contains("`reasoning` item"), "{message}");
    }

    #[test]
    fn a_function_call_round_trip_keeps_call_ids() {
        let out = chat(json!({"model": "m", "instructions": "Be brief.", "max_output_tokens": 50,
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{\"city\":\"Rome\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
                {"type": "function_call_output", "call_id": "call_2", "output": "25C"}],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"}}))
        .unwrap();
        let messages = out["messages"].as_array().unwrap();
        assert_eq!(
            messages[0],
            json!({"role": "system", "content": "Be brief."})
        );
        assert_eq!(
            messages[1]["content"][1]["image_url"],
            json!({"url": "data:image/png;base64,AAAA", "detail": "low"})
        );
        let calls = &messages[2]["tool_calls"];
        assert_eq!(calls[0]["id"], "call_1");
        assert_eq!(calls[1]["function"]["arguments"], "{\"city\":\"Rome\"}");
        assert_eq!(
            messages[3],
            json!({"role": "tool", "tool_call_id": "call_1", "content": "18C"})
        );
        assert_eq!(messages.len(), 5);
        assert_eq!(out["max_tokens"], 50);
        assert_eq!(
            out["tool_choice"],
            json!({"type": "function", "function": {"name": "get_weather"}})
        );
    }

    #[test]
    fn a_function_calls_output_is_its_text_and_an_image_or_file_in_it_is_a_400_naming_it() {
        let with_output = |output: Value| {
            json!({"model": "m", "input": [
                {"role": "user", "content": "Look at the chart"},
                {"type": "function_call", "call_id": "call_1", "name": "chart", "arguments": "{}"},
                {"type": "function_call", "call_id": "call_2", "name": "chart", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": output}]})
        };
        let text = json!([{"type": "input_text", "text": "Sales "},
            {"type": "input_text", "text": "rose."}]);
        let out = chat(with_output(text)).unwrap();
        assert_eq!(
            out["messages"][2],
            json!({"role": "tool", "tool_call_id": "call_1", "content": "Sales rose."})
        );
        for part in [
            json!({"type": "input_image", "image_url": "data:image/png;base64,AAAA"}),
            json!({"type": "input_file", "file_data": "JVBERi0=", "filename": "chart.pdf"}),
        ] {
            let output = json!([{"type": "input_text", "text": "The chart:"}, part]);
            let error = chat(with_output(output)).unwrap_err();
            assert_eq!(error.status(), 400);
            assert_eq!(error.param_name(), Some("input[3].output[1]"), "{part}");
            assert!(error.message().contains("cannot reach the model"), "{part}");
        }
        let image = json!([{"type": "input_image", "image_url": "https://x/chart.png"}]);
        let message = chat(with_output(image)).unwrap_err().message().to_owned();
        assert!(
            message.contains("chat `tool` message, which holds only text")
                && message.contains("role `user` after the function call outputs"),
            "{message}"
        );

        // Nor is an image in a system message left out unseen.
        let system = json!({"model": "m", "input": [{"role": "developer", "content": [
            {"type": "input_text", "text": "Match this style:"},
            {"type": "input_image", "image_url": "https://x/style.png"}]}]});
        let error = chat(system).unwrap_err();
        assert_eq!(error.param_name(), Some("input[0].content[1]"));
        assert!(
            error.message().contains("chat `system` message"),
            "{}",
            error.message()
        );
    }

    #[test]
    fn what_needs_state_is_a_400_that_says_so() {
        let base = || json!({"model": "m", "input": "hi"});
        for (field, value) in [
            ("previous_response_id", json!("resp_1")),
            ("store", json!(true)),
            ("conversation", json!("conv_1")),
            ("background", json!(true)),
        ] {
            let mut body = base();
            body[field] = value;
            let error = chat(body).unwrap_err();
            assert_eq!(error.param_name(), Some(field));
            assert!(
                error.message().contains("keeps no state"),
                "{}",
                error.message()
            );
        }
        let mut body = base();
        body["tools"] = json!([{"type": "web_search"}]);
        assert_eq!(chat(body).unwrap_err().param_name(), Some("tools[0]"));
        let mut body = base();
        body["input"] = json!([{"type": "item_reference", "id": "msg_1"}]);
        assert!(chat(body).unwrap_err().message().contains("keeps no state"));
        let mut body = base();
        body["store"] = json!(false);
        assert!(chat(body).is_ok());
    }
}
