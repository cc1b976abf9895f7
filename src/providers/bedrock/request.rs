//! OpenAI chat request → Bedrock `ConverseRequest`. Everything Bedrock
//! cannot take is refused with a 400 that names the field and says what
//! to send instead, rather than silently dropped.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::GatewayError;
use crate::openai::{ChatMessage, ChatRequest, ContentPart, MessageContent, TOOL_ERROR};

use super::params;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConverseRequest {
    messages: Vec<Message>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<Block>,
    #[serde(skip_serializing_if = "InferenceConfig::is_empty")]
    inference_config: InferenceConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<ToolConfig>,
}

impl ConverseRequest {
    /// The request's stop sequence when it sent exactly one: the one a
    /// `stop_sequence` stop matched.
    pub fn only_stop(&self) -> Option<String> {
        match self.inference_config.stop_sequences.as_slice() {
            [stop] => Some(stop.clone()),
            _ => None,
        }
    }
}

#[derive(Debug, Serialize)]
struct Message {
    role: &'static str,
    content: Vec<Block>,
}

/// A `ContentBlock`: a union written as an object with exactly one key.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
enum Block {
    Text(String),
    Image {
        format: &'static str,
        source: ImageSource,
    },
    #[serde(rename_all = "camelCase")]
    ToolUse {
        tool_use_id: String,
        name: String,
        input: Value,
    },
    #[serde(rename_all = "camelCase")]
    ToolResult {
        tool_use_id: String,
        content: Vec<Block>,
        /// `error` for a result the client marked as an error (a Messages
        /// `tool_result` with `is_error`); Converse's default is success.
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<&'static str>,
    },
}

#[derive(Debug, Serialize)]
struct ImageSource {
    /// Base64, as Bedrock's JSON protocol carries blobs.
    bytes: String,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct InferenceConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<String>,
}

