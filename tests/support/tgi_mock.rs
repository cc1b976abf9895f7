//! The TGI protocol of the mock upstream: the Messages API at
//! `/v1/chat/completions` (OpenAI's shapes, with TGI's empty `id` on the
//! usage chunk), and the native `/generate` and `/generate_stream`, which
//! insist on `parameters.details` being asked for as the gateway must.

use bytes::Bytes;
use hyper::Method;
use hyper::header::{HeaderName, HeaderValue};
use hyper::http::request::Parts;
use serde_json::{Value, json};

use super::mock::{Rejection, Route};
use super::openai_mock::{CANNED_PROMPT_TOKENS, Canned, Endpoint, Flags};

/// The tokens `/generate_stream` sends: three words, then the special
/// end-of-sequence token, which carries the details.
pub const GENERATED: [&str; 3] = ["tok ", "tok ", "tok "];
const EOS: &str = "<|eot_id|>";

pub fn route(canned: &Canned, parts: &Parts, body: &[u8]) -> Result<Route, Rejection> {
    let path = parts.uri.path();
    if parts.method != Method::POST {
        return Err(not_found(path));
    }
    match path {
        "/v1/chat/completions" => {
            let flags = Flags::parse(body);
            let mut events = canned.stream(Endpoint::Chat, &flags);
            // TGI leaves the id of its usage-only chunk empty.
            for event in &mut events {
                const USAGE_ONLY: &[u8] = b"\"choices\":[]";
                if event.windows(USAGE_ONLY.len()).any(|w| w == USAGE_ONLY) {
                    *event = Bytes::from(
                        String::from_utf8_lossy(event)
                            .replace("\"id\":\"chatcmpl-mock\"", "\"id\":\"\""),
                    );
                }
            }
            Ok(Route {
                streaming: flags.streaming(),
                json: canned.json(Endpoint::Chat, &flags).clone(),
                headers: Vec::new(),
                events,
                content_type: "text/event-stream",
            })
        }
        "/generate" | "/generate_stream" => {
            check_generate(body)?;
            Ok(Route {
                streaming: path == "/generate_stream",
                json: generate_json(),
                headers: vec![(
                    HeaderName::from_static("x-prompt-tokens"),
                    HeaderValue::from(CANNED_PROMPT_TOKENS),
                )],
                events: generate_stream(),
                content_type: "text/event-stream",
            })
        }
        _ => Err(not_found(path)),
    }
}

fn not_found(path: &str) -> Rejection {
    Rejection::new(
        404,
        &[],
        json!({"error": format!("no route for {path}"), "error_type": "not_found"}),
    )
}

/// TGI's own validation: `inputs` a string; the mock also demands
/// `details: true`, without which TGI reports no token counts.
fn check_generate(body: &[u8]) -> Result<(), Rejection> {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let problem = if !request["inputs"].is_string() {
        Some("`inputs` must be a string")
    } else if request["parameters"]["details"] != json!(true) {
        Some("the mock requires `parameters.details: true`")
    } else if request.get("stream").is_some() || request.get("prompt").is_some() {
        Some("unknown OpenAI fields on the generate route")
    } else {
        None
    };
    match problem {
        Some(message) => Err(Rejection::new(
            422,
            &[],
            json!({"error": format!("Input validation error: {message}"), "error_type": "validation"}),
        )),
        None => Ok(()),
    }
}

fn generate_json() -> Bytes {
    Bytes::from(
        json!({"generated_text": GENERATED.concat(),
            "details": {"finish_reason": "eos_token", "generated_tokens": GENERATED.len() + 1,
                "seed": null, "prefill": [], "tokens": []}})
        .to_string(),
    )
}

fn generate_stream() -> Vec<Bytes> {
    let token = |i: usize, text: &str, special: bool| json!({"id": 1000 + i, "text": text, "logprob": -0.1, "special": special});
    let mut events: Vec<Bytes> = GENERATED
        .iter()
        .enumerate()
        .map(|(i, text)| {
            // TGI writes `data:` with no space after the colon.
            Bytes::from(format!(
                "data:{}\n\n",
                json!({"index": i + 1, "token": token(i, text, false), "generated_text": null, "details": null})
            ))
        })
        .collect();
    let last = json!({"index": GENERATED.len() + 1, "token": token(GENERATED.len(), EOS, true),
        "generated_text": GENERATED.concat(),
        "details": {"finish_reason": "eos_token", "generated_tokens": GENERATED.len() + 1, "seed": null,
            "input_length": CANNED_PROMPT_TOKENS}});
    events.push(Bytes::from(format!("data:{last}\n\n")));
    events
}

/// A TGI error event on `/generate_stream`.
pub fn error_event(message: &str, error_type: &str) -> Bytes {
    Bytes::from(format!(
        "data:{}\n\n",
        json!({"error": message, "error_type": error_type})
    ))
}
