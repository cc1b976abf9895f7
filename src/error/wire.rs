//! The error bodies on the wire: OpenAI's,
//! `{"error":{"message","type","param","code"}}`, written for clients and
//! read from upstreams that send one; and Anthropic's,
//! `{"type":"error","error":{"type","message"}}`, for Messages clients.

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorObject<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorObject<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct AnthropicErrorBody<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub error: AnthropicErrorObject<'a>,
}

#[derive(Debug, Serialize)]
pub struct AnthropicErrorObject<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub message: &'a str,
}

/// An error body as upstreams send it: OpenAI's nested shape, vLLM's older
/// flat one (`{"object":"error","message":...}`), or a bare `detail`.
#[derive(Debug, Default, Deserialize)]
pub struct UpstreamError {
    #[serde(default)]
    pub error: Option<UpstreamErrorField>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub detail: Option<serde_json::Value>,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub code: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum UpstreamErrorField {
    Object {
        #[serde(default)]
        message: Option<String>,
        #[serde(rename = "type", default)]
        kind: Option<String>,
        #[serde(default)]
        param: Option<String>,
        #[serde(default)]
        code: Option<serde_json::Value>,
    },
    Text(String),
}

/// The parts of an upstream error worth passing on to the client.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UpstreamErrorParts {
    pub message: Option<String>,
    pub kind: Option<String>,
    pub param: Option<String>,
    pub code: Option<String>,
    /// The HTTP status vLLM puts in an integer `code`: what an error sent
    /// inside a 200 stream meant.
    pub status: Option<u16>,
}

fn code_parts(code: Option<serde_json::Value>) -> (Option<String>, Option<u16>) {
    match code {
        Some(serde_json::Value::String(code)) => (Some(code), None),
        Some(serde_json::Value::Number(n)) => {
            (None, n.as_u64().and_then(|n| u16::try_from(n).ok()))
        }
        _ => (None, None),
    }
}

impl UpstreamErrorParts {
    /// The parts of an upstream's error body, each without the config's
    /// secrets: some upstreams quote the credential they were sent.
    pub fn parse(body: &[u8]) -> Self {
        let parts = Self::parse_as_sent(body);
        let clean = |text: Option<String>| text.map(crate::redact::redacted);
        Self {
            message: clean(parts.message),
            kind: clean(parts.kind),
            param: clean(parts.param),
            code: clean(parts.code),
            status: parts.status,
        }
    }

    fn parse_as_sent(body: &[u8]) -> Self {
        let Ok(parsed) = serde_json::from_slice::<UpstreamError>(body) else {
            let text = String::from_utf8_lossy(body)
                .trim()
                .chars()
                .take(500)
                .collect::<String>();
            return Self {
                message: (!text.is_empty()).then_some(text),
                ..Self::default()
            };
        };
        match parsed.error {
            Some(UpstreamErrorField::Object {
                message,
                kind,
                param,
                code,
            }) => {
                let (code, status) = code_parts(code);
                Self {
                    message,
                    kind,
                    param,
                    code,
                    status,
                }
            }
            Some(UpstreamErrorField::Text(message)) => Self {
                message: Some(message),
                kind: parsed.kind,
                ..Self::default()
            },
            None => {
                let (code, status) = code_parts(parsed.code);
                Self {
                    message: parsed.message.or_else(|| {
                        parsed.detail.map(|d| match d {
                            serde_json::Value::String(s) => s,
                            other => other.to_string(),
                        })
                    }),
                    kind: parsed.kind,
                    code,
                    status,
                    ..Self::default()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_openai_vllm_and_plain_errors() {
        let openai = UpstreamErrorParts::parse(
            br#"{"error":{"message":"bad","type":"invalid_request_error","param":"messages","code":"x"}}"#,
        );
        assert_eq!(openai.message.as_deref(), Some("bad"));
        assert_eq!(openai.param.as_deref(), Some("messages"));
        assert_eq!(openai.code.as_deref(), Some("x"));
        let vllm_new = UpstreamErrorParts::parse(
            br#"{"error":{"message":"m","type":"BadRequestError","code":400}}"#,
        );
        assert_eq!(vllm_new.code, None);
        assert_eq!(vllm_new.status, Some(400));
        let vllm_old = UpstreamErrorParts::parse(
            br#"{"object":"error","message":"old","type":"BadRequestError","code":503}"#,
        );
        assert_eq!(vllm_old.message.as_deref(), Some("old"));
        assert_eq!(vllm_old.status, Some(503));
        let tgi = UpstreamErrorParts::parse(
            br#"{"error":"Input validation error","error_type":"validation"}"#,
        );
        assert_eq!(tgi.message.as_deref(), Some("Input validation error"));
        let text = UpstreamErrorParts::parse(b"upstream exploded");
        assert_eq!(text.message.as_deref(), Some("upstream exploded"));
    }
}