impl InferenceConfig {
    fn is_empty(&self) -> bool {
        self.max_tokens.is_none()
            && self.temperature.is_none()
            && self.top_p.is_none()
            && self.stop_sequences.is_empty()
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolConfig {
    tools: Vec<Tool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Tool {
    tool_spec: ToolSpec,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolSpec {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    input_schema: InputSchema,
}

#[derive(Debug, Serialize)]
struct InputSchema {
    json: Value,
}

fn bad(message: impl Into<String>, param: impl Into<String>) -> GatewayError {
    GatewayError::bad_request(message, Some(param.into()))
}

/// Translates a chat request; `Err` is a 400 for the client.
/// `max_tokens` is the gateway's limit, used when the client set none;
/// `drop_params` the parameters Bedrock cannot honour that are ignored
/// rather than refused.
pub fn converse(
    chat: &ChatRequest,
    max_tokens: Option<u32>,
    drop_params: &[String],
) -> Result<ConverseRequest, GatewayError> {
    params::refuse_unhonoured(chat, drop_params)?;
    let mut system = Vec::new();
    let mut messages: Vec<Message> = Vec::new();
    for (i, message) in chat.messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let (role, blocks) = match message.role.as_str() {
            "system" | "developer" => {
                system.extend(text_blocks(message, &at)?);
                continue;
            }
            "user" => ("user", user_blocks(message, &at)?),
            "assistant" => ("assistant", assistant_blocks(message, &at)?),
            // Bedrock carries tool results inside a user turn.
            "tool" => ("user", vec![tool_result(message, &at)?]),
            other => {
                return Err(bad(
                    format!(
                        "role \"{other}\" is not supported by Bedrock; use system, developer, user, assistant or tool"
                    ),
                    format!("{at}.role"),
                ));
            }
        };
        // Bedrock refuses a turn without content (an empty assistant
        // turn, or one that only refused); it carries nothing.
        if blocks.is_empty() {
            continue;
        }
        // Bedrock requires turns to alternate: consecutive turns of one
        // role become one message.
        match messages.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => messages.push(Message {
                role,
                content: blocks,
            }),
        }
    }
    // Bedrock refuses a conversation that does not open with the user.
    match messages.first() {
        None => {
            return Err(bad(
                "Bedrock needs a user message with content besides the system prompt; send one",
                "messages",
            ));
        }
        Some(first) if first.role == "assistant" => {
            return Err(bad(
                "Bedrock needs the conversation to open with a user message, not the assistant's; put the user's message first",
                "messages",
            ));
        }
        Some(_) => {}
    }
    let tool_config = tool_config(chat)?.or_else(|| history_tools(&messages));
    Ok(ConverseRequest {
        messages,
        system,
        inference_config: inference_config(chat, max_tokens)?,
        tool_config,
    })
}

fn text_blocks(message: &ChatMessage, at: &str) -> Result<Vec<Block>, GatewayError> {
    match &message.content {
        None => Ok(Vec::new()),
        Some(MessageContent::Text(text)) => Ok(non_empty(text).into_iter().collect()),
        Some(MessageContent::Parts(parts)) => parts
            .iter()
            .enumerate()
            .filter_map(|(j, part)| match (part.kind.as_str(), &part.text) {
                ("text", Some(text)) => non_empty(text).map(Ok),
                _ => Some(Err(bad(
                    format!(
                        "a {} message may hold only text parts for Bedrock",
                        message.role
                    ),
                    format!("{at}.content[{j}]"),
                ))),
            })
            .collect(),
    }
}

/// Bedrock refuses blank text blocks; an empty string carries nothing.
fn non_empty(text: &str) -> Option<Block> {
    (!text.is_empty()).then(|| Block::Text(text.to_owned()))
}

fn user_blocks(message: &ChatMessage, at: &str) -> Result<Vec<Block>, GatewayError> {
    let Some(MessageContent::Parts(parts)) = &message.content else {
        return text_blocks(message, at);
    };
    parts
        .iter()
        .enumerate()
        .filter_map(|(j, part)| part_block(part, &format!("{at}.content[{j}]")).transpose())
        .collect()
}

fn part_block(part: &ContentPart, at: &str) -> Result<Option<Block>, GatewayError> {
    if let Some(url) = part.image_url() {
        return image_block(url, &format!("{at}.image_url.url")).map(Some);
    }
    match part.kind.as_str() {
        "text" => Ok(part.text.as_deref().and_then(non_empty)),
        other => Err(bad(
            format!(
                "content parts of type \"{other}\" are not supported by Bedrock; send text or image_url parts"
            ),
            format!("{at}.type"),
        )),
    }
}

/// A `data:image/...;base64,...` URL → an image block with its bytes.
fn image_block(url: &str, at: &str) -> Result<Block, GatewayError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(bad(
            "Bedrock needs images inline: send the image as a data URL (data:image/png;base64,...) instead of an http(s) URL",
            at,
        ));
    }
    let invalid = || {
        bad(
            "an image must be a data URL such as data:image/png;base64,... (png, jpeg, gif or webp)",
            at,
        )
    };
    let (header, data) = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(','))
        .ok_or_else(invalid)?;
    let mime = header.strip_suffix(";base64").ok_or_else(invalid)?;
    let format = match mime.to_ascii_lowercase().as_str() {
        "image/png" => "png",
        "image/jpeg" | "image/jpg" => "jpeg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        _ => return Err(invalid()),
    };
    let bytes = BASE64
        .decode(data.trim())
        .map_err(|_| bad("the image data URL does not hold valid base64", at))?;
    Ok(Block::Image {
        format,
        source: ImageSource {
            bytes: BASE64.encode(bytes),
        },
    })
}

fn assistant_blocks(message: &ChatMessage, at: &str) -> Result<Vec<Block>, GatewayError> {
    let mut blocks = text_blocks(message, at)?;
    let calls = match message.extra.get("tool_calls") {
        None | Some(Value::Null) => return Ok(blocks),
        Some(Value::Array(calls)) => calls,
        Some(_) => return Err(bad("must be an array", format!("{at}.tool_calls"))),
    };
    for (j, call) in calls.iter().enumerate() {
        let at = format!("{at}.tool_calls[{j}]");
        let field = |path: &str| call.pointer(path).and_then(Value::as_str);
        let (Some(id), Some(name)) = (field("/id"), field("/function/name")) else {
            return Err(bad("a tool call needs `id` and `function.name`", at));
        };
        let arguments = field("/function/arguments").unwrap_or("");
        let input = if arguments.trim().is_empty() {
            Value::Object(Map::new())
        } else {
            serde_json::from_str(arguments).map_err(|_| {
                bad(
                    "the tool call's arguments are not valid JSON",
                    format!("{at}.function.arguments"),
                )
            })?
        };
        blocks.push(Block::ToolUse {
            tool_use_id: id.to_owned(),
            name: name.to_owned(),
            input,
        });
    }
    Ok(blocks)
}

fn tool_result(message: &ChatMessage, at: &str) -> Result<Block, GatewayError> {
    let id = message
        .extra
        .get("tool_call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            bad(
                "a tool message needs `tool_call_id`",
                format!("{at}.tool_call_id"),
            )
        })?;
    let mut content = text_blocks(message, at)?;
    if content.is_empty() {
        // Bedrock requires some content in a tool result.
        content.push(Block::Text("(empty)".into()));
    }
    Ok(Block::ToolResult {
        tool_use_id: id.to_owned(),
        content,
        status: (message.extra.get(TOOL_ERROR) == Some(&Value::Bool(true))).then_some("error"),
    })
}

