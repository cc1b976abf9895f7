//! Client requests: chat completions and legacy completions. Only the
//! fields the gateway reads are typed; everything else is kept in `extra`
//! and sent upstream untouched.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatRequest {
    /// Replaced by the deployment's upstream model id when sent upstream.
    #[serde(skip_serializing)]
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Rewritten per upstream call (see `Outbound`).
    #[serde(default, skip_serializing)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "a string, or an array of content parts such as {\"type\":\"text\",\"text\":\"...\"}"
)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of an array content: `text`, `image_url`, `input_audio`, `file`…
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `POST /v1/completions` (legacy).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CompletionRequest {
    #[serde(skip_serializing)]
    pub model: String,
    pub prompt: Prompt,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A string, an array of strings, or token ids (one prompt or many).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "a string, an array of strings, or an array of token ids"
)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

/// Which endpoint a request came in on; decides the response object shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "chat/completions",
            Self::Completions => "completions",
        }
    }
}

/// A parsed client request of either endpoint.
#[derive(Debug, Clone)]
pub enum InboundRequest {
    Chat(ChatRequest),
    Completion(CompletionRequest),
}

impl InboundRequest {
    pub fn endpoint(&self) -> Endpoint {
        match self {
            Self::Chat(_) => Endpoint::Chat,
            Self::Completion(_) => Endpoint::Completions,
        }
    }

    pub fn model(&self) -> &str {
        match self {
            Self::Chat(r) => &r.model,
            Self::Completion(r) => &r.model,
        }
    }

    pub fn stream(&self) -> bool {
        match self {
            Self::Chat(r) => r.stream,
            Self::Completion(r) => r.stream,
        }
        .unwrap_or(false)
    }

    fn stream_options(&self) -> Option<&StreamOptions> {
        match self {
            Self::Chat(r) => r.stream_options.as_ref(),
            Self::Completion(r) => r.stream_options.as_ref(),
        }
    }

    /// Whether the client asked for the usage-only chunk at the end of a stream.
    pub fn include_usage(&self) -> bool {
        self.stream()
            && self
                .stream_options()
                .and_then(|o| o.include_usage)
                .unwrap_or(false)
    }

    /// The output limit the client set, if any.
    pub fn max_output_tokens(&self) -> Option<u32> {
        match self {
            Self::Chat(r) => r.max_completion_tokens.or(r.max_tokens),
            Self::Completion(r) => r.max_tokens,
        }
    }

    /// The body to send to an OpenAI-compatible upstream: the client's
    /// fields untouched, `model` replaced, and `stream_options` set as the
    /// upstream call needs (`None` removes it).
    pub fn to_upstream_json(
        &self,
        upstream_model: &str,
        stream_options: Option<&StreamOptions>,
    ) -> Vec<u8> {
        #[derive(Serialize)]
        struct Outbound<'a, T> {
            model: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            stream_options: Option<&'a StreamOptions>,
            #[serde(flatten)]
            body: &'a T,
        }
        let result = match self {
            Self::Chat(body) => serde_json::to_vec(&Outbound {
                model: upstream_model,
                stream_options,
                body,
            }),
            Self::Completion(body) => serde_json::to_vec(&Outbound {
                model: upstream_model,
                stream_options,
                body,
            }),
        };
        result.expect("a request parsed from JSON serialises back to JSON")
    }

    /// `stream_options` for an upstream stream call: the client's own
    /// options with `include_usage` forced on, so usage is always metered.
    pub fn upstream_stream_options(&self) -> StreamOptions {
        let mut options = self.stream_options().cloned().unwrap_or_default();
        options.include_usage = Some(true);
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_body_keeps_unknown_fields_and_rewrites_model() {
        let body = r#"{"model":"alias","messages":[{"role":"user","content":"hi","name":"bob"}],
            "stream":true,"stream_options":{"include_usage":false,"include_obfuscation":false},
            "top_k":5,"temperature":null,"tools":[{"type":"function","function":{"name":"f"}}]}"#;
        let req = InboundRequest::Chat(serde_json::from_str(body).unwrap());
        let out: Value = serde_json::from_slice(
            &req.to_upstream_json("meta/llama", Some(&req.upstream_stream_options())),
        )
        .unwrap();
        assert_eq!(out["model"], "meta/llama");
        assert_eq!(out["top_k"], 5);
        assert_eq!(out["temperature"], Value::Null);
        assert_eq!(out["messages"][0]["name"], "bob");
        assert_eq!(out["tools"][0]["function"]["name"], "f");
        assert_eq!(out["stream_options"]["include_usage"], true);
        assert_eq!(out["stream_options"]["include_obfuscation"], false);
        assert!(!req.include_usage());
    }

    #[test]
    fn non_stream_upstream_body_drops_stream_options() {
        let body = r#"{"model":"a","prompt":["x","y"],"stream_options":{"include_usage":true}}"#;
        let req = InboundRequest::Completion(serde_json::from_str(body).unwrap());
        let out: Value = serde_json::from_slice(&req.to_upstream_json("m", None)).unwrap();
        assert!(out.get("stream_options").is_none());
        assert_eq!(out["prompt"][1], "y");
    }
}
