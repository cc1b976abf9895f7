//! The Bedrock Runtime protocol of the mock upstream: Converse and
//! ConverseStream at `/model/{modelId}/converse[-stream]`. Every request's
//! SigV4 signature is re-derived from the mock's own copy of the secret
//! (`support/sigv4.rs`); a wrong one gets Bedrock's 403. The body is
//! checked against the Converse shape (a wrong one gets a
//! ValidationException), and streams are real event-stream frames, made
//! with `aws-smithy-eventstream`'s encoder and carrying Bedrock's `"p"`
//! padding.

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use bytes::Bytes;
use hyper::Method;
use hyper::http::request::Parts;
use serde_json::{Value, json};

use super::mock::{Rejection, Route};
use super::openai_mock::{CANNED_PROMPT_TOKENS, TOOL_ARGUMENTS, TOOL_CALL_ID, TOOL_NAME};
use super::sigv4;

/// What the mock accepts: requests for `region`, made with these.
pub struct Expect {
    pub region: String,
    pub auth: Auth,
}

pub enum Auth {
    SigV4 {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
    },
    ApiKey(String),
}

/// The words of the canned text answer, one delta each.
pub const WORDS: [&str; 3] = ["tok ", "tok ", "tok "];

pub fn route(expect: &Expect, parts: &Parts, body: &[u8]) -> Result<Route, Rejection> {
    let path = parts.uri.path();
    let operation = path
        .strip_prefix("/model/")
        .and_then(|rest| rest.rsplit_once('/'))
        .filter(|_| parts.method == Method::POST);
    let Some((label, operation @ ("converse" | "converse-stream"))) = operation else {
        return Err(error(404, "UnknownOperationException", "Unknown operation"));
    };
    // The model id is one path label, encoded as AWS SDKs encode it.
    let decoded = percent_encoding::percent_decode_str(label).decode_utf8_lossy();
    if sigv4::uri_encode(&decoded) != label {
        return Err(error(
            400,
            "ValidationException",
            &format!("the model id in the path is not encoded as one label: {label}"),
        ));
    }
    check_auth(expect, parts, body)?;
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    check_converse(&request).map_err(|message| error(400, "ValidationException", &message))?;
    let tools = request.get("toolConfig").is_some();
    Ok(Route {
        streaming: operation == "converse-stream",
        json: Bytes::from(converse_json(tools).to_string()),
        headers: Vec::new(),
        events: frames(tools),
        content_type: "application/vnd.amazon.eventstream",
    })
}

/// A Bedrock error response: the name in `x-amzn-ErrorType`, the message
/// in the body.
pub fn error(status: u16, name: &str, message: &str) -> Rejection {
    Rejection::new(
        status,
        &[(
            "x-amzn-errortype",
            &format!("{name}:http://internal.amazon.com/coral/com.amazon.bedrock/"),
        )],
        json!({"message": message}),
    )
}

fn check_auth(expect: &Expect, parts: &Parts, body: &[u8]) -> Result<(), Rejection> {
    let (access_key_id, secret_access_key, session_token) = match &expect.auth {
        Auth::ApiKey(key) => {
            let sent = parts
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            return if sent == Some(&format!("Bearer {key}")) {
                Ok(())
            } else {
                Err(error(
                    403,
                    "AccessDeniedException",
                    "Authentication failed: Please make sure your API Key is valid.",
                ))
            };
        }
        Auth::SigV4 {
            access_key_id,
            secret_access_key,
            session_token,
        } => (access_key_id, secret_access_key, session_token),
    };
    let creds = sigv4::Credentials {
        access_key_id,
        secret_access_key,
        session_token: session_token.as_deref(),
        region: &expect.region,
        service: "bedrock",
    };
    let query = parts.uri.query().unwrap_or("");
    sigv4::verify(&creds, parts.method.as_str(), parts.uri.path(), query, &parts.headers, body).map_err(|why| {
        eprintln!("mock bedrock: refused a signature: {why}");
        error(
            403,
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. \
             Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
        )
    })
}

/// The Converse request shape, as far as the gateway writes it.
pub fn check_converse(request: &Value) -> Result<(), String> {
    let object = request.as_object().ok_or("the body is not a JSON object")?;
    for key in object.keys() {
        if !["messages", "system", "inferenceConfig", "toolConfig"].contains(&key.as_str()) {
            return Err(format!("unexpected field {key}"));
        }
    }
    let messages = request["messages"]
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or("messages must be a non-empty array")?;
    let mut previous = "";
    let mut tool_blocks = false;
    for (i, message) in messages.iter().enumerate() {
        let role = message["role"].as_str().unwrap_or_default();
        if !["user", "assistant"].contains(&role) || role == previous || (i == 0 && role != "user")
        {
            return Err(format!(
                "messages[{i}]: roles must alternate, starting with user; got {role}"
            ));
        }
        previous = role;
        let content = message["content"].as_array().filter(|c| !c.is_empty());
        for block in content.ok_or(format!("messages[{i}].content must be a non-empty array"))? {
            tool_blocks |= block.get("toolUse").is_some() || block.get("toolResult").is_some();
            check_block(block).map_err(|e| format!("messages[{i}]: {e}"))?;
        }
    }
    for block in request
        .get("system")
        .map(|s| s.as_array().ok_or("system must be an array"))
        .transpose()?
        .into_iter()
        .flatten()
    {
        if block["text"].as_str().is_none_or(str::is_empty) {
            return Err("system blocks must be {\"text\": ...}".into());
        }
    }
    if let Some(config) = request.get("inferenceConfig") {
        let config = config
            .as_object()
            .ok_or("inferenceConfig must be an object")?;
        for (key, value) in config {
            let ok = match key.as_str() {
                "maxTokens" => value.as_u64().is_some_and(|n| n >= 1),
                "temperature" | "topP" => value.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)),
                "stopSequences" => value
                    .as_array()
                    .is_some_and(|s| s.iter().all(Value::is_string)),
                _ => false,
            };
            if !ok {
                return Err(format!("inferenceConfig.{key} is not valid: {value}"));
            }
        }
    }
    match request.get("toolConfig") {
        Some(config) => {
            let tools = config["tools"]
                .as_array()
                .filter(|t| !t.is_empty())
                .ok_or("toolConfig.tools must be a non-empty array")?;
            for tool in tools {
                if !tool["toolSpec"]["name"].is_string()
                    || !tool["toolSpec"]["inputSchema"]["json"].is_object()
                {
                    return Err(format!(
                        "a tool must be {{toolSpec: {{name, inputSchema: {{json}}}}}}: {tool}"
                    ));
                }
            }
        }
        None if tool_blocks => {
            return Err("The toolConfig field must be defined when using toolUse and toolResult content blocks.".into());
        }
        None => {}
    }
    Ok(())
}