/// A number field in `0..=max`, or absent.
fn unit_number(chat: &ChatRequest, field: &str, max: f64) -> Result<Option<f64>, GatewayError> {
    match chat.extra.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_f64() {
            Some(x) if (0.0..=max).contains(&x) => Ok(Some(x)),
            _ => Err(bad(
                format!("Bedrock accepts `{field}` from 0 to {max}; send a number in that range"),
                field,
            )),
        },
    }
}

fn inference_config(
    chat: &ChatRequest,
    max_tokens: Option<u32>,
) -> Result<InferenceConfig, GatewayError> {
    let stop_sequences = match chat.extra.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(stop)) => vec![stop.clone()],
        Some(Value::Array(stops)) => stops
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("`stop` must be a string or an array of strings", "stop"))?,
        Some(_) => {
            return Err(bad(
                "`stop` must be a string or an array of strings",
                "stop",
            ));
        }
    };
    Ok(InferenceConfig {
        max_tokens: chat
            .max_completion_tokens
            .or(chat.max_tokens)
            .or(max_tokens),
        temperature: unit_number(chat, "temperature", 1.0)?,
        top_p: unit_number(chat, "top_p", 1.0)?,
        stop_sequences,
    })
}

/// Bedrock refuses `toolUse` and `toolResult` blocks without a
/// `toolConfig`, so a history with tool calls and no `tools` (or
/// `tool_choice: "none"`) offers the tools it called, with any input.
/// No `toolChoice`: Bedrock's default, `auto`, leaves the model free not
/// to call one.
fn history_tools(messages: &[Message]) -> Option<ToolConfig> {
    let mut names: Vec<&str> = Vec::new();
    for block in messages.iter().flat_map(|m| &m.content) {
        if let Block::ToolUse { name, .. } = block
            && !names.contains(&name.as_str())
        {
            names.push(name);
        }
    }
    let tools: Vec<Tool> = names
        .into_iter()
        .map(|name| Tool {
            tool_spec: ToolSpec {
                name: name.to_owned(),
                description: None,
                input_schema: InputSchema {
                    json: serde_json::json!({"type": "object"}),
                },
            },
        })
        .collect();
    (!tools.is_empty()).then_some(ToolConfig {
        tools,
        tool_choice: None,
    })
}

