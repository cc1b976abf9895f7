//! A Messages request (`POST /v1/messages`) as the canonical OpenAI chat
//! request. `system` becomes a system message; `tool_result` blocks
//! become `tool` messages ahead of the rest of their user turn, as
//! Anthropic requires them first; `tool_use` blocks become the assistant's
//! `tool_calls`, ids kept; images become `image_url` parts (base64 as a
//! data URL).

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::GatewayError;
use crate::openai::{TOOL_ERROR, read_json};

#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    pub model: String,
    pub max_tokens: u32,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub system: Option<System>,
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub metadata: Option<Metadata>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub thinking: Option<Thinking>,
    /// Members this gateway does not serve; refused by name unless they
    /// ask for nothing.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string, or an array of text blocks")]
pub enum System {
    Text(String),
    Blocks(Vec<TextBlock>),
}

#[derive(Debug, Deserialize)]
pub struct TextBlock {
    pub text: String,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: Content,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, or an array of content blocks such as {\"type\":\"text\",\"text\":\"...\"}"
)]
pub enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    Text {
        text: String,
    },
    Image {
        source: ImageSource,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default)]
        content: Option<ToolResultContent>,
        #[serde(default)]
        is_error: bool,
    },
    /// The model's reasoning in an earlier answer, sent back: the
    /// canonical request has no place for it, so it is left out.
    Thinking {},
    RedactedThinking {},
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageSource {
    Base64 { media_type: String, data: String },
    Url { url: String },
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string, or an array of text blocks")]
pub enum ToolResultContent {
    Text(String),
    Blocks(Vec<ToolResultBlock>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToolResultBlock {
    Text { text: String },
}

#[derive(Debug, Deserialize)]
pub struct Tool {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub input_schema: Option<Value>,
    /// Absent or `custom` for a client tool; Anthropic's server tools
    /// (`web_search_…`, `bash_…`) name a version here.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToolChoice {
    Auto {
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    Any {
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    Tool {
        name: String,
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    None,
}

/// Extended thinking: sized by a token budget in Messages, by an effort in
/// chat (`reasoning_effort`), which is what OpenAI-compatible upstreams
/// take.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Thinking {
    Enabled { budget_tokens: u32 },
    Disabled {},
}

/// Anthropic's least thinking budget.
const MIN_THINKING_BUDGET: u32 = 1024;

impl Thinking {
    /// The effort a budget asks for: the bands of the budgets other
    /// gateways send Anthropic for each effort (low 1024, medium 2048,
    /// high 4096 tokens). `None` when thinking is off, which is no
    /// upstream's default to change.
    fn effort(&self, max_tokens: u32) -> Result<Option<&'static str>, GatewayError> {
        let Self::Enabled { budget_tokens } = *self else {
            return Ok(None);
        };
        let bad = |message: String| {
            Err(GatewayError::bad_request(
                message,
                Some("thinking.budget_tokens".into()),
            ))
        };
        if budget_tokens < MIN_THINKING_BUDGET {
            return bad(format!(
                "`thinking.budget_tokens` must be at least {MIN_THINKING_BUDGET}"
            ));
        }
        if budget_tokens >= max_tokens {
            return bad(format!(
                "`max_tokens` ({max_tokens}) must be greater than `thinking.budget_tokens` ({budget_tokens})"
            ));
        }
        Ok(Some(match budget_tokens {
            ..2048 => "low",
            2048..4096 => "medium",
            _ => "high",
        }))
    }
}

#[derive(Debug, Deserialize)]
pub struct Metadata {
    #[serde(default)]
    pub user_id: Option<String>,
}

/// Members that ask for nothing this gateway would have to do.
const IGNORED: &[&str] = &["service_tier"];

/// The canonical chat body of a Messages request, and its stop sequences
/// (to say which one ended the answer).
pub fn to_chat(body: &[u8]) -> Result<(Vec<u8>, Vec<String>), GatewayError> {
    let request: MessagesRequest = read_json(body)?;
    if let Some(name) = request
        .other
        .keys()
        .find(|k| !IGNORED.contains(&k.as_str()))
    {
        return Err(GatewayError::bad_request(
            format!(
                "`{}` is not a Messages parameter this gateway serves; leave it out",
                crate::error::echo(name)
            ),
            Some(name.clone()),
        ));
    }
    if request.messages.is_empty() {
        return Err(GatewayError::bad_request(
            "`messages` is empty; send at least one message",
            Some("messages".into()),
        ));
    }
    // Required here, unlike chat's, whose check would say it may be left out.
    if request.max_tokens == 0 {
        return Err(GatewayError::bad_request(
            "`max_tokens` must be at least 1",
            Some("max_tokens".into()),
        ));
    }
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    if let Some(system) = &request.system {
        let text = match system {
            System::Text(text) => text.clone(),
            System::Blocks(blocks) => blocks
                .iter()
                .map(|b| b.text.as_str())
                .collect::<Vec<_>>()
                .join("\n\n"),
        };
        messages.push(json!({"role": "system", "content": text}));
    }
    for (i, message) in request.messages.iter().enumerate() {
        match message.role {
            Role::User => user_turn(&mut messages, &message.content, i)?,
            Role::Assistant => messages.push(assistant_turn(&message.content, i)?),
        }
    }
    let mut chat = Map::new();
    chat.insert("model".into(), request.model.into());
    chat.insert("messages".into(), messages.into());
    chat.insert("max_tokens".into(), request.max_tokens.into());
    if let Some(tools) = &request.tools {
        chat.insert("tools".into(), chat_tools(tools)?);
    }
    if let Some(choice) = &request.tool_choice {
        let (choice, parallel) = chat_tool_choice(choice);
        chat.insert("tool_choice".into(), choice);
        if parallel == Some(true) {
            chat.insert("parallel_tool_calls".into(), false.into());
        }
    }
    let stops = request.stop_sequences.unwrap_or_default();
    if !stops.is_empty() {
        chat.insert("stop".into(), stops.clone().into());
    }
    for (name, value) in [
        ("temperature", request.temperature),
        ("top_p", request.top_p),
    ] {
        if let Some(value) = value {
            chat.insert(name.into(), value.into());
        }
    }
    if let Some(top_k) = request.top_k {
        chat.insert("top_k".into(), top_k.into());
    }
    if let Some(thinking) = &request.thinking
        && let Some(effort) = thinking.effort(request.max_tokens)?
    {
        chat.insert("reasoning_effort".into(), effort.into());
    }
    if let Some(user) = request.metadata.and_then(|m| m.user_id) {
        chat.insert("user".into(), user.into());
    }
    if request.stream == Some(true) {
        chat.insert("stream".into(), true.into());
        // The answer's usage is part of the Messages stream.
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let bytes = serde_json::to_vec(&chat).expect("JSON values serialise");
    Ok((bytes, stops))
}

/// A user turn: its tool results as `tool` messages, then the rest.
fn user_turn(out: &mut Vec<Value>, content: &Content, i: usize) -> Result<(), GatewayError> {
    let blocks = match content {
        Content::Text(text) => {
            out.push(json!({"role": "user", "content": text}));
            return Ok(());
        }
        Content::Blocks(blocks) => blocks,
    };
    let mut parts = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        match block {
            Block::Text { text } => parts.push(json!({"type": "text", "text": text})),
            Block::Image { source } => parts.push(image_part(source)),
            Block::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => {
                let text = match content {
                    None => String::new(),
                    Some(ToolResultContent::Text(text)) => text.clone(),
                    // On lines of their own, as vLLM joins a message's
                    // text parts.
                    Some(ToolResultContent::Blocks(blocks)) => blocks
                        .iter()
                        .map(|ToolResultBlock::Text { text }| text.as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                };
                let mut message =
                    json!({"role": "tool", "tool_call_id": tool_use_id, "content": text});
                if *is_error {
                    message[TOOL_ERROR] = true.into();
                }
                out.push(message);
            }
            Block::ToolUse { .. } | Block::Thinking {} | Block::RedactedThinking {} => {
                return Err(GatewayError::bad_request(
                    "`tool_use` and `thinking` blocks belong in an assistant message",
                    Some(format!("messages[{i}].content[{j}]")),
                ));
            }
        }
    }
    if !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn image_part(source: &ImageSource) -> Value {
    let url = match source {
        ImageSource::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
        ImageSource::Url { url } => url.clone(),
    };
    json!({"type": "image_url", "image_url": {"url": url}})
}

/// An assistant turn: its text, and its `tool_use` blocks as tool calls.
fn assistant_turn(content: &Content, i: usize) -> Result<Value, GatewayError> {
    let blocks = match content {
        Content::Text(text) => return Ok(json!({"role": "assistant", "content": text})),
        Content::Blocks(blocks) => blocks,
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        match block {
            Block::Text { text: t } => text.push_str(t),
            Block::ToolUse { id, name, input } => calls.push(json!({
                "id": id, "type": "function",
                "function": {"name": name, "arguments": input.to_string()},
            })),
            Block::Thinking {} | Block::RedactedThinking {} => {}
            Block::Image { .. } | Block::ToolResult { .. } => {
                return Err(GatewayError::bad_request(
                    "an assistant message holds only `text` and `tool_use` blocks",
                    Some(format!("messages[{i}].content[{j}]")),
                ));
            }
        }
    }
    let mut message = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        if text.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = calls.into();
    }
    Ok(message)
}

fn chat_tools(tools: &[Tool]) -> Result<Value, GatewayError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let client_tool = tool.kind.as_deref().is_none_or(|k| k == "custom");
        let Some(schema) = tool.input_schema.as_ref().filter(|_| client_tool) else {
            return Err(GatewayError::bad_request(
                format!(
                    "tool `{}` is not a client tool with an `input_schema`; this gateway serves no server tools",
                    crate::error::echo(&tool.name)
                ),
                Some(format!("tools[{i}]")),
            ));
        };
        let mut function = json!({"name": tool.name, "parameters": schema});
        if let Some(description) = &tool.description {
            function["description"] = description.clone().into();
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(out.into())
}

/// OpenAI's `tool_choice`, and whether parallel tool use is disabled.
fn chat_tool_choice(choice: &ToolChoice) -> (Value, Option<bool>) {
    match choice {
        ToolChoice::Auto {
            disable_parallel_tool_use,
        } => ("auto".into(), *disable_parallel_tool_use),
        ToolChoice::Any {
            disable_parallel_tool_use,
        } => ("required".into(), *disable_parallel_tool_use),
        ToolChoice::Tool {
            name,
            disable_parallel_tool_use,
        } => (
            json!({"type": "function", "function": {"name": name}}),
            *disable_parallel_tool_use,
        ),
        ToolChoice::None => ("none".into(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Value {
        let (bytes, _) = to_chat(body.to_string().as_bytes()).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn a_tool_round_trip_keeps_ids_and_puts_results_first() {
        let out = chat(json!({
            "model": "m", "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "and be quick"},
                    {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "18C"}, {"type": "text", "text": "sunny"}]}]}
            ],
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"], "top_k": 5, "metadata": {"user_id": "u1"}
        }));
        assert_eq!(
            out["messages"][0],
            json!({"role": "system", "content": "Be brief."})
        );
        let call = &out["messages"][2]["tool_calls"][0];
        assert_eq!(call["id"], "toolu_01");
        assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(
            out["messages"][3],
            json!({"role": "tool", "tool_call_id": "toolu_01", "content": "18C\nsunny"})
        );
        assert_eq!(out["messages"][4]["content"][0]["text"], "and be quick");
        assert_eq!(
            out["tools"][0]["function"]["parameters"],
            json!({"type": "object"})
        );
        assert_eq!(out["tool_choice"], "required");
        assert_eq!(out["parallel_tool_calls"], false);
        assert_eq!(out["stop"], json!(["END"]));
        assert_eq!(out["top_k"], 5);
        assert_eq!(out["user"], "u1");
        assert!(out.get("stream").is_none());
    }

    #[test]
    fn images_become_image_url_parts() {
        let out = chat(
            json!({"model": "m", "max_tokens": 8, "stream": true, "messages": [
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                {"type": "text", "text": "What is this?"}]}]}),
        );
        let parts = &out["messages"][0]["content"];
        assert_eq!(
            parts[0]["image_url"]["url"],
            "data:image/png;base64,iVBORw0KGgo="
        );
        assert_eq!(parts[1]["image_url"]["url"], "https://example.com/a.jpg");
        assert_eq!(out["stream_options"]["include_usage"], true);
    }

    #[test]
    fn bad_input_is_a_400_that_names_the_place() {
        let error = |body: Value| to_chat(body.to_string().as_bytes()).unwrap_err();
        let e = error(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        assert!(
            e.message().contains("missing field `max_tokens`"),
            "{}",
            e.message()
        );
        let e = error(json!({"model": "m", "max_tokens": 0, "messages": [
            {"role": "user", "content": "hi"}]}));
        assert_eq!(e.message(), "`max_tokens` must be at least 1");
        let e = error(json!({"model": "m", "max_tokens": 1, "messages": [
            {"role": "user", "content": [{"type": "video", "url": "x"}]}]}));
        assert_eq!(e.param_name(), Some("messages[0].content"));
        let e = error(
            json!({"model": "m", "max_tokens": 1, "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(e.param_name(), Some("thinking.budget_tokens"));
        assert!(
            e.message().contains("must be greater than"),
            "{}",
            e.message()
        );
        let e = error(
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
        );
        assert_eq!(e.param_name(), Some("tools[0]"));
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn a_thinking_budget_is_sent_as_the_effort_of_its_band() {
        let effort = |thinking: Value| {
            let body = json!({"model": "m", "max_tokens": 32000, "thinking": thinking,
                "messages": [{"role": "user", "content": "hi"}]});
            let (chat, _) = to_chat(body.to_string().as_bytes()).unwrap();
            serde_json::from_slice::<Value>(&chat).unwrap()["reasoning_effort"].clone()
        };
        let enabled = |budget: u32| effort(json!({"type": "enabled", "budget_tokens": budget}));
        assert_eq!(enabled(1024), "low");
        assert_eq!(enabled(2047), "low");
        assert_eq!(enabled(2048), "medium");
        assert_eq!(enabled(4095), "medium");
        assert_eq!(enabled(4096), "high");
        assert_eq!(enabled(31999), "high");
        assert_eq!(effort(json!({"type": "disabled"})), Value::Null);
        let e = to_chat(
            json!({"model": "m", "max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 1000},
                "messages": [{"role": "user", "content": "hi"}]})
            .to_string()
            .as_bytes(),
        )
        .unwrap_err();
        assert_eq!(e.param_name(), Some("thinking.budget_tokens"));
        assert!(e.message().contains("at least 1024"), "{}", e.message());
    }
}