fn check_block(block: &Value) -> Result<(), String> {
    let object = block
        .as_object()
        .filter(|o| o.len() == 1)
        .ok_or(format!("a content block has exactly one key: {block}"))?;
    let (kind, value) = object.iter().next().expect("one key");
    let ok = match kind.as_str() {
        "text" => value.as_str().is_some_and(|t| !t.is_empty()),
        "image" => {
            ["png", "jpeg", "gif", "webp"].contains(&value["format"].as_str().unwrap_or_default())
                && value["source"]["bytes"]
                    .as_str()
                    .is_some_and(|b| !b.is_empty())
        }
        "toolUse" => {
            value["toolUseId"].is_string()
                && value["name"].is_string()
                && value["input"].is_object()
        }
        "toolResult" => {
            value["toolUseId"].is_string()
                && value["content"].is_array()
                && (value.get("status").is_none()
                    || matches!(value["status"].as_str(), Some("success" | "error")))
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("a bad {kind} block: {value}"))
    }
}

fn usage(output_tokens: usize) -> Value {
    json!({"inputTokens": CANNED_PROMPT_TOKENS, "outputTokens": output_tokens,
           "totalTokens": CANNED_PROMPT_TOKENS + output_tokens as u64})
}

fn converse_json(tools: bool) -> Value {
    let (content, stop) = if tools {
        let input: Value = serde_json::from_str(&TOOL_ARGUMENTS.concat()).expect("JSON");
        (
            json!([{"toolUse": {"toolUseId": TOOL_CALL_ID, "name": TOOL_NAME, "input": input}}]),
            "tool_use",
        )
    } else {
        (json!([{"text": WORDS.concat()}]), "end_turn")
    };
    json!({"output": {"message": {"role": "assistant", "content": content}}, "stopReason": stop,
           "usage": usage(WORDS.len()), "metrics": {"latencyMs": 42}})
}

/// One encoded frame. `kind` is `event` (with `:event-type`) or
/// `exception` (with `:exception-type`).
pub fn frame(message_type: &'static str, name: &str, payload: &Value) -> Bytes {
    let type_header = if message_type == "event" {
        ":event-type"
    } else {
        ":exception-type"
    };
    let message = Message::new(Bytes::from(payload.to_string()))
        .add_header(Header::new(
            type_header,
            HeaderValue::String(name.to_owned().into()),
        ))
        .add_header(Header::new(
            ":content-type",
            HeaderValue::String("application/json".into()),
        ))
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String(message_type.into()),
        ));
    let mut out = Vec::new();
    write_message_to(&message, &mut out).expect("frames encode");
    Bytes::from(out)
}

/// An event frame, with the random-length padding Bedrock adds.
pub fn event(name: &str, mut payload: Value) -> Bytes {
    payload["p"] = json!("abcdefghijklmnopqrstuvwxyzABCDEF"[..name.len()]);
    frame("event", name, &payload)
}

pub fn exception(name: &str, message: &str) -> Bytes {
    frame("exception", name, &json!({"message": message}))
}

/// The canned ConverseStream: the words (or the tool call), the stop, and
/// the metadata with usage.
pub fn frames(tools: bool) -> Vec<Bytes> {
    let mut frames = vec![event("messageStart", json!({"role": "assistant"}))];
    let stop = if tools {
        frames.push(event(
            "contentBlockStart",
            json!({"contentBlockIndex": 0,
            "start": {"toolUse": {"toolUseId": TOOL_CALL_ID, "name": TOOL_NAME}}}),
        ));
        for piece in TOOL_ARGUMENTS {
            frames.push(event(
                "contentBlockDelta",
                json!({"contentBlockIndex": 0, "delta": {"toolUse": {"input": piece}}}),
            ));
        }
        "tool_use"
    } else {
        for word in WORDS {
            frames.push(event(
                "contentBlockDelta",
                json!({"contentBlockIndex": 0, "delta": {"text": word}}),
            ));
        }
        "end_turn"
    };
    frames.push(event("contentBlockStop", json!({"contentBlockIndex": 0})));
    frames.push(event("messageStop", json!({"stopReason": stop})));
    frames.push(event(
        "metadata",
        json!({"usage": usage(WORDS.len()), "metrics": {"latencyMs": 42}}),
    ));
    frames
}