fn tool_config(chat: &ChatRequest) -> Result<Option<ToolConfig>, GatewayError> {
    let Some(tools) = chat.tools.as_ref().filter(|_| chat.has_tools()) else {
        return Ok(None);
    };
    // Checked to be a JSON array as the request was read.
    let tools: Vec<Value> = serde_json::from_str(tools.get())
        .map_err(|e| bad(format!("`tools` could not be read: {e}"), "tools"))?;
    let tool_choice = match chat.extra.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(choice)) => match choice.as_str() {
            "auto" => Some(serde_json::json!({"auto": {}})),
            "required" => Some(serde_json::json!({"any": {}})),
            // Bedrock cannot forbid tool use while offering tools; not
            // offering them is the nearest.
            "none" => return Ok(None),
            _ => {
                return Err(bad(
                    "`tool_choice` must be \"auto\", \"required\", \"none\" or {\"type\":\"function\",\"function\":{\"name\":...}}",
                    "tool_choice",
                ));
            }
        },
        Some(choice) => match choice.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => Some(serde_json::json!({"tool": {"name": name}})),
            None => {
                return Err(bad(
                    "`tool_choice` names no function; send {\"type\":\"function\",\"function\":{\"name\":...}}",
                    "tool_choice",
                ));
            }
        },
    };
    let tools = tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let function = tool
                .get("function")
                .filter(|_| tool.get("type").and_then(Value::as_str) == Some("function"));
            let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
            let (Some(function), Some(name)) = (function, name) else {
                return Err(bad(
                    "each tool must be {\"type\":\"function\",\"function\":{\"name\":...}}",
                    format!("tools[{i}]"),
                ));
            };
            Ok(Tool {
                tool_spec: ToolSpec {
                    name: name.to_owned(),
                    description: function
                        .get("description")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    input_schema: InputSchema {
                        json: function.get("parameters").cloned().unwrap_or_else(
                            || serde_json::json!({"type": "object", "properties": {}}),
                        ),
                    },
                },
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Some(ToolConfig { tools, tool_choice }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn translate(request: Value) -> Result<Value, GatewayError> {
        let chat: ChatRequest = serde_json::from_value(request).unwrap();
        converse(&chat, None, &[]).map(|c| serde_json::to_value(c).unwrap())
    }

    #[test]
    fn turns_without_content_are_left_out_and_the_user_must_open() {
        let out = translate(json!({"model": "m", "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": null, "refusal": "I can't."},
            {"role": "user", "content": "Again"},
        ]}))
        .unwrap();
        assert_eq!(
            out["messages"],
            json!([{"role": "user", "content": [{"text": "Hi"}, {"text": "Again"}]}])
        );
        for messages in [
            json!([{"role": "system", "content": "Be brief."}]),
            json!([{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Hi"}]),
        ] {
            let error = translate(json!({"model": "m", "messages": messages})).unwrap_err();
            assert_eq!(error.param_name(), Some("messages"));
            assert!(
                error.message().contains("user message"),
                "{}",
                error.message()
            );
        }
    }

    #[test]
    fn system_goes_to_system_and_turns_of_one_role_are_merged() {
        let out = translate(json!({"model": "m", "max_completion_tokens": 64, "temperature": 0.5,
            "top_p": 0.9, "stop": "</s>", "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": [{"type": "text", "text": "there"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
        ]}))
        .unwrap();
        assert_eq!(
            out,
            json!({
                "messages": [{"role": "user", "content": [{"text": "Hi"}, {"text": "there"},
                    {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}}]}],
                "system": [{"text": "Answer briefly."}, {"text": "Be kind."}],
                "inferenceConfig": {"maxTokens": 64, "temperature": 0.5, "topP": 0.9, "stopSequences": ["</s>"]}
            })
        );
    }

    #[test]
    fn tools_tool_calls_and_results_map_to_tool_config_tool_use_and_tool_result() {
        let out = translate(json!({"model": "m", "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "user", "content": "Thanks"},
        ], "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}))
        .unwrap();
        assert_eq!(
            out["messages"],
            json!([
                {"role": "user", "content": [{"text": "Weather in Paris?"}]},
                {"role": "assistant", "content": [{"toolUse": {"toolUseId": "call_1", "name": "get_weather", "input": {"city": "Paris"}}}]},
                {"role": "user", "content": [{"toolResult": {"toolUseId": "call_1", "content": [{"text": "18C"}]}}, {"text": "Thanks"}]},
            ])
        );
        assert_eq!(
            out["toolConfig"],
            json!({"tools": [{"toolSpec": {"name": "get_weather", "description": "Weather by city",
                "inputSchema": {"json": {"type": "object", "properties": {"city": {"type": "string"}}}}}}],
                "toolChoice": {"tool": {"name": "get_weather"}}})
        );
    }

    #[test]
    fn tool_history_without_tools_offers_the_tools_it_called() {
        let history = json!([
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
                {"id": "c3", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
            {"role": "tool", "tool_call_id": "c2", "content": "21C"},
            {"role": "tool", "tool_call_id": "c3", "content": "noon"},
        ]);
        let offered = json!({"tools": [
            {"toolSpec": {"name": "get_weather", "inputSchema": {"json": {"type": "object"}}}},
            {"toolSpec": {"name": "get_time", "inputSchema": {"json": {"type": "object"}}}}]});
        for extra in [
            json!({}),
            json!({"tools": []}),
            json!({"tool_choice": "none",
            "tools": [{"type": "function", "function": {"name": "other"}}]}),
        ] {
            let mut request = json!({"model": "m", "messages": history});
            request
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            assert_eq!(
                translate(request).unwrap()["toolConfig"],
                offered,
                "{extra}"
            );
        }
        let plain =
            translate(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}));
        assert!(plain.unwrap().get("toolConfig").is_none());
    }

    #[test]
    fn what_bedrock_cannot_take_is_a_400_naming_the_field() {
        let cases = [
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url",
                "image_url": {"url": "https://example.com/cat.png"}}]}]}),
                "messages[0].content[0].image_url.url",
                "inline",
            ),
            (
                json!({"temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}),
                "temperature",
                "0 to 1",
            ),
            (
                json!({"n": 2, "messages": [{"role": "user", "content": "x"}]}),
                "n",
                "cannot honour `n`",
            ),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{oops"}}]}]}),
                "messages[0].tool_calls[0].function.arguments",
                "not valid JSON",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
                "messages[0].content[0].type",
                "not supported",
            ),
        ];
        for (mut request, param, words) in cases {
            request["model"] = json!("m");
            let error = translate(request).unwrap_err();
            assert_eq!(error.status(), 400);
            assert_eq!(error.param_name(), Some(param));
            assert!(error.message().contains(words), "{}", error.message());
        }
    }
}
