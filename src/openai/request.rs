//! Client requests: chat completions and legacy completions. Only the
//! fields the gateway reads are typed; everything else is kept in `extra`
//! for the providers that translate it. OpenAI-compatible upstreams get the
//! client's own bytes back, with `model` and `stream_options` replaced.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, DeserializeOwned, Deserializer as _, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::GatewayError;

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

/// A client request of either endpoint: the body as it came, and the
/// fields the gateway reads.
#[derive(Debug, Clone)]
pub struct InboundRequest {
    /// The client's JSON object. An OpenAI-compatible upstream gets these
    /// bytes with two members replaced instead of a re-encoding of `typed`:
    /// re-encoding escaped every message again, a tenth of a stream's CPU.
    body: Bytes,
    pub typed: TypedRequest,
}

#[derive(Debug, Clone)]
pub enum TypedRequest {
    Chat(ChatRequest),
    Completion(CompletionRequest),
}

impl InboundRequest {
    /// Reads a client body sent to `endpoint`. A body that does not fit is
    /// a 400 whose message and `param` say where it went wrong.
    pub fn parse(endpoint: Endpoint, body: Bytes) -> Result<Self, GatewayError> {
        let typed = match endpoint {
            Endpoint::Chat => TypedRequest::Chat(typed(&body)?),
            Endpoint::Completions => TypedRequest::Completion(typed(&body)?),
        };
        if let TypedRequest::Chat(chat) = &typed
            && chat.messages.is_empty()
        {
            return Err(GatewayError::bad_request(
                "`messages` is empty; send at least one message",
                Some("messages".into()),
            ));
        }
        Ok(Self { body, typed })
    }

    pub fn endpoint(&self) -> Endpoint {
        match self.typed {
            TypedRequest::Chat(_) => Endpoint::Chat,
            TypedRequest::Completion(_) => Endpoint::Completions,
        }
    }

    pub fn model(&self) -> &str {
        match &self.typed {
            TypedRequest::Chat(r) => &r.model,
            TypedRequest::Completion(r) => &r.model,
        }
    }

    pub fn stream(&self) -> bool {
        match &self.typed {
            TypedRequest::Chat(r) => r.stream,
            TypedRequest::Completion(r) => r.stream,
        }
        .unwrap_or(false)
    }

    fn stream_options(&self) -> Option<&StreamOptions> {
        match &self.typed {
            TypedRequest::Chat(r) => r.stream_options.as_ref(),
            TypedRequest::Completion(r) => r.stream_options.as_ref(),
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
        match &self.typed {
            TypedRequest::Chat(r) => r.max_completion_tokens.or(r.max_tokens),
            TypedRequest::Completion(r) => r.max_tokens,
        }
    }

    /// The body to send to an OpenAI-compatible upstream: the client's
    /// members as it wrote them, in its order, except `model` (replaced by
    /// `upstream_model`) and `stream_options` (set as the upstream call
    /// needs; `None` removes it).
    pub fn to_upstream_json(
        &self,
        upstream_model: &str,
        stream_options: Option<&StreamOptions>,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + upstream_model.len() + 64);
        out.extend_from_slice(b"{\"model\":");
        write_json(&mut out, upstream_model);
        if let Some(options) = stream_options {
            out.extend_from_slice(b",\"stream_options\":");
            write_json(&mut out, options);
        }
        serde_json::Deserializer::from_slice(&self.body)
            .deserialize_map(CopyMembers { out: &mut out })
            .expect("the body was read as a JSON object");
        out.push(b'}');
        out
    }

    /// `stream_options` for an upstream stream call: the client's own
    /// options with `include_usage` forced on, so usage is always metered.
    pub fn upstream_stream_options(&self) -> StreamOptions {
        let mut options = self.stream_options().cloned().unwrap_or_default();
        options.include_usage = Some(true);
        options
    }
}

/// Parsed plainly first; only a body that fails is parsed again, with the
/// path tracking that names where it went wrong.
fn typed<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, GatewayError> {
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            GatewayError::bad_request(format!("the request body is not valid JSON: {inner}"), None)
        } else if path == "." {
            GatewayError::bad_request(format!("invalid request body: {inner}"), None)
        } else {
            GatewayError::bad_request(
                format!("invalid request body at `{path}`: {inner}"),
                Some(path),
            )
        }
    })
}

fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value).expect("strings and options serialise");
}

/// Appends each member of the object it visits to `out`, each after a
/// comma, as written: all but `model` and `stream_options`.
struct CopyMembers<'o> {
    out: &'o mut Vec<u8>,
}

impl<'de> Visitor<'de> for CopyMembers<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<(), A::Error> {
        while let Some(name) = members.next_key::<MemberName<'de>>()? {
            let value = members.next_value::<&'de RawValue>()?;
            if matches!(&*name.0, "model" | "stream_options") {
                continue;
            }
            self.out.push(b',');
            write_json(self.out, &*name.0);
            self.out.push(b':');
            self.out.extend_from_slice(value.get().as_bytes());
        }
        Ok(())
    }
}

/// A member's name, borrowed unless it had escapes.
struct MemberName<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for MemberName<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl<'de> Visitor<'de> for Name {
            type Value = MemberName<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Borrowed(name)))
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Owned(name.to_owned())))
            }
        }
        deserializer.deserialize_str(Name)
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
        let req =
            InboundRequest::parse(Endpoint::Chat, Bytes::from_static(body.as_bytes())).unwrap();
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
    fn upstream_body_is_the_clients_own_text_with_model_and_stream_options_replaced() {
        let body = concat!(
            "{ \"messages\" : [ {\"role\":\"user\", \"content\":\"caf\\u00e9 \\\"q\\\"\"} ],\n",
            "  \"mod\\u0065l\": \"alias\", \"stream\": true,\n",
            "  \"stream_options\": {\"include_usage\": false}, \"top_k\" : 5 }",
        );
        let req =
            InboundRequest::parse(Endpoint::Chat, Bytes::from_static(body.as_bytes())).unwrap();
        let out = req.to_upstream_json("meta/llama", Some(&req.upstream_stream_options()));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            concat!(
                r#"{"model":"meta/llama","stream_options":{"include_usage":true},"#,
                r#""messages":[ {"role":"user", "content":"caf\u00e9 \"q\""} ],"#,
                r#""stream":true,"top_k":5}"#,
            )
        );
    }

    #[test]
    fn non_stream_upstream_body_drops_stream_options() {
        let body = r#"{"model":"a","prompt":["x","y"],"stream_options":{"include_usage":true}}"#;
        let req = InboundRequest::parse(Endpoint::Completions, Bytes::from_static(body.as_bytes()))
            .unwrap();
        let out: Value = serde_json::from_slice(&req.to_upstream_json("m", None)).unwrap();
        assert!(out.get("stream_options").is_none());
        assert_eq!(out["prompt"][1], "y");
    }
}
